import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.eval.long_context import (
    FILLER,
    INSTRUCTION,
    KEY_PHRASE,
    PasskeyConfig,
    PositionPerplexityConfig,
    bucket_perplexity,
    document_streams,
    greedy_generate,
    passkey_key,
    passkey_prompt,
    position_nll,
    run_passkey,
    score_passkey,
)
from lmforge.model import ModelConfig, Transformer


class CharTokenizer:
    """One token per character (ids = code point + 2); 0 is BOS, 1 is EOS."""

    vocab_size = 130
    eos_id = 1
    special_ids = frozenset({0, 1})

    def encode(self, text, add_special_tokens=False):
        return ([0] if add_special_tokens else []) + [ord(c) + 2 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 2) for i in ids if i > 1)


class CopyModel(nn.Module):
    """A planted retriever: after the last occurrence of the key phrase it copies what followed the first
    one (an ideal induction head). With ``offset`` it copies from the wrong place."""

    def __init__(self, marker, vocab, offset=0):
        super().__init__()
        self.marker, self.vocab, self.offset = list(marker), vocab, offset

    def forward(self, input_ids):
        seq = input_ids[0].tolist()
        m = len(self.marker)
        hits = [i for i in range(len(seq) - m + 1) if seq[i : i + m] == self.marker]
        written = len(seq) - (hits[-1] + m)
        source = hits[0] + m + written + self.offset
        logits = torch.zeros(1, len(seq), self.vocab)
        logits[0, -1, seq[source]] = 1.0
        return SimpleNamespace(logits=logits)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    shape = dict(vocab_size=130, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    cfg = ModelConfig(**{**shape, **overrides})
    return Transformer(cfg).eval()


def test_passkey_prompt_length_needle_and_depth():
    tok = CharTokenizer()
    for length in (400, 777):
        starts = {}
        for depth in (0.0, 0.5, 1.0):
            p = passkey_prompt(tok, length, depth, "12345")
            assert len(p.ids) == length
            text = tok.decode(p.ids)
            assert text.count("12345") == 1
            needle = tok.encode(KEY_PHRASE + " 12345. Remember it.")
            assert p.ids[p.needle_start : p.needle_start + len(needle)] == needle
            assert tok.decode(p.ids[p.question_start :]) == " What is the pass key?" + KEY_PHRASE
            assert p == passkey_prompt(tok, length, depth, "12345")  # deterministic
            starts[depth] = p.needle_start
        assert starts[0.0] == len(tok.encode(INSTRUCTION, add_special_tokens=True))  # right after it
        end = passkey_prompt(tok, length, 1.0, "12345")
        assert end.question_start - end.needle_start == len(needle)  # right before the question
        fill = length - starts[0.0] - len(needle) - (len(end.ids) - end.question_start)
        unit = len(tok.encode(FILLER))
        assert abs((starts[0.5] - starts[0.0]) - fill / 2) <= unit / 2 + 1
        assert (starts[0.5] - starts[0.0]) % unit == 0  # between two filler units


def test_passkey_prompt_too_short_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        passkey_prompt(CharTokenizer(), 50, 0.5, "12345")


def test_passkey_keys_are_deterministic_and_have_the_digits():
    keys = [passkey_key(5, 0, t) for t in range(20)]
    assert keys == [passkey_key(5, 0, t) for t in range(20)]
    assert all(len(k) == 5 and k[0] != "0" for k in keys)
    assert len(set(keys)) > 15
    assert passkey_key(5, 1, 0) != passkey_key(5, 0, 0) or passkey_key(5, 1, 1) != passkey_key(5, 0, 1)


def test_score_passkey():
    assert score_passkey(" 12345. Remember", "12345") == (1.0, 1.0)
    assert score_passkey(" 12395", "12345") == (0.0, 0.8)
    assert score_passkey(" 123456", "12345") == (0.0, 1.0)
    assert score_passkey(" none", "12345") == (0.0, 0.0)


def test_planted_retriever_scores_one_and_a_misplaced_one_zero():
    tok = CharTokenizer()
    cfg = PasskeyConfig(multiples=[1, 3], depths=[0.0, 0.5, 1.0], trials=2)
    good = run_passkey(CopyModel(tok.encode(KEY_PHRASE), tok.vocab_size), tok, cfg, train_length=256)
    assert good["by_multiple"] == {"1": 1.0, "3": 1.0}
    assert all(c["accuracy"] == 1.0 and c["digit_accuracy"] == 1.0 for c in good["cells"])
    assert len(good["cells"]) == 6 and len(good["samples"]) == 12
    # copying from two tokens too far skips the key's first digit: never exact, digits all shifted
    bad = run_passkey(CopyModel(tok.encode(KEY_PHRASE), tok.vocab_size, offset=2), tok, cfg, train_length=256)
    assert bad["by_multiple"] == {"1": 0.0, "3": 0.0}
    assert all(s["reply"].startswith(s["key"][1:] + ".") for s in bad["samples"])


def test_passkey_length_the_model_cannot_take_is_reported():
    tok = CharTokenizer()
    model = tiny_model(position="learned", max_seq_len=400)  # learned positions stop at 400
    result = run_passkey(
        model, tok, PasskeyConfig(multiples=[2, 4], depths=[0.5], trials=1), train_length=150
    )
    assert "2" in result["by_multiple"] and "4" in result["errors"]
    assert "beyond the learned positions" in result["errors"]["4"]


def test_greedy_generate_with_cache_equals_full_forward():
    model = tiny_model()
    prompt = [5, 9, 33, 2, 70, 8, 8, 41]
    ref = []
    for _ in range(6):
        ref.append(int(model(torch.tensor([prompt + ref])).logits[0, -1].argmax()))
    assert greedy_generate(model, prompt, 6) == ref
    assert greedy_generate(model, prompt, 6, stop_ids=[ref[2]]) == ref[:2]


def test_bucket_perplexity_math():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # predictions of positions 1..5
    b = torch.tensor([0.5, 1.5])  # positions 1..2
    rows = bucket_perplexity([a, b], 2)
    assert [r["bucket"] for r in rows] == [0, 1, 2]
    assert [r["tokens"] for r in rows] == [2, 3, 2]
    assert rows[0]["nll"] == pytest.approx((1.0 + 0.5) / 2)
    assert rows[1]["nll"] == pytest.approx((2 + 3 + 1.5) / 3)
    assert rows[2]["nll"] == pytest.approx(4.5)
    assert rows[2]["perplexity"] == pytest.approx(math.exp(4.5))
    assert (rows[1]["start"], rows[1]["end"]) == (2, 4)


def test_position_nll_matches_prefix_forwards():
    model = tiny_model()
    ids = torch.randint(2, 130, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    nll = position_nll(model, ids)
    with torch.no_grad():
        ref = [
            -F.log_softmax(model(torch.tensor([ids[: t + 1]])).logits[0, -1], -1)[ids[t + 1]]
            for t in range(len(ids) - 1)
        ]
    torch.testing.assert_close(nll, torch.stack(ref), atol=1e-5, rtol=1e-5)
    # a sink cache that never evicts is full attention, token by token or in chunks
    torch.testing.assert_close(position_nll(model, ids, sink=2, window=30), nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        position_nll(model, ids, sink=2, window=30, chunk=5), nll, atol=1e-5, rtol=1e-5
    )


def test_position_nll_with_sinks_sees_the_sinks_and_the_window():
    # one layer: its cached keys/values depend on the token alone, so a forward over the kept tokens is exact
    # (deeper layers keep keys computed when more context was visible, as StreamingLLM does)
    model = tiny_model(n_layers=1)
    ids = torch.randint(2, 130, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    sink, window = 2, 6
    nll = position_nll(model, ids, sink=sink, window=window)
    with torch.no_grad():
        for t in range(len(ids) - 1):
            kept = ids[: t + 1] if t <= sink + window else ids[:sink] + ids[t - window : t + 1]
            ref = -F.log_softmax(model(torch.tensor([kept])).logits[0, -1], -1)[ids[t + 1]]
            assert float(nll[t]) == pytest.approx(float(ref), abs=1e-4)
    assert not torch.allclose(nll, position_nll(model, ids))  # eviction does change the far tokens


def test_document_streams():
    tok = CharTokenizer()
    streams = document_streams(tok, ["abcdef", "ghij"], 4)
    joined = [1, *tok.encode("abcdef"), 1, *tok.encode("ghij")]
    assert streams == [joined[0:4], joined[4:8], joined[8:12]]
    assert document_streams(tok, ["abcdef", "gh"], 5, concatenate=False) == [
        [1, *tok.encode("abcd")],
        [1, *tok.encode("gh")],
    ]


def test_eval_runs_long_context_section(tmp_path, model_folder):
    from lmforge.eval.long_context import LongContextConfig
    from lmforge.eval.runner import EvalConfig, evaluate

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "The sky is blue and the grass is green. " * 30}) + "\n")
    cfg = EvalConfig(
        model=str(model_folder),
        run_dir=str(tmp_path / "run"),
        long_context=LongContextConfig(
            train_length=200,
            passkey=PasskeyConfig(multiples=[1, 2], depths=[0.0, 1.0], trials=1),
            perplexity=PositionPerplexityConfig(documents=[str(docs)], multiple=1, bucket_size=100),
        ),
    )
    results = evaluate(cfg, progress=False)
    lc = json.loads((tmp_path / "run" / "results.json").read_text())["long_context"]
    assert lc["passkey"]["errors"] == {}
    assert [c["tokens"] for c in lc["passkey"]["cells"]] == [200, 200, 400, 400]
    assert "samples" not in lc["passkey"]
    assert len((tmp_path / "run" / "samples" / "passkey.jsonl").read_text().splitlines()) == 4
    ppl = lc["perplexity"]
    assert [b["tokens"] for b in ppl["buckets"]] == [99, 100]  # one 200-token stream, 199 predictions
    assert results["long_context"]["perplexity"]["in_length_perplexity"] == ppl["buckets"][0]["perplexity"]
    md = (tmp_path / "run" / "results.md").read_text()
    assert "## Passkey retrieval (training length 200)" in md and "| 2x |" in md
    assert "| 100-199 | 100 |" in md


