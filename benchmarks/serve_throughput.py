"""Engine throughput vs ``transformers`` ``generate`` with static padded batches, same weights, same run.

Workload: N requests with mixed prompt and output lengths (seeded), greedy decoding, EOS ignored so every
request produces exactly its requested number of tokens. The engine takes them all at once (continuous
batching, paged KV cache); transformers runs them in static batches of ``--hf-batch`` left-padded prompts,
each batch generating until its longest request is done (that is what a static batch costs). Throughput is
useful output tokens / wall time for both. A second table compares single-stream decode speed, on a model
too big for the CPU caches, with the memory-bandwidth bound: (weight bytes + KV bytes read per token) /
measured copy bandwidth.

    .venv/bin/python benchmarks/serve_throughput.py                       # 64 requests, the default model
    .venv/bin/python benchmarks/serve_throughput.py --dist loguniform     # many short requests, few long
    .venv/bin/python benchmarks/serve_throughput.py --requests 16 --quick # a fast smoke run
    .venv/bin/python benchmarks/serve_throughput.py --stream-only --dtype bfloat16 --pack  # one table, options
    .venv/bin/python benchmarks/serve_throughput.py --compare-options --repeats 2  # engine options A/B
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time

import torch


def build_models(args: argparse.Namespace):
    import transformers

    from lmforge.model.hf import load_pretrained

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_model * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_pretrained(folder)
    return hf, ours


def make_engine(model, args: argparse.Namespace):
    """A fresh engine (an empty prefix cache: repeated runs must not reuse each other's prompts)."""
    from lmforge.infer import EngineConfig, LLMEngine

    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.token_budget,
        dtype=args.dtype,
        fuse_projections=not args.no_fuse,
        pack_weights=args.pack,
    )
    return LLMEngine(model, None, config, eos_token_ids=[])


def _length(rng: random.Random, bounds: tuple[int, int], dist: str) -> int:
    low, high = bounds
    if dist == "uniform":
        return rng.randint(low, high)
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))  # log-uniform: many short, few long


def workload(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [
        (
            [rng.randrange(3, args.vocab) for _ in range(_length(rng, args.prompt_len, args.dist))],
            _length(rng, args.output_len, args.dist),
        )
        for _ in range(args.requests)
    ]


def run_engine(engine, requests) -> tuple[float, int, list[list[int]]]:
    from lmforge.infer import SamplingParams

    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False) for _, n in requests
    ]
    start = time.perf_counter()
    outs = engine.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return elapsed, sum(len(t) for t in tokens), tokens


@torch.inference_mode()
def run_hf(hf, requests, batch_size: int) -> tuple[float, int, list[list[int]]]:
    start = time.perf_counter()
    tokens: list[list[int]] = []
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        out = hf.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max(n for _, n in batch), pad_token_id=0
        )
        tokens += [row[width : width + n].tolist() for row, (_, n) in zip(out, batch)]
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(t) for t in tokens), tokens


def copy_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second of a large tensor copy (read + write counted once each)."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def build_stream_model(args: argparse.Namespace) -> torch.nn.Module:
    """The single-stream model: Llama-shaped, --stream-d-model wide and --stream-layers deep, too big for the
    CPU caches (seeded, random weights)."""
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.stream_d_model,
        n_layers=args.stream_layers,
        n_heads=args.stream_d_model // 64,
        n_kv_heads=args.stream_d_model // 256,
        max_seq_len=2048,
    )
    return Transformer(cfg).eval()


def single_stream(
    args: argparse.Namespace, prompt_len: int, new_tokens: int
) -> tuple[float, float, float, float]:
    """Decode tokens/s of one request on a model too big for the CPU caches, and its bandwidth bound at the
    mean context length (for the weights as the engine holds them: bf16 blocks read half the bytes). Returns
    (tokens/s, bound tokens/s, parameters, time to first token in seconds)."""
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    model = build_stream_model(args)
    config = EngineConfig(
        enable_prefix_caching=False,
        dtype=args.dtype,
        fuse_projections=not args.no_fuse,
        pack_weights=args.pack,
    )
    engine = LLMEngine(model, None, config, eos_token_ids=[])
    prompt = list(range(3, 3 + prompt_len))
    # warm-up: the same request once, so buffers (decode mirror, allocator) are sized before timing
    engine.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    prefills = []
    for _ in range(3):
        start = time.perf_counter()
        engine.generate([prompt], params)
        prefills.append(time.perf_counter() - start)
    prefill = sorted(prefills)[1]  # time to first token, median of 3
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    engine.generate([prompt], params)
    decode_rate = (new_tokens - 1) / (time.perf_counter() - start - prefill)
    # bytes one decode step reads: every parameter once (a tied head counts once), KV in the cache's dtype
    params_read = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in params_read)
    context = prompt_len + new_tokens / 2
    cfg = model.cfg
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * engine.cache.k.element_size() * context
    return decode_rate, copy_bandwidth() / (weight_bytes + kv_bytes), model.num_parameters(), prefill


# engine options compared by --compare-options (EngineConfig fields)
OPTION_VARIANTS = {
    "fp32 unfused": {"fuse_projections": False},
    "fp32 fused": {},
    "fp32 fused+packed": {"pack_weights": True},
    "bf16 fused": {"dtype": "bfloat16"},
    "bf16 fused+packed": {"dtype": "bfloat16", "pack_weights": True},
    "fp32, bf16 packed": {"pack_weights": True, "pack_dtype": "bfloat16"},
}


