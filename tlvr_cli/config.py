"""The config loader: YAML presets mapped onto the job dataclasses of ``jobs.py``, with dotted
``--set`` overrides.

Every job (``grpo``, ``coldstart``, ``eval``, ...) has one dataclass whose fields carry a default
and a one-line help text (``option(default, "help")``). A preset is a YAML file naming its job
(``job: grpo``) and optionally a ``base:`` preset it extends. Unknown keys, wrong types and
malformed YAML raise :class:`TlvrError` naming the key (or line) with a close-match suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import TlvrError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key (of each element, for a list): bounds, inclusive or not."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A config field with a default, a help string (shown by ``presets show`` and ``--help``) and,
    for numbers, its valid range (checked when a config loads)."""
    meta: dict[str, Any] = {"help": help}
    if (ge, gt, le, lt) != (None, None, None, None):
        meta["range"] = Range(ge, gt, le, lt)
    if isinstance(default, (list, dict, set)) or is_dataclass(default):
        value = default
        return field(default_factory=lambda: _copy(value), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


# ----------------------------------------------------------------------------- presets


def preset_dirs() -> list[Path]:
    """Where presets are looked up: $TLVR_PRESETS, the packaged copy, then the source checkout."""
    dirs = []
    if os.environ.get("TLVR_PRESETS"):
        dirs.append(Path(os.environ["TLVR_PRESETS"]))
    here = Path(__file__).resolve().parent
    dirs += [here / "presets", here.parent / "presets"]
    return [d for d in dirs if d.is_dir()]


def list_presets() -> dict[str, Path]:
    """All preset names (file stems) mapped to their files; earlier directories win."""
    found: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``nextqa``) or a path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise TlvrError(f"preset file not found: {p}")
        return p
    presets = list_presets()
    if name_or_path in presets:
        return presets[name_or_path]
    raise TlvrError(f"unknown preset '{name_or_path}'{_suggest(name_or_path, presets)}; see `tlvr presets list`")


def read_yaml(path: Path) -> dict:
    """Parse a YAML mapping; errors name the file and line."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TlvrError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TlvrError(f"{path}: a preset must be a YAML mapping, got {type(data).__name__}")
    return data


def load_preset_dict(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The preset's mapping with its ``base:`` chain merged in (the preset's own keys win)."""
    path = resolve_preset(name_or_path)
    if str(path) in _seen:
        raise TlvrError(f"{path}: 'base' chain loops back on itself")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base:
        parent = load_preset_dict(str(base), _seen + (str(path),))
        data = deep_merge(parent, data)
    return data


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["optim.lr=1e-6", "data.frames=8"]`` → nested dict with YAML-typed values."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise TlvrError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise TlvrError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TlvrError(f"--set {item!r}: '{part}' is set twice, as a value and as a section")
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], preset: str | None = None, overrides: Sequence[str] = (), extra: dict | None = None) -> T:
    """Build a job config: dataclass defaults ← preset (with its bases) ← ``extra`` ← ``--set`` overrides."""
    data: dict = {}
    source = "defaults"
    if preset:
        data = load_preset_dict(preset)
        source = f"preset {preset}"
    job = data.pop("job", None)
    expected = getattr(cls, "JOB", None)
    if job is not None and expected is not None and job != expected:
        # a preset of a more specific job (the demo extends GRPO) is accepted where its base job is asked for
        special = next((c for c in _subclasses(cls) if getattr(c, "JOB", None) == job), None)
        if special is None:
            raise TlvrError(f"{source} is a '{job}' preset, not a '{expected}' one")
        cls = special
    if extra:
        data = deep_merge(data, extra)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data, source=source)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def from_dict(cls: type[T], data: dict, *, source: str = "config", prefix: str = "") -> T:
    """Validate ``data`` against dataclass ``cls`` (unknown keys and wrong types are errors)."""
    if not isinstance(data, dict):
        raise TlvrError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise TlvrError(f"{source}: unknown key '{prefix}{key}'{_suggest(key, list(known), prefix)}")
        default = _default(known[key])
        if is_dataclass(default) and isinstance(value, dict):
            # a partial section keeps this field's own defaults (InferConfig.sampling is greedy, a bare
            # SamplingConfig is not): the given keys are merged onto them
            value = deep_merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
        _check_range(kwargs[key], known[key].metadata.get("range"), f"{prefix}{key}", source)
    return cls(**kwargs)


def _check_range(value: Any, valid: Range | None, key: str, source: str) -> None:
    if valid is None or value is None:
        return
    for x in value if isinstance(value, list) else [value]:
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not valid.holds(x):
            raise TlvrError(f"{source}: '{key}' must be {valid}, got {x!r}")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source=source, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except TlvrError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise TlvrError(f"{source}: '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}"
                            f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if origin in (list, tuple, Sequence):
        if isinstance(value, str) and origin is not tuple:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TlvrError(f"{source}: '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TlvrError(f"{source}: '{key}' must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TlvrError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TlvrError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise TlvrError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TlvrError(f"{source}: '{key}' must be a string, got {value!r}")
    return value


def _suggest(word: str, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any, *, with_help: bool = False) -> str:
    """The resolved config as YAML; ``with_help`` adds each field's help as a comment."""
    job = getattr(type(cfg), "JOB", None)
    if not with_help:
        data = to_dict(cfg)
        if job:
            data = {"job": job, **data}
        return yaml.safe_dump(data, sort_keys=False)
    lines = [f"job: {job}"] if job else []
    _yaml_lines(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_lines(cfg: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        help_text = _help(f)
        if is_dataclass(value):
            lines.append(f"{pad}{f.name}:" + (f"  # {help_text}" if help_text else ""))
            _yaml_lines(value, indent + 1, lines)
            continue
        if isinstance(value, list):
            value = [dataclasses.asdict(v) if is_dataclass(v) else v for v in value]
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10_000).strip()
        dumped = dumped[1:-1] if dumped.startswith("{") else dumped
        lines.append(f"{pad}{dumped}" + (f"  # {help_text}" if help_text else ""))


def field_help(cls: type) -> dict[str, str]:
    """Dotted key → help text for every field of a config class (nested included)."""
    out = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_help(tp).items()})
        else:
            out[f.name] = _help(f)
    return out


def _help(f: dataclasses.Field) -> str:
    """A field's help text, with its valid range when it has one."""
    text = f.metadata.get("help", "")
    valid = f.metadata.get("range")
    return f"{text} [{valid}]" if valid is not None else text

