"""OpenAI responses from engine outputs: whole ``text_completion``/``chat.completion`` bodies, or their
server-sent-event chunks, with usage and logprobs in each API's format."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from lmforge.infer import RequestOutput, TokenLogprob
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
    Usage,
    now,
)
from lmforge.serve.streaming import DONE, sse_event


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
        model_id: str,
        texts: TokenTexts,
        req: CompletionRequest,
        prompts: list[Prompt],
        request_id: str,
        score_only: bool,
    ) -> None:
        self.model_id = model_id
        self.req = req
        self.prompts = prompts
        self.request_id = request_id
        self.keep_tokens = not score_only
        self.created = now()
        self.texts: TokenLabels = TokenIdLabels() if req.return_tokens_as_token_ids else texts
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
        if output.prompt_logprobs is None:  # the engine sets them on a request's first output
            raise APIError(500, "the engine returned no prompt logprobs", None, "engine_error")
        return completion_logprobs(prompt.token_ids, output.prompt_logprobs, self.texts)

    def _generated_logprobs(
        self, index: int, token_ids: list[int], entries: list[TokenLogprob], start: int
    ) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        return completion_logprobs(token_ids, entries, self.texts, self.text_bases[index // self.n] + start)

    async def whole(self, outputs: AsyncGenerator[tuple[int, RequestOutput], None]) -> CompletionResponse:
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
            model=self.model_id,
            choices=choices,
            usage=self._usage(),
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = CompletionResponse(
            id=self.request_id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )
        # As OpenAI: chunks carry "usage" (null until the last) only when stream_options asked for it.
        return sse_event(chunk, exclude=None if self.req.include_usage else {"usage"})

    async def events(
        self, outputs: AsyncGenerator[tuple[int, RequestOutput], None]
    ) -> AsyncGenerator[str, None]:
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
        self, model_id: str, texts: TokenTexts, req: ChatCompletionRequest, prompt: Prompt, request_id: str
    ) -> None:
        self.model_id = model_id
        self.req = req
        self.prompt = prompt
        self.request_id = request_id
        self.created = now()
        self.texts: TokenLabels = TokenIdLabels() if req.return_tokens_as_token_ids else texts
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

    async def whole(self, outputs: AsyncGenerator[tuple[int, RequestOutput], None]) -> ChatCompletionResponse:
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
            model=self.model_id,
            choices=choices,
            usage=self._usage(),
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )
        # As OpenAI: chunks carry "usage" (null until the last) only when stream_options asked for it.
        return sse_event(chunk, exclude=None if self.req.include_usage else {"usage"})

    async def events(
        self, outputs: AsyncGenerator[tuple[int, RequestOutput], None]
    ) -> AsyncGenerator[str, None]:
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
