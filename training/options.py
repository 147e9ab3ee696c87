"""train.py's options: every flag with its help and default, --config files, the built-in default run,
and the checks that catch a flag which cannot work before anything is built or written.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import data
from echo import FIELDS as ECHO_FIELDS, EchoConfig
from data.tasks import DEFAULT_RUN      # `python train.py`'s --out, where eval.py looks for it
from model.load import CliParser, HelpFormatter, dtype_arg
from model.rundir import REPOSITORY, RUN_FOLDER, run_path


def build_parser(description=None):
    p = CliParser(prog="train.py", description=description, formatter_class=HelpFormatter)    # one-line errors
    a = p.add_argument
    a("--config", default=None, help="a JSON file of options (a run's config.json works: its \"opts\"); "
                                     "flags given on the command line override it")
    a("--model", default=None, help="model directory (params.json, tokenizer, weights) or a preset name; "
                                    "omitted: the built-in default run")
    a("--data", nargs="+", default=None, help="LLM-Adapters JSON / JSONL files, mixed")
    a("--template", default=None, help="alpaca | llm-adapters | alpaca-short (None: alpaca)")
    a("--out", default=None, help="run folder (None: runs/<model>-<method>[-echo])")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--force", action="store_true", help="replace the run (or other files) already in --out")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    a("--ranks-share-gpu", action="store_true", help="let torchrun put several ranks on one CUDA device (gloo "
      "with CUDA tensors): a test of the multi-GPU code path on one GPU, not a way to go faster")
    add_training_flags(a)
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (None: on GPU)")
    a("--cuda-graphs", default="auto", choices=["auto", "step", "blocks", "off"], help="with --compile on GPU: "
      "'step' = the whole optimizer step as one CUDA graph per batch shape (one GPU); 'blocks' = each compiled "
      "block replayed as a graph (works with DDP); auto: step on one GPU, blocks on several")
    a("--val-split", type=float, default=0.0, help="hold out this fraction of the --data rows for validation")
    a("--val-data", nargs="+", default=None, help="validation files (instead of --val-split)")
    a("--val-rows", type=int, default=1000, help="validate on at most this many held-out rows")
    a("--eval-every", type=int, default=0, help="validate every N steps (0: only at the end)")
    a("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    a("--log-every", type=int, default=10, help="print a progress line every N steps (metrics.jsonl has every step)")
    a("--diagnose-every", type=int, default=50,
      help="with --echo: every N routed steps, write the Echo diagnostics (gate, λ, |δ|/|o|, gradient norms) "
           "to echo_diagnostics.jsonl (0: never)")
    a("--echo", action=argparse.BooleanOptionalAction, default=False, help="train with the Echo path")
    EchoConfig.add_flags(p)                              # --echo-*: declared once, in EchoConfig
    return p


def add_training_flags(a):
    """The adapter, the schedule and the frozen base's memory options (a = parser.add_argument)."""
    a("--method", default="lora", choices=["lora", "dora"], help="adapter: LoRA, or DoRA (weight-decomposed)")
    a("--rank", type=int, default=16, help="LoRA rank r")
    a("--alpha", type=float, default=32.0, help="LoRA scale α (the update is α/r · B A)")
    a("--dropout", type=float, default=0.05, help="LoRA dropout on the adapter's input")
    a("--modules", nargs="+", default=["wq", "wk", "wv", "wo"], help="adapted modules (wq..w3 or q_proj..)")
    a("--epochs", type=float, default=3, help="passes over the training rows (may be fractional)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (None: --epochs)")
    a("--lr", type=float, default=2e-4, help="peak learning rate of AdamW")
    a("--warmup-steps", type=int, default=100, help="linear warm-up, capped at 10%% of the steps")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--global-batch", type=int, default=16, help="rows per optimizer step, over all processes")
    a("--micro-batch", type=int, default=None,
      help="rows per forward (None: 4 on CPU; on GPU the largest that fits, up to the global batch)")
    a("--max-len", type=int, default=256, help="rows longer than this (tokens) are dropped")
    a("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
      help="batch rows of similar length together (less padding; see data.length_grouped_order)")
    a("--pack", action="store_true",
      help="lay each micro-batch's examples end to end into rows of at most --max-len tokens (attention and "
           "positions per example, Echo per example): the same examples and loss per step, less padding "
           "(docs/packing.md)")
    a("--pack-attention", default="sdpa", choices=["sdpa", "flex"],
      help="with --pack: attention over the packed rows through SDPA with an explicit [R,1,L,L] document mask "
           "(sdpa, exact everywhere) or flex_attention with a document BlockMask that skips the masked 128 x 128 "
           "blocks (flex; GPU only: torch has no flex backward on CPU; not yet run on a GPU, docs/packing.md)")
    a("--pack-layout", default="rows", choices=["rows", "flat"],
      help="with --pack: rows of at most --max-len tokens (rows), or the whole micro-batch in one row padded to a "
           "multiple of 128, flex's block size (flat; needs --pack-attention flex: an explicit mask would cost "
           "the whole L x L square)")
    a("--seed", type=int, default=42, help="adapter init, data order, LoRA dropout and the Echo router")
    a("--dtype", default="bf16", type=dtype_arg, choices=["bf16", "fp32"],
      help="compute dtype of the frozen base on GPU (bf16 or bfloat16, fp32 or float32; fp16 would need loss "
           "scaling). On CPU the run computes in fp32, and config.json records fp32")
    a("--base-format", default="plain", choices=["plain", "nf4"],
      help="storage of the frozen linear weights (wq..w3): plain = --dtype; nf4 = QLoRA's 4-bit NormalFloat "
           "(~4.13 bits/param, quantised layer by layer while loading, dequantised to --dtype in each forward; "
           "embedding, norms and LM head stay in --dtype). Works on CPU too, slowly")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block's activations in the backward instead of keeping them: less memory, "
           "~1 more forward per step; the same loss and gradients")


