"""``lmforge sft``: supervised fine-tuning = the one trainer, the LM objective, an SFT data source.

Nothing here is a training loop: :func:`run_sft` tokenizes the chat data (:mod:`lmforge.tune.sft`), wraps
it in a resumable :class:`~lmforge.tune.sft.SFTDataSource` and hands it to :func:`lmforge.train.train`
with :class:`~lmforge.train.LMObjective`; prompt tokens carry ``labels=-100``, so the same cross-entropy
learns the replies only. The recipe is a :class:`~lmforge.train.TrainConfig` plus an ``sft`` section:

.. code-block:: yaml

    init_from: runs/demo/pretrain/model   # an lmforge or Hugging Face model folder (with its tokenizer)
    run_dir: runs/sft
    max_steps: 800
    data: {seq_len: 256, seed: 0}         # row length of the packed batches, shuffling seed
    batch: {micro_batch_size: 16}
    optim: {lr: 1.0e-3}
    sft:
      paths: [instruct/train.jsonl]       # JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...}
      val_paths: [instruct/heldout.jsonl] # optional: validation loss on held-out chats
      pack: true
      group_by_length: false
    peft: {method: lora, r: 16, lora_alpha: 32, target_modules: all-linear}   # optional, see below

The exported model (``RUN/model``) is in Hugging Face layout with the tokenizer and its chat template.
With a ``peft`` method (:class:`~lmforge.tune.peft.PeftConfig`: ``lora`` (with ``quantize: nf4``: QLoRA),
``ia3``, ``prompt_tuning``, ``p_tuning``, ``prefix_tuning``) only the adapter trains and the export is the adapter
folder ``RUN/adapter`` in the peft library's format (with the tokenizer); ``lmforge peft merge RUN/adapter --out
DIR`` folds a LoRA/IA3 adapter into the base model. Virtual-token methods need ``sft.pack: false``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.model import Transformer
from lmforge.train import LMObjective, TrainConfig, TrainResult, build_model, train
from lmforge.train.checkpoint import load_model_weights
from lmforge.tune.peft import PeftConfig, apply_peft, save_adapter
from lmforge.tune.run import run_copy
from lmforge.tune.sft import SFTDataSource, SFTDataStats, load_sft_examples

Batch = dict[str, torch.Tensor]


@dataclass
class SFTDataConfig:
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    pack: bool = True  # several examples per row (position ids restart, no attention across examples)
    group_by_length: bool = False  # without packing: batches of similar lengths


@dataclass
class SFTConfig(TrainConfig):
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)  # method empty: full fine-tuning

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sft.paths:
            raise ValueError("sft.paths: at least one JSONL file of chats is required")
        if not self.init_from:
            raise ValueError("init_from: the model folder to fine-tune is required")
        if self.peft.method and not Path(self.init_from).is_dir():
            raise ValueError(
                f"init_from: {self.init_from!r} must be a model folder (the adapter's base) with peft"
            )


def _validation(examples: list, cfg: SFTConfig, pad_id: int) -> Callable[[], Iterator[Batch]]:
    source = SFTDataSource(
        examples, cfg.batch.micro_batch_size, cfg.data.seq_len, pad_id, pack=cfg.sft.pack, shuffle=False
    )

    def one_pass() -> Iterator[Batch]:
        for rows in source.epoch_batches(0):
            yield source.make_batch(rows)

    return one_pass


def run_sft(cfg: SFTConfig, progress: bool = True) -> tuple[TrainResult, SFTDataStats]:
    """Fine-tune ``cfg.init_from`` on ``cfg.sft.paths``; returns the trainer's result and the data stats."""
    from lmforge.tokenizer import load_tokenizer

    tokenizer_dir = cfg.tokenizer or cfg.init_from
    assert tokenizer_dir is not None  # checked by SFTConfig
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{tokenizer_dir}: the tokenizer has no chat template to render the conversations with"
        )
    stats = SFTDataStats()
    examples = load_sft_examples(cfg.sft.paths, tokenizer, cfg.data.seq_len, stats)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has neither a pad nor an EOS token")
    source = SFTDataSource(
        examples,
        cfg.batch.micro_batch_size,
        cfg.data.seq_len,
        pad_id,
        pack=cfg.sft.pack,
        group_by_length=cfg.sft.group_by_length,
        seed=cfg.data.seed,
    )
    val_data = None
    if cfg.sft.val_paths:
        val_stats = SFTDataStats()
        val_examples = load_sft_examples(cfg.sft.val_paths, tokenizer, cfg.data.seq_len, val_stats)
        val_data = _validation(val_examples, cfg, pad_id)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sft_data.json").write_text(json.dumps(stats.to_dict(), indent=2) + "\n", encoding="utf-8")
    if progress:
        rejected = sum(stats.rejected.values())
        print(
            f"SFT data: {stats.examples} conversations, {stats.tokens} tokens ({stats.trained_tokens} trained), "
            f"{rejected} rejected, {stats.truncated} truncated; {source.batches_per_epoch()} batches per epoch"
        )
    # the run's own copy of the config: the tokenizer is exported next to the model (chat template included),
    # and with PEFT the adapter is exported below instead of a full model; the caller's config is not changed
    run_cfg = run_copy(cfg, progress)
    model, export_adapter = None, False
    if run_cfg.peft.method:
        if run_cfg.peft.prompt_tuning_init == "TEXT" and not run_cfg.peft.tokenizer_name_or_path:
            run_cfg.peft = dataclasses.replace(run_cfg.peft, tokenizer_name_or_path=str(tokenizer_dir))
        model = _peft_model(run_cfg)
        export_adapter = run_cfg.checkpoint.export
        run_cfg.checkpoint = dataclasses.replace(run_cfg.checkpoint, export=False)
    result = train(run_cfg, model=model, objective=LMObjective(), train_data=source, val_data=val_data)
    if export_adapter and result.checkpoint is not None:
        result = dataclasses.replace(result, model_dir=_export_adapter(run_cfg, result.checkpoint))
    return result, stats


def _peft_model(cfg: SFTConfig) -> Transformer:
    return apply_peft(build_model(cfg), cfg.peft)


def _export_adapter(cfg: SFTConfig, checkpoint: Path) -> Path:
    """Write the adapter of ``checkpoint`` (rank 0) to ``RUN/adapter``, with the tokenizer."""
    from lmforge.tokenizer import load_tokenizer

    out = Path(cfg.run_dir) / "adapter"
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        model = _peft_model(cfg)
        load_model_weights(checkpoint, model)
        assert cfg.init_from is not None and cfg.tokenizer is not None  # checked by SFTConfig, set by run_sft
        save_adapter(model, out, base_model=str(Path(cfg.init_from).resolve()))
        load_tokenizer(cfg.tokenizer).save(out)
    return out
