r"""A large-dictionary convex problem: nonnegative sparse-group lasso over candidate atoms (Chapter 6).

Fix a set of unit candidate atoms ``C`` (rows, shape (n_candidates, n_features)) and solve

.. math::
    P(Z) = \frac1N\Big[\tfrac12\|X - ZC\|_F^2 + \lambda\,\mathbf 1^\top Z\mathbf 1\Big]
           + \mu \sum_k \|Z_{:,k}\|_2 ,\qquad Z \ge 0 ,

where column ``k`` of ``Z`` (the activations of candidate ``k`` on every sample) is one
group: ``μ`` is the price of opening an atom. In the column notation of THEORY §5 this is
the penalty on the *rows* :math:`z_k` of the ``K × N`` code matrix; the two agree.

**Dual** (Chapter 6, eq. ``eq-ch6-convex-dual``). With a dual variable ``U`` of the shape of ``X``,

.. math::
    D(U) = \frac1N\Big[\langle U, X\rangle - \tfrac12\|U\|_F^2\Big]
    \quad\text{s.t.}\quad \big\|(U c_k - \lambda)_+\big\|_2 \le N\mu\ \ \text{for every } k ,

whose maximiser is the optimal residual ``R* = X - Z*C``. For ``μ = 0`` the constraint reads
``c_kᵀ u_n ≤ λ`` for all ``n, k``: every residual lies in the polytope of T1. A feasible dual
point is obtained from any residual by scaling its rows, and ``P(Z) - D(U) ≥ 0``
certifies how far ``Z`` is from the global optimum.

**Solver** (``method="bcd"``, the default). Exact block coordinate descent over the
columns: because ``‖c_k‖ = 1`` the subproblem in one column ``w`` is
``min_{w≥0} ½‖w − v‖² + λ·1ᵀw + Nμ‖w‖`` (in units of ``N·P``) with ``v = R c_k + w_old``, solved exactly by the group
soft-threshold of the one-sided soft-threshold,
``w ← (1 − Nμ/‖u‖)_+ · u`` with ``u = (v − λ)_+``. Sweeps run over a working set (open
columns plus the most violated dual constraints). Coordinate descent identifies the support;
projected Newton steps on the open columns (the objective is smooth there apart from
``Z ≥ 0``) then finish, because nearly collinear candidates make first-order steps crawl. The
support Hessian is one small Gram block per sample plus one rank-one term per open column,
so each Newton system is solved exactly by the Woodbury identity at the cost of the
samples' blocks and an (open columns)² matrix. ``method="fista"`` uses
accelerated proximal gradient with the same prox (step ``1/λ_max(CᵀC)``), adaptive gradient
restarts and the same Newton finish: whole-matrix steps that suit a GPU, but on the CPU it
is far slower than ``bcd`` on coherent candidate sets (``bench/bench_convex.py --fista``).

**Certificate and screening.** Every ``check_every`` sweeps or iterations the residual is
turned into a feasible dual point by scaling its rows, and the duality gap is evaluated in
float64. The dual is ``1``-strongly concave after scaling by ``N``, so the optimal dual lies
in a ball of radius ``sqrt(2N·gap)`` around that point; every candidate whose constraint is
slack by more than the radius is provably unused (a Gap Safe rule) and leaves the problem.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ._validation import (as_tensor, check_codes, check_columns, check_dictionary,
                          check_nonnegative, check_positive, check_positive_int)
from .runtime import generator, progress_bar

__all__ = [
    "ConvexConvergenceWarning",
    "ConvexFit",
    "ConvexPath",
    "combine_candidates",
    "convex_dual_value",
    "convex_objective",
    "convex_path",
    "dictionary_atoms",
    "mu_max",
    "normalised_data",
    "pairwise_sums",
    "random_directions",
    "solve_convex",
    "used_atoms",
    "categorisation",
    "nested_fraction",
]


class ConvexConvergenceWarning(UserWarning):
    """Issued when :func:`solve_convex` stops before reaching the requested duality gap."""


@dataclass
class ConvexFit:
    """Solution of the candidate-atom convex problem with its duality certificate.

    Attributes
    ----------
    Z : array (n_samples, n_candidates)
        Nonnegative codes over the candidates.
    residual : array (n_samples, n_features)
        ``X - Z @ C``.
    dual_point : array (n_samples, n_features)
        A feasible point ``U`` of the dual (a rescaled residual).
    primal : float
        :math:`P(Z)`.
    dual : float
        :math:`D(U) \\le P^\\star \\le P(Z)`.
    gap : float
        ``primal - dual`` (≥ 0 up to rounding): the certified suboptimality.
    rel_gap : float
        ``gap / primal``.
    converged : bool
        ``rel_gap <= tol``.
    tol : float
        The requested relative gap.
    n_iter : int
        Coordinate-descent sweeps or proximal-gradient iterations.
    used : array of int
        Indices of candidates whose code column is nonzero (the atoms the solution opens).
    n_screened : int
        Candidates removed by the safe screening rule (provably unused at the optimum).
    lam, mu : float
        The penalties.
    """

    Z: Any
    residual: Any
    dual_point: Any
    primal: float
    dual: float
    gap: float
    rel_gap: float
    converged: bool
    tol: float
    n_iter: int
    used: Any
    n_screened: int
    lam: float
    mu: float

    @property
    def n_used(self) -> int:
        """Number of candidates the solution opens."""
        return int(len(self.used))


@dataclass
class ConvexPath:
    """A regularisation path in ``μ`` (solved from the largest ``μ`` down, warm-started).

    Attributes
    ----------
    mus : list of float
        The values of ``μ``, in the order given.
    fits : list of ConvexFit
        One certified solution per ``μ``.
    n_used : list of int
        Atoms opened at each ``μ``.
    """

    mus: list
    fits: list
    n_used: list = field(default_factory=list)


def _check_problem(X, C, lam, mu):
    lam = check_positive(lam, "lam")
    mu = check_nonnegative(mu, "mu")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Ct, _ = as_tensor(C, "C", ndim=2, like=Xt)
    check_columns(Ct, "C", Xt.shape[1], "X")
    if Ct.shape[0] == 0:
        raise ValueError("C must hold at least one candidate atom (row), got shape "
                         f"{tuple(Ct.shape)}")
    check_dictionary(Ct, "C")
    if Xt.shape[0] == 0:
        raise ValueError(f"X must hold at least one sample (row), got shape {tuple(Xt.shape)}")
    return Xt, Ct, kind, lam, mu


def _primal_scaled(R: torch.Tensor, Z: torch.Tensor, lam: float, nmu: float) -> float:
    """``N·P(Z)`` in float64: ½‖R‖² + λ·ΣZ + Nμ·Σ_k ‖Z[:,k]‖."""
    R64, Z64 = R.double(), Z.double()
    return float(0.5 * (R64 * R64).sum() + lam * Z64.sum() + nmu * Z64.norm(dim=0).sum())


def _dual_scaled(U: torch.Tensor, X: torch.Tensor) -> float:
    """``N·D(U)`` in float64: ⟨U, X⟩ - ½‖U‖²."""
    U64 = U.double()
    return float((U64 * X.double()).sum() - 0.5 * (U64 * U64).sum())


def _max_scale(S: torch.Tensor, lam: float, nmu: float) -> torch.Tensor:
    r"""Per column ``k`` of ``S = U Cᵀ`` the largest ``α ≥ 0`` with ``‖(α S[:,k] - λ)_+‖ ≤ Nμ``.

    ``φ(α) = ‖(α s - λ)_+‖`` is continuous and nondecreasing; between its breakpoints
    ``λ / s_(j)`` (entries sorted in decreasing order) exactly ``j`` entries are active and
    ``φ²`` is a quadratic in ``α``, so the root is found exactly: count the breakpoints at
    which ``φ ≤ Nμ`` and solve the quadratic of that piece. Columns without a positive entry
    never bind (``α = ∞``).
    """
    s, _ = torch.sort(S.double(), dim=0, descending=True)
    n = s.shape[0]
    pos = s > 0
    A = torch.cumsum(s * s, 0)
    B = torch.cumsum(s, 0)
    j = torch.arange(1, n + 1, dtype=s.dtype, device=s.device).unsqueeze(1)
    # φ² at the j-th breakpoint involves the j-1 larger entries.
    A_prev = A - s * s
    B_prev = B - s
    bp = lam / torch.where(pos, s, torch.ones_like(s))
    phi2 = bp * bp * A_prev - 2 * bp * lam * B_prev + (j - 1) * lam * lam
    below = pos & (phi2 <= nmu * nmu * (1 + 1e-12) + 1e-300)
    m = below.sum(0).clamp(min=1)  # breakpoints with φ ≤ Nμ (the first always is)
    idx = (m - 1).unsqueeze(0)
    Am = A.gather(0, idx).squeeze(0)
    Bm = B.gather(0, idx).squeeze(0)
    mf = m.to(s.dtype)
    disc = (lam * Bm) ** 2 - Am * (mf * lam * lam - nmu * nmu)
    alpha = (lam * Bm + disc.clamp(min=0).sqrt()) / Am.clamp(min=1e-300)
    return torch.where(pos[0], alpha, torch.full_like(alpha, math.inf))


def _certify(X, C, Z, R, lam, nmu):
    """Return (U, N·P, N·D, per-column ‖(U c_k - λ)_+‖) for the residual ``R``.

    The dual point scales each residual row: ``u_n = β_n r_n`` with
    ``β_n = min(b_n, max(α, λ / max_k c_kᵀr_n))``, where ``α`` is the largest feasible common
    scale and ``b_n = ⟨r_n, x_n⟩/‖r_n‖²`` maximises the row's dual term. A row scaled by
    ``λ / max_k c_kᵀr_n`` contributes nothing to any constraint and a row scaled by at most
    ``α`` contributes no more than under the common scale, so ``U`` is feasible.
    """
    S = (R @ C.T).double()
    R64, X64 = R.double(), X.double()
    amax = min(float(_max_scale(S, lam, nmu).min()), 1e300)
    smax = S.max(1).values
    row = torch.where(smax > 0, lam / smax.clamp(min=1e-300), torch.full_like(smax, math.inf))
    rr = (R64 * R64).sum(1)
    b = torch.where(rr > 0, (R64 * X64).sum(1) / rr.clamp(min=1e-300), torch.zeros_like(rr))
    beta = torch.minimum(b.clamp(min=0), torch.maximum(row, torch.full_like(row, amax)))
    U64 = beta.unsqueeze(1) * R64
    p = _primal_scaled(R, Z, lam, nmu)
    d = _dual_scaled(U64, X)
    phi = (beta.unsqueeze(1) * S - lam).clamp(min=0).norm(dim=0)
    return U64.to(R.dtype), p, d, phi


_WOODBURY_MAX = 2 ** 24  # entries of the (samples × support slots × open columns) array it needs


def _newton_direction(Ca, Za, M, g, nmu):
    """Newton direction (free entries ``M``, gradient ``g``) of ``N·P`` on the open columns of ``Za``.

    On a fixed support the ℓ1 term is linear and every open column has ``‖w‖ > 0``, so the
    objective is smooth with Hessian

    ``H = A − W S Wᵀ,   A = blockdiag_n(G_{S_n}) + Nμ·Diag(1/‖w_k‖),   S = Diag(Nμ/‖w_k‖)``

    (``G = C Cᵀ``; ``A`` has one small Gram block per sample, ``W`` has one column ``ŵ_k``
    per open column, restricted to the free entries). The samples' blocks are factored in
    one batch and ``H d = −g`` is solved exactly by the Woodbury identity, whose capacitance
    matrix ``S⁻¹ − WᵀA⁻¹W`` is only (open columns)²; where the padded ``W`` would be too large
    (``_WOODBURY_MAX``) conjugate gradients preconditioned with ``A`` solve it instead (the
    remainder has rank at most the number of open columns, so few iterations are needed).
    """
    n, ka = Za.shape
    Mf = M.to(Za.dtype)
    wnorm = Za.norm(dim=0).clamp(min=1e-300)
    what = Za / wnorm
    g = g * Mf
    G = Ca @ Ca.T
    cnt = M.sum(1)
    s = max(int(cnt.max()), 1)
    idx = torch.argsort((~M).to(torch.int8), dim=1, stable=True)[:, :s]   # support first
    valid = torch.arange(s, device=Za.device).unsqueeze(0) < cnt.unsqueeze(1)
    Gb = G[idx.unsqueeze(2), idx.unsqueeze(1)]
    if nmu > 0:
        Gb = Gb + torch.diag_embed(nmu / wnorm[idx])
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    eye = torch.eye(s, dtype=Za.dtype, device=Za.device).expand_as(Gb)
    Gb = torch.where(both, Gb, eye).double()
    Gb = Gb + 1e-12 * Gb.diagonal(dim1=1, dim2=2).mean(1).view(-1, 1, 1) * eye.double()
    L, info = torch.linalg.cholesky_ex(Gb)
    if bool((info != 0).any()):
        L, _ = torch.linalg.cholesky_ex(Gb + 1e-8 * eye.double())
    vmask = valid.to(torch.float64)

    def gather(v):
        return v.double().gather(1, idx) * vmask

    def scatter(vb):
        return torch.zeros_like(Za).scatter(1, idx, (vb * vmask).to(Za.dtype))

    if nmu > 0 and n * s * ka <= _WOODBURY_MAX:
        Wp = torch.zeros(n, s, ka, dtype=torch.float64, device=Za.device)
        Wp.scatter_(2, idx.unsqueeze(2), gather(what).unsqueeze(2))
        y = torch.cholesky_solve(gather(-g).unsqueeze(2), L)          # A⁻¹(−g), per sample
        AW = torch.cholesky_solve(Wp, L)                               # A⁻¹W, per sample
        Wf = Wp.reshape(n * s, ka)
        cap = torch.diag(wnorm.double() / nmu) - Wf.T @ AW.reshape(n * s, ka)
        rhs = Wf.T @ y.reshape(n * s, 1)
        # H ⪰ 0 makes the capacitance matrix positive semidefinite; a tiny ridge covers the
        # directions that nearly collinear candidates leave flat.
        cap = cap + 1e-12 * float(cap.diagonal().abs().mean()) * torch.eye(ka, dtype=cap.dtype,
                                                                             device=cap.device)
        Lc, info = torch.linalg.cholesky_ex(cap)
        c = torch.cholesky_solve(rhs, Lc) if int(info) == 0 else torch.linalg.lstsq(cap, rhs).solution
        return scatter(y.squeeze(2) + (AW @ c.unsqueeze(0)).squeeze(2))

    def precond(v):
        return scatter(torch.cholesky_solve(gather(v).unsqueeze(2), L).squeeze(2))

    def hess(v):
        Hv = (v @ Ca) @ Ca.T
        if nmu > 0:
            Hv = Hv + nmu * (v - what * (what * v).sum(0, keepdim=True)) / wnorm
        return Hv * Mf

    D = torch.zeros_like(Za)
    r = -g
    zt = precond(r)
    p = zt.clone()
    rz = float((r * zt).sum())
    r0 = float((r * r).sum())
    for _ in range(ka + 20):
        if float((r * r).sum()) <= 1e-26 * r0 or rz <= 0:
            break
        Hp = hess(p)
        pHp = float((p * Hp).sum())
        if pHp <= 0:
            break
        a = rz / pHp
        D = D + a * p
        r = r - a * Hp
        zt = precond(r)
        rz_new = float((r * zt).sum())
        p = zt + (rz_new / rz) * p
        rz = rz_new
    return D


def _newton_polish(X, Ca, Za, lam, nmu, steps=30):
    """Projected Newton (Bertsekas, 1982) on the open columns of ``Za`` (Chapter 6).

    On the open columns the objective is smooth apart from the bound ``Z ≥ 0``. Entries at
    (or within ``ε`` of) zero whose gradient pushes them down stay fixed; on the others a
    Newton step is taken (the fixed ones head for zero) and projected back onto ``Z ≥ 0``, halving it until the Armijo
    condition along the projection arc holds. Once the fixed set is the optimal one the
    steps converge quadratically; entries of open columns that should open are free
    because their gradient is negative. Columns that close stay closed (the caller's
    working set reopens them if the certificate asks). Returns the improved codes, or
    ``None`` when no step decreased the objective.
    """
    if Za.numel() == 0:
        return None
    f0 = _primal_scaled(X - Za @ Ca, Za, lam, nmu)
    best = None
    for _ in range(steps):
        wnorm = Za.norm(dim=0)
        openc = wnorm > 0
        what = Za / wnorm.clamp(min=1e-300)
        g = (-((X - Za @ Ca) @ Ca.T) + lam + nmu * what) * openc
        pg = Za - (Za - g).clamp(min=0)          # projected gradient
        eps = min(1e-4, float(pg.abs().max()))
        if eps == 0:
            break
        M = ((Za > eps) | (g < 0)) & openc
        if not bool(M.any()):
            break
        D = _newton_direction(Ca, Za, M, g, nmu)
        D = torch.where(M, D, -Za)               # fixed entries head for zero
        t, accepted = 1.0, False
        while t > 1e-12:
            Zt = (Za + t * D).clamp(min=0)
            ft = _primal_scaled(X - Zt @ Ca, Zt, lam, nmu)
            # Armijo along the arc: the Newton part on the free set, the gradient part on the fixed one
            if ft <= f0 + 1e-4 * float((g * (Zt - Za)).sum()):
                accepted = True
                break
            t *= 0.5
        if not accepted or not ft < f0:
            break
        Zt, ft = _close_columns(X, Ca, Zt, lam, nmu, ft)
        done = f0 - ft <= 1e-15 * abs(f0)
        Za, f0, best = Zt, ft, Zt
        if done:
            break
    return best


def _close_columns(X, Ca, Za, lam, nmu, f):
    """Close, one at a time, the open columns whose exact block minimiser (given the others)
    is zero, ``‖(R c_k + w_k − λ)_+‖ ≤ Nμ``: Newton steps only shrink such a column
    geometrically, because the group norm is not smooth at zero. Each closure is an exact
    block minimisation, so the objective does not increase. Returns the codes and ``N·P``."""
    if nmu <= 0:
        return Za, f
    R = X - Za @ Ca
    wn = Za.norm(dim=0)
    cand = ((wn > 0) & (((R @ Ca.T + Za) - lam).clamp(min=0).norm(dim=0) <= nmu)).nonzero().flatten()
    if cand.numel() == 0:
        return Za, f
    Za = Za.clone()
    for j in cand.tolist():
        if float(((R @ Ca[j] + Za[:, j]) - lam).clamp(min=0).norm()) <= nmu:
            R += torch.outer(Za[:, j], Ca[j])
            Za[:, j] = 0
    return Za, _primal_scaled(R, Za, lam, nmu)


def _prox(V: torch.Tensor, t_l1: float, t_grp: float) -> torch.Tensor:
    W = (V - t_l1).clamp(min=0)
    if t_grp > 0:
        nrm = W.norm(dim=0, keepdim=True)
        W = W * (1 - t_grp / nrm.clamp(min=1e-300)).clamp(min=0)
    return W


def _lipschitz(C: torch.Tensor) -> float:
    G = C.T @ C if C.shape[0] > C.shape[1] else C @ C.T
    return float(torch.linalg.eigvalsh(G.double()).max())


def _solve(X, C, lam, mu, tol, max_iter, check_every, Z0, screen, progress):
    n, k = X.shape[0], C.shape[0]
    nmu = n * mu
    Z = torch.zeros(n, k, dtype=X.dtype, device=X.device) if Z0 is None else Z0.clone()
    active = torch.arange(k, device=X.device)
    Ca, Za = C, Z
    step = 1.0 / _lipschitz(Ca)
    Y, t = Za.clone(), 1.0
    n_screened, it, polished_at = 0, 0, -1
    last_support = None
    bar = progress_bar(total=max_iter, progress=progress, desc="solve_convex") if progress else None
    while True:
        if it % check_every == 0 or it >= max_iter:
            Z = torch.zeros(n, k, dtype=X.dtype, device=X.device)
            Z[:, active] = Za
            R = X - Za @ Ca
            U, p, d, phi = _certify(X, C, Z, R, lam, nmu)
            gap = max(p - d, 0.0)
            rel = gap / p if p > 0 else 0.0
            if rel <= tol or it >= max_iter or active.numel() == 0:
                break
            if screen and nmu > 0:
                keep = (phi[active] + math.sqrt(2.0 * gap) >= nmu).nonzero().flatten()
                if keep.numel() < active.numel():
                    n_screened += int(active.numel() - keep.numel())
                    active = active[keep]
                    Ca, Za, Y = C[active], Za[:, keep], Y[:, keep]
                    if active.numel() == 0:
                        continue
                    step = 1.0 / _lipschitz(Ca)
            support = Za > 0
            if polished_at != it and last_support is not None and support.shape == last_support.shape \
                    and bool((support == last_support).all()):
                # Proximal gradient has settled on a support; Newton finishes the job there.
                Zp = _newton_polish(X, Ca, Za, lam, nmu)
                polished_at = it
                if Zp is not None:
                    Za, Y = Zp, Zp.clone()
                    last_support = None
                    continue
            last_support = support
        G = (Y @ Ca - X) @ Ca.T
        Z_new = _prox(Y - step * G, step * lam, step * nmu)
        # Restart the momentum when it points uphill (O'Donoghue & Candès' gradient test).
        if float(((Y - Z_new) * (Z_new - Za)).sum()) > 0:
            t, Y = 1.0, Z_new
        else:
            t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            Y = Z_new + ((t - 1) / t_new) * (Z_new - Za)
            t = t_new
        Za = Z_new
        it += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Z, R, U, p / n, d / n, gap / n, rel, it, n_screened


def _bcd(X, C, lam, mu, tol, max_iter, check_every, Z0, screen, progress, polish_below=1e-2):
    """Working-set block coordinate descent over candidate columns (exact block minimisation).

    Because ``‖c_k‖ = 1`` the subproblem in one column ``w = Z[:,k]`` is
    ``min_w ½‖w - (R c_k + w_old)‖² + λ1ᵀw + Nμ‖w‖``, solved exactly by the prox. Sweeps run
    over a working set (open columns plus the most violated dual constraints); the full
    problem's duality gap is checked every ``check_every`` sweeps, and screened columns leave
    for good.
    """
    n, k = X.shape[0], C.shape[0]
    nmu = n * mu
    Z = torch.zeros(n, k, dtype=X.dtype, device=X.device) if Z0 is None else Z0.clone()
    R = X - Z @ C
    alive = torch.ones(k, dtype=torch.bool, device=X.device)
    n_screened, it, polished_at = 0, 0, -1
    work: list = []
    bar = progress_bar(total=max_iter, progress=progress, desc="solve_convex") if progress else None
    while True:
        if it % check_every == 0 or it >= max_iter:
            R = X - Z @ C
            U, p, d, phi = _certify(X, C, Z, R, lam, nmu)
            gap = max(p - d, 0.0)
            rel = gap / p if p > 0 else 0.0
            if rel <= tol or it >= max_iter:
                break
            if screen and nmu > 0:
                dead = alive & (phi + math.sqrt(2.0 * gap) < nmu)
                n_screened += int(dead.sum())
                alive &= ~dead
                Z[:, dead] = 0
            # Working set: open columns plus the most violated constraints at the current residual.
            S = R @ C.T
            viol = (S - lam).clamp(min=0).norm(dim=0) - nmu
            viol[~alive] = -math.inf
            opened = (Z.norm(dim=0) > 0) & alive
            n_add = max(10, int(opened.sum()))
            cand = torch.topk(viol, min(n_add, k)).indices
            cand = cand[viol[cand] > 0]
            ws = torch.zeros(k, dtype=torch.bool, device=X.device)
            ws[opened] = True
            ws[cand] = True
            work = ws.nonzero().flatten().tolist()
            if polished_at != it and rel < polish_below:
                # Coordinate descent has (nearly) found the support; Newton finishes the job.
                polished_at = it
                cols = opened.nonzero().flatten()
                Zp = _newton_polish(X, C[cols], Z[:, cols], lam, nmu)
                if Zp is not None:
                    Z[:, cols] = Zp
                    R = X - Z @ C
                    continue
        _sweep(R, Z, C, work, lam, nmu)
        it += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Z, R, U, p / n, d / n, gap / n, rel, it, n_screened


def _sweep(R, Z, C, work, lam, nmu):
    """One sweep of exact column updates over ``work``, in place on ``R`` and ``Z``.

    On the CPU the loop runs on NumPy views of the same memory: its operations are tiny
    (one column at a time), and NumPy's per-call overhead is several times smaller than
    torch's. The expressions are valid for both array types.
    """
    if R.device.type == "cpu":
        R, Z, C = R.numpy(), Z.numpy(), C.numpy()
    for j in work:
        c = C[j]
        w = Z[:, j]
        v = (R @ c + w - lam).clip(min=0)
        if nmu > 0:
            nv = float((v * v).sum()) ** 0.5
            v = v * max(0.0, 1.0 - nmu / nv) if nv > 0 else v
        delta = v - w
        if bool((delta != 0).any()):
            R -= delta[:, None] * c[None, :]
            Z[:, j] = v


def solve_convex(
    X: Any,
    C: Any,
    lam: float,
    mu: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 20000,
    check_every: int = 10,
    Z0: Any = None,
    screen: bool = True,
    method: str = "bcd",
    progress: bool = False,
) -> ConvexFit:
    r"""Solve the nonnegative sparse-group lasso over candidate atoms, certified by a duality gap (Chapter 6).

    .. math::
        \min_{Z\ge 0}\ \frac1N\Big[\tfrac12\|X - ZC\|_F^2 + \lambda\,\mathbf 1^\top Z\mathbf 1\Big]
        + \mu\sum_k \|Z_{:,k}\|_2 .

    With ``μ = 0`` and ``C`` containing every normalised datapoint the optimum is the wide
    limit of T4 (loss = :func:`companion.huber_bound`); increasing ``μ`` merges points onto
    shared atoms.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Samples as rows.
    C : array (n_candidates, n_features)
        Unit-norm candidate atoms as rows (see :func:`normalised_data`, :func:`pairwise_sums`,
        :func:`random_directions`, :func:`dictionary_atoms`, :func:`combine_candidates`).
    lam : float
        The code penalty :math:`\lambda > 0`.
    mu : float
        The price of opening an atom, :math:`\mu \ge 0`.
    tol : float
        Requested relative duality gap ``(P - D) / P``. Reached in float64; in float32 the
        gap itself is evaluated in float64 but the iterates carry float32 rounding, so ask
        for ``1e-5`` or more there.
    max_iter : int
        Maximum sweeps (``bcd``) or proximal-gradient iterations (``fista``).
    check_every : int
        Sweeps or iterations between duality-gap evaluations (each costs one ``R Cᵀ`` product over
        all candidates and a sort of its columns).
    Z0 : array (n_samples, n_candidates), optional
        Nonnegative warm start.
    screen : bool
        Remove candidates that the Gap Safe rule proves unused (only when ``μ > 0``).
    method : {"bcd", "fista"}
        Block coordinate descent over columns (default; fastest on the CPU) or accelerated
        proximal gradient with restarts (whole-matrix steps, suited to GPUs); both finish
        with active-set Newton steps and stop on the same certificate.
    progress : bool
        Show a tqdm bar over iterations.

    Returns
    -------
    ConvexFit
        Codes, residual, a feasible dual point, primal and dual values and their gap.

    Warns
    -----
    ConvexConvergenceWarning
        When ``max_iter`` is reached before the relative gap falls below ``tol``.
    """
    Xt, Ct, kind, lam, mu = _check_problem(X, C, lam, mu)
    tol = check_positive(tol, "tol")
    max_iter = check_positive_int(max_iter, "max_iter")
    check_every = check_positive_int(check_every, "check_every")
    if method not in ("fista", "bcd"):
        raise ValueError(f"method must be 'fista' or 'bcd', got {method!r}")
    Z0t = None
    if Z0 is not None:
        Z0t, _ = as_tensor(Z0, "Z0", ndim=2, like=Xt)
        check_codes(Z0t, "Z0", (Xt.shape[0], Ct.shape[0]), columns="n_candidates")
    with torch.no_grad():
        solver = {"fista": _solve, "bcd": _bcd}[method]
        Z, R, U, p, d, gap, rel, it, n_scr = solver(Xt, Ct, lam, mu, tol, max_iter, check_every,
                                                    Z0t, screen, progress)
    converged = rel <= tol
    if not converged:
        warnings.warn(f"solve_convex stopped after max_iter={max_iter} iterations at relative "
                      f"duality gap {rel:.3g} > tol={tol:.3g}", ConvexConvergenceWarning,
                      stacklevel=2)
    used = (Z.norm(dim=0) > 0).nonzero().flatten()
    used_out = used.cpu().numpy() if kind.is_numpy else used
    return ConvexFit(Z=kind.out(Z), residual=kind.out(R), dual_point=kind.out(U), primal=p,
                     dual=d, gap=gap, rel_gap=rel, converged=converged, tol=tol, n_iter=it,
                     used=used_out, n_screened=n_scr, lam=lam, mu=mu)


def convex_objective(X: Any, C: Any, Z: Any, lam: float, mu: float) -> float:
    r"""The primal objective :math:`P(Z)` of :func:`solve_convex` (Chapter 6, eq. ``eq-ch6-convex-primal``)."""
    Xt, Ct, _, lam, mu = _check_problem(X, C, lam, mu)
    Zt, _ = as_tensor(Z, "Z", ndim=2, like=Xt)
    check_codes(Zt, "Z", (Xt.shape[0], Ct.shape[0]), columns="n_candidates")
    return _primal_scaled(Xt - Zt @ Ct, Zt, lam, Xt.shape[0] * mu) / Xt.shape[0]


def convex_dual_value(X: Any, C: Any, U: Any, lam: float, mu: float, *, atol: float = 1e-9) -> float:
    r"""The dual objective :math:`D(U) = \frac1N[\langle U,X\rangle - \tfrac12\|U\|^2]` (Chapter 6, eq. ``eq-ch6-convex-dual``).

    Raises ``ValueError`` if ``U`` violates a dual constraint
    :math:`\|(Uc_k - \lambda)_+\| \le N\mu` by more than ``atol`` (relative to ``max(1, Nμ)``),
    since only feasible points bound the optimum from below.
    """
    Xt, Ct, _, lam, mu = _check_problem(X, C, lam, mu)
    Ut, _ = as_tensor(U, "U", ndim=2, like=Xt)
    if Ut.shape != Xt.shape:
        raise ValueError(f"U must have the shape of X, {tuple(Xt.shape)}, got {tuple(Ut.shape)}")
    n = Xt.shape[0]
    phi = ((Ut @ Ct.T).double() - lam).clamp(min=0).norm(dim=0)
    excess = float((phi - n * mu).max())
    if excess > atol * max(1.0, n * mu):
        k = int((phi - n * mu).argmax())
        raise ValueError(f"U is not dual feasible: candidate {k} has ‖(U c_k - λ)_+‖ = "
                         f"{float(phi[k]):.6g} > Nμ = {n * mu:.6g}")
    return _dual_scaled(Ut, Xt) / n


def mu_max(X: Any, C: Any, lam: float) -> float:
    r"""Smallest ``μ`` at which ``Z = 0`` is optimal: :math:`\max_k \|(Xc_k - \lambda)_+\|_2 / N`.

    (``Z = 0`` leaves the residual ``X``; it is optimal iff ``X`` is dual feasible.)
    """
    Xt, Ct, _, lam, _ = _check_problem(X, C, lam, 0.0)
    return float(((Xt @ Ct.T).double() - lam).clamp(min=0).norm(dim=0).max()) / Xt.shape[0]


def convex_path(X: Any, C: Any, lam: float, mus: Sequence[float], **solve_kwargs: Any) -> ConvexPath:
    """Solve :func:`solve_convex` for every ``μ`` in ``mus``, from the largest down, warm-starting each
    from the previous solution (Chapter 6). Fits are returned in the order of ``mus``."""
    mus = [check_nonnegative(m, "mus") for m in mus]
    if not mus:
        raise ValueError("mus must contain at least one value")
    order = sorted(range(len(mus)), key=lambda i: -mus[i])
    fits: list = [None] * len(mus)
    Z0 = solve_kwargs.pop("Z0", None)
    for i in order:
        fits[i] = solve_convex(X, C, lam, mus[i], Z0=Z0, **solve_kwargs)
        Z0 = fits[i].Z
    return ConvexPath(mus=mus, fits=fits, n_used=[f.n_used for f in fits])


def _unit_rows(M: torch.Tensor, name: str) -> torch.Tensor:
    nrm = M.norm(dim=1, keepdim=True)
    keep = nrm.squeeze(1) > 0
    if not bool(keep.any()):
        raise ValueError(f"{name} has no nonzero rows to normalise")
    return M[keep] / nrm[keep]


def normalised_data(X: Any) -> Any:
    r"""Candidates :math:`x_n/\|x_n\|` (zero rows dropped): with ``μ = 0`` they realise the wide limit (T4)."""
    Xt, kind = as_tensor(X, "X", ndim=2)
    return kind.out(_unit_rows(Xt, "X"))


def pairwise_sums(X: Any, n_pairs: int | None = None, seed: int = 0) -> Any:
    r"""Candidates :math:`(x_i + x_j)/\|x_i + x_j\|` for pairs ``i < j``: all pairs, or ``n_pairs`` drawn
    without replacement from a seeded CPU generator. They point at two-point centroids (T2)."""
    Xt, kind = as_tensor(X, "X", ndim=2)
    n = Xt.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    if n_pairs is not None:
        n_pairs = check_positive_int(n_pairs, "n_pairs")
        if n_pairs < iu.shape[1]:
            pick = torch.randperm(iu.shape[1], generator=generator(seed))[:n_pairs]
            iu = iu[:, pick.sort().values]
    iu = iu.to(Xt.device)
    return kind.out(_unit_rows(Xt[iu[0]] + Xt[iu[1]], "pairwise sums of X"))


def random_directions(n: int, n_features: int, seed: int = 0, *, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` uniformly random unit directions (Gaussian rows, normalised), drawn on the CPU."""
    n = check_positive_int(n, "n")
    n_features = check_positive_int(n_features, "n_features")
    G = torch.randn(n, n_features, generator=generator(seed), dtype=dtype)
    return (G / G.norm(dim=1, keepdim=True)).to(device if device is not None else "cpu")


