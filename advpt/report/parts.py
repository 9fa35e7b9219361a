"""What the report's sections share: the evidence they read, the part each builds, a section's record,
and how an arm and a difference between arms are written."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advpt.names import arm_label

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Evidence:
    """What every section reads: every evaluation row, the headline ones behind Fig. 1-3 and 5
    (:func:`advpt.report.aggregate.headline_rows`), the paper's values (``None``: left out), and the
    pre-training runs' kNN monitor points (:func:`advpt.report.collect.knn_curves`), and the fine-tuning
    runs' convergence (:func:`advpt.report.convergence.convergence`), and the encoders' kNN evaluations
    (:func:`advpt.report.collect.knn_results`)."""

    rows: Sequence[Row]
    headline: Sequence[Row]
    paper: Mapping[str, Any] | None
    curves: Sequence[Row] = ()
    tuned: Sequence[Row] = ()
    knn: Sequence[Row] = ()


@dataclass
class Part:
    """What one section found to show: the rows of its CSV, its lines of summary.md (under its heading),
    its picture (drawn into the path given) or its Markdown table file's text, and notes on what it lacks."""

    rows: Sequence[Row]
    lines: list[str]
    draw: Callable[[Path], Path] | None = None
    table: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Section:
    """One figure or table: its short name (notes, image links), the stem of its files, its heading in
    summary.md, how it is built, the note when nothing can show it (``None``: it is left out silently),
    and whether it shows evaluations (if not, it is built also when there are none)."""

    name: str
    stem: str
    heading: str
    build: Callable[[Evidence], Part | None]
    missing: str | None = None
    of_evaluations: bool = True


def arm(row: Row) -> str:
    return arm_label(row["method"], row["attack"], row["radius"])


def gap(est: Any) -> str:
    """A difference between arms in a table: the value, its interval and which (paired or unpaired)."""
    return "-" if est is None else est.stated()
