"""Preference data for reward models and DPO: pairs and rankings, chat-templated, in groups that stay together.

Records (JSONL, .jsonl.gz/.zst or Parquet, read through :mod:`lmforge.data.io`):

* pairs, trl's layout: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the prompt may instead be
  ``"messages"`` (a conversation ending on a user turn) or a list of messages, and ``chosen``/``rejected``
  may be lists of assistant messages (trl's conversational form);
* rankings (InstructGPT): ``{"prompt": ..., "responses": [r1, ..., rK], "ranking": [...]}`` where
  ``ranking[i]`` is the rank of ``responses[i]`` (0 = best; ties allowed). Every one of the C(K,2) pairs
  with distinct ranks is kept, and all of them in the same batch, so each response is encoded and run once.

Each response becomes one sequence: the prompt rendered with the tokenizer's chat template, then the
assistant turn up to and including its EOS (the template's trailing text after EOS is dropped, so the last
token of every sequence is where a reward model reads its score). ``response[i]`` marks the tokens that
belong to the reply (what DPO sums log-probabilities over).

A group (one record) is the unit a batch is made of: ``sequences`` plus ``pairs`` of (chosen, rejected)
indices into them. Records that cannot be used (missing fields, identical chosen and rejected, a ranking
without two distinct ranks, a sequence over ``max_len`` tokens, unreadable JSON) are counted by reason and
written to a rejects file; the run goes on.

Batches (:func:`collate_groups`) hold one row per sequence, right-padded: ``input_ids``, ``response_mask``
(1 on reply tokens), ``lengths``, ``chosen_index``/``rejected_index`` (rows of each pair) and ``margin``
(per pair; a pair record's optional ``"margin"``, else 0), plus ``ref_logps`` (per row) once a DPO reference
pass has filled them in.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from lmforge.data import io
from lmforge.data.io import Reject
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig
from lmforge.tune.sft import ROLES, EpochBatches, encode_chat


@dataclass(frozen=True)
class EncodedReply:
    """One prompt + response, tokenized; ``response[i]`` says whether token i belongs to the reply."""

    input_ids: tuple[int, ...]
    response: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PreferenceGroup:
    """The sequences of one record and its (chosen, rejected) pairs as indices into them.

    ``ref_logps`` (one per sequence) is filled in for DPO by a reference pass.
    """

    sequences: tuple[EncodedReply, ...]
    pairs: tuple[tuple[int, int], ...]
    margins: tuple[float, ...]  # one per pair: how much better chosen must score (reward models)
    ref_logps: tuple[float, ...] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass
class PreferenceStats:
    groups: int = 0
    pairs: int = 0
    sequences: int = 0
    tokens: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "pairs": self.pairs,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "rejected": dict(self.rejected),
        }


def read_records(paths: Sequence[str | Path]) -> Iterator[tuple[str, dict[str, Any]] | Reject]:
    """``(where, record)`` for every object in the files (JSONL plain/.gz/.zst, Parquet), or a Reject."""
    for path in paths:
        yield from io.read_records(str(path), located=True)


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a string or a non-empty list of messages")
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"every message of {what} needs a role among system/user/assistant")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"every message of {what} needs string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation a reply answers: ``messages``, or ``prompt`` as a string or a list of messages."""
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
    elif isinstance(record.get("prompt"), str):
        system = (
            [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
        )
        messages = [*system, {"role": "user", "content": record["prompt"]}]
    elif "prompt" in record:
        messages = _messages(record["prompt"], "prompt")
    else:
        raise ValueError("missing prompt: the record needs 'prompt' or 'messages'")
    if messages[-1]["role"] != "user":
        raise ValueError("the prompt must end on a user turn")
    return messages


def reply_messages(value: Any, what: str) -> list[dict[str, str]]:
    """A reply: a string (one assistant turn) or a list of assistant messages."""
    if value is None:
        raise ValueError(f"missing {what}")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, what)
    if any(m["role"] != "assistant" for m in messages):
        raise ValueError(f"{what} may hold assistant messages only")
    return messages


