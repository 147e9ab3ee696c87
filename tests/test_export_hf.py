"""The HF export's tokenizer and generation files: what transformers' AutoTokenizer / GenerationConfig and
vLLM read. Checked three ways: the files' contents (always), a small re-implementation of the `tokenizers`
BPE reading tokenizer.json (always; it must reproduce our ids), and transformers itself (when installed)."""
import glob
import json
import subprocess
import sys

import pytest
import regex

import convert_weights as cw
from conftest import SHARED, needs_shared
from model.tokenizer import ByteTokenizer, load_tokenizer

LLAMA2 = SHARED / "tokenizers" / "llama2"
LLAMA3 = SHARED / "tokenizers" / "llama3"
STORIES = SHARED / "models" / "stories260K"
SMOL_GGUF = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_CHAT = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"


def commonsense_texts(per_task):
    """Instructions and answers of the first rows of every commonsense test set."""
    texts = []
    for path in sorted(glob.glob(str(SHARED / "data" / "commonsense" / "*" / "test.json"))):
        rows = json.loads(open(path).read())[:per_task]
        texts += [r["instruction"] for r in rows] + [r["output"] for r in rows]
    return texts


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    """{name: (our tokenizer, folder with the HF files written for it)} for the real tokenizers."""
    if not SHARED.exists():
        pytest.skip("../shared (real tokenizers) not present")
    root = tmp_path_factory.mktemp("hf_tokenizers")
    subprocess.run([sys.executable, str(SHARED / "tools" / "gguf_to_meta.py"), str(SMOL_GGUF), str(root / "smol")],
                   check=True, capture_output=True)
    out = {}
    for name, src in (("smollm2", root / "smol"), ("llama3", LLAMA3), ("llama2", LLAMA2)):
        tok = load_tokenizer(src)
        (root / f"hf_{name}").mkdir()
        ours = src / "tokenizer_config.json"
        template = json.loads(ours.read_text()).get("chat_template") if ours.exists() else None
        cw.write_hf_tokenizer(tok, root / f"hf_{name}", template, 2048)
        out[name] = (tok, root / f"hf_{name}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# a minimal reader of tokenizer.json (the subset we write), independent of convert_weights / model

def byte_chars():
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + extra.index(b)) for b in range(256)}


class MiniHF:
    """tokenizers' BPE as configured in our tokenizer.json: added tokens split first, then the normalizer
    (SentencePiece) or the Split regex + byte-level map (tiktoken), then merges by priority."""

    def __init__(self, path):
        t = json.loads(path.read_text())
        self.t, self.vocab = t, t["model"]["vocab"]
        self.rank = {tuple(m.split(" ")): i for i, m in enumerate(t["model"]["merges"])}
        self.added = {a["content"]: a["id"] for a in t["added_tokens"]}
        self.special_re = regex.compile("(" + "|".join(map(regex.escape, sorted(self.added, key=len)[::-1])) + ")")

    def bpe(self, word):
        if self.t["model"]["ignore_merges"] and word in self.vocab:
            return [word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode_segment(self, text):
        pre = self.t["pre_tokenizer"]
        if pre is None:  # SentencePiece: normalize, one word, byte fallback
            for n in self.t["normalizer"]["normalizers"]:
                if n["type"] == "Prepend":
                    text = n["prepend"] + text
                elif "String" in n["pattern"]:
                    text = text.replace(n["pattern"]["String"], n["content"])
                else:
                    text = regex.sub(n["pattern"]["Regex"].replace(r"\z", r"\Z"), n["content"], text)
            ids = []
            for p in self.bpe(text):
                ids += [self.vocab[p]] if p in self.vocab else [self.vocab[f"<0x{b:02X}>"] for b in p.encode()]
            return ids
        u = byte_chars()
        pieces = regex.findall(pre["pretokenizers"][0]["pattern"]["Regex"], text)
        return [self.vocab[p] for w in pieces for p in self.bpe("".join(u[b] for b in w.encode()))]

    def encode(self, text):
        ids = []
        for i, part in enumerate(self.special_re.split(text)):
            if i % 2:
                ids.append(self.added[part])
            elif part:
                ids += self.encode_segment(part)
        return ids


@needs_shared
@pytest.mark.parametrize("name", ["smollm2", "llama3", "llama2"])
def test_tokenizer_json_reproduces_our_ids(tokenizers_dir, name):
    tok, folder = tokenizers_dir[name]
    mini = MiniHF(folder / "tokenizer.json")
    texts = commonsense_texts(5)
    assert len(texts) == 80
    for text in texts:
        assert mini.encode(text) == tok.encode(text), text
    for special, i in list(tok.special_tokens.items())[:20]:
        assert mini.encode(special) == [i]
    if name == "smollm2":
        assert mini.encode(SMOL_CHAT) == tok.encode(SMOL_CHAT, allow_special=True)
    if name == "llama3":
        assert mini.encode(LLAMA3_CHAT) == tok.encode(LLAMA3_CHAT, allow_special=True)


@needs_shared
@pytest.mark.parametrize("name,bos,eos,pad,gen_eos,add_bos", [
    ("smollm2", "<|im_start|>", "<|im_end|>", "<|im_end|>", [2, 0], False),
    ("llama3", "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_2|>", [128001, 128009], True),
    ("llama2", "<s>", "</s>", "<unk>", 2, True)])
def test_written_files(tokenizers_dir, name, bos, eos, pad, gen_eos, add_bos):
    tok, folder = tokenizers_dir[name]
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["add_bos_token"]) == (bos, eos, pad, add_bos)
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 2048
    assert ("chat_template" in cfg) == (name == "smollm2")
    special_map = json.loads((folder / "special_tokens_map.json").read_text())
    assert (special_map["bos_token"], special_map["eos_token"], special_map["pad_token"]) == (bos, eos, pad)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen == {"bos_token_id": tok.bos_id, "eos_token_id": gen_eos, "pad_token_id": tok.pad_id}
    t = json.loads((folder / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in t["added_tokens"]}
    assert ids == tok.special_tokens and all(a["special"] for a in t["added_tokens"])
    assert len(t["model"]["vocab"]) == tok.vocab_size
    assert (t["post_processor"] is not None) == add_bos


@needs_shared
@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_tokenizer_json_imports_back(tokenizers_dir, tmp_path, name):
    """HF export -> import: the tiktoken file rebuilt from tokenizer.json is our tokenizer again."""
    tok, folder = tokenizers_dir[name]
    cw.tokenizer_json_to_tiktoken(folder, tmp_path)
    back = load_tokenizer(tmp_path)
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos, back.vocab_size) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size)
    assert back.special_tokens == tok.special_tokens and back.pattern == tok.pattern
    for text in commonsense_texts(3):
        assert back.encode(text) == tok.encode(text)


