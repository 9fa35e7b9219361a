"""Runs that fail safely: a diverging run stops before applying a non-finite step, says so in one line,
keeps its last finite checkpoint and exports nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from advpt.training.callbacks import StopOnNonFinite

ADVPT = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "advpt")
QUIET = ["model=vit_micro", "trainer.enable_progress_bar=false"]


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(world_size=1, global_step=7, should_stop=False, precision_plugin=SimpleNamespace())


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_training_before_the_step_moves_anything(broken: str) -> None:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    loss = net(torch.randn(3, 4)).square().mean()
    loss.backward()
    if broken == "gradient":
        net.weight.grad[0, 0] = float("inf")
    module = SimpleNamespace(last_loss=torch.tensor(float("nan")) if broken == "loss" else loss.detach())
    before = [p.detach().clone() for p in net.parameters()]
    trainer, stop = _trainer(), StopOnNonFinite()
    stop.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()
    assert trainer.should_stop and stop.step == 8
    assert stop.found == ("train/loss is nan" if broken == "loss" else "a gradient is not finite")
    # the step was a no-op: no gradient, momentum or weight decay moved a weight
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_a_finite_step_is_left_alone() -> None:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(3, 4)).square().mean()
    loss.backward()
    trainer, stop = _trainer(), StopOnNonFinite()
    stop.on_before_optimizer_step(trainer, SimpleNamespace(last_loss=loss.detach()), optimizer)
    assert not trainer.should_stop and stop.found is None
    assert all(p.grad is not None for p in net.parameters())


def test_under_a_grad_scaler_an_overflowing_gradient_is_the_scaler_s_to_skip() -> None:
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(3, 4)).sum().backward()
    net.weight.grad[0, 0] = float("inf")
    trainer = _trainer()
    trainer.precision_plugin = SimpleNamespace(scaler=object())
    stop = StopOnNonFinite()
    stop.on_before_optimizer_step(trainer, SimpleNamespace(last_loss=torch.tensor(1.0)), optimizer)
    assert not trainer.should_stop


def _finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "args", "product"),
    [
        ("pretrain", ["monitor=none", "method.base_lr=10000", "trainer.max_steps=40"], "encoder.safetensors"),
        ("finetune", ["pretrained=none", "optim.lr=1e7", "trainer.max_steps=40"], "model.safetensors"),
    ],
)
def test_a_diverging_run_is_one_line_exit_1_keeps_finite_weights_and_exports_nothing(
    command: str, args: list[str], product: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [ADVPT, command, *QUIET, *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"advpt {command}: error:")]
    assert len(errors) == 1 and "training stopped at optimiser step" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (run / product).exists() and not (run / "run.json").exists()
    assert _finite(run / "checkpoints" / "last.ckpt")
