"""The experiment tools against bad input, trials and failing disks: --help prints help and writes nothing, a
trial never rewrites a committed record or README, a damaged record is one line naming the file and the field,
each write is atomic and names its path, and a command that could not do what it was asked exits non-zero.
CPU, no training, fast."""
import errno
import json
from pathlib import Path

import pytest

from conftest import ROOT
from experiments import common, evals, plot, reproduce as rp, runs as R, scaling, speed_table
from test_experiments import cli, data_dir, make_run, one_line_error, paper_opts  # noqa: F401  (fixture)

RESULTS = ROOT / "results"
PUBLISHED = [RESULTS / n for n in ("scaling-prediction.json", "README-scaling.md", "speed-table.md",
                                   "README-nf4-logits.md", "nf4-logits-smollm2.json",
                                   "smollm2-135m-paper-recipe.json", "README-table-paper-recipe.md")]


def stamps():
    """What the tools publish, by content and modification time: a trial must leave all of it as it was."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in PUBLISHED + pages if p.exists()}


def error_line(excinfo):
    text = str(excinfo.value.code if isinstance(excinfo.value, SystemExit) else excinfo.value)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------ --help prints help, nothing else

@pytest.mark.parametrize("tool", ["experiments.scaling", "experiments.speed_table", "experiments.plot",
                                  "experiments.reproduce", "experiments.nf4_logits", "experiments.collect"])
def test_help_prints_help_and_writes_nothing(tool):
    before = stamps()
    out = cli(tool, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m " + tool), out.stderr
    assert stamps() == before


@pytest.mark.parametrize("argv", [["experiments.scaling"], ["experiments.speed_table"],
                                  ["experiments.nf4_logits", "--model", "../smollm2", "--publish"]])
def test_unknown_flag_is_one_line_and_writes_nothing(argv):
    before = stamps()
    one_line_error(cli(*argv, "--no-such-flag"), "--no-such-flag")
    assert stamps() == before


# ------------------------------------------------------------------ a trial never rewrites what is published

def test_scaling_trial_bench_is_refused_for_results_and_written_beside(tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text((RESULTS / "speed" / "benchmark-h200.jsonl").read_text())
    before = stamps()
    one_line_error(cli("experiments.scaling", "--bench", str(bench)), "committed record", "--bench")
    out = cli("experiments.scaling", "--bench", str(bench), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert stamps() == before
    pred = json.loads((tmp_path / "scaling-prediction.json").read_text())
    committed = json.loads((RESULTS / "scaling-prediction.json").read_text())
    assert [r["step_ms"] for r in pred["rows"]] == [r["step_ms"] for r in committed["rows"]]   # the same numbers


def test_speed_table_trial_dir_is_refused_for_results_and_written_beside(tmp_path):
    speed = tmp_path / "speed"
    speed.mkdir()
    (speed / "benchmark-x.jsonl").write_text(json.dumps(
        {"model": "smol-shape", "method": "lora", "echo": "off", "graphs": "step", "batch": 2, "seq": 8, "ms": 4.0,
         "tokens_per_s": 4000, "mfu": 0.1, "peak_gib": 1.0, "device": "D"}) + "\n")
    before = stamps()
    one_line_error(cli("experiments.speed_table", "--speed-dir", str(speed)), "committed record", "--speed-dir")
    out = cli("experiments.speed_table", "--speed-dir", str(speed), "--out", str(tmp_path / "t.md"))
    assert out.returncode == 0, out.stderr
    assert stamps() == before
    assert "| SmolLM2-135M shape | 2 × 8 | whole step" in (tmp_path / "t.md").read_text()


def test_nf4_logits_toy_trial_never_touches_readme(tmp_path):
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 16}))
    (toy / "consolidated.00.pth").write_bytes(b"not the measured weights")
    before = stamps()
    one_line_error(cli("experiments.nf4_logits", "--model", str(toy), "--out", "results/nf4-logits-toy.json"),
                   "committed record", "--publish")
    one_line_error(cli("experiments.nf4_logits", "--model", str(toy), "--publish", "--force"),
                   "fingerprints differ")
    assert stamps() == before and not (RESULTS / "nf4-logits-toy.json").exists()


def test_committed_covers_readme_docs_and_results(tmp_path):
    assert common.committed(ROOT / "README.md") and common.committed(ROOT / "docs" / "usage.md")
    assert common.committed(RESULTS / "speed" / "x.jsonl") and common.committed(RESULTS / "new.json")
    assert not common.committed(tmp_path / "results" / "x.json") and not common.committed(ROOT / "experiments")


def test_nf4_logits_default_out_is_beside_not_in_results(tmp_path, monkeypatch):
    from experiments import nf4_logits
    monkeypatch.chdir(tmp_path)
    toy = tmp_path / "toy"
    toy.mkdir()
    args = nf4_logits.parse_args(["--model", str(toy)])
    assert nf4_logits.check_outputs(args) == Path("nf4-logits-toy.json")             # the working folder
    args = nf4_logits.parse_args(["--model", str(toy), "--publish", "--data-dir", str(tmp_path)])
    with pytest.raises(common.StepFailed, match="--data-dir"):
        nf4_logits.check_outputs(args)


def fingerprinted_runs(tmp_path, data_dir, model_bytes=b"weights"):
    """A runs folder whose config.json records the model by fingerprint (as train.py writes it now)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "params.json").write_bytes(model_bytes)
    runs = tmp_path / "runs"
    files = [str(data_dir / t / "train.json") for t in common.TRAIN_TASKS]
    make_run(runs / "lora-s0", paper_opts(files, model="<model>"))
    cfg = json.loads((runs / "lora-s0" / "config.json").read_text())
    cfg["model_fingerprints"] = {"params.json": common.fingerprint(model / "params.json")}
    (runs / "lora-s0" / "config.json").write_text(json.dumps(cfg))
    return runs, model


