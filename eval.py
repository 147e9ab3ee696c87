"""Evaluate the deployable model: base + LoRA/DoRA adapter. Echo is off by construction: this file
never imports the echo package and never opens a run's echo.safetensors; the model is built by
model.load.load_model from the base weights and adapter/ alone.

    python eval.py                                    # the built-in default run (python train.py first)
    python eval.py --model DIR --adapter RUN_DIR --tasks boolq piqa --data-dir ../shared/data/commonsense
    python eval.py ... --greedy --limit 100           # fast check
    python eval.py ... --search-boundary 100          # pick K for boundary-layer LoRA dropping
    python eval.py ... --layer-probs 100              # per-layer probability of the gold answer (CSV/PNG)

Protocol (LLM-Adapters / DoRA commonsense_evaluate.py): prompt = data.build_prompt(example, template,
for_eval=True); beam search, 4 beams, max_new_tokens 32; the response is the generated text after the
prompt's "### Response:" (cut at a further "### Response:", as their `split("### Response:")[1]` does),
stripped; the prediction is the FIRST match of the task's regex in it (case-sensitive re.findall(...)[0],
"" if none); accuracy = mean(prediction == answer). GSM8K (LLM-Adapters evaluate.py): commas removed,
the LAST number matching -?\\d+\\.?\\d* is the prediction (inf if none), correct iff |pred - gold| <= 1e-3,
gold = the number after "####".

Boundary-layer LoRA dropping (Chen et al., "Not All LoRA Parameters Are Essential"): with --lora-layers K
only layers < K keep their adapters; layers >= K run as the base model (LoRALinear.enabled = False).
--search-boundary N evaluates every K in 0..n_layers on N validation examples per task and keeps the best.
--layer-probs N: for each layer l, p_l = mean over examples and gold answer tokens y_t of
softmax(head(h_l))[y_t], with head = final RMSNorm + LM head applied to block l's residual output h_l
(teacher forcing on prompt + output); the layer where p_l rises marks the boundary.
"""
import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parent.parent / "shared"
DEFAULT_RUN = Path("runs") / "default"

COMMONSENSE = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
               "openbookqa"]
_CHOICE5 = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {"boolq": r"true|false", "piqa": r"solution1|solution2", "social_i_qa": _CHOICE5,
                   "hellaswag": r"ending1|ending2|ending3|ending4", "winogrande": r"option1|option2",
                   "ARC-Easy": _CHOICE5, "ARC-Challenge": _CHOICE5, "openbookqa": _CHOICE5}
TASKS = COMMONSENSE + ["gsm8k"]
DISPLAY = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
           "gsm8k": "GSM8K"}
ECHO_LINE = "Echo: off (deployable model: base + adapter only; no Echo module built or loaded)"
RESPONSE_MARKER = "### Response:"


# ---------------------------------------------------------------- answers --------------------------------

def extract_choice(pattern, response):
    """First match of `pattern` in the stripped response, '' if none (commonsense_evaluate.py)."""
    found = re.findall(pattern, response.strip())
    return found[0] if found else ""


def extract_number(response):
    """Last number in the response with commas removed, inf if none (LLM-Adapters evaluate.py)."""
    found = re.findall(r"-?\d+\.?\d*", response.replace(",", ""))
    return float(found[-1]) if found else float("inf")


def response_of(completion):
    """The generated text after the prompt's '### Response:' up to any further marker, stripped."""
    return completion.split(RESPONSE_MARKER)[0].strip()


def is_correct(task, pred, answer):
    if task.kind == "number":
        return abs(float(answer) - pred) <= 1e-3
    return pred == answer


def accuracy(flags):
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


# ---------------------------------------------------------------- tasks ----------------------------------

class Task:
    """name, test file, kind ('choice' with a regex, or 'number'), optional train file for validation."""

    def __init__(self, name, path, kind="choice", pattern=None, train_path=None):
        self.name, self.path, self.kind, self.pattern, self.train_path = name, Path(path), kind, pattern, train_path

    def extract(self, response):
        return extract_number(response) if self.kind == "number" else extract_choice(self.pattern, response)


