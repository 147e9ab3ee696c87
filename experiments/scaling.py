"""The multi-GPU scaling prediction (on paper until a multi-GPU machine is lent): step time and efficiency on
4 and 8 GPUs from the measured 1-GPU step and the bytes DDP all-reduces per step, over NVLink and over PCIe.

    python -m experiments.scaling                      # results/scaling-prediction.json + README-scaling.md
    python -m experiments.scaling --bench B.jsonl --out DIR    # a trial: DIR/ only, README untouched

The model (a ring all-reduce, no overlap with compute, so a lower bound on efficiency where it matters):
    T_1 = (G / b) · t_b                       G = global batch (16 rows), t_b = measured step at micro-batch b
    T_N = (G / (N · b)) · t_b + T_ar(N)       each GPU runs G / N rows (8B: micro-batch b, fewer of them)
    T_ar(N) = 2 (N − 1)/N · S / B_bus + 2 (N − 1) · α       S = gradient bytes (fp32 adapter [+ Echo])
    efficiency = T_1 / (N · T_N)
For SmolLM2 the per-GPU batch falls below the measured 16 rows; T_N's compute term then assumes time ∝ rows,
which overstates the gain (a 135M step at 2-4 rows is bound by kernel latency, not FLOPs).
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

from echo import EchoConfig
from echo.echo import module_out_dim
from experiments.common import (RESULTS, StepFailed, committed, json_objects, refuse_trial, shown_path,
                                write_atomic)
from model.load import CliParser, HelpFormatter
from model.model import ModelArgs

GLOBAL_BATCH = 16
LINKS = {   # assumed, not measured here: NCCL all-reduce bus bandwidth (bytes/s) and per-hop latency (s)
    "NVLink (H100/H200 SXM, NVSwitch)": (300e9, 8e-6),
    "PCIe Gen5 x16, no NVLink": (20e9, 15e-6),
}
SHAPES = {  # name: (ModelArgs, the benchmark record's model field)
    "SmolLM2-135M": (ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536),
                     "smol-shape"),
    "llama3-8b": (ModelArgs.from_name("llama3-8b"), "llama3-8b"),
}
LORA_MODULES, RANK = ("wq", "wk", "wv", "wo"), 16      # train.py's defaults


def adapter_params(args):
    d_in = {"wq": args.dim, "wk": args.dim, "wv": args.dim, "wo": args.n_heads * args.head_dim}
    return args.n_layers * sum(RANK * (d_in[m] + module_out_dim(args, m)) for m in LORA_MODULES)


def echo_params(args, cfg=EchoConfig()):
    per = lambda d_out: 2 * cfg.bottleneck * args.dim + 2 * d_out * cfg.bottleneck + d_out + 1    # W1 U1, W2 U2, b, λ
    return len(cfg.target_layers) * sum(per(module_out_dim(args, m)) for m in cfg.target_modules)


def allreduce_s(n, size, bandwidth, latency):
    return 2 * (n - 1) / n * size / bandwidth + 2 * (n - 1) * latency


BENCH = RESULTS / "speed" / "benchmark-h200.jsonl"


def bench_model(model):
    """A benchmark line's model as a name: old records hold the GPU machine's path, new ones the name."""
    return Path(str(model)).name


def measured_steps(path=BENCH):
    """{(benchmark model, echo 'off' | 'routed'): (micro-batch rows, ms)} of the whole-step-graph benchmark;
    a damaged line is a StepFailed naming the file, the line and the field."""
    out = {}
    for i, r in json_objects(path, unreadable=": give tests/benchmark.py --json lines with --bench"):
        if r.get("graphs") == "step" and r.get("seq") == 256:
            for k in ("batch", "ms"):
                if not isinstance(r.get(k), (int, float)) or isinstance(r.get(k), bool) or r[k] <= 0:
                    raise StepFailed(f"{path}:{i}: field {k!r} is {r.get(k)!r}, not a positive number")
            out[(bench_model(r.get("model")), r.get("echo"))] = (r["batch"], r["ms"])
    return out


def predict(bench=BENCH):
    steps, rows = measured_steps(bench), []
    for name, (args, bench_name) in SHAPES.items():
        for echo in ("off", "routed"):
            if (bench_name, echo) not in steps:
                raise StepFailed(f"{bench}: no whole-step (graphs step, seq 256) line of model {bench_name} with "
                                 f"echo {echo}")
            b, ms = steps[(bench_name, echo)]
            size = 4 * (adapter_params(args) + (echo_params(args) if echo == "routed" else 0))
            t1 = GLOBAL_BATCH / b * ms / 1e3
            for link, (bandwidth, latency) in LINKS.items():
                for n in (4, 8):
                    compute = GLOBAL_BATCH / (n * b) * ms / 1e3
                    comm = allreduce_s(n, size, bandwidth, latency)
                    rows.append({"model": name, "echo": echo, "link": link, "gpus": n, "measured_ms": ms,
                                 "measured_rows": b, "grad_mib": round(size / 2**20, 2), "t1_ms": round(t1 * 1e3, 2),
                                 "compute_ms": round(compute * 1e3, 2), "allreduce_ms": round(comm * 1e3, 3),
                                 "step_ms": round((compute + comm) * 1e3, 2),
                                 "efficiency": round(t1 / (n * (compute + comm)), 3),
                                 "extrapolated_below_measured_rows": GLOBAL_BATCH / n < b})
    return {"global_batch": GLOBAL_BATCH, "links_assumed": {k: {"bus_bytes_per_s": v[0], "latency_s": v[1]}
                                                           for k, v in LINKS.items()},
            "echo": asdict(EchoConfig()), "lora": {"rank": RANK, "modules": LORA_MODULES}, "rows": rows}


def table(pred):
    L = ["<!-- generated by python -m experiments.scaling from results/scaling-prediction.json: do not edit -->",
         "**Prediction, not a measurement** (global batch 16; 1-GPU step from `results/speed/benchmark-h200.jsonl`; "
         "fp32 gradients of the adapter, plus the Echo weights on routed steps, all-reduced once per step; link "
         "bandwidths assumed as stated in `experiments/scaling.py`):", "",
         "| model | Echo | gradient MiB | 1 GPU ms | link | GPUs | compute ms | all-reduce ms | step ms | efficiency |",
         "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in pred["rows"]:
        star = "*" if r["extrapolated_below_measured_rows"] else ""
        L.append(f"| {r['model']} | {r['echo']} | {r['grad_mib']} | {r['t1_ms']} | {r['link']} | {r['gpus']} | "
                 f"{r['compute_ms']}{star} | {r['allreduce_ms']} | {r['step_ms']} | {r['efficiency']:.0%} |")
    L += ["", "\\* fewer rows per GPU than the measured step: compute assumed ∝ rows, so this overstates the gain."]
    return "\n".join(L) + "\n"


def parse_args(argv=None):
    p = CliParser(prog="python -m experiments.scaling", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--bench", default=shown_path(BENCH), help="tests/benchmark.py --json lines (the 1-GPU steps)")
    p.add_argument("--out", default=shown_path(RESULTS),
                   help="folder for scaling-prediction.json and README-scaling.md; README.md is rewritten only "
                        "at the default, from the default --bench")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)                 # --help and bad flags end here: nothing is read or written
    out = Path(args.out)
    try:
        official = Path(args.bench).resolve() == BENCH.resolve()
        if committed(out / "scaling-prediction.json") and not (official and out.resolve() == RESULTS.resolve()):
            refuse_trial(out / "scaling-prediction.json", f"--bench {args.bench} and --out {args.out} are not "
                         f"{shown_path(BENCH)} and {shown_path(RESULTS)}", "give --out a folder of your own")
        if not out.is_dir():
            raise StepFailed(f"--out {out} is not a folder")
        pred = predict(Path(args.bench))
        write_atomic(out / "scaling-prediction.json", json.dumps(pred, indent=1) + "\n")
        fragment = table(pred)
        write_atomic(out / "README-scaling.md", fragment)
        if out.resolve() == RESULTS.resolve():        # the committed prediction: README shows it
            from experiments.tables import splice_into_readme
            splice_into_readme(fragment, "results/README-scaling.md")
    except StepFailed as e:
        sys.exit(f"error: {e}")
    print(fragment)


if __name__ == "__main__":
    main()
