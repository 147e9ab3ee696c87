"""`python -m experiments.reproduce`: the small-scale reproduction in one resumable command — train and evaluate
what is missing (in priority order, --jobs at once), then rebuild every table and figure from the run records.

    python -m experiments.reproduce --model models/smollm2 --jobs 4          # the paper's recipe: the whole queue
    python -m experiments.reproduce --model models/smollm2 --dry-run         # print the queue and its state
    python -m experiments.reproduce --only-table                             # rebuild JSON + tables, run nothing
    python -m experiments.reproduce --model M --only seed0 ablation --max-runs 6     # a subset this sitting
    python -m experiments.reproduce --model M --only seed1 seed2 ablation --jobs 8 --gpus 0 1 2 3   # 2 per GPU
    python -m experiments.reproduce --recipe 1epoch-lr1e-3 --only-table      # the earlier 1-epoch recipe

Queue of the paper recipe (3 epochs, lr 2e-4, train.py's defaults, --val-split 0.02): seed 0 of LoRA,
Echo-LoRA, DoRA and Echo-DoRA (greedy on the full 8 test sets + beam 4 on the first 500), the ablations A-1…A-8
(seed 0, greedy), the capacity probes (training only), the validation sweep (epochs {1,3} x lr {2e-4,1e-3},
LoRA seed 0), seeds 1 and 2 of the 4 methods, then seeds 1-2 of any ablation whose seed-0 Δ against full
Echo-LoRA exceeds the main runs' seed-to-seed sd. A finished run (RUN/summary.json) is skipped, a run with a
checkpoint resumes (train.py --resume), an evaluation that exists is kept. A run folder is tabled only when its
config.json records the recipe and data the table claims.

With a --runs-dir of your own, the results JSON and tables are written beside it (<runs-dir>-results.json,
<runs-dir>-table.md) and README.md is not touched, unless --results / --table say otherwise.
"""
import os
import sys
from pathlib import Path

from model.load import CliParser, HelpFormatter
from model.rundir import run_path

from . import analysis, figures
from .collect import collect, write_json
from .common import (DATA_DIR, ROOT, StepFailed, committed, file_name, fingerprint, read_record, refuse_trial,
                     shown_path, write_atomic)
from .recipes import (DEFAULT_RECIPE, MAIN_METHODS, MAIN_SEEDS, METHODS, RECIPES, Unit, main_units, plan,
                      select)
from .runs import (beam_limit, claim, check_record, ensure_eval, layer_probs_command, read_config, recipe_values,
                   run_all, run_logged, status, train_files, unit_dir)
from .findings import main as write_findings
from .tables import build_table, splice_into_readme
from .tables_paper import (ablation_tables, cost_sentence, diagnostics_note, legacy_sweep_table, power_sentence,
                           probe_table, sweep_table)

RECIPE_FLAGS = {"lr": float, "epochs": float, "rank": int, "alpha": float, "dropout": float, "global_batch": int,
                "micro_batch": int, "max_len": int, "warmup_steps": int, "max_steps": int, "template": str,
                "val_split": float}                                      # the train.py flags a recipe sets


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        resolve(args)
    except StepFailed as e:
        p.exit(2, f"error: {e}\n")
    return args


def build_parser():
    p = CliParser(prog="python -m experiments.reproduce", description=__doc__, formatter_class=HelpFormatter)
    _add_queue_flags(p.add_argument)
    g = p.add_argument_group("recipe (train.py flags; default: the --recipe's value, "
                             "paper = " + ", ".join(f"{k} {v:g}" for k, v in RECIPES["paper"].flags.items()) + ")")
    for k, kind in RECIPE_FLAGS.items():
        g.add_argument("--" + k.replace("_", "-"), type=kind, default=None,
                       help=f"train.py --{k.replace('_', '-')} (default: the recipe's value, above)")
    g.add_argument("--train-extra", default=None, help="more train.py flags, one quoted string (default: none)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-batch-size", type=int, default=None, help="eval.py --batch-size (default: eval.py's)")
    e.add_argument("--eval-extra", default=None, help="more eval.py flags, one quoted string (default: none)")
    o = p.add_argument_group("outputs")
    o.add_argument("--results", "--json", dest="json", default=None,
                   help="results JSON (default: the recipe's under results/, or beside a --runs-dir of your own)")
    o.add_argument("--table", default=None, help="README fragment (spliced into README.md only at its default)")
    o.add_argument("--layer-png", default=None, help="default: beside the results JSON")
    o.add_argument("--layer-csv", default=None, help="default: beside the results JSON")
    return p


