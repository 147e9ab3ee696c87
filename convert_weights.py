"""Convert LLaMA checkpoints between Meta, Hugging Face (HF), PEFT and our own layout.

Import (SRC is a Meta or HF checkpoint folder; OUT is what model/load.py loads):
    python convert_weights.py SRC OUT [--dtype bf16|fp16|fp32] [--force]
      Meta: consolidated.NN.pth shards + params.json + tokenizer.model
      HF:   config.json + *.safetensors (or pytorch_model*.bin) + tokenizer.model (or a byte-level BPE tokenizer.json)
      OUT:  model.safetensors + params.json + tokenizer.model (+ tokenizer_config.json)
    python convert_weights.py PEFT_ADAPTER_DIR OUT --model MODEL_DIR
      a PEFT LoRA/DoRA adapter (adapter_config.json + adapter_model.safetensors) -> our adapter folder
Export (MODEL_DIR is our layout, or any layout above; RUN_DIR/adapter is what train.py saved):
    python convert_weights.py --export hf   --model MODEL_DIR [--adapter RUN_DIR/adapter] OUT
    python convert_weights.py --export meta --model MODEL_DIR [--adapter RUN_DIR/adapter] OUT
      merged model: base + adapter folded in fp32 (LoRA eq. 1, DoRA)
    python convert_weights.py --export peft --model MODEL_DIR --adapter RUN_DIR/adapter OUT
      adapter only, PEFT key names, for PeftModel.from_pretrained / vLLM on the HF base model

Two layouts of the q/k rows. Meta applies RoPE to interleaved pairs (2i, 2i+1) of each head; HF's
rotate-half RoPE pairs (i, i + head_dim/2). The same model in HF layout has the rows of each q/k head
reordered: HF row (h, j, c) = Meta row (h, c, j) for c in {0, 1} (cos/sin half), j < head_dim/2.
Anything indexed by q/k output rows (weights, lora_B, DoRA magnitudes) is permuted the same way.

Everything is written into a temporary folder beside OUT and renamed into place, so a failed
conversion leaves nothing half-written.
"""
import argparse
import base64
import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# Meta name inside a block -> HF name inside model.layers.N
HF_BLOCK_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
META_BLOCK_NAMES = {v: k for k, v in HF_BLOCK_NAMES.items()}
MODULE_PATHS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
                "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
HF_MODULES = {m: HF_BLOCK_NAMES[p].split(".")[1] for m, p in MODULE_PATHS.items()}  # wq -> q_proj
OUR_MODULES = {v: k for k, v in HF_MODULES.items()}
# LLaMA 3.1 RoPE scaling, the constants of Meta's apply_scaling (params.json: use_scaled_rope)
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_BLOCK_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_BLOCK_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


# ----------------------------------------------------------------------------------------------------------------
# params.json <-> HF config.json

def ffn_hidden_dim(params):
    """FFN width: params["hidden_dim"] if given, else Meta's rule (2/3 * 4 * dim, times
    ffn_dim_multiplier, rounded up to a multiple of multiple_of)."""
    if params.get("hidden_dim"):
        return int(params["hidden_dim"])
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params.get("multiple_of", 256)
    return m * ((hidden + m - 1) // m)


def normalize_params(params, state_dict):
    """Meta params.json with every field our loader needs resolved (LLaMA 1/2 write vocab_size -1 and
    leave n_kv_heads / hidden_dim implicit); sizes are checked against the weights."""
    p = dict(params)
    for k in ("dim", "n_layers", "n_heads"):
        if k not in p:
            raise ValueError(f"params.json lacks '{k}'")
    p.setdefault("n_kv_heads", p["n_heads"])
    p["n_kv_heads"] = p["n_kv_heads"] or p["n_heads"]
    emb = state_dict["tok_embeddings.weight"].shape
    if p.get("vocab_size", -1) in (-1, None):
        p["vocab_size"] = emb[0]
    hidden = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    if p.get("hidden_dim") is None and ffn_hidden_dim(p) != hidden:
        raise ValueError(f"params.json gives an FFN width of {ffn_hidden_dim(p)} but w1 has {hidden} rows")
    p["hidden_dim"] = hidden
    p.setdefault("norm_eps", 1e-5)
    p.setdefault("rope_theta", 10000.0)
    p["tie_word_embeddings"] = bool(p.get("tie_word_embeddings", False))
    check_shapes(state_dict, p)
    return p


def params_to_hf_config(params, dtype=torch.bfloat16, bos_id=None, eos_id=None):
    """HF LlamaConfig fields for a Meta params.json (resolved by normalize_params)."""
    head_dim = params["dim"] // params["n_heads"]
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": params["dim"], "intermediate_size": ffn_hidden_dim(params),
        "num_attention_heads": params["n_heads"], "num_hidden_layers": params["n_layers"],
        "num_key_value_heads": params.get("n_kv_heads") or params["n_heads"], "head_dim": head_dim,
        "rms_norm_eps": params.get("norm_eps", 1e-5), "rope_theta": params.get("rope_theta", 10000.0),
        "rope_scaling": dict(LLAMA3_ROPE_SCALING) if params.get("use_scaled_rope") else None,
        "vocab_size": params["vocab_size"], "tie_word_embeddings": bool(params.get("tie_word_embeddings", False)),
        "max_position_embeddings": params.get("max_seq_len", 4096 if params.get("use_scaled_rope") is None else 131072),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": HF_DTYPE_NAMES[dtype],
    }
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


