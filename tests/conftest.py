"""
Shared test fixtures and where the test data comes from.

The suite needs nothing beyond the repo: the small data it trains on ships in tests/fixtures/. Data the
repo cannot ship (the GPT-2 BPE file, the Chinese samples, the BERT vocab, Don Quixote, word-similarity
sets) is looked up in an optional data folder: $TEST_DATA_DIR, else ../shared/data beside the repo (where
CI keeps it). A test that needs something missing skips with one line saying what and how to get it
(`gpt2_bpe`, `shared_file`).
REQUIRE_ALL_TESTS=1 (set by .ci/run) turns every skip into a failure.
"""

import functools
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
SHARED_DATA = os.environ.get("TEST_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")  # optional
# Tiny Shakespeare (public domain): its first 200,376 characters ship in the repo; tests that count the
# whole corpus use the full file when the optional data folder has it, else the slice's own counts.
SHAKESPEARE_HEAD = os.path.join(FIXTURES, "tinyshakespeare_head.txt")
SHAKESPEARE_FULL = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
SHAKESPEARE_IS_FULL = os.path.exists(SHAKESPEARE_FULL)
SHAKESPEARE = SHAKESPEARE_FULL if SHAKESPEARE_IS_FULL else SHAKESPEARE_HEAD
GPT2_BPE_DIR = os.path.join(SHARED_DATA, "gpt2-bpe")  # gpt2.tiktoken; without it tiktoken's cache/download
STRICT = os.environ.get("REQUIRE_ALL_TESTS") == "1"


def pytest_sessionstart(session):
    # Tiny models gain nothing from threads, and on a busy machine extra threads only wait for each
    # other (one review saw an overfit test go from 46-88 s to 1.4-4 s). Subprocesses inherit the env.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    if STRICT:  # a module that skips as a whole fails at collection: report it and run the rest anyway
        config.option.continue_on_collection_errors = True


def _strict(report):
    """Under REQUIRE_ALL_TESTS=1 a skip is a failure that still says why it skipped."""
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"REQUIRE_ALL_TESTS=1 but this skipped: {reason.removeprefix('Skipped: ')}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict(outcome.get_result())


@pytest.fixture(autouse=True)
def gpt2_bpe_source(monkeypatch):
    """GPT-2 BPE from gpt2-bpe/ in the optional data folder when it is there, so CI downloads nothing;
    otherwise the user's GPT2_BPE_DIR, or tiktoken's own cache and download."""
    if os.path.isdir(GPT2_BPE_DIR):
        monkeypatch.setenv("GPT2_BPE_DIR", GPT2_BPE_DIR)


@functools.cache
def _gpt2_bpe(bpe_dir: str | None):
    """(encoding, None) or (None, why it is unavailable); tried once per source."""
    from common import UserError, gpt2_encoding
    try:
        return gpt2_encoding(), None
    except UserError as e:  # GPT2_BPE_DIR without the file
        return None, str(e)
    except Exception as e:  # offline: requests' ConnectionError or ProxyError
        return None, f"tiktoken could not download it: {type(e).__name__}"


@pytest.fixture
def gpt2_bpe(gpt2_bpe_source):
    """tiktoken's GPT-2 encoding for tests that need the BPE, or a one-line skip saying how to get it."""
    encoding, error = _gpt2_bpe(os.environ.get("GPT2_BPE_DIR"))
    if encoding is None:
        pytest.skip(f"needs the GPT-2 BPE file ({error}); go online once (tiktoken caches it) or set "
                    "GPT2_BPE_DIR to a folder holding gpt2.tiktoken")
    return encoding


def shared_file(relpath: str, what: str, how_to_get: str) -> str:
    """The path of <optional data folder>/<relpath>, data the repo cannot ship; the calling test skips
    with one line (what is missing, how to get it) when it is not there."""
    path = os.path.join(SHARED_DATA, relpath)
    if not os.path.exists(path):
        pytest.skip(f"needs {what} ({relpath} in $TEST_DATA_DIR, default ../shared/data); {how_to_get}")
    return path


# -----------------------------------------------------------------------------
# a tiny char-level dataset and a tiny training config, for the DDP, resume and error tests

TINY_TRAIN = dict(device="cpu", compile=False, n_layer=1, n_head=2, n_embd=32, n_senses=4, block_size=16,
                  batch_size=2, gradient_accumulation_steps=1, max_iters=6, lr_decay_iters=6, warmup_iters=1,
                  learning_rate=1e-2, eval_interval=3, eval_iters=2, log_interval=1, dropout=0.1)


def write_char_dataset(folder, n_chars: int = 50_000) -> str:
    """The first n_chars (at most 200,376: the slice in the repo) of Tiny Shakespeare as
    train.bin/val.bin/meta.pkl (90/10), in folder."""
    import pickle

    import numpy as np
    os.makedirs(folder, exist_ok=True)
    with open(SHAKESPEARE_HEAD) as f:
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


class RunsCode:
    """Unpickling this would run a shell command (touch marker): what every loader of pickles here
    (checkpoints, meta.pkl) must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
