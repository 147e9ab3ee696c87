"""Run folders and their records: skip / resume / fresh decisions, the train.py and eval.py command lines,
the check that a record matches what a table claims (recipe + data fingerprints), and running the queue."""
import functools
import json
import math
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import (IN_FORMAT, TASKS, TRAIN_TASKS, StepFailed, arg_path, check_numbers, file_name, fingerprint,
                     is_number, logged_command, read_record, script, write_atomic)
from .evals import check_eval_limit, compact_predictions, eval_file, eval_results_path
from .recipes import METHODS, extra_opts

SUMMARY_KEYS = ["steps", "train_seconds", "tokens_per_s", "peak_gib", "device", "warmup_seconds"]
RECIPE_KEYS = ["method", "rank", "alpha", "dropout", "modules", "lr", "epochs", "max_steps", "warmup_steps",
               "global_batch", "micro_batch", "max_len", "val_split", "template", "dtype", "echo_target_layers",
               "echo_source_layers", "echo_target_modules", "echo_p_start", "echo_p_end"]
CLAIM_KEYS = ["lr", "epochs", "rank", "alpha", "dropout", "global_batch", "max_len", "val_split", "max_steps",
              "warmup_steps", "template"]
JOBS_FILE = "reproduce-jobs.json"   # written beside a run trained under --jobs N: its speed figures are shared
RECIPE_ORDER = [("lr", "--lr"), ("epochs", "--epochs"), ("rank", "--rank"), ("alpha", "--alpha"),
                ("dropout", "--dropout"), ("global_batch", "--global-batch"), ("micro_batch", "--micro-batch"),
                ("max_len", "--max-len"), ("warmup_steps", "--warmup-steps"), ("max_steps", "--max-steps"),
                ("template", "--template"), ("val_split", "--val-split"), ("eval_every", "--eval-every")]


def run_dir(runs, name, seed):
    return Path(runs) / f"{name}-s{seed}"


def unit_dir(args, unit):
    return (Path(args.sweep_dir) if unit.group == "sweep" else Path(args.runs_dir)) / unit.run_name


def train_decision(run):
    """'skip' (RUN/summary.json: finished), 'resume' (RUN/checkpoint/ without summary.json) or 'fresh'."""
    run = Path(run)
    if (run / "summary.json").is_file():
        return "skip"
    ckpt = run / "checkpoint"
    if ckpt.is_dir() and any(p.is_file() and not p.name.endswith(".tmp") for p in ckpt.iterdir()):
        return "resume"
    return "fresh"           # (a checkpoint/ holding only a half-written .tmp: nothing to resume from)


NUMBER_OPTS = ["lr", "epochs", "rank", "alpha", "dropout", "global_batch", "micro_batch", "max_len", "warmup_steps",
               "max_steps", "val_split", "seed", "eval_every", "save_every"]


def read_summary(run):
    """RUN/summary.json checked (its numbers are numbers), or None when there is none."""
    path = Path(run) / "summary.json"
    s = read_record(path)
    if s is not None:
        check_numbers(path, s, [k for k in SUMMARY_KEYS if k != "device"])
    return s


def read_config(run):
    """RUN/config.json checked, or None when there is none: an object whose opts is an object with numbers
    where train.py writes numbers, data a list of paths, and fingerprints {name: {bytes, sha256}}. Paths may
    be absolute (older train.py), relative or placeholders: runs are identified by the fingerprints."""
    path = Path(run) / "config.json"
    cfg = read_record(path)
    if cfg is None:
        return None
    opts = cfg.get("opts")
    if opts is None:
        return None                         # not a run's record (yet): nothing to table or compare
    if not isinstance(opts, dict):
        raise StepFailed(f"{path}: field opts is {type(opts).__name__}, not an object; restore the file or move "
                         f"the run folder away")
    check_numbers(path, opts, NUMBER_OPTS, "opts.")
    data = opts.get("data")
    if data is not None and not (isinstance(data, list) and all(isinstance(d, str) for d in data)):
        raise StepFailed(f"{path}: field opts.data is {data!r}, not a list of file paths")
    for key in ("data_fingerprints", "model_fingerprints"):
        fps = cfg.get(key)
        if fps is None:
            continue
        if not isinstance(fps, dict) or not all(isinstance(f, dict) and is_number(f.get("bytes"))
                                                and isinstance(f.get("sha256"), str) for f in fps.values()):
            raise StepFailed(f"{path}: field {key} is not {{file: {{bytes, sha256}}}}; restore the file or move "
                             f"the run folder away")
    return cfg


