"""eval.py: published answer extraction, prompts, accuracy, boundary-layer dropping, layer read-out,
merged == unmerged, Echo off by construction, clear errors. Tiny random models; no ../shared needed."""
import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as ev
from conftest import ROOT
from data import write_default_task
from model.load import load_model
from model.lora import save_adapter
from model.model import ModelArgs, Transformer


def make_run(root, adapter="lora", n_layers=3, seed=0):
    """A run folder as train.py writes it: base/ (params.json, model.safetensors, a byte-level tiktoken
    tokenizer), adapter/ (save_adapter, random non-zero B), data/{train,test}.json, config.json, and a
    garbage echo.safetensors that eval must never read."""
    from safetensors.torch import save_file
    root = Path(root)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (base / "tokenizer.model").write_text(ranks)
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"special_tokens": {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}, "bos_id": 256, "eos_id": 257,
         "pad_id": 258}))
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=259, multiple_of=16,
                     max_seq_len=256)
    base_model = Transformer(args)
    base_model.reset_parameters(std=0.3)
    (base / "params.json").write_text(json.dumps(args.to_params_json()))
    save_file({k: v.contiguous() for k, v in base_model.state_dict().items()}, str(base / "model.safetensors"))
    tuned = Transformer(ModelArgs(**{**args.to_params_json(), "adapter": adapter, "lora_rank": 4,
                                     "lora_modules": ("wq", "wv", "w2")}))
    tuned.load_base_weights(base_model.state_dict())
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.3)
            if name.endswith("magnitude"):
                p.mul_(1.2)
    save_adapter(tuned, root / "adapter")
    write_default_task(root / "data", n_train=30, n_test=8)
    opts = {"model": "default-tiny", "template": "alpaca-short", "method": adapter, "echo": True, "seed": 0,
            "data": [str(root / "data" / "train.json")], "val_split": 0.2, "val_data": None}
    (root / "config.json").write_text(json.dumps({"opts": opts, "echo": {"target_layers": [1]}}))
    (root / "echo.safetensors").write_bytes(b"garbage: eval must never read this")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run")


# ------------------------------------------------------------- extraction ---------------------------------

def test_choice_extraction_matches_published_regex_semantics():
    """commonsense_evaluate.py: re.findall(pattern, sentence.strip())[0], case-sensitive, no word
    boundaries, '' when nothing matches."""
    cases = [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "True", ""),                                   # case-sensitive
        ("boolq", "false, not true", "false"),                   # first match wins
        ("boolq", "it is untrue", "true"),                       # substring match, no \b
        ("piqa", "solution2 (solution1 is wrong)", "solution2"),
        ("piqa", "solution3", ""),
        ("social_i_qa", "answer10", "answer1"),                  # prefix of a longer token still matches
        ("ARC-Easy", "Answer3 then answer4", "answer4"),
        ("ARC-Challenge", "answer5", "answer5"),
        ("openbookqa", "", ""),
        ("hellaswag", "ending5 or ending4", "ending4"),
        ("winogrande", "\n  option2\n", "option2"),
        ("winogrande", "option 1", ""),
    ]
    for task, response, expected in cases:
        assert ev.extract_choice(ev.ANSWER_PATTERNS[task], response) == expected, (task, response)


def test_number_extraction_and_gsm8k_correctness():
    assert ev.extract_number("She pays 1,234.5 dollars") == 1234.5
    assert ev.extract_number("3 apples + 4 pears = 7.") == 7.0          # last number; "7." parses
    assert ev.extract_number("owes -12 now") == -12.0
    assert ev.extract_number("no digits here") == math.inf
    task = ev.Task("gsm8k", "x", "number")
    assert ev.is_correct(task, 18.0005, "18") and not ev.is_correct(task, 18.01, "18")
    assert not ev.is_correct(task, math.inf, "18")


def test_response_is_text_after_marker_cut_at_next_marker():
    assert ev.response_of("  the correct answer is answer2 \n") == "the correct answer is answer2"
    assert ev.response_of("answer1\n\n### Instruction:\nx\n\n### Response:\nanswer2") == \
        "answer1\n\n### Instruction:\nx"


