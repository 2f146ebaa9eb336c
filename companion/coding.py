"""Exact nonnegative-lasso codes (THEORY §1, T1; derived in Chapter 2).

For a unit-norm dictionary ``D`` (atoms are rows) and penalty ``λ > 0`` the exact code of a
sample ``x`` is

.. math::
    z^\\star(x) = \\operatorname{argmin}_{z \\ge 0}\\ \\tfrac12\\|x - zD\\|^2 + \\lambda\\,\\mathbf 1^\\top z ,

and T1 says that ``z ≥ 0`` is optimal iff the residual ``r = x - zD`` satisfies
``d_kᵀr ≤ λ`` for every atom, with equality wherever ``z_k > 0``.

The solver is a batched Lawson–Hanson active-set method. Every row keeps a small support
``S`` (a padded index tensor); all rows solve their support systems
``D_S D_Sᵀ z_S = D_S x - λ1`` at once (Gram sub-blocks gathered from ``D Dᵀ``, batched
Cholesky). Where a solve has nonpositive entries, two candidates are formed: the
Lawson–Hanson interpolation step (stop at the first entry that reaches zero, drop it) and a
bolder one (drop every nonpositive entry, solve again). The bold candidate is taken where it
is feasible and no worse, which usually ends the inner loop in one step; otherwise the
Lawson–Hanson step is taken. Either way every iterate is feasible and the objective never
increases. Long supports are factorised in groups of rows of similar support size (a batched
factorisation costs the cube of the padded width a row), and where the Gram matrix was not
formed up front it is formed once the support blocks computed from the atoms cost as much.
The KKT condition off the support is checked once per outer iteration on the correlations
``Dr`` (for short supports updated from the Gram matrix, ``Dx - G_S z_S``; otherwise one
``r Dᵀ`` product) and the most violating atoms are added (``add_per_iter`` a round; rows
with supports of 8 atoms or more whose additions all survive are offered twice as many next
round, so codes with tens of active atoms need several rounds fewer). Rows that have
converged leave the batch. Rows that stall (rank-deficient or near-collinear supports) are
finished by projected-gradient (FISTA) steps on the full dictionary. Rows are streamed in
chunks, so peak memory is set by ``chunk_size`` and not by the number of samples.

On the CPU the dense products (``X Dᵀ``, ``r Dᵀ``, ``z_S G_S``, ``D Dᵀ``) run on torch's
intra-op threads and everything between them on one thread: those kernels are hundreds of
small batched operations a call, each too small to gain from a second thread, and on a busy
machine every parallel region can wait for a descheduled OpenMP worker (measured on bench
problem (a), 2 threads, load ~6: 1.8 s median with every operation threaded, 0.22 s like
this; the codes are the same bits).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, asdict
from typing import Any

import numpy as np
import torch

from ._validation import (as_tensor, check_codes, check_columns, check_dictionary, check_positive,
                          check_positive_int)
from .runtime import cpu_threads, progress_bar

__all__ = [
    "ConvergenceWarning",
    "EncodeInfo",
    "encode",
    "nonneg_lasso_value",
    "default_chunk_size",
    "default_tol",
]


class ConvergenceWarning(UserWarning):
    """Raised (as a warning) when a solver stops before reaching its stated tolerance."""


@dataclass
class EncodeInfo:
    """Diagnostics of one :func:`encode` call.

    Attributes
    ----------
    n_iter : int
        Largest number of outer active-set iterations used by any chunk of rows.
    max_kkt_violation : float
        Largest T1 violation over all rows:
        ``max(max_k (d_kᵀr - λ)₊ off the support, max_k |d_kᵀr - λ| on the support)``
        (codes are nonnegative by construction).
    converged : bool
        Whether every row met ``tol``: its T1 violation is at most ``tol · λ``.
    tol : float
        The tolerance that was asked for, in units of λ.
    n_fallback_rows : int
        Rows the active-set method could not finish, handed to projected-gradient steps.
    max_support : int
        Largest number of nonzero entries in a row of the codes.
    kkt_violation_lam : float
        ``max_kkt_violation / λ``: T1 in units of λ.
    n_unconverged_rows : int
        Rows whose T1 violation exceeds ``tol · λ``.
    n_dtype_limited_rows : int
        Of those, rows solved to the rounding level of the working dtype, which cannot
        resolve ``tol · λ`` for them (``4 eps ‖x_n‖ > tol · λ``, or an active set that stalls
        at the rounding level of an ill-conditioned support).
    dtype_limited_norm : float
        Largest ``‖x_n‖`` among those rows (0 when there are none).
    dtype_limited_lam : float
        Largest T1 violation among those rows, in units of λ (0 when there are none).
    """

    n_iter: int
    max_kkt_violation: float
    converged: bool
    tol: float
    n_fallback_rows: int
    max_support: int
    kkt_violation_lam: float = 0.0
    n_unconverged_rows: int = 0
    n_dtype_limited_rows: int = 0
    dtype_limited_norm: float = 0.0
    dtype_limited_lam: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def default_tol(X: torch.Tensor | None = None) -> float:
    """Default T1 tolerance **in units of λ**: ``1e-8`` (float64) or ``1e-3`` (float32).

    Every row ``n`` is held to ``max_k viol_nk <= tol · λ`` on its own (no row is judged on
    the scale of another). ``X`` only selects the dtype.
    """
    return 1e-3 if X is not None and X.dtype == torch.float32 else 1e-8


def default_chunk_size(n_atoms: int) -> int:
    """Rows per chunk so that one (chunk, n_atoms) work array holds about 2**23 entries."""
    return int(max(256, min(8192, (1 << 23) // max(1, n_atoms))))


def _row_norms(X: torch.Tensor) -> torch.Tensor:
    """``‖x_n‖`` without overflow of the squares (rows scaled by their max if needed)."""
    nrm = X.norm(dim=1)
    if not X.shape[1] or bool(torch.isfinite(nrm).all()):
        return nrm
    s = X.abs().amax(1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (X / s).norm(dim=1) * s.squeeze(1)


# ----------------------------------------------------------------------------------------
# batched active-set kernel (no input checks)
# ----------------------------------------------------------------------------------------

#: Largest dictionary (in Gram entries) whose Gram matrix ``D Dᵀ`` is formed once per call;
#: its support sub-blocks are then gathered instead of recomputed from the atoms, and the
#: correlations of sparse codes are updated from it (``c₀ - z_S G_S``).
_GRAM_ENTRIES = 1 << 26

#: Rounding floor of T1 in units of the dtype's epsilon: the correlations ``d_kᵀr`` of a
#: row are computed to about ``eps · ‖x_n‖`` (measured: median 1, 99th percentile 2–3 on
#: random dictionaries), so a row is never asked for less than ``_FLOOR · eps · ‖x_n‖``.
#: A row that stalls within ``_STALL_FLOOR · eps · (‖x_n‖ + ‖z_n‖₁)`` of its tolerance is at
#: the resolution of its dtype (ill-conditioned supports amplify rounding) and stops there.
_FLOOR = 4.0
_STALL_FLOOR = 256.0

#: Long supports grow faster: a row whose support has at least ``_GROW_FROM`` atoms and
#: whose every offered atom survived (in a round after the first, whose atoms were screened
#: from ``Dx`` alone) is offered twice as many next round, at most ``_MAX_ADD`` and at most
#: up to ``n_features // _ROOM_DIV`` atoms in all (supports near ``n_features`` are
#: ill-conditioned, and there added atoms mostly drop out again).
_GROW_FROM = 8
_MAX_ADD = 32
_ROOM_DIV = 4

#: Supports at least ``_BUCKET_WIDTH`` wide are factorised in up to ``_BUCKETS`` groups of
#: rows of similar support size, each group at least ``_BUCKET_ROWS`` rows.
_BUCKET_WIDTH = 24
_BUCKETS = 8
_BUCKET_ROWS = 32

#: The correlations of a sparse iterate come from the Gram matrix while its rows hold at
#: most ``n_features // _GRAM_DIV`` atoms on average (a sparse product then costs less than
#: the residual product ``r Dᵀ``), else from the residual.
_GRAM_DIV = 4


class _Dict:
    """What the kernel needs of a dictionary: the atoms with one zero padding atom (index
    ``k``) appended and, for dictionaries that are not too large, the Gram matrix
    ``Ge = De Deᵀ`` (whose padding row and column are zero).

    ``n_rows`` (the rows to be encoded, when known) defers the Gram matrix where forming it
    (``k² d``) would cost more than a product with the rows (``n k d``); it is formed later
    if the support blocks computed from the atoms come to cost as much (long supports).
    """

    def __init__(self, D: torch.Tensor, n_rows: int | None = None):
        self.k, self.d = D.shape
        self.pad = self.k
        self.k1 = self.k + 1
        # the dense products (X Dᵀ, r Dᵀ, sparse z G, D Dᵀ) run on the CPU threads in force
        # here; the active-set kernels between them on one (see _encode_tensor)
        self.threads = torch.get_num_threads() if D.device.type == "cpu" else None
        self.De = torch.cat([D, D.new_zeros(1, self.d)], 0)
        self.G = self.Gf = None
        self.spent = 0                  # Gram entries computed from the atoms so far
        if self.k1 * self.k1 <= _GRAM_ENTRIES and (n_rows is None or self.k1 <= 2 * n_rows):
            self._form_gram()

    def _form_gram(self) -> None:
        with cpu_threads(self.threads):
            self.G = self.De @ self.De.T
        self.Gf = self.G.view(-1)

    def gram(self, idx: torch.Tensor) -> torch.Tensor:
        """Support Gram blocks ``D_S D_Sᵀ`` (m, w, w), identity on padding entries."""
        m, w = idx.shape
        if self.Gf is None and self.k1 * self.k1 <= _GRAM_ENTRIES:
            # long supports: once their blocks have cost as much as the whole Gram matrix,
            # form it (later blocks and the correlations are then gathered from it)
            self.spent += m * w * w
            if self.spent > self.k1 * self.k1:
                self._form_gram()
        if self.Gf is not None:
            flat = (idx * self.k1).unsqueeze(2) + idx.unsqueeze(1)
            A = self.Gf.index_select(0, flat.reshape(-1)).view(m, w, w)
        else:
            DS = self.atoms(idx)
            A = torch.bmm(DS, DS.transpose(1, 2))
        A.diagonal(dim1=1, dim2=2).add_((idx == self.pad).to(A.dtype))
        return A

    def atoms(self, idx: torch.Tensor) -> torch.Tensor:
        """``De[idx]`` as (m, w, d) (padding → the zero atom)."""
        return self.De.index_select(0, idx.reshape(-1)).view(idx.shape[0], idx.shape[1], self.d)

    def residual(self, X: torch.Tensor, idx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``X - Σ_j z_j d_{idx_j}`` for padded supports."""
        R = X.clone()
        for j in range(idx.shape[1]):      # one gathered atom per support slot
            R.addcmul_(self.De.index_select(0, idx[:, j]), z[:, j:j + 1], value=-1)
        return R

    def correlations(self, X: torch.Tensor, C: torch.Tensor, rows: torch.Tensor | None,
                     idx: torch.Tensor, z: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """``d_kᵀ r`` for every atom (and λ in the padding column) of the rows ``rows`` of
        ``X`` (``None``: all of them), written into ``work[:m]`` (a buffer of at least m
        rows of width k+1, reused every round: a fresh tensor of this size each round cost
        bench problem (a) 4–8 thousand more page faults a call, about a tenth of its time).

        ``C = [X Dᵀ, λ]``. Short supports: ``C - z_S G_S`` (a sparse product on
        the CPU, gathered Gram rows elsewhere; ``O(k |S|)`` a row); long ones or no Gram
        matrix: the residual product ``r Deᵀ`` (``O(k d)``), padding column set back to λ.
        Either way each entry is a fixed sum in a fixed order: bitwise the same whatever the
        number of threads.
        """
        m, w = idx.shape
        valid = idx < self.pad
        counts = valid.sum(1)
        if self.G is not None and int(counts.sum()) * _GRAM_DIV <= m * self.d:
            out = work[:m]
            if rows is None:
                out.copy_(C)
            else:
                torch.index_select(C, 0, rows, out=out)
            if C.device.type == "cpu":
                crow = torch.zeros(m + 1, dtype=torch.long)
                torch.cumsum(counts, 0, out=crow[1:])
                with warnings.catch_warnings():          # "sparse CSR support is in beta"
                    warnings.simplefilter("ignore", UserWarning)
                    A = torch.sparse_csr_tensor(crow, idx[valid], z[valid], size=(m, self.k1),
                                                check_invariants=False)
                    with cpu_threads(self.threads):
                        return out.addmm_(A, self.G, alpha=-1)
            for j in range(w):
                out.addcmul_(self.G.index_select(0, idx[:, j]), z[:, j:j + 1], value=-1)
            return out
        Xr = X if rows is None else X.index_select(0, rows)
        R = self.residual(Xr, idx, z)
        out = work[:m]
        with cpu_threads(self.threads):
            torch.mm(R, self.De[:self.k].T, out=out[:, :self.k])
        out[:, self.k] = C[0, self.k]
        return out


def _sort_support(idx: torch.Tensor, z: torch.Tensor, pad: int, *extra: torch.Tensor):
    """Sort each row's support (padding ``pad`` last) and trim the common width."""
    if idx.shape[1] == 0:
        return (idx, z, *extra)
    idx, order = idx.sort(dim=1)
    z = z.gather(1, order)
    extra = tuple(e.gather(1, order) for e in extra)
    width = int((idx < pad).sum(1).max()) if idx.numel() else 0
    return (idx[:, :width].contiguous(), z[:, :width].contiguous(),
            *[e[:, :width].contiguous() for e in extra])


def _spd_solve(A: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve the batched SPD systems ``A s = b`` by Cholesky; singular blocks get a ridge."""
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if bool(bad.any()):                   # rank-deficient support: small ridge
        eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
        Ab = A[bad] + ridge * eye
        Lb, infob = torch.linalg.cholesky_ex(Ab)
        still = infob != 0
        if bool(still.any()):
            Lb[still] = torch.linalg.cholesky(Ab[still] + (1e4 * ridge + 1e-6) * eye)
        L = L.clone()
        L[bad] = Lb
    return torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2)


def _lawson_hanson_inner(Dc, Cf, rowmap, idx, z, lam, ridge, new=None):
    """Lawson–Hanson inner loop on every row at once.

    From a feasible ``z ≥ 0`` on the padded support ``idx`` (padding index ``Dc.pad``),
    reach the nonnegative minimiser of each row's support problem
    ``min_{z_S ≥ 0} ½ z_Sᵀ G_SS z_S - (c_S - λ)ᵀ z_S``: solve the unconstrained system; if
    some entries are not positive, step from ``z`` towards the solution as far as
    feasibility allows and drop the entries that reach zero; repeat. The objective never
    increases. ``Cf`` is the flattened ``[X Dᵀ, λ]`` of the chunk (row stride ``k + 1``)
    and ``rowmap`` maps local rows to its rows. ``idx``, ``z`` and ``new`` are updated in
    place (dropped entries become padding with ``z = 0``) and returned.
    """
    m, w = idx.shape
    pad = Dc.pad
    if new is None:
        new = torch.zeros_like(idx, dtype=torch.bool)
    if w == 0 or m == 0:
        return idx, z, new
    A0 = Dc.gram(idx)                                           # (m, w, w)
    flat = (rowmap * Dc.k1).unsqueeze(1) + idx
    b0 = Cf.index_select(0, flat.reshape(-1)).view(m, w) - lam  # c_S - λ; 0 on padding
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    todo = None                                                 # None: every row
    for _ in range(w + 2):
        if todo is None:
            it, zt, A, b = idx, z, A0, b0
        else:
            it, zt = idx[todo], z[todo]
            vf = (it < pad).to(z.dtype)
            A = A0[todo] * vf.unsqueeze(2) * vf.unsqueeze(1)
            A.diagonal(dim1=1, dim2=2).add_(1 - vf)
            b = b0[todo] * vf
        valid = it < pad
        s = _spd_solve(A, b, ridge)
        neg = (s <= 0) & valid
        anyneg = neg.any(1)
        if todo is None:
            rows_all = torch.arange(m, device=idx.device)
        else:
            rows_all = todo
        if not bool(anyneg.any()):
            z[rows_all] = torch.where(valid, s, zero)
            break
        done = ~anyneg
        if bool(done.any()):
            z[rows_all[done]] = torch.where(valid[done], s[done], zero)
        sel = torch.nonzero(anyneg).squeeze(1)
        rows = rows_all.index_select(0, sel)
        zt, st, nt, vt, itn = (t.index_select(0, sel) for t in (zt, s, neg, valid, it))
        At, bt = A.index_select(0, sel), b.index_select(0, sel)
        denom = zt - st
        ratio = torch.where(nt, zt / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.full_like(zt, math.inf))
        alpha, amin = ratio.min(1)
        alpha = alpha.clamp(0, 1).unsqueeze(1)
        znew = zt + alpha * (st - zt)
        # Lawson–Hanson: drop the entries the step drove to zero (not the fresh atoms that
        # merely start at zero with a positive direction: they grow in the next solve)
        drop = (znew <= 0) & vt & (nt | (zt > 0))
        drop.scatter_(1, amin.unsqueeze(1), True)
        znew = torch.where(drop | ~vt, zero, znew)
        # a bolder candidate: drop every entry the solve made nonpositive and solve again;
        # taken only where it is feasible and no worse than the Lawson–Hanson step, so the
        # objective still never increases (and the row is finished: it is the minimiser
        # on its support)
        keep = vt & ~nt
        kf = keep.to(z.dtype)
        A2 = At * kf.unsqueeze(2) * kf.unsqueeze(1)
        A2.diagonal(dim1=1, dim2=2).add_(1 - kf)
        s2 = torch.where(keep, _spd_solve(A2, bt * kf, ridge), zero)
        q = lambda u: 0.5 * (u * torch.bmm(At, u.unsqueeze(2)).squeeze(2)).sum(1) - (bt * u).sum(1)
        bold = ((s2 > 0) | ~keep).all(1) & (q(s2) <= q(znew))
        drop = torch.where(bold.unsqueeze(1), vt & ~keep, drop)
        znew = torch.where(bold.unsqueeze(1), s2, znew)
        idx[rows] = torch.where(drop, torch.full_like(itn, pad), itn)
        z[rows] = znew
        new[rows] = new[rows] & ~drop
        todo = rows[~bold]
        if todo.numel() == 0:
            break
    return idx, z, new


def _positive_support(Dc, Cf, rowmap, idx, z0, lam, ridge):
    """From a warm start ``z0`` on its support ``idx`` (padded), a support on which the
    least-squares solution is positive, and that solution: solve
    ``D_S D_Sᵀ z_S = D_S x - λ1`` and drop every nonpositive entry, until none is left
    (each pass drops at least one atom a row). The result is feasible and the minimiser on
    its support, which is all the active-set rounds need (an atom dropped wrongly is added
    back by them): a warm start's wrong atoms (an SAE's codes carry many) leave in a few
    passes, where Lawson–Hanson steps drop one at a time, a factorisation each. Rows where
    this ends worse than ``z0`` itself take the Lawson–Hanson descent from ``z0`` instead,
    so no row is worse than its warm start."""
    m, w = idx.shape
    pad = Dc.pad
    z = torch.zeros(idx.shape, dtype=Cf.dtype, device=Cf.device)
    if w == 0 or m == 0:
        return idx, z
    idx0 = idx.clone()
    A0 = Dc.gram(idx)
    flat = (rowmap * Dc.k1).unsqueeze(1) + idx
    b0 = Cf.index_select(0, flat.reshape(-1)).view(m, w) - lam
    todo = torch.arange(m, device=idx.device)
    for _ in range(w + 1):
        it = idx[todo]
        vf = (it < pad).to(z.dtype)
        A = A0[todo] * vf.unsqueeze(2) * vf.unsqueeze(1)
        A.diagonal(dim1=1, dim2=2).add_(1 - vf)
        sol = _spd_solve(A, b0[todo] * vf, ridge)
        neg = (sol <= 0) & (it < pad)
        z[todo] = torch.where(neg | (it == pad), 0, sol)
        idx[todo] = torch.where(neg, pad, it)
        more = neg.any(1)
        if not bool(more.any()):
            break
        todo = todo[more]
    q = lambda u: 0.5 * (u * torch.bmm(A0, u.unsqueeze(2)).squeeze(2)).sum(1) - (b0 * u).sum(1)
    worse = torch.nonzero(q(z) > q(z0)).squeeze(1)
    if worse.numel():
        iw, zw, _ = _lawson_hanson_inner(Dc, Cf, rowmap[worse], idx0[worse], z0[worse].clone(),
                                         lam, ridge)
        idx[worse], z[worse] = iw, zw
    return idx, z


def _lawson_hanson(Dc, Cf, rowmap, idx, z, lam, ridge, new=None):
    """:func:`_lawson_hanson_inner` on groups of rows of similar support size.

    A batched factorisation costs ``w³`` a row at the padded width ``w``; where supports
    differ in length, rows sorted by support size are solved in up to ``_BUCKETS`` groups,
    each at its own width (the result is the same row by row)."""
    m, w = idx.shape
    if new is None:
        new = torch.zeros_like(idx, dtype=torch.bool)
    if w < _BUCKET_WIDTH or m < 2 * _BUCKET_ROWS:
        return _lawson_hanson_inner(Dc, Cf, rowmap, idx, z, lam, ridge, new)
    pad = Dc.pad
    count = (idx < pad).sum(1)
    order = torch.sort(count, stable=True).indices
    n_groups = min(_BUCKETS, m // _BUCKET_ROWS)
    bounds = [m * g // n_groups for g in range(n_groups + 1)]
    out_idx = torch.full_like(idx, pad)
    out_z = torch.zeros_like(z)
    out_new = torch.zeros_like(new)
    for a, b in zip(bounds[:-1], bounds[1:]):
        g = order[a:b]
        ig, zg, ng = _sort_support(idx[g], z[g], pad, new[g])
        ig, zg, ng = _lawson_hanson_inner(Dc, Cf, rowmap[g], ig, zg, lam, ridge, ng)
        wg = ig.shape[1]
        out_idx[g, :wg], out_z[g, :wg], out_new[g, :wg] = ig, zg, ng
    return out_idx, out_z, out_new


def _supports_of(Z0: torch.Tensor, pad: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded supports ``(idx, z)`` of the positive entries of each row of ``Z0`` (at most
    its ``cap`` largest entries a row)."""
    m = Z0.shape[0]
    pos = Z0 > 0
    if m and int(pos.sum(1).max()) > cap:
        thr = Z0.topk(cap, dim=1).values[:, -1:]
        pos &= Z0 >= thr
        over = pos.sum(1) > cap                       # ties at the threshold: keep the first
        if bool(over.any()):
            rank = torch.cumsum(pos.to(torch.long), 1)
            pos &= rank <= cap
    r, c = torch.nonzero(pos, as_tuple=True)
    counts = torch.bincount(r, minlength=m)
    w = int(counts.max()) if r.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(r.numel(), device=Z0.device) - starts[r]
    idx = torch.full((m, w), pad, dtype=torch.long, device=Z0.device)
    z = Z0.new_zeros(m, w)
    idx[r, slot] = c
    z[r, slot] = Z0[r, c]
    return idx, z


def _fista_rows(X: torch.Tensor, D: torch.Tensor, Z: torch.Tensor, lam: float,
                tol: torch.Tensor, max_iter: int, Lip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected-gradient (FISTA with restart) on the full dictionary for a few rows.

    ``tol``: each row's tolerance. Returns codes and each row's KKT violation.
    """
    step = 1.0 / Lip
    Y = Z.clone()
    t = 1.0
    Zold = Z.clone()
    for it in range(max_iter):
        grad = lam - (X - Y @ D) @ D.T
        Znew = torch.clamp(Y - step * grad, min=0)
        tn = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        # gradient-based restart
        restart = ((Znew - Zold) * (Y - Znew)).sum(1) > 0
        beta = (t - 1) / tn
        Y = Znew + beta * (Znew - Zold)
        Y[restart] = Znew[restart]
        if bool(restart.any()):
            tn = 1.0 if bool(restart.all()) else tn
        Zold, t = Znew, tn
        if (it % 20 == 19 or it == max_iter - 1) and \
                bool((_kkt_violation_dense(X, D, Znew, lam) <= tol).all()):
            break
    return Zold, _kkt_violation_dense(X, D, Zold, lam)


def _kkt_violation_dense(X, D, Z, lam):
    g = lam - (X - Z @ D) @ D.T     # = λ - d_kᵀ r
    v = torch.where(Z > 0, g.abs(), (-g).clamp(min=0))
    return v.max(1).values


#: torch's CPU ``topk`` is several times slower above this many entries a row (measured on
#: 4096 × 513: 5 ms for 8, 18 ms for 9), so more are taken only on the rows that ask for them.
_TOPK_FAST = 8


def _top_entries(corr: torch.Tensor, nadd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``nadd[i]`` largest entries of each row ``i`` of ``corr`` (values and columns,
    largest first), padded to ``max(nadd)`` columns (entries past a row's own count are
    ``-inf`` or arbitrary and are not used)."""
    p = int(nadd.max())
    if p == 1:
        return corr.max(1, keepdim=True)
    q = min(p, _TOPK_FAST)
    top_val, top_idx = corr.topk(q, dim=1)
    if p > q:
        more = torch.nonzero(nadd > q).squeeze(1)
        v, i = corr.index_select(0, more).topk(p, dim=1)
        top_val = torch.cat([top_val, top_val.new_full((top_val.shape[0], p - q), -math.inf)], 1)
        top_idx = torch.cat([top_idx, top_idx.new_zeros(top_idx.shape[0], p - q)], 1)
        top_val[more], top_idx[more] = v, i
    return top_val, top_idx


def _encode_chunk(X, Dc, lam, tol, max_iter, Z0, p_first, p_add, ridge, fallback_iter, Zout):
    """Encode one chunk of rows into ``Zout`` (zeros, (m, k)).

    ``tol``: each row's (absolute) tolerance, shape (m,). Returns ``(n_iter, viol, cut,
    max_support)``: rounds used, each row's final T1 violation, a mask of the rows the
    active-set method did not finish (round limit, or a stall above the rounding floor),
    which went to the projected-gradient fallback unless ``fallback_iter == 0``, and the
    largest support.
    """
    m = X.shape[0]
    k, pad = Dc.k, Dc.pad
    dev, dt = X.device, X.dtype
    eps = torch.finfo(dt).eps
    C = X.new_empty(m, k + 1)          # (m, k+1): d_kᵀ x, padding column set to λ
    with cpu_threads(Dc.threads):
        torch.mm(X, Dc.De[:k].T, out=C[:, :k])   # (a product of odd width k+1 is slower)
    C[:, k] = lam
    Cf = C.view(-1)
    work = torch.empty_like(C)         # the correlations of every round, written in place
    xnorm = _row_norms(X)
    done_rows, done_idx, done_z = [], [], []               # finished rows, scattered at the end
    viol_out = torch.zeros(m, dtype=dt, device=dev)
    cut = torch.zeros(m, dtype=torch.bool, device=dev)
    allrows = torch.arange(m, device=dev)

    # initial supports: a warm start's, where its least-squares solution is positive
    first = p_first
    if Z0 is not None and bool((Z0 > 0).any()):
        idx, z = _supports_of(Z0, pad, max(32, Dc.d // 8))
        idx, z = _positive_support(Dc, Cf, allrows, idx, z, lam, ridge)
        idx, z = _sort_support(idx, z, pad)
        first = None
    else:
        idx = torch.full((m, 0), pad, dtype=torch.long, device=dev)
        z = C.new_zeros(m, 0)

    act = allrows                      # rows still iterating; idx, z follow them
    padd = torch.full((m,), p_add, dtype=torch.long, device=dev)
    if first is None:               # a warm row is offered as many atoms as it holds
        padd = (idx < pad).sum(1).clamp(min=p_add, max=_MAX_ADD)
    stalls = torch.zeros(m, dtype=torch.long, device=dev)
    n_iter = 0
    while act.numel():
        # correlations d_kᵀ r of the current iterate; its violation; who leaves
        rows = None if act.numel() == m else act         # act is arange(m) until rows leave
        if idx.shape[1]:
            corr = Dc.correlations(X, C, rows, idx, z, work)
        else:                                            # read-only: nothing to hide yet
            corr = C if rows is None else C.index_select(0, rows)
        if idx.shape[1]:
            valid = idx < pad
            on_corr = corr.gather(1, idx)
            v_on = torch.where(valid, (on_corr - lam).abs(), torch.zeros_like(on_corr)).max(1).values
            corr.scatter_(1, idx, -math.inf)          # hide the support (and padding)
        else:
            v_on = torch.zeros(act.numel(), dtype=dt, device=dev)
        nadd = torch.full_like(act, first) if n_iter == 0 and first is not None else padd[act]
        top_val, top_idx = _top_entries(corr, nadd.clamp(max=k))
        v = torch.maximum(v_on, (top_val[:, 0] - lam).clamp(min=0))
        tol_a = tol[act]
        conv = v <= tol_a
        stop = conv | (stalls[act] >= 3) | (n_iter >= max_iter)
        if bool(stop.any()):
            rows = act[stop]
            if idx.shape[1]:
                done_rows.append(rows); done_idx.append(idx[stop]); done_z.append(z[stop])
            viol_out[rows] = v[stop]
            # a stalled row within the rounding floor of its dtype is as exact as it gets
            z1 = z[stop].sum(1) if idx.shape[1] else torch.zeros_like(v[stop])
            floor = _STALL_FLOOR * eps * (xnorm[rows] + z1)
            cut[rows] = ~conv[stop] & (v[stop] > torch.maximum(tol_a[stop], floor))
            keep = ~stop
            if not bool(keep.any()):
                break
            act, idx, z, top_val, top_idx, nadd, tol_a = (act[keep], idx[keep], z[keep],
                                                          top_val[keep], top_idx[keep],
                                                          nadd[keep], tol_a[keep])
        n_iter += 1
        # add the top violators: ``first`` in the first round, then at most padd per row
        rank = torch.arange(top_idx.shape[1], device=dev).unsqueeze(0)
        add = (top_val - lam > tol_a.unsqueeze(1)) & (rank < nadd.unsqueeze(1))
        idx_new = torch.cat([idx, torch.where(add, top_idx, torch.full_like(top_idx, pad))], 1)
        z_new = torch.cat([z, torch.zeros_like(top_val)], 1)
        new_flag = torch.cat([torch.zeros_like(idx, dtype=torch.bool), add], 1)
        idx_new, z_new, new_flag = _lawson_hanson(Dc, Cf, act, idx_new, z_new, lam, ridge,
                                                  new_flag)
        # a stall: the atoms added all dropped out again, or only an on-support refinement
        # was possible; after a stall add one atom at a time (the Lawson–Hanson guarantee)
        stalled = ~(add.any(1) & new_flag.any(1))
        stalls[act] = torch.where(stalled, stalls[act] + 1, torch.zeros_like(stalls[act]))
        size = (idx_new < pad).sum(1)
        full = (new_flag.sum(1) >= nadd) & (size >= _GROW_FROM) & (n_iter > 1)
        room = (Dc.d // _ROOM_DIV - size).clamp(min=1)
        base = torch.minimum(nadd, padd[act])
        grow = torch.maximum(torch.minimum((2 * nadd).clamp(max=_MAX_ADD), room), base)
        padd[act] = torch.where(stalled, torch.ones_like(nadd), torch.where(full, grow, base))
        idx, z = _sort_support(idx_new, z_new, pad)
    smax = 0
    for rows, i, v in zip(done_rows, done_idx, done_z):
        if i.shape[1]:
            r = rows.unsqueeze(1).expand_as(i)
            ok = i < pad
            Zout[r[ok], i[ok]] = v[ok]
            smax = max(smax, int((v > 0).sum(1).max()))
    if fallback_iter and bool(cut.any()):
        rows = torch.nonzero(cut).flatten()
        D = Dc.De[:k]
        Lip = float(torch.linalg.matrix_norm(D, ord=2)) ** 2
        Zf, vf = _fista_rows(X[rows], D, Zout[rows], lam, tol[rows], fallback_iter, Lip)
        better = vf < viol_out[rows]                  # keep the active-set codes otherwise
        Zout[rows[better]] = Zf[better]
        viol_out[rows[better]] = vf[better]
        smax = max(smax, int((Zout[rows] > 0).sum(1).max()))
    return n_iter, viol_out, cut, smax


def encode(
    X: Any,
    D: Any,
    lam: float,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    chunk_size: int | None = None,
    init: Any = None,
    Z0: Any = None,
    return_info: bool = False,
    progress: bool = False,
    add_per_iter: int = 2,
    first_add: int | None = None,
    fallback_iter: int = 5000,
):
    r"""Exact nonnegative-lasso codes of every row of ``X`` (Chapter 2, T1).

    Solves, independently for every sample :math:`x_n` (a row of ``X``),

    .. math::
        z_n = \operatorname{argmin}_{z\ge 0}\ \tfrac12\|x_n - zD\|_2^2 + \lambda\,\mathbf 1^\top z,

    to the KKT tolerance of T1, row by row: with :math:`r_n = x_n - z_nD`,
    :math:`d_k^\top r_n \le \lambda(1 + \mathrm{tol})` for every atom and
    :math:`|d_k^\top r_n - \lambda| \le \lambda\,\mathrm{tol}` wherever :math:`z_{nk} > 0`.
    Equivalently :math:`r_n` is the projection of :math:`x_n` onto the polyhedron
    :math:`\{r : Dr \le \lambda\mathbf 1\}`.

    Method: batched Lawson–Hanson active set (see the module docstring); every iterate is
    feasible and the per-row objective decreases monotonically. The result does not depend
    on the number of threads (every sum is taken in a fixed order).

    Parameters
    ----------
    X : array (n_samples, n_features)
        Samples as rows.
    D : array (n_atoms, n_features)
        Dictionary with unit-norm rows (atoms); same dtype and device as ``X``.
    lam : float
        The penalty :math:`\lambda > 0`.
    tol : float, optional
        T1 tolerance **in units of λ**, for every row separately: a row is converged when
        :math:`\max_k` of :math:`|d_k^\top r - \lambda|` (support) and
        :math:`(d_k^\top r - \lambda)_+` (off support) is at most ``tol · λ``. Default
        :func:`default_tol`: ``1e-8`` in float64, ``1e-3`` in float32. Rounding limits what
        a dtype can certify: a row's correlations carry errors of about
        :math:`\varepsilon\|x_n\|` (ε the machine epsilon), so a row with
        :math:`4\varepsilon\|x_n\| > \mathrm{tol}\cdot\lambda` cannot meet ``tol``; it is
        solved to rounding and reported (warning below).
    max_iter : int
        Maximum outer active-set iterations per chunk (each costs one correlation update on
        the rows not yet converged).
    chunk_size : int, optional
        Rows processed at once; peak memory is ``O(chunk_size · n_atoms)``. Default
        :func:`default_chunk_size`.
    init : array (n_samples, n_atoms), optional
        Warm start: nonnegative codes (e.g. an SAE's own encoder codes, or the previous
        iterate while learning a dictionary) or a boolean array of supports. Each row's
        positive (or ``True``) entries, at most its ``max(32, n_features // 8)`` largest,
        seed its active set: their least-squares solution, with every nonpositive entry
        dropped at once until none is left (the Lawson–Hanson descent from the warm start
        where that ends worse, so no row is worse than its start), and the row is offered
        as many atoms a round as it holds. A good warm start saves most rounds, but each
        of its rounds factorises the whole long support: in ``bench/bench_solvers.py`` (c)
        (codes of about 110 atoms) the previous iterate of a dictionary fit needs 5 rounds
        where a cold start needs 11 and is 1.05–1.2× faster than cold; a warm start that
        shares little of the exact support (a synthetic SAE's encoder codes there: about a
        quarter of it) costs some (0.7–0.8× of cold).
    Z0 : array (n_samples, n_atoms), optional
        Former name of ``init`` (nonnegative codes); still accepted.
    return_info : bool
        Also return an :class:`EncodeInfo`.
    progress : bool
        Show a tqdm bar over chunks (stderr; honours ``TQDM_DISABLE``).
    add_per_iter : int
        Most violating atoms added per row per outer iteration (falls back to one when an
        addition makes no progress, which restores the Lawson–Hanson guarantee). A row whose
        support has 8 atoms or more and whose additions all survive (in any round after the
        first) is offered twice as many in the next round (at most 32, and at most up to
        ``n_features // 4`` atoms).
    first_add : int, optional
        Atoms added in the first round, from the correlations ``Dx`` alone (screening);
        default ``max(add_per_iter, min(n_features, 8, max(4, n_features // 16)))``
        (screened atoms that are not in the code cost Lawson–Hanson drops: short codes,
        as in low dimension, start better from fewer).
    fallback_iter : int
        Projected-gradient iterations allowed for rows the active-set method hands over.

    Returns
    -------
    Z : array (n_samples, n_atoms)
        Nonnegative codes, same kind/dtype/device as ``X``.
    info : EncodeInfo
        Only when ``return_info=True``.

    Warns
    -----
    ConvergenceWarning
        When some row's T1 violation exceeds ``tol · λ``: the message names the violation
        in units of λ and says whether the working dtype cannot resolve the tolerance for
        those rows (use float64, or a larger ``tol``) or the iterations ran out.
    """
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    check_columns(Dt, "D", Xt.shape[1], "X")
    check_dictionary(Dt, "D")
    max_iter = check_positive_int(max_iter, "max_iter")
    add_per_iter = check_positive_int(add_per_iter, "add_per_iter")
    fallback_iter = check_positive_int(fallback_iter, "fallback_iter")
    if first_add is not None:
        first_add = check_positive_int(first_add, "first_add")
    n, k = Xt.shape[0], Dt.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(k)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    tol = default_tol(Xt) if tol is None else check_positive(tol, "tol")
    if init is not None and Z0 is not None:
        raise ValueError("give init or Z0 (its former name), not both")
    name, W = ("init", init) if init is not None else ("Z0", Z0)
    Z0t = None
    if W is not None:
        if isinstance(W, np.ndarray) and W.dtype == np.bool_:
            W = torch.from_numpy(W)
        if isinstance(W, torch.Tensor) and W.dtype == torch.bool:
            W = W.to(device=Xt.device, dtype=Xt.dtype)
        Z0t, _ = as_tensor(W, name, ndim=2, like=Xt)
        check_codes(Z0t, name, (n, k))

    with torch.no_grad():
        Z, info = _encode_tensor(Xt, Dt, lam, tol, max_iter, chunk_size, Z0t, progress,
                                 add_per_iter, fallback_iter, first_add)
    if not info.converged:
        warnings.warn(_unconverged_message(info, lam, Xt.dtype, fallback_iter),
                      ConvergenceWarning, stacklevel=2)
    Zo = kind.out(Z)
    return (Zo, info) if return_info else Zo


def _unconverged_message(info: "EncodeInfo", lam: float, dtype, fallback_iter: int) -> str:
    """The :class:`ConvergenceWarning` text for an unconverged :class:`EncodeInfo`."""
    parts = [f"encode did not reach T1 <= tol*lambda (tol={info.tol:.3g}, lambda={lam:.3g}) on "
             f"{info.n_unconverged_rows} rows: largest KKT violation "
             f"{info.max_kkt_violation:.3g} = {info.kkt_violation_lam:.3g} lambda"]
    if info.n_dtype_limited_rows:
        parts.append(
            f"{info.n_dtype_limited_rows} rows are limited by {str(dtype).replace('torch.', '')} "
            f"rounding (correlations carry errors of about eps*||x_n||, here up to "
            f"{info.dtype_limited_norm:.3g} against lambda={lam:.3g}): their codes are exact to "
            f"rounding but not certified at this tol; use float64 or tol >= "
            f"{2 * info.dtype_limited_lam:.2g}")
    if info.n_unconverged_rows > info.n_dtype_limited_rows:
        parts.append(f"{info.n_fallback_rows} rows were handed to {fallback_iter} projected-"
                     f"gradient iterations after {info.n_iter} active-set iterations")
    return "; ".join(parts)


#: Row norms above which the squares could overflow: such inputs are solved at a power-of-two
#: scale (exact in floating point) and the codes scaled back.
_BIG = {torch.float64: 2.0 ** 480, torch.float32: 2.0 ** 44}


def _first_add(add_per_iter: int, n_features: int) -> int:
    """Default atoms of the screening round (see :func:`encode`'s ``first_add``). Measured
    on ``bench/bench_solvers.py``: 4 instead of 8 at n_features = 64 (L0 ≈ 5) is 0.8× the
    time; at n_features = 384 (L0 ≈ 30) 4 is 1.0–1.08× the time of 8."""
    return max(add_per_iter, min(n_features, 8, max(4, n_features // 16)))


def _encode_tensor(X, D, lam, tol, max_iter, chunk_size, Z0, progress, add_per_iter,
                   fallback_iter, first_add=None, Dc=None):
    """Tensor-only core of :func:`encode` (inputs already validated; ``tol`` in units of
    λ). ``Dc``: a :class:`_Dict` of ``D`` to reuse across calls (certify encodes chunk by
    chunk)."""
    n, k = X.shape[0], D.shape[0]
    dev, dt = X.device, X.dtype
    eps = torch.finfo(dt).eps
    if first_add is None:
        first_add = _first_add(add_per_iter, D.shape[1])
    if Dc is None:
        Dc = _Dict(D, n_rows=n)
    ridge = (1e-12 if dt == torch.float64 else 1e-6)
    Z = torch.zeros(n, k, dtype=dt, device=dev)
    n_iter, vmax, n_fb, smax, n_bad, n_lim, lim_norm, lim_v = 0, 0.0, 0, 0, 0, 0, 0.0, 0.0
    starts = range(0, n, chunk_size)
    for s in progress_bar(starts, progress=progress, desc="encode", unit="chunk"):
        e = min(n, s + chunk_size)
        Xc, Zc = X[s:e], Z[s:e]
        Z0c = None if Z0 is None else Z0[s:e]
        xn = _row_norms(Xc)
        big = float(xn.max()) if xn.numel() else 0.0
        shift = math.frexp(big)[1] if big > _BIG[dt] else 0
        lam_c = math.ldexp(lam, -shift)
        if shift:                       # a power of two: the scaled problem is exactly the same
            Xc, xn = Xc * math.ldexp(1.0, -shift), xn * math.ldexp(1.0, -shift)
            Z0c = None if Z0c is None else Z0c * math.ldexp(1.0, -shift)
        tol_rows = torch.clamp(_FLOOR * eps * xn, min=tol * lam_c)
        with cpu_threads(1 if dev.type == "cpu" else None):     # see the module docstring
            it, v, cut, smax_c = _encode_chunk(Xc, Dc, lam_c, tol_rows, max_iter, Z0c,
                                               first_add, add_per_iter, ridge, fallback_iter, Zc)
        if shift:
            Zc.mul_(math.ldexp(1.0, shift))
        v_lam = v / lam_c                               # T1 in units of λ (scale-free)
        unmet = v_lam > tol
        limited = unmet & ~cut
        n_iter = max(n_iter, it)
        if v.numel():
            vmax = max(vmax, float(v_lam.max()))
            n_bad += int(unmet.sum())
            n_fb += int(cut.sum())
            if bool(limited.any()):
                n_lim += int(limited.sum())
                lim_norm = max(lim_norm, math.ldexp(float(xn[limited].max()), shift))
                lim_v = max(lim_v, float(v_lam[limited].max()))
            smax = max(smax, smax_c)
    info = EncodeInfo(n_iter=n_iter, max_kkt_violation=vmax * lam, converged=n_bad == 0,
                      tol=tol, n_fallback_rows=n_fb, max_support=smax, kkt_violation_lam=vmax,
                      n_unconverged_rows=n_bad, n_dtype_limited_rows=n_lim,
                      dtype_limited_norm=lim_norm, dtype_limited_lam=lim_v)
    return Z, info


def nonneg_lasso_value(X: Any, D: Any, lam: float, *, reduction: str = "mean",
                       **encode_kwargs) -> Any:
    r"""Value function of the nonnegative lasso (Chapter 2, T1).

    .. math::
        f(x; D) = \min_{z\ge 0} \tfrac12\|x - zD\|^2 + \lambda \mathbf 1^\top z
                = \tfrac12\|x\|^2 - \tfrac12\|x - \Pi_{P_\lambda(D)}(x)\|^2 ,

    evaluated with exact codes from :func:`encode`.

    Parameters
    ----------
    reduction : {"mean", "none"}
        ``"mean"`` returns :math:`F(D) = \frac1N\sum_n f(x_n; D)` as a float; ``"none"``
        returns the per-row values as an array of the caller's kind.
    **encode_kwargs
        Passed to :func:`encode` (e.g. ``tol``, ``chunk_size``).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    Z = encode(Xt, Dt, lam, **encode_kwargs)
    with torch.no_grad():
        R = Xt - Z @ Dt
        f = 0.5 * (R * R).sum(1) + float(lam) * Z.sum(1)
    if reduction == "mean":
        return float(f.mean()) if f.numel() else 0.0
    return kind.out(f)
