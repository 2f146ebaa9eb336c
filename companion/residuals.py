r"""The structure of residuals (THEORY §8; derived in Chapter 4).

At exact codes (T1) the residual :math:`r = x - zD` is the projection of :math:`x` onto the
polyhedron :math:`\{r : d_k^\top r \le \lambda\ \forall k\}`, and on the active set
:math:`S = \{k : z_k > 0\}` it satisfies :math:`D_S r = \lambda\mathbf 1` (row convention: the
atoms of ``S`` are the rows of :math:`D_S`). Hence

.. math::
    r = \underbrace{\lambda\, D_S^\top (D_S D_S^\top)^{+}\mathbf 1}_{\text{support part } s}
      \;+\; \underbrace{(I - \Pi_S)\, r}_{\text{orthogonal part } o},
    \qquad \Pi_S = D_S^\top (D_S D_S^\top)^{+} D_S ,

a part fixed by *which* atoms fire and a part orthogonal to every active atom, which equals
:math:`(I - \Pi_S)\,x`. For codes that are not exact (a trained SAE's encoder) a third part
appears, :math:`\Pi_S r - s = D_S^\top (D_S D_S^\top)^{+}(D_S r - \lambda\mathbf 1)`, which T1
sets to zero; :func:`split_residuals` returns it as ``on_span_deviation``.

The module also measures the activation-weighted mean residual of every atom (T2b), the
amortisation error of an SAE (its residual minus the projection residual for its own
dictionary) and the linear predictability of residuals from the input (the two numbers of
Engels et al., 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._validation import (as_tensor, check_codes, check_columns, check_nonnegative,
                          check_nonnegative_entries, check_positive, check_positive_int)
from .runtime import generator

__all__ = [
    "AmortisationSplit",
    "AtomMeanResiduals",
    "LinearPredictability",
    "ResidualSplit",
    "amortisation_split",
    "atom_mean_residuals",
    "linear_predictability",
    "split_residuals",
]


def _check_triple(X: Any, D: Any, Z: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    Zt, _ = as_tensor(Z, "Z", ndim=2, like=Xt)
    check_columns(Dt, "D", Xt.shape[1], "X")
    check_codes(Zt, "Z", (Xt.shape[0], Dt.shape[0]))
    return Xt, Dt, Zt, kind


@dataclass
class ResidualSplit:
    r"""A residual split into its support part, on-span deviation and orthogonal part (Chapter 4).

    Row ``n`` of each array belongs to sample ``n``; ``residual = support_part +
    on_span_deviation + orthogonal_part`` exactly.

    Attributes
    ----------
    residual : array (n_samples, n_features)
        :math:`r_n = x_n - z_n D`.
    support_part : array (n_samples, n_features)
        :math:`s_n = \lambda D_S^\top (D_S D_S^\top)^{+}\mathbf 1`, zero when no atom is active.
    on_span_deviation : array (n_samples, n_features)
        :math:`\Pi_S r_n - s_n`; zero at exact codes (T1).
    orthogonal_part : array (n_samples, n_features)
        :math:`(I - \Pi_S) r_n`, orthogonal to every active atom.
    support_size : array (n_samples,)
        :math:`|S_n|`, the number of active atoms (integer dtype).
    residual_norm : array (n_samples,)
        :math:`\|r_n\|`.
    support_share : float
        :math:`\sum_n\|s_n\|^2 / \sum_n\|r_n\|^2`: the share of the residual's (uncentred)
        variance, i.e. of the summed squared error, in the support part.
    span_share : float
        :math:`\sum_n\|\Pi_S r_n\|^2 / \sum_n\|r_n\|^2`; equals ``support_share`` at exact codes.
    orthogonal_share : float
        :math:`\sum_n\|o_n\|^2 / \sum_n\|r_n\|^2 = 1 -` ``span_share``.
    """

    residual: Any
    support_part: Any
    on_span_deviation: Any
    orthogonal_part: Any
    support_size: Any
    residual_norm: Any
    support_share: float
    span_share: float
    orthogonal_share: float


def _split_chunk(R: torch.Tensor, D: torch.Tensor, De: torch.Tensor, active: torch.Tensor,
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Support part and span projection of residual rows ``R`` with active masks ``active``."""
    m, k = active.shape
    width = int(active.sum(1).max()) if m else 0
    if width == 0:
        zero = torch.zeros_like(R)
        return zero, zero.clone()
    ar = torch.arange(k, device=R.device).expand(m, k)
    idx = torch.where(active, ar, torch.full_like(ar, k)).sort(1).values[:, :width]
    DS = De[idx]                                             # (m, w, d); padding rows are 0
    G = DS @ DS.transpose(1, 2)                              # (m, w, w); padding block is 0
    # Rank-deficient supports (duplicate or dependent atoms) are handled by the pseudo-inverse:
    # the support part is then the minimum-norm point of {u in span D_S : D_S u = λ1}.
    Gp = torch.linalg.pinv(G, hermitian=True)
    ones = (idx < k).to(R.dtype)
    s = lam * torch.einsum("mi,mid->md", torch.einsum("mij,mj->mi", Gp, ones), DS)
    c = torch.einsum("mid,md->mi", DS, R)
    p = torch.einsum("mi,mid->md", torch.einsum("mij,mj->mi", Gp, c), DS)
    return s, p


