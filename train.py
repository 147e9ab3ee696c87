"""Echo-LoRA / LoRA / DoRA fine-tuning — one loop, top to bottom.

    python train.py                                   # built-in default: tiny model, synthetic task, CPU ~1 min
    torchrun --nproc_per_node 4 train.py --model DIR --data commonsense_170k.json --echo
    python train.py --model llama3-8b --data x.json   # preset = random weights (benchmarks)

Read it in order: options → setup (processes, run folder, model, data) → the step → validation →
checkpoints → log → main, which is the loop.

One optimizer step = one global batch (default 16) = world_size × grad_accum micro-batches. On an
Echo step (router eq. 9 says r = 1) each micro-batch runs the Echo-off and the Echo-on pass inside
one forward of the DDP-wrapped `EchoStep` module (eqs. 2-12: echo.echo_loss). Losses are summed over
answer tokens and divided by the answer-token count of the whole global batch, so the objective is
a token mean over the global batch whatever the number of GPUs or micro-batches.

A run folder holds config.json, metrics.jsonl (one line per step), adapter/ (the deployable
adapter), echo.safetensors + echo_config.json (analysis only), checkpoint/state.pt (one file: every
tensor and RNG state --resume needs, replaced atomically) and, when the run finished, summary.json.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import data
from echo import (EchoConfig, EchoModule, Router, echo_loss, echo_objective, save_echo, supervision,
                  uses_answer_window)
from model import load_model
from model.lora import ADAPTER_KEYS, save_adapter
from model.tokenizer import ByteTokenizer

IGNORE = -100
DEFAULT_RUN = "runs/default"
P_BUCKET = 16                # supervised positions per row are padded to a multiple of this (few shapes)


# ------------------------------------------------------------------ options


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    def a(*flags, **kw):             # every flag gets a help line, so --help shows its default
        return p.add_argument(*flags, **{"help": "-", **kw})
    a("--model", default=None, help="model directory (params.json, tokenizer, weights) or a preset name; "
                                    "omitted: the built-in default run")
    a("--data", nargs="+", default=None, help="LLM-Adapters JSON / JSONL files, mixed")
    a("--template", default=None, help="alpaca | llm-adapters | alpaca-short (None: alpaca)")
    a("--out", default=None, help="run folder (None: runs/<model>-<method>[-echo])")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--force", action="store_true", help="replace the run (or other files) already in --out")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    a("--method", default="lora", choices=["lora", "dora"])
    a("--rank", type=int, default=16)
    a("--alpha", type=float, default=32.0)
    a("--dropout", type=float, default=0.05)
    a("--modules", nargs="+", default=["wq", "wk", "wv", "wo"], help="adapted modules (wq..w3 or q_proj..)")
    a("--epochs", type=float, default=3)
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (None: --epochs)")
    a("--lr", type=float, default=2e-4)
    a("--warmup-steps", type=int, default=100, help="linear warm-up, capped at 10%% of the steps")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--global-batch", type=int, default=16, help="rows per optimizer step, over all processes")
    a("--micro-batch", type=int, default=None,
      help="rows per forward (None: 4 on CPU; on GPU the largest that fits, up to the global batch)")
    a("--max-len", type=int, default=256, help="rows longer than this (tokens) are dropped")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
      help="batch rows of similar length together (less padding; see data.length_grouped_order)")
    a("--seed", type=int, default=42)
    a("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype of the frozen base on GPU")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (None: on GPU)")
    a("--cuda-graphs", default="auto", choices=["auto", "step", "blocks", "off"],
      help="with --compile on GPU: 'step' captures the whole optimizer step as one CUDA graph per batch "
           "shape (one GPU); 'blocks' replays each compiled block as a graph (works with DDP); auto: step "
           "on one GPU, blocks on several")
    a("--val-split", type=float, default=0.0, help="hold out this fraction of the --data rows for validation")
    a("--val-data", nargs="+", default=None, help="validation files (instead of --val-split)")
    a("--val-rows", type=int, default=1000, help="validate on at most this many held-out rows")
    a("--eval-every", type=int, default=0, help="validate every N steps (0: only at the end)")
    a("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    a("--log-every", type=int, default=10)
    a("--echo", action=argparse.BooleanOptionalAction, default=False, help="train with the Echo path")
    EchoConfig.add_flags(p)                              # --echo-*: declared once, in EchoConfig
    opts = p.parse_args(argv)
    if opts.model is None:             # the built-in default run has its own defaults; given flags still win
        if opts.data:
            p.error("--data needs --model (the built-in default run, without --model, trains on its own task)")
        p.set_defaults(**DEFAULT_RUN_SETTINGS)
        opts = p.parse_args(argv)
    return opts


DEFAULT_RUN_SETTINGS = dict(            # `python train.py` (no --model): ~1-2 min on 2 CPU cores
    echo=True, modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"], rank=32, alpha=32.0, dropout=0.0,
    lr=3e-3, warmup_steps=10, epochs=3, micro_batch=16, echo_target_layers=[1], echo_source_layers=[2, 3])


def apply_default_run(opts):
    """`python train.py` with no model: a tiny random LLaMA learns the built-in synthetic task."""
    if opts.model is not None:
        return opts
    opts.model = "default-tiny"
    opts.out = opts.out or DEFAULT_RUN
    opts.template = opts.template or data.default_task.TEMPLATE
    opts.max_len = min(opts.max_len, data.default_task.MAX_LEN)
    return opts


def check_options(opts):
    """Flags that cannot work, caught before anything is built; each error names its flag."""
    def need(ok, flag, what):
        if not ok:
            raise ValueError(f"{flag} {what}")
    for flag, v in (("--global-batch", opts.global_batch), ("--rank", opts.rank), ("--max-len", opts.max_len),
                    ("--save-every", opts.save_every), ("--log-every", opts.log_every),
                    ("--val-rows", opts.val_rows)):
        need(v >= 1, flag, f"must be >= 1, got {v}")
    need(opts.micro_batch is None or opts.micro_batch >= 1, "--micro-batch", f"must be >= 1, got {opts.micro_batch}")
    need(opts.max_steps is None or opts.max_steps >= 1, "--max-steps", f"must be >= 1, got {opts.max_steps}")
    need(opts.epochs > 0, "--epochs", f"must be > 0, got {opts.epochs}")
    need(opts.lr > 0, "--lr", f"must be > 0 (with {opts.lr} nothing would train), got {opts.lr}")
    need(0 <= opts.dropout < 1, "--dropout", f"must be in [0, 1), got {opts.dropout}")
    need(opts.warmup_steps >= 0 and opts.eval_every >= 0 and opts.grad_clip >= 0 and opts.weight_decay >= 0,
         "--warmup-steps / --eval-every / --grad-clip / --weight-decay", "must be >= 0")
    need(0 <= opts.val_split < 1, "--val-split", f"must be in [0, 1), got {opts.val_split}")
    need(not (opts.val_split and opts.val_data), "--val-split", "and --val-data exclude each other")
    need(not (opts.resume and opts.force), "--resume", "and --force exclude each other")


# ------------------------------------------------------------------ setup


def setup_distributed(opts):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process.
    --device cpu uses gloo even on a GPU machine (multi-process tests, or CPU-only runs)."""
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, "cuda" if cuda else "cpu"
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
        if per_node > gpus:
            raise ValueError(f"{per_node} processes on this node but {gpus} GPU(s) visible: "
                             f"use torchrun --nproc_per_node {gpus}, or --device cpu")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, f"cuda:{local}"
    dist.init_process_group("gloo")
    return rank, world, "cpu"


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint", "adapter", "echo.safetensors",
             "echo_config.json", "base", "data")
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoint")      # what only a run folder has


