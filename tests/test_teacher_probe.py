"""experiments/teacher_probe.py (the Echo-on teacher at inference, analysis only) on a tiny Echo-LoRA run: λ = 0
makes the teacher the student; the first generated position is never injected (M = 0 at t*) and later ones
are when λ ≠ 0; the inference-time injection reproduces training's Echo-on pass (eqs. 2-8) token for token,
left padding included; the JSON counts add up; bad input is a one-line error. Also experiments/runs.py:
re-evaluating into an existing --out passes eval.py --force, a fresh evaluation does not."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import ROOT
from data.tasks import load_task_examples, resolve_task
from echo.echo import IGNORE, echo_loss, load_echo, supervision
from experiments import runs as R
from experiments import teacher_probe as tp
from experiments.common import IN_FORMAT
from experiments.stats import mcnemar_exact
from model import ModelArgs, Transformer
from model.generate import load_for_inference, stop_ids
from model.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random base, a tiny Echo-LoRA run (6 steps, test_train.py's recipe) and 5 fake task folders."""
    root = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    train.save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259)), ByteTokenizer(), root / "base")
    rows = [{"instruction": f"pick {i}", "input": "", "output": f"the answer is answer{1 + i % 3}",
             "answer": f"answer{1 + i % 3}"} for i in range(16)]
    (root / "ds.json").write_text(json.dumps(rows))
    train.main(["--model", str(root / "base"), "--data", str(root / "ds.json"), "--out", str(root / "run"),
                "--template", "alpaca-short", "--max-len", "64", "--dtype", "fp32", "--no-compile", "--device",
                "cpu", "--dropout", "0", "--global-batch", "4", "--max-steps", "6", "--lr", "1e-2",
                "--warmup-steps", "1", "--seed", "3", "--echo", "--echo-targets", "1", "--echo-sources", "2", "3",
                "--echo-p-start", "1", "--echo-p-end", "0"])
    for t in IN_FORMAT:
        (root / "data" / t).mkdir(parents=True)
        answers = ["true", "false"] if t == "boolq" else ["answer1", "answer2", "answer3"]
        test = [{"instruction": f"{t} question {i}" + " long" * (i % 4), "input": "",
                 "output": f"the answer is {answers[i % len(answers)]}", "answer": answers[i % len(answers)]}
                for i in range(5)]
        (root / "data" / t / "test.json").write_text(json.dumps(test))
    return root


@pytest.fixture(scope="module")
def loaded(setup):
    model, tok = load_for_inference(str(setup / "base"), setup / "run" / "adapter")
    return model, tok, load_echo(setup / "run").eval()


def prompts(tok, n=3):
    from data import build_prompt
    return [tok.encode(build_prompt({"instruction": f"pick {i}" + " and more" * i, "input": ""}, "alpaca-short",
                                    for_eval=True), bos=tok.add_bos) for i in range(n)]


def set_lambda(echo, value):
    with torch.no_grad():
        for m in echo.injectors.values():
            m.lam.fill_(value)


def test_lambda_zero_teacher_is_the_student(setup, loaded):
    model, tok, _ = loaded
    echo = load_echo(setup / "run").eval()
    set_lambda(echo, 0.0)
    ps, eos = prompts(tok, 4), stop_ids(tok)
    s_seq, s_logits = tp.greedy_decode(model, ps, max_new_tokens=12, eos_ids=eos, keep_logits=True)
    t_seq, t_logits = tp.greedy_decode(model, ps, echo=echo, max_new_tokens=12, eos_ids=eos, keep_logits=True)
    assert t_seq == s_seq
    assert torch.equal(t_logits, s_logits)
    task = resolve_task("social_i_qa", setup / "data")
    records = tp.probe_task(model, tok, task, load_task_examples(task), echo=echo, template="alpaca-short",
                            max_new_tokens=8, batch_size=2)
    assert [r["response"] for r in records["teacher"]] == [r["response"] for r in records["student"]]


def test_first_position_untouched_later_positions_injected(setup, loaded):
    model, tok, _ = loaded
    echo = load_echo(setup / "run").eval()
    set_lambda(echo, 5.0)                       # a clearly visible δ on the tiny run
    ps, eos = prompts(tok, 3), stop_ids(tok)
    s_seq, s_logits = tp.greedy_decode(model, ps, max_new_tokens=6, eos_ids=[], keep_logits=True)
    t_seq, t_logits = tp.greedy_decode(model, ps, echo=echo, max_new_tokens=6, eos_ids=[], keep_logits=True)
    assert torch.equal(t_logits[:, 0], s_logits[:, 0])       # t*: M = 0 (eq. 8), and z comes from the prompt
    assert [s[0] for s in t_seq] == [s[0] for s in s_seq]
    # the second position sees the same prefix in both (same first token), and is injected
    assert (t_logits[:, 1] - s_logits[:, 1]).abs().amax(-1).min() > 1e-3
    # the trained λ (≈ 0.1) moves them too, less
    trained = tp.greedy_decode(model, ps, echo=loaded[2], max_new_tokens=2, eos_ids=[], keep_logits=True)[1]
    assert torch.equal(trained[:, 0], s_logits[:, 0])
    assert (trained[:, 1] - s_logits[:, 1]).abs().amax() > 0


