"""Server-sent events framing as the OpenAI API writes it, and cancellation on client disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmforge.serve.errors import APIError, error_body

T = TypeVar("T")

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    """One ``data: {json}`` event; JSON never contains a raw newline, so one data line suffices."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_with_errors(events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """Pass events through; once the 200 headers are sent, an error can only travel as an event.

    OpenAI does the same: the error envelope as a data event, then ``[DONE]``, so clients raise it.
    Closing this generator closes ``events`` too.
    """
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except APIError as err:
        yield sse_event(error_body(err.status, err.message, err.param, err.code))
        yield DONE


class EventStreamResponse(StreamingResponse):
    """A streaming response that always closes its event generator when it ends, however it ends.

    When the client disconnects while a chunk is being sent, Starlette cancels the send, not the
    generator, which stays suspended at its ``yield``; its cleanup (aborting the engine request) would wait
    for garbage collection. Closing it here runs that cleanup at once.
    """

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


def sse_response(events: AsyncGenerator[str, None]) -> EventStreamResponse:
    return EventStreamResponse(sse_with_errors(events))


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it when the client goes away (a non-streaming request, whose handler
    would otherwise keep generating for nobody). The cancelled work's own cleanup aborts the engine
    request. Streaming responses need no help: Starlette cancels their generator on disconnect."""
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task in done:
            return work_task.result()
        work_task.cancel()
        raise APIError(499, "client disconnected", code="client_closed_request")
    finally:
        for task in (work_task, disconnect_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(work_task, disconnect_task, return_exceptions=True)
