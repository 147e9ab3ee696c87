"""train.py on a CUDA GPU (skipped without one): the whole-step CUDA graph (--cuda-graphs step, the
single-GPU default) and the per-block graphs (the DDP path) train exactly like the compiled step
without graphs, and the compiled step like eager bf16-free fp32 — across routed and unrouted steps,
several batch shapes and resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

import train
from training.graphs import StatsOnHost
from test_train import args, metrics, setup  # noqa: F401  (setup is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_args(setup, out, *extra):
    argv = args(setup, out, "--max-steps", "8", *extra)
    argv[argv.index("--device") + 1] = "cuda"
    return argv


def trained(out):
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def fresh_main(argv):
    """train.main in a fresh compile state, as in its own process. Dynamo remembers, per code object, which
    dimensions it has seen change (automatic dynamic shapes) across runs in one process: a second run
    would compile other kernels (dynamic instead of static, another reduction split) and differ from
    the first by fp32 reordering, which Adam then amplifies — what made [blocks] fail in the suite."""
    torch._dynamo.reset()
    return train.main(argv)


# micro-batch 2 of global batch 4: grad accumulation, so per-block graphs must keep each micro-batch's
# gradients out of the graph pool (training.graphs.keep_grads) before the next replay
GRAPH_ARGS = ("--compile", "--micro-batch", "2")


@pytest.mark.parametrize("graphs", ["step", "blocks"])
def test_cuda_graphs_train_like_the_compiled_step(setup, tmp_path, graphs):
    """Replaying CUDA graphs runs the very kernels of the compiled step, on the same inputs, in the same
    order: losses, routing, the adapter and the Echo weights are bit-identical (measured on an H200:
    0.0 for step, blocks, and blocks with grad accumulation)."""
    ref = fresh_main(gpu_args(setup, tmp_path / "off", *GRAPH_ARGS, "--cuda-graphs", "off"))
    got = fresh_main(gpu_args(setup, tmp_path / graphs, *GRAPH_ARGS, "--cuda-graphs", graphs))
    assert json.loads((got / "config.json").read_text())["opts"]["cuda_graphs"] == graphs
    mr, mg = metrics(ref), metrics(got)
    assert [m["routed"] for m in mr] == [m["routed"] for m in mg] and any(m["routed"] for m in mr)
    for x, y in zip(mr, mg):
        for key in ("loss_off", "loss_on", "loss_kd"):
            assert y[key] == x[key], (x["step"], key)
    for k, v in {**trained(ref), **load_file(str(ref / "echo.safetensors"))}.items():
        other = {**trained(got), **load_file(str(got / "echo.safetensors"))}[k]
        torch.testing.assert_close(other, v, atol=0, rtol=0, msg=k)


def test_a_stale_gradient_in_the_block_graphs_is_caught(setup, tmp_path, monkeypatch):
    """The planted bug: per-block graphs without keep_grads, so the first micro-batch's gradients sit in
    memory the next replay overwrites. It must not train silently: cudagraph trees refuse to read an
    overwritten output, or, if they did not, the result would differ from the ungraphed run."""
    import training.graphs
    ref = fresh_main(gpu_args(setup, tmp_path / "off", *GRAPH_ARGS, "--cuda-graphs", "off"))
    monkeypatch.setattr(train, "keep_grads", lambda params: None)
    monkeypatch.setattr(training.graphs, "keep_grads", lambda params: None)
    try:
        got = fresh_main(gpu_args(setup, tmp_path / "bug", *GRAPH_ARGS, "--cuda-graphs", "blocks"))
    except RuntimeError as e:
        assert "overwritten by a subsequent run" in str(e)
        return
    differs = any(not torch.equal(trained(got)[k], v) for k, v in trained(ref).items())
    assert differs, "a stale gradient went unnoticed"


@pytest.mark.parametrize("graphs", ["step", "blocks"])
def test_cuda_graphs_agree_on_a_large_kd_term(setup, tmp_path, graphs):
    """λ = 100 makes L_kd 3e-3 and 4e-3 on the first two steps (CPU fp32), far above its ~1e-7 rounding:
    graphed and ungraphed steps must agree on it to 1e-3 (on CPU, compiled and eager agree to 2e-5)."""
    extra = ("--max-steps", "2", "--echo-lambda-init", "100", "--echo-p-end", "1", "--compile")
    ref = fresh_main(gpu_args(setup, tmp_path / "off", *extra, "--cuda-graphs", "off"))
    got = fresh_main(gpu_args(setup, tmp_path / graphs, *extra, "--cuda-graphs", graphs))
    mr, mg = metrics(ref), metrics(got)
    assert all(m["routed"] for m in mr + mg) and len(mr) == 2
    for x, y in zip(mr, mg):
        assert x["loss_kd"] > 1e-3, x["step"]
        assert y["loss_kd"] == pytest.approx(x["loss_kd"], rel=1e-3), x["step"]
        assert y["loss_off"] == pytest.approx(x["loss_off"], rel=1e-5), x["step"]


@pytest.mark.parametrize("base_format", ["plain", "nf4"])
def test_compiled_gpu_step_matches_eager(setup, tmp_path, base_format):
    """The compiled, graphed step (the NF4 base through its custom op echo_lora::nf4_linear) trains like
    eager PyTorch on the GPU."""
    fmt = ("--base-format", base_format)
    eager = fresh_main(gpu_args(setup, tmp_path / "eager", "--no-compile", *fmt))
    graphed = fresh_main(gpu_args(setup, tmp_path / "graphed", "--compile", *fmt))
    assert json.loads((graphed / "config.json").read_text())["opts"]["base_format"] == base_format
    for x, y in zip(metrics(eager), metrics(graphed)):
        assert x["routed"] == y["routed"]
        assert y["loss_off"] == pytest.approx(x["loss_off"], rel=1e-3, abs=1e-5), x["step"]
    for k, v in trained(eager).items():
        torch.testing.assert_close(trained(graphed)[k], v, atol=1e-3, rtol=1e-2, msg=k)   # Adam amplifies ulps


@pytest.mark.parametrize("base_format", ["plain", "nf4"])
def test_activation_checkpointing_on_the_gpu_trains_like_without(setup, tmp_path, base_format):
    """--activation-checkpointing with the compiled blocks on CUDA (graphs off, as train.py requires): each
    block's recomputation replays its dropout draws and the compiled kernels, so losses and the trained
    adapter and Echo weights match the run that keeps its activations."""
    extra = ("--compile", "--cuda-graphs", "off", "--base-format", base_format, "--dropout", "0.1")
    ref = fresh_main(gpu_args(setup, tmp_path / "kept", *extra))
    got = fresh_main(gpu_args(setup, tmp_path / "recomputed", *extra, "--activation-checkpointing"))
    assert json.loads((got / "config.json").read_text())["opts"]["activation_checkpointing"]
    mr, mg = metrics(ref), metrics(got)
    assert [m["routed"] for m in mr] == [m["routed"] for m in mg] and any(m["routed"] for m in mr)
    for x, y in zip(mr, mg):
        assert y["loss_off"] == pytest.approx(x["loss_off"], rel=1e-5), x["step"]
    for k, v in {**trained(ref), **load_file(str(ref / "echo.safetensors"))}.items():
        other = {**trained(got), **load_file(str(got / "echo.safetensors"))}[k]
        torch.testing.assert_close(other, v, atol=1e-4, rtol=1e-3, msg=k)


def test_stats_on_host_holds_the_step_it_follows():
    """The log reads a step's stats one step late: what it reads must be that step's values, copied
    behind it on the stream, even after a later step has overwritten the device tensor."""
    stats = torch.zeros(6, device="cuda")
    for k in range(3):
        stats.fill_(k)
        held = StatsOnHost(stats)
        torch.cuda._sleep(10_000_000)                 # keep the stream busy: the copy must be queued, not done
        stats.fill_(100 + k)                           # the next step writes over the same memory
        assert held.tolist() == [float(k)] * 6
    cpu = StatsOnHost(torch.arange(3.0))
    assert cpu.tolist() == [0.0, 1.0, 2.0]
