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
    ap.add_argument("--compile", nargs="+", default=["no", "blocks"],
                    help="no | blocks | blocks-cg | step | step-cg (see train.compile_step)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 steps")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--json", default=None)
    opts = ap.parse_args()
    import train   # the step under test is train.py's own

    results = []
    for compiled in opts.compile:
        compiled = False if compiled == "no" else compiled
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
                if opts.profile:
                    from torch.profiler import ProfilerActivity, profile
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(3):
                            stepper()
                        torch.cuda.synchronize()
                    events = prof.key_averages()
                    gpu_us = sum(e.self_device_time_total for e in events) / 3
                    print(f"# {method} {echo} {compiled}: GPU busy {gpu_us / 1000:.1f} ms/step of {ms:.1f} ms")
                    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
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


if __name__ == "__main__" and "--check-accumulation" not in __import__("sys").argv:
    main()


def check_accumulation():
    """CUDA graphs keep outputs in a static pool: verify that gradients accumulated over two
    micro-batches (routed Echo step included) equal the uncompiled ones."""
    import train
    from echo import EchoConfig, EchoModule
    results = {}
    for how in (False, "blocks", "blocks-cg", "layers-cg"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        args = ModelArgs.from_name("llama3-8b", n_layers=4, adapter="lora", lora_dropout=0.0)
        model = build_model(args, "cuda", torch.bfloat16)
        with torch.no_grad():
            for m in model.adapter_linears():
                m.lora_b.normal_(0, 0.01)
        echo = EchoModule(EchoConfig(target_layers=(1,), source_layers=(-1,)), model.args).cuda()
        step = train.EchoStep(model, echo)
        runner = train.compile_step(step, how) if how else step
        gen = torch.Generator().manual_seed(1)
        for it in range(3):          # the third iteration is the one compared
            grads = None
            for routed in (True, False, True):
                for micro in range(2):
                    tokens = torch.randint(0, args.vocab_size, (2, 256), generator=gen)
                    labels = torch.full_like(tokens, -100)
                    labels[:, -20 - 10 * micro:] = tokens[:, -20 - 10 * micro:]
                    index, targets, boundary = train.supervision(labels)
                    batch = [t.cuda() for t in (tokens, labels, index, targets, boundary)]
                    with torch.autocast("cuda", torch.bfloat16):
                        loss, _ = runner(*batch, routed, torch.tensor(50.0))
                    loss.backward()
                    if how:
                        train.keep_grads(step.parameters())
                grads = {n: p.grad.float().clone() for n, p in step.named_parameters() if p.grad is not None}
                for p in step.parameters():
                    p.grad = None
        results[how] = grads
    def error(a, b):     # relative to the gradient of the whole trainable set
        total = sum(g.norm() ** 2 for g in a.values()).sqrt()
        per = {n: ((b[n] - g).norm() / total).item() for n, g in a.items()}
        worst = max(per, key=per.get)
        return {"same_keys": set(a) == set(b), "total_relative_error": (
            sum((b[n] - g).norm() ** 2 for n, g in a.items()).sqrt() / total).item(),
            "worst_param": worst, "worst_param_error": per[worst]}
    print(json.dumps({"check": "accumulation", "params": len(results[False]),
                      "compiled_vs_eager": error(results[False], results["blocks"]),
                      "cuda_graphs_vs_compiled": error(results["blocks"], results["blocks-cg"]),
                      "cuda_graphs_vs_eager": error(results[False], results["blocks-cg"]),
                      "layer_range_graphs_vs_compiled": error(results["blocks"], results["layers-cg"])}))


if __name__ == "__main__" and "--check-accumulation" in __import__("sys").argv:
    check_accumulation()
