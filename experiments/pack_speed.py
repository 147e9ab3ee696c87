"""`python -m experiments.pack_speed`: train.py with `--pack` against without, side by side on one GPU (issue 30);
owns results/speed/pack-vs-padded-<tag>/ (measured.json, padded-summary.json, packed-summary.json) and
results/pack-speed-table.md, spliced into docs/packing.md. Refuses up front without CUDA.

1. train.py on the real commonsense mix for --steps steps, padded, into a scratch folder;
2. the same command plus `--pack`, right after it, on the same GPU. Both run at train.py's GPU defaults, as a
   user would run them: the padded run replays whole-step CUDA graphs, the packed run resolves
   `--cuda-graphs auto` to off (docs/packing.md). `--dropout 0`, so both take the same steps on the same loss;
   `--save-every` past the last step, so no checkpoint falls inside the timed steps;
3. results/speed/pack-vs-padded-<tag>/ (both summary.json and how they were made), then the table of every
   such folder: non-padding tokens/s of each, their ratio, the padding share of each, peak memory.

    python -m experiments.pack_speed --model ../smollm2 --tag smollm2-lora
    python -m experiments.pack_speed --model ../smollm2 --echo --tag smollm2-echo-lora
    python -m experiments.pack_speed --shape llama3-8b --tokenizer ../shared/tokenizers/llama3 --steps 100 \
        --tag llama3-8b-shape-lora
    python -m experiments.pack_speed --model ../smollm2 --tag x --dry-run      # the two commands, nothing run
    python -m experiments.pack_speed --only-table                              # the table from the records

--shape builds a model folder with random weights (a preset name or a params.json) and the given tokenizer:
the speed of a step does not depend on the weights' values (experiments.measure_speed.random_model).
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

from model.io import atomic_write, atomic_write_text
from model.load import CliParser, HelpFormatter

from .common import (RESULTS, ROOT, StepFailed, committed, official_pair, arg_path, is_number, logged_command,
                     read_metrics, shown_path, write_atomic)
from .measure_speed import add_model_flags, cuda_available, random_model, run
from .runs import train_files
from .speed_table import read_record, rows_of
from .tables import publish_fragment

HERE = RESULTS                      # results/: records in HERE/speed/pack-vs-padded-*/, table HERE/pack-speed-table.md
FOLDER = "pack-vs-padded-"
SCRATCH = "<tmp>/pack-speed"        # the runs' temporary folder, as measured.json records it
LAYOUTS = ("padded", "packed")      # the two runs, in the order they run; the packed one adds --pack
RUN_FIELDS = ("method", "echo", "device", "steps", "micro_batch")   # of each summary.json; the first 4 must agree


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.only_table:
            refuse_table_flags(p, a)
            print(publish_table(a.speed_dir, a.out))
            return
        files = refuse_bad_input(p, a)
        measure(a, files)
    except StepFailed as e:
        sys.exit(f"error: {e}")
    except OSError as e:                  # a failed atomic write: model.io.write_failed names the path
        sys.exit(f"error: {e.strerror or e}")


def build_parser():
    p = CliParser(prog="python -m experiments.pack_speed", description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--tag", help="names the record folder results/speed/pack-vs-padded-<tag>/ (required to measure)")
    p.add_argument("--echo", action="store_true", help="Echo-LoRA in both runs")
    p.add_argument("--method", default="lora", choices=["lora", "dora"], help="the adapter both runs train")
    p.add_argument("--steps", type=int, default=300, help="train.py steps of each run")
    p.add_argument("--pack-attention", default="sdpa", choices=["sdpa", "flex"],
                   help="the packed run's attention kernel (train.py --pack-attention)")
    p.add_argument("--pack-layout", default="rows", choices=["rows", "flat"],
                   help="the packed run's layout (train.py --pack-layout; flat needs flex)")
    p.add_argument("--dry-run", action="store_true", help="print the two train commands and stop (no CUDA needed)")
    p.add_argument("--only-table", action="store_true",
                   help="only rebuild the table from the records (no CUDA needed)")
    p.add_argument("--speed-dir", default=None,
                   help="with --only-table: the folder of the pack-vs-padded-*/ records (default: results/speed)")
    p.add_argument("--out", default=None,
                   help="with --only-table: the table's file; docs/packing.md is rewritten only at the default, "
                        "from the default --speed-dir (default: results/pack-speed-table.md)")
    # no pass-through of other train.py flags: the two runs differ in --pack (and how it packs) alone
    return p


def refuse_table_flags(p, a):
    given = [f for f, v in (("--model", a.model), ("--shape", a.shape), ("--tag", a.tag), ("--echo", a.echo),
                            ("--dry-run", a.dry_run)) if v]
    if given:
        p.error(f"--only-table reads the records and runs nothing: drop {given[0]}")


def refuse_bad_input(p, a):
    """Exit with a one-line error before anything runs. -> the train files."""
    if a.speed_dir is not None or a.out is not None:
        p.error("--speed-dir and --out go with --only-table (a measurement writes results/speed/ and its table)")
    if (a.model is None) == (a.shape is None):
        p.error("give --model (a real checkpoint) or --shape (random weights), not both")
    if a.shape and not a.tokenizer:
        p.error("--shape needs --tokenizer (the data are tokenized for real)")
    if not a.tag:
        p.error("--tag is required: it names results/speed/pack-vs-padded-<tag>/")
    if not a.tag.replace("-", "").replace("_", "").replace(".", "").isalnum():
        p.error(f"--tag {a.tag!r}: letters, digits, '-', '_' and '.' only (it names a folder)")
    if a.steps < 20:
        p.error(f"--steps {a.steps}: too few to time (each new batch shape's first step is warm-up); give >= 20")
    if a.model and not a.dry_run and not Path(a.model).is_dir():
        p.error(f"--model {a.model}: not a folder (give a model folder, or --shape for random weights)")
    if a.tokenizer and not Path(a.tokenizer).is_dir():
        p.error(f"--tokenizer {a.tokenizer}: not a folder")
    files = train_files(a.data_dir)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        p.error(f"train file not found: {missing[0]} (--data-dir)")
    if not a.dry_run and not cuda_available():
        p.exit(2, "error: pack_speed needs a CUDA GPU (none is visible here): it times the GPU loop; "
                  "--dry-run prints the commands, --only-table rebuilds the table\n")
    return files


def measure(a, files):
    """Both runs, then the records and the table."""
    dest = HERE / "speed" / f"{FOLDER}{a.tag}"
    scratch = Path(SCRATCH) if a.dry_run else Path(tempfile.mkdtemp(prefix="pack-speed-"))
    model = Path(a.model).absolute() if a.model else scratch / "model"
    commands = {k: train_command(a, [f.absolute() for f in files], model, scratch, k) for k in LAYOUTS}
    if a.dry_run:
        for k in LAYOUTS:
            print(f"{k}: {recorded_command(commands[k], scratch)}")
        return
    big = [scratch / k / d for k in LAYOUTS for d in ("checkpoint", "adapter")] + ([model] if a.shape else [])
    try:
        if a.shape:
            print(f"random weights: {a.shape} with the tokenizer of {a.tokenizer} -> {model}", flush=True)
            random_model(a.shape, a.tokenizer, model)
        for k in LAYOUTS:
            run(commands[k], scratch / f"{k}.log")
    finally:
        for f in big:
            shutil.rmtree(f, ignore_errors=True)     # a random 8B model is 16 GB, also after a failure; logs stay
    write_measured(a, dest, commands, scratch)
    publish_table()
    print(f"wrote {shown_path(dest)} and {shown_path(HERE / 'pack-speed-table.md')} (the runs' logs: {scratch})")


def train_command(a, files, model, scratch, layout):
    """train.py's command line for one layout; it runs in ROOT, so its paths are absolute (measure)."""
    return [sys.executable, ROOT / "train.py", "--model", model, "--data", *files, "--method", a.method,
            "--max-steps", a.steps, "--dropout", 0, "--seed", 0, "--save-every", a.steps + 1,
            "--out", scratch / layout, *(["--echo"] if a.echo else []), *(packed_flags(a) if layout == "packed" else [])]


