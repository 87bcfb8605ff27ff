"""Shared test fixtures: paths to the repo and to the offline data in ../shared/data."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")
SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
GPT2_BPE_DIR = os.path.join(SHARED_DATA, "gpt2-bpe")


@pytest.fixture(autouse=True)
def offline_gpt2_bpe(monkeypatch):
    """Nothing may download at test time: GPT-2 BPE comes from the shared tiktoken file."""
    monkeypatch.setenv("GPT2_BPE_DIR", GPT2_BPE_DIR)


# -----------------------------------------------------------------------------
# a tiny char-level dataset and a tiny training config, for the DDP, resume and error tests

TINY_TRAIN = dict(device="cpu", compile=False, n_layer=1, n_head=2, n_embd=32, n_senses=4, block_size=16,
                  batch_size=2, gradient_accumulation_steps=1, max_iters=6, lr_decay_iters=6, warmup_iters=1,
                  learning_rate=1e-2, eval_interval=3, eval_iters=2, log_interval=1, dropout=0.1)


def write_char_dataset(folder, n_chars: int = 50_000) -> str:
    """The first n_chars of Tiny Shakespeare as train.bin/val.bin/meta.pkl (90/10), in folder."""
    import pickle

    import numpy as np
    os.makedirs(folder, exist_ok=True)
    with open(SHAKESPEARE) as f:
        text = f.read()[:n_chars]
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    ids[: n_chars * 9 // 10].tofile(os.path.join(folder, "train.bin"))
    ids[n_chars * 9 // 10:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "dtype": "uint16", "tokenizer": {"kind": "char", "itos": chars}}, f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_char_data(tmp_path_factory) -> str:
    return write_char_dataset(tmp_path_factory.mktemp("tiny_char"))


def cli_args(**kw) -> list[str]:
    return [f"--{k}={v}" for k, v in kw.items()]
