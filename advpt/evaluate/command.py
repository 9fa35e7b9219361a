"""The ``evaluate`` command: check the config, score every set and the attacks (an encoder: its kNN),
write ``results.json``."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from advpt.config import check_arguments, positive_int
from advpt.data.skipping import eval_loader, eval_loaders, incomplete, unreadable_in
from advpt.data.variants import EvalSet
from advpt.errors import UserError
from advpt.evaluate.checkpoint import image_size, load_classifier, read_spec, resolve_checkpoint
from advpt.evaluate.encoder import (
    check_fits,
    encoder_data,
    is_encoder,
    knn_results,
    knn_settings,
    resolve_encoder,
)
from advpt.evaluate.encoder import load as load_encoder
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
from advpt.published import TIMM
from advpt.runs import shown, summary


def _optional_cap(value: Any, key: str) -> None:
    if value is not None:
        positive_int(value, key)


def _precision(value: Any) -> torch.dtype | None:
    key = str(value)
    if key not in PRECISIONS:
        raise UserError(f"precision={value} is not supported; choose 32 or bf16")
    return PRECISIONS[key]


def _check_data(data: dict[str, Any], size: int, touch_data: bool, whose: str, train: bool) -> None:
    """The dataset is known and there; with ``touch_data`` its test split (and ``train``: its training
    split) can be built."""
    from advpt.data.sources import SOURCES, build_source

    if data["name"] not in SOURCES:
        raise UserError(f"{whose} data {data['name']!r} is not a known dataset ({', '.join(SOURCES)})")
    if data["name"] == "shards":  # a folder, or a list / pattern of shard URLs, local or remote
        from advpt.data.shards import Located

        Located(data)  # one line when the shards' folder or info.json is not there
    elif data["name"] != "builtin":
        root = Path(str(data.get("root") or "data")).expanduser()
        downloadable = data["name"] in ("cifar10", "cifar100") and data.get("download")
        if not root.exists() and not downloadable:
            raise UserError(f"{whose} data.root={root} does not exist; pass data_root=PATH")
    if not touch_data:
        return
    for split, name in ((False, "test"), (True, "training"))[: 2 if train else 1]:
        if build_source(data, train=split, image_size=size) is None:
            raise UserError(
                f"data {data['name']} at {data.get('root')} has no {name} split "
                "(an ImageFolder needs ROOT/val or ROOT/test); pass data_root=PATH"
            )


def _knn_wanted(cfg: DictConfig, encoder: bool) -> bool:
    """``knn.enabled``: null means on for an encoder, off for a fine-tuned classifier."""
    return encoder if cfg.knn.enabled is None else bool(cfg.knn.enabled)


def _check_encoder(cfg: DictConfig, touch_data: bool) -> None:
    """``checkpoint=`` an encoder: scored by kNN alone, on its data."""
    from advpt.data.sources import SOURCES, check_source

    if cfg.suite != "auto":
        raise UserError(
            f"suite={cfg.suite} scores a classifier; checkpoint={cfg.checkpoint} is an encoder without "
            "a classifier head, scored by kNN: leave suite out"
        )
    if not _knn_wanted(cfg, encoder=True):
        raise UserError(
            f"knn.enabled=false leaves nothing to evaluate: checkpoint={cfg.checkpoint} is an encoder "
            "without a classifier head, scored by kNN alone"
        )
    encoder = resolve_encoder(cfg.checkpoint, cfg.get("model"))
    check_fits(encoder)
    data, _ = encoder_data(encoder, cfg.get("data"), cfg.data_root)
    if touch_data and data["name"] in SOURCES:  # what pretrain checks: a path that is not there, one line
        check_source(data)
    _check_data(data, encoder.image_size, touch_data, "the encoder's", train=True)


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Check a composed ``evaluate`` config (paths, suite, ranges) before anything is written; returns it."""
    check_arguments("evaluate", cfg)
    if cfg.suite not in SUITES:
        raise UserError(f"unknown suite {cfg.suite!r}; choose one of {', '.join(SUITES)}")
    knn_settings(cfg.knn)
    positive_int(cfg.batch_size, "batch_size")
    if cfg.num_workers is not None:
        positive_int(cfg.num_workers, "num_workers", low=0)
    _precision(cfg.precision)
    if is_encoder(cfg.checkpoint):
        _check_encoder(cfg, touch_data)
        return cfg
    if str(cfg.checkpoint) != "latest" and not Path(str(cfg.checkpoint)).expanduser().exists():
        raise UserError(
            f"checkpoint={cfg.checkpoint} does not exist (give a fine-tuning run directory or its "
            "model.safetensors; or, for kNN, a pre-training run directory, timm:NAME or an MAE release .pth)"
        )
    for group in ("model", "data"):
        if cfg.get(group) is not None:
            raise UserError(
                f"{group}= is for an encoder's kNN evaluation; a fine-tuned model's {group} is read from "
                f"its model.json ({'data_root=PATH moves its data' if group == 'data' else 'leave model= out'})"
            )
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
    if cfg.suite == "auto" or _knn_wanted(cfg, encoder=False):
        train = _knn_wanted(cfg, encoder=False)  # the kNN's bank is the model's training split
        _check_data(data_config(spec, cfg.data_root), size, touch_data, "model.json's", train)
    _optional_cap(cfg.max_images, "max_images")
    _optional_cap(cfg.subset_max_images, "subset_max_images")
    if cfg.robust.enabled:
        robust_specs(cfg.robust, size)
        _optional_cap(cfg.robust.max_images, "robust.max_images")
    return cfg


def _warn_stderr(message: str) -> None:
    print(f"advpt evaluate: warning: {message}", file=sys.stderr)


