"""The scoring actor, in a module of its own: a Ray worker that hosts it imports only this,
torch and the model, not the driver's planning, metrics and DICOM code (about 1.3 s less
start-up per actor)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vfx_ray.config import CropConfig
from vfx_ray.pipeline.wire import SCORED_WIRE, Kind, images


class SliceScorer:
    """Ray Data actor: the model(s) loaded once; wire crop rows in, probabilities out."""

    def __init__(self, files: list[str], cfg: CropConfig, features: bool, use_gpu: bool, cams: bool = False) -> None:
        import torch

        from vfx_ray.ml.ensemble import Ensemble
        from vfx_ray.ml.model import load_model, require_cuda

        if not use_gpu:
            torch.set_num_threads(1)  # the decode tasks keep the cores
        require_cuda(use_gpu, "this scoring actor")  # no silent CPU fallback
        self.ensemble = Ensemble([load_model(f)[0] for f in files], "cuda" if use_gpu else "cpu")
        self.shape = (cfg.channels, cfg.crop_size, cfg.crop_size)
        self.features, self.cams = features, cams

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch["kind"].to_numpy(zero_copy_only=False)
        crop_rows = np.flatnonzero(kinds == Kind.CROP)
        prob = np.full(len(kinds), np.nan)
        emb: list[bytes | None] = [None] * len(kinds)
        cam: list[bytes | None] = [None] * len(kinds)
        if len(crop_rows):
            x = images(batch["image"].take(pa.array(crop_rows)), self.shape)
            if self.cams:  # the key images' maps, from the same forward pass
                prob[crop_rows], maps = self.ensemble.probabilities_and_cams(x)
                for i, m in zip(crop_rows, maps, strict=True):
                    cam[i] = m.tobytes()
            else:
                prob[crop_rows] = self.ensemble.probabilities(x)
            if self.features:
                for i, row in zip(crop_rows, self.ensemble.embed(x), strict=True):
                    emb[i] = row.tobytes()
        return pa.table(
            {
                "patient_id": batch["patient_id"],
                "kind": batch["kind"],
                "meta": batch["meta"],
                "probability": pa.array(prob, pa.float64(), mask=np.isnan(prob)),
                "embedding": pa.array(emb, pa.binary()),
                "cam": pa.array(cam, pa.binary()),
            },
            schema=SCORED_WIRE,
        )
