"""The commands around an NF4-trained adapter (train.py --base-format nf4): eval.py and model.generate load the
base the adapter trained on (its adapter_config.json's base_format) unless --base-format says otherwise, with a
one-line warning when it disagrees; convert_weights.py --export hf merges into dequant(W), in bf16 by default
(said in one line), in fp32 with --dtype fp32, never re-quantised. CPU, a tiny model, 2 training steps."""
import json

import pytest
import torch
from safetensors.torch import load_file

import convert_weights as cw
import eval as ev
import model.generate as gen
import train
from model import ModelArgs, Transformer
from model.load import load_model
from model.lora import lora_linears, merged_weight
from model.nf4 import NF4Weight, dequantize_nf4
from model.tokenizer import ByteTokenizer

TASK_ROWS = [{"instruction": f"choose {i}", "input": "", "output": f"answer{1 + i % 2}", "answer": f"answer{1 + i % 2}"}
             for i in range(3)]


def make_nf4_run(root, method):
    """A tiny random base folder, a 2-step run of `method` on it with --base-format nf4, and a 3-row test task."""
    torch.manual_seed(0)
    train.save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259)), ByteTokenizer(), root / "base")
    rows = [{"instruction": f"repeat {i}", "input": "", "output": "ab" * (1 + i % 5), "answer": ""} for i in range(8)]
    (root / "ds.json").write_text(json.dumps(rows))
    (root / "task").mkdir()
    (root / "task" / "test.json").write_text(json.dumps(TASK_ROWS))
    train.main(["--model", str(root / "base"), "--data", str(root / "ds.json"), "--out", str(root / "run"),
                "--template", "alpaca-short", "--max-len", "64", "--dtype", "fp32", "--no-compile", "--device", "cpu",
                "--dropout", "0", "--global-batch", "4", "--max-steps", "2", "--lr", "1e-2", "--warmup-steps", "1",
                "--base-format", "nf4", "--method", method])
    assert json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())["base_format"] == "nf4"
    return root


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    return make_nf4_run(tmp_path_factory.mktemp("qlora_cli"), "lora")


def direct_nf4_model(root):
    """The NF4 model built directly, as train.py built it: what every command should load by default."""
    model, _ = load_model(str(root / "base"), adapter_dir=root / "run" / "adapter", base_format="nf4")
    return model.eval()


