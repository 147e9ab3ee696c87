"""Load a model directory (params.json + tokenizer + weights) or build a preset with random weights."""
import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch

from .io import DAMAGED, first_line, read_json, read_pth, read_safetensors  # noqa: F401 (re-exported)
from .lora import ADAPTER_KEYS, adapter_state_dict, load_adapter, load_adapter_tensors, read_adapter_config
from .model import PARAMS_FIELDS, PRESETS, ModelArgs, Transformer


def args_from_params(params, **overrides):
    """ModelArgs for a params.json dict (keys ModelArgs does not know are ignored). A vocab_size <= 0
    (LLaMA 1/2 write -1) becomes 1: callers that only need other sizes (the FFN width) can ask anyway."""
    known = {k: v for k, v in params.items() if k in PARAMS_FIELDS}
    if (known.get("vocab_size") or -1) <= 0:
        known["vocab_size"] = 1
    if not known.get("n_kv_heads"):   # Meta's params.json may write null
        known.pop("n_kv_heads", None)
    return ModelArgs(**{**known, **overrides})


def expected_shapes(args):
    """{Meta key: shape} of the base weights (adapters excluded) of a model built from args, read off
    the model itself on the meta device (no memory), so the shapes can never disagree with model.py."""
    with torch.device("meta"):
        net = Transformer(ModelArgs(**{k: getattr(args, k) for k in PARAMS_FIELDS}))
    return {k: tuple(p.shape) for k, p in net.named_parameters() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}


def expected_adapter_shapes(args):
    """{key: shape} of the adapter tensors (lora_a, lora_b, magnitude) of args' adapter config."""
    with torch.device("meta"):
        net = Transformer(args)
    return {k: tuple(p.shape) for k, p in net.named_parameters() if k.rsplit(".", 1)[-1] in ADAPTER_KEYS}


