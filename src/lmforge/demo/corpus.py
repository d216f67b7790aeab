"""The demo's default corpus: text that every Python installation carries, read from disk.

From each module of the running interpreter's standard library we make up to three documents:

- ``prose``: its docstrings (module, classes, functions) joined as paragraphs;
- ``code``: its source code;
- ``html``: for a share of modules, a small generated HTML page around the docstrings (navigation,
  header, footer boilerplate), so the pipeline's HTML extraction has real work to do.

Nothing touches the network. Documents are ``{"id", "text", "meta"}`` JSONL records; ``meta.format`` is
``"html"`` for the HTML pages and ``"text"`` otherwise, ``meta.kind`` is ``prose``/``code``/``html``.
"""

from __future__ import annotations

import ast
import html
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Packages that are tests, demos, GUI tooling or vendored data rather than library text.
SKIP_PARTS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path | None = None) -> list[Path]:
    """Source files of the standard library without tests and vendored packages.

    The order is fixed but mixed (by a hash of the relative path), so a byte budget takes modules from all
    over the library rather than those whose names start with "a".
    """
    root = root or stdlib_dir()
    paths = [p for p in root.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(paths, key=lambda p: (zlib.crc32(str(p.relative_to(root)).encode()), str(p)))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` for the module and every class and function, in source order."""
    found: list[tuple[str, str]] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        found.append(("", module_doc))

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    found.append((name, doc))
                visit(child, name + ".")

    visit(tree, "")
    return found


def prose_text(module: str, docs: list[tuple[str, str]]) -> str:
    paragraphs = []
    for name, doc in docs:
        paragraphs.append(f"{module}.{name}\n\n{doc}" if name else f"{module}\n\n{doc}")
    return "\n\n".join(paragraphs) + "\n"


def html_page(module: str, docs: list[tuple[str, str]]) -> str:
    """A documentation page with the boilerplate (navigation, footer) a real site would carry."""
    sections = []
    for name, doc in docs:
        heading = html.escape(f"{module}.{name}" if name else module)
        body = "".join(f"<p>{html.escape(par)}</p>\n" for par in doc.split("\n\n") if par.strip())
        sections.append(f"<section><h2>{heading}</h2>\n{body}</section>")
    title = html.escape(module)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title} - Python documentation</title></head>\n<body>\n"
        "<nav><a href='/'>Home</a> | <a href='/library'>Library</a> | <a href='/search'>Search</a></nav>\n"
        f"<main><article><h1>{title}</h1>\n" + "\n".join(sections) + "\n</article></main>\n"
        "<footer>Generated from the docstrings of the Python standard library. "
        "Copyright the Python Software Foundation.</footer>\n</body></html>\n"
    )


def stdlib_documents(
    max_bytes: int | None = None,
    html_every: int = 5,
    root: Path | None = None,
    min_chars: int = 200,
) -> Iterator[dict[str, Any]]:
    """Yield corpus records until ``max_bytes`` of text have been produced (all modules when None).

    Modules are visited in :func:`stdlib_modules` order, so the same interpreter gives the same corpus. Every
    ``html_every``-th module with docstrings also yields an HTML page (0 disables them).
    """
    root = root or stdlib_dir()
    produced = 0
    with_docs = 0
    for path in stdlib_modules(root):
        if max_bytes is not None and produced >= max_bytes:
            return
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # unreadable or not parseable by this interpreter: not corpus material
        module = module_name(path, root)
        rel = str(path.relative_to(root))
        docs = docstrings(tree)
        records = []
        if docs:
            with_docs += 1
            records.append(("prose", prose_text(module, docs), "text"))
            if html_every and with_docs % html_every == 0:
                records.append(("html", html_page(module, docs), "html"))
        records.append(("code", source, "text"))
        for kind, text, fmt in records:
            if len(text) < min_chars:
                continue
            if max_bytes is not None and produced >= max_bytes:
                return
            produced += len(text.encode("utf-8"))
            yield {
                "id": f"stdlib/{kind}/{module}",
                "text": text,
                "meta": {"source": "python-stdlib", "kind": kind, "format": fmt, "path": rel},
            }
