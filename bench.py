"""
Time a GPT or a Backpack: a training step (forward, backward and the optimizer step, each timed on
its own) or generation. Any train config works, with train.py's --key=value overrides:

    python bench.py config/train_shakespeare_char.py --device=cpu --compile=False
    python bench.py config/train_shakespeare_char.py --device=cpu --compare=True --n_layer=4 --n_head=4 \
        --n_embd=128 --block_size=64 --batch_size=12 --dropout=0.0
    python bench.py --dataset=shakespeare --device=cpu --compare=True --block_size=256 --batch_size=4
    python bench.py config/train_shakespeare_char.py --device=cpu --mode=generate --compare=True
    python bench.py config/train_shakespeare_char.py --profile=True   # also a chrome trace per model
    python bench.py --mode=topic --dataset=none --device=cpu --topic_tokens=512 --warmup_steps=1 --steps=5

Train mode times one micro-batch per step (gradient_accumulation_steps is not used): medians (and
minima) over `steps` timed steps after `warmup_steps`. --compile=True times the eager model too, in
the same loop, for the compiled/eager ratio, and counts torch.compile's graph breaks. Every model
and variant gets the same batches, interleaved step by step, so that load from other processes
hits them alike. --compare=True does this for a GPT and a Backpack of the same trunk. Generate mode
(eager, batch 1) times generate() cached and uncached next to the floor: one forward pass of a
single token. Topic mode times the Backpack's topic scoring pass (experiments/steering.py: every
sense of every token against the vocabulary, what topic_control.py and the explorer run) next to a
bare torch.matmul of the same shapes, chunk for chunk, interleaved; --topic_tokens scores a fraction
of the vocabulary's rows (always against all its columns) and the full pass is extrapolated from it.
The last line printed is one JSON object with the figures. On a machine that other jobs share,
OMP_NUM_THREADS=1 and --timer=cpu (CPU time, not elapsed time) give steadier figures.
"""

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from common import UserError, autocast_context, compile_model, get_batch, load_meta, peak_flops, \
    resolve_device, resolve_dtype, tokenizer_spec_from_meta
from configurator import run_cli
from generate import generate
from runs import check_config, check_data_dir
from train import TrainConfig, init_model


@dataclass
class BenchConfig(TrainConfig):
    # what to time; every other key is train.py's (model, data, device, dtype, compile, config files)
    mode: str = "train"  # train: a training step; generate: generate(), cached and uncached; topic: topic scoring
    compare: bool = False  # time a GPT and a Backpack with the same trunk; report Backpack/GPT
    data: str = "real"  # real: batches of data/<dataset> (or --data_dir); random: uniform random ids
    warmup_steps: int = 5  # untimed steps first (compilation, allocator, caches)
    steps: int = 30  # timed steps (train) or single-token forward passes (the generation floor)
    profile: bool = False  # also write a torch profiler trace (chrome json) of 3 steps (32 tokens) per variant
    new_tokens: int = 200  # generate: tokens after a 1-token prompt (at most block_size - 1)
    past_block_tokens: int = 16  # generate: tokens after a block_size-token prompt; 0 skips those rows
    gen_runs: int = 1  # generate: runs of each generation row; the median is reported
    timer: str = "wall"  # wall: elapsed time; cpu: this process's CPU time, steadier on a busy machine (CPU only)
    topic_tokens: int = 0  # topic: tokens whose senses are scored per timed pass; 0 = the whole vocabulary


@dataclass
class Variant:
    """One thing to time: a model, eager or compiled, with its optimizer and what was measured."""
    key: str  # e.g. "backpack_compiled": its row in the table, its prefix in the JSON line
    model: torch.nn.Module  # what is called: the model or its torch.compile wrapper
    raw: torch.nn.Module  # the model itself (FLOPs, generate)
    optimizer: torch.optim.Optimizer
    graph_breaks: int | None = None  # compiled variants only
    times: list = field(default_factory=list)  # [forward, backward, optimizer] ms per timed step
    flops: list = field(default_factory=list)  # training FLOPs per timed step
    peak_mem: int = 0  # CUDA max allocated bytes over the timed steps


class Clock:
    """Time marks on the device: CUDA events (no synchronization inside a step), else perf_counter
    after a synchronization (CPU ops are synchronous already). timer="cpu" counts the CPU time of
    this process instead: on a machine shared with other jobs it leaves out the time the scheduler
    gave to them (not their effect on caches); with n threads it is n times the wall time."""

    def __init__(self, device: str, timer: str = "wall"):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.now = time.process_time if timer == "cpu" else time.perf_counter

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            torch.mps.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        self.sync()
        return self.now()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000


