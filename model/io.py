"""The small file helpers every model/ module shares: reading JSON, safetensors and torch.save files (a bad
file is one line naming it), publishing a written temp file with the umask's mode, and a file's content
fingerprint. Imports nothing from model/."""
import hashlib
import json
import os
from pathlib import Path

DAMAGED = "the file is damaged or truncated: re-download it, or re-convert it with convert_weights.py"


def first_line(e):
    """An exception as one short line (torch and safetensors raise multi-line messages)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def read_json(path):
    """A JSON file; a parse error names the file and the position (one line, no traceback)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: invalid JSON (not UTF-8 text)") from None


def read_safetensors(path, what="checkpoint"):
    """All tensors of a .safetensors file. safetensors reads lazily, so a truncated file can fail on
    open or on the first tensor past the end; both become one line naming the file."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError / OSError: the header or the data region is cut short
        raise ValueError(f"{path}: cannot read this {what} ({first_line(e)}); {DAMAGED}") from None


def read_pth(path):
    """A torch.save'd state dict, memory-mapped when possible (pre-zipfile pickles cannot be)."""
    import torch
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):   # only the old pickle format is retried without mmap
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, EOF: torch's multi-line errors, shortened
        raise ValueError(f"{path}: cannot read this checkpoint ({first_line(e)}); {DAMAGED}") from None


def umask_mode(mode=0o666):
    """`mode` less the process umask: what open() would give a new file (tempfile's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def publish(tmp, dest):
    """Give a finished temp file the mode a plain new file would have, then rename it over dest (atomic)."""
    os.chmod(tmp, umask_mode())
    os.replace(tmp, dest)


def fingerprint(path, sample_above=256 * 2**20, chunk=2**20, samples=32):
    """{"bytes", "sha256"} of a file's content, as train.py records it (config.json, checkpoints) and the
    experiments compare it. Files over `sample_above` (model weights) hash `samples` evenly spaced 1 MiB chunks,
    first and last included ("sampled": true), beside their size: an 8B checkpoint in well under a second,
    and any re-download, conversion or truncation still changes it."""
    path = Path(path)
    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        if size <= sample_above:
            for block in iter(lambda: f.read(8 * chunk), b""):
                h.update(block)
            return {"bytes": size, "sha256": h.hexdigest()}
        for i in range(samples):
            f.seek((size - chunk) * i // (samples - 1))
            h.update(f.read(chunk))
    return {"bytes": size, "sha256": h.hexdigest(), "sampled": True}


def contiguous(sd, dtype=None):
    """Own, contiguous tensors (safetensors refuses shared storage, e.g. tied or narrowed views)."""
    return {k: (v.to(dtype) if dtype else v).contiguous().clone() for k, v in sd.items()}


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_ours(sd, params, out, dtype=None):
    """Our model layout into folder `out`: model.safetensors + params.json (model/load.py loads it)."""
    from safetensors.torch import save_file
    save_file(contiguous(sd, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_json(params, os.path.join(out, "params.json"))
