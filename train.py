"""Echo-LoRA / LoRA / DoRA fine-tuning — one loop, top to bottom.

    python train.py                                   # built-in default: tiny model, synthetic task, CPU ~1 min
    torchrun --nproc_per_node 4 train.py --model DIR --data commonsense_170k.json --echo
    python train.py --model llama3-8b --data x.json   # preset = random weights (benchmarks)

One optimizer step = one global batch (default 16) = world_size × grad_accum micro-batches. On an
Echo step (router eq. 9 says r = 1) each micro-batch runs the Echo-off and the Echo-on pass inside
one forward of the DDP-wrapped `EchoStep` module (eqs. 2–12, see echo/). Losses are summed over
answer tokens and divided by the answer-token count of the whole global batch, so the objective is
a token mean over the global batch whatever the number of GPUs or micro-batches.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from echo import EchoConfig, EchoModule, echo_loss, make_router, save_echo
from model import load_model
from model.lora import ADAPTER_KEYS, save_adapter
from model.tokenizer import ByteTokenizer

IGNORE = -100
DEFAULT_RUN = "runs/default"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help="model directory (params.json, tokenizer, weights) or a preset name; "
                                    "omitted: the built-in default run")
    a("--data", nargs="+", default=None, help="LLM-Adapters JSON / JSONL files, mixed")
    a("--template", default=None, help="alpaca (default) | llm-adapters | alpaca-short")
    a("--out", default=None, help="run folder (default runs/<name>)")
    a("--method", default="lora", choices=["lora", "dora"])
    a("--rank", type=int, default=16)
    a("--alpha", type=float, default=32.0)
    a("--dropout", type=float, default=0.05)
    a("--modules", nargs="+", default=["wq", "wk", "wv", "wo"], help="adapted modules (wq..w3 or q_proj..)")
    a("--epochs", type=float, default=3)
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--lr", type=float, default=2e-4)
    a("--warmup-steps", type=int, default=100)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--global-batch", type=int, default=16)
    a("--micro-batch", type=int, default=4)
    a("--max-len", type=int, default=256)
    a("--seed", type=int, default=42)
    a("--dtype", default="bf16", choices=["bf16", "fp32"])
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on GPU)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
      help="with --compile on GPU: replay each compiled block as a CUDA graph (removes launch overhead)")
    a("--save-every", type=int, default=200)
    a("--log-every", type=int, default=10)
    a("--resume", action="store_true", help="continue from OUT/checkpoint")
    # Echo (eqs. 2–12) and the ablation switches of the paper's Tables 4/7
    a("--echo", action=argparse.BooleanOptionalAction, default=False, help="train with the Echo path")
    a("--echo-targets", nargs="+", type=int, default=[4, 5, 6, 7])
    a("--echo-modules", nargs="+", default=["wq", "wv"])
    a("--echo-sources", nargs="+", type=int, default=[-8, -7, -6, -5])
    a("--echo-bottleneck", type=int, default=64)
    a("--echo-gate-bias", type=float, default=-2.0)
    a("--echo-lambda-init", type=float, default=0.1)
    a("--echo-norm", default="layernorm", choices=["layernorm", "rms"])
    a("--echo-p-start", type=float, default=1.0)
    a("--echo-p-end", type=float, default=0.2)
    a("--echo-tau", type=float, default=2.0)
    a("--echo-lambda-kd", type=float, default=1.0)
    a("--echo-all-positions", action="store_true", help="ablation: inject on every position (no eq. 8 mask)")
    a("--echo-any-depth", action="store_true", help="ablation: allow sources not deeper than targets")
    a("--echo-separate-passes", action="store_true",
      help="run both passes from the embedding (default: share the layers below the first target)")
    opts = p.parse_args(argv)
    if opts.model is None:             # the built-in default run has its own defaults; given flags still win
        p.set_defaults(**DEFAULT_RUN_SETTINGS)
        opts = p.parse_args(argv)
    return opts


DEFAULT_RUN_SETTINGS = dict(            # `python train.py` (no --model): ~40 s on 2 CPU cores
    echo=True, modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"], rank=32, alpha=32.0, dropout=0.0,
    lr=3e-3, warmup_steps=10, epochs=3, micro_batch=16, echo_targets=[1], echo_sources=[2, 3])


def apply_default_run(opts):
    """`python train.py` with no model: a tiny random LLaMA learns the built-in synthetic task."""
    if opts.model is not None:
        return opts
    opts.model = "default-tiny"
    opts.out = opts.out or DEFAULT_RUN
    opts.template = opts.template or data.default_task.TEMPLATE
    opts.max_len = min(opts.max_len, data.default_task.MAX_LEN)
    return opts


# ------------------------------------------------------------------ distributed


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process."""
    if "RANK" not in os.environ:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, f"cuda:{local}"
    dist.init_process_group("gloo")
    return rank, world, "cpu"


