"""--pack-attention flex and --pack-layout flat (docs/packing.md): flex_attention with a document BlockMask gives
the SDPA document-mask path's per-example logits and Echo losses (fp64 and fp32, forward only: torch 2.13 has
no flex backward on CPU), on packed rows and on one flat row; the BlockMask is built once per micro-batch; the
flat packer keeps the Packing invariants; the options are refused in one line where they cannot work. The
train.py loss test needs a CUDA GPU (skipped here)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import data
import model.model as model_module
import train
from echo import echo_loss
from model.model import document_block_mask
from test_pack import (ANSWERS, LARGE_KD, PAD, PROMPTS, args, assert_gpu_losses_agree, gpu_args, layouts,  # noqa: F401
                       metrics, pieces, setup, tiny)                                    # (setup: a fixture)

# eager flex_attention (CPU) warns that it is unfused: it is the reference here, on CPU, by design
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def flat_layouts():
    """The same six examples, padded and packed into ONE row (pack_micro_batch(flat=True))."""
    mb, sup, _ = layouts()
    return mb, sup, data.pack_micro_batch(mb, 16, PAD, flat=True)


def packed_logits(model, packed, block_mask=None, echo_inject=None):
    layout = packed["packing"]
    return model(packed["input_ids"], positions=layout.positions, documents=layout.documents,
                 block_mask=block_mask, echo_inject=echo_inject)


# ----------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["rows", "flat"])
@torch.no_grad()
def test_flex_logits_equal_the_padded_layout(layout, dtype):
    """Per example, the logits at every real position: flex over the packed rows (or the flat row) = the padded
    layout's. fp64: to 1e-10 as tests/test_pack.py (flex and SDPA sum the same exp-scores in another order).
    fp32: 2e-5 relative, 2e-5 absolute on logits of size ~1: each of 4 layers rounds at ~1e-7 (fp32's eps is
    1.2e-7) through a softmax over ≤ 10 keys, norms and linears of width 32 — a few 1e-6 at most, while a leak
    across an example moves logits by ~1e-2 (the planted-leak test below)."""
    model, _ = tiny()
    model.to(dtype)
    mb, sup, packed = layouts() if layout == "rows" else flat_layouts()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    padded = model(mb["input_ids"])
    sdpa = packed_logits(model, packed)
    flex = packed_logits(model, packed, document_block_mask(packed["packing"].documents))
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        torch.testing.assert_close(pieces(flex, packed, i), padded[i, :p + a], **tol)
        if layout == "rows":                 # (flat with SDPA runs here only as the reference's own layout)
            torch.testing.assert_close(pieces(flex, packed, i), pieces(sdpa, packed, i), **tol)


@pytest.mark.parametrize("layout", ["rows", "flat"])
@pytest.mark.parametrize("variant", ["answer window", "no answer window", "unrouted"])
@torch.no_grad()
def test_flex_echo_losses_equal_the_padded_layout(layout, variant):
    """L_off, L_on, L_kd (echo_loss's sums) with the BlockMask = the padded layout's, fp64: every pass over the
    packed rows (split, Echo-off, and the full Echo-on pass without the answer window) goes through flex."""
    model, echo = tiny(**({"answer_window": False} if variant == "no answer window" else {}))
    mb, sup, packed = layouts() if layout == "rows" else flat_layouts()
    routed = variant != "unrouted"
    n = (sup[1] != -100).sum()
    _, sums_u = echo_loss(model, echo, mb["input_ids"], mb["labels"], routed=routed, supervised=sup, normalizer=n)
    _, sums_p = echo_loss(model, echo, packed["input_ids"], packed["labels"], routed=routed, normalizer=n,
                          supervised=sup, packing=packed["packing"],
                          block_mask=document_block_mask(packed["packing"].documents))
    if routed:
        assert sums_u[1] != sums_u[0] and sums_u[2] > 1e-6
    torch.testing.assert_close(sums_p, sums_u, rtol=1e-11, atol=1e-12)


@torch.no_grad()
def test_a_leaking_block_mask_is_caught():
    """The logits check can fail: a BlockMask that is causal over the whole row (attending across examples)."""
    model, _ = tiny()
    mb, _, packed = layouts()
    documents = packed["packing"].documents
    R, L = documents.shape
    leak = create_block_mask(lambda b, h, q, kv: kv <= q, R, None, L, L, device="cpu")
    flex, padded = packed_logits(model, packed, leak), model(mb["input_ids"])
    worst = max((pieces(flex, packed, i) - padded[i, :p + a]).abs().max().item()
                for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)))
    assert worst > 1e-3


def test_block_mask_equals_the_sdpa_mask():
    """document_block_mask's mask_mod, evaluated on every (q, kv), is document_attention_mask (padding queries
    see themselves): the same boolean [R, 1, L, L]."""
    for _, _, packed in (layouts(), flat_layouts()):
        documents = packed["packing"].documents
        dense = document_block_mask(documents).to_dense()          # which 128-blocks are kept: at least every allowed one
        sdpa = model_module.document_attention_mask(documents)
        assert dense.shape[-2:] == (-(-documents.shape[1] // 128),) * 2 and bool(dense.any())
        b, q, kv = torch.meshgrid(*(torch.arange(n) for n in (documents.shape[0], *documents.shape[1:] * 2)),
                                  indexing="ij")
        mm = document_block_mask(documents).mask_mod
        assert torch.equal(mm(b, 0, q, kv), sdpa[:, 0])


def test_block_mask_is_built_once_per_micro_batch(monkeypatch):
    """train.EchoStep with --pack-attention flex builds one BlockMask per forward (split, Echo-off and Echo-on
    passes share it) and never the SDPA mask."""
    model, echo = tiny(answer_window=False, target_layers=(1,))      # split at layer 1: three run_layers calls
    mb, sup, packed = layouts()
    calls = {"block": 0, "dense": 0}
    create, dense = model_module.create_block_mask, model_module.document_attention_mask

    def counted_create(*a, **k):
        calls["block"] += 1
        return create(*a, **k)

    def counted_dense(*a, **k):
        calls["dense"] += 1
        return dense(*a, **k)
    monkeypatch.setattr(model_module, "create_block_mask", counted_create)
    monkeypatch.setattr(model_module, "document_attention_mask", counted_dense)
    step = train.EchoStep(model, echo, "flex")
    n = (sup[1] != -100).sum()
    with torch.no_grad():
        loss, sums = step(packed["input_ids"], packed["labels"], *sup, True, n, *vars(packed["packing"]).values())
    assert calls == {"block": 1, "dense": 0} and sums[1] > 0
    calls.update(block=0, dense=0)
    with torch.no_grad():
        train.EchoStep(model, echo)(packed["input_ids"], packed["labels"], *sup, True, n,
                                    *vars(packed["packing"]).values())
    assert calls["block"] == 0 and calls["dense"] == 3          # sdpa: the mask per run_layers call, as before


# ----------------------------------------------------------------------------- the flat layout


def test_flat_packer_layout_and_padding():
    """One row, examples in micro-batch order end to end, L = Σ lengths rounded up to 128; the Packing fields
    keep their meaning. The six examples (45 tokens): 83 of 128 slots padding (64.8 %), against 3 rows of 16
    (3 of 48, 6.25 %) packed into rows; 16 examples of 90 … 105 tokens (1560): 1664 slots, 104 padding (6.25 %),
    against 16 rows of 112 for rows of --max-len 128 (232 of 1792, 12.9 %)."""
    mb, _, packed = flat_layouts()
    layout = packed["packing"]
    assert tuple(packed["input_ids"].shape) == (1, 128) and data.FLAT_MULTIPLE == 128
    lengths = [p + a for p, a in zip(PROMPTS, ANSWERS)]
    assert layout.example_row.tolist() == [0] * 6
    assert layout.example_start.tolist() == [0, 7, 15, 24, 29, 35] and layout.example_length.tolist() == lengths
    for i, n in enumerate(lengths):
        assert pieces(packed["input_ids"], packed, i).tolist() == mb["input_ids"][i, :n].tolist()
        assert pieces(packed["labels"], packed, i).tolist() == mb["labels"][i, :n].tolist()
        assert pieces(layout.positions, packed, i).tolist() == list(range(n))
        assert pieces(layout.documents, packed, i).tolist() == [i] * n
    assert int((layout.documents < 0).sum()) == 83 and int((packed["input_ids"] == PAD).sum()) == 83
    assert (packed["labels"][0, 45:] == -100).all() and (layout.positions[0, 45:] == 0).all()
    rows = layouts()[2]["packing"].documents
    assert tuple(rows.shape) == (3, 16) and int((rows < 0).sum()) == 3

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in range(90, 106):
        ids = torch.randint(1, 200, (n,), generator=g).tolist()
        examples.append((ids, [-100] * 10 + ids[10:]))
    big = data.collate(examples, PAD, 1)
    flat = data.pack_micro_batch(big, 128, PAD, flat=True)["packing"].documents
    rows = data.pack_micro_batch(big, 128, PAD)["packing"].documents
    assert tuple(flat.shape) == (1, 1664) and int((flat < 0).sum()) == 104
    assert tuple(rows.shape) == (16, 112) and int((rows < 0).sum()) == 232


def test_flat_packer_still_refuses_an_example_longer_than_max_len():
    mb, _, _ = layouts()
    with pytest.raises(ValueError) as e:
        data.pack_micro_batch(mb, 9, PAD, flat=True)
    assert "\n" not in str(e.value) and "example 5" in str(e.value)


# ----------------------------------------------------------------------------- train.py options


@pytest.mark.parametrize("extra, flag, words", [
    (("--pack-attention", "flex"), "--pack-attention", "flex needs --pack"),
    (("--pack-layout", "flat"), "--pack-layout", "flat needs --pack"),
    (("--pack", "--pack-layout", "flat"), "--pack-layout", "flat needs --pack-attention flex"),
    (("--pack", "--pack-attention", "flex"), "--pack-attention", "does not support backward on CPU"),
    (("--pack", "--pack-attention", "flex", "--pack-layout", "flat"), "--pack-attention", "not supported on CPU"),
])
def test_pack_options_are_refused_in_one_line(setup, tmp_path, extra, flag, words):
    with pytest.raises(ValueError) as e:
        train.main(args(setup, tmp_path / "run", *extra))
    assert "\n" not in str(e.value) and str(e.value).startswith(flag + " ") and words in str(e.value)
    assert not (tmp_path / "run").exists()


def test_flex_on_cpu_exits_with_one_line(setup, tmp_path):
    """As a user sees it: `python train.py --pack --pack-attention flex --device cpu` exits 1 with one line."""
    from conftest import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(setup, tmp_path / "run", "--pack",
                                                                       "--pack-attention", "flex")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: --pack-attention flex") and "CPU" in lines[0]
    assert not (tmp_path / "run").exists()


def test_defaults_are_sdpa_rows(setup, tmp_path):
    opts = train.parse_args(args(setup, tmp_path / "run"), train.__doc__)
    assert (opts.pack_attention, opts.pack_layout) == ("sdpa", "rows")


# ----------------------------------------------------------------------------- a GPU


@pytest.fixture(scope="module")
def padded_gpu_run(setup, tmp_path_factory):
    """padded_gpu_run(compiled, *extra) -> the metrics of the padded GPU run with those flags, trained once per
    module: the rows and flat layouts compare against the same run (compiled ones cost a minute each)."""
    done = {}

    def run(compiled, *extra):
        if (compiled, extra) not in done:
            out = tmp_path_factory.mktemp("padded")
            torch._dynamo.reset()
            train.main(gpu_args(setup, out, compiled, *extra))
            done[compiled, extra] = metrics(out)
        return done[compiled, extra]
    return run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch has no flex_attention backward "
                                                            "on CPU")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("layout", ["rows", "flat"])
@pytest.mark.parametrize("echo", ["--echo", "--no-echo"])
def test_pack_flex_on_a_gpu_gives_the_same_losses(setup, padded_gpu_run, tmp_path, echo, layout, compiled):
    """train.py --pack --pack-attention flex (rows or flat), fp32, dropout 0, eager (flex through
    model.compiled_flex_attention) and compiled (flex traced into each compiled block): the padded run's
    per-step losses, as tests/test_pack.py's GPU test asks of --pack with SDPA. Written on CPU, not yet run."""
    kd = LARGE_KD if echo == "--echo" else ()
    padded = padded_gpu_run(compiled, echo, *kd)
    torch._dynamo.reset()
    train.main(gpu_args(setup, tmp_path / "flex", compiled, echo, *kd, "--pack", "--pack-attention", "flex",
                        "--pack-layout", layout))
    assert json.loads((tmp_path / "flex" / "config.json").read_text())["opts"]["pack_attention"] == "flex"
    assert_gpu_losses_agree(padded, metrics(tmp_path / "flex"))