def test_gsm8k_reader(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"question": "q?", "answer": "a\n#### 1,200"}) + "\n")
    task = ev.resolve_task("gsm8k", tmp_path)
    (ex,) = ev.load_task_examples(task)
    assert ex["instruction"] == "q?" and ex["input"] == "" and ex["answer"] == "1200"
    path.write_text(json.dumps({"question": "q?", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl: line 1"):
        ev.load_task_examples(task)


# ------------------------------------------------------------- prompts and accuracy -----------------------

def fake_generate(answers):
    """A stand-in for model.generate.generate: completion chosen by the prompt's instruction text."""
    def generate(model, tokenizer, prompts, **kw):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids, skip_special=True)
            out.append(next(a for key, a in answers.items() if key in text))
        return out
    return generate


def test_prompt_is_the_template_exactly_and_accuracy_arithmetic(monkeypatch, run_dir):
    _, tok = load_model(run_dir / "base")
    examples = [
        {"instruction": "Q zero", "input": "", "output": "the correct answer is true", "answer": "true"},
        {"instruction": "Q one is much longer than the others", "input": "", "output": "", "answer": "false"},
        {"instruction": "Q two", "input": "", "output": "", "answer": "true"},
    ]
    answers = {"Q zero": "the correct answer is true", "Q one": "False. the correct answer is true",
               "Q two": " true### Response:\nfalse"}
    monkeypatch.setattr("model.generate.generate", fake_generate(answers))
    task = ev.Task("boolq", "x", "choice", ev.ANSWER_PATTERNS["boolq"])
    acc, records = ev.evaluate_task(None, tok, task, examples, template="llm-adapters", batch_size=2)
    ind = " " * 16        # commonsense_evaluate.py's f-string, indented 16 spaces inside its function
    for ex, r in zip(examples, records):
        expected = ("Below is an instruction that describes a task. Write a response that appropriately "
                    f"completes the request. \n\n{ind}### Instruction:\n{ind}{ex['instruction']}\n\n"
                    f"{ind}### Response:\n{ind}")
        assert r["prompt"] == expected
    assert [r["pred"] for r in records] == ["true", "true", "true"]
    assert [r["correct"] for r in records] == [True, False, True]
    assert acc == pytest.approx(2 / 3)
    _, records = ev.evaluate_task(None, tok, task, examples[:1], template="alpaca")
    assert records[0]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nQ zero\n\n### Response:\n")


def test_cli_results_json_and_table(run_dir, tmp_path, capsys):
    out = tmp_path / "out" / "my.json"
    ev.main(["--adapter", str(run_dir), "--device", "cpu", "--greedy", "--max-new-tokens", "6", "--out", str(out),
             "--tasks", "default", str(run_dir / "data" / "test.json"), "--limit", "5"])
    captured = capsys.readouterr()
    printed = captured.out
    assert ev.ECHO_LINE in printed and "Avg." in printed and "Echo-LoRA r=4" in printed   # config.json: echo
    assert "skipped" not in printed.split("Method")[1]                   # no skipped row when none skipped
    assert "  default: 5/5 (100%)" in captured.err and "examples/s, ETA" in captured.err
    results = json.loads(out.read_text())
    assert results["echo"] == "off" and results["echo_trained"] is True and results["method"] == "lora"
    assert (results["decoding"], results["max_new_tokens"], results["device"]) == ("greedy", 6, "cpu")
    assert results["examples_per_s"] > 0
    accs = []
    for name in ("default", "data"):
        rows = [json.loads(line) for line in (tmp_path / "out" / "my-predictions" / f"{name}.jsonl").read_text()
                .splitlines()]
        assert len(rows) == 5
        assert rows[0]["prompt"].startswith("### Instruction:\n")       # the run's template (alpaca-short)
        correct = sum(r["pred"] == r["answer"] for r in rows)
        task_result = results["tasks"][name]
        assert {k: task_result[k] for k in ("accuracy", "correct", "total", "unextracted", "skipped")} == \
            {"accuracy": correct / 5, "correct": correct, "total": 5, "skipped": 0,
             "unextracted": sum(r["pred"] == "" for r in rows)}
        assert task_result["examples_per_s"] > 0
        accs.append(correct / 5)
    assert results["average"] == pytest.approx(sum(accs) / 2)


def test_existing_results_are_kept_unless_force(run_dir, tmp_path, capsys):
    """A second evaluation into the same results file is refused before it runs (the file keeps its bytes);
    --force overwrites it with the same numbers."""
    out = tmp_path / "r.json"
    argv = ["--adapter", str(run_dir), "--device", "cpu", "--greedy", "--max-new-tokens", "4", "--limit", "2",
            "--out", str(out)]
    ev.main(argv)
    first = out.read_bytes()
    msg = run_main_error(argv)
    assert str(out) in msg and "pass --force to overwrite it" in msg and out.read_bytes() == first
    ev.main(argv + ["--force"])
    numbers = lambda r: {t: (v["correct"], v["total"]) for t, v in r["tasks"].items()}  # noqa: E731
    assert numbers(json.loads(out.read_text())) == numbers(json.loads(first))
    capsys.readouterr()


# ------------------------------------------------------------- boundary-layer dropping --------------------

def test_lora_layers_k_equals_full_adapter_and_zero_equals_base(run_dir):
    model, _ = load_model(run_dir / "base", adapter_dir=run_dir / "adapter", dtype=torch.float64)
    base, _ = load_model(run_dir / "base", dtype=torch.float64)
    model.eval(), base.eval()                          # no LoRA dropout
    n = model.args.n_layers
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        ev.set_lora_layers(model, n)
        assert torch.equal(model(tokens), full)
        ev.set_lora_layers(model, 0)
        torch.testing.assert_close(model(tokens), base(tokens), rtol=0, atol=1e-10)
        assert not torch.allclose(full, base(tokens), atol=1e-3)          # the adapter does matter
        # K = 1: the same as a model whose adapters exist only in layer 0 (built independently)
        ev.set_lora_layers(model, 1)
        only0, _ = load_model(run_dir / "base", dtype=torch.float64, adapter="lora", lora_rank=4,
                              lora_modules=("wq", "wv", "w2"), lora_layers=(0,))
        only0.eval()
        sd = {k: v for k, v in model.state_dict().items() if k.startswith("layers.0.") or "lora" not in k}
        only0.load_state_dict(sd, strict=False)
        torch.testing.assert_close(model(tokens), only0(tokens), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="out of range"):
        ev.set_lora_layers(model, n + 1)


def test_search_boundary_curve(run_dir, tmp_path, capsys):
    out = tmp_path / "o" / "r.json"
    ev.main(["--adapter", str(run_dir), "--greedy", "--max-new-tokens", "4", "--search-boundary", "3",
             "--limit", "0", "--out", str(out)])
    saved = json.loads((tmp_path / "o" / "r-boundary.json").read_text())
    assert saved["examples"] == {"default": 3}
    curve = {int(k): v for k, v in saved["curve"].items()}
    assert sorted(curve) == [0, 1, 2, 3]
    best = min(k for k in curve if curve[k] == max(curve.values()))    # ties: fewest adapter layers
    assert saved["best"] == best
    assert "K=  3" in capsys.readouterr().out


# ------------------------------------------------------------- layer read-out -----------------------------

def test_layer_probs_against_plain_loop(run_dir, tmp_path):
    from data import build_prompt
    model, tok = load_model(run_dir / "base", adapter_dir=run_dir / "adapter", dtype=torch.float64)
    examples = json.loads((run_dir / "data" / "test.json").read_text())[:3]
    examples[1] = {**examples[1], "instruction": examples[1]["instruction"] + " (a longer one)"}  # padding
    got = ev.layer_probs(model, tok, examples, template="alpaca-short", batch_size=2)   # sets eval mode
    assert not model.training
    weight = model.tok_embeddings.weight if model.output is None else model.output.weight
    expected = torch.zeros(model.args.n_layers, dtype=torch.float64)
    for ex in examples:
        ids = tok.encode(build_prompt(ex, "alpaca-short"), bos=True) + tok.encode(ex["output"])
        k = len(ex["answer"].encode())                 # byte tokenizer: one token per answer byte
        with torch.no_grad():
            logits, hs = model(torch.tensor([ids]), hidden_layers=list(range(model.args.n_layers)))
        for l, h in enumerate(hs):
            logp = F.linear(model.norm(h[0]), weight).softmax(-1)
            expected[l] += sum(logp[t, ids[t + 1]] for t in range(len(ids) - k - 1, len(ids) - 1)) / k
        last = logits[0].softmax(-1)                   # the last layer's read-out is the model's output
        assert torch.allclose(last, F.linear(model.norm(hs[-1][0]), weight).softmax(-1))
    torch.testing.assert_close(got, expected / len(examples), rtol=1e-6, atol=1e-9)
    ev.write_layer_probs({"default": got}, tmp_path / "x-layer_probs.csv")
    lines = (tmp_path / "x-layer_probs.csv").read_text().splitlines()
    assert lines[0] == "layer,default,mean" and len(lines) == 1 + model.args.n_layers
    assert float(lines[-1].split(",")[1]) == pytest.approx(got[-1].item(), abs=1e-6)


# ------------------------------------------------------------- merged == unmerged -------------------------

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_and_unmerged_give_the_same_predictions(tmp_path, method):
    run = make_run(tmp_path / method, adapter=method, seed=1)
    examples = ev.load_task_examples(ev.resolve_task("default", None, run))
    task = ev.resolve_task("default", None, run)
    preds = {}
    for merge in (False, True):
        for k in (3, 2):
            model, tok = load_model(run / "base", adapter_dir=run / "adapter", dtype=torch.float64)
            ev.set_lora_layers(model, k)
            if merge:
                ev.merge_enabled_adapters(model)
                assert all(m.merged == m.enabled for m in model.adapter_linears())
            _, records = ev.evaluate_task(model, tok, task, examples, template="alpaca-short", num_beams=2,
                                          max_new_tokens=6, batch_size=4)
            preds[merge, k] = [r["response"] for r in records]
    assert preds[True, 3] == preds[False, 3] and preds[True, 2] == preds[False, 2]
    assert preds[False, 3] != preds[False, 2]          # K changes the model, so the check has teeth


# ------------------------------------------------------------- Echo off -----------------------------------

def test_echo_is_never_imported_built_or_read(run_dir):
    """Run eval.py in a fresh interpreter with an audit hook on file opens: no echo package in
    sys.modules, no echo.safetensors opened (it is garbage, so reading it would also fail), and the
    loaded model has only base + adapter parameters."""
    script = f"""
import runpy, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
sys.argv = ["eval.py", "--adapter", {str(run_dir)!r}, "--greedy", "--max-new-tokens", "4", "--limit", "2"]
runpy.run_path("eval.py", run_name="__main__")
echo_mods = [m for m in sys.modules if m == "echo" or m.startswith("echo.")]
assert not echo_mods, echo_mods
assert not [p for p in opened if "echo.safetensors" in p], "echo.safetensors was opened"
assert any(p.endswith("test.json") for p in opened), "audit hook saw no opens"
print("ECHO-OFF-OK")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ECHO-OFF-OK" in proc.stdout and ev.ECHO_LINE in proc.stdout
    from safetensors.torch import load_file
    model, _ = load_model(run_dir / "base", adapter_dir=run_dir / "adapter")
    names = {n for n, _ in model.named_parameters()}
    base_names = set(load_file(str(run_dir / "base" / "model.safetensors")))
    adapter_names = {n for n in names if n.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "magnitude")}
    assert names == base_names | adapter_names and adapter_names
    assert not any("echo" in n for n in names)


# ------------------------------------------------------------- errors -------------------------------------

def run_main_error(argv):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_unknown_task_and_malformed_files(run_dir, tmp_path):
    msg = run_main_error(["--adapter", str(run_dir), "--tasks", "foo"])
    assert "unknown task 'foo' (choose from boolq, piqa" in msg
    bad = tmp_path / "data"
    (bad / "boolq").mkdir(parents=True)
    (bad / "boolq" / "test.json").write_text('[{"instruction": "x", "output": "y"')
    msg = run_main_error(["--adapter", str(run_dir), "--tasks", "boolq", "--data-dir", str(bad)])
    assert str(bad / "boolq" / "test.json") in msg and "invalid JSON" in msg
    (bad / "boolq" / "test.json").write_text('[{"instruction": "x", "output": "y"}]')
    msg = run_main_error(["--adapter", str(run_dir), "--tasks", "boolq", "--data-dir", str(bad)])
    assert str(bad / "boolq" / "test.json") in msg and "row 1" in msg and "answer" in msg
    msg = run_main_error(["--adapter", str(run_dir), "--tasks", "piqa", "--data-dir", str(bad)])
    assert "piqa" in msg and "not found" in msg


def test_no_arguments_needs_the_default_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    msg = run_main_error([])
    assert "runs/default" in msg and "python train.py" in msg
    make_run(tmp_path / "runs" / "default")
    ev.main(["--device", "cpu", "--greedy", "--max-new-tokens", "4", "--limit", "2"])
    assert (tmp_path / "runs" / "default" / "eval" / "results-default-greedy-new4-limit2.json").exists()
    assert "default" in capsys.readouterr().out


# ------------------------------------------------------------- CLI flags, progress, naming ----------------

def test_flag_errors_are_one_line(run_dir, tmp_path):
    base = ["--adapter", str(run_dir), "--limit", "2"]
    assert "--greedy means 1 beam" in run_main_error(base + ["--greedy", "--num-beams", "4"])
    assert "--limit must be >= 0, got -1" in run_main_error(["--adapter", str(run_dir), "--limit", "-1"])
    assert "needs --search-boundary or --layer-probs" in run_main_error(["--adapter", str(run_dir), "--limit", "0"])
    assert "--batch-size must be >= 1" in run_main_error(base + ["--batch-size", "0"])
    assert "name a .json results file" in run_main_error(base + ["--out", str(tmp_path)])
    assert "--val-data is used by" in run_main_error(base + ["--val-data", "x.json"])


def test_help_shows_every_default(capsys):
    for action in ev.build_parser()._actions:
        if action.dest != "help":
            assert "default" in action.help, action.dest
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 4, the published protocol)" in text and "(default: off, 4-beam search)" in text


def test_progress_lines_are_rate_limited_and_give_rate_and_eta():
    now = [0.0]
    lines = []
    meter = ev.Progress("boolq", 100, every=10, clock=lambda: now[0])
    meter.out = type("Sink", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})()
    now[0] = 5.0
    assert meter.update(20) is None                                    # < 10 s since the last line
    now[0] = 10.0
    assert meter.update(40) == "  boolq: 40/100 (40%) 4.0 examples/s, ETA 0m15s"
    now[0] = 12.0
    assert meter.update(48) is None
    now[0] = 25.0
    assert meter.update(100) == "  boolq: 100/100 (100%) 4.0 examples/s, ETA 0m00s"   # the end always prints
    assert len([s for s in lines if s.strip()]) == 2


def test_results_are_named_after_their_settings(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "evaluate_suite", lambda *a: {"default": ev.task_result([], 1.0, 32)})
    args = ev.parse_args(["--adapter", str(run_dir), "--device", "cpu", "--greedy", "--limit", "3"])
    ev.check_args(args)
    assert ev.resolve_setup(args).results_path == run_dir / "eval" / "results-default-greedy-limit3.json"
    args = ev.parse_args(["--adapter", str(run_dir), "--device", "cpu", "--tasks", *ev.COMMONSENSE, "--lora-layers", "2",
                          "--data-dir", str(tmp_path)])
    ev.check_args(args)
    assert ev.results_tag(args.tasks, args) == "commonsense-beam4-K2"
    many = [f"task{i}" for i in range(12)]
    assert re.fullmatch(r"12tasks-[0-9a-f]{8}-beam4-K2", ev.results_tag(many, args))


def test_method_label_reads_the_run_config():
    lora, dora = {"method": "lora", "rank": 16}, {"method": "dora", "rank": 8}
    assert ev.method_label(lora, {"opts": {"echo": True}}) == "Echo-LoRA r=16"
    assert ev.method_label(dora, {"opts": {"echo": False}, "echo": None}) == "DoRA r=8"
    assert ev.method_label(dora, {"echo": {"target_layers": [4]}}) == "Echo-DoRA r=8"
    assert ev.method_label(lora, {}) == "LoRA r=16" and ev.method_label(None, {}) == "base"


# ------------------------------------------------------------- skipped rows, batching ---------------------

def test_too_long_prompts_are_skipped_and_counted_wrong(run_dir, tmp_path, capsys):
    rows = json.loads((run_dir / "data" / "test.json").read_text())[:4]
    rows[1] = {**rows[1], "instruction": "x" * 300}                    # > max_seq_len 256 bytes
    path = tmp_path / "long" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rows))
    out = tmp_path / "r.json"
    ev.main(["--adapter", str(run_dir), "--tasks", str(path), "--greedy", "--max-new-tokens", "4",
             "--out", str(out)])
    result = json.loads(out.read_text())["tasks"]["long"]
    preds = [json.loads(line) for line in (tmp_path / "r-predictions" / "long.jsonl").read_text().splitlines()]
    assert [p["skipped"] for p in preds] == [False, True, False, False]
    assert preds[1]["response"] is None and preds[1]["correct"] is False
    assert result["skipped"] == 1 and result["total"] == 4
    assert result["correct"] == sum(p["correct"] for p in preds) and result["accuracy"] == result["correct"] / 4
    table = capsys.readouterr().out.split("Method")[1].splitlines()
    assert table[2].split() == ["skipped", "1", "1"]


def test_batched_sorted_evaluation_equals_one_by_one(run_dir):
    model, tok = load_model(run_dir / "base", adapter_dir=run_dir / "adapter", dtype=torch.float64)
    task = ev.resolve_task("default", None, run_dir)
    examples = ev.load_task_examples(task)
    examples[2] = {**examples[2], "instruction": examples[2]["instruction"] + " with a much longer tail"}
    kw = dict(template="alpaca-short", num_beams=1, max_new_tokens=8)
    _, batched = ev.evaluate_task(model.eval(), tok, task, examples, batch_size=3, **kw)
    alone = [ev.evaluate_task(model, tok, task, [ex], batch_size=1, **kw)[1][0] for ex in examples]
    assert [r["response"] for r in batched] == [r["response"] for r in alone]
    assert [r["instruction"] for r in batched] == [ex["instruction"] for ex in examples]
    assert len({r["response"] for r in batched}) > 1                   # responses differ, so order matters


# ------------------------------------------------------------- validation rows ----------------------------

def test_validation_rows_are_the_runs_held_out_rows(run_dir):
    from data import load_examples, split_holdout
    cfg = json.loads((run_dir / "config.json").read_text())
    task = ev.resolve_task("default", None, run_dir)
    val = ev.validation_sets([task], 100, cfg, None, "--search-boundary")["default"]
    train_rows, held = split_holdout(load_examples(run_dir / "data" / "train.json"), 0.2, 0)
    assert len(val) == len(held) == 6
    assert sorted(map(json.dumps, val)) == sorted(map(json.dumps, held))
    assert not {json.dumps(ex) for ex in val} & {json.dumps(ex) for ex in train_rows}
    assert len(ev.validation_sets([task], 4, cfg, None, "--search-boundary")["default"]) == 4


def test_held_out_rows_go_to_the_task_of_their_file(tmp_path):
    from data import holdout_indices
    files = []
    for name, n in (("boolq", 30), ("piqa", 20)):
        f = tmp_path / name / "train.json"
        f.parent.mkdir()
        f.write_text(json.dumps([{"instruction": f"{name} {i}", "input": "", "output": "x",
                                  "answer": "true" if name == "boolq" else "solution1"} for i in range(n)]))
        (tmp_path / name / "test.json").write_text(f.read_text())
        files.append(str(f))
    cfg = {"opts": {"data": files, "val_split": 0.1, "seed": 3}}
    tasks = [ev.resolve_task(t, tmp_path) for t in ("boolq", "piqa")]
    sets = ev.validation_sets(tasks, 100, cfg, None, "--search-boundary")
    held = holdout_indices(50, 0.1, 3).tolist()
    assert sorted(int(ex["instruction"].split()[1]) for ex in sets["boolq"]) == [i for i in held if i < 30]
    assert sorted(int(ex["instruction"].split()[1]) for ex in sets["piqa"]) == [i - 30 for i in held if i >= 30]
    only_boolq = {"opts": {"data": files[:1], "val_split": 0.1, "seed": 3}}
    with pytest.raises(ValueError, match=r"no rows for task 'piqa'.*folder name \(\.\.\./piqa/train\.json\)"):
        ev.validation_sets(tasks, 5, only_boolq, None, "--search-boundary")
    sets = ev.validation_sets(tasks[1:], 100, {}, [files[1]], "--search-boundary")      # --val-data
    assert len(sets["piqa"]) == 20


def test_search_boundary_refuses_training_rows(run_dir, tmp_path):
    run = tmp_path / "run"
    make_run(run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["opts"]["val_split"] = 0.0
    (run / "config.json").write_text(json.dumps(cfg))
    msg = run_main_error(["--adapter", str(run), "--greedy", "--search-boundary", "3", "--limit", "0"])
    assert "no held-out validation rows" in msg and "--val-split" in msg and "--val-data" in msg
    out = tmp_path / "r.json"                      # an explicit --val-data file is accepted
    ev.main(["--adapter", str(run), "--greedy", "--max-new-tokens", "2", "--search-boundary", "2", "--limit", "0",
             "--val-data", str(run / "data" / "test.json"), "--out", str(out)])
    assert json.loads((tmp_path / "r-boundary.json").read_text())["examples"] == {"default": 2}


# ------------------------------------------------------------- damaged files ------------------------------

def test_damaged_or_non_finite_adapter_is_a_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file
    run = make_run(tmp_path / "run")
    weights = next((run / "adapter").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights))
    msg = run_main_error(["--adapter", str(run), "--greedy", "--limit", "1"])
    assert "adapter" in msg and ("finite" in msg or "nan" in msg.lower())
    weights.write_bytes(weights.read_bytes()[:100])
    msg = run_main_error(["--adapter", str(run), "--greedy", "--limit", "1"])
    assert str(weights.parent) in msg
    model_file = run / "base" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    msg = run_main_error(["--model", str(run / "base"), "--greedy", "--limit", "1",
                          "--tasks", str(run / "data" / "test.json")])
    assert str(run / "base") in msg


def test_merge_reports_its_drift():
    """eval --merge prints the logit drift of the merge next to the adapter's own effect: in fp32 the merge
    is exact to rounding (drift far below the effect), and the model then predicts as merged."""
    import torch
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", adapter="lora", lora_rank=4, lora_dropout=0.0)).eval()
    with torch.no_grad():
        for m in model.adapter_linears():
            m.lora_b.normal_(0, 0.2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(ids)
    drift, effect = ev.merge_with_drift(model)
    assert effect > 0.05 and drift < 1e-4 * max(effect, 1.0)
    assert all(m.merged for m in model.adapter_linears())
    assert (model(ids) - before).abs().max().item() == pytest.approx(drift, abs=1e-6)
