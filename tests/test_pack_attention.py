"""experiments/pack_attention.py (issue 30): on a synthetic micro-batch packed by data.pack_micro_batch, the
packed kernels' outputs (and gradients) at every real token equal each example's own causal attention in fp64;
a planted leak across an example boundary is caught by the tool's comparison; the varlen path's cu_seqlens are
the packer's cumulative example lengths; no CUDA without --check is one line, exit 2; the table's numbers."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import data
from experiments import pack_attention as pa

PAD, VOCAB, SHAPE = 0, 61, (4, 2, 8)                # 4 query heads, 2 kv heads (GQA), head_dim 8
PROMPTS, ANSWERS = (3, 6, 4, 2, 5, 7), (4, 2, 5, 3, 1, 3)     # 7 … 10 tokens: three examples to a 16-token row
LENGTHS = [p + a for p, a in zip(PROMPTS, ANSWERS)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_batch():
    g = torch.Generator().manual_seed(5)
    rows = []
    for p, a in zip(PROMPTS, ANSWERS):
        ids = torch.randint(1, VOCAB, (p + a,), generator=g).tolist()
        rows.append((ids, [-100] * p + ids[p:]))
    return data.collate(rows, PAD, 1)


def setup(row_len=16):
    """The layouts of the synthetic micro-batch, fp64 inputs, and each example's own causal attention (one
    example at a time, no layout code): the reference."""
    layouts = pa.micro_batch_layouts(micro_batch(), row_len, PAD)
    inputs = pa.random_inputs(sum(LENGTHS), SHAPE, 0, torch.device("cpu"), torch.float64)
    q, k, v, _ = inputs
    outs, s = [], 0
    for n in LENGTHS:
        one = [x[s:s + n].transpose(0, 1)[None] for x in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*one, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        s += n
    return layouts, inputs, torch.cat(outs)


def test_the_layouts_hold_every_real_token_once():
    layouts, _, _ = setup()
    assert layouts["packed"].rows == 3 and layouts["packed"].length == 16
    assert layouts["flat"].rows == 1 and layouts["flat"].length == 48 and sum(LENGTHS) == 45   # 45 -> 48, a multiple of 8
    for name, ls in layouts.items():
        assert len(ls.index) == sum(LENGTHS) and len(set(ls.index.tolist())) == sum(LENGTHS), name
        docs = ls.documents.flatten()[ls.index]
        assert docs.tolist() == [i for i, n in enumerate(LENGTHS) for _ in range(n)], name


@pytest.mark.parametrize("name", ["padded", "sdpa-mask", "sdpa-mask-flat"])
def test_sdpa_kernels_equal_each_examples_own_attention_fp64(name):
    layouts, inputs, own = setup()
    kernel = pa.kernels(compiled=False)[name]
    out, grads = pa.run_kernel(kernel, layouts[kernel.layout], *inputs)
    assert (out - own).abs().max().item() <= 1e-12
    reference = pa.run_kernel(pa.kernels(False)["padded"], layouts["padded"], *inputs)
    d_out, d_grad = pa.compare(kernel, layouts[kernel.layout], inputs, reference)
    assert d_out <= 1e-12 and d_grad <= 1e-12


@pytest.mark.parametrize("name", ["flex", "flex-flat"])
def test_flex_equals_each_examples_own_attention_fp64(name):
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no flex_attention in this torch: {e}")
    layouts, inputs, own = setup()
    kernel = pa.kernels(compiled=False)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # "called without torch.compile": eager is what we want
        out, _ = pa.run_kernel(kernel, layouts[kernel.layout], *inputs, backward=False)   # no CPU backward
    assert (out - own).abs().max().item() <= 1e-12


def test_a_planted_leak_is_caught():
    """Two examples of one packed row merged into one document: the second sees the first's keys."""
    layouts, inputs, _ = setup()
    packed = layouts["packed"]
    row = packed.documents[0]
    first, second = row[0].item(), row[LENGTHS[row[0].item()]].item()
    assert first != second >= 0
    leaky = pa.Layout(packed.rows, packed.length, packed.index, packed.documents.where(packed.documents != second,
                                                                                       torch.tensor(first)))
    reference = pa.run_kernel(pa.kernels(False)["padded"], layouts["padded"], *inputs)
    d_out, d_grad = pa.compare(pa.kernels(False)["sdpa-mask"], leaky, inputs, reference)
    assert d_out > 0.1 and d_grad > 0.05
    assert pa.compare(pa.kernels(False)["sdpa-mask"], packed, inputs, reference)[0] <= 1e-12


