"""The one projected-gradient attack (paper eqs. 1-2), shared by every method and by evaluation.

An attack is a threat model (how to start, step and project for one norm) plus a generic loop
that maximises any loss closure ``loss_fn(x_adv) -> per-example loss``. Nothing here knows which
model or task it attacks: methods pass a closure over their own loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor], Tensor]


def _flat_norm(t: Tensor, p: float) -> Tensor:
    """Per-example norm, shaped to broadcast against ``t``."""
    n = t.flatten(1).norm(p=p, dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


class LinfThreat:
    """l_inf ball: uniform start, signed-gradient steps, clipping projection."""

    name = "linf"

    def random_init(self, x: Tensor, eps: float, support: Tensor | None = None) -> Tensor:
        delta = torch.empty_like(x).uniform_(-eps, eps)
        return delta if support is None else delta * support

    def step(self, delta: Tensor, grad: Tensor, step_size: float) -> Tensor:
        return torch.add(delta, grad.sign(), alpha=step_size)

    def project(self, delta: Tensor, eps: float) -> Tensor:
        return delta.clamp(-eps, eps)

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(dim=1)


class L2Threat:
    """l2 ball: uniform start in the ball, normalised-gradient steps, per-example rescaling."""

    name = "l2"

    def random_init(self, x: Tensor, eps: float, support: Tensor | None = None) -> Tensor:
        # Uniform in the ball of the supported coordinates (dimension d per example): gaussian
        # direction there, radius eps * U^(1/d). Masking a full-image draw instead would start
        # at about eps * sqrt(supported fraction), deep inside the ball.
        direction = torch.randn_like(x)
        if support is None:
            d = torch.full((x.shape[0],), float(x[0].numel()), device=x.device)
        else:
            support = torch.broadcast_to(support.to(x.dtype), x.shape)
            direction = direction * support
            d = support.flatten(1).sum(dim=1).clamp_min(1.0)
        direction = direction / _flat_norm(direction, 2).clamp_min(1e-12)
        radius = torch.rand(x.shape[0], device=x.device) ** (1.0 / d.float())
        return direction * (eps * radius).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def step(self, delta: Tensor, grad: Tensor, step_size: float) -> Tensor:
        return torch.addcmul(delta, grad, step_size / _flat_norm(grad, 2).clamp_min(1e-12))

    def project(self, delta: Tensor, eps: float) -> Tensor:
        scale = (eps / _flat_norm(delta, 2).clamp_min(1e-12)).clamp(max=1.0)
        return delta * scale

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).norm(p=2, dim=1)


THREATS = {"linf": LinfThreat, "l2": L2Threat}


@dataclass(frozen=True)
class Attack:
    """PGD settings: ``norm`` in {linf, l2}, radius ``eps``, ``steps`` K, step size alpha.

    ``step_size`` defaults to the paper's 5*eps/8. ``restarts`` > 1 keeps, per example, the
    perturbation with the highest final loss (evaluation only).
    """

    norm: str
    eps: float
    steps: int = 2
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.norm not in THREATS:
            raise ValueError(f"unknown attack norm {self.norm!r}; choose one of {sorted(THREATS)}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"attack radius must be a finite number >= 0, got {self.eps}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("attack steps and restarts must be >= 1")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 5.0 * self.eps / 8.0

    @property
    def threat(self) -> LinfThreat | L2Threat:
        return THREATS[self.norm]()


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Put ``module`` in eval mode with no parameter requiring a gradient for the duration; restore
    every submodule's own mode and every parameter's flag afterwards.

    Eval mode keeps normalisation statistics fixed and turns off dropout / drop-path, so the
    attack changes no training state; saving the flags per submodule keeps modules that were
    deliberately in eval mode (a frozen target network, say) as they were. With the parameters
    frozen, autograd records only the path to the input, so the attack's backward passes never
    prepare a weight gradient (measured: about 3 % of an adversarial step on CPU).
    """
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in grads:
            p.requires_grad_(flag)


FP16_SCALE = 2.0**15
"""The first loss scale under float16 (as a GradScaler's, less one power of two: a gradient of 2**16
entering float16 is already inf)."""


