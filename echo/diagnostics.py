"""Echo diagnostics (analysis only, never part of the objective): per target module, how large the injected
δ is against the module's own output, how open the gate is, λ, and how much gradient the Echo weights get.

    echo_diagnostics(model, echo, tokens, labels, supervised) -> {"4_wq": {...}, ...}

It answers "is the Echo path inert, and why": δ small next to o (λ, gate), Echo weights that barely
move (gradient), or a signal that carries nothing (then L_on ≈ L_off although δ/o is not small).
Computed on one micro-batch, in eval mode (no dropout) and eagerly, with the same functions that
training uses: eqs. 2-8 (EchoModule, EchoInjector.gate) and echo_loss for the gradient.
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
    delta_ratio: ‖M δ‖ / ‖M o‖; grad_norm: ‖∂L/∂θ‖ over that injector's weights, L = eq. 11 with r = 1
    on this micro-batch (token mean)."""
    was_training = model.training
    model.eval()
    try:
        with eager():
            grads = injector_grad_norms(model, echo, tokens, labels, supervised)
            with torch.no_grad():
                return {key: {**stats, "grad_norm": grads[key]}
                        for key, stats in injector_stats(model, echo, tokens, labels, supervised).items()}
    finally:
        model.train(was_training)


def injector_grad_norms(model, echo, tokens, labels, supervised):
    loss, _ = echo_loss(model, echo, tokens, labels, routed=True, supervised=supervised)
    names = [name for name, _ in echo.named_parameters()]
    grads = torch.autograd.grad(loss, list(echo.parameters()), allow_unused=True)
    squares = {}
    for name, g in zip(names, grads):
        key = name.split(".")[1]                          # injectors.<layer>_<module>.<weight>
        squares[key] = squares.get(key, 0.0) + (0.0 if g is None else float(g.double().pow(2).sum()))
    return {key: s ** 0.5 for key, s in squares.items()}


def injector_stats(model, echo, tokens, labels, supervised):
    _, _, boundary = supervised
    sources, hiddens = echo.cfg.source_layers, {}
    positions = model.positions_for(tokens)
    h = model.embed(tokens)
    model.run_layers(h, 0, model.args.n_layers, positions=positions, hidden_layers=sources, hiddens=hiddens)
    source_hiddens = [hiddens[l] for l in sources]
    with torch.autocast(tokens.device.type, enabled=False):      # the Echo weights run in fp32, as in echo_loss
        inject = echo(source_hiddens, boundary, labels)                                 # eqs. 2-8
        z = aggregate_sources(source_hiddens, boundary)                                 # eq. 2, for the gate
    norms = inject.norms = {}
    model.run_layers(h, 0, model.args.n_layers, positions=positions, echo_inject=inject)   # eq. 7, recorded
    n = inject.mask.sum().clamp_min(1)
    out = {}
    for (layer, module), delta in inject.deltas.items():
        injector = echo.injectors[echo.key(layer, module)]
        with torch.autocast(tokens.device.type, enabled=False):
            z_bar = echo_norm(z.to(injector.b.dtype), injector.norm, injector.norm_eps)     # eq. 3
            gate = float(injector.gate(z_bar).mean())                                       # eq. 5
        o_sq, d_sq = norms[layer][module]
        width = delta.shape[-1]
        out[echo.key(layer, module)] = {
            "gate": gate, "lambda": float(injector.lam),
            "delta_rms": float((d_sq / (n * width)).sqrt()), "out_rms": float((o_sq / (n * width)).sqrt()),
            "delta_ratio": float((d_sq / o_sq.clamp_min(1e-30)).sqrt())}
    return out
