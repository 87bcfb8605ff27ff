"""Nothing lost: exact resume, stopping on SIGINT/SIGTERM, atomic checkpoints, the checkpoint layout
(ckpt.pt / ckpt_last.pt / ckpt_<iter>.pt), best_val_loss, a new run never replacing another, resume
across dtypes, and skipping non-finite steps (fp16 included)."""

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import model as models
import runs
import train
from checkpoint import load_checkpoint, save_checkpoint
from common import UserError
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
    (_, a), (_, b) = runs.load_resume_checkpoint(str(out)), runs.load_resume_checkpoint(str(tmp_path / "straight"))
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
    out = capsys.readouterr().out
    assert "iter 12: loss" in out and "step 12:" not in out  # continued from ckpt_last.pt, not from the best
    assert sha(tmp_path / "ckpt.pt") == best_hash  # a worse state never replaces the best
    assert load_checkpoint(str(tmp_path / "ckpt_last.pt"))["best_val_loss"] == pytest.approx(best["val_loss"])


def test_resume_picks_the_newer_file_and_the_lower_best(tiny_char_data, tmp_path):
    """After a crash between writing ckpt.pt and removing ckpt_last.pt, the stale ckpt_last.pt
    loses; best_val_loss is the lower of the two either way."""
    main(tiny(tiny_char_data, tmp_path, max_iters=3, model_type="gpt"))
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    save_checkpoint(dict(ckpt, iter_num=2, best_val_loss=0.5), str(tmp_path / "ckpt_last.pt"))
    path, chosen = runs.load_resume_checkpoint(str(tmp_path))
    assert path.endswith("ckpt.pt") and chosen["iter_num"] == 3 and chosen["best_val_loss"] == 0.5
    save_checkpoint(dict(ckpt, iter_num=4, best_val_loss=9.0), str(tmp_path / "ckpt_last.pt"))
    path, chosen = runs.load_resume_checkpoint(str(tmp_path))
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

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        main(tiny(tiny_char_data, tmp_path, model_type="gpt", init_from="resume", max_iters=6))
    assert sha(tmp_path / "ckpt.pt") == before and os.listdir(tmp_path).count("ckpt.pt.tmp") == 0
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3


class InfGrad(torch.autograd.Function):
    """Identity forward, inf gradient backward: an fp16 overflow of the gradients with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_training_losses(monkeypatch, bad_steps: set[int], how: str = "loss"):
    """Make the training loss NaN (how='loss'), or only its gradient inf (how='grad'), at the given
    (0-based) training forward calls; evals stay clean."""
    calls = []

    def build_model(*args, **kwargs):
        model = models.build_model(*args, **kwargs)
        forward = model.forward

        def poisoned(idx, targets=None):
            logits, loss = forward(idx, targets)
            if model.training and targets is not None:
                calls.append(1)
                if len(calls) - 1 in bad_steps:
                    loss = loss * float("nan") if how == "loss" else InfGrad.apply(loss)
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


def test_isolated_nonfinite_steps_do_not_stop_the_run(tiny_char_data, tmp_path, monkeypatch):
    """The count is of bad steps in a row: a good step in between resets it."""
    poison_training_losses(monkeypatch, {1, 3, 5, 7})
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=10, max_nonfinite_steps=2, dropout=0.0))
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 10 and all(s["step"].item() == 6 for s in ckpt["optimizer"]["state"].values())


def fake_fp16(monkeypatch):
    """--dtype=float16 on CPU as far as train.py's bookkeeping goes: a GradScaler that is on (torch has
    one for CPU), while the math stays float32 (no autocast) and MFU uses a made-up peak."""
    monkeypatch.setattr(train, "resolve_dtype", lambda dtype, device: dtype if dtype != "auto" else "float32")
    monkeypatch.setattr(train, "autocast_context", lambda device, dtype: contextlib.nullcontext())
    monkeypatch.setattr(runs, "peak_flops", lambda device, dtype: (1e12, "a test peak"))


@pytest.mark.parametrize("first,then", [("float32", "float16"), ("float16", "float32"), ("float16", "float16"),
                                        ("bfloat16", "float32")])
def test_resume_across_dtypes(tiny_char_data, tmp_path, monkeypatch, first, then):
    """A float32/bf16 checkpoint has an empty GradScaler state: resuming it under float16 starts a
    fresh scaler, and a float16 checkpoint's scaler state is used only by a float16 run."""
    fake_fp16(monkeypatch)
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", dtype=first, max_iters=3))
    saved_scale = load_checkpoint(str(tmp_path / "ckpt.pt"))["scaler"].get("scale")
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", dtype=then, max_iters=6, init_from="resume"))
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 6 and bool(ckpt["scaler"]) == (then == "float16")
    if first == then == "float16":  # the state went on from the saved one (2**16 unless it overflowed)
        assert saved_scale is not None and ckpt["scaler"]["scale"] == saved_scale


