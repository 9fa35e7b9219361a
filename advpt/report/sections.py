"""The paper's figures and tables, one :class:`Section` each: what it shows of the evaluation runs.

Each section's ``build`` turns the runs into a :class:`Part` (its numbers, its picture or Markdown table,
its lines of summary.md), or ``None`` when no run can show it; :data:`SECTIONS` lists them in the order
of the report, and :func:`advpt.report.build_report` writes each one the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from advpt.names import ATTACK_LABEL, ATTACKS, METHOD_LABEL, arm_label
from advpt.report import aggregate as agg
from advpt.report import plots
from advpt.report.collect import radius_label, radius_value
from advpt.report.differences import fallbacks
from advpt.report.parts import Evidence, Part, Row, Section
from advpt.report.parts import arm as _arm
from advpt.report.parts import gap as _gap
from advpt.report.readings import convergence, frozen, knn
from advpt.report.tables import md_table


def _claims(intro: str, claims: Sequence[str]) -> list[str]:
    return ["", intro, *[f"- {c}" for c in claims]]


def paper_top1(paper: Mapping[str, Any] | None, data: str, method: str, attack: str, optim: str) -> Any:
    """The paper's Table 1 value for one cell (``None`` where it has none)."""
    table = (paper or {}).get("table1", {})
    return table.get(data, {}).get(method, {}).get(attack, {}).get(optim)


# -- the sections --------------------------------------------------------------------------------
def fig1(ev: Evidence) -> Part | None:
    table, base = agg.fig1(ev.headline)
    if not table:
        return None
    notes = (
        [] if base is not None else ["no from-scratch model (pretrained=none) found: plotting raw averages"]
    )
    notes += fallbacks([r[k] for r in table for k in ("minus_scratch", "minus_nominal")])
    lines = [f"Scratch model's average: {base.pct()} %.", ""] if base is not None else []
    lines.append(
        md_table(
            [
                "arm",
                "layer decay",
                "average %",
                "− scratch, points",
                "− nominal, points",
                "n per seed",
                "seeds",
            ],
            [
                [
                    _arm(r),
                    f"{r['layer_decay']:g}",
                    r["average"].pct(),
                    _gap(r["minus_scratch"]),
                    _gap(r["minus_nominal"]),
                    r["average"].images,
                    r["average"].seeds,
                ]
                for r in table
            ],
        )
    )
    if ev.paper is not None:
        best = agg.best_by_arm(ev.rows)
        # the label the runs carry (with the paper's units beside a radius used at another image size)
        shown = {(r["method"], r["attack"], radius_value(r["eps"])): r["radius"] for r in ev.rows}
        lines += ["", "Best radius per method and attack, ours against the paper's:", ""]
        lines.append(
            md_table(
                ["method", "attack", "ours", "paper"],
                [
                    [
                        METHOD_LABEL.get(m, m),
                        ATTACK_LABEL[a],
                        shown.get((m, a, radius_value(eps)), radius_label(a, eps)),
                        ev.paper["best_radius"].get(a, {}).get(m, "-"),
                    ]
                    for (m, a), eps in sorted(best.items(), key=lambda kv: agg.order((*kv[0], "-")))
                    if a != "none"
                ],
            )
        )
        lines += _claims("The paper's claims on this figure:", ev.paper["fig1_claims"])
    return Part(table, lines, draw=lambda path: plots.fig1(table, base, path), notes=notes)


