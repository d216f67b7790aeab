"""The passkey batches of benchmarks/long_context.py: where the fine-tune mix puts its keys (issue #16)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lmforge.eval.long_context import INSTRUCTION, KEY_PHRASE, NEEDLE_TAIL, QUESTION, first_digits
from lmforge.shards.curriculum import Curriculum, CurriculumStage
from lmforge.train.objective import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("long_context_bench", REPO / "benchmarks/long_context.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(bench):
    return bench.passkey_tokenizer()


def passkey_rows(bench, tok, batches, **shares):
    """(ids, labels) of the passkey rows of ``batches`` batches of 6 rows at 256 tokens (every third row is
    a copying row, left out)."""
    source = bench.PasskeyBatches(tok, Curriculum([CurriculumStage("s", seq_len=256)]), 6, seed=3, **shares)
    rows = []
    for _ in range(batches):
        b = next(source)
        rows += [(b["input_ids"][i].tolist(), b["labels"][i].tolist()) for i in range(6) if i % 3 != 2]
    return rows


def question_start(tok, ids):
    question = tok.encode(QUESTION)
    return max(i for i in range(len(ids)) if ids[i : i + len(question)] == question)


def placement(tok, ids):
    """'begin' (needle right after the instruction), 'end' (right before the question) or 'inside'."""
    intro = len(tok.encode(INSTRUCTION, add_special_tokens=True))
    phrase, tail = tok.encode(KEY_PHRASE), tok.encode(NEEDLE_TAIL)
    q = question_start(tok, ids)
    if ids[intro : intro + len(phrase)] == phrase:
        return "begin"
    return "end" if ids[q - len(tail) : q] == tail else "inside"


def pad_of(tok):
    return tok.pad_id if tok.pad_id is not None else tok.eos_id


def test_labels_are_the_needles_key(bench, tok):
    for ids, labels in passkey_rows(bench, tok, 2, full_share=0.5, edge_share=0.3):
        key = first_digits(tok.decode(ids[: question_start(tok, ids)]))
        assert len(key) == 5
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == f" {key}."


def test_full_share_one_fills_every_row(bench, tok):
    for ids, labels in passkey_rows(bench, tok, 3, full_share=1.0):
        assert labels[-1] != IGNORE_INDEX  # the answer ends the row: no padding
        assert ids[-1] != pad_of(tok)
    assert [
        ids for ids, _ in passkey_rows(bench, tok, 3) if ids[-1] == pad_of(tok)
    ]  # by default lengths vary


def test_edge_share_one_puts_every_key_at_an_edge(bench, tok):
    places = [placement(tok, ids) for ids, _ in passkey_rows(bench, tok, 4, edge_share=1.0)]
    assert set(places) == {"begin", "end"}


def test_the_mix_puts_keys_a_whole_row_back_where_uniform_draws_rarely_do(bench, tok):
    def far_share(**shares):
        rows = passkey_rows(bench, tok, 20, **shares)
        far = [placement(tok, ids) == "begin" and ids[-1] != pad_of(tok) for ids, _ in rows]
        return sum(far) / len(rows)

    assert far_share() < 0.03
    assert far_share(full_share=0.5, edge_share=0.3) > 0.05
