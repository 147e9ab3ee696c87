"""Load a model directory (params.json + tokenizer + weights) or build a preset with random weights."""
import argparse
import contextlib
import ctypes
import dataclasses
import mmap
import re
import sys
from pathlib import Path

import torch

from .io import DAMAGED, first_line, read_json, read_pth, read_safetensors
from .lora import ADAPTER_KEYS, adapter_state_dict, load_adapter, load_adapter_tensors, read_adapter_config
from .model import PARAMS_FIELDS, PRESETS, ModelArgs, Transformer
from .nf4 import NF4Weight


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
    """The whole state dict of a one-file model folder (model.safetensors or consolidated.00.pth), in memory.
    load_model does not use it: it streams any checkpoint, sharded or not (open_checkpoint)."""
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


# ---------------------------------------------------------------- streamed checkpoint load -----------------
# A checkpoint is checked whole (files, keys, shapes) before the model is built, then read one tensor at a
# time into it: the host holds the model plus one tensor (and its pieces), never the whole checkpoint.

SAFETENSORS_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def checkpoint_files(model_dir):
    """("safetensors" | "meta", [paths]) of a model folder's weights: model.safetensors, or its shards
    model-00001-of-0000N.safetensors (each tensor whole in one of them), or Meta's model-parallel
    consolidated.00.pth … (each tensor split across all of them). A shard missing from the numbering is
    named; one missing from the end of Meta's shows in the shapes (check_meta_shards)."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").exists():
        return "safetensors", [model_dir / "model.safetensors"]
    for kind, pattern in (("safetensors", SAFETENSORS_SHARD), ("meta", META_SHARD)):
        found = sorted(f for f in model_dir.iterdir() if pattern.fullmatch(f.name))
        if not found:
            continue
        if kind == "safetensors":
            counts = {int(pattern.fullmatch(f.name)[2]) for f in found}
            if len(counts) > 1:
                raise ValueError(f"{model_dir}: safetensors shards of {len(counts)} different checkpoints "
                                 f"(-of-{min(counts):05d}, -of-{max(counts):05d}): keep one set")
            n = counts.pop()
            want = [model_dir / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        else:
            want = [model_dir / f"consolidated.{i:02d}.pth" for i in range(len(found))]
        for path in want:
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing shard of the checkpoint in {model_dir} "
                                        f"(found {', '.join(f.name for f in found)}); re-download it")
        return kind, want
    raise FileNotFoundError(f"{model_dir}: no model.safetensors, model-*-of-*.safetensors or consolidated.*.pth")


def open_checkpoint(model_dir, args):
    """Check a model folder's weights against the model `args` describe, reading headers only (safetensors'
    header, Meta shards memory-mapped): every file present and whole, every weight there with its shape,
    nothing unknown. Returns the plan read_checkpoint follows: [(file, [keys])] for safetensors, one file's
    keys at a time; [([shard files], {key: split dim})] for Meta shards. Every refusal is one line naming the
    file."""
    kind, paths = checkpoint_files(model_dir)
    want = expected_shapes(args)
    shapes, plan = {}, []
    if kind == "meta":
        return [(paths, check_meta_shards(paths, want, args))]
    from safetensors import safe_open
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = [k for k in f.keys() if k != "rope.freqs"]
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in keys})
        except Exception as e:  # SafetensorError / OSError: a header or data region cut short
            raise ValueError(f"{path}: cannot read this checkpoint ({first_line(e)}); {DAMAGED}") from None
        plan.append((path, keys))
    check_keys_and_shapes(shapes, want, args, paths[0] if len(paths) == 1 else Path(model_dir))
    return plan


def check_keys_and_shapes(shapes, want, args, origin):
    """shapes ({key: shape} of a checkpoint) hold exactly the weights of `want` (expected_shapes), with
    theirs; a tied model's redundant output.weight is allowed (read_checkpoint checks it is the embedding)."""
    if args.tie_word_embeddings and "output.weight" in shapes:
        want = {**want, "output.weight": want["tok_embeddings.weight"]}
    missing = [k for k in want if k not in shapes]
    if missing:
        raise ValueError(f"{origin}: missing {len(missing)} weight(s) that params.json implies, first "
                         f"{missing[0]}: a shard missing, or the wrong params.json")
    unknown = [k for k in shapes if k not in want]
    if unknown:
        raise ValueError(f"{origin}: {len(unknown)} weight(s) this model does not have, first {unknown[0]}: "
                         f"the wrong params.json?")
    for k, shape in want.items():
        if shapes[k] != shape:
            raise ValueError(f"{origin}: {k} has shape {list(shapes[k])}, params.json implies {list(shape)}")


