"""Bad input to eval.py, `python -m model.generate` and convert_weights.py (issue 23): each is refused with
exit code != 0, ONE stderr line "error: ..." naming the culprit, no traceback, and no file that existed
changed. A case is one row of CASES. All cases fail before a model is loaded (a few tiny files, ~1 s each,
mostly the subprocess's `import torch`)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from test_eval import make_run

FIX = ROOT / "tests" / "fixtures"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid")
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")


def tree_hashes(folder):
    """{relative path: sha256} of every file under folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(argv, *, cwd, must_mention, watch=None):
    """Run `python *argv` in cwd: a non-zero exit, exactly one non-empty stderr line starting "error:" that
    contains must_mention, no traceback, and every file under `watch` (default: cwd) byte-identical."""
    watch = Path(watch or cwd)
    before = tree_hashes(watch)
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, f"accepted: {argv}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert must_mention in lines[0], lines[0]
    assert tree_hashes(watch) == before, "a file that existed was changed"
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """run/ (a train.py run: base/, adapter/, data/), adapters with broken configs, PEFT adapters with broken
    tensors or config, an existing results file and export folder, a base whose weights are damaged."""
    w = tmp_path_factory.mktemp("world")
    make_run(w / "run", n_layers=2)
    adapter_cfg = json.loads((w / "run" / "adapter" / "adapter_config.json").read_text())
    for name, cfg in (("list", [adapter_cfg]), ("rank-string", {**adapter_cfg, "rank": "4"}),
                      ("alpha-null", {**adapter_cfg, "alpha": None})):
        shutil.copytree(w / "run" / "adapter", w / name)
        (w / name / "adapter_config.json").write_text(json.dumps(cfg))
    peft_cfg = json.loads((FIX / "peft_tiny_lora" / "adapter_config.json").read_text())
    shutil.copytree(FIX / "peft_tiny_lora", w / "peft-no-r")
    (w / "peft-no-r" / "adapter_config.json").write_text(json.dumps({k: v for k, v in peft_cfg.items() if k != "r"}))
    shutil.copytree(FIX / "peft_tiny_lora", w / "peft-wrong-b")
    sd = load_file(w / "peft-wrong-b" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    sd[key] = sd[key][:-1].contiguous()
    save_file(sd, w / "peft-wrong-b" / "adapter_model.safetensors")
    damaged = w / "damaged-base"
    shutil.copytree(w / "run" / "base", damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:300])
    (w / "exported").mkdir()
    (w / "exported" / "config.json").write_text("{}")
    (w / "results.json").write_text('{"earlier": true}\n')
    (w / "folder.json").mkdir()
    (w / "folder.json" / "keep").write_text("x")
    (w / "model.gguf").write_bytes(b"GGUF")
    return w


EVAL, CONVERT, GEN = "{ROOT}/eval.py", "{ROOT}/convert_weights.py", "-m model.generate"
RUN_ARGS = "--adapter run --device cpu --greedy --limit 1"
GEN_ARGS = "--model run/base hi"

# (id, command: a script or -m module, then arguments, split on spaces; must_mention, marks)
CASES = [
    ("eval --device cuda", f"{EVAL} --adapter run --device cuda", "--device cuda", [NO_CUDA]),
    ("generate --device cuda", f"{GEN} {GEN_ARGS} --device cuda", "--device cuda", [NO_CUDA]),
    ("eval adapter_config list", f"{EVAL} --model run/base --adapter list --device cpu",
     "list/adapter_config.json: expected a JSON object", []),
    ("eval adapter_config rank string", f"{EVAL} --model run/base --adapter rank-string --device cpu",
     '"rank" must be a positive integer, got "4" (a string)', []),
    ("eval adapter_config alpha null", f"{EVAL} --model run/base --adapter alpha-null --device cpu",
     '"alpha" must be a finite number, got null', []),
    ("generate adapter_config rank string", f"{GEN} {GEN_ARGS} --adapter rank-string",
     'rank-string/adapter_config.json: "rank"', []),
    ("export adapter_config alpha null", f"{CONVERT} --export peft --model run/base --adapter alpha-null out",
     'alpha-null/adapter_config.json: "alpha"', []),
    ("eval --out a folder", f"{EVAL} {RUN_ARGS} --out folder.json", "--out folder.json is a folder", []),
    ("eval --out not .json", f"{EVAL} {RUN_ARGS} --out run", "name a .json results file", []),
    ("eval --out exists", f"{EVAL} {RUN_ARGS} --out results.json", "results.json exists", []),
    ("eval --out under a file", f"{EVAL} {RUN_ARGS} --out results.json/x.json", "is a file, not a folder", []),
    ("eval --out read-only", f"{EVAL} {RUN_ARGS} --out ro/results.json", "cannot write in", [NOT_ROOT]),
    ("eval --dtype", f"{EVAL} {RUN_ARGS} --dtype bf15", "--dtype", []),
    ("generate --temperature nan", f"{GEN} {GEN_ARGS} --temperature nan", "--temperature must be a finite", []),
    ("generate --temperature inf", f"{GEN} {GEN_ARGS} --temperature inf", "--temperature must be a finite", []),
    ("generate --temperature -1", f"{GEN} {GEN_ARGS} --temperature -1", "--temperature", []),
    ("generate --top-p nan", f"{GEN} {GEN_ARGS} --temperature 1 --top-p nan", "--top-p must be in (0, 1]", []),
    ("generate --top-p 1.5", f"{GEN} {GEN_ARGS} --temperature 1 --top-p 1.5", "--top-p must be in (0, 1]", []),
    ("generate --top-k -1", f"{GEN} {GEN_ARGS} --temperature 1 --top-k -1", "--top-k must be >= 0", []),
    ("generate --max-new-tokens 0", f"{GEN} {GEN_ARGS} --max-new-tokens 0", "--max-new-tokens must be >= 1", []),
    ("generate --num-beams 0", f"{GEN} {GEN_ARGS} --num-beams 0", "--num-beams must be >= 1", []),
    ("generate --input without --template", f"{GEN} {GEN_ARGS} --input x", "--template", []),
    ("generate --template typo", f"{GEN} {GEN_ARGS} --template alpacca", "--template", []),
    # the damaged base proves the refusal comes before any weight is read
    ("export hf into an existing folder", f"{CONVERT} --export hf --model damaged-base --adapter run/adapter exported",
     "exported exists and is not empty (use --force", []),
    ("import into an existing folder", f"{CONVERT} damaged-base exported", "use --force", []),
    ("import a GGUF file", f"{CONVERT} model.gguf out", "convert it to a Meta-layout folder first, e.g. with "
                                                          "gguf_to_meta.py", []),
    ("PEFT import without r", f"{CONVERT} peft-no-r out --model {{ROOT}}/tests/fixtures/peft_tiny_hf",
     'peft-no-r/adapter_config.json: missing key "r"', []),
    ("PEFT import wrong lora_B", f"{CONVERT} peft-wrong-b out --model {{ROOT}}/tests/fixtures/peft_tiny_hf",
     "q_proj.lora_B.weight has shape (31, 4)", []),
    ("export --base-model-name-or-path without peft",
     f"{CONVERT} --export hf --model run/base --base-model-name-or-path x/y out", "--export peft", []),
    ("convert --dtype", f"{CONVERT} run/base out --dtype bf15", "--dtype", []),
]


