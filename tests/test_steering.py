"""experiments/steering.py and the three steering scripts (topic_control.py, debias.py, edit.py) on tiny
Backpacks: each intervention changes the logits exactly as its formula says, topic strength 0 is the
unmodified model, the topic annealing is causal and cached generation equals uncached under it,
Nelder-Mead stops at its iteration limit, and every script runs end to end with one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoint import checkpoint_dict, save_checkpoint
from common import UserError
from configurator import run_cli
from conftest import REPO, SHAKESPEARE_HEAD
from generate import generate
from model import build_model

sys.path.insert(0, os.path.join(REPO, "experiments"))
import debias  # noqa: E402
import edit  # noqa: E402
import steering  # noqa: E402
import topic_control  # noqa: E402

V, BLOCK, K = 61, 16, 4


def tiny(model_type: str = "backpack", vocab_size: int = V, n_embd: int = 32):
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=n_embd, block_size=BLOCK, vocab_size=vocab_size, dropout=0.0, bias=True)
    if model_type == "backpack":
        args["n_senses"] = K
    model = build_model(model_type, **args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights: logits far from uniform
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def ids(B=2, T=10, seed=0, word=None, at=()):
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    for t in at:
        idx[:, t] = word
    return idx


# -----------------------------------------------------------------------------
# the interventions, against their formulas


@torch.no_grad()
def test_sense_edit_changes_the_logits_as_the_formula_predicts():
    model = tiny()
    w, o, i = 7, 11, 13
    idx = ids(word=w, at=(1, 4, 8))
    E = model.lm_head.weight
    c = model.sense_vectors(torch.tensor([w]))  # (1, k, d)
    new = steering.edit_senses(c, E[o], E[i])
    for l in range(K):  # the formula, one sense at a time
        coef = c[0, l].dot(E[o])
        expected = c[0, l] - coef / E[o].dot(E[o]) * E[o] + coef / E[i].dot(E[i]) * E[i]
        assert torch.allclose(new[0, l], expected, atol=1e-6)
    before = model(idx)[0]
    with model.hooked(steering.replace_hook([w], new)):
        after = model(idx)[0]
    # only the senses of w changed, alpha did not: delta[p, v] = sum_{j: x_j = w} sum_l alpha[l, p, j] (c'_l - c_l).E[v]
    alpha = model.contextualization(idx)  # (B, k, T, T)
    at_w = (idx == w).float()  # (B, T)
    delta = torch.einsum("blpj,bj,lv->bpv", alpha, at_w, (new[0] - c[0]) @ E.T)
    assert (after - before - delta).abs().max() < 1e-5
    assert (after - before).abs().max() > 1e-3  # the edit did something


@torch.no_grad()
def test_scaling_a_sense_by_one_is_a_noop_and_by_zero_removes_it():
    model = tiny()
    w, sense = 5, 2
    idx = ids(word=w, at=(0, 3, 7))
    plain = model(idx)[0]
    with model.hooked(steering.scale_hook([w], [sense], 1.0)):
        assert torch.equal(model(idx)[0], plain)
    with model.hooked(steering.scale_hook([w], [sense], 0.0)):
        removed = model(idx)[0]
        for pos in (3, 9):
            assert model.logit_contributions(idx, 4, position=pos)[:, :, sense][idx == w].abs().max() == 0
    for token in (0, 4, 30):
        for pos in (3, 9):
            contrib = model.logit_contributions(idx, token, position=pos)  # (B, T, k), no hook
            gone = (contrib[:, :, sense] * (idx == w)).sum(1)  # (B,) sense `sense` of every w
            assert torch.allclose(removed[:, pos, token], plain[:, pos, token] - gone, atol=1e-5)


def test_project_out():
    e, g = torch.randn(8), torch.randn(8)
    assert torch.equal(steering.project_out(e, g, 1.0), e)
    assert abs(steering.project_out(e, g, 0.0).dot(g)) < 1e-5
    assert torch.allclose(steering.project_out(e, g, 0.5).dot(g), 0.5 * e.dot(g), atol=1e-5)


@torch.no_grad()
def test_topic_scores_are_the_max_normalised_logits_on_the_topic_words():
    model = tiny()
    target = steering.topic_target([[3], [9, 10]], V)
    assert target[3] == 1 and target[9] == target[10] == 0.5
    words = [3, 9, 10]
    top, at = steering.sense_logits(model, V - 1, words, budget=3 * K * V)  # chunks of 3 ids
    scores = steering.scores_from_logits(top, at, target[words], V, skip_ids=[0])
    assert torch.allclose(steering.topic_scores(model, target, V - 1, skip_ids=[0]), scores, atol=1e-6)
    E = model.lm_head.weight[:V - 1]
    logits = model.sense_vectors(torch.arange(V - 1)) @ E.T  # (V-1, k, V-1)
    expected = (logits @ target[:V - 1]) / logits.amax(-1)
    expected[0] = 0  # skip_ids
    assert torch.allclose(scores[:V - 1], expected, atol=1e-5)
    assert scores[V - 1].abs().sum() == 0  # beyond the tokenizer's vocab: 0


def slow_topic_scores(model, target, vocab_size, skip_ids=()):
    """The scoring formula written out one (token, sense) at a time: logits of the sense on every id,
    their max, and the topic's weighted logits divided by it."""
    E = model.lm_head.weight[:vocab_size]
    scores = torch.zeros(model.config.vocab_size, K)
    for v in range(vocab_size):
        for l, c in enumerate(model.sense_vectors(torch.tensor([v]))[0]):
            logits = E @ c  # (V,)
            on_topic = sum(target[u] * logits[u] for u in range(vocab_size) if target[u])
            scores[v, l] = on_topic / logits.max().clamp(min=1e-6)
    scores[list(skip_ids)] = 0
    return scores


