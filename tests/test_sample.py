"""sample.py's decoding flags on a tiny char-level checkpoint of each model: every bad value is one line,
the same seed gives the same text, stops, several prompts, beams, streaming equals the printed text."""

import os
import re
import subprocess
import sys

import pytest
import torch

import sample
from common import Tokenizer, checkpoint_dict, load_model, save_checkpoint
from configurator import run_cli
from conftest import REPO
from model import GPT, build_model

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


def run(capsys, out_dir, *flags) -> str:
    capsys.readouterr()
    run_cli(sample.main, sample.SampleConfig, [f"--out_dir={out_dir}", "--device=cpu", *flags])
    return capsys.readouterr().out


def greedy(out_dir, prompt: str, n: int, **kw) -> list[int]:
    model, tok = load_model("resume", out_dir, "cpu")
    ids = tok.encode(prompt)
    return model.generate([ids], n, temperature=0, vocab_limit=tok.vocab_size, **kw)[0][len(ids):].tolist()


BAD = [
    (["--num_samples=0"], r"num_samples must be >= 1 \(got 0\)"),
    (["--num_samples=-1"], r"num_samples must be >= 1 \(got -1\)"),
    (["--max_new_tokens=-1"], r"max_new_tokens must be >= 0 \(got -1\)"),
    (["--temperature=-0.5"], r"temperature must be >= 0 \(got -0.5\); 0 is greedy"),
    (["--top_k=-1"], r"top_k must be >= 0 \(got -1\); 0 keeps every token"),
    (["--top_p=0"], r"top_p must be in \(0, 1\] \(got 0.0\)"),
    (["--top_p=1.5"], r"top_p must be in \(0, 1\] \(got 1.5\)"),
    (["--num_beams=0"], r"num_beams must be >= 1 \(got 0\)"),
    (["--num_beams=2", "--num_samples=2"], r"beam search is deterministic, .*pass --num_samples=1"),
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
    seen = []
    original = GPT.generate

    def spy(self, *args, **kw):
        seen.append(kw)
        return original(self, *args, **kw)
    monkeypatch.setattr(GPT, "generate", spy)
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