def split_residuals(X: Any, D: Any, Z: Any, lam: float, *, active_tol: float = 0.0,
                    chunk_size: int = 4096) -> ResidualSplit:
    r"""Split every residual into its support part and its part orthogonal to the active atoms (Chapter 4, eq. ``residual-split``).

    With :math:`S_n = \{k : Z_{nk} > \text{active\_tol}\}` and :math:`D_S` the active atoms
    (rows),

    .. math::
        r_n = \underbrace{\lambda D_S^\top (D_S D_S^\top)^{+}\mathbf 1}_{s_n}
              + \underbrace{\Pi_S r_n - s_n}_{\text{deviation}}
              + \underbrace{(I - \Pi_S) r_n}_{o_n},\qquad
        \Pi_S = D_S^\top (D_S D_S^\top)^{+} D_S .

    At exact codes (T1: :math:`D_S r_n = \lambda\mathbf 1`) the deviation vanishes, so
    :math:`r_n = s_n + o_n` with :math:`s_n \perp o_n` and :math:`o_n = (I-\Pi_S)x_n`.
    The pseudo-inverse handles empty supports (all parts but ``o`` are zero) and
    rank-deficient ones. Rows are processed in chunks of ``chunk_size``; memory is
    ``O(chunk_size · max|S| · n_features)``.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Samples (for an SAE: the centred data ``x - b_dec`` of its joint view).
    D : array (n_atoms, n_features)
        Dictionary, atoms as rows (unit norm is not required, but T1 assumes it).
    Z : array (n_samples, n_atoms)
        Nonnegative codes.
    lam : float
        The penalty :math:`\lambda > 0`.
    active_tol : float
        An atom counts as active for a sample when its code exceeds this (default 0).
    chunk_size : int
        Rows per batch.

    Returns
    -------
    ResidualSplit
        Arrays in the kind of ``X``; the shares are floats.
    """
    lam = check_positive(lam, "lam")
    active_tol = check_nonnegative(active_tol, "active_tol")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    Xt, Dt, Zt, kind = _check_triple(X, D, Z)
    with torch.no_grad():
        R = Xt - Zt @ Dt
        S = torch.empty_like(R)
        P = torch.empty_like(R)
        active = Zt > active_tol
        De = torch.cat([Dt, Dt.new_zeros(1, Dt.shape[1])], 0)
        for a in range(0, R.shape[0], chunk_size):
            b = min(R.shape[0], a + chunk_size)
            S[a:b], P[a:b] = _split_chunk(R[a:b], Dt, De, active[a:b], lam)
        dev = P - S
        O = R - P
        total = float((R * R).sum())
        denom = total if total > 0 else float("nan")
        return ResidualSplit(
            residual=kind.out(R),
            support_part=kind.out(S),
            on_span_deviation=kind.out(dev),
            orthogonal_part=kind.out(O),
            support_size=kind.out(active.sum(1)),
            residual_norm=kind.out(R.norm(dim=1)),
            support_share=float((S * S).sum()) / denom,
            span_share=float((P * P).sum()) / denom,
            orthogonal_share=float((O * O).sum()) / denom,
        )


@dataclass
class AtomMeanResiduals:
    r"""Activation-weighted mean residual of every atom, against T2b's prediction :math:`\lambda d_k` (Chapter 4).

    Attributes
    ----------
    mean_residual : array (n_atoms, n_features)
        :math:`m_k = \sum_n z_{nk} r_n / \sum_n z_{nk}` (zero rows for unused atoms).
    mass : array (n_atoms,)
        :math:`\sum_n z_{nk}`, the atom's total activation.
    parallel : array (n_atoms,)
        :math:`d_k^\top m_k / \lambda`; T1 alone makes it 1 for every used atom.
    orthogonal : array (n_atoms,)
        :math:`\|(I - d_k d_k^\top) m_k\| / \lambda`; dictionary stationarity (T2) makes it 0.
    deviation : array (n_atoms,)
        :math:`\|m_k - \lambda d_k\| / \lambda`, the relative distance to T2b's prediction.
    used : array (n_atoms,)
        Whether the atom fires on any sample (bool); the other fields are 0 where it does not.
    """

    mean_residual: Any
    mass: Any
    parallel: Any
    orthogonal: Any
    deviation: Any
    used: Any


