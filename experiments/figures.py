"""Figures and their CSVs, matplotlib imported lazily (CSV only without it): the Echo diagnostics over training
(from RUN/echo_diagnostics.jsonl) and beside it the capacity probes' L_on − L_off, the LoRA vs Echo-LoRA layer
curves, and a run's loss/validation curves."""
import json
from pathlib import Path

from training.checkpoint import atomic_file

from .common import is_number, read_jsonl, shown_path
from .evals import find_layer_csv, read_layer_csv
from .recipes import METHODS, PROBES

FIELDS = ["gate", "lambda", "delta_rms", "out_rms", "delta_ratio", "grad_norm"]


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _write_csv(path, header, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = (lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)))
    text = ",".join(header) + "\n" + "".join(",".join(fmt(v) for v in r) + "\n" for r in rows)
    atomic_file(path, lambda tmp: tmp.write_text(text))


def _save_png(fig, path, dpi=110):
    """Save a figure atomically (a reader finds the old PNG or the new one, never a torn file)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_file(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def diagnose_every(run):
    """The run's train.py --diagnose-every (N routed steps between records), from its config.json."""
    try:
        return json.loads((Path(run) / "config.json").read_text())["opts"].get("diagnose_every")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def echo_diagnostics(jsonl, csv_out, png_out=None, title="Echo diagnostics"):
    """RUN/echo_diagnostics.jsonl ({"step", "p", "loss_off", "loss_on", "loss_kd", "modules": {"4_wq": {gate,
    lambda, delta_rms, out_rms, delta_ratio, grad_norm}, ...}} per line) -> a CSV (one row per record: step,
    p, the losses, L_on − L_off, then <module>_<field>) and, with matplotlib, a PNG of six panels: gate, λ,
    ‖δ‖/‖o‖, gradient norm per module over steps, L_on − L_off and L_kd. -> {"csv", "png", "modules",
    "records", "every"} or None when the file has no records."""
    recs = [r for r in read_jsonl(jsonl) if isinstance(r.get("step"), int)]
    if not recs:
        return None
    modules = sorted({m for r in recs for m in (r.get("modules") or {})},
                     key=lambda m: (int(m.split("_")[0]) if m.split("_")[0].lstrip("-").isdigit() else 0, m))
    gap = [(r["loss_on"] - r["loss_off"]) if r.get("loss_on") is not None and r.get("loss_off") is not None
           else None for r in recs]
    header = ["step", "p", "loss_off", "loss_on", "loss_kd", "gap_on_minus_off"] + \
             [f"{m}_{f}" for m in modules for f in FIELDS]
    rows = [[r["step"], r.get("p"), r.get("loss_off"), r.get("loss_on"), r.get("loss_kd"), g] +
            [((r.get("modules") or {}).get(m) or {}).get(f) for m in modules for f in FIELDS]
            for r, g in zip(recs, gap)]
    _write_csv(csv_out, header, rows)
    out = {"csv": shown_path(csv_out), "png": None, "modules": modules, "records": len(recs),
           "every": diagnose_every(Path(jsonl).parent)}
    stem = Path(csv_out).with_suffix("")
    run = Path(jsonl).parent
    out["probes"] = probe_gaps(run.parent, run.name, stem.with_name(stem.name + "-probes.csv"),
                               stem.with_name(stem.name + "-probes.png") if png_out else None)
    plt = pyplot() if png_out else None
    if plt is None:
        return out
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    for ax, (f, label) in zip(axes.flat[:4], [("gate", "mean σ(gate)"), ("lambda", "λ"),
                                              ("delta_ratio", "‖δ‖ / ‖o‖ (answer positions)"),
                                              ("grad_norm", "injector gradient norm")]):
        for m in modules:
            ax.plot(steps, [((r.get("modules") or {}).get(m) or {}).get(f) for r in recs], lw=1, label=m)
        ax.set_ylabel(label, fontsize=8)
        if f in ("delta_ratio", "grad_norm"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=6, ncol=2)
    axes[2][0].plot(steps, gap, lw=1, color="tab:red")
    axes[2][0].axhline(0, color="k", lw=0.5)
    axes[2][0].set_ylabel("L_on − L_off", fontsize=8)
    axes[2][1].plot(steps, [r.get("loss_kd") for r in recs], lw=1, color="tab:purple")
    axes[2][1].set_ylabel("L_kd", fontsize=8)
    for ax in axes[2]:
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(png_out).parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, png_out)
    plt.close(fig)
    out["png"] = shown_path(png_out)
    return out


