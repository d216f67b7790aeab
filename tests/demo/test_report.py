from lmforge.demo.report import StageCard, Table, format_seconds, format_value, plot_comparison, write_report


def test_report_card_markdown_and_html(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    labels = []
    savefig = Figure.savefig
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda fig, *a, **k: labels.append(fig.axes[0].get_ylabel()) or savefig(fig, *a, **k),
    )
    png = plot_comparison(
        {"addition": {"base": 0.0, "SFT": 0.9}, "reverse": {"base": 0.1}},
        tmp_path / "plots" / "loss.png",
        "eval",
        ylabel="exact match",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["exact match"]  # the axis says what the bars measure
    cards = [
        StageCard("data", "Data pipeline", 12.5, {"documents kept": 1200, "removed: dedup": 34}),
        StageCard(
            "eval",
            "Evaluation",
            65.0,
            tables=[Table("exact match", ["task", "base", "sft"], [["addition", 0.01, 0.93]])],
            images=["plots/loss.png"],
            note="held-out <examples>",
        ),
    ]
    md_path, html_path = write_report(tmp_path, "Demo run", cards, {"total time": "1m 17.5s"})
    md = md_path.read_text()
    assert "# Demo run" in md and "## Data pipeline" in md and "| documents kept | 1,200 |" in md
    assert "| addition | 0.01 | 0.93 |" in md and "![loss](plots/loss.png)" in md
    assert "| Evaluation | 1m 05.0s |" in md
    page = html_path.read_text()
    assert "<img src='plots/loss.png'" in page and "held-out &lt;examples&gt;" in page
    assert "<td>0.93</td>" in page


def test_formatting():
    assert format_seconds(3.24) == "3.2s" and format_seconds(3.26) == "3.3s"
    assert format_seconds(65.04) == "1m 05.0s"
    assert format_seconds(None) == "n/a"
    assert format_value(1234567) == "1,234,567"
    assert format_value(0.5) == "0.5"
    assert format_value(2.5e-5) == "2.5e-05"
    assert format_value(True) == "yes"
    assert format_value(float("nan")) == "n/a"