def test_reproduce_only_table_records_the_runs_model_not_the_flag(tmp_path, data_dir):
    runs, model = fingerprinted_runs(tmp_path, data_dir)
    other = tmp_path / "other"
    other.mkdir()
    (other / "params.json").write_text("another model")
    base = ["--data-dir", str(data_dir), "--runs-dir", str(runs), "--only-table", "--table", str(tmp_path / "t.md")]
    rp.main(base + ["--model", str(other), "--results", str(tmp_path / "r.json")])     # a trial of your own: allowed
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["model"] == "<model>" and res["model_fingerprints"]["params.json"]["bytes"] == 7
    assert res["excluded"] == [{"run": "lora-s0", "reason": "model params.json differs from --model's"}]
    rp.main(base + ["--model", str(model), "--results", str(tmp_path / "r.json")])     # identified by content
    assert {r["name"] for r in json.loads((tmp_path / "r.json").read_text())["runs"]} == {"lora"}
    args = rp.parse_args(base + ["--model", str(model)])
    assert rp.other_model(model, args.model_fingerprints) is None
    assert "params.json differs" in rp.other_model(other, args.model_fingerprints)


def test_reproduce_only_table_other_model_is_refused_for_committed_results(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "consolidated.00.pth").write_text("another model")
    before = stamps()
    one_line_error(cli("experiments.reproduce", "--only-table", "--model", str(other)),
                   "committed record", "consolidated.00.pth differs")
    assert stamps() == before


