"""The main README table of a recipe, from its results JSON alone: accuracy mean ± sd, Echo − baseline deltas
beside the paper's (computed from experiments/paper_tables.json), the within-seed significance over test examples,
the seed-level test (the unit is the seed), the published protocol, training cost, the layer figure; and
splicing into README."""
import json
import math
from pathlib import Path

import numpy as np

from training.checkpoint import atomic_file

from .common import (BLOCKS, DISPLAY, IN_FORMAT, ROOT, TASKS, TRAIN_TASKS, TRANSFER, by_name, committed, refuse_trial,
                     write_atomic)
from .recipes import ABLATIONS, COMPARISONS, MAIN_METHODS, MAIN_SEEDS, METHODS, N_MAIN
from .stats import (BOOT_SEED, N_BOOT, mcnemar_exact, mean_sd, paired_bootstrap_ci, paired_t_test, seed_bootstrap_ci,
                    two_proportion_z)


PAPER_TABLES = Path(__file__).resolve().parent / "paper_tables.json"      # Tables 2, 3, 6 of the paper, copied
# (treated, control) -> (table in paper_tables.json, its treated row, its control row) of the paper's headline Δ
PAPER_PAIRS = {("echo-lora", "lora"): ("table_6", "Echo-LoRA", "LoRA (reproduced)"),
               ("echo-dora", "dora"): ("table_3", "Echo-DoRA", "DoRA")}


