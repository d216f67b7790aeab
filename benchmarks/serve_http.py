"""What serving over HTTP costs: N concurrent streaming clients of ``lmforge serve`` vs the same requests
through ``LLMEngine.generate`` in-process (the engine alone, no server), same weights, same run.

Workload: N requests with mixed prompt and output lengths (seeded, token-id prompts), greedy decoding, EOS
ignored so every request yields exactly its requested number of tokens. The server runs as a real
``lmforge serve`` subprocess; the clients are ``httpx`` async streams over SSE to ``/v1/completions``.
Reported: output tokens/s of both, their ratio (server / engine), client-side time to first token
(p50/p90), and whether the streamed tokens equal the in-process ones.

    .venv/bin/python benchmarks/serve_http.py                  # 64 requests
    .venv/bin/python benchmarks/serve_http.py --requests 16    # a quick run
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


def workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [
        (
            [rng.randrange(10, vocab) for _ in range(rng.randint(*args.prompt_len))],
            rng.randint(*args.output_len),
        )
        for _ in range(args.requests)
    ]


def run_engine(folder: Path, requests: list[tuple[list[int], int]], args: argparse.Namespace):
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine.from_pretrained(folder, EngineConfig(max_num_seqs=args.max_num_seqs))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests]
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(folder: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--threads", str(args.threads),
               "--log-level", "warning"]  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    # One thread by default: on a small shared box, torch's thread pool oversubscribes the cores and makes
    # both sides an order of magnitude slower and noisier.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine and the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-model"
        build_folder(folder, args)
        from lmforge.tokenizer import load_tokenizer

        requests = workload(args, load_tokenizer(folder).vocab_size)
        total = sum(n for _, n in requests)
        engine_s, engine_cpu, engine_tokens = run_engine(folder, requests, args)

        port = free_port()
        process = serve(folder, port, args)
        try:
            server_cpu_start, client_cpu_start = process_cpu_seconds(process.pid), time.process_time()
            server_s, results = asyncio.run(run_clients(f"http://127.0.0.1:{port}", requests))
            server_cpu = process_cpu_seconds(process.pid) - server_cpu_start
            client_cpu = time.process_time() - client_cpu_start
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)

    ttfts = sorted(t for t, _ in results)
    same = sum(tokens == expected for (_, tokens), expected in zip(results, engine_tokens))
    print(f"{args.requests} requests, {total} output tokens, model d={args.d_model} L={args.layers}, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")  # fmt: skip
    print(f"{'path':<34}{'wall s':>9}{'tokens/s':>11}{'CPU s':>9}")
    print(
        f"{'LLMEngine.generate (in-process)':<34}{engine_s:>9.2f}{total / engine_s:>11.1f}{engine_cpu:>9.2f}"
    )
    print(f"{'lmforge serve, SSE clients':<34}{server_s:>9.2f}{total / server_s:>11.1f}{server_cpu:>9.2f}")
    print(f"server / engine throughput: {engine_s / server_s:.2f}x; server CPU / engine CPU: "
          f"{server_cpu / engine_cpu:.2f}x; the clients used {client_cpu:.2f} CPU s of the same cores")  # fmt: skip
    print(
        f"client TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms, p90 {ttfts[int(0.9 * (len(ttfts) - 1))] * 1000:.0f} ms"
    )
    print(f"streamed tokens equal to in-process tokens: {same}/{len(results)} requests")


if __name__ == "__main__":
    main()
