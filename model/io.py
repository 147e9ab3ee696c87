"""The small file helpers every model/ module and command shares: reading JSON, safetensors and torch.save files
(a bad file is one line naming it, and the field), writing atomically (temp file + publish with the umask's
mode; a failed write is one line naming the path and its cause), where an output may go (a writable folder,
apart from every input), a file's content fingerprint, and a path as a record stores it. Imports nothing from
model/."""
import errno
import hashlib
import json
import os
import shutil
import tempfile
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


def read_json_object(path, ints=(), numbers=()):
    """read_json of a file that must hold an object whose `ints` fields (when present and not null) are
    integers and `numbers` fields finite numbers; anything else is one line naming the file and the field."""
    import math
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}; the file is damaged")
    for key in (*ints, *numbers):
        v = obj.get(key)
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if v is not None and not (is_number and (key not in ints or isinstance(v, int))):
            raise ValueError(f'{path}: "{key}" must be {"an integer" if key in ints else "a finite number"}, '
                             f"got {json.dumps(v)[:40]}; the file is damaged")
    return obj


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


# ---------------------------------------------------------------- where a tool may write --------------------

def check_writable(path, flag):
    """Before anything is computed: `path` (a file or folder to be created) is not under a file and its
    nearest existing folder can be written; `flag` names it in the one-line error (e.g. "--out x.json")."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:        # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag}: {folder} is a file, not a folder: choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write in {folder} (read-only or not yours): choose another path")


def check_apart(out, inputs, flag="OUT"):
    """An output folder must not be, contain or lie inside any input (a replace would delete the input,
    or the output would be written into it); refused whatever --force says."""
    out_path = Path(out).resolve()
    for name, path in inputs:
        if path is None:
            continue
        p = Path(path).resolve()
        if out_path == p or out_path in p.parents or p in out_path.parents:
            raise ValueError(f"{flag} {out} overlaps {name} {path} (the same folder, inside it or holding it): "
                             f"writing it would destroy or mix with that input, even with --force; choose an "
                             f"OUT outside every input")


def disk_cause(e, path):
    """A readable cause of a failed write: the OSError's own words, or (torch.save's and safetensors' errors
    say little) the free space left when it is nearly none, else the error's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(Path(path).absolute().parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"No space left on device: {free / 2**20:.0f} MiB free"
    return first_line(e)


def is_write_error(e):
    """OSError, torch.save's RuntimeError (a zip writer's position) or safetensors' SafetensorError."""
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"


def write_failed(e, path, after="nothing was replaced", then="rerun"):
    """The one-line OSError every tool raises when writing `path` failed: the cause, what is left on disk
    (`after`), and how to go on (`then`: "rerun", or "--resume" for a training run)."""
    return OSError(getattr(e, "errno", None) or errno.EIO,
                   f"writing {path} failed ({disk_cause(e, path)}); {after}: free space or fix the folder, then {then}")


def atomic_write(path, write):
    """write(tmp) into a temp file beside `path`, then publish it over `path` (umask mode, atomic rename):
    a full disk or a crash leaves the old file or none, never a truncated one. Errors: write_failed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_write_error(e):
            raise write_failed(e, path) from None
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_ours(sd, params, out, dtype=None):
    """Our model layout into folder `out`: model.safetensors + params.json (model/load.py loads it)."""
    from safetensors.torch import save_file
    save_file(contiguous(sd, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_json(params, os.path.join(out, "params.json"))


def folder_fingerprints(folder):
    """[[name, fingerprint], ...] of every file of a folder (model weights, params.json, tokenizer; an adapter),
    as train.py's config.json records its model."""
    return [[p.name, fingerprint(p)] for p in sorted(Path(folder).iterdir()) if p.is_file()]


def record_path(path, *roots, repository=None):
    """A path as a record stores it: relative to the first of `roots` (a run folder, the repository) that holds
    it; else, in ../shared beside `repository` (../shared/...; nothing else in its parent, which may be /tmp); else "<outside>/FOLDER/NAME": never the
    absolute path of the machine that made the record (the fingerprints stored beside it identify the
    content). None stays None."""
    if path is None:
        return None
    p = Path(os.path.abspath(path))          # as given, links not followed: ../shared may be a link
    for root in roots:
        r = Path(os.path.abspath(root))
        if p == r or r in p.parents:
            return p.relative_to(r).as_posix() or "."
    shared = Path(os.path.abspath(repository)).parent / "shared" if repository else None   # ../shared beside a checkout
    if shared is not None and (p == shared or shared in p.parents):
        return "../" + p.relative_to(shared.parent).as_posix()
    return "<outside>/" + "/".join(part for part in p.parts[-2:] if part != p.anchor)
