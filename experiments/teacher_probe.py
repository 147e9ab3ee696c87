"""Teacher probe (analysis only): does the Echo-on teacher of a finished Echo-LoRA/DoRA run know more than the
deployable student? This file owns the probe's decoding loop, its counts and its JSON + Markdown outputs.

    python -m experiments.teacher_probe RUN [--model DIR] [--data-dir DIR] [--limit N] [--device auto] [--out FILE]

Method. The run's base + adapter (loaded as eval.py loads them) decodes the 5 in-format tasks twice, greedily,
with ONE loop (no KV cache: the whole sequence is recomputed for every new token, max 32 new tokens, stop at
EOS), prompts built, left-padded, answers extracted and scored by eval.py's / model.generate's own helpers:
  * student: echo_inject=None: the deployable model (what eval.py measures);
  * teacher: the run's trained EchoModule (echo.load_echo(RUN)) switched on at inference, through training's
    own injection (EchoModule → echo.inject; tests/test_echo_room.py holds the two equal):
        t*  = the last prompt position (left padding: the same column for every row),
        z   = mean_l h_l[t*] over cfg.source_layers, from a forward over the prompt       eq. 2
        δ   = λ (e ⊙ g) per (target layer, module), from z                                eqs. 3-6
        o_t ← o_t + M_t δ  inside every target module                                     eq. 7
        M_t = 1 on the generated positions t > t* only (the answer positions of eq. 8);
    positions ≤ t* are never injected, so their hidden states, and z, stay fixed while decoding, and the
    first generated token is the student's. (A run trained with --echo-all-positions injects every real
    position, as in training; --echo-token-scale runs add (w·x_t)(e ⊙ g), as in training.)
Per task: n, student_correct, teacher_correct, both, only_student, only_teacher and the exact two-sided McNemar
p of the paired difference (experiments.stats.mcnemar_exact); totals over the tasks. The deployed model never
has the Echo path: this measures what the training-time teacher knows, nothing that can be deployed.
Rows too long for the context (prompt + max_new_tokens > max_seq_len) are skipped and counted wrong for both,
as in eval.py. Output: results/<run folder>-teacher-probe.json (-limitN added with --limit) and a Markdown
table beside it (same stem, .md).
"""
import json
import sys
import time
from pathlib import Path

import torch

from .common import DISPLAY, IN_FORMAT, RESULTS, shown_path
from .stats import mcnemar_exact

TITLE = "Echo path at inference (analysis only; the deployed model never has it)"
EVAL_GREEDY_FILES = ("eval-greedy.json", "eval/results-*greedy*.json")


# ----------------------------------------------------------------------------- the Echo path at inference

def teacher_source(model, echo, ids, mask):
    """The Echo-off pass over the left-padded prompts ids/mask [B, T0] -> (cfg.source_layers' residual
    streams, t* [B]): what eq. 2 reads. t* = T0 - 1 (left padding puts every row's last prompt token there)."""
    if echo.n_layers != model.args.n_layers or echo.dim != model.args.dim:
        raise ValueError(f"the Echo module was built for n_layers={echo.n_layers}, dim={echo.dim}; the model has "
                         f"n_layers={model.args.n_layers}, dim={model.args.dim} (another base model?)")
    sources, hiddens = echo.cfg.source_layers, {}
    model.run_layers(model.embed(ids), 0, model.args.n_layers, positions=model.positions_for(ids, mask),
                     attention_mask=mask, hidden_layers=set(sources), hiddens=hiddens)
    boundary = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    return [hiddens[l] for l in sources], boundary


def teacher_inject(echo, source, ids, mask):
    """Training's injection (the EchoModule's eqs. 2-8, echo.inject's eq. 7) for the sequence ids/mask [B, T]:
    labels are −100 up to t*, so M (eq. 8) is 1 on the generated positions t > t*, as on training's answers."""
    from echo.echo import IGNORE
    source_hiddens, boundary = source
    after = torch.arange(ids.shape[1], device=ids.device)[None, :] > boundary[:, None]
    return echo(source_hiddens, boundary, torch.where(after, ids, IGNORE), mask)


