"""
Lexical similarity, as in the Backpack paper: how well the cosine of two words' vectors ranks word pairs
like people do (Spearman rho against the human scores) on SimLex-999, SimVerb-3500, RG65 and WS353.

    python experiments/lexical_similarity.py --out_dir=out-shakespeare-char
    python experiments/lexical_similarity.py --out_dir=out-shakespeare-char --use_senses=False
    python experiments/lexical_similarity.py --init_from=backpack-small --out_dir=out-backpack-small
    python experiments/lexical_similarity.py --init_from=backpack-small --out_dir=out-backpack-small --use_senses=False
    python experiments/lexical_similarity.py --init_from=gpt2 --out_dir=out-gpt2 --use_senses=False

Word vectors: the senses of a Backpack (k*d, flattened; --use_senses=True), or the rows of the embedding
matrix E (--use_senses=False; also for a GPT). A word is tokenized as ' ' + word under GPT-2 BPE (how it
appears mid-sentence) and as its characters under a character-level tokenizer; a word of several tokens
gets the mean of its tokens' vectors, or its first token's with --first_piece=True. A pair with a word
the tokenizer cannot encode is skipped and counted.

Similarity functions: Cos (the flattened vectors); with senses also, from the k x k matrix of cosines
between sense l of one word and sense m of the other, MinPair/MaxPair (min/max over l = m), MinAll/MaxAll
(min/max over all l, m) and CosSense<l> (l = m, one sense).

The data: --data_dir holds the four files exactly as the paper's repository ships them
(github.com/john-hewitt/backpacks-flash-attn, training/data/). A missing file is downloaded from there
(raw.githubusercontent.com at a pinned commit, see SOURCE; sha256 checked) unless --download=False.
Cite the datasets' authors when you use them:
    SimLex-999/SimLex-999.txt  999 pairs   Hill, Reichart and Korhonen 2015
    SimVerb-3500.txt           3500 pairs  Gerz, Vulic, Hill, Reichart and Korhonen 2016
    RG65.csv                   65 pairs    Rubenstein and Goodenough 1965
    WS353.csv                  353 pairs   Finkelstein et al. 2002 (WordSim-353)
Results: <out_dir>/experiments/lexical_similarity_{senses,embeddings}.json.
"""

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import tools  # noqa: F401  (puts the repo root on sys.path)
from common import UserError, first_line
from configurator import run_cli
from tools import describe_source, load_any, load_backpack, read_list, results_dir, word_ids, write_json


@dataclass
class LexicalSimilarityConfig:
    init_from: str = "resume"  # 'resume' loads out_dir/ckpt.pt; or gpt2*, backpack-small, a Hugging Face directory
    out_dir: str = "out"  # the checkpoint's folder; results go to out_dir/experiments/
    data_dir: str = "data/lexsim"  # holds SimLex-999/SimLex-999.txt, SimVerb-3500.txt, RG65.csv, WS353.csv
    download: bool = True  # fetch a missing dataset file into data_dir from its public source
    datasets: str = "simlex999,simverb3500,rg65,ws353"  # comma-separated, any of these four
    use_senses: bool = True  # True: the senses (k*d) of a Backpack; False: the embedding rows (any model)
    first_piece: bool = False  # a word of several tokens: its first token instead of the mean of all
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    seed: int = 1337  # random seed (nothing here is random; kept for the common flags)


class Dataset(NamedTuple):
    path: str  # under data_dir
    sep: str  # field separator
    header: bool  # the first line names the columns
    score_column: int  # the human score; the words are columns 0 and 1
    pairs: int  # how many pairs the file has
    sha256: str  # of the file the paper's repository ships


SOURCE = ("https://raw.githubusercontent.com/john-hewitt/backpacks-flash-attn/"
          "d60371d8473b850a308dc091ce5db013ab32efe5/training/data/")
DATASETS = {
    "simlex999": Dataset("SimLex-999/SimLex-999.txt", "\t", True, 3, 999,
                         "ca00ff8515a36cde32d13c2b83def23f5a167b67db93ebfcfb7dae039ba22c0b"),
    "simverb3500": Dataset("SimVerb-3500.txt", "\t", False, 3, 3500,
                           "b58f68454cf9354b94ecd8bfd778ff2cc784a25fc7dca02bc695319ad2b4157e"),
    "rg65": Dataset("RG65.csv", ";", False, 2, 65,
                    "bf02365e889978104e2c5422d91176b34c4862c267269ef6174263f16c86cab5"),
    "ws353": Dataset("WS353.csv", ",", True, 2, 353,
                     "49ff6433ae68abe716fb66433fd870483e289a7a8c74531f59eca847d103fff3"),
}


def download(url: str, path: str, sha256: str):
    """url -> path, written only once its sha256 matches (a partial or wrong file never lands)."""
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"could not download {url} ({first_line(e)}); download it by hand to {path}, "
                        "or pass --data_dir") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{url} does not have the expected sha256; download it by hand to {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "wb") as f:
        f.write(data)
    os.replace(f"{path}.tmp", path)


def dataset_file(data_dir: str, name: str, allow_download: bool) -> str:
    path = os.path.join(data_dir, DATASETS[name].path)
    if not os.path.exists(path):
        if not allow_download:
            raise UserError(f"{path} not found; pass the --data_dir that holds it, or --download=True")
        download(SOURCE + DATASETS[name].path, path, DATASETS[name].sha256)
    return path


