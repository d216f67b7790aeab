import gzip
import json
import sys
import textwrap

import fsspec
import pytest
import yaml

from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.data.io import HtmlReader, JsonlReader, TextReader, Writer, read_documents
from lmforge.data.pipeline import Pipeline, PipelineError, step_config
from lmforge.data.recipe import build_step, import_step_modules, load_recipe, run_recipe
from tests.data import toy_steps  # registers the toy_* steps


def read_gz_jsonl(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


def make_corpus(root, giant=False):
    """JSONL (with bad records) + .txt + .html: 3 inputs, 4 tasks."""
    (root / "web").mkdir(parents=True)
    lines = [
        b'{"id": "w1", "text": "the cat sat on the mat"}',
        b'{"id": "w2", "text": "short"}',
        b"{broken json",
        b'{"id": "w3", "text": "this one will KABOOM in a step"}',
        b'{"id": "w4", "text": "a shared sentence seen twice here"}',
        b'{"id": "w5", "text": 12}',
    ]
    (root / "web" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with (root / "web" / "b.jsonl").open("wb") as f:
        f.write(b'{"id": "w6", "text": "a shared sentence seen twice here"}\n')
        if giant:
            f.write(b'{"id": "giant", "text": "' + b"big " * 12_500_000 + b'"}\n')  # 50 MB
        f.write(b'{"id": "w7", "text": "\xff\xfe not utf8 at all"}\n')
    (root / "books").mkdir()
    (root / "books" / "one.txt").write_text("a book about many things indeed")
    (root / "books" / "two.txt").write_text("")
    (root / "pages").mkdir()
    (root / "pages" / "p.html").write_text("<html><body><p>a page with enough words</p></body></html>")
    return root


def corpus_pipeline(root, out, **kw):
    readers = [
        JsonlReader(str(root / "web" / "*.jsonl"), source="web"),
        TextReader(str(root / "books"), source="books"),
        HtmlReader(str(root / "pages"), source="pages"),
    ]
    steps = [toy_steps.Tag(), toy_steps.MinWords(min_words=4), toy_steps.TextDedup()]
    return Pipeline(readers, steps, Writer(str(out), "jsonl.gz"), **kw)


def test_mixed_corpus_end_to_end_counts_routes_and_balances(tmp_path):
    root = make_corpus(tmp_path / "raw", giant=True)
    report = LocalExecutor().run(corpus_pipeline(root, tmp_path / "out"), tmp_path / "run", progress=False)

    kept = [d.id for d in read_documents(tmp_path / "out")]
    assert kept == ["w1", "w4", "books/one.txt", "pages/p.html"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"0000{i}.jsonl.gz" for i in range(4)]
    assert all(d.meta["tagged"] for d in read_documents(tmp_path / "out"))
    # 9 JSONL records + 2 txt + 1 html; dedup removes w6 (w4 came first, in task order)
    totals = report.to_dict()["totals"]
    assert totals == {"in": 12, "kept": 4, "removed": 2, "rejected": 6, "balanced": True}
    assert dict(report.reader_rejects) == {
        "empty": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "text_not_string": 1,
        "too_large": 1,
    }
    tag, min_words, dedup = report.steps
    tagged = ["the cat sat on the mat", "short", *["a shared sentence seen twice here"] * 2]
    tagged += [(root / "books" / "one.txt").read_text(), (root / "pages" / "p.html").read_text()]
    assert (tag.docs_in, tag.kept, tag.errors, tag.counters["chars"]) == (7, 6, 1, sum(map(len, tagged)))
    assert dict(min_words.removed) == {"too_few_words": 1}
    assert dict(dedup.removed) == {"duplicate": 1}

    run = tmp_path / "run"
    assert not (run / "stages" / "0" / "docs").exists() and (run / "stages" / "0" / "decision").is_dir()
    stats = json.loads((run / "stats.json").read_text())
    assert stats["totals"] == totals and [s["name"] for s in stats["steps"]] == [
        "toy_tag",
        "toy_min_words",
        "toy_text_dedup",
    ]
    excluded = read_gz_jsonl(run / "excluded" / "01_toy_min_words" / "00000.jsonl.gz")
    assert [(e["id"], e["text"], e["step"], e["reason"]) for e in excluded] == [
        ("w2", "short", "toy_min_words", "too_few_words")
    ]
    assert [e["id"] for e in read_gz_jsonl(run / "excluded" / "02_toy_text_dedup" / "00001.jsonl.gz")] == [
        "w6"
    ]
    rejects = read_gz_jsonl(run / "rejects" / "0" / "00000.jsonl.gz")
    assert [(r["where"].rsplit("/", 1)[-1], r["reason"].split(":")[0], r["step"]) for r in rejects] == [
        ("a.jsonl:3", "malformed_json", None),
        ("w3", "toy_tag", "00_toy_tag"),
        ("a.jsonl:6", "text_not_string", None),
    ]
    assert rejects[1]["reason"] == "toy_tag: ValueError: found KABOOM"
    giant = read_gz_jsonl(run / "rejects" / "0" / "00001.jsonl.gz")[0]
    assert giant["reason"].startswith("too_large") and len(giant["preview"]) == 200


def test_local_workers_give_the_same_bytes_as_one_worker(tmp_path):
    root = make_corpus(tmp_path / "raw")
    LocalExecutor().run(corpus_pipeline(root, tmp_path / "out1"), tmp_path / "run1", progress=False)
    LocalExecutor(2).run(corpus_pipeline(root, tmp_path / "out2"), tmp_path / "run2", progress=False)
    for path in sorted((tmp_path / "out1").iterdir()):
        assert path.read_bytes() == (tmp_path / "out2" / path.name).read_bytes()
    s1, s2 = (json.loads((tmp_path / r / "stats.json").read_text()) for r in ("run1", "run2"))
    assert s1["totals"] == s2["totals"]


def test_exclusions_off_intermediate_kept_and_parquet_output(tmp_path):
    root = make_corpus(tmp_path / "raw")
    readers = [JsonlReader(str(root / "web" / "*.jsonl"))]
    steps = [toy_steps.MinWords(), toy_steps.TextDedup()]
    writer = Writer(str(tmp_path / "out"), "parquet")
    pipeline = Pipeline(readers, steps, writer, exclusions=False, keep_intermediate=True)
    report = LocalExecutor().run(pipeline, tmp_path / "run", progress=False)
    assert report.balanced and report.removed == 2
    assert not (tmp_path / "run" / "excluded").exists()
    assert len(list((tmp_path / "run" / "stages" / "0" / "docs").iterdir())) == 2
    assert [d.id for d in read_documents(tmp_path / "out")] == ["w1", "w3", "w4"]


def test_inputs_and_output_on_another_filesystem(tmp_path):
    """fsspec's in-memory filesystem stands in for s3:// or gs:// (one process: it is not shared)."""
    memory = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"  # the in-memory store is global to the process
    memory.pipe(
        f"{root}/corpus/a.jsonl.gz",
        gzip.compress(b'{"id": "m1", "text": "one two three four"}\n{"id": "m2"}\n'),
    )
    memory.pipe(f"{root}/corpus/b.jsonl", b'{"id": "m3", "text": "too short"}\n')
    reader = JsonlReader(f"memory:/{root}/corpus/*", source="remote")
    pipeline = Pipeline(
        reader, [toy_steps.MinWords(min_words=4)], Writer(f"memory:/{root}/clean", "jsonl.zst")
    )
    report = LocalExecutor().run(pipeline, tmp_path / "run", progress=False)
    assert report.to_dict()["totals"] == {"in": 3, "kept": 1, "removed": 1, "rejected": 1, "balanced": True}
    assert sorted(memory.ls(f"{root}/clean", detail=False)) == [
        f"{root}/clean/0000{i}.jsonl.zst" for i in (0, 1)
    ]
    assert [d.id for d in read_documents(f"memory:/{root}/clean/*.zst")] == ["m1"]
    memory.rm(root, recursive=True)


def test_a_run_folder_refuses_a_different_pipeline(tmp_path):
    root = make_corpus(tmp_path / "raw")
    LocalExecutor().run(corpus_pipeline(root, tmp_path / "out"), tmp_path / "run", progress=False)
    changed = corpus_pipeline(root, tmp_path / "out")
    changed.steps[1].min_words = 5
    with pytest.raises(PipelineError, match=r"different pipeline .*steps"):
        LocalExecutor().run(changed, tmp_path / "run", progress=False)
    again = LocalExecutor().run(
        corpus_pipeline(root, tmp_path / "out"), tmp_path / "run", progress=False
    )  # nothing left to do
    assert again.kept == 4


def test_a_failing_task_is_reported_and_a_relaunch_redoes_only_it(tmp_path):
    root = make_corpus(tmp_path / "raw")
    flag = tmp_path / "broken"
    flag.write_text("")
    readers = [JsonlReader(str(root / "web" / "*.jsonl")), TextReader(str(root / "books"))]
    step = toy_steps.FailTask(flag=str(flag), trigger="the cat")  # only in task 0
    pipeline = Pipeline(readers, [step], Writer(str(tmp_path / "out")))
    with pytest.raises(
        PipelineError, match=r"(?s)1 task\(s\) of stage 0 failed.*task 0: OSError: disk on fire"
    ):
        LocalExecutor().run(pipeline, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001.jsonl.gz", "00002.jsonl.gz"]
    done = tmp_path / "run" / "stages" / "0" / "done"
    finished = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert sorted(finished) == ["00001.json", "00002.json"]
    flag.unlink()
    report = LocalExecutor().run(pipeline, tmp_path / "run", progress=False)
    assert report.balanced and report.kept == 6
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir() if p.name in finished} == finished


RECIPE = """
inputs:
  - {paths: ["RAW/web/*.jsonl"], source: web}
  - {paths: ["RAW/books"], format: txt}
  - {paths: ["RAW/pages/*.html"], source: pages}
steps:
  - {step: toy_tag}
  - {step: toy_min_words, min_words: 4}
  - {step: toy_text_dedup}
output: {path: OUT, format: jsonl.gz}
run_dir: RUN
imports: [tests.data.toy_steps]
"""


def write_recipe(tmp_path, text=RECIPE):
    root = make_corpus(tmp_path / "raw")
    path = tmp_path / "recipe.yaml"
    text = (
        text.replace("RAW", str(root))
        .replace("OUT", str(tmp_path / "out"))
        .replace("RUN", str(tmp_path / "run"))
    )
    path.write_text(text)
    return path


def test_cli_runs_a_recipe_and_saves_the_resolved_config(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    overrides = ["workers=1", "exclusions=false", "steps.toy_min_words.min_words=6"]
    assert main(["data", "run", str(recipe), *overrides]) == 0
    assert "in 11 = kept 3 + removed 3 + rejected 5 (balanced)" in " ".join(capsys.readouterr().out.split())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["exclusions"] is False and saved["steps"][1] == {"step": "toy_min_words", "min_words": 6}
    assert [d.meta["source"] for d in read_documents(tmp_path / "out")] == ["web", "web", "txt"]
    changed = ["exclusions=false", "steps.toy_min_words.min_words=5"]
    assert main(["data", "run", str(recipe), *changed]) == 1  # a different pipeline in the same run folder
    assert "holds a run of a different pipeline (differs in: steps)" in capsys.readouterr().err


def test_recipe_errors_name_the_step_and_key(tmp_path):
    with pytest.raises(
        ConfigError, match=r"steps\[1\] \(toy_min_words\): unknown argument 'min_wrds'; accepted: min_words"
    ):
        build_step({"step": "toy_min_words", "min_wrds": 3}, 1)
    with pytest.raises(
        ConfigError, match=r"^steps\[2\] \(toy_min_words\): min_words: Value 'many' .* Integer$"
    ):
        build_step({"step": "toy_min_words", "min_words": "many"}, 2)
    assert build_step({"step": "toy_min_words", "min_words": "7"}, 0).min_words == 7  # as from an override
    with pytest.raises(ConfigError, match=r"steps\[0\]: unknown step 'no_such_step'; known steps: .*toy_tag"):
        build_step({"step": "no_such_step"}, 0)
    recipe = write_recipe(tmp_path)
    with pytest.raises(ConfigError, match=r"'steps.toy_nope.x=1': no step 'toy_nope' in this recipe"):
        load_recipe(recipe, ["steps.toy_nope.x=1"])
    with pytest.raises(ConfigError, match=r"steps\[1\] \(toy_min_words\): min_words: Value 'lots'"):
        run_recipe(recipe, ["steps.1.min_words=lots"])
    with pytest.raises(ConfigError, match="executor: 'spark' is not one of"):
        run_recipe(recipe, ["executor=spark"])
    with pytest.raises(ConfigError, match=r"inputs\[0\]: no jsonl files match"):
        run_recipe(data={"inputs": [{"paths": [str(tmp_path / "*.jsonl")], "format": "jsonl"}],
                         "output": {"path": str(tmp_path / "o")}, "run_dir": str(tmp_path / "r")})  # fmt: skip


def test_step_modules_are_found_by_their_registration(tmp_path, monkeypatch):
    package = tmp_path / "stepspkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "found.py").write_text(
        textwrap.dedent(
            """
            from lmforge.data.step import Step, register_step

            @register_step("toy_discovered")
            class Discovered(Step):
                pass
            """
        )
    )
    (package / "other.py").write_text("raise RuntimeError('modules without steps are not imported')\n")
    (package / "needs_extra.py").write_text("import not_installed_lib\n# @register_step(...) below\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    failures = import_step_modules("stepspkg")
    assert "stepspkg.found" in sys.modules and "stepspkg.other" not in sys.modules
    assert failures == {"stepspkg.needs_extra": "No module named 'not_installed_lib'"}
    assert build_step({"step": "toy_discovered"}, 0).name == "toy_discovered"


def test_step_config_is_the_same_in_every_process():
    step = toy_steps.MinWords(min_words=4)
    step.vocabulary = {"zeta", "alpha", "mid"}  # set order depends on the process's hash seed
    step.table = {3: 0.5, 2: (1, 2)}
    step.helper = object()  # its repr holds an address
    step._cache = ["private: not configuration"]
    assert step_config(step) == {
        "helper": "<builtins.object>",
        "min_words": 4,
        "table": {"2": [1, 2], "3": 0.5},
        "vocabulary": ["alpha", "mid", "zeta"],
    }


def test_document_records_round_trip():
    doc = Document("x", "t", {"a": [1]})
    assert doc.to_record() == {"id": "x", "text": "t", "meta": {"a": [1]}}
