"""GPU micro-benchmark (not a test: pytest collects test_*.py only): NF4 dequantisation and the NF4 linear.

    python tests/bench_nf4_dequant.py [--iters 50] [--tokens 512] [--json out.jsonl]

For llama3-8b's weight shapes (wq/wo 4096×4096, wk/wv 1024×4096, w1/w3 14336×4096, w2 4096×14336), random
bf16 weights quantised on the GPU (double quantisation, as train.py stores them), one JSON line each for:
  dequant   eager-old (the formula before model/nf4.py's rewrite: stack + shift + int + gather + multiply
            + cast), eager-new (dequantize_tensors: one gather from the nibble-pair table, multiply-and-cast)
            and compiled (dequantize_fused: one Inductor kernel); ms, effective GB/s over the bytes a fused
            kernel must move (the 4-bit codes and statistics read, W written in bf16), and whether the
            output equals eager-old bit for bit.
  linear    forward + backward (∂L/∂u) of u·Wᵀ for --tokens rows of bf16 u: F.linear on the bf16 W, and
            echo_lora::nf4_linear with the eager and the compiled dequantisation (model.nf4.EAGER).
Times are CUDA-event means over --iters calls after a warm-up (which compiles).
"""
import argparse
import json
import sys
from math import prod
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # run from anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model.nf4 as nf4  # noqa: E402
from model.lora import nf4_linear  # noqa: E402
from model.nf4 import _absmax, dequantize_fused, dequantize_tensors, nf4_bytes, quantize_nf4  # noqa: E402

SHAPES = {"wq/wo": (4096, 4096), "wk/wv": (1024, 4096), "w1/w3": (14336, 4096), "w2": (4096, 14336)}


def old_dequantize_tensors(packed, absmax, absmax2, offset, code, dq_code, *, shape, blocksize, dq_blocksize, dtype):
    """model/nf4.py's dequantize_tensors before the rewrite (as in tests/test_nf4_fused.py)."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1, blocksize)
    w = code[codes.int()] * _absmax(absmax, absmax2, offset, dq_code, dq_blocksize)[:, None]
    return w.view(-1)[: prod(shape)].view(shape).to(dtype)


def cuda_ms(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    ap.add_argument("--tokens", type=int, default=512, help="rows of u for the linear (batch 2 × 256)")
    ap.add_argument("--json", default=None, help="append the JSON lines here too")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: bench_nf4_dequant.py needs a CUDA GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.cuda.get_device_name()
    out = open(opts.json, "a") if opts.json else None

    def emit(**record):
        line = json.dumps({"device": device, **record})
        print(line, flush=True)
        if out:
            out.write(line + "\n")

    torch.manual_seed(0)
    for name, shape in SHAPES.items():
        q = quantize_nf4((torch.randn(shape, device="cuda") * 0.02).bfloat16())
        kw = dict(shape=q.shape, blocksize=q.blocksize, dq_blocksize=q.dq_blocksize, dtype=torch.bfloat16)
        moved = nf4_bytes(q) + prod(shape) * 2                   # codes + statistics read, bf16 W written
        want = old_dequantize_tensors(*q.tensors(), **kw)
        nf4.EAGER = False
        for impl, fn in (("eager-old", old_dequantize_tensors), ("eager-new", dequantize_tensors),
                         ("compiled", dequantize_fused)):
            ms = cuda_ms(lambda: fn(*q.tensors(), **kw), opts.iters)
            same = torch.equal(fn(*q.tensors(), **kw).view(torch.int16), want.view(torch.int16))
            emit(what="dequant", weight=name, shape=list(shape), impl=impl, ms=round(ms, 4),
                 gb_per_s=round(moved / ms / 1e6, 1), bit_identical=same)

        w = want.clone()
        u = torch.randn(opts.tokens, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(opts.tokens, shape[0], device="cuda", dtype=torch.bfloat16)
        for impl, eager, op in (("bf16", None, lambda u: F.linear(u, w)),
                                ("nf4-eager", True, lambda u: nf4_linear(u, q)),
                                ("nf4-compiled", False, lambda u: nf4_linear(u, q))):
            if eager is not None:
                nf4.EAGER = eager
            ms = cuda_ms(lambda: torch.autograd.grad(op(u), u, grad), opts.iters)
            emit(what="linear fwd+bwd", weight=name, shape=list(shape), tokens=opts.tokens, impl=impl, ms=round(ms, 4))
        nf4.EAGER = False


if __name__ == "__main__":
    main()
