"""Position-wise feed-forward networks: plain (ReLU, GeLU, tanh-GeLU, SiLU) and gated (SwiGLU, GeGLU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.config import ModelConfig
from lmforge.model.fusion import FusedLinear, fusable


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# The nonlinearity of each MLP kind; a gated kind applies it to gate_proj(x) and multiplies by up_proj(x).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
}


class MLP(nn.Module):
    """down_proj(act(up_proj(x))), or down_proj(act(gate_proj(x)) * up_proj(x)) for GLU variants (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = cfg.d_ff if d_ff is None else d_ff
        self.act = ACTIVATIONS[cfg.mlp]
        self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias) if cfg.gated else None
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self._fused_gate_up: FusedLinear | None = None  # set by fuse_for_inference (up alone when ungated)
        self._fused_down: FusedLinear | None = None

    def fuse_for_inference(self, pack: bool = False, pack_dtype: torch.dtype | None = None) -> int:
        """Run gate and up as one matmul from now on, and with ``pack`` every projection on prepacked weights
        (see :mod:`lmforge.model.fusion`); projections that cannot be (quantized, adapter-wrapped,
        distributed) are left as they are. Returns 1 if gate/up were fused, else 0."""
        first = [self.gate_proj, self.up_proj] if self.gate_proj is not None else [self.up_proj]
        fuse_first = fusable(first) and (len(first) == 2 or pack)
        self._fused_gate_up = FusedLinear(first, pack, pack_dtype) if fuse_first else None
        self._fused_down = (
            FusedLinear([self.down_proj], pack, pack_dtype) if pack and fusable([self.down_proj]) else None
        )
        return int(self._fused_gate_up is not None and len(first) == 2)

    def unfuse(self) -> None:
        """Undo :meth:`fuse_for_inference`: each projection gets its own storage again."""
        for fused in (self._fused_gate_up, self._fused_down):
            if fused is not None:
                fused.unfuse()
        self._fused_gate_up = self._fused_down = None

    def forward(self, x: Tensor) -> Tensor:
        first, down = self._fused_gate_up, self._fused_down
        if first is not None and first.valid(
            [self.gate_proj, self.up_proj] if self.gate_proj is not None else [self.up_proj]
        ):
            parts = first(x)
            h = self.act(parts[0]) * parts[1] if len(parts) == 2 else self.act(parts[0])
        elif self.gate_proj is None:
            h = self.act(self.up_proj(x))
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        if down is not None and down.valid([self.down_proj]):
            return down(h)[0]
        return self.down_proj(h)
