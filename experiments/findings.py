"""README's "what we found" for the paper recipe, written from the records alone: the results JSON (accuracy,
paired tests, power, ablations, probes), the Echo diagnostics CSV and echo-lora-s0's teacher probe. Every
number below is read from those files; the wording that depends on a number (significant or not, better or
worse, which test decides, probe below L_off or not) is chosen from it, so the text cannot drift from the data.

    python -m experiments.findings                       # rewrite results/README-findings.md and README's copy
    python -m experiments.findings --results R.json      # a trial: writes R-findings.md beside R.json only

The conclusion rests on the seed-level test (a paired t-test over the seed pairs) once both methods of a
comparison have 2 or more seeds; with one seed the verdict is McNemar's over test examples and is provisional.
"""
import csv
import json
import statistics
import sys
from pathlib import Path

from model.load import CliParser, HelpFormatter
from training.checkpoint import atomic_file

from .common import DISPLAY, IN_FORMAT, RESULTS, TASKS, StepFailed, by_name, read_json, shown_path
from .recipes import ABLATIONS, COMPARISONS, MAIN_METHODS, METHODS, N_MAIN, PROBES, RECIPES, paper_ablations
from .stats import mean_sd
from .tables import compare, publish_fragment, seed_level, task_avg
from .tables_paper import _seed0, paper_ablation_deltas

OUT = RESULTS / "README-findings.md"
ALPHA = 0.05


def load_results(path):
    """The results JSON at path, checked for what findings reads; StepFailed (one line naming the file and the
    field) when it is missing, not JSON, or lacks a field, so a damaged file never yields an empty section."""
    path = Path(path)
    where = shown_path(path) if path.resolve().is_relative_to(RESULTS.parent) else str(path)
    if not path.is_file():
        raise StepFailed(f"{where} is missing: build it with python -m experiments.reproduce --only-table")
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StepFailed(f"{where} is not readable JSON ({e}): rebuild it with "
                         f"python -m experiments.reproduce --only-table") from None
    check_results(res, where)
    return res


def check_results(res, where):
    """Raise StepFailed naming the first field of a results dict that findings cannot read."""
    def bad(field, want):
        raise StepFailed(f"{where}: field {field} {want}; rebuild it with python -m experiments.reproduce --only-table")
    if not isinstance(res, dict):
        bad("(top level)", "is not an object")
    if not isinstance(res.get("runs"), list):
        bad("runs", "is missing or not a list")
    for i, r in enumerate(res["runs"]):
        if not isinstance(r, dict):
            bad(f"runs[{i}]", "is not an object")
        for key, kind in (("name", str), ("decoding", str), ("seed", int), ("tasks", dict)):
            if not isinstance(r.get(key), kind) or isinstance(r.get(key), bool):
                bad(f"runs[{i}].{key}", f"is missing or not a {kind.__name__}")
        for t, v in r["tasks"].items():
            if not isinstance(v, dict) or not all(isinstance(v.get(k), int) for k in ("correct", "total")):
                bad(f"runs[{i}].tasks.{t}", "lacks integer correct / total")


def verdict(delta, p, treated, control):
    """The words a Δ and its p earn: better / worse only when the test says so at α 0.05."""
    if p < ALPHA:
        return f"{treated} {'better' if delta > 0 else 'worse'} than {control}, significant at α {ALPHA:g}"
    return f"no significant difference from {control} at α {ALPHA:g}"


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


def within_seed(full, inf, control_runs):
    """The pooled McNemar over test examples, labelled as the within-seed view."""
    n = len(full["seeds"])
    if not full.get("paired"):
        return (f"within-seed view over {n} seed{'s' if n > 1 else ''}: per-example correctness was not recorded, so "
                f"an unpaired two-proportion z-test, p = {full['p']:.2g}; 5 in-format tasks p = {inf['p']:.2g}")
    sizes = {k: control_runs[full["seeds"][0]]["tasks"][k]["total"] for k in TASKS}
    big = max(sizes, key=sizes.get)
    return (f"within-seed view, test examples pooled over {n} seed{'s' if n > 1 else ''}: McNemar p = "
            f"{full['p']:.2g} over {full['pairs']:,} paired answers (of which {DISPLAY[big]}'s {sizes[big]:,} "
            f"questions are {100 * sizes[big] * n / full['pairs']:.0f} %), 95 % paired-bootstrap CI "
            f"[{full['ci'][0]:+.2f}, {full['ci'][1]:+.2f}]; 5 in-format tasks p = {inf['p']:.2g}")


