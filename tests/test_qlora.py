"""The opt-in memory options: an NF4 frozen base (--base-format nf4, QLoRA) and activation checkpointing
(--activation-checkpointing). NF4 logits against the full-precision model, deterministic quantise-while-
loading, merge = dequant(W) + ΔW, checkpoints without the base, resume refused by flag name, exactness of
checkpointing with Echo's two passes, a short NF4 run, and the default path unchanged."""
import hashlib
import json
from dataclasses import replace
from math import prod

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from convert_weights import fold_adapter
from echo import EchoConfig, EchoModule, echo_loss
from model.load import as_plain_model, build_model, load_model
from model.lora import (ADAPTER_KEYS, LoRALinear, adapter_config, adapter_state_dict, load_adapter, merge_adapters,
                        merged_weight, unmerge_adapters)
from model.model import ModelArgs, Transformer
from model.nf4 import NF4Weight, dequantize_nf4, nf4_bytes, quantize_nf4
from model.tokenizer import ByteTokenizer
from training.checkpoint import save_base, trainable_state
from training.options import apply_default_run, parse_args

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NF4_BUFFERS = ("packed", "absmax", "absmax2", "offset")


def tiny(seed=0, std=0.2, **kw):
    """The default run's tiny shape and base scale (std 0.2: logits spread over several nats, so the KL
    between formats measures something), with a live adapter (B ≠ 0)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name("tiny", **{"lora_dropout": 0.0, **kw}))
    model.reset_parameters(std=std)
    model.init_dora_magnitudes()
    with torch.no_grad():
        for m in model.adapter_linears():
            m.lora_b.normal_(0.0, 0.05)
    return model


def well_conditioned(**kw):
    """tiny() with its blocks at the preset's init (std 0.02: a random net at the default run's std 0.2 is
    chaotic, and any rounding of its weights changes its outputs wholesale) and the head, which NF4 leaves
    alone, ×10 so the next-token distributions are far from uniform (entropy ~4.3 nats of 5.5)."""
    net = tiny(std=0.02, **kw)
    with torch.no_grad():
        net.output.weight.mul_(10)
    return net


def quantized_copy(plain):
    """The NF4 model of plain's base and adapter, built the way load_model builds it."""
    args = replace(plain.args, base_format="nf4")
    net = build_model(args, "cpu", plain.tok_embeddings.weight.dtype)
    net.load_base_weights({k: v for k, v in plain.state_dict().items() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS})
    net.load_state_dict(adapter_state_dict(plain), strict=False)
    for m in net.adapter_linears():
        if m.dora:
            m.cache_base_norm()
    return net


