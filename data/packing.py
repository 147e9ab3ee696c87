"""--pack: a micro-batch's examples laid end to end into fewer, fuller rows (docs/packing.md).

The step consumes the same examples in the same order as without packing (data.batches decides them);
packing changes only their layout in memory. Per packed token we keep which example it belongs to
(`documents`, −1 on padding) and its position inside that example (`positions`, restarting at 0), so the
model can attend within an example only (model.model.document_attention_mask) and rotate by the same RoPE
angles as unpacked. Per example we keep its row and its answer boundary t* in row coordinates, so Echo
computes z, δ and M per example (echo.echo_loss with `packing`).
"""
import math
from dataclasses import dataclass

import torch

from data.dataset import IGNORE_INDEX


# Packed rows are padded to the fullest row rounded up to a multiple of this (data.collate rounds padded rows to
# 32): on the commonsense train mix (SmolLM2 tokenizer, --max-len 256, micro-batch 16, length-grouped) rounding
# to 32 leaves 10.1 % padding, to 8 4.7 %, while 8 still gives few shapes and tensor-core-sized tiles.
PACK_MULTIPLE = 8
# The flat layout (--pack-layout flat: the micro-batch in one row) pads to flex_attention's block size, so its
# BlockMask tiles the row exactly and the padding is one partly filled block.
FLAT_MULTIPLE = 128


@dataclass
class Packing:
    """The layout the model and Echo need, as an explicit argument (no global state):
    positions [R, L] RoPE position of each token inside its example; documents [R, L] the example (0 … N−1,
    its index in the micro-batch) each token belongs to, −1 on padding; example_row, example_start,
    example_length [N]: where example i lies (row, first slot, tokens)."""
    positions: torch.Tensor
    documents: torch.Tensor
    example_row: torch.Tensor
    example_start: torch.Tensor
    example_length: torch.Tensor

    def flat(self, local):
        """Positions `local` [N, P] inside each example -> their indices in the flattened rows [R·L]."""
        L = self.documents.shape[1]
        return (self.example_row * L + self.example_start)[:, None] + local

    def per_example(self, h, local):
        """h [R, L, ...] at positions `local` [N, P] of each example -> [N, P, ...]: the padded layout's rows."""
        return h.flatten(0, 1)[self.flat(local)]


def first_fit_rows(lengths, row_len):
    """Examples (by index) into rows of at most row_len tokens: first fit, longest first (stable), so a
    micro-batch of B examples takes close to Σ lengths / row_len rows. -> list of lists of example indices,
    each in micro-batch order."""
    rows, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if used[r] + lengths[i] <= row_len:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return [sorted(r) for r in rows]


def pack_micro_batch(mb, row_len, pad_id, pad_multiple=PACK_MULTIPLE, flat=False):
    """A collated micro-batch (data.collate: right-padded input_ids / labels / attention_mask [B, T]) → the
    packed micro-batch: a dict with input_ids, labels [R, L] and `packing` (Packing). L = the fullest row
    rounded up to pad_multiple, at most row_len. The supervision (echo.supervision of the padded labels:
    answer positions, targets, t*) stays per example, in each example's own positions: the packed step reads
    logits at example_start + those positions, so the last token of one example never predicts the first
    of the next. Raises, in one line, if an example is longer than row_len or is supervised from its first
    token (it would have no prompt, and so no t*).
    flat=True (--pack-layout flat): every example, in micro-batch order, in ONE row of L = Σ lengths rounded up
    to FLAT_MULTIPLE (flex_attention's 128-token block), whatever row_len (which still bounds each example, as
    the RoPE table and the data do): padding is under one block per micro-batch. Only a block-sparse kernel
    (model.document_block_mask) makes that row cheap; SDPA's explicit mask would cost L²."""
    lengths = mb["attention_mask"].sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"--pack: example {i} of the micro-batch has {n} tokens, more than a packed row "
                             f"of --max-len {row_len}: raise --max-len or train without --pack")
    if bool((mb["labels"][:, 0] != IGNORE_INDEX).any()):
        raise ValueError("--pack: an example is supervised from its first token, so the example before it in a "
                         "packed row would predict it: every example needs a prompt")
    if flat:
        rows = [list(range(len(lengths)))]
        L = math.ceil(sum(lengths) / FLAT_MULTIPLE) * FLAT_MULTIPLE
    else:
        rows = first_fit_rows(lengths, row_len)
        fullest = max(sum(lengths[i] for i in r) for r in rows)
        L = max(min(math.ceil(fullest / pad_multiple) * pad_multiple, row_len), fullest)
    R, B = len(rows), len(lengths)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((R, L), dtype=torch.long)
    documents = torch.full((R, L), -1, dtype=torch.long)
    example_row, start = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = lengths[i]
            input_ids[r, offset:offset + n] = mb["input_ids"][i, :n]
            labels[r, offset:offset + n] = mb["labels"][i, :n]
            positions[r, offset:offset + n] = torch.arange(n)
            documents[r, offset:offset + n] = i
            example_row[i], start[i] = r, offset
            offset += n
    lengths = torch.tensor(lengths, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels,
            "packing": Packing(positions, documents, example_row, start, lengths)}


def padding_share(lengths, micro_batch, row_len, pad_multiple=32, pack_multiple=PACK_MULTIPLE):
    """(processed tokens, real tokens) of consecutive micro-batches of `lengths`, padded as data.collate pads
    (to pad_multiple) and packed as pack_micro_batch packs (to pack_multiple), as docs/packing.md measures:
    -> {"padded": (processed, real), "packed": (processed, real)}."""
    padded = packed = real = 0
    for s in range(0, len(lengths) - micro_batch + 1, micro_batch):
        chunk = lengths[s:s + micro_batch]
        longest = max(chunk)
        padded += len(chunk) * max(min(math.ceil(longest / pad_multiple) * pad_multiple, row_len), longest)
        rows = first_fit_rows(chunk, row_len)
        fullest = max(sum(chunk[i] for i in r) for r in rows)
        packed += len(rows) * max(min(math.ceil(fullest / pack_multiple) * pack_multiple, row_len), fullest)
        real += sum(chunk)
    return {"padded": (padded, real), "packed": (packed, real)}
