"""runs.py's up-front checks, and every other one-line error of the command lines that share its harness
(sample.py, the prepare recipes): bad input, one case per row: each must end the program with exit status 2 and ONE line on stderr
("error: <problem>; <fix>", no traceback), and must leave every existing checkpoint and data file
byte for byte as it was, and create no folder. Plus: torch.compile falling back to eager where the
compiler fails, and only there.

Most rows run in-process through configurator.run_cli (what `python train.py ...` runs, minus the
interpreter start); the rows marked cli, and all prepare scripts, run as real subprocesses.
"""

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import sample
import train
from common import UserError
from configurator import run_cli
from conftest import REPO, SHAKESPEARE, TINY_TRAIN, RunsCode, cli_args

TINY = cli_args(**dict(TINY_TRAIN, max_iters=2, model_type="backpack"))
# --overwrite=True: the rows below test what comes after the check that {out} holds another run
TRAIN = TINY + ["--data_dir={data}", "--out_dir={out}", "--overwrite=True"]
SAMPLE = ["--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=2"]


def write(path, content: bytes):
    with open(path, "wb") as f:
        f.write(content)


def rewrite_meta(ws, monkeypatch):
    """A meta.pkl from another dataset: same kind of tokenizer, one more character."""
    with open(ws / "data" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    meta["tokenizer"] = dict(meta["tokenizer"], itos=meta["tokenizer"]["itos"] + ["~"])
    write(ws / "data" / "meta.pkl", pickle.dumps(meta))


def vocab_size(ws) -> int:
    with open(ws / "data" / "meta.pkl", "rb") as f:
        return pickle.load(f)["vocab_size"]


# (id, script, argv, regex the one line must match (problem ... fix), setup(ws, monkeypatch), cli)
CASES = [
    ("unknown key", "train", TRAIN + ["--batch_sise=4"],
     r"unknown config key 'batch_sise'; did you mean --batch_size", None, True),
    ("wrong type", "train", TRAIN + ["--batch_size=four"], r"'batch_size' expects int, got str 'four'", None, False),
    ("no value", "train", TRAIN + ["--batch_size"], r"--batch_size has no value; write --batch_size=VALUE", None, False),
    ("config file missing", "train", ["config/nope.py"] + TRAIN, r"config file config/nope.py not found; .*config/",
     None, False),
    ("config file broken", "train", ["{ws}/bad_config.py"] + TRAIN, r"bad_config.py failed to run: SyntaxError",
     lambda ws, mp: write(ws / "bad_config.py", b"batch_size = = 4\n"), False),
    ("dataset folder missing", "train", TINY + ["--dataset=shakespeare_chr", "--out_dir={ws}/new"],
     r"data/shakespeare_chr not found; did you mean --dataset=shakespeare_char\? .*python data/shakespeare_char/prepare.py",
     None, False),
    ("dataset far from any", "train", TINY + ["--dataset=nope", "--out_dir={ws}/new"],
     r"data/nope not found; pick one of [^;]*shakespeare_char[^;]* and prepare it first \(python data/<name>/prepare.py\), "
     r"or pass --data_dir$", None, False),
    ("another run in out_dir", "train", TINY + ["--data_dir={data}", "--out_dir={out}"],
     r"out already holds a backpack run on --data_dir=\S+ at iter 2 \(best val loss \d+\.\d{4}\); continue it with "
     r"--init_from=resume, or replace it with --overwrite=True", None, False),
    ("meta.pkl that runs code", "train", TRAIN,
     r"meta.pkl holds more than plain data \(it would call posix.system\); refusing to load it: re-create it",
     lambda ws, mp: write(ws / "data" / "meta.pkl", pickle.dumps(RunsCode(ws / "pwned"))), True),
    ("data_dir missing", "train", TRAIN + ["--data_dir={ws}/nowhere"], r"nowhere does not exist; point it at", None, False),
    ("train.bin missing", "train", TRAIN, r"train.bin not found; prepare the data first: python data/<dataset>/prepare.py --out_dir=",
     lambda ws, mp: os.remove(ws / "data" / "train.bin"), False),
    ("empty bin", "train", TRAIN, r"val.bin is empty or truncated .* re-run the dataset's prepare.py",
     lambda ws, mp: write(ws / "data" / "val.bin", b""), False),
    ("truncated bin", "train", TRAIN, r"train.bin is empty or truncated \(\d+ bytes for uint16.*prepare.py",
     lambda ws, mp: write(ws / "data" / "train.bin", open(ws / "data" / "train.bin", "rb").read()[:-1]), False),
    ("token id >= vocab", "train", TRAIN, r"holds token id 999 but the vocabulary has only \d+ ids; .*prepare.py",
     lambda ws, mp: np.full(5000, 999, dtype=np.uint16).tofile(ws / "data" / "val.bin"), False),
    ("token id == vocab", "train", TRAIN, r"holds token id (\d+) but the vocabulary has only \1 ids",
     lambda ws, mp: np.full(5000, vocab_size(ws), dtype=np.uint16).tofile(ws / "data" / "val.bin"), False),
    ("meta.pkl vs checkpoint", "train", TRAIN + ["--init_from=resume", "--max_iters=4"],
     r"tokenizer in .*\(char with 60 entries\) differs from .*ckpt.pt was trained with \(char with 59 .*--data_dir=", rewrite_meta, False),
    ("block_size > bin", "train", TRAIN, r"val.bin in .* has 10 tokens, not more than block_size=16; lower --block_size",
     lambda ws, mp: np.zeros(10, dtype=np.uint16).tofile(ws / "data" / "val.bin"), False),
    ("batch_size 0", "train", TRAIN + ["--batch_size=0"], r"batch_size must be positive \(got 0\); pass --batch_size=N",
     None, False),
    ("block_size < 0", "train", TRAIN + ["--block_size=-1"], r"block_size must be positive \(got -1\)", None, False),
    ("eval_interval 0", "train", TRAIN + ["--eval_interval=0"], r"eval_interval must be positive", None, False),
    ("n_layer 0", "train", TRAIN + ["--n_layer=0"], r"n_layer must be positive \(got 0\)", None, False),
    ("n_head vs n_embd", "train", TRAIN + ["--n_head=3"],
     r"n_embd=32 is not divisible by n_head=3; .*pass --n_head=2 or 4$", None, False),
    ("n_senses vs n_embd", "train", TRAIN + ["--n_senses=3"],
     r"n_embd=32 is not divisible by n_senses=3; .*pass --n_senses=2 or 4$", None, True),
    ("model_type typo", "train", TRAIN + ["--model_type=gtp"], r"unknown --model_type=gtp; did you mean gpt\?$", None, True),
    ("dropout 1.5", "train", TRAIN + ["--dropout=1.5"], r"dropout must be in \[0, 1\) \(got 1.5\); it is the probability",
     None, True),
    ("learning_rate 0", "train", TRAIN + ["--learning_rate=0"], r"learning_rate must be in \(0, inf\) \(got 0.0\)",
     None, False),
    ("min_lr < 0", "train", TRAIN + ["--min_lr=-1e-5"], r"min_lr must be in \[0, inf\) \(got -1e-05\)", None, False),
    ("beta2 1", "train", TRAIN + ["--beta2=1.0"], r"beta2 must be in \[0, 1\) \(got 1.0\)", None, False),
    ("weight_decay < 0", "train", TRAIN + ["--weight_decay=-0.1"], r"weight_decay must be in \[0, inf\)", None, False),
    ("grad_clip < 0", "train", TRAIN + ["--grad_clip=-1"], r"grad_clip must be in \[0, inf\)", None, False),
    ("dtype typo", "train", TRAIN + ["--dtype=bfloat61"], r"unknown --dtype=bfloat61; did you mean bfloat16\?$", None, False),
    ("backend typo", "train", TRAIN + ["--backend=glo"], r"unknown --backend=glo; did you mean gloo\?$", None, False),
    ("device typo", "train", TRAIN + ["--device=cpuu"], r"unknown --device=cpuu; did you mean cpu\? use cpu, cuda", None, False),
    ("init_from typo", "train", TRAIN + ["--init_from=resum"], r"unknown --init_from=resum; did you mean resume\?$", None, False),
    ("accum vs world size", "train", TRAIN + ["--gradient_accumulation_steps=3"],
     r"gradient_accumulation_steps=3 is not divisible by the 2 ranks; make it a multiple of 2",
     lambda ws, mp: [mp.setenv(k, v) for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items()], False),
    ("resume without checkpoint", "train", TRAIN + ["--init_from=resume", "--out_dir={ws}/empty"],
     r"has no ckpt.pt; train from scratch first or pass the run's --out_dir", None, False),
    ("corrupt checkpoint", "train", TRAIN + ["--init_from=resume"], r"ckpt.pt is not a loadable checkpoint \(not a torch.save file\); it is corrupt",
     lambda ws, mp: write(ws / "out" / "ckpt.pt", b"\x00garbage" * 100), False),
    ("model type mismatch", "train", TRAIN + ["--init_from=resume", "--model_type=gpt"],
     r"holds a backpack model but model_type=gpt; pass --model_type=backpack", None, False),
    ("unknown init_from", "train", TRAIN + ["--init_from=gpt3"], r"unknown pretrained model 'gpt3'.*gpt2", None, False),
    ("fp16 on CPU", "train", TRAIN + ["--dtype=float16"], r"float16 is not supported on CPU; use --dtype=float32",
     None, False),
    ("bf16 on an old GPU", "train", TRAIN + ["--device=cuda", "--dtype=bfloat16"],
     r"this GPU does not support bfloat16; use --dtype=float16",
     lambda ws, mp: (mp.setattr(torch.cuda, "is_available", lambda: True),
                     mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)), False),
    ("unknown device", "train", TRAIN + ["--device=tpu"], r"unknown --device=tpu; .*use cpu, cuda, cuda:N, mps or auto", None, False),
    ("out_dir not writable", "train", TRAIN + ["--out_dir={data}/meta.pkl/out"],
     r"out_dir .*meta.pkl/out is not writable \(.*meta.pkl is a file\); pass a writable --out_dir", None, False),
    ("sample unknown key", "sample", SAMPLE + ["--temprature=0.5"], r"did you mean --temperature", None, False),
    ("sample no checkpoint", "sample", SAMPLE + ["--out_dir={ws}/empty"], r"no checkpoint at .*ckpt.pt; train one first",
     None, False),
    ("sample corrupt checkpoint", "sample", SAMPLE, r"not a loadable checkpoint .*corrupt or not from this repo",
     lambda ws, mp: write(ws / "out" / "ckpt.pt", open(ws / "out" / "ckpt.pt", "rb").read()[:5000]), False),
    ("pickle that runs code", "sample", SAMPLE, r"not a loadable checkpoint \(unpickling it would call posix.system, which weights_only=True refuses\)",
     lambda ws, mp: write(ws / "out" / "ckpt.pt", pickle.dumps({"model": RunsCode(ws / "pwned")}, protocol=2)), True),
    ("pickle 4 that runs code", "sample", SAMPLE, r"not a loadable checkpoint \(not a torch.save file\)",
     lambda ws, mp: write(ws / "out" / "ckpt.pt", pickle.dumps({"model": RunsCode(ws / "pwned")}, protocol=4)), False),
    ("prompt file missing", "sample", SAMPLE + ["--start=FILE:{ws}/nope.txt"],
     r"prompt file .*nope.txt not found; check the path after FILE:", None, False),
    ("empty prompt", "sample", SAMPLE + ["--start="], r"the prompt is empty; pass --start", None, False),
    ("empty prompt file", "sample", SAMPLE + ["--start=FILE:{ws}/empty.txt"], r"the prompt is empty",
     lambda ws, mp: write(ws / "empty.txt", b""), False),
    ("prompt outside char vocab", "sample", SAMPLE + ["--start=hello €"],
     r"characters \['€'\] are not in this model's character vocabulary; remove them", None, False),
    ("sample unknown init_from", "sample", SAMPLE + ["--init_from=gpt3"], r"unknown pretrained model 'gpt3'", None, False),
    ("sample negative top_k", "sample", SAMPLE + ["--top_k=-1"], r"must be >= 0 \(got .*-1", None, False),
    ("sample fp16 on CPU", "sample", SAMPLE + ["--dtype=float16"], r"float16 is not supported on CPU", None, False),
    ("prepare input missing", "data/shakespeare_char/prepare.py", ["{ws}/nope.txt", "--out_dir={data}"],
     r"nope.txt not found; pass the path of tinyshakespeare's input.txt", None, True),
    ("prepare input empty", "data/shakespeare_char/prepare.py", ["{ws}/empty.txt", "--out_dir={data}"],
     r"empty.txt is empty; pass tinyshakespeare's input.txt", lambda ws, mp: write(ws / "empty.txt", b""), True),
    ("prepare input not UTF-8", "data/shakespeare_char/prepare.py", ["{ws}/latin1.txt", "--out_dir={data}"],
     r"latin1.txt is unreadable \(.*utf-8.*\); pass a UTF-8 text file",
     lambda ws, mp: write(ws / "latin1.txt", "caf\u00e9 ol\u00e9".encode("latin-1")), True),
    ("prepare BPE file missing", "data/shakespeare/prepare.py", [SHAKESPEARE, "--out_dir={data}"],
     r"GPT2_BPE_DIR=.* has no gpt2.tiktoken; unset it to download", lambda ws, mp: mp.setenv("GPT2_BPE_DIR", str(ws)),
     True),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_char_data):
    """A tiny Backpack checkpoint and its dataset, copied into each case's own folder."""
    base = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_char_data, base / "data")
    train.main(train.TrainConfig(**dict(TINY_TRAIN, max_iters=2, model_type="backpack", data_dir=str(base / "data"),
                                        out_dir=str(base / "out"))))
    return base


