"""RotNet: each example's quarter turns and the smoothed label of the rotation the network sees."""

from __future__ import annotations

import torch
from helpers import make_method

from advpt.methods.classify import rotate


def test_rotate_applies_each_examples_quarter_turns() -> None:
    x = torch.rand(8, 3, 5, 5)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = rotate(x, k)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))


def test_rotnet_smoothed_label_is_the_counter_clockwise_rotation_of_the_image_the_network_sees(
    monkeypatch,
) -> None:
    module = make_method("rotnet")
    module.train()
    images = torch.rand(16, 3, 16, 16)
    original = images.clone()
    drawn, fed = [], []
    real_inputs, real_logits = module.inputs_and_targets, module.logits
    monkeypatch.setattr(module, "inputs_and_targets", lambda *a: drawn.append(real_inputs(*a)) or drawn[-1])
    monkeypatch.setattr(module, "logits", lambda x: fed.append(x) or real_logits(x))
    module.training_step(([images], torch.zeros(16, dtype=torch.long)), 0)
    (x,) = fed
    ((_, targets),) = drawn
    quarter_turns = targets.argmax(-1)
    assert set(quarter_turns.tolist()) == {0, 1, 2, 3}
    # label smoothing 0.1 over 4 rotations: 0.925 on the label, 0.025 elsewhere
    expected = torch.nn.functional.one_hot(quarter_turns, 4) * 0.9 + 0.025
    torch.testing.assert_close(targets, expected)
    # the quarter turns (counter-clockwise: torch.rot90 over dims (2, 3)) that give each fed image
    applied = [
        next((k for k in range(4) if torch.equal(x[i], torch.rot90(original, k, dims=(2, 3))[i])), None)
        for i in range(16)
    ]
    assert applied == quarter_turns.tolist()