def encode_reply(
    tokenizer: Tokenizer, prompt: list[dict[str, str]], reply: list[dict[str, str]]
) -> EncodedReply:
    """Prompt + reply tokenized as one chat; the sequence ends on the reply's last trained token (its EOS)."""
    example = encode_chat(tokenizer, [*prompt, *reply])
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    start = len(tokenizer.backend.encode(prompt_text, add_special_tokens=False).ids)
    trained = [t and i >= start for i, t in enumerate(example.trained)]
    if not any(trained):
        raise ValueError("the reply has no tokens")
    end = max(i for i, t in enumerate(trained) if t) + 1
    return EncodedReply(example.input_ids[:end], tuple(trained[:end]))


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """Every (better, worse) pair of a ranking (``ranking[i]`` = rank of response i, 0 best; ties skipped)."""
    return [
        (i, j) if ranking[i] < ranking[j] else (j, i)
        for i, j in combinations(range(len(ranking)), 2)
        if ranking[i] != ranking[j]
    ]


def record_to_group(record: dict[str, Any], tokenizer: Tokenizer, max_len: int) -> PreferenceGroup:
    """The group of one pair or ranking record; ``ValueError`` says why it cannot be used."""
    prompt = prompt_messages(record)
    if "responses" in record:
        responses, ranking = record["responses"], record.get("ranking")
        if not isinstance(responses, list) or len(responses) < 2:
            raise ValueError("responses must be a list of at least two replies")
        if not isinstance(ranking, list) or len(ranking) != len(responses):
            raise ValueError("ranking must be a list with one rank per response")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
            raise ValueError("ranks must be integers")
        replies = [reply_messages(r, "response") for r in responses]
        pairs = ranking_pairs(ranking)
        if not pairs:
            raise ValueError("the ranking has fewer than two distinct ranks")
        margins = [0.0] * len(pairs)
    else:
        replies = [
            reply_messages(record.get("chosen"), "chosen"),
            reply_messages(record.get("rejected"), "rejected"),
        ]
        pairs = [(0, 1)]
        margin = record.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise ValueError("margin must be a number")
        margins = [float(margin)]
    if any(replies[i] == replies[j] for i, j in pairs):
        raise ValueError("identical chosen and rejected")
    sequences = tuple(encode_reply(tokenizer, prompt, reply) for reply in replies)
    longest = max(len(s) for s in sequences)
    if longest > max_len:
        raise ValueError(f"over max_len ({longest} > {max_len} tokens)")
    return PreferenceGroup(sequences, tuple(pairs), tuple(margins))


def reason_kind(reason: str) -> str:
    """The counter key of a reject reason (its text before any detail in parentheses or after a colon)."""
    return reason.split(" (")[0].split(":")[0]


def load_preference_groups(
    paths: Iterable[str | Path],
    tokenizer: Tokenizer,
    max_len: int,
    stats: PreferenceStats | None = None,
    rejects_path: str | Path | None = None,
) -> list[PreferenceGroup]:
    """Read pair and ranking records into groups; bad records are counted and written to ``rejects_path``
    (JSONL: ``where``, ``reason``, ``record``) instead of stopping the run."""
    stats = stats if stats is not None else PreferenceStats()
    groups: list[PreferenceGroup] = []
    rejects: list[dict[str, Any]] = []
    for item in read_records(list(paths)):
        if isinstance(item, Reject):
            stats.rejected[reason_kind(item.reason)] += 1
            rejects.append({"where": item.where, "reason": item.reason, "record": item.preview})
            continue
        where, record = item
        try:
            group = record_to_group(record, tokenizer, max_len)
        except ValueError as err:
            stats.rejected[reason_kind(str(err))] += 1
            rejects.append({"where": where, "reason": str(err), "record": record})
            continue
        groups.append(group)
        stats.groups += 1
        stats.pairs += len(group.pairs)
        stats.sequences += len(group.sequences)
        stats.tokens += group.tokens
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
    return groups


