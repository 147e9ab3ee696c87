"""model/: each building block against an independent computation in the test."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED, needs_shared
from echo.inject import EchoInject
from model import (LoRALinear, ModelArgs, Transformer, load_model, merge_adapters,
                   unmerge_adapters)
from model.lora import load_adapter, save_adapter
from model.model import RMSNorm, apply_rope, rope_frequencies

torch.manual_seed(0)


def tiny(**kw):
    args = ModelArgs(**{**dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16,
                               max_seq_len=64, lora_dropout=0.0), **kw})
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_dora_magnitudes()
    return model


def randomize_adapters(model, scale=0.1):
    with torch.no_grad():
        for m in model.adapter_linears():
            m.lora_b.normal_(0, scale)
            if m.dora:
                m.magnitude.mul_(1 + 0.3 * torch.rand_like(m.magnitude))


# -- config ----------------------------------------------------------------------------------------

def test_meta_ffn_rule():
    assert ModelArgs.from_name("llama2-7b").ffn_hidden_dim == 11008
    assert ModelArgs.from_name("llama-13b").ffn_hidden_dim == 13824
    assert ModelArgs.from_name("llama3-8b").ffn_hidden_dim == 14336
    assert ModelArgs.from_name("llama3-70b").ffn_hidden_dim == 28672          # Meta's 70B w1: [28672, 8192]
    assert ModelArgs(dim=64, n_heads=4, hidden_dim=100).ffn_hidden_dim == 100


def test_params_json_missing_field(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    with pytest.raises(ValueError, match="missing field 'n_heads'"):
        ModelArgs.from_params_json(tmp_path / "params.json")


def test_unknown_adapter_module_and_layer():
    with pytest.raises(ValueError, match="unknown module 'wz'"):
        ModelArgs(dim=64, n_heads=4, adapter="lora", lora_modules=("wq", "wz"))
    with pytest.raises(ValueError, match="adapter layer 7 out of range"):
        ModelArgs(dim=64, n_heads=4, n_layers=2, adapter="lora", lora_layers=(0, 7))
    assert ModelArgs(dim=64, n_heads=4, adapter="lora", lora_modules=("q_proj", "v_proj")).lora_modules == ("wq", "wv")


# -- building blocks -------------------------------------------------------------------------------

def test_rmsnorm():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-6).double()
    norm.weight.data = torch.linspace(0.5, 2, 8, dtype=torch.float64)
    expected = torch.empty_like(x)
    for i in range(3):
        for j in range(5):
            rms = math.sqrt(sum(v * v for v in x[i, j].tolist()) / 8 + 1e-6)
            expected[i, j] = x[i, j] / rms * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_relative_offsets_and_layout():
    head_dim = 16
    freqs = rope_frequencies(head_dim, 10000.0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def rotated(x, pos):
        angles = pos * freqs
        return apply_rope(x.view(1, 1, 1, -1), angles.cos().view(1, 1, -1), angles.sin().view(1, 1, -1)).view(-1)

    # q·k after rotation depends only on the offset between their positions
    for offset in (0, 3, 11):
        dots = [rotated(q, p + offset) @ rotated(k, p) for p in (0, 5, 17, 40)]
        for d in dots[1:]:
            assert abs(d - dots[0]) < 1e-9
    # Meta layout: pair (x_0, x_1) is rotated by angle pos·θ_0 = pos as a complex number
    r = rotated(q, 2)
    z = complex(q[0], q[1]) * complex(math.cos(2.0), math.sin(2.0))
    assert abs(r[0] - z.real) < 1e-12 and abs(r[1] - z.imag) < 1e-12


def test_llama31_rope_scaling():
    freqs = rope_frequencies(128, 500000.0).tolist()
    scaled = rope_frequencies(128, 500000.0, use_scaled_rope=True).tolist()
    for f, s in zip(freqs, scaled):          # Meta's apply_scaling, written as a plain loop
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want = f
        elif wavelen > 8192 / 1:
            want = f / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * f / 8 + smooth * f
        assert abs(s - want) < 1e-12 * max(1.0, f)
    assert scaled[0] == freqs[0] and abs(scaled[-1] - freqs[-1] / 8) < 1e-15


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(1)
    gqa = tiny(n_kv_heads=2)
    mha = tiny(n_kv_heads=4)
    with torch.no_grad():
        state = gqa.state_dict()
        group = 4 // 2
        for i in range(3):
            for name in ("wk", "wv"):
                w = state[f"layers.{i}.attention.{name}.weight"].view(2, 16, 64)
                state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(group, dim=0).reshape(64, 64)
        mha.load_base_weights(state)
    tokens = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)


# -- adapters --------------------------------------------------------------------------------------

def test_lora_linear_eq1():
    torch.manual_seed(2)
    layer = LoRALinear(12, 7, rank=3, alpha=6.0).double()
    layer.weight.data.normal_()
    layer.lora_b.data.normal_()
    u = torch.randn(4, 12, dtype=torch.float64)
    W, A, B = layer.weight.data, layer.lora_a.data, layer.lora_b.data
    expected = u @ W.T + (6.0 / 3) * (u @ A.T @ B.T)
    torch.testing.assert_close(layer(u), expected)


def test_dora_linear_dense_and_gradients():
    torch.manual_seed(3)
    layer = LoRALinear(12, 7, rank=3, alpha=6.0, dora=True).double()
    layer.weight.data.normal_()
    layer.init_magnitude()
    layer.lora_b.data.normal_()
    layer.magnitude.data.mul_(torch.linspace(0.5, 1.5, 7, dtype=torch.float64))
    u = torch.randn(4, 12, dtype=torch.float64)
    W, A, B, m = layer.weight.data, layer.lora_a.data, layer.lora_b.data, layer.magnitude.data
    merged = W + 2.0 * B @ A
    dense = m[:, None] * merged / merged.norm(dim=1, keepdim=True)
    out = layer(u)
    torch.testing.assert_close(out, u @ dense.T)
    out.square().sum().backward()
    assert layer.magnitude.grad.abs().min() > 0
    assert layer.lora_a.grad.abs().sum() > 0 and layer.lora_b.grad.abs().sum() > 0


def test_dora_zero_row_is_safe_and_magnitude_required():
    layer = LoRALinear(5, 3, rank=2, dora=True)
    layer.weight.data.zero_()
    with pytest.raises(RuntimeError, match="init_dora_magnitudes"):
        layer(torch.randn(2, 5))
    layer.init_magnitude()
    assert torch.isfinite(layer(torch.randn(2, 5))).all()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_zero_b_equals_base_model_exactly(method):
    base = tiny()
    adapted = tiny(adapter=method, lora_modules=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    adapted.load_base_weights(base.state_dict())
    tokens = torch.randint(0, 101, (2, 8))
    assert torch.equal(base(tokens), adapted(tokens))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_unmerge(method):
    model = tiny(adapter=method, lora_modules=("wq", "wv", "w2"))
    randomize_adapters(model)
    tokens = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        before = model(tokens)
        merge_adapters(model)
        merged = model(tokens)
        unmerge_adapters(model)
        after = model(tokens)
    assert (before - tiny()(tokens)).abs().max() > 1e-3            # the adapter really changes the output
    torch.testing.assert_close(merged, before, atol=2e-5, rtol=1e-5)
    assert torch.equal(after, before)


def test_only_adapters_train():
    model = tiny(adapter="lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(trainable) == 3 * 4 * 2


def test_adapter_save_load_roundtrip(tmp_path):
    model = tiny(adapter="dora", lora_layers=(1, 2))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["method"] == "dora" and cfg["layers"] == [1, 2] and cfg["base"]["dim"] == 64
    fresh = tiny(adapter="dora", lora_layers=(1, 2))
    load_adapter(fresh, tmp_path / "adapter")
    tokens = torch.randint(0, 101, (1, 6))
    assert torch.equal(fresh(tokens), model(tokens))
    wrong = tiny(adapter="dora", lora_layers=(1,))
    with pytest.raises(ValueError, match="unexpected adapter key layers.2"):
        load_adapter(wrong, tmp_path / "adapter")


# -- loading ---------------------------------------------------------------------------------------

def test_state_dict_errors():
    model = tiny()
    state = dict(model.state_dict())
    missing = {k: v for k, v in state.items() if k != "layers.1.attention.wk.weight"}
    with pytest.raises(ValueError, match="missing 1 weight.*layers.1.attention.wk.weight"):
        model.load_base_weights(missing)
    with pytest.raises(ValueError, match="unexpected key.*layers.9.foo"):
        model.load_base_weights({**state, "layers.9.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"norm.weight: checkpoint shape \[3\], model expects \[64\]"):
        model.load_base_weights({**state, "norm.weight": torch.zeros(3)})


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a preset"):
        load_model(tmp_path / "nope")
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json: not valid JSON"):
        ModelArgs.from_params_json(tmp_path / "params.json")
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        ModelArgs.from_name("llama9")


# -- forward features ------------------------------------------------------------------------------

def test_kv_cache_decoding_matches_full_sequence():
    model = tiny(adapter="lora")
    randomize_adapters(model)
    tokens = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.setup_kv_cache(2, 16)
        steps = [model(tokens[:, :5], kv_cache=cache, cache_pos=0)]
        for t in range(5, 12):
            steps.append(model(tokens[:, t:t + 1], kv_cache=cache, cache_pos=t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_match_unpadded():
    model = tiny()
    a, b = torch.randint(1, 101, (1, 7)), torch.randint(1, 101, (1, 4))
    with torch.no_grad():
        alone_a, alone_b = model(a), model(b)
        left = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, :3] = False
        out = model(left, mask)
        torch.testing.assert_close(out[0], alone_a[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 3:], alone_b[0], atol=1e-5, rtol=1e-5)
        right = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
        out = model(right)                       # causal attention alone handles right padding
        torch.testing.assert_close(out[1, :4], alone_b[0], atol=1e-5, rtol=1e-5)


def test_logits_index_and_hidden_layers():
    model = tiny()
    tokens = torch.randint(0, 101, (2, 8))
    index = torch.tensor([[0, 5], [7, 2]])
    with torch.no_grad():
        full, hiddens = model(tokens, hidden_layers=[0, -1])
        part = model(tokens, logits_index=index)
    for b in range(2):
        for j in range(2):
            torch.testing.assert_close(part[b, j], full[b, index[b, j]])
    torch.testing.assert_close(model.head(hiddens[1]), full)      # last hidden → final norm → head
    with pytest.raises(ValueError, match="layer 3 out of range"):
        model(tokens, hidden_layers=[3])


def test_echo_inject_zero_delta_and_prompt_positions():
    model = tiny(adapter="lora")
    randomize_adapters(model)
    tokens = torch.randint(0, 101, (2, 8))
    mask = torch.zeros(2, 8)
    mask[:, 5:] = 1.0                             # answer positions
    zero = EchoInject({(1, "wq"): torch.zeros(2, 64), (2, "wv"): torch.zeros(2, 32)}, mask)
    big = EchoInject({(0, "wq"): torch.randn(2, 64), (1, "wv"): torch.randn(2, 32),
                      (2, "w2"): torch.randn(2, 64)}, mask)
    with torch.no_grad():
        plain = model(tokens)
        assert torch.equal(model(tokens, echo_inject=zero), plain)
        injected = model(tokens, echo_inject=big)
    assert torch.equal(injected[:, :5], plain[:, :5])     # causal: earlier prompt positions untouched
    assert (injected[:, 5:] - plain[:, 5:]).abs().min() > 0


def test_echo_inject_adds_mask_times_delta_to_module_output():
    model = tiny()
    tokens = torch.randint(0, 101, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    delta = torch.randn(2, 32)
    seen = {}
    wv = model.layers[1].attention.wv
    original = wv.forward
    wv.forward = lambda u: seen.setdefault("out", original(u))
    try:
        with torch.no_grad():
            got, hiddens = model(tokens, echo_inject=EchoInject({(1, "wv"): delta}, mask), hidden_layers=[1])
            # recompute layer 1 by hand with v ← v + M·δ
            h0 = model(tokens, hidden_layers=[0])[1][0]
            blk = model.layers[1]
            x = blk.attention_norm(h0)
            v = x @ wv.weight.T + mask[..., None] * delta[:, None, :]
            q, k = x @ blk.attention.wq.weight.T, x @ blk.attention.wk.weight.T
            pos = torch.arange(6)
            cos, sin = model.rope_cos[pos][None], model.rope_sin[pos][None]
            q = apply_rope(q.view(2, 6, 4, 16), cos, sin).transpose(1, 2)
            k = apply_rope(k.view(2, 6, 2, 16), cos, sin).transpose(1, 2).repeat_interleave(2, 1)
            v = v.view(2, 6, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
            att = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 64)
            h = h0 + y @ blk.attention.wo.weight.T
            h = h + blk.feed_forward(blk.ffn_norm(h))
    finally:
        wv.forward = original
    torch.testing.assert_close(hiddens[0], h, atol=1e-5, rtol=1e-5)


# -- real weights ----------------------------------------------------------------------------------

def greedy(model, ids, n):
    tokens = torch.tensor([ids])
    cache = model.setup_kv_cache(1, len(ids) + n)
    with torch.no_grad():
        logits = model(tokens, kv_cache=cache, cache_pos=0)[:, -1]
        out = []
        for i in range(n):
            nxt = int(logits.argmax(-1))
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), kv_cache=cache, cache_pos=len(ids) + i)[:, -1]
    return out


@needs_shared
def test_stories260k_known_greedy_text():
    model, tok = load_model(SHARED / "models" / "stories260K")
    ids = [tok.bos_id] + tok.encode("Once upon a time")
    text = tok.decode(ids[1:] + greedy(model, ids, 60))
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside "
                           "in the park. One day, she saw a big, red ball. She wanted to play with it, but it "
                           "was too high.")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    gguf = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip("../shared SmolLM2 GGUF not present")
    out = tmp_path_factory.mktemp("smollm2") / "meta"
    subprocess.run([sys.executable, str(SHARED / "tools" / "gguf_to_meta.py"), str(gguf), str(out)],
                   check=True, capture_output=True)
    return out


def test_smollm2_known_chat_answer_and_nll(smollm2_dir):
    model, tok = load_model(smollm2_dir)
    assert model.args.n_kv_heads == 3 and model.args.n_layers == 30
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, allow_special=True)
    answer = tok.decode(greedy(model, ids, 9))
    assert answer.startswith("The capital of France is Paris.<|im_end|>")
    text_ids = tok.encode("The capital of France is Paris. The capital of Germany is Berlin.")
    with torch.no_grad():
        logits = model(torch.tensor([text_ids]))
    nll = F.cross_entropy(logits[0, :-1], torch.tensor(text_ids[1:])).item()
    assert abs(nll - 1.714) < 0.01
