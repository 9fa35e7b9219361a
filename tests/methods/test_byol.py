"""BYOL: its loss and the pairing of the views, the target held fixed during the attack, and the
momentum update of the target after each optimiser step."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import L2, batch_for, make_method
from torch.utils.data import DataLoader

from advpt.methods.byol import byol_loss
from advpt.methods.momentum import cosine_momentum


def test_byol_loss_and_momentum_schedule() -> None:
    a = torch.randn(4, 8)
    torch.testing.assert_close(byol_loss(a, 3 * a), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(byol_loss(a, -a), torch.full((4,), 4.0))
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_byol_target_is_fixed_during_the_attack(record_pgd, monkeypatch) -> None:
    module = make_method("byol", attack=L2)
    module.train()
    before = {k: v.clone() for k, v in module.target.state_dict().items()}
    calls = []
    real = module.target_projection
    monkeypatch.setattr(module, "target_projection", lambda x: calls.append(1) or real(x))
    loss = module.training_step(batch_for("byol"), 0)
    assert len(calls) == 1, "target projections are computed once, before the attack, and reused"
    for k, v in module.target.state_dict().items():
        if not k.endswith("num_batches_tracked") and "running" not in k:
            assert torch.equal(v, before[k]), k
    loss.backward()
    assert all(p.grad is None for p in module.target.parameters())
    (call,) = record_pgd
    assert call["x"].shape[0] == 16  # both views attacked, each against the other view's target


def test_byol_ema_update_moves_target_towards_online() -> None:
    module = make_method("byol")
    with torch.no_grad():
        for p in module.encoder.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in module.target["encoder"].parameters()]
    module.update_target(0.9)
    for p_t, p_0, p_o in zip(
        module.target["encoder"].parameters(), t0, module.encoder.parameters(), strict=True
    ):
        torch.testing.assert_close(p_t, 0.9 * p_0 + 0.1 * p_o)


def test_byol_loss_is_summed_over_both_directions() -> None:
    module = make_method("byol")
    assert module.reduce(torch.ones(16)) == pytest.approx(2.0)


def test_byol_loss_pairs_each_views_prediction_with_the_other_views_target_projection() -> None:
    module = make_method("byol")
    module.train()
    n = 8
    view1 = torch.rand(n, 3, 16, 16)
    view2 = 0.3 * torch.rand(n, 3, 16, 16).flip(-1)  # unlike view 1, so its target projections differ
    loss = module.training_step(([view1, view2], torch.zeros(n)), 0)
    with torch.no_grad():  # the step's batched passes (batch norm: the same batch statistics)
        online = module.online(torch.cat([view1, view2]))
        target = module.target_projection(torch.cat([view1, view2]))
    p1, p2, z1, z2 = online[:n], online[n:], target[:n], target[n:]
    cross = byol_loss(p1, z2).mean() + byol_loss(p2, z1).mean()
    same = byol_loss(p1, z1).mean() + byol_loss(p2, z2).mean()
    assert (cross - same).abs() > 0.05, "the two pairings must give different losses for this test"
    torch.testing.assert_close(loss, cross, atol=1e-5, rtol=1e-5)


class _ByolSnapshots(L.Callback):
    """Online and target networks (parameters and buffers) before and after every training step."""

    def __init__(self) -> None:
        self.before: list[dict[str, dict[str, torch.Tensor]]] = []
        self.after: list[dict[str, dict[str, torch.Tensor]]] = []

    @staticmethod
    def snapshot(module) -> dict[str, dict[str, torch.Tensor]]:
        def tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in [*net.named_parameters(), *net.named_buffers()]}

        online = torch.nn.ModuleDict({"encoder": module.encoder, "projector": module.projector})
        return {"online": tensors(online), "target": tensors(module.target)}

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self.before.append(self.snapshot(module))

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.after.append(self.snapshot(module))


def test_byol_optimizer_step_averages_the_updated_online_weights_on_the_cosine_schedule_and_copies_buffers(
    tmp_path,
) -> None:
    """A real Lightning step: target_k = tau_k target_{k-1} + (1 - tau_k) online_k (online_k after the
    optimiser's update), tau_k BYOL's cosine schedule at step k, and the batch-norm buffers copied."""
    base_tau, steps, n = 0.5, 3, 4
    # tau_base 0.5 and a large lr make each term of the average visible: tau_k = 0.5, 0.625, 0.875.
    module = make_method("byol", momentum=base_tau, base_lr=0.04)
    g = torch.Generator().manual_seed(0)
    views = [[torch.rand(n, 3, 16, 16, generator=g) for _ in range(2)] for _ in range(steps)]
    seen = _ByolSnapshots()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[seen],
    )
    batches = [(pair, torch.zeros(n, dtype=torch.long)) for pair in views]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.estimated_stepping_batches == steps and len(seen.after) == steps
    parameters = [k for k, _ in module.target.named_parameters()]
    buffers = [k for k, _ in module.target.named_buffers()]
    assert "projector.1.running_mean" in buffers
    for k, (before, after) in enumerate(zip(seen.before, seen.after, strict=True)):
        tau = cosine_momentum(k, steps, base_tau)
        assert tau == pytest.approx(1 - (1 - base_tau) * (math.cos(math.pi * k / steps) + 1) / 2)
        online, target, previous = after["online"], after["target"], before["target"]
        for name in parameters:
            assert not torch.equal(online[name], before["online"][name]), f"step {k}: {name} not trained"
            expected = tau * previous[name] + (1 - tau) * online[name]
            torch.testing.assert_close(
                target[name], expected, atol=1e-6, rtol=1e-5, msg=lambda m, k=k, p=name: f"step {k}, {p}: {m}"
            )
        for name in buffers:
            copied = torch.equal(target[name], online[name])
            assert copied, f"step {k}: {name} not copied into the target"
        assert not torch.equal(
            online["projector.1.running_mean"], before["online"]["projector.1.running_mean"]
        )
