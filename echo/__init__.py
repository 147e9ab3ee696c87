"""Echo-LoRA (Peng et al., 2026): training-time deep→shallow echo for LoRA / DoRA.

The math (eqs. 2-12) is in echo/echo.py's docstring. Labels are unshifted (aligned with the input
ids; prompt and padding = -100; right padding). The Echo path is training-only: it is saved apart
from the adapter (echo.safetensors) and discarded at deployment. Echo-DoRA = the same with a DoRA
model; nothing here is adapter-specific.

API (every equation is computed once, in the function named here; the tests call the same ones)
    EchoConfig(...)                     the hyper-parameters, declared once (defaults = the paper's);
        .resolve(n_layers)              validated copy: non-negative sorted layers, wq/wk/... names
        EchoConfig.add_flags(parser) / EchoConfig.from_flags(opts, seed=...)   train.py's --echo-* flags
    supervision(labels, bucket=1) -> (index, targets, boundary)   answer positions A, their targets, t*
    aggregate_sources(hiddens, t_star) -> z                        eq. 2 (detached mean at t*)
    echo_norm(z, kind, eps); EchoInjector(d_in, d_out, ...)        eqs. 3-6
    answer_mask(labels, all_positions=False, attention_mask=None)  eq. 8
    EchoModule(cfg, model.args)                                    all injectors; keep it fp32
        echo(source_hiddens, boundary, labels) -> EchoInject       eqs. 2-8 (what the Echo-on pass adds);
            packed rows (--pack): rows= each example's row, documents= each token's example (δ per token)
        echo.inject(z, labels) -> EchoInject;  echo.deltas(z) -> {(layer, module): δ}
    EchoInject.at_layer(i) -> EchoSite; EchoSite.apply(module, x, out)   eq. 7 inside the model (echo/inject.py:
        model/ knows only this protocol; x is the module's input, for variants such as --echo-token-scale)
    routing_probability(k, K, cfg); Router(cfg, total_steps)       eqs. 10, 9 (router(k) once per step)
    masked_kl(logits_on, logits_off, labels=None, *, valid=None, tau, reduction)   eq. 12
    echo_objective(loss_off, loss_on, loss_kd, routed, lambda_kd)                 eq. 11
    echo_loss(model, echo, tokens, labels, *, routed, normalizer=None, supervised=None, record=None)
        -> (loss, sums [ΣCE_off, ΣCE_on, τ²ΣKL])   one micro-batch of training; echo=None = plain LoRA/DoRA;
        packing=data.Packing: packed rows (docs/packing.md), z/δ/M and the answer window per example;
        record: a dict that receives the pass's EchoInject, norms and Echo-on logits (diagnostics, tests)
    uses_answer_window(cfg)     whether the Echo-on pass recomputes only the answer window (echo_loss)
    save_echo(echo, out_dir) / load_echo(in_dir)   echo.safetensors + echo_config.json (analysis only)

Training loop sketch (train.py):
    echo = EchoModule(EchoConfig(...), model.args).to(device)          # keep fp32
    opt = AdamW([*adapter_params, *echo.parameters()])
    router = Router(echo.cfg, total_steps)
    for k in range(total_steps):
        routed = router(k)                                             # one draw per optimizer step
        for micro in micro_batches:
            loss, sums = echo_loss(model, echo, tokens, labels, routed=routed,
                                   normalizer=n_answer_tokens_of_the_whole_step)
            loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)    # None grads: Echo weights untouched when r=0
"""
from echo.echo import (FIELDS, IGNORE, MODULES, EchoConfig, EchoInjector, EchoModule, Router, aggregate_sources,
                       answer_mask, echo_loss, echo_norm, echo_objective, load_echo, masked_kl, module_in_dim,
                       module_out_dim, routing_probability, save_echo, supervision, uses_answer_window)
from echo.inject import EchoInject, EchoSite, add_echo

__all__ = ["FIELDS", "IGNORE", "MODULES", "EchoConfig", "EchoInject", "EchoInjector", "EchoModule", "EchoSite",
           "Router", "add_echo", "aggregate_sources", "answer_mask", "echo_loss", "echo_norm", "echo_objective",
           "load_echo", "masked_kl", "module_in_dim", "module_out_dim", "routing_probability", "save_echo",
           "supervision", "uses_answer_window"]
