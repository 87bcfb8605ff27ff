"""
What more than one script needs, in one place: the user-facing error type, device/dtype setup,
torch.compile with its fallback, peak FLOP/s, tokenizers, dataset metadata and batch loading, and the
safe torch.load. It imports nothing else of the project (checkpoint.py holds this repo's checkpoints).
"""

import contextlib
import difflib
import functools
import os
import pickle
import re
import sys
import time
import warnings

import numpy as np
import torch



class UserError(Exception):
    """Bad input from the user: printed as one line (problem and fix) by the CLI, no traceback."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), cut to limit
    characters: what a one-line error quotes of a library's multi-line message."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def did_you_mean(value: str, choices) -> str:
    """'did you mean X?' when value is a near miss of one of choices, else the list of choices (a
    far-off guess such as nope -> clue_small misleads more than it helps)."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"choose one of {', '.join(choices)}"


# -----------------------------------------------------------------------------
# device and dtype


DEVICES = ("cpu", "cuda", "mps", "auto")  # cuda also as cuda:N
DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        close = difflib.get_close_matches(kind, DEVICES, n=1) if kind not in DEVICES else []
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown --device={device}; {hint}use cpu, cuda, cuda:N, mps or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device} but CUDA is not available here; use --device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available here; use --device=cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' is bf16 on GPUs that support it, else fp16 on CUDA, and float32 elsewhere: on CPU,
    bf16 matmuls are far slower than fp32 and fp16 autocast is not supported."""
    device_type = device.split(":")[0]
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype={dtype}; {did_you_mean(dtype, DTYPES)}")
    if dtype == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
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


def is_compiler_failure(e: BaseException) -> bool:
    """A failure of torch.compile's own machinery (no working C compiler, Triton missing, a backend
    or Dynamo crash), as opposed to what the model would raise without compiling as well (a bad id,
    out of memory, a shape bug), which must surface rather than be retried in eager mode."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc
    if isinstance(e, dynamo_exc.BackendCompilerFailed):  # InductorError too; look at what the backend hit
        return not isinstance(e.inner_exception, (UserError, torch.OutOfMemoryError, MemoryError))
    return isinstance(e, (dynamo_exc.InternalTorchDynamoError, dynamo_exc.InvalidBackend,
                          inductor_exc.InvalidCxxCompiler, inductor_exc.CppCompileError,
                          inductor_exc.TritonMissing, inductor_exc.GPUTooOldForTriton,
                          inductor_exc.OperatorIssue, inductor_exc.CppWrapperCodegenError))


def compile_model(model: torch.nn.Module, first_call) -> torch.nn.Module:
    """torch.compile(model), or the model itself with a warning where compiling fails (no C compiler,
    an unsupported platform or Python version). torch.compile only compiles at the first call, so
    first_call(compiled) makes that call here, where a compiler failure can still fall back to eager;
    any other error in that call (see is_compiler_failure) propagates."""
    def eager(e: Exception) -> torch.nn.Module:
        print(f"warning: torch.compile failed ({type(e).__name__}: {first_line(e)}); running without it "
              "(pass --compile=False to skip the attempt)", file=sys.stderr)
        return model

    # The Backpack runs its sense network once per distinct token id of a batch. torch.unique has a
    # data-dependent output size; this lets torch.compile keep it inside the graph instead of breaking it.
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        compiled = torch.compile(model)  # only wraps the model: whatever fails here is torch.compile's
    except Exception as e:
        return eager(e)
    try:
        first_call(compiled)
    except Exception as e:
        if not is_compiler_failure(e):
            raise
        return eager(e)
    return compiled


# peak FLOP/s, what MFU is measured against

