"""``lmforge eval``: score a model folder on tasks and held-out text; write a table and JSON.

.. code-block:: yaml

    model: runs/demo/sft/model          # HF-layout folder (ours or a supported HF family)
    run_dir: runs/demo/eval-sft
    tasks:
      - {name: addition, path: heldout.jsonl, where: {task: addition}, chat: true}
      - {name: addition-3shot, path: heldout.jsonl, where: {task: addition}, num_fewshot: 3}
      - {name: colors, path: colors_mc.jsonl}            # records with choices -> multiple choice
      - {name: sums-cot, path: sums.jsonl, cot: true, self_consistency: 5, max_tokens: 96}
    sweeps:                                              # score vs shots, chain of thought vs direct
      - {task: addition, shots: [0, 1, 5], cot: true}
    perplexity:
      documents: [heldout_docs.jsonl]                    # JSONL/Parquet documents ("text" field)
      shards: [shards/]                                  # and/or token shards (val split with val_fraction)

Generation tasks run through the inference engine with greedy decoding; a reply ends at a special token
(EOS, end of turn) or, for plain prompts, at the end of the line. Multiple-choice tasks are scored by
log-likelihood (see :mod:`lmforge.eval.scoring`). ``run_dir`` receives ``results.json``, ``results.md`` and
``samples/<task>.jsonl`` (every prompt, prediction and verdict, for reading the model's mistakes).

A chain-of-thought task (``cot: true``, see :mod:`lmforge.eval.prompting`) lets the reply run over several
lines (it ends at the few-shot delimiter) and scores the extracted answer: ``exact_match`` with flexible
extraction, ``exact_match_strict`` with strict. ``self_consistency: k`` samples k replies per question at
``temperature`` and scores the majority answer. A sweep runs one task again at each shot count, directly
and (for generation tasks, with ``cot``) with chain of thought; ``results.md`` shows the curves as a plot
(``sweep_<task>.png``) and a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from lmforge.eval.fewshot import PromptFormat, chat_messages, plain_prompt, sample_demonstrations
from lmforge.eval.long_context import LongContextConfig
from lmforge.eval.metrics import (
    exact_match,
    mean,
    multiple_choice_predictions,
    stderr_of_mean,
)
from lmforge.eval.prompting import chain_of_thought, extract_answer, majority_vote
from lmforge.eval.tasks import TaskExample, TaskFile, load_task


@dataclass
class TaskConfig:
    name: str = MISSING
    path: str = MISSING  # JSONL task file (see lmforge.eval.tasks)
    where: dict[str, str] = field(default_factory=dict)  # keep records whose fields equal these values
    num_fewshot: int = 0
    fewshot_path: str = ""  # demonstrations pool; default: the task's own examples (never the question)
    chat: bool = False  # render prompts with the tokenizer's chat template
    template: str = "{prompt}\nAnswer:"  # plain prompts only
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""  # persona / system prompt
    instruction: str = ""
    context: str = ""
    cot: bool = False  # chain of thought: reason first, then extract the answer (generation tasks)
    self_consistency: int = 1  # > 1: sample this many replies and vote on their answers
    temperature: float = 0.7  # sampling temperature for self-consistency
    max_tokens: int = 32
    limit: int = 0  # 0: every example
    ignore_case: bool = True
    ignore_punctuation: bool = False
    # >= 1: the demonstrations go into this many parallel context windows sharing positions and the question
    # attends to them all (many-shot prompts beyond the context; lmforge.eval.long_context, model.pcw);
    # 1 is the ordinary prompt, decoded the same way (the baseline of a comparison)
    pcw_windows: int = 0

    def __post_init__(self) -> None:
        if self.num_fewshot < 0 or self.limit < 0 or self.max_tokens < 1 or self.pcw_windows < 0:
            raise ValueError(
                f"task {self.name}: num_fewshot, limit and pcw_windows must be >= 0, max_tokens >= 1"
            )
        if self.self_consistency < 1 or (self.self_consistency > 1 and self.temperature <= 0):
            raise ValueError(f"task {self.name}: self_consistency >= 1, and > 1 needs temperature > 0")

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(
            self.template,
            self.target_delimiter,
            self.fewshot_delimiter,
            self.description,
            self.instruction,
            self.context,
        )


@dataclass
class SweepConfig:
    task: str = MISSING  # the name of one of the tasks
    shots: list[int] = field(default_factory=lambda: [0, 1, 5])
    cot: bool = True  # also run each shot count with chain of thought (generation tasks)


@dataclass
class PerplexityConfig:
    documents: list[str] = field(default_factory=list)  # held-out document files (JSONL/Parquet, "text")
    max_documents: int = 0  # 0: all
    shards: list[str] = field(default_factory=list)  # token shards folders (made with the model's tokenizer)
    val_fraction: float = 0.0  # > 0: only the shards' validation split (as the trainer's data.val_fraction)
    split_seed: int = 0
    max_batches: int = 0  # shards: 0 = one full pass
    seq_len: int = 0  # 0: the model's max_seq_len


@dataclass
class EvalConfig:
    model: str = MISSING
    run_dir: str = MISSING
    tasks: list[TaskConfig] = field(default_factory=list)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    sweeps: list[SweepConfig] = field(default_factory=list)
    long_context: LongContextConfig = field(default_factory=LongContextConfig)  # lmforge.eval.long_context
    batch_size: int = 16
    seed: int = 1234
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


def build_prompt(task: TaskConfig, tokenizer: Any, example: TaskExample, shots: list[TaskExample]) -> str:
    """The text the model continues: a chat rendering with the generation prompt, or a plain prompt."""
    fmt = task.prompt_format
    if task.cot:
        fmt, example, shots = chain_of_thought(fmt, example, shots, task.chat)
    if task.chat:
        return tokenizer.apply_chat_template(chat_messages(example, shots, fmt), add_generation_prompt=True)
    return plain_prompt(example, shots, fmt)


def _prompts(
    task: TaskConfig, tokenizer: Any, data: TaskFile, pool: list[TaskExample], seed: int
) -> list[str]:
    return [
        build_prompt(task, tokenizer, ex, sample_demonstrations(pool, task.num_fewshot, ex, seed, i))
        for i, ex in enumerate(data.examples)
    ]


def run_generation_task(
    task: TaskConfig, engine: Any, tokenizer: Any, data: TaskFile, prompts: list[str], seed: int = 0
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exact match of each reply (chain of thought: of the answer extracted from it; self-consistency: of
    the majority answer over ``task.self_consistency`` sampled replies, request ``i`` seeded ``seed + i``)."""
    from lmforge.infer import SamplingParams

    k = task.self_consistency
    params = [
        SamplingParams(
            n=k,
            max_tokens=task.max_tokens,
            temperature=task.temperature if k > 1 else 0.0,
            stop=[] if task.chat else [task.fewshot_delimiter if task.cot else "\n"],
            stop_token_ids=sorted(tokenizer.special_ids),
            seed=seed + i if k > 1 else None,
        )
        for i in range(len(prompts))
    ]
    # Chat renderings carry their special tokens; plain prompts get the tokenizer's (as the server does).
    token_ids = [tokenizer.encode(p, add_special_tokens=not task.chat) for p in prompts]
    outputs = engine.generate(token_ids, params)
    modes = ("flexible", "strict") if task.cot else ("flexible",)
    correct: dict[str, list[float]] = {mode: [] for mode in modes}
    samples = []
    for example, prompt, output in zip(data.examples, prompts, outputs, strict=True):
        replies = [completion.text for completion in output.outputs]
        sample: dict[str, Any] = {"question": example.prompt, "prompt": prompt}
        sample["prediction" if k == 1 else "predictions"] = replies[0] if k == 1 else replies
        sample["answers"] = list(example.answers)
        for mode in modes:
            answer = majority_vote([extract_answer(r, mode) if task.cot else r for r in replies])
            ok = answer is not None and exact_match(
                answer, example.answers, task.ignore_case, task.ignore_punctuation
            )
            correct[mode].append(float(ok))
            suffix = "" if mode == "flexible" else f"_{mode}"
            if task.cot or k > 1:
                sample[f"answer{suffix}"] = answer
            sample[f"correct{suffix}"] = ok
        samples.append(sample)
    metrics = {}
    for mode, values in correct.items():
        name = "exact_match" if mode == "flexible" else f"exact_match_{mode}"
        metrics[name] = mean(values)
        metrics[f"{name}_stderr"] = stderr_of_mean(values)
    return metrics, samples


