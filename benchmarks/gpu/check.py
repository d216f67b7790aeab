"""The GPU check: one command, one table, for the day a GPU is lent (``bash benchmarks/gpu/check.sh``).

Sections, quick ones first (each one a row or a few; a failing section prints its error and the others
still run):

- paths: the CUDA-only paths exercised once (GQA through SDPA's ``enable_gqa``, bf16 weights and KV cache,
  the paged cache on the device): greedy engine output equal to transformers' greedy on the same bf16 model;
- decode: engine decode tokens/s at batch 64 vs transformers ``generate`` on the same weights and GPU,
  greedy, with the engine's CUDA graphs on and off, and whether the outputs are the same tokens;
- stream: single-stream decode tokens/s against the memory-bandwidth bound (weight + KV bytes per token
  over the measured device copy bandwidth), CUDA graphs on and off;
- train: MFU and tokens/s of the one lmforge trainer on a ~124M and a ~1B Llama-shaped model (bf16
  autocast, ``torch.compile``, SDPA), from synthetic token shards; MFU against the device's peak.

``--cpu-smoke`` runs every section with tiny models on the CPU in well under a minute (the test suite does,
so the script stays runnable where no GPU is ever lent). Targets from the performance issue: training MFU
>= 45%, engine >= 3x transformers at batch 64.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from): the spec table on known GPUs, else a matmul probe."""
    from lmforge.train.metrics import peak_flops

    known = peak_flops(device)
    if known:
        return known, "spec"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, "matmul probe"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_config(size: str, smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(
            vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128
        )
    if size == "124M":
        return dict(
            vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, max_seq_len=2048
        )
    return dict(
        vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=5632, max_seq_len=2048
    )


def synthetic_shards(folder: Path, vocab: int, tokens: int) -> None:
    from lmforge.shards.format import ShardStats, build_manifest, write_manifest, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    docs = [
        np.append(rng.integers(1, vocab, 4095), 0).astype(np.uint16) for _ in range(max(1, tokens // 4096))
    ]
    stats = ShardStats(docs=len(docs), tokens=sum(len(d) for d in docs))
    record = write_shard(
        folder, "00000", docs, np.dtype(np.uint16), stats, {"domain": "synthetic", "input": "-"}
    )
    write_manifest(folder, build_manifest([record], np.dtype(np.uint16), vocab, 0, "synthetic"))


def section_train(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from lmforge.config import load_config
    from lmforge.train import TrainConfig, train
    from lmforge.train.metrics import read_jsonl

    peak, source = device_peak_flops(device)
    rows = []
    for size in ["124M"] if args.cpu_smoke else args.train_sizes:
        model = llama_config(size, args.cpu_smoke)
        seq, micro = (64, 2) if args.cpu_smoke else (2048, 8 if size == "124M" else 4)
        micro = args.micro_batch or micro
        steps = 3 if args.cpu_smoke else args.train_steps
        with tempfile.TemporaryDirectory() as tmp:
            shards = Path(tmp) / "shards"
            synthetic_shards(shards, model["vocab_size"], micro * seq * (steps + 2) * 2)
            overrides = {
                "run_dir": str(Path(tmp) / "run"),
                "model": model,
                "data": {"shards": [str(shards)], "seq_len": seq},
                "batch": {"micro_batch_size": micro},
                "max_steps": steps,
                "precision": {"dtype": "fp32" if args.cpu_smoke else "bf16", "compile": not args.cpu_smoke},
                "checkpoint": {"every_steps": 0, "export": False, "resume": False},
                "stability": {"spike_detection": False},
                "log": {"every_steps": 1, "plots": False, "progress": False, "peak_flops": peak},
            }
            result = train(load_config(TrainConfig, data=overrides))
            records = [r for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl") if "tokens_per_s" in r]
            steady = records[len(records) // 2 :] or records  # after compilation and warm-up
            tokens_per_s = float(np.median([r["tokens_per_s"] for r in steady]))
            mfu = float(np.median([r.get("mfu", math.nan) for r in steady]))
            rows.append(
                {
                    "section": "train",
                    "what": f"{'tiny' if args.cpu_smoke else size} Llama, seq {seq}, micro-batch {micro}, "
                    f"{'fp32' if args.cpu_smoke else 'bf16+compile'}",
                    "value": f"{tokens_per_s:,.0f} tok/s, MFU {100 * mfu:.1f}% (peak {peak / 1e12:.3g} TFLOP/s, {source})",
                    "target": "MFU >= 45%",
                    "loss": result.metrics.get("loss"),
                }
            )
    return rows


def build_pair(model_kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """transformers' Llama and ours with the same weights, on ``device`` in ``dtype``."""
    import transformers

    from lmforge.model.hf import load_pretrained

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=model_kwargs["vocab_size"],
        hidden_size=model_kwargs["d_model"],
        intermediate_size=model_kwargs["d_ff"],
        num_hidden_layers=model_kwargs["n_layers"],
        num_attention_heads=model_kwargs["n_heads"],
        num_key_value_heads=model_kwargs["n_kv_heads"],
        max_position_embeddings=model_kwargs["max_seq_len"],
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_pretrained(folder, dtype=dtype, device=device)
    return hf.to(device=device, dtype=dtype), ours


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def section_decode(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    model_kwargs = llama_config("124M", args.cpu_smoke)
    hf, ours = build_pair(model_kwargs, device, dtype)
    batch, prompt_len, new = (8, 16, 8) if args.cpu_smoke else (64, 128, 128)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model_kwargs["vocab_size"], prompt_len).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    ids = torch.tensor(prompts, device=device)

    def hf_generate() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    hf_generate()  # warm-up: the same workload, as for the engine below
    hf_s, hf_out = timed(device, hf_generate)
    tokens = batch * new
    rows = []
    token_ids = []
    for graphs in (True, False):
        engine = LLMEngine(
            ours,
            None,
            EngineConfig(
                max_num_seqs=batch,
                kv_cache_memory_bytes=(64 if args.cpu_smoke else 8192) * 2**20,
                cuda_graphs=graphs,
            ),
            eos_token_ids=[],
        )
        # warm-up with the timed workload itself: the first run of each batch shape loads kernels (and
        # captures the graphs), which a served engine pays once
        engine.generate(prompts, params)
        engine_s, outs = timed(device, lambda engine=engine: engine.generate(prompts, params))
        same = sum(o.outputs[0].token_ids == row[prompt_len:].tolist() for o, row in zip(outs, hf_out))
        captured = engine.runner.graphs.captures if engine.runner.graphs is not None else 0
        token_ids.append([o.outputs[0].token_ids for o in outs])
        agree = "" if graphs else f"; graphs on/off agree in {sum(map(list.__eq__, *token_ids))}/{batch}"
        rows.append(
            {
                "section": "decode",
                "what": f"batch {batch}, prompt {prompt_len}, {new} new tokens, greedy, "
                f"{str(dtype).removeprefix('torch.')}, CUDA graphs {'on' if graphs else 'off'}",
                "value": f"engine {tokens / engine_s:,.0f} tok/s vs transformers {tokens / hf_s:,.0f} tok/s = "
                f"{hf_s / engine_s:.2f}x; same tokens in {same}/{batch}; {captured} graphs captured{agree}",
                "target": ">= 3x",
            }
        )
    return rows


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    src = torch.empty(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        seconds, _ = timed(device, lambda: dst.copy_(src))
        best = min(best, seconds)
    return 2 * src.numel() * 4 / best


def section_stream(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
    from lmforge.model import ModelConfig, Transformer

    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    kwargs = llama_config("124M" if args.cpu_smoke else "1B", args.cpu_smoke)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kwargs)).to(device=device, dtype=dtype).eval()
    prompt, new = list(range(3, 3 + (16 if args.cpu_smoke else 512))), (32 if args.cpu_smoke else 256)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    many = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    cfg = model.cfg
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize * (len(prompt) + new / 2)
    bound = copy_bandwidth(device, 64 if args.cpu_smoke else 2048) / (weight_bytes + kv_bytes)
    rows = []
    for graphs in (True, False):
        config = EngineConfig(enable_prefix_caching=False, cuda_graphs=graphs)
        engine = LLMEngine(model, None, config, eos_token_ids=[])
        engine.generate([prompt], many)  # warm-up (and graph capture) over the timed lengths
        # decode time = a request of `new` tokens minus its prefill (a 1-token request); best of three each
        prefill = min(timed(device, lambda e=engine: e.generate([prompt], one))[0] for _ in range(3))
        total = min(timed(device, lambda e=engine: e.generate([prompt], many))[0] for _ in range(3))
        rate = (new - 1) / max(total - prefill, 1e-6)
        rows.append(
            {
                "section": "stream",
                "what": f"one request, {model.num_parameters() / 1e6:.3g}M parameters, "
                f"{str(dtype).removeprefix('torch.')}, CUDA graphs {'on' if graphs else 'off'}",
                "value": f"{rate:,.1f} tok/s = {100 * rate / bound:.0f}% of the bandwidth bound ({bound:,.0f} tok/s)",
                "target": ">= 75% of the bound",
            }
        )
    return rows


def section_paths(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """GQA (enable_gqa in SDPA on CUDA), bf16 weights and KV cache, the paged cache on the device: the
    engine's greedy tokens against transformers' greedy on the same bf16 weights."""
    from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    kwargs = llama_config("124M", True)  # small: this is about paths, not speed
    hf, ours = build_pair(kwargs, device, dtype)
    engine = LLMEngine(ours, None, EngineConfig(max_num_seqs=4), eos_token_ids=[])
    prompts = [[5, 9, 33, 7, 81, 2, 64], [11, 12, 13], [400, 300, 200, 100, 50]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = engine.generate(prompts, params)
    same = 0
    for prompt, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=12, min_new_tokens=12
            )
        same += out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()
    cache = engine.cache.k
    return [
        {
            "section": "paths",
            "what": f"GQA {kwargs['n_heads']}/{kwargs['n_kv_heads']} heads, {str(dtype).removeprefix('torch.')}, "
            f"paged KV cache {str(cache.dtype).removeprefix('torch.')} on {cache.device}",
            "value": f"greedy tokens equal to transformers in {same}/{len(prompts)} requests",
            "target": "all equal (bf16: a late divergence on near-ties is possible; shown, not hidden)",
        }
    ]


SECTIONS = {  # the quick ones first: the training section compiles two models
    "paths": section_paths,
    "decode": section_decode,
    "stream": section_stream,
    "train": section_train,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models on the CPU: checks the script runs"
    )
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-sizes", nargs="+", choices=["124M", "1B"], default=["124M", "1B"])
    parser.add_argument(
        "--micro-batch", type=int, help="training micro-batch (default: 8 for 124M, 4 for 1B)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: run with --cpu-smoke for a dry run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"lmforge GPU check on {name}, torch {torch.__version__}")
    rows: list[dict[str, Any]] = []
    failed = 0
    for section in args.sections:
        start = time.perf_counter()
        try:
            got = SECTIONS[section](args, device)
        except Exception as err:  # one section's failure is a finding; the others still run
            traceback.print_exc()
            got = [
                {"section": section, "what": "FAILED", "value": f"{type(err).__name__}: {err}", "target": ""}
            ]
            failed += 1
        for row in got:
            row["seconds"] = round(time.perf_counter() - start, 1)
        rows += got
    width = max(len(r["what"]) for r in rows)
    print(f"\n{'section':<8} {'what':<{width}}  result  [target]  (seconds)")
    for r in rows:
        print(f"{r['section']:<8} {r['what']:<{width}}  {r['value']}  [{r['target']}]  ({r['seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
