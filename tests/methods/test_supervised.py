"""Supervised pre-training: it needs labels, and its attack and update share the mixed (or, for an odd
batch, only smoothed) targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import L2, make_method

import advpt.methods.base as base
import advpt.methods.classify as classify


def test_supervised_needs_labels() -> None:
    with pytest.raises(ValueError):
        make_method("supervised", num_classes=0)


def _record_classifier(module, monkeypatch) -> dict[str, list]:
    """Spy on a classifier's training step: what ``inputs_and_targets`` returns, the input the attack
    starts from, and the targets of every cross-entropy, each marked as inside the attack or not."""
    seen: dict[str, list] = {"drawn": [], "attack": [], "ce": []}
    in_attack = []
    real_pgd, real_ce, real_inputs = base.pgd, classify.soft_cross_entropy, module.inputs_and_targets

    def pgd(loss_fn, x, attack, **kwargs):
        seen["attack"].append(x.clone())
        in_attack.append(True)
        try:
            return real_pgd(loss_fn, x, attack, **kwargs)
        finally:
            in_attack.pop()

    def ce(logits, target):
        seen["ce"].append((bool(in_attack), target.clone()))
        return real_ce(logits, target)

    def inputs_and_targets(images, labels):
        out = real_inputs(images, labels)
        seen["drawn"].append(tuple(t.clone() for t in out))
        return out

    monkeypatch.setattr(base, "pgd", pgd)
    monkeypatch.setattr(classify, "soft_cross_entropy", ce)
    monkeypatch.setattr(module, "inputs_and_targets", inputs_and_targets)
    return seen


def test_supervised_attack_and_update_use_the_same_mixed_targets(monkeypatch) -> None:
    module = make_method("supervised", attack=L2)  # shipped mixup 0.8, cutmix 1.0, smoothing 0.1
    module.train()
    seen = _record_classifier(module, monkeypatch)
    np.random.seed(0)  # timm's mixup draws from numpy
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    original = images.clone()
    assert torch.isfinite(module.training_step(([images], labels), 0))
    assert len(seen["drawn"]) == 1, "inputs and targets are drawn once per step"
    ((mixed, targets),) = seen["drawn"]
    assert not torch.allclose(targets, module.smoothed(labels)), "the batch must be mixed for this test"
    assert not torch.equal(mixed, original)
    (start,) = seen["attack"]
    assert torch.equal(start, mixed), "the attack starts from the mixed images"
    attack_targets = [t for inside, t in seen["ce"] if inside]
    update_targets = [t for inside, t in seen["ce"] if not inside]
    assert len(attack_targets) >= L2["steps"] and len(update_targets) == 1
    assert all(torch.equal(t, targets) for t in attack_targets), "the attack's targets are not the mixed ones"
    assert torch.equal(update_targets[0], targets), "the update's targets are not the mixed ones"


def test_supervised_odd_batch_trains_unmixed_images_on_label_smoothed_targets(monkeypatch) -> None:
    # timm's Mixup pairs example i with example B-1-i and asserts an even batch; an odd batch (a
    # dataset's last, smaller batch) is trained as is: no mixing, only label smoothing.
    module = make_method("supervised", attack=L2)
    assert module.mixup is not None
    module.train()
    seen = _record_classifier(module, monkeypatch)
    np.random.seed(0)
    images, labels = torch.rand(7, 3, 16, 16), torch.tensor([0, 1, 2, 3, 9, 9, 5])
    original = images.clone()
    assert torch.isfinite(module.training_step(([images], labels), 0))
    ((fed, targets),) = seen["drawn"]
    assert torch.equal(fed, original) and torch.equal(seen["attack"][0], original)
    # smoothing 0.1 over 10 classes: 0.91 on the label, 0.01 elsewhere
    expected = torch.nn.functional.one_hot(labels, 10) * 0.9 + 0.01
    torch.testing.assert_close(targets, expected)
    assert all(torch.equal(t, targets) for _, t in seen["ce"])
