"""
GPT and the Backpack language model (Hewitt et al., ACL 2023) in one file.

Order: shared leaves (attention, MLP, Block, the generation cache) -> GPT -> Backpack parts (sense
network, sense weights) -> Backpack -> generation (sampling and beam search, shared by both models)
-> the model_type dispatch table. The Backpack subclasses GPT, so it reuses the very same trunk
(`transformer.wte/wpe/h/ln_f`) and only replaces what turns the trunk's output into logits.
docs/architecture.md explains each part and where it follows the paper's official code.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# The Backpack runs its sense network once per distinct token id of a batch. torch.unique has a
# data-dependent output size; this lets torch.compile keep it inside the graph instead of breaking it.
torch._dynamo.config.capture_dynamic_output_shape_ops = True

# -----------------------------------------------------------------------------
# shared leaves


def layer_norm(n: int, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(n, eps=1e-5, bias=bias)  # GPT-2's epsilon


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The Mistral stability trick the paper's trunk uses: scores / (layer_idx + 1).
        self.scale = 1.0 / math.sqrt(config.n_embd // config.n_head)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x, cache=None, mask=None):
        """mask: None (causal over x, or every cached key for a one-token step) or (B, 1, T, S) bool,
        True where a query may attend, built by GPT.attention_mask for padded batches."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # keys and values of every earlier position too: (B, nh, S, hs)
            k, v = cache.append(f"k{self.layer_idx}", k), cache.append(f"v{self.layer_idx}", v)
        # A multi-token call with a cache only ever starts from an empty one (a prefill), so plain
        # causal masking is right whenever T > 1.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear -> dropout. The tanh GELU is GPT-2's `gelu_new`."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, bias: bool, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_in, n_hidden, bias=bias)
        self.c_proj = nn.Linear(n_hidden, n_out, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block, shared by GPT and the Backpack's trunk."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.ln_1 = layer_norm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = layer_norm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config.n_embd, 4 * config.n_embd, config.n_embd, config.bias, config.dropout)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Cache:
    """What generation keeps between steps, one named tensor per kind (the keys and values of each
    trunk layer; for the Backpack also its sense-weight keys, the sense vectors and the ids). Each grows
    along its time axis inside storage allocated once for max_len positions, so a step writes in
    place instead of concatenating. `length` counts the positions held."""

    def __init__(self, max_len: int):
        self.max_len, self.length, self.store, self.filled = max_len, 0, {}, {}

    def append(self, name: str, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Write x after what `name` holds along dim; returns everything it holds now (a view)."""
        if name not in self.store:
            shape = list(x.shape)
            shape[dim] = self.max_len
            self.store[name], self.filled[name] = x.new_empty(shape), 0
        start, n = self.filled[name], x.size(dim)
        self.store[name].narrow(dim, start, n).copy_(x)
        self.filled[name] = start + n
        return self.store[name].narrow(dim, 0, start + n)

    def reorder(self, rows: torch.Tensor):
        """Keep batch rows `rows` (beam search picks which beams go on)."""
        self.store = {name: t.index_select(0, rows) for name, t in self.store.items()}


# -----------------------------------------------------------------------------
# GPT


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    scale_attn_by_inverse_layer_idx: bool = False  # divide attention scores by layer_idx + 1


class GPT(nn.Module):
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=layer_norm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embedding
        self._build_head(config)
        self.apply(self._init_weights)
        # Residual projections (every c_proj: attention out, and the second Linear of every MLP,
        # the Backpack's two sense MLPs included) get std 0.02/sqrt(2L), as GPT-2 and the paper.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _build_head(self, config):
        """Extra modules between the trunk and the LM head; the GPT has none."""

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are excluded by default. The tied wte/lm_head
        matrix is counted once (it is used as the output layer, so it is real compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    @staticmethod
    def attention_mask(pad, start: int, T: int, device):
        """For a left-padded batch (row b's first pad[b] columns are padding): (B, 1, T, start + T)
        bool, True where query column start + i may attend: earlier or equal columns that are not
        padding. A padding query attends to itself alone, so no row is empty (that would give NaN)."""
        if pad is None:
            return None
        keys = torch.arange(start + T, device=device)  # (S,)
        queries = keys[start:]  # (T,)
        mask = (keys[None, :] <= queries[:, None]) & (keys[None, None, :] >= pad[:, None, None])  # (B, T, S)
        return (mask | (keys[None, :] == queries[:, None]))[:, None]  # (B, 1, T, S)

    def trunk(self, idx, cache: Cache | None = None, pad=None):
        """Transformer output after ln_f: (B, T) ids -> (B, T, d). With a cache, idx continues the
        positions it holds; pad (B,) counts each row's left padding (positions start after it)."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        if pad is not None:
            pos = (pos[None, :] - pad[:, None]).clamp(min=0)  # (B, T): a row's first real token is at 0
        mask = self.attention_mask(pad, start, T, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, d)
        for block in self.transformer.h:
            x = block(x, cache, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """Returns logits for every position, (B, T, V), and the mean cross-entropy (or None)."""
        logits = self.lm_head(self.trunk(idx))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def next_logits(self, idx, cache: Cache | None = None, pad=None):
        """Logits of the token after the last position, (B, V): what one generation step needs. Without
        a cache, idx is the whole context; with one, only the positions the cache does not hold yet."""
        h = self.trunk(idx, cache, pad)
        if cache is not None:
            cache.length += idx.size(1)
        return self.lm_head(h[:, -1])  # (B, V)

    def crop_block_size(self, block_size: int):
        """Shrink the context (e.g. load 1024-position GPT-2 weights but train on 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path: str, override_args: dict | None = None) -> "GPT":
        """Pretrained weights in a Hugging Face layout, read without running any downloaded code.
        GPT: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a GPT2LMHeadModel.save_pretrained directory.
        Backpack: backpack-small / backpack-gpt2 (= stanfordnlp/backpack-gpt2) or a directory in that
        layout. Only dropout may be overridden (default 0). The key mapping lives in hf.py."""
        import hf  # lazily: safetensors and huggingface_hub are only needed for pretrained weights
        return hf.load_pretrained(cls, name_or_path, override_args)

    def save_pretrained(self, export_dir: str, tokenizer_spec: dict | None = None):
        """The inverse of from_pretrained, into a directory transformers loads as what it is: a GPT as a
        GPT2LMHeadModel; a Backpack in the backpack-gpt2 layout with its modeling code (hf_remote/, for
        trust_remote_code=True). Tokenizer files come along and padded vocabulary rows are cut (hf.py)."""
        import hf
        return hf.save_pretrained(self, export_dir, tokenizer_spec)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # Decay only the matrices of Linear layers; embeddings, LayerNorms and biases are not decayed.
        # The tied wte/lm_head matrix is an embedding, so it is not decayed either.
        embedding_params = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() already yields the tied matrix once
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel over all parameters; on CPU it takes a third of the time of the default (foreach)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_fwdbwd(self, idx) -> float:
        """Training FLOPs (forward + backward = 3x forward) of one micro-batch idx (B, T), counting what
        runs, PaLM appendix B style: 6 per parameter per token for the matmuls, plus the attention
        scores and mixing, 12 * n_layer * d * T per token."""
        B, T = idx.shape
        cfg = self.config
        return (6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T) * B * T

    def estimate_mfu(self, idx, fwdbwd_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilization of an iteration of fwdbwd_per_iter micro-batches like idx that took dt
        seconds, as a fraction of peak_flops (common.peak_flops)."""
        return self.flops_per_fwdbwd(idx) * fwdbwd_per_iter / dt / peak_flops

    def generate(self, idx, max_new_tokens: int, **options):
        """Continue each prompt by max_new_tokens tokens: generate() below this class, which lists the
        options (temperature, top_k, top_p, num_beams, eos_id, use_cache, ...)."""
        return generate(self, idx, max_new_tokens, **options)


# -----------------------------------------------------------------------------
# Backpack parts


class SenseNetwork(nn.Module):
    """Maps each token embedding, independently of context and position, to k sense vectors.
    One "no-mix" block whose mixer is the identity, then a final MLP to k*d."""

    def __init__(self, config):
        super().__init__()
        d, hidden = config.n_embd, config.sense_intermediate_scale * config.n_embd
        self.n_senses = config.n_senses
        self.drop = nn.Dropout(config.dropout)
        self.ln_0 = layer_norm(d, bias=config.bias)
        self.ln_1 = layer_norm(d, bias=config.bias)
        self.ln_2 = layer_norm(d, bias=config.bias)
        self.mlp = MLP(d, hidden, d, config.bias, config.dropout)
        # No dropout, residual or LayerNorm after the final MLP, as in the official code.
        self.final_mlp = MLP(d, hidden, config.n_senses * d, config.bias, dropout=0.0)
        # Opt-in departures from the paper (BackpackConfig); at their defaults they add no parameter.
        self.base_residual, self.norm = config.sense_base_residual, config.sense_norm
        if self.norm in ("rms", "ln"):  # a gain per sense and dimension; kept 1-D so it is not decayed
            self.norm_weight = nn.Parameter(torch.ones(config.n_senses * d))
        elif self.norm == "ln_concat":
            self.ln_senses = layer_norm(config.n_senses * d, bias=config.bias)

    def forward(self, e):
        """(..., d) token embeddings -> (..., k, d) sense vectors, sense-major."""
        r0 = self.drop(e)
        # The identity "mixer" adds LN_0(r0) back onto r0: a quirk of the official code, kept.
        r1 = r0 + self.drop(self.ln_0(r0))
        r2 = r1 + self.mlp(self.ln_1(r1))
        h2 = self.ln_2(r2)
        s = self.final_mlp(h2)  # (..., k*d)
        s = s.view(*s.shape[:-1], self.n_senses, s.size(-1) // self.n_senses)  # (..., k, d)
        if self.base_residual != "none":  # every sense starts from the token's own vector (nanoBackpackLM)
            s = s + (e if self.base_residual == "embedding" else h2).unsqueeze(-2)
        if self.norm == "ln_concat":  # one LayerNorm over all k senses together (nanoBackpackLM)
            s = self.ln_senses(s.flatten(-2)).view(s.shape)
        elif self.norm in ("rms", "ln"):  # each sense normalised over its d dimensions, no bias
            if self.norm == "rms":
                s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
            else:
                s = F.layer_norm(s, s.shape[-1:], eps=1e-5)
            s = s * self.norm_weight.view(self.n_senses, -1)
        return s


class SenseWeights(nn.Module):
    """The weights-only attention that produces alpha: one Linear d -> 2d gives a query and a key of
    width d/k per sense; no values and no output projection."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_senses == 0, "n_embd must be divisible by n_senses"
        self.n_senses = config.n_senses
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.scale = 1.0 / math.sqrt(config.n_embd // config.n_senses) if config.scale_alpha else 1.0
        self.dropout = config.alpha_dropout  # on alpha while training

    def forward(self, h):
        """(B, T, d) trunk output -> queries and keys, each (B, k, T, d/k)."""
        B, T, _ = h.size()
        q, k = self.c_attn(h).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        k = k.view(B, T, self.n_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        return q, k

    def alpha(self, q, k, mask=None):
        """Queries (B, k, T, d/k) and keys (B, k, S, d/k) -> alpha, (B, k, T, S); rows sum to 1.
        mask: broadcastable to (B, k, T, S), True where a query may look; None: every key. As in the
        official code, masked scores get an additive -10000 rather than -inf. With alpha_dropout, while
        training, entries are dropped (and the rest scaled by 1/(1-p)) after the softmax."""
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, k, T, S)
        if mask is not None:
            scores = scores + (~mask) * -10000.0
        alpha = F.softmax(scores, dim=-1)
        return F.dropout(alpha, self.dropout, self.training) if self.dropout > 0 else alpha


# -----------------------------------------------------------------------------
# Backpack


@dataclass
class BackpackConfig(GPTConfig):
    n_senses: int = 16  # k, sense vectors per token
    sense_intermediate_scale: int = 4  # I = scale * d in both sense MLPs; 1 = the paper's "shrink" models
    scale_attn_by_inverse_layer_idx: bool = True  # the paper's trunk uses it
    # Opt-in departures from the paper, measured on character-level data (README, "Character-level
    # Backpacks"). Their defaults are the paper's model exactly, loadable by the published code.
    sense_norm: str = "none"  # "rms" / "ln": normalise each sense over d, with a learned gain per sense
    #                           and dimension; "ln_concat": one LayerNorm over all k*d (nanoBackpackLM)
    sense_base_residual: str = "none"  # add to every sense the token's "embedding" (its wte row) or its
    #                                    "block" vector (the final MLP's input, as nanoBackpackLM)
    alpha_dropout: float = 0.0  # dropout on alpha while training (nanoBackpackLM: config.dropout)
    scale_alpha: bool = True  # False: no 1/sqrt(d/k) on alpha's scores (nanoBackpackLM)

    def __post_init__(self):
        for key, choices in VARIANT_CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"unknown {key}={getattr(self, key)!r}; choose one of {', '.join(choices)}")
        if not 0 <= self.alpha_dropout < 1:
            raise ValueError(f"alpha_dropout must be in [0, 1) (got {self.alpha_dropout})")

    def departures(self) -> dict:
        """The opt-in fields set away from the paper's model ({} for the paper's Backpack)."""
        paper = BackpackConfig()
        return {f: getattr(self, f) for f in VARIANT_FIELDS if getattr(self, f) != getattr(paper, f)}


VARIANT_CHOICES = {"sense_norm": ("none", "rms", "ln", "ln_concat"),
                   "sense_base_residual": ("none", "embedding", "block")}
VARIANT_FIELDS = ("sense_norm", "sense_base_residual", "alpha_dropout", "scale_alpha")


class Backpack(GPT):
    """o_i = sum_l sum_{j<=i} alpha[l, i, j] * senses(x_j)[l];  logits_i = E o_i.
    The trunk only influences the prediction through alpha.

    sense_hook: None, or a callable (idx (B, T), senses (B, T, k, d)) -> senses (B, T, k, d), applied
    after the sense network and before the mixing: in forward, the analysis helpers and generate. It is
    how experiments steer the model (scale a sense, edit a word, reweight a topic) without training."""

    config_class = BackpackConfig

    def _build_head(self, config):
        self.sense_network = SenseNetwork(config)
        self.sense_weights = SenseWeights(config)
        self.sense_hook = None

    @contextlib.contextmanager
    def hooked(self, hook):
        """`with model.hooked(fn):` runs the block with sense_hook = fn, then restores the previous."""
        previous, self.sense_hook = self.sense_hook, hook
        try:
            yield self
        finally:
            self.sense_hook = previous

    def _sense_rows(self, idx) -> int:
        """How many rows the sense network runs on for idx (what _raw_senses computes)."""
        if self.training and self.config.dropout > 0:
            return idx.numel()
        return min(self.config.vocab_size, torch.unique(idx).numel())

    def _raw_senses(self, idx):
        """(B, T) ids -> (B, T, k, d), without the hook. Senses depend on the token id alone, so unless
        dropout makes each occurrence different, the sense network runs once per distinct id of the
        batch (equal up to float rounding; inside torch.compile too, see the top of this file)."""
        wte = self.transformer.wte
        if self.training and self.config.dropout > 0:
            return self.sense_network(wte(idx))  # (B, T, k, d): every occurrence its own dropout mask
        ids, inverse = torch.unique(idx, return_inverse=True)  # (U,), (B, T)
        torch._check(ids.size(0) > 0)  # lets the compiler drop its U == 0 case
        senses = self.sense_network(wte(ids))  # (U, k, d)
        # an embedding lookup, because its backward is much faster than that of advanced indexing
        return F.embedding(inverse, senses.flatten(1)).view(*idx.shape, *senses.shape[1:])  # (B, T, k, d)

    def _hook(self, idx, senses, pad=None):
        """Apply the sense hook; with left padding, each row sees only its real tokens."""
        if self.sense_hook is None:
            return senses
        if pad is None or not bool(pad.any()):
            return self.sense_hook(idx, senses)
        rows = [self.sense_hook(idx[b:b + 1, p:], senses[b:b + 1, p:]) for b, p in enumerate(pad.tolist())]
        return torch.stack([F.pad(r[0], (0, 0, 0, 0, p, 0)) for r, p in zip(rows, pad.tolist())])

    def forward(self, idx, targets=None):
        q, k = self.sense_weights(self.trunk(idx))  # (B, k, T, d/k) each
        if self._mixes_logits(idx):
            logits = self._mixed_logits(idx, q, k)  # (B, T, V)
        else:
            logits = self.lm_head(self._mix(q, k, self._hook(idx, self._raw_senses(idx))))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _causal_alpha(self, q, k):
        """alpha of queries and keys (B, k, T, d/k) over a causal mask: (B, k, T, T)."""
        T = q.size(2)
        return self.sense_weights.alpha(q, k, torch.ones(T, T, dtype=torch.bool, device=q.device).tril())

    def _mix(self, q, k, senses):
        """o_i = sum_l sum_j alpha[l, i, j] senses[j, l], (B, T, d), from queries and keys (B, k, T, d/k)
        and senses (B, T, k, d). It is attention with the senses as values: one causal attention per
        sense (width d/k for scores, d for values), summed over senses. On GPUs the fused kernel never
        materializes alpha; its -inf mask equals the official -10000 in floating point. On CPU, SDPA
        runs its math kernel here (the values are wider than the queries), which materializes alpha
        anyway, and one matmul over the joint (j, l) axis is faster."""
        B, n, T, _ = q.shape
        if q.device.type != "cpu":
            p = self.sense_weights.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, senses.transpose(1, 2), is_causal=True, dropout_p=p,
                                                  scale=self.sense_weights.scale).sum(1)  # (B, T, d)
        alpha = self._causal_alpha(q, k).permute(0, 2, 3, 1).reshape(B, T, T * n)  # (B, T, T*k): (j, l) order
        return alpha @ senses.reshape(B, T * n, -1)  # (B, T, d)

    def _mixes_logits(self, idx) -> bool:
        """Whether forward mixes in logit space: for a vocabulary narrower than the model (character
        level), mixing each sense's logits E senses[x_j, l] (V wide) costs less than mixing the d-wide
        senses and applying E after. Only where the senses are a function of the id (no hook; no
        dropout while training), so that E senses is computed once per distinct id; and only on CPU,
        where it was measured (it materializes alpha, which the fused attention on GPUs does not)."""
        return (idx.device.type == "cpu" and self.config.vocab_size < self.config.n_embd
                and self.sense_hook is None and not (self.training and self.config.dropout > 0))

    def _mixed_logits(self, idx, q, k):
        """logits_i = sum_l sum_j alpha[l, i, j] E senses(x_j)[l], (B, T, V), summing alpha over the
        positions that hold the same id first: (B, T, k*U) @ (k*U, V) for the U distinct ids of idx."""
        B, T = idx.shape
        n = self.config.n_senses
        ids, inverse = torch.unique(idx, return_inverse=True)  # (U,), (B, T)
        torch._check(ids.size(0) > 0)  # lets the compiler drop its U == 0 case
        U = ids.size(0)
        sense_logits = self.lm_head(self.sense_network(self.transformer.wte(ids)))  # (U, k, V)
        alpha = self._causal_alpha(q, k).transpose(1, 2)  # (B, T, k, T)
        by_id = alpha.new_zeros(B, T, n, U).scatter_add_(3, inverse[:, None, None, :].expand(B, T, n, T), alpha)
        return by_id.view(B, T, n * U) @ sense_logits.transpose(0, 1).reshape(n * U, -1)  # (B, T, V)

    def next_logits(self, idx, cache: Cache | None = None, pad=None):
        """See GPT.next_logits. Only the last query's alpha row is computed. The cache holds the sense
        weights' keys and the raw sense vectors of past tokens; the hook runs over the whole sequence at
        every step, so a hook whose output for past tokens changes as the sequence grows is honoured."""
        q, k = self.sense_weights(self.trunk(idx, cache, pad))  # (B, k, T, d/k) each
        raw = self._raw_senses(idx)  # (B, T, k, d)
        if cache is not None:
            k = cache.append("sense_k", k)  # (B, k, S, d/k)
            raw = cache.append("senses", raw, dim=1)  # (B, S, k, d)
            idx = cache.append("idx", idx, dim=1)  # (B, S)
            cache.length += q.size(2)
        senses = self._hook(idx, raw, pad)  # (B, S, k, d)
        # the last query sees every key but the padding
        real = None if pad is None else (torch.arange(k.size(2), device=idx.device)[None, :] >= pad[:, None])  # (B, S)
        alpha = self.sense_weights.alpha(q[:, :, -1:], k, None if real is None else real[:, None, None])  # (B, k, 1, S)
        # one matmul over the joint (s, l) axis of the senses as they lie in the cache: an einsum would
        # copy all of them into a (l, s) order first, at every step
        o = (alpha[:, :, 0].transpose(1, 2).flatten(1)[:, None] @ senses.flatten(1, 2))[:, 0]  # (B, d)
        return self.lm_head(o)  # (B, V)

    # ---- looking inside: the helpers the experiments use

    def sense_vectors(self, token_ids, chunk_size: int = 4096):
        """Sense vectors of a 1-D LongTensor of N ids: (N, k, d), without the hook. Computed in chunks,
        so asking for the whole vocabulary never holds more than chunk_size tokens' activations."""
        assert token_ids.dim() == 1, "token_ids must be a 1-D LongTensor"
        wte = self.transformer.wte
        return torch.cat([self.sense_network(wte(c)) for c in token_ids.split(chunk_size)])

    def senses(self, idx):
        """Sense vectors of a sequence, (B, T) -> (B, T, k, d), with the hook applied."""
        return self._hook(idx, self._raw_senses(idx))

    def contextualization(self, idx):
        """alpha, the sense weights: (B, T) ids -> (B, k, T, T); rows are causal and sum to 1."""
        return self._causal_alpha(*self.sense_weights(self.trunk(idx)))

    def contextual_senses(self, idx, position: int = -1):
        """Each sense's share of the output at `position`: sum_j alpha[l, pos, j] senses[j, l], (B, k, d).
        Summed over senses it is the vector the LM head turns into that position's logits."""
        alpha = self.contextualization(idx)[:, :, position]  # (B, k, T)
        return torch.einsum("blt,btld->bld", alpha, self.senses(idx))

    def logit_contributions(self, idx, token, position: int = -1):
        """What each (earlier position j, sense l) adds to the logit of `token` at `position`:
        alpha[l, pos, j] * (senses[j, l] . E[token]), (B, T, k). The Backpack has no bias, so the
        entries sum to that logit exactly. token: an id, or one per row (B,)."""
        B = idx.size(0)
        token = torch.as_tensor(token, device=idx.device).expand(B)  # (B,)
        alpha = self.contextualization(idx)[:, :, position]  # (B, k, T)
        sense_logits = torch.einsum("btld,bd->btl", self.senses(idx), self.lm_head.weight[token])  # (B, T, k)
        return alpha.transpose(1, 2) * sense_logits  # (B, T, k)

    def flops_per_fwdbwd(self, idx) -> float:
        # The sense network runs on _sense_rows(idx) rows, not on every position; alpha's scores (k heads
        # of width d/k: 2*T*d per token) and the mixing (k * 2*T*d) come on top, all x3 for fwd + bwd.
        B, T = idx.shape
        cfg = self.config
        n_sense = sum(p.numel() for p in self.sense_network.parameters())
        trunk_and_head = (6 * (self.get_num_params() - n_sense) + 12 * cfg.n_layer * cfg.n_embd * T) * B * T
        U = self._sense_rows(idx)
        if self._mixes_logits(idx):  # the LM head runs on the U*k senses, the mixing is k*U*V per position
            head = 6 * cfg.vocab_size * cfg.n_embd
            return (trunk_and_head + head * (U * cfg.n_senses - B * T) + 6 * n_sense * U
                    + 6 * (T * cfg.n_embd + cfg.n_senses * U * cfg.vocab_size) * B * T)
        return trunk_and_head + 6 * n_sense * U + 6 * T * cfg.n_embd * (1 + cfg.n_senses) * B * T


# -----------------------------------------------------------------------------
# generation: sampling strategies and beam search over next_logits, cached or not


def _check_generate_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off), got {repetition_penalty}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _left_pad(prompts: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (B, T) ids, left-padded with id 0, and each row's padding (B,)."""
    prompts = [torch.as_tensor(p, dtype=torch.long, device=device).view(-1) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = p
    return idx, torch.tensor([T - len(p) for p in prompts], device=device)


def _process_logits(logits, idx, pad, temperature, top_k, top_p, repetition_penalty, vocab_limit):
    """Raw next-token logits (B, V) -> the logits to sample from (fp32): padded vocabulary rows
    removed, the repetition penalty (CTRL's, as transformers: divide positive logits of tokens already
    in the row by the penalty, multiply negative ones), temperature, top-k, top-p (nucleus)."""
    logits = logits.float().clone()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -float("inf")
    if repetition_penalty != 1.0:
        seen = idx if pad is None else torch.where(  # padding columns repeat the row's first real token
            torch.arange(idx.size(1), device=idx.device)[None] < pad[:, None], idx.gather(1, pad[:, None]), idx)
        score = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(score > 0, score / repetition_penalty, score * repetition_penalty))
    if temperature > 0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token once the more likely ones already cover top_p; the most likely always stays
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return logits


class _Context:
    """The growing (B, L) ids of a generation and how next_logits sees them: through a cache holding
    the current window's columns, or (uncached) as the whole window at every step. The window is the
    last block_size columns; once it slides, every position changes, so exactness with absolute
    positions means refilling the cache from the new window at each step."""

    def __init__(self, model: GPT, idx, pad, use_cache: bool, exact_window: bool):
        self.model, self.idx, self.pad = model, idx, pad  # pad: each row's left padding (B,), or None
        self.use_cache, self.exact_window = use_cache, exact_window
        self.cache, self.start = None, 0  # the cache holds columns start .. start + cache.length - 1
        self.block_size = model.config.block_size

    def _pad_from(self, start: int):
        """Each row's padding among the columns from `start` on."""
        return None if self.pad is None else (self.pad - start).clamp(min=0)

    def next_logits(self):
        L, bs = self.idx.size(1), self.block_size
        if not self.use_cache:
            start = max(0, L - bs)
            return self.model.next_logits(self.idx[:, start:], pad=self._pad_from(start))
        if self.cache is not None and self.start + self.cache.length == L - 1 and L - self.start <= bs:
            return self.model.next_logits(self.idx[:, -1:], self.cache, self._pad_from(self.start))
        # (Re)fill: the first step, or the window slid. Exact: the last block_size columns. Approximate
        # (exact_window=False): only the last half, so the next block_size / 2 steps are cached again.
        width = L if L <= bs else (bs if self.exact_window else max(1, bs // 2))
        self.start, self.cache = L - width, Cache(bs)
        return self.model.next_logits(self.idx[:, self.start:], self.cache, self._pad_from(self.start))

    def append(self, tokens):
        self.idx = torch.cat((self.idx, tokens[:, None]), dim=1)

    def reorder(self, rows):
        """Keep rows `rows` of the batch, in that order (beam search)."""
        self.idx = self.idx.index_select(0, rows)
        self.pad = None if self.pad is None else self.pad.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True, repetition_penalty: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, eos_id: int | None = None,
             stop: Callable[[list[int]], bool] | None = None, vocab_limit: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, exact_window: bool = True,
             return_logits: bool = False):
    """Continue each prompt by up to max_new_tokens tokens, conditioning on at most the last
    block_size tokens (nanoGPT's semantics).

    idx: (B, T) ids -> (B, T + steps) ids, steps = max_new_tokens unless every row stopped early; after
    a row's stop its columns hold eos_id (-1 without one). Or a list of prompts of different lengths
    (1-D tensors or int lists) -> a list of 1-D tensors, each its prompt + its tokens up to its stop.
    temperature: 0 is greedy. top_k / top_p: None (or 0 / 1.0) is off. repetition_penalty: 1.0 is off.
    num_beams > 1: beam search (deterministic; a hypothesis scores sum log p / its generated
    length ** length_penalty). eos_id: a row ends after this token. stop(new ids of a row) -> True ends
    that row (stop strings). vocab_limit: ids >= vocab_limit (a padded vocabulary) get no probability.
    on_token(tokens (B,)) streams every step, -1 for rows that already ended (not with beams).
    use_cache=False recomputes the window at every step: the reference the cache must equal.
    exact_window=False: past block_size, refill the cache from the last block_size / 2 tokens and go
    on cached (fast, not exact). return_logits: also return the raw next-token logits of every step,
    (B, steps, V). Sampling draws from torch's global RNG: seed it for repeatable text."""
    _check_generate_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams)
    as_list = isinstance(idx, (list, tuple))
    pad = None
    if as_list:
        idx, pad = _left_pad(idx, model.lm_head.weight.device)
        pad = pad if bool(pad.any()) else None
    B, T0 = idx.shape
    if num_beams > 1:
        if return_logits or on_token is not None:
            raise ValueError("beam search neither streams tokens nor returns per-step logits")
        new = _beam_search(model, idx, pad, max_new_tokens, num_beams, length_penalty, eos_id, stop, vocab_limit,
                           repetition_penalty, use_cache, exact_window)
    else:
        new, step_logits = _sample(model, idx, pad, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   eos_id, stop, vocab_limit, on_token, use_cache, exact_window, return_logits)
    if as_list:
        pads = pad.tolist() if pad is not None else [0] * B
        out = [torch.cat((idx[b, p:], torch.tensor(n, dtype=torch.long, device=idx.device)))
               for b, (p, n) in enumerate(zip(pads, new))]
    else:
        out = torch.full((B, T0 + max((len(n) for n in new), default=0)), eos_id if eos_id is not None else -1,
                         dtype=torch.long, device=idx.device)
        out[:, :T0] = idx
        for b, n in enumerate(new):
            out[b, T0:T0 + len(n)] = torch.tensor(n, dtype=torch.long)
    if return_logits:
        return out, step_logits
    return out


def _sample(model, idx, pad, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id, stop,
            vocab_limit, on_token, use_cache, exact_window, keep_logits):
    """Ancestral sampling (greedy at temperature 0). Returns each row's new tokens up to its stop, and
    with keep_logits the raw logits of every step, (B, steps, V) (else None: B * steps * V floats)."""
    B = idx.size(0)
    ctx = _Context(model, idx, pad, use_cache, exact_window)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    step_logits = []
    for _ in range(max_new_tokens):
        logits = ctx.next_logits()  # (B, V)
        if keep_logits:
            step_logits.append(logits.float())
        scores = _process_logits(logits, ctx.idx, ctx.pad, temperature, top_k, top_p, repetition_penalty, vocab_limit)
        if temperature == 0:
            tokens = scores.argmax(dim=-1)  # (B,)
        else:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1)[:, 0]  # (B,)
        ctx.append(tokens)  # a row that ended goes on computing, unseen: rows never mix
        ended_before = list(done)
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                new[b].append(token)
                done[b] = (eos_id is not None and token == eos_id) or (stop is not None and stop(new[b]))
        if on_token is not None:
            on_token(torch.where(torch.tensor(ended_before, device=tokens.device), -1, tokens))
        if all(done):
            break
    if not keep_logits:
        return new, None
    V = model.config.vocab_size
    return new, torch.stack(step_logits, dim=1) if step_logits else idx.new_empty(B, 0, V, dtype=torch.float)


def _beam_search(model, idx, pad, max_new_tokens, num_beams, length_penalty, eos_id, stop, vocab_limit,
                 repetition_penalty, use_cache, exact_window) -> list[list[int]]:
    """Keep num_beams hypotheses per prompt; each step extends every beam by every token and keeps the
    best 2 * num_beams by sum of log-probs, moving those that end (eos_id or stop) to a finished list.
    Ends when every prompt has num_beams finished hypotheses, or after max_new_tokens (then running
    beams count as finished). Returns the best hypothesis of each prompt (its new tokens)."""
    B, T0 = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(num_beams)  # (B*nb,)
    ctx = _Context(model, idx[rows], None if pad is None else pad[rows], use_cache, exact_window)
    scores = torch.zeros(B, num_beams, device=idx.device)
    scores[:, 1:] = -float("inf")  # the beams start identical: expand only the first at step 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]

    def score(total: float, n: int) -> float:
        return total / max(1, n) ** length_penalty

    for _ in range(max_new_tokens):
        logits = _process_logits(ctx.next_logits(), ctx.idx, ctx.pad, 0.0, None, None, repetition_penalty, vocab_limit)
        logprobs = F.log_softmax(logits, dim=-1)  # (B*nb, V)
        V = logprobs.size(-1)
        top_scores, top_index = (scores.view(-1, 1) + logprobs).view(B, -1).topk(2 * num_beams, dim=-1)  # (B, 2nb)
        kept = []  # (row, token, score) of the beams that go on
        for b in range(B):
            mine = []
            for s, i in zip(top_scores[b].tolist(), top_index[b].tolist()):
                if s == -float("inf"):
                    break
                row, token = b * num_beams + i // V, i % V
                hyp = ctx.idx[row, T0:].tolist() + [token]
                if (eos_id is not None and token == eos_id) or (stop is not None and stop(hyp)):
                    if len(finished[b]) < num_beams:
                        finished[b].append((score(s, len(hyp)), hyp))
                elif len(mine) < num_beams:
                    mine.append((row, token, s))
            mine += [(b * num_beams, 0, -float("inf"))] * (num_beams - len(mine))  # dead beams fill up
            kept += mine
        ctx.reorder(torch.tensor([r for r, _, _ in kept], device=idx.device))
        ctx.append(torch.tensor([t for _, t, _ in kept], device=idx.device))
        scores = torch.tensor([s for _, _, s in kept], device=idx.device).view(B, num_beams)
        if all(len(f) >= num_beams for f in finished):
            break
    for b in range(B):
        for j in range(num_beams):
            if scores[b, j] > -float("inf"):
                hyp = ctx.idx[b * num_beams + j, T0:].tolist()
                finished[b].append((score(scores[b, j].item(), len(hyp)), hyp))
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


# -----------------------------------------------------------------------------
# the one place that branches on the model type

MODELS = {"gpt": GPT, "backpack": Backpack}


def build_model(model_type: str, **model_args) -> GPT:
    """Builds a fresh model from its type and config fields (the checkpoint's `model_args`)."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[model_type]
    return cls(cls.config_class(**model_args))
