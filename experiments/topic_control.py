"""
Topic control by sense reweighting (the paper's Section 5.1; algorithm in experiments/steering.py):
up-weight the senses that predict a topic's words and sample, at strengths 0 (unmodified) to 3.

    python experiments/topic_control.py --out_dir=out-shakespeare-char --topic_words=love,death --max_new_tokens=200
    python experiments/topic_control.py --out_dir=out-shakespeare-bpe --topic_words=love,war,death --num_samples=64
    python experiments/topic_control.py --init_from=backpack-small --topic_words=all --num_samples=500 --device=cuda

--topic_words is a file (one word per line), a comma list, the name of one of the paper's 17 lists in
experiments/topic_classes/ (sports, music, food_dining, ...), several of those separated by ';' (they
share the costly scoring pass over the vocabulary), or `all` for all 17 and their mean, the number the
paper reports (its semantic success: 0.072, 0.121, 0.243, 0.353 at strengths 0..3 with Backpack-Small).
Every sample starts from the end-of-text token (a newline for a character vocabulary without one) and
is pure ancestral sampling, as in the paper. The annealing is the causal form of the paper's (a token's
weight depends only on the tokens up to it; the paper's also counted later ones). Strength 0 leaves
every multiplier at 1: with the same --seed it reproduces the unmodified model's samples token for token.

Success per strength, offline: the share of samples that contain a topic word (whole word, any case),
and the mean probability the model gives to a topic word's first token at each generated position.
The paper's measure, semantic success (the share of samples that cardiffnlp/tweet-topic-21-multi gives
the topic's label with probability > 0.5), is added when the classifier loads (network once, or the
Hugging Face cache); otherwise one line says why it is missing. Results: <out_dir>/experiments/. The
scoring pass over the vocabulary is cached on disk, keyed by the model's weights (steering.cache_folder).
"""

import os
import re
from dataclasses import dataclass

import torch

import tools  # first of the repo's modules: it puts the repo root on sys.path
from common import UserError, autocast_context, first_line, resolve_dtype
from configurator import run_cli
from generate import generate
from steering import STRENGTHS, anneal_scale, many_topic_scores, topic_hook, topic_multipliers, topic_target

TOPIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topic_classes")
FMT = {"contains_topic_word": ".3f", "first_token_mass": ".5f", "semantic_success": ".3f"}  # how each measure prints


@dataclass
class TopicConfig:
    init_from: str = "resume"  # 'resume' reads out_dir/ckpt.pt; or backpack-small, a local Hugging Face dir
    out_dir: str = "out"  # the checkpoint (init_from=resume); results go to out_dir/experiments/
    topic_words: str = "sports"  # a comma list, a file, a list in experiments/topic_classes/; ';' between topics; all
    topic_label: str = ""  # the classifier's label for a single topic; "" = the list's name (e.g. film_tv_video)
    strengths: str = "0,1,2,3"  # comma list of strengths 0..3 (the paper's multiplier table)
    num_samples: int = 100  # samples per strength (the paper: 500)
    max_new_tokens: int = 99  # tokens per sample (the paper: 100 tokens with the end-of-text prefix)
    batch_size: int = 16  # samples generated together
    temperature: float = 1.0  # 1.0 = pure ancestral sampling, as the paper
    top_k: int = 0  # 0 = off, as the paper
    show: int = 2  # samples printed per strength
    classifier: str = "cardiffnlp/tweet-topic-21-multi"  # Hugging Face topic classifier; "" = skip it
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # float32, bfloat16, float16 or auto (bf16/fp16 on CUDA)
    seed: int = 1337  # the same seed for every strength: strength 0 is the unmodified sample


def shipped_topics() -> list[str]:
    return sorted(f[:-4] for f in os.listdir(TOPIC_DIR) if f.endswith(".txt"))


