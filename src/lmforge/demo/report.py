"""The report card: one page (Markdown and HTML) that tells what every stage of a run did.

A stage contributes a :class:`StageCard`: its wall time, key numbers, tables and pictures. Pictures are
PNG files in the run folder (the trainer's loss curves, and charts drawn here with matplotlib's Agg
backend, so no display is needed) and are linked by relative path, so the folder can be moved or zipped
as a whole.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class StageCard:
    name: str
    title: str
    seconds: float | None = None
    numbers: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # paths relative to the run folder
    note: str = ""


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"


def _md_cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(title: str, cards: Sequence[StageCard], summary: Mapping[str, Any]) -> str:
    lines = [f"# {title}", ""]
    lines += _md_table(["", ""], [[k, v] for k, v in summary.items()])
    lines += ["", "## Stages", ""]
    lines += _md_table(["stage", "time"], [[c.title, format_seconds(c.seconds)] for c in cards])
    for card in cards:
        lines += ["", f"## {card.title}", ""]
        if card.note:
            lines += [card.note, ""]
        lines.append(f"Time: {format_seconds(card.seconds)}")
        if card.numbers:
            lines += ["", *_md_table(["", ""], [[k, v] for k, v in card.numbers.items()])]
        for table in card.tables:
            lines += ["", f"**{table.title}**", "", *_md_table(table.columns, table.rows)]
        for image in card.images:
            lines += ["", f"![{Path(image).stem}]({image})"]
    return "\n".join(lines) + "\n"


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table>{head}{body}</table>"


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}section{margin-top:2em}"
)


def render_html(title: str, cards: Sequence[StageCard], summary: Mapping[str, Any]) -> str:
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table([], [[k, v] for k, v in summary.items()], header=False),
        "<h2>Stages</h2>",
        _html_table(["stage", "time"], [[c.title, format_seconds(c.seconds)] for c in cards]),
    ]
    for card in cards:
        parts.append(f"<section id='{html.escape(card.name)}'><h2>{html.escape(card.title)}</h2>")
        if card.note:
            parts.append(f"<p>{html.escape(card.note)}</p>")
        parts.append(f"<p>Time: {html.escape(format_seconds(card.seconds))}</p>")
        if card.numbers:
            parts.append(_html_table([], [[k, v] for k, v in card.numbers.items()], header=False))
        for table in card.tables:
            parts.append(f"<h3>{html.escape(table.title)}</h3>" + _html_table(table.columns, table.rows))
        for image in card.images:
            parts.append(f"<p><img src='{html.escape(image)}' alt='{html.escape(Path(image).stem)}'></p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def plot_comparison(
    groups: Mapping[str, Mapping[str, float]], path: str | Path, title: str, ylabel: str
) -> Path:
    """A grouped bar chart: one group per row name, one bar per series (e.g. base and SFT scores); the
    y axis is labelled ``ylabel`` (say what the bars measure when groups use different metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(names)), 3.8), dpi=100)
    for i, label in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(names))]
        ax.bar(xs, [groups[n].get(label, 0.0) for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    run_dir: str | Path, title: str, cards: Sequence[StageCard], summary: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into the run folder."""
    run_dir = Path(run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(render_markdown(title, cards, summary), encoding="utf-8")
    html_path.write_text(render_html(title, cards, summary), encoding="utf-8")
    return md_path, html_path
