"""The token-weight heat-map page: each forget sample's tokens coloured by their objective weight,
one line per epoch."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence


def _sample_table(index, rows: Sequence[dict], top: float) -> list:
    """The HTML lines of forget sample ``index``: one table row per epoch."""
    parts = [f"<h3>forget sample {index}</h3><table>"]
    for r in sorted((r for r in rows if r["index"] == index), key=lambda r: r["epoch"]):
        cells = []
        for tok, w in zip(r["tokens"], r["weights"]):
            a = max(0.0, min(1.0, w / top))
            cells.append(f"<span title='{w:.3g}' style='background:rgba(220,30,30,{a:.3f})'>"
                         f"{html.escape(tok)}</span>")
        parts.append(f"<tr><td>epoch {r['epoch']}</td>"
                     f"<td style='font-family:monospace'>{' '.join(cells)}</td></tr>")
    parts.append("</table>")
    return parts


def token_weights_html(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Heat-map of per-token objective weights of a few forget samples, one line per epoch."""
    if not rows:
        return False
    top = max(max(r["weights"]) for r in rows) or 1.0
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h2>{html.escape(title)}</h2><p>colour: token weight / {top:.3g} (white 0, red max)</p>"]
    for index in sorted({r["index"] for r in rows}):
        parts += _sample_table(index, rows, top)
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return True