def meta_split_dim(piece, full, n):
    """Dimension along which Meta's model-parallel code split a weight of shape `full` into n pieces of shape
    `piece` (None: replicated, as the norms are), read off the shapes: wq wk wv w1 w3 and output split their
    rows, wo and w2 their columns, the embedding either (LLaMA 1/2 its columns, LLaMA 3 its rows)."""
    if piece == full:
        return None
    for dim in (0, 1):
        if len(piece) == 2 and piece[dim] * n == full[dim] and piece[1 - dim] == full[1 - dim]:
            return dim
    return -1


def check_meta_shards(paths, want, args):
    """{key: split dim} of Meta shards (each memory-mapped, so checking reads no weights) that together
    hold exactly the weights of `want`; a shard whose keys or pieces disagree is named."""
    n, dims, shapes = len(paths), {}, {}
    first = read_pth(paths[0])
    for path in paths[1:]:
        other = read_pth(path)
        if set(other) != set(first):
            extra = sorted(set(other) ^ set(first))[0]
            raise ValueError(f"{path}: key {extra} is not in every shard (this shard and {paths[0].name} "
                             f"disagree); {DAMAGED}")
        for k, w in other.items():
            if w.shape != first[k].shape:
                raise ValueError(f"{path}: {k} has shape {list(w.shape)}, {paths[0].name} has "
                                 f"{list(first[k].shape)}; {DAMAGED}")
    for k, w in first.items():
        if k == "rope.freqs":
            continue
        full = want.get(k, want["tok_embeddings.weight"] if k == "output.weight" else None)
        dims[k] = None if full is None else meta_split_dim(tuple(w.shape), full, n)
        shapes[k] = tuple(w.shape) if dims[k] is None or dims[k] < 0 else full
        if dims[k] == -1:
            raise ValueError(f"{paths[0]}: {k}: {n} shard(s) of a {list(w.shape)} piece cannot make the shape "
                             f"params.json implies {list(full)}: a shard missing, or the wrong params.json")
    check_keys_and_shapes(shapes, want, args, paths[0])
    return dims


def read_checkpoint(plan):
    """(key, tensor) of each weight of open_checkpoint's plan, one at a time, in the checkpoint's dtype. A
    Meta weight is its pieces concatenated (each shard memory-mapped: only the pieces are read); a replicated
    one (the norms) must be the same in every shard."""
    for source, keys in plan:
        if isinstance(source, list):           # Meta shards: keys is {key: split dim}
            shards = [read_pth(path) for path in source]
            mapped = all(is_zip(path) for path in source)       # read_pth maps zip files (torch.save's format)
            for k, dim in keys.items():
                pieces = [s[k] for s in shards]
                for path, piece in zip(source[1:], pieces[1:]):      # a replicated weight (norms) is one tensor
                    if dim is None and not torch.equal(piece, pieces[0]):
                        raise ValueError(f"{path}: replicated {k} differs from {source[0].name}'s; {DAMAGED}")
                yield k, pieces[0] if dim is None else torch.cat(pieces, dim)
                if mapped:
                    for piece in pieces:
                        drop_mapped_pages(piece)
            continue
        from safetensors import safe_open
        with safe_open(str(source), framework="pt") as f:
            for k in keys:
                yield k, f.get_tensor(k)


def is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def drop_mapped_pages(t):
    """Give back the pages of memory-mapped tensor t that reading it brought into this process (Linux madvise
    MADV_DONTNEED: for a file mapping, the pages leave the process and are read from the file again if
    touched). A Meta weight needs a piece of every shard, so all shards stay mapped to the end of the load;
    without this the process's resident size grows to the whole checkpoint (page cache the kernel could
    reclaim, but counted as the process's). Only for tensors of a file mapping: on anonymous memory
    MADV_DONTNEED would zero them."""
    if not sys.platform.startswith("linux"):
        return
    start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE         # whole pages inside t only
    end = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)   # 4: MADV_DONTNEED


