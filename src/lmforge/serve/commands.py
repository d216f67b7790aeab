"""``lmforge serve MODEL_DIR``: an OpenAI-compatible HTTP server with a chat page at ``/``."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.infer.commands import add_engine_speed_arguments, add_sink_arguments

if TYPE_CHECKING:
    from lmforge.infer import EngineConfig, LLMEngine

# float32 / float16: the model is loaded in that dtype. bfloat16 / auto: loaded in fp32, then the engine's
# dtype option casts it (bfloat16: blocks and KV cache, fp32 head and logits; auto: packed bf16 weights on CPUs
# with native bf16 matmul, as measured fastest there).
DTYPES = ("float32", "bfloat16", "float16", "auto")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model folder over the OpenAI API (with a chat page at /)",
        description="Serve a Hugging Face-layout model folder: /v1/models, /v1/completions, /v1/chat/completions, "
        "/v1/embeddings (pooled final hidden states; an `lmforge embed` folder's pooling), "
        "/tokenize, /detokenize, /health, /metrics, and a chat web page at /.",
    )
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="model folder (config.json, weights, tokenizer) or Hugging Face Hub id org/name[@revision]",
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
        "--max-request-mb",
        type=float,
        default=8.0,
        help="largest request body accepted, MiB; larger ones get 413 (default: 8)",
    )
    parser.add_argument(
        "--protect-metrics", action="store_true", help="with --api-key, /metrics needs the key too"
    )
    parser.add_argument(
        "--protect-docs", action="store_true", help="with --api-key, the OpenAPI pages need the key too"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    adapters = parser.add_argument_group("LoRA adapters")
    adapters.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=ADAPTER_DIR",
        help="serve a LoRA adapter folder (peft layout) next to the base model as model NAME; repeatable",
    )
    adapters.add_argument(
        "--prompt-adapter",
        metavar="ADAPTER_DIR",
        help="serve the base model behind a prompt-tuning, P-tuning or prefix-tuning adapter (peft layout): "
        "every request starts after its virtual tokens",
    )
    adapters.add_argument(
        "--allow-lora-loading",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read server-side paths)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--device", default="cpu", help="torch device of the model and KV cache (default: cpu)"
    )
    engine.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="weights and KV cache: float32, float16, bfloat16 (logits stay fp32) or auto (on CPUs with "
        "avx512_bf16/amx_bf16: fp32 activations and KV cache, packed bf16 weights; elsewhere fp32) "
        "(default: float32)",
    )
    add_engine_speed_arguments(engine, with_dtype=False)
    engine.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on a CUDA device, run every decode step eagerly instead of replaying captured CUDA graphs",
    )
    engine.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    engine.add_argument("--max-model-len", type=int, help="context length (default: the model's max_seq_len)")
    engine.add_argument(
        "--kv-cache-mb", type=int, default=256, help="memory of the paged KV pool (default: 256)"
    )
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    add_sink_arguments(engine)
    engine.add_argument("--max-num-seqs", type=int, default=64, help="sequences run per step (default: 64)")
    engine.add_argument(
        "--no-prefix-caching", action="store_true", help="do not share the KV blocks of equal prompt prefixes"
    )
    engine.add_argument(
        "--engine-in-thread",
        action="store_true",
        help="run the engine in a thread of the HTTP process instead of its own process (the default: an "
        "engine process, restarted if it dies, so the HTTP side and the engine never share one GIL)",
    )
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from lmforge.hub import HubError, resolve_model_dir
    from lmforge.serve.app import create_app
    from lmforge.serve.embeddings import EmbeddingService
    from lmforge.tune.peft.serving import lora_weights

    try:
        model_dir = resolve_model_dir(args.model_dir)
    except HubError as err:
        print(f"lmforge serve: {err}", file=sys.stderr)
        return 2
    from_hub = model_dir != Path(args.model_dir)  # clients then name the model by its Hub id
    if not (model_dir / "config.json").is_file():
        print(f"lmforge serve: {model_dir} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    model_id = args.model_name or (args.model_dir if from_hub else model_dir.resolve().name)
    try:
        loras = parse_loras(args.lora, model_id)
    except ValueError as err:
        print(f"lmforge serve: --lora: {err}", file=sys.stderr)
        return 2
    config, load_dtype = engine_settings(args)
    if args.prompt_adapter and not (Path(args.prompt_adapter) / "adapter_config.json").is_file():
        print(
            f"lmforge serve: --prompt-adapter: {args.prompt_adapter} has no adapter_config.json",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # A partial of a module-level function: it is sent to the engine process (spawned, so pickled).
    load_engine = functools.partial(
        load_served_engine, model_dir, config, load_dtype, args.device, args.prompt_adapter, args.threads
    )
    app = create_app(
        load_engine,
        model_id=model_id,
        api_key=args.api_key,
        max_body_bytes=int(args.max_request_mb * 2**20),
        protect_metrics=args.protect_metrics,
        protect_docs=args.protect_docs,
        max_active_requests=args.max_active_requests,
        loras=loras,
        load_lora=lora_weights,
        allow_lora_loading=args.allow_lora_loading,
        embeddings=EmbeddingService(model_dir),
        engine_mode="thread" if args.engine_in_thread else "process",
    )
    # On Ctrl-C, streams still open get a few seconds to finish before they are cut (and aborted).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def engine_settings(args: argparse.Namespace) -> tuple[EngineConfig, str]:
    """The engine's config from ``lmforge serve``'s flags, and the dtype the model is loaded in."""
    from lmforge.infer import EngineConfig

    config = EngineConfig(
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_mb * 2**20,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(EngineConfig.max_num_batched_tokens, args.max_num_seqs),
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        sink_tokens=args.sink_tokens if args.sink_window else 0,
        sink_window=args.sink_window,
        dtype=args.dtype if args.dtype in ("bfloat16", "auto") else "model",
        fuse_projections=not args.no_fuse,
        pack_weights=args.pack_weights,
        cuda_graphs=not args.no_cuda_graphs,
    )
    return config, args.dtype if args.dtype == "float16" else "float32"


def load_served_engine(
    model_dir: Path,
    config: EngineConfig,
    dtype: str,
    device: str,
    prompt_adapter: str | None,
    threads: int | None,
) -> LLMEngine:
    """The engine ``lmforge serve`` runs: the folder's model behind ``prompt_adapter`` if given. Runs in the
    engine process (or the model-loading thread with ``--engine-in-thread``), so it sets torch's threads."""
    import torch

    from lmforge.infer import LLMEngine

    if threads:
        torch.set_num_threads(threads)
    engine = LLMEngine.from_pretrained(model_dir, config, dtype=getattr(torch, dtype), device=device)
    if prompt_adapter:
        serve_virtual_prefix(engine, prompt_adapter)
    return engine


def parse_loras(specs: list[str], model_id: str) -> dict[str, str]:
    """``NAME=ADAPTER_DIR`` flags as {name: folder}; each folder must hold an adapter_config.json."""
    loras: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise ValueError(f"{spec!r}: expected NAME=ADAPTER_DIR")
        if name == model_id or name in loras:
            raise ValueError(f"{spec!r}: the name {name!r} is already taken")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ValueError(f"{spec!r}: {folder} is not an adapter folder (no adapter_config.json)")
        loras[name] = folder
    return loras


def serve_virtual_prefix(engine: Any, folder: str) -> None:
    """Put a soft-prompt or prefix adapter in front of every request ``engine`` serves."""
    from lmforge.tune.peft.serving import virtual_prefix

    kind, tensors = virtual_prefix(engine.model.cfg, folder)
    if kind == "kv":
        engine.set_virtual_prefix(*tensors)
    else:
        engine.set_soft_prompt(tensors)
