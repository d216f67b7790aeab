"""Long sequences: Mamba (recurrent state) vs attention (KV cache) of the same width.

For each context length: the context is prefilled (in 1k-token pieces, so attention's score matrix stays
bounded), then ``--decode`` greedy tokens are timed one by one; memory is the decoding state the model holds
(KV cache vs conv + SSM state; exact tensor bytes). Then training throughput (forward + backward + AdamW step)
at ``--train-len`` tokens. Both models have d_model = ``--d-model``; the Mamba model has twice the layers, which
roughly matches parameters (a Mamba layer ~ 6.6 d^2, an attention + SwiGLU layer ~ 13 d^2), as in Gu & Dao 2023.

    PYTHONPATH=src python benchmarks/long_sequence.py --contexts 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.mamba import RecurrentCache
from lmforge.model.transformer import Transformer


def build(kind: str, d_model: int, layers: int, vocab: int) -> Transformer:
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = ModelConfig(
            vocab_size=vocab,
            d_model=d_model,
            n_layers=2 * layers,
            n_heads=4,
            position="none",
            layer_types=["mamba"] * (2 * layers),
            max_seq_len=1 << 20,
        )
    else:
        cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=4, max_seq_len=1 << 20)
    return Transformer(cfg).eval()


@torch.no_grad()
def decode(model: Transformer, context: int, steps: int) -> dict:
    ids = torch.randint(0, model.cfg.vocab_size, (1, context))
    cache = RecurrentCache.for_model(model.cfg, 1, context + steps)
    start = time.perf_counter()
    for piece in range(0, context, 1024):
        logits = model(ids[:, piece : piece + 1024], cache=cache).logits
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    per_token = (time.perf_counter() - start) / steps
    return {
        "context": context,
        "prefill_tok_s": round(context / prefill, 1),
        "decode_ms_per_token": round(per_token * 1000, 2),
        "state_mib": round(cache.nbytes() / 2**20, 2),
    }


def train_throughput(model: Transformer, length: int, steps: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (1, length + 1))
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, lazy imports)
        start = time.perf_counter()
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    model.eval()
    return length / min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2, help="attention layers (Mamba gets twice as many)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--train-len", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in ("attention", "mamba"):
        model = build(kind, args.d_model, args.layers, args.vocab)
        print(json.dumps({"model": kind, "layers": model.cfg.n_layers, "params": model.num_parameters()}))
        for context in args.contexts:
            print(json.dumps({"model": kind, **decode(model, context, args.decode)}), flush=True)
        if args.train_len:
            tok_s = train_throughput(model, args.train_len, args.train_steps)
            print(json.dumps({"model": kind, "train_len": args.train_len, "train_tok_s": round(tok_s, 1)}))


if __name__ == "__main__":
    main()
