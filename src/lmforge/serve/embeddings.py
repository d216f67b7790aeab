"""``/v1/embeddings``: normalised text embeddings from a model folder, in OpenAI's request/response shape.

The folder is an embedding model written by ``lmforge embed train`` (its ``embedding.json`` names the pooling)
or any model folder (mean pooling of the final hidden states). It is loaded on the first request, apart from
the generation engine's model: the engine's thread never shares a module with these forwards. Batches run
off the event loop. Each input may be a text or token ids; one that is empty or longer than the model's
context is refused with a 400 naming its index, before any work.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

from lmforge.serve.errors import APIError
from lmforge.serve.schemas import EmbeddingRequest


class EmbeddingService:
    def __init__(self, folder: str | Path, batch_size: int = 32, max_inputs: int = 2048) -> None:
        self.folder = Path(folder)
        self.batch_size = batch_size
        self.max_inputs = max_inputs
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from lmforge.tokenizer import load_tokenizer
                from lmforge.tune.embed import load_embedding_model

                try:
                    self._tokenizer = load_tokenizer(self.folder)
                    self._model = load_embedding_model(self.folder)
                except Exception as err:  # the served folder cannot embed: say why, every time, as a 503
                    raise APIError(
                        503,
                        f"embeddings are unavailable: {type(err).__name__}: {err}",
                        None,
                        "embeddings_unavailable",
                    ) from err
        return self._model, self._tokenizer

    def token_rows(self, req: EmbeddingRequest) -> list[tuple[int, ...]]:
        """Each input as the token ids the model embeds (checked; raises APIError 400)."""
        from lmforge.tune.embed import embedding_ids

        model, tokenizer = self._load()
        inputs = req.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # one text, or one token-id list
        if not inputs:
            raise APIError(400, "input: give at least one text", "input", "invalid_value")
        if len(inputs) > self.max_inputs:
            raise APIError(
                400, f"input: at most {self.max_inputs} inputs per request", "input", "invalid_value"
            )
        context = model.cfg.max_seq_len
        vocab = model.cfg.vocab_size
        rows = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                ids = tokenizer.encode(item)
            else:
                if any(t >= vocab for t in item):
                    raise APIError(
                        400, f"input[{index}]: token ids must be < {vocab}", "input", "invalid_value"
                    )
                ids = list(item)
            if not ids:
                raise APIError(400, f"input[{index}]: empty", "input", "invalid_value")
            if len(ids) + (model.pooling == "last") > context:
                raise APIError(
                    400,
                    f"input[{index}]: {len(ids)} tokens; this model embeds at most {context}",
                    "input",
                    "context_length_exceeded",
                )
            rows.append(embedding_ids(ids, context, model.pooling, tokenizer.eos_id))
        return rows

    def embed(self, rows: list[tuple[int, ...]]) -> list[list[float]]:
        """The normalised embeddings of token rows (blocking: call it from a worker thread)."""
        import torch

        from lmforge.tune.embed import pad_rows

        model, tokenizer = self._load()
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        out: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                ids, lengths = pad_rows(rows[start : start + self.batch_size], pad_id)
                out += model(ids, lengths).tolist()
        return out

    @property
    def dimensions(self) -> int:
        return self._load()[0].cfg.d_model


def embedding_response(
    model_id: str, vectors: list[list[float]], tokens: int, encoding: str
) -> dict[str, Any]:
    def encoded(vector: list[float]) -> list[float] | str:
        if encoding == "float":
            return vector
        import numpy as np

        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
        "model": model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