def topic_words(value: str) -> tuple[list[str], str]:
    """One topic's words and name: the name of a list in experiments/topic_classes/, a file (named by
    its file name), or a comma list (no name)."""
    shipped = os.path.join(TOPIC_DIR, f"{value}.txt")
    path = shipped if os.path.isfile(shipped) else value
    if os.path.isfile(path):
        return tools.read_list(path, "topic_words"), os.path.splitext(os.path.basename(path))[0]
    if value.endswith(".txt") or os.sep in value:
        raise UserError(f"--topic_words={value} is not a file; pass a word list file, a comma list, all, or one "
                        f"of {', '.join(shipped_topics())}")
    return tools.read_list(value, "topic_words"), ""


def read_topics(value: str) -> list[tuple[str, list[str]]]:
    """(name, words) per topic: 'all' = every list in experiments/topic_classes/; else topics separated
    by ';', each as topic_words reads it."""
    if value == "all":
        return [(name, topic_words(name)[0]) for name in shipped_topics()]
    return [(name, words) for words, name in (topic_words(v.strip()) for v in value.split(";") if v.strip())]


def parse_strengths(value: str) -> list[int]:
    # the command line hands "0,1,2,3" over as the string of a tuple, "(0, 1, 2, 3)"
    parts = [s for s in re.split(r"[,\s]+", value.strip("()[] ")) if s]
    try:
        strengths = [int(s) for s in parts]
    except ValueError:
        strengths = []
    if not strengths or any(not 0 <= s < len(STRENGTHS) for s in strengths):
        raise UserError(f"--strengths={','.join(parts)} is not a comma list of 0..{len(STRENGTHS) - 1}; "
                        "e.g. --strengths=0,1,2,3")
    return strengths


def load_classifier(name: str):
    """(transformers pipeline, None), or (None, why it cannot be used)."""
    if not name:
        return None, "--classifier is empty"
    try:
        from transformers import pipeline
        return pipeline("text-classification", model=name), None
    except Exception as e:  # offline and not cached, transformers missing, a bad name
        return None, f"{name} could not be loaded ({first_line(e, 120)}); it needs network once"


def classifier_label(clf, wanted: str) -> str | None:
    """The classifier's label for a topic name, ignoring case and punctuation (film_tv_video matches
    film_tv_&_video); None when there is none."""
    norm = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731
    found = [lab for lab in clf.model.config.id2label.values() if wanted and norm(lab) == norm(wanted)]
    return found[0] if found else None


def semantic_success(clf, label: str, texts: list[str]) -> float:
    """The share of texts whose probability for `label` (sigmoid, a multi-label classifier) is > 0.5."""
    out = clf(texts, top_k=None, function_to_apply="sigmoid", truncation=True, batch_size=16)
    return sum(next(d["score"] for d in row if d["label"] == label) > 0.5 for row in out) / len(texts)


def sample(model, tok, cfg: TopicConfig, hook, start: list[int], first: torch.Tensor, ctx) -> tuple[list[str], float]:
    """num_samples texts under the hook, from the same seed, and the mean probability the model gave
    the first token of a topic word at each generated position."""
    torch.manual_seed(cfg.seed)  # the same random stream for every strength
    device = model.lm_head.weight.device
    texts, mass = [], []
    with model.hooked(hook), ctx:
        for b in range(0, cfg.num_samples, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num_samples - b)
            idx = torch.tensor([start] * n, dtype=torch.long, device=device)
            out, logits = generate(model, idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                         vocab_limit=tok.vocab_size, return_logits=True)
            probs = torch.softmax(logits[..., :tok.vocab_size].float(), dim=-1)  # (n, steps, V)
            mass.append(probs[..., first.to(device)].sum(-1).mean(1).cpu())  # (n,)
            texts += [tok.decode(row[len(start):].tolist()) for row in out]
    return texts, torch.cat(mass).mean().item()


