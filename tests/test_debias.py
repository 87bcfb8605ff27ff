"""experiments/debias.py on tiny character-level models, whose one-character words make one-token
professions: every reported bias is the paper's mean of max(p(he)/p(she), p(she)/p(he)) under the
intervention, computed here directly; the factor is fitted on the train templates; --sense=-1 picks the
sense that separates he from she the most; the GPT baseline projects the direction out of an untied
input embedding."""

import json
import os
import sys

import pytest
import torch
from torch import nn

from checkpoint import checkpoint_dict, load_model, save_checkpoint
from conftest import REPO
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import debias  # noqa: E402
import steering  # noqa: E402
from test_steering import save_tiny, script, tiny  # noqa: E402

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;"))


def checkpoint(folder, model_type: str) -> str:
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS) + 3, dropout=0.0)
    if model_type == "backpack":
        args["n_senses"] = 4
    model = build_model(model_type, **args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
        if model_type == "backpack":  # sense 2 of 'a' says "x, not y": a bias the fitted factor can undo
            u = model.sense_vectors(torch.tensor([CHARS.index("a")]))[0, 2]  # (d,)
            model.lm_head.weight[CHARS.index("x")] += 2 * u / u.dot(u)
            model.lm_head.weight[CHARS.index("y")] -= 2 * u / u.dot(u)
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(checkpoint_dict(model.eval(), {"kind": "char", "itos": CHARS}), os.path.join(folder, "ckpt.pt"))
    return str(folder)


def bias(model, tok, templates, job, factor_context) -> float:
    """The paper's bias of one profession: mean over templates of max(p(he)/p(she), p(she)/p(he))."""
    pair = [tok.encode(" x"), tok.encode(" y")]
    values = []
    with torch.no_grad(), factor_context():
        for t in templates:
            lp = steering.word_logprobs(model, [tok.encode(t.format(job))], pair, tok.vocab_size)[0]
            values.append(max((lp[0] - lp[1]).exp().item(), (lp[1] - lp[0]).exp().item()))
    return sum(values) / len(values)


def run(folder, capsys, **kw) -> dict:
    debias.main(debias.DebiasConfig(out_dir=folder, he="x", she="y", maxiter=8, **kw))
    printed = capsys.readouterr().out
    with open(os.path.join(folder, "experiments", "debias.json")) as f:
        return json.load(f) | {"printed": printed}


def test_backpack_rows_follow_the_protocol(tmp_path, capsys):
    folder = checkpoint(tmp_path / "backpack", "backpack")
    saved = run(folder, capsys, professions="a,n,bc", sense=-1)
    model, tok = load_model("resume", folder, "cpu")
    assert saved["skipped"] == ["bc"] and [r["profession"] for r in saved["professions"]] == ["a", "n"]
    E = model.lm_head.weight.detach()
    with torch.no_grad():
        senses = model.sense_vectors(torch.tensor([CHARS.index("a"), CHARS.index("n")]))  # (2, k, d)
        spread = (senses @ (E[CHARS.index("x")] - E[CHARS.index("y")])).abs().mean(0)  # (k,)
    sense = int(spread.argmax())
    assert saved["method"] == f"scaling sense {sense}"
    listed = saved["printed"].split("senses by mean |C(profession) . (E[he] - E[she])|: ")[1].splitlines()[0]
    assert listed == ", ".join(f"{l} ({spread[l]:.3f})" for l in spread.argsort(descending=True).tolist())
    for row in saved["professions"]:
        job = row["profession"]

        def at(factor):
            return lambda: model.hooked(steering.scale_hook([CHARS.index(job)], [sense], factor))
        assert row["unmodified"] == pytest.approx(bias(model, tok, debias.TEST_TEMPLATES, job, at(1.0)), rel=1e-5)
        assert row["removed"] == pytest.approx(bias(model, tok, debias.TEST_TEMPLATES, job, at(0.0)), rel=1e-5)
        assert row["fitted"] == pytest.approx(bias(model, tok, debias.TEST_TEMPLATES, job, at(row["factor"])), rel=1e-5)
        factor, _ = debias.fit_factor(lambda f: bias(model, tok, debias.TRAIN_TEMPLATES, job, at(f)) + abs(1 - f), 8)
        assert row["factor"] == pytest.approx(factor, rel=1e-6)  # fitted on the train templates
    assert saved["professions"][0]["factor"] != 1.0  # 'a' is biased: the fit moved


def test_gpt_baseline_projects_out_of_the_untied_input_embedding(tmp_path, capsys):
    folder = checkpoint(tmp_path / "gpt", "gpt")
    saved = run(folder, capsys, professions="a")
    (row,) = saved["professions"]
    model, tok = load_model("resume", folder, "cpu")
    E = model.lm_head.weight.detach().clone()
    g = E[CHARS.index("y")] - E[CHARS.index("x")]
    model.transformer.wte.weight = nn.Parameter(E.clone())  # the LM head keeps the original matrix
    job = CHARS.index("a")

    class at:
        def __init__(self, factor):
            self.factor = factor

        def __call__(self):
            return self

        def __enter__(self):
            model.transformer.wte.weight.data[job] = E[job] - (1 - self.factor) * (E[job] @ g) / g.dot(g) * g

        def __exit__(self, *exc):
            model.transformer.wte.weight.data[job] = E[job]
    assert row["unmodified"] == pytest.approx(bias(model, tok, debias.TEST_TEMPLATES, "a", at(1.0)), rel=1e-5)
    assert row["removed"] == pytest.approx(bias(model, tok, debias.TEST_TEMPLATES, "a", at(0.0)), rel=1e-5)
    assert row["removed"] != pytest.approx(row["unmodified"], rel=1e-4)  # the projection changes something
    assert row["fitted"] == pytest.approx(bias(model, tok, debias.TEST_TEMPLATES, "a", at(row["factor"])), rel=1e-5)


def test_nelder_mead_respects_its_iteration_limit():
    calls = []

    def objective(f):
        calls.append(f)
        return (f - 7.0) ** 2

    factor, res = debias.fit_factor(objective, maxiter=3)
    assert res.nit == 3 and not res.success and res.nfev == len(calls) <= 2 + 3 * 3  # <= 3 evaluations per iteration
    factor, res = debias.fit_factor(objective, maxiter=200)
    assert res.success and res.nit > 3 and abs(factor - 7.0) < 1e-3


def test_debias_gpt_baseline(gpt2_bpe, tmp_path):
    folder = save_tiny(tmp_path / "gpt", tiny("gpt", vocab_size=50304, n_embd=16), {"kind": "gpt2"})
    out = script("debias", f"--out_dir={folder}", "--professions=nurse,CEO,receptionist", "--maxiter=2")
    assert "GPT baseline" in out and "| nurse |" in out