def check_run_dir(opts, out):
    """Never overwrite work: an --out that holds anything needs --resume (to continue) or --force."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    if opts.resume:
        if not (out / "checkpoint" / "state.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {out / 'checkpoint' / 'state.pt'}")
    elif out.exists() and any(out.iterdir()) and not opts.force:
        what = "an earlier run" if any((out / f).exists() for f in RUN_MARKERS) else "files"
        raise ValueError(f"--out {out} already holds {what}: --resume continues it, --force replaces it, "
                         f"or choose another --out")


def make_run_dir(opts, out, master, world):
    """Create (or, with --force, clear) the run folder; recover from a crash between two renames."""
    if master:
        if opts.force and out.exists():
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {out} is not writable ({e.strerror}): choose another --out") from None
        if (out / "adapter.old").exists() and not (out / "adapter").exists():
            os.replace(out / "adapter.old", out / "adapter")      # atomic_dir's rename pair was cut short
        for stale in [*out.glob("*.tmp"), out / "adapter.old", *(out / "checkpoint").glob("*.tmp")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()


def build_model(opts, device):
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
    if opts.max_len > model.args.max_seq_len:
        raise ValueError(f"--max-len {opts.max_len} exceeds the model's context of {model.args.max_seq_len} tokens")
    return model, tokenizer


def load_data(opts, tokenizer, out, master, world, base_model=None):
    """The training rows and the validation rows (--val-split: held out of --data, seeded)."""
    if opts.model == "default-tiny":
        if master:
            data.write_default_task(out / "data")
            save_base(base_model, tokenizer, out / "base")
        if world > 1:
            dist.barrier()
        opts.data = [str(out / "data" / "train.json")]
    if not opts.data:
        raise ValueError("--data: give at least one LLM-Adapters JSON/JSONL file")
    template = opts.template or "alpaca"
    rows = data.load_examples(opts.data)
    val_rows = data.load_examples(opts.val_data) if opts.val_data else []
    if opts.val_split:
        rows, val_rows = data.split_holdout(rows, opts.val_split, opts.seed)
    train_set = data.TokenizedDataset(rows, tokenizer, template, opts.max_len)
    dropped = train_set.n_dropped / len(rows)
    if master and dropped > 0.02:
        print(f"warning: {train_set.n_dropped} of {len(rows)} training rows ({dropped:.0%}) are longer than "
              f"--max-len {opts.max_len} tokens and are dropped", file=sys.stderr)
    val_set = data.TokenizedDataset(val_rows[:opts.val_rows], tokenizer, template, opts.max_len) if val_rows else None
    return train_set, val_set


@dataclass
class Run:
    """What the loop works with, built once by `setup`."""
    opts: argparse.Namespace
    out: Path
    rank: int
    world: int
    device: str
    model: nn.Module
    echo: nn.Module
    step_module: nn.Module        # EchoStep: model + Echo module, one forward per micro-batch
    ddp: nn.Module                # step_module, DDP-wrapped when world > 1
    params: list                  # adapter parameters, then the Echo module's
    echo_params: list
    optimizers: dict              # "adapter", and "echo" (stepped on routed steps only)
    graphs: object                # StepGraphs (--cuda-graphs step) or None
    router: Router
    train_set: object
    val_set: object
    total_steps: int
    grad_accum: int
    block_graphs: bool            # --cuda-graphs blocks: gradients must leave the graph pool
    saved_step: int = None        # the step of the checkpoint on disk (None: none written yet)
    writer: object = None         # CheckpointWriter: the checkpoint being written while training goes on
    pending_step: int = None      # ranks > 0: the step rank 0 may still be writing

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return str(self.device).startswith("cuda")


def setup(opts):
    """Processes, run folder, model, Echo module, data, optimizer, schedule, router."""
    check_options(opts)
    rank, world, device = setup_distributed(opts)
    master = rank == 0
    torch.manual_seed(opts.seed)                        # identical adapter init on every rank
    name = Path(opts.model).name if opts.model else "default"
    out = Path(opts.out or f"runs/{name}-{opts.method}{'-echo' if opts.echo else ''}")
    check_run_dir(opts, out)

    model, tokenizer = build_model(opts, device)
    make_run_dir(opts, out, master, world)      # only now: a bad --model leaves no empty run folder
    train_set, val_set = load_data(opts, tokenizer, out, master, world, base_model=model)
    echo = None
    if opts.echo:
        echo = EchoModule(EchoConfig.from_flags(opts, seed=opts.seed), model.args).to(device)   # fp32
    step_module = EchoStep(model, echo)
    if opts.micro_batch is None:
        opts.micro_batch = pick_micro_batch(step_module, opts, world, device)
    cuda = str(device).startswith("cuda")
    use_compile = cuda if opts.compile is None else opts.compile
    graphs = opts.cuda_graphs if opts.cuda_graphs != "auto" else ("step" if world == 1 else "blocks")
    if not (use_compile and cuda):
        graphs = "off"
    if graphs == "step" and world > 1:
        raise ValueError("--cuda-graphs step captures a single-GPU step: use --cuda-graphs blocks with torchrun")
    params, echo_params, optimizers = make_trainer(step_module, opts, device, use_compile, graphs)
    ddp = step_module
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[torch.device(device).index] if device != "cpu" else None,
            find_unused_parameters=echo is not None,    # Echo weights get no gradient on unrouted steps
            broadcast_buffers=False)

    accum = data.grad_accum_steps(opts.global_batch, opts.micro_batch, world)
    per_epoch = data.steps_per_epoch(train_set, opts.global_batch)
    if per_epoch == 0:
        raise ValueError(f"dataset has {len(train_set)} rows, fewer than one global batch of {opts.global_batch}")
    total = int(math.ceil(opts.epochs * per_epoch)) if opts.max_steps is None else opts.max_steps
    router = Router(echo.cfg, total) if echo is not None else None
    run = Run(opts, out, rank, world, device, model, echo, step_module, ddp, params, echo_params, optimizers,
              None, router, train_set, val_set, total, accum, graphs == "blocks")
    run.graphs = StepGraphs(run) if graphs == "step" else None
    run.writer = CheckpointWriter()
    return run


def make_trainer(step_module, opts, device, use_compile, graphs):
    """Compile the step module (per --compile / --cuda-graphs) and build what trains it: the adapter's
    parameters, the Echo module's, and one AdamW for each (Echo's is stepped on routed steps only: it
    gets no gradient otherwise). tests/benchmark.py builds its step with this too."""
    if use_compile:
        compile_blocks(step_module, cuda_graphs=graphs == "blocks")
    params = [p for p in step_module.model.parameters() if p.requires_grad]
    echo_params = list(step_module.echo.parameters()) if step_module.echo is not None else []
    optimizers = {"adapter": make_optimizer(params, opts, device, graphs == "step")}
    if echo_params:
        optimizers["echo"] = make_optimizer(echo_params, opts, device, graphs == "step")
    return params, echo_params, optimizers


def make_optimizer(params, opts, device, graphed):
    """AdamW; on GPU the fused kernel. A captured step needs its state and learning rate on the GPU
    (capturable, lr a tensor updated in place), so the graph reads the current values at replay."""
    if graphed:
        return torch.optim.AdamW(params, lr=torch.tensor(opts.lr, device=device), weight_decay=opts.weight_decay,
                                 fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=str(device).startswith("cuda"))


def learning_rate(run, step):
    """Linear warm-up (capped at 10% of the steps) then linear decay to 0; step counts from 0."""
    total, opts = run.total_steps, run.opts
    warmup = max(1, min(opts.warmup_steps, total // 10 or 1))
    return opts.lr * min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))


def set_learning_rate(run, lr):
    for opt in run.optimizers.values():
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)        # in place: a captured step reads this tensor
            else:
                group["lr"] = lr


# ------------------------------------------------------------------ the step


class EchoStep(nn.Module):
    """What DDP wraps: the adapted model plus (optionally) the Echo module. One forward computes the
    whole micro-batch loss — both passes on a routed step — so DDP sees one forward per backward."""

    def __init__(self, model, echo=None):
        super().__init__()
        self.model, self.echo = model, echo

    def forward(self, tokens, labels, index, targets, boundary, routed, normalizer):
        return echo_loss(self.model, self.echo, tokens, labels, routed=routed, normalizer=normalizer,
                         supervised=(index, targets, boundary))


STATS = ("sum_off", "sum_on", "sum_kd", "tokens", "padded_tokens", "stop")   # one step's device-side stats


class StatsOnHost:
    """One step's STATS, copied into pinned host memory right behind that step on its stream, so reading
    them a step later waits for that step only. (`.tolist()` on the device tensor a step later would queue
    its copy behind the step enqueued since, so the loop would wait for that one too, and the GPU would
    idle while the host prepared the next batch: every step.)"""

    def __init__(self, stats):
        self.values, self.ready = stats, None
        if stats.is_cuda:
            self.values = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.values.copy_(stats, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def tolist(self):
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


def micro_batches(run, epoch, start_step):
    """This rank's micro-batches, step by step, with the supervision (answer positions, their targets,
    t*) computed here on the host, so the step itself never waits for the device."""
    for step, mbs in data.batches(run.train_set, global_batch=run.opts.global_batch,
                                  micro_batch=run.opts.micro_batch, rank=run.rank, world_size=run.world,
                                  seed=run.opts.seed, epoch=epoch, start_step=start_step,
                                  group_by_length=run.opts.group_by_length):
        for mb in mbs:
            mb["supervised"] = supervision(mb["labels"], bucket=P_BUCKET)
        yield step, mbs


def train_step(run, mbs, routed, stop):
    """One optimizer step over this rank's micro-batches. Returns the step's STATS as a device tensor,
    summed over ranks but not read here (reading it would wait for the GPU; the log reads it one step
    late, from the host copy StatsOnHost queues behind the step). With --cuda-graphs step it is valid
    until the next step of the same shape."""
    host = torch.tensor([0.0, 0.0, 0.0, sum(int(mb["attention_mask"].sum()) for mb in mbs),
                         sum(mb["input_ids"].numel() for mb in mbs), stop,
                         mbs[0]["global_n_targets"] / run.world])      # + the normalizer (DDP averages ranks)
    inputs = [[mb["input_ids"], mb["labels"], *mb["supervised"]] for mb in mbs]
    if run.cuda:
        inputs, host = [[t.pin_memory() for t in batch] for batch in inputs], host.pin_memory()
    if run.graphs is not None:
        return run.graphs.step(run, inputs, routed, host)
    to = lambda t: t.to(run.device, non_blocking=True)
    return step_once(run, [[to(t) for t in batch] for batch in inputs], routed, to(host))


def step_once(run, inputs, routed, host):
    """The training step: forward + backward of each micro-batch (both passes when routed), gradient
    clipping, AdamW. `inputs`: per micro-batch (tokens, labels, index, targets, boundary) on the
    device; `host`: STATS' host-side entries and the normalizer. Run as it is, or captured once per
    batch shape by StepGraphs and replayed."""
    params = run.params + (run.echo_params if routed else [])
    static = run.graphs is not None                  # gradients live in fixed tensors, zeroed here
    if static:
        torch._foreach_zero_([p.grad for p in params])
    stats, normalizer = host[:len(STATS)].clone(), host[len(STATS)]
    for i, batch in enumerate(inputs):
        last = i == len(inputs) - 1
        with run.ddp.no_sync() if run.world > 1 and not last else nullcontext():
            with autocast(run):
                loss, sums = run.ddp(*batch, routed, normalizer)
            loss.backward()
        if run.block_graphs and not last:
            keep_grads(params)
        stats[:3] += sums
    if run.world > 1:
        dist.all_reduce(stats)             # queued, no host sync; every rank sees the same numbers
    if run.opts.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, run.opts.grad_clip)
    run.optimizers["adapter"].step()
    if routed and "echo" in run.optimizers:
        run.optimizers["echo"].step()
    if not static:
        for opt in run.optimizers.values():
            opt.zero_grad(set_to_none=True)
    return stats


class StepGraphs:
    """--cuda-graphs step: the whole optimizer step (step_once) as one CUDA graph per batch shape.

    A small model's step is thousands of tiny kernels, and launching them costs the CPU more time
    than the GPU needs to run them; replaying a captured graph launches them all at once. The first
    batch of each shape runs uncaptured (a real training step, which also compiles the blocks); then
    the step is captured — capture records kernels and runs nothing — and later batches of that shape
    are copied into the graph's input buffers and replayed. Gradients and optimizer state live in
    fixed tensors outside the graphs; everything else a graph allocates is dead when it ends, so all
    graphs share one memory pool (they never run at the same time)."""

    def __init__(self, run):
        self.graphs, self.pool = {}, torch.cuda.graph_pool_handle()
        for p in run.params + run.echo_params:
            p.grad = torch.zeros_like(p)

    def step(self, run, inputs, routed, host):
        key = (routed, *(tuple(t.shape) for batch in inputs for t in batch))
        if key not in self.graphs:
            device_inputs = [[t.to(run.device) for t in batch] for batch in inputs]
            stats = step_once(run, device_inputs, routed, host.to(run.device))
            self.graphs[key] = self.capture(run, device_inputs, routed, host.to(run.device))
            return stats
        graph, static_inputs, static_host, stats = self.graphs[key]
        for static_batch, batch in zip(static_inputs, inputs):
            for static_t, t in zip(static_batch, batch):
                static_t.copy_(t, non_blocking=True)
        static_host.copy_(host, non_blocking=True)
        graph.replay()
        return stats           # overwritten by this graph's next replay: Log copies it right behind this one

    def capture(self, run, inputs, routed, host):
        if run.writer is not None:
            run.writer.wait()              # no other thread at work while the stream captures (a rare wait)
        torch.cuda.synchronize(run.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            stats = step_once(run, inputs, routed, host)
        return graph, inputs, host, stats


def autocast(run):
    bf16 = run.opts.dtype == "bf16" and run.cuda
    return torch.autocast("cuda", torch.bfloat16) if bf16 else nullcontext()


def keep_grads(params):
    """A CUDA graph writes its outputs, gradients included, into memory that its next replay reuses:
    move gradients accumulated so far out of that pool before the next micro-batch runs (not needed
    after the last one: the optimizer consumes them before any replay)."""
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.clone()


def compile_blocks(step_module, cuda_graphs):
    """Regional compilation: each transformer block is compiled (one graph serves every layer and both
    Echo passes; fast to compile), and so is the Echo module (eqs. 2-8: dozens of tiny kernels, one
    graph). cuda_graphs replays them as CUDA graphs, which removes the CPU's kernel-launch overhead."""
    mode = "reduce-overhead" if cuda_graphs else None
    for block in step_module.model.layers:
        block.compile(mode=mode)
    if step_module.echo is not None:
        step_module.echo.compile(mode=mode)
    return step_module