def runs_in_fp16(x: Tensor, model: nn.Module | None) -> bool:
    """Whether the loss's backward passes through float16: fp16 autocast, or an fp16 input or model."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return True
    if x.dtype == torch.float16:
        return True
    return model is not None and any(p.dtype == torch.float16 for p in model.parameters())


def input_gradient(loss_of: Callable[[Tensor], Tensor], delta: Tensor, scale: float) -> Tensor:
    """d sum(loss) / d delta, with the loss multiplied by ``scale`` before the backward pass.

    Under float16 an input gradient below its smallest subnormal (6e-8) is 0, and so is the step taken
    from it; a loss scale lifts the backward pass into fp16's range (neither the sign of the gradient nor
    its l2 direction depends on the scale, and it is divided out). A scale that overflows (a non-finite
    gradient) is lowered 8-fold and the pass repeated; at 1 what is still not finite is set to 0, so no
    example steps on an inf or nan. ``scale`` 1 (fp32, bf16) is the plain gradient.
    """
    scaled = scale != 1.0
    while True:
        delta.requires_grad_(True)
        loss = loss_of(delta)
        (grad,) = torch.autograd.grad(loss.sum() * scale if scaled else loss.sum(), delta)
        if not scaled:  # fp32 / bf16: the gradient as it is, no extra pass over it
            return grad
        if scale <= 1.0 or bool(torch.isfinite(grad).all()):
            return torch.nan_to_num(grad / scale, nan=0.0, posinf=0.0, neginf=0.0)
        scale = max(1.0, scale / 8.0)


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    attack: Attack,
    *,
    model: nn.Module | None = None,
    support: Tensor | None = None,
    lower: float = 0.0,
    upper: float = 1.0,
) -> Tensor:
    """Return a perturbation ``delta`` (detached, same shape as ``x``) that maximises ``loss_fn``.

    ``loss_fn(x_adv)`` returns the per-example loss (shape ``[B]``) or a scalar sum of them; every
    example is attacked independently. ``model`` is switched to eval mode during the attack and
    restored afterwards. ``support`` (broadcastable to ``x``, 0/1) restricts the perturbation to
    part of the input, e.g. MAE's visible patches; norms are then taken over that part only and the
    random start is uniform in the ball of that part.
    Only the gradient with respect to the input is computed (``torch.autograd.grad``), so no
    parameter ``.grad`` is touched and no weight gradient is evaluated. Where the backward pass runs
    in float16 the loss is scaled first (:func:`input_gradient`), so small gradients do not vanish.
    """
    threat, eps, alpha = attack.threat, attack.eps, attack.alpha
    x = x.detach()
    if eps == 0:
        return torch.zeros_like(x)
    work = x.float()  # the perturbation lives in fp32 even when the model runs in bf16/fp16
    low, high = lower - work, upper - work  # the perturbations that keep a valid image

    def constrain(delta: Tensor) -> Tensor:
        # Supported coordinates only: the start and every step's gradient are masked (below).
        return threat.project(delta, eps).clamp(low, high)

    def per_example(delta: Tensor) -> Tensor:
        loss = loss_fn((work + delta).to(x.dtype))
        return loss.float().expand(x.shape[0]) if loss.dim() == 0 else loss.float()

    scale = FP16_SCALE if runs_in_fp16(x, model) else 1.0
    best_delta, best_loss = None, None
    with frozen(model), torch.enable_grad():
        for _ in range(attack.restarts):
            delta = threat.random_init(work, eps, support) if attack.random_start else torch.zeros_like(work)
            delta = constrain(delta)
            for _ in range(attack.steps):
                grad = input_gradient(per_example, delta, scale)
                if support is not None:  # the step's direction (l2: its norm) over the supported part only
                    grad = grad * support
                delta = constrain(threat.step(delta.detach(), grad, alpha))
            if attack.restarts == 1:
                return delta.detach().to(x.dtype)
            with torch.no_grad():
                final = per_example(delta)
            if best_delta is None:
                best_delta, best_loss = delta.detach(), final
            else:
                better = final > best_loss
                best_delta = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta.detach(), best_delta)
                best_loss = torch.maximum(final, best_loss)
    assert best_delta is not None
    return best_delta.to(x.dtype)
