"""Position-wise feed-forward networks: plain (ReLU, GeLU, tanh-GeLU, SiLU) and gated (SwiGLU, GeGLU)."""

from __future__ import annotations

from collections.abc import Callable

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
        self._fused_gate_up: FusedLinear | None = None  # set by fuse_for_inference

    def fuse_for_inference(self) -> bool:
        """Run gate and up as one matmul from now on (see :mod:`lmforge.model.fusion`); False for an ungated
        MLP or projections that cannot be fused (quantized, adapter-wrapped, distributed)."""
        projections = [self.gate_proj, self.up_proj]
        self._fused_gate_up = FusedLinear(projections) if fusable(projections) else None
        return self._fused_gate_up is not None

    def unfuse(self) -> None:
        """Undo :meth:`fuse_for_inference`: each projection gets its own storage again."""
        if self._fused_gate_up is not None:
            self._fused_gate_up.unfuse()
            self._fused_gate_up = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        fused = self._fused_gate_up
        if fused is not None and fused.valid([self.gate_proj, self.up_proj]):
            gate, up = fused(x)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
