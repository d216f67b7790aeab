"""The server's front door (pure ASGI middleware): the API key is checked, and the body size capped, before
a request body is read.

- A protected path without the right ``Authorization: Bearer KEY`` gets 401 at once, whatever its body: an
  unauthenticated client learns nothing about the request schema and costs no parsing.
- A body larger than ``max_body_bytes`` gets 413: at once when ``Content-Length`` says so, else as soon as
  a streamed (chunked) body passes the limit. The server never holds more than the limit of one request's
  body.

Protected: the API (``/v1/...``, ``/tokenize``, ``/detokenize``, ``/tokenizer_info``), plus ``/metrics``
and the OpenAPI pages when asked; ``/health`` and the chat page stay open (the page sends the key it is
given).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from lmforge.serve.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


async def _respond(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        protect_metrics: bool = False,
        protect_docs: bool = False,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.protected = (
            API_PREFIXES + (("/metrics",) if protect_metrics else ()) + (DOCS_PATHS if protect_docs else ())
        )

    def _authorized(self, scope: Scope) -> str | None:
        """None when the request may pass, else why not."""
        if self.api_key is None or not scope["path"].startswith(self.protected):
            return None
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "missing API key: send 'Authorization: Bearer <key>'"
        if not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
            return "incorrect API key"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._authorized(scope)
        if refusal is not None:
            await _respond(send, 401, refusal, "invalid_api_key")
            return
        limit = self.max_body_bytes
        too_large = f"the request body is larger than the server's limit of {limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                await _respond(send, 413, too_large, "body_too_large")
                return
            await self.app(scope, receive, send)  # the HTTP server holds the client to its Content-Length
            return
        # a streamed (chunked) body: read it up to the limit here, then hand it on in one piece; later
        # receive() calls (a streaming response watching for the client to leave) go to the server
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _respond(send, 413, too_large, "body_too_large")
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
