"""Where a decode step of ``LLMEngine`` spends its time on a CPU: the model forward vs the engine's host work.

B requests (prompts of 64 + i tokens, greedy, EOS ignored, detokenized with a byte-level BPE trained to the
model's vocabulary) are prefilled, then ``--steps`` pure decode steps are timed in thread CPU time (steadier
than wall time on a shared machine), best of ``--repeats`` fresh engines. The step is split into the
scheduler, the model runner without the forward (mirror arrangement, input tensors), the model forward, sampling
with ``append_token`` (stop checks, detokenization), and output building. ``--ops`` adds a torch.profiler
split of the whole step: matmuls, attention, other ops, and time outside ops (Python, engine and model; the
profiler inflates it).

    PYTHONPATH=src .venv/bin/python benchmarks/engine_step.py --batch 16 64
    PYTHONPATH=src .venv/bin/python benchmarks/engine_step.py --batch 16 64 --ops

The model is ``serve_throughput.py``'s (Llama-style, 6.9 M parameters: vocab 8192, d_model 256, 4 layers,
8 heads / 4 KV heads), built with lmforge directly (random weights, seed 0).
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from collections.abc import Callable
from typing import Any

import torch

SECTIONS = ("schedule", "runner (no forward)", "sample + append", "outputs")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(200))
        for _ in range(600)
    ]
    tokenizer = train_tokenizer(words, TokenizerTrainConfig(vocab_size=args.vocab, min_frequency=1))
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=2048
    )
    return Transformer(cfg).eval(), tokenizer


def timed(acc: collections.Counter, label: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        result = fn(*args, **kwargs)
        acc[label] += time.thread_time() - start
        return result

    return wrapper


def engine_at(model: torch.nn.Module, tokenizer: Any, batch: int, args: argparse.Namespace):
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(
        model, tokenizer, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096), eos_token_ids=[]
    )
    params = SamplingParams(max_tokens=args.steps * 2 + 20, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(None, [3 + (i * 7 + j) % (args.vocab - 3) for j in range(64 + i)], params)
    for _ in range(5):  # prefill (one step) and a few decodes: buffers sized
        engine.step()
    return engine


def split(model: torch.nn.Module, tokenizer: Any, batch: int, args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per decode step by section, each the best of ``--repeats`` fresh engines."""
    acc: collections.Counter = collections.Counter()
    start = [0.0]
    hooks = [
        model.register_forward_pre_hook(lambda m, a: start.__setitem__(0, time.thread_time())),
        model.register_forward_hook(lambda m, a, o: acc.update({"forward": time.thread_time() - start[0]})),
    ]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        engine = engine_at(model, tokenizer, batch, args)
        engine.scheduler.schedule = timed(acc, "schedule", engine.scheduler.schedule)
        engine.runner.execute = timed(acc, "execute", engine.runner.execute)
        engine._sample = timed(acc, "sample + append", engine._sample)
        engine._make_output = timed(acc, "outputs", engine._make_output)
        acc.clear()
        begin = time.thread_time()
        for _ in range(args.steps):
            engine.step()
        acc["step"] = time.thread_time() - begin
        ms = {k: 1e3 * v / args.steps for k, v in acc.items()}
        ms["runner (no forward)"] = ms.pop("execute") - ms["forward"]
        ms["host"] = ms["step"] - ms["forward"]
        best = {k: min(v, best.get(k, float("inf"))) for k, v in ms.items()}
    for hook in hooks:
        hook.remove()
    return best


def op_split(
    model: torch.nn.Module, tokenizer: Any, batch: int, args: argparse.Namespace
) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    engine = engine_at(model, tokenizer, batch, args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        begin = time.thread_time()
        for _ in range(args.steps):
            engine.step()
        step = 1e3 * (time.thread_time() - begin) / args.steps
    ops = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
    matmul = sum(v for k, v in ops.items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
    attention = sum(v for k, v in ops.items() if "scaled_dot_product" in k or "flash_attention" in k)
    other = sum(ops.values()) - matmul - attention
    return {
        "step": step,
        "matmuls": matmul,
        "attention": attention,
        "other ops": other,
        "outside ops": step - sum(ops.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ops", action="store_true", help="also a torch.profiler split by op kind")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build(args)
    print(f"{'batch':>5} {'step':>7} {'forward':>8} {'host':>6} " + " ".join(f"{s:>19}" for s in SECTIONS))
    for batch in args.batch:
        ms = split(model, tokenizer, batch, args)
        print(
            f"{batch:>5} {ms['step']:>7.2f} {ms['forward']:>8.2f} {ms['host']:>6.2f} "
            + " ".join(f"{ms[s]:>19.3f}" for s in SECTIONS)
            + f"   (ms per step, thread CPU; host {100 * ms['host'] / ms['step']:.0f}%)"
        )
    if args.ops:
        for batch in args.batch:
            ms = op_split(model, tokenizer, batch, args)
            step = ms.pop("step")
            print(
                f"batch {batch}, under torch.profiler: step {step:.2f} ms; "
                + ", ".join(f"{k} {v:.2f} ({100 * v / step:.0f}%)" for k, v in ms.items())
            )


if __name__ == "__main__":
    main()
