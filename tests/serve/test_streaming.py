import asyncio
import json

from lmforge.serve.errors import APIError
from lmforge.serve.schemas import Usage
from lmforge.serve.streaming import DONE, sse_event, sse_with_errors


def test_events_are_single_data_lines():
    event = sse_event({"text": "line one\nline two", "emoji": "日本"})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert event.count("\n") == 2  # JSON escapes the newline: one data line per event
    assert json.loads(event[len("data: ") :]) == {"text": "line one\nline two", "emoji": "日本"}
    assert "日本" in event  # UTF-8 on the wire, not \\u escapes
    usage = sse_event(Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3))
    assert json.loads(usage[6:]) == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert DONE == "data: [DONE]\n\n"


def collect(events) -> list[str]:
    async def run() -> list[str]:
        return [event async for event in sse_with_errors(events)]

    return asyncio.run(run())


def test_an_error_after_the_headers_becomes_an_error_event_then_done():
    async def failing():
        yield sse_event({"n": 1})
        raise APIError(500, "engine step failed", code="engine_error")

    events = collect(failing())
    assert events[0] == sse_event({"n": 1})
    error = json.loads(events[1][6:])["error"]
    assert (error["message"], error["type"], error["code"]) == (
        "engine step failed",
        "internal_server_error",
        "engine_error",
    )
    assert events[2] == DONE
