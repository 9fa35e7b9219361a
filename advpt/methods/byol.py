"""BYOL, nominal and adversarial (paper eqs. 6-7)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advpt.methods.base import PretrainMethod
from advpt.methods.momentum import MomentumTeacher, cosine_momentum
from advpt.methods.sizes import sized_for


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear-BN-ReLU-Linear (sizes: ``method.heads``)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def byol_loss(prediction: Tensor, target_projection: Tensor) -> Tensor:
    """Per-example 2 - 2 cos(prediction, target): the normalised MSE of BYOL."""
    return 2.0 - 2.0 * F.cosine_similarity(prediction.float(), target_projection.float(), dim=-1)


class BYOL(PretrainMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        heads = sized_for(self.method_cfg["heads"], self.encoder.dim)
        self.projector = mlp(self.encoder.dim, heads["hidden"], heads["out"])
        self.predictor = mlp(heads["out"], heads["hidden"], heads["out"])
        # Target network: EMA of encoder + projector, never trained by gradient.
        self.target = MomentumTeacher(self.online_networks())

    def online_networks(self) -> dict[str, nn.Module]:
        """The networks the target follows, by the target's names for them."""
        return {"encoder": self.encoder, "projector": self.projector}

    def online(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.encoder.features(x)))

    @torch.no_grad()
    def target_projection(self, x: Tensor) -> Tensor:
        return self.target["projector"](self.target["encoder"].features(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (view1, view2), _ = batch
        n = view1.shape[0]
        # Symmetrised: each view is predicted from the other's clean target projection. Both
        # directions go through one batched pass; the loss is per example, so attacking the
        # concatenation attacks each view in turn against its own target.
        views = torch.cat([view1, view2])
        target_projections = self.target_projection(torch.cat([view2, view1])).detach()

        def loss_fn(x: Tensor) -> Tensor:
            return byol_loss(self.online(x), target_projections)

        x = self.attacked(loss_fn, views)
        loss = self.reduce(loss_fn(x))
        self.log_loss(loss, n)
        return loss

    def reduce(self, per_example: Tensor) -> Tensor:
        # Summed over the two directions (as in BYOL), each averaged over the batch.
        return 2.0 * per_example.float().mean()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        tau = cosine_momentum(self.global_step, total, float(self.method_cfg["momentum"]))
        self.update_target(tau)
        self.log("train/target_momentum", tau)

    def update_target(self, tau: float) -> None:
        """Move the target towards the online networks by momentum ``tau``."""
        self.target.follow(self.online_networks(), tau)
