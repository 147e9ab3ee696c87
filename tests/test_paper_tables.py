"""The paper's numbers as the project carries them (experiments/paper_ablations.json, experiments/paper_tables.json):
equal to the shared transcription where it is present, keyed by README's (Table 4's) ablation ids, and the Δ
columns of the tables computed from them — the paper's and ours against the same two references."""
import json

import pytest

from experiments import recipes, tables as T, tables_paper as TP
from experiments.common import ROOT, TASKS

SHARED = ROOT.parent / "shared" / "paper" / "echo-lora-paper-tables.json"
ABLATIONS = json.loads(recipes.PAPER_ABLATIONS.read_text())
MAIN = json.loads(T.PAPER_TABLES.read_text())


@pytest.fixture
def shared():
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} is absent (the shared data folder is not mounted here), so the copy cannot be compared")
    return json.loads(SHARED.read_text())


def test_ablation_rows_equal_the_shared_tables_4_and_7_matched_by_setting(shared):
    t4 = {r["setting"]: r for r in shared["table_4_ablation_averages_llama3_8b"]}
    t7 = {r["setting"]: r for r in shared["table_7_ablations_per_task_llama3_8b"]}
    assert len(ABLATIONS["rows"]) == len(t4) == len(t7) == 10
    for key, row in ABLATIONS["rows"].items():
        a, b = t4[row["setting"]], t7[row["setting"]]
        assert row["avg"] == a["avg"] and row["table_4_id"] == a["id_in_table_4"], key
        assert row["tasks"] == {t: b[t] for t in shared["tasks"]} and row["table_7_avg"] == b["avg"], key
        assert row["table_7_id"] == b["id_in_table_7"], key


def test_main_rows_equal_the_shared_tables_2_3_6(shared):
    for ours, theirs in (("table_2", "table_2_lora_line"), ("table_3", "table_3_dora_line"),
                         ("table_6", "table_6_lora_line_with_reproduced_baselines")):
        want = {(r["model"], r["row"]): r for r in shared[theirs] if not r["row"].startswith("delta")}
        got = {(r["model"], r["row"]): r for r in MAIN[ours]}
        assert set(got) == set(want), ours
        for k, r in got.items():
            assert {t: r[t] for t in TASKS + ["avg"]} == {t: want[k][t] for t in TASKS + ["avg"]}, (ours, k)
            assert r["source"] == f"arXiv 2605.08177v1, Table {ours.split('_')[1]}"


def test_table_6_printed_deltas_are_what_the_headline_computes(shared):
    printed = {r["model"]: r["avg"] for r in shared["table_6_lora_line_with_reproduced_baselines"]
               if r["row"].startswith("delta")}
    _, per_model = T.paper_delta("echo-lora", "lora")
    assert per_model == pytest.approx(printed, abs=1e-9)


def test_ids_are_table_4s_and_every_entry_cites_its_table():
    assert list(ABLATIONS["rows"]) == ["A-0"] + recipes.ABLATIONS + ["full"]
    for key, row in ABLATIONS["rows"].items():
        assert row["table_4_id"] == (key if key != "full" else "A-9")
        assert row["avg_source"] == f"arXiv 2605.08177v1, Table 4 ({row['table_4_id']})"
        assert row["tasks_source"] == f"arXiv 2605.08177v1, Table 7 ({row['table_7_id']})"
        assert set(row["tasks"]) == set(TASKS) and all(isinstance(v, float) for v in row["tasks"].values())
    assert ABLATIONS["rows"]["A-1"]["table_7_id"] == "A-3"           # the numbering differs: matched by setting
    assert "84.7" in ABLATIONS["baseline"] and "85.6" in ABLATIONS["baseline"]


def test_paper_headline_deltas_compute_from_the_data():
    d, per_model = T.paper_delta("echo-lora", "lora")
    assert per_model == pytest.approx({"LLaMA-7B": 79.8 - 73.6, "LLaMA2-7B": 83.0 - 82.2, "LLaMA3-8B": 87.5 - 85.6})
    assert d == pytest.approx((6.2 + 0.8 + 1.9) / 3)
    assert T.paper_delta("echo-dora", "dora")[0] == pytest.approx((2.9 + 4.0 + 1.2) / 3)
    for a, b, typed in recipes.COMPARISONS[:2]:                       # recipes' rounded constants agree
        assert round(T.paper_delta(a, b)[0], 1) == typed
    moved = json.loads(json.dumps(MAIN))
    next(r for r in moved["table_6"] if r["model"] == "LLaMA3-8B" and r["row"] == "LoRA (reproduced)")["avg"] = 84.7
    assert T.paper_delta("echo-lora", "lora", moved)[1]["LLaMA3-8B"] == pytest.approx(2.8)
    assert T.paper_delta("echo-lora", "lora", {}) == (None, {})


def run(name, correct):
    """seed-0 greedy run: `correct` of 100 right on every task (so its 8-task average is `correct` %)."""
    return {"name": name, "decoding": "greedy", "seed": 0,
            "tasks": {t: {"correct": correct, "total": 100, "unextracted": 0} for t in TASKS}}


def ablation_row(table, label):
    line = next(l for l in table.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ablation_table_deltas_ours_and_the_papers_against_the_same_two_references(monkeypatch):
    res = {"runs": [run("lora", 50), run("echo-lora", 53), run("A-3", 51)]}
    table = TP.ablation_tables(res)
    cells = ablation_row(table, "A-3 shallow→shallow")
    assert cells[1] == "A-5"                                           # Table 7's id for the same setting
    assert cells[2] == "+1.0"                                          # per task, against LoRA
    assert cells[-4:] == ["**-2.0**", "**+1.0**", f"{86.2 - 87.5:+.1f}", f"{86.2 - 84.7:+.1f}"]
    assert ablation_row(table, "full Echo-LoRA")[-4:] == ["**+0.0**", "**+3.0**", "+0.0", f"{87.5 - 84.7:+.1f}"]
    assert ablation_row(table, "A-5 v_proj only")[-4:] == ["**—**", "**—**", "-0.3", "+2.5"]
    assert "84.7" in table and "85.6" in table and "matched by setting" in table
    moved = json.loads(json.dumps(ABLATIONS))
    moved["rows"]["A-3"]["avg"] = 80.0                                 # the paper columns follow the data
    monkeypatch.setattr(TP, "paper_ablations", lambda: moved)
    assert ablation_row(TP.ablation_tables(res), "A-3 shallow→shallow")[-2:] == ["-7.5", "-4.7"]


def test_the_tables_never_read_the_shared_folder(monkeypatch):
    """Any read under ../shared fails while the tables are built; the paper's columns are still filled."""
    real_read_text, real_open = T.Path.read_text, open

    def guarded(path, *a, **kw):
        assert "shared" not in T.Path(path).resolve().parts, f"the tables read {path}"
        return real_read_text(path, *a, **kw)
    monkeypatch.setattr(T.Path, "read_text", guarded)
    monkeypatch.setattr("builtins.open", lambda f, *a, **kw: (guarded(f), real_open(f, *a, **kw))[1])
    res = {"runs": [run("lora", 50), run("echo-lora", 53), run("A-3", 51)]}
    assert ablation_row(TP.ablation_tables(res), "A-3 shallow→shallow")[-2:] == ["-1.3", "+1.5"]
    assert "+3.0 for Echo-LoRA (Table 6" in T.build_table(res)
    with pytest.raises(AssertionError):                                # the guard itself works
        T.Path(SHARED).read_text()
