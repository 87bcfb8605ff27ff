"""
What each sense of a word predicts, and which tokens share it. For each word this prints `# word`, then
one list per sense of the tokens that sense pushes up most (the LM head applied to the sense vector),
then per sense the vocabulary tokens whose same sense is nearest by cosine.

    python experiments/sense_vector.py --device=cpu --compile=False --out_dir=out-shakespeare-char
    python experiments/sense_vector.py --out_dir=out-shakespeare-char --words=king,queen --top=8
    python experiments/sense_vector.py --out_dir=out-shakespeare-char --context="the king" --position=-1
    python experiments/sense_vector.py --init_from=backpack-small --out_dir=out-backpack-small --words=science,bank

A word of several tokens (always under a character-level tokenizer, often under GPT-2 BPE, where a word
is ' ' + word) gets the mean of its tokens' senses. --context adds the senses at one position of a text:
sense l there is sum_j alpha[l, position, j] * senses(x_j)[l], what that sense adds to the prediction.
Results: <out_dir>/experiments/sense_vector.json.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tools  # noqa: F401  (puts the repo root on sys.path)

from common import UserError, compile_model
from configurator import run_cli
from tools import (describe_source, load_backpack, read_list, results_dir, text_ids, token_strings, vocab_limit,
                   word_ids, write_json)


@dataclass
class SenseVectorConfig:
    init_from: str = "resume"  # 'resume' loads out_dir/ckpt.pt; or backpack-small, a Hugging Face directory
    out_dir: str = "out"  # the checkpoint's folder; results go to out_dir/experiments/
    words: str = "a,e,c,s,t"  # comma-separated words to look at, or a file with one word per line
    top: int = 5  # tokens listed per sense
    nearest: int = 5  # nearest tokens listed per sense; 0 skips the scan over the vocabulary
    context: str = ""  # a text: also show the senses at --position of it, weighted by alpha
    position: int = -1  # the position in --context (negative counts from the end)
    chunk_size: int = 4096  # tokens per step of the vocabulary scan; bounds its memory
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    seed: int = 1337  # random seed (nothing here is random; kept for the common flags)
    compile: bool = False  # torch.compile the sense network (pays off only for a large vocabulary scan)


def top_tokens(model, senses, limit: int, top: int) -> list[list[int]]:
    """(k, d) sense vectors -> per sense the ids of its `top` largest logits among the real tokens."""
    logits = model.lm_head(senses)[:, :limit]  # (k, limit): padded vocab rows dropped
    return logits.topk(min(top, limit), dim=-1).indices.tolist()


def nearest_tokens(model, senses, limit: int, n: int, exclude: list[list[int]], chunk_size: int):
    """senses (W, k, d) of W words -> for each word and sense, the n real tokens whose same sense is
    nearest by cosine, excluding the word's own tokens: ids and cosines, each (W, k, n); a cosine of
    -inf marks a slot left empty (fewer than n tokens after the exclusions). The vocabulary is
    scanned in chunks, keeping a running top n, so 50k tokens fit in memory."""
    W, k, _ = senses.shape
    device = senses.device
    query = F.normalize(senses, dim=-1)
    excluded = torch.zeros(W, limit, dtype=torch.bool, device=device)
    for w, ids in enumerate(exclude):
        excluded[w, [i for i in ids if i < limit]] = True
    best_cos = torch.empty(W, k, 0, device=device)
    best_ids = torch.empty(W, k, 0, dtype=torch.long, device=device)
    starts = range(0, limit, chunk_size)
    from tqdm import tqdm  # lazily, as every optional package
    for start in tqdm(starts, desc="nearest tokens", unit="chunk", disable=len(starts) < 2):
        ids = torch.arange(start, min(start + chunk_size, limit), device=device)  # (C,)
        keys = F.normalize(model.sense_vectors(ids, chunk_size), dim=-1)  # (C, k, d)
        cos = torch.einsum("wld,cld->wlc", query, keys)  # (W, k, C)
        cos = cos.masked_fill(excluded[:, None, start:start + len(ids)], float("-inf"))
        all_cos = torch.cat([best_cos, cos], dim=-1)  # (W, k, n + C)
        all_ids = torch.cat([best_ids, ids.expand(W, k, -1)], dim=-1)  # (W, k, n + C)
        best_cos, top = all_cos.topk(min(n, all_cos.size(-1)), dim=-1)  # (W, k, n)
        best_ids = all_ids.gather(-1, top)
    return best_ids, best_cos


def context_senses(model, tokenizer, context: str, position: int):
    """The senses at `position` of `context`, each alpha-weighted over the positions up to it: (k, d),
    and the entry's name."""
    ids = text_ids(tokenizer, context)
    T = len(ids)
    if not T or T > model.config.block_size:
        raise UserError(f"--context has {T} tokens; give 1 to {model.config.block_size} (the model's block_size)")
    if not -T <= position < T:
        raise UserError(f"--position={position} is outside --context's {T} tokens; use -{T} to {T - 1}")
    position %= T
    idx = torch.tensor([ids], device=model.lm_head.weight.device)
    token = token_strings(tokenizer, ids[position:position + 1])[0]
    return model.contextual_senses(idx, position)[0], f"{context!r} at position {position} ({token!r})"


