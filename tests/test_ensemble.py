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


def test_the_scorer_s_class_activation_maps_are_the_grad_cams_of_its_forward_pass(crops):
    from vfx_ray.ml.gradcam import gradcam, heat_from_cams

    models = nets(2)
    ensemble = Ensemble(models, "cpu")
    probs, cams = ensemble.probabilities_and_cams(crops[:6])
    assert np.array_equal(probs, ensemble.probabilities(crops[:6]))  # the scores bit for bit
    assert cams.shape == (6, 2, 1, 1) and cams.dtype == np.float32  # resnet18's layer4 at 32x32: 1x1
    big = np.random.default_rng(1).normal(0, 1, (3, 3, 64, 64)).astype(np.float32)
    _, cams = ensemble.probabilities_and_cams(big)  # 2x2 maps: where the evidence lies matters
    for crop, maps in zip(big, cams, strict=True):
        expected = np.mean([gradcam(m, crop[None])[0] for m in models], axis=0)
        assert expected.std() > 0.05  # a map with places, not a constant
        np.testing.assert_allclose(heat_from_cams(maps, 64), expected, atol=1e-5, rtol=0)


def test_the_scoring_actor_keeps_the_maps_only_when_asked(tmp_path, crops):
    files = []
    for i, m in enumerate(nets(2)):
        files.append(str(tmp_path / f"m{i}.pt"))
        vmodel.save_model(m, files[-1], "resnet18")
    batch = pa.table({"patient_id": ["P"] * 3, "kind": ["headers", "crop", "crop"], "meta": ["{}"] * 3,
                      "image": pa.array([b"", crops[0].tobytes(), crops[1].tobytes()], pa.binary())})
    cfg = CropConfig(crop_size=SIZE)
    with_maps = SliceScorer(files, cfg, features=False, use_gpu=False, cams=True)(batch)
    without = SliceScorer(files, cfg, features=False, use_gpu=False)(batch)
    assert with_maps["probability"].equals(without["probability"])
    assert without["cam"].null_count == 3 and with_maps["cam"].null_count == 1
    _, cams = Ensemble(nets(2), "cpu").probabilities_and_cams(crops[:2])
    assert with_maps["cam"][2].as_py() == cams[1].tobytes()
