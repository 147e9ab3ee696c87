"""What train.py records: summary.json describes the whole run however often it was resumed, a finished run's
resume changes nothing, --dtype takes every command's spellings and config.json the dtype that ran, the files
follow the umask, no record holds a path of the machine, the validation numbers are what the model's logits say,
and the per-step bookkeeping stays off the hot path."""
import hashlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import train
import training.checkpoint as checkpoint
import training.log
import training.options
from model import ModelArgs, Transformer, load_model
from model.rundir import run_path
from model.tokenizer import ByteTokenizer
from test_train import Crash, args, crash_in_step, metrics, one_line, setup  # noqa: F401  (setup: the fixture)


def files_of(out):
    return {p.relative_to(out).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(setup, tmp_path, capsys):
    out = train.main(args(setup, tmp_path / "run", "--max-steps", "3"))
    before = files_of(out)
    capsys.readouterr()
    assert train.main(args(setup, out, "--max-steps", "3", "--resume")) == out
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"{out} already finished its 3 steps: nothing to do, its files are left as they are"]
    assert files_of(out) == before                          # not one byte, not one mtime


def test_summary_covers_the_whole_run_across_resumes(setup, tmp_path, monkeypatch):
    """Killed in step 5 (checkpoints every 2 steps), resumed: summary.json counts every step's time and
    tokens once — the 4 steps of the first stretch kept by the checkpoint and the 4 of the second."""
    extra = ("--max-steps", "8", "--save-every", "2")
    crash_in_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(args(setup, tmp_path / "run", *extra))
    monkeypatch.undo()
    first = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)["totals"]
    out = train.main(args(setup, tmp_path / "run", *extra, "--resume"))
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if not m["warmup"]]
    assert [m["step"] for m in lines] == list(range(1, 9)) and summary["stretches"] == 2
    assert sum(b["steps"] for b in summary["steady_by_shape"]) == len(steady)
    assert sum(b["tokens"] for b in summary["steady_by_shape"]) == sum(m["tokens"] for m in steady)
    steady_s = sum(m["seconds"] for m in steady)
    assert summary["tokens_per_s"] == pytest.approx(sum(m["tokens"] for m in steady) / steady_s, rel=0.02)
    assert summary["warmup_seconds"] == pytest.approx(sum(m["seconds"] for m in lines if m["warmup"]), abs=0.15)
    assert summary["train_seconds"] >= round(first["train_seconds"] + sum(m["seconds"] for m in lines[4:]), 1) - 0.1
    assert summary["batch_shapes"] >= len({(m["routed"], m["padded_tokens"]) for m in lines})
    # resumed again once finished: the same summary
    train.main(args(setup, out, *extra, "--resume"))
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_finished_run_without_its_summary_writes_it_on_resume(setup, tmp_path):
    """Killed after its last checkpoint but before summary.json: --resume trains nothing and writes the summary
    from the checkpoint's totals (the time and tokens of the steps it kept)."""
    out = train.main(args(setup, tmp_path / "run", "--max-steps", "3"))
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    train.main(args(setup, out, "--max-steps", "3", "--resume"))
    again = json.loads((out / "summary.json").read_text())
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert again["steady_by_shape"] == summary["steady_by_shape"] and again["tokens_per_s"] == summary["tokens_per_s"]
    assert again["train_seconds"] >= summary["train_seconds"] - 0.1 and again["stretches"] == 2


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "fp32", "float32"])
def test_dtype_takes_every_spelling_and_records_what_ran(setup, tmp_path, spelling, capsys):
    out = train.main([*args(setup, tmp_path / "run", "--max-steps", "1"), "--dtype", spelling])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["opts"]["dtype"] == "fp32"                   # on CPU the run computes in fp32, whatever was asked
    assert " in fp32, " in capsys.readouterr().out
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["opts"]["dtype"] == "fp32"


@pytest.mark.parametrize("spelling", ["fp16", "float16", "fp64", "int8"])
def test_dtype_that_cannot_train_is_one_line(setup, tmp_path, spelling, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*args(setup, tmp_path / "run"), "--dtype", spelling])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--dtype" in err and "invalid choice" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_that_recorded_bf16_on_cpu_resumes(setup, tmp_path):
    """Before config.json recorded what ran, a CPU run trained in fp32 recorded --dtype bf16: it resumes on CPU."""
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "4", "--save-every", "2"))
    path = out / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    state.update(step=2, epoch_step=2)
    state["opts"]["dtype"] = "bf16"
    torch.save(state, path)
    train.main(args(setup, out, "--max-steps", "4", "--resume"))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_default_run_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = train.main(["--out", str(tmp_path / "run"), "--max-steps", "1"])
    finally:
        os.umask(old)
    for path in [*(out / "base").iterdir(), out / "config.json", out / "summary.json", out / "metrics.jsonl",
                 out / "echo.safetensors", out / "adapter" / "adapter.safetensors", out / "checkpoint" / "state.pt"]:
        assert path.stat().st_mode & 0o777 == mode, path


