"""The device-resident training path (resident.py) against the reference loop (epochs.py), on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from crops_fixture import make_crops

from vfx_ray import contracts
from vfx_ray.config import TrainConfig
from vfx_ray.ml import epochs, resident
from vfx_ray.ml import model as vmodel
from vfx_ray.ml.augment import AffineRanges, random_affine
from vfx_ray.stages import fold_trainer as vtrain

CPU = resident.DeviceOptions.for_device("cpu")
CFG = TrainConfig(arch="resnet18", pretrained="none", lr=1e-3, batch_size=8, augment_factor=2, l2=1e-4)


def tensors(n_patients: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = make_crops(n_patients=n_patients, slices=2, size=32, seed=seed)
    x = torch.from_numpy(contracts.images_from_arrow(table["image"]).copy())
    return x, torch.tensor(table["label"].to_numpy(), dtype=torch.float32)


def seeded_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vmodel.build_model("resnet18", pretrained="none")


def test_coupled_weight_decay_is_the_papers_explicit_l2_term():
    """The gradient Adam uses with resident.adam's groups (BCE gradient + weight_decay x w) is the
    gradient of the paper's loss, BCE + l2 sum w^2 over conv/linear weights. Compared as
    gradients, not as weights after Adam steps: Adam divides by the gradient's own size, which
    turns float rounding where the two terms nearly cancel into differences of up to 1e-3."""
    x, y = tensors(4, seed=1)
    cfg = TrainConfig(lr=1e-2, l2=5e-2)
    explicit, coupled = seeded_net(), seeded_net()
    loss = F.binary_cross_entropy_with_logits(explicit(x).flatten(), y) + cfg.l2 * epochs.l2_penalty(explicit)
    loss.backward()
    opt = resident.adam(coupled, cfg, CPU)
    F.binary_cross_entropy_with_logits(coupled(x).flatten(), y).backward()
    names = {id(p): n for n, p in coupled.named_parameters()}
    decayed = 0
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            used = p.grad + group["weight_decay"] * p.detach()
            torch.testing.assert_close(used, explicit.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)
            decayed += group["weight_decay"] > 0
    assert decayed == len(resident.decayed(coupled)) == sum(1 for n, _ in coupled.named_parameters()
                                                             if n.endswith("weight") and "bn" not in n
                                                             and "downsample.1" not in n)
    assert torch.allclose(resident.l2_value(resident.decayed(coupled)), epochs.l2_penalty(coupled), rtol=1e-4)


@pytest.mark.slow
def test_resident_epoch_trains_like_the_reference_loop():
    """Same init, recipe and augmentation ranges: the two loops reach comparable validation BCE."""
    x, y = tensors(24, seed=2)
    xv, yv = tensors(12, seed=3)
    val = resident.DeviceData.put(xv, yv, CPU)
    start = seeded_net()
    before = resident.evaluate(start, val)[0] / len(val)

    ref = copy.deepcopy(start)
    opt = torch.optim.Adam(ref.parameters(), lr=CFG.lr, betas=CFG.betas)
    gen = torch.Generator().manual_seed(5)
    ranges = AffineRanges.from_config(CFG)
    for _ in range(3):
        batches = [(x[idx], y[idx]) for _ in range(CFG.augment_factor)
                   for idx in torch.randperm(len(x), generator=gen).split(CFG.batch_size)]
        ref_stats = epochs.train_one_epoch(ref, batches, opt, l2=CFG.l2,
                                           transform=lambda b: random_affine(b, ranges, gen))
    ref_val = resident.evaluate(ref, val)[0] / len(val)

    new = copy.deepcopy(start)
    trainer = resident.Trainer(new, resident.adam(new, CFG, CPU), CFG, CPU)
    data = resident.DeviceData.put(x, y, CPU)
    for epoch in range(3):
        stats = trainer.epoch(data, resident.generator(CPU.device, epoch), CFG.batch_size, CFG.augment_factor)
    new_val = resident.evaluate(new, val)[0] / len(val)

    assert stats["train_images"] == ref_stats["train_images"] == len(x) * CFG.augment_factor
    assert before > 0.6 and ref_val < 0.5 * before and new_val < 0.5 * before, (before, ref_val, new_val)
    assert abs(new_val - ref_val) < 0.25 * before, (ref_val, new_val)
    assert abs(stats["train_bce"] - ref_stats["train_bce"]) < 0.25
    # the reported loss carries the paper's L2 term: l2 x sum w^2 (a resnet18 has sum w^2 ~ 500-1000)
    term = stats["train_loss"] - stats["train_bce"]
    pen = float(resident.l2_value(resident.decayed(new)))
    assert term == pytest.approx(CFG.l2 * pen, rel=0.05)


def test_a_fold_depends_on_its_seed_only():
    x, y = tensors(6, seed=4)

    def run(seed: int) -> str:
        net = seeded_net()
        trainer = resident.Trainer(net, resident.adam(net, CFG, CPU), CFG, CPU)
        trainer.epoch(resident.DeviceData.put(x, y, CPU), resident.generator(CPU.device, seed), 8, 2)
        return vmodel.model_id(net)

    assert run(7) == run(7) != run(8)


def test_a_failing_compile_falls_back_to_eager(monkeypatch, capsys):
    calls = []

    def broken(model, opts):
        def forward(x):
            calls.append(1)
            raise RuntimeError("inductor: no C compiler\nmore")
        return forward

    monkeypatch.setattr(resident, "compiled", broken)
    x, y = tensors(2, seed=5)
    net = seeded_net()
    opts = resident.DeviceOptions(torch.device("cpu"), compile="on")
    trainer = resident.Trainer(net, resident.adam(net, CFG, opts), CFG, opts)
    stats = trainer.epoch(resident.DeviceData.put(x, y, opts), resident.generator(opts.device, 0), 2, 1)
    assert calls == [1] and trainer.forward is net and stats["train_images"] == 4
    assert "torch.compile failed, training eagerly: inductor: no C compiler" in capsys.readouterr().err


def test_device_options_and_packed_worker_requests():
    assert CPU == resident.DeviceOptions(torch.device("cpu"), bf16=False, channels_last=False, compile="off")
    cuda = resident.DeviceOptions.for_device("cuda")  # no CUDA needed to decide
    assert (cuda.bf16, cuda.channels_last, cuda.compile) == (True, True, "on")
    assert resident.DeviceOptions.for_device("cuda", "off").compile == "off"
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        resident.DeviceOptions.for_device("cpu", "fast")
    assert vtrain.worker_resources(TrainConfig(use_gpu=True, folds_per_gpu=4)) == {"CPU": 1, "GPU": 0.25}
    shared = TrainConfig(use_gpu=True, folds_per_gpu=2, gpu_worker_cpus=6)
    assert vtrain.worker_resources(shared) == {"CPU": 3, "GPU": 0.5}
    assert vtrain.worker_resources(TrainConfig(use_gpu=False, folds_per_gpu=4)) == {"CPU": 1}
    six = vtrain.worker_resources(TrainConfig(use_gpu=True, folds_per_gpu=6))["GPU"]
    assert six == 0.1666 and 6 * six <= 1  # Ray's 1e-4 units; 0.1667 x 6 would not fit one GPU
