"""`python -m experiments.pack_attention`: which attention kernel --pack's packed rows should use, chosen by
measurement (issue 30, docs/packing.md "Measuring it on a GPU" step 1).

On one CUDA GPU it times forward + backward of causal attention alone (random bf16 q/k/v: the values do not
change the speed) over the real layouts of train.py's paper recipe: the commonsense train mix tokenized with
--model's tokenizer (alpaca, --max-len 256, --val-split 0.02, seed 42), grouped by length into global batches of
16, the first --micro-batches steps of epoch 0, each packed by data.pack_micro_batch. Kernels:

    padded          SDPA is_causal on the padded [B, T] micro-batch (what --pack replaces), the baseline
    sdpa-mask       SDPA with model.model.document_attention_mask on the packed [R, 256] rows (--pack today)
    flex            flex_attention (torch.compile'd) with a document + causal BlockMask on the packed rows
    varlen          torch.nn.attention.varlen.varlen_attn on the packed rows' real tokens [N, heads, head_dim],
                    cu_seqlens per example, causal through window_size=(-1, 0)
    sdpa-mask-flat  sdpa-mask on one flat row per micro-batch (Σ lengths, rounded up to 8: ~0 % padding)
    flex-flat       flex on that flat row (its BlockMask skips the masked blocks)

Before timing, every kernel's output and q/k/v gradients at every real token are compared with an fp32 padded
reference on the same inputs (max abs diff of the outputs; gradient diff relative to the largest reference
gradient); a kernel above BF16_TOL is flagged ok=false. A kernel that raises (varlen_attn without a flash
backend, say) gets a row with its one-line error. Rows are appended to results/speed/pack-attention-<gpu>.jsonl.

    python -m experiments.pack_attention --model ../smollm2                      # both shapes, all kernels
    python -m experiments.pack_attention --model ../smollm2 --check              # CPU, fp64, no timing
    python -m experiments.pack_attention --table results/speed/pack-attention-h100.jsonl

--check runs the comparison only, on CPU in fp64: padded, sdpa-mask(-flat) and flex(-flat) (flex eagerly:
flex_attention runs uncompiled on CPU); varlen_attn is CUDA-only and is skipped there.
"""
import json
import math
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from model.io import first_line
from model.load import CliParser, HelpFormatter
from model.model import PRESETS, ModelArgs, document_attention_mask

from .common import DATA_DIR, RESULTS, StepFailed, json_objects, shown_path, write_atomic
from .runs import train_files

BF16_TOL = 5e-2     # bf16 attention vs the fp32 reference: ≤ ~2e-2 is rounding; a leak across examples gives ~0.3+
FP64_TOL = 1e-10    # --check: fp64 against fp64
RECIPE = dict(template="alpaca", max_len=256, val_split=0.02, seed=42, global_batch=16, group_by_length=True)


# ------------------------------------------------------------------ layouts

@dataclass
class Layout:
    """Where a micro-batch's real tokens lie in a kernel's input of rows × length slots. index [N]: the slot
    (row · length + column) of each real token in canonical order (example 0's tokens, then example 1's, ...),
    so every layout's outputs can be compared token by token; documents [rows, length]: each slot's example
    (−1 on padding), what the masks are built from."""
    rows: int
    length: int
    index: torch.Tensor
    documents: torch.Tensor


def padded_layout(mb):
    """data.collate's right-padded [B, T] micro-batch: example i in row i."""
    mask = mb["attention_mask"].bool()
    B, T = mask.shape
    documents = torch.where(mask, torch.arange(B)[:, None], torch.tensor(-1))
    return Layout(B, T, mask.flatten().nonzero().squeeze(1), documents)


def packed_layout(packing):
    """data.pack_micro_batch's rows [R, L] (its Packing)."""
    R, L = packing.documents.shape
    index = torch.cat([r * L + s + torch.arange(n) for r, s, n in zip(packing.example_row.tolist(),
                       packing.example_start.tolist(), packing.example_length.tolist())])
    return Layout(R, L, index, packing.documents)


def varlen_layout(packing):
    """The packed rows flattened with their padding dropped, [1, N]: one contiguous run per example, in the
    packer's row order. What varlen_attn takes (with cu_seqlens of these runs)."""
    documents = packing.documents.flatten()
    real = (documents >= 0).nonzero().squeeze(1)
    slot = torch.full_like(documents, -1)
    slot[real] = torch.arange(len(real))
    return Layout(1, len(real), slot[packed_layout(packing).index], documents[real][None])


