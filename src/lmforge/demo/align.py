"""The demo's align stage: steps two and three of the InstructGPT recipe, after SFT, on the verifiable tasks.

1. Preference data from the SFT model's own samples: ``samples`` replies per prompt at temperature 1, the
   correct ones (exact answer) ranked above the incorrect ones. Each prompt is one ranking record, so all of
   its C(K,2) pairs share a batch, as InstructGPT trains them.
2. A reward model (``lmforge rm``) trained on those rankings; its pairwise accuracy on held-out prompts.
3. DPO (``lmforge dpo``) from the SFT model on the same rankings: the offline alternative to RL.
4. GRPO (``lmforge grpo``) from the SFT model on fresh prompts, with the engine sampling the groups: the
   verifiable exact-answer reward (plus the reward model's score when ``reward_model_weight`` > 0) and a k3
   KL penalty to the SFT model.

The card compares held-out exact match after SFT, DPO and GRPO and plots GRPO's reward and KL per step. Only
this top layer may import both the engine and the trainers, which is why the wiring lives here.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.config import load_config
from lmforge.data.io import read_records, write_records
from lmforge.demo.config import RunLayout
from lmforge.demo.report import StageCard, Table, plot_comparison
from lmforge.demo.tasks import exam_tasks, rl_prompts

# The task families with room above SFT; read_answer is already at 1.0 after SFT.
ALIGN_TASKS = ("addition", "reverse_words", "count_letter")


def preference_rankings(
    model_dir: Path,
    prompts: list[dict[str, Any]],
    samples: int,
    max_new_tokens: int,
    seed: int,
    threads: int = 0,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Sample ``samples`` replies per prompt from the model and rank a correct one (exact answer) above up to
    three distinct incorrect ones (a reply cut off at ``max_new_tokens`` among them). When no reply is correct the
    reference answer is ranked first instead (counted), so a weak model still yields preferences; prompts
    whose replies are all correct carry no preference and are counted, not kept. ``threads``: torch threads
    (0 keeps torch's default)."""
    import torch

    from lmforge.infer import LLMEngine, SamplingParams

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    engine = LLMEngine.from_pretrained(model_dir)
    tokenizer = engine.tokenizer
    ids = [
        tokenizer.encode(
            tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True), add_special_tokens=False
        )
        for r in prompts
    ]
    params = SamplingParams(n=samples, max_tokens=max_new_tokens, temperature=1.0)
    outputs = engine.generate(ids, params, use_tqdm=True)
    stats: Counter[str] = Counter(prompts=len(prompts))
    records = []
    for record, output in zip(prompts, outputs):
        replies = list(dict.fromkeys(c.text.strip() for c in output.outputs))
        stats["cut-off replies"] += sum(c.finish_reason == "length" for c in output.outputs)
        good = [r for r in replies if r == record["answer"]]
        bad = [r for r in replies if r != record["answer"] and r]
        if not bad:
            stats["all correct" if good else "only empty replies"] += 1
            continue
        if not good:
            good = [record["answer"]]
            stats["reference answer ranked first"] += 1
        # One correct reply against up to three incorrect ones: the pairs that carry the preference, at a
        # quarter of the sequences of all distinct replies.
        good, bad = good[:1], bad[:3]
        records.append(
            {
                "task": record["task"],
                "messages": record["messages"],
                "responses": good + bad,
                "ranking": [0] * len(good) + [1] * len(bad),
            }
        )
        stats["rankings"] += 1
        stats["pairs"] += len(good) * len(bad)
    return records, stats


