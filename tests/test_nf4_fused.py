"""NF4 dequantisation: the eager rewrite (one gather per byte from the 256 nibble pairs) and the compiled
path (model/nf4.py dequantize_fused, one Inductor kernel) give the old formula's numbers bit for bit, and
the echo_lora NF4 ops built on them keep their outputs and gradients. The compiled path is exercised on
CPU here (Inductor's C++ backend, by adding "cpu" to COMPILED_DEVICES); its CUDA kernels, fma contraction
included, only by the CUDA test at the end."""
import re
import warnings
from math import prod

import pytest
import torch
import torch.nn.functional as F

import model.nf4 as nf4
from model.lora import nf4_linear, nf4_linear_and_wat
from model.nf4 import _absmax, dequantize_nf4, dequantize_tensors, quantize_nf4

SHAPES = [(64,), (17,), (3, 5, 7), (96, 128), (1000, 777), (300, 64)]   # numel % 64 and nblocks % 256 ≠ 0 too
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def old_dequantize_tensors(packed, absmax, absmax2, offset, code, dq_code, *, shape, blocksize, dq_blocksize, dtype):
    """The formula before the rewrite, verbatim: the reference the new paths must match bit for bit."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(-1, blocksize)
    w = code[codes.int()] * _absmax(absmax, absmax2, offset, dq_code, dq_blocksize)[:, None]   # fp32 × fp32
    return w.view(-1)[: prod(shape)].view(shape).to(dtype)


def assert_same_bits(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.contiguous().view(BITS[got.dtype]), want.contiguous().view(BITS[want.dtype]))


def weight(shape, seed):
    """Heavy-tailed values over several decades of block scale, one all-zero block when there is room."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 2, (), generator=g).item()
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(6) * scale
    if w.numel() >= 128:
        w.view(-1)[64:128] = 0
    return w


def layout(q, dtype):
    return dict(shape=q.shape, blocksize=q.blocksize, dq_blocksize=q.dq_blocksize, dtype=dtype)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_eager_dequantize_is_the_old_formula_bit_for_bit(shape, double_quant):
    for seed in range(3):
        q = quantize_nf4(weight(shape, seed), double_quant=double_quant)
        for dtype in DTYPES:
            want = old_dequantize_tensors(*q.tensors(), **layout(q, dtype))
            assert_same_bits(dequantize_tensors(*q.tensors(), **layout(q, dtype)), want)
            assert_same_bits(dequantize_nf4(q, dtype), want)


