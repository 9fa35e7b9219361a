"""Seconds per training step, nominal vs PGD-K, for every method on the same batch, in one run.

    python benchmarks/step_cost.py                                   # CPU: tiny ViT, 32 px
    python benchmarks/step_cost.py --model cpu --methods mae supervised --batches 16 64 256
    python benchmarks/step_cost.py --model vit_base_patch16 --batch 64 --precision bf16 --methods mae supervised

    python benchmarks/step_cost.py --model vit_base_patch16 --batch 128 --precision bf16 --compile --methods mae supervised
      (with --compile it also prints each setting's first step: the time to compile before training)
    python benchmarks/step_cost.py --model cpu --methods mae byol --threads 1 --clock cpu  # against lightly

On a GPU it also prints the model FLOP utilisation: FLOPs of one training step (counted by
torch's FlopCounterMode, attack included) per second, over the GPU's dense bf16 peak.

With lightly installed (the ``bench`` extra: ``pip install -e '.[bench]'``, which ``make bench`` does)
it also times the same-size nominal MAE and BYOL steps of lightly, a well-kept SSL library
(``benchmarks/peer.py`` says how its steps are built), and prints advpt / lightly. The comparison is
made fair by running both in one process on one batch: the same tensors, the same timm ViT from the
same ``conf/model`` entry, the same decoder and head sizes, the same AdamW, the same thread count
(torch's intra-op pool, printed in the header), the same warm-up steps, then advpt nominal, advpt
PGD and lightly timed in turn step by step (so drift in machine load hits all alike), each the
median of ``--steps``. The table also gives the ratio of the steps' FLOPs (torch's FlopCounterMode,
one extra untimed step each): 1.00 says both sides did the same arithmetic. On a shared machine,
other processes inflate wall-clock times (two intra-op threads wait on each other when a core is
taken); ``--threads 1 --clock cpu`` counts the CPU seconds of this process instead.

A nominal step costs about 3 forward-equivalents (forward + backward); each PGD iteration about 2
(forward + backward to the input only), so PGD-2 should cost about 7/3 = 2.33x a nominal step. The
table prints that arithmetic as counted (the FLOP ratio, adversarial / nominal step, torch's
FlopCounterMode) beside the time ratio, and their quotient ("excess"): the attack's time per FLOP
against the nominal step's. An attack that also computed weight gradients, re-ran the clean forward
or copied the model would show up as an excess well above 1.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from advpt.methods import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (benchmarks/ is not a package)

CONF = Path(__file__).resolve().parent.parent / "conf"


WARMUP = 2  # untimed steps per setting first: allocator, autotuning, lazy init


def load(group: str, name: str) -> dict:
    """A config group option as a dict, its Hydra ``defaults`` (other options of the group) merged in first."""
    cfg = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    merged: dict = {}
    for default in cfg.pop("defaults", []):
        if isinstance(default, str) and default != "_self_":
            merged.update(load(group, default))
    return {**merged, **cfg}


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
        if hasattr(module, "update_target"):  # a momentum teacher follows the online networks every step
            module.update_target(0.99)

    return step


def method_views(method: str, batch_size: int, size: int, device: torch.device) -> list[torch.Tensor]:
    """A batch of the views the method trains on (as many, and as large, as its augmentation makes), each
    made by its own augmentation from random images."""
    from advpt.data.transforms import pretrain_views

    augment = pretrain_views(load("method", method)["views"], size)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    per_image = [augment(image) for image in images]
    return [torch.stack(views).to(device) for views in zip(*per_image, strict=True)]


def timed(step, batch, device: torch.device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_tiny_patch4_32", help="a conf/model/ option")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="a sweep of batch sizes (instead of --batch)"
    )
    parser.add_argument(
        "--steps", type=int, default=6, help=f"timed steps per setting (after {WARMUP} warm-up steps)"
    )
    parser.add_argument("--attack-steps", type=int, default=2)
    parser.add_argument("--norm", default="l2", choices=["l2", "linf"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed seconds; cpu: CPU seconds of this process, which other processes on a "
        "shared machine do not inflate (CPU only; use with --threads 1, as more threads add spin-waits)",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU devices only")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # methods log outside a Trainer here

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = load("model", args.model)
    size = int(model["img_size"])
    eps = 0.5 if args.norm == "l2" else 4 / 255
    attack = {"norm": args.norm, "eps": eps, "steps": args.attack_steps}
    print(
        f"# {args.model} {size}px, batch {' '.join(map(str, args.batches or [args.batch]))}, {args.precision}, {device}, PGD-{args.attack_steps} "
        f"{args.norm}{', compiled' if args.compile else ''}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock, median of {args.steps} after {WARMUP} warm-up steps"
    )
    with_peer = peer.available()
    if not with_peer:
        print(f"# {peer.INSTALL_HINT}")
    peer_rows: list[tuple[str, float, float, float]] = []
    peak = peak_flops(device)
    mfu_head = f" {'nominal MFU':>11} {'adv MFU':>8}" if peak else ""
    print(
        f"{'method':<11} {'batch':>5} {'nominal s/step':>15} {'adv s/step':>11} {'time ratio':>10} "
        f"{'FLOP ratio':>10} {'excess':>7} {'nominal img/s':>14} {'adv img/s':>10}" + mfu_head
    )
    for batch_size in args.batches or [args.batch]:
        for method in args.methods:
            torch.manual_seed(0)
            batch = (
                method_views(method, batch_size, size, device),
                torch.randint(0, 10, (batch_size,), device=device),
            )
            steps = {
                "nominal": make_step(method, model, None, device, args.precision, args.compile),
                "adv": make_step(method, model, attack, device, args.precision, args.compile),
            }
            torch.manual_seed(0)
            lightly_step = (
                peer.make_peer_step(
                    method, model, load("method", method), device, args.precision, args.compile
                )
                if with_peer
                else None
            )
            if lightly_step is not None:
                steps["peer"] = lightly_step
            first: dict[str, float] = {}
            for name, step in steps.items():
                first[name] = timed(step, batch, device)  # with --compile: tracing and compiling
                for _ in range(WARMUP - 1):
                    step(batch)
            if args.compile:
                print(
                    f"# {method} batch {batch_size}: first step (compiling) "
                    + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in first.items())
                )
            times: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(args.steps):  # interleaved, so drift in machine load hits all alike
                for name, step in steps.items():
                    times[name].append(timed(step, batch, device, clock))
            nominal, adv = statistics.median(times["nominal"]), statistics.median(times["adv"])
            flops = {name: step_flops(steps[name], batch) for name in ("nominal", "adv")}
            if "peer" in times:
                work = flops["nominal"] / max(1, step_flops(steps["peer"], batch))
                peer_rows.append((method, nominal, statistics.median(times["peer"]), work))
            mfu = (
                f" {flops['nominal'] / nominal / peak:>11.1%} {flops['adv'] / adv / peak:>8.1%}"
                if peak
                else ""
            )
            flop_ratio = flops["adv"] / flops["nominal"]
            print(
                f"{method:<11} {batch_size:>5} {nominal:>15.4f} {adv:>11.4f} {adv / nominal:>10.2f} "
                f"{flop_ratio:>10.3f} {adv / nominal / flop_ratio:>7.3f} "
                f"{batch_size / nominal:>14.1f} {batch_size / adv:>10.1f}" + mfu
            )
    if peer_rows:
        print(f"\n# nominal step against lightly {peer.version()} (same batch, model, optimiser, threads)")
        print(
            f"{'method':<11} {'advpt s/step':>13} {'lightly s/step':>15} {'advpt/lightly':>14} {'FLOP ratio':>11}"
        )
        for method, ours, theirs, work in peer_rows:
            print(f"{method:<11} {ours:>13.4f} {theirs:>15.4f} {ours / theirs:>14.2f} {work:>11.2f}")


if __name__ == "__main__":
    main()
