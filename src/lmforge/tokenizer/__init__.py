"""The tokenizer layer: train, load, save and inspect tokenizers; chat templates; ``lmforge tokenizer``.

- :mod:`~lmforge.tokenizer.core`: :class:`Tokenizer` (a ``tokenizers.Tokenizer`` plus named special tokens,
  a chat template and a maximum length) and :func:`load_tokenizer`;
- :mod:`~lmforge.tokenizer.training`: :func:`train_tokenizer` for byte-level BPE, char BPE, WordPiece, Unigram;
- :mod:`~lmforge.tokenizer.chat`: the default ChatML template and the sandboxed renderer;
- :mod:`~lmforge.tokenizer.inspection`: lossless checks, fallback ids, per-group statistics;
- :mod:`~lmforge.tokenizer.commands`: ``lmforge tokenizer train|encode|inspect``.
"""

from lmforge.tokenizer.chat import (
    CHAT_ROLE_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    IM_END,
    IM_START,
    render_chat_template,
)
from lmforge.tokenizer.core import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, Tokenizer, load_tokenizer
from lmforge.tokenizer.training import (
    CL100K_SPLIT_PATTERN,
    NORMALIZATIONS,
    TOKENIZER_KINDS,
    TokenizerTrainConfig,
    train_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "CHAT_ROLE_TOKENS",
    "CL100K_SPLIT_PATTERN",
    "DEFAULT_CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "NORMALIZATIONS",
    "PAD_TOKEN",
    "TOKENIZER_KINDS",
    "UNK_TOKEN",
    "Tokenizer",
    "TokenizerTrainConfig",
    "load_tokenizer",
    "render_chat_template",
    "train_tokenizer",
]
