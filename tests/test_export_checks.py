"""convert_weights.py / model loading: exact fp32 merges, reported bf16 drift, kept dtypes, and bad input
(non-finite adapters, damaged files, inconsistent PEFT configs, missing tokenizers, broken JSON) refused
with one line naming the file."""
import base64
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_weights as cw
from model.load import read_state_dict
from model.lora import ADAPTER_KEYS, load_adapter, merge_adapters, read_adapter_config
from test_convert import base_state_dict, build, leftovers, logits, run_cli, save_ours, tiny_model


def cast_base(m, dtype):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.rsplit(".", 1)[-1] not in ADAPTER_KEYS:
                p.data = p.data.to(dtype)


def bf16_model(tmp_path, adapter="dora"):
    """A tiny model whose base is stored in bf16 (as train.py's bases are), with an fp32 adapter."""
    m = tiny_model(adapter)
    cast_base(m, torch.bfloat16)
    save_ours(m, tmp_path / "model")
    cast_base(m, torch.float32)   # the same bf16 values, computed in fp32 from here on
    for layer in m.adapter_linears():
        if layer.dora:
            layer.cache_base_norm()
    return m


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_fp32_export_is_the_exact_fp32_merge(tmp_path, adapter, capsys):
    m = bf16_model(tmp_path, adapter)
    assert run_cli("--export", "meta", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   "--dtype", "fp32", tmp_path / "meta") is None
    assert "note: " in capsys.readouterr().out            # bf16 -> fp32 is said, not silent
    got = read_state_dict(tmp_path / "meta")
    merge_adapters(m)                                     # LoRALinear.merge on fp32 weights: no rounding
    want = base_state_dict(m)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    # a bf16 export of the same merge is not exact: the fp32 one kept what rounding would lose
    assert run_cli("--export", "meta", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   tmp_path / "bf16") is None
    wq = "layers.0.attention.wq.weight"
    assert read_state_dict(tmp_path / "bf16")[wq].dtype == torch.bfloat16
    assert not torch.equal(read_state_dict(tmp_path / "bf16")[wq].float(), want[wq])


def test_bf16_export_reports_its_drift(tmp_path, capsys):
    m = bf16_model(tmp_path)
    capsys.readouterr()
    assert run_cli("--export", "hf", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   tmp_path / "hf") is None
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("merge drift (bfloat16)")]
    assert len(line) == 1, out
    drift, effect = map(float, re.findall(r"max \|Δlogit\| (\S+) .* up to (\S+?)\)", line[0])[0])
    # the same numbers, recomputed here: the bf16 export (via the Meta layout) vs the unmerged fp32 adapter
    assert run_cli("--export", "meta", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   tmp_path / "meta") is None
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    want = logits(m, ids)
    assert drift == pytest.approx((logits(build(tmp_path / "meta"), ids) - want).abs().max().item(), rel=1e-2)
    for layer in m.adapter_linears():
        layer.enabled = False
    assert effect == pytest.approx((want - logits(m, ids)).abs().max().item(), rel=1e-2)
    assert 0 < drift < effect
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # fp32: exact, so nothing to report
    capsys.readouterr()
    assert run_cli("--export", "hf", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   "--dtype", "fp32", tmp_path / "hf32") is None
    assert "merge drift" not in capsys.readouterr().out


def test_import_keeps_fp32_unless_asked(tmp_path, capsys):
    save_ours(tiny_model(), tmp_path / "model")
    assert run_cli(tmp_path / "model", tmp_path / "kept", "--no-tokenizer") is None
    assert "note:" not in capsys.readouterr().out
    assert {v.dtype for v in load_file(tmp_path / "kept" / "model.safetensors").values()} == {torch.float32}
    assert run_cli(tmp_path / "model", tmp_path / "bf16", "--no-tokenizer", "--dtype", "bf16") is None
    assert "is stored in float32; writing bfloat16 (--dtype)" in capsys.readouterr().out
    assert {v.dtype for v in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# bad adapters and damaged files

def nan_adapter(tmp_path, value=float("nan")):
    m = tiny_model("lora")
    save_ours(m, tmp_path / "model")
    sd = load_file(tmp_path / "model" / "adapter" / "adapter.safetensors")
    sd["layers.1.attention.wv.lora_b"][3, 1] = value
    save_file(sd, tmp_path / "model" / "adapter" / "adapter.safetensors")
    return m


@pytest.mark.parametrize("fmt", ["hf", "meta", "peft"])
def test_non_finite_adapter_is_refused_by_export(tmp_path, fmt):
    nan_adapter(tmp_path, float("inf") if fmt == "meta" else float("nan"))
    err = run_cli("--export", fmt, "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                  tmp_path / "out")
    assert err.startswith("error: ") and "\n" not in err
    assert "adapter.safetensors" in err and "layers.1.attention.wv.lora_b" in err and "NaN/inf" in err
    assert leftovers(tmp_path) == []


def test_non_finite_adapter_is_refused_by_load_adapter(tmp_path):
    m = nan_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"adapter\.safetensors: adapter tensor layers\.1\.attention\.wv\.lora_b "
                                         r"has NaN/inf"):
        load_adapter(m, tmp_path / "model" / "adapter")


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("which", ["pth", "safetensors", "adapter", "header"])
def test_damaged_files_are_one_line_errors(tmp_path, which):
    m = tiny_model("lora")
    save_ours(m, tmp_path / "model")
    if which == "pth":
        assert run_cli("--export", "meta", "--model", tmp_path / "model", tmp_path / "meta") is None
        truncate(tmp_path / "meta" / "consolidated.00.pth")
        bad, argv = tmp_path / "meta" / "consolidated.00.pth", [tmp_path / "meta", tmp_path / "out", "--no-tokenizer"]
    elif which == "adapter":
        bad = tmp_path / "model" / "adapter" / "adapter.safetensors"
        truncate(bad)
        argv = ["--export", "hf", "--model", tmp_path / "model", "--adapter", bad.parent, tmp_path / "out"]
    else:
        bad = tmp_path / "model" / "model.safetensors"
        truncate(bad, 0.5 if which == "safetensors" else 0.001)
        argv = ["--export", "hf", "--model", tmp_path / "model", tmp_path / "out"]
    err = run_cli(*argv)
    assert err.startswith(f"error: {bad}: cannot read") and "\n" not in err
    assert "damaged or truncated" in err and "re-download" in err
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="damaged or truncated"):   # model/ (train.py, eval.py) says the same
        if which == "adapter":
            load_adapter(m, bad.parent)
        else:
            read_state_dict(bad.parent)


