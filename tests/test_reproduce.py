"""experiments/ (python -m experiments.reproduce): statistics against known values, the JSON/table builder on synthetic eval files,
skip/resume decisions, --dry-run command lines, one-line failures. No training, no torch, CPU, fast."""
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED, needs_shared

from experiments import collect as CO, common as C, evals as E, figures as F, recipes as RC, reproduce as rp, \
    runs as R, stats as S, tables as T

TASKS = C.TASKS
SIZES = {"boolq": 40, "piqa": 30, "social_i_qa": 30, "hellaswag": 50, "winogrande": 20, "ARC-Easy": 30,
         "ARC-Challenge": 20, "openbookqa": 20}


# ------------------------------------------------------------------ synthetic run folders

def flags(n, k, seed):
    """n 0/1 flags with exactly k ones, positions fixed by seed."""
    idx = random.Random(seed).sample(range(n), k)
    out = [0] * n
    for i in idx:
        out[i] = 1
    return out


def write_eval(path, per_task, *, per_example=False, unextracted=None, limit=None, layout="file"):
    """per_task: {task: list of 0/1}. layout 'file': today's eval.py — the results JSON at path (per task
    correct/total/accuracy/unextracted/skipped, top-level settings) and <stem>-predictions/<task>.jsonl
    beside it; with per_example=True the per-task "per_example" list instead of the predictions. layout
    'folder': an older eval.py whose --out was a folder: path/results.json + path/predictions_<task>.jsonl."""
    path = Path(path)
    tasks = {}
    for t, f in per_task.items():
        tasks[t] = {"correct": sum(f), "total": len(f), "accuracy": sum(f) / len(f),
                    "unextracted": (unextracted or {}).get(t, 0), "skipped": 0}
        if per_example:
            tasks[t]["per_example"] = list(f)
    if layout == "file":
        res, preds = path, path.with_name(path.stem + "-predictions")
    else:
        res, preds = path / "results.json", path
        for t in tasks:
            del tasks[t]["unextracted"]
    res.parent.mkdir(parents=True, exist_ok=True)
    if per_example is not None and not per_example:
        preds.mkdir(parents=True, exist_ok=True)
        for t, f in per_task.items():
            n_unex = (unextracted or {}).get(t, 0)
            name = f"{t}.jsonl" if layout == "file" else f"predictions_{t}.jsonl"
            with open(preds / name, "w") as fh:
                for i, c in enumerate(f):
                    pred = "" if i >= len(f) - n_unex else ("gold" if c else "x")
                    fh.write(json.dumps({"correct": bool(c), "pred": pred, "skipped": False}) + "\n")
    tmp = res.with_name(res.name + ".tmp")       # last and atomic, as eval.py writes it: --jobs readers never
    tmp.write_text(json.dumps({"decoding": "greedy", "num_beams": 1, "limit": limit, "device": "cpu",  # see half
                               "tasks": tasks}))
    tmp.replace(res)


def accs_run(accs, seed, **kw):
    """accs: {task: correct count} -> per-task flags."""
    return {t: flags(SIZES[t], accs[t], seed * 100 + i) for i, t in enumerate(TASKS)}


def make_finished(runs, name, seed, per_task, summary=None, **kw):
    rd = R.run_dir(runs, name, seed)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "summary.json").write_text(json.dumps(summary or {"steps": 10, "train_seconds": 120.0,
                                                            "tokens_per_s": 1000.0, "peak_gib": 1.5,
                                                            "device": "cpu"}))
    write_eval(E.eval_file(rd, "greedy"), per_task, **kw)
    return rd


def build(tmp_path, runs, **kw):
    res = CO.collect(runs, list(RC.METHODS), [0, 1, 2], model="m", train_files=["a", "b"],
                     recipe={"lr": 2e-4, "epochs": 3}, **kw)
    return res, T.build_table(res)


BASE_ACC = {"boolq": 20, "piqa": 15, "social_i_qa": 12, "hellaswag": 20, "winogrande": 10, "ARC-Easy": 15,
            "ARC-Challenge": 8, "openbookqa": 10}


def shifted(delta_by_seed):
    return {t: BASE_ACC[t] + delta_by_seed for t in TASKS}


# ------------------------------------------------------------------ statistics

def test_mcnemar_exact_known_values():
    assert S.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096, abs=1e-12)
    assert S.mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert S.mcnemar_exact(2, 10) == S.mcnemar_exact(10, 2)            # two-sided: symmetric
    assert S.mcnemar_exact(0, 0) == 1.0 and S.mcnemar_exact(5, 5) == 1.0 and S.mcnemar_exact(1, 0) == 1.0
    assert S.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    for b, c in [(3, 9), (17, 4), (40, 25)]:                                # against the textbook sum
        n = b + c
        ref = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
        assert S.mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-12)
    # large n: close to the continuity-corrected chi-square (normal) approximation
    b, c = 5200, 4800
    z = (abs(b - c) - 1) / math.sqrt(b + c)
    assert S.mcnemar_exact(b, c) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)


