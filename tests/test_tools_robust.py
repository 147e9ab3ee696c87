"""eval.py, `python -m model.generate` and convert_weights.py against damaged run folders, full disks, outputs
that overlap their inputs, and records that must not carry a machine's paths. Each pattern has cases for each
tool it concerns: a refusal is exit code != 0 with ONE line "error: ..." naming the file (and the field), and
every file that existed before is byte-identical after."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convert_weights as cw
import eval as ev
from conftest import ROOT
from model import generate as gen
from test_bad_input import tree_hashes
from test_eval import make_run

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("robust") / "run", n_layers=2)


@pytest.fixture
def run_copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def refused(main, argv, watch, must_mention, new_files_ok=False):
    """main(argv) exits non-zero with one line "error: ..." holding must_mention; nothing under watch changed
    (new_files_ok: files that existed are unchanged, new ones may have appeared)."""
    before = tree_hashes(watch)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and msg.startswith("error: ") and "\n" not in msg, msg
    assert must_mention in msg, msg
    after = tree_hashes(watch)
    assert (after if not new_files_ok else {k: after.get(k) for k in before}) == before, "a file was changed"
    return msg


EVAL_ARGS = ["--device", "cpu", "--greedy", "--max-new-tokens", "2", "--limit", "2"]


# ------------------------------------------------------------- damaged run records -------------------------

@pytest.mark.parametrize("config, field", [
    ([{"opts": {}}], "config.json: expected a JSON object, got list"),
    ({"opts": {"model": "x", "val_split": "0.2", "seed": 0}}, '"opts.val_split" must be a number'),
    ({"opts": {"model": "x", "seed": "0"}}, '"opts.seed" must be an integer'),
    ({"opts": "model x"}, '"opts" must be an object'),
], ids=["list", "val_split-string", "seed-string", "opts-string"])
def test_every_tool_names_the_damaged_config_field(run_copy, tmp_path, config, field):
    """(base/ is moved away, so generate and convert, finding the base, read config.json as eval does)"""
    shutil.move(run_copy / "base", tmp_path / "base")
    (run_copy / "config.json").write_text(json.dumps(config))
    refused(ev.main, ["--adapter", run_copy, *EVAL_ARGS, "--out", tmp_path / "r.json"], tmp_path, field)
    refused(gen.main, ["--adapter", run_copy, "hi"], tmp_path, field)
    refused(cw.main, ["--export", "hf", "--adapter", run_copy, tmp_path / "out"], tmp_path, field)


@pytest.mark.parametrize("params, field", [
    ([2], "params.json: expected a JSON object, got list"),
    ({"dim": "32", "n_layers": 2, "n_heads": 4, "vocab_size": 259}, '"dim" must be an integer, got "32"'),
    ({"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 259, "norm_eps": "1e-5"}, '"norm_eps" must be a finite'),
], ids=["list", "dim-string", "norm_eps-string"])
def test_every_tool_names_the_damaged_params_field(run_copy, tmp_path, params, field):
    (run_copy / "base" / "params.json").write_text(json.dumps(params))
    refused(ev.main, ["--adapter", run_copy, *EVAL_ARGS, "--out", tmp_path / "r.json"], tmp_path, field)
    refused(gen.main, ["--model", run_copy / "base", "hi"], tmp_path, field)
    refused(cw.main, ["--export", "hf", "--adapter", run_copy, tmp_path / "out"], tmp_path, field)
    refused(cw.main, [run_copy / "base", tmp_path / "out"], tmp_path, field)


@pytest.mark.parametrize("config, field", [
    ([1], "config.json: expected a JSON object, got list"),
    ({"hidden_size": "32"}, '"hidden_size" must be an integer'),
], ids=["list", "hidden_size-string"])
def test_import_names_the_damaged_hf_config_field(tmp_path, config, field):
    src = tmp_path / "hf"
    shutil.copytree(ROOT / "tests" / "fixtures" / "peft_tiny_hf", src)
    (src / "config.json").write_text(json.dumps(config))
    refused(cw.main, [src, tmp_path / "out", "--no-tokenizer"], tmp_path, field)
    refused(cw.main, ["--export", "hf", "--model", src, tmp_path / "out"], tmp_path, field)


def test_truncated_or_missing_adapter_is_one_line_in_every_tool(run_copy, tmp_path):
    weights = run_copy / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:120])
    refused(ev.main, ["--adapter", run_copy, *EVAL_ARGS, "--out", tmp_path / "r.json"], tmp_path, "adapter")
    refused(gen.main, ["--model", run_copy / "base", "--adapter", run_copy, "hi"], tmp_path, "adapter")
    refused(cw.main, ["--export", "peft", "--adapter", run_copy, tmp_path / "out"], tmp_path, "adapter.safetensors")
    shutil.rmtree(run_copy / "adapter")
    for main, argv in ((ev.main, ["--adapter", run_copy, *EVAL_ARGS]),
                       (gen.main, ["--model", run_copy / "base", "--adapter", run_copy, "hi"]),
                       (cw.main, ["--export", "hf", "--adapter", run_copy, tmp_path / "out"])):
        refused(main, argv, tmp_path, "no adapter_config.json")


def test_truncated_base_weights_are_one_line_in_every_tool(run_copy, tmp_path):
    weights = run_copy / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    refused(ev.main, ["--adapter", run_copy, *EVAL_ARGS, "--out", tmp_path / "r.json"], tmp_path, "base")
    refused(gen.main, ["--model", run_copy / "base", "hi"], tmp_path, "base")
    refused(cw.main, ["--export", "meta", "--adapter", run_copy, tmp_path / "out"], tmp_path, "model.safetensors")


# ------------------------------------------------------------- full disk ----------------------------------

def test_eval_full_disk_names_the_file_and_leaves_no_empty_results(run_dir, tmp_path, monkeypatch):
    """ENOSPC while writing the results JSON: one line naming it; no 0-byte file that would block the rerun."""
    out = tmp_path / "r.json"
    real = Path.write_text

    def full(self, text, *a, **k):
        if self.name.startswith("r.json."):
            real(self, text[:0])
            raise ENOSPC
        return real(self, text, *a, **k)
    monkeypatch.setattr(Path, "write_text", full)
    msg = refused(ev.main, ["--adapter", run_dir, *EVAL_ARGS, "--out", out], tmp_path, "No space left",
                  new_files_ok=True)                               # (the predictions, written before)
    assert str(out) in msg
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    ev.main(["--adapter", str(run_dir), *EVAL_ARGS, "--out", str(out)])       # the rerun needs no --force
    assert json.loads(out.read_text())["tasks"]["default"]["total"] == 2


def test_eval_full_disk_on_predictions_names_that_file(run_dir, tmp_path, monkeypatch):
    real = Path.write_text

    def full(self, text, *a, **k):
        if self.name.startswith("default.jsonl."):
            raise ENOSPC
        return real(self, text, *a, **k)
    monkeypatch.setattr(Path, "write_text", full)
    msg = refused(ev.main, ["--adapter", run_dir, *EVAL_ARGS, "--out", tmp_path / "r.json"], tmp_path,
                  "No space left")
    assert "r-predictions/default.jsonl" in msg and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("fmt, writer", [("hf", "save_file"), ("meta", "torch.save"), ("peft", "save_file")])
def test_export_full_disk_is_one_line_and_keeps_the_old_output(run_dir, tmp_path, monkeypatch, fmt, writer):
    """ENOSPC (save_file) or torch.save's RuntimeError mid-export: one line naming OUT; with --force the
    old OUT is intact; no temporary folder is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier export")

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise ENOSPC if writer == "save_file" else RuntimeError("[enforce fail at inline_container.cc:672] pos")
    if writer == "save_file":
        monkeypatch.setattr(cw, "save_file", full)
    else:
        monkeypatch.setattr(cw.torch, "save", full)
    msg = refused(cw.main, ["--export", fmt, "--adapter", run_dir, "--force", out], tmp_path, f"writing {out}")
    assert "failed" in msg and "nothing was written there" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------- outputs that overlap inputs ----------------

