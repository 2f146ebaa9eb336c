"""Joint optimisation of a unit-norm dictionary and exact codes (THEORY §2–3; Chapter 2).

:func:`fit_dictionary` minimises the value function

.. math::
    F_b(D) = \\frac1N\\sum_n \\min_{z_n\\ge 0}\\ \\tfrac12\\|x_n - b - z_n D\\|^2 + \\lambda\\,\\mathbf 1^\\top z_n,
    \\qquad \\|d_k\\| = 1,

over the product of spheres (and, with ``fit_bias=True``, over an unpenalised decoder bias
``b``; otherwise ``b = 0``). It runs in two phases.

1. **Block sweeps** while the dictionary is far from stationary. With the codes fixed the
   best unit atom ``k`` is

   .. math::
       d_k \\leftarrow \\frac{\\sum_n z_{kn} e^{(k)}_n}{\\|\\sum_n z_{kn} e^{(k)}_n\\|},
       \\qquad e^{(k)}_n = x_n - b - \\sum_{j\\ne k} z_{jn} d_j,

   the centroid form of T2 (the block-coordinate atom update of Mairal et al. 2010), and the
   best bias is ``b = mean_n (x_n - z_n D)``. The sums only need ``A = ZᵀX`` and ``B = ZᵀZ``,
   so several sweeps cost far less than one encode. The codes are only improved by a few
   active-set rounds from the previous ones (a descent step: every iterate of the encoder is
   feasible and lowers the objective), and an extrapolation step on ``D`` with a monotone
   safeguard speeds up the linear tail. The sweeps hand over to phase 2 once T2 is small, or
   once they stall (T2 not halved in ten iterations).
2. **Riemannian L-BFGS** (the default) or **Newton-CG** (``method="newton"``) once the T2
   violation is below ``1e-2`` (``0.1`` for Newton). The gradient of ``F_b`` is Danskin's
   (Chapter 2): ``∇_{d_k} F = -(1/N) Σ_n z_kn r_n`` and ``∇_b F = -(1/N) Σ_n r_n``, at exact codes; its
   projection onto the tangent space of the spheres is the Riemannian gradient. With every
   row's support held fixed the codes are smooth in ``(D, b)`` (``G z_S = D_S(x - b) - λ1``),
   which gives the Hessian in closed form (:meth:`_Fit.hessian_model`; it is exact wherever
   no support changes nearby, and checked against finite differences in the tests). The
   step solves ``(Hess + μ diag(M)) p = -g`` by truncated conjugate gradients
   preconditioned by the per-atom curvature ``M_k = (‖z_k‖² + λ‖z_k‖₁)/N`` (the scaling
   that makes T2 the scaled gradient, so a heavily damped step is the simultaneous
   centroid step) or, on small problems (at most 128 unknowns: ``K·d``, plus ``d`` with a
   bias), by a Cholesky factorisation of the Hessian assembled in closed form
   (:meth:`_Fit.dense_hessian`; ``μ`` grows until that matrix is positive definite); it
   is retracted by normalising the atoms, and is kept only if the loss falls; ``μ``
   shrinks when the loss falls as the model predicts and grows when it falls less
   (support changes, which the model does not see), Levenberg–Marquardt style. Near a
   stationary point the supports settle and the steps are Newton's, so T2 falls
   quadratically. Each Newton evaluation takes exact codes warm: every row re-solves its old
   support system at the new dictionary, and only rows where that fails T1 go to
   :func:`companion.encode`. L-BFGS uses the two-loop recursion over 30 pairs from the
   same scaling, projected onto the current tangent space, with Armijo backtracking, each
   evaluation one warm-started encode. Newton needs fewer iterations but each costs a CG
   solve: it is the faster on small dense problems and the slower at large ``d``. (Should
   either find no decrease before ``tol`` is met, at the rounding floor of very tight
   tolerances, exact block sweeps finish.) Block sweeps crawl wherever the landscape is
   flat (dense data); the second-order steps do not.

Every encode of phase 2 is exact, so the certificate at the end is that of exact codes. Dead
atoms are replaced by the new-atom direction of §3 when that lowers the loss. On the CPU the
fit runs on one intra-op thread by default (``n_threads``): its kernels are small, so a
second thread buys little and, on a busy machine, OpenMP's spin-waiting costs far more than
the kernels; and one thread makes every reduction's order fixed, so on a given CPU and torch
build a fit is bitwise reproducible whatever the machine's load or torch's thread setting.
(Another CPU's vector kernels can still move the last bits.)
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import as_tensor, check_dictionary, check_positive, check_positive_int, \
    check_columns
from .certificates import CertificateReport, _best_new_atom, _certify_tensor
from .coding import (_BUCKET_ROWS, _BUCKETS, ConvergenceWarning, _Dict,
                     _encode_tensor, _supports_of, default_chunk_size, default_tol)
from .runtime import cpu_threads, generator, progress_bar

__all__ = ["DictionaryFit", "fit_dictionary"]

#: Active-set rounds per encode while the dictionary is far from stationary.
_PARTIAL_ROUNDS = 3
#: T2 violation below which every encode is exact and the second-order phase starts.
_EXACT_BELOW = 1e-1
#: The same for ``method="lbfgs"`` and ``"sweeps"`` (as before the Newton phase, so that
#: those methods give the same fits as then).
_EXACT_BELOW_QN = 1e-2
#: The block sweeps have stalled, and the second-order phase starts whatever T2 is, when the
#: lowest T2 of their last ``_STALL`` iterates is above half the lowest of the ``_STALL``
#: before. Their codes are a few active-set rounds, not exact codes: on MiniLM activations
#: (n = 10⁴, K = 1536) T2 hovers at 0.05-0.15 for tens of sweeps, far above
#: ``_EXACT_BELOW_QN``. There L-BFGS started at once reached a loss of 21.036 after 107 s,
#: the sweeps 21.049 after 151 s (one thread, idle machine).
_STALL = 10
#: T2 at which ``finish_restarts="best"`` compares the restarts.
_SCREEN = 1e-2
#: Pairs kept by L-BFGS.
_MEMORY = 30
#: Armijo constant and the most backtracking steps of one line search.
_ARMIJO = 1e-4
_MAX_BACKTRACK = 30
#: Damping of the Newton steps: its floor, its growth and shrink factors, and its value after
#: the first failure.
_MU = [1e-3, 4.0, 2.0, 1e-1]
#: CG stops at a relative residual min(0.5, T2 ** _ETA_POW) (a forcing sequence that tends
#: to zero with T2, so the steps become Newton's).
_ETA_POW = 1.0
#: Most conjugate-gradient steps of one Newton direction.
_MAX_CG = 100
#: Largest turn (radians, at a unit step) of an atom along a Newton direction.
_MAX_TURN = 1.0
#: Newton directions come from a dense Cholesky factorisation of the Hessian, not CG, when
#: it has at most this many rows ((atoms + bias) × d): assembling it costs three products
#: of size n × (K'd)², about as much as the CG iterations it replaces at this size
#: (measured equal at K'd = 128, Gaussian (1000, 8), K = 16; 0.66x the CPU at K'd = 48).
_DENSE_DIM = 128
#: Support systems are factorised in groups of rows of similar support size once the widest
#: support has this many atoms (:func:`_support_systems`). Measured on bench_dictionary's
#: (c), Gaussian (2000, 16), K = 32 (10.5 atoms a row, 16 at most): the Newton Hessian's
#: set-up 7.3 -> 4.2 ms and its product 1.24 -> 1.07 ms; on the MiniLM family (22 on
#: average, 63 at most) the set-up 0.89 -> 0.33 s.
_GROUP_FROM = 12
#: Products with the codes go through a CSR copy (:func:`_products`) when the codes have at
#: least this many entries and at most one in ``_SPARSE_DIV`` nonzero. Measured on one
#: thread (``Z D``, ``Zᵀ X`` and ``Zᵀ Z`` together, d = 384, the CSR copy included): 1.4x
#: faster at n = 4000, K = 192 (5% nonzero), 4.5x at K = 768 (1.6%), 5.2x at n = 10⁴,
#: K = 1536 (1.4%); 0.7x (slower) at n = 1024, K = 64 (6%).
_SPARSE_MIN = 1 << 19
_SPARSE_DIV = 8


@dataclass
class DictionaryFit:
    """Result of :func:`fit_dictionary` (Chapter 2).

    Attributes
    ----------
    D : array (n_atoms, n_features)
        Unit-norm dictionary of the best restart.
    Z : array (n_samples, n_atoms)
        Its exact codes (of ``X - bias`` when a bias was fitted).
    loss : float
        Joint loss of ``(D, Z)`` (at the fitted centring ``X - bias``).
    certificate : CertificateReport
        :func:`companion.certificates.certify` of ``(D, Z)`` (with ``bias`` when fitted).
    history : list[float]
        Loss after every outer iteration of the best restart.
    t2_history : list[float]
        T2 violation after every outer iteration of the best restart.
    restart_losses : list[float]
        Final loss of every restart (with ``finish_restarts="best"``, the screening loss of
        those not finished).
    n_iter : int
        Outer iterations (block sweeps or quasi-Newton steps) of the best restart.
    converged : bool
        Whether the best restart reached ``t2_violation <= tol`` (and, with a fitted bias,
        ``‖mean_n r_n‖ <= tol``).
    seconds : float
        Wall time of the whole call.
    bias : array (n_features,) or None
        The fitted decoder bias ``b`` (``None`` unless ``fit_bias=True``).
    message : str
        How the best restart ended: ``"converged"``, or why it stopped (``max_iter`` or
        ``time_limit``) with its T2.
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
    bias: Any = None
    message: str = "converged"


