"""
How a Backpack mixes the senses of a text. Two views:
- a heatmap of alpha (the sense weights) over (query, key) tokens, one panel per sense;
- an attribution table for the prediction made at one position (default: the last): which
  (earlier token j, sense l) pairs add most to the predicted token's logit. Pair (j, l) adds
  alpha[l, position, j] * (senses(x_j)[l] . E[token]), and all pairs sum to the logit exactly
  (the Backpack's LM head has no bias).

    python experiments/contextualization.py --out_dir=out-shakespeare-char
    python experiments/contextualization.py --out_dir=out-shakespeare-char --text="ROMEO: my lord" --senses=0,5,7
    python experiments/contextualization.py --out_dir=out-shakespeare-char --position=10 --token=e --top=20
    python experiments/contextualization.py --init_from=backpack-small --out_dir=out-backpack-small \
        --text="The capital of France is"

Results: <out_dir>/experiments/contextualization.png and contextualization.json.
"""

import math
import os
from dataclasses import dataclass

import torch

import tools  # noqa: F401  (puts the repo root on sys.path)
from common import UserError
from configurator import run_cli
from tools import (describe_source, load_backpack, read_list, results_dir, text_ids, token_strings, vocab_limit,
                   write_json)


@dataclass
class ContextualizationConfig:
    init_from: str = "resume"  # 'resume' loads out_dir/ckpt.pt; or backpack-small, a Hugging Face directory
    out_dir: str = "out"  # the checkpoint's folder; results go to out_dir/experiments/
    text: str = "To be, or not to be: that is the question"  # the text to look at
    senses: str = "all"  # comma-separated sense indices to draw (e.g. 0,3,7), or all
    position: int = -1  # attribute the prediction made at this position (of the token after it)
    token: str = ""  # the next token whose logit is attributed; empty: the model's top prediction
    top: int = 10  # rows of the attribution table
    device: str = "cpu"  # cpu, cuda, cuda:N, mps or auto
    seed: int = 1337  # random seed (nothing here is random; kept for the common flags)


def parse_senses(value: str, n_senses: int) -> list[int]:
    if value.strip() == "all":
        return list(range(n_senses))
    items = read_list(value, "senses")
    if not all(s.isdigit() and int(s) < n_senses for s in items):
        raise UserError(f"--senses={','.join(items)} is not a list of sense indices; use all, or numbers 0 to "
                        f"{n_senses - 1} separated by commas")
    return [int(s) for s in items]


def token_label(token: str) -> str:
    """A tick label that shows whitespace: spaces as '␣', newlines and tabs escaped."""
    return repr(token)[1:-1].replace(" ", "␣") or "''"


