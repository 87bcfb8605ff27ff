"""
The tools for looking inside a Backpack: experiments/sense_vector.py, contextualization.py and
lexical_similarity.py, on tiny random Backpacks (and a GPT) saved as checkpoints in a temp folder.
"""

import ast
import hashlib
import json
import os
import string
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import UserError, checkpoint_dict, save_checkpoint
from conftest import FIXTURES, REPO, shared_file
from configurator import run_cli
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import contextualization  # noqa: E402
import lexical_similarity as lexsim  # noqa: E402
import sense_vector  # noqa: E402

CHARS = sorted(set(string.ascii_letters + " \n.,;:!?'-"))  # no 'ü': a word with it cannot be encoded
SPEC = {"kind": "char", "itos": CHARS}
N_SENSES = 4
LEXSIM_FIXTURES = os.path.join(FIXTURES, "lexsim")
FIXTURE_PAIRS = {"simlex999": 6, "simverb3500": 5, "rg65": 5, "ws353": 6}


def tiny_checkpoint(folder, model_type: str) -> str:
    """A random tiny model over CHARS, its vocab padded past the tokenizer's (as GPT-2's 50304)."""
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=48, vocab_size=len(CHARS) + 6, dropout=0.0)
    if model_type == "backpack":
        args["n_senses"] = N_SENSES
    model = build_model(model_type, **args)
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(checkpoint_dict(model, SPEC), os.path.join(folder, "ckpt.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def backpack_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("backpack"), "backpack")


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gpt"), "gpt")


def load(folder):
    from common import load_model
    return load_model("resume", folder, "cpu")


# -----------------------------------------------------------------------------
# sense_vector.py


def test_sense_vector_prints_the_seed_format(backpack_dir, capsys):
    sense_vector.main(sense_vector.SenseVectorConfig(out_dir=backpack_dir, words="a,e,the", top=5, nearest=3))
    lines = capsys.readouterr().out.splitlines()
    for word in ("a", "e", "the"):
        at = lines.index(f"# {word}")
        top = ast.literal_eval(lines[at + 1])  # [['t', 'l', 'r', 'n', ' '], ['y', ...], ...]
        assert len(top) == N_SENSES and all(len(row) == 5 and set(row) <= set(CHARS) for row in top)
        assert lines[at + 1] == str(top)  # exactly Python's list repr, as the seed printed it
        assert lines[at + 2].startswith("nearest per sense: ")
        near = ast.literal_eval(lines[at + 2].removeprefix("nearest per sense: "))
        assert len(near) == N_SENSES and all(len(row) == 3 for row in near)
    with open(os.path.join(backpack_dir, "experiments", "sense_vector.json")) as f:
        saved = json.load(f)
    assert [w["word"] for w in saved["words"]] == ["a", "e", "the"] and saved["words"][2]["pieces"] == ["t", "h", "e"]


def test_multi_token_word_is_the_mean_and_padding_is_never_listed(backpack_dir):
    model, tokenizer = load(backpack_dir)
    with torch.no_grad():
        model.lm_head.weight[len(CHARS):] = 5.0  # padded rows that would win every top list and cosine
        ids = [CHARS.index(c) for c in "the"]
        mean = model.sense_vectors(torch.tensor(ids)).mean(0)  # (k, d)
        top = sense_vector.top_tokens(model, mean, len(CHARS), 5)
        expected = model.lm_head(mean)[:, :len(CHARS)].topk(5).indices.tolist()
        near_ids, near_cos = sense_vector.nearest_tokens(model, mean[None], len(CHARS), 4, [ids], chunk_size=1000)
    assert top == expected and max(map(max, top)) < len(CHARS)
    assert near_ids.max() < len(CHARS) and not set(near_ids.flatten().tolist()) & set(ids)


def test_nearest_tokens_chunked_equals_brute_force(backpack_dir):
    model, _ = load(backpack_dir)
    V = len(CHARS)
    with torch.no_grad():
        senses = model.sense_vectors(torch.tensor([3, 7]))  # (2, k, d)
        ids, cos = sense_vector.nearest_tokens(model, senses, V, 5, [[3], [7]], chunk_size=4)
        full, full_cos = sense_vector.nearest_tokens(model, senses, V, 5, [[3], [7]], chunk_size=1000)
        table = torch.nn.functional.normalize(model.sense_vectors(torch.arange(V)), dim=-1)  # (V, k, d)
        brute = torch.einsum("wld,vld->wlv", torch.nn.functional.normalize(senses, dim=-1), table)  # (2, k, V)
    brute[0, :, 3] = brute[1, :, 7] = float("-inf")  # a word is not its own neighbour
    assert torch.equal(ids, full) and torch.allclose(cos, full_cos)
    assert torch.allclose(cos, brute.topk(5, dim=-1).values, atol=1e-6)


def test_word_in_context_is_the_alpha_weighted_senses(backpack_dir, capsys):
    model, tokenizer = load(backpack_dir)
    with torch.no_grad():
        senses, name = sense_vector.context_senses(model, tokenizer, "the king", -1)
        idx = torch.tensor([[CHARS.index(c) for c in "the king"]])
        alpha = model.contextualization(idx)[0, :, -1]  # (k, T)
        expected = torch.einsum("lt,tld->ld", alpha, model.sense_vectors(idx[0]))
    assert torch.allclose(senses, expected, atol=1e-6) and name == "'the king' at position 7 ('g')"
    sense_vector.main(sense_vector.SenseVectorConfig(out_dir=backpack_dir, words="", context="the king",
                                                     position=2, nearest=0))
    assert "# 'the king' at position 2 ('e')" in capsys.readouterr().out
    with pytest.raises(UserError, match="outside --context's 8 tokens"):
        sense_vector.context_senses(model, tokenizer, "the king", 8)


def test_sense_tools_refuse_a_gpt_and_unencodable_words(backpack_dir, gpt_dir):
    for script, cfg in ((sense_vector, sense_vector.SenseVectorConfig(out_dir=gpt_dir)),
                        (contextualization, contextualization.ContextualizationConfig(out_dir=gpt_dir))):
        with pytest.raises(UserError) as e:
            script.main(cfg)
        message = str(e.value)
        assert "\n" not in message and "is a GPT" in message
        assert "lexical_similarity.py (with --use_senses=False)" in message
    with pytest.raises(UserError, match="not in this model's character vocabulary"):
        sense_vector.main(sense_vector.SenseVectorConfig(out_dir=backpack_dir, words="caf\u00fc"))


def test_cli_errors_are_one_line(backpack_dir, capsys):
    for script, cfg_class in ((sense_vector, sense_vector.SenseVectorConfig),
                              (contextualization, contextualization.ContextualizationConfig),
                              (lexsim, lexsim.LexicalSimilarityConfig)):
        with pytest.raises(SystemExit) as e:
            run_cli(script.main, cfg_class, [f"--out_dir={backpack_dir}", "--wordz=a"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unknown config key 'wordz'") and err.count("\n") == 1
        with pytest.raises(SystemExit) as e:
            run_cli(script.main, cfg_class, ["--help"])
        assert e.value.code == 0 and "--out_dir='out'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(sense_vector.main, sense_vector.SenseVectorConfig, [f"--out_dir={backpack_dir}", "--words="])
    assert capsys.readouterr().err.startswith("error: --words is empty")
    with pytest.raises(SystemExit):  # --senses=0,9 reaches the script as the string '(0, 9)'
        run_cli(contextualization.main, contextualization.ContextualizationConfig,
                [f"--out_dir={backpack_dir}", "--senses=0,9"])
    assert capsys.readouterr().err.startswith("error: --senses=0,9 is not a list of sense indices")


# -----------------------------------------------------------------------------
# contextualization.py


@pytest.mark.parametrize("position,token", [(-1, ""), (3, "e")])
def test_contributions_sum_to_the_logit(backpack_dir, position, token):
    text = "To be, or not to be"
    out = contextualization.main(contextualization.ContextualizationConfig(
        out_dir=backpack_dir, text=text, position=position, token=token, senses="0"))
    model, _ = load(backpack_dir)
    idx = torch.tensor([[CHARS.index(c) for c in text]])
    with torch.no_grad():
        logits = model(idx)[0][0, position]
    expected_token = CHARS.index(token) if token else int(logits[:len(CHARS)].argmax())
    assert abs(out["logit"] - float(logits[expected_token])) < 1e-5
    assert abs(out["contribution_sum"] - out["logit"]) < 1e-4
    with open(os.path.join(backpack_dir, "experiments", "contextualization.json")) as f:
        saved = json.load(f)
    contributions = np.array(saved["contributions"])  # (T, k)
    assert contributions.shape == (len(text), N_SENSES) and abs(contributions.sum() - out["logit"]) < 1e-4
    assert np.all(contributions[position % len(text) + 1:] == 0)  # later tokens contribute nothing
    sizes = [abs(r["contribution"]) for r in out["rows"]]
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == 10
    assert all(r["position"] <= position % len(text) for r in out["rows"])


@pytest.mark.parametrize("senses,panels", [("0,2", 2), ("all", N_SENSES), ("3", 1)])
def test_heatmap_has_one_panel_per_requested_sense(backpack_dir, senses, panels):
    out = contextualization.main(contextualization.ContextualizationConfig(out_dir=backpack_dir, text="To be\n",
                                                                           senses=senses))
    heatmaps = [ax for ax in out["figure"].axes if ax.images]
    assert len(heatmaps) == panels
    want = list(range(N_SENSES)) if senses == "all" else [int(s) for s in senses.split(",")]
    assert [ax.get_title() for ax in heatmaps] == [f"sense {s}" for s in want]
    labels = ["T", "o", "\u2423", "b", "e", "\\n"]  # whitespace made visible
    assert [t.get_text() for t in heatmaps[-1].get_xticklabels()] == labels
    assert [t.get_text() for t in heatmaps[-1].get_yticklabels()] == labels
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_heatmap_of_a_long_text_stays_readable():
    T = 130  # a 512-token text of backpack-small is drawn the same way: every step-th token labelled
    alpha = np.tril(np.ones((2, T, T))) / np.arange(1, T + 1)[:, None]
    fig = contextualization.plot_alpha(alpha, [1], [f"t{i}" for i in range(T)], "long")
    (ax,) = [ax for ax in fig.axes if ax.images]
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["t0", "t3", "t6"]
    assert max(fig.get_size_inches()) <= 13.0


def test_bad_senses_and_positions_are_one_line_errors(backpack_dir):
    for kw, match in ((dict(senses="4"), "not a list of sense indices"), (dict(senses="a"), "sense indices"),
                      (dict(text="abc", position=3), "outside the text's 3 tokens"),
                      (dict(text="abc", token="ab"), "exactly one token"),
                      (dict(text="x" * 49), "give 1 to 48")):
        with pytest.raises(UserError, match=match):
            contextualization.main(contextualization.ContextualizationConfig(out_dir=backpack_dir, **kw))


# -----------------------------------------------------------------------------
# lexical_similarity.py


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


def test_gpt2_bpe_backpack(tmp_path, gpt2_bpe, capsys):
    """GPT-2 BPE: a word is ' ' + word, padded vocab rows (50257..50303) are never listed, and the nearest
    tokens come from a chunked scan of the whole vocabulary."""
    torch.manual_seed(0)
    model = build_model("backpack", n_layer=1, n_head=2, n_embd=16, n_senses=2, block_size=16, vocab_size=50304)
    with torch.no_grad():
        model.lm_head.weight[50257:] = 5.0  # padded rows that would otherwise win
    save_checkpoint(checkpoint_dict(model, {"kind": "gpt2"}), os.path.join(tmp_path, "ckpt.pt"))
    results = sense_vector.main(sense_vector.SenseVectorConfig(out_dir=str(tmp_path), words="bank,riverbank",
                                                               nearest=3, chunk_size=8192))
    assert results[0]["pieces"] == [" bank"] and len(results[1]["pieces"]) > 1
    assert all(t for r in results for row in r["top_tokens"] for t in row)  # decoded real tokens, never padding
    assert all(" bank" not in [t for t, _ in row] for row in results[0]["nearest"])
    out = lexsim.main(lexsim.LexicalSimilarityConfig(out_dir=str(tmp_path), data_dir=LEXSIM_FIXTURES, download=False))
    assert {n: c["scored"] for n, c in out["pairs"].items()} == FIXTURE_PAIRS  # BPE encodes every word
    assert "# bank\n[[" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# each script end to end, as a user runs it


@pytest.mark.parametrize("script,args,expect", [
    ("sense_vector.py", ["--words=a,king", "--compile=False"], "# king\n[["),
    ("contextualization.py", ["--senses=0,1"], "sum of all"),
    ("lexical_similarity.py", [f"--data_dir={LEXSIM_FIXTURES}", "--download=False"], "pairs scored"),
])
def test_script_runs_end_to_end(backpack_dir, script, args, expect):
    result = subprocess.run([sys.executable, os.path.join("experiments", script), f"--out_dir={backpack_dir}",
                             "--device=cpu", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout
    assert os.path.isdir(os.path.join(backpack_dir, "experiments"))
