"""``TrainConfig``: the typed recipe of a training run (model, data, optimizer, schedule, precision, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lmforge.config import check_choice, check_range
from lmforge.model.config import ModelConfig
from lmforge.shards.curriculum import model_overrides
from lmforge.shards.loader import DataConfig

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "constant", "linear", "wsd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE_ACTIONS = ("skip", "rollback")
DP_MODES = ("ddp", "fsdp")
PP_SCHEDULES = ("gpipe", "1f1b")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on weight matrices only
    decay_embeddings: bool = False  # also decay token/position embeddings (and a tied head)
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    fused: bool | None = None  # None: fused AdamW kernels where supported (CPU/CUDA, unsharded), else foreach

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_range("optim.lr", self.lr, low=0.0, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas: need two values, got {self.betas}")
        for i, beta in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        check_range("optim.eps", self.eps, low=0.0, low_open=True)
        check_range("optim.weight_decay", self.weight_decay, low=0.0)
        check_range("optim.grad_clip", self.grad_clip, low=0.0)


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int | None = None  # None: warmup_fraction of max_steps
    warmup_fraction: float = 0.005
    min_lr_ratio: float = 0.1  # final LR of cosine/linear/wsd as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay

    def __post_init__(self) -> None:
        check_choice("schedule.name", self.name, SCHEDULES)
        if self.warmup_steps is not None:
            check_range("schedule.warmup_steps", self.warmup_steps, low=0)
        check_range("schedule.warmup_fraction", self.warmup_fraction, low=0.0, high=1.0)
        check_range("schedule.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        check_range("schedule.decay_fraction", self.decay_fraction, low=0.0, high=1.0, low_open=True)


@dataclass
class BatchConfig:
    micro_batch_size: int = 8  # sequences per forward per data-parallel rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step (after any ramp)
    # Batch-size ramp (GPT-3): the global batch grows linearly from ramp_start_tokens to the full batch over
    # the first ramp_tokens training tokens, by accumulating fewer micro-batches early on. 0 disables it.
    ramp_start_tokens: int = 0
    ramp_tokens: int = 0

    def __post_init__(self) -> None:
        check_range("batch.micro_batch_size", self.micro_batch_size, low=1)
        check_range("batch.grad_accum_steps", self.grad_accum_steps, low=1)
        check_range("batch.ramp_start_tokens", self.ramp_start_tokens, low=0)
        check_range("batch.ramp_tokens", self.ramp_tokens, low=0)


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto: bf16 autocast on CUDA with bf16 support, else fp32
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    # LM cross-entropy over this many positions at a time, the head applied chunk-wise so the full
    # (tokens, vocab) logits never exist (lmforge.train.objective.chunked_lm_loss_sum); 0: plain full logits.
    loss_chunk_tokens: int = 256

    def __post_init__(self) -> None:
        check_choice("precision.dtype", self.dtype, PRECISIONS)
        check_range("precision.loss_chunk_tokens", self.loss_chunk_tokens, low=0)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in the run folder
    # Resuming with a model, data or tokenizer other than the run's config.yaml is refused unless this is set
    # (the model's parameter shapes must match the checkpoint's either way).
    allow_config_change: bool = False
    # With every checkpoint of the run damaged, a relaunch is refused unless this is set: then the damaged
    # ones are moved to RUN/checkpoints/damaged/ and the run starts over from step 0.
    restart_if_damaged: bool = False
    export: bool = True  # write the final model in Hugging Face layout to RUN/model

    def __post_init__(self) -> None:
        check_range("checkpoint.every_steps", self.every_steps, low=0)
        check_range("checkpoint.keep_last", self.keep_last, low=1)


@dataclass
class StabilityConfig:
    spike_detection: bool = True
    window: int = 50  # recent step losses that define "normal"
    min_history: int = 20  # no verdict before this many losses
    z_threshold: float = 6.0  # robust z-score (median / MAD) above which a loss is a spike
    max_rollbacks: int = 5  # the run stops at the rollback after this many within rollback_window steps
    rollback_window: int = 1000
    # After a rollback, also skip this many batches after the one that caused it (PaLM skipped ~200-500).
    skip_batches: int = 0
    nonfinite: str = "rollback"  # non-finite loss/gradients outside fp16: skip the step or roll back

    def __post_init__(self) -> None:
        check_choice("stability.nonfinite", self.nonfinite, NONFINITE_ACTIONS)
        if self.window < 3 or self.min_history < 3 or self.min_history > self.window:
            raise ValueError("stability: need 3 <= min_history <= window")
        check_range("stability.z_threshold", self.z_threshold, low=0.0, low_open=True)
        check_range("stability.max_rollbacks", self.max_rollbacks, low=0)
        check_range("stability.rollback_window", self.rollback_window, low=1)
        check_range("stability.skip_batches", self.skip_batches, low=0)


@dataclass
class ParallelConfig:
    dp_mode: str = "ddp"  # how the data-parallel dimension is applied when it has > 1 rank
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree (the rest of the world size is data parallel)
    fsdp_reshard_after_forward: bool = True  # True: ZeRO-3; False: keep parameters gathered (ZeRO-2-like)
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 2  # pipeline micro-batches per micro-batch of the trainer

    def __post_init__(self) -> None:
        check_choice("parallel.dp_mode", self.dp_mode, DP_MODES)
        check_choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        if self.tp < 1 or self.pp < 1 or self.pp_microbatches < 1:
            raise ValueError("parallel.tp, parallel.pp and parallel.pp_microbatches must be >= 1")


@dataclass
class LogConfig:
    every_steps: int = 10  # console and metrics.jsonl
    val_every_steps: int = 0  # 0: no periodic validation
    val_batches: int = 20
    tensorboard: bool = False  # only if the tensorboard package is installed
    wandb: bool = False  # offline mode; only if wandb is installed
    plots: bool = True
    progress: bool = True
    peak_flops: float | None = None  # per device, for MFU; None: measured by a short matmul probe at start

    def __post_init__(self) -> None:
        check_range("log.every_steps", self.every_steps, low=1)
        check_range("log.val_every_steps", self.val_every_steps, low=0)
        check_range("log.val_batches", self.val_batches, low=1)
        if self.peak_flops is not None:
            check_range("log.peak_flops", self.peak_flops, low=0.0, low_open=True)


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    # Start from a ModelConfig (``model``), a preset name or a model folder (``init_from``; weights are loaded
    # from a folder, a preset starts from random weights with the preset's shape).
    model: ModelConfig = field(default_factory=ModelConfig)
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    # Held-out shards folders for validation (one ordered pass); empty: the loader's val split when
    # data.val_fraction > 0.
    val_shards: list[str] = field(default_factory=list)
    # Tokenizer folder of the shards: checked against the shards' tokenizer hash and saved with the model.
    tokenizer: str | None = None
    max_steps: int = 1000
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    threads: int | None = None  # torch CPU threads; None leaves torch's default

    def __post_init__(self) -> None:
        check_range("max_steps", self.max_steps, low=1)
        if self.threads is not None:
            check_range("threads", self.threads, low=1)
        if not self.init_from:  # a preset or model folder brings its own shape: checked once it is loaded
            self.check_model(self.model)

    def check_model(self, model: ModelConfig) -> None:
        """Raise a ValueError naming the keys when the data does not fit ``model``."""
        # a curriculum stage may extend the context (max_seq_len, rope scaling) from its start on
        limits = [(self.data.seq_len, model.max_seq_len, "data.seq_len")]
        stages = self.data.curriculum
        for i, stage in enumerate(stages):
            try:
                staged = replace(model, **model_overrides(stages[: i + 1]))
            except ValueError as err:
                raise ValueError(f"data.curriculum[{i}]: {err}") from None
            if model.position == "learned" and staged.max_seq_len > model.max_seq_len:
                raise ValueError(f"data.curriculum[{i}].max_seq_len: learned positions cannot be extended")
            limits.append((stage.seq_len, staged.max_seq_len, f"data.curriculum[{i}].seq_len"))
        for length, limit, key in limits:
            if length > limit:
                raise ValueError(f"{key}: sequences of {length} tokens do not fit model.max_seq_len={limit}")