def pick_micro_batch(step_module, opts, world, device):
    """Rows per forward when --micro-batch is not given: 4 on CPU; on GPU the largest divisor of the
    per-process batch whose routed (both passes) step at --max-len fits in memory, probed at the worst
    case: every position after the first supervised, so the Echo-on window spans the whole row."""
    per_rank = opts.global_batch // world
    if not str(device).startswith("cuda") or per_rank < 1:
        return min(4, max(per_rank, 1))
    model = step_module.model
    for mb in [d for d in range(per_rank, 0, -1) if per_rank % d == 0]:
        try:
            tokens = torch.randint(0, model.args.vocab_size, (mb, opts.max_len))
            labels = torch.full_like(tokens, IGNORE)
            labels[:, 1:] = tokens[:, 1:]
            batch = [t.to(device) for t in (tokens, labels, *supervision(labels, P_BUCKET))]
            with torch.autocast("cuda", torch.bfloat16, enabled=opts.dtype == "bf16"):
                loss, _ = step_module(*batch, step_module.echo is not None, torch.tensor(1.0))
            loss.backward()
            step_module.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            del loss, batch
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)    # the eager probe's peak is not the run's
            print(f"micro-batch {mb}: the largest that fits at --max-len {opts.max_len} "
                  f"(of {per_rank} rows per process; --micro-batch overrides)", flush=True)
            return mb
        except torch.OutOfMemoryError:
            step_module.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    raise ValueError(f"not even a micro-batch of 1 row of {opts.max_len} tokens fits in GPU memory: lower --max-len")


