"""Typed dataclass configs, YAML recipes and dotted command-line overrides.

A config is a plain ``@dataclass`` (nested dataclasses allowed). ``load_config`` merges, in order,
the dataclass defaults, a YAML recipe and ``key.sub=value`` overrides, with OmegaConf doing the typed
merge. Unknown keys and values of the wrong type raise :class:`ConfigError` naming the full key;
``__post_init__`` of the dataclasses may raise ``ValueError`` for semantic checks, which is reported
the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit its schema."""


def _describe(err: OmegaConfBaseException) -> str:
    """``key: message``, without OmegaConf's ``full_key`` / ``reference_type`` / ``object_type`` lines."""
    key = getattr(err, "full_key", None)
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, Any]:
    """``data.curriculum[1].tokens=4096`` -> (``data.curriculum.1.tokens``, 4096); the value is parsed as
    OmegaConf parses a dotlist value (YAML)."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, value = item.split("=", 1)
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    return key, OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]))["value"]


def _prepare_path(merged: DictConfig, key: str) -> None:
    """Make ``key`` settable by ``OmegaConf.update``: name it when it indexes past the end of a list (OmegaConf
    would fail without saying where), and turn a None mapping on its way into an empty one."""
    node: Any = merged
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and node._is_none() and depth > 0:
            OmegaConf.update(merged, ".".join(parts[:depth]), {}, merge=False)
            return
        if isinstance(node, ListConfig) and part.isdigit():
            if int(part) >= len(node):
                where = ".".join(parts[:depth])
                raise ConfigError(f"{key}: {where} has {len(node)} item(s), no index {part}")
            node = node._get_node(int(part))
        elif isinstance(node, DictConfig) and not node._is_none() and part in node:
            node = node._get_node(part)
        else:
            return  # OmegaConf.update names a key that does not exist


def _dotted_keys(tree: Any, prefix: str = "") -> set[str]:
    """Every key path of a nested mapping, as ``a``, ``a.b``, ``a.b.c``."""
    keys: set[str] = set()
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            keys.add(path)
            keys |= _dotted_keys(value, f"{path}.")
    return keys


def _reset_derived(node: Any, explicit: set[str], prefix: str = "") -> None:
    """Clear the derived fields (``DERIVED_FIELDS``) of nested dataclass defaults that nobody set.

    A nested config default (``field(default_factory=ModelConfig)``) is an instance whose ``__post_init__``
    has already derived e.g. ``head_dim`` from the default ``d_model``; without this, a recipe that changes
    ``d_model`` would silently keep the stale ``head_dim``. Unset derived fields go back to None and are
    derived again, from the final values, when the dataclass is built.
    """
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    for name in getattr(schema, "DERIVED_FIELDS", ()):
        if f"{prefix}{name}" not in explicit:
            node[name] = None
    for key in node:
        _reset_derived(node._get_node(key), explicit, f"{prefix}{key}.")


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: dict[str, Any] | None = None,
) -> T:
    """Build a ``schema`` instance from defaults, an optional YAML file or dict, then overrides."""
    try:
        merged = OmegaConf.structured(schema)
        explicit: set[str] = set()
        if path is not None:
            recipe = _read_yaml(path)
            explicit |= _dotted_keys(recipe)
            merged = OmegaConf.merge(merged, recipe)
        if data is not None:
            explicit |= _dotted_keys(data)
            merged = OmegaConf.merge(merged, data)
        for item in overrides:
            key, value = _split_override(item)
            parts = key.split(".")
            explicit |= {".".join(parts[: i + 1]) for i in range(len(parts))}
            explicit |= _dotted_keys(value, f"{key}.")
            _prepare_path(merged, key)
            OmegaConf.update(merged, key, value, merge=True)
        _reset_derived(merged, explicit)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        try:
            return OmegaConf.to_object(merged)  # type: ignore[return-value]
        except OmegaConfBaseException:
            raise
        except (ValueError, TypeError) as err:  # a __post_init__ check
            raise ConfigError(_in_section(str(err), _failing_section(merged))) from err
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None


def _failing_section(node: DictConfig | ListConfig, prefix: str = "") -> str:
    """The dotted path of the innermost nested config whose ``__post_init__`` rejects its values."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node)
    for key in keys:
        child = node._get_node(key)
        if not isinstance(child, DictConfig | ListConfig) or child._is_none() or child._is_missing():
            continue
        path = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}.{key}".lstrip(".")
        try:
            OmegaConf.to_object(child)
        except (ValueError, TypeError):
            return _failing_section(child, path) or path
    return ""


def _in_section(msg: str, section: str) -> str:
    """Name the full key: ``d_model: ...`` raised by the ``model`` section reads ``model.d_model: ...``, and
    ``optim.lr: ...`` raised by ``train.optim`` reads ``train.optim.lr: ...``."""
    if not section:
        return msg
    if section.endswith("]"):
        return f"{section}: {msg}"
    parent, _, last = section.rpartition(".")
    if msg.startswith((f"{last}.", f"{last}:")):  # the section already names itself
        return f"{parent}.{msg}" if parent else msg
    return f"{section}.{msg}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a dataclass config."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (the run folder's record of what ran)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "key.sub=value") -> None:
    """The ``--config recipe.yaml key.sub=value ... [--print-config]`` arguments every stage command shares;
    ``example`` is an override that fits the stage (shown in its help)."""
    parser.add_argument("--config", "-c", help="YAML recipe; omitted keys keep their defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"dotted overrides, e.g. {example} (list items: key[0].sub=value)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults, then the recipe, then the overrides) as YAML and exit",
    )


def config_from_args(schema: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """The ``schema`` config built from the arguments that :func:`add_config_arguments` added (``base``:
    a recipe the command already merged from ``--config`` and its own flags). With ``--print-config`` it
    prints that config as YAML and exits with status 0."""
    if base is None:
        cfg = load_config(schema, args.config, args.overrides)
    else:
        cfg = load_config(schema, data=base, overrides=args.overrides)
    if getattr(args, "print_config", False):
        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        raise SystemExit(0)
    return cfg


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is finite and within the bounds (closed unless
    ``low_open`` / ``high_open``)."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f"{'>' if low_open else '>='} {low}"
        elif high is not None:
            bounds = f"{'<' if high_open else '<='} {high}"
        else:
            bounds = ""
        finite = "finite and " if isinstance(value, float) and bounds else "finite" if not bounds else ""
        raise ValueError(f"{name}: must be {finite}{bounds}, got {value}")
