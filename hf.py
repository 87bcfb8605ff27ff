"""
Weights in and out of the two Hugging Face layouts this repo speaks:

- "gpt2": a `transformers.GPT2LMHeadModel` directory (OpenAI's GPT-2 on the hub, or what export writes
  for one of our GPTs);
- "backpack-gpt2": the published Backpack, `stanfordnlp/backpack-gpt2` (config.json = GPT2Config fields
  plus num_senses and sense_intermediate_scale; keys under `backpack.`, tabled in docs/architecture.md
  section 5).

Reading: weight files are read directly (safetensors, or torch.load(weights_only=True)): no downloaded
code is ever run, so this repo loads a Backpack without trust_remote_code. One table per layout
(`HFLayout`) drives both directions, so a name is mapped in exactly one place (`rename`, which the
flash converter uses too). checkpoint.load_pretrained resolves train.py's and sample.py's --init_from
through load_pretrained here.

Writing (export_hf.py, convert_flash_ckpt.py): an export is a directory that transformers' Auto
classes load as what it is. A GPT is a GPT2LMHeadModel directory. A Backpack declares model_type
"backpack-gpt2" with an auto_map to the modeling code in hf_remote/, copied in, so transformers builds
it with trust_remote_code=True and refuses without (never a GPT-2). Both get tokenizer files that
AutoTokenizer loads and that encode and decode exactly as common.Tokenizer. A padded vocabulary is cut
to the tokenizer's ids: the padding rows are never inputs, so no logit of a real id changes, and no
probability is left on ids no tokenizer can print.
"""

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

import torch

from common import EOT_TEXT, GPT2_EOT, Tokenizer, UserError, first_line, gpt2_encoding, torch_load
from model import VARIANT_FIELDS, GPT, Backpack

REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")

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
    # like config_fields, but a config.json may lack them (the published one does): then our default holds
    optional_fields: dict = field(default_factory=dict)
    base_prefix: str = ""  # files saved from the bare base model lack it (e.g. the original gpt2 weights)
    json_model_type: str = "gpt2"  # config.json "model_type" of an export
    auto_map: dict = field(default_factory=dict)  # config.json "auto_map": class -> hf_remote module.class
    # The value a config.json without scale_attn_by_inverse_layer_idx means: the default of the config
    # class that reads the format (GPT2Config: False; the published BackpackGPT2Config: True).
    scale_attn_default: bool = False


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
        "sense_network.ln_0.": "backpack.sense_network.ln.",  # ln_0 of docs/architecture.md 2.3
        "sense_network.ln_1.": "backpack.sense_network.block.ln_1.",
        "sense_network.ln_2.": "backpack.sense_network.block.ln_2.",
        "sense_network.mlp.": "backpack.sense_network.block.mlp.",
        "sense_network.final_mlp.": "backpack.sense_network.final_mlp.",
        "sense_weights.": "backpack.sense_weight_net.",
        # parameters of the opt-in sense_norm (absent from the paper's model)
        "sense_network.norm_weight": "backpack.sense_network.norm_weight",
        "sense_network.ln_senses.": "backpack.sense_network.ln_senses.",
    },
    # HF shares these modules (word_embeddings = gpt2_model.wte etc.), so a state dict lists them twice
    tied={"lm_head.weight": "backpack.gpt2_model.wte.weight",
          "backpack.word_embeddings.weight": "backpack.gpt2_model.wte.weight",
          "backpack.position_embeddings.weight": "backpack.gpt2_model.wpe.weight"},
    linear_keys=("sense_weights.c_attn.weight",),
    config_fields={"n_senses": "num_senses", "sense_intermediate_scale": "sense_intermediate_scale"},
    optional_fields={name: name for name in VARIANT_FIELDS},
    json_model_type="backpack-gpt2",
    auto_map={"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
              "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"},
    scale_attn_default=True,
)

LAYOUTS = {GPT: GPT2_LAYOUT, Backpack: BACKPACK_LAYOUT}  # model class -> its Hugging Face layout


