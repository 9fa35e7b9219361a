"""The ``export`` command: a fine-tuned classifier as a program that needs only torch to run.

``advpt export checkpoint=<finetune run> out=DIR`` writes ``model.pt2`` (``torch.export``: pixels in
[0,1], ``[B, 3, H, W]`` float32, any batch B >= 1, normalised inside; logits out) and ``model.json``
(classes, image size, mean/std, the file and its format, the run's lineage). Where torch.export cannot
export the model it writes TorchScript instead (``model.ts``, ``torch.jit.trace``) and says so. Each
program is loaded back and checked against the model before ``model.json``, written last, marks it done.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig
from torch import Tensor, nn

from advpt.config import check_arguments
from advpt.data.shards.layout import INFO
from advpt.data.sources import Digits
from advpt.errors import UserError
from advpt.evaluate.checkpoint import image_size, load_classifier, read_spec, resolve_checkpoint
from advpt.files import atomic_path, write_json
from advpt.runs import read_record, shown, summary

SPEC = "model.json"  # written last: its presence marks a finished export
FORMATS = {"torch.export": "model.pt2", "torchscript": "model.ts"}
LOADERS = {"torch.export": "torch.export.load({file!r}).module()", "torchscript": "torch.jit.load({file!r})"}
EXAMPLE_BATCH = 2  # what the program is traced with; its batch dimension stays free
# torchvision's CIFAR-10 class names (it reads them from the dataset's pickled meta file, which advpt never opens).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def out_dir(value: Any) -> Path | None:
    """The folder ``out=`` names (new or empty); ``None``: the run directory."""
    if value is None:
        return None
    if not str(value).strip():
        raise UserError("out= is empty: give a new or empty folder (or leave out= out: the run directory)")
    out = Path(str(value)).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"out={value} exists and is not a folder: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"out={value} is not empty: give a new or empty folder (remove it to export again)")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"out={value} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"out={value} cannot be written: {parent} is not writable")
    return out


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """``checkpoint`` is a fine-tuning run whose model.json matches its weights; ``out`` is new or empty."""
    check_arguments("export", cfg)
    read_spec(resolve_checkpoint(cfg.checkpoint))
    out_dir(cfg.out)
    return cfg


class PixelClassifier(nn.Module):
    """[0,1] pixels in, logits out: the run's normalisation, then the ViT (eval mode, frozen).

    ``mean``/``std`` are plain float32 buffers, so the program holds no device or dtype conversion and
    moves with ``.to(device)``.
    """

    def __init__(self, vit: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.vit = vit
        self.register_buffer("mean", mean.detach().clone().float().view(1, -1, 1, 1))
        self.register_buffer("std", std.detach().clone().float().view(1, -1, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit((x - self.mean) / self.std)


def _export(program: nn.Module, example: Tensor, path: Path) -> None:
    """``torch.export`` with a free batch dimension, saved to ``path`` (written through an open file:
    torch.export.save wants a name ending in .pt2 otherwise)."""
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(program, (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(exported, f)


def _trace(program: nn.Module, example: Tensor, path: Path) -> None:
    """TorchScript by tracing, saved to ``path`` (torch deprecates TorchScript: its warnings are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(program, example)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.jit.save(traced, f)


def _load(path: Path, fmt: str) -> nn.Module:
    if fmt == "torch.export":
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))


