"""
Sliding-window perplexity of a model on a text file or a token .bin:

    python experiments/perplexity.py --out_dir=out-shakespeare-char --input=data/shakespeare_char/val.bin
    python experiments/perplexity.py --out_dir=out-shakespeare-bpe --input=pg996.txt --stride=32
    python experiments/perplexity.py --init_from=gpt2 --input=some.txt --stride=512

A text file (UTF-8; a byte-order mark is dropped, Windows line ends are read as Unix ones) is
tokenized with the model's own tokenizer; a .bin holds token ids as the data/ recipes write them (uint16,
or what a meta.pkl beside it says; --bin_dtype overrides).

Windows of block_size tokens (default: the model's) advance by stride. The first window scores every
token in it, each later one only the tokens no earlier window scored (its last stride ones), and the
last window ends at the last token. So every token after the first is scored exactly once, with at
least block_size - stride + 1 tokens of left context (the first window's tokens: all there are).
stride = block_size (the default) is the plain non-overlapping evaluation; a smaller stride gives more
context at block_size / stride times the cost. perplexity = exp(mean NLL over every scored token).
Padded vocabulary rows are left out of the softmax. A character-level model meeting characters outside
its vocabulary stops with an error naming them; --skip_unknown=True drops them and reports how many.

The last line printed is one JSON object (tokens, nll in nats per token, ppl, ...); it is also written to
<out_dir>/experiments/perplexity_<input>_w<block_size>_s<stride>.json.
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import tools  # first of the repo's modules: it puts the repo root on sys.path
from common import (UserError, autocast_context, bin_dtype, first_line, load_meta, resolve_device, resolve_dtype,
                    same_tokenizer, tokenizer_spec_from_meta)
from configurator import run_cli


@dataclass
class PerplexityConfig:
    init_from: str = "resume"  # 'resume' = out_dir/ckpt.pt; or gpt2*, backpack-small, a local HF directory
    out_dir: str = "out"  # the checkpoint's folder; results go to <out_dir>/experiments/
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    seed: int = 1337  # the experiments' common flag; this evaluation draws no random numbers
    input: str = ""  # a UTF-8 text file, or a .bin of token ids
    bin_dtype: str = "auto"  # a .bin's dtype: uint16, uint32, or auto (meta.pkl beside it, else by vocab size)
    block_size: int = 0  # window length in tokens; 0 = the model's block_size
    stride: int = 0  # step between windows; 0 = block_size (non-overlapping)
    batch_size: int = 8  # windows per forward pass
    skip_unknown: bool = False  # char vocabularies: drop characters outside the vocab and count them
    dtype: str = "auto"  # float32, bfloat16, float16; auto: bf16/fp16 on CUDA, float32 elsewhere


def read_bin(path: str, tokenizer, dtype: str) -> np.ndarray:
    """Token ids of a .bin; a meta.pkl beside it (the data/ recipes write one) must name the model's
    tokenizer, and gives the dtype unless --bin_dtype does."""
    meta = load_meta(os.path.dirname(os.path.abspath(path)))
    if meta is not None and not same_tokenizer(tokenizer_spec_from_meta(meta), tokenizer.spec):
        raise UserError(f"{path} was tokenized differently from this model (see meta.pkl beside it); pass "
                        "a .bin prepared with the model's tokenizer, or the text itself")
    if dtype == "auto":
        dtype = str(bin_dtype(meta)) if meta else ("uint16" if tokenizer.vocab_size <= 2**16 else "uint32")
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"unknown --bin_dtype={dtype}; use uint16, uint32 or auto")
    if os.path.getsize(path) % np.dtype(dtype).itemsize:
        raise UserError(f"{path} has {os.path.getsize(path)} bytes, not a whole number of {dtype} ids; "
                        "check --bin_dtype")
    return np.fromfile(path, dtype=dtype).astype(np.int64)


def read_text(path: str, tokenizer, skip_unknown: bool) -> tuple[np.ndarray, int]:
    """(token ids, number of characters skipped) of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is no text; \r\n becomes \n
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({first_line(e)}); pass a UTF-8 file or a .bin") from None
    skipped = 0
    if tokenizer.chars is not None:  # a character-level vocab: no silent [UNK]
        unknown = tokenizer.chars.unknown(text, tokenizer.eot_id)  # (len(text),) bool
        skipped = int(unknown.sum())
        if skipped and not skip_unknown:
            bad = tokenizer.chars.unknown_chars(text, tokenizer.eot_id)
            raise UserError(f"{path} has {skipped} characters outside this model's vocabulary: {bad[:10]}; "
                            "pass --skip_unknown=True to leave them out")
        if skipped:  # keep the known characters, in order
            kept = tokenizer.chars.code_points(text)[~unknown]
            text = kept.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
    return np.array(tokenizer.encode(text), dtype=np.int64), skipped


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(begin, first) of each window over n_tokens tokens: its inputs are tokens[begin:begin + W], its
    targets the next tokens, and it scores the targets at positions >= first. Ends advance by stride
    from block_size to the last token; every position 1 .. n_tokens - 1 is scored once."""
    last = n_tokens - 1  # the last target position
    W = min(block_size, last)
    out, scored = [], 0  # positions 1 .. scored are done
    while scored < last:
        end = min(scored + (W if not out else stride), last)  # the window's last target
        out.append((end - W, scored + 1))
        scored = end
    return out


@torch.no_grad()
def score(model, tokens: np.ndarray, block_size: int, stride: int, batch_size: int, vocab_size: int,
          ctx=contextlib.nullcontext()) -> tuple[np.ndarray, np.ndarray]:
    """For every token after the first: its negative log-likelihood in nats and how many tokens of
    left context the model saw when predicting it; two (n_tokens - 1,) arrays, index t - 1 for token t."""
    device = model.lm_head.weight.device
    data = torch.from_numpy(tokens)
    plan = windows(len(tokens), block_size, stride)
    W = min(block_size, len(tokens) - 1)
    nll = np.full(len(tokens) - 1, np.nan)
    context = np.zeros(len(tokens) - 1, dtype=np.int64)
    offsets = np.arange(1, W + 1)  # (W,) a target's position minus its window's begin: its context
    from tqdm import tqdm  # lazily, as every optional package
    for i in tqdm(range(0, len(plan), batch_size), desc="perplexity", unit="batch", leave=False):
        chunk = plan[i:i + batch_size]
        x = torch.stack([data[b:b + W] for b, _ in chunk]).to(device)  # (B, W)
        y = torch.stack([data[b + 1:b + W + 1] for b, _ in chunk]).to(device)  # (B, W)
        with ctx:
            logits = model(x)[0]  # (B, W, V)
        # padded vocabulary rows are no tokens: keep them out of the softmax
        logp = F.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # (B, W, v)
        token_nll = -logp.gather(-1, y[..., None])[..., 0].cpu().double().numpy()  # (B, W)
        for row, (begin, first) in enumerate(chunk):
            keep = begin + offsets >= first  # the targets this window scores
            nll[begin + offsets[keep] - 1] = token_nll[row, keep]
            context[begin + offsets[keep] - 1] = offsets[keep]
    return nll, context


def main(cfg: PerplexityConfig) -> dict:
    if not os.path.isfile(cfg.input):
        raise UserError(f"--input={cfg.input!r} is not a file; pass a UTF-8 text file or a token .bin")
    if cfg.block_size < 0 or cfg.stride < 0 or cfg.batch_size < 1:
        raise UserError(f"block_size and stride must be >= 0 (0: the default) and batch_size >= 1 (got "
                        f"{cfg.block_size}, {cfg.stride}, {cfg.batch_size})")
    device = resolve_device(cfg.device)
    ctx = autocast_context(device, resolve_dtype(cfg.dtype, device))
    torch.manual_seed(cfg.seed)
    model, tokenizer = tools.load_any(cfg.init_from, cfg.out_dir, device)
    block_size = cfg.block_size or model.config.block_size
    stride = cfg.stride or block_size
    if not 1 <= block_size <= model.config.block_size:
        raise UserError(f"block_size must be in [1, {model.config.block_size}] for this model (got {block_size}); "
                        "pass --block_size=0 for the model's own")
    if not 1 <= stride <= block_size:
        raise UserError(f"stride must be in [1, block_size={block_size}] (got {stride}); 0 = block_size")
    if cfg.input.endswith(".bin"):
        tokens, skipped = read_bin(cfg.input, tokenizer, cfg.bin_dtype), 0
    else:
        tokens, skipped = read_text(cfg.input, tokenizer, cfg.skip_unknown)
    vocab_size = tools.vocab_limit(model, tokenizer)
    if len(tokens) < 2:
        raise UserError(f"{cfg.input} has {len(tokens)} token(s); perplexity needs at least 2")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise UserError(f"{cfg.input} holds token id {int(tokens.max())} but the model's vocabulary has {vocab_size} "
                        "ids; pass the .bin made with this model's tokenizer, or the right --bin_dtype")
    nll, context = score(model, tokens, block_size, stride, cfg.batch_size, vocab_size, ctx)
    mean_nll = float(nll.mean())
    result = {"model": tools.describe_source(cfg.init_from, cfg.out_dir), "input": cfg.input,
              "tokens": len(nll), "nll": mean_nll, "ppl": math.exp(mean_nll), "bits_per_token": mean_nll / math.log(2),
              "block_size": block_size, "stride": stride, "min_context": int(context.min()),
              "mean_context": float(context.mean()), "skipped_chars": skipped}
    name = os.path.splitext(os.path.basename(cfg.input))[0]
    path = tools.write_json(os.path.join(tools.results_dir(cfg.out_dir),
                                         f"perplexity_{name}_w{block_size}_s{stride}.json"), result)
    print(f"wrote {path}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main, PerplexityConfig)
