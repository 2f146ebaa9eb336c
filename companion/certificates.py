r"""Certificates for a dictionary and its codes (THEORY §1–4; Chapters 2 and 6).

:func:`certify` measures, for any unit-norm dictionary ``D`` and any codes ``Z`` (exact codes
from :func:`companion.coding.encode` by default, or e.g. a trained SAE's encoder codes), how
far the pair is from each condition of the book:

* **T1** (code optimality): ``d_kᵀr_n ≤ λ`` for every atom, with equality where ``z_kn > 0``;
* **T2** (dictionary stationarity): ``(I - d_k d_kᵀ) Σ_n z_kn r_n = 0`` for every used atom;
* with a decoder bias ``b`` (an unpenalised signed atom, Chapter 1), its stationarity
  ``Σ_n r_n = 0``;
* the **duality gap** of the nonnegative lasso at the residual scaled into
  ``{r : Dr ≤ λ1}``;
* **§3**: the best new unit atom's guaranteed decrease and the dead atoms (strictly dead when
  ``max_n d_kᵀr_n < λ``: the loss is then flat as the atom moves a little, a flat, non-strict
  local minimum in that atom);
* **T4**: the Huber lower bound :math:`\frac1N\sum_n h_\lambda(\|x_n - b\|)` that no unit-norm
  dictionary of any size beats at this centring, and the gap of the loss to it.

A point where T1 and T2 hold is a **certified stationary point**: it may be a spurious
local minimum or a saddle. Only when the loss also meets the T4 Huber bound is it certified
a global optimum (over dictionaries of any size, at this centring); the report's ``verdict``
says which, in those words.

All statistics are accumulated chunk by chunk over the rows, so memory is set by
``chunk_size`` (and ``n_candidates``), not by the number of samples; :class:`_Running` is the
accumulator, shared with :func:`companion.interop.certify_sae`, which streams activations
from disk.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .runtime import progress_bar
from ._validation import ArrayKind, as_tensor, check_columns, check_dictionary, check_nonnegative, \
    check_positive, check_positive_int
from .coding import _Dict, _encode_tensor, default_chunk_size, default_tol, ConvergenceWarning

__all__ = ["CertificateReport", "certify", "default_certificate_tol"]


def _fmt(x: float | None) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def default_certificate_tol(dtype: torch.dtype) -> float:
    """Threshold of the verdicts: ``1e-6`` in float64, ``1e-3`` in float32."""
    return 1e-6 if dtype == torch.float64 else 1e-3


def verdict(t1: float, t2: float, huber_gap: float, tol: float, *, n_used: int,
            bias_stationarity: float | None = None, negative_codes: bool = False) -> str:
    """The certificate in words (THEORY vocabulary).

    * ``"global optimum (T4 Huber bound met)"`` when ``huber_gap <= tol`` and the codes are
      nonnegative (the bound holds for ``Z ≥ 0`` only): no unit-norm dictionary of any size,
      with any codes, has a lower loss at this centring;
    * ``"certified stationary point"`` when T1, T2 (and, with a fitted bias, its
      stationarity) are at most ``tol``; with no atom used this is said to be vacuous;
    * otherwise which condition fails.
    """
    if huber_gap <= tol and not negative_codes:
        return "global optimum (T4 Huber bound met)"
    fails = []
    if t1 > tol:
        fails.append(f"codes not exact (T1 = {t1:.3g} > {tol:g})")
    if t2 > tol:
        fails.append(f"dictionary not stationary (T2 = {t2:.3g} > {tol:g})")
    if bias_stationarity is not None and bias_stationarity > tol:
        fails.append(f"bias not stationary (|mean r| = {bias_stationarity:.3g} > {tol:g})")
    if fails:
        return "not a stationary point: " + "; ".join(fails)
    if n_used == 0:
        return ("certified stationary point, vacuously: every atom is dead (λ too large for "
                "any atom to fire), so T2 has nothing to check")
    return "certified stationary point (not certified global: the loss is above the T4 Huber bound)"


@dataclass
class CertificateReport:
    """What :func:`certify` measured (Chapter 2: T1, T2, duality; §3: new and dead atoms; T4).

    Scalars are Python floats; per-atom arrays are of the caller's array kind (numpy or
    torch), with one entry per atom.

    Attributes
    ----------
    loss : float
        Joint loss :math:`\\frac1N\\sum_n \\tfrac12\\|r_n\\|^2 + \\lambda\\mathbf 1^\\top z_n`.
    t1_violation : float
        :math:`\\max_n` of ``max(max_k(-z_kn), max_{k off} (d_kᵀr_n - λ)₊, max_{k on} |d_kᵀr_n - λ|)``
        where "on" means ``z_kn > tol_active``.
    t2_violation : float
        :math:`\\max_k \\|(I - d_kd_k^\\top)\\sum_n z_{kn} r_n\\| / (\\|z_k\\|_2^2 + \\lambda\\|z_k\\|_1)`
        over used atoms (the denominator is ``‖Σ_n z_kn e_n^(k)‖`` at a stationary point).
    duality_gap, relative_duality_gap : float
        Mean primal value minus mean dual value ``½‖x‖² - ½‖x - θr‖²`` with ``θ ∈ [0, θ_max]``
        the best scaling that keeps ``θ r`` in ``{r : Dr ≤ λ1}``; relative: divided by the
        loss. Zero exactly at exact codes (for ``Z ≥ 0``; weak duality needs ``Z ≥ 0``).
    new_atom_gain : float
        Guaranteed loss decrease from adding the unit atom ``new_atom``:
        :math:`\\frac1{2N}\\sum_n (u^\\top r_n - \\lambda)_+^2` (summed over the residuals kept in
        the candidate pool, hence a valid lower bound when the pool is not all rows).
    new_atom : array (n_features,)
        The direction ``u`` found by thresholded power iteration.
    new_atom_excess : float
        ``max_n uᵀr_n - λ``; a positive value means adding ``u`` lowers the loss (§3).
    max_residual_norm : float
        ``max_n ‖r_n‖``; if ``≤ λ`` no new atom can help.
    dead_atoms : list[int]
        Atoms with ``z_k ≡ 0`` (no entry above ``tol_active``).
    dead_atoms_strict : list[bool]
        For each dead atom, whether ``max_n d_kᵀr_n < λ``: strictly dead, so the loss is flat
        under small moves of the atom (§3).
    usage, mean_activation, atom_t1, atom_t2, centroid_cosine, max_correlation : arrays (n_atoms,)
        Firing rate; mean of ``z_k`` over all rows; per-atom T1 and T2 violations;
        cosine between ``d_k`` and ``Σ_n z_kn r_n`` (1 at T2, NaN for dead atoms);
        ``max_n d_kᵀ r_n``.
    codes : str
        ``"exact"`` (computed here by :func:`companion.encode`) or ``"given"`` (the ``Z`` passed).
    t1_violation_lam : float
        ``t1_violation / λ``: the T1 violation in units of the threshold (a latent that fires
        or stays silent a whole threshold away from where it should shows as ``>= 1``).
    l0 : float
        Mean number of active entries (``z_kn > tol_active``) per row.
    fvu : float
        Fraction of variance unexplained :math:`\\sum_n\\|r_n\\|^2 / \\sum_n\\|x_n - \\bar x\\|^2`
        (``x̄`` the mean row; NaN for constant data).
    huber_bound : float
        T4: :math:`\\frac1N\\sum_n h_\\lambda(\\|x_n - b\\|)`, a lower bound on the loss of any
        unit-norm dictionary of any size at this centring (:func:`companion.huber_bound`).
    huber_gap : float
        ``loss - huber_bound`` ``≥ 0``: an upper bound on how far this loss is from the global
        minimum over dictionaries of any size. Zero certifies a global optimum.
    bias_stationarity : float or None
        :math:`\\|\\frac1N\\sum_n r_n\\|`, the stationarity of a fitted decoder bias (zero at a
        stationary point of :math:`F_b(D)` in ``b``); None when no bias was given.
    tol : float
        Threshold of ``verdict``.
    verdict : str
        The certificate in words (:func:`verdict`): "global optimum (T4 Huber bound met)",
        "certified stationary point ...", or which condition fails. Never "optimal" without
        the bound.
    """

    lam: float
    n_samples: int
    n_features: int
    n_atoms: int
    loss: float
    t1_violation: float
    t2_violation: float
    duality_gap: float
    relative_duality_gap: float
    new_atom_gain: float
    new_atom_excess: float
    max_residual_norm: float
    dead_atoms: list
    dead_atoms_strict: list
    new_atom: Any = field(repr=False)
    usage: Any = field(repr=False)
    mean_activation: Any = field(repr=False)
    atom_t1: Any = field(repr=False)
    atom_t2: Any = field(repr=False)
    centroid_cosine: Any = field(repr=False)
    max_correlation: Any = field(repr=False)
    codes: str = "given"
    tol_active: float = 0.0
    n_candidates: int = 0
    t1_violation_lam: float = 0.0
    l0: float = 0.0
    fvu: float = math.nan
    huber_bound: float = 0.0
    huber_gap: float = 0.0
    bias_stationarity: float | None = None
    tol: float = 1e-6
    verdict: str = ""

    def is_stationary(self, tol: float = 1e-6) -> bool:
        """Whether the T1 and T2 violations (and a fitted bias's stationarity) are at most ``tol``."""
        bias_ok = self.bias_stationarity is None or self.bias_stationarity <= tol
        return self.t1_violation <= tol and self.t2_violation <= tol and bias_ok

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays become lists, NaN becomes None)."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            if isinstance(v, np.ndarray):
                v = [None if (isinstance(a, float) and math.isnan(a)) else a for a in v.tolist()]
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            elif isinstance(v, (np.integer, np.floating, np.bool_)):
                v = v.item()
            out[name] = v
        return out

    def summary(self, top: int = 5) -> str:
        """A readable table: the certificates, the verdict, then the atoms with the worst T1/T2."""
        used = self.n_atoms - len(self.dead_atoms)
        strict = sum(bool(s) for s in self.dead_atoms_strict)
        lines = [
            f"CertificateReport  N={self.n_samples}  d={self.n_features}  K={self.n_atoms}  "
            f"lambda={self.lam:.3g}  codes={self.codes}",
            f"  {'loss':<28}{_fmt(self.loss)}",
            f"  {'T1 violation (codes)':<28}{_fmt(self.t1_violation)}   ({_fmt(self.t1_violation_lam)} lambda)",
            f"  {'T2 violation (dictionary)':<28}{_fmt(self.t2_violation)}",
        ]
        if self.bias_stationarity is not None:
            lines.append(f"  {'bias: |mean residual|':<28}{_fmt(self.bias_stationarity)}")
        lines += [
            f"  {'duality gap (abs / rel)':<28}{_fmt(self.duality_gap)} / {_fmt(self.relative_duality_gap)}",
            f"  {'T4 Huber bound / gap':<28}{_fmt(self.huber_bound)} / {_fmt(self.huber_gap)}",
            f"  {'L0 / FVU':<28}{self.l0:.3g} / {_fmt(self.fvu)}",
            f"  {'new-atom gain':<28}{_fmt(self.new_atom_gain)}   (max u.r - lambda = {_fmt(self.new_atom_excess)})",
            f"  {'max residual norm':<28}{_fmt(self.max_residual_norm)}   (lambda = {self.lam:.3g})",
            f"  {'atoms used / dead':<28}{used} / {len(self.dead_atoms)}"
            f"   ({strict} strictly dead: flat under small moves)",
            f"  verdict: {self.verdict}",
        ]
        t1 = np.asarray(_np(self.atom_t1), dtype=float)
        t2 = np.asarray(_np(self.atom_t2), dtype=float)
        if self.n_atoms:
            worst = np.argsort(-np.maximum(np.nan_to_num(t1), np.nan_to_num(t2)), kind="stable")[:top]
            us, ma, cc = (_np(self.usage), _np(self.mean_activation), _np(self.centroid_cosine))
            lines.append(f"  {'atom':>6} {'usage':>9} {'mean z':>9} {'T1':>9} {'T2':>9} {'cos':>9}")
            for k in worst:
                lines.append(f"  {int(k):>6} {_fmt(float(us[k])):>9} {_fmt(float(ma[k])):>9} "
                             f"{_fmt(float(t1[k])):>9} {_fmt(float(t2[k])):>9} {_fmt(float(cc[k])):>9}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _best_new_atom(Rp: torch.Tensor, lam: float, n_total: int, n_starts: int = 8,
                   n_iter: int = 100) -> tuple[torch.Tensor, float, float]:
    """Thresholded power iteration ``u ← normalise(Σ_n (uᵀr_n - λ)₊ r_n)`` from the largest residuals.

    Each step is a supporting-hyperplane (MM) step for the convex ``Σ (uᵀr - λ)₊²`` on the
    sphere, so the objective never decreases. Returns ``(u, gain, max uᵀr - λ)``.
    """
    d = Rp.shape[1]
    if Rp.shape[0] == 0:
        u = Rp.new_zeros(d)
        if d:
            u[0] = 1.0
        return u, 0.0, -lam
    norms = Rp.norm(dim=1)
    s = min(n_starts, Rp.shape[0])
    U = Rp[norms.topk(s).indices]
    U = U / U.norm(dim=1, keepdim=True).clamp(min=torch.finfo(U.dtype).tiny)
    prev = None
    for _ in range(n_iter):
        P = (Rp @ U.T - lam).clamp(min=0)          # (M, s)
        obj = (P * P).sum(0)
        W = P.T @ Rp                                 # (s, d)
        nw = W.norm(dim=1, keepdim=True)
        U = torch.where(nw > 0, W / nw.clamp(min=torch.finfo(U.dtype).tiny), U)
        if prev is not None and bool(((obj - prev).abs() <= 1e-12 * obj.clamp(min=1e-300)).all()):
            break
        prev = obj
    P = (Rp @ U.T - lam).clamp(min=0)
    obj = (P * P).sum(0)
    best = int(obj.argmax())
    u = U[best]
    gain = float(obj[best]) / (2.0 * n_total)
    excess = float((Rp @ u).max()) - lam
    return u, gain, excess


