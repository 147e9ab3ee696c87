"""Echo in one room: model/ knows only the injection protocol (no Echo math, no echo/ import at module level),
one compiled block graph serves every layer whatever the number of layers, training's Echo-on pass and the
teacher probe inject through the same code (equal logits), and the per-token scale (--echo-token-scale,
λ_t = λ + w·x_t) starts exactly at the scalar λ, adds (w·x_t)(e ⊙ g) by eq. 7 and trains w."""
import ast
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from echo import EchoConfig, EchoModule, echo_loss, load_echo, save_echo, supervision
from echo.diagnostics import echo_diagnostics
from echo.inject import EchoInject, EchoSite
from experiments import teacher_probe as tp
from model.model import ModelArgs, Transformer


def tiny(n_layers=4, seed=0, dtype=torch.float64, **cfg):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                                  max_seq_len=64, adapter="lora", lora_rank=4, lora_dropout=0.0)).to(dtype)
    with torch.no_grad():
        for m in model.adapter_linears():
            m.lora_b.normal_(0.0, 0.05)
    cfg = {"target_layers": (0, 1), "source_layers": (-2, -1), "bottleneck": 8, **cfg}
    echo = EchoModule(EchoConfig(**cfg), model.args).to(dtype)
    return model, echo


def randomize_token_scale(echo, std=0.3):
    with torch.no_grad():
        for injector in echo.injectors.values():
            injector.token_w.normal_(0.0, std)
            injector.lam.fill_(2.0)


def prompts_and_answers(B=3, prompt=5, answer=4, seed=1):
    """Rows of one prompt length and one answer length: no padding, so training's batch and the probe's
    left-padded batch are the same tensors."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 61, (B, prompt + answer), generator=g)
    labels = torch.full_like(tokens, -100)
    labels[:, prompt:] = tokens[:, prompt:]
    return tokens, labels


# ----------------------------------------------------------------------------- the floors

def test_model_holds_no_echo_math_and_does_not_import_echo():
    for path in sorted((Path(ROOT) / "model").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:          # module-level imports (model.model's one temporary name is lazy)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "echo" or n.startswith("echo.") for n in names), f"{path.name} imports {names}"
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & {"EchoInject", "EchoSite", "add_echo", "answer_mask", "aggregate_sources"}, path.name


# ----------------------------------------------------------------------------- one graph for every layer

def count_block_graphs(n_layers, targets, token_scale):
    """Compile every block (as training/graphs.compile_blocks does) with a counting backend; run a plain and
    an Echo-on forward; -> the number of graphs Dynamo made."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model, echo = tiny(n_layers, dtype=torch.float32, target_layers=targets, source_layers=(-1,),
                       token_scale=token_scale)
    counter = CompileCounter()
    for block in model.layers:
        block.compile(backend=counter, dynamic=False)
    tokens, labels = prompts_and_answers()
    with torch.no_grad():
        inject = echo.inject(torch.randn(3, 32), labels)
        model(tokens)
        model(tokens, echo_inject=inject)
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("token_scale", [False, True])
def test_one_block_graph_serves_every_layer(token_scale):
    """Two graphs (blocks without a site, blocks with an EchoSite), for 3 layers and 2 targets as for
    6 layers and 5 targets: the site has the same structure on every layer, and blocks never see their index."""
    small = count_block_graphs(3, (0, 1), token_scale)
    big = count_block_graphs(6, (0, 1, 2, 3, 4), token_scale)
    assert small == big == 2


# ----------------------------------------------------------------------------- one injection path

@pytest.mark.parametrize("token_scale", [False, True])
@pytest.mark.parametrize("answer_window", [True, False])
def test_teacher_probe_logits_are_training_echo_on_logits(token_scale, answer_window):
    """The teacher probe's Echo-on logits at the answer positions equal the logits of echo_loss's own Echo-on
    pass (what training backpropagates) for the same batch; with the per-token scale's term live too."""
    model, echo = tiny(token_scale=token_scale, answer_window=answer_window, lambda_init=2.0)
    if token_scale:
        randomize_token_scale(echo)
    model.eval()
    tokens, labels = prompts_and_answers()
    supervised = supervision(labels)
    record = {}
    with torch.no_grad():
        echo_loss(model, echo, tokens, labels, routed=True, supervised=supervised, record=record)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        source = tp.teacher_source(model, echo, tokens[:, :5], mask[:, :5])
        probe = tp.forward_logits(model, tokens, mask, tp.teacher_inject(echo, source, tokens, mask), supervised[0])
        plain = tp.forward_logits(model, tokens, mask, None, supervised[0])
    valid = supervised[1] != -100
    torch.testing.assert_close(probe[valid], record["logits_on"][valid], rtol=1e-10, atol=1e-10)
    assert (probe - plain).abs().amax() > 1e-3                  # the injection did something


