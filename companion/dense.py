r"""Data with one dense symmetric direction on top of sparse features (THEORY §7; Chapter 5).

Every sample carries a dense scalar :math:`s` along a fixed unit direction :math:`v`, plus a
sparse nonnegative combination of unit features orthogonal to :math:`v`:

.. math::
    x_n = s_n v + \sum_j a_{nj} f_j,\qquad s_n = u_n + \beta\, a_{n0},\quad u_n \sim U[s_{lo}, s_{hi}],

with feature :math:`j` active independently with probability ``p_active`` and
:math:`a_{nj} \sim U[a_{\min}, a_{\max}]` when active. :math:`\beta` (``coupling``) correlates the
dense value with the first sparse feature; ``dense_range`` makes :math:`s` symmetric or not.
The directions are the first ``1 + n_sparse`` standard basis vectors (``v = e_0``,
``f_j = e_{j+1}``): nothing in the theory depends on the basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_nonnegative, check_positive, check_positive_int
from .runtime import generator

__all__ = ["DenseDirectionData", "dense_direction_data"]


@dataclass
class DenseDirectionData:
    """Samples with a dense direction plus sparse features, and their ground truth (Chapter 5).

    Attributes
    ----------
    X : torch.Tensor (n_samples, n_features)
        The samples.
    dense_direction : torch.Tensor (n_features,)
        The unit direction :math:`v` of the dense scalar.
    dense_value : torch.Tensor (n_samples,)
        :math:`s_n`, the signed coefficient along :math:`v`.
    sparse_features : torch.Tensor (n_sparse, n_features)
        Orthonormal features :math:`f_j`, all orthogonal to :math:`v`.
    sparse_codes : torch.Tensor (n_samples, n_sparse)
        The nonnegative coefficients :math:`a_{nj}`.
    """

    X: torch.Tensor
    dense_direction: torch.Tensor
    dense_value: torch.Tensor
    sparse_features: torch.Tensor
    sparse_codes: torch.Tensor


def dense_direction_data(
    n_samples: int,
    n_sparse: int,
    seed: int,
    *,
    dense_range: tuple[float, float] = (-1.0, 1.0),
    p_active: float = 0.1,
    magnitude: tuple[float, float] = (0.5, 1.5),
    coupling: float = 0.0,
    n_features: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> DenseDirectionData:
    r"""Draw samples :math:`x = s v + \sum_j a_j f_j` with a dense scalar :math:`s` (Chapter 5).

    Parameters
    ----------
    n_samples : int
        Number of samples.
    n_sparse : int
        Number of sparse features (orthonormal, orthogonal to :math:`v`).
    seed : int
        Seed of the CPU generator (same data on every device).
    dense_range : (float, float)
        :math:`(s_{lo}, s_{hi})`, the range of the uniform part :math:`u` of :math:`s`;
        ``(-a, a)`` is symmetric.
    p_active : float
        Probability that each sparse feature is active in a sample, in [0, 1].
    magnitude : (float, float)
        :math:`(a_{\min}, a_{\max})`, the range of active sparse coefficients.
    coupling : float
        :math:`\beta`: :math:`s = u + \beta a_0` (0 makes :math:`s` independent of the sparse part).
    n_features : int, optional
        Ambient dimension, at least ``1 + n_sparse`` (extra coordinates stay empty).
    device : torch.device or str, optional
        Where the result lives (drawn on the CPU, then moved). Default CPU.
    dtype : torch.dtype
        ``torch.float64`` (default) or ``torch.float32``.
    """
    n_samples = check_positive_int(n_samples, "n_samples")
    n_sparse = check_positive_int(n_sparse, "n_sparse")
    d = 1 + n_sparse if n_features is None else check_positive_int(n_features, "n_features")
    if d < 1 + n_sparse:
        raise ValueError(f"n_features must be >= 1 + n_sparse = {1 + n_sparse}, got {n_features}")
    try:
        lo, hi = (float(t) for t in dense_range)
    except (TypeError, ValueError):
        raise TypeError(f"dense_range must be a pair (s_lo, s_hi), got {dense_range!r}") from None
    if not lo < hi:
        raise ValueError(f"dense_range must satisfy s_lo < s_hi, got {dense_range!r}")
    p = check_nonnegative(p_active, "p_active")
    if p > 1:
        raise ValueError(f"p_active must be in [0, 1], got {p_active!r}")
    try:
        a_min, a_max = (float(t) for t in magnitude)
    except (TypeError, ValueError):
        raise TypeError(f"magnitude must be a pair (a_min, a_max), got {magnitude!r}") from None
    check_nonnegative(a_min, "magnitude[0]")
    check_positive(a_max, "magnitude[1]")
    if a_min > a_max:
        raise ValueError(f"magnitude must satisfy a_min <= a_max, got {magnitude!r}")
    try:
        beta = float(coupling)
    except (TypeError, ValueError):
        raise TypeError(f"coupling must be a number, got {coupling!r}") from None
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

    g = generator(seed)
    u = lo + (hi - lo) * torch.rand(n_samples, generator=g, dtype=torch.float64)
    on = torch.rand(n_samples, n_sparse, generator=g, dtype=torch.float64) < p
    mags = a_min + (a_max - a_min) * torch.rand(n_samples, n_sparse, generator=g, dtype=torch.float64)
    A = torch.where(on, mags, torch.zeros_like(mags))
    s = u + beta * A[:, 0]
    E = torch.eye(d, dtype=torch.float64)
    v, F = E[0], E[1:1 + n_sparse]
    X = s[:, None] * v + A @ F
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def out(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=dtype)

    return DenseDirectionData(X=out(X), dense_direction=out(v), dense_value=out(s),
                              sparse_features=out(F), sparse_codes=out(A))
