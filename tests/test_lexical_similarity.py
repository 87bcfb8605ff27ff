"""
experiments/lexical_similarity.py: the dataset loaders (fixtures, and the real files when shared), Spearman
against scipy, the similarity functions against their definitions, senses and embeddings on tiny random
models (test_sense_vector.py's checkpoints), the checked download.
"""

import hashlib
import os
import sys

import numpy as np
import pytest
import torch

from checkpoint import checkpoint_dict, save_checkpoint
from common import UserError
from conftest import REPO, shared_file
from model import build_model
from test_sense_vector import (  # noqa: F401  (backpack_dir, gpt_dir: fixtures)
    CHARS, LEXSIM_FIXTURES, N_SENSES, assert_cli_basics, backpack_dir, gpt_dir, load, run_script)

sys.path.insert(0, os.path.join(REPO, "experiments"))
import lexical_similarity as lexsim  # noqa: E402

FIXTURE_PAIRS = {"simlex999": 6, "simverb3500": 5, "rg65": 5, "ws353": 6}


def test_lexsim_loader_reads_the_fixtures():
    for name, n in FIXTURE_PAIRS.items():
        pairs = lexsim.load_pairs(lexsim.dataset_file(LEXSIM_FIXTURES, name, False), lexsim.DATASETS[name])
        assert len(pairs) == n and all(isinstance(p[2], float) for p in pairs)
    rg = lexsim.load_pairs(os.path.join(LEXSIM_FIXTURES, "RG65.csv"), lexsim.DATASETS["rg65"])
    assert rg[0] == ("cord", "smile", 0.1)  # trailing spaces and CRLF stripped


