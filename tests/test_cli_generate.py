"""python -m model.generate: known greedy text (stories260K, subprocess), sampling filters and seeds,
chat formats (SmolLM2's Jinja template vs the built-in ChatML / Llama 3 formats), streaming, errors."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED, needs_shared
from model import generate as gen
from model.model import ModelArgs, Transformer
from model.tokenizer import ByteTokenizer

STORIES = SHARED / "models" / "stories260K"
KNOWN = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random model folder with the byte tokenizer (std 0.3: peaked but not one-hot distributions)."""
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=259, multiple_of=16, max_seq_len=64)
    model = Transformer(args)
    model.reset_parameters(std=0.3)
    (d / "params.json").write_text(json.dumps(args.to_params_json()))
    (d / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def cli(capsys, *argv):
    gen.main(list(argv))
    return capsys.readouterr().out


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        gen.main(list(argv))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


# ------------------------------------------------------------- known text ---------------------------------

@needs_shared
def test_stories260k_greedy_streams_the_known_text(capsys):
    proc = subprocess.run([sys.executable, "-m", "model.generate", "--model", str(STORIES), "Once upon a time",
                           "--max-new-tokens", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(KNOWN) and proc.stdout.endswith("\n")
    msg = cli_error(capsys, "--model", str(STORIES), "--chat", "Hi")           # no template, no chat tokens
    assert msg.startswith("error: --chat: the model has no chat_template")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        gen.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())               # undo argparse's line wrapping
    assert "default: 256" in text and "default: 1, greedy" in text and "default: fp32" in text
    assert "--template {alpaca," in text and "bfloat16, float16, float32, float64 are accepted too" in text
    for action in gen.build_parser()._actions:
        if action.dest not in ("help", "prompt"):
            assert "default" in action.help or "required" in action.help, action.dest


# ------------------------------------------------------------- sampling -----------------------------------

def test_sampling_seeds_and_top_k_1_is_greedy(tiny_dir, capsys):
    base = ["--model", str(tiny_dir), "hello", "--max-new-tokens", "24"]
    greedy = cli(capsys, *base)
    a = cli(capsys, *base, "--temperature", "1.5", "--seed", "3")
    assert a == cli(capsys, *base, "--temperature", "1.5", "--seed", "3")        # same seed, same text
    assert a != cli(capsys, *base, "--temperature", "1.5", "--seed", "4")        # the seed matters
    assert a != greedy
    assert cli(capsys, *base, "--temperature", "1.5", "--top-k", "1", "--seed", "5") == greedy
    assert cli(capsys, *base, "--temperature", "1.5", "--top-p", "1e-6", "--seed", "5") == greedy
    assert greedy.startswith("hello") and len(greedy.encode()) >= len("hello") + 1


def test_template_wraps_the_instruction_as_eval_does(tiny_dir, capsys):
    """--template builds the fine-tuning prompt (data.build_prompt, eval-time string) around the instruction
    (and --input), and prints the response only: the same tokens as greedy decoding of that prompt."""
    from data import build_prompt
    tok = ByteTokenizer()
    model = gen.load_for_inference(tiny_dir)[0]
    for template, extra, example in (("alpaca-short", [], {"instruction": "Say hi", "input": ""}),
                                     ("alpaca-short", ["--input", "2x"], {"instruction": "Say hi", "input": "2x"})):
        ids = tok.encode(build_prompt(example, template, for_eval=True), bos=tok.add_bos)
        want = gen.greedy_search(model, [ids], max_new_tokens=64 - len(ids), eos_ids=gen.stop_ids(tok))[0][0]
        got = cli(capsys, "--model", str(tiny_dir), "Say hi", "--template", template, *extra, "--max-new-tokens", "64")
        # the stream holds back a trailing incomplete UTF-8 character (U+FFFD), as TextStream documents
        assert got == tok.decode(want, skip_special=True).rstrip("\ufffd") + "\n" and len(got) > 3
        assert "### Instruction" not in got


def test_sample_next_filters_match_their_definition():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(gen.sample_next(logits, top_p=0.6, generator=g), minlength=4).double() / 20000
    # top-p 0.6: the most likely tokens until their mass reaches 0.6 are {1 (0.4), 3 (0.3)}
    torch.testing.assert_close(counts, torch.tensor([0, 0.4 / 0.7, 0, 0.3 / 0.7], dtype=torch.float64), atol=0.015,
                               rtol=0)
    counts = torch.bincount(gen.sample_next(logits, top_k=3, generator=g), minlength=4).double() / 20000
    torch.testing.assert_close(counts, torch.tensor([0, 4 / 9, 2 / 9, 3 / 9], dtype=torch.float64), atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities before renormalising
    counts = torch.bincount(gen.sample_next(logits, temperature=0.5, generator=g), minlength=4).double() / 20000
    p = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64) ** 2
    torch.testing.assert_close(counts, p / p.sum(), atol=0.015, rtol=0)


def test_sampled_tokens_and_scores_are_consistent_in_a_batch(tiny_dir):
    """A row's sampled score is the model's log-prob of its own tokens; finished rows stop at EOS."""
    from model.load import load_model
    model, tok = load_model(tiny_dir, dtype=torch.float64)
    prompts = [tok.encode(p, bos=True) for p in ("ab", "a longer prompt")]
    seqs, scores = gen.sample_search(model.eval(), prompts, max_new_tokens=10, temperature=1.0, seed=1)
    for p, s, lp in zip(prompts, seqs, scores):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + s]))[0].double(), -1)
        assert lp == pytest.approx(sum(logp[len(p) - 1 + t, s[t]].item() for t in range(len(s))), abs=1e-6)
    eos = seqs[0][2]
    cut, _ = gen.sample_search(model, prompts, max_new_tokens=10, temperature=1.0, seed=1, eos_ids=[eos])
    assert cut[0] == seqs[0][:seqs[0].index(eos)]


