"""`python -m experiments.measure_speed`: the real loop against its own step on one GPU; owns results/speed/
real-vs-step-<tag>/ (summary.json, benchmark.jsonl, measured.json). Refuses up front without CUDA.

The real loop against its own step, in one command on one GPU (issue 13's side-by-side):

1. train.py on the real commonsense mix for --steps steps (GPU defaults: micro-batch picked, length
   grouping, whole-step CUDA graphs), into a scratch folder;
2. tests/benchmark.py at the batch shapes that run used (read from its summary.json's steady_by_shape),
   in the same process tree, on the same GPU, right after it;
3. results/speed/real-vs-step-<tag>/{summary.json, benchmark.jsonl}, then experiments/speed_table.py
   rebuilds README's speed tables from them.

    python -m experiments.measure_speed --model models/smollm2 --tag smollm2-lora
    python -m experiments.measure_speed --model models/smollm2 --echo --tag smollm2-echo-lora
    python -m experiments.measure_speed --shape llama3-8b --tokenizer ../shared/tokenizers/llama3 --tag llama3-8b-shape

--shape builds a model folder with random weights (a preset name or a params.json) and the given
tokenizer, for models whose checkpoint is not at hand: the speed of a step does not depend on the
weights' values. No checkpoint falls inside the timed run unless --save-every says so.
"""
import collections
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from model.io import atomic_write, atomic_write_text
from model.load import CliParser, HelpFormatter

from .common import DATA_DIR, RESULTS, ROOT, arg_path, logged_command
from .runs import train_files

SPEED = RESULTS / "speed"
SCRATCH = "<tmp>/measure-speed"      # the run's temporary folder, as measured.json records it


def benchmark_shapes(summary):
    """-> (batch, [seq, ...], answer slots): the steady single-micro-batch shapes of a run, at its most
    common batch size and answer-slot count (the benchmark times one [batch, seq] micro-batch)."""
    single = [(b["micro_batches"][0], b["steps"]) for b in summary["steady_by_shape"] if len(b["micro_batches"]) == 1]
    if not single:
        raise ValueError("the run has no steady single-micro-batch steps to compare (gradient accumulation, "
                         "or too few steps): pass a larger --steps")

    def most_common(i):                      # weighted by steps
        c = collections.Counter()
        for shape, n in single:
            c[shape[i]] += n
        return c.most_common(1)[0][0]
    batch, answer = most_common(0), most_common(2)
    return batch, sorted({s[1] for s, _ in single if s[0] == batch}), answer


