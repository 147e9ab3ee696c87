"""Echo-LoRA (echo/): one test per equation 2-12 against values computed independently here
(plain loops, dense fp64 algebra), plus gradient flow, router statistics, bad input and I/O."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from echo import (EchoConfig, EchoInjector, EchoModule, Router, aggregate_sources, answer_mask, echo_loss,
                  echo_norm, echo_objective, load_echo, masked_kl, routing_probability, save_echo, supervision)
from model.model import ModelArgs, Transformer

N_LAYERS = 4
# small but non-trivial: 2 targets (shallow), 2 sources (deep), both default modules
CFG = EchoConfig(target_layers=(0, 1), source_layers=(-2, -1), bottleneck=8)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=64, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                               max_seq_len=64, adapter="lora", lora_rank=4, lora_dropout=0.0), **kw})
    model = Transformer(args)
    with torch.no_grad():   # non-zero B so the LoRA branch is live in the manual recomputations
        for m in model.adapter_linears():
            m.lora_b.normal_(0.0, 0.05)
    return model


def batch(seed=0):
    """3 right-padded samples: (length, prompt length) = (10, 3), (8, 4), (6, 2)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 10
    tokens = torch.randint(1, 97, (B, T), generator=g)
    attn = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100)
    for b, (length, prompt) in enumerate([(10, 3), (8, 4), (6, 2)]):
        tokens[b, length:] = 0
        attn[b, :length] = True
        labels[b, prompt:length] = tokens[b, prompt:length]
    return tokens, labels, attn


# ----------------------------------------------------------------------------- config / bad input

def test_config_resolve_and_validation():
    c = EchoConfig(target_modules=("q_proj", "v_proj")).resolve(32)
    assert c.target_modules == ("wq", "wv")
    assert c.source_layers == (24, 25, 26, 27) and c.target_layers == (4, 5, 6, 7)
    with pytest.raises(ValueError, match=r"--echo-targets \(target_layers\): layer 8 out of range"):
        EchoConfig(target_layers=(7, 8), source_layers=(-1,)).resolve(8)
    with pytest.raises(ValueError, match=r"--echo-sources \(source_layers\): layer -9 out of range"):
        EchoConfig(target_layers=(0,), source_layers=(-9,)).resolve(8)
    with pytest.raises(ValueError, match="unknown module 'qq_proj'"):
        EchoConfig(target_modules=("qq_proj",)).resolve(32)
    with pytest.raises(ValueError, match=r"source_layers\) is empty"):
        EchoConfig(source_layers=()).resolve(32)
    with pytest.raises(ValueError, match=r"target_modules\) is empty"):
        EchoConfig(target_modules=()).resolve(32)
    with pytest.raises(ValueError, match="duplicates"):
        EchoConfig(source_layers=(31, -1)).resolve(32)
    # default sources (-8..-5 = 4..7 of 12 layers) overlap the targets: rejected unless allowed
    with pytest.raises(ValueError, match="deeper than every target"):
        EchoConfig().resolve(12)
    shallow = EchoConfig(source_layers=(0, 1, 2, 3), any_depth=True).resolve(12)   # shallow→shallow
    assert shallow.source_layers == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="p_end"):
        EchoConfig(p_end=1.5).resolve(32)
    with pytest.raises(ValueError, match="norm"):
        EchoConfig(norm="batch").resolve(32)


def test_bad_labels_raise():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])
    with pytest.raises(ValueError, match="sample 1 .* no answer token"):
        supervision(labels)
    with pytest.raises(ValueError, match="sample 0 .* position 0"):
        supervision(torch.tensor([[4, 5, -100, -100]]))
    # echo_loss validates on every micro-batch, routed or not (no silent t* = -1)
    model = tiny_model()
    tokens, labels, attn = batch()
    labels[1] = -100
    echo = EchoModule(CFG, model.args)
    for routed in (True, False):
        with pytest.raises(ValueError, match="sample 1 .* no answer token"):
            echo_loss(model, echo, tokens, labels, attention_mask=attn, routed=routed)
    with pytest.raises(ValueError, match="n_layers=4"):
        echo_loss(tiny_model(n_layers=5), echo, tokens, labels, attention_mask=attn, routed=True)


