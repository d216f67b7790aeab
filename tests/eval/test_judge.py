import json

import pytest

from lmforge.cli import main
from lmforge.eval.judge import (
    ChatClient,
    JudgeError,
    compare_pairwise,
    grade_single,
    parse_rating,
    parse_verdict,
    wilson_interval,
)
from tests.eval.fake_openai import fake_openai


def _answer_a_and_b(user: str) -> tuple[str, str]:
    a = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
    b = user.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
    return a, b


def judge_reply(payload):
    """A deterministic judge: rates 'good' answers 9 and 'bad' ones 2; prefers the 'correct' answer,
    except on 'biased' questions where it always picks the first answer shown."""
    system, user = payload["messages"][0]["content"], payload["messages"][1]["content"]
    assert payload["temperature"] == 0.0
    if "rate the response" in system:
        if "garbled" in user:
            return 200, "I cannot decide."
        return 200, "Explanation. Rating: [[9]]" if "good" in user else "Meh. Rating: [[2]]"
    a, b = _answer_a_and_b(user)
    if "biased" in user:
        return 200, "A looks fine. [[A]]"
    if ("correct" in a) == ("correct" in b):
        return 200, "Equal. [[C]]"
    return 200, "[[A]]" if "correct" in a else "Clearly [[B]] wins."


def test_parsing_and_intervals():
    assert parse_rating("first [[3]] then Rating: [[8]]") == 8.0
    assert parse_rating("Rating: [[7.5]]") == 7.5
    assert parse_rating("Rating: [[11]]") is None and parse_rating("Rating: 8") is None
    assert parse_verdict("[[B]] ... final verdict: [[C]]") == "C" and parse_verdict("A is better") is None
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_single_grading_with_cache_and_api_key(tmp_path):
    items = [
        {"question": "q1", "answer": "a good answer"},
        {"question": "q2", "answer": "a bad answer", "reference": "ref"},
        {"question": "q3", "answer": "garbled"},
        {"question": "q4", "answer": "good again"},
    ]
    with fake_openai(judge_reply) as (url, received):
        client = ChatClient(url, "judge-1", api_key="sk-test", cache_dir=tmp_path / "cache")
        summary, judgments = grade_single(client, items)
        assert len(received) == 4 and received[0]["authorization"] == "Bearer sk-test"
        assert received[0]["model"] == "judge-1"
        assert "[The Start of Reference Answer]\nref" in received[1]["messages"][1]["content"]
        again, _ = grade_single(client, items)
        assert len(received) == 4  # every judgment came from the cache
    assert again == summary
    assert [j["rating"] for j in judgments] == [9.0, 2.0, None, 9.0]
    assert summary["rated"] == 3 and summary["unparsed"] == 1
    assert summary["mean_rating"] == pytest.approx(20 / 3)
    sd = ((9 - 20 / 3) ** 2 * 2 + (2 - 20 / 3) ** 2) ** 0.5 / 2**0.5
    assert summary["ci95"] == pytest.approx([20 / 3 - 1.96 * sd / 3**0.5, 20 / 3 + 1.96 * sd / 3**0.5])


def test_pairwise_swaps_positions_and_counts_order_dependent_verdicts_as_ties(tmp_path):
    questions = ["q1", "q2", "q3 biased", "q4"]
    answers_a = ["correct", "wrong", "correct", "correct too"]
    answers_b = ["wrong", "correct", "wrong", "correct"]
    with fake_openai(judge_reply) as (url, received):
        summary, judgments = compare_pairwise(ChatClient(url, "j"), questions, answers_a, answers_b)
    assert len(received) == 8
    # the second request of each pair shows B's answer first
    assert _answer_a_and_b(received[1]["messages"][1]["content"]) == ("wrong", "correct")
    assert [j["outcome"] for j in judgments] == ["win", "loss", "tie", "tie"]
    assert [(j["verdict_ab"], j["verdict_ba"]) for j in judgments][2] == ("A", "A")
    assert (summary["win"], summary["tie"], summary["loss"]) == (1, 2, 1)
    assert summary["order_agreement"] == 0.75  # only the biased question disagrees with itself
    assert summary["tie_ci95"] == pytest.approx(list(wilson_interval(2, 4)))


def test_retries_429_and_5xx_with_backoff_then_fails_clearly_on_4xx():
    calls = {"n": 0}

    def flaky(payload):
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, "slow down"
        if calls["n"] == 2:
            return 503, "overloaded"
        return 200, "Rating: [[6]]"

    waits: list[float] = []
    with fake_openai(flaky) as (url, received):
        client = ChatClient(url, "j", backoff_s=0.25, sleep=waits.append)
        assert client.complete("rate the response", "x") == "Rating: [[6]]"
    assert len(received) == 3 and waits == [0.0, 0.5]  # Retry-After: 0, then 0.25 * 2**1

    with fake_openai(lambda payload: (401, "invalid api key")) as (url, received):
        with pytest.raises(JudgeError, match=r"401: .*invalid api key"):
            ChatClient(url, "j", sleep=waits.append).complete("s", "u")
        assert len(received) == 1  # a client error is not retried

    with fake_openai(lambda payload: (500, "boom")) as (url, received):
        with pytest.raises(JudgeError, match=r"after 2 retries .*500"):
            ChatClient(url, "j", max_retries=2, sleep=lambda s: None).complete("s", "u")
        assert len(received) == 3


def test_judge_command_pairwise(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"question": f"q{i}", "answer": "correct"}) + "\n" for i in range(3)))
    b.write_text("".join(json.dumps({"question": f"q{i}", "answer": "nope"}) + "\n" for i in range(3)))
    monkeypatch.setenv("JUDGE_KEY", "sk-env")
    with fake_openai(judge_reply) as (url, received):
        argv = ["judge", "pairwise", "--answers-a", str(a), "--answers-b", str(b)]
        argv += [
            "--judge-url",
            url,
            "--judge-model",
            "j",
            "--api-key-env",
            "JUDGE_KEY",
            "--out",
            str(tmp_path / "o"),
        ]
        assert main(argv) == 0
    assert {r["authorization"] for r in received} == {"Bearer sk-env"}
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["win"] == 3 and summary["order_agreement"] == 1.0
    assert len((tmp_path / "o" / "judgments.jsonl").read_text().splitlines()) == 3
    assert any((tmp_path / "o" / "cache").iterdir())

    with fake_openai(lambda payload: (400, "bad model")) as (url, _):
        argv[argv.index("--judge-url") + 1] = url
        argv[-1] = str(tmp_path / "o2")
        with pytest.raises(SystemExit, match=r"400: .*bad model"):
            main(argv)
