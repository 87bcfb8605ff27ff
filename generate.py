"""
Generation for both models: the KV cache, sampling (greedy, temperature, top-k, top-p, repetition
penalty), beam search, stop tokens and stop strings, and streaming. Everything runs on the models' one
step, `model.next_logits(idx, cache, pad)` (model.py), so GPT and Backpack share it:

    from generate import generate
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)

sample.py, the explorer and the experiments all call generate(); the option names follow transformers'
generate (num_beams, length_penalty, repetition_penalty, num_return_sequences, ...).
"""

from collections.abc import Callable

import torch
from torch.nn import functional as F

class Cache:
    """What generation keeps between steps, one named tensor per kind (the keys and values of each
    trunk layer; for the Backpack also its sense-weight keys, the sense vectors and the ids). Each grows
    along its time axis inside storage allocated once for max_len positions, so a step writes in
    place instead of concatenating. `length` counts the positions held."""

    def __init__(self, max_len: int):
        self.max_len, self.length, self.store, self.filled = max_len, 0, {}, {}

    def append(self, name: str, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Write x after what `name` holds along dim; returns everything it holds now (a view)."""
        if name not in self.store:
            shape = list(x.shape)
            shape[dim] = self.max_len
            self.store[name], self.filled[name] = x.new_empty(shape), 0
        start, n = self.filled[name], x.size(dim)
        self.store[name].narrow(dim, start, n).copy_(x)
        self.filled[name] = start + n
        return self.store[name].narrow(dim, 0, start + n)

    def reorder(self, rows: torch.Tensor):
        """Keep batch rows `rows` (beam search picks which beams go on)."""
        self.store = {name: t.index_select(0, rows) for name, t in self.store.items()}



# -----------------------------------------------------------------------------
# generation: sampling strategies and beam search over next_logits, cached or not


def _check_generate_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off), got {repetition_penalty}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _left_pad(prompts: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (B, T) ids, left-padded with id 0, and each row's padding (B,)."""
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device).view(-1) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = p
    return idx, torch.tensor([T - len(p) for p in prompts], device=device)


def _process_logits(logits, idx, pad, temperature, top_k, top_p, repetition_penalty, vocab_limit):
    """Raw next-token logits (B, V) -> the logits to sample from (fp32): padded vocabulary rows
    removed, the repetition penalty (CTRL's, as transformers: divide positive logits of tokens already
    in the row by the penalty, multiply negative ones), temperature, top-k, top-p (nucleus)."""
    logits = logits.float().clone()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -float("inf")
    if repetition_penalty != 1.0:
        seen = idx if pad is None else torch.where(  # padding columns repeat the row's first real token
            torch.arange(idx.size(1), device=idx.device)[None] < pad[:, None], idx.gather(1, pad[:, None]), idx)
        score = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(score > 0, score / repetition_penalty, score * repetition_penalty))
    if temperature > 0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token once the more likely ones already cover top_p; the most likely always stays
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return logits


