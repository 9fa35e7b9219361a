"""A momentum teacher: frozen copies of online networks that follow them by an exponential moving
average with a cosine-scheduled momentum (BYOL's target; DINO's teacher and MoCo's momentum encoder
are the same object)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from advpt.training.sharding import local


def cosine_momentum(step: int, total: int, base: float) -> float:
    """The teacher's momentum at ``step`` of ``total``: from ``base`` up to 1 along a half cosine
    (BYOL's schedule, also DINO's and MoCo v3's)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1.0) / 2.0


class MomentumTeacher(nn.ModuleDict):
    """Copies of the named online networks, never trained by gradient (``requires_grad`` off), moved
    towards them after each optimiser step by :meth:`follow`.

    A ``ModuleDict``, so the teacher's weights are named ``<attribute>.<network>.…`` in checkpoints. The
    online networks are passed to :meth:`follow` each time rather than held, so they are not registered
    twice. Under FSDP the teacher is sharded as its online networks are, and each process updates its own
    shard.
    """

    def __init__(self, online: Mapping[str, nn.Module]) -> None:
        super().__init__({name: copy.deepcopy(network) for name, network in online.items()})
        self.requires_grad_(False)

    @torch.no_grad()
    def follow(self, online: Mapping[str, nn.Module], momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * online, for every parameter; buffers (batch
        norm statistics) are copied."""
        # timm's ModelEma has no per-step cosine schedule, so the average is a foreach lerp here.
        for name, teacher in self.items():
            source = online[name]
            torch._foreach_lerp_(
                [local(p.data) for p in teacher.parameters()],
                [local(p.data) for p in source.parameters()],
                1.0 - momentum,
            )
            for online_buffer, teacher_buffer in zip(source.buffers(), teacher.buffers(), strict=True):
                teacher_buffer.copy_(online_buffer)