@pytest.mark.parametrize("where", ["run", "adapter", "inside-adapter", "base"])
def test_export_never_replaces_or_writes_into_its_input(run_copy, where):
    """--force replaces an earlier output, never the run the export reads (nor a folder inside it)."""
    out = {"run": run_copy, "adapter": run_copy / "adapter", "inside-adapter": run_copy / "adapter" / "x",
           "base": run_copy / "base"}[where]
    for fmt in ("hf", "peft"):
        refused(cw.main, ["--export", fmt, "--adapter", run_copy, "--force", out], run_copy, "overlaps")
    assert not (run_copy / "adapter" / "x").exists()


def test_import_never_replaces_its_source(run_copy, tmp_path):
    refused(cw.main, [run_copy / "base", run_copy / "base", "--force"], run_copy, "overlaps SRC")
    refused(cw.main, [run_copy / "base", run_copy, "--force"], run_copy, "overlaps SRC")
    refused(cw.main, [run_copy / "base", tmp_path / "o", "--tokenizer", tmp_path / "o" / "t", "--force"],
            run_copy, "overlaps --tokenizer")


# ------------------------------------------------------------- one spelling of --adapter ------------------

def test_every_tool_takes_the_run_or_its_adapter_folder(run_dir, tmp_path, capsys):
    """convert_weights --export, model.generate and eval take RUN and RUN/adapter alike, with the same result."""
    for adapter in (run_dir, run_dir / "adapter"):
        cw.main(["--export", "peft", "--model", str(run_dir / "base"), "--adapter", str(adapter),
                 "--base-model-name-or-path", "org/x", str(tmp_path / adapter.name)])
    assert tree_hashes(tmp_path / run_dir.name) == tree_hashes(tmp_path / "adapter")
    capsys.readouterr()
    texts = []
    for adapter in (run_dir, run_dir / "adapter"):
        gen.main(["--model", str(run_dir / "base"), "--adapter", str(adapter), "--max-new-tokens", "4", "ab"])
        texts.append(capsys.readouterr().out)
        args = ev.parse_args(["--adapter", str(adapter), *EVAL_ARGS])
        ev.check_args(args)
        assert ev.resolve_setup(args).adapter_dir == run_dir / "adapter"
    gen.main(["--adapter", str(run_dir), "--max-new-tokens", "4", "ab"])      # the run's base: no --model needed
    assert capsys.readouterr().out == texts[0]
    with pytest.raises(SystemExit, match="--model DIR is required without --adapter"):
        gen.main(["hi"])
    assert texts[0] == texts[1]


