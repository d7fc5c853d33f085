"""A single self-contained HTML report per run (figures inlined as base64 PNG,
so the one file can be mailed or attached to a ticket)."""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from trd_hpc.config import flatten

# Groups shown first, in this order; everything else follows alphabetically.
GROUP_ORDER = ("test", "calibrated", "baselines", "val", "train", "importance", "cv")
# Lists longer than this (curve arrays) are summarised rather than printed.
MAX_LIST = 12

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}
td.v{text-align:right;font-family:monospace}
figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:12px;color:#555;text-align:center}
pre{background:#f5f5f5;padding:0.8em;font-size:12px;overflow:auto}
.note{color:#555}
"""


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, int):
        return str(v)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar
        return format_value(v.item())
    if isinstance(v, (list, tuple)) or hasattr(v, "tolist"):
        v = list(v.tolist() if hasattr(v, "tolist") else v)
        if len(v) > MAX_LIST:
            return f"[{len(v)} values]"
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group), "") if group in GROUP_ORDER else (len(GROUP_ORDER), group)


def _metrics_html(metrics: Mapping[str, Any]) -> str:
    flat = flatten(metrics)
    groups: dict[str, list[tuple[str, Any]]] = {}
    for key, v in flat.items():
        head, _, rest = key.partition(".")
        # A top-level scalar (no dot) goes to a "summary" group.
        group, name = (head, rest) if rest else ("summary", head)
        groups.setdefault(group, []).append((name, v))
    parts = []
    for group in sorted(groups, key=lambda g: (-1, "") if g == "summary" else _group_rank(g)):
        rows = "".join(
            f'<tr><td>{html.escape(name)}</td><td class="v">{html.escape(format_value(v))}</td></tr>'
            for name, v in groups[group]
        )
        parts.append(f"<h3>{html.escape(group)}</h3>\n<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
    return "\n".join(parts)


def _figures_html(figures: Mapping[str, Path]) -> str:
    parts = []
    for name, p in figures.items():
        p = Path(p)
        cap = html.escape(name)
        if not p.is_file():
            parts.append(f'<p class="note">figure {cap}: missing ({html.escape(str(p))})</p>')
            continue
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'
        )
    return "\n".join(parts)


def write_report(
    run_dir: Path,
    title: str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, Path],
    config_yaml: str,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``run_dir/report.html`` and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Generated {stamp} from {html.escape(str(run_dir))}</p>
{f"<h2>Notes</h2><ul>{notes_html}</ul>" if notes else ""}
<h2>Metrics</h2>
{_metrics_html(metrics)}
<h2>Figures</h2>
{_figures_html(figures)}
<h2>Configuration</h2>
<details><summary>config.yaml</summary><pre>{html.escape(config_yaml)}</pre></details>
</body></html>
"""
    out = run_dir / "report.html"
    from trd_hpc.fsio import atomic_write_text

    atomic_write_text(out, doc)  # a reader never sees a half-written report
    return out
