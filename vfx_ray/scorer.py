"""The scoring actor, in a module of its own: a Ray worker that hosts it imports only this,
torch and the model, not the driver's planning, metrics and DICOM code (about 1.3 s less
start-up per actor)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vfx_ray.config import CropConfig

SLICE_WIRE = pa.schema(
    [
        ("patient_id", pa.string()),
        ("kind", pa.string()),
        ("meta", pa.string()),
        ("probability", pa.float64()),
        ("embedding", pa.binary()),
    ]
)


class SliceScorer:
    """Ray Data actor: the model(s) loaded once; wire crop rows in, probabilities out."""

    def __init__(self, files: list[str], cfg: CropConfig, features: bool, use_gpu: bool) -> None:
        import torch

        from vfx_ray.model import load_model, require_cuda

        self.torch = torch
        if not use_gpu:
            torch.set_num_threads(1)  # the decode tasks keep the cores
        require_cuda(use_gpu, "this scoring actor")  # no silent CPU fallback
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.models = []
        for f in files:
            net, _ = load_model(f)
            self.models.append(net.to(self.device, memory_format=torch.channels_last).eval())
        self.shape = (cfg.channels, cfg.crop_size, cfg.crop_size)
        self.features = features

    def __call__(self, batch: pa.Table) -> pa.Table:
        torch = self.torch
        kinds = batch["kind"].to_pylist()
        crop_rows = [i for i, k in enumerate(kinds) if k == "crop"]
        prob = np.full(len(kinds), np.nan)
        emb: list[bytes | None] = [None] * len(kinds)
        if crop_rows:
            images = batch["image"].take(crop_rows).to_pylist()
            x = torch.from_numpy(np.stack([np.frombuffer(b, np.float32).reshape(self.shape) for b in images]))
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                p = torch.stack([torch.sigmoid(m(x)).flatten() for m in self.models]).mean(0)
                prob[crop_rows] = p.double().cpu().numpy()
                if self.features:
                    pooled = self.embed(self.models[0], x).float().cpu().numpy()
                    for j, i in enumerate(crop_rows):
                        emb[i] = pooled[j].tobytes()
        return pa.table(
            {
                "patient_id": batch["patient_id"],
                "kind": batch["kind"],
                "meta": batch["meta"],
                "probability": pa.array(prob, pa.float64(), mask=np.isnan(prob)),
                "embedding": pa.array(emb, pa.binary()),
            },
            schema=SLICE_WIRE,
        )

    def embed(self, net, x):
        """The pooled ResNet features (input of the final fc layer)."""
        body = self.torch.nn.Sequential(*list(net.children())[:-1])
        return body(x).flatten(1)
