"""The patient-level bootstrap of the per-slice AUC at archive scale (score's metrics, issue 27).

`metrics.auc_cluster_bootstrap` against what a user would write: scikit-learn's
`roc_auc_score` with each resample's slice weights, one call per resample, on the same
seeded resamples (`metrics.resample_blocks`). Both must give the same interval. Prints the
seconds and the peak of Python allocations (tracemalloc) of each, and the ratio.

    .venv/bin/python benchmarks/bootstrap.py --patients 4256     # score's 200,000-object archive
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from vfx_ray.evaluation import metrics


def cohort(patients: int, slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities (3 decimals: ties) and patient ids, ``slices`` per patient."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(patients), slices)
    y = np.repeat(rng.integers(0, 2, patients), slices)
    p = np.round(np.clip(0.4 + 0.2 * y + rng.normal(0, 0.2, len(groups)), 0, 1), 3)
    return y, p, groups


def sklearn_loop(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_resamples: int) -> tuple[float, float]:
    """The baseline: one weighted scikit-learn AUC per resample."""
    _, index = np.unique(groups, return_inverse=True)
    aucs = []
    for block in metrics.resample_blocks(index.max() + 1, n_resamples):
        for counts in block:
            w = counts[index]
            if len(set(y[w > 0])) == 2:
                aucs.append(roc_auc_score(y, p, sample_weight=w))
    low, high = np.quantile(aucs, [0.025, 0.975])
    return float(low), float(high)


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return out, seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=4256)
    ap.add_argument("--slices", type=int, default=5, help="slices per patient (the synthetic patient's crops)")
    ap.add_argument("--resamples", type=int, default=metrics.BOOTSTRAP_RESAMPLES)
    args = ap.parse_args()
    y, p, g = cohort(args.patients, args.slices)
    ours, t_ours, m_ours = measured(lambda: metrics.auc_cluster_bootstrap(y, p, g, args.resamples))
    base, t_base, m_base = measured(lambda: sklearn_loop(y, p, g, args.resamples))
    same = np.allclose([ours["auc_cluster_ci_low"], ours["auc_cluster_ci_high"]], base, rtol=0, atol=1e-12)
    print(json.dumps({"patients": args.patients, "slices": len(y), "resamples": args.resamples,
                      "vfx_ray_s": round(t_ours, 2), "vfx_ray_peak_mb": round(m_ours, 1),
                      "sklearn_loop_s": round(t_base, 2), "sklearn_loop_peak_mb": round(m_base, 1),
                      "speedup": round(t_base / t_ours, 1), "same_interval": bool(same)}))
    if not same:
        raise SystemExit(f"intervals differ: {ours} vs {base}")


if __name__ == "__main__":
    main()
