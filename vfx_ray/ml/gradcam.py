"""Grad-CAM (Selvaraju et al. 2017): where in a crop the malignant logit finds its evidence.

The last convolutional block (``layer4``) of the ResNet keeps a coarse map of the crop
(2×2 for a 64×64 input); each of its channels is weighted by the mean gradient of the
malignant logit with respect to it, the weighted sum's positive part is upsampled to the
crop's size and scaled to [0, 1]. The logit, not the probability: the sigmoid's derivative
is one positive factor per crop, which the scaling removes anyway. Pure torch (no Ray, no
DICOM libraries), so a report or a notebook computes it on the CPU.

For this ResNet (global average pooling, then one linear logit) the gradient of the logit
with respect to ``layer4``'s map is the fc weight over the map's area, the same at every
position: Grad-CAM is the class activation map of Zhou et al. 2016. So the scorer keeps each
crop's weighted sum (:func:`cam_maps`, 2×2 a model, from the forward pass it runs anyway)
and a key image draws it (:func:`heat_from_cams`) without running a model again.
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


def cam_maps(model: nn.Module, acts: torch.Tensor) -> torch.Tensor:
    """(N, h, w) Grad-CAM's weighted channel sum before its ReLU, from ``layer4``'s
    activations (N, K, h, w): sum over k of fc.weight[k] / (h*w) * A_k (the gradient of the
    logit through the average pool). No backward pass."""
    weight = unwrap(model).fc.weight.reshape(-1).to(acts.dtype)
    return torch.einsum("nkhw,k->nhw", acts, weight) / (acts.shape[2] * acts.shape[3])


def heat_from_cams(cams: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the mean over models of each (h, w) map of ``cams``
    (M, h, w; :func:`cam_maps`) as :func:`gradcam` finishes its map (ReLU, upsampled, scaled)."""
    maps = F.relu(torch.as_tensor(np.asarray(cams, np.float32)))
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return _unit(up).mean(0).numpy().astype(np.float32)


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
