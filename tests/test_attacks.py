"""The shared PGD against closed-form optima, its constraints, and its promise not to disturb training state."""

from __future__ import annotations

import functools
import zlib
from typing import Any

import pytest
import torch
from torch import nn

from advpt.attacks import Attack, L2Threat, LinfThreat, frozen, pgd


def linear_loss(w: torch.Tensor):
    """Per-example loss <w, x>: its maximiser over a ball around an interior x is known in closed form."""
    return lambda x: (x.flatten(1) * w.flatten()).sum(dim=1)


@pytest.mark.parametrize("random_start,steps", [(False, 2), (True, 4)])
def test_linf_reaches_eps_sign_w(random_start: bool, steps: int) -> None:
    w = torch.randn(3, 8, 8)
    x = torch.full((5, 3, 8, 8), 0.5)
    eps = 8 / 255
    delta = pgd(linear_loss(w), x, Attack("linf", eps, steps=steps, random_start=random_start))
    # 2 steps of 5eps/8 from 0 (or 4 from anywhere in the ball) overshoot eps, so projection lands on the optimum.
    torch.testing.assert_close(delta, (eps * w.sign()).expand_as(x))


def test_l2_reaches_eps_w_over_norm() -> None:
    w = torch.randn(3, 8, 8)
    x = torch.full((4, 3, 8, 8), 0.5)
    eps = 0.5
    delta = pgd(linear_loss(w), x, Attack("l2", eps, steps=2, random_start=False))
    torch.testing.assert_close(delta, (eps * w / w.norm()).expand_as(x), atol=1e-6, rtol=1e-5)


def test_l2_from_random_start_converges_to_optimum() -> None:
    w = torch.randn(3, 4, 4)
    x = torch.full((6, 3, 4, 4), 0.5)
    eps = 0.3
    delta = pgd(linear_loss(w), x, Attack("l2", eps, steps=40, random_start=True))
    optimum = (eps * w / w.norm()).expand_as(x)
    cos = torch.nn.functional.cosine_similarity(delta.flatten(1), optimum.flatten(1))
    assert (cos > 0.999).all()
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((6,), eps), atol=1e-5, rtol=0)


def test_step_size_default_is_five_eighths_eps() -> None:
    assert Attack("linf", 8 / 255).alpha == pytest.approx(5 / 255)
    assert Attack("l2", 0.5, step_size=0.1).alpha == 0.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (7, 1, 4, 4), (3, 10)])
@pytest.mark.parametrize("eps", [0.01, 0.5, 3.0])
def test_constraints_hold_under_random_inputs(norm: str, shape: tuple, eps: float) -> None:
    if norm == "linf" and eps > 1:
        eps = 1.0
    # A seed fixed across processes (hash() of a str is salted per process): a failure can be rerun.
    g = torch.Generator().manual_seed(zlib.crc32(repr((norm, shape, eps)).encode()))
    x = torch.rand(shape, generator=g)
    x[0].view(-1)[:2] = torch.tensor([0.0, 1.0])  # pixels at the range limits
    mix = torch.randn(x[0].numel(), x[0].numel(), generator=g)
    loss = lambda z: torch.tanh(z.flatten(1) @ mix).pow(2).sum(1)  # noqa: E731 - an arbitrary smooth loss
    for steps in (1, 3):
        delta = pgd(
            loss, x, Attack(norm, eps, steps=steps, step_size=eps)
        )  # large steps push against the walls
        norms = (LinfThreat() if norm == "linf" else L2Threat()).norm(delta)
        assert (norms <= eps * (1 + 1e-5) + 1e-7).all()
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
        assert delta.shape == x.shape and not delta.requires_grad


