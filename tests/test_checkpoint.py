"""
checkpoint.py: this repo's checkpoints (self-describing, atomic, weights-only loads) and the two ways a
script gets a model, a checkpoint trained here or pretrained weights through --init_from.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import sample  # noqa: E402
import train  # noqa: E402
from checkpoint import checkpoint_dict, load_checkpoint, load_model, model_from_checkpoint, save_checkpoint  # noqa: E402
from common import UserError  # noqa: E402
from model import build_model  # noqa: E402
from test_hf import backpack_config, offline, save_ref_backpack  # noqa: E402,F401  (offline: autouse)


# -----------------------------------------------------------------------------
# train.py and sample.py --init_from a local directory


def test_train_and_sample_init_from_local_dir(tmp_path, capsys, gpt2_bpe):
    # GPT-2 BPE ids need the full 50257-row vocabulary; the rest of the model is tiny
    save_ref_backpack(tmp_path / "hf", backpack_config(n_layer=1, n_head=2, n_embd=16, num_senses=2,
                                                       vocab_size=50264, n_positions=32))
    data = tmp_path / "data"
    os.makedirs(data)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 2000).astype(np.uint16).tofile(data / f"{split}.bin")
    common = dict(init_from=str(tmp_path / "hf"), data_dir=str(data), out_dir=str(tmp_path / "out"), device="cpu",
                  dtype="float32", compile=False, batch_size=2, block_size=16, gradient_accumulation_steps=1,
                  max_iters=2, eval_interval=2, eval_iters=1, learning_rate=1e-4, decay_lr=False)
    with pytest.raises(UserError, match="pass --model_type=backpack"):
        train.main(train.TrainConfig(**common, model_type="gpt"))
    train.main(train.TrainConfig(**common, model_type="backpack"))
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["model_type"] == "backpack" and ckpt["tokenizer"] == {"kind": "gpt2"}
    assert ckpt["model_args"]["block_size"] == 16 and ckpt["iter_num"] == 2  # cropped from 32

    capsys.readouterr()
    sample.main(sample.SampleConfig(init_from=str(tmp_path / "hf"), start="Hello world", num_samples=1,
                                    max_new_tokens=4, device="cpu", dtype="float32"))
    assert capsys.readouterr().out.startswith("Hello world")


@pytest.mark.parametrize("model_type", ["gpt", "backpack"])
def test_a_checkpoint_describes_itself_and_round_trips(tmp_path, model_type):
    """What load_model needs is in the file: the type, the config and the tokenizer; the weights come
    back bit for bit, and the model is in eval mode on the device asked for."""
    torch.manual_seed(0)
    model = build_model(model_type, n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11,
                        **({"n_senses": 2} if model_type == "backpack" else {}))
    spec = {"kind": "char", "itos": list("abcdefghijk")}
    save_checkpoint(checkpoint_dict(model, spec, iter_num=7), str(tmp_path / "ckpt.pt"))
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["model_type"] == model_type and ckpt["tokenizer"] == spec and ckpt["iter_num"] == 7
    assert ckpt["model_args"]["vocab_size"] == 11
    back = model_from_checkpoint(ckpt)
    assert type(back) is type(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    loaded, tokenizer = load_model("resume", str(tmp_path), "cpu")
    assert not loaded.training and tokenizer.decode([0, 10]) == "ak"
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # the atomic write left nothing


def test_what_is_not_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint at .*ckpt.pt; train one first or pass the right --out_dir"):
        load_model("resume", str(tmp_path), "cpu")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=r"is not a checkpoint of this repo \(no model/model_type entry\)"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    (tmp_path / "ckpt.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"is not a loadable checkpoint \(not a torch.save file\)"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))

