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
increases. The KKT condition off the support is checked with one ``r Dᵀ`` product per
outer iteration and the most violating atoms are added (``add_per_iter`` a round; rows
with long supports whose additions all survive are offered twice as many next round, so
codes with tens of active atoms need tens of rounds fewer). Rows that have converged leave
the batch. Rows that stall (rank-deficient or near-collinear supports) are finished by
projected-gradient (FISTA) steps on the full dictionary. Rows are streamed in chunks, so
peak memory is set by ``chunk_size`` and not by the number of samples.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, asdict
from typing import Any

import torch
from tqdm import tqdm

from ._validation import (as_tensor, check_codes, check_columns, check_dictionary, check_positive,
                          check_positive_int)

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
        Whether ``max_kkt_violation <= tol``.
    tol : float
        The tolerance that was asked for.
    n_fallback_rows : int
        Rows the active-set method could not finish, handed to projected-gradient steps.
    max_support : int
        Largest number of nonzero entries in a row of the codes.
    """

    n_iter: int
    max_kkt_violation: float
    converged: bool
    tol: float
    n_fallback_rows: int
    max_support: int

    def to_dict(self) -> dict:
        return asdict(self)


def default_tol(X: torch.Tensor) -> float:
    """Default KKT tolerance: ``1e-9`` (float64) or ``2e-4`` (float32), times ``max(1, max_n ‖x_n‖)``."""
    scale = max(1.0, float(X.norm(dim=1).max())) if X.numel() else 1.0
    return (1e-9 if X.dtype == torch.float64 else 2e-4) * scale


def default_chunk_size(n_atoms: int) -> int:
    """Rows per chunk so that one (chunk, n_atoms) work array holds about 2**23 entries."""
    return int(max(256, min(8192, (1 << 23) // max(1, n_atoms))))


# ----------------------------------------------------------------------------------------
# batched active-set kernel (no input checks)
# ----------------------------------------------------------------------------------------

#: Largest dictionary (in Gram entries) whose Gram matrix ``D Dᵀ`` is formed once per call;
#: its support sub-blocks are then gathered instead of recomputed from the atoms.
_GRAM_ENTRIES = 1 << 24

#: Long supports grow faster: a row whose support has at least ``_GROW_FROM`` atoms and
#: whose every offered atom survived is offered twice as many next round, at most
#: ``_MAX_ADD`` and at most up to ``n_features // _ROOM_DIV`` atoms in all (supports near
#: ``n_features`` are ill-conditioned, and there added atoms mostly drop out again).
_GROW_FROM = 16
_MAX_ADD = 32
_ROOM_DIV = 4


class _Dict:
    """What the kernel needs of a dictionary: the atoms with one zero padding atom (index
    ``k``) appended and, for dictionaries that are not too large, the flat Gram matrix
    ``Ge = De Deᵀ`` (whose padding row and column are zero)."""

    def __init__(self, D: torch.Tensor):
        self.k, self.d = D.shape
        self.pad = self.k
        self.k1 = self.k + 1
        self.De = torch.cat([D, D.new_zeros(1, self.d)], 0)
        if self.k1 * self.k1 <= _GRAM_ENTRIES:
            self.Gf = (self.De @ self.De.T).reshape(-1)
        else:
            self.Gf = None

    def gram(self, idx: torch.Tensor) -> torch.Tensor:
        """Support Gram blocks ``D_S D_Sᵀ`` (m, w, w), identity on padding entries."""
        m, w = idx.shape
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


def _supports_of(Z0: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded supports ``(idx, z)`` of the positive entries of each row of ``Z0``."""
    m = Z0.shape[0]
    r, c = torch.nonzero(Z0 > 0, as_tuple=True)
    counts = torch.bincount(r, minlength=m)
    w = int(counts.max()) if r.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(r.numel(), device=Z0.device) - starts[r]
    idx = torch.full((m, w), pad, dtype=torch.long, device=Z0.device)
    z = Z0.new_zeros(m, w)
    idx[r, pos] = c
    z[r, pos] = Z0[r, c]
    return idx, z


