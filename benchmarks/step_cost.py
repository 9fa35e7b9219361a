"""Seconds per training step, nominal vs PGD-K, for every method on the same batch, in one run.

    python benchmarks/step_cost.py                                   # CPU: tiny ViT, 32 px
    python benchmarks/step_cost.py --model vit_base_patch16 --batch 64 --precision bf16 --methods mae supervised

    python benchmarks/step_cost.py --model vit_base_patch16 --batch 128 --precision bf16 --compile --methods mae supervised

On a GPU it also prints the model FLOP utilisation: FLOPs of one training step (counted by
torch's FlopCounterMode, attack included) per second, over the GPU's dense bf16 peak.

A nominal step costs about 3 forward-equivalents (forward + backward); each PGD iteration about 2
(forward + backward to the input only), so PGD-2 should cost about 7/3 = 2.33x a nominal step. An
attack that also computed weight gradients, re-ran the clean forward or copied the model would
show up here as a ratio above 2.5.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from pathlib import Path

import torch
import yaml

from advpt.methods import METHODS

CONF = Path(__file__).resolve().parent.parent / "conf"


def load(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


# Dense bf16 tensor-core peaks (FLOP/s) by device name, for the utilisation estimate.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def step_flops(step, batch) -> int:
    """FLOPs of one whole training step (forwards, attack, backward), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return counter.get_total_flops()


def make_step(
    method: str, model: dict, attack: dict | None, device: torch.device, precision: str, compile: bool = False
):
    module = METHODS[method](
        model=model,
        method={**load("method", method), "mixup": 0.0, "cutmix": 0.0},
        attack=attack,
        num_classes=10,
        compile=compile,
    )
    module.configure_model()
    module.to(device).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    def step(batch) -> None:
        with autocast:
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method == "byol":
            module.update_target(0.99)

    return step


def timed(step, batch, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny_patch4_32", help="a conf/model/ option")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps per setting (after 2 warm-up steps)"
    )
    parser.add_argument("--attack-steps", type=int, default=2)
    parser.add_argument("--norm", default="l2", choices=["l2", "linf"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # methods log outside a Trainer here

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = load("model", args.model)
    size = int(model["img_size"])
    eps = 0.5 if args.norm == "l2" else 4 / 255
    attack = {"norm": args.norm, "eps": eps, "steps": args.attack_steps}
    print(
        f"# {args.model} {size}px, batch {args.batch}, {args.precision}, {device}, PGD-{args.attack_steps} "
        f"{args.norm}{', compiled' if args.compile else ''}"
    )
    peak = peak_flops(device)
    mfu_head = f" {'nominal MFU':>11} {'adv MFU':>8}" if peak else ""
    print(
        f"{'method':<11} {'nominal s/step':>15} {'adv s/step':>11} {'ratio':>6} {'nominal img/s':>14} {'adv img/s':>10}"
        + mfu_head
    )
    for method in args.methods:
        torch.manual_seed(0)
        views = [
            torch.rand(args.batch, 3, size, size, device=device) for _ in range(2 if method == "byol" else 1)
        ]
        batch = (views, torch.randint(0, 10, (args.batch,), device=device))
        steps = {
            "nominal": make_step(method, model, None, device, args.precision, args.compile),
            "adv": make_step(method, model, attack, device, args.precision, args.compile),
        }
        for step in steps.values():
            for _ in range(2):
                step(batch)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.steps):  # interleaved, so drift in machine load hits both alike
            for name, step in steps.items():
                times[name].append(timed(step, batch, device))
        nominal, adv = statistics.median(times["nominal"]), statistics.median(times["adv"])
        mfu = ""
        if peak:
            flops = {name: step_flops(step, batch) for name, step in steps.items()}
            mfu = f" {flops['nominal'] / nominal / peak:>11.1%} {flops['adv'] / adv / peak:>8.1%}"
        print(
            f"{method:<11} {nominal:>15.4f} {adv:>11.4f} {adv / nominal:>6.2f} "
            f"{args.batch / nominal:>14.1f} {args.batch / adv:>10.1f}" + mfu
        )


if __name__ == "__main__":
    main()
