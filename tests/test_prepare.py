"""
The data recipes (data/*/prepare.py, data/prepare_common.py) and the tokenizer kinds they write, on
small real data (Tiny Shakespeare from tests/fixtures; the rest from the optional data folder, see
conftest.py): token counts, decode(encode(doc)) == doc up to [UNK], the split
by documents (nanoGPT's for openwebtext), uint16 vs uint32, and a few training steps on each output.
"""

import contextlib
import importlib.util
import io
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import sample
import train
from checkpoint import load_checkpoint
from common import Tokenizer, UserError, gpt2_encoding
from configurator import parse_config
from conftest import REPO, SHAKESPEARE, SHAKESPEARE_IS_FULL, shared_file


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# data the repo cannot ship: each test that needs a file skips, saying how to get it, if it is missing
@pytest.fixture
def don() -> str:
    return shared_file("don_quixote/pg996.txt", "Don Quixote, Project Gutenberg eBook #996",
                       "download pg996.txt from https://www.gutenberg.org/ebooks/996")


@pytest.fixture
def bert_vocab() -> str:
    return shared_file("bert-chinese-vocab/vocab.txt", "Chinese BERT's 21,128-line vocab.txt",
                       "download vocab.txt of bert-base-chinese from the Hugging Face hub")


@pytest.fixture
def clue() -> str:
    return shared_file("clue_sample/CLUECorpusSmall_sampled.txt", "a CLUECorpusSmall sample",
                       "download corpora/CLUECorpusSmall_sampled.txt from github.com/dbiir/UER-py")


@pytest.fixture
def tigerbot() -> str:
    return shared_file("tigerbot_sample/dev_pretrain.json", "TigerBot's dev_pretrain.json",
                       "download data/dev_pretrain.json of github.com/TigerResearch/TigerBot at commit c24bd9c")


def recipe(name: str):
    """Import data/<name>/prepare.py as a module, so that tests call its main(argv) in-process."""
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", os.path.join(REPO, "data", name, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(name: str, out_dir, *args: str) -> dict:
    meta = recipe(name).main([*args, f"--out_dir={out_dir}", "--num_proc=2"])
    with open(os.path.join(out_dir, "meta.pkl"), "rb") as f:
        assert pickle.load(f)["tokens"] == meta["tokens"]
    return meta


def read_docs(out_dir, meta: dict) -> dict[str, list[str]]:
    """Each split's documents, decoded: the bins cut after every end-of-text id."""
    tok = Tokenizer(meta["tokenizer"])
    docs = {}
    for split in meta["tokens"]:
        ids = np.fromfile(os.path.join(out_dir, f"{split}.bin"), dtype=meta["dtype"])
        assert len(ids) == meta["tokens"][split] and ids[-1] == meta["eot_id"]
        cuts = np.flatnonzero(ids == meta["eot_id"])
        assert len(cuts) == meta["docs"][split]
        docs[split] = [tok.decode(ids[a + 1 if a >= 0 else 0:b].tolist()) for a, b in zip([-1, *cuts[:-1]], cuts)]
    return docs


def known_chars(meta: dict) -> set[str]:
    spec = meta["tokenizer"]
    return {s for s in spec.get("vocab", spec.get("itos", [])) if len(s) == 1}


def with_unk(doc: str, known: set[str]) -> str:
    return "".join(c if c in known else "[UNK]" for c in doc)


def check_roundtrip(out_dir, meta: dict, expected: list[str]):
    """The splits hold exactly the expected documents, each decodable (unknown characters as [UNK]),
    with one token per character plus the end-of-text for the character-level kinds."""
    docs = read_docs(out_dir, meta)
    everything = [d for split in docs.values() for d in split]
    if meta["tokenizer"]["kind"] == "gpt2":
        assert sorted(everything) == sorted(expected)
        enc = gpt2_encoding()
        assert sum(meta["tokens"].values()) == sum(len(enc.encode_ordinary(d)) + 1 for d in expected)
        assert meta["unk"] == 0
    else:
        known = known_chars(meta)
        assert sorted(everything) == sorted(with_unk(d, known) for d in expected)
        assert sum(meta["tokens"].values()) == sum(len(d) + 1 for d in expected)
        assert meta["unk"] == sum(c not in known for d in expected for c in d)
    return docs


def train_briefly(data_dir, out_dir, model_type: str = "backpack") -> dict:
    cfg = train.TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), model_type=model_type, n_layer=1,
                            n_head=2, n_embd=32, block_size=32, batch_size=2, max_iters=3, eval_iters=1,
                            gradient_accumulation_steps=1, n_senses=4, device="cpu", compile=False)
    train.main(cfg)
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert ckpt["iter_num"] == 3 and np.isfinite(ckpt["best_val_loss"])
    return ckpt


