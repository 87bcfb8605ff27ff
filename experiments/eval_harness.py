"""
The paper's language-modeling evaluation (Section 4, Table 2) with the current lm-evaluation-harness
(PyPI lm-eval 0.4.x): no fork, no plugin flag. Any model of this repo, any of its tokenizers:

    python experiments/eval_harness.py --init_from=backpack-small --device=cuda     # the published Backpack-Small
    python experiments/eval_harness.py --init_from=hf-backpack-small --device=cuda  # from convert_flash_ckpt.py
    python experiments/eval_harness.py --init_from=gpt2 --tasks=lambada_openai --limit=200
    python experiments/eval_harness.py --out_dir=out-shakespeare-char --include_path=tests/fixtures/lm_eval \\
        --tasks=tiny_rolling,tiny_lambada,blimp_tiny

The default tasks are the paper's: wikitext (word perplexity), lambada_openai (perplexity, accuracy)
and BLiMP's 67 subtasks, reported by lm-eval's `blimp` group as their mean accuracy. Their data sets
download from the Hugging Face hub on first use; --include_path adds a folder of task YAMLs (local
json/jsonl data works offline, see tests/fixtures/lm_eval/).

How the model is scored (class NanoLM):
- log-probabilities over the tokenizer's ids only: the rows of a padded vocabulary (50264, 50304) get
  no probability, as in the paper's harness (it cut the logits to GPT-2's 50257);
- every document starts after the end-of-text token (<|endoftext|> for GPT-2 BPE, [SEP] for Chinese
  BERT); a vocabulary without one (nanoGPT's character ones) starts after a newline;
- perplexity uses lm-eval's own rolling windows, max length = the model's block size;
- a long context is cut from the left, as HFLM cuts it; a continuation longer than the block size is
  a one-line error. A generated answer keeps the last block_size - max_gen_toks prompt tokens in view
  (HFLM's rule); one that alone fills the window slides past it after a full window of prompt;
- BLiMP is scored as the paper did: each sentence alone after the end-of-text token, with no leading
  space. lm-eval 0.4 puts a space in front of it (its target_delimiter); this script sets the
  delimiter of every blimp_* task to "" (--blimp_leading_space=True keeps lm-eval 0.4's way);
- a character-level model refuses documents with characters outside its vocabulary, naming them, or
  with --skip_unknown=True skips those documents and says how many (<|endoftext|> written in a
  document is the end-of-text token, not unknown characters);
- a Hugging Face directory whose config.json names no tokenizer of this repo is read with its own
  tokenizer files (vocab.json + merges.txt, or tokenizer.json), offline.

Output: lm-eval's progress bars and table, then as the last line one JSON object {task: {metric:
value}} with lm-eval's metric names (acc, perplexity, word_perplexity, ...) without the filter suffix.
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
from lm_eval import simple_evaluate, utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path[0] = REPO  # run as a script: the repo's modules are imported from its root, not from here

from checkpoint import load_model  # noqa: E402
from common import (Tokenizer, UserError, autocast_context, did_you_mean, first_line,  # noqa: E402
                    resolve_device, resolve_dtype)
from configurator import run_cli  # noqa: E402
from generate import generate  # noqa: E402

PAPER_TASKS = "wikitext,lambada_openai,blimp"


@dataclass
class EvalConfig:
    init_from: str = "resume"  # 'resume' reads out_dir/ckpt.pt; or gpt2*, backpack-small, a local Hugging Face dir
    out_dir: str = "out"  # the checkpoint, for init_from=resume
    tasks: str = PAPER_TASKS  # comma-separated lm-eval task or group names
    include_path: str = ""  # a folder of extra task YAMLs
    limit: float = 0  # documents per task: 0 = all, < 1 = that fraction
    batch_size: int = 8  # sequences per forward pass
    max_gen_toks: int = 256  # generate_until tasks: tokens per answer, unless the task says otherwise
    device: str = "auto"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # float32, bfloat16, float16 or auto (bf16/fp16 on CUDA)
    skip_unknown: bool = False  # char-level models: skip (and count) documents with characters outside the vocab
    blimp_leading_space: bool = False  # score BLiMP as lm-eval 0.4 does (" " + sentence) instead of as the paper
    bootstrap_iters: int = 1000  # bootstrap samples for the stderr of perplexities; 0 = no stderr


# -----------------------------------------------------------------------------
# the model, as lm-eval sees it


def document_prefix(tokenizer: Tokenizer) -> int:
    """The token every document is scored after: end-of-text, else (nanoGPT's character vocabularies
    have none) a newline, the boundary of their corpora."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    try:
        ids = tokenizer.encode("\n")
    except UserError:  # a character vocabulary without "\n" and without [UNK]
        ids = []
    if len(ids) != 1 or tokenizer.decode(ids) != "\n":  # decode: "\n" may have become [UNK]
        raise UserError("this vocabulary has neither an end-of-text token nor a newline to start documents "
                        "after; lm-eval needs one of them")
    return ids[0]


