"""Generating 16x a model's training length: the engine with attention sinks vs the full KV cache.

One stream of ``--multiple`` x ``--train-len`` new tokens from a short prompt, greedy, through ``LLMEngine``:
with ``sink_tokens``/``sink_window`` (StreamingLLM: the first K and the last N tokens, the middle blocks freed
every step) and with the full cache (the context raised to hold the whole stream). Reported: tokens/s,
the peak KV blocks in use and their memory, sampled every step. Random weights (speed and memory do not
depend on them).

    .venv/bin/python benchmarks/sinks_stream.py --train-len 256 --multiple 16
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.kv_cache import bytes_per_block
from lmforge.model import ModelConfig, Transformer


def run(model: Transformer, config: EngineConfig, new_tokens: int) -> tuple[float, int]:
    engine = LLMEngine(model, None, config)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    engine.add_request("s", list(range(1, 9)), params)
    peak = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, engine.stats().kv_blocks_used)
    return new_tokens / (time.perf_counter() - start), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-len", type=int, default=256)
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    new_tokens = args.multiple * args.train_len
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, max_seq_len=args.train_len)
    block = 16
    per_block = bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block, torch.float32)
    window = args.train_len - args.sink_tokens - 64  # room for a prefill chunk of 64 inside the context
    sinks = EngineConfig(block_size=block, num_blocks=64, sink_tokens=args.sink_tokens, sink_window=window)
    long_cfg = dataclasses.replace(cfg, max_seq_len=new_tokens + 16)
    full = EngineConfig(block_size=block, num_blocks=new_tokens // block + 8)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    long_model = Transformer(long_cfg).eval()
    long_model.load_state_dict(model.state_dict())
    print(
        f"{new_tokens} new tokens ({args.multiple}x the training length {args.train_len}), 1 stream, greedy"
    )
    print("| cache | tokens/s | peak KV blocks | peak KV MiB |\n| --- | ---: | ---: | ---: |")
    for name, engine_model, config in (
        (f"sinks ({args.sink_tokens} + {window})", model, sinks),
        ("full", long_model, full),
    ):
        rate, peak = run(engine_model, config, new_tokens)
        print(f"| {name} | {rate:.1f} | {peak} | {peak * per_block / 2**20:.1f} |")


if __name__ == "__main__":
    main()