def kl(p_logits, q_logits):
    """mean over positions of KL(p ‖ q), fp64."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


# ----------------------------------------------------------------------------- the format in the model

def test_nf4_logits_close_to_full_precision():
    """KL(fp32 ‖ NF4) over 64 random prompts of 32 tokens, next to KL(fp32 ‖ bf16 weights) for scale.
    Measured: 2.96e-2 nats/token (top-1 agreement 77 %) against 1.6e-5 for bf16. For scale, SmolLM2-135M
    (../shared's Q4_1 GGUF, dequantised, as the fp32 reference): 0.30 nats/token over the first 40 prompts of
    each commonsense task (23.6k tokens, top-1 agreement 70 %, NLL 3.38 → 3.56); on 16 of them, int4 absmax
    in the same blocks of 64 gives 0.61 and Gaussian noise of NF4's RMS error (9.3 %) 0.45, NF4 0.31."""
    plain, rounded = (well_conditioned(adapter="lora", lora_modules=ALL) for _ in range(2))
    q = quantized_copy(plain)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.rsplit(".", 1)[-1] not in ADAPTER_KEYS:
                p.copy_(p.bfloat16().float())
    tokens = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, nf4, half = plain(tokens), q(tokens), rounded(tokens)
    kl_nf4, kl_bf16 = kl(ref, nf4), kl(ref, half)
    agree = (ref.argmax(-1) == nf4.argmax(-1)).float().mean().item()
    assert 0 < kl_nf4 < 0.1 and agree > 0.6, (kl_nf4, agree)
    assert kl_bf16 < kl_nf4 / 100      # 4 bits cost far more than bf16's 8: the comparison is live


def test_nf4_layers_and_storage():
    """Every block linear holds its W as NF4 buffers (named after the weight); embedding, norms and head stay
    parameters; the adapter is the plain model's, same seed, same init; 4-bit storage ~0.52 B/param."""
    plain = Transformer(ModelArgs.from_name("tiny", adapter="dora", lora_modules=("wq", "wv", "w2")))
    torch.manual_seed(0)
    plain = Transformer(plain.args)
    torch.manual_seed(0)
    q = Transformer(replace(plain.args, base_format="nf4"))
    sd = q.state_dict()
    quantized = {k.rsplit(".", 1)[0] for k in sd if k.rsplit(".", 1)[-1] in NF4_BUFFERS}
    dense = {k for k, p in plain.named_parameters() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    assert quantized == {k for k in dense if ".attention.w" in k or ".feed_forward.w" in k}
    assert {k for k, _ in q.named_parameters() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS} == dense - quantized
    for k, p in plain.named_parameters():
        if k.rsplit(".", 1)[-1] in ADAPTER_KEYS:
            assert torch.equal(p, q.get_parameter(k)), k             # same seed: the same adapter init
        elif k in quantized:                                         # the random base: plain's, quantised
            assert torch.equal(q.get_submodule(k).packed, quantize_nf4(p).packed), k
    assert [name for name, m in q.named_modules() if type(m) is nn.Linear] == ["output"]    # the head stays dense
    linear = [m for m in q.modules() if isinstance(m, NF4Weight)]
    n = sum(m.numel() for m in linear)
    assert 0.5 < sum(nf4_bytes(m) for m in linear) / n < 0.53
    with pytest.raises(ValueError, match="unknown base_format 'int8'"):
        ModelArgs.from_name("tiny", base_format="int8")


def saved_for_backward(fn, *args):
    """fn(*args), and (shape, dtype) of every tensor autograd saves for its backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = fn(*args)
    return out, saved


def nf4_layer_and_dense_twin(method):
    """An NF4 LoRALinear (rank 0 for "base") with a live adapter, and the plain layer of W = dequant(W)."""
    torch.manual_seed(0)
    kw = {} if method == "base" else dict(rank=4, alpha=8, dora=method == "dora")
    layer, dense = LoRALinear(128, 96, base_format="nf4", **kw), LoRALinear(128, 96, **kw)
    layer.weight.copy_(torch.randn(96, 128))
    if method != "base":
        nn.init.normal_(layer.lora_b)
    if method == "dora":
        layer.init_magnitude()
    dense.load_state_dict({**{k: v for k, v in layer.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS},
                           "weight": dequantize_nf4(layer.weight, torch.float32)})
    if method == "dora":
        dense.cache_base_norm()
    return layer, dense


def test_nf4_backward_keeps_only_the_4bit_weight():
    """The NF4 matmul (the echo_lora::nf4_linear op): no dequantised d_out × d_in weight is saved for the
    backward (it would hold the full-precision model until then), and the output and ∂L/∂u, ∂L/∂A, ∂L/∂B
    equal those of the dense dequant(W), bit for bit."""
    layer, dense = nf4_layer_and_dense_twin("lora")
    u = torch.randn(3, 5, 128, requires_grad=True)
    out, saved = saved_for_backward(layer, u)
    assert all(shape not in ((96, 128), (128, 96)) for shape, _ in saved)
    grads = torch.autograd.grad(out.square().sum(), [u, layer.lora_a, layer.lora_b])
    u2 = u.detach().requires_grad_()
    ref = torch.autograd.grad(dense(u2).square().sum(), [u2, dense.lora_a, dense.lora_b])
    torch.testing.assert_close(out, dense(u2), rtol=0, atol=0)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["base", "lora", "dora"])
def test_nf4_backward_keeps_only_the_4bit_weight_compiled(method):
    """Under torch.compile too: with aot_eager_decomp_partition (AOTAutograd's decompositions and min-cut
    partitioner, as Inductor uses them, without code generation), which saved every dense W when the
    matmul was an autograd.Function (the backward's dequantisation merged with the forward's), nothing saved
    is the size of W, in eager or compiled: only the op's uint8 codes and fp32 statistics (and the
    adapter's small tensors). Output and gradients are the eager dense u·dequant(W)ᵀ's to fp32 rounding."""
    layer, dense = nf4_layer_and_dense_twin(method)
    params, dense_params = ([p for k, p in m.named_parameters() if k in ADAPTER_KEYS] for m in (layer, dense))
    u = torch.randn(3, 5, 128, requires_grad=True)
    u2 = u.detach().requires_grad_()
    ref_out = dense(u2)
    ref = torch.autograd.grad(ref_out.square().sum(), [u2, *dense_params])
    compiled = torch.compile(layer, backend="aot_eager_decomp_partition", fullgraph=True)
    for fn in (layer, compiled):
        out, saved = saved_for_backward(fn, u)
        assert (tuple(layer.weight.packed.shape), torch.uint8) in saved          # the op's 4-bit codes
        assert all(prod(shape) < 96 * 128 for shape, _ in saved), saved          # never W (12288) or Wᵀ
        assert {dtype for _, dtype in saved} == {torch.uint8, torch.float32}
        grads = torch.autograd.grad(out.square().sum(), [u, *params])
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
        assert len(grads) == len(ref) == (1 if method == "base" else 3 if method == "lora" else 4)
        for g, r in zip(grads, ref):       # fp32 rounding of sums whose terms reach |r|'s scale (~500)
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dora_forward_dequantises_w_once(monkeypatch, dtype):
    """DoRA on an NF4 base: W u and the row norm's W Aᵀ come from one dequant(W) (the echo_lora::
    nf4_linear_and_wat op), and the output and ∂L/∂u, ∂L/∂A, ∂L/∂B, ∂L/∂m are those of the two-op forward
    (nf4_linear for W u, weight_norm's own nf4_linear for W Aᵀ), bit for bit."""
    import model.lora as lora
    layer, _ = nf4_layer_and_dense_twin("dora")
    u = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    calls = []
    real = lora.dequantize_fused
    monkeypatch.setattr(lora, "dequantize_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = layer(u)
    assert len(calls) == 1
    params = [u, layer.lora_a, layer.lora_b, layer.magnitude]
    grads = torch.autograd.grad(out.float().square().sum(), params)

    def two_op_forward(u):
        base = lora.nf4_linear(u, layer.weight)
        adapter = F.linear(F.linear(u, layer.lora_a.to(dtype)), layer.lora_b.to(dtype)) * layer.scale
        return (layer.magnitude / layer.weight_norm(dtype)).to(dtype) * (base + adapter)

    want = two_op_forward(u)
    assert torch.equal(out, want)
    for g, w in zip(grads, torch.autograd.grad(want.float().square().sum(), params)):
        assert torch.equal(g, w)


def test_nf4_base_is_rebuilt_deterministically_on_load(tmp_path):
    """load_model quantises each block weight of the checkpoint as it loads it; two loads give identical
    buffers, equal to quantize_nf4 of the checkpoint's tensor; every other weight is the checkpoint's."""
    torch.manual_seed(0)
    save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259)), ByteTokenizer(), tmp_path / "base")
    base = load_model(tmp_path / "base")[0].state_dict()
    kw = dict(adapter="lora", lora_modules=("wq", "wv"), base_format="nf4")
    a, b = ({k: v for k, v in load_model(tmp_path / "base", **kw)[0].state_dict().items()
             if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS} for _ in range(2))      # (the adapters' init is random)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key, w in base.items():
        if ".attention.w" in key or ".feed_forward.w" in key:
            q = quantize_nf4(w)
            for name in NF4_BUFFERS:
                assert torch.equal(a[f"{key}.{name}"], getattr(q, name)), (key, name)
        else:
            assert torch.equal(a[key], w), key
    dq = load_model(tmp_path / "base", **kw)[0].dequantized_state_dict(torch.float32)
    assert list(dq) == list(base) and all(dq[k].dtype == torch.float32 for k in dq)