def test_examples_are_attacked_independently() -> None:
    w = torch.randn(2, 6)
    x = torch.rand(4, 6) * 0.5 + 0.25
    loss = lambda z: torch.sin(z @ w.T).sum(1) + (z**2).sum(1)  # noqa: E731
    attack = Attack("l2", 0.2, steps=3, random_start=False)
    together = pgd(loss, x, attack)
    alone = torch.cat([pgd(loss, x[i : i + 1], attack) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_support_restricts_the_perturbation() -> None:
    x = torch.full((2, 3, 4, 4), 0.5)
    support = torch.zeros(2, 1, 4, 4)
    support[:, :, :2] = 1
    for norm in ("linf", "l2"):
        delta = pgd(linear_loss(torch.randn(3, 4, 4)), x, Attack(norm, 0.1), support=support)
        assert (delta[:, :, 2:] == 0).all() and (delta[:, :, :2] != 0).any()


@pytest.mark.parametrize("steps", [1, 3])
def test_l2_under_a_support_reaches_eps_w_s_over_its_norm(steps: int) -> None:
    # Maximise <w, x> over the l2 ball of the supported coordinates S: delta* = eps w_S / ||w_S||.
    # The loss has gradient outside S too, which must not shorten the step inside it.
    w = torch.randn(3, 4, 4)
    x = torch.full((2, 3, 4, 4), 0.5)
    support = torch.zeros(2, 1, 4, 4)
    support[:, :, :2] = 1
    eps = 0.3
    delta = pgd(
        linear_loss(w), x, Attack("l2", eps, steps=steps, step_size=eps, random_start=False), support=support
    )
    w_s = w * support[0]
    torch.testing.assert_close(delta, (eps * w_s / w_s.norm()).expand_as(x), atol=1e-6, rtol=1e-5)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.conv(x)).mean((2, 3))))


def test_attack_leaves_training_state_untouched() -> None:
    net = _Net().train()
    net.head.eval()  # a submodule deliberately in eval mode must stay so
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 3, (8,))
    loss = lambda z: nn.functional.cross_entropy(net(z), y, reduction="none")  # noqa: E731
    delta = pgd(loss, x, Attack("linf", 4 / 255, steps=3), model=net)
    assert delta.abs().max() > 0
    assert all(p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():  # running stats and num_batches_tracked unchanged
        assert torch.equal(v, state[k]), k
    assert net.training and net.conv.training and net.bn.training and not net.head.training


def test_the_attack_records_no_path_to_the_weights_and_restores_their_flags() -> None:
    net = _Net().train()
    net.head.bias.requires_grad_(False)  # a parameter deliberately frozen must stay so
    seen: list[bool] = []

    def loss(z: torch.Tensor) -> torch.Tensor:
        out = net(z)
        seen.append(any(p.requires_grad for p in net.parameters()) or out.grad_fn is None)
        return out.sum(1)

    pgd(loss, torch.rand(4, 3, 6, 6), Attack("l2", 0.5, steps=2), model=net)
    assert seen == [False, False]  # every attack pass: a graph to the input only
    assert [p.requires_grad for p in net.parameters()] == [True] * 5 + [False]


def test_frozen_restores_modes_after_an_exception() -> None:
    net = _Net().train()
    with pytest.raises(RuntimeError), frozen(net):
        assert not net.bn.training
        raise RuntimeError
    assert net.bn.training


def test_attack_under_bf16_autocast_stays_fp32_and_feasible() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 5, (4,))
    loss = lambda z: nn.functional.cross_entropy(net(z), y, reduction="none")  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = pgd(loss, x, Attack("l2", 0.5, steps=2), model=net)
    assert delta.dtype == torch.float32
    assert (delta.flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()


def test_restarts_keep_the_strongest_perturbation() -> None:
    # Loss peaks at one corner of the l_inf box; random starts in the other half-space fall into another local max.
    x = torch.full((64, 1), 0.5)
    loss = lambda z: (z.squeeze(1) - 0.5).abs() * torch.where(z.squeeze(1) > 0.5, 2.0, 1.0)  # noqa: E731
    one = pgd(loss, x, Attack("linf", 0.1, steps=2, restarts=1))
    many = pgd(loss, x, Attack("linf", 0.1, steps=2, restarts=20))
    assert (loss(x + many) >= loss(x + one) - 1e-6).all()
    assert (many > 0).all()  # with 20 restarts every example found the better corner


def test_zero_radius_is_no_perturbation_and_bad_settings_raise() -> None:
    x = torch.rand(2, 3)
    assert (pgd(lambda z: z.sum(1), x, Attack("l2", 0.0)) == 0).all()
    with pytest.raises(ValueError):
        Attack("l1", 0.1)
    with pytest.raises(ValueError):
        Attack("linf", -0.1)
    with pytest.raises(ValueError):
        Attack("linf", 0.1, steps=0)


def _random_pixel_support(n: int, size: int, visible: int) -> torch.Tensor:
    """[n, 1, size, size] 0/1 masks with exactly ``visible`` pixels on per example, at random places."""
    ranks = torch.rand(n, size * size).argsort(dim=1).argsort(dim=1)
    return (ranks < visible).float().view(n, 1, size, size)


def test_l2_random_start_is_uniform_in_the_ball_of_the_support() -> None:
    # A quarter of the pixels supported: the start must be uniform in that d-ball (d = supported
    # coordinates), i.e. (radius/eps)^d ~ U(0,1), not a full-image draw masked down to ~eps/2.
    n, eps = 4000, 0.5
    x = torch.full((n, 3, 8, 8), 0.5)
    support = _random_pixel_support(n, 8, 16)
    d = 3 * 16
    flat = lambda z: z.flatten(1).sum(1) * 0.0  # noqa: E731 - zero gradient: PGD returns its start
    delta = pgd(flat, x, Attack("l2", eps, steps=1), support=support)
    assert (delta * (1 - support) == 0).all()
    radius = delta.flatten(1).norm(dim=1).double() / eps
    assert (radius <= 1 + 1e-5).all()
    u = radius.clamp(max=1).pow(d).sort().values
    ks = (u - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
    assert ks < 0.035, f"(radius/eps)^d is not uniform: KS distance {ks:.3f}"
    assert radius.mean() == pytest.approx(d / (d + 1), abs=0.005)


def test_both_threats_start_inside_the_support_only() -> None:
    x = torch.full((64, 3, 8, 8), 0.5)
    support = _random_pixel_support(64, 8, 16)
    for threat, eps in ((LinfThreat(), 8 / 255), (L2Threat(), 0.5)):
        start = threat.random_init(x, eps, support)
        assert (start * (1 - support) == 0).all(), threat.name
        assert (start * support != 0).sum() == 64 * 3 * 16, threat.name
        assert (threat.norm(start) <= eps * (1 + 1e-5)).all(), threat.name


def _reference_pgd(loss_fn, x, norm: str, eps: float, steps: int, alpha: float, support, start):
    """PGD written plainly (the formulation before any optimisation): step, mask, project, clip."""
    delta = start.clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x + delta).sum(), delta)
        grad = grad * support
        if norm == "linf":
            delta = delta.detach() + alpha * grad.sign()
            delta = (delta * support).clamp(-eps, eps)
        else:
            delta = delta.detach() + alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(
                -1, 1, 1, 1
            )
            delta = delta * support
            delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(
                -1, 1, 1, 1
            )
        delta = (x + delta).clamp(0, 1) - x
    return delta


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_gives_the_plainly_written_pgds_perturbation(norm: str, eps: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 8, 8, generator=g)  # pixels near 0 and 1: the valid-range clip binds
    support = (torch.rand(6, 1, 8, 8, generator=g) > 0.4).float()
    mix = torch.randn(192, 192, generator=g)
    loss = lambda z: torch.tanh(z.flatten(1) @ mix).pow(2).sum(1)  # noqa: E731
    attack = Attack(norm, eps, steps=3, random_start=False)
    delta = pgd(loss, x, attack, support=support)
    expected = _reference_pgd(loss, x, norm, eps, 3, attack.alpha, support, torch.zeros_like(x))
    assert delta.abs().max() > 0
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)