def main(cfg: TopicConfig):
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.temperature < 0 or cfg.top_k < 0:
        raise UserError("num_samples, max_new_tokens and batch_size must be >= 1, temperature and top_k >= 0; "
                        "fix the flag")
    strengths = parse_strengths(cfg.strengths)
    topics = [(name or ",".join(words), words) for name, words in read_topics(cfg.topic_words)]
    if cfg.topic_label and len(topics) > 1:
        raise UserError("--topic_label is one topic's classifier label; pass it with a single topic")
    model, tok = tools.load_backpack(cfg.init_from, cfg.out_dir, cfg.device, "topic_control.py")
    device = model.lm_head.weight.device
    pieces = {name: [tools.word_ids(tok, w) for w in words] for name, words in topics}
    clf, why_not = load_classifier(cfg.classifier)
    print(f"semantic success: {f'skipped, {why_not}' if clf is None else cfg.classifier}")

    skip = [tok.eot_id] if tok.eot_id is not None else []
    targets = [topic_target(pieces[name], model.config.vocab_size) for name, _ in topics]
    # one pass over the vocabulary for every topic, cached on disk by the model's weights (steering.py)
    all_scores = many_topic_scores(model, targets, tok.vocab_size, skip, cache_for=cfg)
    start = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n")
    ctx = autocast_context(device.type, resolve_dtype(cfg.dtype, device.type))
    results = {}
    for (name, words), scores in zip(topics, all_scores):
        label = None if clf is None else classifier_label(clf, cfg.topic_label or name.replace(",", "_"))
        sizes = ", ".join(f"{w!r}={len(p)} token(s)" for w, p in zip(words, pieces[name]))
        print(f"\ntopic {name}: {sizes}")
        if clf is not None:
            print(f"classifier label: {label!r}" if label else f"classifier label: none matches "
                  f"{cfg.topic_label or name}, no semantic success (pass --topic_label)")
        first = torch.tensor(sorted({p[0] for p in pieces[name]}))  # the first token of every topic word
        pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        results[name] = per_strength = {}
        for s in strengths:
            hook = topic_hook(topic_multipliers(scores, s, tok.vocab_size), model.lm_head.weight, anneal_scale(s))
            texts, mass = sample(model, tok, cfg, hook, start, first, ctx)
            res = {"contains_topic_word": sum(bool(pattern.search(t)) for t in texts) / len(texts),
                   "first_token_mass": mass}
            if label:
                res["semantic_success"] = semantic_success(clf, label, texts)
            print(f"strength {s} {STRENGTHS[s]}: " + ", ".join(f"{k} {v:{FMT[k]}}" for k, v in res.items()))
            per_strength[s] = {**res, "samples": texts}
            for t in texts[:cfg.show]:
                print("  " + repr(t))

    # the mean over topics; semantic success over the topics the classifier has a label for
    mean = {s: {} for s in strengths}
    for s in strengths:
        for m in ("contains_topic_word", "first_token_mass", "semantic_success"):
            values = [r[s][m] for r in results.values() if m in r[s]]
            if values:
                mean[s][m] = sum(values) / len(values)
    metrics = list(mean[strengths[0]])
    print(f"\nmean over {len(results)} topic(s), {cfg.num_samples} samples of {cfg.max_new_tokens} tokens a strength:")
    print("| strength | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for s in strengths:
        print(f"| {s} | " + " | ".join(f"{mean[s][m]:{FMT[m]}}" for m in metrics) + " |")
    fname = re.sub(r"[^A-Za-z0-9_]+", "_", cfg.topic_words if len(topics) > 1 else topics[0][0])[:60]
    path = tools.write_json(os.path.join(tools.results_dir(cfg.out_dir), f"topic_control_{fname}.json"), {
        "source": tools.describe_source(cfg.init_from, cfg.out_dir), "config": vars(cfg),
        "classifier": cfg.classifier if clf else None, "multipliers": {s: STRENGTHS[s] for s in strengths},
        "mean": mean, "topics": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main, TopicConfig)
