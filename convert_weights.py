"""Convert LLaMA checkpoints between Meta, Hugging Face (HF), PEFT and our own layout.

Import (SRC is a Meta or HF checkpoint folder; OUT is what model/load.py loads):
    python convert_weights.py SRC OUT [--dtype bf16|fp16|fp32] [--tokenizer PATH | --no-tokenizer] [--force]
      Meta: consolidated.NN.pth shards + params.json + tokenizer.model
      HF:   config.json + *.safetensors (or pytorch_model*.bin) + tokenizer.model (or a byte-level BPE tokenizer.json)
      OUT:  model.safetensors + params.json + tokenizer.model (+ tokenizer_config.json)
      Weights keep their dtype unless --dtype is given (a change is printed). A folder without a tokenizer
      is refused (train.py / eval.py need one): pass --tokenizer PATH, or --no-tokenizer for weights alone.
    python convert_weights.py PEFT_ADAPTER_DIR OUT --model MODEL_DIR
      a PEFT LoRA/DoRA adapter (adapter_config.json + adapter_model.safetensors) -> our adapter folder
Export (MODEL_DIR is our layout, or any layout above; RUN_DIR is what train.py saved: --adapter takes RUN_DIR or
RUN_DIR/adapter, as eval.py and model.generate do; without --model the run's base model is used):
    python convert_weights.py --export hf   --model MODEL_DIR [--adapter RUN_DIR] [--dtype D] OUT
      config.json, generation_config.json, model*.safetensors, and the tokenizer files transformers and
      vLLM load (tokenizer.json, tokenizer_config.json, special_tokens_map.json; + tokenizer.model for
      SentencePiece)
    python convert_weights.py --export meta --model MODEL_DIR [--adapter RUN_DIR] [--dtype D] OUT
      merged model: base + adapter folded in fp32 (LoRA eq. 1, DoRA), written in --dtype (default: the
      base's dtype); a bf16/fp16 merge prints the logit drift it causes
    python convert_weights.py --export hf|meta --model MODEL_DIR --adapter RUN_DIR [--base-format nf4] OUT
      an adapter trained on an NF4 base (train.py --base-format nf4; its adapter_config.json says so, and
      that is the default) is merged into the base it trained on: dequant(NF4(W)) + ΔW, quantised from
      MODEL_DIR as train.py quantises it, written in --dtype (default bf16, said in one line) and never
      quantised again (that would round ΔW away). A run's base/ folder already holds dequant(W): plain.
    python convert_weights.py --export peft --model MODEL_DIR --adapter RUN_DIR OUT
                              [--base-model-name-or-path HF_REPO_ID_OR_HF_FOLDER]
      adapter only, PEFT key names, for PeftModel.from_pretrained / vLLM on the HF base model. Its
      base_model_name_or_path (what AutoPeftModelForCausalLM loads) is the flag's value; else the hub id
      params.json records ("hf_repo_id", kept from an HF import's config.json "_name_or_path"), an HF-layout
      MODEL_DIR itself; else the export writes MODEL_DIR in HF layout to OUT/base/ and names that folder, so
      AutoPeftModelForCausalLM.from_pretrained(OUT) loads OUT as it is.
A GGUF file is converted to a Meta-layout folder first, e.g. with gguf_to_meta.py, then imported from there.
--dtype takes bf16 / fp16 / fp32 (or bfloat16 / float16 / float32). OUT must not exist (or be empty) unless
--force; OUT must not be, hold or lie inside an input, even with --force; both are checked before anything is read.

Two layouts of the q/k rows. Meta applies RoPE to interleaved pairs (2i, 2i+1) of each head; HF's
rotate-half RoPE pairs (i, i + head_dim/2). The same model in HF layout has the rows of each q/k head
reordered: HF row (h, j, c) = Meta row (h, c, j) for c in {0, 1} (cos/sin half), j < head_dim/2.
Anything indexed by q/k output rows (weights, lora_B, DoRA magnitudes) is permuted the same way.

Model sizes, shapes, module names and the LoRA/DoRA merge come from model/; this file holds only
what belongs to the foreign layouts (HF names and q/k order, Meta sharding, PEFT names, HF tokenizer files).

Everything is written into a temporary folder beside OUT and renamed into place, so a failed
conversion (a full disk included: one line naming OUT) leaves nothing half-written and OUT as it was.
"""
import base64
import contextlib
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

from model.generate import choose_base_format, find_adapter_dir
from model.io import contiguous as _contiguous, write_json as _write_json
from model.io import (DAMAGED, check_apart, check_writable, first_line, is_write_error, read_json,  # noqa: F401
                      read_json_object, read_pth, read_safetensors, umask_mode, write_failed,
                      write_ours)  # write_ours: re-exported
from model.load import (CliParser, HelpFormatter, args_from_params, checkpoint_files, dtype_arg,
                        expected_adapter_shapes, expected_shapes, load_dir_tokenizer, open_checkpoint,
                        read_checkpoint, torch_dtype)
from model.lora import (check_adapter_tensors, check_finite, load_adapter_tensors, merged_weight,
                        read_adapter_config)
from model.model import ATTENTION_MODULES, FFN_MODULES, MODULE_ALIASES, Transformer, canonical_module
from model.nf4 import dequantize_nf4, quantize_nf4
from model.rundir import DEQUANTIZED_FROM, base_model_of_adapter, is_dequantized_copy, read_params

DTYPES = {name: torch_dtype(name) for name in ("bf16", "fp16", "fp32")}     # the --dtype values
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# our module name -> HF's (wq -> q_proj), and Meta's path of a module inside a block
HF_MODULES = {ours: hf for hf, ours in MODULE_ALIASES.items()}
OUR_MODULES = MODULE_ALIASES
MODULE_PATHS = {m: ("attention." if m in ATTENTION_MODULES else "feed_forward.") + m
                for m in ATTENTION_MODULES + FFN_MODULES}
# Meta name inside a block -> HF name inside model.layers.N
HF_BLOCK_NAMES = {path: ("self_attn." if m in ATTENTION_MODULES else "mlp.") + HF_MODULES[m]
                  for m, path in MODULE_PATHS.items()}
HF_BLOCK_NAMES.update({"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"})
META_BLOCK_NAMES = {v: k for k, v in HF_BLOCK_NAMES.items()}
# LLaMA 3.1 RoPE scaling, the constants of Meta's apply_scaling (params.json: use_scaled_rope)
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
_BLOCK_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_BLOCK_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


# ----------------------------------------------------------------------------------------------------------------
# params.json <-> HF config.json