def _workers(cfg: DictConfig, image_size: int, batch_size: int | None = None) -> int:
    """``num_workers``, or when it is null a count sized to this machine (said on stderr); one line
    instead of a bus error when their batches would not fit in ``/dev/shm``."""
    from advpt.config.machine import batch_bytes, check_shared_memory, describe_workers, loader_workers

    workers = loader_workers(cfg.num_workers)
    batch = int(cfg.batch_size) if batch_size is None else batch_size
    chosen = cfg.num_workers is None
    check_shared_memory(workers, batch_bytes(batch, image_size), "num_workers", "batch_size", chosen)
    if chosen:
        print(f"advpt evaluate: {describe_workers(workers, key='num_workers')}", file=sys.stderr, flush=True)
    return workers


def evaluate(cfg: DictConfig, out_dir: Path, warn: Warn = _warn_stderr) -> dict[str, Any]:
    """Run the configured suite and robust evaluation; write ``out_dir/outcomes.npz`` (which images each
    set and radius got right, :mod:`advpt.outcomes`), then ``out_dir/results.json``; return its content."""
    from tqdm.auto import tqdm

    cfg = check(cfg, touch_data=False)
    if is_encoder(cfg.checkpoint):
        return evaluate_encoder(cfg, out_dir, warn)
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

    workers = _workers(cfg, size)

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
    progress = tqdm(total=len(sets), desc="evaluate", unit="set", disable=None, file=sys.stderr)
    for group, grouped in groupby(sets, key=lambda s: s.group):
        members = list(grouped)  # one loader for the group: the 75 corruption subsets start one pool
        datasets = [m.dataset for m in members]
        # reads of unreadable images; samples a shard holds incompletely once, with the first set
        before = unreadable_in(datasets) - (incomplete(sets[0].dataset) if members[0] is sets[0] else 0)
        shares = [capped(Numbered(d), cap(m), seed) for m, d in zip(members, datasets, strict=True)]
        batches = eval_loaders(shares, int(cfg.batch_size), workers, pin_memory=device.type == "cuda")
        for s, batches_of_s in zip(members, batches, strict=True):
            got = clean_outcomes(model, s, batches_of_s, dtype)
            progress.update()
            score = score_of(got)
            if score.images == 0:
                note(f"{s.name}: skipped, no image with a label to score")
                continue
            scores[s.name], outcomes[s.name] = score, got
        skipped[group] = skipped.get(group, 0) + unreadable_in(datasets) - before
    progress.close()
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
    if _knn_wanted(cfg, encoder=False):  # the backbone's pooled features, the head left out
        data = data_config(spec, cfg.data_root)
        results["knn"] = knn_results(model, data, knn_settings(cfg.knn), seed, int(workers), dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the images behind every number: written first, so that a finished evaluation (results.json) has both
    write_outcomes(out_dir / OUTCOMES, outcomes, split)
    write_json(out_dir / "results.json", results)
    return results


def evaluate_encoder(cfg: DictConfig, out_dir: Path, warn: Warn = _warn_stderr) -> dict[str, Any]:
    """The kNN top-1 (clean and robust) of an encoder without a classifier head; writes
    ``out_dir/results.json`` and returns its content."""
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    source = resolve_encoder(cfg.checkpoint, cfg.get("model"))
    encoder, loaded = load_encoder(source)  # first: timm's weights may turn out to be unreachable
    for message in loaded:  # a resampled position embedding
        note(message)
    data, fallback = encoder_data(source, cfg.get("data"), cfg.data_root)
    if fallback:
        note(fallback)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = knn_settings(cfg.knn)
    knn = knn_results(
        encoder.to(device),
        data,
        settings,
        int(cfg.seed),
        _workers(cfg, source.image_size, settings.batch_size),
        _precision(cfg.precision),
    )
    model = source.model
    results = {
        "checkpoint": source.source,
        "suite": "knn",
        "top1_unit": "fraction",
        "model": {"name": model["name"], "image_size": model["img_size"], "patch_size": model["patch_size"]},
        "data": {"name": data["name"], "root": data.get("root")},
        "knn": knn,
        "warnings": warnings,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)  # the product: the evaluation is finished (advpt.runs)
    return results


def headline(results: Mapping[str, Any], where: Path) -> str:
    """The summary's first line: the kNN top-1 when there is one, and where the results are."""
    knn = results.get("knn")
    said = f"results in {shown(where)}"
    if not knn:
        return said
    robust = knn["robust_top1"]
    scores = f"kNN top-1 {100 * knn['top1']:.2f} %" + (
        f" (robust {100 * robust:.2f} %, {knn['norm']} {knn['eps']:g})" if robust is not None else ""
    )
    return f"{scores}, {said}"


def next_command(results: Mapping[str, Any]) -> str:
    """What to run next: fine-tune an encoder (its run directory; a release with its model=), else
    visualise the fine-tuned model's filters."""
    from hydra.core.hydra_config import HydraConfig

    weights = Path(results["checkpoint"])
    if results["suite"] != "knn":
        return f"advpt visualize checkpoint={shown(weights.parent)}"
    if weights.name == "encoder.safetensors":
        return f"advpt finetune pretrained={shown(weights.parent)}"
    source = results["checkpoint"]
    model = HydraConfig.get().runtime.choices.get("model")
    shown_source = source if source.startswith(TIMM) else shown(weights)
    return f"advpt finetune pretrained={shown_source}" + (f" model={model}" if model else "")


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    results = evaluate(cfg, out_dir)
    print(format_table(results))
    print(summary("evaluate", out_dir, headline(results, out_dir / "results.json"), next_command(results)))
