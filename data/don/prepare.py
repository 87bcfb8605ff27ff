"""
Don Quixote (Cervantes, tr. John Ormsby; Project Gutenberg #996) with GPT-2 BPE, for finetuning GPT-2
as in the DI725 course (config/finetune_don.py). The Gutenberg header and licence are stripped; each
chapter (and the front matter before chapter I) is one document, ended by <|endoftext|>; val is 10%
of the chapters. Writes data/don/{train,val}.bin (uint16) and meta.pkl.

    python data/don/prepare.py                      # uses data/don/input.txt, else downloads it there
    python data/don/prepare.py path/to/pg996.txt    # or a local copy
    python data/don/prepare.py --tokenizer=char     # character level (data/don_char/prepare.py does this)

Offline, set GPT2_BPE_DIR to a folder holding gpt2.tiktoken (see common.gpt2_encoding).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
from prepare_common import (find_or_download, parse_args, read_text, run, split_documents,  # noqa: E402
                            strip_gutenberg, tokenizer_spec, write_dataset)

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://www.gutenberg.org/cache/epub/996/pg996.txt"
CHAPTER = r"^CHAPTER [IVXLC]+\.$"  # the body's headings; the table of contents lists them without the period


def main(argv: list[str] | None = None, out_dir: str = HERE, tokenizers: tuple[str, ...] = ("gpt2", "char"),
         doc: str = __doc__) -> dict:
    """out_dir, tokenizers and doc (the --help text) let data/don_char/prepare.py reuse this recipe."""
    args = parse_args(doc, argv, out_dir, tokenizers, val_fraction=0.1)
    missing = f"download {URL} and put it at {os.path.join(args.out_dir, 'input.txt')}, or pass its path"
    path = find_or_download(args, "input.txt", URL, missing)
    chapters = split_documents(strip_gutenberg(read_text(path)), CHAPTER)
    docs = lambda: iter(chapters)  # noqa: E731
    return write_dataset(docs, tokenizer_spec(args, docs), args, n_docs=len(chapters), source=path)


if __name__ == "__main__":
    run(main)
