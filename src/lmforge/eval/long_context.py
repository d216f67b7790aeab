"""Long-context evaluation: passkey retrieval and perplexity by position bucket.

Passkey retrieval (Mohtashami & Jaggi 2023, the "lost in the middle" sweep of Liu et al. 2023): a random
``digits``-digit key is hidden in a deterministic haystack of filler sentences at a relative depth
(0 = right after the instruction, 1 = right before the question), the prompt and the room for the reply together
``multiple`` times the training length in tokens. The model continues "... The pass key is" by greedy decoding; a trial scores
1 when the first run of digits it writes is the key exactly (``digit_accuracy`` also gives the share of key
digits right in place, for a softer curve).

The haystack is built in token space: the instruction, one filler unit, the needle and the question are
each tokenized once and concatenated, so lengths are exact whatever the tokenizer merges, the needle sits
between two filler units (never inside a sentence), and the words "The pass key is" are the same tokens in
the needle and in the question.

Perplexity by position bucket: long documents (joined with EOS into streams of ``multiple`` x the training
length when ``concatenate``) are scored in one forward pass, or, with ``window > 0``, through a model-level
attention-sink cache (:class:`lmforge.model.sink_cache.SinkKVCache`: ``sink`` first tokens + the last
``window``) ``chunk`` tokens at a time, so memory stays constant however long the stream. The negative
log-likelihood of each predicted token is averaged per bucket of ``bucket_size`` positions (default the
training length), giving the curve of perplexity against position; bucket 0 is the in-length perplexity.

Both run as part of ``lmforge eval`` (the ``long_context`` section of :class:`lmforge.eval.runner.EvalConfig`)::

    long_context:
      train_length: 256
      passkey: {multiples: [1, 2, 4, 8], depths: [0.0, 0.5, 1.0], trials: 5}
      perplexity: {documents: [long_docs.jsonl], multiple: 16, sink: 4, window: 252}
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a measurement runs, not when the eval config is read
    from torch import Tensor, nn

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about it."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_PHRASE = " The pass key is"
NEEDLE_TAIL = ". Remember it."
QUESTION = " What is the pass key?"


@dataclass
class PasskeyConfig:
    multiples: list[int] = field(
        default_factory=list
    )  # prompt lengths in training lengths; empty: no passkey
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # 0 beginning .. 1 end
    trials: int = 5  # keys per (length, depth)
    digits: int = 5
    seed: int = 0
    pcw_windows: int = 0  # > 1: parallel context windows over the haystack (lmforge.model.pcw)

    def __post_init__(self) -> None:
        if any(m <= 0 for m in self.multiples) or self.trials < 1 or self.digits < 1:
            raise ValueError("multiples must be > 0, trials and digits >= 1")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths: must lie in [0, 1], got {list(self.depths)}")


@dataclass
class PositionPerplexityConfig:
    documents: list[str] = field(default_factory=list)  # JSONL/Parquet documents ("text"); empty: skipped
    max_documents: int = 0  # 0: all
    multiple: int = 16  # streams are cut at multiple x train_length tokens
    bucket_size: int = 0  # 0: train_length
    concatenate: bool = True  # join documents with EOS into full-length streams
    sink: int = 0  # attention sinks kept when window > 0
    window: int = 0  # > 0: score through a sink cache of sink + window tokens (StreamingLLM)
    chunk: int = 1  # tokens per forward through the sink cache
    # > 0: score segment by segment through the model's external kNN memory (ModelConfig.knn_memory;
    # lmforge.model.knn_memory), positions restarting in each segment
    memory_segment: int = 0

    def __post_init__(self) -> None:
        if (
            min(self.bucket_size, self.sink, self.window, self.memory_segment) < 0
            or min(self.multiple, self.chunk) < 1
        ):
            raise ValueError(
                "multiple and chunk must be >= 1; bucket_size, sink, window, memory_segment >= 0"
            )
        if self.window and self.memory_segment:
            raise ValueError("window, memory_segment: a sink cache or a kNN memory, not both")


@dataclass
class LongContextConfig:
    train_length: int = 0  # 0: the model's max_seq_len
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    perplexity: PositionPerplexityConfig = field(default_factory=PositionPerplexityConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.passkey.multiples or self.perplexity.documents)


# -- passkey ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyPrompt:
    """One haystack: its token ids, the key, where the needle and the question start, the key phrase's ids."""

    ids: list[int]
    key: str
    needle_start: int
    question_start: int
    key_phrase: list[int]