# -----------------------------------------------------------------------------
# Don Quixote and plain text


def test_don_bpe_chapters_and_training(tmp_path, don, gpt2_bpe):
    meta = prepare("don", tmp_path / "don", don)
    assert meta["tokenizer"] == {"kind": "gpt2"} and meta["dtype"] == "uint16" and meta["vocab_size"] == 50304
    assert meta["docs"] == {"train": 114, "val": 13}  # the front matter and 126 chapters; val 10%
    docs = read_docs(tmp_path / "don", meta)
    everything = [d for split in docs.values() for d in split]
    assert sum(d.startswith("CHAPTER ") for d in everything) == 126
    with open(don, encoding="utf-8-sig") as f:
        book = f.read()
    body = book[book.index("START OF THE PROJECT"):book.index("*** END OF THE PROJECT")]
    body = body[body.index("\n"):]
    # nothing lost but whitespace at the chapter boundaries, and no Gutenberg header or licence
    assert re.sub(r"\s", "", "".join(sorted(everything, key=body.index))) == re.sub(r"\s", "", body)
    enc = gpt2_encoding()
    assert sum(meta["tokens"].values()) == sum(len(enc.encode_ordinary(d)) + 1 for d in everything)
    train_briefly(tmp_path / "don", tmp_path / "out", "gpt")


def test_don_char(tmp_path, don):
    meta = prepare("don_char", tmp_path / "don_char", don)
    spec = meta["tokenizer"]
    assert spec["kind"] == "char" and spec["itos"][-2:] == ["<|endoftext|>", "[UNK]"]
    assert meta["vocab_size"] == len(spec["itos"]) == 99 and meta["unk"] == 0
    assert meta["itos"][spec["eot_id"]] == "<|endoftext|>" and meta["stoi"]["a"] == spec["itos"].index("a")
    assert sum(meta["tokens"].values()) == 2_298_912
    ckpt = train_briefly(tmp_path / "don_char", tmp_path / "out")
    assert Tokenizer(ckpt["tokenizer"]).decode(Tokenizer(ckpt["tokenizer"]).encode("Sancho")) == "Sancho"


def shakespeare_paragraphs() -> list[str]:
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return [p.strip() for p in re.split(r"\n[ \t]*\n", f.read()) if p.strip()]


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_text_shakespeare(tmp_path, tokenizer, monkeypatch, request):
    if tokenizer == "gpt2":
        request.getfixturevalue("gpt2_bpe")
    monkeypatch.setattr(prepare_common(), "CHUNK_TOKENS", 5000)  # many chunks: the in-place compaction
    meta = prepare("text", tmp_path / "text", SHAKESPEARE, "--doc_sep=blank", f"--tokenizer={tokenizer}")
    paragraphs = shakespeare_paragraphs()
    check_roundtrip(tmp_path / "text", meta, paragraphs)
    chars = 65 if SHAKESPEARE_IS_FULL else 62  # the full file, or the slice in tests/fixtures
    assert meta["vocab_size"] == (chars + 2 if tokenizer == "char" else 50304)
    assert meta["docs"]["val"] == -(-len(paragraphs) // 10)
    train_briefly(tmp_path / "text", tmp_path / "out")


def test_text_one_document_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="--doc_sep=blank"):
        prepare("text", tmp_path / "text", SHAKESPEARE)
    assert not os.path.exists(tmp_path / "text" / "tokens.tmp")


def test_uint32_when_the_vocab_exceeds_uint16(tmp_path):
    """70,000 distinct characters (CJK extension planes) need ids above 65535."""
    chars = [chr(0x20000 + i) for i in range(70_000)]
    lines = ["".join(chars[i:i + 700]) for i in range(0, len(chars), 700)]
    (tmp_path / "wide.txt").write_text("\n".join(lines), encoding="utf-8")
    meta = prepare("text", tmp_path / "wide", str(tmp_path / "wide.txt"), "--doc_sep=line")
    assert meta["vocab_size"] == 70_002 and meta["dtype"] == "uint32"
    assert os.path.getsize(tmp_path / "wide" / "train.bin") == 4 * meta["tokens"]["train"]
    check_roundtrip(tmp_path / "wide", meta, lines)
    assert prepare_common().bin_dtype_for(65_536) == np.uint16 and prepare_common().bin_dtype_for(65_537) == np.uint32
    train_briefly(tmp_path / "wide", tmp_path / "out", "gpt")


def prepare_common():
    recipe("text")  # puts data/ on sys.path
    import prepare_common
    return prepare_common


# -----------------------------------------------------------------------------
# Chinese: CLUE in brightmart's layouts, TigerBot, and the bert-chinese tokenizer


