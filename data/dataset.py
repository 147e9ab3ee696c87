"""Fine-tuning data in the LLM-Adapters format: read, tokenize, shuffle, shard, pad.

Rows are {"instruction", "input", "output", "answer"} ("input" and "answer" optional); a file is a JSON list
of rows or JSON lines, one row per line.

Tokenization (tokenize_example): prompt = build_prompt(example, template), response = example["output"];
    ids    = encode(prompt, bos=tok.add_bos) + encode(response) + [eos]
    labels = [-100] * len(prompt ids)        + encode(response) + [eos]
"Unshifted" labels: labels[t] is the target for the logit at t-1. The prompt and response are encoded
separately, so the answer boundary is exact (a BPE merge can never straddle it). One consequence with
SentencePiece (LLaMA 1/2): the response's first piece carries the word-start marker ("▁the", not the
"the" a joint encoding of prompt + response gives), unlike LLM-Adapters, which encodes the joined text;
train and eval agree on it (generation continues from the prompt ids), and tiktoken is unaffected.
A sequence longer than
max_len is DROPPED rather than cut: its end is answer tokens, so any cut would remove some of the answer.
TokenizedDataset.n_dropped counts them.

Batching: one optimizer step consumes a GLOBAL batch of G examples, the same G examples whatever the
number of processes. Per epoch the example order is a permutation seeded by (seed, epoch); step s takes
order[s*G : (s+1)*G] (the incomplete last global batch is dropped, steps_per_epoch = N // G). That global
batch is cut into world_size contiguous equal shards; rank r takes shard r and splits it into
grad_accum = G // (world_size * micro_batch) micro-batches of micro_batch rows. Hence a 1-process run
with grad_accum 2 and a 2-process run with grad_accum 1 see exactly the same examples per step.

    for step, micro_batches in batches(ds, global_batch=G, micro_batch=b, rank=r, world_size=W,
                                       seed=seed, epoch=e, start_step=s0):   # resume: (e, s0)
        for mb in micro_batches:   # dict: input_ids [b,L] long, labels [b,L] long, attention_mask [b,L] bool,
            ...                    #       n_targets (int, this micro-batch), global_n_targets (int, whole step),
                                   #       index [b] long (dataset rows, for debugging / checks)

n_targets = number of supervised logit positions = #{t : labels[t] != -100} (t >= 1 always, since the
first position is BOS or prompt). Summing the token losses of every micro-batch and dividing by
global_n_targets gives the exact token-mean over the global batch, independent of world_size.

Padding: right padding with tok.pad_id, labels -100, attention_mask False; a micro-batch is padded to its
longest row rounded up to a multiple of pad_multiple (default 32, capped at the dataset's max_len) so
torch.compile sees only a few shapes. `group_by_length` (train.py's default) puts rows of similar
length into the same global batch (length_grouped_order), which cuts most of the padding.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

from data.prompts import build_prompt

IGNORE_INDEX = -100


def _read_rows(path: Path):
    """Yields (where, row); where = "FILE: row N" (1-based list index) or "FILE: line N" (JSON lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        for n, row in enumerate(rows, 1):
            yield f"{path}: row {n}", row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        yield f"{path}: line {n}", row


def load_examples(paths) -> list:
    """Reads one or more files (path or list of paths), concatenated in the given order.
    Returns dicts with str keys instruction, input ("" if absent), output, answer ("" if absent)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    examples = []
    for path in map(Path, paths):
        for where, row in _read_rows(path):
            examples.append(_check_row(where, row))
    if not examples:
        raise ValueError(f"no examples in {', '.join(map(str, paths)) or '(no files given)'}")
    return examples


def _check_row(where, row):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: missing or non-string {key!r}")
    for key in ("input", "answer"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{where}: {key!r} must be a string")
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"],
            "answer": row.get("answer") or ""}


def tokenize_example(tokenizer, example: dict, template: str = "alpaca", max_len: int = 256):
    """-> (ids, labels) lists of equal length, or None when longer than max_len (see module docstring)."""
    prompt = tokenizer.encode(build_prompt(example, template, for_eval=False), bos=tokenizer.add_bos)
    response = tokenizer.encode(example["output"]) + [tokenizer.eos_id]
    if len(prompt) + len(response) > max_len:
        return None
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


class TokenizedDataset:
    """ids[i], labels[i]: lists of ints; n_targets[i]: supervised positions of row i;
    n_dropped: examples longer than max_len (dropped)."""

    def __init__(self, examples, tokenizer, template="alpaca", max_len=256):
        self.max_len, self.pad_id, self.template = max_len, tokenizer.pad_id, template
        self.ids, self.labels, self.n_targets, self.n_dropped = [], [], [], 0
        for ex in examples:
            out = tokenize_example(tokenizer, ex, template, max_len)
            if out is None:
                self.n_dropped += 1
            else:
                self.ids.append(out[0])
                self.labels.append(out[1])
                self.n_targets.append(sum(l != IGNORE_INDEX for l in out[1]))
        if not self.ids:
            raise ValueError(f"all {self.n_dropped} examples are longer than max_len={max_len} tokens")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.labels[i]


def load_dataset(paths, tokenizer, template="alpaca", max_len=256) -> TokenizedDataset:
    return TokenizedDataset(load_examples(paths), tokenizer, template, max_len)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation of range(n) fixed by (seed, epoch).
    numpy's legacy RandomState stream is frozen across numpy versions."""
    return np.random.RandomState([seed, epoch]).permutation(n)


def holdout_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The rows held out for validation (--val-split): a sorted, seed-fixed sample of round(n·fraction)
    of range(n). train.py trains on the others; eval.py --search-boundary draws from these, so the
    boundary is never picked on rows the adapter trained on. Independent of the epoch shuffles."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-split must be in [0, 1), got {fraction}")
    n_val = int(round(n * fraction))
    return np.sort(np.random.RandomState([seed, 7919]).permutation(n)[:n_val])


