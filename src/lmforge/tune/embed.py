"""``lmforge embed``: contrastive text and code embeddings (InfoNCE with in-batch negatives).

Following Neelakantan et al. 2022 ("Text and Code Embeddings by Contrastive Pre-Training", cpt-text/code),
a pair ``(x, y)`` -- a query and a relevant text, or a docstring and its code -- is encoded by the same
Transformer; each side is pooled to one vector (``mean`` over its tokens, or ``last``: the final hidden
state of the EOS token appended to the text) and L2-normalised. In a batch of ``N`` pairs the logits are
``cos(x_i, y_j) / tau`` and the loss per pair is the cross-entropy of the right ``j = i`` against the other
``N - 1`` documents of the batch (in-batch negatives); ``symmetric`` averages it with the same loss in the
``y -> x`` direction, as the paper does. ``tau`` is fixed (``learn_temperature: false``) or learned through
``log(1 / tau)`` (initialised from ``temperature``, clamped at ``1 / tau <= 100`` as in CLIP).

Training is the one trainer with :class:`InfoNCEObjective` (unit: pairs). Negatives come from the same
micro-batch only, so ``batch.micro_batch_size`` is the number of negatives + 1: gradient accumulation does
not add negatives. Duplicate texts inside a batch count as false negatives; the data should not have them.

The recipe is a :class:`~lmforge.train.TrainConfig` plus an ``embed`` section:

.. code-block:: yaml

    init_from: runs/base/model
    run_dir: runs/embed
    data: {seq_len: 256}          # each side is cut to this many tokens
    batch: {micro_batch_size: 64} # pairs per batch = 63 negatives per query
    embed:
      paths: [pairs/train.jsonl]  # {"query": ..., "document": ...} (keys: query_key / doc_key)
      val_paths: [pairs/heldout.jsonl]
      query_key: docstring
      doc_key: code
      pooling: mean               # or last
      temperature: 0.05
      learn_temperature: true

The run exports ``RUN/model`` (the backbone as a model folder, with its LM head as it was, plus
``embedding.json``: pooling and temperature) that :func:`load_embedding_model` reads; held-out pairs are
scored with retrieval MRR@10 (:func:`mrr_at_k`: each query against all held-out documents).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import check_choice
from lmforge.data.io import Reject
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig
from lmforge.train.objective import Batch, ObjectiveOutput
from lmforge.tune.preference import read_records, reason_kind, write_rejects
from lmforge.tune.run import run_copy
from lmforge.tune.sft import EpochBatches

POOLINGS = ("mean", "last")
MAX_LOGIT_SCALE = math.log(100.0)


def info_nce_loss(queries: Tensor, documents: Tensor, logit_scale: Tensor, symmetric: bool = True) -> Tensor:
    """Per pair ``i``: ``-log softmax_j(s * cos(q_i, d_j))[i]`` (averaged with the ``d -> q`` direction when
    ``symmetric``), where ``s = exp(logit_scale) = 1 / tau``. Inputs are (N, dim), any norm."""
    q, d = F.normalize(queries.float(), dim=-1), F.normalize(documents.float(), dim=-1)
    logits = logit_scale.exp() * q @ d.T
    target = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target, reduction="none")) / 2
    return loss


def mrr_at_k(queries: Tensor, documents: Tensor, k: int = 10) -> float:
    """Mean reciprocal rank of document ``i`` for query ``i`` among all documents by cosine similarity;
    ranks beyond ``k`` score 0. The rank is 1 + the number of documents scored strictly higher (a tie with
    the right document does not push it down)."""
    q, d = F.normalize(queries.float(), dim=-1), F.normalize(documents.float(), dim=-1)
    scores = q @ d.T
    right = scores.diagonal()
    rank = 1 + (scores > right[:, None]).sum(dim=1)
    reciprocal = torch.where(rank <= k, 1.0 / rank.float(), torch.zeros_like(right))
    return float(reciprocal.mean())


def pool(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """One vector per right-padded row: the mean of its first ``lengths`` states, or the last of them."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(dim=1) / lengths[:, None].to(hidden.dtype)


