"""Contracts of model.py, for both model types: shapes, init, causality, the Backpack formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from generate import generate
from model import GPT, Backpack, build_model

V, T = 101, 12
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=V, dropout=0.0, bias=True)


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    args = dict(TINY, **overrides)
    if model_type == "backpack":
        args.setdefault("n_senses", 4)
    return build_model(model_type, **args)


def perturb_(model):
    """Trained-looking weights: LayerNorm ones and zero biases would hide mistakes in the tests."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=["gpt", "backpack"])
def model_type(request):
    return request.param


def test_shapes_and_loss(model_type):
    model = tiny(model_type)
    idx = torch.randint(0, V, (3, T))
    logits, loss = model(idx)
    assert logits.shape == (3, T, V) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_loss_at_init_is_log_vocab(model_type):
    model = tiny(model_type).eval()
    idx = torch.randint(0, V, (8, T))
    _, loss = model(idx, torch.randint(0, V, (8, T)))
    assert abs(loss.item() - math.log(V)) < 0.05


def test_ignore_index(model_type):
    model = tiny(model_type).eval()
    idx = torch.randint(0, V, (2, T))
    targets = idx.clone()
    targets[:, : T // 2] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, T // 2:].reshape(-1, V), idx[:, T // 2:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_causality(model_type):
    model = perturb_(tiny(model_type)).eval()
    idx = torch.randint(0, V, (2, T))
    t = 5
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 7) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_tied_embedding_and_num_params(model_type):
    model = tiny(model_type)
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params() == total - model.transformer.wpe.weight.numel()
    assert model.get_num_params(non_embedding=False) == total


def test_init_std(model_type):
    model = tiny(model_type, n_embd=256, n_layer=8, n_head=2, vocab_size=2000)
    std_resid = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - std_resid) < 0.15 * std_resid, name
        elif name.endswith("c_fc.weight") or name.endswith("c_attn.weight") or name.endswith("wte.weight"):
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name


def test_optimizer_groups(model_type):
    model = tiny(model_type)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(model.transformer.wte.weight) in no_decay and id(model.transformer.wpe.weight) in no_decay
    assert id(model.transformer.h[0].attn.c_attn.weight) in decay
    assert id(model.transformer.h[0].ln_1.weight) in no_decay
    assert id(model.transformer.h[0].mlp.c_fc.bias) in no_decay
    assert len(decay | no_decay) == len(list(model.parameters()))  # tied matrix counted once
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])


def test_crop_block_size(model_type):
    model = tiny(model_type).eval()
    idx = torch.randint(0, V, (2, 8))
    before, _ = model(idx)
    model.crop_block_size(8)
    after, _ = model(idx)
    assert model.transformer.wpe.weight.shape[0] == 8
    assert torch.allclose(before, after, atol=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, V, (1, 9)))


def test_generate(model_type):
    model = perturb_(tiny(model_type)).eval()
    idx = torch.randint(0, V, (2, 4))
    out = generate(model, idx, 20, temperature=0)  # runs past block_size=16: the context is cropped
    assert out.shape == (2, 24) and torch.equal(out[:, :4], idx)
    logits, _ = model(out[:, :10])
    assert torch.equal(out[:, 10], logits[:, -1].argmax(-1))  # greedy = argmax of the full forward
    torch.manual_seed(0)
    sampled = generate(model, idx, 5, temperature=1.0, top_k=1)  # top_k=1 is greedy too
    assert torch.equal(sampled, out[:, :9])


def test_overfit_one_batch(model_type):
    model = tiny(model_type)
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, V, (4, T + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3


def test_flops_match_a_hand_count(model_type):
    """6 FLOPs per parameter per token, plus attention 12 * L * d * T per token (PaLM); the Backpack's
    sense network counts once per distinct id, and alpha + mixing add 6 * T * d * (1 + k) per token."""
    d, L, k, B = 32, 2, 4, 3
    model = tiny(model_type)
    idx = torch.tensor([[1, 2, 3, 1, 2, 3], [4, 4, 4, 4, 4, 4], [1, 5, 5, 5, 5, 5]])  # 5 distinct ids
    Tn = idx.size(1)
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    trunk = L * block + V * d + 2 * d  # layers, the tied wte/lm_head, ln_f (no position embeddings)
    expected = (6 * trunk + 12 * L * d * Tn) * B * Tn
    if model_type == "backpack":
        sense_net = 3 * 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d) + (4 * d * d + 4 * d) + (4 * d * k * d + k * d)
        sense_weights = 2 * d * d + 2 * d
        expected += 6 * sense_weights * B * Tn + 6 * sense_net * 5 + 6 * Tn * d * (1 + k) * B * Tn
        assert model.get_num_params() == trunk + sense_net + sense_weights
    assert model.flops_per_fwdbwd(idx) == expected
    assert model.estimate_mfu(idx, fwdbwd_per_iter=4, dt=0.5, peak_flops=1e9) == pytest.approx(expected * 4 / 0.5 / 1e9)


