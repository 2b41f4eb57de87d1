"""The pure-torch parts of a fold's training that need no device tricks: the seeds, the
early-stopping state, the paper's loss with its explicit L2 term, and the reference loop.

``train_one_epoch`` is the recipe written as the paper states it (loss = mean BCE + ``l2`` x sum
of squared conv/linear weights, one ``.item()`` per step, batches from any iterable). It is the
baseline that ``resident`` (what the Ray Train loop runs) is measured and tested against:
``benchmarks/train.py``, ``benchmarks/gpu.py`` and ``tests/test_resident.py``. No Ray here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfx_ray.config import TrainConfig
from vfx_ray.ml import model as vmodel

Batch = tuple[torch.Tensor, torch.Tensor]


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared conv/linear weights (parameters with more than one dimension)."""
    return torch.stack([p.pow(2).sum() for p in model.parameters() if p.ndim > 1]).sum()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    l2: float,
    device: torch.device | str = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` of (images, labels); returns mean loss/BCE and images/s."""
    model.train()
    plain = vmodel.unwrap(model)
    bce_sum, loss_sum, n = 0.0, 0.0, 0
    start = time.perf_counter()
    for x, y in batches:
        x = x.to(device, torch.float32, non_blocking=True)
        y = y.to(device, torch.float32, non_blocking=True)
        if transform is not None:
            x = transform(x)
        bce = F.binary_cross_entropy_with_logits(model(x).flatten(), y)
        loss = bce + l2 * l2_penalty(plain) if l2 else bce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bce_sum += bce.item() * len(y)
        loss_sum += loss.item() * len(y)
        n += len(y)
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum / max(n, 1),
        "train_bce": bce_sum / max(n, 1),
        "train_images": n,
        "train_seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
    """Summed BCE and count over ``batches`` in eval mode (sums so workers can all-reduce)."""
    model = vmodel.unwrap(model).eval()
    loss_sum, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device, torch.float32), y.to(device, torch.float32)
        loss_sum += F.binary_cross_entropy_with_logits(model(x).flatten(), y, reduction="sum").item()
        n += len(y)
    return {"loss_sum": loss_sum, "n": n}


@dataclass
class FitState:
    """Everything besides tensors that a resumed fold needs; stored in every checkpoint."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)

    def finished(self, cfg: TrainConfig, has_val: bool) -> bool:
        stopped = has_val and self.epochs_without_improvement >= cfg.patience
        return self.epoch >= cfg.max_epochs or stopped

    def update(self, val_loss: float | None) -> bool:
        """Count one more epoch; True when it is the new best (always, without validation)."""
        self.epoch += 1
        if val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss if val_loss is not None else math.inf
            self.best_epoch = self.epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (seed, fold, epoch, pass, rank), stable across runs."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
