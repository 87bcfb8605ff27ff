"""
What more than one script needs, in one place: the user-facing error type, device/dtype setup,
tokenizers, dataset metadata and batch loading, and checkpoint save/load.
"""

import contextlib
import os
import pickle
from dataclasses import asdict

import numpy as np
import torch

from model import MODELS, GPT, build_model


class UserError(Exception):
    """Bad input from the user: printed as one line (problem and fix) by the CLI, no traceback."""


# -----------------------------------------------------------------------------
# device and dtype


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device} but CUDA is not available here; use --device=cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available here; use --device=cpu")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device={device}; use cpu, cuda, cuda:N, mps or auto")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bf16 on GPUs that support it, else fp16 on CUDA, and float32 elsewhere: on CPU,
    bf16 matmuls are far slower than fp32 and fp16 autocast is not supported."""
    device_type = device.split(":")[0]
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown --dtype={dtype}; use float32, bfloat16, float16 or auto")
    if device_type == "cpu" and dtype == "float16":
        raise UserError("--dtype=float16 is not supported on CPU; use --dtype=float32 (fastest on CPU)")
    if device_type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bfloat16; use --dtype=float16")
    return dtype


def autocast_context(device: str, dtype: str):
    """Mixed precision where it pays; float32 runs without autocast."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# tokenizers: a checkpoint stores a small spec dict, and the spec rebuilds the tokenizer

GPT2_EOT = 50256


def gpt2_encoding():
    """tiktoken's GPT-2 BPE. Offline, point GPT2_BPE_DIR at a folder holding gpt2.tiktoken
    (e.g. ../shared/data/gpt2-bpe); otherwise tiktoken downloads (and caches) it."""
    import tiktoken
    bpe_dir = os.environ.get("GPT2_BPE_DIR")
    if not bpe_dir:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import load_tiktoken_bpe
    path = os.path.join(bpe_dir, "gpt2.tiktoken")
    if not os.path.exists(path):
        raise UserError(f"GPT2_BPE_DIR={bpe_dir} has no gpt2.tiktoken; unset it to download the BPE")
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's
    return tiktoken.Encoding(name="gpt2", pat_str=pat, mergeable_ranks=load_tiktoken_bpe(path),
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_EOT + 1)


class Tokenizer:
    """encode/decode behind one interface for every tokenizer kind a checkpoint may name."""

    def __init__(self, spec: dict):
        self.spec = spec
        kind = spec.get("kind")
        if kind == "gpt2":
            enc = gpt2_encoding()
            self.encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
            self.decode = lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])
            self.vocab_size, self.eot_id = enc.n_vocab, GPT2_EOT
        elif kind == "char":
            itos = spec["itos"]
            stoi = {ch: i for i, ch in enumerate(itos)}
            self.encode = lambda s: _encode_chars(s, stoi)
            self.decode = lambda ids: "".join(itos[i] for i in ids)
            self.vocab_size, self.eot_id = len(itos), None
        else:
            raise UserError(f"unknown tokenizer kind {kind!r} in checkpoint or meta.pkl; "
                            "re-run the dataset's prepare.py")


def _encode_chars(text: str, stoi: dict) -> list[int]:
    unknown = sorted(set(text) - stoi.keys())
    if unknown:
        raise UserError(f"characters {unknown[:10]} are not in this model's character vocabulary; "
                        "remove them from the prompt")
    return [stoi[c] for c in text]


# -----------------------------------------------------------------------------
# datasets: data/<dataset>/{train,val}.bin (+ meta.pkl where the tokenizer needs one)


def load_meta(data_dir: str) -> dict | None:
    path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:
        raise UserError(f"{path} is unreadable ({e}); re-run the dataset's prepare.py") from None


def tokenizer_spec_from_meta(meta: dict | None) -> dict:
    """meta.pkl names its tokenizer; nanoGPT-style char metas (stoi/itos only) are char-level;
    no meta.pkl at all means GPT-2 BPE, as in nanoGPT."""
    if meta is None:
        return {"kind": "gpt2"}
    if "tokenizer" in meta:
        return meta["tokenizer"]
    return {"kind": "char", "itos": [meta["itos"][i] for i in range(len(meta["itos"]))]}


def bin_dtype(meta: dict | None):
    return np.dtype((meta or {}).get("dtype", "uint16"))


def open_bin(data_dir: str, split: str, meta: dict | None) -> np.memmap:
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        dataset = os.path.basename(os.path.normpath(data_dir))
        raise UserError(f"{path} not found; prepare the data first: python data/{dataset}/prepare.py")
    dtype = bin_dtype(meta)
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise UserError(f"{path} is empty or truncated ({size} bytes for {dtype} tokens); "
                        "re-run the dataset's prepare.py")
    # A fresh memmap per batch: keeping one open leaks memory over long runs (a known numpy issue).
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(data_dir: str, split: str, meta: dict | None, batch_size: int, block_size: int,
              rng: np.random.Generator, device: str):
    """batch_size random windows of block_size+1 tokens: inputs x and next-token targets y, (B, T)."""
    data = open_bin(data_dir, split, meta)
    if len(data) <= block_size:
        raise UserError(f"{split}.bin in {data_dir} has {len(data)} tokens, not more than "
                        f"block_size={block_size}; lower --block_size")
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# checkpoints: self-describing dicts, written atomically, loaded with weights_only=True


def save_checkpoint(ckpt: dict, path: str):
    """Write to a temp file in the same folder, fsync, then rename over the old file: a crash or a
    full disk mid-save leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first or pass the right --out_dir")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable checkpoint ({first_line[:200]}); "
                        "it is corrupt or not from this repo") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or ckpt.get("model_type") not in MODELS:
        raise UserError(f"{path} is not a checkpoint of this repo (no model/model_type entry)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = build_model(ckpt["model_type"], **ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model


def checkpoint_dict(model: GPT, tokenizer_spec: dict, **extra) -> dict:
    """The parts of a checkpoint that describe the model itself; train state goes in extra."""
    model_type = next(name for name, cls in MODELS.items() if type(model) is cls)
    return {"model": model.state_dict(), "model_type": model_type, "model_args": asdict(model.config),
            "tokenizer": tokenizer_spec, **extra}
