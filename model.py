"""
GPT and the Backpack language model (Hewitt et al., ACL 2023) in one file.

Order: shared leaves (attention, MLP, Block) -> GPT -> Backpack parts (sense network, sense weights)
-> Backpack -> the model_type dispatch table. The Backpack subclasses GPT, so it reuses the very same
trunk (`transformer.wte/wpe/h/ln_f`) and only replaces what turns the trunk's output into logits.
Both models expose one generation step, next_logits(idx, cache, pad); generate.py drives it, and
hf.py / checkpoint.py load and save the weights. docs/architecture.md explains each part and where it
follows the paper's official code.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# shared leaves


def layer_norm(n: int, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(n, eps=1e-5, bias=bias)  # GPT-2's epsilon


def lm_loss(logits, targets):
    """Mean next-token cross-entropy in fp32 (None without targets); target -1 is ignored."""
    if targets is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.n_embd, self.dropout = layer_idx, config.n_head, config.n_embd, config.dropout
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
        # a multi-token call with a cache only starts from an empty one (a prefill): causal is right for T > 1
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
        return x + self.mlp(self.ln_2(x))


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

    def _build_head(self, config):  # modules between the trunk and the LM head: the GPT has none
        pass

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameters without position embeddings (by default); the tied wte/lm_head counts once."""
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

    def trunk(self, idx, cache=None, pad=None):
        """(B, T) ids -> (B, T, d) after ln_f. With a cache (generate.Cache), idx continues the positions
        it holds; pad (B,) counts each row's left padding (positions start after it)."""
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
        return logits, lm_loss(logits, targets)

    def next_logits(self, idx, cache=None, pad=None):
        """Logits of the next token, (B, V): one generation step. idx is the whole context without a
        cache; with one, only the positions the cache does not hold yet."""
        h = self.trunk(idx, cache, pad)
        if cache is not None:
            cache.length += idx.size(1)
        return self.lm_head(h[:, -1])  # (B, V)

    def crop_block_size(self, block_size: int):  # e.g. GPT-2's 1024 positions, trained on 256
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # Decay only the matrices of Linear layers; embeddings, LayerNorms and biases are not decayed.
        # The tied wte/lm_head matrix is an embedding, so it is not decayed either.
        embedding_params = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() already yields the tied matrix once
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in embedding_params else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel over all parameters; on CPU it takes a third of the time of the default (foreach)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_fwdbwd(self, idx) -> float:
        """Training FLOPs of one micro-batch idx (B, T), PaLM appendix B style: 6 per parameter per token
        for the matmuls, plus 12 * n_layer * d * T per token for attention scores and mixing."""
        B, T = idx.shape
        cfg = self.config
        return (6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T) * B * T

    def estimate_mfu(self, idx, fwdbwd_per_iter: int, dt: float, peak_flops: float) -> float:
        """MFU of fwdbwd_per_iter micro-batches like idx in dt seconds, a fraction of peak_flops."""
        return self.flops_per_fwdbwd(idx) * fwdbwd_per_iter / dt / peak_flops


# -----------------------------------------------------------------------------
# Backpack parts


class SenseNetwork(nn.Module):
    """Token embedding -> k sense vectors, with no context or position: one "no-mix" block whose mixer
    is the identity, then a final MLP to k*d."""

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
        elif self.norm == "rms":  # each sense normalised over its d dimensions, with a gain, no bias
            s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight.view(self.n_senses, -1)
        elif self.norm == "ln":
            s = F.layer_norm(s, s.shape[-1:], eps=1e-5) * self.norm_weight.view(self.n_senses, -1)
        return s


