"""
Tiny Shakespeare with GPT-2 BPE (tiktoken), exactly as nanoGPT prepares it: the first 90% of the
characters are train and the last 10% val, cut in one piece (not split by documents, and no
end-of-text token). Writes train.bin / val.bin (uint16 ids) and a meta.pkl that names the GPT-2
tokenizer (the same as having none, for train.py and sample.py). See readme.md.

    python data/shakespeare/prepare.py                  # downloads input.txt if it is absent
    python data/shakespeare/prepare.py path/to/input.txt  # or use a local copy
    python data/shakespeare/prepare.py --out_dir=/tmp/x    # write the dataset elsewhere

Offline, set GPT2_BPE_DIR to a folder holding gpt2.tiktoken (see common.gpt2_encoding).
"""

import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/
from prepare_common import GPT2_MODEL_VOCAB, gpt2_encoding, run  # noqa: E402
from shakespeare_char.prepare import parse_args, read_input  # noqa: E402  (same text, same flags)

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]):
    args = parse_args(argv, default_out_dir=HERE)
    text = read_input(args.input, HERE)
    enc = gpt2_encoding()
    os.makedirs(args.out_dir, exist_ok=True)
    n = len(text)
    train_ids = np.array(enc.encode_ordinary(text[: int(n * 0.9)]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(text[int(n * 0.9):]), dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")
    train_ids.tofile(os.path.join(args.out_dir, "train.bin"))
    val_ids.tofile(os.path.join(args.out_dir, "val.bin"))
    meta = {"vocab_size": GPT2_MODEL_VOCAB, "dtype": "uint16", "tokenizer": {"kind": "gpt2"}, "eot_id": enc.eot_token}
    with open(os.path.join(args.out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)


if __name__ == "__main__":
    run(main)
