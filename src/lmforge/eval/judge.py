"""LLM-as-a-judge over any OpenAI-compatible chat endpoint (Zheng et al. 2023, MT-Bench).

- Single-answer grading: the judge rates one answer from 1 to 10 and writes the rating as ``[[n]]``.
- Pairwise comparison: the judge sees answers A and B and ends with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).
  Every pair is judged twice, in both orders; a verdict that changes with the order is position bias and
  counts as a tie. ``order_agreement`` is the share of pairs whose two verdicts agree.

The client retries 429 and 5xx responses (and dropped connections) with exponential backoff, honouring
``Retry-After``; any other 4xx is a :class:`JudgeError` carrying the endpoint's message. Every judgment is
cached on disk under the SHA-256 of its request, so a rerun asks only what it has not asked before.
Judging is greedy (temperature 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by "
    "providing a short explanation. Be as objective as possible. After providing your explanation, you must "
    'rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".'
)
PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. You should choose the assistant that follows the user's "
    "instructions and answers the user's question better. Avoid any position biases and ensure that the order "
    "in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Be as objective as possible. After providing your explanation, "
    'output your final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" '
    'if assistant B is better, and "[[C]]" for a tie.'
)

_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class JudgeError(RuntimeError):
    """The judge endpoint refused a request (a 4xx other than 429) or stayed unavailable."""


@dataclass
class ChatClient:
    """Greedy chat completions from ``{url}/chat/completions`` (``url`` ends in ``/v1``), cached in
    ``cache_dir``; the judge's client, and the red-teamed model's."""

    url: str
    model: str
    api_key: str | None = None
    cache_dir: str | Path | None = None
    max_retries: int = 5
    backoff_s: float = 0.5  # first wait; doubles on each retry
    timeout_s: float = 120.0
    max_tokens: int = 1024
    sleep: Callable[[float], None] = time.sleep

    def complete(self, system: str, user: str) -> str:
        """The reply to one user message under a system prompt (none when ``system`` is empty)."""
        messages = [{"role": "system", "content": system}] if system else []
        return self.chat([*messages, {"role": "user", "content": user}])

    def chat(self, messages: list[dict[str, str]]) -> str:
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        key = hashlib.sha256(json.dumps([self.url, payload], sort_keys=True).encode()).hexdigest()
        cached = Path(self.cache_dir) / f"{key}.json" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return json.loads(cached.read_text(encoding="utf-8"))["content"]
        content = self._post(payload)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps({"content": content}), encoding="utf-8")
            tmp.replace(cached)
        return content

    def _post(self, payload: dict[str, Any]) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        endpoint = self.url.rstrip("/") + "/chat/completions"
        body = json.dumps(payload).encode()
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
            wait = self.backoff_s * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:500]
                if err.code not in RETRY_STATUSES:
                    raise JudgeError(f"endpoint {endpoint} answered {err.code}: {detail}") from err
                retry_after = err.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
                last = f"{err.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                last = str(err)
            if attempt < self.max_retries:
                self.sleep(wait)
        raise JudgeError(f"endpoint {endpoint} still failing after {self.max_retries} retries ({last})")


def parse_rating(text: str) -> float | None:
    """The last ``[[n]]`` rating in 1..10, or None."""
    ratings = [float(m) for m in _RATING.findall(text)]
    return ratings[-1] if ratings and 1 <= ratings[-1] <= 10 else None


def parse_verdict(text: str) -> str | None:
    """``A``, ``B`` or ``C`` (tie) from the last ``[[X]]`` verdict, or None."""
    verdicts = _VERDICT.findall(text)
    return verdicts[-1] if verdicts else None


def single_prompt(question: str, answer: str, reference: str | None = None) -> str:
    ref = (
        f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
        if reference
        else ""
    )
    return (
        f"[Question]\n{question}\n\n{ref}"
        f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
    )


def pair_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return (
        f"[User Question]\n{question}\n\n"
        f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
        f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    )


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0, 1 and small n)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def grade_single(
    client: ChatClient, items: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rate each ``{"question", "answer", "reference"?}``; the mean rating with a 95% normal interval."""
    judgments, ratings = [], []
    for item in items:
        reply = client.complete(
            SINGLE_SYSTEM, single_prompt(item["question"], item["answer"], item.get("reference"))
        )
        rating = parse_rating(reply)
        if rating is not None:
            ratings.append(rating)
        judgments.append({**item, "judgment": reply, "rating": rating})
    n = len(ratings)
    mean = sum(ratings) / n if n else math.nan
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratings) / (n - 1)) if n > 1 else math.nan
    half = 1.96 * sd / math.sqrt(n) if n > 1 else math.nan
    summary = {
        "n": len(items),
        "rated": n,
        "unparsed": len(items) - n,
        "mean_rating": mean,
        "ci95": [mean - half, mean + half],
    }
    return summary, judgments


def _outcome(first: str | None, second_swapped: str | None) -> str:
    """The pair's outcome for model A: the verdict in both orders must agree, else it is a tie."""
    back = {"A": "B", "B": "A", "C": "C"}.get(second_swapped or "")
    if first is None or back is None or first != back:
        return "tie"
    return {"A": "win", "B": "loss", "C": "tie"}[first]


def compare_pairwise(
    client: ChatClient, questions: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Win/tie/loss of model A against model B, judged in both orders, with 95% Wilson intervals."""
    if not len(questions) == len(answers_a) == len(answers_b):
        raise ValueError("questions and both models' answers must have the same length")
    judgments, counts, agree, unparsed = [], {"win": 0, "tie": 0, "loss": 0}, 0, 0
    for question, a, b in zip(questions, answers_a, answers_b, strict=True):
        first_reply = client.complete(PAIR_SYSTEM, pair_prompt(question, a, b))
        second_reply = client.complete(PAIR_SYSTEM, pair_prompt(question, b, a))
        first, second = parse_verdict(first_reply), parse_verdict(second_reply)
        unparsed += (first is None) + (second is None)
        outcome = _outcome(first, second)
        agree += first is not None and first == {"A": "B", "B": "A", "C": "C"}.get(second or "")
        counts[outcome] += 1
        judgments.append(
            {
                "question": question,
                "answer_a": a,
                "answer_b": b,
                "verdict_ab": first,
                "verdict_ba": second,
                "outcome": outcome,
                "judgment_ab": first_reply,
                "judgment_ba": second_reply,
            }
        )
    n = len(questions)
    summary: dict[str, Any] = {
        "n": n,
        "unparsed_verdicts": unparsed,
        "order_agreement": agree / n if n else math.nan,
    }
    for outcome, count in counts.items():
        summary[outcome] = count
        summary[f"{outcome}_rate"] = count / n if n else math.nan
        summary[f"{outcome}_ci95"] = list(wilson_interval(count, n))
    return summary, judgments
