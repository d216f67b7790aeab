"""Soft prompts: prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021).

``num_virtual_tokens`` learned embeddings are put before every sequence's token embeddings; the model stays
frozen. Prompt tuning learns the embeddings directly (initialised at random, or from the embeddings of a text
repeated to length); P-tuning produces them with a small encoder (an MLP, or a bidirectional LSTM and an MLP)
over learned inputs, and needs the encoder only while training: what peft saves, ``prompt_embeddings``
(n, d_model), is the prompt itself, so a loaded prompt has no encoder.

The prompt goes in through hooks on the Transformer: before the forward, the token ids become embeddings with the
prompt in front (the Transformer takes floating-point input as token embeddings) and positions, segments and
prefix lengths shift by n; after it, the n prompt positions are dropped from the logits, so losses, labels and
callers see the sequence they passed. With a KV cache the prompt goes in on the first call only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.model import Transformer
from lmforge.model.transformer import ModelOutput

# Transformer.forward's arguments in order: a hook sees some of them positional
FORWARD_ARGS = ("input_ids", "position_ids", "segment_ids", "prefix_lengths", "cache")


class _LSTMEncoder(nn.Module):
    def __init__(self, dim: int, hidden: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(
            dim, hidden, num_layers, dropout=dropout, bidirectional=True, batch_first=True
        )
        self.mlp_head = nn.Sequential(
            nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_head(self.lstm_head(x[None])[0][0])


class SoftPrompt(nn.Module):
    """The n virtual token embeddings: ``embedding.weight`` itself, or an encoder's output over it (P-tuning).

    encoder: None (prompt tuning), "MLP" or "LSTM" (peft's encoder_reparameterization_type)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        dim: int,
        encoder: str | None = None,
        hidden: int | None = None,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, dim)
        hidden = hidden or dim
        self.encoder: nn.Module | None = None
        if encoder == "MLP":
            self.encoder = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )
        elif encoder == "LSTM":
            self.encoder = _LSTMEncoder(dim, hidden, num_layers, dropout)
        self.prepended = 0  # virtual tokens put before the current forward's input (0: none)

    def forward(self) -> Tensor:
        prompt = self.embedding.weight
        return prompt if self.encoder is None else self.encoder(prompt)

    @torch.no_grad()
    def init_from_text(self, token_embeddings: nn.Embedding, token_ids: list[int]) -> None:
        """Start from the embeddings of ``token_ids``, truncated or repeated to the prompt's length (peft's rule)."""
        n = self.embedding.num_embeddings
        ids = (token_ids * math.ceil(n / len(token_ids)))[:n]
        weight = token_embeddings.weight
        self.embedding.weight.copy_(weight[torch.tensor(ids, device=weight.device)])


def _prepend_prompt(model: Transformer, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    inputs = dict(zip(FORWARD_ARGS, args)) | kwargs
    prompt: SoftPrompt = model.prompt_encoder
    cache = inputs.get("cache")
    ids = inputs["input_ids"]
    prompt.prepended = 0
    if cache is not None and not hasattr(cache, "lengths"):
        raise ValueError(
            "soft prompts: the KV cache has no lengths(), so the prompt cannot be put first in it"
        )
    if cache is not None and int(cache.lengths().max()) > 0:
        return (), inputs  # the prompt went in on the cache's first call
    if model.embed_tokens is None or ids.is_floating_point():
        return (), inputs  # embeddings given, or a pipeline stage without the embedding
    batch = ids.shape[0]
    virtual = prompt()
    n = virtual.shape[0]
    embeds = model.embed_tokens(ids)
    inputs["input_ids"] = torch.cat([virtual.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
    ahead = torch.arange(n, device=ids.device).expand(batch, n)
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = torch.cat([ahead, inputs["position_ids"] + n], dim=1)
    segments = inputs.get("segment_ids")
    if segments is not None:
        if int(segments.max()) > 1:
            raise ValueError(
                "soft prompts: rows packed with several documents are not supported (sft.pack=false)"
            )
        inputs["segment_ids"] = torch.cat([torch.ones_like(ahead), segments], dim=1)
    if inputs.get("prefix_lengths") is not None:
        inputs["prefix_lengths"] = inputs["prefix_lengths"] + n
    prompt.prepended = n
    return (), inputs


def _drop_prompt_logits(model: Transformer, args: tuple, output: ModelOutput) -> ModelOutput:
    n = model.prompt_encoder.prepended
    return output if n == 0 else ModelOutput(logits=output.logits[:, n:], aux_loss=output.aux_loss)


def attach_prompt(model: Transformer, prompt: SoftPrompt) -> None:
    """Give ``model`` the soft prompt (as ``model.prompt_encoder``) and the hooks that put it in front."""
    model.prompt_encoder = prompt
    model.register_forward_pre_hook(_prepend_prompt, with_kwargs=True)
    model.register_forward_hook(_drop_prompt_logits)
