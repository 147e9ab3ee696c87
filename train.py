"""Echo-LoRA / LoRA / DoRA fine-tuning — one loop, top to bottom.

    python train.py                                   # built-in default: tiny model, synthetic task, CPU ~1 min
    torchrun --nproc_per_node 4 train.py --model DIR --data commonsense_170k.json --echo
    python train.py --model llama3-8b --data x.json   # preset = random weights (benchmarks)

Read it in order: options → setup (processes, run folder, model, data) → the step (`step_once`: both
passes, clipping, AdamW — eq. 11 in action) → the loop (`train`) → validation → finish. The machinery
lives in training/: options (the flags), checkpoint (atomic files, resume), graphs (compile, CUDA
graphs), log (metrics, FLOPs), distributed (ranks, signals).

One optimizer step = one global batch (default 16) = world_size × grad_accum micro-batches. On an
Echo step (router eq. 9 says r = 1) each micro-batch runs the Echo-off and the Echo-on pass inside
one forward of the DDP-wrapped `EchoStep` module (eqs. 2-12: echo.echo_loss). Losses are summed over
answer tokens and divided by the answer-token count of the whole global batch, so the objective is
a token mean over the global batch whatever the number of GPUs or micro-batches.

A run folder holds config.json, metrics.jsonl (one line per step), echo_diagnostics.jsonl (Echo runs),
adapter/ (the deployable adapter), echo.safetensors + echo_config.json (analysis only),
checkpoint/state.pt (one file: every tensor and RNG state --resume needs, replaced atomically) and,
when the run finished, summary.json (the whole run, however often it was resumed). config.json records
paths relative to the repository or the run folder ("<run folder>/..."), or as "<outside the repository>/
FOLDER/NAME", never as this machine's absolute paths; the fingerprints beside them identify the files.
"""
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import data
from echo import EchoConfig, EchoModule, Router, echo_loss, supervision
from echo.diagnostics import echo_diagnostics
from model import load_model
from model.model import document_block_mask
from model.tokenizer import ByteTokenizer
from training.checkpoint import (CheckpointWriter, atomic_file, check_run_dir, last_checkpoint, load_checkpoint,
                                 make_run_dir, run_fingerprints, save_base, save_checkpoint)
from training.distributed import (StopRequest, check_routing_agrees, exit_with_one_line, leave, setup_distributed,
                                  smallest_over_ranks)
from training.graphs import P_BUCKET, StepGraphs, keep_grads, make_trainer, pick_micro_batch, set_learning_rate
from training.log import STATS, Log, summary_of
from training.options import (DEFAULT_RUN, apply_default_run, check_options, compute_dtype, parse_args,
                              recorded_opts, recorded_path)



# ------------------------------------------------------------------ setup


def build_model(opts, device):
    overrides = dict(adapter=opts.method, lora_rank=opts.rank, lora_alpha=opts.alpha,
                     lora_dropout=opts.dropout, lora_modules=tuple(opts.modules),
                     base_format=opts.base_format, activation_checkpointing=opts.activation_checkpointing)
    dtype = torch.bfloat16 if compute_dtype(opts.dtype, device) == "bf16" else torch.float32
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
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"--model {opts.model}: its {model.args.vocab_size}-token vocabulary is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size} tokens: use a model folder with its own tokenizer")
    if opts.max_len > model.args.max_seq_len:
        raise ValueError(f"--max-len {opts.max_len} exceeds the model's context of {model.args.max_seq_len} tokens")
    return model, tokenizer


def load_data(opts, tokenizer, out, master, world, base_model=None):
    """The training rows and the validation rows (--val-split: held out of --data, seeded)."""
    if opts.model == "default-tiny":
        written = (out / "data" / "train.json").exists() and (out / "base" / "model.safetensors").exists()
        if master and not (opts.resume and written):      # a resume leaves the run's own files as they are
            data.write_default_task(out / "data")
            save_base(base_model, tokenizer, out / "base")    # NF4: dequant(W), what it trains on
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
              f"--max-len {opts.max_len} tokens and are dropped", flush=True)
    val_set = data.TokenizedDataset(val_rows[:opts.val_rows], tokenizer, template, opts.max_len) if val_rows else None
    return train_set, val_set


