"""Where an engine decode step's time goes on a GPU (or, with ``--cpu-smoke``, a tiny model on the CPU).

Prints transformers ``generate`` and the engine (first run on a fresh engine, then warm, with CUDA graphs on
and off) on the same weights and batch, the wall time of every engine step of one warm run, and with
``--profile`` torch.profiler's table of the warm run (host and device time per op).

    PYTHONPATH=src python benchmarks/gpu/profile_engine.py [--batch 64] [--new 32] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check import build_pair, llama_config, sync

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_kwargs = llama_config("124M", device.type != "cuda")
    hf, ours = build_pair(model_kwargs, device, dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model_kwargs["vocab_size"], args.prompt).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True, detokenize=False)
    tokens = args.batch * args.new

    def timed(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        hf_run = lambda: hf.generate(  # noqa: E731
            ids, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0
        )
        hf_run()
        seconds = timed(hf_run)
    print(f"transformers generate: {seconds:.3f} s, {tokens / seconds:,.0f} tok/s")

    def engine(graphs: bool) -> LLMEngine:
        config = EngineConfig(max_num_seqs=args.batch, kv_cache_memory_bytes=2**30, cuda_graphs=graphs)
        return LLMEngine(ours, None, config, eos_token_ids=[])

    for graphs in (True, False):
        e = engine(graphs)
        first = timed(lambda e=e: e.generate(prompts, params))
        warm = timed(lambda e=e: e.generate(prompts, params))
        print(
            f"engine, CUDA graphs {'on' if graphs else 'off'}: first run {first:.3f} s, warm {warm:.3f} s "
            f"({tokens / warm:,.0f} tok/s)"
        )
    e = engine(True)
    e.generate(prompts, params)
    for prompt in prompts:
        e.add_request(None, prompt, params)
    steps = []
    while e.has_unfinished():
        steps.append(timed(e.step))
    print("step ms:", " ".join(f"{1000 * s:.1f}" for s in steps))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            e.generate(prompts, params)
            sync(device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
