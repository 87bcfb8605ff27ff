"""
Train a Backpack or a GPT. One process:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False

Data parallel on one node with 8 GPUs (gradient_accumulation_steps is split across the ranks):

    torchrun --standalone --nproc_per_node=8 train.py config/train_backpack_lm.py

Across 2 nodes (run on each, --node_rank=0 on the master; add NCCL_IB_DISABLE=1 without InfiniBand):

    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 \
        --master_port=1234 train.py config/train_backpack_lm.py

Ctrl-C or SIGTERM (preemption) finishes the current step, saves a resumable checkpoint and exits 0;
run the same command with --init_from=resume to continue exactly where it stopped. A new run never
replaces another run's checkpoint in out_dir unless --overwrite=True; the same command run again
after its run finished says so and exits 0.
"""

import difflib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (DTYPES, MODELS, UserError, autocast_context, build_model, checkpoint_dict, compile_model,
                    did_you_mean, first_line, get_batch, load_checkpoint, load_meta, load_pretrained, peak_flops,
                    resolve_device, resolve_dtype, save_checkpoint, tokenizer_spec_from_meta)
from configurator import run_cli
from model import VARIANT_CHOICES, VARIANT_FIELDS


@dataclass
class TrainConfig:
    # I/O. Checkpoints in out_dir, all written atomically, all resumable (weights, optimizer, GradScaler,
    # iter_num, best_val_loss, config; the RNG needs no state, see batch_rng):
    #   ckpt.pt       always_save_checkpoint=True: the latest eval (or stop on a signal).
    #                 False: the best val loss so far, as in nanoGPT (what sample.py reads).
    #   ckpt_last.pt  only with always_save_checkpoint=False: a state newer than ckpt.pt (an eval that did
    #                 not improve, or a stop on a signal); removed whenever ckpt.pt is written again.
    #   ckpt_<iter>.pt  the last keep_last_n evals' states, if keep_last_n > 0.
    # --init_from=resume continues from the newer of ckpt.pt and ckpt_last.pt.
    out_dir: str = "out"  # checkpoints, metrics.jsonl (evals), steps.jsonl (logged steps), loss.png
    eval_interval: int = 2000  # evaluate (and maybe checkpoint) every this many iterations
    log_interval: int = 1  # print the training loss every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # ckpt.pt at every eval; False: ckpt.pt holds the best, see above
    keep_last_n: int = 0  # also keep the last n evals' checkpoints as ckpt_<iter>.pt; 0 keeps none
    init_from: str = "scratch"  # 'scratch', 'resume' (see the checkpoints above), gpt2*, backpack-small or a HF directory
    overwrite: bool = False  # a new (not resumed) run may replace the run whose checkpoint is in out_dir
    # logging
    wandb_log: bool = False  # log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "nano-backpacklm"  # wandb project name
    wandb_run_name: str = "run"  # wandb run name
    # data
    dataset: str = "openwebtext"  # reads data/<dataset>/{train,val}.bin
    data_dir: str = ""  # read the bins from here instead of data/<dataset>
    gradient_accumulation_steps: int = 40  # micro-batches per update, summed over all ranks
    batch_size: int = 12  # sequences per micro-batch
    block_size: int = 1024  # context length
    # model
    model_type: str = "backpack"  # 'backpack' or 'gpt'
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # model width d
    dropout: float = 0.0  # 0 for pretraining, 0.1+ for finetuning or small data
    bias: bool = True  # biases in Linears and LayerNorms (the paper's models have them)
    n_senses: int = 16  # Backpack: sense vectors per token (k)
    sense_intermediate_scale: int = 4  # Backpack: sense MLP width = scale * n_embd (1 = "shrink")
    scale_attn_by_inverse_layer_idx: bool | None = None  # None: on for the Backpack, off for GPT
    # Backpack, opt-in departures from the paper (model.py BackpackConfig; README "Character-level Backpacks")
    sense_norm: str = "none"  # none, rms, ln or ln_concat; rms helps character-level models
    sense_base_residual: str = "none"  # none, embedding or block: add the token's vector to every sense
    alpha_dropout: float = 0.0  # dropout on the sense weights alpha
    scale_alpha: bool = True  # False drops the 1/sqrt(d/k) on alpha's scores
    # optimizer (AdamW)
    learning_rate: float = 6e-4  # max learning rate
    max_iters: int = 600000  # total optimizer steps
    weight_decay: float = 1e-1  # on Linear matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm at this value, 0 disables
    # learning rate schedule: linear warmup, cosine decay to min_lr
    decay_lr: bool = True  # False keeps learning_rate constant
    warmup_iters: int = 2000  # linear warmup steps
    lr_decay_iters: int = 600000  # cosine ends here (~max_iters per Chinchilla)
    min_lr: float = 6e-5  # floor of the schedule (~learning_rate/10)
    # system
    backend: str = "auto"  # DDP backend: auto picks nccl on CUDA, gloo on CPU
    device: str = "auto"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "auto"  # float32, bfloat16, float16; auto: bf16/fp16 on CUDA, float32 elsewhere
    compile: bool = True  # torch.compile the model (falls back to eager, with a warning, where it fails)
    deterministic: bool = False  # deterministic kernels: bit-exact GPU runs, at some speed (see the README)
    seed: int = 1337  # seeds init, dropout and the data order
    # failures
    max_nonfinite_steps: int = 5  # a NaN/inf loss or grad norm skips the update; this many in a row stop
    ddp_timeout: int = 600  # seconds a rank waits for the others before it gives up (> one checkpoint save)


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup (non-zero at iter 0), cosine decay, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


