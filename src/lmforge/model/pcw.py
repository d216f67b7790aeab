"""Parallel context windows (Ratner et al. 2023, "Parallel Context Windows for Large Language Models").

A context too long for the model is split into N windows that *share* position ids: every window's tokens
sit at positions 0 .. w_i - 1 and attend only inside their own window (causally). The task tokens (the
question, then whatever is generated) come after the longest window, at positions max(w_i), max(w_i) + 1, ...,
and attend to every window token and causally to each other. So no position exceeds max(w_i) + task length,
which stays within the training length while the context is N times longer.

Two routes to the same numbers:

- :func:`pcw_layout` + :func:`pcw_forward`: the explicit position ids and visibility mask of the whole
  sequence, one forward pass (``Transformer.forward(attention_mask=...)``); usable for scoring or training;
- :func:`pcw_generate`: greedy decoding through a :class:`ParallelWindowCache`, which encodes each window on
  its own (a window's forward sees only its own keys), then lets the task tokens see them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.model.cache import KVView


def split_windows(ids: Sequence[int], n_windows: int, bos_id: int | None = None) -> list[list[int]]:
    """Cut ``ids`` into ``n_windows`` contiguous windows of near-equal length (the first ones one token longer
    when it does not divide). With ``bos_id``, a leading BOS is taken off and put at the head of every window,
    so each starts as a sequence does in training."""
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    ids = list(ids)
    head = []
    if bos_id is not None and ids and ids[0] == bos_id:
        head, ids = [bos_id], ids[1:]
    if len(ids) < n_windows:
        raise ValueError(f"a context of {len(ids)} tokens cannot fill {n_windows} windows")
    size, extra = divmod(len(ids), n_windows)
    windows, start = [], 0
    for i in range(n_windows):
        end = start + size + (1 if i < extra else 0)
        windows.append(head + ids[start:end])
        start = end
    return windows


def pcw_layout(window_lengths: Sequence[int], n_task: int) -> tuple[Tensor, Tensor]:
    """Position ids (L,) and visibility (L, L) bool of windows laid out one after another, then the task.

    Window i's tokens get positions 0 .. w_i - 1 and see the earlier tokens of their own window; task token j
    gets position max(w) + j and sees every window token and task tokens 0 .. j."""
    if not window_lengths or any(w < 1 for w in window_lengths):
        raise ValueError(f"window lengths must be >= 1, got {list(window_lengths)}")
    longest = max(window_lengths)
    positions = torch.cat(
        [torch.arange(w) for w in window_lengths] + [torch.arange(longest, longest + n_task)]
    )
    window_of = torch.cat(
        [torch.full((w,), i) for i, w in enumerate(window_lengths)] + [torch.full((n_task,), -1)]
    )
    index = torch.arange(len(positions))
    causal = index[None, :] <= index[:, None]  # in sequence order (within a window it is position order)
    same_window = window_of[:, None] == window_of[None, :]
    task_query = (window_of == -1)[:, None]
    visible = causal & (same_window | task_query)
    return positions, visible


def pcw_forward(model: nn.Module, windows: Sequence[Sequence[int]], task_ids: Sequence[int]) -> Tensor:
    """Logits (L, vocab) of windows + task tokens in one forward with the parallel-window layout."""
    positions, visible = pcw_layout([len(w) for w in windows], len(task_ids))
    device = next(model.parameters()).device
    ids = torch.tensor([[t for w in windows for t in w] + list(task_ids)], device=device)
    out = model(ids, position_ids=positions[None].to(device), attention_mask=visible[None].to(device))
    return out.logits[0]


class ParallelWindowCache:
    """A KV cache for parallel context windows, batch 1.

    While ``windows_open`` each forward (one window) is stored but sees only its own keys; after
    :meth:`close_windows` every forward sees all stored keys (every window, then the task tokens) and appends
    its own. Callers give explicit position ids (windows from 0; the task from the longest window's length)."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.positions: list[Tensor | None] = [None] * n_layers
        self.windows_open = True
        self.longest = 0  # longest window seen: where the task tokens start

    def close_windows(self) -> None:
        self.windows_open = False

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> KVView:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.positions[layer] = keys, values, positions
        else:
            self.keys[layer] = torch.cat((self.keys[layer], keys), dim=2)
            self.values[layer] = torch.cat((self.values[layer], values), dim=2)
            self.positions[layer] = torch.cat((self.positions[layer], positions), dim=1)
        if self.windows_open:
            self.longest = max(self.longest, int(positions.max()) + 1)
            return KVView(keys, values, positions)
        return KVView(self.keys[layer], self.values[layer], self.positions[layer])


def pcw_generate(
    model: nn.Module,
    context_ids: Sequence[int],
    task_ids: Sequence[int],
    n_windows: int,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    bos_id: int | None = None,
) -> list[int]:
    """Greedy continuation of ``task_ids`` after ``context_ids`` split into ``n_windows`` parallel windows
    (see :func:`split_windows`); stops at a token in ``stop_ids``. With one window it is ordinary greedy
    decoding of ``context_ids + task_ids``."""
    windows = split_windows(context_ids, n_windows, bos_id) if context_ids else []
    return pcw_generate_windows(model, windows, task_ids, max_new_tokens, stop_ids)


@torch.no_grad()
def pcw_generate_windows(
    model: nn.Module,
    windows: Sequence[Sequence[int]],
    task_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Greedy continuation of ``task_ids`` that attends to the given parallel ``windows`` (token id lists,
    e.g. groups of few-shot demonstrations); stops at a token in ``stop_ids``."""
    if not task_ids:
        raise ValueError("pcw_generate: the task tokens (the question) must not be empty")
    device = next(model.parameters()).device
    cache = ParallelWindowCache(model.cfg.n_layers)
    for window in windows:
        ids = torch.tensor([list(window)], device=device)
        model(ids, position_ids=torch.arange(len(window), device=device)[None], cache=cache)
    cache.close_windows()
    start = cache.longest
    ids = torch.tensor([list(task_ids)], device=device)
    positions = torch.arange(start, start + len(task_ids), device=device)[None]
    logits = model(ids, position_ids=positions, cache=cache).logits[0, -1]
    out: list[int] = []
    stop = set(stop_ids)
    position = start + len(task_ids)
    for _ in range(max_new_tokens):
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        out.append(nxt)
        step = torch.tensor([[position]], device=device)
        logits = model(torch.tensor([[nxt]], device=device), position_ids=step, cache=cache).logits[0, -1]
        position += 1
    return out
