"""sample.py's decoding flags on a tiny char-level checkpoint of each model: every bad value is one line,
the same seed gives the same text, stops, several prompts, beams, streaming equals the printed text."""

import os
import re
import subprocess
import sys

import pytest
import torch

import sample
from checkpoint import checkpoint_dict, load_model, save_checkpoint
from common import Tokenizer
from configurator import run_cli
from conftest import REPO
from generate import generate
from model import build_model

ITOS = sorted(set("ROMEO:JULIET abcdefghijklmnopqrstuvwxyz\n.,;!?'"))
SEP = sample.SEPARATOR + "\n"


def write_checkpoint(out_dir, model, itos, eot_id=None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    spec = {"kind": "char", "itos": itos, **({"eot_id": eot_id} if eot_id is not None else {})}
    save_checkpoint(checkpoint_dict(model, spec), os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


@pytest.fixture(scope="module", params=["gpt", "backpack"])
def ckpt(request, tmp_path_factory):
    """A random model whose vocab is padded past the tokenizer's (64 rows for len(ITOS) characters)."""
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0, bias=True)
    if request.param == "backpack":
        args["n_senses"] = 4
    model = build_model(request.param, **args)
    with torch.no_grad():  # larger weights: a peaked distribution, so greedy has no near-ties
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.15)
    return write_checkpoint(tmp_path_factory.mktemp(request.param), model.eval(), ITOS)


def spy_on_generate(monkeypatch) -> list[dict]:
    """The keyword arguments of every generate() call sample.py makes (generate still runs)."""
    seen = []

    def spy(*args, **kw):
        seen.append(kw)
        return generate(*args, **kw)
    monkeypatch.setattr(sample, "generate", spy)
    return seen


def run(capsys, out_dir, *flags) -> str:
    capsys.readouterr()
    run_cli(sample.main, sample.SampleConfig, [f"--out_dir={out_dir}", "--device=cpu", *flags])
    return capsys.readouterr().out


def greedy(out_dir, prompt: str, n: int, **kw) -> list[int]:
    model, tok = load_model("resume", out_dir, "cpu")
    ids = tok.encode(prompt)
    return generate(model, [ids], n, temperature=0, vocab_limit=tok.vocab_size, **kw)[0][len(ids):].tolist()


BAD = [
    (["--num_samples=0"], r"num_samples must be >= 1 \(got 0\)"),
    (["--num_samples=-1"], r"num_samples must be >= 1 \(got -1\)"),
    (["--max_new_tokens=-1"], r"max_new_tokens must be >= 0 \(got -1\)"),
    (["--temperature=-0.5"], r"temperature must be >= 0 \(got -0.5\); 0 is greedy"),
    (["--top_k=-1"], r"top_k must be >= 0 \(got -1\); 0 keeps every token"),
    (["--top_p=0"], r"top_p must be in \(0, 1\] \(got 0.0\)"),
    (["--top_p=1.5"], r"top_p must be in \(0, 1\] \(got 1.5\)"),
    (["--num_beams=0"], r"num_beams must be >= 1 \(got 0\)"),
    (["--num_beams=2", "--num_samples=3"], r"--num_samples=3 but beam search keeps only --num_beams=2 hypotheses; "
                                          r"pass --num_samples=2 or fewer"),
    (["--repetition_penalty=0"], r"repetition_penalty must be > 0 \(got 0.0\)"),
    (["--stop=€x"], r"characters \['€'\] are not in this model's character vocabulary; remove them from the stop"),
    (["--start=ROMEO € ½"], r"characters \['½', '€'\] are not in .* vocabulary; remove them from the prompt"),
    (["--start=FILE:{tmp}/empty.txt"], r"the prompt is empty"),
    (["--start=FILE:{tmp}/blank.txt", "--prompt_per_line=True"], r"--start has no non-blank line"),
    (["--compile=True"], r"unknown config key 'compile'"),  # dropped: it compiled nothing generate runs
]


@pytest.mark.parametrize("flags,expected", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flag_is_one_line(ckpt, tmp_path, capsys, flags, expected):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sample.main, sample.SampleConfig, [f"--out_dir={ckpt}", "--device=cpu", "--max_new_tokens=2",
                                                   *[f.format(tmp=tmp_path) for f in flags]])
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(expected, lines[0]), lines[0]


