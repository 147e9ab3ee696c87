"""Evaluate the deployable model: base + LoRA/DoRA adapter. Echo is off by construction: this file
never imports the echo package and never opens a run's echo.safetensors; the model is built by
model.load.load_model from the base weights and adapter/ alone.

    python eval.py                                    # the built-in default run (python train.py first)
    python eval.py --model DIR --adapter RUN_DIR --tasks boolq piqa --data-dir ../shared/data/commonsense
    python eval.py ... --greedy --limit 100           # fast check (the default is 4-beam search)
    python eval.py ... --search-boundary 100          # pick K for boundary-layer LoRA dropping
    python eval.py ... --layer-probs 100              # per-layer probability of the gold answer (CSV/PNG)

Protocol (LLM-Adapters / DoRA commonsense_evaluate.py), the default: prompt = data.build_prompt(example,
template, for_eval=True); beam search, 4 beams, max_new_tokens 32 (--greedy: 1 beam, the fast mode); the
response is the generated text after the prompt's "### Response:" (cut at a further "### Response:", as
their `split("### Response:")[1]` does), stripped; the prediction is the FIRST match of the task's regex
in it (case-sensitive re.findall(...)[0], "" if none: counted as "unextracted"); accuracy =
mean(prediction == answer). GSM8K (LLM-Adapters evaluate.py): commas removed, the LAST number matching
-?\\d+\\.?\\d* is the prediction (inf if none), correct iff |pred - gold| <= 1e-3, gold = the number
after "####".

Too-long prompts: a row whose prompt tokens + max_new_tokens exceed the model's context (max_seq_len) is
not generated; it is SKIPPED and COUNTED WRONG, so `total` is always the whole test set and accuracies
stay comparable with the published ones. Each task's result carries `skipped`; the table shows them.

Results: RUN/eval/results-<settings>.json (runs/eval-base/<model folder name>/ without an adapter), named
after the tasks, decoding and the options that change the numbers (e.g. results-commonsense-beam4.json,
results-boolq+piqa-greedy-limit100.json), so runs with other settings never overwrite each other;
--out FILE.json puts it elsewhere. A results file (or a side file) that already exists is refused before
anything is evaluated, unless --force; side files without their results file (an evaluation that failed or was
stopped) are replaced. Beside it: <stem>-predictions/<task>.jsonl (every prompt, response, prediction),
<stem>-boundary.json, <stem>-layer_probs.csv/.png. Every file is written to a temp file and renamed into place
(a full disk: one line naming the file, no truncated file left). The results JSON records no path of this
machine: model, adapter and test files relative to the run folder (else the repository, else "<outside>/NAME"),
beside their content fingerprints. Progress goes to stderr.

Boundary-layer LoRA dropping (Chen et al., "Not All LoRA Parameters Are Essential"): with --lora-layers K
only layers < K keep their adapters; layers >= K run as the base model (LoRALinear.enabled = False).
--search-boundary N evaluates every K in 0..n_layers on N validation examples per task and keeps the best.
The validation examples are never rows the adapter trained on: they come from the run's held-out rows
(train.py --val-split F: data.holdout_indices over the run's --data files, or its --val-data files), or
from --val-data FILE here; a row belongs to the task whose folder name its file lies in
(.../boolq/train.json -> boolq), also when one task of a run trained on several is evaluated, so each row is
scored with its own task's regex. A run without held-out rows is refused.
--layer-probs N: for each layer l, p_l = mean over examples and gold answer tokens y_t of
softmax(head(h_l))[y_t], with head = final RMSNorm + LM head applied to block l's residual output h_l
(teacher forcing on prompt + output); the layer where p_l rises marks the boundary. It uses the same
validation rows when the run has them, else (an analysis, not a model choice) the task's train file.

4-bit base (QLoRA): an adapter trained with train.py --base-format nf4 records it in adapter_config.json, and
eval loads the base the same way (frozen linears quantised to NF4 while loading, dequantised in each forward);
a run's base/ folder already holds dequant(W) and loads plain. --base-format overrides either, with a warning
when it disagrees (an NF4-trained adapter on a plain base is a real but different model). The header says which.
"""
import dataclasses
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

from data.tasks import (ANSWER_PATTERNS, COMMONSENSE, DEFAULT_RUN, DISPLAY, SHARED, TASKS,  # noqa: F401
                        Progress, Task, accuracy, extract_choice, extract_number, is_correct,
                        load_task_examples, resolve_task, response_of, score_record, task_key)
from model.generate import choose_base_format, find_adapter_dir
from model.io import atomic_write, atomic_write_text, check_writable, folder_fingerprints, fingerprint, record_path
from model.rundir import base_model_of, run_config, run_paths  # noqa: F401

