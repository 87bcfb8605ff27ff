"""common.py's small helpers: one-line errors, near-miss suggestions, the plain-data meta.pkl reader,
what counts as a compiler failure, the MFU peak, and GPT-2 decoding."""

import pickle

import numpy as np
import pytest
import torch

from common import (Tokenizer, UserError, did_you_mean, first_line, is_compiler_failure, load_meta,
                    peak_flops)
from conftest import RunsCode


def test_first_line():
    assert first_line(RuntimeError("first\nsecond")) == "first"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10


def test_did_you_mean_only_near_misses():
    assert did_you_mean("gtp", ["gpt", "backpack"]) == "did you mean gpt?"
    assert did_you_mean("nope", ["clue_small", "shakespeare"]) == "choose one of clue_small, shakespeare"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_meta_pkl_is_read_as_plain_data_only(tmp_path, protocol):
    """nanoGPT's metas and ours load under every pickle protocol (numpy scalars included); a meta.pkl
    that would call anything else is refused before the call, in one line."""
    meta = {"vocab_size": np.int64(65), "itos": {0: "a"}, "stoi": {"a": 0}, "dtype": "uint16", "unk": 0,
            "tokens": {"train": 9}, "tokens_per_s": np.float64(1.5), "seen": {1, 2}, "raw": b"\x00"}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    assert load_meta(str(tmp_path)) == meta
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "tokenizer": RunsCode(tmp_path / "pwned")}, f, protocol=protocol)
    with pytest.raises(UserError, match=r"meta.pkl holds more than plain data \(it would call posix.system\)"):
        load_meta(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_what_counts_as_a_compiler_failure():
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
    assert is_compiler_failure(BackendCompilerFailed(lambda gm, x: gm, InvalidCxxCompiler(), None))
    assert is_compiler_failure(CppCompileError(["g++"], "error: ..."))
    assert not is_compiler_failure(BackendCompilerFailed(lambda gm, x: gm, torch.OutOfMemoryError("oom"), None))
    assert not is_compiler_failure(IndexError("index out of range in self"))
    assert not is_compiler_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_cpu_peak_is_measured_once_per_process():
    peak, description = peak_flops("cpu", "float32")
    assert 1e8 < peak < 1e14 and "fp32 matmul peak" in description and "measured at startup" in description
    assert peak_flops("cpu", "float32") == (peak, description)  # cached: no second measurement


def test_gpt2_decode_keeps_end_of_text(gpt2_bpe):
    """<|endoftext|> (50256) is part of GPT-2's vocab: decoding prints it, as sample.py shows it."""
    tok = Tokenizer({"kind": "gpt2"})
    ids = tok.encode("Hello<|endoftext|>World")
    assert tok.eot_id == 50256 and 50256 in ids
    assert tok.decode(ids) == "Hello<|endoftext|>World"
    assert tok.decode([50256, 50257, 50303]) == "<|endoftext|>"  # the model's padding ids print nothing


def test_a_missing_cpp_compiler_falls_back_to_eager(monkeypatch, capsys):
    """The real failure on a machine without a C++ compiler (inductor's InvalidCxxCompiler, wrapped)."""
    import torch._inductor.config

    from common import compile_model
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))
    model = torch.nn.Linear(4, 4)
    try:
        assert compile_model(model, lambda compiled: compiled(torch.randn(2, 4)).sum().backward()) is model
    finally:
        torch._dynamo.reset()
    assert "warning: torch.compile failed (InductorError: InvalidCxxCompiler" in capsys.readouterr().err
