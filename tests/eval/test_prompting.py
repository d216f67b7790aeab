import json
from types import SimpleNamespace

import pytest

from lmforge.eval.fewshot import PromptFormat, chat_messages, plain_prompt
from lmforge.eval.prompting import chain_of_thought, extract_answer, majority_vote
from lmforge.eval.runner import (
    EvalConfig,
    SweepConfig,
    TaskConfig,
    evaluate,
    run_generation_task,
)
from lmforge.eval.tasks import TaskExample, TaskFile
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import save_pretrained
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

Q = TaskExample(prompt="What is 2 + 2?", answers=("4",))
DEMO = TaskExample(prompt="What is 1 + 2?", answers=("3",), rationale="1 plus 2 makes 3.")
FMT = PromptFormat(
    template="Q: {prompt}\nA:",
    description="You are a careful tutor.\n\n",
    instruction="Add the numbers.",
    context="All numbers are small integers.",
)


def test_plain_prompt_has_persona_instruction_context_demonstrations_input_and_output_indicator():
    assert plain_prompt(Q, [DEMO], FMT) == (
        "You are a careful tutor.\n\nAdd the numbers.\n\nAll numbers are small integers.\n\n"
        "Q: What is 1 + 2?\nA: 3\n\nQ: What is 2 + 2?\nA:"
    )


def test_chat_turns_put_the_persona_in_the_system_message_and_the_instruction_in_the_first_user_turn():
    assert chat_messages(Q, [DEMO], FMT) == [
        {"role": "system", "content": "You are a careful tutor.\n\n"},
        {"role": "user", "content": "Add the numbers.\n\nAll numbers are small integers.\n\nWhat is 1 + 2?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    zero_shot = chat_messages(Q, [], PromptFormat(instruction="Add."))
    assert zero_shot == [{"role": "user", "content": "Add.\n\nWhat is 2 + 2?"}]


def test_chain_of_thought_prompts_trigger_reasoning_and_demonstrate_it():
    fmt, question, shots = chain_of_thought(PromptFormat(), Q, [DEMO], chat=False)
    assert plain_prompt(question, shots, fmt) == (
        "What is 1 + 2?\nAnswer: Let's think step by step. 1 plus 2 makes 3. The answer is 3.\n\n"
        "What is 2 + 2?\nAnswer: Let's think step by step."
    )
    no_rationale = TaskExample(prompt="pick", choices=("x", "y"), label=1)
    fmt, question, shots = chain_of_thought(PromptFormat(), Q, [no_rationale], chat=True)
    assert chat_messages(question, shots, fmt) == [
        {"role": "user", "content": "pick\n\nLet's think step by step."},
        {"role": "assistant", "content": "The answer is y."},
        {"role": "user", "content": "What is 2 + 2?\n\nLet's think step by step."},
    ]


@pytest.mark.parametrize(
    ("reply", "strict", "flexible"),
    [
        ("2 and 2 is 4. The answer is 4.", "4", "4"),
        ("the answer is 3.5.\nLater: so the answer is: 7", "7", "7"),
        ("The answer is blue sky\nmore text", "blue sky", "blue sky"),
        ("We get 1,200 apples, then 12 more.", None, "12"),
        ("First 1,200 then nothing", None, "1200"),
        ("no digits here\n  final line  \n", None, "final line"),
        ("", None, None),
    ],
)
def test_answer_extraction(reply, strict, flexible):
    assert extract_answer(reply, "strict") == strict
    assert extract_answer(reply, "flexible") == flexible


def test_majority_vote_normalises_ignores_none_and_breaks_ties_by_order():
    assert majority_vote(["5", "6", "6.", None, "5 ", " 6"]) == "6"
    assert majority_vote(["a", "b", "B", "A"]) == "a"
    assert majority_vote([None, None]) is None
    with pytest.raises(ValueError, match="extraction"):
        extract_answer("x", "lenient")


class ScriptedEngine:
    """Hands back fixed replies and records the sampling parameters it was given."""

    def __init__(self, replies: list[list[str]]):
        self.replies, self.params = replies, None

    def generate(self, token_ids, params):
        self.params = params
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t) for t in texts]) for texts in self.replies]