def cu_seqlens(documents):
    """The cumulative sequence lengths of a flat layout's documents ([N] or [1, N], no padding): [0, end of the
    first example's run, ..., N], as varlen_attn takes them. Pure Python; raises if an example is split."""
    d = documents.flatten().tolist()
    cuts = [0] + [i for i in range(1, len(d)) if d[i] != d[i - 1]] + [len(d)]
    runs = [d[a] for a in cuts[:-1]]
    if len(set(runs)) != len(runs) or min(d, default=0) < 0:
        raise ValueError("cu_seqlens: an example is split into several runs, or the layout holds padding")
    return cuts


def micro_batch_layouts(mb, row_len, pad_id):
    """The four layouts the kernels read, of one collated micro-batch."""
    packed = data.pack_micro_batch(mb, row_len, pad_id)["packing"]
    total = int(mb["attention_mask"].sum())
    flat = data.pack_micro_batch(mb, math.ceil(total / data.PACK_MULTIPLE) * data.PACK_MULTIPLE, pad_id)["packing"]
    return {"padded": padded_layout(mb), "packed": packed_layout(packed), "flat": packed_layout(flat),
            "varlen": varlen_layout(packed)}


# ------------------------------------------------------------------ kernels
# prepare(documents on the device) is built once per micro-batch (a step shares it over all layers);
# attend(q, k, v, prepared) is what each layer pays. q [R, H, L, D], k/v [R, Hkv, L, D]; varlen: [N, H, D].

_compiled_flex = {}


def flex_fn(compiled):
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    if "fn" not in _compiled_flex:
        _compiled_flex["fn"] = torch.compile(flex_attention)
    return _compiled_flex["fn"]


def document_block_mask(documents):
    """flex_attention's BlockMask: causal ∧ the key is in the query's example (padding sees earlier padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_example_causal(b, h, q, kv):
        return (documents[b, q] == documents[b, kv]) & (kv <= q)
    R, L = documents.shape
    return create_block_mask(same_example_causal, R, None, L, L, device=documents.device)


def varlen_prepare(documents):
    cu = cu_seqlens(documents)
    return torch.tensor(cu, dtype=torch.int32, device=documents.device), max(b - a for a, b in zip(cu, cu[1:]))


def varlen(q, k, v, prepared):
    """varlen_attn, causal. torch 2.13 asks for causality with window_size=(-1, 0); older ones with is_causal."""
    import inspect
    from torch.nn.attention.varlen import varlen_attn
    cu, longest = prepared
    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kw["enable_gqa"] = q.shape[1] != k.shape[1]
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kw)


def gqa(q, k):
    return q.shape[1] != k.shape[1]


@dataclass
class Kernel:
    layout: str
    flat: bool            # takes [tokens, heads, head_dim] (varlen), else [rows, heads, length, head_dim]
    prepare: object
    attend: object


def kernels(compiled):
    """name -> Kernel. compiled: flex through torch.compile (GPU), else eager (CPU --check)."""
    sdpa_mask = Kernel("packed", False, document_attention_mask,
                       lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa(q, k)))
    flex = Kernel("packed", False, document_block_mask,
                  lambda q, k, v, m: flex_fn(compiled)(q, k, v, block_mask=m, enable_gqa=gqa(q, k)))
    return {"padded": Kernel("padded", False, lambda d: None,
                             lambda q, k, v, _: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=gqa(q, k))),
            "sdpa-mask": sdpa_mask, "flex": flex, "varlen": Kernel("varlen", True, varlen_prepare, varlen),
            "sdpa-mask-flat": Kernel("flat", False, sdpa_mask.prepare, sdpa_mask.attend),
            "flex-flat": Kernel("flat", False, flex.prepare, flex.attend)}


KERNELS = list(kernels(False))
CPU_KERNELS = [k for k in KERNELS if k != "varlen"]


def to_layout(x, layout, flat):
    """Canonical tokens [N, heads, D] -> the layout's storage, zeros on padding: [R·L, heads, D] when flat,
    else [R, heads, L, D]."""
    out = x.new_zeros(layout.rows * layout.length, *x.shape[1:]).index_copy(0, layout.index.to(x.device), x)
    return out if flat else out.view(layout.rows, layout.length, *x.shape[1:]).transpose(1, 2)


def from_layout(y, layout, flat):
    """The layout's storage -> its real tokens in canonical order [N, heads, D]."""
    y = y if flat else y.transpose(1, 2).flatten(0, 1)
    return y[layout.index.to(y.device)]