def test_damaged_results_json_is_named_not_an_empty_table(tmp_path, data_dir):
    runs, _ = fingerprinted_runs(tmp_path, data_dir)
    for text in ("{not json", "[1, 2]"):
        (tmp_path / "r.json").write_text(text)
        with pytest.raises(SystemExit) as e:
            rp.main(["--data-dir", str(data_dir), "--runs-dir", str(runs), "--only-table",
                     "--results", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md")])
        assert "r.json: damaged record" in error_line(e)
        assert (tmp_path / "r.json").read_text() == text and not (tmp_path / "t.md").exists()


# ------------------------------------------------------------------ damaged records: one line, file and field

def metrics(tmp_path, *lines):
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("bad, needle", [('{"step": "2", "loss_off": 1.0}', "metrics.jsonl:2: field step"),
                                         ('{"step": 2.5, "loss_off": 1.0}', "metrics.jsonl:2: field step"),
                                         ('[2, 1.0]', "metrics.jsonl:2: not a JSON object"),
                                         ('{"step": 2, "loss_off": "low"}', "metrics.jsonl:2: field loss_off"),
                                         ('{"step": 2, tor', "metrics.jsonl:2: not a JSON line")])
def test_plot_names_the_damaged_metrics_line(tmp_path, bad, needle):
    metrics(tmp_path, '{"step": 1, "loss_off": 2.0}', bad, '{"step": 3, "loss_off": 1.0}')
    one_line_error(cli("experiments.plot", str(tmp_path)), needle)
    assert not (tmp_path / "curves.csv").exists()


def test_plot_skips_a_torn_last_line(tmp_path):
    metrics(tmp_path, '{"step": 1, "loss_off": 2.0}', '{"step": 2, "loss_off": 1.5}', '{"step": 3, "lo')
    out = cli("experiments.plot", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "curves.csv").read_text().splitlines()[1:] == ["1,2,,,,", "2,1.5,,,,"]


def eval_with(tmp_path, boolq):
    d = tmp_path / "run"
    d.mkdir(exist_ok=True)
    (d / "eval-greedy.json").write_text(json.dumps({"limit": None, "tasks": {"boolq": boolq}}))
    return d / "eval-greedy.json"


@pytest.mark.parametrize("boolq, field", [({"correct": "many", "total": 2}, "tasks.boolq.correct"),
                                          ({"correct": 1, "total": 2.5}, "tasks.boolq.total"),
                                          ({"correct": 1, "total": -2}, "tasks.boolq.total"),
                                          ({"correct": 1, "total": 2, "unextracted": "0"}, "tasks.boolq.unextracted"),
                                          ({"correct": 3, "total": 2}, "correct 3 of total 2"),
                                          ({"correct": 1, "total": 2, "per_example": "1x"}, "per_example")])
def test_eval_count_that_is_not_a_count_is_named(tmp_path, boolq, field):
    with pytest.raises(common.StepFailed) as e:
        evals.load_eval(eval_with(tmp_path, boolq))
    assert "eval-greedy.json" in error_line(e) and field in str(e.value)
    assert evals.load_eval(eval_with(tmp_path, {"correct": 1, "total": 2}))["tasks"]["boolq"]["correct"] == 1


def test_reproduce_with_a_bad_count_is_one_line(tmp_path, data_dir):
    runs, _ = fingerprinted_runs(tmp_path, data_dir)
    ev = runs / "lora-s0" / "eval-greedy.json"
    raw = json.loads(ev.read_text())
    raw["tasks"]["piqa"]["correct"] = "1"
    ev.write_text(json.dumps(raw))
    out = cli("experiments.reproduce", "--data-dir", str(data_dir), "--runs-dir", str(runs), "--only-table")
    one_line_error(out, "eval-greedy.json", "tasks.piqa.correct")


@pytest.mark.parametrize("config, needle", [([1, 2], "not an object"),
                                            ({"opts": [1]}, "field opts is list"),
                                            ({"opts": {"lr": "fast"}}, "field opts.lr is 'fast'"),
                                            ({"opts": {"data": "boolq"}}, "field opts.data"),
                                            ({"opts": {}, "data_fingerprints": {"a": {"bytes": "9"}}},
                                             "field data_fingerprints")])
def test_damaged_config_is_named(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(common.StepFailed) as e:
        R.read_config(tmp_path)
    assert "config.json" in error_line(e) and needle in str(e.value)


def test_damaged_summary_is_named_and_old_paths_are_read(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"train_seconds": "1 min", "steps": 5}))
    with pytest.raises(common.StepFailed, match="summary.json: field train_seconds is '1 min'"):
        R.train_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"train_seconds": 60.0, "steps": 5}))
    assert R.train_summary(tmp_path)["train_seconds"] == 60.0
    for model in ("/root/keep/smol", "<smollm2>"):             # an old record's path, a new record's placeholder
        assert rp.recorded_name(model) == "<smol>" if model.startswith("/") else "<smollm2>"


@pytest.mark.parametrize("line, needle", [('{"graphs": "step", "seq": 256, "batch": 16, "ms": "fast"}', "'ms'"),
                                          ("not json", ":1: not a JSON line")])
def test_scaling_names_the_damaged_benchmark_line(tmp_path, line, needle):
    (tmp_path / "b.jsonl").write_text(line + "\n")
    one_line_error(cli("experiments.scaling", "--bench", str(tmp_path / "b.jsonl"), "--out", str(tmp_path)),
                   "b.jsonl", needle)
    assert not (tmp_path / "scaling-prediction.json").exists()


@pytest.mark.parametrize("line, needle", [('{"model": "m", "echo": "off"}', "field 'batch' is missing"),
                                          ("[1]", "benchmark-x.jsonl:1: not a JSON object")])
def test_speed_table_names_the_damaged_record(tmp_path, line, needle):
    (tmp_path / "benchmark-x.jsonl").write_text(line + "\n")
    one_line_error(cli("experiments.speed_table", "--speed-dir", str(tmp_path), "--out", str(tmp_path / "t.md")),
                   needle)
    assert not (tmp_path / "t.md").exists()


# ------------------------------------------------------------------ writes: atomic, and they name the path

def test_plot_in_a_folder_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    metrics(tmp_path, '{"step": 1, "loss_off": 2.0}')

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(plot.tempfile, "mkdtemp", read_only)              # root ignores chmod: fail the write
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert f"cannot write in {tmp_path} (Permission denied)" in error_line(e)
    assert not (tmp_path / "curves.csv").exists()


def test_plot_full_disk_keeps_the_old_curves(tmp_path, monkeypatch):
    metrics(tmp_path, '{"step": 1, "loss_off": 2.0}')
    (tmp_path / "curves.csv").write_text("old\n")

    def full(tmp, dest):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(plot, "publish", full)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert "No space left on device" in error_line(e) and str(tmp_path / "curves") in str(e.value)
    assert (tmp_path / "curves.csv").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.csv", "metrics.jsonl"]     # no temp left


