"""Local moves around a dictionary: curvature, dead atoms, new atoms and splits (THEORY §3; the second-order chapter, book/ch02_second_order).

Chapter 2 derives first-order conditions (T1 for the codes, T2 for the atoms) that every
local minimum of the joint problem satisfies. They certify *stationarity*. This module holds the
tools that go one step further and ask what a small move of the dictionary does to the value
function :math:`F(D) = \\frac1N\\sum_n f(x_n; D)`:

* :func:`group_curvature` -- the closed-form second-order condition for an atom that codes
  its group of points alone, :math:`\\lambda_{\\max}(P C_S P) \\le \\mu`;
* :func:`atom_hessian` -- the Riemannian Hessian of :math:`F` in one atom for any support
  pattern, by automatic differentiation of the fixed-support value function;
* :func:`rotate_atom` -- a geodesic rotation of one atom, to measure the curvature;
* :func:`new_atom_bound` -- the guaranteed decrease :math:`\\frac1{2N}\\sum_n(u^\\top r_n - \\lambda)_+^2`
  of adding an atom ``u``;
* :func:`split_atom` and :func:`split_rate` -- splitting an atom into ``d ± εu`` with a spare atom
  and its first-order decrease :math:`\\frac{\\varepsilon}{N}\\sum_n z_{nk}|u^\\top r_n|`;
* :func:`value_gradient` and :func:`minimize_on_spheres` -- the Danskin gradient of :math:`F` and
  an L-BFGS minimiser on the spheres, the independent checks of Chapter 2's fits.

Row convention as everywhere in :mod:`companion`: samples are rows of ``X``, atoms are rows of
``D``, codes are rows of ``Z`` and the residuals are ``R = X - Z @ D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._validation import (ArrayKind, as_tensor, check_codes, check_columns, check_dictionary,
                          check_nonnegative, check_positive)
from .coding import encode

__all__ = [
    "AtomHessian",
    "GroupCurvature",
    "SphereMinimisation",
    "atom_hessian",
    "group_curvature",
    "minimize_on_spheres",
    "new_atom_bound",
    "rotate_atom",
    "split_atom",
    "split_rate",
    "value_gradient",
]


def _check_index(k: Any, n_atoms: int, name: str = "k") -> int:
    """Return ``k`` as an int in ``[0, n_atoms)``, naming ``name`` in errors."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an integer atom index, got {k!r}")
    if not 0 <= int(k) < n_atoms:
        raise ValueError(f"{name} must index an atom, 0 <= {name} < {n_atoms}; got {int(k)}")
    return int(k)


def _problem(X: Any, D: Any, lam: float, Z: Any) -> tuple[torch.Tensor, torch.Tensor, float,
                                                          torch.Tensor, ArrayKind]:
    """Validate ``(X, D, lam, Z)``; compute exact codes when ``Z`` is None."""
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    check_columns(Dt, "D", Xt.shape[1], "X")
    check_dictionary(Dt, "D")
    if Z is None:
        Zt = encode(Xt, Dt, lam)
    else:
        Zt, _ = as_tensor(Z, "Z", ndim=2, like=Xt)
        check_codes(Zt, "Z", (Xt.shape[0], Dt.shape[0]))
    return Xt, Dt, lam, Zt, kind


def _tangent_direction(u: Any, d: torch.Tensor, name: str = "u") -> torch.Tensor:
    """Project ``u`` onto the tangent space of the sphere at ``d`` and normalise it."""
    ut, _ = as_tensor(u, name, ndim=1, like=d)
    if ut.shape[0] != d.shape[0]:
        raise ValueError(f"{name} must have {d.shape[0]} entries (n_features), got {ut.shape[0]}")
    ut = ut - (ut @ d) * d
    norm = float(ut.norm())
    if norm <= 1e-12 * max(1.0, float(d.norm())):
        raise ValueError(f"{name} is parallel to the atom; it has no component orthogonal to it")
    return ut / norm


