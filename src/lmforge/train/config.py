"""``TrainConfig``: the typed recipe of a training run (model, data, optimizer, schedule, precision, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config import check_choice
from lmforge.model.config import ModelConfig
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
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas: need two values, got {self.betas}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be positive, got {self.lr}")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int | None = None  # None: warmup_fraction of max_steps
    warmup_fraction: float = 0.005
    min_lr_ratio: float = 0.1  # final LR of cosine/linear/wsd as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay

    def __post_init__(self) -> None:
        check_choice("schedule.name", self.name, SCHEDULES)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"schedule.decay_fraction: must be in (0, 1], got {self.decay_fraction}")


@dataclass
class BatchConfig:
    micro_batch_size: int = 8  # sequences per forward per data-parallel rank
    grad_accum_steps: int = 1  # micro-batches per optimizer step (after any ramp)
    # Batch-size ramp (GPT-3): the global batch grows linearly from ramp_start_tokens to the full batch over
    # the first ramp_tokens training tokens, by accumulating fewer micro-batches early on. 0 disables it.
    ramp_start_tokens: int = 0
    ramp_tokens: int = 0

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("batch.micro_batch_size and batch.grad_accum_steps must be >= 1")


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto: bf16 autocast on CUDA with bf16 support, else fp32
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block

    def __post_init__(self) -> None:
        check_choice("precision.dtype", self.dtype, PRECISIONS)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: only at the end
    keep_last: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in the run folder
    export: bool = True  # write the final model in Hugging Face layout to RUN/model

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class StabilityConfig:
    spike_detection: bool = True
    window: int = 50  # recent step losses that define "normal"
    min_history: int = 20  # no verdict before this many losses
    z_threshold: float = 6.0  # robust z-score (median / MAD) above which a loss is a spike
    max_rollbacks: int = 5
    nonfinite: str = "rollback"  # non-finite loss/gradients outside fp16: skip the step or roll back

    def __post_init__(self) -> None:
        check_choice("stability.nonfinite", self.nonfinite, NONFINITE_ACTIONS)
        if self.window < 3 or self.min_history < 3 or self.min_history > self.window:
            raise ValueError("stability: need 3 <= min_history <= window")


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
    peak_flops: float | None = None  # per device, for MFU; None: a table by device type


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
        if self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
