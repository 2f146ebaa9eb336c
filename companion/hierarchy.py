r"""Hierarchical concepts: parent/child data, concept trees, and what optimality predicts for them (Chapter 3).

Two generators with known ground truth:

- :func:`parent_child`: a parent direction :math:`p` and children :math:`c_1,\dots,c_m`
  (orthonormal); every sample is :math:`a\,p` (parent only) or :math:`a\,p + b\,c_i`.
- :func:`concept_tree`: a tree of orthonormal directions (root → groups → leaves → …); every
  sample walks from the root to a leaf and sums the directions on its path, each with its own
  random magnitude.

Two predictions derived in Chapter 3 from the optimality conditions T1–T2 alone:

- :func:`predict_partial_absorption`: with random magnitudes, the symmetric ansatz
  :math:`\{p,\ u_i = \cos\theta\,p + \sin\theta\,c_i\}` gives every sample's exact code in
  closed form (:func:`ansatz_codes`, T1); stationarity of :math:`\theta` (T2) is a
  one-dimensional equation whose root predicts the child atoms' angle to the parent and the
  absorption rate :math:`P(\text{parent latent silent} \mid \text{child present})`.
- :func:`predict_splitting`: with fewer atoms than leaves, an atom that codes a group of
  samples alone is a fixed point of the thresholded power iteration (T2c,
  :func:`group_atom`); the predicted dictionary of K atoms is the best partition of the
  leaves into K groups, each coded by its own weighted-centroid atom.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from scipy import optimize

from ._validation import as_tensor, check_nonnegative, check_positive, check_positive_int
from .runtime import generator

__all__ = [
    "ConceptTree",
    "ParentChildData",
    "PartialAbsorptionPrediction",
    "SplittingPrediction",
    "ansatz_child_cost",
    "ansatz_codes",
    "concept_tree",
    "group_atom",
    "parent_child",
    "predict_partial_absorption",
    "predict_partial_absorption_empirical",
    "predict_splitting",
]


# ----------------------------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------------------------

def _magnitude_pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}") from None
    check_nonnegative(lo, f"{name}[0]")
    check_positive(hi, f"{name}[1]")
    if lo > hi:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return lo, hi


def _orthonormal(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """``n`` orthonormal rows in R^d drawn from a seeded CPU generator (Haar via QR)."""
    A = torch.randn(d, n, generator=g, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(R)).unsqueeze(0)
    return Q.T.contiguous()


def _finish(t: torch.Tensor, device: Any, dtype: torch.dtype) -> torch.Tensor:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return t.to(device=dev, dtype=dtype)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


@dataclass
class ParentChildData:
    """Samples of the parent/child model (Chapter 3), with their ground truth.

    Attributes
    ----------
    X : torch.Tensor (n_samples, n_features)
        The samples.
    parent : torch.Tensor (n_features,)
        The parent direction :math:`p` (unit norm).
    children : torch.Tensor (n_children, n_features)
        The child directions :math:`c_i` (unit norm, orthogonal to each other and to p).
    child : torch.Tensor of int64 (n_samples,)
        Which child each sample holds, ``-1`` for parent-only samples.
    a, b : torch.Tensor (n_samples,)
        Parent and child magnitudes (``b = 0`` for parent-only samples).
    """

    X: torch.Tensor
    parent: torch.Tensor
    children: torch.Tensor
    child: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    @property
    def has_child(self) -> torch.Tensor:
        """Boolean mask of the samples that hold a child (the parent concept is in every sample)."""
        return self.child >= 0

    @property
    def directions(self) -> torch.Tensor:
        """Ground-truth directions stacked as rows: the parent first, then the children."""
        return torch.cat([self.parent.unsqueeze(0), self.children], 0)


def parent_child(
    n_samples: int,
    n_children: int,
    seed: int,
    *,
    parent_magnitude: tuple[float, float] = (0.5, 1.5),
    child_magnitude: tuple[float, float] = (0.5, 1.5),
    parent_only: float = 0.25,
    n_features: int | None = None,
    noise_std: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> ParentChildData:
    r"""Draw samples of the parent/child model of Chapter 3.

    .. math::
        x_n = a_n\,p + b_n\,c_{i_n} + \varepsilon_n ,\qquad
        a_n \sim U[a_{\min}, a_{\max}],\quad b_n \sim U[b_{\min}, b_{\max}],\quad
        \varepsilon_n \sim \mathcal N(0, \sigma^2 I),

    where with probability ``parent_only`` the sample holds no child (:math:`b_n = 0`) and
    otherwise :math:`i_n` is uniform among the ``n_children`` children. The directions
    :math:`p, c_1, \dots, c_m` are orthonormal, drawn at random (Haar) in
    :math:`\mathbb R^{d}`. A range with ``low == high`` gives fixed magnitudes.

    Parameters
    ----------
    n_samples, n_children : int
        Number of samples and of children :math:`m`.
    seed : int
        Seed of the CPU generator (same data on every device).
    parent_magnitude, child_magnitude : (float, float)
        Ranges of the uniform magnitudes :math:`a` and :math:`b`.
    parent_only : float
        Probability that a sample holds the parent alone, in ``[0, 1)``.
    n_features : int, optional
        Ambient dimension :math:`d \ge m + 1`; default ``m + 1``.
    noise_std : float
        Standard deviation of the isotropic Gaussian noise.
    device, dtype
        Where and in which precision the result lives (drawn in float64 on the CPU first).
    """
    n_samples = check_positive_int(n_samples, "n_samples")
    m = check_positive_int(n_children, "n_children")
    d = m + 1 if n_features is None else check_positive_int(n_features, "n_features")
    if d < m + 1:
        raise ValueError(f"n_features must be >= n_children + 1 = {m + 1}, got {d}")
    alo, ahi = _magnitude_pair(parent_magnitude, "parent_magnitude")
    blo, bhi = _magnitude_pair(child_magnitude, "child_magnitude")
    parent_only = check_nonnegative(parent_only, "parent_only")
    if parent_only >= 1:
        raise ValueError(f"parent_only must be < 1, got {parent_only}")
    noise_std = check_nonnegative(noise_std, "noise_std")
    _check_dtype(dtype)

    g = generator(seed)
    dirs = _orthonormal(m + 1, d, g)
    alone = torch.rand(n_samples, generator=g, dtype=torch.float64) < parent_only
    which = torch.randint(0, m, (n_samples,), generator=g)
    child = torch.where(alone, torch.full_like(which, -1), which)
    a = alo + (ahi - alo) * torch.rand(n_samples, generator=g, dtype=torch.float64)
    b = blo + (bhi - blo) * torch.rand(n_samples, generator=g, dtype=torch.float64)
    b = torch.where(alone, torch.zeros_like(b), b)
    C = torch.zeros(n_samples, m, dtype=torch.float64)
    C[~alone, child[~alone]] = b[~alone]
    X = a.unsqueeze(1) * dirs[0] + C @ dirs[1:]
    X = X + noise_std * torch.randn(n_samples, d, generator=g, dtype=torch.float64)
    return ParentChildData(
        X=_finish(X, device, dtype), parent=_finish(dirs[0], device, dtype),
        children=_finish(dirs[1:], device, dtype), child=_finish(child, device, torch.int64),
        a=_finish(a, device, dtype), b=_finish(b, device, dtype))


@dataclass
class ConceptTree:
    """Samples of a concept tree (Chapter 3), with their ground truth.

    Nodes are numbered level by level (the root is node 0); every node has its own unit
    direction, all directions orthonormal.

    Attributes
    ----------
    X : torch.Tensor (n_samples, n_features)
        The samples.
    directions : torch.Tensor (n_nodes, n_features)
        The node directions.
    parent : numpy.ndarray of int (n_nodes,)
        The parent node of every node (``-1`` for the root).
    level : numpy.ndarray of int (n_nodes,)
        Depth of every node (root 0).
    leaf : torch.Tensor of int64 (n_samples,)
        The leaf node each sample walked to.
    coefficients : torch.Tensor (n_samples, n_nodes)
        Ground-truth magnitudes: nonzero exactly on the nodes of each sample's path.
    """

    X: torch.Tensor
    directions: torch.Tensor
    parent: np.ndarray
    level: np.ndarray
    leaf: torch.Tensor
    coefficients: torch.Tensor

    @property
    def leaves(self) -> list[int]:
        """The leaf nodes, in order."""
        return [int(i) for i in np.flatnonzero(self.level == self.level.max())]

    def nodes_at(self, level: int) -> list[int]:
        """The nodes at depth ``level``."""
        return [int(i) for i in np.flatnonzero(self.level == level)]

    def leaves_under(self, node: int) -> list[int]:
        """The leaves in the subtree of ``node``."""
        out = []
        for leaf in self.leaves:
            k = leaf
            while k != -1 and k != node:
                k = int(self.parent[k])
            if k == node:
                out.append(leaf)
        return out

    def members(self, nodes: int | list[int]) -> torch.Tensor:
        """Boolean mask of the samples whose path passes through any of ``nodes``."""
        nodes = [nodes] if isinstance(nodes, int) else list(nodes)
        return (self.coefficients[:, nodes] != 0).any(1)

    def node_means(self) -> torch.Tensor:
        """Mean sample under every node, (n_nodes, n_features): the direction each node's samples share."""
        return torch.stack([self.X[self.members(v)].mean(0) for v in range(len(self.parent))])

    def sibling_unions(self) -> list[list[int]]:
        """Every set of leaves that lies under one node or under several siblings.

        These are the groups of leaves that *follow the tree*: a union of the subtrees of
        some children of one node (all of them gives the node's own subtree).
        """
        out: set[tuple[int, ...]] = set()
        for node in range(len(self.parent)):
            kids = [int(k) for k in np.flatnonzero(self.parent == node)]
            for r in range(1, len(kids) + 1):
                for subset in itertools.combinations(kids, r):
                    out.add(tuple(sorted(sum((self.leaves_under(k) for k in subset), []))))
        return [list(u) for u in sorted(out, key=lambda u: (len(u), u))]


