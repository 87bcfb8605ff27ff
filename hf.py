"""
Weights in and out of the two Hugging Face layouts this repo speaks:

- "gpt2": a `transformers.GPT2LMHeadModel` directory (OpenAI's GPT-2 on the hub, or what export writes
  for one of our GPTs);
- "backpack-gpt2": the published Backpack, `stanfordnlp/backpack-gpt2` (config.json = GPT2Config fields
  plus num_senses and sense_intermediate_scale; keys under `backpack.` as listed in
  ../shared/docs/backpack-spec.md section 2).

Weight files are read directly (safetensors, or torch.load(weights_only=True)): no downloaded code is
ever run, so the Backpack needs no trust_remote_code. One table per layout (`HFLayout`) drives both
directions, so a name is mapped in exactly one place. `GPT.from_pretrained` / `save_pretrained` in
model.py delegate here; common.load_pretrained resolves train.py's and sample.py's --init_from.
"""

import json
import os
import re
from dataclasses import dataclass, field

import torch

from common import GPT2_EOT, UserError
from model import GPT, Backpack, LayerNorm

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # in order of preference
# Causal-mask buffers that older transformers versions saved with every GPT-2 attention layer.
IGNORED_KEYS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
TOKENIZER_KEY = "nanobackpacklm_tokenizer"  # our addition to config.json: the tokenizer spec of common.py
GPT2_TOKENIZER = {"kind": "gpt2"}

# our config field -> GPT2Config field, shared by both layouts
TRUNK_FIELDS = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
                "vocab_size": "vocab_size", "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx"}


@dataclass(frozen=True)
class HFLayout:
    name: str
    model_type: str  # the model.MODELS key of the model this layout holds
    architecture: str  # config.json "architectures"
    repos: dict  # hub alias -> repo id
    renames: dict  # our key prefix -> HF key prefix (longest prefix wins)
    tied: dict  # HF key of a tied copy -> HF key of the tensor it repeats; files may omit the copies
    linear_keys: tuple = ()  # our c_attn/c_fc/c_proj weights that HF keeps as nn.Linear, not Conv1D
    config_fields: dict = field(default_factory=dict)  # our config field -> config.json field, beyond the trunk
    base_prefix: str = ""  # files saved from the bare base model lack it (e.g. the original gpt2 weights)