def test_flops_count_nf4_weights_as_the_plain_model():
    """MFU's N counts an NF4 weight as the matrix it stands for (its buffers are no parameters): an NF4
    model and its plain twin give the same count and step FLOPs (parameters() alone left ~4/5 of N out)."""
    from training.log import count_weights, step_flops
    plain = tiny(adapter="lora", lora_modules=ALL)
    q = quantized_copy(plain)
    n = sum(p.numel() for p in plain.parameters())
    assert count_weights(plain) == count_weights(q) == n
    assert sum(p.numel() for p in q.parameters()) < n / 2                     # what was counted before
    shapes = [(2, 40, 8), (3, 20, 4)]
    assert step_flops(q, None, False, shapes) == step_flops(plain, None, False, shapes) == 4 * n * (80 + 60)


# ----------------------------------------------------------------------------- merge and export

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_equals_nf4_base_plus_adapter(method):
    """dequant(W) + ΔW written back as a plain model (convert_weights.fold_adapter on the model's
    dequantized_state_dict) gives the NF4 model's logits to fp32 rounding; LoRALinear.merge on the NF4
    model itself gives the same dense fp32 weights (never re-quantised), and unmerge restores the NF4 base."""
    q = quantized_copy(well_conditioned(adapter=method, lora_modules=ALL))
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = q(tokens)
        merged_sd = fold_adapter(q.dequantized_state_dict(torch.float32), adapter_state_dict(q), adapter_config(q.args))
        plain = build_model(replace(q.args, adapter=None, base_format="plain"))
        plain.load_base_weights(merged_sd)
        torch.testing.assert_close(plain(tokens), before, rtol=0, atol=2e-5)
        layer = q.layers[1].attention.wv
        nf4 = layer.weight
        expect = merged_weight(dequantize_nf4(nf4, torch.float32), layer.lora_a, layer.lora_b, layer.scale,
                               layer.magnitude if layer.dora else None)
        assert torch.equal(merged_weight(nf4, layer.lora_a, layer.lora_b, layer.scale,
                                         layer.magnitude if layer.dora else None), expect)
        merge_adapters(q)
        assert not layer.quantized and layer.weight.dtype == torch.float32 and torch.equal(layer.weight, expect)
        assert torch.equal(layer.weight, merged_sd["layers.1.attention.wv.weight"])
        torch.testing.assert_close(q(tokens), before, rtol=0, atol=2e-5)
        for m in q.adapter_linears():
            m.unmerge()
        assert layer.weight is nf4 and torch.equal(q(tokens), before)


