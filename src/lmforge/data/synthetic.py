"""Synthetic data from a served model: Self-Instruct (Wang et al., 2022) and model labelling.

Both talk to any OpenAI-compatible endpoint (``lmforge serve`` by default) with plain HTTP: retries with
backoff on 429/5xx and connection errors, one clear error on any other 4xx.

Self-Instruct grows an instruction set from a few seed tasks. Each round shows the model ``prompt_tasks``
instructions (mostly seeds, a few already generated) as a numbered list and lets it continue the list; every
new instruction passes the filters (word count, a blocklist of tasks a text model cannot do, not starting
with punctuation, ROUGE-L < ``rouge_threshold`` against every instruction in the pool), is answered by the
model, and becomes a chat example ``{"messages": [user, assistant]}``. Everything turned away is counted by
reason and written to the rejects file with that reason; nothing is dropped silently.

Labelling asks the model to put each text in one of a fixed set of labels with a few-shot prompt and
reports the agreement with gold labels where the records have them.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BLOCKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip


class EndpointError(RuntimeError):
    """The endpoint refused a request (a 4xx other than 429), or failed after every retry."""


@dataclass
class Endpoint:
    """An OpenAI-compatible server: ``url`` is its base (``http://127.0.0.1:8000``), ``model`` the model id."""

    url: str = "http://127.0.0.1:8000"
    model: str = "lmforge"
    api_key: str | None = None
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 120.0
    _client: Any = field(default=None, repr=False)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(
                base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout_s
            )
        last = ""
        for attempt in range(self.retries + 1):
            try:
                response = self._client.post(path, json={"model": self.model, **body})
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return response.json()
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise EndpointError(f"{self.url}{path} refused the request: {last}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise EndpointError(f"{self.url}{path} failed after {self.retries + 1} attempts: {last}")

    def complete(self, prompt: str, max_tokens: int, temperature: float, stop: Sequence[str] = ()) -> str:
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop": list(stop) or None,
        }
        return self.post("/v1/completions", body)["choices"][0]["text"]

    def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""


# -- ROUGE-L ---------------------------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """Lowercased alphanumeric runs (the tokenization of the ``rouge_score`` package, without stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts: 2PR / (P + R) with P, R the LCS over each side's token count."""
    ta, tb = rouge_tokens(a), rouge_tokens(b)
    if not ta or not tb:
        return 0.0
    lcs = _lcs(ta, tb)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(tb), lcs / len(ta)
    return 2 * precision * recall / (precision + recall)


# -- Self-Instruct ---------------------------------------------------------------------------------------------


@dataclass
class SelfInstructConfig:
    count: int = 100  # instructions to generate
    prompt_tasks: int = 8  # instructions shown per request
    from_generated: int = 2  # of which already generated (once there are some)
    min_words: int = 3
    max_words: int = 150
    rouge_threshold: float = 0.7
    max_tokens: int = 512
    temperature: float = 0.7
    max_requests: int = 0  # 0: 10 x count
    seed: int = 0


def instruction_prompt(instructions: Sequence[str]) -> str:
    lines = "".join(f"{i}. {text}\n" for i, text in enumerate(instructions, 1))
    return f"Come up with a series of tasks:\n{lines}{len(instructions) + 1}."


def parse_instructions(completion: str, first_number: int) -> list[str]:
    """The numbered items of a continued list (the first item's number was in the prompt)."""
    items = re.split(r"\n\s*\d+\s*[.)]\s*", "\n" + f"{first_number}. " + completion.strip())
    return [re.sub(r"\s+", " ", item).strip() for item in items if item.strip()]


def instruction_problem(text: str, cfg: SelfInstructConfig) -> str | None:
    """Why a generated instruction is turned away before the ROUGE check, or None."""
    words = text.split()
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    lowered = f" {text.lower()} "
    for word in BLOCKLIST:
        if re.search(rf"\b{re.escape(word)}\b", lowered):
            return f"blocklist: {word}"
    if not text[0].isalnum():
        return "starts_with_punctuation"
    return None


@dataclass
class SelfInstructReport:
    accepted: int = 0
    requests: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "requests": self.requests, "rejected": dict(self.rejected)}


