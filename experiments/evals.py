"""Reading eval.py's outputs: results files in either layout, per-example correctness folded into the results
JSON (compaction), the --limit an eval was made with, and the layer-probability CSVs."""
import csv
import json
from pathlib import Path

from .common import StepFailed, is_number, json_objects, read_json, read_record, write_atomic


def eval_file(run, decoding):
    return Path(run) / f"eval-{decoding}.json"


def eval_results_path(path):
    """eval.py --out PATH: a JSON file (the results), or — with an eval.py whose --out is a folder — a
    folder PATH/ holding results.json (+ predictions_<task>.jsonl). -> the results file or None."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir() and (path / "results.json").is_file():
        return path / "results.json"
    return None


def eval_limit(raw):
    """The --limit an eval file was made with (top level or under "settings"), or 'unrecorded'."""
    for where in (raw, raw.get("settings") if isinstance(raw.get("settings"), dict) else {}):
        if "limit" in where:
            return where["limit"]
    return "unrecorded"


def _predictions(results_file, task):
    """eval.py's per-example records for a task: <stem>-predictions/<task>.jsonl beside the results file
    (today's eval.py), or predictions_<task>.jsonl in the results file's folder (older layout)."""
    res = Path(results_file)
    for p in (res.with_name(res.stem + "-predictions") / f"{task}.jsonl", res.parent / f"predictions_{task}.jsonl"):
        if p.is_file():
            return [r for _, r in json_objects(p, damaged=" (damaged predictions: delete the folder and evaluate "
                                                          "again)")]
    return None


def count(res, task, t, field):
    """A task's count in an eval results file: a whole number >= 0 (or None when absent), else StepFailed
    naming the file and the field."""
    v = t.get(field)
    if v is None:
        return None
    if not is_number(v) or v < 0 or float(v) != int(v):
        raise StepFailed(f"{res}: field tasks.{task}.{field} is {v!r}, not a count; restore the file or delete it "
                         f"and evaluate again")
    return int(v)


def _unextracted(preds):
    return sum(1 for r in preds if r.get("pred") in ("", None) and not r.get("skipped"))


def load_eval(path):
    """-> {"tasks": {task: {"correct", "total", "unextracted", "per_example"}}, "settings": {...}} or None.
    per_example is a string of '0'/'1' (one per evaluated example, test-file order) or None: from the
    task's "per_example" list in the results JSON, else from eval.py's prediction records beside it
    (<stem>-predictions/<task>.jsonl, field "correct"). unextracted: the task's "unextracted", else the
    count of records with an empty prediction that were not skipped."""
    res = eval_results_path(path)
    if res is None:
        return None
    raw = read_record(res)
    if not isinstance(raw.get("tasks"), dict):
        raise StepFailed(f"{res}: field tasks is missing or not an object (not an eval.py results file?)")
    tasks = {}
    for name, t in raw["tasks"].items():
        if not isinstance(t, dict) or "correct" not in t or "total" not in t:
            continue
        correct, total = count(res, name, t, "correct"), count(res, name, t, "total")
        if correct is None or total is None or correct > total:
            raise StepFailed(f"{res}: tasks.{name}: correct {correct} of total {total} is not a score")
        per = t.get("per_example")
        preds = None
        if per is None or t.get("unextracted") is None:
            preds = _predictions(res, name)
        if per is None and preds is not None:
            per = [r.get("correct") for r in preds]
        if isinstance(per, str):
            if set(per) - {"0", "1"}:
                raise StepFailed(f"{res}: field tasks.{name}.per_example holds characters other than 0 and 1")
            per = [int(ch) for ch in per]
        elif per is not None and not isinstance(per, list):
            raise StepFailed(f"{res}: field tasks.{name}.per_example is {type(per).__name__}, not a 0/1 string")
        per_str = "".join("1" if v else "0" for v in per) if per is not None else None
        if per_str is not None and len(per_str) != total:
            per_str = None                                    # cannot be trusted to line up
        unex = count(res, name, t, "unextracted")
        if unex is None and preds is not None:
            unex = _unextracted(preds)
        tasks[name] = {"correct": correct, "total": total, "unextracted": unex, "per_example": per_str}
        if t.get("skipped") is not None:
            tasks[name]["skipped"] = count(res, name, t, "skipped")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise StepFailed(f"{res}: field settings is {type(settings).__name__}, not an object")
    settings = dict(settings)
    for k in ("decoding", "num_beams", "max_new_tokens", "limit", "template", "dtype", "device", "batch_size",
              "seconds", "examples_per_s"):
        if k in raw and k not in settings:
            settings[k] = raw[k]
    return {"tasks": tasks, "settings": settings}


def compact_predictions(results_file):
    """Fold what the statistics read of eval.py's per-example records into the results JSON itself: per
    task a '0'/'1' string (test-file order) and the unextracted count. The committed run records then need
    no predictions folder (~2 MB per run; git-ignored in the committed runs folder, kept on disk)."""
    res = Path(results_file)
    raw = read_json(res)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        return
    changed = False
    for name, t in raw["tasks"].items():
        if not isinstance(t, dict) or (isinstance(t.get("per_example"), str) and t.get("unextracted") is not None):
            continue
        preds = _predictions(res, name)
        if preds is None or len(preds) != int(t.get("total", -1)):
            continue
        t["per_example"] = "".join("1" if r.get("correct") else "0" for r in preds)
        if t.get("unextracted") is None:
            t["unextracted"] = _unextracted(preds)
        changed = True
    if changed:
        write_atomic(res, json.dumps(raw, indent=1) + "\n")


def check_eval_limit(path, wanted, what):
    """An existing eval made with another --limit would silently mix protocols: refuse."""
    res = eval_results_path(path)
    raw = read_json(res) if res else None
    if not isinstance(raw, dict):
        return
    got = eval_limit(raw)
    if got != "unrecorded" and (got or None) != (wanted or None):
        raise StepFailed(f"{what}: {path} was made with --limit {got}, this call asks for {wanted}; "
                         f"delete it or use another --runs-dir")


def eval_seconds(path):
    """Wall seconds an evaluation took, as eval.py recorded them (None if not recorded)."""
    ev = load_eval(path)
    s = (ev or {}).get("settings", {}).get("seconds")
    return float(s) if isinstance(s, (int, float)) else None


def find_layer_csv(out):
    """eval.py --layer-probs --out RUN/layer-probs.json writes RUN/layer-probs-layer_probs.csv (beside the
    would-be results file); an older eval.py wrote <out folder>/layer_probs.csv."""
    out = Path(out)
    cands = [out.with_name(out.stem + "-layer_probs.csv"), out / "layer_probs.csv"]
    cands += sorted(out.parent.glob(f"{out.stem}*layer_probs*.csv"))
    for cand in cands:
        if cand.is_file():
            return cand
    return None


def read_layer_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))
