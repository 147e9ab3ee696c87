"""experiments/pack_accuracy.py: the packed paper-recipe run against lora-s0 and LoRA's seed spread, from
synthetic eval files whose numbers are known."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import pack_accuracy
from experiments.common import TASKS

ROOT = Path(__file__).resolve().parents[1]


def write_eval(run, correct_of, total=10):
    """run/eval-greedy.json with correct_of(task) examples right, the first ones, out of `total` per task."""
    run.mkdir(parents=True)
    tasks = {t: {"correct": correct_of(t), "total": total,
                 "per_example": "1" * correct_of(t) + "0" * (total - correct_of(t))} for t in TASKS}
    (run / "eval-greedy.json").write_text(json.dumps({"tasks": tasks}))


def test_table_numbers(tmp_path):
    runs, pack = tmp_path / "runs", tmp_path / "pack-runs"
    write_eval(runs / "lora-s0", lambda t: 5)                       # 50 % everywhere
    write_eval(runs / "lora-s1", lambda t: 6)                       # 60 %
    write_eval(runs / "lora-s2", lambda t: 7)                       # 70 %: seed sd 10 points
    write_eval(pack / "lora-s0-pack", lambda t: 6 if t == "boolq" else 5)   # +10 on BoolQ: +1.25 on average
    text = pack_accuracy.table(runs, pack)
    assert "| padded (lora-s0) | " + " | ".join(["50.0"] * 8) + " | **50.00** |" in text
    assert "| Δ packed − padded | +10.0 | " + " | ".join(["+0.0"] * 7) + " | **+1.25** |" in text
    assert "over its 3 seeds at this recipe is 10.00 points, so |Δ| is 0.12 of it" in text
    assert "1 are right only packed and 0 only padded (exact McNemar p = 1)" in text


def test_one_seed_says_the_spread_is_unmeasured(tmp_path):
    write_eval(tmp_path / "runs" / "lora-s0", lambda t: 5)
    write_eval(tmp_path / "pack" / "lora-s0-pack", lambda t: 4)
    text = pack_accuracy.table(tmp_path / "runs", tmp_path / "pack")
    assert "**-10.00**" in text and "seed-to-seed spread is not measured yet" in text
    assert "0 are right only packed and 8 only padded (exact McNemar p = 0.0078)" in text


def test_no_packed_run_is_one_line(tmp_path):
    write_eval(tmp_path / "runs" / "lora-s0", lambda t: 5)
    text = pack_accuracy.table(tmp_path / "runs", tmp_path / "pack")
    assert text.count("\n") == 2 and "No packed paper-recipe run is recorded yet" in text


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.pack_accuracy", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_damaged_eval_is_one_line_naming_it(tmp_path):
    write_eval(tmp_path / "runs" / "lora-s0", lambda t: 5)
    (tmp_path / "pack" / "lora-s0-pack").mkdir(parents=True)
    (tmp_path / "pack" / "lora-s0-pack" / "eval-greedy.json").write_text('{"tasks": {"boolq": {"correct": 3')
    r = cli("--runs", tmp_path / "runs", "--pack-runs", tmp_path / "pack", "--out", tmp_path / "t.md")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "eval-greedy.json" in r.stderr
    assert not (tmp_path / "t.md").exists()


def test_a_missing_task_is_refused(tmp_path):
    write_eval(tmp_path / "runs" / "lora-s0", lambda t: 5)
    write_eval(tmp_path / "pack" / "lora-s0-pack", lambda t: 5)
    f = tmp_path / "pack" / "lora-s0-pack" / "eval-greedy.json"
    d = json.loads(f.read_text())
    del d["tasks"]["piqa"]
    f.write_text(json.dumps(d))
    with pytest.raises(pack_accuracy.StepFailed, match="task piqa is missing"):
        pack_accuracy.table(tmp_path / "runs", tmp_path / "pack")


def test_trial_runs_never_write_the_committed_table(tmp_path):
    write_eval(tmp_path / "runs" / "lora-s0", lambda t: 5)
    before = pack_accuracy.TABLE.read_bytes() if pack_accuracy.TABLE.exists() else None
    r = cli("--runs", tmp_path / "runs", "--pack-runs", tmp_path / "pack")
    assert r.returncode != 0 and "committed record" in r.stderr and r.stderr.count("\n") == 1
    assert (pack_accuracy.TABLE.read_bytes() if pack_accuracy.TABLE.exists() else None) == before
