"""Evaluation commands.

- ``lmforge eval --config eval.yaml [key=value ...]``: tasks and perplexity for one model folder;
- ``lmforge scaling fit RUN_DIR...``: fit loss-vs-compute and Chinchilla laws to a ladder of runs and
  predict the largest run's loss from the others; ``lmforge scaling ladder`` trains the ladder first;
- ``lmforge plan --flops C | --params N``: compute-optimal model and data size, with the memory plan;
- ``lmforge judge single|pairwise``: LLM-as-a-judge over an OpenAI-compatible endpoint;
- ``lmforge redteam``: the red-teaming suite against an endpoint, refusal rates per category.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _eval(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args
    from lmforge.eval.runner import EvalConfig, evaluate, results_markdown

    cfg = config_from_args(EvalConfig, args)
    results = evaluate(cfg, progress=not args.quiet)
    print(results_markdown(results))
    print(f"results written to {cfg.run_dir}/results.json")
    return 0


def _scaling_fit(args: argparse.Namespace) -> int:
    from lmforge.eval.scaling import predict_largest, read_run

    report = predict_largest([read_run(run) for run in args.runs]).to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'run':40} {'N (non-emb.)':>14} {'D (tokens)':>12} {'C (FLOPs)':>12} {'loss':>8}")
    for p in report["points"]:
        print(
            f"{p['run'][-40:]:40} {p['params']:14.4g} {p['tokens']:12.4g} {p['flops']:12.4g} {p['loss']:8.4f}"
        )
    law = report["power_law"]
    print(f"\nL(C) = {law['a']:.4g} * C^-{law['b']:.4f} + {law['c']:.4f}  (fitted without the last run)")
    target = report["target"]
    print(
        f"largest run: loss {target['loss']:.4f}, predicted {report['predicted_power_law']:.4f} "
        f"(error {report['error_power_law']:+.4f})"
    )
    chin = report["chinchilla"]
    if chin is None:
        print("Chinchilla L(N, D): needs at least five fitted runs")
    else:
        print(
            f"L(N, D) = {chin['E']:.4f} + {chin['A']:.4g}/N^{chin['alpha']:.4f} + {chin['B']:.4g}/D^{chin['beta']:.4f}"
            f": predicted {report['predicted_chinchilla']:.4f} (error {report['error_chinchilla']:+.4f})"
        )
    return 0


def _scaling_ladder(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args
    from lmforge.eval.scaling import LadderConfig, run_ladder

    report = run_ladder(config_from_args(LadderConfig, args)).to_dict()
    target = report["target"]
    for p in report["points"]:
        print(
            f"{p['run']}: N {p['params']:.4g}, D {p['tokens']:.4g}, C {p['flops']:.4g}, loss {p['loss']:.4f}"
        )
    print(
        f"largest rung: loss {target['loss']:.4f}, L(C) fit on the others predicts "
        f"{report['predicted_power_law']:.4f} (error {report['error_power_law']:+.4f})"
    )
    return 0


def plan_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lmforge.eval.scaling import plan, shape_for_params
    from lmforge.model.flops import count_parameters, memory_plan

    rows = []
    for alloc in plan(flops=args.flops, params=args.params, tokens_per_param=args.tokens_per_param):
        cfg = shape_for_params(alloc.params, args.vocab_size, args.seq_len)
        count = count_parameters(cfg)
        memory = memory_plan(
            cfg,
            micro_batch=args.micro_batch,
            context=args.seq_len,
            dp=args.dp,
            zero_stage=args.zero,
            activation_checkpointing=args.checkpointing,
            params=count,
        )
        rows.append(
            {
                "method": alloc.method,
                "params": alloc.params,
                "tokens": alloc.tokens,
                "flops": alloc.flops,
                "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads},
                "model_params": count.total,
                "model_non_embedding_params": count.active - count.embedding,
                "memory_gib": memory.as_gib(),
            }
        )
    return rows


def _plan(args: argparse.Namespace) -> int:
    rows = plan_report(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        shape = row["model"]
        mem = row["memory_gib"]
        print(
            f"{row['method']:>16}: N {row['params']:.3g}, D {row['tokens']:.3g} tokens, C {row['flops']:.3g} FLOPs"
            f" | model d_model={shape['d_model']} n_layers={shape['n_layers']} n_heads={shape['n_heads']}"
            f" ({row['model_non_embedding_params']:.3g} non-embedding, {row['model_params']:.3g} total)"
            f" | memory per GPU {mem['total']:.1f} GiB (weights {mem['weights']:.1f}, grads"
            f" {mem['gradients']:.1f}, optimizer {mem['optimizer']:.1f}, activations {mem['activations']:.1f})"
        )
    return 0


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _client(args: argparse.Namespace, url: str, model: str, cache: str) -> Any:
    import os

    from lmforge.eval.judge import ChatClient

    return ChatClient(
        url=url,
        model=model,
        api_key=os.environ.get(args.api_key_env),
        cache_dir=args.cache or os.path.join(args.out, cache),
        max_retries=args.max_retries,
        max_tokens=args.max_tokens,
    )


def _write_results(out: str, summary: dict[str, Any], records: list[dict[str, Any]], name: str) -> None:
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"{name} written to {folder}/{name}.jsonl")


def _judge(args: argparse.Namespace) -> int:
    from lmforge.eval.judge import JudgeError, compare_pairwise, grade_single

    client = _client(args, args.judge_url, args.judge_model, "cache")
    try:
        if args.judge_command == "single":
            summary, judgments = grade_single(client, _read_jsonl(args.answers))
        else:
            a, b = _read_jsonl(args.answers_a), _read_jsonl(args.answers_b)
            questions = [item["question"] for item in a]
            if questions != [item["question"] for item in b]:
                raise SystemExit("judge: the two answer files must hold the same questions in the same order")
            summary, judgments = compare_pairwise(
                client, questions, [item["answer"] for item in a], [item["answer"] for item in b]
            )
    except JudgeError as err:
        raise SystemExit(f"judge: {err}") from err
    _write_results(args.out, summary, judgments, "judgments")
    return 0


def _redteam(args: argparse.Namespace) -> int:
    from lmforge.eval.judge import JudgeError
    from lmforge.eval.redteam import load_suite, run_redteam

    if bool(args.judge_url) != bool(args.judge_model):
        raise SystemExit("redteam: --judge-url and --judge-model go together")
    prompts = load_suite(args.suite)
    if args.categories:
        prompts = [p for p in prompts if p.category in args.categories]
        if not prompts:
            raise SystemExit(f"redteam: no prompts in categories {args.categories}")
    target = _client(args, args.url, args.model, "cache")
    judge = _client(args, args.judge_url, args.judge_model, "judge-cache") if args.judge_url else None
    try:
        summary, records = run_redteam(target, prompts, system=args.system, judge=judge)
    except JudgeError as err:
        raise SystemExit(f"redteam: {err}") from err
    _write_results(args.out, summary, records, "replies")
    return 0


def _add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--judge-url", required=True, help="OpenAI-compatible base URL, e.g. http://host:8000/v1"
    )
    parser.add_argument("--judge-model", required=True, help="model name sent to the endpoint")
    parser.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (if any)"
    )
    parser.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx, with backoff")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest reply requested")


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser(
        "eval", help="evaluate a model: exact-match and multiple-choice tasks, perplexity and bits per byte"
    )
    add_config_arguments(parser, example="model=runs/sft/model batch_size=8")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_eval)

    scaling = subparsers.add_parser("scaling", help="scaling laws over a ladder of training runs")
    scaling_commands = scaling.add_subparsers(dest="scaling_command", metavar="COMMAND", required=True)
    fit = scaling_commands.add_parser(
        "fit",
        help="fit L(C) and L(N, D) to the runs but the largest; predict the largest run's loss",
        description="Each RUN_DIR is a finished training run (config.yaml, metrics.jsonl).",
    )
    fit.add_argument("runs", nargs="+", metavar="RUN_DIR")
    fit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fit.set_defaults(handler=_scaling_fit)
    ladder = scaling_commands.add_parser(
        "ladder",
        help="train a ladder of sizes through the trainer, fit on all but the largest, predict it",
        description="The recipe is a LadderConfig: train (a TrainConfig), sizes (d_model, n_layers, n_heads, "
        "d_ff per rung, smallest first), tokens_per_param.",
    )
    add_config_arguments(ladder)
    ladder.set_defaults(handler=_scaling_ladder)

    plan = subparsers.add_parser(
        "plan",
        help="compute-optimal parameters and tokens (Chinchilla fit, tokens/param rule) with the memory plan",
    )
    budget = plan.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="training compute budget C (FLOPs)")
    budget.add_argument("--params", type=float, help="model size N: the budget and data that make it optimal")
    plan.add_argument("--tokens-per-param", type=float, default=20.0, help="the rule of thumb's ratio")
    plan.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of the planned model")
    plan.add_argument("--seq-len", type=int, default=2048, help="training context length")
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-step")
    plan.add_argument("--dp", type=int, default=1, help="data-parallel size")
    plan.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage")
    plan.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    plan.add_argument("--json", action="store_true", help="print JSON instead of lines")
    plan.set_defaults(handler=_plan)

    judge = subparsers.add_parser("judge", help="LLM-as-a-judge: rate answers or compare two models")
    judge_commands = judge.add_subparsers(dest="judge_command", metavar="COMMAND", required=True)
    single = judge_commands.add_parser(
        "single",
        help="rate each answer 1-10",
        description='ANSWERS is JSONL of {"question", "answer", "reference" (optional)}.',
    )
    single.add_argument("--answers", required=True)
    pairwise = judge_commands.add_parser(
        "pairwise",
        help="model A vs model B, judged in both orders (an order-dependent verdict is a tie)",
        description='Both files are JSONL of {"question", "answer"}, the same questions in the same order.',
    )
    pairwise.add_argument("--answers-a", required=True)
    pairwise.add_argument("--answers-b", required=True)
    for command in (single, pairwise):
        _add_endpoint_arguments(command)
        command.add_argument("--out", required=True, help="folder for summary.json and judgments.jsonl")
        command.add_argument("--cache", default=None, help="judgment cache folder (default: OUT/cache)")
        command.set_defaults(handler=_judge)

    redteam = subparsers.add_parser(
        "redteam",
        help="red-team an OpenAI-compatible endpoint: refusal, attack-success and over-refusal rates",
    )
    redteam.add_argument("--url", required=True, help="the model's OpenAI-compatible base URL (.../v1)")
    redteam.add_argument("--model", required=True, help="model name sent to the endpoint")
    redteam.add_argument("--suite", default=None, help="suite JSON (default: the shipped lmforge suite)")
    redteam.add_argument("--categories", nargs="*", default=None, help="only these categories")
    redteam.add_argument("--system", default="", help="system prompt for the red-teamed model")
    redteam.add_argument("--judge-url", default=None, help="grade replies with this judge instead of rules")
    redteam.add_argument("--judge-model", default=None)
    redteam.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key"
    )
    redteam.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx, with backoff")
    redteam.add_argument("--max-tokens", type=int, default=1024, help="longest reply requested")
    redteam.add_argument("--out", required=True, help="folder for summary.json and replies.jsonl")
    redteam.add_argument("--cache", default=None, help="reply cache folder (default: OUT/cache)")
    redteam.set_defaults(handler=_redteam)