def run_kernel(kernel, layout, q, k, v, gout, backward=True):
    """One forward (+ backward) of `kernel` on `layout` from canonical q/k/v [N, heads, D], the loss
    Σ out · gout over the real tokens only (padding gets no gradient, as in training).
    -> (out, (dq, dk, dv) or None), all canonical [N, heads, D]."""
    leaves = [to_layout(x, layout, kernel.flat).detach().requires_grad_(backward) for x in (q, k, v)]
    prepared = kernel.prepare(layout.documents.to(q.device))
    out = from_layout(kernel.attend(*leaves, prepared), layout, kernel.flat)
    if not backward:
        return out, None
    grads = torch.autograd.grad((out.to(gout.dtype) * gout).sum(), leaves)
    return out, tuple(from_layout(g, layout, kernel.flat) for g in grads)


def compare(kernel, layout, inputs, reference, backward=True):
    """(max abs diff of the outputs, max abs diff of dq/dk/dv / the largest reference gradient, or None without
    `backward`) of `kernel` on `layout` against `reference` = run_kernel's (out, grads) of the padded layout, at
    every real token."""
    out, grads = run_kernel(kernel, layout, *inputs, backward=backward)
    ref_out, ref_grads = reference
    d_out = (out.to(ref_out.dtype) - ref_out).abs().max().item()
    if not backward:
        return d_out, None
    scale = max(g.abs().max().item() for g in ref_grads) or 1.0
    d_grad = max((g.to(r.dtype) - r).abs().max().item() for g, r in zip(grads, ref_grads)) / scale
    return d_out, d_grad


def random_inputs(n_tokens, shape, seed, device, dtype):
    """q [N, H, D], k, v [N, Hkv, D] and the output gradient [N, H, D], standard normal, seeded on CPU."""
    H, Hkv, D = shape
    g = torch.Generator().manual_seed(seed)
    sizes = [(n_tokens, H, D), (n_tokens, Hkv, D), (n_tokens, Hkv, D), (n_tokens, H, D)]
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in sizes)


# ------------------------------------------------------------------ measuring

def head_shape(name):
    """(query heads, kv heads, head dim) of --shape: smollm2 (SmolLM2-135M's params.json: dim 576, 9 heads,
    3 kv heads; no ModelArgs preset holds it), a ModelArgs preset (llama3-8b) or a params.json path."""
    if name == "smollm2":
        args = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152)
    elif Path(name).is_file():
        args = ModelArgs.from_params_json(name)
    elif name in PRESETS:
        args = ModelArgs.from_name(name)
    else:
        raise StepFailed(f"--shape {name}: not smollm2, a preset ({', '.join(PRESETS)}) or a params.json file")
    return args.n_heads, args.n_kv_heads, args.head_dim


def real_micro_batches(model_dir, files, n):
    """The first n micro-batches (= global batches of 16) of epoch 0 of train.py's paper recipe (RECIPE) on
    `files`, tokenized with model_dir's tokenizer. -> (micro-batches, pad id, max_len)."""
    from model.tokenizer import load_tokenizer
    r = RECIPE
    rows = data.load_examples(files)
    rows, _ = data.split_holdout(rows, r["val_split"], r["seed"])
    ds = data.TokenizedDataset(rows, load_tokenizer(model_dir), r["template"], r["max_len"])
    out = []
    for _, mbs in data.batches(ds, global_batch=r["global_batch"], micro_batch=r["global_batch"], seed=r["seed"],
                               epoch=0, group_by_length=r["group_by_length"]):
        out += mbs
        if len(out) >= n:
            break
    return out[:n], ds.pad_id, ds.max_len