def plot_alpha(alpha, senses: list[int], labels: list[str], title: str):
    """alpha (k, T, T) -> a matplotlib Figure with one heatmap panel per requested sense, in a grid;
    rows are query positions, columns key positions (alpha is causal: the upper triangle is 0)."""
    from matplotlib.figure import Figure  # lazily: matplotlib is only needed here
    T = alpha.shape[-1]
    cols = math.ceil(math.sqrt(len(senses)))
    rows = math.ceil(len(senses) / cols)
    panel = min(12.0, max(2.5, 0.16 * T + 0.8))  # inches: room for one label per token, up to 64 tokens
    step = math.ceil(T / 64)  # a longer text labels every step-th token
    fig = Figure(figsize=(cols * panel + 1.0, rows * panel + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fontsize = 7 if T <= 48 else 5
    for ax, sense in zip(axes.flat, senses):
        image = ax.imshow(alpha[sense], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"sense {sense}", fontsize=9)
        ax.set_xticks(range(0, T, step), labels[::step], rotation=90, fontsize=fontsize)
        ax.set_yticks(range(0, T, step), labels[::step], fontsize=fontsize)
    for ax in axes.flat[len(senses):]:
        fig.delaxes(ax)
    fig.colorbar(image, ax=axes[:, -1].tolist(), shrink=0.8, label="alpha")
    fig.suptitle(f"{title}\nrow: query (predicting the next token), column: key", fontsize=10)
    return fig


def attribution_rows(contributions, alpha_row, sense_logits, labels: list[str], top: int) -> list[dict]:
    """The `top` (j, l) pairs by size of contribution, pushing for or against the token."""
    T, k = contributions.shape
    order = contributions.flatten().abs().argsort(descending=True)[:top].tolist()
    return [{"position": i // k, "token": labels[i // k], "sense": i % k, "alpha": float(alpha_row[i % k, i // k]),
             "sense_logit": float(sense_logits[i // k, i % k]), "contribution": float(contributions.flatten()[i])}
            for i in order]


@torch.no_grad()
def main(cfg: ContextualizationConfig):
    if cfg.top < 1:
        raise UserError(f"--top must be >= 1 (got {cfg.top})")
    model, tokenizer = load_backpack(cfg.init_from, cfg.out_dir, cfg.device, "contextualization.py")
    senses = parse_senses(cfg.senses, model.config.n_senses)
    ids = text_ids(tokenizer, cfg.text)
    T = len(ids)
    if not T or T > model.config.block_size:
        raise UserError(f"--text has {T} tokens; give 1 to {model.config.block_size} (the model's block_size)")
    if not -T <= cfg.position < T:
        raise UserError(f"--position={cfg.position} is outside the text's {T} tokens; use -{T} to {T - 1}")
    position = cfg.position % T
    idx = torch.tensor([ids], device=model.lm_head.weight.device)
    pieces = token_strings(tokenizer, ids)
    source = describe_source(cfg.init_from, cfg.out_dir)
    token = None  # the next token to attribute; None: the model's top prediction
    if cfg.token:
        token_ids = text_ids(tokenizer, cfg.token)
        if len(token_ids) != 1:
            raise UserError(f"--token={cfg.token!r} is {len(token_ids)} tokens; give the text of exactly one token")
        token = token_ids[0]

    # the heatmap
    alpha = model.contextualization(idx)[0].float().cpu()  # (k, T, T)
    fig = plot_alpha(alpha.numpy(), senses, [token_label(p) for p in pieces], f"alpha of {source}")
    png = os.path.join(results_dir(cfg.out_dir), "contextualization.png")
    fig.savefig(png, dpi=100)
    print(f"wrote {png} ({len(senses)} panels, {T} tokens)")

    # the attribution table
    logits = model(idx)[0][0, position]  # (V,)
    if token is None:
        token = int(logits[:vocab_limit(model, tokenizer)].argmax())
    logit, probability = float(logits[token]), float(logits.softmax(-1)[token])
    contributions = model.logit_contributions(idx, token, position)[0]  # (T, k); sums to logit
    sense_logits = torch.einsum("tld,d->tl", model.senses(idx)[0], model.lm_head.weight[token])  # (T, k)
    # only tokens up to the position can contribute (alpha is causal)
    rows = attribution_rows(contributions[:position + 1].cpu(), alpha[:, position], sense_logits.cpu(), pieces, cfg.top)
    token_text = token_strings(tokenizer, [token])[0]
    print(f"next token after position {position} ({pieces[position]!r}): {token_text!r}, "
          f"logit {logit:.4f}, probability {probability:.4f}")
    print(f"{'rank':>4} {'pos':>4} {'token':>10} {'sense':>5} {'alpha':>7} {'sense.E':>8} {'contribution':>12}")
    for rank, r in enumerate(rows, 1):
        print(f"{rank:>4} {r['position']:>4} {r['token']!r:>10} {r['sense']:>5} {r['alpha']:>7.4f} "
              f"{r['sense_logit']:>8.3f} {r['contribution']:>12.4f}")
    total = float(contributions.sum())
    print(f"sum of all {contributions.numel()} (position, sense) contributions: {total:.4f} (logit {logit:.4f})")

    path = write_json(os.path.join(results_dir(cfg.out_dir), "contextualization.json"), {
        "source": source, "text": cfg.text, "tokens": pieces, "senses_drawn": senses, "png": png,
        "position": position, "token": token_text, "token_id": token, "logit": logit,
        "probability": probability, "contribution_sum": total, "top": rows,
        "alpha_at_position": alpha[:, position].tolist(), "contributions": contributions.tolist()})
    print(f"wrote {path}")
    return {"png": png, "figure": fig, "rows": rows, "logit": logit, "contribution_sum": total}


if __name__ == "__main__":
    run_cli(main, ContextualizationConfig)
