"""Native LoRA / DoRA linear layers and adapter I/O.

`LoRALinear` owns its frozen base weight (named `weight`, so a Meta checkpoint loads into it
unchanged) and, when adapted, the trainable low-rank factors:

    LoRA (eq. 1):  o = W u + s · B A dropout(u),                  s = α / r
    DoRA:          o = m ⊙ (W u + s · B A dropout(u)) / ‖W + s·B A‖_row

A ∈ R^{r×d_in} is Kaiming-uniform, B ∈ R^{d_out×r} is zero, so an untrained adapter is the base
model exactly. DoRA's row norm is computed in fp32 and detached (DoRA §4.3: treating the norm as a
constant saves the memory of its backward graph at no measurable cost in accuracy), clamped away
from zero so an all-zero weight row cannot divide by zero. The base matmul W u is computed once
and reused for both terms.

With base_format="nf4" (QLoRA) `weight` is an NF4Weight (model/nf4.py: 4-bit codes and statistics as
buffers, ~0.52 B/param) instead of a parameter, and W above is dequant(W) in the input's dtype, rebuilt
inside every forward and never stored; A, B and m are exactly the same fp32 parameters. The same class
with rank 0 is the plain frozen linear of an NF4 model (wq..w3 without an adapter).
"""
import json
import math
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import publish, read_json, read_safetensors
from .nf4 import NF4Weight, dequantize_fused, dequantize_nf4

ADAPTER_KEYS = ("lora_a", "lora_b", "magnitude")


