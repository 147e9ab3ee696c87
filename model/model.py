"""A minimal LLaMA 1 / 2 / 3 decoder with native LoRA/DoRA and an explicit injection argument.

Parameter names equal Meta's checkpoint keys, so `consolidated.00.pth` loads with strict checking
and no renaming. Read top to bottom: config, RMSNorm, RoPE, attention (GQA), SwiGLU, block, model.

The injection protocol (Echo's eq. 7 uses it; its math lives in echo/, which model/ does
not import but for one temporary name, see the end):
`run_layers(echo_inject=X)` asks X.at_layer(i) for block i's site, passed explicitly through the block to
its projections; each projection's output becomes `site.apply(module, x, out)` (x: its input), see
`injected`. No hooks, no global state; blocks never see their index, so one compiled block graph serves
every layer as long as X hands every injected layer the same kind of site.
A pass may also run on a window of positions only and read the other positions' keys and values from
an earlier pass (`PromptKV`): Echo's Echo-on pass recomputes only the answer, not the prompt.
Packed rows (--pack, data/packing.py) are explicit arguments too: `run_layers(positions=..., documents=...)`,
positions restarting per example and attention kept inside each example (`document_attention_mask`; or, opt-in,
`run_layers(block_mask=document_block_mask(documents))`: flex_attention, which skips the masked blocks).

Two opt-in memory options (ModelArgs; off, the model is exactly the one above):
  base_format="nf4"  QLoRA: every frozen linear of the blocks (wq..w3, with or without an adapter) keeps
      W as NF4 (model/nf4.py, ~0.52 B/param) and dequantises it in its forward. The embedding, the
      RMSNorm gains and the LM head stay in the model's dtype, as QLoRA and torchtune keep them: they
      are a small share of the bytes (8B: ~1 of 16 GB) and the most sensitive to rounding (one row of
      the head is one token's logit; a norm gain scales a whole residual stream).
  activation_checkpointing=True  each block's activations are recomputed in the backward instead of
      kept (torch.utils.checkpoint, non-reentrant; the same dropout draws), so a step holds one block's
      activations plus the residual stream at each block boundary. Exact: same loss and gradients.
"""
import functools
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from .lora import ADAPTER_KEYS, LoRALinear
from .nf4 import NF4Weight, dequantize_nf4

ATTENTION_MODULES = ("wq", "wk", "wv", "wo")
FFN_MODULES = ("w1", "w2", "w3")
MODULE_ALIASES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                  "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def canonical_module(name):
    """'q_proj' → 'wq'; unknown names are an error naming the culprit."""
    canonical = MODULE_ALIASES.get(name, name)
    if canonical not in ATTENTION_MODULES + FFN_MODULES:
        raise ValueError(f"unknown module {name!r}: choose from wq wk wv wo w1 w2 w3 "
                         f"(or q_proj k_proj v_proj o_proj gate_proj down_proj up_proj)")
    return canonical


