"""experiments/nf4_accuracy.py: the NF4-base paper-recipe runs against their bf16 runs and the bf16 seed spread,
from synthetic eval and metrics-summary files whose numbers are known."""
import json
import subprocess
import sys

import pytest

from experiments import nf4_accuracy
from test_pack_accuracy import ROOT, write_eval


def write_val(run, losses):
    (run / "metrics-summary.json").write_text(json.dumps(
        {"steps": 100, "val": [{"step": 800 * (i + 1), "val_loss": v} for i, v in enumerate(losses)]}))


def test_table_numbers(tmp_path):
    runs, nf4 = tmp_path / "runs", tmp_path / "nf4-runs"
    write_eval(runs / "lora-s0", lambda t: 5)                               # 50 % everywhere
    write_eval(runs / "lora-s1", lambda t: 7)                               # 70 %: sd of (50, 70) = 14.14
    write_eval(runs / "echo-lora-s0", lambda t: 6)                          # 60 %
    write_eval(nf4 / "lora-s0-nf4", lambda t: 4 if t == "ARC-Easy" else 5)  # -10 on ARC-e: -1.25 (8), -2.00 (5)
    write_eval(nf4 / "echo-lora-s0-nf4", lambda t: 6)
    write_val(runs / "lora-s0", [0.5, 0.25])
    write_val(nf4 / "lora-s0-nf4", [0.5, 0.3, 0.2])                         # step 2,400 has no bf16 partner
    text = nf4_accuracy.table(runs, nf4)
    assert "| LoRA, bf16 base (lora-s0) | " + " | ".join(["50.0"] * 8) + " | **50.00** | 50.00 |" in text
    assert "| Δ NF4 − bf16 | " + " | ".join(["+0.0"] * 5) + " | -10.0 | +0.0 | +0.0 | **-1.25** | -2.00 |" in text
    assert "| Echo-LoRA, NF4 base (echo-lora-s0-nf4) | " + " | ".join(["60.0"] * 8) + " | **60.00** | 60.00 |" in text
    assert "LoRA's 8-task average moves by 14.14 points (sd) over its 2 bf16 seeds, so |Δ| is 0.09 of it" in text
    assert "0 are right only on NF4 and 1 only on bf16 (exact McNemar p = 1)" in text
    assert "at step 800: 0.5000 → 0.5000, 1,600: 0.2500 → 0.3000." in text
    assert "Echo-LoRA has one bf16 seed at this recipe so far" in text and "**Echo-LoRA:** Δ 8-task +0.00" in text


def test_one_method_only_and_none(tmp_path):
    runs, nf4 = tmp_path / "runs", tmp_path / "nf4-runs"
    write_eval(runs / "lora-s0", lambda t: 5)
    write_eval(runs / "echo-lora-s0", lambda t: 5)
    assert "No NF4 paper-recipe run is recorded yet" in nf4_accuracy.table(runs, nf4)
    write_eval(nf4 / "echo-lora-s0-nf4", lambda t: 5)
    text = nf4_accuracy.table(runs, nf4)
    assert "echo-lora-s0-nf4" in text and "lora-s0-nf4)" not in text.replace("echo-lora-s0-nf4)", "")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.nf4_accuracy", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("damaged", ["eval-greedy.json", "metrics-summary.json"])
def test_a_damaged_record_is_one_line_naming_it(tmp_path, damaged):
    runs, nf4 = tmp_path / "runs", tmp_path / "nf4-runs"
    write_eval(runs / "lora-s0", lambda t: 5)
    write_eval(nf4 / "lora-s0-nf4", lambda t: 5)
    (nf4 / "lora-s0-nf4" / damaged).write_text('{"tasks": {"boolq": {"correct": 3')
    r = cli("--runs", runs, "--nf4-runs", nf4, "--out", tmp_path / "t.md")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and damaged in r.stderr, r.stderr
    assert not (tmp_path / "t.md").exists()


def test_trial_runs_never_write_the_committed_table(tmp_path):
    write_eval(tmp_path / "runs" / "lora-s0", lambda t: 5)
    before = nf4_accuracy.TABLE.read_bytes() if nf4_accuracy.TABLE.exists() else None
    r = cli("--runs", tmp_path / "runs", "--nf4-runs", tmp_path / "nf4")
    assert r.returncode != 0 and "committed record" in r.stderr and r.stderr.count("\n") == 1
    assert (nf4_accuracy.TABLE.read_bytes() if nf4_accuracy.TABLE.exists() else None) == before
