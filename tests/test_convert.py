"""convert_weights.py: Meta/HF import, merged HF/Meta export, PEFT adapter export/import.

The HF side is checked against an HF-style LLaMA forward written here (rotate-half RoPE on HF-ordered
q/k rows, as transformers computes it) and against fixtures produced once by the real transformers +
peft (tests/fixtures/make_peft_fixture.py); transformers/peft themselves are only used by the
optional tests at the end, which skip when they are not installed.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import convert_weights as cw
from model.load import adapter_overrides, read_state_dict
from model.lora import ADAPTER_KEYS, merge_adapters, save_adapter, load_adapter
from model.model import ModelArgs, Transformer

from conftest import ROOT, SHARED, needs_shared

FIX = ROOT / "tests" / "fixtures"
STORIES = SHARED / "models" / "stories260K"
STORIES_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One "
                "day, she saw a big, red ball. She wanted to play with it, but it was too high.")


# ---------------------------------------------------------------------------------------------------------------
# helpers

def llama3_inv_freq(inv_freq, s):
    """transformers' _compute_llama3_parameters, written out."""
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * out / s["factor"] + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


def hf_forward(sd, cfg, ids, position_ids=None):
    """An HF-layout LLaMA forward (transformers' LlamaForCausalLM, fp32): rotate-half RoPE,
    cos/sin of cat(freqs, freqs), rotate_half(x) = cat(-x2, x1)."""
    D, H, KV, L = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                   cfg["num_hidden_layers"])
    hd, eps, (B, T) = D // H, cfg["rms_norm_eps"], ids.shape
    position_ids = torch.arange(T).expand(B, T) if position_ids is None else position_ids
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if cfg.get("rope_scaling"):
        inv = llama3_inv_freq(inv, cfg["rope_scaling"])
    ang = position_ids[..., None].float() * inv
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]                          # [B, 1, T, hd]
    rot = lambda x: torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)  # noqa: E731
    norm = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][ids].float()
    for i in range(L):
        w = {k[len(f"model.layers.{i}."):]: v.float() for k, v in sd.items() if k.startswith(f"model.layers.{i}.")}
        h = norm(x, w["input_layernorm.weight"])
        q = (h @ w["self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ w["self_attn.k_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        v = (h @ w["self_attn.v_proj.weight"].T).view(B, T, KV, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, D) @ w["self_attn.o_proj.weight"].T
        h = norm(x, w["post_attention_layernorm.weight"])
        x = x + (F.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    x = norm(x, sd["model.norm.weight"].float())
    return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).float().T


def tiny_model(adapter=None, tie=False, seed=0, modules=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), layers=None):
    """A random fp32 model (GQA, random norms); adapters get random non-zero B and perturbed magnitudes."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48, max_seq_len=64,
                     tie_word_embeddings=tie, adapter=adapter, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                     lora_modules=modules, lora_layers=layers)
    m = Transformer(args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1] not in ADAPTER_KEYS:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        m.init_dora_magnitudes()
        for name, p in m.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return m.eval()


def base_state_dict(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}


def build(model_dir, adapter_dir=None):
    """Our model from a converted folder (no tokenizer needed), optionally with our adapter."""
    overrides = adapter_overrides(adapter_dir)[1] if adapter_dir else {}
    m = Transformer(ModelArgs.from_params_json(Path(model_dir) / "params.json", **overrides))
    m.load_base_weights(read_state_dict(model_dir))
    if adapter_dir:
        load_adapter(m, adapter_dir)
    return m.eval()


def save_ours(m, folder):
    """Base weights in our layout (fp32), plus the adapter when the model has one."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in base_state_dict(m).items()}, folder / "model.safetensors")
    (folder / "params.json").write_text(json.dumps(m.args.to_params_json()))
    if m.args.adapter:
        save_adapter(m, folder / "adapter")


def run_cli(*argv):
    """main() in-process; returns the one-line error (None on success)."""
    try:
        cw.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def logits(m, ids, positions=None):
    with torch.no_grad():
        return m(ids, positions=positions)


# ---------------------------------------------------------------------------------------------------------------
# the q/k permutation

def test_permutation_turns_interleaved_rope_into_rotate_half():
    """Meta rotates pairs (2i, 2i+1); HF rotates (i, i + hd/2). Permuting the rows of W_q must commute
    with RoPE: rotate_half_rope(P W x) == P interleaved_rope(W x), checked with plain loops."""
    torch.manual_seed(0)
    n_heads, hd, pos = 3, 8, 5
    freqs = [10000 ** (-2 * i / hd) for i in range(hd // 2)]
    x = torch.randn(n_heads * hd, dtype=torch.float64)
    meta = x.clone()
    for h in range(n_heads):
        for i in range(hd // 2):
            a, b = x[h * hd + 2 * i], x[h * hd + 2 * i + 1]
            c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
            meta[h * hd + 2 * i], meta[h * hd + 2 * i + 1] = a * c - b * s, a * s + b * c
    y = cw.permute_rotate_half(x, n_heads)
    hf = y.clone()
    for h in range(n_heads):
        for i in range(hd // 2):
            a, b = y[h * hd + i], y[h * hd + i + hd // 2]
            c, s = math.cos(pos * freqs[i]), math.sin(pos * freqs[i])
            hf[h * hd + i], hf[h * hd + i + hd // 2] = a * c - b * s, a * s + b * c
    assert torch.allclose(hf, cw.permute_rotate_half(meta, n_heads), atol=1e-12)
    w = torch.randn(n_heads * hd, 5)
    assert torch.equal(cw.unpermute_rotate_half(cw.permute_rotate_half(w, n_heads), n_heads), w)
    assert not torch.equal(cw.permute_rotate_half(w, n_heads), w)


# ---------------------------------------------------------------------------------------------------------------
# HF layout vs our model

@pytest.mark.parametrize("tie", [False, True])
def test_hf_layout_gives_our_logits(tie):
    m = tiny_model(tie=tie)
    ids = torch.randint(0, 50, (2, 9))
    params = cw.normalize_params(m.args.to_params_json(), base_state_dict(m))
    hf = cw.meta_to_hf(base_state_dict(m), params)
    assert ("lm_head.weight" in hf) != tie
    got = hf_forward(hf, cw.params_to_hf_config(params), ids)
    assert torch.allclose(got, logits(m, ids), atol=1e-5)
    # the check can fail: without the q/k permutation the HF forward differs
    hf["model.layers.0.self_attn.q_proj.weight"] = cw.meta_to_hf(base_state_dict(m), {**params, "n_heads": 1})[
        "model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(hf_forward(hf, cw.params_to_hf_config(params), ids), logits(m, ids), atol=1e-3)


def test_hf_fixture_imports_to_transformers_logits(tmp_path):
    """peft_tiny_hf was saved by transformers (LLaMA 3.1 RoPE scaling, GQA): converted, our model gives
    transformers' logits, near position 0 and at far positions where the scaling matters."""
    exp = load_file(FIX / "peft_expected.safetensors")
    assert run_cli(FIX / "peft_tiny_hf", tmp_path / "ours", "--dtype", "fp32", "--no-tokenizer") is None
    params = json.loads((tmp_path / "ours" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["n_kv_heads"] == 2 and params["rope_theta"] == 500000.0
    m = build(tmp_path / "ours")
    ids = exp["input_ids"]
    assert torch.allclose(logits(m, ids, exp["pos_near"]), exp["base_near"], atol=1e-5)
    assert torch.allclose(logits(m, ids, exp["pos_far"]), exp["base_far"], atol=3e-4)  # fp32 angles in HF
    # the test's HF forward reproduces transformers too (so the other HF checks mean something)
    hf_sd = load_file(FIX / "peft_tiny_hf" / "model.safetensors")
    hf_cfg = json.loads((FIX / "peft_tiny_hf" / "config.json").read_text())
    hf_cfg["rope_scaling"] = {k: v for k, v in hf_cfg["rope_parameters"].items() if k != "rope_theta"}
    hf_cfg["rope_theta"] = hf_cfg["rope_parameters"]["rope_theta"]
    assert torch.allclose(hf_forward(hf_sd, hf_cfg, ids, exp["pos_far"]), exp["base_far"], atol=1e-5)
    # without the scaling the far logits are clearly different
    plain = Transformer(ModelArgs.from_params_json(tmp_path / "ours" / "params.json", use_scaled_rope=False))
    plain.load_base_weights(read_state_dict(tmp_path / "ours"))
    assert (logits(plain.eval(), ids, exp["pos_far"]) - exp["base_far"]).abs().max() > 1e-2


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_merged_hf_and_meta_export_give_adapted_logits(tmp_path, adapter):
    m = tiny_model(adapter, layers=[1] if adapter == "dora" else None)
    save_ours(m, tmp_path / "model")
    ids = torch.randint(0, 50, (2, 9))
    want = logits(m, ids)
    assert (want - logits(tiny_model(), ids)).abs().max() > 1e-2       # the adapter matters
    assert run_cli("--export", "hf", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   "--dtype", "fp32", tmp_path / "hf") is None
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["num_hidden_layers"], cfg["vocab_size"]) == (32, 48, 4, 2, 2, 50)
    hf_sd = load_file(tmp_path / "hf" / "model.safetensors")
    assert not any("lora" in k or "magnitude" in k or "echo" in k for k in hf_sd)
    assert torch.allclose(hf_forward(hf_sd, cfg, ids), want, atol=1e-4)
    assert run_cli("--export", "meta", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   "--dtype", "fp32", tmp_path / "meta") is None
    assert torch.allclose(logits(build(tmp_path / "meta"), ids), want, atol=1e-4)
    # folding in fp32 is what model/lora.py's merge does
    merge_adapters(m)
    folded = cw.fold_adapter(base_state_dict(tiny_model(adapter, layers=[1] if adapter == "dora" else None)),
                             *cw.read_adapter(tmp_path / "model" / "adapter"))
    for k, v in base_state_dict(m).items():
        assert torch.allclose(folded[k], v, atol=1e-6), k


# ---------------------------------------------------------------------------------------------------------------
# round trips

def test_round_trip_meta_hf_meta_exact(tmp_path):
    m = tiny_model()
    sd = base_state_dict(m)
    src = tmp_path / "meta"
    src.mkdir()
    torch.save(sd, src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps(m.args.to_params_json()))
    for dtype in ("fp32", "bf16"):
        assert run_cli(src, tmp_path / f"ours_{dtype}", "--dtype", dtype, "--no-tokenizer") is None
        assert run_cli("--export", "hf", "--model", tmp_path / f"ours_{dtype}", "--dtype", dtype,
                       tmp_path / f"hf_{dtype}") is None
        assert run_cli(tmp_path / f"hf_{dtype}", tmp_path / f"back_{dtype}", "--dtype", dtype, "--no-tokenizer") is None
        back = load_file(tmp_path / f"back_{dtype}" / "model.safetensors")
        assert_same(back, {k: v.to(cw.DTYPES[dtype]) for k, v in sd.items()})


def test_round_trip_hf_meta_hf_exact(tmp_path):
    src = FIX / "peft_tiny_hf"
    assert run_cli(src, tmp_path / "ours", "--dtype", "fp32", "--no-tokenizer") is None
    assert run_cli("--export", "meta", "--model", tmp_path / "ours", "--dtype", "fp32", tmp_path / "meta") is None
    assert (tmp_path / "meta" / "consolidated.00.pth").exists()
    assert run_cli(tmp_path / "meta", tmp_path / "ours2", "--dtype", "fp32", "--no-tokenizer") is None
    assert run_cli("--export", "hf", "--model", tmp_path / "ours2", "--dtype", "fp32", tmp_path / "hf") is None
    assert_same(load_file(tmp_path / "hf" / "model.safetensors"), load_file(src / "model.safetensors"))
    a = json.loads((src / "config.json").read_text())
    b = json.loads((tmp_path / "hf" / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
              "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert a[k] == b[k], k
    scaling = {k: v for k, v in a["rope_parameters"].items() if k != "rope_theta"}
    assert b["rope_scaling"] == scaling and b["rope_theta"] == a["rope_parameters"]["rope_theta"]
    assert cw.hf_config_to_params(a) == cw.hf_config_to_params(b)


# ---------------------------------------------------------------------------------------------------------------
# model-parallel shards

def split_like_meta(sd, n, embedding_dim):
    """Split a 1-shard Meta checkpoint the way Meta's fairscale model-parallel layers hold it."""
    column = ("wq", "wk", "wv", "w1", "w3")
    shards = [{} for _ in range(n)]
    for k, v in sd.items():
        name = k.split(".")[-2]
        if k == "tok_embeddings.weight":
            d = embedding_dim
        elif name in column or k == "output.weight":
            d = 0
        elif name in ("wo", "w2"):
            d = 1
        else:
            d = None     # norms are replicated
        for i in range(n):
            shards[i][k] = v.clone() if d is None else v.chunk(n, dim=d)[i].clone()
            shards[i]["rope.freqs"] = torch.randn(4)
    return shards


def write_shards(folder, shards, params):
    folder.mkdir()
    for i, s in enumerate(shards):
        torch.save(s, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("style,embedding_dim", [("llama2", 1), ("llama3", 0)])
def test_two_shards_merge_to_the_one_shard_model(tmp_path, style, embedding_dim):
    m = tiny_model()
    sd = base_state_dict(m)
    # Meta's own params.json: no hidden_dim (multiple_of rule), LLaMA 2 writes vocab_size -1
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
              "ffn_dim_multiplier": 0.5, "norm_eps": 1e-5, "vocab_size": -1 if style == "llama2" else 50}
    assert cw.ffn_hidden_dim(params) == 48
    write_shards(tmp_path / "one", split_like_meta(sd, 1, embedding_dim), params)
    write_shards(tmp_path / "two", split_like_meta(sd, 2, embedding_dim), params)
    shard0 = torch.load(tmp_path / "two" / "consolidated.00.pth")
    assert shard0["tok_embeddings.weight"].shape[embedding_dim] * 2 == sd["tok_embeddings.weight"].shape[embedding_dim]
    assert run_cli(tmp_path / "one", tmp_path / "out1", "--dtype", "fp32", "--no-tokenizer") is None
    assert run_cli(tmp_path / "two", tmp_path / "out2", "--dtype", "fp32", "--no-tokenizer") is None
    a, b = load_file(tmp_path / "out1" / "model.safetensors"), load_file(tmp_path / "out2" / "model.safetensors")
    assert_same(a, b)
    assert_same(a, sd)
    ids = torch.randint(0, 50, (1, 7))
    assert torch.equal(logits(build(tmp_path / "out2"), ids), logits(m, ids))
    assert json.loads((tmp_path / "out2" / "params.json").read_text())["vocab_size"] == 50


# ---------------------------------------------------------------------------------------------------------------
# PEFT

def test_peft_fixture_imports_to_peft_logits(tmp_path):
    """Adapters saved by peft, imported (peft -> ours): our model gives peft's logits, unmerged and merged."""
    exp = load_file(FIX / "peft_expected.safetensors")
    assert run_cli(FIX / "peft_tiny_hf", tmp_path / "ours", "--dtype", "fp32", "--no-tokenizer") is None
    for name in ("lora", "dora"):
        assert run_cli(FIX / f"peft_tiny_{name}", tmp_path / name, "--model", tmp_path / "ours") is None
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["method"] == name
        m = build(tmp_path / "ours", tmp_path / name)
        got = logits(m, exp["input_ids"], exp["pos_near"])
        assert (got - exp["base_near"]).abs().max() > 1e-2
        assert torch.allclose(got, exp[f"{name}_near"], atol=1e-4), name
        merge_adapters(m)
        assert torch.allclose(logits(m, exp["input_ids"], exp["pos_near"]), exp[f"{name}_merged_near"], atol=1e-4)


def test_peft_export_follows_peft_layout(tmp_path):
    """ours -> PEFT reproduces peft's own files: same keys, shapes, tensors (q/k rows back in HF order),
    and the config fields peft reads."""
    layout = json.loads((FIX / "peft_layout.json").read_text())
    assert run_cli(FIX / "peft_tiny_hf", tmp_path / "ours", "--dtype", "fp32", "--no-tokenizer") is None
    for name in ("lora", "dora"):
        assert run_cli(FIX / f"peft_tiny_{name}", tmp_path / name, "--model", tmp_path / "ours") is None
        assert run_cli("--export", "peft", "--model", tmp_path / "ours", "--adapter", tmp_path / name,
                       tmp_path / f"peft_{name}") is None
        got = load_file(tmp_path / f"peft_{name}" / "adapter_model.safetensors")
        assert {k: list(v.shape) for k, v in got.items()} == layout[name]["keys"]
        assert_same(got, load_file(FIX / f"peft_tiny_{name}" / "adapter_model.safetensors"))
        ours_cfg = json.loads((tmp_path / f"peft_{name}" / "adapter_config.json").read_text())
        peft_cfg = layout[name]["adapter_config"]
        assert set(ours_cfg) <= set(peft_cfg)
        for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_dora", "bias", "fan_in_fan_out",
                  "layers_to_transform", "use_rslora"):
            assert ours_cfg[k] == peft_cfg[k], (name, k)
        assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_peft_export_names_a_base_transformers_can_load(tmp_path, capsys):
    """base_model_name_or_path: --base-model-name-or-path; else params.json's hf_repo_id (an HF import keeps
    config.json's hub id there); else the HF folder itself; else the base written in HF layout to OUT/base/,
    said in one line."""
    m = tiny_model("lora")
    save_ours(m, tmp_path / "model")
    adapter = tmp_path / "model" / "adapter"

    def exported(*flags, model=tmp_path / "model"):
        out = tmp_path / f"peft{len(list(tmp_path.glob('peft*')))}"
        assert run_cli("--export", "peft", "--model", model, "--adapter", adapter, *flags, out) is None
        return json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]

    assert exported("--base-model-name-or-path", "org/name") == "org/name"
    assert "warning" not in capsys.readouterr().err
    assert exported() == str(tmp_path / "peft1" / "base")
    err = capsys.readouterr().err
    said = err.splitlines()                          # (and the export's no-tokenizer warning: a tiny model)
    assert "HF layout" in said[0] and "--base-model-name-or-path" in said[0]
    assert all("no tokenizer" in line for line in said[1:])
    base = tmp_path / "peft1" / "base"             # what AutoPeftModelForCausalLM loads: a whole HF model
    assert json.loads((base / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert_same(cw.hf_to_meta(load_file(base / "model.safetensors"), m.args.to_params_json()), base_state_dict(m))
    hf = tmp_path / "hf"
    assert run_cli("--export", "hf", "--model", tmp_path / "model", hf) is None
    capsys.readouterr()                                                  # (the export's no-tokenizer warning)
    assert exported(model=hf) == str(hf)                                 # transformers loads an HF folder
    assert "warning" not in capsys.readouterr().err
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama"}))
    assert run_cli(hf, tmp_path / "imported", "--no-tokenizer") is None
    assert json.loads((tmp_path / "imported" / "params.json").read_text())["hf_repo_id"] == "org/tiny-llama"
    capsys.readouterr()
    assert exported(model=tmp_path / "imported") == "org/tiny-llama"
    assert "warning" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def peft_export(tmp_path_factory):
    """A DoRA adapter trained here (attention modules) and its PEFT export."""
    tmp_path = tmp_path_factory.mktemp("peft_export")
    m = tiny_model("dora", modules=("wq", "wk", "wv", "wo"))
    save_ours(m, tmp_path / "model")
    assert run_cli("--export", "peft", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   tmp_path / "peft") is None
    return m, tmp_path


@pytest.mark.parametrize("module,n_heads", [("wq", 4), ("wk", 2), ("wv", None), ("wo", None)])
@pytest.mark.parametrize("part", ["lora_a", "lora_b", "magnitude"])
def test_peft_export_tensor(peft_export, module, n_heads, part):
    """Each PEFT tensor is ours under peft's name: B and magnitudes of q/k in HF row order, A unchanged."""
    m, tmp_path = peft_export
    got = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for layer in range(2):
        ours = getattr(getattr(m.layers[layer].attention, module), part).detach()
        want = cw.permute_rotate_half(ours, n_heads) if n_heads and part != "lora_a" else ours
        key = f"base_model.model.model.layers.{layer}.self_attn.{cw.HF_MODULES[module]}.{cw._PEFT_PARTS[part]}"
        assert torch.equal(got[key], want), key


def test_peft_export_of_our_adapter(peft_export):
    """An adapter trained here: PEFT keys/shapes as peft names them; importing it back gives the same adapter."""
    m, tmp_path = peft_export
    got = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(got) == 2 * 4 * 3
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and cfg["use_dora"] is True
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["layers_to_transform"] is None
    assert run_cli(tmp_path / "peft", tmp_path / "back", "--model", tmp_path / "model") is None
    assert_same(load_file(tmp_path / "back" / "adapter.safetensors"),
                load_file(tmp_path / "model" / "adapter" / "adapter.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# tokenizers

def byte_unicode():
    """GPT-2's printable stand-in character for each byte, as byte-level BPE vocabularies spell tokens."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + extra.index(b)) for b in range(256)}


def tiny_tokenizer_json(folder):
    """A byte-level BPE tokenizer.json (SmolLM2-style pre-tokenizer): bytes are ids 0..255, then merges."""
    u = byte_unicode()
    vocab = {u[b]: b for b in range(256)}
    vocab.update({"th": 256, "the": 257, u[32] + "c": 258, "12": 259})   # u[32] = "Ġ"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": ["t h", "th e", u[32] + " c", "1 2"]},
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Digits", "individual_digits": True}, byte_level]},
           "decoder": byte_level,
           "added_tokens": [{"id": 260, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]}
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                              "eos_token": "<|endoftext|>"}))
    return tok


def test_hf_tokenizer_json_becomes_a_tiktoken_file(tmp_path):
    from model.tokenizer import load_tokenizer
    tiny_tokenizer_json(tmp_path / "hf")
    cw.tokenizer_json_to_tiktoken(tmp_path / "hf", tmp_path)
    tok = load_tokenizer(tmp_path)
    # "the" merges fully; " cat" starts with the merged " c"; digits are split one by one, so no "12"
    assert tok.encode("the cat 12") == [257, 258, ord("a"), ord("t"), 32, ord("1"), ord("2")]
    assert tok.decode([257, 258, 0xC3, 0xA9]) == "the cé"
    assert tok.bos_id == tok.eos_id == 260
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["special_tokens"] == {"<|endoftext|>": 260}
    bad = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    bad["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="a tokenizer.model is needed"):
        cw.tokenizer_json_to_tiktoken(tmp_path / "hf", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear line, nothing left in OUT

def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or p.name == "out")


def test_bad_inputs(tmp_path):
    m = tiny_model()
    sd = base_state_dict(m)
    params = m.args.to_params_json()

    no_params = tmp_path / "no_params"
    no_params.mkdir()
    torch.save(sd, no_params / "consolidated.00.pth")
    err = run_cli(no_params, tmp_path / "out")
    assert err.startswith("error: missing params.json") and "\n" not in err

    bad_shards = split_like_meta(sd, 2, 1)
    bad_shards[1]["layers.1.attention.wk.weight"] = bad_shards[1]["layers.1.attention.wk.weight"][:-1]
    write_shards(tmp_path / "mismatch", bad_shards, params)
    err = run_cli(tmp_path / "mismatch", tmp_path / "out")
    assert "consolidated.01.pth" in err and "layers.1.attention.wk.weight" in err

    write_shards(tmp_path / "unknown", [{**sd, "layers.0.attention.wz.weight": torch.zeros(2)}], params)
    err = run_cli(tmp_path / "unknown", tmp_path / "out")        # model.load's check, naming the file
    assert "unknown/consolidated.00.pth: 1 weight(s) this model does not have, first layers.0.attention.wz.weight" in err

    hf_bad = tmp_path / "hf_bad"
    hf_bad.mkdir()
    hf = cw.meta_to_hf(sd, cw.normalize_params(params, sd))
    save_file({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, hf_bad / "model.safetensors")
    (hf_bad / "config.json").write_text(json.dumps(cw.params_to_hf_config(cw.normalize_params(params, sd))))
    assert "unknown key 'model.layers.0.self_attn.q_proj.bias'" in run_cli(hf_bad, tmp_path / "out")

    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "weights.npz").write_text("x")
    assert "neither a Meta checkpoint" in run_cli(neither, tmp_path / "out")

    other = tiny_model("lora")
    other.args.dim = 48  # an adapter whose config says it was trained on another base
    save_ours(tiny_model("lora"), tmp_path / "model")
    save_adapter(other, tmp_path / "other_adapter")
    err = run_cli("--export", "hf", "--model", tmp_path / "model", "--adapter", tmp_path / "other_adapter",
                  tmp_path / "out")
    assert "dim=48" in err and "dim=32" in err
    wrong = tiny_model("lora")
    wrong.layers[0].attention.wq.lora_b = torch.nn.Parameter(torch.zeros(30, 4))
    save_adapter(wrong, tmp_path / "wrong_adapter")
    err = run_cli("--export", "peft", "--model", tmp_path / "model", "--adapter", tmp_path / "wrong_adapter",
                  tmp_path / "out")
    assert "layers.0.attention.wq.lora_b" in err and "(30, 4)" in err
    assert leftovers(tmp_path) == []


def test_output_is_atomic(tmp_path, monkeypatch):
    save_ours(tiny_model(), tmp_path / "model")
    (tmp_path / "model" / "tokenizer.model").write_text("x")

    def fail(*a):
        raise ValueError("tokenizer copy failed")
    monkeypatch.setattr(cw, "copy_tokenizer", fail)
    assert run_cli("--export", "meta", "--model", tmp_path / "model", tmp_path / "out") == "error: tokenizer copy failed"
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert "exists and is not empty" in run_cli("--export", "meta", "--model", tmp_path / "model", tmp_path / "out")
    assert run_cli("--export", "meta", "--model", tmp_path / "model", "--force", tmp_path / "out") is None
    assert sorted(os.listdir(tmp_path / "out")) == ["consolidated.00.pth", "params.json", "tokenizer.model"]


def test_cli_error_is_one_line_on_stderr(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(tmp_path), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


# ---------------------------------------------------------------------------------------------------------------
# real models

@needs_shared
def test_stories260k_converts_and_generates(tmp_path):
    from model.generate import generate
    from model.load import load_model
    assert run_cli(STORIES, tmp_path / "ours", "--dtype", "fp32") is None
    assert sorted(os.listdir(tmp_path / "ours")) == ["model.safetensors", "params.json", "tokenizer.model"]
    model, tok = load_model(tmp_path / "ours")
    text = "Once upon a time" + generate(model, tok, ["Once upon a time"], max_new_tokens=40)[0]
    assert text.startswith(STORIES_TEXT[:100]) and STORIES_TEXT.startswith(text.rstrip())
    # Meta -> HF -> Meta, exact
    assert run_cli("--export", "hf", "--model", tmp_path / "ours", "--dtype", "fp32", tmp_path / "hf") is None
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["bos_token_id"] == tok.bos_id
    assert run_cli(tmp_path / "hf", tmp_path / "back", "--dtype", "fp32") is None
    assert_same(load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors"))
    original = torch.load(STORIES / "consolidated.00.pth", weights_only=True)
    assert_same({k: v for k, v in original.items() if k != "output.weight"},
                load_file(tmp_path / "back" / "model.safetensors"))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip("../shared SmolLM2 GGUF not present")
    root = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, str(SHARED / "tools" / "gguf_to_meta.py"), str(gguf), str(root / "meta")],
                   check=True, capture_output=True)
    assert run_cli(root / "meta", root / "ours", "--dtype", "fp32") is None
    return root


@needs_shared
def test_smollm2_converts_to_known_nll(smollm2):
    from model.load import load_model
    assert sorted(os.listdir(smollm2 / "ours")) == ["model.safetensors", "params.json", "tokenizer.model",
                                                    "tokenizer_config.json"]
    model, tok = load_model(smollm2 / "ours")
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is Berlin.")])
    nll = F.cross_entropy(logits(model.eval(), ids)[0, :-1], ids[0, 1:]).item()
    assert abs(nll - 1.714) < 0.01


# ---------------------------------------------------------------------------------------------------------------
# optional: the real libraries (skipped unless transformers / peft are installed)

def test_transformers_and_peft_load_the_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    m = tiny_model("dora", modules=("wq", "wk", "wv", "wo", "w1"))
    save_ours(m, tmp_path / "model")
    ids = torch.randint(0, 50, (2, 9))
    assert run_cli("--export", "hf", "--model", tmp_path / "model", "--dtype", "fp32", tmp_path / "hf") is None
    assert run_cli("--export", "hf", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   "--dtype", "fp32", tmp_path / "merged") is None
    assert run_cli("--export", "peft", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   tmp_path / "peft") is None
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, logits(m, ids), atol=1e-4)
        assert torch.allclose(adapted(input_ids=ids).logits, logits(m, ids), atol=1e-4)


def test_tokenizer_json_conversion_matches_hf_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from model.tokenizer import load_tokenizer
    tok_json = tiny_tokenizer_json(tmp_path / "hf")
    cw.tokenizer_json_to_tiktoken(tmp_path / "hf", tmp_path)
    hf = tokenizers.Tokenizer.from_str(json.dumps(tok_json))
    ours = load_tokenizer(tmp_path)
    for text in ["the cat 12", "  the  theme 1234 cé!", "th\nthe\tc 9c"]:
        assert ours.encode(text) == hf.encode(text).ids, text