def _add_queue_flags(a):
    """The recipe, the model and data, which runs to make and how many at once."""
    a("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
      help="paper: 3 epochs, lr 2e-4 (+ ablations, probes, sweep); 1epoch-lr1e-3: the earlier recipe")
    a("--model", help="Meta-layout model folder (see ../shared/tools/gguf_to_meta.py); required unless "
                      "--only-table (default there: the one the runs' config.json record)")
    a("--data-dir", default=os.path.relpath(DATA_DIR),
      help="folder with <task>/train.json and <task>/test.json")
    a("--methods", nargs="+", default=None, choices=list(METHODS),
      help="train just these x --seeds (default: the recipe's queue)")
    a("--seeds", nargs="+", type=int, default=None, help="with --methods (default 0 1 2)")
    a("--only", nargs="+", default=None, metavar="NAME",
      help="a subset of the queue: run folders (lora-s0, A-3-s0), methods/variants (A-3), groups (main, "
           "ablation, probe, sweep) or seed<N> (default: the whole queue)")
    a("--max-runs", type=int, default=None,
      help="train at most N unfinished runs of the queue this sitting (default: no limit)")
    a("--runs-dir", default=None, help="run folders (default: the recipe's committed folder under results/)")
    a("--sweep-lr", nargs="+", type=float, default=None, metavar="LR",
      help="the earlier 1-epoch lr sweep: train LoRA (seed 0) at each LR and tabulate validation only "
           "(default: no sweep)")
    a("--only-table", action="store_true", help="rebuild the JSON and the tables from existing files; run nothing")
    a("--dry-run", action="store_true", help="print the queue, each run's state and the commands; write nothing")
    a("--jobs", type=int, default=1, help="runs trained and evaluated at once (on one GPU they share it, so "
                                          "their recorded speed is not a benchmark; the table says so)")
    a("--gpus", type=int, nargs="+", default=None, metavar="ID",
      help="spread the --jobs over these GPUs: job slot i runs on GPU ID[i mod len] (CUDA_VISIBLE_DEVICES of its "
           "train.py and eval.py), e.g. --jobs 8 --gpus 0 1 2 3 for two runs per GPU (default: every job sees what "
           "this process sees)")
    a("--beam-limit", default="500", help="published-protocol eval (seed 0) on the first N examples per task; "
                                          "'all' = full test sets, 0 = skip it")
    a("--limit", type=int, default=None, help="smoke test: evaluate the first N examples per task (also caps "
                                              "training at N steps unless --max-steps is given; default: full "
                                              "test sets)")
    a("--layer-probs", type=int, default=None, metavar="N",
      help="also the per-layer answer probability of seed-0 lora and echo-lora on N examples per task "
           "(default: not measured)")


def resolve(args):
    """Fill the paths and the recipe from --recipe / --runs-dir, and refuse bad inputs before anything runs."""
    _resolve_outputs(args, RECIPES[args.recipe])
    _resolve_model(args)
    _resolve_beam_limit(args)
    for flag, v in (("--jobs", args.jobs), ("--limit", args.limit), ("--max-runs", args.max_runs)):
        if v is not None and v < 1:
            raise StepFailed(f"{flag} must be >= 1")
    _resolve_gpus(args)
    if args.limit and args.max_steps is None:
        args.max_steps = args.limit
    args.recipe_overrides = {k: getattr(args, k) for k in RECIPE_FLAGS}
    if args.methods is not None or args.seeds is not None:
        args.methods = list(dict.fromkeys(args.methods or MAIN_METHODS))
        args.seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else MAIN_SEEDS))
    args.data_claim = data_claim(args)


def _resolve_gpus(args):
    """--gpus: ids of GPUs this process sees, checked before any run starts (a typo would put every run on one
    GPU, or fail each one after its model load)."""
    if not args.gpus:
        return
    import torch
    count = torch.cuda.device_count()
    for g in args.gpus:
        if not 0 <= g < count:
            raise StepFailed(f"--gpus {g}: this machine shows {count} CUDA GPU{'s' * (count != 1)}"
                             + (f" (ids 0-{count - 1})" if count else "") + "; give ids among those")


