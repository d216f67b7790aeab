from lmforge.data.dedup.exact import ExactDedup, document_digest
from lmforge.data.document import Document
from lmforge.data.step import STEPS


def test_normalization_makes_trivial_variants_collide():
    base = document_digest("The cat sat on the mat.")
    assert document_digest("the  CAT sat on the mat") == base
    assert document_digest("The cat — sat, on the “mat”!\n") == base
    assert document_digest("Ｔｈｅ cat sat on the mat.") == base  # NFKC: full-width letters
    assert document_digest("The cat sat on a mat.") != base
    assert document_digest("the  CAT sat on the mat", normalize=False) != base


def test_duplicates_removed_across_tasks_keeping_smallest_id(two_passes):
    step = ExactDedup()
    assert STEPS["exact_dedup"] is ExactDedup
    tasks = [
        [Document("b", "Hello world."), Document("x", "Unique one."), Document("a", "hello,  WORLD")],
        [Document("0", "Unique two."), Document("c", "Hello world!"), Document("d", "unique ONE")],
    ]
    kept = two_passes(step, tasks)
    assert [[d.id for d in task] for task in kept] == [["a"], ["0", "d"]]  # "a" < "b" < "c", "d" < "x"
    assert step.stats.removed == {"exact_duplicate": 3}
    sizes = {d.id: d.meta.get("exact_cluster_size") for task in kept for d in task}
    assert sizes == {"a": 3, "0": None, "d": 2}


def test_repeated_ids_fall_back_to_dataset_order(two_passes):
    tasks = [[Document("same", "text one")], [Document("same", "Text one.")], [Document("same", "other")]]
    kept = two_passes(ExactDedup(), tasks)
    assert [len(t) for t in kept] == [1, 0, 1]