# ------------------------------------------------------------------ validation


@torch.no_grad()
def validate(run):
    """Validation loss (token mean over answer tokens) and exact-match accuracy — the share of rows
    whose every answer token is the argmax under teacher forcing, i.e. whose answer greedy decoding
    would reproduce — on the held-out rows, Echo off (the deployable model), dropout off."""
    model, val = run.model, run.val_set
    model.eval()
    sums = torch.zeros(4, device=run.device)             # Σ CE, answer tokens, exact rows, rows
    size = run.opts.micro_batch
    for start in range(run.rank * size, len(val), run.world * size):
        rows = [val[i] for i in range(start, min(start + size, len(val)))]
        mb = data.collate(rows, val.pad_id, 32, val.max_len)
        index, targets, _ = (t.to(run.device) for t in supervision(mb["labels"], P_BUCKET))
        tokens = mb["input_ids"].to(run.device)
        with autocast(run):
            h = model.run_layers(model.embed(tokens), 0, model.args.n_layers, positions=model.positions_for(tokens))
            logits = model.head(h, logits_index=index).float()
        valid = targets != IGNORE
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        exact = ((logits.argmax(-1) == targets) | ~valid).all(dim=1)
        sums += torch.stack([ce, valid.sum(), exact.sum(), torch.tensor(len(rows), device=run.device)]).float()
    if run.world > 1:
        dist.all_reduce(sums)
    model.train()
    ce, n, exact, rows = sums.tolist()
    return {"val_loss": ce / max(n, 1), "val_exact": exact / max(rows, 1), "val_rows": int(rows)}


