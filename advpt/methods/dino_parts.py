"""DINO's parts (Caron et al. 2021; facebookresearch/dino): the head, the loss over crops, the centre and the
schedules of ``main_dino.py`` / ``utils.py``, written as functions of tensors and steps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advpt.training.sharding import local


class UnitLinear(nn.Module):
    """A linear layer without bias whose weight rows are divided by their norms: ``weight_norm`` with the
    norm fixed to 1 (DINO's ``norm_last_layer``), ``y = x (v / ||v||)^T`` per output.

    Written out rather than through ``torch.nn.utils.parametrizations.weight_norm``: with the gain frozen
    at 1 the parametrisation is only this division, and a plain parameter is one tensor that FSDP2
    shards, the teacher's ``deepcopy`` copies and the EMA averages as every other weight (a
    parametrisation is two tensors behind a property, and timm's optimiser would see its frozen gain).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's, as the official layer keeps

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head: an MLP (``layers`` linear layers, GELU, no batch norm) to a bottleneck, L2
    normalised, then :class:`UnitLinear` to ``out_dim`` logits (``vision_transformer.DINOHead``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (max(layers, 1) - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            mlp += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(dims) - 2 else [])
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = UnitLinear(bottleneck, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_probabilities(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """P_t = softmax((g_t(x) - c) / tau_t): the teacher's centred, sharpened distribution."""
    return F.softmax((teacher_logits.float() - center.float()) / temperature, dim=-1)


def cross_entropy(target: Tensor, student_logits: Tensor, student_temperature: float) -> Tensor:
    """Per-example H(P_t, P_s) = -sum_k P_t,k log softmax(g_s / tau_s)_k."""
    log_p = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(target * log_p).sum(dim=-1)


def dino_loss(
    student_logits: Sequence[Tensor], targets: Sequence[Tensor], student_temperature: float
) -> Tensor:
    """Per-example DINO loss: the mean over every pair (global crop q, crop v), v != q, of
    H(P_t(x_q), P_s(x_v)). ``student_logits``: one [B, K] per crop, the global crops first (in the order of
    ``targets``), then the local ones; ``targets``: the teacher's distribution on each global crop."""
    log_ps = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student_logits]
    terms = [
        -(q * log_p).sum(dim=-1) for iq, q in enumerate(targets) for v, log_p in enumerate(log_ps) if v != iq
    ]
    return torch.stack(terms).mean(dim=0)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> None:
    """c <- m c + (1 - m) mean of the teacher's logits over the global crops of every process, in place."""
    import torch.distributed as dist

    batch_center = teacher_logits.float().sum(dim=0, keepdim=True)
    count = teacher_logits.shape[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(batch_center)
        count *= dist.get_world_size()
    center.mul_(momentum).add_(batch_center / count, alpha=1.0 - momentum)


def teacher_temperature(step: int, warmup: int, start: float, end: float) -> float:
    """tau_t at ``step``: ``np.linspace(start, end, warmup)[step]`` during the warm-up, then ``end``
    (``DINOLoss.teacher_temp_schedule``, there by epoch, here by whatever unit ``step`` counts)."""
    if step >= warmup:
        return end
    return start + (end - start) * step / max(warmup - 1, 1)


def cosine_value(step: int, total: int, base: float, final: float) -> float:
    """``utils.cosine_scheduler(base, final, ...)[step]`` without warm-up: from ``base`` at step 0 along a
    half cosine towards ``final`` (DINO's weight decay, 0.04 -> 0.4, per step)."""
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.no_grad()
def clip_per_parameter(parameters: Iterable[nn.Parameter], clip: float) -> None:
    """``utils.clip_gradients``: each parameter's gradient rescaled to norm at most ``clip`` on its own
    (not the global norm); a sharded gradient by the norm of the whole tensor."""
    from torch.distributed.tensor import DTensor

    for p in parameters:
        if p.grad is None:
            continue
        norm = p.grad.norm(2)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        local(p.grad).mul_((clip / (norm + 1e-6)).clamp(max=1.0))
