"""The evaluation tasks and their scoring, shared by eval.py and the experiments: the commonsense suite's
names, answer regexes and table names, where each task's files are, how a generated response is reduced to a
prediction (LLM-Adapters' commonsense_evaluate.py / evaluate.py rules, documented in eval.py) and scored, and a
progress line for long loops. Imports no command-line script."""
import math
import re
import sys
import time
from pathlib import Path

from data.prompts import RESPONSE_MARKER

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
DEFAULT_RUN = Path("runs") / "default"

COMMONSENSE = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
               "openbookqa"]
_CHOICE5 = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {"boolq": r"true|false", "piqa": r"solution1|solution2", "social_i_qa": _CHOICE5,
                   "hellaswag": r"ending1|ending2|ending3|ending4", "winogrande": r"option1|option2",
                   "ARC-Easy": _CHOICE5, "ARC-Challenge": _CHOICE5, "openbookqa": _CHOICE5}
TASKS = COMMONSENSE + ["gsm8k"]
DISPLAY = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
           "gsm8k": "GSM8K"}
PROGRESS_EVERY_S = 10.0

# ---------------------------------------------------------------- answers --------------------------------

def extract_choice(pattern, response):
    """First match of `pattern` in the stripped response, '' if none (commonsense_evaluate.py)."""
    found = re.findall(pattern, response.strip())
    return found[0] if found else ""


def extract_number(response):
    """Last number in the response with commas removed, inf if none (LLM-Adapters evaluate.py)."""
    found = re.findall(r"-?\d+\.?\d*", response.replace(",", ""))
    return float(found[-1]) if found else float("inf")


def response_of(completion):
    """The generated text after the prompt's '### Response:' up to any further marker, stripped."""
    return completion.split(RESPONSE_MARKER)[0].strip()


def is_correct(task, pred, answer):
    if task.kind == "number":
        return abs(float(answer) - pred) <= 1e-3
    return pred == answer


def accuracy(flags):
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


# ---------------------------------------------------------------- tasks ----------------------------------

class Task:
    """name, test file, kind ('choice' with a regex, or 'number'), optional train file for validation."""

    def __init__(self, name, path, kind="choice", pattern=None, train_path=None):
        self.name, self.path, self.kind, self.pattern, self.train_path = name, Path(path), kind, pattern, train_path

    def extract(self, response):
        return extract_number(response) if self.kind == "number" else extract_choice(self.pattern, response)


def resolve_task(name, data_dir, run_dir=None):
    """A suite task name (looked up in data_dir), "default" (the built-in task: RUN/data/test.json, scored
    with the answer1..answer5 regex), or a path to an LLM-Adapters-format test .json file (whose regex is
    then the alternation of its distinct answers, longest first)."""
    if name == "default":
        path = Path(run_dir or DEFAULT_RUN) / "data" / "test.json"
        if not path.exists():
            raise FileNotFoundError(f"task 'default': {path} not found (written by `python train.py`)")
        return Task("default", path, "choice", _CHOICE5, path.with_name("train.json")
                    if path.with_name("train.json").exists() else None)
    if name in ANSWER_PATTERNS:
        if data_dir is None:
            raise FileNotFoundError(f"task {name!r} needs --data-dir (no ../shared/data/commonsense here)")
        path = Path(data_dir) / name / "test.json"
        if not path.exists():
            raise FileNotFoundError(f"task {name!r}: {path} not found")
        train = path.with_name("train.json")
        return Task(name, path, "choice", ANSWER_PATTERNS[name], train if train.exists() else None)
    if name == "gsm8k":
        candidates = [Path(data_dir) / "gsm8k" / f for f in ("test.jsonl", "test.json")] if data_dir else []
        candidates += [Path(data_dir).parent / "gsm8k" / "test.jsonl"] if data_dir else []
        candidates += [SHARED / "data" / "gsm8k" / "test.jsonl"]
        for path in candidates:
            if path.exists():
                train = path.with_name("train.jsonl")
                return Task(name, path, "number", None, train if train.exists() else None)
        raise FileNotFoundError(f"task 'gsm8k': none of {', '.join(map(str, candidates))} exists")
    path = Path(name)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        train = path.with_name("train" + path.suffix)
        return Task(path.parent.name or path.stem, path, "choice", None, train if train.exists() else None)
    raise ValueError(f"unknown task {name!r} (choose from {', '.join(TASKS)}, default, "
                     f"or a path to a test .json file)")


def load_task_examples(task, path=None, limit=None):
    """Examples {instruction, input, output, answer} from the task's file (or `path`), validated."""
    from data import load_examples
    path = Path(path or task.path)
    if task.kind == "number":
        examples = _load_gsm8k(path)
    else:
        examples = load_examples(path)
        for n, ex in enumerate(examples, 1):
            if not ex["answer"]:
                raise ValueError(f"{path}: row {n} has no 'answer'")
    if task.pattern is None and task.kind == "choice":
        answers = sorted({ex["answer"] for ex in examples}, key=lambda a: (-len(a), a))
        task.pattern = "|".join(re.escape(a) for a in answers)
    return examples[:limit] if limit is not None else examples


def _load_gsm8k(path):
    from data.dataset import _read_rows
    examples = []
    for where, row in _read_rows(path):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                and isinstance(row.get("answer"), str) and "####" in row["answer"]):
            raise ValueError(f"{where}: expected {{\"question\": str, \"answer\": str ending in '#### N'}}")
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        try:
            float(gold)
        except ValueError:
            raise ValueError(f"{where}: answer after '####' is not a number: {gold!r}") from None
        examples.append({"instruction": row["question"], "input": "", "output": row["answer"], "answer": gold})
    if not examples:
        raise ValueError(f"no examples in {path}")
    return examples



def task_key(task):
    """The folder name that ties data files to a task: .../boolq/test.json -> boolq (the default task's
    RUN/data/test.json and the run's RUN/data/train.json share "data")."""
    return task.path.parent.name



class Progress:
    """A line per task at most every `every` seconds (and at the end): done/total, examples/s, ETA."""

    def __init__(self, name, total, every=PROGRESS_EVERY_S, clock=time.monotonic, out=None):
        self.name, self.total, self.every, self.clock, self.out = name, total, every, clock, out
        self.start = self.last = clock()

    def update(self, done):
        now = self.clock()
        if done < self.total and now - self.last < self.every:
            return None
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (f"  {self.name}: {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) "
                f"{rate:.1f} examples/s, ETA {_duration(eta)}")
        print(line, file=self.out or sys.stderr, flush=True)
        return line


def _duration(s):
    if not math.isfinite(s):
        return "?"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"



def score_record(task, example, prompt, completion):
    """One prediction record; completion None = skipped (too long for the context)."""
    if completion is None:
        return {**example, "prompt": prompt, "response": None, "pred": None, "correct": False, "skipped": True}
    response = response_of(completion)
    pred = task.extract(response)
    correct = is_correct(task, pred, example["answer"])
    if task.kind == "number" and not math.isfinite(pred):
        pred = None                                                   # no number in the response
    return {**example, "prompt": prompt, "response": response, "pred": pred, "correct": correct, "skipped": False}

