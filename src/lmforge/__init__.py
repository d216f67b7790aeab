"""lmforge: from a raw text corpus to a served chat model."""

__version__ = "0.1.0"