@dataclass
class Run:
    """What the loop works with, built once by `setup`."""
    opts: object
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
    fingerprints: dict = None     # the content of --model / --data / --val-data (resume compares it)
    totals_before: dict = None    # Log.totals of the checkpoint resumed from (summary.json covers the whole run)

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return str(self.device).startswith("cuda")


def setup(opts):
    """Processes, run folder, model, Echo module, data, optimizer, schedule, router."""
    rank, world, device = setup_distributed(opts.device, opts.ranks_share_gpu)
    check_options(opts, world, device)
    opts.dtype = compute_dtype(opts.dtype, device)      # what runs is what config.json and the checkpoint record
    master = rank == 0
    torch.manual_seed(opts.seed)                        # identical adapter init on every rank
    out = Path(opts.out or f"runs/{Path(opts.model).name}-{opts.method}{'-echo' if opts.echo else ''}")
    check_run_dir(opts, out)

    model, tokenizer = build_model(opts, device)
    echo = EchoModule(EchoConfig.from_flags(opts, seed=opts.seed), model.args).to(device) if opts.echo else None
    make_run_dir(opts, out, master, world)      # only now: a bad --model or Echo layer leaves no empty run folder
    train_set, val_set = load_data(opts, tokenizer, out, master, world, base_model=model)
    step_module = EchoStep(model, echo, opts.pack_attention)    # fp32 Echo weights (eqs. 2-8), whatever the dtype
    if opts.micro_batch is None:
        opts.micro_batch = smallest_over_ranks(pick_micro_batch(step_module, opts, world, device), world, device)
    cuda = str(device).startswith("cuda")
    use_compile = cuda if opts.compile is None else opts.compile
    graphs = opts.cuda_graphs if opts.cuda_graphs != "auto" else \
        ("off" if opts.pack else "step" if world == 1 else "blocks")     # --pack: see check_options
    if not (use_compile and cuda):
        graphs = "off"
    if graphs == "step" and world > 1:
        raise ValueError("--cuda-graphs step captures a single-GPU step: use --cuda-graphs blocks with torchrun")
    if opts.activation_checkpointing and graphs != "off":      # not yet run on a GPU; blocks: pytorch#154306
        raise ValueError(f"--activation-checkpointing has not been validated with CUDA graphs (--cuda-graphs "
                         f"{graphs}): add --cuda-graphs off")
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
              None, router, train_set, val_set, total, accum, graphs == "blocks",
              fingerprints=run_fingerprints(opts, rank, world))
    run.graphs = StepGraphs(run, step_once) if graphs == "step" else None
    run.writer = CheckpointWriter()
    return run


def learning_rate(run, step):
    """Linear warm-up (capped at 10% of the steps) then linear decay to 0; step counts from 0."""
    total, opts = run.total_steps, run.opts
    warmup = max(1, min(opts.warmup_steps, total // 10 or 1))
    return opts.lr * min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))


# ------------------------------------------------------------------ the step


class EchoStep(nn.Module):
    """What DDP wraps: the adapted model plus (optionally) the Echo module. One forward computes the
    whole micro-batch loss — both passes on a routed step — so DDP sees one forward per backward."""

    def __init__(self, model, echo=None, pack_attention="sdpa"):
        super().__init__()
        self.model, self.echo, self.pack_attention = model, echo, pack_attention

    def forward(self, tokens, labels, index, targets, boundary, routed, normalizer, *packing):
        """packing (--pack): data.Packing's fields, in order. With --pack-attention flex the micro-batch's
        document BlockMask is built here, once, and every pass over its packed rows reuses it."""
        packing = data.Packing(*packing) if packing else None
        block_mask = None
        if packing is not None and self.pack_attention == "flex":
            block_mask = document_block_mask(packing.documents)
        return echo_loss(self.model, self.echo, tokens, labels, routed=routed, normalizer=normalizer,
                         supervised=(index, targets, boundary), packing=packing, block_mask=block_mask)