def concept_tree(
    n_samples: int,
    branching: tuple[int, ...],
    seed: int,
    *,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.0,
    n_features: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> ConceptTree:
    r"""Draw samples of a concept tree (Chapter 3).

    The tree has a root and ``len(branching)`` further levels; every node at depth ``l`` has
    ``branching[l]`` children, so ``branching=(3, 2)`` gives root → 3 groups → 6 leaves. Each
    sample picks a leaf uniformly and sums the directions on its root-to-leaf path,

    .. math::
        x_n = \sum_{v \in \mathrm{path}(\ell_n)} a_{nv}\, e_v + \varepsilon_n,\qquad
        a_{nv} \sim U[a_{\min}, a_{\max}]\ \text{independently},

    with orthonormal node directions :math:`e_v` (Haar-random in :math:`\mathbb R^d`) and
    Gaussian noise of standard deviation ``noise_std``.

    Parameters
    ----------
    n_samples : int
        Number of samples.
    branching : tuple of int
        Children per node at each level below the root (at least one level).
    seed : int
        Seed of the CPU generator.
    magnitude : (float, float)
        Range of the uniform magnitudes (the same at every level).
    noise_std : float
        Standard deviation of the isotropic Gaussian noise.
    n_features : int, optional
        Ambient dimension, at least the number of nodes (the default).
    device, dtype
        Where and in which precision the result lives.
    """
    n_samples = check_positive_int(n_samples, "n_samples")
    try:
        branching = tuple(branching)
    except TypeError:
        raise TypeError(f"branching must be a tuple of positive integers, got {branching!r}") from None
    if not branching:
        raise ValueError("branching must hold at least one level")
    for i, bval in enumerate(branching):
        check_positive_int(bval, f"branching[{i}]")
    lo, hi = _magnitude_pair(magnitude, "magnitude")
    noise_std = check_nonnegative(noise_std, "noise_std")
    _check_dtype(dtype)

    parent, level = [-1], [0]
    frontier = [0]
    for depth, bval in enumerate(branching, start=1):
        nxt = []
        for node in frontier:
            for _ in range(bval):
                parent.append(node)
                level.append(depth)
                nxt.append(len(parent) - 1)
        frontier = nxt
    n_nodes = len(parent)
    d = n_nodes if n_features is None else check_positive_int(n_features, "n_features")
    if d < n_nodes:
        raise ValueError(f"n_features must be >= the number of nodes {n_nodes}, got {d}")
    parent_arr, level_arr = np.array(parent), np.array(level)
    leaves = np.flatnonzero(level_arr == level_arr.max())
    path = np.zeros((len(leaves), n_nodes), dtype=bool)
    for j, leaf in enumerate(leaves):
        k = int(leaf)
        while k != -1:
            path[j, k] = True
            k = int(parent_arr[k])

    g = generator(seed)
    dirs = _orthonormal(n_nodes, d, g)
    pick = torch.randint(0, len(leaves), (n_samples,), generator=g)
    mags = lo + (hi - lo) * torch.rand(n_samples, n_nodes, generator=g, dtype=torch.float64)
    coef = mags * torch.from_numpy(path)[pick].to(torch.float64)
    X = coef @ dirs + noise_std * torch.randn(n_samples, d, generator=g, dtype=torch.float64)
    return ConceptTree(
        X=_finish(X, device, dtype), directions=_finish(dirs, device, dtype),
        parent=parent_arr, level=level_arr,
        leaf=_finish(torch.from_numpy(leaves)[pick], device, torch.int64),
        coefficients=_finish(coef, device, dtype))


# ----------------------------------------------------------------------------------------
# partial absorption: the symmetric ansatz
# ----------------------------------------------------------------------------------------

def ansatz_codes(a: Any, b: Any, theta: float, lam: float) -> tuple[Any, Any]:
    r"""Exact codes of :math:`x = a\,p + b\,c_i` for the dictionary :math:`\{p, u_1..u_m\}` (Chapter 3, T1).

    With :math:`u_i = \cos\theta\,p + \sin\theta\,c_i` only :math:`p` and :math:`u_i` can
    fire, and T1 on the plane :math:`(p, c_i)` gives, with :math:`t = \tan(\theta/2)`,

    .. math::
        z_p > 0 \iff a > \max\!\big(\lambda,\ b\cot\theta + \tfrac{\lambda}{1+\cos\theta}\big),

    and then :math:`z_p = a - b\cot\theta - \lambda/(1+\cos\theta)`,
    :math:`z_u = b/\sin\theta - \lambda/(1+\cos\theta)` (both active, :math:`b > \lambda t`) or
    :math:`z_p = a-\lambda,\ z_u = 0` (:math:`b \le \lambda t`); otherwise :math:`z_p = 0` and
    :math:`z_u = (a\cos\theta + b\sin\theta - \lambda)_+`.

    Parameters
    ----------
    a, b : array
        Parent and child magnitudes (same shape; numpy or torch).
    theta : float
        Angle of the child atoms to the parent, in :math:`(0, \pi/2]`.
    lam : float
        The penalty :math:`\lambda > 0`.

    Returns
    -------
    (z_parent, z_child) : arrays of the kind of ``a``
    """
    lam = check_positive(lam, "lam")
    theta = float(theta)
    if not 0 < theta <= math.pi / 2:
        raise ValueError(f"theta must lie in (0, pi/2], got {theta}")
    at, kind = as_tensor(a, "a")
    bt, _ = as_tensor(b, "b", like=at)
    if at.shape != bt.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(at.shape)} and {tuple(bt.shape)}")
    c, s = math.cos(theta), math.sin(theta)
    t = math.tan(theta / 2)
    threshold = torch.clamp(bt * (c / s) + lam / (1 + c), min=lam)
    parent_on = at > threshold
    both = parent_on & (bt > lam * t)
    zp = torch.where(both, at - bt * (c / s) - lam / (1 + c),
                     torch.where(parent_on, at - lam, torch.zeros_like(at)))
    zu = torch.where(both, bt / s - lam / (1 + c),
                     torch.where(parent_on, torch.zeros_like(at), (at * c + bt * s - lam).clamp(min=0)))
    return kind.out(zp), kind.out(zu)


