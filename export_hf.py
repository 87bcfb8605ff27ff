"""
Export a model trained here (out_dir/ckpt.pt) to a Hugging Face directory, in one command:

    python export_hf.py --out_dir=out-shakespeare-char --export_dir=hf-shakespeare-char

The directory loads in transformers as what it is, with the repo's logits and tokenizer:

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model = AutoModelForCausalLM.from_pretrained("hf-shakespeare-char", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("hf-shakespeare-char", trust_remote_code=True)
    pipeline("text-generation", model="hf-shakespeare-char", trust_remote_code=True)("ROMEO:")
    lm_eval --model hf --model_args pretrained=hf-shakespeare-char,trust_remote_code=True --tasks ...

A GPT is a GPT2LMHeadModel directory (no remote code; bias=False models get zero biases). A Backpack
declares model_type backpack-gpt2 and ships its modeling code (hf_remote/): transformers runs it with
trust_remote_code=True and refuses without it. Tokenizer files encode and decode as this repo: GPT-2
BPE, or a character vocabulary one token per character. A padded vocabulary (50304) is cut to the
tokenizer's ids. This repo loads the export back without remote code (`--init_from=hf-dir` in
train.py and sample.py), and the export is checked that way: same logits on the tokenizer's ids.
"""

import os
from dataclasses import dataclass

import torch

import hf
from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError
from configurator import run_cli


@dataclass
class ExportConfig:
    out_dir: str = "out"  # reads out_dir/ckpt.pt
    export_dir: str = ""  # writes the Hugging Face directory here (default: <out_dir>-hf)


@torch.no_grad()
def max_logit_diff(a, b, vocab_size: int, block_size: int) -> float:
    """Largest |logits| difference of two models over the first vocab_size ids, on a fixed random batch."""
    idx = torch.randint(0, vocab_size, (2, min(block_size, 64)), generator=torch.Generator().manual_seed(0))
    return (a(idx)[0][..., :vocab_size] - b(idx)[0][..., :vocab_size]).abs().max().item()


def main(cfg: ExportConfig):
    export_dir = cfg.export_dir or os.path.normpath(cfg.out_dir) + "-hf"
    if os.path.abspath(export_dir) == os.path.abspath(cfg.out_dir):
        raise UserError(f"--export_dir must differ from --out_dir ({cfg.out_dir}): the export would mix with "
                        "the run's files; pass another --export_dir or leave it empty for <out_dir>-hf")
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    model = model_from_checkpoint(ckpt).eval()
    written = hf.save_pretrained(model, export_dir, ckpt["tokenizer"])
    reloaded = hf.load_pretrained(type(model), export_dir).eval()
    diff = max_logit_diff(model, reloaded, written["vocab_size"], model.config.block_size)
    layout = hf.LAYOUTS[type(model)]
    vocab = (f"; vocab cut from {written['padded_vocab_size']} to the tokenizer's {written['vocab_size']}"
             if written["vocab_size"] < written["padded_vocab_size"] else "")
    print(f"exported {ckpt['model_type']} from {cfg.out_dir} to {export_dir} ({layout.name} layout{vocab}); "
          f"reloaded, max |logits diff| {diff:.2e}")
    if layout.auto_map:
        print("load it in transformers with trust_remote_code=True (the export ships its modeling code)")
    if not written["tokenizer_files"]:
        print(f"note: no tokenizer files: the model has {written['padded_vocab_size']} ids, fewer than its "
              "tokenizer emits")
    if hasattr(model.config, "departures") and model.config.departures():
        print(f"note: this Backpack departs from the paper ({model.config.departures()}); only this export's own "
              "modeling code computes it, the published stanfordnlp/backpack-gpt2 code would not")
    if getattr(model.config, "sense_intermediate_scale", 4) != 4:
        print("note: the published stanfordnlp/backpack-gpt2 code hard-codes the sense block MLP at 4*n_embd; "
              "this export's own modeling code (and this repo) read it")


if __name__ == "__main__":
    run_cli(main, ExportConfig)
