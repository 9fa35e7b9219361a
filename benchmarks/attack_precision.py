"""Does the attack keep its strength in bf16? Its loss gain under bf16 against fp32, on the same weights.

    python benchmarks/attack_precision.py --device cpu                 # cpu recipe's model, init + trained
    python benchmarks/attack_precision.py --device cpu --models cpu paper --batch 4
    python benchmarks/attack_precision.py --device cuda --models cpu paper --train-steps 300

Each method's training step builds the loss closure its attack maximises (MAE: the reconstruction loss
of one mask; BYOL: the cosine loss against the target's projection of the other view; RotNet and
supervised: cross-entropy; DINO: the student's cross-entropy against the teacher on the other global
crop; MoCo v3: InfoNCE against the momentum encoder's keys; SimCLR: NT-Xent of both views, attacked
together). The two views of BYOL, DINO, MoCo v3 and SimCLR are the digits and their mirror images (DINO
without local crops): the benchmark draws no random augmentation. For one batch of built-in digits
(resized to the model), one seed and one set of weights, that closure is built and attacked three ways:

- ``32-true``: fp32 throughout (the reference);
- ``bf16-mixed``: under bf16 autocast, as Lightning's ``bf16-mixed`` runs it;
- ``fsdp``: weights and the input cast to bf16 before the model, as FSDP's ``MixedPrecisionPolicy``
  (``param_dtype=bf16``) does: the image is normalised in bf16 too;

and the gain is ``mean(loss(x + delta) - loss(x))`` in the attack's mode (eval, frozen weights), each
scored in its own precision. A fourth column scores the bf16-found delta with the fp32 closure: is the
perturbation found in bf16 as strong where it counts. The same random start and mask are used
throughout. Radii are the paper's (224 px), converted to the model's side (l2 x side / 224); weights at
initialisation and, for models up to ``--train-max-side`` px, after ``--train-steps`` nominal steps
(AdamW) on the built-in digits, whose sharper losses are where rounding could matter more.

The last line is ``min bf16/fp32 attack gain: X``, the smallest ratio of any bf16 column to fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import load  # noqa: E402  (benchmarks/ is not a package)

from advpt.attacks import Attack, frozen, pgd  # noqa: E402
from advpt.methods import METHODS  # noqa: E402
from advpt.radii import from_paper  # noqa: E402

COLUMNS = ("bf16 in fp32", "fsdp in fp32", "bf16", "fsdp")
"""The gains compared with fp32's: the delta found under bf16-mixed, then under FSDP's policy, each scored
in fp32 (the attack's strength), then each scored in its own precision (what train/loss_attacked -
train/loss_clean logs)."""

RADII = [("l2", 0.5), ("l2", 2.0), ("linf", 1 / 255), ("linf", 4 / 255)]
"""The paper's radii, in its 224-px units."""