ECHO_LINE = "Echo: off (deployable model: base + adapter only; no Echo module built or loaded)"
REPO = Path(__file__).resolve().parent
SKIP_RULE = "prompt tokens + max_new_tokens > the model's context: not generated, counted wrong"

# ---------------------------------------------------------------- validation rows ------------------------

def heldout_files(run_cfg, val_data, run_dir=None):
    """-> (what, [(file, rows)]) of validation rows the adapter never trained on, or None when there are
    none: --val-data files, else the run's --val-data files, else the run's held-out rows
    (data.holdout_indices over its --data files concatenated in order, its --val-split and --seed).
    The run's paths are read as config.json records them (model.rundir.run_paths)."""
    from data import load_examples
    opts = run_cfg.get("opts", {})
    if val_data or opts.get("val_data"):
        files = val_data or run_paths(run_cfg, run_dir, "val_data", "--val-data FILE")
        return ("--val-data" if val_data else "the run's --val-data"), [(f, load_examples(f)) for f in files]
    fraction = opts.get("val_split") or 0
    if fraction <= 0:
        return None
    from data.dataset import holdout_indices
    files = run_paths(run_cfg, run_dir, "data", "--val-data FILE")
    per_file = [(f, load_examples(f)) for f in files]
    owner = [(f, ex) for f, rows in per_file for ex in rows]         # the order train.py concatenates in
    held = holdout_indices(len(owner), fraction, opts.get("seed", 0)).tolist()
    by_file = {f: [] for f in files}
    for i in held:
        by_file[owner[i][0]].append(owner[i][1])
    return f"the run's held-out rows (--val-split {fraction})", list(by_file.items())


def validation_sets(tasks, n, run_cfg, val_data, flag, required=True, run_dir=None):
    """{task name: n examples (seed 0)} from heldout_files, each file's rows going to the task of its folder
    name (rows_of_task). required=False: None when there are none."""
    found = heldout_files(run_cfg, val_data, run_dir)
    if found is None:
        if required:
            raise ValueError(f"{flag}: the run has no held-out validation rows (its config.json has no val_split "
                             f"> 0 nor val_data), and sampling the training rows would pick K on data the adapter "
                             f"has seen: train with --val-split 0.05, or pass --val-data FILE")
        return None
    what, files = found
    sets = {}
    for t in tasks:
        rows = rows_of_task(t, tasks, files, what, flag)
        for k, ex in enumerate(rows, 1):
            if t.kind == "choice" and not ex["answer"]:
                raise ValueError(f"{flag}: validation row {k} of task {t.name!r} has no 'answer'")
        sets[t.name] = random.Random(0).sample(rows, min(n, len(rows)))
    print(f"validation examples from {what}: " + ", ".join(f"{t} {len(v)}" for t, v in sets.items()))
    return sets


def rows_of_task(task, tasks, files, what, flag):
    """The rows of `files` ([(file, rows)]) that belong to `task`: those of the files in its folder
    (.../boolq/train.json -> boolq), so each row is scored with its own task's regex. Evaluating one task,
    files in no suite task's folder also go to it, when they all share one folder (a single --val-data file);
    a file of another suite task never does."""
    own = [ex for f, rows in files if Path(f).parent.name == task_key(task) for ex in rows]
    if own or len(tasks) > 1:
        if not own:
            raise ValueError(f"{flag}: {what} hold no rows for task {task.name!r}: a file belongs to a task by its "
                             f"folder name (.../{task_key(task)}/train.json); files: "
                             f"{', '.join(str(f) for f, _ in files)}")
        return own
    foreign = [(f, rows) for f, rows in files if Path(f).parent.name not in TASKS]
    folders = {Path(f).parent.name for f, _ in foreign}
    if len(folders) != 1:
        why = "several folders" if folders else "other tasks' folders only"
        raise ValueError(f"{flag}: cannot tell which of {what} belong to task {task.name!r} ({why}: "
                         f"{', '.join(str(f) for f, _ in files)}); a file belongs to a task by its folder name "
                         f"(.../{task_key(task)}/train.json), or pass --val-data FILE")
    return [ex for _, rows in foreign for ex in rows]


def train_file_examples(task, n, seed=0):
    """n examples sampled from the task's train file (its test file when it has none): --layer-probs only,
    when the run holds no validation rows."""
    if task.train_path is None:
        print(f"  note: {task.name} has no train file; layer-probs examples come from its test set")
    examples = load_task_examples(task, task.train_path or task.path)
    return random.Random(seed).sample(examples, min(n, len(examples)))


# ---------------------------------------------------------------- evaluation -----------------------------

