"""generate.py for both models: the KV cache equals the uncached forward (also past block_size, for
prompts of different lengths, and with a sense hook), and the sampling strategies do what they say."""

import pytest
import torch
import torch.nn.functional as F

from generate import _process_logits, generate
from model import build_model

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
    cached = generate(model, idx, 300, temperature=0, return_logits=True)
    uncached = generate(model, idx, 300, temperature=0, use_cache=False, return_logits=True)
    assert cached[0].shape == (2, 305) and cached[1].shape == (2, 300, V)
    assert_same_run(cached, uncached)
    # and each step's logits are those of a plain forward over the last block_size tokens
    for t in (3, 11, 12, 40, 299):
        window = cached[0][:, max(0, 5 + t - BLOCK):5 + t]
        assert (model(window)[0][:, -1] - cached[1][:, t]).abs().max() < 1e-5


def test_prompts_of_different_lengths(model):
    """A list of prompts: left-padded in one batch, each row equals generating it alone."""
    prompts = [prompt(1, n, seed=n)[0] for n in (1, 4, 9)]
    batched = generate(model, prompts, 30, temperature=0)
    uncached = generate(model, prompts, 30, temperature=0, use_cache=False)
    for p, row, ref in zip(prompts, batched, uncached):
        alone = generate(model, p[None], 30, temperature=0, use_cache=False)[0]
        assert torch.equal(row, alone) and torch.equal(ref, alone)


def test_prompt_longer_than_block(model):
    idx = prompt(2, BLOCK + 7)
    assert_same_run(generate(model, idx, 20, temperature=0, return_logits=True),
                    generate(model, idx, 20, temperature=0, use_cache=False, return_logits=True))


def test_crop_conditions_on_exactly_the_last_block_size_tokens(model):
    """The token after the crop is the argmax over exactly the last block_size tokens (not one more or
    one fewer)."""
    idx = prompt(2, BLOCK)
    out = generate(model, idx, 3, temperature=0)
    for t in range(BLOCK, BLOCK + 3):
        assert torch.equal(out[:, t], model(out[:, t - BLOCK:t])[0][:, -1].argmax(-1))
        assert not torch.equal(model(out[:, t - BLOCK + 1:t])[0][:, -1], model(out[:, t - BLOCK:t])[0][:, -1])