def micro_batches(run, epoch, start_step):
    """This rank's micro-batches, step by step, with the supervision (answer positions, their targets,
    t*) computed here on the host, so the step itself never waits for the device."""
    for step, mbs in data.batches(run.train_set, global_batch=run.opts.global_batch,
                                  micro_batch=run.opts.micro_batch, rank=run.rank, world_size=run.world,
                                  seed=run.opts.seed, epoch=epoch, start_step=start_step,
                                  group_by_length=run.opts.group_by_length):
        for mb in mbs:
            mb["supervised"] = supervision(mb["labels"], bucket=P_BUCKET)
            if run.opts.pack:            # the same examples, laid out in fewer rows (the step reads mb["packed"])
                mb["packed"] = data.pack_micro_batch(mb, run.train_set.max_len, run.train_set.pad_id,
                                                     flat=run.opts.pack_layout == "flat")
        yield step, mbs


def step_tensors(mb):
    """What the step reads of a micro-batch: tokens, labels, index, targets, t*, and with --pack the packed
    rows' tokens and labels instead, and their layout (data.Packing's fields; EchoStep.forward). The
    supervision (index, targets, t*) stays per example, in its own positions."""
    if "packed" not in mb:
        return [mb["input_ids"], mb["labels"], *mb["supervised"]]
    packed = mb["packed"]
    return [packed["input_ids"], packed["labels"], *mb["supervised"], *vars(packed["packing"]).values()]


def train_step(run, mbs, routed, stop):
    """One optimizer step over this rank's micro-batches. Returns the step's STATS as a device tensor,
    summed over ranks but not read here (the log reads it one step late, from the host copy
    StatsOnHost queues behind the step). With --cuda-graphs step it is valid until the next step of
    the same shape."""
    inputs = [step_tensors(mb) for mb in mbs]
    host = torch.tensor([0.0, 0.0, 0.0, sum(int(mb["attention_mask"].sum()) for mb in mbs),
                         sum(batch[0].numel() for batch in inputs), stop,
                         mbs[0]["global_n_targets"] / run.world])      # + the normalizer (DDP averages ranks)
    if run.cuda:
        inputs, host = [[t.pin_memory() for t in batch] for batch in inputs], host.pin_memory()
    if run.graphs is not None:
        return run.graphs.step(run, inputs, routed, host)
    to = lambda t: t.to(run.device, non_blocking=True)
    return step_once(run, [[to(t) for t in batch] for batch in inputs], routed, to(host))


def step_once(run, inputs, routed, host):
    """The training step: forward + backward of each micro-batch (both passes when routed: eq. 11 is
    echo_loss's loss), gradient clipping, AdamW. `inputs`: per micro-batch (tokens, labels, index,
    targets, boundary) on the device; `host`: STATS' host-side entries and the normalizer (the global
    batch's answer tokens / world size: DDP averages the ranks' gradients, so each rank's loss is a
    sum over its tokens / that). Run as it is, or captured once per batch shape by StepGraphs."""
    params = run.params + (run.echo_params if routed else [])
    static = run.graphs is not None                  # gradients live in fixed tensors, zeroed here
    if static:
        torch._foreach_zero_([p.grad for p in params])
    stats, normalizer = host[:len(STATS)].clone(), host[len(STATS)]
    for i, batch in enumerate(inputs):
        last = i == len(inputs) - 1
        with run.ddp.no_sync() if run.world > 1 and not last else nullcontext():
            with autocast(run):
                loss, sums = run.ddp(*batch[:5], routed, normalizer, *batch[5:])
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


def autocast(run):
    bf16 = run.opts.dtype == "bf16" and run.cuda
    return torch.autocast("cuda", torch.bfloat16) if bf16 else nullcontext()


