import json
import re

import pytest
import torch

from data import (TokenizedDataset, batches, build_prompt, epoch_order, load_dataset, load_examples,
                  make_default_task, steps_per_epoch, tokenize_example, write_default_task)
from model.tokenizer import ByteTokenizer, load_tokenizer

from conftest import SHARED, needs_shared
import data

EX = {"instruction": "Pick one. answer1: x answer2: y", "input": "", "output": "the correct answer is answer2",
      "answer": "answer2"}
EX_IN = dict(EX, input="some context")


def test_templates_exact_strings():
    i = "Pick one. answer1: x answer2: y"
    s16 = "                "
    assert build_prompt(EX) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n" + i + "\n\n### Response:\n")
    assert build_prompt(EX, for_eval=True) == build_prompt(EX)
    assert build_prompt(EX_IN) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n" + i +
        "\n\n### Input:\nsome context\n\n### Response:\n")
    assert build_prompt(EX, "alpaca-short") == "### Instruction:\n" + i + "\n\n### Response:\n"
    # LLM-Adapters finetune.py (train): two trailing spaces, 16-space "blank" line, 16 spaces before output
    assert build_prompt(EX, "llm-adapters") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.  \n\n" + s16 + "### Instruction:\n" + s16 + i + "\n" + s16 + "\n" + s16 + "### Response:\n" + s16)
    assert build_prompt(EX_IN, "llm-adapters") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n" + s16 + "### Instruction:\n" + s16 + i +
        "\n" + s16 + "\n" + s16 + "### Input:\n" + s16 + "some context\n" + s16 + "\n" + s16 + "### Response:\n" + s16)
    # commonsense_evaluate.py (eval): one trailing space, empty blank lines
    assert build_prompt(EX, "llm-adapters", for_eval=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. \n\n" + s16 + "### Instruction:\n" + s16 + i + "\n\n" + s16 + "### Response:\n" + s16)
    assert build_prompt(EX_IN, "llm-adapters", for_eval=True) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n" + s16 + "### Instruction:\n" + s16 + i +
        "\n\n" + s16 + "### Input:\n" + s16 + "some context\n\n" + s16 + "### Response:\n" + s16)
    # braces / placeholders inside the data are kept literally
    odd = dict(EX, instruction="f(x) = {x} {input} {instruction}")
    assert build_prompt(odd, "alpaca-short") == "### Instruction:\nf(x) = {x} {input} {instruction}\n\n### Response:\n"
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        build_prompt(EX, "nope")


def test_tokenize_labels():
    tok = ByteTokenizer()
    ids, labels = tokenize_example(tok, EX, "alpaca", 512)
    prompt = "Below is an instruction that describes a task. Write a response that appropriately completes " \
             "the request.\n\n### Instruction:\n" + EX["instruction"] + "\n\n### Response:\n"
    expect = [256] + list(prompt.encode()) + list(EX["output"].encode()) + [257]
    assert ids == expect
    n_prompt = 1 + len(prompt.encode())
    for t in range(len(ids)):
        assert labels[t] == (-100 if t < n_prompt else ids[t])
    assert ids[-1] == tok.eos_id and labels[-1] == tok.eos_id
    assert tok.decode(ids, skip_special=True) == prompt + EX["output"]


def test_truncation_drops():
    tok = ByteTokenizer()
    n = len(tokenize_example(tok, EX, "alpaca-short", 10_000)[0])
    assert tokenize_example(tok, EX, "alpaca-short", n) is not None
    assert tokenize_example(tok, EX, "alpaca-short", n - 1) is None  # would cut the EOS
    long = dict(EX, instruction=EX["instruction"] + " pad" * 20)
    ds = TokenizedDataset([EX, long, EX, long, long], tok, "alpaca-short", n)
    assert (len(ds), ds.n_dropped) == (2, 3)
    with pytest.raises(ValueError, match="max_len=5"):
        TokenizedDataset([EX], tok, "alpaca-short", 5)