# Meta params.json fields (plus hidden_dim / tie_word_embeddings, which some exports carry).
PARAMS_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "hidden_dim",
                 "tie_word_embeddings", "max_seq_len")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False          # Llama 3.1 long-context frequency scaling
    hidden_dim: Optional[int] = None       # None: Meta's rule from multiple_of / ffn_dim_multiplier
    tie_word_embeddings: bool = False
    max_seq_len: int = 4096                # length of the RoPE tables
    # adapters, built into the model (None: plain model, all weights trainable)
    adapter: Optional[str] = None          # "lora" | "dora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_modules: Sequence[str] = ("wq", "wk", "wv", "wo")
    lora_layers: Optional[Sequence[int]] = None   # None: every layer
    # memory (opt-in; see the module docstring)
    base_format: str = "plain"             # "plain" | "nf4": the frozen linears' storage
    activation_checkpointing: bool = False  # recompute each block in the backward (training only)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}, "
                             f"and n_heads by n_kv_heads {self.n_kv_heads}")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size is {self.vocab_size}: pass the tokenizer's vocabulary size")
        if self.adapter not in (None, "lora", "dora"):
            raise ValueError(f"unknown adapter {self.adapter!r}: choose lora or dora")
        if self.base_format not in ("plain", "nf4"):
            raise ValueError(f"unknown base_format {self.base_format!r}: choose plain or nf4")
        self.lora_modules = tuple(dict.fromkeys(canonical_module(m) for m in self.lora_modules))
        if self.adapter and self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {self.lora_rank}")
        if self.lora_layers is not None:
            self.lora_layers = tuple(sorted(int(i) for i in self.lora_layers))
            bad = [i for i in self.lora_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"adapter layer {bad[0]} out of range for a {self.n_layers}-layer model")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self):
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)                       # Meta's FeedForward rule
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_params_json(self):
        return {k: getattr(self, k) for k in PARAMS_FIELDS}

    @classmethod
    def from_params_json(cls, path, **overrides):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"missing {path}")
        try:
            params = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        for required in ("dim", "n_layers", "n_heads"):
            if required not in params:
                raise ValueError(f"{path}: missing field {required!r}")
        known = {f.name for f in fields(cls)}
        params = {k: v for k, v in params.items() if k in known and k in PARAMS_FIELDS}
        return cls(**{**params, **overrides})

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, norm_eps=1e-6, max_seq_len=2048),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, norm_eps=1e-6, max_seq_len=2048),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, norm_eps=1e-5),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, norm_eps=1e-5),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                        max_seq_len=8192),
    # the shape only (no checkpoint is read for it here): what the NF4 benchmark fits on one GPU
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    # tiny shapes for tests and the built-in default run (random weights)
    "tiny": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512),
}


def at_least_fp32(x):
    """bf16 / fp16 → fp32 for numerically sensitive steps (norms, RoPE, losses); fp32 / fp64 stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g, computed in (at least) fp32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = at_least_fp32(x)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(head_dim, theta, use_scaled_rope=False):
    """θ_i = theta^(-2i/d); Llama 3.1 stretches the low frequencies (factor 8, original context 8192)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if use_scaled_rope:
        factor, low_freq_factor, high_freq_factor, old_context = 8.0, 1.0, 4.0, 8192
        wavelen = 2 * math.pi / freqs
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen < old_context / high_freq_factor, freqs,
                            torch.where(wavelen > old_context / low_freq_factor, freqs / factor, blended))
    return freqs


def apply_rope(x, cos, sin):
    """Rotate Meta's interleaved pairs (x_2i, x_2i+1) by angle pos·θ_i. x [B,T,H,D], cos/sin [B,T,D/2]."""
    pairs = at_least_fp32(x).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


@dataclass
class PromptKV:
    """What a pass over a window of W positions per row reads besides its own keys and values: another
    pass's keys/values of all T positions, of which each row sees only those before its window.

    kv: {layer: (k, v) [B, n_kv_heads, T, head_dim]} (RoPE applied), as `run_layers(keys=...)` collects
    them; mask: [B, 1, W, T + W] bool from `window_attention_mask`. Echo's answer-window pass uses it.
    """
    kv: dict
    mask: torch.Tensor


def window_attention_mask(starts, T, window_real, attention_mask=None):
    """bool [B, 1, W, T + W] for a window of W positions starting at `starts` [B]: window slot j sees the
    other pass's keys at positions < starts_b (real tokens only, when an attention_mask [B, T] is given),
    then the window's own slots as attention_mask_4d does (causal, real ones — window_real [B, W] — and
    itself)."""
    before = torch.arange(T, device=starts.device)[None, :] < starts[:, None]              # [B, T]
    if attention_mask is not None:
        before = before & attention_mask.bool()
    W = window_real.shape[1]
    return torch.cat([before[:, None, None, :].expand(-1, 1, W, -1), attention_mask_4d(window_real, W, 0)], 3)


def injected(site, module, x, out):
    """The injection protocol: `site` is run_layers' `echo_inject.at_layer(i)` for this block (None: nothing
    to add); it returns the output module `module` (wq … w3) passes on, given its input x and output out."""
    return out if site is None else site.apply(module, x, out)


