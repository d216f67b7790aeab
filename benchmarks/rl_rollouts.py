"""RL rollouts: lmforge's engine (hybrid, weights pushed every iteration) vs ``transformers.generate``, and the
step-time split (rollout / scoring / prepare / update) of ``lmforge ppo`` and ``lmforge grpo``.

Part 1. One Llama-shaped model (built by transformers, saved, and loaded by lmforge from that folder: the same
weights), the same chat-templated prompts and the same sampling (temperature 1, no top-k/top-p, ``n`` replies per
prompt, at most ``--new`` tokens, stopping at EOS). Each round, in alternation:

* engine: :class:`lmforge.infer.rollout.EngineRollouts` as PPO/GRPO use it: ``push_weights(policy)`` (an
  in-place copy of the trainer's weights) then ``sample(prompts, n)``;
* transformers: ``model.generate(..., do_sample=True, num_return_sequences=n)`` on the left-padded batch, which
  is how trl rolls out without vLLM (the training model generates itself; no push).

Rollout tokens/s = generated tokens (up to and including EOS) / wall seconds; the median round is reported and
the ratio engine / transformers.

Part 2. A few steps of PPO and GRPO on the same model and prompts with a toy ``contains`` reward, through the one
trainer, with 32 replies per rollout for both (GRPO: 4 prompts x 8; PPO: 8 prompts x 4, 2 epochs of 2
mini-batches of 16); per rollout: rollout = push + sample, scoring = reward functions, prepare = the rest of
making the batch (policy/reference/critic forwards, advantages), update = everything else in the trainer's
wall time (forward/backward/optimizer steps, logging, the final checkpoint).

    PYTHONPATH=src .venv/bin/python benchmarks/rl_rollouts.py
    PYTHONPATH=src .venv/bin/python benchmarks/rl_rollouts.py --small     # quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from lmforge.config import load_config
from lmforge.demo.rl import engine_rollouts, ppo_engine_rollouts
from lmforge.model import load_pretrained
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer
from lmforge.train.trainer import Trainer
from lmforge.tune.grpo import GRPOConfig, GRPOObjective, RolloutSource, build_scorer, load_rl_prompts
from lmforge.tune.ppo import PPOConfig, build_ppo

TEXT = [
    f"What is {a} + {b}? It is {a + b}. Reverse the words: apple tree blue {a}. The answer is blue tree apple."
    for a in range(40)
    for b in range(0, 40, 7)
]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per rollout (part 1)")
    parser.add_argument("--n", type=int, default=4, help="replies per prompt (part 1)")
    parser.add_argument("--new", type=int, default=64, help="max new tokens per reply")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (part 1)")
    parser.add_argument("--steps", type=int, default=8, help="PPO optimizer steps (GRPO: a quarter as many)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--small", action="store_true", help="tiny shapes for a quick check")
    parser.add_argument(
        "--model",
        help="a trained model folder (e.g. a demo run's sft/model) instead of random weights: its replies end "
        "at EOS at different lengths, as an RL policy's do",
    )
    parser.add_argument(
        "--prompts-file", help="RL prompt records (JSONL) for --model; default MODEL/prompts.jsonl"
    )
    parser.add_argument("--rollouts-only", action="store_true", help="skip the PPO / GRPO step split")
    args = parser.parse_args()
    if args.small:
        args.d_model, args.layers, args.d_ff, args.prompts, args.new, args.rounds = 64, 2, 176, 4, 16, 2
        args.steps = 4
    return args


def _build(args: argparse.Namespace, folder: Path) -> None:
    tokenizer = train_tokenizer(TEXT, TokenizerTrainConfig(vocab_size=args.vocab))
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    records = [{"prompt": f"What is {i} + {2 * i + 1}?"} for i in range(64)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _reply_length(ids: Sequence[int], eos: int) -> int:
    """Tokens generated up to and including the first EOS."""
    ids = list(ids)
    return ids.index(eos) + 1 if eos in ids else len(ids)


def rollout_throughput(args: argparse.Namespace, folder: Path, prompts_file: Path) -> dict[str, Any]:
    from lmforge.infer.rollout import EngineRollouts
    from lmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    prompts = [p.input_ids for p in load_rl_prompts([prompts_file], tokenizer, 200)][: args.prompts]
    policy = load_pretrained(folder).train()  # the trainer's model
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rollouts = EngineRollouts(tokenizer, args.new, temperature=1.0)
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def engine_round() -> tuple[int, float]:
        start = time.perf_counter()
        rollouts.push_weights(policy)
        out = rollouts.sample(prompts, args.n)
        return sum(_reply_length(c, eos) for group in out for c in group), time.perf_counter() - start

    @torch.no_grad()
    def hf_round() -> tuple[int, float]:
        start = time.perf_counter()
        out = hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.new,
            num_return_sequences=args.n,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        return sum(_reply_length(row[width:].tolist(), eos) for row in out), time.perf_counter() - start

    engine_round()  # builds the engine (the first push deep-copies the policy); warms both up
    hf_round()
    rates: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[int]] = defaultdict(list)
    for _ in range(args.rounds):
        for name, fn in (("engine", engine_round), ("transformers", hf_round)):
            n_tokens, seconds = fn()
            rates[name].append(n_tokens / seconds)
            tokens[name].append(n_tokens)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "tokens_per_s": medians,
        "tokens_per_round": {name: statistics.median(values) for name, values in tokens.items()},
        "ratio": medians["engine"] / medians["transformers"],
        "rounds": dict(rates),
    }


class Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, name: str, fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return call


class _TimedScorer:
    def __init__(self, scorer: Any, clock: Clock) -> None:
        self.reward_model = scorer.reward_model  # (the sources move it to the policy's device)
        self.call = clock.timed("scoring", scorer)

    def __call__(self, *args: Any) -> Any:
        return self.call(*args)


class TimedSource:
    """The trainer's batch source, its ``next()`` timed (and its rollouts and scorer, through ``clock``)."""

    def __init__(self, source: Any, clock: Clock) -> None:
        self.source, self.clock = source, clock
        rollouts = source.rollouts
        for method in ("push_weights", "sample", "sample_with_logprobs"):
            if hasattr(rollouts, method):
                setattr(rollouts, method, clock.timed("rollout", getattr(rollouts, method)))
        source.scorer = _TimedScorer(source.scorer, clock)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.clock.timed("source", self.source.__next__)()

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def _split(clock: Clock, total: float, rollouts: int, steps: int) -> dict[str, Any]:
    s = clock.seconds
    split = {
        "rollout": s["rollout"],
        "scoring": s["scoring"],
        "prepare": s["source"] - s["rollout"] - s["scoring"],
        "update": total - s["source"],
    }
    return {
        "rollouts": rollouts,
        "steps": steps,
        "per_rollout_s": {k: v / rollouts for k, v in split.items()},
        "share": {k: v / total for k, v in split.items()},
        "total_s": total,
    }


