"""
Train a Backpack or a GPT. One process:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False

Data parallel on one node with 8 GPUs (gradient_accumulation_steps is split across the ranks):

    torchrun --standalone --nproc_per_node=8 train.py config/train_backpack_lm.py

Across 2 nodes (run on each, --node_rank=0 on the master; add NCCL_IB_DISABLE=1 without InfiniBand):

    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 \
        --master_port=1234 train.py config/train_backpack_lm.py
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (UserError, autocast_context, build_model, checkpoint_dict, get_batch, load_checkpoint,
                    load_meta, load_pretrained, resolve_device, resolve_dtype, save_checkpoint,
                    tokenizer_spec_from_meta)
from configurator import run_cli


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints, metrics.jsonl and loss.png go here
    eval_interval: int = 2000  # evaluate (and maybe checkpoint) every this many iterations
    log_interval: int = 1  # print the training loss every this many iterations
    eval_iters: int = 200  # batches per split in each evaluation
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), gpt2*, backpack-small or a HF directory
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
    compile: bool = True  # torch.compile the model
    seed: int = 1337  # seeds init, dropout and the data order


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
    """The data order is a pure function of (seed, iteration, global micro-step): resuming needs no
    saved sampler state, and 2 ranks x A micro-steps read exactly what 1 process x 2A reads."""
    return np.random.default_rng([seed, *stream])


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
    if ddp:
        device = resolve_device(cfg.device)
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        init_process_group(backend=backend)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        device, rank, world_size = resolve_device(cfg.device), 0, 1
    master = rank == 0
    try:
        _train(cfg, device, rank, world_size, master, ddp)
    finally:
        if ddp:
            destroy_process_group()


def _train(cfg: TrainConfig, device: str, rank: int, world_size: int, master: bool, ddp: bool):
    if cfg.batch_size <= 0 or cfg.block_size <= 0:
        raise UserError(f"batch_size and block_size must be positive (got {cfg.batch_size}, {cfg.block_size})")
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                        f"the {world_size} ranks; make it a multiple of {world_size}")
    accum = cfg.gradient_accumulation_steps // world_size  # micro-steps on this rank
    dtype = resolve_dtype(cfg.dtype, device)
    device_type = device.split(":")[0]
    ctx = autocast_context(device, dtype)
    torch.manual_seed(cfg.seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    meta = load_meta(data_dir)
    tokenizer_spec = tokenizer_spec_from_meta(meta)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"tokens per iteration: {cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size:,}")

    # ---- model
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
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
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_type"] != cfg.model_type:
            raise UserError(f"{ckpt_path} holds a {ckpt['model_type']} model but model_type={cfg.model_type}; "
                            f"pass --model_type={ckpt['model_type']}")
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
        torch.set_rng_state(ckpt["rng"]["torch"][rank % len(ckpt["rng"]["torch"])])
        ckpt = None  # free memory

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    def batch(split, rng):
        return get_batch(data_dir, split, meta, cfg.batch_size, cfg.block_size, rng, device)

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

    def save(val_loss_best):
        ckpt = checkpoint_dict(raw_model, tokenizer_spec, optimizer=optimizer.state_dict(),
                               scaler=scaler.state_dict(), iter_num=iter_num, best_val_loss=val_loss_best,
                               config=asdict(cfg), rng={"torch": rng_states})
        save_checkpoint(ckpt, ckpt_path)
        print(f"saving checkpoint to {cfg.out_dir}")

    if cfg.wandb_log and master:
        import wandb
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg))
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master and device_type != "cuda":
        print("note: mfu on this device is an estimate against a nominal peak")

    # ---- training loop
    t0 = time.time()
    local_iter, running_mfu = 0, -1.0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only:
            losses = estimate_loss()
            # Every rank's dropout RNG state, so that a resumed run continues bit-exactly.
            rng_states = [torch.get_rng_state()]
            if ddp:
                rng_states = [None] * world_size
                torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                        "lr": lr, "time": time.time()}) + "\n")
                plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
                if cfg.wandb_log:
                    wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if (improved or cfg.always_save_checkpoint) and not cfg.eval_only:
                    save(best_val_loss)
        if iter_num >= cfg.max_iters or cfg.eval_only:
            break

        # forward/backward over accum micro-batches; DDP syncs gradients on the last one only
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(accum):
            X, Y = batch("train", batch_rng(cfg.seed, iter_num, rank * accum + micro_step))
            if ddp:
                model.require_backward_grad_sync = micro_step == accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / accum  # mean over the micro-batches, not their sum
            loss_sum += loss.detach()
            scaler.scale(loss).backward()
        if cfg.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0 and master:
            lossf = loss_sum.item()  # this rank's mean loss; a sync point, so only every log_interval
            if local_iter >= 5:  # let the first iterations (compile, warmup) pass
                mfu, _ = raw_model.estimate_mfu(cfg.batch_size * accum, dt, device)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {running_mfu * 100:.2f}%")
        iter_num += 1
        local_iter += 1


if __name__ == "__main__":
    run_cli(main, TrainConfig)
