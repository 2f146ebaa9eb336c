"""Synthetic data with known ground truth, for experiments whose answer we can check.

Every generator draws on the CPU from a seeded :func:`companion.generator` and only then
moves the result to the requested device, so that a chapter sees the same samples on CPU
and GPU. Results are dataclasses that keep the ground truth next to the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_nonnegative, check_positive, check_positive_int
from .runtime import generator

__all__ = ["SparseSuperposition", "sparse_superposition"]


@dataclass
class SparseSuperposition:
    """Samples that are sparse nonnegative combinations of unit features plus noise.

    Attributes
    ----------
    X : torch.Tensor (n_samples, n_features)
        The samples, ``X = codes @ features + noise``.
    features : torch.Tensor (n_sources, n_features)
        The ground-truth features (unit-norm rows): the dictionary that generated the data.
    codes : torch.Tensor (n_samples, n_sources)
        The nonnegative ground-truth coefficients; each row has exactly ``k_active`` nonzeros.
    noise : torch.Tensor (n_samples, n_features)
        The additive Gaussian noise.
    """

    X: torch.Tensor
    features: torch.Tensor
    codes: torch.Tensor
    noise: torch.Tensor


def sparse_superposition(
    n_samples: int,
    n_features: int,
    n_sources: int,
    k_active: int,
    seed: int,
    *,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.01,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> SparseSuperposition:
    r"""Draw sparse nonnegative superpositions of random unit features (used from Chapter 1 on).

    Each sample is

    .. math::
        x_n = \sum_{k \in S_n} a_{nk}\, f_k + \varepsilon_n,\qquad
        |S_n| = k_{\text{active}},\quad a_{nk} \sim U[a_{\min}, a_{\max}],\quad
        \varepsilon_n \sim \mathcal N(0, \sigma^2 I),

    with the support :math:`S_n` drawn uniformly among the ``n_sources`` features and the
    features :math:`f_k` drawn uniformly on the unit sphere of :math:`\mathbb R^{d}`. When
    ``n_sources > n_features`` the features are in superposition (necessarily not orthogonal).

    Parameters
    ----------
    n_samples, n_features, n_sources : int
        Number of samples, ambient dimension ``d`` and number of ground-truth features.
    k_active : int
        Features active in every sample, ``1 <= k_active <= n_sources``.
    seed : int
        Seed of the CPU generator; the same seed gives the same data on every device.
    magnitude : (float, float)
        Range ``(a_min, a_max)`` of the uniform coefficients, ``0 <= a_min <= a_max``.
    noise_std : float
        Standard deviation :math:`\sigma \ge 0` of the isotropic Gaussian noise.
    device : torch.device or str, optional
        Where the result lives (drawn on the CPU, then moved). Default CPU.
    dtype : torch.dtype
        ``torch.float64`` (default) or ``torch.float32``.
    """
    n_samples = check_positive_int(n_samples, "n_samples")
    n_features = check_positive_int(n_features, "n_features")
    n_sources = check_positive_int(n_sources, "n_sources")
    k_active = check_positive_int(k_active, "k_active")
    if k_active > n_sources:
        raise ValueError(f"k_active must be <= n_sources = {n_sources}, got {k_active}")
    try:
        a_min, a_max = (float(m) for m in magnitude)
    except (TypeError, ValueError):
        raise TypeError(f"magnitude must be a pair (a_min, a_max), got {magnitude!r}") from None
    check_nonnegative(a_min, "magnitude[0]")
    check_positive(a_max, "magnitude[1]")
    if a_min > a_max:
        raise ValueError(f"magnitude must satisfy a_min <= a_max, got {magnitude!r}")
    noise_std = check_nonnegative(noise_std, "noise_std")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

    g = generator(seed)
    F = torch.randn(n_sources, n_features, generator=g, dtype=torch.float64)
    F = F / F.norm(dim=1, keepdim=True)
    # The k_active smallest of i.i.d. uniform keys form a uniform random k-subset per row.
    support = torch.rand(n_samples, n_sources, generator=g, dtype=torch.float64).argsort(dim=1)[:, :k_active]
    A = torch.zeros(n_samples, n_sources, dtype=torch.float64)
    values = a_min + (a_max - a_min) * torch.rand(n_samples, k_active, generator=g, dtype=torch.float64)
    A.scatter_(1, support, values)
    E = noise_std * torch.randn(n_samples, n_features, generator=g, dtype=torch.float64)
    X = A @ F + E
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return SparseSuperposition(
        X=X.to(device=dev, dtype=dtype),
        features=F.to(device=dev, dtype=dtype),
        codes=A.to(device=dev, dtype=dtype),
        noise=E.to(device=dev, dtype=dtype),
    )
