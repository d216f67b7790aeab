"""lmforge as an lm-eval model: per-item parity with lm-eval's ``hf`` backend on a tiny random Llama.

Everything is built offline in the test: a tokenizer, a random ``LlamaForCausalLM`` saved with transformers,
and lm-eval task YAMLs (multiple choice, rolling perplexity, generation) over JSONL files written here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval.lm_eval_model import LmforgeLM  # noqa: E402
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer  # noqa: E402

TOLERANCE = 1e-4
MAX_LEN = 48  # short, so the rolling documents span several windows and long contexts get truncated

WORDS = [
    "the",
    "sky",
    "is",
    "blue",
    "grass",
    "green",
    "red",
    "apple",
    "river",
    "stone",
    "cloud",
    "music",
    "bright",
    "dark",
    "quiet",
]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + "." for i in range(40)]
    tokenizer = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=200, add_bos_token=True))
    tokenizer.save(folder)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    transformers.LlamaForCausalLM(hf_config).save_pretrained(folder)
    return folder


def _write_tasks(folder: Path) -> None:
    mc = folder / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps(
                {
                    "question": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + 9 * (i % 2))),
                    "choices": ["blue", "green grass", "the red apple", "quiet"],
                    "label": i % 4,
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    docs = folder / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(10 + 25 * i)) + "."})
            + "\n"
            for i in range(4)
        )
    )
    gen = folder / "gen.jsonl"
    gen.write_text(
        "".join(json.dumps({"question": f"the {w} is", "answer": "blue"}) + "\n" for w in WORDS[:6])
    )
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "lmf_mc.yaml").write_text(
        f"task: lmf_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "lmf_ppl.yaml").write_text(
        f"task: lmf_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "lmf_gen.yaml").write_text(
        f"task: lmf_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def _per_item(model, tasks_dir: Path, tasks: list[str], chat: bool = False) -> dict[str, list]:
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
        num_fewshot=0,
        apply_chat_template=chat,
    )
    return {
        task: [(s["arguments"], s["resps"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


def test_lm_eval_tasks_match_hf_backend(tmp_path, llama_folder):
    _write_tasks(tmp_path)
    tasks = ["lmf_mc", "lmf_ppl", "lmf_gen"]
    ours = LmforgeLM(pretrained=str(llama_folder), batch_size=4)
    reference = HFLM(pretrained=str(llama_folder), device="cpu", dtype="float32", batch_size=4)
    assert reference.max_length == ours.max_length == MAX_LEN
    got, want = _per_item(ours, tmp_path, tasks), _per_item(reference, tmp_path, tasks)
    got = {task: [resps for _, resps in items] for task, items in got.items()}
    want = {task: [resps for _, resps in items] for task, items in want.items()}

    # multiple choice: every (context, choice) log-likelihood and greedy flag
    assert len(got["lmf_mc"]) == 8
    for ours_item, ref_item in zip(got["lmf_mc"], want["lmf_mc"], strict=True):
        assert len(ours_item) == 4
        for (ours_lp, ours_greedy), (ref_lp, ref_greedy) in zip(
            (r[0] for r in ours_item), (r[0] for r in ref_item), strict=True
        ):
            assert abs(float(ours_lp) - float(ref_lp)) <= TOLERANCE
            assert ours_greedy == ref_greedy
    # rolling perplexity: whole-document log-likelihoods (the longer documents span several windows)
    assert len(
        ours.tok_encode(json.loads((tmp_path / "docs.jsonl").read_text().splitlines()[-1])["text"])
    ) > (2 * MAX_LEN)
    for ours_item, ref_item in zip(got["lmf_ppl"], want["lmf_ppl"], strict=True):
        assert abs(float(ours_item[0][0]) - float(ref_item[0][0])) <= TOLERANCE
    # generation: the engine's greedy replies equal transformers' greedy replies
    assert [r[0] for r in got["lmf_gen"]] == [r[0] for r in want["lmf_gen"]]


def test_chat_template_requests_match_hf_backend(tmp_path, llama_folder):
    """With --apply_chat_template both backends render the same prompts (the rendering starts without a
    BOS text here, so tok_encode adds the tokenizer's BOS as hf does) and score and generate alike."""
    _write_tasks(tmp_path)
    ours = LmforgeLM(pretrained=str(llama_folder), batch_size=4)
    reference = HFLM(pretrained=str(llama_folder), device="cpu", dtype="float32", batch_size=4)
    got = _per_item(ours, tmp_path, ["lmf_mc", "lmf_gen"], chat=True)
    want = _per_item(reference, tmp_path, ["lmf_mc", "lmf_gen"], chat=True)
    assert got["lmf_gen"][0][0][0][0].startswith("<|im_start|>user\n")
    for task in ("lmf_mc", "lmf_gen"):
        for (ours_args, ours_resps), (ref_args, ref_resps) in zip(got[task], want[task], strict=True):
            assert ours_args == ref_args
            if task == "lmf_gen":
                assert ours_resps == ref_resps
                continue
            for (ours_lp, ours_greedy), (ref_lp, ref_greedy) in zip(
                (r[0] for r in ours_resps), (r[0] for r in ref_resps), strict=True
            ):
                assert abs(float(ours_lp) - float(ref_lp)) <= TOLERANCE and ours_greedy == ref_greedy


def test_empty_context_and_truncated_context_match_hf(llama_folder):
    ours = LmforgeLM(pretrained=str(llama_folder), batch_size=2)
    reference = HFLM(pretrained=str(llama_folder), device="cpu", dtype="float32", batch_size=2)
    long_context = " ".join(WORDS * 6)  # longer than MAX_LEN tokens: its left end is cut
    requests = [
        Instance("loglikelihood", {}, ("", "the sky is blue"), 0),
        Instance("loglikelihood", {}, (long_context + " ", "green grass"), 1),
        Instance("loglikelihood", {}, ("the river", " stone"), 2),
    ]
    assert len(ours.tok_encode(long_context)) > MAX_LEN
    got, want = ours.loglikelihood(requests), reference.loglikelihood(requests)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, want, strict=True):
        assert abs(lp - ref_lp) <= TOLERANCE
        assert greedy == ref_greedy


def test_lm_eval_command_line_runs_the_registered_model(tmp_path, llama_folder):
    _write_tasks(tmp_path)
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.eval.lm_eval_model",
            "run",
            "--model",
            "lmforge",
            "--model_args",
            f"pretrained={llama_folder}",
            "--device",
            "cpu",
            "--tasks",
            "lmf_mc",
            "--include_path",
            str(tmp_path),
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert len(saved) == 1
    results = json.loads(saved[0].read_text())["results"]["lmf_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0
    assert results["alias"] == "lmf_mc"
