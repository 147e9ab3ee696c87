"""README's "what we found": the seed-level statistics it rests on (Student's t through the regularized
incomplete beta, the paired t-test over seeds, the bootstrap over seeds and examples), the wording chosen from
synthetic records that flip each conclusion, and the command's refusals (help, missing or damaged JSON)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from experiments import findings as F, stats as S
from experiments.common import ROOT, TASKS

N = 400                                   # test examples per task in the synthetic records


# ---- statistics -------------------------------------------------------------------------------------------

def test_incomplete_beta_known_values():
    # I_0.3(2, 3) = P(Bin(4, 0.3) >= 2) = 0.3483 exactly; I_x(1/2, 1/2) = (2/π) asin √x; I_x(1, 1) = x
    assert S.regularized_incomplete_beta(0.3, 2, 3) == pytest.approx(0.3483, abs=1e-12)
    assert S.regularized_incomplete_beta(0.9, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.9)),
                                                                         abs=1e-12)
    assert S.regularized_incomplete_beta(0.37, 1, 1) == pytest.approx(0.37, abs=1e-13)
    assert S.regularized_incomplete_beta(0.0, 2, 3) == 0.0 and S.regularized_incomplete_beta(1.0, 2, 3) == 1.0
    with pytest.raises(ValueError):
        S.regularized_incomplete_beta(1.5, 2, 3)


@pytest.mark.parametrize("t, df, p", [(12.706205, 1, 0.05), (4.302653, 2, 0.05), (2.776445, 4, 0.05),
                                      (9.924843, 2, 0.01), (2.085963, 20, 0.05), (1.959964, 10**7, 0.05)])
def test_t_two_sided_p_matches_the_tables(t, df, p):
    assert S.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-5)


def test_t_with_one_df_is_cauchy():
    for t in (0.2, 1.5, 7.0):
        assert S.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)


def test_paired_t_test_by_hand():
    r = S.paired_t_test([1.0, 2.0, 3.0])                 # mean 2, sd 1, t = 2√3, df 2
    assert (r["n"], r["df"]) == (3, 2) and r["mean"] == pytest.approx(2.0) and r["sd"] == pytest.approx(1.0)
    assert r["t"] == pytest.approx(2 * math.sqrt(3)) and r["p"] == pytest.approx(0.074180, abs=1e-6)
    assert S.paired_t_test([0.7]) is None
    assert S.paired_t_test([0.5, 0.5])["p"] == 0.0 and S.paired_t_test([0.0, 0.0])["p"] == 1.0


def test_seed_bootstrap_brackets_the_mean_and_sees_seed_spread():
    same = [[np.zeros(N, int) for _ in range(3)] for _ in range(3)]          # Δ 0 on every example of every seed
    lo, hi = S.seed_bootstrap_ci(same)
    assert lo == hi == 0.0
    up = [[np.where(np.arange(N) < k, 1, 0) for _ in range(3)] for k in (8, 40, 72)]   # Δ 2 %, 10 %, 18 %
    lo, hi = S.seed_bootstrap_ci(up)
    assert 0.02 <= lo < 0.04 and 0.16 < hi <= 0.18       # the seed spread (2 % … 18 %) sets the width
    assert S.seed_bootstrap_ci(up) == (lo, hi)           # fixed seed: reproducible


# ---- synthetic records ------------------------------------------------------------------------------------

def run(name, seed, delta_points=0.0, churn=0):
    """A greedy run on 8 tasks of N examples: the control answers the first half right; the treated run also
    gets (Δ > 0) or loses (Δ < 0) |Δ| % of N more, so its per-task and average Δ is exactly delta_points, and
    trades `churn` right answers for as many wrong ones (discordant pairs both ways, Δ unchanged)."""
    k = round(abs(delta_points) * N / 100)
    pe = np.r_[np.ones(N // 2, int), np.zeros(N - N // 2, int)]
    if delta_points > 0:
        pe[N // 2:N // 2 + k] = 1
    elif delta_points < 0:
        pe[:k] = 0
    if churn:
        pe[N // 2 - churn:N // 2], pe[N - churn:] = 0, 1
    tasks = {t: {"correct": int(pe.sum()), "total": N, "unextracted": 0, "per_example": "".join(map(str, pe))}
             for t in TASKS}
    return {"name": name, "decoding": "greedy", "seed": seed, "tasks": tasks}


def results(deltas, probes=None, partial=False, churn=0):
    """LoRA / Echo-LoRA and DoRA / Echo-DoRA with these per-seed Δ (the same for both pairs)."""
    runs = []
    for seed, d in enumerate(deltas):
        runs += [run("lora", seed), run("echo-lora", seed, d, churn), run("dora", seed),
                 run("echo-dora", seed, d, churn)]
    return {"runs": runs, "partial": partial, "main_runs_done": len(runs), "main_runs_total": 12,
            "json_name": "synthetic.json", "model_name": "toy", "probes": probes or {}}


def text(res, tmp_path):
    return F.findings(res, tmp_path)


def echo_lora_line(t):
    return next(line for line in t.splitlines() if line.startswith("- **Echo-LoRA − LoRA"))


def test_one_seed_is_provisional_and_mcnemar_decides(tmp_path):
    t = text(results([3.0], partial=True), tmp_path)
    line = echo_lora_line(t)
    assert "+3.00 points" in line and "1 seed" in line and "provisional, one seed" in line
    assert "Echo-LoRA better than LoRA, significant at α 0.05" in line
    assert "for now McNemar's test over the test examples of one seed" in t
    assert "read every Δ below as provisional" in t and "paired t-test over seeds" not in t


def test_one_seed_small_delta_is_not_significant(tmp_path):
    line = echo_lora_line(text(results([0.25], partial=True, churn=40), tmp_path))
    assert "+0.25 points" in line and "no significant difference from LoRA" in line and "better" not in line


def test_three_consistent_seeds_carry_a_significant_gain(tmp_path):
    t = text(results([3.0, 3.5, 2.5]), tmp_path)
    line = echo_lora_line(t)
    assert "+3.00 ± 0.50 points" in line and "3 seed pairs" in line and "s0 +3.00, s1 +3.50, s2 +2.50" in line
    p = S.paired_t_test([3.0, 3.5, 2.5])["p"]
    assert f"t = {3.0 / (0.5 / math.sqrt(3)):.2f}, df = 2, p = {p:.2g}" in line and p < 0.05
    assert "**Echo-LoRA better than LoRA, significant at α 0.05**" in line
    assert "Which test carries the conclusion:** the paired t-test over seeds" in t
    assert "provisional" not in t and "within-seed view" in line


def test_three_seeds_that_disagree_are_not_significant_although_mcnemar_is(tmp_path):
    """Pooled over seeds, McNemar sees +1.67 points on 9,600 pairs; the seeds disagree, so the seed test wins."""
    line = echo_lora_line(text(results([6.0, -4.0, 3.0]), tmp_path))
    assert "+1.67 ± 5.13 points" in line
    assert "**no significant difference from LoRA at α 0.05**" in line
    mcnemar = float(line.split("McNemar p = ")[1].split(" ")[0])
    assert mcnemar < 0.05                                  # the within-seed view alone would have said better


def test_three_consistent_seeds_carry_a_significant_loss(tmp_path):
    line = echo_lora_line(text(results([-3.0, -3.5, -2.5]), tmp_path))
    assert "-3.00 ± 0.50 points" in line and "**Echo-LoRA worse than LoRA, significant at α 0.05**" in line


def test_two_seeds_use_the_seed_test_with_one_df(tmp_path):
    t = text(results([3.0, 2.0], partial=True), tmp_path)
    line = echo_lora_line(t)
    assert "2 seed pairs" in line and "df = 1" in line
    assert "the seed-level tests use the seeds both methods have" in t and "provisional" not in t


def test_probes_not_run_below_and_not_below(tmp_path):
    line = lambda t: next(x for x in t.splitlines() if x.startswith("- **Capacity probes"))
    assert "not run yet" in line(text(results([1.0]), tmp_path))
    one_below = {"probe-teacher-alone": {"gap_last10": 2e-4}, "probe-teacher-alone-lambda1": {"gap_last10": -3e-3},
                 "probe-teacher-alone-gate0": {"gap_last10": 1e-4}}
    got = line(text(results([1.0], probes=one_below), tmp_path))
    assert "**yes, in 1 of 3 probes**" in got and "-3.0e-03 over the last 10 % of steps (below L_off)" in got
    assert "+2.0e-04 over the last 10 % of steps (not below L_off)" in got
    none_below = {"probe-teacher-alone": {"gap_last10": 2e-4}}
    got = line(text(results([1.0], probes=none_below), tmp_path))
    assert "**no, in none of 1 probes**" in got and "2 of 3 probes not recorded yet" in got


# ---- the command ------------------------------------------------------------------------------------------

def cli(*argv):
    return subprocess.run([sys.executable, "-m", "experiments.findings", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_prints_help_and_writes_nothing():
    readme, out = (ROOT / "README.md").read_bytes(), F.OUT.read_bytes() if F.OUT.is_file() else None
    r = cli("--help")
    assert r.returncode == 0 and "usage: python -m experiments.findings" in r.stdout and "--results" in r.stdout
    assert (ROOT / "README.md").read_bytes() == readme
    assert (F.OUT.read_bytes() if F.OUT.is_file() else None) == out


@pytest.mark.parametrize("content, says", [
    (None, "is missing"),
    ('{"runs": [', "is not readable JSON"),
    ('[]', "field (top level) is not an object"),
    ('{"runs": [{"name": "lora", "decoding": "greedy", "seed": "0", "tasks": {}}]}', "field runs[0].seed"),
    ('{"runs": [{"name": "lora", "decoding": "greedy", "seed": 0, "tasks": {"boolq": {"correct": 1}}}]}',
     "field runs[0].tasks.boolq"),
])
def test_damaged_results_are_refused_in_one_line(tmp_path, content, says):
    src = tmp_path / "r-results.json"
    if content is not None:
        src.write_text(content)
    r = cli("--results", str(src))
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and str(src) in r.stderr and says in r.stderr, r.stderr
    assert not (tmp_path / "r-results-findings.md").exists()


def test_results_of_ones_own_are_written_beside_them(tmp_path):
    src = tmp_path / "mine-results.json"
    src.write_text(json.dumps(results([3.0, 3.5, 2.5])))
    readme = (ROOT / "README.md").read_bytes()
    r = cli("--results", str(src))
    assert r.returncode == 0, r.stderr
    assert "paired t-test over seeds" in (tmp_path / "mine-results-findings.md").read_text()
    assert (ROOT / "README.md").read_bytes() == readme
    r = cli("--results", str(src), "--out", str(F.OUT))
    assert r.returncode != 0 and "what the project publishes" in r.stderr


# ---- the capacity probes' curves --------------------------------------------------------------------------

def diag_records(path, gaps, loss_off=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": 1 + 50 * i, "p": 1.0, "loss_off": loss_off,
                                        "loss_on": loss_off + g, "loss_kd": 0.0,
                                        "modules": {"4_wq": {"gate": 0.12, "lambda": 0.1}}}) + "\n"
                            for i, g in enumerate(gaps)) + "not json\n")


def test_probe_curves_appear_beside_the_diagnostics_when_their_records_do(tmp_path):
    from experiments import figures, tables_paper
    runs = tmp_path / "runs"
    main = runs / "echo-lora-s0" / "echo_diagnostics.jsonl"
    diag_records(main, [0.002, -0.001, 0.0005])
    info = figures.echo_diagnostics(main, tmp_path / "d.csv", tmp_path / "d.png")
    assert info["probes"] is None                                     # no probe recorded yet: no figure
    assert "Capacity probes over training" not in tables_paper.diagnostics_note(info)

    diag_records(runs / "probe-teacher-alone-s0" / "echo_diagnostics.jsonl", [0.01, -0.02])
    diag_records(runs / "probe-teacher-alone-gate0-s0" / "echo_diagnostics.jsonl", [0.25], loss_off=0.5)
    info = figures.echo_diagnostics(main, tmp_path / "d.csv", tmp_path / "d.png")
    probes = info["probes"]
    assert probes["runs"] == ["echo-lora-s0", "probe-teacher-alone", "probe-teacher-alone-gate0"]
    rows = (tmp_path / "d-probes.csv").read_text().splitlines()
    assert rows[0] == "run,step,gap_on_minus_off"
    got = [(r.split(",")[0], int(r.split(",")[1]), float(r.split(",")[2])) for r in rows[1:]]
    assert got == [("echo-lora-s0", 1, pytest.approx(0.002)), ("echo-lora-s0", 51, pytest.approx(-0.001)),
                   ("echo-lora-s0", 101, pytest.approx(0.0005)), ("probe-teacher-alone", 1, pytest.approx(0.01)),
                   ("probe-teacher-alone", 51, pytest.approx(-0.02)),
                   ("probe-teacher-alone-gate0", 1, pytest.approx(0.25))]
    note = tables_paper.diagnostics_note(info)
    assert "Capacity probes over training" in note and "d-probes" in note
    res = results([1.0], probes={"probe-teacher-alone": {"gap_last10": -0.02}})
    res["diagnostics"] = {"probes": probes}
    line = next(x for x in text(res, tmp_path).splitlines() if x.startswith("- **Capacity probes"))
    assert "d-probes" in line and "beside the main run's" in line


def test_rolling_mean_by_hand():
    from experiments.figures import rolling_mean
    assert rolling_mean([1.0, 2.0, 3.0, 4.0, 10.0], width=3) == pytest.approx([1.5, 2.0, 3.0, 17 / 3, 7.0])


def test_mixed_seed_counts_name_the_test_per_comparison(tmp_path):
    res = results([3.0, 3.5, 2.5])
    res["runs"] = [r for r in res["runs"] if not (r["name"] in ("dora", "echo-dora") and r["seed"] > 0)]
    t = text(res, tmp_path)
    assert ("the paired t-test over seeds for Echo-LoRA − LoRA (its unit is the training seed); for Echo-DoRA − DoRA "
            "still McNemar's test") in t
    assert "provisional, one seed" in next(x for x in t.splitlines() if x.startswith("- **Echo-DoRA − DoRA"))
    assert "read every Δ below as provisional" in t


def test_ablations_bullet_gives_both_references_ours_and_the_papers(tmp_path):
    res = results([1.0])
    res["runs"].append(run("A-1", 0, -2.0))                 # LoRA 50 %, full Echo-LoRA 51 %, A-1 48 %
    line = next(x for x in text(res, tmp_path).splitlines() if x.startswith("- **Ablations so far"))
    assert ("A-1 w/o stochastic routing -3.0 vs full, -2.0 vs LoRA (paper: -8.8 vs full, -6.0 vs its LoRA 84.7; "
            "largest drop: BoolQ -2.0") in line


def test_without_per_example_the_seed_test_still_decides_and_the_within_view_says_unpaired(tmp_path):
    res = results([3.0, 3.5, 2.5])
    for r in res["runs"]:
        for t in r["tasks"].values():
            del t["per_example"]
    line = echo_lora_line(text(res, tmp_path))
    assert "**Echo-LoRA better than LoRA, significant at α 0.05**" in line and "CI over seeds" not in line
    assert "unpaired two-proportion z-test" in line
    one = results([3.0])
    for r in one["runs"]:
        for t in r["tasks"].values():
            del t["per_example"]
    assert "unpaired two-proportion z-test" in echo_lora_line(text(one, tmp_path))


def test_fragments_are_spliced_into_the_page_that_holds_their_markers(tmp_path, monkeypatch):
    from experiments import tables as T
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "reproduction.md"
    page.parent.mkdir()
    readme.write_text("intro\n<!-- BEGIN other -->\nold\n<!-- END other -->\n")
    page.write_text("a\n<!-- BEGIN results/x.md -->\nold table\n<!-- END results/x.md -->\nb\n")
    monkeypatch.setattr(T, "published_pages", lambda: [readme, page])
    before = readme.read_text()
    assert T.splice_into_readme("new table\n", "results/x.md")
    assert page.read_text() == "a\n<!-- BEGIN results/x.md -->\nnew table\n<!-- END results/x.md -->\nb\n"
    assert readme.read_text() == before
    assert not T.splice_into_readme("x", "results/none.md") and readme.read_text() == before


def test_table_gets_the_seed_level_rows_only_with_two_seeds():
    from experiments.tables import build_table
    assert "**Seed-level test**" not in build_table(results([3.0], partial=True))
    table = build_table(results([6.0, -4.0, 3.0]))
    row = next(l for l in table.splitlines() if l.startswith("| Echo-LoRA − LoRA | 8 tasks | s0"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    t = S.paired_t_test([6.0, -4.0, 3.0])
    assert cells[2:6] == ["s0 +6.00, s1 -4.00, s2 +3.00", "+1.67 ± 5.13", f"{t['t']:.2f} (2)", f"{t['p']:.3f}"]
    assert table.index("**Within-seed view") < table.index("**Seed-level test**")


def test_probe_table_answers_below_or_not():
    from experiments.tables_paper import probe_table
    table = probe_table({"probe-teacher-alone": {"steps": 900, "gap_first10": 0.01, "gap_last10": -0.002,
                                                 "kd_last10": None, "final_val_loss": 0.5},
                         "probe-teacher-alone-gate0": {"steps": 900, "gap_first10": 0.01, "gap_last10": 0.003}})
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip("|").split("|")] for l in table.splitlines()
            if l.startswith("| teacher")}
    assert rows["teacher alone (p = 1, λ_kd = 0)"][3:5] == ["-0.00200", "yes"]
    assert rows["teacher alone, gate bias 0"][3:5] == ["+0.00300", "no"]
    assert probe_table({}) == ""


def test_a_fragment_spliced_into_a_docs_page_keeps_its_links(tmp_path, monkeypatch):
    """Fragments link `results/…` for README at the root; spliced into docs/ those links need `../`."""
    from experiments import tables
    (tmp_path / "docs").mkdir()
    page, readme = tmp_path / "docs" / "page.md", tmp_path / "README.md"
    for p in (page, readme):
        p.write_text("a\n<!-- BEGIN results/x.md -->\nold\n<!-- END results/x.md -->\nb\n")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    fragment = "![fig](results/f.png) and [csv](results/f.csv), not https://x/results/y"
    assert tables.splice_into_readme(fragment, "results/x.md")
    assert "![fig](../results/f.png) and [csv](../results/f.csv), not https://x/results/y" in page.read_text()
    assert fragment in readme.read_text() and "old" not in page.read_text() + readme.read_text()


def test_the_earlier_recipe_is_told_beside_the_headline_with_its_own_test(tmp_path):
    """README tells one story: the paper recipe's bullets, then the earlier recipe's, each with its own verdict."""
    alone = text(results([3.0], partial=True), tmp_path)
    assert "The earlier recipe" not in alone
    t = F.findings(results([3.0], partial=True), tmp_path, earlier=results([-3.0, -3.5, -2.5]))
    lines = t.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("- **The earlier recipe**"))
    assert "1 epoch, lr 1e-3" in lines[at]
    assert lines[at + 1].startswith("  - **Echo-LoRA − LoRA: -3.00 ± 0.50 points")
    assert "**Echo-LoRA worse than LoRA, significant at α 0.05**" in lines[at + 1]
    assert lines[at + 2].startswith("  - **Echo-DoRA − DoRA: -3.00 ± 0.50 points")
    assert "provisional, one seed" in echo_lora_line(t)              # the headline's own verdict is unchanged
    assert F.findings(results([3.0]), tmp_path, earlier=[]) == text(results([3.0]), tmp_path)   # damaged: left out