def ffn_hidden_dim(params):
    """FFN width of a params.json dict: ModelArgs' rule (hidden_dim if given, else Meta's multiple_of /
    ffn_dim_multiplier rule)."""
    return args_from_params(params).ffn_hidden_dim


def normalize_params(params, state_dict, origin="checkpoint"):
    """Meta params.json with every field our loader needs resolved (LLaMA 1/2 write vocab_size -1 and
    leave n_kv_heads / hidden_dim implicit); sizes are checked against the weights."""
    p = dict(params)
    for k in ("dim", "n_layers", "n_heads"):
        if k not in p:
            raise ValueError(f"params.json lacks '{k}'")
    for k in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if k not in state_dict:
            raise ValueError(f"{origin}: missing key '{k}'")
    p["n_kv_heads"] = p.get("n_kv_heads") or p["n_heads"]
    if p.get("vocab_size", -1) in (-1, None):
        p["vocab_size"] = state_dict["tok_embeddings.weight"].shape[0]
    hidden = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    if p.get("hidden_dim") is None and ffn_hidden_dim(p) != hidden:
        raise ValueError(f"params.json gives an FFN width of {ffn_hidden_dim(p)} but w1 has {hidden} rows")
    p["hidden_dim"] = hidden
    p.setdefault("norm_eps", 1e-5)
    p.setdefault("rope_theta", 10000.0)
    p["tie_word_embeddings"] = bool(p.get("tie_word_embeddings", False))
    check_shapes(state_dict, p, origin)
    return p


def params_to_hf_config(params, dtype=torch.bfloat16, bos_id=None, eos_id=None, pad_id=None):
    """HF LlamaConfig fields for a Meta params.json (resolved by normalize_params)."""
    args = args_from_params(params)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": dict(LLAMA3_ROPE_SCALING) if args.use_scaled_rope else None,
        "vocab_size": params["vocab_size"], "tie_word_embeddings": args.tie_word_embeddings,
        "max_position_embeddings": params.get("max_seq_len", 4096 if params.get("use_scaled_rope") is None else 131072),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": HF_DTYPE_NAMES[dtype],
    }
    for key, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id),
                       (DEQUANTIZED_FROM, params.get(DEQUANTIZED_FROM))):      # an NF4 run's weights say so
        if value is not None:
            cfg[key] = value
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
        **({DEQUANTIZED_FROM: "nf4"} if config.get(DEQUANTIZED_FROM) == "nf4" else {}),   # model.load reads it
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

def check_shapes(state_dict, params, origin="checkpoint"):
    """Every key of the model params describe present with its shape (model.load.expected_shapes, read off
    model.py's Transformer); no unknown keys. One-line errors naming the culprit."""
    want = expected_shapes(args_from_params(params))
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


def hf_to_meta(state_dict, params, drop_tied=True):
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
    return drop_tied_output(meta, params) if drop_tied else meta


# ----------------------------------------------------------------------------------------------------------------
# readers

def detect_layout(src):
    """'meta' | 'hf' | 'ours' | 'peft' | 'adapter' for a folder, from the files it holds."""
    if not os.path.isdir(src):
        if str(src).lower().endswith(".gguf"):
            raise ValueError(f"{src} is a GGUF file: convert it to a Meta-layout folder first, e.g. with "
                             f"gguf_to_meta.py (python gguf_to_meta.py {src} DIR), then run convert_weights.py DIR OUT")
        if os.path.isfile(src):
            raise ValueError(f"{src} is a file: pass the checkpoint's folder (Meta: consolidated.*.pth + params.json; "
                             f"HF: config.json + *.safetensors)")
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


HF_CONFIG_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")
HF_CONFIG_NUMBERS = ("rms_norm_eps", "rope_theta")


def read_meta(src):
    """(state dict, params) of a Meta checkpoint folder, shards merged, tied output dropped: model.load's
    streamed reader (open_checkpoint checks files, keys and shapes from the memory-mapped shards; read_checkpoint
    concatenates each weight's pieces), so the host holds the merged model, never every shard besides it."""
    params = read_params(src)
    plan = open_checkpoint(src, args_from_params(params, **meta_vocab_size(src, params)))
    sd = dict(read_checkpoint_named(plan))
    return sd, normalize_params(params, drop_tied_output(sd, params, src), src)


def meta_vocab_size(src, params):
    """{"vocab_size": rows of the embedding} when params.json leaves it to the weights (LLaMA 1/2 write -1;
    their ParallelEmbedding splits the embedding dim, so each shard holds every row); else {}."""
    if (params.get("vocab_size") or -1) > 0:
        return {}
    first = read_pth(checkpoint_files(src)[1][0])          # memory-mapped: reads the header only
    if "tok_embeddings.weight" not in first:
        raise ValueError(f"{src}: checkpoint lacks tok_embeddings.weight")
    return {"vocab_size": first["tok_embeddings.weight"].shape[0]}


def read_checkpoint_named(plan):
    """model.load.read_checkpoint, with a weight that cannot be read (a data region cut short) one line naming
    its file (read_pth names a damaged shard itself)."""
    for source, keys in plan:
        try:
            yield from read_checkpoint([(source, keys)])
        except ValueError:
            raise
        except Exception as e:  # SafetensorError / OSError / RuntimeError: torch's and safetensors' multi-line errors
            where = os.path.dirname(source[0]) if isinstance(source, list) else source
            raise ValueError(f"{where}: cannot read this checkpoint ({first_line(e)}); {DAMAGED}") from None


def _load_tensor_file(path):
    """A .safetensors or torch.save file; a damaged one is a one-line error naming it."""
    return read_safetensors(path) if path.endswith(".safetensors") else read_pth(path)


def hf_tensors(files):
    """(HF key, tensor) of each weight of an HF checkpoint, one at a time: safetensors through model.load's
    streamed reader (the header first, then one tensor), pytorch_model*.bin (pickles) whole per file."""
    from safetensors import safe_open
    for path in files:
        if not path.endswith(".safetensors"):
            yield from _load_tensor_file(path).items()
            continue
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # SafetensorError / OSError: the header cut short
            raise ValueError(f"{path}: cannot read this checkpoint ({first_line(e)}); {DAMAGED}") from None
        yield from read_checkpoint_named([(path, keys)])


