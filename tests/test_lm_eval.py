"""
experiments/lm_eval.py (issue 14, part 2): our lm-eval model gives the same numbers as lm-eval's own
HFLM, for every request type the paper's evaluation uses, on a GPT-2-format directory and on Backpack
exports (HFLM then runs the export's remote code); BLiMP is scored as the paper did; char-level models
name the characters they cannot score; the script's last line is the metrics JSON.

Offline: tiny perturbed models and the local tasks in tests/fixtures/lm_eval (json data, read by
lm-eval's task YAMLs with paths relative to the repo root). The GPT-2 BPE cases need the BPE file
(conftest's gpt2_bpe fixture); the character cases need nothing.
"""

import glob
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import hf  # noqa: E402
from common import Tokenizer, UserError, checkpoint_dict, load_model, save_checkpoint  # noqa: E402
from conftest import FIXTURES, REPO  # noqa: E402
from experiments import lm_eval as ev  # noqa: E402
from test_export import perturbed  # noqa: E402  (a tiny model with every parameter moved)

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
    """simple_evaluate on the local tasks, the way experiments/lm_eval.py calls it."""
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
        y = model.generate(torch.tensor([ids]), 10, temperature=0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size)
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
    result = subprocess.run([sys.executable, "experiments/lm_eval.py", f"--out_dir={out_dir}", "--device=cpu",
                             f"--include_path={TASKS}", "--tasks=tiny_lambada,blimp_tiny", "--limit=4"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("|tiny_lambada") for line in lines)  # lm-eval's table
    metrics = json.loads(lines[-1])
    assert set(metrics) == {"tiny_lambada", "blimp_tiny"}
    assert set(metrics["tiny_lambada"]) == {"perplexity", "acc"} and set(metrics["blimp_tiny"]) == {"acc"}
    bad = subprocess.run([sys.executable, "experiments/lm_eval.py", f"--out_dir={out_dir}", "--tasks=tiny_lambda",
                          f"--include_path={TASKS}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown lm-eval task 'tiny_lambda'" in bad.stderr