# ------------------------------------------------------------- the PEFT export loads as it is -------------

def test_peft_export_of_a_run_writes_its_hf_base(run_dir, tmp_path):
    """A run whose base is our layout: OUT/base/ holds the base in HF layout (config.json, safetensors,
    tokenizer) and adapter_config.json names it, so AutoPeftModelForCausalLM.from_pretrained(OUT) needs nothing."""
    out = tmp_path / "peft"
    cw.main(["--export", "peft", "--adapter", str(run_dir), str(out)])
    name = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(name) == out / "base"
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert (out / "base" / "model.safetensors").is_file() and (out / "base" / "tokenizer_config.json").is_file()
    merged = tmp_path / "plain-hf"
    cw.main(["--export", "hf", "--model", str(run_dir / "base"), str(merged)])     # the same base, exported alone
    assert tree_hashes(merged) == tree_hashes(out / "base")
    # an HF base is named as it is: nothing more written
    out2 = tmp_path / "peft2"
    cw.main(["--export", "peft", "--model", str(merged), "--adapter", str(run_dir), str(out2)])
    assert json.loads((out2 / "adapter_config.json").read_text())["base_model_name_or_path"] == str(merged)
    assert not (out2 / "base").exists()


# ------------------------------------------------------------- held-out rows of several tasks -------------

