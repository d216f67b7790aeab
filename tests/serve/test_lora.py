"""LoRA adapters served next to the base model: chosen by the request's ``model``, listed, loaded and
unloaded at run time (vLLM's endpoint names)."""

from __future__ import annotations

import httpx
import pytest
import torch

from lmforge.infer import SamplingParams
from lmforge.serve.commands import parse_loras
from lmforge.tune.peft.adapter import apply_peft, save_adapter
from lmforge.tune.peft.config import PeftConfig
from lmforge.tune.peft.serving import lora_weights
from tests.serve.live_server import MODEL_ID, build_engine, running_server

PROMPT = "The quick brown fox"


def make_adapter(folder, tokenizer, seed: int):
    model = build_engine(tokenizer).model
    apply_peft(model, PeftConfig(method="lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(model, folder, None)


@pytest.fixture(scope="module")
def adapters(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, tokenizer, seed) for seed, name in enumerate(["alpha", "beta"])}


def complete(running, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{running.base_url}/v1/completions", json=body, timeout=30)


def offline(tokenizer, adapter_dir=None) -> str:
    engine = build_engine(tokenizer)
    if adapter_dir is not None:
        engine.add_lora("x", lora_weights(engine.model.cfg, adapter_dir))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    return engine.generate([PROMPT], params, lora=None if adapter_dir is None else "x")[0].outputs[0].text


def test_requests_pick_adapters_by_model_name(tokenizer, adapters):
    loras = {"alpha": str(adapters["alpha"])}
    with running_server(lambda: build_engine(tokenizer), loras=loras, load_lora=lora_weights) as running:
        models = httpx.get(f"{running.base_url}/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [(MODEL_ID, None), ("alpha", MODEL_ID)]
        assert models[1]["root"] == str(adapters["alpha"])
        with_adapter, base = complete(running, "alpha").json(), complete(running, MODEL_ID).json()
        assert with_adapter["model"] == "alpha"
        assert with_adapter["choices"][0]["text"] == offline(tokenizer, adapters["alpha"])
        assert base["choices"][0]["text"] == offline(tokenizer)
        assert with_adapter["choices"][0]["text"] != base["choices"][0]["text"]
        embed = httpx.post(f"{running.base_url}/v1/embeddings", json={"model": "alpha", "input": "x"})
        assert embed.status_code == 400 and "base model" in embed.json()["error"]["message"]
        missing = complete(running, "gamma")
        assert missing.status_code == 404 and "'alpha'" in missing.json()["error"]["message"]
        refused = httpx.post(
            f"{running.base_url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "/x"}
        )
        assert refused.status_code == 403 and "--allow-lora-loading" in refused.json()["error"]["message"]


def test_adapters_load_and_unload_at_run_time(tokenizer, adapters, tmp_path):
    with running_server(
        lambda: build_engine(tokenizer), load_lora=lora_weights, allow_lora_loading=True
    ) as running:
        url = running.base_url
        body = {"lora_name": "beta", "lora_path": str(adapters["beta"])}
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 200
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 400  # name taken
        assert complete(running, "beta").json()["choices"][0]["text"] == offline(tokenizer, adapters["beta"])
        bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(tmp_path)})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"}).status_code == 200
        assert complete(running, "beta").status_code == 404
        gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"})
        assert gone.status_code == 404
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [MODEL_ID]


def test_lora_flags_are_checked_before_the_server_starts(adapters, tmp_path):
    assert parse_loras([f"a={adapters['alpha']}"], "base") == {"a": str(adapters["alpha"])}
    for spec, message in [
        ("noequals", "NAME=ADAPTER_DIR"),
        (f"base={adapters['alpha']}", "taken"),
        (f"a={tmp_path}", "not an adapter folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_loras([spec], "base")
    with pytest.raises(ValueError, match="taken"):
        parse_loras([f"a={adapters['alpha']}", f"a={adapters['beta']}"], "base")