def passkey_key(digits: int, seed: int, trial: int) -> str:
    """The deterministic key of one trial: ``digits`` digits, no leading zero."""
    rng = random.Random(f"passkey:{seed}:{trial}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with ``key`` hidden at relative ``depth`` of the filler."""
    intro = tokenizer.encode(INSTRUCTION, add_special_tokens=True)
    unit = tokenizer.encode(FILLER)
    phrase = tokenizer.encode(KEY_PHRASE)
    needle = phrase + tokenizer.encode(f" {key}") + tokenizer.encode(NEEDLE_TAIL)
    question = tokenizer.encode(QUESTION) + phrase
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(
            f"passkey: a {length}-token prompt cannot hold the instruction, needle and question "
            f"({length - n_fill} tokens)"
        )
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    # the needle goes between two filler units, the one nearest the requested depth
    units = n_fill // len(unit)
    at = min(round(depth * n_fill / len(unit)), units) * len(unit)
    if depth >= 1.0:
        at = n_fill  # the very end: right before the question
    ids = intro + filler[:at] + needle + filler[at:] + question
    return PasskeyPrompt(ids, key, len(intro) + at, len(ids) - len(question), phrase)


def first_digits(text: str) -> str:
    """The first run of digits in ``text`` ('' when there is none)."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def score_passkey(reply: str, key: str) -> tuple[float, float]:
    """(exact, digit accuracy): 1 if the first digit run is the key; share of key digits right in place."""
    got = first_digits(reply)
    exact = float(got == key)
    digits = sum(a == b for a, b in zip(got, key)) / len(key)
    return exact, digits


def _stop_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "special_ids", set()) or set())


def greedy_generate(
    model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy continuation of one prompt. A :class:`~lmforge.model.Transformer` decodes with a contiguous
    KV cache; any other module (a test double) gets a full forward per token."""
    import torch

    with torch.no_grad():
        return _greedy(model, prompt_ids, max_new_tokens, stop_ids)


def _greedy(
    model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int]
) -> list[int]:
    import torch

    from lmforge.model.cache import ContiguousKVCache
    from lmforge.model.transformer import Transformer

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    ids = torch.tensor([list(prompt_ids)], device=device)
    stop, out = set(stop_ids), []
    if isinstance(model, Transformer):
        dtype = first.dtype
        cache = ContiguousKVCache.for_model(model.cfg, 1, ids.shape[1] + max_new_tokens, dtype, device)
        logits = model(ids, cache=cache).logits[0, -1]
        for _ in range(max_new_tokens):
            nxt = int(logits.argmax())
            if nxt in stop:
                break
            out.append(nxt)
            logits = model(torch.tensor([[nxt]], device=device), cache=cache).logits[0, -1]
        return out
    for _ in range(max_new_tokens):
        seq = torch.cat((ids, torch.tensor([out], dtype=ids.dtype, device=device)), dim=1)
        nxt = int(model(seq).logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return out


def run_passkey(model: nn.Module, tokenizer: Any, cfg: PasskeyConfig, train_length: int) -> dict[str, Any]:
    """Every (multiple, depth, trial); returns per-cell and per-length accuracy plus the samples.

    A length the model cannot take (e.g. learned positions beyond max_seq_len) is reported with its error
    and skipped; the other lengths still run."""
    cells: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    stop = _stop_ids(tokenizer)
    for multiple in cfg.multiples:
        length = multiple * train_length
        try:
            for depth in cfg.depths:
                exact, digit = [], []
                for trial in range(cfg.trials):
                    key = passkey_key(cfg.digits, cfg.seed, trial)
                    budget = len(tokenizer.encode(f" {key}")) + 2
                    # the reply is part of the length: prompt and answer fit in multiple x train_length
                    prompt = passkey_prompt(tokenizer, length - budget, depth, key)
                    if cfg.pcw_windows > 1:
                        from lmforge.model.pcw import pcw_generate

                        context, task = (
                            prompt.ids[: prompt.question_start],
                            prompt.ids[prompt.question_start :],
                        )
                        reply_ids = pcw_generate(model, context, task, cfg.pcw_windows, budget, stop)
                    else:
                        reply_ids = greedy_generate(model, prompt.ids, budget, stop)
                    reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
                    e, d = score_passkey(reply, key)
                    exact.append(e)
                    digit.append(d)
                    samples.append(
                        {"multiple": multiple, "depth": depth, "key": key, "reply": reply, "correct": bool(e)}
                    )
                cells.append(
                    {
                        "multiple": multiple,
                        "tokens": length,
                        "depth": depth,
                        "accuracy": sum(exact) / len(exact),
                        "digit_accuracy": sum(digit) / len(digit),
                    }
                )
        except ValueError as err:
            errors[str(multiple)] = str(err)
    by_length = {}
    for multiple in cfg.multiples:
        mine = [c["accuracy"] for c in cells if c["multiple"] == multiple]
        if mine:
            by_length[str(multiple)] = sum(mine) / len(mine)
    return {"train_length": train_length, "cells": cells, "by_multiple": by_length, "errors": errors,
            "samples": samples}  # fmt: skip


# -- perplexity by position ---------------------------------------------------------------------------------


def position_nll(
    model: nn.Module, ids: Sequence[int], sink: int = 0, window: int = 0, chunk: int = 1
) -> Tensor:
    """NLL (nats) of tokens 1..n-1 of ``ids`` given their prefix, (n-1,) float32 on CPU.

    ``window == 0``: one forward over the whole sequence. Otherwise through a sink cache holding the first
    ``sink`` tokens and the last ``window`` ones, ``chunk`` new tokens per forward."""
    import torch

    with torch.no_grad():
        return _position_nll(model, ids, sink, window, chunk)


def _position_nll(model: nn.Module, ids: Sequence[int], sink: int, window: int, chunk: int) -> Tensor:
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    if window == 0:
        logits = model(x).logits[0, :-1].float()
        return F.cross_entropy(logits, x[0, 1:], reduction="none").cpu()
    from lmforge.model.sink_cache import SinkKVCache

    cache = SinkKVCache(model.cfg.n_layers, sink, window)
    pieces = []
    for start in range(0, x.shape[1] - 1, chunk):
        piece = x[:, start : min(start + chunk, x.shape[1] - 1)]
        logits = model(piece, cache=cache).logits[0].float()
        targets = x[0, start + 1 : start + 1 + piece.shape[1]]
        pieces.append(F.cross_entropy(logits, targets, reduction="none").cpu())
    return torch.cat(pieces)


def bucket_perplexity(nlls: Sequence[Tensor], bucket_size: int) -> list[dict[str, float]]:
    """Per bucket b (predicted token at position b*size .. (b+1)*size - 1; the NLL at index i predicts the
    token at position i + 1), over all sequences: tokens, mean NLL and perplexity exp(mean NLL)."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    import torch

    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for nll in nlls:
        positions = torch.arange(1, nll.numel() + 1)
        buckets = positions // bucket_size
        for b in buckets.unique().tolist():
            values = nll[buckets == b].double()
            sums[b] = sums.get(b, 0.0) + float(values.sum())
            counts[b] = counts.get(b, 0) + values.numel()
    rows = []
    for b in sorted(sums):
        mean_nll = sums[b] / counts[b]
        rows.append(
            {
                "bucket": b,
                "start": b * bucket_size,
                "end": (b + 1) * bucket_size,
                "tokens": counts[b],
                "nll": mean_nll,
                "perplexity": math.exp(mean_nll),
            }
        )
    return rows


def document_streams(
    tokenizer: Any, texts: Sequence[str], max_tokens: int, concatenate: bool = True
) -> list[list[int]]:
    """Token streams of at most ``max_tokens``, each document preceded by EOS (as in the training shards):
    one stream per document, or the documents joined and cut into full-length streams (the tail that does not
    fill a stream is kept only when it is the only one)."""
    eos = tokenizer.eos_id
    docs = [([eos] if eos is not None else []) + tokenizer.encode(t) for t in texts]
    if not concatenate:
        return [d[:max_tokens] for d in docs if len(d) > 1]
    joined = [t for d in docs for t in d]
    streams = [joined[i : i + max_tokens] for i in range(0, len(joined), max_tokens)]
    full = [s for s in streams if len(s) == max_tokens]
    return full or [s for s in streams[:1] if len(s) > 1]


def run_position_perplexity(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], cfg: PositionPerplexityConfig, train_length: int
) -> dict[str, Any]:
    """Perplexity by position bucket over streams of ``cfg.multiple`` x ``train_length`` tokens."""
    streams = document_streams(tokenizer, texts, cfg.multiple * train_length, cfg.concatenate)
    if not streams:
        raise ValueError("long_context.perplexity: the documents hold no text")
    if cfg.memory_segment:
        from lmforge.model.knn_memory import memory_nll

        nlls = [memory_nll(model, s, cfg.memory_segment) for s in streams]
    else:
        nlls = [position_nll(model, s, cfg.sink, cfg.window, cfg.chunk) for s in streams]
    buckets = bucket_perplexity(nlls, cfg.bucket_size or train_length)
    first, last = buckets[0]["perplexity"], buckets[-1]["perplexity"]
    return {
        "train_length": train_length,
        "streams": len(streams),
        "tokens": sum(n.numel() for n in nlls),
        "sink": cfg.sink,
        "window": cfg.window,
        "memory_segment": cfg.memory_segment,
        "buckets": buckets,
        "in_length_perplexity": first,
        "last_bucket_perplexity": last,
        "last_over_first": last / first,
    }


def evaluate_long_context(
    model: nn.Module, tokenizer: Any, cfg: LongContextConfig, texts: Sequence[str] = ()
) -> dict[str, Any]:
    """The passkey sweep and/or perplexity by position, as configured (``texts``: the documents)."""
    train_length = cfg.train_length or model.cfg.max_seq_len
    result: dict[str, Any] = {}
    if cfg.passkey.multiples:
        result["passkey"] = run_passkey(model, tokenizer, cfg.passkey, train_length)
    if cfg.perplexity.documents:
        result["perplexity"] = run_position_perplexity(model, tokenizer, texts, cfg.perplexity, train_length)
    return result


def long_context_markdown(result: dict[str, Any]) -> list[str]:
    """Markdown lines for ``results.md``: passkey accuracy by length x depth, perplexity by bucket."""
    lines: list[str] = []
    if "passkey" in result:
        pk = result["passkey"]
        depths = sorted({c["depth"] for c in pk["cells"]})
        lines += ["", f"## Passkey retrieval (training length {pk['train_length']})", ""]
        lines += ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |"]
        lines += ["|" + " --- |" * (len(depths) + 2)]
        for multiple, mean_acc in pk["by_multiple"].items():
            row = {c["depth"]: c["accuracy"] for c in pk["cells"] if str(c["multiple"]) == multiple}
            cells = " | ".join(f"{row[d]:.2f}" if d in row else "-" for d in depths)
            lines.append(f"| {multiple}x | {cells} | {mean_acc:.2f} |")
        for multiple, err in pk["errors"].items():
            lines.append(f"\n{multiple}x: not run: {err}")
    if "perplexity" in result:
        ppl = result["perplexity"]
        how = f"sink cache ({ppl['sink']} + {ppl['window']})" if ppl["window"] else "full attention"
        if ppl.get("memory_segment"):
            how = f"kNN memory, segments of {ppl['memory_segment']}"
        lines += ["", f"## Perplexity by position ({how}, {ppl['streams']} streams)", ""]
        lines += ["| positions | tokens | perplexity |", "| --- | --- | --- |"]
        for b in ppl["buckets"]:
            lines.append(f"| {b['start']}-{b['end'] - 1} | {b['tokens']} | {b['perplexity']:.3f} |")
    return lines


# -- many-shot prompts over parallel context windows --------------------------------------------------------


def pcw_fewshot_windows(
    fmt: Any, demonstrations: Sequence[Any], n_windows: int, tokenizer: Any
) -> list[list[int]]:
    """Token windows for a many-shot plain prompt: the demonstrations dealt round-robin into ``n_windows``
    groups (empty ones dropped), each window the description and header followed by its group, all
    ending with the few-shot delimiter, as :func:`lmforge.eval.fewshot.plain_prompt` lays them out."""
    groups = [list(demonstrations[i::n_windows]) for i in range(n_windows)]
    windows = []
    for group in groups:
        if not group:
            continue
        shots = [fmt.question(d) + fmt.target_delimiter + d.target for d in group]
        text = fmt.description + fmt.fewshot_delimiter.join([*fmt.header, *shots]) + fmt.fewshot_delimiter
        windows.append(tokenizer.encode(text, add_special_tokens=True))
    return windows


def run_pcw_generation_task(
    task: Any, model: nn.Module, tokenizer: Any, data: Any, shots: Sequence[Sequence[Any]]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A plain generation task whose demonstrations sit in ``task.pcw_windows`` parallel context windows and
    whose question attends to all of them (Ratner et al. 2023); greedy, the reply ends at the end of the line,
    scored by exact match as :func:`lmforge.eval.runner.run_generation_task` does."""
    from lmforge.eval.metrics import exact_match, mean, stderr_of_mean
    from lmforge.model.pcw import pcw_generate_windows

    if task.chat or task.cot or task.self_consistency > 1:
        raise ValueError(
            f"task {task.name}: pcw_windows takes plain prompts (no chat, cot, self_consistency)"
        )
    fmt = task.prompt_format
    stop = sorted(_stop_ids(tokenizer))
    correct, samples = [], []
    for example, demos in zip(data.examples, shots, strict=True):
        windows = pcw_fewshot_windows(fmt, demos, task.pcw_windows, tokenizer)
        question = fmt.question(example)
        task_ids = tokenizer.encode(question, add_special_tokens=not windows)
        reply_ids = pcw_generate_windows(model, windows, task_ids, task.max_tokens, stop)
        reply = tokenizer.decode(reply_ids, skip_special_tokens=True).split("\n")[0]
        ok = exact_match(reply, example.answers, task.ignore_case, task.ignore_punctuation)
        correct.append(float(ok))
        samples.append(
            {"question": example.prompt, "windows": len(windows), "prompt": question, "prediction": reply,
             "answers": list(example.answers), "correct": ok}
        )  # fmt: skip
    return {"exact_match": mean(correct), "exact_match_stderr": stderr_of_mean(correct)}, samples
