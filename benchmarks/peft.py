"""LoRA training throughput and peak memory, lmforge vs peft + transformers; full fine-tune vs LoRA vs QLoRA memory.

One Llama-shaped model (~32M parameters by default: d_model 512, 8 layers, heads 8/4, d_ff 1408, vocab 8192,
random weights) is saved by transformers; every configuration then trains it in a fresh subprocess (so the
peak RSS, ``ru_maxrss``, is that configuration's own) on the same random batches, with the same thread count:

- ``lmforge lora``: ``apply_peft`` (LoRA r=16, alpha 32, all linear layers of the blocks, no dropout) and
  ``Trainer.train_step`` (AdamW 0.9/0.95, weight decay 0.1, clipping at 1.0, LR schedule, token counting);
- ``peft lora``: ``peft.get_peft_model`` with the same LoraConfig on ``LlamaForCausalLM``, and
  ``loss = model(ids, labels=ids).loss; loss.backward(); clip_grad_norm_; AdamW.step()``;
- ``lmforge full``: every weight trains; ``lmforge qlora``: LoRA on the NF4 (double-quantized) base,
  fp32 compute (bitsandbytes, which peft's QLoRA needs, is not installed here: no peer row for QLoRA).

The two LoRA workers alternate over ``--rounds`` rounds (background load hits both alike); tokens/s is the
best step of each worker's best round, RSS the smallest peak over rounds. "RSS over import" subtracts the
process's RSS after its imports and before building the model (transformers + peft import more than lmforge).

    .venv/bin/python benchmarks/peft.py              # ~32M parameters, batch 4 x 256, 1 thread
    .venv/bin/python benchmarks/peft.py --small      # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# this file is named like the peft package: keep its folder (sys.path[0] when run as a script) from shadowing it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROWS = [("lmforge", "lora"), ("peft", "lora"), ("lmforge", "full"), ("lmforge", "qlora")]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per worker (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="tiny shapes for a quick check")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.d_model, args.layers, args.d_ff, args.vocab, args.seq, args.steps = 128, 2, 352, 1024, 64, 3
        args.rounds = 1
    return args


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class RandomBatches:
    """Endless random-token batches (with the state_dict interface the trainer expects)."""

    def __init__(self, vocab: int, batch: int, seq: int) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.shape, self.vocab = (batch, seq + 1), vocab

    def __iter__(self) -> RandomBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, self.vocab, self.shape, generator=self.generator)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _lmforge_stepper(args: argparse.Namespace, mode: str, model_dir: str, run_dir: str):
    from lmforge.config import load_config
    from lmforge.model import load_pretrained
    from lmforge.train import Trainer
    from lmforge.train.config import TrainConfig
    from lmforge.tune.peft import PeftConfig, apply_peft

    model = load_pretrained(model_dir)
    if mode != "full":
        peft_cfg = PeftConfig(
            method="lora",
            r=args.r,
            lora_alpha=2 * args.r,
            target_modules="all-linear",
            quantize="nf4" if mode == "qlora" else "",
        )
        model = apply_peft(model, peft_cfg)
    cfg = load_config(
        TrainConfig,
        data={
            "run_dir": run_dir,
            "data": {"seq_len": args.seq},
            "max_steps": 10**6,
            "threads": args.threads,
            "batch": {"micro_batch_size": args.batch},
            "precision": {"dtype": "fp32"},
            "checkpoint": {"export": False},
            "log": {"progress": False, "plots": False},
        },
    )
    trainer = Trainer(cfg, model=model, train_data=RandomBatches(args.vocab, args.batch, args.seq))
    trainable = sum(p.numel() for p in trainer.params)
    return trainer.train_step, trainable


def _peft_stepper(args: argparse.Namespace, mode: str, model_dir: str):
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode != "lora":
        raise SystemExit(f"peft worker: mode {mode!r} is not benchmarked")
    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=True,
    )
    data = RandomBatches(args.vocab, args.batch, args.seq)

    def step() -> None:
        batch = next(data)
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def worker(args: argparse.Namespace) -> None:
    impl, mode, model_dir = args.worker
    torch.set_num_threads(args.threads)
    # everything the stepper imports, imported before the baseline (transformers loads its model classes lazily)
    if impl == "peft":
        import peft
        import transformers

        assert transformers.LlamaForCausalLM and peft.LoraConfig and peft.get_peft_model
    else:
        from lmforge.config import load_config
        from lmforge.model import load_pretrained
        from lmforge.train import Trainer
        from lmforge.train.config import TrainConfig
        from lmforge.tune.peft import PeftConfig, apply_peft

        assert load_config and load_pretrained and Trainer and TrainConfig and PeftConfig and apply_peft
    baseline = _rss_bytes()
    with tempfile.TemporaryDirectory() as run_dir:
        if impl == "lmforge":
            step, trainable = _lmforge_stepper(args, mode, model_dir, run_dir)
        else:
            step, trainable = _peft_stepper(args, mode, model_dir)
        for _ in range(2):
            step()
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "peak": peak, "baseline": baseline, "trainable": trainable}))


def _run(args: argparse.Namespace, impl: str, mode: str, model_dir: str) -> dict[str, Any]:
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("worker", "small", "rounds") and v is not None
    ]
    command = [sys.executable, __file__, *flags, "--worker", impl, mode, model_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{impl} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _parse()
    if args.worker:
        worker(args)
        return
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
    )
    hf = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in hf.parameters())
    results: dict[tuple[str, str], list[dict[str, Any]]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as model_dir:
        hf.save_pretrained(model_dir)
        del hf
        for round_ in range(args.rounds):
            pair = ROWS[:2] if round_ % 2 == 0 else ROWS[1::-1]
            for impl, mode in pair:
                results[(impl, mode)].append(_run(args, impl, mode, model_dir))
        for impl, mode in ROWS[2:]:
            results[(impl, mode)].append(_run(args, impl, mode, model_dir))

    tokens = args.batch * args.seq
    print(
        f"Llama-shaped, {params / 1e6:.1f}M parameters: d_model={args.d_model} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} d_ff={args.d_ff} vocab={args.vocab}; batch {args.batch}x{args.seq}; "
        f"LoRA r={args.r} alpha={2 * args.r} on all linear layers; cpu fp32; threads {args.threads}; "
        f"{args.steps} timed steps x {args.rounds} round(s); torch {torch.__version__}"
    )
    print(
        f"{'':16}{'trainable':>12}{'tok/s best':>12}{'tok/s median':>14}{'peak RSS MB':>13}{'over import MB':>16}"
    )
    summary = {}
    for impl, mode in ROWS:
        runs = results[(impl, mode)]
        best = tokens / min(min(r["times"]) for r in runs)
        median = tokens / min(statistics.median(r["times"]) for r in runs)
        peak = min(r["peak"] for r in runs)
        over = min(r["peak"] - r["baseline"] for r in runs)
        summary[(impl, mode)] = (best, median, peak, over)
        print(
            f"{impl + ' ' + mode:16}{runs[0]['trainable']:>12,}{best:>12.1f}{median:>14.1f}"
            f"{peak / 2**20:>13.1f}{over / 2**20:>16.1f}"
        )
    ours, peer = summary[("lmforge", "lora")], summary[("peft", "lora")]
    print(
        f"lmforge / peft (LoRA): speed {ours[0] / peer[0]:.2f}x best, {ours[1] / peer[1]:.2f}x median "
        f"(>1: ours faster); peak RSS {ours[2] / peer[2]:.2f}x, over import {ours[3] / peer[3]:.2f}x (<1: ours smaller)"
    )


if __name__ == "__main__":
    main()
