"""NF4: QLoRA's 4-bit NormalFloat weight format, in plain PyTorch (no bitsandbytes at run time).

Owns the two codebooks, blockwise quantisation with double-quantised absmaxes, and dequantisation (eager,
and on CUDA as one compiled kernel: dequantize_fused); nothing else (no matmul: model/lora.py's LoRALinear
holds an NF4Weight as its frozen `weight` when the model is built with base_format="nf4", and dequantises
it inside its forward).

Format (Dettmers et al. 2023, "QLoRA", §3 and Appendix E; bitsandbytes quantize_4bit(quant_type="nf4",
compress_statistics=True)). A weight of any shape is flattened and cut in blocks of 64 (the last one
zero-padded). For block b and element i of it:

    absmax_b = max_i |w_i|                                    fp32
    code_i   = index of the NF4 value nearest to w_i · (1/absmax_b)   4 bits, two per byte,
                                                              the FIRST element in the HIGH nibble
Double quantisation of the fp32 absmaxes (0.5 bit/param on their own):
    offset   = mean_b absmax_b                                fp32 scalar
    absmax2_c = max_{b in c} |absmax_b - offset|              fp32, one per 256 absmaxes
    q_b      = index of the dynamic-map value nearest to (absmax_b - offset) · (1/absmax2_c)   uint8
Dequantisation:
    absmax_b ≈ DYN[q_b] · absmax2_c + offset,     w_i ≈ NF4[code_i] · absmax_b   (fp32, then cast)
Storage: 4 + 8/64 + 32/(64·256) bits = 4.127 bits/param, i.e. 0.5 B/param + 0.127 bit of statistics.

NF4 (paper §3): 2^k quantiles of N(0,1), made asymmetric so that 0 is exact: 8 positive values
ndtri(linspace(δ, ½, 9)[:-1]), 7 negative −ndtri(linspace(δ, ½, 8)[:-1]), and 0, with δ = 0.9677083
(bitsandbytes' offset, the mean of 1 − 1/(2·15) and 1 − 1/(2·16)), divided by the max so that the
codebook spans [−1, 1]. The 8-bit map for the absmaxes is bitsandbytes' signed dynamic map
(Dettmers 2015): for each decade 10^(i−6), i = 0..6, the midpoints of 2^i equal steps of [0.1, 1], with
both signs, plus 0 and +1 (256 values; its smallest is −0.99296875, there is no −1).

What was matched, and where (bitsandbytes-foundation/bitsandbytes):
  bitsandbytes/functional.py      create_normal_map, create_dynamic_map (rebuilt here with the same fp32
                                  torch ops), get_4bit_type('nf4') (the published table the tests check
                                  against), quantize_4bit (offset = absmax.mean(), then
                                  quantize_blockwise(absmax − offset, blocksize=256) with the dynamic map),
                                  dequantize_4bit / dequantize_blockwise (absmax = DYN[q]·absmax2 + offset)
  csrc/cuda/blockwise_quantization.cu (and csrc/kernels.cu)  kQuantizeBlockwise: absmax = fmaxf of |x|
                                  in fp32, x scaled by the fp32 reciprocal 1.0f/absmax; dQuantizeNF4: a
                                  tree of `x > t` over 15 fp32 literals, the fp64 midpoints of
                                  neighbouring NF4 values as printed decimals (see nf4_thresholds; a
                                  value ON a boundary takes the lower code; NaN, i.e. an all-zero
                                  block, takes code 0); packing `q[2j] << 4 | q[2j+1]`; dQuantize<0>:
                                  the binary search over the 256-value map with fp32 midpoints,
                                  emulated step by step in _nearest_dynamic; kDequantizeBlockwise:
                                  NF4[code]·absmax in fp32, then cast.
  bitsandbytes/backends/default/ops.py  the torch reference: the same reciprocal scaling and nibble order.

Checked against bitsandbytes 0.50.2 on CPU (torch 2.13, 4096², 14336×4096, 1000×777; fp32, bf16,
fp16): packed NF4 codes, fp32 absmaxes, offset and absmax2 identical; dequantised weights identical
without double quantisation. The 8-bit absmax codes differed for ~0.2% of blocks, because bitsandbytes'
CPU 8-bit path (csrc/cpu_ops.cpp, quantize_cpu) searches an approximate lookup table; in every such case
this module's code was the nearer one, as the CUDA kernel's search picks. No GPU run was possible here.

Not bit-exact, or not verified here:
  - bitsandbytes builds its CUDA code with --use_fast_math, so its 1.0f/absmax is an approximate
    reciprocal (≤1 ulp); this module's is IEEE. A value whose scaled position lies within an ulp of a
    code boundary can then round the other way on bitsandbytes' GPU kernel. The codes are otherwise the
    same rule; the number of such flips has to be measured on a GPU with bitsandbytes installed.
  - the double-quantised absmax codes are emulated from the CUDA kernel's source but were not compared
    with it on a GPU (bitsandbytes' CPU path rounds differently, above).
  - bitsandbytes' default (pure-torch) backend rounds by argmin |x − code| with fp32 subtraction, which
    can disagree with its own CUDA tree within an ulp of a boundary; this module follows the CUDA tree.
  - DYN[q]·absmax2 + offset inside a larger torch.compile graph (dequantize_tensors traced by an outer
    compile) may be contracted into one fma (1 ulp from eager); dequantize_fused, which model/lora.py's
    ops use, never is (it splits the multiply from the add).
  - offset is torch's fp32 mean on the tensor's device, as in bitsandbytes, so it is bit-identical only
    when both quantise on the same kind of device (CPU and CUDA reductions may differ in the last bit).
  - codes of the padding after an odd last element are 7 (the zero code), as the CUDA kernel writes.
This module stores the packed codes of whole blocks (ceil(n/64)·32 bytes); bitsandbytes stores the first
ceil(n/2) of those bytes.
"""
import contextlib
import os
import warnings
from fractions import Fraction
from math import prod

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_OFFSET = 0.9677083      # bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True)