def run_multiple_choice_task(
    task: TaskConfig, model: Any, tokenizer: Any, data: TaskFile, prompts: list[str], batch_size: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from lmforge.eval.scoring import LoglikelihoodRequest, continuation_logprobs

    delimiter = "" if task.chat else task.target_delimiter
    requests = [
        LoglikelihoodRequest(prompt, delimiter + choice)
        for example, prompt in zip(data.examples, prompts, strict=True)
        for choice in example.choices
    ]
    scores = continuation_logprobs(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        max_len=model.cfg.max_seq_len,
        add_special_tokens=not task.chat,
    )
    hits: dict[str, list[float]] = {}
    samples = []
    offset = 0
    for example, prompt in zip(data.examples, prompts, strict=True):
        choice_scores = scores[offset : offset + len(example.choices)]
        offset += len(example.choices)
        picks = multiple_choice_predictions(choice_scores)
        for rule, pick in picks.items():
            hits.setdefault(rule, []).append(float(pick == example.label))
        samples.append(
            {
                "question": example.prompt,
                "prompt": prompt,
                "choices": list(example.choices),
                "label": example.label,
                "logprobs": [c.logprob for c in choice_scores],
                "picks": picks,
            }
        )
    metrics = {}
    for rule, values in hits.items():
        metrics[rule] = mean(values)
        metrics[f"{rule}_stderr"] = stderr_of_mean(values)
    return metrics, samples


def _read_documents(paths: list[str], limit: int) -> list[str]:
    from lmforge.data.document import Document
    from lmforge.data.io import make_reader

    texts: list[str] = []
    reader = make_reader(paths)
    for group in reader.tasks():
        for item in reader.read(group):
            if isinstance(item, Document) and item.text:
                texts.append(item.text)
                if limit and len(texts) >= limit:
                    return texts
    return texts


def evaluate(
    cfg: EvalConfig, model: Any = None, tokenizer: Any = None, progress: bool = True
) -> dict[str, Any]:
    """Run every task and the perplexity measurement; write results into ``cfg.run_dir``."""
    import torch

    from lmforge.infer import LLMEngine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if model is None or tokenizer is None:
        from lmforge.model.hf import load_pretrained
        from lmforge.tokenizer import load_tokenizer

        model = load_pretrained(cfg.model)
        tokenizer = load_tokenizer(cfg.model)
    model.eval()
    run_dir = Path(cfg.run_dir)
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": cfg.model, "tasks": {}}
    engine = cache(lambda: LLMEngine(model, tokenizer))  # built when a generation task first needs it
    started = time.perf_counter()
    by_name = {task.name: task for task in cfg.tasks}
    for sweep in cfg.sweeps:
        if sweep.task not in by_name:
            raise ValueError(f"sweep: no task named {sweep.task!r}")
    for task in _progress(cfg.tasks, progress, "eval tasks"):
        results["tasks"][task.name] = _run_task(task, cfg, model, tokenizer, engine, run_dir)
    for sweep in cfg.sweeps:
        results.setdefault("sweeps", {})[sweep.task] = _run_sweep(
            sweep, by_name[sweep.task], cfg, model, tokenizer, engine, run_dir
        )
    if cfg.perplexity.documents:
        from lmforge.eval.scoring import language_modeling_score

        texts = _read_documents(cfg.perplexity.documents, cfg.perplexity.max_documents)
        seq_len = cfg.perplexity.seq_len or model.cfg.max_seq_len
        score = language_modeling_score(model, tokenizer, texts, seq_len, batch_size=cfg.batch_size)
        results["perplexity"] = {"documents": len(texts), **score.to_dict()}
    if cfg.perplexity.shards:
        from lmforge.eval.scoring import shards_language_modeling_score

        ppl = cfg.perplexity
        score = shards_language_modeling_score(
            model,
            tokenizer,
            list(ppl.shards),
            ppl.seq_len or model.cfg.max_seq_len,
            batch_size=cfg.batch_size,
            val_fraction=ppl.val_fraction,
            split_seed=ppl.split_seed,
            max_batches=ppl.max_batches,
        )
        results["perplexity_shards"] = score.to_dict()
    if cfg.long_context.enabled:
        results["long_context"] = _run_long_context(cfg, model, tokenizer, run_dir)
    results["seconds"] = round(time.perf_counter() - started, 3)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (run_dir / "results.md").write_text(results_markdown(results), encoding="utf-8")
    return results


def _run_long_context(cfg: EvalConfig, model: Any, tokenizer: Any, run_dir: Path) -> dict[str, Any]:
    """Passkey retrieval and perplexity by position; passkey replies go to ``samples/passkey.jsonl``."""
    from lmforge.eval.long_context import evaluate_long_context

    lc = cfg.long_context
    texts = (
        _read_documents(lc.perplexity.documents, lc.perplexity.max_documents)
        if lc.perplexity.documents
        else []
    )
    result = evaluate_long_context(model, tokenizer, lc, texts)
    if "passkey" in result:
        with (run_dir / "samples" / "passkey.jsonl").open("w", encoding="utf-8") as f:
            for sample in result["passkey"].pop("samples"):
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return result


def _run_task(
    task: TaskConfig, cfg: EvalConfig, model: Any, tokenizer: Any, engine: Callable[[], Any], run_dir: Path
) -> dict[str, Any]:
    """Score one task; its samples go to ``run_dir/samples/<task>.jsonl``."""
    data = load_task(task.path, task.where or None)
    # demonstrations come from the whole file (never the question itself), not only the first `limit`
    pool = load_task(task.fewshot_path).examples if task.fewshot_path else list(data.examples)
    if task.limit:
        data.examples = data.examples[: task.limit]
    if task.pcw_windows and data.kind != "generate":
        raise ValueError(f"task {task.name}: pcw_windows needs a generation task")
    if task.pcw_windows:
        from lmforge.eval.long_context import run_pcw_generation_task

        shots = [
            sample_demonstrations(pool, task.num_fewshot, ex, cfg.seed, i)
            for i, ex in enumerate(data.examples)
        ]
        metrics, samples = run_pcw_generation_task(task, model, tokenizer, data, shots)
    elif data.kind == "generate":
        prompts = _prompts(task, tokenizer, data, pool, cfg.seed)
        metrics, samples = run_generation_task(task, engine(), tokenizer, data, prompts, cfg.seed)
    elif task.cot or task.self_consistency > 1:
        raise ValueError(f"task {task.name}: chain of thought and self-consistency need a generation task")
    else:
        prompts = _prompts(task, tokenizer, data, pool, cfg.seed)
        metrics, samples = run_multiple_choice_task(task, model, tokenizer, data, prompts, cfg.batch_size)
    with (run_dir / "samples" / f"{task.name}.jsonl").open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return {
        "kind": data.kind,
        "num_fewshot": task.num_fewshot,
        "chat": task.chat,
        "cot": task.cot,
        "self_consistency": task.self_consistency,
        "n": len(data.examples),
        "rejected": data.rejected,
        "metrics": metrics,
    }


def _run_sweep(
    sweep: SweepConfig,
    task: TaskConfig,
    cfg: EvalConfig,
    model: Any,
    tokenizer: Any,
    engine: Callable[[], Any],
    run_dir: Path,
) -> dict[str, Any]:
    """The task's headline score at each shot count, directly and with chain of thought; writes the plot."""
    sweep_result: dict[str, Any] = {"shots": list(sweep.shots)}
    for style in ("direct", "cot"):
        if style == "cot" and not (sweep.cot and sweep_result["kind"] == "generate"):
            break  # chain of thought applies to generation tasks only
        scores = []
        for shots in sweep.shots:
            variant = replace(
                task, name=f"{task.name}@{shots}shot-{style}", num_fewshot=shots, cot=style == "cot"
            )
            result = _run_task(variant, cfg, model, tokenizer, engine, run_dir)
            sweep_result["kind"] = result["kind"]
            sweep_result["metric"], score = headline_metric(result)
            scores.append(score)
        sweep_result[style] = scores
    sweep_result["plot"] = plot_sweep(task.name, sweep_result, run_dir / f"sweep_{task.name}.png")
    return sweep_result


def plot_sweep(name: str, sweep: dict[str, Any], path: Path) -> str:
    """Score vs number of shots, one line per prompting style; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for style in ("direct", "cot"):
        if style in sweep:
            label = "chain of thought" if style == "cot" else "direct"
            ax.plot(sweep["shots"], sweep[style], marker="o", label=label)
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel(sweep["metric"])
    ax.set_xticks(sweep["shots"])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{name}: score vs shots")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _progress(items: list[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="task")


def headline_metric(task_result: dict[str, Any]) -> tuple[str, float]:
    """The one number a table shows per task: exact match, or length-normalised MC accuracy."""
    metrics = task_result["metrics"]
    name = "exact_match" if task_result["kind"] == "generate" else "acc_norm"
    return name, metrics[name]


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    columns = ["task", "kind", "shots", "chat", "cot", "samples", "n", "metric", "value", "stderr"]
    rows = []
    for name, result in results["tasks"].items():
        metric, value = headline_metric(result)
        rows.append(
            [
                name,
                result["kind"],
                result["num_fewshot"],
                result["chat"],
                result["cot"],
                result["self_consistency"],
                result["n"],
                metric,
                round(value, 4),
                round(result["metrics"][f"{metric}_stderr"], 4),
            ]
        )
    return columns, rows


def results_markdown(results: dict[str, Any]) -> str:
    columns, rows = results_table(results)
    lines = [f"# Evaluation of {results['model']}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    for key, what in (("perplexity", "Held-out documents"), ("perplexity_shards", "Token shards")):
        if key in results:
            ppl = results[key]
            lines += [
                "",
                f"{what}: {ppl['tokens']} tokens, {ppl['bytes']} bytes: "
                f"perplexity {ppl['perplexity']:.3f}, bits per byte {ppl['bits_per_byte']:.4f}.",
            ]
    if "long_context" in results:
        from lmforge.eval.long_context import long_context_markdown

        lines += long_context_markdown(results["long_context"])
    for name, sweep in results.get("sweeps", {}).items():
        lines += [
            "",
            f"## {name}: {sweep['metric']} vs shots",
            "",
            f"![{name}: score vs shots]({sweep['plot']})",
        ]
        lines += ["", "| prompting | " + " | ".join(f"{k} shots" for k in sweep["shots"]) + " |"]
        lines += ["|" + " --- |" * (len(sweep["shots"]) + 1)]
        for style, label in (("direct", "direct"), ("cot", "chain of thought")):
            if style in sweep:
                lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in sweep[style]) + " |")
    return "\n".join(lines) + "\n"