def test_cu_seqlens_are_the_packers_cumulative_example_lengths():
    packing = data.pack_micro_batch(micro_batch(), 16, PAD)["packing"]
    layout = pa.varlen_layout(packing)
    order = sorted(range(len(LENGTHS)), key=lambda i: (int(packing.example_row[i]), int(packing.example_start[i])))
    want = [0]
    for i in order:
        want.append(want[-1] + int(packing.example_length[i]))
    assert pa.cu_seqlens(layout.documents) == want
    assert want[-1] == 45 and len(want) == 7
    cu, longest = pa.varlen_prepare(layout.documents)
    assert cu.dtype == torch.int32 and cu.tolist() == want and longest == max(LENGTHS)
    with pytest.raises(ValueError, match="split"):
        pa.cu_seqlens(torch.tensor([0, 0, 1, 0]))


def test_the_varlen_layout_with_per_segment_attention_equals_each_example():
    """varlen_attn is CUDA-only; a per-segment SDPA over the same cu_seqlens checks the layout it is given."""
    def segments(q, k, v, prepared):
        cu = prepared[0].tolist()
        return torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
                                                         is_causal=True, enable_gqa=True)[0].transpose(0, 1)
                          for a, b in zip(cu, cu[1:])])
    layouts, inputs, own = setup()
    out, _ = pa.run_kernel(pa.Kernel("varlen", True, pa.varlen_prepare, segments), layouts["varlen"], *inputs)
    assert (out - own).abs().max().item() <= 1e-12


def test_no_cuda_without_check_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "experiments.pack_attention", "--model", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "--check" in r.stderr and r.stderr.count("\n") == 1


def test_the_table_from_a_jsonl(tmp_path):
    def row(kernel, ms1k, ok=True, error=None, diff=0.0078125):
        return {"kernel": kernel, "shape": "smollm2", "device": "NVIDIA H100", "real_tokens": 1000,
                "padded_tokens": 1200, "ms_fwd_bwd_median": None if error else ms1k / 2,
                "ms_per_1k_real_tokens": None if error else ms1k, "max_abs_diff": None if error else diff,
                "ok": ok, "error": error}
    path = tmp_path / "pack-attention-h100.jsonl"
    pa.append_jsonl(path, [row("sdpa-mask", 9.0), row("padded", 1.0)])
    pa.append_jsonl(path, [row("padded", 0.5), row("flex", 0.4, ok=False, diff=0.25),
                           row("varlen", None, ok=False, error="FlashAttention only supports Ampere GPUs or newer.")])
    assert len(path.read_text().splitlines()) == 5
    assert json.loads(path.read_text().splitlines()[0])["kernel"] == "sdpa-mask"
    assert pa.table([r for _, r in pa.json_objects(path)]).splitlines()[2:] == [
        "| NVIDIA H100 | smollm2 | padded | 1000 | 1200 | 0.250 | 0.500 | 1.00× | 7.8e-03 | yes |",
        "| NVIDIA H100 | smollm2 | sdpa-mask | 1000 | 1200 | 4.500 | 9.000 | 0.06× | 7.8e-03 | yes |",
        "| NVIDIA H100 | smollm2 | flex | 1000 | 1200 | 0.200 | 0.400 | 1.25× | 2.5e-01 | no |",
        "| NVIDIA H100 | smollm2 | varlen | 1000 | 1200 | – | – | – | – | "
        "error: FlashAttention only supports Ampere GPUs or newer. |"]
    r = subprocess.run([sys.executable, "-m", "experiments.pack_attention", "--table", str(path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.splitlines()[3].startswith("| NVIDIA H100 | smollm2 | sdpa-mask |")


def test_device_slug():
    assert pa.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert pa.device_slug("NVIDIA H200") == "h200"
    assert pa.device_slug("cpu") == "cpu"