def test_save_base_of_an_nf4_model_is_its_dequantised_weights_without_a_second_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = Transformer(ModelArgs.from_name("tiny", vocab_size=259, base_format="nf4", adapter="lora"))
    want = net.dequantized_state_dict()
    import model.load
    monkeypatch.setattr(model.load, "build_model", lambda *a, **k: pytest.fail("save_base built a second model"))
    monkeypatch.setattr(model.model.Transformer, "__init__", lambda *a, **k: pytest.fail("a second model"))
    checkpoint.save_base(net, ByteTokenizer(), tmp_path / "base")
    monkeypatch.undo()
    plain, _ = load_model(str(tmp_path / "base"))
    got = plain.state_dict()
    assert set(want) <= set(got)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("ablation", ["--echo-separate-passes", "--echo-all-positions"])
def test_answer_window_does_not_matter_for_runs_that_recompute_every_position(setup, tmp_path, ablation):
    """A checkpoint from before --echo-answer-window of a run that recomputes every position anyway resumes at
    any value of the option; with the answer window in use, another value is still refused."""
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "4", "--save-every", "2", ablation))
    path = out / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    state.update(step=2, epoch_step=2)
    del state["opts"]["echo_answer_window"]
    torch.save(state, path)
    train.main(args(setup, out, "--max-steps", "4", "--resume", ablation))       # the default: the answer window
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    saved = {**vars(train.parse_args(args(setup, out, ablation))), "echo_answer_window": False}
    opts = train.parse_args(args(setup, out, ablation.replace("--echo-", "--no-echo-")))     # the ablation off
    with pytest.raises(ValueError, match="--echo-answer-window is True but the checkpoint was trained with False"):
        checkpoint.check_resume_options({**saved, "echo_separate_passes": opts.echo_separate_passes,
                                         "echo_all_positions": opts.echo_all_positions}, opts, None, {}, say=False)


# ------------------------------------------------------------------ no machine paths in the records


def test_records_hold_no_path_of_the_machine(setup, tmp_path):
    """config.json, summary.json and metrics.jsonl of a run whose model, data and folder lie outside the
    repository: every path relative (to the repository or the run folder) or a placeholder, the fingerprints
    beside them; resume still works (model and data compared by content), and so does --config config.json."""
    out = tmp_path / "deep" / "run"
    train.main(args(setup, out, "--max-steps", "4", "--save-every", "2", "--val-data", str(setup / "ds.json")))
    texts = {name: (out / name).read_text() for name in ("config.json", "summary.json", "metrics.jsonl")}
    for name, text in texts.items():
        for machine in (str(tmp_path), str(setup), os.path.expanduser("~"), "/tmp/", str(training.options.REPOSITORY)):
            assert machine not in text, (name, machine)
    cfg = json.loads(texts["config.json"])
    opts, near = cfg["opts"], f"<run folder>/../../../{setup.name}"      # run and setup share pytest's folder
    assert opts["model"] == f"{near}/base" and opts["data"] == [f"{near}/ds.json"] == opts["val_data"]
    assert opts["out"] == "<run folder>"
    fp = {"bytes": (setup / "ds.json").stat().st_size,
          "sha256": hashlib.sha256((setup / "ds.json").read_bytes()).hexdigest()}
    assert cfg["data_fingerprints"] == {f"{near}/ds.json": fp} == cfg["val_data_fingerprints"]
    assert set(cfg["model_fingerprints"]) == {"model.safetensors", "params.json", "tokenizer_config.json"}
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    state.update(step=2, epoch_step=2)
    torch.save(state, out / "checkpoint" / "state.pt")
    train.main(args(setup, out, "--max-steps", "4", "--resume", "--val-data", str(setup / "ds.json")))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    again = train.parse_args(["--config", str(out / "config.json")])
    assert (again.model, again.data, again.out) == (str(setup / "base"), [str(setup / "ds.json")], str(out))


