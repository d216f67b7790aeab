from collections import Counter

from lmforge.data.document import Document
from lmforge.data.step import Filter, GlobalFilter, Step, StepStats


class ShortOrBoom(Filter):
    name = "short_or_boom"

    def decide(self, doc: Document) -> str | None:
        if doc.text == "boom":
            raise ValueError("cannot judge")
        return "too_short" if len(doc.text) < 3 else None


class Upper(Step):
    name = "upper"

    def process(self, doc: Document) -> Document | None:
        if doc.text.startswith("drop"):
            return None
        if doc.text.startswith("bad"):
            self.remove(doc, "bad_prefix")
            return None
        doc.text = doc.text.upper()
        return doc


def docs(*texts: str) -> list[Document]:
    return [Document(str(i), t) for i, t in enumerate(texts)]


def test_filter_counts_kept_removed_and_errors_and_routes_them():
    step = ShortOrBoom()
    excluded, rejected = [], []
    step.exclude = lambda d, s, r: excluded.append((d.id, s, r))
    step.reject = lambda d, s, r: rejected.append((d.id, s, r))
    out = [d.text for d in step(docs("long enough", "ab", "boom", "fine"))]
    assert out == ["long enough", "fine"]
    assert excluded == [("1", "short_or_boom", "too_short")]
    assert rejected == [("2", "short_or_boom", "short_or_boom: ValueError: cannot judge")]
    s = step.stats
    assert (s.docs_in, s.kept, s.removed, s.errors) == (4, 2, Counter(too_short=1), 1)
    assert s.docs_in == s.kept + s.removed.total() + s.errors


def test_transform_reason_is_counted_once():
    step = Upper()
    out = [d.text for d in step(docs("a", "drop me", "bad one", "b"))]
    assert out == ["A", "B"]
    assert step.stats.removed == Counter(dropped=1, bad_prefix=1)
    assert step.stats.kept == 2


def test_stats_round_trip_and_merge():
    a = StepStats("x", docs_in=3, kept=1, removed=Counter(r=1), errors=1, counters=Counter(email=2))
    b = StepStats.from_dict(a.to_dict())
    b.merge(a)
    assert (b.docs_in, b.kept, b.removed, b.errors, b.counters) == (6, 2, Counter(r=2), 2, Counter(email=4))


class DropRepeatedText(GlobalFilter):
    """Keeps the first occurrence of each text across tasks: the barrier protocol in miniature."""

    name = "drop_repeated_text"

    def start_collect(self, task):
        self.seen = []

    def collect(self, doc, position):
        if doc.text == "explode":
            raise RuntimeError("no signature")
        self.seen.append(doc.text)

    def write_artifact(self, path):
        path.write_text("\n".join(self.seen))

    def reduce(self, artifacts, decision_dir):
        first = set()
        for task, path in enumerate(artifacts):
            drops = [str(p) for p, t in enumerate(path.read_text().split("\n")) if t in first or first.add(t)]
            (decision_dir / f"{task}.txt").write_text(" ".join(drops))

    def load_decision(self, decision_dir, task):
        self.drop = {int(p) for p in (decision_dir / f"{task}.txt").read_text().split()}

    def decide(self, doc):
        return "repeated" if self.position in self.drop else None


def test_global_filter_two_passes_keep_first_occurrence(tmp_path):
    step = DropRepeatedText()
    rejected = []
    step.reject = lambda d, s, r: rejected.append(d.text)
    tasks = [docs("a", "b", "a"), docs("explode", "b", "c")]
    passed = [list(step.collect_stream(t, i, tmp_path / f"art{i}")) for i, t in enumerate(tasks)]
    assert rejected == ["explode"]
    decision = tmp_path / "decision"
    decision.mkdir()
    step.reduce([tmp_path / "art0", tmp_path / "art1"], decision)
    kept = [[d.text for d in step.apply_stream(p, decision, i)] for i, p in enumerate(passed)]
    assert kept == [["a", "b"], ["c"]]
    s = step.stats
    assert (s.docs_in, s.kept, s.removed.total(), s.errors) == (6, 3, 2, 1)
