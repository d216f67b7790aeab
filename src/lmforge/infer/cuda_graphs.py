"""CUDA graphs of the decode forward: one launch per decode step instead of one per kernel.

A decode step of a small model on a GPU is bound by kernel launches, not by the GPU: every layer issues a
dozen small kernels, each costing Python and driver time on the host while the GPU idles (the engine and
transformers' ``generate`` both ran at about 8 ms a step for a 124M model at batch 64 on an H200). vLLM
captures the decode forward as CUDA graphs at a few batch sizes and replays them; this module does the same
for the decode-mirror forward (``decode_mirror.py``), whose keys and values already live in fixed buffers.

A graph is captured per (mirror bin buffer, batch bucket, buffer length): inputs are copied into static
tensors padded to the bucket (padding rows write to the padding block and to unused bin rows, which are
never read), every row attends over the bin's whole buffer length (key positions past a row's context are
-1, so they are masked), and the logits are copied out of the graph's output. A bin buffer that grows gets
new graphs; the old ones are dropped. The first capture that fails (a model whose forward syncs with the
host, e.g. an MoE router or a length-dependent RoPE) turns graphs off for the engine, logged once.

On a CPU nothing is captured: ``capture=False`` runs the same padded static forward eagerly, which is what
the tests check against the plain decode path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.infer.decode_mirror import MirrorBin
from lmforge.infer.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def supports_graphs(model: nn.Module) -> str | None:
    """Why ``model``'s decode forward cannot be captured (a host sync or data-dependent shapes in it), or
    None when it can."""
    from lmforge.model import Transformer
    from lmforge.model.rope_scaling import LENGTH_DEPENDENT, rope_type

    cfg = getattr(model, "cfg", None)
    if not isinstance(model, Transformer) or cfg is None:
        return "only decoder-only Transformer models are captured"
    if cfg.n_experts:
        return "MoE routing has data-dependent shapes"
    if cfg.knn_memory:
        return "the kNN memory is searched on the host"
    if cfg.position == "rope" and rope_type(cfg) in LENGTH_DEPENDENT:
        return "a length-dependent RoPE scaling reads the sequence length on the host"
    if cfg.position == "learned":
        return "learned positions check their range on the host"
    if getattr(cfg, "rerope_window", None) is not None:
        return "ReRoPE is not captured"
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # (3, B) long: token ids, positions, pool slots
    logits: Tensor  # (B, vocab), written by each replay


class DecodeGraphs:
    """Captured decode forwards, keyed by (bin, bin buffer, batch bucket, buffer length)."""

    def __init__(
        self, model: nn.Module, cache: PagedKVCache, capture: bool = True, max_graphs: int = 64
    ) -> None:
        self.model = model
        self.cache = cache
        self.capture = capture
        self.max_graphs = max_graphs
        self.device = cache.k.device
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[tuple[int, int, int, int], _Graph] = {}
        self.disabled: str | None = None  # why graphs were turned off after a failed capture
        self.runs = 0  # decode forwards run through here (replays, or the static path without capture)
        self.captures = 0

    def bucket(self, rows: int, bin_rows: int) -> int | None:
        """The smallest batch bucket holding ``rows`` that the bin's buffer has rows for (None: run eagerly)."""
        for size in BATCH_BUCKETS:
            if rows <= size <= bin_rows:
                return size
        return None

    def run(
        self, mirror_bin: MirrorBin, token_ids: list[int], positions: list[int], slots: list[int]
    ) -> Tensor | None:
        """Logits (rows, vocab) of one decode forward over bin rows 0..rows-1, or None when this forward is
        not graphed (graphs off, no bucket fits, too many graphs); the caller then runs it eagerly."""
        if self.disabled is not None or mirror_bin.k is None:
            return None
        rows = len(token_ids)
        size = self.bucket(rows, mirror_bin.k.shape[1])
        if size is None:
            return None
        length = mirror_bin.k.shape[3]
        padding = size - rows  # padding rows: token 0 at position 0, written to slot 0 (the padding block)
        host = torch.tensor(
            [token_ids + [0] * padding, positions + [0] * padding, slots + [0] * padding], dtype=torch.long
        )
        if not self.capture:  # the static path run eagerly (CPU, tests): nothing to look up or capture
            self.runs += 1
            return self._forward(mirror_bin, host.to(self.device), length)[:rows]
        key = (id(mirror_bin), mirror_bin.k.data_ptr(), size, length)
        entry = self.graphs.get(key)
        if entry is None:
            self._drop_stale(mirror_bin)
            if len(self.graphs) >= self.max_graphs:
                return None
            entry = self._build(mirror_bin, host, length)
            if entry is None:
                return None
            self.graphs[key] = entry
        else:
            entry.inputs.copy_(host)
            entry.graph.replay()
        self.runs += 1
        return entry.logits[:rows].clone()

    def _forward(self, mirror_bin: MirrorBin, inputs: Tensor, length: int) -> Tensor:
        """The decode forward on static inputs: every row sees keys 0..its position of the whole buffer."""
        ids, positions, slots = inputs[0], inputs[1], inputs[2]
        keys = torch.arange(length, device=inputs.device)
        key_positions = torch.where(keys[None, :] <= positions[:, None], keys[None, :], -1)
        self.cache.bind_mirrored(mirror_bin, slots, positions, key_positions)
        return self.model(ids[:, None], position_ids=positions[:, None], cache=self.cache).logits[:, -1]

    def _build(self, mirror_bin: MirrorBin, host: Tensor, length: int) -> _Graph | None:
        inputs = host.to(self.device)
        try:
            # warm up on a side stream (as torch.cuda.graphs advises), then capture; the forward writes the
            # same keys/values to the same places each time, so running it again is harmless
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(mirror_bin, inputs, length)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(mirror_bin, inputs, length)
            graph.replay()
        except Exception as err:  # a forward that cannot be captured: decode eagerly from now on
            self.disabled = f"{type(err).__name__}: {err}"
            self.graphs.clear()
            logger.warning("CUDA graphs turned off: capturing the decode forward failed (%s)", self.disabled)
            return None
        self.captures += 1
        return _Graph(graph, inputs, logits)

    def _drop_stale(self, mirror_bin: MirrorBin) -> None:
        """Forget the graphs of a bin whose buffer was reallocated (they read and write the old buffer)."""
        assert mirror_bin.k is not None
        live = mirror_bin.k.data_ptr()
        stale = [k for k in self.graphs if k[0] == id(mirror_bin) and k[1] != live]
        for key in stale:
            del self.graphs[key]
        if stale and not self.graphs:
            # a memory pool whose graphs are all gone is released: capturing into it again trips an
            # allocator assertion (seen on torch 2.11), so the next capture takes a fresh pool
            self.pool = torch.cuda.graph_pool_handle()