def test_write_atomic_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")
    common.write_atomic(target, "new")
    assert target.read_text() == "new"

    def full(tmp, dest):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common, "publish", full)
    with pytest.raises(common.StepFailed, match=f"cannot write {target} \\(No space left on device\\)"):
        common.write_atomic(target, "newer")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ------------------------------------------------------------------ exit codes tell the truth

def test_reproduce_asked_to_train_over_another_run_exits_non_zero(tmp_path, data_dir):
    runs = tmp_path / "runs"
    files = [str(data_dir / t / "train.json") for t in common.TRAIN_TASKS]
    make_run(runs / "lora-s0", paper_opts(files, lr=1e-3))                  # a finished run of another recipe
    argv = ["--model", str(tmp_path), "--data-dir", str(data_dir), "--runs-dir", str(runs), "--methods", "lora",
            "--seeds", "0", "--results", str(tmp_path / "r.json"), "--table", str(tmp_path / "t.md")]
    out = cli("experiments.reproduce", *argv)
    assert out.returncode != 0 and "holds another run (lr 0.001 ≠ 0.0002)" in out.stderr, out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["excluded"] == [
        {"run": "lora-s0", "reason": "lr 0.001 ≠ 0.0002"}]                   # not tabled
    dry = cli("experiments.reproduce", *argv, "--dry-run")                  # a dry run only reports it
    assert dry.returncode == 0 and "would fail: train lora-s0" in dry.stdout, dry.stderr


def test_collect_as_a_command_says_it_is_a_library():
    one_line_error(cli("experiments.collect"), "reproduce --only-table")


# ------------------------------------------------------------------ records name no machine's paths

def test_commands_and_their_logs_name_no_absolute_paths(monkeypatch):
    import sys
    from experiments.recipes import Unit
    monkeypatch.chdir(ROOT)
    args = rp.parse_args(["--model", str(ROOT / "models" / "smollm2"), "--data-dir", str(common.DATA_DIR)])
    unit = Unit("echo-lora", 0, "main")
    cmds = [R.train_command(args, unit, "fresh"), R.eval_command(args, R.unit_dir(args, unit), "greedy", "x.json")]
    for cmd in cmds:
        assert cmd[0] == sys.executable and not [a for a in cmd[1:] if Path(a).is_absolute()], cmd
        assert R.logged_command(cmd).startswith("python ")
    train = cmds[0]
    assert train[train.index("--model") + 1] == "models/smollm2"
    import tempfile
    if not ROOT.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):     # a checkout in /tmp: no sibling rule
        assert common.arg_path(ROOT.parent / "smollm2") == "../smollm2"             # a model beside the checkout
    assert train[-1] == "results/smollm2-135m-paper-recipe/runs/echo-lora-s0"
    assert common.arg_path("/tmp/elsewhere/run") == "/tmp/elsewhere/run"       # outside the project: as given


def test_reproduce_other_runs_cannot_write_committed_results(tmp_path, data_dir):
    runs, _ = fingerprinted_runs(tmp_path, data_dir)
    before = stamps()
    for flag, path in (("--results", "results/smollm2-135m-paper-recipe.json"),
                       ("--table", "docs/trial-table.md")):
        one_line_error(cli("experiments.reproduce", "--only-table", "--data-dir", str(data_dir), "--runs-dir",
                           str(runs), flag, path), "committed record", "--runs-dir")
    assert stamps() == before and not (ROOT / "docs" / "trial-table.md").exists()


def test_reproduce_asked_to_evaluate_a_run_without_adapter_exits_non_zero(tmp_path, data_dir):
    runs = tmp_path / "runs"
    files = [str(data_dir / t / "train.json") for t in common.TRAIN_TASKS]
    make_run(runs / "lora-s0", paper_opts(files), evals=False)              # finished, no adapter/, no eval
    out = cli("experiments.reproduce", "--model", str(tmp_path), "--data-dir", str(data_dir), "--runs-dir",
              str(runs), "--methods", "lora", "--seeds", "0", "--beam-limit", "0")
    assert out.returncode != 0 and "keeps no adapter/ to evaluate" in out.stderr, out.stderr


@pytest.mark.parametrize("summary, needle", [({"steps": "many"}, "field steps"),
                                             ({"steps": 5, "val": [{"step": 5, "val_loss": "low"}]}, "field val")])
def test_damaged_metrics_summary_is_named(tmp_path, summary, needle):
    from experiments import analysis
    (tmp_path / "metrics-summary.json").write_text(json.dumps(summary))
    with pytest.raises(common.StepFailed) as e:
        analysis.metrics_summary(tmp_path)
    assert "metrics-summary.json" in error_line(e) and needle in str(e.value)
    (tmp_path / "metrics-summary.json").write_text(json.dumps({"steps": 5, "val": [{"step": 5, "val_loss": 1.0}]}))
    assert analysis.metrics_summary(tmp_path)["val"][0]["val_loss"] == 1.0
