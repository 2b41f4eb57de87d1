"""GPU throughput of training and scoring, on the pure-torch parts of vfx_ray (no Ray, no DICOM).

    PYTHONPATH=. python3 benchmarks/gpu.py            # on a CUDA machine, ~5-8 minutes in all
    PYTHONPATH=. python3 benchmarks/gpu.py --smoke    # on the CPU in seconds (a test runs this)

Needs only torch, torchvision and numpy, because the GPU machine this project borrows has no
Ray, pydicom or SimpleITK. It uses synthetic crops made in memory (3x64x64 float32, the paper's
shape), and a fold of FOLD_CROPS training crops. It prints one line per figure and writes the
same figures as JSON to $OUT/gpu.json when OUT is set:

  train reference fp32   images/s of one fold at batch 32 with the reference loop
                         (epochs.train_one_epoch: host batches, explicit L2, host affine draws,
                         .item() per step), fp32 eager: how the Ray loop trained before
  train resident         the device-resident loop (resident.Trainer): bf16, channels_last, eager
  packed K=1,2,4,8       aggregate images/s of K folds in K processes sharing the device
  score loop / vmap      crops/s of a 10-model ResNet50 ensemble (ensemble.Ensemble), batches
                         of 1024 host crops, bf16
  train compiled         the resident loop with torch.compile: default mode, then cudagraphs
  projection             minutes for the paper's protocol (10 folds x 100 epochs x 20 passes,
                         no early stop) at the best aggregate training rate

Each figure also carries the peak GPU memory of its part. Every timed window runs after a
warm-up (compilation included in the warm-up, and reported separately). A part whose expected
cost would overrun --budget-s is skipped and says so; a part that fails says why, and the
others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from vfx_ray.config import SynthConfig, TrainConfig
from vfx_ray.ml import epochs, resident
from vfx_ray.ml import model as vmodel
from vfx_ray.ml.augment import AffineRanges, random_affine
from vfx_ray.ml.ensemble import Ensemble

# A fold's training crops in the paper: 433 patients x ~4 sagittal slices x 0.9 (docs/cluster.md,
# "Sizing"): ~77 MB of 3x64x64 float32, ~31 M images over 10 folds x 100 epochs x 20 passes.
FOLD_CROPS = round(SynthConfig().patients * 4 * 0.9)


@dataclass(frozen=True)
class Plan:
    device: str
    arch: str = "resnet50"
    size: int = 64
    fold_crops: int = FOLD_CROPS
    batch: int = 32
    seconds: float = 10.0  # each timed window
    packs: tuple[int, ...] = (1, 2, 4, 8)
    models: int = 10
    score_batch: int = 1024
    budget_s: float = 470.0  # the limit is 8 minutes, warm-up and compiling included
    compile_modes: tuple[str, ...] = ("on", "cudagraphs")


SMOKE = dict(device="cpu", arch="resnet18", size=32, fold_crops=48, batch=16, seconds=0.5, packs=(1, 2),
             models=2, score_batch=32, budget_s=120.0, compile_modes=())


def fold_crops(plan: Plan, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic z-scored crops and labels of one fold (seeded by the fold: same in every process)."""
    rng = np.random.default_rng(fold)
    x = rng.normal(0, 1, (plan.fold_crops, 3, plan.size, plan.size)).astype(np.float32)
    y = (rng.random(plan.fold_crops) < SynthConfig().malignant_fraction).astype(np.float32)
    x[y == 1, :, plan.size // 3 : plan.size // 2] += 1.0  # something to learn
    return x, y


def fresh_model(plan: Plan, fold: int) -> torch.nn.Module:
    torch.manual_seed(epochs.seed_for(0, fold))
    return vmodel.build_model(plan.arch, pretrained="none")


def cfg_of(plan: Plan) -> TrainConfig:
    return TrainConfig(arch=plan.arch, pretrained="none", batch_size=plan.batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device, reset: bool = True) -> float | None:
    if device.type != "cuda":
        return None
    mb = torch.cuda.max_memory_allocated(device) / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return round(mb, 1)


def timed(run_once, images_per_run: int, seconds: float, device: torch.device) -> tuple[float, int]:
    """(images/s, images) of repeated ``run_once`` calls for at least ``seconds``."""
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        run_once()
        n += images_per_run
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed, n


def reference_rate(plan: Plan) -> dict[str, Any]:
    """The reference loop as the Ray loop ran it before: host batches moved per step, host affine draws."""
    dev, cfg = torch.device(plan.device), cfg_of(plan)
    x, y = (torch.from_numpy(a) for a in fold_crops(plan, 0))
    net = fresh_model(plan, 0).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas)
    gen, ranges = torch.Generator().manual_seed(0), AffineRanges.from_config(cfg)

    def one_pass() -> None:
        batches = ((x[i], y[i]) for i in torch.randperm(len(x), generator=gen).split(plan.batch))
        epochs.train_one_epoch(net, batches, opt, l2=cfg.l2, device=dev,
                               transform=lambda b: random_affine(b, ranges, gen))

    one_pass()  # warm-up
    rate, images = timed(one_pass, len(x), plan.seconds, dev)
    return {"images_per_s": rate, "images": images, "peak_mb": peak_mb(dev)}


