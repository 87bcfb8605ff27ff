"""
Don Quixote at character level: the chapters of data/don/prepare.py (see there), with a character
vocab of the book (+ <|endoftext|> and [UNK]) instead of GPT-2 BPE. Writes data/don_char/{train,val}.bin
(uint16) and meta.pkl, for config/train_don_char.py.

    python data/don_char/prepare.py                     # uses data/don_char/input.txt, else downloads it there
    python data/don_char/prepare.py path/to/pg996.txt   # or a local copy
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for don.prepare
from don.prepare import main as prepare_don  # noqa: E402
from prepare_common import run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> dict:
    return prepare_don(argv, out_dir=HERE, tokenizers=("char",), doc=__doc__)


if __name__ == "__main__":
    run(main)
