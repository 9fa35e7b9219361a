"""Every pre-training method: the attack raises the loss, a nominal step trains every parameter, the weight
decay groups, the registry's order, activation checkpointing, the adversarial example figure, and what the
classifiers (RotNet, supervised) share: soft cross-entropy and the weight EMA."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import batch_for, make_method
from torch.utils.data import DataLoader

from advpt.method_table import METHOD_TABLE
from advpt.training.schedule import soft_cross_entropy


@pytest.mark.parametrize("name", list(METHOD_TABLE))
def test_attacked_loss_exceeds_clean_loss(name: str, record_pgd) -> None:
    module = make_method(name, attack={"norm": "linf", "eps": 8 / 255, "steps": 3}, mixup=0.0, cutmix=0.0)
    module.train()
    torch.manual_seed(1)
    module.training_step(batch_for(name, n=16), 0)
    (call,) = record_pgd
    module.eval()
    with torch.no_grad():
        clean = call["loss_fn"](call["x"]).mean()
        x, delta = call["x"], call["delta"]  # a tuple of views is perturbed view by view
        adversarial = (
            tuple(v + d for v, d in zip(x, delta, strict=True)) if isinstance(x, tuple) else x + delta
        )
        attacked = call["loss_fn"](adversarial).mean()
    assert attacked > clean


@pytest.mark.parametrize("name", list(METHOD_TABLE))
def test_nominal_step_trains_every_online_parameter(name: str) -> None:
    module = make_method(name)
    loss = module.training_step(batch_for(name), 0)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", ["mae", "rotnet"])
def test_weight_decay_skips_biases_norms_and_embeddings(name: str) -> None:
    module = make_method(name)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(module, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    for key in (
        "encoder.vit.cls_token",
        "encoder.vit.blocks.0.norm1.weight",
        "encoder.vit.blocks.0.attn.qkv.bias",
    ):
        assert id(named[key]) in no_decay, key
    assert id(named["encoder.vit.blocks.0.attn.qkv.weight"]) not in no_decay
    # MAE's positions are fixed (not optimised at all); the other methods learn them without decay.
    pos = id(named["encoder.vit.pos_embed"])
    assert (pos not in optimised) if name == "mae" else (pos in no_decay)


def test_adversarial_example_figure_shows_the_attack(record_pgd) -> None:
    module = make_method("rotnet", attack={"norm": "linf", "eps": 8 / 255, "steps": 2})
    assert module.example_images() == {}
    module.training_step(batch_for("rotnet"), 0)
    (figure,) = module.example_images().values()
    clean, attacked, shown = figure.split(16, dim=-1)
    (call,) = record_pgd
    torch.testing.assert_close(attacked - clean, call["delta"][:8], atol=1e-6, rtol=0)
    assert shown.min() >= 0 and shown.max() <= 1


def test_soft_cross_entropy_matches_hard_labels() -> None:
    logits, y = torch.randn(5, 7), torch.randint(0, 7, (5,))
    onehot = torch.nn.functional.one_hot(y, 7).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), soft_cross_entropy(logits, y))


class _EncoderAndAverage(L.Callback):
    """The encoder's and its EMA's weights after every optimiser step."""

    def __init__(self) -> None:
        self.online: list[dict[str, torch.Tensor]] = []
        self.average: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.online.append({k: v.detach().clone() for k, v in module.encoder.state_dict().items()})
        self.average.append({k: v.detach().clone() for k, v in module.ema.module.state_dict().items()})


def test_weight_ema_copies_at_the_first_update_and_averages_from_the_second() -> None:
    # timm's convention (train.py passes the count of updates made, get_decay(1) == 0): update 1
    # copies the weights, updates 2, 3, ... average them with the configured decay.
    decay = 0.5
    # A large lr, no drop path: every step moves the weights well beyond the comparison's tolerance.
    method = make_method(
        "supervised", ema_decay=decay, mixup=0.0, cutmix=0.0, base_lr=10.0, drop_path_rate=0.0
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        ((torch.rand(4, 3, 16, 16, generator=g),), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)
    ]
    seen = _EncoderAndAverage()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
    )
    trainer.fit(method, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(seen.online) == 3
    name = "vit.patch_embed.proj.weight"
    assert all((seen.online[k][name] - seen.online[k - 1][name]).abs().max() > 1e-3 for k in (1, 2))
    for name, first in seen.average[0].items():
        if not first.is_floating_point():
            continue
        torch.testing.assert_close(first, seen.online[0][name])  # update 1: a copy
        expected = seen.average[0][name]
        for k in (1, 2):  # updates 2 and 3: decay * average + (1 - decay) * weights
            expected = decay * expected + (1 - decay) * seen.online[k][name]
            torch.testing.assert_close(seen.average[k][name], expected)


def test_the_registry_holds_every_named_method_in_the_names_order() -> None:
    from advpt import names
    from advpt.methods import METHODS

    assert tuple(METHODS) == names.METHODS


@pytest.mark.parametrize("method", ["mae", "supervised"])
def test_activation_checkpointing_recomputes_every_block_and_changes_no_adversarial_update(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``activation_checkpointing=true``: each block's forward with gradients (the K attack passes and
    the training pass) is checkpointed, and two adversarial steps end at the same weights as without."""
    import torch.utils.checkpoint
    from helpers import run_cli
    from safetensors.torch import load_file

    from advpt.training.sharding import blocks

    calls: list[int] = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )
    common = [
        "pretrain",
        f"method={method}",
        "attack=l2",
        "attack.steps=2",
        "model=vit_micro",
        "monitor=none",
    ]
    common += ["trainer.max_steps=2", "trainer.enable_progress_bar=false"]
    for flag in ("false", "true"):
        run = tmp_path / flag
        assert run_cli([*common, f"activation_checkpointing={flag}", f"hydra.run.dir={run}"]) == 0
        if flag == "false":
            assert calls == []
    depth = sum(any(p.requires_grad for p in b.parameters()) for b in blocks(make_method(method)))
    assert len(calls) == 2 * (2 + 1) * depth  # steps x (attack passes + training pass) x trained blocks
    plain, recomputed = (load_file(str(tmp_path / f / "encoder.safetensors")) for f in ("false", "true"))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)
