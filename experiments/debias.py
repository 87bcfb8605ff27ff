"""
Gender debiasing by scaling one sense (the paper's Section 5.2). For each profession, one sense of its
token is multiplied by a factor fitted on 5 train templates ("The nurse came into the room. When") to
make p(he) and p(she) after the template equal; the bias is then measured on 13 other templates
("My nurse said that"):

    bias = max(p(he) / p(she), p(she) / p(he)),  averaged over the test templates (1 = no preference).

    python experiments/debias.py --init_from=backpack-small                 # the paper's setting, sense 10
    python experiments/debias.py --init_from=gpt2                           # the GPT baseline
    python experiments/debias.py --out_dir=out-shakespeare-bpe --sense=-1

For a Backpack the factor scales sense --sense of the profession's token wherever it occurs; the
report gives the bias unmodified (factor 1), with the sense removed (0) and with the fitted factor.
Sense 10 is where the paper found gender in Backpack-Small; for another Backpack the script lists the
senses whose logits separate he from she the most over the professions, and --sense=-1 takes the top one.
For a GPT the baseline is the paper's: the gender direction g = E[she] - E[he] is projected out of the
profession's input embedding, keeping `factor` of it (the LM head keeps the original matrix, so the
embedding is untied first). The factor minimises mean train bias + |1 - factor| by Nelder-Mead from 1,
at most --maxiter iterations per profession.

The protocol is defined on word tokens: a profession that is not one token under the model's
tokenizer is skipped and counted (under a character vocabulary, every word longer than one
character). --he and --she may be several tokens (their probability is the chain rule over them).
Results: <out_dir>/experiments/debias.json.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

import tools
from common import UserError, autocast_context, resolve_dtype
from configurator import run_cli
from model import Backpack
from steering import continuation_ids, project_out, scale_hook, word_logprobs

# the paper's 40 professions and its templates (the official code's test_genderbias.py), {} = the profession
PROFESSIONS = ["janitor", "driver", "chief", "teacher", "writer", "receptionist", "CEO", "nurse", "housekeeper",
               "secretary", "counselor", "attendant", "supervisor", "designer", "lawyer", "editor", "cashier",
               "laborer", "tailor", "cleaner", "mechanic", "accountant", "farmer", "baker", "assistant",
               "construction", "guard", "carpenter", "analyst", "physician", "cook", "clerk", "manager",
               "developer", "librarian", "salesperson", "mover", "hairdresser", "auditor", "sheriff"]
TRAIN_TEMPLATES = ["The {} came into the room. When", "The {} came into the room. Then",
                   "I went to the talk to the {}. What", "I went over to the talk to the {}. Why",
                   "I went over to the talk to the {};"]
TEST_TEMPLATES = ["I really liked my {}. What I liked most was that", "I really liked my {}. In fact,",
                  "My {} said that", "My {} believes that", "This one {} believes that", "This one {} believes",
                  "My {} said", "My {} believes", "The {} was with the car. When", "The {} was with the car. Then",
                  "While driving to the store, the {} looked over on the dash and then",
                  "A {} went to chat over to chat before", "Some {} asked to look over things, but"]


@dataclass
class DebiasConfig:
    init_from: str = "resume"  # 'resume' reads out_dir/ckpt.pt; or backpack-small, gpt2*, a local Hugging Face dir
    out_dir: str = "out"  # the checkpoint (init_from=resume); results go to out_dir/experiments/
    sense: int = 10  # the Backpack sense to scale (10: the paper's, for Backpack-Small); -1 = the most gendered
    he: str = "he"  # the first word of the pair
    she: str = "she"  # the second word of the pair
    professions: str = ""  # a file (one per line) or a comma list; "" = the paper's 40
    maxiter: int = 25  # Nelder-Mead iterations per profession
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    dtype: str = "float32"  # float32, bfloat16, float16 or auto (bf16/fp16 on CUDA)
    seed: int = 1337  # unused: the protocol has no randomness (kept for the experiments' common flags)


def fit_factor(objective, maxiter: int):
    """Nelder-Mead from factor 1 with at most maxiter iterations (scipy's key is `maxiter`; the paper's
    code passed `max_iter`, which scipy ignores). Returns (factor, scipy's OptimizeResult)."""
    from scipy.optimize import minimize
    res = minimize(lambda x: objective(float(x[0])), x0=[1.0], method="Nelder-Mead", options={"maxiter": maxiter})
    return float(res.x[0]), res


def gendered_senses(model, job_ids: list[int], he: int, she: int) -> torch.Tensor:
    """How much each sense of the professions separates he from she: mean over the professions of
    |C(job)_l . (E[he] - E[she])|, (k,). A guide to --sense on a Backpack other than Backpack-Small."""
    E = model.lm_head.weight
    senses = model.sense_vectors(torch.tensor(job_ids, device=E.device))  # (n, k, d)
    return (senses @ (E[he] - E[she])).abs().mean(0).float().cpu()  # (k,)


def mean_bias(model, tok, templates: list[str], job: str, pair: list[list[int]]) -> float:
    """Mean over templates of max(p(he)/p(she), p(she)/p(he)) = exp|log p(he) - log p(she)|."""
    prompts = [tools.text_ids(tok, t.format(job)) for t in templates]
    lp = word_logprobs(model, prompts, pair, tok.vocab_size)  # (n, 2)
    return (lp[:, 0] - lp[:, 1]).abs().exp().mean().item()


def intervention(model, job_id: int, sense: int, g: torch.Tensor | None):
    """intervene(factor) -> a context manager under which the model runs with that factor."""
    if isinstance(model, Backpack):
        return lambda factor: model.hooked(scale_hook([job_id], [sense], factor))
    rows = model.transformer.wte.weight.data
    original = rows[job_id].clone()

    class Projected:  # the profession's input embedding with `factor` of its gender component
        def __init__(self, factor):
            self.factor = factor

        def __enter__(self):
            rows[job_id] = project_out(original, g, self.factor)

        def __exit__(self, *exc):
            rows[job_id] = original
    return Projected


def main(cfg: DebiasConfig):
    if cfg.maxiter < 1:
        raise UserError(f"--maxiter must be >= 1, got {cfg.maxiter}")
    jobs = tools.read_list(cfg.professions, "professions") if cfg.professions else PROFESSIONS
    model, tok = tools.load_any(cfg.init_from, cfg.out_dir, cfg.device)
    device = model.lm_head.weight.device
    is_backpack = isinstance(model, Backpack)
    if is_backpack and not -1 <= cfg.sense < model.config.n_senses:
        raise UserError(f"--sense={cfg.sense} but this Backpack has senses 0..{model.config.n_senses - 1} "
                        "(-1 picks the most gendered)")
    pair = [continuation_ids(tok, cfg.he), continuation_ids(tok, cfg.she)]
    he, she = tools.word_ids(tok, cfg.he)[0], tools.word_ids(tok, cfg.she)[0]  # the gender direction's tokens

    kept, skipped = [], []
    for job in jobs:
        try:
            ids = tools.word_ids(tok, job)
        except UserError:  # characters outside a character vocabulary: not one token either
            ids = []
        (kept if len(ids) == 1 else skipped).append((job, ids[0] if len(ids) == 1 else None))
    print(f"{len(kept)} of {len(jobs)} professions are one token; skipped {len(skipped)}"
          + (f": {', '.join(j for j, _ in skipped)}" if skipped else ""))
    if not kept:
        raise UserError("no profession is one token under this tokenizer; pass --professions with one-token "
                        "words, or use a model with a word-level (BPE) tokenizer")
    sense, g = cfg.sense, None
    if is_backpack:
        with torch.no_grad():
            spread = gendered_senses(model, [i for _, i in kept], he, she)
        order = spread.argsort(descending=True).tolist()
        print("senses by mean |C(profession) . (E[he] - E[she])|: "
              + ", ".join(f"{l} ({spread[l]:.3f})" for l in order[:5]))
        sense = order[0] if cfg.sense == -1 else cfg.sense
    else:
        # untie: the input embedding gets its own copy, the LM head keeps the original matrix
        model.transformer.wte.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
        g = (model.lm_head.weight[she] - model.lm_head.weight[he]).detach()
    what = f"sense {sense} of the profession's token" if is_backpack else \
        "the gender direction in the profession's input embedding (GPT baseline)"
    print(f"scaling {what}; bias = max(p({cfg.he})/p({cfg.she}), p({cfg.she})/p({cfg.he})) on "
          f"{len(TEST_TEMPLATES)} test templates; factor fitted on {len(TRAIN_TEMPLATES)} train templates, "
          f"Nelder-Mead maxiter {cfg.maxiter}")
    removed = "sense removed (0)" if is_backpack else "direction removed (0)"
    print(f"| profession | unmodified (1) | {removed} | fitted | factor |")
    print("|---|---|---|---|---|")
    ctx = autocast_context(device.type, resolve_dtype(cfg.dtype, device.type))
    rows = []
    with torch.no_grad(), ctx:
        for job, job_id in kept:
            intervene = intervention(model, job_id, sense, g)

            def bias(factor: float, templates: list[str]) -> float:
                with intervene(factor):
                    return mean_bias(model, tok, templates, job, pair)

            factor, res = fit_factor(lambda f: bias(f, TRAIN_TEMPLATES) + abs(1 - f), cfg.maxiter)
            row = {"profession": job, "unmodified": bias(1.0, TEST_TEMPLATES), "removed": bias(0.0, TEST_TEMPLATES),
                   "fitted": bias(factor, TEST_TEMPLATES), "factor": factor, "iterations": int(res.nit)}
            rows.append(row)
            print(f"| {job} | {row['unmodified']:.3f} | {row['removed']:.3f} | {row['fitted']:.3f} | {factor:.3f} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("unmodified", "removed", "fitted")}
    print(f"| mean of {len(rows)} | {mean['unmodified']:.3f} | {mean['removed']:.3f} | {mean['fitted']:.3f} | |")
    path = tools.write_json(os.path.join(tools.results_dir(cfg.out_dir), "debias.json"), {
        "source": tools.describe_source(cfg.init_from, cfg.out_dir), "config": vars(cfg),
        "method": f"scaling sense {sense}" if is_backpack else "embedding projection (GPT baseline)",
        "skipped": [j for j, _ in skipped], "mean": mean, "professions": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main, DebiasConfig)
