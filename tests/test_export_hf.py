"""
Exports in transformers (issue 14, part 3): a GPT or a Backpack written by hf.save_pretrained loads
through transformers' Auto classes as what it is, with our logits and our greedy text, and its
tokenizer files encode and decode exactly as common.Tokenizer. A Backpack export never becomes a GPT-2
without trust_remote_code. Plus the config.json rules of issue 15 (scale_attn default, foreign
layer_norm_epsilon) and export_hf.py refusing to write into its own out_dir.

Offline: tiny models with every parameter perturbed; the GPT-2 BPE cases need the BPE file (conftest's
gpt2_bpe fixture), the character cases need nothing.
"""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, pipeline  # noqa: E402

import export_hf  # noqa: E402
import hf  # noqa: E402
from common import Tokenizer, UserError  # noqa: E402
from conftest import GPT2_BPE_DIR  # noqa: E402
from generate import generate  # noqa: E402
from model import GPT, Backpack, build_model  # noqa: E402

LETTERS = list(" \n.,;:!?'-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
CHAR_SPEC = {"kind": "char", "itos": LETTERS + ["<|endoftext|>", "[UNK]"], "eot_id": len(LETTERS),
             "unk_id": len(LETTERS) + 1}  # what data/prepare_common.py writes
NANOGPT_CHAR_SPEC = {"kind": "char", "itos": LETTERS}  # nanoGPT's metas: no end-of-text, no [UNK]
# A Chinese BERT vocab in miniature: specials, characters, WordPiece continuations, unused slots
BERT_SPEC = {"kind": "bert-chinese", "vocab": ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               "<S>", "<T>", "\n", " ", "的", "一", "是", "我", "a", "b", "A", "，", "。",
                                               "##的", "##a", "##b", "##", "😀", "##ab"]}
PROMPTS = {"char": "To be, or not", "gpt2": "The meaning of life is"}


def perturbed(model_type: str, vocab_size: int, seed: int = 0, **kw):
    """A tiny model with every parameter moved (tied ones once), in eval mode."""
    model = build_model(model_type, n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=vocab_size,
                        **({"n_senses": 4} if model_type == "backpack" else {}), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def spec_of(kind: str, request) -> dict:
    if kind == "gpt2":
        request.getfixturevalue("gpt2_bpe")
        return {"kind": "gpt2"}
    return CHAR_SPEC


@pytest.mark.parametrize("kind", ["char", "gpt2"])
@pytest.mark.parametrize("model_type", ["gpt", "backpack"])
def test_auto_classes_give_our_logits_and_greedy_text(tmp_path, request, model_type, kind):
    spec = spec_of(kind, request)
    tok = Tokenizer(spec)
    padded = tok.vocab_size + 11 if kind == "char" else 50304  # a padded vocabulary, cut on export
    model = perturbed(model_type, padded)
    written = hf.save_pretrained(model, str(tmp_path), spec)
    assert written == {"vocab_size": tok.vocab_size, "padded_vocab_size": padded, "tokenizer_files": True}

    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    assert (type(theirs) is GPT2LMHeadModel) == (model_type == "gpt")
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if model_type == "gpt" else "BackpackGPT2LMHeadModel")
    x = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf_logits = model(x)[0], theirs(x).logits
    assert hf_logits.shape[-1] == tok.vocab_size  # the padding rows are gone: never sampled, never scored
    assert (hf_logits - ours[..., :tok.vocab_size]).abs().max().item() < 1e-5

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    prompt = PROMPTS[kind]
    ids = tok.encode(prompt)
    assert hf_tok.encode(prompt) == ids
    x = torch.tensor([ids])
    ours = generate(model, x, 12, temperature=0, eos_id=tok.eot_id, vocab_limit=tok.vocab_size)[0, len(ids):]
    ours = [t for t in ours.tolist() if t not in (-1, tok.eot_id)]
    with torch.no_grad():
        theirs_ids = theirs.generate(x, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert [t for t in theirs_ids if t != tok.eot_id] == ours
    generator = pipeline("text-generation", model=str(tmp_path), trust_remote_code=True)
    text = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == prompt + tok.decode(ours)


def test_backpack_export_never_loads_as_gpt2(tmp_path):
    """model_type backpack-gpt2 with an auto_map: without trust_remote_code transformers refuses (the
    old exports said gpt2 and silently became a random GPT2LMHeadModel)."""
    hf.save_pretrained(perturbed("backpack", len(CHAR_SPEC["itos"])), str(tmp_path), CHAR_SPEC)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "backpack-gpt2" and config["architectures"] == ["BackpackGPT2LMHeadModel"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (tmp_path / "modeling_backpack_gpt2.py").exists() and (tmp_path / "configuration_backpack_gpt2.py").exists()
    for trust in (False, None):  # None: transformers would ask on a terminal; here stdin is not one
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=trust)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=False)
    # this repo reads it back without running any of that code
    assert isinstance(hf.load_pretrained(Backpack, str(tmp_path)), Backpack)


