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
    versions = [(name, b, b._version) for name, b in module.named_buffers()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in grads:
            p.requires_grad_(flag)
    # State a loss keeps in buffers (batch-norm statistics, a centre, a queue, a memory bank) must be as
    # the attack found it: its K passes are not training steps. Every in-place write bumps a tensor's
    # version counter, so the check is free; a buffer rebound to a new tensor is one the attack moved too.
    moved = [name for name, b, version in versions if b._version != version]
    now = dict(module.named_buffers())
    moved += [name for name, b, _ in versions if now.get(name) is not b and name not in moved]
    if moved:
        raise RuntimeError(
            f"the attack's passes changed the state {', '.join(moved[:5])}: a loss may update its state "
            "only in training mode (the attack runs in eval mode), outside the attacked closure"
        )


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
    (grad,) = input_gradients(lambda deltas: loss_of(deltas[0]), [delta], scale)
    return grad


def input_gradients(
    loss_of: Callable[[list[Tensor]], Tensor], deltas: list[Tensor], scale: float
) -> list[Tensor]:
    """:func:`input_gradient` for a loss of several perturbations: each one's gradient, one backward pass."""
    scaled = scale != 1.0
    while True:
        for delta in deltas:
            delta.requires_grad_(True)
        loss = loss_of(deltas)
        grads = list(torch.autograd.grad(loss.sum() * scale if scaled else loss.sum(), deltas))
        if not scaled:  # fp32 / bf16: the gradients as they are, no extra pass over them
            return grads
        if scale <= 1.0 or all(bool(torch.isfinite(g).all()) for g in grads):
            return [torch.nan_to_num(g / scale, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
        scale = max(1.0, scale / 8.0)


Inputs = Tensor | tuple[Tensor, ...]
"""What an attack perturbs: one batch of images, or several of different shapes (a method's views or
crops, say) that its loss reads together; every one has the same examples along dimension 0."""


def pgd(
    loss_fn: Callable[..., Tensor],
    x: Inputs,
    attack: Attack,
    *,
    model: nn.Module | None = None,
    support: Tensor | tuple[Tensor | None, ...] | None = None,
    lower: float = 0.0,
    upper: float = 1.0,
    coupled: bool = False,
) -> Inputs:
    """Return a perturbation ``delta`` (detached, shaped as ``x``) that maximises ``loss_fn``.

    ``loss_fn(x_adv)`` returns the per-example loss (shape ``[B]``) or a scalar sum of them. ``model`` is
    switched to eval mode during the attack and restored afterwards; the state its buffers hold must be
    the same after the attack's passes as before (:func:`frozen` checks it). ``support`` (broadcastable
    to ``x``, 0/1) restricts the perturbation to part of the input, e.g. MAE's visible patches; norms are
    then taken over that part only and the random start is uniform in the ball of that part.

    ``x`` may be a tuple of inputs of different shapes (with a tuple of supports, ``None`` for a whole
    input): ``loss_fn`` then takes the tuple, and each input of each example gets its own perturbation
    in its own ball of radius ``eps`` (so a tuple of two views has two balls, each as large as one
    image's), stepped from its own gradient; a tuple comes back.

    Examples are attacked independently when the loss of each depends on its own input alone. A loss
    that couples the batch (a contrastive loss whose negatives are the other examples) says so with
    ``coupled=True``: all examples are still stepped together, and of several ``restarts`` the one with
    the highest total loss is kept whole, since keeping each example's best restart would mix
    perturbations that were never scored together.

    Only the gradient with respect to the input is computed (``torch.autograd.grad``), so no
    parameter ``.grad`` is touched and no weight gradient is evaluated. Where the backward pass runs
    in float16 the loss is scaled first (:func:`input_gradient`), so small gradients do not vanish.
    """
    threat, eps, alpha = attack.threat, attack.eps, attack.alpha
    many = isinstance(x, tuple | list)
    xs = [t.detach() for t in (x if many else [x])]  # type: ignore[union-attr]
    if many:
        supports = list(support) if support is not None else [None] * len(xs)  # type: ignore[arg-type]
        if len(supports) != len(xs) or len({t.shape[0] for t in xs}) != 1:
            raise ValueError("attacked inputs need one support each and the same examples along dim 0")
    else:
        supports = [support]  # type: ignore[list-item]

    def shaped(deltas: list[Tensor]) -> Inputs:
        return tuple(deltas) if many else deltas[0]

    if eps == 0:
        return shaped([torch.zeros_like(t) for t in xs])
    works = [t.float() for t in xs]  # the perturbation lives in fp32 even when the model runs in bf16/fp16
    bounds = [(lower - w, upper - w) for w in works]  # the perturbations that keep a valid image

    def constrain(i: int, delta: Tensor) -> Tensor:
        # Supported coordinates only: the start and every step's gradient are masked (below).
        return threat.project(delta, eps).clamp(*bounds[i])

    batch = xs[0].shape[0]

    def per_example(deltas: list[Tensor]) -> Tensor:
        inputs = [(w + d).to(t.dtype) for w, d, t in zip(works, deltas, xs, strict=True)]
        loss = loss_fn(tuple(inputs) if many else inputs[0])
        return loss.float().expand(batch) if loss.dim() == 0 else loss.float()

    scale = FP16_SCALE if any(runs_in_fp16(t, model) for t in xs) else 1.0
    best, best_loss = None, None
    with frozen(model), torch.enable_grad():
        for _ in range(attack.restarts):
            deltas = [
                constrain(i, threat.random_init(w, eps, s) if attack.random_start else torch.zeros_like(w))
                for i, (w, s) in enumerate(zip(works, supports, strict=True))
            ]
            for _ in range(attack.steps):
                grads = input_gradients(per_example, deltas, scale)
                deltas = [
                    # the step's direction (l2: its norm) over the supported part only
                    constrain(i, threat.step(d.detach(), g if s is None else g * s, alpha))
                    for i, (d, g, s) in enumerate(zip(deltas, grads, supports, strict=True))
                ]
            deltas = [d.detach() for d in deltas]
            if attack.restarts == 1:
                return shaped([d.to(t.dtype) for d, t in zip(deltas, xs, strict=True)])
            with torch.no_grad():
                final = per_example(deltas)
            if best is None:
                best, best_loss = deltas, final
            elif coupled:  # the whole batch's perturbations, as they were scored together
                if final.sum() > best_loss.sum():
                    best, best_loss = deltas, final
            else:
                better = final > best_loss
                best = [
                    torch.where(better.view(-1, *([1] * (d.dim() - 1))), d, b)
                    for d, b in zip(deltas, best, strict=True)
                ]
                best_loss = torch.maximum(final, best_loss)
    assert best is not None
    return shaped([d.to(t.dtype) for d, t in zip(best, xs, strict=True)])
