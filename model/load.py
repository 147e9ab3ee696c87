"""Load a model directory (params.json + tokenizer + weights) or build a preset with random weights."""
import contextlib
from pathlib import Path

import torch

from .lora import load_adapter, read_adapter_config
from .model import ModelArgs, PRESETS, Transformer


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
                     lora_dropout=cfg["dropout"], lora_modules=tuple(cfg["modules"]), lora_layers=cfg["layers"])


def read_state_dict(model_dir):
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(str(model_dir / "model.safetensors"))
    shards = sorted(model_dir.glob("consolidated.*.pth"))
    if len(shards) == 1:
        return torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    if len(shards) > 1:
        raise ValueError(f"{model_dir} holds {len(shards)} model-parallel shards: "
                         f"merge them first with `python convert_weights.py {model_dir} OUT`")
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or consolidated.00.pth")


def build_model(args, device="cpu", dtype=torch.float32):
    with torch.device(device), default_dtype(dtype):
        return Transformer(args)


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
        from .tokenizer import load_tokenizer
        tokenizer = load_tokenizer(model_dir)
        args = ModelArgs.from_params_json(model_dir / "params.json", **overrides) \
            if _vocab_known(model_dir) else \
            ModelArgs.from_params_json(model_dir / "params.json", vocab_size=tokenizer.vocab_size, **overrides)
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


def _vocab_known(model_dir):
    import json
    params = json.loads((Path(model_dir) / "params.json").read_text()) \
        if (Path(model_dir) / "params.json").exists() else {}
    return params.get("vocab_size", -1) > 0
