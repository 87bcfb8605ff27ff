"""
Tiny Shakespeare with GPT-2 BPE (tiktoken): writes train.bin / val.bin (uint16 ids), no meta.pkl
(no meta.pkl means GPT-2 BPE to train.py and sample.py).

    python data/shakespeare/prepare.py                  # downloads input.txt if it is absent
    python data/shakespeare/prepare.py path/to/input.txt  # or use a local copy
    python data/shakespeare/prepare.py --out_dir=/tmp/x    # write the dataset elsewhere

Offline, set GPT2_BPE_DIR to a folder holding gpt2.tiktoken (see common.gpt2_encoding).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import UserError, gpt2_encoding  # noqa: E402
from data.shakespeare_char.prepare import parse_args, read_input  # noqa: E402  (same text, same flags)

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]):
    args = parse_args(argv, default_out_dir=HERE)
    text = read_input(args.input, HERE)
    try:
        enc = gpt2_encoding()
    except UserError as e:
        sys.exit(f"error: {e}")
    os.makedirs(args.out_dir, exist_ok=True)
    n = len(text)
    train_ids = np.array(enc.encode_ordinary(text[: int(n * 0.9)]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(text[int(n * 0.9):]), dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")
    train_ids.tofile(os.path.join(args.out_dir, "train.bin"))
    val_ids.tofile(os.path.join(args.out_dir, "val.bin"))


if __name__ == "__main__":
    main(sys.argv[1:])
