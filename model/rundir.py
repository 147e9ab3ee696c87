"""Reading a training run's folder (what train.py writes): its config.json and the base model it trained on.
Every value the tools use is checked here, so a damaged record is one line naming the file and the field."""
import json
import math
import os
from pathlib import Path

from model.io import read_json, read_json_object


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


REPOSITORY = Path(__file__).resolve().parents[1]
RUN_FOLDER = "<run folder>"      # config.json's prefix of paths relative to the run folder (training/options.py)


def base_model_of_adapter(adapter_dir):
    """The base model of the run that holds adapter_dir (RUN/adapter, or the run folder itself when the adapter
    was saved there): base_model_of with its config.json, checked."""
    adapter_dir = Path(adapter_dir)
    run_dir = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
    return base_model_of(run_dir, run_config(run_dir))


def run_path(recorded, run_dir, field=None, flag=None):
    """A path config.json recorded (training.options.recorded_path), as a path of this machine: "<run folder>/..."
    from the run folder (normalised), a relative path from the repository (where train.py ran) unless it exists
    from here, an absolute one (older records) as it is, anything not a string (null) as it is. A placeholder
    ("<outside the repository>/...": a path of the machine that made the run) names no file here: with `field`,
    one line naming the field and the flag that gives the path instead; without, returned as it is (the caller
    asks for the flag, e.g. train.py --config)."""
    if not isinstance(recorded, str):
        return recorded
    if recorded == RUN_FOLDER or recorded.startswith(RUN_FOLDER + "/"):
        return os.path.normpath(Path(run_dir) / recorded[len(RUN_FOLDER) + 1:])
    if recorded.startswith("<"):
        if field is None:
            return recorded
        raise ValueError(f'{Path(run_dir) / "config.json"}: "opts.{field}" is recorded as {recorded!r}, a path of '
                         f"the machine the run was made on: pass {flag}")
    path = Path(recorded)
    if path.is_absolute() or path.exists() or not (REPOSITORY / path).exists():
        return recorded
    return str(REPOSITORY / path)


def run_paths(cfg, run_dir, field, flag):
    """config.json opts[field] (one path or a list; absent: []) as a list of paths of this machine."""
    value = cfg.get("opts", {}).get(field) or []
    return [run_path(v, run_dir, field, flag) for v in ([value] if isinstance(value, str) else value)]


def base_model_of(run_dir, cfg):
    """The run's base model: run_dir/base/ (the default run's tiny model, saved by train.py) or the
    model train.py was given (config.json "opts"."model": a path, see run_path, or a preset name)."""
    if (Path(run_dir) / "base" / "params.json").exists():
        return str(Path(run_dir) / "base")
    model = cfg.get("opts", {}).get("model")
    if not model:
        raise ValueError(f"{run_dir}: cannot tell the base model (no base/ folder, no opts.model in config.json);"
                         f" pass --model")
    return run_path(model, run_dir, "model", "--model")


# The sizes of a model folder's params.json (Meta's and ours): integers and finite numbers where present.
PARAMS_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of", "max_seq_len")
PARAMS_NUMBERS = ("norm_eps", "rope_theta", "ffn_dim_multiplier")


def read_params(model_dir):
    """MODEL_DIR/params.json, checked: an object whose sizes are numbers (one line naming the field)."""
    return read_json_object(Path(model_dir) / "params.json", PARAMS_INTS, PARAMS_NUMBERS)


DEQUANTIZED_FROM = "dequantized_from"   # params.json / HF config.json: "nf4" on weights that are dequant(NF4(W))


def is_dequantized_copy(model_dir, adapter_dir=None):
    """Whether model_dir's weights are dequant(NF4(W)) already, so that an NF4 base would round them a second
    time: its params.json says "dequantized_from": "nf4" (train.py's base/ of an NF4 run, an export merged on an
    NF4 base: training.checkpoint.save_base, convert_weights --export), or it is the run's base/ folder beside
    adapter_dir (runs from before that mark, whose base/ train.py wrote as dequant(W) all the same)."""
    if model_dir is None:
        return False
    params = Path(model_dir) / "params.json"
    if params.is_file():
        marked = read_json(params)
        if isinstance(marked, dict) and marked.get(DEQUANTIZED_FROM) == "nf4":
            return True
    return adapter_dir is not None and Path(model_dir).resolve() == Path(adapter_dir).resolve().parent / "base"
