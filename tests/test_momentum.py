"""The momentum teacher shared by methods with a target network (BYOL today)."""

from __future__ import annotations

import torch
from torch import nn

from advpt.methods.momentum import MomentumTeacher, cosine_momentum


def test_the_teacher_follows_by_the_exponential_average_and_copies_buffers() -> None:
    online = {"net": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "head": nn.Linear(4, 2)}
    teacher = MomentumTeacher(online)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in [*online["net"].parameters(), *online["head"].parameters()]:
            p.add_(1.0)
    online["net"].train()(torch.randn(8, 3))  # moves the batch-norm statistics
    teacher.follow(online, 0.9)
    now = teacher.state_dict()
    for name, p in [
        *(("net." + k, v) for k, v in online["net"].named_parameters()),
        *(("head." + k, v) for k, v in online["head"].named_parameters()),
    ]:
        torch.testing.assert_close(now[name], 0.9 * before[name] + 0.1 * p.detach())
    torch.testing.assert_close(now["net.1.running_mean"], online["net"][1].running_mean)
    assert set(now) == set(before)  # the online networks are not held (nor saved) a second time


def test_the_momentum_rises_from_its_base_to_one_along_a_half_cosine() -> None:
    assert cosine_momentum(0, 100, 0.996) == 0.996
    assert abs(cosine_momentum(50, 100, 0.996) - 0.998) < 1e-12
    assert cosine_momentum(100, 100, 0.996) == 1.0 and cosine_momentum(150, 100, 0.996) == 1.0