def _check_program(path: Path, fmt: str, program: nn.Module, size: int) -> None:
    """The saved program, loaded back, gives the model's logits on batches of 1 and 3 (raises otherwise)."""
    loaded = _load(path, fmt)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, EXAMPLE_BATCH + 1):
        x = torch.rand(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            want, got = program(x), loaded(x)
        scale = max(1.0, float(want.abs().max()))
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
            raise RuntimeError(f"the saved program's logits differ from the model's at batch {batch}")


def write_program(program: nn.Module, size: int, out: Path) -> tuple[str, str | None]:
    """Write ``program`` into ``out`` as torch.export, else TorchScript; returns (format, why not torch.export)."""
    example = torch.rand(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = out / FORMATS["torch.export"]
    try:
        _export(program, example, path)
        _check_program(path, "torch.export", program, size)
        return "torch.export", None
    except Exception as e:  # whatever torch.export cannot do, tracing may still capture
        path.unlink(missing_ok=True)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    path = out / FORMATS["torchscript"]
    try:
        _trace(program, example, path)
        _check_program(path, "torchscript", program, size)
    except Exception as e:
        path.unlink(missing_ok=True)
        raise UserError(
            f"cannot export the model: torch.export failed ({reason}), and so did TorchScript "
            f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
        ) from None
    return "torchscript", reason


# -- model.json: what the program is and where it comes from -----------------------------------------
def class_names(data: Mapping[str, Any], num_classes: int) -> list[str] | list[int]:
    """The class names the run's dataset gives, read cheaply from local files; else the indices."""
    names: list[str] | None = None
    name = data.get("name")
    root = data.get("root")
    local = Path(str(root)).expanduser() if isinstance(root, str) and "://" not in root else None
    try:
        if name == "builtin":
            names = list(Digits.classes)
        elif name == "cifar10":
            names = CIFAR10_CLASSES
        elif name == "imagefolder" and local is not None:
            folder = local / "train" if (local / "train").is_dir() else local
            names = sorted(p.name for p in os.scandir(folder) if p.is_dir())  # ImageFolder's order
        elif name == "shards" and local is not None and local.is_dir():
            names = [str(c) for c in json.loads((local / INFO).read_text()).get("classes", [])]
    except (OSError, ValueError, AttributeError):
        names = None
    return names if names is not None and len(names) == num_classes else list(range(num_classes))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        found = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return found if isinstance(found, dict) else {}


def _pretrain_lineage(source: Any) -> dict[str, Any]:
    """The encoder a run was fine-tuned from: its path, and its pretrain run's method, attack and eps."""
    if source is None or str(source) == "none":
        return {"source": "none"}
    path = Path(str(source)).expanduser()
    # a pretrain run: its folder, its encoder.safetensors or a checkpoints/*.ckpt (not published weights)
    if path.is_dir():
        run = path
    elif path.name == "encoder.safetensors" or path.parent.name == "checkpoints":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        return {"source": str(source)}
    if not (run / "config.yaml").is_file():
        return {"source": str(source)}
    cfg = _read_yaml(run / "config.yaml")
    method, attack = cfg.get("method"), cfg.get("attack")
    recorded = {
        "method": method.get("name") if isinstance(method, dict) else None,
        "attack": attack.get("name") if isinstance(attack, dict) else None,
        "eps": cfg.get("eps"),
        "steps": read_record(run).get("steps"),
    }
    return {"source": str(source), "run": str(run.resolve())} | {
        k: v for k, v in recorded.items() if v is not None
    }


def lineage(weights: Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tuning run behind ``weights`` and the encoder it started from, as far as they are recorded."""
    run = weights.parent
    record = read_record(run)
    optim, data = spec.get("optim"), spec.get("data")
    finetune = {
        "run": str(run.resolve()),
        "weights": str(weights.resolve()),
        "data": data.get("name") if isinstance(data, dict) else None,
        "optim": optim.get("name") if isinstance(optim, dict) else optim,
        "layer_decay": spec.get("layer_decay"),
        "steps": record.get("steps"),
        "val_top1": record.get("val_top1"),
    }
    return {"finetune": finetune, "pretrained": _pretrain_lineage(spec.get("pretrained"))}


def describe(
    weights: Path, spec: Mapping[str, Any], fmt: str, mean: list[float], std: list[float]
) -> dict[str, Any]:
    """``model.json`` of an export."""
    size, num_classes = image_size(spec), int(spec["num_classes"])
    data = spec.get("data") if isinstance(spec.get("data"), Mapping) else {}
    file = FORMATS[fmt]
    return {
        "file": file,
        "format": fmt,
        "load": LOADERS[fmt].format(file=file),
        "input": {"shape": ["batch", 3, size, size], "dtype": "float32", "range": [0, 1], "min_batch": 1},
        "output": f"logits [batch, {num_classes}]",
        "num_classes": num_classes,
        "classes": class_names(data, num_classes),
        "image_size": size,
        "mean": mean,
        "std": std,
        "architecture": {"name": spec["name"], "kwargs": dict(spec["kwargs"])},
        "torch": torch.__version__,
        "lineage": lineage(weights, spec),
    }


def export(checkpoint: Any, out: Path, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export the fine-tuned model ``checkpoint`` names into ``out``; returns model.json's content.

    On failure nothing of it is left: the files written are removed, and ``out`` too if this made it.
    """
    weights = resolve_checkpoint(checkpoint).resolve()
    spec = read_spec(weights)
    model = load_classifier(weights, spec)
    size = image_size(spec)
    program = PixelClassifier(model.vit, model.mean, model.std)
    made = [d for d in (out, *out.parents) if not d.exists()]  # the folders this makes, innermost first
    try:
        _make(out)
        fmt, reason = write_program(program, size, out)
        if reason is not None and warn is not None:
            warn(
                f"torch.export cannot export this model ({reason}); wrote TorchScript instead: {FORMATS[fmt]}"
            )
        description = describe(weights, spec, fmt, _floats(program.mean), _floats(program.std))
        if reason is not None:
            description["torch_export_error"] = reason
        write_json(out / SPEC, description)
    except BaseException:
        for name in (*FORMATS.values(), SPEC):
            (out / name).unlink(missing_ok=True)
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return description


def _make(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out={out} cannot be created ({e.strerror or type(e).__name__})") from None


def _floats(values: Tensor) -> list[float]:
    """float32 values as the shortest decimals that read back as them (0.485, not 0.48500001430511475)."""
    return [float(str(v)) for v in values.flatten().numpy()]


def _warn(message: str) -> None:
    print(f"advpt export: warning: {message}", file=sys.stderr)


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    check(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out = out_dir(cfg.out) or run_dir
    info = export(cfg.checkpoint, out, warn=_warn)
    path = out / info["file"]
    size = info["image_size"]
    headline = (
        f"{info['architecture']['name']} ({info['num_classes']} classes, {size} px) as a {info['format']} "
        f"program: {shown(path)} + {SPEC}"
    )
    load = LOADERS[info["format"]].format(file=shlex.split(shown(path))[0])
    next_command = f'python -c "import torch; print({load}(torch.rand(2, 3, {size}, {size})).shape)"'
    print(summary("export", run_dir, headline, next_command))
