"""Speculative decoding with a small draft model (Leviathan et al. 2023; Chen et al. 2023), one sequence.

Each round the draft proposes ``k`` tokens ``x_i ~ q_i``; one target forward over them gives ``p_1..p_{k+1}``.
Token ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the token is
resampled from ``norm(max(0, p_i - q_i))`` and the round ends; if all ``k`` are accepted a bonus token is
drawn from ``p_{k+1}``. The output is distributed exactly as sampling from the target alone; with
``temperature == 0`` both distributions are one-hot and the output equals the target's greedy decoding.
``p`` and ``q`` are the warped distributions (temperature, top-k, top-p, min-p) of the request.

This runs one request with contiguous caches, outside the continuous-batching engine: it speeds up a single
stream when the draft agrees often, which is the setting where it pays off on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.infer.sampler import warp_logits
from lmforge.infer.sampling_params import SamplingParams
from lmforge.model import Transformer
from lmforge.model.cache import ContiguousKVCache


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop token id or a stop string) or "length"
    proposed: int  # draft tokens proposed
    accepted: int  # of which accepted
    text: str | None = None  # the decoded output (without the stop string) when a decoder was given
    stop_reason: str | int | None = None  # the stop string or token id that ended it

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _distributions(logits: Tensor, params: SamplingParams) -> Tensor:
    """Rows of next-token probabilities under the request's warping (one-hot argmax when greedy)."""
    logits = logits.float().cpu()  # sampled with a CPU generator
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return warp_logits(logits, [params] * logits.shape[0]).softmax(dim=-1)


def verify(
    target_probs: Tensor,
    draft_probs: Tensor,
    draft_tokens: list[int],
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """The acceptance rule. target_probs (k+1, V), draft_probs (k, V), draft_tokens (k,).

    Returns the tokens to append (accepted drafts plus one resampled or bonus token) and the number accepted.
    """
    out: list[int] = []
    for i, token in enumerate(draft_tokens):
        p, q = target_probs[i, token], draft_probs[i, token]
        if q > 0 and torch.rand((), generator=generator) < torch.clamp(p / q, max=1.0):
            out.append(token)
            continue
        residual = torch.clamp(target_probs[i] - draft_probs[i], min=0.0)
        if residual.sum() <= 0:  # p == q: the rejection had probability 0 (float edge); fall back to p
            residual = target_probs[i]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out, i
    bonus = int(torch.multinomial(target_probs[len(draft_tokens)], 1, generator=generator))
    return [*out, bonus], len(draft_tokens)


class _Stream:
    """A model with its own contiguous cache, fed the tokens it has not seen yet."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        param = next(model.parameters())
        self.model = model
        self.cache = ContiguousKVCache.for_model(
            model.cfg, 1, max_len, dtype=param.dtype, device=param.device
        )
        self.seen = 0  # tokens whose keys/values are in the cache

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> Tensor:
        """Run the unseen tail of ``tokens``; returns logits (n_new, vocab)."""
        new = tokens[self.seen :]
        device = self.cache.k.device
        ids = torch.tensor([new], device=device)
        positions = torch.arange(self.seen, len(tokens), device=device)[None]
        logits = self.model(ids, position_ids=positions, cache=self.cache).logits[0]
        self.seen = len(tokens)
        return logits

    def rewind(self, length: int) -> None:
        """Forget tokens from ``length`` on (later writes overwrite them; causality hides them until then)."""
        self.seen = min(self.seen, length)


def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompt: list[int],
    params: SamplingParams,
    num_draft_tokens: int = 4,
    eos_token_ids: list[int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> SpeculativeResult:
    """Generate with ``target``, drafting with ``draft``. Stop strings (``params.stop``) need ``decode``
    (token ids -> text); the output then ends at the token that completes one, and ``text`` is cut before it,
    as the engine does."""
    if params.stop and decode is None:
        raise ValueError("stop: stop strings need a decoder (pass decode=tokenizer.decode)")
    if params.needs_token_history or params.logit_bias or params.use_beam_search or params.n != 1:
        raise ValueError(
            "speculative decoding supports temperature/top-k/top-p/min-p sampling of one sequence"
        )
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError("the draft and target models must share a vocabulary")
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids or []))
    max_len = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    limit = min(len(prompt) + params.max_tokens, max_len)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    target_stream, draft_stream = _Stream(target, max_len), _Stream(draft, max_len)
    tokens = list(prompt)
    proposed = accepted = 0

    def finished(reason: str, stop: str | int | None = None) -> SpeculativeResult:
        output = tokens[len(prompt) :]
        text = decode(output) if decode is not None else None
        if isinstance(stop, str) and text is not None:
            text = text[: text.index(stop)]
        return SpeculativeResult(output, reason, proposed, accepted, text, stop)

    def stop_string() -> str | None:
        if not params.stop:
            return None
        text = decode(tokens[len(prompt) :])
        found = [(text.index(s), s) for s in params.stop if s in text]
        return min(found)[1] if found else None

    while len(tokens) < limit:
        k = max(0, min(num_draft_tokens, limit - len(tokens) - 1))
        drafted: list[int] = []
        draft_rows = []
        for _ in range(k):
            q = _distributions(draft_stream.feed(tokens + drafted)[-1:], params)
            draft_rows.append(q[0])
            drafted.append(int(torch.multinomial(q[0], 1, generator=generator)))
        p = _distributions(target_stream.feed(tokens + drafted)[-(k + 1) :], params)
        q = torch.stack(draft_rows) if draft_rows else p.new_zeros(0, p.shape[-1])
        new, n_accepted = verify(p, q, drafted, generator)
        proposed += k
        accepted += n_accepted
        # keys/values of rejected drafts are stale; the resampled or bonus token was never fed
        target_stream.rewind(len(tokens) + n_accepted)
        draft_stream.rewind(len(tokens) + n_accepted)
        for token in new:
            tokens.append(token)
            if token in stops:
                return finished("stop", token)
            stop = stop_string()
            if stop is not None:
                return finished("stop", stop)
            if len(tokens) >= limit:
                break
    return finished("length")