# ------------------------------------------------------------------ the loop


def main(argv=None):
    opts = apply_default_run(parse_args(argv, __doc__), DEFAULT_RUN)
    run = setup(opts)
    position = load_checkpoint(run) if opts.resume else (0, 0, 0)      # (step, epoch, step in epoch)
    if position[0] >= run.total_steps and (run.out / "summary.json").exists():
        if run.master:        # nothing left to do: every file stays as the run left it
            print(f"{run.out} already finished its {run.total_steps} steps: nothing to do, its files are left as "
                  f"they are", flush=True)
        leave(run.world)
        return run.out
    if run.master:
        write_config(run)
    log, stop = Log(run, position[0], run.totals_before), StopRequest()
    try:
        step = train(run, log, stop, *position)
    except BaseException:
        run.writer.wait(quiet=True)          # a checkpoint in flight still completes; the first error is reported
        raise
    finally:
        stop.restore()
        log.close()
    finish(run, log, stop, step, time.perf_counter() - log.started)
    return run.out


def train(run, log, stop, step, epoch, epoch_step):
    """The loop: one optimizer step per global batch, until total_steps or a stop request."""
    routed_steps = log.routed_before                  # a resumed run counts the routed steps it kept
    while step < run.total_steps:
        for epoch_step_now, mbs in micro_batches(run, epoch, epoch_step):
            routed = run.router(step) if run.router else False      # eq. 9, the same draw on every rank
            lr = learning_rate(run, step)
            set_learning_rate(run.optimizers, lr)
            try:
                stats = train_step(run, mbs, routed, stop.signum)
            except torch.OutOfMemoryError:
                raise ValueError(f"out of GPU memory at step {step + 1} with --micro-batch {run.opts.micro_batch}: "
                                 f"pass a smaller one; {last_checkpoint(run)}") from None
            step, epoch_step, routed_steps = step + 1, epoch_step_now + 1, routed_steps + routed
            record = {"step": step, "epoch": epoch, "lr": lr, "routed": routed,
                      "answer_tokens": mbs[0]["global_n_targets"]}
            if run.router:
                record["p"] = run.router.p(step - 1)
            last = step == run.total_steps
            if run.val_set is not None and (last or run.opts.eval_every and step % run.opts.eval_every == 0):
                record.update(validate(run))          # into this step's own metrics line
            if routed and run.master and run.opts.diagnose_every and (routed_steps - 1) % run.opts.diagnose_every == 0:
                record["echo_diagnostics"] = diagnose(run, mbs[0])      # routed steps 1, N + 1, 2N + 1, ...
            log.step(record, stats, batch_shape(mbs, routed))
            run.writer.check()                        # a failed checkpoint write stops the run now
            stopping = log.stop_signal or (run.world == 1 and stop.signum)    # one process: stop at this step
            if last or step % run.opts.save_every == 0 or stopping:
                log.flush()                           # never checkpoint a step whose loss was not checked
                save_checkpoint(run, step, epoch, epoch_step, wait=last or bool(stopping), totals=log.totals())
            if last or stopping:             # both also triggered the save above, which flushed the log
                if run.world == 1:           # several ranks decide only from the all-reduced stats, together
                    log.stop_signal = log.stop_signal or stop.signum
                return step
        epoch, epoch_step = epoch + 1, 0
    return step


def diagnose(run, mb):
    """The Echo diagnostics of this step's first micro-batch, after its update (echo.diagnostics). Analysis
    only: out of GPU memory, it is skipped with a warning rather than stopping the run."""
    tensors = [t.to(run.device) for t in (mb["input_ids"], mb["labels"], *mb["supervised"])]
    try:
        with autocast(run):
            return echo_diagnostics(run.model, run.echo, tensors[0], tensors[1], tuple(tensors[2:]))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print("warning: out of GPU memory in the Echo diagnostics: skipped at this step", file=sys.stderr)
        return None


