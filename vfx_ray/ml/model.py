"""ResNet builder (one logit, sigmoid = malignancy probability), weight files and model_id.

ImageNet weights are only ever read, never downloaded - from the torchvision cache
(``$TORCH_HOME/hub/checkpoints``) or an explicit URI (local or s3://, which every node of a
cluster can read; ``vfx-ray weights put`` puts them there) - because a download would hang
on an offline cluster. Without either, :class:`PretrainedWeightsError` says how to provide them.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from vfx_ray import storage
from vfx_ray.errors import VfxError

ARCHS = ("resnet18", "resnet34", "resnet50")
PRETRAINED = ("imagenet", "none")
MODEL_FORMAT = "vfx_ray.ml.model/1"


class PretrainedWeightsError(VfxError, ValueError):
    """ImageNet weights were asked for but are not on this machine (one line, for the CLI)."""

    def __init__(self, message: str) -> None:
        super().__init__("train", message)


def imagenet_weight_files(arch: str) -> list[str]:
    """Cache paths torchvision would use for this arch's ImageNet weights (V1 first)."""
    weights = torchvision.models.get_model_weights(arch)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return [os.path.join(cache, os.path.basename(w.url)) for w in weights]


def find_imagenet_weights(arch: str, pretrained_path: str | None = None) -> str:
    """Path of ImageNet weights: ``pretrained_path`` or the torchvision cache; never downloads.

    Raises PretrainedWeightsError (one line saying how to provide them) when there are none.
    """
    first = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    if pretrained_path:
        try:
            if file_exists(pretrained_path):
                return pretrained_path
        except ConnectionError:  # the store is down: its own one-line error
            raise
        except OSError as exc:  # e.g. access denied: say so in one line, naming the flag
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PretrainedWeightsError(f"--pretrained-path {pretrained_path} cannot be read: {detail}") from None
        where = "object" if storage.is_s3(pretrained_path) else "file"
        raise PretrainedWeightsError(
            f"pretrained weights not found at {pretrained_path} (no such {where}); pass --pretrained-path "
            f"with an existing local file or s3:// object (`vfx-ray weights put --arch {arch} --to "
            f"s3://BUCKET/weights/` uploads {os.path.basename(first)} and prints the flag), or --pretrained none"
        )
    candidates = imagenet_weight_files(arch)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise PretrainedWeightsError(
        f"ImageNet weights for {arch} are not on this machine (looked for "
        f"{', '.join(candidates)}; no download is attempted): download {first} into "
        f"$TORCH_HOME/hub/checkpoints ({os.path.dirname(candidates[0])}), or pass "
        f"--pretrained-path URI (a local file or s3:// object; `vfx-ray weights put` uploads one), "
        f"or --pretrained none to train from scratch"
    )


def load_imagenet_state(arch: str, pretrained_path: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet state dict from ``pretrained_path`` (local or s3://) or the torchvision cache."""
    path = find_imagenet_weights(arch, pretrained_path)
    return state_from_bytes(storage.read_bytes(path), path)


def file_exists(uri: str) -> bool:
    """A file or object at ``uri`` (a folder or an s3 prefix is not weights)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    return storage.retrying(uri, lambda: fs.get_file_info(path)).type == pafs.FileType.File


def state_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file's bytes (bare, or under ``state_dict``); one-line errors."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors are many types, all "not weights"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedWeightsError(f"{source} is not a PyTorch weights file: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{source} holds no state dict (a mapping of names to tensors)")
    return state


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, source: str = "weights file") -> None:
    """Every layer but the head ``fc`` from ``state``; refuses weights of another arch in one line."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: a multi-line message, cut to its first reason
        reasons = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise PretrainedWeightsError(f"{source} does not fit {arch}: {(reasons or [str(exc)])[0]}") from None
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise PretrainedWeightsError(
            f"{source} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def build_model(
    arch: str = "resnet50", pretrained: str = "imagenet", pretrained_path: str | None = None
) -> nn.Module:
    """torchvision ResNet with 3 input channels and a single-logit head.

    With ``pretrained="imagenet"`` every layer but the new head starts from ImageNet.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if pretrained not in PRETRAINED:
        raise ValueError(f"unknown pretrained {pretrained!r}; choose one of {', '.join(PRETRAINED)}")
    model = torchvision.models.get_model(arch, weights=None)
    if pretrained == "imagenet":
        source = pretrained_path or "the cached ImageNet weights file"
        load_backbone(model, load_imagenet_state(arch, pretrained_path), arch, source)
    model.fc = nn.Linear(model.fc.in_features, 1)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the (unwrapped) model's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def model_id(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Content hash of the weights: sha256 over (name, dtype, shape, bytes) sorted by name.

    Same weights give the same id whatever process or device produced them.
    """
    state = cpu_state(weights) if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(
    weights: nn.Module | Mapping[str, torch.Tensor], uri: str, arch: str, meta: dict[str, Any] | None = None
) -> str:
    """Write ``model.pt`` (arch, state dict, model_id, meta) to a local path or s3://; return the id."""
    state = cpu_state(weights) if isinstance(weights, nn.Module) else dict(weights)
    mid = model_id(state)
    buf = io.BytesIO()
    torch.save({"format": MODEL_FORMAT, "arch": arch, "model_id": mid, "state_dict": state, "meta": meta or {}}, buf)
    storage.write_bytes(uri, buf.getvalue())
    return mid


def _read(uri: str) -> dict[str, Any]:
    rec = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if not isinstance(rec, dict) or rec.get("format") != MODEL_FORMAT:
        raise ValueError(f"{uri} is not a vfx_ray model file ({MODEL_FORMAT})")
    return rec


def model_record(uri: str) -> dict[str, Any]:
    """A ``model.pt``'s record (arch, model_id, meta) without building the network."""
    return {k: v for k, v in _read(uri).items() if k != "state_dict"}


def load_model(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """Model and its record (arch, model_id, meta) from a ``model.pt`` written by save_model."""
    rec = _read(uri)
    model = build_model(rec["arch"], pretrained="none")
    model.load_state_dict(rec["state_dict"])
    model.eval()
    return model, {k: v for k, v in rec.items() if k != "state_dict"}


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Malignancy probabilities (sigmoid of the logit) for (N, 3, S, S) crops, in eval mode."""
    model = unwrap(model).to(device).eval()
    x = images.float() if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, np.float32))
    out = [torch.sigmoid(model(x[i : i + batch_size].to(device))).flatten().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def require_cuda(use_gpu: bool | None, what: str) -> None:
    """A worker placed for a GPU that finds no CUDA device fails, never falls back to the CPU."""
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"{what} was placed for a GPU but finds no CUDA device on its node "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                           "check the node's driver and image, or run with --no-gpu")