def _t2(V, Bdiag, zsum, D, lam):
    """T2 violation from ``V = Σ_n z_kn r_n`` (rows), ``diag(ZᵀZ)`` and ``zsum = Zᵀ1``."""
    proj = (V * D).sum(1)
    tang = (V - proj.unsqueeze(1) * D).norm(dim=1)
    scale = Bdiag + lam * zsum
    used = zsum > 0
    t = torch.where(used, tang / scale.clamp(min=torch.finfo(D.dtype).tiny), torch.zeros_like(tang))
    return float(t.max()) if t.numel() else 0.0


def _sweeps(A, B, D, n_sweeps, bias=None):
    """Block-coordinate sweeps ``d_k ← normalise(A_k - Σ_{j≠k} B_kj d_j)`` (in place).

    With ``bias = (b, xbar, zbar)`` the bias is updated after every sweep to its best value
    ``b = xbar - zbarᵀD`` given the codes, and ``A = ZᵀX - zsum bᵀ`` follows it.
    """
    # On the CPU the same steps run on NumPy views of the tensors: a fraction of torch's
    # per-call cost for these small vectors.
    cpu = D.device.type == "cpu"
    a, b, dn = (A.numpy(), B.numpy(), D.numpy()) if cpu else (A, B, D)
    diag = b.diagonal().tolist()
    active = [j for j, v in enumerate(diag) if v > 0]
    if bias is not None:
        bb, xbar, zsum, n = bias
        bn, xb, zs = (bb.numpy(), xbar.numpy(), zsum.numpy()) if cpu else (bb, xbar, zsum)
        a0 = a + zs[:, None] * bn[None, :]            # ZᵀX, from A = Zᵀ(X - b)
    for _ in range(n_sweeps):
        for j in active:
            v = a[j] - b[j] @ dn
            v += diag[j] * dn[j]
            nv = math.sqrt(float(v @ v))
            if nv > 0:
                dn[j] = v / nv
        if bias is not None:
            bn[:] = xb - (zs @ dn) / n
            a[:] = a0 - zs[:, None] * bn[None, :]
    return D


