"""
Sample from a trained model. The checkpoint names its model type and tokenizer, so no other flag
is needed:

    python sample.py --out_dir=out-shakespeare-char --device=cpu
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt

Or pretrained weights (GPT-2 BPE), from the hub or a local Hugging Face directory:

    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --init_from=backpack-small --max_new_tokens=100
"""

import os
from dataclasses import dataclass

import torch

from common import (Tokenizer, UserError, autocast_context, load_checkpoint, load_pretrained,
                    model_from_checkpoint, resolve_device, resolve_dtype)
from configurator import run_cli


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' loads out_dir/ckpt.pt; or gpt2*, backpack-small, a HF directory
    out_dir: str = "out"  # where the checkpoint is
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10  # number of samples to draw
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = unchanged, < 1.0 = less random, 0 = greedy
    top_k: int = 200  # keep only the top_k most likely tokens, 0 = all
    seed: int = 1337  # random seed
    device: str = "auto"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "auto"  # float32, bfloat16, float16; auto: bf16/fp16 on CUDA, float32 elsewhere
    compile: bool = False  # torch.compile the model (slow to start, faster per token)


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found; check the path after FILE:")
        try:
            with open(path, encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"prompt file {path} is unreadable ({e}); save it as UTF-8 text") from None
    if not start:
        raise UserError("the prompt is empty; pass --start with at least one character")
    return start


def main(cfg: SampleConfig):
    if cfg.temperature < 0 or cfg.top_k < 0 or cfg.max_new_tokens < 0:
        raise UserError(f"temperature, top_k and max_new_tokens must be >= 0 (got {cfg.temperature}, {cfg.top_k}, "
                        f"{cfg.max_new_tokens}); 0 means greedy, all tokens, nothing new")
    device = resolve_device(cfg.device)
    ctx = autocast_context(device, resolve_dtype(cfg.dtype, device))
    torch.manual_seed(cfg.seed)
    prompt = read_prompt(cfg.start)  # before the checkpoint loads: a typo should fail fast
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        model, tokenizer_spec = model_from_checkpoint(ckpt), ckpt["tokenizer"]
    else:
        model, tokenizer_spec = load_pretrained(cfg.init_from)
    tokenizer = Tokenizer(tokenizer_spec)
    model.eval().to(device)
    if cfg.compile:
        model = torch.compile(model)

    ids = tokenizer.encode(prompt)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    with torch.no_grad(), ctx:
        for _ in range(cfg.num_samples):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run_cli(main, SampleConfig)