def make_linear(args, layer_id, module, d_in, d_out):
    adapted = (args.adapter is not None and module in args.lora_modules
               and (args.lora_layers is None or layer_id in args.lora_layers))
    if not adapted and args.base_format == "nf4":     # frozen all the same, but W in 4 bits: rank 0
        # nn.Linear's init draw, thrown away: the random stream, hence every adapter's init, stays the
        # plain model's (same seed, same adapters: NF4 and plain runs differ only in W)
        nn.init.kaiming_uniform_(torch.empty(d_out, d_in), a=math.sqrt(5))
        return LoRALinear(d_in, d_out, base_format="nf4")
    if not adapted:        # a layer without an adapter is the plain layer, in the model that is built
        return nn.Linear(d_in, d_out, bias=False)
    return LoRALinear(d_in, d_out, rank=args.lora_rank, alpha=args.lora_alpha,
                      dropout=args.lora_dropout, dora=args.adapter == "dora", base_format=args.base_format)


class KVCache:
    """Per-layer key/value buffers [B, n_kv_heads, max_len, head_dim] for incremental decoding."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, device, dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len

    def update(self, layer_id, pos, k, v):
        """Write positions pos.. and return the whole buffers: attention always spans max_len keys
        (unwritten slots are masked), so every decoding step has the same shapes."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of length {self.max_len} cannot hold position {end - 1}")
        self.k[layer_id][:, :, pos:end] = k
        self.v[layer_id][:, :, pos:end] = v
        return self.k[layer_id], self.v[layer_id]

    def reorder(self, index):
        """Keep batch rows `index` (beam search)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class Attention(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.layer_id, self.n_heads, self.n_kv_heads, self.head_dim = layer_id, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = make_linear(args, layer_id, "wq", args.dim, args.n_heads * args.head_dim)
        self.wk = make_linear(args, layer_id, "wk", args.dim, args.n_kv_heads * args.head_dim)
        self.wv = make_linear(args, layer_id, "wv", args.dim, args.n_kv_heads * args.head_dim)
        self.wo = make_linear(args, layer_id, "wo", args.n_heads * args.head_dim, args.dim)

    def forward(self, x, cos, sin, mask, site=None, kv_cache=None, cache_pos=0, prompt_kv=None):
        """Returns (output, (k, v)): the keys/values this pass computed (with a kv_cache, the whole cache),
        which a later window pass may read. prompt_kv: another pass's (k, v) to attend to first (a window
        pass; `mask` says which of them each query sees)."""
        B, T, _ = x.shape
        q = injected(site, "wq", x, self.wq(x)).view(B, T, self.n_heads, self.head_dim)
        k = injected(site, "wk", x, self.wk(x)).view(B, T, self.n_kv_heads, self.head_dim)
        v = injected(site, "wv", x, self.wv(x)).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, cache_pos, k, v)
        own = (k, v)
        if prompt_kv is not None:
            k, v = torch.cat([prompt_kv[0], k], 2), torch.cat([prompt_kv[1], v], 2)
        # GQA: each group of n_heads / n_kv_heads query heads shares one key/value head.
        if isinstance(mask, BlockMask):     # packed rows with --pack-attention flex (document_block_mask)
            y = flex_for(q)(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and kv_cache is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return injected(site, "wo", y, self.wo(y)), own


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) ⊙ w3 x)."""

    def __init__(self, args, layer_id):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = make_linear(args, layer_id, "w1", args.dim, hidden)
        self.w2 = make_linear(args, layer_id, "w2", hidden, args.dim)
        self.w3 = make_linear(args, layer_id, "w3", args.dim, hidden)

    def forward(self, x, site=None):
        gate = injected(site, "w1", x, self.w1(x))
        up = injected(site, "w3", x, self.w3(x))
        hidden = F.silu(gate) * up
        return injected(site, "w2", hidden, self.w2(hidden))


class TransformerBlock(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args, layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h, cos, sin, mask, site=None, kv_cache=None, cache_pos=0, prompt_kv=None):
        """site: this block's injection site (see `injected`), or None. Returns (h, (k, v))."""
        attended, kv = self.attention(self.attention_norm(h), cos, sin, mask, site, kv_cache, cache_pos, prompt_kv)
        h = h + attended
        return h + self.feed_forward(self.ffn_norm(h), site), kv