def evaluate_task(model, tokenizer, task, examples, *, template="alpaca", num_beams=4, max_new_tokens=32,
                  batch_size=16, device=None, progress=False):
    """-> (accuracy, records), records in the input order. Prompts run sorted by length so a batch holds
    similar lengths (little padding); rows too long for the context are skipped (counted wrong)."""
    from data import build_prompt
    from model.generate import generate

    prompts = [build_prompt(ex, template, for_eval=True) for ex in examples]
    ids = [tokenizer.encode(p, bos=tokenizer.add_bos) for p in prompts]
    context = getattr(getattr(model, "args", None), "max_seq_len", None)
    fits = [context is None or len(i) + max_new_tokens <= context for i in ids]
    order = sorted((i for i in range(len(ids)) if fits[i]), key=lambda i: len(ids[i]))
    completions = [None] * len(ids)
    meter = Progress(task.name, len(order)) if progress else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        texts = generate(model, tokenizer, [ids[i] for i in chunk], num_beams=num_beams,
                         max_new_tokens=max_new_tokens, device=device)
        for i, text in zip(chunk, texts):
            completions[i] = text
        if meter:
            meter.update(start + len(chunk))
    records = [score_record(task, ex, prompt, completion)
               for ex, prompt, completion in zip(examples, prompts, completions)]
    return accuracy([r["correct"] for r in records]), records


def task_result(records, seconds, max_new_tokens):
    """The per-task entry of results.json (a reproduction script reads these keys)."""
    correct, total = sum(bool(r["correct"]) for r in records), len(records)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0,
            "unextracted": sum(not r["skipped"] and r["pred"] in ("", None) for r in records),
            "skipped": sum(r["skipped"] for r in records), "max_new_tokens": max_new_tokens,
            "seconds": round(seconds, 2), "examples_per_s": round(total / max(seconds, 1e-9), 2)}


def set_lora_layers(model, k):
    """Boundary-layer dropping: adapters stay on in layers < k, off (base model) in layers >= k."""
    from model.lora import LoRALinear
    n = model.args.n_layers
    if not 0 <= k <= n:
        raise ValueError(f"--lora-layers {k} out of range 0..{n} for a {n}-layer model")
    for i, layer in enumerate(model.layers):
        for m in layer.modules():
            if isinstance(m, LoRALinear):
                m.enabled = i < k


@torch.no_grad()
def merge_with_drift(model, probe_len=16):
    """merge_enabled_adapters, reporting what the merge costs in the model's dtype: (max |Δlogit| merged
    vs unmerged, max |Δlogit| adapter vs base) on 2 x probe_len random ids (seed 0). Merging rounds
    W + ΔW to the weight dtype, and in bf16 that ulp can exceed a small adapter's ΔW entries."""
    from model.lora import lora_linears
    ids = torch.randint(0, model.args.vocab_size, (2, min(probe_len, model.args.max_seq_len)),
                        generator=torch.Generator().manual_seed(0)).to(model.tok_embeddings.weight.device)
    enabled = [m for _, m in lora_linears(model) if m.enabled]
    unmerged = model(ids).float()
    for m in enabled:
        m.enabled = False
    base = model(ids).float()
    for m in enabled:
        m.enabled = True
    merge_enabled_adapters(model)
    merged = model(ids).float()
    return (merged - unmerged).abs().max().item(), (unmerged - base).abs().max().item()


def merge_enabled_adapters(model):
    """Fold every ENABLED adapter into its base weight (disabled ones stay out, as when unmerged). An NF4 W
    becomes dequant(W) + ΔW in the model's compute dtype (the dtype its forward feeds the matmul)."""
    from model.lora import lora_linears
    for _, m in lora_linears(model):
        if m.enabled:
            m.merge()       # an NF4 W: in the model's dtype (merge's default, NF4Weight.dtype follows it)