def write_task_files(root, names, n=10):
    files = []
    for name, answer in names:
        f = root / name / "train.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps([{"instruction": f"{name} {i}", "input": "", "output": answer, "answer": answer}
                                 for i in range(n)]))
        (root / name / "test.json").write_text(f.read_text())
        files.append(str(f))
    return files


def test_one_task_of_a_multi_task_run_gets_only_its_own_rows(tmp_path):
    files = write_task_files(tmp_path, [("boolq", "true"), ("piqa", "solution1")])
    cfg = {"opts": {"data": files, "val_split": 0.5, "seed": 0}}
    for name, answer in (("boolq", "true"), ("piqa", "solution1")):
        task = ev.resolve_task(name, tmp_path)
        rows = ev.validation_sets([task], 100, cfg, None, "--search-boundary")[name]
        assert rows and {ex["answer"] for ex in rows} == {answer}
        assert all(ex["instruction"].startswith(name) for ex in rows)


def test_one_task_and_files_of_unknown_folders_is_refused(tmp_path):
    files = write_task_files(tmp_path, [("a", "x"), ("b", "y")])
    write_task_files(tmp_path / "suite", [("boolq", "true")])
    task = ev.resolve_task("boolq", tmp_path / "suite")
    with pytest.raises(ValueError, match=r"cannot tell which .* belong to task 'boolq' \(several folders"):
        ev.validation_sets([task], 5, {"opts": {"data": files, "val_split": 0.5}}, None, "--search-boundary")
    one = ev.validation_sets([task], 100, {}, files[:1], "--search-boundary")["boolq"]   # one --val-data file
    assert len(one) == 10


# ------------------------------------------------------------- records without machine paths -------------

def absolute_paths(obj):
    text = json.dumps(obj)
    return re.findall(r'"(/[^"]*)"', text) + re.findall(r'"([A-Za-z]:\\\\[^"]*)"', text)


def test_eval_results_hold_no_machine_path_but_fingerprints(run_dir, tmp_path):
    out = tmp_path / "r.json"
    ev.main(["--adapter", str(run_dir), *EVAL_ARGS, "--out", str(out)])
    res = json.loads(out.read_text())
    assert not absolute_paths(res) and str(tmp_path) not in out.read_text()
    assert res["model"] == "base" and res["adapter"] == "adapter" and res["run"] == f"<outside>/{run_dir.parent.name}/run"
    model_files = dict(res["fingerprints"]["model"])
    assert model_files["model.safetensors"]["bytes"] == (run_dir / "base" / "model.safetensors").stat().st_size
    assert res["fingerprints"]["data"]["default"][0] == "data/test.json"
    assert len(res["fingerprints"]["data"]["default"][1]["sha256"]) == 64
    assert dict(res["fingerprints"]["adapter"])["adapter_config.json"]["bytes"] > 0


def test_record_paths_are_run_repository_or_beside_relative():
    from model.io import record_path
    run = ROOT / "runs" / "x"
    assert record_path(run / "adapter", run, ROOT, repository=ROOT) == "adapter"
    assert record_path(ROOT / "runs" / "y" / "base", run, ROOT, repository=ROOT) == "runs/y/base"
    shared = ROOT.parent / "shared" / "data" / "boolq" / "test.json"
    beside = "../shared/data/boolq/test.json" if ROOT.parent != Path(ROOT.anchor) else "<outside>/boolq/test.json"
    assert record_path(shared, run, ROOT, repository=ROOT) == beside
    assert record_path("/elsewhere/boolq/test.json", run, ROOT) == "<outside>/boolq/test.json"
    assert record_path(None, run) is None


def test_base_eval_and_boundary_records_hold_no_machine_path(run_dir, tmp_path):
    out = tmp_path / "b.json"
    ev.main(["--model", str(run_dir / "base"), "--tasks", str(run_dir / "data" / "test.json"), *EVAL_ARGS,
             "--out", str(out)])
    res = json.loads(out.read_text())
    assert not absolute_paths(res) and res["model"] == "<outside>/run/base" and res["adapter"] is None
    out = tmp_path / "k.json"
    ev.main(["--adapter", str(run_dir), *EVAL_ARGS[:-1], "0", "--search-boundary", "2", "--out", str(out)])
    assert not absolute_paths(json.loads((tmp_path / "k-boundary.json").read_text()))


