"""One config loader: dataclass defaults < `--config FILE` YAML < command-line flags.

Every stage (and the trainer) describes its options as a dataclass. The same dataclass generates the
argparse flags, validates the YAML file, and is saved (with its hash) next to every output, so a run
can always be explained and resumed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


MAX_CONFIG_BYTES = 1 << 20   # a YAML config file or manifest
MAX_YAML_DEPTH = 32          # lists and mappings inside each other
MAX_YAML_VALUES = 100_000    # values in a YAML file once its aliases (*name) are expanded
QUOTE_CHARS = 200            # the most of a value an error message quotes


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message says which and why."""


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = QUOTE_CHARS
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 8
_QUOTE.maxlevel = 3


def quote(value: Any) -> str:
    """repr(value) for an error message: at most about QUOTE_CHARS characters, however big the value."""
    return _clip(_QUOTE.repr(value))


def option(default: Any = dataclasses.MISSING, *, help: str = "", flag: str | None = None,
           runtime: bool = False, choices: list | None = None, default_factory: Any = dataclasses.MISSING,
           minimum: float | None = None, maximum: float | None = None):
    """A dataclass field with CLI metadata.

    runtime=True marks options that change how a run executes but not what it writes
    (executor, workers, ...): they are left out of the config hash so a resume may change them.
    minimum / maximum bound a number (each item of a list of numbers); None (unset) is always allowed.
    """
    meta = {"help": help, "flag": flag, "runtime": runtime, "choices": choices, "minimum": minimum,
            "maximum": maximum}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class CommonConfig:
    """Flags every stage has (docs/stages.md)."""

    input: str | None = option(None, flag="--in", help="input folder of shards (local path or fsspec URL)")
    out: str | None = option(None, runtime=True, help="output folder: one run of one stage")
    executor: str = option("dask", runtime=True, choices=["local", "dask"],
                           help="'dask' (default: a LocalCluster here, or --scheduler) or 'local' (in-process)")
    scheduler: str | None = option(None, runtime=True, help="address of an existing Dask scheduler")
    workers: int | None = option(None, runtime=True, minimum=1,
                                 help="Dask LocalCluster worker processes (default: cores, or GPUs)")
    overwrite: bool = option(False, runtime=True, help="replace an output folder written with a different config")
    config: str | None = option(None, runtime=True, help="YAML file with any of these options; flags win")
    limit: int | None = option(None, minimum=0, help="process only the first N input samples (a dry run)")
    progress: bool = option(True, runtime=True, help="show a progress bar")
    # per-member size caps of the shard reader (contract.shards.MemberCaps; docs/reader.md): a sample with a
    # bigger member is one `member_too_large` ledger row and the member is never read
    max_member_bytes_image: int = option(64 << 20, help="largest image member read from a shard, in bytes")
    max_member_bytes_json: int = option(1 << 20, help="largest json member read from a shard, in bytes")
    max_member_bytes_text: int = option(1 << 20, help="largest text member (txt, caption_*.txt) read, in bytes")
    max_member_bytes_tensors: int = option(1 << 30, help="largest safetensors member read, in bytes")
    max_member_bytes_other: int = option(64 << 20, help="largest member of any other kind read, in bytes")

    def __post_init__(self):
        for name in ("image", "json", "text", "tensors", "other"):
            value = getattr(self, f"max_member_bytes_{name}")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--max-member-bytes-{name} must be a positive number of bytes, got {quote(value)}")