@pytest.mark.parametrize("lam", [None, 5.0])
def test_inference_injection_is_the_training_echo_on_pass(setup, loaded, lam):
    """Two prompts of different lengths + an answer each, left-padded into one batch for the probe, against
    training's Echo-on pass on each row alone (unpadded, labels = −100 on the prompt): the logits of
    model.run_layers(echo_inject=echo(source_hiddens, boundary, labels)), and echo_loss's CE_on."""
    model, tok, _ = loaded
    echo = load_echo(setup / "run").eval()
    if lam is not None:
        set_lambda(echo, lam)
    ps = prompts(tok, 3)[::2]
    answers = [tok.encode(" the answer is answer2"), tok.encode(" answer3 it is")]
    T0 = max(len(p) for p in ps)
    L = max(len(a) for a in answers)
    seqs = [p + a for p, a in zip(ps, answers)]
    n_layers, sources = model.args.n_layers, echo.cfg.source_layers
    with torch.no_grad():
        # the probe: δ from the left-padded prompts; the sequences left-padded to T0 + L (answers end together
        # when they have the same length; here pad each answer on the right with its own EOS-free tail)
        assert len(answers[0]) != len(answers[1])
        padded = [a + [ord("x")] * (L - len(a)) for a in answers]
        from model.generate import _batch
        ids_p, mask_p = _batch(ps, "cpu")
        source = tp.teacher_source(model, echo, ids_p, mask_p)
        assert source[1].tolist() == [T0 - 1, T0 - 1]
        ids = torch.cat([ids_p, torch.tensor(padded)], 1)
        mask = torch.cat([mask_p, torch.ones(2, L, dtype=torch.bool)], 1)
        probe = tp.forward_logits(model, ids, mask, tp.teacher_inject(echo, source, ids, mask))
        plain = tp.forward_logits(model, ids, mask)
        for b, (p, a) in enumerate(zip(ps, answers)):
            tokens = torch.tensor([p + a])
            labels = torch.tensor([[IGNORE] * len(p) + a])
            _, _, boundary = supervision(labels)
            assert boundary.item() == len(p) - 1
            positions = model.positions_for(tokens)
            hiddens = {}
            model.run_layers(model.embed(tokens), 0, n_layers, positions=positions, hidden_layers=set(sources),
                             hiddens=hiddens)
            inject = echo([hiddens[l] for l in sources], boundary, labels)          # training's eqs. 2-8
            train_on = model.head(model.run_layers(model.embed(tokens), 0, n_layers, positions=positions,
                                                   echo_inject=inject))[0]
            row = probe[b, T0 - len(p):T0 + len(a)]                                  # this row's real columns
            torch.testing.assert_close(row, train_on, atol=2e-5, rtol=1e-5)
            assert (row - plain[b, T0 - len(p):T0 + len(a)]).abs().max() > 0        # the injection did something
            # echo_loss's Echo-on cross-entropy (answer window, PromptKV) from the same logits
            _, sums = echo_loss(model, echo, tokens, labels, routed=True)
            ce_on = F.cross_entropy(row[len(p) - 1:-1], torch.tensor(a), reduction="sum")
            torch.testing.assert_close(sums[1], ce_on, atol=1e-4, rtol=1e-5)


def test_paired_counts():
    s = [1, 1, 0, 0, 1, 0, 1]
    t = [1, 0, 1, 1, 1, 0, 1]
    c = tp.paired_counts(s, t)
    assert (c["n"], c["both"], c["only_student"], c["only_teacher"], c["neither"]) == (7, 3, 1, 2, 1)
    assert (c["student_correct"], c["teacher_correct"]) == (4, 5)
    assert c["mcnemar_p"] == pytest.approx(1.0)                    # 2·P(X ≤ 1), X ~ Bin(3, ½) = 1
    assert tp.paired_counts([1] * 9 + [0], [0] * 10)["mcnemar_p"] == pytest.approx(2 * 0.5 ** 9)