class EmbeddingModel(nn.Module):
    """A Transformer body (final hidden states, its LM head set aside) pooled to normalised vectors, and the
    InfoNCE temperature as ``logit_scale = log(1 / tau)`` (a parameter only when it is learned)."""

    def __init__(
        self, backbone: Transformer, pooling: str = "mean", temperature: float = 0.05, learn: bool = True
    ) -> None:
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        self._lm_head = [backbone.lm_head]  # kept out of the module tree: not trained, put back on export
        backbone.lm_head = None
        self.backbone = backbone
        self.pooling = pooling
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)

    @property
    def cfg(self) -> ModelConfig:  # the trainer reads it
        return self.backbone.cfg

    @property
    def blocks(self) -> nn.ModuleDict:  # the trainer wraps these (FSDP, activation checkpointing)
        return self.backbone.blocks

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """L2-normalised embeddings (batch, d_model) in fp32 of right-padded rows."""
        hidden = self.backbone(input_ids).logits
        return F.normalize(pool(hidden, lengths, self.pooling).float(), dim=-1)

    def language_model(self) -> Transformer:
        """The backbone with its LM head back in place (the head is tied again if the config ties it)."""
        self.backbone.lm_head = self._lm_head[0]
        self.backbone.tie_weights()
        return self.backbone


class InfoNCEObjective:
    """InfoNCE over the batch's pairs with in-batch negatives; units are pairs. Reported sums: ``accuracy``
    (the right document is the query's most similar one in the batch) and ``temperature``."""

    name = "info_nce"

    def __init__(self, symmetric: bool = True) -> None:
        self.symmetric = symmetric

    def count(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0]) // 2

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        inner = getattr(model, "module", model)  # DDP wraps the module
        n = self.count(batch)
        embeddings = model(batch["input_ids"], batch["lengths"])
        queries, documents = embeddings[:n], embeddings[n:]
        scale = inner.scale()
        loss = info_nce_loss(queries, documents, scale, self.symmetric)
        with torch.no_grad():
            hits = (
                (queries @ documents.T).argmax(dim=1) == torch.arange(len(queries), device=queries.device)
            ).sum()
            temperature = (-scale).exp() * len(queries)
        return ObjectiveOutput(
            loss_sum=loss.sum(),
            count=self.count(batch),
            sums={"accuracy": hits.float(), "temperature": temperature.detach().float()},
        )


# -- data ------------------------------------------------------------------------------------------------------


def encode_text(tokenizer: Tokenizer, text: str, max_len: int, pooling: str) -> tuple[int, ...]:
    """Token ids of one side, cut to ``max_len``; ``last`` pooling ends on EOS (kept when cutting)."""
    return embedding_ids(tokenizer.encode(text), max_len, pooling, tokenizer.eos_id)


def embedding_ids(ids: Sequence[int], max_len: int, pooling: str, eos_id: int | None) -> tuple[int, ...]:
    """The row a model embeds for token ids: cut to ``max_len``, ending on EOS for ``last`` pooling."""
    if pooling == "last":
        if eos_id is None:
            raise ValueError("last-token pooling needs a tokenizer with an EOS token")
        return (*ids[: max_len - 1], eos_id)
    return tuple(ids[:max_len])


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "truncated": self.truncated,
            "rejected": dict(sorted(self.rejected.items())),
        }