def packed_flags(a):
    """--pack, and how it packs when that is not train.py's default (so a default command reads as before)."""
    return ["--pack", *(["--pack-attention", a.pack_attention] if a.pack_attention != "sdpa" else []),
            *(["--pack-layout", a.pack_layout] if a.pack_layout != "rows" else [])]


def recorded_command(cmd, scratch):
    """A command line as measured.json records it: `python`, paths relative to the working folder (arg_path), the
    scratch folder as <tmp>/pack-speed, any other path as train.py's config.json writes one outside the project
    (<outside the repository>/FOLDER/NAME): no absolute path of the machine that measured."""
    shown = [SCRATCH + str(c)[len(str(scratch)):] if str(c).startswith(str(scratch)) else arg_path(c)
             for c in cmd[1:]]
    shown = ["<outside the repository>/" + "/".join(Path(c).parts[-2:]) if Path(c).is_absolute() else c
             for c in shown]
    return logged_command([cmd[0], *shown])


def loss_agreement(scratch):
    """How far apart the two runs' per-step losses lie ({"steps", "max_abs_diff"}; None without common steps):
    with --dropout 0 they take the same steps on the same loss, up to the rounding of bf16 in two layouts."""
    losses = [{r["step"]: r["loss"] for r in read_metrics(scratch / k / "metrics.jsonl")
               if is_number(r.get("loss"))} for k in LAYOUTS]
    steps = sorted(set(losses[0]) & set(losses[1]))
    if not steps:
        return None
    return {"steps": len(steps), "max_abs_diff": round(max(abs(losses[0][s] - losses[1][s]) for s in steps), 6)}


