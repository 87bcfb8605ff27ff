"""
experiments/sense_vector.py on tiny random Backpacks (and a GPT) saved as checkpoints in a temp folder:
the seed's print format, multi-token words as the mean of their pieces, the chunked nearest-token scan,
a word in context as the alpha-weighted senses. test_contextualization.py and test_lexical_similarity.py
reuse this file's checkpoints.
"""

import ast
import json
import os
import string
import subprocess
import sys

import pytest
import torch

from checkpoint import checkpoint_dict, load_model, save_checkpoint
from common import UserError
from conftest import FIXTURES, REPO
from configurator import run_cli
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import sense_vector  # noqa: E402

CHARS = sorted(set(string.ascii_letters + " \n.,;:!?'-"))  # no 'ü': a word with it cannot be encoded
SPEC = {"kind": "char", "itos": CHARS}
N_SENSES = 4
LEXSIM_FIXTURES = os.path.join(FIXTURES, "lexsim")


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
    return load_model("resume", folder, "cpu")

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


def test_refuses_a_gpt_and_unencodable_words(backpack_dir, gpt_dir):
    with pytest.raises(UserError) as e:
        sense_vector.main(sense_vector.SenseVectorConfig(out_dir=gpt_dir))
    message = str(e.value)
    assert "\n" not in message and "is a GPT" in message
    assert "lexical_similarity.py (with --use_senses=False)" in message
    with pytest.raises(UserError, match="not in this model's character vocabulary"):
        sense_vector.main(sense_vector.SenseVectorConfig(out_dir=backpack_dir, words="caf\u00fc"))


def assert_cli_basics(main, cfg_class, out_dir, capsys):
    """An unknown flag is one line (exit 2) naming it; --help lists the flags (exit 0)."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, cfg_class, [f"--out_dir={out_dir}", "--wordz=a"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'wordz'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        run_cli(main, cfg_class, ["--help"])
    assert e.value.code == 0 and "--out_dir='out'" in capsys.readouterr().out


def run_script(name: str, *flags) -> str:
    """python experiments/<name>.py as a user runs it, from the repo root with no PYTHONPATH: its stdout."""
    result = subprocess.run([sys.executable, os.path.join("experiments", f"{name}.py"), *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_errors_are_one_line(backpack_dir, capsys):
    assert_cli_basics(sense_vector.main, sense_vector.SenseVectorConfig, backpack_dir, capsys)
    with pytest.raises(SystemExit):
        run_cli(sense_vector.main, sense_vector.SenseVectorConfig, [f"--out_dir={backpack_dir}", "--words="])
    assert capsys.readouterr().err.startswith("error: --words is empty")


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
    assert "# bank\n[[" in capsys.readouterr().out


def test_script_runs_end_to_end(backpack_dir):
    """As a user runs it: python experiments/sense_vector.py from the repo root, no PYTHONPATH."""
    stdout = run_script("sense_vector", f"--out_dir={backpack_dir}", "--device=cpu", "--words=a,king",
                        "--compile=False")
    assert "# king\n[[" in stdout
    assert os.path.isdir(os.path.join(backpack_dir, "experiments"))


def test_main_lists_the_top_tokens_of_the_mean_of_a_words_pieces(backpack_dir):
    """main's lists for a word of several tokens are those of the mean of its pieces' senses (not of one
    piece), and its nearest tokens are the cosine neighbours of that mean."""
    model, _ = load(backpack_dir)
    results = sense_vector.main(sense_vector.SenseVectorConfig(out_dir=backpack_dir, words="the,ea", top=4, nearest=2))
    for entry, word in zip(results, ("the", "ea")):
        with torch.no_grad():
            mean = model.sense_vectors(torch.tensor([CHARS.index(c) for c in word])).mean(0)  # (k, d)
            logits = model.lm_head(mean)[:, :len(CHARS)]  # (k, V)
        assert entry["top_tokens"] == [[CHARS[i] for i in row] for row in logits.topk(4).indices.tolist()]
        assert entry["pieces"] == list(word)


def test_context_senses_at_any_position(backpack_dir):
    """--position=p: sense l is sum_{j <= p} alpha[l, p, j] * senses(x_j)[l], for positions from the start
    and from the end alike."""
    model, tokenizer = load(backpack_dir)
    idx = torch.tensor([[CHARS.index(c) for c in "the king"]])
    with torch.no_grad():
        alpha = model.contextualization(idx)[0]  # (k, T, T)
        senses = model.sense_vectors(idx[0])  # (T, k, d)
        for position in (0, 2, 5, -3):
            got, name = sense_vector.context_senses(model, tokenizer, "the king", position)
            p = position % 8
            expected = torch.einsum("lt,tld->ld", alpha[:, p, :p + 1], senses[:p + 1])
            assert torch.allclose(got, expected, atol=1e-6) and f"at position {p} " in name
