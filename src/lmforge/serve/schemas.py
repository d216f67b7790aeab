"""Pydantic schemas of the OpenAI API subset that lmforge serves (plus vLLM-style extensions).

The schemas check the wire format (types, shapes, combinations of fields); the ranges of the sampling
fields are ``SamplingParams``' (the one definition), whose errors name the field, so either way a bad field
becomes a 400 with the offending parameter named (see ``lmforge.serve.errors``). Sampling fields that OpenAI
lacks (``top_k``, ``min_p``, ``repetition_penalty``, beam search) use vLLM's names and meanings so that
clients written for vLLM work unchanged.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_TOP_LOGPROBS = 20
TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _no_lone_surrogates(value: str) -> str:
    """JSON may carry UTF-16 surrogate escapes (``"\\ud800"``) that pair with nothing: no tokenizer can take them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"contains a lone UTF-16 surrogate ({value[err.start]!r} at character {err.start}); send valid Unicode"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    # Unknown fields (``user``, ``suffix``-less clients' extras, ``response_format``...) are accepted and
    # ignored, as the OpenAI API and vLLM do; rejecting them would break ordinary client libraries.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # Sampling fields: types here, ranges in ``SamplingParams`` (the one definition; its errors name the field).
    n: int = 1
    best_of: int | None = None  # beam width under use_beam_search
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 disable top-k, as in vLLM and transformers respectively
    min_p: float = 0.0
    stop: list[Text] = Field(default_factory=list)  # a single string is accepted too
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None  # token id (a decimal string, as JSON keys are) -> bias
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" (vLLM)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # JSON keys are strings: a token id is ASCII digits only ("١٢" would pass int() as 12)
        for key in value or {}:
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids (decimal digits), got {key!r}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def sequences(self) -> int:
        """Sequences the engine runs in parallel for this request (n, or the beam width)."""
        return max(self.n, self.best_of or 0)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = Text | list[Text] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16  # 0 only with echo (scoring the prompt, as lm-evaluation-harness asks)
    echo: bool = False
    # OpenAI allows 0..5 alternatives per position; vLLM and lm-evaluation-harness go up to 20.
    logprobs: int | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _check_options(self) -> CompletionRequest:
        # max_tokens=0 only makes sense when scoring the prompt (echo), as lm-evaluation-harness may ask.
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 unless echo is true")
        if self.use_beam_search and self.logprobs is not None:
            raise ValueError("logprobs are not available with beam search")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates take them: plain-text content; OpenAI's newer "developer" role means
    what templates call "system"."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    # Accepted only in their "off" form: silently ignoring them would hand the client plain text it
    # believes to be a tool call or JSON.
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_options(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.use_beam_search and self.logprobs:
            raise ValueError("logprobs are not available with beam search")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class EmbeddingRequest(BaseModel):
    """OpenAI's ``/v1/embeddings``: one text, texts, or token-id lists."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Text | list[Text] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ----------------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions format: parallel lists, one entry per token (``None`` for the first prompt token)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="plain")
    def _only_present(self) -> dict[str, Any]:
        # OpenAI deltas carry only what changed: {"role": ...} first, then {"content": ...}, then {}.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    max_model_len: int
    root: str | None = None  # where the model or adapter was loaded from (as vLLM reports it)
    parent: str | None = None  # a LoRA adapter's base model


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=200)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool
    chat_template: str | None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