def flag_for(option: str) -> str:
    """The command-line flag of a config option: `min_side` -> `--min-side`."""
    return "--" + option.replace("_", "-")


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or flag_for(f.name)


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] / `X | None` to X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return tp


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _converter(tp: Any):
    tp = _base_type(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (str,)
        conv = _converter(inner)
        return lambda text: [conv(t) for t in _parse_list(text)]
    if origin is dict:
        return _parse_weights
    if tp in (int, float):
        return _number(tp)
    return str


def _number(tp: type):
    """A flag's int or float, parsed as YAML values are (inf and nan refused)."""
    def convert(text: str):
        try:
            return _scalar(tp, text)
        except ValueError:
            what = "a finite number" if tp is float else _expected(tp)
            raise argparse.ArgumentTypeError(f"expected {what}, got {quote(text)}") from None
    convert.__name__ = tp.__name__
    return convert


def _bounds_text(f: dataclasses.Field) -> str:
    lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    return f"at least {lo}" if lo is not None else (f"at most {hi}" if hi is not None else "")


def _out_of_bounds(f: dataclasses.Field, value: Any) -> bool:
    lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
    items = value if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return any((lo is not None and v < lo) or (hi is not None and v > hi) for v in numbers)


def check_bounds(cfg: Any) -> None:
    """Every number of `cfg` within its option's minimum / maximum; ConfigError `--flag VALUE: must be ...`."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _out_of_bounds(f, value):
            raise ConfigError(f"{_flag_name(f)} {quote(value)}: must be {_bounds_text(f)}")


def _parse_weights(text: str) -> dict[str, float]:
    """`long=0.5,short=0.5` -> {"long": 0.5, "short": 0.5}."""
    out = {}
    for part in _parse_list(text):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT, got {part!r}")
        name, value = part.split("=", 1)
        out[name.strip()] = float(value)
    return out


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """A config class's resolved field types (resolving them per field made every CLI start slow)."""
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field. Defaults are SUPPRESSed so we can tell what the user set."""
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if _base_type(tp) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(tp)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.name.upper().replace("_", "-") if not f.metadata.get("choices") else None
        notes = [f"default: {default}"] if default not in (None, [], {}) else []
        notes += [_bounds_text(f)] if _bounds_text(f) else []
        if notes:
            help_text = f"{help_text} ({'; '.join(notes)})"
        kwargs["help"] = help_text
        parser.add_argument(_flag_name(f), **{k: v for k, v in kwargs.items() if v is not None})


_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (str,))[0]
        return f"a list of {_EXPECTED.get(_base_type(inner), 'values').split(' ', 1)[1]}s" \
            if _base_type(inner) in (int, float, str) else "a list"
    if origin is dict:
        return "a mapping of name: number (or NAME=W,NAME=W)"
    return _EXPECTED.get(tp, "a value")


def _scalar(tp: Any, value: Any) -> Any:
    """One value of type int, float or str; strings are parsed as on the CLI. ValueError when it cannot be."""
    if tp in (int, float):
        if isinstance(value, str):
            value = float(value.strip()) if tp is float else int(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is float and
                                                                               not math.isfinite(value)):
            raise ValueError
        if tp is int and float(value) != int(value):
            raise ValueError
        return tp(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        return str(value)  # `source: 2024` means the text 2024
    return value


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Check one YAML value against the field's type and bounds; strings are parsed as on the CLI."""
    value = _typed(cls, name, value)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if _out_of_bounds(f, value):
        raise ConfigError(f"option {name!r} must be {_bounds_text(f)}, got {quote(value)}")
    return value


def _typed(cls: type, name: str, value: Any) -> Any:
    tp = _base_type(_hints(cls)[name])
    if value is None:
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if origin in (list, tuple):
            inner = _base_type((typing.get_args(tp) or (str,))[0])
            items = _parse_list(value) if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError
            return [_scalar(inner, v) for v in items] if inner in (int, float, str) else list(items)
        if origin is dict:
            mapping = _parse_weights(value) if isinstance(value, str) else value
            if not isinstance(mapping, dict):
                raise ValueError
            return {str(k): _scalar(float, v) for k, v in mapping.items()}
        if tp in (int, float, str):
            return _scalar(tp, value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"option {name!r} must be {_expected(tp)}, got {quote(value)}") from None
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader (no python tags), refusing a key given twice in one mapping (errors name the key), a
    document nested deeper than MAX_YAML_DEPTH or holding more than MAX_YAML_VALUES values once its aliases
    are expanded (each node's expanded size is counted once, so an alias chain is refused before it grows)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise ConfigError(f"line {line}: lists and mappings nested more than {MAX_YAML_DEPTH} levels deep; "
                              "a config holds option: value pairs")
        node = super().compose_node(parent, index)
        self._depth -= 1
        if not isinstance(event, yaml.AliasEvent):
            self._sizes[id(node)] = 1 + sum(self._sizes[id(c)] for c in _children(node))
        elif id(node) not in self._sizes:
            raise ConfigError(f"line {line}: the alias *{_clip(event.anchor)} is inside what it names")
        if self._sizes[id(node)] > MAX_YAML_VALUES:
            raise ConfigError(f"line {line}: more than {MAX_YAML_VALUES:,} values once aliases (*name) are "
                              "expanded; write the values out")
        return node

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # `<<:` merge keys, as the safe loader does
        mapping: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigError(f"line {line}: a key must be a plain name, got {quote(key)}")
            if key in lines:
                raise ConfigError(f"key {quote(key)} is given twice (lines {lines[key]} and {line}); keep one")
            try:
                mapping[key] = self.construct_object(value_node, deep=deep)
            except yaml.constructor.ConstructorError as exc:
                raise ConfigError(f"option {quote(key)} (line {line}): {_clip(exc.problem)}; config files hold "
                                  "plain values only (strings, numbers, lists, mappings), no python tags") from None
            lines[key] = line
        return mapping


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _clip(text: Any) -> str:
    """Text for an error message: at most QUOTE_CHARS characters."""
    text = str(text)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + "..."


def read_yaml(path: str) -> dict:
    """A YAML mapping of at most MAX_CONFIG_BYTES; plain values only (python tags refused), each key once, the
    depth and alias caps of _UniqueKeyLoader. ConfigError names the file."""
    from contract import fs

    try:
        with fs.open_file(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"larger than {MAX_CONFIG_BYTES:,} bytes; a config or manifest holds options, "
                              "not data (list many inputs in a file an option names)")
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    except yaml.constructor.ConstructorError as exc:
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        raise ConfigError(f"{path}{where}: {_clip(exc.problem)}; config files hold plain values only (strings, "
                          "numbers, lists, mappings), no python tags") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {_clip(getattr(exc, 'problem', None) or exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def option_key(f: dataclasses.Field) -> str:
    """A field as YAML files and manifests spell it: its flag without the dashes (`input` -> `in`)."""
    return _flag_name(f)[2:]


def values_from_mapping(cls: type, data: dict, where: str) -> dict[str, Any]:
    """YAML-style `option: value` pairs (`clip-model` or `clip_model`, `in`) -> checked field values.
    An unknown key or a value of the wrong type is a ConfigError naming `where` and the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    by_key = {option_key(f): n for n, f in fields.items()}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = by_key.get(str(key).replace("_", "-")) or str(key).replace("-", "_")
        if name == "in":
            name = "input"
        if name not in fields:
            raise ConfigError(f"{where}: unknown option {quote(key)}; valid: {', '.join(sorted(by_key))}")
        try:
            values[name] = _coerce(cls, name, value)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return values


def build_config(cls: type, cli: dict[str, Any] | None = None, file: str | None = None) -> Any:
    """Effective config: defaults, then the YAML file (`file` or cli['config']), then CLI values."""
    cli = dict(cli or {})
    file = cli.get("config", file)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if file:
        values = values_from_mapping(cls, read_yaml(file), file)
        values["config"] = file
    unknown = set(cli) - names
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values.update(cli)
    try:
        cfg = cls(**values)
    except TypeError as exc:  # a required field without a value
        raise ConfigError(str(exc)) from exc
    check_bounds(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def content_fields(cfg: Any) -> dict[str, Any]:
    """The options that decide what a run writes (runtime options left out)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("runtime")}


def config_hash(cfg: Any, extra: dict | None = None) -> str:
    payload = {"config": content_fields(cfg), "extra": extra or {}}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