@pytest.mark.parametrize("name", ["char", "nanogpt-char", "bert-chinese", "gpt2"])
def test_tokenizer_files_encode_and_decode_as_the_repo(tmp_path, request, name):
    spec = {"char": CHAR_SPEC, "nanogpt-char": NANOGPT_CHAR_SPEC, "bert-chinese": BERT_SPEC}.get(name)
    spec = spec or spec_of("gpt2", request)
    tok = Tokenizer(spec)
    hf.save_tokenizer(spec, str(tmp_path), 32)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = {
        "char": ["Hello, world!\n\nTo be.", "a<|endoftext|>b", "unknown: é ☃ [UNK]", ""],
        "nanogpt-char": ["Hello, world!\n\nTo be.", "Speak, speak."],
        "bert-chinese": ["我是一a，的。\n 😀", "的<|endoftext|>ab", "unknown 字 [UNK] ##", "A b"],
        "gpt2": ["Hello world", " leading  spaces\n\n\ttabs", "naïve café ☃ 😀 日本語 <|endoftext|> after",
                 "don't I'll 1234 ...!!", ""],
    }[name]
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == tok.decode(ids), text
    if name != "gpt2":  # every id decodes as the repo prints it ([PAD] as nothing, ##a as a, [SEP] as <|endoftext|>)
        assert [hf_tok.decode([i]) for i in range(tok.vocab_size)] == [tok.decode([i]) for i in range(tok.vocab_size)]
    assert hf_tok.eos_token == ("<|endoftext|>" if tok.eot_id is not None else None)
    if tok.eot_id is not None:
        assert hf_tok.eos_token_id == tok.eot_id


def test_gpt2_merges_rebuilt_from_tiktoken_are_openais(gpt2_bpe):
    vocab, merges = hf.gpt2_vocab_and_merges(gpt2_bpe)
    encoder = os.path.join(GPT2_BPE_DIR, "encoder.json")
    if not os.path.exists(encoder):  # the original files are optional; the token count still checks
        assert len(vocab) == 50257 and len(merges) == 50000
        return
    with open(encoder, encoding="utf-8") as f:
        assert vocab == json.load(f)
    with open(os.path.join(GPT2_BPE_DIR, "vocab.bpe"), encoding="utf-8") as f:
        assert merges == [tuple(line.split()) for line in f.read().split("\n")[1:] if line]


# -----------------------------------------------------------------------------
# config.json rules (issue 15)


def gpt2_config(**overrides) -> dict:
    return dict(dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=11), **overrides)


@pytest.mark.parametrize("layout, expected", [(hf.GPT2_LAYOUT, False), (hf.BACKPACK_LAYOUT, True)])
def test_missing_scale_attn_follows_the_format_default(capsys, layout, expected):
    """GPT2Config defaults scale_attn_by_inverse_layer_idx to False, the published BackpackGPT2Config
    to True: a config.json without the key means what its format's class makes of it, with a warning."""
    config = gpt2_config(**({"num_senses": 2, "sense_intermediate_scale": 4} if layout is hf.BACKPACK_LAYOUT else {}))
    cls = GPT if layout is hf.GPT2_LAYOUT else Backpack
    assert hf.model_args_from_config(config, layout, cls, "dir")["scale_attn_by_inverse_layer_idx"] is expected
    assert f"does not set scale_attn_by_inverse_layer_idx; using {expected}" in capsys.readouterr().err
    for given in (True, False):  # an explicit value always wins, silently
        args = hf.model_args_from_config(dict(config, scale_attn_by_inverse_layer_idx=given), layout, cls, "dir")
        assert args["scale_attn_by_inverse_layer_idx"] is given
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("layout", [hf.GPT2_LAYOUT, hf.BACKPACK_LAYOUT])
def test_foreign_layer_norm_epsilon_is_refused(tmp_path, layout):
    model = perturbed("gpt" if layout is hf.GPT2_LAYOUT else "backpack", 11)
    hf.save_pretrained(model, str(tmp_path), {"kind": "char", "itos": list("abcdefghijk")})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, layer_norm_epsilon=1e-6)))
    with pytest.raises(UserError, match="sets layer_norm_epsilon=1e-06, which this repo's models do not support"):
        hf.load_pretrained(type(model), str(tmp_path))


@pytest.mark.parametrize("same", ["out", "out/", "./out"])
def test_export_dir_equal_to_out_dir_is_refused(tmp_path, monkeypatch, same):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--export_dir must differ from --out_dir"):
        export_hf.main(export_hf.ExportConfig(out_dir="out", export_dir=same))
    assert not os.path.exists(tmp_path / "out")  # refused before anything is read or written


def test_a_directory_with_its_own_tokenizer_exports_again(tmp_path):
    """A model loaded from a directory that brought its own tokenizer (vocab.json + merges.txt, read as a
    "bpe" spec; or a tokenizer.json, an "hf-tokenizer" spec) exports again with tokenizer files that
    transformers reads as the same tokenizer: the ids of a text are those of our Tokenizer."""
    from test_eval_harness import _TEXT, train_bpe, without_our_spec, write_bpe_files
    vocab, merges = train_bpe(_TEXT, 40)
    hf.save_pretrained(perturbed("gpt", len(vocab)), str(tmp_path / "bpe"), {"kind": "gpt2"})  # no tokenizer files
    write_bpe_files(without_our_spec(tmp_path / "bpe"), vocab, merges)
    hf.save_pretrained(perturbed("backpack", len(CHAR_SPEC["itos"])), str(tmp_path / "json"), CHAR_SPEC)
    without_our_spec(tmp_path / "json")  # keeps tokenizer.json, drops our spec
    text = "To be, or not to be<|endoftext|>Speak!\n"
    for name, kind in (("bpe", "bpe"), ("json", "hf-tokenizer")):
        model_type, spec = hf.identify(str(tmp_path / name))
        assert spec["kind"] == kind
        model = hf.load_pretrained(GPT if model_type == "gpt" else Backpack, str(tmp_path / name))
        hf.save_pretrained(model, str(tmp_path / f"{name}-again"), spec)
        theirs = AutoTokenizer.from_pretrained(str(tmp_path / f"{name}-again"))
        ours = Tokenizer(spec)
        assert theirs(text)["input_ids"] == ours.encode(text) and theirs.decode(ours.encode(text)) == text
        assert theirs.eos_token_id == ours.eot_id is not None
        assert hf.identify(str(tmp_path / f"{name}-again"))[1] == spec  # our spec is in config.json again
