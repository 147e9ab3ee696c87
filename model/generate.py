"""Batched autoregressive decoding with the model's KV cache: greedy, sampling and beam search, and a
command line to try a model (and adapter) on a prompt:

    python -m model.generate --model DIR [--adapter RUN_OR_ADAPTER_DIR] [--chat] "prompt"
    python -m model.generate --adapter RUN_DIR "prompt"      # the run's base model, as eval.py finds it
    python -m model.generate --model DIR "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1
    python -m model.generate --model DIR "Once upon a time" --num-beams 4
    python -m model.generate --model DIR --adapter RUN_DIR --template alpaca "Is the sky blue?"

Greedy is the default; --temperature > 0 samples (with optional --top-k / --top-p, reproducible by
--seed); --num-beams > 1 runs beam search. Greedy and sampled text streams to stdout token by token;
beam search prints when it ends (its best hypothesis is only known then). Generation stops at the
tokenizer's EOS / end-of-turn tokens (stop_ids). Without --chat the prompt is encoded as plain text
(with BOS if the tokenizer wants one) and echoed; with --chat it is wrapped in the model's chat format
(chat_text) and only the reply is printed; with --template the prompt is the instruction of the
fine-tuning prompt template (data/prompts.py, as eval.py builds it; --input fills its input field) and
only the response is printed.

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
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .rundir import base_model_of_adapter, is_dequantized_copy, read_params


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


class _AllDone:
    """"Has every row finished?" without stalling the GPU. On CUDA the flag of step i is copied to the
    host asynchronously and read at step i+1, after that step's kernels are queued, so the CPU never
    waits for the GPU to drain (a plain bool(done.all()) per step would); the price is at most one extra
    step, whose tokens are discarded (finished rows feed a dummy token). On CPU nothing runs ahead, so
    the current flag is read directly."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.flag, self.event = None, None

    def __call__(self, done):
        if not self.cuda:
            return bool(done.all())
        finished = self.flag is not None and (self.event.synchronize() or bool(self.flag))
        self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.flag.copy_(done.all(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return finished


def _token_by_token(model, prompts, pick, *, max_new_tokens, eos_ids, device, on_token=None):
    """The loop shared by greedy and sampled decoding: pick(logits [B,V]) -> tokens [B].
    Returns (new-token lists, EOS stripped; sequence log-probs of the picked tokens under the model).
    on_token(tokens [B]) is called after every step (streaming); rows that finished earlier get token 0."""
    device = device or _model_device(model)
    ids, mask = _batch(prompts, device)
    B = ids.shape[0]
    if max_new_tokens <= 0:
        return [[] for _ in range(B)], [0.0] * B
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    score = torch.zeros(B, dtype=torch.float64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    dec = _Decoder(model, ids, mask, max_new_tokens)
    all_done = _AllDone(device)
    logits = dec.prefill(ids)
    for i in range(max_new_tokens):
        logp = F.log_softmax(logits.double(), dim=-1)
        tok = torch.where(done, 0, pick(logits))                   # finished rows feed a dummy token
        score += torch.where(done, 0.0, logp.gather(1, tok[:, None])[:, 0])
        out[:, i] = tok
        hit_eos = torch.isin(tok, eos) & ~done
        lengths = torch.where(hit_eos, i, lengths)                # EOS itself is not returned
        done |= hit_eos
        if on_token is not None:
            on_token(tok)
        if i == max_new_tokens - 1 or all_done(done):
            break
        logits = dec(tok)
    lengths, out = lengths.tolist(), out.tolist()                  # the one transfer of the results
    return [row[:n] for row, n in zip(out, lengths)], score.tolist()


@torch.inference_mode()
def greedy_search(model, prompts, *, max_new_tokens=32, eos_ids=(), device=None, on_token=None):
    """argmax decoding of a batch of token-id prompts → (list of new-token lists, list of log-probs)."""
    return _token_by_token(model, prompts, lambda logits: logits.argmax(dim=-1), max_new_tokens=max_new_tokens,
                           eos_ids=eos_ids, device=device, on_token=on_token)


def sample_next(logits, *, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from softmax(logits / temperature), restricted to the top_k most likely tokens
    (0: all) and then to the smallest set of most likely tokens whose probability reaches top_p (1: all;
    the most likely token always stays). The same filters as Hugging Face's TopK/TopP warpers."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p                # mass before this token already >= p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def sample_search(model, prompts, *, max_new_tokens=32, eos_ids=(), temperature=1.0, top_k=0, top_p=1.0,
                  seed=0, device=None, on_token=None):
    """Sampled decoding (see sample_next); the same seed on the same device gives the same tokens."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (use greedy_search)")
    device = device or _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    pick = lambda logits: sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,  # noqa: E731
                                      generator=generator)
    return _token_by_token(model, prompts, pick, max_new_tokens=max_new_tokens, eos_ids=eos_ids, device=device,
                           on_token=on_token)


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
             eos_ids=None, device=None):
    """Decode continuations of `prompts` (strings, encoded with BOS if the tokenizer's add_bos, or
    token-id lists). Special tokens are dropped from the decoded text (EOS never appears).

    Prompts are sorted by length and run in batches of `batch_size` (all at once if None) so that
    little padding is wasted; results come back in the input order, as the decoded new text per prompt.
    """
    was_training = model.training
    model.eval()
    bos = getattr(tokenizer, "add_bos", True)
    ids = [tokenizer.encode(p, bos=bos) if isinstance(p, str) else list(p) for p in prompts]
    eos_ids = stop_ids(tokenizer) if eos_ids is None else list(eos_ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batch_size = batch_size or max(len(ids), 1)
    texts = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs, _ = generate_ids(model, [ids[i] for i in chunk], max_new_tokens=max_new_tokens,
                               num_beams=num_beams, eos_ids=eos_ids, device=device)
        for i, s in zip(chunk, seqs):
            texts[i] = tokenizer.decode(s, skip_special=True)
    model.train(was_training)
    return texts


# ---------------------------------------------------------------- loading ----------------------------------

def find_adapter_dir(path):
    """A run folder (holding adapter/) or an adapter folder itself -> the folder with adapter_config.json."""
    path = Path(path)
    for d in (path / "adapter", path):
        if (d / "adapter_config.json").exists():
            return d
    raise FileNotFoundError(f"--adapter {path}: no adapter_config.json in {path}/adapter or {path}")


BASE_FORMATS = ("plain", "nf4")


def resolve_base_format(flag, adapter_cfg, model_dir=None, adapter_dir=None):
    """-> (base format, why, warning or None). Without --base-format: the one the adapter was trained on
    (adapter_config.json "base_format"; absent = plain), except that a run's base/ folder already holds
    dequant(W) and is loaded plain (quantising it again would round it a second time). A flag that
    disagrees with that choice is obeyed with a one-line warning: a real model, but not the trained one; nf4 on
    weights already dequantised from NF4 is refused as load_model refuses it (model.load.check_not_dequantized)."""
    recorded = (adapter_cfg or {}).get("base_format", "plain")
    if adapter_cfg is None:
        expected, why = "plain", "no adapter"
    elif recorded == "nf4" and is_dequantized_copy(model_dir, adapter_dir):
        expected, why = "plain", f"{model_dir} holds dequant(W) of the NF4 base the adapter trained on"
    elif "base_format" in adapter_cfg:
        expected, why = recorded, "the adapter's adapter_config.json"
    else:
        expected, why = "plain", "the adapter records no base_format"
    if (flag or expected) == "nf4" and model_dir is not None:       # the refusal load_model would give, first
        from .load import check_not_dequantized
        check_not_dequantized(model_dir, "nf4", adapter_dir, adapter_cfg)
    if flag is None or adapter_cfg is None:
        return flag or expected, ("--base-format" if flag else why), None
    if flag == expected:
        return flag, "--base-format", None
    trained = "dequant(W) of an NF4 base" if recorded == "nf4" else f"a {recorded} base"
    return flag, "--base-format", (f"warning: --base-format {flag}, but the adapter was trained on {trained} "
                                   f"(expected {expected}): this runs a different model than the one trained")


def choose_base_format(flag, adapter_cfg, model_dir=None, adapter_dir=None):
    """resolve_base_format as every command uses it (eval, generate, convert_weights --export): -> (base
    format, why), its warning printed on stderr (stdout may be the generated text)."""
    base_format, why, warning = resolve_base_format(flag, adapter_cfg, model_dir, adapter_dir)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return base_format, why


def load_for_inference(model_dir, adapter_dir=None, device="cpu", dtype=torch.float32, base_format="plain"):
    """model.load.load_model in eval mode, with a damaged file (truncated safetensors, corrupt pickle,
    unreadable tensors) reported as a one-line ValueError naming the folders instead of a traceback.
    base_format "nf4": the frozen linears quantised while loading (QLoRA), dequantised in each forward."""
    import pickle
    from safetensors import SafetensorError
    from .load import load_model
    if (Path(model_dir) / "params.json").is_file():
        read_params(model_dir)            # a damaged params.json: one line naming the field, before loading
    try:
        model, tokenizer = load_model(model_dir, adapter_dir=adapter_dir, device=device, dtype=dtype,
                                      base_format=base_format)
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError,
            json.JSONDecodeError) as e:
        what = f"model {model_dir}" + (f" with adapter {adapter_dir}" if adapter_dir else "")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load {what}: {type(e).__name__}: {first} (a damaged or incomplete file?)") from None
    if tokenizer is None:
        raise ValueError(f"model {model_dir!r} has no tokenizer: pass a model directory")
    return model.eval(), tokenizer


# ---------------------------------------------------------------- chat prompts -----------------------------

def chat_text(model_dir, tokenizer, user, system=None):
    """The prompt text for one user turn (and an optional system message), ending where the assistant's
    reply starts. Uses the `chat_template` of model_dir/tokenizer_config.json (Hugging Face's Jinja
    format, rendered as HF does) when there is one and jinja2 is installed; otherwise the built-in
    format picked by the tokenizer's special tokens (fallback_chat_text)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    config_path = Path(model_dir) / "tokenizer_config.json"
    template = json.loads(config_path.read_text()).get("chat_template") if config_path.exists() else None
    if isinstance(template, list):                    # HF's named templates: [{"name", "template"}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template.strip():
        try:
            import jinja2.sandbox
        except ImportError:
            print("note: jinja2 is not installed: using the built-in chat format instead of the model's "
                  "chat_template", file=sys.stderr)
        else:
            return _render_jinja(template, messages, tokenizer, config_path)
    return fallback_chat_text(tokenizer, messages)


def _render_jinja(template, messages, tokenizer, where):
    import jinja2.sandbox

    def raise_exception(message):
        raise ValueError(f"{where}: chat_template: {message}")

    names = {i: s for s, i in tokenizer.special_tokens.items()}
    # HF's apply_chat_template environment: sandboxed, trim_blocks + lstrip_blocks, loop controls
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, raise_exception=raise_exception,
            bos_token=names.get(tokenizer.bos_id, ""), eos_token=names.get(tokenizer.eos_id, ""))
    except jinja2.TemplateError as e:
        raise ValueError(f"{where}: chat_template does not render: {e}") from None


def fallback_chat_text(tokenizer, messages):
    """Built-in chat formats, chosen by which special tokens the tokenizer has:
      Llama 3 (<|start_header_id|>): <|begin_of_text|> then per message
          <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>, then the assistant header;
      ChatML (<|im_start|>, e.g. SmolLM2, Qwen): per message <|im_start|>ROLE\\nCONTENT<|im_end|>\\n,
          then <|im_start|>assistant\\n.
    A model's own default system message (some templates add one) is not reproduced."""
    special = tokenizer.special_tokens
    if "<|start_header_id|>" in special and "<|eot_id|>" in special:
        turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                        for m in messages)
        bos = "<|begin_of_text|>" if "<|begin_of_text|>" in special else ""
        return bos + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if "<|im_start|>" in special and "<|im_end|>" in special:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    raise ValueError("--chat: the model has no chat_template in tokenizer_config.json and its tokenizer has "
                     "neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>) tokens; drop --chat")


# ---------------------------------------------------------------- streaming --------------------------------

class TextStream:
    """Writes the text of a growing token sequence as it grows. Each step decodes prefix + new tokens
    as a whole, because a token's text depends on its neighbours (SentencePiece drops a word-start
    space at the very start; a multi-byte character can span tokens), and writes only the new suffix;
    a text ending in U+FFFD (an incomplete UTF-8 character) waits for the next token."""

    def __init__(self, tokenizer, prefix_ids, out=None, echo=True):
        self.tokenizer, self.prefix, self.ids, self.out = tokenizer, list(prefix_ids), [], out or sys.stdout
        self.shown = tokenizer.decode(self.prefix, skip_special=True)
        if echo:
            self._write(self.shown)

    def _write(self, text):
        self.out.write(text)
        self.out.flush()

    def push(self, ids):
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.prefix + self.ids, skip_special=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self._write(text[len(self.shown):])
        self.shown = text


# ---------------------------------------------------------------- command line -----------------------------

def build_parser():
    from data.prompts import TEMPLATES
    from .load import DTYPE_NAMES, CliParser, HelpFormatter, dtype_arg
    p = CliParser(prog="python -m model.generate", formatter_class=HelpFormatter,
                  description="Generate text from a model (+ adapter); streams to stdout.\n\n" +
                  __doc__.split("\n\n")[1])
    p.add_argument("prompt", help="the prompt text (with --chat: the user's message; with --template: the instruction)")
    p.add_argument("--model", help="model dir: params.json, tokenizer, weights (default: the --adapter run's base "
                                    "model, as eval.py finds it; required without --adapter)")
    p.add_argument("--adapter", help="run folder (holding adapter/) or adapter folder (default: none, the base model)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format, print the "
                                                       "reply only (default: off, plain continuation)")
    p.add_argument("--system", help="with --chat: a system message (default: none)")
    p.add_argument("--template", choices=list(TEMPLATES),
                   help="wrap the prompt, as the instruction, in this fine-tuning template (data/prompts.py, the "
                        "eval-time string) and print the response only; use the run's train.py --template "
                        "(default: none, the prompt as typed)")
    p.add_argument("--input", help="with --template: the template's optional input field (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="at most this many new tokens, and no further than the context (default: %(default)s)")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search, printed at the end (default: 1, greedy)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0, all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the most likely tokens covering this probability (default: 1, all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu; here: %(default)s)")
    p.add_argument("--dtype", default="fp32", type=dtype_arg, choices=list(DTYPE_NAMES),
                   help="compute dtype of the base weights; bfloat16, float16, float32, float64 are accepted too "
                        "(default: %(default)s)")
    p.add_argument("--base-format", choices=list(BASE_FORMATS),
                   help="storage of the frozen linears: plain, or nf4 (QLoRA's 4-bit base, as train.py --base-format "
                        "nf4) (default: the adapter's recorded base_format, else plain)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_args(args):
    """Every flag checked before anything is loaded; one-line ValueErrors naming the flag."""
    from .load import check_device
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be >= 1, got {args.num_beams}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:            # NaN fails this too
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature > 0 and args.num_beams > 1:
        raise ValueError("--temperature > 0 samples and --num-beams > 1 searches: choose one")
    if args.temperature == 0 and (args.top_k != 0 or args.top_p != 1.0):
        raise ValueError("--top-k / --top-p filter sampling: also pass --temperature > 0 (e.g. 1.0)")
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    if args.template and args.chat:
        raise ValueError("--template and --chat both wrap the prompt: choose one")
    if args.input is not None and not args.template:
        raise ValueError("--input fills a --template's input field: also pass --template (e.g. alpaca)")
    check_device(args.device)


def prompt_ids(args, tokenizer):
    """-> (token ids, whether to echo the prompt). Chat prompts carry their own specials (BOS included
    when the format has one), so they are encoded with allow_special and no extra BOS."""
    if args.chat:
        text = chat_text(args.model, tokenizer, args.prompt, args.system)
        return tokenizer.encode(text, bos=False, allow_special=True), False
    if args.template:
        from data.prompts import build_prompt
        text = build_prompt({"instruction": args.prompt, "input": args.input or ""}, args.template, for_eval=True)
        return tokenizer.encode(text, bos=tokenizer.add_bos), False
    return tokenizer.encode(args.prompt, bos=tokenizer.add_bos), True


def announce_base_format(args, adapter_dir):
    """The base format to load, said on stderr (stdout is the generated text) whenever NF4 is involved."""
    from .lora import read_adapter_config
    adapter_cfg = read_adapter_config(adapter_dir) if adapter_dir else None
    base_format, why = choose_base_format(args.base_format, adapter_cfg, args.model, adapter_dir)
    if why != "--base-format" and "nf4" in (base_format, (adapter_cfg or {}).get("base_format")):
        print(f"base: {base_format} ({why})", file=sys.stderr)
    return base_format


def run(args, out=None):
    out = out or sys.stdout
    check_args(args)
    adapter_dir = find_adapter_dir(args.adapter) if args.adapter else None
    if args.model is None and adapter_dir is None:
        raise ValueError("--model DIR is required without --adapter RUN_DIR (whose base model it would be)")
    args.model = args.model or base_model_of_adapter(adapter_dir)
    from .load import torch_dtype
    base_format = announce_base_format(args, adapter_dir)
    model, tokenizer = load_for_inference(args.model, adapter_dir, args.device, torch_dtype(args.dtype), base_format)
    ids, echo = prompt_ids(args, tokenizer)
    if not ids:
        raise ValueError("the prompt is empty")
    context = model.args.max_seq_len
    if len(ids) >= context:
        raise ValueError(f"the prompt is {len(ids)} tokens, the model's context is {context}: shorten it")
    max_new = min(args.max_new_tokens, context - len(ids))
    if max_new < args.max_new_tokens:
        print(f"note: --max-new-tokens {args.max_new_tokens} cut to {max_new} (context {context})", file=sys.stderr)
    kw = dict(max_new_tokens=max_new, eos_ids=stop_ids(tokenizer), device=args.device)
    stream = TextStream(tokenizer, ids if echo else [], out, echo=echo)
    if args.num_beams > 1:
        seqs, _ = beam_search(model, [ids], num_beams=args.num_beams, **kw)
        stream.push(seqs[0])
    else:
        stop = set(kw["eos_ids"])
        ended = []

        def on_token(tok):                 # one row; after a stop token the row only feeds dummies
            t = int(tok[0])
            if not ended:
                ended.extend([True] if t in stop else [])
                if not ended:
                    stream.push([t])
        if args.temperature > 0:
            sample_search(model, [ids], temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, on_token=on_token, **kw)
        else:
            greedy_search(model, [ids], on_token=on_token, **kw)
    out.write("\n")
    out.flush()


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:      # FileNotFoundError, PermissionError included
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