def test_nf4_merge_takes_the_models_dtype():
    """merge_adapters on a bf16 NF4 model: the merged W is dequant(W) + ΔW (fp32) cast to bf16, the model's
    dtype (its embedding's), so the next forward runs (an fp32 W would meet bf16 activations) and gives the
    unmerged model's logits to bf16 rounding; unmerge restores the NF4 base. Also after model.to(bf16)."""
    fp32 = quantized_copy(well_conditioned(adapter="dora", lora_modules=ALL))
    cast = quantized_copy(well_conditioned(adapter="dora", lora_modules=ALL)).to(torch.bfloat16)
    built = build_model(replace(fp32.args, base_format="nf4"), "cpu", torch.bfloat16)
    built.load_state_dict(cast.state_dict())           # built in bf16: its adapters stay fp32
    for m in built.adapter_linears():
        m.cache_base_norm()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    for q in (cast, built):
        assert q.tok_embeddings.weight.dtype == torch.bfloat16
        layer = q.layers[1].attention.wv
        nf4 = layer.weight
        assert nf4.dtype == torch.bfloat16 and nf4.packed.dtype == torch.uint8
        with torch.no_grad():
            before = q(tokens)
            expect = merged_weight(nf4, layer.lora_a, layer.lora_b, layer.scale, layer.magnitude).to(torch.bfloat16)
            merge_adapters(q)
            assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, expect)
            after = q(tokens)
            assert after.dtype == torch.bfloat16
            torch.testing.assert_close(after.float(), before.float(), rtol=0, atol=0.1)   # bf16 rounding of ~±10
            unmerge_adapters(q)
            assert layer.weight is nf4 and torch.equal(q(tokens), before)
    layer = fp32.layers[0].feed_forward.w2
    layer.merge()
    assert layer.weight.dtype == torch.float32                                 # an fp32 model: fp32, as before
    layer.unmerge()
    layer.merge(torch.float16)
    assert layer.weight.dtype == torch.float16                                 # or the dtype asked for


