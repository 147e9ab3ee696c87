"""model/nf4.py: the NF4 codebook, blockwise + double quantisation, packing, and the error bound."""
import importlib.util
from fractions import Fraction

import pytest
import torch

from model.nf4 import (DYNAMIC_CODE, NF4_CODE, NF4_THRESHOLDS, _nearest_dynamic, dequantize_absmax,
                       dequantize_nf4, nf4_bytes, quantize_nf4)

# bitsandbytes/functional.py, get_4bit_type("nf4"): the published NF4 table (bitsandbytes-foundation/
# bitsandbytes; the same 16 floats are nf4_dequantization_lut / dDequantizeNF4 in csrc/kernels.cu).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]
# csrc/cuda/blockwise_quantization.cu, dQuantizeNF4: the decision tree's literals, in code order.
KERNEL_THRESHOLDS = [
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"]

HALF_GAP = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2    # the format's own rounding error / absmax
DYN_HALF_GAP = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max().item() / 2


def c_float(literal):
    """What a C compiler makes of `<literal>f`: the fp32 nearest to the decimal (not via fp64)."""
    exact, f = Fraction(literal), torch.tensor(float(literal), dtype=torch.float32)
    around = [torch.nextafter(f, torch.tensor(-1.0)), f, torch.nextafter(f, torch.tensor(1.0))]
    return min((c.item() for c in around), key=lambda c: abs(Fraction(c) - exact))


def codes_of(q):
    """Unpacked 4-bit codes in element order (high nibble first)."""
    return torch.stack([q.packed >> 4, q.packed & 0xF], dim=-1).reshape(-1)[: q.numel()]


def test_codebook_is_the_published_nf4_table():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert torch.equal(NF4_CODE, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))   # bit for bit
    assert (NF4_CODE == 0).sum() == 1 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


def test_thresholds_are_the_kernels_fp32_literals():
    assert NF4_THRESHOLDS.tolist() == [c_float(s) for s in KERNEL_THRESHOLDS]


def test_dynamic_map_is_bitsandbytes_signed_map():
    d = DYNAMIC_CODE
    assert d.shape == (256,) and d.dtype == torch.float32
    assert torch.all(d[1:] >= d[:-1])
    assert (d == 0).sum() == 1 and d[-1] == 1.0
    # bitsandbytes' signed dynamic map holds +1 but not −1: its most negative value is −(1 − 0.9/128)
    assert d[0].item() == pytest.approx(-0.99296875, abs=1e-7) and d.abs().min() == 0
    assert d[127] == 0 and torch.equal(d[:127].neg().flip(0), d[128:255])   # symmetric apart from +1
    assert d[128].item() == pytest.approx(0.55e-6, rel=1e-6)    # smallest decade: 10^-6 · 0.55