class _Context:
    """The growing (B, L) ids of a generation and how next_logits sees them: through a cache holding
    the current window's columns, or (uncached) as the whole window at every step. The window is the
    last block_size columns; once it slides, every position changes, so exactness with absolute
    positions means refilling the cache from the new window at each step."""

    def __init__(self, model: torch.nn.Module, idx, pad, use_cache: bool, exact_window: bool):
        self.model, self.idx, self.pad = model, idx, pad  # pad: each row's left padding (B,), or None
        self.use_cache, self.exact_window = use_cache, exact_window
        self.cache, self.start = None, 0  # the cache holds columns start .. start + cache.length - 1
        self.block_size = model.config.block_size

    def _pad_from(self, start: int):
        """Each row's padding among the columns from `start` on."""
        return None if self.pad is None else (self.pad - start).clamp(min=0)

    def next_logits(self):
        L, bs = self.idx.size(1), self.block_size
        if not self.use_cache:
            start = max(0, L - bs)
            return self.model.next_logits(self.idx[:, start:], pad=self._pad_from(start))
        if self.cache is not None and self.start + self.cache.length == L - 1 and L - self.start <= bs:
            return self.model.next_logits(self.idx[:, -1:], self.cache, self._pad_from(self.start))
        # (Re)fill: the first step, or the window slid. Exact: the last block_size columns. Approximate
        # (exact_window=False): only the last half, so the next block_size / 2 steps are cached again.
        width = L if L <= bs else (bs if self.exact_window else max(1, bs // 2))
        self.start, self.cache = L - width, Cache(bs)
        return self.model.next_logits(self.idx[:, self.start:], self.cache, self._pad_from(self.start))

    def append(self, tokens):
        self.idx = torch.cat((self.idx, tokens[:, None]), dim=1)

    def reorder(self, rows):
        """Keep rows `rows` of the batch, in that order (beam search)."""
        self.idx = self.idx.index_select(0, rows)
        self.pad = None if self.pad is None else self.pad.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


@torch.no_grad()
def generate(model: torch.nn.Module, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True, repetition_penalty: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, eos_id: int | None = None,
             stop: Callable[[list[int]], bool] | None = None, vocab_limit: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, exact_window: bool = True,
             return_logits: bool = False, num_return_sequences: int = 1):
    """Continue each prompt by up to max_new_tokens tokens, conditioning on at most the last
    block_size tokens (nanoGPT's semantics).

    idx: (B, T) ids -> (B, T + steps) ids, steps = max_new_tokens unless every row stopped early; after
    a row's stop its columns hold eos_id (-1 without one). Or a list of prompts of different lengths
    (1-D tensors or int lists) -> a list of 1-D tensors, each its prompt + its tokens up to its stop.
    temperature: 0 is greedy. top_k / top_p: None (or 0 / 1.0) is off. repetition_penalty: 1.0 is off.
    num_beams > 1: beam search (deterministic; a hypothesis scores sum log p / its generated
    length ** length_penalty); num_return_sequences <= num_beams: the that many best hypotheses of each
    prompt, best first, as rows b * n .. b * n + n - 1 (transformers' order). eos_id: a row ends after this token. stop(new ids of a row) -> True ends
    that row (stop strings). vocab_limit: ids >= vocab_limit (a padded vocabulary) get no probability.
    on_token(tokens (B,)) streams every step, -1 for rows that already ended (not with beams).
    use_cache=False recomputes the window at every step: the reference the cache must equal.
    exact_window=False: past block_size, refill the cache from the last block_size / 2 tokens and go
    on cached (fast, not exact). return_logits: also return the raw next-token logits of every step,
    (B, steps, V). Sampling draws from torch's global RNG: seed it for repeatable text."""
    _check_generate_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams)
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}] (got {num_return_sequences}): "
                         "beam search returns its best hypotheses, and sampling one text per row")
    as_list = isinstance(idx, (list, tuple))
    pad = None
    if as_list:
        idx, pad = _left_pad(idx, model.lm_head.weight.device)
        pad = pad if bool(pad.any()) else None
    B, T0 = idx.shape
    if num_beams > 1:
        if return_logits or on_token is not None:
            raise ValueError("beam search neither streams tokens nor returns per-step logits")
        best = _beam_search(model, idx, pad, max_new_tokens, num_beams, length_penalty, eos_id, stop, vocab_limit,
                            repetition_penalty, use_cache, exact_window)
        rows = torch.arange(B, device=idx.device).repeat_interleave(num_return_sequences)  # (B*n,)
        idx, pad = idx[rows], None if pad is None else pad[rows]
        new = [hyps[j] for hyps in best for j in range(num_return_sequences)]
        B = idx.size(0)
    else:
        new, step_logits = _sample(model, idx, pad, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   eos_id, stop, vocab_limit, on_token, use_cache, exact_window, return_logits)
    if as_list:
        pads = pad.tolist() if pad is not None else [0] * B
        out = [torch.cat((idx[b, p:], torch.tensor(n, dtype=torch.long, device=idx.device)))
               for b, (p, n) in enumerate(zip(pads, new))]
    else:
        out = torch.full((B, T0 + max((len(n) for n in new), default=0)), eos_id if eos_id is not None else -1,
                         dtype=torch.long, device=idx.device)
        out[:, :T0] = idx
        for b, n in enumerate(new):
            out[b, T0:T0 + len(n)] = torch.tensor(n, dtype=torch.long)
    if return_logits:
        return out, step_logits
    return out


def _sample(model, idx, pad, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, stop,
            vocab_limit, on_token, use_cache, exact_window, keep_logits):
    """Ancestral sampling (greedy at temperature 0). Returns each row's new tokens up to its stop, and
    with keep_logits the raw logits of every step, (B, steps, V) (else None: B * steps * V floats)."""
    B = idx.size(0)
    ctx = _Context(model, idx, pad, use_cache, exact_window)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    step_logits = []
    for _ in range(max_new_tokens):
        logits = ctx.next_logits()  # (B, V)
        if keep_logits:
            step_logits.append(logits.float())
        scores = _process_logits(logits, ctx.idx, ctx.pad, temperature, top_k, top_p, repetition_penalty, vocab_limit)
        if temperature == 0:
            tokens = scores.argmax(dim=-1)  # (B,)
        else:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1)[:, 0]  # (B,)
        ctx.append(tokens)  # a row that ended goes on computing, unseen: rows never mix
        ended_before = list(done)
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                new[b].append(token)
                done[b] = (eos_id is not None and token == eos_id) or (stop is not None and stop(new[b]))
        if on_token is not None:
            on_token(torch.where(torch.tensor(ended_before, device=tokens.device), -1, tokens))
        if all(done):
            break
    if not keep_logits:
        return new, None
    V = model.config.vocab_size
    return new, torch.stack(step_logits, dim=1) if step_logits else idx.new_empty(B, 0, V, dtype=torch.float)


