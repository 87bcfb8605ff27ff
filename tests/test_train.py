"""train.py in-process on a tiny character-level Shakespeare: learning, checkpoints, schedule, logs."""

import json
import math
import pickle
import re

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import get_batch, load_meta
from model import build_model
from conftest import SHAKESPEARE_HEAD
from train import EVAL_STREAM, TrainConfig, batch_rng, get_lr, main


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """The first 200k characters of Tiny Shakespeare (the slice in tests/fixtures) as a char-level
    dataset (train/val/meta.pkl)."""
    data_dir = tmp_path_factory.mktemp("shakespeare_char")
    with open(SHAKESPEARE_HEAD) as f:
        text = f.read()[:200_000]
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    ids[:180_000].tofile(data_dir / "train.bin")
    ids[180_000:].tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return str(data_dir)


def tiny_cfg(data_dir, out_dir, **overrides):
    cfg = dict(data_dir=data_dir, out_dir=str(out_dir), device="cpu", compile=False, n_layer=2, n_head=2,
               n_embd=32, n_senses=4, block_size=32, batch_size=8, gradient_accumulation_steps=1,
               max_iters=60, lr_decay_iters=60, warmup_iters=5, learning_rate=3e-3, min_lr=3e-4,
               eval_interval=30, eval_iters=4, log_interval=10, dropout=0.0)
    cfg.update(overrides)
    return TrainConfig(**cfg)


@torch.no_grad()
def eval_loss(model, data_dir, split: str, cfg) -> float:
    """What train.py's evaluation must compute: the mean loss over its eval_iters batches of split."""
    meta, split_id = load_meta(data_dir), ("train", "val").index(split)
    losses = [model(*get_batch(data_dir, split, meta, cfg.batch_size, cfg.block_size,
                               batch_rng(cfg.seed, EVAL_STREAM, split_id, k), "cpu"))[1]
              for k in range(cfg.eval_iters)]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("model_type", ["gpt", "backpack"])
def test_training_lowers_loss_and_checkpoints(char_data, tmp_path, model_type, capsys):
    cfg = tiny_cfg(char_data, tmp_path, model_type=model_type)
    main(cfg)
    out = capsys.readouterr().out
    assert "step 0: train loss" in out and "iter 10: loss" in out and "mfu is measured against a fp32 matmul peak" in out
    iter_lines = [line for line in out.splitlines() if line.startswith("iter ")]
    assert "mfu" not in iter_lines[0] and "mfu" in iter_lines[-1]  # no figure before there is one
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in rows] == [0, 30, 60]
    assert abs(rows[0]["val_loss"] - math.log(62)) < 0.1  # ~ln V at init (62 characters)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.8
    assert (tmp_path / "loss.png").stat().st_size > 1000

    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    # the logged losses are those of the final model on each split's own .bin
    final = model_from_checkpoint(ckpt).eval()
    assert rows[-1]["val_loss"] == pytest.approx(eval_loss(final, char_data, "val", cfg), abs=1e-5)
    assert rows[-1]["train_loss"] == pytest.approx(eval_loss(final, char_data, "train", cfg), abs=1e-5)
    assert ckpt["model_type"] == model_type and ckpt["iter_num"] == 60
    assert ckpt["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert ckpt["tokenizer"]["kind"] == "char" and len(ckpt["tokenizer"]["itos"]) == 62
    assert ckpt["config"]["n_embd"] == 32 and ckpt["model_args"]["vocab_size"] == 62
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    # round trip: the rebuilt model gives the logits the trained one gave
    model = model_from_checkpoint(ckpt).eval()
    x = torch.randint(0, 62, (2, 16))
    assert model(x)[0].shape == (2, 16, 62)
    again = model_from_checkpoint(load_checkpoint(str(tmp_path / "ckpt.pt"))).eval()
    assert torch.equal(model(x)[0], again(x)[0])


def test_eval_only(char_data, tmp_path, capsys):
    main(tiny_cfg(char_data, tmp_path, max_iters=10, eval_interval=10))
    capsys.readouterr()
    main(tiny_cfg(char_data, tmp_path, init_from="resume", eval_only=True, model_type="backpack"))
    out = capsys.readouterr().out
    assert "step 10: train loss" in out and "iter " not in out


@pytest.mark.parametrize("model_type,clip", [("gpt", 1.5), ("backpack", 1.5), ("gpt", 0.5), ("backpack", 0.5)])
def test_first_step_matches_reference(char_data, tmp_path, model_type, clip):
    """Two training iterations of 2 micro-steps each equal hand-written steps: the mean of the
    micro-batch losses, gradient clipping, AdamW at get_lr(it). grad_clip = clip x the norm of the
    first mean gradient. 1.5: between the norm and twice it, so summing the micro-batch losses (a
    classic bug) would clip differently and change the second Adam step. 0.5: clipping happens, so
    skipping it would change the relative size of the two steps' gradients, and the second Adam step."""
    cfg = tiny_cfg(char_data, tmp_path, model_type=model_type, max_iters=2, eval_interval=2,
                   batch_size=4, gradient_accumulation_steps=2)
    meta = load_meta(char_data)
    torch.manual_seed(cfg.seed)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, dropout=0.0, vocab_size=62)
    ref = build_model(model_type, **(dict(args, n_senses=4) if model_type == "backpack" else args))
    opt = ref.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    for it in range(2):
        batches = [get_batch(char_data, "train", meta, 4, 32, batch_rng(cfg.seed, it, m), "cpu") for m in range(2)]
        loss = sum(ref(x, y)[1] for x, y in batches) / 2
        loss.backward()
        if it == 0:
            cfg.grad_clip = clip * torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        if it == 0:  # the case each clip stands for: 0.5 clips the first step, 1.5 does not
            assert (norm > cfg.grad_clip) == (clip < 1)
        for group in opt.param_groups:
            group["lr"] = get_lr(it, cfg)
        opt.step()
        opt.zero_grad()

    main(cfg)
    trained = load_checkpoint(str(tmp_path / "ckpt.pt"))["model"]
    for name, p in ref.state_dict().items():
        assert torch.allclose(trained[name], p, atol=1e-6), name


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, cfg) > 0  # non-zero at iter 0
    assert get_lr(9, cfg) < get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(10_000, cfg) == 0.1
    assert get_lr(5, TrainConfig(decay_lr=False, learning_rate=0.3)) == 0.3


