"""What serving over HTTP costs: N concurrent streaming clients of ``lmforge serve`` vs the same requests
through ``LLMEngine.generate`` in-process (the engine alone, no server), same weights, same run.

Workload: N requests with mixed prompt and output lengths (seeded, token-id prompts), greedy decoding, EOS
ignored so every request yields exactly its requested number of tokens. The server runs as a real
``lmforge serve`` subprocess, with its engine in its own process (the default) and/or in a thread of the
HTTP process (``--engine-in-thread``); the clients are ``httpx`` async streams over SSE to
``/v1/completions``. Reported per engine mode: output tokens/s, the wall ratio server / engine, CPU seconds
(the server's processes together), client-side time to first token (p50/p90), and whether the streamed
tokens equal the in-process ones. ``--repeats`` alternates the runs and keeps each one's best wall time.

With ``--vs-transformers`` the model is a Llama-style one built by transformers (``serve_throughput.py``'s
shapes, its vocabulary a trained tokenizer's), and transformers ``generate`` in static batches of
``--hf-batch`` (``serve_throughput.run_hf``) is timed on the same weights and requests: the server's
throughput over HTTP against it.

    .venv/bin/python benchmarks/serve_http.py                  # 64 requests, both engine modes
    .venv/bin/python benchmarks/serve_http.py --requests 16    # a quick run
    .venv/bin/python benchmarks/serve_http.py --vs-transformers --engine-mode process \
        --prompt-len 16 256 --output-len 16 128 --dist loguniform
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_throughput  # the transformers side: model shapes, length draws, static batches

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Streaming servers send tokens one by one to their clients.",
]


def build_folder(folder: Path, args: argparse.Namespace) -> None:
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.hf import save_pretrained
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    tokenizer = train_tokenizer(SENTENCES * 10, TokenizerTrainConfig(vocab_size=args.vocab, min_frequency=1))
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=1024,
    )
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)


def build_llama_folder(folder: Path, args: argparse.Namespace):
    """A transformers Llama (``serve_throughput``'s shapes) saved with a tokenizer trained to the model's
    vocabulary size on random words, so that every id the model can emit is a token; returns the HF model."""
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    rng = random.Random(0)
    words = [" ".join(_word(rng) for _ in range(200)) for _ in range(1500)]
    tokenizer = train_tokenizer(words, TokenizerTrainConfig(vocab_size=args.vocab, min_frequency=1))
    args.vocab = tokenizer.vocab_size
    hf, _ = serve_throughput.build_models(args)
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    return hf


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))


def workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [
        (
            [
                rng.randrange(10, vocab)
                for _ in range(serve_throughput._length(rng, args.prompt_len, args.dist))
            ],
            serve_throughput._length(rng, args.output_len, args.dist),
        )
        for _ in range(args.requests)
    ]


def run_engine(folder: Path, requests: list[tuple[list[int], int]], args: argparse.Namespace):
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine.from_pretrained(folder, EngineConfig(max_num_seqs=args.max_num_seqs))
    # logprobs=0 as the clients ask (the chosen token's log-probability): the same work as in the server
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0) for _, n in requests]
    start, cpu_start = time.perf_counter(), time.process_time()
    outputs = engine.generate([p for p, _ in requests], params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return elapsed, cpu, [o.outputs[0].token_ids for o in outputs]


async def one_stream(
    client: httpx.AsyncClient, prompt: list[int], max_tokens: int
) -> tuple[float, list[int]]:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 0,  # the chosen token of every step, so the ids can be compared
        "return_tokens_as_token_ids": True,
    }
    start = time.perf_counter()
    first_token = None
    tokens: list[int] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["logprobs"]:
                if first_token is None:
                    first_token = time.perf_counter() - start
                tokens += [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    return first_token or 0.0, tokens


async def run_clients(base_url: str, requests: list[tuple[list[int], int]]):
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, p, n) for p, n in requests))
        return time.perf_counter() - start, results


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of another process, and of its live children together (the engine process)
    (Linux /proc)."""
    own = children = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if int(stat.parent.name) == pid:
            own += seconds
        elif int(fields[1]) == pid:
            children += seconds
    return own, children


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(folder: Path, port: int, args: argparse.Namespace, mode: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--threads", str(args.threads),
               "--log-level", "warning"]  # fmt: skip
    if mode == "thread":
        command.append("--engine-in-thread")
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError("lmforge serve exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("lmforge serve did not become healthy")
        time.sleep(0.2)


def run_server(folder: Path, requests, args: argparse.Namespace, mode: str):
    """One server run: (wall s, (HTTP process CPU s, engine process CPU s), client CPU s, [(ttft, tokens)])."""
    port = free_port()
    process = serve(folder, port, args, mode)
    try:
        server_cpu_start, client_cpu_start = process_cpu_seconds(process.pid), time.process_time()
        server_s, results = asyncio.run(run_clients(f"http://127.0.0.1:{port}", requests))
        server_cpu_end = process_cpu_seconds(process.pid)
        server_cpu = (server_cpu_end[0] - server_cpu_start[0], server_cpu_end[1] - server_cpu_start[1])
        client_cpu = time.process_time() - client_cpu_start
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    return server_s, server_cpu, client_cpu, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--dist", choices=["uniform", "loguniform"], default="uniform", help="length draws")
    parser.add_argument(
        "--vocab", type=int, default=None, help="default: 512, or 8192 with --vs-transformers"
    )
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4, help="with --vs-transformers")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument(
        "--engine-mode",
        choices=["process", "thread", "both"],
        default="both",
        help="where the server runs its engine: its own process (the default of lmforge serve) or a thread",
    )
    parser.add_argument("--vs-transformers", action="store_true", help="also time transformers generate")
    parser.add_argument("--hf-batch", type=int, default=16, help="static batch size of transformers generate")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each; the best counts")
    # One thread by default: on a small shared box, torch's thread pool oversubscribes the cores and makes
    # both sides an order of magnitude slower and noisier.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine and the server")
    args = parser.parse_args()
    if args.vocab is None:
        args.vocab = 8192 if args.vs_transformers else 512
    torch.set_num_threads(args.threads)
    modes = ["process", "thread"] if args.engine_mode == "both" else [args.engine_mode]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-model"
        hf = build_llama_folder(folder, args) if args.vs_transformers else None
        if hf is None:
            build_folder(folder, args)
        from lmforge.tokenizer import load_tokenizer

        requests = workload(args, load_tokenizer(folder).vocab_size)
        total = sum(n for _, n in requests)
        best: dict[str, tuple] = {}
        for _ in range(args.repeats):  # alternate the systems: a load spike must not decide a ratio
            if hf is not None:
                cpu_start = time.process_time()
                hf_s, _, hf_tokens = serve_throughput.run_hf(hf, requests, args.hf_batch)
                if "hf" not in best or hf_s < best["hf"][0]:
                    best["hf"] = (hf_s, hf_tokens, time.process_time() - cpu_start)
            engine_run = run_engine(folder, requests, args)
            if "engine" not in best or engine_run[0] < best["engine"][0]:
                best["engine"] = engine_run
            for mode in modes:
                server_run = run_server(folder, requests, args, mode)
                if mode not in best or server_run[0] < best[mode][0]:
                    best[mode] = server_run

    engine_s, engine_cpu, engine_tokens = best["engine"]
    print(f"{args.requests} requests, {total} output tokens, prompts {args.prompt_len[0]}-{args.prompt_len[1]}, "
          f"outputs {args.output_len[0]}-{args.output_len[1]} ({args.dist}), model d={args.d_model} "
          f"L={args.layers} vocab {args.vocab}{' (transformers Llama)' if hf is not None else ''}, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, best of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'path':<40}{'wall s':>9}{'tokens/s':>11}{'CPU s':>9}{'x engine':>10}{'TTFT p50':>10}{'p90':>8}")
    print(
        f"{'LLMEngine.generate (in-process)':<40}{engine_s:>9.2f}{total / engine_s:>11.1f}{engine_cpu:>9.2f}"
    )
    for mode in modes:
        server_s, server_cpu, client_cpu, results = best[mode]
        ttfts = sorted(t for t, _ in results)
        same = sum(tokens == expected for (_, tokens), expected in zip(results, engine_tokens))
        print(
            f"{'lmforge serve, engine ' + ('process' if mode == 'process' else 'in a thread'):<40}"
            f"{server_s:>9.2f}{total / server_s:>11.1f}{sum(server_cpu):>9.2f}{engine_s / server_s:>9.2f}x"
            f"{statistics.median(ttfts) * 1000:>8.0f}ms{ttfts[int(0.9 * (len(ttfts) - 1))] * 1000:>6.0f}ms"
            f"   tokens equal to in-process: {same}/{len(results)}; CPU s: HTTP process {server_cpu[0]:.2f}, "
            f"engine process {server_cpu[1]:.2f}, clients {client_cpu:.2f}"
        )
    if hf is not None:
        hf_s, hf_tokens, hf_cpu = best["hf"]
        same = sum(a == b for a, b in zip(hf_tokens, engine_tokens))
        print(f"{'transformers generate, static batch ' + str(args.hf_batch):<40}{hf_s:>9.2f}{total / hf_s:>11.1f}"
              f"{hf_cpu:>9.2f}   greedy tokens equal to the engine's: {same}/{len(requests)}")  # fmt: skip
        print(
            f"engine in-process / transformers: {hf_s / engine_s:.2f}x wall, {hf_cpu / engine_cpu:.2f}x CPU"
        )
        for mode in modes:
            engine_process_cpu = (
                best[mode][1][1] or best[mode][1][0]
            )  # the thread mode's engine is the HTTP process
            print(f"server (engine {mode}) / transformers: {hf_s / best[mode][0]:.2f}x wall, "
                  f"{hf_cpu / engine_process_cpu:.2f}x CPU of the engine's process")  # fmt: skip


if __name__ == "__main__":
    main()
