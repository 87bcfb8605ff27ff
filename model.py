"""
GPT and the Backpack language model (Hewitt et al., ACL 2023) in one file.

Order: shared leaves (LayerNorm, attention, MLP, Block) -> GPT -> Backpack parts (sense network,
sense weights) -> Backpack -> the model_type dispatch table. The Backpack subclasses GPT, so it reuses
the very same trunk (`transformer.wte/wpe/h/ln_f`) and only replaces what turns the trunk's output
into logits. The architecture follows ../shared/docs/backpack-spec.md sections 1 and 7.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# shared leaves


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 in all builds)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The Mistral stability trick the paper's trunk uses: scores / (layer_idx + 1) (spec 1.3).
        head_dim = config.n_embd // config.n_head
        self.scale = 1.0 / math.sqrt(head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear -> dropout. The tanh GELU is GPT-2's `gelu_new` (spec 1.2)."""

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
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config.n_embd, 4 * config.n_embd, config.n_embd, config.bias, config.dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# GPT

# Peak dense bf16/fp16 tensor FLOP/s per device, for MFU. Matched by substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
    "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


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
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embedding
        self._build_head(config)
        self.apply(self._init_weights)
        # Residual projections (every c_proj: attention out, and the second Linear of every MLP,
        # the Backpack's two sense MLPs included) get std 0.02/sqrt(2L), as GPT-2 and spec 1.7.
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

    def trunk(self, idx):
        """Transformer output after ln_f: (B, T) ids -> (B, T, d)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, d)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def compute_logits(self, idx):
        return self.lm_head(self.trunk(idx))  # (B, T, V)

    def forward(self, idx, targets=None):
        """Returns logits for every position, (B, T, V), and the mean cross-entropy (or None)."""
        logits = self.compute_logits(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

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
        """The inverse of from_pretrained: a GPT becomes a transformers GPT2LMHeadModel directory, a
        Backpack the backpack-gpt2 layout (config.json + model.safetensors)."""
        import hf
        hf.save_pretrained(self, export_dir, tokenizer_spec)

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
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style:
        6 per parameter for the matmuls, plus attention scores and mixing in every layer."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, device) -> tuple[float, bool]:
        """Model FLOPs utilization as a fraction of the device's peak. Returns (mfu, is_estimate):
        on CPU (or an unknown GPU) the peak is only a rough guess, so the number is an estimate."""
        flops_per_iter = self.flops_per_token(self.config.block_size) * self.config.block_size * fwdbwd_per_iter
        peak, estimate = None, True
        device = torch.device(device)
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
            estimate = peak is None
        if peak is None:
            # A CPU core with two AVX2 FMA units does ~32 fp32 FLOP/cycle; assume ~2.5 GHz.
            peak = torch.get_num_threads() * 32 * 2.5e9
        return flops_per_iter / dt / peak, estimate

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Ancestral sampling: append max_new_tokens tokens to idx (B, T). The context is cropped to
        block_size. temperature 0 means greedy decoding."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits = self.compute_logits(idx_cond)[:, -1, :]  # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# -----------------------------------------------------------------------------
# Backpack parts


class SenseNetwork(nn.Module):
    """Maps each token embedding, independently of context and position, to k sense vectors
    (spec 1.4). One "no-mix" block whose mixer is the identity, then a final MLP to k*d."""

    def __init__(self, config):
        super().__init__()
        d, hidden = config.n_embd, config.sense_intermediate_scale * config.n_embd
        self.n_senses = config.n_senses
        self.drop = nn.Dropout(config.dropout)
        self.ln_0 = LayerNorm(d, bias=config.bias)
        self.ln_1 = LayerNorm(d, bias=config.bias)
        self.ln_2 = LayerNorm(d, bias=config.bias)
        self.mlp = MLP(d, hidden, d, config.bias, config.dropout)
        # No dropout, residual or LayerNorm after the final MLP (spec 1.4 step 8).
        self.final_mlp = MLP(d, hidden, config.n_senses * d, config.bias, dropout=0.0)

    def forward(self, e):
        """(..., d) token embeddings -> (..., k, d) sense vectors, sense-major."""
        r0 = self.drop(e)
        # The identity "mixer" adds LN_0(r0) back onto r0: a quirk of the official code, kept.
        r1 = r0 + self.drop(self.ln_0(r0))
        r2 = r1 + self.mlp(self.ln_1(r1))
        s = self.final_mlp(self.ln_2(r2))  # (..., k*d)
        return s.view(*s.shape[:-1], self.n_senses, s.size(-1) // self.n_senses)  # (..., k, d)


class SenseWeights(nn.Module):
    """The weights-only attention that produces alpha (spec 1.5): one Linear d -> 2d gives a query
    and a key of width d/k per sense; no values and no output projection."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_senses == 0, "n_embd must be divisible by n_senses"
        self.n_senses = config.n_senses
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.scale = 1.0 / math.sqrt(config.n_embd // config.n_senses)

    def forward(self, h):
        """(B, T, d) trunk output -> alpha, (B, k, T, T): rows are causal and sum to 1."""
        B, T, _ = h.size()
        q, k = self.c_attn(h).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        k = k.view(B, T, self.n_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, k, T, T)
        # The official code masks with an additive -10000 rather than -inf (spec 1.5).
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=h.device), diagonal=1)
        scores = scores + mask * -10000.0
        return F.softmax(scores, dim=-1)


