"""The FastAPI application: OpenAI-compatible endpoints, tokenizer utilities, health, metrics, chat page.

The model loads in a background thread once the server starts, so ``/health`` answers 503 (and the
model endpoints refuse with 503) until it is ready, which lets orchestrators and tests wait on it.

With ``engine_mode="process"`` (``lmforge serve``'s default) the engine runs in its own process
(:mod:`lmforge.serve.engine_process`); with ``"thread"`` in a thread of this one (:mod:`.async_engine`).
While an engine process is down (it died and is restarting) ``/health`` answers 503 too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lmforge.infer import EngineStats, LLMEngine
from lmforge.infer.lora import LoraWeights
from lmforge.serve.async_engine import AsyncEngine
from lmforge.serve.completions import OpenAIServing
from lmforge.serve.embeddings import EmbeddingService, embedding_response
from lmforge.serve.engine_process import ProcessEngine
from lmforge.serve.errors import APIError, install_error_handlers
from lmforge.serve.guard import RequestGuard
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    UnloadLoraAdapterRequest,
    now,
)

logger = logging.getLogger(__name__)


LoraLoader = Callable[[Any, str], LoraWeights]  # (base model config, adapter folder) -> the adapter's tensors
ENGINE_MODES = ("process", "thread")


class ServerState:
    """The engine once loaded (or why it failed), shared by all requests of one app."""

    def __init__(
        self,
        load_engine: Callable[[], LLMEngine],
        model_id: str,
        max_active_requests: int,
        loras: dict[str, str] | None = None,
        load_lora: LoraLoader | None = None,
        engine_mode: str = "thread",
    ) -> None:
        if engine_mode not in ENGINE_MODES:
            raise ValueError(f"engine_mode: one of {ENGINE_MODES}, got {engine_mode!r}")
        self.engine_mode = engine_mode
        self.load_engine = load_engine
        self.model_id = model_id
        self.loras = dict(loras or {})  # adapter name -> folder (served at start, then as loaded/unloaded)
        self.load_lora = load_lora
        self.max_active_requests = max_active_requests
        self.created = now()
        self.engine: AsyncEngine | ProcessEngine | None = None
        self.serving: OpenAIServing | None = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics(self.engine_stats)
        self._lock = threading.Lock()
        self._closed = False

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def start_loading(self) -> None:
        """Load in a background thread; called on the event loop that will serve (an engine process's pipe
        is read there)."""
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="lmforge-model-loader", daemon=True).start()

    def _load(self) -> None:
        engine: AsyncEngine | ProcessEngine
        if self.engine_mode == "process":  # the core process loads the model and the adapters
            try:
                engine = ProcessEngine(self.load_engine, self._loop, self.metrics, self.loras, self.load_lora)
            except Exception as err:
                logger.exception("starting the engine process failed")
                self.load_error = (
                    f"{type(err).__name__}: {err}" if not isinstance(err, RuntimeError) else str(err)
                )
                return
            self._serve(engine)
            return
        try:
            llm = self.load_engine()
            for name, folder in self.loras.items():
                if self.load_lora is None:
                    raise ValueError("LoRA adapters given but no adapter loader")
                try:
                    llm.add_lora(name, self.load_lora(llm.model.cfg, folder))
                except Exception as err:
                    raise ValueError(f"the LoRA adapter {name}={folder}: {err}") from err
            engine = AsyncEngine(llm, self.metrics)
        except Exception as err:
            logger.exception("loading the model failed")
            self.load_error = f"{type(err).__name__}: {err}"
            return
        self._serve(engine)

    def _serve(self, engine: AsyncEngine | ProcessEngine) -> None:
        with self._lock:
            if self._closed:  # the server stopped while the model was loading
                engine.shutdown()
                return
            self.serving = OpenAIServing(engine, self.model_id, self.max_active_requests)
            self.engine = engine
        logger.info("model %s loaded; serving", self.model_id)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            engine = self.engine
        if engine is not None:
            engine.shutdown()

    def check_engine(self) -> None:
        """503 while the engine cannot take requests (its process died and is restarting)."""
        reason = self.engine.unavailable_reason if self.engine is not None else None
        if reason is not None:
            raise APIError(503, reason, code="engine_unavailable")

    def ready(self) -> OpenAIServing:
        if self.serving is None:
            if self.load_error is not None:
                raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(503, "the model is still loading", code="model_loading")
        return self.serving


def chat_page() -> str:
    return files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def create_app(
    load_engine: Callable[[], LLMEngine],
    model_id: str,
    api_key: str | None = None,
    max_active_requests: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    protect_metrics: bool = False,
    protect_docs: bool = False,
    loras: dict[str, str] | None = None,
    load_lora: LoraLoader | None = None,
    allow_lora_loading: bool = False,
    embeddings: EmbeddingService | None = None,
    engine_mode: str = "thread",
) -> FastAPI:
    """The server app. ``load_engine`` runs in a background thread at start-up; ``model_id`` is the name
    clients use in ``model``; requests beyond ``max_active_requests`` in flight get a 429. With ``api_key``
    the API (and, when asked, ``/metrics`` and the OpenAPI pages) needs ``Authorization: Bearer KEY``,
    checked before the body is read; bodies over ``max_body_bytes`` get a 413 (see ``guard.py``).

    ``loras`` (name -> adapter folder) are served next to the base model from the start, read by
    ``load_lora``; a request picks one by its ``model`` field. With ``allow_lora_loading``,
    ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` change the set at run time.
    ``embeddings`` serves ``/v1/embeddings`` (a 404 without it).

    ``engine_mode`` "process" runs the engine in its own process (then ``load_engine`` and ``load_lora``
    must be picklable: module-level functions or ``functools.partial``s of them); "thread" in a thread of
    this process."""
    state = ServerState(load_engine, model_id, max_active_requests, loras, load_lora, engine_mode)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        state.shutdown()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        protect_metrics=protect_metrics,
        protect_docs=protect_docs,
    )
    page = chat_page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        state.ready()
        state.check_engine()
        return JSONResponse({"status": "ok", "model": model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter()

    def card(serving: OpenAIServing, name: str | None) -> ModelCard:
        context = serving.engine.max_model_len
        if name is None:
            return ModelCard(id=model_id, created=state.created, max_model_len=context)
        root = state.loras.get(name)
        return ModelCard(id=name, created=state.created, max_model_len=context, root=root, parent=model_id)

    @api.get("/v1/models")
    async def list_models() -> ModelList:
        serving = state.ready()
        return ModelList(data=[card(serving, name) for name in [None, *serving.engine.lora_names]])

    @api.get("/v1/models/{name}")
    async def get_model(name: str) -> ModelCard:
        serving = state.ready()
        return card(serving, serving.check_model(name))

    def check_lora_loading() -> OpenAIServing:
        serving = state.ready()
        if not allow_lora_loading:
            raise APIError(
                403,
                "loading adapters at run time is off; start the server with --allow-lora-loading",
                None,
                "lora_loading_disabled",
            )
        return serving

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraAdapterRequest) -> JSONResponse:
        serving = check_lora_loading()
        if req.lora_name == model_id or req.lora_name in serving.engine.lora_names:
            raise APIError(400, f"the name {req.lora_name!r} is taken", "lora_name", "invalid_value")
        assert load_lora is not None
        try:
            # reading and checking the folder is blocking work: off the event loop
            weights = await asyncio.to_thread(load_lora, serving.engine.model_config, req.lora_path)
            await serving.engine.add_lora(req.lora_name, weights)
        except (ValueError, OSError) as err:  # a bad or unreadable folder is the caller's
            raise APIError(400, f"cannot load the adapter: {err}", "lora_path", "invalid_value") from err
        state.loras[req.lora_name] = req.lora_path
        return JSONResponse({"status": "ok", "lora_name": req.lora_name})

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraAdapterRequest) -> JSONResponse:
        serving = check_lora_loading()
        try:
            await serving.engine.remove_lora(req.lora_name)
        except KeyError:
            raise APIError(
                404, f"no adapter named {req.lora_name!r} is loaded", "lora_name", "model_not_found"
            ) from None
        except ValueError as err:
            raise APIError(409, str(err), "lora_name", "adapter_in_use") from err
        state.loras.pop(req.lora_name, None)
        return JSONResponse({"status": "ok", "lora_name": req.lora_name})

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await state.ready().completions(req, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await state.ready().chat(req, request)

    @api.post("/v1/embeddings")
    async def create_embeddings(req: EmbeddingRequest) -> JSONResponse:
        serving = state.ready()
        if serving.check_model(req.model) is not None:
            raise APIError(
                400, "model: embeddings come from the base model, not an adapter", "model", "invalid_value"
            )
        if embeddings is None:
            raise APIError(404, "this server does not serve embeddings", None, "embeddings_not_served")
        rows = await asyncio.to_thread(embeddings.token_rows, req)
        if req.dimensions is not None and req.dimensions != embeddings.dimensions:
            raise APIError(
                400,
                f"dimensions: this model's embeddings have {embeddings.dimensions}",
                "dimensions",
                "invalid_value",
            )
        vectors = await asyncio.to_thread(embeddings.embed, rows)
        tokens = sum(map(len, rows))
        return JSONResponse(embedding_response(req.model or model_id, vectors, tokens, req.encoding_format))

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        serving = state.ready()
        serving.check_model(req.model)
        if req.messages is not None:
            tokens = (await serving.encode_chat(req.messages, req.add_generation_prompt)).token_ids
        else:
            tokens = await serving.encode_text(req.prompt or "", req.add_special_tokens, "prompt")
        return TokenizeResponse(count=len(tokens), max_model_len=serving.engine.max_model_len, tokens=tokens)

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        serving = state.ready()
        serving.check_model(req.model)
        serving.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(req.tokens))

    @api.get("/tokenizer_info")
    async def tokenizer_info() -> TokenizerInfo:
        """What a client needs to tokenize on its own (vLLM's endpoint; lm-evaluation-harness's remote
        tokenizer reads it together with /tokenize and /detokenize)."""
        tok = state.ready().tokenizer
        return TokenizerInfo(
            tokenizer_class="PreTrainedTokenizerFast",
            vocab_size=tok.vocab_size,
            model_max_length=state.ready().engine.max_model_len,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            pad_token=tok.pad_token,
            unk_token=tok.unk_token,
            add_bos_token=tok.add_bos_token,
            chat_template=tok.chat_template,
        )

    app.include_router(api)
    return app
