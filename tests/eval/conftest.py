import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import save_pretrained
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    texts = ["What is 12 + 34? 46. The sky is blue and the grass is green."] * 30
    tokenizer = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=300, add_bos_token=True))
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=128
    )
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder
