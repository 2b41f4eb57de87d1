"""Grad-CAM: the heatmap lies where the evidence for the malignant logit is, equals CAM for a
ResNet's pooled linear head (Selvaraju et al. 2017, §3.1), is zero without positive
evidence, and has the crop's shape, values in [0, 1] and no randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vfx_ray.ml.gradcam import gradcam
from vfx_ray.ml.model import build_model

QUADRANTS = {"top-left": (0, 0), "top-right": (0, 32), "bottom-left": (32, 0), "bottom-right": (32, 32)}


class BrightnessNet(nn.Module):
    """layer4: an 8×8 map of mean brightness (channel 0) and darkness (channel 1) of 8×8
    patches; the logit reads only brightness, so only bright regions can be evidence."""

    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Conv2d(3, 2, kernel_size=8, stride=8, bias=False)
        self.fc = nn.Linear(2, 1)
        with torch.no_grad():
            self.layer4.weight[0] = 1 / 192
            self.layer4.weight[1] = -1 / 192
            self.fc.weight[:] = torch.tensor([[1.0, 0.0]])
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.layer4(x)).mean(dim=(2, 3)))


def _blob(image: np.ndarray, quadrant: str, sign: float) -> None:
    """A Gaussian blob of ±3 in the middle of a quadrant of a (3, 64, 64) image, in place."""
    r0, c0 = QUADRANTS[quadrant]
    yy, xx = np.mgrid[0:32, 0:32]
    image[:, r0 : r0 + 32, c0 : c0 + 32] += sign * 3.0 * np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 40.0)


def _shares(heatmap: np.ndarray) -> dict[str, float]:
    total = heatmap.sum()
    return {q: float(heatmap[r : r + 32, c : c + 32].sum() / total) for q, (r, c) in QUADRANTS.items()}


@pytest.mark.parametrize("bright, dark", [("bottom-left", "top-right"), ("top-right", "bottom-left"),
                                          ("top-left", "bottom-right")])
def test_the_heatmap_lies_on_the_evidence_not_on_what_the_logit_ignores(bright, dark):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 0.3, (3, 64, 64)).astype(np.float32)
    _blob(image, bright, +1)
    _blob(image, dark, -1)  # seen by layer4's channel 1, which the logit does not read
    heatmap = gradcam(BrightnessNet(), image[None])[0]
    shares = _shares(heatmap)
    assert shares[bright] > 0.7, shares  # a transposed or flipped map would put it elsewhere
    assert shares[dark] < 0.1, shares
    row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert (row // 32 * 32, col // 32 * 32) == QUADRANTS[bright]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", pretrained="none").eval()


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (3, 3, 64, 64)).astype(np.float32)


def test_for_a_resnet_it_equals_cam_of_the_pooled_linear_head(resnet, crops):
    # logit = w · mean_ij A(i, j) + b, so dlogit/dA_c(i, j) = w_c / (h·w) and Grad-CAM is
    # relu(Σ_c w_c A_c): the class activation map, up to the scaling to [0, 1]
    body = nn.Sequential(*list(resnet.children())[:-2])
    with torch.no_grad():
        acts = body(torch.from_numpy(crops))  # layer4's output, (N, 512, 2, 2)
        cam = F.relu(torch.einsum("c,nchw->nhw", resnet.fc.weight[0], acts))
        up = F.interpolate(cam[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    low, high = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    expected = (up - low) / (high - low)
    assert np.allclose(gradcam(resnet, crops), expected, atol=1e-5)


def test_crop_shape_unit_range_deterministic_and_zero_without_evidence(resnet, crops):
    first = gradcam(resnet, crops)
    assert first.shape == (3, 64, 64) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0 and np.allclose(first.max(axis=(1, 2)), 1.0)
    assert np.array_equal(first, gradcam(resnet, crops))
    assert np.array_equal(first, gradcam(resnet, crops, layer=resnet.layer4))
    assert np.allclose(first, gradcam(resnet, torch.from_numpy(crops), batch_size=2), atol=1e-5)
    assert all(p.grad is None for p in resnet.parameters())
    against = build_model("resnet18", pretrained="none").eval()
    against.load_state_dict(resnet.state_dict())
    with torch.no_grad():
        against.fc.weight.copy_(-resnet.fc.weight.abs())  # every channel argues benign: no evidence
    assert not gradcam(against, crops).any()
    assert gradcam(resnet, crops[:0]).shape == (0, 64, 64)
