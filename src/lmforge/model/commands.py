"""``lmforge info``: parameters, FLOPs per token and the training memory plan of a model (full, LoRA or QLoRA);
``lmforge export gguf``: a model folder as one GGUF file for llama.cpp, Ollama and LM Studio;
``lmforge quantize``: weight-only int8 / int4 / NF4 for inference."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameters, FLOPs per token and training memory of a preset or model folder",
        description="Report parameters, FLOPs per token and the per-GPU training memory plan "
        "(2 B weights + 2 B grads + 12 B fp32 copy/momentum/variance per parameter, plus activations).",
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="preset name (see --list), model folder with config.json, Hub id (org/name[@rev]) or a YAML ModelConfig",
    )
    parser.add_argument("--list", action="store_true", help="list the presets with their parameter counts")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="ModelConfig overrides, e.g. n_layers=4"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="context length (default: the model's max_seq_len)"
    )
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--no-flash", action="store_true", help="count materialised attention scores")
    parser.add_argument(
        "--stages",
        default="",
        metavar="L1,L2,...",
        help="context lengths of a context-extension curriculum, e.g. 256,1024,4096: the KV cache (one "
        "sequence, 2-byte values) and the training activations of a micro-batch at each",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    peft = parser.add_argument_group(
        "parameter-efficient fine-tuning plan (adapters train, the base is frozen)"
    )
    peft.add_argument("--peft", choices=["lora"], default=None, help="plan LoRA on the frozen base")
    peft.add_argument("--qlora", action="store_true", help="plan QLoRA: LoRA on an NF4 base (double quant)")
    peft.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    peft.add_argument(
        "--target-modules",
        default="q_proj,v_proj",
        help="comma-separated layer names or all-linear (default q_proj,v_proj, as lmforge sft)",
    )
    peft.add_argument(
        "--compute-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16"],
        help="dtype of the base (LoRA), adapters, gradients and activations (default bfloat16)",
    )
    parser.set_defaults(handler=run_info, parser=parser)
    _register_export(subparsers)
    _register_resize(subparsers)
    _register_quantize(subparsers)


def _register_quantize(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="weight-only int8 / int4 / NF4 quantization of a model folder, for inference",
        description="Quantize the attention and MLP linear layers (embeddings, LM head and MoE routers stay in "
        "full precision). The folder written loads with `lmforge generate`, the engine and `lmforge serve`. "
        "int8: per output channel; int4: symmetric groups of --group-size input values; nf4: QLoRA's "
        "4-bit NormalFloat, blocks of 64, double-quantized constants.",
    )
    parser.add_argument("model_dir", help="model folder (lmforge or Hugging Face layout) or Hub id")
    parser.add_argument("--method", required=True, help="int8, int4 or nf4")
    parser.add_argument("--group-size", type=int, default=None, help="int4 only: 32, 64 or 128 (default 128)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the tensors left unquantized (default float32)",
    )
    parser.add_argument("--out", "-o", required=True, help="folder to write")
    parser.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    import torch

    from lmforge.model.hf import ModelLoadError, quantize_pretrained
    from lmforge.model.quant import QuantizationError, check_method

    try:
        if args.group_size is not None and args.method != "int4":
            raise QuantizationError(f"--group-size: applies to --method int4 only, not {args.method!r}")
        check_method(args.method, args.group_size)
        summary = quantize_pretrained(
            args.model_dir, args.out, args.method, args.group_size, getattr(torch, args.dtype)
        )
    except QuantizationError as err:
        message = str(err)
        for key, flag in (("method:", "--method:"), ("group_size:", "--group-size:")):
            message = message.replace(key, flag, 1) if message.startswith(key) else message
        print(f"lmforge quantize: {message}")
        return 2
    except (ModelLoadError, FileNotFoundError) as err:
        print(f"lmforge quantize: {err}")
        return 1
    group = f", groups of {summary['group_size']}" if summary["group_size"] else ""
    print(
        f"{summary['method']}{group}: {summary['layers']} linear layers quantized, "
        f"{summary['bytes_before'] / 1e6:.1f} MB -> {summary['bytes_after'] / 1e6:.1f} MB -> {args.out}"
    )
    return 0


def _register_resize(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "resize",
        help="grow a model's embeddings and output head to an extended tokenizer (old rows untouched)",
        description="New rows start as the mean of their old sub-tokens' rows (--init subtoken) or of all rows.",
    )
    parser.add_argument("model_dir", help="model folder (or Hub id)")
    parser.add_argument("--tokenizer", required=True, help="the extended tokenizer folder")
    parser.add_argument("--out", "-o", required=True, help="model folder to write (with the new tokenizer)")
    parser.add_argument("--init", default="subtoken", choices=["subtoken", "mean"])
    parser.set_defaults(handler=run_resize)


def run_resize(args: argparse.Namespace) -> int:
    from lmforge.model.hf import ModelLoadError, load_pretrained, save_pretrained
    from lmforge.model.resize import resize_token_embeddings
    from lmforge.tokenizer import load_tokenizer

    try:
        model = load_pretrained(args.model_dir)
        old, new = load_tokenizer(args.model_dir), load_tokenizer(args.tokenizer)
        resize_token_embeddings(model, old, new, args.init)
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"lmforge resize: {err}")
        return 1
    save_pretrained(model, args.out)
    new.save(args.out)
    print(f"vocabulary {old.vocab_size} -> {model.cfg.vocab_size} rows ({args.init} init) -> {args.out}")
    return 0


def _register_export(subparsers: Any) -> None:
    parser = subparsers.add_parser("export", help="export a model folder to another format (GGUF)")
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    gguf = formats.add_parser(
        "gguf",
        help="one GGUF file (weights, tokenizer, chat template) for llama.cpp, Ollama and LM Studio",
        description="Families: Llama, Mistral (full attention), Mixtral, Qwen2, GPT-2; byte-level BPE tokenizers. "
        "Merge an adapter first (lmforge peft merge) to export a fine-tuned model.",
    )
    gguf.add_argument("model_dir", help="model folder (lmforge or Hugging Face layout) with its tokenizer")
    gguf.add_argument("--out", "-o", required=True, help="the .gguf file to write")
    gguf.add_argument(
        "--quant",
        default="f16",
        choices=["f32", "f16", "q8_0", "q4_0"],
        help="weight matrices' type (default f16)",
    )
    gguf.set_defaults(handler=run_export_gguf)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


def run_export_gguf(args: argparse.Namespace) -> int:
    from lmforge.model.gguf import GGUFExportError, export_gguf_folder
    from lmforge.model.hf import ModelLoadError

    try:
        path = export_gguf_folder(args.model_dir, args.out, quant=args.quant)
    except (GGUFExportError, ModelLoadError, ImportError) as err:
        print(f"lmforge export gguf: {err}")
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.quant})")
    return 0


def resolve_model_config(spec: str, overrides: list[str] | None = None):
    """A ModelConfig from a preset name, a model folder (config.json) or a YAML file, plus overrides."""
    from lmforge.config import ConfigError, load_config, to_dict
    from lmforge.hub import parse_hub_id
    from lmforge.model.config import ModelConfig

    path = Path(spec)
    if path.is_dir() or (not path.exists() and parse_hub_id(spec) is not None):
        from lmforge.model.hf import read_config

        base = read_config(spec)
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        return load_config(ModelConfig, path, overrides or [])
    else:
        from lmforge.model.presets import get_preset

        try:
            base = get_preset(spec)
        except ValueError as err:
            raise ConfigError(f"{spec}: not a model folder or YAML file, and {err}") from None
    return load_config(ModelConfig, data=to_dict(base), overrides=overrides or [])


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def list_presets_table(as_json: bool) -> None:
    """Every preset with its total and per-token active parameter counts."""
    from lmforge.model.flops import count_parameters
    from lmforge.model.presets import get_preset, list_presets

    counts = {name: count_parameters(get_preset(name)) for name in list_presets()}
    if as_json:
        rows = {name: {"total": c.total, "active_per_token": c.active} for name, c in counts.items()}
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lmforge presets")
    for column in ("preset", "parameters", "active per token"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for name, c in counts.items():
        table.add_row(name, _human(c.total), _human(c.active))
    Console().print(table)


def run_info(args: argparse.Namespace) -> int:
    from lmforge.model.flops import count_parameters, flops_per_token, memory_plan

    if args.list:
        list_presets_table(args.json)
        return 0
    if args.model is None:
        args.parser.error("give a preset name, model folder or YAML ModelConfig (or --list)")
    cfg = resolve_model_config(args.model, args.overrides)
    context = args.seq_len or cfg.max_seq_len
    params = count_parameters(cfg)
    flops = flops_per_token(cfg, context, params)
    plan = memory_plan(
        cfg,
        micro_batch=args.micro_batch,
        context=context,
        dp=args.dp,
        zero_stage=args.zero,
        activation_checkpointing=args.checkpointing,
        flash=not args.no_flash,
        params=params,
    )
    adapter = None
    if args.peft or args.qlora:
        from lmforge.model.flops import GIB
        from lmforge.model.memory import peft_memory_plan

        if args.zero or args.dp > 1:
            args.parser.error("--peft/--qlora plan one GPU holding the whole base (no --dp/--zero)")
        try:
            adapter = peft_memory_plan(
                cfg,
                "qlora" if args.qlora else "lora",
                args.r,
                args.target_modules,
                args.compute_dtype,
                args.micro_batch,
                context,
                args.checkpointing,
                not args.no_flash,
            )
        except ValueError as err:
            args.parser.error(
                str(err).replace("r: ", "--r: ", 1).replace("target_modules:", "--target-modules:")
            )
    report = {
        "model": args.model,
        "parameters": {
            "total": params.total,
            "embedding": params.embedding,
            "active_per_token": params.active,
        },
        "flops_per_token": {"context": context, **flops},
        "memory_per_gpu_gib": {
            "dp": args.dp,
            "zero_stage": args.zero,
            "micro_batch": args.micro_batch,
            "activation_checkpointing": args.checkpointing,
            **{k: round(v, 3) for k, v in plan.as_gib().items()},
        },
    }
    if adapter is not None:
        report["peft"] = {
            "method": adapter.method,
            "r": adapter.r,
            "target_modules": args.target_modules,
            "compute_dtype": args.compute_dtype,
            "adapted_layers": len(adapter.targets),
            "trainable_parameters": adapter.trainable,
            "trainable_percent": round(100 * adapter.trainable / adapter.frozen, 4),
            "nf4_parameters": adapter.quantized,
            "memory_per_gpu_gib": {k: round(v, 3) for k, v in adapter.as_gib().items()},
            "memory_per_gpu_bytes": {k: round(v * GIB) for k, v in adapter.as_gib().items()},
        }
    try:
        lengths = [int(x) for x in args.stages.split(",") if x.strip()]
    except ValueError:
        args.parser.error(f"--stages: comma-separated context lengths, got {args.stages!r}")
    stages = []
    for length in lengths:
        kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * length * 2  # keys + values, 2 bytes each
        activations = memory_plan(
            cfg, args.micro_batch, length, args.dp, args.zero, args.checkpointing, not args.no_flash, params
        ).activations
        stages.append({"context": length, "kv_cache_gib": kv / 2**30, "activations_gib": activations / 2**30})
    if stages:
        report["stages"] = stages
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lmforge info: {args.model}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    arch = f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}"
    table.add_row("architecture", arch)
    if cfg.n_experts:
        table.add_row("experts", f"{cfg.n_experts} (top-{cfg.moe_top_k}, every {cfg.moe_every} layer(s))")
    table.add_row("parameters", f"{_human(params.total)} ({params.total:,})")
    table.add_row("  embedding", _human(params.embedding))
    table.add_row("  active per token", _human(params.active))
    table.add_row(f"FLOPs/token forward @ {context}", _human(flops["forward"], "FLOP"))
    table.add_row(f"FLOPs/token training @ {context}", _human(flops["train"], "FLOP"))
    gib = plan.as_gib()
    label = f"dp={args.dp}, ZeRO-{args.zero}, micro-batch {args.micro_batch}"
    table.add_row(f"memory per GPU ({label})", "")
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        table.add_row(f"  {key}", f"{gib[key]:.2f} GiB")
    if adapter is not None:
        name = "QLoRA (NF4 base)" if adapter.method == "qlora" else "LoRA"
        table.add_row(f"{name} r={adapter.r} on {args.target_modules}, {args.compute_dtype}", "")
        share = 100 * adapter.trainable / adapter.frozen
        table.add_row("  trainable parameters", f"{_human(adapter.trainable)} ({share:.3f}%)")
        table.add_row("  adapted layers", str(len(adapter.targets)))
        for key, value in adapter.as_gib().items():
            table.add_row(f"  {key}", f"{value:.2f} GiB")
    for stage in stages:
        table.add_row(
            f"context {stage['context']}: KV cache / activations",
            f"{stage['kv_cache_gib']:.4g} / {stage['activations_gib']:.4g} GiB",
        )
    Console().print(table)
    return 0