def tree_hashes(root) -> dict:
    """Every file's hash, and every folder (an empty out_dir left behind counts as a change)."""
    out = {}
    for folder, _, files in os.walk(root):
        out[os.path.relpath(folder, root) + "/"] = "folder"
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run(script: str, argv: list[str], cli: bool, capsys) -> tuple[int, str]:
    """Exit status and stderr of one run of script."""
    if cli or script.endswith(".py"):
        path = script if script.endswith(".py") else f"{script}.py"
        proc = subprocess.run([sys.executable, path, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stderr
    module = {"train": train, "sample": sample}[script]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, {"train": train.TrainConfig, "sample": sample.SampleConfig}[script], argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name,script,argv,expected,setup,cli", CASES, ids=[c[0] for c in CASES])
def test_bad_input(trained, tmp_path, monkeypatch, capsys, name, script, argv, expected, setup, cli):
    ws = tmp_path
    shutil.copytree(trained / "data", ws / "data")
    shutil.copytree(trained / "out", ws / "out")
    (ws / "empty").mkdir()
    monkeypatch.chdir(REPO)
    if setup:
        setup(ws, monkeypatch)
    argv = [a.format(ws=ws, data=ws / "data", out=ws / "out") for a in argv]
    before = tree_hashes(ws)

    status, err = run(script, argv, cli, capsys)

    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, (status, err)
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(expected, lines[0]), lines[0]
    assert tree_hashes(ws) == before  # no checkpoint or data file written, changed or removed
    assert not (ws / "pwned").exists()


def compiler_failure() -> Exception:
    """What torch.compile raises at the first call on a machine without a working C++ compiler."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InvalidCxxCompiler
    return BackendCompilerFailed(lambda gm, inputs: gm, InvalidCxxCompiler(), None)


@pytest.mark.parametrize("how", ["compile raises", "first call raises"])
def test_compile_falls_back_to_eager(trained, tmp_path, monkeypatch, capsys, how):
    """--compile=True where torch.compile cannot work: a warning, then training as without it."""

    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise compiler_failure()

    def fake_compile(model, *args, **kwargs):
        if how == "compile raises":
            raise RuntimeError("torch.compile is not supported on this Python")
        return Broken()

    monkeypatch.setattr(torch, "compile", fake_compile)
    train.main(train.TrainConfig(**dict(TINY_TRAIN, compile=True, model_type="gpt", data_dir=str(trained / "data"),
                                        out_dir=str(tmp_path))))
    captured = capsys.readouterr()
    expected = "RuntimeError" if how == "compile raises" else "BackendCompilerFailed: backend='<lambda>' raised:"
    assert f"warning: torch.compile failed ({expected}" in captured.err and "--compile=False" in captured.err
    assert "step 6: train loss" in captured.out and (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("error", [
    IndexError("index out of range in self"),  # a bad id in the embedding: a real error, eager or not
    UserError("train.bin holds token id 999 but the vocabulary has only 59 ids"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "compiler failure around an out-of-memory error",
])
def test_compile_lets_real_errors_through(monkeypatch, capsys, error):
    """Only the compiler's own failures fall back to eager: the model's errors, out of memory and
    UserErrors in the first compiled step surface as they are, with no warning."""
    if isinstance(error, str):
        from torch._dynamo.exc import BackendCompilerFailed
        error = BackendCompilerFailed(lambda gm, inputs: gm, torch.OutOfMemoryError("out of memory"), None)
    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: model)

    def first_call(compiled):
        raise error

    with pytest.raises(type(error)):
        common.compile_model(torch.nn.Linear(2, 2), first_call)
    assert "warning" not in capsys.readouterr().err
