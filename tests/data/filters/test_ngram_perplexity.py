import math

import numpy as np
import pytest

from lmforge.data.document import Document
from lmforge.data.filters.ngram_perplexity import KneserNeyLM, PerplexityFilter, tokenize
from lmforge.data.step import STEPS


def test_matches_hand_computation_on_toy_corpus():
    lm = KneserNeyLM.train(["a b", "a c"], order=2, unit="word", discount=0.75)
    # Bigram counts: (<s> a)=2 (a b)=1 (a c)=1 (b </s>)=1 (c </s>)=1; vocabulary {a b c </s> <unk>}.
    # Unigram continuation counts: a:1 b:1 c:1 </s>:2 (total 5, 4 types), so
    # P1(w) = max(N(w) - .75, 0) / 5 + .75 * 4 / 5 / 5.
    p1 = {"a": 0.25 / 5 + 0.12, "b": 0.25 / 5 + 0.12, "</s>": 1.25 / 5 + 0.12, "<unk>": 0.12}
    assert lm.probability("a", ["<s>"]) == pytest.approx(1.25 / 2 + 0.75 * 1 / 2 * p1["a"])
    assert lm.probability("b", ["a"]) == pytest.approx(0.25 / 2 + 0.75 * 2 / 2 * p1["b"])
    assert lm.probability("</s>", ["b"]) == pytest.approx(0.25 + 0.75 * p1["</s>"])
    # Unseen word after a seen context: only the back-off mass, with the <unk> unigram share.
    assert lm.probability("zebra", ["a"]) == pytest.approx(0.75 * 2 / 2 * p1["<unk>"])
    # The top order counts raw occurrences: a unigram model has a:2 b:1 c:1 </s>:2 (total 6, 4 types).
    unigram = KneserNeyLM.train(["a b", "a c"], order=1)
    assert unigram.probability("a", []) == pytest.approx(1.25 / 6 + 0.75 * 4 / 6 / 5)
    expected = math.exp(-(math.log(0.68875) + math.log(0.2525) + math.log(0.5275)) / 3)
    assert lm.perplexity("a b") == pytest.approx(expected)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_distributions_sum_to_one(order):
    lm = KneserNeyLM.train(
        ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"], order=order
    )
    for context in (["the"], ["sat", "on"], ["unseen", "context"], []):
        total = sum(lm.probability(w, context) for w in lm.vocab)
        assert total == pytest.approx(1.0)


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    subjects = ["the farmer", "a teacher", "the old doctor", "my neighbour", "the young pilot"]
    verbs = ["visited", "painted", "repaired", "described", "sold"]
    objects = ["the red barn", "a small boat", "the village school", "an old clock", "the north bridge"]
    tails = ["last week.", "in the spring.", "before the storm.", "after lunch.", "with great care."]
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    return [" ".join([pick(subjects), pick(verbs), pick(objects), pick(tails)]) for _ in range(n)]


@pytest.mark.parametrize("unit, order", [("word", 3), ("char", 5)])
def test_in_domain_text_beats_shuffled_junk(unit, order):
    rng = np.random.default_rng(0)
    lm = KneserNeyLM.train(sentences(rng, 300), order=order, unit=unit)
    held_out = " ".join(sentences(rng, 5))
    words = held_out.split()
    rng.shuffle(words)
    shuffled = " ".join(words)
    junk = "".join(rng.choice(list("qxzjkvw#@%"), size=len(held_out)))
    assert lm.perplexity(held_out) < lm.perplexity(shuffled) < lm.perplexity(junk)


def test_save_load_and_filter_step(tmp_path):
    rng = np.random.default_rng(1)
    lm = KneserNeyLM.train(sentences(rng, 200), order=3)
    path = tmp_path / "lm.json.gz"
    lm.save(path)
    loaded = KneserNeyLM.load(path)
    text = sentences(rng, 1)[0]
    assert loaded.perplexity(text) == pytest.approx(lm.perplexity(text))
    step = PerplexityFilter(model=str(path), min_perplexity=1.0, max_perplexity=50.0)
    assert STEPS["perplexity"] is PerplexityFilter
    good = Document("g", text)
    assert step.decide(good) is None and 1.0 < good.meta["perplexity"] < 50.0
    assert step.decide(Document("j", "zq xv jk wq pz " * 5)) == "perplexity_too_high"
    assert (
        PerplexityFilter(model=str(path), min_perplexity=100.0).decide(Document("x", text))
        == "perplexity_too_low"
    )


def test_tokenize_units():
    assert tokenize("Hello,  World!", "word") == ["hello", "world"]
    assert tokenize("ab  c\n", "char") == ["a", "b", " ", "c"]
    with pytest.raises(ValueError):
        tokenize("x", "byte")


def test_train_ngram_command(tmp_path, capsys):
    from lmforge.cli import main

    rng = np.random.default_rng(3)
    (tmp_path / "ref").mkdir()
    for i, text in enumerate(sentences(rng, 20)):
        (tmp_path / "ref" / f"{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "lm.json.gz"
    assert (
        main(["data", "train-ngram", "--text", str(tmp_path / "ref"), "--out", str(out), "--order", "2"]) == 0
    )
    assert "20 documents" in capsys.readouterr().out
    lm = KneserNeyLM.load(out)
    assert lm.order == 2 and lm.perplexity(sentences(rng, 1)[0]) < lm.perplexity("zq xv jk wq pz")