@dataclass
class GroupCurvature:
    r"""Second-order condition of an atom that codes its group alone (Chapter 2, eq. ``second-order``).

    Attributes
    ----------
    mu : float
        :math:`\mu = \|z_k\|_2^2 + \lambda\|z_k\|_1`, the multiplier of the sphere constraint in
        the centroid form of T2 (``z_k`` is column ``k`` of the codes).
    lambda_max : float
        :math:`\lambda_{\max}(P C_S P)` with :math:`P = I - d_kd_k^\top` and
        :math:`C_S = \sum_{n\in S} x_n x_n^\top` over the points the atom codes.
    gap : float
        ``mu - lambda_max``: ``>= 0`` is necessary and ``> 0`` sufficient for the atom to be a
        local minimum of :math:`F` in its own direction.
    direction : array (n_features,)
        A unit vector orthogonal to :math:`d_k` attaining ``lambda_max``: the rotation that
        lowers the loss fastest when ``gap < 0``.
    hessian : array (n_features, n_features)
        The Riemannian Hessian :math:`\frac1N(\mu P - P C_S P)` of :math:`F` in :math:`d_k`.
    n_coded : int
        Number of points the atom codes, :math:`|S|`.
    alone : bool
        Whether every point the atom codes is coded by it alone; the formula assumes so.
    """

    mu: float
    lambda_max: float
    gap: float
    direction: Any
    hessian: Any
    n_coded: int
    alone: bool


def group_curvature(X: Any, D: Any, lam: float, k: int, Z: Any = None) -> GroupCurvature:
    r"""Closed-form curvature of :math:`F` in atom ``k`` when it codes its group alone (Chapter 2).

    If atom :math:`d_k` codes the points :math:`S = \{n : z_{nk} > 0\}` and no other atom is
    active on them, then near :math:`d_k` (other atoms fixed, strict complementarity)

    .. math::
        F(d) = \text{const} - \frac1{2N}\sum_{n\in S}(d^\top x_n - \lambda)^2,\qquad \|d\| = 1,

    whose Riemannian Hessian at a stationary :math:`d_k` is
    :math:`\frac1N(\mu P - P C_S P)`, :math:`P = I - d_kd_k^\top`, :math:`C_S=\sum_{n\in S}x_nx_n^\top`,
    :math:`\mu = \|z_k\|_2^2 + \lambda\|z_k\|_1`. Hence the condition
    :math:`\lambda_{\max}(P C_S P) \le \mu` (necessary; strict inequality is sufficient).

    Parameters
    ----------
    X : array (n_samples, n_features)
    D : array (n_atoms, n_features)
        Unit-norm atoms as rows.
    lam : float
        The penalty :math:`\lambda > 0`.
    k : int
        The atom.
    Z : array (n_samples, n_atoms), optional
        Codes; exact codes from :func:`companion.encode` when omitted.

    Returns
    -------
    GroupCurvature
        ``alone`` tells whether the formula's assumption holds; when it does not, use
        :func:`atom_hessian`.
    """
    Xt, Dt, lam, Zt, kind = _problem(X, D, lam, Z)
    k = _check_index(k, Dt.shape[0])
    with torch.no_grad():
        d = Dt[k]
        zk = Zt[:, k]
        coded = zk > 0
        alone = bool(((Zt[coded] > 0).sum(1) == 1).all())
        Xs = Xt[coded]
        mu = float((zk * zk).sum() + lam * zk.sum())
        eye = torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
        P = eye - torch.outer(d, d)
        PCP = P @ (Xs.T @ Xs) @ P
        PCP = 0.5 * (PCP + PCP.T)
        evals, evecs = torch.linalg.eigh(PCP)
        lmax = float(evals[-1])
        u = evecs[:, -1]
        u = u - (u @ d) * d
        u = u / u.norm() if float(u.norm()) > 0 else u
        H = (mu * P - PCP) / Xt.shape[0]
    return GroupCurvature(mu=mu, lambda_max=lmax, gap=mu - lmax, direction=kind.out(u),
                          hessian=kind.out(H), n_coded=int(coded.sum()), alone=alone)


@dataclass
class AtomHessian:
    r"""Riemannian Hessian of :math:`F` in one atom, other atoms fixed (Chapter 2).

    Attributes
    ----------
    hessian : array (n_features, n_features)
        The Hessian as a symmetric matrix on the ambient space, zero along :math:`d_k`.
    eigenvalues : array (n_features - 1,)
        Its eigenvalues on the tangent space :math:`d_k^\perp`, ascending.
    min_eigenvalue : float
        The smallest of them: ``>= 0`` is necessary for a local minimum in this atom.
    direction : array (n_features,)
        A unit tangent vector attaining ``min_eigenvalue``.
    margin : float
        Strict-complementarity margin of the support pattern that the Hessian assumes fixed:
        the smallest of the active codes of the points the atom codes, of
        :math:`\lambda - d_j^\top r_n` over inactive pairs on those points, and of
        :math:`\lambda - d_k^\top r_n` over the points it does not code. The Hessian is the
        Hessian of :math:`F` when ``margin > 0``.
    """

    hessian: Any
    eigenvalues: Any
    min_eigenvalue: float
    direction: Any
    margin: float


