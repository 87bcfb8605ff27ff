"""
TigerBot's Chinese pretraining corpus (TigerResearch/pretrain_zh, field 'content'; encyclopedia,
books, web) at character level, for config/train_tigerbot.py and train_tigerbot_gpt2.py. Tokenizers
as data/clue_small: Chinese BERT's vocab one token per character (default) or --tokenizer=char. The
trailing </s> markers are stripped; each entry is one document, ended by the end-of-text token.
Splits by documents, seed 2357: test 0.1% (kept, as test.bin), val 0.05%. Writes
data/tigerbot/{train,val,test}.bin (uint16) and meta.pkl.

    python data/tigerbot/prepare.py                       # *.json/*.jsonl/*.parquet placed in data/tigerbot/, else the hub
    python data/tigerbot/prepare.py path/to/files ...     # JSON arrays, JSON lines or parquet with 'content'
    python data/tigerbot/prepare.py --vocab=path/to/vocab.txt   # offline BERT vocab
"""

import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
from prepare_common import (field, iter_hub_docs, iter_records, list_files, load_hub_dataset,  # noqa: E402
                            parse_args, run, tokenizer_spec, write_dataset)

HERE = os.path.dirname(os.path.abspath(__file__))
HUB = "TigerResearch/pretrain_zh"
PATTERNS = ("*.json", "*.jsonl", "*.parquet")
MISSING = (f"without internet, download {HUB} (https://huggingface.co/datasets/{HUB}) and put its "
           "files in data/tigerbot/, or pass JSON/JSON-lines/parquet files with a 'content' field")


def strip_marker(text: str) -> str:
    return re.sub(r"(\s*</s>)+\s*$", "", text).strip()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, HERE, ("bert-chinese", "char"), val_fraction=0.0005, test_fraction=0.001,
                      min_count=2, hub=HUB)
    placed = [p for pat in PATTERNS for p in glob.glob(os.path.join(HERE, pat))]
    if args.input or placed:
        paths = list_files(args.input or sorted(placed), PATTERNS, MISSING)
        contents, n_docs, source = (lambda: (field(r, "content", p) for p in paths for r in iter_records(p))), None, \
            ", ".join(args.input or [HERE])
    else:
        ds = load_hub_dataset(args.hub, args, MISSING)
        contents, n_docs, source = (lambda: iter_hub_docs(ds, "content")), len(ds), f"hub:{args.hub}"
    docs = lambda: (strip_marker(c) for c in contents())  # noqa: E731
    return write_dataset(docs, tokenizer_spec(args, docs), args, n_docs=n_docs, source=source)


if __name__ == "__main__":
    run(main)
