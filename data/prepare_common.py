"""
What the data/<name>/prepare.py recipes share: the command line, reading the input, the tokenizer
builders and writing the dataset. A recipe only says where its documents come from:

    args = parse_args(__doc__, argv, HERE, tokenizers=("gpt2", "char"), val_fraction=0.1)
    docs = lambda: (chapter for chapter in ...)  # a fresh iterator of document strings per call
    write_dataset(docs, tokenizer_spec(args, docs), args)

What a dataset folder holds (read by common.get_batch and train.py):
- train.bin, val.bin, and test.bin when --test_fraction > 0: token ids of whole documents, each one
  followed by the tokenizer's end-of-text id, uint16 when every id fits, else uint32;
- meta.pkl: vocab_size, dtype, tokenizer (the spec common.Tokenizer rebuilds, so checkpoints decode
  without this folder), eot_id, and what was written: docs, tokens, unk (per split), source.

The split is by documents: a seeded permutation of the document indices; its first
ceil(test_fraction * n) documents are test, the next ceil(val_fraction * n) val. Without a test split
that is exactly datasets' train_test_split(test_size=val_fraction, seed=seed), so openwebtext gets
nanoGPT's split (4007 val documents).

The Chinese tokenizer ('bert-chinese') is Chinese BERT's 21128-entry vocab read one token per
character, not transformers' BertTokenizer. BertTokenizer lowercases, strips accents, drops every
space and newline, turns English into WordPieces and wraps text in [CLS] ... [SEP]; decoding then
puts spaces between all characters, so decode(encode(doc)) != doc. Here each character is looked up
as it is: Chinese characters get the same ids as BertTokenizer gives them, nothing is lost but the
characters outside the vocab ([UNK], counted and reported). Whitespace, A-Z and the typographic
quotes and dashes of Chinese text are not in the vocab, so they take [unusedN] slots (BERT's README
reserves those for added tokens); ids stay below 21128. [SEP] (id 102) ends every document, the
role GPT-2's <|endoftext|> plays; [CLS] is never used.
"""

import argparse
import fnmatch
import json
import math
import os
import pickle
import re
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from common import CharTable, Tokenizer, UserError, first_line, gpt2_encoding  # noqa: E402

SPLITS = ("train", "val", "test")
CHUNK_TOKENS = 1 << 24  # tokens per step when writing the bins (32-64 MB of RAM)
GPT2_MODEL_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64 (faster), train.py's default too
BERT_CHINESE_HUB = "uer/gpt2-chinese-cluecorpussmall"  # the seed repo's Chinese tokenizer
# Characters of Chinese web text missing from the BERT vocab, put into its [unusedN] slots in this
# order: whitespace, capital letters (BERT lowercases), curly quotes, dashes, ellipsis.
BERT_EXTRA_CHARS = "\n \t\u3000\xa0" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "“”‘’—–…"


# -----------------------------------------------------------------------------
# command line: the same flags in every recipe


def parse_args(doc: str, argv: list[str] | None, out_dir: str, tokenizers: tuple[str, ...],
               val_fraction: float, test_fraction: float = 0.0, min_count: int = 1, hub: str = "",
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """tokenizers[0] is the default; hub names the recipe's Hugging Face dataset (adds --hub,
    --revision, --cache_dir); extra adds the recipe's own flags."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="*", help="local files or folders to use instead of the default source")
    p.add_argument("--out_dir", default=out_dir, help="where train/val/test.bin and meta.pkl go (default: %(default)s)")
    p.add_argument("--tokenizer", default=tokenizers[0], choices=tokenizers)
    if "bert-chinese" in tokenizers:
        p.add_argument("--vocab", default=BERT_CHINESE_HUB,
                       help="BERT vocab.txt path, or a hub model holding one (default: %(default)s)")
    if "char" in tokenizers:
        p.add_argument("--min_count", type=int, default=min_count,
                       help="char tokenizer: characters seen fewer times become [UNK] (default: %(default)s)")
    p.add_argument("--val_fraction", type=float, default=val_fraction, help="share of documents (default: %(default)s)")
    p.add_argument("--test_fraction", type=float, default=test_fraction, help="share of documents (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2357, help="seed of the split (default: nanoGPT's %(default)s)")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizer threads (default: %(default)s)")
    if hub:
        p.add_argument("--hub", default=hub, help="Hugging Face dataset (default: %(default)s)")
        p.add_argument("--revision", default="", help="hub revision (branch, tag or commit)")
        p.add_argument("--cache_dir", default="", help="where `datasets` keeps its download cache")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1 or not 0 <= args.test_fraction < 1:
        p.error("--val_fraction must be in (0, 1) and --test_fraction in [0, 1)")
    return args


def run(main: Callable[[list[str]], object]):
    """A recipe's entry point: bad input ends in one line that names the problem and the fix."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# input: local files (or a download), read document by document


def list_files(paths: list[str], patterns: tuple[str, ...], missing: str) -> list[str]:
    """The files among paths (folders are walked, hidden entries skipped) whose names match one of
    the glob patterns, sorted. missing says where to get the data and where to put it."""
    found = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"{path} not found; {missing}")
        if os.path.isfile(path):
            found.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in sorted(files)
                      if not f.startswith(".") and any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    if not found:
        raise UserError(f"no input files ({', '.join(patterns)}) in {', '.join(paths)}; {missing}")
    return found