def forward_logits(model, ids, mask, echo_inject=None, logits_index=None):
    """One full forward (no KV cache) over ids/mask [B, T], Echo injected where echo_inject says."""
    positions = model.positions_for(ids, mask)
    h = model.run_layers(model.embed(ids), 0, model.args.n_layers, positions=positions, attention_mask=mask,
                         echo_inject=echo_inject)
    return model.head(h, logits_index=logits_index)


@torch.inference_mode()
def greedy_decode(model, prompts, *, echo=None, max_new_tokens=32, eos_ids=(), device=None, keep_logits=False):
    """Greedy decoding of token-id prompts (left-padded into one batch), recomputing the full sequence for each
    new token; echo=None: the student, else the teacher (δ from the prompt, M on the generated positions).
    -> (new-token lists with EOS stripped, per-step logits [B, steps, V] float or None). Rows that ended feed
    token 0, as model.generate does; they cannot change a row's own tokens."""
    from model.generate import _batch
    device = device or next(model.parameters()).device
    ids, mask = _batch(prompts, device)
    B = ids.shape[0]
    source = teacher_source(model, echo, ids, mask) if echo is not None else None
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    out, kept = [], []
    for i in range(max_new_tokens):
        T = ids.shape[1]
        inject = None if echo is None else teacher_inject(echo, source, ids, mask)
        last = torch.full((B, 1), T - 1, dtype=torch.long, device=device)
        logits = forward_logits(model, ids, mask, inject, last)[:, 0].float()
        if keep_logits:
            kept.append(logits.cpu())
        tok = torch.where(done, 0, logits.argmax(dim=-1))
        out.append(tok)
        hit = torch.isin(tok, eos) & ~done
        lengths = torch.where(hit, i, lengths)
        done |= hit
        if bool(done.all()):
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
    rows = torch.stack(out, 1).tolist()
    seqs = [row[:n] for row, n in zip(rows, lengths.tolist())]
    return seqs, (torch.stack(kept, 1) if keep_logits else None)


# ----------------------------------------------------------------------------- one task, both models

def probe_task(model, tokenizer, task, examples, *, echo, template, max_new_tokens=32, batch_size=16,
               device=None, progress=None):
    """-> {"student": records, "teacher": records}: eval.py's prediction records, test-file order. Prompts are
    built and encoded as eval.evaluate_task does; rows too long for the context are skipped for both."""
    from data import build_prompt
    from data.tasks import Progress, score_record
    from model.generate import stop_ids
    prompts = [build_prompt(ex, template, for_eval=True) for ex in examples]
    ids = [tokenizer.encode(p, bos=tokenizer.add_bos) for p in prompts]
    context = model.args.max_seq_len
    order = sorted((i for i in range(len(ids)) if len(ids[i]) + max_new_tokens <= context), key=lambda i: len(ids[i]))
    eos_ids = stop_ids(tokenizer)
    texts = {"student": [None] * len(ids), "teacher": [None] * len(ids)}
    meter = Progress(task.name, len(order), out=progress) if progress else None
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for side, e in (("student", None), ("teacher", echo)):
            seqs, _ = greedy_decode(model, [ids[i] for i in chunk], echo=e, max_new_tokens=max_new_tokens,
                                    eos_ids=eos_ids, device=device)
            for i, s in zip(chunk, seqs):
                texts[side][i] = tokenizer.decode(s, skip_special=True)
        if meter:
            meter.update(start + len(chunk))
    model.train(was_training)
    return {side: [score_record(task, ex, p, c) for ex, p, c in zip(examples, prompts, texts[side])]
            for side in texts}


