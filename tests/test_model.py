"""Model builder, weight loading without network, model_id, augmentation, epoch/evaluate (no Ray)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision
from crops_fixture import make_crops

from vfx_ray import contracts, errors
from vfx_ray.config import TrainConfig
from vfx_ray.ml import model as vmodel
from vfx_ray.ml.augment import AffineRanges, random_affine
from vfx_ray.ml.epochs import FitState, evaluate, l2_penalty, train_one_epoch


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def fake_imagenet_file(path) -> dict:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()  # 1000-class head, like ImageNet
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("resnet50", 64)])
def test_one_logit_any_arch(arch, size):
    net = vmodel.build_model(arch, pretrained="none").eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 1)
    assert net.conv1.in_channels == 3


def test_imagenet_missing_offline_is_one_clear_line(torch_home):
    with pytest.raises(vmodel.PretrainedWeightsError) as e:
        vmodel.build_model("resnet50", pretrained="imagenet")
    msg = str(e.value)
    assert isinstance(e.value, errors.VfxError) and isinstance(e.value, ValueError)
    assert "\n" not in msg
    for needle in (
        "resnet50-0676ba61.pth",
        str(torch_home / "hub" / "checkpoints"),
        "--pretrained-path",
        "--pretrained none",
    ):
        assert needle in msg
    with pytest.raises(vmodel.PretrainedWeightsError, match="not found"):
        vmodel.build_model("resnet18", pretrained="imagenet", pretrained_path=str(torch_home / "nope.pth"))


def test_imagenet_from_cache_and_from_path(torch_home, tmp_path):
    cached = fake_imagenet_file(str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"))
    net = vmodel.build_model("resnet18", pretrained="imagenet")
    assert torch.equal(net.conv1.weight, cached["conv1.weight"])
    assert torch.equal(net.layer4[1].bn2.running_var, cached["layer4.1.bn2.running_var"])
    assert net.fc.out_features == 1
    other = fake_imagenet_file(str(tmp_path / "w.pth"))
    net2 = vmodel.build_model("resnet18", pretrained="imagenet", pretrained_path=str(tmp_path / "w.pth"))
    assert torch.equal(net2.layer1[0].conv1.weight, other["layer1.0.conv1.weight"])


def test_model_id_is_a_content_hash_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    a = vmodel.build_model("resnet18", pretrained="none")
    mid = vmodel.model_id(a)
    assert len(mid) == 16 and set(mid) <= set("0123456789abcdef")
    torch.manual_seed(0)  # the same weights built again: the same id; other weights: another
    assert vmodel.model_id(vmodel.build_model("resnet18", pretrained="none")) == mid
    assert vmodel.model_id(vmodel.build_model("resnet18", pretrained="none")) != mid
    assert vmodel.model_id(vmodel.cpu_state(a)) == mid
    with torch.no_grad():
        a.fc.bias += 1e-3
    assert vmodel.model_id(a) != mid
    saved_id = vmodel.save_model(a, str(tmp_path / "m.pt"), "resnet18", meta={"fold": 3})
    b, rec = vmodel.load_model(str(tmp_path / "m.pt"))
    assert saved_id == rec["model_id"] == vmodel.model_id(b) == vmodel.model_id(a)
    assert rec["meta"] == {"fold": 3} and rec["arch"] == "resnet18"
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(vmodel.predict_proba(a, x), vmodel.predict_proba(b, x), rtol=1e-6)


def test_random_affine_per_sample_seeded_and_bounded():
    ranges = AffineRanges.from_config(TrainConfig())
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, 12:20, 12:20] = 1.0
    batch = img.repeat(8, 1, 1, 1)
    out1 = random_affine(batch, ranges, torch.Generator().manual_seed(0))
    out2 = random_affine(batch, ranges, torch.Generator().manual_seed(0))
    assert torch.equal(out1, out2)
    assert not torch.allclose(out1[0], out1[1])  # one draw per sample, not per batch
    assert torch.equal(out1[:, 0], out1[:, 1])  # the three channels move together
    assert torch.equal(random_affine(batch, AffineRanges(0.0, 0.0, (1.0, 1.0))), batch)
    # translation only: the square's centre moves by at most translate x size = 3.2 px per axis
    shifted = random_affine(batch, AffineRanges(0.0, 0.1, (1.0, 1.0)), torch.Generator().manual_seed(1))
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for im in shifted[:, 0]:
        cy, cx = (im * ys).sum() / im.sum(), (im * xs).sum() / im.sum()
        assert abs(cy - 15.5) <= 3.3 and abs(cx - 15.5) <= 3.3


def test_l2_penalty_counts_weights_not_biases_or_batchnorm():
    net = vmodel.build_model("resnet18", pretrained="none")
    expected = sum(p.pow(2).sum() for n, p in net.named_parameters() if n.endswith("weight") and "bn" not in n
                   and "downsample.1" not in n)
    assert torch.allclose(l2_penalty(net), expected)


@pytest.mark.slow
def test_epoch_learns_the_fixture_and_early_stopping_state():
    table = make_crops(n_patients=16, slices=2, size=32)
    x = torch.from_numpy(contracts.images_from_arrow(table["image"]).copy())
    y = torch.tensor(table["label"].to_numpy(), dtype=torch.float32)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
    torch.manual_seed(0)
    net = vmodel.build_model("resnet18", pretrained="none")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    before = evaluate(net, batches)
    for _ in range(3):
        stats = train_one_epoch(net, batches, opt, l2=1e-4)
    after = evaluate(net, batches)
    assert stats["train_images"] == 32 and stats["train_loss"] > stats["train_bce"]  # L2 term is in the loss
    assert after["n"] == 32 and after["loss_sum"] < before["loss_sum"]
    s, cfg = FitState(), TrainConfig(max_epochs=10, patience=2)
    for v in (1.0, 0.8, 0.9):
        s.update(v)
    assert (s.best_epoch, s.epochs_without_improvement, s.finished(cfg, True)) == (2, 1, False)
    s.update(0.85)
    assert s.finished(cfg, True) and s.epoch == 4 and s.best_val_loss == 0.8
