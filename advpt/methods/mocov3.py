"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers"),
nominal and adversarial.

The loss (the paper's Alg. 1; the official ``moco/builder.py``, ``MoCo.contrastive_loss`` and ``forward``):

    ctr(q, k) = 2τ · (1/N) Σ_i −log [ exp(q_i·k_i / τ) / Σ_{j=1}^{M} exp(q_i·k_j / τ) ],
    L = ctr(q1, k2) + ctr(q2, k1),

with q = predictor(projector(f(x))) the online (query) network's output and k = projector_m(f_m(x)) the
momentum encoder's, both ℓ2-normalised; the M keys are those of every process's batch (gathered, no
gradient through them) and k_i the key of example i's other view (label ``i + rank·N``). τ = 0.2 for ViT.

Adversarially the two query views are attacked, each in its own ball, against keys computed on the clean
views before the attack and held fixed:

    min_θ E [ max_{‖δ1‖,‖δ2‖ ≤ ε} ctr(q(x1 + δ1), k(x2)) + ctr(q(x2 + δ2), k(x1)) ].

With the keys fixed, and the heads' batch norm on its running statistics during the attack (eval mode, as
everywhere in advpt), example i's loss reads its own two views only: the attack is per example, not
coupled. The momentum encoder (encoder + projector) follows the online one by an EMA whose momentum rises
from 0.99 to 1 along a cosine (``main_moco.py --moco-m-cos``).

MoCo v3's stability trick for ViT: the patch projection is a fixed random layer (``vits.py``,
``stop_grad_conv1``), on by default (``method.stop_grad_patch_embed``); ``vits.py``'s initialisation and
fixed 2-D sin-cos position embedding (``method.sincos_pos_embed``) are the method's too. The encoder stays a
timm ViT: fine-tuning loads it and trains every layer again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from advpt.methods.base import PretrainMethod
from advpt.methods.mae_parts import sincos_pos_embed
from advpt.methods.momentum import MomentumTeacher, cosine_momentum
from advpt.methods.sizes import sized_for


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's head (``builder.py``, ``_build_mlp`` with ``last_bn=True``): (Linear-BN-ReLU) x
    (num_layers - 1), then Linear-BN without affine; linear layers without bias. The projector has 3
    layers, the predictor 2 (sizes: ``method.heads``)."""
    layers: list[nn.Module] = []
    for layer in range(num_layers):
        last = layer == num_layers - 1
        width = out_dim if last else hidden_dim
        layers.append(nn.Linear(in_dim if layer == 0 else hidden_dim, width, bias=False))
        if last:
            layers.append(nn.BatchNorm1d(width, affine=False))
        else:
            layers += [nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def contrastive_loss(q: Tensor, keys: Tensor, offset: int, temperature: float) -> Tensor:
    """Per-example InfoNCE × 2τ of queries ``q`` [N, d] against ``keys`` [M, d] (every process's, already
    normalised); example i's positive is key ``offset + i``."""
    logits = F.normalize(q.float(), dim=1) @ keys.float().T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels, reduction="none") * (2.0 * temperature)


def gather_keys(k: Tensor) -> tuple[Tensor, int]:
    """Every process's keys, in rank order, and where this process's start among them (``rank·N`` when
    the batches are equal); ``k`` itself and 0 outside a process group. No gradient flows through them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=k.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([k.shape[0]], device=k.device))
    counts = [int(s) for s in sizes]
    padded = k.new_zeros(max(counts), *k.shape[1:])  # all_gather needs one shape on every process
    padded[: k.shape[0]] = k
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), sum(counts[:rank])


def mocov3_initialize(vit: VisionTransformer, stop_grad_patch_embed: bool, sincos: bool) -> None:
    """Initialise a timm ViT in place as MoCo v3's ``VisionTransformerMoCo`` does (``vits.py``).

    Linear layers xavier-uniform (q, k and v of ``qkv`` each as its own matrix), biases 0, the class token
    N(0, 1e-6), the patch projection xavier-uniform as the linear layer it is; ``sincos``: the fixed 2-D
    sin-cos position embedding, not trained (the channels in MAE's order, a permutation of ``vits.py``'s);
    ``stop_grad_patch_embed``: the patch projection is never trained (``stop_grad_conv1``).
    """
    with torch.no_grad():
        for name, m in vit.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if vit.cls_token is not None:
            nn.init.normal_(vit.cls_token, std=1e-6)
        proj = vit.patch_embed.proj
        bound = math.sqrt(6.0 / float(proj.weight[0].numel() + vit.embed_dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        if sincos:
            grid = tuple(vit.patch_embed.grid_size)
            vit.pos_embed.copy_(
                sincos_pos_embed(vit.embed_dim, grid, vit.pos_embed.shape[1] - grid[0] * grid[1])
            )
    if sincos:
        vit.pos_embed.requires_grad_(False)
    if stop_grad_patch_embed:
        proj.requires_grad_(False)


class MoCoV3(PretrainMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        m = self.method_cfg
        mocov3_initialize(
            self.encoder.vit,
            stop_grad_patch_embed=bool(m.get("stop_grad_patch_embed", True)),
            sincos=bool(m.get("sincos_pos_embed", True)),
        )
        heads = sized_for(m["heads"], self.encoder.dim)
        self.temperature = float(m["temperature"])
        self.projector = mlp(3, self.encoder.dim, heads["hidden"], heads["out"])
        self.predictor = mlp(2, heads["out"], heads["hidden"], heads["out"])
        # The momentum encoder: EMA of encoder + projector, never trained by gradient (starts as a copy).
        self.target = MomentumTeacher(self.online_networks())

    def online_networks(self) -> dict[str, nn.Module]:
        """The networks the momentum encoder follows, by its names for them."""
        return {"encoder": self.encoder, "projector": self.projector}

    def query(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.encoder.features(x)))

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """The momentum encoder's normalised keys of ``x`` (this process's batch only)."""
        return F.normalize(self.target["projector"](self.target["encoder"].features(x)).float(), dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (view1, view2), _ = batch
        # One pass per view, for keys and queries alike (as builder.py's forward: each view's own batch
        # statistics in the heads). The keys, on the clean views, are gathered once and held fixed.
        k1, k2 = self.keys(view1), self.keys(view2)
        gathered, offset = gather_keys(torch.cat([k1, k2], dim=1))
        k1_all, k2_all = gathered.split(k1.shape[1], dim=1)
        tau = self.temperature

        def loss_fn(views: tuple[Tensor, ...]) -> Tensor:
            x1, x2 = views
            q1, q2 = self.query(x1), self.query(x2)
            return contrastive_loss(q1, k2_all, offset, tau) + contrastive_loss(q2, k1_all, offset, tau)

        x = self.attacked(loss_fn, (view1, view2))
        loss = self.reduce(loss_fn(x))  # the mean over examples: ctr(q1, k2) + ctr(q2, k1)
        self.log_loss(loss, view1.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        momentum = cosine_momentum(self.global_step, total, float(self.method_cfg["momentum"]))
        self.update_target(momentum)
        self.log("train/target_momentum", momentum)

    def update_target(self, momentum: float) -> None:
        """Move the momentum encoder towards the online networks."""
        self.target.follow(self.online_networks(), momentum)