# Dense (no sparsity) peaks from the vendors' spec sheets: (a substring of torch.cuda.get_device_name,
# bf16/fp16 tensor cores, fp32 matmuls: TF32 tensor cores where the GPU has them, since train.py turns
# TF32 on; None where not known here). The first match wins: "H100 PCIe" before "H100", "L40S" before "L4".
GPU_PEAK_FLOPS = [
    ("H200", 989e12, 494e12), ("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 494e12),
    ("A100", 312e12, 156e12), ("L40S", 362e12, 183e12), ("A10G", 70e12, None), ("L4", 121e12, 60e12),
    ("4090", 165e12, 83e12), ("3090", 71e12, 36e12), ("V100", 125e12, 15.7e12), ("T4", 65e12, 8.1e12),
]


@functools.cache
def measured_matmul_flops(device: str, dtype: str, threads: int) -> float:
    """The best FLOP/s of square matmuls in dtype on device over about half a second: n = 512 and
    1024 on CPU (the smaller one fits in cache and is often the faster), 4096 on a GPU. threads is
    torch.get_num_threads(), part of the cache key because it sets the CPU's peak."""
    dt, best = getattr(torch, dtype), 0.0

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        elif device == "mps":
            torch.mps.synchronize()

    for n in ((512, 1024) if device == "cpu" else (4096,)):
        a, b = torch.randn(n, n, device=device).to(dt), torch.randn(n, n, device=device).to(dt)
        a @ b  # warm-up: thread pools, kernel selection
        sync()
        start, runs = time.perf_counter(), 0
        while runs < 3 or (time.perf_counter() - start < 0.25 and runs < 200):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
            runs += 1
    return best


def peak_flops(device: str, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, a short description) for MFU: the spec-sheet value of a known GPU, else a matmul
    peak measured here once per process (CPU, MPS, unknown GPUs). A nominal CPU peak (cores x FMA
    width x clock) is far above what PyTorch reaches, and a guessed one can put MFU above 100%."""
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, half, fp32 in GPU_PEAK_FLOPS:
            peak = fp32 if dtype == "float32" else half
            if key in name and peak is not None:
                kind = "tf32" if dtype == "float32" and key not in ("V100", "T4") else short
                return peak, f"the {key} spec-sheet {kind} peak of {peak / 1e12:.0f} TFLOP/s (dense)"
    threads = torch.get_num_threads()
    peak = measured_matmul_flops(device, dtype, threads)
    where = f"{threads} thread{'s' * (threads > 1)}" if device == "cpu" else device
    return peak, f"a {short} matmul peak of {peak / 1e9:,.0f} GFLOP/s measured at startup ({where})"


# -----------------------------------------------------------------------------
# tokenizers: a checkpoint stores a small spec dict, and the spec rebuilds the tokenizer

GPT2_EOT = 50256


# GPT-2's pre-tokenizer (byte-level BPE runs inside each piece), also GPT2Tokenizer's for vocab.json + merges.txt
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_encoding():
    """tiktoken's GPT-2 BPE. Offline, point GPT2_BPE_DIR at a folder holding gpt2.tiktoken (OpenAI's
    r50k_base file); otherwise tiktoken downloads (and caches) it."""
    import tiktoken
    bpe_dir = os.environ.get("GPT2_BPE_DIR")
    if not bpe_dir:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import load_tiktoken_bpe
    path = os.path.join(bpe_dir, "gpt2.tiktoken")
    if not os.path.exists(path):
        raise UserError(f"GPT2_BPE_DIR={bpe_dir} has no gpt2.tiktoken; unset it to download the BPE")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(path),
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_EOT + 1)


EOT_TEXT = "<|endoftext|>"  # how every tokenizer kind prints its end-of-text token




class Tokenizer:
    """encode/decode behind one interface for every tokenizer kind a checkpoint may name:
    {'kind': 'gpt2'}; {'kind': 'char', 'itos': [...], 'eot_id': i, 'unk_id': j} (both ids optional,
    nanoGPT's metas have neither); {'kind': 'bert-chinese', 'vocab': [21128 entries]}, Chinese BERT's
    vocab read one token per character (data/prepare_common.py says why and builds it). A Hugging Face
    directory's own tokenizer files (hf.tokenizer_from_files): {'kind': 'bpe', 'ranks': {token bytes as
    latin-1: id}, 'special': {text: id}, 'eot_id': i}, a GPT-2-style byte-level BPE read with tiktoken;
    {'kind': 'hf-tokenizer', 'json': tokenizer.json's text, 'eot_id': i}, read with the `tokenizers` package."""

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
        elif kind == "bpe":
            import tiktoken
            special = spec["special"]
            ranks = {token.encode("latin-1"): i for token, i in spec["ranks"].items()}
            enc = tiktoken.Encoding(name="bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
            ids = set(ranks.values()) | set(special.values())  # a padded vocabulary's extra ids print as nothing
            # added tokens written in the text are those tokens, as in GPT2Tokenizer
            self.encode = lambda s: enc.encode(s, allowed_special=set(special))
            self.decode = lambda seq: enc.decode([i for i in seq if i in ids])
            self.vocab_size, self.eot_id = enc.n_vocab, spec.get("eot_id")
            self.encoding = enc  # hf.save_tokenizer writes it back out as vocab and merges
        elif kind == "hf-tokenizer":
            try:
                from tokenizers import Tokenizer as Backend
            except ImportError:
                raise UserError("this model's tokenizer is a Hugging Face tokenizer.json; pip install tokenizers "
                                "to read it") from None
            backend = Backend.from_str(spec["json"])
            backend.no_truncation()  # a tokenizer.json may ask for them; a document must keep every token
            backend.no_padding()
            self.vocab_size, self.eot_id = backend.get_vocab_size(with_added_tokens=True), spec.get("eot_id")
            # no post-processor ([CLS] ... [SEP]): the text's own tokens only, as the other kinds
            self.encode = lambda s: backend.encode(s, add_special_tokens=False).ids
            self.decode = lambda seq: backend.decode([i for i in seq if i < self.vocab_size], skip_special_tokens=False)
        else:
            raise UserError(f"unknown tokenizer kind {kind!r} in checkpoint or meta.pkl; "
                            "re-run the dataset's prepare.py")


# sha256 of GPT-2's vocabulary in a "bpe" spec's canonical form (see tokenizer_fingerprint): a Hugging Face
# directory holding GPT-2's own vocab.json + merges.txt reads as a "bpe" spec that is GPT-2's tokenizer
GPT2_FINGERPRINT = "fcad87b74700d5f4c5a5a9fe63d074b4f03a0a7ae3b3d667e58c3bde0cfb9865"


def tokenizer_fingerprint(spec: dict) -> str:
    """What a spec's ids stand for, as one string: two specs with the same fingerprint encode and decode
    alike, whatever their kind. A "bpe" spec is its ranks and special tokens (hashed); "gpt2" is GPT-2's
    (no BPE file needed); any other spec is itself."""
    import hashlib
    import json
    if spec.get("kind") == "gpt2":
        return GPT2_FINGERPRINT
    if spec.get("kind") == "bpe":
        canon = {"ranks": spec["ranks"], "special": spec["special"]}
        return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
    return json.dumps(spec, sort_keys=True)


def same_tokenizer(a: dict, b: dict) -> bool:
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


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
            raise UserError(f"characters {self.unknown_chars(text)[:10]} are not in this model's character "
                            "vocabulary; remove them from the prompt")
        return ids

    def unknown(self, text: str, eot_id: int | None = None) -> np.ndarray:
        """(len(text),) bool: True at each character the vocabulary has no entry for (encoding turns
        it into unk_id, or fails); with eot_id, as encode, <|endoftext|> is known. Callers that must not
        hide text behind [UNK] check this first."""
        cp = self.code_points(text)
        ids = self.lut[cp]
        if self.unk_id is None:
            mask = ids < 0
        else:
            own = self.itos[self.unk_id]  # a one-character unk entry is also a character of the vocab
            mask = (ids == self.unk_id) & (cp != (ord(own) if len(own) == 1 else -1))
        if eot_id is not None:
            for m in re.finditer(re.escape(EOT_TEXT), text):
                mask[m.start():m.end()] = False
        return mask

    def unknown_chars(self, text: str, eot_id: int | None = None) -> list[str]:
        """The distinct characters that `unknown` flags, sorted: what an error message names."""
        return sorted({c for c, u in zip(text, self.unknown(text, eot_id)) if u})

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


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dict, list, tuple, str, int, float, bool, None (built by pickle's
    own opcodes) and the few constructors below. Any other global, such as os.system in a pickle
    crafted to run code, is refused before it is called: a downloaded dataset folder cannot run
    anything through its meta.pkl."""

    ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
        ("_codecs", "encode"),  # how protocols 0-2 pickle bytes
        ("numpy", "dtype"),  # numpy scalars (e.g. a vocab_size of type np.int64) and their dtypes
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # protocols 0-2 write Python 2's name
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it would call {module}.{name}")
        return super().find_class(module, name)


def load_meta(data_dir: str) -> dict | None:
    path = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            meta = PlainDataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds more than plain data ({first_line(e)}); refusing to load it: "
                        "re-create it with the dataset's prepare.py") from None
    except Exception as e:
        raise UserError(f"{path} is unreadable ({first_line(e)}); re-run the dataset's prepare.py") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a dataset's meta.pkl (a {type(meta).__name__}, not a dict); "
                        "re-run the dataset's prepare.py")
    return meta


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
# the safe torch.load: weights_only=True, with one-line errors (checkpoints, weight files)


class Inert:
    """What torch_load(..., inert_globals=True) builds for an object of a class it does not admit (an
    omegaconf DictConfig in a Lightning checkpoint, say): nothing of the class is imported or run;
    `qualname` records its name, `args` what it was built from and `state` what it was restored with."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Inert({self.qualname})"


def _inert_globals(path: str) -> list:
    """(stand-in, "module.name") for every global in path's pickle that weights_only does not admit:
    an Inert subclass named after it; a defaultdict (omegaconf keeps one in every node) becomes a plain
    dict, since unpickling fills it item by item and weights_only allows that for dicts only."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return [(_empty_dict if name == "collections.defaultdict" else type(name, (Inert,), {"qualname": name}), name)
            for name in names]


def _empty_dict(*default_factory) -> dict:
    return {}


def torch_load(path: str, what: str, hint: str = "", inert_globals: bool = False, map_location="cpu"):
    """torch.load(weights_only=True): tensors, storages and plain containers only, so no pickled code
    runs. A file that is not there, not a torch.save file or asks for other code is a one-line
    UserError naming `what` (and `hint`, how to fix it). inert_globals=True also reads files that
    pickled objects of other libraries: each such class becomes an Inert record (see Inert), still
    under weights_only. Warnings torch raises are shown only if the load succeeds."""
    hint = f"; {hint}" if hint else ""
    if not os.path.exists(path):
        raise UserError(f"no {what} at {path}{hint}")
    try:
        stand_ins = _inert_globals(path) if inert_globals else []
        with warnings.catch_warnings(record=True) as caught, torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, the unsafe way out: say what happened instead
        if blocked := re.search(r"GLOBAL (\S+)", str(e)):
            reason = f"unpickling it would call {blocked.group(1)}, which weights_only=True refuses"
        elif "Weights only load failed" in str(e) or "Expected input to be a checkpoint" in str(e):
            reason = "not a torch.save file"
        else:
            reason = first_line(e)
        raise UserError(f"{path} is not a loadable {what} ({reason}){hint}") from None
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return obj
