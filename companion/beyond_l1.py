r"""Beyond L1: TopK, BatchTopK and JumpReLU SAEs through the same optimality conditions (Chapter 9).

The joint problems (unit atoms lose nothing: no penalty depends on a magnitude):

.. math::
    \text{TopK:}\quad \min_{z\ge0,\ \|z\|_0\le k} \tfrac12\|x - Dz\|^2 ,\qquad
    \text{JumpReLU:}\quad \min_{z\ge0} \tfrac12\|x - Dz\|^2 + \varepsilon\|z\|_0 ,

and BatchTopK, a budget :math:`\sum_n\|z_n\|_0 \le kN` over a batch, whose Lagrangian is
JumpReLU's with one price :math:`\varepsilon` for every latent (a global threshold at
inference).

Code conditions (certified here sample by sample):

- :func:`nnls_refit`: for a fixed support the magnitudes solve a nonnegative least-squares
  problem (exact). At its solution :math:`d_k^\top r = 0` on every active atom and
  :math:`\le 0` on the rest of the support; :func:`refit_gap` compares an encoder's
  magnitudes with it.
- :func:`local_moves`: the best single addition, removal or swap of an atom (each followed by
  the exact NNLS refit), found by branch and bound on the closed-form least-squares bounds
  :math:`\tfrac12 (d_j^\top r)_+^2/(1-\|P_A d_j\|^2)` (addition) and
  :math:`\tfrac12 z_i^2/(G_A^{-1})_{ii}` (removal). A sample none of whose moves lowers the
  cost holds a *locally optimal* code; for orthonormal atoms JumpReLU's exact code is hard
  thresholding at :math:`\sqrt{2\varepsilon}`.
- :func:`best_support_codes`: the exact code by enumerating supports (small dictionaries; the
  independent check).

Dictionary conditions: at NNLS codes with fixed supports the gradient on atom :math:`k` is
:math:`-\frac1N\sum_n z_{kn} r_n` and stationarity is :math:`\sum_n z_{kn} r_n = 0`: atoms
are *plain* weighted centroids of their partial residuals, with no :math:`\lambda`-shift
(:func:`plain_centroid_stationarity`, with its sampling standard error).

The L1 view: :func:`matched_lambda` finds the :math:`\lambda` at which exact nonnegative-lasso
codes on the same dictionary reach a given mean L0, so Chapters 2–6's certificates apply at
matched sparsity.

SAEs: :class:`SparseSAE` holds SAELens ``topk``, ``batchtopk`` (saved by SAELens as
``jumprelu``) and ``jumprelu`` weights; :func:`load_sparse_sae` reads SAELens' saved
``cfg.json`` + ``sae_weights.safetensors``; :func:`certify_sparse_sae` runs every certificate
above on an SAE and activations.
"""

from __future__ import annotations

import itertools
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import optimize

from ._validation import as_tensor, check_positive, check_positive_int

__all__ = [
    "LocalMoves",
    "MatchedL1",
    "PlainStationarity",
    "RefitGap",
    "SparseCheckpoint",
    "SparseSAE",
    "SparseSAECertificate",
    "best_support_codes",
    "certify_sparse_sae",
    "load_sparse_sae",
    "local_moves",
    "matched_lambda",
    "nnls_refit",
    "plain_centroid_stationarity",
    "refit_gap",
]

ARCHITECTURES = ("topk", "batchtopk", "jumprelu")


def _np64(a: Any, name: str, ndim: int) -> np.ndarray:
    t, _ = as_tensor(a, name, ndim=ndim)
    return t.detach().cpu().double().numpy()


