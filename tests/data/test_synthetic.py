"""Self-Instruct and model labelling against OpenAI-compatible endpoints (fakes on 127.0.0.1 / in-process)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.data.synthetic import (
    Endpoint,
    EndpointError,
    SelfInstructConfig,
    instruction_problem,
    label_records,
    parse_instructions,
    rouge_l,
    self_instruct,
)


def test_rouge_l_equals_the_rouge_score_package() -> None:
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("Write a poem about the sea.", "Write a short poem about the deep blue sea!"),
        ("Translate this sentence into French.", "Summarize the following paragraph."),
        ("List three prime numbers", "list 3 prime numbers"),
        ("a b c d e", "e d c b a"),
    ]
    for a, b in pairs:
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)


def test_list_parsing_and_instruction_filters() -> None:
    assert parse_instructions(" Name a fruit.\n10. Sort these words.\n11) Say hi", 9) == [
        "Name a fruit.",
        "Sort these words.",
        "Say hi",
    ]
    cfg = SelfInstructConfig()
    assert instruction_problem("Explain gravity to a child.", cfg) is None
    assert instruction_problem("Hi there", cfg) == "too_short"
    assert instruction_problem("Draw a map of your town.", cfg) == "blocklist: map"
    assert instruction_problem("- List some birds please", cfg) == "starts_with_punctuation"
    assert instruction_problem("Describe the maple tree in spring.", cfg) is None  # "map" only as a word


class ScriptedEndpoint(Endpoint):
    """Answers completions from a script and chats with an echo (an empty reply for one instruction)."""

    def __init__(self, completions: list[str]) -> None:
        super().__init__()
        self.completions = completions

    def post(self, path: str, body: dict) -> dict:
        if path == "/v1/completions":
            if not self.completions:
                raise EndpointError("script exhausted")
            return {"choices": [{"text": self.completions.pop(0)}]}
        question = body["messages"][0]["content"]
        return {"choices": [{"message": {"content": "" if "silence" in question else f"Answer: {question}"}}]}


def test_self_instruct_keeps_new_instructions_and_writes_every_rejection_with_its_reason() -> None:
    seeds = ["Write a haiku about autumn leaves.", "Explain how a bicycle stays upright."]
    endpoint = ScriptedEndpoint(
        [
            " Give three tips for learning a language.\n4. Write a haiku about autumn leaves falling.\n"
            "5. Plot a graph of the stock prices.\n6. Keep silence for a minute please.",
            " Describe how bread rises in the oven.\n4. Ok",
        ]
    )
    written, rejected = [], []
    cfg = SelfInstructConfig(count=2, prompt_tasks=2, max_requests=5)
    report = self_instruct(seeds, endpoint, cfg, written.append, rejected.append, progress=False)
    assert [w["messages"][0]["content"] for w in written] == [
        "Give three tips for learning a language.",
        "Describe how bread rises in the oven.",
    ]
    assert written[0]["messages"][1] == {
        "role": "assistant",
        "content": "Answer: Give three tips for learning a language.",
    }
    assert report.to_dict() == {
        "accepted": 2,
        "requests": 2,
        "rejected": {"similar_to_pool": 1, "blocklist": 1, "empty_response": 1},
    }
    assert {r["reason"] for r in rejected} == {"similar_to_pool", "blocklist: graph", "empty_response"}


def test_labels_and_agreement_with_gold() -> None:
    class Labeller(Endpoint):
        def post(self, path: str, body: dict) -> dict:
            text = body["prompt"].rsplit("Text: ", 1)[1]
            return {
                "choices": [
                    {"text": " not spam" if "meeting" in text else (" SPAM!" if "win" in text else " ?")}
                ]
            }

    records = [
        {"text": "win money now", "label": "spam"},
        {"text": "meeting at 3", "label": "not spam"},
        {"text": "win a meeting", "label": "spam"},  # the model says not spam: a disagreement
        {"text": "hello"},  # unparsable answer: rejected with the reason
    ]
    written, rejected = [], []
    report = label_records(
        records, Labeller(), ["spam", "not spam"], [("buy now", "spam")], written.append, rejected.append
    )
    assert [w["model_label"] for w in written] == ["spam", "not spam", "not spam"]
    assert report.agreement == pytest.approx(2 / 3) and report.unparsed == 1
    assert rejected[0]["reason"] == "unparsed_label"


class Flaky(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        if body["prompt"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad request"}}')
            return
        if type(self).calls <= 2:
            self.send_response(503)
            self.end_headers()
            return
        payload = json.dumps({"choices": [{"text": "ok"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def test_retries_on_5xx_and_a_clear_error_on_4xx() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = Endpoint(url=f"http://127.0.0.1:{server.server_port}", backoff_s=0.01)
        assert endpoint.complete("hello", 4, 0.0) == "ok"
        assert Flaky.calls == 3  # two 503s, then the answer
        with pytest.raises(EndpointError, match="refused the request: HTTP 400"):
            endpoint.complete("bad", 4, 0.0)
        assert Flaky.calls == 4  # a 4xx is not retried
    finally:
        server.shutdown()


def test_requests_have_the_shape_lmforge_serve_accepts() -> None:
    pytest.importorskip("fastapi")
    from tests.serve.live_server import MODEL_ID, build_engine, running_server, train_test_tokenizer

    tokenizer = train_test_tokenizer()
    with running_server(lambda: build_engine(tokenizer, max_model_len=256)) as server:
        endpoint = Endpoint(url=server.base_url, model=MODEL_ID, retries=0)
        rejected: list[dict] = []
        cfg = SelfInstructConfig(count=2, max_requests=2, max_tokens=24, min_words=1)
        report = self_instruct(
            ["Say hello to the world."], endpoint, cfg, lambda r: None, rejected.append, progress=False
        )
        assert report.requests == 2
        assert not [r for r in rejected if r["reason"].startswith(("request_failed", "response_failed"))]
        labelled = label_records(
            [{"text": "hello"}], endpoint, ["a", "b"], [], lambda r: None, rejected.append
        )
        assert labelled.failed == 0


class ServedModel(ScriptedEndpoint):
    """Continues the task list once, labels texts containing "win" as spam, and echoes chats."""

    def __init__(self) -> None:
        super().__init__([" Name two rivers in Europe.\n3. Draw a cat."])

    def post(self, path: str, body: dict) -> dict:
        prompt = body.get("prompt", "")
        if path == "/v1/completions" and prompt.startswith("Classify"):
            return {"choices": [{"text": " spam" if "win" in prompt.rsplit("Text:", 1)[1] else " ham"}]}
        return super().post(path, body)


def test_the_commands_write_examples_labels_and_rejects(tmp_path, monkeypatch, capsys) -> None:
    from lmforge.cli import main
    from lmforge.data import commands

    monkeypatch.setattr(commands, "_endpoint", lambda args: ServedModel())
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Write a haiku about autumn leaves."}) + "\n")
    out = tmp_path / "chats.jsonl"
    assert main(["data", "self-instruct", "--seeds", str(seeds), "--out", str(out), "--count", "1"]) == 0
    assert json.loads(out.read_text())["messages"][0]["content"] == "Name two rivers in Europe."
    texts = tmp_path / "texts.jsonl"
    rows = [{"text": "win now", "label": "spam"}, {"text": "hi", "label": "spam"}]
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labelled = tmp_path / "labelled.jsonl"
    args = [
        "data",
        "label",
        str(texts),
        "--labels",
        "spam",
        "ham",
        "--example",
        "spam=buy now",
        "--out",
        str(labelled),
    ]
    assert main(args) == 0
    assert [json.loads(line)["model_label"] for line in labelled.read_text().splitlines()] == ["spam", "ham"]
    assert '"agreement": 0.5' in capsys.readouterr().out


def test_a_label_example_without_a_label_is_a_usage_error(capsys) -> None:
    from lmforge.cli import main

    with pytest.raises(SystemExit) as info:
        main(["data", "label", "x.jsonl", "--labels", "a", "--example", "no label here", "--out", "y.jsonl"])
    assert info.value.code == 2 and "is not LABEL=TEXT" in capsys.readouterr().err