def write_measured(a, dest, commands, scratch):
    """results/speed/pack-vs-padded-<tag>/: padded-summary.json and packed-summary.json (each run's summary.json)
    and measured.json (how they were made), each written atomically (model.io.atomic_write names the path)."""
    summaries = {k: read_record(scratch / k / "summary.json") for k in LAYOUTS}
    measured = {"weights": "random" if a.shape else "real", "model": a.shape or Path(a.model).name,
                "tokenizer": Path(a.tokenizer).name if a.tokenizer else None, "method": a.method, "echo": a.echo,
                "steps": a.steps, "device": summaries["padded"].get("device"),
                "defaults": "both runs at train.py's GPU defaults (compiled; micro-batch picked); --cuda-graphs auto "
                            "resolves to step for the padded run and to off for the packed one",
                "cuda_graphs": {"padded": "step", "packed": "off"},
                "packed_as": {"attention": a.pack_attention, "layout": a.pack_layout},
                "loss_agreement": loss_agreement(scratch),
                "train_commands": {k: recorded_command(commands[k], scratch) for k in LAYOUTS}}
    atomic_write_text(dest / "measured.json", json.dumps(measured, indent=2) + "\n")
    for k in LAYOUTS:
        atomic_write(dest / f"{k}-summary.json", lambda tmp, k=k: shutil.copyfile(scratch / k / "summary.json", tmp))


# ------------------------------------------------------------------ the table

def numbers(path, record, keys):
    """record[k] for k in keys, each a positive number; else a StepFailed naming the file and the field."""
    for k in keys:
        v = record.get(k)
        if not is_number(v) or v <= 0:
            why = "a CPU run? the table holds GPU runs" if k == "peak_gib" else "no steady steps? give more --steps"
            raise StepFailed(f"{path}: field {k} is {v!r}, not a positive number ({why}); restore the file or "
                             f"measure again")
    return [record[k] for k in keys]