def test_binomial_cdf_edges():
    assert S.binom_half_cdf(-1, 5) == 0.0 and S.binom_half_cdf(5, 5) == 1.0
    assert S.binom_half_cdf(2, 4) == pytest.approx(11 / 16)


def test_two_proportion_z_known_value():
    z, p = S.two_proportion_z(60, 100, 50, 100)
    assert z == pytest.approx(1.4213, abs=1e-4) and p == pytest.approx(0.1552, abs=1e-4)


def test_mean_sd():
    assert S.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert S.mean_sd([4.0]) == (4.0, None) and S.mean_sd([]) == (None, None)


def test_paired_bootstrap_deterministic_and_sane():
    rng = np.random.default_rng(1)
    diffs = [rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=n) for n in (200, 50, 500)]
    a, b = S.paired_bootstrap_ci(diffs), S.paired_bootstrap_ci(diffs)
    assert a == b                                                           # fixed seed
    assert S.paired_bootstrap_ci(diffs, seed=7) != a
    point = np.mean([d.mean() for d in diffs])
    assert a[0] < point < a[1]
    # same spread as resampling example indices directly
    idx_stats = [np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in diffs]) for _ in range(2000)]
    lo, hi = np.quantile(idx_stats, [0.025, 0.975])
    assert abs((a[1] - a[0]) - (hi - lo)) < 0.25 * (hi - lo)
    assert S.paired_bootstrap_ci([np.zeros(30)]) == (0.0, 0.0)


# ------------------------------------------------------------------ JSON + table

@pytest.fixture
def partial_runs(tmp_path):
    runs = tmp_path / "runs"
    for s in (0, 1, 2):
        make_finished(runs, "lora", s, accs_run(shifted(s), s))                 # +0, +1, +2 over base
        make_finished(runs, "echo-lora", s, accs_run(shifted(s + 3), s + 10))   # +3, +4, +5
    make_finished(runs, "dora", 0, accs_run(shifted(1), 20))
    write_eval(runs / "base" / "eval-greedy.json", accs_run(BASE_ACC, 99))
    return runs


def test_json_shape_and_partial(tmp_path, partial_runs):
    res, table = build(tmp_path, partial_runs)
    assert res["partial"] is True and res["main_runs_done"] == 7
    assert "PARTIAL (7 of 12 runs)" in table
    greedy = [r for r in res["runs"] if r["decoding"] == "greedy"]
    assert len(greedy) == 7
    r = next(r for r in greedy if r["name"] == "echo-lora" and r["seed"] == 1)
    assert (r["method"], r["echo"], r["seed"]) == ("lora", True, 1)
    assert set(r["tasks"]) == set(TASKS)
    assert r["tasks"]["boolq"]["correct"] == BASE_ACC["boolq"] + 4 and r["tasks"]["boolq"]["total"] == 40
    assert r["tasks"]["boolq"]["unextracted"] == 0
    assert r["train_seconds"] == 120.0 and r["peak_gib"] == 1.5 and r["device"] == "cpu"
    assert res["base"]["tasks"]["piqa"]["correct"] == BASE_ACC["piqa"]
    path = tmp_path / "out.json"
    CO.write_json(res, path)
    assert json.loads(path.read_text())["partial"] is True


def test_table_means_sd_and_averages(tmp_path, partial_runs):
    res, table = build(tmp_path, partial_runs)
    lora_row = next(l for l in table.splitlines() if l.startswith("| LoRA |"))
    cells = [c.strip() for c in lora_row.strip("|").split("|")]
    # boolq: (20, 21, 22)/40 -> 50.0, 52.5, 55.0: mean 52.5, sd 2.5
    assert cells[1] == "3" and cells[2] == "52.5 ± 2.5"
    avg5 = [np.mean([100 * (BASE_ACC[t] + s) / SIZES[t] for t in C.IN_FORMAT]) for s in (0, 1, 2)]
    avg8 = [np.mean([100 * (BASE_ACC[t] + s) / SIZES[t] for t in TASKS]) for s in (0, 1, 2)]
    assert cells[7] == f"**{np.mean(avg5):.1f} ± {np.std(avg5, ddof=1):.1f}**"
    assert cells[-1] == f"**{np.mean(avg8):.1f} ± {np.std(avg8, ddof=1):.1f}**"
    assert abs(np.mean(avg5) - np.mean(avg8)) > 0.1                      # the two averages differ here
    assert "(u 0%)" in cells[8]                                          # piqa: transfer task shows u
    assert "(u" not in cells[2]
    dora_row = next(l for l in table.splitlines() if l.startswith("| DoRA |"))
    assert "| 1 of 3 |" in dora_row and "±" not in dora_row             # one seed: no sd
    assert next(l for l in table.splitlines() if l.startswith("| Echo-DoRA |")).count("—") >= 10
    assert "| base model (no adapter) | 1 |" in table


