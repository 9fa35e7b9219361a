"""Bytes each process holds for parameters + gradients + AdamW state, DDP against FSDP on N processes.

    python benchmarks/memory.py                                  # ViT-B/16, L/16, H/14; MAE, BYOL; N = 2, 8, 32
    python benchmarks/memory.py --methods mae --processes 4 16
    python benchmarks/memory.py --peak                           # on a GPU: one adversarial step's peak

The model is advpt's own pre-training module (encoder and MAE decoder, or BYOL's online and target
networks), built on the meta device and sharded with advpt's own ``shard`` (one FSDP group per
block and per network) over N ranks of a process group that communicates nothing (torch's
``fake`` backend), so every count comes from the local shards' real sizes, on any machine, in
seconds. fp32 parameters, their gradients and AdamW's two moments: 16 bytes per trained parameter
under DDP; under FSDP each rank keeps its shard of each. Frozen weights (BYOL's target) hold
parameters only.

Not counted: activations, and what FSDP gathers while it computes: one block at a time, and, for
the attack's K passes, every trained group at once (in bf16 under ``bf16-mixed``, 2 bytes per
trained parameter), which ``--peak`` measures with the rest on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "ViT-B/16": {"name": "vit_base_patch16_224"},
    "ViT-L/16": {"name": "vit_large_patch16_224"},
    "ViT-H/14": {"name": "vit_huge_patch14_224", "patch_size": 14},
}


def model_config(name: str) -> dict:
    base = yaml.safe_load((ROOT / "conf" / "model" / "vit_base_patch16.yaml").read_text())
    return {**base, **MODELS[name]}


def build(method: str, model: dict) -> torch.nn.Module:
    from advpt.methods import METHODS

    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{method}.yaml").read_text())
    with torch.device("meta"):
        return METHODS[method](model=model, method=cfg)


def held(module: torch.nn.Module) -> tuple[int, int]:
    """Bytes of (trained parameters x 4: weight, gradient, two AdamW moments; frozen parameters) on rank 0."""
    from advpt.training.sharding import local

    trained = frozen = 0
    for p in module.parameters():
        size = local(p).numel() * p.element_size()
        if p.requires_grad:
            trained += 4 * size
        else:
            frozen += size
    return trained, frozen


def sharded_bytes(method: str, model: dict, world: int) -> tuple[int, int]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from advpt.training.sharding import shard

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        module = build(method, model)
        shard(module, init_device_mesh("cpu", (world,)), "bf16-mixed")
        return held(module)
    finally:
        dist.destroy_process_group()


def adversarial_step(
    method: str, model: dict, batch: int, checkpointing: bool, device: str
) -> torch.nn.Module:
    """One adversarial (PGD-2, l2) bf16-autocast training step with AdamW; the module it trained."""
    from advpt.methods import METHODS

    cfg = yaml.safe_load((ROOT / "conf" / "method" / f"{method}.yaml").read_text())
    module = METHODS[method](
        model=model,
        method={**cfg, "mixup": 0.0, "cutmix": 0.0},
        attack={"norm": "l2", "eps": 0.5, "steps": 2},
        num_classes=1000,
        activation_checkpointing=checkpointing,
    )
    module.configure_model()
    module.to(device).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    size = model["img_size"]
    views = [torch.rand(batch, 3, size, size, device=device) for _ in range(2 if method == "byol" else 1)]
    labels = torch.randint(0, 1000, (batch,), device=device)
    with torch.autocast(torch.device(device).type, torch.bfloat16):
        loss = module.training_step((views, labels), 0)
    loss.backward()
    optimizer.step()
    return module


def peak(method: str, model: dict, batch: int, checkpointing: bool) -> float:
    """GiB at the peak of :func:`adversarial_step` on the GPU."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    module = adversarial_step(method, model, batch, checkpointing, "cuda")
    torch.cuda.synchronize()
    del module
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # (supervised and rotnet hold timm's weight EMA, which cannot be built on the meta device)
    parser.add_argument("--methods", nargs="+", default=["mae", "byol"], choices=["mae", "byol"])
    parser.add_argument("--processes", nargs="+", type=int, default=[2, 8, 32])
    parser.add_argument("--peak", action="store_true", help="also one adversarial step's peak (GPU)")
    parser.add_argument("--batch", type=int, default=64, help="per-GPU batch of --peak")
    args = parser.parse_args()

    gib = 2**30
    header = ["model", "method", "params (M)", "DDP (GiB)"] + [f"FSDP x{n} (GiB)" for n in args.processes]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name in MODELS:
        model = model_config(name)
        for method in args.methods:
            module = build(method, model)
            params = sum(p.numel() for p in module.parameters()) / 1e6
            trained, frozen = held(module)
            cells = [name, method, f"{params:.0f}", f"{(trained + frozen) / gib:.2f}"]
            for world in args.processes:
                t, f = sharded_bytes(method, model, world)
                cells.append(f"{(t + f) / gib:.2f}")
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.peak:
        if not torch.cuda.is_available():
            sys.exit("--peak needs a GPU")
        print(f"\npeak of one PGD-2 step, batch {args.batch}, bf16 autocast, {torch.cuda.get_device_name()}")
        for name in MODELS:
            for method in args.methods:
                plain = peak(method, model_config(name), args.batch, False)
                recomputed = peak(method, model_config(name), args.batch, True)
                print(f"{name} {method}: {plain:.1f} GiB, with activation checkpointing {recomputed:.1f} GiB")


if __name__ == "__main__":
    main()