def test_reader_formats_and_errors(tmp_path):
    rows = [EX, dict(EX_IN, answer=None), {"instruction": "a", "output": "b"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_examples([tmp_path / "a.json", str(tmp_path / "b.jsonl")])
    assert len(got) == 6 and got[:3] == got[3:]
    assert got[2] == {"instruction": "a", "input": "", "output": "b", "answer": ""}
    assert got[1]["input"] == "some context"

    (tmp_path / "bad.jsonl").write_text(json.dumps(EX) + "\n\n" + json.dumps(EX) + "\n{oops\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.jsonl'}: line 4")):
        load_examples(tmp_path / "bad.jsonl")
    (tmp_path / "noout.json").write_text(json.dumps([EX, {"instruction": "q"}]))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'noout.json'}: row 2: missing or non-string 'output'")):
        load_examples(tmp_path / "noout.json")
    (tmp_path / "notobj.jsonl").write_text(json.dumps(EX) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="notobj.jsonl: line 2: expected a JSON object"):
        load_examples(tmp_path / "notobj.jsonl")
    (tmp_path / "broken.json").write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(ValueError, match="broken.json: invalid JSON at line 2"):
        load_examples(tmp_path / "broken.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(tmp_path / "empty.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_examples(tmp_path / "missing.json")


def _toy_dataset(n, tok=ByteTokenizer()):
    exs = [dict(EX, instruction=f"q{i}" + "x" * (i % 7), output=f"a{i}") for i in range(n)]
    return TokenizedDataset(exs, tok, "alpaca-short", 64)


def test_shuffle_deterministic():
    assert list(epoch_order(50, 3, 1)) == list(epoch_order(50, 3, 1))
    assert list(epoch_order(50, 3, 1)) != list(epoch_order(50, 3, 2))
    assert list(epoch_order(50, 3, 1)) != list(epoch_order(50, 4, 1))
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))


def test_rank_sharding_matches_single_process():
    ds = _toy_dataset(37)
    G = 8
    assert steps_per_epoch(ds, G) == 4
    one = list(batches(ds, global_batch=G, micro_batch=4, seed=5, epoch=2))
    assert len(one) == 4 and all(len(mbs) == 2 for _, mbs in one)
    order = epoch_order(37, 5, 2)
    for step, mbs in one:
        idx = torch.cat([mb["index"] for mb in mbs]).tolist()
        assert idx == list(order[step * G:(step + 1) * G])
    for world, micro in [(2, 4), (2, 2), (4, 1), (8, 1)]:
        per_rank = [list(batches(ds, global_batch=G, micro_batch=micro, rank=r, world_size=world, seed=5, epoch=2))
                    for r in range(world)]
        for step in range(4):
            union = sorted(i for r in range(world) for mb in per_rank[r][step][1] for i in mb["index"].tolist())
            assert union == sorted(order[step * G:(step + 1) * G].tolist())
            g = {mb["global_n_targets"] for r in range(world) for mb in per_rank[r][step][1]}
            assert g == {sum(mb["n_targets"] for r in range(world) for mb in per_rank[r][step][1])}
    # resume from (epoch 2, step 3) gives the same step as running through
    resumed = list(batches(ds, global_batch=G, micro_batch=4, seed=5, epoch=2, start_step=3))
    assert len(resumed) == 1 and resumed[0][0] == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed[0][1], one[3][1]))
    with pytest.raises(ValueError, match="not a multiple"):
        next(batches(ds, global_batch=G, micro_batch=3))


