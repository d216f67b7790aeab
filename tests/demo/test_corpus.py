import ast
import itertools

from lmforge.demo.corpus import docstrings, html_page, stdlib_dir, stdlib_documents, stdlib_modules


def test_docstrings_in_source_order_with_qualified_names():
    tree = ast.parse(
        '"""Mod."""\nclass A:\n    """Cls."""\n    def f(self):\n        """Meth."""\ndef g():\n    pass\n'
    )
    assert docstrings(tree) == [("", "Mod."), ("A", "Cls."), ("A.f", "Meth.")]


def test_html_page_escapes_and_wraps_in_boilerplate():
    page = html_page("mod", [("f", "a < b\n\nsecond paragraph")])
    assert "<p>a &lt; b</p>" in page and "<p>second paragraph</p>" in page
    assert "<nav>" in page and "<footer>" in page and "<h2>mod.f</h2>" in page


def test_stdlib_documents_are_real_files_of_each_kind_and_bounded():
    modules = stdlib_modules()
    assert len(modules) > 100
    assert not any({"test", "site-packages"} & set(p.relative_to(stdlib_dir()).parts) for p in modules)
    docs = list(itertools.islice(stdlib_documents(max_bytes=150_000), 400))
    kinds = {d["meta"]["kind"] for d in docs}
    assert kinds == {"prose", "code", "html"}
    assert sum(len(d["text"].encode()) for d in docs[:-1]) < 150_000
    assert len({d["id"] for d in docs}) == len(docs)
    code = next(d for d in docs if d["meta"]["kind"] == "code")
    assert code["text"] == (stdlib_dir() / code["meta"]["path"]).read_text(encoding="utf-8")
    for doc in docs:
        assert doc["meta"]["format"] == ("html" if doc["meta"]["kind"] == "html" else "text")
    assert docs == list(itertools.islice(stdlib_documents(max_bytes=150_000), 400))
