"""lmforge as an lm-evaluation-harness model: ``--model lmforge --model_args pretrained=DIR``.

Importing this module registers :class:`LmforgeLM` under the name ``lmforge`` in lm-eval's model registry.
lm-eval 0.4 discovers no third-party models by itself, so its command line is reached through this module,
which registers the model and then hands every argument to lm-eval's own CLI::

    python -m lmforge.eval.lm_eval_model run --model lmforge --model_args pretrained=runs/demo/sft/model \\
        --tasks hellaswag --batch_size 16

(``lmforge-lm-eval`` is the same command as an installed script.) From Python, pass an instance to
``lm_eval.simple_evaluate(model=LmforgeLM(pretrained=DIR), ...)``.

- ``loglikelihood`` / ``loglikelihood_rolling`` run batched forward passes of lmforge's Transformer
  (right-padded, longest first), tokenized and truncated exactly as lm-eval's ``hf`` backend does it, so
  per-item log-likelihoods agree with it on the same weights.
- ``generate_until`` goes through :class:`lmforge.infer.LLMEngine` (continuous batching, paged KV cache, prefix
  caching: few-shot prompts that share their demonstrations compute them once). Greedy unless the task asks
  for ``do_sample``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmforge.eval.scoring import token_logprobs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge model folder (ours, or a supported Hugging Face family) seen by lm-eval."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        """``batch_size`` may be ``auto`` (lm-eval's spelling): then ``max_batch_size`` or 64 sequences.
        ``device`` None: CUDA when available, else the CPU. ``add_bos_token`` None follows the tokenizer's own setting (the engine's and the server's encoding)."""
        super().__init__()
        from lmforge.infer import EngineConfig, LLMEngine

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.engine = LLMEngine.from_pretrained(
            pretrained,
            EngineConfig(enable_prefix_caching=enable_prefix_caching),
            dtype=_DTYPES[dtype],
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
        self.model = self.engine.model
        self.tokenizer = self.engine.tokenizer
        if str(batch_size).startswith("auto"):
            self.batch_size = int(max_batch_size or 64)
        else:
            self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token

    # -- tokenization ------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eot = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id
        if eot is None:
            raise ValueError("the tokenizer has neither an EOS nor a BOS token")
        return eot

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context (as ``hf``: BOS when the tokenizer has one, else EOS)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            if bos is not None and string.startswith(bos):  # already carries its BOS (a chat rendering)
                add_special_tokens = False
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring -----------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation and whether greedy decoding would produce it.

        The scored sequence is ``(context + continuation)[-(max_length + 1):]``: a context too long for the
        model loses its left end, as in the ``hf`` backend."""
        sequences, lengths = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request needs a non-empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length")
            sequences.append((context + continuation)[-(self.max_length + 1) :])
            lengths.append(len(continuation))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        results = []
        step = self.batch_size * 8  # progress granularity only; batching happens inside token_logprobs
        for start in tqdm(range(0, len(sequences), step), disable=disable_tqdm, desc="loglikelihood"):
            chunk = token_logprobs(self.model, sequences[start : start + step], pad, self.batch_size)
            for (logprobs, greedy), n in zip(chunk, lengths[start : start + step], strict=True):
                results.append((float(logprobs[-n:].sum()), bool(greedy[-n:].all())))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of ``max_length`` predictions, the first
        conditioned on the prefix token (lm-eval's rolling windows, context length 1)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        return totals

    # -- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from lmforge.infer import SamplingParams

        prompts, params = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            top_p = float(kwargs.pop("top_p", 1.0))
            if kwargs:
                raise ValueError(f"unsupported generation arguments: {sorted(kwargs)}")
            if max_tokens >= self.max_length:
                raise ValueError(
                    f"max_gen_toks {max_tokens} leaves no room for a context in {self.max_length}"
                )
            prompts.append(self.tok_encode(context)[-(self.max_length - max_tokens) :])
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature if do_sample else 0.0,
                    top_p=top_p,
                    stop=until,
                )
            )
        outputs = self.engine.generate(prompts, params, use_tqdm=not disable_tqdm)
        return [out.outputs[0].text for out in outputs]

    # -- chat --------------------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.sha256()[:16]

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``lmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