def test_nf4_base_kept_by_merge_follows_the_model():
    """The NF4 base that merge keeps for unmerge is not in state_dict, but model.double() / .to(device)
    between merge and unmerge reach it: after unmerge its buffers are where the model is (the meta device
    here, the only other device on CPU), their dtypes NF4Weight's own (uint8 codes, fp32 statistics),
    its dense dtype the model's (fp64), and the forward runs in fp64."""
    q = quantized_copy(well_conditioned(adapter="lora", lora_modules=ALL))
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    layer = q.layers[2].feed_forward.w1
    nf4, buffers = layer.weight, {k: v.clone() for k, v in layer.weight.state_dict().items()}
    with torch.no_grad():
        before = q(tokens)
        merge_adapters(q)
        assert not any(k.rsplit(".", 1)[-1] in NF4_BUFFERS for k in q.state_dict())    # only the merged W
        q.double()
        unmerge_adapters(q)
        assert layer.weight is nf4 and nf4.dtype == torch.float64
        assert {k: v.dtype for k, v in nf4.state_dict().items()} == {k: v.dtype for k, v in buffers.items()}
        assert all(torch.equal(nf4.state_dict()[k], v) for k, v in buffers.items())
        torch.testing.assert_close(q(tokens).float(), before, rtol=0, atol=2e-5)
        merge_adapters(q)
        assert layer.weight.dtype == torch.float64
        q.to("meta")
        unmerge_adapters(q)
    assert {t.device.type for t in nf4.buffers()} == {"meta"} and layer.weight is nf4
    assert nf4.packed.dtype == torch.uint8 and nf4.absmax2.dtype == torch.float32


# ----------------------------------------------------------------------------- activation checkpointing

def fp64_case(adapter, base_format="plain"):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64,
                     adapter=adapter, lora_rank=4, lora_dropout=0.1, lora_modules=ALL, base_format=base_format)
    model = build_model(args, "cpu", torch.float64)
    model.init_dora_magnitudes()
    with torch.no_grad():
        for m in model.adapter_linears():
            m.lora_b.normal_(0.0, 0.05)
    echo = EchoModule(EchoConfig(target_layers=(1,), source_layers=(2, 3), bottleneck=8), model.args).double()
    with torch.no_grad():
        for inj in echo.injectors.values():
            inj.lam.fill_(5.0)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 97, (3, 12), generator=g)
    labels = torch.full_like(tokens, -100)
    for b, prompt in enumerate((3, 5, 7)):
        labels[b, prompt:] = tokens[b, prompt:]
    return model, echo, tokens, labels


def loss_and_grads(model, echo, tokens, labels, routed):
    torch.manual_seed(7)                  # the LoRA dropout draws: the same in both runs
    loss, _ = echo_loss(model, echo, tokens, labels, routed=routed)
    params = [p for p in [*model.parameters(), *(echo.parameters() if echo else [])] if p.requires_grad]
    return loss, torch.autograd.grad(loss, params, allow_unused=True)


CHECKPOINT_CASES = {"LoRA alone": ("lora", None), "DoRA alone": ("dora", None),
                    "Echo unrouted": ("lora", "unrouted"), "Echo-LoRA, answer window": ("lora", "window"),
                    "Echo-LoRA, full Echo-on pass": ("lora", "full"), "Echo-DoRA, answer window": ("dora", "window"),
                    "Echo-DoRA, full Echo-on pass": ("dora", "full"),
                    "Echo-LoRA on NF4, answer window": ("lora", "nf4")}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_activation_checkpointing_is_exact(case):
    """echo_loss with every block checkpointed: the same loss and the same gradient for every adapter and
    Echo parameter (fp64, LoRA dropout on), and each block really runs again in the backward."""
    adapter, mode = CHECKPOINT_CASES[case]
    model, echo, tokens, labels = fp64_case(adapter, "nf4" if mode == "nf4" else "plain")
    if mode in ("window", "full", "nf4"):
        echo.cfg = replace(echo.cfg, answer_window=mode != "full")
    echo, routed = (None, False) if mode is None else (echo, mode != "unrouted")
    loss, grads = loss_and_grads(model, echo, tokens, labels, routed)
    calls = []
    model.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))     # (a recomputation stops early)
    model.args.activation_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads(model, echo, tokens, labels, routed)
    assert len(calls) == 2 * (2 if routed else 1)        # each pass through layer 2, then once more in the backward
    assert abs(loss_ckpt.item() - loss.item()) <= 1e-12
    assert sum(g is not None for g in grads) > 10
    for g, g_ckpt in zip(grads, grads_ckpt):
        assert (g is None) == (g_ckpt is None)
        if g is not None:
            torch.testing.assert_close(g_ckpt, g, rtol=0, atol=1e-12)


