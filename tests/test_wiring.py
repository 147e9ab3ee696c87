"""The wiring between the flags, the config, the modules and the loop — what the equation tests cannot see:
train.py's own step computes the clipped token-mean gradient of eq. 11 (its normaliser included), every
EchoConfig field set on the command line reaches config.json and the built modules, and the flags a
user feeds back through --config reproduce the run."""
import json
from dataclasses import asdict, fields

import pytest
import torch

import train
from echo import MODULES, EchoConfig, echo_loss
from test_train import args, metrics, setup  # noqa: F401  (setup is a fixture)

LAYERS_FOR_THE_TINY_MODEL = {"target_layers": (0,), "source_layers": (-1, 2)}   # 4 layers; the rest is generic


def away_from_default(f):
    """A valid value other than field f's default, from its declared type and choices."""
    d = f.default
    if f.name in LAYERS_FOR_THE_TINY_MODEL:
        return LAYERS_FOR_THE_TINY_MODEL[f.name]
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != d)
    if isinstance(d, bool):
        return not d
    if isinstance(d, int):
        return d // 2 + 1
    if isinstance(d, float):
        return d * 0.5 + 0.125        # stays inside [0, 1] for probabilities, > 0 for scales and eps
    if isinstance(d, tuple) and isinstance(d[0], str):
        return tuple(m for m in MODULES if m not in d)[:2]
    raise AssertionError(f"EchoConfig.{f.name}: teach away_from_default its type {type(d).__name__}")


def flag_values(value):
    if isinstance(value, bool):
        return []
    return [str(v) for v in value] if isinstance(value, tuple) else [str(value)]


def test_every_echo_option_reaches_config_json_and_the_modules(setup, tmp_path):
    chosen, argv = {}, args(setup, tmp_path / "run", "--max-steps", "2")
    for f in fields(EchoConfig):
        flag = EchoConfig.flag(f.name)
        if flag is None:
            continue
        chosen[f.name] = value = away_from_default(f)
        argv += [("--" if value else "--no-") + flag[2:]] if isinstance(value, bool) else [flag, *flag_values(value)]
    run = train.setup(train.apply_default_run(train.parse_args(argv)))
    cfg = asdict(run.echo.cfg)
    resolved = EchoConfig(**chosen).resolve(run.model.args.n_layers)
    for name, value in chosen.items():
        assert cfg[name] == getattr(resolved, name), name
    assert cfg["seed"] == run.opts.seed
    # the built modules: one injector per (target layer, module), each built from the config
    assert sorted(run.echo.injectors) == sorted(f"{l}_{m}" for l in resolved.target_layers for m in resolved.target_modules)
    for injector in run.echo.injectors.values():
        assert injector.W1.out_features == injector.U1.out_features == resolved.bottleneck
        assert torch.all(injector.b == resolved.gate_bias_init)
        assert injector.lam.item() == pytest.approx(resolved.lambda_init, rel=1e-7)      # an fp32 parameter
        assert (injector.norm, injector.norm_eps) == (resolved.norm, resolved.norm_eps)
        assert hasattr(injector, "token_w") == resolved.token_scale          # λ_t = λ + w·x_t, w from zeros
        if resolved.token_scale:
            assert injector.token_w.shape == (run.model.args.dim,)
    assert run.router.cfg == run.echo.cfg and run.router.p(0) == resolved.p_start
    # and config.json, written by a real run, says the same
    train.main(argv)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["echo"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()} == cfg


def test_config_file_reproduces_the_run_and_flags_override_it(setup, tmp_path):
    first = tmp_path / "first"
    train.main(args(setup, first, "--max-steps", "3", "--echo-lambda-init", "0.3", "--rank", "4"))
    saved = first / "config.json"
    again = train.main(["--config", str(saved), "--out", str(tmp_path / "again")])
    assert metrics(again) and [m["loss"] for m in metrics(again)] == [m["loss"] for m in metrics(first)]
    opts = train.parse_args(["--config", str(saved), "--rank", "8", "--out", "x"])
    assert (opts.rank, opts.echo_lambda_init, opts.out) == (8, 0.3, "x")


