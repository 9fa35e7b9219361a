"""A 2-process CPU (gloo) run that records what each rank saw, for tests/test_distributed.py.

``python tests/ddp_probe.py MODES OUT``: Lightning's own launcher starts the second process (this is
a plain script); MODES, comma-separated, run one after another in the same two processes. Modes
``nominal`` / ``attacked`` count DDP's gradient reductions (a comm hook) per optimiser step of
adversarial MAE; ``byol`` saves each rank's BYOL target network.
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
    load = lambda group, name: yaml.safe_load((CONF / group / f"{name}.yaml").read_text())  # noqa: E731
    name = "byol" if mode == "byol" else "mae"
    attack = {"norm": "l2", "eps": 0.5, "steps": 2} if mode == "attacked" else None
    module = METHODS[name](
        model=load("model", "vit_micro"), method=load("method", name), attack=attack, batch_size=8
    )
    data = PretrainData(load("data", "builtin") | {"batch_size": 8}, views=name, image_size=16, seed=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(),
        callbacks=[CountReductions()],
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
    else:
        (out / f"{mode}{rank}.json").write_text(
            json.dumps({"reductions": len(REDUCTIONS), "steps": trainer.global_step})
        )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
