"""Optimality certificates for a dictionary and its codes (THEORY §1–3; Chapter 2).

:func:`certify` measures, for any unit-norm dictionary ``D`` and any codes ``Z`` (exact codes
from :func:`companion.coding.encode` by default, or e.g. a trained SAE's encoder codes), how
far the pair is from each optimality condition of the book:

* **T1** (code optimality): ``d_kᵀr_n ≤ λ`` for every atom, with equality where ``z_kn > 0``;
* **T2** (dictionary stationarity): ``(I - d_k d_kᵀ) Σ_n z_kn r_n = 0`` for every used atom;
* the **duality gap** of the nonnegative lasso at the residual scaled into
  ``{r : Dr ≤ λ1}``;
* **§3**: the best new unit atom's guaranteed decrease and the dead atoms (strictly dead when
  ``max_n d_kᵀr_n < λ``: the loss is then flat as the atom moves a little, a flat, non-strict
  local minimum in that atom).

All statistics are accumulated chunk by chunk over the rows, so memory is set by
``chunk_size``, not by the number of samples.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ._validation import ArrayKind, as_tensor, check_columns, check_dictionary, check_nonnegative, \
    check_positive, check_positive_int
from .coding import _Dict, _encode_tensor, default_chunk_size, default_tol, ConvergenceWarning

__all__ = ["CertificateReport", "certify"]


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


@dataclass
class CertificateReport:
    """What :func:`certify` measured (Chapter 2: T1, T2, duality; §3: new and dead atoms).

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
        For each dead atom, whether ``max_n d_kᵀr_n < λ``: strictly dead, so the loss is flat under small moves of the atom (§3).
    usage, mean_activation, atom_t1, atom_t2, centroid_cosine, max_correlation : arrays (n_atoms,)
        Firing rate; mean of ``z_k`` over all rows; per-atom T1 and T2 violations;
        cosine between ``d_k`` and ``Σ_n z_kn r_n`` (1 at T2, NaN for dead atoms);
        ``max_n d_kᵀ r_n``.
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
    exact_codes: bool = False
    tol_active: float = 0.0
    n_candidates: int = 0

    def is_stationary(self, tol: float = 1e-6) -> bool:
        """Whether both T1 and T2 violations are at most ``tol``."""
        return self.t1_violation <= tol and self.t2_violation <= tol

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays become lists, NaN becomes None)."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            if isinstance(v, np.ndarray):
                v = [None if (isinstance(a, float) and math.isnan(a)) else a for a in v.tolist()]
            elif isinstance(v, float) and math.isnan(v):
                v = None
            elif isinstance(v, (np.integer, np.floating, np.bool_)):
                v = v.item()
            out[name] = v
        return out

    def summary(self, top: int = 5) -> str:
        """A readable table: the certificates, then the atoms with the worst T1/T2."""
        used = self.n_atoms - len(self.dead_atoms)
        strict = sum(bool(s) for s in self.dead_atoms_strict)
        lines = [
            f"CertificateReport  N={self.n_samples}  d={self.n_features}  K={self.n_atoms}  "
            f"lambda={self.lam:.3g}  codes={'exact' if self.exact_codes else 'given'}",
            f"  {'loss':<28}{_fmt(self.loss)}",
            f"  {'T1 violation (codes)':<28}{_fmt(self.t1_violation)}",
            f"  {'T2 violation (dictionary)':<28}{_fmt(self.t2_violation)}",
            f"  {'duality gap (abs / rel)':<28}{_fmt(self.duality_gap)} / {_fmt(self.relative_duality_gap)}",
            f"  {'new-atom gain':<28}{_fmt(self.new_atom_gain)}   (max u.r - lambda = {_fmt(self.new_atom_excess)})",
            f"  {'max residual norm':<28}{_fmt(self.max_residual_norm)}   (lambda = {self.lam:.3g})",
            f"  {'atoms used / dead':<28}{used} / {len(self.dead_atoms)}"
            f"   ({strict} strictly dead: flat under small moves)",
        ]
        t1 = np.asarray(_np(self.atom_t1), dtype=float)
        t2 = np.asarray(_np(self.atom_t2), dtype=float)
        if self.n_atoms:
            worst = np.argsort(-np.maximum(np.nan_to_num(t1), np.nan_to_num(t2)))[:top]
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


