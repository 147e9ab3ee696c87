"""Batched autoregressive decoding with the model's KV cache: greedy and beam search.

Prompts of different lengths are LEFT-padded into one [B, T] batch, so every row's last prompt token
sits at column T-1 and all rows step together. The attention mask spans every key written so far
(prompt mask, then True for each generated token); positions of the real tokens are
cumsum(mask) - 1, so a padded prompt decodes exactly as it would alone.

    prefill:  logits = model(ids [B,T], mask [B,T], kv_cache, cache_pos=0, logits_index=T-1)
    step i:   logits = model(tok [B,1], mask [B,T+i+1], kv_cache, cache_pos=T+i)

Beam search follows Hugging Face `generate(num_beams=K)` defaults (length_penalty 1.0,
early_stopping False, no sampling):
  * per step, the 2K best (beam, token) continuations by cumulative log-prob are scanned in order;
    a continuation ending in EOS becomes a finished hypothesis (only if it ranks among the top K),
    the first K others become the next beams;
  * a finished hypothesis scores  sum_logprobs / gen_len ** length_penalty  (gen_len counts the
    generated tokens including EOS); at most K are kept, the best wins;
  * a prompt is done once it has K finished hypotheses and its worst one is at least the best
    running beam's sum_logprobs / cur_len ** length_penalty (HF's early_stopping=False heuristic);
  * after max_new_tokens, the running beams join the finished ones (scored the same way).
Both searches return the chosen tokens (EOS stripped) and their sequence log-prob
sum_t log p(y_t | prompt, y_<t) (including the EOS term when EOS ended the sequence).
"""
import torch
import torch.nn.functional as F