@contextlib.contextmanager
def default_dtype(dtype):
    """Build base weights directly in `dtype` (adapters are created in fp32 explicitly)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def adapter_overrides(adapter_dir):
    cfg = read_adapter_config(adapter_dir)
    return cfg, dict(adapter=cfg["method"], lora_rank=cfg["rank"], lora_alpha=cfg["alpha"],
                     lora_dropout=cfg.get("dropout", 0.0), lora_modules=tuple(cfg["modules"]),
                     lora_layers=cfg.get("layers"))


def read_state_dict(model_dir):
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").exists():
        return read_safetensors(model_dir / "model.safetensors")
    shards = sorted(model_dir.glob("consolidated.*.pth"))
    if len(shards) == 1:
        return read_pth(shards[0])
    if len(shards) > 1:
        raise ValueError(f"{model_dir} holds {len(shards)} model-parallel shards: "
                         f"merge them first with `python convert_weights.py {model_dir} OUT`")
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or consolidated.00.pth")


def build_model(args, device="cpu", dtype=torch.float32):
    with torch.device(device), default_dtype(dtype):
        return Transformer(args)


def as_plain_model(net, dtype=None):
    """net itself when its base is plain; for an NF4 base, a plain-format copy: base = dequant(W) (in
    dtype, default the model's), the same adapter tensors. Its forward is the NF4 model's (the same W
    values go into the same matmuls), so it is what an NF4 run trained against, loadable without NF4
    (the default run's base/, tests). A whole second model: for small models; a large model's export
    should stream net.dequantized_state_dict instead. Draws no random numbers from the caller's stream."""
    if net.args.base_format == "plain":
        return net
    ref = net.tok_embeddings.weight
    dtype = dtype or ref.dtype
    with torch.random.fork_rng(devices=[ref.device] if ref.device.type == "cuda" else []):
        plain = build_model(dataclasses.replace(net.args, base_format="plain"), ref.device, dtype)
    plain.load_base_weights(net.dequantized_state_dict(dtype, ref.device))
    if net.args.adapter:
        load_adapter_tensors(plain, adapter_state_dict(net), "the NF4 model's adapter")
    return plain.train(net.training)


def dir_model_args(model_dir, tokenizer=None, **overrides):
    """A model folder's ModelArgs (its params.json; a vocab_size of -1, as LLaMA 2 ships, from the
    tokenizer, loaded here when not given)."""
    params_path = Path(model_dir) / "params.json"
    if not params_path.exists():
        raise FileNotFoundError(f"{model_dir}: no params.json (convert the checkpoint with convert_weights.py)")
    if (read_json(params_path).get("vocab_size") or -1) <= 0:
        tokenizer = tokenizer or load_dir_tokenizer(model_dir)
        overrides = {"vocab_size": tokenizer.vocab_size, **overrides}
    return ModelArgs.from_params_json(params_path, **overrides)


def load_model(model, *, adapter_dir=None, device="cpu", dtype=torch.float32, **overrides):
    """`model`: a directory (params.json, tokenizer.model, model.safetensors | consolidated.00.pth)
    or a preset name (random weights, no tokenizer). Returns (model, tokenizer or None)."""
    if adapter_dir is not None:
        adapter_cfg, from_adapter = adapter_overrides(adapter_dir)
        overrides = {**from_adapter, **overrides}
    model_dir = Path(model)
    if str(model) in PRESETS and not model_dir.exists():
        args = ModelArgs.from_name(str(model), **overrides)
        tokenizer, state_dict = None, None
    elif model_dir.is_dir():
        tokenizer = load_dir_tokenizer(model_dir)
        args = dir_model_args(model_dir, tokenizer, **overrides)
        state_dict = read_state_dict(model_dir)
    else:
        raise FileNotFoundError(f"model {model!r} is neither a directory nor a preset ({', '.join(PRESETS)})")
    if adapter_dir is not None:
        base = adapter_cfg.get("base") or {}
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            if key in base and base[key] != getattr(args, key):
                raise ValueError(f"adapter {adapter_dir} was trained on a base with {key}={base[key]}, "
                                 f"this model has {key}={getattr(args, key)}")
    net = build_model(args, device, dtype)
    if state_dict is not None:
        net.load_base_weights(state_dict)
    net.init_dora_magnitudes()
    if adapter_dir is not None:
        load_adapter(net, adapter_dir)
    return net, tokenizer


def load_dir_tokenizer(model_dir):
    """tokenizer.model (SentencePiece or tiktoken, see tokenizer.py), or the built-in byte tokenizer
    when tokenizer_config.json says {"type": "byte"} (the default run's random base model)."""
    from .tokenizer import ByteTokenizer, load_tokenizer
    config = Path(model_dir) / "tokenizer_config.json"
    if not (Path(model_dir) / "tokenizer.model").exists() and config.exists() \
            and read_json(config).get("type") == "byte":
        return ByteTokenizer()
    return load_tokenizer(model_dir)


# ---------------------------------------------------------------- command-line helpers ----------------------
# shared by eval.py, `python -m model.generate` and convert_weights.py

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def dtype_arg(text):
    """argparse type of --dtype: the short spelling (bf16 fp16 fp32 fp64), or torch's (bfloat16 float16
    float32 float64), which becomes the short one; anything else is left for argparse's choices to refuse."""
    return {long: short for short, long in DTYPE_NAMES.items()}.get(text, text)


def torch_dtype(name):
    """torch dtype of a --dtype value in either spelling."""
    return getattr(torch, DTYPE_NAMES.get(name, name))


def check_device(device, flag="--device"):
    """A usable torch device, or a one-line ValueError saying what to pass instead (checked before anything
    is loaded: without it, `--device cuda` on a machine without CUDA ends in a traceback from deep in torch)."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device}: not a device (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available on this machine (no GPU, or a CPU-only "
                             f"build of torch): use --device cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"{flag} {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {device}: MPS is not available on this machine: use --device cpu")
    elif d.type != "cpu":
        raise ValueError(f"{flag} {device}: not supported here (use cpu, cuda or cuda:N)")
    return d


class CliParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the commands: 'error: ... (see --help)'."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default (added unless its help already states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)