def _tiny_gradient_loss(weight: torch.Tensor):
    """A loss whose input gradient is ~1e-8: below float16's smallest subnormal (6e-8) unless scaled."""

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return 1e-7 * torch.nn.functional.linear(x.flatten(1), weight).float().sum(dim=1)

    return loss_fn


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_under_float16_the_attack_keeps_its_step_and_fp32_s_direction(norm: str) -> None:
    from advpt.attacks import Attack, pgd

    torch.manual_seed(0)
    weight = 0.1 * torch.randn(1, 3 * 4 * 4).sign()  # every input coordinate has gradient 1e-8 in size
    x = torch.rand(5, 3, 4, 4)
    attack = Attack(norm, eps=0.05, steps=1, step_size=0.05, random_start=False)
    reference = pgd(_tiny_gradient_loss(weight), x, attack)
    assert reference.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.float16):  # unscaled, this backward pass gives 0 (below)
        found = pgd(_tiny_gradient_loss(weight), x, attack)
    assert found.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(found.flatten(1), reference.flatten(1), dim=1)
    assert (cosine > 0.99).all(), cosine


def test_without_a_loss_scale_float16_would_erase_that_gradient() -> None:
    # the premise of the test above: the same backward pass, unscaled, gives 0 under fp16 autocast
    from advpt.attacks import input_gradient

    torch.manual_seed(0)
    weight = 0.1 * torch.randn(1, 48).sign()
    delta = torch.zeros(5, 3, 4, 4)
    x = torch.rand(5, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = input_gradient(lambda d: _tiny_gradient_loss(weight)(x + d), delta, 1.0)
        scaled = input_gradient(lambda d: _tiny_gradient_loss(weight)(x + d), delta.clone(), 2.0**15)
    assert (unscaled == 0).all()
    assert (scaled.abs() > 0).all() and scaled.abs().max() < 1e-6  # divided out again


def test_a_loss_scale_that_overflows_is_lowered_and_nothing_non_finite_is_returned() -> None:
    from advpt.attacks import input_gradient

    delta = torch.zeros(3, 4)
    calls = []

    def loss_of(d: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        # the gradient through float16 is 30 x the scale: inf (> 65504) at 2**15 and 2**12, finite at 2**9
        return (d.half() * 30.0).float().sum(dim=1)

    grad = input_gradient(loss_of, delta, 2.0**15)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, torch.full_like(grad, 30.0))
    assert len(calls) == 3


def precision_benchmark() -> Any:
    """benchmarks/attack_precision.py as a module (benchmarks/ is not a package)."""
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import attack_precision
    finally:
        sys.path.remove(benchmarks)
    return attack_precision


@functools.cache
def precision_rows(method: str) -> list[dict]:
    """benchmarks/attack_precision.py's rows for ``method`` at vit_micro's initial weights, 8 digits, PGD-2,
    the paper's smallest radii converted (l2 0.5 and l_inf 1/255); computed once per method and process
    (both precisions' tests read them)."""
    bench = precision_benchmark()
    from advpt.radii import from_paper

    model = bench.load("model", "vit_micro")
    torch.manual_seed(0)
    module = bench.build(method, model, torch.device("cpu"))
    images, labels = bench.digits(8, int(model["img_size"]), torch.device("cpu"))
    radii = [(norm, from_paper(norm, eps, int(model["img_size"]))) for norm, eps in bench.RADII[::2]]
    return bench.setting(module, method, images, labels, radii, steps=2)


PRECISION_METHODS = ["mae", "byol", "rotnet", "supervised", "dino", "mocov3", "simclr"]


@pytest.mark.parametrize("method", ["byol", "dino", "mocov3", "simclr"])
def test_building_a_precision_closure_leaves_the_statistics_its_attack_reads_as_they_were(
    method: str,
) -> None:
    """The benchmark builds each precision's loss closure with the method's training step, in train mode;
    the batch norms' running statistics and DINO's centre, which the attack's eval-mode passes read, must
    not move, or a closure built later attacks another network (an untrained MoCo v3's delta from a copy
    one update along gained only 0.8 of its original's, in fp32)."""
    bench = precision_benchmark()
    model = bench.load("model", "vit_micro")
    torch.manual_seed(0)
    module = bench.build(method, model, torch.device("cpu"))
    images, labels = bench.digits(4, int(model["img_size"]), torch.device("cpu"))
    before = {name: b.clone() for name, b in module.named_buffers()}
    assert any(b.is_floating_point() for b in before.values()), "nothing to check: no statistics"
    first, x, _, _ = bench.closure(module, method, images, labels, 0)
    with torch.no_grad(), frozen(module):  # as the attack reads it: eval mode
        loss = first(x).clone()
    bench.closure(module, method, images, labels, 0)
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=name)
    with torch.no_grad(), frozen(module):
        torch.testing.assert_close(first(x), loss, rtol=0, atol=0)