def paired_counts(student, teacher):
    """Per-example correctness lists -> the counts of the paired comparison and its exact McNemar p."""
    if len(student) != len(teacher):
        raise ValueError(f"paired_counts: {len(student)} student vs {len(teacher)} teacher rows")
    s, t = [bool(x) for x in student], [bool(x) for x in teacher]
    both = sum(a and b for a, b in zip(s, t))
    only_s = sum(a and not b for a, b in zip(s, t))
    only_t = sum(b and not a for a, b in zip(s, t))
    n = len(s)
    return {"n": n, "student_correct": both + only_s, "teacher_correct": both + only_t, "both": both,
            "only_student": only_s, "only_teacher": only_t, "neither": n - both - only_s - only_t,
            "student_accuracy": (both + only_s) / n if n else 0.0,
            "teacher_accuracy": (both + only_t) / n if n else 0.0,
            "delta_points": 100 * (only_t - only_s) / n if n else 0.0,
            "mcnemar_p": mcnemar_exact(only_t, only_s)}


def task_entry(records):
    s, t = records["student"], records["teacher"]
    entry = paired_counts([r["correct"] for r in s], [r["correct"] for r in t])
    entry.update(
        same_response=sum(a["response"] == b["response"] for a, b in zip(s, t) if not a["skipped"]),
        skipped=sum(r["skipped"] for r in s),
        student_unextracted=sum(not r["skipped"] and r["pred"] in ("", None) for r in s),
        teacher_unextracted=sum(not r["skipped"] and r["pred"] in ("", None) for r in t),
        student_per_example="".join("1" if r["correct"] else "0" for r in s),
        teacher_per_example="".join("1" if r["correct"] else "0" for r in t))
    return entry


def totals(tasks):
    """Pooled counts over the tasks (McNemar on the pooled discordant pairs) and the macro-average accuracies."""
    keys = ("n", "student_correct", "teacher_correct", "both", "only_student", "only_teacher", "neither",
            "same_response", "skipped")
    out = {k: sum(t[k] for t in tasks.values()) for k in keys}
    n = out["n"]
    out.update(student_accuracy=out["student_correct"] / n if n else 0.0,
               teacher_accuracy=out["teacher_correct"] / n if n else 0.0,
               delta_points=100 * (out["only_teacher"] - out["only_student"]) / n if n else 0.0,
               mcnemar_p=mcnemar_exact(out["only_teacher"], out["only_student"]),
               student_macro_accuracy=sum(t["student_accuracy"] for t in tasks.values()) / max(len(tasks), 1),
               teacher_macro_accuracy=sum(t["teacher_accuracy"] for t in tasks.values()) / max(len(tasks), 1))
    return out


# ----------------------------------------------------------------------------- eval.py's own greedy results

def eval_greedy_file(run):
    """RUN/eval-greedy.json (experiments) or RUN/eval/results-*greedy*.json (eval.py's default): the one
    covering the most probed tasks, shortest name first; None if none."""
    from .evals import load_eval
    found = []
    for pattern in EVAL_GREEDY_FILES:
        for f in sorted(Path(run).glob(pattern)):
            ev = load_eval(f) if f.is_file() else None
            if ev and ev["tasks"]:
                found.append((f, ev))
    if not found:
        return None
    return max(found, key=lambda fe: (len(set(fe[1]["tasks"]) & set(IN_FORMAT)), -len(fe[0].name)))


def compare_with_eval(run, tasks):
    """The student's accuracy beside eval.py's greedy (KV-cached) accuracy on the same rows: the first n rows
    of its per-example record when it has one, else its whole-task numbers when the row counts match."""
    hit = eval_greedy_file(run)
    if hit is None:
        return None
    path, ev = hit
    out = {"file": shown_path(path), "tasks": {}}
    for name, t in tasks.items():
        e = ev["tasks"].get(name)
        if e is None:
            continue
        n, per = t["n"], e.get("per_example")
        if per is not None and len(per) >= n:
            correct, rows = per[:n].count("1"), n
            agree = sum(a == b for a, b in zip(per[:n], t["student_per_example"]))
        elif e["total"] == n:
            correct, rows, agree = e["correct"], n, None
        else:
            out["tasks"][name] = {"eval_accuracy": e["correct"] / e["total"], "eval_rows": e["total"],
                                  "student_accuracy": t["student_accuracy"], "student_rows": n,
                                  "note": "different rows (no per-example record to align them)"}
            continue
        out["tasks"][name] = {"eval_accuracy": correct / rows if rows else 0.0, "student_accuracy":
                              t["student_accuracy"], "rows": rows, "same_correctness": agree}
    return out