def ansatz_child_cost(a: Any, b: Any, theta: float, lam: float) -> Any:
    r"""Per-sample cost :math:`f(a p + b c_i;\ \{p, u_1..u_m\})` in closed form (Chapter 3).

    From :func:`ansatz_codes`: :math:`\tfrac12(a^2+b^2)` when nothing fires;
    :math:`\tfrac12(a^2+b^2-w^2) + \lambda w - \tfrac12\lambda^2` with
    :math:`w = a\cos\theta + b\sin\theta` when only :math:`u_i` fires;
    :math:`\lambda a - \tfrac12\lambda^2 + \tfrac12 b^2` when only :math:`p` fires; and
    :math:`\lambda(a + b\tan\tfrac\theta2) - \tfrac12\lambda^2/\cos^2\tfrac\theta2` when both fire.
    """
    zp, zu = ansatz_codes(a, b, theta, lam)
    at, kind = as_tensor(a, "a")
    bt, _ = as_tensor(b, "b", like=at)
    zp, _ = as_tensor(zp, "z_parent", like=at)
    zu, _ = as_tensor(zu, "z_child", like=at)
    c, s = math.cos(theta), math.sin(theta)
    rp = at - zp - zu * c
    rc = bt - zu * s
    return kind.out(0.5 * (rp * rp + rc * rc) + lam * (zp + zu))