def test_bert_chinese_tokenizer_matches_bert_ids_and_decodes_without_spaces(bert_vocab):
    tok = Tokenizer(prepare_common().bert_chinese_spec(bert_vocab))
    # BertTokenizer(vocab.txt).encode gives [101, <these>, 102]
    assert tok.encode("中国是位于东亚的国家") == [704, 1744, 3221, 855, 754, 691, 762, 4638, 1744, 2157]
    text = "李瑞华，女。\n现任“VOL2”三门峡 Hello…"
    assert tok.decode(tok.encode(text)) == text  # case, spaces, newlines and quotes survive
    assert tok.vocab_size == 21128 and tok.eot_id == 102 and max(tok.encode(text)) < 21128
    assert tok.decode([101, 704, 0, 103, 102, 1744, 100]) == "中<|endoftext|>国[UNK]"  # no [CLS]/[PAD]/[MASK]/[SEP]
    assert tok.encode("中<|endoftext|>国") == [704, 102, 1744]


def clue_layouts(root, clue: str) -> list[str]:
    """The sample's lines spread over brightmart's three JSON-lines layouts and a plain .txt file;
    returns the documents the recipe should find."""
    with open(clue, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().split("\n") if line.strip()][:400]
    for sub in ("wiki_zh_2019/AA", "webtext2019zh", "new2016zh"):
        os.makedirs(os.path.join(root, sub))
    expected = []
    with open(os.path.join(root, "wiki_zh_2019/AA/wiki_00"), "w", encoding="utf-8") as wiki, \
            open(os.path.join(root, "webtext2019zh/web_text_zh_train.json"), "w", encoding="utf-8") as web, \
            open(os.path.join(root, "new2016zh/news2016zh_valid.json"), "w", encoding="utf-8") as news, \
            open(os.path.join(root, "corpus.txt"), "w", encoding="utf-8") as txt:
        for i, line in enumerate(lines):
            if i % 4 == 0:  # the title paragraph is dropped
                wiki.write(json.dumps({"id": str(i), "url": "", "title": f"标题{i}", "text": f"标题{i}\n\n{line}"},
                                      ensure_ascii=False) + "\n")
                expected.append(line)
            elif i % 4 == 1:
                row = {"qid": i, "title": line[:8], "desc": line[8:12], "topic": "", "content": line[12:]}
                web.write(json.dumps(row, ensure_ascii=False) + "\n")
                expected.append((line[:12] + "\n" + line[12:]).strip())
            elif i % 4 == 2:
                news.write(json.dumps({"news_id": i, "title": "t", "content": line}, ensure_ascii=False) + "\n")
                expected.append(line)
            else:
                txt.write(line + "\n")
                expected.append(line)
    return expected


@pytest.mark.parametrize("tokenizer", ["bert-chinese", "char"])
def test_clue_small(tmp_path, tokenizer, clue, bert_vocab):
    expected = clue_layouts(tmp_path / "brightmart", clue)
    meta = prepare("clue_small", tmp_path / "clue", str(tmp_path / "brightmart"), f"--tokenizer={tokenizer}",
                   f"--vocab={bert_vocab}", "--val_fraction=0.05", "--test_fraction=0.02")
    check_roundtrip(tmp_path / "clue", meta, expected)
    assert meta["docs"]["test"] == 8 and meta["docs"]["val"] == 20  # the test split is kept
    if tokenizer == "char":  # characters seen once are [UNK]
        counts = {}
        for c in "".join(expected):
            counts[c] = counts.get(c, 0) + 1
        assert known_chars(meta) == {c for c, n in counts.items() if n >= 2} and meta["unk"] > 0
    ckpt = train_briefly(tmp_path / "clue", tmp_path / "out")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sample.main(sample.SampleConfig(out_dir=str(tmp_path / "out"), start="中国", num_samples=1,
                                        max_new_tokens=30, device="cpu"))
    assert ckpt["tokenizer"] == meta["tokenizer"]
    text = out.getvalue()
    assert text.startswith("中国") and not any(s in text for s in ("[CLS]", "[SEP]", "[PAD]", "中 国"))


def test_missing_input_is_one_clear_line(tmp_path):
    """Run as scripts: exit status 2, one line saying where to get the data, no traceback."""
    for args, where in ((["data/clue_small/prepare.py", str(tmp_path / "nowhere")], "github.com/brightmart"),
                        (["data/text/prepare.py"], "pass a UTF-8 text file")):
        r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and where in r.stderr


