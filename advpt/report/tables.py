"""The report's tables as text: a CSV file of a section's numbers, and a Markdown table for summary.md."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advpt.files import atomic_path
from advpt.report.intervals import Estimate


def _spread(name: str, est: Estimate) -> dict[str, Any]:
    """An estimate's columns: its value, interval and the images behind it (a difference's also which
    interval, paired or unpaired, and McNemar's p-value)."""
    columns = {
        name: round(est.mean, 6),
        f"{name}_lo": round(est.lo, 6),
        f"{name}_hi": round(est.hi, 6),
        f"{name}_images": est.images,
    }
    if est.interval is not None:
        columns |= {f"{name}_interval": est.interval, f"{name}_p": est.p}
    return columns


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows of plain values and :class:`Estimate`s (each spread over value, lo, hi, images, seeds; an
    estimate per evaluation set, a dict, over value, lo, hi and images)."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, Estimate):
                out.update({**_spread(key, value), f"{key}_seeds": value.seeds})
            elif isinstance(value, dict):
                for name, est in value.items():
                    out.update(_spread(name, est))
            else:
                out[key] = value
        flat.append(out)
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return path


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
