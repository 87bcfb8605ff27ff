"""
Steering a Backpack through its sense vectors, with no training: the pieces that topic_control.py,
debias.py and edit.py share (and the browser explorer reuses). Each intervention is a sense hook, a
callable (idx (B, T), senses (B, T, k, d)) -> senses that `with model.hooked(hook):` installs; the
model applies it after the sense network and before the mixing, in forward and in generate (cached
or not), so alpha and the transformer are never touched.

The algorithms are those of the paper's experiments (Hewitt et al. 2023, Section 5):
- topic control: score every (word, sense) by its max-normalised logits on the topic words, turn the
  scores into multipliers by their quantiles q60/q80/q95 (STRENGTHS), and reweight the senses during
  generation with an annealing that lowers the boost once a sense's predictions are in the text;
- debiasing: scale one sense of a word (scale_hook); a GPT's baseline projects the gender direction out
  of the word's input embedding (project_out);
- knowledge editing: every sense c of a word becomes c - (c.o/|o|^2) o + (c.o/|i|^2) i (edit_senses).
The functions here are pure: they take tensors (or a model to read from) and return tensors or hooks.
"""

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tools

# multipliers [m0, m1, m2, m3] per topic strength, for scores above q95, in (q80, q95), in (q60, q80)
# and below q60 (the paper's table; a score exactly on a quantile keeps 1, as in the paper's code)
STRENGTHS = [[1.0, 1.0, 1.0, 1.0], [1.5, 1.5, 1.3, 1.0], [2.2, 2.2, 1.5, 1.0], [3.3, 3.3, 3.0, 1.0]]


# -----------------------------------------------------------------------------
# topic control


def topic_target(word_pieces: list[list[int]], vocab_size: int) -> torch.Tensor:
    """The topic as a weight per token id, (vocab_size,): each word's pieces share a weight of 1, so a
    word of several pieces counts as much as a one-piece word. (The paper's code kept only the first
    BPE piece; under a character vocabulary that would be the word's first letter alone.)"""
    target = torch.zeros(vocab_size)
    for pieces in word_pieces:
        for p in pieces:
            target[p] += 1.0 / len(pieces)
    return target