def split_holdout(examples: list, fraction: float, seed: int):
    """-> (train rows, validation rows) of `examples` (see holdout_indices)."""
    held = set(holdout_indices(len(examples), fraction, seed).tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def steps_per_epoch(dataset, global_batch: int) -> int:
    return len(dataset) // global_batch


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int = 1) -> int:
    if global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro_batch {micro_batch} "
                         f"x world_size {world_size}")
    return global_batch // (micro_batch * world_size)


def collate(rows, pad_id: int, pad_multiple: int = 32, max_len=None) -> dict:
    """rows: list of (ids, labels). Right-pads to the longest row rounded up to pad_multiple (<= max_len)."""
    longest = max(len(ids) for ids, _ in rows)
    L = math.ceil(longest / pad_multiple) * pad_multiple
    if max_len is not None:
        L = max(min(L, max_len), longest)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
            "n_targets": int((labels != IGNORE_INDEX).sum())}


def length_grouped_order(order: np.ndarray, lengths, global_batch: int, seed: int, epoch: int,
                         window: int = 64) -> np.ndarray:
    """--group-by-length: within each window of `window` global batches of the shuffled order, sort
    the rows by length and re-cut them into global batches, then shuffle those batches (seeded by
    seed, epoch, window). Every row is still seen once per epoch and batches still come in random
    order, but a batch holds rows of similar length, so little of it is padding. The price: rows of
    a batch are correlated in length (as with Hugging Face's group_by_length)."""
    out = []
    span = window * global_batch
    for w, start in enumerate(range(0, len(order), span)):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort([-lengths[i] for i in chunk], kind="stable")]
        n_full = len(chunk) // global_batch
        groups = [chunk[b * global_batch:(b + 1) * global_batch] for b in range(n_full)]
        rest = chunk[n_full * global_batch:]
        perm = np.random.RandomState([seed, epoch, w]).permutation(len(groups))
        out.extend(groups[i] for i in perm)
        if len(rest):
            out.append(rest)
    return np.concatenate(out) if out else order


def batches(dataset, *, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
            seed: int = 0, epoch: int = 0, start_step: int = 0, pad_multiple: int = 32,
            group_by_length: bool = False):
    """Yields (step, [micro-batch dicts of this rank]) for steps start_step .. steps_per_epoch-1 of `epoch`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    accum = grad_accum_steps(global_batch, micro_batch, world_size)
    n_steps = steps_per_epoch(dataset, global_batch)
    if n_steps == 0:
        raise ValueError(f"dataset of {len(dataset)} examples is smaller than one global batch ({global_batch})")
    order = epoch_order(len(dataset), seed, epoch)
    if group_by_length:
        order = length_grouped_order(order, [len(ids) for ids in dataset.ids], global_batch, seed, epoch)
    shard = global_batch // world_size
    for step in range(start_step, n_steps):
        idx = order[step * global_batch:(step + 1) * global_batch]
        global_n = sum(dataset.n_targets[i] for i in idx)
        mine = idx[rank * shard:(rank + 1) * shard]
        mbs = []
        for a in range(accum):
            rows = [dataset[i] for i in mine[a * micro_batch:(a + 1) * micro_batch]]
            mb = collate(rows, dataset.pad_id, pad_multiple, dataset.max_len)
            mb["global_n_targets"] = int(global_n)
            mb["index"] = torch.as_tensor(mine[a * micro_batch:(a + 1) * micro_batch], dtype=torch.long)
            mbs.append(mb)
        yield step, mbs
