"""Plain helpers that several test files import (the fixtures stay in conftest.py): the shipped
configs, the CLI in-process, one method on the micro model, the one-line refusal, and the synthetic
runs (fine-tuned models, report chains, study grids) that more than one file builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from advpt.report.collect import radius_value

CONF = Path(__file__).resolve().parent.parent / "conf"


def load(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


def run_cli(args: list[str]) -> int:
    """``advpt ARGS`` in-process; returns the exit code."""
    from advpt.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def make_method(name: str, attack: dict | None = None, num_classes: int = 10, **method_overrides):
    from advpt.methods import METHODS

    method = {**load("method", name), **method_overrides}
    return METHODS[name](
        model=load("model", "vit_micro"), method=method, attack=attack, num_classes=num_classes
    )


def one_line(err: str, command: str | None = None, *needles: str) -> None:
    """What every refusal promises: one line on stderr (``advpt COMMAND: error: …`` when ``command`` is
    given) that holds each of ``needles``."""
    assert err.count("\n") == 1, err
    if command is not None:
        assert err.startswith(f"advpt {command}: error: "), err
    for needle in needles:
        assert needle in err, err


# -- the methods ------------------------------------------------------------------------------
L2 = {"norm": "l2", "eps": 1.0, "steps": 3}


def batch_for(name: str, n: int = 8, size: int = 16):
    """A batch of ``n`` random images as method ``name`` trains on them: its views (as many, and as large,
    as its augmentation makes), each drawn by its own augmentation, and labels."""
    from advpt.data.transforms import pretrain_views

    augment = pretrain_views(load("method", name)["views"], size)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    per_image = [augment(image) for image in images]
    return [torch.stack(views) for views in zip(*per_image, strict=True)], torch.randint(0, 10, (n,))


def mae_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` (util/pos_embed.py), transcribed in numpy: [1, (1+) g*g, D]."""

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(
        np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64)
    )  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


# -- evaluation: a fine-tuned run, the evaluate config, a model with known robust accuracy --------
MICRO = {"img_size": 16, "patch_size": 4, "global_pool": "avg", "embed_dim": 32, "depth": 2, "num_heads": 2}


def finetuned_run(
    directory: Path, num_classes: int = 10, data: dict | None = None, constant: int | None = None
) -> Path:
    """A fine-tuning run directory as ``advpt finetune`` writes it: model.safetensors + model.json.

    ``constant``: zero the head's weight and put all bias on that class, so the model predicts it for every input.
    """
    import timm
    from safetensors.torch import save_file

    kwargs = {**MICRO, "num_classes": num_classes}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    if constant is not None:
        with torch.no_grad():
            vit.head.weight.zero_()
            vit.head.bias.zero_()
            vit.head.bias[constant] = 10.0
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(directory / "model.safetensors"))
    spec = {
        "name": "vit_tiny_patch16_224",
        "kwargs": kwargs,
        "data": data or {"name": "builtin", "root": None},
        "num_classes": num_classes,
        "pretrained": None,
        "layer_decay": 0.65,
        "optim": "adamw",
    }
    (directory / "model.json").write_text(json.dumps(spec))
    return directory


def compose(*overrides: str):
    from advpt.config import compose

    return compose("evaluate", list(overrides))


FAST = ["max_images=4", "num_workers=0", "batch_size=64", "robust.max_images=4", "robust.steps=1"]


