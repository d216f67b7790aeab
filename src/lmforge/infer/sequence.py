"""Request and sequence state: the tokens, how many of them are in the KV cache, and the block table."""

from __future__ import annotations

import itertools
from enum import Enum
from typing import Any

import torch

from lmforge.infer.detokenize import Decoder, IncrementalDetokenizer
from lmforge.infer.outputs import TokenLogprob
from lmforge.infer.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """One token stream. ``num_computed`` tokens have their keys/values in the cache (``block_table``)."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        tokenizer: Decoder | None = None,
        num_virtual: int = 0,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.index = index  # position among the request's completions
        self.params = params
        # a virtual prefix (soft prompt, prefix tuning) holds the first num_virtual positions: their keys and
        # values come from the engine's pinned blocks, so their token ids are placeholders never embedded
        self.num_virtual = num_virtual
        self.token_ids: list[int] = [0] * num_virtual + list(prompt_token_ids)
        self.prompt_len = len(self.token_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks whose keys/values are computed
        # the LoRA adapter the sequence runs with (-1: the base model) and the root of its block-hash chain,
        # so prefix-cache entries of different adapters never match
        self.lora_slot = -1
        self.source_ids: list[
            int
        ] = []  # an encoder-decoder request's source (its decoder tokens are token_ids)
        self.hash_root: int | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # Each completion of a seeded request draws from its own stream, so batch mates never change it.
            self.generator = torch.Generator().manual_seed(params.seed + 1_000_003 * index)
        self.detokenizer: IncrementalDetokenizer | None = None
        if tokenizer is not None and params.detokenize:
            self.detokenizer = IncrementalDetokenizer(
                tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens
            )
        # n-gram prefix -> tokens that followed it (no-repeat n-gram blocking), kept up to date on append
        self.ngrams: dict[tuple[int, ...], set[int]] | None = None
        if params.no_repeat_ngram_size > 0:
            self.ngrams = {}
            for end in range(num_virtual + params.no_repeat_ngram_size, len(self.token_ids) + 1):
                self._index_ngram(end)
        self.emitted_tokens = 0  # output tokens already reported (for streaming deltas)
        self.emitted_logprobs = 0

    # -- token bookkeeping -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_token_ids(self) -> list[int]:
        """Prompt and output tokens (without a virtual prefix's placeholders): what penalties look at."""
        return self.token_ids[self.num_virtual :] if self.num_virtual else self.token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def _index_ngram(self, end: int) -> None:
        n = self.params.no_repeat_ngram_size
        gram = self.token_ids[end - n : end]
        assert self.ngrams is not None
        self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned_ngram_tokens(self) -> set[int]:
        """Tokens that would repeat an n-gram already in the sequence (Hugging Face ``no_repeat_ngram_size``)."""
        if self.ngrams is None:
            return set()
        n = self.params.no_repeat_ngram_size
        if len(self.token_ids) < n:
            return set()
        prefix = tuple(self.token_ids[len(self.token_ids) - n + 1 :]) if n > 1 else ()
        return self.ngrams.get(prefix, set())

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.token_ids.append(token_id)
        if self.ngrams is not None and len(self.token_ids) >= self.params.no_repeat_ngram_size:
            self._index_ngram(len(self.token_ids))
        if logprob is not None:
            self.cumulative_logprob += logprob.logprob
            if self.logprobs is not None:
                self.logprobs.append(logprob)

    def fork(self, index: int) -> Sequence:
        """A copy sharing this sequence's history (its blocks are shared by the block manager, not here)."""
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id = next(_seq_ids)
        child.index = index
        child.token_ids = list(self.token_ids)
        child.block_table = list(self.block_table)
        child.block_hashes = list(self.block_hashes)
        child.logprobs = list(self.logprobs) if self.logprobs is not None else None
        child.ngrams = {k: set(v) for k, v in self.ngrams.items()} if self.ngrams is not None else None
        if self.params.seed is not None:
            child.generator = torch.Generator().manual_seed(self.params.seed + 1_000_003 * index)
        if self.detokenizer is not None:
            child.detokenizer = IncrementalDetokenizer(
                self.detokenizer.tokenizer,
                self.token_ids[: self.prompt_len],
                self.params.stop,
                self.params.skip_special_tokens,
            )
            for token in self.output_token_ids:
                child.detokenizer.append(token)
        return child

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        # After a stop string the text is already cut before it; anything pending lies beyond the cut.
        if self.detokenizer is not None and not isinstance(stop_reason, str):
            self.detokenizer.flush()

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer is not None else ""


class SequenceGroup:
    """One request: its prompt, its sampling params and its live sequences (``n`` samples or the beams)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Decoder | None = None,
        num_virtual: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.seqs: list[Sequence] = [Sequence(prompt_token_ids, params, 0, tokenizer, num_virtual)]
        self.finished_seqs: list[Sequence] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        self.num_cached_tokens = 0
        # a beam.BeamSearch for beam-search requests, set by the engine (beam.py builds on this module)
        self.beam: Any = None
        self.lora: str | None = None  # the served LoRA adapter this request runs with (None: the base model)
        self.aborted = False

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return self.aborted or all(s.is_finished for s in self.seqs)

    @property
    def expands_after_prefill(self) -> bool:
        """True while a sampled request with ``n > 1`` still has to fork its single prefilled sequence."""
        return not self.params.use_beam_search and self.params.n > 1 and len(self.seqs) == 1

    @property
    def max_seqs(self) -> int:
        """Sequences this request runs at once: the beam width, or ``n`` samples."""
        return self.params.beam_width if self.params.use_beam_search else self.params.n
