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


@dataclass
class Packing:
    """The layout the model and Echo need, as an explicit argument (no global state):
    positions [R, L] RoPE position of each token inside its example; documents [R, L] the example (0 … N−1,
    its index in the micro-batch) each token belongs to, −1 on padding; example_row [N] the row of each
    example (z of example i is read at (example_row[i], boundary[i]), eq. 2)."""
    positions: torch.Tensor
    documents: torch.Tensor
    example_row: torch.Tensor


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


def pack_micro_batch(mb, boundary, row_len, pad_id, pad_multiple=32, bucket=1):
    """A collated micro-batch (data.collate: right-padded input_ids / labels / attention_mask [B, T]) and
    its per-example t* (`boundary` [B], from echo.supervision) → the packed micro-batch: a dict with
    input_ids, labels [R, L], `packing` (Packing), example_start [B] (where each example begins in its row)
    and `supervised` = (index, targets [R, P], boundary [B])
    where index/targets are the supervised logit positions of each packed row and boundary is each
    example's t* in its row's coordinates. L = the fullest row rounded up to pad_multiple, at most row_len.
    Raises, in one line, if an example is longer than row_len or its first token is supervised (then the
    last token of the example before it would predict it)."""
    lengths = mb["attention_mask"].sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"--pack: example {i} of the micro-batch has {n} tokens, more than a packed row "
                             f"of --max-len {row_len}: raise --max-len or train without --pack")
    if bool((mb["labels"][:, 0] != IGNORE_INDEX).any()):
        raise ValueError("--pack: an example is supervised from its first token, so the example before it in a "
                         "packed row would predict it: every example needs a prompt")
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
    index, targets = packed_targets(labels, documents, bucket)
    return {"input_ids": input_ids, "labels": labels, "packing": Packing(positions, documents, example_row),
            "supervised": (index, targets, start + boundary), "example_start": start}


def packed_targets(labels, documents, bucket=1):
    """The supervised logit positions of packed rows: t with y[t+1] ≠ −100 and t+1 in the same example (the
    last token of one example never predicts the first of the next) -> index, targets [R, P], P = the most
    supervised positions of a row, rounded up to `bucket`; padding slots point at 0 with target −100 (as in
    echo.supervision, whose positions per example these are, shifted by the example's start)."""
    R, L = labels.shape
    supervised = (labels[:, 1:] != IGNORE_INDEX) & (documents[:, 1:] == documents[:, :-1])
    counts = supervised.sum(dim=1)
    P = max(1, -(-int(counts.max()) // bucket) * bucket)
    pos = torch.arange(L - 1).expand(R, -1)
    order = torch.where(supervised, pos, pos + L).argsort(dim=1, stable=True)[:, :P]
    if order.shape[1] < P:
        order = torch.nn.functional.pad(order, (0, P - order.shape[1]))
    valid = torch.arange(P)[None, :] < counts[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))
    targets = torch.where(valid, labels.gather(1, index + 1), torch.full_like(index, IGNORE_INDEX))
    return index, targets


def padding_share(lengths, micro_batch, row_len, pad_multiple=32):
    """(processed tokens, real tokens) of consecutive micro-batches of `lengths`, padded as data.collate pads
    and packed as pack_micro_batch packs: -> {"padded": (processed, real), "packed": (processed, real)}."""
    padded = packed = real = 0
    for s in range(0, len(lengths) - micro_batch + 1, micro_batch):
        chunk = lengths[s:s + micro_batch]
        longest = max(chunk)
        padded += len(chunk) * max(min(math.ceil(longest / pad_multiple) * pad_multiple, row_len), longest)
        rows = first_fit_rows(chunk, row_len)
        fullest = max(sum(chunk[i] for i in r) for r in rows)
        packed += len(rows) * max(min(math.ceil(fullest / pad_multiple) * pad_multiple, row_len), fullest)
        real += sum(chunk)
    return {"padded": (padded, real), "packed": (packed, real)}