def train_summary(run):
    s = read_summary(run) or {}
    out = {k: s.get(k) for k in SUMMARY_KEYS}
    jobs = read_record(Path(run) / JOBS_FILE) or {}
    check_numbers(Path(run) / JOBS_FILE, jobs, ["concurrent_jobs"])
    out["concurrent_jobs"] = jobs.get("concurrent_jobs") or 1
    return out


def recipe_of(run):
    cfg = read_config(run)
    if cfg is None:
        return None
    opts = cfg["opts"]
    out = {k: opts.get(k) for k in RECIPE_KEYS if k in opts}
    if "train_rows" in cfg:
        out["train_rows"] = cfg["train_rows"]
    return out


# ------------------------------------------------------------------ claims: what a table says a run is

def recipe_values(args, overrides=None):
    """The effective recipe: the preset's flags, the CLI's overrides, then the unit's (the sweep's)."""
    vals = dict(args.recipe.flags)
    vals.update({k: v for k, v in (args.recipe_overrides or {}).items() if v is not None})
    vals.update(overrides or {})
    return vals


def recipe_argv(args, overrides=None):
    vals = recipe_values(args, overrides)
    argv = []
    for key, flag in RECIPE_ORDER:
        v = vals.get(key)
        if v is None:
            continue
        argv += [flag, str(int(v)) if isinstance(v, float) and v.is_integer() and flag != "--lr" else str(v)]
    return argv + (shlex.split(args.train_extra) if args.train_extra else [])


def claim(args, unit):
    """The config.json opts a run of `unit` must have recorded to be tabled as it."""
    method, echo, extra, _ = METHODS[unit.name]
    vals = recipe_values(args, unit.overrides)
    want = {k: vals[k] for k in CLAIM_KEYS if vals.get(k) is not None}
    want.update(method=method, echo=echo, seed=unit.seed)
    want.update(extra_opts(extra + (shlex.split(args.train_extra) if args.train_extra else [])))
    return want


def _same(a, b):
    if isinstance(b, bool) or isinstance(a, bool):
        return bool(a) == bool(b)
    if isinstance(b, (int, float)) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)):
        return [str(x) for x in a] == [str(x) for x in b]
    return a == b


@functools.lru_cache(maxsize=64)
def _fingerprint(path, mtime_ns, size):
    return fingerprint(path)


def model_differs(cfg, model):
    """The reason config.json's model_fingerprints are not model's files (None: same, or nothing to compare:
    older records name the model by path only, and paths differ between machines)."""
    fps = cfg.get("model_fingerprints")
    if not fps or model is None or not Path(model).is_dir():
        return None
    for name, want in fps.items():
        f = Path(model) / name
        st = f.stat() if f.is_file() else None
        if st is None or _fingerprint(str(f), st.st_mtime_ns, st.st_size) != want:
            return f"model {name} differs from --model's"
    return None


def check_record(run, want, data, model=None):
    """None when RUN/config.json records the claimed recipe (`want`) and data (`data`: {"names": [...],
    "fingerprints": [{"bytes", "sha256"}, ...] or None}) and model (a folder: by its files' fingerprints when
    config.json records them); else a short reason. Data are compared by content (config.json's
    data_fingerprints, written by train.py) where both sides have it, else by file name."""
    cfg = read_config(run)
    if cfg is None:
        return "no config.json"
    opts = cfg["opts"]
    why = model_differs(cfg, model)
    if why:
        return why
    for k, v in want.items():
        if k not in opts and k.startswith("echo_") and not want.get("echo"):
            continue
        if not _same(opts.get(k), v):
            return f"{k} {opts.get(k)!r} ≠ {v!r}"
    fps = cfg.get("data_fingerprints")
    if isinstance(fps, dict) and data.get("fingerprints"):
        got = [(int(f.get("bytes", -1)), f.get("sha256")) for f in fps.values() if isinstance(f, dict)]
        exp = [(int(f["bytes"]), f["sha256"]) for f in data["fingerprints"]]
        if got != exp:
            return "data fingerprints differ"
        return None
    names = [file_name(f) for f in opts.get("data") or []]
    if names != list(data.get("names") or []):
        return f"data {', '.join(names) or 'none'} ≠ {', '.join(data.get('names') or [])}"
    return None


# ------------------------------------------------------------------ commands

def train_files(data_dir):
    return [Path(data_dir) / t / "train.json" for t in TRAIN_TASKS]


def train_command(args, unit, decision):
    method, echo, extra, _ = METHODS[unit.name]
    cmd = [sys.executable, script("train.py"), "--model", arg_path(args.model), "--data",
           *[arg_path(f) for f in train_files(args.data_dir)], "--method", method]
    cmd += ["--echo"] if echo else []
    cmd += ["--seed", str(unit.seed), *recipe_argv(args, unit.overrides), *extra]
    cmd += ["--out", arg_path(unit_dir(args, unit))]
    if decision == "resume":
        cmd.append("--resume")
    return cmd