class _Running:
    """Sums of one certificate over chunks of rows (centred data ``X``, codes ``Z``).

    Memory is ``O(chunk · n_atoms + n_atoms · n_features + n_candidates · n_features)``,
    whatever the number of rows fed to :meth:`add`.
    """

    def __init__(self, D: torch.Tensor, lam: float, tol_active: float, n_candidates: int):
        k, d = D.shape
        self.D, self.lam, self.tol_active, self.n_candidates = D, lam, tol_active, n_candidates
        self.V = D.new_zeros(k, d)                 # Σ_n z_kn r_n
        self.zsum = D.new_zeros(k)
        self.zsq = D.new_zeros(k)
        self.fire = torch.zeros(k, dtype=torch.long, device=D.device)
        self.atom_t1 = D.new_zeros(k)
        self.maxcorr = D.new_full((k,), -math.inf)
        f64 = dict(dtype=torch.float64, device=D.device)
        self.rsum = torch.zeros(d, **f64)          # Σ_n r_n (bias stationarity)
        self.xsum = torch.zeros(d, **f64)          # Σ_n x_n (variance, for the FVU)
        self.n = 0
        self.nnz = 0
        self.loss_sum = self.dual_sum = self.huber_sum = self.xsq = self.rsq = 0.0
        self.t1 = self.rmax = 0.0
        self.negative = False
        self.pool = D.new_zeros(0, d)
        self.pool_norm = D.new_zeros(0)

    def add(self, X: torch.Tensor, Z: torch.Tensor) -> None:
        """Accumulate the rows ``X`` (already centred) with their codes ``Z``."""
        lam, D = self.lam, self.D
        if X.shape[0] == 0:
            return
        tiny = torch.finfo(X.dtype).tiny
        R = X - Z @ D
        G = R @ D.T                                    # d_kᵀ r_n
        on = Z > self.tol_active
        viol = torch.where(on, (G - lam).abs(), (G - lam).clamp(min=0))
        viol = torch.maximum(viol, (-Z).clamp(min=0))
        self.atom_t1 = torch.maximum(self.atom_t1, viol.max(0).values)
        self.t1 = max(self.t1, float(viol.max()))
        self.negative = self.negative or bool((Z < 0).any())
        self.maxcorr = torch.maximum(self.maxcorr, G.max(0).values)
        self.V += Z.T @ R
        self.zsum += Z.sum(0)
        self.zsq += (Z * Z).sum(0)
        nfire = on.sum(0)
        self.fire += nfire
        self.nnz += int(nfire.sum())
        rn2 = (R * R).sum(1)
        self.loss_sum += float((0.5 * rn2 + lam * Z.sum(1)).sum())
        self.rsq += float(rn2.double().sum())
        self.rsum += R.double().sum(0)
        Xd = X.double()
        self.xsum += Xd.sum(0)
        xn2 = (Xd * Xd).sum(1)
        self.xsq += float(xn2.sum())
        xn = xn2.sqrt()
        self.huber_sum += float(torch.where(xn <= lam, 0.5 * xn2, lam * xn - 0.5 * lam * lam).sum())
        # dual point θ r in {r : D r ≤ λ}
        gmax = G.max(1).values
        theta_max = torch.where(gmax > 0, lam / gmax.clamp(min=tiny), torch.full_like(gmax, math.inf))
        xr = (X * R).sum(1)
        theta = torch.where(rn2 > 0, xr / rn2.clamp(min=tiny), torch.zeros_like(rn2))
        theta = torch.minimum(theta.clamp(min=0), theta_max)
        self.dual_sum += float((theta * xr - 0.5 * theta * theta * rn2).sum())
        rnorm = rn2.sqrt()
        self.rmax = max(self.rmax, float(rnorm.max()))
        # keep the largest residuals (those above λ) for the new-atom search
        keep = rnorm > lam
        if bool(keep.any()):
            self.pool = torch.cat([self.pool, R[keep]], 0)
            self.pool_norm = torch.cat([self.pool_norm, rnorm[keep]], 0)
            if self.pool.shape[0] > self.n_candidates:
                top = self.pool_norm.topk(self.n_candidates).indices
                self.pool, self.pool_norm = self.pool[top], self.pool_norm[top]
        self.n += X.shape[0]

    def report(self, kind: ArrayKind, *, codes: str, tol: float, with_bias: bool) -> CertificateReport:
        """The :class:`CertificateReport` of everything accumulated so far."""
        D, lam, n = self.D, self.lam, self.n
        k, d = D.shape
        dt = D.dtype
        tiny = torch.finfo(dt).tiny
        N = max(n, 1)
        loss = self.loss_sum / N
        gap = (self.loss_sum - self.dual_sum) / N
        used = self.fire > 0
        proj = (self.V * D).sum(1)
        tang = (self.V - proj.unsqueeze(1) * D).norm(dim=1)
        scale = self.zsq + lam * self.zsum
        atom_t2 = torch.where(used, tang / scale.clamp(min=tiny), torch.zeros_like(tang))
        t2 = float(atom_t2.max()) if k else 0.0
        vn = self.V.norm(dim=1)
        cosine = torch.where(used & (vn > 0), proj / vn.clamp(min=tiny), torch.full_like(vn, math.nan))
        dead = torch.nonzero(~used).flatten()
        dead_strict = (self.maxcorr[dead] < lam).tolist()
        u, gain, excess = _best_new_atom(self.pool, lam, N)
        hub = self.huber_sum / N
        var = self.xsq - float((self.xsum * self.xsum).sum()) / N
        fvu = self.rsq / var if var > 0 else math.nan
        bias_stat = float(self.rsum.norm()) / N if with_bias else None
        n_used = int(used.sum())
        return CertificateReport(
            lam=lam, n_samples=n, n_features=d, n_atoms=k, loss=loss, t1_violation=self.t1,
            t2_violation=t2, duality_gap=gap,
            relative_duality_gap=gap / loss if loss > 0 else (0.0 if gap == 0 else math.inf),
            new_atom_gain=gain, new_atom_excess=excess, max_residual_norm=self.rmax,
            dead_atoms=dead.tolist(), dead_atoms_strict=[bool(b) for b in dead_strict],
            new_atom=kind.out(u), usage=kind.out(self.fire.to(dt) / N),
            mean_activation=kind.out(self.zsum / N), atom_t1=kind.out(self.atom_t1),
            atom_t2=kind.out(atom_t2), centroid_cosine=kind.out(cosine),
            max_correlation=kind.out(self.maxcorr), codes=codes, tol_active=self.tol_active,
            n_candidates=int(self.pool.shape[0]), t1_violation_lam=self.t1 / lam,
            l0=self.nnz / N, fvu=fvu, huber_bound=hub, huber_gap=loss - hub,
            bias_stationarity=bias_stat, tol=tol,
            verdict=verdict(self.t1, t2, loss - hub, tol, n_used=n_used, bias_stationarity=bias_stat,
                            negative_codes=self.negative),
        )


