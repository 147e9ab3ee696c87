"""The built-in default task: synthetic 4-way multiple choice in the LLM-Adapters format, so a fresh clone
with no downloads can train and evaluate end to end (tiny random LLaMA, ByteTokenizer, "alpaca-short").

    instruction: "Which number is the largest? answer1: 3 answer2: 8 answer3: 1 answer4: 5"
    output:      "the correct answer is answer2"       answer: "answer2"

Four distinct digits 1..9 (one byte each, so the tiny model compares single tokens; 9*8*7*6 = 3024 distinct
rows), the position of the largest uniform over answer1..answer4 (chance = 25%), so eval's
answer1|answer2|answer3|answer4 regex applies unchanged. Train and test instructions are disjoint.
With "alpaca-short" and ByteTokenizer every row is 136 tokens (fits max_len 160). The default run
(`python train.py`: tiny preset at init std 0.2, LoRA r32 on all 7 modules, Echo, 375 steps of 16) brings the
answer-token loss from ~6.7 nats to ~0.01 in about 35 s on 2 CPU cores; tests/test_train.py checks that it learns.
"""
import json
import random
from pathlib import Path

TEMPLATE = "alpaca-short"
MAX_LEN = 160
N_DISTINCT = 9 * 8 * 7 * 6


def make_example(rng: random.Random) -> dict:
    nums = rng.sample(range(1, 10), 4)
    k = max(range(4), key=lambda i: nums[i])
    options = " ".join(f"answer{i + 1}: {n}" for i, n in enumerate(nums))
    return {"instruction": f"Which number is the largest? {options}", "input": "",
            "output": f"the correct answer is answer{k + 1}", "answer": f"answer{k + 1}"}


def make_default_task(seed: int = 0, n_train: int = 2000, n_test: int = 200):
    """-> (train, test): lists of example dicts, deterministic in seed, no instruction in both."""
    if n_train + n_test > N_DISTINCT:
        raise ValueError(f"the default task has only {N_DISTINCT} distinct rows; asked for {n_train + n_test}")
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
