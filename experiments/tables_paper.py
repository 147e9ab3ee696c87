"""The paper-recipe README sections beyond the main table: Tables 4 and 7 at this scale beside the paper's
deltas, the validation sweep, the capacity probes, the test's power, GPU-minutes and the Echo diagnostics."""
import json
from pathlib import Path

from .common import DISPLAY, IN_FORMAT, TASKS, TRANSFER, is_number
from .recipes import ABLATIONS, METHODS, PROBES, paper_ablations
from .tables import _signed, task_avg


def _seed0(results):
    return {r["name"]: r for r in results["runs"] if r["decoding"] == "greedy" and r["seed"] == 0}


def paper_ablation_deltas(prow, key):
    """The paper's Δ of a setting's printed 8-task average (Table 4) against full Echo-LoRA (87.5) and
    against its reproduced LoRA A-0 (84.7, Tables 4/7). -> (vs full, vs LoRA), None where a number is missing."""
    avg, full, lora = (prow.get(k, {}).get("avg") for k in (key, "full", "A-0"))
    return (avg - full if is_number(avg) and is_number(full) else None, avg - lora if is_number(avg) and is_number(lora) else None)


def our_ablation_deltas(ours, name):
    """Our seed-0 Δ of the 8-task average against full Echo-LoRA (echo-lora-s0) and against LoRA (lora-s0)."""
    r = ours.get(name)
    avg = task_avg(r, TASKS) if r else None
    refs = [task_avg(ours[n], TASKS) if n in ours else None for n in ("echo-lora", "lora")]
    return tuple(avg - ref if avg is not None and ref is not None else None for ref in refs)


def ablation_tables(results):
    """Table 7 (per task) and Table 4 (average) at this scale: seed 0; each setting's Δ against full Echo-LoRA
    and against LoRA (A-0), ours beside the paper's."""
    ours = _seed0(results)
    a0 = ours.get("lora")
    if a0 is None or not any(a in ours for a in ABLATIONS + ["echo-lora"]):
        return ""
    paper = paper_ablations()
    prow = paper.get("rows", {})
    rows = [("full", "echo-lora", "full Echo-LoRA")] + [(a, a, METHODS[a][3]) for a in ABLATIONS]
    order = IN_FORMAT + TRANSFER
    L = _ablation_intro(paper, prow)
    L += ["", "| variant | paper's id in Table 7 | " + " | ".join(DISPLAY[t] for t in order)
          + " | **Δ vs full** | **Δ vs LoRA** | paper Δ vs full | paper Δ vs LoRA |",
          "|---|---|" + "---:|" * (len(order) + 4)]
    for key, name, label in rows:
        r = ours.get(name)
        cells = []
        for t in order:
            x, y = (r or {}).get("tasks", {}).get(t), a0["tasks"].get(t)
            cells.append(_signed(100 * (x["correct"] / x["total"] - y["correct"] / y["total"])) if x and y else "—")
        d_full, d_lora = our_ablation_deltas(ours, name)
        p_full, p_lora = paper_ablation_deltas(prow, key)
        L.append(f"| {label} | {prow.get(key, {}).get('table_7_id', '—')} | " + " | ".join(cells)
                 + f" | **{_signed(d_full)}** | **{_signed(d_lora)}** | {_signed(p_full)} | {_signed(p_lora)} |")
    a0avg, p0 = task_avg(a0, TASKS), prow.get("A-0", {}).get("avg")
    L += ["", f"A-0 (LoRA) itself: {a0avg:.1f} % (8-task average) here" + (
        f", {p0:.1f} % in the paper (Tables 4/7)." if is_number(p0) else ".")]
    rule = results.get("ablation_rule")
    if rule and rule.get("sd") is not None:
        q = ", ".join(rule["queue"]) or "none"
        L.append(f"Seeds 1–2 are added for a variant whose seed-0 Δ against full Echo-LoRA exceeds the main runs' "
                 f"seed-to-seed sd of the 8-task average ({rule['sd']:.2f} points): {q}.")
    return "\n".join(L) + "\n"


