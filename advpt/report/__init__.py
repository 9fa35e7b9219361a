"""The ``report`` command: the paper's figures and tables from whatever evaluation runs it finds.

``fig1_eps.png``, ``fig2_variants.png``, ``fig3_layer_decay.png``, ``fig5_robust_vs_decay.png``,
``table1_transfer.md`` / ``.csv``, each figure's numbers as CSV, and ``summary.md`` with every number
behind them. Every number carries its sample size and a 95 % interval (:mod:`advpt.report.aggregate`);
the paper's own values (``paper.json``) are shown beside ours where the grid matches. A figure whose
runs are missing is skipped with a note.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from advpt.errors import UserError
from advpt.files import atomic_path, write_text
from advpt.report import aggregate as agg
from advpt.report.aggregate import ATTACK_LABEL, METHOD_LABEL, Estimate
from advpt.report.collect import collect

PAPER = Path(__file__).with_name("paper.json")
Note = Callable[[str], None]


def paper_values() -> dict[str, Any]:
    return json.loads(PAPER.read_text())


def _csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows of plain values and :class:`Estimate`s (each spread over value, lo, hi, images, seeds)."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, Estimate):
                out.update(
                    {
                        key: round(value.mean, 6),
                        f"{key}_lo": round(value.lo, 6),
                        f"{key}_hi": round(value.hi, 6),
                        f"{key}_images": value.images,
                        f"{key}_seeds": value.seeds,
                    }
                )
            elif isinstance(value, dict):
                for name, est in value.items():
                    out.update(
                        {
                            f"{name}": round(est.mean, 6),
                            f"{name}_lo": round(est.lo, 6),
                            f"{name}_hi": round(est.hi, 6),
                            f"{name}_images": est.images,
                        }
                    )
            else:
                out[key] = value
        flat.append(out)
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return path


def _arm(row: Mapping[str, Any]) -> str:
    label = (
        f"{METHOD_LABEL.get(row['method'], row['method'])} {ATTACK_LABEL.get(row['attack'], row['attack'])}"
    )
    return label if row["attack"] == "none" else f"{label} {row['radius']}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table1_markdown(cells: Sequence[Mapping[str, Any]], paper: Mapping[str, Any] | None) -> str:
    """Table 1's layout: a row per dataset x optimiser, a column per method x attack, the average last."""
    columns = sorted({(c["method"], c["attack"]) for c in cells}, key=lambda k: agg.order((*k, "-")))
    columns.sort(
        key=lambda k: (
            agg.METHOD_ORDER.index(k[0]) if k[0] in agg.METHOD_ORDER else 9,
            agg.ATTACK_ORDER.index(k[1]),
        )
    )
    radius = {(c["method"], c["attack"]): c["radius"] for c in cells}
    datasets = list(dict.fromkeys(c["data"] for c in cells))
    optims = sorted({c["optim"] for c in cells})
    index = {(c["data"], c["method"], c["attack"], c["optim"]): c for c in cells}
    header = ["dataset", "optimiser"] + [
        f"{METHOD_LABEL.get(m, m)} {ATTACK_LABEL[a]}" + ("" if a == "none" else f" {radius[(m, a)]}")
        for m, a in columns
    ]
    ours = (paper or {}).get("table1", {})
    rows = []
    for data in [*datasets, "average"]:
        for optim in optims:
            row = [data, optim]
            for m, a in columns:
                if data == "average":
                    present = [index[(d, m, a, optim)] for d in datasets if (d, m, a, optim) in index]
                    if len(present) != len(datasets) or not present:
                        row.append("-")
                        continue
                    ests = [c["top1"] for c in present]
                    value = sum(e.mean for e in ests) / len(ests)
                    half = (sum(e.half**2 for e in ests) ** 0.5) / len(ests)
                    text = f"{100 * value:.2f} ± {100 * half:.2f}"
                else:
                    cell = index.get((data, m, a, optim))
                    text = "-" if cell is None else f"{cell['top1'].pct()} (n={cell['top1'].images})"
                theirs = ours.get(data, {}).get(m, {}).get(a, {}).get(optim)
                # the paper's average is over its five datasets: shown only beside an average of the same five
                same_grid = data != "average" or set(datasets) == set(ours) - {"average"}
                if theirs is not None and paper is not None and same_grid:
                    text += f" [paper {theirs:.2f}]"
                row.append(text)
            rows.append(row)
    return _md_table(header, rows)


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
    theirs = paper_values() if paper else None
    written: list[Path] = []
    md = [
        "# advpt report",
        "",
        f"Runs: {', '.join(str(r) for r in roots)}. Evaluations found: {len(rows)}.",
        "",
    ]
    md.append(
        "Top-1 in percent with its 95 % interval: `m [lo, hi]` (Wilson, for one accuracy of one seed) or "
        "`m ± half-width` (otherwise: a "
        "normal interval adding test-set sampling and, with several seeds, the spread between seeds; "
        "`n` = images behind each number). Gaps smaller than both intervals are not evidence of a difference."
    )
    main, data = agg.headline_rows(rows)
    if not main:
        skip("no evaluation runs found: nothing to draw (run advpt evaluate, or advpt study)")
    else:
        md += ["", f"Fine-tuning data of Fig. 1-3 and 5: `{data}` ({len(main)} fine-tuned models)."]
        table, base = agg.fig1(main)
        if table:
            from advpt.report import plots

            if base is None:
                skip("fig1: no from-scratch model (pretrained=none) found: plotting raw averages")
            written.append(plots.fig1(table, base, out / "fig1_eps.png"))
            written.append(_csv(out / "fig1_eps.csv", table))
            md += ["", "## Fig. 1: average accuracy against the radius", "", "![fig1](fig1_eps.png)", ""]
            if base is not None:
                md.append(f"Scratch model's average: {base.pct()} %.")
                md.append("")
            md.append(
                _md_table(
                    ["arm", "layer decay", "average %", "− scratch, points", "n per seed", "seeds"],
                    [
                        [
                            _arm(r),
                            f"{r['layer_decay']:g}",
                            r["average"].pct(),
                            r["minus_scratch"].pct() if r["minus_scratch"] else "-",
                            r["average"].images,
                            r["average"].seeds,
                        ]
                        for r in table
                    ],
                )
            )
            best = agg.best_by_arm(rows)
            if theirs is not None:
                from advpt.report.collect import radius_label

                md += ["", "Best radius per method and attack, ours against the paper's:", ""]
                md.append(
                    _md_table(
                        ["method", "attack", "ours", "paper"],
                        [
                            [
                                METHOD_LABEL.get(m, m),
                                ATTACK_LABEL[a],
                                radius_label(a, eps),
                                theirs["best_radius"].get(a, {}).get(m, "-"),
                            ]
                            for (m, a), eps in sorted(best.items(), key=lambda kv: agg.order((*kv[0], "-")))
                            if a != "none"
                        ],
                    )
                )
                md += ["", "The paper's claims on this figure:", *[f"- {c}" for c in theirs["fig1_claims"]]]
        columns = agg.fig2(main)
        if columns:
            from advpt.report import plots

            written.append(plots.fig2(columns, out / "fig2_variants.png"))
            written.append(_csv(out / "fig2_variants.csv", columns))
            sets = list(dict.fromkeys(n for c in columns for n in c["sets"]))
            md += [
                "",
                "## Fig. 2: each evaluation set, best radius of each method and attack",
                "",
                "![fig2](fig2_variants.png)",
                "",
            ]
            md.append(
                _md_table(
                    ["arm", *sets, "average"],
                    [
                        [
                            _arm(c),
                            *[
                                c["sets"][s].pct() + f" (n={c['sets'][s].images})" if s in c["sets"] else "-"
                                for s in sets
                            ],
                            c["average"].pct(),
                        ]
                        for c in columns
                    ],
                )
            )
        entries = agg.fig3(main)
        if entries:
            from advpt.report import plots

            written.append(plots.fig3(entries, out / "fig3_layer_decay.png"))
            written.append(_csv(out / "fig3_layer_decay.csv", entries))
            sets = list(dict.fromkeys(n for e in entries for n in e["sets"]))
            md += ["", "## Fig. 3: layer-wise lr decay", "", "![fig3](fig3_layer_decay.png)", ""]
            md.append(
                _md_table(
                    ["model", "γ", *sets, "average"],
                    [
                        [
                            _arm(e),
                            f"{e['layer_decay']:g}",
                            *[e["sets"][s].pct() if s in e["sets"] else "-" for s in sets],
                            e["average"].pct(),
                        ]
                        for e in entries
                    ],
                )
            )
            if theirs is not None:
                md += ["", "The paper's claims:", *[f"- {c}" for c in theirs["fig3_claims"]]]
        else:
            skip("fig3: no adversarially pre-trained model was fine-tuned with two or more layer decays")
        points = agg.fig5(main)
        if points:
            from advpt.report import plots

            written.append(plots.fig5(points, out / "fig5_robust_vs_decay.png"))
            written.append(_csv(out / "fig5_robust_vs_decay.csv", points))
            md += [
                "",
                "## Fig. 5: robust accuracy against the l2 radius, per layer decay",
                "",
                "![fig5](fig5_robust_vs_decay.png)",
                "",
            ]
            md.append(
                _md_table(
                    ["model", "γ", "l2 radius", "robust top-1 %", "n"],
                    [
                        [
                            _arm(p),
                            f"{p['layer_decay']:g}",
                            p["eval_radius"],
                            p["robust"].pct(),
                            p["robust"].images,
                        ]
                        for p in points
                    ],
                )
            )
        else:
            skip("fig5: no l2 robust accuracy for a model fine-tuned with two or more layer decays")
        cells = agg.table1(rows, agg.best_by_arm(rows))
        if cells:
            written.append(write_text(out / "table1_transfer.md", table1_markdown(cells, theirs) + "\n"))
            written.append(
                _csv(
                    out / "table1_transfer.csv",
                    [
                        {
                            **c,
                            "paper": (
                                (theirs or {})
                                .get("table1", {})
                                .get(c["data"], {})
                                .get(c["method"], {})
                                .get(c["attack"], {})
                                .get(c["optim"])
                            ),
                        }
                        for c in cells
                    ],
                )
            )
            md += [
                "",
                "## Table 1: transfer (test top-1 of the best radius of each method and attack)",
                "",
                table1_markdown(cells, theirs),
            ]
            if theirs is not None and not any(c["data"] in theirs["table1"] for c in cells):
                md += [
                    "",
                    "None of these datasets is in the paper's Table 1; its values are in "
                    "`advpt/report/paper.json`.",
                ]
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
