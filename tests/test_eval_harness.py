"""
experiments/eval_harness.py (issue 14, part 2): our lm-eval model gives the same numbers as lm-eval's own
HFLM, for every request type the paper's evaluation uses, on a GPT-2-format directory and on Backpack
exports (HFLM then runs the export's remote code); BLiMP is scored as the paper did; char-level models
name the characters they cannot score; the script's last line is the metrics JSON. Issues 20 and 21:
importing the script changes nothing global; requests longer than the window; <|endoftext|> in a
document; Hugging Face directories read with their own tokenizer files, without the network.

Offline: tiny perturbed models and the local tasks in tests/fixtures/lm_eval (json data, read by
lm-eval's task YAMLs with paths relative to the repo root). The GPT-2 BPE cases need the BPE file
(conftest's gpt2_bpe fixture); the character cases need nothing.
"""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import hf  # noqa: E402
from checkpoint import checkpoint_dict, load_model, save_checkpoint  # noqa: E402
from common import Tokenizer, UserError  # noqa: E402
from conftest import FIXTURES, REPO  # noqa: E402
from experiments import eval_harness as ev  # noqa: E402
from generate import generate  # noqa: E402
from test_export_hf import perturbed  # noqa: E402  (a tiny model with every parameter moved)

TASKS = os.path.join(FIXTURES, "lm_eval")
# every character of the task data, then <|endoftext|> and [UNK]: what data/prepare_common.py writes
_TEXT = "".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(TASKS, "*.jsonl")))
_CHARS = sorted(set("".join(str(v) for line in _TEXT.splitlines() for v in json.loads(line).values())))
CHAR_SPEC = {"kind": "char", "itos": _CHARS + ["<|endoftext|>", "[UNK]"], "eot_id": len(_CHARS),
             "unk_id": len(_CHARS) + 1}
PARITY_TASKS = ["tiny_lambada", "tiny_rolling", "tiny_choice"]  # loglikelihood, _rolling, multiple_choice


