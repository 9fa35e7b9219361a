r"""SimCLR (Chen, Kornblith, Norouzi & Hinton 2020), nominal and adversarial (ACL, Jiang et al. 2020;
RoCL, Kim et al. 2020).

Each image gives two views; ``z = g(f(x)) / ||g(f(x))||`` (``f`` the encoder, ``g`` the projector). Over the
2N views of a batch, the NT-Xent loss of the pair (i, j) of one image (SimCLR eq. 1) is

.. math::

    \ell_{i,j} = -\log \frac{\exp(\mathrm{sim}(z_i, z_j)/\tau)}
                            {\sum_{k=1}^{2N} \mathbb{1}_{[k \ne i]} \exp(\mathrm{sim}(z_i, z_k)/\tau)},

the positive the other view of the same image, the negatives the other 2N - 2 views. An image's
per-example value is the mean of its two views' losses, :math:`(\ell_{2k-1,2k} + \ell_{2k,2k-1}) / 2`;
the batch loss is the official code's ``loss_a + loss_b`` (``objective.py``, ``add_contrastive_loss``:
each view's loss averaged over the batch, then summed), i.e. twice the mean of the per-example values.

Over several processes the negatives are every process's views: the projections are all-gathered with
their gradient (``torch.distributed.nn.functional.all_gather``, the official code's cross-replica
concatenation), the self-similarities masked by ``LARGE_NUM`` and the positives' labels offset by the
process's rank, so 2 processes with B/2 images each compute the loss of 1 process with B. Every process
must hold the same number of images (the training loaders drop the last, short batch).

Adversarial (ACL's A2A, paper eq. 2 with this loss): both views of every image are perturbed jointly,
each in its own ball, to maximise the batch's NT-Xent; the loss couples the batch (the negatives are the
other images' views), so the attack is ``coupled`` (of several restarts the one with the highest total
loss is kept whole). ``method.attack_views=one`` (RoCL's instance-wise attack): the first view alone is
perturbed, against the second view's projections computed clean (in the attack's eval mode) before its
first step and held fixed; the training loss then reads the attacked first view and the clean second one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from advpt.errors import UserError
from advpt.methods.base import PretrainMethod
from advpt.methods.byol import mlp
from advpt.methods.sizes import sized_for

LARGE_NUM = 1e9
"""What the official code subtracts from a view's similarity to itself (a logit of about -1e9 / tau)."""

ATTACK_VIEWS = ("both", "one")


def gather_with_grad(z: Tensor) -> tuple[Tensor, int]:
    """Every process's ``z`` concatenated in rank order (the gradient flows back to each process's own
    rows), and this process's rank; ``(z, 0)`` outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z)), dist.get_rank()


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Per-example NT-Xent: the mean of the two views' losses of each of this process's images.

    ``z1``, ``z2``: the projections of the first and second views ([n, d], not yet normalised). Both are
    gathered across processes for the negatives (a detached ``z2`` is gathered as it is). Computed in fp32
    with autocast off: at tau = 0.1 a bf16 logit would be off by up to ~0.04.
    """
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        queries = F.normalize(torch.cat([z1, z2]).float(), dim=-1)  # [2n, d]: view 1 rows, then view 2
        all1, rank = gather_with_grad(queries[:n])
        all2, _ = gather_with_grad(queries[n:])
        m = all1.shape[0]
        keys = torch.cat([all1, all2])  # [2m, d]: every process's first views, then its second views
        logits = queries @ keys.T / temperature  # [2n, 2m]
        own = torch.arange(n, device=z1.device) + rank * n  # this process's images among the m
        rows = torch.arange(2 * n, device=z1.device)
        itself = torch.cat([own, own + m])  # each view's own column
        positive = torch.cat([own + m, own])  # the other view of the same image
        logits = logits.index_put((rows, itself), logits[rows, itself] - LARGE_NUM)
        per_view = F.cross_entropy(logits, positive, reduction="none")  # [2n]
    return per_view.view(2, n).mean(0)


class SimCLR(PretrainMethod):
    """Encoder + projector (SimCLR v1's Linear-BN-ReLU-Linear, ``method.heads``) trained on NT-Xent at
    temperature ``method.temperature`` over two views, attacked as ``method.attack_views`` says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        heads = sized_for(self.method_cfg["heads"], self.encoder.dim)
        self.projector = mlp(self.encoder.dim, heads["hidden"], heads["out"])
        self.temperature = float(self.method_cfg["temperature"])
        self.attack_views = str(self.method_cfg.get("attack_views", "both"))
        if not self.temperature > 0:
            raise UserError(f"method.temperature={self.temperature:g} is out of range: expected a number > 0")
        if self.attack_views not in ATTACK_VIEWS:
            raise UserError(
                f"method.attack_views={self.attack_views} is invalid: choose one of {', '.join(ATTACK_VIEWS)}"
            )

    def project(self, x: Tensor) -> Tensor:
        """z before normalisation: the projector on the encoder's features."""
        return self.projector(self.encoder.features(x))

    def views_loss(self, views: tuple[Tensor, Tensor]) -> Tensor:
        """Per-example NT-Xent of two batches of views, one pass over both (batch norm sees all 2n)."""
        view1, view2 = views
        n = view1.shape[0]
        z = self.project(torch.cat([view1, view2]))
        return nt_xent(z[:n], z[n:], self.temperature)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (view1, view2), _ = batch
        n = view1.shape[0]
        if self.attack_views == "both":
            # ACL: both views of every image attacked together against the whole batch's loss.
            view1, view2 = self.attacked(self.views_loss, (view1, view2), coupled=True)
        else:
            view1 = self.attacked(self.first_view_loss(view2), view1, coupled=True)
        loss = self.reduce(self.views_loss((view1, view2)))
        self.log_loss(loss, n)
        return loss

    def first_view_loss(self, view2: Tensor) -> Any:
        """RoCL's attack objective: NT-Xent of a perturbed first view against the second view's clean
        projections, computed once at the attack's first pass (in its eval mode) and then held fixed."""
        fixed: list[Tensor] = []

        def loss_fn(view1: Tensor) -> Tensor:
            if not fixed:
                with torch.no_grad():
                    fixed.append(self.project(view2).detach())
            return nt_xent(self.project(view1), fixed[0], self.temperature)

        return loss_fn

    def reduce(self, per_example: Tensor) -> Tensor:
        # The official loss_a + loss_b: each view's loss averaged over the batch, then summed.
        return 2.0 * per_example.float().mean()