def forget_compiled():
    """Empty dynamo's cache and, with it, nf4's record of compiled layouts (kept in step: a layout it
    believes compiled would otherwise compile again, possibly inside a later test's CUDA graph capture)."""
    torch._dynamo.reset()
    nf4._compiled = None
    nf4._compiled_keys.clear()


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """dequantize_fused compiles for CPU tensors too, from a clean dynamo cache and layout set."""
    monkeypatch.setattr(nf4, "COMPILED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(nf4, "EAGER", False)
    forget_compiled()
    yield
    forget_compiled()


def test_compiled_dequantize_matches_eager_bit_for_bit(compiled_on_cpu):
    """Inductor (C++ on this machine) gives the eager bits, bf16 and fp32, with and without double
    quantisation, on numels that are not multiples of the block or the absmax group."""
    cases = [((1000, 777), True), ((96, 128), True), ((3, 5, 7), False)]
    for shape, double_quant in cases:
        q = quantize_nf4(weight(shape, 1), double_quant=double_quant)
        for dtype in (torch.bfloat16, torch.float32):
            got = nf4.dequantize_fused(*q.tensors(), **layout(q, dtype))
            assert_same_bits(got, old_dequantize_tensors(*q.tensors(), **layout(q, dtype)))
    assert len(nf4._compiled_keys) == 2 * len(cases)            # the compiled path ran, once per layout


def test_each_compiled_function_is_one_kernel(compiled_on_cpu):
    """The block scales and the weight are one kernel each, writing only their output: no index, nibble
    or table buffer in between (checked on Inductor's C++ code; Triton's uses the same fusion)."""
    from torch._inductor.utils import run_and_get_code
    q = quantize_nf4(weight((96, 128), 2))
    block_scales, scale_codes = nf4._compiled_fns()
    scales, (code,) = run_and_get_code(block_scales, q.absmax, q.absmax2, q.dq_code, q.dq_blocksize)
    _, (code2,) = run_and_get_code(scale_codes, q.packed, scales, q.offset, q.code, q.blocksize, torch.bfloat16)
    for src in (code, code2):
        call = src[src.index("def call("):]
        assert len(re.findall(r"^\s+cpp_fused\w*\(", call, re.M)) == 1, call
        assert len(re.findall(r"^\s+buf\d+ = empty", call, re.M)) == 1, call


def reference_linear(u, q, grad):
    """F.linear with the old eagerly dequantised weight, and its ∂L/∂u for the given ∂L/∂o."""
    w = old_dequantize_tensors(*q.tensors(), **layout(q, u.dtype))
    return F.linear(u, w), grad @ w, w


@pytest.mark.parametrize("path", ["eager", "compiled", "compiled-in-compiled-model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_ops_keep_their_values(request, monkeypatch, path, dtype):
    """nf4_linear and nf4_linear_and_wat: outputs and ∂L/∂u are F.linear on the old dequantised W, bit for
    bit, with the eager dequantisation, the compiled one, and the compiled one inside a compiled model
    (aot_eager: the ops' backward traced into its graph, the dequantisation an opaque op in it). Each
    forward and each backward calls dequantize_fused once, at run time, never while being traced."""
    import model.lora as lora
    if path != "eager":
        request.getfixturevalue("compiled_on_cpu")
    calls, real = [], lora.dequantize_fused
    monkeypatch.setattr(lora, "dequantize_fused", lambda *a, **k: calls.append(torch.compiler.is_compiling())
                        or real(*a, **k))
    q = quantize_nf4(weight((96, 128), 3))
    g = torch.Generator().manual_seed(4)
    u = torch.randn(2, 5, 128, generator=g).to(dtype).requires_grad_()
    a = torch.randn(4, 128, generator=g).to(dtype)
    grad = torch.randn(2, 5, 96, generator=g).to(dtype)
    ops = (lambda u: nf4_linear(u, q)), (lambda u: nf4_linear_and_wat(u, a, q))
    if path == "compiled-in-compiled-model":
        ops = [torch.compile(op, backend="aot_eager", fullgraph=True) for op in ops]
    want, want_grad, w = reference_linear(u.detach(), q, grad)
    for op in ops:
        out = op(u)
        if isinstance(out, tuple):
            out, wat = out
            assert_same_bits(wat, F.linear(a, w))
        assert_same_bits(out, want)
        (got_grad,) = torch.autograd.grad(out, u, grad)
        assert_same_bits(got_grad, want_grad)
    assert calls == [False] * 4
    assert len(nf4._compiled_keys) == (0 if path == "eager" else 1)


def test_eager_switch(monkeypatch, compiled_on_cpu):
    """model.nf4.EAGER (ECHO_LORA_NF4_EAGER=1 at import) turns the compiled path off."""
    monkeypatch.setattr(nf4, "EAGER", True)
    q = quantize_nf4(weight((96, 128), 5))
    assert_same_bits(nf4.dequantize_fused(*q.tensors(), **layout(q, torch.bfloat16)), dequantize_nf4(q))
    assert not nf4._compiled_keys


def compiled_entries():
    """How many compiled variants dynamo holds for each of the two compiled functions."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return [len(_debug_get_cache_entry_list(fn.__code__)) for fn in (nf4._block_scales, nf4._scale_codes)]


def test_one_compilation_per_layout_in_every_calling_context(compiled_on_cpu):
    """The op's forward (below autograd), its backward and a direct call (above it), no_grad, inference_mode and
    autocast all reuse one compiled variant per layout: otherwise 3 layouts × 4 contexts pass dynamo's limit of 8
    and fullgraph=True fails hard (FailOnRecompileLimitHit) where the eager fallback was promised."""
    qs = [quantize_nf4(weight(shape, 6)) for shape in ((96, 128), (64, 128), (32, 128))]
    u = torch.randn(3, 128, requires_grad=True)
    for q in qs:                                                       # training: forward below autograd, backward
        nf4_linear(u, q).sum().backward()
    for context in (torch.no_grad, torch.inference_mode, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        with context():
            for q in qs:                                               # (under autocast nf4_linear's u is bf16:
                nf4.dequantize_fused(*q.tensors(), **layout(q, torch.float32))     # another layout, so not here)
                if not torch.is_autocast_enabled("cpu"):
                    nf4_linear(u, q)
    assert len(nf4._compiled_keys) == 3 and compiled_entries() == [3, 3]


@pytest.mark.parametrize("compiled", [False, True])
def test_nf4_ops_follow_autocast_as_f_linear_does(compiled):
    """Under autocast an fp32 input gives F.linear's autocast dtype (bf16), eagerly and inside torch.compile
    alike, for both ops: the custom op has no autocast rule, so the wrappers cast the input as autocast would."""
    q = quantize_nf4(weight((96, 128), 7))
    u, a = torch.randn(2, 128, requires_grad=True), torch.randn(4, 128)
    ops = (lambda u: nf4_linear(u, q)), (lambda u: nf4_linear_and_wat(u, a, q)[0]), \
          (lambda u: nf4_linear_and_wat(u, a, q)[1])
    if compiled:
        ops = [torch.compile(op, backend="aot_eager", fullgraph=True) for op in ops]
    w = dequantize_nf4(q, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [op(u) for op in ops]
    assert [o.dtype for o in outs] == [torch.bfloat16] * 3
    assert_same_bits(outs[0], F.linear(u.detach().bfloat16(), w))
    assert_same_bits(outs[2], F.linear(a.bfloat16(), w))
    (g,) = torch.autograd.grad(outs[0].float().sum(), u)
    assert g.dtype == torch.float32 and torch.equal(g, (torch.ones(2, 96, dtype=torch.bfloat16) @ w).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels, CUDA graphs)")
def test_cuda_compiled_path_is_eager_bit_for_bit_and_graph_capturable(request, monkeypatch):
    """On CUDA: the Triton kernels give the eager bits (so no fma contracted DYN[q]·absmax2 + offset), and
    nf4_linear captured in a CUDA graph after one warm-up call (which compiles) replays the same output,
    with no layout compiled, or left to eager, during the capture."""
    monkeypatch.setattr(nf4, "EAGER", False)
    forget_compiled()
    request.addfinalizer(forget_compiled)
    for shape, double_quant in [((4096, 4096), True), ((1000, 777), True), ((1024, 4096), False)]:
        q = quantize_nf4(weight(shape, 6).cuda(), double_quant=double_quant)
        for dtype in (torch.bfloat16, torch.float32):
            want = dequantize_tensors(*q.tensors(), **layout(q, dtype))
            assert_same_bits(nf4.dequantize_fused(*q.tensors(), **layout(q, dtype)), want)
            assert_same_bits(want, old_dequantize_tensors(*q.tensors(), **layout(q, dtype)))
    q = quantize_nf4(weight((1024, 4096), 7).cuda())
    u = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    eager = F.linear(u, dequantize_tensors(*q.tensors(), **layout(q, torch.bfloat16)))
    nf4_linear(u, q)                                               # warm-up: compiles this layout
    torch.cuda.synchronize()
    assert len(nf4._compiled_keys) == 7                            # 6 above, this one: all compiled, none eager
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.cuda.graph(graph):
            out = nf4_linear(u, q)
    assert not [w for w in caught if "NF4 dequantisation" in str(w.message)]      # no eager fallback
    u.copy_(torch.randn_like(u))
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(out, F.linear(u, dequantize_tensors(*q.tensors(), **layout(q, torch.bfloat16))))
    assert not torch.equal(out, eager)