def write_rejects(path: str | Path, rejects: Iterable[dict[str, Any]]) -> None:
    """One JSON line per rejected record (``where``, ``reason``, ``record``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)


def collate_groups(groups: Sequence[PreferenceGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded row per sequence of the groups, pairs as row indices (see the module docstring)."""
    sequences = [s for g in groups for s in g.sequences]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq.input_ids)
        response_mask[row, : len(seq)] = torch.tensor(seq.response)
    chosen, rejected, offset = [], [], 0
    for group in groups:
        chosen += [offset + i for i, _ in group.pairs]
        rejected += [offset + j for _, j in group.pairs]
        offset += len(group.sequences)
    batch = {
        "input_ids": input_ids,
        "response_mask": response_mask,
        "lengths": torch.tensor([len(s) for s in sequences], dtype=torch.long),
        "chosen_index": torch.tensor(chosen, dtype=torch.long),
        "rejected_index": torch.tensor(rejected, dtype=torch.long),
        "margin": torch.tensor([m for g in groups for m in g.margins], dtype=torch.float32),
    }
    if all(g.ref_logps is not None for g in groups):
        batch["ref_logps"] = torch.tensor([x for g in groups for x in g.ref_logps], dtype=torch.float32)
    return batch


def with_ref_logps(group: PreferenceGroup, ref_logps: Sequence[float]) -> PreferenceGroup:
    return replace(group, ref_logps=tuple(float(x) for x in ref_logps))


class PreferenceDataSource(EpochBatches):
    """Endless, shuffled, resumable batches of ``batch_size`` groups (every pair of a group in one batch)."""

    def __init__(
        self,
        groups: Sequence[PreferenceGroup],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not groups:
            raise ValueError("no preference data")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self._start()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return [order[b : b + self.batch_size] for b in range(0, len(order), self.batch_size)]

    def make_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate_groups([self.groups[i] for i in indices], self.pad_id)

    def one_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every group once, in the given order (validation, reference passes)."""
        for b in range(0, len(self.groups), self.batch_size):
            yield self.make_batch(range(b, min(b + self.batch_size, len(self.groups))))


@dataclass
class PreferenceDataConfig:
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)


@dataclass
class PreferenceData:
    """What every preference run reads: the tokenizer's pad id, training and held-out sources, the stats."""

    pad_id: int
    train: PreferenceDataSource
    val: PreferenceDataSource | None
    stats: dict[str, Any]


def chat_tokenizer(cfg: TrainConfig) -> tuple[Tokenizer, int]:
    """The run's tokenizer (``cfg.tokenizer``, else the model folder's) and its pad id (else EOS); it must have
    a chat template, since prompts are rendered with it."""
    from lmforge.tokenizer import load_tokenizer

    tokenizer_dir = cfg.tokenizer or cfg.init_from
    if tokenizer_dir is None:
        raise ValueError("tokenizer: the run needs a tokenizer (tokenizer=... or init_from=...)")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no chat template to render the prompts with")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has neither a pad nor an EOS token")
    return tokenizer, pad_id


def load_preference_data(cfg: TrainConfig, data: PreferenceDataConfig) -> PreferenceData:
    """Tokenize ``data.paths`` (and ``val_paths``) with ``cfg``'s tokenizer; rejects go to ``RUN/rejects.jsonl``
    (``RUN/val_rejects.jsonl``), counts to ``RUN/preference_data.json``."""
    tokenizer, pad_id = chat_tokenizer(cfg)
    run_dir = Path(cfg.run_dir)
    size, seed = cfg.batch.micro_batch_size, cfg.data.seed
    stats = PreferenceStats()
    groups = load_preference_groups(data.paths, tokenizer, cfg.data.seq_len, stats, run_dir / "rejects.jsonl")
    train = PreferenceDataSource(groups, size, pad_id, seed=seed)
    summary: dict[str, Any] = {"train": stats.to_dict()}
    val = None
    if data.val_paths:
        val_stats = PreferenceStats()
        val_groups = load_preference_groups(
            data.val_paths, tokenizer, cfg.data.seq_len, val_stats, run_dir / "val_rejects.jsonl"
        )
        val = PreferenceDataSource(val_groups, size, pad_id, shuffle=False)
        summary["val"] = val_stats.to_dict()
    (run_dir / "preference_data.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return PreferenceData(pad_id, train, val, summary)