def resident_trainer(plan: Plan, fold: int, compile: str) -> tuple[resident.Trainer, resident.DeviceData]:
    opts = resident.DeviceOptions.for_device(plan.device, compile)
    net = fresh_model(plan, fold)
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = net.to(opts.device)
    cfg = cfg_of(plan)
    data = resident.DeviceData.put(*fold_crops(plan, fold), opts)
    return resident.Trainer(net, resident.adam(net, cfg, opts), cfg, opts), data


def resident_rate(plan: Plan, compile: str = "off") -> dict[str, Any]:
    trainer, data = resident_trainer(plan, 0, compile)
    gen = resident.generator(trainer.opts.device, 0)
    t0 = time.perf_counter()
    trainer.epoch(data, gen, plan.batch, 1)  # warm-up: compiles (forward, backward) when asked
    warm = time.perf_counter() - t0
    if compile != "off" and trainer.forward is trainer.model:
        return {"error": "torch.compile failed (see stderr); fell back to eager", "warmup_s": warm}
    rate, images = timed(lambda: trainer.epoch(data, gen, plan.batch, 1), len(data), plan.seconds, trainer.opts.device)
    return {"images_per_s": rate, "images": images, "warmup_s": round(warm, 1), "peak_mb": peak_mb(trainer.opts.device)}


def packed_worker(plan: Plan, fold: int, barrier, results) -> None:
    """One of K processes: one pass of its fold (same seeds packed or not: the model id after it
    must not depend on K), then, once all K are ready, a timed window together."""
    torch.set_num_threads(1)
    trainer, data = resident_trainer(plan, fold, "off")
    dev = trainer.opts.device
    trainer.epoch(data, resident.generator(dev, epochs.seed_for(0, fold, 1, 0)), plan.batch, 1)
    mid = vmodel.model_id(trainer.model)
    gen = resident.generator(dev, fold)
    barrier.wait()
    rate, images = timed(lambda: trainer.epoch(data, gen, plan.batch, 1), len(data), plan.seconds, dev)
    results.put({"fold": fold, "images": images, "images_per_s": rate, "model_id_after_one_pass": mid,
                 "peak_mb": peak_mb(dev)})


def packed_rate(plan: Plan, k: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=packed_worker, args=(plan, fold, barrier, results)) for fold in range(k)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    got.sort(key=lambda r: r["fold"])
    peaks = [r["peak_mb"] for r in got if r["peak_mb"] is not None]
    return {"images_per_s": sum(r["images_per_s"] for r in got), "per_fold": got,
            "peak_mb": round(sum(peaks), 1) if peaks else None}


def score_rate(plan: Plan, mode: str) -> dict[str, Any]:
    dev = torch.device(plan.device)
    torch.manual_seed(0)
    models = [vmodel.build_model(plan.arch, pretrained="none") for _ in range(plan.models)]
    ens = Ensemble(models, dev, mode=mode)
    rng = np.random.default_rng(1)
    host = [rng.normal(0, 1, (plan.score_batch, 3, plan.size, plan.size)).astype(np.float32) for _ in range(4)]
    turn = iter(range(10**9))

    def one() -> None:
        ens.probabilities(host[next(turn) % len(host)])  # reads back: a full round trip per batch

    for _ in range(3):
        one()
    rate, crops = timed(one, plan.score_batch, plan.seconds, dev)
    return {"crops_per_s": rate, "crops": crops, "bf16": ens.bf16, "peak_mb": peak_mb(dev)}


