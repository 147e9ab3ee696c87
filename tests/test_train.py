"""train.py: 2 gloo processes = 1 process with the same global batch (routed and unrouted steps),
resume = uninterrupted run, the loss is a token mean over the global batch however it is cut into
micro-batches, the built-in default run learns, and bad input stops with a one-line error."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import train
from training.log import step_flops
from conftest import ROOT
from echo import EchoConfig, EchoModule, supervision
from model import ModelArgs, Transformer
from model.tokenizer import ByteTokenizer

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
WALL_CLOCK = ("tokens_per_s", "padded_tokens_per_s", "mfu", "peak_gib", "seconds", "warmup")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random base model folder and 16 rows whose answers are 3..11 tokens long."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    train.save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259)), ByteTokenizer(), root / "base")
    rows = [{"instruction": f"repeat {i}", "input": "", "output": "ab" * (1 + i % 5), "answer": ""}
            for i in range(16)]
    (root / "ds.json").write_text(json.dumps(rows))
    return root


def args(setup, out, *extra):
    """6 steps of global batch 4 (4 steps per epoch, so epoch 1 is entered) with Echo; the router
    probability falls from 1 to 0, so the run has routed and unrouted steps."""
    return ["--model", str(setup / "base"), "--data", str(setup / "ds.json"), "--out", str(out),
            "--template", "alpaca-short", "--max-len", "64", "--dtype", "fp32", "--no-compile", "--device", "cpu",
            "--dropout", "0", "--global-batch", "4", "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "1",
            "--seed", "3", "--echo", "--echo-targets", "1", "--echo-sources", "2", "3",
            "--echo-p-start", "1", "--echo-p-end", "0", *extra]


def metrics(out):
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def trained(out):
    return {**load_file(str(out / "adapter" / "adapter.safetensors")), **load_file(str(out / "echo.safetensors"))}


def assert_same_run(a, b, atol):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, len(ma) + 1))
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys() and x["routed"] == y["routed"] and x["epoch"] == y["epoch"]
        for k, v in x.items():
            assert v == pytest.approx(y[k], abs=atol), (x["step"], k)
    ta, tb = trained(a), trained(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0, msg=k)
    # AdamW's moments hold the gradients' scale, which the update m / sqrt(v) does not show
    oa, ob = (torch.load(d / "checkpoint" / "state.pt", weights_only=False)["optimizers"] for d in (a, b))
    assert oa.keys() == ob.keys()
    for name in oa:
        sa, sb = oa[name]["state"], ob[name]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sa[i][k], sb[i][k], atol=atol * sa[i][k].abs().max(), rtol=0)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process(setup, tmp_path):
    """The multi-node path users take on a cluster, on localhost: two torchrun "nodes" (--nnodes 2,
    --node-rank 0 / 1, c10d rendezvous, gloo), one process each. Global batch 4 = 2 ranks ×
    micro-batch 2, against 1 process × 2 micro-batches of 2: same metrics, adapter, Echo weights and
    Adam moments. The adapter can only match if both ranks took the same routing decision on every
    step (the Echo-on pass adds the L_on and L_kd gradients to the adapter)."""
    two, one = tmp_path / "two", tmp_path / "one"
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "echo-test", str(ROOT / "train.py"),
                               *args(setup, two, "--micro-batch", "2", "--grad-clip", "0")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "routing identical on all 2 ranks" in logs[0] + logs[1]
    train.main(args(setup, one, "--micro-batch", "2", "--grad-clip", "0"))

    c2, c1 = (json.loads((d / "config.json").read_text()) for d in (two, one))
    assert (c2["world_size"], c2["grad_accum"], c1["world_size"], c1["grad_accum"]) == (2, 1, 1, 2)
    routed = [m["routed"] for m in metrics(one)]
    assert True in routed and False in routed
    assert [m["epoch"] for m in metrics(one)] == [0, 0, 0, 0, 1, 1]
    assert_same_run(two, one, atol=1e-6)


class Crash(Exception):
    pass


def crash_in_step(monkeypatch, n):
    """Make the n-th optimizer step die with Crash, inside the step before its update (clip_grad_norm_ is
    called once per step)."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_crash(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise Crash
        return clip(*a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_crash)