def _inner_a(b: np.ndarray, theta: float, lam: float, alo: float, ahi: float) -> tuple[np.ndarray, np.ndarray]:
    r"""E_a[z_u · tᵀr] and P(z_p = 0) for each fixed b, a ~ U[alo, ahi] (exact: piecewise polynomial in a)."""
    c, s = math.cos(theta), math.sin(theta)
    t = math.tan(theta / 2)
    a_star = np.maximum(lam, b * c / s + lam / (1 + c))    # parent fires iff a > a_star
    a_zero = (lam - s * b) / c if c > 1e-15 else np.full_like(b, -np.inf)  # u alone fires iff a > a_zero
    both_g = np.where(b > lam * t, (b / s - lam / (1 + c)) * (-lam * t), 0.0)
    if ahi - alo <= 0:
        a = alo
        only_u = np.where(a > a_zero, (c * a + s * b - lam) * (-s * a + c * b), 0.0)
        return np.where(a > a_star, both_g, only_u), (a <= a_star).astype(float)
    k = s * b - lam

    def prim(x: np.ndarray) -> np.ndarray:    # ∫ (c x + s b − λ)(−s x + c b) dx
        return -c * s * x ** 3 / 3 + (c * c * b - s * k) * x ** 2 / 2 + k * c * b * x

    width = ahi - alo
    lo_u, hi_u = np.maximum(alo, a_zero), np.minimum(ahi, a_star)
    g = np.where(hi_u > lo_u, prim(hi_u) - prim(lo_u), 0.0)
    g = g + np.clip(ahi - np.maximum(alo, a_star), 0.0, None) * both_g
    silent = np.clip((a_star - alo) / width, 0.0, 1.0)
    return g / width, silent