def comparison(greedy, treated, control):
    """One headline bullet, and whether its verdict rests on the seed-level test (else on one seed)."""
    t_runs, c_runs = greedy.get(treated, {}), greedy.get(control, {})
    full, inf = compare(t_runs, c_runs, TASKS), compare(t_runs, c_runs, IN_FORMAT)
    if not full.get("seeds") or full.get("p") is None or any(v is None for v in full["deltas"].values()):
        return None, None
    who, base = METHODS[treated][3], METHODS[control][3]
    lv8, lv5 = seed_level(t_runs, c_runs, TASKS), seed_level(t_runs, c_runs, IN_FORMAT)
    if lv8["test"] is None:
        d8 = statistics.fmean(lv8["deltas"].values())
        d5 = statistics.fmean(lv5["deltas"].values())
        return (f"- **{who} − {base}: {d8:+.2f} points** on the 8-task average, {d5:+.2f} on the 5 in-format "
                f"tasks (1 seed; {within_seed(full, inf, c_runs)}: {verdict(d8, full['p'], who, base)} on this "
                f"seed's test sets — provisional, one seed)."), False
    t8, t5 = lv8["test"], lv5["test"]
    per_seed = ", ".join(f"s{s} {d:+.2f}" for s, d in lv8["deltas"].items())
    ci = "" if lv8["ci"] is None else (f", 95 % CI over seeds and test examples "
                                       f"[{lv8['ci'][0]:+.2f}, {lv8['ci'][1]:+.2f}]")
    return (f"- **{who} − {base}: {t8['mean']:+.2f} ± {t8['sd']:.2f} points** on the 8-task average over "
            f"{t8['n']} seed pairs ({per_seed}; paired t-test over the seed pairs t = {t8['t']:.2f}, df = "
            f"{t8['df']}, p = {t8['p']:.2g}{ci}: **{verdict(t8['mean'], t8['p'], who, base)}**); 5 in-format "
            f"tasks {t5['mean']:+.2f} ± {t5['sd']:.2f} (p = {t5['p']:.2g}). The {within_seed(full, inf, c_runs)}."
            ), True


def headline(results):
    """The Echo − baseline bullets, then which test carries the conclusion, then the seed spread for scale."""
    greedy = by_name(results, "greedy")
    lines, by_seed = [], {}
    for treated, control, _ in COMPARISONS[:2]:                  # Echo-LoRA − LoRA, Echo-DoRA − DoRA
        line, seed_test = comparison(greedy, treated, control)
        if line:
            lines.append(line)
            by_seed[f"{METHODS[treated][3]} − {METHODS[control][3]}"] = seed_test
    if not lines:
        return []
    if any(by_seed.values()) and not all(by_seed.values()):
        lines.append("- **Which test carries the conclusion:** the paired t-test over seeds for "
                     + ", ".join(k for k, v in by_seed.items() if v) + " (its unit is the training seed); for "
                     + ", ".join(k for k, v in by_seed.items() if not v) + " still McNemar's test over the test "
                     "examples of one seed, the within-seed view, so that verdict is provisional on one seed.")
    elif all(by_seed.values()):
        lines.append("- **Which test carries the conclusion:** the paired t-test over seeds. Its unit is the "
                     "training seed, so it includes the seed-to-seed spread; the pooled McNemar test is the "
                     "within-seed view (test-set sampling of the same runs only) and is shown beside it, not "
                     "used for the verdict.")
    else:
        lines.append("- **Which test carries the conclusion:** for now McNemar's test over the test examples of "
                     "one seed, the within-seed view; it cannot see how much a method moves from seed to seed, so "
                     "the verdict is provisional on one seed until seeds 1 and 2 of both methods are in.")
        seeds_note = seed_sd(results)
        if seeds_note:
            sd8, sd5, who, k, where = seeds_note
            lines.append(f"- For scale: {who}'s 8-task average moves by {sd8:.2f} points (sd) from seed to seed, "
                         f"its 5-task in-format average by {sd5:.2f} ({k} seeds of {where}).")
    return lines