def _batch(prompts, device):
    """Left-pad token lists into ids [B,T] (pad id 0, masked out) and mask [B,T] (True = real)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (encode with bos=True)")
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = True
    return ids.to(device), mask.to(device)


def _model_device(model):
    return next(model.parameters()).device


def _check_length(model, T, max_new_tokens):
    max_seq_len = getattr(getattr(model, "args", None), "max_seq_len", None)
    if max_seq_len is not None and T + max_new_tokens > max_seq_len:
        raise ValueError(f"generate: prompt length {T} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_seq_len {max_seq_len}")


class _Decoder:
    """Prefill once, then feed one token per row per step; tracks the mask and positions."""

    def __init__(self, model, ids, mask, max_new_tokens):
        self.model = model
        B, T = ids.shape
        _check_length(model, T, max_new_tokens)
        self.cache = model.setup_kv_cache(B, T + max_new_tokens, device=ids.device)
        self.mask = mask
        self.next_pos = mask.sum(dim=1)                          # position of the next token, per row
        self.T = T
        self.step = 0

    def prefill(self, ids):
        positions = (self.mask.long().cumsum(dim=1) - 1).clamp_min(0)
        last = torch.full((ids.shape[0], 1), self.T - 1, dtype=torch.long, device=ids.device)
        logits = self.model(ids, attention_mask=self.mask, positions=positions, kv_cache=self.cache,
                            cache_pos=0, logits_index=last)
        return logits[:, -1].float()

    def __call__(self, tokens):
        """tokens [B] → next-token logits [B, V]."""
        B = tokens.shape[0]
        self.mask = torch.cat([self.mask, torch.ones(B, 1, dtype=torch.bool, device=tokens.device)], 1)
        positions = self.next_pos[:, None]
        logits = self.model(tokens[:, None], attention_mask=self.mask, positions=positions,
                            kv_cache=self.cache, cache_pos=self.T + self.step)
        self.step += 1
        self.next_pos = self.next_pos + 1
        return logits[:, -1].float()

    def reorder(self, index):
        """Beam search: row r continues from row index[r]."""
        self.cache.reorder(index)
        self.mask = self.mask[index]
        self.next_pos = self.next_pos[index]


@torch.inference_mode()
def greedy_search(model, prompts, *, max_new_tokens=32, eos_ids=(), device=None):
    """argmax decoding of a batch of token-id prompts → (list of new-token lists, list of log-probs)."""
    device = device or _model_device(model)
    ids, mask = _batch(prompts, device)
    B = ids.shape[0]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    out = torch.zeros(B, 0, dtype=torch.long, device=device)
    score = torch.zeros(B, dtype=torch.float64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    if max_new_tokens <= 0:
        return [[] for _ in range(B)], [0.0] * B
    dec = _Decoder(model, ids, mask, max_new_tokens)
    logits = dec.prefill(ids)
    for i in range(max_new_tokens):
        logp = F.log_softmax(logits.double(), dim=-1)
        tok = logits.argmax(dim=-1)
        tok = torch.where(done, torch.zeros_like(tok), tok)       # finished rows feed a dummy token
        score += torch.where(done, 0.0, logp.gather(1, tok[:, None])[:, 0])
        out = torch.cat([out, tok[:, None]], dim=1)
        hit_eos = torch.isin(tok, eos) & ~done
        lengths = torch.where(hit_eos, i, lengths)                # EOS itself is not returned
        done |= hit_eos
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = dec(tok)
    seqs = [out[b, :lengths[b]].tolist() for b in range(B)]
    return seqs, score.tolist()


@torch.inference_mode()
def beam_search(model, prompts, *, num_beams=4, max_new_tokens=32, eos_ids=(), length_penalty=1.0,
                device=None):
    """HF-style beam search (see module docstring) → (list of new-token lists, list of log-probs)."""
    device = device or _model_device(model)
    B, K = len(prompts), num_beams
    if K < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens <= 0:
        return [[] for _ in range(B)], [0.0] * B
    eos_set = set(eos_ids)
    ids, mask = _batch(prompts, device)
    dec = _Decoder(model, ids, mask, max_new_tokens)
    logits = dec.prefill(ids)                          # once per prompt, then copied to its K beams
    expand = torch.arange(B, device=device).repeat_interleave(K)                   # row b*K + k
    dec.reorder(expand)
    logits = logits[expand]
    V = logits.shape[-1]
    # only beam 0 is live at the start, so the first step does not pick K copies of one token
    beam_scores = torch.zeros(B, K, dtype=torch.float64, device=device)
    beam_scores[:, 1:] = -1e9
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    finished = [[] for _ in range(B)]                 # per prompt: [(norm_score, sum_logprob, tokens)]
    done = [False] * B

    def add(b, sum_lp, tokens, gen_len):
        hyps = finished[b]
        norm = sum_lp / gen_len ** length_penalty
        if len(hyps) < K or norm > min(h[0] for h in hyps):
            hyps.append((norm, sum_lp, tokens))
            if len(hyps) > K:
                hyps.remove(min(hyps, key=lambda h: h[0]))

    for step in range(max_new_tokens):
        gen_len = step + 1
        logp = F.log_softmax(logits.double(), dim=-1)                        # [B*K, V]
        cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)             # sorted, best first
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        next_scores = torch.full((B, K), -1e9, dtype=torch.float64)   # unfilled slots never win
        next_tokens = torch.zeros(B, K, dtype=torch.long)
        next_beams = torch.zeros(B, K, dtype=torch.long)
        for b in range(B):
            if done[b]:                                   # keep dummy beams so the batch stays square
                next_beams[b] = torch.arange(K) + b * K
                continue
            n = 0
            for rank, (s, idx) in enumerate(zip(top_scores[b], top_idx[b])):
                beam, tok = divmod(idx, V)
                row = b * K + beam
                if tok in eos_set:
                    if rank < K:
                        add(b, s, seqs[row].tolist(), gen_len)
                    continue
                next_scores[b, n], next_tokens[b, n], next_beams[b, n] = s, tok, row
                n += 1
                if n == K:
                    break
            best_running = max(top_scores[b])
            done[b] = len(finished[b]) == K and min(h[0] for h in finished[b]) >= \
                best_running / gen_len ** length_penalty
        beam_scores = next_scores.to(device)
        index = next_beams.view(-1).to(device)
        seqs = torch.cat([seqs[index], next_tokens.view(-1, 1).to(device)], dim=1)
        if all(done) or step == max_new_tokens - 1:
            break
        dec.reorder(index)
        logits = dec(next_tokens.view(-1).to(device))

    out_seqs, out_scores = [], []
    for b in range(B):
        if not done[b]:                                   # max length reached: running beams compete
            for k in range(K):
                add(b, beam_scores[b, k].item(), seqs[b * K + k].tolist(), seqs.shape[1])
        _, sum_lp, tokens = max(finished[b], key=lambda h: h[0])
        out_seqs.append(tokens)
        out_scores.append(sum_lp)
    return out_seqs, out_scores


def generate_ids(model, prompts, *, max_new_tokens=32, num_beams=1, eos_ids=(), device=None):
    """One batch of token-id prompts → (new-token lists, sequence log-probs). num_beams 1 = greedy."""
    if num_beams == 1:
        return greedy_search(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids, device=device)
    return beam_search(model, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                       eos_ids=eos_ids, device=device)


def stop_ids(tokenizer):
    """Token ids that end generation: the tokenizer's `stop_ids` if it defines them, else its EOS."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        ids = [] if eos is None or eos < 0 else [eos]
    return list(ids)


def generate(model, tokenizer, prompts, *, max_new_tokens=32, num_beams=1, batch_size=None,
             eos_ids=None, device=None, return_scores=False):
    """Decode continuations of `prompts` (strings, encoded with BOS if the tokenizer's add_bos, or
    token-id lists). Special tokens are dropped from the decoded text (EOS never appears).

    Prompts are sorted by length and run in batches of `batch_size` (all at once if None) so that
    little padding is wasted; results come back in the input order. Returns the decoded new text
    per prompt (EOS stripped), plus the sequence log-probs if return_scores.
    """
    was_training = model.training
    model.eval()
    bos = getattr(tokenizer, "add_bos", True)
    ids = [tokenizer.encode(p, bos=bos) if isinstance(p, str) else list(p) for p in prompts]
    eos_ids = stop_ids(tokenizer) if eos_ids is None else list(eos_ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batch_size = batch_size or max(len(ids), 1)
    texts, scores = [None] * len(ids), [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs, lps = generate_ids(model, [ids[i] for i in chunk], max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, eos_ids=eos_ids, device=device)
        for i, s, lp in zip(chunk, seqs, lps):
            texts[i], scores[i] = tokenizer.decode(s, skip_special=True), lp
    model.train(was_training)
    return (texts, scores) if return_scores else texts