def read_hf(src):
    """(Meta state dict, params) of an HF checkpoint folder (single or sharded safetensors / .bin), read one
    tensor at a time and renamed (q/k rows un-permuted) as it comes: the host holds the model once."""
    config = read_json_object(os.path.join(src, "config.json"), HF_CONFIG_INTS, HF_CONFIG_NUMBERS)
    params = hf_config_to_params(config)
    repo = config.get("_name_or_path")        # a hub id is kept, for --export peft's base_model_name_or_path
    if isinstance(repo, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and not os.path.exists(repo):
        params["hf_repo_id"] = repo
    files = sorted(glob.glob(os.path.join(glob.escape(src), "*.safetensors")))
    files = files or sorted(glob.glob(os.path.join(glob.escape(src), "pytorch_model*.bin")))
    sd = {}
    for k, w in hf_tensors(files):
        sd.update(hf_to_meta({k: w}, params, drop_tied=False))
    sd = drop_tied_output(sd, params, src)
    check_shapes(sd, params, src)
    return sd, params


def read_ours(src):
    params = read_params(src)
    sd = _load_tensor_file(os.path.join(src, "model.safetensors"))
    return sd, normalize_params(params, drop_tied_output(sd, params, src), src)


def read_model(src):
    """(Meta-key state dict in the checkpoint's own dtypes, resolved params, layout) of any model folder."""
    layout = detect_layout(src)
    if layout not in ("meta", "hf", "ours"):
        raise ValueError(f"{src} holds an adapter, not a model")
    sd, params = {"meta": read_meta, "hf": read_hf, "ours": read_ours}[layout](src)
    return sd, params, layout


def model_dtype(sd):
    """The dtype a checkpoint is stored in: that of its embedding (norms are sometimes kept in fp32)."""
    return sd["tok_embeddings.weight"].dtype


def note_dtype_change(sd, dtype, what):
    """Print a line when the written dtype differs from the checkpoint's (never change it silently)."""
    have = sorted({HF_DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in sd.values()})
    if dtype is not None and have != [HF_DTYPE_NAMES[dtype]]:
        print(f"note: {what} is stored in {'/'.join(have)}; writing {HF_DTYPE_NAMES[dtype]} (--dtype)")


# ----------------------------------------------------------------------------------------------------------------
# tokenizers: HF tokenizer.json -> ours (import), ours -> HF's files (export)

def _bytes_to_unicode():
    """GPT-2's byte -> printable unicode character map, which byte-level BPE vocabularies spell tokens in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
_WHOLE_TEXT_PATTERN = r"[\s\S]+"   # ByteLevel without a regex: the text is one piece


def _split_pattern(pre):
    """tiktoken split regex equivalent to an HF byte-level pre-tokenizer (ByteLevel with GPT-2's regex,
    optionally after Digits(individual_digits), as SmolLM2; or an explicit Split regex, as LLaMA 3 and
    our own exports)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    types = [s.get("type") for s in steps]
    split = [s for s in steps if s.get("type") == "Split"]
    if split and "Regex" in split[0].get("pattern", {}):
        return split[0]["pattern"]["Regex"]
    if types == ["ByteLevel"]:
        return _GPT2_PATTERN if steps[0].get("use_regex", True) else _WHOLE_TEXT_PATTERN
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return _DIGITS_PATTERN
    raise ValueError(f"tokenizer.json: pre-tokenizer {types} is not a byte-level BPE this converter knows; "
                     f"a tokenizer.model is needed")


def tokenizer_json_to_tiktoken(src, out):
    """Byte-level BPE tokenizer.json -> tokenizer.model (tiktoken rank file: 'base64(bytes) rank', rank = id)
    + tokenizer_config.json in gguf_to_meta's format. BPE merge order equals id order in these vocabularies
    (LLaMA 3, SmolLM2, our exports), which is what tiktoken's rank-based merging needs."""
    tok = read_json(os.path.join(src, "tokenizer.json"))
    if tok.get("model", {}).get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{src}: tokenizer.json is not a byte-level BPE; a tokenizer.model is needed")
    pattern = _split_pattern(tok.get("pre_tokenizer"))
    dec = {c: b for b, c in _bytes_to_unicode().items()}
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    lines = [f"{base64.b64encode(bytes(dec[ch] for ch in t)).decode()} {i}"
             for t, i in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in special]
    hf_cfg = {}
    if os.path.isfile(os.path.join(src, "tokenizer_config.json")):
        hf_cfg = read_json(os.path.join(src, "tokenizer_config.json"))
    model_cfg = read_json(os.path.join(src, "config.json")) if os.path.isfile(os.path.join(src, "config.json")) else {}

    def token_id(name, key):
        t = hf_cfg.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        return special.get(t, tok["model"]["vocab"].get(t)) if t is not None else model_cfg.get(key)

    # HF adds BOS either by the post-processor template (LLaMA 3, our exports) or by add_bos_token
    post = json.dumps(tok.get("post_processor") or {})
    bos = token_id("bos_token", "bos_token_id")
    add_bos = hf_cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = '"TemplateProcessing"' in post and bos is not None and f'"ids": [{bos}]' in post
    cfg = {"type": "tiktoken", "pattern": pattern, "special_tokens": special,
           "bos_id": bos, "eos_id": token_id("eos_token", "eos_token_id"),
           "pad_id": token_id("pad_token", "pad_token_id"), "add_bos": bool(add_bos),
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
    """HF's tokenizer_config.json is another format than ours (gguf_to_meta's "tiktoken", or "byte")."""
    return os.path.isfile(path) and read_json(path).get("type") in ("tiktoken", "byte")


def find_tokenizer(src):
    """What tokenizer a folder (or a tokenizer.model file) holds: 'model' (tokenizer.model), 'json'
    (an HF tokenizer.json), 'byte' (our tokenizer_config.json {"type": "byte"}) or None."""
    if os.path.isfile(src):
        return "model"
    if os.path.isfile(os.path.join(src, "tokenizer.model")):
        return "model"
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        return "json"
    if _is_our_tokenizer_config(os.path.join(src, "tokenizer_config.json")):
        return "byte"
    return None


def copy_tokenizer(src, out):
    """Tokenizer files for our layout from folder (or tokenizer.model file) src: tokenizer.model (+ our
    tokenizer_config.json), or an HF byte-level BPE tokenizer.json converted. Returns False when src has none.
    HF's own tokenizer_config.json is never copied (another format under the same name)."""
    kind = find_tokenizer(src)
    if kind == "model":
        path = src if os.path.isfile(src) else os.path.join(src, "tokenizer.model")
        shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if _is_our_tokenizer_config(config):
            _copy_into(config, out)
    elif kind == "json":
        tokenizer_json_to_tiktoken(src, out)
    elif kind == "byte":
        _copy_into(os.path.join(src, "tokenizer_config.json"), out)
    return kind is not None


def _token_strings(tok):
    """{id: string} for every id of our tokenizer, spelled as HF's tokenizer.json vocab spells it."""
    from model.tokenizer import ByteTokenizer, SentencePieceTokenizer
    if isinstance(tok, SentencePieceTokenizer):
        return {i: tok.sp.id_to_piece(i) for i in range(tok.vocab_size)}
    u = _bytes_to_unicode()
    ranks = {bytes([b]): b for b in range(256)} if isinstance(tok, ByteTokenizer) else tok.ranks
    strings = {r: "".join(u[b] for b in t) for t, r in ranks.items()}
    strings.update({i: s for s, i in tok.special_tokens.items()})
    return strings


def _bpe_merges(ranks, priority, reverse=False):
    """HF BPE merges that replay a rank/score-driven BPE: every split (l, r) of a token t with both halves
    in the vocabulary, ordered by t's priority (tiktoken: lowest rank merges first; SentencePiece: highest
    score), ties by the halves' ids -- the construction of transformers' TikTokenConverter /
    SentencePieceExtractor."""
    merges = []
    for t, i in ranks.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ranks and right in ranks:
                merges.append((priority[i], ranks[left], ranks[right], left, right))
    merges.sort(key=lambda m: ((-m[0] if reverse else m[0]), m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def _added_token(content, i):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _bos_template(tok, strings):
    """Post-processor prepending BOS when the model expects it (HF adds special tokens by default)."""
    if not tok.add_bos:
        return None
    bos = strings[tok.bos_id]
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}


def hf_tokenizer_json(tok):
    """A tokenizer.json (HF `tokenizers` format) that encodes like our tokenizer `tok`.
    tiktoken: byte-level BPE, Split(our regex) then ByteLevel without its own regex, merges derived from
        the ranks, ignore_merges (tiktoken emits a piece that is itself a token without merging).
    SentencePiece (LLaMA 1/2): BPE over '▁'-joined text with byte fallback, as transformers' LlamaConverter
        (legacy mode: a '▁' is prepended to every text segment between special tokens, like sp.encode).
    Byte tokenizer: the 256 byte tokens, no merges."""
    from model.tokenizer import SentencePieceTokenizer
    strings = _token_strings(tok)
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    added = [_added_token(s, i) for s, i in specials]
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    if isinstance(tok, SentencePieceTokenizer):
        sp = tok.sp
        pieces = {sp.id_to_piece(i): i for i in range(tok.vocab_size)}
        normal = {p: i for p, i in pieces.items()
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
        scores = {i: sp.get_score(i) for i in pieces.values()}
        merges = _bpe_merges(normal, scores, reverse=True)
        unk = sp.id_to_piece(sp.unk_id())
        bpe.update(unk_token=unk, fuse_unk=True, byte_fallback=True, vocab=pieces,
                   merges=[f"{a} {b}" for a, b in merges])
        # SentencePiece's normalizer options (in the model proto) probed by behaviour: whether it adds a
        # dummy '▁' prefix (LLaMA) and whether it removes extra spaces (llama2.c's stories260K does; onig's
        # ^ and $ match at every line, hence \A and \z)
        normalizers = []
        if sp.encode(" a  b ") == sp.encode("a b"):
            normalizers += [{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
                            {"type": "Replace", "pattern": {"Regex": r"\A | \z"}, "content": ""}]
        if sp.id_to_piece(sp.encode("a")[0]).startswith("▁"):
            normalizers.append({"type": "Prepend", "prepend": "▁"})
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": None, "post_processor": _bos_template(tok, strings),
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": bpe}
    ranks = getattr(tok, "ranks", None) or {bytes([b]): b for b in range(256)}
    u = _bytes_to_unicode()
    spell = lambda t: "".join(u[b] for b in t)  # noqa: E731
    merges = _bpe_merges(ranks, {r: r for r in ranks.values()})
    # special tokens are in the vocab too: `tokenizers` gives an added token that is not in the vocab the
    # next free id, whatever id tokenizer.json says (SmolLM2's specials are ids 0..16, below the ranks)
    vocab = {spell(t): r for t, r in ranks.items()}
    vocab.update(tok.special_tokens)
    bpe.update(ignore_merges=True, vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])),
               merges=[f"{spell(a)} {spell(b)}" for a, b in merges])
    pattern = getattr(tok, "pattern", None) or _WHOLE_TEXT_PATTERN
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": _bos_template(tok, strings),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": bpe}


def eos_ids(tok):
    """Every id that ends generation, the tokenizer's eos first (e.g. LLaMA 3: <|end_of_text|>, <|eot_id|>)."""
    return [tok.eos_id] + sorted(tok.stop_ids - {tok.eos_id})


def write_hf_tokenizer(tok, out, chat_template=None, max_len=None):
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json, the files
    transformers' AutoTokenizer / GenerationConfig and vLLM read. tokenizer_class PreTrainedTokenizerFast
    loads tokenizer.json as written (LlamaTokenizer(Fast) would rebuild its own pre-tokenizer)."""
    from model.tokenizer import SentencePieceTokenizer
    strings = _token_strings(tok)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(hf_tokenizer_json(tok), f, ensure_ascii=False)
    names = {"bos_token": strings[tok.bos_id], "eos_token": strings[tok.eos_id], "pad_token": strings[tok.pad_id]}
    if isinstance(tok, SentencePieceTokenizer):
        names["unk_token"] = tok.sp.id_to_piece(tok.sp.unk_id())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": tok.add_bos,
           "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_input_names": ["input_ids", "attention_mask"]}
    if max_len:
        cfg["model_max_length"] = max_len
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(names, f, indent=2, ensure_ascii=False)
    eos = eos_ids(tok)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": tok.pad_id}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def export_tokenizer_hf(model_dir, out, layout, max_len=None):
    """The HF export's tokenizer: an HF source's own files as they are; ours rebuilt from our tokenizer
    (SentencePiece also keeps tokenizer.model, for LlamaTokenizer and for importing the export back).
    Returns the tokenizer (or None when the model has none)."""
    if layout == "hf":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "generation_config.json"):
            if os.path.isfile(os.path.join(model_dir, name)):
                _copy_into(os.path.join(model_dir, name), out)
        return None
    if find_tokenizer(model_dir) is None:
        print(f"warning: {model_dir} has no tokenizer; the export has none either", file=sys.stderr)
        return None
    from model.tokenizer import SentencePieceTokenizer
    tok = load_dir_tokenizer(model_dir)
    ours = os.path.join(model_dir, "tokenizer_config.json")
    template = read_json(ours).get("chat_template") if _is_our_tokenizer_config(ours) else None
    write_hf_tokenizer(tok, out, template, max_len)
    if isinstance(tok, SentencePieceTokenizer):
        _copy_into(os.path.join(model_dir, "tokenizer.model"), out)
    return tok


# ----------------------------------------------------------------------------------------------------------------
# adapters: ours (model/lora.py save_adapter) <-> PEFT, and folding into the base weights

_ADAPTER_KEY = re.compile(r"layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.(lora_a|lora_b|magnitude)")
_PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\."
                       r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
_PEFT_PARTS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def read_adapter(adapter_dir, cfg=None):
    """(state dict, config) of our adapter folder; a damaged file or NaN/inf tensors are refused (naming the
    file). Echo parameters, if any were saved, are left out: they are never part of an export.
    cfg: its adapter_config.json as read_adapter_config returned it already (None: read here)."""
    from model.lora import read_adapter_tensors
    if cfg is None:
        cfg = read_adapter_config(adapter_dir)       # types and values checked, one line naming the key
    path = os.path.join(adapter_dir, "adapter.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing adapter.safetensors in {adapter_dir}")
    sd = {k: v for k, v in read_adapter_tensors(path).items() if "echo" not in k}
    return sd, cfg


def adapter_args(adapter_cfg, params, origin="adapter"):
    """ModelArgs of the base `params` with the adapter of adapter_config.json built in."""
    try:
        return args_from_params(params, adapter=adapter_cfg.get("method"), lora_rank=int(adapter_cfg["rank"]),
                                lora_alpha=float(adapter_cfg["alpha"]), lora_dropout=0.0,
                                lora_modules=tuple(adapter_cfg["modules"]), lora_layers=adapter_cfg.get("layers"))
    except KeyError as e:
        raise ValueError(f"{origin}: adapter_config.json lacks {e}") from None
    except ValueError as e:
        raise ValueError(f"{origin}: adapter_config.json: {e}") from None


def check_adapter(adapter_sd, adapter_cfg, params, origin="adapter"):
    """The adapter fits this base model: same base dims in its config, and exactly the tensors (names and
    shapes) that model.py builds for its config -- so its modules/layers lists describe its tensors."""
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
    check_adapter_tensors(adapter_sd, expected_adapter_shapes(adapter_args(adapter_cfg, params, origin)), origin)


def fold_adapter(state_dict, adapter_sd, adapter_cfg):
    """Base weights with the adapter folded in. Merged weights are fp32 (model.lora.merged_weight; the
    caller casts them to the dtype it writes), all others keep their dtype.
    LoRA (eq. 1):  W' = W + s B A,  s = alpha / r.
    DoRA:          W' = m * (W + s B A) / ||W + s B A||_row  (norm per output row, as model/lora.py)."""
    s = float(adapter_cfg["alpha"]) / float(adapter_cfg["rank"])
    out = dict(state_dict)
    for k in adapter_sd:
        if k.endswith(".lora_a"):
            prefix = k[: -len(".lora_a")]
            out[prefix + ".weight"] = merged_weight(state_dict[prefix + ".weight"], adapter_sd[k],
                                                    adapter_sd[prefix + ".lora_b"], s,
                                                    adapter_sd.get(prefix + ".magnitude"))
    return out


def dequantized_base(state_dict):
    """The base an NF4 run trained against: every NF4-stored linear W replaced by dequant(NF4(W)) in fp32,
    quantised from these checkpoint tensors exactly as load_model quantises them (Transformer.load_base_weights
    into an NF4 model: NF4Weight.copy_ is quantize_nf4 with its defaults); the embedding, norms and head are
    kept as they are (an NF4 model keeps them too). One weight at a time, no model is built."""
    quantized = set(MODULE_PATHS.values())     # base_format="nf4": every linear of the blocks, wq..w3
    return {k: dequantize_nf4(quantize_nf4(v), torch.float32)
            if (m := _BLOCK_KEY.fullmatch(k)) and m[2] in quantized else v
            for k, v in state_dict.items()}


def merge_drift(state_dict, params, adapter_sd, adapter_cfg, merged, probe_len=16):
    """(max |Δlogit|, max adapter effect) of a merged export on a fixed probe batch (2 x probe_len random
    ids, seed 0), all computed in fp32 with model.py:
      Δlogit  = logits(merged weights as written, e.g. rounded to bf16) - logits(base + unmerged adapter),
      effect  = logits(base + unmerged adapter) - logits(base).
    The merge itself is exact in fp32; what a bf16/fp16 export loses is the rounding of W' = W + ΔW, whose
    ulp (2^-8 of |W| for bf16) can be larger than a small adapter's ΔW entries. Δlogit well below the effect
    means the export behaves like the adapter; Δlogit comparable to it means the rounding ate part of the
    fine-tune, and the export should be written with --dtype fp32."""
    net = Transformer(adapter_args(adapter_cfg, params))
    net.load_base_weights({k: v.float() for k, v in state_dict.items()})
    load_adapter_tensors(net, {k: v.float() for k, v in adapter_sd.items()})
    net.eval()
    ids = torch.randint(0, net.args.vocab_size, (2, min(probe_len, net.args.max_seq_len)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = net(ids)
        for m in net.adapter_linears():
            m.enabled = False
        base = net(ids)
        net.load_base_weights({k: v.float() for k, v in merged.items()})
        got = net(ids)
    return (got - adapted).abs().max().item(), (adapted - base).abs().max().item()


def _adapter_modules_and_layers(adapter_sd):
    """(modules, layers) that hold adapter tensors, in model order."""
    found = [_ADAPTER_KEY.fullmatch(k) for k in adapter_sd]
    bad = [k for k, m in zip(adapter_sd, found) if not m]
    if bad:
        raise ValueError(f"adapter: unknown key '{bad[0]}'")
    order = ATTENTION_MODULES + FFN_MODULES
    return sorted({m[3] for m in found}, key=order.index), sorted({int(m[1]) for m in found})


def adapter_to_peft(adapter_sd, adapter_cfg, params, base_model_name_or_path=None):
    """(PEFT state dict, adapter_config.json dict). q/k lora_B rows and DoRA magnitudes are permuted to
    HF's rotate-half row order; lora_A (input side) is unchanged. target_modules / layers_to_transform
    list what the tensors hold, and must agree with our adapter_config.json."""
    modules, layers = _adapter_modules_and_layers(adapter_sd)
    configured = [canonical_module(m) for m in adapter_cfg["modules"]]
    if set(modules) != set(configured):
        raise ValueError(f"adapter: tensors are for modules {modules} but adapter_config.json lists {configured}")
    peft = {}
    for k, t in adapter_sd.items():
        m = _ADAPTER_KEY.fullmatch(k)
        n_heads = _qk_heads(m[3], params)
        if n_heads and m[4] != "lora_a":
            t = permute_rotate_half(t, n_heads)
        hf_name = HF_BLOCK_NAMES[f"{m[2]}.{m[3]}"]
        peft[f"base_model.model.model.layers.{m[1]}.{hf_name}.{_PEFT_PARTS[m[4]]}"] = t.contiguous()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(adapter_cfg["rank"]), "lora_alpha": adapter_cfg["alpha"],
        "lora_dropout": adapter_cfg.get("dropout", 0.0),
        "target_modules": [HF_MODULES[m] for m in modules],
        "layers_to_transform": None if adapter_cfg.get("layers") is None else layers, "layers_pattern": None,
        "use_dora": adapter_cfg["method"] == "dora", "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return peft, cfg


def peft_to_adapter(peft_sd, peft_cfg, params, origin="PEFT adapter"):
    """Inverse of adapter_to_peft: a PEFT LoRA/DoRA adapter -> (our adapter state dict, config).
    peft_cfg: checked by check_peft_config first (convert does, naming the file, before the base is read)."""
    if peft_cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type '{peft_cfg.get('peft_type')}' is not LORA")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if peft_cfg.get(flag):
            raise ValueError(f"adapter_config.json: {flag} is not supported")
    if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
        raise ValueError("adapter_config.json: per-module rank_pattern/alpha_pattern are not supported")
    targets = peft_cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    unknown = [t for t in targets if t not in OUR_MODULES]
    if unknown:
        raise ValueError(f"adapter_config.json: target module '{unknown[0]}' is not a LLaMA linear layer")
    layers = peft_cfg.get("layers_to_transform")
    cfg = {"method": "dora" if peft_cfg.get("use_dora") else "lora", "rank": int(peft_cfg["r"]),
           "alpha": float(peft_cfg["lora_alpha"]), "dropout": float(peft_cfg.get("lora_dropout") or 0.0),
           "modules": [OUR_MODULES[t] for t in sorted(targets, key=list(OUR_MODULES).index)],
           "layers": [layers] if isinstance(layers, int) else layers, "base": params}
    # shapes are checked on the PEFT tensors, before the q/k rows are reordered (a wrong shape cannot be)
    want = expected_adapter_shapes(adapter_args(cfg, params, origin))
    parts = {v: k for k, v in _PEFT_PARTS.items()}
    parts["lora_magnitude_vector.weight"] = "magnitude"
    sd = {}
    for k, t in peft_sd.items():
        m = _PEFT_KEY.fullmatch(k)
        if not m or m[3] not in OUR_MODULES:
            raise ValueError(f"{origin}: unknown key '{k}'")
        module, part = OUR_MODULES[m[3]], parts[m[4]]
        ours = f"layers.{m[1]}.{MODULE_PATHS[module]}.{part}"
        if ours in want and tuple(t.shape) != want[ours]:
            raise ValueError(f"{origin}: {k} has shape {tuple(t.shape)}, but adapter_config.json (r={cfg['rank']}) "
                             f"and the base model need {want[ours]}: wrong --model, or a damaged adapter")
        n_heads = _qk_heads(module, params)
        if n_heads and part != "lora_a":
            t = unpermute_rotate_half(t, n_heads)
        sd[ours] = t.contiguous()
    check_adapter(sd, cfg, params, origin)
    return sd, cfg


def check_peft_config(peft_cfg, path="adapter_config.json"):
    """The PEFT adapter_config.json keys the import reads, with their types: one line naming the key."""
    if not isinstance(peft_cfg, dict):
        raise ValueError(f"{path}: expected a JSON object (PEFT's LoraConfig), got a {type(peft_cfg).__name__}")
    rules = {"r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "the rank, a positive integer"),
             "lora_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                            "a finite number"),
             "target_modules": (lambda v: isinstance(v, str) or (isinstance(v, list) and v and
                                                                 all(isinstance(m, str) for m in v)),
                                "a module name or a list of them (q_proj, v_proj, ...)")}
    for key, (ok, what) in rules.items():
        if key not in peft_cfg:
            raise ValueError(f'{path}: missing key "{key}" ({what}); is this a PEFT LoRA adapter_config.json?')
        if not ok(peft_cfg[key]):
            raise ValueError(f'{path}: "{key}" must be {what}, got {json.dumps(peft_cfg[key])[:40]}')
    dropout = peft_cfg.get("lora_dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f'{path}: "lora_dropout" must be a number in [0, 1), got {json.dumps(dropout)[:40]}')
    return peft_cfg


# ----------------------------------------------------------------------------------------------------------------
# writers (into a fresh folder)

def write_meta(sd, params, out, dtype=None):
    torch.save(_contiguous(sd, dtype), os.path.join(out, "consolidated.00.pth"))
    _write_json(params, os.path.join(out, "params.json"))


def write_hf(sd, params, out, dtype=None, bos_id=None, eos_id=None, pad_id=None, max_shard_bytes=5 << 30):
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
        _write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                    os.path.join(out, "model.safetensors.index.json"))
    dtype = dtype or hf["model.embed_tokens.weight"].dtype
    _write_json(params_to_hf_config(params, dtype, bos_id, eos_id, pad_id), os.path.join(out, "config.json"))


def export_peft(adapter_sd, adapter_cfg, params, out, base_model_name_or_path=None):
    """adapter_model.safetensors + adapter_config.json in PEFT's layout, into folder `out`."""
    check_adapter(adapter_sd, adapter_cfg, params)
    peft_sd, peft_cfg = adapter_to_peft(adapter_sd, adapter_cfg, params, base_model_name_or_path)
    save_file(peft_sd, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(peft_cfg, os.path.join(out, "adapter_config.json"))


def write_adapter(adapter_sd, adapter_cfg, out):
    """Our adapter folder layout (model/lora.py save_adapter)."""
    save_file(_contiguous(adapter_sd), os.path.join(out, "adapter.safetensors"), metadata={"format": "pt"})
    _write_json(adapter_cfg, os.path.join(out, "adapter_config.json"))


def check_out(out, force=False, inputs=()):
    """OUT may be written: it does not exist or is an empty folder (or --force), its parent folder can be
    written, and it is not, inside, or holding any of `inputs` ([(what, path)]; refused even with --force,
    since replacing OUT would delete that input). Called before anything is read, so a refusal comes
    before a long merge, not after it."""
    out = os.path.abspath(out)
    check_apart(out, inputs)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise ValueError(f"{out} exists and is not empty (use --force to replace it)")
    check_writable(out, out)
    return out


@contextlib.contextmanager
def atomic_dir(out, force=False, inputs=()):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed (a full
    disk: one line naming OUT, OUT as it was)."""
    out = check_out(out, force, inputs)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it private; OUT should look like any new folder
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), umask_mode(0o777))
            for name in files:
                os.chmod(os.path.join(root, name), umask_mode())
        if os.path.exists(out):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_failed(e, out, "nothing was written there") from None
        raise


# ----------------------------------------------------------------------------------------------------------------
# commands

def convert(src, out, dtype=None, force=False, model_dir=None, tokenizer=None, no_tokenizer=False):
    """SRC (Meta or HF model, or a PEFT adapter with model_dir) -> our layout in OUT. dtype None keeps the
    checkpoint's. The tokenizer comes from SRC, or from `tokenizer` (a tokenizer.model or a folder); a model
    without one is refused unless no_tokenizer."""
    inputs = [("SRC", src), ("--model", model_dir), ("--tokenizer", tokenizer)]
    layout = detect_layout(src)
    check_out(out, force, inputs)
    if layout == "peft":
        if model_dir is None:
            raise ValueError("converting a PEFT adapter needs --model MODEL_DIR (the base it was trained on)")
        cfg_path = os.path.join(src, "adapter_config.json")
        cfg = check_peft_config(read_json(cfg_path), cfg_path)     # before the base model is read
        _, params, _ = read_model(model_dir)
        path = sorted(glob.glob(os.path.join(glob.escape(src), "adapter_model.*")))[-1]
        sd, acfg = peft_to_adapter(check_finite(_load_tensor_file(path), path), cfg, params, path)
        with atomic_dir(out, force, inputs) as tmp:
            write_adapter(sd, acfg, tmp)
        return
    if layout == "adapter":
        raise ValueError(f"{src} is already one of our adapters; export it with --export peft")
    tok_src = tokenizer or src
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file or folder")
    sd, params, layout = read_model(src)
    if not no_tokenizer and find_tokenizer(tok_src) is None:
        if tokenizer is not None:
            raise ValueError(f"--tokenizer {tokenizer}: no tokenizer.model or tokenizer.json there")
        raise ValueError(f"{src} has no tokenizer (tokenizer.model or tokenizer.json), which train.py and eval.py "
                         f"need: pass --tokenizer PATH (a tokenizer.model or a folder with one), "
                         f"or --no-tokenizer to convert the weights alone")
    note_dtype_change(sd, dtype, src)
    with atomic_dir(out, force, inputs) as tmp:
        write_ours(sd, params, tmp, dtype)
        if not no_tokenizer:
            copy_tokenizer(tok_src, tmp)
            tok = load_dir_tokenizer(tmp)   # what train/eval will load: it must load and fit the embedding
            if tok.vocab_size > params["vocab_size"]:
                raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                                 f"{params['vocab_size']}: wrong --tokenizer?")


def peft_base_name(model_dir, params, layout, given=None):
    """base_model_name_or_path of a PEFT export (what AutoPeftModelForCausalLM loads): `given`, else the hub id
    params.json records ("hf_repo_id"), else an HF-layout MODEL_DIR itself; None: no loadable base is known,
    and export_peft_with_base writes one into OUT/base."""
    if given:
        return given
    if isinstance(params.get("hf_repo_id"), str) and params["hf_repo_id"]:
        return params["hf_repo_id"]
    return os.path.abspath(model_dir) if layout == "hf" else None


def write_hf_model(sd, params, model_dir, layout, folder, dtype):
    """An HF model folder (config.json, safetensors, tokenizer files) of state dict `sd` into `folder`."""
    tok = export_tokenizer_hf(model_dir, folder, layout, params.get("max_seq_len"))
    if tok is not None:
        ids = (tok.bos_id, tok.eos_id, tok.pad_id)
    elif layout == "hf":
        src_cfg = read_json(os.path.join(model_dir, "config.json"))
        ids = tuple(src_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    else:
        ids = (None, None, None)
    write_hf(sd, params, folder, dtype, *ids)


PEFT_BASE = "base"      # OUT/base/: the HF base a PEFT export writes when MODEL_DIR is no HF folder


def export_peft_with_base(model_dir, adapter_dir, adapter_cfg, out, force, given, inputs):
    """The adapter in PEFT layout into OUT; when no loadable base is known (peft_base_name None), the base
    model itself in HF layout into OUT/base/ and base_model_name_or_path = that folder's final path, so
    AutoPeftModelForCausalLM.from_pretrained(OUT) loads with no further step."""
    sd, params, layout = read_model(model_dir)
    adapter_sd, adapter_cfg = read_adapter(adapter_dir, adapter_cfg)
    base_name = peft_base_name(model_dir, params, layout, given)
    if base_name is None:
        base_name = os.path.join(os.path.abspath(out), PEFT_BASE)
        print(f"{model_dir} is not an HF folder: writing it in HF layout to {base_name} as the adapter's "
              f"base_model_name_or_path (--base-model-name-or-path names another)", file=sys.stderr)
    with atomic_dir(out, force, inputs) as tmp:
        export_peft(adapter_sd, adapter_cfg, params, tmp, base_name)
        if base_name == os.path.join(os.path.abspath(out), PEFT_BASE):
            os.mkdir(os.path.join(tmp, PEFT_BASE))
            write_hf_model(sd, params, model_dir, layout, os.path.join(tmp, PEFT_BASE), model_dtype(sd))


def export(fmt, model_dir, out, adapter_dir=None, dtype=None, force=False, base_model_name_or_path=None,
           base_format=None):
    """Our model (+ adapter) -> merged HF or Meta layout, or the adapter alone in PEFT layout.
    The merge is computed in fp32 and written in `dtype` (default: the base's dtype; bf16 for an NF4 base).
    base_format None: the adapter's recorded one (model.generate.choose_base_format)."""
    if fmt == "peft" and adapter_dir is None:
        raise ValueError("--export peft needs --adapter RUN_DIR (or RUN_DIR/adapter)")
    if base_model_name_or_path and fmt != "peft":
        raise ValueError("--base-model-name-or-path names the base of a PEFT adapter: it needs --export peft")
    if base_format and fmt == "peft":
        raise ValueError("--base-format is for --export hf / meta (merges): the PEFT export is the adapter alone")
    adapter_dir = find_adapter_dir(adapter_dir) if adapter_dir is not None else None
    inputs = [("--model", model_dir), ("--adapter", adapter_dir)]
    check_out(out, force, inputs)               # before reading anything: a merge can take minutes
    adapter_cfg = None
    if adapter_dir is not None:
        adapter_cfg = read_adapter_config(adapter_dir)      # a broken config is refused before the base is read
    if fmt == "peft":
        return export_peft_with_base(model_dir, adapter_dir, adapter_cfg, out, force, base_model_name_or_path,
                                     inputs)
    nf4 = choose_base_format(base_format, adapter_cfg, model_dir, adapter_dir)[0] == "nf4"
    sd, params, layout = read_model(model_dir)
    note_dtype_change(sd, dtype, model_dir)
    target = dtype or model_dtype(sd)
    if nf4:
        sd, target = dequantized_base(sd), dtype or torch.bfloat16
        if dtype is None:
            print(f"NF4 base: writing the {'merged ' if adapter_dir else ''}model as bf16 "
                  f"(dequant(W){' + ΔW' if adapter_dir else ''}; pass --dtype fp32 for fp32); it is not re-quantised")
    if nf4 or (adapter_cfg or {}).get("base_format") == "nf4" and is_dequantized_copy(model_dir, adapter_dir):
        params = {**params, DEQUANTIZED_FROM: "nf4"}     # dequant(NF4(W)) (+ ΔW): model.load refuses nf4 on it
    if adapter_dir is not None:
        sd = merged_state(sd, params, adapter_dir, adapter_cfg, target)
    with atomic_dir(out, force, inputs) as tmp:
        if fmt == "hf":
            write_hf_model(sd, params, model_dir, layout, tmp, target)
        else:
            write_meta(sd, params, tmp, target)
            if not copy_tokenizer(model_dir, tmp):
                print(f"warning: {model_dir} has no tokenizer; {out} has none either", file=sys.stderr)


def merged_state(sd, params, adapter_dir, adapter_cfg, target):
    """Base + adapter folded in fp32, cast to `target`; a low-precision merge prints the logit drift it causes."""
    adapter_sd, adapter_cfg = read_adapter(adapter_dir, adapter_cfg)
    check_adapter(adapter_sd, adapter_cfg, params, adapter_dir)
    merged = {k: v.to(target) for k, v in fold_adapter(sd, adapter_sd, adapter_cfg).items()}
    if target != torch.float32:
        drift, effect = merge_drift(sd, params, adapter_sd, adapter_cfg, merged)
        print(f"merge drift ({HF_DTYPE_NAMES[target]}): max |Δlogit| {drift:.3g} vs the unmerged adapter in "
              f"fp32 on a fixed probe (the adapter itself moves logits by up to {effect:.3g}); "
              f"--dtype fp32 writes the exact merge")
    return merged


def main(argv=None):
    usage = ("%(prog)s SRC OUT [--dtype D] [--tokenizer PATH | --no-tokenizer] [--model BASE_DIR]\n"
             "       %(prog)s --export {hf,meta,peft} --model MODEL_DIR [--adapter ADAPTER_DIR] [--dtype D] "
             "[--base-format {plain,nf4}] OUT")
    ap = CliParser(usage=usage, description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="PATH", help="SRC OUT (import) or OUT (export)")
    ap.add_argument("--export", choices=["hf", "meta", "peft"], help="write MODEL_DIR (+ adapter) in this layout (default: none, an import SRC OUT)")
    ap.add_argument("--model", help="our model folder (export) or the base model (PEFT import) (default: for an "
                                    "export, the adapter's run's base model, as eval.py finds it)")
    ap.add_argument("--adapter", help="export: the run folder saved by train.py (RUN_DIR) or its adapter folder "
                                      "(RUN_DIR/adapter) (default: none, the base alone)")
    ap.add_argument("--dtype", type=dtype_arg, choices=list(DTYPES), default=None,
                    help="dtype of the written weights, bfloat16 / float16 / float32 accepted too (default: the "
                         "checkpoint's; merges are computed in fp32)")
    ap.add_argument("--tokenizer", help="import: take the tokenizer from this tokenizer.model or folder "
                                        "(default: SRC's)")
    ap.add_argument("--no-tokenizer", action="store_true", help="import: allow a model without a tokenizer "
                                                                "(default: off, such a model is refused)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT, checked before anything is read; "
                    "an OUT that is, holds or lies inside an input is refused even so (default: off)")
    ap.add_argument("--base-model-name-or-path", metavar="NAME",
                    help="--export peft: the adapter_config.json base_model_name_or_path, the HF hub id (or HF "
                         "folder) AutoPeftModelForCausalLM loads (default: params.json's hf_repo_id, else an HF "
                         "MODEL_DIR, else the base written in HF layout to OUT/base)")
    ap.add_argument("--base-format", choices=["plain", "nf4"],
                    help="--export hf / meta: the base the adapter is merged into: plain, or nf4 = dequant(NF4(W)), "
                         "the base of train.py --base-format nf4 (default: the adapter's recorded base_format, "
                         "else plain)")
    args = ap.parse_args(argv)
    dtype = torch_dtype(args.dtype) if args.dtype else None
    try:
        if args.export:
            if len(args.paths) != 1 or not (args.model or args.adapter):
                ap.error("--export takes --model MODEL_DIR (or an --adapter RUN_DIR that names its base) and one "
                         "OUT path")
            if args.tokenizer or args.no_tokenizer:
                ap.error("--tokenizer / --no-tokenizer are for imports; an export takes MODEL_DIR's tokenizer")
            model = args.model or base_model_of_adapter(find_adapter_dir(args.adapter))
            export(args.export, model, args.paths[0], args.adapter, dtype, args.force,
                   args.base_model_name_or_path, args.base_format)
        else:
            if len(args.paths) != 2:
                ap.error("expected SRC OUT")
            if args.base_model_name_or_path:
                ap.error("--base-model-name-or-path is for --export peft")
            if args.base_format:
                ap.error("--base-format is for --export hf / meta")
            convert(args.paths[0], args.paths[1], dtype, args.force, args.model, args.tokenizer, args.no_tokenizer)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.paths[-1]}")


if __name__ == "__main__":
    main()