class _ExactCodes:
    """Exact codes chunk by chunk for one dictionary (its encoder view built once)."""

    def __init__(self, D: torch.Tensor, lam: float, tol: float | None, max_iter: int,
                 add_per_iter: int, fallback_iter: int):
        self.D, self.lam, self.tol = D, lam, tol
        self.max_iter, self.add_per_iter, self.fallback_iter = max_iter, add_per_iter, fallback_iter
        self.Dc = _Dict(D)
        self.worst = 0.0                            # largest violation of an unconverged chunk
        self.worst_tol = 0.0

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        tol = self.tol if self.tol is not None else default_tol(X)
        Z, info = _encode_tensor(X, self.D, self.lam, tol, self.max_iter, max(1, X.shape[0]), None,
                                 False, self.add_per_iter, self.fallback_iter, Dc=self.Dc)
        if not info.converged and info.max_kkt_violation > self.worst:
            self.worst, self.worst_tol = info.max_kkt_violation, tol
        return Z

    def warn(self, stacklevel: int) -> None:
        """A :class:`ConvergenceWarning` if some chunk's exact codes missed their tolerance."""
        if self.worst > 0:
            warnings.warn(
                f"certify: exact codes did not converge: T1 violation {self.worst:.3g} = "
                f"{self.worst / self.lam:.3g} lambda (encode tol={self.worst_tol:.3g} lambda; the report's "
                "T1 columns show where)",
                ConvergenceWarning, stacklevel=stacklevel + 1)