@pytest.mark.parametrize("dropout,checkpoint_step", [(0.0, 4), (0.1, 2)])
def test_resume_equals_uninterrupted(setup, tmp_path, monkeypatch, dropout, checkpoint_step):
    """Checkpoints every 2 steps; the process dies during step checkpoint_step + 2 (after logging
    step checkpoint_step + 1). --resume must drop that orphan log line, restore the adapter, Echo
    weights, AdamW, LR schedule, router and RNG (LoRA dropout draws), and the data position (step 4
    ends epoch 0, step 2 is mid-epoch), so the run ends exactly as an uninterrupted one."""
    extra = ("--dropout", str(dropout), "--save-every", "2", "--max-steps", "7")
    train.main(args(setup, tmp_path / "full", *extra))

    crash_in_step(monkeypatch, checkpoint_step + 2)
    with pytest.raises(Crash):
        train.main(args(setup, tmp_path / "resumed", *extra))
    monkeypatch.undo()
    assert len(metrics(tmp_path / "resumed")) == checkpoint_step + 1
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == checkpoint_step

    train.main(args(setup, tmp_path / "resumed", *extra, "--resume"))
    assert_same_run(tmp_path / "resumed", tmp_path / "full", atol=1e-6)


def test_loss_is_token_mean_over_the_global_batch(setup):
    """Micro-batches with different answer-token counts, each loss divided by the count of the whole
    global batch (as train.py does): the accumulated gradient equals the gradient of the token-mean
    loss over the global batch, computed here with a plain forward and cross-entropy (Echo off), or
    with the whole global batch as one micro-batch (Echo on: rows are independent)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", vocab_size=259, adapter="lora", lora_rank=4,
                                            lora_dropout=0.0, lora_modules=ALL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)        # non-zero B so every adapter weight gets a gradient
    echo = EchoModule(EchoConfig(target_layers=(1,), source_layers=(2, 3), gate_bias_init=0.0), model.args)
    model, echo = model.double(), echo.double()
    step = train.EchoStep(model, echo)
    assert step.echo is echo
    ds = data.load_dataset(setup / "ds.json", ByteTokenizer(), "alpaca-short", 64)
    _, mbs = next(iter(data.batches(ds, global_batch=8, micro_batch=2, seed=1)))
    n_global = mbs[0]["global_n_targets"]
    assert len({mb["n_targets"] for mb in mbs}) > 1 and sum(mb["n_targets"] for mb in mbs) == n_global

    def grads(micro_batches, routed, normalizer):
        step.zero_grad(set_to_none=True)
        for mb in micro_batches:
            index, targets, boundary = supervision(mb["labels"], bucket=train.P_BUCKET)
            loss, _ = step(mb["input_ids"], mb["labels"], index, targets, boundary, routed, normalizer(mb))
            loss.backward()
        return {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}

    whole = data.collate([ds[i] for i in torch.cat([mb["index"] for mb in mbs]).tolist()], ds.pad_id)
    for routed in (False, True):
        got = grads(mbs, routed, lambda mb: torch.tensor(float(n_global)))
        assert any(k.startswith("echo.") for k in got) == routed
        assert sum(k.endswith(("lora_a", "lora_b")) for k in got) == 2 * 7 * 4      # every adapter weight
        if not routed:
            step.zero_grad(set_to_none=True)
            logits = model(whole["input_ids"])
            F.cross_entropy(logits[:, :-1].flatten(0, 1), whole["labels"][:, 1:].flatten(),
                            ignore_index=-100).backward()          # mean over the global batch's answer tokens
            want = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
        else:
            want = grads([whole], True, lambda mb: torch.tensor(float(mb["n_targets"])))
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], atol=1e-9, rtol=1e-5,      # echo_loss's CE is fp32
                                       msg=lambda m: f"{k}, routed {routed}: {m}")
        # the per-micro-batch mean (averaged over micro-batches) is a different objective here
        wrong = grads(mbs, routed, lambda mb: torch.tensor(float(mb["n_targets"] * len(mbs))))
        assert max(((wrong[k] - want[k]).abs() / want[k].abs().max()).max() for k in want) > 0.01


def test_default_run_loss_falls(tmp_path):
    """`python train.py` (here cut to 30 of its steps): the tiny random model with LoRA on all modules
    and Echo learns the deterministic answer format of the synthetic task within seconds."""
    out = train.main(["--out", str(tmp_path / "default"), "--max-steps", "30"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["opts"]["model"] == "default-tiny" and cfg["echo"] is not None
    assert (out / "base" / "model.safetensors").exists() and (out / "data" / "test.json").exists()
    ms = metrics(out)
    assert len(ms) == 30 and any(m["routed"] for m in ms) and not all(m["routed"] for m in ms)
    first, last = ms[0]["loss_off"], sum(m["loss_off"] for m in ms[-3:]) / 3
    assert first > 5.0 and last < 0.5, (first, last)      # ln 259 = 5.6 nats at chance


# ------------------------------------------------------------------ bad input


def one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_missing_model_folder_cli(setup, tmp_path):
    missing = tmp_path / "no_such_model"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(missing), "--data",
                             str(setup / "ds.json"), "--out", str(tmp_path / "run")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,error,culprit", [
    (("--modules", "wq", "q_proj", "attn"), ValueError, "'attn'"),
    (("--echo-targets", "1", "--echo-sources", "2", "9"), ValueError, "layer 9 out of range"),
    (("--echo-targets", "2", "--echo-sources", "1"), ValueError, "deeper"),
    (("--global-batch", "32"), ValueError, "one global batch of 32"),
    (("--resume",), FileNotFoundError, "no checkpoint"),
])
def test_bad_input(setup, tmp_path, extra, error, culprit):
    with pytest.raises(error) as e:
        train.main(args(setup, tmp_path / "run", *extra))
    assert culprit in one_line(e)


def test_empty_dataset(setup, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    argv = args(setup, tmp_path / "run")
    argv[argv.index("--data") + 1] = str(tmp_path / "empty.json")
    with pytest.raises(ValueError) as e:
        train.main(argv)
    assert "no examples in" in one_line(e) and "empty.json" in str(e.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    """lr 1e30: step 1 is finite but its update blows the weights up, so step 2's loss is NaN. The run
    stops naming step 2; the checkpoint (saved every step) is step 1's, finite, and still loadable."""
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as e:
        train.main(args(setup, out, "--lr", "1e30", "--save-every", "1"))
    assert "at step 2" in one_line(e) and str(out / "checkpoint") in str(e.value)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 1 and all(v.isfinite().all() for v in state["trainable"].values())
    assert [m["step"] for m in metrics(out)] == [1]
    saved = load_file(str(out / "adapter" / "adapter.safetensors"))
    for k, v in saved.items():
        torch.testing.assert_close(v, state["trainable"][k], atol=0, rtol=0)