def _unit_rows(D: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(D, axis=1)
    if np.any(n == 0):
        raise ValueError(f"D has {int((n == 0).sum())} zero atoms")
    return D / n[:, None]


def _check_k_eps(k: Any, eps: Any) -> tuple[int | None, float | None]:
    if (k is None) == (eps is None):
        raise ValueError("give exactly one of k (TopK) or eps (JumpReLU)")
    if k is not None:
        return check_positive_int(k, "k"), None
    return None, check_positive(eps, "eps")


# ----------------------------------------------------------------------------------------
# codes for a fixed support
# ----------------------------------------------------------------------------------------

def _nnls_on(x: np.ndarray, D: np.ndarray, B: Any) -> tuple[np.ndarray, float]:
    """NNLS coefficients on the atoms ``B`` (rows of D) and the error ½‖x − D_Bᵀc‖²."""
    B = list(B)
    if not B:
        return np.zeros(0), 0.5 * float(x @ x)
    A = D[B].T
    c, *_ = np.linalg.lstsq(A, x, rcond=None)
    if np.all(c >= 0):
        r = x - A @ c
        return c, 0.5 * float(r @ r)
    c, rn = optimize.nnls(A, x)
    return c, 0.5 * rn * rn


def nnls_refit(X: Any, D: Any, support: Any) -> Any:
    r"""Exact nonnegative magnitudes on each sample's own support (Chapter 9).

    For every sample :math:`n`, :math:`\min_{c\ge0}\tfrac12\|x_n - \sum_{k\in S_n} c_k d_k\|^2`
    with :math:`S_n` the nonzero entries of row :math:`n` of ``support`` (codes or a boolean
    mask). The least-squares solution is taken when it is nonnegative (then it is the NNLS
    solution), ``scipy.optimize.nnls`` otherwise.

    Parameters
    ----------
    X : array (n_samples, n_features)
    D : array (n_atoms, n_features), unit-norm rows (normalised here if not)
    support : array (n_samples, n_atoms), codes or booleans; nonzero marks the support

    Returns
    -------
    array (n_samples, n_atoms), nonnegative codes on unit atoms, in the kind of ``X``.
    """
    Xt, kind = as_tensor(X, "X", ndim=2)
    Xn = Xt.detach().cpu().double().numpy()
    Dn = _unit_rows(_np64(D, "D", 2))
    S = np.asarray(support.detach().cpu() if isinstance(support, torch.Tensor) else support) != 0
    if S.shape != (Xn.shape[0], Dn.shape[0]) or Dn.shape[1] != Xn.shape[1]:
        raise ValueError(f"shapes disagree: X {Xn.shape}, D {Dn.shape}, support {S.shape}")
    Z = np.zeros(S.shape)
    for n in range(Xn.shape[0]):
        B = np.flatnonzero(S[n])
        if B.size:
            Z[n, B], _ = _nnls_on(Xn[n], Dn, B)
    out = torch.from_numpy(Z)
    return out.numpy() if kind.is_numpy else out.to(device=Xt.device, dtype=Xt.dtype)


@dataclass
class RefitGap:
    r"""What :func:`refit_gap` returns: an encoder's magnitudes against NNLS on its own support.

    Attributes
    ----------
    loss_encoder, loss_refit : float
        Mean :math:`\tfrac12\|x - Dz\|^2` with the encoder's codes and with the NNLS refit on
        the same supports.
    gap : float
        ``loss_encoder - loss_refit`` (:math:`\ge 0`; zero iff every magnitude is exact).
    relative_gap : float
        ``gap / loss_encoder``.
    shrinkage : float
        Mean over active entries of ``z_encoder / z_refit`` (below 1: the encoder shrinks).
    l0_encoder, l0_refit : float
        Mean number of active latents before and after the refit (the refit may zero some).
    """

    loss_encoder: float
    loss_refit: float
    gap: float
    relative_gap: float
    shrinkage: float
    l0_encoder: float
    l0_refit: float


def refit_gap(X: Any, D: Any, Z: Any) -> RefitGap:
    """The support-refit gap of codes ``Z`` (unit-atom units) for ``X`` and dictionary ``D`` (Chapter 9)."""
    Xn = _np64(X, "X", 2)
    Dn = _unit_rows(_np64(D, "D", 2))
    Zn = _np64(Z, "Z", 2)
    Zr = nnls_refit(Xn, Dn, Zn)
    le = 0.5 * np.mean(np.sum((Xn - Zn @ Dn) ** 2, 1))
    lr = 0.5 * np.mean(np.sum((Xn - Zr @ Dn) ** 2, 1))
    act = (Zn > 0) & (Zr > 0)
    shrink = float(np.mean(Zn[act] / Zr[act])) if act.any() else float("nan")
    return RefitGap(loss_encoder=float(le), loss_refit=float(lr), gap=float(le - lr),
                    relative_gap=float((le - lr) / le) if le > 0 else 0.0, shrinkage=shrink,
                    l0_encoder=float((Zn > 0).sum(1).mean()), l0_refit=float((Zr > 0).sum(1).mean()))


# ----------------------------------------------------------------------------------------
# exact codes by enumeration (small dictionaries)
# ----------------------------------------------------------------------------------------

def best_support_codes(X: Any, D: Any, *, k: int | None = None, eps: float | None = None,
                       max_atoms: int = 16) -> Any:
    r"""Exact TopK (``k``) or JumpReLU (``eps``) codes by enumerating every support (Chapter 9).

    TopK: :math:`\min_{z\ge0,\|z\|_0\le k}\tfrac12\|x-Dz\|^2`; JumpReLU:
    :math:`\min_{z\ge0}\tfrac12\|x-Dz\|^2+\varepsilon\|z\|_0`. Every support of up to ``k``
    atoms (JumpReLU: up to ``min(K, d)`` atoms) is solved by NNLS. Exponential in the number
    of atoms, so limited to ``max_atoms``; ties go to the smaller support, then the first in
    lexicographic order.
    """
    k, eps = _check_k_eps(k, eps)
    Xt, kind = as_tensor(X, "X", ndim=2)
    Xn = Xt.detach().cpu().double().numpy()
    Dn = _unit_rows(_np64(D, "D", 2))
    K, d = Dn.shape
    if K > max_atoms:
        raise ValueError(f"enumeration over {K} atoms exceeds max_atoms={max_atoms}")
    top = min(k if k is not None else K, K, d) if eps is None else min(K, d)
    supports = [s for size in range(top + 1) for s in itertools.combinations(range(K), size)]
    Z = np.zeros((Xn.shape[0], K))
    for n in range(Xn.shape[0]):
        best, arg = math.inf, None
        for s in supports:
            c, err = _nnls_on(Xn[n], Dn, s)
            cost = err + (eps * int((c > 0).sum()) if eps is not None else 0.0)
            if cost < best - 1e-12 * max(1.0, best if math.isfinite(best) else 1.0):
                best, arg = cost, (s, c)
        s, c = arg
        if s:
            Z[n, list(s)] = c
    out = torch.from_numpy(Z)
    return out.numpy() if kind.is_numpy else out.to(device=Xt.device, dtype=Xt.dtype)


# ----------------------------------------------------------------------------------------
# local moves
# ----------------------------------------------------------------------------------------

@dataclass
class LocalMoves:
    r"""What :func:`local_moves` returns: the best single move of each sample's code.

    The cost is :math:`\tfrac12\|x-Dz\|^2` under the TopK budget ``k``, or
    :math:`\tfrac12\|x-Dz\|^2+\varepsilon\|z\|_0` (JumpReLU). Every move (add an atom,
    remove one, swap one for another) is followed by the exact NNLS refit on the new support.

    Attributes
    ----------
    decrease : numpy.ndarray (n_samples,)
        The best move's decrease of the cost (0 when no move lowers it by more than ``tol``).
    move : numpy.ndarray of str (n_samples,)
        ``"add"``, ``"remove"``, ``"swap"`` or ``""`` (none lowers the cost).
    fraction_improvable : float
        Fraction of samples some move improves (by more than ``tol`` times the sample's cost scale).
    fraction_by_move : dict
        The same split by the best move's kind.
    mean_decrease : float
        Mean over all samples of ``decrease``: how much the mean cost falls if every sample
        takes its best move.
    loss : float
        Mean cost of the refit codes the moves start from.
    n_exact : int
        How many NNLS problems the branch and bound solved beyond its bounds.
    """

    decrease: np.ndarray = field(repr=False)
    move: np.ndarray = field(repr=False)
    fraction_improvable: float
    fraction_by_move: dict
    mean_decrease: float
    loss: float
    n_exact: int

    @property
    def certified(self) -> bool:
        """True when no sample has an improving single move (a local-move certificate)."""
        return self.fraction_improvable == 0.0


def _moves_one(x, D, G, c_full, k, eps, tol):
    """Best move for one sample whose NNLS code on unit atoms is ``c_full`` (K,)."""
    K = D.shape[0]
    A = np.flatnonzero(c_full > 0)
    cA = c_full[A]
    r = x - cA @ D[A]
    err = 0.5 * float(r @ r)
    outside = np.setdiff1d(np.arange(K), A)
    # candidate moves as parallel arrays: bound on the decrease, kind (0 add, 1 remove, 2 swap),
    # the atom leaving (index into A, -1 for none) and the atom entering (index into outside, -1)
    bounds, kinds, leave, enter = [], [], [], []

    def add(b, kind, i, j):
        bounds.append(b)
        kinds.append(np.full(len(b), kind))
        leave.append(np.broadcast_to(i, len(b)))
        enter.append(np.broadcast_to(j, len(b)))

    every = np.arange(len(outside))
    if eps is not None or len(A) < k:                      # additions
        if len(A):
            Q, _ = np.linalg.qr(D[A].T)
            proj = np.sum((D[outside] @ Q) ** 2, 1)
        else:
            proj = np.zeros(len(outside))
        g = D[outside] @ r
        add(0.5 * np.maximum(g, 0) ** 2 / np.maximum(1 - proj, 1e-15) - (eps or 0.0), 0, -1, every)
    if len(A):
        # removals (JumpReLU only: with a budget, a removal never lowers the squared error)
        if eps is not None:
            Ginv = np.linalg.inv(G[np.ix_(A, A)])
            add(eps - 0.5 * cA ** 2 / np.diag(Ginv), 1, np.arange(len(A)), -1)
        for a in range(len(A)):                            # swaps
            rest = np.delete(A, a)
            if len(rest):
                Q, _ = np.linalg.qr(D[rest].T)
                r_i = x - Q @ (Q.T @ x)
                proj = np.sum((D[outside] @ Q) ** 2, 1)
            else:
                r_i, proj = x, np.zeros(len(outside))
            err_i = 0.5 * float(r_i @ r_i)
            g = D[outside] @ r_i
            add(err - (err_i - 0.5 * np.maximum(g, 0) ** 2 / np.maximum(1 - proj, 1e-15)), 2, a, every)
    names = ("add", "remove", "swap")
    scale = tol * max(err + (eps or 0.0) * len(A), 0.5 * float(x @ x), 1e-300)
    best, kind, n_exact = 0.0, "", 0
    if bounds:
        bounds, kinds = np.concatenate(bounds), np.concatenate(kinds)
        leave, enter = np.concatenate(leave), np.concatenate(enter)
        for c in np.argsort(-bounds, kind="stable"):       # largest bound first
            if bounds[c] <= best + scale:
                break
            B = A if leave[c] < 0 else np.delete(A, leave[c])
            if enter[c] >= 0:
                B = np.sort(np.append(B, outside[enter[c]]))
            _, e = _nnls_on(x, D, B)
            n_exact += 1
            pen = 0.0 if eps is None else eps * (len(B) - len(A))
            dec = err - e - pen
            if dec > best + scale:
                best, kind = dec, names[kinds[c]]
    return best, kind, n_exact, err + (eps * len(A) if eps is not None else 0.0)


def local_moves(X: Any, D: Any, Z: Any, *, k: int | None = None, eps: float | None = None,
                tol: float = 1e-9, refit: bool = True) -> LocalMoves:
    r"""Local-move certificate of codes ``Z`` for TopK (``k``) or JumpReLU (``eps``) (Chapter 9).

    Starting from the NNLS refit of ``Z`` on its supports (``refit=False``: ``Z`` is taken as
    already refit) and its active set :math:`A`, a move goes to a support :math:`B` one
    addition, removal or swap away and costs :math:`\min_{c\ge0}\tfrac12\|x-D_Bc\|^2`
    (+ :math:`\varepsilon|B|` for JumpReLU; if the NNLS zeroes an atom of :math:`B`, the smaller
    support is another move or a chain of moves). Every single addition of an atom (TopK: while fewer than ``k`` are
    active), removal (JumpReLU) and swap is scored by its exact NNLS refit. Branch and bound:
    the closed-form least-squares bounds (addition
    :math:`\tfrac12(d_j^\top r)_+^2/(1-\|P_Ad_j\|^2)`, removal increase
    :math:`\ge\tfrac12 z_i^2/(G_A^{-1})_{ii}`, swap likewise after the removal) rank the
    moves, and NNLS is solved only while a bound could beat the best exact move found.

    A move counts as improving when it lowers the sample's cost by more than ``tol`` times
    the larger of that cost and :math:`\tfrac12\|x\|^2`.
    """
    k, eps = _check_k_eps(k, eps)
    tol = float(tol)
    Xn = _np64(X, "X", 2)
    Dn = _unit_rows(_np64(D, "D", 2))
    Zn = _np64(Z, "Z", 2)
    if Zn.shape != (Xn.shape[0], Dn.shape[0]):
        raise ValueError(f"Z has shape {Zn.shape}, expected {(Xn.shape[0], Dn.shape[0])}")
    if k is not None and int((Zn > 0).sum(1).max(initial=0)) > k:
        raise ValueError(f"some codes have more than k={k} active latents")
    Zr = nnls_refit(Xn, Dn, Zn) if refit else Zn
    G = Dn @ Dn.T
    N = Xn.shape[0]
    dec, mv = np.zeros(N), np.empty(N, dtype=object)
    costs = np.zeros(N)
    n_exact = 0
    for n in range(N):
        dec[n], mv[n], e, costs[n] = _moves_one(Xn[n], Dn, G, Zr[n], k, eps, tol)
        n_exact += e
    mv = mv.astype(str)
    by = {m: float(np.mean(mv == m)) for m in ("add", "remove", "swap")}
    return LocalMoves(decrease=dec, move=mv, fraction_improvable=float(np.mean(mv != "")),
                      fraction_by_move=by, mean_decrease=float(dec.mean()),
                      loss=float(costs.mean()), n_exact=int(n_exact))


# ----------------------------------------------------------------------------------------
# dictionary condition: plain centroids
# ----------------------------------------------------------------------------------------

@dataclass
class PlainStationarity:
    r"""What :func:`plain_centroid_stationarity` returns, per atom.

    With :math:`g_k = \frac1N\sum_n z_{kn}(I-d_kd_k^\top)r_n`:

    Attributes
    ----------
    ratio : numpy.ndarray (n_atoms,)
        :math:`\|\sum_n z_{kn}(I-d_kd_k^\top) r_n\| / \|z_k\|_2^2` (NaN for unused atoms):
        zero at a stationary atom; the centroid form says :math:`d_k` is
        :math:`\sum_n z_{kn} e^{(k)}_n/\|z_k\|_2^2` exactly when it is zero.
    noise_ratio : numpy.ndarray (n_atoms,)
        :math:`\|g_k\|/\mathrm{se}_k` with :math:`\mathrm{se}_k^2 = \mathrm{tr}\,\widehat{\mathrm{Cov}}(z_{kn}(I-d_kd_k^\top)r_n)/N`,
        the expected squared norm of :math:`g_k` if the population gradient were zero. Near 1:
        stationary within sampling noise; well above 3: a gradient the sample resolves.
    radial : numpy.ndarray (n_atoms,)
        :math:`\sum_n z_{kn} d_k^\top r_n/\|z_k\|_2^2` (zero at NNLS codes, the code condition
        the centroid form needs).
    max_ratio, max_noise_ratio : float
        Largest ``ratio`` and ``noise_ratio`` over used atoms.
    n_used : int
    """

    ratio: np.ndarray = field(repr=False)
    noise_ratio: np.ndarray = field(repr=False)
    radial: np.ndarray = field(repr=False)
    max_ratio: float
    max_noise_ratio: float
    n_used: int


def plain_centroid_stationarity(X: Any, D: Any, Z: Any) -> PlainStationarity:
    r"""Plain-centroid stationarity :math:`\sum_n z_{kn} r_n = 0` of ``(D, Z)`` (Chapter 9).

    ``Z`` should be NNLS codes on their supports (:func:`nnls_refit`); then
    :math:`d_k^\top r_n = 0` wherever :math:`z_{kn} > 0` and the tangent projection changes
    nothing. Reported with its sampling standard error (:class:`PlainStationarity`).
    """
    Xn = _np64(X, "X", 2)
    Dn = _unit_rows(_np64(D, "D", 2))
    Zn = _np64(Z, "Z", 2)
    R = Xn - Zn @ Dn
    N, K = Zn.shape
    ratio, noise, radial = (np.full(K, np.nan) for _ in range(3))
    for k in range(K):
        zk = Zn[:, k]
        act = zk > 0
        if not act.any():
            continue
        V = zk[act, None] * R[act]
        rad = V @ Dn[k]
        Vt = V - rad[:, None] * Dn[k]
        s = Vt.sum(0)
        q = float(zk @ zk)
        ratio[k] = np.linalg.norm(s) / q
        radial[k] = rad.sum() / q
        # per-sample terms over all N samples (zeros where inactive)
        mean = s / N
        var = (np.sum(Vt ** 2) - N * float(mean @ mean)) / max(N - 1, 1)
        se = math.sqrt(max(var, 0.0) / N)
        noise[k] = np.linalg.norm(mean) / se if se > 0 else (0.0 if np.linalg.norm(mean) == 0 else np.inf)
    used = ~np.isnan(ratio)
    return PlainStationarity(ratio=ratio, noise_ratio=noise, radial=radial,
                             max_ratio=float(np.nanmax(ratio)) if used.any() else 0.0,
                             max_noise_ratio=float(np.nanmax(noise)) if used.any() else 0.0,
                             n_used=int(used.sum()))


# ----------------------------------------------------------------------------------------
# the L1 view at matched sparsity
# ----------------------------------------------------------------------------------------

@dataclass
class MatchedL1:
    r"""What :func:`matched_lambda` returns.

    Attributes
    ----------
    lam : float
        The :math:`\lambda` at which exact nonnegative-lasso codes on the dictionary have mean
        L0 ``l0`` (closest from the bisection).
    l0, target_l0 : float
        Mean L0 reached and asked for.
    Z : numpy.ndarray (n_samples, n_atoms)
        The exact L1 codes at ``lam``.
    certificate : companion.CertificateReport or None
        Chapter 2's certificate of the dictionary at ``lam`` (with ``certificate=True``).
    """

    lam: float
    l0: float
    target_l0: float
    Z: np.ndarray = field(repr=False)
    certificate: Any = field(default=None, repr=False)


def _l1_codes(X, D, lam):
    import warnings

    from .coding import ConvergenceWarning, encode

    with warnings.catch_warnings():
        # codes limited by float64 rounding at tiny λ are exact to rounding: enough for an L0
        warnings.simplefilter("ignore", ConvergenceWarning)
        Z = encode(torch.from_numpy(X), torch.from_numpy(D), lam, max_iter=1000)
    return Z.numpy()


def matched_lambda(X: Any, D: Any, l0: float, *, iters: int = 30, rtol: float = 1e-3,
                   certificate: bool = False) -> MatchedL1:
    r"""The :math:`\lambda` at which exact L1 codes on dictionary ``D`` have mean L0 ``l0`` (Chapter 9).

    Bisection in :math:`\log\lambda` between :math:`\lambda_{\max} = \max_{n,k} d_k^\top x_n`
    (above it every code is zero) and :math:`10^{-4}\lambda_{\max}`, on the exact codes of
    :func:`companion.encode`, until the L0 is within ``rtol`` of the target or the bracket is
    narrower than ``rtol``. The mean L0 of the lasso falls as :math:`\lambda` rises (not
    strictly in general; the closest value found is returned). The lasso's codes have at most
    ``n_features`` active atoms (generically), so a larger target is out of reach: the
    result's ``l0`` says what was reached.
    """
    Xn = _np64(X, "X", 2)
    Dn = _unit_rows(_np64(D, "D", 2))
    target = check_positive(l0, "l0")
    hi = float((Xn @ Dn.T).max())
    if hi <= 0:
        raise ValueError("no atom has a positive inner product with any sample")
    lo = hi * 1e-4
    best = None
    for _ in range(iters):
        if hi / lo < 1 + rtol:
            break
        mid = math.sqrt(lo * hi)
        Z = _l1_codes(Xn, Dn, mid)
        got = float((Z > 0).sum(1).mean())
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (mid, got, Z)
        if abs(got - target) <= rtol * target:
            break
        if got > target:
            lo = mid
        else:
            hi = mid
    lam, got, Z = best
    cert = None
    if certificate:
        from .certificates import certify

        cert = certify(Xn, Dn, lam, Z)
    return MatchedL1(lam=float(lam), l0=got, target_l0=target, Z=Z, certificate=cert)


# ----------------------------------------------------------------------------------------
# the SAE type and its loader
# ----------------------------------------------------------------------------------------

class SparseSAE(torch.nn.Module):
    r"""A TopK, BatchTopK or JumpReLU SAE in the SAELens parameter layout (Chapter 9).

    Pre-activations :math:`h = (x - b_{dec})W_{enc} + b_{enc}` (times
    :math:`\|W_{dec}[k]\|` when ``rescale_acts_by_decoder_norm``). Codes:

    * ``"topk"``: the ``k`` largest entries of :math:`h`, through a ReLU, the rest zero;
    * ``"jumprelu"`` and ``"batchtopk"`` (SAELens saves BatchTopK as a JumpReLU with one
      threshold for every latent): :math:`z_k = h_k\,[h_k > \theta_k]`.

    Reconstruction :math:`\hat x = zW_{dec} + b_{dec}` (with the rescaling:
    :math:`z_k/\|W_{dec}[k]\|`). :meth:`joint_view` gives the unit-norm dictionary and the
    codes on it, the form the certificates take.
    """

    def __init__(self, d_in: int, d_sae: int, *, architecture: str, k: int | None = None,
                 rescale_acts_by_decoder_norm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        self.d_in = check_positive_int(d_in, "d_in")
        self.d_sae = check_positive_int(d_sae, "d_sae")
        self.architecture = architecture
        if architecture == "topk":
            self.k = check_positive_int(k, "k")
            if self.k > d_sae:
                raise ValueError(f"k={k} exceeds d_sae={d_sae}")
        else:
            self.k = None
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        kw = dict(device=device, dtype=dtype)
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, **kw))
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae, **kw))

    def _input(self, x: Any) -> tuple[torch.Tensor, bool]:
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x).to(self.W_dec.device, self.W_dec.dtype), True
        return x.to(self.W_dec.device, self.W_dec.dtype), False

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            h = h * self.W_dec.norm(dim=1)
        return h

    def encode(self, x: Any) -> Any:
        """The SAE's codes (in its own units: multiply by ``‖W_dec[k]‖`` for unit atoms unless rescaled)."""
        xt, is_np = self._input(x)
        h = self.pre_activations(xt)
        if self.architecture == "topk":
            vals, idx = torch.topk(h, self.k, dim=-1)
            z = torch.zeros_like(h).scatter(-1, idx, vals.relu())
        else:
            z = h.relu() * (h > self.threshold)
        return z.detach().cpu().numpy() if is_np else z

    def decode(self, z: Any) -> Any:
        zt, is_np = self._input(z)
        if self.rescale_acts_by_decoder_norm:
            zt = zt / self.W_dec.norm(dim=1)
        out = zt @ self.W_dec + self.b_dec
        return out.detach().cpu().numpy() if is_np else out

    def forward(self, x: Any) -> Any:
        return self.decode(self.encode(x))

    def unit_scale(self) -> torch.Tensor:
        """Per latent: the factor from the SAE's codes to codes on unit atoms."""
        if self.rescale_acts_by_decoder_norm:
            return torch.ones_like(self.b_enc)
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def joint_view(self, X: Any) -> tuple[Any, Any, Any]:
        """``(X - b_dec, D, Z)``: centred data, unit atoms (rows), codes on them (the certificates' inputs)."""
        xt, is_np = self._input(X)
        z = self.encode(xt) * self.unit_scale()
        D = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
        out = (xt - self.b_dec, D, z)
        return tuple(t.detach().cpu().numpy() for t in out) if is_np else out

    @torch.no_grad()
    def magnitude_thresholds(self) -> torch.Tensor:
        r"""JumpReLU/BatchTopK: the least nonzero code on unit atoms, :math:`\theta_k` in those units."""
        if self.architecture == "topk":
            raise ValueError("a TopK SAE has no thresholds")
        return self.threshold * self.unit_scale()


