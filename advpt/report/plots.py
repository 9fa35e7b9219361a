"""The report's figures (matplotlib, no display): each shows its 95 % intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from advpt.files import atomic_path
from advpt.method_table import METHOD_TABLE, SCRATCH_COLOUR, SCRATCH_LABEL, Column
from advpt.names import ATTACK_LABEL, METHOD_LABEL, NORMS, arm_label
from advpt.report.aggregate import methods_in
from advpt.report.intervals import Estimate

# each method's line in the figures, read from the table at each use
COLOURS = Column(lambda name: METHOD_TABLE[name].colour)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return path


def _bars(estimates: Sequence[Estimate]) -> list[list[float]]:
    """Error bars from each interval (asymmetric where it is: Wilson near 0 or 100 %, a bootstrap's
    percentiles), in points; never negative (a percentile interval may leave out its own point)."""
    return [
        [max(0.0, 100 * (e.mean - e.lo)) for e in estimates],
        [max(0.0, 100 * (e.hi - e.mean)) for e in estimates],
    ]


def _dodge(i: int, k: int, span: float) -> float:
    """A small horizontal shift of curve ``i`` of ``k``, so that equal points stay visible."""
    return (i - (k - 1) / 2) * 0.012 * span


def fig1(table: Sequence[Mapping[str, Any]], base: Estimate | None, path: Path) -> Path:
    """Two panels (l_inf, l2) with aligned y-axes: average accuracy minus the scratch model's against the
    radius, one line per method; the nominal model sits at radius 0 of both."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    value = "minus_scratch" if base is not None else "average"
    methods = methods_in(r["method"] for r in table)
    # radii used at another image size than 224 px are drawn in the paper's units, and the axis says so
    key = "eps_224" if any(r.get("eps_224", r["eps_value"]) != r["eps_value"] for r in table) else "eps_value"
    for ax, attack in zip(axes, NORMS, strict=True):
        scale = 255 if attack == "linf" else 1
        span = max([r[key] * scale for r in table if r["attack"] == attack] or [1.0])
        for i, method in enumerate(methods):
            points = [r for r in table if r["method"] == method and r["attack"] in ("none", attack)]
            points.sort(key=lambda r: r[key])
            if not points:
                continue
            xs = [r[key] * scale + _dodge(i, len(methods), span) for r in points]
            ys = [100 * r[value].mean for r in points]
            ax.errorbar(
                xs,
                ys,
                yerr=_bars([r[value] for r in points]),
                marker="o",
                capsize=3,
                label=METHOD_LABEL.get(method, method),
                color=COLOURS.get(method),
            )
        if base is not None:
            ax.axhline(0, color=SCRATCH_COLOUR, lw=0.8, ls="--")
        paper = " at 224 px (the paper's units)" if key == "eps_224" else ""
        ax.set_xlabel("radius ε∞ (×1/255)" if attack == "linf" else f"radius ε2{paper}")
        ax.set_title(f"{ATTACK_LABEL[attack]} attacks (radius 0: nominal)")
        ax.grid(alpha=0.3)
    if base is not None:
        axes[0].set_ylabel(f"average top-1 − {SCRATCH_LABEL} ({100 * base.mean:.2f} %), points")
    else:
        axes[0].set_ylabel(f"average top-1 % (no {SCRATCH_LABEL} run found)")
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle("Fig. 1: influence of the perturbation radius (bars: 95 % intervals)")
    return _save(fig, path)


