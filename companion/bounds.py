"""The universal lower bound of the wide limit (THEORY §4, T4; derived in Chapter 6).

Unit-norm atoms give ``‖z D‖ ≤ ‖z‖₁``, so every dictionary's per-point cost is at least the
Huber function of the point's norm, with equality exactly when every active atom is parallel
to the point: one atom per datapoint.
"""

from __future__ import annotations

from typing import Any

import torch

from ._validation import as_tensor, check_positive


def huber(t: Any, lam: float) -> Any:
    r"""Huber function :math:`h_\lambda(t) = \tfrac12 t^2` for :math:`|t|\le\lambda`, else :math:`\lambda|t| - \tfrac12\lambda^2`.

    It is the Moreau envelope of :math:`\lambda|\cdot|`, i.e. the cost of coding a point of
    norm ``t`` with an atom parallel to it (THEORY T4). Works elementwise on tensors/arrays.
    """
    lam = check_positive(lam, "lam")
    tt, kind = as_tensor(t, "t") if not isinstance(t, (int, float)) else (torch.tensor(float(t), dtype=torch.float64), None)
    a = tt.abs()
    out = torch.where(a <= lam, 0.5 * a * a, lam * a - 0.5 * lam * lam)
    if kind is None:
        return float(out)
    return kind.out(out)


def huber_bound(X: Any, lam: float) -> float:
    r"""Lower bound :math:`\frac1N\sum_n h_\lambda(\|x_n\|)` on the joint loss of *any* unit-norm dictionary (T4).

    It holds for every number of atoms and is attained once the dictionary holds one atom
    along every distinct direction among points with :math:`\|x_n\|>\lambda`.
    """
    lam = check_positive(lam, "lam")
    X, _ = as_tensor(X, "X", ndim=2)
    return float(huber(X.norm(dim=1), lam).mean())
