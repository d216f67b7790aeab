"""Peak memory and time of the LM loss (forward + backward): full logits vs the chunked cross-entropy.

Each variant runs in a fresh process; the figure is the growth of its peak RSS (``VmHWM``) over the
inputs alone (hidden states, head weight, labels), i.e. what the loss itself needs at its peak.

    PYTHONPATH=src .venv/bin/python benchmarks/loss_memory.py --tokens 4096 --vocab 32000 --d-model 512
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _hwm_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _child(mode: str, tokens: int, vocab: int, d_model: int, chunk: int) -> None:
    import torch
    import torch.nn.functional as F

    from lmforge.train.objective import chunked_lm_loss_sum, lm_loss_sum

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, d_model, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)  # the step's grads exist
    before = _hwm_mib()
    start = time.process_time()
    if mode == "full":
        loss = lm_loss_sum(F.linear(hidden, weight), labels)
    else:
        loss = chunked_lm_loss_sum(hidden, weight, labels, chunk)
    (loss / tokens).backward()
    seconds = time.process_time() - start
    print(f"{mode},{_hwm_mib() - before:.1f},{seconds:.3f},{loss.item() / tokens:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.tokens, args.vocab, args.d_model, args.chunk)
        return
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(
        f"{args.tokens} tokens x vocab {args.vocab}, d_model {args.d_model}: fp32 logits = {logits_mib:.0f} MiB"
    )
    print(f"load average: {os.getloadavg()}")
    print("| loss | peak RSS growth MiB | CPU s | mean loss |\n| --- | ---: | ---: | ---: |")
    for mode in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--child", mode] + [
            f"--{k}={v}" for k, v in (("tokens", args.tokens), ("vocab", args.vocab), ("d-model", args.d_model), ("chunk", args.chunk))
        ]  # fmt: skip
        name, mib, seconds, loss = subprocess.run(
            cmd, check=True, capture_output=True, text=True
        ).stdout.split(",")
        label = name if name == "full" else f"chunked ({args.chunk} tokens)"
        print(f"| {label} | {float(mib):.0f} | {float(seconds):.2f} | {float(loss):.6f} |")


if __name__ == "__main__":
    main()