def load_pairs(path: str, dataset: Dataset) -> list[tuple[str, str, float]]:
    """(word1, word2, human score) of every pair in one dataset file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[1 if dataset.header else 0:]
    pairs = []
    for n, line in enumerate(lines, 2 if dataset.header else 1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(dataset.sep)]  # RG65 has trailing spaces
        try:
            pairs.append((fields[0], fields[1], float(fields[dataset.score_column])))
        except (IndexError, ValueError):
            raise UserError(f"{path} line {n} is not a word pair with a score: {line[:60]!r}; "
                            "is this the right file?") from None
    return pairs


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties getting the mean of the ranks they span (what Spearman needs)."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)  # runs of equal values
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # a run at first..first+c-1: mean rank
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's correlation of the ranks; nan when either side is constant."""
    rx = rankdata(np.asarray(x, dtype=np.float64))
    ry = rankdata(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def word_vectors(model, tokenizer, words: list[str], use_senses: bool, first_piece: bool):
    """{word: row} and the rows, (W, k, d) senses or (W, d) embeddings, for the words the tokenizer can
    encode; and the list of those it cannot."""
    pieces, unencodable = {}, []
    for word in words:
        try:
            ids = word_ids(tokenizer, word)
        except UserError:
            unencodable.append(word)
            continue
        pieces[word] = ids[:1] if first_piece else ids
    if not pieces:
        raise UserError(f"the tokenizer can encode none of the {len(words)} words; use a model whose vocabulary "
                        "covers English letters")
    device = model.lm_head.weight.device
    unique = torch.tensor(sorted({i for ids in pieces.values() for i in ids}), dtype=torch.long, device=device)
    # senses depend on the token id alone: run the sense network once per distinct token
    table = model.sense_vectors(unique) if use_senses else model.lm_head.weight[unique]  # (U, k, d) or (U, d)
    where = {int(i): n for n, i in enumerate(unique.tolist())}
    rows = torch.stack([table[[where[i] for i in ids]].mean(0) for ids in pieces.values()])  # (W, k, d) or (W, d)
    return {word: n for n, word in enumerate(pieces)}, rows.float(), unencodable


def similarities(a, b) -> dict[str, torch.Tensor]:
    """Vectors of the pairs' first and second words, (P, d) or (P, k, d) -> {function: (P,) scores}."""
    scores = {"Cos": F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)}
    if a.dim() == 3:
        cos = torch.einsum("pld,pmd->plm", F.normalize(a, dim=-1), F.normalize(b, dim=-1))  # (P, k, k)
        same = cos.diagonal(dim1=1, dim2=2)  # (P, k): sense l of one word against sense l of the other
        scores |= {"MinPair": same.min(1).values, "MaxPair": same.max(1).values,
                   "MinAll": cos.flatten(1).min(1).values, "MaxAll": cos.flatten(1).max(1).values}
        scores |= {f"CosSense{l}": same[:, l] for l in range(same.size(1))}
    return scores


def format_table(rho: dict, counts: dict) -> str:
    names = list(counts)
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'function':<12}" + "".join(f"{n:>{width}}" for n in names)]
    for fn, row in rho.items():
        lines.append(f"{fn:<12}" + "".join(f"{row.get(n, float('nan')):>{width}.4f}" for n in names))
    lines.append(f"{'pairs scored':<12}" + "".join(f"{c['scored']}/{c['pairs']}".rjust(width) for c in counts.values()))
    return "\n".join(lines)


@torch.no_grad()
def main(cfg: LexicalSimilarityConfig):
    names = read_list(cfg.datasets, "datasets")
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise UserError(f"--datasets names {','.join(unknown)}; choose from {','.join(DATASETS)}")
    data = {n: load_pairs(dataset_file(cfg.data_dir, n, cfg.download), DATASETS[n]) for n in names}
    if cfg.use_senses:
        model, tokenizer = load_backpack(cfg.init_from, cfg.out_dir, cfg.device,
                                         "lexical_similarity.py with --use_senses=True")
    else:
        model, tokenizer = load_any(cfg.init_from, cfg.out_dir, cfg.device)

    words = sorted({w for pairs in data.values() for p in pairs for w in p[:2]})
    row, vectors, unencodable = word_vectors(model, tokenizer, words, cfg.use_senses, cfg.first_piece)
    rho, counts = {}, {}
    for name, pairs in data.items():
        scored = [p for p in pairs if p[0] in row and p[1] in row]
        counts[name] = {"pairs": len(pairs), "scored": len(scored), "skipped": len(pairs) - len(scored)}
        if not scored:
            continue
        a = vectors[[row[p[0]] for p in scored]]
        b = vectors[[row[p[1]] for p in scored]]
        gold = [p[2] for p in scored]
        for fn, predicted in similarities(a, b).items():
            rho.setdefault(fn, {})[name] = spearman(predicted.cpu().numpy(), gold)

    kind = "senses" if cfg.use_senses else "embeddings"
    source = describe_source(cfg.init_from, cfg.out_dir)
    pooling = "first piece" if cfg.first_piece else "mean of pieces"
    print(f"Spearman rho, {source}, {kind} ({pooling})")
    print(format_table(rho, counts))
    if unencodable:
        print(f"{len(unencodable)} words the tokenizer cannot encode were skipped: {', '.join(unencodable[:10])}"
              + (" ..." if len(unencodable) > 10 else ""))
    finite = {fn: {n: row[n] if n in row and row[n] == row[n] else None for n in names} for fn, row in rho.items()}
    path = write_json(os.path.join(results_dir(cfg.out_dir), f"lexical_similarity_{kind}.json"), {
        "source": source, "vectors": kind, "pooling": pooling, "spearman": finite, "pairs": counts,
        "unencodable_words": unencodable})
    print(f"wrote {path}")
    return {"spearman": rho, "pairs": counts, "unencodable_words": unencodable}


if __name__ == "__main__":
    run_cli(main, LexicalSimilarityConfig)
