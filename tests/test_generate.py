"""model.generate for both models: the KV cache equals the uncached forward (also past block_size, for
prompts of different lengths, and with a sense hook), and the sampling strategies do what they say."""

import pytest
import torch
import torch.nn.functional as F

from model import _process_logits, build_model

V, BLOCK = 101, 16


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=V, dropout=0.0, bias=True)
    args.update(overrides)
    if model_type == "backpack":
        args.setdefault("n_senses", 4)
    model = build_model(model_type, **args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking weights: logits up to ~10, a sharp distribution without near-ties
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


@pytest.fixture(params=["gpt", "backpack"])
def model(request):
    return tiny(request.param)


def prompt(B=2, T=5, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_run(a, b, tokens_only=False):
    (ids_a, logits_a), (ids_b, logits_b) = a, b
    assert torch.equal(ids_a, ids_b)
    if not tokens_only:
        assert logits_a.shape == logits_b.shape
        assert (logits_a - logits_b).abs().max().item() < 1e-5


def test_cached_equals_uncached_greedy_300_tokens(model):
    """300 tokens from a 5-token prompt with block_size 16: within the block, then the window slides."""
    idx = prompt()
    cached = model.generate(idx, 300, temperature=0, return_logits=True)
    uncached = model.generate(idx, 300, temperature=0, use_cache=False, return_logits=True)
    assert cached[0].shape == (2, 305) and cached[1].shape == (2, 300, V)
    assert_same_run(cached, uncached)
    # and each step's logits are those of a plain forward over the last block_size tokens
    for t in (3, 11, 12, 40, 299):
        window = cached[0][:, max(0, 5 + t - BLOCK):5 + t]
        assert (model(window)[0][:, -1] - cached[1][:, t]).abs().max() < 1e-5


def test_prompts_of_different_lengths(model):
    """A list of prompts: left-padded in one batch, each row equals generating it alone."""
    prompts = [prompt(1, n, seed=n)[0] for n in (1, 4, 9)]
    batched = model.generate(prompts, 30, temperature=0)
    uncached = model.generate(prompts, 30, temperature=0, use_cache=False)
    for p, row, ref in zip(prompts, batched, uncached):
        alone = model.generate(p[None], 30, temperature=0, use_cache=False)[0]
        assert torch.equal(row, alone) and torch.equal(ref, alone)


def test_prompt_longer_than_block(model):
    idx = prompt(2, BLOCK + 7)
    assert_same_run(model.generate(idx, 20, temperature=0, return_logits=True),
                    model.generate(idx, 20, temperature=0, use_cache=False, return_logits=True))


def test_crop_conditions_on_exactly_the_last_block_size_tokens(model):
    """The token after the crop is the argmax over exactly the last block_size tokens (not one more or
    one fewer)."""
    idx = prompt(2, BLOCK)
    out = model.generate(idx, 3, temperature=0)
    for t in range(BLOCK, BLOCK + 3):
        assert torch.equal(out[:, t], model(out[:, t - BLOCK:t])[0][:, -1].argmax(-1))
        assert not torch.equal(model(out[:, t - BLOCK + 1:t])[0][:, -1], model(out[:, t - BLOCK:t])[0][:, -1])


def test_approximate_window_is_opt_in(model):
    idx = prompt()
    exact = model.generate(idx, 40, temperature=0)
    fast = model.generate(idx, 40, temperature=0, exact_window=False)
    assert torch.equal(fast[:, :BLOCK + 1], exact[:, :BLOCK + 1])  # identical until the window slides
    assert fast.shape == exact.shape


@pytest.mark.parametrize("hook_kind", ["scale", "grows"])
def test_cached_equals_uncached_with_a_sense_hook(hook_kind):
    """A hook whose output for past tokens changes as the sequence grows ("grows": every sense is
    scaled by a function of the newest token) is honoured by the cache too."""
    model = tiny("backpack")
    if hook_kind == "scale":
        hook = lambda idx, s: s * torch.linspace(0.5, 2.0, s.size(2))[None, None, :, None]  # noqa: E731
    else:
        hook = lambda idx, s: s * (1 + 0.25 * (idx[:, -1:] % 3).float())[..., None, None]  # noqa: E731
    idx = prompt()
    plain = model.generate(idx, 40, temperature=0, return_logits=True)
    with model.hooked(hook):
        cached = model.generate(idx, 40, temperature=0, return_logits=True)
        uncached = model.generate(idx, 40, temperature=0, use_cache=False, return_logits=True)
        prompts = [idx[0, :2], idx[1]]
        batched = model.generate(prompts, 10, temperature=0)
        assert torch.equal(batched[0], model.generate(idx[:1, :2], 10, temperature=0, use_cache=False)[0])
    assert_same_run(cached, uncached)
    assert not torch.allclose(cached[1], plain[1])  # the hook did something
    assert model.sense_hook is None  # hooked() restores


def test_no_hook_leaves_forward_bit_for_bit():
    model = tiny("backpack")
    idx = prompt()
    before = model(idx)[0]
    with model.hooked(lambda i, s: s):
        same = model(idx)[0]
    assert torch.equal(model(idx)[0], before) and torch.allclose(same, before)


# -----------------------------------------------------------------------------
# strategies


def test_seed_gives_the_same_text(model):
    idx = prompt()
    torch.manual_seed(3)
    a = model.generate(idx, 20, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(3)
    b = model.generate(idx, 20, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(4)
    c = model.generate(idx, 20, temperature=1.0, top_k=10, top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_limits(model):
    idx = prompt()
    greedy = model.generate(idx, 15, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 15, temperature=1e-4), greedy)  # near-zero temperature is greedy
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 15, temperature=5.0, top_k=1), greedy)  # top_k=1 is greedy
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 15, temperature=1.0, top_p=1e-6), greedy)  # the nucleus of one
    torch.manual_seed(0)
    hot = model.generate(idx, 15, temperature=1.0)
    assert not torch.equal(hot, greedy)


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx = torch.tensor([[0]])
    out = _process_logits(logits, idx, None, 0.5, None, None, 1.0, None)
    assert torch.allclose(out, logits / 0.5)


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    idx = torch.tensor([[0]])
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(_process_logits(logits, idx, None, 1.0, 2, None, 1.0, None)) == [True, True, False, False]
    assert keep(_process_logits(logits, idx, None, 1.0, 0, None, 1.0, None)) == [True] * 4  # 0 is off
    assert keep(_process_logits(logits, idx, None, 1.0, None, 0.5, 1.0, None)) == [True, False, False, False]
    assert keep(_process_logits(logits, idx, None, 1.0, None, 0.6, 1.0, None)) == [True, True, False, False]
    assert keep(_process_logits(logits, idx, None, 1.0, None, 0.9, 1.0, None)) == [True, True, True, False]
    assert keep(_process_logits(logits, idx, None, 1.0, None, 1.0, 1.0, None)) == [True] * 4


