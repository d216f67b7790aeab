"""Parallelism applied to a built ``Transformer`` from outside: DDP, FSDP2, tensor and pipeline parallel.

The world is a ``DeviceMesh`` of shape ``(pp, dp, tp)`` (tensor parallel innermost, so its heavy
collectives stay on the fastest links). Processes are launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous come from its environment); NCCL on GPUs, gloo on CPU.

- data parallel: ``DistributedDataParallel``, or FSDP2 ``fully_shard`` per block and at the root, with
  ``reshard_after_forward=True`` (ZeRO-3: parameters gathered again in backward) or ``False`` (ZeRO-2-like:
  parameters stay gathered between forward and backward; gradients and optimizer states sharded);
- tensor parallel (Megatron-LM style): column-parallel q/k/v and gate/up projections, row-parallel o/down
  projections, so each rank holds ``n_heads / tp`` query heads and ``n_kv_heads / tp`` key/value heads and a
  block needs one all-reduce after attention and one after the MLP; embeddings, norms and the head stay
  replicated;
- pipeline parallel: each stage is the model with the other stages' blocks deleted (block keys, hence
  parameter names, are kept), driven by a GPipe or 1F1B schedule from ``torch.distributed.pipelining``.

``parallelize(model, env, cfg)`` applies all of it in the one valid order (stage split, tensor parallel,
activation checkpointing, compile, FSDP or DDP, pipeline schedule). A model built on the ``meta`` device
(``build_model(cfg, meta=True)``) holds no memory until then: each rank materialises only its own stage and
shards, and ``materialize`` fills them with exactly the weights a single process would have initialised
(the full model is never allocated; one block at a time is, to draw its random numbers in order).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from lmforge.model.transformer import Transformer
from lmforge.train.config import ParallelConfig, TrainConfig


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = None
    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_rank: int = 0
    pp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along mesh dimension ``dim`` (None when that dimension has one rank)."""
        if self.mesh is None or getattr(self, dim) == 1:
            return None
        return self.mesh[dim].get_group()


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Join the torchrun world if there is one and lay out the (pp, dp, tp) mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world % (cfg.tp * cfg.pp):
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp * parallel.pp = {cfg.tp * cfg.pp}"
        )
    dp = world // (cfg.tp * cfg.pp)
    if world == 1:
        return DistEnv(device=device)
    mesh = init_device_mesh(device.type, (cfg.pp, dp, cfg.tp), mesh_dim_names=("pp", "dp", "tp"))
    return DistEnv(
        rank=dist.get_rank(),
        world_size=world,
        device=device,
        mesh=mesh,
        dp=dp,
        tp=cfg.tp,
        pp=cfg.pp,
        dp_rank=mesh["dp"].get_local_rank(),
        pp_rank=mesh["pp"].get_local_rank(),
    )