# -----------------------------------------------------------------------------
# Backpack: the formula of docs/architecture.md, written out slowly


def reference_senses(model: Backpack, ids):
    """Spec 1.4 step by step from the raw weights, for one token id at a time: (N, k, d)."""
    sn = model.sense_network
    ln = lambda m, x: F.layer_norm(x, (x.shape[-1],), m.weight, m.bias, 1e-5)
    mlp = lambda m, x: m.c_proj(F.gelu(m.c_fc(x), approximate="tanh"))
    out = []
    for i in ids.tolist():
        r0 = model.transformer.wte.weight[i]
        r1 = r0 + ln(sn.ln_0, r0)
        r2 = r1 + mlp(sn.mlp, ln(sn.ln_1, r1))
        s = mlp(sn.final_mlp, ln(sn.ln_2, r2))  # (k*d,)
        out.append(s.view(model.config.n_senses, model.config.n_embd))  # sense-major
    return torch.stack(out)


def reference_alpha(model: Backpack, idx):
    """Spec 1.5 with loops over senses and positions: (B, k, T, T)."""
    h = model.trunk(idx)
    B, n = idx.shape
    k, d = model.config.n_senses, model.config.n_embd
    qk = model.sense_weights.c_attn(h)  # (B, n, 2d)
    alpha = torch.zeros(B, k, n, n)
    for b in range(B):
        for l in range(k):
            q = qk[b, :, l * d // k:(l + 1) * d // k]
            key = qk[b, :, d + l * d // k:d + (l + 1) * d // k]
            for i in range(n):
                scores = torch.stack([q[i] @ key[j] / math.sqrt(d // k) for j in range(i + 1)])
                alpha[b, l, i, : i + 1] = torch.softmax(scores, dim=0)
    return alpha


@pytest.mark.parametrize("n_senses,scale", [(4, 4), (1, 1), (8, 1)])
def test_backpack_equals_slow_formula(n_senses, scale):
    model = perturb_(tiny("backpack", n_senses=n_senses, sense_intermediate_scale=scale)).eval()
    idx = torch.tensor([[3, 7, 3, 0, 99, 7, 7, 12], [5, 5, 5, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        senses = reference_senses(model, torch.arange(V))
        alpha = reference_alpha(model, idx)
        logits, _ = model(idx)
        E = model.transformer.wte.weight
        B, n = idx.shape
        for b in range(B):
            for i in range(n):
                o = sum(alpha[b, l, i, j] * senses[idx[b, j], l] for l in range(n_senses) for j in range(i + 1))
                assert torch.allclose(logits[b, i], E @ o, atol=1e-5)
        assert torch.allclose(model.contextualization(idx), alpha, atol=1e-6)
        assert torch.allclose(model.sense_vectors(torch.arange(V)), senses, atol=1e-6)


def test_alpha_rows_causal_and_stochastic():
    model = perturb_(tiny("backpack")).eval()
    alpha = model.contextualization(torch.randint(0, V, (3, T)))
    assert alpha.shape == (3, 4, T, T)
    assert torch.allclose(alpha.sum(-1), torch.ones(3, 4, T), atol=1e-6)
    assert torch.all(alpha >= 0)
    assert torch.all(alpha.triu(diagonal=1) == 0)


def test_sense_vectors_are_context_free_and_chunked():
    model = perturb_(tiny("backpack")).eval()
    ids = torch.randint(0, V, (50,))
    full = model.sense_vectors(ids)
    assert full.shape == (50, 4, 32)
    assert torch.allclose(model.sense_vectors(ids, chunk_size=7), full, atol=1e-6)
    assert torch.allclose(model.sense_vectors(ids[10:11]), full[10:11], atol=1e-6)  # same id, any company
    assert model.sense_vectors(ids[:0]).shape == (0, 4, 32)


def grads(model, loss) -> dict:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_unique_id_path_matches_per_position_path():
    """The sense network runs once per distinct id unless dropout is active; both give the same
    logits and the same gradients."""
    model = perturb_(tiny("backpack"))
    idx = torch.randint(0, 10, (3, T))  # many repeats
    logits_u, loss_u = model(idx, idx)
    g_u = grads(model, loss_u)
    per_pos = model.sense_network(model.transformer.wte(idx))  # (B, T, k, d)
    assert torch.allclose(model._raw_senses(idx), per_pos, atol=1e-6)
    model.config.dropout = 0.1  # the flag alone switches to the per-position path; modules keep p=0
    model.train()
    assert model._sense_rows(idx) == idx.numel()
    logits_p, loss_p = model(idx, idx)
    g_p = grads(model, loss_p)
    assert torch.allclose(logits_u, logits_p, atol=1e-5)
    assert g_u.keys() == g_p.keys()
    for name in g_u:
        assert torch.allclose(g_u[name], g_p[name], atol=1e-5), name


def test_fused_mixing_equals_explicit_alpha():
    """forward mixes senses with a fused attention (alpha never materialized); logits and gradients
    equal sum_l alpha_l @ senses_l computed from contextualization()."""
    model = perturb_(tiny("backpack"))
    idx = torch.randint(0, V, (2, T))
    logits, _ = model(idx)
    g_fused = grads(model, (logits * torch.linspace(-1, 1, V)).sum())
    alpha = model.contextualization(idx)  # (B, k, T, T)
    explicit = model.lm_head(torch.einsum("blij,bjld->bid", alpha, model.senses(idx)))
    g_explicit = grads(model, (explicit * torch.linspace(-1, 1, V)).sum())
    assert torch.allclose(logits, explicit, atol=1e-5)
    for name in g_fused:
        assert torch.allclose(g_fused[name], g_explicit[name], atol=1e-5), name


def assert_same(out, g, out_ref, g_ref):
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert torch.allclose(g[name], g_ref[name], atol=1e-5), name


def test_logit_space_mixing_equals_explicit_alpha():
    """A vocabulary narrower than the model (character level) mixes each sense's logits, with alpha
    summed per distinct id (_mixed_logits): logits and gradients equal lm_head(sum_l alpha_l @ senses_l)
    from contextualization(), and the d-space path that a hook (or dropout) selects."""
    model = perturb_(tiny("backpack", vocab_size=20))  # V = 20 < d = 32
    idx = torch.randint(0, 20, (3, T))  # ids repeat
    assert model._mixes_logits(idx)
    w = torch.linspace(-1, 1, 20)
    logits, _ = model(idx)
    g = grads(model, (logits * w).sum())
    explicit = model.lm_head(torch.einsum("blij,bjld->bid", model.contextualization(idx), model.senses(idx)))
    assert_same(logits, g, explicit, grads(model, (explicit * w).sum()))
    with model.hooked(lambda ids, senses: senses):
        assert not model._mixes_logits(idx)
        hooked, _ = model(idx)
        assert_same(logits, g, hooked, grads(model, (hooked * w).sum()))


def test_cpu_mixing_equals_fused_attention():
    """On CPU, _mix is one matmul over the joint (j, l) axis rather than SDPA's math kernel: the
    same output and gradients as the fused attention that runs on GPUs."""
    model = tiny("backpack")
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, T, 8, requires_grad=True), torch.randn(2, 4, T, 8, requires_grad=True)
    senses = torch.randn(2, T, 4, 32, requires_grad=True)
    w = torch.randn(2, T, 32)
    out = model._mix(q, k, senses)
    fused = F.scaled_dot_product_attention(q, k, senses.transpose(1, 2), is_causal=True,
                                           scale=model.sense_weights.scale).sum(1)
    assert torch.allclose(out, fused, atol=1e-5)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, senses)),
                    torch.autograd.grad((fused * w).sum(), (q, k, senses))):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, dict(sense_norm="rms", sense_base_residual="embedding")])
def test_logit_space_mixing_compiles_without_graph_breaks(variant):
    """Also with the opt-in sense departures of tests/test_model_variants.py."""
    from torch._dynamo.utils import counters
    model = perturb_(tiny("backpack", vocab_size=20, **variant))
    idx = torch.randint(0, 20, (2, T))
    counters.clear()
    logits, loss = torch.compile(model)(idx, idx)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0
    assert torch.allclose(logits, model(idx)[0], atol=1e-5)


def test_flops_count_the_logit_space_mixing():
    """In logit space the LM head runs on the U*k senses instead of the B*T outputs, and the mixing is
    k*U*V wide instead of k*T*d."""
    model = tiny("backpack", vocab_size=20)
    idx = torch.tensor([[1, 2, 3, 1, 2, 3], [4, 4, 4, 4, 4, 4], [1, 5, 5, 5, 5, 5]])  # 5 distinct ids
    B, Tn, d, k, V, U = 3, 6, 32, 4, 20, 5
    fast = model.flops_per_fwdbwd(idx)
    with model.hooked(lambda ids, senses: senses):
        slow = model.flops_per_fwdbwd(idx)
    assert slow - fast == 6 * V * d * (B * Tn - U * k) + 6 * k * (Tn * d - U * V) * B * Tn


def test_backpack_dropout_trains_is_seeded_and_off_in_eval():
    model = tiny("backpack", dropout=0.3)
    idx = torch.randint(0, V, (4, T + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    model.eval()
    a, _ = model(x)
    b, _ = model(x)
    assert torch.equal(a, b)  # eval: no dropout anywhere
    model.train()
    torch.manual_seed(5)
    c, _ = model(x)
    torch.manual_seed(5)
    d, _ = model(x)
    torch.manual_seed(6)
    e, _ = model(x)
    assert torch.equal(c, d) and not torch.allclose(c, e) and not torch.allclose(a, c)
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    first = None
    for _ in range(40):
        _, loss = model(x, y)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5


def test_mlp_dropout_is_applied():
    """Dropout on the MLP branch of every block (and of the sense block): in train mode an MLP's output
    has zeros where a plain Linear would not."""
    model = tiny("backpack", dropout=0.5).train()
    for mlp in (model.transformer.h[0].mlp, model.sense_network.mlp):
        torch.manual_seed(0)
        out = mlp(torch.randn(64, 32))
        assert (out == 0).float().mean() > 0.3
    assert model.sense_network.final_mlp.dropout.p == 0.0  # the paper: no dropout on the senses


def test_backpack_has_no_final_ln_and_uses_the_gpt_trunk():
    model = tiny("backpack")
    assert isinstance(model, GPT)
    names = {n for n, _ in model.named_parameters()}
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.ln_f.weight" in names
    gpt_names = {n for n, _ in tiny("gpt").named_parameters()}
    assert gpt_names <= names  # same trunk, same names
    extra = sorted(n.split(".")[0] for n in names - gpt_names)
    assert set(extra) == {"sense_network", "sense_weights"}


def test_scale_attn_by_inverse_layer_idx():
    gpt = tiny("gpt", scale_attn_by_inverse_layer_idx=True)
    assert gpt.transformer.h[1].attn.scale == pytest.approx(1 / math.sqrt(16) / 2)
    assert tiny("gpt").transformer.h[1].attn.scale == pytest.approx(1 / math.sqrt(16))
    assert tiny("backpack").config.scale_attn_by_inverse_layer_idx  # the paper's trunk has it


def test_build_model_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown model_type"):
        build_model("gpt2", **TINY)


GOLDEN = {  # losses of the first 5 AdamW steps of a fixed tiny config; catch silent regressions
    "gpt": [4.6231, 4.256, 3.9987, 3.7683, 3.5245],
    "backpack": [4.6153, 4.6041, 4.4941, 4.1585, 3.5621],
}


@pytest.mark.parametrize("model_type", ["gpt", "backpack"])
def test_golden_losses(model_type):
    model = tiny(model_type)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    idx = torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(123))
    losses = []
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    assert losses == pytest.approx(GOLDEN[model_type], abs=2e-4)
