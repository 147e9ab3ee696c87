"""Echo-LoRA (Peng et al., 2026): training-time deep→shallow echo for LoRA / DoRA.

The math (eqs. 2-12) is in echo/echo.py's docstring. Labels are unshifted (aligned with the input
ids; prompt and padding = -100; right padding). The Echo path is training-only: it is saved apart
from the adapter (echo.safetensors) and discarded at deployment. Echo-DoRA = the same with a DoRA
model; nothing here is adapter-specific.

API
    EchoConfig(target_layers=(4,5,6,7), target_modules=("wq","wv"), source_layers=(-8,-7,-6,-5),
               bottleneck=64, gate_bias_init=-2.0, lambda_init=0.1, norm="layernorm", norm_eps=1e-5,
               answer_only=True, p_start=1.0, p_end=0.2, tau=2.0, lambda_kd=1.0,
               allow_any_depth=False, seed=0)
        .resolve(n_layers) -> EchoConfig     validated: non-negative sorted layers, wq/wk/... names
                                             (q_proj etc. accepted), sources deeper than all targets
                                             unless allow_any_depth.
    EchoModule(cfg, model.args)              nn.Module, one EchoInjector per (target layer, module);
                                             keep it fp32 (also with a bf16 model)
        echo(z, labels, attention_mask=None) -> model.EchoInject(deltas, mask)   eqs. 3-8
                                             (fp32 δ, bool M; the model casts when adding)
        echo.cfg (resolved config), echo.deltas(z) -> {(layer, module): δ [B, d_out]}
    Router(p_start, p_end, total_steps, seed) / make_router(cfg, total_steps)        eqs. 9-10
        router(k) -> bool   call ONCE per optimizer step k (0-based), same seed on all ranks
        router.p(k) -> float; router.state_dict() / router.load_state_dict(state)
    echo_loss(model, echo, tokens, labels, attention_mask=None, *, routed, normalizer=None)
        -> (loss, stats)    the whole step for one micro-batch (eqs. 2-12): Echo-off pass, and
                            if routed the Echo-on pass (layers below the first target are shared)
                            loss = (ΣCE_off + r(ΣCE_on + λ_kd τ² ΣKL)) / normalizer; normalizer
                            defaults to this micro-batch's answer-token count.
    Pieces (for a hand-written loop / analysis):
        answer_boundary(labels) -> t* [B]                          (eq. 2; raises on no answer)
        aggregate_sources([h_l [B,T,D] ...], t_star) -> z [B, D]   (eq. 2, detached mean)
        echo_norm(z, kind, eps), EchoInjector(d_in, d_out, ...)   (eqs. 3-6)
        answer_mask(labels, answer_only=True, attention_mask=None) -> bool [B, T]   (eq. 8)
        supervised_index(labels) -> (logits_index [B,P], targets [B,P] (-100 padded))
        masked_kl(logits_on, logits_off, labels=None, *, valid=None, tau=2.0, reduction="mean")
            -> τ²/|A| Σ KL(q_on ‖ q_off)  or ("sum") (τ² Σ KL, |A|)                 (eq. 12)
        echo_objective(loss_off, loss_on, loss_kd, routed, lambda_kd=1.0)            (eq. 11)
    save_echo(echo, out_dir) -> out_dir/echo.safetensors + out_dir/echo_config.json
    load_echo(in_dir, device="cpu") -> EchoModule

Training loop sketch (train.py):
    echo = EchoModule(EchoConfig(...), model.args).to(device)          # keep fp32
    opt = AdamW([*adapter_params, *echo.parameters()])
    router = make_router(echo.cfg, total_steps)
    for k in range(total_steps):
        routed = router(k)                                             # one draw per optimizer step
        for micro in micro_batches:
            loss, stats = echo_loss(model, echo, tokens, labels, attn, routed=routed,
                                    normalizer=n_answer_tokens_of_the_whole_step)
            loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)    # None grads: Echo weights untouched when r=0
"""
from echo.echo import (IGNORE, MODULES, EchoConfig, EchoInjector, EchoModule, Router, aggregate_sources,
                       answer_boundary, answer_mask, echo_loss, echo_norm, echo_objective,
                       load_echo, make_router, masked_kl, module_out_dim, save_echo, supervised_index)

__all__ = ["IGNORE", "MODULES", "EchoConfig", "EchoInjector", "EchoModule", "Router", "aggregate_sources",
           "answer_boundary", "answer_mask", "echo_loss", "echo_norm", "echo_objective",
           "load_echo", "make_router", "masked_kl", "module_out_dim", "save_echo", "supervised_index"]
