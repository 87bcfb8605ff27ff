"""
Convert an official backpacks-flash-attn training checkpoint (a PyTorch Lightning .ckpt from
downloads.cs.stanford.edu/nlp/data/backpacks-acl2023/) into a Hugging Face directory that this repo
loads with --init_from (train.py, sample.py) and transformers loads with its Auto classes:

    python convert_flash_ckpt.py --ckpt=backpack-small-flash-fp16.ckpt --export_dir=hf-backpack-small
    python sample.py --init_from=hf-backpack-small --start="The capital of France is"
    python train.py config/finetune_shakespeare_backpack.py --init_from=hf-backpack-small

Backpacks (micro 6/6/384, mini 8/8/640, small 12/12/768, the sense-count ablations k = 1/4/16/64 and
the "shrink" model, whose sense MLPs are d wide) are written in the backpack-gpt2 layout; the
Transformer baselines (gpt2-*-flash-fp16.ckpt) as a GPT2LMHeadModel directory. Sizes are read off the
tensors. n_head is in no shape: --n_head wins when given, else the checkpoint's hyper-parameters, else
the official model of that width.

The file is read without running any of its pickled code and with nothing beyond requirements.txt:
torch's weights-only unpickler admits tensors and plain containers, and every other object Lightning
pickled (the omegaconf DictConfig of hyper_parameters, say) becomes an inert record that is searched
as data (common.torch_load). Only the `model.` entries are weights; metric counters, optimizer and loop
states are left out. The copies of the embeddings the official modules share (the LM head, the sense
network's and the Backpack's own `transformer.embeddings`) are checked equal and kept once. The 50264
rows of the official vocabulary are cut to GPT-2's 50257 ids (hf.py says why). The key names follow
docs/architecture.md section 5; every tensor's shape is checked, and a missing or unexpected key stops
the conversion with its name.
"""

import re
from dataclasses import dataclass

import torch

import hf
from common import Inert, UserError, torch_load
from configurator import run_cli
from model import GPT, build_model

HEADS_BY_WIDTH = {384: 6, 640: 8, 768: 12}  # micro, mini, small (docs/architecture.md 2.9)
PLAIN_DEPTH = 32  # how deep pickled records are unpacked into plain data (cuts reference cycles)


@dataclass
class ConvertConfig:
    ckpt: str = ""  # the Lightning .ckpt (or a plain state dict) to convert
    export_dir: str = ""  # write the Hugging Face directory here
    n_head: int = 0  # attention heads; 0 = from the checkpoint's hyper-parameters, else the official sizes
    scale_attn_by_inverse_layer_idx: bool | None = None  # None = the hyper-parameters' value, else True (all official models)


