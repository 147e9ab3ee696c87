"""model/generate.py: KV-cache greedy and beam search against cache-free recomputation in fp64."""
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED, needs_shared
from model.generate import beam_search, generate, greedy_search
from model.model import ModelArgs, Transformer
from model.tokenizer import ByteTokenizer


def tiny_model(vocab=13, seed=0, n_layers=2):
    """Random fp64 model (RoPE tables stay fp32: agreement to ~1e-7) with peaked next-token
    distributions (std 0.3), so the searches disagree."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16,
                     max_seq_len=64)
    model = Transformer(args)
    model.reset_parameters(std=0.3)
    return model.double().eval()


def full_logprobs(model, seq):
    """log p(next | seq) from a plain forward over the whole sequence (no cache, no mask)."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([seq]))[0, -1].double(), dim=-1)


def reference_greedy(model, prompt, n, eos=()):
    seq, out, lp = list(prompt), [], 0.0
    for _ in range(n):
        logp = full_logprobs(model, seq)
        tok = int(logp.argmax())
        lp += logp[tok].item()
        if tok in eos:
            break
        out.append(tok)
        seq.append(tok)
    return out, lp


def sequence_logprob(model, prompt, new, eos=None):
    """sum_t log p(y_t | prompt, y_<t), + log p(eos | ...) when the sequence ended with EOS."""
    seq, lp = list(prompt), 0.0
    for tok in list(new) + ([eos] if eos is not None else []):
        lp += full_logprobs(model, seq)[tok].item()
        seq.append(tok)
    return lp


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]]


def test_greedy_with_cache_equals_recompute():
    model = tiny_model()
    for p in PROMPTS:
        seqs, scores = greedy_search(model, [p], max_new_tokens=8)
        ref, ref_lp = reference_greedy(model, p, 8)
        assert seqs[0] == ref and len(ref) == 8
        assert scores[0] == pytest.approx(ref_lp, abs=1e-6)


def test_greedy_stops_at_eos_per_sequence():
    model = tiny_model()
    free, _ = greedy_search(model, PROMPTS, max_new_tokens=8)
    eos = free[0][3]                         # a token prompt 0 emits at step 4 (and maybe others earlier)
    seqs, scores = greedy_search(model, PROMPTS, max_new_tokens=8, eos_ids=[eos])
    for p, s, lp in zip(PROMPTS, seqs, scores):
        ref, ref_lp = reference_greedy(model, p, 8, eos=[eos])
        assert s == ref and eos not in s
        assert lp == pytest.approx(ref_lp, abs=1e-6)
    assert len(seqs[0]) <= 3


def test_left_padded_batch_equals_each_alone():
    model = tiny_model()
    for beams in (1, 3):
        batch, batch_lp = (greedy_search(model, PROMPTS, max_new_tokens=6) if beams == 1 else
                           beam_search(model, PROMPTS, num_beams=beams, max_new_tokens=6, eos_ids=[0]))
        for p, s, lp in zip(PROMPTS, batch, batch_lp):
            alone, alone_lp = (greedy_search(model, [p], max_new_tokens=6) if beams == 1 else
                               beam_search(model, [p], num_beams=beams, max_new_tokens=6, eos_ids=[0]))
            assert s == alone[0]
            assert lp == pytest.approx(alone_lp[0], abs=1e-6)


def test_beam_search_with_one_beam_equals_greedy():
    model = tiny_model()
    free, _ = greedy_search(model, PROMPTS, max_new_tokens=8)
    for eos in ([], [free[1][2]]):
        g, g_lp = greedy_search(model, PROMPTS, max_new_tokens=8, eos_ids=eos)
        b, b_lp = beam_search(model, PROMPTS, num_beams=1, max_new_tokens=8, eos_ids=eos)
        assert b == g
        assert b_lp == pytest.approx(g_lp, abs=1e-6)


def test_beam_score_at_least_greedy_and_scores_are_true_logprobs():
    model = tiny_model(seed=1)
    n = 5
    g, g_lp = greedy_search(model, PROMPTS, max_new_tokens=n)
    b, b_lp = beam_search(model, PROMPTS, num_beams=4, max_new_tokens=n)   # no EOS: all length n
    strictly_better = 0
    for p, gs, gl, bs, bl in zip(PROMPTS, g, g_lp, b, b_lp):
        assert len(bs) == n
        assert bl == pytest.approx(sequence_logprob(model, p, bs), abs=1e-6)
        assert gl == pytest.approx(sequence_logprob(model, p, gs), abs=1e-6)
        assert bl >= gl - 1e-6
        strictly_better += bl > gl + 1e-3
    assert strictly_better >= 1              # the test model is one where beam search matters


