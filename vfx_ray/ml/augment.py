"""Random affine augmentation (translation, scaling, rotation) of crop batches, on the fly.

The paper augments 20x by random affine transforms. This does the same draws as
``torchvision.transforms.v2.RandomAffine(degrees=rotate_deg, translate=(t, t), scale=scale)``
- rotation uniform in [-rotate_deg, rotate_deg] degrees, scale uniform in ``scale``,
translation uniform in [-t, t] x crop size on each axis, bilinear, fill 0 (the z-scored
mean) - but with an independent draw per sample (``RandomAffine`` on a batch tensor draws once
for the whole batch) and in one ``grid_sample`` call, on whatever device the batch is on; the
draws are made on the generator's device (``resident`` keeps them on the GPU).
The same transform is applied to the three channels (the slice and its neighbours).

``augment_factor`` (TrainConfig) is applied by the training loop: each epoch iterates the
training crops that many times, each time with fresh draws, so an epoch sees
``augment_factor`` augmented views of every crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vfx_ray.config import TrainConfig


@dataclass(frozen=True)
class AffineRanges:
    rotate_deg: float = 15.0
    translate: float = 0.1  # fraction of the crop size
    scale: tuple[float, float] = (0.9, 1.1)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> AffineRanges:
        return cls(rotate_deg=cfg.rotate_deg, translate=cfg.translate, scale=tuple(cfg.scale))

    @property
    def identity(self) -> bool:
        return self.rotate_deg == 0 and self.translate == 0 and tuple(self.scale) == (1.0, 1.0)


def random_thetas(n: int, ranges: AffineRanges, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, 3) ``affine_grid`` matrices mapping output to input coordinates (normalised),
    drawn on the generator's device (a CUDA generator: no host draw, no copy per batch)."""
    device = generator.device if generator is not None else None

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)

    angle = uniform(-ranges.rotate_deg, ranges.rotate_deg) * (math.pi / 180.0)
    scale = uniform(*ranges.scale)
    # a shift of t x size pixels is 2t in normalised [-1, 1] coordinates
    tx = uniform(-ranges.translate, ranges.translate) * 2.0
    ty = uniform(-ranges.translate, ranges.translate) * 2.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # forward map: out = s R(a) in + t  =>  in = R(-a)/s (out - t)
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    shift = -(inv @ torch.stack([tx, ty], -1).unsqueeze(-1))
    return torch.cat([inv, shift], dim=-1)


def random_affine(
    images: torch.Tensor, ranges: AffineRanges, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each (C, H, W) image of an (N, C, H, W) float batch under its own random affine."""
    if ranges.identity or images.shape[0] == 0:
        return images
    theta = random_thetas(images.shape[0], ranges, generator).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
