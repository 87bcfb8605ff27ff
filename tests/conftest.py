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
