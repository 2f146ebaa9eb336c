"""Input checking shared by every public function of :mod:`companion`.

Each public function accepts torch tensors or numpy arrays and returns results of the kind
it was given. The helpers here convert inputs to tensors once, validate them, and name the
offending parameter in every error, so that a wrong shape or a NaN fails loudly at the
boundary instead of deep inside a solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .runtime import perturb_data

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ArrayKind:
    """Remembers whether the caller passed numpy or torch, to answer in kind."""

    is_numpy: bool

    def out(self, t: torch.Tensor | None) -> Any:
        """Convert a result tensor back to the caller's array kind."""
        if t is None or not self.is_numpy:
            return t
        return t.detach().cpu().numpy()


def as_tensor(
    value: Any,
    name: str,
    *,
    ndim: int | None = None,
    like: torch.Tensor | None = None,
    finite: bool = True,
) -> tuple[torch.Tensor, ArrayKind]:
    """Validate ``value`` and return it as a floating tensor plus the caller's array kind.

    Parameters
    ----------
    value : numpy.ndarray or torch.Tensor
        The input; integer arrays are promoted to float64 (numpy) or the default dtype.
    name : str
        The parameter name used in error messages.
    ndim : int, optional
        Required number of dimensions.
    like : torch.Tensor, optional
        A tensor whose device and dtype ``value`` must share (no silent moves or casts).
    finite : bool
        Reject NaN and infinite entries.
    """
    if isinstance(value, torch.Tensor):
        kind = ArrayKind(is_numpy=False)
        t = value
    elif isinstance(value, np.ndarray):
        kind = ArrayKind(is_numpy=True)
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
        )
    if t.dtype not in _FLOAT_DTYPES:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        t = t.to(torch.float64 if kind.is_numpy else torch.get_default_dtype())
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the other inputs are on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the other inputs have {like.dtype}")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite entries")
    if name == "X":
        t = perturb_data(t)
    return t, kind


def _refuse_non_number(value: Any, name: str, what: str) -> None:
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def check_positive(value: Any, name: str) -> float:
    """Return ``value`` as a float, requiring a finite number > 0 (e.g. the penalty λ).

    Strings and bools are refused: ``"0.1"`` or ``True`` as a penalty is a caller's mistake,
    not a number to guess at.
    """
    _refuse_non_number(value, name, "a positive number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_nonnegative(value: Any, name: str) -> float:
    """Return ``value`` as a float, requiring a finite number ≥ 0 (strings and bools refused)."""
    _refuse_non_number(value, name, "a nonnegative number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a nonnegative number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, requiring an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_dictionary(D: torch.Tensor, name: str = "D", *, unit_norm: bool = True,
                     atol: float | None = None) -> None:
    """Require the rows of ``D`` (the atoms) to be nonzero and, if asked, of unit norm.

    The tolerance defaults to ``1e-4`` in float32 and ``1e-8`` in float64.
    """
    norms = D.norm(dim=1)
    zero = torch.nonzero(norms == 0).flatten()
    if zero.numel():
        raise ValueError(f"{name} has zero-norm atoms (rows) at indices {zero[:10].tolist()}")
    if unit_norm:
        tol = atol if atol is not None else (1e-4 if D.dtype == torch.float32 else 1e-8)
        dev = (norms - 1).abs()
        if bool((dev > tol).any()):
            k = int(dev.argmax())
            raise ValueError(
                f"{name} must have unit-norm rows (atoms); row {k} has norm {float(norms[k]):.6g}"
                " (normalise with D / D.norm(dim=1, keepdim=True))"
            )


def check_columns(t: torch.Tensor, name: str, n: int, other: str) -> None:
    """Require ``t.shape[1] == n`` (the number of features of ``other``)."""
    if t.shape[1] != n:
        raise ValueError(
            f"{name} has {t.shape[1]} columns but {other} has {n}; both must count the same features"
        )


def check_nonnegative_entries(t: torch.Tensor, name: str) -> None:
    """Require every entry of ``t`` (e.g. a code matrix) to be ≥ 0."""
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be nonnegative; its smallest entry is {float(t.min()):.3g}")


def check_codes(Z: torch.Tensor, name: str, shape: tuple[int, int], columns: str = "n_atoms") -> None:
    """Require a code matrix of shape ``(n_samples, columns) = shape`` with no negative entry."""
    if tuple(Z.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape (n_samples, {columns}) = {tuple(shape)}, got {tuple(Z.shape)}"
        )
    check_nonnegative_entries(Z, name)