def dictionary_atoms(D: Any) -> Any:
    """The atoms of a learned dictionary (rows of ``D``), normalised, as candidates."""
    Dt, kind = as_tensor(D, "D", ndim=2)
    return kind.out(_unit_rows(Dt, "D"))


def combine_candidates(*sets: Any, atol: float = 1e-9) -> Any:
    """Stack candidate sets and drop duplicates (rows whose cosine with an earlier row exceeds
    ``1 - atol``), keeping the first occurrence."""
    if not sets:
        raise ValueError("combine_candidates needs at least one candidate set")
    first, kind = as_tensor(sets[0], "sets[0]", ndim=2)
    parts = [first] + [as_tensor(s, f"sets[{i + 1}]", ndim=2, like=first)[0]
                       for i, s in enumerate(sets[1:])]
    for i, p in enumerate(parts):
        check_columns(p, f"sets[{i}]", first.shape[1], "sets[0]")
    C = _unit_rows(torch.cat(parts, 0), "the candidates")
    cos = C @ C.T
    dup = torch.triu(cos > 1 - atol, diagonal=1).any(0)
    return kind.out(C[~dup])


def used_atoms(fit: ConvexFit, C: Any) -> Any:
    """The candidates a solution opens, as a dictionary (rows), in the kind of ``C``."""
    Ct, kind = as_tensor(C, "C", ndim=2)
    idx = torch.as_tensor(np.asarray(fit.used) if not isinstance(fit.used, torch.Tensor) else fit.used,
                          device=Ct.device, dtype=torch.long)
    return kind.out(Ct[idx])


def categorisation(fit: ConvexFit) -> np.ndarray:
    """Group label of every sample: the opened candidate with its largest code (``-1`` if none).

    Along a regularisation path these partitions are the categorisations the convex problem
    draws (Chapter 6); labels are candidate indices, so equal labels at two values of ``μ``
    mean the same atom.
    """
    Z = fit.Z.detach().cpu().numpy() if isinstance(fit.Z, torch.Tensor) else np.asarray(fit.Z)
    lab = Z.argmax(1)
    lab[Z.max(1) <= 0] = -1
    return lab


def nested_fraction(fine: np.ndarray, coarse: np.ndarray) -> float:
    """Fraction of the groups of ``fine`` whose samples all share one group of ``coarse``
    (1.0 when the finer partition refines the coarser one)."""
    fine, coarse = np.asarray(fine), np.asarray(coarse)
    if fine.shape != coarse.shape:
        raise ValueError(f"fine and coarse must label the same samples, got shapes {fine.shape} and {coarse.shape}")
    groups = np.unique(fine)
    inside = [len(np.unique(coarse[fine == g])) == 1 for g in groups]
    return float(np.mean(inside)) if inside else 1.0
