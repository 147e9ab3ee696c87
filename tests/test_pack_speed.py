"""experiments/pack_speed.py without a GPU: the two train commands differ in --pack alone, the table's figures
from two synthetic record folders, one-line errors for a damaged record and for a missing GPU, and measured.json
names no machine path. CPU, no training, fast."""
import json
import shlex
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from experiments import common
from experiments import pack_speed as ps
from test_experiments import cli, one_line_error
from test_records import absolute_paths


@pytest.fixture
def data(tmp_path):
    """A --data-dir with the five train files (empty: nothing reads them here)."""
    d = tmp_path / "data"
    for t in common.TRAIN_TASKS:
        (d / t).mkdir(parents=True)
        (d / t / "train.json").write_text("[]")
    return d


def summary(tokens, padded, peak, device="NVIDIA H100", **over):
    return {"steps": 300, "train_seconds": 60.0, "warmup_seconds": 40.0, "tokens_per_s": tokens,
            "padded_tokens_per_s": padded, "batch_shapes": 6, "micro_batch": 16, "world_size": 1, "peak_gib": peak,
            "device": device, "method": "lora", "echo": False, "stretches": 1, "steady_by_shape": [], **over}


def record(speed, tag, padded, packed, measured=None):
    d = speed / f"pack-vs-padded-{tag}"
    d.mkdir(parents=True)
    (d / "measured.json").write_text(json.dumps(measured or {"weights": "real", "model": "smollm2"}))
    (d / "padded-summary.json").write_text(json.dumps(padded))
    (d / "packed-summary.json").write_text(json.dumps(packed))
    return d


def test_dry_run_commands_differ_in_pack_alone(data, capsys):
    ps.main(["--model", "m", "--tag", "t", "--steps", "120", "--echo", "--data-dir", str(data), "--dry-run"])
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in out] == ["padded", "packed"]
    padded, packed = (shlex.split(line.split(": ", 1)[1]) for line in out)
    assert packed[-1] == "--pack" and "--pack" not in padded
    out_of = lambda cmd: cmd[cmd.index("--out") + 1]                            # noqa: E731
    assert (out_of(padded), out_of(packed)) == ("<tmp>/pack-speed/padded", "<tmp>/pack-speed/packed")
    assert [c for c in packed[:-1] if c != out_of(packed)] == [c for c in padded if c != out_of(padded)]
    for flag, value in (("--dropout", "0"), ("--max-steps", "120"), ("--seed", "0"), ("--save-every", "121")):
        assert padded[padded.index(flag) + 1] == value and packed[packed.index(flag) + 1] == value
    assert padded[:2] == ["python", "train.py"] and "--echo" in padded and "--echo" in packed
    assert not any("pack-speed-" in c for c in padded + packed)         # no real scratch folder (mkdtemp's prefix)
    assert not any(c.startswith("/") for c in padded + packed)            # the data in /tmp: <outside the repository>
    assert padded[padded.index("--data") + 1] == "<outside the repository>/boolq/train.json"


def test_table_figures_from_two_records(tmp_path, monkeypatch):
    speed = tmp_path / "speed"
    record(speed, "smollm2-lora", summary(100_000.0, 125_000.0, 2.71), summary(130_000.0, 134_020.0, 2.5))
    record(speed, "smollm2-echo-lora", summary(80_000.0, 100_000.0, 3.16, echo=True),
           summary(96_000.0, 99_000.0, 3.0, echo=True, micro_batch=8),
           {"weights": "random", "model": "smol", "loss_agreement": {"steps": 300, "max_abs_diff": 0.0123},
            "packed_as": {"attention": "flex", "layout": "flat"}})
    monkeypatch.setattr(ps, "HERE", tmp_path)
    text = ps.publish_table()
    assert (tmp_path / "pack-speed-table.md").read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| smollm2")]
    # sorted by folder: echo-lora first. 96,000 / 80,000 = 1.20; padding 1 − 80/100 = 20.0 %, 1 − 96/99 = 3.0 %
    assert rows[0] == ("| smollm2-echo-lora | smol (random) | lora + Echo | flat, flex | NVIDIA H100 | 300 | 16 / 8 | 80,000 | "
                       "96,000 | **1.20×** | 20.0 % | 3.0 % | 3.16 | 3.00 | 0.012 (300 steps) |")
    # 130,000 / 100,000 = 1.30; 1 − 100/125 = 20.0 %, 1 − 130/134.02 = 3.0 %
    # a record from before --pack-attention/--pack-layout: train.py's defaults
    assert rows[1] == ("| smollm2-lora | smollm2 (real) | lora | rows, sdpa | NVIDIA H100 | 300 | 16 | 100,000 | 130,000 | "
                       "**1.30×** | 20.0 % | 3.0 % | 2.71 | 2.50 | — |")
    assert len(rows) == 2


