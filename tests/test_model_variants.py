"""The Backpack's opt-in departures from the paper (BackpackConfig.sense_norm, sense_base_residual,
alpha_dropout, scale_alpha): off, the model is the paper's bit for bit and keeps the published layout;
on, each computes what its comment says, every fast path still equals the straightforward one, they
train through train.py, survive resume and generation, and export to transformers. (Compiling them:
tests/test_model.py, test_logit_space_mixing_compiles_without_graph_breaks.)"""

import math

import pytest
import torch
import torch.nn.functional as F

import hf
from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError
from generate import generate
from model import VARIANT_FIELDS, Backpack, BackpackConfig, build_model
from test_model import grads, perturb_, reference_alpha, reference_senses, tiny
from test_train import char_data, tiny_cfg  # noqa: F401 (char_data is a fixture)
from train import main

V, T = 101, 12
NANOBACKPACK = dict(sense_norm="ln_concat", sense_base_residual="block", scale_alpha=False)
VARIANTS = [dict(sense_norm="rms"), dict(sense_norm="ln"), dict(sense_norm="ln_concat"),
            dict(sense_base_residual="embedding"), dict(sense_base_residual="block"), dict(scale_alpha=False),
            dict(sense_norm="rms", sense_base_residual="block", alpha_dropout=0.2), NANOBACKPACK]


def assert_same(out, g, out_ref, g_ref):
    """Equal up to float rounding, relative to each tensor's size: a sense norm makes gradients ~100."""
    assert g.keys() == g_ref.keys()
    for name, a, b in [("logits", out, out_ref), *((n, g[n], g_ref[n]) for n in g)]:
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), name