def rename(key: str, renames: dict) -> str:
    """key under another naming: the longest prefix of key in renames is replaced by its value."""
    prefix = max((p for p in renames if key.startswith(p)), key=len, default=None)
    if prefix is None:
        raise KeyError(f"{key} has no name in this layout")
    return renames[prefix] + key[len(prefix):]


def hf_key(layout: HFLayout, our_key: str) -> str:
    return rename(our_key, layout.renames)


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
        raise UserError(f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: "
                        f"{first_line(e)}); offline, pass a local directory holding config.json and the weights") from None
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
        if not file.endswith(".safetensors"):
            state_dict.update(torch_load(path, "weight file"))
            continue
        from safetensors.torch import load_file
        try:
            state_dict.update(load_file(path))
        except Exception as e:
            raise UserError(f"{path} is not a loadable weight file ({type(e).__name__}: {first_line(e)})") from None
    return state_dict


def layout_of(config: dict) -> HFLayout:
    """The published Backpack's config.json is a GPT2Config (model_type gpt2) plus num_senses; our
    exports say model_type backpack-gpt2."""
    is_backpack = "num_senses" in config or config.get("model_type") == BACKPACK_LAYOUT.json_model_type
    return BACKPACK_LAYOUT if is_backpack else GPT2_LAYOUT


