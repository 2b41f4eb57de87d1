"""The scoring ensemble and actor against eager fp32 predict_proba (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from vfx_ray.config import CropConfig
from vfx_ray.ml import model as vmodel
from vfx_ray.ml.ensemble import Ensemble
from vfx_ray.stages.slice_scorer import SliceScorer

SIZE = 32


def nets(n: int) -> list[torch.nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(vmodel.build_model("resnet18", pretrained="none").eval())
    return out


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (40, 3, SIZE, SIZE)).astype(np.float32)


def eager_mean(models: list[torch.nn.Module], x: np.ndarray) -> np.ndarray:
    return np.mean([vmodel.predict_proba(m, x) for m in models], axis=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_ensemble_equals_eager_fp32_and_bf16_stays_close(crops, mode):
    models = nets(3)
    expected = eager_mean(models, crops)
    assert expected.std() > 0.01  # the models disagree across crops: a constant answer would show
    fp32 = Ensemble(models, "cpu", mode=mode).probabilities(crops)
    np.testing.assert_allclose(fp32, expected, atol=1e-5, rtol=0)
    bf16 = Ensemble(models, "cpu", bf16=True, mode=mode).probabilities(crops)
    np.testing.assert_allclose(bf16, expected, atol=2e-2, rtol=0)
    assert not np.array_equal(bf16, fp32)  # autocast did run in bf16


def test_scoring_actor_scores_crop_rows_only(tmp_path, crops):
    models = nets(2)
    files = []
    for i, m in enumerate(models):
        files.append(str(tmp_path / f"m{i}.pt"))
        vmodel.save_model(m, files[-1], "resnet18")
    kinds = ["headers", "crop", "crop", "headers", "crop"]
    images = [b"", crops[0].tobytes(), crops[1].tobytes(), b"", crops[2].tobytes()]
    batch = pa.table({"patient_id": ["P"] * 5, "kind": kinds, "meta": ["{}"] * 5,
                      "image": pa.array(images, pa.binary())})
    scorer = SliceScorer(files, CropConfig(crop_size=SIZE), features=True, use_gpu=False)
    out = scorer(batch)
    prob = out["probability"].to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(prob[[1, 2, 4]], eager_mean(models, crops[:3]), atol=1e-5, rtol=0)
    assert out["probability"].null_count == 2 and out["embedding"].null_count == 2
    assert len(out["embedding"][1].as_py()) == 512 * 4  # resnet18's pooled features, float32