def atom_mean_residuals(X: Any, D: Any, Z: Any, lam: float) -> AtomMeanResiduals:
    r"""Each atom's activation-weighted mean residual :math:`m_k`, to compare with :math:`\lambda d_k` (Chapter 4, T2b).

    .. math::
        m_k = \frac{\sum_n z_{nk}\, r_n}{\sum_n z_{nk}},\qquad
        \text{T2b:}\quad m_k = \lambda\, d_k \ \text{ at a stationary dictionary with exact codes.}

    The component along :math:`d_k` is :math:`\lambda` as soon as the codes are exact (T1);
    the orthogonal component vanishes only at a stationary dictionary (T2).
    """
    lam = check_positive(lam, "lam")
    Xt, Dt, Zt, kind = _check_triple(X, D, Z)
    with torch.no_grad():
        R = Xt - Zt @ Dt
        mass = Zt.sum(0)
        used = mass > 0
        safe = torch.where(used, mass, torch.ones_like(mass))
        M = (Zt.T @ R) / safe[:, None]
        M = torch.where(used[:, None], M, torch.zeros_like(M))
        par = (M * Dt).sum(1)
        orth = (M - par[:, None] * Dt).norm(dim=1)
        dev = (M - lam * Dt).norm(dim=1)
        zero = torch.zeros_like(par)
        return AtomMeanResiduals(
            mean_residual=kind.out(M),
            mass=kind.out(mass),
            parallel=kind.out(torch.where(used, par / lam, zero)),
            orthogonal=kind.out(torch.where(used, orth / lam, zero)),
            deviation=kind.out(torch.where(used, dev / lam, zero)),
            used=kind.out(used),
        )


@dataclass
class AmortisationSplit:
    r"""An SAE's residual split into the projection residual and the amortisation error (Chapter 4).

    Attributes
    ----------
    sae_residual : array (n_samples, n_features)
        :math:`r^{\mathrm{SAE}}_n = x_n - z^{\mathrm{SAE}}_n D`.
    projection_residual : array (n_samples, n_features)
        :math:`r^\star_n = x_n - z^\star_n D = \Pi_{P_\lambda(D)}(x_n)`, with exact codes for the
        same dictionary.
    amortisation_error : array (n_samples, n_features)
        :math:`r^{\mathrm{SAE}}_n - r^\star_n = (z^\star_n - z^{\mathrm{SAE}}_n) D`: the part of the
        SAE's error that is the encoder's fault, not the dictionary's.
    amortisation_share : float
        :math:`\sum_n \|r^{\mathrm{SAE}}_n - r^\star_n\|^2 / \sum_n \|r^{\mathrm{SAE}}_n\|^2`.
    norm_ratio : float
        :math:`\sum_n\|r^\star_n\|^2 / \sum_n\|r^{\mathrm{SAE}}_n\|^2` (may exceed 1: exact codes
        trade squared error for a smaller L1 penalty).
    """

    sae_residual: Any
    projection_residual: Any
    amortisation_error: Any
    amortisation_share: float
    norm_ratio: float


def amortisation_split(X: Any, D: Any, Z: Any, Z_exact: Any) -> AmortisationSplit:
    r"""Split an amortised encoder's residual into the projection residual and the encoder's error (Chapter 4).

    .. math::
        r^{\mathrm{SAE}} = x - z^{\mathrm{SAE}} D
        = \underbrace{\Pi_{P_\lambda(D)}(x)}_{x - z^\star D}
        + \underbrace{(z^\star - z^{\mathrm{SAE}}) D}_{\text{amortisation error}} .

    Parameters
    ----------
    X, D, Z : arrays
        An SAE's joint view (centred data, unit-norm decoder rows, rescaled codes), e.g.
        ``sae.joint_view(X)``.
    Z_exact : array (n_samples, n_atoms)
        Exact codes for the same ``X`` and ``D`` (from :func:`companion.encode`).
    """
    Xt, Dt, Zt, kind = _check_triple(X, D, Z)
    Ze, _ = as_tensor(Z_exact, "Z_exact", ndim=2, like=Xt)
    if Ze.shape != Zt.shape:
        raise ValueError(f"Z_exact must have the shape of Z, {tuple(Zt.shape)}; got {tuple(Ze.shape)}")
    check_nonnegative_entries(Ze, "Z_exact")
    with torch.no_grad():
        R = Xt - Zt @ Dt
        Rs = Xt - Ze @ Dt
        A = R - Rs
        total = float((R * R).sum())
        denom = total if total > 0 else float("nan")
        return AmortisationSplit(
            sae_residual=kind.out(R),
            projection_residual=kind.out(Rs),
            amortisation_error=kind.out(A),
            amortisation_share=float((A * A).sum()) / denom,
            norm_ratio=float((Rs * Rs).sum()) / denom,
        )