# ------------------------------------------------------------------ the step


class EchoStep(nn.Module):
    """What DDP wraps: the adapted model plus (optionally) the Echo module. One forward computes the
    whole micro-batch loss — both passes on a routed step — so DDP sees one forward per backward."""

    def __init__(self, model, echo=None, separate_passes=False):
        super().__init__()
        self.model, self.echo, self.separate_passes = model, echo, separate_passes

    def forward(self, tokens, labels, index, targets, boundary, routed, normalizer):
        if self.echo is None:
            h = self.model.run_layers(self.model.embed(tokens), 0, self.model.args.n_layers,
                                      positions=self.model.positions_for(tokens))
            logits = self.model.head(h, logits_index=index)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum")
            return ce / normalizer, {"sum_off": ce.detach()}
        return echo_loss(self.model, self.echo, tokens, labels, routed=routed, normalizer=normalizer,
                         index=index, targets=targets, boundary=boundary,
                         share_lower_layers=not self.separate_passes)


def supervision(labels, bucket=16):
    """On CPU, before the step: the supervised logit positions {t : y[t+1] ≠ −100} of each row, padded
    to a multiple of `bucket` (a few shapes for torch.compile), their targets, and the answer
    boundary t* = first answer position − 1 (eq. 2). Doing this here keeps the GPU step sync-free."""
    B, T = labels.shape
    supervised = labels[:, 1:] != IGNORE
    counts = supervised.sum(1)
    if (counts == 0).any():
        raise ValueError("a training row has no answer token")
    if (labels[:, 0] != IGNORE).any():
        raise ValueError("a training row is supervised from position 0: no prompt, so no answer boundary t*")
    P = int(math.ceil(counts.max().item() / bucket) * bucket)
    index = torch.zeros(B, P, dtype=torch.long)
    targets = torch.full((B, P), IGNORE, dtype=torch.long)
    for b in range(B):
        pos = supervised[b].nonzero()[:, 0]
        index[b, :len(pos)] = pos
        targets[b, :len(pos)] = labels[b, pos + 1]
    boundary = supervised.int().argmax(1)              # first t with y[t+1] supervised = t*
    return index, targets, boundary


# ------------------------------------------------------------------ checkpoints


def trainable_state(model, echo):
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}
    if echo is not None:
        state.update({f"echo.{k}": v for k, v in echo.state_dict().items()})
    return state


def save_checkpoint(out, step_module, optimizer, scheduler, router, step, epoch, epoch_step, opts):
    """Everything --resume needs, written to a temporary file and renamed (atomic)."""
    model, echo = step_module.model, step_module.echo
    save_adapter(model, out / "adapter")
    if echo is not None:
        save_echo(echo, out)
    state = {"trainable": trainable_state(model, echo), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "router": router.state_dict() if router else None,
             "step": step, "epoch": epoch, "epoch_step": epoch_step,
             "opts": vars(opts)}
    (out / "checkpoint").mkdir(exist_ok=True)
    tmp = out / "checkpoint" / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "checkpoint" / "state.pt")


def load_checkpoint(out, step_module, optimizer, scheduler, router, rank=0):
    path = out / "checkpoint" / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    trainable = state["trainable"]
    step_module.model.load_state_dict({k: v for k, v in trainable.items() if not k.startswith("echo.")},
                                      strict=False)
    if step_module.echo is not None:
        step_module.echo.load_state_dict({k[5:]: v for k, v in trainable.items() if k.startswith("echo.")})
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if router is not None:
        router.load_state_dict(state["router"])
    rng = torch.load(out / "checkpoint" / f"rng_rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"], state["epoch"], state["epoch_step"]


def save_rng(out, rank):
    """Every rank's own RNG state (dropout draws differ per rank), so a resumed run repeats them."""
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoint" / f"rng_rank{rank}.pt.tmp"
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, tmp)
    os.replace(tmp, out / "checkpoint" / f"rng_rank{rank}.pt")


# ------------------------------------------------------------------ setup


