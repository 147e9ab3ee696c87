"""Echo-LoRA: training-time deep→shallow echo injection for LoRA / DoRA fine-tuning.

Notation: B batch, T sequence, V vocabulary, D model dim. Labels are "unshifted" (aligned with the
input ids, prompt and padding = -100), so the logit at position t predicts token t+1 and the
supervised logit positions are A = {t : y[t+1] != -100}.

One training step (`echo_loss` below does all of it for one micro-batch; train.py calls it):
    Echo-off pass → L_off, source hidden states h_l at the answer boundary t*   (no injection)
    z   = mean_l sg(h_l[b, t*_b])                                                eq. 2
    z̄   = Norm(z)                                                                eq. 3
    e   = W2 tanh(W1 z̄)                                                          eq. 4
    g   = σ(U2 tanh(U1 z̄) + b)                                                   eq. 5
    δ   = λ (e ⊙ g)             one injector per (target layer, module)          eq. 6
    o_{b,t} ← o_{b,t} + M_{b,t} δ_b   inside each target module                  eq. 7
    M_{b,t} = [y_{b,t} != -100]                                                   eq. 8
    r_k ~ Bernoulli(p_k)                                                          eq. 9
    p_k = p_start + k/(K-1) (p_end - p_start)                                     eq. 10
    L   = L_off + r_k (L_on + λ_kd L_kd)      (r_k = 0: the Echo-on pass is skipped)  eq. 11
    L_kd = τ²/|A| Σ_{t∈A} KL(q_on ‖ q_off),  q = softmax(logits/τ), q_on detached   eq. 12
The Echo-on pass computes only what eq. 7 can change: the layers from the first target up, and each
row's answer window from t*, whose attention reads the prompt's keys/values from the Echo-off pass
(echo_loss says why that is exact).
"""
import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.io import publish
from data import IGNORE_INDEX
from echo.inject import EchoInject
from model.model import (ATTENTION_MODULES, FFN_MODULES, PromptKV, at_least_fp32, canonical_module,
                         window_attention_mask)

IGNORE = IGNORE_INDEX
MODULES = ATTENTION_MODULES + FFN_MODULES


