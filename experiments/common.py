"""Shared names of the experiment tooling: project paths, the task lists, JSON reading, project-relative paths
and content fingerprints (size + sha256) of files. The bottom of experiments/: it imports nothing from it."""
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from model.io import fingerprint  # noqa: F401  (the one train.py records; reproduce compares with it)
from model.io import first_line, publish

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DATA_DIR = ROOT.parent / "shared" / "data" / "commonsense"      # ../shared's commonsense suite

TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
IN_FORMAT = ["boolq", "social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"]   # train sets in the mix
TRANSFER = ["piqa", "hellaswag", "winogrande"]                                    # format transfer only
TRAIN_TASKS = IN_FORMAT
DISPLAY = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA"}
BLOCKS = [("8 tasks", TASKS), ("5 in-format", IN_FORMAT), ("3 format-transfer", TRANSFER)]


class StepFailed(Exception):
    """A step of the tooling failed; the CLIs print it as one line `error: ...`."""


def committed(path):
    """Whether path is one of the files the project publishes: README.md, a page under docs/ or a record
    under results/. A trial (a toy model, other runs, another model) must never write one: see refuse_trial."""
    p = Path(path).resolve()
    return p == (ROOT / "README.md").resolve() or any(d.resolve() in p.parents for d in (RESULTS, ROOT / "docs"))


def refuse_trial(path, why, fix):
    """The one rule of every publisher: a committed file is written only on inputs that match what it
    claims. Raises StepFailed naming the file, why this run is not the one it records, and what to do."""
    raise StepFailed(f"{shown_path(path)} is a committed record and {why}: not written; {fix}")


def official_pair(speed, out, official_speed, official_out):
    """The rule of the table publishers (speed_table, pack_speed, nf4_table): a committed `out` is written only
    from the committed records. -> whether (speed, out) is the committed pair; a committed out from other
    records is refused (refuse_trial), and so is a --speed-dir that is not a folder."""
    official = Path(speed).resolve() == Path(official_speed).resolve()
    if committed(out) and not (official and Path(out).resolve() == Path(official_out).resolve()):
        refuse_trial(out, f"--speed-dir {speed} and --out {out} are not {shown_path(official_speed)} and "
                          f"{shown_path(official_out)}", "give --out a file of your own")
    if not Path(speed).is_dir():
        raise StepFailed(f"--speed-dir {speed} is not a folder")
    return official and Path(out).resolve() == Path(official_out).resolve()


def write_atomic(path, text):
    """Write text to path through a temp file in its folder renamed over it (model.io.publish): a full disk
    or a read-only folder leaves the old file whole, and the error (StepFailed) names the path."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise StepFailed(f"cannot write {path} ({e.strerror or first_line(e)}); the previous version, if any, "
                         f"is intact: free space or choose a writable folder") from None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_record(path):
    """A run record (config.json, summary.json, eval-*.json, ...): its JSON object, None when the file is
    missing, and a StepFailed naming the file when it is there but unreadable, not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StepFailed(f"{path}: damaged record ({getattr(e, 'strerror', None) or 'not valid JSON'}); restore it "
                         f"or move the run folder away") from None
    if not isinstance(rec, dict):
        raise StepFailed(f"{path}: damaged record (a JSON {type(rec).__name__}, not an object); restore it or move "
                         f"the run folder away")
    return rec


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_numbers(path, record, keys, where=""):
    """Each of keys in record is a number or null; else a StepFailed naming the file and the field."""
    for k in keys:
        v = record.get(k)
        if v is not None and not is_number(v):
            raise StepFailed(f"{path}: field {where}{k} is {v!r}, not a number; restore the file or move the run "
                             f"folder away")


METRIC_NUMBERS = ("loss", "loss_off", "loss_on", "loss_kd", "val_loss", "val_exact")     # what the curves draw


def json_objects(path, torn_last_ok=False, damaged="", unreadable=""):
    """(line number, object) for each non-empty line of a JSON-lines file; a line that is not a JSON object is
    a StepFailed naming path:line (`damaged` and `unreadable` say what to do). torn_last_ok: a last line that
    is not JSON (a writer killed mid-line) is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StepFailed(f"cannot read {path} ({getattr(e, 'strerror', None) or 'not text'}){unreadable}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            if torn_last_ok and i == len(lines):
                continue
            raise StepFailed(f"{path}:{i}: not a JSON line{damaged}") from None
        if not isinstance(r, dict):
            raise StepFailed(f"{path}:{i}: not a JSON object")
        out.append((i, r))
    return out


def read_metrics(path):
    """The records of a run's metrics.jsonl ([] when missing), checked: each line an object, "step" a step
    number, the losses numbers; a damaged line is a StepFailed naming path:line and the field. Only the last
    line may be torn (a run killed mid-write): it is skipped."""
    if not Path(path).exists():
        return []
    out = []
    for i, r in json_objects(path, torn_last_ok=True, damaged=" (damaged: train.py writes one object a line)"):
        step = r.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise StepFailed(f"{path}:{i}: field step is {step!r}, not a step number")
        check_numbers(f"{path}:{i}", r, METRIC_NUMBERS)
        out.append(r)
    return out


def read_jsonl(path):
    """The parseable lines of a JSON-lines file ([] when it is missing; a torn last line is skipped)."""
    out = []
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def shown_path(path):
    """A path as a results file may record it: relative to the project when inside it, else its last two
    parts (never one machine's absolute path)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return "/".join(p.parts[-2:]) if len(p.parts) >= 2 else p.name


def file_name(path):
    """The name a data file is compared by when no content fingerprint exists: <task folder>/<file>."""
    return "/".join(Path(str(path)).parts[-2:])


def arg_path(path):
    """A path as a command argument: relative to the working folder when it lies inside the project, in
    ../shared, or in another sibling folder (../smollm2) that is not under the system's temporary folder (a
    checkout in /tmp would otherwise make every pytest folder a "sibling"), so the records the command writes
    (config.json, eval-*.json, logs) name no machine's absolute path; else as given."""
    p = str(path)
    if not os.path.isabs(p):
        return p
    rel = os.path.relpath(p)
    parts = Path(rel).parts
    if not parts or parts[0] != os.pardir:
        return rel
    sibling = len(parts) > 1 and parts[1] != os.pardir
    in_tmp = Path(p).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    return rel if sibling and (parts[1] == "shared" or not in_tmp) else p


def logged_command(cmd):
    """A command line as a log records it: the interpreter as `python`, not this machine's path to it."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def script(name):
    """A project script as a command argument: relative to the working folder when that is short."""
    p = ROOT / name
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") else str(p)


def by_name(results, decoding):
    """{run name: {seed: run record}} of a results JSON's runs with this decoding."""
    out = {}
    for r in results["runs"]:
        if r["decoding"] == decoding:
            out.setdefault(r["name"], {})[r["seed"]] = r
    return out
