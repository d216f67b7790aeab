"""A fake OpenAI-compatible chat endpoint on 127.0.0.1, answering with a function of the request."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextmanager
def fake_openai(reply: Callable[[dict[str, Any]], tuple[int, str]]) -> Iterator[tuple[str, list[dict]]]:
    """Serve ``POST /v1/chat/completions``; ``reply(payload)`` gives (status, content or error message).
    Yields the base URL and the list of payloads received (with their Authorization header)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({**payload, "authorization": self.headers.get("Authorization")})
            if self.path != "/v1/chat/completions":
                status, content = 404, "not found"
            else:
                status, content = reply(payload)
            if status == 200:
                body = {
                    "id": "x",
                    "object": "chat.completion",
                    "model": payload["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                }
            else:
                body = {"error": {"message": content, "type": "fake", "code": status}}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