def _fista_rows(X: torch.Tensor, D: torch.Tensor, Z: torch.Tensor, lam: float,
                tol: float, max_iter: int, Lip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected-gradient (FISTA with restart) on the full dictionary for a few rows.

    Returns codes and each row's KKT violation.
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
                float(_kkt_violation_dense(X, D, Znew, lam).max()) <= tol:
            break
    return Zold, _kkt_violation_dense(X, D, Zold, lam)


def _kkt_violation_dense(X, D, Z, lam):
    g = lam - (X - Z @ D) @ D.T     # = λ - d_kᵀ r
    v = torch.where(Z > 0, g.abs(), (-g).clamp(min=0))
    return v.max(1).values


def _encode_chunk(X, Dc, lam, tol, max_iter, Z0, p_first, p_add, ridge, fallback_iter, Zout):
    """Encode one chunk of rows into ``Zout`` (zeros, (m, k)); returns
    ``(n_iter, viol, n_fallback)``."""
    m = X.shape[0]
    k, pad = Dc.k, Dc.pad
    dev, dt = X.device, X.dtype
    Ce = X @ Dc.De.T                   # (m, k+1): d_kᵀ x, padding column set to λ
    Ce[:, k] = lam
    Cf = Ce.view(-1)
    done_rows, done_idx, done_z = [], [], []               # finished rows, scattered at the end
    viol_out = torch.zeros(m, dtype=dt, device=dev)
    allrows = torch.arange(m, device=dev)

    # initial supports and the correlations d_kᵀ r of their codes
    first = p_first
    if Z0 is not None and bool((Z0 > 0).any()):
        idx, z = _supports_of(Z0, pad)
        idx, z, _ = _lawson_hanson_inner(Dc, Cf, allrows, idx, z, lam, ridge)
        idx, z = _sort_support(idx, z, pad)
        corr = Dc.residual(X, idx, z) @ Dc.De.T
        first = p_add
    else:
        idx = torch.full((m, 0), pad, dtype=torch.long, device=dev)
        z = Ce.new_zeros(m, 0)
        corr = Ce                      # not written to while supports are empty

    act = allrows                      # rows still iterating; idx, z, corr follow them
    padd = torch.full((m,), p_add, dtype=torch.long, device=dev)
    stalls = torch.zeros(m, dtype=torch.long, device=dev)
    fallback = torch.zeros(m, dtype=torch.bool, device=dev)
    n_iter = 0
    while act.numel() and n_iter < max_iter:
        n_iter += 1
        if idx.shape[1]:
            valid = idx < pad
            on_corr = corr.gather(1, idx)
            v_on = torch.where(valid, (on_corr - lam).abs(), torch.zeros_like(on_corr)).max(1).values
            corr.scatter_(1, idx, -math.inf)          # hide the support (and padding)
        else:
            v_on = torch.zeros(act.numel(), dtype=dt, device=dev)
        nadd = torch.full_like(act, first) if n_iter == 1 else padd[act]
        p_now = int(nadd.max())
        if p_now == 1:
            top_val, top_idx = corr.max(1, keepdim=True)
        else:
            top_val, top_idx = corr.topk(min(p_now, k), dim=1)
        v = torch.maximum(v_on, (top_val[:, 0] - lam).clamp(min=0))
        conv = v <= tol
        if bool(conv.any()):
            rows = act[conv]
            if idx.shape[1]:
                done_rows.append(rows); done_idx.append(idx[conv]); done_z.append(z[conv])
            viol_out[rows] = v[conv]
            keep = ~conv
            if not bool(keep.any()):
                act = act[:0]
                break
            act, idx, z, top_val, top_idx, nadd = (act[keep], idx[keep], z[keep], top_val[keep],
                                                   top_idx[keep], nadd[keep])
        # add the top violators: ``first`` in the first round, then at most padd per row
        rank = torch.arange(top_idx.shape[1], device=dev).unsqueeze(0)
        add = (top_val - lam > tol) & (rank < nadd.unsqueeze(1))
        idx_new = torch.cat([idx, torch.where(add, top_idx, torch.full_like(top_idx, pad))], 1)
        z_new = torch.cat([z, torch.zeros_like(top_val)], 1)
        new_flag = torch.cat([torch.zeros_like(idx, dtype=torch.bool), add], 1)
        idx_new, z_new, new_flag = _lawson_hanson_inner(Dc, Cf, act, idx_new, z_new, lam, ridge,
                                                        new_flag)
        # a stall: the atoms added all dropped out again, or only an on-support refinement
        # was possible; after a stall add one atom at a time (the Lawson–Hanson guarantee)
        stalled = ~(add.any(1) & new_flag.any(1))
        st = torch.where(stalled, stalls[act] + 1, torch.zeros_like(stalls[act]))
        stalls[act] = st
        size = (idx_new < pad).sum(1)
        full = (new_flag.sum(1) >= nadd) & (size >= _GROW_FROM)
        room = (Dc.d // _ROOM_DIV - size).clamp(min=1)
        base = torch.minimum(nadd, padd[act])
        grow = torch.maximum(torch.minimum((2 * nadd).clamp(max=_MAX_ADD), room), base)
        padd[act] = torch.where(stalled, torch.ones_like(nadd), torch.where(full, grow, base))
        give_up = st >= 3
        if bool(give_up.any()):
            rows = act[give_up]
            fallback[rows] = True
            done_rows.append(rows); done_idx.append(idx_new[give_up])
            done_z.append(z_new[give_up])
            ok = ~give_up
            act, idx_new, z_new = act[ok], idx_new[ok], z_new[ok]
        idx, z = _sort_support(idx_new, z_new, pad)
        if act.numel():
            corr = Dc.residual(X[act], idx, z) @ Dc.De.T
    # rows that ran out of iterations also go to the fallback
    if act.numel():
        fallback[act] = True
        if idx.shape[1]:
            done_rows.append(act); done_idx.append(idx); done_z.append(z)
    for rows, i, v in zip(done_rows, done_idx, done_z):
        if i.shape[1]:
            r = rows.unsqueeze(1).expand_as(i)
            ok = i < pad
            Zout[r[ok], i[ok]] = v[ok]
    n_fb = int(fallback.sum())
    if n_fb and fallback_iter == 0:      # internal use: keep the feasible iterate, unconverged
        viol_out[fallback] = math.inf
    elif n_fb:
        rows = torch.nonzero(fallback).flatten()
        D = Dc.De[:k]
        Lip = float(torch.linalg.matrix_norm(D, ord=2)) ** 2
        Zf, vf = _fista_rows(X[rows], D, Zout[rows], lam, tol, fallback_iter, Lip)
        Zout[rows] = Zf
        viol_out[rows] = vf
    return n_iter, viol_out, n_fb


def encode(
    X: Any,
    D: Any,
    lam: float,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    chunk_size: int | None = None,
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

    to the KKT tolerance ``tol`` of T1: with :math:`r_n = x_n - z_nD`,
    :math:`d_k^\top r_n \le \lambda` for every atom and :math:`d_k^\top r_n = \lambda` wherever
    :math:`z_{nk} > 0`. Equivalently :math:`r_n` is the projection of :math:`x_n` onto the
    polyhedron :math:`\{r : Dr \le \lambda\mathbf 1\}`.

    Method: batched Lawson–Hanson active set (see the module docstring); every iterate is
    feasible and the per-row objective decreases monotonically.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Samples as rows.
    D : array (n_atoms, n_features)
        Dictionary with unit-norm rows (atoms); same dtype and device as ``X``.
    lam : float
        The penalty :math:`\lambda > 0`.
    tol : float, optional
        KKT tolerance on :math:`|d_k^\top r - \lambda|` (support) and
        :math:`(d_k^\top r - \lambda)_+` (off support). Default :func:`default_tol`:
        ``1e-9`` in float64 and ``2e-4`` in float32, times ``max(1, max_n ‖x_n‖)``.
    max_iter : int
        Maximum outer active-set iterations per chunk (each costs one ``r Dᵀ`` product on
        the rows not yet converged).
    chunk_size : int, optional
        Rows processed at once; peak memory is ``O(chunk_size · n_atoms)``. Default
        :func:`default_chunk_size`.
    Z0 : array (n_samples, n_atoms), optional
        Nonnegative warm start (its supports seed the active sets), e.g. the previous codes
        while learning a dictionary.
    return_info : bool
        Also return an :class:`EncodeInfo`.
    progress : bool
        Show a tqdm bar over chunks (stderr; honours ``TQDM_DISABLE``).
    add_per_iter : int
        Most violating atoms added per row per outer iteration (falls back to one when an
        addition makes no progress, which restores the Lawson–Hanson guarantee). A row whose
        support has 16 atoms or more and whose additions all survive is offered twice as
        many in the next round (at most 32, and at most up to ``n_features // 4`` atoms).
    first_add : int, optional
        Atoms added in the first round, from the correlations ``Dx`` alone (screening);
        default ``max(add_per_iter, min(8, n_features))``.
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
        When the largest KKT violation exceeds ``tol``; the message names the violation.
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
    if tol is None:
        tol = default_tol(Xt)
    else:
        tol = check_positive(tol, "tol")
    Z0t = None
    if Z0 is not None:
        Z0t, _ = as_tensor(Z0, "Z0", ndim=2, like=Xt)
        check_codes(Z0t, "Z0", (n, k))

    with torch.no_grad():
        Z, info = _encode_tensor(Xt, Dt, lam, tol, max_iter, chunk_size, Z0t, progress,
                                 add_per_iter, fallback_iter, first_add)
    if not info.converged:
        warnings.warn(
            f"encode did not reach tol={tol:.3g}: largest KKT violation {info.max_kkt_violation:.3g} "
            f"after {info.n_iter} active-set iterations and {fallback_iter} fallback iterations "
            f"on {info.n_fallback_rows} rows",
            ConvergenceWarning, stacklevel=2)
    Zo = kind.out(Z)
    return (Zo, info) if return_info else Zo


def _encode_tensor(X, D, lam, tol, max_iter, chunk_size, Z0, progress, add_per_iter,
                   fallback_iter, first_add=None, Dc=None):
    """Tensor-only core of :func:`encode` (inputs already validated). ``Dc``: a
    :class:`_Dict` of ``D`` to reuse across calls (certify encodes chunk by chunk)."""
    n, k = X.shape[0], D.shape[0]
    dev, dt = X.device, X.dtype
    if first_add is None:
        first_add = max(add_per_iter, min(8, D.shape[1]))
    if Dc is None:
        Dc = _Dict(D)
    ridge = (1e-12 if dt == torch.float64 else 1e-6)
    Z = torch.zeros(n, k, dtype=dt, device=dev)
    n_iter, vmax, n_fb, smax = 0, 0.0, 0, 0
    starts = range(0, n, chunk_size)
    for s in tqdm(starts, disable=not progress, desc="encode", unit="chunk", leave=False):
        e = min(n, s + chunk_size)
        Zc = Z[s:e]
        it, v, fb = _encode_chunk(X[s:e], Dc, lam, tol, max_iter,
                                  None if Z0 is None else Z0[s:e], first_add, add_per_iter,
                                  ridge, fallback_iter, Zc)
        n_iter = max(n_iter, it)
        if v.numel():
            vmax = max(vmax, float(v.max()))
        n_fb += fb
        if Zc.numel():
            smax = max(smax, int((Zc > 0).sum(1).max()))
    info = EncodeInfo(n_iter=n_iter, max_kkt_violation=vmax, converged=vmax <= tol, tol=tol,
                      n_fallback_rows=n_fb, max_support=smax)
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