# ----------------------------------------------------------------------------- eq. 2

def test_eq2_boundary_and_aggregation():
    tokens, labels, attn = batch()
    t_star = supervision(labels)[2]
    expected = []
    for row in labels.tolist():
        first = next(t for t, y in enumerate(row) if y != -100)
        expected.append(first - 1)
    assert t_star.tolist() == expected == [2, 3, 1]

    torch.manual_seed(1)
    hs = [torch.randn(3, 10, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    z = aggregate_sources(hs, t_star)
    for b in range(3):
        manual = sum(h[b, expected[b]].detach() for h in hs) / 3
        assert torch.allclose(z[b], manual, atol=1e-12)
    assert not z.requires_grad          # stop-gradient

    # through the model: negative source layers read the right residual stream
    model = tiny_model()
    _, hid = model(tokens, attn, hidden_layers=(-2, -1))
    _, hid_pos = model(tokens, attn, hidden_layers=(2, 3))
    assert all(torch.equal(a, b) for a, b in zip(hid, hid_pos))


# ----------------------------------------------------------------------------- eqs. 3-6

def test_eq3_norm():
    torch.manual_seed(0)
    z = torch.randn(4, 16) * 3 + 1
    z64 = z.double()
    for b in range(4):
        mu = sum(z64[b].tolist()) / 16
        var = sum((x - mu) ** 2 for x in z64[b].tolist()) / 16
        ln = [(x - mu) / math.sqrt(var + 1e-5) for x in z64[b].tolist()]
        rms = math.sqrt(sum(x * x for x in z64[b].tolist()) / 16 + 1e-5)
        assert torch.allclose(echo_norm(z, "layernorm")[b].double(), torch.tensor(ln, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(echo_norm(z, "rms")[b].double(), z64[b] / rms, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rms"])
def test_eqs4_to_6_injector(norm):
    torch.manual_seed(0)
    inj = EchoInjector(16, 12, bottleneck=5, gate_bias_init=-2.0, lambda_init=0.1, norm=norm)
    assert torch.all(inj.b == -2.0) and inj.lam.item() == pytest.approx(0.1)
    z = torch.randn(3, 16) * 2
    delta = inj(z)
    W1, W2 = inj.W1.weight.double(), inj.W2.weight.double()
    U1, U2, b, lam = inj.U1.weight.double(), inj.U2.weight.double(), inj.b.double(), inj.lam.double()
    for i in range(3):
        zi = z[i].double()
        if norm == "layernorm":
            zb = (zi - zi.mean()) / torch.sqrt(((zi - zi.mean()) ** 2).mean() + 1e-5)   # eq. 3
        else:
            zb = zi / torch.sqrt((zi ** 2).mean() + 1e-5)
        e = W2 @ torch.tanh(W1 @ zb)                                        # eq. 4
        g = 1 / (1 + torch.exp(-(U2 @ torch.tanh(U1 @ zb) + b)))            # eq. 5
        assert torch.allclose(delta[i].double(), lam * e * g, atol=1e-6)   # eq. 6


def test_module_shapes_and_aliases():
    model = tiny_model()
    a = model.args
    echo = EchoModule(EchoConfig(target_layers=(0,), source_layers=(-1,), target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")), a)
    z = torch.randn(2, a.dim)
    d = echo.deltas(z)
    expect = {"wq": a.n_heads * a.head_dim, "wk": a.n_kv_heads * a.head_dim, "wv": a.n_kv_heads * a.head_dim,
              "wo": a.dim, "w1": a.ffn_hidden_dim, "w3": a.ffn_hidden_dim, "w2": a.dim}
    assert {k: v.shape[1] for (_, k), v in d.items()} == expect
    # every one of them is accepted by the model's forward
    tokens, labels, attn = batch()
    model(tokens, attn, echo_inject=echo.inject(torch.randn(3, a.dim), labels, attn))


# ----------------------------------------------------------------------------- eq. 7

def test_eq7_injection_through_model():
    """echo_inject adds exactly M·δ to the wq / wv outputs of the target layers, nothing elsewhere.

    Reference: a plain Echo-off forward where forward hooks on the target modules return the module
    output (re-checked against a manual fp64 LoRA recomputation) + M·δ, with M and δ built by loops.
    """
    model = tiny_model()
    tokens, labels, attn = batch()
    echo = EchoModule(CFG, model.args)
    torch.manual_seed(3)
    z = torch.randn(3, model.args.dim)
    with torch.no_grad():
        on = model(tokens, attn, echo_inject=echo.inject(z, labels, attn))

    checked = []

    def hook(mod, inp, out, key):
        x = inp[0].double()
        lora = mod.scale * (x @ mod.lora_a.double().T) @ mod.lora_b.double().T
        assert torch.allclose(out.double(), x @ mod.weight.double().T + lora, atol=1e-6)   # eq. 1 output o
        delta = echo.injectors[f"{key[0]}_{key[1]}"](z).double()
        add = torch.zeros_like(out, dtype=torch.float64)
        for b in range(out.shape[0]):
            for t in range(out.shape[1]):
                if labels[b, t] != -100:                       # eq. 8
                    add[b, t] = delta[b]
        checked.append(key)
        return (out.double() + add).to(out.dtype)              # eq. 7
    handles = [getattr(model.layers[l].attention, m).register_forward_hook(
               lambda mod, i, o, key=(l, m): hook(mod, i, o, key)) for l in (0, 1) for m in ("wq", "wv")]
    with torch.no_grad():
        ref = model(tokens, attn)
    for h in handles:
        h.remove()
    assert sorted(checked) == [(0, "wq"), (0, "wv"), (1, "wq"), (1, "wv")]
    assert torch.allclose(on, ref, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(on, model(tokens, attn), atol=1e-3)     # the injection is not a no-op


ALL_MODULES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def test_eq7_every_injectable_module_gets_its_own_delta():
    """All seven projections targeted at once: each module's output gains exactly M·δ of its own
    injector (w1 and w3 have the same width, so a mix-up between them only shows here)."""
    model = tiny_model(lora_modules=ALL_MODULES)
    tokens, labels, attn = batch()
    echo = EchoModule(EchoConfig(target_layers=(0, 1), source_layers=(-2, -1), bottleneck=8,
                                 target_modules=ALL_MODULES), model.args)
    torch.manual_seed(4)
    z = torch.randn(3, model.args.dim)
    with torch.no_grad():
        on = model(tokens, attn, echo_inject=echo.inject(z, labels, attn))
    M = (labels != -100).double()[..., None]
    checked = []

    def hook(mod, inp, out, key):
        checked.append(key)
        return (out.double() + M * echo.injectors[f"{key[0]}_{key[1]}"](z).double()[:, None, :]).to(out.dtype)
    handles = []
    for l in (0, 1):
        block = model.layers[l]
        for m in ALL_MODULES:
            parent = block.attention if m in ("wq", "wk", "wv", "wo") else block.feed_forward
            handles.append(getattr(parent, m).register_forward_hook(
                lambda mod, i, o, key=(l, m): hook(mod, i, o, key)))
    with torch.no_grad():
        ref = model(tokens, attn)
    for h in handles:
        h.remove()
    assert sorted(checked) == sorted((l, m) for l in (0, 1) for m in ALL_MODULES)
    torch.testing.assert_close(on, ref, atol=1e-5, rtol=0)


def test_every_flag_reaches_its_config_field():
    """Flags are derived from EchoConfig: give every one a non-default value and read the config back."""
    import argparse
    from dataclasses import fields
    parser = argparse.ArgumentParser()
    EchoConfig.add_flags(parser)
    argv, expected = [], {}
    for f in fields(EchoConfig):
        flag = EchoConfig.flag(f.name)
        if flag is None:
            continue
        d = f.default
        if isinstance(d, bool):
            value, args = (not d), [flag if not d else "--no-" + flag[2:]]
        elif isinstance(d, tuple) and isinstance(d[0], int):
            value = tuple(x + 100 for x in d)
            args = [flag, *map(str, value)]
        elif isinstance(d, tuple):
            value = ("w1", "w3")
            args = [flag, *value]
        elif isinstance(d, str):
            value = "rms" if d == "layernorm" else "layernorm"
            args = [flag, value]
        else:
            value = type(d)(d + 3)
            args = [flag, str(value)]
        argv += args
        expected[f.name] = value
    cfg = EchoConfig.from_flags(parser.parse_args(argv), seed=5)
    assert {k: getattr(cfg, k) for k in expected} == expected and cfg.seed == 5
    assert EchoConfig.from_flags(parser.parse_args([])) == EchoConfig()        # defaults come from the dataclass
    help_text = parser.format_help()
    for f in fields(EchoConfig):
        if EchoConfig.flag(f.name):
            assert EchoConfig.flag(f.name) in help_text and f.metadata["help"].split()[0] in help_text


def test_lambda_zero_gives_identical_logits_and_prompt_positions_untouched():
    model = tiny_model()
    tokens, labels, attn = batch()
    echo = EchoModule(CFG, model.args)
    off, hid = model(tokens, attn, hidden_layers=echo.cfg.source_layers)
    z = aggregate_sources(hid, supervision(labels)[2])
    on = model(tokens, attn, echo_inject=echo.inject(z, labels, attn))
    # the module's own forward (eq. 2 inside) gives the same injection
    assert torch.equal(model(tokens, attn, echo_inject=echo(hid, supervision(labels)[2], labels, attn)), on)
    # masking on: every position before the first answer token is bit-identical (causal + M = 0)
    first = (labels != -100).int().argmax(1)
    for b in range(3):
        assert torch.equal(on[b, :first[b]], off[b, :first[b]])
        assert not torch.allclose(on[b, first[b]:attn[b].sum()], off[b, first[b]:attn[b].sum()])
    with torch.no_grad():
        for inj in echo.injectors.values():
            inj.lam.zero_()
    on0 = model(tokens, attn, echo_inject=echo.inject(z, labels, attn))
    assert torch.equal(on0, off)


def test_answer_only_off_reaches_prompt_positions():
    """Ablation "w/o answer-only masking": prompt positions change too, padding rows are not injected."""
    model = tiny_model()
    tokens, labels, attn = batch()
    echo = EchoModule(EchoConfig(target_layers=(0, 1), source_layers=(-2, -1), bottleneck=8, all_positions=True),
                      model.args)
    z = torch.randn(3, model.args.dim)
    inject = echo.inject(z, labels, attn)
    assert torch.equal(inject.mask, attn)
    with torch.no_grad():
        off, on = model(tokens, attn), model(tokens, attn, echo_inject=inject)
    for b in range(3):
        assert not torch.allclose(on[b, 0], off[b, 0])


# ----------------------------------------------------------------------------- eq. 8

def test_eq8_mask():
    tokens, labels, attn = batch()
    M = answer_mask(labels)
    M_all = answer_mask(labels, all_positions=True, attention_mask=attn)
    for b in range(3):
        for t in range(10):
            assert M[b, t].item() == (labels[b, t].item() != -100)
            assert M_all[b, t].item() == bool(attn[b, t])
    assert answer_mask(labels, all_positions=True).all()
    # the EchoModule passes the same mask to the model
    echo = EchoModule(EchoConfig(target_layers=(0,), source_layers=(-1,), all_positions=True), n_layers=4, dim=64,
                      out_dims={"wq": 64, "wv": 32})
    assert torch.equal(echo.inject(torch.randn(3, 64), labels, attn).mask.bool(), M_all)


# ----------------------------------------------------------------------------- eqs. 9-10

def test_eq10_schedule():
    r = Router(EchoConfig(p_start=1.0, p_end=0.2), total_steps=5)
    assert [r.p(k) for k in range(5)] == pytest.approx([1.0 + k / 4 * (0.2 - 1.0) for k in range(5)])
    assert r.p(0) == 1.0 and r.p(4) == pytest.approx(0.2)
    assert [routing_probability(k, 3, EchoConfig(p_start=0.9, p_end=0.3)) for k in (-1, 0, 1, 2, 7)] == \
        pytest.approx([0.9, 0.9, 0.6, 0.3, 0.3])                       # clamped outside 0 … K-1
    assert Router(EchoConfig(p_start=0.7), total_steps=1).p(0) == 0.7     # K = 1
    always = Router(EchoConfig(p_start=1.0, p_end=1.0), total_steps=50)   # routing off (ablation)
    assert all(always(k) for k in range(50))
    assert not any(Router(EchoConfig(p_start=0.0, p_end=0.0), total_steps=50)(k) for k in range(50))


def test_eq9_router_frequency_seeding_and_resume():
    K = 4000
    r = Router(EchoConfig(p_start=1.0, p_end=0.2, seed=123), total_steps=K)
    draws = [r(k) for k in range(K)]
    ps = [1.0 + k / (K - 1) * (0.2 - 1.0) for k in range(K)]
    sigma = math.sqrt(sum(p * (1 - p) for p in ps)) / K
    assert abs(sum(draws) / K - sum(ps) / K) < 4 * sigma
    # late steps route less often than early ones (the decay is real)
    assert sum(draws[:K // 4]) > sum(draws[-K // 4:])

    a, b = Router(EchoConfig(seed=7), K), Router(EchoConfig(seed=7), K)
    assert [a(k) for k in range(200)] == [b(k) for k in range(200)]
    assert [a(k) for k in range(200)] != [Router(EchoConfig(seed=8), K)(k) for k in range(200)]

    state = a.state_dict()
    cont = [a(k) for k in range(200, 400)]
    resumed = Router(EchoConfig(seed=999), K)
    resumed.load_state_dict(state)
    assert [resumed(k) for k in range(200, 400)] == cont


# ----------------------------------------------------------------------------- eq. 11

def test_eq11_objective():
    off, on, kd = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.5)
    assert echo_objective(off, on, kd, True, 1.0).item() == pytest.approx(2.0 + 3.0 + 0.5)
    assert echo_objective(off, on, kd, True, 0.3).item() == pytest.approx(2.0 + 3.0 + 0.3 * 0.5)
    assert echo_objective(off, None, None, False).item() == 2.0


# ----------------------------------------------------------------------------- eq. 12

@pytest.mark.parametrize("bucket", [1, 4, 16])
def test_supervision_positions_targets_and_boundary(bucket):
    """The one function training uses for A (eq. 12's positions), their targets and t* (eq. 2)."""
    _, labels, _ = batch()
    index, targets, boundary = supervision(labels, bucket=bucket)
    longest = max(sum(labels[b, t + 1] != -100 for t in range(9)) for b in range(3))
    assert index.shape[1] == -(-longest // bucket) * bucket
    for b in range(3):
        pos = [t for t in range(9) if labels[b, t + 1] != -100]
        assert index[b, :len(pos)].tolist() == pos
        assert targets[b, :len(pos)].tolist() == [labels[b, t + 1].item() for t in pos]
        assert (targets[b, len(pos):] == -100).all() and (index[b, len(pos):] == 0).all()
        assert boundary[b].item() == pos[0] == next(t for t in range(10) if labels[b, t] != -100) - 1


def test_eq12_masked_kl_values_and_gradients():
    torch.manual_seed(0)
    _, labels, _ = batch()
    B, T, V, tau = 3, 10, 7, 2.0
    on = torch.randn(B, T, V, requires_grad=True)
    off = torch.randn(B, T, V, requires_grad=True)
    A = [(b, t) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100]
    total = 0.0
    for b, t in A:
        q_on = torch.softmax(on[b, t].double().detach() / tau, 0).tolist()
        q_off = torch.softmax(off[b, t].double().detach() / tau, 0).tolist()
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(q_on, q_off))
    expected = tau ** 2 * total / len(A)

    kd = masked_kl(on, off, labels, tau=tau)
    assert kd.item() == pytest.approx(expected, rel=1e-5)
    # gathered form (what train.py feeds): same value; "sum" mode returns τ²ΣKL and |A|
    index, targets, _ = supervision(labels)
    g_on = on.gather(1, index[..., None].expand(-1, -1, V))
    g_off = off.gather(1, index[..., None].expand(-1, -1, V))
    valid = targets != -100
    assert masked_kl(g_on, g_off, valid=valid, tau=tau).item() == pytest.approx(expected, rel=1e-5)
    s, n = masked_kl(g_on[valid], g_off[valid], tau=tau, reduction="sum")
    assert n == len(A) and s.item() == pytest.approx(expected * len(A), rel=1e-5)

    # gradient: only into the Echo-off logits, d/dlogits_off = τ/|A| (q_off - q_on) on A, 0 elsewhere
    kd.backward()
    assert on.grad is None
    grad = torch.zeros(B, T, V, dtype=torch.float64)
    for b, t in A:
        grad[b, t] = tau / len(A) * (torch.softmax(off[b, t].double().detach() / tau, 0)
                                     - torch.softmax(on[b, t].double().detach() / tau, 0))
    assert torch.allclose(off.grad.double(), grad, atol=1e-6)
    assert masked_kl(on[:0, 0], off[:0, 0]).item() == 0.0     # empty A → 0, no NaN


# ----------------------------------------------------------------------------- the full step

def fp64_echo(cfg=CFG, **model_kw):
    """A tiny fp64 model and Echo module with λ = 5, so L_on and L_kd are far from rounding noise."""
    model = tiny_model(**model_kw).double()
    echo = EchoModule(cfg, model.args).double()
    with torch.no_grad():
        for inj in echo.injectors.values():
            inj.lam.fill_(5.0)
    return model, echo


@pytest.mark.parametrize("window", [True, False])
def test_echo_loss_equals_two_full_passes(window):
    """echo_loss (shared lower layers, gathered logits, and by default an Echo-on pass over the answer
    window only) == eq. 11 from two plain full-sequence model forwards, in fp64."""
    model, echo = fp64_echo(replace(CFG, answer_window=window))
    tokens, labels, attn = batch()
    loss, sums = echo_loss(model, echo, tokens, labels, attention_mask=attn, routed=True)
    n = (labels[:, 1:] != -100).sum().item()

    off, hid = model(tokens, attn, hidden_layers=(2, 3))
    z = sum(h[torch.arange(3), supervision(labels)[2]] for h in hid).detach() / 2
    on = model(tokens, attn, echo_inject=echo.inject(z, labels, attn))
    shift_labels = labels[:, 1:].reshape(-1)
    l_off = F.cross_entropy(off[:, :-1].reshape(-1, 97), shift_labels, ignore_index=-100)
    l_on = F.cross_entropy(on[:, :-1].reshape(-1, 97), shift_labels, ignore_index=-100)
    l_kd = masked_kl(on, off, labels, tau=2.0)
    assert l_kd.item() > 1e-4 and abs(l_on.item() - l_off.item()) > 1e-4     # far from a no-op (fp64 noise ~1e-15)
    assert loss.item() == pytest.approx((l_off + l_on + l_kd).item(), rel=1e-12)
    assert (sums / n).tolist() == pytest.approx([l_off.item(), l_on.item(), l_kd.item()], rel=1e-10)
    assert echo_objective(*(sums / n), True, echo.cfg.lambda_kd).item() == pytest.approx(loss.item(), rel=1e-12)

    loss_skip, sums_skip = echo_loss(model, echo, tokens, labels, attention_mask=attn, routed=False, normalizer=5)
    assert loss_skip.item() == pytest.approx(l_off.item() * n / 5, rel=1e-12)
    assert sums_skip[1:].tolist() == [0.0, 0.0]
    # plain LoRA (no Echo module): the same Echo-off term
    loss_lora, sums_lora = echo_loss(model, None, tokens, labels, attention_mask=attn, routed=False)
    assert loss_lora.item() == pytest.approx(l_off.item(), rel=1e-12) and sums_lora[0] == sums_skip[0]


def gradients(model, echo, loss):
    params = [p for p in [*model.parameters(), *echo.parameters()] if p.requires_grad]
    return torch.autograd.grad(loss, params)


WINDOW_CASES = {                 # (what is varied, the change to the default case)
    "default": {}, "targets from layer 1 (the passes share layer 0)": dict(targets=(1, 2)),
    "answer with a gap": dict(gap=True), "left padding": dict(padding="left"),
    "a padding token inside the answer": dict(mask_gap=True), "P bucketed to 16 (slots past T)": dict(bucket=16),
    "all seven modules": dict(modules=ALL_MODULES), "DoRA": dict(adapter="dora"),
}


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_answer_window_gradients_equal_full_on_pass(case):
    """The Echo-on pass over the answer window (prompt keys/values read from the Echo-off pass) gives the
    same loss and the same gradient in every adapter and Echo weight as recomputing every position."""
    c = {"targets": (0, 1), "gap": False, "padding": "right", "mask_gap": False, "bucket": 1,
         "modules": ("wq", "wv"), "adapter": "lora", **WINDOW_CASES[case]}
    cfg = replace(CFG, target_layers=c["targets"], target_modules=c["modules"],
                  source_layers=(-1,) if c["targets"] == (1, 2) else CFG.source_layers)
    model, echo = fp64_echo(cfg, adapter=c["adapter"], lora_modules=ALL_MODULES)
    if c["adapter"] == "dora":
        model.init_dora_magnitudes()
    tokens, labels, attn = batch(seed=3)
    if c["gap"]:                        # row 0: prompt 0-2, answer 3-9 with position 5 unsupervised
        labels[0, 5] = -100
    if c["mask_gap"]:                   # row 0: position 6, inside the answer, is not a real token
        attn[0, 6], labels[0, 6] = False, -100
    if c["padding"] == "left":          # shift each row right by its padding; positions follow the mask
        for b in range(3):
            k = int((~attn[b]).sum())
            tokens[b], labels[b], attn[b] = tokens[b].roll(k), labels[b].roll(k), attn[b].roll(k)
    supervised = supervision(labels, bucket=c["bucket"])
    if c["bucket"] > 1:
        assert (supervised[2] + supervised[0].shape[1] > labels.shape[1]).any()     # some window runs past T
    window = echo_loss(model, echo, tokens, labels, attention_mask=attn, routed=True, supervised=supervised)[0]
    full_echo = EchoModule(replace(cfg, answer_window=False), model.args).double()
    full_echo.load_state_dict(echo.state_dict())
    full = echo_loss(model, full_echo, tokens, labels, attention_mask=attn, routed=True, supervised=supervised)[0]
    assert window.item() == pytest.approx(full.item(), rel=1e-12)
    for g_window, g_full in zip(gradients(model, echo, window), gradients(model, full_echo, full)):
        torch.testing.assert_close(g_window, g_full, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- I/O

def test_save_load_roundtrip(tmp_path):
    model = tiny_model()
    echo = EchoModule(EchoConfig(target_layers=(0, 1), source_layers=(3,), target_modules=("q_proj", "wo"),
                                 norm="rms", bottleneck=6), model.args)
    save_echo(echo, tmp_path)
    assert (tmp_path / "echo.safetensors").exists() and (tmp_path / "echo_config.json").exists()
    back = load_echo(tmp_path)
    assert back.cfg == echo.cfg
    z = torch.randn(2, 64)
    for k, d in echo.deltas(z).items():
        assert torch.equal(d, back.deltas(z)[k])
    with pytest.raises(FileNotFoundError, match="echo_config.json"):
        load_echo(tmp_path / "nope")