def peak_flops(device):
    """Dense bf16 peak of the GPU (for MFU); None on CPU or unknown GPUs."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312), ("L40", 181), ("4090", 165)):
        if key in name:
            return tflops * 1e12
    return None


def build(opts, device):
    overrides = dict(adapter=opts.method, lora_rank=opts.rank, lora_alpha=opts.alpha,
                     lora_dropout=opts.dropout, lora_modules=tuple(opts.modules))
    dtype = torch.bfloat16 if opts.dtype == "bf16" and str(device).startswith("cuda") else torch.float32
    if opts.model == "default-tiny":
        tokenizer = ByteTokenizer()
        model, _ = load_model("tiny", device=device, dtype=dtype, vocab_size=tokenizer.vocab_size, **overrides)
        # The frozen random head bounds the logits: RMSNorm fixes |h| = sqrt(dim) and a row of W_out has
        # norm ~ std*sqrt(dim), so |logit| <= std*dim = 1.3 at std 0.02 (dim 64): the loss cannot go below
        # ~4 nats whatever the adapter learns. std 0.2 allows logits up to ~13.
        model.reset_parameters(std=0.2)
        model.init_dora_magnitudes()
    else:
        model, tokenizer = load_model(opts.model, device=device, dtype=dtype, **overrides)
        if tokenizer is None:          # a preset with random weights: a byte tokenizer is enough for benchmarks
            tokenizer = ByteTokenizer()
    return model, tokenizer


def main(argv=None):
    opts = apply_default_run(parse_args(argv))
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(opts.seed)                        # identical adapter init on every rank
    name = Path(opts.model).name if opts.model else "default"
    out = Path(opts.out or f"runs/{name}-{opts.method}{'-echo' if opts.echo else ''}")

    model, tokenizer = build(opts, device)
    out.mkdir(parents=True, exist_ok=True)      # only now: a bad --model leaves no empty run folder
    if opts.model == "default-tiny":
        if master:
            data.write_default_task(out / "data")
            save_base(model, tokenizer, out / "base")
        if world > 1:
            dist.barrier()
        opts.data = [str(out / "data" / "train.json")]
    if not opts.data:
        raise ValueError("--data: give at least one LLM-Adapters JSON/JSONL file")
    dataset = data.load_dataset(opts.data, tokenizer, template=opts.template or "alpaca", max_len=opts.max_len)

    echo = None
    if opts.echo:
        cfg = EchoConfig(target_layers=tuple(opts.echo_targets), target_modules=tuple(opts.echo_modules),
                         source_layers=tuple(opts.echo_sources), bottleneck=opts.echo_bottleneck,
                         gate_bias_init=opts.echo_gate_bias, lambda_init=opts.echo_lambda_init,
                         norm=opts.echo_norm, answer_only=not opts.echo_all_positions,
                         p_start=opts.echo_p_start, p_end=opts.echo_p_end, tau=opts.echo_tau,
                         lambda_kd=opts.echo_lambda_kd, allow_any_depth=opts.echo_any_depth, seed=opts.seed)
        echo = EchoModule(cfg, model.args).to(device)   # fp32, like the adapter weights

    step_module = EchoStep(model, echo, opts.echo_separate_passes)
    use_compile = str(device).startswith("cuda") if opts.compile is None else opts.compile
    cuda_graphs = use_compile and opts.cuda_graphs and str(device).startswith("cuda")
    if use_compile:     # regional compilation: one block graph serves every layer and both Echo passes
        compile_step(step_module, "blocks-cg" if cuda_graphs else "blocks")
    ddp = step_module
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[torch.device(device).index] if device != "cpu" else None,
            find_unused_parameters=echo is not None,    # Echo weights get no gradient on unrouted steps
            broadcast_buffers=False)

    accum = data.grad_accum_steps(opts.global_batch, opts.micro_batch, world)
    per_epoch = data.steps_per_epoch(dataset, opts.global_batch)
    if per_epoch == 0:
        raise ValueError(f"dataset has {len(dataset)} rows, fewer than one global batch of {opts.global_batch}")
    total = int(math.ceil(opts.epochs * per_epoch)) if opts.max_steps is None else opts.max_steps
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.999),
                                  fused=str(device).startswith("cuda"))
    warmup = max(1, min(opts.warmup_steps, total // 10 or 1))   # short runs: cap warmup at 10%
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min((k + 1) / warmup, max(0.0, (total - k) / max(1, total - warmup))))
    router = make_router(echo.cfg, total) if echo is not None else None

    step, epoch, epoch_step = 0, 0, 0
    if opts.resume:
        step, epoch, epoch_step = load_checkpoint(out, step_module, optimizer, scheduler, router, rank)
    if master:
        (out / "config.json").write_text(json.dumps({"opts": vars(opts), "model": model.args.to_params_json(),
                                                     "echo": asdict(echo.cfg) if echo else None,
                                                     "world_size": world, "grad_accum": accum,
                                                     "train_rows": len(dataset), "dropped_rows": dataset.n_dropped,
                                                     "total_steps": total}, indent=2))
        print(f"{len(dataset)} rows ({dataset.n_dropped} longer than {opts.max_len} tokens dropped), "
              f"{total} steps of {opts.global_batch} on {world} × {device}, grad_accum {accum}, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable, Echo {'on' if echo else 'off'}")
    metrics = None
    if master:         # a new run starts the log afresh; a resumed one keeps the steps up to its checkpoint
        path = out / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step] \
            if opts.resume and path.exists() else []
        metrics = open(path, "w")
        metrics.writelines(line + "\n" for line in kept)
    n_params = sum(p.numel() for p in model.parameters())
    flops_peak = peak_flops(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if opts.dtype == "bf16" and "cuda" in str(device) \
        else nullcontext()
    routing = []              # this run's r_k, compared across ranks at the end
    pending = None            # the previous step's device-side stats, read one step late (no sync per step)
    read_late = "cuda" in str(device)       # a CPU step is synchronous: read at once, so tok/s is per step
    t_start = time.perf_counter()
    window = {"since": t_start, "tokens": 0, "flops": 0.0}     # throughput over the current log window
    step_at_start = step

    def finish_step(record):
        """Read one step's losses (finished on the device by now), stop on a non-finite loss, log."""
        sums, n = record.pop("sums").tolist(), record["answer_tokens"]
        record["tokens"] = int(sums[3])
        record["loss_off"] = sums[0] / n
        record["loss_on"] = sums[1] / n if record["routed"] else None
        record["loss_kd"] = sums[2] / n if record["routed"] else None
        record["loss"] = record["loss_off"] + (record["loss_on"] + opts.echo_lambda_kd * record["loss_kd"]
                                               if record["routed"] else 0.0)           # eq. 11
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"non-finite loss {record['loss']} at step {record['step']}; "
                                     f"the last good checkpoint is in {out / 'checkpoint'}")
        if not master:
            return
        # Rates are averaged over the log window: steps are read one step late, so a single step's
        # wall time is not its own. MFU counts 4·N FLOPs per token and pass (forward 2N, activation
        # gradients 2N; the frozen weights get no weight gradient), two passes on a routed step.
        now = time.perf_counter()
        window["tokens"] += record["tokens"]
        window["flops"] += 4 * n_params * record["tokens"] * (2 if record["routed"] else 1)
        elapsed = max(now - window["since"], 1e-9)
        record["tokens_per_s"] = round(window["tokens"] / elapsed, 1)
        if flops_peak:
            record["mfu"] = round(window["flops"] / elapsed / (flops_peak * world), 4)   # per GPU
        if "cuda" in str(device):
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if record["step"] % opts.log_every == 0 or record["step"] in (1, total):
            eta = (now - t_start) / max(record["step"] - step_at_start, 1) * (total - record["step"])
            echo_part = (f" on {record['loss_on']:.4f} kd {record['loss_kd']:.4f}" if record["routed"] else "")
            print(f"step {record['step']}/{total} eta {eta / 60:.1f}m loss {record['loss']:.4f} "
                  f"off {record['loss_off']:.4f}{echo_part} p {record['p']:.2f} routed {int(record['routed'])} "
                  f"lr {record['lr']:.2e} tok/s {record['tokens_per_s']:.0f}"
                  + (f" mfu {record['mfu']:.1%}" if "mfu" in record else "")
                  + (f" mem {record['peak_gib']:.1f}G" if "peak_gib" in record else ""), flush=True)
            window.update(since=now, tokens=0, flops=0.0)

    while step < total:
        for epoch_step_now, micro_batches in data.batches(
                dataset, global_batch=opts.global_batch, micro_batch=opts.micro_batch, rank=rank,
                world_size=world, seed=opts.seed, epoch=epoch, start_step=epoch_step):
            if step >= total:
                break
            routed = router(step) if router is not None else False     # eq. 9, same draw on every rank
            routing.append(routed)
            answer_tokens = micro_batches[0]["global_n_targets"]       # over all micro-batches and ranks
            normalizer = torch.tensor(answer_tokens / world)            # DDP then averages over ranks
            sums = torch.zeros(4, device=device)             # Σ CE_off, Σ CE_on, τ²Σ KL, tokens (all ranks)
            for i, mb in enumerate(micro_batches):
                index, targets, boundary = supervision(mb["labels"])
                batch = [t.to(device, non_blocking=True) for t in (mb["input_ids"], mb["labels"], index,
                                                                    targets, boundary)]
                last = i == len(micro_batches) - 1
                with ddp.no_sync() if world > 1 and not last else nullcontext():
                    with autocast:
                        loss, stats = ddp(*batch, routed, normalizer)
                    loss.backward()
                if cuda_graphs:
                    keep_grads(params)
                sums[0] += stats["sum_off"]
                if routed:
                    sums[1] += stats["sum_on"]
                    sums[2] += stats["sum_kd"]
                sums[3] += int(mb["attention_mask"].sum())
            if world > 1:
                dist.all_reduce(sums)               # for the log only; queued, no host sync
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)   # None grads: Echo weights untouched on unrouted steps
            scheduler.step()
            step += 1
            epoch_step = epoch_step_now + 1
            record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                      "p": router.p(step - 1) if router else 0.0, "routed": routed, "sums": sums,
                      "answer_tokens": answer_tokens}
            if pending is not None:
                finish_step(pending)
            pending = record
            if step % opts.save_every == 0 or step == total or not read_late:
                finish_step(pending)         # never checkpoint a step whose loss was not checked
                pending = None
            if step % opts.save_every == 0 or step == total:
                save_rng(out, rank)
                if master:
                    save_checkpoint(out, step_module, optimizer, scheduler, router, step, epoch, epoch_step, opts)
                if world > 1:
                    dist.barrier()
        else:
            epoch, epoch_step = epoch + 1, 0
    if pending is not None:
        finish_step(pending)
    if world > 1 and router is not None:      # the router must agree on every rank: check it, once
        every_rank = [None] * world
        dist.all_gather_object(every_rank, routing)
        if any(r != routing for r in every_rank):
            raise RuntimeError("Echo routing differed between ranks")
        if master:
            print(f"routing identical on all {world} ranks: {sum(routing)} of {len(routing)} steps routed")
    if master:
        metrics.close()
        print(f"done: adapter in {out / 'adapter'}" + (f", Echo weights (analysis only) in {out}" if echo else ""))
    if world > 1:
        dist.barrier()                 # leave together: a rank tearing down gloo early can abort its peer
        dist.destroy_process_group()
    return out


