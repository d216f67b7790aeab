"""Rollouts for online RL (``lmforge grpo``): lmforge's engine sampling from the policy being trained.

:class:`EngineRollouts` keeps an :class:`~lmforge.infer.engine.LLMEngine` over its own copy of the policy in
the same process; :meth:`EngineRollouts.push_weights` copies the trainer's current weights into it in place
(no disk round trip), so each batch of replies comes from the weights of the last update. The engine's prefix
cache is off: cached keys/values would belong to older weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from lmforge.infer.engine import EngineConfig, LLMEngine
from lmforge.infer.sampling_params import SamplingParams
from lmforge.tokenizer import Tokenizer


class EngineRollouts:
    """The engine is built at the first :meth:`push_weights`, on the device the trainer has put the policy on;
    later pushes copy the weights into it in place."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_new_tokens: int,
        temperature: float = 1.0,
        config: EngineConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config or EngineConfig(enable_prefix_caching=False, seed=seed)
        if self.config.enable_prefix_caching:
            raise ValueError(
                "rollouts need enable_prefix_caching=False (cached KV would outlive a weight push)"
            )
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.engine: LLMEngine | None = None

    @torch.no_grad()
    def push_weights(self, policy: nn.Module) -> None:
        """Make the engine's model equal to ``policy``: in place, tensor by tensor, once the engine exists."""
        if self.engine is None:
            self.engine = LLMEngine(copy.deepcopy(policy), self.tokenizer, self.config)
        else:
            self.engine.model.load_state_dict(policy.state_dict())

    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[list[int]]]:
        """``n`` sampled completions per prompt (token ids; the EOS included when one was generated)."""
        if self.engine is None:
            raise RuntimeError("push_weights first: the engine samples from the pushed policy")
        params = SamplingParams(
            n=n, max_tokens=self.max_new_tokens, temperature=self.temperature, detokenize=False
        )
        outputs = self.engine.generate([list(p) for p in prompts], params)
        return [[list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
