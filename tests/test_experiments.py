"""experiments/: power of the paired test, record claims (fingerprints), the queue's order and resume state via
--dry-run, trial runs that leave the committed results alone, the Echo diagnostics CSV, the plot command and
one-line errors for bad inputs. No training, no torch work, CPU, fast."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from experiments import analysis, common, figures, recipes, reproduce as rp, runs as R, stats

TRAIN_NAMES = [f"{t}/train.json" for t in common.TRAIN_TASKS]


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


def one_line_error(out, *needles):
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    for n in needles:
        assert n in err[0], err[0]


# ------------------------------------------------------------------ power

def test_power_inverts_the_sample_size_formula():
    # Connor (1987): n = (z_.975 √ψ + z_.8 √(ψ − δ²))² / δ²; ψ = 0.1, δ = 0.02 -> n = (0.61979 + 0.26561)² / 0.0004 = 1959.86
    n = stats.mcnemar_pairs_needed(0.02, 0.1)
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    assert n == pytest.approx((z_a * math.sqrt(0.1) + z_b * math.sqrt(0.1 - 0.0004)) ** 2 / 0.0004, rel=1e-12)
    assert n == pytest.approx(1959.86, abs=0.01)
    assert stats.min_detectable_delta(n, 0.1) == pytest.approx(0.02, rel=1e-6)
    assert stats.min_detectable_delta(27816, 0.143) == pytest.approx(0.00636, abs=5e-5)
    assert stats.min_detectable_delta(0, 0.1) is None and stats.min_detectable_delta(100, 0.0) is None
    assert stats.min_detectable_delta(4 * n, 0.1) < 0.0101                 # 4x the pairs: about half the Δ


def test_power_from_results_pools_discordance():
    per = {"lora": "1100", "echo-lora": "1010", "dora": "1111", "echo-dora": "1111"}
    runs = [{"name": n, "seed": 0, "decoding": "greedy",
             "tasks": {t: {"per_example": p, "total": 4, "correct": p.count("1")} for t in common.IN_FORMAT}}
            for n, p in per.items()]
    pw = analysis.power({"runs": runs})
    assert pw["discordance"] == pytest.approx(10 / 40)                    # 2 of 4 for LoRA pairs, 0 for DoRA
    assert pw["pairs_at_seeds"] == 3 * 4 * len(common.IN_FORMAT)
    assert pw["min_delta_points"] == pytest.approx(100 * stats.min_detectable_delta(60, 0.25), rel=1e-9)


# ------------------------------------------------------------------ claims

def make_run(folder, opts, fps=None, evals=True):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"opts": opts, "model": {"dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3}}
    if fps is not None:
        cfg["data_fingerprints"] = fps
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "summary.json").write_text(json.dumps({"train_seconds": 60.0}))
    if evals:
        (folder / "eval-greedy.json").write_text(json.dumps({"limit": None, "seconds": 30.0, "tasks": {
            t: {"correct": 1, "total": 2, "per_example": [1, 0], "unextracted": 0} for t in common.TASKS}}))


def paper_opts(data, **kw):
    o = {"data": data, "lr": 2e-4, "epochs": 3.0, "rank": 16, "alpha": 32.0, "dropout": 0.05, "global_batch": 16,
         "max_len": 256, "val_split": 0.02, "method": "lora", "echo": False, "seed": 0}
    o.update(kw)
    return o


@pytest.fixture
def data_dir(tmp_path):
    for t in common.TRAIN_TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        (tmp_path / "data" / t / "train.json").write_text(json.dumps([{"t": t}]))
    return tmp_path / "data"


def test_record_mismatch_is_not_tabled(tmp_path, data_dir):
    runs = tmp_path / "runs"
    files = [str(data_dir / n) for n in TRAIN_NAMES]
    good = {f: common.fingerprint(f) for f in files}
    make_run(runs / "lora-s0", paper_opts(["elsewhere/" + n for n in TRAIN_NAMES]), good)   # same content
    bad = dict(good)
    bad[files[0]] = {"bytes": 3, "sha256": "0" * 64}                       # other content, same name
    make_run(runs / "echo-lora-s0", paper_opts(files, method="lora", echo=True), bad)
    make_run(runs / "dora-s0", paper_opts(files, method="dora", lr=1e-3))   # other recipe (older run: names)
    make_run(runs / "echo-dora-s0", paper_opts(files, method="dora", echo=True))   # older run, names match
    out = tmp_path / "trial.json"
    rp.main(["--model", str(tmp_path), "--data-dir", str(data_dir), "--runs-dir", str(runs), "--only-table",
             "--results", str(out), "--table", str(tmp_path / "t.md")])
    res = json.loads(out.read_text())
    tabled = {r["name"] for r in res["runs"]}
    assert tabled == {"lora", "echo-dora"}
    reasons = {e["run"]: e["reason"] for e in res["excluded"]}
    assert reasons["echo-lora-s0"] == "data fingerprints differ" and reasons["dora-s0"].startswith("lr 0.001")
    assert res["train_files"][0] == {"name": "boolq/train.json", **common.fingerprint(files[0])}
    assert res["model_name"] == "SmolLM2-135M-Instruct"
    assert "/" + str(tmp_path).strip("/") not in out.read_text()           # no absolute path of this machine
    assert res["cost"]["wall_minutes"] == pytest.approx(2 * (60 + 30) / 60 + 2 * (60 + 30) / 60)


# ------------------------------------------------------------------ the queue

def test_queue_priority_order():
    units = recipes.plan(recipes.RECIPES["paper"], extra_ablation_seeds=["A-4"])
    names = [u.run_name for u in units]
    assert names[:4] == ["lora-s0", "echo-lora-s0", "dora-s0", "echo-dora-s0"]
    assert names[4:12] == [f"A-{i}-s0" for i in range(1, 9)]
    assert names[12:15] == [f"{p}-s0" for p in recipes.PROBES]
    assert names[15:18] == ["lora-e1-lr0.0002", "lora-e1-lr0.001", "lora-e3-lr0.001"]   # e3/2e-4 is lora-s0
    assert names[18:26] == [f"{m}-s{s}" for s in (1, 2) for m in recipes.MAIN_METHODS]
    assert names[26:] == ["A-4-s1", "A-4-s2"]
    assert units[0].evals == ("greedy", "beam4") and units[4].evals == ("greedy",) and units[12].evals == ()
    assert [u.run_name for u in recipes.select(units, ["A-3", "probe"])] == ["A-3-s0"] + names[12:15]
    # --only's order is the queue's: seeds 1-2 before the ablations; one name's units in queue order; a name given
    # twice, or a unit picked by two names, counts once, where first
    picked = [u.run_name for u in recipes.select(units, ["seed2", "probe", "A-3", "seed1", "A-3-s0", "probe"])]
    assert picked == names[22:26] + ["A-4-s2"] + names[12:15] + ["A-3-s0"] + names[18:22] + ["A-4-s1"]


def test_ablation_rule_queues_only_variants_beyond_the_seed_sd():
    def run(name, seed, correct):
        return {"name": name, "seed": seed, "decoding": "greedy",
                "tasks": {t: {"correct": correct, "total": 100} for t in common.TASKS}}
    rs = [run(m, s, 50 + s) for m in recipes.MAIN_METHODS for s in (0, 1, 2)]       # sd 1 point each
    rs += [run("A-1", 0, 53), run("A-2", 0, 50), run("A-5", 0, 49)]               # Δ +3, 0, −1 vs echo-lora s0
    rule = analysis.ablation_rule({"runs": rs})
    assert rule["sd"] == pytest.approx(1.0) and rule["deltas"]["A-1"] == pytest.approx(3.0)
    assert rule["queue"] == ["A-1"]                                               # |−1| is not > sd 1


def test_dry_run_prints_queue_and_resume_state(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "lora-s0", paper_opts([f"D/{n}" for n in TRAIN_NAMES]))      # finished: skipped
    (runs / "A-2-s0" / "checkpoint").mkdir(parents=True)                          # half-trained: resumes
    (runs / "A-2-s0" / "checkpoint" / "state.pt").write_text("")
    make_run(runs / "dora-s0", paper_opts([f"D/{n}" for n in TRAIN_NAMES], method="dora", lr=1e-3))
    out = cli("experiments.reproduce", "--model", "M", "--data-dir", "D", "--runs-dir", str(runs), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    q = [l.split() for l in lines if l[:6].strip().rstrip(".").isdigit()]
    assert [x[1] for x in q][:5] == ["lora-s0", "echo-lora-s0", "dora-s0", "echo-dora-s0", "A-1-s0"]
    state = {x[1]: " ".join(x[4:]) if x[3] in ("greedy", "greedy+beam4") else " ".join(x[5:]) for x in q}
    assert state["lora-s0"] == "finished" and state["A-2-s0"] == "resume" and state["A-1-s0"] == "fresh"
    assert state["dora-s0"].startswith("mismatch: lr 0.001")
    train = [l for l in lines if l.startswith("would run: [train")]
    assert not any("[train lora-s0]" in l for l in train)
    a2 = next(l for l in train if "[train A-2-s0" in l)
    assert a2.endswith("--resume") and "--echo-targets -8 -7 -6 -5 --echo-sources -8 -7 -6 -5 --echo-any-depth" in a2
    e = next(l for l in train if "[train echo-lora-s0]" in l)
    assert "--lr 0.0002 --epochs 3 --rank 16 --alpha 32 --dropout 0.05 --global-batch 16 --max-len 256" in e
    assert "--val-split 0.02 --eval-every 800" in e
    p = next(l for l in train if "[train probe-teacher-alone-s0]" in l)
    assert "--echo-p-start 1 --echo-p-end 1 --echo-lambda-kd 0" in p
    assert not any("eval probe" in l for l in lines)                             # probes: training only
    sweep = next(l for l in train if "lora-e3-lr0.001" in l)
    assert f"--out {tmp_path / 'runs-sweep' / 'lora-e3-lr0.001'}" in sweep
    assert not (tmp_path / "runs-results.json").exists()
    limited = cli("experiments.reproduce", "--model", "M", "--data-dir", "D", "--runs-dir", str(runs), "--dry-run",
                  "--only", "main", "--max-runs", "2")
    q = [l.split()[1] for l in limited.stdout.splitlines() if l[:6].strip().rstrip(".").isdigit()]
    assert q == ["lora-s0", "echo-lora-s0", "dora-s0"]        # finished + mismatched count as not to train


def test_trial_runs_dir_leaves_committed_results_alone(tmp_path, data_dir):
    committed = [ROOT / "README.md", recipes.RECIPES["paper"].json, recipes.RECIPES["paper"].table]
    before = [p.read_bytes() for p in committed]
    runs = tmp_path / "trial"
    make_run(runs / "lora-s0", paper_opts([str(data_dir / n) for n in TRAIN_NAMES]))
    rp.main(["--model", str(tmp_path), "--data-dir", str(data_dir), "--runs-dir", str(runs), "--only-table"])
    assert [p.read_bytes() for p in committed] == before
    assert (tmp_path / "trial-results.json").is_file() and (tmp_path / "trial-table.md").is_file()


# ------------------------------------------------------------------ diagnostics and plots

def test_echo_diagnostics_csv_from_synthetic_jsonl(tmp_path):
    lines = []
    for k, step in enumerate((10, 20, 30)):
        lines.append({"step": step, "p": 1.0 - 0.1 * k, "loss_off": 1.0, "loss_on": 1.0 - 0.01 * k, "loss_kd": 0.001,
                      "modules": {m: {"gate": 0.12 + k * 0.01, "lambda": 0.1, "delta_rms": 0.01, "out_rms": 1.0,
                                      "delta_ratio": 0.01 * (k + 1), "grad_norm": 1e-3} for m in ("4_wq", "4_wv", "10_wq")}})
    src = tmp_path / "echo_diagnostics.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4')    # a torn last line
    (tmp_path / "config.json").write_text(json.dumps({"opts": {"diagnose_every": 7}}))   # N routed steps, not steps
    info = figures.echo_diagnostics(src, tmp_path / "d.csv", tmp_path / "d.png")
    assert info["records"] == 3 and info["every"] == 7 and info["modules"] == ["4_wq", "4_wv", "10_wq"]
    rows = (tmp_path / "d.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert head[:6] == ["step", "p", "loss_off", "loss_on", "loss_kd", "gap_on_minus_off"]
    assert head[6:12] == [f"4_wq_{f}" for f in figures.FIELDS] and len(head) == 6 + 3 * 6
    last = dict(zip(head, rows[3].split(",")))
    assert float(last["gap_on_minus_off"]) == pytest.approx(-0.02) and float(last["10_wq_delta_ratio"]) == 0.03
    assert float(last["4_wv_gate"]) == pytest.approx(0.14) and last["step"] == "30"
    if info["png"]:
        assert (tmp_path / "d.png").stat().st_size > 0
    assert figures.echo_diagnostics(tmp_path / "missing.jsonl", tmp_path / "x.csv") is None


def test_plot_command(tmp_path):
    one_line_error(cli("experiments.plot", str(tmp_path / "nope")), "does not exist")
    one_line_error(cli("experiments.plot", str(tmp_path)), "no metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss_off": 2.0, "routed": True, "loss_on": 1.9, "loss_kd": 0.1},
        {"step": 2, "loss_off": 1.5, "routed": False, "val_loss": 1.4, "val_exact": 0.5})))
    out = cli("experiments.plot", str(tmp_path))
    assert out.returncode == 0, out.stderr
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "step,loss_off,loss_on,loss_kd,val_loss,val_exact" and rows[2] == "2,1.5,,,1.4,0.5"


# ------------------------------------------------------------------ bad inputs: one line, nothing changed

def test_bad_inputs_are_one_line_errors(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    committed = recipes.RECIPES["paper"].json.read_bytes()
    one_line_error(cli("experiments.reproduce", "--model", "M", "--runs-dir", str(f)), "--runs-dir", "is a file")
    one_line_error(cli("experiments.reproduce", "--only-table", "--model", str(tmp_path / "none")), "does not exist")
    one_line_error(cli("experiments.reproduce", "--model", "M", "--jobs", "0", "--dry-run"), "--jobs")
    assert recipes.RECIPES["paper"].json.read_bytes() == committed and f.read_text() == "x"


def test_measure_speed_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    from experiments import measure_speed as ms
    for t in common.TRAIN_TASKS:
        (tmp_path / t).mkdir()
        (tmp_path / t / "train.json").write_text("[]")
    monkeypatch.setattr(ms, "cuda_available", lambda: False)
    monkeypatch.setattr(ms, "run", lambda *a: pytest.fail("started a run"))
    with pytest.raises(SystemExit):
        ms.main(["--model", "m", "--tag", "x", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
