"""Li et al. 2021, Table 1 (``vfx_ray.paper``), allocated to a cohort as exact per-class counts.

Features are allocated by a seeded shuffle of exact counts (not coin flips), so the default
433-patient cohort reproduces Table 1 exactly; smaller cohorts scale each count with
largest-remainder rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from vfx_ray.paper import AGE, FEATURE_COUNTS, FEATURES, MALE_COUNTS, MALIGNANT_FRACTION, PAPER_N


@dataclass(frozen=True)
class Features:
    """The paper's six visual features of the target vertebra, present (True) or absent."""

    compression: bool = False
    cortex_interruption: bool = False
    soft_tissue_mass: bool = False
    transverse_fracture_line: bool = False
    multiple_segments: bool = False
    bone_destruction: bool = False

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Demographics:
    label: str  # malignant | benign
    features: Features
    age: int
    sex: str  # M | F


def apportion(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder (Hamilton) rounding: integers summing to ``total``, proportional to weights."""
    w = np.asarray(weights, dtype=float)
    if total < 0 or w.sum() <= 0:
        raise ValueError("apportion needs total >= 0 and positive weights")
    quota = total * w / w.sum()
    out = np.floor(quota).astype(int)
    remainder = quota - out
    for i in np.argsort(-remainder, kind="stable")[: total - out.sum()]:
        out[i] += 1
    return out.tolist()


def class_sizes(n_patients: int, malignant_fraction: float = MALIGNANT_FRACTION) -> dict[str, int]:
    n_mal, n_ben = apportion(n_patients, [malignant_fraction, 1 - malignant_fraction])
    return {"malignant": n_mal, "benign": n_ben}


def scaled_count(present_in_paper: int, paper_n: int, n: int) -> int:
    """Patients with a feature in a class of ``n``, proportional to the paper's count."""
    return apportion(n, [present_in_paper, paper_n - present_in_paper])[0] if n else 0


def _exact_flags(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    flags[:k] = True
    return rng.permutation(flags)


def ages(n: int, mean: float, sd: float, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """Integer ages with (close to) the given mean and sd, inside [lo, hi], hitting both ends
    when ``n >= 20``.

    Normal quantiles (not random draws) keep small classes close to the paper's summary.
    """
    if n == 0:
        return np.zeros(0, dtype=int)
    if n == 1:
        return np.array([int(round(mean))])
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    a = mean + sd * z / z.std()
    if n < 20:  # too few to carry the paper's extremes: keep the quantiles, inside the range
        return rng.permutation(np.clip(np.rint(a), lo, hi).astype(int))
    for _ in range(50):  # affine fix-up of the interior values after clipping to the range
        a = np.clip(a, lo, hi)
        a[0], a[-1] = lo, hi
        inner = a[1:-1]
        if inner.size < 2 or inner.std() == 0:
            break
        # choose inner mean/sd so that the whole set has the target mean and sd
        m_in = (mean * n - lo - hi) / (n - 2)
        ss_in = sd**2 * n + n * mean**2 - lo**2 - hi**2 - (n - 2) * m_in**2
        sd_in = np.sqrt(max(ss_in / (n - 2), 1e-6))
        a[1:-1] = m_in + (inner - inner.mean()) * sd_in / inner.std()
        if a[1:-1].min() >= lo and a[1:-1].max() <= hi:
            break
    a = np.clip(np.rint(a), lo, hi).astype(int)
    a[0], a[-1] = lo, hi
    return rng.permutation(a)


def allocate(n_patients: int, malignant_fraction: float, seed: int) -> list[Demographics]:
    """Label, features, age and sex for every patient: Table 1's counts, shuffled by ``seed``."""
    rng = np.random.default_rng([seed, 0x7AB1E1])
    sizes = class_sizes(n_patients, malignant_fraction)
    labels = rng.permutation(np.array(["malignant"] * sizes["malignant"]
                                      + ["benign"] * sizes["benign"]))
    per_class: dict[str, list[Demographics]] = {}
    for label, n in sizes.items():
        flags = {f: _exact_flags(n, scaled_count(FEATURE_COUNTS[label][f], PAPER_N[label], n), rng)
                 for f in FEATURES}
        males = _exact_flags(n, scaled_count(MALE_COUNTS[label], PAPER_N[label], n), rng)
        age = ages(n, *AGE[label], rng)
        per_class[label] = [
            Demographics(label, Features(**{f: bool(flags[f][i]) for f in FEATURES}),
                         int(age[i]), "M" if males[i] else "F")
            for i in range(n)
        ]
    taken = {label: iter(rows) for label, rows in per_class.items()}
    return [next(taken[str(label)]) for label in labels]