_GAUSS = np.polynomial.legendre.leggauss(48)


def _expectations(theta: float, lam: float, alo: float, ahi: float, blo: float, bhi: float) -> tuple[float, float]:
    """(E[z_u · tᵀr], P(parent silent)) over child samples under the ansatz.

    Exact in a; Gauss–Legendre in b on the pieces between the kinks of the integrand.
    """
    if bhi - blo <= 0:
        g, r = _inner_a(np.array([blo]), theta, lam, alo, ahi)
        return float(g[0]), float(r[0])
    c, s = math.cos(theta), math.sin(theta)
    t = math.tan(theta / 2)
    kinks = [lam * t, (lam - alo * c) / s, (lam - ahi * c) / s]
    if c > 1e-15:
        kinks += [(alo - lam / (1 + c)) * s / c, (ahi - lam / (1 + c)) * s / c,
                  (lam - lam / (1 + c)) * s / c]
    edges = np.array([blo] + sorted({x for x in kinks if blo < x < bhi}) + [bhi])
    x, w = _GAUSS
    mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
    nodes = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    weights = (half[:, None] * w[None, :]).ravel()
    g, r = _inner_a(nodes, theta, lam, alo, ahi)
    return float(weights @ g) / (bhi - blo), float(weights @ r) / (bhi - blo)


