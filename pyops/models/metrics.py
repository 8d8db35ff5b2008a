"""Sample-quality metrics that need no download: relative L1, PSNR and the Fréchet distance
between feature sets (used with :mod:`pyops.models.digits`' classifier features).

All three compute in fp64 on the tensors' device and return a Python float; they raise
``ValueError`` for inputs that would otherwise broadcast or give NaN silently."""
from __future__ import annotations

import math

import torch

__all__ = ["rel_l1", "psnr", "frechet_distance"]


def _same_shape(fn: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{fn}: x {tuple(x.shape)} and ref {tuple(ref.shape)} must have one "
                         f"shape")


def rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Σ|x − ref| / Σ|ref| in fp64 (the denominator clamped to 1e-300: 0 for x = ref = 0).

    ``x``, ``ref``: one shape, any float dtype. Raises ``ValueError`` for different shapes."""
    _same_shape("rel_l1", x, ref)
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-300))


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of images in [−1, 1] (``peak`` = the value range, 2): 10·log10(peak² / MSE)
    with the MSE in fp64; inf for identical images.

    ``x``, ``ref``: one shape, any float dtype. Raises ``ValueError`` for different shapes or
    ``peak <= 0``."""
    _same_shape("psnr", x, ref)
    if not peak > 0:
        raise ValueError(f"psnr: peak must be > 0, got {peak}")
    mse = float((x.double() - ref.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
    |μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1^½ Σ2 Σ1^½)^½), in fp64 (symmetric eigendecompositions,
    so the result is real and ≥ 0 up to rounding; Σ: the unbiased sample covariance).

    ``f1`` (N1, d), ``f2`` (N2, d): float features, N1, N2 ≥ 2. Raises ``ValueError`` for
    inputs that are not 2-D, different feature sizes d, or fewer than 2 rows (no covariance)."""
    for name, f in (("f1", f1), ("f2", f2)):
        if f.dim() != 2:
            raise ValueError(f"frechet_distance: {name} must be (N, d) features, got shape "
                             f"{tuple(f.shape)}")
        if f.shape[0] < 2:
            raise ValueError(f"frechet_distance: {name} needs at least 2 rows for a covariance, "
                             f"got {f.shape[0]}")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"frechet_distance: f1 and f2 must have the same feature size, got "
                         f"{f1.shape[1]} and {f2.shape[1]}")
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)
