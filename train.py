"""
Train a Backpack or a GPT. One process:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False

Data parallel on one node with 8 GPUs (gradient_accumulation_steps is split across the ranks):

    torchrun --standalone --nproc_per_node=8 train.py config/train_backpack_lm.py

Across 2 nodes (run on each, --node_rank=0 on the master; add NCCL_IB_DISABLE=1 without InfiniBand):

    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 \
        --master_port=1234 train.py config/train_backpack_lm.py

Ctrl-C or SIGTERM (preemption) finishes the current step, saves a resumable checkpoint and exits 0;
run the same command with --init_from=resume to continue exactly where it stopped.
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

from common import (UserError, autocast_context, build_model, checkpoint_dict, compile_model, get_batch,
                    load_checkpoint, load_meta, load_pretrained, resolve_device, resolve_dtype, save_checkpoint,
                    tokenizer_spec_from_meta)
from configurator import run_cli


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


def check_config(cfg: TrainConfig, world_size: int):
    """Checks that need nothing loaded, so that a bad value costs a second, not a data load."""
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "eval_iters", "max_nonfinite_steps", "ddp_timeout"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive (got {getattr(cfg, key)}); pass --{key}=N with N >= 1")
    if cfg.keep_last_n < 0:
        raise UserError(f"keep_last_n must be >= 0 (got {cfg.keep_last_n}); 0 keeps no ckpt_<iter>.pt files")
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                        f"the {world_size} ranks; make it a multiple of {world_size}")


def check_out_dir(out_dir: str):
    """Fail at startup, not at the first checkpoint after the data and the model have loaded."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror or e}); pass a writable --out_dir") from None


def check_data_dir(cfg: TrainConfig) -> str:
    data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    if os.path.isdir(data_dir):
        return data_dir
    if cfg.data_dir:
        raise UserError(f"--data_dir={cfg.data_dir} does not exist; point it at a folder with train.bin and val.bin")
    known = sorted(d for d in os.listdir("data") if os.path.exists(os.path.join("data", d, "prepare.py"))) \
        if os.path.isdir("data") else []
    guess = (difflib.get_close_matches(cfg.dataset, known, n=1) or known or ["<name>"])[0]
    raise UserError(f"dataset folder {data_dir} not found; pick one of {', '.join(known) or 'data/*'} and prepare "
                    f"it first, e.g. python data/{guess}/prepare.py then --dataset={guess}")


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