@torch.no_grad()
@pytest.mark.parametrize("vocab_size, budget", [(V, 2**26), (V - 1, 3 * K * (V - 1)), (V - 3, 7 * K * (V - 3) + 1)])
def test_the_fast_scoring_pass_equals_the_slow_formula(vocab_size, budget):
    """One chunk, chunks of 3 ids and of 7 (which do not divide the vocabulary); the rows past the
    tokenizer's ids (a padded vocabulary) score 0."""
    model = tiny()
    target = steering.topic_target([[3], [9, 10], [20, 21, 22]], V)
    words = [3, 9, 10, 20, 21, 22]
    top, at = steering.sense_logits(model, vocab_size, words, budget=budget)
    fast = steering.scores_from_logits(top, at, target[words], V, skip_ids=[0])
    expected = slow_topic_scores(model, target, vocab_size, skip_ids=[0])
    assert torch.allclose(fast, expected, rtol=1e-5, atol=1e-5)
    assert fast[vocab_size:].abs().sum() == 0 and fast[0].abs().sum() == 0 and fast[1:vocab_size].abs().min() > 0
    assert torch.allclose(steering.topic_scores(model, target, vocab_size, skip_ids=[0]), expected, rtol=1e-5,
                          atol=1e-5)
    # a cached top skips the product and gives the same scores
    again = steering.sense_logits(model, vocab_size, words, budget=budget, top=top)
    assert again[0] is top and torch.allclose(again[1], at, atol=1e-6)


class Source:  # what many_topic_scores reads from a TopicConfig / ExploreConfig
    def __init__(self, out_dir, init_from="resume"):
        self.out_dir, self.init_from = out_dir, init_from


def counting_passes(monkeypatch) -> list[str]:
    """Record each sense_logits call: 'full' when it runs the V x k x V product, 'words' when a cached
    top spares it."""
    calls, real = [], steering.sense_logits
    monkeypatch.setattr(steering, "sense_logits", lambda *a, top=None, **kw: (
        calls.append("full" if top is None else "words"), real(*a, top=top, **kw))[1])
    return calls