def test_compiled_step_matches_eager(setup, tmp_path):
    """The torch.compile path (each block and the Echo module compiled, as on GPU) trains like eager."""
    eager = train.main(args(setup, tmp_path / "eager", "--max-steps", "3"))
    compiled = train.main(args(setup, tmp_path / "compiled", "--max-steps", "3", "--compile"))
    assert json.loads((compiled / "config.json").read_text())["opts"]["compile"] is True
    for x, y in zip(metrics(eager), metrics(compiled)):
        assert x["routed"] == y["routed"]
        for key in ("loss_off", "loss_on", "loss_kd"):
            if x[key] is not None:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    for k, v in trained(eager).items():
        torch.testing.assert_close(trained(compiled)[k], v, atol=1e-4, rtol=1e-3, msg=k)   # Adam amplifies ulps


def test_every_rank_restores_its_own_rng(setup, tmp_path):
    """Dropout draws differ per rank: the checkpoint holds every rank's RNG state and a resumed rank
    restores its own (here: rank 1 of 2, from a checkpoint whose two entries differ)."""
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "2", "--save-every", "2"))
    path = out / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    assert len(state["rng"]) == 1
    streams = {}
    for rank, seed in ((0, 10), (1, 11)):
        torch.manual_seed(seed)
        streams[rank] = ({"cpu": torch.get_rng_state(), "cuda": None}, torch.rand(3))
    state["rng"] = [streams[0][0], streams[1][0]]
    torch.save(state, path)
    run = train.setup(train.apply_default_run(train.parse_args(args(setup, out, "--max-steps", "2", "--resume"))))
    run.rank, run.world = 1, 2
    train.load_checkpoint(run)
    torch.testing.assert_close(torch.rand(3), streams[1][1], rtol=0, atol=0)


# ------------------------------------------------------------------ crash safety


class Killed(BaseException):
    """Stands for kill -9: a BaseException, so no `except Exception` / `except OSError` handler runs."""