def self_instruct(
    seeds: Sequence[str],
    endpoint: Endpoint,
    cfg: SelfInstructConfig,
    write: Callable[[dict[str, Any]], None],
    reject: Callable[[dict[str, Any]], None],
    progress: bool = True,
) -> SelfInstructReport:
    """Generate ``cfg.count`` chat examples from ``seeds``; ``write`` gets each example, ``reject`` each
    turned-away instruction or failed request (with its ``reason``)."""
    if not seeds:
        raise ValueError("self-instruct needs at least one seed instruction")
    from tqdm.auto import tqdm

    rng = random.Random(cfg.seed)
    pool = [s.strip() for s in seeds]
    generated: list[str] = []
    report = SelfInstructReport()
    max_requests = cfg.max_requests or 10 * cfg.count
    with tqdm(total=cfg.count, desc="self-instruct", unit="instruction", disable=not progress) as bar:
        while report.accepted < cfg.count and report.requests < max_requests:
            k_generated = min(cfg.from_generated, len(generated))
            shown = rng.sample(pool[: len(seeds)], min(cfg.prompt_tasks - k_generated, len(seeds)))
            shown += rng.sample(generated, k_generated)
            rng.shuffle(shown)
            report.requests += 1
            try:
                completion = endpoint.complete(instruction_prompt(shown), cfg.max_tokens, cfg.temperature)
            except EndpointError as err:
                report.rejected["request_failed"] += 1
                reject({"reason": "request_failed", "error": str(err)})
                continue
            for text in parse_instructions(completion, len(shown) + 1):
                if report.accepted >= cfg.count:
                    break
                reason = instruction_problem(text, cfg)
                if reason is None:
                    closest = max((rouge_l(text, other) for other in pool), default=0.0)
                    if closest >= cfg.rouge_threshold:
                        reason = "similar_to_pool"
                if reason is None:
                    try:
                        answer = endpoint.chat(
                            [{"role": "user", "content": text}], cfg.max_tokens, cfg.temperature
                        )
                    except EndpointError as err:
                        reason = f"response_failed: {err}"
                    else:
                        if not answer.strip():
                            reason = "empty_response"
                if reason is not None:
                    report.rejected[reason.split(":")[0]] += 1
                    reject({"instruction": text, "reason": reason})
                    continue
                pool.append(text)
                generated.append(text)
                write(
                    {
                        "messages": [
                            {"role": "user", "content": text},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                report.accepted += 1
                bar.update(1)
    return report


# -- labelling -------------------------------------------------------------------------------------------------


def label_prompt(text: str, labels: Sequence[str], examples: Sequence[tuple[str, str]]) -> str:
    shots = "".join(f"Text: {t}\nLabel: {label}\n\n" for t, label in examples)
    return f"Classify each text as one of: {', '.join(labels)}.\n\n{shots}Text: {text}\nLabel:"


def parse_label(completion: str, labels: Sequence[str]) -> str | None:
    """The label the completion starts with (case-insensitive), or None."""
    head = completion.strip().lower()
    for label in sorted(labels, key=len, reverse=True):  # "not spam" before "spam"
        if head.startswith(label.lower()):
            return label
    return None


@dataclass
class LabelReport:
    labelled: int = 0
    unparsed: int = 0
    failed: int = 0
    with_gold: int = 0
    agree: int = 0
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)  # (gold, predicted) -> count

    @property
    def agreement(self) -> float | None:
        return self.agree / self.with_gold if self.with_gold else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "unparsed": self.unparsed,
            "failed": self.failed,
            "with_gold": self.with_gold,
            "agreement": self.agreement,
            "confusion": {f"{g} -> {p}": n for (g, p), n in sorted(self.confusion.items())},
        }


def label_records(
    records: Iterable[dict[str, Any]],
    endpoint: Endpoint,
    labels: Sequence[str],
    examples: Sequence[tuple[str, str]],
    write: Callable[[dict[str, Any]], None],
    reject: Callable[[dict[str, Any]], None],
    text_key: str = "text",
    gold_key: str = "label",
) -> LabelReport:
    """Label every record with the served model (greedy, a few tokens); records keep their keys and gain
    ``model_label``."""
    report = LabelReport()
    for record in records:
        text = record.get(text_key)
        try:
            completion = endpoint.complete(label_prompt(text, labels, examples), 8, 0.0, stop=["\n"])
        except EndpointError as err:
            report.failed += 1
            reject({**record, "reason": f"request_failed: {err}"})
            continue
        predicted = parse_label(completion, labels)
        if predicted is None:
            report.unparsed += 1
            reject({**record, "reason": "unparsed_label", "completion": completion})
            continue
        report.labelled += 1
        gold = record.get(gold_key)
        if gold is not None:
            report.with_gold += 1
            report.agree += gold == predicted
            report.confusion[(str(gold), predicted)] += 1
        write({**record, "model_label": predicted})
    return report
