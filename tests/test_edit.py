"""experiments/edit.py on a tiny character-level Backpack: the table's probabilities and the samples
are those of the model before and after the paper's sense edit (steering.edit_senses, applied to every
piece of the word), computed here directly."""

import json
import os
import sys

import pytest
import torch

from checkpoint import checkpoint_dict, load_model, save_checkpoint
from conftest import REPO
from generate import generate
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import edit  # noqa: E402
import steering  # noqa: E402
from test_steering import char_ckpt, script  # noqa: E402,F401  (char_ckpt is a fixture)

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ,.;"))


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("backpack", n_layer=1, n_head=2, n_embd=32, n_senses=4, block_size=16,
                        vocab_size=len(CHARS) + 3, dropout=0.0)
    with torch.no_grad():  # away from uniform, so the edit moves the probabilities visibly
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    folder = tmp_path_factory.mktemp("edit")
    save_checkpoint(checkpoint_dict(model.eval(), {"kind": "char", "itos": CHARS}), str(folder / "ckpt.pt"))
    return str(folder)


@pytest.mark.parametrize("first_piece", [False, True])
def test_edit_table_and_samples_follow_the_formula(char_dir, capsys, first_piece):
    prompts = ["the king said", "a kin"]
    edit.main(edit.EditConfig(out_dir=char_dir, word="king", out_word="a", in_word="o", prompts="|".join(prompts),
                              first_piece=first_piece, num_samples=2, max_new_tokens=6, temperature=1.0, top_k=0,
                              seed=3))
    capsys.readouterr()
    with open(os.path.join(char_dir, "experiments", "edit.json")) as f:
        saved = json.load(f)
    model, tok = load_model("resume", char_dir, "cpu")
    edited = [CHARS.index("k")] if first_piece else [CHARS.index(c) for c in "king"]
    assert saved["edited_tokens"] == [CHARS[i] for i in edited]
    E = model.lm_head.weight.detach()
    with torch.no_grad():
        new = steering.edit_senses(model.sense_vectors(torch.tensor(edited)), E[CHARS.index("a")], E[CHARS.index("o")])
    hook = steering.replace_hook(edited, new)
    words = [tok.encode(" a"), tok.encode(" o")]  # a word follows a prompt after a space
    for row, prompt in zip(saved["prompts"], prompts):
        ids = tok.encode(prompt)
        with torch.no_grad():
            before = steering.word_logprobs(model, [ids], words, tok.vocab_size).exp()[0]
            with model.hooked(hook):
                after = steering.word_logprobs(model, [ids], words, tok.vocab_size).exp()[0]
        assert row["out_before"] == pytest.approx(before[0].item(), rel=1e-5)
        assert row["in_before"] == pytest.approx(before[1].item(), rel=1e-5)
        assert row["out_after"] == pytest.approx(after[0].item(), rel=1e-5)
        assert row["in_after"] == pytest.approx(after[1].item(), rel=1e-5)
        assert abs(row["out_after"] / row["out_before"] - 1) > 1e-3  # the edit reaches this prompt
        for name, h in (("before", None), ("after", hook)):  # both from the same seed
            torch.manual_seed(3)
            with model.hooked(h):
                y = generate(model, torch.tensor([ids] * 2), 6, temperature=1.0, vocab_limit=tok.vocab_size)
            assert row[f"samples_{name}"] == [tok.decode(r.tolist()) for r in y]


def test_edit_script_char_with_interactive_prompts(char_ckpt):  # noqa: F811  (char_ckpt: the fixture)
    out = script("edit", f"--out_dir={char_ckpt}", "--word=king", "--out_word=a", "--in_word=o", "--prompts=the k|O",
                 "--num_samples=1", "--max_new_tokens=5", "--interactive=True", stdin="the kin\n\u2603\n")
    assert "every piece" in out and out.count("| the k") == 2  # 'the k' and the stdin 'the kin'
    assert "error: characters" in out  # a character outside the vocab, then reading goes on
    res = json.load(open(os.path.join(char_ckpt, "experiments", "edit.json")))
    assert [r["prompt"] for r in res["prompts"]] == ["the k", "O", "the kin"]
    assert "samples_after" in res["prompts"][0]
