"""Find evaluation runs and trace each back to what produced it.

An ``evaluate`` run's ``results.json`` names the fine-tuned weights it scored; the fine-tuning run's
``model.json`` names the encoder it started from (``pretrained``: null for a from-scratch model), its
data, optimiser and layer decay; the pre-training run's ``config.yaml`` names the method, attack and
radius. Each evaluation becomes one flat row (naming its ``outcomes.npz`` where it wrote one); each
point of a pre-training run's kNN monitor (``metrics.csv``) one more; a fine-tuning run's validation
top-1 per epoch is read from its own ``metrics.csv`` (:func:`val_curve`). Nothing here imports torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from advpt.method_table import SCRATCH
from advpt.outcomes import FILE as OUTCOMES

Note = Callable[[str], None]


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def radius_value(eps: Any) -> float:
    """``4/255`` -> 0.0157, ``0.5`` -> 0.5 (``None`` -> 0)."""
    if eps is None:
        return 0.0
    try:  # a label with the paper's units beside (``0.0714 (0.5 @224px)``) is its first number
        return float(Fraction(str(eps).strip().split(" ")[0]))
    except (ValueError, ZeroDivisionError):
        return float("nan")


def radius_label(attack: str, eps: Any, eps_224: Any = None) -> str:
    """A radius as the paper writes it: l_inf as k/255, l2 as a decimal, nominal as ``-``; an l2 radius
    used at another image size than 224 px with the paper's units beside: ``0.0714 (0.5 @224px)``."""
    if attack == "none":
        return "-"
    value = radius_value(eps)
    if attack == "linf":
        k = value * 255
        return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{value:g}"
    paper = radius_value(eps_224) if eps_224 is not None else value
    if abs(paper - value) <= 1e-9 * max(1.0, value):
        return f"{value:g}"
    return f"{value:.3g} ({paper:.3g} @224px)"


def _run_dir(weights: Path) -> Path:
    return weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent


def pretrain_labels(directory: Path) -> dict[str, Any] | None:
    """Method, attack, radius and seed of a pre-training run (``None`` when it records none)."""
    cfg = _yaml(directory / "config.yaml") or _yaml(directory / ".hydra" / "config.yaml")
    if not cfg or "method" not in cfg:
        return None
    attack = (cfg.get("attack") or {}).get("name", "none")
    eps = cfg.get("eps")
    if eps is None:
        eps = (cfg.get("attack") or {}).get("default_eps", 0)
    return {
        "method": (cfg["method"] or {}).get("name"),
        "attack": attack,
        "eps": 0 if attack == "none" else eps,
        "eps_224": None if attack == "none" else cfg.get("eps_224"),
        "pretrain_seed": cfg.get("seed", 0),
        "pretrain": str(directory),
    }


def cut_short(directory: Path | str | None) -> str | None:
    """How a training run was cut short by ``trainer.max_steps`` inside a schedule given in epochs (a
    run of a few test steps, ``trainer.max_steps=20``), e.g. ``20 of its 20 epochs' steps``; ``None``
    for a run that ran its schedule (or gives it in steps, ``max_epochs=-1``, as the SGD transfer
    recipe does) and for a folder that is not a run."""
    if not directory:
        return None
    directory = Path(directory)
    trainer = _yaml(directory / "config.yaml").get("trainer") or {}
    try:
        cap, epochs = int(trainer.get("max_steps") or -1), int(trainer.get("max_epochs") or -1)
        steps = int(_json(directory / "run.json").get("steps", -1))
    except (TypeError, ValueError):
        return None
    if cap <= 0 or epochs <= 0 or steps < cap:
        return None
    return f"{shorter(directory)}: {steps} steps (trainer.max_steps={cap}, before max_epochs={epochs})"


def shorter(directory: Path) -> str:
    """A run folder as ``<kind>/<name>`` (its last two parts), for lists in the report."""
    return "/".join(directory.parts[-2:])


def _outcomes(directory: Path) -> str | None:
    """An evaluation's per-image outcomes (``advpt.outcomes``), for paired differences; ``None`` when it
    wrote none (evaluations from before them)."""
    path = directory / OUTCOMES
    return str(path) if path.is_file() else None


def row_of(results_path: Path, note: Note) -> dict[str, Any] | None:
    """One flat row for an ``evaluate`` run (``None``, with a note, when its lineage cannot be read)."""
    results = _json(results_path)
    if results.get("suite") == "knn":  # an encoder's kNN evaluation: read by knn_results
        return None
    if "sets" not in results:
        note(f"skipped {results_path}: not an evaluation result")
        return None
    weights = Path(str(results.get("checkpoint", "")))
    finetune_dir = _run_dir(weights)
    spec = _json(finetune_dir / "model.json")
    if not spec:
        note(f"skipped {results_path}: the fine-tuned model it names ({weights}) has no model.json")
        return None
    ft_cfg = _yaml(finetune_dir / "config.yaml")
    pretrained = spec.get("pretrained")
    if pretrained and str(pretrained) != "none":
        labels = pretrain_labels(_run_dir(Path(str(pretrained))))
        if labels is None:
            note(
                f"skipped {results_path}: its encoder {pretrained} has no readable pre-training config.yaml (plain YAML)"
            )
            return None
    else:
        labels = {
            "method": SCRATCH,
            "attack": "none",
            "eps": 0,
            "eps_224": None,
            "pretrain_seed": None,
            "pretrain": None,
        }
    optim = spec.get("optim") or {}
    sets = {
        name: {"top1": entry["top1"], "images": int(entry.get("images", 0))}
        for name, entry in results["sets"].items()
        if "group" not in entry and entry.get("top1") is not None
    }
    robust = {
        norm: {
            radius: {"accuracy": r["accuracy"], "images": int(r["images"]), "eps": r.get("eps", radius)}
            for radius, r in by_radius.items()
        }
        for norm, by_radius in (results.get("robust") or {}).items()
    }
    return {
        **labels,
        "eps_value": radius_value(labels["eps"]),
        "radius": radius_label(labels["attack"], labels["eps"], labels.get("eps_224")),
        "seed": ft_cfg.get("seed", labels.get("pretrain_seed") or 0),
        "data": (spec.get("data") or {}).get("name"),
        "optim": optim.get("name"),
        "layer_decay": float(spec.get("layer_decay", optim.get("layer_decay", 1.0))),
        "sets": sets,
        "robust": robust,
        "suite": results.get("suite"),
        "evaluate": str(results_path.parent),
        "outcomes": _outcomes(results_path.parent),
        "finetune": str(finetune_dir),
        # the runs behind this evaluation that stopped at trainer.max_steps inside their epochs
        "cut_short": [c for c in (cut_short(finetune_dir), cut_short(labels["pretrain"])) if c],
    }


