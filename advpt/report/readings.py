"""The sections that read the encoders rather than the paper's figures: kNN during pre-training, every
arm's fine-tuned, linear-probe and kNN accuracy side by side, and whether each fine-tuning converged."""

from __future__ import annotations

from advpt.names import arm_label
from advpt.report import aggregate as agg
from advpt.report import convergence as conv
from advpt.report import plots
from advpt.report.parts import Evidence, Part
from advpt.report.parts import arm as _arm
from advpt.report.tables import md_table


def knn(ev: Evidence) -> Part | None:
    curves = agg.knn_curves(ev.curves)
    if not curves:
        return None
    last = {(c["method"], c["attack"], c["radius"]): c for c in curves}  # each arm's final epoch
    lines = [
        "The pre-training monitor (`monitor=knn`): weighted kNN top-1 (k=20) of the encoder's features "
        "on the evaluation split, clean and under PGD, at each arm's last monitored epoch:",
        "",
        md_table(
            ["arm", "epochs", "kNN top-1 %", "robust kNN top-1 %", "runs"],
            [
                [
                    _arm(c),
                    c["epoch"],
                    f"{100 * c['knn_top1']:.2f}",
                    "-" if c["knn_robust_top1"] is None else f"{100 * c['knn_robust_top1']:.2f}",
                    c["runs"],
                ]
                for c in last.values()
            ],
        ),
    ]
    return Part(curves, lines, draw=lambda path: plots.knn(curves, path))


def frozen(ev: Evidence) -> Part | None:
    """Every arm three ways: fine-tuned (at its best layer decay), its frozen encoder read by a linear probe,
    and by kNN (clean and robust); test top-1 over its seeds."""
    probes = [r for r in ev.rows if r.get("optim") == agg.PROBE]
    if not probes and not ev.knn:
        return None
    tuned = agg.best_decay(ev.headline)
    keys = {*tuned, *(agg.arm_of(r) for r in probes), *(agg.arm_of(r) for r in ev.knn)}
    table = []
    for key in sorted(keys, key=agg.order):
        group = [r for r in probes if agg.arm_of(r) == key]
        near = [r for r in ev.knn if agg.arm_of(r) == key]
        clean = [float(r["top1"]) for r in near if r.get("top1") is not None]
        robust = [float(r["robust_top1"]) for r in near if r.get("robust_top1") is not None]
        table.append(
            {
                "arm": arm_label(*key),
                "layer_decay": tuned[key][0] if key in tuned else None,
                "finetune": agg.test_top1(tuned[key][2]) if key in tuned else None,
                "probe": agg.test_top1(group) if group else None,
                "knn": sum(clean) / len(clean) if clean else None,
                "knn_robust": sum(robust) / len(robust) if robust else None,
                "knn_runs": len(near),
            }
        )
    where = next((r for r in ev.knn), None)
    radius = (
        f" (robust: {where['knn_norm']} {where['knn_eps']:.3g})" if where and where.get("knn_eps") else ""
    )
    lines = [
        "The same labels read three ways: fine-tuning (AdamW, layer decay), a linear probe of the frozen "
        "encoder (MAE's protocol: BatchNorm without affine, LARS) and weighted kNN of its features "
        f"(k=20; bank: training images, queries: the test split){radius}. Test top-1 in percent; kNN "
        "averaged over its runs.",
        "",
        md_table(
            ["arm", "fine-tuned %", "γ", "linear probe %", "kNN %", "robust kNN %", "kNN runs"],
            [
                [
                    r["arm"],
                    r["finetune"].pct() if r["finetune"] is not None else "-",
                    "-" if r["layer_decay"] is None else f"{r['layer_decay']:g}",
                    r["probe"].pct() if r["probe"] is not None else "-",
                    "-" if r["knn"] is None else f"{100 * r['knn']:.2f}",
                    "-" if r["knn_robust"] is None else f"{100 * r['knn_robust']:.2f}",
                    r["knn_runs"],
                ]
                for r in table
            ],
        ),
    ]
    return Part(table, lines)


def convergence(ev: Evidence) -> Part | None:
    runs = ev.tuned
    if not runs:
        return None
    table = md_table(
        [
            "model",
            "seed",
            "data",
            "optimiser",
            "γ",
            "epochs",
            "val top-1 %, last epochs",
            "gain, points",
            "status",
        ],
        [
            [
                _arm(r),
                r["seed"],
                r["data"],
                r["optim"],
                f"{r['layer_decay']:g}",
                r["epochs"],
                " ".join(f"{100 * v:.2f}" for v in r["last"]),
                "-" if r["gain"] is None else f"{100 * r['gain']:+.2f} (last {r['window']})",
                "UNCONVERGED" if r["flagged"] else "ok" if r["gain"] is not None else "-",
            ]
            for r in runs
        ],
    )
    rows = [{**r, "last": " ".join(f"{v:.4f}" for v in r["last"])} for r in runs]
    return Part(rows, [conv.rule(runs), "", table], notes=[conv.note(r) for r in runs if r["flagged"]])