# ------------------------------------------------------------------ checkpoints


def trainable_state(model, echo):
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}
    if echo is not None:
        state.update({f"echo.{k}": v for k, v in echo.state_dict().items()})
    return state


def split_trainable(state):
    """trainable_state's dict -> (the adapter's tensors, the Echo module's, without their "echo." prefix)."""
    return ({k: v for k, v in state.items() if not k.startswith("echo.")},
            {k[len("echo."):]: v for k, v in state.items() if k.startswith("echo.")})


def atomic_file(path, write):
    """write(tmp), flush it to disk, then rename it over `path`: a reader (or a resume after kill -9,
    power loss or a full disk) finds the complete old file or the complete new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"writing {path} failed ({e.strerror}); the previous version is intact — "
                               f"free space or fix the folder, then --resume") from None


def atomic_dir(path, write):
    """The same for a folder: write into path.tmp, then swap it in with two renames (make_run_dir
    recovers the old folder if a crash falls between them)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"writing {path} failed ({e.strerror}); the previous version is intact") from None
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_finite(run, step):
    """A non-finite weight or optimizer moment must never be saved: it would poison every resume."""
    tensors = run.params + run.echo_params + [v for opt in run.optimizers.values() for s in opt.state.values()
                                              for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    if not bool(torch.stack([t.detach().float().isfinite().all() for t in tensors]).all()):
        raise FloatingPointError(f"non-finite weights after step {step} (try a lower --lr); nothing was saved "
                                 f"for this step — {last_checkpoint(run)}")


def last_checkpoint(run):
    if run.writer is not None:
        run.writer.wait(quiet=True)          # name the checkpoint that is on disk, not one half-written
    if run.saved_step is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint is in {run.out / 'checkpoint'} (step {run.saved_step})"


def to_host(obj):
    """A copy of a (nested) state with every tensor in new host memory: the step after a checkpoint
    updates the live tensors in place while the copy is being written."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes a checkpoint's files in a background thread, so training goes on during torch.save and
    fsync (a fraction of a second per checkpoint: ~10 % of a small model's run at --save-every 200).
    One write at a time; what it writes is a host copy of one step's state, so it is still one atomic,
    consistent unit. A failed write (a full disk, ...) is raised in the training thread by the next
    wait(): at the next checkpoint, at the end, or when the run stops; the previous checkpoint is intact."""

    def __init__(self):
        self.thread, self.error = None, None

    def submit(self, write):
        self.wait()
        self.thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer", daemon=True)
        self.thread.start()

    def _run(self, write):
        try:
            write()
        except BaseException as e:          # re-raised by wait(), in the training thread
            self.error = e

    def check(self):
        """Raise a finished write's error now (called every step), without waiting for one in flight."""
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def wait(self, quiet=False):
        """Until the write in flight is done; raise its error (quiet: print it, for a run already failing)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            if not quiet:
                raise error
            print(f"error: the checkpoint being written failed too: {error}", file=sys.stderr, flush=True)


def save_checkpoint(run, step, epoch, epoch_step, wait=False):
    """checkpoint/state.pt — one file, so one atomic unit: adapter + Echo weights, AdamW, LR schedule,
    router, every rank's RNG (dropout draws differ per rank), the data position and the options.
    Then the deployable outputs adapter/ and echo.safetensors, each replaced atomically as well.
    The state is copied to host memory here; the files are written by run.writer while the next steps
    run (wait=True: before returning, as for the last checkpoint of a run)."""
    check_finite(run, step)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(run.device) if run.cuda else None}
    rngs = [rng]
    if run.world > 1:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng)
    if run.master:
        state = to_host({"trainable": trainable_state(run.model, run.echo),
                         "optimizers": {k: opt.state_dict() for k, opt in run.optimizers.items()},
                         "router": run.router.state_dict() if run.router else None, "rng": rngs,
                         "step": step, "epoch": epoch, "epoch_step": epoch_step, "opts": vars(run.opts)})
        adapter, echo = split_trainable(state["trainable"])     # adapter/ and echo.safetensors: fp32 copies of these
        outputs = {name: {k: v.float().contiguous() for k, v in part.items()} for name, part in
                   (("adapter", adapter), ("echo", echo))}

        def write():
            (run.out / "checkpoint").mkdir(exist_ok=True)
            atomic_file(run.out / "checkpoint" / "state.pt", lambda tmp: torch.save(state, tmp))
            write_outputs(run, outputs)
            run.saved_step = step
        run.writer.submit(write)
        if wait:
            run.writer.wait()
    if run.world > 1:
        dist.barrier()
    if not run.master:     # rank 0 finished its previous write before this barrier (and this one, if it waited)
        run.saved_step, run.pending_step = (step if wait else run.pending_step), step


def write_outputs(run, outputs):
    """adapter/ and echo.safetensors, from save_checkpoint's host copies {"adapter": ..., "echo": ...}."""
    atomic_dir(run.out / "adapter", lambda tmp: save_adapter(run.model, tmp, outputs["adapter"]))
    if run.echo is not None:
        save_echo(run.echo, run.out, outputs["echo"])


# Options a resume may change: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = {"out", "resume", "force", "device", "compile", "cuda_graphs", "micro_batch",
                     "save_every", "log_every", "eval_every"}


