"""Each pre-training method: its loss, what its attack may touch, and that the attack raises the loss."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_method
from test_models import mae_2d_sincos
from torch.utils.data import DataLoader

import advpt.methods.base as base
import advpt.methods.classify as classify
import advpt.methods.mae as mae_module
from advpt.methods.byol import byol_loss
from advpt.methods.classify import rotate
from advpt.methods.mae import mae_loss, per_patch_normalized
from advpt.methods.mae_parts import patch_mask_to_pixels, patchify, random_visible
from advpt.methods.momentum import cosine_momentum
from advpt.models import IMAGENET_MEAN, IMAGENET_STD
from advpt.training.schedule import soft_cross_entropy

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


def test_byol_loss_pairs_each_views_prediction_with_the_other_views_target_projection() -> None:
    module = make_method("byol")
    module.train()
    n = 8
    view1 = torch.rand(n, 3, 16, 16)
    view2 = 0.3 * torch.rand(n, 3, 16, 16).flip(-1)  # unlike view 1, so its target projections differ
    loss = module.training_step(([view1, view2], torch.zeros(n)), 0)
    with torch.no_grad():  # the step's batched passes (batch norm: the same batch statistics)
        online = module.online(torch.cat([view1, view2]))
        target = module.target_projection(torch.cat([view1, view2]))
    p1, p2, z1, z2 = online[:n], online[n:], target[:n], target[n:]
    cross = byol_loss(p1, z2).mean() + byol_loss(p2, z1).mean()
    same = byol_loss(p1, z1).mean() + byol_loss(p2, z2).mean()
    assert (cross - same).abs() > 0.05, "the two pairings must give different losses for this test"
    torch.testing.assert_close(loss, cross, atol=1e-5, rtol=1e-5)


class _ByolSnapshots(L.Callback):
    """Online and target networks (parameters and buffers) before and after every training step."""

    def __init__(self) -> None:
        self.before: list[dict[str, dict[str, torch.Tensor]]] = []
        self.after: list[dict[str, dict[str, torch.Tensor]]] = []

    @staticmethod
    def snapshot(module) -> dict[str, dict[str, torch.Tensor]]:
        def tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in [*net.named_parameters(), *net.named_buffers()]}

        online = torch.nn.ModuleDict({"encoder": module.encoder, "projector": module.projector})
        return {"online": tensors(online), "target": tensors(module.target)}

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self.before.append(self.snapshot(module))

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.after.append(self.snapshot(module))


def test_byol_optimizer_step_averages_the_updated_online_weights_on_the_cosine_schedule_and_copies_buffers(
    tmp_path,
) -> None:
    """A real Lightning step: target_k = tau_k target_{k-1} + (1 - tau_k) online_k (online_k after the
    optimiser's update), tau_k BYOL's cosine schedule at step k, and the batch-norm buffers copied."""
    base_tau, steps, n = 0.5, 3, 4
    # tau_base 0.5 and a large lr make each term of the average visible: tau_k = 0.5, 0.625, 0.875.
    module = make_method("byol", momentum=base_tau, base_lr=0.04)
    g = torch.Generator().manual_seed(0)
    views = [[torch.rand(n, 3, 16, 16, generator=g) for _ in range(2)] for _ in range(steps)]
    seen = _ByolSnapshots()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[seen],
    )
    batches = [(pair, torch.zeros(n, dtype=torch.long)) for pair in views]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.estimated_stepping_batches == steps and len(seen.after) == steps
    parameters = [k for k, _ in module.target.named_parameters()]
    buffers = [k for k, _ in module.target.named_buffers()]
    assert "projector.1.running_mean" in buffers
    for k, (before, after) in enumerate(zip(seen.before, seen.after, strict=True)):
        tau = cosine_momentum(k, steps, base_tau)
        assert tau == pytest.approx(1 - (1 - base_tau) * (math.cos(math.pi * k / steps) + 1) / 2)
        online, target, previous = after["online"], after["target"], before["target"]
        for name in parameters:
            assert not torch.equal(online[name], before["online"][name]), f"step {k}: {name} not trained"
            expected = tau * previous[name] + (1 - tau) * online[name]
            torch.testing.assert_close(
                target[name], expected, atol=1e-6, rtol=1e-5, msg=lambda m, k=k, p=name: f"step {k}, {p}: {m}"
            )
        for name in buffers:
            copied = torch.equal(target[name], online[name])
            assert copied, f"step {k}: {name} not copied into the target"
        assert not torch.equal(
            online["projector.1.running_mean"], before["online"]["projector.1.running_mean"]
        )


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


class _EncoderAndAverage(L.Callback):
    """The encoder's and its EMA's weights after every optimiser step."""

    def __init__(self) -> None:
        self.online: list[dict[str, torch.Tensor]] = []
        self.average: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.online.append({k: v.detach().clone() for k, v in module.encoder.state_dict().items()})
        self.average.append({k: v.detach().clone() for k, v in module.ema.module.state_dict().items()})


def test_weight_ema_copies_at_the_first_update_and_averages_from_the_second() -> None:
    # timm's convention (train.py passes the count of updates made, get_decay(1) == 0): update 1
    # copies the weights, updates 2, 3, ... average them with the configured decay.
    decay = 0.5
    # A large lr, no drop path: every step moves the weights well beyond the comparison's tolerance.
    method = make_method(
        "supervised", ema_decay=decay, mixup=0.0, cutmix=0.0, base_lr=10.0, drop_path_rate=0.0
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        ((torch.rand(4, 3, 16, 16, generator=g),), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)
    ]
    seen = _EncoderAndAverage()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
    )
    trainer.fit(method, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(seen.online) == 3
    name = "vit.patch_embed.proj.weight"
    assert all((seen.online[k][name] - seen.online[k - 1][name]).abs().max() > 1e-3 for k in (1, 2))
    for name, first in seen.average[0].items():
        if not first.is_floating_point():
            continue
        torch.testing.assert_close(first, seen.online[0][name])  # update 1: a copy
        expected = seen.average[0][name]
        for k in (1, 2):  # updates 2 and 3: decay * average + (1 - decay) * weights
            expected = decay * expected + (1 - decay) * seen.online[k][name]
            torch.testing.assert_close(seen.average[k][name], expected)


def test_the_registry_holds_every_named_method_in_the_names_order() -> None:
    from advpt import names
    from advpt.methods import METHODS

    assert tuple(METHODS) == names.METHODS


@pytest.mark.parametrize("method", ["mae", "supervised"])
def test_activation_checkpointing_recomputes_every_block_and_changes_no_adversarial_update(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``activation_checkpointing=true``: each block's forward with gradients (the K attack passes and
    the training pass) is checkpointed, and two adversarial steps end at the same weights as without."""
    import torch.utils.checkpoint
    from conftest import run_cli
    from safetensors.torch import load_file

    from advpt.training.sharding import blocks

    calls: list[int] = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    )
    common = [
        "pretrain",
        f"method={method}",
        "attack=l2",
        "attack.steps=2",
        "model=vit_micro",
        "monitor=none",
    ]
    common += ["trainer.max_steps=2", "trainer.enable_progress_bar=false"]
    for flag in ("false", "true"):
        run = tmp_path / flag
        assert run_cli([*common, f"activation_checkpointing={flag}", f"hydra.run.dir={run}"]) == 0
        if flag == "false":
            assert calls == []
    depth = sum(any(p.requires_grad for p in b.parameters()) for b in blocks(make_method(method)))
    assert len(calls) == 2 * (2 + 1) * depth  # steps x (attack passes + training pass) x trained blocks
    plain, recomputed = (load_file(str(tmp_path / f / "encoder.safetensors")) for f in ("false", "true"))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)
