"""The ``visualize`` command: patch-embedding filters of one or more checkpoints, side by side (App. D, Fig. 4).

Each checkpoint (a run directory, ``encoder.safetensors``, ``model.safetensors`` or a Lightning ``.ckpt``)
gives one panel: the first principal components of its standardised patch-embedding weights
(``advpt.filters``), titled from the run's ``config.yaml`` (method, attack, radius) when there is one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from advpt.errors import UserError
from advpt.method_table import SCRATCH_LABEL
from advpt.trust import load_checkpoint

# What a run directory is read from, in order of preference.
RUN_FILES = ("encoder.safetensors", "model.safetensors", "checkpoints/last.ckpt")
ACCEPTED = "a run directory, encoder.safetensors, model.safetensors or a Lightning .ckpt"
# Lightning checkpoints of every method keep the trained encoder here (BYOL's EMA target sits elsewhere).
LIGHTNING_ENCODER = "encoder.vit."


def resolve(value: Any) -> Path:
    """The weights file one ``checkpoint=`` entry names."""
    if str(value) == "latest":  # the newest finished pretrain run, else fine-tuning run
        from advpt.runs import resolve_latest_input

        return resolve_latest_input("visualize")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint={value} does not exist (give {ACCEPTED})")
    if path.is_dir():
        found = next((path / f for f in RUN_FILES if (path / f).is_file()), None)
        if found is None:
            raise UserError(f"checkpoint={value} holds none of {', '.join(RUN_FILES)} (give {ACCEPTED})")
        return found
    if path.suffix not in (".safetensors", ".ckpt"):
        raise UserError(f"checkpoint={value} is not a weights file (give {ACCEPTED})")
    return path


def resolve_all(value: Any) -> list[Path]:
    values = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not values:
        raise UserError(f"checkpoint=[] names no checkpoint (give {ACCEPTED}, or a list of them)")
    return [resolve(v) for v in values]


def patch_weight(path: Path, prefix: str | None = None) -> Tensor:
    """The patch-embedding conv weight ``[D, C, p, p]`` stored in ``path``."""
    from advpt.filters import PATCH_EMBED_KEY, patch_embedding_weight

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # read the one tensor, not the whole model
                names = list(f.keys())
                state = {k: f.get_tensor(k) for k in names if k.endswith(PATCH_EMBED_KEY)}
        else:
            ckpt = load_checkpoint(path, "checkpoint")
            state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else {}
            if prefix is None and any(str(k).startswith(LIGHTNING_ENCODER) for k in state):
                prefix = LIGHTNING_ENCODER
    except UserError:
        raise
    except Exception as e:  # not a checkpoint at all: one line, whatever the loader raised
        raise UserError(
            f"checkpoint={path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    try:
        return patch_embedding_weight(state, prefix=prefix)
    except ValueError as e:
        raise UserError(f"checkpoint={path}: {e}") from None


def run_dir(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _radius(attack: str, eps: Any) -> str:
    from advpt.config import parse_number

    try:
        value = parse_number(eps, "eps")
    except UserError:
        return str(eps)
    k = value * 255
    if attack == "linf" and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{value:g}"


def _pretrain_title(run: Path) -> str | None:
    """``method attack radius`` (or ``method nominal``) from a pretrain run's config.yaml, if it has one."""
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    except Exception:  # no or unreadable config
        return None
    method = cfg.get("method") if isinstance(cfg, dict) else None
    attack = cfg.get("attack") if isinstance(cfg, dict) else None
    if not (isinstance(method, dict) and isinstance(attack, dict) and "name" in method and "name" in attack):
        return None
    if attack["name"] == "none" or cfg.get("eps") in (0, None):
        return f"{method['name']} nominal"
    return f"{method['name']} {attack['name']} {_radius(attack['name'], cfg['eps'])}"


def _finetune_spec(path: Path) -> dict[str, Any] | None:
    """A fine-tuned model's model.json (None for pre-trained weights)."""
    import json

    if path.name == "encoder.safetensors":
        return None
    spec_path = path.with_suffix(".json") if path.suffix == ".safetensors" else run_dir(path) / "model.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) and ("layer_decay" in spec or "pretrained" in spec) else None


def title(path: Path) -> str:
    """A short panel name: method, attack and radius from the run's config.yaml, else the folder's name.

    A fine-tuned model is named after the run it was fine-tuned from (model.json's ``pretrained``).
    """
    run = run_dir(path)
    spec = _finetune_spec(path)
    if spec is None:
        return _pretrain_title(run) or run.name
    base, pretrained = run.name, spec.get("pretrained")
    if str(pretrained) == "none":
        base = SCRATCH_LABEL
    elif pretrained and Path(str(pretrained)).exists():
        with contextlib.suppress(UserError):
            base = title(resolve(pretrained))
    decay = spec.get("layer_decay")
    return f"{base} fine-tuned" + (f" ld={decay}" if decay is not None else "")


def _unique(titles: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for t in titles:
        seen[t] = seen.get(t, 0) + 1
        out.append(t if seen[t] == 1 else f"{t} ({seen[t]})")
    return out


def check(cfg: DictConfig, touch_data: bool = True) -> DictConfig:
    """Every checkpoint exists and holds a patch embedding; ``components`` is a positive integer."""
    from advpt.config import check_arguments

    check_arguments("visualize", cfg)
    for path in resolve_all(cfg.checkpoint):
        patch_weight(path, cfg.prefix)
    return cfg


def draw(paths: list[Path], path: Path, components: int = 28, prefix: str | None = None) -> Path:
    """Write one filter grid per checkpoint, side by side, to ``path`` (PNG)."""
    from advpt.filters import filter_components, plot_filters

    titles = _unique([title(p) for p in paths])
    panels = [
        (t, filter_components(patch_weight(p, prefix), components))
        for t, p in zip(titles, paths, strict=True)
    ]
    return plot_filters(panels, path)  # rows of 7: the paper's 4 x 7 grid of 28


def run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from advpt.runs import shown, summary

    check(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    paths = resolve_all(cfg.checkpoint)
    out = draw(paths, run_dir / "filters.png", int(cfg.components), cfg.prefix)
    panels = f"{len(paths)} panel{'s' if len(paths) != 1 else ''}"
    print(summary("visualize", run_dir, f"filters of {panels} in {shown(out)}", f"open {shown(out)}"))