def digits(batch: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` built-in training digits at ``side`` px, and their labels."""
    from advpt.data.sources import Digits

    data = Digits(train=True, size=side)  # uint8 pixels, as the loaders read them
    images = torch.stack([data[i][0] for i in range(batch)]).float() / 255
    labels = torch.tensor([int(data[i][1]) for i in range(batch)])
    return images.to(device), labels.to(device)


def build(method: str, model: dict, device: torch.device) -> Any:
    settings = {**load("method", method), "mixup": 0.0, "cutmix": 0.0, "drop_path_rate": 0.0}
    module = METHODS[method](model=model, method=settings, attack=None, num_classes=10)
    module.log = lambda *_a, **_k: None  # no Trainer here
    module._logging_step = lambda: False
    return module.to(device)


MEASURED = ("mae", "byol", "rotnet", "supervised", "dino", "mocov3", "simclr")
"""The methods whose views this benchmark builds without augmentation."""

PAIRED = ("byol", "dino", "mocov3", "simclr")
"""The methods that train on two views of each image."""


def views(method: str, images: torch.Tensor) -> list[torch.Tensor]:
    """The images, and for two-view methods their mirror too; DINO's (empty) stack of local crops."""
    if method not in MEASURED:
        raise SystemExit(f"attack_precision.py: {method}'s views are not built here; choose from {MEASURED}")
    if method not in PAIRED:
        return [images]
    pair = [images, images.flip(-1)]
    if method == "dino":  # no local crops: [B, 0, C, h, w]
        pair.append(images.new_empty(images.shape[0], 0, *images.shape[1:]))
    return pair


def plus(x: Any, delta: Any) -> Any:
    """x + delta, for an input or a tuple of inputs (two views, each in its own ball)."""
    if isinstance(x, tuple):
        return tuple(a + b for a, b in zip(x, delta, strict=True))
    return x + delta


def cast(x: Any, dtype: torch.dtype) -> Any:
    """An input, or each of a tuple of inputs, in ``dtype``."""
    return tuple(a.to(dtype) for a in x) if isinstance(x, tuple) else x.to(dtype)


def train(module: Any, method: str, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """``steps`` nominal AdamW steps on this batch's images (and their labels): sharper, trained losses."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()
    for _ in range(steps):
        loss = module.training_step((views(method, images), labels), 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(module, "update_target"):  # BYOL's target, MoCo v3's momentum encoder
            module.update_target(0.99)
        if method == "dino":
            module.teacher.follow(module.student_networks(), 0.99)


def closure(module: Any, method: str, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple:
    """The loss closure the method's attack would maximise on this batch (and the input and support it
    would attack), built by its own training step with this seed (MAE's mask)."""
    found: dict[str, Any] = {}

    def capture(loss_fn, x, support=None, coupled=False):
        found.update(loss_fn=loss_fn, x=x, support=support, coupled=coupled)
        return x

    module.attacked = capture
    torch.manual_seed(seed)
    module.train()
    # The step runs in train mode, so it moves the batch norms' running statistics (and DINO's centre),
    # which the attack's eval-mode passes read: they are put back, so that every closure (fp32, bf16,
    # FSDP's copy) attacks the same network, and a difference between them is precision's alone.
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    with torch.no_grad():
        module.training_step((views(method, images), labels), 0)
        for buffer, value in saved:
            buffer.copy_(value)
    return found["loss_fn"], found["x"], found["support"], found["coupled"]


def gain(loss_fn: Callable, x: Any, delta: Any, module: Any) -> float:
    with torch.no_grad(), frozen(module):
        return float((loss_fn(plus(x, delta)).float() - loss_fn(x).float()).mean())


def setting(
    module: Any, method: str, images: torch.Tensor, labels: torch.Tensor, radii: list, steps: int
) -> list[dict[str, float]]:
    """For each radius: the attack's gain in fp32, in bf16 autocast, under FSDP's bf16 policy, and of the
    bf16 delta scored in fp32."""
    device = images.device
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    seed = 0
    rows = []
    with torch.no_grad():
        fp32_fn, x, support, coupled = closure(module, method, images, labels, seed)
        with bf16:
            bf16_fn, _, _, _ = closure(module, method, images, labels, seed)
        half = copy.deepcopy(module).to(torch.bfloat16)
        fsdp_fn, _, fsdp_support, _ = closure(half, method, images.bfloat16(), labels, seed)
    for norm, eps in radii:
        attack = Attack(norm=norm, eps=eps, steps=steps)
        torch.manual_seed(1)
        d32 = pgd(fp32_fn, x, attack, model=module, support=support, coupled=coupled)
        torch.manual_seed(1)
        with bf16:
            d16 = pgd(bf16_fn, x, attack, model=module, support=support, coupled=coupled)
        torch.manual_seed(1)
        x16 = cast(x, torch.bfloat16)
        dfs = pgd(fsdp_fn, x16, attack, model=half, support=fsdp_support, coupled=coupled)
        g32 = gain(fp32_fn, x, d32, module)
        with bf16:
            g16 = gain(bf16_fn, x, d16, module)
        gfs = gain(fsdp_fn, x16, dfs, half)
        rows.append(
            {
                "norm": norm,
                "eps": eps,
                "fp32": g32,
                "bf16 in fp32": gain(fp32_fn, x, cast(d16, torch.float32), module),
                "fsdp in fp32": gain(fp32_fn, x, cast(dfs, torch.float32), module),
                "bf16": g16,
                "fsdp": gfs,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["cpu"], help="conf/model options")
    parser.add_argument("--methods", nargs="+", default=list(MEASURED))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attack-steps", type=int, default=2, help="PGD steps (the pre-training default)")
    parser.add_argument("--train-steps", type=int, default=200, help="nominal steps for the trained weights")
    parser.add_argument(
        "--train-max-side", type=int, default=64, help="train only models this small (CPU time); 0: never"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"# {device}, torch {torch.__version__}, batch {args.batch}, PGD-{args.attack_steps}; "
        "gain = mean(loss(x + delta) - loss(x)), radii in the paper's 224-px units"
    )
    print(
        "| model | method | weights | attack | fp32 | bf16-mixed delta, in fp32 | fsdp delta, in fp32 "
        "| bf16-mixed, as logged | fsdp, as logged |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = float("inf")
    for name in args.models:
        model = load("model", name)
        side = int(model["img_size"])
        images, labels = digits(args.batch, side, device)
        radii = [(norm, from_paper(norm, eps, side)) for norm, eps in RADII]
        for method in args.methods:
            torch.manual_seed(0)
            module = build(method, model, device)
            states = ["init"]
            if args.train_steps > 0 and side <= args.train_max_side:
                states.append(f"{args.train_steps} steps")
            for state in states:
                if state != "init":
                    train(module, method, images, labels, args.train_steps)
                for (norm, paper_eps), row in zip(
                    RADII, setting(module, method, images, labels, radii, args.attack_steps), strict=True
                ):
                    ratios = [row[k] / row["fp32"] for k in COLUMNS]
                    worst = min(worst, *ratios[:2])  # the delta's strength, each scored in fp32
                    label = f"l2 {paper_eps:g}" if norm == "l2" else f"l_inf {round(paper_eps * 255)}/255"
                    cells = " | ".join(
                        f"{row[k]:.4g} ({r:.3f})" for k, r in zip(COLUMNS, ratios, strict=True)
                    )
                    print(
                        f"| {name} ({side} px) | {method} | {state} | {label} | {row['fp32']:.4g} | {cells} |"
                    )
                sys.stdout.flush()
    print(
        "(each cell: the gain, and in brackets its ratio to fp32's; the min is over the deltas found in bf16 "
        "and scored in fp32: the logged columns also carry bf16's rounding of the two losses they subtract)"
    )
    print(f"min bf16/fp32 attack gain: {worst:.3f}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