def test_many_shot_task_over_parallel_windows(tmp_path, model_folder):
    from lmforge.eval.fewshot import PromptFormat, sample_demonstrations
    from lmforge.eval.long_context import pcw_fewshot_windows
    from lmforge.eval.runner import EvalConfig, TaskConfig, evaluate
    from lmforge.eval.tasks import TaskExample, load_task
    from lmforge.model.hf import load_pretrained
    from lmforge.model.pcw import pcw_forward
    from lmforge.tokenizer import load_tokenizer

    gen = tmp_path / "gen.jsonl"
    gen.write_text(
        "".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(6))
    )
    tasks = [
        TaskConfig(name="plain", path=str(gen), num_fewshot=4, max_tokens=4, limit=3),
        TaskConfig(name="pcw1", path=str(gen), num_fewshot=4, max_tokens=4, limit=3, pcw_windows=1),
        TaskConfig(name="pcw3", path=str(gen), num_fewshot=4, max_tokens=4, limit=3, pcw_windows=3),
    ]
    evaluate(EvalConfig(model=str(model_folder), run_dir=str(tmp_path / "run"), tasks=tasks), progress=False)
    read = lambda name: [json.loads(x) for x in (tmp_path / "run" / "samples" / f"{name}.jsonl").open()]  # noqa: E731
    # one window is the ordinary few-shot prompt: the engine's greedy replies
    assert [s["prediction"] for s in read("pcw1")] == [s["prediction"] for s in read("plain")]
    # three windows: each reply equals a full-recompute greedy decode over the one-pass PCW layout
    model, tok = load_pretrained(model_folder).eval(), load_tokenizer(model_folder)
    data = load_task(gen)
    fmt = PromptFormat()
    for i, sample in enumerate(read("pcw3")):
        demos = sample_demonstrations(data.examples, 4, data.examples[i], 1234, i)
        windows = pcw_fewshot_windows(fmt, demos, 3, tok)
        assert sample["windows"] == 3 and [len(w) > 0 for w in windows] == [True] * 3
        task_ids, out = tok.encode(fmt.question(data.examples[i])), []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(pcw_forward(model, windows, task_ids + out)[-1].argmax())
                if nxt in tok.special_ids:
                    break
                out.append(nxt)
        assert sample["prediction"] == tok.decode(out, skip_special_tokens=True).split("\n")[0]
    # the windows hold the demonstrations dealt round-robin, each ending with the delimiter
    demos = [TaskExample(prompt=f"q{i}", answers=(str(i),)) for i in range(5)]
    texts = [tok.decode(w, skip_special_tokens=True) for w in pcw_fewshot_windows(fmt, demos, 2, tok)]
    assert texts == [
        "q0\nAnswer: 0\n\nq2\nAnswer: 2\n\nq4\nAnswer: 4\n\n",
        "q1\nAnswer: 1\n\nq3\nAnswer: 3\n\n",
    ]