def _beam_search(model, idx, pad, max_new_tokens, num_beams, length_penalty, eos_id, stop, vocab_limit,
                 repetition_penalty, use_cache, exact_window) -> list[list[list[int]]]:
    """Keep num_beams hypotheses per prompt; each step extends every beam by every token and looks at the
    best 2 * num_beams by sum of log-probs: those that end (eos_id or stop) join the prompt's finished
    list (its num_beams best are kept), the best num_beams others go on. A prompt is done once it has
    num_beams finished hypotheses and no running beam can still score above the worst of them; at
    max_new_tokens the running beams count as finished. Returns each prompt's num_beams best hypotheses
    (their new tokens), best first."""
    B, T0 = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(num_beams)  # (B*nb,)
    ctx = _Context(model, idx[rows], None if pad is None else pad[rows], use_cache, exact_window)
    scores = torch.zeros(B, num_beams, device=idx.device)
    scores[:, 1:] = -float("inf")  # the beams start identical: expand only the first at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (score, new tokens), best first
    done = [False] * B

    def score(total: float, n: int) -> float:
        return total / max(1, n) ** length_penalty

    def finish(b: int, hyp_score: float, hyp: list[int]):
        finished[b].append((hyp_score, hyp))
        finished[b].sort(key=lambda h: -h[0])  # stable: on a tie the earlier hypothesis stays ahead
        del finished[b][num_beams:]

    def can_improve(b: int, n: int) -> bool:
        """Whether a running beam of prompt b (n tokens generated) may still beat its worst finished one.
        Log-probs are <= 0, so a beam's sum only falls; its best reachable score is that sum over the
        most favourable length: the longest (max_new_tokens) when length_penalty > 0, else the current."""
        best_sum = scores[b].max().item()
        if best_sum == -float("inf"):  # no beam runs: every continuation ended
            return False
        if len(finished[b]) < num_beams:
            return True
        length = max_new_tokens if length_penalty > 0 else n
        return score(best_sum, length) > finished[b][-1][0]

    for step in range(max_new_tokens):
        logits = _process_logits(ctx.next_logits(), ctx.idx, ctx.pad, 0.0, None, None, repetition_penalty, vocab_limit)
        logprobs = F.log_softmax(logits, dim=-1)  # (B*nb, V)
        V = logprobs.size(-1)
        top_scores, top_index = (scores.view(-1, 1) + logprobs).view(B, -1).topk(2 * num_beams, dim=-1)  # (B, 2nb)
        kept = []  # (row, token, score) of the beams that go on
        for b in range(B):
            mine = []
            for s, i in zip(top_scores[b].tolist(), top_index[b].tolist()):
                if s == -float("inf") or done[b]:
                    break
                row, token = b * num_beams + i // V, i % V
                hyp = ctx.idx[row, T0:].tolist() + [token]
                if (eos_id is not None and token == eos_id) or (stop is not None and stop(hyp)):
                    finish(b, score(s, len(hyp)), hyp)
                elif len(mine) < num_beams:
                    mine.append((row, token, s))
            mine += [(b * num_beams, 0, -float("inf"))] * (num_beams - len(mine))  # dead beams fill up
            kept += mine
        ctx.reorder(torch.tensor([r for r, _, _ in kept], device=idx.device))
        ctx.append(torch.tensor([t for _, t, _ in kept], device=idx.device))
        scores = torch.tensor([s for _, _, s in kept], device=idx.device).view(B, num_beams)
        done = [done[b] or not can_improve(b, step + 1) for b in range(B)]
        if all(done):
            break
    for b in range(B):
        if done[b]:  # its running beams cannot win: they are not complete hypotheses either
            continue
        for j in range(num_beams):
            if scores[b, j] > -float("inf"):
                hyp = ctx.idx[b * num_beams + j, T0:].tolist()
                finish(b, score(scores[b, j].item(), len(hyp)), hyp)
    return [[hyp for _, hyp in f] + [[]] * (num_beams - len(f)) for f in finished]
