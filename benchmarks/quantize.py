"""Weight-only quantization: quality (perplexity on held-out real text) and single-stream decode speed.

Quality: a small Llama-shaped model is trained with the lmforge trainer on the King James Bible (every chapter
but each tenth; the corpora of ``../shared/corpora``, built at /tmp/lmforge-corpora by its build.sh), then
quantized with ``lmforge.model.quant`` (the code of ``lmforge quantize``) and scored on the held-out chapters
(each tenth) in non-overlapping windows: perplexity of fp32, int8, int4 (groups 32/64/128) and NF4.

Speed: single-stream greedy decoding in the engine (``LLMEngine``, one request) of an ~88M-parameter
Llama-shaped model with random weights (d_model 768, 12 layers, d_ff 2048, vocab 2048), fp32 vs bf16 vs int8
vs int4 (group 128) vs NF4, timed in alternating rounds (best round reported: background load only slows).
Decode tokens/s excludes the prefill: (time of prompt + N tokens - time of prompt + 1 token) / (N - 1).

    .venv/bin/python benchmarks/quantize.py                     # both parts, 1 thread
    .venv/bin/python benchmarks/quantize.py --skip-quality      # speed only
    .venv/bin/python benchmarks/quantize.py --small             # quick check
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.quant import quantize_model, quantized_bytes
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer
from lmforge.train import Trainer
from lmforge.train.config import TrainConfig

BATCH = 8  # training sequences per step
CORPUS = Path("/tmp/lmforge-corpora/kjv.jsonl.gz")
QUALITY_METHODS = [("fp32", None), ("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("nf4", None)]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--eval-tokens", type=int, default=30_000)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a quick check")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------- quality


class TokenBatches:
    """Random windows of a token stream as next-token batches (with the state_dict the trainer expects)."""

    def __init__(self, tokens: torch.Tensor, batch: int, seq: int) -> None:
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.batch,), generator=self.generator)
        windows = torch.stack([self.tokens[s : s + self.seq + 1] for s in starts.tolist()])
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@torch.no_grad()
def perplexity(model: Transformer, tokens: torch.Tensor, seq: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(tokens) - seq - 1, seq):
        window = tokens[start : start + seq + 1][None]
        logits = model(window[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        count += seq
    return math.exp(total / count)


def quality(args: argparse.Namespace) -> None:
    if not args.corpus.is_file():
        raise SystemExit(f"{args.corpus}: not found; build it with `bash ../shared/corpora/build.sh`")
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    train_docs = [d for i, d in enumerate(docs) if i % 10]
    held_out = [d for i, d in enumerate(docs) if i % 10 == 0]
    vocab = 1024 if args.small else 2048
    tokenizer = train_tokenizer(train_docs, TokenizerTrainConfig(vocab_size=vocab))

    def encode(texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for text in texts:
            ids += tokenizer.encode(text)
        return torch.tensor(ids)

    train_tokens, eval_tokens = encode(train_docs), encode(held_out)[: args.eval_tokens]
    seq = 128
    dims = dict(d_model=128, n_layers=2, n_heads=4, d_ff=384) if args.small else {}
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        **(dims or dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768)),
        max_seq_len=seq,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    steps = 30 if args.small else args.train_steps
    with tempfile.TemporaryDirectory() as run_dir:
        train_cfg = load_config(
            TrainConfig,
            data={
                "run_dir": run_dir,
                "data": {"seq_len": seq},
                "max_steps": steps,
                "threads": args.threads,
                "optim": {"lr": 2e-3},
                "schedule": {"warmup_steps": min(50, steps // 10)},
                "batch": {"micro_batch_size": BATCH},
                "checkpoint": {"export": False, "every_steps": 0},
                "log": {"progress": False, "every_steps": max(steps // 6, 1), "plots": False},
            },
        )
        started = time.perf_counter()
        Trainer(train_cfg, model=model, train_data=TokenBatches(train_tokens, BATCH, seq)).fit()
        trained_s = time.perf_counter() - started
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\nquality: {params / 1e6:.1f}M-parameter Llama-shaped model (d_model {cfg.d_model}, {cfg.n_layers} "
        f"layers, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}) trained {steps} steps x {BATCH} x {seq} tokens on "
        f"{len(train_tokens):,} KJV tokens ({trained_s:.0f} s); perplexity on {len(eval_tokens):,} held-out "
        f"tokens (every 10th chapter), windows of {seq}"
    )
    print(f"{'method':14}{'perplexity':>12}{'vs fp32':>10}{'weights MB':>12}")
    base = None
    for method, group in QUALITY_METHODS:
        q = Transformer(cfg)
        q.load_state_dict(model.state_dict())
        q.eval()
        if method != "fp32":
            quantize_model(q, method, group)
        ppl = perplexity(q, eval_tokens, seq)
        base = base or ppl
        name = method + (f" g{group}" if group else "")
        print(f"{name:14}{ppl:>12.3f}{100 * (ppl / base - 1):>+9.2f}%{quantized_bytes(q) / 1e6:>12.2f}")


# --------------------------------------------------------------------------------------------------- speed


def _decode_seconds(engine: LLMEngine, prompt: list[int], n: int) -> float:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    started = time.perf_counter()
    engine.generate([prompt], params)
    return time.perf_counter() - started


def speed(args: argparse.Namespace) -> None:
    dims = (
        dict(d_model=256, n_layers=2, n_heads=4, d_ff=768, vocab_size=512)
        if args.small
        else dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, vocab_size=2048)
    )
    cfg = ModelConfig(**dims, max_seq_len=512)
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    variants: dict[str, Transformer] = {"fp32": base}
    half = Transformer(cfg)
    half.load_state_dict(base.state_dict())
    variants["bf16"] = half.to(torch.bfloat16).eval()
    for method, group in [("int8", None), ("int4", 128), ("nf4", None)]:
        q = Transformer(cfg)
        q.load_state_dict(base.state_dict())
        variants[method] = quantize_model(q.eval(), method, group)
    engines = {
        name: LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=16, max_num_seqs=1))
        for name, model in variants.items()
    }
    prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.decode_tokens
    best: dict[str, float] = {}
    for engine in engines.values():  # warm-up
        _decode_seconds(engine, prompt, 4)
    for round_ in range(args.rounds):
        names = list(engines) if round_ % 2 == 0 else list(engines)[::-1]
        for name in names:
            one = _decode_seconds(engines[name], prompt, 1)
            many = _decode_seconds(engines[name], prompt, n)
            best[name] = max(best.get(name, 0.0), (n - 1) / max(many - one, 1e-9))
    params = sum(p.numel() for p in base.parameters())
    print(
        f"\nspeed: single-stream engine decode, {params / 1e6:.1f}M-parameter Llama-shaped model (random weights, "
        f"d_model {cfg.d_model}, {cfg.n_layers} layers, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}), prompt 16, "
        f"{n} new tokens, best of {args.rounds} alternating rounds, {args.threads} thread(s), torch {torch.__version__}"
    )
    print(f"{'weights':10}{'decode tok/s':>14}{'vs fp32':>10}{'weights MB':>12}")
    for name, model in variants.items():
        print(
            f"{name:10}{best[name]:>14.1f}{best[name] / best['fp32']:>9.2f}x{quantized_bytes(model) / 1e6:>12.1f}"
        )


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    if not args.skip_quality:
        quality(args)
    if not args.skip_speed:
        speed(args)


if __name__ == "__main__":
    main()
