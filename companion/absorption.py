r"""Feature absorption, measured on any dictionary and codes with a known concept direction (Chapter 3).

A *concept* is a unit direction :math:`v` with ground-truth presence labels; its *main
latents* are the latents meant to represent it (in an SAE benchmark, the ones a sparse probe
selects; in Chapter 3, the atom matched to the parent direction). Absorption is the main
latents staying silent on a sample where the concept is present while another latent, one
that points partly along :math:`v`, carries the concept's share of the reconstruction. Chapter
3 shows that this is what an *optimal* dictionary does on hierarchical data, and predicts how
often.

The two scores follow SAEBench's absorption evaluation (Chanin et al. 2024; Karvonen et al.
2025), stated here for a dictionary with atoms :math:`d_k` (rows of ``D``), codes
:math:`z_{nk}` and inputs :math:`x_n` (already centred by the SAE's decoder bias, if it has
one). With :math:`\cos_k = \cos\angle(d_k, v)`, latent :math:`k` contributes
:math:`\pi_{nk} = z_{nk}\,\|d_k\|\cos_k = z_{nk}\, d_k^\top v` to the projection of the
reconstruction on :math:`v`, and the input's own projection is :math:`P_n = x_n^\top v`.

Full absorption of sample :math:`n` (one absorbing latent)
    every main latent is silent (:math:`z_{nk} \le \epsilon`); the top latent by
    :math:`\pi_{nk}` has :math:`\cos_k \ge \tau_{\text{full}}` (default 0.025);
    :math:`P_n > 0`; and that latent carries :math:`\pi_{nk} \ge \rho P_n` (default
    :math:`\rho = 0.4`).

Absorption fraction of sample :math:`n` (partial absorption, up to ``max_absorbers`` latents)
    with :math:`M_n = \sum_{k\,\text{main}} \pi_{nk}` and :math:`A_n` the sum of the
    ``max_absorbers`` largest positive :math:`\pi_{nk}` over non-main latents with
    :math:`\cos_k \ge \tau_{\text{frac}}` (default 0.1): the fraction is 0 if
    :math:`M_n \ge P_n` or :math:`A_n < \rho P_n`; else 1 if :math:`M_n \le 0`; else
    :math:`\min(A_n, P_n - M_n) / (\min(A_n, P_n - M_n) + M_n)`.

Both are averaged over the samples where the concept is present. The simpler rate that
Chapter 3 predicts in closed form, :math:`P(\text{main latents silent} \mid \text{concept
present})`, is reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

import numpy as np

from ._validation import (as_tensor, check_codes, check_columns, check_nonnegative,
                          check_positive_int)

__all__ = ["AbsorptionReport", "absorption"]


@dataclass
class AbsorptionReport:
    """What :func:`absorption` returns.

    Attributes
    ----------
    full_absorption_rate : float
        Fraction of concept-present samples that are fully absorbed (SAEBench's
        ``mean_full_absorption_score``).
    mean_absorption_fraction : float
        Mean absorption fraction over concept-present samples (SAEBench's
        ``mean_absorption_fraction_score``).
    main_silent_rate : float
        :math:`P(\\text{every main latent silent} \\mid \\text{concept present})`, the rate
        Chapter 3 predicts.
    n_present : int
        Number of samples where the concept is present.
    full : array of bool (n_samples,)
        Per-sample full absorption (False where the concept is absent).
    fraction : array of float (n_samples,)
        Per-sample absorption fraction (0 where the concept is absent).
    main_silent : array of bool (n_samples,)
        Per-sample: every main latent silent (computed for every sample).
    cosines : array of float (n_atoms,)
        :math:`\\cos\\angle(d_k, v)` for every latent.
    absorber : array of int (n_samples,)
        The top latent by projection on the concept for each sample (-1 where no latent
        projects positively).
    """

    full_absorption_rate: float
    mean_absorption_fraction: float
    main_silent_rate: float
    n_present: int
    full: Any
    fraction: Any
    main_silent: Any
    cosines: Any
    absorber: Any


def _main_ids(main: int | Sequence[int], n_atoms: int) -> list[int]:
    ids = [main] if isinstance(main, int) or (hasattr(main, "ndim") and getattr(main, "ndim") == 0) else list(main)
    if not ids:
        raise ValueError("main must name at least one latent")
    out = []
    for k in ids:
        if isinstance(k, bool) or int(k) != k:
            raise TypeError(f"main must hold integer latent indices, got {k!r}")
        if not 0 <= int(k) < n_atoms:
            raise ValueError(f"main latent index {int(k)} is out of range for {n_atoms} latents")
        out.append(int(k))
    return out


def absorption(
    X: Any,
    D: Any,
    Z: Any,
    concept: Any,
    present: Any,
    main: int | Sequence[int],
    *,
    full_cos_threshold: float = 0.025,
    fraction_cos_threshold: float = 0.1,
    projection_threshold: float = 0.4,
    max_absorbers: int = 3,
    active_eps: float = 1e-8,
) -> AbsorptionReport:
    r"""Full absorption, absorption fraction and main-latent silence of a concept (Chapter 3).

    See the module docstring for the definitions; the thresholds are the parameters below,
    with SAEBench's defaults.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Inputs as the dictionary sees them (for an SAE, ``x - b_dec``; see
        :meth:`companion.VanillaSAE.joint_view`).
    D : array (n_atoms, n_features)
        Dictionary, atoms as rows (any nonzero norms: an SAE's raw ``W_dec`` with its raw
        codes gives the same projections as the unit-norm view).
    Z : array (n_samples, n_atoms)
        Nonnegative codes.
    concept : array (n_features,)
        The concept direction :math:`v` (normalised here).
    present : array of bool (n_samples,)
        Ground truth: whether the concept is present in each sample.
    main : int or sequence of int
        The main latent(s) of the concept.
    full_cos_threshold : float
        :math:`\tau_{\text{full}}`: the absorbing latent's least cosine with :math:`v`
        for full absorption.
    fraction_cos_threshold : float
        :math:`\tau_{\text{frac}}`: least cosine for a latent to count as a potential
        absorber in the absorption fraction.
    projection_threshold : float
        :math:`\rho`: least share of :math:`P_n` the absorber(s) must carry.
    max_absorbers : int
        Most non-main latents summed in the absorption fraction.
    active_eps : float
        A latent with :math:`z_{nk} \le` ``active_eps`` counts as silent.

    Returns
    -------
    AbsorptionReport
        Rates as floats; per-sample arrays in the kind of ``X``.
    """
    X, kind = as_tensor(X, "X", ndim=2)
    D, _ = as_tensor(D, "D", ndim=2, like=X)
    Z, _ = as_tensor(Z, "Z", ndim=2, like=X)
    v, _ = as_tensor(concept, "concept", ndim=1, like=X)
    check_columns(D, "D", X.shape[1], "X")
    n, k = X.shape[0], D.shape[0]
    check_codes(Z, "Z", (n, k))
    if v.shape[0] != X.shape[1]:
        raise ValueError(f"concept must have {X.shape[1]} entries (the features of X), got {v.shape[0]}")
    if float(v.norm()) == 0:
        raise ValueError("concept must be a nonzero direction")
    if isinstance(present, torch.Tensor):
        pres = present.to(X.device)
    elif isinstance(present, np.ndarray):
        pres = torch.from_numpy(np.ascontiguousarray(present)).to(X.device)
    else:
        raise TypeError(f"present must be a torch.Tensor or numpy.ndarray, got {type(present).__name__}")
    if pres.shape != (n,):
        raise ValueError(f"present must have shape (n_samples,) = {(n,)}, got {tuple(pres.shape)}")
    if pres.dtype != torch.bool:
        if not bool(((pres == 0) | (pres == 1)).all()):
            raise ValueError("present must be boolean (or 0/1)")
        pres = pres.bool()
    main_ids = _main_ids(main, k)
    full_cos_threshold = float(full_cos_threshold)
    fraction_cos_threshold = float(fraction_cos_threshold)
    projection_threshold = check_nonnegative(projection_threshold, "projection_threshold")
    max_absorbers = check_positive_int(max_absorbers, "max_absorbers")
    active_eps = check_nonnegative(active_eps, "active_eps")
    zero = torch.nonzero(D.norm(dim=1) == 0).flatten()
    if zero.numel():
        raise ValueError(f"D has zero-norm atoms (rows) at indices {zero[:10].tolist()}")

    with torch.no_grad():
        v = v / v.norm()
        along = D @ v                                  # d_k^T v
        cos = along / D.norm(dim=1)
        proj = Z * along                               # π_nk
        P = X @ v
        is_main = torch.zeros(k, dtype=torch.bool, device=X.device)
        is_main[main_ids] = True

        main_silent = (Z[:, is_main] <= active_eps).all(1)
        top_val, top_idx = proj.max(1)
        absorber = torch.where(top_val > 0, top_idx, torch.full_like(top_idx, -1))
        safe_P = torch.where(P > 0, P, torch.ones_like(P))
        full = (main_silent & (cos[top_idx] >= full_cos_threshold) & (P > 0)
                & (top_val >= projection_threshold * safe_P) & (top_val > 0) & pres)

        M = proj[:, is_main].sum(1)
        cand = (~is_main) & (cos >= fraction_cos_threshold)
        cproj = torch.where(cand.unsqueeze(0) & (proj > 0), proj, torch.zeros_like(proj))
        A = cproj.topk(min(max_absorbers, k), dim=1).values.sum(1)
        absorbed = torch.minimum(A, P - M)
        frac = torch.where(M <= 0, torch.ones_like(P), absorbed / torch.where(absorbed + M > 0, absorbed + M, torch.ones_like(M)))
        zero_case = (M >= P) | (A < projection_threshold * P) | (P <= 0) | ~pres
        frac = torch.where(zero_case, torch.zeros_like(frac), frac.clamp(0, 1))

        n_present = int(pres.sum())
        denom = max(n_present, 1)
        rate_full = float(full.sum()) / denom if n_present else float("nan")
        rate_frac = float(frac[pres].sum()) / denom if n_present else float("nan")
        rate_silent = float((main_silent & pres).sum()) / denom if n_present else float("nan")
    return AbsorptionReport(
        full_absorption_rate=rate_full,
        mean_absorption_fraction=rate_frac,
        main_silent_rate=rate_silent,
        n_present=n_present,
        full=kind.out(full),
        fraction=kind.out(frac),
        main_silent=kind.out(main_silent),
        cosines=kind.out(cos),
        absorber=kind.out(absorber),
    )
