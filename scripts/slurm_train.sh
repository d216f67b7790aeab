#!/usr/bin/env bash
# Multi-node lmforge training under Slurm: one torchrun agent per node, c10d rendezvous on the first node.
#   sbatch --nodes 4 scripts/slurm_train.sh recipes/train/tiny-cpu.yaml parallel.tp=8 parallel.dp_mode=fsdp
# Every rank must see the same run_dir (a shared filesystem): checkpoints are written there collectively,
# and resubmitting the same job resumes from the newest intact checkpoint.
#SBATCH --job-name=lmforge-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

RECIPE="${1:?usage: sbatch scripts/slurm_train.sh RECIPE.yaml [key=value ...]}"
shift
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
PORT="${LMFORGE_RDZV_PORT:-29500}"
PYTHON="${PYTHON:-.venv/bin/python}"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:$PORT" \
    -m lmforge.cli train --config "$RECIPE" "$@"
