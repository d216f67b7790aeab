"""The packed, resumable, rank-sharded loader over token shards.

How batches are made (all of it deterministic from the seed):

- Each domain is a stream: its documents in a seeded random order (a new order every epoch), back to back.
  A training sequence is ``seq_len + 1`` consecutive stream tokens (inputs and next-token labels), and the
  next sequence of that domain starts ``seq_len`` tokens later, so every token is an input once and a label
  once per epoch; the tail that does not fill a sequence is dropped at the end of an epoch.
- A global batch has ``batch_size * world_size`` slots. For each slot a domain is drawn from the mixture
  weights with one RNG that every rank runs identically; slot ``g`` belongs to rank ``g % world_size``.
  So ranks see disjoint sequences, and every rank holds the same loader state (stream cursors, epochs,
  RNG): resuming, even with another world size, continues the same global stream.
- With ``document_masking`` the batch also carries ``segment_ids`` (one id per document piece in the row)
  and ``position_ids`` that restart at 0 at each document start; the model then keeps attention inside a
  segment. The EOS ending a document still predicts the first token of the next one (EOS doubles as BOS).
- With a curriculum the loader follows it by itself: before each batch it moves to the stage that owns
  the next token, counting the input tokens it has served to all ranks (``auto_stage=False`` leaves the
  switching to :meth:`PackedLoader.set_stage`). Stream positions are kept across stages.
- A validation split holds out a seeded random ``val_fraction`` of each domain's documents (chosen with
  ``split_seed``, independent of the training seed); train and val never share a document.

Batches are dicts of ``torch.long`` tensors ``[batch_size, seq_len]``: ``input_ids``, ``labels``, and with
document masking ``position_ids`` and ``segment_ids``; with ``return_domain_ids`` also ``domain_ids``
``[batch_size]`` (index into ``loader.domains``, for per-domain losses such as DoReMi's).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import check_choice, check_range
from lmforge.shards.curriculum import Curriculum, CurriculumStage
from lmforge.shards.format import ShardsError, TokenShards
from lmforge.shards.mixture import MixtureConfig, mixture_weights

SPLITS = ("train", "val")


@dataclass
class DataConfig:
    """The data section of a training recipe."""

    shards: list[str] = field(default_factory=list)  # shards folders (``lmforge shards tokenize`` outputs)
    seq_len: int = 1024
    document_masking: bool = False
    seed: int = 0
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    curriculum: list[CurriculumStage] = field(default_factory=list)  # empty: one stage, ``mixture``
    val_fraction: float = 0.0  # share of documents held out for validation
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        check_range("seed", self.seed, low=0)  # numpy seeds are non-negative
        check_range("split_seed", self.split_seed, low=0)


class _DomainStream:
    """One domain's documents, reordered every epoch, read as a single token stream."""

    def __init__(self, name: str, docs: np.ndarray, lengths: np.ndarray, seed: int, shuffle: bool) -> None:
        self.name = name
        self.docs = docs  # document ids of this split
        self.lengths = lengths  # length of every document of the domain, indexed by id
        self.tokens = int(lengths[docs].sum())
        self.seed = seed
        self.shuffle = shuffle
        self._key = zlib.crc32(name.encode("utf-8"))
        self.epoch = 0
        self.cursor = 0
        self.exhausted = False
        self._ordered_epoch = -1

    def _ensure_order(self) -> None:
        if self._ordered_epoch == self.epoch:
            return
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self._key, self.epoch])
            self.order = self.docs[rng.permutation(len(self.docs))]
        else:
            self.order = self.docs
        self.starts = np.zeros(len(self.order) + 1, dtype=np.int64)
        np.cumsum(self.lengths[self.order], out=self.starts[1:])
        self._ordered_epoch = self.epoch

    def claim(self, seq_len: int, max_epochs: int | None) -> int | None:
        """Reserve the next window of ``seq_len + 1`` tokens; its start in this epoch's order, or None once
        ``max_epochs`` epochs are done."""
        if self.tokens < seq_len + 1:
            raise ShardsError(
                f"domain {self.name!r} has {self.tokens} tokens, too few for one sequence of {seq_len} + 1"
            )
        while True:
            if max_epochs is not None and self.epoch >= max_epochs:
                self.exhausted = True
                return None
            self._ensure_order()
            if self.cursor + seq_len + 1 <= self.starts[-1]:
                start = self.cursor
                self.cursor += seq_len
                return start
            self.epoch += 1
            self.cursor = 0

    def pieces(self, start: int, length: int) -> list[tuple[int, int, int]]:
        """``(doc, begin, end)`` slices covering stream tokens ``start:start + length`` (current epoch)."""
        out = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        stop = start + length
        while pos < stop:
            doc_begin, doc_end = int(self.starts[i]), int(self.starts[i + 1])
            end = min(stop, doc_end)
            if end > pos:
                out.append((int(self.order[i]), pos - doc_begin, end - doc_begin))
            pos = end
            i += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "exhausted": self.exhausted}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.exhausted = bool(state["exhausted"])