def gap_curve(jsonl):
    """[(step, L_on − L_off)] of a run's echo_diagnostics.jsonl records that carry both losses as numbers."""
    return [(r["step"], r["loss_on"] - r["loss_off"]) for r in read_jsonl(jsonl)
            if isinstance(r.get("step"), int) and is_number(r.get("loss_on")) and is_number(r.get("loss_off"))]


def rolling_mean(values, width=9):
    """Centered running mean over up to `width` neighbours (fewer at the ends): the per-record gap is noisy."""
    half = width // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def probe_gaps(runs_dir, main_run, csv_out, png_out=None):
    """L_on − L_off over training for the main run and each capacity probe (RUN/echo_diagnostics.jsonl of
    <probe>-s0): the probes ask whether the Echo-on pass gets below L_off at this scale. -> a CSV (run, step,
    gap) and, with matplotlib, a PNG (one curve per run, its running mean bold, 0 marked); {"csv", "png",
    "runs"} or None until a probe has records."""
    curves = {p: gap_curve(Path(runs_dir) / f"{p}-s0" / "echo_diagnostics.jsonl") for p in PROBES}
    curves = {p: c for p, c in curves.items() if c}
    if not curves:
        return None
    curves = {main_run: gap_curve(Path(runs_dir) / main_run / "echo_diagnostics.jsonl"), **curves}
    _write_csv(csv_out, ["run", "step", "gap_on_minus_off"], [[run, s, g] for run, c in curves.items() for s, g in c])
    out = {"csv": shown_path(csv_out), "png": None, "runs": list(curves)}
    plt = pyplot() if png_out else None
    if plt is None:
        return out
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (run, c) in enumerate(curves.items()):
        label = f"{main_run} (main run)" if run == main_run else METHODS[run][3]
        steps, gaps = [s for s, _ in c], [g for _, g in c]
        ax.plot(steps, gaps, lw=0.5, alpha=0.3, color=f"C{i}")
        ax.plot(steps, rolling_mean(gaps), lw=1.8, color=f"C{i}", label=label)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("step"), ax.set_ylabel("L_on − L_off (below 0: the Echo-on pass is better)")
    ax.set_title("capacity probes: can the Echo-on pass get below L_off?", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(png_out).parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, png_out)
    plt.close(fig)
    out["png"] = shown_path(png_out)
    return out


