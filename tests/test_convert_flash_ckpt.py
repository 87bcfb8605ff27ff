"""
convert_flash_ckpt.py and hf.py's key table for the official backpacks-flash-attn checkpoints: a
Lightning .ckpt (its Hydra config pickled as omegaconf objects) converts to a Hugging Face directory
whose logits are `flash_logits` below, the spec's math evaluated directly on the flash state dict; the
file's pickled code never runs, and every bad checkpoint is one line naming the key.
"""

import collections
import contextlib
import math
import os
import pickle
import sys
import types
import typing

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from transformers import AutoModelForCausalLM  # noqa: E402

import convert_flash_ckpt  # noqa: E402
from checkpoint import load_pretrained  # noqa: E402
from common import UserError  # noqa: E402
from test_hf import ids, max_diff, offline  # noqa: E402,F401  (offline: autouse, no hub access)


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