def test_the_scores_cache_round_trips_and_is_keyed_by_the_weights(monkeypatch, tmp_path):
    source = Source(str(tmp_path))
    calls = counting_passes(monkeypatch)
    love, war = steering.topic_target([[3], [9, 10]], V), steering.topic_target([[5]], V)
    model = tiny()
    first = steering.topic_scores(model, love, V - 1, [0], cache_for=source)
    assert calls == ["full"] and torch.equal(first, steering.topic_scores(model, love, V - 1, [0]))
    assert len(os.listdir(tmp_path / "experiments" / "topic_cache")) == 2  # the tops and the topic's scores
    calls.clear()
    same = tiny()  # the same weights in another model object: a hit, no pass at all
    assert torch.equal(steering.topic_scores(same, love, V - 1, [0], cache_for=source), first) and calls == []
    # another topic reuses the cached tops: only the logits on its words are computed
    assert torch.equal(steering.topic_scores(same, war, V - 1, [0], cache_for=source),
                       steering.topic_scores(same, war, V - 1, [0]))
    assert calls == ["words", "full"]  # the second: the uncached reference
    calls.clear()
    with torch.no_grad():
        same.sense_network.final_mlp.c_proj.weight[0, 0] += 0.5  # one weight changed: a miss
    changed = steering.topic_scores(same, love, V - 1, [0], cache_for=source)
    assert calls == ["full"] and not torch.equal(changed, first)
    assert torch.equal(changed, steering.topic_scores(same, love, V - 1, [0]))
    calls.clear()  # and the model before the change still hits its own files
    assert torch.equal(steering.topic_scores(model, love, V - 1, [0], cache_for=source), first) and calls == []
    # so does the number of ids scored, and the skipped ids
    steering.topic_scores(model, love, V - 2, [0], cache_for=source)
    steering.topic_scores(model, love, V - 1, [], cache_for=source)
    assert calls == ["full", "words"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tensor changed"])
def test_a_damaged_cache_file_is_recomputed_not_trusted(monkeypatch, tmp_path, capsys, damage):
    source = Source(str(tmp_path))
    model, love = tiny(), steering.topic_target([[3], [9, 10]], V)
    good = steering.topic_scores(model, love, V - 1, [0], cache_for=source)
    folder = tmp_path / "experiments" / "topic_cache"
    for path in folder.iterdir():  # both files: the tops and the topic's scores
        data = path.read_bytes()
        if damage == "garbage":
            path.write_bytes(b"not a checkpoint" * 10)
        elif damage == "truncated":
            path.write_bytes(data[:len(data) // 2])
        else:  # a well-formed file whose numbers were changed after it was written
            blob = torch.load(path, weights_only=True)
            blob["tensor"] = blob["tensor"] * 2
            torch.save(blob, path)
    capsys.readouterr()
    calls = counting_passes(monkeypatch)
    assert torch.equal(steering.topic_scores(model, love, V - 1, [0], cache_for=source), good)
    assert calls == ["full"] and capsys.readouterr().out.count("ignoring the damaged") == 2
    calls.clear()  # rewritten: the next call hits
    assert torch.equal(steering.topic_scores(model, love, V - 1, [0], cache_for=source), good) and calls == []


def test_cache_folder_is_beside_a_checkpoint_or_in_the_user_cache(monkeypatch, tmp_path):
    assert steering.cache_folder("resume", "out-x") == os.path.join("out-x", "experiments", "topic_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert steering.cache_folder("backpack-small", "out") == os.path.join(str(tmp_path), "nano-backpacklm",
                                                                          "topic_cache")


def test_multipliers_follow_the_quantiles():
    scores = torch.arange(1001, dtype=torch.float).view(143, 7)  # q60, q80, q95 = 600, 800, 950 exactly
    assert torch.equal(steering.topic_multipliers(scores, 0), torch.ones(143, 7))
    m = steering.topic_multipliers(scores, 2).view(-1)  # [2.2, 2.2, 1.5, 1]
    assert torch.equal(m[951:], torch.full((50,), 2.2)) and torch.equal(m[801:950], torch.full((149,), 2.2))
    assert torch.equal(m[601:800], torch.full((199,), 1.5)) and torch.equal(m[:600], torch.ones(600))
    assert m[600] == m[800] == m[950] == 1.0  # a score exactly on a quantile keeps 1
    with pytest.raises(ValueError):
        steering.topic_multipliers(scores, 4)


def topic_hook_for(model, strength, words=((3,), (9, 10))):
    scores = steering.topic_scores(model, steering.topic_target([list(w) for w in words], V), V)
    return steering.topic_hook(steering.topic_multipliers(scores, strength), model.lm_head.weight,
                               steering.anneal_scale(strength))


@torch.no_grad()
def test_topic_strength_zero_reproduces_the_unmodified_generation():
    model = tiny()
    idx = ids(B=3, T=4)
    torch.manual_seed(5)
    plain = generate(model, idx, 30, temperature=1.0)
    with model.hooked(topic_hook_for(model, 0)):
        torch.manual_seed(5)
        same = generate(model, idx, 30, temperature=1.0)
    assert torch.equal(same, plain)
    with model.hooked(topic_hook_for(model, 3)):
        torch.manual_seed(5)
        steered = generate(model, idx, 30, temperature=1.0)
    assert not torch.equal(steered, plain)


@torch.no_grad()
def test_topic_annealing_never_reads_a_later_position():
    model = tiny()
    hook = topic_hook_for(model, 3)
    idx = ids(B=2, T=12)
    later = idx.clone()
    later[:, 8] = (later[:, 8] + 1) % V  # change one later token
    a, b = hook(idx, model.senses(idx)), hook(later, model.senses(later))  # senses(): raw, no hook installed
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.equal(a[:, 8:], b[:, 8:])
    with model.hooked(hook):  # and so the hooked model's logits before position 8 do not change either
        assert torch.equal(model(idx)[0][:, :8], model(later)[0][:, :8])
    # the weights are not all 1: a topical sense was boosted somewhere
    assert not torch.allclose(a, model.senses(idx))


@torch.no_grad()
def test_cached_and_uncached_generation_agree_under_the_topic_hook():
    model = tiny()
    idx = ids(B=2, T=5)
    with model.hooked(topic_hook_for(model, 3)):
        cached, lc = generate(model, idx, 40, temperature=0, return_logits=True)  # past block_size: the window slides
        uncached, lu = generate(model, idx, 40, temperature=0, use_cache=False, return_logits=True)
        assert torch.equal(cached, uncached) and (lc - lu).abs().max() < 1e-5
        prompts = [idx[0, :2], idx[1]]  # left padding: each row's hook sees its own tokens only
        batched = generate(model, prompts, 12, temperature=0)
        for p, row in zip(prompts, batched):
            assert torch.equal(row, generate(model, p[None], 12, temperature=0, use_cache=False)[0])


@torch.no_grad()
def test_word_logprobs_is_the_chain_rule():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5]]
    words = [[6], [7, 8, 9]]
    got = steering.word_logprobs(model, prompts, words, V - 1)
    for b, p in enumerate(prompts):
        for j, w in enumerate(words):
            seq = torch.tensor([p + w])
            logp = F.log_softmax(model(seq)[0][0, :, :V - 1], -1)  # (T, V-1)
            expected = sum(logp[len(p) - 1 + m, w[m]] for m in range(len(w)))
            assert abs(got[b, j] - expected) < 1e-4


# -----------------------------------------------------------------------------
# the scripts, end to end


def save_tiny(folder, model, spec) -> str:
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(checkpoint_dict(model, spec), os.path.join(folder, "ckpt.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    with open(SHAKESPEARE_HEAD) as f:
        chars = sorted(set(f.read()[:20_000]))
    return save_tiny(tmp_path_factory.mktemp("char"), tiny(vocab_size=len(chars)), {"kind": "char", "itos": chars})


@pytest.fixture
def bpe_ckpt(gpt2_bpe, tmp_path):
    return save_tiny(tmp_path / "bpe", tiny(vocab_size=50304, n_embd=16), {"kind": "gpt2"})


def script(name, *args, stdin=None, env=None):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{name}.py"), *args], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_edit_and_debias_scripts_bpe(bpe_ckpt):
    out = script("edit", f"--out_dir={bpe_ckpt}")
    assert "editing 'MacBook'" in out and "| The MacBook is made by |" in out
    out = script("debias", f"--out_dir={bpe_ckpt}", "--sense=1", "--maxiter=2")
    assert "of 40 professions are one token" in out and "| mean of " in out
    res = json.load(open(os.path.join(bpe_ckpt, "experiments", "debias.json")))
    assert all(r["iterations"] <= 2 for r in res["professions"]) and res["method"] == "scaling sense 1"


@pytest.mark.parametrize("name, args, message", [
    ("topic_control", ["--strengths=0,7"], "--strengths=0,7 is not a comma list of 0..3"),
    ("topic_control", ["--topic_words=nothere.txt"], "is not a file"),
    ("topic_control", ["--num_sample=3"], "did you mean --num_samples"),
    ("edit", ["--prompts=|"], "--prompts is empty"),
    ("edit", ["--word="], "an empty word"),
    ("debias", ["--sense=9"], "senses 0..3"),
    ("debias", ["--sense=-2"], "-1 picks the most gendered"),
    ("debias", ["--sense=1"], "no profession is one token"),  # a character vocabulary: every profession is skipped
])
def test_bad_flags_are_one_line_errors(char_ckpt, capsys, name, args, message):
    module = {"topic_control": topic_control, "edit": edit, "debias": debias}[name]
    cfg = {"topic_control": topic_control.TopicConfig, "edit": edit.EditConfig, "debias": debias.DebiasConfig}[name]
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, cfg, [f"--out_dir={char_ckpt}", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_gpt_is_refused_by_the_backpack_tools(tmp_path):
    with open(SHAKESPEARE_HEAD) as f:
        chars = sorted(set(f.read()[:20_000]))
    folder = save_tiny(tmp_path / "gpt", tiny("gpt", vocab_size=len(chars)), {"kind": "char", "itos": chars})
    with pytest.raises(UserError, match="needs a Backpack"):
        edit.main(edit.EditConfig(out_dir=folder))
