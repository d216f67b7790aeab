"""T5's span-corruption pretraining: a batch source that corrupts packed rows, and the encoder-decoder objective.

Raffel et al. 2020 (and ``t5.data.preprocessors.span_corruption``): of a row of L tokens, round(L * 0.15) are
noise, split into round(noise / 3) spans (mean span length 3) placed at random; the encoder reads the row with
every noise span replaced by one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ... : ids counting down from
the vocabulary's last), the decoder writes each sentinel followed by the span it stands for. Both end in EOS.
Every row of length L gives inputs and targets of the same lengths, so a batch needs no padding and the
objective's token count is known before the forward pass, as the trainer requires.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.train.objective import IGNORE_INDEX, Batch, ObjectiveOutput, lm_loss_sum


def noise_counts(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of ``length`` tokens, as T5's ``random_spans_noise_mask`` (rounding
    half to even, as tf.round does): at least one noise token, one non-noise token and one span."""
    length = max(length, 2)
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    return n_noise, n_spans


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``n_items`` into ``n_segments`` non-empty runs."""
    first_in_segment = np.zeros(n_items, dtype=bool)
    first_in_segment[1:] = rng.permutation(np.arange(n_items - 1) < n_segments - 1)
    return np.bincount(np.cumsum(first_in_segment), minlength=n_segments)


def random_spans_noise_mask(
    length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> np.ndarray:
    """Bool mask of ``length`` (True: noise) with exactly ``noise_counts`` noise tokens in that many spans,
    alternating with non-empty non-noise runs and starting with one (T5's ``random_spans_noise_mask``)."""
    n_noise, n_spans = noise_counts(length, noise_density, mean_span_length)
    padded = max(length, 2)
    noise_lengths = _random_segmentation(n_noise, n_spans, rng)
    keep_lengths = _random_segmentation(padded - n_noise, n_spans, rng)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    starts = np.cumsum(interleaved)[:-1]
    span_start = np.zeros(padded, dtype=np.int64)
    span_start[starts] = 1
    return (np.cumsum(span_start) % 2 == 1)[:length]


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, first_sentinel_id: int) -> np.ndarray:
    """Each run of masked tokens replaced by one sentinel, the k-th (0-based) being first_sentinel_id - k."""
    previous = np.concatenate([[False], mask[:-1]])
    first = mask & ~previous
    out = np.where(first, first_sentinel_id + 1 - np.cumsum(first), tokens)
    return out[~(mask & previous)]


def span_corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, first_sentinel_id: int, eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(encoder inputs, decoder targets): the inputs keep the non-noise tokens with a sentinel per noise span,
    the targets hold a sentinel before each noise span's tokens (the same sentinel, in the same order); both
    end with ``eos_id`` unless it is None."""
    tokens = np.asarray(tokens)
    inputs = _replace_spans(tokens, noise_mask, first_sentinel_id)
    targets = _replace_spans(tokens, ~noise_mask, first_sentinel_id)
    if eos_id is not None:
        inputs, targets = np.append(inputs, eos_id), np.append(targets, eos_id)
    return inputs, targets


def first_sentinel_id(tokenizer: Any, count: int) -> int:
    """The id of ``<extra_id_0>`` in ``tokenizer`` (anything with ``token_to_id``), checked to be followed by
    ``<extra_id_1>`` .. ``<extra_id_{count-1}>`` at ids counting down, as T5's vocabulary has them and
    :func:`span_corrupt` numbers them."""
    first = tokenizer.token_to_id("<extra_id_0>")
    if first is None:
        raise ValueError("tokenizer: has no <extra_id_0> sentinel token")
    for k in range(1, count):
        found = tokenizer.token_to_id(f"<extra_id_{k}>")
        if found != first - k:
            raise ValueError(
                f"tokenizer: <extra_id_{k}> has id {found}, expected {first - k} (ids counting down)"
            )
    return first


class SpanCorruptionBatches:
    """Batches for an encoder-decoder from a token loader: each row of ``input_ids`` is span-corrupted into
    ``input_ids`` (encoder), ``decoder_input_ids`` (start token + targets[:-1]) and ``labels`` (targets).

    The noise of the n-th batch comes from a generator seeded with (seed, n), and ``state_dict`` holds the
    inner loader's position and n, so a resumed or rolled-back run corrupts its batches the same way.
    """

    def __init__(
        self,
        loader: Iterator[Batch],
        first_sentinel_id: int,
        eos_id: int | None,
        decoder_start_id: int = 0,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density: must be in (0, 1), got {noise_density}")
        if mean_span_length < 1.0:
            raise ValueError(f"mean_span_length: must be >= 1, got {mean_span_length}")
        self.loader, self.first_sentinel_id, self.eos_id = loader, first_sentinel_id, eos_id
        self.decoder_start_id, self.noise_density, self.mean_span_length = (
            decoder_start_id,
            noise_density,
            mean_span_length,
        )
        self.seed, self.batches = seed, 0

    def __iter__(self) -> SpanCorruptionBatches:
        return self

    def __next__(self) -> Batch:
        rows = next(self.loader)["input_ids"]
        length = rows.shape[1]
        _, n_spans = noise_counts(length, self.noise_density, self.mean_span_length)
        if self.first_sentinel_id - n_spans + 1 <= int(rows.max()):
            raise ValueError(
                f"first_sentinel_id: sentinels {self.first_sentinel_id - n_spans + 1}..{self.first_sentinel_id} "
                f"overlap the token ids of the data (up to {int(rows.max())})"
            )
        rng = np.random.default_rng([self.seed, self.batches])
        self.batches += 1
        inputs, targets = [], []
        for row in rows.cpu().numpy():
            mask = random_spans_noise_mask(length, rng, self.noise_density, self.mean_span_length)
            enc, dec = span_corrupt(row, mask, self.first_sentinel_id, self.eos_id)
            inputs.append(enc)
            targets.append(dec)
        labels = torch.from_numpy(np.stack(targets)).long()
        decoder_inputs = torch.full_like(labels, self.decoder_start_id)
        decoder_inputs[:, 1:] = labels[:, :-1]
        return {
            "input_ids": torch.from_numpy(np.stack(inputs)).long(),
            "decoder_input_ids": decoder_inputs,
            "labels": labels,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "batches": self.batches}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
        self.batches = state["batches"]


class Seq2SeqObjective:
    """Cross-entropy of an encoder-decoder's ``labels`` given ``input_ids`` and ``decoder_input_ids``
    (teacher forcing), summed over labels that are not -100: span corruption, or any seq2seq batch."""

    name = "span_corruption"

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(
            batch["input_ids"], batch["decoder_input_ids"], attention_mask=batch.get("attention_mask")
        )
        ce_sum: Tensor = lm_loss_sum(out.logits, batch["labels"])
        return ObjectiveOutput(loss_sum=ce_sum, count=self.count(batch), sums={"ce": ce_sum.detach()})
