"""Training throughput of the lmforge trainer vs a plain transformers training loop, in the same run.

Both train the same Llama-shaped model (ours is loaded from the folder transformers saved) on the same
random batches with AdamW (0.9, 0.95, weight decay 0.1), global-norm clipping at 1.0 and the same thread
count. Ours is a full ``Trainer.train_step`` (token counting, per-token loss scaling, grad-norm, spike
check, LR schedule, update); the peer is ``loss = model(ids, labels=ids).loss; loss.backward();
clip_grad_norm_; optimizer.step()``. Steps are timed in alternation so background load hits both alike:
best wall-clock step and median process-CPU time per step are reported.

    .venv/bin/python benchmarks/train_throughput.py                  # ~30M parameters, CPU fp32
    .venv/bin/python benchmarks/train_throughput.py --small          # quick check
    .venv/bin/python benchmarks/train_throughput.py --fused --loss-chunk 256 --dtype bf16   # vs plain fp32 peer
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --compile --d-model 768 --layers 12 \\
        --heads 12 --kv-heads 12 --d-ff 3072 --vocab 50304 --seq 1024 --batch 16   # GPU, with MFU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from lmforge.config import load_config
from lmforge.model import load_pretrained
from lmforge.model.flops import flops_per_token
from lmforge.train import Trainer
from lmforge.train.config import TrainConfig

NAMES = ("lmforge", "transformers")


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
    parser.add_argument("--rounds", type=int, default=6, help="alternating timing rounds, one step each")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="ours (autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our blocks (precision.compile)")
    parser.add_argument("--loss-chunk", type=int, default=256, help="ours: precision.loss_chunk_tokens")
    parser.add_argument(
        "--peer-dtype", default="fp32", choices=["fp32", "bf16"], help="transformers' autocast"
    )
    parser.add_argument("--peer-compile", action="store_true", help="torch.compile the transformers model")
    parser.add_argument("--fused", action="store_true", help="fused AdamW kernels for both")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a quick check")
    args = parser.parse_args()
    if args.small:
        args.d_model, args.layers, args.d_ff, args.vocab, args.seq, args.rounds = 128, 2, 352, 1024, 64, 3
    return args


class RandomBatches:
    """Endless random-token batches (with the state_dict interface the trainer expects)."""

    def __init__(self, vocab: int, batch: int, seq: int, device: str) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.shape, self.vocab, self.device = (batch, seq + 1), vocab, device

    def __iter__(self) -> RandomBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens = torch.randint(0, self.vocab, self.shape, generator=self.generator).to(self.device)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _timed(fn: Callable[[], object], device: str) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _hf_stepper(model: torch.nn.Module, args: argparse.Namespace) -> Callable[[], None]:
    decay = [p for p in model.parameters() if p.ndim >= 2 and p is not model.model.embed_tokens.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    kernel = {"fused": True} if args.fused else {"foreach": True}
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
        **kernel,
    )
    data = RandomBatches(args.vocab, args.batch, args.seq, args.device)
    autocast = torch.autocast(
        args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.peer_dtype == "bf16"
    )
    forward = torch.compile(model) if args.peer_compile else model

    def step() -> None:
        batch = next(data)
        with autocast:
            loss = forward(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
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
    with tempfile.TemporaryDirectory() as run_dir:
        hf.save_pretrained(run_dir + "/hf")
        ours = load_pretrained(run_dir + "/hf")
        hf = hf.to(args.device).train()
        cfg = load_config(
            TrainConfig,
            data={
                "run_dir": run_dir + "/run",
                "data": {"seq_len": args.seq},
                "max_steps": 10**6,
                "threads": args.threads,
                "optim": {"fused": args.fused or None},
                "batch": {"micro_batch_size": args.batch},
                "precision": {
                    "dtype": args.dtype,
                    "compile": args.compile,
                    "loss_chunk_tokens": args.loss_chunk,
                },
                "checkpoint": {"export": False},
                "log": {"progress": False},
            },
        )
        trainer = Trainer(
            cfg, model=ours, train_data=RandomBatches(args.vocab, args.batch, args.seq, args.device)
        )
        steppers = {"lmforge": trainer.train_step, "transformers": _hf_stepper(hf, args)}
        for step in steppers.values():  # warm-up (and compilation)
            step()
            step()
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in NAMES}
        for round_ in range(args.rounds):
            for name in NAMES if round_ % 2 == 0 else NAMES[::-1]:
                times[name].append(_timed(steppers[name], args.device))

    tokens = args.batch * args.seq
    rows = {
        name: (tokens / min(w for w, _ in times[name]), tokens / statistics.median(c for _, c in times[name]))
        for name in NAMES
    }
    params = sum(p.numel() for p in hf.parameters())
    print(f"load average (1/5/15 min) at the end: {os.getloadavg()}")
    print(
        f"Llama-shaped, {params / 1e6:.1f}M parameters: d_model={args.d_model} layers={args.layers} "
        f"heads={args.heads}/{args.kv_heads} d_ff={args.d_ff} vocab={args.vocab}; batch {args.batch}x{args.seq}; "
        f"{args.device}; ours {args.dtype}{' compiled' if args.compile else ''} loss_chunk={args.loss_chunk}, "
        f"transformers {args.peer_dtype}{' compiled' if args.peer_compile else ''}; "
        f"{'fused' if args.fused else 'default'} AdamW; threads {args.threads}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    header = ["train tok/s", "tok/CPU-s"]
    peak = trainer.flops_per_s_peak
    print(f"MFU against the trainer's peak: {peak / 1e9:.1f} GFLOP/s ({args.dtype} matmul probe)")
    if peak:
        header.append("MFU")
    print(f"{'':14}" + "".join(f"{h:>14}" for h in header))
    train_flops = flops_per_token(trainer.model_cfg, args.seq)["train"]
    for name in NAMES:
        cells = [f"{v:>14.1f}" for v in rows[name]]
        if peak:
            cells.append(f"{100 * rows[name][0] * train_flops / peak:>13.1f}%")
        print(f"{name:14}" + "".join(cells))
    ratios = [rows["lmforge"][i] / rows["transformers"][i] for i in range(2)]
    print(f"{'ratio (ours)':14}" + "".join(f"{r:>13.2f}x" for r in ratios) + "   (>1: ours faster)")


if __name__ == "__main__":
    main()
