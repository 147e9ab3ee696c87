"""Echo-LoRA: training-time deep→shallow echo injection for LoRA / DoRA fine-tuning.

Notation: B batch, T sequence, V vocabulary, D model dim. Labels are "unshifted" (aligned with the
input ids, prompt and padding = -100), so the logit at position t predicts token t+1 and the
supervised logit positions are A = {t : y[t+1] != -100}.

One training step (train.py, or `echo_loss` below, which does all of it):
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
"""
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.model import ATTENTION_MODULES, FFN_MODULES, EchoInject, canonical_module

IGNORE = -100
MODULES = ATTENTION_MODULES + FFN_MODULES


@dataclass(frozen=True)
class EchoConfig:
    """Echo hyper-parameters (defaults = the paper's main setting).

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
    target_layers: tuple = (4, 5, 6, 7)
    target_modules: tuple = ("wq", "wv")
    source_layers: tuple = (-8, -7, -6, -5)
    bottleneck: int = 64
    gate_bias_init: float = -2.0        # b in eq. 5: the gate starts mostly closed (σ(-2) ≈ 0.12)
    lambda_init: float = 0.1            # λ in eq. 6 (see above: must be ≠ 0)
    norm: str = "layernorm"             # eq. 3: "layernorm" | "rms"
    norm_eps: float = 1e-5
    answer_only: bool = True            # eq. 8; False = "w/o answer-only masking" ablation
    p_start: float = 1.0                # eq. 10; p_start = p_end = 1 = routing off (always Echo-on)
    p_end: float = 0.2
    tau: float = 2.0                    # eq. 12
    lambda_kd: float = 1.0              # eq. 11
    allow_any_depth: bool = False       # True allows deep→deep / shallow→shallow ablations
    seed: int = 0                       # router seed; must be identical on every rank

    def resolve(self, n_layers):
        """Validated copy with non-negative, sorted layers and canonical module names."""
        def layers(name, values):
            values = tuple(values)
            if not values:
                raise ValueError(f"Echo {name} is empty")
            out = []
            for l in values:
                if not isinstance(l, int) or isinstance(l, bool):
                    raise ValueError(f"Echo {name}: layer {l!r} is not an int")
                if not -n_layers <= l < n_layers:
                    raise ValueError(f"Echo {name}: layer {l} out of range for a {n_layers}-layer model")
                out.append(l % n_layers)
            if len(set(out)) != len(out):
                raise ValueError(f"Echo {name} {values} has duplicates (after resolving negatives)")
            return tuple(sorted(out))

        targets = layers("target_layers", self.target_layers)
        sources = layers("source_layers", self.source_layers)
        if isinstance(self.target_modules, str):
            raise ValueError(f"Echo target_modules must be a sequence of names, got the string {self.target_modules!r}")
        if not self.target_modules:
            raise ValueError("Echo target_modules is empty")
        try:
            modules = tuple(dict.fromkeys(canonical_module(m) for m in self.target_modules))
        except ValueError as e:
            raise ValueError(f"Echo target_modules: {e}") from None
        if not self.allow_any_depth and min(sources) <= max(targets):
            raise ValueError(f"Echo source layers {sources} must all be deeper than every target layer "
                             f"{targets} (set allow_any_depth=True for the deep→deep / shallow→shallow ablations)")
        if self.norm not in ("layernorm", "rms"):
            raise ValueError(f"Echo norm must be 'layernorm' or 'rms', got {self.norm!r}")
        if self.bottleneck < 1:
            raise ValueError(f"Echo bottleneck must be >= 1, got {self.bottleneck}")
        for name in ("p_start", "p_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Echo {name} must be in [0, 1], got {getattr(self, name)}")
        if self.tau <= 0:
            raise ValueError(f"Echo tau must be > 0, got {self.tau}")
        return replace(self, target_layers=targets, source_layers=sources, target_modules=modules)


# ----------------------------------------------------------------------------- eq. 2

def answer_boundary(labels):
    """t*_b = last prompt position = first answer position - 1, for labels [B, T] → LongTensor [B].

    Raises if a sample has no answer token, or its first token is already supervised (no prompt,
    t* would be -1): both would otherwise silently read the wrong hidden state.
    """
    answer = labels != IGNORE
    has_answer = answer.any(dim=1)
    if not bool(has_answer.all()):
        bad = (~has_answer).nonzero()[0].item()
        raise ValueError(f"sample {bad} of the batch has no answer token (all labels are {IGNORE}); "
                         f"Echo needs an answer boundary — drop such samples before training")
    first = answer.int().argmax(dim=1)          # index of the first True
    if not bool((first > 0).all()):
        bad = (first == 0).nonzero()[0].item()
        raise ValueError(f"sample {bad} of the batch is supervised from position 0: no prompt token, "
                         f"so there is no answer boundary t* (eq. 2)")
    return first - 1


def aggregate_sources(hiddens, t_star):
    """eq. 2: z_b = mean_l sg(h_l[b, t*_b]) over the source layers. hiddens: list of [B, T, D]."""
    if len(hiddens) == 0:
        raise ValueError("aggregate_sources got no source hidden states")
    idx = t_star.to(hiddens[0].device)[:, None, None].expand(-1, 1, hiddens[0].shape[-1])
    at_boundary = torch.stack([h.detach().gather(1, idx)[:, 0] for h in hiddens])    # [L, B, D]
    return at_boundary.to(torch.promote_types(at_boundary.dtype, torch.float32)).mean(dim=0)   # ≥ fp32


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
    W/U keep nn.Linear's init (uniform ±1/sqrt(fan_in)), b = gate_bias_init, λ = lambda_init ≠ 0:
    with a zero W2 (LoRA-B style) W1 and U1, U2 would get no gradient at step 1; with λ = 0, none
    of them would. With both non-zero every Echo weight gets a gradient on the first routed step.
    """

    def __init__(self, d_in, d_out, *, bottleneck=64, gate_bias_init=-2.0, lambda_init=0.1,
                 norm="layernorm", norm_eps=1e-5):
        super().__init__()
        self.norm, self.norm_eps = norm, norm_eps
        self.W1 = nn.Linear(d_in, bottleneck, bias=False)
        self.W2 = nn.Linear(bottleneck, d_out, bias=False)
        self.U1 = nn.Linear(d_in, bottleneck, bias=False)
        self.U2 = nn.Linear(bottleneck, d_out, bias=False)
        self.b = nn.Parameter(torch.full((d_out,), float(gate_bias_init)))
        self.lam = nn.Parameter(torch.tensor(float(lambda_init)))

    def forward(self, z):
        z_bar = echo_norm(z.to(self.b.dtype), self.norm, self.norm_eps)     # eq. 3
        e = self.W2(torch.tanh(self.W1(z_bar)))                              # eq. 4
        g = torch.sigmoid(self.U2(torch.tanh(self.U1(z_bar))) + self.b)      # eq. 5
        return self.lam * (e * g)                                            # eq. 6


