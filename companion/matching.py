"""Matching the atoms of two dictionaries by cosine (used in Chapter 3).

Two dictionaries that describe the same data rarely list their atoms in the same order, and
a dictionary of K atoms and one of K' atoms can only be compared atom by atom once each atom
of one is paired with at most one atom of the other. :func:`match_atoms` finds the pairing
that maximises the total cosine (the Hungarian assignment), which is how Chapter 3 follows an
atom from a small dictionary to the atoms it splits into in a larger one, and how it compares
learned atoms with ground-truth directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ._validation import as_tensor, check_columns

__all__ = ["AtomMatching", "cosine_matrix", "match_atoms"]


@dataclass
class AtomMatching:
    """The result of :func:`match_atoms`.

    Attributes
    ----------
    rows_a, rows_b : numpy.ndarray of int, shape (n_pairs,)
        Paired atoms: atom ``rows_a[j]`` of ``D_a`` goes with atom ``rows_b[j]`` of ``D_b``;
        sorted by ``rows_a``. ``n_pairs = min(n_atoms_a, n_atoms_b)``.
    cosines : numpy.ndarray of float, shape (n_pairs,)
        Cosine of each pair (the absolute cosine when matching with ``signed=False``).
    unmatched_a, unmatched_b : numpy.ndarray of int
        Atoms left without a partner (only the larger dictionary has any).
    nearest_b : numpy.ndarray of int, shape (n_atoms_b,)
        For every atom of ``D_b``, the atom of ``D_a`` with the largest cosine to it (not an
        assignment: several atoms of ``D_b`` may share a nearest atom). When ``D_b`` is the
        larger dictionary this is the parent of each atom in a splitting tree.
    cosine_matrix : numpy.ndarray of float, shape (n_atoms_a, n_atoms_b)
        All cosines between atoms of ``D_a`` (rows) and ``D_b`` (columns).
    """

    rows_a: np.ndarray
    rows_b: np.ndarray
    cosines: np.ndarray
    unmatched_a: np.ndarray
    unmatched_b: np.ndarray
    nearest_b: np.ndarray
    cosine_matrix: np.ndarray

    @property
    def mean_cosine(self) -> float:
        """Mean cosine over the matched pairs."""
        return float(self.cosines.mean()) if self.cosines.size else float("nan")

    @property
    def min_cosine(self) -> float:
        """Smallest cosine over the matched pairs (the worst-recovered atom)."""
        return float(self.cosines.min()) if self.cosines.size else float("nan")

    def partner_of_a(self) -> dict[int, int]:
        """``{atom of D_a: its partner in D_b}`` for the matched atoms."""
        return {int(i): int(j) for i, j in zip(self.rows_a, self.rows_b)}

    def partner_of_b(self) -> dict[int, int]:
        """``{atom of D_b: its partner in D_a}`` for the matched atoms."""
        return {int(j): int(i) for i, j in zip(self.rows_a, self.rows_b)}


def cosine_matrix(D_a: Any, D_b: Any) -> Any:
    r"""Cosines :math:`C_{ij} = \frac{\langle a_i, b_j\rangle}{\|a_i\|\|b_j\|}` between the rows of ``D_a`` and ``D_b``.

    Rows need not have unit norm (they are normalised here); zero rows are refused. Returns an
    array of the kind of ``D_a``, shape ``(n_atoms_a, n_atoms_b)``.
    """
    A, kind = as_tensor(D_a, "D_a", ndim=2)
    B, _ = as_tensor(D_b, "D_b", ndim=2)
    check_columns(B, "D_b", A.shape[1], "D_a")
    B = B.to(device=A.device, dtype=A.dtype)
    for name, t in (("D_a", A), ("D_b", B)):
        zero = torch.nonzero(t.norm(dim=1) == 0).flatten()
        if zero.numel():
            raise ValueError(f"{name} has zero-norm atoms (rows) at indices {zero[:10].tolist()}")
    C = (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T
    return kind.out(C)


def match_atoms(D_a: Any, D_b: Any, *, signed: bool = True) -> AtomMatching:
    r"""Pair the atoms of two dictionaries so that the total cosine is as large as possible.

    Solves the assignment problem

    .. math::
        \max_{\pi}\ \sum_{i} C_{i\,\pi(i)},\qquad
        C_{ij} = \cos\angle(a_i, b_j),

    over one-to-one maps :math:`\pi` between the atoms (rows) of ``D_a`` and ``D_b``
    (``min(K_a, K_b)`` pairs when the sizes differ), with the Hungarian algorithm of
    :func:`scipy.optimize.linear_sum_assignment`. Chapter 3 uses it to follow atoms across
    dictionary sizes (the splitting tree) and to name learned atoms after ground-truth
    directions.

    Parameters
    ----------
    D_a : array (n_atoms_a, n_features)
        First dictionary, atoms as rows (any nonzero norm; cosines normalise).
    D_b : array (n_atoms_b, n_features)
        Second dictionary, same number of features; it may live on another device or have
        another dtype (the comparison is done in float64 on the CPU).
    signed : bool
        Maximise the cosine itself (default: right for nonnegative codes, where an atom and
        its negative mean different things). ``False`` maximises ``|cos|``, for dictionaries
        whose atoms are defined up to sign.

    Returns
    -------
    AtomMatching
        Pairs, their cosines, unmatched atoms, and for each atom of ``D_b`` its nearest atom
        of ``D_a``.

    Examples
    --------
    >>> import numpy as np
    >>> D = np.eye(3)
    >>> m = match_atoms(D, D[[2, 0, 1]])
    >>> m.rows_b.tolist(), m.cosines.tolist()
    ([1, 2, 0], [1.0, 1.0, 1.0])
    """
    A, _ = as_tensor(D_a, "D_a", ndim=2)
    B, _ = as_tensor(D_b, "D_b", ndim=2)
    A = A.detach().to("cpu", torch.float64)
    B = B.detach().to("cpu", torch.float64)
    if A.shape[0] == 0 or B.shape[0] == 0:
        raise ValueError(f"both dictionaries need at least one atom; got {A.shape[0]} and {B.shape[0]}")
    C = cosine_matrix(A, B).numpy()
    score = C if signed else np.abs(C)
    ra, rb = linear_sum_assignment(score, maximize=True)
    order = np.argsort(ra)
    ra, rb = ra[order], rb[order]
    return AtomMatching(
        rows_a=ra.astype(np.int64),
        rows_b=rb.astype(np.int64),
        cosines=score[ra, rb],
        unmatched_a=np.setdiff1d(np.arange(A.shape[0]), ra).astype(np.int64),
        unmatched_b=np.setdiff1d(np.arange(B.shape[0]), rb).astype(np.int64),
        nearest_b=score.argmax(axis=0).astype(np.int64),
        cosine_matrix=C,
    )