def paper_tables():
    """The paper's main-table rows as copied into experiments/paper_tables.json ({} when it is unreadable)."""
    try:
        data = json.loads(PAPER_TABLES.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def paper_delta(treated, control, data=None):
    """The paper's headline Δ of the 8-task average for a comparison: the mean over its models (LLaMA-7B,
    LLaMA2-7B, LLaMA3-8B) of treated − control from its printed averages, Table 6 for Echo-LoRA − its
    reproduced LoRA (LLaMA3-8B: 85.6), Table 3 for Echo-DoRA − DoRA. -> (Δ, {model: Δ}), (None, {}) if absent."""
    table, t_row, c_row = PAPER_PAIRS.get((treated, control), (None, None, None))
    rows = (data if data is not None else paper_tables()).get(table) or []
    avg = {(r.get("model"), r.get("row")): r.get("avg") for r in rows if isinstance(r, dict)}
    per_model = {m: avg[(m, t_row)] - avg[(m, c_row)] for m, row in avg if row == t_row
                 and isinstance(avg[(m, t_row)], (int, float)) and isinstance(avg.get((m, c_row)), (int, float))}
    return (sum(per_model.values()) / len(per_model), per_model) if per_model else (None, {})


def _acc(t):
    return 100.0 * t["correct"] / t["total"] if t and t.get("total") else None


def _fmt(m, sd=None, digits=1):
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _signed(v, digits=1):
    return "—" if v is None else f"{v:+.{digits}f}"


def _p(p):
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    if p == 0.0:
        return "< 1e-300"
    if p < 1e-4:
        return f"{p:.1e}"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def task_avg(run, tasks):
    """Macro average (points) over `tasks`, None unless the run has all of them."""
    accs = [_acc(run["tasks"].get(t)) for t in tasks]
    return None if any(a is None for a in accs) else sum(accs) / len(accs)


def _names_in(results):
    return [n for n in METHODS if n in MAIN_METHODS or (n not in ABLATIONS and any(r["name"] == n
                                                                                   for r in results["runs"]))]


def compare(treated, control, tasks):
    """treated / control: {seed: run}. Paired on the common seeds. -> dict with deltas, McNemar, CI,
    or the unpaired z-test when per-example correctness is missing or does not line up."""
    seeds = sorted(set(treated) & set(control))
    out = {"seeds": seeds}
    if not seeds:
        return out
    deltas = {}
    for t in tasks:
        a = [_acc(treated[s]["tasks"].get(t)) for s in seeds]
        z = [_acc(control[s]["tasks"].get(t)) for s in seeds]
        deltas[t] = None if None in a or None in z else sum(x - y for x, y in zip(a, z)) / len(seeds)
    out["deltas"] = deltas
    paired = all(treated[s]["tasks"].get(t, {}).get("per_example") is not None
                 and control[s]["tasks"].get(t, {}).get("per_example") is not None
                 and len(treated[s]["tasks"][t]["per_example"]) == len(control[s]["tasks"][t]["per_example"])
                 for s in seeds for t in tasks)
    out["paired"] = paired
    if paired:
        b = c = n = 0
        diffs = []
        for t in tasks:
            acc_diff = None
            for s in seeds:
                x, y = _correct(treated[s], t), _correct(control[s], t)
                b += int(((x == 1) & (y == 0)).sum())
                c += int(((x == 0) & (y == 1)).sum())
                n += len(x)
                acc_diff = (x - y) if acc_diff is None else acc_diff + (x - y)
            diffs.append(acc_diff / len(seeds))
        lo, hi = paired_bootstrap_ci(diffs)
        out.update(b=b, c=c, pairs=n, p=mcnemar_exact(b, c), ci=(100 * lo, 100 * hi))
    else:
        c1 = n1 = c2 = n2 = 0
        for s in seeds:
            for t in tasks:
                a, z = treated[s]["tasks"].get(t), control[s]["tasks"].get(t)
                if a and z:
                    c1, n1, c2, n2 = c1 + a["correct"], n1 + a["total"], c2 + z["correct"], n2 + z["total"]
        zval, p = two_proportion_z(c1, n1, c2, n2)
        out.update(z=zval, p=p, n_treated=n1, n_control=n2)
    return out



def _correct(run, task):
    """A run's per-example correctness on a task as int64 0/1, or None when it was not recorded."""
    pe = run["tasks"].get(task, {}).get("per_example")
    return None if pe is None else (np.frombuffer(pe.encode(), dtype=np.uint8) - ord("0")).astype(np.int64)


def seed_level(treated, control, tasks):
    """The view whose unit is the seed. treated / control: {seed: run}. -> {"seeds", "deltas": {seed: Δ of
    the task-averaged accuracy, points}, "test": paired_t_test over the seed pairs (None below 2 pairs), "ci":
    95 % bootstrap CI over seeds and test examples together (points; None below 2 pairs or without
    per-example correctness)}."""
    seeds = [s for s in sorted(set(treated) & set(control))
             if task_avg(treated[s], tasks) is not None and task_avg(control[s], tasks) is not None]
    deltas = {s: task_avg(treated[s], tasks) - task_avg(control[s], tasks) for s in seeds}
    out = {"seeds": seeds, "deltas": deltas, "test": paired_t_test(deltas.values()), "ci": None}
    diffs = [[(_correct(treated[s], t), _correct(control[s], t)) for t in tasks] for s in seeds]
    if len(seeds) >= 2 and all(x is not None and y is not None and len(x) == len(y) for d in diffs for x, y in d):
        lo, hi = seed_bootstrap_ci([[x - y for x, y in d] for d in diffs])
        out["ci"] = (100 * lo, 100 * hi)
    return out

ACCURACY_COLUMNS = IN_FORMAT + ["avg5"] + TRANSFER + ["avg8"]
DELTA_HEAD = (["comparison", "seeds"] + [DISPLAY[t] for t in IN_FORMAT] + ["**Δ 5-task**"]
              + [DISPLAY[t] for t in TRANSFER] + ["**Δ 8-task**", "paper Δ 8-task"])


def build_table(results):
    """The README fragment (markdown), from the results JSON alone."""
    greedy = by_name(results, "greedy")
    names = _names_in(results)
    delta_lines, stats_rows = _delta_table(greedy)
    lines = (_header_lines(results) + _intro_lines(results) + _accuracy_table(results, greedy, names)
             + delta_lines + _significance_lines(stats_rows) + _seed_level_lines(greedy)
             + _published_protocol(results, by_name(results, "beam4"), names)
             + _training_cost(greedy, names) + _layer_figure(results))
    return "\n".join(lines).rstrip() + "\n"


def _table_head(head):
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]


def _mean_or_none(values):
    return None if any(v is None for v in values) else sum(values) / len(values)


def _header_lines(results):
    """The do-not-edit marker, the title, and the PARTIAL / SMOKE TEST warnings."""
    done, total = results.get("main_runs_done", 0), results.get("main_runs_total", N_MAIN)
    title = f"### Small-scale reproduction: {results.get('model_name') or results.get('model')} on the commonsense suite"
    if results.get("recipe_label"):
        title += f" — {results['recipe_label']}"
    lines = [f"<!-- generated by experiments/reproduce.py from {results.get('json_name', 'the results JSON')}: "
             f"do not edit -->", title, ""]
    if results.get("partial"):
        lines += [f"**PARTIAL ({done} of {total} runs)** — runs still missing are shown as —; "
                  f"rerun `python -m experiments.reproduce` to complete them.", ""]
    if results.get("limit"):
        lines += [f"**SMOKE TEST: evaluated on the first {results['limit']} examples per task only** — "
                  f"not a result.", ""]
    return lines


