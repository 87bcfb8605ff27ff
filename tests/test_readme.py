"""Each script's command line once, as a user runs it: prepare -> train -> sample, for both models."""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from checkpoint import load_model
from conftest import REPO, SHAKESPEARE, SHAKESPEARE_IS_FULL
from generate import generate
from sample import SEPARATOR

SEP = SEPARATOR + "\n"


def run(*args, **env):
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def char_dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("shakespeare_char")
    stdout = run("data/shakespeare_char/prepare.py", SHAKESPEARE, f"--out_dir={out_dir}")
    # nanoGPT's counts for the full file (optional data folder), else those of the slice in tests/fixtures
    train, val = (1_003_854, 111_540) if SHAKESPEARE_IS_FULL else (180_338, 20_038)
    assert f"train has {train:,} tokens, val has {val:,} tokens" in stdout
    assert sorted(os.listdir(out_dir)) == ["meta.pkl", "train.bin", "val.bin"]
    return str(out_dir)


def test_prepare_shakespeare_bpe(tmp_path, gpt2_bpe):
    stdout = run("data/shakespeare/prepare.py", SHAKESPEARE, f"--out_dir={tmp_path}")
    if SHAKESPEARE_IS_FULL:
        assert "train has 301,966 tokens, val has 36,059 tokens" in stdout  # nanoGPT's counts
        assert np.fromfile(tmp_path / "val.bin", dtype=np.uint16)[:3].tolist() == [30, 198, 198]  # "?\n\n"
    else:
        assert "train has 54,950 tokens, val has 5,985 tokens" in stdout
        assert np.fromfile(tmp_path / "val.bin", dtype=np.uint16)[:3].tolist() == [82, 502, 276]  # "s meed"


@pytest.mark.parametrize("model_type", ["backpack", "gpt"])
def test_train_then_sample(char_dataset, tmp_path, model_type):
    out_dir = tmp_path / "out"
    stdout = run("train.py", "config/train_shakespeare_char.py", f"--data_dir={char_dataset}",
                 f"--out_dir={out_dir}", f"--model_type={model_type}", "--device=cpu", "--compile=False",
                 "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
                 "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--eval_iters=2", "--dropout=0.0")
    assert "step 20: train loss" in stdout and (out_dir / "ckpt.pt").exists()
    losses = [float(m[1]) for m in re.finditer(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # steps 0, 10, 20 (still in warmup): it learns
    stdout = run("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=ROMEO:", "--num_samples=2",
                 "--max_new_tokens=30")
    samples = stdout.split(SEP)
    with open(os.path.join(char_dataset, "meta.pkl"), "rb") as f:
        vocab = set(pickle.load(f)["itos"].values())
    # two samples, each the prompt, then exactly 30 new characters of the dataset's vocabulary, then a newline
    assert len(samples) == 3 and samples[2] == "" and samples[0] != samples[1]
    for s in samples[:2]:
        assert s.startswith("ROMEO:") and s.endswith("\n") and len(s) == len("ROMEO:") + 30 + 1, repr(s)
        assert set(s[len("ROMEO:"):-1]) <= vocab
    # greedy decoding prints what generate() makes of the trained checkpoint: the weights are really used
    stdout = run("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--start=ROMEO:", "--num_samples=1",
                 "--max_new_tokens=30", "--temperature=0")
    model, tokenizer = load_model("resume", str(out_dir), "cpu")
    prompt = tokenizer.encode("ROMEO:")
    new = generate(model, [prompt], 30, temperature=0, vocab_limit=tokenizer.vocab_size)[0][len(prompt):]
    assert stdout == "ROMEO:" + tokenizer.decode(new.tolist()) + "\n" + SEP