# ----------------------------------------------------------------------------- outputs

def markdown(result):
    lines = [f"**{TITLE}**", "",
             f"Run `{result['run']}`, greedy ({result['settings']['max_new_tokens']} new tokens), "
             f"{result['settings']['limit'] or 'all'} rows per task. Student = base + adapter (deployable); "
             f"teacher = the same with the trained Echo path on (t* = last prompt position, M = generated positions).",
             "", "| task | student % | teacher % | Δ | McNemar p |", "|---|---:|---:|---:|---:|"]
    rows = [(DISPLAY.get(k, k), v) for k, v in result["tasks"].items()] + [("all (pooled)", result["total"])]
    for name, v in rows:
        lines.append(f"| {name} | {100 * v['student_accuracy']:.2f} | {100 * v['teacher_accuracy']:.2f} | "
                     f"{v['delta_points']:+.2f} | {v['mcnemar_p']:.3g} |")
    t = result["total"]
    lines += ["", f"n = {t['n']}; the teacher alone right on {t['only_teacher']}, the student alone on "
                  f"{t['only_student']}; identical responses on {t['same_response']} of {t['n'] - t['skipped']}."]
    return "\n".join(lines) + "\n"


def default_out(run, limit):
    return RESULTS / f"{Path(run).resolve().name}-teacher-probe{f'-limit{limit}' if limit else ''}.json"


# ----------------------------------------------------------------------------- CLI