def diagnostics(path):
    """Mean gate, λ and ‖δ‖/‖o‖ over the target modules at the first and the last record; L_on − L_off and L_kd."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gap_on_minus_off") not in (None, "")]
    if not rows:
        return []
    mods = [k[:-len("_gate")] for k in rows[0] if k.endswith("_gate")]
    try:
        return _diagnostic_lines(rows, mods, path)
    except (TypeError, ValueError) as e:
        raise StepFailed(f"{shown_path(path)}: a field is not a number ({e}); rebuild it with "
                         f"python -m experiments.reproduce --only-table") from None


def _diagnostic_lines(rows, mods, path):
    def over(row, key, fn=statistics.fmean):
        return fn(float(row[f"{m}_{key}"]) for m in mods)
    first, last = rows[0], rows[-1]
    gaps = [float(r["gap_on_minus_off"]) for r in rows]
    kds = [float(r["loss_kd"]) for r in rows]
    better = sum(g < 0 for g in gaps)
    mean, sd = statistics.fmean(gaps), (statistics.stdev(gaps) if len(gaps) > 1 else 0.0)
    two_se = 2 * sd / len(gaps) ** 0.5            # records are correlated in time, so this is a lenient yardstick
    if mean + two_se < 0:
        answer = "a better model than the one it teaches"
    elif mean - two_se > 0:
        answer = "a worse model than the one it teaches"
    else:
        answer = "not measurably better than the one it teaches (its mean is within 2 standard errors of 0)"
    return [
        f"- **The Echo signal stays small.** Over the {len(mods)} target modules, the mean gate σ(·) goes from "
        f"{over(first, 'gate'):.3f} to {over(last, 'gate'):.3f} (σ(−2) = 0.119 at init) and λ from "
        f"{over(first, 'lambda'):.3f} to {over(last, 'lambda'):.3f} (range at the end "
        f"{over(last, 'lambda', min):.3f}–{over(last, 'lambda', max):.3f}). The injected δ at answer positions "
        f"grows from {100 * over(first, 'delta_ratio'):.2f} % to {100 * over(last, 'delta_ratio'):.2f} % of the "
        f"module's own output (‖δ‖/‖o‖; largest module {100 * over(last, 'delta_ratio', max):.1f} %).",
        f"- **The Echo-on pass is {answer}.** Over the {len(rows)} diagnostic records (step {rows[0]['step']} "
        f"to {rows[-1]['step']}), L_on − L_off has mean {mean:+.1e} and sd {sd:.1e} (L_off itself falls from "
        f"{float(first['loss_off']):.3f} to {float(last['loss_off']):.3f}); it is negative on {better} of "
        f"{len(rows)} records. L_kd stays between {min(kds):.1e} and {max(kds):.1e}.",
        f"  Source: `{shown_path(path)}` and its figure."]


def teacher(path):
    """The teacher-probe bullet; nothing when the probe was not run, a one-line refusal when its file is damaged."""
    if not Path(path).is_file():
        return []
    tp = read_json(path)
    t = tp.get("total") if isinstance(tp, dict) else None
    need = ("n", "teacher_accuracy", "student_accuracy", "delta_points", "mcnemar_p", "same_response")
    if not isinstance(t, dict) or not all(isinstance(t.get(k), (int, float)) for k in need):
        raise StepFailed(f"{shown_path(path)}: field total ({', '.join(need)}) is missing or not numbers; "
                         f"rerun python -m experiments.teacher_probe on that run")
    verdict_words = "no better than" if t["mcnemar_p"] >= ALPHA else (
        "better than" if t["delta_points"] > 0 else "worse than")
    return [f"- **Teacher accuracy** (analysis only: Echo path on at inference): on the {t['n']:,} in-format test "
            f"questions the teacher scores {100 * t['teacher_accuracy']:.2f} % against the student's "
            f"{100 * t['student_accuracy']:.2f} % ({t['delta_points']:+.2f} points, McNemar p = {t['mcnemar_p']:.2g}: "
            f"{verdict_words} the student); the two give the identical response on {t['same_response']:,} of "
            f"{t['n']:,} ({100 * t['same_response'] / t['n']:.1f} %). Source: `{shown_path(path)}`."]


def probes(results):
    """The capacity probes' answer: can the Echo-on pass get below L_off at this scale (L_on − L_off < 0 over
    the last 10 % of steps)?"""
    question = ("- **Capacity probes** (can the Echo-on pass get below L_off at this scale when the teacher is "
                "trained alone — always routed, λ_kd = 0 — or with λ_init 1.0 or gate bias 0?)")
    ps = {p: s for p, s in (results.get("probes") or {}).items()
          if isinstance(s, dict) and isinstance(s.get("gap_last10"), (int, float))}
    if not ps:
        return [question + ": not run yet; they are in the reproduction's queue."]
    parts = [f"{METHODS[p][3]}: L_on − L_off {s['gap_last10']:+.1e} over the last 10 % of steps "
             f"({'below' if s['gap_last10'] < 0 else 'not below'} L_off)" for p, s in ps.items()]
    below = [p for p, s in ps.items() if s["gap_last10"] < 0]
    answer = (f"yes, in {len(below)} of {len(ps)} probes" if below else f"no, in none of {len(ps)} probes")
    missing = f"; {len(PROBES) - len(ps)} of {len(PROBES)} probes not recorded yet" if len(ps) < len(PROBES) else ""
    fig = ((results.get("diagnostics") or {}).get("probes") or {})
    where = fig.get("png") or fig.get("csv")
    return [f"{question}: **{answer}**{missing}. " + "; ".join(parts) + "."
            + (f" L_on − L_off over training, beside the main run's: `{where}`." if where else "")]


def ablations(results):
    """Each ablation's seed-0 Δ of the 8-task average against full Echo-LoRA and against LoRA (A-0)."""
    seed0 = _seed0(results)
    a0, full = seed0.get("lora"), seed0.get("echo-lora")
    done = [a for a in ABLATIONS if a in seed0 and task_avg(seed0[a], TASKS) is not None]
    if a0 is None or not done:
        return []
    out, prow = [], paper_ablations().get("rows", {})
    for a in done:
        r = seed0[a]
        p_full, p_lora = paper_ablation_deltas(prow, a)
        paper = "" if p_full is None else f"paper: {p_full:+.1f} vs full, {p_lora:+.1f} vs its LoRA 84.7; "
        vs_full = "" if full is None else f"{task_avg(r, TASKS) - task_avg(full, TASKS):+.1f} vs full, "
        worst = min(TASKS, key=lambda k: r["tasks"][k]["correct"] / r["tasks"][k]["total"]
                    - a0["tasks"][k]["correct"] / a0["tasks"][k]["total"])
        w = r["tasks"][worst]
        drop = 100 * (w["correct"] / w["total"] - a0["tasks"][worst]["correct"] / a0["tasks"][worst]["total"])
        u = 100 * w.get("unextracted", 0) / w["total"]
        out.append(f"{METHODS[a][3]} {vs_full}{task_avg(r, TASKS) - task_avg(a0, TASKS):+.1f} vs LoRA ({paper}"
                   f"largest drop: {DISPLAY[worst]} {drop:+.1f}, {u:.0f} % of its answers unreadable by the "
                   f"published regex)")
    so_far = " so far" if len(done) < len(ABLATIONS) else ""
    return [f"- **Ablations{so_far}** (seed 0, Δ 8-task; {len(done)} of {len(ABLATIONS)}): " + "; ".join(out) + "."]


