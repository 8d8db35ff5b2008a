"""Sample-quality metrics that need no download: relative L1, PSNR and the Fréchet distance
between feature sets (used with :mod:`pyops.models.digits`' classifier features)."""
from __future__ import annotations

import math

import torch

__all__ = ["rel_l1", "psnr", "frechet_distance"]


def rel_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Σ|x − ref| / Σ|ref| in fp64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-300))


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of images in [−1, 1] (``peak`` = the value range, 2): 10·log10(peak² / MSE);
    inf for identical images."""
    mse = float((x.double() - ref.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, d) (Heusel et al. 2017):
    |μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1^½ Σ2 Σ1^½)^½), in fp64 (symmetric eigendecompositions,
    so the result is real and ≥ 0 up to rounding)."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)
