"""experiments/perplexity.py: every token after the first is scored once; stride = block_size is the
plain non-overlapping evaluation; a smaller stride never gives a token less context (checked on the
context each token really got); a transformers GPT-2 directory gives transformers' own perplexity;
characters outside a char vocab are an error or, on request, skipped and counted."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import checkpoint_dict, load_model, save_checkpoint
from configurator import run_cli
from conftest import REPO
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import perplexity  # noqa: E402

ITOS = sorted(set("ROMEO:JULIET abcdefghijklmnopqrstuvwxyz\n.,;!?'"))
BLOCK = 16


@pytest.fixture(scope="module", params=["gpt", "backpack"])
def ckpt(request, tmp_path_factory) -> str:
    """A random char model whose vocab is padded past the tokenizer's (as GPT-2's 50304 > 50257)."""
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=len(ITOS) + 6, dropout=0.0, bias=True)
    if request.param == "backpack":
        args["n_senses"] = 4
    model = build_model(request.param, **args)
    with torch.no_grad():  # away from uniform, and the padded rows get real probability unless excluded
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.15)
    out_dir = tmp_path_factory.mktemp(request.param)
    save_checkpoint(checkpoint_dict(model.eval(), {"kind": "char", "itos": ITOS}), str(out_dir / "ckpt.pt"))
    return str(out_dir)


def random_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int64)


def write_bin(folder, tokens: np.ndarray, dtype=np.uint16) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tokens.bin")
    tokens.astype(dtype).tofile(path)
    return path


def evaluate(out_dir, input_path, **kw) -> dict:
    return perplexity.main(perplexity.PerplexityConfig(out_dir=str(out_dir), input=str(input_path), **kw))


@pytest.mark.parametrize("n", [2, 3, 16, 17, 40, 97])
@pytest.mark.parametrize("block_size,stride", [(1, 1), (4, 4), (4, 3), (16, 16), (16, 5), (16, 1)])
def test_windows_score_each_token_once(n, block_size, stride):
    scored = []
    for begin, first in perplexity.windows(n, block_size, stride):
        W = min(block_size, n - 1)
        assert 0 <= begin and begin + W <= n - 1  # inputs begin .. begin+W-1, targets up to begin+W
        scored += range(max(first, begin + 1), begin + W + 1)
    assert scored == list(range(1, n))


def test_stride_equal_to_block_is_the_plain_evaluation(ckpt, tmp_path):
    """Non-overlapping windows of BLOCK inputs, each scoring its BLOCK next tokens, computed here
    directly (padded vocab rows left out of the softmax)."""
    tokens = random_tokens(6 * BLOCK + 1, len(ITOS))
    result = evaluate(ckpt, write_bin(tmp_path, tokens))
    model, _ = load_model("resume", ckpt, "cpu")
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        nll = [F.cross_entropy(model(x[i:i + BLOCK][None])[0][0, :, :len(ITOS)], x[i + 1:i + BLOCK + 1],
                               reduction="sum") for i in range(0, len(tokens) - 1, BLOCK)]
    plain = float(sum(nll)) / (len(tokens) - 1)
    assert result["tokens"] == len(tokens) - 1 and result["stride"] == result["block_size"] == BLOCK
    assert result["nll"] == pytest.approx(plain, abs=1e-6) and result["ppl"] == pytest.approx(math.exp(plain))
    # the whole vocab in the softmax would give a different (larger) loss
    with torch.no_grad():
        padded = float(model(x[:BLOCK][None], x[1:BLOCK + 1][None])[1])
    assert padded > float(nll[0]) / BLOCK + 1e-3


def test_smaller_stride_never_gives_less_context(ckpt):
    """The context each token was really scored with (checked against a forward over exactly that
    context): with stride s every token t gets at least min(t, BLOCK - s + 1) tokens; halving the stride
    never lowers any token's context; stride 1 gives every token all it can have, min(t, BLOCK)."""
    model, _ = load_model("resume", ckpt, "cpu")
    tokens = random_tokens(5 * BLOCK + 7, len(ITOS), seed=1)
    t = np.arange(1, len(tokens))
    previous = None
    for stride in (16, 8, 4, 2, 1):
        nll, context = perplexity.score(model, tokens, BLOCK, stride, 3, len(ITOS))
        assert (context >= np.minimum(t, BLOCK - stride + 1)).all()
        if previous is not None:
            assert (context >= previous).all()
        previous = context
        for i in (0, 5, 16, 17, 40, len(t) - 1):  # nll[i] is token i + 1, seen after context[i] tokens
            window = torch.from_numpy(tokens[i + 1 - context[i]:i + 1])
            with torch.no_grad():
                logp = F.log_softmax(model(window[None])[0][0, -1, :len(ITOS)], dim=-1)
            assert nll[i] == pytest.approx(-float(logp[tokens[i + 1]]), abs=1e-5)
    assert (previous == np.minimum(t, BLOCK)).all()
    for stride in (3, 5, 7, 16):  # any stride, dividing the block or not
        _, context = perplexity.score(model, tokens, BLOCK, stride, 4, len(ITOS))
        assert (context >= np.minimum(t, BLOCK - stride + 1)).all()


