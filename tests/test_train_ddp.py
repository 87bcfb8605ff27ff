"""Real DDP on CPU: `torchrun --standalone --nproc_per_node=2 train.py ... --device=cpu` (gloo).

Two ranks x accumulation A must follow the loss trajectory of one process x 2A, only rank 0 writes,
and a rank that dies or hangs must end the job with a clear message instead of a hang.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import REPO, TINY_TRAIN, cli_args
from runs import GradientSync, PeerLost, collective
from train import TrainConfig, get_lr, main


def torchrun(args: list[str], log_path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, **popen)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the train.py processes torchrun started, from /proc (Linux)."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue  # gone already, or not ours to read
        if ppid == launcher_pid and b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(pid)
    return ranks


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def adam_step_bound(beta1: float, beta2: float, steps: int) -> float:
    """The largest |m_hat| / sqrt(v_hat) Adam can reach within `steps` steps, whatever the gradients:
    by Cauchy-Schwarz, sqrt(sum_i a_i^2 / b_i) for m_hat = sum a_i g_i and v_hat = sum b_i g_i^2."""
    worst = 0.0
    for t in range(1, steps + 1):
        a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t) for i in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t) for i in range(1, t + 1)]
        worst = max(worst, sum(x * x / y for x, y in zip(a, b)) ** 0.5)
    return worst


def steps_logged(out_dir) -> int:
    path = os.path.join(out_dir, "steps.jsonl")
    return len(read_jsonl(path)) if os.path.exists(path) else 0


@pytest.mark.parametrize("model_type", ["gpt", "backpack"])
def test_two_ranks_match_one_process(tiny_char_data, tmp_path, model_type):
    """2 ranks x 2 micro-steps == 1 process x 4, dropout on: the data order and the dropout masks
    both follow the global micro-step, and the logged loss is averaged over the ranks."""
    kw = dict(TINY_TRAIN, data_dir=tiny_char_data, model_type=model_type, gradient_accumulation_steps=4)
    main(TrainConfig(**kw, out_dir=str(tmp_path / "one")))
    proc = torchrun(cli_args(**kw, out_dir=tmp_path / "two"), tmp_path / "two.log")
    assert proc.wait(timeout=120) == 0, open(tmp_path / "two.log").read()

    one, two = read_jsonl(tmp_path / "one" / "steps.jsonl"), read_jsonl(tmp_path / "two" / "steps.jsonl")
    assert [r["iter"] for r in two] == list(range(kw["max_iters"]))  # one row per step: rank 0 alone writes
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    evals_one, evals_two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["iter"] for r in evals_two] == [0, 3, 6]
    for a, b in zip(evals_one, evals_two):  # eval losses are averaged over the ranks' share of batches
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5 and abs(a["train_loss"] - b["train_loss"]) < 1e-5
    a, b = load_checkpoint(str(tmp_path / "one" / "ckpt.pt")), load_checkpoint(str(tmp_path / "two" / "ckpt.pt"))
    # The two runs sum the same float32 gradients in another order (2 ranks x 2 micro-steps, then an
    # all-reduce, against 4 micro-steps in a row). Where a gradient is real, that changes it by rounding
    # only, and the weights agree to ~1e-6 (2e-5 allowed). The key part of every c_attn.bias has a
    # gradient that is zero in exact arithmetic (softmax ignores a shift shared by all keys): there both
    # runs follow rounding noise, which Adam's m / sqrt(v) scales to steps of up to adam_bound * lr each,
    # in either direction. Those entries may differ by twice the sum of such steps.
    cfg = TrainConfig(**kw)
    lr_sum = sum(get_lr(it, cfg) for it in range(cfg.max_iters))
    noise = 2 * adam_step_bound(cfg.beta1, cfg.beta2, cfg.max_iters) * lr_sum
    for name in a["model"]:
        atol = torch.full_like(a["model"][name], 2e-5)
        if name.endswith("c_attn.bias"):
            atol[cfg.n_embd:2 * cfg.n_embd] = noise  # [query | key | value] (the sense weights: [query | key])
        assert ((a["model"][name] - b["model"][name]).abs() <= atol).all(), name
    log = open(tmp_path / "two.log").read()
    assert log.count("step 6: train loss") == 1 and log.count("iter 5: loss") == 1  # rank 0 prints, once
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "loss.png", "metrics.jsonl", "steps.jsonl"]


def test_a_dead_rank_ends_the_job(tiny_char_data, tmp_path):
    """SIGKILL rank 1 mid-run: rank 0 notices at its next collective and exits with one clear line;
    the last checkpoint stays loadable."""
    kw = dict(TINY_TRAIN, data_dir=tiny_char_data, out_dir=tmp_path / "out", max_iters=100_000,
              eval_interval=5, gradient_accumulation_steps=2, ddp_timeout=60)
    proc = torchrun(cli_args(**kw), tmp_path / "log")
    try:
        wait_for(lambda: steps_logged(tmp_path / "out") >= 7, 60, "training to start")
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
        rc = proc.wait(timeout=50)  # a hang would last ddp_timeout=60 s
    finally:
        proc.kill()
    log = open(tmp_path / "log").read()
    assert rc != 0
    assert "error: rank 0 lost contact with the other ranks" in log and "--init_from=resume" in log
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["iter_num"] >= 5


def test_a_hung_rank_times_out(tiny_char_data, tmp_path):
    """SIGSTOP rank 1 (alive but silent, as a deadlocked or swapped-out rank): rank 0 gives up after
    ddp_timeout seconds, not never."""
    kw = dict(TINY_TRAIN, data_dir=tiny_char_data, out_dir=tmp_path / "out", max_iters=100_000,
              eval_interval=1000, gradient_accumulation_steps=2, ddp_timeout=3)
    proc = torchrun(cli_args(**kw), tmp_path / "log")
    try:
        wait_for(lambda: steps_logged(tmp_path / "out") >= 3, 60, "training to start")
        pids = worker_pids(proc.pid)
        os.kill(pids[1], signal.SIGSTOP)
        # generous: only a rank 0 that never gives up fails here
        wait_for(lambda: not os.path.exists(f"/proc/{pids[0]}") or
                 open(f"/proc/{pids[0]}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 60, "rank 0 to give up")
        os.kill(pids[1], signal.SIGKILL)  # torchrun would wait 30 s more for the stopped rank
        proc.wait(timeout=30)
    finally:
        proc.kill()
    log = open(tmp_path / "log").read()
    assert "error: rank 0 lost contact with the other ranks (Timed out" in log and "ddp_timeout=3s" in log


def test_sigterm_to_every_rank_saves_once_and_exits_0(tiny_char_data, tmp_path):
    """Preemption under torchrun: each rank gets SIGTERM; they agree at the next step, rank 0 saves
    and every rank exits 0, so torchrun does too."""
    kw = dict(TINY_TRAIN, data_dir=tiny_char_data, out_dir=tmp_path / "out", max_iters=100_000,
              eval_interval=1000, gradient_accumulation_steps=2)
    proc = torchrun(cli_args(**kw), tmp_path / "log")
    try:
        wait_for(lambda: steps_logged(tmp_path / "out") >= 3, 60, "training to start")
        for pid in worker_pids(proc.pid).values():
            os.kill(pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    log = open(tmp_path / "log").read()
    assert rc == 0, log
    assert log.count("stopped by SIGTERM") == 1 and "--init_from=resume" in log
    ckpt = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["iter_num"] == steps_logged(tmp_path / "out") >= 3  # the last finished step is in it


def test_a_failed_save_on_rank_0_ends_every_rank_at_once(tiny_char_data, tmp_path):
    """Rank 0 cannot write its checkpoint (here a folder sits where its temp file goes): it prints the
    error, once, and every rank stops right away instead of waiting ddp_timeout for rank 0."""
    out = tmp_path / "out"
    kw = dict(TINY_TRAIN, data_dir=tiny_char_data, out_dir=out, max_iters=100_000, eval_interval=5,
              gradient_accumulation_steps=2, ddp_timeout=300)
    proc = torchrun(cli_args(**kw), tmp_path / "log")
    try:
        wait_for(lambda: steps_logged(out) >= 1, 60, "training to start")
        os.mkdir(out / "ckpt.pt.tmp")
        rc = proc.wait(timeout=100)  # a hang would last ddp_timeout=300 s
    finally:
        proc.kill()
    log = open(tmp_path / "log").read()
    assert rc != 0, log
    assert log.count("error: saving") == 1 and "ckpt.pt failed" in log and "lost contact" not in log, log
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 0  # the last good save


@pytest.mark.parametrize("error,peer", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1"), True),
    (RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(OpType=ALLREDUCE)"), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1."), True),
    (torch.OutOfMemoryError("CUDA out of memory"), False),
    (ValueError("not from torch.distributed"), False),
])
def test_a_lost_peer_is_told_by_where_the_error_came_from(error, peer):
    """Inside a collective a RuntimeError came from the other ranks (the source path is cut from the
    reason); out of memory is local; with one process there are no peers to lose."""
    with pytest.raises(PeerLost if peer else type(error)) as caught:
        with collective(True):
            raise error
    if peer:
        assert "pair.cc" not in str(caught.value) and caught.value.__cause__ is error
    with pytest.raises(type(error)):
        with collective(False):
            raise error


def test_in_the_synced_backward_only_a_failed_all_reduce_is_a_lost_peer():
    """The backward DDP syncs in also runs local work: a local error there stays itself, whatever it
    says, and an error is a lost peer only once the gradient all-reduce (GradientSync) saw it fail."""
    sync = GradientSync()
    local = RuntimeError("gloo: Timed out, Broken pipe (a local error that only says so)")
    with pytest.raises(RuntimeError) as caught:
        with collective(True, sync):
            raise local
    assert caught.value is local
    for said in ("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv",
                 "Got the following error when running the callback: RuntimeError: [/__w/pytorch/third_party/gloo/"
                 "gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"):  # as a future wraps it
        sync.failure = RuntimeError(said)
        with pytest.raises(PeerLost, match=r"^Timed out waiting 3000ms for recv$"):
            with collective(True, sync):
                raise RuntimeError("what the autograd engine re-raised")


LOCAL_FAILURE = """
import sys
sys.argv[0] = "train.py"
import os, torch, model, train
from configurator import run_cli
forward = model.GPT.forward

class Boom(torch.autograd.Function):  # rank 1's own bug in its backward, worded like a transport error
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("local bug: gloo Timed out Broken pipe")

def failing(self, idx, targets=None):
    logits, loss = forward(self, idx, targets)
    if os.environ["RANK"] == "1" and self.training:
        loss = Boom.apply(loss)
    return logits, loss

model.GPT.forward = failing
run_cli(train.main, train.TrainConfig)
"""


def test_a_local_error_worded_like_a_peer_failure_keeps_its_traceback(tiny_char_data, tmp_path):
    """Rank 1 fails in its own backward (the one DDP syncs in) with a message that mentions gloo, a timeout and a broken pipe:
    rank 1 shows its traceback (it did not lose a peer); rank 0 is the one that lost contact."""
    script = tmp_path / "train_failing.py"
    script.write_text(LOCAL_FAILURE)
    kw = dict(TINY_TRAIN, data_dir=tiny_char_data, out_dir=tmp_path / "out", model_type="gpt", max_iters=20,
              gradient_accumulation_steps=2, ddp_timeout=30)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *cli_args(**kw)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "RuntimeError: local bug: gloo Timed out Broken pipe" in log and "Traceback" in log, log
    assert "rank 1 lost contact" not in log, log