def test_negative_num_samples_cli(ckpt):
    """The issue's case as a user runs it: it used to exit 0 and print nothing."""
    proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={ckpt}", "--device=cpu", "--num_samples=-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: num_samples must be >= 1 (got -1); pass --num_samples=1 or more"]


def test_seed_gives_same_text(ckpt, capsys):
    flags = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=30", "--temperature=1.0", "--top_k=0"]
    a, b = run(capsys, ckpt, *flags, "--seed=7"), run(capsys, ckpt, *flags, "--seed=7")
    c = run(capsys, ckpt, *flags, "--seed=8")
    assert a == b and a != c
    samples = a.split(SEP)
    assert len(samples) == 3 and samples[-1] == "" and samples[0] != samples[1]


def test_greedy_cached_uncached_and_sliding_window(ckpt, capsys):
    """40 new tokens from a 6-character prompt pass block_size 16; the cache changes nothing."""
    flags = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40", "--temperature=0"]
    cached, uncached = run(capsys, ckpt, *flags), run(capsys, ckpt, *flags, "--use_cache=False")
    assert cached == uncached
    new = "".join(ITOS[i] for i in greedy(ckpt, "ROMEO:", 40))
    assert cached == "ROMEO:" + new + "\n" + SEP


def test_top_k_zero_keeps_every_token(ckpt, capsys, monkeypatch):
    """--top_k=0 reaches generate as None (off), samples like top_k = the whole vocab, and generate is
    told the tokenizer's vocab size so the padded rows (64 - len(ITOS)) are never sampled."""
    seen = spy_on_generate(monkeypatch)
    flags = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=30", "--temperature=1.0", "--seed=3"]
    off = run(capsys, ckpt, *flags, "--top_k=0")
    assert seen[0]["top_k"] is None and seen[0]["vocab_limit"] == len(ITOS) and seen[0]["top_p"] is None
    assert off == run(capsys, ckpt, *flags, f"--top_k={len(ITOS)}")
    assert off != run(capsys, ckpt, *flags, "--top_k=2")


def test_stop_string(ckpt, capsys):
    """A sample ends once its new text holds the stop string; the text printed ends with it."""
    new = "".join(ITOS[i] for i in greedy(ckpt, "ROMEO:", 30))
    stop = new[4:6]
    end = new.index(stop) + len(stop)
    flags = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--temperature=0", f"--stop={stop!r}"]
    for stream in ("True", "False"):
        assert run(capsys, ckpt, *flags, f"--stream={stream}") == "ROMEO:" + new[:end] + "\n" + SEP


def test_stop_at_eot(ckpt, tmp_path, capsys):
    """The same weights with a tokenizer whose end-of-text id is one greedy decoding emits: the sample
    ends at its first occurrence (printed as <|endoftext|>), unless --stop_at_eot=False."""
    new = greedy(ckpt, "ROMEO:", 30)
    prompt_ids = set(Tokenizer({"kind": "char", "itos": ITOS}).encode("ROMEO:"))
    eot = next(t for t in new[2:] if t not in prompt_ids)
    itos = [("<|endoftext|>" if i == eot else c) for i, c in enumerate(ITOS)]
    model, _ = load_model("resume", ckpt, "cpu")
    out_dir = write_checkpoint(tmp_path / "eot", model, itos, eot_id=eot)
    flags = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--temperature=0"]
    end = new.index(eot) + 1
    assert run(capsys, out_dir, *flags) == "ROMEO:" + "".join(itos[i] for i in new[:end]) + "\n" + SEP
    assert run(capsys, out_dir, *flags, "--stop_at_eot=False") == "ROMEO:" + "".join(itos[i] for i in new) + "\n" + SEP


def test_prompt_per_line(ckpt, tmp_path, capsys):
    """A file of prompts (blank lines skipped) is one batch; each prompt continues as it would alone."""
    (tmp_path / "prompts.txt").write_text("ROMEO:\n\nJULIET: O\nx\n")
    out = run(capsys, ckpt, f"--start=FILE:{tmp_path}/prompts.txt", "--prompt_per_line=True", "--num_samples=2",
              "--max_new_tokens=12", "--temperature=0")
    prompts = ["ROMEO:", "JULIET: O", "x"]
    alone = [p + "".join(ITOS[i] for i in greedy(ckpt, p, 12)) + "\n" for p in prompts]
    assert out.split(SEP) == alone + alone + [""]


