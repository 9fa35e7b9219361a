"""DINO, nominal and adversarial (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; official code facebookresearch/dino, ``main_dino.py``).

Self-distillation with no labels. The student g_s (the encoder + :class:`~advpt.methods.dino_parts.DINOHead`)
and the teacher g_t (an EMA of both) give K logits per crop; the teacher's are centred and sharpened::

    P_t(x) = softmax((g_t(x) - c) / tau_t),    P_s(x') = softmax(g_s(x') / tau_s)

and the loss (their eq. 3, over the 2 global crops x_1, x_2 and all crops V, global and local) is::

    L = mean over pairs (x in {x_1, x_2}, x' in V, x' != x) of H(P_t(x), P_s(x')),  H(a, b) = -sum_k a_k log b_k

tau_s = 0.1; tau_t linear from 0.04 to 0.07 over the first tenth of training (30 of 300 epochs); the centre
c <- m c + (1 - m) mean_batch g_t(x), m = 0.9, over the teacher's logits on the global crops of every process;
the teacher theta_t <- lambda theta_t + (1 - lambda) theta_s after each step, lambda on a cosine from 0.996
to 1. The recipe's own pieces (weight decay on a cosine from 0.04 to 0.4 per step, the last layer frozen at
the start, per-parameter gradient clipping) are :class:`DINO`'s hooks.

Adversarial DINO, attacked on its own loss through the network trained by gradient as paper eqs. 4-7 do
for the others: the teacher's distributions on the clean global crops are computed once, with the centre
as it stands, and held fixed; the attack maximises the cross-entropy of the student on each perturbed
global crop against the teacher on the other, clean, global crop::

    max_{||d_1||, ||d_2|| <= eps}  H(P_t(x_2), P_s(x_1 + d_1)) + H(P_t(x_1), P_s(x_2 + d_2))

each global crop in its own ball. The centre moves only after the attack, from the clean teacher logits;
the update trains on L with the attacked global crops and the clean local crops.

The local crops are left clean and out of the attack's loss:

- their terms H(P_t(x_q), P_s(x_local)) do not depend on the global crops' perturbation, so leaving them
  out changes no step of the attack, only the value logged as ``train/loss_clean`` / ``loss_attacked``;
- fine-tuning and evaluation attack whole images at the model's side, which the global crops stand for; a
  local crop is a 5-40 % patch seen at 96/224 of the side, an input the robust classifier never gets;
- the attack stays at its floor, K passes through the student on the two global crops only (BYOL's two
  views), and the local crops' forward runs once, in the update: attacking 8 local crops of 96 px at
  ViT-B/16 (37 tokens each, against 197) would add about 75 % to every attack pass.

As everywhere in advpt the student reads the encoder's pooled features (the mean of the patch tokens, then
``fc_norm``, which fine-tuning reads), not DINO's class token. The exported encoder is the teacher's, the
network DINO evaluates (its ``eval_knn.py`` / ``eval_linear.py`` take the teacher).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advpt.methods.base import PretrainMethod
from advpt.methods.dino_parts import (
    DINOHead,
    clip_per_parameter,
    cosine_value,
    cross_entropy,
    dino_loss,
    teacher_probabilities,
    teacher_temperature,
    update_center,
)
from advpt.methods.momentum import MomentumTeacher, cosine_momentum
from advpt.methods.sizes import sized_for
from advpt.models import Encoder


class DINO(PretrainMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sizes = sized_for(self.method_cfg["heads"], self.encoder.dim)
        self.head = DINOHead(self.encoder.dim, sizes["out"], sizes["hidden"], sizes["bottleneck"])
        # Teacher: EMA of encoder + head, never trained by gradient, always in eval mode (no drop path:
        # DINO builds its teacher without stochastic depth).
        self.teacher = MomentumTeacher(self.student_networks()).eval()
        # The centre is loss state: a buffer, moved only in training_step after the attack.
        self.register_buffer("center", torch.zeros(1, sizes["out"]))

    def student_networks(self) -> dict[str, nn.Module]:
        """The networks the teacher follows, by the teacher's names for them."""
        return {"encoder": self.encoder, "head": self.head}

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()
        return self

    def student(self, x: Tensor) -> Tensor:
        return self.head(self.encoder.features(x))

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        return self.teacher["head"](self.teacher["encoder"].features(x))

    # -- schedules, by optimiser step ------------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """(this optimiser step, the run's total): the unit of every DINO schedule here."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        return self.global_step, max(1, total)

    def teacher_temperature_now(self) -> float:
        m = self.method_cfg
        step, total = self.progress()
        warmup = round(float(m["teacher_temperature_warmup_fraction"]) * total)
        return teacher_temperature(
            step, warmup, float(m["warmup_teacher_temperature"]), float(m["teacher_temperature"])
        )

    # -- the step ---------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        views, _ = batch
        global1, global2, *rest = views
        n, tau_s = global1.shape[0], float(self.method_cfg["student_temperature"])
        global_crops = torch.cat([global1, global2])
        # [B, N, C, h, w] -> N crops of B, crop by crop (views.counts.dino_local, stacked per image)
        local_crops = rest[0].transpose(0, 1).flatten(0, 1) if rest and rest[0].shape[1] else None
        teacher_logits = self.teacher_logits(global_crops)
        targets = teacher_probabilities(teacher_logits, self.center, self.teacher_temperature_now())
        # each global crop against the teacher on the other one; per row, so each crop has its own ball
        other = torch.cat([targets[n:], targets[:n]])

        def loss_fn(x: Tensor) -> Tensor:
            return cross_entropy(other, self.student(x), tau_s)

        x = self.attacked(loss_fn, global_crops)
        crops = list(self.student(x).chunk(2))
        if local_crops is not None:
            crops += list(self.student(local_crops).chunk(rest[0].shape[1]))
        loss = self.reduce(dino_loss(crops, targets.chunk(2), tau_s))
        if self.training:  # after the attack, from the clean teacher logits
            update_center(self.center, teacher_logits, float(self.method_cfg["center_momentum"]))
        self.log_loss(loss, n)
        self.log("train/teacher_temperature", self.teacher_temperature_now(), batch_size=n)
        # DINO's two ways to fail, told apart (Caron et al. Sec. 5.3, Fig. 7): the teacher's entropy near
        # ln K with the loss near it too is collapse to the uniform; near 0 with a small KL, to one dimension.
        self.log("train/teacher_entropy", torch.special.entr(targets).sum(-1).mean(), batch_size=n)
        return loss

    # -- the recipe's optimisation pieces ------------------------------------------------------------
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        m = self.method_cfg
        step, total = self.progress()
        # Weight decay on a cosine per step (utils.cosine_scheduler(0.04, 0.4)), on the decayed group only.
        decay = cosine_value(step, total, float(m["weight_decay"]), float(m["weight_decay_end"]))
        for group in optimizer.param_groups:
            if group["weight_decay"] > 0:
                group["weight_decay"] = decay
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        tau = cosine_momentum(step, total, float(m["momentum"]))
        self.teacher.follow(self.student_networks(), tau)
        self.log("train/teacher_momentum", tau)
        self.log("train/weight_decay", decay)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # The last layer is frozen at the start (main_dino.py's cancel_gradients_last_layer): no gradient,
        # so AdamW neither steps nor decays it.
        step, total = self.progress()
        if step < round(float(self.method_cfg["freeze_last_layer_fraction"]) * total):
            for p in self.head.last_layer.parameters():
                p.grad = None

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip = self.method_cfg.get("clip_grad")
        if clip:  # DINO clips each parameter's gradient on its own (utils.clip_gradients)
            clip_per_parameter(self.parameters(), float(clip))

    # -- export -----------------------------------------------------------------------------------
    def exported_encoder(self) -> Encoder:
        return self.teacher["encoder"]  # type: ignore[return-value]
