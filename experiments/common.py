"""Shared names of the experiment tooling: project paths, the task lists, JSON reading, project-relative paths
and content fingerprints (size + sha256) of files. The bottom of experiments/: it imports nothing from it."""
import json
import os
from pathlib import Path

from model.io import fingerprint  # noqa: F401  (the one train.py records; reproduce compares with it)

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


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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