# `python train.py` (no --model): ~1 min on 2 CPU cores. micro_batch None there = the whole per-rank batch.
DEFAULT_RUN_SETTINGS = dict(
    echo=True, modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"], rank=32, alpha=32.0, dropout=0.0,
    lr=3e-3, warmup_steps=10, epochs=3, echo_target_layers=[1], echo_source_layers=[2, 3])

# Options a --config file may not set: they say what to do with --out, not what the run is.
NOT_FROM_CONFIG = {"config", "resume", "force"}


# ------------------------------------------------------------------ paths as config.json records them


PATH_OPTIONS = ("model", "data", "val_data", "out", "config")       # the options that name files or folders


def recorded_path(path, out):
    """A path as the run's records (config.json) write it, never an absolute path of the machine: relative to
    the repository (where train.py, eval.py and experiments/ run) when it lies inside it or in ../shared (the
    data and models beside a checkout; not anything else in its parent folder, which may be /tmp); "<run folder>/..." (relative to the run folder `out`) when the two share a folder other
    than the file system's root; else "<outside the repository>/FOLDER/NAME" (the last two parts: what
    experiments.common.file_name compares data files by). A name that is no path (a preset such as tiny) stays.
    The content fingerprints recorded beside it (data_fingerprints, model_fingerprints) identify the file."""
    if path is None or (not Path(path).is_absolute() and not Path(path).exists()):
        return path
    full, run = Path(os.path.abspath(path)), Path(os.path.abspath(out))
    if full.is_relative_to(REPOSITORY):
        return full.relative_to(REPOSITORY).as_posix() or "."
    if full.is_relative_to(REPOSITORY.parent / "shared"):     # ../shared, the data and models beside a checkout
        return "../" + full.relative_to(REPOSITORY.parent).as_posix()
    if Path(os.path.commonpath([full, run])) != Path(full.anchor):
        inside = os.path.relpath(full, run).replace(os.sep, "/")
        return RUN_FOLDER if inside == "." else f"{RUN_FOLDER}/{inside}"
    return "<outside the repository>/" + "/".join(part for part in full.parts[-2:] if part != full.anchor)


def recorded_opts(opts, out):
    """vars(opts) with every path option as recorded_path writes it (config.json's "opts")."""
    record = dict(vars(opts))
    for key in PATH_OPTIONS:
        value = record.get(key)
        record[key] = [recorded_path(v, out) for v in value] if isinstance(value, list) else recorded_path(value, out)
    return record


