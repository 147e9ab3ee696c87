#!/usr/bin/env python
"""Small-scale reproduction of Echo-LoRA's claim (Echo improves LoRA and DoRA on the 8-task commonsense
suite) on SmolLM2-135M-Instruct — one command: train, evaluate, tabulate.

    python results/reproduce.py --model MODEL_DIR --data-dir ../shared/data/commonsense
    python results/reproduce.py ... --methods lora echo-lora --seeds 0     # a subset (table marked PARTIAL)
    python results/reproduce.py ... --only-table                          # rebuild JSON + table, run nothing
    python results/reproduce.py ... --dry-run                             # print the commands
    python results/reproduce.py ... --jobs 4                              # 4 runs at once on one GPU
    python results/reproduce.py ... --layer-probs 200                     # + LoRA vs Echo-LoRA layer curves
    python results/reproduce.py ... --limit 8 --runs-dir runs/smoke --json /tmp/s.json --table /tmp/s.md

1. trains every {method} x {seed} with `python train.py ... --out RUNS/<method>-s<seed>` (skipped when
   RUN/summary.json exists; `--resume` when only RUN/checkpoint/ exists; `--force` for a folder whose run
   died before its first checkpoint); log in RUN/train.log (RUNS/<run>.train.log while train.py has not
   made the folder yet: it refuses a non-empty --out);
2. evaluates each finished run greedily on the full test sets (RUN/eval-greedy.json), seed 0 of each
   method also with the published protocol (4 beams, 32 new tokens, first --beam-limit examples per task:
   RUN/eval-beam4.json), and the base model once (RUNS/base/eval-greedy.json); existing outputs are kept;
3. writes results/smollm2-135m-commonsense.json (per-run per-task counts, per-example correctness when the
   evaluator gives it, training cost) and 4. results/README-table.md, built from that JSON only.

Statistics (numpy/math only): mean ± sample sd over seeds; Echo − baseline deltas on the seeds both have;
exact two-sided McNemar test on the discordant pairs pooled over tasks and common seeds; a paired
bootstrap (resampling test examples, stratified by task, fixed seed) CI of the delta of the task-averaged
accuracy. Without per-example correctness the table says so and falls back to an UNPAIRED two-proportion
z-test.
"""
import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DEFAULT_JSON = RESULTS / "smollm2-135m-commonsense.json"
DEFAULT_TABLE = RESULTS / "README-table.md"
DEFAULT_RUNS = RESULTS / "smollm2-135m" / "runs"          # committed: small files only (see its .gitignore)
SWEEP_DIR = RESULTS / "smollm2-135m" / "recipe-sweep"     # the LoRA learning-rate sweep (validation only)

TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
IN_FORMAT = ["boolq", "social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"]   # train sets in the mix
TRANSFER = ["piqa", "hellaswag", "winogrande"]                                    # format transfer only
TRAIN_TASKS = IN_FORMAT
DISPLAY = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA"}

# name -> (train.py --method, --echo, extra train flags, display name)
METHODS = {
    "lora": ("lora", False, [], "LoRA"),
    "echo-lora": ("lora", True, [], "Echo-LoRA"),
    "dora": ("dora", False, [], "DoRA"),
    "echo-dora": ("dora", True, [], "Echo-DoRA"),
    "echo-lora-norouting": ("lora", True, ["--echo-p-start", "1", "--echo-p-end", "1"],
                            "Echo-LoRA, no routing (p = 1)"),
}
MAIN_METHODS = ["lora", "echo-lora", "dora", "echo-dora"]
MAIN_SEEDS = [0, 1, 2]
N_MAIN = len(MAIN_METHODS) * len(MAIN_SEEDS)
# (treated, control, the paper's delta of the 8-task average in points, or None)
COMPARISONS = [("echo-lora", "lora", 3.0), ("echo-dora", "dora", 2.7), ("echo-lora-norouting", "echo-lora", None)]
BLOCKS = [("8 tasks", TASKS), ("5 in-format", IN_FORMAT), ("3 format-transfer", TRANSFER)]
SUMMARY_KEYS = ["steps", "train_seconds", "tokens_per_s", "peak_gib", "device", "warmup_seconds"]
RECIPE_KEYS = ["method", "rank", "alpha", "dropout", "modules", "lr", "epochs", "max_steps", "warmup_steps",
               "global_batch", "micro_batch", "max_len", "val_split", "template", "dtype", "echo_targets",
               "echo_sources", "echo_modules", "echo_p_start", "echo_p_end"]
N_BOOT = 2000
BOOT_SEED = 0
JOBS_FILE = "reproduce-jobs.json"   # written beside a run trained under --jobs N: its speed figures are shared


class StepFailed(Exception):
    pass


# ================================================================ statistics (math / numpy only) ========

def binom_half_cdf(k, n):
    """P(X <= k) for X ~ Binomial(n, 1/2), exact: sum of C(n, i) for i <= k over 2^n in integers (Python's
    int / int division rounds correctly; underflows to 0.0 only below ~1e-308)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    term, total = 1, 1                       # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)     # C(n, i + 1), exact
        total += term
    return total / (1 << n)


def mcnemar_exact(b, c):
    """Exact two-sided McNemar test: b, c = discordant pair counts (treated right only, control right
    only). Under H0 each discordant pair goes either way with probability 1/2, so
    p = min(1, 2 · P(X <= min(b, c))), X ~ Binomial(b + c, 1/2). No discordant pairs: p = 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_half_cdf(min(b, c), n))