def normal_float_map(offset=NF4_OFFSET):
    """The 16 NF4 values, sorted, in [−1, 1] (QLoRA Appendix E, bitsandbytes create_normal_map)."""
    # linspace in fp32 as bitsandbytes does; the quantile in fp64 then rounded to fp32, as scipy's
    # norm.ppf → tolist → torch.Tensor path rounds it; the normalising division in fp32.
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    values = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return values / values.max()


def dynamic_map(max_exponent_bits=7):
    """bitsandbytes create_dynamic_map(signed=True): 256 sorted fp32 values in [−0.993, 1]."""
    data = []
    for i in range(max_exponent_bits):              # one decade per step, at construction only
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)




def c_float(literal):
    """The fp32 that a C compiler reads from `<literal>f`: the one nearest the decimal itself. Reading
    it through fp64 first can land one ulp away when the decimal sits next to an fp32 tie."""
    exact, f = Fraction(literal), torch.tensor(float(literal), dtype=torch.float32)
    around = torch.stack([torch.nextafter(f, f.new_tensor(-2.0)), f, torch.nextafter(f, f.new_tensor(2.0))])
    return min(around.tolist(), key=lambda c: abs(Fraction(c) - exact))


def nf4_thresholds(code):
    """dQuantizeNF4's 15 decision boundaries. Its literals are Python's repr of the fp64 midpoints of
    neighbouring NF4 values (bitsandbytes' test_normal_map_tree printed them), compiled as fp32. Four of
    those midpoints are exact fp32 ties, where the compiler's rounding of the printed decimal, not
    ties-to-even, picks the fp32 — so the boundaries are rebuilt through the same text."""
    mids = ((code[:-1].double() + code[1:].double()) / 2).tolist()
    return torch.tensor([c_float(repr(m)) for m in mids], dtype=torch.float32)


