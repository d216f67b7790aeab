"""Supervised fine-tuning data: chats rendered with the chat template, loss on assistant tokens only.

A record is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` (system/user/assistant turns)
or ``{"prompt": ..., "completion": ...}`` (optionally ``"system"``), which becomes one user turn and one
assistant turn. The conversation is rendered with the tokenizer's chat template and tokenized once,
without the tokenizer's automatic BOS (the template writes its special tokens itself, which is also how the
server's chat endpoint tokenizes). The tokens that carry a loss are exactly those of each assistant turn:
its content and the end-of-turn text the template appends up to and including the EOS token
(``<|im_end|>`` + EOS for the default template), so the model learns to stop. The header that opens an assistant turn (``<|im_start|>assistant``)
is prompt: the engine supplies it as the generation prompt. Turn spans are found by rendering the
conversation up to each assistant turn with ``add_generation_prompt=True`` and comparing with the full
rendering; token spans come from the tokenizer's character offsets. Masks are positional, so a pad id
equal to the EOS id can never hide the real EOS.

Batches use the trainer's format (the one :class:`lmforge.shards.loader.PackedLoader` yields): LongTensors
``input_ids``, ``labels`` (the next token to predict at each position, -100 where nothing is learnt),
``position_ids`` (restarting at 0 for every example) and ``segment_ids`` (one id per example in a packed
row, 0 for padding, so attention never crosses examples).
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.data.io import Reject, read_records
from lmforge.tokenizer import Tokenizer
from lmforge.train.objective import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """One tokenized conversation; ``trained[i]`` says whether token i is a prediction target."""

    input_ids: tuple[int, ...]
    trained: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.trained)


def record_to_messages(record: Any) -> list[dict[str, str]]:
    """The conversation of a JSONL record; ``ValueError`` says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("record is not an object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError("every message needs a role among system/user/assistant")
            if not isinstance(message.get("content"), str):
                raise ValueError("every message needs string content")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant turn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("record needs 'messages' or string 'prompt' and 'completion'")
    messages = (
        [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
    )
    return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def assistant_spans(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]]
) -> tuple[str, list[tuple[int, int, bool]]]:
    """The rendered conversation and, per assistant turn, ``(start, end, ends_with_eos)`` in characters."""
    text = tokenizer.apply_chat_template(messages)
    eos = tokenizer.eos_token
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        turn = through[len(before) :]
        cut = turn.rfind(eos) if eos else -1
        # With an EOS in the turn, learn up to and including it; without one, the turn's text without its
        # trailing whitespace (the EOS id is then inserted after it).
        if cut >= 0:
            spans.append((len(before), len(before) + cut + len(eos), True))
        else:
            spans.append((len(before), len(before) + len(turn.rstrip()), False))
    return text, spans


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> SFTExample:
    """Tokenize a conversation and mark the tokens of its assistant turns as targets.

    When the template writes no EOS inside an assistant turn, the EOS id is inserted after that turn's
    text so that stopping is still learnt.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    eos_id = tokenizer.eos_id
    ids: list[int] = []
    trained: list[bool] = []
    turn = 0

    def close_turn() -> None:
        if not spans[turn][2] and eos_id is not None:
            ids.append(eos_id)
            trained.append(True)

    for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
        while turn < len(spans) and start >= spans[turn][1]:
            close_turn()
            turn += 1
        ids.append(token_id)
        trained.append(turn < len(spans) and end > spans[turn][0])
    while turn < len(spans):
        close_turn()
        turn += 1
    return SFTExample(tuple(ids), tuple(trained))


@dataclass
class SFTDataStats:
    examples: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "rejected": dict(self.rejected),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


def load_sft_examples(
    paths: Iterable[str | Path], tokenizer: Tokenizer, max_len: int, stats: SFTDataStats | None = None
) -> list[SFTExample]:
    """Read JSONL files into examples of at most ``max_len`` tokens; bad records are counted, not fatal.

    A too-long conversation is cut to ``max_len`` tokens (counted as truncated); one left with no target
    token is rejected.
    """
    stats = stats if stats is not None else SFTDataStats()
    examples = []
    for path in paths:
        for record in read_records(path):
            if isinstance(record, Reject):  # unreadable line or file: counted by kind (malformed_json, ...)
                stats.rejected[record.reason.split(":")[0]] += 1
                continue
            try:
                example = encode_chat(tokenizer, record_to_messages(record))
            except ValueError as err:
                stats.rejected[str(err)] += 1
                continue
            truncated = len(example) > max_len
            if truncated:
                example = SFTExample(example.input_ids[:max_len], example.trained[:max_len])
            if example.n_trained == 0:
                stats.rejected["no assistant token within max_len"] += 1
                continue
            stats.truncated += truncated
            examples.append(example)
            stats.examples += 1
            stats.tokens += len(example)
            stats.trained_tokens += example.n_trained
    return examples


def example_labels(example: SFTExample) -> list[int]:
    """Next-token labels: position t learns token t+1 when that token is a target."""
    ids, trained = example.input_ids, example.trained
    return [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def pack_examples(examples: Sequence[SFTExample], seq_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``seq_len`` tokens.

    Best fit in the given order: each example goes to the open row with the least room that still holds
    it (a new row when none does), found by bisection over rows sorted by their free room.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index, example in enumerate(examples):
        if len(example) > seq_len:
            raise ValueError(f"example {index} has {len(example)} tokens, more than seq_len={seq_len}")
        slot = bisect.bisect_left(free, (len(example), -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (room - len(example), row))
    return rows


def collate(examples: Sequence[Sequence[SFTExample]], pad_id: int, length: int) -> dict[str, torch.Tensor]:
    """One batch row per group of examples, concatenated and padded to ``length``."""
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    segment_ids = torch.zeros((batch, length), dtype=torch.long)
    for row, group in enumerate(examples):
        offset = 0
        for segment, example in enumerate(group, start=1):
            n = len(example)
            input_ids[row, offset : offset + n] = torch.tensor(example.input_ids)
            labels[row, offset : offset + n] = torch.tensor(example_labels(example))
            position_ids[row, offset : offset + n] = torch.arange(n)
            segment_ids[row, offset : offset + n] = segment
            offset += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
    }


class EpochBatches:
    """Endless, resumable iteration over per-epoch batch plans: a subclass says what one epoch's batches are
    (``epoch_batches``, deterministic from ``seed`` and the epoch) and how a batch is built (``make_batch``);
    the position (epoch, batch within it) is what a checkpoint saves. Each epoch's plan is computed once."""

    seed: int

    def epoch_batches(self, epoch: int) -> list[Any]:
        raise NotImplementedError

    def make_batch(self, plan: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _start(self) -> None:
        self.epoch = 0
        self.batch_in_epoch = 0
        self._plan: tuple[int, list[Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.epoch_batches(self.epoch))
        batches = self._plan[1]
        if self.batch_in_epoch >= len(batches):
            self.epoch += 1
            self.batch_in_epoch = 0
            return next(self)
        plan = batches[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return self.make_batch(plan)

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.seed = int(state.get("seed", self.seed))


class SFTDataSource(EpochBatches):
    """Endless, shuffled, resumable batches of SFT examples in the trainer's batch format.

    ``pack=True`` fills rows of exactly ``seq_len`` tokens with several examples each (best fit after a
    per-epoch shuffle). ``pack=False`` puts one example per row and pads to the longest row in the batch;
    ``group_by_length`` then sorts examples by length within windows of ``50 * batch_size`` so rows of a
    batch have similar lengths (less padding), and shuffles the order of the batches. ``shuffle=False`` keeps
    the given order (for validation).
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        pack: bool = True,
        group_by_length: bool = False,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not examples:
            raise ValueError("no SFT examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.pack = pack
        self.group_by_length = group_by_length
        self.seed = seed
        self.shuffle = shuffle
        self._start()

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """Batches of rows of example indices for one epoch (deterministic from seed and epoch)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.examples)))
        if self.shuffle:
            rng.shuffle(order)
        if self.pack:
            packed = pack_examples([self.examples[i] for i in order], self.seq_len)
            rows = [[order[i] for i in row] for row in packed]
        else:
            if self.group_by_length:
                window = 50 * self.batch_size
                order = [
                    i
                    for w in range(0, len(order), window)
                    for i in sorted(order[w : w + window], key=lambda i: len(self.examples[i]))
                ]
            rows = [[i] for i in order]
        batches = [rows[b : b + self.batch_size] for b in range(0, len(rows), self.batch_size)]
        if self.group_by_length and not self.pack and self.shuffle:
            rng.shuffle(batches)
        return batches

    def make_batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        groups = [[self.examples[i] for i in row] for row in rows]
        length = self.seq_len if self.pack else max(sum(len(e) for e in g) for g in groups)
        return collate(groups, self.pad_id, length)
