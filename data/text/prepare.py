"""
Any UTF-8 text of your own: a file, several, or folders of them, character level (default), GPT-2
BPE, or the Chinese BERT character vocab. Documents are the files (--doc_sep=file), their lines
(line) or blank-line separated paragraphs (blank), each ended by <|endoftext|>; val is 10% of them.

    python data/text/prepare.py path/to/corpus/ --out_dir=data/mycorpus   # then train with --dataset=mycorpus
    python data/text/prepare.py book.txt --doc_sep=blank --tokenizer=gpt2
    python data/text/prepare.py pg1342.txt --doc_sep=blank --gutenberg      # a Project Gutenberg book

Offline GPT-2 BPE: set GPT2_BPE_DIR to a folder holding gpt2.tiktoken (see common.gpt2_encoding).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
from prepare_common import (UserError, list_files, parse_args, read_text, run, split_documents,  # noqa: E402
                            strip_gutenberg, tokenizer_spec, write_dataset)

HERE = os.path.dirname(os.path.abspath(__file__))
MISSING = "pass a UTF-8 text file or a folder of them: python data/text/prepare.py path/to/text"


def add_args(p):
    p.add_argument("--doc_sep", default="file", choices=("file", "line", "blank"),
                   help="what one document is: a file, a line, or a blank-line separated paragraph")
    p.add_argument("--gutenberg", action="store_true", help="strip Project Gutenberg's header and licence")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, HERE, ("char", "gpt2", "bert-chinese"), val_fraction=0.1, extra=add_args)
    if not args.input:
        raise UserError(MISSING)
    paths = list_files(args.input, ("*",), MISSING)

    def docs():
        for path in paths:
            text = read_text(path)
            yield from split_documents(strip_gutenberg(text) if args.gutenberg else text, args.doc_sep)

    hint = "Pass --doc_sep=blank (paragraphs) or --doc_sep=line, or a folder of several files."
    return write_dataset(docs, tokenizer_spec(args, docs), args, source=", ".join(args.input), few_docs_hint=hint)


if __name__ == "__main__":
    run(main)