def projection(plan: Plan, rate: float) -> dict[str, Any]:
    paper = TrainConfig()
    images = paper.n_folds * paper.max_epochs * paper.augment_factor * plan.fold_crops
    return {"images": images, "images_per_s": rate, "minutes": images / rate / 60}


def run(plan: Plan) -> dict[str, Any]:
    start = time.perf_counter()
    out: dict[str, Any] = {"plan": plan.__dict__, "env": environment(plan)}
    print(f"# {out['env']}", flush=True)

    def part(name: str, cost_s: float, fn, *args) -> None:
        """Run one part unless its expected cost would overrun the budget; a failure is a figure too."""
        if time.perf_counter() - start + cost_s > plan.budget_s:
            out[name] = {"skipped": f"would overrun the {plan.budget_s:.0f} s budget"}
            print(f"{name:28s} skipped (time budget)", flush=True)
            return
        try:
            res = fn(plan, *args)
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' figures
            res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        out[name] = res
        print(f"{name:28s} {describe(res)}", flush=True)

    # cheap and essential first; compiling (a minute or two per mode on a GPU) last
    window = plan.seconds
    part("train reference fp32", 3 * window, reference_rate)
    part("train resident", 3 * window, resident_rate, "off")
    for k in plan.packs:
        part(f"packed K={k}", 30 + 2 * window, packed_rate, k)
    for mode in ("loop", "vmap"):
        part(f"score {plan.models} models {mode}", 20 + 2 * window, score_rate, mode)
    for mode in plan.compile_modes:
        part(f"train compiled {mode}", 150 + window, resident_rate, mode)
    rates = [r.get("images_per_s", 0) for n, r in out.items()
             if n.startswith(("train", "packed")) and isinstance(r, dict)]
    best = max(rates, default=0)
    if best:
        out["projection"] = projection(plan, best)
        p = out["projection"]
        print(f"{'projection':28s} paper protocol {p['images'] / 1e6:.1f} M images at {best:,.0f} images/s: "
              f"{p['minutes']:.1f} min (fold start-up and validation not included)", flush=True)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def describe(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"failed: {res['error']}"
    rate = res.get("images_per_s") or res.get("crops_per_s")
    unit = "images/s" if "images_per_s" in res else "crops/s"
    extra = [f"warm-up {res['warmup_s']} s"] if res.get("warmup_s") is not None else []
    if res.get("peak_mb") is not None:
        extra.append(f"peak GPU memory {res['peak_mb']:,.0f} MB")
    if "per_fold" in res:
        extra.append("per fold " + ", ".join(f"{r['images_per_s']:,.0f}" for r in res["per_fold"]))
    return f"{rate:>10,.0f} {unit}" + (f"  ({'; '.join(extra)})" if extra else "")


def environment(plan: Plan) -> str:
    dev = torch.device(plan.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return (f"{name}; torch {torch.__version__}; {plan.arch} {plan.size}x{plan.size}, fold of {plan.fold_crops} "
            f"crops, batch {plan.batch}, {plan.seconds:g} s windows; python {sys.version.split()[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny run on the CPU (seconds): checks the script works")
    ap.add_argument("--seconds", type=float, help="length of each timed window")
    ap.add_argument("--budget-s", type=float,
                    help="skip the parts expected to end after this many seconds (default 470)")
    args = ap.parse_args()
    if args.smoke:
        plan = Plan(**SMOKE)
    elif torch.cuda.is_available():
        plan = Plan(device="cuda")
    else:
        sys.exit("no CUDA device: run with --smoke on a CPU machine")
    plan = replace(plan, **{k: v for k, v in (("seconds", args.seconds), ("budget_s", args.budget_s)) if v})
    result = run(plan)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