@pytest.mark.parametrize("command, must_mention",
                         [pytest.param(c, m, id=i, marks=marks) for i, c, m, marks in CASES])
def test_bad_input_is_refused(world, command, must_mention):
    argv = command.replace("{ROOT}", str(ROOT)).split(" ")
    ro = world / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    try:
        assert_refused(argv, cwd=world, must_mention=must_mention)
    finally:
        ro.chmod(0o755)
    assert not (world / "out").exists()


def test_default_results_file_that_exists_is_refused_before_evaluating(world):
    """The default path (RUN/eval/results-<settings>.json) is protected like --out."""
    import eval as ev
    args = ev.parse_args(["--adapter", str(world / "run"), "--device", "cpu", "--greedy", "--limit", "1"])
    ev.check_args(args)
    path = ev.resolve_setup(args).results_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    try:
        assert_refused([ROOT / "eval.py", "--adapter", "run", "--device", "cpu", "--greedy", "--limit", "1"],
                       cwd=world, must_mention="pass --force to overwrite it")
    finally:
        path.unlink()


def test_read_only_out_folder_is_refused_in_process(world, monkeypatch):
    """The read-only case for root too (root may write anywhere, so the subprocess case skips): eval and
    convert ask os.access before anything runs."""
    import convert_weights as cw
    import eval as ev
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(SystemExit) as e:
        ev.main(["--adapter", str(world / "run"), "--device", "cpu", "--out", str(world / "x" / "r.json")])
    assert str(e.value.code).startswith("error: --out ") and "cannot write in" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cw.main(["--export", "meta", "--model", str(world / "run" / "base"), str(world / "x" / "out")])
    assert "cannot write in" in str(e.value.code)
    assert not (world / "x").exists()


def test_base_evals_of_two_models_have_their_own_default_path(world, monkeypatch):
    import eval as ev
    monkeypatch.chdir(world)
    paths = []
    for model in ("run/base", "damaged-base"):
        args = ev.parse_args(["--model", model, "--tasks", "run/data/test.json", "--device", "cpu"])
        ev.check_args(args)
        paths.append(ev.resolve_setup(args).results_path)
    assert paths[0] != paths[1]
    assert paths[0].parent == Path("runs/eval-base/run-base") and paths[1].parent == Path("runs/eval-base/damaged-base")


@pytest.mark.parametrize("short, long", [("bf16", "bfloat16"), ("fp32", "float32"), ("fp16", "float16")])
def test_dtype_has_both_spellings_in_every_cli(short, long):
    import eval as ev
    from model import generate as gen
    from model.load import torch_dtype
    for spelling in (short, long):
        e = ev.parse_args(["--device", "cpu", "--dtype", spelling])
        ev.check_args(e)
        assert e.dtype == long                       # eval records torch's name, as before
        assert gen.parse_args(["--model", "m", "x", "--dtype", spelling]).dtype == short
        assert torch_dtype(spelling) == getattr(torch, long)


def test_adapter_file_follows_the_umask(tmp_path):
    """tempfile writes 0600; the adapter must get what any new file gets (0644 under umask 022)."""
    from model.lora import save_adapter
    from model.model import ModelArgs, Transformer
    old = os.umask(0o022)
    try:
        save_adapter(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=16, multiple_of=16,
                                           adapter="lora", lora_rank=2)), tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_model_package_has_no_import_cycle():
    """model/io.py is the bottom: nothing in model/ imports a module that imports it back."""
    import ast
    graph = {}
    for f in (ROOT / "model").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.add(node.module)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("model."):
                deps.add(node.module.split(".")[1])
        graph[f.stem] = deps - {None}
    assert graph["io"] == set()

    def reach(start, seen):
        for d in graph.get(start, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen
    for name in graph:
        if name != "__init__":
            assert name not in reach(name, set()), f"model/{name}.py is in an import cycle"
