"""``lmforge serve MODEL_DIR``: an OpenAI-compatible HTTP server with a chat page at ``/``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model folder over the OpenAI API (with a chat page at /)",
        description="Serve a Hugging Face-layout model folder: /v1/models, /v1/completions, /v1/chat/completions, "
        "/tokenize, /detokenize, /health, /metrics, and a chat web page at /.",
    )
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model folder (config.json, weights, tokenizer)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LMFORGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API (default: $LMFORGE_API_KEY, else no key)",
    )
    parser.add_argument("--model-name", help="model id clients send (default: the folder's name)")
    parser.add_argument(
        "--max-active-requests",
        type=int,
        default=256,
        help="requests in flight beyond this get 429 (default: 256)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lmforge.infer import LLMEngine
    from lmforge.serve.app import create_app

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"lmforge serve: {model_dir} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    model_id = args.model_name or model_dir.resolve().name
    app = create_app(
        lambda: LLMEngine.from_pretrained(model_dir),
        model_id=model_id,
        api_key=args.api_key,
        max_active_requests=args.max_active_requests,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