# Every filesystem operation of one checkpoint write, in order (save_checkpoint → atomic_file(state.pt),
# then write_outputs → atomic_dir(adapter/) and save_echo). test_checkpoint_ops_are_all_covered checks it.
CHECKPOINT_OPS = ["torch.save state.pt.tmp", "fsync state.pt.tmp", "replace state.pt", "rmtree adapter.tmp",
                  "replace adapter.safetensors", "replace adapter_config.json", "replace adapter->adapter.old",
                  "replace adapter.tmp->adapter", "rmtree adapter.old", "replace echo.safetensors",
                  "replace echo_config.json"]


def instrument(monkeypatch, kill_at=None):
    """Count (and name) the filesystem operations train.py's checkpoint writer makes; with kill_at=k,
    die at the k-th one of the run's second checkpoint (a torch.save dies half-way through its file)."""
    ops, saves = [], []
    real = {"save": torch.save, "fsync": os.fsync, "replace": os.replace, "rmtree": shutil.rmtree}

    def hit(name):
        if saves and len(saves) == 2:
            ops.append(name)
            if kill_at is not None and len(ops) == kill_at:
                return True
        return False

    def save(obj, f, *a, **k):
        if str(f).endswith("state.pt.tmp"):
            saves.append(1)
            if hit("torch.save"):
                real["save"](obj, f, *a, **k)
                size = os.path.getsize(f)
                with open(f, "r+b") as fh:
                    fh.truncate(size // 2)
                raise Killed
        return real["save"](obj, f, *a, **k)

    def wrap(name):
        def op(*a, **k):
            if hit(name):
                raise Killed
            return real[name](*a, **k)
        return op
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "fsync", wrap("fsync"))
    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree"))
    return ops


KILL_ARGS = ("--dropout", "0.1", "--save-every", "2", "--max-steps", "6")


def test_checkpoint_ops_are_all_covered(setup, tmp_path, monkeypatch):
    ops = instrument(monkeypatch)
    train.main(args(setup, tmp_path / "run", *KILL_ARGS))
    assert [o.split()[0] for o in CHECKPOINT_OPS] == ops


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train.main(args(setup, out, *KILL_ARGS))
    return out


@pytest.mark.parametrize("stage", range(1, len(CHECKPOINT_OPS) + 1), ids=CHECKPOINT_OPS)
def test_kill_during_checkpoint_write_then_resume_is_exact(setup, uninterrupted, tmp_path, monkeypatch, stage):
    """kill -9 at each operation of the step-4 checkpoint write: the run folder keeps a complete
    checkpoint (step 2's or step 4's) and a complete adapter/, and --resume ends bit-identical to
    the uninterrupted run (weights, AdamW moments, metrics — with LoRA dropout, so RNG states too)."""
    out = tmp_path / "run"
    instrument(monkeypatch, kill_at=stage)
    with pytest.raises(Killed):
        train.main(args(setup, out, *KILL_ARGS))
    monkeypatch.undo()
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"]
    assert step == (4 if stage > CHECKPOINT_OPS.index("replace state.pt") + 1 else 2)   # stages count from 1
    adapter = out / "adapter" if (out / "adapter").exists() else out / "adapter.old"   # mid-swap: the old one
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    train.main(args(setup, out, *KILL_ARGS, "--resume"))
    assert not any(p.name.endswith((".tmp", ".old")) for p in out.rglob("*"))
    assert_same_run(out, uninterrupted, atol=0)


def test_a_checkpoint_written_while_training_goes_on_holds_its_own_step(setup, uninterrupted, tmp_path, monkeypatch):
    """The step-2 checkpoint's torch.save waits until step 3 has been trained and logged (it would time
    out if writing blocked training), so steps run while its files are written; the step-4 write is then
    killed. The step-2 checkpoint still holds exactly step 2: --resume ends bit-identical to the
    uninterrupted run."""
    import threading
    out, real_save, real_step = tmp_path / "run", torch.save, train.Log.step
    step3, saved = threading.Event(), []

    def log_step(self, record, *a, **k):
        real_step(self, record, *a, **k)
        if record["step"] >= 3:
            step3.set()

    def save(obj, f, *a, **k):
        if str(f).endswith("state.pt.tmp"):
            saved.append(obj["step"])
            if obj["step"] == 2:
                assert step3.wait(30), "the checkpoint write blocked training"
            if obj["step"] == 4:
                raise Killed
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(train.Log, "step", log_step)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Killed):
        train.main(args(setup, out, *KILL_ARGS))
    monkeypatch.undo()
    assert saved == [2, 4] and torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    train.main(args(setup, out, *KILL_ARGS, "--resume"))
    assert_same_run(out, uninterrupted, atol=0)