def _recipe(demo: RunLayout, run_dir: Path, steps: int, lr: float, batch_size: int) -> dict[str, Any]:
    cfg = demo.cfg
    sft_model = str(demo.path("sft", "model"))
    return {
        "init_from": sft_model,
        "tokenizer": sft_model,
        "run_dir": str(run_dir),
        "max_steps": steps,
        "seed": cfg.seed,
        "threads": cfg.threads or None,
        "data": {"seq_len": 96, "seed": cfg.seed},
        "batch": {"micro_batch_size": batch_size},
        "optim": {"lr": lr, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "log": {"every_steps": max(min(5, steps // 10), 1), "plots": False},
        "checkpoint": {"every_steps": 0},
    }


def _exact_match(demo: RunLayout, model_dir: Path, which: str) -> dict[str, float]:
    from lmforge.eval.runner import EvalConfig, evaluate, headline_metric

    cfg = EvalConfig(
        model=str(model_dir),
        run_dir=str(demo.path("align", "eval", which)),
        tasks=exam_tasks(str(demo.path("instruct", "heldout.jsonl")), ALIGN_TASKS),
        threads=demo.cfg.threads,
    )
    results = evaluate(cfg)
    return {name: headline_metric(results["tasks"][name])[1] for name in ALIGN_TASKS}


def plot_rl_curves(metrics_path: Path, path: Path) -> Path:
    """Reward (and each reward part) and KL to the SFT model per logged GRPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_records(metrics_path) if isinstance(r, dict) and "reward" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for key in sorted({k for r in rows for k in r if k.startswith("reward")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        left.plot(*zip(*points), label=key, marker=".")
    left.set_title("GRPO reward (mean over the step's replies)")
    kl = [(r["step"], r["kl"]) for r in rows if "kl" in r]
    if kl:
        right.plot(*zip(*kl), marker=".", color="tab:red")
    right.set_title("KL to the SFT model (k3, per token)")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if rows:
        left.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def align_card(demo: RunLayout, console: Any, title: str) -> StageCard:
    """Run the stage (see the module docstring) and return its report card."""
    from lmforge.demo.rl import engine_rollouts
    from lmforge.tune.dpo import DPOConfig, run_dpo
    from lmforge.tune.grpo import GRPOConfig, run_grpo
    from lmforge.tune.reward import RewardConfig, run_rm

    cfg, settings = demo.cfg, demo.cfg.align
    if not settings.enabled:
        return StageCard("align", title, note="Skipped: align.enabled is false.")
    out = demo.path("align")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(name: str, work: Any) -> Any:
        begun = time.perf_counter()
        result = work()
        seconds[name] = time.perf_counter() - begun
        return result

    heldout = list(read_records(demo.path("instruct", "heldout.jsonl")))
    pool = rl_prompts(heldout, dict.fromkeys(ALIGN_TASKS, settings.rl_prompts_per_task), seed=cfg.seed)
    pair_prompts, grpo_prompts = pool[: settings.pair_prompts], pool[settings.pair_prompts :]
    if not grpo_prompts:
        raise ValueError("align: rl_prompts_per_task leaves no prompts for GRPO after the preference prompts")
    write_records(out / "grpo_prompts.jsonl", grpo_prompts)

    console.print(
        f"sampling {settings.samples} replies for each of {len(pair_prompts)} prompts from the SFT model"
    )
    rankings, pair_stats = timed(
        "preference sampling",
        lambda: preference_rankings(
            demo.path("sft", "model"),
            pair_prompts,
            settings.samples,
            settings.max_new_tokens,
            cfg.seed,
            cfg.threads,
        ),
    )
    if len(rankings) < 2:
        raise ValueError(f"align: only {len(rankings)} of {len(pair_prompts)} prompts gave a preference")
    val = rankings[::10]  # every tenth prompt is held out for the pairwise accuracies
    write_records(out / "pairs_train.jsonl", [r for i, r in enumerate(rankings) if i % 10])
    write_records(out / "pairs_heldout.jsonl", val)

    pairs = {"paths": [str(out / "pairs_train.jsonl")], "val_paths": [str(out / "pairs_heldout.jsonl")]}
    console.print("training the reward model on the rankings")
    recipe = _recipe(demo, out / "rm", settings.rm_steps, settings.rm_lr, settings.batch_size)
    rm = timed("reward model", lambda: run_rm(load_config(RewardConfig, data={**recipe, "rm": pairs})))
    console.print("DPO from the SFT model on the same rankings")
    recipe = _recipe(demo, out / "dpo", settings.dpo_steps, settings.dpo_lr, settings.batch_size)
    dpo_section = {**pairs, "beta": settings.dpo_beta}
    dpo = timed("DPO", lambda: run_dpo(load_config(DPOConfig, data={**recipe, "dpo": dpo_section})))

    console.print("GRPO from the SFT model: engine rollouts, exact-answer reward, KL to the SFT model")
    recipe = _recipe(demo, out / "grpo", settings.rl_steps, settings.rl_lr, settings.rl_prompts_per_step)
    grpo_section: dict[str, Any] = {
        "paths": [str(out / "grpo_prompts.jsonl")],
        "group_size": settings.samples,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": 1.0,
        "kl_coef": settings.kl_coef,
        "rewards": {"exact_answer": 1.0},
    }
    if settings.reward_model_weight > 0:
        grpo_section.update(reward_model=rm["model_dir"], reward_model_weight=settings.reward_model_weight)
    grpo_cfg = load_config(GRPOConfig, data={**recipe, "grpo": grpo_section})
    grpo = timed("GRPO", lambda: run_grpo(grpo_cfg, engine_rollouts))

    console.print("held-out exact match of the SFT, DPO and GRPO models")
    scores = timed(
        "evaluation",
        lambda: {
            which: _exact_match(demo, Path(folder), which)
            for which, folder in (
                ("SFT", demo.path("sft", "model")),
                ("DPO", dpo["model_dir"]),
                ("GRPO", grpo["model_dir"]),
            )
        },
    )
    rows = [
        [
            task,
            round(scores["SFT"][task], 3),
            round(scores["DPO"][task], 3),
            round(scores["GRPO"][task], 3),
            f"{100 * (scores['GRPO'][task] - scores['SFT'][task]):+.0f}",
        ]
        for task in ALIGN_TASKS
    ]
    demo.path("plots").mkdir(parents=True, exist_ok=True)
    plot_comparison(
        {task: {which: scores[which][task] for which in scores} for task in ALIGN_TASKS},
        demo.path("plots", "align_exact_match.png"),
        "held-out exact match: SFT, DPO, GRPO",
        ylabel="exact match (0 to 1)",
    )
    plot_rl_curves(out / "grpo" / "align_metrics.jsonl", demo.path("plots", "align_grpo.png"))

    logged = [
        r for r in read_records(out / "grpo" / "align_metrics.jsonl") if isinstance(r, dict) and "reward" in r
    ]
    first, last = logged[: max(len(logged) // 5, 1)], logged[-max(len(logged) // 5, 1) :]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        values = [r[key] for r in rows if key in r]
        return round(sum(values) / len(values), 3) if values else float("nan")

    rm_heldout, dpo_heldout = rm.get("heldout", {}), dpo.get("heldout", {})
    numbers = {
        "preference data (SFT samples, correct ranked above incorrect)": (
            f"{pair_stats['pairs']} pairs from {pair_stats['rankings']} of {pair_stats['prompts']} prompts "
            f"({pair_stats['all correct']} all correct: no preference; {pair_stats['reference answer ranked first']}"
            f" with no correct reply: the reference answer ranked first; {pair_stats['cut-off replies']} replies "
            "cut off at the token limit, ranked as incorrect)"
        ),
        "reward model: held-out pairwise accuracy / margin": (
            f"{rm_heldout.get('accuracy', float('nan')):.3f} / {rm_heldout.get('margin', float('nan')):.3f}"
        ),
        "DPO: held-out implicit-reward accuracy / chosen log-prob": (
            f"{dpo_heldout.get('accuracy', float('nan')):.3f} / {dpo_heldout.get('logps_chosen', float('nan')):.3f}"
        ),
        "GRPO: steps x prompts x group": f"{grpo['step']} x {settings.rl_prompts_per_step} x {settings.samples}",
        "GRPO reward, first -> last fifth of steps": f"{mean(first, 'reward')} -> {mean(last, 'reward')}",
        "GRPO KL to SFT, last fifth of steps": mean(last, "kl"),
        "time (s): " + ", ".join(seconds): ", ".join(f"{s:.0f}" for s in seconds.values()),
    }
    n = sum(1 for r in heldout if r.get("task") == ALIGN_TASKS[0])
    note = (
        f"{n} held-out examples per task, greedy, the same exam as the evaluation stage (one score's "
        f"standard error is up to {50 / max(n, 1) ** 0.5:.0f} points). GRPO prompts are fresh draws of the task "
        "generators that never repeat a held-out input; count_letter's ask about words outside the "
        "instruction set, whose (letter, word) pairs SFT and the exam exhaust. Rejected replies are always the SFT "
        "model's own; the chosen one is too, except where none of its replies was correct."
    )
    return StageCard(
        "align",
        title,
        numbers=numbers,
        tables=[
            Table(
                "Held-out exact match after each step",
                ["task", "SFT", "DPO", "GRPO", "GRPO - SFT (points)"],
                rows,
            )
        ],
        images=["plots/align_exact_match.png", "plots/align_grpo.png"],
        note=note,
    )