def power(results):
    pw = results.get("power") or {}
    if pw.get("min_delta_points") is None:
        return []
    return [f"- **What a null can rule out:** with {pw['seeds']} seeds of these test sets the paired test detects an "
            f"in-format Δ of {pw['min_delta_points']:.2f} points (80 % power, α 0.05)."]


def header(res):
    """The marker and the lead sentence; 'provisional' only while a comparison rests on one seed or runs are missing."""
    greedy = by_name(res, "greedy")
    min_pairs = min((len(seed_level(greedy.get(a, {}), greedy.get(b, {}), TASKS)["seeds"])
                     for a, b, _ in COMPARISONS[:2]), default=0)
    state = (f"{res.get('main_runs_done', 0)} of {res.get('main_runs_total', N_MAIN)} headline runs recorded"
             if res.get("partial") else "all headline runs recorded")
    caveat = (", so read every Δ below as provisional until three seeds are in" if min_pairs < 2 else
              "" if not res.get("partial") else "; the seed-level tests use the seeds both methods have")
    return [f"<!-- generated by python -m experiments.findings from {res.get('json_name')}, the diagnostics CSV "
            f"and the teacher probe: do not edit -->",
            f"**What we found** ({res.get('model_name')}, the paper's recipe; {state}{caveat}):", ""]