def batch_shape(mbs, routed):
    """What a compiled step is specialised on: routing and each micro-batch's [B, T] and P (packed: [R, L], P)."""
    return (routed, *((*t[0].shape, t[2].shape[1]) for t in map(step_tensors, mbs)))


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
            ce, logits = model.head_loss(h, index, targets)
        valid = targets != data.IGNORE_INDEX
        logits = logits.float()
        exact = ((logits.argmax(-1) == targets) | ~valid).all(dim=1)
        sums += torch.stack([ce, valid.sum(), exact.sum(), torch.tensor(len(rows), device=run.device)]).float()
    if run.world > 1:
        dist.all_reduce(sums)
    model.train()
    ce, n, exact, rows = sums.tolist()
    return {"val_loss": ce / max(n, 1), "val_exact": exact / max(rows, 1), "val_rows": int(rows)}


# ------------------------------------------------------------------ finish


def write_config(run):
    """config.json: the options (feed it back with --config), the model, Echo and what the run trains on. Paths
    are written as recorded_path writes them (no absolute path of this machine), each file beside its content
    fingerprint."""
    fingerprints, out = run.fingerprints, run.out
    by_file = lambda paths, found: {recorded_path(p, out): fp for p, (_, fp) in zip(paths or [], found)}
    atomic_file(out / "config.json", lambda tmp: tmp.write_text(json.dumps({
        "opts": recorded_opts(run.opts, out), "model": run.model.args.to_params_json(),
        "echo": asdict(run.echo.cfg) if run.echo else None, "world_size": run.world, "grad_accum": run.grad_accum,
        "train_rows": len(run.train_set), "dropped_rows": run.train_set.n_dropped,
        "val_rows": len(run.val_set) if run.val_set else 0, "total_steps": run.total_steps,
        "data_fingerprints": by_file(run.opts.data, fingerprints["data"]),
        "val_data_fingerprints": by_file(run.opts.val_data, fingerprints["val_data"]),
        "model_fingerprints": dict(fingerprints["model"])}, indent=2)))
    print(f"{len(run.train_set)} rows ({run.train_set.n_dropped} longer than {run.opts.max_len} tokens dropped"
          f"{f', {len(run.val_set)} for validation' if run.val_set else ''}), {run.total_steps} steps of "
          f"{run.opts.global_batch} on {run.world} × {run.device} in {run.opts.dtype}, micro-batch "
          f"{run.opts.micro_batch} × grad_accum {run.grad_accum}, {sum(p.numel() for p in run.params) / 1e6:.2f}M "
          f"trainable, Echo {'on' if run.echo else 'off'}", flush=True)


def finish(run, log, stop, step, wall):
    """After a stop request: exit 130 / 143 (its checkpoint is written). Otherwise check that routing
    agreed on every rank and write summary.json."""
    if log.stop_signal:
        signum = stop.signum or signal.SIGTERM      # another rank's signal reached this one through the stats
        if run.master:
            print(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint in "
                  f"{run.out / 'checkpoint'}; continue with --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    if run.world > 1 and run.router is not None:      # the router must agree on every rank: check it, once
        check_routing_agrees(log.routing, run.rank, run.world)
    if run.master:
        summary = summary_of(run, log.totals())
        atomic_file(run.out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        steady = f", {summary['tokens_per_s'] / 1e3:.1f}k tok/s steady" if summary["tokens_per_s"] else ""
        whole = f" ({summary['train_seconds']:.0f}s over its {summary['stretches']} stretches)" \
            if summary["stretches"] > 1 else ""
        print(f"done in {wall:.0f}s{whole} (warm-up {summary['warmup_seconds']:.0f}s, {summary['batch_shapes']} batch "
              f"shapes{steady}): adapter in {run.out / 'adapter'}"
              + (f", Echo weights (analysis only) in {run.out}" if run.echo else ""), flush=True)
    leave(run.world)


if __name__ == "__main__":
    exit_with_one_line(main)