def _recipe(args: argparse.Namespace, folder: Path, run_dir: Path, steps: int, micro: int) -> dict[str, Any]:
    return {
        "init_from": str(folder),
        "run_dir": str(run_dir),
        "max_steps": steps,
        "data": {"seq_len": 200},
        "batch": {"micro_batch_size": micro},
        "optim": {"lr": 1e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "log": {"every_steps": steps, "plots": False, "progress": False},
        "checkpoint": {"every_steps": 0, "export": False},
        "threads": args.threads,
    }


def ppo_split(args: argparse.Namespace, folder: Path, run_dir: Path) -> dict[str, Any]:
    data = _recipe(args, folder, run_dir, args.steps, 16)
    data["ppo"] = {
        "paths": [str(args.prompts_path)],
        "prompts_per_rollout": 8,
        "samples_per_prompt": 4,
        "epochs": 2,
        "max_new_tokens": args.new,
        "rewards": {"contains": 1.0},
        "contains": "blue",
    }
    cfg = load_config(PPOConfig, data=data)
    model, objective, source, _ = build_ppo(cfg, ppo_engine_rollouts)
    clock = Clock()
    trainer = Trainer(cfg, model, objective, TimedSource(source, clock))
    start = time.perf_counter()
    trainer.fit()
    return _split(clock, time.perf_counter() - start, source.rollout_count, args.steps)


def grpo_split(args: argparse.Namespace, folder: Path, run_dir: Path) -> dict[str, Any]:
    from lmforge.tokenizer import load_tokenizer

    steps = max(1, args.steps // 4)  # one rollout per step: as many rollouts as PPO's run
    data = _recipe(args, folder, run_dir, steps, 4)
    data["grpo"] = {
        "paths": [str(args.prompts_path)],
        "group_size": 8,
        "max_new_tokens": args.new,
        "rewards": {"contains": 1.0},
        "contains": "blue",
    }
    cfg = load_config(GRPOConfig, data=data)
    tokenizer = load_tokenizer(folder)
    prompts = load_rl_prompts(cfg.grpo.paths, tokenizer, 200 - args.new)
    policy = load_pretrained(folder).train()
    source = RolloutSource(
        prompts,
        policy,
        engine_rollouts(policy, tokenizer, cfg.grpo),
        build_scorer(cfg.grpo),
        tokenizer,
        4,
        8,
        tokenizer.pad_id,
    )
    clock = Clock()
    trainer = Trainer(cfg, policy, GRPOObjective(), TimedSource(source, clock))
    start = time.perf_counter()
    trainer.fit()
    return _split(clock, time.perf_counter() - start, steps, steps)


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
            n_params = sum(p.numel() for p in load_pretrained(folder).parameters())
            print(f"{folder}: {n_params / 1e6:.2f}M parameters; threads={args.threads}")
        else:
            folder = Path(tmp) / "model"
            _build(args, folder)
            n_params = sum(p.numel() for p in load_pretrained(folder).parameters())
            print(
                f"Llama-shaped: d_model={args.d_model} layers={args.layers} heads={args.heads}/{args.kv_heads} "
                f"d_ff={args.d_ff} vocab={args.vocab}: {n_params / 1e6:.2f}M parameters; threads={args.threads}"
            )
        args.prompts_path = Path(args.prompts_file) if args.prompts_file else folder / "prompts.jsonl"
        result = {"rollouts": rollout_throughput(args, folder, args.prompts_path)}
        r = result["rollouts"]
        print(
            f"rollouts ({args.prompts} prompts x {args.n}, <= {args.new} new tokens, median of {args.rounds} rounds): "
            f"engine {r['tokens_per_s']['engine']:.0f} tok/s (push + sample), transformers.generate "
            f"{r['tokens_per_s']['transformers']:.0f} tok/s: {r['ratio']:.2f}x"
        )
        if args.rollouts_only:
            print(json.dumps(result, indent=2))
            return
        result["ppo"] = ppo_split(args, folder, Path(tmp) / "ppo")
        result["grpo"] = grpo_split(args, folder, Path(tmp) / "grpo")
        for name in ("ppo", "grpo"):
            s = result[name]
            parts = ", ".join(
                f"{k} {v:.2f} s ({100 * s['share'][k]:.0f}%)" for k, v in s["per_rollout_s"].items()
            )
            print(
                f"{name}: {s['rollouts']} rollouts of 32 replies, {s['steps']} optimizer steps; per rollout: {parts}"
            )
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
