"""Vocabulary extension for a new language: append BPE pieces learned on its text, keeping every old id.

A BPE vocabulary is a ranked list of merges. :func:`extend_tokenizer` trains a candidate BPE on the new text
with the base tokenizer's own normalizer and pre-tokenizer, then walks the candidate's merges in rank order
and appends each one whose result the base does not have (its two parts always exist by then: the base has
them, or an earlier appended merge made them), giving the new piece the next free id. Every old token
keeps its id and every old merge its rank, so text the new merges never touch encodes exactly as before,
and a model's existing embedding rows stay valid; only rows for the new ids need initialising
(:func:`lmforge.model.resize.resize_token_embeddings`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

from lmforge.tokenizer.core import Tokenizer


class ExtendError(ValueError):
    """A base tokenizer that cannot be extended this way."""


def _candidate_merges(
    base: dict, texts: Iterable[str], size: int, min_frequency: int
) -> list[tuple[str, str]]:
    """Merges, in rank order, of a BPE trained on ``texts`` with the base's normalizer and pre-tokenizer."""
    original = BackendTokenizer.from_str(json.dumps(base))
    candidate = BackendTokenizer(models.BPE())
    if original.normalizer is not None:
        candidate.normalizer = original.normalizer
    candidate.pre_tokenizer = original.pre_tokenizer
    byte_level = "ByteLevel" in json.dumps(base.get("pre_tokenizer"))
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
    )
    candidate.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(candidate.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def extend_tokenizer(
    base: Tokenizer, texts: Iterable[str], add: int, min_frequency: int = 2
) -> tuple[Tokenizer, list[str]]:
    """``base`` with up to ``add`` new pieces learned on ``texts``; returns it and the pieces added (fewer than
    ``add`` when the text supports no more)."""
    if add < 1:
        raise ExtendError(f"add: must be >= 1, got {add}")
    data = json.loads(base.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExtendError(f"only BPE tokenizers can be extended this way (this one is {model.get('type')})")
    vocab: dict[str, int] = model["vocab"]
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    next_id = max(taken) + 1
    texts = list(texts)
    # the candidate needs room for what the base already has plus the new pieces
    candidate_size = len(vocab) + 4 * add
    added: list[str] = []
    for left, right in _candidate_merges(data, texts, candidate_size, min_frequency):
        piece = left + right
        if piece in vocab or left not in vocab or right not in vocab:
            continue
        vocab[piece] = next_id
        model["merges"].append(f"{left} {right}" if string_merges else [left, right])
        added.append(piece)
        next_id += 1
        if len(added) == add:
            break
    backend = BackendTokenizer.from_str(json.dumps(data))
    extended = Tokenizer(
        backend,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        pad_token=base.pad_token,
        unk_token=base.unk_token,
        chat_template=base.chat_template,
        model_max_length=base.model_max_length,
        add_bos_token=base.add_bos_token,
    )
    return extended, added


def tokens_per_char(tok: Tokenizer, texts: Iterable[str]) -> float:
    """Tokens per character over ``texts`` (lower is better compression)."""
    texts = list(texts)
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens / chars if chars else 0.0
