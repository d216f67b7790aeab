from lmforge.infer import TokenLogprob
from lmforge.serve.logprobs import TokenIdLabels, chat_logprobs, completion_logprobs


class Letters:
    """Token i is the letter chr(ord('a') + i)."""

    def text(self, token_id: int) -> str:
        return chr(ord("a") + token_id)


def test_legacy_format_keeps_the_chosen_token_among_the_alternatives():
    entries = [
        None,  # the first prompt token: nothing predicts it
        TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.5)]),
        TokenLogprob(3, -2.0, [(0, -0.1)]),  # sampled, not among the top alternatives
    ]
    result = completion_logprobs([0, 1, 3], entries, Letters(), text_offset=10)
    assert result.tokens == ["a", "b", "d"]
    assert result.token_logprobs == [None, -0.5, -2.0]
    assert result.top_logprobs == [None, {"b": -0.5, "c": -1.5}, {"a": -0.1, "d": -2.0}]
    assert result.text_offset == [10, 11, 12]


def test_chat_format_lists_top_alternatives_and_bytes():
    (entry,) = chat_logprobs([TokenLogprob(2, -0.25, [(2, -0.25), (0, -2.0), (1, -3.0)])], Letters(), top_k=2)
    assert (entry.token, entry.logprob, entry.bytes) == ("c", -0.25, [ord("c")])
    assert [(t.token, t.logprob) for t in entry.top_logprobs] == [("c", -0.25), ("a", -2.0)]


def test_token_id_labels():
    result = completion_logprobs([7], [TokenLogprob(7, -1.0, [])], TokenIdLabels())
    assert result.tokens == ["token_id:7"] and result.top_logprobs == [{"token_id:7": -1.0}]
