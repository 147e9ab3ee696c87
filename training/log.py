"""The run's record: metrics.jsonl (one line per step), echo_diagnostics.jsonl (every N routed steps), the
progress line, FLOPs and MFU, summary.json's figures; where a non-finite loss and a stop request are noticed.
"""
import json
import math
import time

import torch

from echo import echo_objective, uses_answer_window
from training.checkpoint import atomic_file, last_checkpoint
from training.graphs import StatsOnHost

STATS = ("sum_off", "sum_on", "sum_kd", "tokens", "padded_tokens", "stop")   # one step's device-side stats


def kept_lines(path, start_step):
    """A resumed run keeps the lines of path up to its checkpoint's step (a torn last line counts as unwritten)."""
    return [l for l in path.read_text().splitlines() if parsed_step(l) <= start_step] if path.exists() else []


class Log:
    """metrics.jsonl (one line per step), echo_diagnostics.jsonl and the progress line. On GPU a step's stats are read one
    step late, so the loop never waits for the device; on CPU a step is synchronous and read at once.
    Also where a non-finite loss and a stop request (Ctrl-C / SIGTERM on any rank) are noticed — from
    stats summed over ranks, so every rank notices them at the same step.

    tokens_per_s counts real (non-padding) tokens over the log window; padded_tokens_per_s counts
    every position the GPU computed. Steps that met a new batch shape (compile / CUDA-graph capture)
    are warm-up: their time is reported apart and left out of the steady rate and the ETA."""

    def __init__(self, run, start_step, before=None):
        self.run, self.pending = run, None
        self.file = self.diagnostics = None
        self.routed_before, kept = 0, []     # routed steps before start_step (kept in metrics.jsonl)
        if run.master:
            self.file, kept = self.open_jsonl(run.out / "metrics.jsonl", start_step)
            self.routed_before = sum(json.loads(l).get("routed", False) for l in kept)
            if run.echo is not None:
                self.diagnostics, _ = self.open_jsonl(run.out / "echo_diagnostics.jsonl", start_step)
        # the run's figures before start_step: the checkpoint's totals (older checkpoints: from the kept lines)
        self.before = before or (totals_of_lines(kept) if kept else NO_TOTALS)
        self.peak, self.n_params = peak_flops(run.device), count_weights(run.model)
        self.flops = {}                      # step_flops per batch shape, computed once (rank 0, with a peak)
        self.shapes, self.warmup_s, self.steady = set(), 0.0, {"s": 0.0, "steps": 0, "tokens": 0, "padded": 0}
        self.by_shape = {}                   # steady steps per batch shape: the benchmark's side-by-side
        self.started = time.perf_counter()
        self.window = {"since": self.started, "tokens": 0, "padded": 0, "flops": 0.0}
        self.last_end = self.started
        self.stop_signal = 0
        self.routing = []                    # this run's r_k, compared across ranks at the end

    def open_jsonl(self, path, start_step):
        """path opened for appending, holding only the lines a resumed run keeps; -> (file, those lines)."""
        kept = kept_lines(path, start_step) if self.run.opts.resume else []
        atomic_file(path, lambda tmp: tmp.write_text("".join(l + "\n" for l in kept)))
        return open(path, "a"), kept

    def step(self, record, stats, shape):
        """Called after each optimizer step with its record, device stats and batch shape."""
        now = time.perf_counter()
        record["seconds"], self.last_end = now - self.last_end, now
        self.routing.append(record["routed"])
        record["warmup"] = shape not in self.shapes
        record["shape"] = shape
        self.shapes.add(shape)
        record["stats"] = StatsOnHost(stats)
        if self.pending is not None:
            self.finish(self.pending)
        self.pending = record
        if not self.run.cuda:
            self.flush()

    def flush(self):
        if self.pending is not None:
            self.finish(self.pending)
            self.pending = None

    def finish(self, record):
        stats = dict(zip(STATS, record.pop("stats").tolist()))
        n, routed = record["answer_tokens"], record["routed"]
        record["loss_off"] = stats["sum_off"] / n
        if self.run.echo is not None:
            record["loss_on"] = stats["sum_on"] / n if routed else None
            record["loss_kd"] = stats["sum_kd"] / n if routed else None
        record["loss"] = echo_objective(record["loss_off"], record.get("loss_on"), record.get("loss_kd"), routed,
                                        self.run.echo.cfg.lambda_kd if self.run.echo else 1.0)     # eq. 11
        record["tokens"], record["padded_tokens"] = int(stats["tokens"]), int(stats["padded_tokens"])
        self.stop_signal = max(self.stop_signal, int(stats["stop"]))
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"non-finite loss {record['loss']} at step {record['step']} (try a lower --lr); "
                                     f"{last_checkpoint(self.run)}")
        shape = record.pop("shape")
        if record["warmup"]:
            self.warmup_s += record["seconds"]
        else:
            for acc in (self.steady, self.by_shape.setdefault(shape, {"s": 0.0, "steps": 0, "tokens": 0, "padded": 0})):
                acc.update(s=acc["s"] + record["seconds"], steps=acc["steps"] + 1, tokens=acc["tokens"] + record["tokens"],
                           padded=acc["padded"] + record["padded_tokens"])
        if self.run.master:
            self.write(record, self.step_flops(shape) if self.peak else 0.0)

    def step_flops(self, shape):
        """step_flops of a batch shape (routing, micro-batches), computed the first time it is met."""
        if shape not in self.flops:
            self.flops[shape] = step_flops(self.run.model, self.run.echo, shape[0], shape[1:], self.n_params)
        return self.flops[shape]

    def write(self, record, flops):
        run, w, now = self.run, self.window, time.perf_counter()
        w["tokens"] += record["tokens"]
        w["padded"] += record["padded_tokens"]
        w["flops"] += flops
        elapsed = max(now - w["since"], 1e-9)
        record["tokens_per_s"] = round(w["tokens"] / elapsed, 1)
        record["padded_tokens_per_s"] = round(w["padded"] / elapsed, 1)
        record["padding"] = round(1 - record["tokens"] / max(record["padded_tokens"], 1), 4)
        if self.peak:
            record["mfu"] = round(w["flops"] / elapsed / self.peak, 4)     # this rank's FLOPs on its GPU
        if run.cuda:
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        diagnostics = record.pop("echo_diagnostics", None)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if diagnostics:
            line = {k: record[k] for k in ("step", "p", "loss_off", "loss_on", "loss_kd")}
            self.diagnostics.write(json.dumps({**line, "modules": diagnostics}) + "\n")
            self.diagnostics.flush()
        if record["step"] % run.opts.log_every == 0 or record["step"] in (1, run.total_steps) or "val_loss" in record:
            print(self.line(record), flush=True)
            w.update(since=now, tokens=0, padded=0, flops=0.0)

    def line(self, r):
        run = self.run
        left = run.total_steps - r["step"]
        per_step = self.steady["s"] / self.steady["steps"] if self.steady["steps"] else None
        parts = [f"step {r['step']}/{run.total_steps}", f"loss {r['loss_off']:.4f}"]     # the deployable model's
        if run.echo is not None:
            parts.append("(Echo: " + (f"on {r['loss_on']:.4f} kd {r['loss_kd']:.4f}, " if r["routed"] else "")
                         + f"p {r['p']:.2f}{' routed' if r['routed'] else ''})")
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f} exact {r['val_exact']:.1%}")
        parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s'] / 1e3:.1f}k tok/s (pad {r['padding']:.0%})"]
        parts += [f"mfu {r['mfu']:.1%}"] if "mfu" in r else []
        parts += [f"mem {r['peak_gib']:.1f}G"] if "peak_gib" in r else []
        parts.append(f"eta {left * per_step / 60:.1f}m" if per_step else "eta after warm-up")   # compiles skew it
        return " | ".join(parts)

    def totals(self):
        """The whole run up to the last finished step: this process's figures added to those of the stretches
        before a resume (self.before). Saved in each checkpoint; summary.json is made from it."""
        b, peak = self.before, None
        if self.run.cuda:
            peak = max(torch.cuda.max_memory_allocated(self.run.device) / 2**30, b["peak_gib"] or 0.0)
        by_shape = {k: dict(v) for k, v in b["by_shape"].items()}
        for k, v in self.by_shape.items():
            by_shape[k] = add_counts(by_shape.get(k), v)
        return {"train_seconds": b["train_seconds"] + time.perf_counter() - self.started,
                "warmup_seconds": b["warmup_seconds"] + self.warmup_s, "steady": add_counts(b["steady"], self.steady),
                "by_shape": by_shape, "shapes": b["shapes"] | self.shapes, "peak_gib": peak,
                "stretches": b["stretches"] + 1}

    def close(self):
        for f in (self.file, self.diagnostics):
            if f:
                f.close()