def attention_mask_4d(attention_mask, T, cache_pos):
    """bool [B,1,T,S]: causal ∧ key is a real token. Every query also sees itself, so the rows of
    left-padding queries stay finite (their outputs are never used)."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(cache_pos, cache_pos + T, device=attention_mask.device)[:, None]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos) & attention_mask[:, None, :].bool()
    return (allowed | (k_pos == q_pos))[:, None]


def document_attention_mask(documents):
    """bool [B,1,T,T] for packed rows (data.packing): causal ∧ the key is in the query's example; documents
    [B, T] holds each token's example (−1 on padding, which sees only itself, so its rows stay finite and are
    never used). An explicit mask for SDPA: exact on any device. A GPU kernel that takes the same layout
    (varlen attention with cumulative lengths, flex_attention's document mask) replaces this function and
    its one call in run_layers; which one is to be chosen by measurement (docs/packing.md)."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    same = (documents[:, :, None] == documents[:, None, :]) & (documents[:, None, :] >= 0)
    return ((same & causal) | torch.eye(T, dtype=torch.bool, device=documents.device))[:, None]


def document_block_mask(documents):
    """flex_attention's BlockMask for packed rows: the same mask as document_attention_mask(documents), as a
    mask_mod(b, h, q, kv) = (documents[b, q] == documents[b, kv] ∧ documents[b, kv] ≥ 0 ∧ kv ≤ q) ∨ q = kv.
    create_block_mask evaluates it on 128 × 128 tiles and keeps only the tiles with an allowed pair, so
    flex_attention skips the rest: attention costs Σ per-example squares (+ the diagonal tiles), not L², which
    makes the one-flat-row layout (data.pack_micro_batch(flat=True)) cheap. Build it once per micro-batch and
    hand it to every run_layers call of that micro-batch (it does not depend on the layer)."""
    B, T = documents.shape

    def mask_mod(b, h, q, kv):
        same = (documents[b, q] == documents[b, kv]) & (documents[b, kv] >= 0) & (kv <= q)
        return same | (q == kv)         # padding queries see only themselves, so no row is all-masked
    return create_block_mask(mask_mod, B, None, T, T, device=documents.device)


@functools.cache
def compiled_flex_attention():
    """torch.compile(flex_attention), made on first use (a cache, not state: the same function every call).
    Eager flex_attention materialises the scores (a reference implementation, no block skipping); compiled, it
    is one fused block-sparse kernel. Default `dynamic` (as compile_blocks): packed rows change length (and, with
    --pack-layout rows, number) from step to step, so the kernel is compiled static first, then again with a
    symbolic length (and row count): two or three compilations in all, far under torch._dynamo's recompile
    limit, past which a call would run eagerly."""
    return torch.compile(flex_attention)


def flex_for(x):
    """The flex_attention to call for inputs like x: the plain one when already being traced by torch.compile
    (training/graphs.compile_blocks compiles each block, and the call inlines into its graph) or on CPU (eager
    runs there, forward only: torch 2.13 has no flex backward on CPU); otherwise (eager GPU) the compiled one."""
    plain = torch.compiler.is_compiling() or x.device.type == "cpu"
    return flex_attention if plain else compiled_flex_attention()


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float64),
                             rope_frequencies(args.head_dim, args.rope_theta, args.use_scaled_rope))
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std=0.02):
        """Random base weights (presets without a checkpoint); adapters keep their own init. An NF4 base
        draws each weight in the model's dtype, in the plain model's order, and quantises it: it is the
        plain model's random base, quantised."""
        for name, p in self.named_parameters() if self.args.base_format == "plain" else self.named_weights():
            if name.rsplit(".", 1)[-1] in ADAPTER_KEYS:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif isinstance(p, NF4Weight):
                ref = self.tok_embeddings.weight
                p.copy_(torch.empty(p.shape, dtype=ref.dtype, device=ref.device).normal_(0.0, std))
            else:
                p.normal_(0.0, std)
        if self.args.adapter:   # DoRA magnitudes are NOT set here: call init_dora_magnitudes() once W is final
            for name, p in self.named_parameters():
                p.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_KEYS)

    def adapter_linears(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear) and m.rank > 0]

    def named_weights(self):
        """named_parameters, with each NF4-quantised weight (an NF4Weight, named as the parameter it
        stands for: "layers.0.attention.wq.weight") where a plain model has that parameter; the base
        weights come in the plain model's order."""
        for prefix, module in self.named_modules():
            if isinstance(module, NF4Weight):
                yield prefix, module
            yield from module.named_parameters(prefix=prefix, recurse=False)

    @torch.no_grad()
    def dequantized_state_dict(self, dtype=torch.float32, device="cpu"):
        """The base weights as a plain model's state dict (Meta keys, no adapters) in dtype, on device: an
        NF4 weight dequantised (the W its forward uses), every other weight cast. What a merged export
        folds the adapter into (lora.merged_weight: dequant(W) + ΔW, never re-quantised). Each tensor goes
        to `device` as it is made, so the model's device holds one dequantised weight at a time."""
        return {k: (dequantize_nf4(p, dtype) if isinstance(p, NF4Weight) else p.detach().to(dtype)).to(device)
                for k, p in self.named_weights() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}

    @torch.no_grad()
    def init_dora_magnitudes(self):
        for m in self.adapter_linears():
            if m.dora:
                m.init_magnitude()

    @torch.no_grad()
    def load_base_weights(self, state_dict):
        """Strict load of a Meta-layout state dict into the base weights; one-line errors. An NF4 base
        quantises each linear weight as it is copied (NF4Weight.copy_), one at a time on the model's
        device: the peak there is the quantised model + the embedding and head + one weight in fp32 and
        its quantisation temporaries (~3 × 4 B × its size), never the full-precision model."""
        state_dict = {k: v for k, v in state_dict.items() if k != "rope.freqs"}
        if self.output is None and "output.weight" in state_dict:   # tied: a redundant copy is fine
            if not torch.equal(state_dict["output.weight"], state_dict.get("tok_embeddings.weight")):
                raise ValueError("checkpoint has an output.weight different from tok_embeddings.weight, "
                                 "but params.json says tie_word_embeddings")
            del state_dict["output.weight"]
        params = dict(self.named_parameters() if self.args.base_format == "plain" else self.named_weights())
        expected = {k: p for k, p in params.items() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weight(s), first: {missing[0]}")
        unexpected = sorted(set(state_dict) - set(expected))
        if unexpected:
            raise ValueError(f"checkpoint has {len(unexpected)} unexpected key(s), first: {unexpected[0]}")
        for k, p in expected.items():
            if tuple(state_dict[k].shape) != tuple(p.shape):
                raise ValueError(f"{k}: checkpoint shape {list(state_dict[k].shape)}, model expects {list(p.shape)}")
        for k, p in expected.items():
            p.copy_(state_dict[k])
        self.init_dora_magnitudes()
        return self

    def setup_kv_cache(self, batch, max_len, device=None, dtype=None):
        max_len = -(-max_len // 64) * 64     # a few lengths only: attention kernels plan per shape
        ref = self.tok_embeddings.weight
        return KVCache(self.args.n_layers, batch, self.args.n_kv_heads, max_len, self.args.head_dim,
                       device or ref.device, dtype or ref.dtype)

    def layer_index(self, layer):
        """Accept negative layer indices (−1 = last block); reject out-of-range ones."""
        n = self.args.n_layers
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range for a {n}-layer model")
        return layer % n

    # -- the forward, in three public pieces so train.py can share the lower layers of two passes --

    def embed(self, tokens):
        return self.tok_embeddings(tokens)

    def run_layers(self, h, start, end, *, positions, attention_mask=None, echo_inject=None,
                   hidden_layers=(), hiddens=None, kv_cache=None, cache_pos=0, keys=None, prompt=None,
                   documents=None, block_mask=None):
        """Blocks start..end-1. Residual-stream outputs of `hidden_layers` go into `hiddens`, each block's
        keys/values into `keys` (a dict) when given. prompt: a PromptKV, for a pass over a window of
        positions (h [B, W, D], positions [B, W]) that attends to another pass's keys/values first.
        With args.activation_checkpointing, while gradients are recorded (and without a KV cache, which
        a recomputation would write twice), each block's call is checkpointed: what it returns, and so
        what `hiddens` / `keys` collect, are the same tensors' values, and gradients reach them as before.
        documents: packed rows (data.packing, --pack): each token's example [B, T] (−1: padding); attention stays
        inside an example (document_attention_mask), `positions` restart at 0 per example. block_mask: with
        documents, document_block_mask(documents) (--pack-attention flex), built once per micro-batch by the
        caller: attention through flex_attention instead of SDPA with the explicit [B,1,T,T] mask."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None
        if kv_cache is not None:      # keys: the whole cache; slots not written yet are masked out
            B, written = h.shape[0], cache_pos + h.shape[1]
            if attention_mask is None:
                attention_mask = torch.ones(B, written, dtype=torch.bool, device=h.device)
            unwritten = torch.zeros(B, kv_cache.max_len - written, dtype=torch.bool, device=h.device)
            mask = attention_mask_4d(torch.cat([attention_mask.bool(), unwritten], 1), h.shape[1], cache_pos)
        elif prompt is not None:
            mask = prompt.mask
        elif documents is not None:
            mask = document_attention_mask(documents) if block_mask is None else block_mask
        elif attention_mask is not None:
            mask = attention_mask_4d(attention_mask, h.shape[1], cache_pos)
        recompute = self.args.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i in range(start, end):
            # the same kind of object for every layer (or None), so one compiled block graph serves them all
            site = None if echo_inject is None else echo_inject.at_layer(i)
            block = functools.partial(checkpoint, self.layers[i], use_reentrant=False) if recompute else self.layers[i]
            h, kv = block(h, cos, sin, mask, site, kv_cache, cache_pos,
                          None if prompt is None else prompt.kv[i])
            if i in hidden_layers:
                hiddens[i] = h
            if keys is not None:
                keys[i] = kv
        return h

    def head(self, h, logits_index=None):
        """Logits, optionally only at positions logits_index [B,P] (never project unused positions)."""
        if logits_index is not None:
            h = h.gather(1, logits_index[..., None].expand(-1, -1, h.shape[-1]))
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(self.norm(h), weight)

    def head_loss(self, h, logits_index, targets):
        """Logits at logits_index [B, P] and their summed cross-entropy against targets [B, P] (−100, which
        is data.IGNORE_INDEX and cross_entropy's default, in padding slots), in (at least) fp32:
        -> (Σ CE, logits). The one forward-plus-loss of every training and validation pass."""
        logits = self.head(h, logits_index=logits_index)
        ce = F.cross_entropy(at_least_fp32(logits).flatten(0, 1), targets.flatten(), reduction="sum")
        return ce, logits

    def positions_for(self, tokens, attention_mask=None, cache_pos=0):
        T = tokens.shape[1]
        if attention_mask is None:
            return torch.arange(cache_pos, cache_pos + T, device=tokens.device).expand(tokens.shape[0], T)
        # left padding: the first real token is position 0
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]

    def forward(self, tokens, attention_mask=None, *, positions=None, echo_inject=None, hidden_layers=(),
                logits_index=None, kv_cache=None, cache_pos=0, documents=None, block_mask=None):
        if positions is None:
            positions = self.positions_for(tokens, attention_mask, cache_pos)
        wanted = [self.layer_index(layer) for layer in hidden_layers]
        hiddens = {}
        h = self.run_layers(self.embed(tokens), 0, self.args.n_layers, positions=positions,
                            attention_mask=attention_mask, echo_inject=echo_inject, hidden_layers=set(wanted),
                            hiddens=hiddens, kv_cache=kv_cache, cache_pos=cache_pos, documents=documents,
                            block_mask=block_mask)
        logits = self.head(h, logits_index)
        return (logits, [hiddens[i] for i in wanted]) if hidden_layers else logits