def tokenizer_from_files(folder: str, config: dict) -> dict | None:
    """The tokenizer spec of a directory's own tokenizer files, None if it has none. The spec holds
    their content, not their path: a checkpoint finetuned from the directory stores the spec, and must
    read its ids the same way on another machine, or after the directory has moved, changed or gone.
    vocab.json + merges.txt (GPT2Tokenizer's byte-level BPE) become tiktoken's ranks where they are in
    GPT-2's layout; else tokenizer.json is kept whole, for the `tokenizers` package. The end-of-text id
    is config.json's eos_token_id, else <|endoftext|>'s."""
    files = {name: os.path.join(folder, name) for name in ("vocab.json", "merges.txt", "tokenizer.json")}
    eos = config.get("eos_token_id")
    if os.path.exists(files["vocab.json"]) and os.path.exists(files["merges.txt"]):
        with open(files["vocab.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(files["merges.txt"], encoding="utf-8") as f:
            merges = [line.split(" ") for line in f.read().splitlines() if line and not line.startswith("#version")]
        byte_of = {c: b for b, c in _byte_chars().items()}  # GPT-2's printable stand-in -> its byte
        ranks = {c: vocab[c] for c in byte_of if c in vocab}
        ids = [vocab.get(a + b, -1) if set(a + b) <= byte_of.keys() else -1 for a, b in merges]
        # tiktoken merges the pair whose token has the lowest id: ids must follow merges.txt, as GPT-2's do
        # (the check tiktoken makes on GPT-2's own files)
        if len(ranks) == 256 and -1 not in ids and all(i < j for i, j in zip(ids, ids[1:])):
            ranks.update({a + b: i for (a, b), i in zip(merges, ids)})
            special = {t: i for t, i in vocab.items() if t not in ranks}  # <|endoftext|> and other added tokens
            # each token's bytes as a latin-1 string, one character per byte: the spec stays plain JSON-able data
            return {"kind": "bpe", "special": special,
                    "ranks": {bytes(byte_of[c] for c in t).decode("latin-1"): i for t, i in ranks.items()},
                    "eot_id": eos if isinstance(eos, int) else special.get(EOT_TEXT)}
        if not os.path.exists(files["tokenizer.json"]):
            raise UserError(f"{folder}: vocab.json and merges.txt are not a byte-level BPE in GPT-2's layout (all "
                            "256 bytes, ids in merge order), which is what this repo reads; add a tokenizer.json")
    if os.path.exists(files["tokenizer.json"]):
        with open(files["tokenizer.json"], encoding="utf-8") as f:
            text = f.read()
        added = {t["content"]: t["id"] for t in json.loads(text).get("added_tokens", [])}
        return {"kind": "hf-tokenizer", "json": text, "eot_id": eos if isinstance(eos, int) else added.get(EOT_TEXT)}
    return None


def identify(name_or_path: str) -> tuple[str, dict]:
    """(model_type, tokenizer spec) of a hub alias or a local directory, without loading any weights.
    A directory's tokenizer: our spec in its config.json, else its own tokenizer files, else GPT-2's."""
    if os.path.isdir(name_or_path):
        config = read_config(name_or_path)
        spec = config.get(TOKENIZER_KEY) or tokenizer_from_files(name_or_path, config) or GPT2_TOKENIZER
        return layout_of(config).model_type, spec
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
    fields = {**TRUNK_FIELDS, **layout.config_fields, **layout.optional_fields}
    defaults = cls.config_class()
    args = {ours: config.get(theirs, getattr(defaults, ours)) for ours, theirs in fields.items()}
    if "scale_attn_by_inverse_layer_idx" not in config:
        args["scale_attn_by_inverse_layer_idx"] = layout.scale_attn_default
        print(f"warning: {source}/config.json does not set scale_attn_by_inverse_layer_idx; using "
              f"{layout.scale_attn_default}, the default of the {layout.name} format", file=sys.stderr)
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
    """Pretrained weights in a Hugging Face layout, read without running any downloaded code.
    GPT: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a GPT2LMHeadModel.save_pretrained directory.
    Backpack: backpack-small / backpack-gpt2 (= stanfordnlp/backpack-gpt2) or a directory in that
    layout. Only dropout may be overridden (default 0)."""
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
    try:
        model_config = cls.config_class(**args, dropout=override_args.get("dropout", 0.0))
    except ValueError as e:  # an opt-in field with a value this version does not know
        raise UserError(f"{folder}/config.json: {e}") from None
    model = cls(model_config)
    load_state_dict_from_hf(model, read_weights(folder), layout, folder)
    return model


# -----------------------------------------------------------------------------
# out


def tokenizer_vocab_size(tokenizer_spec: dict) -> int:
    """How many ids the tokenizer can emit (GPT-2's without building its BPE)."""
    return GPT2_EOT + 1 if tokenizer_spec.get("kind") == "gpt2" else Tokenizer(tokenizer_spec).vocab_size


def hf_config(model: GPT, layout: HFLayout, tokenizer_spec: dict, vocab_size: int) -> dict:
    c = model.config
    fields = {**TRUNK_FIELDS, **layout.config_fields, **layout.optional_fields}
    # GPT-2's special tokens only exist if the vocabulary is GPT-2's (transformers warns otherwise)
    eot = GPT2_EOT if tokenizer_spec.get("kind") == "gpt2" and vocab_size > GPT2_EOT else None
    if tokenizer_spec.get("kind") != "gpt2" and vocab_size >= tokenizer_vocab_size(tokenizer_spec):
        eot = Tokenizer(tokenizer_spec).eot_id
    return {
        "architectures": [layout.architecture], "model_type": layout.json_model_type,
        **({"auto_map": layout.auto_map} if layout.auto_map else {}),
        **{theirs: getattr(c, ours) for ours, theirs in fields.items()}, "vocab_size": vocab_size,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "scale_attn_weights": True, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        # the Backpack's remote code keeps no cache: generate() must not hand it one
        "use_cache": layout is GPT2_LAYOUT,
        "bos_token_id": eot, "eos_token_id": eot, TOKENIZER_KEY: tokenizer_spec,
    }


def hf_state_dict(model: GPT, layout: HFLayout, vocab_size: int) -> dict:
    """Our weights under HF names (tied copies left out), Conv1D weights transposed, the embedding cut
    to vocab_size rows, and zero biases where a bias=False model has none, since GPT-2 in transformers
    always has them."""
    out = {}
    for key, tensor in model.state_dict().items():
        if key != "lm_head.weight":
            tensor = tensor[:vocab_size] if key == "transformer.wte.weight" else tensor
            tensor = tensor.t() if is_conv1d(layout, key) else tensor
            out[hf_key(layout, key)] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)) and module.bias is None and name != "lm_head":
            weight = module.weight
            out[hf_key(layout, f"{name}.bias")] = weight.new_zeros(weight.shape[0], device="cpu")
    return out