def atom_hessian(X: Any, D: Any, lam: float, k: int, Z: Any = None) -> AtomHessian:
    r"""Riemannian Hessian of :math:`F(D)` in atom ``k`` for any support pattern (Chapter 2).

    With the supports :math:`S_n = \{j : z_{nj} > 0\}` held fixed (valid under strict
    complementarity, see :attr:`AtomHessian.margin`), each point's cost is the smooth function

    .. math::
        f_{S_n}(x_n; D) = \min_{z_{S_n}} \tfrac12\|x_n - z_{S_n} D_{S_n}\|^2 + \lambda\mathbf 1^\top z_{S_n}
        = \tfrac12\|x_n\|^2 - \tfrac12 b_n^\top (D_{S_n} D_{S_n}^\top)^{-1} b_n,\quad
        b_n = D_{S_n}x_n - \lambda\mathbf 1,

    of the dictionary. The Hessian of :math:`v \mapsto F\big((d_k + Bv)/\|d_k + Bv\|\big)` at
    :math:`v = 0`, with :math:`B` an orthonormal basis of :math:`d_k^\perp`, is computed by
    automatic differentiation; the normalisation is a second-order retraction of the sphere,
    so this is the Riemannian Hessian. For an atom that codes its group alone it reduces to
    :func:`group_curvature`'s :math:`\frac1N(\mu P - P C_S P)`.
    """
    Xt, Dt, lam, Zt, kind = _problem(X, D, lam, Z)
    k = _check_index(k, Dt.shape[0])
    n, p = Xt.shape
    with torch.no_grad():
        d = Dt[k]
        R = Xt - Zt @ Dt
        slack = lam - R @ Dt.T
        on = Zt > 0
        rows = on[:, k]
        margins = [float(slack[~rows, k].min()) if bool((~rows).any()) else float("inf")]
        if bool(rows.any()):
            margins.append(float(Zt[rows][on[rows]].min()))
            off = ~on[rows]
            if bool(off.any()):
                margins.append(float(slack[rows][off].min()))
        margin = min(margins)
        # orthonormal basis of the tangent space d_k^⊥
        eye = torch.eye(p, dtype=Dt.dtype, device=Dt.device)
        Q, _ = torch.linalg.qr(torch.cat([d[:, None], eye], 1))
        B = Q[:, 1:p]
        B = B - torch.outer(d, d @ B)
        Xs, M = Xt[rows], on[rows].to(Dt.dtype)
    if Xs.shape[0] == 0:
        Hv = torch.zeros(p - 1, p - 1, dtype=Dt.dtype, device=Dt.device)
    else:
        eyeK = torch.eye(Dt.shape[0], dtype=Dt.dtype, device=Dt.device)

        def value(v: torch.Tensor) -> torch.Tensor:
            dk = d + B @ v
            dk = dk / dk.norm()
            Dv = torch.cat([Dt[:k], dk[None], Dt[k + 1:]], 0)
            G = Dv @ Dv.T
            A = M[:, :, None] * G[None] * M[:, None, :] + torch.diag_embed(1 - M) * eyeK
            b = M * (Xs @ Dv.T - lam)
            z = torch.linalg.solve(A, b.unsqueeze(2)).squeeze(2)
            r = Xs - z @ Dv
            return (0.5 * (r * r).sum() + lam * z.sum()) / n

        v0 = torch.zeros(p - 1, dtype=Dt.dtype, device=Dt.device)
        Hv = torch.autograd.functional.hessian(value, v0).detach()
    with torch.no_grad():
        Hv = 0.5 * (Hv + Hv.T)
        evals, evecs = torch.linalg.eigh(Hv)
        H = B @ Hv @ B.T
        u = B @ evecs[:, 0]
        u = u / u.norm()
    return AtomHessian(hessian=kind.out(H), eigenvalues=kind.out(evals),
                       min_eigenvalue=float(evals[0]), direction=kind.out(u), margin=margin)


