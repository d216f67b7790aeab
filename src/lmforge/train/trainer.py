"""The one training loop: pretraining, and every post-training objective plugged into it.

One optimizer step (``Trainer.train_step``):

1. take ``accum`` micro-batches (the batch-size ramp decides how many), count their loss units (tokens) and
   all-reduce the count over data-parallel ranks;
2. forward/backward each micro-batch with its *summed* loss scaled by ``dp / units``, so the gradient is
   the per-unit mean of the whole step however it is split over micro-batches and ranks (DDP/FSDP average
   over ranks, hence the ``dp``);
3. global gradient norm; a non-finite value or a loss spike is handled (skip / roll back) before any
   update is applied; then clipping, the learning rate of this step, and the optimizer update.

Checkpoints every ``checkpoint.every_steps`` and at the end; a run resumes from its newest checkpoint that
verifies and loads, and the final model is exported in Hugging Face layout to ``RUN/model``. A relaunch
whose model, data or tokenizer differ from the run's ``config.yaml``, or whose checkpoints are all damaged,
is refused before anything is written unless the recipe says otherwise (``checkpoint.allow_config_change``,
``checkpoint.restart_if_damaged``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor

from lmforge.config import ConfigError, load_config, save_config, to_dict
from lmforge.model import ModelConfig, Transformer, get_preset, load_pretrained, save_pretrained
from lmforge.model.flops import flops_per_token
from lmforge.train import checkpoint as ckpt
from lmforge.train import parallel
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import MetricsLogger, measured_peak_flops, memory_gib, read_jsonl, write_plots
from lmforge.train.objective import Batch, LMObjective, Objective, lm_loss_sum
from lmforge.train.optim import build_optimizer
from lmforge.train.precision import DTYPES, autocast_factory, grad_scaler, resolve_precision
from lmforge.train.schedule import LRSchedule, accumulation_steps
from lmforge.train.stability import SpikeDetector

log = logging.getLogger(__name__)

BatchHook = Callable[[int, Batch], Batch]  # (0-based step, micro-batch) -> micro-batch; tests inject faults


# Sections of the recipe that make a run what it is: resuming with other values is refused unless allowed.
RUN_IDENTITY = ("model", "data", "tokenizer")


class TrainingError(RuntimeError):
    """The run cannot go on (rollback cap reached, every checkpoint damaged, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, Any]  # the last logged record (loss, lr, grad_norm, tokens_per_s, ...)
    val_loss: float | None
    checkpoint: Path | None
    model_dir: Path | None  # the exported model (None when checkpoint.export is off)
    rollbacks: int


def build_model(cfg: TrainConfig, meta: bool = False) -> Transformer:
    """The model a recipe asks for: a model folder (weights loaded), a preset name, or ``cfg.model``. With
    ``meta``, a new model is built on the meta device (no memory; ``parallel.parallelize`` materialises each
    rank's part with the weights a plain build after the same seed has)."""
    if cfg.init_from:
        if Path(cfg.init_from).is_dir():
            return load_pretrained(cfg.init_from).train()
        try:
            model_cfg = get_preset(cfg.init_from)
        except ValueError as err:
            raise ConfigError(f"init_from: not a model folder, and {err}") from None
    else:
        model_cfg = cfg.model
    if meta:
        with torch.device("meta"):
            return Transformer(model_cfg)
    return Transformer(model_cfg)


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}.{key}").items()}
    return {prefix: tree}


