"""
Parity of pretrained loading and export at full size: max |difference| between our models and the
references the tests hold (tests/test_hf.py: transformers' GPT2LMHeadModel and RefBackpackLM, written
in the published layout; tests/test_convert_flash_ckpt.py: the spec's math on a flash state dict): GPT-2 124M, Backpack-Small 170M, Backpack-Micro for the flash
converter; random weights, every parameter perturbed) on one batch of 2 x 512 tokens, loading and
exporting. Offline (with GPT2_BPE_DIR: exports write GPT-2's tokenizer files), CPU, a minute
or two:

    python experiments/hf_parity.py
"""

import json
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perturb_(module, std=0.02, seed=0):
    """Init-scale noise on every parameter: LayerNorms and biases move off 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


@torch.no_grad()
def main():
    # the references live with the tests; transformers and safetensors are needed for them (requirements.txt)
    sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
    from safetensors.torch import save_file
    from test_convert_flash_ckpt import flash_logits, flash_state_dict
    from test_hf import RefBackpackLM, backpack_config, ids, max_diff
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    import convert_flash_ckpt
    import hf
    from model import GPT, Backpack
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        ref = perturb_(GPT2LMHeadModel(GPT2Config(bos_token_id=50256, eos_token_id=50256))).eval()
        ref.save_pretrained(folder)
        ours = hf.load_pretrained(GPT, folder).eval()
        x = ids(50257, 512)
        theirs = ref(x).logits
        print(f"gpt2-size (12x768, V 50257): max |logits diff| {max_diff(ours(x)[0], theirs):.2e} "
              f"(|logits| up to {theirs.abs().max():.1f})")
        hf.save_pretrained(ours, os.path.join(folder, "export"))
        exported = GPT2LMHeadModel.from_pretrained(os.path.join(folder, "export")).eval()
        print(f"  exported back to transformers: max |logits diff| {max_diff(exported(x).logits, ours(x)[0]):.2e}")

    with tempfile.TemporaryDirectory() as folder:
        config = backpack_config(n_layer=12, n_head=12, n_embd=768, num_senses=16, vocab_size=50264, n_positions=512)
        ref = perturb_(RefBackpackLM(GPT2Config(**config))).eval()
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        tied_copies = ("lm_head.weight", "backpack.word_embeddings.weight", "backpack.position_embeddings.weight")
        state = {k: v.clone() for k, v in ref.state_dict().items() if k not in tied_copies}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        ours = hf.load_pretrained(Backpack, folder).eval()
        x = ids(50264, 512)
        logits, alpha = ref(x)
        print(f"backpack-small-size (12x768, k 16, V 50264, 512 positions): max |logits diff| "
              f"{max_diff(ours(x)[0], logits):.2e} (|logits| up to {logits.abs().max():.1f}), "
              f"max |contextualization diff| {max_diff(ours.contextualization(x), alpha):.2e}")
        hf.save_pretrained(ours, os.path.join(folder, "export"))  # the padding rows past GPT-2's 50257 ids are cut
        back = hf.load_pretrained(Backpack, os.path.join(folder, "export")).eval()
        x, mine = ids(50257, 512), ours(ids(50257, 512))[0][..., :50257]
        print(f"  exported and loaded back: max |logits diff| {max_diff(back(x)[0], mine):.2e}")
        remote = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "export"), trust_remote_code=True).eval()
        print(f"  exported to transformers (its shipped modeling code): max |logits diff| "
              f"{max_diff(remote(x).logits, mine):.2e} (|logits| up to {mine.abs().max():.1f})")

    with tempfile.TemporaryDirectory() as folder:
        state = flash_state_dict(n_layer=6, d=384, vocab_size=50264, positions=512, n_senses=16, std=0.02)
        torch.save({"state_dict": {"model." + k: v for k, v in state.items()}}, os.path.join(folder, "x.ckpt"))
        convert_flash_ckpt.main(convert_flash_ckpt.ConvertConfig(ckpt=os.path.join(folder, "x.ckpt"),
                                                                 export_dir=os.path.join(folder, "hf")))
        ours = hf.load_pretrained(Backpack, os.path.join(folder, "hf")).eval()
        x = ids(50257, 512)
        reference = flash_logits(state, x, n_head=6, n_senses=16)[..., :50257]  # the export keeps GPT-2's ids
        print(f"flash micro (6x384, k 16): max |logits diff| {max_diff(ours(x)[0], reference):.2e} "
              f"(|logits| up to {reference.abs().max():.1f})")


if __name__ == "__main__":
    main()