# ----------------------------------------------------------------------------- eq. 8

def answer_mask(labels, answer_only=True, attention_mask=None):
    """eq. 8: M_{b,t} = [y_{b,t} != -100] → bool [B, T].

    answer_only=False (ablation): every real token (attention_mask True; all positions when no
    attention_mask is given). Padding is excluded whenever an attention_mask is given (train.py gives
    none: with right padding, padded positions cannot influence real tokens under causal attention).
    Note: eq. 8 marks the answer *tokens*; the boundary position t* (whose logit predicts the first
    answer token) is a prompt position and is not injected.
    """
    if answer_only:
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


class EchoModule(nn.Module):
    """All injectors of a run: `EchoModule(cfg, model.args)`; `echo(z, labels, attention_mask)` → EchoInject.

    Training-time only: it is never needed for inference and is saved apart from the adapter.
    Keep it in fp32 even with a bf16 model (z is cast to the Echo weights' dtype).
    """

    def __init__(self, cfg, args=None, *, n_layers=None, dim=None, out_dims=None):
        super().__init__()
        if args is not None:
            n_layers, dim = args.n_layers, args.dim
        self.cfg = cfg.resolve(n_layers)
        self.n_layers, self.dim = n_layers, dim
        if out_dims is None:
            out_dims = {m: module_out_dim(args, m) for m in self.cfg.target_modules}
        self.out_dims = dict(out_dims)
        c = self.cfg
        self.injectors = nn.ModuleDict({
            self.key(l, m): EchoInjector(dim, self.out_dims[m], bottleneck=c.bottleneck,
                                         gate_bias_init=c.gate_bias_init, lambda_init=c.lambda_init,
                                         norm=c.norm, norm_eps=c.norm_eps)
            for l in c.target_layers for m in c.target_modules})

    @staticmethod
    def key(layer, module):
        return f"{layer}_{module}"      # ModuleDict keys may not contain "."

    def deltas(self, z):
        """eqs. 3-6 for every (layer, module): {(layer, module): δ [B, d_out]} (fp32)."""
        return {(l, m): self.injectors[self.key(l, m)](z)
                for l in self.cfg.target_layers for m in self.cfg.target_modules}

    def forward(self, z, labels, attention_mask=None):
        """z [B, D] (eq. 2) → EchoInject(deltas=fp32 δ per (layer, module), mask=bool M (eq. 8)).

        The model casts δ and M to each module's output dtype when it adds them (eq. 7).
        """
        if tuple(z.shape) != (labels.shape[0], self.dim):
            raise ValueError(f"Echo z has shape {list(z.shape)}, expected [{labels.shape[0]}, {self.dim}]")
        return EchoInject(deltas=self.deltas(z), mask=answer_mask(labels, self.cfg.answer_only, attention_mask))

    def config_dict(self):
        return {"echo": asdict(self.cfg), "n_layers": self.n_layers, "dim": self.dim,
                "out_dims": self.out_dims}


