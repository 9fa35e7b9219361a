"""The ``evaluate`` command: check the config, score every set and the attacks, write ``results.json``."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from advpt.config import check_arguments, positive_int
from advpt.data.skipping import eval_loader, incomplete, unreadable
from advpt.data.variants import EvalSet
from advpt.errors import UserError
from advpt.evaluate.checkpoint import image_size, load_classifier, read_spec, resolve_checkpoint
from advpt.evaluate.robust import robust_results, robust_specs
from advpt.evaluate.scoring import PRECISIONS, Numbered, Score, clean_outcomes, score_of
from advpt.evaluate.suites import (
    CORRUPTIONS_GROUP,
    IMAGENET_SETS,
    SUITES,
    Warn,
    auto_sets,
    capped,
    data_config,
    imagenet_sets,
)
from advpt.evaluate.table import format_table, summarise
from advpt.files import write_json
from advpt.outcomes import FILE as OUTCOMES
from advpt.outcomes import Outcomes, write_outcomes
from advpt.runs import shown, summary


def _optional_cap(value: Any, key: str) -> None:
    if value is not None:
        positive_int(value, key)


def _precision(value: Any) -> torch.dtype | None:
    key = str(value)
    if key not in PRECISIONS:
        raise UserError(f"precision={value} is not supported; choose 32 or bf16")
    return PRECISIONS[key]


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Check a composed ``evaluate`` config (paths, suite, ranges) before anything is written; returns it."""
    check_arguments("evaluate", cfg)
    if cfg.suite not in SUITES:
        raise UserError(f"unknown suite {cfg.suite!r}; choose one of {', '.join(SUITES)}")
    weights = resolve_checkpoint(cfg.checkpoint)
    spec = read_spec(weights)
    size = image_size(spec)
    if cfg.suite == "imagenet_variants":
        if cfg.root is None:
            raise UserError(
                "suite=imagenet_variants needs root=PATH (the folder holding val/, imagenet-a/, ...)"
            )
        if not Path(str(cfg.root)).expanduser().is_dir():
            raise UserError(f"root={cfg.root} does not exist or is not a folder")
        if spec["num_classes"] != 1000:
            raise UserError(
                f"suite=imagenet_variants needs a 1000-way ImageNet classifier; {weights} has "
                f"{spec['num_classes']} classes (evaluate it with suite=auto)"
            )
        crop = cfg.crop_pct
        if isinstance(crop, bool) or not isinstance(crop, int | float) or not 0 < crop <= 1:
            raise UserError(f"crop_pct={crop} must be a number in (0, 1]")
    else:
        from advpt.data.sources import SOURCES

        data = data_config(spec, cfg.data_root)
        if data["name"] not in SOURCES:
            raise UserError(
                f"model.json's data {data['name']!r} is not a known dataset ({', '.join(SOURCES)})"
            )
        if data["name"] == "shards":  # a folder, or a list / pattern of shard URLs, local or remote
            from advpt.data.shards import Located

            Located(data)  # one line when the shards' folder or info.json is not there
        elif data["name"] != "builtin":
            root = Path(str(data.get("root") or "data")).expanduser()
            downloadable = data["name"] in ("cifar10", "cifar100") and data.get("download")
            if not root.exists() and not downloadable:
                raise UserError(f"the model's data.root={root} does not exist; pass data_root=PATH")
        if touch_data:
            from advpt.data.sources import build_source

            if build_source(data, train=False, image_size=size) is None:
                raise UserError(
                    f"data {data['name']} at {data.get('root')} has no test split "
                    "(an ImageFolder needs ROOT/val or ROOT/test); pass data_root=PATH"
                )
    positive_int(cfg.batch_size, "batch_size")
    if cfg.num_workers is not None:
        positive_int(cfg.num_workers, "num_workers", low=0)
    _optional_cap(cfg.max_images, "max_images")
    _optional_cap(cfg.subset_max_images, "subset_max_images")
    _precision(cfg.precision)
    if cfg.robust.enabled:
        robust_specs(cfg.robust, size)
        _optional_cap(cfg.robust.max_images, "robust.max_images")
    return cfg


def _warn_stderr(message: str) -> None:
    print(f"advpt evaluate: warning: {message}", file=sys.stderr)