@pytest.fixture
def loaded(monkeypatch):
    """Every model model.generate.load_for_inference returns (eval.py and generate both load through it)."""
    models, original = [], gen.load_for_inference

    def spy(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        models.append(model)
        return model, tokenizer
    monkeypatch.setattr(gen, "load_for_inference", spy)
    return models


def probe_logits(model):
    with torch.no_grad():
        return model(torch.arange(24)[None] * 11 % 259)


def eval_argv(root, out, *extra):
    return ["--model", str(root / "base"), "--adapter", str(root / "run"), "--tasks", str(root / "task" / "test.json"),
            "--greedy", "--max-new-tokens", "4", "--device", "cpu", *(["--out", str(out)] if out else []), *extra]


def lines(text):
    return [line for line in text.splitlines() if line]


# ----------------------------------------------------------------------------- eval.py

def test_eval_takes_nf4_from_the_adapter_and_is_the_nf4_model(nf4_run, tmp_path, capsys, loaded):
    """No flag: the header says nf4 from the adapter; the model eval built gives the logits of the NF4 model
    built directly, bit for bit, and its predictions are that model's (its plain counterpart's logits differ)."""
    ev.main(eval_argv(nf4_run, tmp_path / "r.json"))
    out, err = capsys.readouterr()
    assert "| base nf4 (the adapter's adapter_config.json)" in out and "warning" not in err
    direct = direct_nf4_model(nf4_run)
    assert loaded[0].args.base_format == "nf4"
    assert torch.equal(probe_logits(loaded[0]), probe_logits(direct))
    plain, _ = load_model(str(nf4_run / "base"), adapter_dir=nf4_run / "run" / "adapter")
    assert not torch.allclose(probe_logits(plain.eval()), probe_logits(direct), atol=1e-4)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["base_format"] == "nf4"
    task = ev.resolve_task(str(nf4_run / "task" / "test.json"), None)
    examples = ev.load_task_examples(task)
    _, records = ev.evaluate_task(direct, ByteTokenizer(), task, examples, template="alpaca-short", num_beams=1,
                                  batch_size=16, device="cpu", max_new_tokens=4)
    written = [json.loads(x) for x in (tmp_path / "r-predictions" / "task.jsonl").read_text().splitlines()]
    assert [r["response"] for r in written] == [r["response"] for r in records]


def test_eval_flag_that_disagrees_warns_in_one_line(nf4_run, tmp_path, capsys, loaded):
    ev.main(eval_argv(nf4_run, tmp_path / "r.json", "--base-format", "plain"))
    out, err = capsys.readouterr()
    assert "| base plain (--base-format)" in out
    warnings = [line for line in lines(err) if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --base-format plain, but the adapter was "
                                                         "trained on dequant(W) of an NF4 base")
    assert loaded[0].args.base_format == "plain"


def test_eval_default_names_nf4_results_apart(nf4_run):
    """An NF4 evaluation never overwrites a plain one: its results file name says nf4."""
    args = ev.parse_args(eval_argv(nf4_run, None))         # no --out: the results file's own name
    ev.check_args(args)
    assert ev.resolve_setup(args).results_path.name == "results-task-greedy-new4-nf4.json"
    args = ev.parse_args(eval_argv(nf4_run, None, "--base-format", "plain"))
    ev.check_args(args)
    assert ev.resolve_setup(args).results_path.name == "results-task-greedy-new4.json"


def test_a_runs_base_folder_is_already_dequantised():
    """train.py writes a default run's base/ as dequant(W): loading it plain is the trained model; nf4 would
    quantise it again: a flag asking for that is refused by resolve_base_format itself, with load_model's one
    line (test_nf4_on_weights_already_dequantised_is_refused_by_name), and no warning before it."""
    cfg = {"method": "lora", "base_format": "nf4"}
    assert gen.resolve_base_format(None, cfg, "runs/x/base", "runs/x/adapter")[0] == "plain"
    assert gen.resolve_base_format(None, cfg, "models/m", "runs/x/adapter")[:2] == (
        "nf4", "the adapter's adapter_config.json")
    with pytest.raises(ValueError, match=r"^runs/x/base: its weights are already dequantised from NF4 \(it is the "
                                         r"base/ of the run of adapter runs/x/adapter\); .* --base-format plain$"):
        gen.resolve_base_format("nf4", cfg, "runs/x/base", "runs/x/adapter")
    assert gen.resolve_base_format(None, None) == ("plain", "no adapter", None)
    assert gen.resolve_base_format("nf4", None)[:2] == ("nf4", "--base-format")
    assert gen.resolve_base_format("nf4", {"method": "lora"})[2].startswith("warning: --base-format nf4, but the "
                                                                            "adapter was trained on a plain base")


# ----------------------------------------------------------------------------- model.generate

def generate_argv(root, *extra):
    return ["--model", str(root / "base"), "--adapter", str(root / "run"), "--max-new-tokens", "4", "--device", "cpu",
            "hello", *extra]


def test_generate_takes_the_base_format(nf4_run, capsys, loaded):
    gen.main(generate_argv(nf4_run))
    default_out, err = capsys.readouterr()
    assert lines(err) == ["base: nf4 (the adapter's adapter_config.json)"]
    gen.main(generate_argv(nf4_run, "--base-format", "nf4"))
    assert capsys.readouterr()[0] == default_out
    gen.main(generate_argv(nf4_run, "--base-format", "plain"))
    err = capsys.readouterr()[1]
    assert len(lines(err)) == 1 and err.startswith("warning: --base-format plain, but the adapter was trained on")
    assert [m.args.base_format for m in loaded] == ["nf4", "nf4", "plain"]
    assert torch.equal(probe_logits(loaded[0]), probe_logits(direct_nf4_model(nf4_run)))


# ----------------------------------------------------------------------------- convert_weights.py --export hf

NOTICE = ("NF4 base: writing the merged model as bf16 (dequant(W) + ΔW; pass --dtype fp32 for fp32); "
          "it is not re-quantised")


def exported_meta(out):
    """The exported HF weights back in Meta names and q/k order."""
    params = cw.hf_config_to_params(json.loads((out / "config.json").read_text()))
    return cw.hf_to_meta(load_file(str(out / "model.safetensors")), params)


def expected_weights(root, dtype):
    """{key: W'} of every linear of the NF4 model: model.lora.merged_weight on the NF4 base (dequant(W) + ΔW)
    where there is an adapter, dequant(W) where there is none; then cast to dtype."""
    model = direct_nf4_model(root)
    adapted = dict(lora_linears(model))
    out = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "weight", None), NF4Weight):
            w = (merged_weight(m.weight, m.lora_a, m.lora_b, m.scale, None) if name in adapted
                 else dequantize_nf4(m.weight, torch.float32))
            out[name + ".weight"] = w.to(dtype)
    return out, adapted


@pytest.mark.parametrize("dtype_flag, dtype", [([], torch.bfloat16), (["--dtype", "fp32"], torch.float32)])
def test_hf_export_merges_into_the_dequantised_base(nf4_run, tmp_path, capsys, dtype_flag, dtype):
    out = tmp_path / "hf"
    cw.main(["--export", "hf", "--model", str(nf4_run / "base"), "--adapter", str(nf4_run / "run" / "adapter"),
             *dtype_flag, str(out)])
    printed = lines(capsys.readouterr()[0])
    assert (printed.count(NOTICE) == 1) == (dtype == torch.bfloat16)
    got = exported_meta(out)
    want, adapted = expected_weights(nf4_run, dtype)
    n_layers = json.loads((nf4_run / "base" / "params.json").read_text())["n_layers"]
    assert (len(adapted), len(want)) == (4 * n_layers, 7 * n_layers)     # wq..wo adapted; w1..w3 NF4, no adapter
    for k, w in want.items():
        assert got[k].dtype == dtype and torch.equal(got[k], w), k
    base = load_file(str(nf4_run / "base" / "model.safetensors"))
    assert torch.equal(got["tok_embeddings.weight"], base["tok_embeddings.weight"].to(dtype))   # not quantised