NO_TOTALS = {"train_seconds": 0.0, "warmup_seconds": 0.0, "steady": {"s": 0.0, "steps": 0, "tokens": 0, "padded": 0},
             "by_shape": {}, "shapes": set(), "peak_gib": None, "stretches": 0}


def totals_of_lines(lines):
    """Log.totals as far as metrics.jsonl lines tell it (a checkpoint from before checkpoints held totals): the
    steps' time and tokens; the batch shapes and the peak memory are not in the lines."""
    steps = [json.loads(l) for l in lines]
    steady = [m for m in steps if not m.get("warmup")]
    return {**NO_TOTALS, "train_seconds": sum(m.get("seconds", 0.0) for m in steps),
            "warmup_seconds": sum(m.get("seconds", 0.0) for m in steps if m.get("warmup")),
            "steady": {"s": sum(m.get("seconds", 0.0) for m in steady), "steps": len(steady),
                       "tokens": sum(m.get("tokens", 0) for m in steady),
                       "padded": sum(m.get("padded_tokens", 0) for m in steady)}, "stretches": 1}


def add_counts(a, b):
    """Two {"s", "steps", "tokens", "padded"} tallies added (a None: b alone)."""
    return {k: (a or {}).get(k, 0) + v for k, v in b.items()}


def summary_of(run, totals):
    """summary.json: the whole run (every stretch of it, however often it was resumed), from Log.totals."""
    s = totals["steady"]
    rate = lambda n: round(n / s["s"], 1) if s["s"] else None
    return {"steps": run.total_steps, "train_seconds": round(totals["train_seconds"], 1),
            "warmup_seconds": round(totals["warmup_seconds"], 1), "tokens_per_s": rate(s["tokens"]),
            "padded_tokens_per_s": rate(s["padded"]), "batch_shapes": len(totals["shapes"]),
            "micro_batch": run.opts.micro_batch, "world_size": run.world,
            "peak_gib": round(totals["peak_gib"], 2) if totals["peak_gib"] is not None else None,
            "device": torch.cuda.get_device_name(run.device) if run.cuda else "cpu",
            "method": run.opts.method, "echo": run.echo is not None, "stretches": totals["stretches"],
            "steady_by_shape": [{"routed": k[0], "micro_batches": [list(mb) for mb in k[1:]], "steps": v["steps"],
                                 "ms": round(1000 * v["s"] / v["steps"], 2), "padded_tokens": v["padded"],
                                 "tokens": v["tokens"]}
                                for k, v in sorted(totals["by_shape"].items(), key=lambda kv: -kv[1]["steps"])]}


