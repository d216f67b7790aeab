"""Load and save tokenizers; encode, decode and apply chat templates.

A :class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (``tok.backend``) together with what
``tokenizer_config.json`` adds on top of ``tokenizer.json``: the named special tokens (bos/eos/pad/unk),
the Jinja ``chat_template`` and ``model_max_length``. Folders we save load in
``transformers.AutoTokenizer.from_pretrained`` (as ``PreTrainedTokenizerFast``) and encode identically;
folders written by ``transformers`` load here.

Training lives in :mod:`lmforge.tokenizer.training`, chat templates in :mod:`lmforge.tokenizer.chat`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from lmforge.hub import resolve_model_dir
from lmforge.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, render_chat_template

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus named special tokens, a chat template and a maximum length."""

    def __init__(
        self,
        backend: BackendTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
        model_max_length: int = 8192,
        add_bos_token: bool = False,
        file_sha256: str | None = None,
    ) -> None:
        self.backend = backend
        self._file_sha256 = file_sha256
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name}_token {token!r} is not in the vocabulary")
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.add_bos_token = add_bos_token

    # -- vocabulary -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (the model's embedding rows must cover all of them), added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids of every added token marked special (named ones and chat-role tokens)."""
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    def sha256(self) -> str:
        """sha256 of ``tokenizer.json`` (the file it was loaded from, else what :meth:`save` writes):
        identifies the meaning of the token ids in shards."""
        if self._file_sha256 is not None:
            return self._file_sha256
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    # -- encoding -----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once (the backend's batch path; offsets are not computed)."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # -- chat ---------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation as text, exactly like ``transformers`` ``apply_chat_template(tokenize=False)``."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template; pass one or set tokenizer.chat_template")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        special = {
            f"{name}_token": tok
            for name, tok in (
                ("bos", self.bos_token),
                ("eos", self.eos_token),
                ("unk", self.unk_token),
                ("pad", self.pad_token),
            )
            if tok is not None
        }
        # transformers drops None-valued keys (e.g. OpenAI's content=None) before rendering; so do we.
        chat = [{k: v for k, v in message.items() if v is not None} for message in messages]
        return render_chat_template(
            template, chat, add_generation_prompt=add_generation_prompt, **{**special, **kwargs}
        )

    # -- files --------------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` contents ``transformers`` reads next to ``tokenizer.json``."""
        added = {
            str(i): {
                "content": tok.content,
                "lstrip": tok.lstrip,
                "normalized": tok.normalized,
                "rstrip": tok.rstrip,
                "single_word": tok.single_word,
                "special": tok.special,
            }
            for i, tok in sorted(self.backend.get_added_tokens_decoder().items())
        }
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.unk_token is not None:
            named["unk_token"] = self.unk_token
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            **named,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.backend.to_str(), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(self.config_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return folder


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load a tokenizer folder: ours, or one written by ``transformers`` (``tokenizer.json`` required); a
    Hugging Face Hub id (``org/name[@revision]``) is resolved through the Hub cache."""
    folder = resolve_model_dir(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no tokenizer.json (only fast tokenizers are supported; convert slow ones with transformers)"
        )
    raw = tokenizer_file.read_bytes()
    backend = BackendTokenizer.from_str(raw.decode("utf-8"))
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    # Older transformers folders keep the named tokens in special_tokens_map.json only.
    map_file = folder / "special_tokens_map.json"
    if map_file.is_file():
        for key, value in json.loads(map_file.read_text(encoding="utf-8")).items():
            config.setdefault(key, value)
    chat_template = config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if chat_template is None and template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        by_name = {t["name"]: t["template"] for t in chat_template}
        chat_template = by_name.get("default", next(iter(by_name.values()), None))
    max_length = config.get("model_max_length")
    # transformers writes a huge sentinel (1e30) when the length is unknown; keep a plain int either way.
    max_length = int(max_length) if isinstance(max_length, int | float) and max_length < 1e12 else 8192

    def named(key: str) -> str | None:
        token = _token_content(config.get(key))
        return token if token is not None and backend.token_to_id(token) is not None else None

    return Tokenizer(
        backend,
        bos_token=named("bos_token"),
        eos_token=named("eos_token"),
        pad_token=named("pad_token"),
        unk_token=named("unk_token"),
        chat_template=chat_template,
        model_max_length=max_length,
        add_bos_token=bool(config.get("add_bos_token", False)),
        file_sha256=hashlib.sha256(raw).hexdigest(),
    )
