"""Plain-text tables for the terminal and Markdown reports."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    """Right-align numbers, left-align text; `markdown=True` gives a GitHub table."""
    cells = [[fmt_cell(c) for c in row] for row in rows]
    numeric = [
        all(isinstance(r[i], int | float) for r in rows if i < len(r)) if rows else False
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric))
        + "|"
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def fmt_cell(value) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
