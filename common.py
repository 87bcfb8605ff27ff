"""
What more than one script needs, in one place: the user-facing error type, device/dtype setup,
tokenizers, dataset metadata and batch loading, and checkpoint save/load.
"""

import contextlib
import os
import pickle
import re
import sys
import warnings
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


def compile_model(model: torch.nn.Module, first_call) -> torch.nn.Module:
    """torch.compile(model), or the model itself with a warning where compiling fails (no C compiler,
    an unsupported platform or Python version). torch.compile only compiles at the first call, so
    first_call(compiled) makes that call here, where a failure can still fall back to eager."""
    try:
        compiled = torch.compile(model)
        first_call(compiled)
        return compiled
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile failed ({type(e).__name__}: {reason}); running without it "
              "(pass --compile=False to skip the attempt)", file=sys.stderr)
        return model


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


EOT_TEXT = "<|endoftext|>"  # how every tokenizer kind prints its end-of-text token


class Tokenizer:
    """encode/decode behind one interface for every tokenizer kind a checkpoint may name:
    {'kind': 'gpt2'}; {'kind': 'char', 'itos': [...], 'eot_id': i, 'unk_id': j} (both ids optional,
    nanoGPT's metas have neither); {'kind': 'bert-chinese', 'vocab': [21128 entries]}, Chinese BERT's
    vocab read one token per character (data/prepare_common.py says why and builds it)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.chars = None  # the CharTable of the character-level kinds
        kind = spec.get("kind")
        if kind == "gpt2":
            enc = gpt2_encoding()
            self.encode = lambda s: enc.encode(s, allowed_special={EOT_TEXT})
            self.decode = lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])
            self.vocab_size, self.eot_id = enc.n_vocab, GPT2_EOT
        elif kind in ("char", "bert-chinese"):
            if kind == "char":
                itos, unk_id, self.eot_id = spec["itos"], spec.get("unk_id"), spec.get("eot_id")
            else:  # [SEP] separates documents; no [CLS] anywhere
                vocab = spec["vocab"]
                itos, unk_id, self.eot_id = [_bert_display(t) for t in vocab], vocab.index("[UNK]"), vocab.index("[SEP]")
            self.chars = CharTable(itos, unk_id)
            self.encode = lambda s: self.chars.encode(s, self.eot_id)
            self.decode = self.chars.decode
            self.vocab_size = len(itos)
        else:
            raise UserError(f"unknown tokenizer kind {kind!r} in checkpoint or meta.pkl; "
                            "re-run the dataset's prepare.py")


class CharTable:
    """One token per character. Encoding is a numpy gather through a code point -> id table, fast
    enough for whole corpora (the prepare recipes use encode_array); decoding joins the ids' strings.
    Entries longer than one character (<|endoftext|>, [UNK], [CLS], ...) never come out of encoding
    text. A character outside the vocab becomes unk_id, or is an error when there is none."""

    def __init__(self, itos: list[str], unk_id: int | None = None):
        self.itos, self.unk_id = itos, unk_id
        self.lut = np.full(0x110000, -1 if unk_id is None else unk_id, dtype=np.int32)  # every code point
        for i in reversed(range(len(itos))):  # reversed: a character listed twice gets its lowest id
            if len(itos[i]) == 1:
                self.lut[ord(itos[i])] = i

    @staticmethod
    def code_points(text: str) -> np.ndarray:
        # surrogatepass: a lone surrogate (from a broken JSON escape) is unknown, not a crash
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)

    def encode_array(self, text: str) -> np.ndarray:
        ids = self.lut[self.code_points(text)]
        if self.unk_id is None and (ids < 0).any():
            unknown = sorted({c for c in text if self.lut[ord(c)] < 0})
            raise UserError(f"characters {unknown[:10]} are not in this model's character vocabulary; "
                            "remove them from the prompt")
        return ids

    def encode(self, text: str, eot_id: int | None = None) -> list[int]:
        """A prompt: <|endoftext|> in it becomes eot_id, as tiktoken allows for GPT-2."""
        parts = text.split(EOT_TEXT) if eot_id is not None else [text]
        ids = []
        for j, part in enumerate(parts):
            ids += ([eot_id] if j else []) + self.encode_array(part).tolist()
        return ids

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids if i < len(self.itos))


def _bert_display(token: str) -> str:
    """How a Chinese BERT vocab entry prints: [UNK] as itself, [SEP] (our end of document) as
    <|endoftext|>, the other specials ([PAD], [CLS], [MASK], [unusedN], <S>, <T>) as nothing, and a
    WordPiece continuation ##x as x (never produced here, but a model may sample one)."""
    if token == "[UNK]":
        return token
    if token == "[SEP]":
        return EOT_TEXT
    if (len(token) > 2 and token[0] == "[" and token[-1] == "]") or token in ("<S>", "<T>"):
        return ""
    return token[2:] if token.startswith("##") and len(token) > 2 else token


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
        recipe = os.path.join("data", os.path.basename(os.path.normpath(data_dir)), "prepare.py")
        recipe = recipe if os.path.exists(recipe) else "data/<dataset>/prepare.py --out_dir=" + data_dir
        raise UserError(f"{path} not found; prepare the data first: python {recipe}")
    dtype = bin_dtype(meta)
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise UserError(f"{path} is empty or truncated ({size} bytes for {dtype} tokens); "
                        "re-run the dataset's prepare.py")
    # A fresh memmap per batch: keeping one open leaks memory over long runs (a known numpy issue).
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(data_dir: str, split: str, meta: dict | None, batch_size: int, block_size: int,
              rng: np.random.Generator, device: str, vocab_size: int | None = None):
    """batch_size random windows of block_size+1 tokens: inputs x and next-token targets y, (B, T).
    With vocab_size, an id outside the vocab is a clear error here rather than an index error deep in
    the embedding (a device-side assert on CUDA); checking each batch costs next to nothing, while
    scanning a whole multi-GB .bin up front would cost a full read at every start."""
    data = open_bin(data_dir, split, meta)
    if len(data) <= block_size:
        raise UserError(f"{split}.bin in {data_dir} has {len(data)} tokens, not more than "
                        f"block_size={block_size}; lower --block_size")
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if vocab_size is not None and max(int(x.max()), int(y.max())) >= vocab_size:
        raise UserError(f"{split}.bin in {data_dir} holds token id {max(int(x.max()), int(y.max()))} but the "
                        f"vocabulary has only {vocab_size} ids; the data does not match meta.pkl or the "
                        "checkpoint: re-run the dataset's prepare.py or pick the matching --dataset")
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
        # the rename itself is durable only once the folder's entry is on disk too
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first or pass the right --out_dir")
    try:
        with warnings.catch_warnings(record=True) as caught:  # shown below, only if the load succeeds
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, the unsafe way out: say what happened instead
        if blocked := re.search(r"GLOBAL (\S+)", str(e)):
            reason = f"unpickling it would call {blocked.group(1)}, which weights_only=True refuses"
        elif "Weights only load failed" in str(e):
            reason = "not a torch.save file"
        else:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a loadable checkpoint ({reason}); it is corrupt or not from this repo") from None
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
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


def load_pretrained(init_from: str, dropout: float = 0.0, model_type: str | None = None) -> tuple[GPT, dict]:
    """--init_from of train.py and sample.py other than scratch/resume: gpt2, gpt2-medium, gpt2-large,
    gpt2-xl, backpack-small (= backpack-gpt2), or a local directory in one of those Hugging Face layouts
    (what export_hf.py and convert_flash_ckpt.py write). Returns (model, tokenizer spec). With
    model_type given, a mismatch is an error raised before any weights are read."""
    import hf  # lazily: hf imports this module
    found_type, tokenizer_spec = hf.identify(init_from)
    if model_type is not None and found_type != model_type:
        raise UserError(f"--init_from={init_from} is a {found_type} model but model_type={model_type}; "
                        f"pass --model_type={found_type}")
    return MODELS[found_type].from_pretrained(init_from, override_args={"dropout": dropout}), tokenizer_spec