@dataclass
class LinearPredictability:
    r"""How much of a residual is an affine function of the input, on held-out samples (Chapter 4).

    Attributes
    ----------
    vector_r2 : float
        :math:`1 - \sum_{n\in\text{test}}\|r_n - \hat r_n\|^2 / \sum_{n\in\text{test}}\|r_n - \bar r\|^2`
        for the least-squares affine map :math:`\hat r = A x + b` fitted on the training samples
        (:math:`\bar r`: test mean): the share of the residual vector's variance that is
        linearly predictable from :math:`x`.
    norm_r2 : float
        The same for the scalar :math:`\|r_n\|` regressed on :math:`x` (affine); ``nan`` when
        the test norms have no variance.
    n_train, n_test : int
        Sizes of the two halves.
    """

    vector_r2: float
    norm_r2: float
    n_train: int
    n_test: int


def _r2(Y: torch.Tensor, Yhat: torch.Tensor) -> float:
    sst = float(((Y - Y.mean(0)) ** 2).sum())
    if sst <= 1e-12 * max(1.0, float((Y * Y).sum())):
        return float("nan")
    return 1.0 - float(((Y - Yhat) ** 2).sum()) / sst


def linear_predictability(X: Any, R: Any, *, train_fraction: float = 0.5, seed: int = 0,
                          ridge: float = 1e-8) -> LinearPredictability:
    r"""Held-out :math:`R^2` of affine regressions of the residual vector and of its norm on the input (Chapter 4).

    The measurement of Engels et al. (2024), made precise: split the samples at random
    (seeded) into a training and a test part; fit :math:`\hat r = A x + b` and
    :math:`\widehat{\|r\|} = a^\top x + c` by least squares (with a tiny ridge ``ridge`` times
    the mean squared feature, for stability) on the training part; report the fraction of
    the test variance they explain (see :class:`LinearPredictability`). Computed in float64.

    Parameters
    ----------
    X : array (n_samples, n_features)
        The inputs the residuals came from.
    R : array (n_samples, n_out)
        Residuals (or any part of them).
    train_fraction : float
        Share of samples used for fitting, in (0, 1).
    seed : int
        Seed of the split.
    ridge : float
        Relative ridge (>= 0).
    """
    Xt, _ = as_tensor(X, "X", ndim=2)
    Rt, _ = as_tensor(R, "R", ndim=2, like=Xt)
    if Rt.shape[0] != Xt.shape[0]:
        raise ValueError(f"R must have as many rows as X ({Xt.shape[0]}), got {Rt.shape[0]}")
    try:
        frac = float(train_fraction)
    except (TypeError, ValueError):
        raise TypeError(f"train_fraction must be a number in (0, 1), got {train_fraction!r}") from None
    if not 0 < frac < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    ridge = check_nonnegative(ridge, "ridge")
    n = Xt.shape[0]
    n_train = int(round(frac * n))
    if n_train < Xt.shape[1] + 2 or n - n_train < 2:
        raise ValueError(
            f"X has {n} samples; with train_fraction={frac} that leaves too few to fit "
            f"{Xt.shape[1] + 1} coefficients and test (need n_train >= n_features + 2, n_test >= 2)"
        )
    with torch.no_grad():
        perm = torch.randperm(n, generator=generator(seed)).to(Xt.device)
        X64, R64 = Xt.double()[perm], Rt.double()[perm]
        A = torch.cat([X64, torch.ones(n, 1, dtype=torch.float64, device=X64.device)], 1)
        Y = torch.cat([R64, R64.norm(dim=1, keepdim=True)], 1)
        Atr, Ate, Ytr, Yte = A[:n_train], A[n_train:], Y[:n_train], Y[n_train:]
        G = Atr.T @ Atr
        G = G + ridge * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        W = torch.linalg.solve(G, Atr.T @ Ytr)
        Yhat = Ate @ W
        return LinearPredictability(
            vector_r2=_r2(Yte[:, :-1], Yhat[:, :-1]),
            norm_r2=_r2(Yte[:, -1:], Yhat[:, -1:]),
            n_train=n_train,
            n_test=n - n_train,
        )