def _resolve_outputs(args, rec):
    """args.recipe, the runs and sweep folders, and every output path: the recipe's own at its own runs
    folder, else beside a --runs-dir of your own (so a trial run never overwrites the committed results)."""
    args.recipe = rec
    default_runs = args.runs_dir is None or Path(args.runs_dir).resolve() == rec.runs.resolve()
    args.runs_dir = os.path.relpath(rec.runs) if args.runs_dir is None else args.runs_dir
    runs = Path(args.runs_dir)
    if runs.exists() and not runs.is_dir():
        raise StepFailed(f"--runs-dir {runs} is a file, not a folder")
    if default_runs:
        args.sweep_dir, json_default, table_default = rec.sweep, rec.json, rec.table
    else:
        args.sweep_dir = runs.parent / f"{runs.name}-sweep"
        json_default, table_default = runs.parent / f"{runs.name}-results.json", runs.parent / f"{runs.name}-table.md"
    args.json = args.json or str(json_default)
    args.table = args.table or str(table_default)
    for flag, path in (("--results", args.json), ("--table", args.table)):
        if Path(path).is_dir():
            raise StepFailed(f"{flag} {path} is a folder; give a file name")
        if not default_runs and committed(path):
            refuse_trial(path, f"--runs-dir {args.runs_dir} is not the recipe's {shown_path(rec.runs)}",
                         f"give {flag} a file of your own (or leave it out: beside --runs-dir)")
    args.splice = Path(args.table).resolve() == rec.table.resolve()
    stem = Path(args.json).with_suffix("")
    lp = rec.layer_stem if Path(args.json).resolve() == rec.json.resolve() else stem.name + "-layer-probs"
    args.layer_png = args.layer_png or str(stem.parent / f"{lp}.png")
    args.layer_csv = args.layer_csv or str(stem.parent / f"{lp}.csv")
    args.diag_stem = stem.parent / f"{stem.name}-echo-diagnostics"


def _resolve_model(args):
    """--model: required to train. With --only-table it is optional and only checked: the results record the
    model the runs' config.json name (and their fingerprints), never a flag's."""
    args.model_fingerprints = recorded_fingerprints(args.runs_dir)
    if args.model is not None and args.only_table:
        if not Path(args.model).is_dir():
            raise StepFailed(f"--model {args.model} does not exist (with --only-table leave it out: the recorded "
                             f"one is used)")
        why = other_model(args.model, args.model_fingerprints)
        if why and committed(args.json):
            refuse_trial(args.json, f"--model {args.model} {why}", "leave --model out, or give --results and "
                                                                   "--table of your own")
    if args.model is None and not args.only_table:
        raise StepFailed("--model is required (the Meta-layout model folder to train)")


def recorded_fingerprints(runs_dir):
    """{file: {bytes, sha256}} of the model the runs were trained on (config.json's model_fingerprints, written
    by train.py), or None when no run records them."""
    for d in sorted(Path(runs_dir).glob("*-s*")) if Path(runs_dir).is_dir() else []:
        fps = (read_config(d) or {}).get("model_fingerprints") if d.is_dir() else None
        if fps:
            return fps
    return None


def other_model(model, fps):
    """None when model's files have the recorded fingerprints; else why not (the runs cannot tell)."""
    if not fps:
        return "cannot be checked against the runs (their config.json records no model fingerprints)"
    for name, want in fps.items():
        f = Path(model) / name
        if not f.is_file() or fingerprint(f) != want:
            return f"is not the model the runs were trained on ({name} differs)"
    return None


def _resolve_beam_limit(args):
    """--beam-limit N | all | 0 -> args.beam_limit (None = full test sets) and args.run_beam (0 = no beam eval)."""
    bl = str(args.beam_limit).lower()
    try:
        args.beam_limit = None if bl == "all" else int(bl)
    except ValueError:
        raise StepFailed(f"--beam-limit: an integer or 'all', got {args.beam_limit!r}") from None
    if args.beam_limit is not None and args.beam_limit < 0:
        raise StepFailed("--beam-limit must be >= 0")
    args.run_beam = args.beam_limit != 0
    if args.beam_limit == 0:
        args.beam_limit = None


def recorded_model(json_path, runs_dir):
    """The model as the records name it: the runs' config.json first (what trained them; its path read as
    model.rundir.run_path reads it, so "<run folder>/../base" names that folder), else the results
    JSON's (a placeholder such as "(none recorded yet)" is no name)."""
    for d in sorted(Path(runs_dir).glob("*-s*")) if Path(runs_dir).is_dir() else []:
        model = ((read_config(d) or {}).get("opts") or {}).get("model") if d.is_dir() else None
        if isinstance(model, str):      # "<run folder>/..." and repository-relative paths as train.py wrote them
            return recorded_name(run_path(model, d))
    prev = read_record(json_path) or {}
    model = prev.get("model")
    return model if isinstance(model, str) and not model.startswith("(") else None


