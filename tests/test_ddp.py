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

from common import load_checkpoint
from conftest import REPO, TINY_TRAIN, cli_args
from train import TrainConfig, is_peer_failure, main


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
    # Weights agree less tightly than losses: the key part of c_attn.bias has a gradient that is zero
    # in exact arithmetic (softmax ignores a shift shared by all keys), so it holds rounding noise,
    # which Adam's g / sqrt(v) scales up to lr-sized steps whose sign follows the reduction order.
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=1e-4, rtol=0)
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
    (torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1."), True),
    (RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)"), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error"), True),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"), True),
    (torch.distributed.DistNetworkError("Connection reset by peer"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), False),
])
def test_peer_failures_are_recognised_for_gloo_and_nccl(error, peer):
    assert is_peer_failure(error) == peer