def time_ms(fn, warmup, iters, cuda):
    """Median ms of fn() after `warmup` calls: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def time_kernel(kernel, layout, shape, device, dtype, warmup, iters):
    """(ms of attention forward + backward, ms of building its mask) of one micro-batch, both medians."""
    H, Hkv, D = shape
    n = layout.rows * layout.length
    sizes = [(H, D), (Hkv, D), (Hkv, D)]
    if kernel.flat:
        leaves = [torch.randn(n, h, d, device=device, dtype=dtype) for h, d in sizes]
    else:
        leaves = [torch.randn(layout.rows, h, layout.length, d, device=device, dtype=dtype) for h, d in sizes]
    leaves = [x.requires_grad_() for x in leaves]
    documents = layout.documents.to(device)
    prepared = kernel.prepare(documents)
    gout = torch.randn_like(leaves[0])
    cuda = device.type == "cuda"

    def step():
        torch.autograd.grad(kernel.attend(*leaves, prepared), leaves, gout)
    ms = time_ms(step, warmup, iters, cuda)

    def build():
        kernel.prepare(documents)
        if cuda:
            torch.cuda.synchronize()
    return ms, time_ms(build, 1, iters, False)


def measure(mbs, pad_id, max_len, shape, names, device, timing, warmup=3, iters=10, log=print):
    """One row per kernel of `names` for head shape (H, Hkv, D) over the micro-batches `mbs`: the comparison
    with the padded reference (bf16 kernels vs fp32 when timing, fp64 vs fp64 without), then the timing."""
    dtype, ref_dtype, tol = (torch.bfloat16, torch.float32, BF16_TOL) if timing else (torch.float64,) * 2 + (FP64_TOL,)
    table = kernels(compiled=timing)
    if timing:
        torch._dynamo.reset()     # a fresh compile per head shape: only the micro-batches' R and L go dynamic
    layouts = [micro_batch_layouts(mb, max_len, pad_id) for mb in mbs]
    real = sum(len(ls["padded"].index) for ls in layouts)
    # flex_attention has no backward on CPU (torch 2.13): there only its outputs are compared
    backward = {n: device.type == "cuda" or not n.startswith("flex") for n in names}
    diffs, errors = {n: (0.0, 0.0 if backward[n] else None) for n in names}, dict.fromkeys(names)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        for i, ls in enumerate(layouts):
            inputs = random_inputs(len(ls["padded"].index), shape, i, device, dtype)
            reference = run_kernel(table["padded"], ls["padded"], *(x.to(ref_dtype) for x in inputs))
            for n in names:
                if errors[n] is None:
                    try:
                        d = compare(table[n], ls[table[n].layout], inputs, reference, backward[n])
                        diffs[n] = tuple(None if b is None else max(a, b) for a, b in zip(diffs[n], d))
                    except Exception as e:  # a kernel this build or device lacks: its row says why
                        errors[n] = first_line(e)
        rows = []
        for n in names:
            kernel = table[n]
            ms, mask_ms = [], []
            if timing and errors[n] is None:
                log(f"timing {n} ({len(layouts)} micro-batches)", file=sys.stderr, flush=True)
                try:
                    for ls in layouts:
                        a, b = time_kernel(kernel, ls[kernel.layout], shape, device, dtype, warmup, iters)
                        ms.append(a)
                        mask_ms.append(b)
                except Exception as e:
                    errors[n], ms, mask_ms = first_line(e), [], []
            processed = sum(ls[kernel.layout].rows * ls[kernel.layout].length for ls in layouts)
            d_out, d_grad = diffs[n] if errors[n] is None else (None, None)
            rows.append({"kernel": n, "layout": kernel.layout, "heads": shape[0], "kv_heads": shape[1],
                         "head_dim": shape[2], "micro_batches": len(layouts), "real_tokens": real,
                         "padded_tokens": processed,
                         "ms_fwd_bwd_median": round(statistics.median(ms), 4) if ms else None,
                         "ms_per_1k_real_tokens": round(1e3 * sum(ms) / real, 4) if ms else None,
                         "ms_mask_median": round(statistics.median(mask_ms), 4) if mask_ms else None,
                         "max_abs_diff": d_out, "max_rel_diff_grad": d_grad, "tolerance": tol,
                         "ok": errors[n] is None and d_out <= tol and (d_grad is None or d_grad <= tol),
                         "error": errors[n], "gradients": "compared" if backward[n] else "not compared (no CPU backward)",
                         "dtype": str(dtype).removeprefix("torch."), "warmup": warmup, "iters": iters})
    return rows


def device_slug(name):
    """A GPU's name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def append_jsonl(path, rows):
    """Append rows to a JSON-lines file, rewriting the whole file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_atomic(path, old + "".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------ the table

def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(records):
    """A markdown table of pack-attention rows: the last row per (device, shape, kernel), kernels in KERNELS
    order, speed relative to padded = padded's ms per 1k real tokens / the kernel's."""
    last = {}
    for r in records:
        last[(r.get("device"), r.get("shape"), r.get("kernel"))] = r
    order = {k: i for i, k in enumerate(KERNELS)}
    groups = list(dict.fromkeys(k[:2] for k in last))
    keys = sorted(last, key=lambda k: (groups.index(k[:2]), order.get(k[2], len(order))))
    lines = ["| device | shape | kernel | real tokens | processed tokens | ms fwd+bwd (median) | ms / 1k real tokens "
             "| vs padded | max abs diff | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        r = last[key]
        base = last.get((key[0], key[1], "padded"), {}).get("ms_per_1k_real_tokens")
        mine = r.get("ms_per_1k_real_tokens")
        speed = f"{base / mine:.2f}×" if base and mine else "–"
        ok = f"error: {r['error'][:60]}" if r.get("error") else ("yes" if r.get("ok") else "no")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r.get('real_tokens')} | {r.get('padded_tokens')} | "
                     f"{fmt(r.get('ms_fwd_bwd_median'), '.3f')} | {fmt(mine, '.3f')} | {speed} | "
                     f"{fmt(r.get('max_abs_diff'), '.1e')} | {ok} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the command

def parse_args(argv=None):
    p = CliParser(prog="python -m experiments.pack_attention", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="model folder whose tokenizer tokenizes the data (e.g. ../smollm2)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="the commonsense suite (its 5 train files)")
    p.add_argument("--shape", nargs="+", default=["smollm2", "llama3-8b"],
                   help="head shapes: smollm2, a ModelArgs preset, or a params.json")
    p.add_argument("--kernels", nargs="+", default=None, choices=KERNELS,
                   help="default: all (with --check: all but varlen, which is CUDA-only)")
    p.add_argument("--micro-batches", type=int, default=20, help="real micro-batches of 16 examples")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per micro-batch (flex compiles in them)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per micro-batch (their median counts)")
    p.add_argument("--check", action="store_true", help="the comparison only, on CPU in fp64; no timing")
    p.add_argument("--json", help="output JSONL (default results/speed/pack-attention-<gpu>.jsonl; "
                                  "with --check: print only)")
    p.add_argument("--table", metavar="JSONL", help="print the markdown table of a results file and exit")
    args = p.parse_args(argv)
    if args.micro_batches < 1 or args.warmup < 0 or args.iters < 1:
        p.error("--micro-batches and --iters must be ≥ 1, --warmup ≥ 0")
    if args.table is None and args.model is None:
        p.error("--model is required (its tokenizer builds the real micro-batches)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.table is not None:
            print(table([r for _, r in json_objects(args.table)]))
            return
        cuda = torch.cuda.is_available()
        if not args.check and not cuda:
            print("error: experiments.pack_attention times CUDA kernels and this machine has no CUDA GPU: run it "
                  "on one, or pass --check for the CPU correctness comparison", file=sys.stderr)
            sys.exit(2)
        names = args.kernels or (CPU_KERNELS if args.check else KERNELS)
        if args.check:
            names = [n for n in names if n != "varlen"]
        shapes = {s: head_shape(s) for s in args.shape}
        if not Path(args.model).is_dir():
            raise StepFailed(f"--model {args.model} is not a folder: give a model folder with a tokenizer")
        files = train_files(args.data_dir)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise StepFailed(f"missing {missing[0]}: give --data-dir the commonsense suite (e.g. ../shared/data/"
                             f"commonsense)")
        mbs, pad_id, max_len = real_micro_batches(args.model, files, args.micro_batches)
        if args.check:
            print("varlen: not checked (varlen_attn is CUDA-only: flash attention)", file=sys.stderr)
        device = torch.device("cuda" if cuda and not args.check else "cpu")
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        rows = []
        for label, shape in shapes.items():
            for r in measure(mbs, pad_id, max_len, shape, names, device, timing=not args.check,
                             warmup=args.warmup, iters=args.iters):
                r = {"shape": label if label in PRESETS or label == "smollm2" else shown_path(label), **r,
                     "device": name, "torch": torch.__version__, "tokenizer": Path(args.model).name,
                     "data": {**RECIPE, "files": len(files), "steps": len(mbs)}}
                rows.append(r)
        out = args.json or (None if args.check else RESULTS / "speed" / f"pack-attention-{device_slug(name)}.jsonl")
        if out is not None:
            append_jsonl(out, rows)
            print(f"wrote {len(rows)} rows to {shown_path(out)}", file=sys.stderr)
        print(table(rows))
        bad = [f"{r['shape']}/{r['kernel']}" for r in rows if not r["ok"]]
        if bad:
            print(f"warning: not ok: {', '.join(bad)}", file=sys.stderr)
            if args.check:
                sys.exit(1)
    except (StepFailed, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {first_line(e)}")


if __name__ == "__main__":
    main()