def _changed_keys(saved: dict[str, Any], new: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """Dotted keys of ``sections`` whose values differ between two config dicts."""
    changed = []
    for section in sections:
        old_keys, new_keys = _flatten(saved.get(section), section), _flatten(new.get(section), section)
        changed += [
            k for k in sorted(old_keys.keys() | new_keys.keys()) if old_keys.get(k) != new_keys.get(k)
        ]
    return changed


def _parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the model ``cfg`` describes (built on the meta device)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Transformer(cfg).named_parameters()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: Transformer | None = None,
        objective: Objective | None = None,
        train_data: Iterator[Batch] | None = None,
        val_data: Callable[[], Iterator[Batch]] | None = None,
        batch_hook: BatchHook | None = None,
    ) -> None:
        """``train_data`` must have ``state_dict``/``load_state_dict`` for resume and rollback (PackedLoader
        has); by default a PackedLoader over ``cfg.data`` is built. ``val_data`` makes a fresh iterator of
        held-out batches; by default one over ``val_shards``, else the loader's val split when
        ``data.val_fraction > 0``. ``batch_hook`` sees (and may replace) every micro-batch before use."""
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.env = env = parallel.init_distributed(cfg.parallel)
        self.device = env.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = model if model is not None else build_model(cfg, meta=True)
        try:
            cfg.check_model(model.cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        # the run's config records the model actually trained (from init_from or a preset); the caller's
        # config object is left as it was given. A model of another class (the T5 encoder-decoder) has its own
        # config type, which the recipe's model section cannot hold: it is recorded by its exported folder.
        if isinstance(model.cfg, ModelConfig):
            self.cfg = cfg = dataclasses.replace(cfg, model=model.cfg)
        self.model_cfg = model.cfg
        self._base_model_cfg, self._stage_applied = model.cfg, None  # curriculum context extension
        self.tokenizer = None
        if cfg.tokenizer:
            from lmforge.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.tokenizer)
            self._check_vocab(f"the tokenizer {cfg.tokenizer}", len(self.tokenizer))
        self.objective: Objective = objective or LMObjective()
        if isinstance(self.objective, LMObjective) and self.objective.chunk_tokens is None:
            self.objective.chunk_tokens = cfg.precision.loss_chunk_tokens
        self.precision = resolve_precision(cfg.precision.dtype, self.device)
        self.autocast = autocast_factory(self.precision, self.device)
        self.scaler = grad_scaler(self.precision, self.device)
        self.batch_hook = batch_hook
        if env.pp > 1 and self.scaler is not None:
            raise ValueError("pipeline parallelism with fp16 loss scaling is not supported; use bf16")
        self._pp_loss_scale = 1.0
        if not isinstance(model, Transformer):
            # another model class (the T5 encoder-decoder) trains on one device or under DDP only
            unsupported = {
                "parallel.tp": env.tp > 1,
                "parallel.pp": env.pp > 1,
                "parallel.dp_mode=fsdp": env.dp > 1 and cfg.parallel.dp_mode == "fsdp",
                "precision.activation_checkpointing": cfg.precision.activation_checkpointing,
                "precision.compile": cfg.precision.compile,
            }
            keys = [key for key, on in unsupported.items() if on]
            if keys:
                raise ConfigError(f"{', '.join(keys)}: not supported for a {type(model).__name__} model")
        laid_out = parallel.parallelize(model, env, cfg, self._pipeline_loss, cfg.seed)
        self.model, self.forward_model = laid_out.model, laid_out.forward_model
        self.fsdp_root, self.schedule_pp = laid_out.fsdp_root, laid_out.schedule
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device.type)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, cfg.max_steps)
        self.detector = SpikeDetector(
            cfg.stability.window, cfg.stability.min_history, cfg.stability.z_threshold
        )
        self.train_data, self.val_data = self._data(train_data, val_data)
        self.step = 0
        self.tokens = 0
        # every rollback of the run (also those before a relaunch): step, to_step, reason, and the data
        # position training went on from (see _rollback)
        self.rollback_log: list[dict[str, Any]] = []
        # tokens all dp ranks read per micro-batch; re-measured every step, since a curriculum stage may
        # change the sequence length
        self.micro_tokens = cfg.batch.micro_batch_size * cfg.data.seq_len * env.dp
        self.seq_len = cfg.data.seq_len
        self._train_flops: dict[int, float] = {}  # training FLOPs per token by sequence length
        peak = cfg.log.peak_flops or measured_peak_flops(
            self.device, DTYPES.get(self.precision, torch.float32)
        )
        self.flops_per_s_peak = peak * env.world_size if peak else None
        log.info(
            "MFU against %.1f GFLOP/s per device (%s)",
            peak / 1e9,
            "log.peak_flops" if cfg.log.peak_flops else f"measured: {self.precision} matmul probe",
        )
        self.metrics = MetricsLogger(self.run_dir, env.is_main, cfg.log.tensorboard, cfg.log.wandb)

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _data(
        self, train_data: Iterator[Batch] | None, val_data: Callable[[], Iterator[Batch]] | None
    ) -> tuple[Iterator[Batch], Callable[[], Iterator[Batch]] | None]:
        if train_data is not None and val_data is not None:
            return train_data, val_data
        from lmforge.shards.loader import PackedLoader
        from lmforge.shards.mixture import MixtureConfig

        cfg, env = self.cfg, self.env
        tokenizer_sha = self.tokenizer.sha256() if self.tokenizer is not None else None

        def loader(split: str) -> PackedLoader:
            found = PackedLoader.from_config(
                cfg.data, cfg.batch.micro_batch_size, env.dp_rank, env.dp, split, tokenizer_sha
            )
            self._check_vocab(f"the shards {cfg.data.shards}", found.shards.vocab_size)
            return found

        # held-out shards: one ordered pass over all of them, domains in their natural proportions
        held_out_data = dataclasses.replace(
            cfg.data,
            shards=list(cfg.val_shards),
            val_fraction=0.0,
            curriculum=[],
            mixture=MixtureConfig(),
            seed=0,
        )

        def held_out() -> PackedLoader:
            return PackedLoader.from_config(
                held_out_data,
                cfg.batch.micro_batch_size,
                env.dp_rank,
                env.dp,
                "train",
                tokenizer_sha,
                one_pass=True,
            )

        if val_data is None and cfg.val_shards:
            # opened once now, so that missing or mismatched held-out shards stop the run before it starts
            self._check_vocab(f"the shards {cfg.val_shards}", held_out().shards.vocab_size)
            val_data = held_out
        elif val_data is None and train_data is None and cfg.data.val_fraction > 0:
            val_data = functools.partial(loader, "val")
        return (train_data if train_data is not None else loader("train")), val_data

    def _check_vocab(self, what: str, size: int) -> None:
        if size > self.model_cfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {self.model_cfg.vocab_size} is smaller than the vocabulary of {what} "
                f"({size} tokens); token ids beyond it would not fit the embedding"
            )

    # -- state -----------------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.train_data.state_dict(),
            "detector": self.detector.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            self._trainer_state(),
            _rng_state(),
            self.cfg.checkpoint.keep_last,
        )

    def _latest(self) -> Path | None:
        """The newest intact checkpoint, as rank 0 verified it (one verification, same answer everywhere)."""
        found = [str(ckpt.latest_checkpoint(self.ckpt_root) or "") if self.env.is_main else ""]
        if self.env.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        return Path(found[0]) if found[0] else None

    def _verified(self) -> list[tuple[Path, str | None]]:
        """Every checkpoint, newest first, with its problem (None: intact), as rank 0 verified them."""
        found = [ckpt.verify_all(self.ckpt_root) if self.env.is_main else None]
        if self.env.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def restore(self, folder: Path) -> None:
        """Continue from checkpoint ``folder``; when a rollback to it was logged, from the data position the
        rollback chose (after the batches it skipped)."""
        state, rank_state = ckpt.load_checkpoint(folder, self.model, self.optimizer)
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_data.load_state_dict(state["loader"])
        skips = [r for r in self.rollback_log if r["to_step"] == self.step]
        if skips:
            self.train_data.load_state_dict(skips[-1]["data"])
        self.detector.load_state_dict(state["detector"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if rank_state is not None:
            _set_rng_state(rank_state)
        else:  # resumed on more ranks than wrote the checkpoint: fresh, distinct, reproducible streams
            torch.manual_seed(self.cfg.seed + 1000 * self.env.rank + self.step)

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def _pipeline_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return lm_loss_sum(logits, labels) * self._pp_loss_scale

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients over data-parallel ranks only on the step's last micro-batch."""
        if self.fsdp_root is not None:
            self.fsdp_root.set_requires_gradient_sync(enabled)
        elif not enabled and hasattr(self.forward_model, "no_sync") and self.schedule_pp is None:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, batch: Batch, scale: float) -> Tensor:
        """Backward of one micro-batch; returns its summed loss (zero on pipeline stages but the last)."""
        if self.schedule_pp is None:
            with self.autocast():
                out = self.objective(self.forward_model, batch)
            loss = out.loss_sum * scale
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            return out.loss_sum.detach().float()
        if not isinstance(self.objective, LMObjective):
            raise ValueError("pipeline parallelism supports the LM objective only")
        self._pp_loss_scale = scale
        # the schedule reports the real micro-batch losses here (its first step also calls loss_fn on
        # shape-inference placeholders, which must not be counted)
        losses: list[Tensor] = []
        with self.autocast():
            if self.env.pp_rank == 0:
                self.schedule_pp.step(batch["input_ids"])
            elif self.env.is_last_stage:
                self.schedule_pp.step(target=batch["labels"], losses=losses)
            else:
                self.schedule_pp.step()
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach().float() for loss in losses]).sum() / scale

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (or a skipped / rolled-back one); returns what happened, for the log."""
        env, cfg = self.env, self.cfg
        accum = accumulation_steps(cfg.batch, self.tokens, self.micro_tokens)
        batches = []
        for _ in range(accum):
            batch = next(self.train_data)
            if self.batch_hook is not None:
                batch = self.batch_hook(self.step, batch)
            batches.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        self._apply_stage()
        units = torch.tensor(
            sum(self.objective.count(b) for b in batches), dtype=torch.int64, device=self.device
        )
        units = int(parallel.all_reduce_sum(units, env.group("dp")))
        scale = env.dp / max(units, 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            with self._grad_sync(i == accum - 1):
                loss_sum = loss_sum + self._forward_backward(batch, scale)
        parallel.all_reduce_sum(loss_sum, env.group("dp"))
        parallel.all_reduce_sum(loss_sum, env.group("pp"))
        loss = float(loss_sum) / max(units, 1.0)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = float(parallel.grad_norm(self.params, env.group("pp")))
        self.seq_len = batches[0]["input_ids"].shape[1]
        step_tokens = sum(b["input_ids"].numel() for b in batches) * env.dp
        self.micro_tokens = step_tokens // accum
        record: dict[str, Any] = {
            "loss": loss,
            "grad_norm": norm,
            "accum": accum,
            "batch_tokens": step_tokens,
        }

        if not (math.isfinite(loss) and math.isfinite(norm)):
            if self.scaler is not None:  # fp16 overflow: the scaler skips the update and lowers the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.metrics.event(
                    {"event": "overflow_skip", "step": self.step, "scale": self.scaler.get_scale()}
                )
                return {**record, "skipped": True}
            if cfg.stability.nonfinite == "skip":
                self.optimizer.zero_grad(set_to_none=True)
                self.metrics.event(
                    {"event": "nonfinite_skip", "step": self.step, "loss": loss, "grad_norm": norm}
                )
                return {**record, "skipped": True}
            return self._rollback("nonfinite", loss, math.inf, record)
        if cfg.stability.spike_detection:
            verdict = self.detector.check(loss)
            if verdict.spike:
                return self._rollback("loss_spike", loss, verdict.z, record)

        if cfg.optim.grad_clip > 0 and norm > cfg.optim.grad_clip:
            parallel.scale_grads_(self.params, cfg.optim.grad_clip / (norm + 1e-6))
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.detector.accept(loss)
        self.step += 1
        self.tokens += step_tokens
        return {**record, "lr": lr}

    def _apply_stage(self) -> None:
        """Give the model the context settings of the loader's curriculum stage (max_seq_len, rope_theta,
        rope_scaling, folded over the stages so far; see shards.curriculum.model_overrides) when it changes:
        multi-stage context extension. The exported model carries the last stage's settings."""
        curriculum = getattr(self.train_data, "curriculum", None)
        stage = getattr(self.train_data, "stage", None)
        if curriculum is None or stage is None or stage == self._stage_applied:
            return
        from lmforge.shards.curriculum import model_overrides

        overrides = model_overrides(curriculum.stages[: stage + 1])
        self.model_cfg = dataclasses.replace(self._base_model_cfg, **overrides)
        self.model.cfg = self.model_cfg
        self.model._rope_memo = None  # frequencies are recomputed from the new settings
        self._stage_applied = stage
        if overrides:
            self.metrics.event({"event": "stage_model", "step": self.step, "stage": stage, **overrides})

    def _rollback(self, reason: str, loss: float, z: float, record: dict[str, Any]) -> dict[str, Any]:
        """Back to the last good checkpoint, skipping the data from it to this batch and ``skip_batches``
        more (PaLM). The rollback is logged in the run with the data position training goes on from, so a
        relaunch resumes there too. More than ``max_rollbacks`` within ``rollback_window`` steps stop the run.
        """
        self.optimizer.zero_grad(set_to_none=True)
        stability = self.cfg.stability
        recent = [r for r in self.rollback_log if r["step"] > self.step - stability.rollback_window]
        event = {"event": reason, "step": self.step, "loss": loss, "z": z, "rollbacks": len(recent) + 1}
        folder = self._latest()
        entry: dict[str, Any] = {"step": self.step, "reason": reason, "to_step": None, "data": None}
        if folder is not None:
            accum = accumulation_steps(self.cfg.batch, self.tokens, self.micro_tokens)
            for _ in range(stability.skip_batches * accum):
                next(self.train_data)
            entry.update(to_step=ckpt.step_of(folder), data=self.train_data.state_dict())
        self.rollback_log.append(entry)
        if self.env.is_main:
            ckpt.write_rollbacks(self.ckpt_root, self.rollback_log)
        if len(recent) + 1 > stability.max_rollbacks:
            self.metrics.event({**event, "action": "stop"})
            raise TrainingError(
                f"step {self.step}: {reason}; {len(recent) + 1} rollbacks within {stability.rollback_window} "
                f"steps exceed stability.max_rollbacks={stability.max_rollbacks} (stability.rollback_window). "
                "The data up to this batch is logged as skipped: a relaunch resumes after it"
            )
        if folder is None:
            self.metrics.event({**event, "action": "skip_step", "note": "no checkpoint yet"})
            return {**record, "skipped": True}
        spike_step = self.step
        self.restore(folder)
        self.metrics.event(
            {
                **event,
                "action": "rollback",
                "to_step": self.step,
                "skipped_steps": spike_step - self.step + 1,
                "skipped_batches": stability.skip_batches,
            }
        )
        self.metrics.truncate(self.step)
        return {**record, "skipped": True, "rolled_back_to": self.step}

    # -- validation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean per-token loss on up to ``log.val_batches`` held-out batches (None without val data or
        under pipeline parallelism)."""
        if self.val_data is None or self.schedule_pp is not None:
            return None
        self.forward_model.eval()
        data = self.val_data()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.log.val_batches):
            batch = next(data, None)
            # every rank must run the same number of forwards (FSDP gathers inside them)
            more = torch.tensor([0.0 if batch is None else 1.0], device=self.device)
            if float(parallel.all_reduce_sum(more, self.env.group("dp"))) < self.env.dp:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.autocast():
                out = self.objective(self.forward_model, batch)
            totals += torch.stack([out.loss_sum.detach().double(), torch.tensor(float(out.count)).double()])
        self.forward_model.train()
        parallel.all_reduce_sum(totals, self.env.group("dp"))
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    # -- the loop --------------------------------------------------------------------------------------------------
    def _write_run_info(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        import lmforge

        versions = {
            "lmforge": lmforge.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "world_size": self.env.world_size,
            "device": str(self.device),
            "precision": self.precision,
        }
        (self.run_dir / "versions.json").write_text(json.dumps(versions, indent=2), encoding="utf-8")

    def _check_run_config(self) -> None:
        """Refuse (ConfigError) to resume a run with another model, data or tokenizer than its config.yaml
        says, unless ``checkpoint.allow_config_change``; even then the model's parameter shapes must match."""
        saved_path = self.run_dir / "config.yaml"
        if not saved_path.is_file() or not ckpt.list_checkpoints(self.ckpt_root):
            return
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        changed = _changed_keys(saved, to_dict(self.cfg), RUN_IDENTITY)
        if not changed:
            return
        if not self.cfg.checkpoint.allow_config_change:
            raise ConfigError(
                f"{self.run_dir} was trained with other settings than this recipe: {', '.join(changed)} "
                f"differ from its config.yaml. Use another run_dir for a new run, or set "
                "checkpoint.allow_config_change=true to continue this one with the new settings"
            )
        saved_model = load_config(ModelConfig, data=saved.get("model", {}))
        if _parameter_shapes(saved_model) != _parameter_shapes(self.model_cfg):
            model_keys = [k for k in changed if k.startswith("model.")]
            raise ConfigError(
                f"{', '.join(model_keys)}: the checkpoints of {self.run_dir} hold a model of another shape; "
                "continue with the saved model settings, or start a new run (init_from=RUN/model to start "
                "from its weights)"
            )
        log.warning("resuming %s with changed settings: %s", self.run_dir, ", ".join(changed))
        self.metrics.event({"event": "config_change", "keys": changed})

    def _resume(self) -> Path | None:
        """Restore the newest checkpoint that verifies and loads (older ones are tried in turn, with a
        warning); None when the run has none. With every checkpoint unusable, refuse to start over unless
        ``checkpoint.restart_if_damaged``, which first moves them to ``checkpoints/damaged/``."""
        unusable: list[tuple[Path, str]] = []
        load_failed = False
        for folder, problem in self._verified():
            if problem is None:
                try:
                    self.restore(folder)
                    return folder
                # whatever a checkpoint that passed its checksum fails with (a pickle, DCP or shape error)
                except Exception as err:
                    problem, load_failed = f"does not load: {type(err).__name__}: {err}", True
            log.warning("checkpoint %s is unusable (%s); trying an older one", folder, problem)
            unusable.append((folder, problem))
        if not unusable:
            return None
        listing = "; ".join(f"{folder.name} ({problem})" for folder, problem in unusable)
        if not self.cfg.checkpoint.restart_if_damaged:
            raise TrainingError(
                f"every checkpoint of {self.run_dir} is unusable: {listing}. Set "
                "checkpoint.restart_if_damaged=true to move them to checkpoints/damaged/ and start over "
                "from step 0"
            )
        if self.env.is_main:
            damaged = ckpt.move_aside([folder for folder, _ in unusable], self.ckpt_root)
            log.warning("every checkpoint was unusable (%s); moved them to %s", listing, damaged)
            self.metrics.event(
                {"event": "damaged_checkpoints", "moved_to": str(damaged), "checkpoints": listing}
            )
        if self.env.world_size > 1:
            dist.barrier()
        if load_failed:  # a failed load may have filled part of the model and optimizer
            raise TrainingError(
                f"every checkpoint of {self.run_dir} was unusable; they were moved to checkpoints/damaged/. "
                "Relaunch to start over from step 0"
            )
        log.warning("starting %s over from step 0", self.run_dir)
        return None

    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        folder = None
        if cfg.checkpoint.resume:
            self._check_run_config()
            self.rollback_log = ckpt.read_rollbacks(self.ckpt_root)
            folder = self._resume()
            if folder is not None:
                log.info("resumed from %s at step %d", folder, self.step)
        if folder is None:  # a run from scratch: an old rollback log no longer applies
            self.rollback_log = []
        if env.world_size > 1:
            dist.barrier()  # every rank has compared with the saved config before rank 0 rewrites it
        if env.is_main:
            if folder is None:
                ckpt.write_rollbacks(self.ckpt_root, [])
            self._write_run_info()
        self.metrics.truncate(self.step)
        progress = None
        if env.is_main and cfg.log.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        # a run resumed at its end reports what it logged before
        logged = [r for r in read_jsonl(self.metrics.path) if "loss" in r] if env.is_main else []
        last_record: dict[str, Any] = logged[-1] if logged else {}
        val_loss = last_record.get("val_loss")
        last_saved = self.step if folder is not None else None
        window_start, window_tokens, window_losses = time.perf_counter(), 0, []
        while self.step < cfg.max_steps:
            result = self.train_step()
            if result.get("skipped"):  # no update: skipped, or rolled back to a checkpoint
                if "rolled_back_to" in result:
                    window_start, window_tokens, window_losses = time.perf_counter(), 0, []
                if progress is not None:
                    progress.n = self.step
                    progress.refresh()
                continue
            window_tokens += result["batch_tokens"]
            window_losses.append(result["loss"])
            if self.step % cfg.log.every_steps == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                # the loss is averaged over the steps since the last record: one step's loss is noisy
                result = {**result, "loss": sum(window_losses) / len(window_losses)}
                last_record = self._log_record(result, window_tokens / max(elapsed, 1e-9))
                window_start, window_tokens, window_losses = time.perf_counter(), 0, []
                if cfg.log.val_every_steps and self.step % cfg.log.val_every_steps == 0:
                    val_loss = self.validate()
                    if val_loss is not None:
                        last_record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                self.metrics.log(last_record)
                if progress is not None:
                    progress.set_postfix(self._postfix(last_record), refresh=False)
            if progress is not None:
                progress.update(1)
            every = cfg.checkpoint.every_steps
            if every and self.step % every == 0 and self.step < cfg.max_steps:
                self.save()
                last_saved = self.step
        if progress is not None:
            progress.close()
        if cfg.log.val_every_steps and "val_loss" not in last_record:
            val_loss = self.validate()
            if val_loss is not None:
                self.metrics.log(
                    {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
                )
        final = self.save() if last_saved != self.step else self._latest()
        model_dir = self.export(final) if cfg.checkpoint.export else None
        if env.is_main and cfg.log.plots:
            write_plots(self.run_dir)
        self.metrics.close()
        return TrainResult(
            self.run_dir, self.step, last_record, val_loss, final, model_dir, len(self.rollback_log)
        )

    def _log_record(self, result: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
        record = {
            "step": self.step,
            "tokens": self.tokens,
            **{k: result[k] for k in ("loss", "lr", "grad_norm", "accum", "batch_tokens")},
            "tokens_per_s": tokens_per_s,
            "memory_gib": memory_gib(self.device),
        }
        if self.flops_per_s_peak and isinstance(self.model_cfg, ModelConfig):  # FLOPs: decoder-only counts
            if self.seq_len not in self._train_flops:
                self._train_flops[self.seq_len] = flops_per_token(self.model_cfg, self.seq_len)["train"]
            train_flops = self._train_flops[self.seq_len]
            record["mfu"] = tokens_per_s * train_flops / self.flops_per_s_peak
        return record

    @staticmethod
    def _postfix(record: dict[str, Any]) -> dict[str, str]:
        postfix = {
            "loss": f"{record['loss']:.4f}",
            "lr": f"{record['lr']:.2e}",
            "gnorm": f"{record['grad_norm']:.2f}",
            "tok/s": f"{record['tokens_per_s']:.0f}",
            "mem": f"{record['memory_gib']:.1f}G",
        }
        if "mfu" in record:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        return postfix

    def export(self, folder: Path | None) -> Path | None:
        """Write the model of checkpoint ``folder`` in Hugging Face layout (rank 0; others wait)."""
        out = self.run_dir / "model"
        self._apply_stage()  # a run resumed at its end has drawn no batch yet
        if self.env.is_main and folder is not None:
            model = type(self.model)(self.model_cfg)  # Transformer, or the class the caller trained
            ckpt.load_model_weights(folder, model)
            save_pretrained(model, out)
            if self.tokenizer is not None:
                self.tokenizer.save(out)
        if self.env.world_size > 1:
            dist.barrier()
        return out if folder is not None else None


def train(
    cfg: TrainConfig,
    model: Transformer | None = None,
    objective: Objective | None = None,
    train_data: Iterator[Batch] | None = None,
    val_data: Callable[[], Iterator[Batch]] | None = None,
    batch_hook: BatchHook | None = None,
) -> TrainResult:
    """Train as ``cfg`` says; resumes from the run folder's newest checkpoint when there is one."""
    return Trainer(cfg, model, objective, train_data, val_data, batch_hook).fit()
