"""The built-in default task: synthetic 4-way multiple choice in the LLM-Adapters format, so a fresh clone
with no downloads can train and evaluate end to end (tiny random LLaMA, ByteTokenizer, "alpaca-short").

    instruction: "Which number is the largest? answer1: 31 answer2: 87 answer3: 12 answer4: 45"
    output:      "the correct answer is answer2"       answer: "answer2"

Four distinct numbers from 10..99, the position of the largest uniform over answer1..answer4 (chance = 25%),
so eval's answer1|answer2|answer3|answer4 regex applies unchanged. Train and test instructions are disjoint.
With "alpaca-short" and ByteTokenizer a row is ~140 tokens (fits max_len 160).
"""
import json
import random
from pathlib import Path

TEMPLATE = "alpaca-short"
MAX_LEN = 160


def make_example(rng: random.Random) -> dict:
    nums = rng.sample(range(10, 100), 4)
    k = max(range(4), key=lambda i: nums[i])
    options = " ".join(f"answer{i + 1}: {n}" for i, n in enumerate(nums))
    return {"instruction": f"Which number is the largest? {options}", "input": "",
            "output": f"the correct answer is answer{k + 1}", "answer": f"answer{k + 1}"}


def make_default_task(seed: int = 0, n_train: int = 2000, n_test: int = 200):
    """-> (train, test): lists of example dicts, deterministic in seed, no instruction in both."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        ex = make_example(rng)
        if ex["instruction"] not in seen:
            seen.add(ex["instruction"])
            rows.append(ex)
    return rows[:n_train], rows[n_train:]


def write_default_task(out_dir, seed: int = 0, n_train: int = 2000, n_test: int = 200):
    """Writes out_dir/train.json and out_dir/test.json (JSON lists); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = make_default_task(seed, n_train, n_test)
    paths = out_dir / "train.json", out_dir / "test.json"
    for path, rows in zip(paths, (train, test)):
        path.write_text(json.dumps(rows, indent=1) + "\n")
    return paths
