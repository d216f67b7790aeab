"""``/v1/completions`` and ``/v1/chat/completions``: requests into engine calls, engine outputs into OpenAI
responses (whole or as server-sent events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.infer import SamplingParams
from lmforge.infer.outputs import RequestOutput, TokenLogprob
from lmforge.infer.scheduler import QueueFullError
from lmforge.serve.async_engine import AsyncEngine, EngineFailure, RequestStream
from lmforge.serve.errors import APIError
from lmforge.serve.logprobs import (
    TokenIdLabels,
    TokenLabels,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    concat_logprobs,
)
from lmforge.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
    Usage,
    now,
    random_id,
)
from lmforge.serve.streaming import DONE, cancel_on_disconnect, sse_event, sse_response

# End-of-turn markers of common chat formats: a chat reply also stops there (the EOS may come after it).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class Prompt:
    token_ids: list[int]
    text: str  # what ``echo`` returns


@dataclass
class ChoiceState:
    """What has been sent (streaming) or gathered (whole response) for one choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_id: str, max_active_requests: int) -> None:
        self.engine = engine
        self.model_id = model_id
        self.max_active_requests = max_active_requests
        self.tokenizer = engine.tokenizer
        self.texts = TokenTexts(self.tokenizer)
        self.end_of_turn_ids = [
            token_id
            for token_id in map(self.tokenizer.token_to_id, END_OF_TURN_TOKENS)
            if token_id is not None
        ]

    # -- shared checks -------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                "model",
                "model_not_found",
            )

    def check_capacity(self, n_requests: int) -> None:
        active = self.engine.num_active
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
            message = str(err)
            param = message.split(":", 1)[0] if ":" in message else None
            raise APIError(400, message, param, "invalid_value") from err

    async def start(
        self, request_id: str, requests: list[tuple[Prompt, SamplingParams]]
    ) -> list[RequestStream]:
        """Hand every prompt to the engine (all or none): refusals become 400 (bad parameters) or 429."""
        self.check_capacity(len(requests))
        streams: list[RequestStream] = []
        try:
            for index, (prompt, params) in enumerate(requests):
                engine_id = request_id if len(requests) == 1 else f"{request_id}-{index}"
                streams.append(await self.engine.add_request(engine_id, prompt.token_ids, params))
        except BaseException as err:
            for stream in streams:
                stream.abort()
            if isinstance(err, QueueFullError):
                raise APIError(429, f"the server is busy: {err}", None, "server_overloaded") from err
            if isinstance(err, ValueError):
                raise APIError(400, str(err), None, "invalid_value") from err
            raise
        return streams

    async def outputs(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of every prompt's engine request as they come, tagged with the prompt's index.
        Leaving early (an error, a disconnect) aborts every request still running."""
        try:
            if len(streams) == 1:
                async for output in streams[0]:
                    yield 0, output
            else:
                async for item in _merge(streams):
                    yield item
        except EngineFailure as err:
            raise APIError(500, str(err), None, "engine_error") from err
        finally:
            for stream in streams:
                stream.abort()

    # -- /v1/completions -----------------------------------------------------------------------------------

    def encode_completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        raw = req.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]  # one prompt
        prompts = []
        for item in raw:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)
                prompts.append(Prompt(ids, item))
            else:
                self.check_token_ids(item, "prompt")
                prompts.append(Prompt(list(item), self.tokenizer.decode(item)))
            if not prompts[-1].token_ids:
                raise APIError(400, "the prompt is empty (no tokens)", "prompt", "invalid_value")
        return prompts

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        prompts = self.encode_completion_prompts(req)
        # max_tokens=0 (scoring an echoed prompt only): the engine generates at least one token; we drop it.
        score_only = req.max_tokens == 0
        requested = None if req.max_tokens is None else max(req.max_tokens, 1)
        prompt_logprobs = req.logprobs if req.echo else None
        requests = []
        for prompt in prompts:
            budget = self.output_budget(prompt, requested, "max_tokens", "prompt", req.sequences)
            requests.append((prompt, self.sampling_params(req, budget, req.logprobs, prompt_logprobs)))
        request_id = random_id("cmpl")
        outputs = self.outputs(await self.start(request_id, requests))
        assembler = CompletionAssembler(self, req, prompts, request_id, score_only)
        if req.stream:
            return sse_response(assembler.events(outputs))
        body = await cancel_on_disconnect(request, assembler.whole(outputs))
        return JSONResponse(body.model_dump())

    # -- /v1/chat/completions ------------------------------------------------------------------------------

    def encode_chat(self, req: ChatCompletionRequest) -> Prompt:
        try:
            text = self.tokenizer.apply_chat_template(
                req.template_messages(), add_generation_prompt=req.add_generation_prompt
            )
        except Exception as err:  # template errors (raise_exception in Jinja, no template) are the caller's
            raise APIError(
                400, f"cannot apply the chat template: {err}", "messages", "invalid_value"
            ) from err
        # The template writes every special token itself (as transformers' apply_chat_template assumes).
        return Prompt(self.tokenizer.encode(text, add_special_tokens=False), text)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        prompt = self.encode_chat(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = self.output_budget(prompt, req.requested_max_tokens, param, "messages", req.sequences)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, budget, top, None, self.end_of_turn_ids)
        request_id = random_id("chatcmpl")
        outputs = self.outputs(await self.start(request_id, [(prompt, params)]))
        assembler = ChatAssembler(self, req, prompt, request_id)
        if req.stream:
            return sse_response(assembler.events(outputs))
        body = await cancel_on_disconnect(request, assembler.whole(outputs))
        return JSONResponse(body.model_dump())


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


@dataclass
class ChoiceDelta:
    """What one engine step added to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    text_start: int  # where ``text`` starts in the choice's text


def apply_step(
    states: list[ChoiceState], first_index: int, output: RequestOutput, keep_tokens: bool = True
) -> list[ChoiceDelta]:
    """Record one engine output in ``states`` (choices ``first_index + completion.index``) and return what
    changed. A completion's finish is reported once; ``keep_tokens=False`` drops generated tokens (used
    when only the echoed prompt was asked for)."""
    deltas = []
    for completion in output.outputs:
        index = first_index + completion.index
        state = states[index]
        if state.finish_reason is not None:
            continue
        if keep_tokens:
            text, token_ids, logprobs = (
                completion.new_text,
                list(completion.new_token_ids),
                list(completion.new_logprobs or []),
            )
        else:
            text, token_ids, logprobs = "", [], []
        finish = completion.finish_reason
        if not (text or token_ids or finish):
            continue
        deltas.append(ChoiceDelta(index, text, token_ids, logprobs, finish, len(state.text)))
        state.text += text
        state.token_ids += token_ids
        state.logprobs += logprobs
        state.finish_reason = finish
    return deltas


class CompletionAssembler:
    """Builds ``text_completion`` responses and chunks from engine outputs of one or more prompts."""

    def __init__(
        self,
        serving: OpenAIServing,
        req: CompletionRequest,
        prompts: list[Prompt],
        request_id: str,
        score_only: bool,
    ) -> None:
        self.serving = serving
        self.req = req
        self.prompts = prompts
        self.request_id = request_id
        self.keep_tokens = not score_only
        self.created = now()
        self.texts: TokenLabels = TokenIdLabels() if req.return_tokens_as_token_ids else serving.texts
        self.n = req.n
        self.states = [ChoiceState() for _ in range(len(prompts) * self.n)]
        # Where each choice's generated text starts for ``text_offset``: after the prompt (OpenAI's legacy
        # convention), or, under echo, after the echoed prompt tokens, whose offsets count from 0.
        self.text_bases = [
            sum(len(self.texts.text(t)) for t in p.token_ids) if req.echo else len(p.text) for p in prompts
        ]

    def _usage(self) -> Usage:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(len(s.token_ids) for s in self.states)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    def _echo_logprobs(self, prompt: Prompt, output: RequestOutput) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        entries = output.prompt_logprobs or [None] * len(prompt.token_ids)
        return completion_logprobs(prompt.token_ids, entries, self.texts)

    def _generated_logprobs(
        self, index: int, token_ids: list[int], entries: list[TokenLogprob], start: int
    ) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        return completion_logprobs(token_ids, entries, self.texts, self.text_bases[index // self.n] + start)

    async def whole(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> CompletionResponse:
        echoes: dict[int, CompletionLogprobs | None] = {}
        async with aclosing(outputs):
            async for prompt_index, output in outputs:
                if self.req.echo and prompt_index not in echoes:
                    echoes[prompt_index] = self._echo_logprobs(self.prompts[prompt_index], output)
                apply_step(self.states, prompt_index * self.n, output, self.keep_tokens)
        choices = []
        for index, state in enumerate(self.states):
            prompt_index = index // self.n
            text = state.text
            logprobs = self._generated_logprobs(index, state.token_ids, state.logprobs, 0)
            if self.req.echo:
                text = self.prompts[prompt_index].text + text
                echo_logprobs = echoes[prompt_index]
                if logprobs is not None and echo_logprobs is not None:
                    logprobs = concat_logprobs(echo_logprobs, logprobs)
            choices.append(
                CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=state.finish_reason)
            )
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.serving.model_id,
            choices=choices,
            usage=self._usage(),
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse_event(
            CompletionResponse(
                id=self.request_id,
                created=self.created,
                model=self.serving.model_id,
                choices=choices,
                usage=usage,
            )
        )

    async def events(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        echoed: set[int] = set()
        async with aclosing(outputs):
            async for prompt_index, output in outputs:
                if self.req.echo and prompt_index not in echoed:
                    echoed.add(prompt_index)
                    prompt = self.prompts[prompt_index]
                    logprobs = self._echo_logprobs(prompt, output)
                    for k in range(self.n):
                        choice = CompletionChoice(
                            index=prompt_index * self.n + k, text=prompt.text, logprobs=logprobs
                        )
                        yield self._chunk([choice])
                for delta in apply_step(self.states, prompt_index * self.n, output, self.keep_tokens):
                    if delta.text or (self.req.logprobs is not None and delta.token_ids):
                        logprobs = self._generated_logprobs(
                            delta.index, delta.token_ids, delta.logprobs, delta.text_start
                        )
                        yield self._chunk(
                            [CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs)]
                        )
                    if delta.finish_reason:
                        yield self._chunk(
                            [CompletionChoice(index=delta.index, text="", finish_reason=delta.finish_reason)]
                        )
        if self.req.include_usage:
            yield self._chunk([], self._usage())
        yield DONE


class ChatAssembler:
    """Builds ``chat.completion`` responses and ``chat.completion.chunk`` events from engine outputs."""

    def __init__(
        self, serving: OpenAIServing, req: ChatCompletionRequest, prompt: Prompt, request_id: str
    ) -> None:
        self.serving = serving
        self.req = req
        self.prompt = prompt
        self.request_id = request_id
        self.created = now()
        self.texts: TokenLabels = TokenIdLabels() if req.return_tokens_as_token_ids else serving.texts
        self.states = [ChoiceState() for _ in range(req.n)]

    def _logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(entries, self.texts, self.req.top_logprobs or 0))

    def _usage(self) -> Usage:
        prompt_tokens = len(self.prompt.token_ids)
        completion_tokens = sum(len(s.token_ids) for s in self.states)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    async def whole(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> ChatCompletionResponse:
        async with aclosing(outputs):
            async for _, output in outputs:
                apply_step(self.states, 0, output)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=s.text),
                logprobs=self._logprobs(s.logprobs),
                finish_reason=s.finish_reason,
            )
            for i, s in enumerate(self.states)
        ]
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.serving.model_id,
            choices=choices,
            usage=self._usage(),
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(
                id=self.request_id,
                created=self.created,
                model=self.serving.model_id,
                choices=choices,
                usage=usage,
            )
        )

    async def events(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        for index in range(self.req.n):
            yield self._chunk(
                [ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))]
            )
        async with aclosing(outputs):
            async for _, output in outputs:
                for delta in apply_step(self.states, 0, output):
                    if delta.text or (self.req.logprobs and delta.token_ids):
                        yield self._chunk(
                            [
                                ChatChunkChoice(
                                    index=delta.index,
                                    delta=DeltaMessage(content=delta.text),
                                    logprobs=self._logprobs(delta.logprobs),
                                )
                            ]
                        )
                    if delta.finish_reason:
                        yield self._chunk(
                            [
                                ChatChunkChoice(
                                    index=delta.index, delta=DeltaMessage(), finish_reason=delta.finish_reason
                                )
                            ]
                        )
        if self.req.include_usage:
            yield self._chunk([], self._usage())
        yield DONE