def beam_limit(args):
    lim = args.beam_limit
    if args.limit:
        lim = args.limit if lim is None else min(lim, args.limit)
    return lim


def eval_command(args, adapter, decoding, out, force=False):
    """eval.py's command line; force=True (re-evaluating into an existing --out) adds --force, since eval.py
    refuses to overwrite a results file without it. A fresh evaluation never passes --force."""
    cmd = [sys.executable, script("eval.py"), "--model", arg_path(args.model)]
    if adapter is not None:
        cmd += ["--adapter", arg_path(adapter)]
    cmd += ["--data-dir", arg_path(args.data_dir), "--tasks", *TASKS]
    if decoding == "greedy":
        cmd += ["--greedy"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
    else:
        cmd += ["--num-beams", "4", "--max-new-tokens", "32"]
        lim = beam_limit(args)
        if lim:
            cmd += ["--limit", str(lim)]
    if args.eval_batch_size:
        cmd += ["--batch-size", str(args.eval_batch_size)]
    cmd += shlex.split(args.eval_extra) if args.eval_extra else []
    cmd += ["--force"] if force else []
    return cmd + ["--out", arg_path(out)]


def layer_probs_command(args, adapter, out):
    cmd = [sys.executable, script("eval.py"), "--model", arg_path(args.model), "--adapter", arg_path(adapter),
           "--data-dir", arg_path(args.data_dir), "--tasks", *IN_FORMAT, "--layer-probs", str(args.layer_probs),
           "--limit", "0"]
    if args.eval_batch_size:
        cmd += ["--batch-size", str(args.eval_batch_size)]
    return cmd + ["--out", arg_path(out)]


def child_env(args, gpu=None):
    """The environment of a job's train.py / eval.py, or None to inherit this one: under --jobs N each process
    gets few CPU threads (N processes of 16 threads each on a shared host only fight), and under --gpus it sees
    only its job slot's GPU (`gpu`, a CUDA_VISIBLE_DEVICES value)."""
    if args.jobs == 1 and gpu is None:
        return None
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (2 * max(args.jobs, 1)))))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def job_slots(args):
    """The GPU of each of the --jobs slots (CUDA_VISIBLE_DEVICES values), or [None] * jobs without --gpus: slot i
    runs on --gpus[i mod len], so --jobs 8 --gpus 0 1 2 3 puts two runs on each GPU. An id counts among the GPUs
    this process sees, so under CUDA_VISIBLE_DEVICES=4,5 `--gpus 0 1` are the physical 4 and 5."""
    if not args.gpus:
        return [None] * args.jobs
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in seen.split(",")] if seen else [str(i) for i in range(max(args.gpus) + 1)]
    return [names[args.gpus[i % len(args.gpus)]] for i in range(args.jobs)]