def test_matches_transformers_gpt2(tmp_path, gpt2_bpe):
    """A tiny random GPT2LMHeadModel saved by transformers, read through our loader (--init_from=<dir>),
    on a .bin of GPT-2 ids: the perplexity transformers itself computes, for stride = block and stride 1."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    hf_model.save_pretrained(tmp_path / "hf")
    tokens = random_tokens(3 * 32 + 1, 50257, seed=2)
    path = write_bin(tmp_path / "data", tokens)
    x = torch.from_numpy(tokens)

    def hf_nll(begin: int, end: int) -> torch.Tensor:  # nll of tokens begin+1 .. end given begin .. end-1
        with torch.no_grad():
            logits = hf_model(x[begin:end][None]).logits[0]
        return F.cross_entropy(logits, x[begin + 1:end + 1], reduction="none")

    plain = torch.cat([hf_nll(i, i + 32) for i in range(0, 96, 32)]).mean().item()
    full = torch.stack([hf_nll(max(0, i - 32), i)[-1] for i in range(1, 97)]).mean().item()
    for stride, expected in ((32, plain), (1, full)):
        result = evaluate(tmp_path / "res", path, init_from=str(tmp_path / "hf"), stride=stride)
        assert result["tokens"] == 96 and result["block_size"] == 32
        assert result["nll"] == pytest.approx(expected, abs=1e-5)


def test_char_oov_error_and_skip(ckpt, tmp_path, capsys):
    text = "ROMEO: o my ½ love!\nJULIET: €€ no.\n" * 3
    clean = text.replace("½", "").replace("€", "")
    (tmp_path / "oov.txt").write_text(text, encoding="utf-8")
    (tmp_path / "clean.txt").write_text(clean, encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(perplexity.main, perplexity.PerplexityConfig,
                [f"--out_dir={ckpt}", f"--input={tmp_path}/oov.txt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "has 9 characters outside this model's vocabulary: ['½', '€']; pass --skip_unknown=True" in err[0]
    skipped = evaluate(ckpt, tmp_path / "oov.txt", skip_unknown=True)
    assert skipped["skipped_chars"] == 9 and skipped["tokens"] == len(clean) - 1
    assert skipped["nll"] == pytest.approx(evaluate(ckpt, tmp_path / "clean.txt")["nll"], abs=1e-9)


@pytest.mark.parametrize("flags,expected", [
    (["--stride=17"], r"stride must be in \[1, block_size=16\] \(got 17\)"),
    (["--block_size=17"], r"block_size must be in \[1, 16\] for this model \(got 17\)"),
    (["--input=nope.txt"], r"--input='nope.txt' is not a file"),
    (["--input={tmp}/big.bin"], r"holds token id 60000 but the model's vocabulary has {V} ids"),
])
def test_bad_input_is_one_line(ckpt, tmp_path, capsys, flags, expected):
    write_bin(tmp_path, np.array([1, 2, 60000]))
    os.rename(tmp_path / "tokens.bin", tmp_path / "big.bin")
    (tmp_path / "ok.txt").write_text("ROMEO: a\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(perplexity.main, perplexity.PerplexityConfig,
                [f"--out_dir={ckpt}", f"--input={tmp_path}/ok.txt", *[f.format(tmp=tmp_path) for f in flags]])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.search(expected.format(V=len(ITOS)), err[0]), err[0]


def test_cli(ckpt, tmp_path):
    """As a user runs it: the last line is the JSON result, also written under <out_dir>/experiments."""
    line = "ROMEO: is it so? then i defy you, stars!\n"
    (tmp_path / "text.txt").write_text(line * 4)
    proc = subprocess.run([sys.executable, "experiments/perplexity.py", f"--out_dir={ckpt}",
                           f"--input={tmp_path}/text.txt", "--stride=8", "--batch_size=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 4 * len(line) - 1 and result["ppl"] == pytest.approx(math.exp(result["nll"]))
    assert result["min_context"] == 1 and result["block_size"] == BLOCK and result["stride"] == 8
    with open(os.path.join(ckpt, "experiments", "perplexity_text_w16_s8.json")) as f:
        assert json.load(f) == result
