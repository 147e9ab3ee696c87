"""Checkpoints and run folders: never overwrite work, write every file atomically (in a background
thread), refuse a resume that would compute something else, and restore a run exactly.
"""
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from echo import save_echo
from model.io import fingerprint, publish, write_failed
from model.lora import ADAPTER_KEYS, save_adapter
from model.rundir import DEQUANTIZED_FROM
from training.options import compute_dtype, default_of

RUN_FILES = ("config.json", "metrics.jsonl", "echo_diagnostics.jsonl", "summary.json", "checkpoint", "adapter",
             "echo.safetensors",
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
    power loss or a full disk) finds the complete old file or the complete new one, never a mix. The file
    gets the mode a plain new file would have (umask), whatever mode write() gave it.
    Why not model.io.atomic_write: a run's files are written by one process, must survive power loss (fsync),
    and their temp name is fixed (`<name>.tmp`) so make_run_dir can sweep a killed run's leftovers; the tools'
    writer takes a unique temp name instead, because several --jobs processes may write beside each other."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        publish(tmp, path)
    except (OSError, RuntimeError) as e:     # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise checkpoint_write_failed(e, path) from None


def checkpoint_write_failed(e, path):
    """model.io.write_failed for a run's own files (atomic_file, atomic_dir): the old version is on disk."""
    return write_failed(e, path, "the previous version is intact", then="--resume")


def atomic_dir(path, write):
    """The same for a folder: write into path.tmp, then swap it in with two renames (make_run_dir
    recovers the old folder if a crash falls between them)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint_write_failed(e, path) from None
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


def save_checkpoint(run, step, epoch, epoch_step, wait=False, totals=None):
    """checkpoint/state.pt — one file, so one atomic unit: adapter + Echo weights, AdamW, LR schedule,
    router, every rank's RNG (dropout draws differ per rank), the data position and the options.
    Then the deployable outputs adapter/ and echo.safetensors, each replaced atomically as well.
    The state is copied to host memory here; the files are written by run.writer while the next steps
    run (wait=True: before returning, as for the last checkpoint of a run). `totals`: Log.totals, the run's time
    and token counts up to this step, which a resumed run's summary.json adds to."""
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
                         "step": step, "epoch": epoch, "epoch_step": epoch_step, "opts": vars(run.opts),
                         "fingerprints": run.fingerprints, "totals": totals})
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


# Options a resume may change: where and how it runs, not what it computes. --model, --data and
# --val-data are compared by content (fingerprints), not by the path that names them.
RESUME_MAY_CHANGE = {"out", "resume", "force", "device", "compile", "cuda_graphs", "micro_batch", "config",
                     "save_every", "log_every", "eval_every", "diagnose_every", "ranks_share_gpu",
                     "activation_checkpointing", "pack_attention"}
BY_CONTENT = {"model", "data", "val_data"}


def check_resume_options(saved, opts, saved_fingerprints, fingerprints, say=True, device="cpu"):
    """Refuse a resume that would train something else, naming the option. An option the checkpoint
    predates counts as trained at its value from before it existed (its default unless declared, see
    options.default_of), said once; another value of it is refused like any change. A run without Echo
    ignores the --echo-* options, and an option that changes nothing for this run (changes_nothing) is not
    compared. --dtype compares what ran on `device` (older checkpoints recorded bf16 for CPU runs in fp32).
    --model / --data / --val-data compare by content where they have files."""
    missing = sorted(k for k in vars(opts) if k not in saved and k not in RESUME_MAY_CHANGE)
    saved = {**{k: default_of(k, opts.model == "default-tiny") for k in missing}, **saved}
    for key in sorted(set(saved) & set(vars(opts))):      # options this version no longer has are ignored
        if key in RESUME_MAY_CHANGE or saved[key] == getattr(opts, key) or changes_nothing(key, opts):
            continue
        if key == "dtype" and compute_dtype(saved[key], device) == compute_dtype(opts.dtype, device):
            continue
        if key.startswith("echo_") and not (opts.echo or saved.get("echo")):
            continue
        if key in BY_CONTENT and (by_content(key, saved_fingerprints, fingerprints)
                                  or same_paths(saved[key], getattr(opts, key))):
            continue
        raise ValueError(f"--resume: --{key.replace('_', '-')} is {getattr(opts, key)!r} but the checkpoint "
                         f"was trained with {saved[key]!r}; it fixes shapes, the data order or the schedule — "
                         f"resume with the checkpoint's value, or start a new run in another --out")
    for what, flag in (("model", "--model"), ("data", "--data"), ("val_data", "--val-data")):
        if by_content(what, saved_fingerprints, fingerprints) and \
                contents(saved_fingerprints[what]) != contents(fingerprints[what]):
            raise ValueError(f"--resume: {flag} {changed_file(saved_fingerprints[what], fingerprints[what])} "
                             f"differs in content from what the checkpoint was trained on: restore it, or "
                             f"start a new run in another --out")
    if missing and say:
        print(f"note: the checkpoint predates {', '.join('--' + k.replace('_', '-') for k in missing)}: "
              f"resuming as it was trained (the value before the option existed)", file=sys.stderr, flush=True)