@dataclass
class PartialAbsorptionPrediction:
    r"""What :func:`predict_partial_absorption` returns.

    Attributes
    ----------
    lam : float
        The penalty.
    theta : float
        Predicted angle (radians) between every child atom and the parent direction.
    cos_theta : float
        Its cosine, the child atoms' predicted cosine with :math:`p`.
    absorption_rate : float
        Predicted :math:`P(z_p = 0 \mid \text{child present})`.
    stationarity : float
        :math:`E[z_u\,t^\top r]` at the root (T2 along the sphere; zero up to quadrature error).
    expected_child_cost : float
        Expected per-sample cost of a child sample at the root (midpoint rule on a
        1000 × 1000 grid of :func:`ansatz_child_cost`; for comparison with measured losses).
    """

    lam: float
    theta: float
    cos_theta: float
    absorption_rate: float
    stationarity: float
    expected_child_cost: float = field(default=float("nan"))


def _ansatz_root(g) -> float:
    """The first downward zero crossing of the ansatz stationarity ``g`` on (0, π/2]."""
    grid = np.linspace(1e-3, math.pi / 2, 160)
    vals = [g(th) for th in grid]
    for i in range(len(grid) - 1):
        if vals[i] > 0 >= vals[i + 1]:
            return optimize.brentq(g, grid[i], grid[i + 1], xtol=1e-13, rtol=1e-13)
    # g never turns negative: the child atoms are pushed to the children themselves
    return float(grid[-1]) if vals[-1] > 0 else float(grid[int(np.argmin(np.abs(vals)))])


def predict_partial_absorption(
    lam: float,
    *,
    parent_magnitude: tuple[float, float] = (0.5, 1.5),
    child_magnitude: tuple[float, float] = (0.5, 1.5),
) -> PartialAbsorptionPrediction:
    r"""Predict partial absorption in the parent/child model from T1–T2 alone (Chapter 3).

    Ansatz: the parent atom is :math:`p` and every child atom is
    :math:`u_i = \cos\theta\,p + \sin\theta\,c_i` (the symmetric dictionary). T1 gives each
    child sample's code in closed form (:func:`ansatz_codes`); T2 for :math:`u_i` projected on
    the sphere's tangent :math:`t = -\sin\theta\,p + \cos\theta\,c_i` is the scalar equation

    .. math::
        g(\theta) = E\big[z_u\, t^\top r\big] = 0,\qquad
        t^\top r = \begin{cases} -a\sin\theta + b\cos\theta & \text{only } u_i \text{ fires},\\
        -\lambda\tan(\theta/2) & p \text{ and } u_i \text{ fire},\end{cases}

    (:math:`g = -\partial_\theta F` by Danskin's theorem), with :math:`a \sim U[a_{\min}, a_{\max}]`
    and :math:`b \sim U[b_{\min}, b_{\max}]` independent. The expectation is exact in
    :math:`a` (piecewise polynomial) and Gauss–Legendre in :math:`b` between the kinks; the root is the
    first sign change of :math:`g` from + to − (a minimum of the expected cost), refined by
    Brent's method. Parent-only samples do not enter: under the ansatz they are coded by
    :math:`p` alone and never touch :math:`u_i`.

    Parameters
    ----------
    lam : float
        The penalty :math:`\lambda > 0`.
    parent_magnitude, child_magnitude : (float, float)
        Ranges of the uniform magnitudes; equal ends give fixed magnitudes (then the root is
        :math:`\tan\theta = b/a`, exact absorption).

    Returns
    -------
    PartialAbsorptionPrediction
    """
    lam = check_positive(lam, "lam")
    alo, ahi = _magnitude_pair(parent_magnitude, "parent_magnitude")
    blo, bhi = _magnitude_pair(child_magnitude, "child_magnitude")
    if blo == 0 and bhi == 0:
        raise ValueError("child_magnitude must not be identically zero")

    def g(th: float) -> float:
        return _expectations(th, lam, alo, ahi, blo, bhi)[0]

    root = _ansatz_root(g)
    stat, rate = _expectations(root, lam, alo, ahi, blo, bhi)
    q = 1000
    if ahi > alo:
        ga = alo + (ahi - alo) * (np.arange(q) + 0.5) / q
    else:
        ga = np.array([alo])
    if bhi > blo:
        gb = blo + (bhi - blo) * (np.arange(q) + 0.5) / q
    else:
        gb = np.array([blo])
    A, B = np.meshgrid(ga, gb, indexing="ij")
    cost = float(np.mean(ansatz_child_cost(A.ravel(), B.ravel(), root, lam)))
    return PartialAbsorptionPrediction(lam=lam, theta=float(root), cos_theta=math.cos(root),
                                       absorption_rate=float(rate), stationarity=float(stat),
                                       expected_child_cost=cost)