EVAL_STREAM = 2**32 - 1  # stream id of the evaluation batches, never a training iteration


def batch_rng(seed: int, *stream: int) -> np.random.Generator:
    """The data order and the dropout masks are a pure function of (seed, iteration, global
    micro-step): resuming needs no saved sampler or RNG state, and 2 ranks x A micro-steps draw
    exactly what 1 process x 2A draws."""
    return np.random.default_rng([seed, *stream])


# -----------------------------------------------------------------------------
# checks before anything is read or written: a bad value costs a second and one line


BACKENDS = ("auto", "nccl", "gloo", "mpi", "ucc")


def nearest_divisors(n: int, k: int) -> str:
    """'--key=a or --key=b' material: the divisors of n just below and above k."""
    below = max((d for d in range(1, min(k, n) + 1) if n % d == 0), default=1)
    above = min((d for d in range(k, n + 1) if n % d == 0), default=n)
    return " or ".join(str(d) for d in sorted({below, above}))


def check_config(cfg: TrainConfig, world_size: int):
    """Every setting that needs nothing loaded: names, counts, probabilities, shapes."""
    for key, choices in (("model_type", tuple(MODELS)), ("dtype", DTYPES), ("backend", BACKENDS),
                         *VARIANT_CHOICES.items()):
        if getattr(cfg, key) not in choices:
            raise UserError(f"unknown --{key}={getattr(cfg, key)}; {did_you_mean(getattr(cfg, key), choices)}")
    if cfg.init_from not in ("scratch", "resume") and not os.path.exists(cfg.init_from):
        if close := difflib.get_close_matches(cfg.init_from, ["scratch", "resume"], n=1):
            raise UserError(f"unknown --init_from={cfg.init_from}; did you mean {close[0]}?")
    positive = ["batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "eval_iters", "max_nonfinite_steps", "ddp_timeout"]
    if cfg.init_from == "scratch":  # otherwise the model's shape comes from the checkpoint or the weights
        positive += ["n_layer", "n_head", "n_embd"]
        if cfg.model_type == "backpack":
            positive += ["n_senses", "sense_intermediate_scale"]
    for key in positive:
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be positive (got {getattr(cfg, key)}); pass --{key}=N with N >= 1")
    for key in ("keep_last_n", "max_iters", "warmup_iters", "lr_decay_iters"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be >= 0 (got {getattr(cfg, key)}); pass --{key}=N with N >= 0")
    for key, low, high, closed, hint in (
            ("learning_rate", 0, math.inf, False, "e.g. --learning_rate=6e-4"),
            ("min_lr", 0, math.inf, True, "0 decays to zero"),
            ("weight_decay", 0, math.inf, True, "0 turns it off"),
            ("grad_clip", 0, math.inf, True, "0 turns clipping off"),
            ("dropout", 0, 1, True, "it is the probability of zeroing an activation, e.g. --dropout=0.1"),
            ("alpha_dropout", 0, 1, True, "it is the probability of zeroing a sense weight, e.g. --alpha_dropout=0.1"),
            ("beta1", 0, 1, True, "e.g. --beta1=0.9"),
            ("beta2", 0, 1, True, "e.g. --beta2=0.95")):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and (low <= value if closed else low < value) and value < high):
            interval = f"{'[' if closed else '('}{low}, {high if high < math.inf else 'inf'})"
            raise UserError(f"{key} must be in {interval} (got {value}); {hint}")
    if cfg.init_from == "scratch" and cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}; heads split the width "
                        f"evenly: pass --n_head={nearest_divisors(cfg.n_embd, cfg.n_head)}")
    if cfg.init_from == "scratch" and cfg.model_type == "backpack" and cfg.n_embd % cfg.n_senses:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_senses={cfg.n_senses}; each sense weight "
                        f"head is n_embd/n_senses wide: pass --n_senses={nearest_divisors(cfg.n_embd, cfg.n_senses)}")
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                        f"the {world_size} ranks; make it a multiple of {world_size}")