def test_position_perplexity_through_the_knn_memory():
    from lmforge.eval.long_context import run_position_perplexity

    tok = CharTokenizer()
    text = "the sky is blue and the grass is green; " * 3
    cfg = PositionPerplexityConfig(documents=["-"], multiple=2, memory_segment=20, bucket_size=20)
    # gate fixed at 0: the memory is ignored, so each segment is scored on its own at positions 0..19
    model = tiny_model(knn_memory={"layers": [1], "gate": "fixed", "gate_value": 0.0})
    result = run_position_perplexity(model, tok, [text], cfg, train_length=40)
    ids = document_streams(tok, [text], 80)[0]
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([ids[s : s + 20]])).logits[0] for s in range(0, 80, 20)])
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    expected = bucket_perplexity([nll], 20)
    assert [b["perplexity"] for b in result["buckets"]] == pytest.approx(
        [b["perplexity"] for b in expected], rel=1e-5
    )
    assert result["memory_segment"] == 20
    # with the memory in a joint softmax the later segments do see the earlier ones
    joint = tiny_model(knn_memory={"layers": [0, 1], "gate": "joint", "top_k": 8})
    with_memory = run_position_perplexity(joint, tok, [text], cfg, train_length=40)
    alone = run_position_perplexity(
        joint, tok, [text], dataclasses.replace(cfg, memory_segment=80), train_length=40
    )
    assert with_memory["buckets"][0]["perplexity"] == pytest.approx(
        alone["buckets"][0]["perplexity"], rel=1e-5
    )
    assert with_memory["buckets"][2]["perplexity"] != pytest.approx(
        alone["buckets"][2]["perplexity"], rel=1e-3
    )
    with pytest.raises(ValueError, match="not both"):
        PositionPerplexityConfig(window=8, memory_segment=8)
