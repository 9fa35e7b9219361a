"""The ``report`` command: the paper's figures and tables from whatever evaluation runs it finds.

``fig1_eps.png``, ``fig2_variants.png``, ``fig3_layer_decay.png``, ``fig5_robust_vs_decay.png``,
``table1_transfer.md`` / ``.csv``, ``claims.csv`` (the paper's claims, each judged by the interval of
the difference that tests it: :mod:`advpt.report.claims`, also the table summary.md opens with),
``knn_pretrain.png`` (the pre-training monitor's kNN top-1 against the
epoch), each figure's numbers as CSV, and ``summary.md`` with every number behind them. Every number
carries its sample size and a 95 % interval (:mod:`advpt.report.aggregate`); the paper's own values
(``paper.json``) are shown beside ours where the grid matches. A figure whose runs are missing is
skipped with a note. The figures and tables are listed, and built, in
:mod:`advpt.report.sections`; this module writes each the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from advpt.errors import UserError
from advpt.files import write_text
from advpt.report.aggregate import headline_rows
from advpt.report.claims import claim_rows, claims_table, judge, premise_by_set
from advpt.report.collect import collect, knn_curves, knn_results
from advpt.report.convergence import convergence as fine_tuning_runs
from advpt.report.sections import SECTIONS, Evidence, Section, table1_markdown
from advpt.report.tables import write_csv

__all__ = ["build_report", "check", "paper_values", "run", "table1_markdown"]

PAPER = Path(__file__).with_name("paper.json")
Note = Callable[[str], None]
READING = (
    "Top-1 in percent with its 95 % interval: `m [lo, hi]` (Wilson, for one accuracy of one seed) or "
    "`m ± half-width` (otherwise: a "
    "normal interval adding test-set sampling and, with several seeds, the spread between seeds; "
    "`n` = images behind each number). A difference between two arms, in points, says which interval it "
    "has: `paired` (both arms scored on the same images, `outcomes.npz`: a bootstrap over images, "
    "stratified by set, and over seeds when there are several; with McNemar's exact p-value for one set "
    "of one seed) or `unpaired` (the two arms' intervals combined as if independent: wider, used where "
    "no outcomes exist). A difference whose interval holds 0 is not evidence of one."
)
"""How to read the report's numbers: summary.md's first paragraph."""


def paper_values() -> dict[str, Any]:
    return json.loads(PAPER.read_text())


def write_section(
    section: Section, evidence: Evidence, out: Path, skip: Note
) -> tuple[list[Path], list[str]]:
    """One figure or table into ``out``: its picture or Markdown table, its CSV, and its lines of
    summary.md (none, with a note, when no run shows it); the files written and the lines."""
    part = section.build(evidence)
    if part is None:
        if section.missing is not None:
            skip(f"{section.name}: {section.missing}")
        return [], []
    for message in part.notes:
        skip(f"{section.name}: {message}")
    written: list[Path] = []
    lines = ["", f"## {section.heading}", ""]
    if part.draw is not None:
        written.append(part.draw(out / f"{section.stem}.png"))
        lines += [f"![{section.name}]({section.stem}.png)", ""]
    if part.table is not None:
        written.append(write_text(out / f"{section.stem}.md", part.table + "\n"))
    written.append(write_csv(out / f"{section.stem}.csv", part.rows))
    return written, lines + part.lines


def build_report(
    roots: Sequence[Path | str], out: Path, paper: bool = True, note: Note = print
) -> list[Path]:
    """Collect the evaluation runs under ``roots`` and write the report into ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    def skip(message: str) -> None:
        notes.append(message)
        note(message)

    rows = collect(roots, skip)
    headline, data = headline_rows(rows)
    curves = knn_curves(roots, [r["pretrain"] for r in rows])
    runs = fine_tuning_runs(rows)  # each fine-tuning run's metrics.csv, read once
    encoders = knn_results(roots)
    evidence = Evidence(rows, headline, paper_values() if paper else None, curves, runs, encoders)
    claims = judge(rows, headline) if headline else []
    md = ["# advpt report", "", "## The paper's claims", "", *claims_table(claims)]
    by_set = premise_by_set(headline) if claims else []
    if by_set:
        md += ["", *by_set]
    if runs:
        flagged = [r for r in runs if r["flagged"]]
        md += [
            "",
            f"Fine-tuning runs still gaining over their last epochs: {len(flagged)} of {len(runs)}"
            + (" (see *Fine-tuning: convergence*)." if flagged else "."),
        ]
    short = [r for r in rows if r.get("cut_short")]
    if short:  # test runs of a few steps beside real ones: their numbers are not results
        named = sorted({c for r in short for c in r["cut_short"]})
        md += [
            "",
            f"**{len(short)} of {len(rows)} evaluations come from runs cut short by trainer.max_steps** "
            "(test runs?), and are in every table and figure below: "
            + "; ".join(named[:5])
            + (f"; and {len(named) - 5} more" if len(named) > 5 else "")
            + ". Pass the folders of real runs alone to leave them out.",
        ]
    md += ["", f"Runs: {', '.join(str(r) for r in roots)}. Evaluations found: {len(rows)}.", "", READING]
    written: list[Path] = []
    if claims:
        written.append(write_csv(out / "claims.csv", claim_rows(claims)))
    if not headline:
        skip("no evaluation runs found: none of the paper's figures (run advpt evaluate, or advpt study)")
    else:
        md += ["", f"Fine-tuning data of Fig. 1-3 and 5: `{data}` ({len(headline)} fine-tuned models)."]
    for section in SECTIONS:
        if headline or not section.of_evaluations:
            files, lines = write_section(section, evidence, out, skip)
            written += files
            md += lines
    if notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    written.append(write_text(out / "summary.md", "\n".join(md) + "\n"))
    return written


def check(cfg: Any, touch_data: bool = True) -> Any:
    runs = cfg.runs if not isinstance(cfg.runs, str) else [cfg.runs]
    missing = [str(r) for r in runs if not Path(str(r)).expanduser().exists()]
    if missing and len(missing) == len(runs):  # some missing among others: skipped with a note
        raise UserError(f"runs={missing[0]} does not exist (give folders holding evaluation runs)")
    return cfg


def run(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from advpt.runs import shown, summary

    check(cfg)
    out = Path(HydraConfig.get().runtime.output_dir)
    runs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    written = build_report(runs, out, paper=bool(cfg.paper), note=lambda m: print(f"advpt report: {m}"))
    pngs = sum(p.suffix == ".png" for p in written)
    print(
        summary(
            "report",
            out,
            f"{pngs} figures and {len(written) - pngs} tables",
            f"open {shown(out / 'summary.md')}",
        )
    )
