"""
Tiny Shakespeare with GPT-2 BPE (tiktoken): writes train.bin / val.bin (uint16 ids), no meta.pkl
(no meta.pkl means GPT-2 BPE to train.py and sample.py).

    python data/shakespeare/prepare.py                  # downloads input.txt if it is absent
    python data/shakespeare/prepare.py path/to/input.txt  # or use a local copy

Offline, set GPT2_BPE_DIR to a folder holding gpt2.tiktoken (see common.gpt2_encoding).
"""

import os
import sys
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import gpt2_encoding  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]):
    path = argv[0] if argv else os.path.join(HERE, "input.txt")
    if argv and not os.path.exists(path):
        sys.exit(f"error: {path} not found; pass the path of tinyshakespeare's input.txt, or no argument to download it")
    if not os.path.exists(path):
        print(f"downloading {URL}")
        urllib.request.urlretrieve(URL, path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    n = len(text)
    enc = gpt2_encoding()
    train_ids = np.array(enc.encode_ordinary(text[: int(n * 0.9)]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(text[int(n * 0.9):]), dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")
    train_ids.tofile(os.path.join(HERE, "train.bin"))
    val_ids.tofile(os.path.join(HERE, "val.bin"))


if __name__ == "__main__":
    main(sys.argv[1:])