@pytest.mark.parametrize("tokenizer", ["bert-chinese", "char"])
def test_tigerbot(tmp_path, tokenizer, tigerbot, bert_vocab):
    with open(tigerbot, encoding="utf-8") as f:
        contents = [r["content"] for r in json.load(f)]
    assert all(c.endswith("</s>") for c in contents)
    meta = prepare("tigerbot", tmp_path / "tb", tigerbot, f"--tokenizer={tokenizer}", f"--vocab={bert_vocab}",
                   "--val_fraction=0.1", "--test_fraction=0.05")
    docs = check_roundtrip(tmp_path / "tb", meta, [c[:-len("</s>")].strip() for c in contents])
    assert meta["docs"] == {"train": 85, "val": 10, "test": 5}
    assert not any("</s>" in d for split in docs.values() for d in split)
    if tokenizer == "bert-chinese":
        assert meta["unk"] < 0.001 * sum(meta["tokens"].values())  # whitespace, A-Z, quotes are in the vocab
    train_briefly(tmp_path / "tb", tmp_path / "out")


# -----------------------------------------------------------------------------
# OpenWebText: the hub path (a fake `datasets.Dataset`) and local files


def owt_docs() -> list[str]:
    paragraphs = shakespeare_paragraphs()
    return ["\n\n".join(paragraphs[i:i + 40]) for i in range(0, 40 * 30, 40)]  # 30 documents


def test_openwebtext_hub_path_uses_nanogpts_split(tmp_path, monkeypatch, gpt2_bpe):
    datasets = pytest.importorskip("datasets")
    fake = datasets.Dataset.from_dict({"text": owt_docs()})
    owt = recipe("openwebtext")
    monkeypatch.setattr(owt, "load_hub_dataset", lambda name, args, hint="": fake)
    meta = owt.main([f"--out_dir={tmp_path / 'owt'}", "--num_proc=2", "--val_fraction=0.1"])
    docs = check_roundtrip(tmp_path / "owt", meta, owt_docs())
    nanogpt = fake.train_test_split(test_size=0.1, seed=2357, shuffle=True)
    assert sorted(docs["val"]) == sorted(nanogpt["test"]["text"])
    assert sorted(docs["train"]) == sorted(nanogpt["train"]["text"])
    assert meta["source"] == "hub:Skylion007/openwebtext" and meta["tokens_per_s"] > 0
    train_briefly(tmp_path / "owt", tmp_path / "out", "gpt")


def test_openwebtext_local_files(tmp_path, gpt2_bpe):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    docs = owt_docs()
    src = tmp_path / "src"
    os.makedirs(src / "txt")
    with open(src / "part.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:10])
    pq.write_table(pa.table({"text": docs[10:20]}), src / "part.parquet")
    for i, d in enumerate(docs[20:]):
        (src / "txt" / f"{i}.txt").write_text(d, encoding="utf-8")
    meta = prepare("openwebtext", tmp_path / "owt", str(src), "--val_fraction=0.1")
    check_roundtrip(tmp_path / "owt", meta, docs)
    assert meta["docs"] == {"train": 27, "val": 3}


def test_don_suits_gpt2_finetuning(tmp_path, don, gpt2_bpe):
    """config/finetune_don.py's path: data/don's tokenizer spec is the one pretrained GPT-2 carries (a
    tiny random GPT-2 in the Hugging Face layout stands in for the hub's gpt2)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    prepare("don", tmp_path / "don", don)
    cfg = parse_config(train.TrainConfig, [os.path.join(REPO, "config", "finetune_don.py")])
    cfg = train.TrainConfig(**{**vars(cfg), "init_from": str(tmp_path / "gpt2"), "data_dir": str(tmp_path / "don"),
                               "out_dir": str(tmp_path / "out"), "block_size": 32, "batch_size": 2,
                               "gradient_accumulation_steps": 1, "max_iters": 2, "eval_iters": 1,
                               "device": "cpu", "compile": False})
    train.main(cfg)
    assert load_checkpoint(os.path.join(tmp_path, "out", "ckpt.pt"))["tokenizer"] == {"kind": "gpt2"}


CONFIGS = {"train_backpack_lm": "backpack", "train_backpack_micro": "backpack", "train_backpack_mini": "backpack",
           "train_gpt2": "gpt", "train_clue_small": "backpack", "train_clue_micro": "backpack",
           "train_tigerbot": "backpack", "train_tigerbot_gpt2": "gpt", "train_don_char": "backpack",
           "finetune_don": "gpt"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dataset_configs_parse_and_name_their_model_type(name, monkeypatch):
    monkeypatch.chdir(REPO)  # configs exec their base config by a path relative to the repo
    path = os.path.join("config", f"{name}.py")
    with open(path) as f:
        assert re.search(r"^model_type = '(gpt|backpack)'$", f.read(), re.M), "set model_type explicitly"
    cfg = parse_config(train.TrainConfig, [path])
    assert cfg.model_type == CONFIGS[name]
    if name.startswith("train_backpack"):  # the paper's 1024 x 512 tokens per step
        assert (cfg.batch_size * cfg.gradient_accumulation_steps, cfg.block_size) == (1024, 512)