def _heatmap(
    ax: Any, rows: list[str], columns: list[str], cells: list[list[Estimate | None]], title: str
) -> None:
    """Row-normalised colours (red: better), each cell annotated with top-1 % ± its 95 % half-width."""
    import numpy as np

    values = np.array([[c.mean if c is not None else np.nan for c in row] for row in cells], dtype=float)
    lo = np.nanmin(values, axis=1, keepdims=True)
    hi = np.nanmax(values, axis=1, keepdims=True)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    ax.imshow((values - lo) / span, cmap="coolwarm", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell is not None:
                ax.text(
                    j,
                    i,
                    f"{100 * cell.mean:.1f}\n±{100 * cell.half:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)


def fig2(columns: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = _plt()
    sets = list(dict.fromkeys(n for c in columns for n in c["sets"]))
    labels = [arm_label(c["method"], c["attack"], c["radius"]) for c in columns]
    cells = [[c["sets"].get(s) for c in columns] for s in sets] + [[c["average"] for c in columns]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(columns), 1.2 + 0.45 * len(cells)))
    _heatmap(
        ax,
        [*sets, "average"],
        labels,
        cells,
        "Fig. 2: best radius of each method and attack (top-1 %, 95 % interval)",
    )
    return _save(fig, path)


def fig3(entries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = _plt()
    models = list(dict.fromkeys((e["method"], e["attack"], e["radius"]) for e in entries))
    sets = list(dict.fromkeys(n for e in entries for n in e["sets"]))
    fig, axes = plt.subplots(
        1, len(models), figsize=(0.5 + 2.6 * len(models), 1.4 + 0.45 * (len(sets) + 1)), squeeze=False
    )
    for ax, model in zip(axes[0], models, strict=True):
        group = [e for e in entries if (e["method"], e["attack"], e["radius"]) == model]
        cells = [[e["sets"].get(s) for e in group] for s in sets] + [[e["average"] for e in group]]
        _heatmap(ax, [*sets, "average"], [f"γ={e['layer_decay']:g}" for e in group], cells, arm_label(*model))
    fig.suptitle(
        "Fig. 3: layer-wise lr decay γ (top-1 %, 95 % interval; colours per row and panel)",
        fontsize=10,
        y=1.04,
    )
    return _save(fig, path)


def fig5(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    plt = _plt()
    models = list(dict.fromkeys((p["method"], p["attack"], p["radius"]) for p in points))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [p for p in points if (p["method"], p["attack"], p["radius"]) == model]
        decays = sorted({p["layer_decay"] for p in mine})
        span = max(p["eval_eps"] for p in mine) or 1.0
        for i, decay in enumerate(decays):
            curve = sorted((p for p in mine if p["layer_decay"] == decay), key=lambda p: p["eval_eps"])
            ax.errorbar(
                [p["eval_eps"] + _dodge(i, len(decays), span) for p in curve],
                [100 * p["robust"].mean for p in curve],
                yerr=_bars([p["robust"] for p in curve]),
                marker="o",
                capsize=3,
                label=f"γ={decay:g}",
            )
        ax.set_title(arm_label(*model), fontsize=9)
        ax.set_xlabel(f"{mine[0]['norm']} radius of the evaluation attack")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("robust top-1 %")
    fig.suptitle(
        "Fig. 5: robust accuracy after fine-tuning with each layer decay (bars: 95 % intervals)",
        fontsize=10,
        y=1.03,
    )
    return _save(fig, path)


def knn(curves: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Two panels (clean, robust): the pre-training monitor's kNN top-1 against the epoch, one curve per arm."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    arms = list(dict.fromkeys((c["method"], c["attack"], c["radius"]) for c in curves))
    for ax, key, title in zip(axes, ("knn_top1", "knn_robust_top1"), ("clean", "robust (PGD)"), strict=True):
        for arm in arms:
            points = [
                c for c in curves if (c["method"], c["attack"], c["radius"]) == arm and c[key] is not None
            ]
            if points:
                runs = max(p["runs"] for p in points)
                label = arm_label(*arm) + (f" ({runs} runs)" if runs > 1 else "")
                ax.plot([p["epoch"] for p in points], [100 * p[key] for p in points], marker="o", label=label)
        ax.set_xlabel("epochs trained")
        ax.set_title(f"{title} kNN top-1", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("kNN top-1 % (k=20, evaluation split)")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("Learning during pre-training: weighted kNN on the encoder's features (monitor=knn)")
    return _save(fig, path)
