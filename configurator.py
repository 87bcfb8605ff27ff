"""
nanoGPT's command line, typed:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Positional arguments are config files of plain Python assignments; `--key=value` overrides follow,
and later wins. Values are parsed as Python literals (falling back to a plain string). Every key
must be a field of the script's config dataclass and match its type; `--help` lists them all.
"""

import ast
import dataclasses
import difflib
import inspect
import os
import re
import sys
import types
import typing

from common import UserError


def _field_types(cfg_class) -> dict:
    hints = typing.get_type_hints(cfg_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_class)}


def _unknown_key(key: str, known) -> UserError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help for the list"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value, typ):
    """Check value against the field's type; ints are accepted where floats are expected."""
    allowed = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and type(value) is int:
            return float(value)
        if t is not type(None) and type(value) is t:
            return value
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a config file's `out_dir = 123`; on the command line the text stays verbatim
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise UserError(f"config key '{key}' expects {names}, got {type(value).__name__} {value!r}")


def _parse_value(raw: str, typ):
    """A Python literal where the text is one (falling back to the text itself). A field that takes
    a string keeps its text verbatim (--start=1.50 stays '1.50', --wandb_run_name=1e-3 stays '1e-3'),
    unless the text is a quoted string literal (--stop="'\\n\\n'" is two newlines) or None where the
    field allows it."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw  # a bare string such as --device=cpu
    allowed = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    if str in allowed and not isinstance(value, str) and not (value is None and type(None) in allowed):
        return raw
    return value


def _read_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"config file {path} not found; config files live in config/")
    namespace: dict = {}
    with open(path) as f:
        source = f.read()
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as e:
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)}


def _help(cfg_class) -> str:
    """Keys, defaults and the comment written beside each field in the dataclass source (and in the
    sources of the dataclasses it extends, as bench.py's config extends train.py's)."""
    source = "".join(inspect.getsource(c) for c in reversed(cfg_class.__mro__) if dataclasses.is_dataclass(c))
    comments = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", source, re.M))
    lines = [f"options (python {os.path.basename(sys.argv[0])} [config/file.py ...] [--key=value ...]):"]
    aliases = getattr(cfg_class, "ALIASES", {})
    for f in dataclasses.fields(cfg_class):
        also = "".join(f" (or --{a})" for a, name in aliases.items() if name == f.name)
        lines.append(f"  --{f.name}={f.default!r}{also}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def parse_config(cfg_class, argv: list[str]):
    """Build a cfg_class instance from config files and --key=value overrides."""
    types_ = _field_types(cfg_class)
    aliases = getattr(cfg_class, "ALIASES", {})  # other names a script accepts for a key (sample.py: prompt)
    values = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(_help(cfg_class))
            sys.exit(0)
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise UserError(f"argument {arg} has no value; write --{key}=VALUE")
            key = aliases.get(key, key)
            if key not in types_:
                raise _unknown_key(key, types_)
            items = {key: _parse_value(raw, types_[key])}
        else:
            items = _read_config_file(arg)
        for key, value in items.items():
            key = aliases.get(key, key)
            if key not in types_:
                raise _unknown_key(key, types_)
            values[key] = _coerce(key, value, types_[key])
    return cfg_class(**values)


def run_cli(main, cfg_class, argv: list[str] | None = None):
    """Parse the command line into cfg_class and run main(cfg). Bad input ends the program with one
    line naming the problem and the fix, exit status 2, no traceback."""
    try:
        cfg = parse_config(cfg_class, sys.argv[1:] if argv is None else argv)
        return main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
