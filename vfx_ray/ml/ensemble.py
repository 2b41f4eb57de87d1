"""A scoring ensemble on one device: the mean malignancy probability of its models per crop.

Why a class of its own: a scorer must keep a GPU busy, and at ~1 ms per model call the host
must do little per batch. So batches are big (``score`` sends about 1,000 crops to a GPU
actor), the forward runs under bf16 autocast with ``channels_last`` on CUDA, host batches go
through one reused pinned buffer with a non-blocking copy, and the result is read back once
per batch. The models run either one after another on the same device batch (``loop``) or as
one batched call over their stacked weights (``vmap``, ``torch.func``); ``benchmarks/gpu.py``
measures both.
On the CPU the defaults are fp32 eager, the same numbers as ``model.predict_proba``.
Pure torch (no Ray): the benchmark runs it on a machine with torch alone.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

MODES = ("loop", "vmap")


class Ensemble:
    """Models loaded once on ``device``; ``probabilities`` of (N, C, S, S) float32 crops."""

    def __init__(self, models: list[nn.Module], device: torch.device | str = "cpu", *,
                 bf16: bool | None = None, mode: str = "loop") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {', '.join(MODES)}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.bf16 = cuda if bf16 is None else bf16
        self.layout = torch.channels_last if cuda else torch.preserve_format
        self.models = [m.to(self.device, memory_format=self.layout).eval() for m in models]
        self.mode = mode
        self._pinned: torch.Tensor | None = None
        if mode == "vmap":
            self._params, self._buffers = torch.func.stack_module_state(self.models)
            base = copy.deepcopy(self.models[0]).to("meta")

            def one(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(base, (params, buffers), (x,))

            self._vmapped = torch.vmap(one, in_dims=(0, 0, None))

    def to_device(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The batch on the device; from the host through a reused pinned buffer on CUDA."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if self.device.type == "cuda" and x.device.type == "cpu":
            if self._pinned is None or self._pinned.numel() < x.numel():
                self._pinned = torch.empty(x.numel(), dtype=torch.float32, pin_memory=True)
            staged = self._pinned[: x.numel()].view(x.shape)
            staged.copy_(x)  # the previous batch's copy is done: its result was read back
            x = staged.to(self.device, non_blocking=True)
        return x.to(self.device).contiguous(memory_format=self.layout)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(models, N) logits of a device batch."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.mode == "vmap":
                out = self._vmapped(self._params, self._buffers, x)
            else:
                out = torch.stack([m(x) for m in self.models])
        return out.float().flatten(1)

    def probabilities(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mean over the models of sigmoid(logit), float64, one per crop."""
        if len(images) == 0:
            return np.zeros(0, np.float64)
        return torch.sigmoid(self.logits(self.to_device(images))).mean(0).double().cpu().numpy()

    @torch.inference_mode()
    def probabilities_and_cams(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`probabilities`, and each crop's class activation maps (N, models, h, w)
        float32 (:func:`gradcam.cam_maps`) from the same forward pass: what a key image
        draws. The models run one after another here (``layer4`` is hooked), whatever the mode."""
        from vfx_ray.ml.gradcam import cam_maps

        x = self.to_device(images)
        logits, cams = [], []
        for m in self.models:
            store: list[torch.Tensor] = []
            handle = m.layer4.register_forward_hook(lambda _m, _i, out, store=store: store.append(out))
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits.append(m(x).float().flatten())
            finally:
                handle.remove()
            cams.append(cam_maps(m, store[0].float()))
        probs = torch.sigmoid(torch.stack(logits)).mean(0).double().cpu().numpy()
        return probs, torch.stack(cams, dim=1).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """The first model's pooled features (the input of its final fc layer), float32."""
        body = nn.Sequential(*list(self.models[0].children())[:-1])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return body(self.to_device(images)).float().flatten(1).cpu().numpy()
