"""The two objectives of the book: the vanilla SAE loss and the joint (dictionary, codes) loss.

Row convention throughout: samples are rows of ``X`` (n_samples, n_features), atoms are rows
of ``D`` (n_atoms, n_features), codes are rows of ``Z`` (n_samples, n_atoms), and the
reconstruction is ``Z @ D``. Chapter 1 derives both losses and shows that rescaling makes
the norm-weighted SAE penalty equivalent to unit-norm decoder rows.
"""

from __future__ import annotations

from typing import Any

import torch

from ._validation import as_tensor, check_codes, check_columns, check_positive


def joint_loss(X: Any, D: Any, Z: Any, lam: float) -> float:
    r"""Joint objective :math:`L(D,Z)=\frac1N\sum_n \tfrac12\|x_n - z_n D\|^2 + \lambda\,\mathbf 1^\top z_n`.

    This is Chapter 1, eq. ``joint-problem``. ``D`` is used as given (the unit-norm
    constraint is the caller's business, so that the loss of any decoder can be evaluated);
    ``Z`` must be nonnegative.

    Returns
    -------
    float
        The loss averaged over samples.
    """
    lam = check_positive(lam, "lam")
    X, _ = as_tensor(X, "X", ndim=2)
    D, _ = as_tensor(D, "D", ndim=2, like=X)
    Z, _ = as_tensor(Z, "Z", ndim=2, like=X)
    check_columns(D, "D", X.shape[1], "X")
    check_codes(Z, "Z", (X.shape[0], D.shape[0]))
    R = X - Z @ D
    return float((0.5 * (R * R).sum(1) + lam * Z.sum(1)).mean())


def sae_codes(X: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
              b_dec: torch.Tensor) -> torch.Tensor:
    """The vanilla SAE encoder :math:`z = \\mathrm{ReLU}((x - b_{dec}) W_{enc} + b_{enc})` (no checks)."""
    return torch.relu((X - b_dec) @ W_enc + b_enc)


def sae_loss(X: Any, W_enc: Any, b_enc: Any, W_dec: Any, b_dec: Any, lam: float) -> float:
    r"""Vanilla SAE loss with the L1 penalty weighted by decoder-row norms (Chapter 1, eq. ``sae-loss``).

    .. math::
        z = \mathrm{ReLU}\big((x-b_{dec})W_{enc} + b_{enc}\big),\quad
        \hat x = z W_{dec} + b_{dec},\quad
        \ell = \tfrac12\|x-\hat x\|^2 + \lambda \sum_k \|W_{dec}[k]\|\, z_k,

    averaged over the rows of ``X``. Shapes follow SAELens: ``W_enc`` (d_in, d_sae),
    ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,). With unit-norm decoder
    rows this equals :func:`joint_loss` of ``X - b_dec`` at the dictionary ``W_dec`` and the
    encoder's codes.
    """
    lam = check_positive(lam, "lam")
    X, _ = as_tensor(X, "X", ndim=2)
    W_enc, _ = as_tensor(W_enc, "W_enc", ndim=2, like=X)
    b_enc, _ = as_tensor(b_enc, "b_enc", ndim=1, like=X)
    W_dec, _ = as_tensor(W_dec, "W_dec", ndim=2, like=X)
    b_dec, _ = as_tensor(b_dec, "b_dec", ndim=1, like=X)
    d_in, d_sae = X.shape[1], W_dec.shape[0]
    shapes = {"W_enc": (W_enc, (d_in, d_sae)), "b_enc": (b_enc, (d_sae,)),
              "W_dec": (W_dec, (d_sae, d_in)), "b_dec": (b_dec, (d_in,))}
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} for d_in={d_in}, d_sae={d_sae}; got {tuple(t.shape)}")
    Z = sae_codes(X, W_enc, b_enc, b_dec)
    R = X - (Z @ W_dec + b_dec)
    return float((0.5 * (R * R).sum(1) + lam * (Z * W_dec.norm(dim=1)).sum(1)).mean())