def _recipe_parts(rec):
    """The recipe as the intro sentence names it: rank/alpha/modules, lr, length of training, batch, …"""
    parts = []
    if rec.get("rank") is not None:
        parts.append(f"r = {_num(rec['rank'])}" + (f", α = {_num(rec['alpha'])}" if rec.get("alpha") is not None
                                                   else "")
                     + (f" on {'/'.join(map(str, rec['modules']))}" if rec.get("modules") else ""))
    if rec.get("lr") is not None:
        parts.append(f"lr {_num(rec['lr'])}")
    if rec.get("max_steps"):
        parts.append(f"{rec['max_steps']} steps")
    elif rec.get("epochs") is not None:
        parts.append(f"{_num(rec['epochs'])} epoch{'' if rec['epochs'] == 1 else 's'}")
    for key, label in (("global_batch", "global batch"), ("max_len", "max length"),
                       ("val_split", "validation hold-out")):
        if rec.get(key) is not None:
            parts.append(f"{label} {_num(rec[key])}")
    return parts


def _intro_lines(results):
    """What was trained and how it was scored, then notes on skipped examples and mismatched configs."""
    rec = results.get("recipe", {})
    rows = f" ({rec['train_rows']:,} rows)" if isinstance(rec.get("train_rows"), int) else ""
    parts = _recipe_parts(rec)
    decoding = ("Greedy decoding on the full test sets" if not results.get("limit") else
                f"Greedy decoding on the first {results['limit']} test examples per task")
    lines = [f"Fine-tuned on the 5 train sets available here — {', '.join(TRAIN_TASKS)}{rows}"
             + (f" — {', '.join(parts)}" if parts else "") + ". "
             f"{decoding}; accuracy (%) as mean ± sample sd over seeds "
             f"(the seeds column counts them; no ± with one seed). "
             f"**In-format** tasks ({', '.join(DISPLAY[t] for t in IN_FORMAT)}) have their train set in the "
             f"mix; the **format-transfer** tasks ({', '.join(DISPLAY[t] for t in TRANSFER)}) have none, so "
             f"their cells also give the share of answers the published regex could not extract (u)."]
    skipped = sum(t.get("skipped") or 0 for r in results["runs"] + ([results["base"]] if results.get("base") else [])
                  for t in r["tasks"].values())
    if skipped:
        lines.append(f"Note: eval.py skipped {skipped:,} test examples in total (see each run's `skipped` counts in "
                     f"the JSON); accuracy is correct / total as eval.py reports them.")
    if rec.get("differs_between_runs"):
        lines.append(f"Note: the runs' config.json differ in {', '.join(rec['differs_between_runs'])}.")
    return lines + [""]


def _accuracy_table(results, greedy, names):
    """Accuracy mean ± sd per task and averages: the base model, then each method."""
    head = ["method", "seeds"] + [("**5-task avg**" if c == "avg5" else "**8-task avg**" if c == "avg8"
                                   else DISPLAY[c]) for c in ACCURACY_COLUMNS]
    lines = _table_head(head)
    lines.append(_accuracy_row("base model (no adapter)", {0: results["base"]} if results.get("base") else {}, 1))
    lines += [_accuracy_row(METHODS[n][3], greedy.get(n, {}), len(MAIN_SEEDS)) for n in names]
    return lines + [""]


def _accuracy_row(label, seed_runs, wanted):
    runs = [seed_runs[s] for s in sorted(seed_runs)]
    k = len(runs)
    seeds = "—" if not k else (str(k) if k >= wanted else f"{k} of {wanted}")
    cells = [_accuracy_cell(col, runs) for col in ACCURACY_COLUMNS]
    return f"| {label} | {seeds} | " + " | ".join(cells) + " |"


def _accuracy_cell(col, runs):
    if col in ("avg5", "avg8"):
        m, sd = mean_sd([task_avg(r, IN_FORMAT if col == "avg5" else TASKS) for r in runs])
        return f"**{_fmt(m, sd)}**" if m is not None else "—"
    m, sd = mean_sd([_acc(r["tasks"].get(col)) for r in runs])
    cell = _fmt(m, sd)
    if col in TRANSFER and m is not None:      # format transfer: how often the regex found no answer
        u = [r["tasks"][col]["unextracted"] / r["tasks"][col]["total"] for r in runs
             if r["tasks"].get(col) and r["tasks"][col].get("unextracted") is not None]
        cell += f" (u {100 * sum(u) / len(u):.0f}%)" if u else " (u ?)"
    return cell