def test_table_deltas_and_paired_test(tmp_path, partial_runs):
    res, table = build(tmp_path, partial_runs)
    row = next(l for l in table.splitlines() if l.startswith("| Echo-LoRA − LoRA |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3"
    # every task gets +3 correct per seed: boolq +3/40 = +7.5 points
    assert cells[2] == "+7.5"
    d8 = np.mean([100 * 3 / SIZES[t] for t in TASKS])
    assert cells[-2] == f"**{d8:+.1f}**" and cells[-1] == "+3.0"
    assert "| Echo-DoRA − DoRA | — |" in table and "+2.7" in table
    stats = next(l for l in table.splitlines() if l.startswith("| Echo-LoRA − LoRA | 8 tasks |"))
    cells = [c.strip() for c in stats.strip("|").split("|")]
    treated = {s: r for s, r in T.by_name(res, "greedy")["echo-lora"].items()}
    control = T.by_name(res, "greedy")["lora"]
    c = T.compare(treated, control, TASKS)
    assert c["paired"] and c["pairs"] == 3 * sum(SIZES.values())
    assert c["b"] - c["c"] == 3 * 3 * len(TASKS)                          # net +3 per task per seed
    assert cells[5] == f"{c['b']:,}" and cells[6] == f"{c['c']:,}"
    assert cells[7] == T._p(S.mcnemar_exact(c["b"], c["c"]))
    lo, hi = c["ci"]
    assert lo < d8 < hi
    assert "unpaired" not in table


def test_zero_accuracy_deltas_are_numbers(tmp_path):
    runs = tmp_path / "runs"
    zero = {t: 0 for t in TASKS}
    make_finished(runs, "lora", 0, accs_run(zero, 0))
    make_finished(runs, "echo-lora", 0, accs_run({**zero, "boolq": 4}, 0))
    _, table = build(tmp_path, runs)
    row = next(l for l in table.splitlines() if l.startswith("| Echo-LoRA − LoRA |"))
    assert "| +10.0 | +0.0 |" in row and "—" not in row


def test_eval_older_than_adapter_is_redone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(R.subprocess, "call", fake_call(calls))
    rd = make_finished(tmp_path / "runs", "lora", 0, accs_run(BASE_ACC, 0))
    (rd / "adapter").mkdir()
    (rd / "adapter" / "adapter_config.json").write_text("{}")
    args = rp.parse_args(["--model", "M", "--runs-dir", str(tmp_path / "runs")])
    past = E.eval_file(rd, "greedy").stat().st_mtime - 100
    os.utime(E.eval_file(rd, "greedy"), (past, past))
    R.ensure_eval(args, rd, "greedy", "eval lora-s0 greedy")
    assert len(calls) == 1
    R.ensure_eval(args, rd, "greedy", "eval lora-s0 greedy")            # now newer: kept
    assert len(calls) == 1


def test_limits_come_from_the_eval_files(tmp_path):
    runs = tmp_path / "runs"
    make_finished(runs, "lora", 0, accs_run(BASE_ACC, 0), limit=50)
    res, table = build(tmp_path, runs)                                   # flags say nothing about limits
    assert res["limit"] == 50 and "SMOKE TEST" in table and "first 50 test examples" in table
    res, table = build(tmp_path, make_finished(tmp_path / "full", "lora", 0, accs_run(BASE_ACC, 0)).parent,
                       limit=7)
    assert res["limit"] is None and "SMOKE" not in table and "full test sets" in table


def test_complete_sweep_not_partial(tmp_path):
    runs = tmp_path / "runs"
    for name in RC.MAIN_METHODS:
        for s in RC.MAIN_SEEDS:
            make_finished(runs, name, s, accs_run(shifted(s), s))
    res, table = build(tmp_path, runs)
    assert res["partial"] is False and res["main_runs_done"] == 12
    assert "PARTIAL" not in table


def test_unpaired_fallback_without_per_example(tmp_path):
    runs = tmp_path / "runs"
    for name, d in (("lora", 0), ("echo-lora", 5)):
        make_finished(runs, name, 0, accs_run(shifted(d), 0), per_example=None)   # neither field nor files
    res, table = build(tmp_path, runs)
    assert all(t["per_example"] is None for r in res["runs"] for t in r["tasks"].values())
    assert "*unpaired*" in table and "paired test needs" in table and "two-proportion z-test" in table
    c = T.compare(T.by_name(res, "greedy")["echo-lora"], T.by_name(res, "greedy")["lora"], TASKS)
    n = sum(SIZES.values())
    ref = S.two_proportion_z(sum(BASE_ACC.values()) + 40, n, sum(BASE_ACC.values()), n)
    assert not c["paired"] and c["p"] == pytest.approx(ref[1])


@pytest.mark.parametrize("layout,per_example", [("file", False), ("file", True), ("folder", False)])
def test_eval_layouts(tmp_path, layout, per_example):
    """Per-example correctness from eval.py's <stem>-predictions/<task>.jsonl, from a per-task
    "per_example" list, or from an older eval.py's folder layout; unextracted from the task entry or
    counted from the predictions."""
    per = accs_run(BASE_ACC, 3)
    out = tmp_path / "run" / "eval-greedy.json"
    write_eval(out, per, layout=layout, per_example=per_example, unextracted={"piqa": 4})
    ev = E.load_eval(out)
    assert ev["tasks"]["piqa"]["unextracted"] == 4
    assert ev["tasks"]["boolq"]["per_example"] == "".join(map(str, per["boolq"]))
    assert ev["tasks"]["boolq"]["correct"] == BASE_ACC["boolq"]
    assert ev["settings"]["decoding"] == "greedy" and ev["settings"]["device"] == "cpu"


def test_layer_probs_merge(tmp_path):
    runs = tmp_path / "runs"
    for n, scale in (("lora", 1.0), ("echo-lora", 2.0)):
        d = R.run_dir(runs, n, 0)
        d.mkdir(parents=True)
        (d / "layer-probs-layer_probs.csv").write_text("layer,boolq,mean\n" + "".join(
            f"{l},{0.01 * l * scale:.6f},{0.02 * l * scale:.6f}\n" for l in range(4)))
    info = F.layer_probs_outputs(runs, ["lora", "echo-lora"], tmp_path / "lp.csv", tmp_path / "lp.png", 5,
                                 {"lora": "LoRA", "echo-lora": "Echo-LoRA"})
    assert info["runs"] == ["lora", "echo-lora"] and info["n"] == 5
    if info["file"].endswith(".csv"):
        lines = (tmp_path / "lp.csv").read_text().splitlines()
        assert lines[0].startswith("layer,lora_mean,echo-lora_mean")
        assert lines[3].split(",")[:3] == ["2", "0.040000", "0.080000"]
    else:
        assert (tmp_path / "lp.png").stat().st_size > 0
    res = CO.collect(runs, ["lora"], [0], model="m", train_files=[], recipe={}, layer_probs=info)
    assert "LoRA vs Echo-LoRA" in T.build_table(res)


# ------------------------------------------------------------------ decisions and commands

def test_train_decision(tmp_path):
    rd = tmp_path / "run"
    assert R.train_decision(rd) == "fresh"
    (rd / "checkpoint").mkdir(parents=True)
    (rd / "checkpoint" / "state.pt.tmp").write_text("")                  # half-written: nothing to resume
    assert R.train_decision(rd) == "fresh"
    (rd / "checkpoint" / "state.pt").write_text("")
    assert R.train_decision(rd) == "resume"
    (rd / "summary.json").write_text("{}")
    assert R.train_decision(rd) == "skip"


def dry_run(tmp_path, *extra):
    cmd = [sys.executable, "-m", "experiments.reproduce", "--recipe", "1epoch-lr1e-3", "--model", "M", "--data-dir", "D",
           "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"),
           "--table", str(tmp_path / "t.md"), "--dry-run", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_dry_run_command_lines(tmp_path):
    runs = tmp_path / "runs"
    (runs / "lora-s0").mkdir(parents=True)
    (runs / "lora-s0" / "summary.json").write_text("{}")                 # finished: skip
    (runs / "dora-s1" / "checkpoint").mkdir(parents=True)                # interrupted: resume
    (runs / "dora-s1" / "checkpoint" / "state.pt").write_text("")
    (runs / "echo-dora-s2").mkdir(parents=True)                          # died before its first checkpoint
    (runs / "echo-dora-s2" / "config.json").write_text("{}")
    lines = dry_run(tmp_path)
    train = [l for l in lines if l.startswith("would run: [train")]
    assert len(train) == 11                                              # 12 minus the finished one
    assert any("lora-s0" in l and "skipped" in l for l in lines)
    el = next(l for l in train if "[train echo-lora-s2]" in l)
    data = " ".join(f"D/{t}/train.json" for t in C.TRAIN_TASKS)
    assert f"train.py --model M --data {data} --method lora --echo --seed 2 --lr 0.001 --epochs 1 " in el
    assert f"--out {runs / 'echo-lora-s2'}" in el and "--resume" not in el
    assert "--val-split 0.02" in el
    d1 = next(l for l in train if "[train dora-s1" in l)
    assert "--method dora" in d1 and "--echo" not in d1 and d1.endswith("--resume")
    assert not any("--force" in l for l in train if "echo-dora-s2" not in l)
    assert next(l for l in train if "[train echo-dora-s2" in l).endswith("--force")
    evals = [l for l in lines if l.startswith("would run: [eval")]
    base = next(l for l in evals if "[eval base greedy]" in l)
    assert "--adapter" not in base and base.endswith(f"--out {runs / 'base' / 'eval-greedy.json'}")
    g = next(l for l in evals if "[eval echo-dora-s1 greedy]" in l)
    assert (f"eval.py --model M --adapter {runs / 'echo-dora-s1'} --data-dir D --tasks "
            + " ".join(C.TASKS) + " --greedy") in g and "--limit" not in g
    assert g.endswith(f"--out {runs / 'echo-dora-s1' / 'eval-greedy.json'}")
    beams = [l for l in evals if "beam4]" in l]
    assert len(beams) == 4 and all("-s0 beam4" in l for l in beams)
    assert all("--num-beams 4 --max-new-tokens 32 --limit 500" in l for l in beams)
    assert len(evals) == 1 + 12 + 4
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "t.md").exists()


def test_dry_run_ablation_smoke_and_layer_probs(tmp_path):
    lines = dry_run(tmp_path, "--methods", "echo-lora-norouting", "--seeds", "0", "--limit", "8",
                    "--beam-limit", "all", "--layer-probs", "20", "--lr", "1e-3")
    t = next(l for l in lines if l.startswith("would run: [train"))
    assert "--echo --seed 0 --lr 0.001" in t and "--max-steps 8" in t
    assert "--echo-p-start 1 --echo-p-end 1" in t and "echo-lora-norouting-s0" in t
    assert "--greedy --limit 8" in next(l for l in lines if "greedy]" in l and "norouting" in l)
    assert "--max-new-tokens 32 --limit 8" in next(l for l in lines if "beam4]" in l)
    lp = [l for l in lines if "[layer-probs" in l]
    assert len(lp) == 2 and all("--layer-probs 20 --limit 0" in l for l in lp)
    # only the in-format tasks: the run's held-out rows (what --layer-probs reads) come from their train sets
    assert all("--tasks boolq social_i_qa ARC-Easy ARC-Challenge openbookqa --layer-probs" in l for l in lp)


def test_beam_limit_zero_skips_beam(tmp_path):
    assert not [l for l in dry_run(tmp_path, "--beam-limit", "0", "--seeds", "0") if "beam4" in l]


# ------------------------------------------------------------------ orchestration with fake subprocesses

def opts_of(cmd):
    """What train.py records in config.json's opts for a command line (the subset the tables check)."""
    i = cmd.index("--data")
    data, j = [], i + 1
    while not cmd[j].startswith("--"):
        data.append(cmd[j])
        j += 1
    opts = {"data": data, "echo": "--echo" in cmd}
    k = 0
    while k < len(cmd):
        if cmd[k].startswith("--") and cmd[k] not in ("--data", "--echo", "--out", "--resume", "--force") \
                and k + 1 < len(cmd) and not cmd[k + 1].startswith("--"):
            v = cmd[k + 1]
            try:
                v = float(v) if any(ch in v for ch in ".e") else int(v)
            except ValueError:
                pass
            opts[cmd[k][2:].replace("-", "_")] = v
        k += 1
    opts.update(RC.extra_opts(cmd[cmd.index("--seed"):]))
    return opts


def fake_call(log):
    """Stands in for subprocess.call: train writes summary.json + adapter/, eval writes its results."""
    def call(cmd, stdout=None, stderr=None, env=None):
        log.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        if cmd[1].endswith("train.py"):
            if out.exists() and any(out.iterdir()) and not {"--resume", "--force"} & set(cmd):
                return 1                                  # train.py refuses to overwrite a folder
            out.mkdir(parents=True, exist_ok=True)
            for name, record in (("config.json", {"opts": opts_of(cmd)}),
                                 ("summary.json", {"train_seconds": 3.0, "device": "fake"})):
                (out / "adapter").mkdir(exist_ok=True)
                (out / (name + ".tmp")).write_text(json.dumps(record))     # atomic, as train.py writes them
                (out / (name + ".tmp")).replace(out / name)
        else:
            lim = int(cmd[cmd.index("--limit") + 1]) if "--limit" in cmd else None
            write_eval(out, accs_run(BASE_ACC, len(log)), limit=lim)
        stdout.write("fake output\n")
        return 0
    return call


def test_orchestration_skips_what_exists(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(R.subprocess, "call", fake_call(calls))
    (tmp_path / "M").mkdir()
    argv = ["--recipe", "1epoch-lr1e-3", "--model", str(tmp_path / "M"), "--data-dir", str(tmp_path / "data"),
            "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md"),
            "--methods", "lora", "echo-lora", "--seeds", "0", "1"]
    for t in C.TRAIN_TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.json").write_text("[]")
    rp.main(argv)
    assert sum(c[1].endswith("train.py") for c in calls) == 4
    assert sum(c[1].endswith("eval.py") for c in calls) == 1 + 4 + 2        # base, greedy, beam4 for seed 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["partial"] and res["main_runs_done"] == 4 and res["recipe"]["lr"] == 1e-3
    assert "PARTIAL (4 of 12 runs)" in (tmp_path / "t.md").read_text()
    assert res["runs"][0]["train_seconds"] == 3.0 and res["runs"][0]["tokens_per_s"] is None
    assert (tmp_path / "runs" / "lora-s0" / "train.log").read_text().count("fake output") == 1
    assert not list((tmp_path / "runs").glob("*.train.log"))              # moved into the run folders
    calls.clear()
    rp.main(argv)                                                           # everything exists now
    assert calls == []
    rp.main(argv + ["--only-table"])
    assert calls == []
    no_model = [a for a in argv if a != str(tmp_path / "M")]
    no_model.remove("--model")
    rp.main(no_model + ["--only-table"])                                    # the model recorded in the JSON
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "<M>"     # a placeholder, not this machine's path


def test_jobs_run_at_once_and_are_recorded(tmp_path, monkeypatch):
    """--jobs 3: the same runs and evals as one at a time, at least two in flight together, and each
    run's record (and the cost table) says its speed was shared."""
    calls, inflight, most = [], [0], [0]
    inner, lock = fake_call(calls), __import__("threading").Lock()

    envs = []

    def slow(cmd, stdout=None, stderr=None, env=None):
        envs.append(env)
        with lock:
            inflight[0] += 1
            most[0] = max(most[0], inflight[0])
        time.sleep(0.05)
        try:
            with lock:
                return inner(cmd, stdout, stderr)
        finally:
            with lock:
                inflight[0] -= 1
    monkeypatch.setattr(R.subprocess, "call", slow)
    for t in C.TRAIN_TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.json").write_text("[]")
    rp.main(["--recipe", "1epoch-lr1e-3", "--model", "M", "--data-dir", str(tmp_path / "data"), "--runs-dir",
             str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md"),
             "--methods", "lora", "echo-lora", "dora", "--seeds", "0", "1", "--jobs", "3"])
    assert sum(c[1].endswith("train.py") for c in calls) == 6
    assert sum(c[1].endswith("eval.py") for c in calls) == 1 + 6 + 3
    assert most[0] >= 2
    assert all(e is not None and int(e["OMP_NUM_THREADS"]) >= 1 for e in envs)   # few threads per job
    res = json.loads((tmp_path / "r.json").read_text())
    assert {r["concurrent_jobs"] for r in res["runs"]} == {3} and res["main_runs_done"] == 6
    assert "| runs at once |" in (tmp_path / "t.md").read_text()
    assert "| fake | 3 |" in (tmp_path / "t.md").read_text()


def test_gpus_spread_the_jobs(tmp_path, monkeypatch):
    """--jobs 4 --gpus 0 1: each train.py / eval.py sees one GPU, no GPU has more than 2 of them at once and both
    are used; a run's eval runs on its run's GPU; each run records 2 runs at once (per GPU), not 4. Ids count among
    the GPUs this process sees (CUDA_VISIBLE_DEVICES=6,7 -> physical 6 and 7)."""
    calls, inner, lock = [], fake_call([]), __import__("threading").Lock()
    on_gpu, most, gpu_of = {}, {}, {}

    def spy(cmd, stdout=None, stderr=None, env=None):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        run = Path(cmd[cmd.index("--out") + 1])
        run = run if cmd[1].endswith("train.py") else run.parent
        with lock:
            calls.append((cmd[1], run.name, gpu))
            on_gpu[gpu] = on_gpu.get(gpu, 0) + 1
            most[gpu] = max(most.get(gpu, 0), on_gpu[gpu])
        time.sleep(0.03)
        try:
            with lock:
                return inner(cmd, stdout, stderr)
        finally:
            with lock:
                on_gpu[gpu] -= 1
    monkeypatch.setattr(R.subprocess, "call", spy)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    for t in C.TRAIN_TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.json").write_text("[]")
    write_eval(tmp_path / "runs" / "base" / "eval-greedy.json", accs_run(BASE_ACC, 0))
    rp.main(["--recipe", "1epoch-lr1e-3", "--model", "M", "--data-dir", str(tmp_path / "data"), "--runs-dir",
             str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md"),
             "--methods", "lora", "echo-lora", "--seeds", "0", "1", "2", "--jobs", "4", "--gpus", "0", "1"])
    assert len(calls) == 6 + 6 + 2 and {g for _, _, g in calls} == {"6", "7"}
    assert max(most.values()) <= 2
    trained_on = {run: g for script, run, g in calls if script.endswith("train.py")}
    assert all(g == trained_on[run] for script, run, g in calls if script.endswith("eval.py"))
    res = json.loads((tmp_path / "r.json").read_text())
    assert {r["concurrent_jobs"] for r in res["runs"]} == {2}


@pytest.mark.parametrize("gpus, count, words", [(["2"], 2, "--gpus 2: this machine shows 2 CUDA GPUs (ids 0-1)"),
                                                (["0"], 0, "--gpus 0: this machine shows 0 CUDA GPUs;")])
def test_gpus_that_are_not_there_are_refused(tmp_path, monkeypatch, capsys, gpus, count, words):
    monkeypatch.setattr("torch.cuda.device_count", lambda: count)
    monkeypatch.setattr(R.subprocess, "call", lambda *a, **k: pytest.fail("started a run"))
    with pytest.raises(SystemExit) as e:
        rp.main(["--model", "M", "--runs-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json"),
                 "--table", str(tmp_path / "t.md"), "--jobs", "2", "--gpus", *gpus])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1 and err.startswith("error: " + words), err


