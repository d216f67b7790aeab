"""Chat templates: the default ChatML template and a sandboxed Jinja renderer.

Templates are rendered with the same sandboxed Jinja environment and globals as ``transformers``
(``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, ``trim_blocks``/``lstrip_blocks``), so
:meth:`lmforge.tokenizer.Tokenizer.apply_chat_template` gives the same string as
``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_ROLE_TOKENS = (IM_START, IM_END)

# ChatML with one addition: an assistant turn ends with <|im_end|> followed by the EOS token, so that SFT on
# rendered chats teaches the model to stop, and an engine that stops on EOS ends the reply there.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '); chat templates need the JSON as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``template`` in a sandbox (templates in downloaded folders are untrusted code)."""
    return _compile_chat_template(template).render(
        messages=list(messages),
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
