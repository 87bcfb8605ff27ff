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

import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_pretrained
from common import (UserError, autocast_context, compile_model, get_batch, load_meta, resolve_device, resolve_dtype,
                    same_tokenizer, tokenizer_spec_from_meta)
from configurator import run_cli
from model import VARIANT_FIELDS, build_model
from runs import (GradientSync, NonFiniteSteps, PeerFailed, PeerLost, Run, StopSignals, agree, check_config, check_data_dir,
                  check_out_dir, collective, describe_tokenizer, load_resume_checkpoint, on_rank0, set_deterministic,
                  trained_on)


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
    # Backpack, opt-in departures from the paper (model.py BackpackConfig; docs/character-level.md)
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
    deterministic: bool = False  # deterministic kernels: bit-exact GPU runs, at some speed (docs/robustness.md)
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
        if not same_tokenizer(ckpt["tokenizer"], tokenizer_spec):
            raise UserError(f"the tokenizer in {data_dir} ({describe_tokenizer(tokenizer_spec)}) differs from the one "
                            f"{resume_path} was trained with ({describe_tokenizer(ckpt['tokenizer'])}); resume on "
                            f"its data ({trained_on(ckpt.get('config', {}))})")
        model = build_model(ckpt["model_type"], **dict(ckpt["model_args"], dropout=cfg.dropout))
        model.load_state_dict(ckpt["model"])
        tokenizer_spec = ckpt["tokenizer"]
    else:  # finetune pretrained weights: a GPT-2 name, backpack-small, or a local Hugging Face directory
        model, pretrained_tokenizer = load_pretrained(cfg.init_from, cfg.dropout, cfg.model_type)
        if not same_tokenizer(pretrained_tokenizer, tokenizer_spec):
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
            with collective(ddp):
                torch.distributed.all_reduce(losses)
        out[split] = (losses[0] / losses[1]).item()
    model.train()
    return out


def forward_backward(model, batches: Batches, ctx, scaler, cfg: TrainConfig, iter_num: int, rank: int,
                     accum: int, ddp: bool, sync: GradientSync | None):
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
        with collective(ddp and micro_step == accum - 1, sync):  # DDP syncs the gradients here
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
    except PeerLost as e:
        print(f"error: rank {rank} lost contact with the other ranks ({e}); one of them died (its error is in "
              f"the log) or hung longer than ddp_timeout={cfg.ddp_timeout}s. Fix that, then rerun with "
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

    raw_model, sync = model, None
    if cfg.compile:
        def first_step(compiled):  # forward and backward, so that both compile here
            X, Y = batches("train", batch_rng(cfg.seed, EVAL_STREAM, 0, 0))
            with ctx:
                compiled(X, Y)[1].backward()
        model = compile_model(model, first_step)
        optimizer.zero_grad(set_to_none=True)
    if ddp:
        with collective(ddp):  # DDP broadcasts rank 0's weights
            model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
        sync = GradientSync()
        model.register_comm_hook(None, sync.hook)

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

        loss_mean, X = forward_backward(model, batches, ctx, scaler, cfg, run.iter_num, rank, accum, ddp, sync)
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