def two_proportion_z(c1, n1, c2, n2):
    """UNPAIRED two-sided z-test of p1 = p2 (pooled variance) -> (z, p)."""
    if n1 == 0 or n2 == 0:
        return float("nan"), float("nan")
    p1, p2, pool = c1 / n1, c2 / n2, (c1 + c2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def paired_bootstrap_ci(diffs, n_boot=N_BOOT, seed=BOOT_SEED, level=0.95):
    """diffs: one array per task of per-example (treated − control) correctness, averaged over the common
    seeds. Statistic: the mean over tasks of each task's mean difference (= the delta of the task-averaged
    accuracy). Test examples are resampled with replacement within each task, the same draw for both
    methods (paired). A task's values take few distinct levels, so resampling n examples is drawing
    multinomial counts over those levels — the same distribution, cheap. -> (lo, hi), fixed seed."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_boot)
    for d in diffs:
        d = np.asarray(d, dtype=np.float64)
        levels, counts = np.unique(d, return_counts=True)
        draws = rng.multinomial(len(d), counts / len(d), size=n_boot)
        stats += draws @ levels / len(d)
    stats /= len(diffs)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mean_sd(values):
    """-> (mean, sample sd or None with fewer than 2 values); (None, None) for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ================================================================ reading run folders ===================

def run_dir(runs, name, seed):
    return Path(runs) / f"{name}-s{seed}"


def eval_file(run, decoding):
    return Path(run) / f"eval-{decoding}.json"


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def eval_results_path(path):
    """eval.py --out PATH: a JSON file (the results), or — with an eval.py whose --out is a folder — a
    folder PATH/ holding results.json (+ predictions_<task>.jsonl). -> the results file or None."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir() and (path / "results.json").is_file():
        return path / "results.json"
    return None


def eval_limit(raw):
    """The --limit an eval file was made with (top level or under "settings"), or None if not recorded."""
    for where in (raw, raw.get("settings") if isinstance(raw.get("settings"), dict) else {}):
        if "limit" in where:
            return where["limit"]
    return "unrecorded"


def _predictions(results_file, task):
    """eval.py's per-example records for a task: <stem>-predictions/<task>.jsonl beside the results file
    (today's eval.py), or predictions_<task>.jsonl in the results file's folder (older layout)."""
    res = Path(results_file)
    for p in (res.with_name(res.stem + "-predictions") / f"{task}.jsonl", res.parent / f"predictions_{task}.jsonl"):
        if p.is_file():
            return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return None


def load_eval(path):
    """-> {"tasks": {task: {"correct", "total", "unextracted", "per_example"}}, "settings": {...}} or None.
    per_example is a string of '0'/'1' (one per evaluated example, test-file order) or None: from the
    task's "per_example" list in the results JSON, else from eval.py's prediction records beside it
    (<stem>-predictions/<task>.jsonl, field "correct"). unextracted: the task's "unextracted", else the
    count of records with an empty prediction that were not skipped."""
    res = eval_results_path(path)
    if res is None:
        return None
    raw = _read_json(res)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        return None
    tasks = {}
    for name, t in raw["tasks"].items():
        if not isinstance(t, dict) or "correct" not in t or "total" not in t:
            continue
        per = t.get("per_example")
        preds = None
        if per is None or t.get("unextracted") is None:
            preds = _predictions(res, name)
        if per is None and preds is not None:
            per = [r.get("correct") for r in preds]
        if isinstance(per, str):
            per = [int(ch) for ch in per]
        per_str = "".join("1" if v else "0" for v in per) if per is not None else None
        if per_str is not None and len(per_str) != int(t["total"]):
            per_str = None                                    # cannot be trusted to line up
        unex = t.get("unextracted")
        if unex is None and preds is not None:
            unex = sum(1 for r in preds if r.get("pred") in ("", None) and not r.get("skipped"))
        tasks[name] = {"correct": int(t["correct"]), "total": int(t["total"]),
                       "unextracted": None if unex is None else int(unex), "per_example": per_str}
        if t.get("skipped") is not None:
            tasks[name]["skipped"] = int(t["skipped"])
    settings = dict(raw.get("settings") or {})
    for k in ("decoding", "num_beams", "max_new_tokens", "limit", "template", "dtype", "device", "batch_size",
              "seconds", "examples_per_s"):
        if k in raw and k not in settings:
            settings[k] = raw[k]
    return {"tasks": tasks, "settings": settings}


def train_summary(run):
    s = _read_json(Path(run) / "summary.json")
    s = s if isinstance(s, dict) else {}
    out = {k: s.get(k) for k in SUMMARY_KEYS}
    jobs = _read_json(Path(run) / JOBS_FILE)
    out["concurrent_jobs"] = jobs.get("concurrent_jobs", 1) if isinstance(jobs, dict) else 1
    return out


def train_decision(run):
    """'skip' (RUN/summary.json: finished), 'resume' (RUN/checkpoint/ without summary.json) or 'fresh'."""
    run = Path(run)
    if (run / "summary.json").is_file():
        return "skip"
    ckpt = run / "checkpoint"
    if ckpt.is_dir() and any(p.is_file() and not p.name.endswith(".tmp") for p in ckpt.iterdir()):
        return "resume"
    return "fresh"           # (a checkpoint/ holding only a half-written .tmp: nothing to resume from)


def recipe_of(run):
    cfg = _read_json(Path(run) / "config.json")
    opts = cfg.get("opts") if isinstance(cfg, dict) else None
    if not isinstance(opts, dict):
        return None
    out = {k: opts.get(k) for k in RECIPE_KEYS if k in opts}
    if isinstance(cfg, dict) and "train_rows" in cfg:
        out["train_rows"] = cfg["train_rows"]
    return out


# ================================================================ the JSON ==============================

def discover(runs_dir):
    """(name, seed) of every run folder RUNS/<name>-s<seed> with a known method name."""
    found = set()
    for d in Path(runs_dir).glob("*-s*") if Path(runs_dir).is_dir() else []:
        name, _, seed = d.name.rpartition("-s")
        if d.is_dir() and name in METHODS and seed.isdigit():
            found.add((name, int(seed)))
    return found


def collect(runs_dir, names, seeds, *, model, train_files, recipe, limit=None, beam_limit=None,
            layer_probs=None):
    """Everything the table needs, from the run folders: the requested {names} x {seeds} and any other
    run folder present. Only evaluations that exist are listed."""
    found = discover(runs_dir)
    names = [n for n in METHODS if n in names or any(f[0] == n for f in found)]
    seeds = sorted(set(seeds) | {f[1] for f in found})
    runs = []
    for name in names:
        method, echo, _, _ = METHODS[name]
        for seed in seeds:
            rd = run_dir(runs_dir, name, seed)
            summary = train_summary(rd)
            for decoding in ("greedy", "beam4"):
                ev = load_eval(eval_file(rd, decoding))
                if ev is None:
                    continue
                runs.append({"name": name, "method": method, "echo": echo, "seed": seed, "decoding": decoding,
                             "tasks": ev["tasks"], "eval_settings": ev["settings"],
                             "train_seconds": summary["train_seconds"], "tokens_per_s": summary["tokens_per_s"],
                             "peak_gib": summary["peak_gib"], "device": summary["device"],
                             "steps": summary["steps"], "warmup_seconds": summary["warmup_seconds"],
                             "concurrent_jobs": summary["concurrent_jobs"]})
    base_ev = load_eval(eval_file(Path(runs_dir) / "base", "greedy"))
    base = None
    if base_ev is not None:
        base = {"name": "base", "method": "base", "echo": False, "seed": None, "decoding": "greedy",
                "tasks": base_ev["tasks"], "eval_settings": base_ev["settings"], "train_seconds": None,
                "tokens_per_s": None, "peak_gib": None, "device": None}
    # the recipe actually used: the run folders' config.json where present, else the flags
    used = [r for r in (recipe_of(run_dir(runs_dir, n, s)) for n in names for s in seeds) if r]
    actual = dict(recipe)
    if used:
        for k, v in used[0].items():
            if k not in ("method",):
                actual[k] = v
        differing = sorted({k for r in used for k in r if k not in ("method", "echo_p_start", "echo_p_end",
                                                                     "train_rows")
                            and r.get(k) != used[0].get(k)})
        if differing:
            actual["differs_between_runs"] = differing
    # what the evaluations were really made with wins over the flags (--only-table with other flags)
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
    done = {(r["name"], r["seed"]) for r in runs if r["decoding"] == "greedy"}
    n_main = sum((n, s) in done for n in MAIN_METHODS for s in MAIN_SEEDS)
    return {"model": str(model), "train_files": [str(f) for f in train_files], "recipe": actual,
            "partial": n_main < N_MAIN, "main_runs_done": n_main, "main_runs_total": N_MAIN,
            "limit": limit, "beam_limit": beam_limit,
            "paper_deltas": {"echo-lora vs lora": 3.0, "echo-dora vs dora": 2.7,
                             "note": "8-task average, 7-8B LLaMA models, all 8 train sets (commonsense_170k), "
                                     "beam search, against the paper's own reproduced LoRA/DoRA"},
            "runs": runs, "base": base, "layer_probs": layer_probs}


def write_json(results, path):
    """Indented JSON, except each per_example string stays on one line (it is already compact)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


# ================================================================ the table =============================

def _acc(t):
    return 100.0 * t["correct"] / t["total"] if t and t.get("total") else None


def _fmt(m, sd=None, digits=1):
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _signed(v, digits=1):
    return "—" if v is None else f"{v:+.{digits}f}"


def _p(p):
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    if p == 0.0:
        return "< 1e-300"
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def task_avg(run, tasks):
    """Macro average (points) over `tasks`, None unless the run has all of them."""
    accs = [_acc(run["tasks"].get(t)) for t in tasks]
    return None if any(a is None for a in accs) else sum(accs) / len(accs)


def by_name(results, decoding):
    out = {}
    for r in results["runs"]:
        if r["decoding"] == decoding:
            out.setdefault(r["name"], {})[r["seed"]] = r
    return out


def _names_in(results):
    names = [n for n in METHODS if n in MAIN_METHODS or any(r["name"] == n for r in results["runs"])]
    return names


def compare(treated, control, tasks):
    """treated / control: {seed: run}. Paired on the common seeds. -> dict with deltas, McNemar, CI,
    or the unpaired z-test when per-example correctness is missing or does not line up."""
    seeds = sorted(set(treated) & set(control))
    out = {"seeds": seeds}
    if not seeds:
        return out
    deltas = {}
    for t in tasks:
        a = [_acc(treated[s]["tasks"].get(t)) for s in seeds]
        z = [_acc(control[s]["tasks"].get(t)) for s in seeds]
        deltas[t] = None if None in a or None in z else sum(x - y for x, y in zip(a, z)) / len(seeds)
    out["deltas"] = deltas
    paired = all(treated[s]["tasks"].get(t, {}).get("per_example") is not None
                 and control[s]["tasks"].get(t, {}).get("per_example") is not None
                 and len(treated[s]["tasks"][t]["per_example"]) == len(control[s]["tasks"][t]["per_example"])
                 for s in seeds for t in tasks)
    out["paired"] = paired
    if paired:
        b = c = n = 0
        diffs = []
        for t in tasks:
            acc_diff = None
            for s in seeds:
                x = np.frombuffer(treated[s]["tasks"][t]["per_example"].encode(), dtype=np.uint8) - ord("0")
                y = np.frombuffer(control[s]["tasks"][t]["per_example"].encode(), dtype=np.uint8) - ord("0")
                x, y = x.astype(np.int64), y.astype(np.int64)
                b += int(((x == 1) & (y == 0)).sum())
                c += int(((x == 0) & (y == 1)).sum())
                n += len(x)
                acc_diff = (x - y) if acc_diff is None else acc_diff + (x - y)
            diffs.append(acc_diff / len(seeds))
        lo, hi = paired_bootstrap_ci(diffs)
        out.update(b=b, c=c, pairs=n, p=mcnemar_exact(b, c), ci=(100 * lo, 100 * hi))
    else:
        c1 = n1 = c2 = n2 = 0
        for s in seeds:
            for t in tasks:
                a, z = treated[s]["tasks"].get(t), control[s]["tasks"].get(t)
                if a and z:
                    c1, n1, c2, n2 = c1 + a["correct"], n1 + a["total"], c2 + z["correct"], n2 + z["total"]
        zval, p = two_proportion_z(c1, n1, c2, n2)
        out.update(z=zval, p=p, n_treated=n1, n_control=n2)
    return out


def build_table(results):
    """The README fragment (markdown), from the results JSON alone."""
    L = []
    greedy = by_name(results, "greedy")
    beam = by_name(results, "beam4")
    names = _names_in(results)
    rec = results.get("recipe", {})
    done, total = results.get("main_runs_done", 0), results.get("main_runs_total", N_MAIN)
    L.append("<!-- generated by results/reproduce.py from results/smollm2-135m-commonsense.json: do not edit -->")
    L.append("### Small-scale reproduction: SmolLM2-135M-Instruct on the commonsense suite")
    L.append("")
    if results.get("partial"):
        L.append(f"**PARTIAL ({done} of {total} runs)** — runs still missing are shown as —; "
                 f"rerun `python results/reproduce.py` to complete them.")
        L.append("")
    if results.get("limit"):
        L.append(f"**SMOKE TEST: evaluated on the first {results['limit']} examples per task only** — "
                 f"not a result.")
        L.append("")
    rows = f" ({rec['train_rows']:,} rows)" if isinstance(rec.get("train_rows"), int) else ""
    parts = []
    if rec.get("rank") is not None:
        parts.append(f"r = {_num(rec['rank'])}" + (f", α = {_num(rec['alpha'])}" if rec.get("alpha") is not None
                                                   else "")
                     + (f" on {'/'.join(map(str, rec['modules']))}" if rec.get("modules") else ""))
    if rec.get("lr") is not None:
        parts.append(f"lr {_num(rec['lr'])}")
    if rec.get("max_steps"):
        parts.append(f"{rec['max_steps']} steps")
    elif rec.get("epochs") is not None:
        parts.append(f"{_num(rec['epochs'])} epoch{'' if rec['epochs'] == 1 else 's'}")
    for key, label in (("global_batch", "global batch"), ("max_len", "max length"),
                       ("val_split", "validation hold-out")):
        if rec.get(key) is not None:
            parts.append(f"{label} {_num(rec[key])}")
    decoding = ("Greedy decoding on the full test sets" if not results.get("limit") else
                f"Greedy decoding on the first {results['limit']} test examples per task")
    L.append(f"Fine-tuned on the 5 train sets available here — {', '.join(TRAIN_TASKS)}{rows}"
             + (f" — {', '.join(parts)}" if parts else "") + ". "
             f"{decoding}; accuracy (%) as mean ± sample sd over seeds "
             f"(the seeds column counts them; no ± with one seed). "
             f"**In-format** tasks ({', '.join(DISPLAY[t] for t in IN_FORMAT)}) have their train set in the "
             f"mix; the **format-transfer** tasks ({', '.join(DISPLAY[t] for t in TRANSFER)}) have none, so "
             f"their cells also give the share of answers the published regex could not extract (u).")
    skipped = sum(t.get("skipped") or 0 for r in results["runs"] + ([results["base"]] if results.get("base") else [])
                  for t in r["tasks"].values())
    if skipped:
        L.append(f"Note: eval.py skipped {skipped:,} test examples in total (see each run's `skipped` counts in "
                 f"the JSON); accuracy is correct / total as eval.py reports them.")
    if rec.get("differs_between_runs"):
        L.append(f"Note: the runs' config.json differ in {', '.join(rec['differs_between_runs'])}.")
    L.append("")
    order = IN_FORMAT + ["avg5"] + TRANSFER + ["avg8"]
    head = ["method", "seeds"] + [("**5-task avg**" if c == "avg5" else "**8-task avg**" if c == "avg8"
                                   else DISPLAY[c]) for c in order]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    n_seeds_wanted = len(MAIN_SEEDS)

    def row(label, seed_runs, wanted):
        runs = [seed_runs[s] for s in sorted(seed_runs)]
        k = len(runs)
        seeds = "—" if not k else (str(k) if k >= wanted else f"{k} of {wanted}")
        cells = []
        for col in order:
            if col in ("avg5", "avg8"):
                m, sd = mean_sd([task_avg(r, IN_FORMAT if col == "avg5" else TASKS) for r in runs])
                cells.append(f"**{_fmt(m, sd)}**" if m is not None else "—")
                continue
            m, sd = mean_sd([_acc(r["tasks"].get(col)) for r in runs])
            cell = _fmt(m, sd)
            if col in TRANSFER and m is not None:
                u = [r["tasks"][col]["unextracted"] / r["tasks"][col]["total"] for r in runs
                     if r["tasks"].get(col) and r["tasks"][col].get("unextracted") is not None]
                cell += f" (u {100 * sum(u) / len(u):.0f}%)" if u else " (u ?)"
            cells.append(cell)
        L.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")

    if results.get("base"):
        row("base model (no adapter)", {0: results["base"]}, 1)
    else:
        row("base model (no adapter)", {}, 1)
    for n in names:
        row(METHODS[n][3], greedy.get(n, {}), n_seeds_wanted)
    L.append("")

    # ---- deltas and significance
    comps = [(a, b, paper) for a, b, paper in COMPARISONS if a in greedy or (a in MAIN_METHODS and b in MAIN_METHODS)]
    L.append("**Echo − baseline** (points, mean over the seeds both methods have). The paper's deltas "
             "(Peng et al. 2026, 8-task average against its own reproduced LoRA/DoRA) are +3.0 for Echo-LoRA "
             "and +2.7 for Echo-DoRA — with 7–8B LLaMA models trained on all 8 train sets "
             "(commonsense_170k) and beam search, so only the sign and rough size are comparable here.")
    L.append("")
    head = ["comparison", "seeds"] + [DISPLAY[t] for t in IN_FORMAT] + ["**Δ 5-task**"] + \
           [DISPLAY[t] for t in TRANSFER] + ["**Δ 8-task**", "paper Δ 8-task"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    stats_rows = []
    any_unpaired = False
    for a, b, paper in comps:
        label = f"{METHODS[a][3]} − {METHODS[b][3]}"
        cmp_all = compare(greedy.get(a, {}), greedy.get(b, {}), TASKS)
        seeds = cmp_all["seeds"]
        if not seeds:
            L.append(f"| {label} | — | " + " | ".join(["—"] * (len(head) - 3)) + f" | {_signed(paper)} |")
            continue
        d = cmp_all["deltas"]
        avg = {}
        for key, tasks in (("avg5", IN_FORMAT), ("avg8", TASKS)):
            vals = [d[t] for t in tasks]
            avg[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        cells = [_signed(d[t]) for t in IN_FORMAT] + [f"**{_signed(avg['avg5'])}**"] + \
                [_signed(d[t]) for t in TRANSFER] + [f"**{_signed(avg['avg8'])}**", _signed(paper)]
        L.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
        for block, tasks in BLOCKS + [(DISPLAY[t], [t]) for t in TASKS]:
            s = compare(greedy[a], greedy[b], tasks)
            vals = [s["deltas"][t] for t in tasks]
            delta = None if any(v is None for v in vals) else sum(vals) / len(vals)
            any_unpaired |= not s["paired"]
            stats_rows.append((label, block, len(seeds), delta, s))
    L.append("")
    if stats_rows:
        L.append(f"**Significance** (greedy, test examples pooled over the tasks of each block and over the "
                 f"common seeds). Paired: exact two-sided McNemar test on the discordant pairs — b = examples "
                 f"only the Echo variant gets right, c = only the baseline — p = 2·P(X ≤ min(b, c)), "
                 f"X ~ Bin(b + c, ½); and a 95% paired bootstrap CI of the Δ of the task-averaged accuracy "
                 f"({N_BOOT} resamples of the test examples within each task, seed {BOOT_SEED}). Pooling "
                 f"seeds counts each test example once per seed, so p-values over several seeds are "
                 f"optimistic.")
        if any_unpaired:
            L.append("")
            L.append("Rows marked *unpaired* lack per-example correctness (eval.py's per-task "
                     "`\"per_example\": [0/1, …]` list, or its predictions_<task>.jsonl): the paired test needs "
                     "it, so they fall back to an UNPAIRED two-proportion z-test on the pooled counts "
                     "(conservative for paired data); no CI.")
        L.append("")
        blocks = {b for b, _ in BLOCKS}
        for part in ("blocks", "tasks"):
            if part == "tasks":
                L.append("<details><summary>per task</summary>")
                L.append("")
            L.append("| comparison | tasks | seeds | Δ (points) | pairs | b | c | p | 95% CI of Δ |")
            L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
            for label, block, k, delta, s in stats_rows:
                if (block in blocks) != (part == "blocks"):
                    continue
                if s["paired"]:
                    L.append(f"| {label} | {block} | {k} | {_signed(delta, 2)} | {s['pairs']:,} | {s['b']:,} | "
                             f"{s['c']:,} | {_p(s['p'])} | [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}] |")
                else:
                    L.append(f"| {label} | {block} | {k} | {_signed(delta, 2)} | *unpaired* | — | — | "
                             f"{_p(s['p'])} (z = {s['z']:.2f}) | — |")
            L.append("")
            if part == "tasks":
                L.append("</details>")
                L.append("")

    # ---- the published protocol, seed 0
    if beam:
        lim = results.get("beam_limit")
        L.append(f"**Published protocol** (beam search, 4 beams, 32 new tokens; "
                 f"{'full test sets' if not lim else f'first {lim} test examples per task'}; seed 0 only):")
        L.append("")
        head = ["method", "examples"] + [DISPLAY[t] for t in IN_FORMAT] + ["**5-task avg**"] + \
               [DISPLAY[t] for t in TRANSFER] + ["**8-task avg**"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for n in names:
            r = beam.get(n, {}).get(0)
            if r is None:
                continue
            n_ex = sum(t["total"] for t in r["tasks"].values())
            cells = [_fmt(_acc(r["tasks"].get(t))) for t in IN_FORMAT] + [f"**{_fmt(task_avg(r, IN_FORMAT))}**"]
            cells += [_fmt(_acc(r["tasks"].get(t))) for t in TRANSFER] + [f"**{_fmt(task_avg(r, TASKS))}**"]
            L.append(f"| {METHODS[n][3]} | {n_ex:,} | " + " | ".join(cells) + " |")
        L.append("")

    # ---- training cost
    cost = []
    for n in names:
        runs = list(greedy.get(n, {}).values())
        secs = mean_sd([r.get("train_seconds") for r in runs])[0]
        tps = mean_sd([r.get("tokens_per_s") for r in runs])[0]
        mem = mean_sd([r.get("peak_gib") for r in runs])[0]
        dev = sorted({str(r["device"]) for r in runs if r.get("device")})
        jobs = sorted({r.get("concurrent_jobs") or 1 for r in runs})
        if secs is not None or tps is not None or mem is not None:
            cost.append(f"| {METHODS[n][3]} | {_fmt(secs / 60 if secs is not None else None)} | "
                        f"{_fmt(tps, digits=0)} | {_fmt(mem, digits=2)} | {', '.join(dev) or '—'} | "
                        f"{', '.join(map(str, jobs))} |")
    if cost:
        L.append("**Training cost** (mean over seeds; from each run's summary.json; *runs at once*: the `--jobs` "
                 "of the call that trained it, i.e. how many runs could share the GPU, so a speed with more than 1 "
                 "there is not a benchmark; README's speed table is):")
        L.append("")
        L.append("| method | train minutes | tokens/s | peak GiB | device | runs at once |")
        L.append("|---|---:|---:|---:|---|---:|")
        L.extend(cost)
        L.append("")
    lp = results.get("layer_probs")
    if lp and lp.get("file"):
        f = lp["file"]
        if f.endswith(".png"):
            L.append(f"Per-layer probability of the gold answer token (seed 0; up to {lp.get('n')} of the run's "
                     f"held-out validation rows per in-format task, not test rows; each layer's hidden state read out "
                     f"through the final norm + LM head), LoRA vs Echo-LoRA:")
            L.append("")
            L.append(f"![layer probabilities, LoRA vs Echo-LoRA]({f})")
        else:
            L.append(f"Per-layer probability of the gold answer token, LoRA vs Echo-LoRA (seed 0, {lp.get('n')} "
                     f"examples per task): `{f}` (matplotlib was not installed, so no plot).")
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def _num(v):
    if v is None:
        return "?"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    return str(v)


# ================================================================ commands ==============================

def _script(name):
    p = ROOT / name
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") else str(p)


def train_files(data_dir):
    return [Path(data_dir) / t / "train.json" for t in TRAIN_TASKS]


def recipe_flags(args):
    """The train.py flags of the recipe -> (argv list, recipe dict)."""
    pairs = [("--lr", args.lr), ("--epochs", args.epochs), ("--rank", args.rank), ("--alpha", args.alpha),
             ("--global-batch", args.global_batch), ("--micro-batch", args.micro_batch),
             ("--max-len", args.max_len), ("--warmup-steps", args.warmup_steps),
             ("--max-steps", args.max_steps), ("--template", args.template)]
    if args.val_split is not None:
        pairs.append(("--val-split", args.val_split))
    argv, recipe = [], {}
    for flag, v in pairs:
        if v is None:
            continue
        argv += [flag, str(int(v)) if isinstance(v, float) and v.is_integer() and flag != "--lr" else str(v)]
        recipe[flag[2:].replace("-", "_")] = v
    extra = shlex.split(args.train_extra) if args.train_extra else []
    if extra:
        argv += extra
        recipe["extra"] = extra
    return argv, recipe


def train_command(args, name, seed, recipe_argv, decision):
    method, echo, extra, _ = METHODS[name]
    rd = run_dir(args.runs_dir, name, seed)
    cmd = [sys.executable, _script("train.py"), "--model", str(args.model), "--data",
           *[str(f) for f in train_files(args.data_dir)], "--method", method]
    cmd += ["--echo"] if echo else []
    cmd += ["--seed", str(seed), *recipe_argv, *extra, "--out", str(rd)]
    if decision == "resume":
        cmd.append("--resume")
    return cmd


def eval_command(args, adapter, decoding, out):
    cmd = [sys.executable, _script("eval.py"), "--model", str(args.model)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    cmd += ["--data-dir", str(args.data_dir), "--tasks", *TASKS]
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
    cmd += ["--out", str(out)]
    return cmd


def layer_probs_command(args, adapter, out):
    cmd = [sys.executable, _script("eval.py"), "--model", str(args.model), "--adapter", str(adapter),
           "--data-dir", str(args.data_dir), "--tasks", *IN_FORMAT, "--layer-probs", str(args.layer_probs),
           "--limit", "0"]
    if args.eval_batch_size:
        cmd += ["--batch-size", str(args.eval_batch_size)]
    return cmd + ["--out", str(out)]


def beam_limit(args):
    lim = args.beam_limit
    if args.limit:
        lim = args.limit if lim is None else min(lim, args.limit)
    return lim


def run_logged(cmd, log, what, dry_run, move_to=None):
    """Run cmd with stdout+stderr appended to log; a failure is a one-line StepFailed. With move_to, the
    log is appended to move_to afterwards (when move_to's folder exists) and removed."""
    print(("would run: " if dry_run else "") + f"[{what}] " + shlex.join(cmd), flush=True)
    if dry_run:
        return
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if move_to is not None and Path(move_to).parent.is_dir():
        with open(move_to, "a") as f:
            f.write(log.read_text())
        log.unlink()
        log = Path(move_to)
    if code != 0:
        raise StepFailed(f"{what} failed (exit {code}); see {log}")
    print(f"  [{what}] done in {time.time() - t0:.0f}s (log {log})", flush=True)


def train(args, name, seed, recipe_argv, decision):
    """One training run. train.py refuses an --out that holds anything unless --resume / --force, so a
    fresh run logs beside its folder (RUNS/<run>.train.log) and the log moves to RUN/train.log when
    train.py has made the folder; a folder holding a run that died before its first checkpoint is
    restarted with --force (train.py then clears only its own files)."""
    rd = run_dir(args.runs_dir, name, seed)
    what = f"train {name}-s{seed}"
    cmd = train_command(args, name, seed, recipe_argv, decision)
    if decision == "resume":
        return run_logged(cmd, rd / "train.log", what + " (resume)", args.dry_run)
    log = Path(args.runs_dir) / f"{rd.name}.train.log"
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
    run_logged(cmd, log, what, args.dry_run, move_to=rd / "train.log")


def check_eval_limit(path, wanted, what):
    """An existing eval made with another --limit would silently mix protocols: refuse."""
    res = eval_results_path(path)
    raw = _read_json(res) if res else None
    if not isinstance(raw, dict):
        return
    got = eval_limit(raw)
    if got != "unrecorded" and (got or None) != (wanted or None):
        raise StepFailed(f"{what}: {path} was made with --limit {got}, this call asks for {wanted}; "
                         f"delete it or use another --runs-dir")


def _newest(folder):
    """Latest modification time of the files in folder (0 if none)."""
    times = [f.stat().st_mtime for f in Path(folder).glob("*") if f.is_file()] if Path(folder).is_dir() else []
    return max(times, default=0.0)


def ensure_eval(args, adapter, decoding, what):
    out = eval_file(adapter if adapter is not None else Path(args.runs_dir) / "base", decoding)
    wanted = args.limit if decoding == "greedy" else beam_limit(args)
    res = eval_results_path(out)
    if res is not None:
        check_eval_limit(out, wanted, what)
        if adapter is not None and _newest(Path(adapter) / "adapter") > res.stat().st_mtime:
            print(f"[{what}] {out} is older than {Path(adapter) / 'adapter'}: evaluating again")
        else:
            print(f"[{what}] kept {out}")
            compact_predictions(res)
            return
    if adapter is not None and not (Path(adapter) / "adapter").is_dir() and not args.dry_run:
        print(f"[{what}] skipped: {adapter} keeps no adapter/ (adapters are not committed); delete its "
              f"summary.json to train it again", flush=True)
        return
    run_logged(eval_command(args, adapter, decoding, out), out.with_suffix(".log"), what, args.dry_run)
    if not args.dry_run and eval_results_path(out):
        compact_predictions(eval_results_path(out))


def compact_predictions(results_file):
    """Fold what the statistics read of eval.py's per-example records into the results JSON itself: per
    task a '0'/'1' string (test-file order) and the unextracted count. The committed run records then need
    no predictions folder (~2 MB per run; git-ignored in the committed runs folder, kept on disk)."""
    res = Path(results_file)
    raw = _read_json(res)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        return
    changed = False
    for name, t in raw["tasks"].items():
        if not isinstance(t, dict) or (isinstance(t.get("per_example"), str) and t.get("unextracted") is not None):
            continue
        preds = _predictions(res, name)
        if preds is None or len(preds) != int(t.get("total", -1)):
            continue
        t["per_example"] = "".join("1" if r.get("correct") else "0" for r in preds)
        if t.get("unextracted") is None:
            t["unextracted"] = sum(1 for r in preds if r.get("pred") in ("", None) and not r.get("skipped"))
        changed = True
    if changed:
        tmp = res.with_name(res.name + ".tmp")
        tmp.write_text(json.dumps(raw, indent=1) + "\n")
        os.replace(tmp, res)


def find_layer_csv(out):
    """eval.py --layer-probs --out RUN/layer-probs.json writes RUN/layer-probs-layer_probs.csv (beside the
    would-be results file); an older eval.py wrote <out folder>/layer_probs.csv."""
    out = Path(out)
    cands = [out.with_name(out.stem + "-layer_probs.csv"), out / "layer_probs.csv"]
    cands += sorted(out.parent.glob(f"{out.stem}*layer_probs*.csv"))
    for cand in cands:
        if cand.is_file():
            return cand
    return None


def read_layer_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows


def layer_probs_outputs(args, names):
    """Merge the seed-0 layer curves of lora and echo-lora -> merged CSV, and a PNG with matplotlib."""
    curves, per_task = {}, {}
    for n in names:
        csv_path = find_layer_csv(run_dir(args.runs_dir, n, 0) / "layer-probs.json")
        if csv_path is None:
            continue
        rows = read_layer_csv(csv_path)
        curves[n] = [float(r["mean"]) for r in rows]
        per_task[n] = {k: [float(r[k]) for r in rows] for k in rows[0] if k not in ("layer", "mean")}
    if not curves:
        return None
    n_layers = max(len(c) for c in curves.values())
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    out = Path(args.layer_csv)             # the numbers, always; the PNG too when matplotlib is there
    lines = ["layer," + ",".join(f"{n}_mean" for n in curves) + "," +
             ",".join(f"{n}_{t}" for n in curves for t in per_task[n])]
    for l in range(n_layers):
        vals = [f"{curves[n][l]:.6f}" if l < len(curves[n]) else "" for n in curves]
        vals += [f"{per_task[n][t][l]:.6f}" if l < len(per_task[n][t]) else ""
                 for n in curves for t in per_task[n]]
        lines.append(f"{l}," + ",".join(vals))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if plt is None:
        print(f"matplotlib is not installed: wrote the merged curves to {out} instead of a PNG")
    else:
        out = Path(args.layer_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        cfg = _read_json(run_dir(args.runs_dir, "echo-lora", 0) / "config.json") or {}
        echo = cfg.get("echo") or {}
        for key, color, label in (("target_layers", "tab:green", "Echo targets"),
                                  ("source_layers", "tab:orange", "Echo sources")):
            layers = [l % n_layers for l in echo.get(key) or []]
            if layers:
                ax.axvspan(min(layers) - 0.5, max(layers) + 0.5, color=color, alpha=0.12, label=label)
        for n in curves:
            ax.plot(range(len(curves[n])), curves[n], lw=2, label=METHODS[n][3])
        n_tasks = len(next(iter(per_task.values())))
        ax.set_xlabel("layer"), ax.set_ylabel(f"p(gold answer token), mean over {n_tasks} tasks")
        ax.set_title("SmolLM2-135M, seed 0: LoRA vs Echo-LoRA", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"wrote {out}")
    try:
        shown = str(out.resolve().relative_to(ROOT))
    except ValueError:
        shown = str(out)
    return {"file": shown, "n": args.layer_probs, "runs": list(curves)}


# ================================================================ CLI ===================================

def recorded_model(json_path, runs_dir):
    prev = _read_json(json_path) if Path(json_path).is_file() else None
    if isinstance(prev, dict) and isinstance(prev.get("model"), str):
        return prev["model"]
    for d in sorted(Path(runs_dir).glob("*-s*")) if Path(runs_dir).is_dir() else []:
        cfg = _read_json(d / "config.json")
        model = (cfg.get("opts") or {}).get("model") if isinstance(cfg, dict) else None
        if isinstance(model, str):
            return model
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="Meta-layout model folder (see ../shared/tools/gguf_to_meta.py); required unless "
                      "--only-table (then: the one recorded in --json or in the runs' config.json)")
    a("--data-dir", default=str(ROOT.parent / "shared" / "data" / "commonsense"),
      help="folder with <task>/train.json and <task>/test.json")
    a("--methods", nargs="+", default=list(MAIN_METHODS), choices=list(METHODS))
    a("--seeds", nargs="+", type=int, default=list(MAIN_SEEDS))
    a("--runs-dir", default=os.path.relpath(DEFAULT_RUNS),
      help="run folders; the default is committed (adapters and checkpoints are git-ignored there)")
    a("--sweep-lr", nargs="+", type=float, default=None, metavar="LR",
      help="choose the recipe: train LoRA (seed 0, --epochs, --val-split) at each LR into "
           f"{os.path.relpath(SWEEP_DIR)} and tabulate their validation loss / exact match; no test set is read")
    a("--only-table", action="store_true", help="rebuild the JSON and the table from existing files; run nothing")
    a("--dry-run", action="store_true", help="print the commands that would run; write nothing")
    a("--jobs", type=int, default=1, help="runs trained and evaluated at once (on one GPU they share it, so "
                                          "their recorded speed is not a benchmark; the table says so)")
    a("--beam-limit", default="500", help="published-protocol eval (seed 0) on the first N examples per task; "
                                          "'all' = full test sets, 0 = skip it")
    a("--limit", type=int, default=None, help="smoke test: evaluate the first N examples per task (also caps "
                                              "training at N steps unless --max-steps is given)")
    a("--layer-probs", type=int, default=None, metavar="N",
      help="also the per-layer answer probability of seed-0 lora and echo-lora on N examples per task")
    g = p.add_argument_group("recipe (train.py flags)")
    d = " (default %(default)s)"
    g.add_argument("--lr", type=float, default=1e-3, help="chosen for LoRA on the validation split by "
                                                        "--sweep-lr 2e-4 1e-3 3e-3 (the paper's 7B recipe: 2e-4)" + d)
    g.add_argument("--epochs", type=float, default=1, help="(the paper: 3)" + d)
    g.add_argument("--val-split", type=float, default=0.02, help="train.py --val-split (hold-out fraction)" + d)
    g.add_argument("--rank", type=int, default=16, help=d)
    g.add_argument("--alpha", type=float, default=32.0, help=d)
    g.add_argument("--global-batch", type=int, default=16, help=d)
    g.add_argument("--micro-batch", type=int, default=16, help="same loss as 4 x 4 (token mean over the global "
                                                             "batch), faster on one GPU" + d)
    g.add_argument("--max-len", type=int, default=256, help=d)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: train.py's")
    g.add_argument("--max-steps", type=int, default=None, help="default: whole epochs")
    g.add_argument("--template", default=None, help="default: train.py's (alpaca)")
    g.add_argument("--train-extra", default=None, help="more train.py flags, one quoted string")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-batch-size", type=int, default=None, help="eval.py --batch-size (default: eval.py's)")
    e.add_argument("--eval-extra", default=None, help="more eval.py flags, one quoted string")
    o = p.add_argument_group("outputs")
    o.add_argument("--json", default=str(DEFAULT_JSON))
    o.add_argument("--table", default=str(DEFAULT_TABLE))
    o.add_argument("--layer-png", default=None, help="default: layer-probs-lora-vs-echo.png beside --json")
    o.add_argument("--layer-csv", default=None, help="default: layer-probs-lora-vs-echo.csv beside --json")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = None if not args.only_table else recorded_model(args.json, args.runs_dir)
        if args.model is None:
            p.error("--model is required" + (" (no model recorded in --json or the runs' config.json)"
                                             if args.only_table else ""))
    bl = str(args.beam_limit).lower()
    if bl == "all":
        args.beam_limit = None
    else:
        try:
            args.beam_limit = int(bl)
        except ValueError:
            p.error(f"--beam-limit: an integer or 'all', got {args.beam_limit!r}")
        if args.beam_limit < 0:
            p.error("--beam-limit must be >= 0")
    args.run_beam = args.beam_limit != 0
    if args.beam_limit == 0:
        args.beam_limit = None
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.limit and args.max_steps is None:
        args.max_steps = args.limit
    args.layer_png = args.layer_png or str(Path(args.json).parent / "layer-probs-lora-vs-echo.png")
    args.layer_csv = args.layer_csv or str(Path(args.json).parent / "layer-probs-lora-vs-echo.csv")
    args.seeds = list(dict.fromkeys(args.seeds))
    args.methods = list(dict.fromkeys(args.methods))
    return args


def splice_into_readme(fragment, name, readme=ROOT / "README.md"):
    """Replace README's text between <!-- BEGIN name --> and <!-- END name --> with the fragment, so the
    README's numbers are always the tooling's."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = readme.read_text() if readme.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        readme.write_text(head + begin + "\n" + fragment.rstrip() + "\n" + end + rest.split(end, 1)[1])


def tabulate(args, recipe, layer_probs=None):
    prev = _read_json(args.json) if Path(args.json).is_file() else None
    if layer_probs is None and isinstance(prev, dict) and prev.get("layer_probs"):
        layer_probs = prev["layer_probs"]        # keep the figure reference across --only-table rebuilds
    names = list(dict.fromkeys(MAIN_METHODS + args.methods))
    seeds = sorted(set(MAIN_SEEDS) | set(args.seeds))
    results = collect(args.runs_dir, names, seeds, model=args.model, train_files=train_files(args.data_dir),
                      recipe=recipe, limit=args.limit, beam_limit=beam_limit(args) if args.run_beam else None,
                      layer_probs=layer_probs)
    write_json(results, args.json)
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    table = build_table(results) + sweep_table()
    Path(args.table).write_text(table)
    if Path(args.table).resolve() == DEFAULT_TABLE.resolve():     # the real table, not a smoke test's
        splice_into_readme(table, "results/README-table.md")
    state = f"PARTIAL ({results['main_runs_done']} of {N_MAIN} runs)" if results["partial"] else "complete"
    print(f"wrote {args.json} and {args.table}: {state}", flush=True)
    return results


def sweep(args, recipe_argv):
    """--sweep-lr: LoRA, seed 0, one run per learning rate, scored on the validation split only."""
    for lr in args.sweep_lr:
        rd = SWEEP_DIR / f"lora-lr{lr:g}"
        argv = list(recipe_argv)
        argv[argv.index("--lr") + 1] = f"{lr:g}"
        if train_decision(rd) == "skip":
            print(f"[sweep lr {lr:g}] finished ({rd / 'summary.json'}): skipped")
            continue
        cmd = [sys.executable, _script("train.py"), "--model", str(args.model), "--data",
               *[str(f) for f in train_files(args.data_dir)], "--method", "lora", "--seed", "0", *argv,
               "--eval-every", "800", "--out", str(rd)]
        run_logged(cmd, SWEEP_DIR / f"lora-lr{lr:g}.train.log", f"sweep lr {lr:g}", args.dry_run,
                   move_to=rd / "train.log")


def sweep_table():
    """Markdown: each sweep run's validation curve (from its metrics.jsonl), the best marked."""
    rows = []
    for rd in sorted(SWEEP_DIR.glob("lora-lr*"), key=lambda d: float(d.name[len("lora-lr"):])):
        vals = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines()
                if '"val_loss"' in l] if (rd / "metrics.jsonl").is_file() else []
        if vals:
            rows.append((rd.name[len("lora-lr"):], vals))
    if not rows:
        return ""
    best = min(rows, key=lambda r: r[1][-1]["val_loss"])[0]
    steps = [v["step"] for v in rows[0][1]]
    L = ["", f"Recipe choice (`--sweep-lr`): LoRA, seed 0, 1 epoch, validation loss / exact match on the "
             f"{rows[0][1][-1]['val_rows']} held-out rows at steps {', '.join(map(str, steps))} — the test sets are "
             f"not read. Lowest final validation loss: lr {best}.", "",
         "| lr | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for lr, vals in rows:
        cells = [f"{v['val_loss']:.4f} / {100 * v['val_exact']:.1f}%" for v in vals]
        L.append(f"| {'**' + lr + '**' if lr == best else lr} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def run_one(args, name, seed, recipe_argv):
    """Train one {method} x {seed} unless finished, then its evaluations (missing ones only)."""
    rd = run_dir(args.runs_dir, name, seed)
    what = f"{name}-s{seed}"
    decision = train_decision(rd)
    if decision == "skip":
        print(f"[train {what}] finished ({rd / 'summary.json'}): skipped")
    else:
        train(args, name, seed, recipe_argv, decision)
        if not args.dry_run:
            (rd / JOBS_FILE).write_text(json.dumps({"concurrent_jobs": args.jobs}) + "\n")
    ensure_eval(args, rd, "greedy", f"eval {what} greedy")
    if seed == 0 and args.run_beam:
        ensure_eval(args, rd, "beam4", f"eval {what} beam4")


def run_all(args, recipe_argv, recipe):
    """Every {method} x {seed}, seed-major (a partial sweep still pairs methods), --jobs of them at once;
    the JSON and table are rebuilt after each. A failed run does not stop the others; the first failure
    is raised at the end. Ctrl-C, or any other error, starts no further run."""
    units = [(name, seed) for seed in args.seeds for name in args.methods]
    lock, failures, stopping = threading.Lock(), [], threading.Event()

    def unit(name, seed):
        if stopping.is_set():
            return
        try:
            run_one(args, name, seed, recipe_argv)
        except StepFailed as e:
            print(f"error: {e}", flush=True)
            failures.append(e)
        except BaseException:
            stopping.set()                       # before this worker takes the next unit
            raise
        if not args.dry_run:
            with lock:
                tabulate(args, recipe)

    if args.jobs == 1 or args.dry_run:
        for name, seed in units:
            unit(name, seed)
    else:
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        try:
            for f in [pool.submit(unit, name, seed) for name, seed in units]:
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


def main(argv=None):
    args = parse_args(argv)
    recipe_argv, recipe = recipe_flags(args)
    try:
        if args.sweep_lr:
            sweep(args, recipe_argv)
            if not args.dry_run:
                print(sweep_table())
            return
        if not args.only_table:
            for f in train_files(args.data_dir):
                if not f.is_file() and not args.dry_run:
                    raise StepFailed(f"train file {f} not found (--data-dir)")
            ensure_eval(args, None, "greedy", "eval base greedy")
            run_all(args, recipe_argv, recipe)
        layer_probs = None
        if args.layer_probs:
            lp_names = [n for n in ("lora", "echo-lora")]
            if not args.only_table:
                for n in lp_names:
                    rd = run_dir(args.runs_dir, n, 0)
                    out = rd / "layer-probs.json"
                    if find_layer_csv(out) is not None:
                        print(f"[layer-probs {n}-s0] kept {find_layer_csv(out)}")
                        continue
                    if not (rd / "adapter").is_dir() and not args.dry_run:
                        raise StepFailed(f"layer-probs {n}-s0: {rd} has no adapter/ (train it first: "
                                         f"--methods {n} --seeds 0)")
                    run_logged(layer_probs_command(args, rd, out), rd / "eval-layer-probs.log",
                               f"layer-probs {n}-s0", args.dry_run)
            if not args.dry_run:
                layer_probs = layer_probs_outputs(args, lp_names)
        if args.dry_run:
            print(f"(dry run: nothing ran; would write {args.json} and {args.table})")
            return
        tabulate(args, recipe, layer_probs)
    except StepFailed as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