@torch.no_grad()
def layer_probs(model, tokenizer, examples, *, template="alpaca", batch_size=16, device=None):
    """-> tensor [n_layers]: mean over examples of the mean prob of the gold answer tokens read out at
    each layer (module docstring). Answer tokens = the shortest suffix of encode(output) whose decoding
    contains the answer string (the whole output if none does)."""
    from data import build_prompt
    device = device or next(model.parameters()).device
    n_layers = model.args.n_layers
    model.eval()                                                       # no LoRA dropout
    rows = []
    for ex in examples:
        prompt = tokenizer.encode(build_prompt(ex, template, for_eval=False), bos=tokenizer.add_bos)
        target = tokenizer.encode(ex["output"])
        k = next((k for k in range(1, len(target) + 1) if ex["answer"] and ex["answer"] in
                  tokenizer.decode(target[-k:])), len(target))
        ids = prompt + target
        rows.append((ids, list(range(len(ids) - k - 1, len(ids) - 1))))   # logit t predicts token t+1
    total = torch.zeros(n_layers, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T, P = max(len(r[0]) for r in chunk), max(len(r[1]) for r in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)
        index = torch.zeros(len(chunk), P, dtype=torch.long)
        weight = torch.zeros(len(chunk), P, dtype=torch.float64)
        for b, (seq, pos) in enumerate(chunk):                         # right padding
            ids[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), True
            index[b, :len(pos)], weight[b, :len(pos)] = torch.tensor(pos), 1.0 / len(pos)
        gold = ids.gather(1, index + 1)
        ids, mask, index, gold = ids.to(device), mask.to(device), index.to(device), gold.to(device)
        _, hiddens = model(ids, attention_mask=mask, hidden_layers=range(n_layers), logits_index=index[:, :1])
        for l, h in enumerate(hiddens):
            probs = model.head(h, logits_index=index).float().softmax(-1)     # final norm + LM head
            p = probs.gather(-1, gold[..., None])[..., 0].double().cpu()
            total[l] += (p * weight).sum()
    return total / len(rows)


def write_layer_probs(curves, csv_path):
    """curves: {task: tensor [n_layers]} → csv_path (+ the same name .png when matplotlib is installed)."""
    csv_path, png_path = Path(csv_path), Path(csv_path).with_suffix(".png")
    names = list(curves)
    mean = torch.stack([curves[t] for t in names]).mean(0)
    lines = ["layer," + ",".join(names) + ",mean"]
    for l in range(len(mean)):
        lines.append(f"{l}," + ",".join(f"{curves[t][l].item():.6f}" for t in names) + f",{mean[l].item():.6f}")
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    print(f"wrote {csv_path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: skipped {png_path}")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in names:
        ax.plot(range(len(mean)), curves[t].numpy(), label=DISPLAY.get(t, t), alpha=0.6)
    ax.plot(range(len(mean)), mean.numpy(), "k-", lw=2, label="mean")
    ax.set_xlabel("layer"), ax.set_ylabel("p(gold answer token)"), ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print(f"wrote {png_path}")


def search_boundary(model, tokenizer, tasks, val, decode_kw):
    """Evaluate every K in 0..n_layers on the validation examples val[task name] (decode_kw(task) ->
    generation settings); -> (best K, {K: mean accuracy}). Ties go to the smallest K (fewest adapters)."""
    curve = {}
    for k in range(model.args.n_layers + 1):
        set_lora_layers(model, k)
        curve[k] = sum(evaluate_task(model, tokenizer, t, val[t.name], **decode_kw(t))[0] for t in tasks) / len(tasks)
        print(f"  K={k:3d}  acc={100 * curve[k]:6.2f}", flush=True)
    best = max(curve, key=lambda k: (curve[k], -k))
    return best, curve


# ---------------------------------------------------------------- results --------------------------------

def run_echo(run_cfg):
    """Whether the run trained with Echo (train.py config.json: opts.echo, or a non-null "echo" section);
    None when there is no config to tell."""
    if "echo" in run_cfg.get("opts", {}):
        return bool(run_cfg["opts"]["echo"])
    if "echo" in run_cfg:
        return run_cfg["echo"] is not None
    return None


def method_label(adapter_cfg, run_cfg):
    """The table's row label: base, LoRA r=16, DoRA r=16, Echo-LoRA r=16, Echo-DoRA r=16."""
    if adapter_cfg is None:
        return "base"
    kind = {"lora": "LoRA", "dora": "DoRA"}.get(adapter_cfg["method"], adapter_cfg["method"])
    return f"{'Echo-' if run_echo(run_cfg) else ''}{kind} r={adapter_cfg['rank']}"


def results_tag(task_names, args, base_format="plain"):
    """The settings that change the numbers, as a file-name part: tasks, decoding, then the options given
    (and nf4 for a 4-bit base, flag or not: its numbers are not the plain base's)."""
    names = [re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(t).parent.name if t.endswith((".json", ".jsonl")) else t)
             for t in task_names]
    tasks = "commonsense" if task_names == COMMONSENSE else "+".join(names)
    if len(tasks) > 40:
        tasks = f"{len(names)}tasks-{hashlib.sha1(' '.join(task_names).encode()).hexdigest()[:8]}"
    parts = [tasks, "greedy" if args.num_beams == 1 else f"beam{args.num_beams}"]
    parts += [f"new{args.max_new_tokens}"] if args.max_new_tokens else []
    parts += [f"limit{args.limit}"] if args.limit else []
    parts += [f"K{args.lora_layers}"] if args.lora_layers is not None else []
    parts += [f"searchK{args.search_boundary}"] if args.search_boundary else []
    parts += ["merged"] if args.merge else []
    parts += [args.template] if args.template else []
    parts += [args.dtype] if args.dtype != "float32" else []
    parts += ["nf4"] if base_format == "nf4" else []
    return "-".join(parts)


