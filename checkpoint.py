"""
This repo's checkpoints and every way a script gets a model: a checkpoint is a self-describing dict
(model_type, model_args, tokenizer spec, weights; train.py adds its optimizer, iter_num, best_val_loss
and config), written atomically and read with torch.load(weights_only=True). load_model is what
sample.py and the experiments call: a checkpoint trained here (--init_from=resume) or pretrained weights
in a Hugging Face layout (hf.py).
"""

import os
from dataclasses import asdict

import torch

import hf
from common import Tokenizer, UserError, torch_load
from model import MODELS, GPT, build_model


def save_checkpoint(ckpt: dict, path: str):
    """Write to a temp file in the same folder, fsync, then rename over the old file: a crash or a
    full disk mid-save leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # the rename itself is durable only once the folder's entry is on disk too
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first or pass the right --out_dir")
    ckpt = torch_load(path, "checkpoint", "it is corrupt or not from this repo", map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or ckpt.get("model_type") not in MODELS:
        raise UserError(f"{path} is not a checkpoint of this repo (no model/model_type entry)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = build_model(ckpt["model_type"], **ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model


def checkpoint_dict(model: GPT, tokenizer_spec: dict, **extra) -> dict:
    """The parts of a checkpoint that describe the model itself; train state goes in extra."""
    model_type = next(name for name, cls in MODELS.items() if type(model) is cls)
    return {"model": model.state_dict(), "model_type": model_type, "model_args": asdict(model.config),
            "tokenizer": tokenizer_spec, **extra}


def load_pretrained(init_from: str, dropout: float = 0.0, model_type: str | None = None) -> tuple[GPT, dict]:
    """--init_from of train.py and sample.py other than scratch/resume: gpt2, gpt2-medium, gpt2-large,
    gpt2-xl, backpack-small (= backpack-gpt2), or a local directory in one of those Hugging Face layouts
    (what export_hf.py and convert_flash_ckpt.py write). Returns (model, tokenizer spec). With
    model_type given, a mismatch is an error raised before any weights are read."""
    found_type, tokenizer_spec = hf.identify(init_from)
    if model_type is not None and found_type != model_type:
        raise UserError(f"--init_from={init_from} is a {found_type} model but model_type={model_type}; "
                        f"pass --model_type={found_type}")
    return hf.load_pretrained(MODELS[found_type], init_from, {"dropout": dropout}), tokenizer_spec


def load_model(init_from: str = "resume", out_dir: str = "out", device: str = "cpu") -> tuple[GPT, "Tokenizer"]:
    """What sample.py and every experiment load: init_from='resume' reads out_dir/ckpt.pt (a model
    trained here); anything else is pretrained weights (gpt2*, backpack-small or a local Hugging Face
    directory, see load_pretrained). Returns (model in eval mode on device, its tokenizer)."""
    if init_from == "resume":
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        model, tokenizer_spec = model_from_checkpoint(ckpt), ckpt["tokenizer"]
    else:
        model, tokenizer_spec = load_pretrained(init_from)
    return model.eval().to(device), Tokenizer(tokenizer_spec)