def read_checkpoint(path: str) -> tuple[dict, object]:
    """(model state dict without Lightning's `model.` prefix, hyper-parameters as plain data or None)."""
    ckpt = torch_load(path, "checkpoint", inert_globals=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise UserError(f"{path} holds no state dict of tensors (under 'state_dict' or at the top level)")
    # The LightningModule keeps the network in self.model; its metrics (train_metrics.num-tokens.count,
    # ...) sit beside it in the same state dict and are not weights.
    if any(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return tensors, plain(ckpt.get("hyper_parameters")) if isinstance(ckpt, dict) else None


def plain(obj, depth: int = 0):
    """Pickled records as plain data: an omegaconf container is its `_content`, a node its `_val`, any
    other record its state; dicts and lists are unpacked in turn."""
    if depth > PLAIN_DEPTH:
        return None
    if isinstance(obj, Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        for field in ("_content", "_val"):  # omegaconf's DictConfig/ListConfig and ValueNode
            if field in state:
                return plain(state[field], depth + 1)
        return {k: plain(v, depth + 1) for k, v in state.items() if k != "_parent"}
    if isinstance(obj, dict):
        return {k: plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    return obj


def find_key(obj: object, key: str):
    """The first value of `key` anywhere in nested dicts and lists (hydra nests the model config)."""
    if isinstance(obj, dict):
        if obj.get(key) is not None:
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        return next((found for v in obj if (found := find_key(v, key)) is not None), None)
    return None


def model_args(state: dict, trunk: str, hparams: object, cfg: ConvertConfig, source: str) -> tuple[str, dict]:
    """(model_type, config fields) read off the tensor shapes."""
    def shape(key):
        if key not in state:
            raise UserError(f"{source} has no {key}; is it a backpacks-flash-attn checkpoint?")
        return state[key].shape

    vocab_size, d = shape(trunk + "embeddings.word_embeddings.weight")
    layers = {int(m[1]) for k in state if (m := re.match(re.escape(trunk) + r"layers\.(\d+)\.", k))}
    if not layers:
        raise UserError(f"{source} has no {trunk}layers.* tensors; is it a backpacks-flash-attn checkpoint?")
    n_head = int(cfg.n_head or find_key(hparams, "n_head") or HEADS_BY_WIDTH.get(d, 0))
    if not n_head or d % n_head:
        raise UserError(f"{source}: cannot tell n_head for width {d} (got {n_head or 'none'}); pass --n_head")
    scale_attn = cfg.scale_attn_by_inverse_layer_idx
    if scale_attn is None:
        scale_attn = find_key(hparams, "scale_attn_by_inverse_layer_idx") is not False
    args = dict(vocab_size=vocab_size, n_embd=d, n_layer=len(layers), n_head=n_head,
                block_size=shape(trunk + "embeddings.position_embeddings.weight")[0], bias=True, dropout=0.0,
                scale_attn_by_inverse_layer_idx=scale_attn)
    if trunk != hf.BACKPACK_TRUNK:
        return "gpt", args
    kd, hidden = shape(hf.SENSE + "final_mlp.fc2.weight")[0], shape(hf.SENSE + "final_mlp.fc1.weight")[0]
    if kd % d or hidden % d or d % (kd // d):
        raise UserError(f"{source}: the final sense MLP is {d} -> {hidden} -> {kd}, not d -> I -> k*d with d={d} "
                        "and k dividing d")
    return "backpack", dict(args, n_senses=kd // d, sense_intermediate_scale=hidden // d)


def convert(state: dict, hparams: object, cfg: ConvertConfig, source: str) -> tuple[str, GPT]:
    """The flash state dict as one of our models."""
    trunk = hf.BACKPACK_TRUNK if any(k.startswith(hf.BACKPACK_TRUNK) for k in state) else "transformer."
    model_type, args = model_args(state, trunk, hparams, cfg, source)
    model = build_model(model_type, **args)
    prefixes = hf.flash_names(args["n_layer"], trunk)
    names = {key: hf.rename(key, prefixes) for key in model.state_dict() if key != "lm_head.weight"}
    hf.load_mapped(model, {k: v.float() for k, v in state.items()}, names, hf.flash_tied_copies(trunk), source)
    return model_type, model


def main(cfg: ConvertConfig):
    if not cfg.ckpt or not cfg.export_dir:
        raise UserError("pass --ckpt=path/to/file.ckpt and --export_dir=where/to/write")
    state, hparams = read_checkpoint(cfg.ckpt)
    model_type, model = convert(state, hparams, cfg, cfg.ckpt)
    written = hf.save_pretrained(model, cfg.export_dir, {"kind": "gpt2"})
    c = model.config
    senses = f", k={c.n_senses}, sense MLPs {c.sense_intermediate_scale}d" if model_type == "backpack" else ""
    vocab = (f"vocab {written['padded_vocab_size']} cut to GPT-2's {written['vocab_size']}"
             if written["vocab_size"] < written["padded_vocab_size"] else f"vocab {c.vocab_size}")
    print(f"converted {model_type} ({c.n_layer} layers, {c.n_head} heads, d={c.n_embd}{senses}, {vocab}, "
          f"{c.block_size} positions, {model.get_num_params() / 1e6:.2f}M parameters) to {cfg.export_dir}")


if __name__ == "__main__":
    run_cli(main, ConvertConfig)