GPT2_LAYOUT = HFLayout(
    name="gpt2", model_type="gpt", architecture="GPT2LMHeadModel",
    repos={name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    renames={"transformer.": "transformer."},
    tied={"lm_head.weight": "transformer.wte.weight"},
    base_prefix="transformer.",
)

BACKPACK_LAYOUT = HFLayout(
    name="backpack-gpt2", model_type="backpack", architecture="BackpackGPT2LMHeadModel",
    repos={"backpack-small": "stanfordnlp/backpack-gpt2", "backpack-gpt2": "stanfordnlp/backpack-gpt2"},
    renames={
        "transformer.": "backpack.gpt2_model.",
        "sense_network.ln_0.": "backpack.sense_network.ln.",  # LN_0 of spec 1.4
        "sense_network.ln_1.": "backpack.sense_network.block.ln_1.",
        "sense_network.ln_2.": "backpack.sense_network.block.ln_2.",
        "sense_network.mlp.": "backpack.sense_network.block.mlp.",
        "sense_network.final_mlp.": "backpack.sense_network.final_mlp.",
        "sense_weights.": "backpack.sense_weight_net.",
    },
    # HF shares these modules (word_embeddings = gpt2_model.wte etc.), so a state dict lists them twice
    tied={"lm_head.weight": "backpack.gpt2_model.wte.weight",
          "backpack.word_embeddings.weight": "backpack.gpt2_model.wte.weight",
          "backpack.position_embeddings.weight": "backpack.gpt2_model.wpe.weight"},
    linear_keys=("sense_weights.c_attn.weight",),
    config_fields={"n_senses": "num_senses", "sense_intermediate_scale": "sense_intermediate_scale"},
)

LAYOUTS = {GPT: GPT2_LAYOUT, Backpack: BACKPACK_LAYOUT}  # model class -> its Hugging Face layout


def hf_key(layout: HFLayout, our_key: str) -> str:
    prefix = max((p for p in layout.renames if our_key.startswith(p)), key=len, default=None)
    if prefix is None:
        raise KeyError(f"{our_key} has no {layout.name} name")
    return layout.renames[prefix] + our_key[len(prefix):]


def is_conv1d(layout: HFLayout, our_key: str) -> bool:
    """GPT-2's Conv1D stores weight (in, out), the transpose of nn.Linear's (out, in)."""
    *_, module, param = our_key.split(".")
    return param == "weight" and module in ("c_attn", "c_fc", "c_proj") and our_key not in layout.linear_keys


# -----------------------------------------------------------------------------
# finding the files: a local directory, or a hub alias downloaded with huggingface_hub


def _download(repo_id: str) -> str:
    """config.json and the weights only (never code) into the hub cache; returns the snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        folder = os.path.dirname(hf_hub_download(repo_id, "config.json"))
        for name in WEIGHT_FILES:
            try:
                path = hf_hub_download(repo_id, name)
            except EntryNotFoundError:
                continue
            if name.endswith(".index.json"):  # sharded: fetch every shard the index names
                with open(path) as f:
                    for shard in sorted(set(json.load(f)["weight_map"].values())):
                        hf_hub_download(repo_id, shard)
            return folder
    except Exception as e:  # no network, no such repo, no config.json: say so in one line
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: "
                        f"{first_line}); offline, pass a local directory holding config.json and the weights") from None
    raise UserError(f"found none of {', '.join(WEIGHT_FILES)} for {repo_id}, neither on the Hugging Face hub nor "
                    "(offline) in its cache")


def resolve(name_or_path: str, layout: HFLayout) -> str:
    """A local directory wins (as in transformers); otherwise a hub alias or repo id is downloaded."""
    if os.path.isdir(name_or_path):
        return name_or_path
    repo_id = layout.repos.get(name_or_path, name_or_path if name_or_path in layout.repos.values() else None)
    if repo_id is None:
        raise UserError(f"unknown pretrained {layout.model_type} {name_or_path!r}: it is neither a local directory "
                        f"nor one of {', '.join(layout.repos)}")
    return _download(repo_id)


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        ours = os.path.exists(os.path.join(folder, "ckpt.pt"))
        hint = "; for this repo's own checkpoints use --init_from=resume" if ours else ""
        raise UserError(f"{folder} has no config.json; it is not a Hugging Face model directory{hint}")
    with open(path) as f:
        return json.load(f)


def read_weights(folder: str) -> dict:
    """The state dict stored in folder, whichever of WEIGHT_FILES it uses (tensors only, no pickled code)."""
    name = next((n for n in WEIGHT_FILES if os.path.exists(os.path.join(folder, n))), None)
    if name is None:
        raise UserError(f"{folder} holds none of {', '.join(WEIGHT_FILES)}")
    files = [name]
    if name.endswith(".index.json"):
        with open(os.path.join(folder, name)) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    state_dict = {}
    for file in files:
        path = os.path.join(folder, file)
        try:
            if file.endswith(".safetensors"):
                from safetensors.torch import load_file
                state_dict.update(load_file(path))
            else:
                state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise UserError(f"{path} is not a readable weight file ({type(e).__name__}: {str(e)[:200]})") from None
    return state_dict


def layout_of(config: dict) -> HFLayout:
    """The published Backpack's config.json is a GPT2Config plus num_senses."""
    return BACKPACK_LAYOUT if "num_senses" in config else GPT2_LAYOUT


def identify(name_or_path: str) -> tuple[str, dict]:
    """(model_type, tokenizer spec) of a hub alias or a local directory, without loading any weights."""
    if os.path.isdir(name_or_path):
        config = read_config(name_or_path)
        return layout_of(config).model_type, config.get(TOKENIZER_KEY, GPT2_TOKENIZER)
    for layout in LAYOUTS.values():
        if name_or_path in layout.repos or name_or_path in layout.repos.values():
            return layout.model_type, GPT2_TOKENIZER
    aliases = [a for layout in LAYOUTS.values() for a in layout.repos]
    raise UserError(f"unknown pretrained model {name_or_path!r}: it is neither a local directory nor one of "
                    f"{', '.join(aliases)}")


# -----------------------------------------------------------------------------
# in


def model_args_from_config(config: dict, layout: HFLayout, cls: type[GPT], source: str) -> dict:
    """Our config fields from a config.json, refusing the GPT2Config options our model does not have."""
    fields = {**TRUNK_FIELDS, **layout.config_fields}
    defaults = cls.config_class()
    args = {ours: config.get(theirs, getattr(defaults, ours)) for ours, theirs in fields.items()}
    for required in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", *layout.config_fields.values()):
        if required not in config:
            raise UserError(f"{source}/config.json has no {required}")
    unsupported = {
        "activation_function": config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12,
        "n_inner": config.get("n_inner") not in (None, 4 * args["n_embd"]),
        "scale_attn_weights": config.get("scale_attn_weights", True) is not True,
        "tie_word_embeddings": config.get("tie_word_embeddings", True) is not True,
        "add_cross_attention": config.get("add_cross_attention", False) is not False,
    }
    for key, bad in unsupported.items():
        if bad:
            raise UserError(f"{source}/config.json sets {key}={config.get(key)!r}, which this repo's models "
                            "do not support (they are GPT-2: tanh GELU, LayerNorm eps 1e-5, MLP 4*n_embd, tied head)")
    if args["n_embd"] % args["n_head"] or ("n_senses" in args and args["n_embd"] % args["n_senses"]):
        raise UserError(f"{source}/config.json: n_embd={args['n_embd']} must be divisible by n_head"
                        + (" and num_senses" if "n_senses" in args else ""))
    return dict(args, bias=True)  # GPT-2 and the Backpack have biases everywhere


def load_mapped(model: GPT, state: dict, names: dict, tied: dict, source: str, transposed: set = frozenset()):
    """Copy a foreign state dict into model. names maps each of our keys (but the tied lm_head) to its
    key in state; keys in `transposed` are stored (in, out). Every tensor must be there with the shape
    our config implies, and nothing may be left over. tied maps a key of a tied copy to the key it
    repeats: any member of such a group may be the one a file kept, but copies must agree."""
    state = dict(state)
    for copy, primary in tied.items():
        if copy not in state:
            continue
        kept = state.pop(copy)
        if primary not in state:
            state[primary] = kept
        elif kept.shape != state[primary].shape or not torch.equal(kept, state[primary]):
            raise UserError(f"{source}: {copy} differs from {primary}; this repo's models tie them (untied "
                            "weights cannot be loaded)")
    new_state, missing = {}, []
    for key, param in model.state_dict().items():
        if key == "lm_head.weight":  # tied to transformer.wte.weight, set through it
            continue
        if names[key] not in state:
            missing.append(names[key])
            continue
        stored = state.pop(names[key])
        tensor = stored.t() if key in transposed else stored
        if tensor.shape != param.shape:
            hint = (" (this repo sizes both sense MLPs as sense_intermediate_scale * n_embd)"
                    if key.startswith("sense_network.") else "")
            raise UserError(f"{source}: {names[key]} has shape {tuple(stored.shape)}, but the config implies "
                            f"{tuple(param.t().shape if key in transposed else param.shape)}{hint}")
        new_state[key] = tensor
    unexpected = [k for k in state if not IGNORED_KEYS.search(k)]
    if missing or unexpected:
        raise UserError(f"{source} does not match the model its config describes: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    new_state["lm_head.weight"] = new_state["transformer.wte.weight"]
    model.load_state_dict(new_state)


def load_state_dict_from_hf(model: GPT, hf_state: dict, layout: HFLayout, source: str):
    if layout.base_prefix and not any(k.startswith(layout.base_prefix) for k in hf_state):
        hf_state = {layout.base_prefix + k: v for k, v in hf_state.items()}
    keys = [k for k in model.state_dict() if k != "lm_head.weight"]
    load_mapped(model, hf_state, {k: hf_key(layout, k) for k in keys}, layout.tied, source,
                transposed={k for k in keys if is_conv1d(layout, k)})


def load_pretrained(cls: type[GPT], name_or_path: str, override_args: dict | None = None) -> GPT:
    """See GPT.from_pretrained."""
    override_args = override_args or {}
    if set(override_args) - {"dropout"}:
        raise UserError("only dropout can be overridden in pretrained weights, not "
                        f"{sorted(set(override_args) - {'dropout'})}")
    layout = LAYOUTS[cls]
    folder = resolve(name_or_path, layout)
    config = read_config(folder)
    if layout_of(config) is not layout:
        raise UserError(f"{folder} holds a {layout_of(config).model_type} model in the {layout_of(config).name} "
                        f"layout, not a {layout.model_type}; load it with model_type={layout_of(config).model_type}")
    args = model_args_from_config(config, layout, cls, folder)
    model = cls(cls.config_class(**args, dropout=override_args.get("dropout", 0.0)))
    load_state_dict_from_hf(model, read_weights(folder), layout, folder)
    return model


# -----------------------------------------------------------------------------
# out


def hf_config(model: GPT, layout: HFLayout, tokenizer_spec: dict) -> dict:
    c = model.config
    fields = {**TRUNK_FIELDS, **layout.config_fields}
    # GPT-2's special tokens only exist if the vocabulary is GPT-2's (transformers warns otherwise)
    eot = GPT2_EOT if tokenizer_spec.get("kind") == "gpt2" and c.vocab_size > GPT2_EOT else None
    return {
        "architectures": [layout.architecture], "model_type": "gpt2",
        **{theirs: getattr(c, ours) for ours, theirs in fields.items()},
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, TOKENIZER_KEY: tokenizer_spec,
    }


def hf_state_dict(model: GPT, layout: HFLayout) -> dict:
    """Our weights under HF names (tied copies left out), Conv1D weights transposed, and zero biases
    where a bias=False model has none, since GPT-2 in transformers always has them."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key != "lm_head.weight":
            tensor = tensor.t() if is_conv1d(layout, key) else tensor
            out[hf_key(layout, key)] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
    for name, module in model.named_modules():
        if isinstance(module, (LayerNorm, torch.nn.Linear)) and module.bias is None and name != "lm_head":
            weight = module.weight
            out[hf_key(layout, f"{name}.bias")] = weight.new_zeros(weight.shape[0], device="cpu")
    return out


def save_pretrained(model: GPT, export_dir: str, tokenizer_spec: dict | None = None):
    """See GPT.save_pretrained."""
    from safetensors.torch import save_file
    layout = LAYOUTS[type(model)]
    os.makedirs(export_dir, exist_ok=True)
    with open(os.path.join(export_dir, "config.json"), "w") as f:
        json.dump(hf_config(model, layout, tokenizer_spec or GPT2_TOKENIZER), f, indent=2)
    # metadata format=pt: transformers refuses safetensors files without it
    save_file(hf_state_dict(model, layout), os.path.join(export_dir, "model.safetensors"), metadata={"format": "pt"})