def test_byte_tokenizer_files(tmp_path):
    tok = ByteTokenizer()
    cw.write_hf_tokenizer(tok, tmp_path)
    mini = MiniHF(tmp_path / "tokenizer.json")
    text = "Grüße, 世界! <|eos|> 12"
    assert mini.encode(text) == tok.encode(text, allow_special=True)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    cw.tokenizer_json_to_tiktoken(tmp_path, tmp_path)   # and it imports back
    back = load_tokenizer(tmp_path)
    assert back.encode(text, bos=True, allow_special=True) == tok.encode(text, bos=True, allow_special=True)


@needs_shared
def test_stories260k_hf_export_files(tmp_path):
    """The real model, converted and exported: every file HF / vLLM read, with the right ids and dtype."""
    assert cw.main([str(STORIES), str(tmp_path / "ours")]) is None
    assert cw.main(["--export", "hf", "--model", str(tmp_path / "ours"), str(tmp_path / "hf")]) is None
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"      # the checkpoint is fp32 and no --dtype was given
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    allowed = {"architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "vocab_size", "tie_word_embeddings", "max_position_embeddings", "hidden_act", "attention_bias",
               "mlp_bias", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id"}
    assert set(cfg) <= allowed
    mini = MiniHF(tmp_path / "hf" / "tokenizer.json")
    tok = load_tokenizer(STORIES)
    for text in commonsense_texts(3):
        assert mini.encode(text) == tok.encode(text)


# ---------------------------------------------------------------------------------------------------------------
# transformers itself (optional: not a requirement of this project)

@needs_shared
@pytest.mark.parametrize("name", ["smollm2", "llama3", "llama2"])
def test_autotokenizer_reproduces_our_ids(tokenizers_dir, name):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional)")
    tok, folder = tokenizers_dir[name]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    texts = commonsense_texts(40)
    assert len(texts) == 640
    got = hf(texts, add_special_tokens=False)["input_ids"]
    assert got == [tok.encode(t) for t in texts]
    with_bos = hf(texts[:20])["input_ids"]
    assert with_bos == [tok.encode(t, bos=tok.add_bos) for t in texts[:20]]
    for special, i in tok.special_tokens.items():
        assert hf(special, add_special_tokens=False)["input_ids"] == [i], special
    gen = transformers.GenerationConfig.from_pretrained(folder)
    want = cw.eos_ids(tok)
    assert gen.eos_token_id == (want if len(want) > 1 else want[0])
    if name == "smollm2":
        prompt = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=False)
        assert prompt.endswith(SMOL_CHAT)
        assert hf(prompt, add_special_tokens=False)["input_ids"] == tok.encode(prompt, allow_special=True)
    if name == "llama3":
        assert hf(LLAMA3_CHAT, add_special_tokens=False)["input_ids"] == tok.encode(LLAMA3_CHAT, allow_special=True)
    assert hf.decode(tok.encode("Hello world! 12 héllo")) == "Hello world! 12 héllo"
