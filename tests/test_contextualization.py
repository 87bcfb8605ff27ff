"""
experiments/contextualization.py on a tiny random Backpack (test_sense_vector.py's checkpoints): the
(position, sense) contributions sum to the logit, the heatmap has one panel per requested sense, bad
flags are one-line errors.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from common import UserError
from conftest import REPO
from configurator import run_cli
from test_sense_vector import (  # noqa: F401  (backpack_dir, gpt_dir: fixtures)
    CHARS, N_SENSES, assert_cli_basics, backpack_dir, gpt_dir, load, run_script, tiny_checkpoint)

sys.path.insert(0, os.path.join(REPO, "experiments"))
import contextualization  # noqa: E402


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


def test_refuses_a_gpt(gpt_dir):
    with pytest.raises(UserError) as e:
        contextualization.main(contextualization.ContextualizationConfig(out_dir=gpt_dir))
    message = str(e.value)
    assert "\n" not in message and "is a GPT" in message
    assert "lexical_similarity.py (with --use_senses=False)" in message


def test_cli_errors_are_one_line(backpack_dir, capsys):
    assert_cli_basics(contextualization.main, contextualization.ContextualizationConfig, backpack_dir, capsys)
    with pytest.raises(SystemExit):  # --senses=0,9 reaches the script as the string '(0, 9)'
        run_cli(contextualization.main, contextualization.ContextualizationConfig,
                [f"--out_dir={backpack_dir}", "--senses=0,9"])
    assert capsys.readouterr().err.startswith("error: --senses=0,9 is not a list of sense indices")


def test_script_runs_end_to_end(backpack_dir):
    """As a user runs it: python experiments/contextualization.py from the repo root, no PYTHONPATH."""
    stdout = run_script("contextualization", f"--out_dir={backpack_dir}", "--device=cpu", "--senses=0,1")
    assert "sum of all" in stdout
    assert os.path.isdir(os.path.join(backpack_dir, "experiments"))


def test_table_lists_only_pairs_up_to_the_position(backpack_dir):
    """With --top larger than every pair, the table holds exactly the (position + 1) * k pairs that can
    contribute (alpha is causal), each with its alpha and sense.E from the model."""
    text = "To be, or not"
    out = contextualization.main(contextualization.ContextualizationConfig(
        out_dir=backpack_dir, text=text, position=3, token="e", top=1000, senses="0"))
    model, _ = load(backpack_dir)
    idx = torch.tensor([[CHARS.index(c) for c in text]])
    with torch.no_grad():
        alpha = model.contextualization(idx)[0]  # (k, T, T)
        sense_logits = model.senses(idx)[0] @ model.lm_head.weight[CHARS.index("e")]  # (T, k)
    assert len(out["rows"]) == 4 * N_SENSES
    pairs = sorted((r["position"], r["sense"]) for r in out["rows"])
    assert pairs == [(j, s) for j in range(4) for s in range(N_SENSES)]
    for r in out["rows"]:
        assert abs(r["alpha"] - float(alpha[r["sense"], 3, r["position"]])) < 1e-6
        assert abs(r["sense_logit"] - float(sense_logits[r["position"], r["sense"]])) < 1e-5
        assert abs(r["contribution"] - r["alpha"] * r["sense_logit"]) < 1e-5


def test_top_prediction_and_probability_skip_the_padded_vocab(tmp_path):
    """The attributed token by default is the most likely real token, never a padded vocab row even when
    one has the largest logit; its probability is the softmax of the logits."""
    tiny_checkpoint(tmp_path, "backpack")
    model, _ = load(str(tmp_path))
    with torch.no_grad():
        model.lm_head.weight[len(CHARS):] = model.lm_head.weight[:len(CHARS)].sum(0) * 3  # padded rows win
    from checkpoint import checkpoint_dict, save_checkpoint
    save_checkpoint(checkpoint_dict(model, {"kind": "char", "itos": CHARS}), str(tmp_path / "ckpt.pt"))
    text = "To be, or"
    out = contextualization.main(contextualization.ContextualizationConfig(out_dir=str(tmp_path), text=text))
    idx = torch.tensor([[CHARS.index(c) for c in text]])
    with torch.no_grad():
        logits = model(idx)[0][0, -1]
    assert int(logits.argmax()) >= len(CHARS)  # the case under test
    token = int(logits[:len(CHARS)].argmax())
    with open(os.path.join(tmp_path, "experiments", "contextualization.json")) as f:
        saved = json.load(f)
    assert saved["token_id"] == token and abs(out["logit"] - float(logits[token])) < 1e-5
    assert abs(saved["probability"] - float(logits.softmax(-1)[token])) < 1e-6


def test_heatmap_rows_are_queries(backpack_dir):
    """Each panel shows alpha[sense] as is: row i is query i, so the upper triangle is 0 and every row sums to 1."""
    text = "To be\n"
    out = contextualization.main(contextualization.ContextualizationConfig(out_dir=backpack_dir, text=text,
                                                                           senses="1,3"))
    model, _ = load(backpack_dir)
    with torch.no_grad():
        alpha = model.contextualization(torch.tensor([[CHARS.index(c) for c in text]]))[0]  # (k, T, T)
    heatmaps = [ax for ax in out["figure"].axes if ax.images]
    for ax, sense in zip(heatmaps, (1, 3)):
        shown = np.asarray(ax.images[0].get_array())
        assert np.allclose(shown, alpha[sense].numpy(), atol=1e-6)
        assert np.allclose(np.triu(shown, 1), 0) and np.allclose(shown.sum(1), 1, atol=1e-5)