def _ablation_intro(paper, prow):
    have_paper = any(is_number(v.get("avg")) for v in prow.values())
    L = ["", "**Ablations (the paper's Tables 4 and 7) at this scale** — seed 0, greedy, full test sets. Per task: "
             "Δ in points against A-0 (LoRA). Then the Δ of the 8-task average against full Echo-LoRA and against "
             "LoRA, ours (seed 0: echo-lora-s0 and lora-s0) beside the paper's (LLaMA3-8B, printed averages of "
             "Table 4: full Echo-LoRA 87.5, and its reproduced LoRA of Tables 4/7, 84.7 — not Table 6's 85.6); "
             "absolute numbers at 135M and at 8B are not comparable. Ids are README's, which are Table 4's; Table 7 "
             "numbers the same settings differently, so its rows are matched by setting (its id shown). Names and "
             "layer sets: `experiments/recipes.py` (the paper's targets 4–7 and sources −8…−5 kept as indices on "
             f"SmolLM2's 30 layers); the paper's numbers: `experiments/paper_ablations.json` "
             f"({paper.get('source', '?')})."]
    if not have_paper:
        L.append("The paper's ablation numbers are missing from that file, so its columns are empty (—).")
    return L


def sweep_table(sweep, headline=None):
    """The validation sweep: LoRA seed 0 at each (epochs, lr); final / best validation loss and exact match.
    headline: the table's own (epochs, lr), said to be validation's pick or not."""
    if not sweep:
        return ""
    best = min(sweep, key=lambda p: p["final_val_loss"])
    pick_label = None if headline is None else (
        "the headline recipe" if (best["epochs"], best["lr"]) == tuple(headline) else "not the headline recipe")
    L = ["", f"**Recipe choice on validation** (LoRA, seed 0, validation loss / exact match on the "
             f"{sweep[0].get('val_rows') or '?'} held-out rows of `--val-split 0.02`; the test sets are not read). "
             f"Lowest final validation loss: {best['epochs']:g} epoch{'s' if best['epochs'] != 1 else ''}, lr "
             f"{best['lr']:g}" + (f" — {pick_label}" if pick_label else "") + ".", "",
         "| epochs | lr | steps | final val loss | final exact | best val loss (step) | record |",
         "|---:|---:|---:|---:|---:|---:|---|"]
    for p in sweep:
        mark = "**" if p is best else ""
        L.append(f"| {mark}{p['epochs']:g}{mark} | {mark}{p['lr']:g}{mark} | {p['steps']:,} | {p['final_val_loss']:.4f} | "
                 f"{100 * p['final_val_exact']:.1f}% | {p['best_val_loss']:.4f} ({p['best_step']}) | `{p['folder']}` |")
    return "\n".join(L) + "\n"


