"""
What a training run needs beyond its loop (train.py), so that the loop reads top-down:

- up-front checks: every flag, the data folder and out_dir, before anything is read or written;
- out_dir: the overwrite policy (a new run never replaces another), the checkpoints (ckpt.pt,
  ckpt_last.pt, ckpt_<iter>.pt) and the append-only logs (metrics.jsonl, steps.jsonl, loss.png);
- robustness: stop signals, lost peers under DDP, non-finite steps, deterministic kernels.
Rank 0 writes every file; on_rank0 shares its outcome with the other ranks.
"""

import contextlib
import difflib
import json
import math
import os
import re
import signal
import tempfile
import time
from dataclasses import asdict

import torch

from checkpoint import checkpoint_dict, load_checkpoint, save_checkpoint
from common import DTYPES, UserError, did_you_mean, first_line, peak_flops
from model import MODELS, VARIANT_CHOICES


# -----------------------------------------------------------------------------
# checks before anything is read or written: a bad value costs a second and one line


BACKENDS = ("auto", "nccl", "gloo", "mpi", "ucc")


def nearest_divisors(n: int, k: int) -> str:
    """'--key=a or --key=b' material: the divisors of n just below and above k."""
    below = max((d for d in range(1, min(k, n) + 1) if n % d == 0), default=1)
    above = min((d for d in range(k, n + 1) if n % d == 0), default=n)
    return " or ".join(str(d) for d in sorted({below, above}))


def check_config(cfg, world_size: int):
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


def check_data_dir(cfg) -> str:
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


def check_out_dir(cfg) -> bool:
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


def check_fresh_start(cfg) -> bool:
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

    def __init__(self, cfg, model, optimizer, scaler, tokenizer_spec: dict, iter_num: int,
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


class PeerLost(Exception):
    """A collective failed: another rank died, or hung longer than ddp_timeout. Only `collective`
    raises it, so an error is called a lost peer for where it came from, never for what it says."""


class GradientSync:
    """DDP's gradient all-reduce (its default hook, registered as a comm hook) that notes when it
    fails. The backward DDP syncs in runs local work too, and gloo reports a lost peer there as a
    plain RuntimeError: whether this hook saw its all-reduce fail tells the two apart."""

    def __init__(self):
        self.failure = None

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def check(fut):
            try:
                return fut.value()
            except Exception as e:
                self.failure = e
                raise
        return allreduce_hook(state, bucket).then(check)


@contextlib.contextmanager
def collective(ddp: bool, sync: GradientSync | None = None):
    """Wraps the cross-rank calls (all-reduce, broadcast, wrapping the model in DDP): a RuntimeError
    raised inside came from the other ranks. With sync, the block is a backward that DDP all-reduces
    in: there only a failure of sync's all-reduce is a lost peer. Out of memory is always local."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        cause = e if sync is None else sync.failure
        if ddp and isinstance(cause, RuntimeError):
            # what the transport said, without the source path in front (nor what wrapped it, a future's callback)
            reason = first_line(cause, 1000)
            said = re.search(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*(.*)", reason)
            reason = (said.group(1) if said else re.sub(r"^\[[^\]]*\]\s*", "", reason)).split(". ")[0]
            raise PeerLost(reason) from e
        raise


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
        with collective(ddp):
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
        with collective(ddp):
            torch.distributed.all_reduce(stats)
    return (stats / world_size).tolist()


class NonFiniteSteps:
    """A NaN/inf loss or gradient norm skips the update; max_nonfinite_steps of them in a row stop
    the run. Under fp16 the GradScaler skips such steps too and lowers its scale. A fresh GradScaler
    starts at 2**16 and halves its scale at every overflow until the gradients fit: until its first
    update, an overflow with a finite loss is that search, not divergence, and is not counted."""

    def __init__(self, cfg, scaler, resumed_scaler: bool, master: bool):
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