def test_self_consistency_scores_the_majority_answer_strict_and_flexible():
    data = TaskFile(path="x", examples=[Q, TaskExample(prompt="3 + 3?", answers=("6",))])
    engine = ScriptedEngine(
        [
            [
                "The answer is 4.",
                "so 5",
                "The answer is 5.",
                "it is 4",
            ],  # flexible 4,5,5,4 -> 4; strict 4,5 -> 4
            ["maybe 7", "The answer is 6.", "7", "the answer is 6"],  # flexible 7,6,7,6 -> 7; strict 6
        ]
    )
    tokenizer = SimpleNamespace(special_ids={0}, encode=lambda text, add_special_tokens: [1, 2])
    task = TaskConfig(name="sc", path="x", cot=True, self_consistency=4, temperature=0.8, max_tokens=50)
    metrics, samples = run_generation_task(task, engine, tokenizer, data, ["p1", "p2"], seed=10)
    assert metrics["exact_match"] == 0.5 and metrics["exact_match_strict"] == 1.0
    assert [s["answer"] for s in samples] == ["4", "7"]
    assert [s["answer_strict"] for s in samples] == ["4", "6"]
    assert [(p.n, p.temperature, p.seed, p.stop) for p in engine.params] == [
        (4, 0.8, 10, ["\n\n"]),
        (4, 0.8, 11, ["\n\n"]),
    ]


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """Five chain-of-thought demonstrations need more than 128 positions."""
    folder = tmp_path_factory.mktemp("model512")
    texts = ["What is 1 + 1? Let's think step by step. 1 and one. The answer is 2."] * 30
    tokenizer = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=300, add_bos_token=True))
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=512
    )
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


def test_sweep_reports_score_vs_shots_for_direct_and_chain_of_thought(tmp_path, long_context_model):
    path = tmp_path / "sums.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1), "rationale": f"{a} and one."})
            + "\n"
            for a in range(7)
        )
    )
    cfg = EvalConfig(
        model=str(long_context_model),
        run_dir=str(tmp_path / "run"),
        tasks=[TaskConfig(name="sums", path=str(path), max_tokens=6, limit=3)],
        sweeps=[SweepConfig(task="sums", shots=[0, 1, 5], cot=True)],
    )
    results = evaluate(cfg, progress=False)
    sweep = results["sweeps"]["sums"]
    assert sweep["shots"] == [0, 1, 5] and sweep["metric"] == "exact_match"
    assert len(sweep["direct"]) == len(sweep["cot"]) == 3
    run = tmp_path / "run"
    assert (run / sweep["plot"]).stat().st_size > 1000
    report = (run / "results.md").read_text()
    assert "![sums: score vs shots](sweep_sums.png)" in report
    assert "| chain of thought |" in report and "| 0 shots | 1 shots | 5 shots |" in report
    five_cot = [json.loads(line) for line in (run / "samples" / "sums@5shot-cot.jsonl").open()]
    for sample in five_cot:
        prompt = sample["prompt"]
        assert prompt.count("Let's think step by step.") == 6  # five demonstrations and the question
        assert prompt.count(sample["question"]) == 1  # the question is never its own demonstration
        assert prompt.count(" and one. The answer is ") == 5  # each demonstration shows its rationale
        assert sample["answer"] == extract_answer(sample["prediction"])
    for style in ("direct", "cot"):
        for shots, score in zip(sweep["shots"], sweep[style], strict=True):
            task_result = results["tasks"].get(f"sums@{shots}shot-{style}")
            assert task_result is None  # sweeps report separately from the task table
            lines = (run / "samples" / f"sums@{shots}shot-{style}.jsonl").read_text().splitlines()
            assert score == sum(json.loads(line)["correct"] for line in lines) / len(lines)


def test_self_consistency_samples_differ_and_are_reproducible(tmp_path, model_folder):
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(3))
    )
    task = TaskConfig(name="sc", path=str(path), cot=True, self_consistency=3, temperature=1.0, max_tokens=5)
    runs = []
    for name in ("a", "b"):
        evaluate(
            EvalConfig(model=str(model_folder), run_dir=str(tmp_path / name), tasks=[task]), progress=False
        )
        runs.append([json.loads(line) for line in (tmp_path / name / "samples" / "sc.jsonl").open()])
    assert runs[0] == runs[1]  # request i is seeded with seed + i
    for sample in runs[0]:
        assert len(sample["predictions"]) == 3 and len(set(sample["predictions"])) > 1
        assert sample["answer"] == majority_vote([extract_answer(p) for p in sample["predictions"]])