def legacy_sweep_table(sweep_dir):
    """The 1-epoch recipe's lr sweep: each run's validation curve (from its metrics.jsonl), the best marked."""
    rows = []
    for rd in sorted(Path(sweep_dir).glob("lora-lr*"), key=lambda d: float(d.name[len("lora-lr"):])):
        vals = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()
                if '"val_loss"' in line] if (rd / "metrics.jsonl").is_file() else []
        if vals:
            rows.append((rd.name[len("lora-lr"):], vals))
    if not rows:
        return ""
    best = min(rows, key=lambda r: r[1][-1]["val_loss"])[0]
    steps = [v["step"] for v in rows[0][1]]
    L = ["", f"Recipe choice (`--sweep-lr`): LoRA, seed 0, 1 epoch, validation loss / exact match on the "
             f"{rows[0][1][-1]['val_rows']} held-out rows at steps {', '.join(map(str, steps))} — the test sets are "
             f"not read. Lowest final validation loss: lr {best}.", "",
         "| lr | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for lr, vals in rows:
        cells = [f"{v['val_loss']:.4f} / {100 * v['val_exact']:.1f}%" for v in vals]
        L.append(f"| {'**' + lr + '**' if lr == best else lr} | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


def probe_table(probes):
    if not probes:
        return ""
    L = ["", "**Capacity probe: the teacher trained alone** (Echo-on pass always routed, λ_kd = 0; training only). "
             "L_on − L_off is the mean over the routed steps of the first and the last 10 % of steps (metrics.jsonl); "
             "negative = the Echo-on pass predicts the answers better than the deployable Echo-off model.", "",
         "| probe | steps | L_on − L_off, first 10 % | L_on − L_off, last 10 % | below L_off at the end? | "
         "L_kd, last 10 % | final val loss |",
         "|---|---:|---:|---:|---|---:|---:|"]
    for p in PROBES:
        s = probes.get(p)
        if s is None:
            continue
        f = (lambda v: "—" if v is None else f"{v:+.5f}")
        last = s.get("gap_last10")
        below = "—" if last is None else ("yes" if last < 0 else "no")
        L.append(f"| {METHODS[p][3]} | {s.get('steps') or 0:,} | {f(s.get('gap_first10'))} | {f(last)} | {below} | "
                 f"{'—' if s.get('kd_last10') is None else format(s['kd_last10'], '.5f')} | "
                 f"{'—' if s.get('final_val_loss') is None else format(s['final_val_loss'], '.4f')} |")
    return "\n".join(L) + "\n"


def power_sentence(pw):
    if not pw or pw.get("min_delta_points") is None:
        return ""
    return (f"\n**Power.** At the pooled discordance of the Echo − baseline pairs on the in-format tasks "
            f"({100 * pw['discordance']:.1f} % of pairs), {pw['seeds']} seeds of these test sets "
            f"({pw['pairs_at_seeds']:,} pairs) let the paired McNemar test detect an in-format Δ of "
            f"{pw['min_delta_points']:.2f} points with {100 * pw['power']:.0f} % power at α {pw['alpha']:g}: a null "
            f"result here reads as no effect larger than {pw['min_delta_points']:.2f} points.\n")


def cost_sentence(c):
    if not c or not c.get("wall_minutes"):
        return ""
    parts = ", ".join(f"{v['wall_minutes']:.0f} min over {v['runs']} runs at {k} per GPU"
                      for k, v in sorted(c["by_jobs"].items()))
    return (f"\n**GPU-minutes spent** (train + eval wall minutes from the run records): {c['wall_minutes']:.0f} "
            f"({parts}); N runs at once shared one GPU, so the GPUs themselves were busy for about "
            f"{c['gpu_minutes_if_shared_evenly']:.0f} minutes if they shared it evenly.\n")


def diagnostics_note(diag):
    if not diag or not diag.get("csv"):
        return ""
    what = (f"![Echo diagnostics]({diag['png']})" if diag.get("png") else
            f"`{diag['csv']}` (matplotlib was not installed, so no figure)")
    text = (f"\n**Echo diagnostics** ({diag.get('run')}, every {diag.get('every', '?')} routed steps: mean gate, λ, "
            f"‖δ‖/‖o‖ at answer positions and the injector's gradient norm per target module, with L_on − L_off "
            f"and L_kd; numbers in `{diag['csv']}`):\n\n{what}\n")
    probes = diag.get("probes")
    if not probes or not probes.get("csv"):
        return text
    shown = (f"![capacity probes: L_on − L_off]({probes['png']})" if probes.get("png") else
             f"`{probes['csv']}` (matplotlib was not installed, so no figure)")
    return text + (f"\n**Capacity probes over training**: L_on − L_off of each probe beside the main run's "
                   f"({', '.join(probes['runs'])}; every diagnostic record, running mean bold; below 0 the Echo-on "
                   f"pass predicts the answers better than L_off; numbers in `{probes['csv']}`):\n\n{shown}\n")