def all_reduce_sum(value: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None:
        dist.all_reduce(value, group=group)
    return value


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in backward instead of storing its activations (names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks.values():
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: Transformer) -> None:
    """``torch.compile`` each block in place (the blocks are identical, so one graph is reused)."""
    for block in model.blocks.values():
        block.compile()


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg, tp = model.cfg, tp_mesh.size()
    if cfg.n_heads % tp or cfg.n_kv_heads % tp:
        raise ValueError(
            f"parallel.tp={tp} must divide n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}"
        )
    if cfg.n_experts:
        raise ValueError("tensor parallelism of MoE layers is not supported")
    if cfg.position in ("alibi", "relative"):
        raise ValueError(
            f"tensor parallelism with position={cfg.position} (per-head biases) is not supported"
        )
    for block in model.blocks.values():
        plan = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if getattr(block.mlp, "gate_proj", None) is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        # The projections now produce this rank's heads only; attention reshapes by these counts.
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp


def apply_fsdp(
    root: nn.Module, blocks: nn.ModuleDict, dp_mesh: DeviceMesh, reshard_after_forward: bool
) -> None:
    """Shard each block as its own unit (gathered just in time), then what remains at ``root``."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Blocks of pipeline stage ``stage``: contiguous, sizes differing by at most one."""
    if n_layers < pp:
        raise ValueError(f"parallel.pp={pp} needs at least as many layers, the model has {n_layers}")
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def split_pipeline_stage(model: Transformer, pp: int, stage: int) -> Transformer:
    """Turn ``model`` into pipeline stage ``stage`` in place by deleting what other stages hold."""
    cfg = model.cfg
    if cfg.tie_embeddings:
        raise ValueError("pipeline parallelism with tied embeddings (first and last stage share a weight)")
    keep = {str(i) for i in stage_layers(cfg.n_layers, pp, stage)}
    for key in list(model.blocks.keys()):
        if key not in keep:
            del model.blocks[key]
    if stage > 0:
        model.embed_tokens = model.pos_embed = model.embed_norm = None
    if stage < pp - 1:
        model.norm = model.lm_head = None
    return model


class StageForward(nn.Module):
    """A pipeline stage's module: tensors in, tensors out (hidden states, or logits on the last stage)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def grad_norm(parameters: list[nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Global L2 norm of the gradients over all ranks, counting every element once.

    Plain tensors are replicated (DDP, or TP-replicated layers) and count as they are; DTensor gradients
    are summed over the mesh dimensions where they are sharded; pipeline stages add up their squares.
    """
    plain = [p.grad.detach() for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    sharded: dict[tuple, list[Tensor]] = defaultdict(list)
    meshes: dict[tuple, tuple[DeviceMesh, list[int]]] = {}
    for p in parameters:
        if isinstance(p.grad, DTensor):
            shard_dims = [i for i, placement in enumerate(p.grad.placements) if placement.is_shard()]
            key = (id(p.grad.device_mesh), tuple(shard_dims))
            meshes[key] = (p.grad.device_mesh, shard_dims)
            sharded[key].append(p.grad.to_local().detach())
    total = torch.nn.utils.get_total_norm(plain, foreach=True).float().pow(2) if plain else torch.zeros(())
    for key, locals_ in sharded.items():
        squares = torch.nn.utils.get_total_norm(locals_, foreach=True).float().pow(2)
        mesh, shard_dims = meshes[key]
        for dim in shard_dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total = total.to(squares.device) + squares
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def scale_grads_(parameters: list[nn.Parameter], factor: float) -> None:
    plain = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if plain:
        torch._foreach_mul_(plain, factor)
    for p in parameters:
        if isinstance(p.grad, DTensor):
            p.grad.mul_(factor)


@dataclass
class Parallelized:
    """What ``parallelize`` hands the trainer."""

    model: Transformer  # owns this rank's parameters: the optimizer, checkpoints and export use it
    forward_model: nn.Module  # what a training step calls (the model, its DDP/FSDP root or pipeline stage)
    fsdp_root: nn.Module | None = None  # set with FSDP: gradient sync is switched on its root
    schedule: Any | None = None  # the pipeline schedule with pp > 1


def parallelize(
    model: Transformer,
    env: DistEnv,
    cfg: TrainConfig,
    pipeline_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    seed: int | None = None,
) -> Parallelized:
    """Lay ``model`` out over ``env``'s mesh as ``cfg.parallel`` and ``cfg.precision`` ask. A model on the
    meta device is materialised on ``env.device`` afterwards, rank by rank, with the weights
    ``torch.manual_seed(seed)`` followed by ``Transformer(model.cfg)`` gives (see ``materialize``)."""
    pcfg = cfg.parallel
    if env.dp > 1 and (env.tp > 1 or env.pp > 1) and pcfg.dp_mode == "ddp":
        # DDP's reducer handles neither DTensor parameters nor several backward passes per step
        raise ValueError("data parallelism composed with tp/pp needs parallel.dp_mode=fsdp")
    if env.pp > 1:
        if cfg.data.document_masking:
            raise ValueError("pipeline parallelism passes one tensor between stages: no document_masking")
        if cfg.batch.micro_batch_size % pcfg.pp_microbatches:
            raise ValueError("batch.micro_batch_size must be divisible by parallel.pp_microbatches")
        if pipeline_loss is None:
            raise ValueError("pipeline parallelism needs the loss function of its last stage")
        split_pipeline_stage(model, env.pp, env.pp_rank)
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(env.device)
    if env.tp > 1:
        apply_tensor_parallel(model, env.mesh["tp"])
    if cfg.precision.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.precision.compile:
        apply_compile(model)
    root: nn.Module = StageForward(model) if env.pp > 1 else model
    fsdp_root = None
    if env.dp > 1 and pcfg.dp_mode == "fsdp":
        apply_fsdp(root, model.blocks, env.mesh["dp"], pcfg.fsdp_reshard_after_forward)
        fsdp_root = root
    if on_meta:
        materialize(model, env.device, seed)
    if env.dp > 1 and pcfg.dp_mode != "fsdp":
        from torch.nn.parallel import DistributedDataParallel

        root = DistributedDataParallel(root, process_group=env.group("dp"))
    schedule = None
    if env.pp > 1:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = PipelineStage(root, env.pp_rank, env.pp, env.device, group=env.group("pp"))
        schedule_cls = ScheduleGPipe if pcfg.pp_schedule == "gpipe" else Schedule1F1B
        schedule = schedule_cls(
            stage, n_microbatches=pcfg.pp_microbatches, loss_fn=pipeline_loss, scale_grads=False
        )
    return Parallelized(model.train(), root, fsdp_root, schedule)


@torch.no_grad()
def materialize(model: Transformer, device: torch.device, seed: int | None = None) -> None:
    """Give a meta-device ``model`` (possibly a pipeline stage, tensor-parallel or FSDP-sharded) real storage
    on ``device`` and the initial weights of ``Transformer(model.cfg)`` built after ``torch.manual_seed(seed)``.

    The full model's top-level pieces (embeddings, each block, final norm, head) are initialised one at a
    time on the CPU in construction order, so the random numbers come out as in one process; this rank keeps
    the parameters it holds (its slice of a sharded one) and drops the rest."""
    if seed is not None:
        torch.manual_seed(seed)
    model.to_empty(device=device)
    local = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    with torch.device("meta"):
        reference = Transformer(model.cfg)
    for prefix, piece in reference.init_pieces():
        piece = copy.deepcopy(piece).to_empty(device="cpu")
        reference.init_piece(prefix, piece)
        for name, full in piece.named_parameters(prefix=prefix):
            target = local.get(name)
            if target is None:
                continue  # held by another pipeline stage
            if isinstance(target, DTensor):
                # every rank drew the same full tensor: each keeps its own slice, no communication
                shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(full)
            filled.add(name)
    model.tie_weights()
    missing = sorted(set(local) - filled - _tied_names(model))
    if missing:
        raise RuntimeError(f"materialize: no initial value for {missing[:5]}")


def _tied_names(model: Transformer) -> set[str]:
    """Parameter names that share storage with an earlier name (the tied head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
