"""load_model streams a checkpoint into the model one tensor at a time (model/load.py open_checkpoint,
load_checkpoint): model.safetensors, model-0000i-of-0000n.safetensors shards, and Meta's model-parallel
consolidated.NN.pth shards (each weight split across every shard). The model it gives equals the in-memory
load (build_model + Transformer.load_base_weights of the whole state dict) exactly, plain and NF4, with the
same random-number stream after it; an NF4 base quantises each checkpoint weight once and never a random
one. A checkpoint that disagrees with params.json, a missing or truncated shard, is refused in one line
naming the file before any model is built."""
import json

import pytest
import torch
from safetensors.torch import save_file

import model.load as load
import model.nf4 as nf4
from model.load import build_model, load_model
from model.lora import LoRALinear, save_adapter
from model.model import ModelArgs, Transformer

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3")     # Meta's split of each weight, written out independently
ROW_PARALLEL = ("wo", "w2")                          # of model/load.py's meta_split_dim, which reads the shapes


def base_state_dict(seed=0):
    """A tiny random base (tiny preset: every split size divides by 4), Meta keys, bf16 as checkpoints ship."""
    torch.manual_seed(seed)
    net = Transformer(ModelArgs.from_name("tiny"))
    return net.args, {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}


def write_folder(folder, args, state_dict, layout):
    """params.json, a byte tokenizer and the weights in `layout`: ours (model.safetensors), st3
    (3 safetensors shards), meta1 (consolidated.00.pth), meta2 (2 shards, the embedding split by columns as
    LLaMA 1/2 ship it), meta4 (4 shards, the embedding split by rows as LLaMA 3 ships it), meta2-legacy
    (meta2 in torch's pre-zip format, which cannot be memory-mapped: read whole, its pages never dropped)."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(args.to_params_json()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}))
    if layout == "ours":
        save_file(state_dict, folder / "model.safetensors")
    elif layout == "st3":
        keys = list(state_dict)
        for i in range(3):
            save_file({k: state_dict[k] for k in keys[i::3]}, folder / f"model-{i + 1:05d}-of-00003.safetensors")
    else:
        n = int(layout[4])
        for i in range(n):
            torch.save({k: meta_piece(k, w, i, n, embedding_dim=1 if n == 2 else 0) for k, w in state_dict.items()},
                       folder / f"consolidated.{i:02d}.pth", _use_new_zipfile_serialization="legacy" not in layout)
    return folder


def meta_piece(key, w, i, n, embedding_dim):
    """Shard i of n of weight `key` as Meta's model-parallel code saves it."""
    module = key.split(".")[-2]
    if key == "tok_embeddings.weight":
        dim = embedding_dim
    elif key == "output.weight" or module in COLUMN_PARALLEL:
        dim = 0
    elif module in ROW_PARALLEL:
        dim = 1
    else:
        return w.clone()                              # norms: replicated
    return w.chunk(n, dim)[i].clone()


def in_memory_load(args, state_dict, dtype=torch.float32):
    """What load_model did before it streamed: build (random base, quantised for NF4), then load the whole dict."""
    net = build_model(args, "cpu", dtype)
    net.load_base_weights(state_dict)
    net.init_dora_magnitudes()
    return net