def resolve_task(name, data_dir, run_dir=None):
    """A suite task name (looked up in data_dir), "default" (the built-in task: RUN/data/test.json, scored
    with the answer1..answer5 regex), or a path to an LLM-Adapters-format test .json file (whose regex is
    then the alternation of its distinct answers, longest first)."""
    if name == "default":
        path = Path(run_dir or DEFAULT_RUN) / "data" / "test.json"
        if not path.exists():
            raise FileNotFoundError(f"task 'default': {path} not found (written by `python train.py`)")
        return Task("default", path, "choice", _CHOICE5, path.with_name("train.json")
                    if path.with_name("train.json").exists() else None)
    if name in ANSWER_PATTERNS:
        if data_dir is None:
            raise FileNotFoundError(f"task {name!r} needs --data-dir (no ../shared/data/commonsense here)")
        path = Path(data_dir) / name / "test.json"
        if not path.exists():
            raise FileNotFoundError(f"task {name!r}: {path} not found")
        train = path.with_name("train.json")
        return Task(name, path, "choice", ANSWER_PATTERNS[name], train if train.exists() else None)
    if name == "gsm8k":
        candidates = [Path(data_dir) / "gsm8k" / f for f in ("test.jsonl", "test.json")] if data_dir else []
        candidates += [Path(data_dir).parent / "gsm8k" / "test.jsonl"] if data_dir else []
        candidates += [SHARED / "data" / "gsm8k" / "test.jsonl"]
        for path in candidates:
            if path.exists():
                train = path.with_name("train.jsonl")
                return Task(name, path, "number", None, train if train.exists() else None)
        raise FileNotFoundError(f"task 'gsm8k': none of {', '.join(map(str, candidates))} exists")
    path = Path(name)
    if path.suffix in (".json", ".jsonl") and path.is_file():
        train = path.with_name("train" + path.suffix)
        return Task(path.parent.name or path.stem, path, "choice", None, train if train.exists() else None)
    raise ValueError(f"unknown task {name!r} (choose from {', '.join(TASKS)}, default, "
                     f"or a path to a test .json file)")


def load_task_examples(task, path=None, limit=None):
    """Examples {instruction, input, output, answer} from the task's file (or `path`), validated."""
    from data import load_examples
    path = Path(path or task.path)
    if task.kind == "number":
        examples = _load_gsm8k(path)
    else:
        examples = load_examples(path)
        for n, ex in enumerate(examples, 1):
            if not ex["answer"]:
                raise ValueError(f"{path}: row {n} has no 'answer'")
    if task.pattern is None and task.kind == "choice":
        answers = sorted({ex["answer"] for ex in examples}, key=lambda a: (-len(a), a))
        task.pattern = "|".join(re.escape(a) for a in answers)
    return examples[:limit] if limit is not None else examples


def _load_gsm8k(path):
    from data.dataset import _read_rows
    examples = []
    for where, row in _read_rows(path):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                and isinstance(row.get("answer"), str) and "####" in row["answer"]):
            raise ValueError(f"{where}: expected {{\"question\": str, \"answer\": str ending in '#### N'}}")
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        try:
            float(gold)
        except ValueError:
            raise ValueError(f"{where}: answer after '####' is not a number: {gold!r}") from None
        examples.append({"instruction": row["question"], "input": "", "output": row["answer"], "answer": gold})
    if not examples:
        raise ValueError(f"no examples in {path}")
    return examples


def validation_examples(task, n, seed=0):
    """n examples sampled (seed 0) from the task's train file; the test file when it has none."""
    source = task.train_path or task.path
    if task.train_path is None:
        print(f"  note: {task.name} has no train file; validation examples come from its test set")
    examples = load_task_examples(task, source)
    return random.Random(seed).sample(examples, min(n, len(examples)))