@torch.no_grad()
def load_checkpoint(net, plan, origin):
    """Copy the weights of open_checkpoint's plan into net's base, one tensor at a time: an NF4 weight is
    quantised as it is copied (NF4Weight.copy_). Then DoRA's ‖W‖ and magnitudes, once."""
    params = {k: p for k, p in net.named_weights() if k.rsplit(".", 1)[-1] not in ADAPTER_KEYS}
    for k, w in read_checkpoint(plan):
        if k == "output.weight" and net.output is None:    # tied: a redundant copy must be the embedding
            (_, embedding), = read_checkpoint(plan_for(plan, "tok_embeddings.weight"))
            if not torch.equal(w, embedding):
                raise ValueError(f"{origin}: output.weight differs from tok_embeddings.weight, but params.json "
                                 f"says tie_word_embeddings")
            continue
        params[k].copy_(w)
    net.init_dora_magnitudes()
    return net


def plan_for(plan, key):
    """The part of open_checkpoint's plan that reads `key` alone."""
    for source, keys in plan:
        if key in keys:
            return [(source, {key: keys[key]} if isinstance(keys, dict) else [key])]
    raise KeyError(key)


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
    """`model`: a directory (params.json, tokenizer.model, model.safetensors | model-*-of-*.safetensors |
    consolidated.*.pth) or a preset name (random weights, no tokenizer). Returns (model, tokenizer or None).
    A checkpoint is checked whole, then streamed into the model one tensor at a time (open_checkpoint,
    load_checkpoint): an NF4 base quantises each as it is read, never a random one first."""
    adapter_cfg = None
    if adapter_dir is not None:
        adapter_cfg, from_adapter = adapter_overrides(adapter_dir)
        overrides = {**from_adapter, **overrides}
    model_dir = Path(model)
    if str(model) in PRESETS and not model_dir.exists():
        args = ModelArgs.from_name(str(model), **overrides)
        tokenizer, plan = None, None
    elif model_dir.is_dir():
        tokenizer = load_dir_tokenizer(model_dir)
        args = dir_model_args(model_dir, tokenizer, **overrides)
        check_not_dequantized(model_dir, args.base_format, adapter_dir, adapter_cfg)
        plan = open_checkpoint(model_dir, args)
    else:
        raise FileNotFoundError(f"model {model!r} is neither a directory nor a preset ({', '.join(PRESETS)})")
    if adapter_dir is not None:
        base = adapter_cfg.get("base") or {}
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            if key in base and base[key] != getattr(args, key):
                raise ValueError(f"adapter {adapter_dir} was trained on a base with {key}={base[key]}, "
                                 f"this model has {key}={getattr(args, key)}")
    if plan is None:
        net = build_model(args, device, dtype)
        net.init_dora_magnitudes()
    else:
        with NF4Weight.skipping_copies():       # the checkpoint replaces the random base: not quantised
            net = build_model(args, device, dtype)
        load_checkpoint(net, plan, model_dir)
    if adapter_dir is not None:
        load_adapter(net, adapter_dir)
    return net, tokenizer


def check_not_dequantized(model_dir, base_format, adapter_dir=None, adapter_cfg=None):
    """An NF4 base quantises the folder's weights, so it is refused for weights that are dequant(NF4(W))
    already, which it would round a second time: a run's base/ beside its NF4-trained adapter (train.py
    writes dequant(W) there), or a folder whose params.json says "dequantized_from": "nf4" (an NF4 run's base/,
    a merged export of an NF4 run: dequant(NF4(W)) + ΔW). Such a folder is the NF4 model when loaded plain.
    model.generate.resolve_base_format refuses the same, by this function, before anything is loaded."""
    if base_format != "nf4":
        return
    from .rundir import DEQUANTIZED_FROM, is_dequantized_copy
    params_path = Path(model_dir) / "params.json"
    params = read_json(params_path) if params_path.is_file() else None
    if isinstance(params, dict) and params.get(DEQUANTIZED_FROM) == "nf4":
        why = f'{params_path} says "{DEQUANTIZED_FROM}": "nf4"'
    elif (adapter_cfg or {}).get("base_format") == "nf4" and is_dequantized_copy(model_dir, adapter_dir):
        why = f"it is the base/ of the run of adapter {adapter_dir}"
    else:
        return
    raise ValueError(f"{model_dir}: its weights are already dequantised from NF4 ({why}); base format nf4 would "
                     f"quantise them a second time: load it with --base-format plain")


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