def test_resume_on_cpu_from_a_checkpoint_of_a_cuda_graph_run(setup, uninterrupted, tmp_path, monkeypatch):
    """--device / --cuda-graphs may change on resume, so how the optimizer steps is the resuming run's,
    not the checkpoint's: a checkpoint whose AdamW groups say capturable (a one-GPU --cuda-graphs step
    run), resumed on CPU, trains on and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    crash_in_step(monkeypatch, 3)
    with pytest.raises(Crash):
        train.main(args(setup, out, *KILL_ARGS))
    monkeypatch.undo()
    path = out / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    for opt in state["optimizers"].values():
        for g in opt["param_groups"]:
            g.update(capturable=True, foreach=False)
    assert state["step"] == 2
    torch.save(state, path)
    train.main(args(setup, out, *KILL_ARGS, "--resume"))
    assert_same_run(out, uninterrupted, atol=0)


@pytest.mark.parametrize("error,cause", [
    (OSError(28, "No space left on device"), "No space left"),
    # torch.save reports ENOSPC as a RuntimeError from its zip writer: the message must still help
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "unexpected pos"),
], ids=["oserror", "torch-save-runtimeerror"])
def test_a_full_disk_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch, error, cause):
    """ENOSPC on the second checkpoint: a one-line error naming the file, its cause and what to do; step 2's
    checkpoint is intact and no temporary file is left behind."""
    out, real_save, calls = tmp_path / "run", torch.save, []

    def full(obj, f, *a, **k):
        if str(f).endswith("state.pt.tmp"):
            calls.append(1)
            if len(calls) == 2:
                with open(f, "wb") as fh:
                    fh.write(b"partial")
                raise error
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        train.main(args(setup, out, "--max-steps", "4", "--save-every", "2"))
    monkeypatch.undo()
    assert cause in one_line(e) and "state.pt" in str(e.value) and "intact" in str(e.value)
    assert "previous version is intact" in str(e.value) and "--resume" in str(e.value)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    assert not list((out / "checkpoint").glob("*.tmp"))


def test_a_failed_background_write_stops_the_run_at_once(setup, tmp_path, monkeypatch):
    """ENOSPC in the step-3 checkpoint, written while step 4 trains: the run stops at the first step that
    finds the write finished (here step 4, made to wait for it), not at the next checkpoint (step 6);
    the error names the file."""
    out, real_save, real_step = tmp_path / "run", torch.save, train.Log.step

    def full(obj, f, *a, **k):
        if str(f).endswith("state.pt.tmp") and obj["step"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    def log_step(self, record, *a, **k):
        real_step(self, record, *a, **k)
        if record["step"] == 4 and self.run.writer.thread is not None:
            self.run.writer.thread.join()              # the write has ended (deterministic for the test)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(train.Log, "step", log_step)
    with pytest.raises(OSError) as e:
        train.main(args(setup, out, "--max-steps", "6", "--save-every", "3"))
    monkeypatch.undo()
    assert "No space left" in one_line(e) and "state.pt" in str(e.value)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert not (out / "checkpoint" / "state.pt").exists() and not list((out / "checkpoint").glob("*.tmp"))


def test_non_finite_weights_are_never_saved(setup, tmp_path, monkeypatch):
    """An update that leaves a weight non-finite while the step's loss (computed before it) is finite:
    the step-1 checkpoint must not be written, and the error says that none exists."""
    out, real_step = tmp_path / "run", torch.optim.AdamW.step

    def poisoning_step(self, *a, **k):
        result = real_step(self, *a, **k)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(FloatingPointError) as e:
        train.main(args(setup, out, "--save-every", "1"))
    assert "non-finite weights after step 1" in one_line(e) and "no checkpoint was written" in str(e.value)
    assert not (out / "checkpoint" / "state.pt").exists() and not (out / "adapter").exists()


def test_killed_in_the_first_step_after_resume_keeps_the_history(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "4", "--save-every", "2"))
    (out / "checkpoint" / "state.pt").rename(out / "final.pt")
    train.main(args(setup, tmp_path / "two", "--max-steps", "4", "--save-every", "2"))
    state = torch.load(out / "final.pt", weights_only=False)
    assert state["step"] == 4
    lines = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(lines + '{"step": 5, "loss_of')          # a line torn by a crash
    (out / "final.pt").rename(out / "checkpoint" / "state.pt")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: (_ for _ in ()).throw(Killed))
    state["step"], state["epoch_step"] = 2, 2                 # pretend step 2 was the last checkpoint
    torch.save(state, out / "checkpoint" / "state.pt")
    with pytest.raises(Killed):
        train.main(args(setup, out, "--max-steps", "4", "--save-every", "2", "--resume"))
    assert [m["step"] for m in metrics(out)] == [1, 2]       # kept up to the checkpoint, torn line dropped


def test_out_is_never_overwritten(setup, tmp_path):
    run = tmp_path / "run"
    train.main(args(setup, run, "--max-steps", "2"))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as e:
        train.main(args(setup, run, "--max-steps", "2"))
    assert str(run) in one_line(e) and "earlier run" in str(e.value) and "--resume" in str(e.value) \
        and "--force" in str(e.value)
    assert (run / "metrics.jsonl").read_text() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.json").write_text("mine")
    with pytest.raises(ValueError, match="already holds files"):
        train.main(args(setup, other, "--max-steps", "2"))
    assert (other / "config.json").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train.main(args(setup, tmp_path / "file", "--max-steps", "2"))
    train.main(args(setup, run, "--max-steps", "3", "--force"))          # --force replaces the run
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


@pytest.mark.parametrize("change,flag", [(("--rank", "8"), "--rank"), (("--lr", "0.5"), "--lr"),
                                          (("--seed", "4"), "--seed"), (("--echo-tau", "3"), "--echo-tau"),
                                          (("--no-echo",), "--echo")])
def test_resume_refuses_changed_options(setup, tmp_path, change, flag):
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "2", "--save-every", "1"))
    with pytest.raises(ValueError) as e:
        train.main(args(setup, out, "--max-steps", "2", "--save-every", "1", "--resume", *change))
    assert one_line(e).startswith(f"--resume: {flag} is ")


def test_resume_compares_data_and_model_by_content(setup, tmp_path, monkeypatch):
    """--resume checks what --data and --model hold, not how they are spelled: the same bytes under another
    path (relative or a copy) resume; the data file changed in place (64 -> 40 rows) or other base weights
    are refused, naming the file."""
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "2", "--save-every", "1"))
    copy = tmp_path / "copy.json"
    copy.write_text((setup / "ds.json").read_text())
    for data_path in (str(copy), os.path.relpath(setup / "ds.json")):
        argv = args(setup, out, "--max-steps", "2", "--resume")
        argv[argv.index("--data") + 1] = data_path
        train.main(argv)                                     # accepted: the same content
    rows = json.loads(copy.read_text())
    copy.write_text(json.dumps(rows[:10]))
    argv = args(setup, out, "--max-steps", "2", "--resume")
    argv[argv.index("--data") + 1] = str(copy)
    with pytest.raises(ValueError) as e:
        train.main(argv)
    assert one_line(e).startswith("--resume: --data copy.json differs in content")
    base = tmp_path / "base2"
    shutil.copytree(setup / "base", base)
    weights = load_file(str(base / "model.safetensors"))
    weights["norm.weight"] = weights["norm.weight"] + 1
    save_file(weights, str(base / "model.safetensors"))
    argv = args(setup, out, "--max-steps", "2", "--resume")
    argv[argv.index("--model") + 1] = str(base)
    with pytest.raises(ValueError) as e:
        train.main(argv)
    assert one_line(e).startswith("--resume: --model model.safetensors differs in content")


def test_damaged_checkpoint_is_a_one_line_error(setup, tmp_path):
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "2", "--save-every", "1"))
    path = out / "checkpoint" / "state.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError) as e:
        train.main(args(setup, out, "--max-steps", "2", "--resume"))
    assert str(path) in one_line(e) and "damaged" in str(e.value)


@pytest.mark.parametrize("extra,culprit", [
    (("--save-every", "0"), "--save-every"), (("--micro-batch", "0"), "--micro-batch"),
    (("--max-steps", "0"), "--max-steps"), (("--lr", "0"), "--lr"), (("--max-len", "100000"), "--max-len 100000"),
    (("--val-split", "1.5"), "--val-split"), (("--resume", "--force"), "--resume"),
    (("--echo-targets", "9"), "--echo-targets"), (("--epochs", "inf"), "--epochs"), (("--alpha", "nan"), "--alpha"),
    (("--echo-lambda-init", "nan"), "--echo-lambda-init"), (("--echo-gate-bias", "inf"), "--echo-gate-bias"),
    (("--echo-lambda-init", "0"), "--echo-lambda-init"), (("--micro-batch", "3"), "--micro-batch 3"),
])
def test_bad_flags_are_caught_up_front(setup, tmp_path, extra, culprit):
    with pytest.raises(ValueError) as e:
        train.main(args(setup, tmp_path / "run", *extra))
    assert one_line(e).startswith(culprit) or f"{culprit} " in str(e.value) or culprit in str(e.value)
    assert not (tmp_path / "run").exists()           # checked before the run folder is made


def test_run_files_follow_the_umask(setup, tmp_path):
    old = os.umask(0o022)
    try:
        out = train.main(args(setup, tmp_path / "run", "--max-steps", "2"))
    finally:
        os.umask(old)
    for path in (out / "echo.safetensors", out / "adapter" / "adapter.safetensors", out / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_routing_that_differs_between_ranks_is_named_not_a_lost_peer(monkeypatch, capsys):
    """A routing mismatch is a bug to report, not a dead process: its own one-line message."""
    from training import distributed
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, [not x for x in obj]]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        distributed.exit_with_one_line(lambda: distributed.check_routing_agrees([True, False], 0, 2))
    assert str(e.value).startswith("error: Echo routing differed between ranks") and "lost contact" not in str(e.value)


def test_default_run_on_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 train.py --device cpu` (the default run, cut to 2 steps): the micro-batch
    is sized from the number of processes, so nothing is refused after the run folder exists."""
    out = tmp_path / "default"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "train.py"), "--device", "cpu", "--max-steps", "2", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["opts"]["micro_batch"], config["grad_accum"]) == (2, 8, 1)