def compare_options(args: argparse.Namespace) -> None:
    """Engine options in one process, alternating, best of ``--repeats``: decode tokens per process-CPU
    second (steadier than wall time on a shared machine) and per wall second, for the single stream and for
    the batched workload."""
    import copy

    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    stream_model = build_stream_model(args)
    prompt = list(range(3, 131))
    stream_params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    _, batch_model = build_models(args)
    requests = workload(args)
    batch_params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False) for _, n in requests
    ]
    useful = sum(n for _, n in requests)

    def stream(engine) -> tuple[float, float]:
        engine.add_request(None, prompt, stream_params)
        engine.step()  # the prefill
        wall, cpu, steps = time.perf_counter(), time.process_time(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return steps / (time.process_time() - cpu), steps / (time.perf_counter() - wall)

    def batch(model, options) -> tuple[float, float]:
        config = EngineConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.token_budget, **options
        )
        engine = LLMEngine(model, None, config, eos_token_ids=[])
        wall, cpu = time.perf_counter(), time.process_time()
        engine.generate([p for p, _ in requests], batch_params)
        return useful / (time.process_time() - cpu), useful / (time.perf_counter() - wall)

    stream_engines = {
        name: LLMEngine(
            copy.deepcopy(stream_model),
            None,
            EngineConfig(enable_prefix_caching=False, **opts),
            eos_token_ids=[],
        )
        for name, opts in OPTION_VARIANTS.items()
    }
    batch_models = {name: copy.deepcopy(batch_model) for name in OPTION_VARIANTS}
    for engine in stream_engines.values():
        engine.generate([prompt], stream_params)  # warm-up: buffers sized
    best = {name: [0.0, 0.0, 0.0, 0.0] for name in OPTION_VARIANTS}
    for _ in range(args.repeats):
        for name, opts in OPTION_VARIANTS.items():
            rates = (*stream(stream_engines[name]), *batch(batch_models[name], opts))
            best[name] = [max(a, b) for a, b in zip(best[name], rates)]
    base = best["fp32 unfused"]
    print(
        f"{'engine option':<20} {'stream tok/CPU-s':>17} {'(wall)':>8} {'ratio':>6} {'batch tok/CPU-s':>16} {'(wall)':>8} {'ratio':>6}"
    )
    for name, (s_cpu, s_wall, b_cpu, b_wall) in best.items():
        print(
            f"{name:<20} {s_cpu:>17.1f} {s_wall:>8.1f} {s_cpu / base[0]:>5.2f}x {b_cpu:>16.1f} {b_wall:>8.1f} "
            f"{b_cpu / base[2]:>5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--dist",
        choices=["uniform", "loguniform"],
        default="uniform",
        help="length distribution in the ranges",
    )
    parser.add_argument("--hf-batch", type=int, default=64, help="static batch size for transformers")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--stream-d-model", type=int, default=768, help="single-stream model width")
    parser.add_argument("--stream-layers", type=int, default=12, help="single-stream model depth")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both systems")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the best counts")
    parser.add_argument("--quick", action="store_true", help="skip the single-stream table")
    parser.add_argument(
        "--dtype",
        default="model",
        choices=["model", "auto", "float32", "bfloat16"],
        help="the engine's dtype option (transformers stays fp32)",
    )
    parser.add_argument("--no-fuse", action="store_true", help="engine without fused q/k/v and gate/up")
    parser.add_argument("--pack", action="store_true", help="engine with oneDNN-prepacked weights")
    parser.add_argument("--stream-only", action="store_true", help="only the single-stream table")
    parser.add_argument(
        "--compare-options",
        action="store_true",
        help="engine options (fusion, prepacking, bf16) alternating in one process, single stream and batch",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.compare_options:
        compare_options(args)
        return
    if args.stream_only:
        print_single_stream(args)
        return
    hf, model = build_models(args)
    requests = workload(args)
    # alternate the two systems and keep each one's best time: the machine is shared, and a load spike during
    # one run would otherwise decide the ratio
    hf_time = engine_time = float("inf")
    for _ in range(args.repeats):
        seconds, hf_tokens, hf_out = run_hf(hf, requests, args.hf_batch)
        hf_time = min(hf_time, seconds)
        seconds, engine_tokens, engine_out = run_engine(make_engine(model, args), requests)
        engine_time = min(engine_time, seconds)
    same = sum(a == b for a, b in zip(engine_out, hf_out))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama-style, {params / 1e6:.1f} M parameters; {args.requests} requests, prompts "
        f"{args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs {args.output_len[0]}-{args.output_len[1]} "
        f"({args.dist})"
    )
    print(f"{'system':<42} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    print(
        f"{'transformers generate, static batch ' + str(args.hf_batch):<42} {hf_tokens:>8} {hf_time:>8.2f} "
        f"{hf_tokens / hf_time:>9.1f}"
    )
    print(
        f"{'lmforge engine (continuous batching)':<42} {engine_tokens:>8} {engine_time:>8.2f} "
        f"{engine_tokens / engine_time:>9.1f}"
    )
    ratio = (engine_tokens / engine_time) / (hf_tokens / hf_time)
    print(f"ratio engine / transformers: {ratio:.2f}x   (identical greedy outputs: {same}/{len(requests)})")
    if not args.quick:
        print_single_stream(args)


def print_single_stream(args: argparse.Namespace) -> None:
    rate, bound, size, ttft = single_stream(args, prompt_len=128, new_tokens=64)
    print(
        f"\nsingle-stream decode ({size / 1e6:.0f} M-parameter model, {args.stream_layers} layers, "
        f"d_model {args.stream_d_model}, engine dtype {args.dtype}, fused {not args.no_fuse}, packed {args.pack}): "
        f"{rate:.1f} "
        f"tokens/s; bandwidth bound {bound:.1f} tokens/s ({100 * rate / bound:.0f}% of bound); time to "
        f"first token (128-token prompt, median of 3) {1e3 * ttft:.0f} ms"
    )


if __name__ == "__main__":
    main()
