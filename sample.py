r"""
Sample from a trained model. The checkpoint names its model type and tokenizer, so no other flag
is needed:

    python sample.py --out_dir=out-shakespeare-char --device=cpu
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt

Or pretrained weights (GPT-2 BPE), from the hub or a local Hugging Face directory:

    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --init_from=backpack-small --max_new_tokens=100

Decoding strategies (the names of transformers' generate; all run on generate.py and its KV cache):

    --temperature=0                      greedy: always the most likely token
    --temperature=0.8 --top_k=200        sample from the 200 most likely tokens, sharpened (the default)
    --top_k=0 --top_p=0.9                nucleus: the fewest tokens that hold 90% of the probability
    --repetition_penalty=1.3             make tokens already in the text less likely (CTRL's penalty)
    --num_beams=4 --length_penalty=1.0 --num_samples=2   beam search (deterministic): the 2 best beams, best first
    --stop="'\n\n'"                      end a sample once its new text holds this string (kept)
    --stop_at_eot=False                  go on past <|endoftext|> (nanoGPT's behaviour; default: stop)
    --start=FILE:prompts.txt --prompt_per_line=True   one prompt per line, all sampled in one batch
    --seed=7                             the same seed (and flags) gives the same text
    --stream=False                       print each sample when it is done, not token by token
    --use_cache=False                    recompute the context at every step (slower, same logits)

Values are Python literals where they parse as one: --stop="'\n\n'" is two newlines. Each sample is
printed as its prompt plus what was generated, then a line of dashes. A sample ends after max_new_tokens
tokens, or earlier at a stop (the <|endoftext|> or stop string that ended it is printed). Ids past the
tokenizer's vocab (a vocab padded to a multiple of 64) are never sampled.

There is no --compile: a generation step is one token through a cache kept in Python objects, and
torch.compile of it (dynamic shapes) took minutes to compile on a CPU and then ran slower than eager.
"""

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from checkpoint import load_model
from common import UserError, autocast_context, first_line, resolve_device, resolve_dtype
from configurator import run_cli
from generate import generate


@dataclass
class SampleConfig:
    ALIASES: ClassVar[dict] = {"prompt": "start"}  # --prompt=... works as --start=... (transformers' word)
    init_from: str = "resume"  # 'resume' loads out_dir/ckpt.pt; or gpt2*, backpack-small, a HF directory
    out_dir: str = "out"  # where the checkpoint is
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    prompt_per_line: bool = False  # True: each non-blank line of --start (or of its file) is a prompt
    num_samples: int = 10  # samples drawn per prompt
    max_new_tokens: int = 500  # at most this many tokens generated per sample
    temperature: float = 0.8  # 1.0 = unchanged, < 1.0 = less random, 0 = greedy
    top_k: int = 200  # keep only the top_k most likely tokens, 0 = all
    top_p: float = 1.0  # keep the fewest most likely tokens that cover top_p of the probability, 1.0 = all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text, 1.0 = off
    num_beams: int = 1  # > 1: beam search with this many beams (deterministic; ignores temperature, top_k, top_p);
    #                    --num_samples=n <= num_beams then prints the n best beams, best first
    length_penalty: float = 1.0  # beam search scores sum(log p) / length ** length_penalty
    stop_at_eot: bool = True  # end a sample at <|endoftext|>, where the tokenizer has one
    stop: str = ""  # end a sample once its new text contains this string ("" = none)
    stream: bool = True  # print tokens as they arrive (one prompt, no beams)
    use_cache: bool = True  # KV cache; False recomputes the context at every step (same logits, slower)
    seed: int = 1337  # random seed: the same seed and flags give the same text
    device: str = "auto"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "auto"  # float32, bfloat16, float16; auto: bf16/fp16 on CUDA, float32 elsewhere


SEPARATOR = "---------------"