def fields(path, record, keys):
    """record[k] for k in keys; a missing one is a StepFailed naming the file and the field."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise StepFailed(f"{path}: field {missing[0]!r} is missing; restore the file or measure again")
    return [record[k] for k in keys]


def one_row(d):
    """The table row of one pack-vs-padded-* folder; a missing, damaged or mismatched file is a StepFailed."""
    m = read_record(d / "measured.json")
    model, weights = fields(d / "measured.json", m, ("model", "weights"))
    agree = m.get("loss_agreement")
    tps, padded, peak, meta = {}, {}, {}, {}
    for k in LAYOUTS:
        f = d / f"{k}-summary.json"
        s = read_record(f)
        tps[k], padded[k], peak[k] = numbers(f, s, ("tokens_per_s", "padded_tokens_per_s", "peak_gib"))
        if tps[k] > padded[k]:
            raise StepFailed(f"{f}: tokens_per_s {tps[k]} exceeds padded_tokens_per_s {padded[k]}")
        meta[k] = dict(zip(RUN_FIELDS, fields(f, s, RUN_FIELDS)))
    for field in RUN_FIELDS[:4]:
        if meta["padded"][field] != meta["packed"][field]:
            raise StepFailed(f"{d}: the padded and packed summaries differ in {field} ({meta['padded'][field]!r} "
                             f"against {meta['packed'][field]!r}): not one side-by-side measurement; measure again")
    pad = {k: 100 * (1 - tps[k] / padded[k]) for k in LAYOUTS}
    mb = [meta[k]["micro_batch"] for k in LAYOUTS]
    r = meta["padded"]
    loss = f"{agree['max_abs_diff']:.2g} ({agree['steps']} steps)" if isinstance(agree, dict) else "—"
    how = m.get("packed_as") or {"attention": "sdpa", "layout": "rows"}     # records from before the option
    return rows_of(d / "measured.json", lambda: (
        f"| {d.name[len(FOLDER):]} | {model} ({weights}) | {r['method']}{' + Echo' if r['echo'] else ''} | "
        f"{how['layout']}, {how['attention']} | {r['device']} | {r['steps']} | "
        f"{mb[0] if mb[0] == mb[1] else f'{mb[0]} / {mb[1]}'} | "
        f"{tps['padded']:,.0f} | {tps['packed']:,.0f} | **{tps['packed'] / tps['padded']:.2f}×** | "
        f"{pad['padded']:.1f} % | {pad['packed']:.1f} % | {peak['padded']:.2f} | {peak['packed']:.2f} | {loss} |"))


def table(speed=None):
    """The markdown fragment: one row per results/speed/pack-vs-padded-*/ folder (one line when there is none)."""
    dirs = sorted(d for d in Path(speed or HERE / "speed").glob(FOLDER + "*") if d.is_dir())
    L = ["<!-- generated by python -m experiments.pack_speed from results/speed/pack-vs-padded-*/: do not edit -->"]
    if not dirs:
        return "\n".join(L + ["No measurement yet: the table fills in once a GPU sitting has run "
                              "`python -m experiments.pack_speed` (no record in results/speed/pack-vs-padded-*/)."]) + "\n"
    L += ["`python -m experiments.pack_speed`: train.py padded, then with `--pack`, one after the other on one GPU, "
          "the same flags otherwise (`--dropout 0 --seed 0`, the 5-train-set commonsense mix, each at its GPU "
          "defaults: the padded run replays whole-step CUDA graphs, the packed one runs without graphs). *tok/s* "
          "counts non-padding tokens over the steps after warm-up (each run's summary.json); *padding* = 1 − "
          "non-padding / processed tokens; *peak GiB* includes each shape's first, uncaptured step; "
          "*max |Δ loss|*: the two runs' per-step losses (bf16):", "",
          "| tag | model (weights) | method | packed as | device | steps | micro-batch | tok/s padded | tok/s packed | "
          "packed / padded | padding padded | padding packed | peak GiB padded | peak GiB packed | max \\|Δ loss\\| |",
          "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(L + [one_row(d) for d in dirs]) + "\n"


def publish_table(speed=None, out=None):
    """Write the table to out. The committed fragment (results/pack-speed-table.md, spliced into docs/packing.md)
    is written only from the committed records, as experiments.speed_table does. -> the table."""
    official_speed, official_out = HERE / "speed", HERE / "pack-speed-table.md"
    speed, out = Path(speed or official_speed), Path(out or official_out)
    official = official_pair(speed, out, official_speed, official_out)
    text = table(speed)
    if official and committed(out):              # (a test's HERE elsewhere: a plain write)
        publish_fragment(text, out)              # and docs/packing.md between its markers
    else:
        write_atomic(out, text)
    return text


if __name__ == "__main__":
    main()