def test_approximate_window_is_opt_in(model):
    idx = prompt()
    exact = generate(model, idx, 40, temperature=0)
    fast = generate(model, idx, 40, temperature=0, exact_window=False)
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
    plain = generate(model, idx, 40, temperature=0, return_logits=True)
    with model.hooked(hook):
        cached = generate(model, idx, 40, temperature=0, return_logits=True)
        uncached = generate(model, idx, 40, temperature=0, use_cache=False, return_logits=True)
        prompts = [idx[0, :2], idx[1]]
        batched = generate(model, prompts, 10, temperature=0)
        assert torch.equal(batched[0], generate(model, idx[:1, :2], 10, temperature=0, use_cache=False)[0])
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
    a = generate(model, idx, 20, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(3)
    b = generate(model, idx, 20, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(4)
    c = generate(model, idx, 20, temperature=1.0, top_k=10, top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_limits(model):
    idx = prompt()
    greedy = generate(model, idx, 15, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(generate(model, idx, 15, temperature=1e-4), greedy)  # near-zero temperature is greedy
    torch.manual_seed(0)
    assert torch.equal(generate(model, idx, 15, temperature=5.0, top_k=1), greedy)  # top_k=1 is greedy
    torch.manual_seed(0)
    assert torch.equal(generate(model, idx, 15, temperature=1.0, top_p=1e-6), greedy)  # the nucleus of one
    torch.manual_seed(0)
    hot = generate(model, idx, 15, temperature=1.0)
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
    out = generate(model, idx, 30, temperature=2.0, vocab_limit=90)
    assert out[:, 5:].max() < 90
    assert generate(model, idx, 5, temperature=0)[:, 5:].max() >= 90  # without the limit they win


def cut_at_stop(new: list[int], eos=None, stop=None) -> list[int]:
    """A row's new tokens up to and including its first eos, or the first point where stop(tokens) holds."""
    for n in range(1, len(new) + 1):
        if (eos is not None and new[n - 1] == eos) or (stop is not None and stop(new[:n])):
            return new[:n]
    return new


def test_eos_and_stop(model):
    """Greedy decoding with an end token or a stop rule is greedy decoding cut at the stop: each row
    ends right after it (the tensor output fills the rest with eos), and streaming shows each row's
    tokens until its stop, then -1."""
    idx = prompt()
    greedy = generate(model, idx, 12, temperature=0)
    eos = int(greedy[0, 8])  # the 4th new token of row 0
    new = [greedy[b, 5:].tolist() for b in range(2)]
    out = generate(model, idx, 12, temperature=0, eos_id=eos)
    for b in range(2):
        row = cut_at_stop(new[b], eos=eos)
        assert out[b, 5:5 + len(row)].tolist() == row and (out[b, 5 + len(row):] == eos).all()
    assert out.size(1) == 5 + max(len(cut_at_stop(n, eos=eos)) for n in new)  # no column after the last stop

    def stop(tokens):
        return len(tokens) == 3 or tokens[-1] == eos
    rows = generate(model, [idx[0], idx[1, 2:]], 12, temperature=0, stop=stop)
    alone = generate(model, idx[1:, 2:], 12, temperature=0)[0, 3:].tolist()  # row 1 without padding
    assert rows[0].tolist() == idx[0].tolist() + cut_at_stop(new[0], stop=stop)
    assert rows[1].tolist() == idx[1, 2:].tolist() + cut_at_stop(alone, stop=stop)

    streamed = []
    generate(model, idx, 6, temperature=0, eos_id=eos, on_token=lambda t: streamed.append(t.tolist()))
    for b in range(2):
        row = cut_at_stop(new[b][:6], eos=eos)
        assert [step[b] for step in streamed] == row + [-1] * (len(streamed) - len(row))
    assert len(streamed) == max(len(cut_at_stop(n[:6], eos=eos)) for n in new)


def exhaustive_search(model, idx, max_new: int, length_penalty: float, eos=None, stop=None) -> list:
    """Every complete continuation of idx (ended by eos or stop, or max_new long), scored as beam search
    scores it (sum of log-probs / length ** length_penalty), best first: (score, tokens)."""
    V = model.config.vocab_size
    done, frontier = [], [([], 0.0)]
    while frontier:
        tokens, total = frontier.pop()
        logp = F.log_softmax(model(torch.tensor([idx + tokens]))[0][0, -1].double(), -1)
        for t in range(V):
            hyp, s = tokens + [t], total + logp[t].item()
            if (eos is not None and t == eos) or (stop is not None and stop(hyp)) or len(hyp) == max_new:
                done.append((s / len(hyp) ** length_penalty, hyp))
            else:
                frontier.append((hyp, s))
    return sorted(done, key=lambda h: -h[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("end", ["eos", "stop"])
def test_beam_search_equals_exhaustive_search_with_eos_and_stop(length_penalty, end):
    """On a 4-token vocabulary, 3 new tokens: with beams enough to hold every live hypothesis, beam
    search returns exactly the best complete continuations of an exhaustive search, best first, the
    ones that end early included; with fewer beams its best is still a complete hypothesis."""
    model = tiny("gpt", vocab_size=4)
    prompt_ids = [1, 2, 0]
    ends = dict(eos=3) if end == "eos" else dict(stop=lambda new: len(new) >= 2 and new[-1] == new[-2])
    truth = exhaustive_search(model, prompt_ids, 3, length_penalty, ends.get("eos"), ends.get("stop"))
    if length_penalty == 0.0:  # short hypotheses win without a length penalty: early ends are in the top 4
        assert any(len(h) < 3 for _, h in truth[:4])
    eos_id, stop = ends.get("eos"), ends.get("stop")
    out = generate(model, [prompt_ids], 3, num_beams=16, length_penalty=length_penalty, eos_id=eos_id, stop=stop,
                   num_return_sequences=4)
    assert [o[3:].tolist() for o in out] == [h for _, h in truth[:4]]
    for beams in (2, 3):
        (best,) = generate(model, [prompt_ids], 3, num_beams=beams, length_penalty=length_penalty, eos_id=eos_id,
                           stop=stop)
        assert best[3:].tolist() in [h for _, h in truth]  # complete: ended by eos/stop or 3 long


def test_beam_search_returns_only_complete_hypotheses():
    """The reported case: once every prompt had num_beams finished hypotheses, the beams still running
    were added as if finished, and a 4-token one without eos won (freshly initialised models, whose
    flat distributions keep many hypotheses close). A hypothesis is complete when it ends with eos or
    is max_new_tokens long."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("gpt", n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=32).eval()
        for eos in range(32):
            for row in generate(model, [[1, 2, 3], [4, 5]], 6, num_beams=2, eos_id=eos):
                new = row[3:].tolist() if row[0] == 1 else row[2:].tolist()
                assert (new[-1] == eos or len(new) == 6) and eos not in new[:-1], (seed, eos, new)


def test_beam_search_returns_the_n_best_in_order(model):
    """num_return_sequences=n: the n best hypotheses per prompt, best first (transformers' order: rows
    b*n .. b*n+n-1); the first is what num_return_sequences=1 returns; n > num_beams is an error."""
    idx = prompt()
    best = generate(model, idx, 5, num_beams=4, length_penalty=0.0)
    top = generate(model, idx, 5, num_beams=4, length_penalty=0.0, num_return_sequences=3)
    assert top.shape == (6, 10) and torch.equal(top[::3], best)

    def score(row):
        logits = model(row[None, :-1])[0][0, 4:]  # the 5 predictions of the new tokens
        return F.log_softmax(logits.double(), -1).gather(1, row[5:, None]).sum().item()
    for b in range(2):
        scores = [score(top[b * 3 + j]) for j in range(3)]
        assert scores == sorted(scores, reverse=True) and len({tuple(r.tolist()) for r in top[b * 3:b * 3 + 3]}) == 3
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(model, idx, 5, num_beams=2, num_return_sequences=3)


def test_beam_search_finds_the_best_sequence():
    """With num_beams = V every 2-token continuation is kept, so beam search returns the exact argmax
    of log p(a) + log p(b | a) (length penalty 0: plain sum)."""
    model = tiny("gpt", vocab_size=7)
    idx = torch.tensor([[1, 2, 3]])
    best = generate(model, idx, 2, num_beams=7, length_penalty=0.0)
    logp1 = F.log_softmax(model(idx)[0][0, -1], -1)
    scores = torch.stack([logp1[a] + F.log_softmax(model(torch.cat((idx, torch.tensor([[a]])), 1))[0][0, -1], -1)
                          for a in range(7)])  # (7, 7)
    a, b = divmod(scores.argmax().item(), 7)
    assert best[0, 3:].tolist() == [a, b]
    greedy = generate(model, idx, 2, temperature=0)
    one_beam = generate(model, idx, 2, num_beams=1, temperature=0)
    assert torch.equal(greedy, one_beam)
    uncached = generate(model, idx, 2, num_beams=7, length_penalty=0.0, use_cache=False)
    assert torch.equal(best, uncached)


def test_beam_search_batch_and_eos(model):
    idx = prompt()
    out = generate(model, idx, 8, num_beams=3)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], idx)
    for b in range(2):
        assert torch.equal(out[b:b + 1], generate(model, idx[b:b + 1], 8, num_beams=3))
    lists = generate(model, [idx[0, :2], idx[1]], 8, num_beams=3, eos_id=int(out[0, 7]))
    assert len(lists) == 2 and all(len(r) <= len(p) + 8 for r, p in zip(lists, (idx[0, :2], idx[1])))


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(num_beams=0), dict(top_k=-2),
                                    dict(repetition_penalty=0.0)])
def test_bad_arguments(model, kwargs):
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        generate(model, prompt(), **args)


class MarkovModel(torch.nn.Module):
    """A stand-in model whose next-token distribution depends on the last token only (probs[last]):
    beam search's scores can then be set by hand."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.log(torch.tensor(probs))  # (V, V)
        self.lm_head = torch.nn.Linear(1, len(probs), bias=False)
        self.config = type("Config", (), {"block_size": 16, "vocab_size": len(probs)})()

    def next_logits(self, idx, cache=None, pad=None):
        if cache is not None:
            cache.length += idx.size(1)
        return self.table[idx[:, -1]]  # (B, V)


def test_beam_search_keeps_a_running_beam_that_the_length_penalty_can_still_lift():
    """Tokens 2 and 3 end a hypothesis. After step 1 both beams are finished, [2] and [3] (log 0.35 each),
    and beat the running [1] (log 0.29); but [1, 1, 1, 1] scores (log 0.29 + 3 log 0.99) / 4, far better.
    With length_penalty > 0 a beam's best reachable score is at max_new_tokens: the search may not stop."""
    model = MarkovModel([[0.01, 0.29, 0.35, 0.35], [0.004, 0.99, 0.003, 0.003], [0.25] * 4, [0.25] * 4])
    (best,) = generate(model, [[0]], 4, num_beams=2, length_penalty=1.0, stop=lambda new: new[-1] in (2, 3))
    assert best[1:].tolist() == [1, 1, 1, 1]