def build_parser():
    from model.load import DTYPE_NAMES, CliParser, HelpFormatter, dtype_arg
    p = CliParser(prog="python -m experiments.teacher_probe", description=__doc__.split("\n\n")[0],
                  formatter_class=HelpFormatter, epilog="Method and equations: see the module docstring.")
    p.add_argument("run", help="a finished Echo-LoRA/DoRA run folder: adapter/, echo.safetensors, "
                               "echo_config.json, config.json")
    p.add_argument("--model", help="base model dir (default: the run's, as eval.py finds it: RUN/base or "
                                   "config.json's opts.model)")
    p.add_argument("--data-dir", help="folder with <task>/test.json (default: ../shared/data/commonsense)")
    p.add_argument("--tasks", nargs="+", default=IN_FORMAT, choices=IN_FORMAT, metavar="TASK",
                   help=f"tasks to probe, of {' '.join(IN_FORMAT)} (default: all five)")
    p.add_argument("--limit", type=int, metavar="N", help="first N test rows per task (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="greedy tokens per row")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="rows per decoding batch (default: 256 on cuda, 16 on cpu)")
    p.add_argument("--template", help="prompt template (default: the run's, else alpaca)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", type=dtype_arg, choices=list(DTYPE_NAMES),
                   help="model dtype (default: bf16 on cuda, fp32 on cpu); the Echo weights stay fp32")
    p.add_argument("--out", metavar="FILE.json", help="results file; the Markdown table goes beside it as .md "
                   "(default: results/<run folder name>-teacher-probe[-limitN].json)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files (default: refused)")
    return p


def check(args):
    """Everything that can be refused before the model is loaded; fills in the device-dependent defaults."""
    from data.tasks import SHARED
    from model.rundir import base_model_of, run_config
    from model.load import DTYPE_NAMES, check_device
    run = Path(args.run)
    if not run.is_dir():
        raise ValueError(f"run folder {run} not found" if not run.exists() else f"{run} is not a folder")
    cfg = run_config(run)
    opts = cfg.get("opts", {})
    if not cfg:
        raise ValueError(f"{run} has no config.json: not a train.py run folder")
    if not opts.get("echo"):
        raise ValueError(f"{run} is not an Echo run (config.json opts.echo is {opts.get('echo')!r}): it has no "
                         f"teacher to probe")
    for name in ("echo.safetensors", "echo_config.json"):
        if not (run / name).is_file():
            raise ValueError(f"{run} has no {name}: an Echo run writes it when training ends (unfinished run?)")
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ValueError(f"{run} has no adapter/adapter_config.json (unfinished run?)")
    for flag, v in (("--limit", args.limit), ("--batch-size", args.batch_size),
                    ("--max-new-tokens", args.max_new_tokens)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    check_device(args.device)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = DTYPE_NAMES[args.dtype] if args.dtype else ("bfloat16" if cuda else "float32")
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.model = args.model or base_model_of(run, cfg)
    args.template = args.template or opts.get("template") or "alpaca"
    args.data_dir = args.data_dir or (str(SHARED / "data" / "commonsense")
                                      if (SHARED / "data" / "commonsense").exists() else None)
    if args.data_dir is None:
        raise ValueError("--data-dir is needed (no ../shared/data/commonsense here)")
    out = Path(args.out) if args.out else default_out(run, args.limit)
    if out.suffix != ".json":
        raise ValueError(f"--out {out}: name a .json file (the Markdown table goes beside it)")
    for f in (out, out.with_suffix(".md")):
        if f.exists() and not args.force:
            raise ValueError(f"{f} exists: pass --force to overwrite it, or --out OTHER.json")
    args.out = out
    return run, cfg


def run_probe(args, progress=None):
    from echo.echo import load_echo
    from data.tasks import load_task_examples, resolve_task
    from model.generate import load_for_inference
    run, cfg = check(args)
    tasks = [resolve_task(t, args.data_dir) for t in args.tasks]
    examples = {t.name: load_task_examples(t, limit=args.limit) for t in tasks}
    model, tokenizer = load_for_inference(args.model, run / "adapter", args.device, getattr(torch, args.dtype))
    echo = load_echo(run, args.device).eval()
    print(f"teacher probe (analysis only): {run} | model {args.model} | greedy, no KV cache, "
          f"{args.max_new_tokens} new tokens | device {args.device} {args.dtype} | batch {args.batch_size}",
          file=progress or sys.stderr, flush=True)
    entries, started = {}, time.time()
    for t in tasks:
        t0 = time.time()
        records = probe_task(model, tokenizer, t, examples[t.name], echo=echo, template=args.template,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device,
                             progress=progress or sys.stderr)
        entries[t.name] = e = task_entry(records)
        e["seconds"] = round(time.time() - t0, 2)
        print(f"{t.name}: student {e['student_correct']}/{e['n']}, teacher {e['teacher_correct']}/{e['n']} "
              f"(McNemar p {e['mcnemar_p']:.3g})", file=progress or sys.stderr, flush=True)
    result = {
        "what": TITLE, "run": shown_path(run), "model": shown_path(args.model),
        "settings": {"decoding": "greedy (full recompute per token, no KV cache; identical loop for both)",
                     "max_new_tokens": args.max_new_tokens, "limit": args.limit, "template": args.template,
                     "device": str(args.device), "dtype": args.dtype, "batch_size": args.batch_size,
                     "tasks": args.tasks, "t_star": "last prompt position",
                     "mask": "generated positions only (t > t*), eq. 8", "echo": load_echo_config(run),
                     "lambdas": {k: round(m.lam.item(), 6) for k, m in echo.injectors.items()},
                     "seconds": round(time.time() - started, 2)},
        "tasks": entries, "total": totals(entries), "eval_py_greedy": compare_with_eval(run, entries)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    return result


def load_echo_config(run):
    return json.loads((Path(run) / "echo_config.json").read_text()).get("echo")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = run_probe(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
