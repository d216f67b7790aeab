"""Batched logits processors: each changes rows of a ``[rows, vocab]`` float tensor in place or returns a new one.

Every function takes per-row settings, so one call serves a batch of requests with different parameters; the
formulas and tie behaviour follow Hugging Face's ``LogitsProcessor`` classes (penalties, n-gram blocking,
temperature, top-k, top-p, min-p) and the OpenAI API (presence/frequency penalties, logit bias).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _padded(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token lists as a (rows, longest) tensor padded by repeating each row's first token, plus a validity mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    return ids, valid


def apply_repetition_penalty(logits: Tensor, token_ids: list[list[int]], penalties: list[float]) -> None:
    """HF ``RepetitionPenaltyLogitsProcessor``: every seen token's logit is divided by the penalty if positive,
    multiplied if negative. Rows with an empty history are left alone."""
    keep = [i for i, ids in enumerate(token_ids) if ids]
    if not keep:
        return
    rows = torch.tensor(keep, device=logits.device)
    ids, _ = _padded([token_ids[i] for i in keep], logits.device)  # padding repeats a seen token: harmless
    penalty = torch.tensor([penalties[i] for i in keep], dtype=logits.dtype, device=logits.device)[:, None]
    sub = logits.index_select(0, rows)
    score = sub.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.index_copy_(0, rows, sub.scatter(1, ids, score))


def apply_presence_frequency_penalties(
    logits: Tensor, output_ids: list[list[int]], presence: list[float], frequency: list[float]
) -> None:
    """OpenAI: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence`` over generated tokens only."""
    keep = [i for i, ids in enumerate(output_ids) if ids]
    if not keep:
        return
    rows = torch.tensor(keep, device=logits.device)
    ids, valid = _padded([output_ids[i] for i in keep], logits.device)
    counts = torch.zeros(len(keep), logits.shape[1], dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, valid.to(logits.dtype))
    dev, dt = logits.device, logits.dtype
    freq = torch.tensor([frequency[i] for i in keep], dtype=dt, device=dev)[:, None]
    pres = torch.tensor([presence[i] for i in keep], dtype=dt, device=dev)[:, None]
    penalty = counts * freq + (counts > 0).to(dt) * pres
    logits.index_copy_(0, rows, logits.index_select(0, rows) - penalty)


def apply_banned_tokens(logits: Tensor, banned: list[set[int]]) -> None:
    """Set banned tokens (e.g. those that would repeat an n-gram) to -inf."""
    for row, tokens in enumerate(banned):
        if tokens:
            logits[row, list(tokens)] = float("-inf")


def apply_logit_bias(logits: Tensor, biases: list[dict[int, float]]) -> None:
    """OpenAI ``logit_bias``: add a per-token offset to the logits."""
    for row, bias in enumerate(biases):
        if bias:
            index = torch.tensor(list(bias.keys()), device=logits.device)
            values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row].index_add_(0, index, values)


def apply_temperature(logits: Tensor, temperatures: Tensor) -> Tensor:
    """Divide each row by its temperature (rows: (rows,) positive floats)."""
    return logits / temperatures[:, None].to(logits.dtype)


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """HF ``TopKLogitsWarper`` per row: keep tokens scoring >= the k-th best (ties kept); k = 0 keeps all."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """HF ``TopPLogitsWarper`` per row: drop the least likely tokens whose cumulative probability is
    <= 1 - top_p, always keeping the most likely token."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p.to(cumulative.dtype))[:, None]
    remove[:, -1] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """HF ``MinPLogitsWarper`` per row: drop tokens less likely than ``min_p`` times the most likely one."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.to(probs.dtype)[:, None] * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))
