"""``/v1/completions`` and ``/v1/chat/completions``: validated requests into engine requests (prompts,
budgets, sampling parameters, admission), their outputs handed to ``responses`` as a whole or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.infer import QueueFullError, RequestOutput, SamplingParams
from lmforge.serve.async_engine import AsyncEngine, EngineFailure, EngineUnavailable, RequestStream
from lmforge.serve.engine_process import ProcessEngine
from lmforge.serve.errors import APIError
from lmforge.serve.logprobs import TokenTexts
from lmforge.serve.responses import ChatAssembler, CompletionAssembler, Prompt
from lmforge.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    random_id,
    template_messages,
)
from lmforge.serve.streaming import cancel_on_disconnect, sse_response
from lmforge.tokenizer import Tokenizer

# End-of-turn markers of common chat formats: a chat reply also stops there (the EOS may come after it).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def max_prompt_chars(tokenizer: Tokenizer, context: int) -> int:
    """Characters above which a text cannot fit ``context`` tokens: no token covers more than the longest
    token's bytes (a character is at least one byte); x4 for normalizers that compose characters."""
    longest = max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size))
    return 4 * max(longest, 1) * context


def bad_request(err: ValueError) -> APIError:
    """A 400 for a refusal by ``SamplingParams`` or the engine, whose messages start with the field name."""
    message = str(err)
    field_name, sep, _ = message.partition(":")
    param = field_name if sep and field_name.isidentifier() else None
    return APIError(400, message, param, "invalid_value")