# ------------------------------------------------------------- streaming ----------------------------------

def test_text_stream_writes_whole_characters_only():
    import io
    tok = ByteTokenizer()
    ids = tok.encode("é→ok")                           # 2 + 3 + 2 bytes
    out = io.StringIO()
    stream = gen.TextStream(tok, tok.encode("x", bos=True), out)
    pieces = []
    for i in ids:
        before = out.getvalue()
        stream.push([i])
        pieces.append(out.getvalue()[len(before):])
    assert out.getvalue() == "xé→ok" and "\ufffd" not in out.getvalue()
    assert pieces == ["", "é", "", "", "→", "o", "k"]


def test_beam_search_from_the_cli_matches_the_library(tiny_dir, capsys):
    from model.load import load_model
    model, tok = load_model(tiny_dir)
    seqs, _ = gen.beam_search(model.eval(), [tok.encode("hi", bos=True)], num_beams=3, max_new_tokens=12,
                              eos_ids=gen.stop_ids(tok))
    out = cli(capsys, "--model", str(tiny_dir), "hi", "--num-beams", "3", "--max-new-tokens", "12")
    assert out == "hi" + tok.decode(seqs[0], skip_special=True) + "\n"


# ------------------------------------------------------------- chat ---------------------------------------

@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory):
    if not SHARED.exists():
        pytest.skip("../shared (real data and weights) not present")
    out = tmp_path_factory.mktemp("smollm")
    gguf = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    subprocess.run([sys.executable, str(SHARED / "tools" / "gguf_to_meta.py"), str(gguf), str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


def test_chat_formats_agree_with_the_jinja_template(smollm_dir):
    from model.load import load_dir_tokenizer
    tok = load_dir_tokenizer(smollm_dir)
    user = [{"role": "user", "content": "What is the capital of France?"}]
    assert gen.fallback_chat_text(tok, user) == \
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    # with a system message SmolLM2's template adds none of its own, so both renderings must agree
    assert gen.chat_text(smollm_dir, tok, "Hi?", system="Be brief.") == gen.fallback_chat_text(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    assert gen.chat_text(smollm_dir, tok, "Hi?").startswith("<|im_start|>system\nYou are a helpful AI assistant")
    from model.tokenizer import TiktokenTokenizer
    llama3 = TiktokenTokenizer(SHARED / "tokenizers" / "llama3" / "tokenizer.model")
    text = gen.fallback_chat_text(llama3, user)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = llama3.encode(text, allow_special=True)
    assert ids[:2] == [128000, 128006] and ids[-4:] == [128006, 78191, 128007, 271] and 128009 in ids


def test_smollm_chat_answer_stops_at_end_of_turn(smollm_dir, capsys, monkeypatch):
    """README's known answer (no system message: the built-in ChatML format, as without jinja2)."""
    monkeypatch.setattr(gen, "chat_text", lambda d, tok, user, system=None: gen.fallback_chat_text(
        tok, [{"role": "user", "content": user}]))
    out = cli(capsys, "--model", str(smollm_dir), "--chat", "What is the capital of France?",
              "--max-new-tokens", "30")
    assert out == "The capital of France is Paris.\n"


# ------------------------------------------------------------- errors -------------------------------------

def test_bad_flags_and_files_are_one_line_errors(tiny_dir, tmp_path, capsys):
    base = ["--model", str(tiny_dir), "hi"]
    assert "--num-beams > 1" in cli_error(capsys, *base, "--temperature", "1", "--num-beams", "2")
    assert "--temperature > 0" in cli_error(capsys, *base, "--top-k", "5")
    assert "--top-p must be in (0, 1]" in cli_error(capsys, *base, "--temperature", "1", "--top-p", "0")
    assert "--max-new-tokens must be >= 1" in cli_error(capsys, *base, "--max-new-tokens", "0")
    assert "--system needs --chat" in cli_error(capsys, *base, "--system", "x")
    assert "context is 64" in cli_error(capsys, "--model", str(tiny_dir), "x" * 80)
    assert "no adapter_config.json" in cli_error(capsys, *base, "--adapter", str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("params.json", "tokenizer_config.json"):
        (bad / f).write_text((tiny_dir / f).read_text())
    (bad / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes()[:500])
    msg = cli_error(capsys, "--model", str(bad), "hi")
    assert str(bad) in msg and "damaged" in msg