def rotate_atom(D: Any, k: int, u: Any, theta: float) -> Any:
    r"""Rotate atom ``k`` by the angle ``theta`` towards ``u`` along a great circle (Chapter 2).

    Returns a copy of ``D`` with row ``k`` replaced by
    :math:`\cos\theta\, d_k + \sin\theta\, \hat u`, where :math:`\hat u` is the normalised
    component of ``u`` orthogonal to :math:`d_k`. The result still has unit-norm rows.
    """
    Dt, kind = as_tensor(D, "D", ndim=2)
    check_dictionary(Dt, "D")
    k = _check_index(k, Dt.shape[0])
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise TypeError(f"theta must be a number, got {theta!r}") from None
    with torch.no_grad():
        uhat = _tangent_direction(u, Dt[k])
        out = Dt.clone()
        out[k] = math.cos(theta) * Dt[k] + math.sin(theta) * uhat
    return kind.out(out)


def new_atom_bound(X: Any, D: Any, lam: float, u: Any, Z: Any = None) -> float:
    r"""Guaranteed decrease of :math:`F` when the unit atom ``u`` is added (Chapter 2, new-atom test).

    .. math::
        F(D) - F(D \cup \{u\}) \;\ge\; \frac1{2N}\sum_n (u^\top r_n - \lambda)_+^2,

    with :math:`r_n` the residuals of exact codes for ``D`` (or of ``Z`` when given, in which
    case the bound is on the decrease of the joint loss :math:`L(D, Z)`). The bound is zero
    exactly when adding ``u`` cannot lower the loss: :math:`u^\top r_n \le \lambda` for all ``n``.
    ``u`` is normalised first.
    """
    Xt, Dt, lam, Zt, _ = _problem(X, D, lam, Z)
    ut, _ = as_tensor(u, "u", ndim=1, like=Xt)
    if ut.shape[0] != Xt.shape[1]:
        raise ValueError(f"u must have {Xt.shape[1]} entries (n_features), got {ut.shape[0]}")
    norm = float(ut.norm())
    if norm == 0:
        raise ValueError("u must be a nonzero vector")
    with torch.no_grad():
        R = Xt - Zt @ Dt
        gain = ((R @ (ut / norm) - lam).clamp(min=0) ** 2).sum() / (2 * Xt.shape[0])
    return float(gain)


def split_atom(D: Any, k: int, u: Any, eps: float, spare: int) -> Any:
    r"""Split atom ``k`` into :math:`d_k \pm \varepsilon u` (normalised), using atom ``spare`` (Chapter 2).

    Returns a copy of ``D`` in which row ``k`` becomes :math:`(d_k + \varepsilon\hat u)/\|\cdot\|`
    and row ``spare`` becomes :math:`(d_k - \varepsilon\hat u)/\|\cdot\|`, with :math:`\hat u`
    the normalised component of ``u`` orthogonal to :math:`d_k`. The spare atom's old
    direction is discarded; the move costs nothing when that atom is unused.
    """
    Dt, kind = as_tensor(D, "D", ndim=2)
    check_dictionary(Dt, "D")
    k = _check_index(k, Dt.shape[0])
    spare = _check_index(spare, Dt.shape[0], "spare")
    if spare == k:
        raise ValueError(f"spare must differ from k, got spare = k = {k}")
    eps = check_nonnegative(eps, "eps")
    with torch.no_grad():
        d = Dt[k]
        uhat = _tangent_direction(u, d)
        out = Dt.clone()
        plus, minus = d + eps * uhat, d - eps * uhat
        out[k] = plus / plus.norm()
        out[spare] = minus / minus.norm()
    return kind.out(out)


def split_rate(X: Any, D: Any, lam: float, k: int, u: Any, Z: Any = None) -> float:
    r"""First-order rate of decrease of :math:`F` when atom ``k`` is split along ``u`` (Chapter 2).

    .. math::
        F(D) - F(D_{\text{split}}(\varepsilon)) = \frac{\varepsilon}{N}\sum_n z_{nk}\,|u^\top r_n| + O(\varepsilon^2)
        \quad\text{(a lower bound at first order)},

    for a split by :func:`split_atom` into an unused spare atom, where ``u`` is normalised and
    orthogonal to :math:`d_k`. For points that the atom codes alone, :math:`u^\top r_n = u^\top x_n`.
    Returns the rate :math:`\frac1N\sum_n z_{nk}|u^\top r_n|`.
    """
    Xt, Dt, lam, Zt, _ = _problem(X, D, lam, Z)
    k = _check_index(k, Dt.shape[0])
    with torch.no_grad():
        uhat = _tangent_direction(u, Dt[k])
        R = Xt - Zt @ Dt
        rate = (Zt[:, k] * (R @ uhat).abs()).sum() / Xt.shape[0]
    return float(rate)