def max_rss_mb() -> float | None:
    """The process's peak resident memory (None where the resource module is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def check_bench_config(cfg: BenchConfig):
    check_config(cfg, world_size=1)
    choices_of = {"mode": ("train", "generate", "topic"), "data": ("real", "random"), "timer": ("wall", "cpu")}
    for key, choices in choices_of.items():
        if getattr(cfg, key) not in choices:
            raise UserError(f"unknown --{key}={getattr(cfg, key)}; choose one of {', '.join(choices)}")
    for key in ("steps", "new_tokens", "gen_runs"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be positive (got {getattr(cfg, key)}); pass --{key}=N with N >= 1")
    if min(cfg.warmup_steps, cfg.past_block_tokens, cfg.topic_tokens) < 0:
        raise UserError("warmup_steps, past_block_tokens and topic_tokens must be >= 0; pass --key=N with N >= 0")
    if cfg.mode == "topic" and (cfg.compare or cfg.model_type != "backpack"):
        raise UserError("--mode=topic times a Backpack's sense scoring; pass --model_type=backpack --compare=False")


def batch_source(cfg: BenchConfig, data_dir: str | None, meta: dict | None, vocab_size: int, device: str):
    """A function returning the next (X, Y), each (B, T): windows of train.bin, or uniform random ids."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.data == "real":
        return lambda: get_batch(data_dir, "train", meta, cfg.batch_size, cfg.block_size, rng, device, vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed)

    def random_batch():
        xy = torch.randint(vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=gen)  # (B, T+1)
        return xy[:, :-1].to(device), xy[:, 1:].to(device)
    return random_batch


def train_step(v: Variant, X, Y, ctx, clock: Clock, grad_clip: float, label=None) -> list[float]:
    """One training step as train.py takes it; returns its [forward, backward, optimizer] ms."""
    label = label or (lambda name: contextlib.nullcontext())
    marks = [clock.mark()]
    with label("forward"), ctx:
        _, loss = v.model(X, Y)
    marks.append(clock.mark())
    with label("backward"):
        loss.backward()
    marks.append(clock.mark())
    with label("optimizer"):
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(v.raw.parameters(), grad_clip)
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    marks.append(clock.mark())
    clock.sync()
    return [clock.ms(a, b) for a, b in zip(marks, marks[1:])]


def time_variants(variants: list[Variant], batch, ctx, clock: Clock, steps: int, warmup_steps: int,
                  grad_clip: float = 1.0):
    """warmup_steps + steps rounds; in each, every variant takes a step on the same batch."""
    for i in range(warmup_steps + steps):
        X, Y = batch()
        for v in variants:
            if clock.cuda:
                torch.cuda.reset_peak_memory_stats(clock.device)
            ms = train_step(v, X, Y, ctx, clock, grad_clip)
            if i >= warmup_steps:
                v.times.append(ms)
                if hasattr(v.raw, "flops_per_fwdbwd"):
                    v.flops.append(v.raw.flops_per_fwdbwd(X))
                if clock.cuda:
                    v.peak_mem = max(v.peak_mem, torch.cuda.max_memory_allocated(clock.device))


def stats(v: Variant, tokens_per_step: int, peak: float) -> dict:
    """Medians over the timed steps (the step's median is of whole steps, not a sum of medians)."""
    fwd, bwd, opt = (statistics.median(t[i] for t in v.times) for i in range(3))
    steps = [sum(t) for t in v.times]
    ms = statistics.median(steps)
    flops = statistics.median(v.flops) if v.flops else None
    return {"ms": ms, "min_ms": min(steps), "fwd_ms": fwd, "bwd_ms": bwd, "opt_ms": opt,
            "tokens_per_s": tokens_per_step / ms * 1000, "flops_per_s": flops and flops / ms * 1000,
            "mfu": flops and flops / ms * 1000 / peak, "mfu_best": flops and flops / min(steps) * 1000 / peak,
            "peak_mem_mb": v.peak_mem / 2**20 if v.peak_mem else None, "graph_breaks": v.graph_breaks}


def compiled_variant(raw, optimizer, model_type: str, batch, ctx) -> Variant | None:
    """torch.compile(raw) after its first forward and backward (so both compile here), with the
    graph breaks Dynamo counted; None if compiling failed (common.compile_model warned)."""
    from torch._dynamo.utils import counters
    counters.clear()
    X, Y = batch()

    def first_call(compiled):
        with ctx:
            compiled(X, Y)[1].backward()
    compiled = compile_model(raw, first_call)
    raw.zero_grad(set_to_none=True)
    if compiled is raw:
        return None
    breaks = sum(counters["graph_break"].values())
    return Variant(f"{model_type}_compiled", compiled, raw, optimizer, breaks)