def test_sigterm_checkpoints_and_exits_143(setup, tmp_path):
    """A scheduler's SIGTERM mid-run: the step finishes, a checkpoint is written, exit code 143, and
    --resume completes the run."""
    import signal
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *args(setup, out, "--max-steps", "100000", "--save-every", "100000",
                                                          "--log-every", "1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:                     # wait until training is under way
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "continue with --resume" in err and "Traceback" not in err
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"]
    assert step >= 3 and [m["step"] for m in metrics(out)] == list(range(1, step + 1))


def test_val_split_is_held_out_and_logged(setup, tmp_path):
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "3", "--val-split", "0.25", "--eval-every", "2", "--global-batch", "4"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["train_rows"], cfg["val_rows"]) == (12, 4)
    ms = metrics(out)
    assert [m["step"] for m in ms if "val_loss" in m] == [2, 3]
    assert all(m["val_rows"] == 4 and 0 <= m["val_exact"] <= 1 and m["val_loss"] > 0 for m in ms if "val_loss" in m)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["device"] == "cpu" and summary["batch_shapes"] >= 1


def test_summary_breaks_steady_steps_down_by_shape(setup, tmp_path):
    """summary.json's steady_by_shape (what the benchmark is compared with) adds up to metrics.jsonl's
    steps after warm-up: per shape, its steps and padded tokens."""
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "8", "--global-batch", "4", "--micro-batch", "2"))
    summary = json.loads((out / "summary.json").read_text())
    ms = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in ms if not m["warmup"]]
    by = summary["steady_by_shape"]
    assert len(ms) == 8 and steady and len(by) <= summary["batch_shapes"]
    assert sum(b["steps"] for b in by) == len(steady)
    assert sum(b["padded_tokens"] for b in by) == sum(m["padded_tokens"] for m in steady)
    assert sum(b["tokens"] for b in by) == sum(m["tokens"] for m in steady)
    assert all(len(b["micro_batches"]) == 2 and b["micro_batches"][0][0] == 2 for b in by)
    assert {b["routed"] for b in by} <= {m["routed"] for m in steady}
    assert summary["method"] == "lora" and summary["echo"] is True and "shape" not in ms[0]


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split("options:", 1)[1].split())
    for flag in ("--lr", "--rank", "--global-batch", "--echo-targets", "--echo-p-end", "--echo-tau", "--val-split",
                 "--cuda-graphs", "--group-by-length"):
        after = text.split(flag, 1)[1][:400]
        assert "(default:" in after, flag
    assert "(default: (4, 5, 6, 7))" in text and "(default: 0.2)" in text


