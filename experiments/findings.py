"""README's "what we found" for the paper recipe, written from the records alone: the results JSON (accuracy,
paired tests, power, ablations, probes), the Echo diagnostics CSV and echo-lora-s0's teacher probe. Every
number below is read from those files; the wording that depends on a number (significant or not, larger or
smaller) is chosen from it, so the text cannot drift from the data.

    python -m experiments.findings          # rewrite results/README-findings.md and splice it into README.md
"""
import csv
import statistics
from pathlib import Path

from .common import DISPLAY, IN_FORMAT, RESULTS, TASKS, by_name, read_json, shown_path
from .recipes import ABLATIONS, COMPARISONS, MAIN_METHODS, METHODS, N_MAIN, RECIPES
from .stats import mean_sd
from .tables import compare, publish_fragment, task_avg
from .tables_paper import _seed0

OUT = RESULTS / "README-findings.md"


def seed_sd(results):
    """(sd over seeds of the 8-task and of the 5-task average, method, seeds, source) from the recipe's own
    runs of the first method with two or more seeds, else from the 1-epoch recipe's, which has three."""
    legacy = read_json(RECIPES["1epoch-lr1e-3"].json) or {"runs": []}
    for res, where in ((results, "this recipe"), (legacy, "the 1-epoch recipe")):
        greedy = by_name(res, "greedy")
        for name in MAIN_METHODS:
            runs = [r for r in greedy.get(name, {}).values() if task_avg(r, TASKS) is not None]
            if len(runs) >= 2:
                return (mean_sd(task_avg(r, TASKS) for r in runs)[1], mean_sd(task_avg(r, IN_FORMAT) for r in runs)[1],
                        METHODS[name][3], len(runs), where)
    return None


def headline(results):
    seeds_note = seed_sd(results)
    greedy = by_name(results, "greedy")
    L = []
    for treated, control, _ in COMPARISONS[:2]:                  # Echo-LoRA − LoRA, Echo-DoRA − DoRA
        t, c = greedy.get(treated, {}), greedy.get(control, {})
        full, inf = compare(t, c, TASKS), compare(t, c, IN_FORMAT)
        if not full.get("seeds") or full.get("ci") is None:
            continue
        d8, d5 = (statistics.fmean(v for v in x["deltas"].values()) for x in (full, inf))
        n = len(full["seeds"])
        sizes = {k: c[full["seeds"][0]]["tasks"][k]["total"] for k in TASKS}
        big = max(sizes, key=sizes.get)
        verdict = "significant at α 0.05" if full["p"] < 0.05 else "not significant at α 0.05"
        L.append(f"- **{METHODS[treated][3]} − {METHODS[control][3]}: {d8:+.2f} points** on the 8-task average "
                 f"({n} seed{'s' if n > 1 else ''}; 95 % paired-bootstrap CI [{full['ci'][0]:+.2f}, "
                 f"{full['ci'][1]:+.2f}], McNemar p = {full['p']:.2g} over {full['pairs']:,} paired answers, of which "
                 f"{DISPLAY[big]}'s {sizes[big]:,} questions are {100 * sizes[big] * n / full['pairs']:.0f} %: "
                 f"{verdict}), {d5:+.2f} on the 5 in-format tasks (p = {inf['p']:.2g}).")
    if seeds_note and L:
        sd8, sd5, who, k, where = seeds_note
        L.append(f"- For scale: {who}'s 8-task average moves by {sd8:.2f} points (sd) from seed to seed, its 5-task "
                 f"in-format average by {sd5:.2f} ({k} seeds of {where}). McNemar's test sees only the "
                 f"test-set sampling of one pair of runs, not that seed-to-seed spread, so a Δ from one seed is a "
                 f"measurement of those two runs, not yet of the method.")
    return L