def check_resume_options(saved, opts):
    if "echo_answer_window" not in saved:     # a checkpoint from before the option: the full Echo-on pass
        trained = EchoConfig.from_flags(argparse.Namespace(**{**vars(opts), **saved, "echo_answer_window": True}))
        if saved.get("echo") and uses_answer_window(trained) and opts.echo_answer_window:   # it would differ
            raise ValueError("--resume: the checkpoint was trained before --echo-answer-window existed, with the "
                             "Echo-on pass over every position: resume with --no-echo-answer-window")
        saved = {**saved, "echo_answer_window": opts.echo_answer_window}
    for key in sorted(set(saved) | set(vars(opts))):
        if key in RESUME_MAY_CHANGE or saved.get(key) == getattr(opts, key, None):
            continue
        raise ValueError(f"--resume: --{key.replace('_', '-')} is {getattr(opts, key, None)!r} but the checkpoint "
                         f"was trained with {saved.get(key)!r}; it fixes shapes, the data order or the schedule — "
                         f"resume with the checkpoint's value, or start a new run in another --out")


def load_checkpoint(run):
    """Restore everything save_checkpoint wrote; returns (step, epoch, epoch_step)."""
    path = run.out / "checkpoint" / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainable, rngs = state["trainable"], state["rng"]
    except Exception as e:       # truncated or foreign file: name it, say what to do
        raise ValueError(f"{path} is damaged ({type(e).__name__}); restore it, or start again with --force") from None
    check_resume_options(state["opts"], run.opts)
    expected = trainable_state(run.model, run.echo)
    if set(trainable) != set(expected):
        raise ValueError(f"{path} does not match this model's adapter (e.g. {sorted(set(trainable) ^ set(expected))[0]})")
    adapter, echo = split_trainable(trainable)
    run.model.load_state_dict(adapter, strict=False)
    if run.echo is not None:
        run.echo.load_state_dict(echo)
    for k, opt in run.optimizers.items():
        own = [{key: g[key] for key in ("lr", "capturable", "fused", "foreach") if key in g} for g in opt.param_groups]
        opt.load_state_dict(state["optimizers"][k])
        for g, mine in zip(opt.param_groups, own):
            # how this run steps is its own (--device / --cuda-graphs may change on resume): its (device)
            # lr objects, which set_learning_rate fills, and capturable / fused, with `step` where they want it
            g.update(mine)
            for p in g["params"]:
                step_t = opt.state.get(p, {}).get("step")
                if torch.is_tensor(step_t):
                    opt.state[p]["step"] = (step_t.to(p.device, torch.float32) if g.get("capturable") or g.get("fused")
                                            else step_t.to("cpu", torch.float32))
    if run.router is not None:
        run.router.load_state_dict(state["router"])
    if len(rngs) != run.world and run.master:
        print(f"warning: the checkpoint has {len(rngs)} rank(s), this run {run.world}: "
              f"dropout draws will differ from an uninterrupted run", file=sys.stderr)
    rng = rngs[run.rank % len(rngs)]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and run.cuda:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    if run.master:
        print(f"resumed from step {state['step']} of {run.total_steps} ({path})", flush=True)
    run.saved_step = state["step"]
    return state["step"], state["epoch"], state["epoch_step"]


