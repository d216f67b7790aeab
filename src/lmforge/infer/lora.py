"""Several LoRA adapters served at once over one base model: each batch row uses its own adapter, or none.

``LoraSet`` owns the adapters the engine serves. The first adapter wraps the model's targeted linear layers in
``MultiLoraLinear`` (in place; the base weights are untouched and shared): ``y = W x + s_a B_a A_a x`` for
the rows of adapter ``a`` only, computed per adapter present in the batch (as S-LoRA / punica gather their
rows; a batch of one adapter needs no gather). The model runner tells the set which adapter each row of the
next forward uses (``LoraSet.route``). Adapters come as plain tensors (``A`` (r, in), ``B`` (out, r) and the
scale, keyed by module name), so the engine reads no adapter files: the serving layer loads peft folders.

Only linear layers inside the Transformer blocks can carry served adapters: their inputs are laid out
``(batch, seq, features)``, one row per request. Adapters on embeddings, the LM head or MoE experts are
refused; merge those into a model folder instead (``lmforge peft merge``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

LoraWeights = Mapping[str, tuple[Tensor, Tensor, float]]  # module name -> (A, B, scale)


class MultiLoraLinear(nn.Module):
    """A linear layer plus the adapters served on it; which rows use which adapter comes from the set."""

    def __init__(self, base: nn.Linear, lora_set: LoraSet) -> None:
        super().__init__()
        self.base = base
        self.lora_set = lora_set
        self.adapters: dict[int, tuple[Tensor, Tensor, float]] = {}  # slot -> (A, B, scale)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for slot, rows in self.lora_set.rows_by_slot.items():
            adapter = self.adapters.get(slot)
            if adapter is None:
                continue
            a, b, scale = adapter
            if rows is None:  # every row uses this adapter
                out = out + scale * ((x @ a.T) @ b.T)
            else:
                delta = scale * ((x.index_select(0, rows) @ a.T) @ b.T)
                out = out.index_add(0, rows, delta.to(out.dtype))
        return out


class LoraSet:
    """The adapters of one engine, by name, and the routing of the next forward's rows to them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots: dict[str, int] = {}
        self.rows_by_slot: dict[int, Tensor | None] = {}  # set by route(): rows per adapter slot (None: all)
        self._next_slot = 0
        self._layers: dict[str, MultiLoraLinear] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def add(self, name: str, weights: LoraWeights) -> int:
        """Serve ``weights`` as adapter ``name``; returns its slot. Shapes are checked before anything
        changes, so a bad adapter leaves the set as it was."""
        if not name:
            raise ValueError("lora name: must not be empty")
        if name in self.slots:
            raise ValueError(f"lora name: an adapter named {name!r} is already loaded")
        if not weights:
            raise ValueError(f"lora {name!r}: the adapter has no weights")
        modules = dict(self.model.named_modules())
        checked: dict[str, tuple[Tensor, Tensor, float]] = {}
        for module_name, (a, b, scale) in weights.items():
            module = modules.get(module_name)
            if isinstance(module, MultiLoraLinear):
                module = module.base
            if not isinstance(module, nn.Linear) or not module_name.startswith("blocks."):
                raise ValueError(
                    f"lora {name!r}: {module_name} is not a linear layer of a Transformer block (served "
                    "adapters go on the blocks' linear layers; merge other adapters with lmforge peft merge)"
                )
            if ".experts." in module_name:
                raise ValueError(f"lora {name!r}: {module_name} is an MoE expert; merge this adapter instead")
            rank = a.shape[0]
            if (
                a.dim() != 2
                or b.dim() != 2
                or a.shape[1] != module.in_features
                or b.shape
                != (
                    module.out_features,
                    rank,
                )
            ):
                raise ValueError(
                    f"lora {name!r}: {module_name} has A {tuple(a.shape)} and B {tuple(b.shape)}; the layer "
                    f"needs A (r, {module.in_features}) and B ({module.out_features}, r) (an adapter for a "
                    "different base model?)"
                )
            weight = module.weight
            checked[module_name] = (a.to(weight), b.to(weight), float(scale))
        slot = self._next_slot
        self._next_slot += 1
        for module_name, adapter in checked.items():
            self._layer(module_name).adapters[slot] = adapter
        self.slots[name] = slot
        return slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        for layer in self._layers.values():
            layer.adapters.pop(slot, None)

    def route(self, slots: list[int]) -> None:
        """The adapter slot (-1: the base model) of each row of the next forward."""
        self.rows_by_slot = {}
        distinct = set(slots) - {-1}
        if len(distinct) == 1 and -1 not in slots:
            self.rows_by_slot[distinct.pop()] = None
            return
        for slot in distinct:
            self.rows_by_slot[slot] = torch.tensor(
                [i for i, s in enumerate(slots) if s == slot], device=self._device()
            )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _layer(self, module_name: str) -> MultiLoraLinear:
        layer = self._layers.get(module_name)
        if layer is None:
            parent_name, _, leaf = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            layer = MultiLoraLinear(getattr(parent, leaf), self)
            setattr(parent, leaf, layer)
            self._layers[module_name] = layer
        return layer
