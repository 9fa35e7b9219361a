"""The ``evaluate`` command: clean, shifted and robust top-1 of a fine-tuned classifier (paper §4, Fig. 5).

Two suites. ``auto`` evaluates on what the model was fine-tuned on (``model.json``'s data config): that
dataset's test split, and the same images under the 15 common corruptions x 5 severities generated on the
fly. ``imagenet_variants`` reads every ImageNet variant present under ``root`` (``advpt.data.variants``).

Scores are grouped: a corruption subset ``<group>/<corruption>/<severity>`` counts towards its group
(``corruptions`` or ``imagenet_c``), reported per corruption (mean over severities) and as one number.
The average is over the headline sets present, saying how many of the suite's sets it covers.

Robust accuracy: PGD (``advpt.attacks``) on the cross-entropy at each radius; an example counts as robust
when the model classifies the attacked input correctly (clean mistakes are attacked too and count as
failures), so robust accuracy is over all attacked images.

``results.json`` (top-1 and accuracies as fractions in [0, 1], ``"top1_unit": "fraction"``)::

    {"checkpoint": path, "suite": ..., "model": {...},
     "sets": {name: {"top1", "images"},                          # a headline set
              group: {"top1", "images", "subsets"},              # corruptions / imagenet_c: mean of subsets
              group/corruption: {"top1", "images", "group", "severities": {"1": top1, ...}}},
     "average": {"top1", "sets": headline sets present, "of": headline sets of the suite},
     "robust_set": name, "robust": {norm: {radius as written: {"accuracy", "images", "eps", "steps",
     "restarts", "step_size"}}}, "warnings": [...], "config": {...}}
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advpt.attacks import Attack, pgd
from advpt.config import check_arguments, parse_number
from advpt.data.variants import EvalSet, group_mean, top1_correct
from advpt.errors import UserError
from advpt.runs import shown, summary

SUITES = ("auto", "imagenet_variants")
# The headline sets of each suite, as ``EvalSet.group`` names; the average says how many were present.
IMAGENET_SETS = (
    "imagenet_val",
    "imagenet_real",
    "imagenet_v2",
    "imagenet_a",
    "imagenet_r",
    "imagenet_sketch",
    "conflict_stimuli",
    "imagenet_c",
)
CORRUPTIONS_GROUP = "corruptions"
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Score:
    """Correct / counted examples of one set (or one attack)."""

    correct: int
    images: int

    @property
    def top1(self) -> float:
        return self.correct / self.images if self.images else float("nan")


# --------------------------------------------------------------------------------------- the checkpoint
def resolve_checkpoint(value: Any) -> Path:
    """The ``model.safetensors`` that ``checkpoint=`` names (a fine-tuning run directory, the file, or latest)."""
    if value is None or str(value) == "latest":
        from advpt.runs import resolve_latest

        return resolve_latest("evaluate")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise UserError(
            f"checkpoint={value} does not exist (give a fine-tuning run directory or its model.safetensors)"
        )
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        if (path / "encoder.safetensors").is_file():
            raise UserError(_pretrained_only(value))
        raise UserError(f"checkpoint={value} holds no model.safetensors (give a fine-tuning run directory)")
    if path.name == "encoder.safetensors":
        raise UserError(_pretrained_only(value))
    if path.suffix != ".safetensors":
        raise UserError(
            f"checkpoint={value} is not a fine-tuned model: give a fine-tuning run directory or its model.safetensors"
        )
    return path


def _pretrained_only(value: Any) -> str:
    return (
        f"checkpoint={value} is a pre-trained encoder without a classifier head; "
        f"fine-tune it first (advpt finetune pretrained={value})"
    )


def read_spec(weights: Path) -> dict[str, Any]:
    """``model.json`` beside ``weights``, checked against the weights' classifier head."""
    from safetensors import SafetensorError, safe_open

    not_model = f"checkpoint={weights} is not a fine-tuned model"
    # <name>.json describes <name>.safetensors; a renamed copy in a run directory falls back on model.json.
    spec_path = next(
        (p for p in (weights.with_suffix(".json"), weights.parent / "model.json") if p.is_file()), None
    )
    if spec_path is None:
        raise UserError(f"{not_model}: model.json is missing beside it")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{not_model}: cannot read {spec_path} ({e})") from None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("kwargs"), dict)
    ):
        raise UserError(f'{not_model}: {spec_path} lacks the timm "name" and "kwargs" of the model')
    classes = spec.get("num_classes", spec["kwargs"].get("num_classes"))
    if not isinstance(classes, int) or classes < 1:
        raise UserError(f"{not_model}: {spec_path} gives no num_classes >= 1 (an encoder without a head?)")
    try:
        with safe_open(str(weights), "pt") as f:
            names = set(f.keys())
            head = f.get_slice("head.weight").get_shape() if "head.weight" in names else None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{not_model}: cannot read it as safetensors ({e})") from None
    if head is None or head[0] != classes:
        raise UserError(f"{not_model}: it has no {classes}-way head.weight as {spec_path.name} says")
    return {**spec, "num_classes": classes}


