"""Log-likelihoods from a model: continuations given contexts, and held-out text for perplexity.

``continuation_logprobs`` follows lm-evaluation-harness's ``loglikelihood``: the context and the whole
string ``context + continuation`` are tokenized, the continuation's tokens are those of the whole beyond the
context's (trailing spaces of the context are moved to the continuation first, so ``"Answer:" + " 5"``
splits as the model will see it), and the score is the sum of their log-probabilities under one forward
pass. Requests are batched with right padding; a causal model's logits at real positions do not depend on
the padding after them. Prompts are tokenized as the inference engine does it
(``encode(text, add_special_tokens=True)``; chat renderings, which write their special tokens themselves,
with ``add_special_tokens=False`` as the server does), so scores and generations see the same tokens.

Held-out documents are scored like the training stream sees them: each document is preceded by the EOS
token (which separates documents in the shards) so its first token is predicted too, and long documents
are cut into windows of at most ``seq_len`` predictions, each token predicted exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.eval.metrics import ChoiceScore, LanguageModelingScore
from lmforge.tokenizer import Tokenizer
from lmforge.train.objective import IGNORE_INDEX


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


def split_request(
    tokenizer: Tokenizer, request: LoglikelihoodRequest, add_special_tokens: bool = True
) -> tuple[list[int], list[int], str]:
    """Token ids of the context and of the continuation, and the continuation text as scored."""
    context, continuation = request.context, request.continuation
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    context = stripped
    whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    context_ids = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    if whole[: len(context_ids)] != context_ids:
        # The boundary token merged across context and continuation: keep the context's tokens as the
        # model would receive them and append the continuation tokenized on its own.
        whole = context_ids + tokenizer.encode(continuation, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :], continuation


@torch.no_grad()
def token_logprobs(
    model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_size: int = 16
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each sequence of n tokens, the log-probabilities of tokens 1..n-1 given their prefix and whether
    each of those tokens is the model's most likely one (both of length n-1)."""
    results: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(sequences)
    # Longest first, so the padding within a batch stays small.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        ids = ids.to(device)
        logprobs = F.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
        targets = ids[:, 1:]
        chosen = logprobs.gather(-1, targets[..., None])[..., 0].cpu()
        greedy = (logprobs.argmax(-1) == targets).cpu()
        for row, i in enumerate(chunk):
            n = len(sequences[i]) - 1
            results[i] = (chosen[row, :n], greedy[row, :n])
    return results


def sequence_logprobs(
    model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_size: int = 16
) -> list[torch.Tensor]:
    """For each sequence, the log-probability of tokens 1..n-1 given their prefix (length n-1)."""
    return [lp for lp, _ in token_logprobs(model, sequences, pad_id, batch_size)]


def continuation_logprobs(
    model: nn.Module,
    tokenizer: Tokenizer,
    requests: Sequence[LoglikelihoodRequest],
    batch_size: int = 16,
    max_len: int | None = None,
    add_special_tokens: bool = True,
) -> list[ChoiceScore]:
    """Summed log-probability of each continuation given its context.

    Contexts longer than ``max_len - len(continuation)`` tokens keep their end (the left is cut).
    """
    sequences, lengths, texts = [], [], []
    for request in requests:
        context_ids, continuation_ids, text = split_request(tokenizer, request, add_special_tokens)
        if not continuation_ids:
            raise ValueError(f"empty continuation for context {request.context[-40:]!r}")
        sequence = context_ids + continuation_ids
        if max_len is not None and len(sequence) > max_len:
            sequence = sequence[-max_len:]
        sequences.append(sequence)
        lengths.append(len(continuation_ids))
        texts.append(text)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scores = sequence_logprobs(model, sequences, pad_id=pad, batch_size=batch_size)
    return [
        ChoiceScore(float(score[-n:].sum()), n, text)
        for score, n, text in zip(scores, lengths, texts, strict=True)
    ]


def document_windows(tokens: Sequence[int], seq_len: int) -> list[list[int]]:
    """Windows of at most ``seq_len + 1`` tokens overlapping by one, so each token after the first is a
    prediction target in exactly one window."""
    return [list(tokens[start : start + seq_len + 1]) for start in range(0, max(len(tokens) - 1, 1), seq_len)]


def language_modeling_score(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    seq_len: int,
    batch_size: int = 8,
) -> LanguageModelingScore:
    """Perplexity and bits per byte of held-out documents (every byte of every text is predicted)."""
    separator = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if separator is None:
        raise ValueError("perplexity needs an EOS or BOS token to start each document")
    windows: list[list[int]] = []
    n_bytes = 0
    for text in texts:
        if not text:
            continue
        n_bytes += len(text.encode("utf-8"))
        windows.extend(document_windows([separator, *tokenizer.encode(text)], seq_len))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scores = sequence_logprobs(model, windows, pad_id=pad, batch_size=batch_size)
    nll = -sum(float(s.sum()) for s in scores)
    return LanguageModelingScore(nll=nll, n_tokens=sum(len(s) for s in scores), n_bytes=n_bytes)


@torch.no_grad()
def shards_language_modeling_score(
    model: nn.Module,
    tokenizer: Tokenizer,
    shards: list[str],
    seq_len: int,
    batch_size: int = 8,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    max_batches: int = 0,
) -> LanguageModelingScore:
    """Perplexity and bits per byte over token shards: one ordered pass of the loader (its validation
    split when ``val_fraction > 0``, the same split the trainer holds out), documents masked from each
    other. Bytes are those of each row's decoded target tokens (special tokens excluded), so a character
    cut by a row boundary may be counted slightly off."""
    from lmforge.shards.loader import DataConfig, PackedLoader

    data = DataConfig(
        shards=list(shards),
        seq_len=seq_len,
        document_masking=True,
        val_fraction=val_fraction,
        split_seed=split_seed,
    )
    split = "val" if val_fraction > 0 else "train"
    loader = PackedLoader.from_config(
        data, batch_size, split=split, tokenizer_sha256=tokenizer.sha256(), one_pass=True
    )
    device = next(model.parameters()).device
    nll, n_tokens, n_bytes = 0.0, 0, 0
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        labels = batch["labels"].to(device)
        logits = model(
            batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            segment_ids=batch["segment_ids"].to(device),
        ).logits.float()
        mask = labels != IGNORE_INDEX
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        nll -= float(logprobs[mask].sum())
        n_tokens += int(mask.sum())
        for row, row_mask in zip(labels.cpu(), mask.cpu()):
            text = tokenizer.decode(row[row_mask].tolist(), skip_special_tokens=True)
            n_bytes += len(text.encode("utf-8"))
    return LanguageModelingScore(nll=nll, n_tokens=n_tokens, n_bytes=n_bytes)