def test_data_without_model_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "x.json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--data needs --model" in result.stderr


def test_a_killed_rank_ends_the_others_at_once(setup, tmp_path):
    """kill -9 of one rank: the other notices at its next collective and exits within seconds with a
    one-line message (no hang until a timeout, no traceback of its own)."""
    import signal
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "train.py"), *args(setup, tmp_path / "run", "--max-steps", "100000", "--save-every", "100000",
                                         "--log-every", "1", "--micro-batch", "2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            break
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    t0 = time.monotonic()
    os.kill(int(max(children, key=int)), signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert time.monotonic() - t0 < 30 and proc.returncode != 0
    ours = [l for l in out.splitlines() if "[rank0]" in l or "lost contact" in l]
    assert any("lost contact with another process" in l for l in out.splitlines()), out[-3000:]
    assert not any("Traceback" in l for l in ours), out[-3000:]


def test_step_flops_count_the_answer_window():
    """MFU's FLOPs: 4·N per position and pass; a routed step adds the Echo-on pass over the layers from
    the first target up, on B·P window positions (or all B·T when the window is off)."""
    from dataclasses import replace

    from echo import EchoConfig, EchoModule
    from model.model import ModelArgs, Transformer
    model = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16, adapter="lora"))
    n = sum(p.numel() for p in model.parameters())
    cfg = EchoConfig(target_layers=(1,), source_layers=(3,), bottleneck=4)
    echo = EchoModule(cfg, model.args)
    shapes = [(2, 40, 8), (3, 20, 4)]
    plain = 4 * n * (2 * 40 + 3 * 20)
    assert step_flops(model, None, False, shapes) == plain
    assert step_flops(model, echo, False, shapes) == plain
    assert step_flops(model, echo, True, shapes) == pytest.approx(plain + 4 * n * 0.75 * (2 * 8 + 3 * 4))
    full = EchoModule(replace(cfg, answer_window=False), model.args)
    assert step_flops(model, full, True, shapes) == pytest.approx(plain + 4 * n * 0.75 * (2 * 40 + 3 * 20))