def step_flops(model, echo, routed, micro_batches, n_params=None):
    """For MFU: the FLOPs of one optimizer step over micro-batches [(B, T, P), ...] (batch_shape's). 4·N
    per position and pass (forward 2N, activation gradients 2N; the frozen weights get no weight
    gradient). A routed step's Echo-on pass runs the layers from the first target up, on the answer
    window (B·P positions; see echo_loss) or, when it recomputes every position, on all B·T.
    n_params: N, when the caller counted it once (the log calls this every step)."""
    n_params = n_params or count_weights(model)
    flops = 0.0
    for B, T, P in micro_batches:
        flops += 4 * n_params * B * T
        if routed and echo is not None:
            layers = 1.0 if echo.cfg.separate_passes else 1 - echo.cfg.target_layers[0] / model.args.n_layers
            flops += 4 * n_params * layers * B * (P if uses_answer_window(echo.cfg) else T)
    return flops


def count_weights(model):
    """N for the FLOPs: the model's logical weights, an NF4 weight counted as the d_out × d_in matrix it
    stands for (its 4-bit buffers are not parameters), so an NF4 model counts as its plain twin."""
    return sum(w.numel() for _, w in model.named_weights())


def parsed_step(line):
    """The step of a metrics.jsonl line; a line torn by a crash mid-write counts as never written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def peak_flops(device):
    """Dense bf16 peak of the GPU (for MFU); None on CPU or unknown GPUs."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312), ("L40", 181), ("4090", 165)):
        if key in name:
            return tflops * 1e12
    return None
