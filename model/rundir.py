"""Reading a training run's folder (what train.py writes): its config.json and the base model it trained on.
Every value the tools use is checked here, so a damaged record is one line naming the file and the field."""
import json
import math
from pathlib import Path

from model.io import read_json


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _paths(v):
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v))


# The config.json "opts" fields the tools read, each with its check and what it must be (null: absent).
OPTS_READ = {
    "model": (lambda v: isinstance(v, str), "a model path or preset name"),
    "template": (lambda v: isinstance(v, str), "a template name"),
    "method": (lambda v: isinstance(v, str), "lora or dora"),
    "echo": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "val_split": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "data": (_paths, "a file path or a list of them"),
    "val_data": (_paths, "a file path or a list of them"),
}


def run_config(run_dir):
    """RUN/config.json as a dict ({} when the run has none); a file that is not a JSON object, or an "opts"
    that is not one, is refused naming the file."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return {}
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}; the run's record is damaged "
                         f"(re-train it, or restore config.json)")
    if not isinstance(cfg.get("opts", {}), dict):
        raise ValueError(f'{path}: "opts" must be an object, got {type(cfg["opts"]).__name__}')
    for key, (ok, expected) in OPTS_READ.items():
        if key in cfg.get("opts", {}) and cfg["opts"][key] is not None and not ok(cfg["opts"][key]):
            raise ValueError(f'{path}: "opts.{key}" must be {expected}, got {json.dumps(cfg["opts"][key])[:40]}; '
                             f"the run's record is damaged (restore config.json, or pass the value as a flag)")
    return cfg


def base_model_of(run_dir, cfg):
    """The run's base model: run_dir/base/ (the default run's tiny model, saved by train.py) or the
    model train.py was given (config.json "opts"."model")."""
    if (Path(run_dir) / "base" / "params.json").exists():
        return str(Path(run_dir) / "base")
    model = cfg.get("opts", {}).get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f'{Path(run_dir) / "config.json"}: "opts.model" must be a path, got {model!r:.40}; '
                         f"pass --model")
    if not model:
        raise ValueError(f"{run_dir}: cannot tell the base model (no base/ folder, no opts.model in config.json);"
                         f" pass --model")
    return model