def collect(roots: Iterable[Path | str], note: Note = lambda _m: None) -> list[dict[str, Any]]:
    """Every evaluation row under ``roots`` (folders searched recursively, or results.json files)."""
    rows, seen = [], set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            note(f"skipped {root}: it does not exist")
            continue
        paths = [root] if root.is_file() else sorted(root.glob("**/results.json"))
        for path in paths:
            if ".hydra" in path.parts or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            row = row_of(path, note)
            if row is not None:
                rows.append(row)
    return rows


def knn_points(directory: Path) -> list[dict[str, Any]]:
    """The monitor's points of a pre-training run (``monitor/knn_top1`` in its metrics.csv; [] if none):
    epochs trained, clean and robust kNN top-1."""
    try:
        with (directory / "metrics.csv").open(newline="") as f:
            logged = [r for r in csv.DictReader(f) if r.get("monitor/knn_top1")]
    except OSError:
        return []

    def value(text: str | None) -> float | None:
        return float(text) if text else None

    return [
        {
            "epoch": int(float(r["epoch"])) + 1,
            "knn_top1": float(r["monitor/knn_top1"]),
            "knn_robust_top1": value(r.get("monitor/knn_robust_top1")),
        }
        for r in logged
    ]


def val_curve(directory: Path) -> list[tuple[int, float]]:
    """A fine-tuning run's validation top-1 per epoch, ``(epoch counted from 1, val/top1)``, from its
    metrics.csv ([] when it has no such file or column). An epoch logged twice (a resumed run, a final
    validation) keeps its last value."""
    try:
        with (directory / "metrics.csv").open(newline="") as f:
            logged = [r for r in csv.DictReader(f) if r.get("val/top1") and r.get("epoch")]
    except OSError:
        return []
    by_epoch: dict[int, float] = {}
    for r in logged:
        try:
            epoch, value = int(float(r["epoch"])) + 1, float(r["val/top1"])
        except ValueError:
            continue
        by_epoch[epoch] = value
    return sorted(by_epoch.items())


def knn_curves(roots: Iterable[Path | str], pretrains: Iterable[str | None] = ()) -> list[dict[str, Any]]:
    """One row per monitor point of every pre-training run under ``roots`` and of ``pretrains`` (the runs
    the evaluations trace back to), labelled with the run's method, attack and radius."""
    found = [
        p.parent
        for root in roots
        if Path(root).expanduser().is_dir()
        for p in sorted(Path(root).expanduser().glob("**/metrics.csv"))
        if ".hydra" not in p.parts
    ]
    found += [Path(p) for p in pretrains if p]
    rows, seen = [], set()
    for directory in found:
        if directory.resolve() in seen:
            continue
        seen.add(directory.resolve())
        labels = pretrain_labels(directory)
        if labels is None:  # not a pre-training run
            continue
        radius = radius_label(labels["attack"], labels["eps"], labels.get("eps_224"))
        rows += [{**labels, "radius": radius, **point} for point in knn_points(directory)]
    return rows


def knn_results(roots: Iterable[Path | str]) -> list[dict[str, Any]]:
    """One row per kNN evaluation of a pre-trained encoder under ``roots`` (``advpt evaluate
    checkpoint=<pretrain run>``: results.json with ``suite: knn``), labelled by its pre-training run."""
    found = []
    for root in roots:
        root = Path(root).expanduser()
        paths = [root] if root.is_file() else sorted(root.glob("**/results.json")) if root.is_dir() else []
        for path in paths:
            results = _json(path)
            knn = results.get("knn")
            if results.get("suite") != "knn" or not isinstance(knn, dict) or ".hydra" in path.parts:
                continue
            source = Path(str(results.get("checkpoint", "")))
            labels = pretrain_labels(source if source.is_dir() else _run_dir(source))
            if labels is None:
                continue
            found.append(
                {
                    **labels,
                    "radius": radius_label(labels["attack"], labels["eps"], labels.get("eps_224")),
                    "seed": labels.get("pretrain_seed") or 0,
                    "top1": knn.get("top1"),
                    "robust_top1": knn.get("robust_top1"),
                    "knn_norm": knn.get("norm"),
                    "knn_eps": knn.get("eps"),
                    "queries": knn.get("queries"),
                    "evaluate": str(path.parent),
                }
            )
    return found