def test_beam_search(ckpt, capsys):
    out = run(capsys, ckpt, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=8", "--num_beams=3",
              "--length_penalty=0.5")
    new = greedy(ckpt, "ROMEO:", 8, num_beams=3, length_penalty=0.5)
    assert out == "ROMEO:" + "".join(ITOS[i] for i in new) + "\n" + SEP


def test_beam_search_prints_the_n_best_beams(ckpt, capsys):
    """--num_samples=n with --num_beams=b >= n prints the n best beams, best first, each prompt in turn
    (transformers' num_return_sequences), and the first is what --num_samples=1 prints."""
    out = run(capsys, ckpt, "--start=ROMEO:\nx", "--prompt_per_line=True", "--num_samples=3", "--max_new_tokens=8",
              "--num_beams=4")
    model, tok = load_model("resume", ckpt, "cpu")
    expected = []
    for p in ("ROMEO:", "x"):
        ids = tok.encode(p)
        rows = generate(model, [ids], 8, num_beams=4, num_return_sequences=3, vocab_limit=tok.vocab_size)
        expected += [p + tok.decode(r[len(ids):].tolist()) + "\n" for r in rows]
    assert out.split(SEP) == expected + [""]
    assert len(set(expected[:3])) == 3  # three different beams, not one printed three times
    assert out.startswith(run(capsys, ckpt, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=8",
                              "--num_beams=4"))


def test_prompt_is_an_alias_of_start(ckpt, capsys):
    flags = ["--num_samples=1", "--max_new_tokens=10", "--temperature=0"]
    assert run(capsys, ckpt, "--prompt=JULIET:", *flags) == run(capsys, ckpt, "--start=JULIET:", *flags)
    assert run(capsys, ckpt, "--prompt=JULIET:", *flags).startswith("JULIET:")


def test_stream_equals_final_text(ckpt, capsys):
    flags = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=25", "--temperature=1.0", "--top_p=0.9",
             "--repetition_penalty=1.2", "--seed=11", "--stop=' e'"]
    assert run(capsys, ckpt, *flags, "--stream=True") == run(capsys, ckpt, *flags, "--stream=False")


def test_streamer_waits_for_whole_characters(gpt2_bpe, capsys):
    """GPT-2 BPE splits some characters across tokens: nothing half-decoded ever reaches stdout."""
    tok = Tokenizer({"kind": "gpt2"})
    text = "naïve café costs €5 😀 ok"
    ids = tok.encode(text)
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))  # the case under test
    streamer = sample.Streamer(tok.decode)
    pieces = []
    for i in ids:
        capsys.readouterr()
        streamer(torch.tensor([i]))
        pieces.append(capsys.readouterr().out)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_unknown_characters_with_an_unk_entry():
    """A vocab with [UNK] would encode '€' silently: the prompt check still names it (CharTable.unknown)."""
    tok = Tokenizer({"kind": "char", "itos": ITOS + ["<|endoftext|>", "[UNK]"], "eot_id": len(ITOS),
                     "unk_id": len(ITOS) + 1})
    assert tok.chars.unknown("a€b<|endoftext|>", tok.eot_id).tolist() == [False, True] + [False] * 14
    assert tok.chars.unknown("a<|endoftext|>").tolist() == [False, True, True] + [False] * 9 + [True, True]
    assert sample.encode(tok, "ROMEO:<|endoftext|>", "prompt")[-1] == len(ITOS)
    with pytest.raises(sample.UserError, match=r"characters \['€'\] are not in this model's character vocabulary"):
        sample.encode(tok, "ROMEO €", "prompt")


def reference(out_dir, prompt: str, n: int, seed: int = 1337, **options) -> str:
    """What sample.py must print for one prompt and --num_samples=1: the prompt and generate()'s
    continuation under the same seed and options, the padded vocab rows excluded."""
    model, tok = load_model("resume", out_dir, "cpu")
    ids = tok.encode(prompt)
    torch.manual_seed(seed)
    new = generate(model, [ids], n, vocab_limit=tok.vocab_size, **options)[0][len(ids):].tolist()
    return prompt + tok.decode(new) + "\n" + SEP