def test_beam_search_equals_exhaustive_search():
    """Vocab 5, 3 new tokens, no EOS: with 25 = 5² beams nothing is ever pruned, so beam search must
    return the argmax of the sequence log-prob over all 125 continuations."""
    model = tiny_model(vocab=5, seed=2)
    prompts = [[1, 2], [3], [4, 0, 1]]
    seqs, scores = beam_search(model, prompts, num_beams=25, max_new_tokens=3)
    for p, s, lp in zip(prompts, seqs, scores):
        prefix_logp = {c: full_logprobs(model, p + list(c))          # one forward per prefix (31)
                       for L in range(3) for c in itertools.product(range(5), repeat=L)}
        total = {c: sum(prefix_logp[c[:t]][c[t]].item() for t in range(3))
                 for c in itertools.product(range(5), repeat=3)}
        best = max(total, key=total.get)
        assert s == list(best)
        assert lp == pytest.approx(total[best], abs=1e-6)


def test_beam_search_length_normalised_choice():
    """Finished hypotheses compete by sum_logprobs / gen_len (gen_len includes EOS): check the returned
    hypothesis against a brute-force over all EOS-terminated or full-length sequences, with enough
    beams that nothing is pruned and max_new_tokens small enough that early stopping cannot bite."""
    V, n, eos = 4, 3, 3
    model = tiny_model(vocab=V, seed=3)
    prompts = [[0, 1], [2], [1, 2, 0]]
    seqs, scores = beam_search(model, prompts, num_beams=64, max_new_tokens=n, eos_ids=[eos])
    for p, s, lp in zip(prompts, seqs, scores):
        cands = []
        for L in range(0, n + 1):
            for body in itertools.product(range(V - 1), repeat=L):
                ended = L < n
                total = sequence_logprob(model, p, body, eos if ended else None)
                cands.append((total / (L + ended), list(body), total))
        _, best, best_lp = max(cands)
        assert s == best
        assert lp == pytest.approx(best_lp, abs=1e-6)


def test_generate_strings_restores_order_across_batches():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=259, multiple_of=16,
                                  max_seq_len=64))
    model.reset_parameters(std=0.3)
    tok = ByteTokenizer()
    prompts = ["hello", "a", "a much longer prompt", "mid size"]
    together = generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    ids = [tok.encode(p, bos=True) for p in prompts]
    seqs, _ = greedy_search(model, ids, max_new_tokens=5, eos_ids=[tok.eos_id])
    assert together == [tok.decode(s) for s in seqs]


def test_prompt_too_long_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy_search(model, [[1] * 60], max_new_tokens=10)


@needs_shared
def test_stories260k_known_greedy_text():
    from model.load import load_model
    model, tok = load_model(SHARED / "models" / "stories260K")
    prompt = tok.encode("Once upon a time", bos=True)
    seqs, _ = greedy_search(model, [prompt], max_new_tokens=60, eos_ids=tok.stop_ids)
    text = tok.decode(prompt + seqs[0], skip_special=True)
    known = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")
    assert text.startswith(known), text


def test_matches_hugging_face_generate():
    """Greedy and beam search (3 and 4 beams, EOS 0) equal transformers' generate() on a tiny random LLaMA
    (fixture from tests/fixtures/make_hf_beam_tiny.py: HF ran each prompt alone; here they run as one
    left-padded batch)."""
    from safetensors.torch import load_file
    fixtures = Path(__file__).resolve().parent / "fixtures"
    fx = json.loads((fixtures / "hf_beam_tiny.json").read_text())
    model = Transformer(ModelArgs(**fx["params"]))
    model.load_base_weights(load_file(str(fixtures / "hf_beam_tiny.safetensors")))
    model = model.double().eval()
    kw = dict(max_new_tokens=fx["max_new_tokens"], eos_ids=[fx["eos_id"]])
    assert greedy_search(model, fx["prompts"], **kw)[0] == fx["greedy"]
    assert beam_search(model, fx["prompts"], num_beams=4, **kw)[0] == fx["beam4"]
    assert beam_search(model, fx["prompts"], num_beams=3, **kw)[0] == fx["beam3"]
    assert fx["beam4"] != fx["greedy"] and any(len(s) < fx["max_new_tokens"] for s in fx["beam4"])