def test_repetition_penalty_and_vocab_limit():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, 1.0]])
    seen = torch.tensor([[0, 1, 1]])
    out = _process_logits(logits, seen, None, 1.0, None, None, 2.0, 4)
    assert out[0].tolist() == [1.0, -2.0, 3.0, 0.5, -float("inf")]
    padded = torch.tensor([[3, 3, 0, 1]])  # two columns of left padding: id 3 is not really there
    out = _process_logits(logits, padded, torch.tensor([2]), 1.0, None, None, 2.0, None)
    assert out[0].tolist() == [1.0, -2.0, 3.0, 0.5, 1.0]


def test_padded_vocab_is_never_sampled(model):
    idx = prompt()
    with torch.no_grad():  # make the padding rows the most likely tokens by far
        model.lm_head.weight[90:] *= 50
    torch.manual_seed(0)
    out = model.generate(idx, 30, temperature=2.0, vocab_limit=90)
    assert out[:, 5:].max() < 90
    assert model.generate(idx, 5, temperature=0)[:, 5:].max() >= 90  # without the limit they win


def test_eos_and_stop(model):
    idx = prompt()
    greedy = model.generate(idx, 12, temperature=0)
    eos = int(greedy[0, 8])  # the 4th new token of row 0
    out = model.generate(idx, 12, temperature=0, eos_id=eos)
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(out[0, :5 + first + 1], greedy[0, :5 + first + 1])
    assert (out[0, 5 + first + 1:] == eos).all()  # filled after the stop
    rows = model.generate([idx[0], idx[1]], 12, temperature=0, stop=lambda new: len(new) == 3 or new[-1] == eos)
    assert [len(r) for r in rows][0] == 5 + min(3, first + 1)
    assert torch.equal(rows[1], greedy[1, :8]) or (rows[1][5:] == eos).any()
    streamed = []
    model.generate(idx, 6, temperature=0, eos_id=eos, on_token=lambda t: streamed.append(t.tolist()))
    assert [s[1] for s in streamed] == greedy[1, 5:11].tolist() or eos in greedy[1, 5:11].tolist()


def test_beam_search_finds_the_best_sequence():
    """With num_beams = V every 2-token continuation is kept, so beam search returns the exact argmax
    of log p(a) + log p(b | a) (length penalty 0: plain sum)."""
    model = tiny("gpt", vocab_size=7)
    idx = torch.tensor([[1, 2, 3]])
    best = model.generate(idx, 2, num_beams=7, length_penalty=0.0)
    logp1 = F.log_softmax(model(idx)[0][0, -1], -1)
    scores = torch.stack([logp1[a] + F.log_softmax(model(torch.cat((idx, torch.tensor([[a]])), 1))[0][0, -1], -1)
                          for a in range(7)])  # (7, 7)
    a, b = divmod(scores.argmax().item(), 7)
    assert best[0, 3:].tolist() == [a, b]
    greedy = model.generate(idx, 2, temperature=0)
    one_beam = model.generate(idx, 2, num_beams=1, temperature=0)
    assert torch.equal(greedy, one_beam)
    uncached = model.generate(idx, 2, num_beams=7, length_penalty=0.0, use_cache=False)
    assert torch.equal(best, uncached)


def test_beam_search_batch_and_eos(model):
    idx = prompt()
    out = model.generate(idx, 8, num_beams=3)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], idx)
    for b in range(2):
        assert torch.equal(out[b:b + 1], model.generate(idx[b:b + 1], 8, num_beams=3))
    lists = model.generate([idx[0, :2], idx[1]], 8, num_beams=3, eos_id=int(out[0, 7]))
    assert len(lists) == 2 and all(len(r) <= len(p) + 8 for r, p in zip(lists, (idx[0, :2], idx[1])))


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(num_beams=0), dict(top_k=-2),
                                    dict(repetition_penalty=0.0)])
def test_bad_arguments(model, kwargs):
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        model.generate(prompt(), **args)
