"""Echo diagnostics (analysis only, never part of the objective): per target module, how large the injected
δ is against the module's own output, how open the gate is, λ, and how much gradient the Echo weights get.

    echo_diagnostics(model, echo, tokens, labels, supervised) -> {"4_wq": {...}, ...}

It answers "is the Echo path inert, and why": δ small next to o (λ, gate), Echo weights that barely
move (gradient), or a signal that carries nothing (then L_on ≈ L_off although δ/o is not small).
Computed on one micro-batch, in eval mode (no dropout) and eagerly, from one routed echo_loss: the same
passes and injection as training (eqs. 2-12), its backward for the gradient, and one host sync.
"""
import contextlib

import torch

from echo.echo import aggregate_sources, echo_loss, echo_norm


def eager():
    """Run compiled modules eagerly (the norms are recorded into a dict, which a compiled graph would not)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def echo_diagnostics(model, echo, tokens, labels, supervised):
    """{"<layer>_<module>": {gate, lambda, delta_rms, out_rms, delta_ratio, grad_norm}} for one micro-batch.

    gate: mean of g (eq. 5) over rows and features; lambda: λ (eq. 6); delta_rms / out_rms: RMS of δ
    and of the module's own output o over the positions M injects into (eq. 8; eq. 7 adds M δ to o);
    delta_ratio:
    ‖M δ‖ / ‖M o‖; grad_norm: ‖∂L/∂θ‖ over that injector's weights, L = eq. 11 with r = 1 on this
    micro-batch (token mean)."""
    was_training = model.training
    model.eval()
    try:
        with eager():
            return injector_stats(model, echo, tokens, labels, supervised)
    finally:
        model.train(was_training)


STATS = ("gate", "lambda", "delta_rms", "out_rms", "delta_ratio", "grad_norm")


def injector_stats(model, echo, tokens, labels, supervised):
    """One routed echo_loss (training's own passes and injection, eqs. 2-12) and its backward give every
    number: the Echo-on pass records the norms, the gradient comes from its loss. One host sync."""
    record = {}
    loss, _ = echo_loss(model, echo, tokens, labels, routed=True, supervised=supervised, record=record,
                        window=False)     # every answer token's injection (the answer window skips the last)
    names = [name.split(".")[1] for name, _ in echo.named_parameters()]   # injectors.<layer>_<module>.<weight>
    grads = torch.autograd.grad(loss, list(echo.parameters()), allow_unused=True)
    inject, norms = record["inject"], record["norms"]
    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):    # the Echo weights run in fp32
        z = aggregate_sources(record["source_hiddens"], record["boundary"])              # eq. 2
        n = inject.mask.sum().clamp_min(1)
        keys, rows = [], []
        for (layer, module), delta in inject.deltas.items():
            key = echo.key(layer, module)
            injector = echo.injectors[key]
            z_bar = echo_norm(z.to(injector.b.dtype), injector.norm, injector.norm_eps)     # eq. 3
            o_sq, d_sq = norms[layer][module]
            width = delta.shape[-1]
            grad_sq = [g.double().pow(2).sum() for k, g in zip(names, grads) if k == key and g is not None]
            row = [injector.gate(z_bar).mean(), injector.lam, (d_sq / (n * width)).sqrt(),          # eq. 5
                   (o_sq / (n * width)).sqrt(), (d_sq / o_sq.clamp_min(1e-30)).sqrt(),
                   torch.stack(grad_sq).sum().sqrt() if grad_sq else torch.zeros((), device=z.device)]
            keys.append(key)
            rows.append(torch.stack([v.detach().double().reshape(()) for v in row]))
        values = torch.stack(rows).tolist()                                              # the one host sync
    return {key: dict(zip(STATS, row)) for key, row in zip(keys, values)}