def scoring_row(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The ids the model reads to score a continuation in one forward pass: as lm-eval's HFLM, the
    last max_length tokens before each predicted one, so a long context is cut from the left. The
    continuation itself must fit: its first token is predicted from the last context token."""
    if len(continuation) > max_length:
        raise UserError(f"lm-eval asks for the log-probability of a {len(continuation)}-token continuation, longer "
                        f"than this model's block_size {max_length}; leave out the task or use a model with a "
                        f"block_size >= {len(continuation)}")
    return (context + continuation)[-(max_length + 1):][:-1]


def generation_context(ids: list[int], max_new: int, max_length: int) -> list[int]:
    """The prompt ids generate_until keeps. As HFLM: the last max_length - max_new, so that the whole
    answer is generated with all of them in view. When the answer alone fills the window (max_new >=
    max_length, which HFLM refuses), generate() slides its window as sample.py does; the prompt then
    keeps a full window, so the answer starts from as much of it as the model can see."""
    return ids[-(max_length - max_new if max_new < max_length else max_length):]


class NanoLM(TemplateLM):
    """lm-eval's view of a GPT or Backpack of this repo. TemplateLM turns (context, continuation) pairs
    into token ids exactly as lm-eval's HFLM does; this class scores them, rolls windows over documents
    and generates. Ids >= the tokenizer's vocab_size are cut from the logits before log_softmax."""

    def __init__(self, model, tokenizer: Tokenizer, batch_size: int = 8, device: str = "cpu",
                 dtype: str = "float32", max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = torch.device(device)
        self.autocast = autocast_context(device, dtype)
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.vocab_size = tokenizer.vocab_size
        self.prefix = document_prefix(tokenizer)

    @property
    def eot_token_id(self) -> int:
        return self.prefix if self.tokenizer.eot_id is None else self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.prefix

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.spec["kind"]

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, T, vocab_size) float32 log-probabilities of right-padded rows of ids (the model is causal,
        so the padding changes nothing before it)."""
        x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for b, row in enumerate(rows):
            x[b, :len(row)] = torch.tensor(row)
        with self.autocast:
            logits = self.model(x.to(self._device))[0]  # (B, T, V)
        return logits[..., :self.vocab_size].float().log_softmax(-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) ->
        (sum of the continuation's log-probabilities, whether greedy decoding gives it)."""
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        from tqdm import tqdm
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = [scoring_row(requests[i][1], requests[i][2], self.max_length) for i in batch]
            log_probs = self._log_probs(rows)
            for i, row, lp in zip(batch, rows, log_probs):
                string, _, cont = requests[i]
                lp = lp[len(row) - len(cont):len(row)]  # (len(cont), vocab): the continuation's predictions
                target = torch.tensor(cont, device=lp.device)
                answer = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
                results[i] = answer
                if string is not None:
                    self.cache_hook.add_partial("loglikelihood", string, answer)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-probability, scored in lm-eval's rolling windows of max_length
        tokens: every token predicted once, the first one after the document prefix."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for window in utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix,
                                                          max_seq_len=self.max_length, context_len=1):
                windows.append((None, *utils.make_disjoint_window(window)))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """generate() until a stop string or end-of-text; greedy unless the task samples."""
        out = []
        from tqdm import tqdm
        for req in tqdm(requests, disable=disable_tqdm, desc="Running generate_until requests"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = generation_context(self.tok_encode(context), max_new, self.max_length)
            x = torch.tensor([ids], dtype=torch.long, device=self._device)
            with torch.no_grad(), self.autocast:
                y = generate(self.model, x, max_new, temperature=temperature, top_k=kwargs.get("top_k"),
                             top_p=kwargs.get("top_p"), eos_id=self.tokenizer.eot_id,
                             stop=lambda new: any(s in self.tokenizer.decode(new) for s in until),
                             vocab_limit=self.vocab_size)
            new = [t for t in y[0, len(ids):].tolist() if t >= 0 and t != self.tokenizer.eot_id]
            text = self.tokenizer.decode(new)
            for s in until:  # the answer ends before its stop string, as lm-eval's own models cut it
                text = text.split(s)[0] if s else text
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def register():
    """Name NanoLM in lm-eval's model registry ("nanobackpacklm", for lm-eval's get_model). main does
    it, not the import: importing a script changes nothing global."""
    try:
        register_model("nanobackpacklm")(NanoLM)
    except ValueError:  # the name holds this file's class loaded under another module name: that one stands
        pass


# -----------------------------------------------------------------------------
# the tasks


def load_tasks(names: list[str], include_path: str):
    """(lm-eval's TaskManager, its {"tasks", "groups", "group_map"} for names). Tasks found in
    include_path alone are loaded without indexing lm-eval's thousands of built-in ones."""
    from lm_eval.tasks import TaskManager
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path={include_path} is not a folder; pass a folder of task YAMLs")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(n in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include_path or None)
    for name in names:
        if name not in manager.all_tasks:
            raise UserError(f"unknown lm-eval task {name!r}; {did_you_mean(name, manager.all_tasks)}")
    try:
        return manager, manager.load(names)
    except Exception as e:  # the data sets download on first use
        raise UserError(f"could not load the tasks {','.join(names)} ({type(e).__name__}: {first_line(e)}); "
                        "their data downloads from the Hugging Face hub on first use: go online once, or "
                        "pass --include_path with local task files") from None


def score_blimp_as_the_paper(tasks: dict):
    """lm-eval 0.3 (the paper's) scored loglikelihood("", sentence): the sentence's tokens after the
    end-of-text token. 0.4 joins context and sentence with its target_delimiter, a space, so the
    sentence would start with " ". An empty delimiter scores the sentence alone again."""
    for name, task in tasks.items():
        if name.startswith("blimp_"):
            task.set_config("target_delimiter", "")


def strings_in(doc) -> list[str]:
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        doc = list(doc.values())
    return [s for v in doc for s in strings_in(v)] if isinstance(doc, (list, tuple)) else []


def check_characters(tasks: dict, tokenizer: Tokenizer, skip: bool) -> dict:
    """For a character vocabulary: refuse, or with skip drop, the documents of each task that hold
    characters outside it. Returns {task: documents skipped}."""
    def unknown(doc) -> set:  # <|endoftext|> in a document is known: encoding makes it the end-of-text id
        return set().union(*(tokenizer.chars.unknown_chars(s, tokenizer.eot_id) for s in strings_in(doc)))

    skipped = {}
    for name, task in tasks.items():
        split = task.config.test_split if task.has_test_docs() else task.config.validation_split
        docs = task.dataset[split]
        bad = {i: chars for i, doc in enumerate(docs) if (chars := unknown(doc))}
        if not bad:
            continue
        chars = sorted(set().union(*bad.values()))
        if not skip:
            raise UserError(f"task {name}: {len(bad)} of {len(docs)} documents hold characters outside this model's "
                            f"vocabulary: {chars[:20]}; pass --skip_unknown=True to skip and count them")
        task.dataset[split] = docs.select([i for i in range(len(docs)) if i not in bad])
        skipped[name] = len(bad)
        print(f"{name}: skipped {len(bad)} of {len(docs)} documents with characters outside the vocabulary "
              f"({''.join(chars[:20])!r})")
    return skipped


def metrics_json(results: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results, without the ",none" filter suffix and stderrs."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():  # "acc,none": metric acc under lm-eval's default filter
            metric, comma, filter_name = key.partition(",")
            if comma and "_stderr" not in metric and isinstance(value, (int, float)):
                row[metric if filter_name == "none" else key] = value
        out[task] = row
    return out


def main(cfg: EvalConfig):
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty; pass task names, e.g. --tasks=" + PAPER_TASKS)
    if cfg.batch_size < 1 or cfg.limit < 0 or cfg.max_gen_toks < 1:
        raise UserError(f"--batch_size and --max_gen_toks must be >= 1 and --limit >= 0 (got {cfg.batch_size}, "
                        f"{cfg.max_gen_toks}, {cfg.limit})")
    register()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_model(cfg.init_from, cfg.out_dir, device)
    lm = NanoLM(model, tokenizer, cfg.batch_size, device, dtype, cfg.max_gen_toks)
    manager, loaded = load_tasks(names, cfg.include_path)
    if not cfg.blimp_leading_space:
        score_blimp_as_the_paper(loaded["tasks"])
    skipped = check_characters(loaded["tasks"], tokenizer, cfg.skip_unknown) if tokenizer.chars is not None else {}
    # lm-eval evaluates what it is handed; hand it the requested groups and tasks, not their members again
    members = {m for kids in loaded["group_map"].values() for m in kids}
    top = [obj for name, obj in {**loaded["groups"], **loaded["tasks"]}.items() if name not in members]
    limit = None if not cfg.limit else (cfg.limit if cfg.limit < 1 else int(cfg.limit))
    results = simple_evaluate(model=lm, tasks=top, task_manager=manager, limit=limit, log_samples=False,
                              bootstrap_iters=cfg.bootstrap_iters)
    print(utils.make_table(results))
    if "groups" in results:
        print(utils.make_table(results, "groups"))
    if skipped:
        print("skipped documents (characters outside the vocabulary): " + json.dumps(skipped))
    print(json.dumps(metrics_json(results)))


if __name__ == "__main__":
    run_cli(main, EvalConfig)
