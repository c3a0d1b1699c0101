"""Pictures and tables shared by every stage: matplotlib Figures without pyplot (Agg, no GUI, no global state),
and the two-column rich tables the commands print as their summaries."""

from __future__ import annotations

import io
from collections.abc import Iterable

from rich.table import Table


def figure_png(figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def key_value_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A summary as (name, value) lines under a title, without a header row."""
    table = Table(title=title, show_header=False)
    for name, value in rows:
        table.add_row(name, value)
    return table
