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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit its schema."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
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


def _check_override(item: str) -> str:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    return item


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
        if overrides:
            dotlist = OmegaConf.from_dotlist([_check_override(o) for o in overrides])
            explicit |= _dotted_keys(OmegaConf.to_container(dotlist))
            merged = OmegaConf.merge(merged, dotlist)
        _reset_derived(merged, explicit)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a dataclass config."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (the run folder's record of what ran)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--config recipe.yaml key.sub=value ...`` arguments every stage command shares."""
    parser.add_argument("--config", "-c", help="YAML recipe; omitted keys keep their defaults")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.n_layers=4"
    )


def config_from_args(schema: type[T], args: argparse.Namespace) -> T:
    """The ``schema`` config built from the arguments that :func:`add_config_arguments` added."""
    return load_config(schema, args.config, args.overrides)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ValueError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