def _support_systems(Z, D, ridge):
    """Padded supports of the rows of ``Z`` and their Gram blocks, factorised.

    Yields ``(rows, idx, L, ok)`` for groups of rows (about 2**22 Gram entries each, so
    memory stays bounded): ``rows`` (m,) their indices in ``Z``, ``idx`` (m, w) each row's
    positive columns in increasing order, padded with ``K`` (padding entries get an identity
    block and, from the callers, a zero right-hand side, so they solve to zero), ``L`` the
    Cholesky factors of ``G = D_S D_Sᵀ`` and ``ok`` the rows whose block was positive
    definite (the others got a small ridge). The blocks are gathered by
    :class:`companion.coding._Dict` (from its Gram matrix when it has one). Where the widest
    support has ``_GROUP_FROM`` atoms or more, rows are sorted by support size and
    factorised in up to ``_BUCKETS`` groups (as encode does), each padded to its own widest
    support: a factorisation costs the cube of the padded width, a solve its square (MiniLM
    codes, n = 10⁴, K = 1536: 22 atoms a row on average, 63 at most).
    """
    K = D.shape[0]
    n = Z.shape[0]
    idx, _ = _supports_of(Z, K, K)                   # cap K: every positive entry
    Dc = _Dict(D)
    allrows = torch.arange(n, device=Z.device)
    if idx.shape[1] >= _GROUP_FROM and n >= 2 * _BUCKET_ROWS:
        order = torch.sort((idx < K).sum(1), stable=True).indices
        n_groups = min(_BUCKETS, n // _BUCKET_ROWS)
        groups = [order[n * g // n_groups:n * (g + 1) // n_groups] for g in range(n_groups)]
    else:
        groups = [allrows]
    for rows_g in groups:
        ig = idx.index_select(0, rows_g)
        w = int((ig < K).sum(1).max()) if ig.numel() else 0
        ig = ig[:, :w]                               # a row's padding comes after its atoms
        eye = torch.eye(w, dtype=D.dtype, device=D.device)
        step = max(1, (1 << 22) // max(1, w * w))
        for s in range(0, rows_g.shape[0], step):
            ic = ig[s:s + step]
            G = Dc.gram(ic)
            L, info = torch.linalg.cholesky_ex(G)
            ok = info == 0
            if not bool(ok.all()):
                L[~ok] = torch.linalg.cholesky(G[~ok] + (1e4 * ridge + 1e-8) * eye)
            yield rows_g[s:s + step], ic, L, ok


def _projectors(D, k1):
    """Tangent projectors ``Π_k = I - d_k d_kᵀ`` of the atoms, then ``I`` for the bias
    (``k1 = K + 1``), as (k1, d, d)."""
    K, d = D.shape
    Pi = torch.eye(d, dtype=D.dtype, device=D.device).expand(k1, d, d).clone()
    Pi[:K] -= D.unsqueeze(2) * D.unsqueeze(1)
    return Pi


def _direction_rows(P, K, b, Zm):
    """A direction's atom rows ``U``, its bias row ``u_b`` (``None`` without a bias) and
    ``zU + u_b`` for every row of the codes (``Zm``: the codes or their CSR copy)."""
    U = P[:K]
    ub = None if b is None else P[K]
    ZU = Zm @ U
    return U, ub, ZU if ub is None else ZU + ub


def _riemannian_rows(H, D, U, proj, ub, dR):
    """The Riemannian Hessian product from the Euclidean one ``H`` (atom rows): the tangent
    projection, minus the Weingarten term ``proj · U``, then the bias row ``-mean(dR)``."""
    H = H - (H * D).sum(1, keepdim=True) * D - proj * U
    return H if ub is None else torch.cat([H, -dR.mean(0, keepdim=True)])


def _products(Z):
    """``Z`` itself, or a CSR copy of it where products with it cost less that way: the fit
    multiplies codes by dense matrices (``Z D``, ``Zᵀ X``, ``Zᵀ Z``, ``Zᵀ R``), and exact codes
    are sparse (an SAE's: a few percent of the entries). Both kinds take ``Z @ Y`` and
    ``Z.t() @ Y``. Sparse on the CPU where ``Z`` has at least ``_SPARSE_MIN`` entries, at
    most one in ``_SPARSE_DIV`` of them nonzero (see there for the measurements); on a GPU
    the dense products are fast, and this path is tested on the CPU only."""
    if (Z.device.type != "cpu" or Z.numel() < _SPARSE_MIN
            or int(torch.count_nonzero(Z)) * _SPARSE_DIV > Z.numel()):
        return Z
    with warnings.catch_warnings():                     # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return Z.to_sparse_csr()


def _loss(X, D, Z, lam, Zs=None):
    """The joint loss of ``(D, Z)`` on ``X`` and the residuals (``Zs``: ``_products(Z)``)."""
    R = X - (_products(Z) if Zs is None else Zs) @ D
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
    fit_bias: bool = False,
    init_bias: Any = None,
    method: str = "lbfgs",
    n_threads: int | None = 1,
    finish_restarts: str = "all",
) -> DictionaryFit:
    r"""Learn a unit-norm dictionary to a certified stationary point of the joint loss (Chapter 2).

    Minimises :math:`F_b(D)=\frac1N\sum_n\min_{z_n\ge0}\tfrac12\|x_n-b-z_nD\|^2+\lambda\mathbf 1^\top z_n`
    over unit-norm rows of ``D`` (and, with ``fit_bias``, an unpenalised bias ``b``; else
    ``b = 0``) until the T2 violation
    :math:`\max_k\|(I-d_kd_k^\top)\sum_n z_{kn}r_n\|/(\|z_k\|_2^2+\lambda\|z_k\|_1)` is at most
    ``tol`` (and, with a bias, :math:`\|\frac1N\sum_n r_n\|\le` ``tol``, its stationarity
    condition, Chapter 1) at exact codes (T1). While that violation exceeds ``1e-2``
    (``0.1`` for Newton) and the sweeps still halve it within ten iterations, ``n_sweeps``
    block sweeps :math:`d_k\leftarrow\mathrm{normalise}(\sum_n z_{kn}e_n^{(k)})`
    (T2 in centroid form) alternate with three active-set rounds of the codes; then
    Riemannian L-BFGS (default) or damped Riemannian Newton-CG (``method="newton"``: the
    Hessian of the value function with the supports held fixed) on the spheres takes over,
    each evaluation exact codes and Danskin's gradient (see the module docstring). The loss
    never increases.

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
        Outer iterations per restart (block sweeps and quasi-Newton steps together).
    tol : float
        Target T2 violation (the codes are exact, so T1 holds to the encode tolerance).
    init : "data", "random" or array (n_atoms, n_features)
        ``"data"``: distinct random rows of ``X`` (centred by the initial bias when one is
        fitted), normalised; ``"random"``: Gaussian directions; an array: the initial
        dictionary ``D0`` (rows are normalised).
    seed : int
        Seed of the initialisation (a CPU ``torch.Generator``, so CPU and GPU agree).
    resample_dead : bool
        Replace a dead atom by the §3 new-atom direction when it lowers the loss.
    progress : bool
        tqdm bar over iterations (stderr; honours ``TQDM_DISABLE``).
    n_sweeps : int
        Atom sweeps per encode in the block-sweep phase.
    extrapolate : bool
        In the block-sweep phase, try ``D + β(D - D_prev)`` (normalised) and keep it only
        when the loss falls (tested first with the previous codes, so a rejected step costs
        no encode).
    chunk_size : int, optional
        Rows per chunk for encode/certify.
    time_limit : float, optional
        Stop a restart after this many seconds.
    callback : callable, optional
        Called as ``callback(iteration, loss, t2)`` after every outer iteration.
    fit_bias : bool
        Fit the decoder bias ``b`` jointly (an unpenalised signed atom; its stationarity
        condition is :math:`\sum_n r_n = 0`, :math:`r_n = x_n - b - z_nD`).
    init_bias : array (n_features,), optional
        Starting bias when ``fit_bias`` (default: the data mean).
    method : "lbfgs", "newton" or "sweeps"
        ``"lbfgs"`` (the default): block sweeps, then Riemannian L-BFGS below T2 = ``1e-2``
        or once the sweeps stall (on MiniLM activations, 10⁴ tokens, d = 384, K = 1536, from
        an SAE's dictionary with a fitted bias, T2 ≤ 1e-5 after 458 iterations:
        ``bench/bench_dictionary.py --lm``);
        ``"newton"``: block sweeps, then damped Riemannian Newton-CG below T2 = ``0.1`` with
        warm exact codes (faster on small dense problems, e.g. Gaussian data with d = 16;
        slower where d is large, e.g. MiniLM activations, d = 384, whose Hessian products
        cost more than the L-BFGS steps they save; with at most 128 unknowns, ``K·d`` plus
        ``d`` for a bias, each step is a dense Cholesky solve instead of CG); ``"sweeps"``:
        block sweeps with exact codes to the end (the alternating minimisation of earlier
        versions).
    n_threads : int or None
        CPU intra-op threads during the fit (restored afterwards). The default, one, makes
        the fit's arithmetic independent of the machine's load and of torch's thread
        setting (bitwise reproducible on a given CPU) and avoids OpenMP spin-waiting on busy
        machines; ``None`` keeps torch's setting, whose reductions split by thread count, so
        fits on one and two threads then agree only to rounding.
    finish_restarts : "all" or "best"
        ``"all"``: every restart is fitted to the end. ``"best"`` (``method="newton"`` only;
        ignored otherwise): every
        restart is fitted until its T2 is at most ``1e-2`` (exact codes), and only the one
        with the lowest loss there is finished; the others' ``restart_losses`` are their
        losses at that point. A screen, not a guarantee: the restart ranked first there is
        usually, not always, the one that ends lowest.

    Returns
    -------
    DictionaryFit

    Warns
    -----
    ConvergenceWarning
        When the best restart stops (``max_iter`` or ``time_limit``) with T2 (or the bias
        stationarity) above ``tol``; ``DictionaryFit.message`` says why.
    """
    t_start = time.perf_counter()
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    n_restarts = check_positive_int(n_restarts, "n_restarts")
    max_iter = check_positive_int(max_iter, "max_iter")
    n_sweeps = check_positive_int(n_sweeps, "n_sweeps")
    tol = check_positive(tol, "tol")
    if finish_restarts not in ("all", "best"):
        raise ValueError(f"finish_restarts must be 'all' or 'best', got {finish_restarts!r}")
    if method not in ("newton", "lbfgs", "sweeps"):
        raise ValueError(f"method must be 'newton', 'lbfgs' or 'sweeps', got {method!r}")
    if n_threads is not None:
        n_threads = check_positive_int(n_threads, "n_threads")
    n, d = Xt.shape
    if n == 0:
        raise ValueError("X must have at least one row (sample)")
    b0 = None
    if fit_bias:
        if init_bias is None:
            b0 = Xt.mean(0)
        else:
            b0, _ = as_tensor(init_bias, "init_bias", ndim=1, like=Xt)
            if b0.shape[0] != d:
                raise ValueError(f"init_bias has {b0.shape[0]} entries but X has {d} columns")
    elif init_bias is not None:
        raise ValueError("init_bias is given but fit_bias=False; pass fit_bias=True to fit a bias")
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
    pause_at = _SCREEN if finish_restarts == "best" and method == "newton" else None
    runs = []
    opts = dict(lam=lam, tol=tol, max_iter=max_iter, n_sweeps=n_sweeps, etol=etol,
                chunk_size=chunk_size, resample_dead=resample_dead, extrapolate=extrapolate,
                progress=progress, time_limit=time_limit, callback=callback, method=method)
    with torch.no_grad(), cpu_threads(n_threads if Xt.device.type == "cpu" else None):
        for r in range(n_restarts):
            if D0 is not None:
                D = D0 / D0.norm(dim=1, keepdim=True)
            else:
                g = generator(seed + r)
                if init == "data":
                    rows = torch.randperm(n, generator=g)[:n_atoms].to(Xt.device)
                    D = Xt[rows].clone() if b0 is None else Xt[rows] - b0
                    small = D.norm(dim=1) <= 1e-12
                    if bool(small.any()):
                        D[small] = torch.randn(int(small.sum()), d, generator=g, dtype=Xt.dtype).to(Xt.device)
                else:
                    D = torch.randn(n_atoms, d, generator=g, dtype=Xt.dtype).to(Xt.device)
                D = D / D.norm(dim=1, keepdim=True)
            runs.append(_Fit(Xt, D, None if b0 is None else b0.clone(),
                             label=f"{r + 1}/{n_restarts}", **opts).run(pause_at))
        paused = [f for f in runs if f.state == "paused"]
        if paused:                                    # finish the lowest at the screen
            min(paused, key=lambda f: f.loss).resume()
            for f in paused:
                f.bar.close()
        restart_losses = [f.loss for f in runs]
        best = min((f for f in runs if f.state == "done"), key=lambda f: f.loss)
        kw = {} if best.b is None else {"bias": best.b}
        cert = _certify_tensor(Xt, best.D, lam, best.Z, kind, chunk_size, 0.0, False, 8192, None,
                               200, 2, 5000, **kw)
    if not best.converged:
        warnings.warn(f"fit_dictionary did not reach tol={tol:g}: {best.message}",
                      ConvergenceWarning, stacklevel=2)
    return DictionaryFit(D=kind.out(best.D), Z=kind.out(best.Z), loss=best.loss, certificate=cert,
                         history=best.hist, t2_history=best.t2h, restart_losses=restart_losses,
                         n_iter=best.n_iter, converged=best.converged,
                         seconds=time.perf_counter() - t_start,
                         bias=None if best.b is None else kind.out(best.b), message=best.message)


class _Fit:
    """One restart: block sweeps, then Riemannian L-BFGS (see the module docstring)."""

    def __init__(self, X, D, b, *, lam, tol, max_iter, n_sweeps, etol, chunk_size, resample_dead,
                 extrapolate, progress, time_limit, callback, method, label):
        self.X, self.D, self.b = X, D, b
        self.lam, self.tol, self.max_iter, self.n_sweeps = lam, tol, max_iter, n_sweeps
        self.etol, self.chunk_size = etol, chunk_size
        self.resample_dead, self.extrapolate = resample_dead, extrapolate
        self.time_limit, self.callback, self.method = time_limit, callback, method
        self.bar = progress_bar(total=max_iter, progress=progress, desc=f"fit_dictionary {label}")
        self.progress = progress
        self.n = X.shape[0]
        self.ridge = 1e-12 if X.dtype == torch.float64 else 1e-6
        self.xbar = X.mean(0) if b is not None else None
        self.exact = False
        self.hist, self.t2h = [], []
        self.it = 0
        self.converged = False
        self.message = ""
        self.t0 = time.perf_counter()

    # -- pieces ----------------------------------------------------------------------------
    def centred(self, b=None):
        b = self.b if b is None else b
        return self.X if b is None else self.X - b

    def enc(self, Xc, D, Z):
        """Codes of ``Xc``: exact once ``self.exact``, else three active-set rounds from ``Z``."""
        if self.exact:
            if Z is not None and self.method == "newton":
                return self.warm_exact(Xc, D, Z)
            return _encode_tensor(Xc, D, self.lam, self.etol, 200, self.chunk_size, Z, False, 2,
                                  5000)[0]
        return _encode_tensor(Xc, D, self.lam, self.etol, _PARTIAL_ROUNDS, self.chunk_size, Z,
                              False, 2, 0)[0]

    def warm_exact(self, Xc, D, Z):
        """Exact codes at ``D`` from the supports of ``Z`` (the previous iterate's).

        Every row first solves its old support system at the new ``D``; where that code is
        positive and meets T1 to encode's own per-row tolerance (``max(tol·λ, 4 eps ‖x_n‖)``,
        on and off the support) it is exact and kept. Only the other rows, whose support
        changed, go to :func:`companion.encode` (warm-started). After a small step most
        supports are unchanged, so this costs one batched solve and two products.
        """
        lam = self.lam
        K = D.shape[0]
        C = Xc.new_empty(Xc.shape[0], K + 1)
        torch.mm(Xc, D.T, out=C[:, :K])
        C[:, K] = lam
        Zn = torch.zeros(Xc.shape[0], K + 1, dtype=Xc.dtype, device=Xc.device)
        good = torch.ones(Xc.shape[0], dtype=torch.bool, device=Xc.device)
        supports = []
        for rows, ic, L, ok in _support_systems(Z, D, self.ridge):
            supports.append((rows, ic))
            flat = (rows * (K + 1)).unsqueeze(1) + ic      # entries of C and Zn (row stride K+1)
            zs = torch.cholesky_solve((C.view(-1)[flat] - lam).unsqueeze(2), L).squeeze(2)
            valid = ic < K
            good[rows] = ok & ((zs > 0) | ~valid).all(1)
            Zn.view(-1)[flat] = torch.where(valid, zs, torch.zeros_like(zs))
        Zn = Zn[:, :K].contiguous()
        V = (Xc - _products(Zn) @ D) @ D.T               # d_kᵀ r
        # T1: max over atoms of (d_kᵀr - λ)₊, and of |d_kᵀr - λ| on the support (the
        # same maxima as row-wise where(z > 0, |V - λ|, (V - λ)₊), without four (n, K) passes)
        viol = (V.amax(1) - lam).clamp(min=0) if K else V.new_zeros(len(V))
        for rows, ic in supports:
            if ic.shape[1]:
                on = (V.view(-1)[(rows * K).unsqueeze(1) + ic.clamp(max=K - 1)] - lam).abs()
                on = torch.where(ic < K, on, torch.zeros((), dtype=V.dtype)).amax(1)
                viol[rows] = torch.maximum(viol[rows], on)
        eps = torch.finfo(Xc.dtype).eps
        good &= viol <= torch.clamp(4.0 * eps * Xc.norm(dim=1), min=self.etol * lam)
        bad = torch.nonzero(~good).flatten()
        if bad.numel():
            Zn[bad] = _encode_tensor(Xc[bad], D, lam, self.etol, 200, self.chunk_size, Z[bad],
                                     False, 2, 5000)[0]
        return Zn

    def bias_violation(self, R):
        return 0.0 if self.b is None else float(R.mean(0).norm())

    def record(self, t2, bias_v):
        """Log one outer iteration; ``"stationary"`` at a stationary point (exact codes),
        True when a limit stops the restart, else False."""
        self.t2h.append(t2)
        self.hist.append(self.loss)
        if self.callback is not None:
            self.callback(self.it, self.loss, t2)
        if self.progress:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss:.6e}", t2=f"{t2:.1e}")
        self.it += 1
        if self.exact and t2 <= self.tol and bias_v <= self.tol:
            return "stationary"
        if self.it >= self.max_iter:
            self.message = f"stopped at max_iter={self.max_iter}"
            return True
        if self.time_limit is not None and time.perf_counter() - self.t0 > self.time_limit:
            self.message = f"stopped at time_limit={self.time_limit:g} s"
            return True
        return False

    def try_new_atom(self, R):
        """Replace one dead atom by the §3 new-atom direction when that lowers the loss."""
        dead = torch.nonzero(self.zsum <= 0).flatten()
        if not (self.resample_dead and dead.numel()):
            return False
        norms = R.norm(dim=1)
        pool = R[norms > self.lam]
        if pool.shape[0] > 8192:
            pool = pool[norms[norms > self.lam].topk(8192).indices]
        u, gain, excess = _best_new_atom(pool, self.lam, self.n)
        # a gain below the rounding level of the loss cannot lower it: the atom dies again at
        # once and the fit cycles (seen: 60 points on five rays, K = 5, gain 1e-19 offered
        # 992 times until max_iter, each time resetting L-BFGS)
        if not (gain > 4 * torch.finfo(self.X.dtype).eps * abs(self.loss) and excess > 0):
            return False
        self.D = self.D.clone()
        self.D[int(dead[0])] = u
        return True

    def set_codes(self, Z):
        self.Z = Z
        self.loss, R = _loss(self.centred(), self.D, Z, self.lam)
        self.zsum = Z.sum(0)
        return R

    # -- the run ---------------------------------------------------------------------------
    def run(self, pause_at=None):
        """Fit from the start; with ``pause_at``, pause the Newton phase at the first exact
        iterate with T2 <= ``pause_at`` (``self.state == "paused"``; :meth:`resume` goes on)."""
        self.pause_at = pause_at
        R = self.set_codes(self.enc(self.centred(), self.D, None))
        self.state = "stop" if self.sweep_phase(R) else "quasi"
        return self.resume()

    def resume(self):
        """Continue (or finish) the fit to a stop, then take exact codes and the message."""
        if self.state in ("quasi", "paused"):
            quasi = {"lbfgs": self.lbfgs_phase, "newton": self.newton_phase}.get(self.method)
            out = None if quasi is None else quasi()
            if out == "paused":
                self.state = "paused"
                return self
            if out == "floor":
                # the quasi-Newton steps reached the rounding floor of the line search before
                # tol (very tight tolerances): exact block sweeps finish, as in method="sweeps"
                self.method = "sweeps"
                Xc = self.centred()
                self.sweep_phase(Xc - _products(self.Z) @ self.D)
        self.state = "done"
        self.bar.close()
        if not self.exact:                  # stopped early (max_iter, time_limit): exact codes
            self.exact = True
            self.set_codes(self.enc(self.centred(), self.D, self.Z))
        if self.converged:
            self.message = "converged"
        else:
            Xc = self.centred()
            Zs = _products(self.Z)
            R = Xc - Zs @ self.D
            t2 = _t2(Zs.t() @ R, (self.Z * self.Z).sum(0), self.zsum, self.D, self.lam)
            bv = self.bias_violation(R)
            self.message += f" with T2 = {t2:.3g}" + (f", |mean r| = {bv:.3g}" if self.b is not None
                                                     else "") + f" (tol {self.tol:g})"
        self.n_iter = self.it
        return self

    def sweep_phase(self, R):
        """Block sweeps until T2 <= ``_EXACT_BELOW`` or the sweeps stall (then the
        second-order phase) or, with ``method='sweeps'``, to the end; True: stop."""
        X, lam = self.X, self.lam
        beta = 1.0
        swept = []                                       # T2 of this phase's iterates
        while True:
            Xc = self.centred()
            Z = self.Z
            Zs = _products(Z)
            A, B = Zs.t() @ Xc, Zs.t() @ Z
            t2 = _t2(A - B @ self.D, B.diagonal(), self.zsum, self.D, lam)
            bias_v = self.bias_violation(R)
            below = _EXACT_BELOW if self.method == "newton" else _EXACT_BELOW_QN
            swept.append(t2)
            stalled = (self.method != "sweeps" and len(swept) >= 2 * _STALL
                       and min(swept[-_STALL:]) > 0.5 * min(swept[-2 * _STALL:-_STALL]))
            if not self.exact and (t2 <= max(below, self.tol) or stalled):
                self.exact = True
                R = self.set_codes(self.enc(Xc, self.D, Z))
                if self.method != "sweeps":
                    return False
                Z = self.Z
                Zs = _products(Z)
                A, B = Zs.t() @ Xc, Zs.t() @ Z
                t2 = _t2(A - B @ self.D, B.diagonal(), self.zsum, self.D, lam)
                bias_v = self.bias_violation(R)
            state = self.record(t2, bias_v)
            if state is True:
                return True
            if self.try_new_atom(R):
                R = self.set_codes(self.enc(self.centred(), self.D, self.Z))
                continue
            if state:
                self.converged = True
                return True
            D, b = self.D, self.b
            bias = None if b is None else (b.clone(), self.xbar, self.zsum, float(self.n))
            D_new = _sweeps(A, B, D.clone(), self.n_sweeps, bias)
            b_new = None if b is None else bias[0]
            Xn = X if b_new is None else X - b_new
            accepted = False
            if self.extrapolate:
                # over-relax along the sweep step; keep it only if the loss falls below the
                # current one (monotone safeguard), else take the plain step. The test is
                # first made with the old codes, which costs no encode: re-encoding can only
                # lower that loss, so a step that passes it is kept.
                D_try = D_new + beta * (D_new - D)
                D_try = D_try / D_try.norm(dim=1, keepdim=True).clamp(min=1e-300)
                loss_try = math.inf
                if _loss(Xn, D_try, Z, lam, Zs)[0] < self.loss:
                    Z_try = self.enc(Xn, D_try, Z)
                    loss_try, R_try = _loss(Xn, D_try, Z_try, lam)
                if loss_try < self.loss:
                    self.D, self.b = D_try, b_new
                    R = self.set_codes(Z_try)
                    beta = min(beta * 1.5, 20.0)
                    accepted = True
                else:
                    beta = max(beta / 4, 0.25)
            if not accepted:
                self.D, self.b = D_new, b_new
                R = self.set_codes(self.enc(Xn, D_new, Z))

    # -- Riemannian Newton-CG --------------------------------------------------------------
    def hessian_model(self, D, b, Z, R, Gd):
        """The Riemannian Hessian of ``F_b`` at ``(D, b)`` (Euclidean gradient ``Gd``) with
        the supports of ``Z`` held fixed, as a function ``U -> Hess[U]`` on the tangent space
        (atom rows, then the bias row).

        On the support ``S`` of a row the code solves ``G z_S = D_S(x - b) - λ1`` with
        ``G = D_S D_Sᵀ``; differentiating, ``G dz_S = U_S r - D_S(zU + u_b)`` and
        ``dr = -dz D - zU - u_b``, so the Euclidean Hessian is
        ``-(1/N)(dZᵀR + ZᵀdR)`` (atoms) and ``-(1/N)Σ_n dr_n`` (bias). On the spheres the
        Riemannian Hessian is its tangent projection minus ``(d_kᵀ∇_k F) U_k`` (the
        Weingarten term). It is F's exact Hessian wherever no support changes nearby.
        """
        K = D.shape[0]
        n = Z.shape[0]
        # inverse Gram blocks (many products per factorisation)
        chunks = [(rows, ic, torch.cholesky_inverse(L))
                  for rows, ic, L, _ in _support_systems(Z, D, self.ridge)]
        proj = (D * Gd[:K]).sum(1, keepdim=True)  # d_kᵀ ∇_k F (the Weingarten term)
        Zs = _products(Z)
        if Zs is not Z:
            return self._sparse_hv(D, b, Z, Zs, R, chunks, proj)
        # entries of the supports in (n, K+1) arrays (column K: padding, kept at zero)
        chunks = [((rows * (K + 1)).unsqueeze(1) + ic, Gi) for rows, ic, Gi in chunks]
        RZ = torch.cat([R, Z.new_zeros(n, D.shape[1])], 1)  # [R, -ZU] of every call
        Q = Z.new_zeros(n, K + 1)
        dZ = Z.new_zeros(n, K + 1)
        ZdZ = torch.cat([Z, Z], 0)                            # [Z; dZ] of every call
        RdR = torch.cat([R, R], 0)                            # [dR; R] of every call

        def hv(P):
            U, ub, ZU = _direction_rows(P, K, b, Z)
            # q = U_S r - D_S(zU + u_b), and G dz_S = q on every support
            torch.neg(ZU, out=RZ[:, R.shape[1]:])
            torch.mm(RZ, torch.cat([U, D], 1).T, out=Q[:, :K])
            for flat, Gi in chunks:
                dZ.view(-1)[flat] = torch.bmm(Gi, Q.view(-1)[flat].unsqueeze(2)).squeeze(2)
            dZk = dZ[:, :K]
            dR = -(dZk @ D) - ZU
            # dZᵀR + ZᵀdR as one product
            ZdZ[n:] = dZk
            RdR[:n] = dR
            return _riemannian_rows(-(ZdZ.T @ RdR) / n, D, U, proj, ub, dR)
        return hv

    def _sparse_hv(self, D, b, Z, Zs, R, chunks, proj):
        """:meth:`hessian_model`'s product for sparse codes (``Zs``, their CSR copy): the same
        formulas, with ``q = U_S r - D_S(zU + u_b)`` sampled on the supports only
        (``torch.sparse.sampled_addmm``) instead of two dense (n, K) products, and ``dZ``
        kept in the codes' sparsity pattern. The support entries of ``Zs`` (row-major) are
        the padded supports of :func:`_support_systems` (slot ``j`` of a row is its
        ``j``-th nonzero column), so values move between the two layouts by index."""
        K = D.shape[0]
        n = Z.shape[0]
        crow, col = Zs.crow_indices(), Zs.col_indices()
        rows = torch.repeat_interleave(torch.arange(n, device=Z.device), crow[1:] - crow[:-1])
        slot = torch.arange(col.numel(), device=Z.device) - crow[:-1][rows]
        w = max((ic.shape[1] for _, ic, _ in chunks), default=0)

        def hv(P):
            U, ub, ZU = _direction_rows(P, K, b, Zs)
            with warnings.catch_warnings():             # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                q = torch.sparse.sampled_addmm(Zs, torch.cat([R, -ZU], 1),
                                               torch.cat([U, D], 1).T, beta=0.0).values()
                Q = Z.new_zeros(n, w)
                Q[rows, slot] = q
                dz = torch.zeros_like(Q)
                for rg, ic, Gi in chunks:               # a group's supports: its first slots
                    w_g = ic.shape[1]
                    dz[rg, :w_g] = torch.bmm(Gi, Q[rg, :w_g].unsqueeze(2)).squeeze(2)
                dZ = torch.sparse_csr_tensor(crow, col, dz[rows, slot], size=Z.shape)
                dR = -(dZ @ D) - ZU
                H = -(dZ.t() @ R + Zs.t() @ dR) / n
            return _riemannian_rows(H, D, U, proj, ub, dR)
        return hv

    def dense_hessian(self, D, b, Z, R, Gd):
        """The matrix of :meth:`hessian_model` on ``vec(U)`` (atom rows, then the bias row),
        assembled in closed form for small problems.

        Write ``θ = (U, u_b)`` and ``z̃_n = (z_n, 1)`` (the bias is an atom of code one and no
        penalty). A row's residual moves by ``-(dz D + w)`` with ``w = Σ_k z̃_k θ_k``, and its
        fixed-support code by ``dz_S = G⁻¹ q``, ``q_i = θ_iᵀ r - d_iᵀ w``; its value's second
        variation is ``‖w‖² - qᵀG⁻¹q``. With ``M̃`` = ``G⁻¹`` scattered to the atoms' indices,
        ``W̃ = M̃ D`` and ``P = Dᵀ M̃ D``, the Euclidean Hessian's ``(l, a), (m, b)`` entry is

        .. math::
            \\frac1N\\sum_n \\tilde z_l\\tilde z_m(\\delta_{ab} - P_{ab}) - \\tilde M_{lm} r_a r_b
            + r_a\\tilde z_m \\tilde W_{lb} + \\tilde W_{ma}\\tilde z_l r_b ,

        each sum over rows one matrix product with the data. The Riemannian Hessian is its
        projection ``Π H Π`` onto the tangent spaces minus the Weingarten term
        ``(d_kᵀ∇_k F) Π_k`` on the diagonal blocks (as in :meth:`hessian_model`).
        """
        K, d = D.shape
        n = Z.shape[0]
        k1 = K if b is None else K + 1
        Zt = Z if b is None else torch.cat([Z, Z.new_ones(n, 1)], 1)
        Mt = Z.new_zeros(n, K + 1, K + 1)
        for rows, ic, L, _ in _support_systems(Z, D, self.ridge):
            m = ic.shape[0]
            flat = ((rows * (K + 1) ** 2).view(m, 1, 1) + (ic * (K + 1)).unsqueeze(2)
                    + ic.unsqueeze(1))
            Mt.view(-1)[flat] = torch.cholesky_inverse(L)
        Mt[:, K] = 0                                   # index K: the supports' padding
        Mt[:, :, K] = 0
        Mt = Mt[:, :k1, :k1]
        Dt = D if b is None else torch.cat([D, D.new_zeros(1, d)])
        W = Mt @ Dt                                     # (n, k1, d)
        P = Dt.T @ W                                    # (n, d, d)
        eye = torch.eye(d, dtype=D.dtype, device=D.device)
        pairs = (Zt.unsqueeze(2) * Zt.unsqueeze(1)).view(n, -1).T
        H = ((Zt.T @ Zt).view(k1, k1, 1, 1) * eye
             - (pairs @ P.view(n, -1)).view(k1, k1, d, d)
             - (Mt.reshape(n, -1).T @ (R.unsqueeze(2) * R.unsqueeze(1)).view(n, -1))
             .view(k1, k1, d, d)).permute(0, 2, 1, 3)
        TW = (W.reshape(n, -1).T @ (Zt.unsqueeze(2) * R.unsqueeze(1)).view(n, -1))
        TW = TW.view(k1, d, k1, d).permute(0, 3, 2, 1)  # [(l, b), (m, a)] -> [l, a, m, b]
        H = (H + TW + TW.permute(2, 3, 0, 1)) / n
        Pi = _projectors(D, k1)
        H = torch.einsum("lab,lbmc,mcd->lamd", Pi, H, Pi)
        proj = (D * Gd[:K]).sum(1)
        idx = torch.arange(K, device=D.device)
        H[idx, :, idx, :] -= proj.view(K, 1, 1) * Pi[:K]
        return H.reshape(k1 * d, k1 * d)

    def dense_solve(self, D, H, M, mu, g):
        """The Newton direction ``(Hess + μ diag(M)) p = -g`` on the tangent space by a
        Cholesky factorisation (``None`` when that matrix is not positive definite). The
        normal directions get the block ``M_k(I - Π_k)`` and a dead atom (``M_k = 0``) the
        identity, which decouples them from the tangent space and gives them ``p = 0``."""
        d = D.shape[1]
        k1 = M.shape[0]
        A = H.view(k1, d, k1, d).clone()
        Pi = _projectors(D, k1)
        eye = torch.eye(d, dtype=D.dtype, device=D.device)
        Mv = M.view(k1, 1, 1)
        block = torch.where(Mv > 0, Mv * (mu * Pi + (eye - Pi)), eye)
        idx = torch.arange(k1, device=D.device)
        A[idx, :, idx, :] += block
        L, info = torch.linalg.cholesky_ex(A.view(k1 * d, k1 * d))
        if int(info):
            return None
        p = torch.cholesky_solve(-g.reshape(-1, 1), L).view_as(g)
        return self.tangent(D, p)

    def newton_phase(self):
        """Riemannian Newton-CG steps, damped Levenberg–Marquardt style, until a stop;
        ``"floor"`` when no decrease can be found.

        The step solves ``(Hess + μ diag(M)) p = -g`` by truncated CG (or, with at most
        ``_DENSE_DIM`` unknowns, by a Cholesky factorisation of the assembled Hessian), with
        ``M`` the per-atom curvature scale; ``μ`` shrinks when the loss falls as the
        fixed-support model predicts and grows when it falls less (support changes the model
        does not see), so far from a stationary point the step leans to the scaled gradient (the
        centroid step) and near one it is Newton's, which converges quadratically.
        """
        D, b = self.D, self.b
        resumed = self.state == "paused"                 # this iterate is already recorded
        if resumed:
            (Z, loss, R, G, M, zsum, V), mu = self.saved
            del self.saved
        else:
            Z, loss, R, G, M, zsum, V = self.evaluate(D, b, self.Z)
            mu = _MU[0]
        self.Z, self.loss, self.zsum = Z, loss, zsum
        self.pause_at, pause_at = None, self.pause_at
        while True:
            g = self.tangent(D, G)
            t2 = _t2(V, (Z * Z).sum(0), zsum, D, self.lam)
            bias_v = self.bias_violation(R)
            state = False if resumed else self.record(t2, bias_v)
            resumed = False
            if state is True:
                return
            if state is False and pause_at is not None and t2 <= pause_at:
                self.saved = (Z, loss, R, G, M, zsum, V), mu
                return "paused"
            if self.try_new_atom(R):
                D = self.D
                Z, loss, R, G, M, zsum, V = self.evaluate(D, b, Z)
                self.Z, self.loss, self.zsum = Z, loss, zsum
                continue
            if state:
                self.converged = True
                return
            if g.numel() <= _DENSE_DIM:
                H = self.dense_hessian(D, b, Z, R, G)

                def hv(P, H=H):
                    return (H @ P.reshape(-1)).view_as(P)

                def solve(mu, H=H, M=M, g=g):
                    return self.dense_solve(D, H, M, mu, g)
            else:
                hv = self.hessian_model(D, b, Z, R, G)
                Mr = M.unsqueeze(1)
                inv = torch.where(Mr > 0, 1.0 / Mr.clamp(min=torch.finfo(M.dtype).tiny),
                                  torch.zeros_like(Mr))
                eta = min(0.5, t2 ** _ETA_POW)

                def solve(mu, hv=hv, Mr=Mr, inv=inv, eta=eta, g=g):
                    return self.cg(lambda P: hv(P) + (mu * Mr) * P, g, inv, eta)
            step = None
            for _ in range(_MAX_BACKTRACK):
                p = solve(mu)
                if p is None:                            # not positive definite: damp more
                    mu = max(_MU[1] * mu, _MU[3])
                    continue
                p = self.cap(D, p)
                slope = float((p * g).sum())
                pred = slope + 0.5 * float((p * hv(p)).sum())
                if not (slope < 0 and pred < 0):
                    mu = max(_MU[1] * mu, _MU[3])
                    continue
                Dn, bn = self.retract(D, b, p, 1.0)
                out = self.evaluate(Dn, bn, Z)
                rho = (out[1] - loss) / pred
                if out[1] < loss and rho > _ARMIJO:
                    step = Dn, bn, out
                    if rho > 0.75:
                        mu = max(mu / _MU[2], _MU[0])
                    elif rho < 0.25:
                        mu = max(_MU[1] * mu, _MU[3])
                    break
                mu = max(_MU[1] * mu, _MU[3])
            if step is None:                             # the damped steps found no decrease
                self.D, self.b = D, b
                return "floor"
            D, b, (Z, loss, R, G, M, zsum, V) = step
            self.D, self.b, self.Z, self.loss, self.zsum = D, b, Z, loss, zsum

    @staticmethod
    def cap(D, p):
        """Scale a direction so that no atom turns by more than one radian at a unit step."""
        K = D.shape[0]
        big = float(p[:K].norm(dim=1).max()) if K else 0.0
        return p / big if big > _MAX_TURN else p

    @staticmethod
    def cg(hv, g, inv, eta):
        """Truncated preconditioned conjugate gradients for ``Hess p = -g`` (preconditioner
        ``diag(inv)``, the per-atom scaling), stopped at a relative residual ``eta`` in the
        preconditioned norm or at the first direction of nonpositive curvature."""
        p = torch.zeros_like(g)
        r = -g
        y = inv * r
        ry = float((r * y).sum())
        stop = eta * eta * ry
        d = y
        for i in range(_MAX_CG):
            Hd = hv(d)
            dHd = float((d * Hd).sum())
            if not dHd > 1e-14 * float((d * d).sum()):
                return p if i else y                     # nonpositive curvature: stop here
            a = ry / dHd
            p = p + a * d
            r = r - a * Hd
            y = inv * r
            ry_new = float((r * y).sum())
            if ry_new <= stop:
                break
            d = y + (ry_new / ry) * d
            ry = ry_new
        return p

    # -- Riemannian L-BFGS -----------------------------------------------------------------
    def evaluate(self, D, b, Z):
        """Exact warm codes at ``(D, b)``: ``(Z, loss, R, G, M, zsum, V)`` with the Euclidean
        gradient rows ``G``, the per-row curvature scale ``M`` and ``V = ZᵀR``."""
        Xc = self.X if b is None else self.X - b
        Z = self.enc(Xc, D, Z)
        Zs = _products(Z)
        loss, R = _loss(Xc, D, Z, self.lam, Zs)
        V = Zs.t() @ R                                   # Σ_n z_kn r_n = -N ∇_{d_k} F
        zsum = Z.sum(0)
        G = -V / self.n
        M = ((Z * Z).sum(0) + self.lam * zsum) / self.n  # (‖z_k‖² + λ‖z_k‖₁) / N
        if b is not None:
            G = torch.cat([G, -R.mean(0, keepdim=True)])
            M = torch.cat([M, M.new_ones(1)])
        return Z, loss, R, G, M, zsum, V

    def tangent(self, D, U):
        """Project the atom rows of ``U`` onto the tangent spaces of the spheres at ``D``."""
        K = D.shape[0]
        P = U.clone()
        P[:K] -= (U[:K] * D).sum(1, keepdim=True) * D
        return P

    def retract(self, D, b, P, alpha):
        K = D.shape[0]
        Dn = D + alpha * P[:K]
        Dn = Dn / Dn.norm(dim=1, keepdim=True).clamp(min=1e-300)
        bn = None if b is None else b + alpha * P[K]
        return Dn, bn

    def lbfgs_phase(self):
        """Quasi-Newton steps until a stop; ``"floor"`` when no decrease can be found."""
        D, b = self.D, self.b
        Z, loss, R, G, M, zsum, V = self.evaluate(D, b, self.Z)
        self.Z, self.loss, self.zsum = Z, loss, zsum
        g = self.tangent(D, G)
        pairs = []                                       # (s, y, 1/(sᵀy))
        while True:
            t2 = _t2(V, (Z * Z).sum(0), zsum, D, self.lam)
            bias_v = self.bias_violation(R)
            state = self.record(t2, bias_v)
            if state is True:
                return
            if self.try_new_atom(R):
                D = self.D
                Z, loss, R, G, M, zsum, V = self.evaluate(D, b, Z)
                self.Z, self.loss, self.zsum = Z, loss, zsum
                g = self.tangent(D, G)
                pairs = []
                continue
            if state:
                self.converged = True
                return
            inv = torch.where(M > 0, 1.0 / M.clamp(min=torch.finfo(M.dtype).tiny),
                              torch.zeros_like(M)).unsqueeze(1)
            # the stored pairs live in earlier tangent spaces; rather than carrying each of
            # them to this one, the direction they give is projected onto it
            p = self.tangent(D, self.direction(g, pairs, inv))
            slope = float((p * g).sum())
            if not slope < 0:                            # not a descent direction: restart
                pairs = []
                p = -inv * g
                slope = float((p * g).sum())
            step = self.line_search(D, b, Z, loss, p, slope)
            if step is None and pairs:                   # retry along the scaled gradient
                pairs = []
                p = -inv * g
                slope = float((p * g).sum())
                step = self.line_search(D, b, Z, loss, p, slope)
            if step is None:
                self.D, self.b = D, b
                return "floor"
            alpha, Dn, bn, (Zn, loss_n, Rn, Gn, Mn, zsumn, Vn) = step
            gn = self.tangent(Dn, Gn)
            s = self.tangent(Dn, alpha * p)
            y = gn - self.tangent(Dn, g)
            sy = float((s * y).sum())
            if sy > 1e-12 * float(s.norm()) * float(y.norm()):
                pairs.append((s, y, 1.0 / sy))
                pairs = pairs[-_MEMORY:]
            D, b, Z, loss, R, G, M, zsum, V, g = Dn, bn, Zn, loss_n, Rn, Gn, Mn, zsumn, Vn, gn
            self.D, self.b, self.Z, self.loss, self.zsum = D, b, Z, loss, zsum

    @staticmethod
    def direction(g, pairs, inv):
        """Two-loop recursion: ``-H g`` with ``H₀ = γ diag(inv)`` (per-atom scaling)."""
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            a = rho * float((s * q).sum())
            alphas.append(a)
            q -= a * y
        if pairs:
            s, y, rho = pairs[-1]
            gamma = float((s * y).sum()) / max(float((y * inv * y).sum()), 1e-300)
        else:
            gamma = 1.0
        r = gamma * inv * q
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            bcoef = rho * float((y * r).sum())
            r += (a - bcoef) * s
        return -r

    def line_search(self, D, b, Z, loss, p, slope):
        """Armijo backtracking from a unit step; ``None`` when no decrease is found."""
        alpha = 1.0
        for _ in range(_MAX_BACKTRACK):
            Dn, bn = self.retract(D, b, p, alpha)
            out = self.evaluate(Dn, bn, Z)
            loss_n = out[1]
            if loss_n <= loss + _ARMIJO * alpha * slope and loss_n < loss:
                return alpha, Dn, bn, out
            # quadratic interpolation of the loss along the step, kept in [0.1, 0.5] α
            denom = 2 * (loss_n - loss - alpha * slope)
            a_new = -slope * alpha * alpha / denom if denom > 0 else 0.5 * alpha
            alpha = min(max(a_new, 0.1 * alpha), 0.5 * alpha)
        return None
