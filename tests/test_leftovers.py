"""One implementation each: a failed write's cause (model.io.disk_cause), a recorded path read back
(model.rundir.run_path), the model reproduce records, measure_speed's help and measured.json, the streamed
readers under convert_weights, the "dequantized_from" mark of an NF4 run's weights, and generate's refusal of
--base-format nf4 on them. CPU, small."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import model.io
import training.checkpoint as ckpt
import training.options
from conftest import ROOT
from model.rundir import run_path


# ------------------------------------------------------------------ a failed write's cause: one function

@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed "
                                                "writing file data/0: file write failed " + "x" * 150),
                                   OSError(28, "No space left on device")])
@pytest.mark.parametrize("free_mib", [1, 10_000])
def test_checkpoint_write_failure_gives_model_io_cause(tmp_path, monkeypatch, error, free_mib):
    usage = shutil.disk_usage(tmp_path)._replace(free=free_mib * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    path = tmp_path / "state.pt"
    msg = str(ckpt.checkpoint_write_failed(error, path))
    assert f"writing {path} failed ({model.io.disk_cause(error, path)}); the previous version is intact: free space or fix the folder, then --resume" in msg
    assert "\n" not in msg and (free_mib == 10_000 or "1 MiB free" in msg or error.strerror)


# ------------------------------------------------------------------ a recorded path read back: one function

def test_run_path_reads_back_every_path_recorded_path_writes(tmp_path):
    """train.py --config, eval, generate, convert and reproduce read a run's recorded paths with run_path: it
    must give back what recorded_path was given, wherever that can be said."""
    out = tmp_path / "runs" / "x"
    for path in [out / "data" / "train.json", out, out.parent / "base", tmp_path / "d.json", "tiny", None]:
        recorded = training.options.recorded_path(str(path) if path is not None else None, out)
        assert run_path(recorded, out) == (str(path) if path is not None else None), recorded
    assert run_path("<run folder>/../base", out) == str(out.parent / "base")            # normalised
    assert run_path("<outside the repository>/else/m", out) == "<outside the repository>/else/m"
    with pytest.raises(ValueError, match=r'"opts.model" is recorded as .* pass --model'):
        run_path("<outside the repository>/else/m", out, "model", "--model")


# ------------------------------------------------------------------ reproduce records the model it trained

def test_reproduce_records_the_model_a_run_folder_relative_path_names(tmp_path):
    from experiments import reproduce as rp
    runs = tmp_path / "runs"
    (runs / "lora-s1").mkdir(parents=True)
    (runs / "models" / "smollm2").mkdir(parents=True)
    (runs / "lora-s1" / "config.json").write_text(json.dumps({"opts": {"model": "<run folder>/../models/smollm2"}}))
    assert rp.recorded_model(tmp_path / "none.json", runs) == "<smollm2>"
    (runs / "lora-s1" / "config.json").write_text(json.dumps({"opts": {"model": "<outside the repository>/m/x"}}))
    assert rp.recorded_model(tmp_path / "none.json", runs) == "<outside the repository>/m/x"


# ------------------------------------------------------------------ measure_speed: help, and no machine paths

def test_measure_speed_help_says_each_flag_and_default_once():
    from experiments import measure_speed as ms
    text = " ".join(ms.build_parser().format_help().split("options:", 1)[1].split())
    for flag, default in [("--data-dir DATA_DIR", "shared/data/commonsense"), ("--method {lora,dora}", "lora"),
                          ("--steps STEPS", "600")]:
        shown = text.split(flag, 1)[1].split(" --", 1)[0]
        assert len(shown.split("(default:")[0].strip()) > 10 and shown.endswith(f"{default})"), (flag, shown)
    save_every = text.split("--save-every SAVE_EVERY", 1)[1].split(" --", 1)[0]
    assert save_every.count("default") == 1, save_every


def test_measured_json_records_no_machine_path(tmp_path, monkeypatch):
    from experiments import common
    from experiments import measure_speed as ms
    data = ROOT / "tests" / ".measure-speed-data"          # inside the project: recorded relative to it
    try:
        for t in common.TRAIN_TASKS:
            (data / t).mkdir(parents=True, exist_ok=True)
            (data / t / "train.json").write_text("[]")
        scratch = tmp_path / "measure-speed-x"
        (scratch / "run").mkdir(parents=True)
        (scratch / "run" / "summary.json").write_text("{}")
        (scratch / "bench.jsonl").write_text("")
        monkeypatch.chdir(ROOT)
        a = ms.build_parser().parse_args(["--model", str(ROOT / "models" / "smollm2"), "--tag", "t",
                                          "--data-dir", str(data)])
        train = ms.train_command(a, [f.absolute() for f in ms.train_files(a.data_dir)],
                                 Path(a.model).absolute(), scratch)
        assert str(ROOT) in " ".join(map(str, train))             # what runs: absolute (it runs in ROOT)
        ms.write_measured(a, tmp_path / "dest", train, scratch, scratch / "bench.jsonl")
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert (tmp_path / "dest" / "summary.json").read_text() == "{}" and (tmp_path / "dest" / "benchmark.jsonl").exists()
    command = json.loads((tmp_path / "dest" / "measured.json").read_text())["train_command"]
    assert command.startswith("python train.py --model models/smollm2 --data tests/.measure-speed-data/"), command
    assert "--out '<tmp>/measure-speed/run'" in command
    assert str(ROOT.parent) not in command and sys.executable not in command and str(tmp_path) not in command


# ------------------------------------------------------------------ NF4 run's weights say "dequantized_from"

def test_an_nf4_runs_base_folder_says_dequantized_from(tmp_path):
    from model import ModelArgs, Transformer
    from model.load import load_model
    from model.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    for fmt in ("plain", "nf4"):
        ckpt.save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259, base_format=fmt)), ByteTokenizer(),
                       tmp_path / fmt)
        assert json.loads((tmp_path / fmt / "params.json").read_text()).get("dequantized_from") == \
            (None if fmt == "plain" else "nf4")
    assert load_model(tmp_path / "plain", base_format="nf4")[0].args.base_format == "nf4"
    with pytest.raises(ValueError, match=f'^{tmp_path / "nf4"}: its weights are already dequantised from NF4 '
                                         f'\\({tmp_path / "nf4" / "params.json"} says "dequantized_from": "nf4"\\)'):
        load_model(tmp_path / "nf4", base_format="nf4")
    assert load_model(tmp_path / "nf4")[0].args.base_format == "plain"


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    from test_qlora_cli import make_nf4_run
    return make_nf4_run(tmp_path_factory.mktemp("leftovers_nf4"), "lora")


def test_merged_exports_of_an_nf4_run_say_dequantized_from(nf4_run, tmp_path, capsys):
    import convert_weights as cw
    from model.load import load_model
    run = nf4_run / "run"
    for fmt, record in (("meta", "params.json"), ("hf", "config.json")):
        for base_format, mark in (("nf4", "nf4"), ("plain", None)):
            out = tmp_path / f"{fmt}-{base_format}"
            cw.main(["--export", fmt, "--model", str(nf4_run / "base"), "--adapter", str(run), "--base-format",
                     base_format, "--dtype", "fp32", str(out)])
            assert json.loads((out / record).read_text()).get("dequantized_from") == mark, out
    cw.main([str(tmp_path / "hf-nf4"), str(tmp_path / "back"), "--no-tokenizer"])      # HF -> ours keeps it
    assert json.loads((tmp_path / "back" / "params.json").read_text())["dequantized_from"] == "nf4"
    shutil.copy(nf4_run / "base" / "tokenizer_config.json", tmp_path / "back")
    for merged in (tmp_path / "meta-nf4", tmp_path / "back"):
        with pytest.raises(ValueError, match="already dequantised from NF4"):
            load_model(merged, base_format="nf4")
    assert load_model(tmp_path / "meta-plain", base_format="nf4")[0].args.base_format == "nf4"


# ------------------------------------------------------------------ generate: the refusal, no warning first

def test_nf4_on_dequantized_weights_is_refused_before_any_warning(nf4_run, tmp_path, capsys):
    import model.generate as gen
    run = tmp_path / "run"
    shutil.copytree(nf4_run / "run" / "adapter", run / "adapter")
    shutil.copytree(nf4_run / "base", run / "base")              # a run's base/ beside its NF4 adapter
    shutil.copytree(nf4_run / "base", tmp_path / "marked")
    params = json.loads((tmp_path / "marked" / "params.json").read_text())
    (tmp_path / "marked" / "params.json").write_text(json.dumps({**params, "dequantized_from": "nf4"}))
    capsys.readouterr()
    for model_dir, why in ((run / "base", f"it is the base/ of the run of adapter {run / 'adapter'}"),
                           (tmp_path / "marked", f'{tmp_path / "marked" / "params.json"} says')):
        with pytest.raises(SystemExit) as e:
            gen.main(["--model", str(model_dir), "--adapter", str(run), "--base-format", "nf4", "--device", "cpu",
                      "--max-new-tokens", "2", "hello"])
        assert capsys.readouterr().err == ""                    # no warning before the refusal
        msg = str(e.value.code)
        assert "\n" not in msg and msg.startswith(f"error: {model_dir}: its weights are already dequantised") and \
            why in msg and msg.endswith("quantise them a second time: load it with --base-format plain"), msg


# ------------------------------------------------------------------ convert_weights reads through model.load's streamed reader

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_sharded_checkpoints_read_streamed_and_equal(tmp_path, monkeypatch, dtype, tie):
    """read_meta / read_hf of 2 Meta shards (LLaMA 2's and LLaMA 3's embedding split) and of 3 HF safetensors
    shards give every tensor of the model exactly (torch.equal, same dtype), one tensor at a time through
    model.load.read_checkpoint, never a whole-file read."""
    import convert_weights as cw
    from test_convert import assert_same, base_state_dict, split_like_meta, tiny_model, write_shards
    sd = {k: v.to(dtype) for k, v in base_state_dict(tiny_model(tie=tie)).items()}
    read = []

    def streamed(plan):
        for k, w in original(plan):
            read.append(k)
            yield k, w
    original = cw.read_checkpoint
    monkeypatch.setattr(cw, "read_checkpoint", streamed)
    monkeypatch.setattr(cw, "read_safetensors", lambda *a: pytest.fail("a whole safetensors file read"))
    for style, embedding_dim, vocab in (("llama2", 1, -1), ("llama3", 0, 50)):
        params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 48, "norm_eps": 1e-5,
                  "vocab_size": vocab, "tie_word_embeddings": tie}
        shards = split_like_meta(sd, 2, embedding_dim)
        write_shards(tmp_path / style, shards, params)
        read.clear()
        got, got_params = cw.read_meta(str(tmp_path / style))
        assert_same(got, sd)
        assert got_params["vocab_size"] == 50 and sorted(read) == sorted(sd), style
    hf = tmp_path / "hf"
    hf.mkdir()
    meta_params = cw.normalize_params({**params, "vocab_size": 50}, sd)
    cw.write_hf(sd, meta_params, str(hf), max_shard_bytes=sum(v.numel() * v.element_size() for v in sd.values()) // 3)
    assert len(list(hf.glob("model-*-of-*.safetensors"))) >= 3
    read.clear()
    got, _ = cw.read_hf(str(hf))
    assert_same(got, sd)
    assert len(read) == len(sd)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_a_truncated_shard_is_one_line_naming_it(tmp_path, layout):
    import convert_weights as cw
    from test_convert import base_state_dict, split_like_meta, tiny_model, write_shards
    sd = base_state_dict(tiny_model())
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 48, "vocab_size": 50}
    src = tmp_path / layout
    if layout == "hf":
        src.mkdir()
        cw.write_hf(sd, cw.normalize_params(params, sd), str(src), max_shard_bytes=40_000)
        victim = sorted(src.glob("model-*.safetensors"))[1]
    else:
        write_shards(src, split_like_meta(sd, 2, 0), params)
        victim = src / "consolidated.01.pth"
    victim.write_bytes(victim.read_bytes()[:-2000])
    with pytest.raises(SystemExit) as e:
        cw.main([str(src), str(tmp_path / "out"), "--no-tokenizer"])
    msg = str(e.value.code)
    assert "\n" not in msg and str(victim) in msg and "cannot read this checkpoint" in msg, msg
    assert not (tmp_path / "out").exists()


def test_a_replicated_weight_that_differs_between_shards_is_named(tmp_path):
    """Meta shards each hold the whole norms: shards that disagree are refused by convert and by load_model."""
    import convert_weights as cw
    from model.load import load_model
    from test_convert import base_state_dict, split_like_meta, tiny_model, write_shards
    sd = base_state_dict(tiny_model())
    shards = split_like_meta(sd, 2, 0)
    shards[1]["layers.1.ffn_norm.weight"] = shards[1]["layers.1.ffn_norm.weight"] + 1e-3
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 48, "vocab_size": 50}
    write_shards(tmp_path / "src", shards, params)
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}))
    want = f"{tmp_path / 'src' / 'consolidated.01.pth'}: replicated layers.1.ffn_norm.weight differs from consolidated.00.pth's"
    with pytest.raises(SystemExit) as e:
        cw.main([str(tmp_path / "src"), str(tmp_path / "out"), "--no-tokenizer"])
    assert str(e.value.code).startswith(f"error: {want}")
    with pytest.raises(ValueError, match=f"^{want}"):
        load_model(tmp_path / "src")
