"""Grow a model's vocabulary to an extended tokenizer's: new embedding and output rows, old rows untouched.

Initialisation of the new rows (``init``):

- ``subtoken`` (default): the mean of the old rows of the pieces the *old* tokenizer splits the new piece
  into (the new piece's bytes, run through the old BPE model), so a new token starts where its spelling
  pointed before;
- ``mean``: the mean of all old rows (Hewitt, "Initializing new word embeddings for pretrained language
  models": keeps the new tokens' logits close to the average instead of random).

A tied head follows the embedding; an untied head gets the same treatment on its own rows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

INITS = ("subtoken", "mean")


def _old_pieces(old: Tokenizer, new: Tokenizer, token_id: int) -> list[int]:
    """Old ids that the old tokenizer's model gives the new token's (pre-tokenized) string."""
    piece = new.id_to_token(token_id)
    if piece is None:
        return []
    return [t.id for t in old.backend.model.tokenize(piece)]


def _grow(weight: torch.Tensor, rows: int, sources: list[list[int]], init: str) -> torch.Tensor:
    grown = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    old_rows = weight.shape[0]
    grown[:old_rows] = weight
    mean = weight.mean(dim=0)
    for offset, ids in enumerate(sources):
        usable = [i for i in ids if i < old_rows]
        grown[old_rows + offset] = weight[usable].mean(dim=0) if init == "subtoken" and usable else mean
    return grown


@torch.no_grad()
def resize_token_embeddings(
    model: Transformer, old: Tokenizer, new: Tokenizer, init: str = "subtoken"
) -> Transformer:
    """Grow ``model`` (in place) from ``old``'s vocabulary to ``new``'s; returns it."""
    if init not in INITS:
        raise ValueError(f"init: {init!r} is not one of {', '.join(INITS)}")
    old_rows = model.cfg.vocab_size
    rows = max(new.vocab_size, old_rows)
    for token, token_id in old.backend.get_vocab(with_added_tokens=True).items():
        if new.token_to_id(token) != token_id:
            raise ValueError(f"the new tokenizer moves old token {token!r} (id {token_id}): not an extension")
    if rows == old_rows:
        return model
    sources = [_old_pieces(old, new, i) for i in range(old_rows, rows)]
    embed = model.embed_tokens
    assert embed is not None and model.lm_head is not None
    model.embed_tokens = nn.Embedding.from_pretrained(_grow(embed.weight, rows, sources, init), freeze=False)
    if model.cfg.tie_embeddings:
        model.lm_head = nn.Linear(model.cfg.d_model, rows, bias=False, device=embed.weight.device)
    else:
        head = nn.Linear(
            model.cfg.d_model, rows, bias=False, device=embed.weight.device, dtype=embed.weight.dtype
        )
        head.weight.copy_(_grow(model.lm_head.weight, rows, sources, init))
        model.lm_head = head
    model.cfg = dataclasses.replace(model.cfg, vocab_size=rows)
    model.tie_weights()
    return model
