import json

import pytest
import torch

from lmforge.eval.runner import EvalConfig, PerplexityConfig, TaskConfig, evaluate
from lmforge.eval.scoring import LoglikelihoodRequest, continuation_logprobs


def greedy(model, ids, max_tokens, stop_ids):
    """Reference decode: a full forward per token, no cache, no engine."""
    out = []
    for _ in range(max_tokens):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
    return out


def test_evaluate_generation_multiple_choice_and_perplexity(tmp_path, model_folder):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(6))
    )
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"prompt": f"The sky is {i}", "choices": ["blue", "green grass"], "label": i % 2})
            + "\n"
            for i in range(4)
        )
    )
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d", "text": "The sky is blue."}) + "\n")
    cfg = EvalConfig(
        model=str(model_folder),
        run_dir=str(tmp_path / "run"),
        tasks=[
            TaskConfig(name="gen", path=str(gen), max_tokens=4),
            TaskConfig(name="gen_chat_1shot", path=str(gen), chat=True, num_fewshot=1, max_tokens=4),
            TaskConfig(name="mc", path=str(mc), num_fewshot=2),
        ],
        perplexity=PerplexityConfig(documents=[str(docs)]),
    )
    results = evaluate(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["tasks"].keys() == {"gen", "gen_chat_1shot", "mc"}
    assert (
        "| gen_chat_1shot | generate | 1 | True | False | 1 | 6 | exact_match |"
        in (tmp_path / "run" / "results.md").read_text()
    )

    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import load_tokenizer

    model, tokenizer = load_pretrained(model_folder), load_tokenizer(model_folder)
    # Generation: the engine's greedy replies equal a plain full-forward greedy decode.
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "gen_chat_1shot.jsonl").open()]
    assert (
        samples[0]["prompt"].endswith("<|im_start|>assistant\n") and samples[0]["prompt"].count("user") == 2
    )
    for sample in samples:
        ids = tokenizer.encode(sample["prompt"], add_special_tokens=False)
        expected = tokenizer.decode(greedy(model, ids, 4, tokenizer.special_ids), skip_special_tokens=True)
        assert sample["prediction"] == expected
    correct = [s["correct"] for s in samples]
    assert results["tasks"]["gen_chat_1shot"]["metrics"]["exact_match"] == sum(correct) / len(correct)

    # Multiple choice: recompute every choice's log-likelihood and the accuracy by hand.
    mc_samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "mc.jsonl").open()]
    hits = 0
    for sample in mc_samples:
        requests = [LoglikelihoodRequest(sample["prompt"], " " + c) for c in sample["choices"]]
        scores = [s.logprob for s in continuation_logprobs(model, tokenizer, requests)]
        assert scores == pytest.approx(sample["logprobs"], abs=1e-4)
        hits += max(range(2), key=lambda i: scores[i]) == sample["label"]
    assert results["tasks"]["mc"]["metrics"]["acc"] == hits / len(mc_samples)
    assert set(results["tasks"]["mc"]["metrics"]) >= {"acc", "acc_norm", "acc_per_token", "acc_per_byte"}
    ppl = results["perplexity"]
    assert ppl["documents"] == 1 and ppl["bytes"] == len("The sky is blue.")
    assert ppl["perplexity"] > 1