def _delta_table(greedy):
    """Echo − baseline per task and averages. -> (lines, significance rows: (label, block, seeds, Δ, compare()))"""
    comps = [(a, b, paper_delta(a, b)[0] if (a, b) in PAPER_PAIRS else paper)
             for a, b, paper in COMPARISONS if a in greedy or (a in MAIN_METHODS and b in MAIN_METHODS)]
    lines = ["**Echo − baseline** (points, mean over the seeds both methods have). The paper's deltas "
             f"(Peng et al. 2026, arXiv 2605.08177v1; 8-task average, mean over its three LLaMA models) are "
             f"{_paper_delta_words()} — with 7–8B LLaMA models trained on all 8 train sets (commonsense_170k) and "
             "beam search, so only the sign and rough size are comparable here.", ""]
    lines += _table_head(DELTA_HEAD)
    stats_rows = []
    for a, b, paper in comps:
        label = f"{METHODS[a][3]} − {METHODS[b][3]}"
        cmp_all = compare(greedy.get(a, {}), greedy.get(b, {}), TASKS)
        seeds = cmp_all["seeds"]
        if not seeds:
            lines.append(f"| {label} | — | " + " | ".join(["—"] * (len(DELTA_HEAD) - 3)) + f" | {_signed(paper)} |")
            continue
        d = cmp_all["deltas"]
        avg5, avg8 = _mean_or_none([d[t] for t in IN_FORMAT]), _mean_or_none([d[t] for t in TASKS])
        cells = [_signed(d[t]) for t in IN_FORMAT] + [f"**{_signed(avg5)}**"] + \
                [_signed(d[t]) for t in TRANSFER] + [f"**{_signed(avg8)}**", _signed(paper)]
        lines.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")
        for block, tasks in BLOCKS + [(DISPLAY[t], [t]) for t in TASKS]:
            s = compare(greedy[a], greedy[b], tasks)
            stats_rows.append((label, block, len(seeds), _mean_or_none([s["deltas"][t] for t in tasks]), s))
    return lines + [""], stats_rows


def _paper_delta_words():
    """The paper's headline deltas, each with its models and the baseline it is taken against."""
    words = []
    for (a, b), (table, t_row, c_row) in PAPER_PAIRS.items():
        d, per_model = paper_delta(a, b)
        if d is not None:
            words.append(f"{d:+.1f} for {METHODS[a][3]} (Table {table.split('_')[1]}: {t_row} − {c_row}; "
                         + ", ".join(f"{m} {v:+.1f}" for m, v in per_model.items()) + ")")
    if not words:
        return " and ".join(f"{d:+.1f} for {METHODS[a][3]}" for a, _, d in COMPARISONS if d is not None)
    return (" and ".join(words) + ". The LLaMA3-8B LoRA baseline of the Echo-LoRA Δ is Table 6's reproduced 85.6; "
            "the ablation table uses Tables 4/7's reproduced 84.7")


def _significance_lines(stats_rows):
    """How the p-values and CIs are made, the per-block table, and the per-task one folded away."""
    if not stats_rows:
        return []
    lines = [f"**Within-seed view: significance over test examples** (greedy, test examples pooled over the "
             f"tasks of each block and over the common seeds; it sees the test-set sampling of these runs, not "
             f"the seed-to-seed spread). Paired: exact two-sided McNemar test on the discordant pairs — b = examples "
             f"only the Echo variant gets right, c = only the baseline — p = 2·P(X ≤ min(b, c)), "
             f"X ~ Bin(b + c, ½); and a 95% paired bootstrap CI of the Δ of the task-averaged accuracy "
             f"({N_BOOT} resamples of the test examples within each task, seed {BOOT_SEED}). Pooling "
             f"seeds counts each test example once per seed, so p-values over several seeds are "
             f"optimistic: once both methods of a comparison have 2 or more seeds, the seed-level test below "
             f"carries the conclusion; with one seed this view is all there is, and a verdict from it is "
             f"provisional."]
    if any(not s["paired"] for *_, s in stats_rows):
        lines += ["", "Rows marked *unpaired* lack per-example correctness (eval.py's per-task "
                      "`\"per_example\": [0/1, …]` list, or its predictions_<task>.jsonl): the paired test needs "
                      "it, so they fall back to an UNPAIRED two-proportion z-test on the pooled counts "
                      "(conservative for paired data); no CI."]
    blocks = {b for b, _ in BLOCKS}
    lines += [""] + _significance_table([r for r in stats_rows if r[1] in blocks])
    lines += ["<details><summary>per task</summary>", ""]
    lines += _significance_table([r for r in stats_rows if r[1] not in blocks]) + ["</details>", ""]
    return lines