def evaluate(cfg: DictConfig, out_dir: Path, warn: Warn = _warn_stderr) -> dict[str, Any]:
    """Run the configured suite and robust evaluation; write ``out_dir/outcomes.npz`` (which images each
    set and radius got right, :mod:`advpt.outcomes`), then ``out_dir/results.json``; return its content."""
    from tqdm.auto import tqdm

    cfg = check(cfg, touch_data=False)
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    weights = resolve_checkpoint(cfg.checkpoint).resolve()
    spec = read_spec(weights)
    size, seed, dtype = image_size(spec), int(cfg.seed), _precision(cfg.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_classifier(weights, spec).to(device)

    if cfg.suite == "imagenet_variants":
        sets = imagenet_sets(Path(str(cfg.root)).expanduser(), size, float(cfg.crop_pct), note)
        split = f"imagenet_variants|seed={seed}"  # what outcomes.npz's image indices index
        expected: Sequence[str] = IMAGENET_SETS
        robust_set = next((s for s in sets if s.name == "imagenet_val"), None)
        if robust_set is None and cfg.robust.enabled:
            note("robust accuracy: skipped, it is measured on imagenet_val, which was not found")
    else:
        source = data_config(spec, cfg.data_root)
        sets = auto_sets(source, size, seed, bool(cfg.corruptions))
        split = f"auto|{source['name']}|seed={seed}"  # the seed draws the subsets and the corruptions
        expected = (sets[0].name, CORRUPTIONS_GROUP)
        robust_set = sets[0]

    workers = cfg.num_workers
    if workers is None:
        data = spec.get("data") if cfg.suite == "auto" else None
        workers = (
            int(data.get("num_workers", 0)) if isinstance(data, Mapping) else min(8, os.cpu_count() or 1)
        )

    def loader(dataset: Dataset) -> DataLoader:
        # every readable image once, in order; unreadable ones are dropped and counted
        return eval_loader(dataset, int(cfg.batch_size), workers, pin_memory=device.type == "cuda")

    def cap(s: EvalSet) -> int | None:
        """``max_images``, and for the 75 generated corruption subsets also ``subset_max_images``."""
        caps = [cfg.max_images]
        if cfg.suite == "auto" and s.name != s.group:
            caps.append(cfg.subset_max_images)
        given = [int(c) for c in caps if c is not None]
        return min(given) if given else None

    scores: dict[str, Score] = {}
    outcomes: dict[str, Outcomes] = {}  # per image, traced to its index in the split (Numbered)
    skipped: dict[str, int] = {}  # unreadable or incomplete samples per group of sets
    for s in tqdm(sets, desc="evaluate", unit="set", disable=None, file=sys.stderr):
        # reads of unreadable images; samples a shard holds incompletely once, with the first set
        before = unreadable(s.dataset) - (incomplete(s.dataset) if s is sets[0] else 0)
        got = clean_outcomes(model, s, loader(capped(Numbered(s.dataset), cap(s), seed)), dtype)
        score = score_of(got)
        skipped[s.group] = skipped.get(s.group, 0) + unreadable(s.dataset) - before
        if score.images == 0:
            note(f"{s.name}: skipped, no image with a label to score")
            continue
        scores[s.name], outcomes[s.name] = score, got
    for group, n in skipped.items():
        if n:
            note(f"{group}: {n} unreadable or incomplete image{'s' if n != 1 else ''} skipped")
    table, average = summarise(sets, scores, expected)

    robust: dict[str, dict[str, Any]] = {}
    robust_attack: dict[str, Any] | None = None
    if cfg.robust.enabled and robust_set is not None:
        specs = robust_specs(cfg.robust, size)
        torch.manual_seed(seed)  # the attacks' random starts
        batches = loader(capped(Numbered(robust_set.dataset), cfg.robust.max_images, seed))
        robust, robust_attack = robust_results(
            model,
            batches,
            specs,
            str(cfg.robust.get("attack", "pgd")),
            num_classes=int(spec["num_classes"]),
            seed=seed,
            dtype=dtype,
            warn=note,
            outcomes=outcomes,
        )

    results = {
        "checkpoint": str(weights),
        "suite": cfg.suite,
        "top1_unit": "fraction",
        "model": {"name": spec["name"], "num_classes": spec["num_classes"], "image_size": size},
        "sets": table,
        "average": average,
        "robust_set": robust_set.name if robust else None,
        "robust": robust,
        "robust_attack": robust_attack if robust else None,
        "outcomes": OUTCOMES,
        "warnings": warnings,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # the images behind every number: written first, so that a finished evaluation (results.json) has both
    write_outcomes(out_dir / OUTCOMES, outcomes, split)
    write_json(out_dir / "results.json", results)
    return results


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    results = evaluate(cfg, out_dir)
    print(format_table(results))
    model_run = Path(results["checkpoint"]).parent
    print(
        summary(
            "evaluate",
            out_dir,
            f"results in {shown(out_dir / 'results.json')}",
            f"advpt visualize checkpoint={shown(model_run)}",
        )
    )