def diagnostics(path):
    """Mean gate, λ and ‖δ‖/‖o‖ over the target modules at the first and the last record; L_on − L_off and L_kd."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    mods = [k[:-len("_gate")] for k in rows[0] if k.endswith("_gate")]

    def over(row, key, fn=statistics.fmean):
        return fn(float(row[f"{m}_{key}"]) for m in mods)
    first, last = rows[0], rows[-1]
    gaps = [float(r["gap_on_minus_off"]) for r in rows]
    kds = [float(r["loss_kd"]) for r in rows]
    better = sum(g < 0 for g in gaps)
    return [
        f"- **The Echo signal stays small.** Over the {len(mods)} target modules, the mean gate σ(·) goes from "
        f"{over(first, 'gate'):.3f} to {over(last, 'gate'):.3f} (σ(−2) = 0.119 at init) and λ from "
        f"{over(first, 'lambda'):.3f} to {over(last, 'lambda'):.3f} (range at the end "
        f"{over(last, 'lambda', min):.3f}–{over(last, 'lambda', max):.3f}). The injected δ at answer positions "
        f"grows from {100 * over(first, 'delta_ratio'):.2f} % to {100 * over(last, 'delta_ratio'):.2f} % of the "
        f"module's own output (‖δ‖/‖o‖; largest module {100 * over(last, 'delta_ratio', max):.1f} %).",
        f"- **The Echo-on pass is not a better model than the one it teaches.** Over the {len(rows)} diagnostic "
        f"records (step {rows[0]['step']} to {rows[-1]['step']}), L_on − L_off has mean {statistics.fmean(gaps):+.1e} "
        f"and sd {statistics.stdev(gaps):.1e} (L_off itself falls from {float(first['loss_off']):.3f} to "
        f"{float(last['loss_off']):.3f}); it is negative on {better} of {len(rows)} records. L_kd stays between "
        f"{min(kds):.1e} and {max(kds):.1e}.",
        f"  Source: `{shown_path(path)}` and its figure."]


def teacher(path):
    tp = read_json(path)
    if not tp or "total" not in tp:
        return []
    t = tp["total"]
    verdict = "no better than" if t["mcnemar_p"] >= 0.05 else ("better than" if t["delta_points"] > 0 else "worse than")
    return [f"- **Teacher accuracy** (analysis only: Echo path on at inference): on the {t['n']:,} in-format test "
            f"questions the teacher scores {100 * t['teacher_accuracy']:.2f} % against the student's "
            f"{100 * t['student_accuracy']:.2f} % ({t['delta_points']:+.2f} points, McNemar p = {t['mcnemar_p']:.2g}: "
            f"{verdict} the student); the two give the identical response on {t['same_response']:,} of {t['n']:,} "
            f"({100 * t['same_response'] / t['n']:.1f} %). Source: `{shown_path(path)}`."]


def probes(results):
    ps = results.get("probes") or {}
    if not ps:
        return ["- **Capacity probe** (teacher trained alone: always routed, λ_kd = 0; also λ_init 1 and gate bias "
                "0): not run yet; it is in the reproduction's queue."]
    parts = [f"{METHODS[p][3]}: {s['gap_last10']:+.1e}" for p, s in ps.items() if s.get("gap_last10") is not None]
    return [f"- **Capacity probe** (L_on − L_off over the last 10 % of steps; negative = the Echo-on pass predicts "
            f"the answers better): " + "; ".join(parts) + "."]


def ablations(results):
    seed0 = _seed0(results)
    a0 = seed0.get("lora")
    done = [a for a in ABLATIONS if a in seed0]
    if a0 is None or not done:
        return []
    out = []
    for a in done:
        r = seed0[a]
        d = task_avg(r, TASKS) - task_avg(a0, TASKS)
        worst = min(TASKS, key=lambda k: r["tasks"][k]["correct"] / r["tasks"][k]["total"]
                    - a0["tasks"][k]["correct"] / a0["tasks"][k]["total"])
        w = r["tasks"][worst]
        drop = 100 * (w["correct"] / w["total"] - a0["tasks"][worst]["correct"] / a0["tasks"][worst]["total"])
        u = 100 * w.get("unextracted", 0) / w["total"]
        out.append(f"{METHODS[a][3]} {d:+.1f} (largest drop: {DISPLAY[worst]} {drop:+.1f}, "
                   f"{u:.0f} % of its answers unreadable by the published regex)")
    return [f"- **Ablations so far** (seed 0, Δ 8-task against A-0 = LoRA; {len(done)} of {len(ABLATIONS)}): "
            + "; ".join(out) + "."]


def power(results):
    pw = results.get("power") or {}
    if pw.get("min_delta_points") is None:
        return []
    return [f"- **What a null can rule out:** with {pw['seeds']} seeds of these test sets the paired test detects an "
            f"in-format Δ of {pw['min_delta_points']:.2f} points (80 % power, α 0.05)."]


def findings(res, runs_dir):
    """The section's markdown from the paper recipe's results (as `reproduce` builds and writes them) and
    its runs folder (the teacher probe)."""
    diag = (res.get("diagnostics") or {}).get("csv")
    state = (f"{res.get('main_runs_done', 0)} of {res.get('main_runs_total', N_MAIN)} headline runs"
             if res.get("partial") else "all headline runs")
    lines = [f"<!-- generated by python -m experiments.findings from {res.get('json_name')}, the diagnostics CSV "
             f"and the teacher probe: do not edit -->",
             f"**What we found** ({res.get('model_name')}, the paper's recipe; {state} recorded so far, so read "
             f"every Δ below as provisional until three seeds are in):", ""]
    lines += headline(res) + (diagnostics(RESULTS.parent / diag) if diag else [])
    lines += teacher(Path(runs_dir) / "echo-lora-s0" / "teacher-probe.json") + probes(res) + ablations(res)
    return "\n".join(lines + power(res)) + "\n"


def main(res=None, runs_dir=None):
    """Write results/README-findings.md and splice it into README; `reproduce --only-table` passes the results
    it just built, alone the command reads the paper recipe's results JSON."""
    recipe = RECIPES["paper"]
    text = findings(res if res is not None else read_json(recipe.json) or {"runs": []}, runs_dir or recipe.runs)
    spliced = publish_fragment(text, OUT)
    print(f"wrote {shown_path(OUT)}" + (" and spliced it into README.md" if spliced else
                                         " (README.md has no results/README-findings.md markers)"))


if __name__ == "__main__":
    main()