class SenseWeights(nn.Module):
    """The weights-only attention that produces alpha: one Linear d -> 2d gives a query and a key of
    width d/k per sense; no values and no output projection."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_senses == 0, "n_embd must be divisible by n_senses"
        self.n_senses, self.n_embd = config.n_senses, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.scale = 1.0 / math.sqrt(config.n_embd // config.n_senses) if config.scale_alpha else 1.0
        self.dropout = config.alpha_dropout  # on alpha while training

    def forward(self, h):  # (B, T, d) trunk output -> queries and keys, each (B, k, T, d/k)
        B, T, _ = h.size()
        q, k = self.c_attn(h).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        k = k.view(B, T, self.n_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        return q, k

    def alpha(self, q, k, mask=None):
        """Queries (B, k, T, d/k) and keys (B, k, S, d/k) -> alpha, (B, k, T, S); rows sum to 1.
        mask: broadcastable to (B, k, T, S), True where a query may look; None: every key. Masked scores
        get an additive -10000 rather than -inf, as in the official code. alpha_dropout acts after the softmax."""
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
    # Opt-in departures from the paper, measured on character-level data (docs/character-level.md).
    # Their defaults are the paper's model exactly, loadable by the published code.
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


VARIANT_CHOICES = {"sense_norm": ("none", "rms", "ln", "ln_concat"), "sense_base_residual": ("none", "embedding", "block")}
VARIANT_FIELDS = ("sense_norm", "sense_base_residual", "alpha_dropout", "scale_alpha")


class Backpack(GPT):
    """o_i = sum_l sum_{j<=i} alpha[l, i, j] * senses(x_j)[l];  logits_i = E o_i. The trunk only acts
    through alpha. sense_hook: None, or a callable (idx (B, T), senses (B, T, k, d)) -> senses (B, T, k, d), applied
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
        """How many rows the sense network runs on for idx (see _raw_senses)."""
        return idx.numel() if self.training and self.config.dropout > 0 else torch.unique(idx).numel()

    def _raw_senses(self, idx):
        """(B, T) ids -> (B, T, k, d), without the hook. Senses depend on the token id alone, so unless
        dropout makes each occurrence different, the sense network runs once per distinct id of the
        batch (equal up to float rounding; inside torch.compile too, see common.compile_model)."""
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
        return logits, lm_loss(logits, targets)

    def _causal_alpha(self, q, k):
        T = q.size(2)  # queries and keys (B, k, T, d/k) -> (B, k, T, T)
        return self.sense_weights.alpha(q, k, torch.ones(T, T, dtype=torch.bool, device=q.device).tril())

    def _mix(self, q, k, senses):
        """o_i = sum_l sum_j alpha[l, i, j] senses[j, l], (B, T, d): attention with the senses as values,
        one causal head per sense, summed. On GPUs the fused kernel never materializes alpha (its -inf mask
        equals the official -10000 in floating point); on CPU SDPA would materialize it anyway, and one
        matmul over the joint (j, l) axis is faster."""
        B, n, T, _ = q.shape
        if q.device.type != "cpu":
            p = self.sense_weights.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, senses.transpose(1, 2), is_causal=True, dropout_p=p,
                                                  scale=self.sense_weights.scale).sum(1)  # (B, T, d)
        alpha = self._causal_alpha(q, k).permute(0, 2, 3, 1).reshape(B, T, T * n)  # (B, T, T*k): (j, l) order
        return alpha @ senses.reshape(B, T * n, -1)  # (B, T, d)

    def _mixes_logits(self, idx) -> bool:
        """Mix in logit space where V < d (character level): mixing E senses (V wide) beats mixing d-wide
        senses. Only where senses are a function of the id (no hook, no training dropout), so E senses is
        computed once per distinct id, and on CPU, where it was measured."""
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

    def next_logits(self, idx, cache=None, pad=None):
        """See GPT.next_logits; only the last query's alpha row is computed. The cache holds alpha's keys
        and the raw senses; the hook reruns over the whole sequence, so it may depend on later tokens."""
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
        # one matmul over the (s, l) axis as the cache lays senses out (an einsum would copy them each step)
        o = (alpha[:, :, 0].transpose(1, 2).flatten(1)[:, None] @ senses.flatten(1, 2))[:, 0]  # (B, d)
        return self.lm_head(o)  # (B, V)

    # ---- looking inside: the helpers the experiments use

    def sense_vectors(self, token_ids, chunk_size: int = 4096):
        """Sense vectors of a 1-D LongTensor of N ids: (N, k, d), without the hook, in chunks of ids."""
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
# the model_type dispatch table: how a checkpoint's model_type becomes a model

MODELS = {"gpt": GPT, "backpack": Backpack}


def build_model(model_type: str, **model_args) -> GPT:
    """Builds a fresh model from its type and config fields (the checkpoint's `model_args`)."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[model_type]
    return cls(cls.config_class(**model_args))