def find_or_download(args: argparse.Namespace, name: str, url: str, missing: str) -> str:
    """The input path: the one given, else <out_dir>/<name> when placed there, else downloaded there."""
    if args.input:
        if len(args.input) > 1 or not os.path.isfile(args.input[0]):
            raise UserError(f"{' '.join(args.input)} is not one file; {missing}")
        return args.input[0]
    path = os.path.join(args.out_dir, name)
    if not os.path.exists(path):
        print(f"downloading {url} to {path}")
        os.makedirs(args.out_dir, exist_ok=True)
        try:
            urllib.request.urlretrieve(url, path + ".part")
        except OSError as e:
            raise UserError(f"could not download {url} ({e}); {missing}") from None
        os.replace(path + ".part", path)
    return path


def read_text(path: str) -> str:
    """A UTF-8 file (a byte-order mark dropped, CRLF read as \\n)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it or leave it out") from None


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's '*** START OF ...' and '*** END OF ...' lines."""
    start = re.search(r"^.*\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
    end = re.search(r"^.*\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
    if not start or not end:
        raise UserError("no Project Gutenberg '*** START OF' / '*** END OF' lines found; is this a Gutenberg "
                        "plain-text (UTF-8) book?")
    return text[start.end():end.start()]


def split_documents(text: str, how: str) -> list[str]:
    """'file': the text is one document; 'line': one per line; 'blank': one per blank-line separated
    paragraph; anything else is a regex (re.M) matching the first line of each document, e.g. chapter
    headings (text before the first match is a document too). Documents are stripped, empty ones dropped."""
    if how == "file":
        parts = [text]
    elif how == "line":
        parts = text.split("\n")
    elif how == "blank":
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        starts = [0] + [m.start() for m in re.finditer(how, text, re.M)] + [len(text)]
        parts = [text[a:b] for a, b in zip(starts, starts[1:])]
    return [d for d in (part.strip() for part in parts) if d]


def iter_records(path: str) -> Iterator[dict]:
    """Rows of a JSON-lines file, a JSON array file (loaded whole) or a parquet file (in batches)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # comes with `datasets`
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8-sig") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            yield from json.load(f)
            return
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno} is not JSON ({e.msg}); expected one JSON object per line") from None


def field(record: dict, key: str, path: str) -> str:
    if key not in record:
        raise UserError(f"{path} has a record without '{key}' (keys: {sorted(record)[:8]}); is it the right file?")
    return record[key] or ""


def load_hub_dataset(name: str, args: argparse.Namespace, hint: str = ""):
    """The train split of a Hugging Face dataset, through `datasets` (lazily imported)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("loading from the hub needs `pip install datasets`; or pass local files") from None
    try:
        return load_dataset(name, split="train", revision=args.revision or None, num_proc=args.num_proc,
                            cache_dir=args.cache_dir or None)
    except Exception as e:  # offline, not found, or a dataset that still needs a loading script
        raise UserError(f"could not load {name} from the Hugging Face hub ({first_line(e, 300)}); {hint}") from None


def iter_hub_docs(ds, key: str) -> Iterator[str]:
    for batch in ds.select_columns([key]).iter(batch_size=1000):
        yield from batch[key]


# -----------------------------------------------------------------------------
# tokenizers: specs for common.Tokenizer


def tokenizer_spec(args: argparse.Namespace, docs: Callable[[], Iterable[str]]) -> dict:
    if args.tokenizer == "gpt2":
        return {"kind": "gpt2"}  # exactly this: train.py compares it with pretrained GPT-2's
    if args.tokenizer == "bert-chinese":
        return bert_chinese_spec(args.vocab)
    return char_spec(docs, args.min_count)


def bert_chinese_spec(source: str) -> dict:
    """Chinese BERT's vocab from a vocab.txt path (or a folder holding one) or a hub model, with
    BERT_EXTRA_CHARS in its [unusedN] slots (see the module docstring)."""
    path = os.path.join(source, "vocab.txt") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(source, "vocab.txt")
        except Exception as e:
            raise UserError(f"could not get vocab.txt of {source!r} from the Hugging Face hub ({first_line(e)}); "
                            f"download https://huggingface.co/{BERT_CHINESE_HUB}/resolve/main/vocab.txt and pass "
                            "--vocab=path/to/vocab.txt") from None
    with open(path, encoding="utf-8") as f:
        vocab = f.read().split("\n")  # not splitlines(): it also splits at \x1c, \x85, \u2028 ...
    vocab = [t.rstrip("\r") for t in (vocab[:-1] if vocab[-1] == "" else vocab)]
    if "[UNK]" not in vocab or "[SEP]" not in vocab:
        raise UserError(f"{path} has no [UNK] or [SEP] entry; pass a BERT vocab.txt as --vocab")
    unused = [i for i, t in enumerate(vocab) if re.fullmatch(r"\[unused\d+\]", t)]
    missing = [c for c in BERT_EXTRA_CHARS if c not in set(vocab)]
    for i, c in zip(unused, missing):
        vocab[i] = c
    print(f"bert-chinese: {len(vocab)} entries from {path}; {min(len(unused), len(missing))} [unusedN] "
          "slots hold whitespace, A-Z, quotes and dashes")
    return {"kind": "bert-chinese", "vocab": vocab}


def char_spec(docs: Callable[[], Iterable[str]], min_count: int = 1) -> dict:
    """A character vocab counted over the whole corpus: characters seen at least min_count times,
    sorted (as nanoGPT), then <|endoftext|> and [UNK]."""
    from tqdm import tqdm
    counts = np.zeros(0x110000, dtype=np.int64)  # one slot per Unicode code point
    for doc in tqdm(docs(), desc="counting characters", unit="docs"):
        counts += np.bincount(CharTable.code_points(doc), minlength=len(counts))
    counts[0xD800:0xE000] = 0  # lone surrogates (broken text) never get a slot: they become [UNK]
    keep = np.flatnonzero(counts >= max(min_count, 1))
    rare = int(np.count_nonzero(counts)) - len(keep)
    itos = [chr(c) for c in keep] + ["<|endoftext|>", "[UNK]"]
    print(f"char: {len(keep):,} characters (+ <|endoftext|>, [UNK]); {rare:,} rarer ones "
          f"(seen < {min_count} times) become [UNK]")
    return {"kind": "char", "itos": itos, "eot_id": len(itos) - 2, "unk_id": len(itos) - 1}


def bin_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 holds ids up to 65535: vocabs up to 65536 entries; larger ones (e.g. XLM-R) need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# -----------------------------------------------------------------------------
# writing the dataset


def split_labels(n_docs: int, val_fraction: float, test_fraction: float, seed: int, hint: str = "") -> np.ndarray:
    """0/1/2 = train/val/test per document, drawn as datasets' train_test_split draws (see the module docstring)."""
    n_test, n_val = math.ceil(test_fraction * n_docs), math.ceil(val_fraction * n_docs)
    if n_docs < 2 or n_docs - n_test - n_val < 1:
        raise UserError(f"{n_docs} document(s) are too few to split by documents into train, val and test; "
                        f"lower --val_fraction/--test_fraction or pass more data. {hint}".strip())
    perm = np.random.default_rng(seed).permutation(n_docs)
    labels = np.zeros(n_docs, dtype=np.int8)
    labels[perm[:n_test]] = 2
    labels[perm[n_test:n_test + n_val]] = 1
    return labels


def _batches(docs: Iterable[str], max_docs: int = 1024, max_chars: int = 1 << 22) -> Iterator[list[str]]:
    """Documents in groups that are big enough for the thread pool but small in RAM; empty ones dropped."""
    batch, chars = [], 0
    for doc in docs:
        if doc:
            batch.append(doc)
            chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_dataset(docs: Callable[[], Iterable[str]], spec: dict, args: argparse.Namespace,
                  n_docs: int | None = None, source: str = "", few_docs_hint: str = "") -> dict:
    """Tokenize docs() into <out_dir>/{train,val,test}.bin and meta.pkl; returns the meta dict.
    1. every document and its end-of-text id are appended to a temporary file, in batches;
    2. the split is drawn, val/test documents are copied out into their own memmaps and the train
       documents are compacted in place in the temporary file, which then becomes train.bin.
    So the corpus is never in RAM, and the disk holds it about once (plus val/test)."""
    from tqdm import tqdm
    tok = Tokenizer(spec)
    dtype = bin_dtype_for(tok.vocab_size)
    os.makedirs(args.out_dir, exist_ok=True)
    tmp = os.path.join(args.out_dir, "tokens.tmp")

    # 1. tokenize
    bpe = gpt2_encoding() if spec["kind"] == "gpt2" else None
    eot = np.array([tok.eot_id], dtype=dtype)
    lens, unknown, t0 = [], Counter(), time.time()

    def encode_bpe(group: list[str]) -> list[np.ndarray]:
        return [np.array(bpe.encode_ordinary(doc), dtype=dtype) for doc in group]

    with open(tmp, "wb") as f, tqdm(total=n_docs, desc="tokenizing", unit="docs") as bar, \
            ThreadPoolExecutor(args.num_proc) as pool:
        for batch in _batches(docs()):
            if bpe is not None:  # tiktoken's BPE runs outside the GIL, so threads pay; one task per
                # thread and batch, not per document (a task per short document costs more than its BPE)
                step = -(-len(batch) // args.num_proc)
                ids = [a for group in pool.map(encode_bpe, [batch[i:i + step] for i in range(0, len(batch), step)])
                       for a in group]
            else:  # a table lookup per character: fast enough in one thread
                ids = []
                for doc in batch:
                    cps = CharTable.code_points(doc)
                    ids.append(tok.chars.lut[cps].astype(dtype))
                    bad = cps[ids[-1] == tok.chars.unk_id]
                    if len(bad):
                        unknown.update(dict(zip(*(a.tolist() for a in np.unique(bad, return_counts=True)))))
            f.write(np.concatenate([x for a in ids for x in (a, eot)]).tobytes())
            lens.append(np.array([len(a) + 1 for a in ids], dtype=np.int64))
            bar.update(len(batch))
    lens = np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64)
    seconds, n_tokens = time.time() - t0, int(lens.sum())
    print(f"{len(lens):,} documents, {n_tokens:,} tokens in {seconds:.1f}s "
          f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s, {args.num_proc} threads)")
    n_unk = sum(unknown.values())
    if n_unk:
        common = ", ".join(f"{chr(c)!r} x{n}" for c, n in unknown.most_common(10))
        print(f"{n_unk:,} characters ({100 * n_unk / n_tokens:.2f}% of tokens) are not in the vocab and became "
              f"[UNK]; most common: {common}")

    # 2. split by documents and write the bins through memmaps, chunk by chunk
    try:
        labels = split_labels(len(lens), args.val_fraction, args.test_fraction, args.seed, few_docs_hint)
    except UserError:
        os.remove(tmp)
        raise
    sizes = [int(lens[labels == k].sum()) for k in range(3)]
    paths = [os.path.join(args.out_dir, f"{name}.bin") for name in SPLITS]
    tokens = np.memmap(tmp, dtype=dtype, mode="r+")
    outs = [None] + [np.memmap(paths[k], dtype=dtype, mode="w+", shape=(sizes[k],)) if sizes[k] else None
                     for k in (1, 2)]
    written = [0, 0, 0]
    ends = np.cumsum(lens)
    doc, read = 0, 0
    with tqdm(total=n_tokens, desc="writing", unit="tokens", unit_scale=True) as bar:
        while doc < len(lens):
            last = max(doc + 1, int(np.searchsorted(ends, read + CHUNK_TOKENS, side="right")))
            chunk = np.array(tokens[read:ends[last - 1]])  # a copy: train tokens get written over it
            where = np.repeat(labels[doc:last], lens[doc:last])
            for k in range(3):
                part = chunk[where == k]
                target = tokens if k == 0 else outs[k]  # train compacts in place: it never overtakes read
                if len(part):
                    target[written[k]:written[k] + len(part)] = part
                    written[k] += len(part)
            bar.update(len(chunk))
            doc, read = last, int(ends[last - 1])
    for mm in (tokens, *outs[1:]):
        if mm is not None:
            mm.flush()
    del tokens, outs
    os.truncate(tmp, sizes[0] * dtype.itemsize)
    os.replace(tmp, paths[0])
    if not sizes[2] and os.path.exists(paths[2]):
        os.remove(paths[2])  # a stale test.bin of an earlier run with a test split

    counts = {name: int((labels == k).sum()) for k, name in enumerate(SPLITS) if sizes[k]}
    meta = {"vocab_size": GPT2_MODEL_VOCAB if spec["kind"] == "gpt2" else tok.vocab_size, "dtype": dtype.name,
            "tokenizer": spec, "eot_id": tok.eot_id, "docs": counts,
            "tokens": {name: sizes[k] for k, name in enumerate(SPLITS) if sizes[k]},
            "unk": n_unk, "tokens_per_s": n_tokens / max(seconds, 1e-9), "source": source}
    if spec["kind"] == "char":  # nanoGPT's keys, for tools that read them
        meta["itos"] = dict(enumerate(spec["itos"]))
        meta["stoi"] = {s: i for i, s in enumerate(spec["itos"])}
    with open(os.path.join(args.out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    print("; ".join(f"{name}: {counts[name]:,} documents, {meta['tokens'][name]:,} tokens" for name in counts))
    print(f"wrote {', '.join(f'{n}.bin' for n in counts)} ({dtype.name}) and meta.pkl to {args.out_dir}")
    return meta