def random_model(shape, tokenizer_dir, out):
    """A model folder (params.json, tokenizer, model.safetensors) with random weights."""
    import torch
    from model import ModelArgs
    from model.io import write_ours
    from model.load import build_model
    from model.tokenizer import load_tokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    args = ModelArgs.from_params_json(shape) if Path(shape).is_file() else ModelArgs.from_name(shape)
    args = dataclasses.replace(args, vocab_size=load_tokenizer(out).vocab_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"     # 8B random numbers: seconds on a GPU, minutes on CPU
    model = build_model(args, device, torch.bfloat16)
    model.reset_parameters(std=0.02)
    write_ours(model.state_dict(), args.to_params_json(), out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()          # train.py, a child process, gets the whole GPU
    return out


def run(cmd, log):
    print("+", " ".join(map(str, cmd)), flush=True)
    with open(log, "w") as f:
        code = subprocess.call([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        tail = Path(log).read_text().strip().splitlines()[-1:] or [""]
        sys.exit(f"error: {Path(cmd[1]).name} failed (exit {code}): {tail[0]} (log {log})")


def cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    files = refuse_bad_input(p, a)
    dest = SPEED / f"real-vs-step-{a.tag}"
    scratch = Path(SCRATCH) if a.dry_run else Path(tempfile.mkdtemp(prefix="measure-speed-"))
    model = Path(a.model).absolute() if a.model else scratch / "model"
    train = train_command(a, [f.absolute() for f in files], model, scratch)
    if a.dry_run:
        print(recorded_command(train, scratch))
        return
    if a.shape:
        print(f"random weights: {a.shape} with the tokenizer of {a.tokenizer} -> {model}", flush=True)
        random_model(a.shape, a.tokenizer, model)
    run(train, scratch / "train.log")
    bench = benchmark_at_run_shapes(a, model, scratch)
    write_measured(a, dest, train, scratch, bench)
    run([sys.executable, "-m", "experiments.speed_table"], scratch / "speed_table.log")
    for big in ([scratch / "model"] if a.shape else []) + [scratch / "run" / "checkpoint", scratch / "run" / "adapter"]:
        shutil.rmtree(big, ignore_errors=True)           # a random 8B model is 16 GB; the logs stay
    print(f"wrote {dest} and README's speed tables (the run's logs: {scratch})")


def add_model_flags(p):
    """What a speed tool trains on: a real model folder or a random one of a shape, and the commonsense mix."""
    p.add_argument("--model", help="model folder (real weights)")
    p.add_argument("--shape", help="preset name or params.json: random weights (with --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer folder for --shape")
    p.add_argument("--data-dir", default=arg_path(DATA_DIR),
                   help="the commonsense suite: one TASK/train.json per training task, all trained on at once")


def build_parser():
    p = CliParser(prog="python -m experiments.measure_speed", description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--tag", required=True, help="results/speed/real-vs-step-<tag>/")
    p.add_argument("--echo", action="store_true", help="Echo-LoRA (the benchmark then times routed and unrouted)")
    p.add_argument("--method", default="lora", choices=["lora", "dora"], help="the adapter train.py trains")
    p.add_argument("--steps", type=int, default=600,
                   help="train.py steps to time (the benchmark then times the shapes of the steady ones)")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps inside the timed run (default: none)")
    p.add_argument("--dry-run", action="store_true", help="print the train command and stop")
    # no pass-through of other train.py flags: the benchmark would not see them, and the side-by-side
    # would compare two different steps
    return p


def refuse_bad_input(p, a):
    """Exit with a one-line error before anything runs. -> the train files."""
    if (a.model is None) == (a.shape is None):
        p.error("give --model (a real checkpoint) or --shape (random weights), not both")
    if a.shape and not a.tokenizer:
        p.error("--shape needs --tokenizer (the data are tokenized for real)")
    files = train_files(a.data_dir)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        p.error(f"train file not found: {missing[0]} (--data-dir)")
    if not a.tag.replace("-", "").replace("_", "").replace(".", "").isalnum():
        p.error(f"--tag {a.tag!r}: letters, digits, '-', '_' and '.' only (it names a folder)")
    if not a.dry_run and not cuda_available():
        p.exit(2, "error: measure_speed needs a CUDA GPU (none is visible here): it times the GPU loop; "
                  "--dry-run prints the command\n")
    return files


def train_command(a, files, model, scratch):
    """train.py's command line; it runs in ROOT, so its paths are absolute (main) wherever this was started."""
    return [sys.executable, ROOT / "train.py", "--model", model, "--data", *files, "--method", a.method,
            "--max-steps", a.steps, "--save-every", a.save_every or a.steps + 1, "--out", scratch / "run",
            *(["--echo"] if a.echo else [])]      # only what the benchmark is also given: the two must match


def benchmark_at_run_shapes(a, model, scratch):
    """tests/benchmark.py at the shapes the train run used. -> its JSONL."""
    summary = json.loads((scratch / "run" / "summary.json").read_text())
    try:
        batch, seqs, answer = benchmark_shapes(summary)
    except ValueError as e:
        sys.exit(f"error: {e}")
    bench = scratch / "benchmark.jsonl"
    run([sys.executable, ROOT / "tests" / "benchmark.py", "--model", model, "--method", a.method, "--echo",
         *(["routed", "unrouted"] if a.echo else ["off"]), "--graphs", "step", "--batch", batch, "--seq", *seqs,
         "--answer", answer, "--json", bench], scratch / "benchmark.log")
    return bench


def recorded_command(cmd, scratch):
    """A command line as measured.json records it: `python`, paths relative to the working folder (arg_path),
    the temporary folder as <tmp>/measure-speed: no absolute path of the machine that measured."""
    shown = [str(c).replace(str(scratch), SCRATCH, 1) if str(c).startswith(str(scratch)) else arg_path(c)
             for c in cmd[1:]]
    return logged_command([cmd[0], *shown])


def write_measured(a, dest, train, scratch, bench):
    """results/speed/real-vs-step-<tag>/: measured.json (how it was made), summary.json, benchmark.jsonl, each
    written atomically (a full disk leaves the old file, and names the path: model.io.atomic_write)."""
    measured = {"weights": "random" if a.shape else "real", "model": a.shape or Path(a.model).name,
                "tokenizer": Path(a.tokenizer).name if a.tokenizer else None, "steps": a.steps,
                "save_every": a.save_every, "train_command": recorded_command(train, scratch)}
    atomic_write_text(dest / "measured.json", json.dumps(measured, indent=2) + "\n")
    for source, name in ((scratch / "run" / "summary.json", "summary.json"), (bench, "benchmark.jsonl")):
        atomic_write(dest / name, lambda tmp: shutil.copyfile(source, tmp))


if __name__ == "__main__":
    main()
