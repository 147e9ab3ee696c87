"""Numbers derived from the records beyond accuracy: per-run metrics summaries (validation curve, L_on − L_off
early and late), the validation sweep, the capacity probes, the test's power, GPU-minutes, and the rule that
queues seeds 1-2 of an ablation."""
import json
import math
from pathlib import Path

from .common import (IN_FORMAT, TASKS, StepFailed, by_name, check_numbers, is_number, read_metrics, read_record,
                     write_atomic)
from .evals import eval_file, eval_seconds
from .recipes import ABLATIONS, MAIN_METHODS, MAIN_SEEDS, PROBES, SWEEP_GRID, sweep_folder
from .runs import read_config, train_summary
from .stats import mean_sd, min_detectable_delta
from .tables import task_avg

SUMMARY_FILE = "metrics-summary.json"     # committed: metrics.jsonl itself is not


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def metrics_summary(run):
    """-> {"steps", "val": [...], "gap_first10", "gap_last10", "kd_first10", "kd_last10", "routed_first10",
    "routed_last10"} from RUN/metrics.jsonl (written to RUN/metrics-summary.json, which is committed), or
    from that file when metrics.jsonl is absent; None when neither exists. gap = L_on − L_off over the
    routed steps among the first / last 10 % of the steps."""
    run = Path(run)
    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        s = read_record(run / SUMMARY_FILE)
        if s is not None:
            check_numbers(run / SUMMARY_FILE, s, ["steps", "gap_first10", "gap_last10", "kd_first10", "kd_last10"])
            val = s.get("val") or []
            if not isinstance(val, list) or not all(isinstance(v, dict) and is_number(v.get("val_loss"))
                                                    and is_number(v.get("step")) for v in val):
                raise StepFailed(f"{run / SUMMARY_FILE}: field val is not a list of {{step, val_loss}} records; "
                                 f"restore it (or its run's metrics.jsonl)")
        return s
    steps = [r for r in rows if isinstance(r.get("step"), int)]
    total = max((r["step"] for r in steps), default=0)
    out = {"steps": total, "val": [{k: r[k] for k in ("step", "val_loss", "val_exact", "val_rows") if k in r}
                                   for r in steps if "val_loss" in r]}
    cut = max(1, math.ceil(0.1 * total))
    for part, keep in (("first10", lambda s: s <= cut), ("last10", lambda s: s > total - cut)):
        routed = [r for r in steps if keep(r["step"]) and r.get("routed") and r.get("loss_on") is not None
                  and r.get("loss_off") is not None]
        out[f"gap_{part}"] = _mean([r["loss_on"] - r["loss_off"] for r in routed])
        out[f"kd_{part}"] = _mean([r["loss_kd"] for r in routed if r.get("loss_kd") is not None])
        out[f"routed_{part}"] = len(routed)
    if (run / "summary.json").is_file():
        text = json.dumps(out, indent=1) + "\n"
        if not (run / SUMMARY_FILE).is_file() or (run / SUMMARY_FILE).read_text() != text:    # a table-only
            write_atomic(run / SUMMARY_FILE, text)                                           # rebuild: untouched
    return out


def sweep_points(recipe, sweep_dir, runs_dir, legacy_sweep=None):
    """The validation sweep (LoRA, seed 0): [(epochs, lr, folder, summary)] for each grid point that has a
    validation curve. The point equal to the recipe is its lora-s0 run; 1-epoch points reuse the earlier
    1-epoch sweep's folders (lora-lr<lr>) when there is no new one."""
    out = []
    for epochs, lr in SWEEP_GRID:
        cands = [Path(sweep_dir) / sweep_folder(epochs, lr)]
        if (epochs, lr) == (recipe.flags.get("epochs"), recipe.flags.get("lr")):
            cands.insert(0, Path(runs_dir) / "lora-s0")
        if epochs == 1 and legacy_sweep is not None:
            cands.append(Path(legacy_sweep) / f"lora-lr{lr:g}")
        for d in cands:
            s = metrics_summary(d) if (d / "summary.json").is_file() else None
            opts = (read_config(d) or {}).get("opts") or {}
            if opts and (not math.isclose(float(opts.get("lr", -1)), lr) or float(opts.get("epochs", -1)) != epochs):
                continue                              # a folder of another point: not this one
            if s and s.get("val"):
                out.append((epochs, lr, d, s))
                break
    return out