def save_pretrained(model: GPT, export_dir: str, tokenizer_spec: dict | None = None) -> dict:
    """The inverse of load_pretrained, into a directory transformers loads as what it is: a GPT as a
    GPT2LMHeadModel; a Backpack in the backpack-gpt2 layout with its modeling code (hf_remote/, for
    trust_remote_code=True). Tokenizer files come along and padded vocabulary rows are cut. Returns what was written: {"vocab_size", "padded_vocab_size",
    "tokenizer_files"}. Tokenizer files are written when the model covers the tokenizer's ids (tiny
    test models with fewer rows than GPT-2's vocabulary get none)."""
    from safetensors.torch import save_file
    layout = LAYOUTS[type(model)]
    tokenizer_spec = tokenizer_spec or GPT2_TOKENIZER
    padded, n_tokens = model.config.vocab_size, tokenizer_vocab_size(tokenizer_spec)
    vocab_size = min(padded, n_tokens)  # the padding rows past the tokenizer's ids are cut
    os.makedirs(export_dir, exist_ok=True)
    with open(os.path.join(export_dir, "config.json"), "w") as f:
        json.dump(hf_config(model, layout, tokenizer_spec, vocab_size), f, indent=2)
    # metadata format=pt: transformers refuses safetensors files without it
    save_file(hf_state_dict(model, layout, vocab_size), os.path.join(export_dir, "model.safetensors"),
              metadata={"format": "pt"})
    if layout.auto_map:  # the modeling code transformers runs for model_type backpack-gpt2
        for module in {ref.split(".")[0] for ref in layout.auto_map.values()}:
            shutil.copy(os.path.join(REMOTE_CODE_DIR, module + ".py"), export_dir)
    if n_tokens <= padded:
        save_tokenizer(tokenizer_spec, export_dir, model.config.block_size)
    return {"vocab_size": vocab_size, "padded_vocab_size": padded, "tokenizer_files": n_tokens <= padded}


# -----------------------------------------------------------------------------
# tokenizer files: what AutoTokenizer loads, encoding and decoding exactly as common.Tokenizer