# ---------------------------------------------------------------------------------------------------------------
# PEFT target_modules, tokenizers, JSON, help

@pytest.mark.parametrize("modules,targets", [(("wq",), ["q_proj"]), (("wk", "wv", "wo"), ["k_proj", "v_proj", "o_proj"]),
                                             (("w2",), ["down_proj"])])
def test_peft_target_modules_are_the_modules_with_tensors(tmp_path, modules, targets):
    save_ours(tiny_model("lora", modules=modules, layers=[1]), tmp_path / "model")
    assert run_cli("--export", "peft", "--model", tmp_path / "model", "--adapter", tmp_path / "model" / "adapter",
                   tmp_path / "peft") is None
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    sd = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert cfg["target_modules"] == targets and cfg["layers_to_transform"] == [1]
    assert sorted({k.split(".")[6] for k in sd}) == sorted(targets) and {k.split(".")[4] for k in sd} == {"1"}


@pytest.mark.parametrize("config_modules", [["wq"], ["wq", "wk", "wv", "wo", "w1"]])
def test_adapter_config_that_disagrees_with_its_tensors_is_refused(tmp_path, config_modules):
    save_ours(tiny_model("lora", modules=("wq", "wk", "wv", "wo")), tmp_path / "model")
    path = tmp_path / "model" / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules": config_modules}))
    err = run_cli("--export", "peft", "--model", tmp_path / "model", "--adapter", path.parent, tmp_path / "out")
    assert ("unexpected adapter key layers.0.attention.wk" in err if len(config_modules) == 1
            else "missing adapter key layers.0.feed_forward.w1" in err), err
    assert leftovers(tmp_path) == []


def test_missing_tokenizer_is_an_error_unless_allowed(tmp_path):
    save_ours(tiny_model(), tmp_path / "model")
    err = run_cli(tmp_path / "model", tmp_path / "out")
    assert "has no tokenizer" in err and "--tokenizer PATH" in err and "--no-tokenizer" in err and "\n" not in err
    assert leftovers(tmp_path) == []
    # --tokenizer: a byte-level vocab of 50 ids that fits the model's 50-row embedding
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_text("".join(
        f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(48)))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"type": "tiktoken", "pattern": r"\S+|\s+", "special_tokens": {"<s>": 48, "</s>": 49}, "bos_id": 48,
         "eos_id": 49, "pad_id": None, "add_bos": True}))
    assert run_cli(tmp_path / "model", tmp_path / "out", "--tokenizer", tmp_path / "tok") is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "params.json",
                                                                    "tokenizer.model", "tokenizer_config.json"]
    # --tokenizer may name the file itself; our tokenizer_config.json beside it comes along
    assert run_cli(tmp_path / "model", tmp_path / "out2", "--tokenizer", tmp_path / "out" / "tokenizer.model") is None
    assert (tmp_path / "out2" / "tokenizer_config.json").read_text() == (tmp_path / "tok" / "tokenizer_config.json").read_text()
    # a tokenizer with more ids than the embedding has rows is refused
    (tmp_path / "tok" / "tokenizer.model").write_text("".join(
        f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    err = run_cli(tmp_path / "model", tmp_path / "out3", "--tokenizer", tmp_path / "tok")
    assert "tokenizer has 512 ids but the model's vocabulary is 50" in err
    assert "no such file" in run_cli(tmp_path / "model", tmp_path / "out3", "--tokenizer", tmp_path / "nope")
    assert leftovers(tmp_path) == ["out"]   # only the successful conversion


def test_json_errors_name_the_file(tmp_path):
    save_ours(tiny_model("lora"), tmp_path / "model")
    (tmp_path / "model" / "params.json").write_text('{"dim": 32,\n')
    err = run_cli(tmp_path / "model", tmp_path / "out", "--no-tokenizer")
    assert err == (f"error: {tmp_path / 'model' / 'params.json'}: invalid JSON at line 2 column 1: "
                   f"Expecting property name enclosed in double quotes")
    (tmp_path / "model" / "adapter" / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"adapter_config.json: invalid JSON at line 1 column 6"):
        read_adapter_config(tmp_path / "model" / "adapter")   # what model.load.load_model reads


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cw.main(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    for flag in ("--export", "--model", "--adapter", "--dtype", "--tokenizer", "--no-tokenizer", "--force"):
        block = options[options.index(flag):].split("\n  -", 1)[0]
        assert "(default:" in block, flag