def _seed_level_lines(greedy):
    """Echo − baseline with the seed as the unit: each seed pair's Δ, their mean ± sd, the paired t-test over
    the seed pairs and the bootstrap over seeds and test examples; nothing until a comparison has 2 seed pairs."""
    rows = []
    for a, b, _ in COMPARISONS:
        for block, tasks in BLOCKS[:2]:
            lv = seed_level(greedy.get(a, {}), greedy.get(b, {}), tasks)
            if lv["test"] is not None:
                rows.append((f"{METHODS[a][3]} − {METHODS[b][3]}", block, lv))
    if not rows:
        return []
    lines = ["**Seed-level test** (the unit is the seed: each seed's paired Δ of the task-averaged accuracy, "
             "their mean ± sample sd, a paired t-test over the seed pairs with n − 1 degrees of freedom, and a 95 % "
             f"bootstrap CI that resamples the seed pairs and, within each, the test examples; {N_BOOT} "
             f"resamples, seed {BOOT_SEED}). This is the test that carries a conclusion about the method.", "",
             "| comparison | tasks | Δ per seed | mean ± sd | t (df) | p | 95% CI over seeds and examples |",
             "|---|---|---|---:|---:|---:|---:|"]
    for label, block, lv in rows:
        t, ci = lv["test"], lv["ci"]
        per_seed = ", ".join(f"s{s} {d:+.2f}" for s, d in lv["deltas"].items())
        lines.append(f"| {label} | {block} | {per_seed} | {t['mean']:+.2f} ± {t['sd']:.2f} | {t['t']:.2f} "
                     f"({t['df']}) | {_p(t['p'])} | " + ("—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]")
                     + " |")
    return lines + [""]


