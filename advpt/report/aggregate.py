"""From evaluation rows to the numbers behind each figure, with sample sizes and 95 % intervals.

Each number carries its interval (:mod:`advpt.report.intervals`: Wilson for one accuracy of one seed,
else a normal interval adding test-set sampling and the spread between seeds). Each difference between
two arms (pre-trained − scratch, adversarial − nominal, one layer decay against another, SGD against
AdamW) is paired on the images both arms saw where their evaluations wrote per-image outcomes, else
unpaired (:mod:`advpt.report.differences`). These intervals say which gaps between arms are larger than
the evaluation noise at the sample sizes used; they are not corrected for the number of comparisons,
nor for picking the best radius or layer decay on the same test sets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from statistics import mean
from typing import Any

from advpt.method_table import REPORT_ORDER, SCRATCH
from advpt.names import ATTACKS
from advpt.report.collect import radius_value
from advpt.report.differences import AVERAGE, compare
from advpt.report.intervals import Estimate, accuracy, average_of

METHOD_ORDER = REPORT_ORDER  # the paper's order (each method's ``order`` in its table)


# -- grouping ------------------------------------------------------------------------------------
Key = tuple[str, str, str]  # (method, attack, radius label)


def arm_of(row: Mapping[str, Any]) -> Key:
    return (row["method"], row["attack"], row["radius"])


def methods_in(names: Iterable[str]) -> list[str]:
    """The methods among ``names`` (not scratch), once each, in the paper's order; a method the table lacks
    (a run of a method since removed) comes last rather than nowhere."""
    found = set(names) - {SCRATCH}
    return sorted(found, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def headline_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str | None]:
    """The rows behind Fig. 1-3 and 5: the fine-tuning dataset's full evaluations (the data, then the
    optimiser, that most full evaluations used: a transfer run with another optimiser is not one more
    seed), one per fine-tuned model (the one with the most sets)."""
    full = [r for r in rows if len(r["sets"]) >= 2 or r["robust"]]
    if not full:
        full = list(rows)
    if not full:
        return [], None
    data = _most_common(r["data"] for r in full)
    optim = _most_common(r["optim"] for r in full if r["data"] == data)
    best: dict[str, Mapping[str, Any]] = {}
    for r in full:
        if r["data"] != data or r["optim"] != optim:
            continue
        seen = best.get(r["finetune"])
        if seen is None or len(r["sets"]) > len(seen["sets"]):
            best[r["finetune"]] = r
    return list(best.values()), data


def _most_common(values: Iterable[Any]) -> Any:
    counts: dict[Any, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return max(counts, key=lambda v: counts[v])


def by_model(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[Key, float], list[Mapping[str, Any]]]:
    """Rows grouped by pre-trained arm and layer decay (the seeds of one model)."""
    groups: dict[tuple[Key, float], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(arm_of(r), r["layer_decay"])].append(r)
    return groups


def sets_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, Estimate]:
    names = [n for n in rows[0]["sets"] if all(n in r["sets"] for r in rows)]
    return {
        n: accuracy([(float(r["sets"][n]["top1"]), int(r["sets"][n]["images"])) for r in rows]) for n in names
    }


def best_decay(rows: Iterable[Mapping[str, Any]]) -> dict[Key, tuple[float, Estimate, list]]:
    """Each pre-trained arm at its best layer decay (by the mean average over seeds)."""
    out: dict[Key, tuple[float, Estimate, list]] = {}
    for (arm, decay), group in by_model(rows).items():
        est = average_of(group)
        if arm not in out or est.mean > out[arm][1].mean:
            out[arm] = (decay, est, group)
    return out


def order(key: Key) -> tuple:
    method, attack, radius = key
    m = METHOD_ORDER.index(method) if method in METHOD_ORDER else -1
    a = ATTACKS.index(attack) if attack in ATTACKS else len(ATTACKS)
    return (a, m, radius_value(radius.replace("-", "0")))


def best_by_arm(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
    """(method, attack) -> the radius (as the pre-training run recorded it) with the best average."""
    main, _ = headline_rows(list(rows))
    best: dict[tuple[str, str], tuple[float, Any]] = {}
    for (method, attack, _radius), (_decay, est, group) in best_decay(main).items():
        if method == SCRATCH:
            continue
        if (method, attack) not in best or est.mean > best[(method, attack)][0]:
            best[(method, attack)] = (est.mean, group[0]["eps"])
    return {k: v for k, (_, v) in best.items()}


# -- the figures' numbers ------------------------------------------------------------------------
def fig1(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Estimate | None]:
    """Average accuracy per (method, attack, radius) at its best layer decay, minus the scratch model's
    and, for an adversarial arm, minus its method's nominal pre-training (each paired where it can be)."""
    best = best_decay(rows)
    scratch = next((v for k, v in best.items() if k[0] == SCRATCH), None)
    base = scratch[1] if scratch else None
    table = []
    for key in sorted((k for k in best if k[0] != SCRATCH), key=order):
        decay, est, group = best[key]
        nominal = best.get((key[0], "none", "-")) if key[1] != "none" else None
        table.append(
            {
                "method": key[0],
                "attack": key[1],
                "radius": key[2],
                "eps_value": group[0]["eps_value"],
                # the paper's units (224 px), where the run recorded them
                "eps_224": radius_value(group[0]["eps_224"])
                if group[0].get("eps_224") is not None
                else group[0]["eps_value"],
                "layer_decay": decay,
                "average": est,
                "minus_scratch": compare(group, scratch[2], AVERAGE) if scratch else None,
                "minus_nominal": compare(group, nominal[2], AVERAGE) if nominal else None,
            }
        )
    return table, base