def predict_partial_absorption_empirical(a: Any, b: Any, lam: float) -> PartialAbsorptionPrediction:
    r"""The ansatz of :func:`predict_partial_absorption` solved on given child samples (Chapter 3).

    Same fixed point :math:`g(\theta) = \overline{z_u\,\tau^\top r} = 0`, but with the
    expectation replaced by the mean over the empirical magnitudes ``a``, ``b`` of the child
    samples (codes from :func:`ansatz_codes`), and the rate by the empirical fraction of those
    samples with :math:`z_p = 0`. Comparing a fitted dictionary with this prediction on the
    *same* samples removes the sampling error that a comparison with the population
    prediction carries (binomial standard error :math:`\sqrt{p(1-p)/n}` of the rate).

    Parameters
    ----------
    a, b : array (n_child_samples,)
        Parent and child magnitudes of the samples that hold a child.
    lam : float
        The penalty :math:`\lambda > 0`.

    Returns
    -------
    PartialAbsorptionPrediction
        ``expected_child_cost`` is the mean ansatz cost over the given samples.
    """
    lam = check_positive(lam, "lam")
    at, _ = as_tensor(a, "a", ndim=1)
    bt, _ = as_tensor(b, "b", ndim=1, like=at)
    if at.shape != bt.shape or at.numel() == 0:
        raise ValueError(f"a and b must be nonempty and of the same shape, got {tuple(at.shape)} and {tuple(bt.shape)}")
    an = at.detach().cpu().double().numpy()
    bn = bt.detach().cpu().double().numpy()

    def g(th: float) -> float:
        zp, zu = ansatz_codes(an, bn, th, lam)
        c, s = math.cos(th), math.sin(th)
        rp, rc = an - zp - zu * c, bn - zu * s
        return float(np.mean(zu * (-s * rp + c * rc)))

    root = _ansatz_root(g)
    zp, _ = ansatz_codes(an, bn, root, lam)
    cost = float(np.mean(ansatz_child_cost(an, bn, root, lam)))
    return PartialAbsorptionPrediction(lam=lam, theta=float(root), cos_theta=math.cos(root),
                                       absorption_rate=float(np.mean(zp <= 0)),
                                       stationarity=g(root), expected_child_cost=cost)


# ----------------------------------------------------------------------------------------
# splitting: weighted-centroid atoms of groups
# ----------------------------------------------------------------------------------------

def group_atom(X: Any, lam: float, *, max_iter: int = 1000, tol: float = 1e-12) -> Any:
    r"""The atom that codes a group of samples alone: a fixed point of T2c (Chapter 3).

    Iterates the thresholded power iteration

    .. math::
        d \leftarrow \frac{\sum_n (d^\top x_n - \lambda)_+\, x_n}{\big\|\sum_n (d^\top x_n - \lambda)_+\, x_n\big\|}

    from the normalised mean of the group. At a fixed point the atom is the weighted centroid
    of its group (T2a), weighted by its own activations :math:`z_n = (d^\top x_n - \lambda)_+`.

    Parameters
    ----------
    X : array (n_samples, n_features)
        The group's samples (rows).
    lam : float
        The penalty.
    max_iter : int
        Most iterations.
    tol : float
        Stop when the atom moves less than this (Euclidean norm).

    Returns
    -------
    array (n_features,)
        The unit atom, in the kind of ``X``.
    """
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    max_iter = check_positive_int(max_iter, "max_iter")
    tol = check_positive(tol, "tol")
    d = Xt.mean(0)
    if float(d.norm()) == 0:
        raise ValueError("X has zero mean: the power iteration has no starting direction")
    d = d / d.norm()
    for _ in range(max_iter):
        w = (Xt @ d - lam).clamp(min=0)
        v = w @ Xt
        nv = float(v.norm())
        if nv == 0:
            raise ValueError(f"no sample of X projects beyond lam = {lam} on the group's mean direction")
        new = v / nv
        moved = float((new - d).norm())
        d = new
        if moved < tol:
            break
    return kind.out(d)


