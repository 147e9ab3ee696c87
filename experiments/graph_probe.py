"""GPU probe of compile determinism (analysis, not a test): do CUDA graphs (per block, whole step) train like the
compiled step without graphs, and does a GPU resume end bit-identical? Prints one line per comparison.

    python -m experiments.graph_probe        # on a CUDA machine; ~3 minutes on an H200
"""
import json, runpy, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
from safetensors.torch import load_file

if not torch.cuda.is_available():
    sys.exit("error: experiments.graph_probe compares CUDA graphs: it needs a CUDA GPU")
import training.graphs
from model import ModelArgs, Transformer
from training.checkpoint import save_base
from model.tokenizer import ByteTokenizer

root = Path(tempfile.mkdtemp())
torch.manual_seed(0)
save_base(Transformer(ModelArgs.from_name("tiny", vocab_size=259)), ByteTokenizer(), root / "base")
rows = [{"instruction": f"repeat {i}", "input": "", "output": "ab" * (1 + i % 5), "answer": ""} for i in range(16)]
(root / "ds.json").write_text(json.dumps(rows))

def argv(out, *extra):
    return ["--model", str(root / "base"), "--data", str(root / "ds.json"), "--out", str(out), "--template", "alpaca-short",
            "--max-len", "64", "--dtype", "fp32", "--device", "cuda", "--dropout", "0", "--global-batch", "4", "--max-steps", "8",
            "--lr", "1e-2", "--warmup-steps", "1", "--seed", "3", "--echo", "--echo-targets", "1", "--echo-sources", "2", "3",
            "--echo-p-start", "1", "--echo-p-end", "0", "--compile", *extra]

def train_py(args):
    """train.py run as a script, in this process (not imported): a bug planted in training.* before the call is
    what its `from training... import` binds to, and dynamo's caches are the ones reset() clears."""
    saved, sys.argv = sys.argv, [str(ROOT / "train.py"), *args]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        sys.argv = saved

def run(name, *extra, reset=True):
    if reset:
        torch._dynamo.reset()
    out = root / name
    train_py(argv(out, *extra))
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return out, m

def diff(a, b):
    (oa, ma), (ob, mb) = a, b
    ta, tb = load_file(str(oa / "adapter" / "adapter.safetensors")), load_file(str(ob / "adapter" / "adapter.safetensors"))
    ad = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    ld = max(abs(x[k] - y[k]) for x, y in zip(ma, mb) for k in ("loss_off", "loss_on", "loss_kd") if x[k] is not None)
    return f"adapter max|d| {ad:.3e}  loss max|d| {ld:.3e}"

t0 = time.time()
off = run("off", "--cuda-graphs", "off", reset=False)
blk_noreset = run("blk_noreset", "--cuda-graphs", "blocks", reset=False)
print("A1 off -> blocks, no dynamo reset (the failing test):", diff(off, blk_noreset), flush=True)
off_r = run("off_r", "--cuda-graphs", "off")
blk_r = run("blk_r", "--cuda-graphs", "blocks")
print("A2 off vs blocks, each after dynamo reset:", diff(off_r, blk_r), flush=True)
print("A3 off (no reset, first) vs off (reset):", diff(off, off_r), flush=True)
off_m2 = run("off_m2", "--cuda-graphs", "off", "--micro-batch", "2")
blk_m2 = run("blk_m2", "--cuda-graphs", "blocks", "--micro-batch", "2")
print("A4 micro-batch 2 (grad accum 2), reset: off vs blocks:", diff(off_m2, blk_m2), flush=True)
real = training.graphs.keep_grads
training.graphs.keep_grads = lambda params: None       # train.py's `from training.graphs import keep_grads` binds this
try:
    bug = run("blk_bug", "--cuda-graphs", "blocks", "--micro-batch", "2")
    print("A5 planted stale-gradient bug (keep_grads no-op):", diff(off_m2, bug), flush=True)
except Exception as e:
    print("A5 planted bug raised:", type(e).__name__, str(e)[:300], flush=True)
training.graphs.keep_grads = real
print("A6 step graphs vs off (reset):", diff(off_r, run("step_r", "--cuda-graphs", "step")), flush=True)
class Crash(Exception): pass
def crashed(name, at, *extra):
    clip, calls = torch.nn.utils.clip_grad_norm_, []
    def c(*a, **k):
        calls.append(1)
        if len(calls) == at: raise Crash
        return clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = c
    try:
        run(name, *extra)
    except Crash:
        pass
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
for mode in ("blocks", "step"):
    full = run(f"full_{mode}", "--cuda-graphs", mode, "--save-every", "4")
    crashed(f"res_{mode}", 6, "--cuda-graphs", mode, "--save-every", "4")
    res = run(f"res_{mode}", "--cuda-graphs", mode, "--save-every", "4", "--resume")
    print(f"A7 resume after a crash at step 6 ({mode}) vs uninterrupted:", diff(full, res), flush=True)
print("elapsed", time.time() - t0)