def option(default, help, flag=None, before=None, **argparse_kw):
    """An EchoConfig field that is also a train.py flag: `flag` (default --echo-<name>) with `help`.
    `before`: what a run did before the option existed, when that is not its default (what --resume
    assumes for an older checkpoint)."""
    meta = {"help": help, "flag": flag, **argparse_kw}
    if before is not None:
        meta["before"] = before
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EchoConfig:
    """Echo hyper-parameters (defaults = the paper's main setting) — the one place they are declared.

    Every field is also a train.py flag (`add_flags` derives flag, default and help from here;
    `from_flags` reads them back), so an ablation switch is one new field here.

    Layer indices are 0-based block indices and may be negative (Python style, -1 = last block);
    `resolve(n_layers)` turns them non-negative and validates. A source layer l means "the residual
    stream after block l" (before the final norm).

    lambda_init = 0.1: λ must be non-zero at step 1, otherwise δ = 0·(e⊙g) gives W1, W2, U1, U2, b
    no gradient and only λ would move. All W/U are random (Linear-style init), so e ≠ 0 and every
    Echo weight gets a non-zero gradient on the first routed step. With z̄ of unit scale, e ~ O(0.5)
    per element and g ≈ σ(-2) ≈ 0.12, the initial δ is ~0.5% of a unit-scale activation: a small
    nudge that cannot derail the pretrained model at step 1.

    norm = "layernorm" (default): eq. 3 is a parameter-free LayerNorm (centre, then unit variance),
    since residual streams of LLMs carry large per-token offsets/outlier dimensions and centring
    removes the shared offset. "rms": z / rms(z) (no centring, as in the model's RMSNorm).
    """
    target_layers: tuple = option((4, 5, 6, 7), "shallow target layers receiving δ (eq. 7); "
                                  "negative = from the end", "--echo-targets")
    target_modules: tuple = option(("wq", "wv"), "target modules (eq. 7): wq wk wv wo w1 w2 w3 "
                                   "or q_proj … down_proj", "--echo-modules")
    source_layers: tuple = option((-8, -7, -6, -5), "deep source layers averaged into z at t* (eq. 2)",
                                  "--echo-sources")
    bottleneck: int = option(64, "width of W1 / U1 (eqs. 4-5)")
    gate_bias_init: float = option(-2.0, "initial gate bias b (eq. 5); the gate starts mostly closed, "
                                   "σ(-2) ≈ 0.12", "--echo-gate-bias")
    lambda_init: float = option(0.1, "initial scale λ (eq. 6); must be ≠ 0 (see EchoConfig)")
    norm: str = option("layernorm", "eq. 3: parameter-free layernorm or rms", choices=("layernorm", "rms"))
    norm_eps: float = option(1e-5, "eps of eq. 3")
    all_positions: bool = option(False, "ablation 'w/o answer-only masking': inject on every real "
                                 "position (M of eq. 8 = attention mask)")
    p_start: float = option(1.0, "routing probability at the first step (eqs. 9-10)")
    p_end: float = option(0.2, "routing probability at the last step (eq. 10); "
                          "--echo-p-start 1 --echo-p-end 1 = routing off")
    tau: float = option(2.0, "KD temperature τ (eq. 12)")
    lambda_kd: float = option(1.0, "weight λ_kd of L_kd (eq. 11)")
    any_depth: bool = option(False, "ablation: allow sources that are not deeper than every target "
                             "(deep→deep, shallow→shallow)")
    separate_passes: bool = option(False, "run both passes from the embedding, with separate dropout "
                                   "draws (default: share the layers below the first target)")
    answer_window: bool = option(True, "the Echo-on pass recomputes only positions t* … last answer "
                                 "token and reads the prompt's keys/values from the Echo-off pass (exact: "
                                 "eq. 8 leaves the prompt untouched; LoRA dropout draws on the prompt are "
                                 "shared); --no-echo-answer-window recomputes every position", before=False)
    token_scale: bool = option(False, "per-token scale λ_t = λ + w·x_t in eq. 6 (x_t: the target module's "
                               "input; w trainable, initialised to 0, so the run starts at the scalar λ)")
    seed: int = field(default=0, metadata={"flag": False})   # the router's seed: train.py's --seed

    def resolve(self, n_layers):
        """Validated copy with non-negative, sorted layers and canonical module names. Messages name
        the flag (and the field) at fault."""
        def layers(name, values):
            values = tuple(values)
            if not values:
                raise ValueError(f"{where(name)} is empty")
            out = []
            for l in values:
                if not isinstance(l, int) or isinstance(l, bool):
                    raise ValueError(f"{where(name)}: layer {l!r} is not an int")
                if not -n_layers <= l < n_layers:
                    raise ValueError(f"{where(name)}: layer {l} out of range for a {n_layers}-layer model")
                out.append(l % n_layers)
            if len(set(out)) != len(out):
                raise ValueError(f"{where(name)} {values} has duplicates (after resolving negatives)")
            return tuple(sorted(out))

        targets = layers("target_layers", self.target_layers)
        sources = layers("source_layers", self.source_layers)
        if isinstance(self.target_modules, str):
            raise ValueError(f"{where('target_modules')} must be a sequence of names, got the string "
                             f"{self.target_modules!r}")
        if not self.target_modules:
            raise ValueError(f"{where('target_modules')} is empty")
        try:
            modules = tuple(dict.fromkeys(canonical_module(m) for m in self.target_modules))
        except ValueError as e:
            raise ValueError(f"{where('target_modules')}: {e}") from None
        if not self.any_depth and min(sources) <= max(targets):
            raise ValueError(f"{where('source_layers')} {sources} must all be deeper than every target layer "
                             f"{targets} ({where('any_depth')} allows the deep→deep / shallow→shallow ablations)")
        self.check_values()
        return replace(self, target_layers=targets, source_layers=sources, target_modules=modules)

    def check_values(self):
        """The checks that need no model: every number finite and in range (NaN fails every one)."""
        for name in ("gate_bias_init", "lambda_init", "norm_eps", "tau", "lambda_kd", "p_start", "p_end"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{where(name)} must be a finite number, got {getattr(self, name)}")
        if self.lambda_init == 0:
            raise ValueError(f"{where('lambda_init')} must be non-zero: with λ = 0 no Echo weight but λ gets a "
                             f"gradient (see EchoConfig)")
        if self.norm_eps <= 0:
            raise ValueError(f"{where('norm_eps')} must be > 0, got {self.norm_eps}")
        if self.norm not in ("layernorm", "rms"):
            raise ValueError(f"{where('norm')} must be 'layernorm' or 'rms', got {self.norm!r}")
        if self.bottleneck < 1:
            raise ValueError(f"{where('bottleneck')} must be >= 1, got {self.bottleneck}")
        for name in ("p_start", "p_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{where(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"{where('tau')} must be > 0, got {self.tau}")
        if self.lambda_kd < 0:
            raise ValueError(f"{where('lambda_kd')} must be >= 0, got {self.lambda_kd}")

    # -- the flags, derived from the fields above --

    @staticmethod
    def flag(name):
        """The train.py flag of field `name` (None: not a flag)."""
        f = FIELDS[name]
        if f.metadata.get("flag") is False:
            return None
        return f.metadata.get("flag") or "--echo-" + name.replace("_", "-")

    @classmethod
    def add_flags(cls, parser):
        """Add one flag per field to an argparse parser (dest = echo_<field>)."""
        group = parser.add_argument_group("Echo (eqs. 2-12, train-time only) and the ablations of the paper's Tables 4/7")
        for f in FIELDS.values():
            flag = cls.flag(f.name)
            if flag is None:
                continue
            extra = {k: v for k, v in f.metadata.items() if k not in ("help", "flag", "before")}
            kw = dict(dest="echo_" + f.name, default=f.default, help=f.metadata["help"], **extra)
            if isinstance(f.default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif isinstance(f.default, tuple):
                kw.update(nargs="+", type=type(f.default[0]))
            else:
                kw["type"] = type(f.default)
            group.add_argument(flag, **kw)

    @staticmethod
    def value_before(name):
        """What runs older than field `name` did: its `before` if declared, else its default."""
        f = FIELDS[name]
        return f.metadata.get("before", f.default)

    @classmethod
    def from_flags(cls, opts, **fixed):
        """The config the parsed flags describe; `fixed` supplies the non-flag fields (seed)."""
        values = {f.name: getattr(opts, "echo_" + f.name) for f in FIELDS.values() if cls.flag(f.name)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, **fixed)


FIELDS = {f.name: f for f in fields(EchoConfig)}     # name → dataclass field, built once


def where(name):
    """'--echo-targets (target_layers)': how a config error names its culprit."""
    flag = EchoConfig.flag(name)
    return f"{flag} ({name})" if flag else name


# ----------------------------------------------------------------------------- supervision (eqs. 2, 8, 12)

def supervision(labels, bucket=1):
    """Where a micro-batch is supervised, from unshifted labels [B, T] (training computes this once
    per micro-batch on the host, so the GPU step needs no host-device sync):

      index    [B, P]  the supervised logit positions A_b = {t : y[b, t+1] ≠ −100}, in order,
      targets  [B, P]  the tokens they predict (−100 in the padding slots),
      boundary [B]     t*_b = first answer position − 1 = the last prompt position (eq. 2).

    P = the longest span t*_b … max A_b (= max_b |A_b| for answers without gaps) rounded up to a
    multiple of `bucket` (a few shapes for torch.compile), so the Echo-on pass's answer window of P
    positions from t*_b holds every supervised position; padding slots point at position 0 with
    target −100 (ignored by cross_entropy and masked_kl's `valid`).
    Raises, naming the row, if a row has no answer token or is supervised from position 0 (no prompt,
    so t* would be −1): both would otherwise silently read the wrong hidden state.
    """
    B, T = labels.shape
    answer = labels != IGNORE
    has_answer = answer[:, 1:].any(dim=1)
    if not bool(has_answer.all()):
        bad = (~has_answer).nonzero()[0].item()
        raise ValueError(f"sample {bad} of the batch has no answer token (all labels are {IGNORE}); "
                         f"Echo needs an answer boundary — drop such samples before training")
    if bool(answer[:, 0].any()):
        bad = answer[:, 0].nonzero()[0].item()
        raise ValueError(f"sample {bad} of the batch is supervised from position 0: no prompt token, "
                         f"so there is no answer boundary t* (eq. 2)")
    supervised = answer[:, 1:]                                       # logit t predicts y[t+1]
    counts = supervised.sum(dim=1)
    pos = torch.arange(T - 1, device=labels.device).expand(B, -1)
    boundary = supervised.int().argmax(dim=1)                        # first t with y[t+1] supervised
    last = torch.where(supervised, pos, -1).amax(dim=1)
    P = -(-int((last - boundary + 1).max()) // bucket) * bucket
    order = torch.where(supervised, pos, pos + T).argsort(dim=1, stable=True)[:, :P]   # supervised first
    if order.shape[1] < P:                                           # bucket rounding beyond T - 1
        order = F.pad(order, (0, P - order.shape[1]))
    valid = torch.arange(P, device=labels.device)[None, :] < counts[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))
    targets = torch.where(valid, labels.gather(1, index + 1), torch.full_like(index, IGNORE))
    return index, targets, boundary


# ----------------------------------------------------------------------------- eq. 2

def aggregate_sources(hiddens, t_star, rows=None):
    """eq. 2: z_b = mean_l sg(h_l[b, t*_b]) over the source layers. hiddens: list of [B, T, D].
    rows (packed rows, --pack): example i's t* is at (rows[i], t_star[i]): z_i = mean_l sg(h_l[rows_i, t*_i])."""
    if len(hiddens) == 0:
        raise ValueError("aggregate_sources got no source hidden states")
    if rows is not None:
        rows, t_star = rows.to(hiddens[0].device), t_star.to(hiddens[0].device)
        return at_least_fp32(torch.stack([h.detach()[rows, t_star] for h in hiddens])).mean(dim=0)
    idx = t_star.to(hiddens[0].device)[:, None, None].expand(-1, 1, hiddens[0].shape[-1])
    at_boundary = torch.stack([h.detach().gather(1, idx)[:, 0] for h in hiddens])    # [L, B, D]
    return at_least_fp32(at_boundary).mean(dim=0)


# ----------------------------------------------------------------------------- eqs. 3-6

def echo_norm(z, kind="layernorm", eps=1e-5):
    """eq. 3: parameter-free normalisation of z [..., D]."""
    if kind == "layernorm":
        return F.layer_norm(z, z.shape[-1:], eps=eps)
    if kind == "rms":
        return z * torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + eps)
    raise ValueError(f"unknown Echo norm {kind!r}")


class EchoInjector(nn.Module):
    """One injector for one (target layer, module): z [B, d_in] → δ [B, d_out] (eqs. 3-6).

    W1, U1: [bottleneck, d_in]; W2, U2: [d_out, bottleneck]; b: [d_out]; λ: scalar. No other biases.
    token_dim (--echo-token-scale): also w [token_dim], zeros, for λ_t = λ + w·x_t (echo.inject.add_echo).
    W/U keep nn.Linear's init (uniform ±1/sqrt(fan_in)), b = gate_bias_init, λ = lambda_init ≠ 0:
    with a zero W2 (LoRA-B style) W1 and U1, U2 would get no gradient at step 1; with λ = 0, none
    of them would. With both non-zero every Echo weight gets a gradient on the first routed step.
    """

    def __init__(self, d_in, d_out, *, bottleneck=64, gate_bias_init=-2.0, lambda_init=0.1,
                 norm="layernorm", norm_eps=1e-5, token_dim=None):
        super().__init__()
        self.norm, self.norm_eps = norm, norm_eps
        self.W1 = nn.Linear(d_in, bottleneck, bias=False)
        self.W2 = nn.Linear(bottleneck, d_out, bias=False)
        self.U1 = nn.Linear(d_in, bottleneck, bias=False)
        self.U2 = nn.Linear(bottleneck, d_out, bias=False)
        self.b = nn.Parameter(torch.full((d_out,), float(gate_bias_init)))
        self.lam = nn.Parameter(torch.tensor(float(lambda_init)))
        if token_dim is not None:          # zeros: the per-token scale starts exactly at the scalar λ
            self.token_w = nn.Parameter(torch.zeros(token_dim))

    def forward(self, z):
        return self.delta_and_unscaled(z)[0]

    def delta_and_unscaled(self, z):
        """-> (δ = λ (e ⊙ g), e ⊙ g) [B, d_out]; the second is what a per-token scale multiplies."""
        z_bar = echo_norm(z.to(self.b.dtype), self.norm, self.norm_eps)     # eq. 3
        e = self.W2(torch.tanh(self.W1(z_bar)))                              # eq. 4
        unscaled = e * self.gate(z_bar)
        return self.lam * unscaled, unscaled                                 # eq. 6

    def gate(self, z_bar):
        """eq. 5: g = σ(U2 tanh(U1 z̄) + b), from the normalised z̄ of eq. 3."""
        return torch.sigmoid(self.U2(torch.tanh(self.U1(z_bar))) + self.b)


# ----------------------------------------------------------------------------- eq. 8

def answer_mask(labels, all_positions=False, attention_mask=None):
    """eq. 8: M_{b,t} = [y_{b,t} != -100] → bool [B, T].

    all_positions=True (ablation): every real token (attention_mask True; all positions when no
    attention_mask is given). Padding is excluded whenever an attention_mask is given (train.py gives
    none: with right padding, padded positions cannot influence real tokens under causal attention).
    Note: eq. 8 marks the answer *tokens*; the boundary position t* (whose logit predicts the first
    answer token) is a prompt position and is not injected.
    """
    if not all_positions:
        return labels != IGNORE
    if attention_mask is None:
        return torch.ones_like(labels, dtype=torch.bool)
    if attention_mask.shape != labels.shape:
        raise ValueError(f"attention_mask shape {list(attention_mask.shape)} != labels shape {list(labels.shape)}")
    return attention_mask.bool()


# ----------------------------------------------------------------------------- module

def module_out_dim(args, module):
    """Output width of a target projection, from ModelArgs."""
    return {"wq": args.n_heads * args.head_dim, "wk": args.n_kv_heads * args.head_dim,
            "wv": args.n_kv_heads * args.head_dim, "wo": args.dim,
            "w1": args.ffn_hidden_dim, "w3": args.ffn_hidden_dim, "w2": args.dim}[module]


def module_in_dim(args, module):
    """Input width of a target projection (what a per-token scale reads), from ModelArgs."""
    return {"wo": args.n_heads * args.head_dim, "w2": args.ffn_hidden_dim}.get(module, args.dim)


class EchoModule(nn.Module):
    """All of a run's Echo computation after the Echo-off pass: source hidden states → EchoInject.

        echo = EchoModule(cfg, model.args)
        inject = echo(source_hiddens, boundary, labels)      # eqs. 2-8, for model(echo_inject=inject)

    One EchoInjector per (target layer, module). Training-time only: never needed for inference,
    saved apart from the adapter. Keep it in fp32 even with a bf16 model (z is cast to the Echo
    weights' dtype); train.py compiles it as one graph, so a learnable aggregation added here is
    compiled with it.
    """

    def __init__(self, cfg, args=None, *, n_layers=None, dim=None, out_dims=None, in_dims=None):
        super().__init__()
        if args is not None:
            n_layers, dim = args.n_layers, args.dim
        self.cfg = cfg.resolve(n_layers)
        self.n_layers, self.dim = n_layers, dim
        if out_dims is None:
            out_dims = {m: module_out_dim(args, m) for m in self.cfg.target_modules}
        self.out_dims = dict(out_dims)
        c = self.cfg
        self.in_dims = None
        if c.token_scale:
            if in_dims is None and args is None:
                raise ValueError(f"{where('token_scale')} needs the target modules' input widths (in_dims)")
            self.in_dims = dict(in_dims or {m: module_in_dim(args, m) for m in c.target_modules})
        self.injectors = nn.ModuleDict({
            self.key(l, m): EchoInjector(dim, self.out_dims[m], bottleneck=c.bottleneck,
                                         gate_bias_init=c.gate_bias_init, lambda_init=c.lambda_init,
                                         norm=c.norm, norm_eps=c.norm_eps,
                                         token_dim=self.in_dims[m] if c.token_scale else None)
            for l in c.target_layers for m in c.target_modules})

    @staticmethod
    def key(layer, module):
        return f"{layer}_{module}"      # ModuleDict keys may not contain "."

    def deltas(self, z):
        """eqs. 3-6 for every (layer, module): {(layer, module): δ [B, d_out]} (fp32)."""
        return {(l, m): self.injectors[self.key(l, m)](z)
                for l in self.cfg.target_layers for m in self.cfg.target_modules}

    def inject(self, z, labels, attention_mask=None, documents=None):
        """z [B, D] → EchoInject(deltas = fp32 δ per (layer, module) (eqs. 3-6), mask = bool M (eq. 8)).
        The model casts δ and M to each module's output dtype when it adds them (eq. 7).
        documents (packed rows, --pack): each token's example [R, T] (−1: padding); z is then [N examples, D]
        and each token gets its own example's δ [R, T, d_out] (M is 0 on padding, so its δ is never added)."""
        rows = labels.shape[0] if documents is None else z.shape[0]        # packed: one z per example
        if tuple(z.shape) != (rows, self.dim):
            raise ValueError(f"Echo z has shape {list(z.shape)}, expected [{labels.shape[0]}, {self.dim}]")
        mask = answer_mask(labels, self.cfg.all_positions, attention_mask)                   # eq. 8
        example = None if documents is None else documents.clamp_min(0)       # each token's example, once
        per_token = (lambda d: d) if example is None else (lambda d: d[example])
        if not self.cfg.token_scale:
            return EchoInject(deltas={k: per_token(d) for k, d in self.deltas(z).items()}, mask=mask)
        deltas, scales = {}, {}
        for l in self.cfg.target_layers:
            for m in self.cfg.target_modules:
                injector = self.injectors[self.key(l, m)]
                delta, unscaled = injector.delta_and_unscaled(z)                               # eqs. 3-6
                deltas[l, m] = per_token(delta)
                scales[l, m] = (injector.token_w, per_token(unscaled))                        # λ_t = λ + w·x_t
        return EchoInject(deltas=deltas, mask=mask, token_scales=scales)

    def forward(self, source_hiddens, boundary, labels, attention_mask=None, rows=None, documents=None):
        """source_hiddens: the Echo-off pass's residual streams [B, T, D] of cfg.source_layers, in
        that order; boundary: t* [B] (from `supervision`). Packed rows (--pack, data.Packing): example i's
        t* is at (rows[i], boundary[i]); with `documents` (the Echo-on pass over the packed rows) each token
        gets its own example's δ, without (the answer window: one row per example) δ stays per row."""
        z = aggregate_sources(source_hiddens, boundary, rows=rows)                            # eq. 2
        return self.inject(z, labels, attention_mask, documents=documents)                    # eqs. 3-8

    def config_dict(self):
        return {"echo": asdict(self.cfg), "n_layers": self.n_layers, "dim": self.dim,
                "out_dims": self.out_dims, **({"in_dims": self.in_dims} if self.in_dims else {})}


# ----------------------------------------------------------------------------- eqs. 9-10

def routing_probability(k, total_steps, cfg):
    """eq. 10: p_k = p_start + k/(K-1) (p_end - p_start) for optimizer step k = 0 … K-1
    (K = 1 → p_start; k is clamped to [0, K-1])."""
    if total_steps <= 1:
        return cfg.p_start
    k = min(max(int(k), 0), total_steps - 1)
    return cfg.p_start + k / (total_steps - 1) * (cfg.p_end - cfg.p_start)


class Router:
    """Per-optimizer-step Bernoulli router (eq. 9) on a CPU torch.Generator seeded with cfg.seed.

    Call `router(k)` exactly once per optimizer step k = 0 … K-1 (the same on every micro-batch
    of that step: cache the result). Every rank builds it with the same seed, so all ranks draw the
    same r_k and skip (or run) the Echo-on pass together. No GPU sync: the draw is on CPU. Its only
    state is the generator's; the schedule comes from cfg (train.py checks cfg on --resume).
    """

    def __init__(self, cfg, total_steps):
        if total_steps < 1:
            raise ValueError(f"Router total_steps must be >= 1, got {total_steps}")
        self.cfg, self.total_steps = cfg, int(total_steps)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(cfg.seed)

    def p(self, k):
        return routing_probability(k, self.total_steps, self.cfg)        # eq. 10

    def __call__(self, k):
        """eq. 9: r_k ~ Bernoulli(p_k) → bool. u ∈ [0, 1), so p = 1 always routes and p = 0 never."""
        return bool(torch.rand((), generator=self.generator).item() < self.p(k))

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- eq. 12

def masked_kl(logits_on, logits_off, labels=None, *, valid=None, tau=2.0, reduction="mean"):
    """eq. 12: L_kd = τ²/|A| Σ_{t∈A} KL(q_on ‖ q_off),  q = softmax(logits / τ), q_on detached.

    KL(q_on ‖ q_off) = Σ_v q_on(v) (log q_on(v) - log q_off(v)); the Echo-on distribution is the
    (detached) teacher, so the gradient flows into logits_off only.
      * full logits [B, T, V] + unshifted labels [B, T]: A = {(b, t) : labels[b, t+1] != -100};
      * gathered logits [N, V] (or [B, P, V] with `valid` [B, P] bool): A = all (valid) rows.
    reduction "mean" → scalar τ²/|A| Σ KL (0 when |A| = 0);
              "sum"  → (τ² Σ KL, |A|), so callers can normalise over micro-batches / ranks
              (|A| is a tensor with `valid`, so nothing waits for the device).
    Computed in fp32 (fp64 for fp64 logits).
    """
    if logits_on.shape != logits_off.shape:
        raise ValueError(f"masked_kl: logits shapes differ {list(logits_on.shape)} vs {list(logits_off.shape)}")
    V = logits_on.shape[-1]
    if labels is not None:
        if labels.shape != logits_on.shape[:-1]:
            raise ValueError(f"masked_kl: labels shape {list(labels.shape)} != logits shape {list(logits_on.shape[:-1])}")
        sel = labels[:, 1:] != IGNORE
        on, off = logits_on[:, :-1][sel], logits_off[:, :-1][sel]
    elif valid is not None:     # masked, not indexed: no data-dependent shape (CUDA-graph capturable)
        on, off = logits_on, logits_off
    else:
        on, off = logits_on.reshape(-1, V), logits_off.reshape(-1, V)
    log_q_on = F.log_softmax(at_least_fp32(on.detach()) / tau, dim=-1)
    log_q_off = F.log_softmax(at_least_fp32(off) / tau, dim=-1)
    kl = (log_q_on.exp() * (log_q_on - log_q_off)).sum(dim=-1)
    if valid is not None and labels is None:
        kl, count = kl * valid, valid.sum()
    else:
        count = on.shape[0]
    kl_sum = tau ** 2 * kl.sum()
    if reduction == "sum":
        return kl_sum, count
    if reduction == "mean":
        return kl_sum / (count.clamp_min(1) if torch.is_tensor(count) else max(count, 1))
    raise ValueError(f"masked_kl reduction must be 'mean' or 'sum', got {reduction!r}")


# ----------------------------------------------------------------------------- eq. 11

def echo_objective(loss_off, loss_on, loss_kd, routed, lambda_kd=1.0):
    """eq. 11: L = L_off + r (L_on + λ_kd L_kd). When r = 0 loss_on / loss_kd may be None (pass skipped).
    The one place the terms are combined: echo_loss (for the gradient) and train.py's log call it."""
    if not routed:
        return loss_off
    return loss_off + loss_on + lambda_kd * loss_kd


def uses_answer_window(cfg):
    """Whether the Echo-on pass runs on the answer window only (see echo_loss). Not with the ablations
    that inject on prompt positions (all_positions) or want fully independent passes (separate_passes)."""
    return cfg.answer_window and not cfg.all_positions and not cfg.separate_passes


def echo_loss(model, echo, tokens, labels, *, routed, normalizer=None, supervised=None, attention_mask=None,
              record=None, window=None, packing=None, block_mask=None):
    """One micro-batch of training, LoRA / DoRA (echo=None) or Echo-LoRA / Echo-DoRA (eqs. 2-12).

    Echo-off pass → CE_off (and the source hidden states); if routed, Echo-on pass → CE_on and
    τ²ΣKL (eq. 12). Logits are computed only at the supervised positions. Every term is a sum over
    answer tokens divided by `normalizer` (default: this micro-batch's answer-token count; train.py
    passes the count of the whole global batch, so the objective is a token mean over it whatever the
    number of micro-batches and ranks).

    What the Echo-on pass recomputes — the two passes differ only where δ reaches (eq. 7):
      * layers: both passes are identical below min(target layers), so those run once and the passes
        branch from their output (with LoRA dropout they share its draw there);
      * positions: M = 0 up to t* (eq. 8) and attention is causal, so every position ≤ t* has the same
        hidden states in both passes. The Echo-on pass runs only the answer window t*_b … t*_b + P − 1
        (P from `supervision`) and its attention reads the Echo-off pass's keys/values before t*_b.
        Its cost is the window's share of the sequence (≈ P / T); gradients flow through those keys
        into the Echo-off pass as they would through a recomputed prompt. With LoRA dropout the prompt
        shares the Echo-off pass's draw, like the shared layers.
    cfg.answer_window = False recomputes every position; cfg.separate_passes runs both passes from the
    embedding, with their own dropout draws (the all_positions ablation injects on the prompt, so it
    recomputes every position too).

    supervised: (index, targets, boundary) from `supervision(labels)`, precomputed on the host by
    train.py; computed (and validated) here when omitted.

    record: a dict, for analysis (echo.diagnostics, tests): a routed pass puts its EchoInject there as
    "inject", with its norms recorded ("norms"; run it eagerly), "source_hiddens" and "boundary" (eq. 2's
    inputs), and the Echo-on logits at the supervised positions as "logits_on" [B, P, V] (padding slots:
    where targets is IGNORE). window=False: the Echo-on pass over every position even where
    uses_answer_window(cfg) (the same loss; diagnostics see every answer token's injection).

    packing (data.Packing, --pack): tokens/labels are packed rows (data.pack_micro_batch); `supervised` stays
    the padded layout's (per example, in its own positions). Attention stays inside each example, positions
    restart per example; logits are read per example at its own answer positions ([B, P], as unpacked), and z,
    δ, M are per example. The answer window works on packed rows: one window row per example, reading the
    packed Echo-off pass's residual stream and its own prompt's keys/values (`packed_window`).
    block_mask (with packing, --pack-attention flex): model.document_block_mask(packing.documents), built once
    per micro-batch by the caller; every pass over the packed rows attends through flex_attention with it (the
    answer window's rows keep their SDPA mask: one row per example, nothing to skip).

    Returns (loss, sums): loss = eq. 11 / normalizer (for backward); sums = detached [3] tensor
    (Σ CE_off, Σ CE_on, τ² Σ KL) over this micro-batch's answer tokens (zeros for a skipped pass).
    """
    if echo is not None and (echo.n_layers != model.args.n_layers or echo.dim != model.args.dim):
        raise ValueError(f"EchoModule was built for n_layers={echo.n_layers}, dim={echo.dim}; the model has "
                         f"n_layers={model.args.n_layers}, dim={model.args.dim}")
    if packing is not None and supervised is None:
        raise ValueError("echo_loss with packing needs supervised= (echo.supervision of the padded labels)")
    if block_mask is not None and packing is None:
        raise ValueError("echo_loss with block_mask needs packing= (it is the packed rows' document mask)")
    index, targets, boundary = supervision(labels) if supervised is None else supervised
    normalizer = (targets != IGNORE).sum().clamp_min(1) if normalizer is None else normalizer
    positions = model.positions_for(tokens, attention_mask) if packing is None else packing.positions
    kw = dict(positions=positions, attention_mask=attention_mask)
    if packing is not None:
        kw.update(documents=packing.documents, block_mask=block_mask)
    n_layers = model.args.n_layers
    split = 0 if echo is None or echo.cfg.separate_passes else echo.cfg.target_layers[0]
    sources = echo.cfg.source_layers if echo is not None else ()
    window = routed and echo is not None and (uses_answer_window(echo.cfg) if window is None else window)
    hiddens, keys = {}, {} if window else None

    h_split = model.embed(tokens)
    if split > 0:
        h_split = model.run_layers(h_split, 0, split, hidden_layers=sources, hiddens=hiddens, **kw)
    h_off = model.run_layers(h_split, split, n_layers, hidden_layers=sources, hiddens=hiddens, keys=keys, **kw)
    off_sum, logits_off = model.head_loss(*at_answers(h_off, index, packing), targets)
    if not routed:
        zero = torch.zeros((), device=off_sum.device)
        return echo_objective(off_sum, None, None, False) / normalizer, torch.stack([off_sum.detach(), zero, zero])

    source_hiddens = [hiddens[l] for l in sources]
    if window and packing is not None:
        h_on, on_index = packed_window(model, echo, packing, h_split, keys, labels, (index, targets, boundary),
                                       split, source_hiddens, record)
    elif window:
        T, P = tokens.shape[1], index.shape[1]
        slots = boundary[:, None] + torch.arange(P, device=tokens.device)        # t*_b … t*_b + P − 1
        inside = slots < T                                # slots past the row's end: never supervised
        slots = slots.clamp_max(T - 1)
        with torch.autocast(tokens.device.type, enabled=False):     # the Echo weights stay fp32 (eqs. 2-8)
            inject = echo(source_hiddens, boundary, torch.where(inside, labels.gather(1, slots), IGNORE))
        record_into(record, inject, source_hiddens, boundary)
        real = inside if attention_mask is None else attention_mask.bool().gather(1, slots) & inside
        prompt = PromptKV(keys, window_attention_mask(boundary, T, real, attention_mask))
        h_window = h_split.gather(1, slots[..., None].expand(-1, -1, h_split.shape[-1]))
        h_on = model.run_layers(h_window, split, n_layers, positions=positions.gather(1, slots),
                                echo_inject=inject, prompt=prompt)
        on_index = torch.where(targets != IGNORE, index - boundary[:, None], 0)   # the same positions, in the window
    else:
        t_star, rows = (boundary, None) if packing is None else (packing.example_start + boundary, packing.example_row)
        with torch.autocast(tokens.device.type, enabled=False):
            inject = echo(source_hiddens, t_star, labels, attention_mask, rows=rows, documents=kw.get("documents"))
        record_into(record, inject, source_hiddens, t_star)
        h_on = model.run_layers(h_split, split, n_layers, echo_inject=inject, **kw)
        h_on, on_index = at_answers(h_on, index, packing)
    on_sum, logits_on = model.head_loss(h_on, on_index, targets)
    if record is not None:
        record["logits_on"] = logits_on
    kd_sum, _ = masked_kl(logits_on, logits_off, valid=targets != IGNORE, tau=echo.cfg.tau, reduction="sum")
    loss = echo_objective(off_sum, on_sum, kd_sum, True, echo.cfg.lambda_kd) / normalizer     # eq. 11
    return loss, torch.stack([off_sum.detach(), on_sum.detach(), kd_sum.detach()])


def at_answers(h, index, packing=None):
    """(h, logits index) for Transformer.head_loss: the padded layout's rows and index as they are; packed rows
    (--pack) -> each example's hidden states at its own answer positions [B, P, D] (index None: all of them)."""
    return (h, index) if packing is None else (packing.per_example(h, index), None)


def packed_window(model, echo, packing, h_split, keys, labels, supervised, split, source_hiddens, record):
    """The answer-window Echo-on pass (see echo_loss) on packed rows, with one window row per example, as in
    the padded layout: example i's slots t*_i … t*_i + P − 1 of its own positions, read from the packed
    Echo-off pass (the residual stream at the split layer; the keys/values of the example's own prompt,
    nothing of the examples beside it). -> (h_on [B, P, D], the answer positions in the window)."""
    index, targets, boundary = supervised
    B, P = index.shape
    L = packing.documents.shape[1]
    local = boundary[:, None] + torch.arange(P, device=index.device)                 # t*_i … t*_i + P − 1
    inside = local < packing.example_length[:, None]        # slots past the example's end: never supervised
    flat = packing.flat(torch.minimum(local, packing.example_length[:, None] - 1))
    t_star = packing.example_start + boundary                                        # in the packed row
    with torch.autocast(labels.device.type, enabled=False):
        inject = echo(source_hiddens, t_star, torch.where(inside, labels.flatten()[flat], IGNORE),
                      rows=packing.example_row)
    record_into(record, inject, source_hiddens, t_star)
    own = packing.documents[packing.example_row] == torch.arange(B, device=index.device)[:, None]    # [B, L]
    kv = {layer: (k[packing.example_row], v[packing.example_row]) for layer, (k, v) in keys.items()}
    prompt = PromptKV(kv, window_attention_mask(t_star, L, inside, own))
    h_on = model.run_layers(h_split.flatten(0, 1)[flat], split, model.args.n_layers,
                            positions=packing.positions.flatten()[flat], echo_inject=inject, prompt=prompt)
    return h_on, torch.where(targets != IGNORE, index - boundary[:, None], 0)


def record_into(record, inject, source_hiddens, boundary):
    """echo_loss's `record`: keep the injection (recording its norms) and what z (eq. 2) is made of."""
    if record is not None:
        inject.norms = record.setdefault("norms", {})
        record.update(inject=inject, source_hiddens=source_hiddens, boundary=boundary)


# ----------------------------------------------------------------------------- I/O

def save_echo(echo, out_dir, tensors=None):
    """out_dir/echo.safetensors (fp32 weights) + out_dir/echo_config.json. Analysis only, never for inference.
    tensors: its fp32 weights taken earlier (a checkpoint written while training goes on)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in echo.state_dict().items()}
    tmp = out_dir / "echo.safetensors.tmp"
    save_file(tensors, str(tmp))
    publish(tmp, out_dir / "echo.safetensors")         # the umask's mode (safetensors writes 0600), then rename
    tmp = out_dir / "echo_config.json.tmp"
    tmp.write_text(json.dumps(echo.config_dict(), indent=2))
    os.replace(tmp, out_dir / "echo_config.json")


def load_echo(in_dir, device="cpu"):
    """Rebuild an EchoModule from save_echo's output."""
    from safetensors.torch import load_file
    in_dir = Path(in_dir)
    for name in ("echo_config.json", "echo.safetensors"):
        if not (in_dir / name).exists():
            raise FileNotFoundError(f"no {name} in {in_dir}")
    meta = json.loads((in_dir / "echo_config.json").read_text())
    c = meta["echo"]
    unknown = sorted(set(c) - set(FIELDS))
    if unknown:
        raise ValueError(f"{in_dir / 'echo_config.json'}: unknown Echo option(s) {unknown} (written by another version?)")
    cfg = EchoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    echo = EchoModule(cfg, n_layers=meta["n_layers"], dim=meta["dim"], out_dims=meta["out_dims"],
                      in_dims=meta.get("in_dims"))
    tensors = load_file(str(in_dir / "echo.safetensors"))
    expected = echo.state_dict()
    if set(tensors) != set(expected):
        raise ValueError(f"{in_dir / 'echo.safetensors'}: keys do not match echo_config.json "
                         f"(missing {sorted(set(expected) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(expected))[:3]})")
    echo.load_state_dict(tensors)
    return echo.to(device)
