"""Device-resident training of one fold: the crops sit on the worker's device for the whole
fold, and shuffling, augmentation and the loss sums stay there too.

Why: at the paper's batch of 32 a ResNet50 step on a large GPU takes about a millisecond, so
whatever the host does per step (a copy, an ``.item()``, a draw on the CPU, an iterator restart)
leaves the GPU waiting. Here the host only launches kernels: it reads nothing back per step,
and reads the loss sums once per epoch.

The semantics are those of ``epochs.train_one_epoch`` (the reference loop). An epoch is
``augment_factor`` passes. Each pass is a fresh permutation of the crops in batches of
``batch_size`` (the last one partial), and each image gets its own random affine of the same
ranges (``augment.random_affine``, drawn by a generator on the device). The paper's explicit
L2 term, ``l2 x sum w^2`` over conv/linear weights, becomes Adam's coupled
``weight_decay = 2 x l2`` on those weights only. That gives the same gradient, hence the same
updates, without about 54 extra kernels and their backward each step. Its value, sampled at
the end of each pass, is still added to the reported ``train_loss``.

On CUDA, the forward pass runs under bf16 autocast with ``channels_last`` tensors, and
``torch.compile`` is used by default (``compile="auto"``). If compilation fails, the loop
falls back to eager mode. The same code runs on the CPU (tests, CI) in fp32 eager mode.
Pure torch (no Ray, no DICOM): ``benchmarks/gpu.py`` runs it on a machine with torch alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfx_ray.config import COMPILE_MODES, TrainConfig
from vfx_ray.ml import model as vmodel
from vfx_ray.ml.augment import AffineRanges, random_affine

EVAL_BATCH = 1024


@dataclass(frozen=True)
class DeviceOptions:
    """How the loop uses its device: bf16 autocast, channels_last, torch.compile mode."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    compile: str = "off"  # off | on | cudagraphs (resolved; never "auto")

    @classmethod
    def for_device(cls, device: torch.device | str, compile: str = "auto") -> DeviceOptions:
        """The fast settings on CUDA; plain fp32 eager on the CPU (unless compile is asked for)."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        device = torch.device(device)
        cuda = device.type == "cuda"
        mode = ("on" if cuda else "off") if compile == "auto" else compile
        return cls(device, bf16=cuda, channels_last=cuda, compile=mode)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass(frozen=True)
class DeviceData:
    """A fold's crops (N, C, S, S) and labels (N,), float32, on the device for the whole fold."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def put(cls, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
            opts: DeviceOptions) -> DeviceData:
        x = torch.as_tensor(images, dtype=torch.float32).to(opts.device)
        y = torch.as_tensor(labels, dtype=torch.float32).to(opts.device)
        return cls(opts.layout(x), y)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device``: permutations and affine draws never touch the host."""
    return torch.Generator(device=device).manual_seed(seed)


def decayed(model: nn.Module) -> list[torch.Tensor]:
    """The weights the paper penalises: conv and linear weights (more than one dimension)."""
    return [p for p in vmodel.unwrap(model).parameters() if p.ndim > 1]


def adam(model: nn.Module, cfg: TrainConfig, opts: DeviceOptions) -> torch.optim.Adam:
    """Adam(lr, betas) with the paper's L2 term as coupled weight decay (2 x l2) on the
    penalised weights only; fused kernels on CUDA."""
    weights = {id(p) for p in decayed(model)}
    params = list(vmodel.unwrap(model).parameters())
    groups = [
        {"params": [p for p in params if id(p) in weights], "weight_decay": 2.0 * cfg.l2},
        {"params": [p for p in params if id(p) not in weights], "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=opts.device.type == "cuda" or None)


@torch.no_grad()
def l2_value(weights: list[torch.Tensor]) -> torch.Tensor:
    """sum w^2 over ``weights`` as one device scalar (foreach norms: a few kernels, no sync)."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is None:
        return torch.stack([w.detach().pow(2).sum() for w in weights]).sum()
    return total_norm(weights, norm_type=2.0).pow(2)


def compiled(model: nn.Module, opts: DeviceOptions) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward to train with: the model itself, or its torch.compile'd wrapper."""
    if opts.compile == "off":
        return model
    return torch.compile(model, mode="reduce-overhead" if opts.compile == "cudagraphs" else None)


class Trainer:
    """One worker's training steps over a DeviceData; falls back to eager if compiling fails."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, opts: DeviceOptions) -> None:
        self.model, self.opt, self.cfg, self.opts = model, opt, cfg, opts
        self.forward = compiled(model, opts)
        self.ranges = AffineRanges.from_config(cfg)
        self.weights = decayed(model)
        self.steps = 0
        if opts.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on (x, y); the batch's BCE as a device scalar (not read back).

        A compiled forward builds its graphs on the first step (forward and backward); should
        that fail, the step is redone eagerly and training goes on without compiling."""
        if self.steps or self.forward is self.model:
            return self._step(x, y)
        try:
            return self._step(x, y)
        except Exception as exc:  # noqa: BLE001 - compile errors come in many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            print(f"[vfx_ray.ml.resident] torch.compile failed, training eagerly: {first}", file=sys.stderr, flush=True)
            self.forward = self.model
            return self._step(x, y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.opts.compile == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.opts.device.type, dtype=torch.bfloat16, enabled=self.opts.bf16):
            logits = self.forward(x)
        bce = F.binary_cross_entropy_with_logits(logits.float().flatten(), y)
        self.opt.zero_grad(set_to_none=True)
        bce.backward()
        self.opt.step()
        self.steps += 1
        return bce.detach()

    def epoch(self, data: DeviceData, gen: torch.Generator, batch_size: int, passes: int) -> dict[str, float]:
        """``passes`` shuffled, augmented passes over ``data``; mean loss/BCE and images/s."""
        self.model.train()
        n, dev = len(data), data.labels.device
        sums = torch.zeros(2, dtype=torch.float64, device=dev)  # BCE x images, penalty x images
        start = time.perf_counter()
        for _ in range(passes):
            perm = torch.randperm(n, generator=gen, device=dev)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                x = self.opts.layout(random_affine(data.images[idx], self.ranges, gen))
                sums[0] += self.step(x, data.labels[idx]) * min(batch_size, n - i)
            if self.cfg.l2:  # sampled once per pass: it drifts slowly, and reading the weights costs
                sums[1] += l2_value(self.weights) * n
        bce_sum, pen_sum = sums.tolist()  # the epoch's one read-back
        seconds = time.perf_counter() - start
        images = n * passes
        return {
            "train_loss": (bce_sum + self.cfg.l2 * pen_sum) / max(images, 1),
            "train_bce": bce_sum / max(images, 1),
            "train_images": images,
            "train_seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else 0.0,
        }


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int = EVAL_BATCH) -> tuple[float, int]:
    """(summed BCE, count) in eval mode, fp32 eager, in big batches: sums, so workers can all-reduce."""
    net = vmodel.unwrap(model).eval()
    total = torch.zeros((), dtype=torch.float64, device=data.labels.device)
    for i in range(0, len(data), batch_size):
        logits = net(data.images[i : i + batch_size]).float().flatten()
        total += F.binary_cross_entropy_with_logits(logits, data.labels[i : i + batch_size], reduction="sum")
    return float(total), len(data)
