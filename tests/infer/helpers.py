"""Shared helpers of the inference tests."""

import torch

from lmforge.model import Transformer


def reference_greedy(model: Transformer, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by full forwards over the whole sequence: no cache, no batching."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def random_prompts(lengths: list[int], vocab: int = 97, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