def record_to_pair(
    record: dict[str, Any], tokenizer: Tokenizer, max_len: int, pooling: str, query_key: str, doc_key: str
) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Encoded (query, document) of one record and whether a side was cut; ``ValueError`` says what is wrong."""
    sides = []
    for key in (query_key, doc_key):
        text = record.get(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"missing_text: {key!r} must be a non-empty string")
        sides.append(text)
    query, doc = (encode_text(tokenizer, t, max_len, pooling) for t in sides)
    if not query or not doc:
        raise ValueError("empty_encoding: a side has no tokens")
    cut = any(len(tokenizer.encode(t)) + (pooling == "last") > max_len for t in sides)
    return query, doc, cut


def load_pairs(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    max_len: int,
    pooling: str,
    query_key: str,
    doc_key: str,
    stats: PairStats,
    rejects_path: str | Path | None = None,
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Encoded pairs of ``paths``; bad records are counted and written to ``rejects_path``."""
    pairs, rejects = [], []
    for item in read_records(list(paths)):
        if isinstance(item, Reject):
            stats.rejected[reason_kind(item.reason)] += 1
            rejects.append({"where": item.where, "reason": item.reason, "record": item.preview})
            continue
        where, record = item
        try:
            query, doc, cut = record_to_pair(record, tokenizer, max_len, pooling, query_key, doc_key)
        except ValueError as err:
            stats.rejected[reason_kind(str(err))] += 1
            rejects.append({"where": where, "reason": str(err), "record": record})
            continue
        pairs.append((query, doc))
        stats.pairs += 1
        stats.truncated += cut
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
    return pairs


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``(ids, lengths)``."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


class PairDataSource(EpochBatches):
    """Endless, shuffled, resumable batches of ``batch_size`` pairs (a short last batch is dropped when
    shuffling: a batch of one pair has no negatives)."""

    def __init__(
        self,
        pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
    ) -> None:
        if len(pairs) < 2:
            raise ValueError("embedding training needs at least two pairs (in-batch negatives)")
        self.pairs = list(pairs)
        self.batch_size = min(batch_size, len(self.pairs))
        self.pad_id = pad_id
        self.seed = seed
        self._start()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        full = len(order) - len(order) % self.batch_size
        return [order[b : b + self.batch_size] for b in range(0, full, self.batch_size)]

    def make_batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return collate_pairs([self.pairs[i] for i in indices], self.pad_id)

    def one_pass(self) -> Iterator[dict[str, Tensor]]:
        for b in range(0, len(self.pairs), self.batch_size):
            yield collate_pairs(self.pairs[b : b + self.batch_size], self.pad_id)


def collate_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, Tensor]:
    """One right-padded ``input_ids`` block: rows ``0..N-1`` the queries, rows ``N..2N-1`` their documents,
    with ``lengths`` per row (one forward pass encodes both sides)."""
    input_ids, lengths = pad_rows([q for q, _ in pairs] + [d for _, d in pairs], pad_id)
    return {"input_ids": input_ids, "lengths": lengths}


# -- encoding and evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def encode(
    model: EmbeddingModel,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    max_len: int = 512,
    batch_size: int = 32,
) -> Tensor:
    """Normalised embeddings (len(texts), d_model) of ``texts``, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    out = []
    for b in range(0, len(texts), batch_size):
        rows = [
            encode_text(tokenizer, t, max_len, model.pooling) or (pad_id,) for t in texts[b : b + batch_size]
        ]
        ids, lengths = pad_rows(rows, pad_id)
        out.append(model(ids.to(device), lengths.to(device)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.cfg.d_model)


@torch.no_grad()
def pair_mrr(model: EmbeddingModel, source: PairDataSource, k: int = 10) -> float:
    """MRR@k of each held-out query against all held-out documents."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    queries, documents = [], []
    for batch in source.one_pass():
        n = batch["input_ids"].shape[0] // 2
        embeddings = model(batch["input_ids"].to(device), batch["lengths"].to(device)).cpu()
        queries.append(embeddings[:n])
        documents.append(embeddings[n:])
    model.train(was_training)
    return mrr_at_k(torch.cat(queries), torch.cat(documents), k)