def probes(runs_dir):
    """{probe name: metrics summary + final validation loss} for the finished capacity probes."""
    out = {}
    for p in PROBES:
        d = Path(runs_dir) / f"{p}-s0"
        s = metrics_summary(d) if (d / "summary.json").is_file() else None
        if s:
            out[p] = {**{k: s.get(k) for k in ("steps", "gap_first10", "gap_last10", "kd_first10", "kd_last10",
                                               "routed_first10", "routed_last10")},
                      "final_val_loss": s["val"][-1]["val_loss"] if s.get("val") else None}
    return out


def power(results, seeds=len(MAIN_SEEDS), alpha=0.05, target=0.8):
    """The smallest in-format Δ (points) the paired test detects with 80 % power at α 0.05 over `seeds`
    seeds of these test sizes, at the discordance rate pooled over the Echo − baseline comparisons."""
    g = by_name(results, "greedy")
    disc = pairs = 0
    for a, b in (("echo-lora", "lora"), ("echo-dora", "dora")):
        for s in set(g.get(a, {})) & set(g.get(b, {})):
            for t in IN_FORMAT:
                x, y = g[a][s]["tasks"].get(t, {}).get("per_example"), g[b][s]["tasks"].get(t, {}).get("per_example")
                if x and y and len(x) == len(y):
                    disc += sum(1 for u, v in zip(x, y) if u != v)
                    pairs += len(x)
    sizes = {}
    for r in results["runs"]:
        if r["decoding"] == "greedy":
            for t in IN_FORMAT:
                if t in r["tasks"]:
                    sizes[t] = r["tasks"][t]["total"]
    if not pairs or len(sizes) < len(IN_FORMAT):
        return None
    n = seeds * sum(sizes.values())
    d = min_detectable_delta(n, disc / pairs, alpha, target)
    return {"discordance": disc / pairs, "pairs_observed": pairs, "pairs_at_seeds": n, "seeds": seeds,
            "alpha": alpha, "power": target, "min_delta_points": None if d is None else 100 * d}


def cost(folders):
    """GPU-minutes: train + eval wall minutes from the records, grouped by the --jobs they shared the GPU
    with (wall minutes under --jobs N overlap, so their sum over-counts the GPU's time by up to N×)."""
    by_jobs, total = {}, 0.0
    for d in folders:
        d = Path(d)
        secs = (train_summary(d)["train_seconds"] or 0.0) if (d / "summary.json").is_file() else 0.0
        secs += sum(eval_seconds(eval_file(d, k)) or 0.0 for k in ("greedy", "beam4"))
        if not secs:
            continue
        jobs = train_summary(d)["concurrent_jobs"]
        e = by_jobs.setdefault(str(jobs), {"runs": 0, "wall_minutes": 0.0})
        e["runs"] += 1
        e["wall_minutes"] += secs / 60
        total += secs / 60
    return {"wall_minutes": total, "by_jobs": by_jobs,
            "gpu_minutes_if_shared_evenly": sum(v["wall_minutes"] / int(k) for k, v in by_jobs.items())}


def ablation_rule(results):
    """Seeds 1-2 of a variant are queued when |Δ 8-task avg against full Echo-LoRA| at seed 0 exceeds the
    seed-to-seed sd of the main runs (pooled over the 4 methods). -> {"sd", "deltas", "queue": [...]}."""
    g = by_name(results, "greedy")
    var = [mean_sd([task_avg(r, TASKS) for r in g.get(m, {}).values()])[1] for m in MAIN_METHODS]
    var = [v for v in var if v is not None]
    sd = math.sqrt(sum(v * v for v in var) / len(var)) if var else None
    full = g.get("echo-lora", {}).get(0)
    base = task_avg(full, TASKS) if full else None

    def delta(a):
        ours = task_avg(g[a][0], TASKS) if 0 in g.get(a, {}) else None
        return None if ours is None or base is None else ours - base
    deltas = {a: delta(a) for a in ABLATIONS}
    queue = [a for a, d in deltas.items() if d is not None and sd is not None and abs(d) > sd]
    return {"sd": sd, "deltas": deltas, "queue": queue}