@dataclass
class SparseCheckpoint:
    r"""A TopK / BatchTopK / JumpReLU SAE read by :func:`load_sparse_sae`, with its training loss.

    Attributes
    ----------
    sae : SparseSAE
    architecture : str
        ``"topk"``, ``"batchtopk"`` or ``"jumprelu"`` (the training architecture).
    k : float or None
        TopK's ``k`` (BatchTopK: the mean budget per sample).
    eps : float or None
        JumpReLU: the book's :math:`\varepsilon` in :math:`\tfrac12\|x-\hat x\|^2+\varepsilon\|z\|_0`,
        ``l0_coefficient / 2`` (SAELens' squared error is not halved); None when the
        sparsity loss was not the step L0 (``tanh``, ``quadratic``) or is not recorded.
    eps_source : str
        Where ``eps`` came from, or why there is none.
    path : pathlib.Path
    cfg : dict
    """

    sae: SparseSAE
    architecture: str
    k: float | None
    eps: float | None
    eps_source: str
    path: pathlib.Path
    cfg: dict = field(default_factory=dict, repr=False)


_REFUSED = {
    "gated": "a gated SAE's gate and magnitude paths (b_gate, r_mag) define a different encoder; "
             "its loss penalises the gate's L1, not an L0 or a budget",
    "matryoshka_batchtopk": "a Matryoshka SAE's loss sums the reconstruction errors of nested "
                            "prefixes of its latents, not one dictionary's error; the certificates "
                            "here are for a single dictionary",
}


