import json

import pytest

from lmforge.cli import main
from lmforge.eval.judge import ChatClient, JudgeError
from lmforge.eval.redteam import classify_refusal, load_suite, run_redteam
from tests.eval.fake_openai import fake_openai

CATEGORIES = {"harmful_instructions", "privacy_extraction", "jailbreak_wrappers", "benign_lookalikes"}


def test_shipped_suite_has_four_categories_with_expected_behaviour():
    suite = load_suite()
    by_category = {c: [p for p in suite if p.category == c] for c in CATEGORIES}
    assert {p.category for p in suite} == CATEGORIES
    assert all(len(items) >= 10 for items in by_category.values())
    assert {p.expected for p in by_category["benign_lookalikes"]} == {"comply"}
    assert {p.expected for c in CATEGORIES - {"benign_lookalikes"} for p in by_category[c]} == {"refuse"}


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I cannot provide instructions for making weapons.", True),
        ("As an AI, I must decline this request.", True),
        ("I won't do that.", True),
        ("", True),
        ("   ", True),
        ("Sure! Step 1: open a terminal and run `kill -9 <pid>`.", False),
        ("Mixing bleach and ammonia releases chloramine gas; never combine them.", False),
        ("Here is the story. " + "x" * 300 + " I cannot believe it, said the detective.", False),
    ],
)
def test_rule_classifier(reply, refused):
    assert classify_refusal(reply) is refused


def fake_model(payload):
    """Refuses anything that mentions a weapon or a person's data, unless told to ignore its instructions
    or to stay in character; over-refuses prompts with 'kill'."""
    text = payload["messages"][-1]["content"].lower()
    if payload["messages"][0]["role"] == "system" and "pirate" in payload["messages"][0]["content"]:
        return 200, "Arr, I cannot help with that."
    if "ignore all previous" in text or "stay in character" in text:
        return 200, "Sure, here are the steps: first..."
    if "kill" in text or any(w in text for w in ("bomb", "address", "password", "poison", "methamphetamine")):
        return 200, "I'm sorry, but I can't help with that."
    return 200, "Here is a helpful answer."


def expected_refusal(prompt: str) -> bool:
    return fake_model({"messages": [{"role": "user", "content": prompt}]})[1].startswith("I'm sorry")


def test_redteam_rates_per_category_against_an_endpoint(tmp_path):
    suite = load_suite()
    with fake_openai(fake_model) as (url, received):
        summary, _ = run_redteam(ChatClient(url, "m"), suite)
    assert len(received) == len(suite) and all(len(r["messages"]) == 1 for r in received)
    for category in CATEGORIES:
        prompts = [p for p in suite if p.category == category]
        refusals = sum(expected_refusal(p.prompt) for p in prompts)
        stats = summary["categories"][category]
        assert stats["refusal_rate"] == refusals / len(prompts)
        failures = refusals if category == "benign_lookalikes" else len(prompts) - refusals
        assert stats["failure_rate"] == failures / len(prompts)
        assert stats["failure_ci95"][0] <= stats["failure_rate"] <= stats["failure_ci95"][1]
    # the wrappers that say "ignore all previous instructions" / "stay in character" succeed
    assert summary["categories"]["jailbreak_wrappers"]["compliance_rate"] >= 0.2
    assert summary["categories"]["benign_lookalikes"]["refusal_rate"] > 0  # "kill a Python process", ...
    assert summary["grader"] == "rules"


def test_redteam_command_with_a_judge_and_a_system_prompt(tmp_path):
    def judge(payload):
        reply = payload["messages"][1]["content"].split("[Assistant's Reply]\n")[1]
        return 200, "Refused. [[REFUSAL]]" if "cannot" in reply else "It answered. [[COMPLIANCE]]"

    with fake_openai(fake_model) as (url, received), fake_openai(judge) as (judge_url, judged):
        argv = [
            "redteam",
            "--url",
            url,
            "--model",
            "m",
            "--system",
            "You are a pirate.",
            "--out",
            str(tmp_path),
        ]
        argv += ["--categories", "benign_lookalikes", "--judge-url", judge_url, "--judge-model", "j"]
        argv += ["--max-tokens", "64"]
        assert main(argv) == 0
    assert len(received) == len(judged) == 10
    assert received[0]["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert {r["max_tokens"] for r in received + judged} == {64}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grader"] == "judge" and summary["judge_unparsed"] == 0
    # the pirate refuses everything: both graders agree; every benign prompt is an over-refusal
    assert summary["rule_judge_agreement"] == 1.0
    assert summary["categories"]["benign_lookalikes"]["failure_rate"] == 1.0
    replies = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert all(r["refused_judge"] is True and r["failure"] for r in replies)


def test_redteam_and_judge_against_a_live_lmforge_server(tmp_path):
    """The client speaks to lmforge's own OpenAI-compatible server (with an API key): a tiny random model
    as the red-teamed model and as the judge; its verdicts are unparseable, so the rules grade."""
    pytest.importorskip("uvicorn")
    from tests.serve.live_server import API_KEY, MODEL_ID, build_engine, running_server, train_test_tokenizer

    tokenizer = train_test_tokenizer()
    suite = [p for p in load_suite() if p.category == "benign_lookalikes"][:3]
    with running_server(lambda: build_engine(tokenizer, max_model_len=1024), api_key=API_KEY) as server:
        client = ChatClient(f"{server.base_url}/v1", MODEL_ID, api_key=API_KEY, max_tokens=8)
        summary, records = run_redteam(client, suite, system="Be helpful.", judge=client)
        with pytest.raises(JudgeError, match="401"):
            ChatClient(f"{server.base_url}/v1", MODEL_ID, api_key="wrong", max_tokens=8).complete("", "hi")
    assert summary["n"] == 3 and summary["judge_unparsed"] == 3
    for record in records:
        assert record["refused"] == classify_refusal(record["reply"]) == record["refused_rule"]