def value_gradient(X: Any, D: Any, lam: float, Z: Any = None) -> Any:
    r"""Danskin gradient of the value function in every atom (Chapter 2, lemma ``lem-danskin``).

    .. math::
        \nabla_{d_k} F(D) = -\frac1N \sum_n z_{nk}\, r_n ,\qquad\text{i.e.}\qquad
        \nabla_D F = -\tfrac1N Z^\top R ,

    with exact codes (or ``Z`` when given). It is the gradient of :math:`F` wherever the codes
    are unique; Chapter 2 checks it against finite differences of :math:`F`. Returns an array
    shaped like ``D`` (the Euclidean gradient; project each row on :math:`d_k^\perp` for the
    gradient on the sphere).
    """
    Xt, Dt, lam, Zt, kind = _problem(X, D, lam, Z)
    with torch.no_grad():
        G = -(Zt.T @ (Xt - Zt @ Dt)) / Xt.shape[0]
    return kind.out(G)


@dataclass
class SphereMinimisation:
    """What :func:`minimize_on_spheres` returns.

    Attributes
    ----------
    D : array (n_atoms, n_features)
        The final dictionary (unit-norm rows).
    loss : float
        :math:`F(D)` with exact codes.
    riemannian_gradient : float
        :math:`\\max_k \\|(I - d_kd_k^\\top)\\nabla_{d_k}F\\|` at ``D`` (zero at a stationary point).
    n_iter : int
        L-BFGS iterations.
    message : str
        SciPy's stopping message.
    """

    D: Any
    loss: float
    riemannian_gradient: float
    n_iter: int
    message: str


def minimize_on_spheres(X: Any, D0: Any, lam: float, *, max_iter: int = 2000,
                        gtol: float = 1e-12) -> SphereMinimisation:
    r"""Minimise :math:`F(D)` over unit-norm atoms with L-BFGS (an independent check of Chapter 2's fits).

    Writes :math:`d_k = w_k/\|w_k\|` and hands :math:`W \mapsto F(W/\|W\|)` with its gradient
    :math:`(I - d_kd_k^\top)\nabla_{d_k}F/\|w_k\|` (Danskin, :func:`value_gradient`) to SciPy's
    L-BFGS-B. It shares only the exact codes with :func:`companion.fit_dictionary` (whose block
    sweeps use T2's centroid form and whose polish is its own Riemannian L-BFGS on the spheres):
    another implementation, an unconstrained parametrisation and SciPy's stopping rule, so
    reaching the same point from another start is evidence that the point is stationary, not a
    restatement of the fit's stopping rule.
    """
    from scipy import optimize

    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D0, "D0", ndim=2, like=Xt)
    check_columns(Dt, "D0", Xt.shape[1], "X")
    check_dictionary(Dt, "D0", unit_norm=False)
    shape = tuple(Dt.shape)
    Xc = Xt.detach().cpu().to(torch.float64)

    def fun(w):
        W = torch.from_numpy(w.reshape(shape))
        norms = W.norm(dim=1, keepdim=True)
        D = W / norms
        Z = encode(Xc, D, lam)
        R = Xc - Z @ D
        value = float((0.5 * (R * R).sum(1) + lam * Z.sum(1)).mean())
        G = -(Z.T @ R) / Xc.shape[0]
        G = (G - (G * D).sum(1, keepdim=True) * D) / norms
        return value, G.numpy().ravel()

    res = optimize.minimize(fun, Dt.detach().cpu().to(torch.float64).numpy().ravel(), jac=True,
                            method="L-BFGS-B",
                            options={"maxiter": max_iter, "gtol": gtol, "ftol": 1e-15, "maxcor": 30})
    W = torch.from_numpy(res.x.reshape(shape))
    D = W / W.norm(dim=1, keepdim=True)
    G = value_gradient(Xc, D, lam)
    rg = float((G - (G * D).sum(1, keepdim=True) * D).norm(dim=1).max())
    return SphereMinimisation(D=kind.out(D.to(dtype=Xt.dtype, device=Xt.device)),
                              loss=float(fun(res.x)[0]), riemannian_gradient=rg,
                              n_iter=int(res.nit), message=str(res.message))
