"""
Pretrained weights in and out (issue 3): GPT-2 and the published Backpack layout, the converter for the
official flash-attn checkpoints, export, and the --init_from paths of train.py and sample.py.

Offline: tiny random models, every parameter perturbed (LayerNorm ones and zero biases would hide a
mapping mistake), are saved in each format, loaded here, and compared with an independent reference:
transformers' GPT2LMHeadModel for GPT-2; for the Backpack, `RefBackpackLM` below, written for this test in
the layout of stanfordnlp/backpack-gpt2 (transformers' GPT2Model as trunk, Conv1D sense MLPs, spec
sections 1.4-1.6 and 2.2); for the flash checkpoints, `flash_logits`, the spec's math evaluated
directly on the flash state dict.
"""

import collections
import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import types
import typing

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import convert_flash_ckpt  # noqa: E402
import hf  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from common import UserError, checkpoint_dict, load_pretrained, save_checkpoint  # noqa: E402
from model import GPT, Backpack, build_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DOWNLOAD = hf._download


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: a download attempt fails the test. (GPT-2 BPE: conftest's gpt2_bpe fixture.)"""
    def no_network(repo_id):
        raise AssertionError(f"test tried to download {repo_id}")
    monkeypatch.setattr(hf, "_download", no_network)


def perturb_(module: nn.Module, seed: int):
    """Every parameter moves by N(0, 0.2^2); tied parameters are yielded (and moved) once."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def ids(vocab_size: int, T: int, B: int = 2, seed: int = 0):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# GPT-2: transformers' GPT2LMHeadModel is the reference


def tiny_gpt2(folder, seed=0, **overrides):
    config = GPT2Config(**dict(dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=24,
                                    bos_token_id=None, eos_token_id=None), **overrides))
    ref = perturb_(GPT2LMHeadModel(config), seed).eval()
    ref.save_pretrained(folder)
    return ref


@pytest.mark.parametrize("overrides", [{}, dict(n_layer=3, n_head=4, n_embd=48, scale_attn_by_inverse_layer_idx=True)])
def test_gpt2_logits_match_transformers(tmp_path, overrides):
    ref = tiny_gpt2(tmp_path, **overrides)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.bias and model.config.vocab_size == ref.config.vocab_size
    x = ids(ref.config.vocab_size, 24)
    with torch.no_grad():
        assert max_diff(model(x)[0], ref(x).logits) < 1e-4


def test_gpt2_old_bin_format(tmp_path):
    """The original hub files: pytorch_model.bin saved from the bare GPT2Model (no `transformer.`
    prefix, no lm_head) with the causal-mask buffers older transformers versions stored."""
    ref = tiny_gpt2(tmp_path / "new")
    os.makedirs(tmp_path / "old")
    state = {k[len("transformer."):]: v for k, v in ref.state_dict().items() if k.startswith("transformer.")}
    for i in range(ref.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "old" / "pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    model = GPT.from_pretrained(str(tmp_path / "old")).eval()
    x = ids(101, 24)
    with torch.no_grad():
        assert max_diff(model(x)[0], ref(x).logits) < 1e-4


def test_gpt2_sharded_safetensors(tmp_path):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=24, bos_token_id=None,
                        eos_token_id=None)
    ref = perturb_(GPT2LMHeadModel(config), 0).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = GPT.from_pretrained(str(tmp_path)).eval()
    x = ids(101, 24)
    with torch.no_grad():
        assert max_diff(model(x)[0], ref(x).logits) < 1e-4


def test_only_dropout_may_be_overridden(tmp_path):
    tiny_gpt2(tmp_path)
    assert GPT.from_pretrained(str(tmp_path), override_args={"dropout": 0.1}).config.dropout == 0.1
    with pytest.raises(UserError, match="only dropout"):
        GPT.from_pretrained(str(tmp_path), override_args={"n_layer": 1})


# -----------------------------------------------------------------------------
# the published Backpack layout, against a reference written for this test


class RefMLP(nn.Module):
    """HF's BackpackMLP layout: Conv1D c_fc -> activation -> Conv1D c_proj (dropout is off in eval)."""

    def __init__(self, n_in, n_hidden, n_out, activation):
        super().__init__()
        self.c_fc, self.c_proj, self.act = Conv1D(n_hidden, n_in), Conv1D(n_out, n_hidden), ACT2FN[activation]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class RefBackpackLM(nn.Module):
    """A Backpack with the module names (hence state dict keys) of stanfordnlp/backpack-gpt2, for eval.
    The HF code hard-codes the sense block's MLP at 4d; block_hidden=d gives the "shrink" layout."""

    def __init__(self, config: GPT2Config, block_hidden: int | None = None):
        super().__init__()
        d, k = config.n_embd, config.num_senses
        act = config.activation_function
        self.backpack = bp = nn.Module()
        bp.gpt2_model = GPT2Model(config)
        bp.word_embeddings, bp.position_embeddings = bp.gpt2_model.wte, bp.gpt2_model.wpe
        bp.sense_network = sn = nn.Module()
        sn.ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        sn.block = nn.Module()
        sn.block.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        sn.block.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        sn.block.mlp = RefMLP(d, block_hidden or 4 * d, d, act)
        sn.final_mlp = RefMLP(d, config.sense_intermediate_scale * d, k * d, act)
        bp.sense_weight_net = nn.Module()
        bp.sense_weight_net.c_attn = nn.Linear(d, 2 * d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = bp.gpt2_model.wte.weight
        self.d, self.k = d, k

    def forward(self, idx):
        """(logits (B, T, V), contextualization (B, k, T, T))."""
        bp, sn, d, k = self.backpack, self.backpack.sense_network, self.d, self.k
        B, T = idx.shape
        # sense vectors (spec 1.4): the embedding alone, no positions
        e = bp.word_embeddings(idx)
        r1 = e + sn.ln(e)  # the identity "mixer" of the no-mix block
        r2 = r1 + sn.block.mlp(sn.block.ln_1(r1))
        senses = sn.final_mlp(sn.block.ln_2(r2)).reshape(B, T, k, d)
        # sense weights (spec 1.5) from the GPT-2 trunk's output, after ln_f
        h = bp.gpt2_model(idx).last_hidden_state
        q, key = bp.sense_weight_net.c_attn(h).split(d, dim=-1)
        q, key = q.reshape(B, T, k, d // k), key.reshape(B, T, k, d // k)
        scores = torch.einsum("bilh,bjlh->blij", q, key) / math.sqrt(d // k)
        alpha = (scores + torch.full((T, T), -10000.0).triu(1)).softmax(dim=-1)
        # o_i = sum_l sum_j alpha[l, i, j] C(x_j)_l (spec 1.6), tied head
        out = torch.einsum("blij,bjld->bid", alpha, senses)
        return self.lm_head(out), alpha


def backpack_config(n_layer=2, n_head=2, n_embd=32, num_senses=4, sense_intermediate_scale=4, vocab_size=97,
                    n_positions=24) -> dict:
    """config.json as published (GPT2Config fields plus the two Backpack ones, remote-code pointers)."""
    return dict(architectures=["BackpackGPT2LMHeadModel"], model_type="gpt2",
                auto_map={"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
                          "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"},
                n_layer=n_layer, n_head=n_head, n_embd=n_embd, num_senses=num_senses,
                sense_intermediate_scale=sense_intermediate_scale, vocab_size=vocab_size, n_positions=n_positions,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_by_inverse_layer_idx=True,
                scale_attn_weights=True, reorder_and_upcast_attn=False, attn_pdrop=0.1, embd_pdrop=0.1,
                resid_pdrop=0.1, initializer_range=0.02, bos_token_id=None, eos_token_id=None)


def save_ref_backpack(folder, config: dict, fmt="safetensors", tied_copies=False, seed=0, block_hidden=None):
    """A perturbed RefBackpackLM saved like the published model: config.json + weights. The .bin holds
    every tied copy (torch.save keeps the shared storage once) and the causal-mask buffers older
    transformers saved; the .safetensors holds each tensor once, as safetensors requires."""
    ref = perturb_(RefBackpackLM(GPT2Config(**config), block_hidden), seed).eval()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    state = ref.state_dict()
    if not tied_copies:
        for copy in ("lm_head.weight", "backpack.word_embeddings.weight", "backpack.position_embeddings.weight"):
            del state[copy]
    if fmt == "bin":
        for i in range(config["n_layer"]):
            state[f"backpack.gpt2_model.h.{i}.attn.bias"] = torch.ones(1, 1, 4, 4).tril()
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    else:
        save_file({k: v.clone() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})
    return ref


BACKPACK_CASES = [
    dict(config=backpack_config(), fmt="safetensors", tied_copies=False),
    dict(config=backpack_config(n_layer=3, n_head=4, n_embd=48, num_senses=16, vocab_size=131, n_positions=16),
         fmt="bin", tied_copies=True),
    # the published layout: 50264 tokens, 512 positions
    dict(config=backpack_config(n_layer=1, n_head=1, n_embd=16, num_senses=1, vocab_size=50264, n_positions=512),
         fmt="safetensors", tied_copies=True),
]


@pytest.mark.parametrize("case", BACKPACK_CASES, ids=["2x32-k4-st", "3x48-k16-bin", "1x16-k1-50264x512"])
def test_backpack_matches_reference(tmp_path, case):
    ref = save_ref_backpack(tmp_path, case["config"], case["fmt"], case["tied_copies"])
    model = Backpack.from_pretrained(str(tmp_path)).eval()
    c = case["config"]
    assert (model.config.n_senses, model.config.block_size, model.config.vocab_size) == \
        (c["num_senses"], c["n_positions"], c["vocab_size"])
    x = ids(c["vocab_size"], min(c["n_positions"], 24))
    with torch.no_grad():
        ref_logits, ref_alpha = ref(x)
        assert max_diff(model(x)[0], ref_logits) < 1e-4
        assert max_diff(model.contextualization(x), ref_alpha) < 1e-5
        model.crop_block_size(8)  # e.g. finetuning on shorter contexts
        assert max_diff(model(x[:, :8])[0], ref(x[:, :8])[0]) < 1e-4


def test_backpack_shrink_layout(tmp_path):
    """I = d in both sense MLPs (the shrink and ablation models): beyond the HF code, but loadable here."""
    ref = save_ref_backpack(tmp_path, backpack_config(sense_intermediate_scale=1), block_hidden=32)
    model = Backpack.from_pretrained(str(tmp_path)).eval()
    x = ids(97, 24)
    with torch.no_grad():
        assert max_diff(model(x)[0], ref(x)[0]) < 1e-4


def _drop(state, key):
    del state[key]


def _add(state, key):
    state["backpack.extra.weight"] = torch.zeros(3)


def _untie(state, key):
    state["lm_head.weight"] = state["backpack.gpt2_model.wte.weight"] + 1


def _reshape(state, key):
    state["backpack.sense_weight_net.c_attn.weight"] = torch.zeros(64, 16)


@pytest.mark.parametrize("edit, message", [
    (_drop, "missing.*backpack.sense_network.block.ln_2.bias"),
    (_add, "unexpected.*backpack.extra.weight"),
    (_untie, "lm_head.weight differs"),
    (_reshape, r"c_attn.weight has shape \(64, 16\), but the config implies \(64, 32\)"),
])
def test_backpack_bad_weights_are_named(tmp_path, edit, message):
    save_ref_backpack(tmp_path, backpack_config(), fmt="bin", tied_copies=True)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    edit(state, "backpack.sense_network.block.ln_2.bias")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=message):
        Backpack.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (dict(sense_intermediate_scale=2), "sense_intermediate_scale \\* n_embd"),  # HF's 4d block, 2d final MLP
    (dict(activation_function="relu"), "activation_function"),
    (dict(num_senses=5), "divisible"),
])
def test_backpack_unsupported_config(tmp_path, change, message):
    save_ref_backpack(tmp_path, backpack_config())
    config = dict(json.loads((tmp_path / "config.json").read_text()), **change)
    if "sense_intermediate_scale" in change:  # re-save weights whose final MLP matches that config
        save_ref_backpack(tmp_path, config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        Backpack.from_pretrained(str(tmp_path))


def test_wrong_model_class_is_named(tmp_path):
    save_ref_backpack(tmp_path / "bp", backpack_config())
    tiny_gpt2(tmp_path / "g")
    with pytest.raises(UserError, match="holds a backpack model"):
        GPT.from_pretrained(str(tmp_path / "bp"))
    with pytest.raises(UserError, match="holds a gpt model"):
        Backpack.from_pretrained(str(tmp_path / "g"))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        Backpack.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(backpack_config()))
    with pytest.raises(UserError, match="holds none of model.safetensors"):
        Backpack.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# hub names: only their mapping to repo ids (no network)


def test_hub_aliases_map_to_repo_ids(tmp_path, monkeypatch):
    assert hf.BACKPACK_LAYOUT.repos == {"backpack-small": "stanfordnlp/backpack-gpt2",
                                       "backpack-gpt2": "stanfordnlp/backpack-gpt2"}
    gpt2_names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    assert hf.GPT2_LAYOUT.repos == {name: f"openai-community/{name}" for name in gpt2_names}
    for name in gpt2_names:
        assert hf.identify(name) == ("gpt", {"kind": "gpt2"})
    for name in ("backpack-small", "backpack-gpt2", "stanfordnlp/backpack-gpt2"):
        assert hf.identify(name) == ("backpack", {"kind": "gpt2"})
    with pytest.raises(UserError, match="neither a local directory nor one of gpt2"):
        hf.identify("gpt3")

    save_ref_backpack(tmp_path / "bp", backpack_config())
    tiny_gpt2(tmp_path / "g")
    fetched = []

    def fake_download(repo_id):
        fetched.append(repo_id)
        return str(tmp_path / ("bp" if "backpack" in repo_id else "g"))
    monkeypatch.setattr(hf, "_download", fake_download)
    assert isinstance(Backpack.from_pretrained("backpack-small"), Backpack)
    assert type(GPT.from_pretrained("gpt2-xl")) is GPT
    model, spec = load_pretrained("backpack-gpt2", dropout=0.1)
    assert isinstance(model, Backpack) and model.config.dropout == 0.1 and spec == {"kind": "gpt2"}
    assert fetched == ["stanfordnlp/backpack-gpt2", "openai-community/gpt2-xl", "stanfordnlp/backpack-gpt2"]
    with pytest.raises(UserError, match="neither a local directory nor one of backpack-small"):
        Backpack.from_pretrained("gpt2")  # a GPT-2 name is no Backpack


def test_download_fetches_no_code_and_fails_in_one_line(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    monkeypatch.setattr(hf, "_download", REAL_DOWNLOAD)  # the real one, over a fake hub client
    requested = []

    def fake_hub(repo_id, filename):
        requested.append(filename)
        if filename != "config.json" and filename != "pytorch_model.bin":
            raise EntryNotFoundError(filename)
        return str(tmp_path / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub)
    assert hf._download("stanfordnlp/backpack-gpt2") == str(tmp_path)
    assert requested == ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]

    def offline_hub(repo_id, filename):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore details")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_hub)
    with pytest.raises(UserError, match="could not download stanfordnlp/backpack-gpt2 .*local directory"):
        hf._download("stanfordnlp/backpack-gpt2")


# -----------------------------------------------------------------------------
# export: a GPT into transformers, a Backpack into the published layout


@pytest.mark.parametrize("args", [
    dict(bias=True, vocab_size=101),
    dict(bias=False, vocab_size=128, scale_attn_by_inverse_layer_idx=True),  # zero biases, padded vocab
])
def test_export_gpt_loads_in_transformers(tmp_path, args):
    model = perturb_(build_model("gpt", n_layer=2, n_head=2, n_embd=32, block_size=24, **args), 0).eval()
    model.save_pretrained(str(tmp_path), {"kind": "gpt2"})
    theirs = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    back = GPT.from_pretrained(str(tmp_path)).eval()
    x = ids(args["vocab_size"], 24)
    with torch.no_grad():
        assert max_diff(theirs(x).logits, model(x)[0]) < 1e-4
        assert max_diff(back(x)[0], model(x)[0]) < 1e-5


@pytest.mark.parametrize("scale", [4, 1])
def test_export_backpack_round_trip(tmp_path, scale):
    model = perturb_(build_model("backpack", n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=97,
                                 n_senses=4, sense_intermediate_scale=scale), 0).eval()
    model.save_pretrained(str(tmp_path), {"kind": "gpt2"})
    back = Backpack.from_pretrained(str(tmp_path)).eval()
    # the export is also what the reference HF-layout model expects (tied copies may be absent)
    config = json.loads((tmp_path / "config.json").read_text())
    ref = RefBackpackLM(GPT2Config(**config), block_hidden=scale * 32).eval()
    from safetensors.torch import load_file
    missing, unexpected = ref.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert set(missing) == {"lm_head.weight", "backpack.word_embeddings.weight",
                            "backpack.position_embeddings.weight"} and not unexpected
    x = ids(97, 24)
    with torch.no_grad():
        assert max_diff(back(x)[0], model(x)[0]) < 1e-5
        assert max_diff(ref(x)[0], model(x)[0]) < 1e-4
        assert max_diff(ref(x)[1], model.contextualization(x)) < 1e-5


def test_export_script_cli(tmp_path):
    """export_hf.py from the command line; the char tokenizer travels in config.json."""
    model = perturb_(build_model("backpack", n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=5,
                                 n_senses=2), 0)
    spec = {"kind": "char", "itos": list("abcd\n")}
    os.makedirs(tmp_path / "out")
    save_checkpoint(checkpoint_dict(model, spec), str(tmp_path / "out" / "ckpt.pt"))
    result = subprocess.run([sys.executable, "export_hf.py", f"--out_dir={tmp_path / 'out'}",
                             f"--export_dir={tmp_path / 'hf'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "exported backpack" in result.stdout and "max |logits diff| 0.00e+00" in result.stdout
    back, back_spec = load_pretrained(str(tmp_path / "hf"))
    assert isinstance(back, Backpack) and back_spec == spec


# -----------------------------------------------------------------------------
# the official flash-attn checkpoints (names in docs/architecture.md 5), against the math


def flash_state_dict(n_layer=2, d=32, vocab_size=64, positions=16, n_senses=4, hidden=None, seed=0, std=0.2):
    """A random state dict with the names of backpacks-flash-attn (n_senses=None: a Transformer
    baseline), tied copies included as the shared modules list them: the LM head, and in a Backpack the
    trunk's embedding module twice more, as the sense network's and as its own `transformer.embeddings`."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def ln(name):
        state[name + ".weight"] = 1 + std * torch.randn(d, generator=g)
        state[name + ".bias"] = std * torch.randn(d, generator=g)

    def linear(name, n_in, n_out):  # nn.Linear: (out, in)
        state[name + ".weight"] = std * torch.randn(n_out, n_in, generator=g)
        state[name + ".bias"] = std * torch.randn(n_out, generator=g)

    trunk = "transformer.gpt2_model." if n_senses else "transformer."
    wte = state[trunk + "embeddings.word_embeddings.weight"] = std * torch.randn(vocab_size, d, generator=g)
    wpe = state[trunk + "embeddings.position_embeddings.weight"] = std * torch.randn(positions, d, generator=g)
    ln(trunk + "ln_0")
    for i in range(n_layer):
        layer = f"{trunk}layers.{i}."
        linear(layer + "mixer.Wqkv", d, 3 * d)
        linear(layer + "mixer.out_proj", d, d)
        ln(layer + "norm1")
        linear(layer + "mlp.fc1", d, 4 * d)
        linear(layer + "mlp.fc2", 4 * d, d)
        ln(layer + "norm2")
    state["lm_head.weight"] = wte
    if n_senses:
        c, hidden = "transformer.content_model.", hidden or 4 * d
        for module in (c, "transformer."):
            state[module + "embeddings.word_embeddings.weight"] = wte
            state[module + "embeddings.position_embeddings.weight"] = wpe
        ln(c + "ln_0")
        ln(c + "layers.0.norm1")
        ln(c + "layers.0.norm2")
        linear(c + "layers.0.mlp.fc1", d, hidden)
        linear(c + "layers.0.mlp.fc2", hidden, d)
        linear(c + "final_mlp.fc1", d, hidden)
        linear(c + "final_mlp.fc2", hidden, n_senses * d)
        linear("transformer.contextualization_attn.Wqkv", d, 2 * d)
    return state


def flash_logits(state, idx, n_head, n_senses=None):
    """The math of docs/architecture.md 2 on the flash state dict, its trunk in "Add -> LN" form."""
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], 1e-5)

    def linear(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def mlp(x, name):
        return linear(F.gelu(linear(x, name + ".fc1"), approximate="tanh"), name + ".fc2")

    trunk = "transformer.gpt2_model." if n_senses else "transformer."
    B, T = idx.shape
    wte = state[trunk + "embeddings.word_embeddings.weight"]
    d = wte.shape[1]
    residual = wte[idx] + state[trunk + "embeddings.position_embeddings.weight"][:T]
    h = ln(residual, trunk + "ln_0")
    n_layer = sum(k.startswith(trunk + "layers.") and k.endswith(".mixer.Wqkv.weight") for k in state)
    for i in range(n_layer):
        layer = f"{trunk}layers.{i}."
        qkv = linear(h, layer + "mixer.Wqkv").split(d, -1)
        q, k, v = (t.reshape(B, T, n_head, d // n_head).transpose(1, 2) for t in qkv)  # (B, nh, T, hs)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // n_head) / (i + 1)  # the 1/(layer+1) trick
        y = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1) @ v
        residual = residual + linear(y.transpose(1, 2).reshape(B, T, d), layer + "mixer.out_proj")
        h = ln(residual, layer + "norm1")
        residual = residual + mlp(h, layer + "mlp")
        h = ln(residual, layer + "norm2")
    if not n_senses:
        return h @ wte.T
    c, e = "transformer.content_model.", wte[idx]
    r1 = e + ln(e, c + "ln_0")
    r2 = r1 + mlp(ln(r1, c + "layers.0.norm1"), c + "layers.0.mlp")
    senses = mlp(ln(r2, c + "layers.0.norm2"), c + "final_mlp").reshape(B, T, n_senses, d)
    qk = linear(h, "transformer.contextualization_attn.Wqkv").split(d, -1)
    q, k = (t.reshape(B, T, n_senses, d // n_senses) for t in qk)  # (B, T, k, d/k)
    scores = torch.einsum("bilh,bjlh->blij", q, k) / math.sqrt(d // n_senses)
    alpha = (scores + torch.full((T, T), -10000.0).triu(1)).softmax(-1)
    return torch.einsum("blij,bjld->bid", alpha, senses) @ wte.T


# Lightning pickles the Hydra config as omegaconf objects. These classes pickle the way omegaconf's do
# (a container's state holds _metadata, _parent and _content; a node's holds _val), under omegaconf's
# module names; the modules exist only while a fixture is saved, so loading cannot import them.

class _Metadata:
    def __init__(self, key=None, object_type=None):
        self.ref_type, self.object_type, self.optional, self.key = typing.Any, object_type, True, key
        self.flags, self.flags_root, self.resolver_cache = {}, False, collections.defaultdict(dict)


class _AnyNode:
    def __init__(self, value, key, parent):
        self._metadata, self._parent, self._val = _Metadata(key), parent, value


class _DictConfig:
    def __init__(self, content: dict, key=None, parent=None):
        self._metadata, self._parent, self._flags_cache = _Metadata(key, dict), parent, None
        self._content = {k: (_DictConfig(v, k, self) if isinstance(v, dict) else _AnyNode(v, k, self))
                         for k, v in content.items()}

    def __getstate__(self):
        return {"_metadata": self._metadata, "_parent": self._parent, "_content": self._content,
                "_flags_cache": self._flags_cache}


class _RunsCode:
    """An object whose unpickling would create a file, if anything ran it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@contextlib.contextmanager
def fake_omegaconf():
    names = {"omegaconf": {}, "omegaconf.base": {"Metadata": _Metadata, "ContainerMetadata": _Metadata},
             "omegaconf.nodes": {"AnyNode": _AnyNode}, "omegaconf.dictconfig": {"DictConfig": _DictConfig}}
    saved = {cls: (cls.__module__, cls.__qualname__) for cls in (_Metadata, _AnyNode, _DictConfig)}
    modules = {name: types.ModuleType(name) for name in names}
    try:
        for name, classes in names.items():
            for attr, cls in classes.items():
                cls.__module__, cls.__qualname__ = name, attr
                setattr(modules[name], attr, cls)
            sys.modules[name] = modules[name]
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        for cls, (module, qualname) in saved.items():
            cls.__module__, cls.__qualname__ = module, qualname


def save_lightning(path, state, model_config: dict | None = None, trap: str | None = None):
    """A checkpoint as the official code's Trainer.save_checkpoint writes it: the network under
    `model.`, the torchmetrics token counters beside it, optimizer, scheduler, AMP, loop and callback
    states, and the Hydra config (model sizes under model.config) as omegaconf objects."""
    state_dict = {"model." + k: v for k, v in state.items()}
    for split in ("train", "val", "test"):
        state_dict[f"{split}_metrics.num-tokens.count"] = torch.tensor(524288000, dtype=torch.int64)
    cfg = {"datamodule": {"max_length": 16, "batch_size": 128},
           "model": {"_target_": "src.models.backpack.BackpackLMHeadModel",
                     "config": {"_target_": "src.models.backpack.BackpackConfig", "n_positions": "${datamodule.max_length}",
                                "reorder_and_upcast_attn": False, **(model_config or {})}},
           "train": {"optimizer": {"_target_": "apex.optimizers.FusedAdam", "lr": 6e-4, "weight_decay": 0.1}}}
    ckpt = {
        "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.8.1", "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1000},
                               "epoch_loop.batch_progress": {"total": {"ready": 2000, "completed": 2000}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(3.31), "dirpath": "checkpoints/backpack-micro-flash-fp16"}},
        "optimizer_states": [{"state": {i: {"exp_avg": torch.randn(4), "exp_avg_sq": torch.rand(4),
                                            "step": torch.tensor(1000.0)} for i in range(3)},
                              "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.999), "params": [0, 1, 2]}]}],
        "lr_schedulers": [{"base_lrs": [6e-4], "last_epoch": 1000, "_step_count": 1001, "lr_lambdas": [None]}],
        "native_amp_scaling_state": {"scale": 32768.0, "growth_factor": 2.0, "_growth_tracker": 117},
        "hparams_name": "cfg",
    }
    with fake_omegaconf():
        ckpt["hyper_parameters"], ckpt["hparams_type"] = _DictConfig(cfg), _DictConfig
        if trap:
            ckpt["hyper_parameters"]._content["trap"] = _RunsCode(trap)
        torch.save(ckpt, path)


@pytest.mark.parametrize("case", [
    dict(n_layer=2, d=32, n_head=2, n_senses=4, hidden=128, vocab=50264, how="hparams"),  # micro/mini/small: I = 4d
    dict(n_layer=1, d=40, n_head=5, n_senses=1, hidden=40, vocab=64, how="flag"),  # sense-count ablation: I = d
    dict(n_layer=2, d=32, n_head=4, n_senses=None, hidden=None, vocab=64, how="hparams"),  # a Transformer baseline
    dict(n_layer=1, d=16, n_head=4, n_senses=2, hidden=64, vocab=56, how="plain"),  # a bare state dict, sizes table
], ids=["backpack-50264", "ablation-k1-shrink", "gpt-baseline", "plain-state-dict"])
def test_convert_official_checkpoint(tmp_path, request, monkeypatch, case):
    """A .ckpt written like the official training code's converts with no flag (its hyper-parameters
    are omegaconf objects of modules that are not installed) and gives the official model's logits on
    the tokenizer's ids; the published vocabulary of 50264 rows is cut to GPT-2's 50257."""
    if case["vocab"] > 50257:
        request.getfixturevalue("gpt2_bpe")  # the export then writes GPT-2's tokenizer files
    monkeypatch.setattr(convert_flash_ckpt, "HEADS_BY_WIDTH", {16: 4})
    state = flash_state_dict(n_layer=case["n_layer"], d=case["d"], n_senses=case["n_senses"], hidden=case["hidden"],
                             vocab_size=case["vocab"])
    path = tmp_path / "x.ckpt"
    if case["how"] == "plain":
        torch.save(state, path)
    else:
        save_lightning(path, state, {"n_head": case["n_head"]} if case["how"] == "hparams" else {})
        with pytest.raises(pickle.UnpicklingError):  # what the converter used to refuse
            torch.load(path, weights_only=True)
    cfg = convert_flash_ckpt.ConvertConfig(ckpt=str(path), export_dir=str(tmp_path / "hf"),
                                           n_head=case["n_head"] if case["how"] == "flag" else 0)
    convert_flash_ckpt.main(cfg)
    assert "omegaconf" not in sys.modules  # nothing was imported for it
    model, _ = load_pretrained(str(tmp_path / "hf"), model_type="backpack" if case["n_senses"] else "gpt")
    vocab = min(case["vocab"], 50257)
    assert model.config.n_head == case["n_head"] and model.config.block_size == 16 and model.config.vocab_size == vocab
    assert model.config.scale_attn_by_inverse_layer_idx
    x = ids(vocab, 16)
    with torch.no_grad():
        official = flash_logits(state, x, case["n_head"], case["n_senses"])[..., :vocab]
        assert max_diff(model.eval()(x)[0], official) < 1e-4
    if case["vocab"] > 50257:  # and transformers builds it as a Backpack, with the same logits
        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
        with torch.no_grad():
            assert max_diff(theirs(x).logits, official) < 1e-4


def test_converter_runs_no_pickled_code(tmp_path):
    marker = tmp_path / "ran"
    save_lightning(tmp_path / "x.ckpt", flash_state_dict(), {"n_head": 2}, trap=str(marker))
    convert_flash_ckpt.main(convert_flash_ckpt.ConvertConfig(ckpt=str(tmp_path / "x.ckpt"), export_dir=str(tmp_path / "hf")))
    assert not marker.exists()
    # globals from the modules torch never unpickles (os, sys) still stop the conversion, in one line
    torch.save({"state_dict": flash_state_dict(), "hyper_parameters": _Shell()}, tmp_path / "y.ckpt")
    with pytest.raises(UserError, match=r"y.ckpt is not a loadable checkpoint \(unpickling it would call posix.system"):
        convert_flash_ckpt.main(convert_flash_ckpt.ConvertConfig(ckpt=str(tmp_path / "y.ckpt"), export_dir=str(tmp_path / "hf")))


class _Shell:
    def __reduce__(self):
        return os.system, ("true",)


def test_converter_hyper_parameters_are_plain_data(tmp_path):
    save_lightning(tmp_path / "x.ckpt", flash_state_dict(), {"n_head": 2, "num_content_vectors": 4})
    state, hparams = convert_flash_ckpt.read_checkpoint(str(tmp_path / "x.ckpt"))
    assert hparams["model"]["config"]["n_head"] == 2 and hparams["datamodule"]["max_length"] == 16
    assert hparams["model"]["config"]["n_positions"] == "${datamodule.max_length}"  # interpolations stay text
    # only the network: no metric counters, and Lightning's `model.` prefix is gone
    assert set(state) == set(flash_state_dict()) and not any("metrics" in k for k in state)


@pytest.mark.parametrize("flag, hparams, table, expected", [
    (4, 2, 8, 4),  # an explicit --n_head wins
    (0, 2, 8, 2),  # else the checkpoint's hyper-parameters
    (0, None, 8, 8),  # else the official model of that width
    (0, None, None, "cannot tell n_head for width 32"),
])
def test_converter_n_head_precedence(tmp_path, monkeypatch, flag, hparams, table, expected):
    monkeypatch.setattr(convert_flash_ckpt, "HEADS_BY_WIDTH", {32: table} if table else {})
    save_lightning(tmp_path / "x.ckpt", flash_state_dict(), {"n_head": hparams} if hparams else {})
    cfg = convert_flash_ckpt.ConvertConfig(ckpt=str(tmp_path / "x.ckpt"), n_head=flag)
    state, found = convert_flash_ckpt.read_checkpoint(cfg.ckpt)
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            convert_flash_ckpt.convert(state, found, cfg, cfg.ckpt)
    else:
        assert convert_flash_ckpt.convert(state, found, cfg, cfg.ckpt)[1].config.n_head == expected


def _bad_ckpt_unexpected(state):
    state["transformer.content_model.layers.1.norm1.weight"] = torch.ones(32)


def _bad_ckpt_missing(state):
    del state["transformer.gpt2_model.layers.1.mlp.fc2.bias"]


def _bad_ckpt_block_width(state):  # block MLP 4d but final MLP d: not one model of ours
    state["transformer.content_model.final_mlp.fc1.weight"] = torch.zeros(32, 32)
    state["transformer.content_model.final_mlp.fc1.bias"] = torch.zeros(32)
    state["transformer.content_model.final_mlp.fc2.weight"] = torch.zeros(128, 32)


def _bad_ckpt_untied_third_copy(state):
    state["transformer.embeddings.word_embeddings.weight"] = state["lm_head.weight"] + 1


@pytest.mark.parametrize("edit, message", [
    (_bad_ckpt_unexpected, "unexpected.*content_model.layers.1.norm1.weight"),
    (_bad_ckpt_missing, "missing.*layers.1.mlp.fc2.bias"),
    (_bad_ckpt_block_width, r"layers.0.mlp.fc1.weight has shape \(128, 32\), but the config implies \(32, 32\)"),
    (_bad_ckpt_untied_third_copy, "transformer.embeddings.word_embeddings.weight differs from "
                                  "transformer.gpt2_model.embeddings.word_embeddings.weight"),
])
def test_convert_flash_checkpoint_errors(tmp_path, edit, message):
    state = flash_state_dict()
    edit(state)
    save_lightning(tmp_path / "x.ckpt", state, {"n_head": 2})
    cfg = convert_flash_ckpt.ConvertConfig(ckpt=str(tmp_path / "x.ckpt"), export_dir=str(tmp_path / "hf"))
    with pytest.raises(UserError, match=message):
        convert_flash_ckpt.main(cfg)


# -----------------------------------------------------------------------------
# train.py and sample.py --init_from a local directory


def test_train_and_sample_init_from_local_dir(tmp_path, capsys, gpt2_bpe):
    # GPT-2 BPE ids need the full 50257-row vocabulary; the rest of the model is tiny
    save_ref_backpack(tmp_path / "hf", backpack_config(n_layer=1, n_head=2, n_embd=16, num_senses=2,
                                                       vocab_size=50264, n_positions=32))
    data = tmp_path / "data"
    os.makedirs(data)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 2000).astype(np.uint16).tofile(data / f"{split}.bin")
    common = dict(init_from=str(tmp_path / "hf"), data_dir=str(data), out_dir=str(tmp_path / "out"), device="cpu",
                  dtype="float32", compile=False, batch_size=2, block_size=16, gradient_accumulation_steps=1,
                  max_iters=2, eval_interval=2, eval_iters=1, learning_rate=1e-4, decay_lr=False)
    with pytest.raises(UserError, match="pass --model_type=backpack"):
        train.main(train.TrainConfig(**common, model_type="gpt"))
    train.main(train.TrainConfig(**common, model_type="backpack"))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_type"] == "backpack" and ckpt["tokenizer"] == {"kind": "gpt2"}
    assert ckpt["model_args"]["block_size"] == 16 and ckpt["iter_num"] == 2  # cropped from 32

    capsys.readouterr()
    sample.main(sample.SampleConfig(init_from=str(tmp_path / "hf"), start="Hello world", num_samples=1,
                                    max_new_tokens=4, device="cpu", dtype="float32"))
    assert capsys.readouterr().out.startswith("Hello world")