@torch.no_grad()
def main(cfg: SenseVectorConfig):
    if cfg.top < 1 or cfg.nearest < 0 or cfg.chunk_size < 1:
        raise UserError(f"--top must be >= 1, --nearest >= 0 and --chunk_size >= 1 (got {cfg.top}, {cfg.nearest}, "
                        f"{cfg.chunk_size})")
    # --words="" is fine with a --context; read_list says what to pass when both are missing
    words = read_list(cfg.words, "words") if cfg.words or not cfg.context else []
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_backpack(cfg.init_from, cfg.out_dir, cfg.device, "sense_vector.py")
    if cfg.compile:
        probe = torch.zeros(1, dtype=torch.long, device=model.lm_head.weight.device)
        model.sense_network = compile_model(model.sense_network, lambda net: net(model.transformer.wte(probe)))
    limit = vocab_limit(model, tokenizer)

    # every entry: a name, the ids its senses come from, and its (k, d) senses
    entries = []
    for word in words:
        ids = word_ids(tokenizer, word)  # a word the tokenizer cannot encode is a one-line error
        senses = model.sense_vectors(torch.tensor(ids, device=model.lm_head.weight.device)).mean(0)  # (k, d)
        entries.append((word, ids, senses))
    if cfg.context:
        senses, name = context_senses(model, tokenizer, cfg.context, cfg.position)
        entries.append((name, [], senses))

    stacked = torch.stack([s for _, _, s in entries])  # (W, k, d)
    if cfg.nearest:
        near_ids, near_cos = nearest_tokens(model, stacked, limit, cfg.nearest, [ids for _, ids, _ in entries],
                                            cfg.chunk_size)
    results = []
    for w, (name, ids, senses) in enumerate(entries):
        top = [token_strings(tokenizer, row) for row in top_tokens(model, senses, limit, cfg.top)]
        print(f"# {name}")
        print(top)  # the seed's format: one list per sense, [['t', 'l', 'r', 'n', ' '], ['y', ...], ...]
        entry = {"word": name, "ids": ids, "pieces": token_strings(tokenizer, ids), "top_tokens": top}
        if cfg.nearest:
            near = [[(t, c) for t, c in zip(token_strings(tokenizer, ids_l), cos_l) if c > float("-inf")]
                    for ids_l, cos_l in zip(near_ids[w].tolist(), near_cos[w].tolist())]  # per sense
            print(f"nearest per sense: {[[t for t, _ in row] for row in near]}")
            entry["nearest"] = [[[t, round(c, 4)] for t, c in row] for row in near]
        results.append(entry)
    path = write_json(os.path.join(results_dir(cfg.out_dir), "sense_vector.json"),
                      {"source": describe_source(cfg.init_from, cfg.out_dir), "n_senses": stacked.size(1),
                       "top": cfg.top, "nearest": cfg.nearest, "words": results})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    run_cli(main, SenseVectorConfig)