@torch.no_grad()
def sense_logits(model, vocab_size: int, word_ids: list[int], budget: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token v < vocab_size and sense l: the top logit the sense gives, max_u C(v)_l . E[u]
    over the tokenizer's ids u, (V, k); and its logits on word_ids, (V, k, n). One pass over the
    vocabulary (V * k * V dot products, the expensive part of topic scoring) serves any number of
    topics. Done in chunks of about `budget` logits, so (V, k, V) never exists at once."""
    E = model.lm_head.weight[:vocab_size]  # (V, d)
    words = torch.as_tensor(word_ids, dtype=torch.long, device=E.device)
    k = model.config.n_senses
    top, at = torch.empty(vocab_size, k), torch.empty(vocab_size, k, len(words))
    chunk = max(1, budget // (k * vocab_size))
    for start in tqdm(range(0, vocab_size, chunk), desc="scoring every sense", leave=False, mininterval=2):
        ids = torch.arange(start, min(start + chunk, vocab_size), device=E.device)
        logits = model.sense_vectors(ids) @ E.T  # (m, k, V)
        top[start:start + len(ids)] = logits.amax(-1).float().cpu()
        at[start:start + len(ids)] = logits[..., words].float().cpu()
    return top, at


def scores_from_logits(top: torch.Tensor, at: torch.Tensor, weights: torch.Tensor, n_rows: int,
                       skip_ids=()) -> torch.Tensor:
    """score[v, l] = sum_w weights[w] C(v)_l . E[w] / max_u C(v)_l . E[u]: the max-normalised logits that
    sense l of token v gives the topic's words, (n_rows, k). top (V, k) and at (V, k, n) come from
    sense_logits; weights (n,) from topic_target at its word ids. Rows from V on (a padded
    vocabulary's) and skip_ids (end-of-text) score 0."""
    V, k = top.shape
    scores = torch.zeros(n_rows, k)
    # a sense whose logits are all negative would flip sign when divided by its max: clamp the max
    scores[:V] = (at @ weights.float()) / top.clamp(min=1e-6)
    scores[list(skip_ids)] = 0.0
    return scores


def topic_scores(model, target: torch.Tensor, vocab_size: int, skip_ids=()) -> torch.Tensor:
    """One topic's scores (model vocab, k) from its target weights (model vocab,) (topic_target):
    sense_logits on the topic's ids, then scores_from_logits. Over the tokenizer's ids < vocab_size."""
    words = target[:vocab_size].nonzero()[:, 0].tolist()
    top, at = sense_logits(model, vocab_size, words)
    return scores_from_logits(top, at, target[words], model.config.vocab_size, skip_ids)


def topic_multipliers(scores: torch.Tensor, strength: int, vocab_size: int | None = None) -> torch.Tensor:
    """Multipliers (V, k) from the score quantiles q60/q80/q95 of the first vocab_size rows (the
    tokenizer's ids; other rows keep 1), by the strength's row of STRENGTHS."""
    if not 0 <= strength < len(STRENGTHS):
        raise ValueError(f"strength must be 0..{len(STRENGTHS) - 1}, got {strength}")
    m0, m1, m2, m3 = STRENGTHS[strength]
    real = scores[:vocab_size]  # (V', k)
    q60, q80, q95 = torch.quantile(real.flatten().float(), torch.tensor([0.6, 0.8, 0.95])).tolist()
    m = torch.ones_like(scores)
    view = m[:vocab_size]
    view[real > q95] = m0
    view[(real > q80) & (real < q95)] = m1
    view[(real > q60) & (real < q80)] = m2
    view[real < q60] = m3
    return m


def anneal_scale(strength: int) -> float:
    """a = max(multipliers) / 7.5, the paper's annealing scale."""
    return max(STRENGTHS[strength]) / 7.5


def topic_hook(multipliers: torch.Tensor, E: torch.Tensor, a: float):
    """The annealed topic reweighting, causal. For token x_i at position i and sense l:
        sims[i, l] = sum_{j <= i} ReLU(C(x_i)_l . E[x_j])       (what sense l already sees in the text)
        s = sigmoid(-a * sims + 6) * (1 + i / 100)
        w[i, l] = 1 + s * (m[x_i, l] - 1);   C(x_i)_l <- w[i, l] C(x_i)_l
    so a topical sense is boosted until the words it predicts appear. This is the causal form of the
    paper's annealing, whose sum ran over every position of the sequence, later ones included: there a
    token's weight changed with text written after it. Here position i's weight depends only on
    tokens 0..i, so forward stays causal and every generation step sees the same past weights.
    multipliers: (V, k) from topic_multipliers; E: the LM head (V, d)."""
    multipliers = multipliers.to(E.device)

    def hook(idx, senses):
        T = idx.size(1)
        logits = torch.einsum("bild,bjd->bilj", senses, E[idx].to(senses.dtype))  # (B, T, k, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # [i, j]: j <= i
        sims = (logits.relu() * causal[None, :, None, :]).sum(-1)  # (B, T, k)
        pos = torch.arange(T, device=idx.device, dtype=sims.dtype)
        s = torch.sigmoid(6 - a * sims) * (1 + pos / 100)[None, :, None]  # (B, T, k)
        w = 1 + s * (multipliers[idx].to(s.dtype) - 1)  # (B, T, k); exactly 1 where m = 1
        return senses * w[..., None].to(senses.dtype)
    return hook


# -----------------------------------------------------------------------------
# scaling and replacing the senses of chosen tokens


def scale_hook(token_ids: list[int], senses: list[int], factor: float):
    """Multiply senses `senses` of every occurrence of token_ids by factor (debiasing, the explorer's
    sense sliders). Factor 1 leaves the senses as they are; 0 removes those senses' contribution."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)

    def hook(idx, s):
        scale = torch.ones(s.size(2), dtype=s.dtype, device=s.device)
        scale[senses] = factor
        hit = torch.isin(idx, ids.to(idx.device))  # (B, T)
        return torch.where(hit[..., None, None], s * scale[:, None], s)
    return hook


def replace_hook(token_ids: list[int], new_senses: torch.Tensor):
    """Replace all k senses of every occurrence of token_ids[n] by new_senses[n], (N, k, d)."""
    def hook(idx, s):
        out = s.clone()
        for token, new in zip(token_ids, new_senses):
            out[idx == token] = new.to(s)
        return out
    return hook


def edit_senses(c: torch.Tensor, o: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The paper's knowledge edit of sense vectors c (..., d): remove the component along the out word's
    embedding o and add the same coefficient along the in word's i, rescaled by |o|^2 / |i|^2:
    c - (c.o/|o|^2) o + (c.o/|i|^2) i. The part removed gave the out word a logit of c.o; the part
    added gives the in word the same c.o."""
    coef = (c @ o)[..., None]  # (..., 1)
    return c - coef / o.dot(o) * o + coef / i.dot(i) * i


def project_out(e: torch.Tensor, g: torch.Tensor, factor: float) -> torch.Tensor:
    """The GPT debiasing baseline: keep `factor` of e's component along the direction g (0 removes it,
    1 leaves e as it is): e - (1 - factor) (e.g/|g|^2) g."""
    return e - (1 - factor) * (e @ g) / g.dot(g) * g


# -----------------------------------------------------------------------------
# reading probabilities of words after prompts


def continuation_ids(tokenizer, word: str) -> list[int]:
    """The ids of a word as it follows a prompt: ' ' + word under GPT-2 BPE (tools.word_ids), and the
    space character too under a character vocabulary."""
    return tools.word_ids(tokenizer, word if tokenizer.chars is None else " " + word)


def next_token_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Raw next-token logits after each prompt, (B, V), in one left-padded batch; generate crops each
    prompt to the last block_size tokens and honours the model's sense hook."""
    _, logits = model.generate([torch.tensor(p, dtype=torch.long) for p in prompts], 1, temperature=0,
                               return_logits=True)
    return logits[:, 0]  # (B, V)


def word_logprobs(model, prompts: list[list[int]], words: list[list[int]], vocab_size: int) -> torch.Tensor:
    """log p(word | prompt) for every prompt and word, (B, W): the sum over the word's pieces of the
    log-probability of each piece after the prompt and the pieces before it (for a one-token word,
    its next-token log-probability). Probabilities are over the tokenizer's ids (< vocab_size)."""
    contexts: dict[tuple, int] = {}  # every distinct context once
    for p in prompts:
        for w in words:
            for m in range(len(w)):
                contexts.setdefault(tuple(p) + tuple(w[:m]), len(contexts))
    logp = F.log_softmax(next_token_logits(model, [list(c) for c in contexts])[:, :vocab_size].float(), dim=-1)
    out = torch.zeros(len(prompts), len(words))
    for b, p in enumerate(prompts):
        for j, w in enumerate(words):
            out[b, j] = sum(logp[contexts[tuple(p) + tuple(w[:m])], w[m]] for m in range(len(w)))
    return out