def set_partitions(items: list[int], n_blocks: int) -> Iterator[list[list[int]]]:
    """Every partition of ``items`` into exactly ``n_blocks`` nonempty blocks."""
    if n_blocks == 1:
        yield [list(items)]
        return
    if len(items) == n_blocks:
        yield [[i] for i in items]
        return
    if n_blocks > len(items) or n_blocks < 1:
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest, n_blocks - 1):
        yield [[first]] + part
    for part in set_partitions(rest, n_blocks):
        for j in range(len(part)):
            yield part[:j] + [[first] + part[j]] + part[j + 1:]


@dataclass
class SplittingPrediction:
    """What :func:`predict_splitting` returns.

    Attributes
    ----------
    n_atoms : int
        The dictionary size K.
    blocks : list of list of int
        The predicted groups of leaves, one per atom (leaf node ids), sorted.
    D : torch.Tensor (n_atoms, n_features)
        The predicted atoms, :func:`group_atom` of each block's samples, in the order of
        ``blocks``.
    alone_loss : float
        The loss when every sample is coded by its own block's atom alone (the score that
        chose the partition).
    loss : float
        Exact :math:`F(D)` of the predicted dictionary (codes from
        :func:`companion.coding.encode`, which may use several atoms per sample); at most
        ``alone_loss``.
    n_candidates : int
        Number of partitions compared.
    """

    n_atoms: int
    blocks: list[list[int]]
    D: torch.Tensor
    alone_loss: float
    loss: float
    n_candidates: int


def predict_splitting(tree: ConceptTree, lam: float, n_atoms: int) -> SplittingPrediction:
    r"""Predict the best lone-atom (centroid) dictionary of ``n_atoms`` atoms for a concept tree (Chapter 3).

    With fewer atoms than leaves every atom has to code several leaves. The prediction takes
    T2a literally: each atom codes a group of leaves alone and sits at that group's weighted
    centroid (:func:`group_atom`). A sample coded by an atom :math:`d` alone costs

    .. math::
        \tfrac12\|x\|^2 - \tfrac12\big(d^\top x - \lambda\big)_+^2 ,

    and the prediction is the partition of the leaves into ``n_atoms`` groups with the lowest
    total cost, over all partitions (Stirling-number many: 203 in all for 6 leaves).
    Nothing about the tree is assumed: whether the best groups follow the tree is an
    outcome.

    Parameters
    ----------
    tree : ConceptTree
        The data and its ground truth.
    lam : float
        The penalty.
    n_atoms : int
        The dictionary size, ``1 <= n_atoms <= number of leaves``.
    """
    from .coding import nonneg_lasso_value

    lam = check_positive(lam, "lam")
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    leaves = tree.leaves
    if n_atoms > len(leaves):
        raise ValueError(f"n_atoms must be <= the {len(leaves)} leaves, got {n_atoms}")
    X = tree.X
    half_sq = 0.5 * (X * X).sum(1)
    atoms: dict[tuple[int, ...], torch.Tensor] = {}
    costs: dict[tuple[int, ...], float] = {}
    best = None
    count = 0
    for part in set_partitions(leaves, n_atoms):
        total = 0.0
        for block in part:
            key = tuple(sorted(block))
            if key not in costs:
                mask = torch.isin(tree.leaf, torch.tensor(key, device=tree.leaf.device))
                d = group_atom(X[mask], lam)
                atoms[key] = d
                gain = (X[mask] @ d - lam).clamp(min=0)
                costs[key] = float((half_sq[mask] - 0.5 * gain * gain).sum())
            total += costs[key]
        count += 1
        if best is None or total < best[0] - 1e-12 * abs(best[0]):
            best = (total, sorted(sorted(b) for b in part))
    total, blocks = best
    D = torch.stack([atoms[tuple(b)] for b in blocks])
    return SplittingPrediction(n_atoms=n_atoms, blocks=blocks, D=D,
                               alone_loss=total / X.shape[0],
                               loss=float(nonneg_lasso_value(X, D, lam)), n_candidates=count)
