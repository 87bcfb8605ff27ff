"""
Knowledge editing by sense projection (the paper's Section 5.3): every sense vector c of a word becomes
c - (c.o/|o|^2) o + (c.o/|i|^2) i, with o and i the embeddings of an out word and an in word, so what
the word's senses said about the out word they now say about the in word. The transformer and the
sense weights are untouched; the edit applies wherever the word's tokens occur.

    python experiments/edit.py --init_from=backpack-small --num_samples=2          # MacBook: Apple -> HP
    python experiments/edit.py --init_from=backpack-small --interactive=True       # then type prompts
    python experiments/edit.py --out_dir=out-shakespeare-bpe --word=Rome --out_word=Romans --in_word=Greeks \\
        --prompts="Brutus, the noble Roman of Rome|The fame of Rome"
    python experiments/edit.py --out_dir=out-shakespeare-char --word=KING --out_word=HENRY --in_word=RICHARD \\
        --prompts="KING" --first_piece=True

A word of several tokens is edited in every piece (--first_piece=True: only the first, as the paper's
code did); the output says which. o and i are the embeddings of the first token of the out and in
words. Under a character vocabulary the pieces are characters, shared by every word, so the edit
reaches all text containing them.

Output: for every prompt (--prompts: a file with one per line, or prompts separated by '|'), the
probability of the out and in words right after it (all their tokens, by the chain rule), before and
after the edit; with --num_samples > 0, samples before and after from the same seed;
--interactive=True then reads more prompts from stdin. Results: <out_dir>/experiments/edit.json.
"""

import os
import sys
from dataclasses import dataclass

import torch

import tools  # first of the repo's modules: it puts the repo root on sys.path
from common import UserError, autocast_context, resolve_dtype
from configurator import run_cli
from generate import generate
from steering import continuation_ids, edit_senses, replace_hook, word_logprobs


@dataclass
class EditConfig:
    init_from: str = "resume"  # 'resume' reads out_dir/ckpt.pt; or backpack-small, a local Hugging Face dir
    out_dir: str = "out"  # the checkpoint (init_from=resume); results go to out_dir/experiments/
    word: str = "MacBook"  # the word whose senses are edited (' ' + word under GPT-2 BPE)
    out_word: str = "Apple"  # the association taken out of the word's senses
    in_word: str = "HP"  # the association put in its place
    first_piece: bool = False  # edit only the first token of a word of several tokens (the paper's code)
    prompts: str = "The MacBook is best known for|The MacBook is made by"  # a file (one a line) or '|'-separated
    num_samples: int = 0  # samples per prompt before and after the edit; 0 = none
    max_new_tokens: int = 40  # tokens per sample
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    top_k: int = 0  # 0 = off
    interactive: bool = False  # after --prompts, read prompts from stdin, one per line, until end of input
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # float32, bfloat16, float16 or auto (bf16/fp16 on CUDA)
    seed: int = 1337  # the samples before and after the edit use the same seed


def main(cfg: EditConfig):
    if cfg.num_samples < 0 or cfg.max_new_tokens < 1 or cfg.temperature < 0 or cfg.top_k < 0:
        raise UserError("num_samples must be >= 0, max_new_tokens >= 1, temperature and top_k >= 0; fix the flag")
    prompts = tools.read_list(cfg.prompts, "prompts", sep="|", strip=False)
    model, tok = tools.load_backpack(cfg.init_from, cfg.out_dir, cfg.device, "edit.py")
    device = model.lm_head.weight.device
    pieces = tools.word_ids(tok, cfg.word)
    edited = sorted(set(pieces[:1] if cfg.first_piece else pieces), key=pieces.index)
    out_ids, in_ids = tools.word_ids(tok, cfg.out_word), tools.word_ids(tok, cfg.in_word)
    E = model.lm_head.weight
    with torch.no_grad():
        new = edit_senses(model.sense_vectors(torch.tensor(edited, device=device)), E[out_ids[0]], E[in_ids[0]])
    hook = replace_hook(edited, new)
    show = lambda ids: ", ".join(repr(tok.decode([i])) for i in ids)  # noqa: E731
    which = ("one token" if len(pieces) == 1 else "only the first piece (--first_piece=True)" if cfg.first_piece
             else "every piece (--first_piece=True edits only the first)")
    print(f"editing {cfg.word!r} = {len(pieces)} token(s) [{show(pieces)}]: {which}, all {model.config.n_senses} "
          f"senses of [{show(edited)}] wherever they occur")
    print(f"out {cfg.out_word!r}: direction of [{show(out_ids[:1])}]; "
          f"in {cfg.in_word!r}: direction of [{show(in_ids[:1])}]")

    words = [continuation_ids(tok, cfg.out_word), continuation_ids(tok, cfg.in_word)]
    ctx = autocast_context(device.type, resolve_dtype(cfg.dtype, device.type))
    print(f"| prompt | p({cfg.out_word}) before | after | p({cfg.in_word}) before | after |")
    print("|---|---|---|---|---|")
    rows = []

    def run(prompt: str):
        ids = tools.text_ids(tok, prompt)
        if not ids:
            return
        if cfg.word in prompt and not set(edited) & set(ids):
            print(f"note: {prompt!r} spells {cfg.word!r} with other tokens than the edited ones, so the edit does not "
                  "reach it (GPT-2 BPE writes a word at the start of a text without its leading space)")
        with ctx:
            before = word_logprobs(model, [ids], words, tok.vocab_size).exp()[0]  # (2,)
            with model.hooked(hook):
                after = word_logprobs(model, [ids], words, tok.vocab_size).exp()[0]
        cell = prompt.replace("\n", "\\n")  # one table row per prompt
        print(f"| {cell} | {before[0]:.3g} | {after[0]:.3g} | {before[1]:.3g} | {after[1]:.3g} |")
        row = {"prompt": prompt, "out_before": before[0].item(), "out_after": after[0].item(),
               "in_before": before[1].item(), "in_after": after[1].item()}
        for name, h in (("before", None), ("after", hook)):
            if cfg.num_samples:
                torch.manual_seed(cfg.seed)
                x = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
                with model.hooked(h), ctx:
                    y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k or None, vocab_limit=tok.vocab_size)
                row[f"samples_{name}"] = [tok.decode(r.tolist()) for r in y]
                for s in row[f"samples_{name}"]:
                    print(f"  {name}: {s!r}")
        rows.append(row)

    for p in prompts:
        run(p)
    if cfg.interactive:
        print("reading prompts from stdin, one per line (end of input stops)", file=sys.stderr)
        for line in sys.stdin:
            try:
                run(line.rstrip("\n"))
            except UserError as e:  # e.g. a character outside the vocabulary: say so, read the next line
                print(f"error: {e}")
    path = tools.write_json(os.path.join(tools.results_dir(cfg.out_dir), "edit.json"), {
        "source": tools.describe_source(cfg.init_from, cfg.out_dir), "config": vars(cfg),
        "edited_tokens": [tok.decode([i]) for i in edited], "prompts": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main, EditConfig)