def test_recorded_path(tmp_path):
    repo, out = training.options.REPOSITORY, tmp_path / "runs" / "x"
    recorded_path = training.options.recorded_path
    cases = {str(repo / "runs" / "default"): "runs/default", str(repo / "README.md"): "README.md",
             str(repo.parent / "shared" / "data" / "a.json"): "../shared/data/a.json",
             str(out / "data" / "train.json"): "<run folder>/data/train.json", str(out): "<run folder>",
             str(out.parent / "base"): "<run folder>/../base", str(tmp_path / "d.json"): "<run folder>/../../d.json",
             "/nowhere/else/m": "<outside the repository>/else/m", "/m": "<outside the repository>/m",
             "tiny": "tiny", None: None}
    for path, want in cases.items():
        assert recorded_path(path, out) == want, path
        if path and want.startswith("<run folder>"):
            assert run_path(want, out) == path
    assert recorded_path("/elsewhere/f.json", "/") == "<outside the repository>/elsewhere/f.json"
    assert recorded_path(str(tmp_path / "f.json"), "/other/run") == f"<outside the repository>/{tmp_path.name}/f.json"


def test_config_json_with_placeholders_feeds_back(setup, tmp_path):
    """--config RUN/config.json: "<run folder>/..." is found beside the file; a placeholder --model / --data
    needs the flag."""
    out = train.main(args(setup, tmp_path / "run", "--max-steps", "2"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["opts"]["model"] = "<outside the repository>/x/base"
    (out / "edited.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        train.parse_args(["--config", str(out / "edited.json")])
    assert one_line(e) == (f"--config {out / 'edited.json'}: model is recorded as '<outside the repository>/x/base', "
                           f"a path of the machine the run was made on: give --model on the command line")
    opts = train.parse_args(["--config", str(out / "edited.json"), "--model", str(setup / "base")])
    assert opts.model == str(setup / "base") and opts.max_steps == 2 and opts.data == [str(setup / "ds.json")]
    assert opts.out == str(out)                              # "<run folder>": the config file's folder


# ------------------------------------------------------------------ validation, recomputed


def test_validation_numbers_are_what_the_logits_say(setup, tmp_path):
    """val_loss = Σ CE / Σ answer tokens and val_exact = share of rows whose every answer token is the argmax,
    recomputed row by row (no padding, no batching) from the trained model's full logits."""
    out = train.main(args(setup, tmp_path / "run", "--max-steps", "3", "--val-split", "0.25", "--no-echo"))
    last = metrics(out)[-1]
    model, tokenizer = load_model(str(setup / "base"), adapter_dir=out / "adapter")
    model.eval()
    rows = data.split_holdout(data.load_examples(str(setup / "ds.json")), 0.25, 3)[1]
    ce = tokens = exact = 0
    for row in rows:
        ids, labels = data.tokenize_example(tokenizer, row, "alpaca-short", 64)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1].double()
        target = torch.tensor(labels[1:])
        answer = target != data.IGNORE_INDEX
        ce += F.cross_entropy(logits[answer], target[answer], reduction="sum").item()
        tokens += int(answer.sum())
        exact += bool((logits[answer].argmax(-1) == target[answer]).all())
    assert last["val_rows"] == len(rows) == 4 and tokens > 4 * len(rows)
    assert last["val_loss"] == pytest.approx(ce / tokens, rel=1e-5)
    assert last["val_exact"] == exact / len(rows)


def test_validation_exact_counts_rows_where_every_answer_token_is_the_argmax():
    """val_exact's rule on hand-made logits (validate's own lines fed a stand-in model): a row counts when every
    answer token is the argmax, whatever the prompt positions say."""
    run = SimpleNamespace(rank=0, world=1, device="cpu", opts=SimpleNamespace(micro_batch=2, dtype="fp32"),
                          cuda=False)
    vocab = 5
    rows = [([2, 2, 3, 4], [-100, -100, 3, 4]), ([1, 2, 3, 4], [-100, -100, 3, 4]), ([1, 4, 2], [-100, 4, 2])]
    class Val(list):
        pad_id, max_len = 0, 64

    class Stub(torch.nn.Module):
        """Logits that put the argmax on the right token; with `wrong`, not for row 1's last answer token."""
        args = SimpleNamespace(n_layers=1)

        def embed(self, tokens):
            return tokens

        def positions_for(self, tokens):
            return None

        def run_layers(self, h, a, b, positions=None):
            return h

        def head(self, tokens, logits_index):
            B, P = logits_index.shape
            logits = torch.zeros(B, P, vocab)
            nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], 1)
            want = nxt.gather(1, logits_index)
            logits.scatter_(2, want[..., None], 2.0)
            for b in range(B):
                if self.wrong and tokens[b, :2].tolist() == [1, 2]:          # row 1
                    logits[b, 1, want[b, 1]] = 0.0
                    logits[b, 1, (want[b, 1] + 1) % vocab] = 2.0
            return logits

        head_loss = Transformer.head_loss      # the real one, on the stub's head

    stub = Stub()
    run.model, run.val_set = stub, Val(rows)
    for wrong, exact in ((False, 1.0), (True, 2 / 3)):
        stub.wrong = wrong
        got = train.validate(run)
        assert got["val_exact"] == pytest.approx(exact) and got["val_rows"] == 3
        # CE of a logit row [2, 0, 0, 0, 0] for its argmax: log(4 + e^2) - 2; for a wrong token: log(4 + e^2)
        bad = math.log(4 + math.e ** 2)
        good = bad - 2
        want = (6 * good + (bad - good if wrong else 0)) / 6        # 6 answer tokens in 3 rows
        assert got["val_loss"] == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ off the hot path