def check_data_dir(cfg: TrainConfig) -> str:
    data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    if os.path.isdir(data_dir):
        return data_dir
    if cfg.data_dir:
        raise UserError(f"--data_dir={cfg.data_dir} does not exist; point it at a folder with train.bin and val.bin")
    known = sorted(d for d in os.listdir("data") if os.path.exists(os.path.join("data", d, "prepare.py"))) \
        if os.path.isdir("data") else []
    if close := difflib.get_close_matches(cfg.dataset, known, n=1):
        raise UserError(f"dataset folder {data_dir} not found; did you mean --dataset={close[0]}? Prepare it "
                        f"first: python data/{close[0]}/prepare.py")
    raise UserError(f"dataset folder {data_dir} not found; pick one of {', '.join(known) or 'data/*'} and prepare "
                    "it first (python data/<name>/prepare.py), or pass --data_dir")


def check_out_dir(cfg: TrainConfig) -> bool:
    """Whether to train: out_dir is writable (checked now, not at the first checkpoint after the data
    and the model have loaded) and holds no other run (see check_fresh_start). Nothing is created
    yet: a run that stops at a later check leaves no empty out_dir behind."""
    check_writable(cfg.out_dir)
    return check_fresh_start(cfg)


def check_writable(out_dir: str):
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):  # the folder that out_dir will be created in
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror or e}); pass a writable --out_dir") from None


# Settings that change how a run is launched or logged, not what it computes.
NOT_THE_RUN = {"init_from", "overwrite", "log_interval", "wandb_log", "wandb_project", "wandb_run_name",
               "ddp_timeout", "backend", "compile"}


def check_fresh_start(cfg: TrainConfig) -> bool:
    """A new run (not --init_from=resume) into an out_dir that holds a checkpoint never replaces that
    run silently. The same command run again after its run finished (the README's quick start, run
    twice) has nothing to do: says so and returns False. Anything else is an error naming the run
    found there and the two ways on. --overwrite=True skips this."""
    if cfg.init_from == "resume" or cfg.overwrite:
        return True
    if not any(os.path.exists(os.path.join(cfg.out_dir, name)) for name in ("ckpt.pt", "ckpt_last.pt")):
        if periodic := periodic_checkpoints(cfg.out_dir):
            raise UserError(f"{cfg.out_dir} holds another run's checkpoints ({', '.join(periodic[:3])}); replace "
                            "them with --overwrite=True, or pass another --out_dir")
        return True
    try:
        _, ckpt = load_resume_checkpoint(cfg.out_dir)
    except UserError as e:
        raise UserError(f"{e}; to replace it pass --overwrite=True, or pass another --out_dir") from None
    old = ckpt.get("config", {})
    found = (f"a {ckpt['model_type']} run on {trained_on(old)} at iter {ckpt['iter_num']} "
             f"(best val loss {ckpt['best_val_loss']:.4f})")
    new = asdict(cfg)
    same = all(old.get(key, new[key]) == new[key] for key in new if key not in NOT_THE_RUN) \
        and old.get("init_from") in ("resume", cfg.init_from)
    if same and ckpt["iter_num"] >= cfg.max_iters:
        print(f"{cfg.out_dir} already holds this run, finished: {found}. Nothing to do; to train it again, "
              "pass --overwrite=True")
        return False
    raise UserError(f"{cfg.out_dir} already holds {found}; continue it with --init_from=resume, or replace it "
                    "with --overwrite=True (or pass another --out_dir)")


# -----------------------------------------------------------------------------
# checkpoints and logs (rank 0 writes them all)