def fig2(ev: Evidence) -> Part | None:
    columns = agg.fig2(ev.headline)
    if not columns:
        return None
    sets = list(dict.fromkeys(n for c in columns for n in c["sets"]))
    lines = [
        md_table(
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
    ]
    return Part(columns, lines, draw=lambda path: plots.fig2(columns, path))


def fig3(ev: Evidence) -> Part | None:
    entries = agg.fig3(ev.headline)
    if not entries:
        return None
    sets = list(dict.fromkeys(n for e in entries for n in e["sets"]))
    lines = [
        md_table(
            ["model", "γ", *sets, "average", "− smallest γ, points"],
            [
                [
                    _arm(e),
                    f"{e['layer_decay']:g}",
                    *[e["sets"][s].pct() if s in e["sets"] else "-" for s in sets],
                    e["average"].pct(),
                    _gap(e["minus_smallest_decay"]),
                ]
                for e in entries
            ],
        )
    ]
    if ev.paper is not None:
        lines += _claims("The paper's claims:", ev.paper["fig3_claims"])
    notes = fallbacks([e["minus_smallest_decay"] for e in entries])
    return Part(entries, lines, draw=lambda path: plots.fig3(entries, path), notes=notes)


def fig5(ev: Evidence) -> Part | None:
    points = agg.fig5(ev.headline)
    if not points:
        return None
    lines = [
        md_table(
            ["model", "γ", "l2 radius", "robust top-1 %", "n", "− smallest γ, points"],
            [
                [
                    _arm(p),
                    f"{p['layer_decay']:g}",
                    p["eval_radius"],
                    p["robust"].pct(),
                    p["robust"].images,
                    _gap(p["minus_smallest_decay"]),
                ]
                for p in points
            ],
        )
    ]
    notes = fallbacks([p["minus_smallest_decay"] for p in points])
    return Part(points, lines, draw=lambda path: plots.fig5(points, path), notes=notes)


def table1(ev: Evidence) -> Part | None:
    cells = agg.table1(ev.rows, agg.best_by_arm(ev.rows))
    if not cells:
        return None
    text = table1_markdown(cells, ev.paper)
    rows = [
        {**c, "paper": paper_top1(ev.paper, c["data"], c["method"], c["attack"], c["optim"])} for c in cells
    ]
    lines = [text]
    if ev.paper is not None and not any(c["data"] in ev.paper["table1"] for c in cells):
        lines += [
            "",
            "None of these datasets is in the paper's Table 1; its values are in `advpt/report/paper.json`.",
        ]
    gap = f"minus_{agg.REFERENCE_OPTIM}"
    gaps = [c for c in cells if c.get(gap) is not None]
    if gaps:
        lines += ["", f"Each other optimiser against {agg.REFERENCE_OPTIM}, test top-1 difference:", ""]
        lines.append(
            md_table(
                ["dataset", "arm", "optimiser", f"− {agg.REFERENCE_OPTIM}, points", "n"],
                [[c["data"], _arm(c), c["optim"], _gap(c[gap]), c[gap].images] for c in gaps],
            )
        )
    return Part(rows, lines, table=text, notes=fallbacks([c.get(gap) for c in cells]))


SECTIONS = (
    Section("fig1", "fig1_eps", "Fig. 1: average accuracy against the radius", fig1),
    Section(
        "frozen",
        "frozen_features",
        "Fine-tuning, linear probe and kNN of every arm",
        frozen,
        of_evaluations=False,
    ),
    Section(
        "fig2", "fig2_variants", "Fig. 2: each evaluation set, best radius of each method and attack", fig2
    ),
    Section(
        "fig3",
        "fig3_layer_decay",
        "Fig. 3: layer-wise lr decay",
        fig3,
        missing="no adversarially pre-trained model was fine-tuned with two or more layer decays",
    ),
    Section(
        "fig5",
        "fig5_robust_vs_decay",
        "Fig. 5: robust accuracy against the l2 radius, per layer decay",
        fig5,
        missing="no l2 robust accuracy for a model fine-tuned with two or more layer decays",
    ),
    Section(
        "table1",
        "table1_transfer",
        "Table 1: transfer (test top-1 of the best radius of each method and attack)",
        table1,
    ),
    Section(
        "knn",
        "knn_pretrain",
        "Pre-training: kNN top-1 against the epoch",
        knn,
        missing="no pre-training run logged monitor/knn_top1 (pre-train with monitor=knn, the default)",
        of_evaluations=False,
    ),
    Section(
        "convergence",
        "finetune_convergence",
        "Fine-tuning: convergence",
        convergence,
        missing="no fine-tuning run behind the evaluations logged val/top1 in its metrics.csv",
    ),
)
"""The paper's figures and tables in the order of the report, the pre-training monitor's curves, then
whether each fine-tuning run behind the evaluations converged."""


# -- Table 1's layout ----------------------------------------------------------------------------
def table1_markdown(cells: Sequence[Row], paper: Mapping[str, Any] | None) -> str:
    """Table 1's layout: a row per dataset x optimiser, a column per method x attack, the average last."""
    columns = sorted({(c["method"], c["attack"]) for c in cells}, key=lambda k: agg.order((*k, "-")))
    columns.sort(
        key=lambda k: (
            agg.METHOD_ORDER.index(k[0]) if k[0] in agg.METHOD_ORDER else 9,
            ATTACKS.index(k[1]),
        )
    )
    radius = {(c["method"], c["attack"]): c["radius"] for c in cells}
    datasets = list(dict.fromkeys(c["data"] for c in cells))
    optims = sorted({c["optim"] for c in cells})
    index = {(c["data"], c["method"], c["attack"], c["optim"]): c for c in cells}
    header = ["dataset", "optimiser", *[arm_label(m, a, radius[(m, a)]) for m, a in columns]]
    paper_datasets = set((paper or {}).get("table1", {})) - {"average"}
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
                theirs = paper_top1(paper, data, m, a, optim)
                # the paper's average is over its five datasets: shown only beside an average of the same five
                same_grid = data != "average" or set(datasets) == paper_datasets
                if theirs is not None and paper is not None and same_grid:
                    text += f" [paper {theirs:.2f}]"
                row.append(text)
            rows.append(row)
    return md_table(header, rows)