# ------------------------------------------------------------- --help and help texts ----------------------

@pytest.mark.parametrize("command", [["eval.py"], ["convert_weights.py"], ["-m", "model.generate"]])
def test_help_prints_help_and_does_nothing_else(tmp_path, command):
    """In an empty folder (no runs/): exit 0, usage on stdout, nothing on stderr, no file written."""
    argv = [str(ROOT / command[0])] if command[0].endswith(".py") else command
    r = subprocess.run([sys.executable, *argv, "--help"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:") and not r.stderr.strip(), r.stderr
    assert not list(tmp_path.iterdir())


def test_every_flag_says_what_it_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        cw.main(["--help"])
    convert_help = capsys.readouterr().out
    for name, parser in (("eval", ev.build_parser()), ("generate", gen.build_parser())):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and ("default" in action.help or "required" in action.help), (name, action.dest)
                assert not re.search(r"issue\s*#?\d+|#\d+", action.help), (name, action.dest)
    options = convert_help[convert_help.index("options:"):]
    flags = re.findall(r"\n  (--[a-z-]+)", options)
    assert len(flags) >= 9
    for flag in flags:
        block = options[options.index(f"\n  {flag}"):].split("\n  -", 2)[1]
        assert "(default:" in " ".join(block.split()), flag
    assert not re.search(r"issue\s*#?\d+", convert_help)


# ------------------------------------------------------------- paths as config.json records them ---------

def relocated_run(run_dir, tmp_path, model, data):
    """A run without base/ whose config.json records its model and data as train.py now does."""
    run = tmp_path / "rec"
    shutil.copytree(run_dir / "adapter", run / "adapter")
    shutil.copytree(run_dir / "data", run / "data")
    shutil.copytree(run_dir / "base", tmp_path / "base")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["opts"].update(model=model, data=[data])
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_recorded_run_paths_are_resolved_from_the_run_folder(run_dir, tmp_path, capsys):
    run = relocated_run(run_dir, tmp_path, "<run folder>/../base", "<run folder>/data/train.json")
    ev.main(["--adapter", str(run), *EVAL_ARGS[:-1], "0", "--search-boundary", "2", "--out", str(tmp_path / "k.json")])
    assert "validation examples from the run's held-out rows (--val-split 0.2): default 2" in capsys.readouterr().out
    cw.main(["--export", "meta", "--adapter", str(run), str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "consolidated.00.pth").is_file()


def test_a_placeholder_path_is_refused_naming_the_field_and_flag(run_dir, tmp_path):
    run = relocated_run(run_dir, tmp_path, "<outside the repository>/x/base", "<outside the repository>/d/t.json")
    refused(ev.main, ["--adapter", run, *EVAL_ARGS], tmp_path, '"opts.model" is recorded as')
    refused(cw.main, ["--export", "hf", "--adapter", run, tmp_path / "o"], tmp_path, "pass --model")
    msg = refused(ev.main, ["--adapter", run, "--model", tmp_path / "base", *EVAL_ARGS[:-1], "0",
                            "--search-boundary", "2"], tmp_path, '"opts.data" is recorded as')
    assert "pass --val-data FILE" in msg


def test_eval_log_prints_paths_relative_to_the_working_folder(run_dir, tmp_path, monkeypatch, capsys):
    """A log kept beside the results (sitting.sh, results/) carries no machine path when eval runs where its run is."""
    monkeypatch.chdir(run_dir.parent)
    ev.main(["--adapter", "run", *EVAL_ARGS, "--out", "run/eval/log-test.json"])
    out = capsys.readouterr().out
    assert "model run/base | adapter run/adapter |" in out and "wrote run/eval/log-test.json and" in out
    assert str(run_dir.parent) not in out
    (run_dir / "eval" / "log-test.json").unlink()
    shutil.rmtree(run_dir / "eval" / "log-test-predictions")
