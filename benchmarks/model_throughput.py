"""Training throughput and decode latency of our Transformer vs transformers' LlamaForCausalLM.

Both models hold the same weights (ours is loaded from the folder transformers saved), run on the same batch with
the same thread count, and are timed step by step in alternation so background load hits both alike; the table
reports the best step (and the median) of each. Run: ``.venv/bin/python benchmarks/model_throughput.py`` (``--small`` for a quick check).
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
    parser.add_argument("--steps", type=int, default=3, help="forward+backward steps per round")
    parser.add_argument("--prompt", type=int, default=128, help="prefill length before decoding")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded one at a time per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--small", action="store_true", help="tiny shapes for a quick check")
    args = parser.parse_args()
    if args.small:
        args.d_model, args.layers, args.d_ff, args.vocab = 128, 2, 352, 1024
        args.seq, args.rounds, args.prompt, args.decode = 64, 2, 32, 8
    return args


def _train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    logits = model(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def _decode_ours(model, ids: torch.Tensor, n_new: int) -> float:
    """Seconds per token of greedy decoding after a prefill (prefill not counted)."""
    cache = ContiguousKVCache.for_model(model.cfg, ids.shape[0], ids.shape[1] + n_new)
    next_id = model(ids, cache=cache).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(n_new):
        next_id = model(next_id, cache=cache).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / n_new


@torch.no_grad()
def _decode_hf(model, ids: torch.Tensor, n_new: int) -> float:
    out = model(ids, use_cache=True)
    past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(n_new):
        out = model(next_id, past_key_values=past, use_cache=True)
        past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / n_new


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
    hf.train()
    ours.train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    for model in (ours, hf):  # warm-up
        _train_step(model, ids)

    # one step of each model in turn (order swapped every round) so a burst of background load hits both;
    # the best time of each is the least disturbed measurement of the same work
    step_seconds = {"lmforge": [], "transformers": []}
    decode_seconds = {"lmforge": [], "transformers": []}
    models = {"lmforge": ours, "transformers": hf}
    decoders = {"lmforge": _decode_ours, "transformers": _decode_hf}
    for round_ in range(args.rounds):
        order = ["lmforge", "transformers"][:: 1 if round_ % 2 == 0 else -1]
        for _ in range(args.steps):
            for name in order:
                step_seconds[name].append(_timed(lambda m=models[name]: _train_step(m, ids)))
        for name in order:
            models[name].eval()
            decode_seconds[name].append(decoders[name](models[name], prompt, args.decode))
            models[name].train()

    tok_s = {k: ids.numel() / min(v) for k, v in step_seconds.items()}
    tok_s_median = {k: ids.numel() / statistics.median(v) for k, v in step_seconds.items()}
    ms = {k: 1000 * min(v) for k, v in decode_seconds.items()}
    print(
        f"Llama-shaped: d_model={args.d_model} layers={args.layers} heads={args.heads}/{args.kv_heads} "
        f"d_ff={args.d_ff} vocab={args.vocab}; batch {args.batch}x{args.seq}; threads {args.threads}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"{'':14}{'fwd+bwd tok/s (best)':>22}{'(median)':>10}{'decode ms/token':>17}")
    for name in ("lmforge", "transformers"):
        print(f"{name:14}{tok_s[name]:>22.0f}{tok_s_median[name]:>10.0f}{ms[name]:>17.2f}")
    ratio_train = tok_s["lmforge"] / tok_s["transformers"]
    ratio_median = tok_s_median["lmforge"] / tok_s_median["transformers"]
    ratio_decode = ms["transformers"] / ms["lmforge"]
    print(
        f"{'ratio (ours)':14}{ratio_train:>21.2f}x{ratio_median:>9.2f}x{ratio_decode:>16.2f}x   (>1: ours faster)"
    )


if __name__ == "__main__":
    main()
