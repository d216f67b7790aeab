"""Train, load and save tokenizers; render chat templates.

A :class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (``tok.backend``) together with what
``tokenizer_config.json`` adds on top of ``tokenizer.json``: the named special tokens (bos/eos/pad/unk),
the Jinja ``chat_template`` and ``model_max_length``. Folders we save load in
``transformers.AutoTokenizer.from_pretrained`` (as ``PreTrainedTokenizerFast``) and encode identically;
folders written by ``transformers`` load here.

Four model kinds can be trained (:data:`TOKENIZER_KINDS`):

- ``byte_bpe``: byte-level BPE after the GPT-4 (cl100k) split regex; every string round-trips, no unknowns;
- ``char_bpe``: BPE over characters after SentencePiece-style metaspace splitting, with an unknown token;
- ``wordpiece``: BERT-style WordPiece (``##`` continuations); whitespace is not kept, so decoding is lossy;
- ``unigram``: SentencePiece-style Unigram LM over metaspace pieces.

Chat templates are rendered with the same sandboxed Jinja environment and globals as ``transformers``
(``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, ``trim_blocks``/``lstrip_blocks``), so
:meth:`Tokenizer.apply_chat_template` gives the same string as ``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.config import check_choice

TOKENIZER_KINDS = ("byte_bpe", "char_bpe", "wordpiece", "unigram")
NORMALIZATIONS = ("none", "nfkc", "nfc", "nfd", "nfkd")

# GPT-4's cl100k_base pre-tokenization: contractions, letter runs with one leading non-letter, numbers in
# groups of at most three digits, punctuation runs, and whitespace kept with the following word.
CL100K_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
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


@dataclass
class TokenizerTrainConfig:
    """What to train: the model kind, vocabulary size, special tokens and normalization."""

    kind: str = "byte_bpe"
    vocab_size: int = 32000
    min_frequency: int = 2
    normalization: str = "none"
    # Every digit its own pre-token (as LLaMA and PaLM do): numbers are never merged, which keeps arithmetic
    # uniform across operands.
    split_digits: bool = False
    bos_token: str = BOS_TOKEN
    eos_token: str = EOS_TOKEN
    pad_token: str = PAD_TOKEN
    unk_token: str = UNK_TOKEN  # used by char_bpe / wordpiece / unigram only
    extra_special_tokens: list[str] = field(default_factory=lambda: list(CHAT_ROLE_TOKENS))
    add_bos_token: bool = True  # what ``encode(..., add_special_tokens=True)`` prepends
    model_max_length: int = 8192
    chat_template: str = DEFAULT_CHAT_TEMPLATE

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, TOKENIZER_KINDS)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        if self.vocab_size < len(self.special_tokens()) + 1:
            raise ValueError(f"vocab_size: {self.vocab_size} is too small for the special tokens")

    def special_tokens(self) -> list[str]:
        named = [self.bos_token, self.eos_token, self.pad_token]
        if self.kind != "byte_bpe":
            named.append(self.unk_token)
        return list(dict.fromkeys(t for t in [*named, *self.extra_special_tokens] if t))


def _normalizer(name: str) -> normalizers.Normalizer | None:
    return {
        "none": None,
        "nfkc": normalizers.NFKC(),
        "nfc": normalizers.NFC(),
        "nfd": normalizers.NFD(),
        "nfkd": normalizers.NFKD(),
    }[name]


def _build_untrained(cfg: TokenizerTrainConfig) -> tuple[BackendTokenizer, trainers.Trainer]:
    special = cfg.special_tokens()
    if cfg.kind == "byte_bpe":
        backend = BackendTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CL100K_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        trainer: trainers.Trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif cfg.kind == "char_bpe":
        backend = BackendTokenizer(models.BPE(unk_token=cfg.unk_token))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=special,
            show_progress=False,
        )
    elif cfg.kind == "wordpiece":
        backend = BackendTokenizer(models.WordPiece(unk_token=cfg.unk_token))
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=special,
            show_progress=False,
        )
    else:  # unigram
        backend = BackendTokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size, special_tokens=special, unk_token=cfg.unk_token, show_progress=False
        )
    if cfg.split_digits:
        backend.pre_tokenizer = _with_digit_split(backend.pre_tokenizer, cfg.kind)
    normalizer = _normalizer(cfg.normalization)
    if normalizer is not None:
        backend.normalizer = normalizer
    return backend, trainer


def _with_digit_split(pre_tokenizer: pre_tokenizers.PreTokenizer, kind: str) -> pre_tokenizers.PreTokenizer:
    """Add the digit split: after the cl100k regex (before byte mapping) for byte-level BPE, after the word
    splitter otherwise (so Metaspace still sees whole words and round-trips)."""
    digits = pre_tokenizers.Digits(individual_digits=True)
    if kind == "byte_bpe":
        split, byte_level = pre_tokenizer[0], pre_tokenizer[1]
        return pre_tokenizers.Sequence([split, digits, byte_level])
    return pre_tokenizers.Sequence([pre_tokenizer, digits])


def train_tokenizer(
    texts: Iterable[str],
    cfg: TokenizerTrainConfig | None = None,
    total: int | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer on a stream of texts (read once, never held in memory as a whole)."""
    cfg = cfg or TokenizerTrainConfig()
    backend, trainer = _build_untrained(cfg)
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, total=total, desc="tokenizer training: reading documents", unit="doc")
    backend.train_from_iterator(_batched(texts, 1000), trainer=trainer, length=total)
    # Special tokens must be matched before pre-tokenization (so "<|im_end|>" in text is one token) and
    # never be split or normalized; the trainer registered them as added tokens already.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in cfg.special_tokens()])
    if cfg.add_bos_token and cfg.bos_token:
        bos_id = backend.token_to_id(cfg.bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cfg.bos_token} $A",
            pair=f"{cfg.bos_token} $A {cfg.bos_token} $B:1",
            special_tokens=[(cfg.bos_token, bos_id)],
        )
    return Tokenizer(
        backend,
        bos_token=cfg.bos_token or None,
        eos_token=cfg.eos_token or None,
        pad_token=cfg.pad_token or None,
        unk_token=cfg.unk_token if cfg.kind != "byte_bpe" else None,
        chat_template=cfg.chat_template,
        model_max_length=cfg.model_max_length,
        add_bos_token=cfg.add_bos_token,
    )


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
    """Load a tokenizer folder: ours, or one written by ``transformers`` (``tokenizer.json`` required)."""
    folder = Path(folder)
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


# -- chat templates -------------------------------------------------------------------------------------------


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