def save_base(model, tokenizer, out_dir):
    """The default run's random base model, so eval.py can rebuild exactly the model that was trained."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    save_file(base, str(out_dir / "model.safetensors"))
    (out_dir / "params.json").write_text(json.dumps(model.args.to_params_json(), indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}))


# ------------------------------------------------------------------ log


class Log:
    """metrics.jsonl (one line per step) and the progress line. On GPU a step's stats are read one
    step late, so the loop never waits for the device; on CPU a step is synchronous and read at once.
    Also where a non-finite loss and a stop request (Ctrl-C / SIGTERM on any rank) are noticed — from
    stats summed over ranks, so every rank notices them at the same step.

    tokens_per_s counts real (non-padding) tokens over the log window; padded_tokens_per_s counts
    every position the GPU computed. Steps that met a new batch shape (compile / CUDA-graph capture)
    are warm-up: their time is reported apart and left out of the steady rate and the ETA."""

    def __init__(self, run, start_step):
        self.run, self.pending, self.start_step = run, None, start_step
        self.file = None
        if run.master:
            path = run.out / "metrics.jsonl"     # a resumed run keeps the lines up to its checkpoint
            kept = [l for l in path.read_text().splitlines() if parsed_step(l) <= start_step] \
                if run.opts.resume and path.exists() else []
            atomic_file(path, lambda tmp: tmp.write_text("".join(l + "\n" for l in kept)))
            self.file = open(path, "a")
        self.peak, self.n_params = peak_flops(run.device), sum(p.numel() for p in run.model.parameters())
        self.shapes, self.warmup_s, self.steady = set(), 0.0, {"s": 0.0, "steps": 0, "tokens": 0, "padded": 0}
        self.by_shape = {}                   # steady steps per batch shape: the benchmark's side-by-side
        self.window = {"since": time.perf_counter(), "tokens": 0, "padded": 0, "flops": 0.0}
        self.last_end = time.perf_counter()
        self.stop_signal = 0
        self.routing = []                    # this run's r_k, compared across ranks at the end

    def step(self, record, stats, shape):
        """Called after each optimizer step with its record, device stats and batch shape."""
        now = time.perf_counter()
        record["seconds"], self.last_end = now - self.last_end, now
        self.routing.append(record["routed"])
        record["warmup"] = shape not in self.shapes
        record["shape"] = shape
        self.shapes.add(shape)
        record["stats"] = StatsOnHost(stats)
        if self.pending is not None:
            self.finish(self.pending)
        self.pending = record
        if not self.run.cuda:
            self.flush()

    def flush(self):
        if self.pending is not None:
            self.finish(self.pending)
            self.pending = None

    def finish(self, record):
        stats = dict(zip(STATS, record.pop("stats").tolist()))
        n, routed = record["answer_tokens"], record["routed"]
        record["loss_off"] = stats["sum_off"] / n
        if self.run.echo is not None:
            record["loss_on"] = stats["sum_on"] / n if routed else None
            record["loss_kd"] = stats["sum_kd"] / n if routed else None
        record["loss"] = echo_objective(record["loss_off"], record.get("loss_on"), record.get("loss_kd"), routed,
                                        self.run.echo.cfg.lambda_kd if self.run.echo else 1.0)     # eq. 11
        record["tokens"], record["padded_tokens"] = int(stats["tokens"]), int(stats["padded_tokens"])
        self.stop_signal = max(self.stop_signal, int(stats["stop"]))
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"non-finite loss {record['loss']} at step {record['step']} (try a lower --lr); "
                                     f"{last_checkpoint(self.run)}")
        shape = record.pop("shape")
        flops = step_flops(self.run.model, self.run.echo, routed, shape[1:], self.n_params)
        if record["warmup"]:
            self.warmup_s += record["seconds"]
        else:
            for acc in (self.steady, self.by_shape.setdefault(shape, {"s": 0.0, "steps": 0, "tokens": 0, "padded": 0})):
                acc.update(s=acc["s"] + record["seconds"], steps=acc["steps"] + 1, tokens=acc["tokens"] + record["tokens"],
                           padded=acc["padded"] + record["padded_tokens"])
        if self.run.master:
            self.write(record, flops)

    def write(self, record, flops):
        run, w, now = self.run, self.window, time.perf_counter()
        w["tokens"] += record["tokens"]
        w["padded"] += record["padded_tokens"]
        w["flops"] += flops
        elapsed = max(now - w["since"], 1e-9)
        record["tokens_per_s"] = round(w["tokens"] / elapsed, 1)
        record["padded_tokens_per_s"] = round(w["padded"] / elapsed, 1)
        record["padding"] = round(1 - record["tokens"] / max(record["padded_tokens"], 1), 4)
        if self.peak:
            record["mfu"] = round(w["flops"] / elapsed / self.peak, 4)     # this rank's FLOPs on its GPU
        if run.cuda:
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record["step"] % run.opts.log_every == 0 or record["step"] in (1, run.total_steps) or "val_loss" in record:
            print(self.line(record), flush=True)
            w.update(since=now, tokens=0, padded=0, flops=0.0)

    def line(self, r):
        run = self.run
        left = run.total_steps - r["step"]
        per_step = self.steady["s"] / self.steady["steps"] if self.steady["steps"] else None
        parts = [f"step {r['step']}/{run.total_steps}", f"loss {r['loss']:.4f}"]
        if run.echo is not None:
            parts.append(f"(off {r['loss_off']:.4f}" + (f" on {r['loss_on']:.4f} kd {r['loss_kd']:.4f}" if r["routed"]
                         else "") + f", p {r['p']:.2f}{' routed' if r['routed'] else ''})")
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f} exact {r['val_exact']:.1%}")
        parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s'] / 1e3:.1f}k tok/s (pad {r['padding']:.0%})"]
        parts += [f"mfu {r['mfu']:.1%}"] if "mfu" in r else []
        parts += [f"mem {r['peak_gib']:.1f}G"] if "peak_gib" in r else []
        parts.append(f"eta {left * per_step / 60:.1f}m" if per_step else "eta after warm-up")   # compiles skew it
        return " | ".join(parts)

    def summary(self, wall):
        s, run = self.steady, self.run
        return {"steps": run.total_steps, "train_seconds": round(wall, 1), "warmup_seconds": round(self.warmup_s, 1),
                "tokens_per_s": round(s["tokens"] / s["s"], 1) if s["s"] else None,
                "padded_tokens_per_s": round(s["padded"] / s["s"], 1) if s["s"] else None,
                "batch_shapes": len(self.shapes), "micro_batch": run.opts.micro_batch, "world_size": run.world,
                "peak_gib": round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2) if run.cuda else None,
                "device": torch.cuda.get_device_name(run.device) if run.cuda else "cpu",
                "method": run.opts.method, "echo": run.echo is not None,
                "steady_by_shape": [{"routed": k[0], "micro_batches": [list(mb) for mb in k[1:]], "steps": v["steps"],
                                     "ms": round(1000 * v["s"] / v["steps"], 2), "padded_tokens": v["padded"],
                                     "tokens": v["tokens"]}
                                    for k, v in sorted(self.by_shape.items(), key=lambda kv: -kv[1]["steps"])]}

    def close(self):
        if self.file:
            self.file.close()


def step_flops(model, echo, routed, micro_batches, n_params=None):
    """For MFU: the FLOPs of one optimizer step over micro-batches [(B, T, P), ...] (batch_shape's). 4·N
    per position and pass (forward 2N, activation gradients 2N; the frozen weights get no weight
    gradient). A routed step's Echo-on pass runs the layers from the first target up, on the answer
    window (B·P positions; see echo_loss) or, when it recomputes every position, on all B·T.
    n_params: N, when the caller counted it once (the log calls this every step)."""
    n_params = n_params or sum(p.numel() for p in model.parameters())
    flops = 0.0
    for B, T, P in micro_batches:
        flops += 4 * n_params * B * T
        if routed and echo is not None:
            layers = 1.0 if echo.cfg.separate_passes else 1 - echo.cfg.target_layers[0] / model.args.n_layers
            flops += 4 * n_params * layers * B * (P if uses_answer_window(echo.cfg) else T)
    return flops


def parsed_step(line):
    """The step of a metrics.jsonl line; a line torn by a crash mid-write counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def peak_flops(device):
    """Dense bf16 peak of the GPU (for MFU); None on CPU or unknown GPUs."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312), ("L40", 181), ("4090", 165)):
        if key in name:
            return tflops * 1e12
    return None


class StopRequest:
    """Ctrl-C / SIGTERM (cluster schedulers send it before they kill): finish the current step, write a
    checkpoint, say where, exit with 128 + signal (130 / 143). A second signal exits at once."""

    def __init__(self):
        self.signum, self.previous = 0, {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[s] = signal.signal(s, self.handle)
            except ValueError:             # not the main thread (e.g. an embedding application)
                pass

    def handle(self, signum, frame):
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------ main


def write_config(run):
    atomic_file(run.out / "config.json", lambda tmp: tmp.write_text(json.dumps({
        "opts": vars(run.opts), "model": run.model.args.to_params_json(),
        "echo": asdict(run.echo.cfg) if run.echo else None, "world_size": run.world, "grad_accum": run.grad_accum,
        "train_rows": len(run.train_set), "dropped_rows": run.train_set.n_dropped,
        "val_rows": len(run.val_set) if run.val_set else 0, "total_steps": run.total_steps}, indent=2)))
    print(f"{len(run.train_set)} rows ({run.train_set.n_dropped} longer than {run.opts.max_len} tokens dropped"
          f"{f', {len(run.val_set)} for validation' if run.val_set else ''}), {run.total_steps} steps of "
          f"{run.opts.global_batch} on {run.world} × {run.device}, micro-batch {run.opts.micro_batch} × grad_accum "
          f"{run.grad_accum}, {sum(p.numel() for p in run.params) / 1e6:.2f}M trainable, "
          f"Echo {'on' if run.echo else 'off'}", flush=True)


def main(argv=None):
    opts = apply_default_run(parse_args(argv))
    run = setup(opts)
    position = load_checkpoint(run) if opts.resume else (0, 0, 0)      # (step, epoch, step in epoch)
    if run.master:
        write_config(run)
    log, stop = Log(run, position[0]), StopRequest()
    t_start = time.perf_counter()
    try:
        step = train(run, log, stop, *position)
    except BaseException:
        run.writer.wait(quiet=True)          # a checkpoint in flight still completes; the first error is reported
        raise
    finally:
        stop.restore()
        log.close()
    finish(run, log, stop, step, time.perf_counter() - t_start)
    return run.out


def train(run, log, stop, step, epoch, epoch_step):
    """The loop: one optimizer step per global batch, until total_steps or a stop request."""
    while step < run.total_steps:
        for epoch_step_now, mbs in micro_batches(run, epoch, epoch_step):
            routed = run.router(step) if run.router else False      # eq. 9, the same draw on every rank
            lr = learning_rate(run, step)
            set_learning_rate(run, lr)
            try:
                stats = train_step(run, mbs, routed, stop.signum)
            except torch.OutOfMemoryError:
                raise ValueError(f"out of GPU memory at step {step + 1} with --micro-batch {run.opts.micro_batch}: "
                                 f"pass a smaller one; {last_checkpoint(run)}") from None
            step, epoch_step = step + 1, epoch_step_now + 1
            record = {"step": step, "epoch": epoch, "lr": lr, "routed": routed,
                      "answer_tokens": mbs[0]["global_n_targets"]}
            if run.router:
                record["p"] = run.router.p(step - 1)
            last = step == run.total_steps
            if run.val_set is not None and (last or run.opts.eval_every and step % run.opts.eval_every == 0):
                record.update(validate(run))          # into this step's own metrics line
            log.step(record, stats, batch_shape(mbs, routed))
            run.writer.check()                        # a failed checkpoint write stops the run now
            if last or step % run.opts.save_every == 0 or log.stop_signal:
                log.flush()                           # never checkpoint a step whose loss was not checked
                save_checkpoint(run, step, epoch, epoch_step, wait=last or bool(log.stop_signal))
            if last or log.stop_signal:      # both also triggered the save above, which flushed the log
                return step
        epoch, epoch_step = epoch + 1, 0
    return step


def batch_shape(mbs, routed):
    """What a compiled step is specialised on: routing and each micro-batch's [B, T] and P."""
    return (routed, *((*mb["input_ids"].shape, mb["supervised"][0].shape[1]) for mb in mbs))


def finish(run, log, stop, step, wall):
    """After a stop request: exit 130 / 143 (its checkpoint is written). Otherwise check that routing
    agreed on every rank and write summary.json."""
    if log.stop_signal:
        signum = stop.signum or signal.SIGTERM
        if run.master:
            print(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint in "
                  f"{run.out / 'checkpoint'}; continue with --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    if run.world > 1 and run.router is not None:      # the router must agree on every rank: check it, once
        every_rank = [None] * run.world
        dist.all_gather_object(every_rank, log.routing)
        if any(r != log.routing for r in every_rank):
            raise RuntimeError("Echo routing differed between ranks")
        if run.master:
            print(f"routing identical on all {run.world} ranks: {sum(log.routing)} of {len(log.routing)} steps routed")
    if run.master:
        summary = log.summary(wall)
        atomic_file(run.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        steady = f", {summary['tokens_per_s'] / 1e3:.1f}k tok/s steady" if summary["tokens_per_s"] else ""
        print(f"done in {wall:.0f}s (warm-up {summary['warmup_seconds']:.0f}s, {summary['batch_shapes']} batch "
              f"shapes{steady}): adapter in {run.out / 'adapter'}"
              + (f", Echo weights (analysis only) in {run.out}" if run.echo else ""), flush=True)
    if run.world > 1:
        dist.barrier()                 # leave together: a rank tearing down gloo early can abort its peer
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise
        # A collective failed: another process died (or hung). Its own log has the cause; say so in one
        # line instead of this rank's traceback, which only shows where it was waiting.
        sys.exit(f"error: rank {os.environ.get('RANK')}: lost contact with another process "
                 f"({str(e).splitlines()[0][:160]}); see the other ranks' output for the cause — the last "
                 f"checkpoint in --out continues with --resume")