def write_trace(name: str, work, what: str, clock: Clock, out_dir: str):
    """work() under the torch profiler: a chrome trace (open in chrome://tracing or Perfetto) and the
    ops that took the most time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        work()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench_trace_{name}.json")
    prof.export_chrome_trace(path)
    sort = "self_cuda_time_total" if clock.cuda else "self_cpu_time_total"
    print(f"\n{name}: profiler trace of {what} written to {path}; the ops that took the most time:")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def run_train(cfg: BenchConfig, models: dict, batch, ctx, clock: Clock, device: str, dtype: str) -> dict:
    """Time the training step of each model (eager, and compiled with --compile=True); the table and
    the ratios compiled/eager and Backpack/GPT."""
    variants = []
    for model_type, model in models.items():
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device.split(":")[0])
        variants.append(Variant(f"{model_type}_eager", model, model, optimizer))
        if cfg.compile:
            compiled = compiled_variant(model, optimizer, model_type, batch, ctx)
            variants += [compiled] if compiled else []
    peak, peak_description = peak_flops(device, dtype)
    time_variants(variants, batch, ctx, clock, cfg.steps, cfg.warmup_steps, cfg.grad_clip)
    results = {v.key: stats(v, cfg.batch_size * cfg.block_size, peak) for v in variants}
    print(f"\n{'variant':<18} {'forward':>8} {'backward':>9} {'optim':>7} {'step ms (min)':>17} {'tokens/s':>9} "
          f"{'MFU':>6} {'peak mem':>8}")
    for key, r in results.items():
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_mb']:.0f}MB" if r["peak_mem_mb"] else "-"
        print(f"{key:<18} {r['fwd_ms']:>8.2f} {r['bwd_ms']:>9.2f} {r['opt_ms']:>7.2f} {r['ms']:>8.2f} "
              f"({r['min_ms']:>7.2f}) {r['tokens_per_s']:>9,.0f} {mfu:>6} {mem:>8}")
    print(f"MFU: the model's training FLOPs per step time, against {peak_description}")
    if not clock.cuda and (rss := max_rss_mb()):  # one figure: the variants share the process
        print(f"peak memory: the process's max RSS, {rss:.0f}MB, all variants together")
    out = {"mode": "train", "device": device, "dtype": dtype, "peak_flops": peak}
    for v in variants:
        out.update({f"{v.key}_{name}": value for name, value in results[v.key].items()})
    for model_type in models:  # the headline figure: compiled where it compiled, else eager
        eager, compiled = results[f"{model_type}_eager"], results.get(f"{model_type}_compiled")
        out[f"{model_type}_ms"] = (compiled or eager)["ms"]
        if compiled:
            out[f"{model_type}_compiled_vs_eager"] = ratio = compiled["ms"] / eager["ms"]
            print(f"{model_type}: compiled/eager step time {ratio:.3f}, graph breaks {compiled['graph_breaks']}")
    if len(models) == 2:
        for kind in ("eager", "compiled"):
            if f"gpt_{kind}" in results and f"backpack_{kind}" in results:
                out[f"ratio_{kind}"] = results[f"backpack_{kind}"]["ms"] / results[f"gpt_{kind}"]["ms"]
                print(f"Backpack/GPT step time, {kind}: {out[f'ratio_{kind}']:.3f} (minima: "
                      f"{results[f'backpack_{kind}']['min_ms'] / results[f'gpt_{kind}']['min_ms']:.3f})")
        out["ratio"] = out["backpack_ms"] / out["gpt_ms"]
    if cfg.profile:
        for v in variants:
            def steps(v=v):
                for _ in range(3):
                    train_step(v, *batch(), ctx, clock, cfg.grad_clip, record_function)
            write_trace(v.key, steps, "3 training steps", clock, cfg.out_dir)
    return out


def run_generate(cfg: BenchConfig, models: dict, vocab_size: int, ctx, clock: Clock, device: str) -> dict:
    """generate() at batch 1 (sampling at temperature 1 from random prompt ids), cached and not,
    within the block and past it, against the floor: next_logits on one token without a cache."""
    bs, n, p = cfg.block_size, min(cfg.new_tokens, cfg.block_size - 1), cfg.past_block_tokens
    gen = torch.Generator().manual_seed(cfg.seed)
    one = torch.randint(vocab_size, (1, 1), generator=gen).to(device)  # (1, 1)
    full = torch.randint(vocab_size, (1, bs), generator=gen).to(device)  # (1, block_size)
    cases = {f"cached, 1-token prompt + {n}": ("cached", one, n, {}),
             f"uncached, 1-token prompt + {n}": ("uncached", one, n, {"use_cache": False})}
    if p:
        cases.update({f"past block: {bs} + {p}, cached exact": ("past_cached", full, p, {}),
                      "  same, exact_window=False": ("past_window", full, p, {"exact_window": False}),
                      "  same, uncached": ("past_uncached", full, p, {"use_cache": False})})
    times = {(m, case): [] for m in models for case, *_ in [("floor",)] + list(cases.values())}
    with torch.no_grad(), ctx:
        for model in models.values():
            generate(model.eval(), one, 4)  # warm-up
        for i in range(cfg.warmup_steps + cfg.steps):
            for m, model in models.items():
                t0 = clock.mark()
                model.next_logits(one)
                if i >= cfg.warmup_steps:
                    times[m, "floor"].append(clock.ms(t0, clock.mark()))
        for _ in range(cfg.gen_runs):
            for case, prompt, tokens, kwargs in cases.values():
                for m, model in models.items():
                    torch.manual_seed(cfg.seed)
                    t0 = clock.mark()
                    generate(model, prompt, tokens, **kwargs)
                    times[m, case].append(clock.ms(t0, clock.mark()) / tokens)
    out = {"mode": "generate", "device": device, "batch_size": 1}
    for (m, case), ms in times.items():
        out[f"{m}_{case}_ms"] = statistics.median(ms)
        out[f"{m}_{case}_tokens_per_s"] = 1000 / statistics.median(ms)
    print("\ngeneration at batch 1, tokens/s (ms per token); floor: a forward pass of one token, no cache")
    print(f"{'':<36}" + "".join(f"{m:>22}" for m in models))
    for label, case in [("floor", "floor")] + [(label, c[0]) for label, c in cases.items()]:
        print(f"{label:<36}" + "".join(f"{out[f'{m}_{case}_tokens_per_s']:>13,.1f} ({out[f'{m}_{case}_ms']:6.2f})"
                                       for m in models))
    for m in models:
        out[f"{m}_cached_vs_uncached"] = out[f"{m}_uncached_ms"] / out[f"{m}_cached_ms"]
        out[f"{m}_cached_vs_floor"] = out[f"{m}_cached_ms"] / out[f"{m}_floor_ms"]
        print(f"{m}: cached is {out[f'{m}_cached_vs_uncached']:.1f}x as fast as uncached; a cached step costs "
              f"{out[f'{m}_cached_vs_floor']:.2f}x the floor")
    if len(models) == 2:
        out["ratio"] = out["backpack_cached_ms"] / out["gpt_cached_ms"]
    if cfg.profile:
        tokens = min(n, 32)
        for m, model in models.items():
            with ctx:
                write_trace(f"{m}_generate", lambda model=model: generate(model, one, tokens),
                            f"{tokens} cached tokens", clock, cfg.out_dir)
    return out


def run_topic(cfg: BenchConfig, model, vocab_size: int, clock: Clock, device: str) -> dict:
    """The topic scoring pass (steering.sense_logits: the sense network, every sense's logits on the
    vocabulary, their max, the logits on 8 topic words) over the first topic_tokens ids, against a bare
    torch.matmul of the same shapes: per chunk of m tokens, (m*k, d) @ (d, V) into a buffer made
    once. The pass would be that product alone if the rest were free: the ratio is its overhead."""
    experiments = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")
    if experiments not in sys.path:  # steering.py is an experiments/ module, as the scripts there import it
        sys.path.insert(0, experiments)
    import steering

    E = model.lm_head.weight[:vocab_size]  # (V, d)
    k, d = model.config.n_senses, model.config.n_embd
    tokens = min(cfg.topic_tokens or vocab_size, vocab_size)
    chunk = steering.chunk_tokens(k, vocab_size)
    words = list(range(0, vocab_size, max(1, vocab_size // 8)))[:8]
    gen = torch.Generator().manual_seed(cfg.seed)
    a = torch.randn(min(chunk, tokens) * k, d, generator=gen).to(device, E.dtype)  # (m*k, d)
    buf = torch.empty(len(a), vocab_size, dtype=E.dtype, device=device)  # (m*k, V)

    def scoring():
        steering.sense_logits(model, vocab_size, words, rows=tokens)

    def matmul():
        for start in range(0, tokens, chunk):
            rows = min(chunk, tokens - start) * k
            torch.matmul(a[:rows], E.T, out=buf[:rows])  # (m*k, V)

    times = {"scoring": [], "matmul": []}
    with torch.no_grad():
        for i in range(cfg.warmup_steps + cfg.steps):
            for name, work in (("scoring", scoring), ("matmul", matmul)):
                t0 = clock.mark()
                work()
                if i >= cfg.warmup_steps:
                    times[name].append(clock.ms(t0, clock.mark()))
    flop = 2 * tokens * k * d * vocab_size
    out = {"mode": "topic", "device": device, "n_embd": d, "n_senses": k, "vocab": vocab_size, "tokens": tokens,
           "chunk_tokens": chunk, "tflop": flop / 1e12}
    for name, ms in times.items():
        out[f"{name}_ms"], out[f"{name}_min_ms"] = statistics.median(ms), min(ms)
    out["ratio"] = out["scoring_ms"] / out["matmul_ms"]
    out["ratio_min"] = out["scoring_min_ms"] / out["matmul_min_ms"]
    out["matmul_gflops"] = flop / out["matmul_min_ms"] / 1e6
    out["full_pass_s"] = out["scoring_ms"] / 1000 * vocab_size / tokens  # the whole vocabulary's rows
    out["full_matmul_s"] = out["matmul_ms"] / 1000 * vocab_size / tokens
    print(f"\ntopic scoring of {tokens} of {vocab_size} tokens x {k} senses against {vocab_size} columns, "
          f"chunks of {chunk} tokens ({flop / 1e12:.2f} TFLOP a pass)")
    print(f"scoring pass {out['scoring_ms']:.1f} ms (min {out['scoring_min_ms']:.1f}), bare matmul "
          f"{out['matmul_ms']:.1f} ms (min {out['matmul_min_ms']:.1f}, {out['matmul_gflops']:.0f} GFLOP/s)")
    print(f"scoring/matmul: {out['ratio']:.3f} (minima: {out['ratio_min']:.3f}); the whole vocabulary: "
          f"{out['full_pass_s']:.1f} s{'' if tokens == vocab_size else ' (extrapolated)'}")
    return out


def main(cfg: BenchConfig):
    check_bench_config(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.timer == "cpu" and device != "cpu":
        raise UserError(f"--timer=cpu measures CPU time, not {device} time; use --timer=wall")
    data_dir, meta = None, None
    needs_data = cfg.mode == "train" and cfg.data == "real"
    if needs_data or cfg.data_dir or os.path.isdir(os.path.join("data", cfg.dataset)):
        data_dir = check_data_dir(cfg)
        meta = load_meta(data_dir)  # the vocabulary size, also for random ids and generation
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = tokenizer_spec_from_meta(meta)
    models = {}
    for model_type in (("gpt", "backpack") if cfg.compare else (cfg.model_type,)):
        models[model_type] = init_model(replace(cfg, model_type=model_type), meta, spec, data_dir)[0].to(device)
        print(f"{model_type}: {models[model_type].get_num_params() / 1e6:.2f}M parameters")
    vocab_size = next(iter(models.values())).config.vocab_size
    what = {"train": f"batch {cfg.batch_size}, {cfg.data} data", "generate": "batch 1, random prompt",
            "topic": f"{cfg.n_senses} senses"}[cfg.mode]
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"{cfg.n_layer}x{cfg.n_embd}, vocab {vocab_size}, block {cfg.block_size}, {what}; {device} {dtype}, "
          f"{torch.get_num_threads()} threads, {cfg.timer} time{load}, torch {torch.__version__}")
    clock, ctx = Clock(device, cfg.timer), autocast_context(device, dtype)
    if cfg.mode == "train":
        out = run_train(cfg, models, batch_source(cfg, data_dir, meta, vocab_size, device), ctx, clock, device, dtype)
    elif cfg.mode == "generate":
        out = run_generate(cfg, models, vocab_size, ctx, clock, device)
    else:  # over the tokenizer's ids: meta.pkl's vocabulary, or GPT-2 BPE's 50257 (padded to 50304 in the model)
        limit = meta["vocab_size"] if meta and "vocab_size" in meta else min(vocab_size, 50257)
        out = run_topic(cfg, models["backpack"].eval(), limit, clock, device)
    out.update(threads=torch.get_num_threads(), timer=cfg.timer)
    print(json.dumps(out))
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    run_cli(main, BenchConfig)