def jobs_per_gpu(args):
    """How many runs share one GPU at a time: the speed a run records is shared by this many."""
    return -(-args.jobs // len(set(args.gpus))) if args.gpus else args.jobs


def run_logged(cmd, log, what, dry_run, move_to=None, env=None):
    """Run cmd with stdout+stderr appended to log; a failure is a one-line StepFailed. With move_to, the
    log is appended to move_to afterwards (when move_to's folder exists) and removed."""
    print(("would run: " if dry_run else "") + f"[{what}] " + logged_command(cmd), flush=True)
    if dry_run:
        return
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {logged_command(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, **({"env": env} if env else {}))
    if move_to is not None and Path(move_to).parent.is_dir():
        with open(move_to, "a") as f:
            f.write(log.read_text())
        log.unlink()
        log = Path(move_to)
    if code != 0:
        raise StepFailed(f"{what} failed (exit {code}); see {log}")
    print(f"  [{what}] done in {time.time() - t0:.0f}s (log {log})", flush=True)


def train(args, unit, decision, gpu=None):
    """One training run. train.py refuses an --out that holds anything unless --resume / --force, so a
    fresh run logs beside its folder (RUNS/<run>.train.log) and the log moves to RUN/train.log when
    train.py has made the folder; a folder holding a run that died before its first checkpoint is
    restarted with --force (train.py then clears only its own files)."""
    rd = unit_dir(args, unit)
    what = f"train {unit.run_name}"
    cmd = train_command(args, unit, decision)
    env = child_env(args, gpu)
    if decision == "resume":
        return run_logged(cmd, rd / "train.log", what + " (resume)", args.dry_run, env=env)
    log = rd.parent / f"{rd.name}.train.log"
    if rd.is_dir() and not args.dry_run and (rd / "train.log").is_file():     # an earlier failed attempt's log
        with open(log, "a") as f:
            f.write((rd / "train.log").read_text())
        (rd / "train.log").unlink()
    if rd.is_dir() and not any(p.name != "train.log" for p in rd.iterdir()):
        if not args.dry_run:
            rd.rmdir()                               # an empty folder left by an earlier attempt
    elif rd.is_dir():
        cmd.append("--force")
        what += " (restart: no checkpoint yet)"
    run_logged(cmd, log, what, args.dry_run, move_to=rd / "train.log", env=env)


def _newest(folder):
    """Latest modification time of the files in folder (0 if none)."""
    times = [f.stat().st_mtime for f in Path(folder).glob("*") if f.is_file()] if Path(folder).is_dir() else []
    return max(times, default=0.0)


def ensure_eval(args, adapter, decoding, what, gpu=None):
    out = eval_file(adapter if adapter is not None else Path(args.runs_dir) / "base", decoding)
    wanted = args.limit if decoding == "greedy" else beam_limit(args)
    res = eval_results_path(out)
    again = False
    if res is not None:
        check_eval_limit(out, wanted, what)
        if adapter is not None and _newest(Path(adapter) / "adapter") > res.stat().st_mtime:
            print(f"[{what}] {out} is older than {Path(adapter) / 'adapter'}: evaluating again")
            again = True
        else:
            print(f"[{what}] kept {out}")
            compact_predictions(res)
            return
    if adapter is not None and not (Path(adapter) / "adapter").is_dir() and not args.dry_run:
        raise StepFailed(f"{what}: {adapter} keeps no adapter/ to evaluate (adapters are not committed); delete "
                         f"its summary.json to train it again")           # asked for, not made: a failure
    run_logged(eval_command(args, adapter, decoding, out, force=again), out.with_suffix(".log"), what, args.dry_run,
               env=child_env(args, gpu))
    if not args.dry_run and eval_results_path(out):
        compact_predictions(eval_results_path(out))


def status(args, unit):
    """'finished' / 'resume' / 'fresh', or 'mismatch: <reason>' for a finished folder whose record is not
    what this queue claims (it is neither retrained over nor tabled)."""
    rd = unit_dir(args, unit)
    decision = train_decision(rd)
    if decision == "skip":
        why = check_record(rd, claim(args, unit), args.data_claim, args.model) if (rd / "config.json").is_file() \
            else None
        return f"mismatch: {why}" if why else "finished"
    return decision


def run_one(args, unit, gpu=None):
    """Train one unit unless finished, then its evaluations (missing ones only), on `gpu` (child_env)."""
    rd = unit_dir(args, unit)
    state = status(args, unit)
    if state.startswith("mismatch"):             # a failure: the caller asked for this run and gets none
        why = (f"train {unit.run_name}: {rd} holds another run ({state[10:]}): not tabled; move it away to train "
               f"this one")
        if args.dry_run:
            return print(f"would fail: {why}", flush=True)
        raise StepFailed(why)
    if state == "finished":
        print(f"[train {unit.run_name}] finished ({rd / 'summary.json'}): skipped")
    else:
        train(args, unit, state, gpu)
        if not args.dry_run:
            write_atomic(rd / JOBS_FILE, json.dumps({"concurrent_jobs": jobs_per_gpu(args)}) + "\n")
    for decoding in unit.evals:
        if decoding == "beam4" and not args.run_beam:
            continue
        ensure_eval(args, rd, decoding, f"eval {unit.run_name} {decoding}", gpu)


def run_all(args, units, after_each=None):
    """The units in queue order, --jobs of them at once; after_each() (the tables) after each. A failed
    run does not stop the others; the first failure is raised at the end. Ctrl-C, or any other error,
    starts no further run."""
    lock, failures, stopping = threading.Lock(), [], threading.Event()
    slots = queue.SimpleQueue()                  # a worker takes a free slot's GPU for one unit, then gives it back
    for gpu in job_slots(args):
        slots.put(gpu)

    def one(unit):
        if stopping.is_set():
            return
        gpu = slots.get()
        try:
            run_one(args, unit, gpu)
        except StepFailed as e:
            print(f"error: {e}", flush=True)
            failures.append(e)
        except BaseException:
            stopping.set()                       # before this worker takes the next unit
            raise
        finally:
            slots.put(gpu)
        if not args.dry_run and after_each is not None:
            with lock:
                after_each()

    if args.jobs == 1 or args.dry_run:
        for unit in units:
            one(unit)
    else:
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        try:
            for f in [pool.submit(one, unit) for unit in units]:
                f.result()
        except BaseException:
            stopping.set()                       # the runs in flight got the signal themselves
            pool.shutdown(wait=False, cancel_futures=True)
            for e in failures:
                print(f"error: {e}", file=sys.stderr, flush=True)
            raise
        pool.shutdown()
    if failures:
        raise failures[0]
