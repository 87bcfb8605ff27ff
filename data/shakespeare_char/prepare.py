"""
Tiny Shakespeare, character level, exactly as nanoGPT prepares it: the text's 65 distinct characters
(sorted) are the vocab, the first 90% of the text is train and the last 10% val, cut in one piece
(not split by documents, and no end-of-text token). Writes train.bin / val.bin (uint16 ids) and
meta.pkl (the vocab). See readme.md.

    python data/shakespeare_char/prepare.py                  # downloads input.txt if it is absent
    python data/shakespeare_char/prepare.py path/to/input.txt  # or use a local copy (offline)
    python data/shakespeare_char/prepare.py --out_dir=/tmp/x    # write the dataset elsewhere
"""

import argparse
import os
import pickle
import sys
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
from prepare_common import UserError, run  # noqa: E402  (bad input: one line, exit status 2)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str], default_out_dir: str = HERE) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="a local copy of input.txt (default: download to this folder)")
    p.add_argument("--out_dir", default=default_out_dir, help="where the dataset files go")
    return p.parse_args(argv)


def read_input(path: str | None, folder: str = HERE) -> str:
    """The text at path; without one, folder/input.txt, downloaded when absent."""
    if path and not os.path.exists(path):
        raise UserError(f"{path} not found; pass the path of tinyshakespeare's input.txt, or no argument to download it")
    path = path or os.path.join(folder, "input.txt")
    if not os.path.exists(path):
        print(f"downloading {URL}")
        try:
            urllib.request.urlretrieve(URL, path + ".part")
        except OSError as e:
            raise UserError(f"could not download {URL} ({e}); offline, pass a local copy: "
                            f"python {os.path.relpath(__file__)} path/to/input.txt") from None
        os.replace(path + ".part", path)  # a broken download never looks like a finished one
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); pass a UTF-8 text file") from None
    if not text:  # checked before anything is written: an empty dataset would replace a good one
        raise UserError(f"{path} is empty; pass tinyshakespeare's input.txt (or delete {path} to download it)")
    return text


def main(argv: list[str]):
    args = parse_args(argv)
    text = read_input(args.input)
    os.makedirs(args.out_dir, exist_ok=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    print(f"{len(text):,} characters, vocab of {len(chars)}")
    n = len(text)
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    train_ids, val_ids = ids[: int(n * 0.9)], ids[int(n * 0.9):]  # first 90% / last 10%
    print(f"train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens")
    train_ids.tofile(os.path.join(args.out_dir, "train.bin"))
    val_ids.tofile(os.path.join(args.out_dir, "val.bin"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi, "dtype": "uint16",
            "tokenizer": {"kind": "char", "itos": chars}}
    with open(os.path.join(args.out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)


if __name__ == "__main__":
    run(main)
