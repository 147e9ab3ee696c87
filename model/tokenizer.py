"""Tokenizers: SentencePiece (LLaMA 1/2), tiktoken (LLaMA 3, and byte-level BPE converted from GGUF),
and a file-free byte tokenizer for the built-in default run.

    tok = load_tokenizer("path/to/model_dir")      # or the tokenizer.model file itself
    ids = tok.encode("Hello world!", bos=True)      # list[int]
    text = tok.decode(ids, skip_special=True)

Every tokenizer has: encode(text, bos=False, eos=False, allow_special=False) -> list[int],
decode(ids, skip_special=False) -> str, bos_id, eos_id, pad_id, vocab_size, stop_ids (set of ids that end
generation), add_bos (whether the model expects BOS at the start of a prompt), special_tokens
({text: id}).

The file type is decided from its content, not its name: a tiktoken rank file is text lines
"base64(token bytes) rank"; anything else must parse as a SentencePiece ModelProto.

allow_special=False (default): special-token strings in the text ("<|eot_id|>", "<s>") are encoded as plain
text, so user data can never inject control tokens. allow_special=True: they become their single ids
(needed for chat prompts such as "<|im_start|>user\\n...").

Pad ids (padding positions are masked out of attention and loss, so the choice only has to be a valid id):
  SentencePiece: sp.pad_id() if the model defines one, else 0 (<unk> for LLaMA 1/2 -- the choice of
      LLM-Adapters, whose code sets pad_token_id = 0 "to be different from the eos token").
  LLaMA 3 (no tokenizer_config.json): <|reserved_special_token_2|> = 128004, which Llama 3.1 renamed
      <|finetune_right_pad_id|> for exactly this purpose.
  tiktoken + tokenizer_config.json: its pad_id; if null, eos_id.
  ByteTokenizer: 258.
"""
import base64
import re
from pathlib import Path

from .io import read_json   # no torch: the tokenizer alone needs none

# Meta llama3 tokenizer.py: split pattern and special tokens
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_NAMES = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)]

# tiktoken's Rust core is slow (quadratic) on very long runs of whitespace / non-whitespace, and Meta caps
# each encode call; the same limits as Meta's llama3 tokenizer.py
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} \d+$")