def format_table(label, results):
    """The paper's layout: one row, per-task accuracy (%) and the average; a second row counts the
    skipped (too long, counted wrong) examples when there are any."""
    names = [DISPLAY.get(t, t) for t in results] + ["Avg."]
    widths = [max(len(n), 6) for n in names]
    values = [100 * r["accuracy"] for r in results.values()]
    values.append(sum(values) / len(values) if values else 0.0)
    width = max(len(label), 7)
    lines = [f"{'Method':<{width}} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths)),
             f"{label:<{width}} " + " ".join(f"{v:>{w}.1f}" for v, w in zip(values, widths))]
    skipped = [r.get("skipped", 0) for r in results.values()]
    if any(skipped):
        skipped.append(sum(skipped))
        lines.append(f"{'skipped':<{width}} " + " ".join(f"{s:>{w}d}" for s, w in zip(skipped, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI ------------------------------------

def build_parser():
    from model.load import DTYPE_NAMES, CliParser, HelpFormatter, dtype_arg
    cuda = torch.cuda.is_available()
    p = CliParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                  epilog="Protocol, results files, skipped rows, validation rows: see eval.py's docstring.")
    p.add_argument("--model", help="base model dir: params.json, tokenizer, weights (default: the run's base model)")
    p.add_argument("--adapter", help="run folder (holding adapter/) or adapter folder (default: runs/default when "
                                     "neither --model nor --adapter is given, else none: the base model)")
    p.add_argument("--tasks", nargs="+", help=f"{' '.join(TASKS)}, default, or test .json paths "
                                              "(default: the run's data/test.json, else the 8 commonsense tasks)")
    p.add_argument("--data-dir", help="folder with <task>/test.json (default: ../shared/data/commonsense)")
    p.add_argument("--template", help="prompt template (default: the run's, else alpaca)")
    p.add_argument("--num-beams", type=int, help="beam search width (default: 4, the published protocol)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding, i.e. 1 beam: the fast mode "
                                                         "(default: off, 4-beam search)")
    p.add_argument("--max-new-tokens", type=int, help="default: 32 (256 for gsm8k)")
    p.add_argument("--batch-size", type=int,
                   help="prompts per generate call; beam search runs beams x this rows "
                        "(default: 256 rows on cuda, i.e. 256 // num_beams prompts; 16 on cpu)")
    p.add_argument("--limit", type=int, help="first N test examples per task; 0: no test evaluation, only "
                                             "--search-boundary / --layer-probs (default: all)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first (default: off)")
    p.add_argument("--lora-layers", type=int, metavar="K",
                   help="keep adapters only in layers < K (default: all layers)")
    p.add_argument("--search-boundary", type=int, metavar="N", help="pick K on N held-out validation examples per "
                                                                    "task (default: off)")
    p.add_argument("--layer-probs", type=int, metavar="N", help="per-layer gold-answer probability on N examples "
                                                                "per task (default: off)")
    p.add_argument("--val-data", nargs="+", metavar="FILE", help="validation files for --search-boundary / "
                   "--layer-probs, matched to tasks by folder name (default: the run's held-out rows)")
    p.add_argument("--out", metavar="FILE.json", help="results file (default: RUN/eval/results-<settings>.json, "
                                                      "runs/eval-base/<model name>/... without an adapter)")
    p.add_argument("--force", action="store_true", help="overwrite a results file (and its side files) that "
                                                        "already exists (default: off, refused before evaluating)")
    p.add_argument("--device", default="cuda" if cuda else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", type=dtype_arg, choices=list(DTYPE_NAMES),
                   help="base weight / compute dtype; bfloat16, float16, float32, float64 are accepted too "
                        "(default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--base-format", choices=["plain", "nf4"],
                   help="storage of the frozen linears: plain, or nf4 (QLoRA's 4-bit base, as train.py --base-format "
                        "nf4) (default: the adapter's recorded base_format, else plain; a run's base/ folder, "
                        "already dequant(W), loads plain)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_args(args):
    """Flag errors before anything is loaded; fills in the device-dependent defaults."""
    from model.load import DTYPE_NAMES, check_device
    check_device(args.device)
    if args.greedy and args.num_beams not in (None, 1):
        raise ValueError(f"--greedy means 1 beam; it contradicts --num-beams {args.num_beams}: drop one")
    args.num_beams = 1 if args.greedy else (4 if args.num_beams is None else args.num_beams)
    cuda = str(args.device).startswith("cuda")
    # On a GPU a decoding step costs about the same for 16 or 256 rows (kernel-launch bound), so fill 256 rows.
    args.batch_size = (max(256 // args.num_beams, 1) if cuda else 16) if args.batch_size is None else args.batch_size
    args.dtype = DTYPE_NAMES[args.dtype] if args.dtype else ("bfloat16" if cuda else "float32")  # torch's name
    for flag, value, low in (("--num-beams", args.num_beams, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--limit", args.limit, 0),
                             ("--lora-layers", args.lora_layers, 0), ("--search-boundary", args.search_boundary, 1),
                             ("--layer-probs", args.layer_probs, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}" + (" (omit it for all examples)"
                                                                        if flag == "--limit" else ""))
    if args.limit == 0 and not (args.search_boundary or args.layer_probs):
        raise ValueError("--limit 0 skips the test evaluation: it needs --search-boundary or --layer-probs")
    if args.merge and args.search_boundary:
        raise ValueError("--merge and --search-boundary are exclusive (the search toggles unmerged adapters)")
    if args.lora_layers is not None and args.search_boundary:
        raise ValueError("--lora-layers K and --search-boundary N are exclusive (the search picks K)")
    if args.val_data and not (args.search_boundary or args.layer_probs):
        raise ValueError("--val-data is used by --search-boundary / --layer-probs only: add one of them")
    if args.out and not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: name a .json results file (predictions and curves go beside it)")
    for name in args.tasks or []:                 # fail on a typo before loading anything
        if name not in TASKS + ["default"] and not (Path(name).suffix in (".json", ".jsonl") and Path(name).is_file()):
            resolve_task(name, None)


@dataclasses.dataclass
class Setup:
    """Everything eval resolves from the flags and the run folder before loading the model."""
    run_dir: object            # Path or None (no adapter, or a bare adapter folder)
    run_cfg: dict              # the run's config.json ({} if none)
    adapter_dir: object        # Path or None
    adapter_cfg: object        # adapter_config.json or None
    model_path: str
    template: str
    task_names: list
    tasks: list
    results_path: Path
    base_format: str = "plain"  # plain | nf4: how the frozen linears are stored (model.generate.resolve_base_format)
    base_why: str = ""         # where that choice came from, for the header


def find_run(adapter):
    """--adapter RUN or RUN/adapter or a bare adapter folder -> (run folder or None, adapter folder)."""
    adapter_dir = find_adapter_dir(adapter)
    if adapter_dir != Path(adapter):
        return Path(adapter), adapter_dir
    parent = adapter_dir.parent
    return (parent if (parent / "config.json").exists() else None), adapter_dir


def resolve_setup(args):
    if args.adapter is None and args.model is None:
        if not (DEFAULT_RUN / "adapter" / "adapter_config.json").exists():
            state = "has no adapter/ yet" if DEFAULT_RUN.exists() else "not found"
            raise FileNotFoundError(f"{DEFAULT_RUN} {state}: run `python train.py` first "
                                    f"(or pass --model DIR [--adapter RUN_DIR])")
        args.adapter = str(DEFAULT_RUN)
    run_dir, adapter_dir, run_cfg, adapter_cfg = None, None, {}, None
    if args.adapter is not None:
        run_dir, adapter_dir = find_run(args.adapter)
        run_cfg = run_config(run_dir) if run_dir else {}
        from model.lora import read_adapter_config
        adapter_cfg = read_adapter_config(adapter_dir)        # types and values checked, one line naming the key
    if (args.search_boundary or args.lora_layers is not None) and adapter_dir is None:
        raise ValueError("--search-boundary / --lora-layers drop adapter layers: pass --adapter")
    model_path = args.model or base_model_of(run_dir or adapter_dir, run_cfg)
    base_format, base_why = choose_base_format(args.base_format, adapter_cfg, model_path, adapter_dir)
    data_dir = args.data_dir or (str(SHARED / "data" / "commonsense") if (SHARED / "data" / "commonsense").exists()
                                 else None)
    if args.tasks:
        task_names = args.tasks
    elif run_dir is not None and (run_dir / "data" / "test.json").exists():
        task_names = ["default"]
    else:
        task_names = COMMONSENSE
    tasks = [resolve_task(t, data_dir, run_dir) for t in task_names]
    out_dir = (run_dir or adapter_dir) / "eval" if adapter_dir else Path("runs") / "eval-base" / model_name(model_path)
    tag = results_tag(task_names, args, base_format)
    results_path = Path(args.out) if args.out else out_dir / f"results-{tag}.json"
    template = args.template or run_cfg.get("opts", {}).get("template") or "alpaca"
    return Setup(run_dir, run_cfg, adapter_dir, adapter_cfg, str(model_path), template, task_names, tasks,
                 results_path, base_format, base_why)


def model_name(model_path):
    """A model as a folder name under runs/eval-base/: its folder's name (a preset: its name), e.g. llama3-8b;
    a run's base/ folder is named after the run (runs/x/base -> x-base)."""
    path = Path(model_path)
    name = f"{path.parent.name}-base" if path.name == "base" and path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "model"


def output_files(setup, args):
    """Every file this evaluation will write: the results file, its predictions, boundary and layer-probs files."""
    files = []
    if args.limit != 0:
        files.append(setup.results_path)
        files += [side_file(setup, "-predictions") / f"{t.name}.jsonl" for t in setup.tasks]
    if args.search_boundary:
        files.append(side_file(setup, "-boundary.json"))
    if args.layer_probs:
        files += [side_file(setup, "-layer_probs.csv"), side_file(setup, "-layer_probs.png")]
    return files


def check_outputs(setup, args):
    """Before anything is loaded or evaluated: the results file is not a folder, its folder can be written, and
    no finished evaluation's file that this one writes exists already (unless --force)."""
    flag = f"--out {args.out}" if args.out else f"results file {setup.results_path} (--out chooses another)"
    if setup.results_path.is_dir():
        raise ValueError(f"{flag} is a folder: name a .json results file, e.g. {setup.results_path / 'results.json'}")
    check_writable(setup.results_path, flag)
    existing = [f for f in output_files(setup, args) if f.exists()]
    # The results file, written last, marks a finished evaluation; side files without it are what one that
    # failed (a full disk) or was stopped left behind, and are replaced. With --limit 0 they are the results.
    finished = existing if args.limit == 0 or setup.results_path.exists() else []
    if finished and not args.force:
        more = f" (and {len(finished) - 1} more)" if len(finished) > 1 else ""
        raise ValueError(f"{finished[0]}{more} exists from an earlier evaluation: pass --force to overwrite it, "
                         f"or --out OTHER.json")
    for f in existing:
        if f.is_dir():
            raise ValueError(f"{f} is a folder: it cannot be overwritten by a file; move it or choose another --out")


def load_deployable(setup, args):
    """Base + adapter, eval mode. The deployable model holds base + adapter weights only (a subprocess
    test also checks that this file never imports the echo package nor opens echo.safetensors)."""
    from model.generate import load_for_inference
    from model.load import torch_dtype
    model, tokenizer = load_for_inference(setup.model_path, setup.adapter_dir, args.device, torch_dtype(args.dtype),
                                          setup.base_format)
    if any("echo" in name for name, _ in model.named_parameters()):
        raise RuntimeError("an Echo parameter was built: eval must measure the deployable model")
    return model, tokenizer


def decode_settings(args, setup, task):
    return dict(template=setup.template, num_beams=args.num_beams, batch_size=args.batch_size, device=args.device,
                max_new_tokens=args.max_new_tokens or (256 if task.kind == "number" else 32))


def side_file(setup, suffix):
    """<results stem><suffix> beside the results file: -predictions, -boundary.json, -layer_probs.csv."""
    return setup.results_path.with_name(setup.results_path.stem + suffix)


def configure_adapters(model, tokenizer, setup, args, val):
    """--search-boundary / --lora-layers / --merge -> (K or None, the table label)."""
    label = method_label(setup.adapter_cfg, setup.run_cfg)
    lora_layers = args.lora_layers
    if args.search_boundary:
        print(f"boundary search: K = 0..{model.args.n_layers} on {args.search_boundary} validation examples/task")
        lora_layers, curve = search_boundary(model, tokenizer, setup.tasks, val,
                                             lambda t: decode_settings(args, setup, t))
        print(f"best K = {lora_layers} ({100 * curve[lora_layers]:.2f}); the test evaluation uses it")
        atomic_write_text(side_file(setup, "-boundary.json"), json.dumps(
            {"curve": curve, "best": lora_layers, "examples": {t: len(v) for t, v in val.items()}}, indent=1))
    if lora_layers is not None:
        set_lora_layers(model, lora_layers)
        label += f" K={lora_layers}"
    if args.merge:
        drift, effect = merge_with_drift(model)
        print(f"merge drift ({str(model.tok_embeddings.weight.dtype).replace('torch.', '')}): max |Δlogit| "
              f"{drift:.4g} between merged and unmerged on a fixed probe (the adapter itself moves logits by up to "
              f"{effect:.4g}); if they are close, evaluate unmerged or with --dtype float32", flush=True)
        label += " merged"
    return lora_layers, label


def run_layer_probs(model, tokenizer, setup, args):
    sets = validation_sets(setup.tasks, args.layer_probs, setup.run_cfg, args.val_data, "--layer-probs",
                           required=False, run_dir=setup.run_dir)
    sets = sets or {t.name: train_file_examples(t, args.layer_probs) for t in setup.tasks}
    curves = {}
    for t in setup.tasks:
        curves[t.name] = layer_probs(model, tokenizer, sets[t.name], template=setup.template,
                                     batch_size=args.batch_size, device=args.device)
        print(f"  {t.name}: " + " ".join(f"{p:.3f}" for p in curves[t.name].tolist()))
    write_layer_probs(curves, side_file(setup, "-layer_probs.csv"))


def evaluate_suite(model, tokenizer, setup, args):
    """Every task's test rows -> {task: task_result}; predictions written as each task ends."""
    results = {}
    pred_dir = side_file(setup, "-predictions")
    for t in setup.tasks:
        examples = load_task_examples(t, limit=args.limit)
        kw = decode_settings(args, setup, t)
        started = time.time()
        _, records = evaluate_task(model, tokenizer, t, examples, progress=True, **kw)
        results[t.name] = r = task_result(records, time.time() - started, kw["max_new_tokens"])
        atomic_write_text(pred_dir / f"{t.name}.jsonl", "".join(json.dumps(rec) + "\n" for rec in records))
        skipped = f", {r['skipped']} skipped (too long, counted wrong)" if r["skipped"] else ""
        print(f"{t.name}: {r['correct']}/{r['total']} = {100 * r['accuracy']:.2f}% "
              f"({r['unextracted']} unextracted{skipped}; {r['examples_per_s']} examples/s)", flush=True)
    return results


def write_results(setup, args, results, lora_layers, label):
    seconds = sum(r["seconds"] for r in results.values())
    total = sum(r["total"] for r in results.values())
    acfg = setup.adapter_cfg or {}
    summary = {
        "echo": "off", "label": label, **recorded_inputs(setup),
        "method": acfg.get("method", "base"), "rank": acfg.get("rank"), "echo_trained": run_echo(setup.run_cfg),
        "template": setup.template, "decoding": "greedy" if args.num_beams == 1 else f"beam{args.num_beams}",
        "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens or 32, "lora_layers": lora_layers,
        "merged": args.merge, "limit": args.limit, "device": str(args.device), "dtype": args.dtype,
        "base_format": setup.base_format,
        "batch_size": args.batch_size, "seconds": round(seconds, 2),
        "examples_per_s": round(total / max(seconds, 1e-9), 2), "skip_rule": SKIP_RULE,
        "tasks": results, "average": sum(r["accuracy"] for r in results.values()) / len(results)}
    atomic_write_text(setup.results_path, json.dumps(summary, indent=1) + "\n")
    print()
    print(format_table(label, results))
    print(f"\nwrote {shown(setup.results_path)} and {shown(side_file(setup, '-predictions'))}/<task>.jsonl")


def shown(path):
    """A path as the log prints it: relative to the working folder when inside it (a log kept with the results
    then carries no machine path), else as given."""
    if path is None:
        return "none"
    inside = record_path(path, Path.cwd())
    return str(path) if inside.startswith("<outside>") else inside


def recorded_inputs(setup):
    """What was evaluated, as the results JSON records it: paths relative to the run folder or the repository
    (model.io.record_path; never this machine's absolute paths) and the content fingerprints that identify
    the model, the adapter and each task's test file."""
    roots = [r for r in (setup.run_dir or setup.adapter_dir, REPO) if r is not None]
    recorded = lambda path: record_path(path, *roots, repository=REPO)        # noqa: E731
    model_dir = Path(setup.model_path)
    return {"model": recorded(model_dir) if model_dir.exists() else setup.model_path,     # (a preset: its name)
            "adapter": recorded(setup.adapter_dir),
            "run": record_path(setup.run_dir, REPO, Path.cwd(), repository=REPO),
            "paths": "relative to the run folder, else the repository (../: beside it); <outside>/FOLDER/NAME: "
                     "elsewhere",
            "fingerprints": {"model": folder_fingerprints(model_dir) if model_dir.is_dir() else model_dir.name,
                             "adapter": folder_fingerprints(setup.adapter_dir) if setup.adapter_dir else None,
                             "data": {t.name: [recorded(t.path), fingerprint(t.path)] for t in setup.tasks}}}


def run(args):
    check_args(args)
    setup = resolve_setup(args)
    check_outputs(setup, args)
    val = None                        # the validation rows before loading: a refusal should come fast
    if args.search_boundary:
        val = validation_sets(setup.tasks, args.search_boundary, setup.run_cfg, args.val_data, "--search-boundary",
                              run_dir=setup.run_dir)
    model, tokenizer = load_deployable(setup, args)
    print(ECHO_LINE)
    print(f"model {shown(setup.model_path)} | adapter {shown(setup.adapter_dir)} | template {setup.template} | "
          f"{'greedy' if args.num_beams == 1 else f'beam search ({args.num_beams} beams)'} | "
          f"device {args.device} {args.dtype} | batch {args.batch_size} | base {setup.base_format} ({setup.base_why})")
    lora_layers, label = configure_adapters(model, tokenizer, setup, args, val)
    if args.layer_probs:
        run_layer_probs(model, tokenizer, setup, args)
    if args.limit == 0:
        return
    write_results(setup, args, evaluate_suite(model, tokenizer, setup, args), lora_layers, label)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:      # FileNotFoundError, PermissionError included
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
