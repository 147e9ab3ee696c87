"""Eq. 7 inside the model: what the Echo-on pass adds to each target module's output.

model/ knows only this protocol (model/model.py's docstring): `run_layers(echo_inject=X)` asks
`X.at_layer(i)` for block i's share — None, or an object whose `apply(module, x, out)` returns the output
the module passes on (x: the module's input, out: its output). Everything Echo does there lives here, so a
variant of the injection (a per-token scale, a gate that reads x, another mask) changes echo/ only.

Every target layer's share is an EchoSite of the same structure (the same module keys, the same tensor
kinds, the same None fields), so the guards of the compiled block graph hold for every layer and one graph
serves them all (tests/test_echo_room.py counts the graphs). Blocks never see their own index.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from model.model import at_least_fp32


def add_echo(out, x, mask, delta, token_scale=None):   # eq. 7
    """o_{b,t} ← o_{b,t} + M_{b,t} δ_{b,t}, in the output's dtype. -> (new output, the added M δ).

    δ_{b,t} = δ_b = λ (e ⊙ g)_b (eq. 6), or with --echo-token-scale λ_t = λ + w·x_t:
    δ_{b,t} = δ_b + (w·x_{b,t}) (e ⊙ g)_b, where token_scale = (w [d_in], e ⊙ g [B, d_out]) and x [B, T, d_in]
    is the module's input. w starts at 0, so the run starts exactly at the scalar λ.
    Packed rows (--pack) carry δ (and e ⊙ g) per token, [B, T, d_out]: each token its own example's."""
    per_row = lambda d: d[:, None, :] if d.dim() == 2 else d
    delta = per_row(delta)
    if token_scale is not None:
        w, unscaled = token_scale
        xf = at_least_fp32(x)
        delta = delta + (xf @ w.to(xf.dtype))[..., None] * per_row(unscaled)
    added = mask[..., None].to(out.dtype) * delta.to(out.dtype)
    return out + added, added


@dataclass
class EchoSite:
    """One target layer's share of an EchoInject: module → δ [B, d_out], M [B, T], and optionally module →
    (w, e ⊙ g) (the per-token scale) and a dict to record norms into (analysis only)."""
    deltas: dict
    mask: torch.Tensor
    token_scales: Optional[dict] = None
    norms: Optional[dict] = None

    def apply(self, module, x, out):
        if module not in self.deltas:
            return out
        scale = None if self.token_scales is None else self.token_scales[module]
        new, added = add_echo(out, x, self.mask, self.deltas[module], scale)
        if self.norms is not None:      # the module's own output and M δ at the injected positions (diagnostics)
            self.norms[module] = (at_least_fp32(self.mask[..., None] * out).pow(2).sum(), at_least_fp32(added).pow(2).sum())
        return new


@dataclass
class EchoInject:
    """The Echo signal for one forward pass (eq. 7): module output o ← o + M ⊙ δ.

    deltas: {(layer ≥ 0, module name): δ [B, d_out]}; mask: M [B, T] (eq. 8, 1 on answer positions);
    token_scales: {(layer, module): (w, e ⊙ g)} with --echo-token-scale, else None;
    norms: analysis only (echo.diagnostics): filled in as {layer: {module: (Σ (M o)², Σ (M δ)²)}}.
    """
    deltas: dict
    mask: torch.Tensor
    norms: Optional[dict] = None
    token_scales: Optional[dict] = None

    def at_layer(self, layer_id):
        """Block layer_id's EchoSite, or None when no module of that layer is a target."""
        deltas = {module: d for (layer, module), d in self.deltas.items() if layer == layer_id}
        if not deltas:
            return None
        scales = None if self.token_scales is None else \
            {module: s for (layer, module), s in self.token_scales.items() if layer == layer_id}
        norms = None if self.norms is None else self.norms.setdefault(layer_id, {})
        return EchoSite(deltas, self.mask, scales, norms)