@torch.library.custom_op("echo_lora::nf4_dequantize", mutates_args=())
def _nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                    offset: Optional[torch.Tensor], code: torch.Tensor, dq_code: torch.Tensor, shape: List[int],
                    blocksize: int, dq_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) in dtype (model/nf4.py dequantize_fused: one compiled kernel on CUDA), for the NF4 ops'
    backward. An op of its own because a torch.compile of the model traces the backward of the ops below
    into its backward graph: the dequantisation must stay a call at run time there too."""
    return dequantize_fused(packed, absmax, absmax2, offset, code, dq_code, shape=shape, blocksize=blocksize,
                            dq_blocksize=dq_blocksize, dtype=dtype)


@_nf4_dequantize.register_fake
def _(packed, absmax, absmax2, offset, code, dq_code, shape, blocksize, dq_blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


def _backward_weight(ctx, dtype):
    """dequant(W) for an NF4 op's backward: through the op above while a torch.compile traces it, else
    directly (the op's dispatch would add tens of µs of host time per call)."""
    dequantize = _nf4_dequantize if torch.compiler.is_compiling() else dequantize_fused
    return dequantize(*ctx.saved_tensors, **ctx.layout, dtype=dtype)


@torch.library.custom_op("echo_lora::nf4_linear", mutates_args=())
def _nf4_linear(u: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
                offset: Optional[torch.Tensor], code: torch.Tensor, dq_code: torch.Tensor, shape: List[int],
                blocksize: int, dq_blocksize: int) -> torch.Tensor:
    """u · dequant(W)ᵀ for a frozen NF4 W given as its tensors (NF4Weight.tensors()). A custom op, not an
    autograd.Function, because under torch.compile AOTAutograd's partitioner sees through a Function: it
    merges the backward's dequantisation with the forward's and saves the dense W for the backward (every
    layer's full-precision weight, held until then). An op is opaque to it: the forward graph never has W,
    and what is saved is what setup_context saves, the 4-bit buffers. Inside, dequant(W) is one compiled
    kernel on CUDA (dequantize_fused), whether the model around it is compiled or not."""
    w = dequantize_fused(packed, absmax, absmax2, offset, code, dq_code, shape=shape, blocksize=blocksize,
                         dq_blocksize=dq_blocksize, dtype=u.dtype)
    return F.linear(u, w)


@_nf4_linear.register_fake
def _(u, packed, absmax, absmax2, offset, code, dq_code, shape, blocksize, dq_blocksize):
    return u.new_empty(*u.shape[:-1], shape[0])


def _nf4_linear_setup_context(ctx, inputs, output):
    u, *tensors, shape, blocksize, dq_blocksize = inputs
    ctx.save_for_backward(*tensors)         # uint8 codes and fp32 statistics only, never dequant(W)
    ctx.layout = dict(shape=shape, blocksize=blocksize, dq_blocksize=dq_blocksize)


def _nf4_linear_backward(ctx, grad):
    """∂L/∂u = ∂L/∂o · dequant(W), W dequantised again (as QLoRA does); W itself gets no gradient."""
    w = _backward_weight(ctx, grad.dtype)
    return grad @ w, *[None] * 9


_nf4_linear.register_autograd(_nf4_linear_backward, setup_context=_nf4_linear_setup_context)


def autocast_input(u):
    """u as autocast would hand it to F.linear: in the autocast dtype while autocast is on. A custom op has no
    autocast rule, so eagerly autocast reaches the F.linear inside it (a bf16 output for an fp32 u) while a
    compiled graph takes the fake kernel's u.dtype (fp32): cast before the op and both give autocast's dtype.
    (register_autocast would cast the NF4 statistics too.)"""
    device = u.device.type
    if torch.is_autocast_enabled(device) and u.is_floating_point():
        return u.to(torch.get_autocast_dtype(device))
    return u


def nf4_linear(u, q):
    """F.linear(u, dequant(q)) for an NF4Weight q, saving only q's 4-bit buffers for the backward."""
    return _nf4_linear(autocast_input(u), *q.tensors(), list(q.shape), q.blocksize, q.dq_blocksize)


@torch.library.custom_op("echo_lora::nf4_linear_and_wat", mutates_args=())
def _nf4_linear_and_wat(u: torch.Tensor, a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        absmax2: Optional[torch.Tensor], offset: Optional[torch.Tensor], code: torch.Tensor,
                        dq_code: torch.Tensor, shape: List[int], blocksize: int,
                        dq_blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u · dequant(W)ᵀ, a · dequant(W)ᵀ) from ONE dequantisation: DoRA on an NF4 base needs both W u and the
    W Aᵀ of its row norm (weight_norm), and dequantising twice per forward doubled its cost. The second
    output is a constant of the backward (the norm is detached, DoRA §4.3): only ∂L/∂u flows back."""
    w = dequantize_fused(packed, absmax, absmax2, offset, code, dq_code, shape=shape, blocksize=blocksize,
                         dq_blocksize=dq_blocksize, dtype=u.dtype)
    return F.linear(u, w), F.linear(a, w)


@_nf4_linear_and_wat.register_fake
def _(u, a, packed, absmax, absmax2, offset, code, dq_code, shape, blocksize, dq_blocksize):
    return u.new_empty(*u.shape[:-1], shape[0]), a.new_empty(a.shape[0], shape[0])


def _nf4_linear_and_wat_setup_context(ctx, inputs, output):
    u, a, *tensors, shape, blocksize, dq_blocksize = inputs
    ctx.save_for_backward(*tensors)
    ctx.layout = dict(shape=shape, blocksize=blocksize, dq_blocksize=dq_blocksize)
    ctx.mark_non_differentiable(output[1])


def _nf4_linear_and_wat_backward(ctx, grad, _grad_wat):
    w = _backward_weight(ctx, grad.dtype)
    return grad @ w, *[None] * 10


_nf4_linear_and_wat.register_autograd(_nf4_linear_and_wat_backward, setup_context=_nf4_linear_and_wat_setup_context)


def nf4_linear_and_wat(u, a, q):
    """(F.linear(u, dequant(q)), F.linear(a, dequant(q))) for an NF4Weight q, dequantised once; a gets no
    gradient."""
    return _nf4_linear_and_wat(autocast_input(u), autocast_input(a.detach()), *q.tensors(), list(q.shape),
                               q.blocksize, q.dq_blocksize)


class LoRALinear(nn.Module):
    def __init__(self, d_in, d_out, *, rank=0, alpha=1.0, dropout=0.0, dora=False, base_format="plain"):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        if base_format == "nf4":     # 4-bit buffers only; NF4Weight.copy_ quantises the loaded W into them
            self.weight = NF4Weight.empty((d_out, d_in))
        else:
            self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.rank, self.dora = rank, dora
        self.enabled = True     # False: behave as the plain base layer (boundary-layer dropping)
        self.merged = False
        if rank > 0:
            self.scale = alpha / rank
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.lora_a = nn.Parameter(torch.empty(rank, d_in, dtype=torch.float32))
            self.lora_b = nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float32))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            if dora:
                self.magnitude = nn.Parameter(torch.ones(d_out, dtype=torch.float32))
                # ‖W‖² per row, cached once W is final (W is frozen); None = not initialised yet.
                self.register_buffer("base_sq_norm", None, persistent=False)

    @property
    def adapted(self):
        return self.rank > 0 and self.enabled and not self.merged

    @property
    def quantized(self):
        """Whether W is stored as NF4 (until merge() replaces it by the dense merged weight)."""
        return isinstance(self.weight, NF4Weight)

    def dense_weight(self, dtype):
        """W as a dense tensor in dtype: the NF4 base dequantised, or the parameter cast."""
        return dequantize_nf4(self.weight, dtype) if self.quantized else self.weight.to(dtype)

    def extra_repr(self):
        kind = ("dora" if self.dora else "lora") if self.rank else "base"
        return f"{self.d_in}→{self.d_out}, {kind}" + (f" r={self.rank} s={self.scale:g}" if self.rank else "")

    @torch.no_grad()
    def cache_base_norm(self):
        self.base_sq_norm = self.dense_weight(torch.float32).pow(2).sum(dim=1)

    @torch.no_grad()
    def init_magnitude(self):
        """DoRA: m ← ‖W‖ per output row, so that W' = W at initialisation. Call after loading W."""
        self.cache_base_norm()
        self.magnitude.copy_(self.base_sq_norm.sqrt())

    def delta_weight(self):
        """s · B A in fp32 (the dense LoRA update, for merging and DoRA's norm)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())

    def weight_norm(self, dtype=None, w_at=None):
        """‖W + s·B A‖ per output row, fp32, detached (DoRA §4.3), clamped away from 0. dtype: the forward's,
        in which an NF4 base is dequantised (a plain W is used in its own dtype). w_at: W Aᵀ [d_out, r] when
        the caller has it already (an NF4 forward computes it beside W u from the same dequantised W).

        Expanded so the dense d_out×d_in update is never materialised:
            ‖W + sBA‖²_i = ‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ
        ‖W‖² is cached (W is frozen); W Aᵀ is one skinny matmul over W in W's dtype with fp32
        accumulation (with bf16 W the norm is within ~1e-3 relative of the dense fp32 one; merge()
        uses the exact fp32 norm). Everything else is fp32. An NF4 W Aᵀ goes through a custom op, as the
        base matmul does: a dequant(W) in the forward graph would be shared, under torch.compile, with the
        backward's, and saved for it.
        """
        with torch.no_grad():
            a, b = self.lora_a.float(), self.lora_b.float()
            if w_at is None:
                w_at = self.base_times_a(dtype)
            cross = (w_at.float() * b).sum(dim=1)
            ba_sq = ((b @ (a @ a.t())) * b).sum(dim=1)
            sq = self.base_sq_norm + 2 * self.scale * cross + self.scale ** 2 * ba_sq
            return sq.clamp_min(1e-24).sqrt()

    def base_times_a(self, dtype=None):
        """W Aᵀ [d_out, r] (weight_norm's skinny matmul), in W's dtype, or for an NF4 W in dtype."""
        if self.quantized:
            return nf4_linear(self.lora_a.to(dtype or self.weight.dtype), self.weight).t()
        return self.weight @ self.lora_a.to(self.weight.dtype).t()

    def forward(self, u):
        w_at = None
        if self.quantized and self.adapted and self.dora:    # W u and the norm's W Aᵀ from one dequant(W)
            base, a_w = nf4_linear_and_wat(u, self.lora_a.to(u.dtype), self.weight)
            w_at = a_w.t()
        else:
            base = nf4_linear(u, self.weight) if self.quantized else F.linear(u, self.weight)
        if not self.adapted:
            return base
        a, b = self.lora_a.to(u.dtype), self.lora_b.to(u.dtype)
        lora = F.linear(F.linear(self.dropout(u), a), b) * self.scale   # eq. 1
        if not self.dora:
            return base + lora
        if self.base_sq_norm is None:
            raise RuntimeError("DoRA magnitude not initialised: call model.init_dora_magnitudes() "
                               "after loading base weights (load_model does this)")
        column_scale = (self.magnitude / self.weight_norm(u.dtype, w_at)).to(base.dtype)
        return column_scale * (base + lora)

    @torch.no_grad()
    def merge(self, dtype=None):
        """Fold the adapter into W (computed in fp32, then cast). Keeps W for an exact unmerge.
        An NF4 base becomes a dense parameter dequant(W) + ΔW in `dtype`, never re-quantised: quantising the
        merged weight would round ΔW away (peft issue #2321). dtype None: the model's dtype, the one its
        embedding has (NF4Weight.dtype follows it), so the next forward's activations match; a plain W
        keeps its own dtype whatever is asked."""
        if self.rank == 0 or self.merged:
            return
        if self.quantized:
            return self._merge_quantized(dtype or self.weight.dtype)
        self._unmerged_weight = self.weight.detach().clone()
        merged = merged_weight(self.weight, self.lora_a, self.lora_b, self.scale,
                               self.magnitude if self.dora else None)
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    def _merge_quantized(self, dtype):
        object.__setattr__(self, "_unmerged_weight", self.weight)   # kept, not registered: state_dict = W only
        merged = merged_weight(self.weight, self.lora_a, self.lora_b, self.scale,
                               self.magnitude if self.dora else None)
        self.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
        self.merged = True

    def _apply(self, fn, recurse=True):
        """An NF4 base kept by merge() for unmerge() is not a submodule (it is no part of state_dict or
        named_modules while merged), so .to() / .cuda() / .double() reach it here."""
        kept = self.__dict__.get("_unmerged_weight")
        if isinstance(kept, NF4Weight):
            kept._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def unmerge(self):
        if self.merged and isinstance(self._unmerged_weight, NF4Weight):
            del self.weight                          # the merged parameter, then the NF4 base back, bit for bit
            self.weight = self._unmerged_weight
            del self._unmerged_weight
            self.merged = False
            return
        if self.merged:
            self.weight.copy_(self._unmerged_weight)
            del self._unmerged_weight
            self.merged = False


def merged_weight(weight, lora_a, lora_b, scale, magnitude=None):
    """The dense weight an adapter stands for, in fp32 (callers choose the dtype to store):
        LoRA (eq. 1):  W' = W + s·B A
        DoRA:          W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row   (exact fp32 norm, no expansion)
    Used by LoRALinear.merge and by convert_weights.py's merged exports, so both fold identically.
    An NF4Weight is dequantised to fp32 first: the merged weight is dequant(W) + ΔW, never re-quantised."""
    if isinstance(weight, NF4Weight):
        weight = dequantize_nf4(weight, torch.float32)
    merged = weight.float() + scale * (lora_b.float() @ lora_a.float())
    if magnitude is not None:
        merged = magnitude.float()[:, None] * merged / merged.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return merged


def lora_linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.rank > 0]


def merge_adapters(model):
    """Fold every adapter into its W (an NF4 base's merged W in the model's dtype, see LoRALinear.merge)."""
    for _, m in lora_linears(model):
        m.merge()
    return model


def unmerge_adapters(model):
    for _, m in lora_linears(model):
        m.unmerge()
    return model


def adapter_state_dict(model):
    """Only the deployable adapter tensors (lora_a, lora_b, magnitude), fp32, on CPU."""
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def adapter_config(args):
    cfg = {"method": args.adapter, "rank": args.lora_rank, "alpha": args.lora_alpha,
           "dropout": args.lora_dropout, "modules": list(args.lora_modules),
           "layers": None if args.lora_layers is None else list(args.lora_layers),
           "base": args.to_params_json()}
    if args.base_format != "plain":    # trained against dequant(W): said, for whoever evaluates it
        cfg["base_format"] = args.base_format
    return cfg


def save_adapter(model, out_dir, tensors=None):
    """Write out_dir/adapter.safetensors + out_dir/adapter_config.json (atomically per file).
    tensors: the adapter's tensors taken earlier (a checkpoint written while training goes on)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False).name
    save_file(adapter_state_dict(model) if tensors is None else tensors, tmp)
    publish(tmp, out_dir / "adapter.safetensors")      # the umask's mode, not tempfile's 0600
    tmp = out_dir / "adapter_config.json.tmp"
    tmp.write_text(json.dumps(adapter_config(model.args), indent=2))
    publish(tmp, out_dir / "adapter_config.json")


def read_adapter_config(adapter_dir):
    """adapter_dir/adapter_config.json, checked (check_adapter_config): a wrong type is one line naming the
    file and the key, never a traceback deep inside the model code."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}")
    return check_adapter_config(read_json(path), path)


def _json_type(value):
    return {str: "a string", bool: "a boolean", list: "a list", dict: "an object", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _json_kind(value):
    """How a JSON value reads in an error message: '"4" (a string)', 'null', '[1, 2] (a list)'."""
    kind = _json_type(value)
    text = json.dumps(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return text if value is None else f"{text} ({kind})"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


ADAPTER_CONFIG_RULES = {   # key: (required, check, what it must be)
    "method": (True, lambda v: v in ("lora", "dora"), '"lora" or "dora"'),
    "rank": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "alpha": (True, _is_number, "a finite number"),
    "dropout": (False, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "modules": (True, lambda v: isinstance(v, list) and v and all(isinstance(m, str) for m in v),
                "a non-empty list of module names"),
    "layers": (False, lambda v: v is None or (isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)), "null or a list of layer indices"),
    "base": (False, lambda v: v is None or isinstance(v, dict), "null or an object (the base's params.json)"),
}


def check_adapter_config(cfg, path="adapter_config.json"):
    """Types and values of an adapter_config.json dict (model/lora.py adapter_config writes it): returns cfg,
    or raises one ValueError naming the file and the key."""
    fix = "fix the file, or save the adapter again (train.py, convert_weights.py)"
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object with method, rank, alpha, modules; got "
                         f"{_json_type(cfg)}: {fix}")
    for key, (required, ok, what) in ADAPTER_CONFIG_RULES.items():
        if key not in cfg:
            if required:
                raise ValueError(f'{path}: missing key "{key}" ({what}): {fix}')
            continue
        if not ok(cfg[key]):
            raise ValueError(f'{path}: "{key}" must be {what}, got {_json_kind(cfg[key])}: {fix}')
    return cfg


def read_adapter_tensors(path):
    """{name: tensor} of an adapter.safetensors; a damaged file or a NaN/inf tensor is a one-line error.
    A non-finite adapter (a diverged run) would silently turn every logit into NaN, so it is refused."""
    return check_finite(read_safetensors(path, what="adapter"), path)


def check_finite(tensors, origin):
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{origin}: adapter tensor {k} has NaN/inf values (the run diverged?); "
                             f"use an earlier checkpoint or retrain")
    return tensors


def check_adapter_tensors(tensors, expected, origin):
    """tensors must hold exactly the keys of `expected` ({name: shape}) with those shapes."""
    for k in tensors:
        if k not in expected:
            raise ValueError(f"{origin}: unexpected adapter key {k} (adapter built for another config?)")
    for k, shape in expected.items():
        if k not in tensors:
            raise ValueError(f"{origin}: missing adapter key {k} (adapter_config.json and the tensors disagree)")
        if tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"{origin}: {k} has shape {tuple(tensors[k].shape)}, this model needs {tuple(shape)}")


def adapter_shapes(model):
    """{name: shape} of the adapter tensors a model built with an adapter config holds."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def load_adapter_tensors(model, tensors, origin="adapter"):
    """Load checked adapter tensors into a model built with the matching adapter config."""
    check_adapter_tensors(tensors, adapter_shapes(model), origin)
    model.load_state_dict(tensors, strict=False)
    for _, m in lora_linears(model):
        if m.dora and m.base_sq_norm is None:    # ‖W‖² depends on W alone: cached when W was loaded
            m.cache_base_norm()
    return model


def load_adapter(model, adapter_dir):
    """Load adapter_dir/adapter.safetensors into a model built with the matching adapter config."""
    path = Path(adapter_dir) / "adapter.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no adapter.safetensors in {adapter_dir}")
    return load_adapter_tensors(model, read_adapter_tensors(path), path)