def step_gradient(setup, tmp_path, monkeypatch, clip):
    """The gradient train.step_once hands to AdamW on step 1 (after clipping), its stats, and the run."""
    run = train.setup(train.apply_default_run(train.parse_args(
        args(setup, tmp_path / f"clip{clip}", "--micro-batch", "1", "--grad-clip", str(clip), "--no-group-by-length"))))
    _, mbs = next(train.micro_batches(run, 0, 0))
    seen = {}
    real = torch.nn.utils.clip_grad_norm_

    def record(params, max_norm, *a, **k):
        out = real(params, max_norm, *a, **k)
        seen["grads"] = [p.grad.clone() for p in params]
        return out
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    stats = train.train_step(run, mbs, True, 0)
    monkeypatch.undo()
    return run, mbs, seen["grads"], stats


def test_step_once_is_the_clipped_token_mean_gradient(setup, tmp_path, monkeypatch):
    """One routed step of global batch 4 as 4 micro-batches of 1 row with different answer lengths: the
    gradient step_once clips and steps equals the gradient of eq. 11's token mean over the whole batch
    (one forward, one normaliser, no train.py code), with clipping off-range and in range."""
    run, mbs, _, _ = step_gradient(setup, tmp_path, monkeypatch, clip=1e9)
    assert len(mbs) == 4 and len({mb["n_targets"] for mb in mbs}) > 1
    params = run.params + run.echo_params
    rows = [run.train_set[i] for mb in mbs for i in mb["index"].tolist()]
    import data
    whole = data.collate(rows, run.train_set.pad_id)
    # a fresh copy of the same initial weights: setup is seeded
    fresh = train.setup(train.apply_default_run(train.parse_args(args(setup, tmp_path / "fresh", "--micro-batch", "4", "--no-group-by-length"))))
    loss, sums = echo_loss(fresh.model, fresh.echo, whole["input_ids"], whole["labels"], routed=True)
    want = torch.autograd.grad(loss, fresh.params + fresh.echo_params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want]))
    for clip, scale in ((1e9, 1.0), (float(norm) / 4, 0.25)):
        _, _, got, stats = step_gradient(setup, tmp_path / str(clip), monkeypatch, clip)
        assert len(got) == len(want) == len(params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w * scale, rtol=1e-4, atol=1e-7)
        n = whole["labels"][:, 1:].ne(-100).sum()
        torch.testing.assert_close(stats[:3] / n, sums / n, rtol=1e-5, atol=1e-6)     # the logged L_off, L_on, L_kd


def test_config_applies_to_the_default_run_and_is_type_checked(tmp_path, capsys):
    """Without --model the built-in run's settings come first, then the file, then the flags; a value of the
    wrong type or outside the choices is refused like the same flag typed by hand (one line)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 1e-3, "rank": 4}))
    opts = train.parse_args(["--config", str(config)])
    assert (opts.lr, opts.rank, opts.echo, opts.alpha) == (1e-3, 4, True, 32.0)
    assert train.parse_args(["--config", str(config), "--lr", "5e-4"]).lr == 5e-4
    for bad, says in (({"max_steps": 2.5}, "max_steps must be a single int"), ({"epochs": None}, "epochs is null"),
                      ({"rank": 16.5}, "rank must be a single int"), ({"echo": "yes"}, "echo must be true or false"),
                      ({"data": "x.json"}, "data must be a non-empty list"), ({"lr": 1, "bogus": 2}, "unknown")):
        config.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=says):
            train.parse_args(["--config", str(config), "--model", "m"])
    for bad, says in (({"dtype": "fp16"}, "argument --dtype: invalid choice"), ({"device": "tpu"}, "--device")):
        config.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            train.parse_args(["--config", str(config), "--model", "m"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and says in err


def test_resume_compares_the_whole_model_folder_and_preset_names(setup, tmp_path):
    """params.json or the tokenizer changed beside the same weights is another model; a preset (no files) is
    compared by name."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(setup / "base", base)
    argv = args(setup, tmp_path / "run", "--max-steps", "2", "--save-every", "1")
    argv[argv.index("--model") + 1] = str(base)
    train.main(argv)
    params = json.loads((base / "params.json").read_text())
    (base / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-3}))
    with pytest.raises(ValueError, match="--resume: --model params.json differs in content"):
        train.main(argv + ["--resume"])
    from training.checkpoint import check_resume_options
    opts = train.parse_args(["--model", "llama3-8b", "--data", "d.json"])
    saved = {**vars(opts), "model": "llama3.1-8b"}
    empty = {"model": [], "data": [], "val_data": []}
    with pytest.raises(ValueError, match="--resume: --model is 'llama3-8b' but the checkpoint was trained with"):
        check_resume_options(saved, opts, empty, empty, say=False)
