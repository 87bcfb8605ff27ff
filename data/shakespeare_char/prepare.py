"""
Tiny Shakespeare, character level: writes train.bin / val.bin (uint16 ids) and meta.pkl (the vocab).

    python data/shakespeare_char/prepare.py                  # downloads input.txt if it is absent
    python data/shakespeare_char/prepare.py path/to/input.txt  # or use a local copy
"""

import os
import pickle
import sys
import urllib.request

import numpy as np

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def read_input(argv: list[str]) -> str:
    path = argv[0] if argv else os.path.join(HERE, "input.txt")
    if argv and not os.path.exists(path):
        sys.exit(f"error: {path} not found; pass the path of tinyshakespeare's input.txt, or no argument to download it")
    if not os.path.exists(path):
        print(f"downloading {URL}")
        urllib.request.urlretrieve(URL, path)
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv: list[str]):
    text = read_input(argv)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    print(f"{len(text):,} characters, vocab of {len(chars)}")
    n = len(text)
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    train_ids, val_ids = ids[: int(n * 0.9)], ids[int(n * 0.9):]  # first 90% / last 10%
    print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")
    train_ids.tofile(os.path.join(HERE, "train.bin"))
    val_ids.tofile(os.path.join(HERE, "val.bin"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi, "dtype": "uint16",
            "tokenizer": {"kind": "char", "itos": chars}}
    with open(os.path.join(HERE, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1:])