def load_resume_checkpoint(out_dir: str) -> tuple[str, dict]:
    """The newest state in out_dir: ckpt.pt, or ckpt_last.pt where it is newer (see TrainConfig).
    Comparing iter_num, not trusting which file exists, keeps this right after a crash between
    writing ckpt.pt and removing ckpt_last.pt."""
    paths = [p for p in (os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt_last.pt")) if os.path.exists(p)]
    if not paths:
        raise UserError(f"--init_from=resume but {out_dir} has no ckpt.pt; train from scratch first or pass "
                        "the run's --out_dir")
    ckpts = [load_checkpoint(p) for p in paths]
    i = max(range(len(ckpts)), key=lambda j: ckpts[j]["iter_num"])  # the first, ckpt.pt, on a tie
    ckpts[i]["best_val_loss"] = min(c["best_val_loss"] for c in ckpts)
    return paths[i], ckpts[i]


def periodic_checkpoints(out_dir: str) -> list[str]:
    """The ckpt_<iter>.pt files (--keep_last_n) in out_dir, lowest iteration first."""
    if not os.path.isdir(out_dir):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(out_dir)
                   if (m := re.fullmatch(r"ckpt_(\d+)\.pt", name)))
    return [name for _, name in found]


def prune_periodic_checkpoints(out_dir: str, keep: int):
    """Remove all but the keep highest-iteration ckpt_<iter>.pt files."""
    for name in periodic_checkpoints(out_dir)[:-keep]:
        os.remove(os.path.join(out_dir, name))


def describe_tokenizer(spec: dict) -> str:
    vocab = spec.get("itos") or spec.get("vocab")
    return f"{spec.get('kind')}" + (f" with {len(vocab)} entries" if vocab else "")


def trained_on(config: dict) -> str:
    """The flag that names the data a checkpoint was trained on."""
    return f"--data_dir={config['data_dir']}" if config.get("data_dir") else f"--dataset={config.get('dataset', '?')}"


def append_jsonl(path: str, row: dict):
    """metrics.jsonl and steps.jsonl only grow, one row per write() to a file opened for appending: a
    crash can tear at most the last line, which read_jsonl skips, and the next row starts a new line."""
    torn = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The rows of metrics.jsonl or steps.jsonl, without a line torn by a crash mid-append."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_losses(metrics_path: str, png_path: str):
    """loss.png from metrics.jsonl, written to a temp file and renamed: never half a picture."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in rows], [r[f"{split}_loss"] for r in rows], marker=".", label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path + ".tmp", format="png")
    plt.close(fig)
    os.replace(png_path + ".tmp", png_path)


class Run:
    """What a checkpoint holds and rank 0 writes: the model, optimizer and GradScaler, iter_num and
    best_val_loss, and the files in out_dir."""

    def __init__(self, cfg: TrainConfig, model, optimizer, scaler, tokenizer_spec: dict, iter_num: int,
                 best_val_loss: float):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.tokenizer_spec, self.iter_num, self.best_val_loss = tokenizer_spec, iter_num, best_val_loss
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.last_path = os.path.join(cfg.out_dir, "ckpt_last.pt")
        self.fresh = cfg.init_from != "resume"  # a new run's logs start empty, see open_out_dir
        self.peak_flops, self.running_mfu = None, None

    def start_logging(self, device: str, dtype: str):
        if self.cfg.wandb_log:
            import wandb
            wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name, config=asdict(self.cfg))
        self.peak_flops, description = peak_flops(device, dtype)
        print(f"mfu is measured against {description}")

    def open_out_dir(self):
        """Create out_dir at the first write. A new run then drops what an earlier run left there
        (its logs, and with --overwrite=True its other checkpoints; ckpt.pt itself is replaced by the
        save that follows), so that the logs are this run's alone."""
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        if self.fresh:
            out = self.cfg.out_dir
            earlier = ["metrics.jsonl", "steps.jsonl", "loss.png", "ckpt_last.pt", *periodic_checkpoints(out)]
            for path in (os.path.join(out, name) for name in earlier):
                if os.path.exists(path):
                    os.remove(path)
            self.fresh = False

    def save(self, path: str, evaluated: bool):
        """evaluated: this state's eval is in metrics.jsonl, so resuming from it need not repeat it."""
        ckpt = checkpoint_dict(self.model, self.tokenizer_spec, optimizer=self.optimizer.state_dict(),
                               scaler=self.scaler.state_dict(), iter_num=self.iter_num,
                               best_val_loss=self.best_val_loss, evaluated=evaluated, config=asdict(self.cfg))
        try:
            save_checkpoint(ckpt, path)
        except OSError as e:
            raise UserError(f"saving {path} failed ({e.strerror or e}); the previous checkpoint is intact. Free "
                            "space or fix --out_dir, then rerun with --init_from=resume") from None
        print(f"saving checkpoint to {path}")
        if path == self.ckpt_path and os.path.exists(self.last_path):
            os.remove(self.last_path)  # ckpt.pt is the newest state now

    def record_eval(self, losses: dict, lr: float):
        """One evaluation: the printed line, metrics.jsonl, loss.png, wandb and the checkpoints."""
        cfg, it = self.cfg, self.iter_num
        self.open_out_dir()
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        append_jsonl(metrics_path, {"iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                                    "lr": lr, "time": time.time()})
        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
        if cfg.wandb_log:
            import wandb
            wandb.log({"iter": it, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if cfg.eval_only:
            return
        self.save(self.ckpt_path if improved or cfg.always_save_checkpoint else self.last_path, evaluated=True)
        if cfg.keep_last_n:
            self.save(os.path.join(cfg.out_dir, f"ckpt_{it}.pt"), evaluated=True)
            prune_periodic_checkpoints(cfg.out_dir, cfg.keep_last_n)

    def record_step(self, lossf: float, normf: float, lr: float, dt: float, idx, accum: int, warm: bool):
        """One training step: the printed line (with MFU once warm: compiling and warm-up distort
        the first iterations, and no figure is printed until there is one) and steps.jsonl."""
        self.open_out_dir()
        if warm:
            mfu = self.model.estimate_mfu(idx, accum, dt, self.peak_flops)
            self.running_mfu = mfu if self.running_mfu is None else 0.9 * self.running_mfu + 0.1 * mfu
        finite = math.isfinite(lossf) and math.isfinite(normf)
        print(f"iter {self.iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms"
              + (f", mfu {self.running_mfu * 100:.2f}%" if self.running_mfu is not None else ""))
        append_jsonl(os.path.join(self.cfg.out_dir, "steps.jsonl"),
                     {"iter": self.iter_num, "loss": lossf if finite else None,
                      "grad_norm": normf if finite else None, "lr": lr, "time_ms": dt * 1000})

    def stop_path(self) -> str:
        return self.ckpt_path if self.cfg.always_save_checkpoint else self.last_path


# -----------------------------------------------------------------------------
# robustness plumbing: signals, agreement between ranks, non-finite steps


class StopSignals(list):
    """SIGINT/SIGTERM only append their name here; the loop finishes its step, saves and returns. In
    one process a second signal of the same kind acts as usual (a second Ctrl-C stops at once). Not
    under torchrun: there a Ctrl-C reaches each rank twice (from the terminal, then forwarded by the
    agent), and the agent itself kills ranks still running 30 s after it forwarded a signal."""

    def __init__(self, ddp: bool):
        super().__init__()
        self.ddp = ddp
        self.previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.append(signal.Signals(signum).name)
        if not self.ddp:
            signal.signal(signum, self.previous[signum])

    def __enter__(self):
        for s in self.previous:
            signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class PeerFailed(Exception):
    """Rank 0 failed and printed why; another rank stops without repeating it."""


# what gloo and NCCL say when another rank died or hung (their exception types vary by version)
PEER_FAILURE_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                         "timed out", "NCCL communicator was aborted", "NCCL error", "ncclRemoteError",
                         "ncclSystemError", "Watchdog caught collective operation timeout", "ProcessGroupNCCL",
                         "ProcessGroupGloo", "gloo")


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or hung longer than ddp_timeout: a
    torch.distributed.DistError (DistBackendError, DistNetworkError, ...), or a RuntimeError with
    what gloo or NCCL say then."""
    return isinstance(e, torch.distributed.DistError) or any(m in str(e) for m in PEER_FAILURE_MESSAGES)


def on_rank0(fn, master: bool, ddp: bool, device: str) -> int:
    """Run fn() -> int (None counts as 0) on rank 0 alone and return its result on every rank. If fn
    raises, rank 0 re-raises (its error is printed once) and every other rank raises PeerFailed right
    away, instead of waiting ddp_timeout at its next collective for a rank that is gone."""
    code, error = 0, None
    if master:
        try:
            code = fn() or 0
        except Exception as e:
            code, error = -1, e
    if ddp:
        shared = torch.tensor([float(code)], device=device)
        torch.distributed.broadcast(shared, src=0)
        code = int(shared.item())
    if error is not None:
        raise error
    if code < 0:
        raise PeerFailed()
    return code


def agree(values: list[torch.Tensor], ddp: bool, world_size: int) -> list[float]:
    """The mean over ranks of a few scalars, in one small all-reduce. Reading it is a host sync every
    step (nanoGPT syncs at log steps only), a small cost next to a step."""
    stats = torch.stack([v.float() for v in values])
    if ddp:
        torch.distributed.all_reduce(stats)
    return (stats / world_size).tolist()


class NonFiniteSteps:
    """A NaN/inf loss or gradient norm skips the update; max_nonfinite_steps of them in a row stop
    the run. Under fp16 the GradScaler skips such steps too and lowers its scale. A fresh GradScaler
    starts at 2**16 and halves its scale at every overflow until the gradients fit: until its first
    update, an overflow with a finite loss is that search, not divergence, and is not counted."""

    def __init__(self, cfg: TrainConfig, scaler, resumed_scaler: bool, master: bool):
        self.cfg, self.scaler, self.master = cfg, scaler, master
        self.in_a_row = 0
        self.scale_search = scaler.is_enabled() and not resumed_scaler

    def update_made(self):
        self.in_a_row, self.scale_search = 0, False

    def skipped(self, iter_num: int, lossf: float, normf: float):
        self.scaler.update()  # fp16: the scaled gradients overflowed, lower the scale (else a no-op)
        if self.scale_search and math.isfinite(lossf):
            if self.master:
                print(f"iter {iter_num}: fp16 gradients overflowed, update skipped; the GradScaler lowers its "
                      f"scale to {self.scaler.get_scale():g}")
            return
        self.in_a_row += 1
        if self.master:
            print(f"iter {iter_num}: non-finite loss {lossf} or grad norm {normf}, update skipped "
                  f"({self.in_a_row} in a row, max_nonfinite_steps={self.cfg.max_nonfinite_steps})")
        if self.in_a_row >= self.cfg.max_nonfinite_steps:
            raise UserError(f"the loss or gradient norm was non-finite for {self.in_a_row} steps in a row "
                            f"(up to iter {iter_num}); lower --learning_rate or set --grad_clip, then rerun from "
                            "the last checkpoint with --init_from=resume")


def set_deterministic():
    """--deterministic=True: only deterministic kernels (an error names any op that has none), so that
    a GPU run repeats bit for bit. cuBLAS also needs CUBLAS_WORKSPACE_CONFIG, set in main before CUDA
    starts. On CPU the kernels used here are deterministic already."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# -----------------------------------------------------------------------------
# the model, batches and evaluation


def init_model(cfg: TrainConfig, meta: dict | None, tokenizer_spec: dict, data_dir: str):
    """scratch, resume or pretrained weights: (model, the checkpoint resumed from or None, tokenizer spec)."""
    ckpt = None
    if cfg.init_from == "scratch":
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          bias=cfg.bias, dropout=cfg.dropout)
        # char-level vocabularies come from meta.pkl; GPT-2 BPE is padded to a multiple of 64 for speed
        model_args["vocab_size"] = meta["vocab_size"] if meta and "vocab_size" in meta else 50304
        if cfg.scale_attn_by_inverse_layer_idx is not None:
            model_args["scale_attn_by_inverse_layer_idx"] = cfg.scale_attn_by_inverse_layer_idx
        if cfg.model_type == "backpack":
            model_args.update(n_senses=cfg.n_senses, sense_intermediate_scale=cfg.sense_intermediate_scale,
                              **{key: getattr(cfg, key) for key in VARIANT_FIELDS})
        model = build_model(cfg.model_type, **model_args)
    elif cfg.init_from == "resume":
        resume_path, ckpt = load_resume_checkpoint(cfg.out_dir)
        if ckpt["model_type"] != cfg.model_type:
            raise UserError(f"{resume_path} holds a {ckpt['model_type']} model but model_type={cfg.model_type}; "
                            f"pass --model_type={ckpt['model_type']}")
        if ckpt["tokenizer"] != tokenizer_spec:
            raise UserError(f"the tokenizer in {data_dir} ({describe_tokenizer(tokenizer_spec)}) differs from the one "
                            f"{resume_path} was trained with ({describe_tokenizer(ckpt['tokenizer'])}); resume on "
                            f"its data ({trained_on(ckpt.get('config', {}))})")
        model = build_model(ckpt["model_type"], **dict(ckpt["model_args"], dropout=cfg.dropout))
        model.load_state_dict(ckpt["model"])
        tokenizer_spec = ckpt["tokenizer"]
    else:  # finetune pretrained weights: a GPT-2 name, backpack-small, or a local Hugging Face directory
        model, pretrained_tokenizer = load_pretrained(cfg.init_from, cfg.dropout, cfg.model_type)
        if pretrained_tokenizer != tokenizer_spec:
            raise UserError(f"--init_from={cfg.init_from} uses the {pretrained_tokenizer.get('kind')} tokenizer but "
                            f"{data_dir} holds {tokenizer_spec.get('kind')} tokens; use a dataset prepared with it")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} exceeds the model's {model.config.block_size} positions")
    return model, ckpt, tokenizer_spec


@dataclass
class Batches:
    """common.get_batch with everything fixed but the split and the rng. Token ids at or past
    vocab_size in a .bin are an error."""
    data_dir: str
    meta: dict | None
    batch_size: int
    block_size: int
    device: str
    vocab_size: int

    def __call__(self, split: str, rng: np.random.Generator):
        return get_batch(self.data_dir, split, self.meta, self.batch_size, self.block_size, rng, self.device,
                         self.vocab_size)


@torch.no_grad()
def estimate_loss(model, batches: Batches, ctx, cfg: TrainConfig, rank: int, world_size: int, ddp: bool) -> dict:
    """Mean loss over eval_iters batches per split, the same batches at every eval so that evals are
    comparable; the batches are split across ranks and the result averaged."""
    out = {}
    model.eval()
    for split_id, split in enumerate(("train", "val")):
        losses = torch.zeros(2, device=batches.device)  # (sum, count)
        for k in range(rank, cfg.eval_iters, world_size):
            X, Y = batches(split, batch_rng(cfg.seed, EVAL_STREAM, split_id, k))
            with ctx:
                _, loss = model(X, Y)
            losses += torch.stack([loss.float(), torch.ones((), device=batches.device)])
        if ddp:
            torch.distributed.all_reduce(losses)
        out[split] = (losses[0] / losses[1]).item()
    model.train()
    return out


def forward_backward(model, batches: Batches, ctx, scaler, cfg: TrainConfig, iter_num: int, rank: int,
                     accum: int, ddp: bool):
    """accum micro-steps of forward and backward; DDP syncs the gradients on the last one only.
    Returns (the mean loss over the micro-steps, unsynced; the last micro-batch's inputs)."""
    loss_mean = torch.zeros((), device=batches.device)
    for micro_step in range(accum):
        rng = batch_rng(cfg.seed, iter_num, rank * accum + micro_step)
        X, Y = batches("train", rng)
        torch.manual_seed(int(rng.integers(2**63)))  # this micro-step's dropout masks, see batch_rng
        if ddp:
            model.require_backward_grad_sync = micro_step == accum - 1
        with ctx:
            _, loss = model(X, Y)
            loss = loss / accum  # mean over the micro-batches, not their sum
        loss_mean += loss.detach()
        scaler.scale(loss).backward()
    return loss_mean, X


# -----------------------------------------------------------------------------


def main(cfg: TrainConfig):
    # ---- checks, then distributed setup: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    check_config(cfg, world_size)
    if cfg.deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # read when cuBLAS starts, so before any CUDA work
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    data_dir = check_data_dir(cfg)
    rank = 0
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        # the timeout bounds every collective too, so a hung rank ends the job instead of stalling it
        init_process_group(backend=backend, timeout=timedelta(seconds=cfg.ddp_timeout))
        rank = int(os.environ["RANK"])
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    try:
        if cfg.deterministic:
            set_deterministic()
        with StopSignals(ddp) as stop_signals:
            train(cfg, device, dtype, data_dir, rank, world_size, ddp, stop_signals)
    except PeerFailed:
        sys.exit(1)
    except RuntimeError as e:
        if not (ddp and is_peer_failure(e)):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e, 1000)).split(". ")[0]  # drop the source path
        print(f"error: rank {rank} lost contact with the other ranks ({reason}); one of them died (its error "
              f"is in the log) or hung longer than ddp_timeout={cfg.ddp_timeout}s. Fix that, then rerun with "
              "--init_from=resume", file=sys.stderr)
        sys.exit(1)
    finally:  # main may run in-process (tests): leave torch's global switches as they were
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]
        if ddp:
            destroy_process_group()


