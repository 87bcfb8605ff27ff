"""
Export a model trained here (out_dir/ckpt.pt) to a Hugging Face directory, in one command:

    python export_hf.py --out_dir=out-shakespeare-char --export_dir=hf-shakespeare-char

A GPT becomes a transformers GPT2LMHeadModel directory (config.json + model.safetensors):

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("hf-shakespeare-char")  # same logits as here

bias=False models get zero biases (GPT-2 in transformers always has them) and a padded vocabulary
(50304) is kept as it is. A Backpack is written in the layout of the published stanfordnlp/backpack-gpt2,
which this repo loads back with the same logits (`--init_from=hf-dir` in train.py and sample.py, or
Backpack.from_pretrained). config.json also records the tokenizer spec, so a char-level model comes
back with its vocabulary. The export is checked by loading it back and comparing logits.
"""

import os
from dataclasses import dataclass

import torch

from common import UserError, load_checkpoint, model_from_checkpoint
from configurator import run_cli
from hf import LAYOUTS


@dataclass
class ExportConfig:
    out_dir: str = "out"  # reads out_dir/ckpt.pt
    export_dir: str = ""  # writes config.json + model.safetensors here (default: <out_dir>-hf)


@torch.no_grad()
def max_logit_diff(a, b, vocab_size: int, block_size: int) -> float:
    """Largest |logits| difference of two models on a fixed random batch."""
    idx = torch.randint(0, vocab_size, (2, min(block_size, 64)), generator=torch.Generator().manual_seed(0))
    return (a(idx)[0] - b(idx)[0]).abs().max().item()


def main(cfg: ExportConfig):
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    model = model_from_checkpoint(ckpt).eval()
    export_dir = cfg.export_dir or os.path.normpath(cfg.out_dir) + "-hf"
    if os.path.abspath(export_dir) == os.path.abspath(cfg.out_dir):
        raise UserError("--export_dir must differ from --out_dir")
    model.save_pretrained(export_dir, ckpt["tokenizer"])
    reloaded = type(model).from_pretrained(export_dir).eval()
    diff = max_logit_diff(model, reloaded, model.config.vocab_size, model.config.block_size)
    print(f"exported {ckpt['model_type']} from {cfg.out_dir} to {export_dir} ({LAYOUTS[type(model)].name} "
          f"layout); reloaded, max |logits diff| {diff:.2e}")
    if getattr(model.config, "sense_intermediate_scale", 4) != 4:
        print("note: the published Hugging Face Backpack code hard-codes the sense block MLP at 4*n_embd, "
              "so only this repo's loader reads this export")


if __name__ == "__main__":
    run_cli(main, ExportConfig)
