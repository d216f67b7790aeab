import pytest

from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

TEXTS = [
    "What is 12 + 34? It is 46. Reverse the words: apple tree blue. The answer is blue tree apple.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! How many letters are in banana? There are six letters.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS * 20, TokenizerTrainConfig(vocab_size=320))