def save_base(model, tokenizer, out_dir):
    """The default run's random base model, so eval.py can rebuild exactly the model that was trained."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    save_file(base, str(out_dir / "model.safetensors"))
    (out_dir / "params.json").write_text(json.dumps(model.args.to_params_json(), indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}))


def keep_grads(params):
    """A CUDA graph writes its outputs, gradients included, into memory that its next replay reuses:
    move accumulated gradients out of that pool before the next micro-batch runs."""
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.clone()


def compile_step(step_module, how):
    """how: "blocks" compiles each transformer block (one graph serves all layers and both Echo
    passes; fast to compile); "layers" compiles run_layers (one graph per layer range);
    "step" compiles the whole micro-step. "-cg" adds CUDA graphs."""
    mode = "reduce-overhead" if how.endswith("-cg") else None
    if how.startswith("blocks"):
        for block in step_module.model.layers:
            block.compile(mode=mode)
        if step_module.echo is not None:      # eqs. 3–6: dozens of tiny kernels, one graph
            step_module.echo.compile(mode=mode)
        return step_module
    if how.startswith("layers"):
        step_module.model.run_layers = torch.compile(step_module.model.run_layers, mode=mode)
        return step_module
    return torch.compile(step_module, mode=mode)


def make_benchmark_step(model, echo_mode, compiled, batch, seq, answer):
    """For tests/benchmark.py: a closure running one optimizer step of this file's training step on
    random tokens (answers on the last `answer` positions). echo_mode: off | routed | unrouted.
    compiled: False or a compile_step() mode."""
    device = model.tok_embeddings.weight.device
    echo = None
    if echo_mode != "off":
        echo = EchoModule(EchoConfig(), model.args).to(device)
    step_module = EchoStep(model, echo)
    params = [p for p in step_module.parameters() if p.requires_grad]
    runner = compile_step(step_module, compiled) if compiled else step_module
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens = torch.randint(0, model.args.vocab_size, (batch, seq))
    labels = torch.full_like(tokens, IGNORE)
    labels[:, -answer:] = tokens[:, -answer:]
    index, targets, boundary = supervision(labels)
    args = [t.to(device) for t in (tokens, labels, index, targets, boundary)]
    normalizer = (targets != IGNORE).sum().float()      # 0-d CPU tensor: no recompile when it changes

    def run():
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = runner(*args, echo_mode == "routed", normalizer)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:
        sys.exit(f"error: {e}")