class PackedLoader:
    """Packed next-token batches from token shards; an endless iterator unless ``num_epochs`` is set."""

    def __init__(
        self,
        shards_dir: str | Path | list[str] | list[Path],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        document_masking: bool = False,
        mixture: MixtureConfig | None = None,
        curriculum: Curriculum | None = None,
        split: str = "train",
        val_fraction: float = 0.0,
        split_seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        tokenizer_sha256: str | None = None,
        return_domain_ids: bool = False,
        auto_stage: bool = True,
    ) -> None:
        check_choice("split", split, SPLITS)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if split == "val" and val_fraction <= 0:
            raise ValueError("split='val' needs val_fraction > 0")
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        self.shards = TokenShards(shards_dir, tokenizer_sha256=tokenizer_sha256)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.document_masking = document_masking
        self.return_domain_ids = return_domain_ids
        self.split = split
        self.num_epochs = num_epochs
        self.curriculum = curriculum
        self.auto_stage = auto_stage
        self.tokens_served = 0  # input tokens of every sequence handed out so far, all ranks
        self.domains = self.shards.domains
        self._streams = {
            d: _DomainStream(
                d,
                self._split_docs(d, split, val_fraction, split_seed),
                self.shards.doc_lengths(d),
                seed,
                shuffle,
            )
            for d in self.domains
        }
        self._rng = np.random.default_rng([seed, 0x6D6978])  # shared by all ranks: the mixture draws
        self.samples_drawn = dict.fromkeys(self.domains, 0)  # global, all ranks
        self.stage = 0
        if curriculum is not None:
            self.set_stage(0)
        else:
            self.set_mixture(mixture or MixtureConfig())

    def _split_docs(self, domain: str, split: str, val_fraction: float, split_seed: int) -> np.ndarray:
        n = self.shards.num_docs(domain)
        if val_fraction <= 0:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([split_seed, zlib.crc32(domain.encode("utf-8"))])
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        perm = rng.permutation(n)
        return np.sort(perm[:n_val] if split == "val" else perm[n_val:]).astype(np.int64)

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        tokenizer_sha256: str | None = None,
        one_pass: bool | None = None,
        return_domain_ids: bool = False,
    ) -> PackedLoader:
        """The loader a data config describes. Training split: endless, shuffled, with the curriculum; val
        split (or ``one_pass=True``): one ordered pass over the documents, the config's mixture only."""
        one_pass = split == "val" if one_pass is None else one_pass
        return cls(
            cfg.shards,
            seq_len=cfg.seq_len,
            batch_size=batch_size,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            document_masking=cfg.document_masking,
            mixture=cfg.mixture,
            curriculum=Curriculum(cfg.curriculum) if cfg.curriculum and not one_pass else None,
            split=split,
            val_fraction=cfg.val_fraction,
            split_seed=cfg.split_seed,
            shuffle=not one_pass,
            num_epochs=1 if one_pass else None,
            tokenizer_sha256=tokenizer_sha256,
            return_domain_ids=return_domain_ids,
        )

    # -- mixture and curriculum --------------------------------------------------------------------------------
    @property
    def domain_tokens(self) -> dict[str, int]:
        """Tokens of each domain in this loader's split."""
        return {d: s.tokens for d, s in self._streams.items()}

    def set_mixture(self, mixture: MixtureConfig) -> None:
        tokens = self.domain_tokens
        self.mixture = mixture
        self.weights = mixture_weights(mixture, tokens)
        self._active: list[str] | None = None
        too_small = [d for d, w in self.weights.items() if w > 0 and tokens[d] < self.seq_len + 1]
        if too_small and (
            self.num_epochs is None or len(too_small) == sum(w > 0 for w in self.weights.values())
        ):
            raise ShardsError(
                f"domain(s) {too_small} ({self.split} split) have too few tokens for one sequence of "
                f"{self.seq_len} + 1 ({', '.join(str(tokens[d]) for d in too_small)}); give them weight 0 "
                "or use a shorter seq_len"
            )
        # A finite pass (validation) just has nothing to read from a domain smaller than one sequence.
        for domain in too_small:
            self._streams[domain].exhausted = True

    def set_stage(self, index: int) -> None:
        """Switch to curriculum stage ``index``: its mixture and sequence length (stream positions are kept,
        so no data is repeated across stages)."""
        if self.curriculum is None:
            raise ValueError("this loader has no curriculum")
        stage = self.curriculum.stages[index]
        self.stage = index
        if stage.seq_len:
            self.seq_len = stage.seq_len
        self.set_mixture(stage.mixture)

    def realised_proportions(self) -> dict[str, float]:
        """Share of the sequences drawn so far (all ranks) that came from each domain."""
        total = sum(self.samples_drawn.values())
        return {d: (n / total if total else 0.0) for d, n in self.samples_drawn.items()}

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one batch of this rank."""
        return self.batch_size * self.seq_len

    # -- iteration ----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def _draw_domain(self) -> str | None:
        if self._active is None:  # recomputed only when the weights change or a domain runs out
            self._active = [
                d for d in self.domains if self.weights.get(d, 0.0) > 0 and not self._streams[d].exhausted
            ]
            probs = np.array([self.weights[d] for d in self._active])
            self._cumulative = np.cumsum(probs / probs.sum()) if self._active else probs
        if not self._active:
            return None
        pick = int(np.searchsorted(self._cumulative, self._rng.random(), side="right"))
        return self._active[min(pick, len(self._active) - 1)]

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.curriculum is not None and self.auto_stage:
            stage = self.curriculum.stage_at(self.tokens_served)
            if stage != self.stage:
                self.set_stage(stage)
        rows = self._claim_slots(self.batch_size * self.world_size, materialise=True)
        if not rows:
            raise StopIteration
        return self._collate(rows)

    def _claim_slots(self, slots: int, materialise: bool) -> list[tuple[str, list[tuple[int, int, int]]]]:
        """Advance the global stream by ``slots`` sequences; this rank's rows (as document pieces)."""
        rows: list[tuple[str, list[tuple[int, int, int]]]] = []
        for slot in range(slots):
            while True:
                domain = self._draw_domain()
                if domain is None:
                    break
                start = self._streams[domain].claim(self.seq_len, self.num_epochs)
                if start is not None:
                    break
                self._active = None  # that domain is exhausted
            if domain is None:
                break
            self.samples_drawn[domain] += 1
            self.tokens_served += self.seq_len
            if materialise and slot % self.world_size == self.rank:
                rows.append((domain, self._streams[domain].pieces(start, self.seq_len + 1)))
        return rows

    def simulate(self, sequences: int) -> dict[str, float]:
        """Draw ``sequences`` sequences without reading tokens (a dry run that moves the loader on) and
        return the share each domain got in this run."""
        before = dict(self.samples_drawn)
        self._claim_slots(sequences, materialise=False)
        drawn = {d: self.samples_drawn[d] - before[d] for d in self.domains}
        total = sum(drawn.values())
        return {d: (n / total if total else 0.0) for d, n in drawn.items()}

    def _collate(self, rows: list[tuple[str, list[tuple[int, int, int]]]]) -> dict[str, torch.Tensor]:
        length = self.seq_len + 1
        tokens = np.empty((len(rows), length), dtype=np.int64)
        segments = np.empty((len(rows), length), dtype=np.int64)
        positions = np.empty((len(rows), length), dtype=np.int64)
        for r, (domain, pieces) in enumerate(rows):
            offset = 0
            for doc, begin, end in pieces:
                tokens[r, offset : offset + end - begin] = self.shards.read(domain, doc, begin, end)
                offset += end - begin
            if self.document_masking:
                # one segment per piece; positions count from each piece's first token
                lengths = np.array([end - begin for _, begin, end in pieces])
                segments[r] = np.repeat(np.arange(len(pieces)), lengths)
                positions[r] = np.arange(length) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        batch = {
            "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
            "labels": torch.from_numpy(tokens[:, 1:].copy()),
        }
        if self.return_domain_ids:
            batch["domain_ids"] = torch.tensor([self.domains.index(d) for d, _ in rows], dtype=torch.long)
        if self.document_masking:
            batch["position_ids"] = torch.from_numpy(positions[:, :-1].copy())
            batch["segment_ids"] = torch.from_numpy(segments[:, :-1].copy())
        return batch

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the very next batch (identical on every rank)."""
        return {
            "version": 1,
            "seed": self.seed,
            "split": self.split,
            "domains": list(self.domains),
            "stage": self.stage,
            "seq_len": self.seq_len,
            "tokens_served": self.tokens_served,
            "streams": {d: s.state() for d, s in self._streams.items()},
            "samples_drawn": dict(self.samples_drawn),
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        if list(state["domains"]) != list(self.domains):
            raise ValueError(f"loader state has domains {state['domains']}, the shards have {self.domains}")
        if self.curriculum is not None:
            self.set_stage(int(state["stage"]))
        self.seq_len = int(state["seq_len"])
        self.tokens_served = int(state["tokens_served"])
        for domain, stream_state in state["streams"].items():
            self._streams[domain].load(stream_state)
        self.samples_drawn = {d: int(n) for d, n in state["samples_drawn"].items()}
        self._active = None
        self._rng.bit_generator.state = state["rng"]


def mixture_report(cfg: DataConfig, sequences: int = 10_000) -> list[dict[str, Any]]:
    """For each curriculum stage (or the one mixture): each domain's tokens, its target weight, and the
    share of ``sequences`` sequences the loader's own sampling gives it."""
    loader = PackedLoader.from_config(cfg, batch_size=1)
    stages = loader.curriculum.stages if loader.curriculum is not None else [None]
    report = []
    for index, stage in enumerate(stages):
        if stage is not None:
            loader.set_stage(index)
        realised = loader.simulate(sequences)
        report.append(
            {
                "stage": stage.name if stage is not None else "(no curriculum)",
                "tokens_budget": stage.tokens if stage is not None else 0,
                "seq_len": loader.seq_len,
                "domains": {
                    d: {
                        "tokens": loader.domain_tokens[d],
                        "weight": loader.weights[d],
                        "realised": realised[d],
                    }
                    for d in loader.domains
                },
            }
        )
    return report