def earlier_recipe(earlier):
    """The same two comparisons at the earlier recipe (its results JSON, or None), so README tells one story
    across both recipes, each bullet naming its recipe and the test that decides it."""
    if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list):
        return []
    greedy = by_name(earlier, "greedy")
    lines = [line for treated, control, _ in COMPARISONS[:2]
             for line in [comparison(greedy, treated, control)[0]] if line]
    if not lines:
        return []
    return ([f"- **The earlier recipe** (SmolLM2 again, {RECIPES['1epoch-lr1e-3'].label}, the rest as above; full table in "
             f"[docs/reproduction.md](docs/reproduction.md)), the same comparisons:"]
            + ["  " + line for line in lines])


def findings(res, runs_dir, earlier=None):
    """The section's markdown from the paper recipe's results (as `reproduce` builds and writes them), its
    runs folder (the teacher probe; None: no teacher probe) and the earlier recipe's results (None: left out)."""
    check_results(res, (res.get("json_name") if isinstance(res, dict) else None) or "the results")
    diag = (res.get("diagnostics") or {}).get("csv")
    where = [RESULTS.parent / diag] + ([Path(runs_dir).parent / Path(diag).name] if runs_dir else []) if diag else []
    diag_csv = next((p for p in where if p.is_file()), None)    # in the project, or beside a trial's runs folder
    lines = header(res) + headline(res) + earlier_recipe(earlier) + (diagnostics(diag_csv) if diag_csv else [])
    lines += teacher(Path(runs_dir) / "echo-lora-s0" / "teacher-probe.json") if runs_dir else []
    lines += probes(res) + ablations(res)
    return "\n".join(lines + power(res)) + "\n"


def main(res=None, runs_dir=None):
    """Write results/README-findings.md and splice it into README; `reproduce --only-table` passes the results
    it just built, alone the command reads the paper recipe's results JSON (refused when damaged)."""
    recipe = RECIPES["paper"]
    earlier = read_json(RECIPES["1epoch-lr1e-3"].json)            # committed; None when absent or damaged
    text = findings(res if res is not None else load_results(recipe.json), runs_dir or recipe.runs, earlier)
    spliced = publish_fragment(text, OUT)
    print(f"wrote {shown_path(OUT)}" + (" and spliced it into the page with its markers" if spliced else
                                         " (neither README.md nor docs/ has results/README-findings.md markers)"))


def build_parser():
    p = CliParser(prog="python -m experiments.findings", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--results", default=None,
                   help="a results JSON other than the paper recipe's (default: that one, and README is rewritten); "
                        "with it, README is left alone and the section goes to --out")
    p.add_argument("--runs-dir", default=None,
                   help="the run folders of --results (for the teacher probe; default: <results without "
                        "-results.json> when that folder exists)")
    p.add_argument("--out", default=None,
                   help="write the section here only, README untouched (default with --results: "
                        "<results stem>-findings.md beside it)")
    return p


def cli(argv=None):
    """Parse first, then do: the paper recipe publishes into README; any other input writes beside itself."""
    args = build_parser().parse_args(argv)
    try:
        if args.results is None and args.out is None:
            return main(None, args.runs_dir)
        src = Path(args.results) if args.results else RECIPES["paper"].json
        res = load_results(src)
        runs = args.runs_dir or (RECIPES["paper"].runs if args.results is None else
                                 Path(str(src).removesuffix("-results.json")))
        out = Path(args.out) if args.out else src.with_name(src.stem + "-findings.md")
        if out.resolve() in (OUT.resolve(), (RESULTS.parent / "README.md").resolve()):
            raise StepFailed(f"--out {out} is what the project publishes; run without --results/--out for that")
        if not out.parent.is_dir():
            raise StepFailed(f"--out {out}: folder {out.parent} does not exist")
        text = findings(res, runs if Path(runs).is_dir() else None)
        atomic_file(out, lambda tmp: tmp.write_text(text))
        print(f"wrote {out} (README.md untouched)")
    except StepFailed as e:
        sys.exit(f"error: findings: {e}")
    except OSError as e:
        sys.exit(f"error: findings: {e.strerror or e}")


if __name__ == "__main__":
    cli()