NF4_CODE = normal_float_map()
DYNAMIC_CODE = dynamic_map()
NF4_THRESHOLDS = nf4_thresholds(NF4_CODE)


class NF4Weight(nn.Module):
    """One quantised tensor. Its buffers move with .to(); the codebooks are non-persistent buffers.

    packed   uint8 (nblocks·blocksize/2,), two codes a byte, the first one in the high nibble
    absmax   fp32 (nblocks,); with double quantisation uint8 indices into DYNAMIC_CODE
    absmax2  fp32 (ceil(nblocks/dq_blocksize),) with double quantisation, else None
    offset   fp32 scalar with double quantisation, else None
    """

    def __init__(self, packed, absmax, absmax2, offset, shape, blocksize=64, dq_blocksize=256, dtype=None):
        super().__init__()
        self.shape, self.blocksize, self.dq_blocksize = tuple(shape), blocksize, dq_blocksize
        # The dtype a dense W would have in this model: the default dtype at construction (build_model's),
        # then whatever model.to(dtype) / .half() asks (_apply). The buffers keep theirs; merge uses it.
        self.dtype = dtype or torch.get_default_dtype()
        for name, t in dict(packed=packed, absmax=absmax, absmax2=absmax2, offset=offset).items():
            self.register_buffer(name, t)
        self.register_buffer("code", NF4_CODE.to(packed.device), persistent=False)
        self.register_buffer("dq_code", DYNAMIC_CODE.to(packed.device), persistent=False)

    @classmethod
    def empty(cls, shape, blocksize=64, double_quant=True, dq_blocksize=256):
        """A zero-filled NF4Weight of the buffers' final shapes, on the default device (a model built under
        torch.device(...) allocates its 0.5 B/param here, never the full-precision weight); quantize_nf4's
        result replaces it when the base is loaded."""
        nblocks = -(-prod(shape) // blocksize)
        absmax2 = offset = None
        if double_quant:
            absmax2 = torch.zeros(-(-nblocks // dq_blocksize), dtype=torch.float32)
            offset = torch.zeros((), dtype=torch.float32)     # fp32 whatever the default dtype
        absmax = torch.zeros(nblocks, dtype=torch.uint8 if double_quant else torch.float32)
        return cls(torch.zeros(nblocks * blocksize // 2, dtype=torch.uint8), absmax, absmax2, offset, shape,
                   blocksize, dq_blocksize)

    copies_skipped = False      # True inside skipping_copies()

    @classmethod
    @contextlib.contextmanager
    def skipping_copies(cls):
        """Inside, copy_ checks the shape and writes nothing. For building a model whose base a checkpoint is
        about to replace (model.load.load_model): Transformer's random init still draws each weight, so the
        random-number stream after the build is the plain model's (the same adapter init, Echo init and
        dropout masks whatever the base format), but the draws are not quantised (~8× the draws' time)."""
        cls.copies_skipped = True
        try:
            yield
        finally:
            cls.copies_skipped = False

    @torch.no_grad()
    def copy_(self, w):
        """Quantise the dense tensor w into these buffers, in place, on their device. A loader that copies
        each checkpoint tensor into its weight (Transformer.load_base_weights, model.load's streamed load)
        thus quantises layer by layer: only this one weight is ever on the device in full precision."""
        if tuple(w.shape) != self.shape:
            raise ValueError(f"cannot quantise a {tuple(w.shape)} tensor into an NF4 weight of shape {self.shape}")
        if NF4Weight.copies_skipped:
            return self
        q = quantize_nf4(w.to(self.packed.device), self.blocksize, self.double_quant, self.dq_blocksize)
        for name in ("packed", "absmax", "absmax2", "offset"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(q, name))
        return self

    def _apply(self, fn, recurse=True):
        """.to(device) moves the buffers; a dtype change (model.to(torch.bfloat16), .half()) leaves them as they
        are (the statistics are fp32 by definition of the format, and rounding them would change every
        weight) and only sets self.dtype, the dense dtype the rest of the model now has."""
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.packed.device)).dtype
        return super()._apply(keep_dtype, recurse)

    def tensors(self):
        """(packed, absmax, absmax2, offset, code, dq_code): all this weight's tensors (absmax2 and offset
        None without double quantisation)."""
        return self.packed, self.absmax, self.absmax2, self.offset, self.code, self.dq_code

    @property
    def double_quant(self):
        return self.absmax2 is not None

    def numel(self):
        return prod(self.shape)

    def extra_repr(self):
        return f"shape={self.shape}, blocksize={self.blocksize}, double_quant={self.double_quant}"


def _blocks(x, blocksize):
    """x flattened to (nblocks, blocksize), the last block zero-padded (the kernel loads 0 there too)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def _scaled(blocks):
    """(fp32 absmax per block, blocks · (1/absmax)): the kernel multiplies by the reciprocal, and an
    all-zero block gives 0·inf = NaN, which both code rules below send to code 0."""
    absmax = blocks.abs().amax(dim=1)
    return absmax, blocks * (1.0 / absmax)[:, None]


def _nearest_nf4(x):
    """dQuantizeNF4: the code is the number of thresholds t with x > t; NaN → 0."""
    codes = torch.bucketize(x, NF4_THRESHOLDS.to(x.device), right=False, out_int32=True)
    return torch.where(x.isnan(), 0, codes)


def _nearest_dynamic(x, code):
    """dQuantize<0> of bitsandbytes' kernels, vectorised: 7 halvings of a binary search from index 127,
    then the fp32 midpoint to the neighbour decides. Emulated step by step because an x exactly on a
    midpoint goes up or down depending on the side the search ended on."""
    pivot = torch.full(x.shape, 127, dtype=torch.long, device=x.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = pivot + torch.where(right, step, -step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    go_up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    go_down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, go_up, go_down).to(torch.uint8)


def _pack(codes):
    """Two 4-bit codes a byte, the first element in the high nibble (bitsandbytes' layout)."""
    return (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).reshape(-1)


def _double_quantize(absmax, dq_blocksize):
    """(uint8 indices, fp32 absmax per dq block, fp32 offset): bitsandbytes quantize_4bit's
    compress_statistics branch, i.e. quantize_blockwise(absmax − absmax.mean(), blocksize=256)."""
    offset = absmax.mean()
    absmax2, scaled = _scaled(_blocks(absmax - offset, dq_blocksize))
    q = _nearest_dynamic(scaled, DYNAMIC_CODE.to(absmax.device))
    return q.reshape(-1)[: absmax.numel()], absmax2, offset


@torch.no_grad()
def quantize_nf4(w, blocksize=64, double_quant=True, dq_blocksize=256):
    """w (fp32/bf16/fp16, any shape, any device) → NF4Weight. Work is in fp32 on w's device."""
    if blocksize % 2:
        raise ValueError(f"blocksize must be even to pack two codes a byte, got {blocksize}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point tensor, got {w.dtype}")
    absmax, scaled = _scaled(_blocks(w.detach().float(), blocksize))
    packed = _pack(_nearest_nf4(scaled))
    absmax2 = offset = None
    if double_quant:
        absmax, absmax2, offset = _double_quantize(absmax, dq_blocksize)
    return NF4Weight(packed, absmax, absmax2, offset, tuple(w.shape), blocksize, dq_blocksize, w.dtype)


def dequantize_absmax(q):
    """fp32 absmax per 64-block: DYN[q]·absmax2 + offset (two roundings, as bitsandbytes)."""
    return _absmax(q.absmax, q.absmax2, q.offset, q.dq_code, q.dq_blocksize)


def _absmax(absmax, absmax2, offset, dq_code, dq_blocksize):
    if absmax2 is None:
        return absmax
    return dq_code[absmax.long()] * absmax2.repeat_interleave(dq_blocksize)[: absmax.numel()] + offset


def dequantize_nf4(q, dtype=torch.bfloat16):
    """NF4Weight → tensor of the original shape in dtype (eagerly: dequantize_tensors)."""
    return dequantize_tensors(*q.tensors(), shape=q.shape, blocksize=q.blocksize, dq_blocksize=q.dq_blocksize,
                              dtype=dtype)


def _block_scales(absmax, absmax2, dq_code, dq_blocksize):
    """DYN[q_b]·absmax2_c, fp32, one per block: dequantize_absmax without its `+ offset`. The two are kept
    in separate functions so that no kernel ever multiplies and then adds (see dequantize_fused). Computed
    on the zero-padded (groups, dq_blocksize) view, the absmax2 of a group a broadcast: Inductor's C++
    backend (torch 2.13) drops the last partial group of absmax2.repeat_interleave(256)[:nblocks]."""
    q = F.pad(absmax, (0, -absmax.numel() % dq_blocksize)).view(-1, dq_blocksize)
    return (dq_code[q.int()] * absmax2[:, None]).view(-1)[: absmax.numel()]


def _scale_codes(packed, scales, offset, code, blocksize, dtype):
    """(nblocks, blocksize) in dtype: NF4[code_i] · absmax_b in fp32, rounded once to dtype, where absmax_b =
    scales_b + offset (double quantisation) or scales_b.

    Eagerly each byte is ONE gather from the 256 nibble pairs (NF4[b >> 4], NF4[b & 15]) =
    cartesian_prod(NF4, NF4)[b], the high nibble first as packed, and the multiply rounds straight to
    dtype: 3 passes over the weight (uint8 → int32 index, gather, multiply-and-cast) where stack + shift +
    int + gather + multiply + cast took 7. Compiled, each nibble is shifted out in registers instead, the
    high one first (Inductor would build a table, or a stack, in kernels of their own), and the whole
    function is one kernel."""
    absmax = (scales if offset is None else scales + offset)[:, None]
    if torch.compiler.is_compiling():
        shifts = torch.arange(4, -1, -4, dtype=torch.int32, device=packed.device)        # (4, 0)
        values = code[(packed[:, None].int() >> shifts) & 15].view(-1, blocksize)
        return (values * absmax).to(dtype)
    values = torch.cartesian_prod(code, code)[packed.int()].view(-1, blocksize)     # fp32
    # The product is an fp32 value whatever the output; out= only rounds it to dtype as it stores it.
    return torch.mul(values, absmax, out=values.new_empty(values.shape, dtype=dtype))


def dequantize_tensors(packed, absmax, absmax2, offset, code, dq_code, *, shape, blocksize, dq_blocksize, dtype):
    """dequantize_nf4 on an NF4Weight's tensors (NF4Weight.tensors()), eagerly:
        absmax_b = DYN[q_b]·absmax2_c + offset    (fp32: a rounded product, then a rounded sum)
        w_i      = NF4[code_i] · absmax_b          (fp32, then one rounding to dtype)"""
    scales = absmax if absmax2 is None else _block_scales(absmax, absmax2, dq_code, dq_blocksize)
    return _scale_codes(packed, scales, offset, code, blocksize, dtype).view(-1)[: prod(shape)].view(shape)


EAGER = os.environ.get("ECHO_LORA_NF4_EAGER", "0") not in ("", "0")   # or set model.nf4.EAGER at run time
COMPILED_DEVICES = ("cuda",)
_compiled = None            # (_block_scales, _scale_codes) under torch.compile, made at the first CUDA call
_compiled_keys = set()      # the layouts they have been compiled for (one specialised compilation each)
_warned = set()


def _compiled_fns():
    global _compiled
    if _compiled is None:
        _compiled = tuple(torch.compile(fn, dynamic=False, fullgraph=True) for fn in (_block_scales, _scale_codes))
    return _compiled


def _warn_once(reason, key):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"NF4 dequantisation of layout {key[1:]} runs eagerly (same numbers, slower): {reason}")


def dequantize_fused(packed, absmax, absmax2, offset, code, dq_code, *, shape, blocksize, dq_blocksize, dtype):
    """dequantize_tensors, bit for bit, as one Inductor kernel over the weight on CUDA (the default; the
    custom ops of model/lora.py call this). Eagerly every pass reads or writes a weight-sized fp32/int32
    intermediate; the fused kernel reads 0.5 B/param of codes and writes the 2 B/param bf16 W.

    Bit-identity: each element is the same fp32 product rounded once to dtype. The one multiply-then-add,
    DYN[q]·absmax2 + offset, is split across the two compiled functions (a small kernel over the blocks
    stores the rounded product; the weight's kernel adds the offset, then multiplies), because Triton
    contracts a multiply feeding an add into an fma, which rounds once where eager rounds twice.

    dynamic=False: each layout (numel, dtype, double quantisation) gets its own specialised kernel (static
    sizes, 32-bit indexing, no tail masks), compiled once. The reshape to `shape` is a view outside, so
    llama3-8b's four weight shapes are three layouts. A model with more layouts than dynamo's
    recompile_limit (8) dequantises the extra ones eagerly (fullgraph=True would fail there).

    CUDA graphs: compiling (and autotuning) a new layout cannot be captured; a captured call only checks
    guards and launches the compiled kernels. train.py's StepGraphs runs each batch shape once uncaptured
    before capturing it, so the layouts are compiled by then; one first seen inside a capture is
    dequantised eagerly there (capturable) rather than compiled. The forward and the backward use the
    same layouts (same dtype) and one calling context (see below), so each layout is compiled once.

    Eager instead: ECHO_LORA_NF4_EAGER=1 in the environment (or model.nf4.EAGER = True), to compare both
    on a GPU; and always on CPU (COMPILED_DEVICES), so CPU tests and CI need no compiler. Inside an outer
    torch.compile's tracing this is dequantize_tensors, traced into that graph."""
    args = packed, absmax, absmax2, offset, code, dq_code
    layout = dict(shape=shape, blocksize=blocksize, dq_blocksize=dq_blocksize, dtype=dtype)
    if EAGER or packed.device.type not in COMPILED_DEVICES or torch.compiler.is_compiling():
        return dequantize_tensors(*args, **layout)
    key = (packed.device, packed.numel(), absmax.dtype, absmax2 is None, blocksize, dq_blocksize, dtype)
    if key not in _compiled_keys:
        if packed.is_cuda and torch.cuda.is_current_stream_capturing():
            _warn_once("first seen inside a CUDA graph capture (run one step uncaptured first)", key)
            return dequantize_tensors(*args, **layout)
        if len(_compiled_keys) >= torch._dynamo.config.recompile_limit:
            _warn_once("more layouts than torch._dynamo.config.recompile_limit", key)
            return dequantize_tensors(*args, **layout)
    block_scales, scale_codes = _compiled_fns()
    # One calling context for the compiled functions, or dynamo guards on it and compiles each layout again per
    # context: grad mode, autocast and whether autograd's dispatch keys are on the inputs (the op's forward runs
    # below autograd, its backward and direct calls above). With those fixed, one compilation per layout, so the
    # count above is dynamo's and the eager fallback comes before fullgraph=True's hard failure at the limit.
    with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView(), \
            torch.autocast(packed.device.type, enabled=False):
        scales = absmax if absmax2 is None else block_scales(absmax, absmax2, dq_code, dq_blocksize)
        w = scale_codes(packed, scales, offset, code, blocksize, dtype)
    _compiled_keys.add(key)
    return w.view(-1)[: prod(shape)].view(shape)


def nf4_bytes(q):
    """Bytes this tensor keeps: packed codes + statistics (the shared codebooks are not counted)."""
    return sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.absmax2, q.offset)
               if t is not None)