def test_fp16_skipped_steps_count_as_nonfinite(tiny_char_data, tmp_path, monkeypatch):
    """Under fp16 the GradScaler skips the steps with inf/nan gradients itself; they still count
    toward max_nonfinite_steps, so a diverged fp16 run stops."""
    fake_fp16(monkeypatch)
    poison_training_losses(monkeypatch, set(range(1, 100)))
    with pytest.raises(UserError, match="non-finite for 3 steps in a row"):
        main(tiny(tiny_char_data, tmp_path, model_type="gpt", dtype="float16", max_iters=10, max_nonfinite_steps=3))


def test_fp16_scale_search_is_not_divergence(tiny_char_data, tmp_path, monkeypatch, capsys):
    """A fresh GradScaler's first overflows (finite loss, inf gradients) lower its scale and are not
    counted; once it has made an update, gradient overflows count like any non-finite step."""
    fake_fp16(monkeypatch)
    poison_training_losses(monkeypatch, {0, 1, 2}, how="grad")
    main(tiny(tiny_char_data, tmp_path / "search", model_type="gpt", dtype="float16", max_iters=6, max_nonfinite_steps=2))
    out = capsys.readouterr().out
    assert out.count("fp16 gradients overflowed, update skipped") == 3 and "non-finite" not in out
    assert load_checkpoint(str(tmp_path / "search" / "ckpt.pt"))["scaler"]["scale"] == 2.0**13  # 2**16 halved 3 times

    poison_training_losses(monkeypatch, {0} | set(range(2, 100)), how="grad")
    with pytest.raises(UserError, match="non-finite for 2 steps in a row"):
        main(tiny(tiny_char_data, tmp_path / "diverged", model_type="gpt", dtype="float16", max_iters=10,
                  max_nonfinite_steps=2))


def test_resume_does_not_repeat_the_eval(tiny_char_data, tmp_path, capsys):
    """The state saved at an evaluation is resumed without evaluating and saving it again: one row per
    evaluation in metrics.jsonl. A finished run resumed as it is has nothing to do."""
    kw = dict(model_type="gpt", max_iters=6, eval_interval=3)
    main(tiny(tiny_char_data, tmp_path, **dict(kw, max_iters=3)))
    capsys.readouterr()
    main(tiny(tiny_char_data, tmp_path, init_from="resume", **kw))
    out = capsys.readouterr().out
    assert "step 3:" not in out and "iter 3: loss" in out and out.count("saving checkpoint") == 1
    assert [r["iter"] for r in runs.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 3, 6]

    files = {name: sha(tmp_path / name) for name in os.listdir(tmp_path)}
    main(tiny(tiny_char_data, tmp_path, init_from="resume", **kw))
    assert "nothing to train" in capsys.readouterr().out
    assert {name: sha(tmp_path / name) for name in os.listdir(tmp_path)} == files


def test_a_state_saved_by_a_signal_is_evaluated_on_resume(tiny_char_data, tmp_path, monkeypatch, capsys):
    """A stop after iteration 2 saves iter_num 3 before its evaluation ran: resuming runs it."""
    calls = []
    build = models.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        forward = model.forward

        def forward_then_sigterm(idx, targets=None):
            if model.training and targets is not None:
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)  # train.py's handler only notes it
            return forward(idx, targets)

        model.forward = forward_then_sigterm
        return model

    monkeypatch.setattr(train, "build_model", build_model)
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=6, eval_interval=3))
    assert "stopped by SIGTERM after 3 iterations" in capsys.readouterr().out
    monkeypatch.undo()
    main(tiny(tiny_char_data, tmp_path, model_type="gpt", max_iters=6, eval_interval=3, init_from="resume"))
    assert "step 3: train loss" in capsys.readouterr().out
    assert [r["iter"] for r in runs.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 3, 6]


