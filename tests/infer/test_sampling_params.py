"""SamplingParams, the one definition of the request fields: ranges, safe values, the documented table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmforge.infer.sampling_params import GREEDY_BELOW, InvalidRequestError, SamplingParams, numeric_ranges

OUT_OF_RANGE = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 10**9}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2**64}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"length_penalty": 1e308, "use_beam_search": True}, "length_penalty"),
    ({"length_penalty": math.nan, "use_beam_search": True}, "length_penalty"),
    ({"logit_bias": {3: 101}}, "logit_bias"),
    ({"logit_bias": {3: math.inf}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"best_of": 3}, "best_of"),  # only as a beam width
    ({"best_of": 2, "n": 3, "use_beam_search": True}, "best_of"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
]


@pytest.mark.parametrize(("fields", "param"), OUT_OF_RANGE)
def test_values_outside_the_documented_ranges_are_refused_naming_the_field(fields, param) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_tiny_temperatures_are_greedy_and_the_edges_are_accepted() -> None:
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=5e-324).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
    assert SamplingParams(top_k=-1).top_k == 0
    SamplingParams(temperature=2.0, top_p=1.0, min_p=1.0, repetition_penalty=100, seed=-(2**63), logprobs=20)
    SamplingParams(use_beam_search=True, length_penalty=-10, n=2, best_of=4)


def test_the_served_documentation_lists_every_range() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for name, (bounds, _) in numeric_ranges().items():
        assert f"| `{name}` | `{bounds}` |" in docs, name