# ---------------------------------------------------------------- evaluation -----------------------------

def evaluate_task(model, tokenizer, task, examples, *, template="alpaca", num_beams=4, max_new_tokens=32,
                  batch_size=16, device=None, log_every=0):
    """-> (accuracy, records). Prompts sorted by length for batching; records in the input order."""
    from data import build_prompt
    from model.generate import generate

    prompts = [build_prompt(ex, template, for_eval=True) for ex in examples]
    ids = [tokenizer.encode(p, bos=tokenizer.add_bos) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    completions = [None] * len(ids)
    t0, done = time.time(), 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, text in zip(chunk, generate(model, tokenizer, [ids[i] for i in chunk], num_beams=num_beams,
                                           max_new_tokens=max_new_tokens, device=device)):
            completions[i] = text
        done += len(chunk)
        if log_every and (done // log_every != (done - len(chunk)) // log_every or done == len(order)):
            print(f"  {task.name}: {done}/{len(order)} ({time.time() - t0:.0f}s)", flush=True)
    records = []
    for ex, prompt, completion in zip(examples, prompts, completions):
        response = response_of(completion)
        pred = task.extract(response)
        correct = is_correct(task, pred, ex["answer"])
        if task.kind == "number" and not math.isfinite(pred):
            pred = None                                               # no number in the response
        records.append({**ex, "prompt": prompt, "response": response, "pred": pred, "correct": correct})
    return accuracy([r["correct"] for r in records]), records


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


def merge_enabled_adapters(model):
    """Fold every ENABLED adapter into its base weight (disabled ones stay out, as when unmerged)."""
    from model.lora import lora_linears
    for _, m in lora_linears(model):
        if m.enabled:
            m.merge()


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


def write_layer_probs(curves, out_dir):
    """curves: {task: tensor [n_layers]} → out_dir/layer_probs.csv (+ .png when matplotlib is installed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(curves)
    mean = torch.stack([curves[t] for t in names]).mean(0)
    lines = ["layer," + ",".join(names) + ",mean"]
    for l in range(len(mean)):
        lines.append(f"{l}," + ",".join(f"{curves[t][l].item():.6f}" for t in names) + f",{mean[l].item():.6f}")
    (out_dir / "layer_probs.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'layer_probs.csv'}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipped layer_probs.png")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in names:
        ax.plot(range(len(mean)), curves[t].numpy(), label=DISPLAY.get(t, t), alpha=0.6)
    ax.plot(range(len(mean)), mean.numpy(), "k-", lw=2, label="mean")
    ax.set_xlabel("layer"), ax.set_ylabel("p(gold answer token)"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "layer_probs.png", dpi=120)
    print(f"wrote {out_dir / 'layer_probs.png'}")


def search_boundary(model, tokenizer, tasks, n, decode_kw):
    """Evaluate every K in 0..n_layers on n validation examples per task (decode_kw(task) -> generation
    settings); -> (best K, {K: mean accuracy}). Ties go to the smallest K (fewest adapter layers)."""
    val = {t.name: validation_examples(t, n) for t in tasks}
    curve = {}
    for k in range(model.args.n_layers + 1):
        set_lora_layers(model, k)
        curve[k] = sum(evaluate_task(model, tokenizer, t, val[t.name], **decode_kw(t))[0] for t in tasks) / len(tasks)
        print(f"  K={k:3d}  acc={100 * curve[k]:6.2f}", flush=True)
    best = max(curve, key=lambda k: (curve[k], -k))
    return best, curve


def format_table(label, results):
    """The paper's layout: one row, per-task accuracy (%) and the average."""
    names = [DISPLAY.get(t, t) for t in results] + ["Avg."]
    values = [100 * r["accuracy"] for r in results.values()]
    values.append(sum(values) / len(values) if values else 0.0)
    width = max(len(label), 6)
    head = f"{'Method':<{width}} " + " ".join(f"{n:>{max(len(n), 6)}}" for n in names)
    row = f"{label:<{width}} " + " ".join(f"{v:>{max(len(n), 6)}.1f}" for n, v in zip(names, values))
    return head + "\n" + row


# ---------------------------------------------------------------- CLI ------------------------------------

def find_adapter_dir(path):
    path = Path(path)
    for d in (path / "adapter", path):
        if (d / "adapter_config.json").exists():
            return d
    raise FileNotFoundError(f"--adapter {path}: no adapter_config.json in {path}/adapter or {path}")


def run_config(run_dir):
    cfg = Path(run_dir) / "config.json"
    if not cfg.exists():
        return {}
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: invalid JSON ({e.msg})") from None


def base_model_of(run_dir, cfg):
    """The run's base model: run_dir/base/ (the default run's tiny model, saved by train.py) or the
    model train.py was given (config.json "opts"."model")."""
    if (Path(run_dir) / "base" / "params.json").exists():
        return str(Path(run_dir) / "base")
    model = cfg.get("opts", {}).get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"{run_dir}: cannot tell the base model (no base/ folder, no opts.model in config.json);"
                         f" pass --model")
    return model


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model dir (params.json, tokenizer, weights); default: the run's")
    p.add_argument("--adapter", help="run folder (holding adapter/) or adapter folder; default runs/default "
                                     "when neither --model nor --adapter is given")
    p.add_argument("--tasks", nargs="+", help=f"{' '.join(TASKS)} or test .json paths "
                                              "(default: the run's data/test.json, else the commonsense suite)")
    p.add_argument("--data-dir", help="folder with <task>/test.json (default ../shared/data/commonsense)")
    p.add_argument("--template", help="prompt template (default: the run's, else alpaca)")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (num_beams 1): fast mode")
    p.add_argument("--max-new-tokens", type=int, help="default 32 (256 for gsm8k)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="first N test examples per task (0: skip the test evaluation)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first")
    p.add_argument("--lora-layers", type=int, help="keep adapters only in layers < K (boundary dropping)")
    p.add_argument("--search-boundary", type=int, metavar="N", help="pick K on N validation examples per task")
    p.add_argument("--layer-probs", type=int, metavar="N", help="per-layer gold-answer probability on N examples")
    p.add_argument("--out", help="output folder (default: RUN/eval, or runs/eval-base without an adapter)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(args):
    from model.load import load_model

    for name in args.tasks or []:                 # fail on a typo before loading anything
        if name not in TASKS + ["default"] and not (Path(name).suffix in (".json", ".jsonl") and Path(name).is_file()):
            resolve_task(name, None)
    run_dir, cfg = None, {}
    if args.adapter is None and args.model is None:
        if not (DEFAULT_RUN / "adapter" / "adapter_config.json").exists():
            state = "has no adapter/ yet" if DEFAULT_RUN.exists() else "not found"
            raise FileNotFoundError(f"{DEFAULT_RUN} {state}: run `python train.py` first "
                                    f"(or pass --model DIR [--adapter RUN_DIR])")
        args.adapter = str(DEFAULT_RUN)
    if args.adapter is not None:
        adapter_dir = find_adapter_dir(args.adapter)
        run_dir = Path(args.adapter) if adapter_dir != Path(args.adapter) else adapter_dir
        cfg = run_config(run_dir)
    else:
        adapter_dir = None
    model_path = args.model or base_model_of(run_dir, cfg)
    template = args.template or cfg.get("opts", {}).get("template") or "alpaca"
    data_dir = args.data_dir or (str(SHARED / "data" / "commonsense") if (SHARED / "data" / "commonsense").exists()
                                 else None)
    if args.tasks:
        task_names = args.tasks
    elif run_dir is not None and (run_dir / "data" / "test.json").exists():
        task_names = ["default"]
    else:
        task_names = COMMONSENSE
    tasks = [resolve_task(t, data_dir, run_dir) for t in task_names]
    if args.merge and args.search_boundary:
        raise ValueError("--merge and --search-boundary are exclusive (the search toggles unmerged adapters)")
    num_beams = 1 if args.greedy else args.num_beams
    if num_beams < 1:
        raise ValueError(f"--num-beams must be >= 1, got {num_beams}")

    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(model_path, adapter_dir=adapter_dir, device=args.device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"model {model_path!r} has no tokenizer: pass a model directory")
    model.eval()
    # The deployable model holds base + adapter weights only (a subprocess test also checks that this
    # file never imports the echo package nor opens echo.safetensors).
    if any("echo" in name for name, _ in model.named_parameters()):
        raise RuntimeError("an Echo parameter was built: eval must measure the deployable model")
    out_dir = Path(args.out) if args.out else (run_dir / "eval" if run_dir else Path("runs") / "eval-base")
    method = "base"
    if adapter_dir is not None:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        method = f"{acfg['method'].upper().replace('LORA', 'LoRA').replace('DORA', 'DoRA')} r={acfg['rank']}"
    print(ECHO_LINE)
    print(f"model {model_path} | adapter {adapter_dir or 'none'} | template {template} | "
          f"{'greedy' if num_beams == 1 else f'beam search ({num_beams} beams)'} | device {args.device} {args.dtype}")

    def decode_kw(task):
        return dict(template=template, num_beams=num_beams, batch_size=args.batch_size, device=args.device,
                    max_new_tokens=args.max_new_tokens or (256 if task.kind == "number" else 32))

    lora_layers = args.lora_layers
    if args.search_boundary:
        print(f"boundary search: K = 0..{model.args.n_layers} on {args.search_boundary} validation examples/task")
        lora_layers, curve = search_boundary(model, tokenizer, tasks, args.search_boundary, decode_kw)
        print(f"best K = {lora_layers} ({100 * curve[lora_layers]:.2f}); the test evaluation uses it")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "boundary_curve.json").write_text(json.dumps({"curve": curve, "best": lora_layers}, indent=1))
    if lora_layers is not None:
        set_lora_layers(model, lora_layers)
        method += f" K={lora_layers}"
    if args.merge:
        merge_enabled_adapters(model)
        method += " merged"

    if args.layer_probs:
        curves = {}
        for t in tasks:
            curves[t.name] = layer_probs(model, tokenizer, validation_examples(t, args.layer_probs),
                                         template=template, batch_size=args.batch_size, device=args.device)
            print(f"  {t.name}: " + " ".join(f"{p:.3f}" for p in curves[t.name].tolist()))
        write_layer_probs(curves, out_dir)

    if args.limit == 0:
        return
    results = {}
    for t in tasks:
        examples = load_task_examples(t, limit=args.limit)
        started = time.time()
        acc, records = evaluate_task(model, tokenizer, t, examples, log_every=max(args.batch_size * 10, 1),
                                     **decode_kw(t))
        seconds = time.time() - started
        results[t.name] = {"accuracy": acc, "correct": sum(r["correct"] for r in records), "total": len(records),
                           "seconds": round(seconds, 2), "examples_per_s": round(len(records) / max(seconds, 1e-9), 2)}
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"predictions_{t.name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"{t.name}: {results[t.name]['correct']}/{len(records)} = {100 * acc:.2f}%", flush=True)
    average = sum(r["accuracy"] for r in results.values()) / len(results)
    summary = {"echo": "off", "model": str(model_path), "adapter": str(adapter_dir) if adapter_dir else None,
               "template": template, "num_beams": num_beams, "max_new_tokens": args.max_new_tokens,
               "lora_layers": lora_layers, "merged": args.merge, "limit": args.limit, "dtype": args.dtype,
               "tasks": results, "average": average}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print()
    print(format_table(method, results))
    print(f"\nwrote {out_dir / 'results.json'} and predictions_<task>.jsonl")


if __name__ == "__main__":
    main()