def test_a_new_run_never_replaces_another(tiny_char_data, tmp_path, capsys):
    """Into an out_dir holding a checkpoint, a new run (not --init_from=resume) is refused with one line
    naming the run found and the ways on; the same command run again after it finished has nothing
    to do (exit 0, so the README's commands work twice); --overwrite=True replaces the run, and the
    logs then start anew."""
    kw = dict(model_type="gpt", max_iters=6, eval_interval=3, keep_last_n=2)
    main(tiny(tiny_char_data, tmp_path, **kw))
    files = {name: sha(tmp_path / name) for name in os.listdir(tmp_path)}
    assert "ckpt_6.pt" in files
    capsys.readouterr()

    main(tiny(tiny_char_data, tmp_path, **kw))
    assert "already holds this run, finished: a gpt run on --data_dir=" in capsys.readouterr().out
    for other in (dict(kw, learning_rate=1e-3), dict(kw, max_iters=9), dict(kw, model_type="backpack")):
        with pytest.raises(UserError, match=r"already holds a gpt run on --data_dir=\S+ at iter 6 \(best val loss "
                                            r"\d+\.\d{4}\); continue it with --init_from=resume, or replace it with "
                                            r"--overwrite=True"):
            main(tiny(tiny_char_data, tmp_path, **other))
    assert {name: sha(tmp_path / name) for name in os.listdir(tmp_path)} == files

    main(tiny(tiny_char_data, tmp_path, overwrite=True, **dict(kw, max_iters=2, eval_interval=1, keep_last_n=0)))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "loss.png", "metrics.jsonl", "steps.jsonl"]
    assert [r["iter"] for r in runs.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert [r["iter"] for r in runs.read_jsonl(tmp_path / "steps.jsonl")] == [0, 1]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 2

    lone = tmp_path / "lone"  # only a periodic checkpoint is left of that run: still a run
    lone.mkdir()
    os.rename(tmp_path / "ckpt.pt", lone / "ckpt_4.pt")
    with pytest.raises(UserError, match=r"holds another run's checkpoints \(ckpt_4.pt\); replace them with --overwrite"):
        main(tiny(tiny_char_data, lone, **kw))


def test_a_torn_log_line_is_skipped(tmp_path):
    """metrics.jsonl and steps.jsonl are appended to, not rewritten: a crash mid-append tears at most
    the last line. Readers skip it, the next row starts a line of its own, and loss.png (written to a
    temp file, then renamed) still draws."""
    path = str(tmp_path / "metrics.jsonl")
    runs.append_jsonl(path, {"iter": 0, "train_loss": 2.0, "val_loss": 2.1})
    with open(path, "a") as f:
        f.write('{"iter": 1, "train_lo')  # the crash
    runs.append_jsonl(path, {"iter": 2, "train_loss": 1.0, "val_loss": 1.1})
    assert [r["iter"] for r in runs.read_jsonl(path)] == [0, 2]
    runs.plot_losses(path, str(tmp_path / "loss.png"))
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl"]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package (imported lazily by runs.Run): records every call."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, row):
        self.calls.append(("log", row))


def test_wandb_gets_the_config_once_and_every_eval(tiny_char_data, tmp_path, monkeypatch):
    """--wandb_log=True: one wandb.init with the project, the run name and the whole config, then one
    wandb.log per evaluation with the losses and learning rate that metrics.jsonl records."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny(tiny_char_data, tmp_path, wandb_log=True, wandb_project="proj", wandb_run_name="1e-3")
    main(cfg)
    (kind, init), *logs = fake.calls
    assert kind == "init" and init["project"] == "proj" and init["name"] == "1e-3"
    assert init["config"]["max_iters"] == cfg.max_iters and init["config"]["wandb_log"] is True
    metrics = runs.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [kind for kind, _ in logs] == ["log"] * len(metrics) and [r["iter"] for r in metrics] == [0, 3, 6]
    for (_, row), m in zip(logs, metrics):
        assert row == {"iter": m["iter"], "train/loss": m["train_loss"], "val/loss": m["val_loss"], "lr": m["lr"]}
    fake.calls.clear()
    main(tiny(tiny_char_data, tmp_path / "quiet"))  # off by default: wandb is never called
    assert fake.calls == []