@pytest.fixture(autouse=True)
def offline_tasks(monkeypatch):
    """The task YAMLs name their data relative to the repo root; nothing may be downloaded."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def spec_of(kind: str, request) -> dict:
    if kind == "gpt2":
        request.getfixturevalue("gpt2_bpe")
        return {"kind": "gpt2"}
    return CHAR_SPEC


def evaluate(lm, names: list[str], paper_blimp: bool = True, **kwargs) -> dict:
    """simple_evaluate on the local tasks, the way experiments/eval_harness.py calls it."""
    manager, loaded = ev.load_tasks(names, TASKS)
    if paper_blimp:
        ev.score_blimp_as_the_paper(loaded["tasks"])
    return simple_evaluate(model=lm, tasks=list(loaded["tasks"].values()), task_manager=manager,
                           bootstrap_iters=0, **kwargs)


def assert_same_metrics(a: dict, b: dict, rel: float = 1e-4):
    a, b = ev.metrics_json(a), ev.metrics_json(b)
    assert a.keys() == b.keys() and all(a[t].keys() == b[t].keys() for t in a)
    for task in a:
        for metric in a[task]:
            assert math.isclose(a[task][metric], b[task][metric], rel_tol=rel), (task, metric, a[task], b[task])


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_wrapper_matches_hflm_on_a_gpt2_directory(tmp_path, request, kind):
    """A GPT exported as a GPT2LMHeadModel directory: lm-eval's HFLM on it, our wrapper on the same
    directory, and our wrapper on the in-memory model with its padded vocabulary (cut to the
    tokenizer's ids when scoring) agree on every metric."""
    spec = spec_of(kind, request)
    tok = Tokenizer(spec)
    model = perturbed("gpt", tok.vocab_size + 13)
    hf.save_pretrained(model, str(tmp_path), spec)
    reference = evaluate(HFLM(pretrained=str(tmp_path), device="cpu", batch_size=4), PARITY_TASKS)
    from_dir = evaluate(ev.NanoLM(*load_model(str(tmp_path)), batch_size=3), PARITY_TASKS)
    padded = evaluate(ev.NanoLM(model, tok, batch_size=5), PARITY_TASKS)
    assert_same_metrics(from_dir, reference)
    assert_same_metrics(padded, reference)
    assert set(ev.metrics_json(reference)["tiny_rolling"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_lm_evals_hf_model_on_a_backpack_export_matches_our_wrapper(tmp_path, request, kind):
    """`lm_eval --model hf --model_args pretrained=export,trust_remote_code=True` scores a Backpack
    export exactly as our wrapper scores the model (which reads the export without remote code)."""
    spec = spec_of(kind, request)
    model = perturbed("backpack", Tokenizer(spec).vocab_size + 5)
    hf.save_pretrained(model, str(tmp_path), spec)
    names = PARITY_TASKS + ["blimp_tiny", "tiny_gen"]
    reference = evaluate(HFLM(pretrained=str(tmp_path), trust_remote_code=True, device="cpu", batch_size=4), names)
    ours = evaluate(ev.NanoLM(*load_model(str(tmp_path)), batch_size=4), names)
    assert_same_metrics(ours, reference)


def test_blimp_is_scored_as_the_paper(tmp_path):
    """Each sentence alone after <|endoftext|>, no leading space: the pair's log-probabilities are the
    model's own sums over the sentence's tokens."""
    model = perturbed("backpack", len(CHAR_SPEC["itos"]))
    tok = Tokenizer(CHAR_SPEC)
    lm = ev.NanoLM(model, tok, batch_size=4)
    results = evaluate(lm, ["blimp_tiny"], log_samples=True)
    correct = []
    for sample in results["samples"]["blimp_tiny"]:
        doc = sample["doc"]
        assert [tuple(a) for a in sample["arguments"]] == [("", doc["sentence_good"]), ("", doc["sentence_bad"])]
        lls = []
        for sentence in (doc["sentence_good"], doc["sentence_bad"]):
            ids = [tok.eot_id] + tok.encode(sentence)
            with torch.no_grad():
                lp = model(torch.tensor([ids]))[0][0, :-1, :tok.vocab_size].log_softmax(-1)
            lls.append(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item())
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, rel=1e-4)
        correct.append(lls[0] > lls[1])
    assert ev.metrics_json(results)["blimp_tiny"]["acc"] == pytest.approx(sum(correct) / len(correct))
    spaced = evaluate(lm, ["blimp_tiny"], paper_blimp=False, log_samples=True)  # lm-eval 0.4's own way
    assert all(cont.startswith(" ") for s in spaced["samples"]["blimp_tiny"] for _, cont in s["arguments"])


def test_generate_until_uses_our_generate():
    model = perturbed("gpt", len(CHAR_SPEC["itos"]) + 3)
    tok = Tokenizer(CHAR_SPEC)
    lm = ev.NanoLM(model, tok)
    requests = [SimpleNamespace(args=(prompt, {"until": [","], "max_gen_toks": 10}))
                for prompt in ("To be", "Speak")]
    for req, text in zip(requests, lm.generate_until(requests, disable_tqdm=True)):
        ids = tok.encode(req.args[0])
        y = generate(model, torch.tensor([ids]), 10, temperature=0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size)
        expected = tok.decode([t for t in y[0, len(ids):].tolist() if t not in (-1, tok.eot_id)]).split(",")[0]
        assert text == expected


def char_checkpoint(folder, itos: list[str]) -> str:
    spec = {"kind": "char", "itos": itos}  # nanoGPT-style: no end-of-text (documents start after "\n"), no [UNK]
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(checkpoint_dict(perturbed("backpack", len(itos)), spec), os.path.join(folder, "ckpt.pt"))
    return str(folder)


def test_characters_outside_the_vocabulary_are_named_or_skipped(tmp_path, capsys):
    out_dir = char_checkpoint(tmp_path / "out", [c for c in _CHARS if c != "q"])
    cfg = ev.EvalConfig(out_dir=out_dir, include_path=TASKS, tasks="tiny_rolling", device="cpu", bootstrap_iters=0)
    with pytest.raises(UserError, match=r"task tiny_rolling: 1 of 6 documents hold characters outside this "
                                        r"model's vocabulary: \['q'\]; pass --skip_unknown=True"):
        ev.main(cfg)
    cfg.skip_unknown = True
    ev.main(cfg)
    out = capsys.readouterr().out
    assert "tiny_rolling: skipped 1 of 6 documents with characters outside the vocabulary ('q')" in out
    assert json.loads(out.strip().splitlines()[-1])["tiny_rolling"]["word_perplexity"] > 0


def test_script_cli_prints_the_metrics_json_last(tmp_path):
    out_dir = char_checkpoint(tmp_path / "out", _CHARS)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "experiments/eval_harness.py", f"--out_dir={out_dir}", "--device=cpu",
                             f"--include_path={TASKS}", "--tasks=tiny_lambada,blimp_tiny", "--limit=4"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("|tiny_lambada") for line in lines)  # lm-eval's table
    metrics = json.loads(lines[-1])
    assert set(metrics) == {"tiny_lambada", "blimp_tiny"}
    assert set(metrics["tiny_lambada"]) == {"perplexity", "acc"} and set(metrics["blimp_tiny"]) == {"acc"}
    bad = subprocess.run([sys.executable, "experiments/eval_harness.py", f"--out_dir={out_dir}", "--tasks=tiny_lambda",
                          f"--include_path={TASKS}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown lm-eval task 'tiny_lambda'" in bad.stderr


# -----------------------------------------------------------------------------
# issue 20 (section 5) and 21: importing changes nothing, long requests, <|endoftext|> in documents,
# Hugging Face directories with their own tokenizer files


def test_importing_the_script_changes_nothing_global():
    """A fresh interpreter with experiments/ on sys.path (as the other experiments' tests have it):
    `import lm_eval` is the package, importing the script replaces or removes no module, leaves
    sys.path alone and registers nothing with lm-eval; main's register() then names NanoLM."""
    code = f"""
import sys
sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "experiments")!r}]
import lm_eval
from lm_eval.api.registry import get_model, model_registry
assert hasattr(lm_eval, "__path__"), lm_eval.__file__  # the package, not a file named after it
modules, path, models = dict(sys.modules), list(sys.path), dict(model_registry.items())
from experiments import eval_harness as ev
changed = [name for name, module in modules.items() if sys.modules.get(name) is not module]
assert not changed, changed
assert sys.path == path and sys.modules["lm_eval"] is lm_eval
assert dict(model_registry.items()) == models and "nanobackpacklm" not in models
ev.register()
assert get_model("nanobackpacklm") is ev.NanoLM
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_long_contexts_are_cut_from_the_left_and_too_long_continuations_are_a_clear_error():
    """Continuations of up to block_size tokens are scored after the last tokens of their context that
    fit (as HFLM); one longer than block_size cannot be scored in one forward pass: a UserError."""
    model = perturbed("gpt", len(CHAR_SPEC["itos"]))
    L = model.config.block_size
    lm = ev.NanoLM(model, Tokenizer(CHAR_SPEC), batch_size=2)
    g = torch.Generator().manual_seed(1)
    context, cont = (torch.randint(0, 40, (n,), generator=g).tolist() for n in (2 * L, L))
    for n in (1, L // 2, L):  # the model reads the last L tokens before each predicted one
        ids = (context + cont[:n])[-(L + 1):]
        with torch.no_grad():
            lp = model(torch.tensor([ids[:-1]]))[0][0, -n:].log_softmax(-1)
        expected = lp.gather(1, torch.tensor(cont[:n])[:, None]).sum().item()
        (ll, _), = lm._loglikelihood_tokens([(None, context, cont[:n])], disable_tqdm=True)
        assert ll == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UserError, match=rf"a {L + 1}-token continuation, longer than this model's block_size {L}"):
        lm._loglikelihood_tokens([(None, context, cont + cont[:1])], disable_tqdm=True)


def write_task(folder, name: str, docs: list[str]) -> str:
    """A loglikelihood_rolling task over docs, its data in folder (an absolute path: no chdir needed)."""
    data = os.path.join(folder, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                "metric_list:\n  - metric: word_perplexity\nmetadata:\n  version: 1.0\n")
    return str(folder)


def test_endoftext_written_in_a_document_is_not_an_unknown_character(tmp_path):
    """A vocabulary with an end-of-text entry encodes "<|endoftext|>" in a document as that token, so
    its characters (here <, |, > are outside the vocabulary) are not unknown; a real unknown character is."""
    assert not {"<", "|", ">"} & set(CHAR_SPEC["itos"])
    tok = Tokenizer(CHAR_SPEC)
    os.makedirs(tmp_path / "bad")
    folder = write_task(tmp_path, "tiny_eot", ["To be, or not<|endoftext|>Speak.", "To be<|endoftext|>"])
    _, loaded = ev.load_tasks(["tiny_eot"], folder)
    assert ev.check_characters(loaded["tasks"], tok, skip=False) == {}
    folder = write_task(tmp_path / "bad", "tiny_eot", ["To be, or not<|endoftext|>Speak.", "To be<|endoftext|>{"])
    _, loaded = ev.load_tasks(["tiny_eot"], folder)
    with pytest.raises(UserError, match=r"task tiny_eot: 1 of 2 documents hold characters outside this model's "
                                        r"vocabulary: \['\{'\]"):
        ev.check_characters(loaded["tasks"], tok, skip=False)


@pytest.mark.parametrize("max_gen_toks", [8, 32, 40])
def test_generate_until_keeps_the_prompt_that_fits(max_gen_toks):
    """As HFLM, the prompt keeps its last block_size - max_gen_toks tokens; an answer of block_size
    tokens or more (which HFLM refuses) slides past the window as sample.py does, after a full window
    of prompt, not after 1 token of it."""
    model = perturbed("gpt", len(CHAR_SPEC["itos"]) + 3)
    tok = Tokenizer(CHAR_SPEC)
    L = model.config.block_size
    prompt = "Speak, speak! To be, or not to be: that is the question. "  # longer than L characters
    ids = tok.encode(prompt)
    keep = L - max_gen_toks if max_gen_toks < L else L
    request = SimpleNamespace(args=(prompt, {"until": ["?"], "max_gen_toks": max_gen_toks}))
    text, = ev.NanoLM(model, tok).generate_until([request], disable_tqdm=True)

    def answer(context: list[int]) -> str:
        y = generate(model, torch.tensor([context]), max_gen_toks, temperature=0, eos_id=tok.eot_id,
                     stop=lambda new: "?" in tok.decode(new), vocab_limit=tok.vocab_size)
        return tok.decode([t for t in y[0, len(context):].tolist() if t not in (-1, tok.eot_id)]).split("?")[0]

    assert text == answer(ids[-keep:])
    assert text != answer(ids[-1:])  # the prompt matters to this model: the test tells the two apart


@pytest.fixture
def tokenizer_offline(monkeypatch):
    """Any way to GPT-2's BPE through tiktoken (its download or its cache) and any connection fails:
    a directory's tokenizer must come from its own files."""
    import socket

    import tiktoken
    import tiktoken.load

    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer was fetched from the network or tiktoken's cache")

    monkeypatch.delenv("GPT2_BPE_DIR", raising=False)
    for owner, name in ((tiktoken, "get_encoding"), (tiktoken.load, "read_file"), (tiktoken.load, "read_file_cached"),
                        (socket.socket, "connect")):
        monkeypatch.setattr(owner, name, refuse)


def without_our_spec(folder) -> str:
    """An export's config.json without our tokenizer spec, as in a directory written elsewhere."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config[hf.TOKENIZER_KEY]
    with open(path, "w") as f:
        json.dump(config, f)
    return str(folder)


def write_bpe_files(folder, vocab: dict, merges: list):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def train_bpe(text: str, n_merges: int) -> tuple[dict, list]:
    """A tiny byte-level BPE learned on text, in GPT2Tokenizer's vocab.json + merges.txt form: the 256
    bytes (in byte order, not GPT-2's), the merges' tokens in merge order, then <|endoftext|>."""
    shown = hf._byte_chars()  # GPT-2's printable stand-in of each byte
    pieces = re.findall(r" ?\w+| ?[^\w\s]+|\s+", text)  # about GPT-2's pre-tokenizer: words, with their space
    words = Counter(tuple(shown[b] for b in piece.encode()) for piece in pieces)
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))  # ties: the larger pair
        merges.append((a, b))
        merged = Counter()
        for word, n in words.items():
            out = []
            for s in word:
                if out and out[-1] == a and s == b:
                    out[-1] = a + b
                else:
                    out.append(s)
            merged[tuple(out)] += n
        words = merged
    vocab = {**{shown[b]: b for b in range(256)}, **{a + b: 256 + i for i, (a, b) in enumerate(merges)}}
    return {**vocab, "<|endoftext|>": len(vocab)}, merges


def test_a_directory_is_read_with_its_tokenizer_json(tmp_path, tokenizer_offline):
    """A char-level Backpack exported with transformers' tokenizer.json but no spec in config.json:
    the spec comes from tokenizer.json, encodes and decodes as the model's own tokenizer, and the
    tasks score the same. The spec holds the file's content, not its path: a checkpoint trained from
    the directory (it stores the spec) still reads its ids after the directory is gone."""
    model = perturbed("backpack", len(CHAR_SPEC["itos"]) + 5)
    hf.save_pretrained(model, str(tmp_path / "hf"), CHAR_SPEC)
    folder = without_our_spec(tmp_path / "hf")
    model_type, spec = hf.identify(folder)
    tok, original = Tokenizer(spec), Tokenizer(CHAR_SPEC)
    text = "To be, or not to be<|endoftext|>Speak!\n"
    assert model_type == "backpack" and (tok.vocab_size, tok.eot_id) == (original.vocab_size, original.eot_id)
    assert tok.encode(text) == original.encode(text) and tok.decode(tok.encode(text)) == text
    names = ["tiny_rolling", "tiny_lambada", "tiny_gen"]
    assert_same_metrics(evaluate(ev.NanoLM(*load_model(folder), batch_size=4), names),
                        evaluate(ev.NanoLM(model, original, batch_size=4), names))
    out_dir = tmp_path / "out"
    os.makedirs(out_dir)
    save_checkpoint(checkpoint_dict(model, spec), os.path.join(out_dir, "ckpt.pt"))
    shutil.rmtree(folder)
    assert load_model("resume", str(out_dir))[1].encode(text) == original.encode(text)
    nanogpt = {"kind": "char", "itos": _CHARS}  # no end-of-text: documents start after "\n"
    hf.save_pretrained(perturbed("gpt", len(_CHARS)), str(tmp_path / "nanogpt"), nanogpt)
    lm = ev.NanoLM(*load_model(without_our_spec(tmp_path / "nanogpt")))
    assert lm.prefix == _CHARS.index("\n") and lm.tok_encode("To be") == Tokenizer(nanogpt).encode("To be")


def test_gpt2_vocab_and_merges_in_a_directory_are_read_without_the_network(tmp_path, gpt2_bpe, tokenizer_offline):
    """GPT-2's own vocab.json + merges.txt (as the hub's gpt2 holds them), rebuilt from tiktoken's
    ranks: read with tiktoken from the files, they encode as tiktoken's GPT-2 does."""
    folder = tmp_path / "gpt2"
    write_bpe_files(folder, *hf.gpt2_vocab_and_merges(gpt2_bpe))
    with open(folder / "config.json", "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": 12, "eos_token_id": 50256}, f)
    model_type, spec = hf.identify(str(folder))
    tok = Tokenizer(spec)
    text = _TEXT[:2000] + " Hello wörld<|endoftext|> 中文  \n\n it's 123 ☃\t the end"
    assert model_type == "gpt" and (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode(text) == gpt2_bpe.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.decode(tok.encode(text)) == text


def test_a_handmade_bpe_directory_matches_transformers_and_hflm(tmp_path, tokenizer_offline):
    """A small BPE learned here, in vocab.json + merges.txt beside a GPT's weights: our tokenizer
    gives transformers' ids and our wrapper lm-eval's HFLM numbers. Files tiktoken cannot read as
    transformers does (ids out of merge order) are a one-line error."""
    from transformers import AutoTokenizer
    vocab, merges = train_bpe(_TEXT, 60)
    model = perturbed("gpt", len(vocab))
    hf.save_pretrained(model, str(tmp_path / "hf"), {"kind": "gpt2"})  # more ids than the model: no tokenizer files
    folder = without_our_spec(tmp_path / "hf")
    write_bpe_files(folder, vocab, merges)
    tok, reference = Tokenizer(hf.identify(folder)[1]), AutoTokenizer.from_pretrained(folder)
    text = _TEXT + " wörld<|endoftext|> 中文  \n\n it's 123 ☃\t"
    assert tok.encode(text) == reference(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text and tok.eot_id == vocab["<|endoftext|>"]
    assert_same_metrics(evaluate(ev.NanoLM(*load_model(folder), batch_size=4), PARITY_TASKS),
                        evaluate(HFLM(pretrained=folder, device="cpu", batch_size=4), PARITY_TASKS))
    write_bpe_files(folder, vocab, [merges[1], merges[0], *merges[2:]])
    with pytest.raises(UserError, match="vocab.json and merges.txt are not a byte-level BPE in GPT-2's layout"):
        hf.identify(folder)
