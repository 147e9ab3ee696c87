"""Reading a training run's folder (what train.py writes): its config.json and the base model it trained on.
Every value the tools use is checked here, so a damaged record is one line naming the file and the field."""
from pathlib import Path

from model.io import read_json


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
