"""configurator.py: nanoGPT's command line, typed."""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from common import UserError
from configurator import parse_config
from conftest import REPO


@dataclass
class Cfg:
    out_dir: str = "out"  # where things go
    batch_size: int = 12  # sequences per batch
    learning_rate: float = 6e-4  # max lr
    compile: bool = True  # torch.compile
    flag: bool | None = None  # None means "model default"


def test_defaults_and_overrides(tmp_path):
    assert parse_config(Cfg, []) == Cfg()
    config_file = tmp_path / "c.py"
    config_file.write_text("import math\nbatch_size = 32\nlearning_rate = 1e-3  # comment\n_private = 1\n")
    cfg = parse_config(Cfg, [str(config_file), "--batch_size=64", "--out_dir=123", "--compile=False"])
    assert cfg == Cfg(out_dir="123", batch_size=64, learning_rate=1e-3, compile=False)
    lr = parse_config(Cfg, ["--learning_rate=1", "--flag=True"]).learning_rate
    assert lr == 1.0 and type(lr) is float  # an int given for a float field becomes a float
    assert parse_config(Cfg, ["--flag=None"]).flag is None


def test_later_wins(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("batch_size = 1\n")
    b.write_text("batch_size = 2\n")
    assert parse_config(Cfg, [str(a), str(b)]).batch_size == 2
    assert parse_config(Cfg, ["--batch_size=3", str(a)]).batch_size == 1


@pytest.mark.parametrize("argv,message", [
    (["--batch_sise=3"], "unknown config key 'batch_sise'; did you mean --batch_size"),
    (["--zzz=3"], "unknown config key 'zzz'; see --help"),
    (["--batch_size=3.5"], "config key 'batch_size' expects int, got float 3.5"),
    (["--batch_size=abc"], "config key 'batch_size' expects int, got str 'abc'"),
    (["--compile=1"], "config key 'compile' expects bool, got int 1"),
    (["--batch_size=True"], "config key 'batch_size' expects int, got bool True"),  # bool is an int subclass
    (["--learning_rate=False"], "config key 'learning_rate' expects float, got bool False"),
    (["--batch_size"], "has no value; write --batch_size=VALUE"),
    (["config/does_not_exist.py"], "config file config/does_not_exist.py not found"),
])
def test_errors(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(Cfg, argv)


def test_unknown_key_in_config_file(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("learning_rat = 1.0\n")
    with pytest.raises(UserError, match="did you mean --learning_rate"):
        parse_config(Cfg, [str(config_file)])


def test_help_lists_keys_defaults_and_comments():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    assert "--batch_size=12  # sequences per micro-batch" in out.stdout
    assert "--n_senses=16" in out.stdout


def test_cli_error_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "train.py", "--n_layers=2"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown config key 'n_layers'; did you mean --n_layer?"


def test_a_float_field_from_a_config_file_is_a_float(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("learning_rate = 3\n")
    assert type(parse_config(Cfg, [str(config_file)]).learning_rate) is float


@dataclass
class StrCfg:
    start: str = "\n"  # a prompt
    run_name: str = "run"  # a name
    maybe: str | None = None  # a string or None
    ALIASES = {"prompt": "start"}


@pytest.mark.parametrize("raw,value", [
    ("1.50", "1.50"), ("0x1F", "0x1F"), ("1e-3", "1e-3"), ("007", "007"), ("[1, 2]", "[1, 2]"), ("True", "True"),
    ("None", "None"), ("'\\n\\n'", "\n\n"), ("\"quoted\"", "quoted"), ("ROMEO:", "ROMEO:"), ("", ""),
])
def test_a_string_flag_keeps_its_text(raw, value):
    """A str field takes the flag's text verbatim, never the text of what literal_eval made of it
    (--start=1.50 is '1.50', not '1.5'); only a quoted Python string literal is unquoted."""
    assert parse_config(StrCfg, [f"--start={raw}", f"--run_name={raw}"]) == StrCfg(start=value, run_name=value)


def test_a_str_or_none_flag():
    assert parse_config(StrCfg, ["--maybe=None"]).maybe is None
    assert parse_config(StrCfg, ["--maybe=1.50"]).maybe == "1.50"


def test_an_alias_names_its_key(tmp_path):
    """sample.py's --prompt is its --start: on the command line, in a config file and in --help."""
    assert parse_config(StrCfg, ["--prompt=ROMEO:"]).start == "ROMEO:"
    config_file = tmp_path / "c.py"
    config_file.write_text("prompt = 'JULIET:'\n")
    assert parse_config(StrCfg, [str(config_file)]).start == "JULIET:"
    out = subprocess.run([sys.executable, "sample.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert "--start='\\n' (or --prompt)" in out.stdout



def test_a_number_in_a_config_file_for_a_str_field_is_its_text(tmp_path):
    """`out_dir = 123` in a config file is the string '123' (a str field gets a str); a bool is still refused."""
    def config(text: str) -> str:
        path = tmp_path / "number.py"
        path.write_text(text)
        return str(path)
    assert parse_config(Cfg, [config("out_dir = 123\n")]).out_dir == "123"
    assert parse_config(StrCfg, [config("run_name = 1.5\n")]).run_name == "1.5"
    with pytest.raises(UserError, match="config key 'out_dir' expects str, got bool True"):
        parse_config(Cfg, [config("out_dir = True\n")])
