"""Pictures and tables shared by every stage: matplotlib Figures without pyplot (Agg, no GUI, no global state)."""

from __future__ import annotations

import io


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