@pytest.mark.parametrize("method", PRECISION_METHODS)
def test_the_delta_found_under_bf16_autocast_is_nine_tenths_as_strong_as_fp32_s(method: str) -> None:
    """The attack found under bf16 autocast (Lightning's bf16-mixed), scored in fp32, gains at least 0.9 of
    what the fp32 attack gains."""
    for row in precision_rows(method):
        assert row["fp32"] > 0, row
        assert row["bf16 in fp32"] >= 0.9 * row["fp32"], row


@pytest.mark.parametrize("method", PRECISION_METHODS)
def test_the_delta_found_under_fsdp_bf16_policy_is_nine_tenths_as_strong_as_fp32_s(method: str) -> None:
    """The attack found with weights and input in bf16 (FSDP's ``MixedPrecisionPolicy``), scored in fp32,
    gains at least 0.9 of what the fp32 attack gains."""
    for row in precision_rows(method):
        assert row["fp32"] > 0, row
        assert row["fsdp in fp32"] >= 0.9 * row["fp32"], row


# -- several inputs, batch-coupled losses, a loss's state --------------------------------------------------
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_several_inputs_of_different_shapes_each_reach_the_optimum_of_their_own_ball(norm: str) -> None:
    # loss = w1 . x1 + w2 . x2 per example: each input's optimum is on its own ball's boundary, in the
    # direction of its own weights (l2: eps w / |w| over its support; l_inf: eps sign(w) there).
    torch.manual_seed(0)
    x1, x2 = torch.full((3, 3, 4, 4), 0.5), torch.full((3, 3, 2, 2), 0.5)
    w1, w2 = torch.randn(3, 4, 4), torch.randn(3, 2, 2)
    s1 = torch.zeros(1, 1, 4, 4)
    s1[..., :2, :] = 1.0  # the first input is supported on its top half only

    def loss(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = inputs
        return (a * w1).flatten(1).sum(1) + (b * w2).flatten(1).sum(1)

    eps = 0.1 if norm == "l2" else 0.02
    d1, d2 = pgd(loss, (x1, x2), Attack(norm=norm, eps=eps, steps=20), support=(s1, None))
    if norm == "l2":
        g1 = w1 * s1[0]
        expected1, expected2 = eps * g1 / g1.norm(), eps * w2 / w2.norm()
    else:
        expected1, expected2 = eps * w1.sign() * s1[0], eps * w2.sign()
    for d, expected in ((d1, expected1), (d2, expected2)):
        torch.testing.assert_close(d, expected.expand_as(d), atol=2e-4, rtol=1e-3)


def test_restarts_of_a_batch_coupled_loss_keep_one_restart_whole() -> None:
    # Each example's loss depends on the others' inputs: the best restart is chosen by the total, whole.
    torch.manual_seed(0)
    x = torch.rand(6, 3, 4, 4) * 0.5 + 0.25
    w, u = torch.randn(3, 4, 4), torch.randn(3, 4, 4)

    def coupled(adv: torch.Tensor) -> torch.Tensor:
        own, shared = (adv * w).flatten(1).sum(1), (adv * u).flatten(1).sum(1)
        return torch.tanh(own) * torch.cos(3 * shared.mean())

    attack = Attack(norm="l2", eps=0.5, steps=1, step_size=0.05, restarts=4)
    torch.manual_seed(1)
    kept = pgd(coupled, x, attack, coupled=True)
    torch.manual_seed(1)  # the same four random starts, one restart each
    single = Attack(norm="l2", eps=0.5, steps=1, step_size=0.05)
    restarts = [pgd(coupled, x, single) for _ in range(4)]
    totals = [float(coupled(x + d).sum()) for d in restarts]
    assert torch.equal(kept, restarts[max(range(4), key=totals.__getitem__)])
    torch.manual_seed(1)
    mixed = pgd(coupled, x, attack)  # per example, as for independent examples: a mix of restarts
    assert not any(torch.equal(mixed, d) for d in restarts)


class _Centred(nn.Module):
    """A toy loss with state, as DINO's centre: a running mean of what it sees, moved in training mode."""

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always
        self.register_buffer("centre", torch.zeros(4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training or self.always:
            self.centre.mul_(0.9).add_(0.1 * features.detach().mean(0))
        return ((features - self.centre) ** 2).sum(1)


@pytest.mark.parametrize("always", [False, True], ids=["in-training-mode", "in-every-mode"])
def test_a_loss_s_state_is_as_the_attack_found_it_and_a_loss_that_moves_it_is_refused(always: bool) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"net": nn.Linear(3, 4), "loss": _Centred(always)}).train()
    model["loss"](model["net"](torch.rand(8, 3)))  # a training step moves the centre
    before = model["loss"].centre.clone()

    def loss(a: torch.Tensor) -> torch.Tensor:
        return model["loss"](model["net"](a))

    attack = Attack(norm="l2", eps=0.1, steps=3)
    if always:
        with pytest.raises(RuntimeError, match="changed the state loss.centre"):
            pgd(loss, torch.rand(8, 3), attack, model=model, lower=-9, upper=9)
    else:
        pgd(loss, torch.rand(8, 3), attack, model=model, lower=-9, upper=9)
        assert torch.equal(model["loss"].centre, before) and model.training