def _significance_table(stats_rows):
    lines = ["| comparison | tasks | seeds | Δ (points) | pairs | b | c | p | 95% CI of Δ |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, block, k, delta, s in stats_rows:
        if s["paired"]:
            lines.append(f"| {label} | {block} | {k} | {_signed(delta, 2)} | {s['pairs']:,} | {s['b']:,} | "
                         f"{s['c']:,} | {_p(s['p'])} | [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}] |")
        else:
            lines.append(f"| {label} | {block} | {k} | {_signed(delta, 2)} | *unpaired* | — | — | "
                         f"{_p(s['p'])} (z = {s['z']:.2f}) | — |")
    return lines + [""]


def _published_protocol(results, beam, names):
    """Beam search, seed 0: the paper's own decoding, one row per method that has it."""
    if not beam:
        return []
    lim = results.get("beam_limit")
    lines = [f"**Published protocol** (beam search, 4 beams, 32 new tokens; "
             f"{'full test sets' if not lim else f'first {lim} test examples per task'}; seed 0 only):", ""]
    lines += _table_head(["method", "examples"] + [DISPLAY[t] for t in IN_FORMAT] + ["**5-task avg**"]
                         + [DISPLAY[t] for t in TRANSFER] + ["**8-task avg**"])
    for n in names:
        r = beam.get(n, {}).get(0)
        if r is None:
            continue
        n_ex = sum(t["total"] for t in r["tasks"].values())
        cells = [_fmt(_acc(r["tasks"].get(t))) for t in IN_FORMAT] + [f"**{_fmt(task_avg(r, IN_FORMAT))}**"]
        cells += [_fmt(_acc(r["tasks"].get(t))) for t in TRANSFER] + [f"**{_fmt(task_avg(r, TASKS))}**"]
        lines.append(f"| {METHODS[n][3]} | {n_ex:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def _training_cost(greedy, names):
    """Minutes, tokens/s and memory per method, from the runs' summary.json; nothing when none recorded them."""
    cost = [row for row in (_cost_row(n, list(greedy.get(n, {}).values())) for n in names) if row is not None]
    if not cost:
        return []
    return ["**Training cost** (mean over seeds; from each run's summary.json; *runs at once*: how many "
            "runs of the call that trained it could share its GPU (`--jobs`, or `--jobs` per GPU under `--gpus`), "
            "so a speed with more than 1 there is not a benchmark; README's speed table is):", "",
            "| method | train minutes | tokens/s | peak GiB | device | runs at once |",
            "|---|---:|---:|---:|---|---:|"] + cost + [""]


def _cost_row(name, runs):
    secs = mean_sd([r.get("train_seconds") for r in runs])[0]
    tps = mean_sd([r.get("tokens_per_s") for r in runs])[0]
    mem = mean_sd([r.get("peak_gib") for r in runs])[0]
    dev = sorted({str(r["device"]) for r in runs if r.get("device")})
    jobs = sorted({r.get("concurrent_jobs") or 1 for r in runs})
    if secs is None and tps is None and mem is None:
        return None
    return (f"| {METHODS[name][3]} | {_fmt(secs / 60 if secs is not None else None)} | "
            f"{_fmt(tps, digits=0)} | {_fmt(mem, digits=2)} | {', '.join(dev) or '—'} | "
            f"{', '.join(map(str, jobs))} |")


def _layer_figure(results):
    """The per-layer answer probability: the plot, or the CSV's path when matplotlib was missing."""
    lp = results.get("layer_probs")
    if not (lp and lp.get("file")):
        return []
    f = lp["file"]
    if f.endswith(".png"):
        return [f"Per-layer probability of the gold answer token (seed 0; up to {lp.get('n')} of the run's "
                f"held-out validation rows per in-format task, not test rows; each layer's hidden state read out "
                f"through the final norm + LM head), LoRA vs Echo-LoRA:", "",
                f"![layer probabilities, LoRA vs Echo-LoRA]({f})", ""]
    return [f"Per-layer probability of the gold answer token, LoRA vs Echo-LoRA (seed 0, {lp.get('n')} "
            f"examples per task): `{f}` (matplotlib was not installed, so no plot).", ""]


def _num(v):
    if v is None:
        return "?"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    return str(v)


def publish_fragment(fragment, path):
    """Write a README fragment (a file under results/) and splice it into the page (README.md or one under
    docs/) that holds the markers its path relative to the project names. -> whether a page has those markers."""
    path = Path(path)
    atomic_file(path, lambda tmp: tmp.write_text(fragment))
    return splice_into_readme(fragment, path.resolve().relative_to(ROOT).as_posix())


def publish_runs_table(make, out, table, run_dirs):
    """The one body of the run-comparison publishers (pack_accuracy, nf4_accuracy): make() -> the fragment,
    written to `out`; spliced into its page only when out is the committed `table`, and a committed out is
    written only from the committed runs: run_dirs pairs each runs folder given with the committed one
    (refuse_trial otherwise, before make() reads anything)."""
    runs_are_committed = all(Path(given).resolve() == Path(official).resolve() for given, official in run_dirs)
    if committed(out) and not runs_are_committed:
        refuse_trial(out, "these are not the committed runs", "pass --out outside results/ and docs/")
    fragment = make()
    if Path(out).resolve() == Path(table).resolve():
        publish_fragment(fragment, table)
    else:
        write_atomic(out, fragment)


def published_pages():
    """The pages a generated fragment may live in: README.md and the reference pages under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relinked(fragment, page):
    """The fragment's project-relative links (`](results/…`, written for README.md at the root) as seen from
    `page`: from a page under docs/ they need a `../`."""
    try:
        depth = len(Path(page).resolve().parent.relative_to(ROOT.resolve()).parts)
    except ValueError:                    # a page outside the project (a trial's): its links are left as written
        return fragment
    return fragment.replace("](results/", "](" + "../" * depth + "results/") if depth else fragment


def splice_into_readme(fragment, name, readme=None):
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> with the fragment, in README.md or
    whichever page under docs/ holds the markers (only `readme` when given), so the published numbers are always
    the tooling's. -> whether any page had the markers."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    found = False
    for page in ([Path(readme)] if readme is not None else published_pages()):
        text = page.read_text() if page.is_file() else ""
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + begin + "\n" + relinked(fragment, page).rstrip() + "\n" + end + rest.split(end, 1)[1]
            atomic_file(page, lambda tmp: tmp.write_text(text))
            found = True
    return found