def read_config(path, parser, argv=()):
    """--config FILE: {option: value} (or a run's config.json, whose "opts" are that) -> the command-line
    tokens that say the same, so argparse checks every value's type and choices as if it were typed. Paths as
    config.json records them (recorded_path): "<run folder>/..." is taken from the config file's folder; a
    placeholder "<outside the repository>/..." needs its flag on the command line (argv)."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {path}: not a readable JSON file ({e})") from None
    if isinstance(values, dict) and isinstance(values.get("opts"), dict):
        values = values["opts"]
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of options")
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in values if k.replace("-", "_") not in actions)
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {unknown}; see train.py --help")
    tokens, given = [], {t.split("=")[0] for t in argv}
    for key, value in values.items():
        action = actions[key.replace("-", "_")]
        if action.dest in PATH_OPTIONS:           # "<run folder>/...": beside the config file, a run's config.json
            value = [run_path(v, Path(path).parent) for v in value] if isinstance(value, list) else \
                run_path(value, Path(path).parent)
        if action.dest in NOT_FROM_CONFIG:
            continue
        if placeholder(value) and not given & set(action.option_strings):
            if action.dest == "data" and values.get("model") == "default-tiny":
                continue                             # the default run writes its own data again
            raise ValueError(f"--config {path}: {action.dest} is recorded as {value!r}, a path of the machine "
                             f"the run was made on: give {action.option_strings[0]} on the command line")
        tokens += option_tokens(action, value, path)
    return tokens


def placeholder(value):
    """Whether a config.json value is (or lists) a path recorded as a placeholder, "<...>/NAME"."""
    return any(isinstance(v, str) and v.startswith("<") for v in (value if isinstance(value, list) else [value]))


def option_tokens(action, value, path):
    """One option as command-line tokens: --flag v, --flag v1 v2 (lists), --flag / --no-flag (booleans)."""
    flag = action.option_strings[0]
    if value is None:
        if action.default is not None:
            raise ValueError(f"--config {path}: {action.dest} is null; give a value or leave it out")
        return []
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {action.dest} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value else []
    if action.nargs == "+":
        if not isinstance(value, list) or not value:
            raise ValueError(f"--config {path}: {action.dest} must be a non-empty list, got {value!r}")
        return [flag, *map(str, value)]
    if isinstance(value, (list, dict)) or (action.type is int and isinstance(value, float)):
        raise ValueError(f"--config {path}: {action.dest} must be a single {getattr(action.type, '__name__', 'value')}, "
                         f"got {value!r}")
    return [flag, str(value)]


def parse_args(argv=None, description=None):
    """The options: the built-in default run's settings (no --model), then a --config file, then the flags
    given, each overriding the one before."""
    p = build_parser(description)
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = p.parse_args(argv)
    argv = (read_config(opts.config, p, argv) if opts.config else []) + argv     # argparse: the later token wins
    opts = p.parse_args(argv)
    if opts.model is None:             # the built-in default run has its own defaults; the rest still wins
        if opts.data:
            p.error("--data needs --model (the built-in default run, without --model, trains on its own task)")
        p.set_defaults(**DEFAULT_RUN_SETTINGS)
        opts = p.parse_args(argv)
    return opts


def default_of(key, default_run=False):
    """What a checkpoint older than option `key` trained with: the option's value before it existed where
    EchoConfig declares one (e.g. --echo-answer-window: the full Echo-on pass), else its default."""
    if key.startswith("echo_") and key[5:] in ECHO_FIELDS:
        value = EchoConfig.value_before(key[5:])
        return list(value) if isinstance(value, tuple) else value
    if default_run and key in DEFAULT_RUN_SETTINGS:
        return DEFAULT_RUN_SETTINGS[key]
    return build_parser().get_default(key)


def compute_dtype(dtype, device):
    """The dtype a run with --dtype `dtype` computes in on `device`: bf16 only on a GPU (the CPU path runs
    fp32; autocast and bf16 weights are wired for CUDA only)."""
    return dtype if str(device).startswith("cuda") else "fp32"


def apply_default_run(opts, default_out=DEFAULT_RUN):
    """`python train.py` with no model: a tiny random LLaMA learns the built-in synthetic task."""
    if opts.model is not None:
        return opts
    opts.model = "default-tiny"
    opts.out = opts.out or str(default_out)
    opts.template = opts.template or data.default_task.TEMPLATE
    opts.max_len = min(opts.max_len, data.default_task.MAX_LEN)
    if opts.micro_batch is None:        # the whole per-process batch: one forward per step, any world size
        opts.micro_batch = max(1, opts.global_batch // int(os.environ.get("WORLD_SIZE", 1)))
    return opts


def check_options(opts, world=1, device=None):
    """Flags that cannot work, caught before anything is built or written; each error names its flag.
    device: where the run trains (None: not known yet, the device-dependent checks are skipped)."""
    def need(ok, flag, what):
        if not ok:
            raise ValueError(f"{flag} {what}")
    for flag in ("--epochs", "--lr", "--alpha", "--dropout", "--weight-decay", "--grad-clip", "--val-split"):
        value = getattr(opts, flag[2:].replace("-", "_"))
        need(math.isfinite(value), flag, f"must be a finite number, got {value}")
    for flag, v in (("--global-batch", opts.global_batch), ("--rank", opts.rank), ("--max-len", opts.max_len),
                    ("--save-every", opts.save_every), ("--log-every", opts.log_every),
                    ("--val-rows", opts.val_rows)):
        need(v >= 1, flag, f"must be >= 1, got {v}")
    need(opts.micro_batch is None or opts.micro_batch >= 1, "--micro-batch", f"must be >= 1, got {opts.micro_batch}")
    need(opts.max_steps is None or opts.max_steps >= 1, "--max-steps", f"must be >= 1, got {opts.max_steps}")
    need(opts.epochs > 0, "--epochs", f"must be > 0, got {opts.epochs}")
    need(opts.lr > 0, "--lr", f"must be > 0 (with {opts.lr} nothing would train), got {opts.lr}")
    need(opts.alpha != 0, "--alpha", "must be non-zero (the update is α/r · B A)")
    need(0 <= opts.dropout < 1, "--dropout", f"must be in [0, 1), got {opts.dropout}")
    for flag in ("--warmup-steps", "--eval-every", "--grad-clip", "--weight-decay", "--diagnose-every"):
        value = getattr(opts, flag[2:].replace("-", "_"))
        need(value >= 0, flag, f"must be >= 0, got {value}")
    need(0 <= opts.val_split < 1, "--val-split", f"must be in [0, 1), got {opts.val_split}")
    need(not (opts.val_split and opts.val_data), "--val-split", "and --val-data exclude each other")
    need(not (opts.resume and opts.force), "--resume", "and --force exclude each other")
    need(opts.global_batch % world == 0, "--global-batch",
         f"{opts.global_batch} is not a multiple of the {world} processes")
    if opts.micro_batch is not None:
        need(opts.global_batch % (opts.micro_batch * world) == 0, "--micro-batch",
             f"{opts.micro_batch} × {world} process(es) does not divide --global-batch {opts.global_batch}")
    need(not (opts.pack and opts.cuda_graphs in ("step", "blocks")), "--pack",
         f"is not supported with --cuda-graphs {opts.cuda_graphs}: packed micro-batches change their number of "
         f"rows from step to step, so nearly every step would capture a new graph; use --cuda-graphs off (or auto)")
    need(opts.pack or (opts.pack_attention, opts.pack_layout) == ("sdpa", "rows"),
         "--pack-attention" if opts.pack_attention != "sdpa" else "--pack-layout",
         f"{opts.pack_attention if opts.pack_attention != 'sdpa' else opts.pack_layout} needs --pack (it chooses how "
         f"packed rows are attended or laid out)")
    need(not (opts.pack_layout == "flat" and opts.pack_attention == "sdpa"), "--pack-layout",
         "flat needs --pack-attention flex: SDPA's explicit mask over one flat row would cost the whole L x L square")
    need(not (opts.pack_attention == "flex" and device is not None and str(device).startswith("cpu")),
         "--pack-attention", "flex is not supported on CPU: training needs a backward and torch has none for "
         "flex_attention on CPU (\"FlexAttention does not support backward on CPU\"); use a GPU or --pack-attention sdpa")
    if opts.echo:
        EchoConfig.from_flags(opts).check_values()       # NaN λ, gate bias, ... named by their flag