def save_embedding_model(model: EmbeddingModel, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """A model folder (the backbone with its LM head) plus ``embedding.json`` (pooling, temperature)."""
    from lmforge.model.hf import save_pretrained

    folder = Path(folder)
    lm = model.language_model()
    try:
        save_pretrained(lm, folder)
    finally:
        model.backbone.lm_head = None
    tokenizer.save(folder)
    info = {"pooling": model.pooling, "temperature": float((-model.scale().detach()).exp())}
    (folder / "embedding.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return folder


def load_embedding_model(folder: str | Path, device: torch.device | str = "cpu") -> EmbeddingModel:
    """What :func:`save_embedding_model` wrote; a plain model folder is read with mean pooling."""
    from lmforge.model import load_pretrained

    path = Path(folder) / "embedding.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"pooling": "mean"}
    model = EmbeddingModel(
        load_pretrained(folder, device=device), info["pooling"], info.get("temperature", 0.05)
    )
    return model.eval()


# -- the recipe ------------------------------------------------------------------------------------------------


@dataclass
class EmbedDataConfig:
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    query_key: str = "query"
    doc_key: str = "document"
    pooling: str = "mean"
    temperature: float = 0.05
    learn_temperature: bool = True
    symmetric: bool = True

    def __post_init__(self) -> None:
        check_choice("embed.pooling", self.pooling, POOLINGS)
        if self.temperature <= 0:
            raise ValueError(f"embed.temperature: must be > 0, got {self.temperature}")


@dataclass
class EmbedConfig(TrainConfig):
    embed: EmbedDataConfig = field(default_factory=EmbedDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.embed.paths:
            raise ValueError("embed.paths: at least one file of text pairs is required")
        if not self.init_from:
            raise ValueError("init_from: the model folder to start the embedding model from is required")


def run_embed(cfg: EmbedConfig, progress: bool = True) -> dict[str, Any]:
    """Train an embedding model from ``cfg.init_from``; returns a summary (data, held-out MRR@10)."""
    from lmforge.model import load_pretrained
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.trainer import Trainer

    assert cfg.init_from is not None
    export = cfg.checkpoint.export
    cfg = run_copy(cfg, progress, checkpoint=dataclasses.replace(cfg.checkpoint, export=False))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    e = cfg.embed
    tokenizer = load_tokenizer(cfg.tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    stats = PairStats()
    args = (tokenizer, cfg.data.seq_len, e.pooling, e.query_key, e.doc_key)
    train = PairDataSource(
        load_pairs(e.paths, *args, stats, run_dir / "rejects.jsonl"),
        cfg.batch.micro_batch_size,
        pad_id,
        seed=cfg.data.seed,
    )
    summary: dict[str, Any] = {"data": {"train": stats.to_dict()}}
    val = None
    if e.val_paths:
        val_stats = PairStats()
        val = PairDataSource(
            load_pairs(e.val_paths, *args, val_stats, run_dir / "val_rejects.jsonl"),
            cfg.batch.micro_batch_size,
            pad_id,
        )
        summary["data"]["val"] = val_stats.to_dict()
    model = EmbeddingModel(load_pretrained(cfg.init_from), e.pooling, e.temperature, e.learn_temperature)
    if val is not None:
        summary["heldout_mrr@10_before"] = pair_mrr(model, val)
    trainer = Trainer(
        cfg, model, InfoNCEObjective(e.symmetric), train, val.one_pass if val is not None else None
    )
    result = trainer.fit()
    trained: EmbeddingModel = trainer.model  # type: ignore[assignment]
    summary.update(run_dir=str(result.run_dir), step=result.step, loss=result.metrics.get("loss"))
    summary["val_loss"] = result.val_loss
    summary["temperature"] = float((-trained.scale().detach()).exp())
    if val is not None:
        summary["heldout_mrr@10"] = pair_mrr(trained, val)
    if export and trainer.env.is_main:
        summary["model_dir"] = str(save_embedding_model(trained, tokenizer, run_dir / "model"))
    (run_dir / "embed_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