def test_cli_json_counts_add_up(setup, tmp_path, monkeypatch):
    """Through the CLI, with a stand-in scorer that calls each record right or wrong at random (seeded): the
    tiny run answers nothing right, and this is about the bookkeeping, so both, only_student, only_teacher
    and neither all occur."""
    import random
    import data.tasks as ev               # the probe scores with data.tasks.score_record, as eval.py does
    real_score, coin = ev.score_record, random.Random(0)

    def scorer(task, example, prompt, completion):
        return {**real_score(task, example, prompt, completion), "correct": coin.random() < 0.5}
    monkeypatch.setattr(ev, "score_record", scorer)
    out = tmp_path / "p.json"
    (setup / "run" / "eval").mkdir(exist_ok=True)
    res = {"tasks": {t: {"correct": 1, "total": 5, "per_example": "10000"} for t in IN_FORMAT}, "limit": None}
    (setup / "run" / "eval" / "results-commonsense-greedy.json").write_text(json.dumps(res))
    tp.main([str(setup / "run"), "--data-dir", str(setup / "data"), "--device", "cpu", "--max-new-tokens", "6",
             "--batch-size", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert list(r["tasks"]) == IN_FORMAT
    for name, e in r["tasks"].items():
        assert e["n"] == 5 == len(e["student_per_example"]) == len(e["teacher_per_example"])
        assert e["both"] + e["only_student"] + e["only_teacher"] + e["neither"] == e["n"]
        assert e["student_correct"] == e["both"] + e["only_student"] == e["student_per_example"].count("1")
        assert e["teacher_correct"] == e["both"] + e["only_teacher"] == e["teacher_per_example"].count("1")
        assert r["eval_py_greedy"]["tasks"][name]["eval_accuracy"] == pytest.approx(0.2)
    t = r["total"]
    assert min(t["both"], t["only_student"], t["only_teacher"], t["neither"]) > 0, t
    assert t["mcnemar_p"] == pytest.approx(mcnemar_exact(t["only_teacher"], t["only_student"]))
    assert set(r["settings"]["lambdas"]) == {"1_wq", "1_wv"} and all(r["settings"]["lambdas"].values())
    for k in ("n", "student_correct", "teacher_correct", "both", "only_student", "only_teacher"):
        assert r["total"][k] == sum(e[k] for e in r["tasks"].values())
    assert r["settings"]["max_new_tokens"] == 6 and r["settings"]["device"] == "cpu"
    assert r["eval_py_greedy"]["file"].endswith("results-commonsense-greedy.json")
    md = out.with_suffix(".md").read_text()
    assert tp.TITLE in md and sum(l.startswith("|") for l in md.splitlines()) == 8   # header, rule, 5 tasks, all
    with pytest.raises(SystemExit) as e:                           # no overwrite without --force
        tp.main([str(setup / "run"), "--data-dir", str(setup / "data"), "--out", str(out)])
    assert "exists" in str(e.value) and "--force" in str(e.value)


def one_line(argv):
    with pytest.raises(SystemExit) as e:
        tp.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    data = ["--data-dir", str(setup / "data"), "--out", str(tmp_path / "x.json")]
    assert "not found" in one_line([str(tmp_path / "nope"), *data])
    no_echo = tmp_path / "no-echo"
    no_echo.mkdir()
    cfg = json.loads((setup / "run" / "config.json").read_text())
    (no_echo / "config.json").write_text(json.dumps(cfg))
    assert "no echo.safetensors" in one_line([str(no_echo), *data])
    cfg["opts"]["echo"] = False
    (no_echo / "config.json").write_text(json.dumps(cfg))
    assert "not an Echo run" in one_line([str(no_echo), *data])
    assert "no config.json" in one_line([str(tmp_path), *data])
    assert "--limit must be >= 1" in one_line([str(setup / "run"), "--limit", "0", *data])
    assert "not found" in one_line([str(setup / "run"), "--data-dir", str(tmp_path), "--out", str(tmp_path / "y.json")])
    assert ".json" in one_line([str(setup / "run"), "--data-dir", str(setup / "data"),
                                "--out", str(tmp_path / "y.txt")])
    assert not list(tmp_path.glob("*.json"))


def test_help_shows_defaults():
    text = subprocess.run([sys.executable, "-m", "experiments.teacher_probe", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert "analysis only" in text and "(default: auto)" in text
    assert "default: 32" in text and "results/<run folder name>" in text and "(default: all)" in text


# ----------------------------------------------------------------------------- experiments/runs.py

def test_reevaluation_passes_force_fresh_does_not(tmp_path, monkeypatch):
    args = Namespace(model="M", data_dir="D", limit=None, beam_limit=None, runs_dir=str(tmp_path), dry_run=False,
                     jobs=1, eval_batch_size=None, eval_extra=None)
    run = tmp_path / "lora-s0"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter.safetensors").write_text("x")
    calls = []
    monkeypatch.setattr(R, "run_logged", lambda cmd, *a, **k: calls.append(cmd))
    R.ensure_eval(args, run, "greedy", "eval")                                    # fresh
    assert "--force" not in calls[-1] and calls[-1][-2:] == ["--out", str(run / "eval-greedy.json")]
    (run / "eval-greedy.json").write_text(json.dumps({"tasks": {}, "limit": None}))
    os.utime(run / "eval-greedy.json", (1, 1))                                     # older than the adapter
    R.ensure_eval(args, run, "greedy", "eval")
    assert calls[-1][-3:] == ["--force", "--out", str(run / "eval-greedy.json")]
    n = len(calls)
    os.utime(run / "eval-greedy.json", None)                                       # newer: kept
    R.ensure_eval(args, run, "greedy", "eval")
    assert len(calls) == n
