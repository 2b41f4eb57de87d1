"""Trabecular texture and CT image noise at the strength a :class:`SynthDifficulty` asks for.

Real cancellous bone is not flat: at CT resolution its trabeculae show as a mottled pattern a
few mm across, stretched along the spine's axis (vertical trabeculae carry the load). Real
noise is not white either: the reconstruction kernel correlates it over about a pixel, so
averaging a 3 mm slab removes less of it than it would of white noise.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

N_WAVES = 16


def plan_texture(rng: np.random.Generator) -> tuple[tuple[float, float, float, float], ...]:
    """Wave vectors (rad/mm along x, y, z) and phases of a sum of cosines: wavelengths of
    2-5 mm in the axial plane, 2-3 times longer along z."""
    waves = []
    for _ in range(N_WAVES):
        theta = rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / rng.uniform(2.0, 5.0)
        kz = k * rng.uniform(-0.4, 0.4)
        waves.append((k * np.cos(theta), k * np.sin(theta), kz, rng.uniform(0, 2 * np.pi)))
    return tuple(waves)


def trabecular(x: np.ndarray, y: np.ndarray, z: np.ndarray,
               waves: tuple[tuple[float, float, float, float], ...], sd_hu: float) -> np.ndarray:
    """Texture (HU, mean 0, SD ``sd_hu``) at LPS mm points: a function of position, so every
    series and reformat of a patient shows the same trabeculae."""
    out = np.zeros(np.shape(x), dtype=np.float32)
    for kx, ky, kz, phase in waves:
        out += np.cos(kx * x + ky * y + kz * z + phase).astype(np.float32)
    return out * np.float32(sd_hu * np.sqrt(2.0 / len(waves)))


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sd_hu: float,
                     corr_mm: float, pixel_mm: float) -> np.ndarray:
    """Gaussian noise of SD ``sd_hu`` per slice, correlated in-plane by a Gaussian kernel of
    ``corr_mm`` (white when 0)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    if corr_mm <= 0:
        return white * np.float32(sd_hu)
    sigma = corr_mm / pixel_mm
    smooth = gaussian_filter(white, sigma=(0, sigma, sigma), mode="wrap")
    return smooth * np.float32(sd_hu / max(float(smooth.std()), 1e-6))