def train(cfg: TrainConfig, device: str, dtype: str, data_dir: str, rank: int, world_size: int, ddp: bool,
          stop_signals: StopSignals):
    master = rank == 0
    accum = cfg.gradient_accumulation_steps // world_size  # micro-steps on this rank
    device_type = device.split(":")[0]
    ctx = autocast_context(device, dtype)
    torch.manual_seed(cfg.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data, and out_dir: rank 0 looks, every rank learns whether to go on
    meta = load_meta(data_dir)
    tokenizer_spec = tokenizer_spec_from_meta(meta)
    if not on_rank0(lambda: int(check_out_dir(cfg)), master, ddp, device):
        return
    if master:
        print(f"tokens per iteration: {cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size:,}")

    # ---- model, optimizer, GradScaler
    model, ckpt, tokenizer_spec = init_model(cfg, meta, tokenizer_spec, data_dir)
    model.to(device)
    if master:
        print(f"{cfg.model_type}: {model.get_num_params() / 1e6:.2f}M parameters (position embeddings excluded)")
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    run = Run(cfg, model, optimizer, scaler, tokenizer_spec, 0, float("inf"))
    evaluated_at = None  # the resumed state's eval is already in metrics.jsonl: not repeated
    resumed_scaler = False
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        # a float32/bf16 checkpoint has an empty GradScaler state, and float32/bf16 runs need none
        resumed_scaler = scaler.is_enabled() and bool(ckpt.get("scaler"))
        if resumed_scaler:
            scaler.load_state_dict(ckpt["scaler"])
        run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        evaluated_at = run.iter_num if ckpt.get("evaluated", True) else None
        if master and run.iter_num >= cfg.max_iters and not cfg.eval_only:
            print(f"{cfg.out_dir} is at iter {run.iter_num}, max_iters={cfg.max_iters}: nothing to train; "
                  "raise --max_iters to continue")
        ckpt = None  # free memory
    batches = Batches(data_dir, meta, cfg.batch_size, cfg.block_size, device, model.config.vocab_size)
    nonfinite = NonFiniteSteps(cfg, scaler, resumed_scaler, master)

    raw_model = model
    if cfg.compile:
        def first_step(compiled):  # forward and backward, so that both compile here
            X, Y = batches("train", batch_rng(cfg.seed, EVAL_STREAM, 0, 0))
            with ctx:
                compiled(X, Y)[1].backward()
        model = compile_model(model, first_step)
        optimizer.zero_grad(set_to_none=True)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    on_rank0(lambda: run.start_logging(device, dtype), master, ddp, device)

    # ---- training loop
    t0 = time.time()
    local_iter = 0
    params = list(raw_model.parameters())
    while True:
        lr = get_lr(run.iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if cfg.eval_only or ((run.iter_num % cfg.eval_interval == 0 or run.iter_num >= cfg.max_iters)
                             and run.iter_num != evaluated_at):
            losses = estimate_loss(model, batches, ctx, cfg, rank, world_size, ddp)
            on_rank0(lambda: run.record_eval(losses, lr), master, ddp, device)
        if run.iter_num >= cfg.max_iters or cfg.eval_only:
            break

        loss_mean, X = forward_backward(model, batches, ctx, scaler, cfg, run.iter_num, rank, accum, ddp)
        scaler.unscale_(optimizer)  # true gradients for the norm and the clip (a no-op without fp16)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # one decision for all ranks: the loss (what is logged), skipping a non-finite step, stopping
        lossf, normf, stop = agree([loss_mean, grad_norm, torch.tensor(float(bool(stop_signals)), device=device)],
                                   ddp, world_size)
        if math.isfinite(lossf) and math.isfinite(normf):
            if cfg.grad_clip != 0.0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            nonfinite.update_made()
        else:
            nonfinite.skipped(run.iter_num, lossf, normf)
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if run.iter_num % cfg.log_interval == 0:
            on_rank0(lambda: run.record_step(lossf, normf, lr, dt, X, accum, warm=local_iter >= 5), master, ddp, device)
        run.iter_num += 1
        local_iter += 1
        if stop:  # every rank agreed, at the all-reduce above
            on_rank0(lambda: run.save(run.stop_path(), evaluated=False), master, ddp, device)
            if master:
                print(f"stopped by {stop_signals[0] if stop_signals else 'a signal to another rank'} after "
                      f"{run.iter_num} iterations; {run.stop_path()} holds the state. To continue, run the same "
                      "command with --init_from=resume")
            break


if __name__ == "__main__":
    run_cli(main, TrainConfig)