def load_sparse_sae(path: str | pathlib.Path, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float64,
                    activation_scale: float | None = None) -> SparseCheckpoint:
    r"""Read a SAELens ``topk``, ``batchtopk`` or ``jumprelu`` checkpoint (Chapter 9).

    ``path`` is a directory with ``cfg.json`` and ``sae_weights.safetensors`` as SAELens'
    ``save_inference_model`` writes them (BatchTopK is saved as ``architecture: "jumprelu"``
    with ``metadata.training_architecture: "batchtopk"`` and one threshold for every latent).
    ``apply_b_dec_to_input: false`` is folded into ``b_enc`` exactly (``b_enc ← b_enc +
    b_dec W_enc``, which for ``rescale_acts_by_decoder_norm`` is the same pre-activation
    before the rescaling). ``normalize_activations="expected_average_only_in"`` needs
    ``activation_scale`` ``s``: the weights are folded to act on raw activations (``W_enc·s``,
    ``W_dec/s``, ``b_dec/s``; thresholds and TopK's selection unchanged) and JumpReLU's
    :math:`\varepsilon` becomes :math:`\varepsilon/s^2`. Gated, Matryoshka and every other
    architecture are refused with what is missing.
    """
    from .interop import CheckpointError, _load_safetensors, _read_json

    directory = pathlib.Path(path)
    weights, cfg_path = directory / "sae_weights.safetensors", directory / "cfg.json"
    for p in (weights, cfg_path):
        if not p.is_file():
            raise CheckpointError(f"SAELens checkpoint {directory} has no {p.name}")
    cfg = _read_json(cfg_path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    details = meta.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    arch = cfg.get("architecture", "standard")
    train_arch = meta.get("training_architecture") or arch
    for a in (arch, train_arch):
        if a in _REFUSED:
            raise CheckpointError(f"{cfg_path}: architecture {a!r} is not supported: {_REFUSED[a]}")
    if arch not in ("topk", "jumprelu") or train_arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{cfg_path}: architecture={arch!r} (trained as {train_arch!r}); load_sparse_sae reads "
            "SAELens 'topk', 'batchtopk' (saved as 'jumprelu') and 'jumprelu' SAEs; a 'standard' SAE "
            "is read by companion.load_sae")
    tensors = _load_safetensors(weights)
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [n for n in need if n not in tensors]
    if missing:
        raise CheckpointError(f"{weights} is missing {missing}; it holds {sorted(tensors)}")
    extra = sorted(set(tensors) - set(need))
    if extra:
        raise CheckpointError(f"{weights} holds tensors {extra} beside {need}: another architecture")
    W_enc = tensors["W_enc"].double()
    if W_enc.ndim != 2:
        raise CheckpointError(f"{weights}: W_enc must be 2-dimensional, got {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    shapes = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name in need[1:]:
        if tuple(tensors[name].shape) != shapes[name]:
            raise CheckpointError(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {shapes[name]}")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise CheckpointError(f"{weights}: {name} contains NaN or infinite entries")
    norm = cfg.get("normalize_activations") or "none"
    scale = 1.0
    if norm == "expected_average_only_in":
        if activation_scale is None:
            raise CheckpointError(f"{cfg_path}: normalize_activations='expected_average_only_in': "
                                  "pass activation_scale=s (SAELens' sqrt(d_in)/E||x||)")
        scale = check_positive(activation_scale, "activation_scale")
    elif norm != "none":
        raise CheckpointError(f"{cfg_path}: normalize_activations={norm!r} is not supported")
    elif activation_scale is not None:
        raise CheckpointError(f"activation_scale was given but {cfg_path} records no normalisation")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False)) if arch == "topk" else False
    k = None
    if arch == "topk":
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
            raise CheckpointError(f"{cfg_path}: k must be an integer in [1, d_sae={d_sae}], got {k!r}")
    sae = SparseSAE(d_in, d_sae, architecture="topk" if arch == "topk" else train_arch, k=k,
                    rescale_acts_by_decoder_norm=rescale, device=device, dtype=dtype)
    b_enc = tensors["b_enc"].double()
    b_dec = tensors["b_dec"].double()
    if cfg.get("apply_b_dec_to_input", True) in (False, "false", "False"):
        b_enc = b_enc + b_dec @ W_enc
    with torch.no_grad():
        sae.W_enc.copy_((W_enc * scale).to(dtype))
        sae.b_enc.copy_(b_enc.to(dtype))
        sae.W_dec.copy_((tensors["W_dec"].double() / scale).to(dtype))
        sae.b_dec.copy_((b_dec / scale).to(dtype))
        if arch == "jumprelu":
            sae.threshold.copy_(tensors["threshold"].double().to(dtype))
    eps, source = None, "a TopK SAE has a budget k, no price ε"
    if train_arch == "batchtopk":
        k = details.get("k", k)
        source = ("BatchTopK: a budget of k latents per sample on average; its price ε is "
                  "not recorded (the global threshold plays its part)")
    elif train_arch == "jumprelu":
        mode = details.get("jumprelu_sparsity_loss_mode", cfg.get("jumprelu_sparsity_loss_mode"))
        coef = details.get("l0_coefficient", cfg.get("l0_coefficient"))
        if coef is None:
            source = "cfg.json records no l0_coefficient"
        elif mode not in (None, "step"):
            source = f"jumprelu_sparsity_loss_mode={mode!r} is not the step L0: no ε implied"
        else:
            eps = float(coef) / 2 / scale ** 2
            source = "cfg.json metadata l0_coefficient / 2 (SAELens' squared error is not halved)"
            if scale != 1.0:
                source += f", divided by s² (s = {scale:g})"
    return SparseCheckpoint(sae=sae, architecture=train_arch, k=None if k is None else float(k),
                            eps=eps, eps_source=source, path=directory, cfg=cfg)