def recorded_name(model):
    """The model as the results JSON records it: project-relative, or a placeholder (<folder name>), never
    an absolute path of this or another machine. Old config.json files hold the training machine's path."""
    p = Path(str(model))
    if p.exists() and not os.path.relpath(p.resolve(), ROOT).startswith(".."):
        return shown_path(model)
    return f"<{p.name}>" if p.is_absolute() or p.exists() else str(model)


def data_claim(args):
    """The train files a table claims: names, and content fingerprints from --data-dir (or, without the
    files here, from the results JSON that recorded them)."""
    files = train_files(args.data_dir)
    names = [file_name(f) for f in files]
    if all(f.is_file() for f in files):
        fps = [fingerprint(f) for f in files]
    else:
        rec = (read_record(args.json) or {}).get("train_files") or []
        fps = [{"bytes": r["bytes"], "sha256": r["sha256"]} for r in rec if isinstance(r, dict) and r.get("sha256")]
        fps = fps if len(fps) == len(files) else None
    return {"names": names, "fingerprints": fps}


def queue(args, results=None):
    """The units this call is about, in priority order."""
    if args.methods is not None:
        units = main_units(args.methods, args.seeds, args.run_beam)
    else:
        extra = analysis.ablation_rule(results)["queue"] if results else []
        units = plan(args.recipe, beam=args.run_beam, extra_ablation_seeds=extra)
    units = select(units, args.only)
    if args.max_runs is not None:
        left, out = args.max_runs, []
        for u in units:
            if status(args, u) == "finished":
                out.append(u)
            elif left > 0:
                out.append(u)
                left -= 1
        units = out
    return units


def print_queue(args, units):
    print(f"queue ({len(units)} runs, priority order; recipe {args.recipe.key}, runs in {args.runs_dir}):")
    for i, u in enumerate(units, 1):
        evals = "+".join(u.evals) or "train only"
        print(f"  {i:3d}. {u.run_name:32s} {u.group:9s} {evals:13s} {status(args, u)}")


def check_fn(args):
    def check(name, seed, folder):
        return check_record(folder, claim(args, Unit(name, seed, "main")), args.data_claim, args.model)
    return check


def collected(args, layer_probs=None):
    """The tabled runs' records (collect.collect), without the analyses, figures and summaries build_results
    adds: all the queue needs, and nothing is written."""
    prev = read_record(args.json)                 # damaged: one line naming it, not a silently empty table
    if layer_probs is None and prev is not None:
        layer_probs = prev.get("layer_probs")
    tf = [{"name": n, **fp} for n, fp in zip(args.data_claim["names"], args.data_claim["fingerprints"])] \
        if args.data_claim["fingerprints"] else [{"name": n} for n in args.data_claim["names"]]
    names = list(dict.fromkeys(MAIN_METHODS + (args.methods or [])))
    res = collect(args.runs_dir, names, sorted(set(MAIN_SEEDS) | set(args.seeds or [])),
                  model=recorded_model(args.json, args.runs_dir) or recorded_name(args.model or "(none recorded)"),
                  train_files=tf, recipe=analysis_recipe(args),
                  limit=args.limit, beam_limit=beam_limit(args) if args.run_beam else None,
                  layer_probs=layer_probs, check=check_fn(args), recipe_label=args.recipe.label)
    res["json_name"] = shown_path(args.json)
    fps = recorded_fingerprints(args.runs_dir)
    if fps:
        res["model_fingerprints"] = fps
    return res


def build_results(args, layer_probs=None):
    res = collected(args, layer_probs)
    folders = [d for d in Path(args.runs_dir).iterdir() if d.is_dir()] if Path(args.runs_dir).is_dir() else []
    if args.recipe.plan == "paper":
        pts = analysis.sweep_points(args.recipe, args.sweep_dir, args.runs_dir,
                                    RECIPES["1epoch-lr1e-3"].sweep if Path(args.runs_dir).resolve()
                                    == args.recipe.runs.resolve() else None)
        res["sweep"] = [{"epochs": e, "lr": lr, "folder": shown_path(d), "steps": s["steps"],
                         "final_val_loss": s["val"][-1]["val_loss"], "final_val_exact": s["val"][-1].get("val_exact"),
                         "val_rows": s["val"][-1].get("val_rows"),
                         "best_val_loss": min(v["val_loss"] for v in s["val"]),
                         "best_step": min(s["val"], key=lambda v: v["val_loss"])["step"]} for e, lr, d, s in pts]
        res["probes"] = analysis.probes(args.runs_dir)
        res["ablation_rule"] = analysis.ablation_rule(res)
        if Path(args.sweep_dir).is_dir():
            folders += [d for d in Path(args.sweep_dir).iterdir() if d.is_dir()]
    res["power"] = analysis.power(res)
    res["cost"] = analysis.cost(folders)
    diag = Path(args.runs_dir) / "echo-lora-s0" / "echo_diagnostics.jsonl"
    if diag.is_file():
        res["diagnostics"] = figures.echo_diagnostics(diag, args.diag_stem.with_suffix(".csv"),
                                                      args.diag_stem.with_suffix(".png"),
                                                      f"Echo-LoRA seed 0 — {res['model_name']}")
        if res["diagnostics"]:
            res["diagnostics"]["run"] = "echo-lora-s0"
    return res


