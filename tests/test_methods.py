"""Each pre-training method: its loss, what its attack may touch, and that the attack raises the loss."""

from __future__ import annotations

import pytest
import torch
from conftest import make_method

import advpt.methods.base as base
from advpt.methods.byol import byol_loss, cosine_momentum
from advpt.methods.classify import rotate, soft_cross_entropy
from advpt.methods.mae import mae_loss
from advpt.models import patch_mask_to_pixels, patchify, random_visible

L2 = {"norm": "l2", "eps": 1.0, "steps": 3}


@pytest.fixture
def record_pgd(monkeypatch):
    """Wrap the PGD the methods call, keeping its loss closure, input and output."""
    calls = []

    def spy(loss_fn, x, attack, **kwargs):
        delta = real(loss_fn, x, attack, **kwargs)
        calls.append({"loss_fn": loss_fn, "x": x, "delta": delta, **kwargs})
        return delta

    real = base.pgd
    monkeypatch.setattr(base, "pgd", spy)
    return calls


def batch_for(name: str, n: int = 8, size: int = 16):
    views = [torch.rand(n, 3, size, size) for _ in range(2 if name == "byol" else 1)]
    return views, torch.randint(0, 10, (n,))


# -- MAE ---------------------------------------------------------------------------------------
def test_mae_loss_counts_masked_patches_only() -> None:
    target = torch.rand(2, 16, 48)
    _, visible = random_visible(2, 16, 0.75)
    pred = torch.randn(2, 16, 48, requires_grad=True)
    loss = mae_loss(pred, target, visible)
    loss.sum().backward()
    assert (pred.grad[visible] == 0).all()
    assert (pred.grad[~visible].abs().sum(-1) > 0).all()
    # A perfect prediction of the per-patch-normalised target on masked patches gives zero loss.
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    garbage_on_visible = torch.where(visible.unsqueeze(-1), torch.randn_like(norm) * 100, norm)
    torch.testing.assert_close(
        mae_loss(garbage_on_visible, target, visible), torch.zeros(2), atol=1e-5, rtol=0
    )


def test_patch_mask_to_pixels_matches_patchify_order() -> None:
    _, visible = random_visible(3, 16, 0.75)
    pixels = patch_mask_to_pixels(visible, (4, 4), 4).expand(-1, 3, -1, -1)
    as_patches = patchify(pixels, 4)
    assert torch.equal(as_patches.amax(-1).bool(), visible) and torch.equal(
        as_patches.amin(-1).bool(), visible
    )


def test_adversarial_mae_perturbs_visible_patches_with_one_shared_mask(record_pgd, monkeypatch) -> None:
    module = make_method("mae", attack=L2)
    seen = []
    real = module.reconstruct
    monkeypatch.setattr(module, "reconstruct", lambda x, ids: seen.append(ids) or real(x, ids))
    module.training_step(batch_for("mae"), 0)
    (call,) = record_pgd
    # Every reconstruction in the step (attack iterations and the update) used the same mask.
    assert len(seen) == L2["steps"] + 1 and all(torch.equal(s, seen[0]) for s in seen)
    ids_keep = seen[0]
    visible = torch.zeros(8, 16, dtype=torch.bool).scatter_(1, ids_keep, True)
    delta_patches = patchify(call["delta"], module.encoder.patch_size).abs().amax(-1)
    assert (delta_patches[~visible] == 0).all(), "masked patches must stay clean"
    assert (delta_patches[visible] > 0).float().mean() > 0.9


# -- BYOL --------------------------------------------------------------------------------------
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


# -- RotNet / supervised -----------------------------------------------------------------------
def test_rotate_applies_each_examples_quarter_turns() -> None:
    x = torch.rand(8, 3, 5, 5)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = rotate(x, k)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))


def test_soft_cross_entropy_matches_hard_labels() -> None:
    logits, y = torch.randn(5, 7), torch.randint(0, 7, (5,))
    onehot = torch.nn.functional.one_hot(y, 7).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), soft_cross_entropy(logits, y))


def test_supervised_needs_labels() -> None:
    with pytest.raises(ValueError):
        make_method("supervised", num_classes=0)


# -- every method ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mae", "byol", "rotnet", "supervised"])
def test_attacked_loss_exceeds_clean_loss(name: str, record_pgd) -> None:
    module = make_method(name, attack={"norm": "linf", "eps": 8 / 255, "steps": 3}, mixup=0.0, cutmix=0.0)
    module.train()
    torch.manual_seed(1)
    module.training_step(batch_for(name, n=16), 0)
    (call,) = record_pgd
    module.eval()
    with torch.no_grad():
        clean = call["loss_fn"](call["x"]).mean()
        attacked = call["loss_fn"](call["x"] + call["delta"]).mean()
    assert attacked > clean


@pytest.mark.parametrize("name", ["mae", "byol", "rotnet", "supervised"])
def test_nominal_step_trains_every_online_parameter(name: str) -> None:
    module = make_method(name)
    loss = module.training_step(batch_for(name), 0)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_weight_decay_skips_biases_norms_and_embeddings() -> None:
    module = make_method("mae")
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(module, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(module.named_parameters())
    for name in (
        "encoder.vit.pos_embed",
        "encoder.vit.cls_token",
        "encoder.vit.blocks.0.norm1.weight",
        "encoder.vit.blocks.0.attn.qkv.bias",
    ):
        assert id(named[name]) in no_decay, name
    assert id(named["encoder.vit.blocks.0.attn.qkv.weight"]) not in no_decay


def test_mae_reconstruction_figure_keeps_visible_patches() -> None:
    module = make_method("mae")
    module.eval()
    images = torch.rand(3, 3, 16, 16)
    figure = module.reconstructions(images)
    assert figure.shape == (3, 3, 16, 48)
    masked, pasted, original = figure.split(16, dim=-1)
    assert torch.equal(original, images)
    shown = patchify(masked, 4).abs().amax(-1) > 0  # the patches the masked panel shows are the visible ones
    assert shown.float().mean(1).allclose(torch.full((3,), 0.25))
    # Visible patches of the reconstruction panel are the original pixels, masked ones are predicted.
    same = (patchify(pasted, 4) == patchify(images, 4)).all(-1)
    assert torch.equal(same, shown)


def test_adversarial_example_figure_shows_the_attack(record_pgd) -> None:
    module = make_method("rotnet", attack={"norm": "linf", "eps": 8 / 255, "steps": 2})
    assert module.example_images() == {}
    module.training_step(batch_for("rotnet"), 0)
    (figure,) = module.example_images().values()
    clean, attacked, shown = figure.split(16, dim=-1)
    (call,) = record_pgd
    torch.testing.assert_close(attacked - clean, call["delta"][:8], atol=1e-6, rtol=0)
    assert shown.min() >= 0 and shown.max() <= 1
