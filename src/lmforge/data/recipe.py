"""Pipeline recipes: the YAML schema of ``lmforge data run`` and how it becomes a :class:`Pipeline`.

.. code-block:: yaml

    inputs:
      - {paths: ["raw/web/*.jsonl.gz"], source: web}
      - {paths: ["raw/pages/"], format: html, source: pages, files_per_task: 500}
    steps:
      - step: html_extract
      - step: gopher_quality
        min_doc_words: 50
      - step: exact_dedup
    output: {path: clean/, format: jsonl.gz}
    run_dir: runs/clean
    workers: 4
    executor: local          # or ray
    exclusions: true         # removed documents -> run_dir/excluded/<step>/...

The top level is typed (:class:`PipelineConfig`, loaded with :func:`lmforge.config.load_config`); each
step's keys are checked against its class's constructor, so a typo names the step and the key. Overrides:
``workers=8`` for the top level, ``steps.gopher_quality.min_doc_words=60`` (or ``steps.1....``) for steps.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf

from lmforge.config import ConfigError, check_choice, load_config, save_config
from lmforge.data.executor import EXECUTORS, make_executor
from lmforge.data.io import DEFAULT_MAX_DOC_BYTES, READERS, Reader, Writer, detect_format, make_reader
from lmforge.data.pipeline import Pipeline, claim_run_folder
from lmforge.data.report import RunReport
from lmforge.data.step import STEPS, Step


@dataclass
class InputConfig:
    paths: list[str] = MISSING  # files, folders or globs; any fsspec URL
    format: str = "auto"  # auto (from the extension), jsonl, parquet, txt, html, warc
    source: str = ""  # written to meta.source; default: the format name
    files_per_task: int = 0  # 0: the format's default (1 for jsonl/parquet/warc, 256 for txt/html)
    text_key: str = "text"  # jsonl/parquet only
    id_key: str = "id"

    def __post_init__(self) -> None:
        check_choice("inputs.format", self.format, ["auto", *READERS])


@dataclass
class OutputConfig:
    path: str = MISSING  # a folder; any fsspec URL
    format: str = "jsonl.gz"

    def __post_init__(self) -> None:
        check_choice("output.format", self.format, list(Writer.SUFFIXES))


@dataclass
class PipelineConfig:
    inputs: list[InputConfig] = MISSING
    steps: list[dict[str, Any]] = field(default_factory=list)
    output: OutputConfig = MISSING
    run_dir: str = MISSING  # completion markers, exclusions, rejects, stats.json, config.yaml
    workers: int = 1
    executor: str = "local"
    ray_address: str | None = None
    exclusions: bool = True
    keep_intermediate: bool = False  # documents between dataset-level stages (run_dir/stages/*/docs)
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    imports: list[str] = field(default_factory=list)  # modules defining your own steps (@register_step)

    def __post_init__(self) -> None:
        check_choice("executor", self.executor, EXECUTORS)
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if self.max_doc_bytes < 1:
            raise ValueError(f"max_doc_bytes: must be >= 1, got {self.max_doc_bytes}")


def import_step_modules(package: str = "lmforge.data") -> dict[str, str]:
    """Import every module of ``package`` that registers steps (found by its source, so modules that only
    hold loaders or shards are not imported for nothing). Returns ``{module: error}`` for those that could
    not be imported (e.g. an optional dependency is missing): the other steps stay usable."""
    failures: dict[str, str] = {}
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        spec = importlib.util.find_spec(info.name)
        origin = spec.origin if spec else None
        if (
            origin
            and origin.endswith(".py")
            and "@register_step(" in Path(origin).read_text(encoding="utf-8")
        ):
            try:
                importlib.import_module(info.name)
            except ImportError as err:
                failures[info.name] = str(err)
    return failures


def build_step(spec: dict[str, Any], index: int) -> Step:
    """Construct one step from its recipe entry ``{step: name, **kwargs}``."""
    spec = dict(spec)
    name = spec.pop("step", None)
    where = f"steps[{index}]"
    if not isinstance(name, str):
        raise ConfigError(f"{where}: needs 'step: <name>'")
    failures = import_step_modules() if name not in STEPS else {}
    if name not in STEPS:
        unusable = "".join(f"; {module} could not be imported: {err}" for module, err in failures.items())
        raise ConfigError(
            f"{where}: unknown step {name!r}; known steps: {', '.join(sorted(STEPS)) or 'none'}{unusable}"
        )
    cls = STEPS[name]
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    if not accepts_any:
        for key in spec:
            if key not in accepted:
                raise ConfigError(
                    f"{where} ({name}): unknown argument {key!r}; accepted: {', '.join(accepted) or 'none'}"
                )
    try:
        return cls(**typed_arguments(cls, spec))
    except ConfigError as err:
        raise ConfigError(f"{where} ({name}): {str(err).splitlines()[0]}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} ({name}): {err}") from err


def typed_arguments(cls: type[Step], spec: dict[str, Any]) -> dict[str, Any]:
    """Check and convert recipe values against the constructor's type hints, the way every config is
    (``min_words: "50"`` becomes 50; ``min_words: many`` is an error naming the key). Hints OmegaConf
    cannot express (unions, tuples, callables) are taken as they come."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # hints naming types only imported for type checking: no conversion
        hints = {}
    fields = []
    for key in spec:
        hint = hints.get(key, Any)
        try:
            OmegaConf.structured(
                dataclasses.make_dataclass("Probe", [(key, hint, dataclasses.field(default=MISSING))])
            )
        except Exception:
            hint = Any
        fields.append((key, hint, dataclasses.field(default=MISSING)))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Arguments", fields)
    checked = load_config(schema, data=spec)
    return {key: getattr(checked, key) for key in spec}