class OpenAIServing:
    def __init__(self, engine: AsyncEngine | ProcessEngine, model_id: str, max_active_requests: int) -> None:
        self.engine = engine
        self.model_id = model_id
        self.max_active_requests = max_active_requests
        self._reserved = 0  # admitted prompts not yet registered with the engine bridge
        self.tokenizer = engine.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, engine.max_model_len)
        self.end_of_turn_ids = [
            token_id
            for token_id in map(self.tokenizer.token_to_id, END_OF_TURN_TOKENS)
            if token_id is not None
        ]

    # -- shared checks -------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); 404 for unknown names."""
        if model is None or model == self.model_id:
            return None
        adapters = self.engine.lora_names
        if model in adapters:
            return model
        served = ", ".join(repr(m) for m in [self.model_id, *adapters])
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {served}",
            "model",
            "model_not_found",
        )

    def check_capacity(self, n_requests: int) -> None:
        if n_requests > self.max_active_requests:  # could never be admitted: retrying cannot help
            raise APIError(
                400,
                f"this request has {n_requests} prompts; the server runs at most {self.max_active_requests} at once",
                "prompt",
                "invalid_value",
            )
        active = self.engine.num_active + self._reserved
        if active + n_requests > self.max_active_requests:
            metrics = self.engine.metrics
            if metrics is not None:
                metrics.requests_rejected.inc()
            raise APIError(
                429,
                f"the server is busy ({active} requests in flight, limit "
                f"{self.max_active_requests}); retry later",
                None,
                "server_overloaded",
            )

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if t >= vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is outside the vocabulary (size {vocab})", param, "invalid_value"
            )

    def output_budget(
        self, prompt: Prompt, requested: int | None, param: str, prompt_param: str, sequences: int
    ) -> int:
        """Tokens to generate: as asked, or (when not given) all the room the context leaves, capped to
        what the KV pool can hold for ``sequences`` parallel sequences (the engine refuses more)."""
        context = self.engine.max_model_len
        length = len(prompt.token_ids)
        if length >= context:
            raise APIError(
                400,
                f"the prompt has {length} tokens but the model's context is {context} tokens",
                prompt_param,
                "context_length_exceeded",
            )
        if requested is None:
            return max(1, min(context, self.engine.kv_capacity_tokens // sequences) - length)
        if length + requested > context:
            raise APIError(
                400,
                f"this model's maximum context length is {context} tokens; the prompt has "
                f"{length} tokens and {param} asks for {requested} more",
                param,
                "context_length_exceeded",
            )
        return requested

    def sampling_params(
        self,
        req: SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None,
        extra_stop_ids: Sequence[int] = (),
    ) -> SamplingParams:
        if req.logit_bias:
            self.check_token_ids([int(k) for k in req.logit_bias], "logit_bias")
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        try:
            return SamplingParams(
                n=req.n, best_of=req.best_of, max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()}, stop=list(req.stop),
                stop_token_ids=[*(req.stop_token_ids or []), *extra_stop_ids], ignore_eos=req.ignore_eos,
                seed=req.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                use_beam_search=req.use_beam_search, length_penalty=req.length_penalty,
            )  # fmt: skip
        except ValueError as err:
            raise bad_request(err) from err

    async def start(
        self, request_id: str, requests: list[tuple[Prompt, SamplingParams]], lora: str | None = None
    ) -> list[RequestStream]:
        """Hand every prompt to the engine (all or none): refusals become 400 (bad parameters) or 429."""
        self.check_capacity(len(requests))
        # Admitted prompts count against the limit until the engine bridge registers them, so concurrent
        # handlers cannot all pass the check while a multi-prompt request is still being added.
        self._reserved += len(requests)
        unregistered = len(requests)
        streams: list[RequestStream] = []
        try:
            for index, (prompt, params) in enumerate(requests):
                engine_id = request_id if len(requests) == 1 else f"{request_id}-{index}"
                # add_request registers the request before its first await: no other handler runs between.
                self._reserved -= 1
                unregistered -= 1
                streams.append(await self.engine.add_request(engine_id, prompt.token_ids, params, lora))
        except BaseException as err:
            for stream in streams:
                stream.abort()
            if isinstance(err, EngineUnavailable):
                raise APIError(503, str(err), None, "engine_unavailable") from err
            if isinstance(err, QueueFullError):
                raise APIError(429, f"the server is busy: {err}", None, "server_overloaded") from err
            if isinstance(err, ValueError):
                raise bad_request(err) from err
            raise
        finally:
            self._reserved -= unregistered
        return streams

    async def outputs(self, streams: list[RequestStream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Outputs of every prompt's engine request as they come, tagged with the prompt's index.
        Leaving early (an error, a disconnect) aborts every request still running."""
        try:
            if len(streams) == 1:
                async for output in streams[0]:
                    yield 0, output
            else:
                async with aclosing(_merge(streams)) as merged:
                    async for item in merged:
                        yield item
        except EngineUnavailable as err:  # the engine process died: retrying can succeed
            raise APIError(503, str(err), None, "engine_unavailable") from err
        except EngineFailure as err:
            raise APIError(500, str(err), None, "engine_error") from err
        finally:
            for stream in streams:
                stream.abort()

    # -- /v1/completions -----------------------------------------------------------------------------------

    async def encode_text(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of ``text``, tokenized in a worker thread (a long prompt must not stall the event loop,
        the other streams and ``/health``). A text too long to fit the context whatever its tokens is refused
        without tokenizing it."""
        if len(text) > self.max_prompt_chars:
            raise APIError(
                400,
                f"the {param} has {len(text)} characters: more than the model's context of "
                f"{self.engine.max_model_len} tokens can hold",
                param,
                "context_length_exceeded",
            )
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def encode_completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        raw = req.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]  # one prompt
        prompts = []
        for item in raw:
            if isinstance(item, str):
                ids = await self.encode_text(item, req.add_special_tokens, "prompt")
                prompts.append(Prompt(ids, item))
            else:
                self.check_token_ids(item, "prompt")
                prompts.append(Prompt(list(item), self.tokenizer.decode(item)))
            if not prompts[-1].token_ids:
                raise APIError(400, "the prompt is empty (no tokens)", "prompt", "invalid_value")
        return prompts

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        lora = self.check_model(req.model)
        one_prompt = isinstance(req.prompt, str) or isinstance(req.prompt[0], int)
        self.check_capacity(1 if one_prompt else len(req.prompt))  # before any tokenizing
        prompts = await self.encode_completion_prompts(req)
        # max_tokens=0 (scoring an echoed prompt only): the engine generates at least one token; we drop it.
        score_only = req.max_tokens == 0
        requested = None if req.max_tokens is None else max(req.max_tokens, 1)
        prompt_logprobs = req.logprobs if req.echo else None
        requests = []
        for prompt in prompts:
            budget = self.output_budget(prompt, requested, "max_tokens", "prompt", req.sequences)
            requests.append((prompt, self.sampling_params(req, budget, req.logprobs, prompt_logprobs)))
        request_id = random_id("cmpl")
        outputs = self.outputs(await self.start(request_id, requests, lora))
        assembler = CompletionAssembler(
            lora or self.model_id, self.texts, req, prompts, request_id, score_only
        )
        if req.stream:
            return sse_response(assembler.events(outputs))
        body = await cancel_on_disconnect(request, assembler.whole(outputs))
        return JSONResponse(body.model_dump())

    # -- /v1/chat/completions ------------------------------------------------------------------------------

    async def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> Prompt:
        try:
            text = self.tokenizer.apply_chat_template(
                template_messages(messages), add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # template errors (raise_exception in Jinja, no template) are the caller's
            raise APIError(
                400, f"cannot apply the chat template: {err}", "messages", "invalid_value"
            ) from err
        # The template writes every special token itself (as transformers' apply_chat_template assumes).
        return Prompt(await self.encode_text(text, False, "messages"), text)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        lora = self.check_model(req.model)
        prompt = await self.encode_chat(req.messages, req.add_generation_prompt)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = self.output_budget(prompt, req.requested_max_tokens, param, "messages", req.sequences)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, budget, top, None, self.end_of_turn_ids)
        request_id = random_id("chatcmpl")
        outputs = self.outputs(await self.start(request_id, [(prompt, params)], lora))
        assembler = ChatAssembler(lora or self.model_id, self.texts, req, prompt, request_id)
        if req.stream:
            return sse_response(assembler.events(outputs))
        body = await cancel_on_disconnect(request, assembler.whole(outputs))
        return JSONResponse(body.model_dump())


async def _merge(streams: list[RequestStream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    merged: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for output in streams[index]:
                await merged.put((index, output))
        except Exception as err:  # handed to the consumer, who re-raises it
            await merged.put(err)
            return
        await merged.put(None)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