def analysis_recipe(args):
    return {k: v for k, v in recipe_values(args).items() if v is not None}


def tabulate(args, layer_probs=None):
    res = build_results(args, layer_probs)
    write_json(res, args.json)
    table = build_table(res)
    if args.recipe.plan == "paper":
        table += sweep_table(res.get("sweep"), (args.recipe.flags["epochs"], args.recipe.flags["lr"]))
        table += ablation_tables(res) + probe_table(res.get("probes")) + diagnostics_note(res.get("diagnostics"))
    else:
        table += legacy_sweep_table(args.sweep_dir)
    table += power_sentence(res.get("power")) + cost_sentence(res.get("cost"))
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.table, table)
    if args.splice:                       # the real table, not a trial run's
        splice_into_readme(table, args.recipe.readme_marker)
        if args.recipe.plan == "paper":
            write_findings(res, args.runs_dir)
    state = f"PARTIAL ({res['main_runs_done']} of {res['main_runs_total']} runs)" if res["partial"] else "complete"
    c = res.get("cost") or {}
    print(f"wrote {args.json} and {args.table}: {state}; GPU-minutes so far (train + eval wall, from the records): "
          f"{c.get('wall_minutes', 0):.0f}, by --jobs: " + (", ".join(f"{k}: {v['wall_minutes']:.0f}" for k, v in
                                                                   sorted(c.get("by_jobs", {}).items())) or "none"),
          flush=True)
    return res


def legacy_sweep(args):
    """--sweep-lr: LoRA, seed 0, one run per learning rate (recipe epochs), scored on validation only."""
    units = [Unit("lora", 0, "sweep", (), {"lr": lr, "eval_every": 800}, f"lora-lr{lr:g}") for lr in args.sweep_lr]
    run_all(args, units)
    if not args.dry_run:
        print(legacy_sweep_table(args.sweep_dir))


def layer_probs(args):
    names = ["lora", "echo-lora"]
    if not args.only_table:
        from .evals import find_layer_csv
        for n in names:
            rd = Path(args.runs_dir) / f"{n}-s0"
            out = rd / "layer-probs.json"
            if find_layer_csv(out) is not None:
                print(f"[layer-probs {n}-s0] kept {find_layer_csv(out)}")
                continue
            if not (rd / "adapter").is_dir() and not args.dry_run:
                raise StepFailed(f"layer-probs {n}-s0: {rd} has no adapter/ (train it first: --methods {n} --seeds 0)")
            run_logged(layer_probs_command(args, rd, out), rd / "eval-layer-probs.log", f"layer-probs {n}-s0",
                       args.dry_run)
    if args.dry_run:
        return None
    return figures.layer_probs_outputs(args.runs_dir, names, args.layer_csv, args.layer_png, args.layer_probs,
                                       {n: METHODS[n][3] for n in names})


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.sweep_lr:
            return legacy_sweep(args)
        prev = collected(args) if (args.methods is None and not args.only_table
                                       and Path(args.runs_dir).is_dir()) else None
        units = queue(args, prev)
        if args.dry_run:
            print_queue(args, units)
        if not args.only_table:
            for f in train_files(args.data_dir):
                if not f.is_file() and not args.dry_run:
                    raise StepFailed(f"train file {f} not found (--data-dir)")
            run_all(args, units, after_each=lambda: tabulate(args))
            ensure_eval(args, None, "greedy", "eval base greedy")    # after the runs: the GPU's time goes to them first
            if not args.dry_run and args.methods is None and not args.only and args.max_runs is None:
                done = {u.run_name for u in units}        # seeds 1-2 of ablations that now qualify
                more = [u for u in queue(args, collected(args)) if u.run_name not in done]
                if more:
                    print(f"queued from this sitting's results: {', '.join(u.run_name for u in more)}")
                    run_all(args, more, after_each=lambda: tabulate(args))
        lp = layer_probs(args) if args.layer_probs else None
        if args.dry_run:
            print(f"(dry run: nothing ran; would write {args.json} and {args.table})")
            return
        tabulate(args, lp)
    except StepFailed as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
