import argparse
import json
import random
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from lmforge.config import ConfigError
from lmforge.demo.commands import build_config
from lmforge.demo.pipeline import MODEL_ID, STAGES, Demo


def args(**kw):
    base = {
        "config": None,
        "overrides": [],
        "size": None,
        "run_dir": None,
        "corpus": None,
        "no_serve": False,
        "port": None,
    }
    return argparse.Namespace(**{**base, **kw})


def test_config_precedence_size_then_recipe_then_flags_then_overrides(tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text("size: micro\nvocab_size: 500\npretrain: {steps: 7}\n")
    cfg = build_config(args(config=str(recipe), run_dir="r", no_serve=True, overrides=["pretrain.steps=9"]))
    assert cfg.size == "micro" and cfg.model.d_model == 32  # from the micro size
    assert cfg.vocab_size == 500 and cfg.pretrain.steps == 9 and cfg.run_dir == "r" and not cfg.serve
    assert build_config(args()).size == "tiny"
    with pytest.raises(ConfigError):
        build_config(args(overrides=["model.nope=1"]))


def test_user_corpus_goes_through_the_data_pipeline(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "calm",
        "rivers",
        "flow",
        "past",
        "green",
        "fields",
        "and",
        "hills",
    ]
    docs = [{"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(120))} for i in range(30)]
    docs.append(docs[0] | {"id": "copy"})  # an exact duplicate for the dedup step
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = build_config(args(size="micro", run_dir=str(tmp_path / "run"), corpus=[str(corpus)], no_serve=True))
    demo = Demo(cfg)
    card = demo.stages.run("corpus", STAGES["corpus"], demo.corpus)
    assert card.numbers["source"].startswith("your corpus")
    assert not (tmp_path / "run" / "corpus").exists()
    card = demo.stages.run("data", STAGES["data"], demo.data)
    assert card.numbers["documents in"] == 31
    removed = {row[0]: row[3] for row in card.tables[0].rows}
    assert "duplicate" in removed["exact_dedup"]
    n_train = len((tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines())
    n_heldout = len((tmp_path / "run" / "data" / "heldout.jsonl").read_text().splitlines())
    assert n_train + n_heldout == card.numbers["kept"] and n_heldout >= 1


@pytest.mark.slow
def test_micro_demo_runs_every_stage_writes_the_report_and_resumes(tmp_path):
    run_dir = tmp_path / "demo"
    cfg = build_config(args(size="micro", run_dir=str(run_dir), no_serve=True, overrides=["threads=1"]))
    md_path, html_path = Demo(cfg).run()
    report = md_path.read_text()
    for title in STAGES.values():
        assert f"## {title}" in report
    assert (run_dir / "stages").is_dir() and len(list((run_dir / "stages").glob("*.json"))) == len(STAGES)
    for path in ("pretrain/plots/loss.png", "sft/plots/loss.png", "plots/eval_base_vs_sft.png"):
        assert (run_dir / path).is_file() and f"({path})" in report
    for which in ("base", "sft"):
        results = json.loads((run_dir / "eval" / which / "results.json").read_text())
        assert set(results["tasks"]) >= {"addition", "read_answer-mc"}
        assert results["perplexity"]["bits_per_byte"] > 0
    sft_model = run_dir / "sft" / "model"
    assert (sft_model / "tokenizer_config.json").is_file() and (sft_model / "model.safetensors").is_file()
    assert "<img src='pretrain/plots/loss.png'" in html_path.read_text()

    # A rerun skips every finished stage; --restart-from redoes the chosen stage onwards only.
    markers = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}
    changed = build_config(
        args(size="micro", run_dir=str(run_dir), no_serve=True, overrides=["vocab_size=400"])
    )
    with pytest.raises(ConfigError, match="vocab_size"):
        Demo(changed).run()
    demo = Demo(cfg)
    demo.restart_from("eval")
    demo.run()
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}
    assert [name for name in markers if after[name] != markers[name]] == ["eval.json"]

    # The app the demo serves answers the openai client and shows the chat page.
    with serving(demo.serve_app()) as base_url:
        from openai import OpenAI

        client = OpenAI(base_url=f"{base_url}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "What is 37 + 48?"}], max_tokens=4
        )
        assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
        page = httpx.get(f"{base_url}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()


@contextmanager
def serving(app):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo server did not become healthy"
            time.sleep(0.1)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