@pytest.mark.parametrize("makes_folder", [False, True])
def test_failure_is_one_line(tmp_path, monkeypatch, makes_folder):
    def failing(cmd, stdout=None, stderr=None, env=None):
        if makes_folder:
            Path(cmd[cmd.index("--out") + 1]).mkdir(parents=True)
        stdout.write("Traceback ... boom\n")
        return 3
    monkeypatch.setattr(R.subprocess, "call", failing)
    for t in C.TRAIN_TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.json").write_text("[]")
    write_eval(tmp_path / "runs" / "base" / "eval-greedy.json", accs_run(BASE_ACC, 0))
    with pytest.raises(SystemExit) as e:
        rp.main(["--model", "M", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
                 "--json", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md"), "--seeds", "0"])
    # train.py failing before it made the run folder (bad flag, bad model): the log stays beside it
    log = tmp_path / "runs" / ("lora-s0/train.log" if makes_folder else "lora-s0.train.log")
    assert str(e.value) == f"error: train lora-s0 failed (exit 3); see {log}"
    assert "boom" in log.read_text()
    calls = []
    monkeypatch.setattr(R.subprocess, "call", fake_call(calls))           # the next attempt succeeds
    rp.main(["--model", "M", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
             "--json", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md"), "--seeds", "0"])
    assert "--force" not in calls[0]
    text = (tmp_path / "runs" / "lora-s0" / "train.log").read_text()
    assert "boom" in text and "fake output" in text                       # both attempts in one log


def test_eval_made_with_another_limit_is_refused(tmp_path):
    write_eval(tmp_path / "runs" / "base" / "eval-greedy.json", accs_run(BASE_ACC, 0), limit=8)
    with pytest.raises(SystemExit) as e:
        rp.main(["--model", "M", "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
                 "--json", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md"), "--dry-run"])
    assert "made with --limit 8" in str(e.value) and "\n" not in str(e.value)


def test_speed_table_real_loop_against_its_step(tmp_path, monkeypatch):
    """experiments/speed_table.py: per shape real ms vs benchmark ms, and the overall ratio = the benchmark's
    time over the real time for the same steps (here 300·9 + 200·11 ms against 300·10 + 200·12 ms)."""
    from experiments import speed_table as st
    d = tmp_path / "speed" / "real-vs-step-x"
    d.mkdir(parents=True)
    shapes = [{"routed": False, "micro_batches": [[16, 96, 16]], "steps": 300, "ms": 10.0, "padded_tokens": 300 * 16 * 96,
               "tokens": 1},
              {"routed": False, "micro_batches": [[16, 128, 16]], "steps": 200, "ms": 12.0,
               "padded_tokens": 200 * 16 * 128, "tokens": 1},
              {"routed": False, "micro_batches": [[16, 256, 16]], "steps": 7, "ms": 20.0, "padded_tokens": 1, "tokens": 1}]
    (d / "summary.json").write_text(json.dumps({"steps": 600, "micro_batch": 16, "device": "X", "method": "lora",
                                                "echo": False, "steady_by_shape": shapes, "tokens_per_s": 1234.4,
                                                "padded_tokens_per_s": 2000.0, "peak_gib": 2.5,
                                                "warmup_seconds": 30.2, "batch_shapes": 4}))
    (d / "measured.json").write_text(json.dumps({"weights": "random", "save_every": 200}))
    (d / "benchmark.jsonl").write_text("".join(json.dumps({"echo": "off", "batch": 16, "seq": T, "ms": ms}) + "\n"
                                               for T, ms in ((96, 50.0), (96, 9.0), (128, 11.0))))
    monkeypatch.setattr(st, "HERE", tmp_path)
    text = "\n".join(st.real_vs_step())
    assert f"**{(300 * 9 + 200 * 11) / (300 * 10 + 200 * 12):.2f}×**" in text
    assert "cover 500 of the 507 steady steps" in text
    assert "| 16 × 96 (P 16) | off | 300 | 10.0 | 9.0 | 0.90 |" in text and "16 × 256" not in text
    ratio = (300 * 9 + 200 * 11) / (300 * 10 + 200 * 12)
    assert f"| x | random | 600 | 200 | 1,234 | 2,000 | {ratio:.2f}× | 2.50 | 30 | 4 | X |" in text   # the overview


def test_compaction_folds_correctness_into_the_results_file(tmp_path):
    """After compact_predictions the statistics no longer need the predictions folder (it is not
    committed): the same per-example string and unextracted count come from the results JSON alone."""
    res = tmp_path / "eval-greedy.json"
    res.write_text(json.dumps({"tasks": {"boolq": {"correct": 2, "total": 4}}, "limit": None}))
    pred = tmp_path / "eval-greedy-predictions"
    pred.mkdir()
    rows = [{"pred": "true", "answer": "true", "correct": True, "prompt": "long text"},
            {"pred": "", "answer": "false", "correct": False}, {"pred": "", "answer": "true", "correct": False,
                                                                "skipped": True},
            {"pred": "false", "answer": "false", "correct": True}]
    (pred / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = E.load_eval(res)
    E.compact_predictions(res)
    for f in pred.iterdir():
        f.unlink()
    pred.rmdir()
    after = E.load_eval(res)
    assert after["tasks"] == before["tasks"]
    assert after["tasks"]["boolq"]["per_example"] == "1001" and after["tasks"]["boolq"]["unextracted"] == 1


def _measure_speed():
    from experiments import measure_speed as ms
    return ms


def test_measure_speed_benchmarks_the_shapes_the_run_used():
    ms = _measure_speed()
    summary = {"steady_by_shape": [
        {"micro_batches": [[16, 128, 16]], "steps": 300}, {"micro_batches": [[16, 96, 16]], "steps": 100},
        {"micro_batches": [[8, 64, 32]], "steps": 250}, {"micro_batches": [[16, 96, 32]], "steps": 10},
        {"micro_batches": [[8, 64, 16], [8, 64, 16]], "steps": 999}]}       # accumulation: not comparable
    assert ms.benchmark_shapes(summary) == (16, [96, 128], 16)
    with pytest.raises(ValueError, match="no steady single-micro-batch"):
        ms.benchmark_shapes({"steady_by_shape": [{"micro_batches": [[8, 64, 16]] * 2, "steps": 5}]})


@needs_shared
def test_measure_speed_random_model_loads(tmp_path):
    """--shape: a params.json + the real tokenizer -> a folder load_model reads, vocab from the tokenizer."""
    from model.load import load_model
    ms = _measure_speed()
    shape = tmp_path / "params.json"
    shape.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 7,
                                 "hidden_dim": 128, "tie_word_embeddings": True}))
    out = ms.random_model(shape, SHARED / "tokenizers" / "llama2", tmp_path / "m")
    model, tok = load_model(out)
    assert model.args.vocab_size == tok.vocab_size == 32000 and model.args.n_layers == 2
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "params.json", "tokenizer.model"]


def test_measure_speed_refuses_bad_input(tmp_path, capsys):
    ms = _measure_speed()
    for argv, msg in ((["--tag", "x"], "give --model"), (["--shape", "tiny", "--tag", "x"], "needs --tokenizer"),
                      (["--model", "m", "--tag", "x", "--data-dir", str(tmp_path)], "train file not found"),):
        with pytest.raises(SystemExit):
            ms.main(argv)
        assert msg in capsys.readouterr().err


def test_jobs_stop_starting_runs_after_an_unexpected_error(tmp_path, monkeypatch):
    """--jobs: an error other than a failed run (here: in the first unit) starts no further unit."""
    started = []

    def boom(args, unit, gpu=None):
        started.append((unit.name, unit.seed))
        time.sleep(0.05)
        raise RuntimeError("boom")
    monkeypatch.setattr(R, "run_one", boom)
    args = rp.parse_args(["--model", "M", "--runs-dir", str(tmp_path), "--json", str(tmp_path / "r.json"),
                          "--table", str(tmp_path / "t.md"), "--jobs", "2", "--seeds", "0", "1", "2"])
    with pytest.raises(RuntimeError, match="boom"):
        R.run_all(args, RC.main_units(RC.MAIN_METHODS, [0, 1, 2]))
    assert len(started) <= 3                      # the 2 in flight, at most one more; not all 12