def prune_periodic_checkpoints(out_dir: str, keep: int):
    """Remove all but the keep highest-iteration ckpt_<iter>.pt files."""
    found = sorted((int(m.group(1)), name) for name in os.listdir(out_dir)
                   if (m := re.fullmatch(r"ckpt_(\d+)\.pt", name)))
    for _, name in found[:-keep]:
        os.remove(os.path.join(out_dir, name))


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died (gloo: connection reset/closed) or hung
    longer than ddp_timeout (gloo: timed out; NCCL's watchdog aborts the process by itself)."""
    return isinstance(e, torch.distributed.DistError) or "gloo" in str(e)


def describe_tokenizer(spec: dict) -> str:
    vocab = spec.get("itos") or spec.get("vocab")
    return f"{spec.get('kind')}" + (f" with {len(vocab)} entries" if vocab else "")


def trained_on(config: dict) -> str:
    """The flag that names the data a checkpoint was trained on."""
    return f"--data_dir={config['data_dir']}" if config.get("data_dir") else f"--dataset={config.get('dataset', '?')}"


def append_jsonl(path: str, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(metrics_path: str, png_path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in rows], [r[f"{split}_loss"] for r in rows], marker=".", label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def main(cfg: TrainConfig):
    # ---- distributed setup: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if ddp:
        device = resolve_device(cfg.device)
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        # the timeout bounds every collective too, so a hung rank ends the job instead of stalling it
        init_process_group(backend=backend, timeout=timedelta(seconds=cfg.ddp_timeout))
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        device, rank, world_size = resolve_device(cfg.device), 0, 1
    master = rank == 0

    # SIGINT/SIGTERM only raise a flag; the loop finishes its step, saves and returns. In one process a
    # second signal of the same kind acts as usual (a second Ctrl-C stops at once). Not under torchrun:
    # there a Ctrl-C reaches each rank twice (from the terminal, then forwarded by the agent), and the
    # agent itself kills ranks that are still running 30 s after it forwarded a signal.
    stop_signals: list[str] = []
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum, frame):
        stop_signals.append(signal.Signals(signum).name)
        if not ddp:
            signal.signal(signum, previous[signum])

    for s in previous:
        signal.signal(s, request_stop)
    try:
        _train(cfg, device, rank, world_size, master, ddp, stop_signals)
    except RuntimeError as e:
        if not (ddp and is_peer_failure(e)):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]).split(". ")[0]  # drop the source path
        print(f"error: rank {rank} lost contact with the other ranks ({reason}); one of them died (its error "
              f"is in the log) or hung longer than ddp_timeout={cfg.ddp_timeout}s. Fix that, then rerun with "
              "--init_from=resume", file=sys.stderr)
        sys.exit(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ddp:
            destroy_process_group()


def _train(cfg: TrainConfig, device: str, rank: int, world_size: int, master: bool, ddp: bool,
           stop_signals: list[str]):
    accum = cfg.gradient_accumulation_steps // world_size  # micro-steps on this rank
    dtype = resolve_dtype(cfg.dtype, device)
    device_type = device.split(":")[0]
    ctx = autocast_context(device, dtype)
    torch.manual_seed(cfg.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if master:
        check_out_dir(cfg.out_dir)
    data_dir = check_data_dir(cfg)
    meta = load_meta(data_dir)
    tokenizer_spec = tokenizer_spec_from_meta(meta)
    if master:
        print(f"tokens per iteration: {cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size:,}")

    # ---- model
    ckpt_path, last_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "ckpt_last.pt")
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if cfg.init_from == "scratch":
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          bias=cfg.bias, dropout=cfg.dropout)
        # char-level vocabularies come from meta.pkl; GPT-2 BPE is padded to a multiple of 64 for speed
        model_args["vocab_size"] = meta["vocab_size"] if meta and "vocab_size" in meta else 50304
        if cfg.scale_attn_by_inverse_layer_idx is not None:
            model_args["scale_attn_by_inverse_layer_idx"] = cfg.scale_attn_by_inverse_layer_idx
        if cfg.model_type == "backpack":
            model_args.update(n_senses=cfg.n_senses, sense_intermediate_scale=cfg.sense_intermediate_scale)
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
        model_args = dict(ckpt["model_args"], dropout=cfg.dropout)
        model = build_model(ckpt["model_type"], **model_args)
        model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
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
    model.to(device)
    if master:
        print(f"{cfg.model_type}: {model.get_num_params() / 1e6:.2f}M parameters (position embeddings excluded)")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        ckpt = None  # free memory

    vocab_size = model.config.vocab_size  # token ids at or past it in a .bin are an error

    def batch(split, rng):
        return get_batch(data_dir, split, meta, cfg.batch_size, cfg.block_size, rng, device, vocab_size)

    raw_model = model
    if cfg.compile:
        def first_step(compiled):  # forward and backward, so that both compile here
            X, Y = batch("train", batch_rng(cfg.seed, EVAL_STREAM, 0, 0))
            with ctx:
                compiled(X, Y)[1].backward()
        model = compile_model(model, first_step)
        optimizer.zero_grad(set_to_none=True)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches per split, the same batches at every eval so that evals
        are comparable; the batches are split across ranks and the result averaged."""
        out = {}
        model.eval()
        for split_id, split in enumerate(("train", "val")):
            losses = torch.zeros(2, device=device)  # (sum, count)
            for k in range(rank, cfg.eval_iters, world_size):
                X, Y = batch(split, batch_rng(cfg.seed, EVAL_STREAM, split_id, k))
                with ctx:
                    _, loss = model(X, Y)
                losses += torch.stack([loss.float(), torch.ones((), device=device)])
            if ddp:
                torch.distributed.all_reduce(losses)
            out[split] = (losses[0] / losses[1]).item()
        model.train()
        return out

    def save(path):
        ckpt = checkpoint_dict(raw_model, tokenizer_spec, optimizer=optimizer.state_dict(),
                               scaler=scaler.state_dict(), iter_num=iter_num, best_val_loss=best_val_loss,
                               config=asdict(cfg))
        try:
            save_checkpoint(ckpt, path)
        except OSError as e:
            raise UserError(f"saving {path} failed ({e.strerror or e}); the previous checkpoint is intact. Free "
                            "space or fix --out_dir, then rerun with --init_from=resume") from None
        print(f"saving checkpoint to {path}")
        if path == ckpt_path and os.path.exists(last_path):
            os.remove(last_path)  # ckpt.pt is the newest state now

    if cfg.wandb_log and master:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master and device_type != "cuda":
        print("note: mfu on this device is an estimate against a nominal peak")

    # ---- training loop
    t0 = time.time()
    local_iter, running_mfu, nonfinite_in_a_row = 0, -1.0, 0
    params = list(raw_model.parameters())
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only:
            losses = estimate_loss()
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                append_jsonl(metrics_path, {"iter": iter_num, "train_loss": losses["train"],
                                            "val_loss": losses["val"], "lr": lr, "time": time.time()})
                plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
                if cfg.wandb_log:
                    wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if not cfg.eval_only:
                    save(ckpt_path if improved or cfg.always_save_checkpoint else last_path)
                    if cfg.keep_last_n:
                        save(os.path.join(cfg.out_dir, f"ckpt_{iter_num}.pt"))
                        prune_periodic_checkpoints(cfg.out_dir, cfg.keep_last_n)
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break

        # forward/backward over accum micro-batches; DDP syncs gradients on the last one only
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum):
            rng = batch_rng(cfg.seed, iter_num, rank * accum + micro_step)
            X, Y = batch("train", rng)
            torch.manual_seed(int(rng.integers(2**63)))  # this micro-step's dropout masks, see batch_rng
            if ddp:
                model.require_backward_grad_sync = micro_step == accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / accum  # mean over the micro-batches, not their sum
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradients for the norm and the clip (a no-op without fp16)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # One small all-reduce per step: the loss averaged over ranks (what is logged), and one
        # decision for all ranks on skipping a non-finite step and on stopping after a signal. Reading
        # it is a host sync every step (nanoGPT syncs at log steps only), a small cost next to a step.
        stats = torch.stack([loss_sum.float(), grad_norm.float(),
                             torch.tensor(float(bool(stop_signals)), device=device)])
        if ddp:
            torch.distributed.all_reduce(stats)
        lossf, normf, stop = (stats / world_size).tolist()
        finite = math.isfinite(lossf) and math.isfinite(normf)
        if finite or scaler.is_enabled():  # fp16: the GradScaler skips inf/nan steps and lowers its scale
            if cfg.grad_clip != 0.0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            nonfinite_in_a_row = 0
        else:
            nonfinite_in_a_row += 1
            if master:
                print(f"iter {iter_num}: non-finite loss {lossf} or grad norm {normf}, update skipped "
                      f"({nonfinite_in_a_row} in a row, max_nonfinite_steps={cfg.max_nonfinite_steps})")
            if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise UserError(f"the loss or gradient norm was non-finite for {nonfinite_in_a_row} steps in a row "
                                f"(up to iter {iter_num}); lower --learning_rate or set --grad_clip, then rerun from "
                                "the last checkpoint with --init_from=resume")
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0 and master:
            if local_iter >= 5:  # let the first iterations (compile, warmup) pass
                mfu, _ = raw_model.estimate_mfu(cfg.batch_size * accum, dt, device)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {running_mfu * 100:.2f}%")
            append_jsonl(os.path.join(cfg.out_dir, "steps.jsonl"),
                         {"iter": iter_num, "loss": lossf if finite else None, "grad_norm": normf if finite else None,
                          "lr": lr, "time_ms": dt * 1000})
        iter_num += 1
        local_iter += 1
        if stop:  # every rank agreed, at the all-reduce above
            path = ckpt_path if cfg.always_save_checkpoint else last_path
            if master:
                save(path)
                print(f"stopped by {stop_signals[0] if stop_signals else 'a signal to another rank'} after "
                      f"{iter_num} iterations; {path} holds the state. To continue, run the same command "
                      "with --init_from=resume")
            break


if __name__ == "__main__":
    run_cli(main, TrainConfig)
