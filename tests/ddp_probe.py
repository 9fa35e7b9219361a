"""A 2-process CPU (gloo) run that records what each rank saw, for tests/test_distributed.py.

``python tests/ddp_probe.py MODES OUT``: Lightning's own launcher starts the second process (this is
a plain script); MODES, comma-separated, run one after another in the same two processes. Modes
``nominal`` / ``attacked`` count DDP's gradient reductions (a comm hook) per optimiser step of
adversarial MAE; ``byol`` saves each rank's BYOL target network; ``monitor`` saves the kNN monitor's
features and scores computed by both ranks together and by rank 0 alone. Under FSDP
(``trainer.strategy=fsdp``, advpt.training.sharding): ``fsdp_nominal`` / ``fsdp_attacked`` (and ``fsdp_hooks_attacked``,
without advpt's one gathering for the whole attack) count FSDP's all-gathers and reduce-scatters per optimiser step of MAE, ``fsdp_byol`` records BYOL's
target, online network and momentum around the last update on each rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from advpt.data.module import PretrainData
from advpt.methods import METHODS

CONF = Path(__file__).resolve().parent.parent / "conf"
REDUCTIONS: list[int] = []
COLLECTIVES: dict[str, int] = {"all_gather": 0, "reduce_scatter": 0}


def counted(name: str, collective):  # noqa: ANN001, ANN202
    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        COLLECTIVES[name] += 1
        return collective(*args, **kwargs)

    return call


# FSDP2 calls these through the torch.distributed module (its _fsdp_collectives).
torch.distributed.all_gather_single = counted("all_gather", torch.distributed.all_gather_single)
torch.distributed.reduce_scatter_single = counted("reduce_scatter", torch.distributed.reduce_scatter_single)


class CountCollectives(L.Callback):
    """FSDP's collectives from the start of the first optimiser step to the end of the last."""

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        if not self.__dict__.get("started"):
            self.started = True
            COLLECTIVES.update(all_gather=0, reduce_scatter=0)

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.seen = dict(COLLECTIVES)


def counting_allreduce(state, bucket):  # noqa: ANN001 - DDP's comm-hook signature
    REDUCTIONS.append(bucket.buffer().numel())
    return allreduce_hook(state, bucket)


class CountReductions(L.Callback):
    """Puts the counting hook on the DDP wrapper (Lightning registers comm hooks only on CUDA)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(state=None, hook=counting_allreduce)


def main(modes: str, out: Path) -> None:
    for mode in modes.split(","):
        REDUCTIONS.clear()
        probe(mode, out)


def probe(mode: str, out: Path) -> None:
    from advpt.training.sharding import ShardedDataParallel

    load = lambda group, name: yaml.safe_load((CONF / group / f"{name}.yaml").read_text())  # noqa: E731
    if mode == "fsdp_hooks_attacked":  # FSDP's hooks alone, without advpt's gathering for the attack
        import contextlib

        import advpt.methods.base

        advpt.methods.base.gathered = lambda module: contextlib.nullcontext()
    name = "byol" if mode.endswith("byol") else "mae"
    attack = {"norm": "l2", "eps": 0.5, "steps": 2} if mode.endswith("attacked") else None
    method = METHODS[name]
    if mode == "fsdp_byol":
        method = RecordedBYOL
    module = method(
        model=load("model", "vit_micro"), method=load("method", name), attack=attack, batch_size=8
    )
    fsdp = mode.startswith("fsdp")
    counter = CountCollectives()
    data = PretrainData(load("data", "builtin") | {"batch_size": 8}, views=name, image_size=16, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ShardedDataParallel() if fsdp else DDPStrategy(),
        callbacks=[counter] if fsdp else [CountReductions()],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    out.mkdir(parents=True, exist_ok=True)
    if mode == "byol":
        torch.save(module.target.state_dict(), out / f"target{rank}.pt")
    elif mode == "fsdp_byol":
        torch.save(module.recorded, out / f"fsdp_byol{rank}.pt")
    elif fsdp:
        (out / f"{mode}{rank}.json").write_text(json.dumps({**counter.seen, "steps": trainer.global_step}))
    elif mode == "monitor":
        monitor_probe(module, trainer, out)
    else:
        (out / f"{mode}{rank}.json").write_text(
            json.dumps({"reductions": len(REDUCTIONS), "steps": trainer.global_step})
        )


class RecordedBYOL(METHODS["byol"]):
    """BYOL that keeps, on each rank, the whole networks around its last target update."""

    def update_target(self, tau: float) -> None:
        from advpt.training.sharding import full_state

        before = full_state(self.target)
        super().update_target(tau)
        self.recorded = {
            "tau": tau,
            "before": before,
            "after": full_state(self.target),
            "online": {
                f"{name}.{k}": v
                for name in ("encoder", "projector")
                for k, v in full_state(getattr(self, name)).items()
            },
        }


def monitor_probe(module: L.LightningModule, trainer: L.Trainer, out: Path) -> None:
    from advpt.attacks import Attack
    from advpt.data.module import Transformed
    from advpt.data.sources import Digits
    from advpt.data.transforms import eval_transform
    from advpt.training.monitor import KnnMonitor, capped

    def split(train: bool, size: int) -> Transformed:
        return capped(Transformed(Digits(train=train, size=16), eval_transform(16)), size, seed=0)

    # Uneven shares: 70 bank images in 9 batches of 8 (rank 0 takes 5), 45 queries in 6 (the last of 5).
    monitor = KnnMonitor(split(True, 70), split(False, 45), Attack("l2", 1.0, steps=2), batch_size=8)
    encoder, rank, world, gather = (
        module.encoder,
        trainer.global_rank,
        trainer.world_size,
        trainer.strategy.all_gather,
    )
    found = {
        "two": monitor.measure(encoder, rank, world, gather, epoch=3),
        "features_two": monitor.encode(encoder, monitor.queries, rank, world, gather, robust=True, epoch=3),
    }
    if rank == 0:
        found["one"] = monitor.measure(encoder, epoch=3)
        found["features_one"] = monitor.encode(encoder, monitor.queries, robust=True, epoch=3)
        torch.save(found, out / "monitor.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