def build_pipeline(cfg: PipelineConfig) -> Pipeline:
    for module in cfg.imports:
        importlib.import_module(module)
    readers: list[Reader] = []
    for i, inp in enumerate(cfg.inputs):
        kwargs: dict[str, Any] = {
            "files_per_task": inp.files_per_task or None,
            "max_doc_bytes": cfg.max_doc_bytes,
        }
        try:
            fmt = detect_format(inp.paths) if inp.format == "auto" else inp.format
            if fmt in ("jsonl", "parquet"):
                kwargs.update(text_key=inp.text_key, id_key=inp.id_key)
            reader = make_reader(inp.paths, fmt, **kwargs)
            reader.files()  # a missing input is a recipe error, said now
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"inputs[{i}]: {err}") from err
        reader.source = inp.source or reader.format
        readers.append(reader)
    steps = [build_step(spec, i) for i, spec in enumerate(cfg.steps)]
    writer = Writer(cfg.output.path, cfg.output.format)
    return Pipeline(
        readers, steps, writer, exclusions=cfg.exclusions, keep_intermediate=cfg.keep_intermediate
    )


def load_recipe(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, data: dict[str, Any] | None = None
) -> PipelineConfig:
    """The typed recipe: file, then ``data``, then overrides. Step arguments are overridden as
    ``steps.<index or step name>.<argument>=value`` (the value read as YAML: ``60``, ``[en, de]``, ``null``)."""
    step_overrides = [o for o in overrides if o.startswith("steps.")]
    cfg = load_config(PipelineConfig, path, [o for o in overrides if not o.startswith("steps.")], data=data)
    for item in step_overrides:
        key, _, value = item.partition("=")
        parts = key.split(".")
        if len(parts) != 3 or not value:
            raise ConfigError(f"override {item!r}: use steps.<index or step name>.<argument>=value")
        _, which, argument = parts
        if which.isdigit():
            matches = [int(which)] if int(which) < len(cfg.steps) else []
        else:
            matches = [i for i, spec in enumerate(cfg.steps) if spec.get("step") == which]
        if len(matches) != 1:
            found = "no" if not matches else "several"
            raise ConfigError(f"override {item!r}: {found} step {which!r} in this recipe; use its index")
        try:
            cfg.steps[matches[0]][argument] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not a YAML value: {err}") from err
    return cfg


def run_recipe(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    data: dict[str, Any] | None = None,
    progress: bool = True,
) -> RunReport:
    """Load a recipe (file and/or dict, then ``key=value`` overrides), save it in the run folder, run it."""
    cfg = load_recipe(path, overrides, data=data)
    pipeline = build_pipeline(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    claim_run_folder(pipeline, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    return executor.run(pipeline, run_dir, progress=progress)