def test_collate_padding():
    tok = ByteTokenizer()
    ds = _toy_dataset(8, tok)
    (_, mbs), = list(batches(ds, global_batch=8, micro_batch=8, seed=0, epoch=0, pad_multiple=32))
    mb = mbs[0]
    longest = max(len(ds.ids[i]) for i in mb["index"].tolist())
    assert mb["input_ids"].shape[1] == min(64, -(-longest // 32) * 32)
    assert mb["input_ids"].dtype == torch.long and mb["attention_mask"].dtype == torch.bool
    for row, i in enumerate(mb["index"].tolist()):
        n = len(ds.ids[i])
        assert mb["input_ids"][row, :n].tolist() == ds.ids[i]
        assert mb["labels"][row, :n].tolist() == ds.labels[i]
        assert (mb["input_ids"][row, n:] == tok.pad_id).all() and (mb["labels"][row, n:] == -100).all()
        assert mb["attention_mask"][row].tolist() == [True] * n + [False] * (mb["input_ids"].shape[1] - n)
    assert mb["n_targets"] == sum(sum(l != -100 for l in ds.labels[i]) for i in mb["index"].tolist())


def test_default_task(tmp_path):
    tr, te = make_default_task(seed=7, n_train=300, n_test=50)
    assert (tr, te) == make_default_task(seed=7, n_train=300, n_test=50)
    assert tr != make_default_task(seed=8, n_train=300, n_test=50)[0]
    assert not {e["instruction"] for e in tr} & {e["instruction"] for e in te}
    for e in tr + te:
        nums = [int(x) for x in re.findall(r"answer\d: (\d+)", e["instruction"])]
        assert len(nums) == 4 and len(set(nums)) == 4
        best = 0
        for k in range(1, 4):
            if nums[k] > nums[best]:
                best = k
        assert e["answer"] == f"answer{best + 1}"
        assert e["output"] == f"the correct answer is answer{best + 1}"
    counts = [sum(e["answer"] == f"answer{k}" for e in tr) for k in range(1, 5)]
    assert min(counts) > 40  # every position used (chance = 25%)
    train_path, test_path = write_default_task(tmp_path, seed=7, n_train=300, n_test=50)
    assert load_examples(train_path) == tr and load_examples(test_path) == te
    ds = load_dataset(train_path, ByteTokenizer(), "alpaca-short", 160)
    assert ds.n_dropped == 0 and len(ds) == 300
    with pytest.raises(ValueError, match="distinct"):
        make_default_task(n_train=3000, n_test=100)


@needs_shared
def test_real_commonsense_llama2():
    tok = load_tokenizer(SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    exs = load_examples(SHARED / "data" / "commonsense" / "boolq" / "train.json")
    assert len(exs) == 9427
    for ex in exs[:5]:
        ids, labels = tokenize_example(tok, ex, "llm-adapters", 512)
        n_prompt = sum(l == -100 for l in labels)
        assert ids[:n_prompt] == tok.encode(build_prompt(ex, "llm-adapters"), bos=True)
        assert ids[n_prompt:] == tok.encode(ex["output"]) + [2] == labels[n_prompt:]
        assert ids[0] == 1
    ds = TokenizedDataset(exs[:200], tok, "alpaca", 256)
    assert len(ds) + ds.n_dropped == 200


def test_length_grouping_keeps_every_row_once_and_cuts_padding():
    """--group-by-length: each epoch still sees every row exactly once, in batches whose rows have
    similar lengths (less padding than the plain shuffle), independent of the number of processes."""
    import numpy as np
    lengths = list(np.random.RandomState(0).randint(5, 200, size=1000))
    order = data.epoch_order(1000, seed=3, epoch=1)
    grouped = data.length_grouped_order(order, lengths, global_batch=16, seed=3, epoch=1)
    assert sorted(grouped.tolist()) == list(range(1000))
    pad = lambda o: sum(16 * max(lengths[i] for i in o[k:k + 16]) - sum(lengths[i] for i in o[k:k + 16])
                        for k in range(0, 992, 16))
    assert pad(grouped) < 0.2 * pad(order)
    again = data.length_grouped_order(order, lengths, global_batch=16, seed=3, epoch=1)
    assert np.array_equal(grouped, again)
    assert not np.array_equal(grouped, data.length_grouped_order(order, lengths, 16, seed=3, epoch=2))


def test_holdout_is_seeded_and_disjoint():
    held = data.holdout_indices(100, 0.1, seed=5)
    assert len(held) == 10 and list(held) == sorted(held) and list(held) == list(data.holdout_indices(100, 0.1, 5))
    rows = [{"i": i} for i in range(100)]
    train_rows, val_rows = data.split_holdout(rows, 0.1, 5)
    assert [r["i"] for r in val_rows] == list(held) and len(train_rows) == 90
    assert not {r["i"] for r in train_rows} & {r["i"] for r in val_rows}
    with pytest.raises(ValueError, match="--val-split"):
        data.holdout_indices(10, 1.0, 0)