def ids(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def test_defaults_are_the_paper():
    config = BackpackConfig()
    assert config.departures() == {}
    assert (config.sense_norm, config.sense_base_residual, config.alpha_dropout, config.scale_alpha) == \
        ("none", "none", 0.0, True)
    paper_keys = set(tiny("backpack").state_dict())
    assert not any("norm_weight" in key or "ln_senses" in key for key in paper_keys)  # no new parameter
    for variant in VARIANTS:
        model = tiny("backpack", **variant)
        assert model.config.departures() == variant
        extra = set(model.state_dict()) - paper_keys
        expected = {"sense_network.norm_weight"} if variant.get("sense_norm") in ("rms", "ln") else \
            {"sense_network.ln_senses.weight", "sense_network.ln_senses.bias"} if "sense_norm" in variant else set()
        assert extra == expected, variant


@pytest.mark.parametrize("key, value, message", [
    ("sense_norm", "layer", "unknown sense_norm='layer'; choose one of none, rms, ln, ln_concat"),
    ("sense_base_residual", "wte", "unknown sense_base_residual='wte'; choose one of none, embedding, block"),
    ("alpha_dropout", 1.0, "alpha_dropout must be in [0, 1) (got 1.0)")])
def test_bad_values_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_model("backpack", **{key: value})


def reference_variant_senses(model: Backpack, ids):
    """reference_senses of the paper, then each departure written out for one sense at a time."""
    cfg, sn = model.config, model.sense_network
    k, d = cfg.n_senses, cfg.n_embd
    out = []
    for i, paper in zip(ids.tolist(), reference_senses(model, ids)):
        s = paper
        if cfg.sense_base_residual == "embedding":
            s = s + model.transformer.wte.weight[i]
        elif cfg.sense_base_residual == "block":  # the final MLP's input: LN_2 of the no-mix block's output
            e = model.transformer.wte.weight[i]
            r1 = e + F.layer_norm(e, (d,), sn.ln_0.weight, sn.ln_0.bias)
            r2 = r1 + sn.mlp(F.layer_norm(r1, (d,), sn.ln_1.weight, sn.ln_1.bias))
            s = s + F.layer_norm(r2, (d,), sn.ln_2.weight, sn.ln_2.bias)
        if cfg.sense_norm == "ln_concat":  # one LayerNorm over the k*d numbers, after the residual
            flat = s.reshape(-1)
            flat = (flat - flat.mean()) / torch.sqrt(flat.var(unbiased=False) + 1e-5) * sn.ln_senses.weight + sn.ln_senses.bias
            s = flat.view(k, d)
        rows = []
        for l in range(k):
            v = s[l]
            if cfg.sense_norm == "rms":
                v = v / torch.sqrt((v * v).mean() + 1e-5) * sn.norm_weight[l * d:(l + 1) * d]
            elif cfg.sense_norm == "ln":
                v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5) * sn.norm_weight[l * d:(l + 1) * d]
            rows.append(v)
        out.append(torch.stack(rows))
    return torch.stack(out)  # (N, k, d)


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_variant_equals_its_slow_formula(variant):
    model = perturb_(tiny("backpack", **variant)).eval()
    idx = torch.tensor([[3, 7, 3, 0, 99, 7, 7, 12], [5, 5, 5, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        senses = reference_variant_senses(model, torch.arange(V))
        alpha = reference_alpha(model, idx) if model.config.scale_alpha else reference_alpha_unscaled(model, idx)
        logits, _ = model(idx)
        E = model.transformer.wte.weight
        o = torch.einsum("blij,bjld->bid", alpha, senses[idx])  # eval: alpha dropout is off
        assert torch.allclose(logits, o @ E.T, atol=1e-5)
        assert torch.allclose(model.sense_vectors(torch.arange(V)), senses, atol=1e-5)
        assert torch.allclose(model.contextualization(idx), alpha, atol=1e-6)


def reference_alpha_unscaled(model, idx):
    """alpha of raw q.k scores: reference_alpha (which divides by s = sqrt(d/k)) with the queries times s."""
    s = math.sqrt(model.config.n_embd // model.config.n_senses)
    with torch.no_grad():
        c_attn = model.sense_weights.c_attn
        saved = c_attn.weight.clone(), c_attn.bias.clone()
        d = model.config.n_embd
        c_attn.weight[:d] *= s
        c_attn.bias[:d] *= s
        try:
            return reference_alpha(model, idx)
        finally:
            c_attn.weight.copy_(saved[0])
            c_attn.bias.copy_(saved[1])


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_fast_paths_equal_the_straightforward_one(variant):
    """Logit-space mixing (V < d on CPU), the unique-id sense network and the d-space mixing that a hook
    selects: same logits and gradients. Alpha dropout draws the same mask on every path."""
    model = perturb_(tiny("backpack", vocab_size=20, **variant)).train()
    idx = torch.randint(0, 20, (3, T), generator=torch.Generator().manual_seed(0))
    w = torch.linspace(-1, 1, 20)
    assert model._mixes_logits(idx)
    torch.manual_seed(5)
    logits, _ = model(idx)
    g = grads(model, (logits * w).sum())
    with model.hooked(lambda ids, senses: senses):
        torch.manual_seed(5)
        hooked, _ = model(idx)
        assert_same(logits, g, hooked, grads(model, (hooked * w).sum()))
    torch.manual_seed(5)
    explicit = model.lm_head(torch.einsum("blij,bjld->bid", model.contextualization(idx), model.senses(idx)))
    assert_same(logits, g, explicit, grads(model, (explicit * w).sum()))


def test_alpha_dropout_only_while_training():
    model = perturb_(tiny("backpack", alpha_dropout=0.5))
    idx = torch.randint(0, V, (2, T))
    model.eval()
    alpha = model.contextualization(idx)
    assert torch.allclose(alpha.sum(-1), torch.ones(2, 4, T), atol=1e-6)
    model.train()
    torch.manual_seed(0)
    dropped = model.contextualization(idx)
    kept = dropped != 0
    assert 0.3 < (~kept & (alpha > 0)).float().sum() / (alpha > 0).float().sum() < 0.7  # about half dropped
    assert torch.allclose(dropped[kept], alpha[kept] * 2, atol=1e-6)  # survivors scaled by 1/(1-p)


@pytest.mark.parametrize("variant", [dict(sense_norm="rms"), NANOBACKPACK], ids=ids)
def test_generation_cache_equals_uncached(variant):
    model = perturb_(tiny("backpack", **variant)).eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    fast = generate(model, prompt, 30, temperature=0, use_cache=True)
    slow = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(fast, slow)


def test_train_and_resume_keep_the_variant(char_data, tmp_path):  # noqa: F811
    cfg = tiny_cfg(char_data, tmp_path, sense_norm="rms", sense_base_residual="block", alpha_dropout=0.1,
                   max_iters=30, lr_decay_iters=30, eval_interval=15)
    main(cfg)
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert {k: ckpt["model_args"][k] for k in VARIANT_FIELDS} == \
        dict(sense_norm="rms", sense_base_residual="block", alpha_dropout=0.1, scale_alpha=True)
    model = model_from_checkpoint(ckpt)
    assert model.config.departures() == dict(sense_norm="rms", sense_base_residual="block", alpha_dropout=0.1)
    main(tiny_cfg(char_data, tmp_path, init_from="resume", max_iters=40, lr_decay_iters=30, eval_interval=15))
    resumed = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert resumed["iter_num"] == 40 and resumed["model_args"] == ckpt["model_args"]


@pytest.mark.parametrize("override, message", [
    (dict(sense_norm="rsm"), "unknown --sense_norm=rsm; did you mean rms?"),
    (dict(alpha_dropout=1.5), "alpha_dropout must be in [0, 1) (got 1.5)")])
def test_train_refuses_bad_values(char_data, tmp_path, override, message):  # noqa: F811
    with pytest.raises(UserError) as e:
        main(tiny_cfg(char_data, tmp_path, **override))
    assert str(e.value).startswith(message)
    assert not (tmp_path / "ckpt.pt").exists()


def test_old_checkpoints_without_the_fields_load_as_the_paper():
    model = tiny("backpack")
    args = {k: v for k, v in vars(model.config).items() if k not in VARIANT_FIELDS}
    assert build_model("backpack", **args).config.departures() == {}


@pytest.mark.parametrize("variant", [dict(sense_norm="rms", alpha_dropout=0.1), NANOBACKPACK,
                                     dict(sense_norm="ln", sense_base_residual="embedding")], ids=ids)
def test_export_round_trips_and_transformers_agrees(tmp_path, variant):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import hf
    from test_export_hf import CHAR_SPEC, perturbed
    model = perturbed("backpack", len(CHAR_SPEC["itos"]), **variant)
    hf.save_pretrained(model, str(tmp_path), CHAR_SPEC)
    x = torch.randint(0, len(CHAR_SPEC["itos"]), (2, 20), generator=torch.Generator().manual_seed(1))
    back = hf.load_pretrained(Backpack, str(tmp_path)).eval()
    assert back.config.departures() == model.config.departures()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    with torch.no_grad():
        ours = model(x)[0]
        assert (back(x)[0] - ours).abs().max().item() < 1e-6
        assert (theirs(x).logits - ours).abs().max().item() < 1e-5


def test_published_config_without_the_fields_is_the_paper(tmp_path):
    """stanfordnlp/backpack-gpt2's config.json has none of the opt-in fields: it loads as the paper."""
    import json

    import hf
    model = tiny("backpack")
    hf.save_pretrained(model, str(tmp_path), {"kind": "char", "itos": [chr(i) for i in range(V)]})
    config = json.loads((tmp_path / "config.json").read_text())
    for key in VARIANT_FIELDS:
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert hf.load_pretrained(Backpack, str(tmp_path)).config.departures() == {}
    config["sense_norm"] = "batch"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unknown sense_norm='batch'"):
        hf.load_pretrained(Backpack, str(tmp_path))
