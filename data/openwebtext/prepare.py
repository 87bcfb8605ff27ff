"""
OpenWebText (Gokaslan & Cohen 2019: 8,013,769 web pages linked from Reddit) with GPT-2 BPE, for the
paper-size configs (config/train_backpack_lm.py, train_gpt2.py). Val is 0.05% of the documents with
seed 2357: nanoGPT's split (4,007 documents). Writes data/openwebtext/{train,val}.bin (uint16,
~9.0B and ~4.4M tokens, ~17 GB) and meta.pkl.

    python data/openwebtext/prepare.py                    # from the Hugging Face hub (~55 GB download cache)
    python data/openwebtext/prepare.py path/to/files ...  # local copies: .parquet or .json/.jsonl (field
                                                          # 'text'), .txt (one document per file)

It uses `datasets` only for the hub: load_dataset(name) of current releases (>= 4) no longer runs
loading scripts, the `trust_remote_code` path of nanoGPT's recipe. Offline, set GPT2_BPE_DIR to a
folder holding gpt2.tiktoken (see common.gpt2_encoding).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
from prepare_common import (field, iter_hub_docs, iter_records, list_files, load_hub_dataset,  # noqa: E402
                            parse_args, read_text, run, tokenizer_spec, write_dataset)

HERE = os.path.dirname(os.path.abspath(__file__))
HUB = "Skylion007/openwebtext"
HUB_HINT = (f"if it needs a loading script, download the dataset's parquet files (e.g. `hf download {HUB} "
            "--repo-type=dataset --revision=<a parquet revision> --local-dir=data/openwebtext/hub`) and pass "
            "that folder; offline, pass local .parquet/.json/.jsonl/.txt files")


def iter_local_docs(paths: list[str]):
    for path in paths:
        if path.endswith(".txt"):
            yield read_text(path)
        else:
            yield from (field(r, "text", path) for r in iter_records(path))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, HERE, ("gpt2",), val_fraction=0.0005, hub=HUB)
    if args.input:
        paths = list_files(args.input, ("*.parquet", "*.json", "*.jsonl", "*.txt"), HUB_HINT)
        docs, n_docs, source = (lambda: iter_local_docs(paths)), None, ", ".join(args.input)
    else:
        ds = load_hub_dataset(args.hub, args, HUB_HINT)
        docs, n_docs, source = (lambda: iter_hub_docs(ds, "text")), len(ds), f"hub:{args.hub}"
    return write_dataset(docs, tokenizer_spec(args, docs), args, n_docs=n_docs, source=source)


if __name__ == "__main__":
    run(main)