def test_the_packed_run_says_how_it_packs(data, capsys):
    ps.main(["--model", "m", "--tag", "t", "--data-dir", str(data), "--pack-attention", "flex", "--pack-layout",
             "flat", "--dry-run"])
    padded, packed = (shlex.split(line.split(": ", 1)[1]) for line in capsys.readouterr().out.strip().splitlines())
    assert packed[-5:] == ["--pack", "--pack-attention", "flex", "--pack-layout", "flat"]
    assert not any(c.startswith("--pack") for c in padded)


def test_no_record_is_one_line_not_an_empty_table(tmp_path):
    (tmp_path / "speed").mkdir()
    text = ps.table(tmp_path / "speed")
    assert len(text.strip().splitlines()) == 2 and "No measurement yet" in text and "|" not in text


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "packed-summary.json").write_text('{"steps": 3'), "packed-summary.json"),
    (lambda d: (d / "measured.json").unlink(), "measured.json"),
    (lambda d: (d / "padded-summary.json").write_text(json.dumps(summary(None, 125.0, 2.0))), "tokens_per_s"),
    (lambda d: (d / "packed-summary.json").write_text(json.dumps(summary(1.0, 2.0, 2.0, device="other"))), "device"),
])
def test_damaged_record_is_one_line_naming_it(tmp_path, damage, needle):
    speed = tmp_path / "speed"
    damage(record(speed, "x", summary(1.0, 2.0, 2.0), summary(1.0, 2.0, 2.0)))
    out = cli("experiments.pack_speed", "--only-table", "--speed-dir", str(speed), "--out", str(tmp_path / "t.md"))
    one_line_error(out, needle, "pack-vs-padded-x")
    assert not (tmp_path / "t.md").exists()


def test_trial_records_never_write_the_committed_table(tmp_path):
    (tmp_path / "speed").mkdir()
    committed = ROOT / "results" / "pack-speed-table.md"
    before = committed.read_bytes() if committed.exists() else None
    with pytest.raises(common.StepFailed, match="committed record"):
        ps.publish_table(tmp_path / "speed")
    assert (committed.read_bytes() if committed.exists() else None) == before


def test_refuses_without_cuda_in_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ps, "cuda_available", lambda: False)
    monkeypatch.setattr(ps, "run", lambda *a: pytest.fail("started a run"))
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit) as e:
        ps.main(["--model", str(tmp_path / "m"), "--tag", "x", "--data-dir", str(data)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "needs a CUDA GPU" in err[0]


@pytest.mark.parametrize("argv, needle", [(["--tag", "x"], "give --model"), (["--model", "m"], "--tag is required"),
                                          (["--only-table", "--tag", "x"], "drop --tag"),
                                          (["--model", "m", "--tag", "a/b", "--dry-run"], "--tag"),
                                          (["--model", "m", "--tag", "x", "--steps", "5", "--dry-run"], "--steps 5")])
def test_bad_flags_are_one_line(data, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        ps.main([*argv, "--data-dir", str(data)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_measured_json_names_no_machine_path(tmp_path, monkeypatch):
    """A fake scratch layout (two run folders with summary.json and metrics.jsonl) -> the record folder: the
    summaries copied as they are, measured.json with <tmp> and project-relative paths, the losses compared."""
    scratch = tmp_path / "pack-speed-abc"
    for k, losses in (("padded", [2.0, 1.5, 1.25]), ("packed", [2.0, 1.5, 1.2])):
        (scratch / k).mkdir(parents=True)
        (scratch / k / "summary.json").write_text(json.dumps(summary(1.0, 2.0, 1.0)))
        (scratch / k / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v}) + "\n"
                                                           for i, v in enumerate(losses)))
    monkeypatch.chdir(ROOT)
    a = ps.build_parser().parse_args(["--shape", "llama3-8b", "--tokenizer", str(ROOT.parent / "shared" / "tok"),
                                      "--tag", "t"])
    files = [ROOT / "tests" / "fixtures" / t / "train.json" for t in common.TRAIN_TASKS]    # in the project
    commands = {k: ps.train_command(a, files, scratch / "model", scratch, k) for k in ps.LAYOUTS}
    assert str(scratch) in " ".join(map(str, commands["packed"]))        # what runs: absolute
    ps.write_measured(a, tmp_path / "dest", commands, scratch)
    dest = tmp_path / "dest"
    assert sorted(p.name for p in dest.iterdir()) == ["measured.json", "packed-summary.json", "padded-summary.json"]
    assert json.loads((dest / "padded-summary.json").read_text()) == summary(1.0, 2.0, 1.0)
    m = json.loads((dest / "measured.json").read_text())
    assert m["weights"] == "random" and m["model"] == "llama3-8b" and m["tokenizer"] == "tok" and m["steps"] == 300
    assert m["loss_agreement"] == {"steps": 3, "max_abs_diff": 0.05}
    assert m["train_commands"]["packed"] == m["train_commands"]["padded"].replace("/padded'", "/packed'") + " --pack"
    assert m["train_commands"]["padded"].startswith("python train.py --model '<tmp>/pack-speed/model' --data tests/")
    text = (dest / "measured.json").read_text()
    assert absolute_paths(dest) == [] and str(tmp_path) not in text and sys.executable not in text
    assert str(ROOT) not in text