def _byte_chars() -> dict:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def gpt2_vocab_and_merges(encoding) -> tuple[dict, list]:
    """GPT-2's vocab.json and merges.txt, rebuilt from tiktoken's ranks: a token of rank r is the merge
    that byte-pair encoding its bytes with the merges below r leaves as two parts. (This gives back
    OpenAI's encoder.json and vocab.bpe exactly.)"""
    ranks = {b: encoding.encode_single_token(b) for b in encoding.token_byte_values()}
    table = _byte_chars()

    def printable(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as BPE does
            best, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((printable(parts[0]), printable(parts[1])))
    special = {t: encoding.encode_single_token(t) for t in encoding.special_tokens_set}  # <|endoftext|> for GPT-2
    return {**{printable(b): r for b, r in ranks.items()}, **special}, merges


def _char_vocab(tok: Tokenizer) -> tuple[dict, list]:
    """({key: id}, keys that print as nothing) for a one-token-per-character vocabulary. A character
    is the key of the lowest id showing it (the id encoding gives it, as CharTable); a later id showing
    the same text gets "##" in front (a decoder rule strips it: Chinese BERT's ##x entries keep their
    names); ids that print as nothing (BERT's [PAD], [CLS], [unusedN], ...) keep their raw names."""
    raw = tok.spec["vocab"] if tok.spec["kind"] == "bert-chinese" else tok.chars.itos
    vocab = {EOT_TEXT: tok.eot_id} if tok.eot_id is not None else {}
    hidden = []
    for i, shown in enumerate(tok.chars.itos):
        if i == tok.eot_id:
            continue
        if not shown:
            key = raw[i] if raw[i] and raw[i] not in vocab else f"<|hidden{i}|>"
            hidden.append(key)
        else:
            key = shown
            while key in vocab:
                key = "##" + key
        vocab[key] = i
    return vocab, hidden


def save_tokenizer(tokenizer_spec: dict, export_dir: str, max_length: int):
    """tokenizer.json and tokenizer_config.json for AutoTokenizer. GPT-2 (and a "bpe" spec): byte-level
    BPE from tiktoken's ranks, its special tokens special; a "hf-tokenizer" spec: its own tokenizer.json. Character kinds: a word-level tokenizer over single characters whose
    decoder joins tokens without spaces; <|endoftext|> is special when the vocabulary has it."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast
    kind = tokenizer_spec.get("kind")
    if kind == "hf-tokenizer":  # a directory's own tokenizer.json (hf.tokenizer_from_files), written back as it came
        backend = Backend.from_str(tokenizer_spec["json"])
        eot_id = tokenizer_spec.get("eot_id")
        eot, unk = (backend.id_to_token(eot_id) if eot_id is not None else None), None
    elif kind in ("gpt2", "bpe"):
        if kind == "bpe":  # a directory's own vocab.json + merges.txt, read into tiktoken's ranks
            encoding = Tokenizer(tokenizer_spec).encoding
        else:
            try:
                encoding = gpt2_encoding()
            except UserError:
                raise
            except Exception as e:  # offline without a cached BPE
                raise UserError(f"writing the GPT-2 tokenizer files needs the GPT-2 BPE ({first_line(e)}); go "
                                "online once (tiktoken caches it) or set GPT2_BPE_DIR to a folder holding "
                                "gpt2.tiktoken") from None
        backend = Backend(models.BPE(*gpt2_vocab_and_merges(encoding)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eot_id = GPT2_EOT if kind == "gpt2" else tokenizer_spec.get("eot_id")
        eot = next((t for t in encoding.special_tokens_set if encoding.encode_single_token(t) == eot_id), None)
        unk = EOT_TEXT if kind == "gpt2" else None
    else:
        tok = Tokenizer(tokenizer_spec)
        vocab, hidden = _char_vocab(tok)
        unk_key = next((k for k, i in vocab.items() if i == tok.chars.unk_id), "<|no unknown characters|>")
        backend = Backend(models.WordLevel(vocab, unk_token=unk_key))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per character
        rules = [decoders.Replace(Regex(r"^(?:##)+(?=.)"), "")]
        if hidden:
            rules.append(decoders.Replace(Regex("^(?:" + "|".join(re.escape(k) for k in hidden) + ")$"), ""))
        backend.decoder = decoders.Sequence([*rules, decoders.Fuse()])
        eot, unk = (EOT_TEXT if tok.eot_id is not None else None), None
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot, unk_token=unk,
                                   clean_up_tokenization_spaces=False, model_max_length=max_length)
    fast.save_pretrained(export_dir)


# -----------------------------------------------------------------------------
# the official backpacks-flash-attn checkpoints' key names (convert_flash_ckpt.py reads the files)

BACKPACK_TRUNK = "transformer.gpt2_model."  # where the Backpack keeps its GPT-2; a baseline has it at "transformer."
SENSE = "transformer.content_model."


def flash_names(n_layer: int, trunk: str) -> dict:
    """our key prefix -> flash key prefix. The flash trunk is written in "Add -> LN" form: ln_0
    normalizes the embeddings, layers.i.norm1 follows layer i's attention and layers.i.norm2 its MLP.
    So GPT-2's h.i.ln_1 is layers.{i-1}.norm2 (ln_0 for i = 0), h.i.ln_2 is layers.i.norm1, and ln_f is
    the last norm2 (docs/architecture.md 5.1). All flash Linears are nn.Linear (out, in), like ours: no transposes."""
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


def flash_tied_copies(trunk: str) -> dict:
    """flash key of a copy -> flash key it repeats. The LM head is the trunk's word embedding; a
    Backpack lists the trunk's embedding module twice more: as the sense network's and as its own
    `transformer.embeddings` (docs/architecture.md 2.1)."""
    word, position = trunk + "embeddings.word_embeddings.weight", trunk + "embeddings.position_embeddings.weight"
    tied = {"lm_head.weight": word}
    if trunk == BACKPACK_TRUNK:
        for module in (SENSE + "embeddings.", "transformer.embeddings."):
            tied.update({module + "word_embeddings.weight": word, module + "position_embeddings.weight": position})
    return tied
