"""GPU benchmark (not a test): ms per optimizer step, tokens/s, MFU and peak memory of train.py's own step.

    python tests/benchmark.py --model llama3-8b --method lora dora --echo off routed unrouted
    python tests/benchmark.py --model runs/smollm2 --batch 16 --seq 256 --graphs step blocks off

--model is a preset or any model folder (params.json; weights are not read: random weights, bf16).
Each configuration builds the model afresh, runs train.train_step (the function train.py calls)
on a fixed [batch, seq] batch with answers on the last --answer positions of each row, with the
router forced on (routed: both passes) or off (unrouted), and times --steps steps after --warmup.
--graphs: step (whole step as one CUDA graph, train.py's default on one GPU) | blocks (each compiled
block a CUDA graph, the DDP path) | off (compiled, no graphs) | eager (not compiled).
--base-format: plain (bf16 frozen linears) | nf4 (QLoRA's 4-bit base: the same random weights drawn in bf16
and quantised on the GPU, as train.py --base-format nf4 stores them); give both to compare them in one run.
"""
import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # run from anywhere: `python tests/benchmark.py`

import torch  # noqa: E402

import train  # noqa: E402
from data import IGNORE_INDEX  # noqa: E402
from echo import EchoConfig, EchoModule, supervision  # noqa: E402
from model import ModelArgs  # noqa: E402
from model.load import CliParser, HelpFormatter, build_model, dir_model_args  # noqa: E402
from training.log import step_flops  # noqa: E402


def model_args(name, method, dropout, base_format="plain"):
    kw = dict(adapter=method, lora_dropout=dropout, base_format=base_format)
    if (Path(name) / "params.json").exists():
        return dir_model_args(name, **kw)
    return ModelArgs.from_name(name, **kw)


def make_run(opts, method, echo_on, graphs, base_format):
    """A train.Run around a random-weight model, built with train.py's own pieces."""
    argv = ["--model", opts.model, "--method", method, "--micro-batch", str(opts.batch),
            "--global-batch", str(opts.batch), "--dropout", str(opts.dropout), "--base-format", base_format]
    if opts.activation_checkpointing:
        argv.append("--activation-checkpointing")
    topts = train.parse_args(argv)
    args = model_args(opts.model, method, opts.dropout, base_format)
    args.activation_checkpointing = opts.activation_checkpointing
    model = build_model(args, "cuda", torch.bfloat16)     # an NF4 base is built as 4-bit buffers only
    if base_format == "nf4":
        model.reset_parameters()     # the NF4 buffers start at zero: random bf16 weights, quantised one at a time
    model.init_dora_magnitudes()
    echo = EchoModule(EchoConfig(), model.args).to("cuda") if echo_on else None
    step_module = train.EchoStep(model, echo)
    params, echo_params, optimizers = train.make_trainer(step_module, topts, "cuda", graphs != "eager", graphs)
    run = train.Run(topts, None, 0, 1, "cuda", model, echo, step_module, step_module, params, echo_params,
                    optimizers, None, None, None, None, 1, 1, graphs == "blocks")
    run.graphs = train.StepGraphs(run, train.step_once) if graphs == "step" else None
    return run


def batch(opts, vocab):
    tokens = torch.randint(0, vocab, (opts.batch, opts.seq))
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[:, -opts.answer:] = tokens[:, -opts.answer:]
    return [{"input_ids": tokens, "labels": labels, "attention_mask": torch.ones_like(tokens, dtype=torch.bool),
             "supervised": supervision(labels, bucket=train.P_BUCKET),
             "global_n_targets": int((labels[:, 1:] != IGNORE_INDEX).sum())}]


def measure(opts, method, echo_mode, graphs, base_format="plain"):
    gc.collect()                          # the previous configuration's model and graphs are gone before
    torch.cuda.empty_cache()              # this one's memory is measured
    torch.cuda.reset_peak_memory_stats()  # once, before the model is built: the peaks cover the whole run
    torch._dynamo.reset()
    run = make_run(opts, method, echo_mode != "off", graphs, base_format)
    mbs, routed = batch(opts, run.model.args.vocab_size), echo_mode == "routed"
    t0 = time.perf_counter()
    for _ in range(opts.warmup):
        train.train_step(run, mbs, routed, 0)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(opts.steps):
        stats = train.train_step(run, mbs, routed, 0)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / opts.steps * 1000
    if opts.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                train.train_step(run, mbs, routed, 0)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    tokens = opts.batch * opts.seq
    import model.nf4
    return {"model": opts.model, "method": method, "base_format": base_format, "echo": echo_mode, "graphs": graphs,
            "nf4_dequant": ("eager" if model.nf4.EAGER else "fused") if base_format == "nf4" else None,
            "activation_checkpointing": opts.activation_checkpointing, "batch": opts.batch,
            "seq": opts.seq, "ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1000),
            "mfu": round(step_flops(run.model, run.echo, routed, train.batch_shape(mbs, routed)[1:])
                         / (ms / 1000) / (opts.peak_tflops * 1e12), 3),
            **peak_memory(), "warmup_s": round(warmup_s, 1),
            "loss_off": round(stats[0].item() / mbs[0]["global_n_targets"], 4),
            "device": torch.cuda.get_device_name()}


def peak_memory():
    """The GPU memory this configuration needed, from model build to its last step (warm-up, compilation and
    CUDA-graph capture included). peak_gib: the most the caching allocator held (max_memory_reserved), the
    private pool the CUDA graphs replay in included; what a user must have free, less the CUDA context (a few
    hundred MiB, outside PyTorch's allocator). peak_allocated_gib: the most live tensors held; after the
    capture, graph replays reuse the pool without allocating, so this alone under-reports the need."""
    return {"peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main():
    ap = CliParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help="preset name or model folder (params.json)")
    ap.add_argument("--method", nargs="+", default=["lora"], choices=["lora", "dora"],
                    help="adapter method(s); one configuration per value")
    ap.add_argument("--echo", nargs="+", default=["off", "routed"], choices=["off", "routed", "unrouted"],
                    help="no Echo module, Echo with the router forced on (both passes) or off")
    ap.add_argument("--graphs", nargs="+", default=["step"], choices=["step", "blocks", "off", "eager"],
                    help="CUDA graphs of the whole step, of each block, none (compiled), or eager")
    ap.add_argument("--base-format", nargs="+", default=["plain"], choices=["plain", "nf4"],
                    help="frozen linears in bf16 (plain) or QLoRA's NF4; one configuration per value")
    ap.add_argument("--batch", type=int, default=2, help="rows per step")
    ap.add_argument("--seq", type=int, nargs="+", default=[256], help="one configuration per length")
    ap.add_argument("--answer", type=int, default=32, help="supervised (answer) positions at the end of each row")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, graph capture)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block in the backward (as train.py's flag; needs --graphs off or eager)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 steps")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM dense bf16")
    ap.add_argument("--json", default=None, help="append one JSON line per configuration here")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: the benchmark needs a CUDA GPU")
    for seq in opts.seq:
        for graphs, base_format, method, echo in itertools.product(opts.graphs, opts.base_format, opts.method,
                                                                   opts.echo):
            r = measure(argparse.Namespace(**{**vars(opts), "seq": seq}), method, echo, graphs, base_format)
            print(json.dumps(r), flush=True)
            if opts.json:
                with open(opts.json, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
