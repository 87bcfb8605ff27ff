"""
The configuration of a Backpack language model (Hewitt et al., ACL 2023) for transformers' Auto
classes. nano-BackpackLM's export_hf.py copies this file into every Backpack export; transformers
runs it only when asked to (trust_remote_code=True).

Fields are GPT2Config's (the trunk is a GPT-2) plus the two the Backpack adds, and the four opt-in
departures from the paper that nano-BackpackLM offers (sense_norm etc.; their defaults are the paper). The defaults are the
published Backpack-Small's: 50264 ids, 512 positions, 16 senses, sense MLPs 4 * n_embd wide, and the
attention scores of layer i divided by i + 1.
"""

from transformers import GPT2Config


class BackpackGPT2Config(GPT2Config):
    model_type = "backpack-gpt2"

    vocab_size: int = 50264
    n_positions: int = 512
    scale_attn_by_inverse_layer_idx: bool = True
    num_senses: int = 16  # k, sense vectors per token
    sense_intermediate_scale: int = 4  # both sense MLPs are sense_intermediate_scale * n_embd wide
    use_cache: bool = False  # the Backpack recomputes its whole window at every generated token
    # nano-BackpackLM's opt-in departures from the paper; these defaults are the paper's model
    sense_norm: str = "none"  # "rms" / "ln": each sense normalised over d with a (k, d) gain; "ln_concat"
    sense_base_residual: str = "none"  # "embedding" / "block": a vector of the token added to every sense
    alpha_dropout: float = 0.0  # dropout on alpha while training
    scale_alpha: bool = True  # False: no 1/sqrt(d/k) on alpha's scores
