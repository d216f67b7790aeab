"""Run under torchrun by test_parallel.py: train the tiny model under several parallel layouts in one launch.

argv: SHARDS_DIR OUT_DIR MODE [MODE ...]; each mode writes OUT_DIR/MODE/metrics.jsonl (rank 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.train import train
from tests.train.conftest import tiny_config

STEPS = 4
# a constant LR after warm-up, so a run resumed with a larger max_steps continues the same schedule
SHARED = {"schedule.name": "constant", "checkpoint.export": True}
# mode -> overrides; every layout trains on the same global batch of 4 sequences per step
MODES: dict[str, dict] = {
    "ddp": {"batch.micro_batch_size": 2},
    "fsdp_zero2": {
        "batch.micro_batch_size": 2,
        "parallel.dp_mode": "fsdp",
        "parallel.fsdp_reshard_after_forward": False,
    },
    "fsdp_zero3": {"batch.micro_batch_size": 2, "parallel.dp_mode": "fsdp"},
    "ddp_accum": {"batch.micro_batch_size": 1, "batch.grad_accum_steps": 2},
    "tp": {"parallel.tp": 2},
    "pp_gpipe": {"parallel.pp": 2, "parallel.pp_schedule": "gpipe"},
    "pp_1f1b": {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"},
    "fsdp_tp": {"batch.micro_batch_size": 2, "parallel.tp": 2, "parallel.dp_mode": "fsdp"},
    "fsdp_pp": {"batch.micro_batch_size": 2, "parallel.pp": 2, "parallel.dp_mode": "fsdp"},
}


def main() -> None:
    torch.set_num_threads(1)
    shards, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    for mode in sys.argv[3:]:
        overrides = {"max_steps": STEPS, "checkpoint.every_steps": STEPS, **SHARED, **MODES[mode]}
        try:
            train(tiny_config(out / mode, shards, **overrides))
        except Exception as err:  # report and go on with the other modes
            if dist.get_rank() == 0:
                (out / mode).mkdir(parents=True, exist_ok=True)
                (out / mode / "error.txt").write_text(f"{type(err).__name__}: {err}")
            raise
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