LAYOUTS = ["ours", "st3", "meta1", "meta2", "meta4", "meta2-legacy"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("base_format, method", [("plain", None), ("plain", "dora"), ("nf4", "lora"),
                                                 ("nf4", "dora")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_load_is_the_in_memory_load(tmp_path, layout, base_format, method, dtype):
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / layout, args, sd, layout)
    kw = dict(base_format=base_format, adapter=method)
    torch.manual_seed(1)
    want = in_memory_load(ModelArgs.from_name("tiny", **kw), sd, dtype)
    want_rng = torch.get_rng_state()
    torch.manual_seed(1)
    got, _ = load_model(folder, dtype=dtype, **kw)
    assert torch.equal(torch.get_rng_state(), want_rng)    # the same stream after the load: same Echo init, dropout
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert want_sd.keys() == got_sd.keys() and all(torch.equal(want_sd[k], got_sd[k]) for k in want_sd)
    for (name, m), (_, m2) in zip(got.named_modules(), want.named_modules()):
        if isinstance(m, LoRALinear) and m.dora and m.rank:
            assert torch.equal(m.base_sq_norm, m2.base_sq_norm), name
    assert got_sd["layers.1.attention.wq.weight" if base_format == "plain" else
                  "layers.1.attention.wq.weight.packed"].float().abs().sum() > 0   # not zeros passing by chance


def count_calls(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_nf4_load_quantises_each_checkpoint_weight_once(tmp_path, monkeypatch):
    """7 linears a block, once each: the random base the model is built with is drawn, not quantised."""
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / "m", args, sd, "meta2")
    calls = count_calls(monkeypatch, nf4, "quantize_nf4")
    net, _ = load_model(folder, base_format="nf4")
    assert len(calls) == 7 * args.n_layers
    assert not nf4.NF4Weight.copies_skipped
    # the buffers are the checkpoint's, quantised (not the zeros the model was built with)
    q = nf4.quantize_nf4(sd["layers.2.feed_forward.w2.weight"])
    assert torch.equal(net.layers[2].feed_forward.w2.weight.packed, q.packed)


def test_dora_base_norm_is_computed_once_at_load(tmp_path, monkeypatch):
    """‖W‖² of each DoRA layer: once for the base and adapter together (it was three times)."""
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / "m", args, sd, "ours")
    kw = dict(adapter="dora", base_format="nf4", lora_modules=("wq", "wv"))
    net, _ = load_model(folder, **kw)
    save_adapter(net, tmp_path / "adapter")
    calls = count_calls(monkeypatch, LoRALinear, "cache_base_norm")
    load_model(folder, adapter_dir=tmp_path / "adapter", base_format="nf4")
    assert len(calls) == 2 * args.n_layers


# ------------------------------------------------------------------------------------------- bad input

def refused(monkeypatch, folder, match, **kw):
    """load_model's one-line error, raised before any model is built (nothing half-loaded)."""
    def no_build(*a, **k):
        raise AssertionError("a model was built before the checkpoint was refused")
    monkeypatch.setattr(load, "build_model", no_build)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_model(folder, **kw)
    text = str(e.value)
    assert "\n" not in text and match in text, text
    return text


def truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("layout, shard", [("st3", "model-00002-of-00003.safetensors"),
                                           ("meta4", "consolidated.01.pth"), ("ours", "model.safetensors"),
                                           ("meta1", "consolidated.00.pth")])
def test_a_truncated_shard_is_named(tmp_path, monkeypatch, layout, shard):
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / layout, args, sd, layout)
    truncate(folder / shard)
    text = refused(monkeypatch, folder, str(folder / shard), base_format="nf4")
    assert "damaged or truncated" in text


@pytest.mark.parametrize("layout, shard", [("st3", "model-00003-of-00003.safetensors"),
                                           ("st3", "model-00001-of-00003.safetensors"),
                                           ("meta4", "consolidated.02.pth")])
def test_a_missing_shard_is_named(tmp_path, monkeypatch, layout, shard):
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / layout, args, sd, layout)
    (folder / shard).unlink()
    refused(monkeypatch, folder, f"{folder / shard}: missing shard")


def test_a_missing_last_meta_shard_shows_in_the_shapes(tmp_path, monkeypatch):
    """consolidated.03.pth of 4 gone: the numbering has no gap, the pieces no longer make the weights."""
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / "m", args, sd, "meta4")
    (folder / "consolidated.03.pth").unlink()
    refused(monkeypatch, folder, f"{folder / 'consolidated.00.pth'}: tok_embeddings.weight: 3 shard(s) of a "
                                 f"[64, 64] piece cannot make the shape params.json implies [256, 64]")


@pytest.mark.parametrize("layout", ["ours", "st3", "meta2"])
@pytest.mark.parametrize("field, value, match", [("hidden_dim", 256, "params.json implies [256, 64]"),
                                                 ("n_layers", 5, "missing 9 weight(s) that params.json implies, "
                                                                 "first layers.4."),
                                                 ("n_layers", 3,
                                                  "weight(s) this model does not have, first layers.3.")])
def test_shards_that_disagree_with_params_json_are_refused(tmp_path, monkeypatch, layout, field, value, match):
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / layout, args, sd, layout)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, field: value}))
    text = refused(monkeypatch, folder, match)
    assert str(folder) in text


def test_meta_shards_that_disagree_with_each_other_are_named(tmp_path, monkeypatch):
    args, sd = base_state_dict()
    folder = write_folder(tmp_path / "m", args, sd, "meta2")
    shard = torch.load(folder / "consolidated.01.pth")
    del shard["layers.3.attention.wk.weight"]
    torch.save(shard, folder / "consolidated.01.pth")
    refused(monkeypatch, folder, f"{folder / 'consolidated.01.pth'}: key layers.3.attention.wk.weight is not in "
                                 f"every shard")


def test_tied_output_that_is_not_the_embedding_is_refused(tmp_path):
    torch.manual_seed(0)
    net = Transformer(ModelArgs.from_name("tiny", tie_word_embeddings=True))
    sd = dict(net.state_dict())
    folder = write_folder(tmp_path / "m", net.args, {**sd, "output.weight": sd["tok_embeddings.weight"]}, "st3")
    got, _ = load_model(folder)
    assert torch.equal(got.tok_embeddings.weight, sd["tok_embeddings.weight"])
    folder = write_folder(tmp_path / "bad", net.args, {**sd, "output.weight": sd["tok_embeddings.weight"] + 1}, "st3")
    with pytest.raises(ValueError, match="output.weight differs from tok_embeddings.weight"):
        load_model(folder)