def check_config(cfg: SampleConfig):
    """Every numeric flag up front, before the checkpoint loads."""
    rules = [
        (cfg.num_samples >= 1, f"num_samples must be >= 1 (got {cfg.num_samples}); pass --num_samples=1 or more"),
        (cfg.max_new_tokens >= 0, f"max_new_tokens must be >= 0 (got {cfg.max_new_tokens}); 0 prints the prompt"),
        (cfg.temperature >= 0, f"temperature must be >= 0 (got {cfg.temperature}); 0 is greedy, 1.0 unchanged"),
        (cfg.top_k >= 0, f"top_k must be >= 0 (got {cfg.top_k}); 0 keeps every token"),
        (0 < cfg.top_p <= 1, f"top_p must be in (0, 1] (got {cfg.top_p}); 1.0 keeps every token"),
        (cfg.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {cfg.repetition_penalty}); 1.0 is off"),
        (cfg.num_beams >= 1, f"num_beams must be >= 1 (got {cfg.num_beams}); 1 samples without beam search"),
        (cfg.num_beams == 1 or cfg.num_samples <= cfg.num_beams,
         f"--num_samples={cfg.num_samples} but beam search keeps only --num_beams={cfg.num_beams} hypotheses; pass "
         f"--num_samples={cfg.num_beams} or fewer (the best beams, best first), or raise --num_beams"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def read_prompts(start: str, per_line: bool) -> list[str]:
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found; check the path after FILE:")
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"prompt file {path} is unreadable ({first_line(e)}); save it as UTF-8 text") from None
    if not start:
        raise UserError("the prompt is empty; pass --start with at least one character")
    if not per_line:
        return [start]
    prompts = [line for line in start.splitlines() if line.strip()]
    if not prompts:
        raise UserError("--prompt_per_line=True but --start has no non-blank line; put one prompt on each line")
    return prompts


def encode(tokenizer, text: str, what: str) -> list[int]:
    """text's ids; a character a char vocabulary lacks is an error naming it, never a silent [UNK]."""
    if tokenizer.chars is not None and (bad := tokenizer.chars.unknown_chars(text, tokenizer.eot_id)):
        raise UserError(f"characters {bad[:10]} are not in this model's character vocabulary; "
                        f"remove them from the {what}")
    return tokenizer.encode(text)


def stop_rule(tokenizer, stop: str):
    """(stop(new ids) -> bool for generate, cut(new text) -> the text up to the end of the stop string)."""
    if not stop:
        return None, lambda text: text
    ids = encode(tokenizer, stop, "stop string")
    if tokenizer.decode(ids) != stop:  # e.g. a vocab entry that prints differently from what it stands for
        raise UserError(f"the stop string {stop!r} cannot be produced by this tokenizer; pick another --stop")

    def cut(text: str) -> str:
        end = text.find(stop)
        return text if end < 0 else text[:end + len(stop)]
    return (lambda new: stop in tokenizer.decode(new)), cut


class Streamer:
    """generate's on_token for a batch of one: writes the new text to stdout as soon as it is whole
    characters (a BPE token can hold part of a UTF-8 character: wait for the rest)."""

    def __init__(self, render):
        self.render, self.ids, self.printed = render, [], 0  # render(new ids) -> the text to show

    def __call__(self, tokens: torch.Tensor):
        token = int(tokens[0])
        if token < 0:  # the row already ended
            return
        self.ids.append(token)
        text = self.render(self.ids)
        if not text.endswith("\ufffd"):
            self.write(text)

    def write(self, text: str):
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)


def main(cfg: SampleConfig):
    check_config(cfg)
    device = resolve_device(cfg.device)
    ctx = autocast_context(device, resolve_dtype(cfg.dtype, device))
    prompts = read_prompts(cfg.start, cfg.prompt_per_line)  # before the checkpoint loads: a typo should fail fast
    model, tokenizer = load_model(cfg.init_from, cfg.out_dir, device)
    prompt_ids = [encode(tokenizer, p, "prompt") for p in prompts]
    stop, cut = stop_rule(tokenizer, cfg.stop)

    def render(new_ids: list[int]) -> str:
        return cut(tokenizer.decode(new_ids))

    options = dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                   repetition_penalty=cfg.repetition_penalty, num_beams=cfg.num_beams,
                   length_penalty=cfg.length_penalty, use_cache=cfg.use_cache, stop=stop,
                   eos_id=tokenizer.eot_id if cfg.stop_at_eot else None,
                   vocab_limit=tokenizer.vocab_size)  # the model's vocab may have padding rows: never sample them
    stream = cfg.stream and len(prompts) == 1 and cfg.num_beams == 1
    # sampling draws num_samples times; beam search runs once and returns its num_samples best beams
    rounds, per_round = (1, cfg.num_samples) if cfg.num_beams > 1 else (cfg.num_samples, 1)
    torch.manual_seed(cfg.seed)
    with torch.no_grad(), ctx:
        for _ in range(rounds):
            streamer = None
            if stream:
                streamer = Streamer(render)
                sys.stdout.write(tokenizer.decode(prompt_ids[0]))
            out = generate(model, prompt_ids, cfg.max_new_tokens, on_token=streamer, num_return_sequences=per_round,
                           **options)
            for ids, p in zip(out, [p for p in prompt_ids for _ in range(per_round)]):
                new_text = render(ids[len(p):].tolist())
                if streamer is not None:
                    streamer.write(new_text)
                    print()
                else:
                    print(tokenizer.decode(p) + new_text)
                print(SEPARATOR)


if __name__ == "__main__":
    run_cli(main, SampleConfig)
