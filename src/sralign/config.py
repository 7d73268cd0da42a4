"""Dataclass configs: load from YAML, override with ``key=value`` (dotted keys for nested)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Check:
    """A config value's allowed range: bounds (``gt`` / ``ge`` / ``lt`` / ``le``), ``choices``, or
    ``nonempty`` for lists and strings. ``describe()`` is the range as the error message states it."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    nonempty: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + " | ".join(map(str, self.choices))
        lo = f"({self.gt}" if self.gt is not None else f"[{self.ge}" if self.ge is not None else "(-inf"
        hi = f"{self.lt})" if self.lt is not None else f"{self.le}]" if self.le is not None else "inf)"
        return "non-empty" if self.nonempty and lo == "(-inf" and hi == "inf)" else f"in {lo}, {hi}"

    def ok(self, v: Any) -> bool:
        if self.choices is not None:
            return v in self.choices
        if self.nonempty and hasattr(v, "__len__") and len(v) == 0:
            return False
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return True
        return not ((self.gt is not None and not v > self.gt) or (self.ge is not None and not v >= self.ge)
                    or (self.lt is not None and not v < self.lt) or (self.le is not None and not v <= self.le))


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **check: Any) -> Any:
    """A dataclass field with a range, checked by :func:`validate` before any work starts, e.g.
    ``beta: float = ranged(5000.0, gt=0)``, ``sampler: str = ranged("ode", choices=("ode", "sde"))``,
    ``fr_metrics: list[str] = ranged(default_factory=lambda: ["psnr"], nonempty=True)``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"check": Check(**check)})


def validate(cfg: Any, where: str = "") -> Any:
    """Check every field of dataclass ``cfg`` (recursively) against its type and ``ranged`` range,
    then the class's own ``cross_check()`` (relations between fields, returns an error string or
    None). Raises ``ConfigError`` naming the key, the allowed range and the value."""
    types = _resolve_types(type(cfg))
    for f in dataclasses.fields(cfg):
        v, key, tp = getattr(cfg, f.name), where + f.name, types.get(f.name)
        if dataclasses.is_dataclass(v):
            validate(v, where=f"{key}.")
            continue
        _check_type(key, tp, v)
        chk = _check_of(type(cfg), f)
        if chk is not None and not chk.ok(v):
            raise ConfigError(f"config key {key} must be {chk.describe()}, got {v!r}")
    cross = getattr(cfg, "cross_check", None)
    msg = cross() if callable(cross) else None
    if msg:
        raise ConfigError(f"config {where.rstrip('.') or type(cfg).__name__}: {msg}")
    return cfg


def _check_of(cls: type, f: dataclasses.Field) -> Check | None:
    """The field's range; a subclass that only changes a default (``group: int = 6``) keeps
    the range its base class declared."""
    if "check" in f.metadata:
        return f.metadata["check"]
    for base in cls.__mro__[1:]:
        bf = getattr(base, "__dataclass_fields__", {}).get(f.name)
        if bf is not None and "check" in bf.metadata:
            return bf.metadata["check"]
    return None


def check_metric_names(key: str, names: list[str], kind: str | None = None) -> str | None:
    """None if every name in ``names`` is a registered metric (or ``pyiqa:NAME``) of ``kind``
    ("FR" / "NR", None = either), else the problem as one line naming ``key`` and the valid names.
    Cheap: built-in metrics are constructed, pyiqa ones are only checked later, when loaded."""
    from .rewards.base import MetricError
    from .rewards.registry import get_metric, list_metrics

    for n in names:
        if not isinstance(n, str) or not n.strip():
            return f"{key} holds an empty metric name; valid: {', '.join(list_metrics())} or pyiqa:NAME"
        if n.strip().lower().startswith(("pyiqa:", "gap:pyiqa:")):
            if not n.strip().lower().split("pyiqa:", 1)[1]:
                return f"{key}: {n!r} names no pyiqa metric (pyiqa:NAME, e.g. pyiqa:musiq)"
            continue
        try:
            m = get_metric(n)
        except MetricError:
            return f"{key} names unknown metric {n!r}; valid: {', '.join(list_metrics())} or pyiqa:NAME"
        side = getattr(m, "side", m.kind)  # gap:NAME needs the HR but belongs to the NR side
        if kind is not None and side != kind:
            other = "no-reference" if side == "NR" else "full-reference"
            return f"{key} lists {n!r}, a {other} metric; it belongs in the {side} list"
    return None


def _check_type(key: str, tp: Any, v: Any) -> None:
    origin = typing.get_origin(tp)
    if tp is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"config key {key} must be an integer, got {v!r}")
    if tp is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ConfigError(f"config key {key} must be a number, got {v!r}")
    if tp is bool and not isinstance(v, bool):
        raise ConfigError(f"config key {key} must be true or false, got {v!r}")
    if tp is str and not isinstance(v, str):
        raise ConfigError(f"config key {key} must be a string, got {v!r}")
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"config key {key} must be a list (e.g. {key}=[a,b]), got {v!r}")
        (item,) = typing.get_args(tp) or (Any,)
        for x in v:
            _check_type(key + "[]", item, x)


def _resolve_types(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - fall back to raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` naming valid ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or cls.__name__} must be a mapping, got {type(data).__name__}")
    presets = getattr(cls, "preset_values", None)
    if presets is not None and "preset" in data:  # a preset's values, under what the user set
        data = {**presets(data["preset"], data), **data}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    types = _resolve_types(cls)
    kwargs = {}
    for k, v in data.items():
        tp = types.get(k)
        if dataclasses.is_dataclass(tp):
            factory = names[k].default_factory
            if isinstance(v, dict) and factory is not dataclasses.MISSING:
                v = _with_field_defaults(tp, factory(), v)
            kwargs[k] = from_dict(tp, v, where=f"{where}{k}.")
        elif typing.get_origin(tp) is tuple and isinstance(v, list):
            kwargs[k] = tuple(v)
        elif (tp is float or tp == float | None) and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                kwargs[k] = float(v)  # YAML reads "1e-3" as a string
            except ValueError:
                raise ConfigError(f"config key {where}{k} must be a number, got {v!r}") from None
        elif tp is int and isinstance(v, str):
            try:
                kwargs[k] = int(v)
            except ValueError:
                raise ConfigError(f"config key {where}{k} must be an integer, got {v!r}") from None
        else:
            kwargs[k] = v
    cfg = cls(**kwargs)
    return validate(cfg, where) if not where else cfg


def _with_field_defaults(tp: type, default: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` for a nested section over the values in which the field's own default instance
    differs from its type's (``EvalConfig.lr_set`` is the held-out split, seed 123: setting
    ``lr_set.n`` must not turn it into ``LRSetConfig()``'s training split). Values a preset may
    set are left to the preset wherever the field keeps its type's default."""
    own = to_dict(default)
    try:
        plain = to_dict(tp())
    except TypeError:
        plain = {}
    merged = {k: v for k, v in own.items() if k not in plain or plain[k] != v}
    _deep_update(merged, data)
    return merged


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "beta=5000"]`` -> nested dict updates (values parsed as YAML)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value (e.g. beta=5000 or model.steps=10)")
        key, raw = ov.split("=", 1)
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: value is not valid YAML ({_yaml_problem(e)})") from None
        node = data
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])} is not a section (it holds {node!r})")
        node[parts[-1]] = val
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None, base: T | None = None) -> T:
    """Defaults of ``cls`` (or ``base``) <- YAML file ``path`` <- ``overrides``."""
    data: dict[str, Any] = to_dict(base) if base is not None else {}
    if path is not None:
        loaded = read_yaml_mapping(path)
        _deep_update(data, loaded)
    apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); ``ConfigError`` naming
    the file and the problem (missing, a folder, not UTF-8, invalid YAML, not a mapping)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; pass a .yaml file")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; save it as a UTF-8 .yaml file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values (key: value lines), "
                          f"got a {type(loaded).__name__}")
    return loaded


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
