"""The opt-in memory options: an NF4 frozen base (--base-format nf4, QLoRA) and activation checkpointing
(--activation-checkpointing). NF4 logits against the full-precision model, deterministic quantise-while-
loading, merge = dequant(W) + ΔW, checkpoints without the base, resume refused by flag name, exactness of
checkpointing with Echo's two passes, a short NF4 run, and the default path unchanged."""
import hashlib
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from convert_weights import fold_adapter
from echo import EchoConfig, EchoModule, echo_loss
from model.load import as_plain_model, build_model, load_model
from model.lora import (ADAPTER_KEYS, LoRALinear, adapter_config, adapter_state_dict, load_adapter, merge_adapters,
                        merged_weight)
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


def test_nf4_backward_keeps_only_the_4bit_weight():
    """FrozenNF4Linear: no dequantised d_out × d_in weight is saved for the backward (it would hold the
    full-precision model until then), and ∂L/∂u, ∂L/∂A, ∂L/∂B equal those of the dense dequant(W)."""
    torch.manual_seed(0)
    layer = LoRALinear(128, 96, rank=4, alpha=8, base_format="nf4")
    layer.weight.copy_(torch.randn(96, 128))
    nn.init.normal_(layer.lora_b)
    dense = LoRALinear(128, 96, rank=4, alpha=8)
    dense.load_state_dict({**{k: v for k, v in layer.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS},
                           "weight": dequantize_nf4(layer.weight, torch.float32)})
    saved = []
    u = torch.randn(3, 5, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(u)
    assert (96, 128) not in saved and (128, 96) not in saved
    grads = torch.autograd.grad(out.square().sum(), [u, layer.lora_a, layer.lora_b])
    u2 = u.detach().requires_grad_()
    ref = torch.autograd.grad(dense(u2).square().sum(), [u2, dense.lora_a, dense.lora_b])
    torch.testing.assert_close(out, dense(u2), rtol=0, atol=0)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


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
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)


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
