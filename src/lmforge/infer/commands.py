"""``lmforge generate MODEL_DIR --prompt ...`` and ``lmforge chat MODEL_DIR``: the engine from the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from lmforge.infer.sampling_params import SamplingParams, describe_range

# the command line's own defaults: a terminal user wants a longer, livelier reply than the API's 16 tokens at T=1
CLI_DEFAULTS = {"max_tokens": 128, "temperature": 0.7}


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(SamplingParams) if f.metadata.get("cli")]


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, generated from ``SamplingParams`` (names, types, ranges and meanings)."""
    group = parser.add_argument_group("sampling")
    for f in _cli_fields():
        default = CLI_DEFAULTS.get(f.name, f.default)
        kind = int if f.type.startswith("int") else float
        bounds = describe_range(f.metadata["range"])
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=default,
            help=f"{f.metadata['help']}; in {bounds} (default: {default})",
        )
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument(
        "--kv-cache-mb", type=int, default=256, help="memory for the paged KV cache, MiB (default: 256)"
    )
    add_sink_arguments(parser)
    add_engine_speed_arguments(parser)


def add_engine_speed_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, with_dtype: bool = True
) -> None:
    """``--dtype`` / ``--no-fuse`` / ``--pack-weights``: the engine's precision, projection fusion and weight
    prepacking (EngineConfig.dtype, fuse_projections, pack_weights). ``with_dtype=False`` leaves ``--dtype``
    to a command that defines its own."""
    if with_dtype:
        parser.add_argument(
            "--dtype",
            choices=("model", "auto", "float32", "bfloat16"),  # engine.DTYPES (not imported: a light CLI)
            default="model",
            help="weights and KV cache: model (as loaded, fp32), float32, bfloat16 (logits stay fp32), or auto "
            "(where the CPU has avx512_bf16/amx_bf16: fp32 activations and KV cache, packed bf16 weights, the "
            "fastest measured; elsewhere as loaded) (default: model)",
        )
    parser.add_argument(
        "--no-fuse", action="store_true", help="run q/k/v and gate/up as separate matmuls (default: fused)"
    )
    parser.add_argument(
        "--pack-weights",
        action="store_true",
        help="keep the projections and LM head prepacked for oneDNN: faster CPU decoding, a second copy of "
        "those weights in memory (with fusion only)",
    )


