"""
Convert an official backpacks-flash-attn training checkpoint (a PyTorch Lightning .ckpt from
downloads.cs.stanford.edu/nlp/data/backpacks-acl2023/) into a Hugging Face directory that this repo
loads with --init_from (train.py, sample.py) or from_pretrained:

    python convert_flash_ckpt.py --ckpt=backpack-small-flash-fp16.ckpt --export_dir=hf-backpack-small
    python sample.py --init_from=hf-backpack-small --start="The capital of France is"
    python train.py config/finetune_shakespeare_backpack.py --init_from=hf-backpack-small

Backpacks (micro 6/6/384, mini 8/8/640, small 12/12/768, the sense-count ablations k = 1/4/16/64 and
the "shrink" model, whose sense MLPs are d wide) are written in the backpack-gpt2 layout; the
Transformer baselines (gpt2-*-flash-fp16.ckpt) as a GPT2LMHeadModel directory. Sizes are read off the
tensors; n_head is not visible in any shape, so it comes from the checkpoint's hyper-parameters, else
from the official model of that width, else --n_head.

The flash key names are inferred (../shared/docs/backpack-spec.md section 2.3) and were never checked
against a real file: every tensor's shape is checked, and a missing or unexpected key stops the
conversion with its name.
"""

import re
from dataclasses import dataclass

import torch

from common import UserError, build_model
from configurator import run_cli
from hf import load_mapped
from model import GPT

BACKPACK_TRUNK = "transformer.gpt2_model."  # where the Backpack keeps its GPT-2; a baseline has it at "transformer."
SENSE = "transformer.content_model."
HEADS_BY_WIDTH = {384: 6, 640: 8, 768: 12}  # micro, mini, small (spec 1.9)


@dataclass
class ConvertConfig:
    ckpt: str = ""  # the Lightning .ckpt (or a plain state dict) to convert
    export_dir: str = ""  # write the Hugging Face directory here
    n_head: int = 0  # attention heads; 0 = from the checkpoint's hyper-parameters or the official sizes
    scale_attn_by_inverse_layer_idx: bool = True  # every official model (Backpacks and baselines) uses it
    unsafe_pickle: bool = False  # allow a full unpickle (runs code!) if weights_only loading fails; trusted files only