# ----------------------------------------------------------------------------- the per-token scale

def test_token_scale_off_adds_no_parameter_and_on_starts_exactly_at_lambda():
    model, plain = tiny()
    _, scaled = tiny(token_scale=True)
    assert not any("token_w" in k for k in plain.state_dict())
    assert {k for k in scaled.state_dict() if "token_w" in k} == {f"injectors.{k}.token_w" for k in scaled.injectors}
    assert all(torch.equal(v, scaled.state_dict()[k]) for k, v in plain.state_dict().items())   # same draws
    tokens, labels = prompts_and_answers()
    a = echo_loss(model, plain, tokens, labels, routed=True)
    b = echo_loss(model, scaled, tokens, labels, routed=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])                          # w = 0: the scalar λ
    b[0].backward()
    for key, injector in scaled.injectors.items():
        assert injector.token_w.grad.abs().amax() > 0, key                               # and w learns


def test_token_scale_adds_lambda_t_times_e_gate_at_answer_positions():
    """eq. 7 with λ_t = λ + w·x_t, by hand in fp64: o + M_t (λ + w·x_t) (e ⊙ g) at one module."""
    _, echo = tiny(token_scale=True)
    randomize_token_scale(echo)
    torch.manual_seed(3)
    z = torch.randn(2, 32, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    inject = echo.inject(z, labels)
    site = inject.at_layer(1)
    assert isinstance(site, EchoSite) and inject.at_layer(2) is None
    injector = echo.injectors["1_wv"]
    x, out = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    got = site.apply("wv", x, out)
    from echo.echo import echo_norm
    z_bar = echo_norm(z, injector.norm, injector.norm_eps)
    e = torch.tanh(z_bar @ injector.W1.weight.T) @ injector.W2.weight.T
    g = torch.sigmoid(torch.tanh(z_bar @ injector.U1.weight.T) @ injector.U2.weight.T + injector.b)
    for b in range(2):
        for t in range(5):
            lam_t = injector.lam + x[b, t] @ injector.token_w
            want = out[b, t] + (lam_t * e[b] * g[b] if labels[b, t] != -100 else 0)
            torch.testing.assert_close(got[b, t], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(site.apply("w1", x, out), out)            # not a target module


def test_token_scale_save_load_and_diagnostics(tmp_path):
    model, echo = tiny(token_scale=True, target_modules=("wo", "w2"))   # inputs of other widths than dim
    randomize_token_scale(echo)
    save_echo(echo, tmp_path)
    loaded = load_echo(tmp_path).double()
    assert loaded.in_dims == {"wo": 32, "w2": model.args.ffn_hidden_dim}
    tokens, labels = prompts_and_answers()
    for key, injector in echo.injectors.items():            # saved as fp32
        assert torch.equal(loaded.injectors[key].token_w, injector.token_w.float().double())
    torch.testing.assert_close(echo_loss(model, loaded, tokens, labels, routed=True)[0],
                               echo_loss(model, echo, tokens, labels, routed=True)[0], rtol=1e-6, atol=0)
    stats = echo_diagnostics(model, echo, tokens, labels, supervision(labels))
    assert sorted(stats) == ["0_w2", "0_wo", "1_w2", "1_wo"] and all(s["grad_norm"] > 0 for s in stats.values())


def test_diagnostics_sync_with_the_host_once(monkeypatch):
    model, echo = tiny()
    tokens, labels = prompts_and_answers()
    calls = []
    for name in ("tolist", "item", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: calls.append(_n) or _real(self, *a))
    stats = echo_diagnostics(model, echo, tokens, labels, supervision(labels))
    monkeypatch.undo()
    assert calls == ["tolist"] and len(stats) == 4
