"""
A Backpack language model (Hewitt et al., ACL 2023) for transformers' Auto classes, written for
nano-BackpackLM. export_hf.py copies this file into every Backpack export, so that

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

gives the same logits as the repo's model.py, and model.generate(), pipeline("text-generation") and
lm-eval's `hf` model work. The weights keep the layout of the published stanfordnlp/backpack-gpt2:
the trunk is transformers' own GPT2Model under `backpack.gpt2_model`, the sense network and the sense
weights sit beside it, and the LM head is tied to the token embeddings.

The model (what model.py's Backpack computes):
    senses C(x) = k vectors per token id, from the token embedding alone (no context, no position);
    alpha = the sense weights, k causal attention maps from the trunk's output (no values);
    o_i = sum_l sum_{j<=i} alpha[l, i, j] C(x_j)_l;  logits_i = E o_i  (tied head, no bias).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, GPT2Model
from transformers.activations import ACT2FN
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

from .configuration_backpack_gpt2 import BackpackGPT2Config

MASKED = -10000.0  # the official code masks alpha's scores additively with -10000, not -inf


class BackpackMLP(nn.Module):
    """Conv1D -> activation -> Conv1D (GPT-2's Conv1D stores weights (in, out))."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, config):
        super().__init__()
        self.c_fc = Conv1D(n_hidden, n_in)
        self.c_proj = Conv1D(n_out, n_hidden)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class BackpackNoMixBlock(nn.Module):
    """The sense network's one block: a transformer block whose mixer is the identity."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = BackpackMLP(d, config.sense_intermediate_scale * d, d, config)


class BackpackSenseNetwork(nn.Module):
    """Token embeddings (..., d) -> k sense vectors (..., k, d), one token at a time."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.num_senses = config.num_senses
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.block = BackpackNoMixBlock(config)
        self.final_mlp = BackpackMLP(d, config.sense_intermediate_scale * d, config.num_senses * d, config)
        # opt-in departures from the paper (absent from the published model: config defaults "none")
        self.norm = getattr(config, "sense_norm", "none")
        self.base_residual = getattr(config, "sense_base_residual", "none")
        if self.norm in ("rms", "ln"):
            self.norm_weight = nn.Parameter(torch.ones(config.num_senses * d))
        elif self.norm == "ln_concat":
            self.ln_senses = nn.LayerNorm(config.num_senses * d, eps=config.layer_norm_epsilon)

    def forward(self, e):
        r0 = self.dropout(e)
        # the identity "mixer" adds ln(r0) back onto r0: a quirk of the official code, kept
        r1 = r0 + self.resid_dropout(self.ln(r0))
        r2 = r1 + self.resid_dropout(self.block.mlp(self.block.ln_1(r1)))
        h2 = self.block.ln_2(r2)
        s = self.final_mlp(h2)  # (..., k*d); in the paper, no dropout, residual or LayerNorm after it
        s = s.view(*s.shape[:-1], self.num_senses, s.size(-1) // self.num_senses)  # (..., k, d)
        if self.base_residual != "none":
            s = s + (e if self.base_residual == "embedding" else h2).unsqueeze(-2)
        if self.norm == "ln_concat":
            s = self.ln_senses(s.flatten(-2)).view(s.shape)
        elif self.norm == "rms":
            s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight.view(self.num_senses, -1)
        elif self.norm == "ln":
            s = F.layer_norm(s, s.shape[-1:], eps=1e-5) * self.norm_weight.view(self.num_senses, -1)
        return s


class BackpackWeightNetwork(nn.Module):
    """Trunk output (B, T, d) -> alpha (B, k, T, T): per sense, a query and a key of width d/k from one
    Linear d -> 2d; scores / sqrt(d/k), causal (and padding) masked, softmax over the keys."""

    def __init__(self, config):
        super().__init__()
        self.num_senses, self.n_embd = config.num_senses, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd)
        self.scale_alpha = getattr(config, "scale_alpha", True)
        self.alpha_dropout = nn.Dropout(getattr(config, "alpha_dropout", 0.0))

    def forward(self, h, attention_mask=None):
        B, T, _ = h.shape
        q, k = self.c_attn(h).split(self.n_embd, dim=-1)
        q = q.view(B, T, self.num_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        k = k.view(B, T, self.num_senses, -1).transpose(1, 2)  # (B, k, T, d/k)
        scores = q @ k.transpose(-2, -1)  # (B, k, T, T)
        if self.scale_alpha:
            scores = scores / (q.size(-1) ** 0.5)
        masked = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)  # (T, T): the future
        if attention_mask is not None:  # left padding (batched generation): padded keys get no weight
            masked = masked | (attention_mask[:, None, None, :] == 0)  # (B, 1, T, T)
        return self.alpha_dropout(F.softmax(scores + masked * MASKED, dim=-1))


@dataclass
class BackpackGPT2LMHeadModelOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # (B, T, V)
    contextualization: torch.FloatTensor | None = None  # alpha, (B, k, T, T)


class BackpackGPT2PreTrainedModel(GPT2PreTrainedModel):
    """GPT-2's weight initialisation (Conv1D included) under the Backpack's config and prefix."""

    config_class = BackpackGPT2Config
    base_model_prefix = "backpack"
    _no_split_modules = ["GPT2Block"]


class BackpackGPT2Model(BackpackGPT2PreTrainedModel):

    def __init__(self, config: BackpackGPT2Config):
        super().__init__(config)
        self.gpt2_model = GPT2Model(config)
        self.sense_network = BackpackSenseNetwork(config)
        self.sense_weight_net = BackpackWeightNetwork(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """(o (B, T, d), alpha (B, k, T, T))."""
        if position_ids is None and attention_mask is not None:  # left padding: positions start at each row's text
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.gpt2_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state  # (B, T, d), after ln_f
        alpha = self.sense_weight_net(h, attention_mask)  # (B, k, T, T)
        senses = self.sense_network(self.gpt2_model.wte(input_ids))  # (B, T, k, d)
        o = torch.einsum("blij,bjld->bid", alpha, senses)  # (B, T, d)
        return o, alpha


class BackpackGPT2LMHeadModel(BackpackGPT2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backpack.gpt2_model.wte.weight"}

    def __init__(self, config: BackpackGPT2Config):
        super().__init__(config)
        self.backpack = BackpackGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backpack.gpt2_model.wte

    def set_input_embeddings(self, embeddings):
        self.backpack.gpt2_model.wte = embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, **kwargs):
        o, alpha = self.backpack(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits = self.lm_head(o)  # (B, T, V)
        loss = None
        if labels is not None:  # next-token loss: position t predicts labels[t + 1]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return BackpackGPT2LMHeadModelOutput(loss=loss, logits=logits, contextualization=alpha)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: every step reruns the window, the last n_positions tokens (as model.py's generate)."""
        window = self.config.n_positions
        if attention_mask is not None:
            attention_mask = attention_mask[:, -window:]
        return {"input_ids": input_ids[:, -window:], "attention_mask": attention_mask}