# ------------------------------------------------------------------------------ robust accuracy, closed form
class Linear2(nn.Module):
    """Two classes, logit difference ``w . (x - 0.5)``: the l_p-robust examples are known in closed form."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        z = (x - 0.5).flatten(1) @ self.w.flatten()
        return torch.stack([torch.zeros_like(z), z], dim=-1)


def planted_margins(norm: str, unit: float, side: int = 4) -> tuple[Linear2, Tensor, Tensor, list[int]]:
    """A linear model on side x side images and 42 examples whose robust count at radii 0, unit, 2 unit
    is known: 36, 24, 12.

    Under an l_p ball of radius eps the worst case lowers the margin by eps * ||w||_q (q the dual norm),
    so an example is robust iff margin > eps * ||w||_q. Margins are planted at multiples of
    unit * ||w||_q away from the thresholds at radii 0, unit and 2 unit.
    """
    g = torch.Generator().manual_seed(0)
    shape = (3, side, side)
    w = (torch.rand(shape, generator=g) + 0.5) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    dual = w.abs().sum() if norm == "linf" else w.norm()
    multiples = torch.tensor([-0.5, 0.3, 0.7, 1.4, 1.7, 2.5, 3.0]).repeat(6)  # 42 examples
    y = torch.randint(0, 2, multiples.shape, generator=g)
    logit = (2 * y - 1) * multiples * unit * dual  # signed logit difference: margin * (+1 for class 1)
    # x = 0.5 + noise orthogonal to w + the shift along w that plants the logit; far from the [0,1] edges.
    flat_w = w.flatten()
    noise = (torch.rand(len(y), flat_w.numel(), generator=g) - 0.5) * 0.1
    noise -= (noise @ flat_w)[:, None] * flat_w / flat_w.dot(flat_w)
    x = (0.5 + noise + logit[:, None] * flat_w / flat_w.dot(flat_w)).view(-1, *shape)
    assert x.min() > 0.3 and x.max() < 0.7
    model = Linear2(w)
    assert torch.allclose(model(x)[:, 1], logit, atol=1e-4)
    expected = [int((multiples > k).sum()) for k in (0, 1, 2)]  # 6, 4 and 2 of every 7
    assert expected == [36, 24, 12]
    return model, x, y, expected


# -- report: run folders as the commands write them ------------------------------------------
def make_chain(
    root: Path,
    name: str,
    method: str,
    attack: str,
    eps: float | str,
    sets: dict[str, tuple[float, int]],
    layer_decay: float = 0.85,
    seed: int = 0,
    optim: str = "adamw_lld",
    data: str = "builtin",
    robust: dict[str, dict[str, tuple[float, int]]] | None = None,
) -> Path:
    """pretrain/<name>, finetune/<name>-..., evaluate/<name>-... as the commands write them."""
    if method == "scratch":
        pretrained = "none"
    else:
        pre = root / "pretrain" / name
        pre.mkdir(parents=True, exist_ok=True)
        config = {
            "method": {"name": method},
            "attack": {"name": attack, "default_eps": 0.5},
            "eps": eps,
            "seed": seed,
        }
        (pre / "config.yaml").write_text(yaml.safe_dump(config))
        (pre / "encoder.safetensors").write_bytes(b"")
        pretrained = str(pre / "encoder.safetensors")
    tag = f"{name}-{data}-{optim}-ld{layer_decay}-s{seed}"
    ft = root / "finetune" / tag
    ft.mkdir(parents=True)
    spec = {
        "pretrained": pretrained,
        "layer_decay": layer_decay,
        "optim": {"name": optim},
        "data": {"name": data},
    }
    (ft / "model.json").write_text(json.dumps(spec))
    (ft / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    ev = root / "evaluate" / tag
    ev.mkdir(parents=True)
    results = {
        "checkpoint": str(ft / "model.safetensors"),
        "suite": "auto",
        "sets": {k: {"top1": p, "images": n} for k, (p, n) in sets.items()},
        "robust": {
            norm: {r: {"accuracy": a, "images": n, "eps": radius_value(r)} for r, (a, n) in by.items()}
            for norm, by in (robust or {}).items()
        },
    }
    # a corruption's own entry (per-severity detail) is not a headline set
    results["sets"]["corruptions/fog"] = {"top1": 0.1, "images": 10, "group": "corruptions", "severities": {}}
    (ev / "results.json").write_text(json.dumps(results))
    return ev


def chain_with_outcomes(
    root: Path,
    name: str,
    method: str,
    attack: str,
    eps: float | str,
    skill: float,
    difficulty: dict[str, np.ndarray],
    rng: np.random.Generator,
    decay: float = 0.85,
    outcomes: bool = True,
    ids_from: int = 0,
    optim: str = "adamw_lld",
) -> Path:
    """An evaluation whose outcomes.npz agrees with its results.json: an image is right when its shared
    difficulty (plus a little noise of this model's own) is below ``skill``, so arms are correlated.
    With an ``optim`` other than AdamW, a transfer run: its test split only."""
    from advpt.outcomes import Outcomes, write_outcomes

    if optim != "adamw_lld":
        difficulty = {"builtin": difficulty["builtin"]}
    right = {k: d + 0.1 * rng.standard_normal(len(d)) < skill for k, d in difficulty.items()}
    subsets = [right[k].mean() for k in right if k.startswith("corruptions/")]
    sets = {"builtin": (right["builtin"].mean(), 120)}
    if subsets:
        sets["corruptions"] = (sum(subsets) / len(subsets), 80)
    robust = {"l2": {"0.5": (right["robust/l2/0.5"].mean(), 64)}} if "robust/l2/0.5" in right else None
    ev = make_chain(root, name, method, attack, eps, sets, decay, optim=optim, robust=robust)
    if outcomes:
        per_key = {k: Outcomes(v, np.arange(ids_from, ids_from + len(v))) for k, v in right.items()}
        write_outcomes(ev / "outcomes.npz", per_key, "auto|builtin|seed=0")
    return ev


# -- study -----------------------------------------------------------------------------------
# One arm per attack, one layer decay, a scratch baseline, no transfer: the smallest real grid.
SMALL = [
    "experiment=smoke",
    "experiment.pretrain.methods=[mae]",
    "experiment.finetune.layer_decays=[0.65]",
    "experiment.transfer.datasets=[]",
]
