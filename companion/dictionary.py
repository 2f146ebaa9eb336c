"""Joint optimisation of a unit-norm dictionary and exact codes (THEORY §2–3; Chapter 2).

:func:`fit_dictionary` minimises

.. math::
    L(D, Z) = \\frac1N\\sum_n \\tfrac12\\|x_n - z_n D\\|^2 + \\lambda\\,\\mathbf 1^\\top z_n,
    \\qquad \\|d_k\\| = 1,\\ Z \\ge 0,

by alternating exact codes (:func:`companion.coding.encode`, warm-started) with block
updates of the atoms. With the codes fixed the best unit atom ``k`` is

.. math::
    d_k \\leftarrow \\frac{\\sum_n z_{kn} e^{(k)}_n}{\\|\\sum_n z_{kn} e^{(k)}_n\\|},
    \\qquad e^{(k)}_n = x_n - \\sum_{j\\ne k} z_{jn} d_j,

the centroid form of T2, so the fixed points of the iteration are exactly the stationary
points of T1–T2. The sums only need ``A = ZᵀX`` and ``B = ZᵀZ``, so several sweeps over the
atoms cost far less than one encode. An extrapolation step on ``D`` with a monotone
safeguard (rejected whenever the loss does not fall) speeds up the slow linear tail.
While T2 is large the codes are only improved by a few active-set rounds from the previous
ones (still a descent step: every iterate of the encoder is feasible and lowers the
objective); once T2 is below ``1e-2`` every encode is exact, so the certificate at the end
is that of exact codes. Dead atoms are replaced by the new-atom direction of §3 when that
lowers the loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ._validation import as_tensor, check_dictionary, check_positive, check_positive_int, \
    check_columns
from .certificates import CertificateReport, _best_new_atom, _certify_tensor
from .coding import _encode_tensor, default_chunk_size, default_tol
from .runtime import generator

__all__ = ["DictionaryFit", "fit_dictionary"]

#: Active-set rounds per encode while the dictionary is far from stationary.
_PARTIAL_ROUNDS = 3
#: T2 violation below which every encode is exact.
_EXACT_BELOW = 1e-2


@dataclass
class DictionaryFit:
    """Result of :func:`fit_dictionary` (Chapter 2).

    Attributes
    ----------
    D : array (n_atoms, n_features)
        Unit-norm dictionary of the best restart.
    Z : array (n_samples, n_atoms)
        Its exact codes.
    loss : float
        Joint loss of ``(D, Z)``.
    certificate : CertificateReport
        :func:`companion.certificates.certify` of ``(D, Z)``.
    history : list[float]
        Loss after every outer iteration of the best restart.
    t2_history : list[float]
        T2 violation after every outer iteration of the best restart.
    restart_losses : list[float]
        Final loss of every restart.
    n_iter : int
        Outer iterations (encode + dictionary sweeps) of the best restart.
    converged : bool
        Whether the best restart reached ``t2_violation <= tol``.
    seconds : float
        Wall time of the whole call.
    """

    D: Any
    Z: Any = field(repr=False)
    loss: float
    certificate: CertificateReport = field(repr=False)
    history: list
    t2_history: list = field(repr=False)
    restart_losses: list
    n_iter: int
    converged: bool
    seconds: float = 0.0


def _t2(A, B, zsum, D, lam):
    """T2 violation from ``A = ZᵀX``, ``B = ZᵀZ`` and ``zsum = Zᵀ1`` (``Σ_n z_kn r_n = A_k - B_k D``)."""
    V = A - B @ D
    proj = (V * D).sum(1)
    tang = (V - proj.unsqueeze(1) * D).norm(dim=1)
    zsum_scale = B.diagonal() + lam * zsum
    used = zsum > 0
    t = torch.where(used, tang / zsum_scale.clamp(min=torch.finfo(D.dtype).tiny), torch.zeros_like(tang))
    return float(t.max()) if t.numel() else 0.0


def _sweeps(A, B, D, n_sweeps):
    """Block-coordinate sweeps ``d_k ← normalise(A_k - Σ_{j≠k} B_kj d_j)`` (in place)."""
    # On the CPU the same steps run on NumPy views of the tensors: a fraction of torch's
    # per-call cost for these small vectors.
    a, b, dn = (A.numpy(), B.numpy(), D.numpy()) if D.device.type == "cpu" else (A, B, D)
    diag = b.diagonal().tolist()
    active = [j for j, v in enumerate(diag) if v > 0]
    for _ in range(n_sweeps):
        for j in active:
            v = a[j] - b[j] @ dn
            v += diag[j] * dn[j]
            nv = math.sqrt(float(v @ v))
            if nv > 0:
                dn[j] = v / nv
    return D


def _loss(X, D, Z, lam):
    R = X - Z @ D
    return float((0.5 * (R * R).sum(1) + lam * Z.sum(1)).mean()), R


def fit_dictionary(
    X: Any,
    n_atoms: int,
    lam: float,
    *,
    n_restarts: int = 3,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: Any = "data",
    seed: int = 0,
    resample_dead: bool = True,
    progress: bool = True,
    n_sweeps: int = 3,
    extrapolate: bool = True,
    chunk_size: int | None = None,
    time_limit: float | None = None,
    callback: Any = None,
) -> DictionaryFit:
    r"""Learn a unit-norm dictionary to a certified stationary point of the joint loss (Chapter 2).

    Minimises :math:`L(D,Z)=\frac1N\sum_n\tfrac12\|x_n-z_nD\|^2+\lambda\mathbf 1^\top z_n` over
    unit-norm rows of ``D`` and ``Z ≥ 0`` by alternating exact codes (T1) with
    ``n_sweeps`` block sweeps :math:`d_k\leftarrow\mathrm{normalise}(\sum_n z_{kn}e_n^{(k)})`
    (T2 in centroid form), until the T2 violation
    :math:`\max_k\|(I-d_kd_k^\top)\sum_n z_{kn}r_n\|/(\|z_k\|_2^2+\lambda\|z_k\|_1)` is at most ``tol``.
    While that violation exceeds ``1e-2`` the codes are improved by three active-set rounds
    from the previous ones instead of being solved exactly (a cheaper descent step); from
    then on, and for the certificate, they are exact.

    Parameters
    ----------
    X : array (n_samples, n_features)
    n_atoms : int
    lam : float
        Penalty :math:`\lambda > 0`.
    n_restarts : int
        Independent initialisations (seeds ``seed, seed+1, ...``); the lowest loss wins.
        Ignored (one run) when ``init`` is an array.
    max_iter : int
        Outer iterations per restart.
    tol : float
        Target T2 violation (the codes are exact, so T1 holds to the encode tolerance).
    init : "data", "random" or array (n_atoms, n_features)
        ``"data"``: distinct random rows of ``X``, normalised; ``"random"``: Gaussian
        directions; an array: the initial dictionary ``D0`` (rows are normalised).
    seed : int
        Seed of the initialisation (a CPU ``torch.Generator``, so CPU and GPU agree).
    resample_dead : bool
        Replace a dead atom by the §3 new-atom direction when it lowers the loss.
    progress : bool
        tqdm bar over iterations (stderr; honours ``TQDM_DISABLE``).
    n_sweeps : int
        Atom sweeps per encode.
    extrapolate : bool
        Try ``D + β(D - D_prev)`` (normalised) and keep it only when the loss falls (tested
        first with the previous codes, so a rejected step costs no encode).
    chunk_size : int, optional
        Rows per chunk for encode/certify.
    time_limit : float, optional
        Stop a restart after this many seconds.
    callback : callable, optional
        Called as ``callback(iteration, loss, t2)`` after every outer iteration.

    Returns
    -------
    DictionaryFit
    """
    t_start = time.perf_counter()
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    n_restarts = check_positive_int(n_restarts, "n_restarts")
    max_iter = check_positive_int(max_iter, "max_iter")
    n_sweeps = check_positive_int(n_sweeps, "n_sweeps")
    tol = check_positive(tol, "tol")
    n, d = Xt.shape
    if n == 0:
        raise ValueError("X must have at least one row (sample)")
    D0 = None
    if isinstance(init, str):
        if init not in ("data", "random"):
            raise ValueError(f"init must be 'data', 'random' or an array, got {init!r}")
        if init == "data" and n_atoms > n:
            raise ValueError(f"init='data' needs n_atoms <= n_samples, got n_atoms={n_atoms} > {n}")
    else:
        D0, _ = as_tensor(init, "init", ndim=2, like=Xt)
        check_columns(D0, "init", d, "X")
        if D0.shape[0] != n_atoms:
            raise ValueError(f"init has {D0.shape[0]} rows but n_atoms={n_atoms}")
        check_dictionary(D0, "init", unit_norm=False)
        n_restarts = 1
    if chunk_size is None:
        chunk_size = default_chunk_size(n_atoms)
    etol = default_tol(Xt)
    best = None
    restart_losses = []
    with torch.no_grad():
        for r in range(n_restarts):
            if D0 is not None:
                D = D0 / D0.norm(dim=1, keepdim=True)
            else:
                g = generator(seed + r)
                if init == "data":
                    rows = torch.randperm(n, generator=g)[:n_atoms].to(Xt.device)
                    D = Xt[rows].clone()
                    small = D.norm(dim=1) <= 1e-12
                    if bool(small.any()):
                        D[small] = torch.randn(int(small.sum()), d, generator=g, dtype=Xt.dtype).to(Xt.device)
                else:
                    D = torch.randn(n_atoms, d, generator=g, dtype=Xt.dtype).to(Xt.device)
                D = D / D.norm(dim=1, keepdim=True)
            res = _fit_one(Xt, D, lam, tol, max_iter, n_sweeps, etol, chunk_size, resample_dead,
                           extrapolate, progress, time_limit, callback, r, n_restarts)
            restart_losses.append(res[2])
            if best is None or res[2] < best[2]:
                best = res
        D, Z, loss, hist, t2h, n_iter, conv = best
        cert = _certify_tensor(Xt, D, lam, Z, kind, chunk_size, 0.0, False, 8192, None, 200, 2, 5000)
    return DictionaryFit(D=kind.out(D), Z=kind.out(Z), loss=loss, certificate=cert, history=hist,
                         t2_history=t2h, restart_losses=restart_losses, n_iter=n_iter,
                         converged=conv, seconds=time.perf_counter() - t_start)


def _fit_one(X, D, lam, tol, max_iter, n_sweeps, etol, chunk_size, resample_dead, extrapolate,
             progress, time_limit, callback, r, n_restarts):
    t0 = time.perf_counter()
    # While the dictionary is far from stationary the codes need not be exact: a few
    # active-set rounds from the previous codes still lower the joint loss (every
    # iterate of the encoder is feasible and its objective never increases), and the
    # dictionary moves too much for exact codes to be worth their price. Codes are made
    # exact once T2 falls below ``_EXACT_BELOW``; convergence is declared on exact codes.
    exact = False

    def enc(D_, Z_):
        if exact:
            return _encode_tensor(X, D_, lam, etol, 200, chunk_size, Z_, False, 2, 5000)[0]
        return _encode_tensor(X, D_, lam, etol, _PARTIAL_ROUNDS, chunk_size, Z_, False, 2, 0)[0]

    Z = enc(D, None)
    loss, R = _loss(X, D, Z, lam)
    hist, t2h = [loss], []
    beta = 1.0
    converged = False
    bar = tqdm(range(max_iter), disable=not progress, desc=f"fit_dictionary {r + 1}/{n_restarts}",
               leave=False)
    it = 0
    for it in bar:
        A = Z.T @ X
        B = Z.T @ Z
        zsum = Z.sum(0)
        t2 = _t2(A, B, zsum, D, lam)
        if not exact and t2 <= max(_EXACT_BELOW, tol):
            exact = True
            Z = enc(D, Z)
            loss, R = _loss(X, D, Z, lam)
            A, B, zsum = Z.T @ X, Z.T @ Z, Z.sum(0)
            t2 = _t2(A, B, zsum, D, lam)
        t2h.append(t2)
        if callback is not None:
            callback(it, loss, t2)
        if progress:
            bar.set_postfix(loss=f"{loss:.6e}", t2=f"{t2:.1e}")
        if t2 <= tol:
            dead = zsum <= 0
            if not (resample_dead and bool(dead.any())):
                converged = True
                break
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        # dead atoms: replace one by the §3 new-atom direction when it helps
        if resample_dead:
            dead = torch.nonzero(zsum <= 0).flatten()
            if dead.numel():
                norms = R.norm(dim=1)
                pool = R[norms > lam]
                if pool.shape[0] > 8192:
                    pool = pool[norms[norms > lam].topk(8192).indices]
                u, gain, excess = _best_new_atom(pool, lam, X.shape[0])
                if gain > 0 and excess > 0:
                    D = D.clone()
                    D[int(dead[0])] = u
                    Z = enc(D, Z)
                    loss, R = _loss(X, D, Z, lam)
                    hist.append(loss)
                    continue
                elif t2 <= tol:
                    converged = True
                    break
        D_new = _sweeps(A, B, D.clone(), n_sweeps)
        accepted = False
        if extrapolate:
            # over-relax along the sweep step; keep it only if the loss falls below the
            # current one (monotone safeguard), else take the plain step. The test is
            # first made with the old codes, which costs no encode: re-encoding can only
            # lower that loss, so a step that passes it is kept.
            D_try = D_new + beta * (D_new - D)
            D_try = D_try / D_try.norm(dim=1, keepdim=True).clamp(min=1e-300)
            if _loss(X, D_try, Z, lam)[0] >= loss:
                loss_try = math.inf
            else:
                Z_try = enc(D_try, Z)
                loss_try, R_try = _loss(X, D_try, Z_try, lam)
            if loss_try < loss:
                D, Z, loss, R = D_try, Z_try, loss_try, R_try
                beta = min(beta * 1.5, 20.0)
                accepted = True
            else:
                beta = max(beta / 4, 0.25)
        if not accepted:
            Z = enc(D_new, Z)
            D = D_new
            loss, R = _loss(X, D, Z, lam)
        hist.append(loss)
    bar.close()
    if not exact:                       # stopped early (max_iter, time_limit): exact codes
        exact = True
        Z = enc(D, Z)
        loss, _ = _loss(X, D, Z, lam)
    return D, Z, loss, hist, t2h, it + 1, converged