# ----------------------------------------------------------------------------- eqs. 9-10

class Router:
    """Per-optimizer-step Bernoulli router (eqs. 9-10) on a CPU torch.Generator.

    Call `router(k)` exactly once per optimizer step k = 0 … K-1 (the same on every micro-batch
    of that step: cache the result). Every rank builds it with the same seed, so all ranks draw the
    same r_k and skip (or run) the Echo-on pass together. No GPU sync: the draw is on CPU.
    """

    def __init__(self, p_start=1.0, p_end=0.2, total_steps=1, seed=0):
        if total_steps < 1:
            raise ValueError(f"Router total_steps must be >= 1, got {total_steps}")
        for name, p in (("p_start", p_start), ("p_end", p_end)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Router {name} must be in [0, 1], got {p}")
        self.p_start, self.p_end, self.total_steps = float(p_start), float(p_end), int(total_steps)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.draws = 0

    def p(self, k):
        """eq. 10: p_k = p_start + k/(K-1) (p_end - p_start); K = 1 → p_start; k clamped to [0, K-1]."""
        if self.total_steps == 1:
            return self.p_start
        k = min(max(int(k), 0), self.total_steps - 1)
        return self.p_start + k / (self.total_steps - 1) * (self.p_end - self.p_start)

    def __call__(self, k):
        """eq. 9: r_k ~ Bernoulli(p_k) → bool. u ∈ [0, 1), so p = 1 always routes and p = 0 never."""
        self.draws += 1
        return bool(torch.rand((), generator=self.generator).item() < self.p(k))

    def state_dict(self):
        return {"p_start": self.p_start, "p_end": self.p_end, "total_steps": self.total_steps,
                "draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.p_start, self.p_end = state["p_start"], state["p_end"]
        self.total_steps, self.draws = state["total_steps"], state["draws"]
        self.generator.set_state(state["generator"])


def make_router(cfg, total_steps):
    return Router(cfg.p_start, cfg.p_end, total_steps, cfg.seed)


# ----------------------------------------------------------------------------- eq. 12

def supervised_index(labels):
    """Supervised logit positions of unshifted labels [B, T]: A_b = {t : y[b, t+1] != -100}.

    Returns (index [B, P], targets [B, P]) with P = max_b |A_b|: index holds the positions (pass it
    as the model's logits_index), targets the tokens they predict; rows shorter than P are padded
    with index 0 and target -100 (ignored by cross_entropy and by masked_kl's `valid`).
    """
    B, T = labels.shape
    sup = labels[:, 1:] != IGNORE                                   # [B, T-1]
    counts = sup.sum(dim=1)
    P = int(counts.max()) if B and T > 1 else 0
    pos = torch.arange(T - 1, device=labels.device).expand(B, -1)
    order = torch.where(sup, pos, pos + T).argsort(dim=1)[:, :P]    # supervised positions first, in order
    valid = torch.arange(P, device=labels.device)[None, :] < counts[:, None]
    index = torch.where(valid, order, torch.zeros_like(order))
    targets = torch.where(valid, labels.gather(1, index + 1), torch.full_like(index, IGNORE))
    return index, targets


def masked_kl(logits_on, logits_off, labels=None, *, valid=None, tau=2.0, reduction="mean"):
    """eq. 12: L_kd = τ²/|A| Σ_{t∈A} KL(q_on ‖ q_off),  q = softmax(logits / τ), q_on detached.

    KL(q_on ‖ q_off) = Σ_v q_on(v) (log q_on(v) - log q_off(v)); the Echo-on distribution is the
    (detached) teacher, so the gradient flows into logits_off only.
      * full logits [B, T, V] + unshifted labels [B, T]: A = {(b, t) : labels[b, t+1] != -100};
      * gathered logits [N, V] (or [B, P, V] with `valid` [B, P] bool): A = all (valid) rows.
    reduction "mean" → scalar τ²/|A| Σ KL (0 when |A| = 0);
              "sum"  → (τ² Σ KL, |A|), so callers can normalise over micro-batches / ranks.
    Computed in fp32.
    """
    if logits_on.shape != logits_off.shape:
        raise ValueError(f"masked_kl: logits shapes differ {list(logits_on.shape)} vs {list(logits_off.shape)}")
    V = logits_on.shape[-1]
    if labels is not None:
        if labels.shape != logits_on.shape[:-1]:
            raise ValueError(f"masked_kl: labels shape {list(labels.shape)} != logits shape {list(logits_on.shape[:-1])}")
        sel = labels[:, 1:] != IGNORE
        on, off = logits_on[:, :-1][sel], logits_off[:, :-1][sel]
    elif valid is not None:
        on, off = logits_on[valid], logits_off[valid]
    else:
        on, off = logits_on.reshape(-1, V), logits_off.reshape(-1, V)
    log_q_on = F.log_softmax(on.detach().float() / tau, dim=-1)
    log_q_off = F.log_softmax(off.float() / tau, dim=-1)
    kl_sum = tau ** 2 * (log_q_on.exp() * (log_q_on - log_q_off)).sum()
    count = on.shape[0]
    if reduction == "sum":
        return kl_sum, count
    if reduction == "mean":
        return kl_sum / max(count, 1)
    raise ValueError(f"masked_kl reduction must be 'mean' or 'sum', got {reduction!r}")


# ----------------------------------------------------------------------------- eq. 11

def echo_objective(loss_off, loss_on, loss_kd, routed, lambda_kd=1.0):
    """eq. 11: L = L_off + r (L_on + λ_kd L_kd). When r = 0 loss_on / loss_kd may be None (pass skipped)."""
    if not routed:
        return loss_off
    return loss_off + loss_on + lambda_kd * loss_kd


def echo_loss(model, echo, tokens, labels, attention_mask=None, *, routed, normalizer=None,
              index=None, targets=None, boundary=None, share_lower_layers=True):
    """One micro-batch of Echo-LoRA training (eqs. 2-12), sharing the layers below the first target.

    Both passes are identical below min(target layers) (no injection there), so those layers run
    once and the Echo-off / Echo-on passes branch from their output (with LoRA dropout this means
    both passes share one dropout draw in the lower layers). Logits are computed only at the
    supervised positions. Losses are summed over answer tokens and divided by `normalizer`
    (default: this micro-batch's answer-token count; pass the count over all micro-batches and
    ranks of the optimizer step for exact token-level averaging).

    index / targets / boundary: the supervised positions [B,P], their targets [B,P] (-100 padded)
    and t* [B], precomputed on the host (train.py does, with P bucketed, so the step has no
    host-device sync and few shapes); computed and validated here when omitted.
    share_lower_layers=False runs both passes from the embedding (separate dropout draws).

    Returns (loss, stats) with stats = {"loss_off", "loss_on", "loss_kd": per-token means (detached,
    on device; loss_on / loss_kd are None when not routed), "sum_off", "sum_on", "sum_kd": the same
    as sums over answer tokens, "n_answer": token count (tensor)}.
    """
    cfg = echo.cfg
    if echo.n_layers != model.args.n_layers or echo.dim != model.args.dim:
        raise ValueError(f"EchoModule was built for n_layers={echo.n_layers}, dim={echo.dim}; the model has "
                         f"n_layers={model.args.n_layers}, dim={model.args.dim}")
    if index is None:
        t_star = answer_boundary(labels)    # validate every micro-batch, routed or not
        index, targets = supervised_index(labels)
    else:
        t_star = boundary
    valid = targets != IGNORE
    n = valid.sum()
    norm = n.clamp_min(1) if normalizer is None else normalizer
    kw = dict(positions=model.positions_for(tokens, attention_mask), attention_mask=attention_mask)
    split = cfg.target_layers[0] if share_lower_layers else 0
    sources = cfg.source_layers
    hiddens = {}

    def ce_sum(logits):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    h = model.run_layers(model.embed(tokens), 0, split, hidden_layers=sources, hiddens=hiddens, **kw)
    h_off = model.run_layers(h, split, model.args.n_layers, hidden_layers=sources, hiddens=hiddens, **kw)
    logits_off = model.head(h_off, logits_index=index)
    off_sum = ce_sum(logits_off)
    stats = {"loss_off": off_sum.detach() / n.clamp_min(1), "loss_on": None, "loss_kd": None, "n_answer": n,
             "sum_off": off_sum.detach(), "sum_on": None, "sum_kd": None}
    if not routed:
        return echo_objective(off_sum, None, None, False) / norm, stats

    z = aggregate_sources([hiddens[l] for l in sources], t_star)                       # eq. 2
    with torch.autocast(tokens.device.type, enabled=False):     # the Echo weights stay fp32 (eqs. 3-6)
        inject = echo(z, labels, attention_mask)                                      # eqs. 3-8
    h_start = h if share_lower_layers else model.embed(tokens)
    h_on = model.run_layers(h_start, split, model.args.n_layers, echo_inject=inject, **kw)
    logits_on = model.head(h_on, logits_index=index)
    on_sum = ce_sum(logits_on)
    kd_sum, _ = masked_kl(logits_on, logits_off, valid=valid, tau=cfg.tau, reduction="sum")   # eq. 12
    stats.update(loss_on=on_sum.detach() / n.clamp_min(1), loss_kd=kd_sum.detach() / n.clamp_min(1),
                 sum_on=on_sum.detach(), sum_kd=kd_sum.detach())
    return echo_objective(off_sum, on_sum, kd_sum, True, cfg.lambda_kd) / norm, stats         # eq. 11


# ----------------------------------------------------------------------------- I/O

def save_echo(echo, out_dir):
    """out_dir/echo.safetensors (fp32 weights) + out_dir/echo_config.json. Analysis only, never for inference."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in echo.state_dict().items()}
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False).name
    save_file(tensors, tmp)
    os.replace(tmp, out_dir / "echo.safetensors")
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
    cfg = EchoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    echo = EchoModule(cfg, n_layers=meta["n_layers"], dim=meta["dim"], out_dims=meta["out_dims"])
    tensors = load_file(str(in_dir / "echo.safetensors"))
    expected = echo.state_dict()
    if set(tensors) != set(expected):
        raise ValueError(f"{in_dir / 'echo.safetensors'}: keys do not match echo_config.json "
                         f"(missing {sorted(set(expected) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(expected))[:3]})")
    echo.load_state_dict(tensors)
    return echo.to(device)