# -----------------------------------------------------------------------------
# Backpack


@dataclass
class BackpackConfig(GPTConfig):
    n_senses: int = 16  # k, sense vectors per token
    sense_intermediate_scale: int = 4  # I = scale * d in both sense MLPs; 1 = the paper's "shrink" models
    scale_attn_by_inverse_layer_idx: bool = True  # the paper's trunk uses it (spec 1.3)


class Backpack(GPT):
    """o_i = sum_l sum_{j<=i} alpha[l, i, j] * senses(x_j)[l];  logits_i = E o_i.
    The trunk only influences the prediction through alpha."""

    config_class = BackpackConfig

    def _build_head(self, config):
        self.sense_network = SenseNetwork(config)
        self.sense_weights = SenseWeights(config)

    def _senses(self, idx):
        """(B, T) ids -> (B, T, k, d). Senses depend on the token id alone, so unless dropout makes
        each occurrence different we run the sense network once per distinct id (exactly equal)."""
        wte = self.transformer.wte
        if (self.training and self.config.dropout > 0) or torch.compiler.is_compiling():
            return self.sense_network(wte(idx))  # (B, T, k, d)
        ids, inverse = torch.unique(idx, return_inverse=True)  # (U,), (B, T)
        senses = self.sense_network(wte(ids))  # (U, k, d)
        # an embedding lookup, because its backward is much faster than that of advanced indexing
        return F.embedding(inverse, senses.flatten(1)).view(*idx.shape, *senses.shape[1:])  # (B, T, k, d)

    def compute_logits(self, idx):
        B, T = idx.size()
        alpha = self.sense_weights(self.trunk(idx))  # (B, k, T, T)
        senses = self._senses(idx)  # (B, T, k, d)
        # o_i = sum_l sum_j alpha[l, i, j] senses[j, l] as one matmul over the joint (j, l) axis:
        # on CPU this beats k separate (T, T) @ (T, d) products and their sum over senses.
        a = alpha.permute(0, 2, 3, 1).reshape(B, T, T * self.config.n_senses)  # (B, T, T*k)
        o = a @ senses.reshape(B, T * self.config.n_senses, -1)  # (B, T, d)
        return self.lm_head(o)  # (B, T, V)

    def contextualization(self, idx):
        """alpha, the sense weights: (B, T) ids -> (B, k, T, T)."""
        return self.sense_weights(self.trunk(idx))

    def sense_vectors(self, token_ids, chunk_size: int = 4096):
        """Sense vectors of a 1-D LongTensor of N ids: (N, k, d). Computed in chunks, so asking for
        the whole vocabulary never materializes more than chunk_size tokens' activations at once."""
        assert token_ids.dim() == 1, "token_ids must be a 1-D LongTensor"
        wte = self.transformer.wte
        return torch.cat([self.sense_network(wte(c)) for c in token_ids.split(chunk_size)])

    def flops_per_token(self, T: int) -> float:
        # On top of the GPT count (all parameters, sense network included): the alpha scores
        # (k heads of width d/k: 2*T*d per token) and the mixing alpha @ senses (k * 2*T*d), x3.
        cfg = self.config
        return super().flops_per_token(T) + 6 * T * cfg.n_embd * (1 + cfg.n_senses)


# -----------------------------------------------------------------------------
# the one place that branches on the model type

MODELS = {"gpt": GPT, "backpack": Backpack}


def build_model(model_type: str, **model_args) -> GPT:
    """Builds a fresh model from its type and config fields (the checkpoint's `model_args`)."""
    if model_type not in MODELS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[model_type]
    return cls(cls.config_class(**model_args))