def test_checkpointing_collects_the_same_hiddens_and_keys():
    """run_layers' hidden_layers / keys outputs are the same values with checkpointing, and it is off
    without gradients (inference, KV cache)."""
    model, _, tokens, _ = fp64_case("lora")
    positions = model.positions_for(tokens)

    def collect():
        hiddens, keys = {}, {}
        torch.manual_seed(7)
        h = model.run_layers(model.embed(tokens), 0, 4, positions=positions, hidden_layers={1, 3},
                             hiddens=hiddens, keys=keys)
        return h, hiddens, keys
    h, hiddens, keys = collect()
    model.args.activation_checkpointing = True
    h2, hiddens2, keys2 = collect()
    assert torch.equal(h, h2) and hiddens.keys() == hiddens2.keys() == {1, 3} and keys.keys() == keys2.keys()
    assert all(torch.equal(hiddens[i], hiddens2[i]) for i in hiddens)
    assert all(torch.equal(a, b) for i in keys for a, b in zip(keys[i], keys2[i]))


def test_checkpointing_is_off_without_gradients_and_with_a_kv_cache(monkeypatch):
    """With activation_checkpointing on, run_layers checkpoints each block only while gradients are recorded
    and there is no KV cache (a recomputation would write the cache twice): under torch.no_grad, or with a
    cache even with gradients, checkpoint is never called and each block runs once, the backward included."""
    import model.model as model_module
    model, _, tokens, _ = fp64_case("lora")
    model.args.activation_checkpointing = True
    checkpointed, runs = [], []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **kw: checkpointed.append(1) or real(*a, **kw))
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: runs.append(1))

    def count(fn):
        checkpointed.clear(), runs.clear()
        fn()
        return len(checkpointed), len(runs)
    n = model.args.n_layers
    assert count(lambda: model(tokens).sum().backward()) == (n, 2 * n)        # on: each block runs again
    with torch.no_grad():
        assert count(lambda: model(tokens)) == (0, n)
    cache = model.setup_kv_cache(tokens.shape[0], tokens.shape[1])
    assert count(lambda: model(tokens, kv_cache=cache).sum().backward()) == (0, n)


# ----------------------------------------------------------------------------- the options off

# Computed with the code before these options existed (commit 79c53d7): tiny LoRA model on wq wv w2, seed 0,
# B ~ N(0, 0.05) seeded after construction; the state_dict keys' sha256 and the logits at one position.
BEFORE_KEYS = (63, "eb586fe28278221ce28957c3130dd318a5011673c028c74f5e894c12ea2ba6c7")
BEFORE_LOGITS = [0.05236070230603218, 0.05320010334253311, -0.005301686003804207, 0.16448384523391724,
                 -0.009430763311684132, -0.14085222780704498]
BEFORE_SQUARES = 81.55124882796275


def default_tiny(**kw):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", adapter="lora", lora_modules=("wq", "wv", "w2"),
                                            lora_dropout=0.0, **kw))
    with torch.no_grad():
        for m in model.adapter_linears():
            m.lora_b.normal_(0, 0.05)
    return model


