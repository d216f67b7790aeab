"""Train tokenizers from a stream of texts.

Four model kinds can be trained (:data:`TOKENIZER_KINDS`):

- ``byte_bpe``: byte-level BPE after the GPT-4 (cl100k) split regex; every string round-trips, no unknowns;
- ``char_bpe``: BPE over characters after SentencePiece-style metaspace splitting, with an unknown token;
- ``wordpiece``: BERT-style WordPiece (``##`` continuations); whitespace is not kept, so decoding is lossy;
- ``unigram``: SentencePiece-style Unigram LM over metaspace pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.config import check_choice
from lmforge.tokenizer.chat import CHAT_ROLE_TOKENS, DEFAULT_CHAT_TEMPLATE
from lmforge.tokenizer.core import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, Tokenizer

TOKENIZER_KINDS = ("byte_bpe", "char_bpe", "wordpiece", "unigram")
NORMALIZATIONS = ("none", "nfkc", "nfc", "nfd", "nfkd")

# GPT-4's cl100k_base pre-tokenization: contractions, letter runs with one leading non-letter, numbers in
# groups of at most three digits, punctuation runs, and whitespace kept with the following word.
CL100K_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
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
