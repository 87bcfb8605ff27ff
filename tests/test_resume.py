"""Nothing lost: exact resume, stopping on SIGINT/SIGTERM, atomic checkpoints, the checkpoint layout
(ckpt.pt / ckpt_last.pt / ckpt_<iter>.pt), best_val_loss, and skipping non-finite steps."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import train
from common import UserError, load_checkpoint, save_checkpoint
from conftest import REPO, TINY_TRAIN, cli_args
from train import TrainConfig, main


def tiny(data_dir, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**dict(TINY_TRAIN, data_dir=data_dir, out_dir=str(out_dir), **overrides))


def assert_same_state(a: dict, b: dict):
    """Bit-identical weights, optimizer state and train state of two checkpoints."""
    assert a["iter_num"] == b["iter_num"] and a["best_val_loss"] == b["best_val_loss"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("model_type", ["gpt", "backpack"])
def test_resume_is_bit_exact(tiny_char_data, tmp_path, model_type, accum):
    """8 iterations straight == 4, then --init_from=resume to 8; dropout is on."""
    kw = dict(model_type=model_type, gradient_accumulation_steps=accum, max_iters=8, lr_decay_iters=8, eval_interval=4)
    main(tiny(tiny_char_data, tmp_path / "straight", **kw))
    main(tiny(tiny_char_data, tmp_path / "halves", **dict(kw, max_iters=4)))
    main(tiny(tiny_char_data, tmp_path / "halves", init_from="resume", **kw))
    assert_same_state(load_checkpoint(str(tmp_path / "straight" / "ckpt.pt")),
                      load_checkpoint(str(tmp_path / "halves" / "ckpt.pt")))


@pytest.mark.parametrize("sig,always_save", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_signal_saves_a_resumable_checkpoint(tiny_char_data, tmp_path, sig, always_save):
    """A signal mid-run: the step finishes, the state is saved (ckpt.pt, or ckpt_last.pt when ckpt.pt
    keeps the best), exit 0 with how to resume; resuming then equals never having stopped."""
    kw = dict(model_type="backpack", gradient_accumulation_steps=2, eval_interval=5, always_save_checkpoint=always_save)
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", *cli_args(**dict(TINY_TRAIN, **kw, data_dir=tiny_char_data,
                                                                        out_dir=out, max_iters=100_000))],
                            cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "steps.jsonl").exists() or len(open(out / "steps.jsonl").readlines()) < 7:
            assert time.time() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    saved = out / ("ckpt.pt" if always_save else "ckpt_last.pt")
    assert f"stopped by {sig.name}" in stdout and "--init_from=resume" in stdout and str(saved) in stdout
    stopped_at = load_checkpoint(str(saved))["iter_num"]
    assert stopped_at == len(open(out / "steps.jsonl").readlines())  # every finished step is in it

    main(tiny(tiny_char_data, out, init_from="resume", max_iters=stopped_at + 3, **kw))
    main(tiny(tiny_char_data, tmp_path / "straight", max_iters=stopped_at + 3, **kw))
    (_, a), (_, b) = train.load_resume_checkpoint(str(out)), train.load_resume_checkpoint(str(tmp_path / "straight"))
    b["best_val_loss"] = a["best_val_loss"]  # the runs evaluated at different iterations
    assert_same_state(a, b)


def test_best_checkpoint_and_latest_state_are_kept_apart(tiny_char_data, tmp_path, capsys):
    """always_save_checkpoint=False: ckpt.pt only ever holds the best val loss (sample.py reads it),
    the newer states go to ckpt_last.pt, and resume continues from the newer of the two."""
    # a learning rate this high makes the val loss rise after the first evaluations
    kw = dict(model_type="gpt", always_save_checkpoint=False, learning_rate=1.0, min_lr=1.0, warmup_iters=0,
              max_iters=12, eval_interval=3, dropout=0.0)
    main(tiny(tiny_char_data, tmp_path, **kw))
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    best = min(evals, key=lambda r: r["val_loss"])
    assert evals[-1]["val_loss"] > best["val_loss"]  # the run did get worse
    best_ckpt, last = load_checkpoint(str(tmp_path / "ckpt.pt")), load_checkpoint(str(tmp_path / "ckpt_last.pt"))
    assert best_ckpt["iter_num"] == best["iter"] and last["iter_num"] == 12
    assert best_ckpt["best_val_loss"] == last["best_val_loss"] == pytest.approx(best["val_loss"])

    best_hash = sha(tmp_path / "ckpt.pt")
    capsys.readouterr()
    main(tiny(tiny_char_data, tmp_path, init_from="resume", **dict(kw, max_iters=15)))
    assert "step 12:" in capsys.readouterr().out  # continued from ckpt_last.pt, not from the best
    assert sha(tmp_path / "ckpt.pt") == best_hash  # a worse state never replaces the best
    assert load_checkpoint(str(tmp_path / "ckpt_last.pt"))["best_val_loss"] == pytest.approx(best["val_loss"])


def test_resume_picks_the_newer_file_and_the_lower_best(tiny_char_data, tmp_path):
    """After a crash between writing ckpt.pt and removing ckpt_last.pt, the stale ckpt_last.pt
    loses; best_val_loss is the lower of the two either way."""
    main(tiny(tiny_char_data, tmp_path, max_iters=3, model_type="gpt"))
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    save_checkpoint(dict(ckpt, iter_num=2, best_val_loss=0.5), str(tmp_path / "ckpt_last.pt"))
    path, chosen = train.load_resume_checkpoint(str(tmp_path))
    assert path.endswith("ckpt.pt") and chosen["iter_num"] == 3 and chosen["best_val_loss"] == 0.5
    save_checkpoint(dict(ckpt, iter_num=4, best_val_loss=9.0), str(tmp_path / "ckpt_last.pt"))
    path, chosen = train.load_resume_checkpoint(str(tmp_path))
    assert path.endswith("ckpt_last.pt") and chosen["iter_num"] == 4 and chosen["best_val_loss"] == ckpt["best_val_loss"]


def test_keep_last_n_periodic_checkpoints(tiny_char_data, tmp_path):
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=10, eval_interval=2, keep_last_n=2))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt")) == ["ckpt.pt", "ckpt_10.pt", "ckpt_8.pt"]
    assert load_checkpoint(str(tmp_path / "ckpt_8.pt"))["iter_num"] == 8


def test_a_failed_save_leaves_the_previous_checkpoint(tiny_char_data, tmp_path, monkeypatch):
    """A full disk mid-save (torch.save writes part of the file, then fails): the run stops with one
    clear line, and the previous ckpt.pt is byte for byte intact, with no temp file left over."""
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=3))
    before = sha(tmp_path / "ckpt.pt")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        main(tiny(tiny_char_data, tmp_path, model_type="gpt", init_from="resume", max_iters=6))
    assert sha(tmp_path / "ckpt.pt") == before and os.listdir(tmp_path).count("ckpt.pt.tmp") == 0
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3


def poison_training_losses(monkeypatch, bad_steps: set[int]):
    """Make the training loss NaN at the given (0-based) training forward calls; evals stay clean."""
    calls = []

    def build_model(*args, **kwargs):
        model = common.build_model(*args, **kwargs)
        forward = model.forward

        def poisoned(idx, targets=None):
            logits, loss = forward(idx, targets)
            if model.training and targets is not None:
                calls.append(1)
                if len(calls) - 1 in bad_steps:
                    loss = loss * float("nan")
            return logits, loss

        model.forward = poisoned
        return model

    monkeypatch.setattr(train, "build_model", build_model)


def test_nonfinite_steps_are_skipped(tiny_char_data, tmp_path, monkeypatch, capsys):
    poison_training_losses(monkeypatch, {2, 3})
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=6, dropout=0.0))
    out = capsys.readouterr().out
    assert "iter 2: non-finite loss nan" in out and "update skipped (2 in a row" in out
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 6 and all(torch.isfinite(p).all() for p in ckpt["model"].values())
    assert all(s["step"].item() == 4 for s in ckpt["optimizer"]["state"].values())  # 6 steps, 2 skipped
    steps = [json.loads(line) for line in open(tmp_path / "steps.jsonl")]
    assert steps[2]["loss"] is None and steps[4]["loss"] is not None


def test_too_many_nonfinite_steps_stop_the_run(tiny_char_data, tmp_path, monkeypatch):
    poison_training_losses(monkeypatch, set(range(1, 100)))
    with pytest.raises(UserError, match="non-finite for 3 steps in a row.*--learning_rate"):
        main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=10, max_nonfinite_steps=3))
