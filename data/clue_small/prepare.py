"""
CLUE's Chinese corpus (brightmart/nlp_chinese_corpus: wiki2019zh, webtext2019zh, news2016zh) at
character level, for config/train_clue_small.py and train_clue_micro.py. Tokenizer: Chinese BERT's
21128-entry vocab, one token per character (default; see data/prepare_common.py), or a character
vocab of the corpus (--tokenizer=char). Each article / answer / news item is one document, ended by
the end-of-text token ([SEP] for bert-chinese). Splits by documents, seed 2357: test 0.1% (kept, as
test.bin), val 0.05%. Writes data/clue_small/{train,val,test}.bin (uint16) and meta.pkl.

Get the JSON-lines files from https://github.com/brightmart/nlp_chinese_corpus and unzip them into
data/clue_small/ as they come (or pass their folders):
    wiki_zh_2019/*/wiki_*                          {"title", "text", ...}: text without its title paragraph
    webtext2019zh/web_text_zh_{train,valid,testa}.json  {"title", "desc", "content", ...}: title+desc, content
    new2016zh/news2016zh_{train,valid}.json        {"content", ...}
Plain .txt files count too, one document per line (CLUECorpusSmall's layout).

    python data/clue_small/prepare.py --vocab=path/to/vocab.txt   # offline; by default the vocab comes from the hub
    python data/clue_small/prepare.py path/to/nlp_chinese_corpus --tokenizer=char
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
from prepare_common import field, iter_records, list_files, parse_args, read_text, run, tokenizer_spec, write_dataset  # noqa: E402,E501

HERE = os.path.dirname(os.path.abspath(__file__))
PATTERNS = ("wiki_*", "web_text_zh_*.json", "news2016zh_*.json", "*.txt")
MISSING = ("download brightmart/nlp_chinese_corpus (https://github.com/brightmart/nlp_chinese_corpus: "
           "wiki2019zh, webtext2019zh, news2016zh) and unzip it into data/clue_small/, or pass the folders, "
           "or .txt files with one document per line")


def iter_clue_docs(paths: list[str]):
    for path in paths:
        name = os.path.basename(path)
        if name.endswith(".txt"):
            yield from read_text(path).split("\n")
        elif name.startswith("web_text_zh_"):  # a question (title + description) and one answer
            yield from (field(r, "title", path) + field(r, "desc", path) + "\n" + field(r, "content", path)
                        for r in iter_records(path))
        elif name.startswith("news2016zh_"):
            yield from (field(r, "content", path) for r in iter_records(path))
        else:  # wiki_*: the text starts with the title as its own paragraph
            yield from (field(r, "text", path).strip().split("\n\n", 1)[-1] for r in iter_records(path))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__, argv, HERE, ("bert-chinese", "char"), val_fraction=0.0005, test_fraction=0.001,
                      min_count=2)
    paths = list_files(args.input or [HERE], PATTERNS, MISSING)
    docs = lambda: (d.strip() for d in iter_clue_docs(paths))  # noqa: E731
    return write_dataset(docs, tokenizer_spec(args, docs), args, source=", ".join(args.input or [HERE]))


if __name__ == "__main__":
    run(main)
