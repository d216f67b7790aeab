"""``lmforge serve MODEL_DIR`` as a user runs it: a subprocess serving a saved model folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from lmforge.cli import build_parser
from lmforge.model.hf import save_pretrained
from tests.serve.live_server import build_engine


def test_serve_arguments_and_defaults():
    args = build_parser().parse_args(["serve", "some/model"])
    assert (args.model_dir, args.host, args.port) == ("some/model", "127.0.0.1", 8000)
    args = build_parser().parse_args(["serve", "m", "--host", "0.0.0.0", "--port", "9001", "--api-key", "k"])
    assert (args.host, args.port, args.api_key) == ("0.0.0.0", 9001, "k")
    args = build_parser().parse_args(
        ["serve", "m", "--kv-cache-mb", "8", "--dtype", "bfloat16", "--no-prefix-caching"]
    )
    assert (args.kv_cache_mb, args.dtype, args.no_prefix_caching) == (8, "bfloat16", True)


@pytest.mark.parametrize(
    ("flags", "engine_dtype", "load_dtype", "fuse", "pack", "graphs"),
    [
        ([], "model", "float32", True, False, True),
        (["--dtype", "auto", "--pack-weights"], "auto", "float32", True, True, True),
        (["--dtype", "bfloat16", "--no-fuse"], "bfloat16", "float32", False, False, True),
        (["--dtype", "float16", "--no-cuda-graphs"], "model", "float16", True, False, False),
    ],
)
def test_serve_engine_speed_flags_reach_the_engine_config(
    flags, engine_dtype, load_dtype, fuse, pack, graphs
):
    from lmforge.serve.commands import engine_settings

    config, loaded = engine_settings(build_parser().parse_args(["serve", "m", *flags]))
    got = (config.dtype, loaded, config.fuse_projections, config.pack_weights, config.cuda_graphs)
    assert got == (engine_dtype, load_dtype, fuse, pack, graphs)


def test_serve_refuses_a_folder_without_a_model(tmp_path, capsys):
    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert args.handler(args) == 2
    assert "no config.json" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_lmforge_serve_answers_the_openai_client(tmp_path, tokenizer):
    folder = tmp_path / "my-tiny-chat"
    engine = build_engine(tokenizer)
    save_pretrained(engine.model, folder)
    tokenizer.save(folder)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "serve",
        str(folder),
        "--port",
        str(port),
        "--api-key",
        "k",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{base_url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lmforge serve did not become healthy"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["my-tiny-chat"]  # the folder's name
        messages = [{"role": "user", "content": "Hello"}]
        reply = client.chat.completions.create(
            model="my-tiny-chat", messages=messages, max_tokens=4, temperature=0
        )
        # the served weights are the saved ones: same greedy reply as the in-process engine
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        with torch.no_grad():
            from lmforge.infer import SamplingParams

            (expected,) = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
        assert reply.choices[0].message.content == expected.outputs[0].text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