def test_flops_are_counted_once_per_shape_on_rank_0_only(setup, tmp_path, monkeypatch):
    calls = []
    real = training.log.step_flops
    monkeypatch.setattr(training.log, "step_flops", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    train.main(args(setup, tmp_path / "cpu", "--max-steps", "4"))
    assert calls == []                                      # no GPU peak to compare with: no MFU, no FLOPs
    monkeypatch.setattr(training.log, "peak_flops", lambda device: 1e12)
    out = train.main(args(setup, tmp_path / "peak", "--max-steps", "6"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("mfu" in m for m in lines) and 1 <= len(calls) == len(set(map(repr, calls))) < 6


def test_only_rank_0_reads_the_files_for_the_fingerprints(setup, monkeypatch):
    read = []
    monkeypatch.setattr(checkpoint, "fingerprint", lambda p: read.append(p) or {"bytes": 0})
    sent = lambda found, src: found.__setitem__(0, found[0] or "rank 0's")      # what rank 0 sends, as ranks > 0 get it
    monkeypatch.setattr(checkpoint.dist, "broadcast_object_list", sent)
    opts = SimpleNamespace(model=str(setup / "base"), data=[str(setup / "ds.json")], val_data=None)
    assert checkpoint.run_fingerprints(opts, rank=1, world=2) == "rank 0's" and read == []
    mine = checkpoint.run_fingerprints(opts, rank=0, world=2)
    assert len(read) == 4 and mine["data"] == [["ds.json", {"bytes": 0}]]


# ------------------------------------------------------------------ one copy of each helper


def test_one_help_formatter_one_default_run_one_ignore_index():
    import model.load
    import training.options
    assert training.options.HelpFormatter is model.load.HelpFormatter
    import data.tasks
    assert train.DEFAULT_RUN is training.options.DEFAULT_RUN is data.tasks.DEFAULT_RUN
    assert not hasattr(training.log.Log, "start_step")


def test_a_failed_write_with_an_empty_message_is_one_line(tmp_path):
    def fail(tmp):
        raise RuntimeError("")
    with pytest.raises(OSError) as e:
        checkpoint.atomic_file(tmp_path / "state.pt", fail)
    assert str(tmp_path / "state.pt") in str(e.value) and "(RuntimeError)" in str(e.value)
    with pytest.raises(OSError) as e:
        checkpoint.atomic_dir(tmp_path / "adapter", fail)
    assert "(RuntimeError)" in str(e.value) and not (tmp_path / "adapter.tmp").exists()



def test_a_checkpoint_without_totals_sums_its_kept_metrics_lines(setup, tmp_path, monkeypatch):
    """A checkpoint from before checkpoints held the totals: the summary adds the kept lines' time and tokens."""
    extra = ("--max-steps", "8", "--save-every", "2")
    crash_in_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(args(setup, tmp_path / "run", *extra))
    monkeypatch.undo()
    path = tmp_path / "run" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    del state["totals"]
    torch.save(state, path)
    out = train.main(args(setup, tmp_path / "run", *extra, "--resume"))
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if not m["warmup"]]
    assert summary["stretches"] == 2 and summary["train_seconds"] >= round(sum(m["seconds"] for m in lines), 1) - 0.1
    rate = sum(m["tokens"] for m in steady) / sum(m["seconds"] for m in steady)
    assert summary["tokens_per_s"] == pytest.approx(rate, rel=0.02)