def test_a_checkpoint_older_than_an_option_resumes_as_it_was_trained(setup, tmp_path, capsys):
    """The general rule for options added after a checkpoint was written (here --echo-tau and
    --echo-answer-window, deleted from the saved options): each counts as trained at its value from before it
    existed — its default (τ 2), or what EchoConfig declares (`before`: the full Echo-on pass, answer window
    off). Resuming at those values works, with one note naming the options; another value is refused by name.
    A run without Echo ignores the --echo-* options."""
    out = tmp_path / "run"
    train.main(args(setup, out, "--max-steps", "4", "--save-every", "2"))
    path = out / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=False)
    state.update(step=2, epoch_step=2)
    del state["opts"]["echo_answer_window"], state["opts"]["echo_tau"]
    torch.save(state, path)
    for extra, flag, was in ((("--echo-tau", "3", "--no-echo-answer-window"), "--echo-tau", "2.0"),
                             ((), "--echo-answer-window", "False")):
        with pytest.raises(ValueError) as e:
            train.main(args(setup, out, "--max-steps", "4", "--resume", *extra))
        assert one_line(e).startswith(f"--resume: {flag} is ") and f"trained with {was}" in one_line(e)
    capsys.readouterr()
    train.main(args(setup, out, "--max-steps", "4", "--resume", "--no-echo-answer-window"))
    err = capsys.readouterr().err
    assert err.count("note: the checkpoint predates --echo-answer-window, --echo-tau: resuming as it was trained") == 1
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    plain = tmp_path / "plain"                                       # LoRA alone: --echo-* options do not matter
    train.main(args(setup, plain, "--max-steps", "2", "--save-every", "1", "--no-echo"))
    state = torch.load(plain / "checkpoint" / "state.pt", weights_only=False)
    state.update(step=1, epoch_step=1)
    del state["opts"]["echo_answer_window"]
    torch.save(state, plain / "checkpoint" / "state.pt")
    train.main(args(setup, plain, "--max-steps", "2", "--resume", "--no-echo"))


def test_a_signal_during_a_step_stops_after_that_step(setup, tmp_path, monkeypatch):
    """One process: SIGTERM while step 3 runs ends the run after step 3 (not 4), with its checkpoint."""
    import signal
    out, clip, calls = tmp_path / "run", torch.nn.utils.clip_grad_norm_, []

    def clip_and_signal(*a, **k):                # inside the step, before its update
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return clip(*a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_signal)
    with pytest.raises(SystemExit) as e:
        train.main(args(setup, out, "--max-steps", "6", "--save-every", "100"))
    monkeypatch.undo()
    assert e.value.code == 143
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