def _encode_options(encode_kwargs: dict | None) -> tuple:
    ekw = dict(encode_kwargs or {})
    out = (ekw.pop("tol", None), ekw.pop("max_iter", 200), ekw.pop("add_per_iter", 2),
           ekw.pop("fallback_iter", 5000))
    if ekw:
        raise TypeError(f"encode_kwargs has unknown keys {sorted(ekw)}")
    return out


def check_nonempty(n_rows: int, n_atoms: int, what: str = "X") -> None:
    """Refuse the vacuous cases: no rows (every mean is empty) or no atoms."""
    if n_rows == 0:
        raise ValueError(f"{what} has no rows: a certificate over zero samples is vacuous")
    if n_atoms == 0:
        raise ValueError("D has no atoms (0 rows): there is no dictionary to certify")


def certify(
    X: Any,
    D: Any,
    lam: float,
    Z: Any = None,
    *,
    bias: Any = None,
    chunk_size: int | None = None,
    tol_active: float = 0.0,
    tol: float | None = None,
    progress: bool = False,
    n_candidates: int = 8192,
    encode_kwargs: dict | None = None,
) -> CertificateReport:
    r"""Certify how close ``(D, Z)`` is to a stationary point of the joint problem, and to the T4 bound (Chapter 2).

    With residuals :math:`r_n = x_n - b - z_n D` (``b = bias``, zero by default) and
    :math:`g_{kn} = d_k^\top r_n`:

    * T1: ``t1_violation`` :math:`=\max_n\max\big(\max_k(-z_{kn}),\ \max_{k:z_{kn}\le\tau}(g_{kn}-\lambda)_+,\ \max_{k:z_{kn}>\tau}|g_{kn}-\lambda|\big)`
      (:math:`\tau` = ``tol_active``); zero iff every code is the exact nonnegative-lasso code.
      ``t1_violation_lam`` is the same in units of :math:`\lambda`.
    * T2: ``t2_violation`` :math:`=\max_k \|(I-d_kd_k^\top)\sum_n z_{kn}r_n\| / (\|z_k\|_2^2+\lambda\|z_k\|_1)`
      over used atoms; zero iff every atom is the weighted centroid of its partial residuals.
    * Bias (only with ``bias``): ``bias_stationarity`` :math:`=\|\frac1N\sum_n r_n\|`, zero
      when ``b`` is stationary for :math:`F_b(D)` (an unpenalised signed atom, Chapter 1).
    * Duality gap of :math:`f(x;D)=\max_{Dr\le\lambda}\tfrac12\|x\|^2-\tfrac12\|x-r\|^2` at the
      dual point :math:`\theta r_n`, :math:`\theta = \mathrm{clip}(x^\top r/\|r\|^2, 0, \lambda/\max_k g_{kn})`.
    * §3: the best new unit atom :math:`u` found by thresholded power iteration on the
      (up to ``n_candidates``) largest residuals, with guaranteed decrease
      :math:`\frac1{2N}\sum_n(u^\top r_n-\lambda)_+^2`; dead atoms and whether
      :math:`\max_n g_{kn}<\lambda` (strictly dead: flat under small moves).
    * T4 (Chapter 6): ``huber_bound`` :math:`=\frac1N\sum_n h_\lambda(\|x_n - b\|)` and
      ``huber_gap`` = loss − bound, an upper bound on the distance to the global minimum
      over unit-norm dictionaries of any size at this centring.
    * ``verdict``: "certified stationary point" when T1 and T2 (and the bias condition) are
      at most ``tol``; "global optimum (T4 Huber bound met)" only when ``huber_gap <= tol``.

    Parameters
    ----------
    X : array (n_samples, n_features)
        At least one row.
    D : array (n_atoms, n_features)
        Any dictionary with at least one atom and finite, nonzero, **unit-norm** rows. A
        decoder with other row norms is rejected: normalise it, ``D / ‖d_k‖``, and rescale its
        codes, ``Z * ‖d_k‖``; that leaves both the reconstruction and the norm-weighted SAE
        penalty unchanged.
    lam : float
        Penalty :math:`\lambda > 0` (a number; strings and bools are refused).
    Z : array (n_samples, n_atoms), optional
        Codes to certify (e.g. a trained SAE's encoder output). Negative entries are
        allowed and show up in ``t1_violation``. Default: exact codes from
        :func:`companion.coding.encode`, chunk by chunk.
    bias : array (n_features,), optional
        A decoder bias ``b``: everything is computed for ``X - b``, and its stationarity
        :math:`\sum_n r_n = 0` is checked (e.g. ``DictionaryFit.bias`` of
        ``fit_dictionary(..., fit_bias=True)``).
    chunk_size : int, optional
        Rows per chunk (memory is ``O(chunk_size · n_atoms)``).
    tol_active : float
        An entry counts as active (on the support) when ``z_kn > tol_active``.
    tol : float, optional
        Threshold of the verdict. Default :func:`default_certificate_tol`: ``1e-6`` in
        float64, ``1e-3`` in float32.
    progress : bool
        tqdm bar over chunks on stderr (honours ``TQDM_DISABLE``).
    n_candidates : int
        Residuals (largest norms) kept for the new-atom search.
    encode_kwargs : dict, optional
        Extra arguments for the exact codes when ``Z`` is None (``tol``, ``max_iter``,
        ``add_per_iter``, ``fallback_iter``), with :func:`companion.encode`'s meaning; the
        default ``tol`` is :func:`companion.coding.default_tol` of each chunk.

    Returns
    -------
    CertificateReport

    Raises
    ------
    ValueError
        On empty ``X``, a dictionary without atoms, wrong shapes, non-finite entries,
        non-unit atoms, or ``lam <= 0``.

    Warns
    -----
    ConvergenceWarning
        When the exact codes miss their tolerance (the T1 column then says by how much).
    """
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    check_columns(Dt, "D", Xt.shape[1], "X")
    check_nonempty(Xt.shape[0], Dt.shape[0])
    try:
        check_dictionary(Dt, "D")
    except ValueError as e:
        if "unit-norm" not in str(e):
            raise
        raise ValueError(f"{e}; for an SAE decoder also rescale the codes, Z * D.norm(dim=1), which "
                         "leaves the reconstruction and the norm-weighted penalty unchanged") from None
    tol_active = check_nonnegative(tol_active, "tol_active")
    n_candidates = check_positive_int(n_candidates, "n_candidates")
    tol = default_certificate_tol(Xt.dtype) if tol is None else check_positive(tol, "tol")
    n, k = Xt.shape[0], Dt.shape[0]
    Zt = bt = None
    if Z is not None:
        Zt, _ = as_tensor(Z, "Z", ndim=2, like=Xt)
        if tuple(Zt.shape) != (n, k):
            raise ValueError(f"Z must have shape (n_samples, n_atoms) = {(n, k)}, got {tuple(Zt.shape)}")
    if bias is not None:
        bt, _ = as_tensor(bias, "bias", ndim=1, like=Xt)
        if bt.shape[0] != Xt.shape[1]:
            raise ValueError(f"bias must have shape (n_features,) = ({Xt.shape[1]},), got {tuple(bt.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(k)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    etol, emax, eadd, efb = _encode_options(encode_kwargs)
    with torch.no_grad():
        return _certify_tensor(Xt, Dt, lam, Zt, kind, chunk_size, tol_active, progress,
                               n_candidates, etol, emax, eadd, efb, bias=bt, tol=tol)


def _certify_tensor(X, D, lam, Z, kind: ArrayKind, chunk_size, tol_active, progress,
                    n_candidates, etol, emax, eadd, efb, *, bias=None, tol=None) -> CertificateReport:
    """Tensor core of :func:`certify` (inputs validated; also used by ``fit_dictionary``)."""
    n = X.shape[0]
    acc = _Running(D, lam, tol_active, n_candidates)
    exact = _ExactCodes(D, lam, etol, emax, eadd, efb) if Z is None else None
    for s in progress_bar(range(0, n, chunk_size), progress=progress,
                          desc="certify (exact codes)" if Z is None else "certify (given codes)",
                          unit="chunk"):
        e = min(n, s + chunk_size)
        Xc = X[s:e] if bias is None else X[s:e] - bias
        acc.add(Xc, exact(Xc) if exact is not None else Z[s:e])
    if exact is not None:
        exact.warn(stacklevel=3)
    return acc.report(kind, codes="exact" if Z is None else "given",
                      tol=default_certificate_tol(X.dtype) if tol is None else tol,
                      with_bias=bias is not None)