# ----------------------------------------------------------------------------------------
# everything on an SAE
# ----------------------------------------------------------------------------------------

@dataclass
class SparseSAECertificate:
    r"""What :func:`certify_sparse_sae` returns.

    Attributes
    ----------
    architecture : str
    l0 : float
        Mean number of active latents of the SAE's codes.
    k, eps : float or None
        The budget / price the local moves were scored under (BatchTopK: ``k = l0``-rounded
        budget is not per sample, so its moves are scored as JumpReLU at the ``eps`` given,
        or as swaps only when none is given).
    refit : RefitGap
    moves : LocalMoves
    stationarity : PlainStationarity
        At the refit codes.
    matched : MatchedL1 or None
    n_samples : int
    """

    architecture: str
    l0: float
    k: float | None
    eps: float | None
    refit: RefitGap
    moves: LocalMoves
    stationarity: PlainStationarity
    matched: MatchedL1 | None
    n_samples: int

    def summary(self) -> str:
        m, s, r = self.moves, self.stationarity, self.refit
        lines = [
            f"{self.architecture} SAE on {self.n_samples} samples: mean L0 {self.l0:.3g}",
            f"support-refit gap: {r.gap:.3g} ({100 * r.relative_gap:.3g}% of the encoder's "
            f"squared error {r.loss_encoder:.3g}); encoder magnitudes / NNLS = {r.shrinkage:.3g}",
            f"local moves ({'k=' + format(self.k, 'g') if self.eps is None else 'eps=' + format(self.eps, 'g')}): "
            f"{100 * m.fraction_improvable:.3g}% of samples improvable "
            f"(add {100 * m.fraction_by_move['add']:.3g}%, remove {100 * m.fraction_by_move['remove']:.3g}%, "
            f"swap {100 * m.fraction_by_move['swap']:.3g}%), mean cost decrease {m.mean_decrease:.3g}",
            f"plain-centroid stationarity: max ratio {s.max_ratio:.3g}, max |g|/se {s.max_noise_ratio:.3g} "
            f"over {s.n_used} used atoms",
        ]
        if self.matched is not None:
            lines.append(f"matched L1: exact lasso codes on this dictionary reach L0 "
                         f"{self.matched.l0:.3g} at lambda = {self.matched.lam:.3g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def certify_sparse_sae(sae: SparseSAE, X: Any, *, k: int | None = None, eps: float | None = None,
                       max_samples: int | None = 4096, matched_l1: bool = True,
                       tol: float = 1e-9) -> SparseSAECertificate:
    r"""Certificates of Chapter 9 for a TopK / BatchTopK / JumpReLU SAE on activations ``X``.

    The SAE's codes on unit atoms (:meth:`SparseSAE.joint_view`) give the support-refit gap;
    their NNLS refit is the start of the local-move certificate and the point where the
    plain-centroid stationarity is measured; the matched-:math:`\lambda` L1 view uses the same
    dictionary at the SAE's mean L0. Moves are scored under TopK's ``k`` (default: the SAE's
    own ``k``) or JumpReLU's ``eps`` (default for a JumpReLU SAE: give it, e.g. the
    checkpoint's ``eps``); a BatchTopK SAE without ``eps`` is scored under a per-sample budget
    equal to its largest L0 (swaps only where a sample uses it all). ``max_samples`` takes the
    first rows only (the moves cost one small NNLS per candidate).
    """
    Xn = _np64(X, "X", 2)
    if max_samples is not None:
        Xn = Xn[:check_positive_int(max_samples, "max_samples")]
    Xc, D, Z = sae.joint_view(Xn)
    if k is None and eps is None:
        if sae.architecture == "topk":
            k = sae.k
        elif sae.architecture == "jumprelu":
            raise ValueError("give eps (the checkpoint's SparseCheckpoint.eps) for a JumpReLU SAE")
        else:
            k = max(int((Z > 0).sum(1).max(initial=1)), 1)
    l0 = float((Z > 0).sum(1).mean())
    ref = refit_gap(Xc, D, Z)
    Zr = nnls_refit(Xc, D, Z)
    moves = local_moves(Xc, D, Zr, k=k, eps=eps, tol=tol, refit=False)
    stat = plain_centroid_stationarity(Xc, D, Zr)
    matched = matched_lambda(Xc, D, l0) if (matched_l1 and l0 > 0) else None
    return SparseSAECertificate(architecture=sae.architecture, l0=l0,
                                k=None if k is None else float(k), eps=eps, refit=ref, moves=moves,
                                stationarity=stat, matched=matched, n_samples=int(Xn.shape[0]))
