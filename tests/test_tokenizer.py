import base64
import json

import pytest

from conftest import SHARED, needs_shared
from model.tokenizer import ByteTokenizer, load_tokenizer

LLAMA2 = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
LLAMA3 = SHARED / "tokenizers" / "llama3" / "tokenizer.model"
SMOL_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Meta llama3 tokenizer.py pattern, written out independently of model/tokenizer.py
META_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(LLAMA3.parent)


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, str(SHARED / "tools" / "gguf_to_meta.py"), str(SMOL_GGUF), str(out)],
                   check=True, capture_output=True)
    return out


@needs_shared
def test_llama2_known_ids():
    tok = load_tokenizer(LLAMA2)
    assert tok.encode("Hello world!") == [15043, 3186, 29991]
    assert tok.encode("Hello world!", bos=True) == [1, 15043, 3186, 29991]
    assert tok.encode("Hello world!", bos=True, eos=True) == [1, 15043, 3186, 29991, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 32000)
    assert tok.decode([1, 15043, 3186, 29991, 2], skip_special=True) == "Hello world!"
    assert tok.decode([1, 15043, 2]) == "<s>Hello</s>"
    # special strings: plain text by default, single ids on request
    assert tok.encode("</s>") != [2]
    assert tok.encode("Hi</s>", allow_special=True)[-1] == 2


@needs_shared
def test_llama3_against_tiktoken_directly(llama3):
    import tiktoken
    ranks = {}
    for line in LLAMA3.read_bytes().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    enc = tiktoken.Encoding("ref", pat_str=META_PAT, mergeable_ranks=ranks, special_tokens={})
    for text in ["Hello world!", "  The  quick\n\n brown fox's 12345 jumps.\r\n", "héllo wörld 日本語 🙂"]:
        assert llama3.encode(text) == enc.encode(text)
        assert llama3.decode(llama3.encode(text)) == text
    assert llama3.encode("Hello world!", bos=True) == [128000] + enc.encode("Hello world!")
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert llama3.stop_ids == {128001, 128009}


@needs_shared
def test_llama3_special_tokens(llama3):
    names = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
             "<|reserved_special_token_3|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
             "<|reserved_special_token_4|>": 128008, "<|eot_id|>": 128009, "<|reserved_special_token_5|>": 128010,
             "<|reserved_special_token_250|>": 128255}
    for name, i in names.items():
        assert llama3.encode(name, allow_special=True) == [i]
        assert len(llama3.encode(name)) > 1  # plain text by default
        assert llama3.decode([i]) == name
    assert len(llama3.special_tokens) == 256
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    ids = llama3.encode(text, allow_special=True)
    assert ids[:2] == [128000, 128006] and ids[-1] == 128009
    assert ids[2:-1] == llama3.encode("user")[:1] + [128007] + llama3.encode("\n\nHi!")
    assert llama3.decode(ids) == text
    assert llama3.decode(ids, skip_special=True) == "user\n\nHi!"
    assert llama3.pad_id == 128004


@needs_shared
def test_llama3_long_input(llama3):
    # Meta's chunking: 500k chars in several encode calls, whitespace run > 25k split
    text = "a" * 30_000 + " " * 30_000 + "b c " * 120_000
    ids = llama3.encode(text)
    assert llama3.decode(ids) == text


@needs_shared
def test_smollm2_config(smol_dir):
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    tok = load_tokenizer(smol_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (cfg["bos_id"], cfg["eos_id"], cfg["pad_id"])
    assert tok.add_bos is cfg["add_bos"]
    assert tok.vocab_size == 49152
    for name, i in cfg["special_tokens"].items():
        assert tok.encode(name, allow_special=True) == [i]
    assert tok.encode("<|im_start|>", allow_special=True) == [cfg["special_tokens"]["<|im_start|>"]]
    assert tok.encode("<|im_start|>") != [cfg["special_tokens"]["<|im_start|>"]]
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    answer = "The capital of France is Paris."
    p, a = tok.encode(prompt, allow_special=True), tok.encode(answer)
    assert p[0] == 1 and p.count(2) == 1 and p.count(1) == 2
    assert tok.decode(p + a) == prompt + answer
    # SmolLM2 splits digits one by one (its pre-tokenizer), unlike GPT-2
    assert len(tok.encode("12345")) == 5


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "Grüße, 世界! 🙂"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == [256] + list(text.encode("utf-8")) + [257]
    assert tok.decode(ids, skip_special=True) == text
    assert tok.decode(ids) == "<|bos|>" + text + "<|eos|>"
    assert tok.encode("<|eos|>", allow_special=True) == [257]
    assert tok.encode("<|eos|>") == list(b"<|eos|>")
    assert (tok.vocab_size, tok.pad_id) == (259, 258)
    assert load_tokenizer("byte").encode("a") == [97]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([300])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)  # folder without tokenizer.model
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01garbage\xff" * 10)
    with pytest.raises(ValueError, match=str(bad)) as e:
        load_tokenizer(bad)
    assert "\n" not in str(e.value)
    bad.write_text("IQ== 0\nnot a rank line\n")
    with pytest.raises(ValueError, match="line 2"):
        load_tokenizer(bad)


def test_tiktoken_config_override(tmp_path):
    # a tiny byte-level vocab: 256 single bytes + one merge; config gives specials and ids
    ranks = [bytes([b]) for b in range(256)] + [b"ab"]
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {i + 2}\n" for i, t in enumerate(ranks)))
    cfg = {"type": "tiktoken", "pattern": r"\S+|\s+", "special_tokens": {"<bos>": 0, "<eos>": 1},
           "bos_id": 0, "eos_id": 1, "pad_id": None, "add_bos": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (0, 1, 1, False, 259)
    assert tok.encode("ab a", bos=True) == [0, 258, ord(" ") + 2, ord("a") + 2]
    assert tok.encode("<eos>x", allow_special=True) == [1, ord("x") + 2]
    cfg["eos_id"] = 999
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="eos_id"):
        load_tokenizer(tmp_path)
