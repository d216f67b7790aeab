import argparse
import io
import json
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from lmforge.config import ConfigError
from lmforge.demo.commands import build_config
from lmforge.demo.pipeline import MODEL_ID, STAGES, Demo, usage_hint


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


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("align.samples=1", "align.samples"),
        ("align.rl_lr=0", "align.rl_lr"),
        ("align.kl_coef=-1", "align.kl_coef"),
    ],
)
def test_align_settings_are_checked_before_anything_runs(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config(args(overrides=[override]))


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


def test_usage_hint_runs_this_interpreter_or_only_curl(monkeypatch):
    lines = usage_hint("http://127.0.0.1:8000")
    assert any(line.startswith("curl http://127.0.0.1:8000/v1/chat/completions") for line in lines)
    (python,) = [line for line in lines if "openai" in line]
    assert shlex.split(python)[0] == sys.executable  # not a bare `python`, which may lack the package
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # an interpreter without openai
    assert not any("python" in line or "openai" in line for line in usage_hint("http://127.0.0.1:8000"))


def test_training_estimates_are_printed_from_a_timing_probe(tmp_path):
    from rich.console import Console

    from lmforge.demo.training import estimate_training

    cfg = build_config(
        args(size="micro", run_dir=str(tmp_path / "run"), no_serve=True, overrides=["threads=1"])
    )
    out = io.StringIO()
    demo = Demo(cfg, Console(file=out, width=200))
    pretrain, sft = estimate_training(demo, ["pretrain", "sft"])
    assert pretrain.tokens == cfg.pretrain.steps * cfg.pretrain.batch_size * cfg.pretrain.seq_len
    assert pretrain.tokens_per_s > 0 and sft.seconds == sft.tokens / sft.tokens_per_s
    demo.print_estimates(["sft"])
    printed = out.getvalue()
    assert "Supervised fine-tuning: 4 steps x 4 x 128 tokens" in printed and "Pretraining" not in printed


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
    # pretraining is validated on the held-out documents, so its loss plot has a validation curve
    from lmforge.train.metrics import read_jsonl

    val_points = [r for r in read_jsonl(run_dir / "pretrain" / "metrics.jsonl") if "val_loss" in r]
    assert len(val_points) >= 2
    assert "held-out document loss" in report
    # the review stage: every red-team category with its rates, and the pairwise judge's counts
    review = json.loads((run_dir / "stages" / "review.json").read_text())
    redteam, judge = review["tables"]
    assert len(redteam["rows"]) >= 4 and all(0.0 <= row[4] <= 1.0 for row in redteam["rows"])
    wins, ties, losses = (int(x) for x in judge["rows"][0][1].split(" / "))
    assert wins + ties + losses == 16  # 4 held-out questions of each of 4 tasks

    # the align stage: a reward model, DPO and GRPO models, each scored on the held-out tasks
    align = json.loads((run_dir / "stages" / "align.json").read_text())
    (scores,) = align["tables"]
    assert [row[0] for row in scores["rows"]] == ["addition", "reverse_words", "count_letter"]
    assert all(0.0 <= value <= 1.0 for row in scores["rows"] for value in row[1:4])
    for folder in ("rm", "dpo", "grpo"):
        assert (run_dir / "align" / folder / "model" / "model.safetensors").is_file()
    for path in ("plots/align_exact_match.png", "plots/align_grpo.png"):
        assert (run_dir / path).is_file() and f"({path})" in report

    # A rerun skips every finished stage; --restart-from redoes the chosen stage onwards only.
    markers = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}
    changed = build_config(
        args(size="micro", run_dir=str(run_dir), no_serve=True, overrides=["vocab_size=400"])
    )
    with pytest.raises(ConfigError, match="vocab_size"):
        Demo(changed).run()
    demo = Demo(cfg)
    demo.restart_from("eval")
    assert not (run_dir / "align").exists() and (run_dir / "sft" / "model").is_dir()  # no stale trainer runs
    demo.run()
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}
    assert sorted(name for name in markers if after[name] != markers[name]) == [
        "align.json",
        "eval.json",
        "review.json",
    ]

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

        # The closing hint's commands work as printed: curl, and the one-liner run by this interpreter.
        curl, python = [line for line in usage_hint(base_url) if line.startswith(("curl ", sys.executable))]
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(done.stdout)["choices"][0]["message"]["role"] == "assistant"
        subprocess.run(["bash", "-c", python], capture_output=True, text=True, timeout=120, check=True)


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
