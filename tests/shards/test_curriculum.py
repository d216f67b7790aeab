import pytest

from lmforge.shards.curriculum import Curriculum, CurriculumStage
from lmforge.shards.mixture import MixtureConfig


def three_stages() -> Curriculum:
    return Curriculum(
        [
            CurriculumStage("general", tokens=1000, seq_len=2048),
            CurriculumStage(
                "code-heavy", tokens=500, seq_len=2048, mixture=MixtureConfig("fixed", {"code": 1})
            ),
            CurriculumStage("long-python", tokens=0, seq_len=8192),
        ]
    )


def test_stage_at_tokens_seen() -> None:
    curriculum = three_stages()
    assert [curriculum.stage_at(t) for t in (0, 999, 1000, 1499, 1500, 10**9)] == [0, 0, 1, 1, 2, 2]
    assert curriculum.total_tokens == 1500


def test_stage_at_step_with_per_stage_batch_tokens() -> None:
    curriculum = three_stages()
    # 300 tokens per step in stage 0 -> 4 steps (the 4th crosses the budget), then 200 per step -> 3 steps
    assert [curriculum.stage_at_step(s, [300, 200, 800]) for s in range(9)] == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert curriculum.stage_at_step(3, 250) == 0 and curriculum.stage_at_step(4, 250) == 1


def test_invalid_curricula() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Curriculum([])
    with pytest.raises(ValueError, match="token budget"):
        Curriculum([CurriculumStage("a", tokens=0), CurriculumStage("b")])
    with pytest.raises(ValueError, match="tokens_per_step"):
        three_stages().stage_at_step(1, [100])
