"""The results JSON: every tabled run's per-task counts (with per-example correctness), its training cost and
recipe, built from the run folders, excluding folders whose record does not match what the table claims."""
import json
from pathlib import Path

from .common import write_atomic
from .evals import eval_file, load_eval
from .recipes import MAIN_METHODS, MAIN_SEEDS, METHODS, N_MAIN, PAPER_DELTAS
from .runs import read_config, recipe_of, run_dir, train_summary

KNOWN_MODELS = {(576, 30, 9, 3): "SmolLM2-135M-Instruct", (64, 5, 8, 4): "stories260K"}


def discover(runs_dir):
    """(name, seed) of every run folder RUNS/<name>-s<seed> with a known method name."""
    found = set()
    for d in Path(runs_dir).glob("*-s*") if Path(runs_dir).is_dir() else []:
        name, _, seed = d.name.rpartition("-s")
        if d.is_dir() and name in METHODS and seed.isdigit():
            found.add((name, int(seed)))
    return found


def model_label(folders, model):
    """The name of the model the runs actually used: known shapes by name, else the model folder's name."""
    for d in folders:
        cfg = read_config(d)
        m = cfg.get("model") if cfg else None
        if isinstance(m, dict):
            key = (m.get("dim"), m.get("n_layers"), m.get("n_heads"), m.get("n_kv_heads"))
            if key in KNOWN_MODELS:
                return KNOWN_MODELS[key]
            return f"{Path(str(model)).name} ({m.get('n_layers')} layers, dim {m.get('dim')})"
    return Path(str(model)).name if model else "?"


def _run_entry(name, seed, decoding, ev, summary):
    method, echo, _, _ = METHODS[name]
    return {"name": name, "method": method, "echo": echo, "seed": seed, "decoding": decoding,
            "tasks": ev["tasks"], "eval_settings": ev["settings"],
            "train_seconds": summary["train_seconds"], "tokens_per_s": summary["tokens_per_s"],
            "peak_gib": summary["peak_gib"], "device": summary["device"], "steps": summary["steps"],
            "warmup_seconds": summary["warmup_seconds"], "concurrent_jobs": summary["concurrent_jobs"]}


def collect(runs_dir, names, seeds, *, model, train_files, recipe, limit=None, beam_limit=None,
            layer_probs=None, check=None, recipe_label=None):
    """Everything the table needs, from the run folders: the requested {names} x {seeds} and any other
    run folder present. Only evaluations that exist are listed. check(name, seed, folder) -> None or the
    reason the folder's record does not match the claim (then it is listed under "excluded", not tabled)."""
    found = discover(runs_dir)
    names = [n for n in METHODS if n in names or any(f[0] == n for f in found)]
    seeds = sorted(set(seeds) | {f[1] for f in found})
    runs, excluded, folders = _tabled_runs(runs_dir, names, seeds, check)
    base = _base_entry(runs_dir)
    limit, beam_limit = _limits_made(runs, base, limit, beam_limit)
    done = {(r["name"], r["seed"]) for r in runs if r["decoding"] == "greedy"}
    n_main = sum((n, s) in done for n in MAIN_METHODS for s in MAIN_SEEDS)
    out = {"model": str(model), "model_name": model_label(folders, model),
           "train_files": list(train_files), "recipe": _actual_recipe(recipe, folders),
           "partial": n_main < N_MAIN, "main_runs_done": n_main, "main_runs_total": N_MAIN,
           "limit": limit, "beam_limit": beam_limit, "paper_deltas": PAPER_DELTAS,
           "runs": runs, "base": base, "layer_probs": layer_probs}
    if recipe_label:
        out["recipe_label"] = recipe_label
    if excluded:
        out["excluded"] = excluded
    return out


def _tabled_runs(runs_dir, names, seeds, check):
    """-> (run entries of every existing evaluation, excluded folders with the reason, tabled folders)."""
    runs, excluded, folders = [], [], []
    for name in names:
        for seed in seeds:
            rd = run_dir(runs_dir, name, seed)
            if not rd.is_dir():
                continue
            why = check(name, seed, rd) if check is not None else None
            if why:
                excluded.append({"run": rd.name, "reason": why})
                continue
            summary = train_summary(rd)
            folders.append(rd)
            for decoding in ("greedy", "beam4"):
                ev = load_eval(eval_file(rd, decoding))
                if ev is not None:
                    runs.append(_run_entry(name, seed, decoding, ev, summary))
    return runs, excluded, folders


def _base_entry(runs_dir):
    """The base model's greedy evaluation (no adapter, no training), or None."""
    base_ev = load_eval(eval_file(Path(runs_dir) / "base", "greedy"))
    if base_ev is None:
        return None
    return {"name": "base", "method": "base", "echo": False, "seed": None, "decoding": "greedy",
            "tasks": base_ev["tasks"], "eval_settings": base_ev["settings"], "train_seconds": None,
            "tokens_per_s": None, "peak_gib": None, "device": None}


def _actual_recipe(recipe, folders):
    """The recipe actually used: the tabled run folders' config.json where present, else the flags; the keys
    the runs disagree on are listed under differs_between_runs."""
    used = [r for r in (recipe_of(d) for d in folders) if r]
    actual = dict(recipe)
    if used:
        for k, v in used[0].items():
            if k != "method":
                actual[k] = v
        differing = sorted({k for r in used for k in r if not k.startswith("echo_") and k not in ("method",
                            "train_rows") and r.get(k) != used[0].get(k)})
        if differing:
            actual["differs_between_runs"] = differing
    return actual


def _limits_made(runs, base, limit, beam_limit):
    """-> (greedy limit, beam limit): what the evaluations were really made with wins over the flags
    (--only-table with other flags)."""
    for decoding, given in (("greedy", limit), ("beam4", beam_limit)):
        made = {r["eval_settings"].get("limit") for r in runs + ([base] if base else [])
                if r["decoding"] == decoding and r["eval_settings"].get("limit") not in (None, 0)}
        if made:
            given = max(made)
        elif any(r["decoding"] == decoding and "limit" in r["eval_settings"] for r in runs):
            given = None
        if decoding == "greedy":
            limit = given
        else:
            beam_limit = given
    return limit, beam_limit


def write_json(results, path):
    """Indented JSON (each per_example string stays on one line: it is already compact), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(results, indent=1) + "\n")


def main(argv=None):
    """A library: --help says so and where its command is; anything else is a one-line refusal (exit 2)."""
    from model.load import CliParser, HelpFormatter
    p = CliParser(prog="python -m experiments.collect", formatter_class=HelpFormatter,
                  description=__doc__ + "\nIts command is `python -m experiments.reproduce --only-table` "
                                        "(with --results/--table of your own for a trial).")
    p.parse_args(argv)
    p.exit(2, "error: experiments.collect is a library: run python -m experiments.reproduce --only-table\n")


if __name__ == "__main__":
    main()
