"""Grad-CAM (Selvaraju et al. 2017): where in a crop the malignant logit finds its evidence.

The last convolutional block (``layer4``) of the ResNet keeps a coarse map of the crop
(2×2 for a 64×64 input); each of its channels is weighted by the mean gradient of the
malignant logit with respect to it, the weighted sum's positive part is upsampled to the
crop's size and scaled to [0, 1]. The logit, not the probability: the sigmoid's derivative
is one positive factor per crop, which the scaling removes anyway. Pure torch (no Ray, no
DICOM libraries), so a report or a notebook computes it on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfx_ray.ml.model import unwrap


def _cam(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, h, w) ReLU of the gradient-weighted channel sum at ``layer`` for a batch."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        logits = model(x).flatten()
    finally:
        handle.remove()
    acts = store["a"]
    # each crop's logit depends only on its own activations (eval mode): one backward for all
    (grads,) = torch.autograd.grad(logits.sum(), acts)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * acts).sum(dim=1))


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1]; a map without positive evidence stays all zeros."""
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, ((maps - low) / span.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(maps))


def gradcam(model: nn.Module, images: np.ndarray | torch.Tensor, layer: nn.Module | None = None,
            batch_size: int = 64) -> np.ndarray:
    """(N, S, S) float32 heatmaps in [0, 1] for (N, C, S, S) crops: the malignant logit's
    Grad-CAM at ``layer`` (default the ResNet's ``layer4``), bilinearly upsampled to S×S.

    Puts the model in eval mode (batch norm from its running statistics, as when scoring);
    the parameters' ``.grad`` are left untouched.
    """
    model = unwrap(model).eval()
    layer = layer if layer is not None else model.layer4
    device = next(model.parameters()).device
    x_all = torch.as_tensor(np.asarray(images, np.float32) if not isinstance(images, torch.Tensor) else images,
                            dtype=torch.float32)
    out = []
    with torch.enable_grad():
        for i in range(0, len(x_all), batch_size):
            x = x_all[i : i + batch_size].to(device).requires_grad_(True)
            cam = _cam(model, layer, x).detach()
            up = F.interpolate(cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
            out.append(_unit(up).cpu())
    if not out:
        return np.zeros((0, *x_all.shape[-2:]), np.float32)
    return torch.cat(out).numpy().astype(np.float32)
