"""Each pre-training method: its loss, what its attack may touch, and that the attack raises the loss."""

from __future__ import annotations

import pytest
import torch
from conftest import make_method
from test_models import mae_2d_sincos

import advpt.methods.base as base
import advpt.methods.mae as mae_module
from advpt.methods.byol import byol_loss, cosine_momentum
from advpt.methods.classify import rotate, soft_cross_entropy
from advpt.methods.mae import mae_loss, per_patch_normalized
from advpt.models import IMAGENET_MEAN, IMAGENET_STD, patch_mask_to_pixels, patchify, random_visible

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
    target = per_patch_normalized(torch.rand(2, 16, 48))
    _, visible = random_visible(2, 16, 0.75)
    pred = torch.randn(2, 16, 48, requires_grad=True)
    loss = mae_loss(pred, target, visible)
    loss.sum().backward()
    assert (pred.grad[visible] == 0).all()
    assert (pred.grad[~visible].abs().sum(-1) > 0).all()
    # A perfect prediction on masked patches gives zero loss, whatever is predicted on visible ones.
    garbage_on_visible = torch.where(visible.unsqueeze(-1), torch.randn_like(target) * 100, target)
    torch.testing.assert_close(
        mae_loss(garbage_on_visible, target, visible), torch.zeros(2), atol=1e-5, rtol=0
    )


def mae_reference_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's ``patchify`` (models_mae.py)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def mae_reference_target(images: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's target with ``norm_pix_loss``: the image normalised with the dataset mean/std (as
    MAE's data pipeline does before the model), patchified, each patch to zero mean, unit variance."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    target = mae_reference_patchify((images - mean) / std, p)
    mu, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - mu) / (var + 1.0e-6) ** 0.5


def test_mae_target_is_built_from_the_normalised_clean_image(monkeypatch) -> None:
    # A decoder that outputs MAE's target exactly scores zero: the target comes from the
    # mean/std-normalised image, not from [0,1] pixels.
    module = make_method("mae")
    (images,), labels = batch_for("mae")
    perfect = mae_reference_target(images, module.encoder.patch_size)
    monkeypatch.setattr(module, "reconstruct", lambda x, ids: perfect)
    assert module.training_step(([images], labels), 0).item() == pytest.approx(0.0, abs=1e-6)


def test_mae_reconstructions_undo_the_target_normalisation(monkeypatch) -> None:
    # With a perfect decoder the reconstruction panel is the original image in [0, 1].
    module = make_method("mae")
    images = torch.rand(3, 3, 16, 16)
    perfect = mae_reference_target(images, module.encoder.patch_size)
    monkeypatch.setattr(module, "reconstruct", lambda x, ids: perfect)
    _, pasted, _ = module.reconstructions(images).split(16, dim=-1)
    torch.testing.assert_close(pasted, images, atol=1e-5, rtol=0)


def test_nominal_mae_loss_equals_maes_formulation(monkeypatch) -> None:
    """MAE's forward_encoder / forward_decoder / forward_loss (models_mae.py), written out here on the
    module's weights and the same random mask, give the loss the training step optimises."""
    module = make_method("mae")
    module.train()
    (images,), labels = batch_for("mae")
    drawn = []
    real = mae_module.random_visible
    monkeypatch.setattr(
        mae_module, "random_visible", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1]
    )
    torch.manual_seed(7)
    loss = module.training_step(([images], labels), 0)

    vit, dec, p, mask_ratio = module.encoder.vit, module.decoder, module.encoder.patch_size, 0.75
    imgs = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    grid = imgs.shape[-1] // p
    torch.manual_seed(7)  # MAE's random_masking, from the same noise
    x = vit.patch_embed(imgs)
    n, length, dim = x.shape
    noise = torch.rand(n, length)
    x = x + mae_2d_sincos(dim, grid)[:, 1:]
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    assert torch.equal(ids_keep.sort(1).values, drawn[0][0].sort(1).values), "not the same mask"
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls_token = vit.cls_token + mae_2d_sincos(dim, grid)[:, :1]
    x = torch.cat([cls_token.expand(n, -1, -1), x], dim=1)
    for blk in vit.blocks:
        x = blk(x)
    x = vit.fc_norm(x)  # MAE's final encoder norm (timm calls it fc_norm when pooling by the mean)
    x = dec.embed(x)
    mask_tokens = dec.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + mae_2d_sincos(x.shape[-1], grid)
    for blk in dec.blocks:
        x = blk(x)
    pred = dec.pred(dec.norm(x))[:, 1:]
    target = mae_reference_target(images, p)
    reference = (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)


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