def certify(
    X: Any,
    D: Any,
    lam: float,
    Z: Any = None,
    *,
    chunk_size: int | None = None,
    tol_active: float = 0.0,
    progress: bool = False,
    n_candidates: int = 8192,
    encode_kwargs: dict | None = None,
) -> CertificateReport:
    r"""Certify how close ``(D, Z)`` is to a stationary point of the joint problem (Chapter 2).

    With residuals :math:`r_n = x_n - z_n D` and :math:`g_{kn} = d_k^\top r_n`:

    * T1: ``t1_violation`` :math:`=\max_n\max\big(\max_k(-z_{kn}),\ \max_{k:z_{kn}\le\tau}(g_{kn}-\lambda)_+,\ \max_{k:z_{kn}>\tau}|g_{kn}-\lambda|\big)`
      (:math:`\tau` = ``tol_active``); zero iff every code is the exact nonnegative-lasso code.
    * T2: ``t2_violation`` :math:`=\max_k \|(I-d_kd_k^\top)\sum_n z_{kn}r_n\| / (\|z_k\|_2^2+\lambda\|z_k\|_1)`
      over used atoms; zero iff every atom is the weighted centroid of its partial residuals.
    * Duality gap of :math:`f(x;D)=\max_{Dr\le\lambda}\tfrac12\|x\|^2-\tfrac12\|x-r\|^2` at the
      dual point :math:`\theta r_n`, :math:`\theta = \mathrm{clip}(x^\top r/\|r\|^2, 0, \lambda/\max_k g_{kn})`.
    * §3: the best new unit atom :math:`u` found by thresholded power iteration on the
      (up to ``n_candidates``) largest residuals, with guaranteed decrease
      :math:`\frac1{2N}\sum_n(u^\top r_n-\lambda)_+^2`; dead atoms and whether
      :math:`\max_n g_{kn}<\lambda` (strictly dead: flat under small moves).

    Parameters
    ----------
    X : array (n_samples, n_features)
    D : array (n_atoms, n_features)
        Any dictionary with finite, nonzero, **unit-norm** rows. A decoder with other row
        norms is rejected: normalise it, ``D / ‖d_k‖``, and rescale its codes, ``Z * ‖d_k‖``;
        that leaves both the reconstruction and the norm-weighted SAE penalty unchanged.
    lam : float
        Penalty :math:`\lambda > 0`.
    Z : array (n_samples, n_atoms), optional
        Codes to certify (e.g. a trained SAE's encoder output). Negative entries are
        allowed and show up in ``t1_violation``. Default: exact codes from
        :func:`companion.coding.encode`.
    chunk_size : int, optional
        Rows per chunk (memory is ``O(chunk_size · n_atoms)``).
    tol_active : float
        An entry counts as active (on the support) when ``z_kn > tol_active``.
    progress : bool
        tqdm bar over chunks on stderr (honours ``TQDM_DISABLE``).
    n_candidates : int
        Residuals (largest norms) kept for the new-atom search.
    encode_kwargs : dict, optional
        Extra arguments for the exact codes when ``Z`` is None (``tol``, ``max_iter``, ...).

    Returns
    -------
    CertificateReport
    """
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    check_columns(Dt, "D", Xt.shape[1], "X")
    try:
        check_dictionary(Dt, "D")
    except ValueError as e:
        if "unit-norm" not in str(e):
            raise
        raise ValueError(f"{e}; for an SAE decoder also rescale the codes, Z * D.norm(dim=1), which "
                         "leaves the reconstruction and the norm-weighted penalty unchanged") from None
    tol_active = check_nonnegative(tol_active, "tol_active")
    n_candidates = check_positive_int(n_candidates, "n_candidates")
    n, d = Xt.shape
    k = Dt.shape[0]
    Zt = None
    if Z is not None:
        Zt, _ = as_tensor(Z, "Z", ndim=2, like=Xt)
        if tuple(Zt.shape) != (n, k):
            raise ValueError(f"Z must have shape (n_samples, n_atoms) = {(n, k)}, got {tuple(Zt.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(k)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    ekw = dict(encode_kwargs or {})
    etol = ekw.pop("tol", None)
    emax = ekw.pop("max_iter", 200)
    eadd = ekw.pop("add_per_iter", 2)
    efb = ekw.pop("fallback_iter", 5000)
    if ekw:
        raise TypeError(f"encode_kwargs has unknown keys {sorted(ekw)}")
    with torch.no_grad():
        return _certify_tensor(Xt, Dt, lam, Zt, kind, chunk_size, tol_active, progress,
                               n_candidates, etol, emax, eadd, efb)


def _certify_tensor(X, D, lam, Z, kind: ArrayKind, chunk_size, tol_active, progress,
                    n_candidates, etol, emax, eadd, efb) -> CertificateReport:
    n, d = X.shape
    k = D.shape[0]
    dev, dt = X.device, X.dtype
    V = X.new_zeros(k, d)                  # Σ_n z_kn r_n
    zsum = X.new_zeros(k)
    zsq = X.new_zeros(k)
    fire = torch.zeros(k, dtype=torch.long, device=dev)
    atom_t1 = X.new_zeros(k)
    maxcorr = X.new_full((k,), -math.inf)
    loss_sum = 0.0
    dual_sum = 0.0
    t1 = 0.0
    rmax = 0.0
    pool = X.new_zeros(0, d)
    pool_norm = X.new_zeros(0)
    exact = Z is None
    etol_v = etol if etol is not None else default_tol(X) if n else 1e-9
    enc_bad = 0.0
    Dc = _Dict(D) if Z is None else None               # the encoder's view of D, built once
    for s in tqdm(range(0, n, chunk_size), disable=not progress, desc="certify", unit="chunk",
                  leave=False):
        e = min(n, s + chunk_size)
        Xc = X[s:e]
        if Z is None:
            Zc, info = _encode_tensor(Xc, D, lam, etol_v, emax, chunk_size, None, False, eadd, efb,
                                      Dc=Dc)
            enc_bad = max(enc_bad, info.max_kkt_violation if not info.converged else 0.0)
        else:
            Zc = Z[s:e]
        R = Xc - Zc @ D
        G = R @ D.T                                    # d_kᵀ r_n
        on = Zc > tol_active
        viol = torch.where(on, (G - lam).abs(), (G - lam).clamp(min=0))
        viol = torch.maximum(viol, (-Zc).clamp(min=0))
        atom_t1 = torch.maximum(atom_t1, viol.max(0).values)
        t1 = max(t1, float(viol.max()))
        maxcorr = torch.maximum(maxcorr, G.max(0).values)
        V += Zc.T @ R
        zsum += Zc.sum(0)
        zsq += (Zc * Zc).sum(0)
        fire += on.sum(0)
        rn2 = (R * R).sum(1)
        loss_sum += float((0.5 * rn2 + lam * Zc.sum(1)).sum())
        # dual point θ r in {r : D r ≤ λ}
        gmax = G.max(1).values
        tiny = torch.finfo(dt).tiny
        theta_max = torch.where(gmax > 0, lam / gmax.clamp(min=tiny), torch.full_like(gmax, math.inf))
        xr = (Xc * R).sum(1)
        theta = torch.where(rn2 > 0, xr / rn2.clamp(min=tiny), torch.zeros_like(rn2))
        theta = torch.minimum(theta.clamp(min=0), theta_max)
        dual_sum += float((theta * xr - 0.5 * theta * theta * rn2).sum())
        rnorm = rn2.sqrt()
        rmax = max(rmax, float(rnorm.max()))
        # keep the largest residuals (those above λ) for the new-atom search
        keep = rnorm > lam
        if bool(keep.any()):
            pool = torch.cat([pool, R[keep]], 0)
            pool_norm = torch.cat([pool_norm, rnorm[keep]], 0)
            if pool.shape[0] > n_candidates:
                top = pool_norm.topk(n_candidates).indices
                pool, pool_norm = pool[top], pool_norm[top]
    if enc_bad > 0:
        warnings.warn(f"certify: exact codes did not converge (KKT violation {enc_bad:.3g})",
                      ConvergenceWarning, stacklevel=3)
    N = max(n, 1)
    loss = loss_sum / N
    gap = (loss_sum - dual_sum) / N
    # T2
    used = fire > 0
    proj = (V * D).sum(1)
    tang = (V - proj.unsqueeze(1) * D).norm(dim=1)
    scale = zsq + lam * zsum
    atom_t2 = torch.where(used, tang / scale.clamp(min=torch.finfo(dt).tiny), torch.zeros_like(tang))
    t2 = float(atom_t2.max()) if k else 0.0
    vn = V.norm(dim=1)
    cosine = torch.where(used & (vn > 0), proj / vn.clamp(min=torch.finfo(dt).tiny),
                         torch.full_like(vn, math.nan))
    dead = torch.nonzero(~used).flatten()
    dead_strict = (maxcorr[dead] < lam).tolist() if n else [True] * int(dead.numel())
    u, gain, excess = _best_new_atom(pool, lam, N)
    return CertificateReport(
        lam=lam, n_samples=n, n_features=d, n_atoms=k, loss=loss, t1_violation=t1,
        t2_violation=t2, duality_gap=gap,
        relative_duality_gap=gap / loss if loss > 0 else (0.0 if gap == 0 else math.inf),
        new_atom_gain=gain, new_atom_excess=excess, max_residual_norm=rmax,
        dead_atoms=dead.tolist(), dead_atoms_strict=[bool(b) for b in dead_strict],
        new_atom=kind.out(u), usage=kind.out(fire.to(dt) / N), mean_activation=kind.out(zsum / N),
        atom_t1=kind.out(atom_t1), atom_t2=kind.out(atom_t2), centroid_cosine=kind.out(cosine),
        max_correlation=kind.out(maxcorr), exact_codes=exact, tol_active=tol_active,
        n_candidates=int(pool.shape[0]),
    )