class Tokenizer:
    """Shared logic: special-token splitting for allow_special, bos/eos wrapping, stop ids."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    add_bos: bool = True
    special_tokens: dict  # text -> id

    def _encode_ordinary(self, text: str) -> list:
        raise NotImplementedError

    def _decode_ordinary(self, ids: list) -> str:
        raise NotImplementedError

    @property
    def stop_ids(self) -> set:
        return {self.eos_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if allow_special and self.special_tokens:
            ids = []
            for i, part in enumerate(self._special_re().split(text)):
                if i % 2:  # odd parts are the captured special-token strings
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self._encode_ordinary(part))
        else:
            ids = self._encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        id_to_special = {v: k for k, v in self.special_tokens.items()}
        out, run = [], []
        for i in ids:  # decode runs of ordinary ids together, so multi-token characters survive
            if i in id_to_special:
                if run:
                    out.append(self._decode_ordinary(run))
                    run = []
                if not skip_special:
                    out.append(id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_ordinary(run))
        return "".join(out)

    def _special_re(self):
        if getattr(self, "_special_re_cache", None) is None:
            names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: "<|a|b|>" before "<|a|>"
            self._special_re_cache = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        return self._special_re_cache

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """ids 0..255 = UTF-8 bytes; 256 = <|bos|>, 257 = <|eos|>, 258 = <|pad|>; vocab_size 259. No files."""

    def __init__(self):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259
        self.add_bos = True
        self.special_tokens = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}

    def _encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def _decode_ordinary(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2. Special tokens = the model's control pieces (<s>, </s>; <unk> stays ordinary)."""

    def __init__(self, path, config=None):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
            raise ValueError(f"{path}: not a SentencePiece model nor a tiktoken rank file "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        sp = self.sp
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else 0  # LLaMA 2: -1 -> 0 (<unk>), as LLM-Adapters
        self.add_bos = True
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        _apply_overrides(self, config or {}, path)

    def _encode_ordinary(self, text):
        return self.sp.encode(text)

    def _decode_ordinary(self, ids):
        return self.sp.decode(ids)


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE from a rank file. Without a config: LLaMA 3 (Meta's pattern, 256 special tokens at
    ids num_base_tokens + i, bos <|begin_of_text|>, eos <|end_of_text|>, stop also at <|eot_id|>).
    A tokenizer_config.json (as written by ../shared/tools/gguf_to_meta.py) overrides pattern,
    special_tokens ({text: id}), bos_id, eos_id, pad_id, add_bos."""

    def __init__(self, path, config=None):
        import tiktoken

        ranks = _read_ranks(path)
        config = config or {}
        pattern = config.get("pattern") or LLAMA3_PATTERN
        if config.get("special_tokens") is not None:
            special = {str(k): int(v) for k, v in config["special_tokens"].items()}
            bos, eos, pad = None, None, None
        else:
            n = len(ranks)
            special = {name: n + i for i, name in enumerate(LLAMA3_SPECIAL_NAMES)}
            bos, eos = special["<|begin_of_text|>"], special["<|end_of_text|>"]
            pad = special["<|reserved_special_token_2|>"]
        clash = set(special.values()) & set(ranks.values())
        if clash:
            raise ValueError(f"{path}: special token ids {sorted(clash)[:5]} also appear as BPE ranks")
        try:
            self.model = tiktoken.Encoding(name=Path(path).name, pat_str=pattern, mergeable_ranks=ranks,
                                           special_tokens=special)
        except Exception as e:
            raise ValueError(f"{path}: cannot build tiktoken encoding: {e}") from None
        self.special_tokens = special
        self.ranks, self.pattern = ranks, pattern   # kept for exporting an HF tokenizer.json
        self.vocab_size = max(max(ranks.values()), max(special.values(), default=-1)) + 1
        self.bos_id, self.eos_id, self.pad_id = bos, eos, pad
        self.add_bos = True
        _apply_overrides(self, config, path)
        if self.eos_id is None:
            raise ValueError(f"{path}: tokenizer_config.json gives no eos_id")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        if self.bos_id is None:  # e.g. a GPT-2 style vocab with no BOS; never added then
            self.bos_id, self.add_bos = self.eos_id, False

    @property
    def stop_ids(self):
        extra = {"<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"}
        return {self.eos_id} | {i for t, i in self.special_tokens.items() if t in extra}

    def _encode_ordinary(self, text):
        # Meta llama3 tokenizer.py: cap each call's length and split pathological whitespace runs
        ids = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_whitespaces_or_nonwhitespaces(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                             MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.model.encode_ordinary(piece))
        return ids

    def _decode_ordinary(self, ids):
        return self.model.decode(ids, errors="replace")


def _split_whitespaces_or_nonwhitespaces(s, max_consecutive):
    """Split s so that no piece has more than max_consecutive consecutive whitespace or non-whitespace
    characters (Meta llama3 tokenizer.py)."""
    current_slice_len, current_slice_is_space, slice_start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len, current_slice_is_space = 1, is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive:
                yield s[slice_start:i]
                slice_start, current_slice_len = i, 1
    yield s[slice_start:]


def _read_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if not _RANK_LINE.match(line):
                raise ValueError(f"{path}: line {n} is not 'base64 rank'")
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken rank file")
    return ranks


def _apply_overrides(tok, config, path):
    for key in ("bos_id", "eos_id", "pad_id"):
        v = config.get(key)
        if v is not None:
            if not (isinstance(v, int) and 0 <= v < tok.vocab_size):
                raise ValueError(f"{path}: tokenizer_config.json {key}={v!r} is not an id in [0, {tok.vocab_size})")
            setattr(tok, key, v)
    if config.get("add_bos") is not None:
        tok.add_bos = bool(config["add_bos"])


def _is_rank_file(path):
    with open(path, "rb") as f:
        first = f.readline(4096).strip()
    return bool(_RANK_LINE.match(first))


def load_tokenizer(path_or_dir) -> Tokenizer:
    """path_or_dir: a tokenizer.model file (SentencePiece or tiktoken ranks) or a folder holding one.
    An optional tokenizer_config.json beside it is read (see TiktokenTokenizer). "byte" -> ByteTokenizer."""
    if str(path_or_dir) == "byte":
        return ByteTokenizer()
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    config = {}
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
    if _is_rank_file(path):
        return TiktokenTokenizer(path, config)
    if config.get("type") == "tiktoken":
        raise ValueError(f"{path}: tokenizer_config.json says tiktoken but the file is not a rank file")
    return SentencePieceTokenizer(path, config)
