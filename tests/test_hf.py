"""
hf.py: pretrained weights in and out of the two Hugging Face layouts, GPT-2 and the published Backpack,
hub names, and export.

Offline: tiny random models, every parameter perturbed (LayerNorm ones and zero biases would hide a
mapping mistake), are saved in each format, loaded here, and compared with an independent reference:
transformers' GPT2LMHeadModel for GPT-2; for the Backpack, `RefBackpackLM` below, written for this test in
the layout of stanfordnlp/backpack-gpt2 (transformers' GPT2Model as trunk, Conv1D sense MLPs, spec
sections 1.4-1.6 and 2.2).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import hf  # noqa: E402
from checkpoint import checkpoint_dict, load_pretrained, save_checkpoint  # noqa: E402
from common import UserError  # noqa: E402
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
    model = hf.load_pretrained(GPT, str(tmp_path)).eval()
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
    model = hf.load_pretrained(GPT, str(tmp_path / "old")).eval()
    x = ids(101, 24)
    with torch.no_grad():
        assert max_diff(model(x)[0], ref(x).logits) < 1e-4


def test_gpt2_sharded_safetensors(tmp_path):
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=24, bos_token_id=None,
                        eos_token_id=None)
    ref = perturb_(GPT2LMHeadModel(config), 0).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = hf.load_pretrained(GPT, str(tmp_path)).eval()
    x = ids(101, 24)
    with torch.no_grad():
        assert max_diff(model(x)[0], ref(x).logits) < 1e-4


def test_only_dropout_may_be_overridden(tmp_path):
    tiny_gpt2(tmp_path)
    assert hf.load_pretrained(GPT, str(tmp_path), override_args={"dropout": 0.1}).config.dropout == 0.1
    with pytest.raises(UserError, match="only dropout"):
        hf.load_pretrained(GPT, str(tmp_path), override_args={"n_layer": 1})


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
    model = hf.load_pretrained(Backpack, str(tmp_path)).eval()
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
    model = hf.load_pretrained(Backpack, str(tmp_path)).eval()
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
        hf.load_pretrained(Backpack, str(tmp_path))


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
        hf.load_pretrained(Backpack, str(tmp_path))


def test_wrong_model_class_is_named(tmp_path):
    save_ref_backpack(tmp_path / "bp", backpack_config())
    tiny_gpt2(tmp_path / "g")
    with pytest.raises(UserError, match="holds a backpack model"):
        hf.load_pretrained(GPT, str(tmp_path / "bp"))
    with pytest.raises(UserError, match="holds a gpt model"):
        hf.load_pretrained(Backpack, str(tmp_path / "g"))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        hf.load_pretrained(Backpack, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(backpack_config()))
    with pytest.raises(UserError, match="holds none of model.safetensors"):
        hf.load_pretrained(Backpack, str(tmp_path))


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
    assert isinstance(hf.load_pretrained(Backpack, "backpack-small"), Backpack)
    assert type(hf.load_pretrained(GPT, "gpt2-xl")) is GPT
    model, spec = load_pretrained("backpack-gpt2", dropout=0.1)
    assert isinstance(model, Backpack) and model.config.dropout == 0.1 and spec == {"kind": "gpt2"}
    assert fetched == ["stanfordnlp/backpack-gpt2", "openai-community/gpt2-xl", "stanfordnlp/backpack-gpt2"]
    with pytest.raises(UserError, match="neither a local directory nor one of backpack-small"):
        hf.load_pretrained(Backpack, "gpt2")  # a GPT-2 name is no Backpack


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
    hf.save_pretrained(model, str(tmp_path), {"kind": "gpt2"})
    theirs = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    back = hf.load_pretrained(GPT, str(tmp_path)).eval()
    x = ids(args["vocab_size"], 24)
    with torch.no_grad():
        assert max_diff(theirs(x).logits, model(x)[0]) < 1e-4
        assert max_diff(back(x)[0], model(x)[0]) < 1e-5


@pytest.mark.parametrize("scale", [4, 1])
def test_export_backpack_round_trip(tmp_path, scale):
    model = perturb_(build_model("backpack", n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=97,
                                 n_senses=4, sense_intermediate_scale=scale), 0).eval()
    hf.save_pretrained(model, str(tmp_path), {"kind": "gpt2"})
    back = hf.load_pretrained(Backpack, str(tmp_path)).eval()
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