@pytest.mark.parametrize("flags,options", [
    (["--temperature=1.0", "--top_k=0", "--top_p=0.5"], dict(temperature=1.0, top_p=0.5)),
    (["--temperature=0", "--repetition_penalty=3.0"], dict(temperature=0, repetition_penalty=3.0)),
    (["--temperature=0.7", "--top_k=3"], dict(temperature=0.7, top_k=3)),
    (["--temperature=1.0", "--top_k=0", "--use_cache=False"], dict(temperature=1.0, use_cache=False)),
])
def test_each_decoding_flag_reaches_generate(ckpt, capsys, flags, options):
    """The printed sample is generate()'s with exactly these options (and differs from the defaults'),
    so a flag that is dropped on its way to generate shows."""
    base = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--seed=5"]
    out = run(capsys, ckpt, *base, *flags)
    assert out == reference(ckpt, "ROMEO:", 30, seed=5, **options)
    if "--use_cache=False" not in flags:  # the cache changes no logit: only the others change the text
        assert out != run(capsys, ckpt, *base, flags[0])


def test_stop_rule_is_on_the_whole_new_text(ckpt, capsys, monkeypatch):
    """generate is handed stop(new ids) that is True once the decoded new text holds the stop string,
    wherever its characters fall across tokens."""
    seen = spy_on_generate(monkeypatch)
    run(capsys, ckpt, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=5", "--stop=' e'")
    _, tok = load_model("resume", ckpt, "cpu")
    stop = seen[0]["stop"]
    assert stop(tok.encode("ab e")) and stop(tok.encode(" e"))
    assert not stop(tok.encode("ab ")) and not stop(tok.encode("e "))


def test_stop_inside_a_longer_token_cuts_the_text(ckpt, tmp_path, capsys):
    """A stop string that ends inside a token's text (here inside '<|endoftext|>', a token the greedy
    text emits): the sample is printed up to the end of the stop string, streamed or not."""
    new = greedy(ckpt, "ROMEO:", 30)
    prompt_ids = set(Tokenizer({"kind": "char", "itos": ITOS}).encode("ROMEO:"))
    eot = next(t for t in new[2:] if t not in prompt_ids)
    itos = [("<|endoftext|>" if i == eot else c) for i, c in enumerate(ITOS)]
    model, _ = load_model("resume", ckpt, "cpu")
    out_dir = write_checkpoint(tmp_path / "eot", model, itos, eot_id=eot)
    text = "".join(itos[i] for i in new)
    expected = "ROMEO:" + text[:text.index("text") + len("text")] + "\n" + SEP  # "...<|endoftext" at the latest
    for stream in ("True", "False"):
        assert run(capsys, out_dir, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=30", "--temperature=0",
                   "--stop_at_eot=False", "--stop=text", f"--stream={stream}") == expected


def test_streamer_waits_for_whole_characters_of_a_byte_vocab(capsys):
    """Tokens that are single UTF-8 bytes (no tokenizer download needed): a character of several bytes
    reaches stdout only once all its bytes have arrived, and the pieces add up to the text."""
    text = "naïve €5 😀!"
    streamer = sample.Streamer(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = []
    for b in text.encode("utf-8"):
        capsys.readouterr()
        streamer(torch.tensor([b]))
        pieces.append(capsys.readouterr().out)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[text.encode().index("€".encode()):][:3] == ["", "", "€"]
    streamer(torch.tensor([-1]))  # a row that already ended prints nothing
    assert capsys.readouterr().out == ""


def test_use_cache_and_greedy_reach_generate_as_given(ckpt, capsys, monkeypatch):
    """--use_cache=False and --temperature=0 (exactly greedy, not a small temperature) reach generate."""
    seen = spy_on_generate(monkeypatch)
    run(capsys, ckpt, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=3", "--use_cache=False")
    run(capsys, ckpt, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=3", "--temperature=0")
    assert [kw["use_cache"] for kw in seen] == [False, True]
    assert [kw["temperature"] for kw in seen] == [0.8, 0.0]
