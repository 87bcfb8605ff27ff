"""
What the experiments/ scripts share: putting the repo root on sys.path (so that they run as
`python experiments/<name>.py` with no PYTHONPATH), loading a Backpack with the one-line error a GPT
gets, turning words into token ids, and writing results under <out_dir>/experiments/.
"""

import ast
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from checkpoint import load_model  # noqa: E402
from common import Tokenizer, UserError, resolve_device  # noqa: E402
from model import GPT, Backpack  # noqa: E402

# the tools that also take a model without senses
NO_SENSE_TOOLS = ("lexical_similarity.py (with --use_senses=False), debias.py (its embedding-projection baseline), "
                  "perplexity.py and eval_harness.py")


def describe_source(init_from: str, out_dir: str) -> str:
    return os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else f"--init_from={init_from}"


def load_any(init_from: str, out_dir: str, device: str) -> tuple[GPT, Tokenizer]:
    """A GPT or a Backpack, trained here (init_from='resume': out_dir/ckpt.pt) or pretrained."""
    return load_model(init_from, out_dir, resolve_device(device))


def load_backpack(init_from: str, out_dir: str, device: str, tool: str) -> tuple[Backpack, Tokenizer]:
    """A Backpack; a model without senses is a one-line error naming the tools that accept it."""
    model, tokenizer = load_any(init_from, out_dir, device)
    if not isinstance(model, Backpack):
        raise UserError(f"{describe_source(init_from, out_dir)} is a {type(model).__name__}, which has no sense "
                        f"vectors; {tool} needs a Backpack. For this model use {NO_SENSE_TOOLS}")
    return model, tokenizer


def text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A text's token ids. A character outside a character-level vocabulary is an error, never a
    silent [UNK]."""
    if tokenizer.chars is not None and (bad := tokenizer.chars.unknown_chars(text, tokenizer.eot_id)):
        raise UserError(f"characters {bad} of {text!r} are not in this model's character vocabulary; use other words")
    return tokenizer.encode(text)


def word_ids(tokenizer: Tokenizer, word: str) -> list[int]:
    """A word's token ids: ' ' + word under GPT-2 BPE (how a word appears mid-sentence), the word's own
    characters under the character-level tokenizers (see text_ids for unknown characters)."""
    if not word:
        raise UserError("an empty word was given; pass non-empty words")
    return text_ids(tokenizer, word if tokenizer.chars is not None else " " + word)


def vocab_limit(model: GPT, tokenizer: Tokenizer) -> int:
    """Ids below this are real tokens; the rows past it pad the model's vocab (50304 vs GPT-2's 50257)
    and are never listed as a prediction or a neighbour."""
    return min(model.config.vocab_size, tokenizer.vocab_size)


def token_strings(tokenizer: Tokenizer, ids) -> list[str]:
    """Each id decoded on its own (a GPT-2 piece keeps its leading space)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def read_list(value: str, flag: str, sep: str = ",", strip: bool = True) -> list[str]:
    """A list flag: the path of a UTF-8 file with one item per line, or the items separated by sep.
    Items lose surrounding whitespace unless strip=False (prompts, where it counts); blank items are
    dropped; an empty list is an error naming the flag. The configurator reads values as
    Python literals, so --senses=0,3 arrives as the string '(0, 3)': such a literal is read back item by item."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            items = f.read().splitlines()
    else:
        items = value.split(sep)
        if value[:1] in "([" and value[-1:] in ")]":
            try:
                parsed = ast.literal_eval(value)
                items = [str(x) for x in parsed] if isinstance(parsed, (tuple, list)) else items
            except (ValueError, SyntaxError):
                pass
    items = [s.strip() if strip else s for s in items if s.strip()]
    if not items:
        raise UserError(f"--{flag} is empty; pass a file (one item per line) or items separated by {sep!r}")
    return items


def results_dir(out_dir: str) -> str:
    """<out_dir>/experiments/, created on first use."""
    path = os.path.join(out_dir, "experiments")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, obj) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    return path
