"""``results.json`` and its text table: per-set scores grouped and averaged, written atomically."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from advpt.data.variants import EvalSet, group_mean
from advpt.evaluate.scoring import Score


def summarise(
    sets: Sequence[EvalSet], scores: Mapping[str, Score], expected: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``results.json``'s ``sets`` and ``average`` from per-set scores.

    A set named ``<group>/<corruption>/<severity>`` is one subset of a corruption group: it yields a
    ``<group>/<corruption>`` entry (mean over severities) under a ``<group>`` entry (mean over subsets).
    """
    table: dict[str, Any] = {}
    scored = [s for s in sets if s.name in scores]
    for s in scored:
        score = scores[s.name]
        if s.name == s.group:
            table[s.name] = {"top1": score.top1, "images": score.images}
            continue
        group, corruption, severity = s.name.split("/")
        head = table.setdefault(group, {"top1": None, "images": 0, "subsets": 0})
        head["images"] += score.images
        head["subsets"] += 1
        entry = table.setdefault(
            f"{group}/{corruption}", {"top1": None, "images": 0, "group": group, "severities": {}}
        )
        entry["images"] += score.images
        entry["severities"][severity] = score.top1
    for entry in table.values():
        if "severities" in entry:
            entry["top1"] = sum(entry["severities"].values()) / len(entry["severities"])
    means = group_mean({s.name: scores[s.name].top1 for s in scored}, scored)
    for group, mean in means.items():
        table[group]["top1"] = mean
    average = {
        "top1": sum(means.values()) / len(means) if means else None,
        "sets": len(means),
        "of": len(expected),
    }
    return table, average


def format_table(results: Mapping[str, Any]) -> str:
    """``results.json`` as aligned text: top-1 % per set, the average, robust accuracy, then the kNN's."""

    def pct(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    lines = [f"checkpoint: {results['checkpoint']}"]
    if "sets" in results:  # a fine-tuned classifier (an encoder has the kNN alone)
        lines += _set_lines(results, pct)
    knn = results.get("knn")
    if knn:
        robust = f"robust ({knn['norm']} {knn['eps']:g}, PGD-{knn['steps']})"
        width = max(len("clean"), len(robust))
        lines += [
            "",
            f"weighted kNN of the features (k={knn['k']}, T={knn['temperature']:g}): "
            f"{knn['bank']} training images as the bank, {knn['queries']} queries",
            f"{'kNN':<{width}}  {'top-1 %':>8}",
            f"{'clean':<{width}}  {pct(knn['top1']):>8}",
            f"{robust:<{width}}  {pct(knn['robust_top1']):>8}",
        ]
    return "\n".join(lines)


def _set_lines(results: Mapping[str, Any], pct: Any) -> list[str]:
    """A classifier's rows: top-1 % per set, the average, then robust accuracy."""
    rows = [
        (name if "group" not in e else "  " + name.split("/", 1)[1], e) for name, e in results["sets"].items()
    ]
    avg = results["average"]
    avg_label = f"average ({avg['sets']} of {avg['of']} sets)"
    width = max([len("set"), len(avg_label)] + [len(r) for r, _ in rows])
    lines = [f"{'set':<{width}}  {'top-1 %':>8}  {'images':>8}"]
    lines += [f"{label:<{width}}  {pct(e['top1']):>8}  {e['images']:>8}" for label, e in rows]
    lines.append(f"{avg_label:<{width}}  {pct(avg['top1']):>8}")
    robust = results.get("robust") or {}
    if robust:
        attack = results.get("robust_attack") or {}
        if attack.get("name") == "autoattack":
            attacks = ", ".join(a.upper() for a in attack["attacks"])
            title = f"AutoAttack {attack['version']}: {attacks}"
        else:  # PGD; results.json written before robust_attack existed say so only per radius
            first = next(iter(next(iter(robust.values())).values()))
            restarts = first["restarts"]
            title = f"PGD-{first['steps']}, {restarts} restart{'s' if restarts > 1 else ''}"
        lines += [
            "",
            f"robust accuracy on {results['robust_set']} ({title})",
            f"{'norm':<6}  {'radius':>8}  {'top-1 %':>8}  {'images':>8}",
        ]
        for norm, by_radius in robust.items():
            for radius, r in by_radius.items():
                lines.append(f"{norm:<6}  {radius:>8}  {pct(r['accuracy']):>8}  {r['images']:>8}")
    return lines