def test_options_off_are_the_model_as_before():
    """base_format="plain" and activation_checkpointing=False (the defaults) build the same modules, keys
    and numbers as before the options existed, and as a model built without naming them."""
    model, explicit = default_tiny(), default_tiny(base_format="plain", activation_checkpointing=False)
    keys = list(model.state_dict())
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()) == BEFORE_KEYS
    assert keys == list(explicit.state_dict())
    assert not any(isinstance(m, NF4Weight) for m in model.modules())
    assert {type(m).__name__ for m in model.modules()} == {
        "Attention", "Embedding", "FeedForward", "Identity", "Linear", "LoRALinear", "ModuleList", "RMSNorm",
        "Transformer", "TransformerBlock"}
    assert all(isinstance(m.weight, nn.Parameter) for m in model.modules() if isinstance(m, (LoRALinear, nn.Linear)))
    tokens = torch.arange(12)[None] * 7 % 256
    out = model(tokens)
    assert torch.equal(out, explicit(tokens))
    assert out[0, -1, :6].tolist() == pytest.approx(BEFORE_LOGITS, abs=1e-6)
    assert out.double().pow(2).sum().item() == pytest.approx(BEFORE_SQUARES, rel=1e-6)
    assert as_plain_model(model) is model


# ----------------------------------------------------------------------------- train.py

def run_args(out, *extra):
    return ["--out", str(out), "--max-steps", "2", "--device", "cpu", "--no-compile", *extra]


def one_line(e):
    return str(e.value).splitlines()[0]


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """The built-in default run (tiny model, all 7 modules, Echo) for 2 steps on an NF4 base, checkpointed."""
    out = tmp_path_factory.mktemp("qlora") / "nf4"
    train.main(run_args(out, "--base-format", "nf4", "--activation-checkpointing"))
    return out


def test_nf4_run_trains_and_checkpoints_only_the_adapter(nf4_run):
    """2 steps of train.py --base-format nf4 on CPU: finite losses, the adapter moved; state.pt's trainable
    state is the adapter + Echo weights of a plain-format run (no NF4 buffer); config.json says nf4; the
    run's base/ is dequant(W), so base/ + adapter/ is the model that was trained, without NF4."""
    rows = [json.loads(line) for line in (nf4_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["routed"]
    config = json.loads((nf4_run / "config.json").read_text())
    assert config["opts"]["base_format"] == "nf4" and config["opts"]["activation_checkpointing"] is True
    state = torch.load(nf4_run / "checkpoint" / "state.pt", weights_only=False)
    trainable = state["trainable"]
    assert not any(k.rsplit(".", 1)[-1] in NF4_BUFFERS or k.endswith(".weight") and not k.startswith("echo.")
                   for k in trainable)
    net, _ = load_model(nf4_run / "base", adapter_dir=nf4_run / "adapter")
    echo = EchoModule(EchoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["echo"].items()}),
                      net.args)
    assert set(trainable) == set(trainable_state(net, echo))
    lora_b = [v for k, v in trainable.items() if k.endswith("lora_b")]
    assert len(lora_b) == 4 * 7 and all(v.abs().sum() > 0 for v in lora_b)      # B starts at 0: each one moved
    assert json.loads((nf4_run / "adapter" / "adapter_config.json").read_text())["base_format"] == "nf4"
    opts = apply_default_run(parse_args(run_args(nf4_run, "--base-format", "nf4")))
    torch.manual_seed(opts.seed)                   # as train.setup: the run's NF4 model, rebuilt from the seed
    trained, _ = train.build_model(opts, "cpu")
    load_adapter(trained, nf4_run / "adapter")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(tokens), net(tokens))


def test_resume_refuses_a_changed_base_format_both_ways(nf4_run, tmp_path):
    """An NF4 checkpoint resumed without --base-format nf4 is refused by the flag's name, and a plain one
    resumed with it; the refusal comes before any training step."""
    with pytest.raises(ValueError) as e:
        train.main(run_args(nf4_run, "--resume", "--activation-checkpointing", "--max-steps", "3"))
    assert one_line(e).startswith("--resume: --base-format is 'plain' but the checkpoint was trained with 'nf4'")
    plain = tmp_path / "plain"
    train.main(run_args(plain))
    with pytest.raises(ValueError) as e:
        train.main(run_args(plain, "--resume", "--base-format", "nf4", "--max-steps", "3"))
    assert one_line(e).startswith("--resume: --base-format is 'nf4' but the checkpoint was trained with 'plain'")
    assert len((plain / "metrics.jsonl").read_text().splitlines()) == 2


def test_help_names_the_options():
    from training.options import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "--base-format {plain,nf4}" in text and "Works on CPU too, slowly" in text
    assert "--activation-checkpointing" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--base-format", "int4"])
