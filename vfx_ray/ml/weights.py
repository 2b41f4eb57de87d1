"""Put ImageNet weights where every node of a cluster can read them (no Ray here).

The paper profile starts from ImageNet, but cluster nodes have no torchvision cache and must
not download (offline clusters hang). So the weights are copied once, from a machine that has
them, to object storage, and ``--pretrained-path`` names the copy. Before copying we check
what torch.hub would check: torchvision's file names (``resnet50-0676ba61.pth``) carry a
SHA-256 prefix of the file's bytes. And we load the file into the arch, so a wrong file is
refused here rather than an hour later on a GPU node.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass

import torchvision

from vfx_ray import storage
from vfx_ray.errors import VfxError
from vfx_ray.ml import model as vmodel

# torch.hub.HASH_REGEX is r"-([a-f0-9]*)\." searched anywhere; we take the hex between the
# last dash and the extension, at least 8 digits (torchvision's length), so that a plain
# name such as "weights-v2.pth" is not mistaken for a hashed one.
HASHED_NAME = re.compile(r"-(?P<prefix>[0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsError(VfxError, ValueError):
    """The weights file is not what it claims or does not fit the arch (one line, for the CLI)."""

    def __init__(self, message: str) -> None:
        super().__init__("weights", message)


@dataclass(frozen=True)
class PutResult:
    source: str
    dest: str
    nbytes: int
    sha256: str
    hash_checked: bool  # the name carried a SHA-256 prefix and it matched


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if storage.is_s3(uri) else os.path.basename(uri)


def name_hash_prefix(uri: str) -> str | None:
    """The SHA-256 prefix a torchvision-style name carries, or None for a plain name."""
    m = HASHED_NAME.search(basename(uri))
    return m.group("prefix") if m else None


def check_name_hash(uri: str, digest: str) -> bool:
    """True when ``uri``'s name carries a prefix of ``digest``; raise when it carries another."""
    prefix = name_hash_prefix(uri)
    if prefix is None:
        return False
    if not digest.startswith(prefix):
        raise WeightsError(
            f"{uri}: SHA-256 of the bytes is {digest[:len(prefix)]}..., but the name says {prefix} "
            "(a corrupt or truncated download, or a renamed file); refusing to copy it"
        )
    return True


def check_fits(arch: str, data: bytes, source: str) -> None:
    """Load the bytes into torchvision's ``arch`` the way training will (all but ``fc.``)."""
    try:
        state = vmodel.state_from_bytes(data, source)
        vmodel.load_backbone(torchvision.models.get_model(arch, weights=None), state, arch, source)
    except vmodel.PretrainedWeightsError as exc:
        raise WeightsError(exc.message) from None


def default_source(arch: str) -> str:
    """The arch's ImageNet weights in the local torchvision cache (V1 first)."""
    candidates = vmodel.imagenet_weight_files(arch)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise WeightsError(
        f"no ImageNet weights for {arch} in the torchvision cache (looked for {', '.join(candidates)}); "
        "run this where torchvision has downloaded them, or pass --from FILE"
    )


def destination(to: str, source: str) -> str:
    """``to``, with the source's file name appended when ``to`` is a folder (ends with /)."""
    is_dir = to.endswith("/") or (not storage.is_s3(to) and os.path.isdir(to))
    return storage.join(to, basename(source)) if is_dir else to


def put(arch: str, to: str, source: str | None = None) -> PutResult:
    """Copy checked weights from ``source`` (default: the torchvision cache) to ``to``."""
    if arch not in vmodel.ARCHS:
        raise WeightsError(f"unknown arch {arch!r}; choose one of {', '.join(vmodel.ARCHS)}")
    source = source or default_source(arch)
    if not vmodel.file_exists(source):
        raise WeightsError(f"{source}: no such weights file")
    data = storage.read_bytes(source)
    digest = hashlib.sha256(data).hexdigest()
    checked = check_name_hash(source, digest)
    check_fits(arch, data, source)
    dest = destination(to, source)
    check_name_hash(dest, digest)  # a hashed destination name must tell the truth too
    storage.write_bytes(dest, data)
    return PutResult(source=source, dest=dest, nbytes=len(data), sha256=digest, hash_checked=checked)