def image_size(spec: Mapping[str, Any]) -> int:
    size = spec["kwargs"].get("img_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def load_classifier(weights: Path, spec: Mapping[str, Any]) -> nn.Module:
    """The fine-tuned timm ViT (reading [0,1] pixels), in eval mode with frozen parameters."""
    from safetensors.torch import load_file

    from advpt.models import Encoder

    model = Encoder(spec["name"], {**spec["kwargs"], "num_classes": spec["num_classes"]})
    try:
        model.vit.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        first = " ".join(str(e).split())[:300]
        raise UserError(
            f"checkpoint={weights} does not match its model.json ({spec['name']}): {first}"
        ) from None
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------- suites
def data_config(spec: Mapping[str, Any], data_root: Any = None) -> dict[str, Any]:
    data = spec.get("data")
    if not isinstance(data, Mapping) or "name" not in data:
        raise UserError(
            "model.json records no data config to evaluate on (suite=auto); use suite=imagenet_variants root=PATH"
        )
    data = dict(data)
    if data_root is not None:
        data["root"] = str(data_root)
    return data


def auto_sets(data: Mapping[str, Any], size: int, seed: int, corruptions: bool) -> list[EvalSet]:
    """The test split of the model's own dataset, then its 75 generated corruption subsets."""
    from advpt.data.corruptions import CORRUPTIONS, SEVERITIES, CorruptedDataset
    from advpt.data.module import Transformed
    from advpt.data.sources import build_source
    from advpt.data.transforms import eval_transform

    source = build_source(data, train=False, image_size=size)
    if source is None:
        raise UserError(
            f"data {data['name']} at {data.get('root')} has no test split "
            "(an ImageFolder needs ROOT/val or ROOT/test); pass data_root=PATH"
        )
    name = str(data["name"])
    clean = Transformed(source, eval_transform(size))
    sets = [EvalSet(name, clean, top1_correct, name)]
    if corruptions:
        sets += [
            EvalSet(
                f"{CORRUPTIONS_GROUP}/{c}/{s}",
                CorruptedDataset(clean, c, s, seed),
                top1_correct,
                CORRUPTIONS_GROUP,
            )
            for c in CORRUPTIONS
            for s in SEVERITIES
        ]
    return sets


def imagenet_sets(root: Path, size: int, crop_pct: float, warn: Warn) -> list[EvalSet]:
    from torchvision.transforms import v2 as T

    from advpt.data.transforms import BICUBIC
    from advpt.data.variants import build_imagenet_variants

    transform = T.Compose(
        [
            T.ToImage(),
            T.Resize(math.floor(size / crop_pct), interpolation=BICUBIC, antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
    return build_imagenet_variants(root, transform, warn=warn)


def capped(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most ``limit`` items: a random subset fixed by ``seed`` (the same indices for every set of a size)."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(keep.tolist()))


# -------------------------------------------------------------------------------------------- scoring
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def clean_score(
    model: nn.Module,
    evalset: EvalSet,
    batches: Iterable[tuple[Tensor, Any]],
    dtype: torch.dtype | None = None,
) -> Score:
    """Top-1 of ``model`` on ``batches`` as ``evalset`` scores it (subset classes, ReaL labels, ...)."""
    device = _device_of(model)
    correct = counted = 0
    with torch.inference_mode(), _autocast(device, dtype):
        for x, target in batches:
            logits = model(x.to(device, non_blocking=True)).float()
            c, n = evalset.tally(logits, target.to(device))
            correct, counted = correct + c, counted + n
    return Score(correct, counted)


def robust_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: Sequence[Attack],
    dtype: torch.dtype | None = None,
) -> list[Score]:
    """Per attack: how many examples ``model`` still classifies correctly after PGD on the cross-entropy.

    ``model`` maps [0,1] pixels to logits; every example is attacked (clean mistakes stay mistakes), so
    each score's ``top1`` is the robust accuracy over all examples seen.
    """
    device = _device_of(model)
    correct = [0] * len(attacks)
    images = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        images += len(y)

        def loss_fn(x_adv: Tensor, y: Tensor = y) -> Tensor:
            with _autocast(device, dtype):
                logits = model(x_adv)
            return F.cross_entropy(logits.float(), y, reduction="none")

        for i, attack in enumerate(attacks):
            delta = pgd(loss_fn, x, attack, model=model)
            with torch.inference_mode(), _autocast(device, dtype):
                correct[i] += int((model(x + delta).argmax(-1) == y).sum())
    return [Score(c, images) for c in correct]


@dataclass(frozen=True)
class RobustSpec:
    norm: str
    radius: str  # as written in the config, e.g. "2/255"
    attack: Attack


def robust_specs(robust: Mapping[str, Any], size: int) -> list[RobustSpec]:
    """Every (norm, radius) attack the ``robust`` config asks for; raises UserError on a bad value."""
    steps, restarts = robust["steps"], robust["restarts"]
    _positive_int(steps, "robust.steps", "the number of PGD steps must be")
    _positive_int(restarts, "robust.restarts", "the number of restarts must be")
    if robust["step_size"] is None:
        relative = 2.5 / steps
    else:
        relative = parse_number(robust["step_size"], "robust.step_size")
        if not math.isfinite(relative) or relative <= 0:
            raise UserError(f"robust.step_size={robust['step_size']} must be > 0 (a multiple of the radius)")
    norms = robust["norms"]
    if isinstance(norms, str) or not isinstance(norms, Sequence) or not norms:
        raise UserError(f"robust.norms={norms} must be a list, e.g. robust.norms=[linf,l2]")
    l2_max = math.sqrt(3 * size * size)
    specs = []
    for norm in norms:
        if norm not in ("linf", "l2"):
            raise UserError(f"robust.norms: unknown norm {norm!r}; choose from linf, l2")
        radii = robust["radii"].get(norm)
        key = f"robust.radii.{norm}"
        if isinstance(radii, str) or not isinstance(radii, Sequence) or not radii:
            raise UserError(f"{key}={radii} must be a non-empty list of radii, e.g. {key}=[1/255,4/255]")
        for raw in radii:
            eps = parse_number(raw, key)
            if not math.isfinite(eps) or eps < 0:
                raise UserError(f"{key}: radius {raw} is out of range: a radius must be a finite number >= 0")
            if norm == "linf" and eps > 1:
                raise UserError(
                    f"{key}: radius {raw} is not an l_inf radius for images in [0,1]; write k/255"
                )
            if norm == "l2" and eps > l2_max:
                raise UserError(
                    f"{key}: radius {raw} exceeds the largest l2 distance between two {size}px images ({l2_max:.1f})"
                )
            attack = Attack(norm, eps, steps=steps, step_size=relative * eps, restarts=restarts)
            specs.append(RobustSpec(norm, str(raw), attack))
    return specs


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


# ---------------------------------------------------------------------------------------------- output
def format_table(results: Mapping[str, Any]) -> str:
    """``results.json`` as aligned text: top-1 % per set, the average, then robust accuracy."""

    def pct(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    rows = [
        (name if "group" not in e else "  " + name.split("/", 1)[1], e) for name, e in results["sets"].items()
    ]
    avg = results["average"]
    avg_label = f"average ({avg['sets']} of {avg['of']} sets)"
    width = max([len("set"), len(avg_label)] + [len(r) for r, _ in rows])
    lines = [f"checkpoint: {results['checkpoint']}", f"{'set':<{width}}  {'top-1 %':>8}  {'images':>8}"]
    lines += [f"{label:<{width}}  {pct(e['top1']):>8}  {e['images']:>8}" for label, e in rows]
    lines.append(f"{avg_label:<{width}}  {pct(avg['top1']):>8}")
    robust = results.get("robust") or {}
    if robust:
        first = next(iter(next(iter(robust.values())).values()))
        restarts = first["restarts"]
        lines += [
            "",
            f"robust accuracy on {results['robust_set']} "
            f"(PGD-{first['steps']}, {restarts} restart{'s' if restarts > 1 else ''})",
            f"{'norm':<6}  {'radius':>8}  {'top-1 %':>8}  {'images':>8}",
        ]
        for norm, by_radius in robust.items():
            for radius, r in by_radius.items():
                lines.append(f"{norm:<6}  {radius:>8}  {pct(r['accuracy']):>8}  {r['images']:>8}")
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON via a temporary file and ``os.replace`` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------- the command
def _positive_int(value: Any, key: str, what: str = "expected") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}={value} is invalid: {what} an integer >= 1")


def _optional_cap(value: Any, key: str) -> None:
    if value is not None:
        _positive_int(value, key)


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
        if data["name"] != "builtin":
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
    _positive_int(cfg.batch_size, "batch_size")
    workers = cfg.num_workers
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise UserError(f"num_workers={workers} is invalid: expected an integer >= 0 (or null)")
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
    """Run the configured suite and robust evaluation; write ``out_dir/results.json``; return its content."""
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
        expected: Sequence[str] = IMAGENET_SETS
        robust_set = next((s for s in sets if s.name == "imagenet_val"), None)
        if robust_set is None and cfg.robust.enabled:
            note("robust accuracy: skipped, it is measured on imagenet_val, which was not found")
    else:
        sets = auto_sets(data_config(spec, cfg.data_root), size, seed, bool(cfg.corruptions))
        expected = (sets[0].name, CORRUPTIONS_GROUP)
        robust_set = sets[0]

    workers = cfg.num_workers
    if workers is None:
        data = spec.get("data") if cfg.suite == "auto" else None
        workers = (
            int(data.get("num_workers", 0)) if isinstance(data, Mapping) else min(8, os.cpu_count() or 1)
        )

    def loader(dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=int(cfg.batch_size),
            shuffle=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )

    def cap(s: EvalSet) -> int | None:
        """``max_images``, and for the 75 generated corruption subsets also ``subset_max_images``."""
        caps = [cfg.max_images]
        if cfg.suite == "auto" and s.name != s.group:
            caps.append(cfg.subset_max_images)
        given = [int(c) for c in caps if c is not None]
        return min(given) if given else None

    scores: dict[str, Score] = {}
    for s in tqdm(sets, desc="evaluate", unit="set", disable=None, file=sys.stderr):
        score = clean_score(model, s, loader(capped(s.dataset, cap(s), seed)), dtype)
        if score.images == 0:
            note(f"{s.name}: skipped, no image with a label to score")
            continue
        scores[s.name] = score
    table, average = summarise(sets, scores, expected)

    robust: dict[str, dict[str, Any]] = {}
    if cfg.robust.enabled and robust_set is not None:
        specs = robust_specs(cfg.robust, size)
        torch.manual_seed(seed)  # the attacks' random starts
        batches = loader(capped(robust_set.dataset, cfg.robust.max_images, seed))
        for spec_, score in zip(
            specs, robust_accuracy(model, batches, [r.attack for r in specs], dtype), strict=True
        ):
            robust.setdefault(spec_.norm, {})[spec_.radius] = {
                "accuracy": score.top1 if score.images else None,
                "images": score.images,
                "eps": spec_.attack.eps,
                "steps": spec_.attack.steps,
                "restarts": spec_.attack.restarts,
                "step_size": spec_.attack.alpha,
            }

    results = {
        "checkpoint": str(weights),
        "suite": cfg.suite,
        "top1_unit": "fraction",
        "model": {"name": spec["name"], "num_classes": spec["num_classes"], "image_size": size},
        "sets": table,
        "average": average,
        "robust_set": robust_set.name if robust else None,
        "robust": robust,
        "warnings": warnings,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
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
