"""The peer: lightly's MAE and BYOL training steps at advpt's size, for ``step_cost.py``.

Each step is written as lightly's own examples and ImageNet benchmarks write it
(``examples/pytorch/mae.py``, ``benchmarks/imagenet/vitb16/mae.py``,
``benchmarks/imagenet/resnet50/byol.py``), from lightly's building blocks, on the timm ViT that
advpt builds from the same ``conf/model`` entry (img_size, patch_size, kwargs), with the heads sized as
advpt sizes them (``method.decoder``, ``method.heads`` at the encoder's width), with the same AdamW over the trainable parameters. Where lightly leaves a part of
the step to the data pipeline or to an option, it is done here so both sides do the same work:

- both normalise the batch with the ImageNet mean/std inside the step (lightly's transforms do it
  in the data loader; advpt's encoder does it in its forward, where an attack can see it);
- MAE: mask 0.75 of the patches, encode the visible ones, decode every position, predict the
  masked patches, MSE against per-patch normalised targets (MAE's ``norm_pix_loss``; lightly's
  ``normalize_mean_var``);
- BYOL: two views, online backbone + projector + predictor, EMA target backbone + projector
  (no gradients), the symmetrised loss summed over both directions, the EMA update every step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

import timm
import torch
from torch import Tensor, nn

from advpt.methods.sizes import sized_for
from advpt.models import IMAGENET_MEAN, IMAGENET_STD, timm_kwargs

INSTALL_HINT = (
    "lightly is not installed, so the peer comparison is skipped: pip install -e '.[bench]' (or make bench)"
)


def available() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import lightly

    return lightly.__version__


def _normalize(device: torch.device) -> Callable[[Tensor], Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean.to(x.dtype)) / std.to(x.dtype)


def _compile_blocks(module: nn.Module) -> None:
    """As advpt's ``compile=true``: every timm transformer block compiled in place, the glue eager."""
    from timm.models.vision_transformer import Block

    for m in module.modules():
        if isinstance(m, Block):
            m.compile()


class LightlyMAE(nn.Module):
    """lightly's MAE (examples/pytorch/mae.py) with advpt's encoder and decoder sizes."""

    def __init__(self, model: Mapping[str, Any], method: Mapping[str, Any]) -> None:
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from lightly.models.modules.masked_vision_transformer_timm import init_weights

        super().__init__()
        vit = timm.create_model(model["name"], pretrained=False, **timm_kwargs(model))
        dec = sized_for(method["decoder"], vit.embed_dim)
        self.mask_ratio = 0.75
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, dec["dim"])
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=dec["dim"],
            depth=dec["depth"],
            num_heads=dec["heads"],
            num_prefix_tokens=vit.num_prefix_tokens,
            mlp_ratio=dec["mlp_dim"] / dec["dim"],
        )
        self.prediction_head = nn.Linear(dec["dim"], self.patch_size**2 * 3)
        self.decoder_embed.apply(init_weights)
        self.prediction_head.apply(init_weights)

    def forward(self, images: Tensor) -> Tensor:
        from lightly.models import utils

        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device
        )
        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_decode = self.decoder_embed(x_encoded)
        x_masked = x_decode.new_zeros(batch_size, self.sequence_length, x_decode.shape[-1])
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked, idx_mask=idx_mask)
        x_pred = self.prediction_head(utils.get_at_index(x_decoded, idx_mask))
        patches = utils.patchify(images, self.patch_size)
        target = utils.normalize_mean_var(utils.get_at_index(patches, idx_mask - 1))  # no class token
        return nn.functional.mse_loss(x_pred.float(), target.float())


class LightlyBYOL(nn.Module):
    """lightly's BYOL (benchmarks/imagenet/resnet50/byol.py) on the timm ViT with advpt's head sizes."""

    def __init__(self, model: Mapping[str, Any], method: Mapping[str, Any]) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = timm.create_model(model["name"], pretrained=False, **timm_kwargs(model))
        heads = sized_for(method["heads"], self.backbone.embed_dim)
        self.projection_head = BYOLProjectionHead(self.backbone.embed_dim, heads["hidden"], heads["out"])
        self.prediction_head = BYOLPredictionHead(heads["out"], heads["hidden"], heads["out"])
        self.teacher_backbone = copy.deepcopy(self.backbone)
        self.teacher_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_projection_head)
        self.criterion = NegativeCosineSimilarity()

    def forward_student(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    @torch.no_grad()
    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_projection_head(self.teacher_backbone(x).flatten(start_dim=1))

    def update_teacher(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.projection_head, self.teacher_projection_head, m=momentum)

    def forward(self, view0: Tensor, view1: Tensor) -> Tensor:
        teacher_projections_0 = self.forward_teacher(view0)
        teacher_projections_1 = self.forward_teacher(view1)
        student_predictions_0 = self.forward_student(view0)
        student_predictions_1 = self.forward_student(view1)
        # 2 - 2 cos per direction, summed over the two directions (lightly's factor-2 note).
        loss_0 = 2 * self.criterion(teacher_projections_0, student_predictions_1.float())
        loss_1 = 2 * self.criterion(teacher_projections_1, student_predictions_0.float())
        return loss_0 + loss_1


def make_peer_step(
    method: str,
    model: Mapping[str, Any],
    method_cfg: Mapping[str, Any],
    device: torch.device,
    precision: str,
    compile: bool = False,
) -> Callable[[Any], None] | None:
    """One nominal lightly training step on advpt's batch layout, or None if lightly has no such method here
    (``method_cfg``: advpt's config of the method, for its heads' sizes)."""
    if method not in ("mae", "byol"):
        return None
    net = (LightlyMAE if method == "mae" else LightlyBYOL)(model, method_cfg).to(device).train()
    if compile:
        _compile_blocks(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    normalize = _normalize(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    def step(batch: Any) -> None:
        views, _ = batch
        with autocast:
            loss = net(*(normalize(v) for v in views))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method == "byol":
            net.update_teacher(0.99)

    return step