def test_meta_export_follows_the_adapter_too(nf4_run, tmp_path, capsys):
    out = tmp_path / "meta"
    cw.main(["--export", "meta", "--model", str(nf4_run / "base"), "--adapter", str(nf4_run / "run" / "adapter"),
             "--dtype", "fp32", str(out)])
    got = torch.load(out / "consolidated.00.pth", weights_only=True)
    for k, w in expected_weights(nf4_run, torch.float32)[0].items():
        assert torch.equal(got[k], w), k


def test_dora_export_is_the_nf4_model(tmp_path, capsys):
    """End to end for DoRA (whose merge also divides by the norm of dequant(W) + ΔW): the fp32 export, loaded
    as a plain model, gives the NF4 model's logits."""
    root = make_nf4_run(tmp_path, "dora")
    cw.main(["--export", "meta", "--model", str(root / "base"), "--adapter", str(root / "run" / "adapter"),
             "--dtype", "fp32", str(tmp_path / "meta")])
    merged, _ = load_model(str(tmp_path / "meta"))
    torch.testing.assert_close(probe_logits(merged.eval()), probe_logits(direct_nf4_model(root)), atol=1e-5, rtol=0)


def test_eval_merge_of_an_nf4_adapter_in_bf16(nf4_run, tmp_path, capsys):
    """--merge folds into dequant(W) in the compute dtype (an fp32 merged weight would not meet bf16 inputs)."""
    ev.main(eval_argv(nf4_run, tmp_path / "r.json", "--merge", "--dtype", "bf16"))
    out = capsys.readouterr()[0]
    assert "merge drift (bfloat16)" in out and "| base nf4 (" in out
    assert json.loads((tmp_path / "r.json").read_text())["merged"] is True


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("main, argv", [
    (ev.main, ["--base-format", "nf5"]),
    (gen.main, ["--model", "m", "hi", "--base-format", "nf5"]),
    (cw.main, ["--export", "hf", "--model", "m", "out", "--base-format", "nf5"]),
])
def test_a_bad_base_format_is_one_error_line(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr()[1]
    assert e.value.code == 2 and len(lines(err)) == 1 and err.startswith("error: argument --base-format: invalid")


def test_base_format_is_for_merges_only(nf4_run, tmp_path):
    with pytest.raises(SystemExit) as e:
        cw.main(["--export", "peft", "--model", str(nf4_run / "base"), "--adapter", str(nf4_run / "run" / "adapter"),
                 "--base-format", "nf4", str(tmp_path / "peft")])
    assert str(e.value) == ("error: --base-format is for --export hf / meta (merges): the PEFT export is the "
                            "adapter alone")


def test_nf4_on_weights_already_dequantised_is_refused_by_name(tmp_path):
    """load_model with base format nf4 refuses a folder whose weights are dequant(NF4(W)) already (a run's base/
    beside its NF4 adapter; a folder whose params.json says "dequantized_from": "nf4"): quantising them again
    rounds them a second time. Loaded plain, or with an adapter trained on a plain base, they load."""
    from model.lora import save_adapter
    torch.manual_seed(0)
    base = tmp_path / "run" / "base"
    train.save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259)), ByteTokenizer(), base)
    nf4, _ = load_model(tmp_path / "run" / "base", adapter="lora", base_format="nf4")
    save_adapter(nf4, tmp_path / "run" / "adapter")
    base, adapter = tmp_path / "run" / "base", tmp_path / "run" / "adapter"
    with pytest.raises(ValueError) as e:
        load_model(base, adapter_dir=adapter, base_format="nf4")
    assert str(e.value) == (f"{base}: its weights are already dequantised from NF4 (it is the base/ of the run of "
                            f"adapter {adapter}); base format nf4 would quantise them a second time: load it with "
                            f"--base-format plain")
    assert load_model(base, adapter_dir=adapter)[0].args.base_format == "plain"
    plain_cfg = json.loads((adapter / "adapter_config.json").read_text())
    del plain_cfg["base_format"]
    (adapter / "adapter_config.json").write_text(json.dumps(plain_cfg))      # trained plain: quantising is a choice
    assert load_model(base, adapter_dir=adapter, base_format="nf4")[0].args.base_format == "nf4"
    params = json.loads((base / "params.json").read_text())
    (base / "params.json").write_text(json.dumps({**params, "dequantized_from": "nf4"}))   # a merged NF4 export
    with pytest.raises(ValueError, match=f'^{base}: its weights are already dequantised from NF4 \\({base}/params.json '
                                         f'says "dequantized_from": "nf4"\\)'):
        load_model(base, base_format="nf4")
    assert load_model(base)[0].args.base_format == "plain"
