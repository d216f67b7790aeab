"""The demo's review stage: the fine-tuned model red-teamed, and judged against the base model.

Both use the eval layer's runners (``lmforge redteam``, ``lmforge judge``) with the models served in-process
(``EngineChat`` speaks the chat-client interface those runners call, without an HTTP server). The red-team
suite is graded by the refusal rules; the pairwise comparison uses the fine-tuned model itself as judge,
which a model this small cannot do well: its unparsed verdicts are counted and shown, and a real judge is
one ``lmforge judge --judge-url`` away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.data.io import read_records
from lmforge.demo.report import StageCard, Table
from lmforge.eval.judge import compare_pairwise
from lmforge.eval.redteam import load_suite, run_redteam
from lmforge.infer import LLMEngine, SamplingParams


class EngineChat:
    """Greedy chat replies from an in-process engine, with the ``complete``/``chat`` calls of ``ChatClient``."""

    def __init__(self, engine: LLMEngine, max_tokens: int = 48) -> None:
        self.engine = engine
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def complete(self, system: str, user: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        return self.chat([*messages, {"role": "user", "content": user}])

    def chat(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.engine.tokenizer
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        token_ids = tokenizer.encode(prompt, add_special_tokens=False)
        room = self.engine.max_model_len - self.params.max_tokens - 1
        token_ids = token_ids[-room:]  # a long judge prompt keeps its end (the question and the verdict cue)
        return self.engine.generate([token_ids], self.params)[0].outputs[0].text


def review_card(
    name: str, title: str, sft_model: Path, eval_dir: Path, tasks: list[str], per_task: int = 4
) -> StageCard:
    """Red-team the fine-tuned model; judge its held-out replies against the base model's."""
    chat = EngineChat(LLMEngine.from_pretrained(sft_model))
    summary, _ = run_redteam(chat, load_suite())
    redteam_rows = [
        [category, row["n"], row["expected"], round(row["refusal_rate"], 2), round(row["failure_rate"], 2)]
        for category, row in summary["categories"].items()
    ]
    questions, base, sft = [], [], []
    for task in tasks:
        pairs = zip(_samples(eval_dir / "base", task, per_task), _samples(eval_dir / "sft", task, per_task))
        for b, s in pairs:
            questions.append(b["question"])
            base.append(b["prediction"])
            sft.append(s["prediction"])
    verdict, _ = compare_pairwise(chat, questions, sft, base)
    judge_rows = [
        ["SFT wins / ties / losses", f"{verdict['win']} / {verdict['tie']} / {verdict['loss']}"],
        ["SFT win rate (95% CI)", _rate(verdict["win_rate"], verdict["win_ci95"])],
        ["verdicts that did not parse", f"{verdict['unparsed_verdicts']} of {2 * verdict['n']}"],
        ["verdicts that survive swapping the order", round(verdict["order_agreement"], 2)],
    ]
    refusals = sum(round(row["refusal_rate"] * row["n"]) for row in summary["categories"].values())
    note = (
        f"Red team: {summary['n']} prompts of lmforge's suite, graded by the refusal rules; failure = "
        "complied where a refusal was expected, or refused a benign look-alike. The demo model saw no "
        f"safety data; it refused {refusals} of {summary['n']}. Judge: held-out questions answered by SFT "
        "and base, each pair "
        "judged in both orders by the SFT model itself (a tiny model is not a capable judge; for a real one, "
        "run `lmforge judge --judge-url URL --judge-model NAME`)."
    )
    return StageCard(
        name,
        title,
        numbers={"red-team failure rate": round(summary["failure_rate"], 3)},
        tables=[
            Table(
                "Red team (rules)",
                ["category", "prompts", "expected", "refusal rate", "failure rate"],
                redteam_rows,
            ),
            Table("LLM-as-judge: SFT vs base (pairwise, both orders)", ["", ""], judge_rows),
        ],
        note=note,
    )


def _samples(run_dir: Path, task: str, limit: int) -> list[dict[str, Any]]:
    records = read_records(run_dir / "samples" / f"{task}.jsonl")
    return [r for r, _ in zip((r for r in records if isinstance(r, dict)), range(limit))]


def _rate(value: float, interval: list[float]) -> str:
    return f"{value:.2f} ({interval[0]:.2f}-{interval[1]:.2f})"