def dquantize_reference(x, code):
    """csrc/cuda/blockwise_quantization.cu dQuantize<0>, transcribed line by line (scalar)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)   # noqa: E731
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper, val = f32(-1.0), f32(1.0), code[127]
    for i in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
    upper = code[255] if upper_pivot == 255 else upper
    lower = code[0] if lower_pivot == 0 else lower
    if x > val:
        return upper_pivot if x > (upper + val) * 0.5 else pivot
    return lower_pivot if x < (lower + val) * 0.5 else pivot


def test_dynamic_rounding_matches_the_kernels_binary_search():
    g = torch.Generator().manual_seed(0)
    mids = (DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) * 0.5                 # exact ties, both search sides
    x = torch.cat([DYNAMIC_CODE, mids, torch.rand(600, generator=g) * 2 - 1,
                   torch.randn(200, generator=g) * 1e-4, torch.tensor([1.0, -1.0, float("nan")])])
    got = _nearest_dynamic(x, DYNAMIC_CODE)
    want = torch.tensor([dquantize_reference(v, DYNAMIC_CODE) for v in x], dtype=torch.uint8)
    assert torch.equal(got, want)
    assert torch.equal(got[:256], torch.arange(256, dtype=torch.uint8))   # code values map to themselves
    # away from ties it is the nearest value
    err = (DYNAMIC_CODE[got[512:1112].long()] - x[512:1112]).abs()
    assert torch.all(err <= (DYNAMIC_CODE[None] - x[512:1112, None]).abs().min(1).values + 1e-7)


def test_packing_and_exact_codes_of_a_hand_built_block():
    absmax = 2.5
    order = torch.tensor([15, 0, 7, 8, 3, 12, 1, 14, 9, 6, 10, 5, 11, 4, 13, 2])
    w = (absmax * NF4_CODE[order]).repeat(4)                  # one block of 64, codes known
    q = quantize_nf4(w, double_quant=False)
    assert q.absmax.tolist() == [absmax] and q.packed.shape == (32,) and q.packed.dtype == torch.uint8
    assert torch.equal(codes_of(q), order.repeat(4).to(torch.uint8))
    assert q.packed[0].item() == (15 << 4 | 0) and q.packed[1].item() == (7 << 4 | 8)   # first = high
    assert torch.equal(dequantize_nf4(q, torch.float32), w)   # exact: values × a power-of-two-free scale


def test_values_on_a_threshold_take_the_lower_code():
    t = NF4_THRESHOLDS
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    w = torch.cat([torch.tensor([1.0]), t, up, torch.zeros(64 - 31)])   # absmax 1: x = w exactly
    c = codes_of(quantize_nf4(w, double_quant=False)).long()
    assert torch.equal(c[1:16], torch.arange(15)) and torch.equal(c[16:31], torch.arange(1, 16))


def check_error_bound(w, q):
    """Each element within half the largest NF4 gap × its block's absmax, plus the double-quant error
    of that absmax (half the largest dynamic-map gap × its 256-block's absmax2), plus fp32 slack."""
    n, bs = w.numel(), q.blocksize
    exact_absmax = torch.nn.functional.pad(w.float().reshape(-1), (0, -n % bs)).view(-1, bs).abs().amax(1)
    absmax_err = (dequantize_absmax(q) - exact_absmax).abs()
    if q.double_quant:
        bound2 = DYN_HALF_GAP * q.absmax2.repeat_interleave(q.dq_blocksize)[: exact_absmax.numel()]
        assert torch.all(absmax_err <= bound2 + 1e-6 * exact_absmax)
    else:
        assert torch.equal(absmax_err, torch.zeros_like(absmax_err))
    bound = (HALF_GAP * exact_absmax + absmax_err) * (1 + 1e-6) + 1e-30
    err = (dequantize_nf4(q, torch.float32).reshape(-1) - w.float().reshape(-1)).abs()
    assert torch.all(err <= bound.repeat_interleave(bs)[:n])


@pytest.mark.parametrize("shape", [(256, 512), (3, 1000), (7,), (2, 64, 33), (130, 257)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_within_the_format_bound(shape, double_quant):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * 0.02
    q = quantize_nf4(w, double_quant=double_quant)
    nblocks = -(-w.numel() // 64)
    assert q.packed.numel() == nblocks * 32 and q.absmax.numel() == nblocks
    assert q.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    check_error_bound(w, q)
    out = dequantize_nf4(q, torch.float32)
    assert out.shape == w.shape
    if w.numel() >= 4096:
        rel = ((out - w).abs().mean() / w.abs().mean()).item()
        assert 0.05 < rel < 0.13, rel     # NF4 on Gaussian blocks of 64: ~0.09 mean relative error


def test_zero_tensor_and_outliers():
    z = quantize_nf4(torch.zeros(3, 100))
    assert torch.equal(dequantize_nf4(z, torch.float32), torch.zeros(3, 100))
    assert torch.all(codes_of(z) == 0)          # an all-zero block is NaN in the kernel → code 0
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)) * 0.01
    w.view(-1, 64)[:, 5] = 100.0                # one huge outlier per block
    q = quantize_nf4(w)
    check_error_bound(w, q)
    out = dequantize_nf4(q, torch.float32)
    assert torch.allclose(out.view(-1, 64)[:, 5], torch.full((64,), 100.0), rtol=1e-6)
    assert torch.all(codes_of(q).view(-1, 64)[:, 5] == 15)
    others = out.view(-1, 64)[:, 6:]            # crushed to the zero code by the outlier's scale
    assert torch.equal(others, torch.zeros_like(others))


def test_constant_absmaxes_single_block_and_bf16_input():
    w = torch.randn(64, generator=torch.Generator().manual_seed(2))
    q = quantize_nf4(w)                          # one block: absmax − offset = 0, absmax2 = 0 → exact
    assert q.absmax2.tolist() == [0.0] and dequantize_absmax(q).item() == w.abs().max().item()
    wb = torch.randn(96, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    qb, qf = quantize_nf4(wb), quantize_nf4(wb.float())
    assert torch.equal(qb.packed, qf.packed) and torch.equal(qb.absmax, qf.absmax)


def test_output_dtypes():
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(4))
    q = quantize_nf4(w)
    f32, bf16 = dequantize_nf4(q, torch.float32), dequantize_nf4(q, torch.bfloat16)
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and bf16.shape == w.shape
    assert torch.equal(bf16, f32.to(torch.bfloat16))   # computed in fp32, cast once
    assert dequantize_nf4(q, torch.float16).dtype == torch.float16


def test_storage_bytes():
    n = 4096 * 4096
    dq = quantize_nf4(torch.randn(4096, 4096))
    assert nf4_bytes(dq) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    bits = 8 * nf4_bytes(dq) / n
    assert bits - 4 == pytest.approx(8 / 64 + 32 / (64 * 256), abs=1e-5)   # 0.127 bit of statistics
    plain = quantize_nf4(torch.randn(4096, 4096), double_quant=False)
    assert 8 * nf4_bytes(plain) / n == pytest.approx(4.5)                   # fp32 absmax: 0.5 bit
    assert set(dq.state_dict()) == {"packed", "absmax", "absmax2", "offset"}   # codebooks not saved


def test_a_dtype_change_leaves_the_buffers_alone():
    """model.to(dtype) / .half() / .double() reach an NF4Weight: its buffers keep their dtypes and values
    (uint8 codes, fp32 statistics and codebooks: rounding them would change every weight), so the weight
    dequantises to the same values; only its dense dtype (NF4Weight.dtype, what merge uses) follows.
    .to(device) moves the buffers (meta: the only other device on CPU)."""
    q = quantize_nf4(torch.randn(96, 160, generator=torch.Generator().manual_seed(6)))
    assert q.dtype == torch.float32
    buffers = {k: v.clone() for k, v in q.named_buffers()}
    assert {k: v.dtype for k, v in buffers.items()} == {"packed": torch.uint8, "absmax": torch.uint8,
                                                       "absmax2": torch.float32, "offset": torch.float32,
                                                       "code": torch.float32, "dq_code": torch.float32}
    w = dequantize_nf4(q, torch.float32)
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.double(), torch.float64)):
        assert cast(q) is q and q.dtype == dtype
        assert all(torch.equal(v, buffers[k]) and v.dtype == buffers[k].dtype for k, v in q.named_buffers())
        assert torch.equal(dequantize_nf4(q, torch.float32), w)
    q.to("meta")
    assert {b.device.type for b in q.buffers()} == {"meta"} and q.packed.dtype == torch.uint8 and q.code.shape == (16,)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (a test-only reference: pip install "
                           "bitsandbytes, best on a GPU, to compare codes and absmaxes bit for bit)")
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes(double_quant):
    import bitsandbytes.functional as F
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(1024, 4096 + 64 * 3, generator=torch.Generator().manual_seed(5)).mul(0.02).to(device)
    for wt in (w, w.to(torch.bfloat16)):
        packed, st = F.quantize_4bit(wt, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        q = quantize_nf4(wt, double_quant=double_quant)
        # CUDA bitsandbytes scales by a --use_fast_math reciprocal: allow a rare flip at a boundary.
        flips = (q.packed[: packed.numel()] != packed.reshape(-1)).sum().item()
        assert flips <= 1e-5 * packed.numel(), f"{flips} packed bytes differ on {device}"
        assert torch.equal(st.code.to(device), NF4_CODE.to(device))
        if not double_quant:
            assert torch.equal(st.absmax, q.absmax)
            if flips == 0:
                assert torch.equal(F.dequantize_4bit(packed, st), dequantize_nf4(q, wt.dtype))
            continue
        assert st.offset.item() == q.offset.item() and torch.equal(st.state2.absmax, q.absmax2)
        assert torch.equal(st.state2.code.to(device), DYNAMIC_CODE.to(device))
        differ = st.absmax != q.absmax
        if device == "cuda":       # the kernel's dQuantize<0>, emulated: expected identical (see nf4.py)
            assert differ.sum().item() <= 1e-5 * differ.numel()
        else:   # bitsandbytes' CPU 8-bit path (csrc/cpu_ops.cpp) is an approximate LUT search:
            # where it differs, this module's choice is the nearer dynamic value
            exact = dequantize_absmax(quantize_nf4(wt, double_quant=False)) - q.offset
            x = exact / q.absmax2.repeat_interleave(256)[: exact.numel()]
            ours = (DYNAMIC_CODE[q.absmax.long()] - x).abs()[differ]
            theirs = (DYNAMIC_CODE[st.absmax.long()] - x).abs()[differ]
            assert torch.all(ours <= theirs + 1e-7) and differ.float().mean() < 0.01