def read_checkpoint(path: str, unsafe_pickle: bool) -> tuple[dict, object]:
    """(state dict without Lightning's `model.` prefix, hyper-parameters or None)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read as tensors only ({first_line}); Lightning may have pickled "
                        "its training config into it. If you trust the file, rerun with --unsafe_pickle=True") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors (under 'state_dict' or at the top level)")
    if all(k.startswith("model.") for k in state):  # the LightningModule keeps the network in self.model
        state = {k[len("model."):]: v for k, v in state.items()}
    return state, ckpt.get("hyper_parameters")


def find_key(obj: object, key: str):
    """The first value of `key` anywhere in nested mappings (hydra configs nest the model config)."""
    if hasattr(obj, "items"):
        for k, v in obj.items():
            found = v if k == key else find_key(v, key)
            if found is not None:
                return found
    return None


def flash_names(n_layer: int, trunk: str) -> dict:
    """our key prefix -> flash key prefix. The flash trunk is written in "Add -> LN" form: ln_0
    normalizes the embeddings, layers.i.norm1 follows layer i's attention and layers.i.norm2 its MLP.
    So GPT-2's h.i.ln_1 is layers.{i-1}.norm2 (ln_0 for i = 0), h.i.ln_2 is layers.i.norm1, and ln_f is
    the last norm2 (spec 2.3). All flash Linears are nn.Linear (out, in), like ours: no transposes."""
    names = {"transformer.wte.": trunk + "embeddings.word_embeddings.",
             "transformer.wpe.": trunk + "embeddings.position_embeddings.",
             "transformer.ln_f.": trunk + f"layers.{n_layer - 1}.norm2."}
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"{trunk}layers.{i}."
        names.update({ours + "ln_1.": trunk + "ln_0." if i == 0 else f"{trunk}layers.{i - 1}.norm2.",
                      ours + "ln_2.": theirs + "norm1.",
                      ours + "attn.c_attn.": theirs + "mixer.Wqkv.", ours + "attn.c_proj.": theirs + "mixer.out_proj.",
                      ours + "mlp.c_fc.": theirs + "mlp.fc1.", ours + "mlp.c_proj.": theirs + "mlp.fc2."})
    if trunk == BACKPACK_TRUNK:
        names.update({"sense_network.ln_0.": SENSE + "ln_0.",
                      "sense_network.ln_1.": SENSE + "layers.0.norm1.",
                      "sense_network.ln_2.": SENSE + "layers.0.norm2.",
                      "sense_network.mlp.c_fc.": SENSE + "layers.0.mlp.fc1.",
                      "sense_network.mlp.c_proj.": SENSE + "layers.0.mlp.fc2.",
                      "sense_network.final_mlp.c_fc.": SENSE + "final_mlp.fc1.",
                      "sense_network.final_mlp.c_proj.": SENSE + "final_mlp.fc2.",
                      "sense_weights.c_attn.": "transformer.contextualization_attn.Wqkv."})
    return names


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
    args = dict(vocab_size=vocab_size, n_embd=d, n_layer=len(layers), n_head=n_head,
                block_size=shape(trunk + "embeddings.position_embeddings.weight")[0], bias=True, dropout=0.0,
                scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx)
    if trunk != BACKPACK_TRUNK:
        return "gpt", args
    kd, hidden = shape(SENSE + "final_mlp.fc2.weight")[0], shape(SENSE + "final_mlp.fc1.weight")[0]
    if kd % d or hidden % d or d % (kd // d):
        raise UserError(f"{source}: the final sense MLP is {d} -> {hidden} -> {kd}, not d -> I -> k*d with d={d} "
                        "and k dividing d")
    return "backpack", dict(args, n_senses=kd // d, sense_intermediate_scale=hidden // d)


def convert(state: dict, hparams: object, cfg: ConvertConfig, source: str) -> tuple[str, GPT]:
    """The flash state dict as one of our models."""
    trunk = BACKPACK_TRUNK if any(k.startswith(BACKPACK_TRUNK) for k in state) else "transformer."
    model_type, args = model_args(state, trunk, hparams, cfg, source)
    model = build_model(model_type, **args)
    prefixes = flash_names(args["n_layer"], trunk)
    names = {}
    for key in model.state_dict():
        if key != "lm_head.weight":
            prefix = max((p for p in prefixes if key.startswith(p)), key=len)
            names[key] = prefixes[prefix] + key[len(prefix):]
    # the LM head and the sense network's embedding module are the trunk's embeddings (spec 1.2)
    tied = {"lm_head.weight": trunk + "embeddings.word_embeddings.weight",
            SENSE + "embeddings.word_embeddings.weight": trunk + "embeddings.word_embeddings.weight",
            SENSE + "embeddings.position_embeddings.weight": trunk + "embeddings.position_embeddings.weight"}
    load_mapped(model, {k: v.float() for k, v in state.items()}, names, tied, source)
    return model_type, model


def main(cfg: ConvertConfig):
    if not cfg.ckpt or not cfg.export_dir:
        raise UserError("pass --ckpt=path/to/file.ckpt and --export_dir=where/to/write")
    state, hparams = read_checkpoint(cfg.ckpt, cfg.unsafe_pickle)
    model_type, model = convert(state, hparams, cfg, cfg.ckpt)
    model.save_pretrained(cfg.export_dir, {"kind": "gpt2"})
    c = model.config
    senses = f", k={c.n_senses}, sense MLPs {c.sense_intermediate_scale}d" if model_type == "backpack" else ""
    print(f"converted {model_type} ({c.n_layer} layers, {c.n_head} heads, d={c.n_embd}{senses}, vocab {c.vocab_size}, "
          f"{c.block_size} positions, {model.get_num_params() / 1e6:.2f}M parameters) to {cfg.export_dir}")


if __name__ == "__main__":
    run_cli(main, ConvertConfig)
