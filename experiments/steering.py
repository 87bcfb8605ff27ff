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

import hashlib
import os

import torch
import torch.nn.functional as F

import tools  # first of the repo's modules: it puts the repo root on sys.path
from generate import generate

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


def chunk_tokens(n_senses: int, n_columns: int, budget: int = 2**26) -> int:
    """Tokens per chunk of the scoring pass: their n_senses rows times n_columns logits fit in about
    `budget` floats (256 MB in float32 by default), so (V, k, V) never exists at once. Large enough for
    a matrix product near the machine's peak (about 80 tokens, 1300 rows, at 16 senses and 50257
    columns); bench.py --mode=topic times the same chunks."""
    return max(1, budget // (n_senses * n_columns))


@torch.no_grad()
def sense_logits(model, vocab_size: int, word_ids: list[int], budget: int = 2**26,
                 top: torch.Tensor | None = None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token v < vocab_size and sense l: the top logit the sense gives, max_u C(v)_l . E[u]
    over the tokenizer's ids u, (V, k); and its logits on word_ids, (V, k, n). One pass over the
    vocabulary serves any number of topics: V * k * V dot products, a matrix product done chunk by
    chunk into one reused buffer, then a max over each row. Pass `top` (from a cache) to skip that
    product: what is left is the sense network and the logits on the n words. rows: score only the
    ids < rows (still against all vocab_size columns; bench.py times such a fraction)."""
    E = model.lm_head.weight[:vocab_size]  # (V, d)
    words = E[torch.as_tensor(word_ids, dtype=torch.long, device=E.device)]  # (n, d)
    k, rows = model.config.n_senses, vocab_size if rows is None else rows
    at = torch.empty(rows, k, len(word_ids))
    new_top = top is None
    chunk = chunk_tokens(k, vocab_size, budget)
    if new_top:
        top = torch.empty(rows, k)
        buf = torch.empty(min(chunk, rows) * k, vocab_size, dtype=E.dtype, device=E.device)  # (m*k, V), reused
    # The sense network runs on groups of about 1000 tokens: on a chunk's ~80 it costs 3x as much per
    # token (its 4d x k*d final weight is read once per call), over a quarter of the product's time.
    group = max(chunk, 1024 // chunk * chunk)
    starts = range(0, rows, group)
    if new_top and rows > chunk:  # minutes for a GPT-2 vocabulary: show progress on a terminal
        from tqdm import tqdm
        starts = tqdm(starts, desc="scoring every sense", leave=False, mininterval=2, disable=None)
    for g in starts:
        senses = model.sense_vectors(torch.arange(g, min(g + group, rows), device=E.device))  # (G, k, d)
        at[g:g + len(senses)] = (senses @ words.T).float().cpu()  # (G, k, n)
        if new_top:
            flat, out = senses.flatten(0, 1), top.view(-1)[g * k:]  # (G*k, d) token-major, as top's rows
            for r in range(0, len(flat), chunk * k):
                a = flat[r:r + chunk * k]  # (m*k, d)
                logits = torch.matmul(a, E.T, out=buf[:len(a)])  # (m*k, V)
                out[r:r + len(a)] = logits.amax(-1).float().cpu()
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


def topic_scores(model, target: torch.Tensor, vocab_size: int, skip_ids=(), cache_for=None) -> torch.Tensor:
    """One topic's scores (model vocab, k) from its target weights (model vocab,) (topic_target), over
    the tokenizer's ids < vocab_size. cache_for: see many_topic_scores."""
    return many_topic_scores(model, [target], vocab_size, skip_ids, cache_for)[0]


def many_topic_scores(model, targets: list[torch.Tensor], vocab_size: int, skip_ids=(),
                      cache_for=None) -> list[torch.Tensor]:
    """Each topic's scores (model vocab, k), from one sense_logits pass for all of them. cache_for: a
    config with the model's init_from and out_dir (TopicConfig, ExploreConfig): the tops and each
    topic's scores are then kept on disk (cache_folder), keyed by the model's weights, so a model pays
    the costly pass once; None: no disk cache."""
    n_rows = model.config.vocab_size
    topics = []  # (word ids < vocab_size, their weights) per target
    for target in targets:
        words = target[:vocab_size].nonzero()[:, 0].tolist()
        topics.append((words, target[words].float()))
    folder = cache_folder(cache_for.init_from, cache_for.out_dir) if cache_for is not None else None
    if folder is not None:
        model_key = weights_key(model, vocab_size)
        topic_keys = [digest(f"{model_key} topic {words} {w.tolist()} skip {sorted(skip_ids)}".encode())
                      for words, w in topics]
        scores = [read_cache(folder, key, (n_rows, model.config.n_senses)) for key in topic_keys]
    else:
        scores = [None] * len(targets)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        top = read_cache(folder, model_key, (vocab_size, model.config.n_senses)) if folder else None
        ids = sorted({i for j in missing for i in topics[j][0]})
        new_top = top is None
        top, at = sense_logits(model, vocab_size, ids, top=top)
        if folder is not None and new_top:
            write_cache(folder, model_key, top)
        for j in missing:
            words, weights = topics[j]
            scores[j] = scores_from_logits(top, at[..., [ids.index(i) for i in words]], weights, n_rows, skip_ids)
            if folder is not None:
                write_cache(folder, topic_keys[j], scores[j])
    return scores


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
    _, logits = generate(model, [torch.tensor(p, dtype=torch.long) for p in prompts], 1, temperature=0,
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


# -----------------------------------------------------------------------------
# the disk cache of topic scoring
#
# What scoring reads from a model (its sense network, wte and LM head, and its config) is hashed into
# a key: a file is used only when its key matches, so a retrained or edited model never reads another
# model's scores, and the same weights loaded again (another run of topic_control.py, the explorer
# restarted) read them back. Each file also stores its tensor's hash, checked on reading, so a file
# that was truncated or changed is recomputed and rewritten, never trusted.

CACHE_VERSION = 1  # part of every key: raise it when the scoring maths changes, and old files miss


def cache_folder(init_from: str, out_dir: str) -> str:
    """Where a model's topic scores are kept. A checkpoint trained here (init_from=resume): beside it,
    in <out_dir>/experiments/topic_cache/ with the other results, so the cache moves and goes with
    the run that made it. A pretrained model (backpack-small, a Hugging Face directory): its folder
    is not ours (a hub snapshot, maybe read-only) and out_dir says nothing about it, so the user's
    cache directory, $XDG_CACHE_HOME/nano-backpacklm/topic_cache (~/.cache/... by default), which
    every run of the same model shares."""
    if init_from == "resume":
        return os.path.join(out_dir, "experiments", "topic_cache")
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "nano-backpacklm", "topic_cache")


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bfloat16 too), on the CPU."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def weights_key(model, vocab_size: int) -> str:
    """A hash of what topic scoring reads: the config, the sense network, wte and the LM head (hashed
    once when tied to wte), and the number of ids scored. About 0.5 s for backpack-small, against
    minutes for the pass it saves; the trunk and alpha are left out, since the scores never read them."""
    h = hashlib.sha256(f"topic scoring v{CACHE_VERSION}, {vocab_size} ids, {model.config}".encode())
    tensors = {"wte": model.transformer.wte.weight, "lm_head": model.lm_head.weight}
    tensors.update({f"sense_network.{n}": t for n, t in model.sense_network.state_dict().items()})
    seen = set()
    for name, t in tensors.items():
        tied = t.data_ptr() in seen
        seen.add(t.data_ptr())
        h.update(f"{name} {t.dtype} {tuple(t.shape)} {'tied' if tied else ''}".encode())
        if not tied:
            h.update(tensor_bytes(t))
    return h.hexdigest()


def read_cache(folder: str, key: str, shape: tuple) -> torch.Tensor | None:
    """The tensor cached under key, or None when there is none or the file fails a check (then one
    line says so and the caller recomputes it)."""
    path = os.path.join(folder, f"{key[:32]}.pt")
    if not os.path.exists(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        t = blob["tensor"]
        ok = (blob["key"] == key and t.dtype == torch.float32 and tuple(t.shape) == tuple(shape)
              and blob["digest"] == digest(tensor_bytes(t)))
    except Exception:  # truncated, not a torch file, missing fields
        ok = False
    if not ok:
        print(f"ignoring the damaged or foreign topic cache file {path}; recomputing it")
        return None
    return t


def write_cache(folder: str, key: str, t: torch.Tensor):
    """Save under key, atomically (a temporary file, then a rename), so a crash or a second process
    never leaves half a file under the real name. A folder we cannot write is a warning, not an error."""
    path = os.path.join(folder, f"{key[:32]}.pt")
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"key": key, "tensor": t, "digest": digest(tensor_bytes(t))}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        print(f"could not cache topic scores in {folder} ({e}); they will be recomputed next time")