def changes_nothing(key, opts):
    """Whether option `key` cannot change what this run computes: --echo-answer-window with
    --echo-separate-passes or --echo-all-positions, which always recompute every position (see
    echo.uses_answer_window). The options that decide it are compared themselves."""
    return key == "echo_answer_window" and bool(opts.echo_separate_passes or opts.echo_all_positions)


def by_content(key, saved_fingerprints, fingerprints):
    """Whether option `key` is compared by its files' content: both runs recorded files for it."""
    return bool(saved_fingerprints and saved_fingerprints.get(key) and fingerprints.get(key))


def contents(named):
    return [fp for _, fp in named]          # without the names: a renamed copy is the same data


def same_paths(a, b):
    norm = lambda v: [str(Path(x).resolve()) for x in v] if isinstance(v, list) else (str(Path(v).resolve()) if v else v)
    return norm(a) == norm(b)


def changed_file(saved, now):
    """The first file whose fingerprint differs (or the file list, if files were added or removed)."""
    saved, now = saved or [], now or []
    if len(saved) != len(now):
        return f"({len(now)} file(s), the checkpoint's {len(saved)})"
    for (_, a), (name, b) in zip(saved, now):
        if a != b:
            return name
    return "?"


def run_fingerprints(opts, rank=0, world=1):
    """What the run trains on, by content: each --data / --val-data file and every file of the model folder
    (weights, params.json, tokenizer), as [[name, fingerprint], ...] (a preset model has none: its name is
    compared instead). Rank 0 reads the files and sends the result to the other ranks."""
    found = [None]
    if rank == 0:
        files = lambda paths: [[Path(p).name, fingerprint(p)] for p in paths or []]
        model = Path(opts.model)
        model_files = sorted(p for p in model.iterdir() if p.is_file()) if model.is_dir() else []
        found = [{"data": files(opts.data), "val_data": files(opts.val_data), "model": files(model_files)}]
    if world > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def load_checkpoint(run):
    """Restore everything save_checkpoint wrote; returns (step, epoch, epoch_step)."""
    path = run.out / "checkpoint" / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainable, rngs = state["trainable"], state["rng"]
    except Exception as e:       # truncated or foreign file: name it, say what to do
        raise ValueError(f"{path} is damaged ({type(e).__name__}); restore it, or start again with --force") from None
    check_resume_options(state["opts"], run.opts, state.get("fingerprints"), run.fingerprints, say=run.master,
                         device=run.device)
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
    if run.master and state["step"] < run.total_steps:      # a finished run says so itself (train.main)
        print(f"resumed from step {state['step']} of {run.total_steps} ({path})", flush=True)
    run.saved_step, run.totals_before = state["step"], state.get("totals")     # older checkpoints: no totals
    return state["step"], state["epoch"], state["epoch_step"]


def save_base(model, tokenizer, out_dir):
    """The default run's random base model, so eval.py can rebuild exactly the model that was trained. An NF4
    base is saved as the plain weights its forward uses, dequant(W), without building a second model, and its
    params.json says "dequantized_from": "nf4" (model.rundir.is_dequantized_copy). Each
    file is written atomically and follows the umask (safetensors alone would leave model.safetensors 0600)."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {k: v.contiguous() for k, v in model.dequantized_state_dict(model.tok_embeddings.weight.dtype).items()}
    atomic_file(out_dir / "model.safetensors", lambda tmp: save_file(base, str(tmp)))
    nf4 = {DEQUANTIZED_FROM: "nf4"} if model.args.base_format == "nf4" else {}    # model.load refuses nf4 on it
    params = json.dumps({**model.args.to_params_json(), **nf4}, indent=2)
    atomic_file(out_dir / "params.json", lambda tmp: tmp.write_text(params))
    atomic_file(out_dir / "tokenizer_config.json", lambda tmp: tmp.write_text(json.dumps({"type": "byte"})))