def test_lexsim_loader_reads_the_real_files():
    data_dir = os.path.dirname(shared_file("lexsim/RG65.csv", "the four lexical-similarity files",
                                           "experiments/lexical_similarity.py downloads them into data/lexsim"))
    for name, spec in lexsim.DATASETS.items():
        path = lexsim.dataset_file(data_dir, name, False)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == spec.sha256
        pairs = lexsim.load_pairs(path, spec)
        assert len(pairs) == spec.pairs  # 999, 3500, 65, 353
    assert lexsim.load_pairs(os.path.join(data_dir, "SimLex-999/SimLex-999.txt"), lexsim.DATASETS["simlex999"])[0] \
        == ("old", "new", 1.58)


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr
    gold = [p[2] for name in FIXTURE_PAIRS for p in lexsim.load_pairs(
        lexsim.dataset_file(LEXSIM_FIXTURES, name, False), lexsim.DATASETS[name])]  # has ties
    rng = np.random.default_rng(0)
    cases = [(gold, rng.normal(size=len(gold))), (gold, rng.integers(0, 3, len(gold)))]
    cases += [(rng.integers(0, 4, 50), rng.integers(0, 5, 50)) for _ in range(5)]
    cases += [(rng.normal(size=200), rng.normal(size=200)), ([1, 2, 3], [3, 2, 1])]
    for x, y in cases:
        assert abs(lexsim.spearman(x, y) - spearmanr(x, y).statistic) < 1e-12
    assert np.array_equal(lexsim.rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert np.isnan(lexsim.spearman([1, 1, 1], [1, 2, 3]))


def test_lexical_similarity_senses_and_embeddings(backpack_dir, gpt_dir, capsys):
    out = lexsim.main(lexsim.LexicalSimilarityConfig(out_dir=backpack_dir, data_dir=LEXSIM_FIXTURES, download=False))
    assert list(out["spearman"]) == ["Cos", "MinPair", "MaxPair", "MinAll", "MaxAll"] + \
        [f"CosSense{l}" for l in range(N_SENSES)]
    assert {n: c["scored"] for n, c in out["pairs"].items()} == {**FIXTURE_PAIRS, "ws353": 5}
    assert out["pairs"]["ws353"]["skipped"] == 1 and out["unencodable_words"] == ["Z\u00fcrich"]
    printed = capsys.readouterr().out
    assert "pairs scored" in printed and "5/6" in printed and "1 words the tokenizer cannot encode" in printed
    for folder in (backpack_dir, gpt_dir):  # the embedding rows: a GPT works too
        out = lexsim.main(lexsim.LexicalSimilarityConfig(out_dir=folder, data_dir=LEXSIM_FIXTURES,
                                                         download=False, use_senses=False, first_piece=True))
        assert list(out["spearman"]) == ["Cos"] and all(-1 <= r <= 1 for r in out["spearman"]["Cos"].values())
    with pytest.raises(UserError, match="is a GPT.*--use_senses=False"):
        lexsim.main(lexsim.LexicalSimilarityConfig(out_dir=gpt_dir, data_dir=LEXSIM_FIXTURES, download=False))


def test_lexsim_pair_scores_follow_the_definitions(backpack_dir):
    model, tokenizer = load(backpack_dir)
    with torch.no_grad():
        row, vectors, bad = lexsim.word_vectors(model, tokenizer, ["king", "cat", "Z\u00fcrich"], True, False)
        scores = lexsim.similarities(vectors[[row["king"]]], vectors[[row["cat"]]])
        a, b = (model.sense_vectors(torch.tensor([CHARS.index(c) for c in w])).mean(0) for w in ("king", "cat"))
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)  # (k, k)
    assert bad == ["Z\u00fcrich"]
    assert torch.allclose(scores["Cos"], torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert torch.allclose(scores["MinPair"], cos.diagonal().min()) and torch.allclose(scores["MaxAll"], cos.max())
    assert torch.allclose(scores["MaxPair"], cos.diagonal().max()) and torch.allclose(scores["MinAll"], cos.min())
    assert torch.allclose(scores["CosSense2"], cos[2, 2])


def test_lexsim_downloads_a_missing_file_and_checks_it(tmp_path, monkeypatch):
    # a file:// URL stands in for the public source: tests never touch the network
    monkeypatch.setattr(lexsim, "SOURCE", f"file://{LEXSIM_FIXTURES}/")
    with open(os.path.join(LEXSIM_FIXTURES, "RG65.csv"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    monkeypatch.setitem(lexsim.DATASETS, "rg65", lexsim.DATASETS["rg65"]._replace(sha256=sha))
    with pytest.raises(UserError, match="not found; pass the --data_dir"):
        lexsim.dataset_file(str(tmp_path), "rg65", False)
    path = lexsim.dataset_file(str(tmp_path), "rg65", True)
    assert len(lexsim.load_pairs(path, lexsim.DATASETS["rg65"])) == 5
    monkeypatch.setitem(lexsim.DATASETS, "ws353", lexsim.DATASETS["ws353"])  # the real sha: a mismatch
    with pytest.raises(UserError, match="expected sha256"):
        lexsim.dataset_file(str(tmp_path), "ws353", True)
    assert not os.path.exists(tmp_path / "WS353.csv")


def test_gpt2_bpe_backpack(tmp_path, gpt2_bpe):
    """GPT-2 BPE encodes every word of the fixtures (as ' ' + word)."""
    torch.manual_seed(0)
    model = build_model("backpack", n_layer=1, n_head=2, n_embd=16, n_senses=2, block_size=16, vocab_size=50304)
    save_checkpoint(checkpoint_dict(model, {"kind": "gpt2"}), os.path.join(tmp_path, "ckpt.pt"))
    out = lexsim.main(lexsim.LexicalSimilarityConfig(out_dir=str(tmp_path), data_dir=LEXSIM_FIXTURES, download=False))
    assert {n: c["scored"] for n, c in out["pairs"].items()} == FIXTURE_PAIRS  # BPE encodes every word


def test_cli_errors_are_one_line(backpack_dir, capsys):
    assert_cli_basics(lexsim.main, lexsim.LexicalSimilarityConfig, backpack_dir, capsys)


def test_script_runs_end_to_end(backpack_dir):
    """As a user runs it: python experiments/lexical_similarity.py from the repo root, no PYTHONPATH."""
    stdout = run_script("lexical_similarity", f"--out_dir={backpack_dir}", "--device=cpu",
                        f"--data_dir={LEXSIM_FIXTURES}",
                        "--download=False")
    assert "pairs scored" in stdout
    assert os.path.isdir(os.path.join(backpack_dir, "experiments"))


def test_main_reports_spearman_of_each_function(backpack_dir):
    """main's rho for a dataset is Spearman's (scipy's) between the function's scores and the human
    scores over the pairs it could encode (here RG65, whose cosines are not a linear function of the
    human scores, so Pearson's r would differ)."""
    from scipy.stats import pearsonr, spearmanr
    out = lexsim.main(lexsim.LexicalSimilarityConfig(out_dir=backpack_dir, data_dir=LEXSIM_FIXTURES, download=False,
                                                     datasets="rg65,simlex999"))
    model, tokenizer = load(backpack_dir)
    for name in ("rg65", "simlex999"):
        pairs = lexsim.load_pairs(os.path.join(LEXSIM_FIXTURES, lexsim.DATASETS[name].path), lexsim.DATASETS[name])
        with torch.no_grad():
            row, vectors, _ = lexsim.word_vectors(model, tokenizer, [w for p in pairs for w in p[:2]], True, False)
            scores = lexsim.similarities(vectors[[row[p[0]] for p in pairs]], vectors[[row[p[1]] for p in pairs]])
        gold = [p[2] for p in pairs]
        for fn in ("Cos", "MaxAll", "CosSense1"):
            expected = spearmanr(scores[fn].numpy(), gold).statistic
            assert abs(out["spearman"][fn][name] - expected) < 1e-9
        assert abs(out["spearman"]["Cos"][name] - pearsonr(scores["Cos"].numpy(), gold).statistic) > 1e-3
