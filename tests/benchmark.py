"""GPU benchmark (not a test): ms per training step, tokens/s, MFU and peak memory.

    python tests/benchmark.py --model llama3-8b --method lora dora --compile both

Random weights in bf16, batch 2 × 256, answers on the last 32 positions of every sample (the
supervised positions are the only ones projected to the vocabulary). The Echo columns run train.py's
own step function with the router forced on (routed) or off (unrouted).
"""
import argparse
import json
import time

import torch

from model import ModelArgs
from model.load import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--method", nargs="+", default=["lora", "dora"])
    ap.add_argument("--echo", nargs="+", default=["off"], help="off | routed | unrouted")
    ap.add_argument("--compile", default="both", choices=["yes", "no", "both"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    import train   # the step under test is train.py's own

    results = []
    for compiled in {"yes": [True], "no": [False], "both": [False, True]}[opts.compile]:
        for method in opts.method:
            for echo in opts.echo:
                torch.cuda.empty_cache()
                torch._dynamo.reset()
                args = ModelArgs.from_name(opts.model, adapter=method, lora_dropout=0.05)
                model = build_model(args, "cuda", torch.bfloat16)
                model.init_dora_magnitudes()
                n_params = sum(p.numel() for p in model.parameters())
                stepper = train.make_benchmark_step(model, echo, compiled, opts.batch, opts.seq, opts.answer)
                for _ in range(5):
                    stepper()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(opts.steps):
                    stepper()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / opts.steps * 1000
                tokens = opts.batch * opts.seq
                passes = 2 if echo == "routed" else 1
                mfu = 4 * n_params * tokens * passes / (ms / 1000) / (opts.peak_tflops * 1e12)
                row = dict(model=opts.model, method=method, echo=echo, compiled=compiled, ms=round(ms, 2),
                           tokens_per_s=round(tokens / ms * 1000), mfu=round(mfu, 3),
                           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
                print(json.dumps(row), flush=True)
                results.append(row)
                del model, stepper
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
