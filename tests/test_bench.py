"""bench.py in each mode (train, generate, topic scoring) on a tiny model for a few steps: it runs,
and its last line is the JSON that docs/performance.md reads. No timing asserts: the figures depend on
the machine and its load."""

import json

import pytest

import bench
from configurator import run_cli
from conftest import cli_args

TINY = dict(device="cpu", n_layer=1, n_head=2, n_embd=32, n_senses=4, block_size=16, batch_size=2, dropout=0.0,
            warmup_steps=1, steps=2)


def bench_json(capsys, **kw) -> dict:
    run_cli(bench.main, bench.BenchConfig, cli_args(**{**TINY, **kw}))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_one_model(capsys, tiny_char_data):
    out = bench_json(capsys, data_dir=tiny_char_data, model_type="backpack", compile=False)
    assert out["mode"] == "train" and out["backpack_ms"] == out["backpack_eager_ms"] > 0
    for phase in ("fwd", "bwd", "opt"):
        assert out[f"backpack_eager_{phase}_ms"] > 0
    assert 0 < out["backpack_eager_mfu"] and out["backpack_eager_tokens_per_s"] > 0
    assert "gpt_ms" not in out and "ratio" not in out


def test_compare_on_random_ids(capsys):
    out = bench_json(capsys, data="random", dataset="none", compare=True, compile=False)
    assert out["gpt_ms"] > 0 and out["backpack_ms"] > 0
    assert out["ratio"] == pytest.approx(out["backpack_ms"] / out["gpt_ms"]) == out["ratio_eager"]


def test_compiled_reports_graph_breaks(capsys, tiny_char_data):
    """Both models compile without a graph break in the training step (an issue 12 requirement)."""
    out = bench_json(capsys, data_dir=tiny_char_data, compare=True, compile=True)
    for model in ("gpt", "backpack"):
        assert out[f"{model}_compiled_graph_breaks"] == 0
        assert out[f"{model}_ms"] == out[f"{model}_compiled_ms"]
        ratio = out[f"{model}_compiled_ms"] / out[f"{model}_eager_ms"]
        assert out[f"{model}_compiled_vs_eager"] == pytest.approx(ratio)
    assert out["ratio"] == out["ratio_compiled"]


def test_generate(capsys, tiny_char_data):
    out = bench_json(capsys, data_dir=tiny_char_data, mode="generate", compare=True, new_tokens=5,
                     past_block_tokens=3)
    for model in ("gpt", "backpack"):
        assert out[f"{model}_floor_ms"] > 0
        for case in ("cached", "uncached", "past_cached", "past_window", "past_uncached"):
            assert out[f"{model}_{case}_tokens_per_s"] > 0
        assert out[f"{model}_cached_vs_uncached"] > 0 and out[f"{model}_cached_vs_floor"] > 0
    assert out["ratio"] > 0


@pytest.mark.parametrize("tokens", [0, 10])
def test_topic_scoring_against_a_bare_matmul(capsys, tiny_char_data, tokens):
    """The whole vocabulary's rows, then 10 of them (every column kept) and the full pass extrapolated."""
    out = bench_json(capsys, data_dir=tiny_char_data, mode="topic", topic_tokens=tokens)
    V = out["vocab"]  # the character vocabulary's ids
    assert out["mode"] == "topic" and 10 < V < 100 and out["n_senses"] == 4 and out["n_embd"] == 32
    assert out["tokens"] == (tokens or V) and out["tflop"] == 2 * out["tokens"] * 4 * 32 * V / 1e12
    assert out["scoring_ms"] >= out["scoring_min_ms"] > 0 and out["matmul_ms"] >= out["matmul_min_ms"] > 0
    assert out["ratio"] == pytest.approx(out["scoring_ms"] / out["matmul_ms"])
    assert out["ratio_min"] == pytest.approx(out["scoring_min_ms"] / out["matmul_min_ms"])
    assert out["full_pass_s"] == pytest.approx(out["scoring_ms"] / 1000 * V / out["tokens"])


@pytest.mark.parametrize("mode, trace", [("train", "gpt_eager"), ("generate", "gpt_generate")])
def test_profile_writes_a_chrome_trace(capsys, tiny_char_data, tmp_path, mode, trace):
    bench_json(capsys, data_dir=tiny_char_data, model_type="gpt", compile=False, mode=mode, new_tokens=3,
               past_block_tokens=0, profile=True, out_dir=str(tmp_path))
    with open(tmp_path / f"bench_trace_{trace}.json") as f:
        assert json.load(f)["traceEvents"]


@pytest.mark.parametrize("arg, message", [("--mode=gen", "unknown --mode=gen"), ("--steps=0", "steps must be"),
                                          ("--bogus=1", "unknown config key 'bogus'"),
                                          ("--mode=topic --model_type=gpt", "--mode=topic times a Backpack"),
                                          ("--topic_tokens=-1", "topic_tokens must be >= 0")])
def test_bad_input_is_one_line(capsys, arg, message):
    with pytest.raises(SystemExit) as e:
        run_cli(bench.main, bench.BenchConfig, ["--device=cpu", "--data=random", *arg.split()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