def add_sink_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--sink-tokens``/``--sink-window``: StreamingLLM attention sinks (generation past the context)."""
    parser.add_argument(
        "--sink-window",
        type=int,
        default=0,
        help="attention sinks: attend to the last N tokens plus --sink-tokens first ones, freeing the KV in "
        "between, so generation runs past the context in constant memory (RoPE models; default: off)",
    )
    parser.add_argument(
        "--sink-tokens", type=int, default=4, help="sink tokens kept with --sink-window (default: 4)"
    )


def sampling_params_from_args(args: argparse.Namespace, **extra: Any) -> SamplingParams:
    values = {f.name: getattr(args, f.name) for f in _cli_fields()}
    return SamplingParams(**values, stop=list(args.stop), **extra)


def register(subparsers: Any) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="complete prompts with a model folder",
        description="Complete one or more prompts with the inference engine (continuous batching, paged KV "
        "cache). With one prompt and one completion the text streams as it is generated.",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (config.json, weights, tokenizer)")
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    gen.add_argument("--prompt-file", help="a file with one prompt per line")
    gen.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user turn in the chat template"
    )
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--beams", type=int, default=0, help="beam search with this many beams (0 = sampling)")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / len**penalty")
    gen.add_argument("--draft", metavar="DRAFT_DIR", help="speculative decoding with this small draft model")
    gen.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens proposed per round")
    gen.add_argument(
        "--pcw-windows",
        type=int,
        default=0,
        metavar="N",
        help="parallel context windows: the prompt up to its last line is split into N windows sharing "
        "positions, the last line (the task) attends to all of them; greedy decoding (0 = off)",
    )
    add_sampling_arguments(gen)
    gen.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="chat with a model folder in the terminal",
        description="A terminal chat loop using the tokenizer's chat template; replies stream as they are "
        "generated. Commands: /reset (forget the conversation), /exit (or Ctrl-D).",
    )
    chat.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (config.json, weights, tokenizer)")
    chat.add_argument("--system", help="system prompt")
    add_sampling_arguments(chat)
    chat.set_defaults(handler=run_chat)


def _load_engine(
    model_dir: str,
    kv_cache_mb: int,
    sink_tokens: int = 0,
    sink_window: int = 0,
    dtype: str = "model",
    fuse: bool = True,
    pack: bool = False,
):
    from lmforge.hub import HubError, resolve_model_dir
    from lmforge.infer import EngineConfig, LLMEngine

    try:
        folder = resolve_model_dir(model_dir)
    except HubError as err:
        raise SystemExit(f"lmforge: not a model folder: {err}") from err
    if not (folder / "config.json").is_file():
        raise SystemExit(f"lmforge: {folder} is not a model folder (no config.json)")
    try:
        config = EngineConfig(
            kv_cache_memory_bytes=kv_cache_mb * 2**20,
            sink_tokens=sink_tokens if sink_window else 0,
            sink_window=sink_window,
            dtype=dtype,
            fuse_projections=fuse,
            pack_weights=pack,
        )
        return LLMEngine.from_pretrained(folder, config)
    except (ValueError, OSError) as err:  # a broken folder: say what is wrong, no traceback
        raise SystemExit(f"lmforge: cannot load {folder}: {err}") from err


def _engine_from_args(args: argparse.Namespace):
    """The engine of ``lmforge generate`` / ``chat`` from their shared model and engine flags."""
    return _load_engine(
        args.model_dir,
        args.kv_cache_mb,
        args.sink_tokens,
        args.sink_window,
        args.dtype,
        not args.no_fuse,
        args.pack_weights,
    )


def _stream(engine, prompt: str | list[int], params, out: TextIO, add_special_tokens: bool = True) -> str:
    """Run one request, writing its text as it comes; returns the whole completion."""
    engine.add_request(None, prompt, params, add_special_tokens)
    text = ""
    while engine.has_unfinished():
        for result in engine.step():
            delta = result.outputs[0].new_text
            text += delta
            out.write(delta)
            out.flush()
    return text


def run_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [
            line.rstrip("\n") for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        ]
    if not prompts:
        print("lmforge generate: give --prompt or --prompt-file", file=sys.stderr)
        return 2
    try:
        beam = {"use_beam_search": True, "best_of": args.beams, "length_penalty": args.length_penalty}
        params = sampling_params_from_args(args, n=args.n, **(beam if args.beams else {}))
    except ValueError as err:
        print(f"lmforge generate: {err}", file=sys.stderr)
        return 2
    engine = _engine_from_args(args)
    special = not args.chat  # a chat template writes its own special tokens
    if args.chat:
        prompts = [
            engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts
        ]
    if args.draft:
        return _speculative(engine, args, prompts, params, special)
    if args.pcw_windows:
        return _parallel_windows(engine, args, prompts, special)
    if len(prompts) == 1 and args.n == 1 and not args.beams:
        _stream(engine, prompts[0], params, sys.stdout, special)
        print()
        return 0
    ids = [engine.add_request(None, p, params, special).request_id for p in prompts]
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    for number, request_id in enumerate(ids):
        for completion in finals[request_id].outputs:
            tag = f"[{number}]" if len(finals[request_id].outputs) == 1 else f"[{number}.{completion.index}]"
            print(f"{tag} {completion.text}")
    return 0


def _speculative(engine, args: argparse.Namespace, prompts: list[str], params, special: bool) -> int:
    from lmforge.infer.speculative import speculative_generate
    from lmforge.model.hf import load_pretrained

    draft = load_pretrained(args.draft)
    for number, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=special)
        try:
            result = speculative_generate(
                engine.model, draft, ids, params, args.num_draft_tokens, engine.eos_token_ids,
                decode=lambda out: engine.tokenizer.decode(out, skip_special_tokens=True),
            )  # fmt: skip
        except ValueError as err:
            print(f"lmforge generate: {err}", file=sys.stderr)
            return 2
        text = result.text if result.text is not None else ""
        print(f"[{number}] {text}" if len(prompts) > 1 else text)
        print(f"draft acceptance: {result.accepted}/{result.proposed}", file=sys.stderr)
    return 0


def _parallel_windows(engine, args: argparse.Namespace, prompts: list[str], special: bool) -> int:
    """Greedy decoding with parallel context windows (lmforge.model.pcw), one prompt at a time."""
    from lmforge.model.pcw import pcw_generate

    if args.temperature:
        print("lmforge generate: --pcw-windows decodes greedily (temperature ignored)", file=sys.stderr)
    tokenizer = engine.tokenizer
    for number, prompt in enumerate(prompts):
        context, newline, task = prompt.rpartition("\n")
        if not newline or not task:
            print(
                "lmforge generate: --pcw-windows needs a prompt whose last line is the task", file=sys.stderr
            )
            return 2
        try:
            out = pcw_generate(
                engine.model,
                tokenizer.encode(context + newline, add_special_tokens=special),
                tokenizer.encode(task),
                args.pcw_windows,
                args.max_tokens,
                stop_ids=sorted(engine.eos_token_ids),
                bos_id=tokenizer.bos_id,
            )
        except ValueError as err:
            print(f"lmforge generate: {err}", file=sys.stderr)
            return 2
        text = tokenizer.decode(out, skip_special_tokens=True)
        print(f"[{number}] {text}" if len(prompts) > 1 else text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    try:
        params = sampling_params_from_args(args)
    except ValueError as err:
        print(f"lmforge chat: {err}", file=sys.stderr)
        return 2
    engine = _engine_from_args(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("lmforge chat: /reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sys.stdout.write("assistant> ")
        try:
            reply = _stream(engine, prompt, params, sys.stdout, add_special_tokens=False)
        except ValueError as err:  # e.g. the conversation outgrew the context
            print(f"\nlmforge chat: {err}; /reset to start over", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