def hf_config_to_params(config):
    """Meta params.json for an HF LlamaConfig dict (old rope_theta/rope_scaling or new rope_parameters)."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json: model_type '{config.get('model_type')}' is not 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act '{config['hidden_act']}' is not 'silu'")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("config.json: attention_bias/mlp_bias are not supported by this LLaMA")
    for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if k not in config:
            raise ValueError(f"config.json lacks '{k}'")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"config.json: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        got = {k: scaling.get(k) for k in LLAMA3_ROPE_SCALING}
        got["rope_type"] = scaling.get("rope_type", scaling.get("type"))
        if got != LLAMA3_ROPE_SCALING:
            raise ValueError(f"config.json: rope scaling {scaling} is not LLaMA 3.1's {LLAMA3_ROPE_SCALING}")
    return {
        "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"],
        "hidden_dim": config["intermediate_size"], "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        "use_scaled_rope": bool(scaling), "max_seq_len": config.get("max_position_embeddings", 2048),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


# ----------------------------------------------------------------------------------------------------------------
# q/k row order: Meta interleaved RoPE <-> HF rotate-half RoPE

def permute_rotate_half(w, n_heads):
    """Meta -> HF rows of a q/k projection (or its lora_B [d_out, r], DoRA magnitude [d_out]).
    Row (h, j, c) of the result is row (h, c, j) of w: transformers' convert_llama_weights_to_hf permute."""
    d_out = w.shape[0]
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rotate_half(w, n_heads):
    """HF -> Meta rows: the inverse of permute_rotate_half."""
    d_out = w.shape[0]
    return w.reshape(n_heads, 2, d_out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _qk_heads(module, params):
    """Number of heads whose rows a q/k tensor holds (k: n_kv_heads, GQA); None for other modules."""
    return {"wq": params["n_heads"], "wk": params.get("n_kv_heads") or params["n_heads"]}.get(module)


# ----------------------------------------------------------------------------------------------------------------
# state dicts: key checks and Meta <-> HF

def expected_shapes(params):
    """{Meta key: shape} of the base model described by params (output.weight absent when tied)."""
    d, v, h, hd = params["dim"], params["vocab_size"], ffn_hidden_dim(params), params["dim"] // params["n_heads"]
    kv = (params.get("n_kv_heads") or params["n_heads"]) * hd
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    if not params.get("tie_word_embeddings"):
        shapes["output.weight"] = (v, d)
    block = {"attention.wq": (d, d), "attention.wk": (kv, d), "attention.wv": (kv, d), "attention.wo": (d, d),
             "feed_forward.w1": (h, d), "feed_forward.w2": (d, h), "feed_forward.w3": (h, d),
             "attention_norm": (d,), "ffn_norm": (d,)}
    for i in range(params["n_layers"]):
        shapes.update({f"layers.{i}.{name}.weight": s for name, s in block.items()})
    return shapes


def check_shapes(state_dict, params, origin="checkpoint"):
    """Every key present with its shape; no unknown keys. One-line errors naming the culprit."""
    want = expected_shapes(params)
    for k, v in state_dict.items():
        if k not in want:
            raise ValueError(f"{origin}: unknown key '{k}'")
        if tuple(v.shape) != want[k]:
            raise ValueError(f"{origin}: '{k}' has shape {tuple(v.shape)}, params say {want[k]}")
    missing = [k for k in want if k not in state_dict]
    if missing:
        raise ValueError(f"{origin}: missing key '{missing[0]}' ({len(missing)} missing)")


def drop_tied_output(state_dict, params, origin="checkpoint"):
    """With tied embeddings the output projection is the embedding; checkpoints that store it anyway
    (stories260K, gguf_to_meta) must store the same matrix."""
    out = state_dict.pop("output.weight", None)
    if params.get("tie_word_embeddings") and out is not None:
        if not torch.equal(out, state_dict["tok_embeddings.weight"]):
            raise ValueError(f"{origin}: tie_word_embeddings is true but output.weight != tok_embeddings.weight")
    elif out is not None:
        state_dict["output.weight"] = out
    return state_dict


def meta_to_hf(state_dict, params):
    """Meta keys -> HF keys; q/k rows permuted to rotate-half order; lm_head absent when tied."""
    hf = {}
    for k, w in state_dict.items():
        if k == "tok_embeddings.weight":
            hf["model.embed_tokens.weight"] = w
        elif k == "norm.weight":
            hf["model.norm.weight"] = w
        elif k == "output.weight":
            if not params.get("tie_word_embeddings"):
                hf["lm_head.weight"] = w
        elif (m := _BLOCK_KEY.fullmatch(k)) and m[2] in HF_BLOCK_NAMES:
            n_heads = _qk_heads(m[2].split(".")[-1], params)
            hf[f"model.layers.{m[1]}.{HF_BLOCK_NAMES[m[2]]}.weight"] = permute_rotate_half(w, n_heads) if n_heads else w
        else:
            raise ValueError(f"unknown key '{k}'")
    return hf


def hf_to_meta(state_dict, params):
    """HF keys -> Meta keys; q/k rows un-permuted to interleaved order. params: from hf_config_to_params
    (an HF config.json dict is accepted too). Rotary inv_freq buffers of old checkpoints are dropped."""
    if "hidden_size" in params:
        params = hf_config_to_params(params)
    meta = {}
    for k, w in state_dict.items():
        if k == "model.embed_tokens.weight":
            meta["tok_embeddings.weight"] = w
        elif k == "model.norm.weight":
            meta["norm.weight"] = w
        elif k == "lm_head.weight":
            meta["output.weight"] = w
        elif k.endswith("rotary_emb.inv_freq"):
            continue
        elif (m := _HF_BLOCK_KEY.fullmatch(k)) and m[2] in META_BLOCK_NAMES:
            name = META_BLOCK_NAMES[m[2]]
            n_heads = _qk_heads(name.split(".")[-1], params)
            meta[f"layers.{m[1]}.{name}.weight"] = unpermute_rotate_half(w, n_heads) if n_heads else w
        else:
            raise ValueError(f"unknown key '{k}'")
    return drop_tied_output(meta, params)


# ----------------------------------------------------------------------------------------------------------------
# Meta model-parallel shards

def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # pre-zipfile pickles cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def shard_dim(key, shard_shape, params, n_shards):
    """Dimension along which Meta's model-parallel code split `key` over n_shards (None: replicated).
    Column-parallel (wq wk wv w1 w3 output) split their output rows (dim 0), row-parallel (wo w2) their
    inputs (dim 1). The embedding: LLaMA 1/2 ParallelEmbedding splits the embedding dim (dim 1), LLaMA 3
    VocabParallelEmbedding the vocabulary (dim 0); the shard shape says which."""
    if n_shards == 1 or key.endswith("norm.weight"):
        return None
    if key == "tok_embeddings.weight":
        if shard_shape[1] * n_shards == params["dim"]:
            return 1
        if shard_shape[1] == params["dim"]:
            return 0
        raise ValueError(f"tok_embeddings.weight shard shape {tuple(shard_shape)} fits neither split of dim {params['dim']}")
    if key == "output.weight" or key.endswith(COLUMN_PARALLEL):
        return 0
    if key.endswith(ROW_PARALLEL):
        return 1
    raise ValueError(f"unknown key '{key}'")


def merge_meta_shards(shard_paths, params, dtype=None):
    """Merge consolidated.NN.pth model-parallel shards into one Meta state dict.
    Shards are memory-mapped and copied into the preallocated result one at a time, so peak memory is
    the merged model plus one shard's pages. rope.freqs (a buffer) is dropped."""
    shard_paths = sorted(shard_paths)
    n = len(shard_paths)
    out, dims, shapes = {}, {}, {}
    for i, path in enumerate(shard_paths):
        shard = _torch_load(path)
        shard.pop("rope.freqs", None)
        name = os.path.basename(path)
        if i == 0:
            for k, w in shard.items():
                dims[k] = shard_dim(k, w.shape, params, n)
                shapes[k] = tuple(w.shape)
                full = list(w.shape)
                if dims[k] is not None:
                    full[dims[k]] *= n
                out[k] = torch.empty(full, dtype=dtype or w.dtype)
        if set(shard) != set(shapes):
            extra = sorted(set(shard) ^ set(shapes))[0]
            raise ValueError(f"{name}: key '{extra}' is not in every shard")
        for k, w in shard.items():
            if tuple(w.shape) != shapes[k]:
                raise ValueError(f"{name}: '{k}' has shape {tuple(w.shape)}, {os.path.basename(shard_paths[0])} has {shapes[k]}")
            if dims[k] is None:
                if i == 0:
                    out[k].copy_(w)
                elif not torch.equal(out[k], w.to(out[k].dtype)):
                    raise ValueError(f"{name}: replicated '{k}' differs from shard 0")
            else:
                out[k].narrow(dims[k], i * w.shape[dims[k]], w.shape[dims[k]]).copy_(w)
        del shard
    return out


# ----------------------------------------------------------------------------------------------------------------
# readers

def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {os.path.basename(path)} in {os.path.dirname(path) or '.'}")
    with open(path) as f:
        return json.load(f)


def detect_layout(src):
    """'meta' | 'hf' | 'ours' | 'peft' | 'adapter' for a folder, from the files it holds."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} is not a folder")
    has = lambda pat: bool(glob.glob(os.path.join(glob.escape(src), pat)))  # noqa: E731
    if has("consolidated.*.pth"):
        return "meta"
    if has("config.json") and (has("*.safetensors") or has("pytorch_model*.bin")):
        return "hf"
    if has("model.safetensors") and has("params.json"):
        return "ours"
    if has("adapter_config.json") and has("adapter_model.*"):
        return "peft"
    if has("adapter_config.json") and has("adapter.safetensors"):
        return "adapter"
    raise ValueError(f"{src} is neither a Meta checkpoint (consolidated.*.pth + params.json) nor an HF one "
                     f"(config.json + *.safetensors), nor model.safetensors + params.json")


def read_meta(src, dtype=None):
    """(state dict, params) of a Meta checkpoint folder, shards merged, tied output dropped."""
    params = _read_json(os.path.join(src, "params.json"))
    shards = sorted(glob.glob(os.path.join(glob.escape(src), "consolidated.*.pth")))
    sd = merge_meta_shards(shards, params, dtype)
    if "tok_embeddings.weight" not in sd or "layers.0.feed_forward.w1.weight" not in sd:
        raise ValueError(f"{src}: checkpoint lacks tok_embeddings.weight or layers.0.feed_forward.w1.weight")
    return sd, normalize_params(params, drop_tied_output(sd, params, src))


def _load_tensor_file(path, dtype=None):
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k).to(dtype) if dtype else f.get_tensor(k) for k in f.keys()}
    sd = _torch_load(path)
    return {k: v.to(dtype) if dtype else v for k, v in sd.items()}


def read_hf(src, dtype=None):
    """(Meta state dict, params) of an HF checkpoint folder (single or sharded safetensors / .bin)."""
    config = _read_json(os.path.join(src, "config.json"))
    params = hf_config_to_params(config)
    files = sorted(glob.glob(os.path.join(glob.escape(src), "*.safetensors")))
    files = files or sorted(glob.glob(os.path.join(glob.escape(src), "pytorch_model*.bin")))
    sd = {}
    for path in files:
        sd.update(_load_tensor_file(path, dtype))
    sd = hf_to_meta(sd, params)
    check_shapes(sd, params, src)
    return sd, params


def read_ours(src, dtype=None):
    params = _read_json(os.path.join(src, "params.json"))
    sd = _load_tensor_file(os.path.join(src, "model.safetensors"), dtype)
    return sd, normalize_params(params, drop_tied_output(sd, params, src))


def read_model(src, dtype=None):
    """(Meta-key state dict, resolved params, layout) of any model folder: Meta, HF or ours."""
    layout = detect_layout(src)
    if layout not in ("meta", "hf", "ours"):
        raise ValueError(f"{src} holds an adapter, not a model")
    sd, params = {"meta": read_meta, "hf": read_hf, "ours": read_ours}[layout](src, dtype)
    return sd, params, layout


# ----------------------------------------------------------------------------------------------------------------
# tokenizers

def _bytes_to_unicode():
    """GPT-2's byte <-> printable unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


def _split_pattern(pre):
    """tiktoken split regex equivalent to an HF byte-level pre-tokenizer (ByteLevel with GPT-2's regex,
    optionally after Digits(individual_digits), as SmolLM2; or an explicit Split regex, as LLaMA 3)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    types = [s.get("type") for s in steps]
    split = [s for s in steps if s.get("type") == "Split"]
    if split and "Regex" in split[0].get("pattern", {}):
        return split[0]["pattern"]["Regex"]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _GPT2_PATTERN
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return _DIGITS_PATTERN
    raise ValueError(f"tokenizer.json: pre-tokenizer {types} is not a byte-level BPE this converter knows; "
                     f"a tokenizer.model is needed")


def tokenizer_json_to_tiktoken(src, out):
    """Byte-level BPE tokenizer.json -> tokenizer.model (tiktoken rank file: 'base64(bytes) rank', rank = id)
    + tokenizer_config.json in gguf_to_meta's format. BPE merge order equals id order in these vocabularies
    (LLaMA 3, SmolLM2), which is what tiktoken's rank-based merging needs."""
    tok = _read_json(os.path.join(src, "tokenizer.json"))
    if tok.get("model", {}).get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{src}: tokenizer.json is not a byte-level BPE; a tokenizer.model is needed")
    pattern = _split_pattern(tok.get("pre_tokenizer"))
    dec = _bytes_to_unicode()
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    lines = [f"{base64.b64encode(bytes(dec[ch] for ch in t)).decode()} {i}"
             for t, i in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in special]
    hf_cfg = {}
    if os.path.isfile(os.path.join(src, "tokenizer_config.json")):
        hf_cfg = _read_json(os.path.join(src, "tokenizer_config.json"))
    model_cfg = _read_json(os.path.join(src, "config.json")) if os.path.isfile(os.path.join(src, "config.json")) else {}

    def token_id(name, key):
        t = hf_cfg.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        return special.get(t, tok["model"]["vocab"].get(t)) if t is not None else model_cfg.get(key)

    cfg = {"type": "tiktoken", "pattern": pattern, "special_tokens": special,
           "bos_id": token_id("bos_token", "bos_token_id"), "eos_id": token_id("eos_token", "eos_token_id"),
           "pad_id": token_id("pad_token", "pad_token_id"), "add_bos": bool(hf_cfg.get("add_bos_token", False)),
           "chat_template": hf_cfg.get("chat_template")}
    if isinstance(cfg["eos_id"], list):
        cfg["eos_id"] = cfg["eos_id"][0]
    with open(os.path.join(out, "tokenizer.model"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _copy_into(path, folder):
    shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))  # contents only, not read-only modes


def _is_our_tokenizer_config(path):
    """HF's tokenizer_config.json is another format than ours (gguf_to_meta's, with "type": "tiktoken")."""
    return os.path.isfile(path) and _read_json(path).get("type") == "tiktoken"


def copy_tokenizer(src, out, layout):
    """Tokenizer files for our layout. Meta/ours: tokenizer.model (+ our tokenizer_config.json).
    HF: tokenizer.model (SentencePiece) if present, else a byte-level BPE tokenizer.json converted."""
    tm = os.path.join(src, "tokenizer.model")
    if layout in ("meta", "ours"):
        if not os.path.isfile(tm):
            print(f"warning: no tokenizer.model in {src}; OUT has no tokenizer", file=sys.stderr)
            return
        _copy_into(tm, out)
        if os.path.isfile(os.path.join(src, "tokenizer_config.json")):
            _copy_into(os.path.join(src, "tokenizer_config.json"), out)
    elif os.path.isfile(tm):
        _copy_into(tm, out)
        if _is_our_tokenizer_config(os.path.join(src, "tokenizer_config.json")):  # our own HF export
            _copy_into(os.path.join(src, "tokenizer_config.json"), out)
    elif os.path.isfile(os.path.join(src, "tokenizer.json")):
        tokenizer_json_to_tiktoken(src, out)
    else:
        print(f"warning: no tokenizer.model or tokenizer.json in {src}; OUT has no tokenizer", file=sys.stderr)


def _special_ids(model_dir):
    """(bos, eos) ids from our tokenizer files, for HF config.json; (None, None) when unknown."""
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        cfg = _read_json(cfg_path)
        return cfg.get("bos_id"), cfg.get("eos_id")
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
        return sp.bos_id(), sp.eos_id()
    except Exception:  # a tiktoken file or no tokenizer: ids unknown
        return None, None


# ----------------------------------------------------------------------------------------------------------------
# adapters: ours (model/lora.py save_adapter) <-> PEFT, and folding into the base weights

_ADAPTER_KEY = re.compile(r"layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.(lora_a|lora_b|magnitude)")
_PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\."
                       r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
_PEFT_PARTS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def read_adapter(adapter_dir):
    """(state dict, config) of our adapter folder. Echo parameters, if any were saved, are left out:
    they are never part of an export."""
    cfg = _read_json(os.path.join(adapter_dir, "adapter_config.json"))
    path = os.path.join(adapter_dir, "adapter.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing adapter.safetensors in {adapter_dir}")
    sd = {k: v for k, v in _load_tensor_file(path).items() if "echo" not in k}
    return sd, cfg


def check_adapter(adapter_sd, adapter_cfg, params):
    """The adapter fits this base model: same base dims in its config, known keys, matching shapes."""
    if adapter_cfg.get("method") not in ("lora", "dora"):
        raise ValueError(f"adapter_config.json: method '{adapter_cfg.get('method')}' is not lora or dora")
    base = adapter_cfg.get("base") or {}
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
        ours = params.get(k) if k != "hidden_dim" else ffn_hidden_dim(params)
        theirs = base.get(k) if k != "hidden_dim" or not base else ffn_hidden_dim(base)
        if k == "n_kv_heads" and base:
            theirs = theirs or base.get("n_heads")
        if theirs is not None and theirs != ours:
            raise ValueError(f"adapter was trained on a base with {k}={theirs}, this model has {k}={ours}")
    shapes, r = expected_shapes(params), adapter_cfg.get("rank")
    for k, t in adapter_sd.items():
        m = _ADAPTER_KEY.fullmatch(k)
        if not m:
            raise ValueError(f"adapter: unknown key '{k}'")
        wkey = f"layers.{m[1]}.{m[2]}.{m[3]}.weight"
        if wkey not in shapes:
            raise ValueError(f"adapter: '{k}' names a layer this model does not have")
        d_out, d_in = shapes[wkey]
        want = {"lora_a": (r, d_in), "lora_b": (d_out, r), "magnitude": (d_out,)}[m[4]]
        if tuple(t.shape) != want:
            raise ValueError(f"adapter: '{k}' has shape {tuple(t.shape)}, this model needs {want}")


def fold_adapter(state_dict, adapter_sd, adapter_cfg):
    """Base weights with the adapter folded in, computed in fp32, stored in each weight's dtype.
    LoRA (eq. 1):  W' = W + s B A,  s = alpha / r.
    DoRA:          W' = m * (W + s B A) / ||W + s B A||_row  (norm per output row, as model/lora.py)."""
    s = float(adapter_cfg["alpha"]) / float(adapter_cfg["rank"])
    out = dict(state_dict)
    for k in adapter_sd:
        if not k.endswith(".lora_a"):
            continue
        prefix = k[: -len(".lora_a")]
        w = state_dict[prefix + ".weight"]
        merged = w.float() + s * (adapter_sd[prefix + ".lora_b"].float() @ adapter_sd[k].float())
        if prefix + ".magnitude" in adapter_sd:
            norm = merged.norm(dim=1, keepdim=True).clamp_min(1e-12)
            merged = adapter_sd[prefix + ".magnitude"].float()[:, None] * merged / norm
        out[prefix + ".weight"] = merged.to(w.dtype)
    return out


def adapter_to_peft(adapter_sd, adapter_cfg, params, base_model_name_or_path=None):
    """(PEFT state dict, adapter_config.json dict). q/k lora_B rows and DoRA magnitudes are permuted to
    HF's rotate-half row order; lora_A (input side) is unchanged."""
    peft = {}
    for k, t in adapter_sd.items():
        m = _ADAPTER_KEY.fullmatch(k)
        if not m:
            raise ValueError(f"adapter: unknown key '{k}'")
        n_heads = _qk_heads(m[3], params)
        if n_heads and m[4] != "lora_a":
            t = permute_rotate_half(t, n_heads)
        hf_name = HF_BLOCK_NAMES[f"{m[2]}.{m[3]}"]
        peft[f"base_model.model.model.layers.{m[1]}.{hf_name}.{_PEFT_PARTS[m[4]]}"] = t.contiguous()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(adapter_cfg["rank"]), "lora_alpha": adapter_cfg["alpha"],
        "lora_dropout": adapter_cfg.get("dropout", 0.0),
        "target_modules": [HF_MODULES[m] for m in adapter_cfg["modules"]],
        "layers_to_transform": adapter_cfg.get("layers"), "layers_pattern": None,
        "use_dora": adapter_cfg["method"] == "dora", "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return peft, cfg


def peft_to_adapter(peft_sd, peft_cfg, params):
    """Inverse of adapter_to_peft: a PEFT LoRA/DoRA adapter -> (our adapter state dict, config)."""
    if peft_cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type '{peft_cfg.get('peft_type')}' is not LORA")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if peft_cfg.get(flag):
            raise ValueError(f"adapter_config.json: {flag} is not supported")
    if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
        raise ValueError("adapter_config.json: per-module rank_pattern/alpha_pattern are not supported")
    parts = {v: k for k, v in _PEFT_PARTS.items()}
    parts["lora_magnitude_vector.weight"] = "magnitude"
    sd = {}
    for k, t in peft_sd.items():
        m = _PEFT_KEY.fullmatch(k)
        if not m or m[3] not in OUR_MODULES:
            raise ValueError(f"PEFT adapter: unknown key '{k}'")
        module, part = OUR_MODULES[m[3]], parts[m[4]]
        n_heads = _qk_heads(module, params)
        if n_heads and part != "lora_a":
            t = unpermute_rotate_half(t, n_heads)
        sd[f"layers.{m[1]}.{MODULE_PATHS[module]}.{part}"] = t.contiguous()
    targets = peft_cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    unknown = [t for t in targets if t not in OUR_MODULES]
    if unknown:
        raise ValueError(f"adapter_config.json: target module '{unknown[0]}' is not a LLaMA linear layer")
    layers = peft_cfg.get("layers_to_transform")
    cfg = {"method": "dora" if peft_cfg.get("use_dora") else "lora", "rank": int(peft_cfg["r"]),
           "alpha": float(peft_cfg["lora_alpha"]), "dropout": float(peft_cfg.get("lora_dropout", 0.0)),
           "modules": [OUR_MODULES[t] for t in sorted(targets, key=list(OUR_MODULES).index)],
           "layers": [layers] if isinstance(layers, int) else layers, "base": params}
    check_adapter(sd, cfg, params)
    return sd, cfg


# ----------------------------------------------------------------------------------------------------------------
# writers (into a fresh folder)

def _contiguous(sd, dtype=None):
    """Own, contiguous tensors (safetensors refuses shared storage, e.g. tied or narrowed views)."""
    return {k: (v.to(dtype) if dtype else v).contiguous().clone() for k, v in sd.items()}


def write_ours(sd, params, out, dtype=torch.bfloat16):
    save_file(_contiguous(sd, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(params, f, indent=2)


def write_meta(sd, params, out, dtype=torch.bfloat16):
    torch.save(_contiguous(sd, dtype), os.path.join(out, "consolidated.00.pth"))
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(params, f, indent=2)


def write_hf(sd, params, out, dtype=torch.bfloat16, bos_id=None, eos_id=None, max_shard_bytes=5 << 30):
    """config.json + model.safetensors (or model-0000i-of-0000n.safetensors + index when large)."""
    hf = _contiguous(meta_to_hf(sd, params), dtype)
    shards, size = [{}], 0
    for k, v in hf.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(hf, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in hf.values())
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(params_to_hf_config(params, dtype, bos_id, eos_id), f, indent=2)


def export_peft(adapter_sd, adapter_cfg, params, out, base_model_name_or_path=None):
    """adapter_model.safetensors + adapter_config.json in PEFT's layout, into folder `out`."""
    check_adapter(adapter_sd, adapter_cfg, params)
    peft_sd, peft_cfg = adapter_to_peft(adapter_sd, adapter_cfg, params, base_model_name_or_path)
    save_file(peft_sd, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2)


def write_adapter(adapter_sd, adapter_cfg, out):
    """Our adapter folder layout (model/lora.py save_adapter)."""
    save_file(_contiguous(adapter_sd), os.path.join(out, "adapter.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(adapter_cfg, f, indent=2)


@contextlib.contextmanager
def atomic_dir(out, force=False):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise ValueError(f"{out} exists and is not empty (use --force to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT should look like any new folder
    try:
        yield tmp
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# commands

def convert(src, out, dtype=torch.bfloat16, force=False, model_dir=None):
    """SRC (Meta or HF model, or a PEFT adapter with model_dir) -> our layout in OUT."""
    layout = detect_layout(src)
    if layout == "peft":
        if model_dir is None:
            raise ValueError("converting a PEFT adapter needs --model MODEL_DIR (the base it was trained on)")
        _, params, _ = read_model(model_dir)
        cfg = _read_json(os.path.join(src, "adapter_config.json"))
        files = glob.glob(os.path.join(glob.escape(src), "adapter_model.*"))
        sd, acfg = peft_to_adapter(_load_tensor_file(sorted(files)[-1]), cfg, params)
        with atomic_dir(out, force) as tmp:
            write_adapter(sd, acfg, tmp)
        return
    if layout == "adapter":
        raise ValueError(f"{src} is already one of our adapters; export it with --export peft")
    sd, params, layout = read_model(src, dtype)
    with atomic_dir(out, force) as tmp:
        write_ours(sd, params, tmp, dtype)
        copy_tokenizer(src, tmp, layout)


def export(fmt, model_dir, out, adapter_dir=None, dtype=torch.bfloat16, force=False):
    """Our model (+ adapter) -> merged HF or Meta layout, or the adapter alone in PEFT layout."""
    if fmt == "peft":
        if adapter_dir is None:
            raise ValueError("--export peft needs --adapter RUN_DIR/adapter")
        params = read_model(model_dir)[1]
        adapter_sd, adapter_cfg = read_adapter(adapter_dir)
        with atomic_dir(out, force) as tmp:
            export_peft(adapter_sd, adapter_cfg, params, tmp, os.path.abspath(model_dir))
        return
    sd, params, layout = read_model(model_dir)
    if adapter_dir is not None:
        adapter_sd, adapter_cfg = read_adapter(adapter_dir)
        check_adapter(adapter_sd, adapter_cfg, params)
        sd = fold_adapter(sd, adapter_sd, adapter_cfg)
    with atomic_dir(out, force) as tmp:
        if fmt == "hf":
            bos, eos = _special_ids(model_dir)
            write_hf(sd, params, tmp, dtype, bos, eos)
            if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
                _copy_into(os.path.join(model_dir, "tokenizer.model"), tmp)
            if _is_our_tokenizer_config(os.path.join(model_dir, "tokenizer_config.json")):
                _copy_into(os.path.join(model_dir, "tokenizer_config.json"), tmp)  # keeps tiktoken round trips
        else:
            write_meta(sd, params, tmp, dtype)
            copy_tokenizer(model_dir, tmp, "ours" if layout != "hf" else "hf")


def main(argv=None):
    usage = ("%(prog)s SRC OUT [--dtype D] [--model BASE_DIR]\n"
             "       %(prog)s --export {hf,meta,peft} --model MODEL_DIR [--adapter ADAPTER_DIR] [--dtype D] OUT")
    ap = argparse.ArgumentParser(usage=usage, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="PATH", help="SRC OUT (import) or OUT (export)")
    ap.add_argument("--export", choices=["hf", "meta", "peft"])
    ap.add_argument("--model", help="our model folder (export) or the base model (PEFT import)")
    ap.add_argument("--adapter", help="adapter folder saved by train.py (RUN_DIR/adapter)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    args = ap.parse_args(argv)
    try:
        if args.export:
            if len(args.paths) != 1 or not args.model:
                ap.error("--export takes --model MODEL_DIR and one OUT path")
            export(args.export, args.model, args.paths[0], args.adapter, DTYPES[args.dtype], args.force)
        else:
            if len(args.paths) != 2:
                ap.error("expected SRC OUT")
            convert(args.paths[0], args.paths[1], DTYPES[args.dtype], args.force, args.model)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.paths[-1]}")


if __name__ == "__main__":
    main()
