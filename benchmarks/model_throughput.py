"""Training throughput and decode latency of our Transformer vs transformers' LlamaForCausalLM.

Both models hold the same weights (ours is loaded from the folder transformers saved), run on the same batch with
the same thread count, and are timed step by step in alternation so background load hits both alike. Each step is
timed twice: wall clock (best step reported) and process CPU time (median reported). On a shared machine the CPU
time is the steadier measure of the work each implementation does; wall clock is what a user waits.

    .venv/bin/python benchmarks/model_throughput.py            # Llama-shaped, ~30M parameters
    .venv/bin/python benchmarks/model_throughput.py --small    # quick check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

from lmforge.model import ContiguousKVCache, load_pretrained

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
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="forward+backward steps per model per round")
    parser.add_argument("--prompt", type=int, default=128, help="prefill length before decoding")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--small", action="store_true", help="tiny shapes for a quick check")
    args = parser.parse_args()
    if args.small:
        args.d_model, args.layers, args.d_ff, args.vocab = 128, 2, 352, 1024
        args.seq, args.rounds, args.prompt, args.decode = 64, 3, 32, 16
    return args


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def _next_token(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1:].argmax(-1)


def _decoder_ours(model, prompt: torch.Tensor, n_new: int) -> Callable[[], object]:
    """A function taking one greedy decoding step (the prefill happens here, untimed)."""
    cache = ContiguousKVCache.for_model(model.cfg, prompt.shape[0], prompt.shape[1] + n_new)
    state = {"next": _next_token(model(prompt, cache=cache).logits)}

    def step() -> None:
        state["next"] = _next_token(model(state["next"], cache=cache).logits)

    return step


def _decoder_hf(model, prompt: torch.Tensor, n_new: int) -> Callable[[], object]:
    out = model(prompt, use_cache=True)
    state = {"past": out.past_key_values, "next": _next_token(out.logits)}

    def step() -> None:
        out = model(state["next"], past_key_values=state["past"], use_cache=True)
        state["past"], state["next"] = out.past_key_values, _next_token(out.logits)

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
        max_position_embeddings=max(args.seq, args.prompt + args.decode),
    )
    hf = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_pretrained(folder)
    models = {"lmforge": ours.train(), "transformers": hf.train()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    for model in models.values():  # warm-up
        _train_step(model, ids)

    train = {name: [] for name in NAMES}  # (wall, cpu) per step
    decode = {name: [] for name in NAMES}  # (wall, cpu) per token
    for round_ in range(args.rounds):
        order = NAMES if round_ % 2 == 0 else NAMES[::-1]
        for _ in range(args.steps):
            for name in order:
                train[name].append(_timed(lambda m=models[name]: _train_step(m, ids)))
        with torch.no_grad():
            for model in models.values():
                model.eval()
            steppers = {
                "lmforge": _decoder_ours(ours, prompt, args.decode),
                "transformers": _decoder_hf(hf, prompt, args.decode),
            }
            for _ in range(args.decode):
                for name in order:
                    decode[name].append(_timed(steppers[name]))
            for model in models.values():
                model.train()

    tokens = ids.numel()
    rows = {}
    for name in NAMES:
        rows[name] = (
            tokens / min(w for w, _ in train[name]),
            tokens / statistics.median(c for _, c in train[name]),
            1000 * statistics.median(w for w, _ in decode[name]),
            1000 * statistics.median(c for _, c in decode[name]),
        )
    print(
        f"Llama-shaped: d_model={args.d_model} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"d_ff={args.d_ff} vocab={args.vocab}; train batch {args.batch}x{args.seq}; decode after a "
        f"{args.prompt}-token prompt; threads {args.threads}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    header = ("fwd+bwd tok/s", "tok/CPU-s", "decode ms/tok", "CPU-ms/tok")
    print(f"{'':14}" + "".join(f"{h:>16}" for h in header))
    for name in NAMES:
        print(f"{name:14}" + "".join(f"{v:>16.2f}" for v in rows[name]))
    ours_row, peer_row = rows["lmforge"], rows["transformers"]
    ratios = (
        ours_row[0] / peer_row[0],
        ours_row[1] / peer_row[1],
        peer_row[2] / ours_row[2],
        peer_row[3] / ours_row[3],
    )
    print(f"{'ratio (ours)':14}" + "".join(f"{r:>15.2f}x" for r in ratios) + "   (>1: ours faster)")


if __name__ == "__main__":
    main()
