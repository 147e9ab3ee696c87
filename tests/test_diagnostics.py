"""Echo diagnostics (echo/diagnostics.py, analysis only) against independent computations, and their cadence in
training (every --diagnose-every routed steps, the same after a resume)."""
import json

import pytest
import torch

import train
from echo import EchoConfig, EchoModule, aggregate_sources, echo_loss, echo_norm, supervision
from echo.diagnostics import echo_diagnostics
from model import ModelArgs, Transformer
from test_train import Crash, args, crash_in_step, metrics, setup  # noqa: F401  (setup is a fixture)


def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", vocab_size=259, adapter="lora", lora_rank=4, lora_dropout=0.0,
                                            lora_modules=("wq", "wk", "wv", "wo"))).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    echo = EchoModule(EchoConfig(target_layers=(1,), source_layers=(2, 3), lambda_init=0.7, gate_bias_init=0.3),
                      model.args).double()
    tokens = torch.randint(0, 259, (3, 12))
    labels = torch.full_like(tokens, -100)
    labels[0, 5:9], labels[1, 3:12], labels[2, 8:10] = tokens[0, 5:9], tokens[1, 3:12], tokens[2, 8:10]
    return model, echo, tokens, labels


def test_diagnostics_equal_an_independent_computation():
    model, echo, tokens, labels = tiny()
    supervised = supervision(labels)
    got = echo_diagnostics(model, echo, tokens, labels, supervised)
    assert sorted(got) == ["1_wq", "1_wv"]
    # independently: the module outputs o of layer 1's q/v projections, from the Echo-off pass's layer-0 output
    hiddens = {}
    model.run_layers(model.embed(tokens), 0, 4, positions=model.positions_for(tokens), hidden_layers=(0, 2, 3),
                     hiddens=hiddens)
    x = model.layers[1].attention_norm(hiddens[0])
    z = aggregate_sources([hiddens[2], hiddens[3]], supervised[2])
    mask = (labels != -100).double()[..., None]                        # eq. 8 on unshifted labels
    loss, _ = echo_loss(model, echo, tokens, labels, routed=True, supervised=supervised)
    grads = dict(zip([n for n, _ in echo.named_parameters()], torch.autograd.grad(loss, list(echo.parameters()))))
    for module, linear in (("wq", model.layers[1].attention.wq), ("wv", model.layers[1].attention.wv)):
        injector = echo.injectors[f"1_{module}"]
        delta = injector(z)[:, None, :] * mask
        o = linear(x) * mask
        want = {"gate": injector.gate(echo_norm(z, injector.norm, injector.norm_eps)).mean(),
                "lambda": injector.lam, "delta_ratio": delta.norm() / o.norm(),
                "delta_rms": delta.pow(2).sum().div(mask.sum() * delta.shape[-1]).sqrt(),
                "out_rms": o.pow(2).sum().div(mask.sum() * o.shape[-1]).sqrt(),
                "grad_norm": torch.stack([g.norm() for n, g in grads.items() if n.startswith(f"injectors.1_{module}.")]
                                         ).norm()}
        for key, value in want.items():
            assert got[f"1_{module}"][key] == pytest.approx(float(value), rel=1e-9), (module, key)
    assert 0 < got["1_wq"]["delta_ratio"] < 10 and got["1_wq"]["grad_norm"] > 0


def test_diagnostics_leave_the_model_and_its_gradients_alone():
    model, echo, tokens, labels = tiny()
    model.train()
    echo_diagnostics(model, echo, tokens, labels, supervision(labels))
    assert model.training and all(p.grad is None for p in [*model.parameters(), *echo.parameters()])


def diagnosed_steps(out):
    return [json.loads(l)["step"] for l in (out / "echo_diagnostics.jsonl").read_text().splitlines()]


def test_cadence_every_n_routed_steps_and_the_same_after_resume(setup, tmp_path, monkeypatch):
    extra = ("--max-steps", "8", "--echo-p-end", "0.3", "--diagnose-every", "2", "--save-every", "3")
    full = train.main(args(setup, tmp_path / "full", *extra))
    routed = [m["step"] for m in metrics(full) if m["routed"]]
    assert diagnosed_steps(full) == routed[::2] and len(routed) >= 4
    crash_in_step(monkeypatch, 5)
    with pytest.raises(Crash):
        train.main(args(setup, tmp_path / "resumed", *extra))
    monkeypatch.undo()
    resumed = train.main(args(setup, tmp_path / "resumed", *extra, "--resume"))
    assert diagnosed_steps(resumed) == diagnosed_steps(full)
    lines = [json.loads(l) for l in (full / "echo_diagnostics.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m for m in metrics(full)}
    for line in lines:
        assert line["loss_on"] == by_step[line["step"]]["loss_on"] and set(line["modules"]) == {"1_wq", "1_wv"}
