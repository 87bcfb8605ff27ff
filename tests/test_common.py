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


def test_cpu_peak_is_the_best_timed_matmul_and_measured_once(monkeypatch):
    """The peak is 2 n^3 / (the fastest timed matmul), n = 512 and 1024 on CPU: with a clock that says
    every 1024 matmul took 2 ms and every 512 one 1 ms, it is exactly 2 * 1024^3 / 0.002."""
    import common
    clock = {"now": 0.0}
    real_matmul = torch.Tensor.__matmul__

    def timed_matmul(a, b):
        clock["now"] += 0.002 if a.shape[0] == 1024 else 0.001
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["now"])
    threads = 12345  # a cache key of its own, so no earlier measurement in this process answers
    peak = common.measured_matmul_flops("cpu", "float32", threads)
    assert peak == pytest.approx(max(2 * 512**3 / 0.001, 2 * 1024**3 / 0.002), rel=1e-9)
    clock["now"] = -1e9  # a second call would time nothing sensible: it must come from the cache
    assert common.measured_matmul_flops("cpu", "float32", threads) == peak
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert peak_flops("cpu", "float32") == (peak, f"a fp32 matmul peak of {peak / 1e9:,.0f} GFLOP/s measured at "
                                                  f"startup ({threads} threads)")


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
    model = torch.nn.Linear(4, 4)
    # torch's own config patch restores the key on exit; pytest's monkeypatch (9.2) deletes a key that
    # torch's config module serves through __getattr__, which broke every later compile in the process
    try:
        with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
            assert compile_model(model, lambda compiled: compiled(torch.randn(2, 4)).sum().backward()) is model
    finally:
        torch._dynamo.reset()
    assert torch._inductor.config.cpp.cxx != ("/nonexistent/g++",)
    assert "warning: torch.compile failed (InductorError: InvalidCxxCompiler" in capsys.readouterr().err


def test_gpt2_files_in_a_directory_are_the_gpt2_tokenizer(tmp_path, gpt2_bpe):
    """A "bpe" spec read from GPT-2's own vocab.json + merges.txt is the same tokenizer as {"kind":
    "gpt2"} (so a hub GPT-2 directory finetunes on GPT-2 data); a different BPE is not."""
    import json

    import hf
    from common import same_tokenizer, tokenizer_fingerprint
    from test_eval_harness import _TEXT, train_bpe, write_bpe_files
    write_bpe_files(tmp_path / "gpt2", *hf.gpt2_vocab_and_merges(gpt2_bpe))
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": 50256}))
    spec = hf.identify(str(tmp_path / "gpt2"))[1]
    assert spec["kind"] == "bpe" and same_tokenizer(spec, {"kind": "gpt2"})
    write_bpe_files(tmp_path / "other", *train_bpe(_TEXT, 20))
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    other = hf.identify(str(tmp_path / "other"))[1]
    assert not same_tokenizer(other, {"kind": "gpt2"}) and not same_tokenizer(other, spec)
    assert tokenizer_fingerprint({"kind": "char", "itos": ["a"]}) != tokenizer_fingerprint({"kind": "char", "itos": ["b"]})