def run_curves(run, csv_out, png_out=None):
    """A run's metrics.jsonl -> CSV (step, loss_off, loss_on, loss_kd, val_loss, val_exact) and, with
    matplotlib, a PNG: the training losses (L_on and L_kd on routed steps) and the validation curve."""
    recs = [r for r in read_jsonl(Path(run) / "metrics.jsonl") if isinstance(r.get("step"), int)]
    if not recs:
        return None
    keys = ["loss_off", "loss_on", "loss_kd", "val_loss", "val_exact"]
    _write_csv(csv_out, ["step"] + keys, [[r["step"]] + [r.get(k) if k != "loss_off" else r.get("loss_off",
                                                                                                 r.get("loss"))
                                                         for k in keys] for r in recs])
    plt = pyplot() if png_out else None
    if plt is None:
        return {"csv": str(csv_out), "png": None, "steps": len(recs)}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in recs]
    a.plot(steps, [r.get("loss_off", r.get("loss")) for r in recs], lw=0.6, label="L_off (the deployable model)")
    routed = [r for r in recs if r.get("loss_on") is not None]
    if routed:
        a.plot([r["step"] for r in routed], [r["loss_on"] for r in routed], lw=0.6, label="L_on (routed steps)")
        a.plot([r["step"] for r in routed], [r.get("loss_kd") for r in routed], lw=0.6, label="L_kd (routed steps)")
    a.set_yscale("log"), a.set_xlabel("step"), a.legend(fontsize=8)
    val = [r for r in recs if r.get("val_loss") is not None]
    if val:
        b.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        b2 = b.twinx()
        b2.plot([r["step"] for r in val], [100 * r.get("val_exact", 0) for r in val], "s--", color="tab:green",
                label="validation exact match (%)")
        b2.set_ylabel("exact match (%)")
        b.legend(fontsize=8, loc="upper left"), b2.legend(fontsize=8, loc="upper right")
    else:
        b.text(0.5, 0.5, "no validation records (train.py --val-split / --eval-every)", ha="center",
               transform=b.transAxes, fontsize=8)
    b.set_xlabel("step")
    fig.suptitle(str(Path(run).name), fontsize=10)
    fig.tight_layout()
    _save_png(fig, png_out)
    plt.close(fig)
    return {"csv": str(csv_out), "png": str(png_out), "steps": len(recs)}


def layer_probs_outputs(runs_dir, names, csv_out, png_out, n, labels):
    """Merge the seed-0 layer curves of lora and echo-lora -> merged CSV, and a PNG with matplotlib."""
    from .common import read_json
    curves, per_task = {}, {}
    for name in names:
        csv_path = find_layer_csv(Path(runs_dir) / f"{name}-s0" / "layer-probs.json")
        if csv_path is None:
            continue
        rows = read_layer_csv(csv_path)
        curves[name] = [float(r["mean"]) for r in rows]
        per_task[name] = {k: [float(r[k]) for r in rows] for k in rows[0] if k not in ("layer", "mean")}
    if not curves:
        return None
    n_layers = max(len(c) for c in curves.values())
    header = ["layer"] + [f"{m}_mean" for m in curves] + [f"{m}_{t}" for m in curves for t in per_task[m]]
    rows = [[layer] + [f"{curves[m][layer]:.6f}" if layer < len(curves[m]) else "" for m in curves] +
            [f"{per_task[m][t][layer]:.6f}" if layer < len(per_task[m][t]) else "" for m in curves for t in per_task[m]]
            for layer in range(n_layers)]
    _write_csv(csv_out, header, rows)
    out = Path(csv_out)
    plt = pyplot()
    if plt is None:
        print(f"matplotlib is not installed: wrote the merged curves to {out} instead of a PNG")
    else:
        out = Path(png_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        echo = (read_json(Path(runs_dir) / "echo-lora-s0" / "config.json") or {}).get("echo") or {}
        for key, color, label in (("target_layers", "tab:green", "Echo targets"),
                                  ("source_layers", "tab:orange", "Echo sources")):
            layers = [layer % n_layers for layer in echo.get(key) or []]
            if layers:
                ax.axvspan(min(layers) - 0.5, max(layers) + 0.5, color=color, alpha=0.12, label=label)
        for m in curves:
            ax.plot(range(len(curves[m])), curves[m], lw=2, label=labels.get(m, m))
        n_tasks = len(next(iter(per_task.values())))
        ax.set_xlabel("layer"), ax.set_ylabel(f"p(gold answer token), mean over {n_tasks} tasks")
        ax.set_title("seed 0: LoRA vs Echo-LoRA", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_png(fig, out, dpi=120)
        plt.close(fig)
        print(f"wrote {out}")
    return {"file": shown_path(out), "n": n, "runs": list(curves)}