def fig2(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluation set, the best radius of each method x attack (the scratch model is Fig. 1's baseline,
    not a column: as in the paper, the colours compare pre-training arms)."""
    best = best_decay(rows)
    chosen: dict[tuple[str, str], Key] = {}
    for key, (_d, est, _g) in best.items():
        if key[0] == SCRATCH:
            continue
        slot = (key[0], key[1])
        if slot not in chosen or est.mean > best[chosen[slot]][1].mean:
            chosen[slot] = key
    columns = []
    for slot in sorted(chosen, key=lambda s: order((*s, "-"))):
        key = chosen[slot]
        decay, est, group = best[key]
        columns.append(
            {
                "method": key[0],
                "attack": key[1],
                "radius": key[2],
                "layer_decay": decay,
                "sets": sets_of(group),
                "average": est,
            }
        )
    return columns


def selected_models(rows: Sequence[Mapping[str, Any]]) -> list[Key]:
    """Fig. 3 and 5's pre-trained models: each method's best adversarial arm that was fine-tuned with at
    least two layer decays."""
    decays: dict[Key, set[float]] = defaultdict(set)
    for r in rows:
        decays[arm_of(r)].add(r["layer_decay"])
    best = best_decay(rows)
    chosen: dict[str, Key] = {}
    for key, (_d, est, _g) in best.items():
        if key[0] == SCRATCH or key[1] == "none" or len(decays[key]) < 2:
            continue
        if key[0] not in chosen or est.mean > best[chosen[key[0]]][1].mean:
            chosen[key[0]] = key
    return sorted(chosen.values(), key=lambda k: METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 9)


def by_decay(rows: Sequence[Mapping[str, Any]], key: Key) -> list[tuple[float, list[Mapping[str, Any]]]]:
    """One model's evaluation rows per layer decay, smallest decay first."""
    return sorted(((d, g) for (arm, d), g in by_model(rows).items() if arm == key), key=lambda kv: kv[0])


def fig3(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per selected model and layer decay, accuracy per set, and the average minus the smallest decay's."""
    out = []
    for key in selected_models(rows):
        decays = by_decay(rows, key)
        for decay, group in decays:
            first = decays[0][1]
            out.append(
                {
                    "method": key[0],
                    "attack": key[1],
                    "radius": key[2],
                    "layer_decay": decay,
                    "sets": sets_of(group),
                    "average": average_of(group),
                    "minus_smallest_decay": compare(group, first, AVERAGE) if group is not first else None,
                }
            )
    return out


def measured(group: Sequence[Mapping[str, Any]], norm: str, radius: str) -> bool:
    """Every seed's robust accuracy at ``radius`` of ``norm`` is there (null: the radius was not attacked)."""
    return all(g["robust"].get(norm, {}).get(radius, {}).get("accuracy") is not None for g in group)


def fig5(rows: Sequence[Mapping[str, Any]], norm: str = "l2") -> list[dict[str, Any]]:
    """Per selected model and layer decay, robust accuracy against the radius of ``norm``, and minus the
    smallest decay's at the same radius."""
    out = []
    for key in selected_models(rows):
        decays = by_decay(rows, key)
        first = decays[0][1]
        for decay, group in decays:
            radii = [r for r in group[0]["robust"].get(norm, {}) if measured(group, norm, r)]
            for radius in sorted(radii, key=radius_value):
                pairs = [
                    (float(g["robust"][norm][radius]["accuracy"]), int(g["robust"][norm][radius]["images"]))
                    for g in group
                ]
                comparable = group is not first and measured(first, norm, radius)
                out.append(
                    {
                        "method": key[0],
                        "attack": key[1],
                        "radius": key[2],
                        "layer_decay": decay,
                        "norm": norm,
                        "eval_radius": radius,
                        "eval_eps": radius_value(radius),
                        "robust": accuracy(pairs),
                        "minus_smallest_decay": (
                            compare(group, first, ("robust", norm, radius)) if comparable else None
                        ),
                    }
                )
    return out


def _test_set(row: Mapping[str, Any]) -> str | None:
    """The name of a row's set that is its dataset's own test split."""
    sets = row["sets"]
    for name in (row["data"], "imagenet_val"):
        if name in sets:
            return name
    return next(iter(sets)) if len(sets) == 1 else None


REFERENCE_OPTIM = "adamw_lld"  # Table 1's other optimisers are stated against it
PROBE = "linear_probe"  # reads a frozen encoder: its own section, not a column of Table 1


Cell = tuple[str, str, str, str]  # Table 1's (dataset, method, attack, optimiser)


def test_top1(group: Sequence[Mapping[str, Any]]) -> Estimate:
    """Test top-1 of a model's evaluations (its seeds) on its dataset's own test split."""
    return accuracy(
        [(float(g["sets"][n]["top1"]), int(g["sets"][n]["images"])) for g in group if (n := _test_set(g))]
    )


def table1_groups(
    rows: Sequence[Mapping[str, Any]], best: Mapping[tuple[str, str], Any]
) -> dict[Cell, tuple[float, list[Mapping[str, Any]]]]:
    """Table 1's cells: (dataset, method, attack at its best radius, optimiser) -> the layer decay with the
    best test top-1 (when one optimiser was run with several) and the evaluations of its seeds."""
    cells: dict[Cell, dict[float, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for r in rows:
        if r["method"] == SCRATCH or (r["method"], r["attack"]) not in best or r["optim"] == PROBE:
            continue
        if abs(radius_value(best[(r["method"], r["attack"])]) - r["eps_value"]) > 1e-9:
            continue
        if _test_set(r) is None or r["finetune"] in seen:
            continue
        seen.add(r["finetune"])
        cells[(r["data"], r["method"], r["attack"], r["optim"])][r["layer_decay"]].append(r)
    return {
        cell: max(by_decay.items(), key=lambda kv: test_top1(kv[1]).mean) for cell, by_decay in cells.items()
    }


def table1(rows: Sequence[Mapping[str, Any]], best: Mapping[tuple[str, str], Any]) -> list[dict[str, Any]]:
    """Datasets x (method, attack at its best radius) x optimiser: test top-1 (the best layer decay when
    one optimiser was run with several); beside another optimiser's, its difference from AdamW's."""
    chosen = table1_groups(rows, best)
    top1 = test_top1
    out = []
    for (data, method, attack, optim), (decay, group) in chosen.items():
        radius = next(
            r["radius"]
            for r in rows
            if (r["method"], r["attack"]) == (method, attack)
            and abs(radius_value(best[(method, attack)]) - r["eps_value"]) <= 1e-9
        )
        reference = chosen.get((data, method, attack, REFERENCE_OPTIM))
        names = {_test_set(g) for g in [*group, *(reference[1] if reference else [])]}
        gap = None
        if optim != REFERENCE_OPTIM and reference is not None and len(names) == 1:
            gap = compare(group, reference[1], ("set", str(names.pop())))
        out.append(
            {
                "data": data,
                "method": method,
                "attack": attack,
                "radius": radius,
                "optim": optim,
                "layer_decay": decay,
                "top1": top1(group),
                f"minus_{REFERENCE_OPTIM}": gap,
            }
        )
    return out


def knn_curves(points: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The monitor's kNN top-1 per pre-training arm and epoch, averaged over its runs (seeds):
    rows of (method, attack, radius, epoch, knn_top1, knn_robust_top1, runs), arms in the paper's order."""
    groups: dict[tuple[Key, int], list[Mapping[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(arm_of(p), p["epoch"])].append(p)
    out = []
    for (arm, epoch), group in sorted(groups.items(), key=lambda kv: (order(kv[0][0]), kv[0][1])):
        robust = [p["knn_robust_top1"] for p in group if p.get("knn_robust_top1") is not None]
        out.append(
            {
                **dict(zip(("method", "attack", "radius"), arm, strict=True)),
                "epoch": epoch,
                "knn_top1": mean(p["knn_top1"] for p in group),
                "knn_robust_top1": mean(robust) if robust else None,
                "runs": len(group),
            }
        )
    return out