def test_best_val_loss_is_never_overwritten_by_a_worse_one(char_data, tmp_path):
    # a learning rate this high makes the loss rise after the first evaluation
    main(tiny_cfg(char_data, tmp_path, model_type="gpt", learning_rate=1.0, min_lr=1.0, warmup_iters=0,
                  max_iters=20, eval_interval=10))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["val_loss"] > min(r["val_loss"] for r in rows)  # the run did get worse
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert ckpt["iter_num"] == 20  # always_save_checkpoint keeps saving the latest state


def test_mfu_of_the_quick_start_is_below_100_percent(char_data, tmp_path, capsys):
    """The README's quick start (a 4-layer, 128-wide Backpack, context 64, batch 12, characters) against
    the fp32 matmul peak measured at startup: MFU counts what runs, so it stays below 100%."""
    main(tiny_cfg(char_data, tmp_path, model_type="backpack", n_layer=4, n_head=4, n_embd=128, n_senses=16,
                  block_size=64, batch_size=12, max_iters=12, eval_interval=100, eval_iters=1, log_interval=1,
                  learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000))
    mfus = [float(m) for m in re.findall(r"mfu (-?[\d.]+)%", capsys.readouterr().out)]
    assert len(mfus) >= 6 and all(0 < m < 100 for m in mfus), mfus


def test_deterministic_flag(char_data, tmp_path, monkeypatch):
    """--deterministic=True: deterministic kernels and cuBLAS's workspace setting while training, torch's
    switches as they were afterwards; on CPU the numbers are those of a run without it."""
    import os

    import train
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    forward_backward = train.forward_backward

    def recording(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(train, "forward_backward", recording)
    kw = dict(model_type="backpack", max_iters=4, eval_interval=4, dropout=0.1)
    main(tiny_cfg(char_data, tmp_path / "det", deterministic=True, **kw))
    assert seen == [True] * 4 and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    main(tiny_cfg(char_data, tmp_path / "default", **kw))
    assert seen[4:] == [False] * 4
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"))["model"] for d in ("det", "default"))
    assert all(torch.equal(a[k], b[k]) for k in a)
