r"""Dense antipodal pairs (THEORY §7; derived in Chapter 5).

A nonnegative atom codes one sign of a direction only, so a dense signed scalar :math:`s`
along :math:`v` is coded best by a *pair* of atoms near :math:`\pm v`. This module holds

- the per-point costs of the three ways of handling such a direction
  (:func:`dense_direction_costs`);
- the prediction of T2 for the pair: each member is the activation-weighted centroid of its
  partial residuals, which fixes how far it bends from :math:`\pm v` and how often it fires
  (:func:`pair_centroid_prediction`);
- a detector that works on any SAE: the antipodality score of Sun et al. (2025),
  :math:`\max_{j\ne i}\cos(W_{enc,i}, W_{enc,j})\cos(W_{dec,i}, W_{dec,j})`, firing rates from
  codes, and the dense pairs found (:func:`antipodality`, :func:`firing_rates`,
  :func:`find_dense_pairs`).

Shapes follow SAELens: ``W_dec`` (d_sae, d_in) has one latent per row, ``W_enc``
(d_in, d_sae) one latent per column; codes ``Z`` are (n_samples, d_sae).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import as_tensor, check_columns, check_dictionary, check_nonnegative, check_positive
from .coding import encode

__all__ = [
    "Antipodality",
    "DenseCosts",
    "DensePair",
    "DensePairReport",
    "PairPrediction",
    "antipodality",
    "centroid_step",
    "dense_direction_costs",
    "find_dense_pairs",
    "firing_rates",
    "pair_centroid_prediction",
]


# ----------------------------------------------------------------------------------------
# costs of coding a dense signed direction
# ----------------------------------------------------------------------------------------

@dataclass
class DenseCosts:
    r"""Mean per-point cost of three ways to handle a dense signed scalar :math:`s` (Chapter 5, eq. ``dense-costs``).

    Attributes
    ----------
    ignore : float
        :math:`\tfrac12\,\mathbb E\, s^2` (no atom along :math:`v`).
    pair : float
        :math:`\mathbb E\, h_\lambda(|s|)` (atoms :math:`v` and :math:`-v`; Huber :math:`h_\lambda`).
    shifted : float
        :math:`\min_c \mathbb E\, g_\lambda(s - c)` (one atom :math:`v` after moving the origin to
        :math:`c\,v` with a decoder bias), :math:`g_\lambda(t) = \tfrac12 t^2` for
        :math:`t \le \lambda`, :math:`\lambda t - \tfrac12\lambda^2` for :math:`t > \lambda`.
    shift : float
        The minimising :math:`c`, the root of :math:`\mathbb E\min(s - c, \lambda) = 0`.
    """

    ignore: float
    pair: float
    shifted: float
    shift: float


def _g(t: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.where(t <= lam, 0.5 * t * t, lam * t - 0.5 * lam * lam)


def dense_direction_costs(s: Any, lam: float) -> DenseCosts:
    r"""Empirical mean cost of ignoring a dense scalar, coding it with an antipodal pair, or with one shifted atom (Chapter 5).

    For samples :math:`s_n` of the scalar (its coefficient along :math:`v`), returns
    :math:`\tfrac12\overline{s^2}`, :math:`\overline{h_\lambda(|s|)}` and
    :math:`\min_c \overline{g_\lambda(s - c)}` (see :class:`DenseCosts`). The last is convex in
    :math:`c` with derivative :math:`-\overline{\min(s-c,\lambda)}`, which increases with
    :math:`c`; its root is found by bisection. Chapter 5 proves ``pair <= shifted`` and
    ``pair <= ignore`` for every symmetric distribution of :math:`s`.
    """
    lam = check_positive(lam, "lam")
    st, _ = as_tensor(s, "s", ndim=1)
    if st.numel() == 0:
        raise ValueError("s must hold at least one sample")
    st = st.double()
    a = st.abs()
    ignore = float(0.5 * (st * st).mean())
    pair = float(torch.where(a <= lam, 0.5 * a * a, lam * a - 0.5 * lam * lam).mean())
    # E min(s - c, λ) decreases in c, from λ > 0 at c = min(s) - λ to <= 0 at c = max(s).
    lo, hi = float(st.min()) - 2 * lam, float(st.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.clamp(st - mid, max=lam).mean()) > 0:
            lo = mid
        else:
            hi = mid
    c = 0.5 * (lo + hi)
    shifted = float(_g(st - c, lam).mean())
    return DenseCosts(ignore=ignore, pair=pair, shifted=shifted, shift=c)


# ----------------------------------------------------------------------------------------
# T2's prediction for the pair
# ----------------------------------------------------------------------------------------

@dataclass
class PairPrediction:
    r"""First-order T2 prediction for the atoms coding a dense direction (Chapter 5, eq. ``pair-centroid``).

    Attributes
    ----------
    d_plus, d_minus : array (n_features,)
        Predicted unit atoms :math:`d_\pm \propto \sum_n (\pm s_n - \lambda)_+\, e_n` with
        zeroth-order partial residuals :math:`e_n = s_n v + r^\perp_n`.
    cosine : float
        :math:`d_+^\top d_-` (:math:`-1` for an exactly antipodal pair).
    bend_plus, bend_minus : float
        Angles (degrees) between :math:`d_\pm` and :math:`\pm v`.
    rate_plus, rate_minus : float
        First-order firing rates: the share of samples with :math:`d_\pm^\top e_n > \lambda`.
    rate_plus_zeroth, rate_minus_zeroth : float
        Zeroth-order firing rates :math:`P(s > \lambda)` and :math:`P(-s > \lambda)` (exact when
        the pair is :math:`\pm v` and orthogonal to every other atom).
    """

    d_plus: Any
    d_minus: Any
    cosine: float
    bend_plus: float
    bend_minus: float
    rate_plus: float
    rate_minus: float
    rate_plus_zeroth: float
    rate_minus_zeroth: float


def _angle_deg(u: torch.Tensor, w: torch.Tensor) -> float:
    c = float((u @ w) / (u.norm() * w.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def pair_centroid_prediction(s: Any, v: Any, other_residual: Any, lam: float) -> PairPrediction:
    r"""Predict the dense pair from T2's centroid form, to first order (Chapter 5, eq. ``pair-centroid``).

    Zeroth order: the pair is :math:`\pm v`, orthogonal to every other atom, so the coding
    problem separates; member :math:`\pm` fires with code :math:`(\pm s_n - \lambda)_+` and the
    other atoms leave the residual :math:`r^\perp_n` (orthogonal to :math:`v`). One step of T2's
    centroid map then gives

    .. math::
        d_\pm \propto \sum_n (\pm s_n - \lambda)_+ \,\big(s_n v + r^\perp_n\big),

    so each member tilts towards the :math:`r^\perp` it sees, weighted by its own
    activations; the pair stays antipodal only when both weighted means of :math:`r^\perp`
    vanish.

    Parameters
    ----------
    s : array (n_samples,)
        The dense scalar of each sample.
    v : array (n_features,)
        The dense direction (normalised here).
    other_residual : array (n_samples, n_features)
        :math:`r^\perp_n`: the residual the other atoms leave on the sparse part of each
        sample, e.g. ``sparse_codes.clamp(max=lam) @ sparse_features`` for orthonormal
        features coded by themselves. Its component along :math:`v` is removed.
    lam : float
        The penalty :math:`\lambda > 0`.
    """
    lam = check_positive(lam, "lam")
    st, kind = as_tensor(s, "s", ndim=1)
    vt, _ = as_tensor(v, "v", ndim=1, like=st)
    Rt, _ = as_tensor(other_residual, "other_residual", ndim=2, like=st)
    if Rt.shape != (st.shape[0], vt.shape[0]):
        raise ValueError(
            f"other_residual must have shape (n_samples, n_features) = {(st.shape[0], vt.shape[0])}, "
            f"got {tuple(Rt.shape)}"
        )
    nv = float(vt.norm())
    if nv == 0:
        raise ValueError("v must be a nonzero direction")
    with torch.no_grad():
        vt = vt / nv
        Rp = Rt - (Rt @ vt)[:, None] * vt
        E = st[:, None] * vt + Rp
        out = {}
        for sign, name in ((1.0, "plus"), (-1.0, "minus")):
            w = torch.clamp(sign * st - lam, min=0)
            if not bool((w > 0).any()):
                raise ValueError(f"no sample has {'+' if sign > 0 else '-'}s > lam={lam}; the pair member would be dead")
            c = w @ E
            d = c / c.norm()
            out[name] = d
            out[f"rate_{name}"] = float(((E @ d) > lam).double().mean())
            out[f"zeroth_{name}"] = float((sign * st > lam).double().mean())
            out[f"bend_{name}"] = _angle_deg(d, sign * vt)
        return PairPrediction(
            d_plus=kind.out(out["plus"]), d_minus=kind.out(out["minus"]),
            cosine=float(out["plus"] @ out["minus"]),
            bend_plus=out["bend_plus"], bend_minus=out["bend_minus"],
            rate_plus=out["rate_plus"], rate_minus=out["rate_minus"],
            rate_plus_zeroth=out["zeroth_plus"], rate_minus_zeroth=out["zeroth_minus"],
        )


def centroid_step(X: Any, D: Any, lam: float) -> Any:
    r"""One step of T2's centroid map for every atom at once, from the dictionary ``D`` (Chapter 5).

    With exact codes :math:`Z` for ``D`` (:func:`companion.encode`) and partial residuals
    :math:`e^{(k)}_n = r_n + z_{nk} d_k`, returns the dictionary of rows

    .. math::
        d_k' = \frac{\sum_n z_{nk}\, e^{(k)}_n}{\big\|\sum_n z_{nk}\, e^{(k)}_n\big\|},

    (unused atoms are kept). Started from a zeroth-order dictionary (the ground-truth
    directions of a model), it is the first-order prediction of how every atom of the
    optimum tilts; at a stationary dictionary it is the identity (T2).
    """
    lam = check_positive(lam, "lam")
    Xt, kind = as_tensor(X, "X", ndim=2)
    Dt, _ = as_tensor(D, "D", ndim=2, like=Xt)
    check_columns(Dt, "D", Xt.shape[1], "X")
    check_dictionary(Dt, "D")
    with torch.no_grad():
        Z = encode(Xt, Dt, lam)
        R = Xt - Z @ Dt
        C = Z.T @ R + (Z * Z).sum(0)[:, None] * Dt
        norms = C.norm(dim=1, keepdim=True)
        out = torch.where(norms > 0, C / torch.where(norms > 0, norms, torch.ones_like(norms)), Dt)
    return kind.out(out)


# ----------------------------------------------------------------------------------------
# detector for any SAE
# ----------------------------------------------------------------------------------------

@dataclass
class Antipodality:
    r"""Antipodality scores of Sun et al. (2025) for every latent (Chapter 5).

    Attributes
    ----------
    score : array (n_latents,)
        :math:`\max_{j\ne i}\cos(W_{enc,i}, W_{enc,j})\,\cos(W_{dec,i}, W_{dec,j})`.
    partner : array (n_latents,)
        The maximising :math:`j` (integer dtype).
    decoder_cosine : array (n_latents,)
        :math:`\cos(W_{dec,i}, W_{dec,\text{partner}})`.
    encoder_cosine : array (n_latents,)
        :math:`\cos(W_{enc,i}, W_{enc,\text{partner}})` (the decoder cosine again when no encoder
        was given).
    """

    score: Any
    partner: Any
    decoder_cosine: Any
    encoder_cosine: Any


def _cosines(W: torch.Tensor, name: str) -> torch.Tensor:
    norms = W.norm(dim=1)
    zero = torch.nonzero(norms == 0).flatten()
    if zero.numel():
        raise ValueError(f"{name} has zero latents (no direction) at indices {zero[:10].tolist()}")
    U = W / norms[:, None]
    return U @ U.T


def antipodality(W_dec: Any, W_enc: Any = None) -> Antipodality:
    r"""Antipodality score of every latent: :math:`\max_{j\ne i}\cos(W_{enc,i},W_{enc,j})\cos(W_{dec,i},W_{dec,j})` (Chapter 5).

    The score of Sun et al. (2025): close to 1 when latent ``i`` has a partner whose encoder
    and decoder directions are both (anti)parallel to its own; an antipodal pair has both
    cosines near :math:`-1`. ``W_dec`` is (d_sae, d_in) and ``W_enc`` (d_in, d_sae) (SAELens
    layout). For a dictionary without an encoder (``W_enc=None``) the decoder stands in for
    both, so the score is :math:`\max_j \cos(d_i,d_j)^2`; use ``decoder_cosine`` to tell
    antipodal from parallel partners.
    """
    Wd, kind = as_tensor(W_dec, "W_dec", ndim=2)
    if Wd.shape[0] < 2:
        raise ValueError(f"W_dec must hold at least two latents (rows), got shape {tuple(Wd.shape)}")
    with torch.no_grad():
        Cd = _cosines(Wd, "W_dec")
        if W_enc is None:
            Ce = Cd
        else:
            We, _ = as_tensor(W_enc, "W_enc", ndim=2, like=Wd)
            if tuple(We.shape) != (Wd.shape[1], Wd.shape[0]):
                raise ValueError(
                    f"W_enc must have shape (d_in, d_sae) = {(Wd.shape[1], Wd.shape[0])} for W_dec of shape "
                    f"{tuple(Wd.shape)}, got {tuple(We.shape)}"
                )
            Ce = _cosines(We.T, "W_enc")
        P = Ce * Cd
        P.fill_diagonal_(-math.inf)
        score, partner = P.max(1)
        ar = torch.arange(Wd.shape[0], device=Wd.device)
        return Antipodality(score=kind.out(score), partner=kind.out(partner),
                            decoder_cosine=kind.out(Cd[ar, partner]),
                            encoder_cosine=kind.out(Ce[ar, partner]))


def firing_rates(Z: Any, threshold: float = 0.0) -> Any:
    r"""Share of samples on which each latent fires, :math:`\frac1N\#\{n : Z_{nk} > \text{threshold}\}` (Chapter 5)."""
    Zt, kind = as_tensor(Z, "Z", ndim=2)
    threshold = check_nonnegative(threshold, "threshold")
    if Zt.shape[0] == 0:
        raise ValueError("Z must hold at least one sample (row)")
    with torch.no_grad():
        return kind.out((Zt > threshold).to(Zt.dtype).mean(0))


@dataclass
class DensePair:
    """One detected dense pair: latents ``first < second``, mutual antipodality partners.

    Attributes
    ----------
    first, second : int
        Latent indices.
    decoder_cosine, encoder_cosine : float
        Cosines between the two decoder rows and between the two encoder columns.
    score : float
        Their antipodality score (the product of the two cosines).
    rate_first, rate_second : float
        Firing rates of the two latents.
    co_firing : float
        Share of samples on which both fire (0 for a clean pair: the members split the sign).
    """

    first: int
    second: int
    decoder_cosine: float
    encoder_cosine: float
    score: float
    rate_first: float
    rate_second: float
    co_firing: float


@dataclass
class DensePairReport:
    """What :func:`find_dense_pairs` returns.

    Attributes
    ----------
    antipodality : Antipodality
        Scores of every latent.
    firing_rate : array (n_latents,)
        Firing rate of every latent.
    pairs : list of DensePair
        The detected pairs, densest first.
    """

    antipodality: Antipodality
    firing_rate: Any
    pairs: list[DensePair] = field(default_factory=list)


def find_dense_pairs(Z: Any, W_dec: Any, W_enc: Any = None, *, min_rate: float = 0.3,
                     max_cosine: float = -0.5, threshold: float = 0.0) -> DensePairReport:
    r"""Detect dense antipodal pairs in any SAE or dictionary (Chapter 5).

    A pair :math:`(i, j)` is reported when :math:`i` and :math:`j` are each other's
    antipodality partner (:func:`antipodality`), their decoder rows have cosine at most
    ``max_cosine`` (pointing in opposite directions), and at least one of them fires on a
    share ``min_rate`` of the samples or more.

    Parameters
    ----------
    Z : array (n_samples, n_latents)
        Codes (latent activations) on a dataset, e.g. ``sae.encode(X)``.
    W_dec : array (n_latents, d_in)
        Decoder rows (or a dictionary's atoms).
    W_enc : array (d_in, n_latents), optional
        Encoder columns; omit for a dictionary without an encoder.
    min_rate : float
        Firing rate in [0, 1] that makes a latent dense (Sun et al. discuss latents above 0.3).
    max_cosine : float
        Largest decoder cosine, in [-1, 0], that counts as opposite.
    threshold : float
        A latent fires when its code exceeds this.
    """
    Zt, _ = as_tensor(Z, "Z", ndim=2)
    Wd, _ = as_tensor(W_dec, "W_dec", ndim=2)
    if Zt.shape[1] != Wd.shape[0]:
        raise ValueError(f"Z has {Zt.shape[1]} latents (columns) but W_dec has {Wd.shape[0]} (rows)")
    min_rate = check_nonnegative(min_rate, "min_rate")
    if min_rate > 1:
        raise ValueError(f"min_rate must be in [0, 1], got {min_rate!r}")
    try:
        mc = float(max_cosine)
    except (TypeError, ValueError):
        raise TypeError(f"max_cosine must be a number in [-1, 0], got {max_cosine!r}") from None
    if not -1 <= mc <= 0:
        raise ValueError(f"max_cosine must be in [-1, 0], got {max_cosine!r}")
    anti = antipodality(W_dec, W_enc)
    with torch.no_grad():
        rates_t = (Zt > check_nonnegative(threshold, "threshold")).to(Zt.dtype).mean(0)
        fires = Zt > threshold
        partner = torch.as_tensor(anti.partner).tolist()
        dec, enc, score = (torch.as_tensor(t).cpu() for t in
                           (anti.decoder_cosine, anti.encoder_cosine, anti.score))
        pairs = []
        for i, j in enumerate(partner):
            if i < j and partner[j] == i and float(dec[i]) <= mc and \
                    max(float(rates_t[i]), float(rates_t[j])) >= min_rate:
                pairs.append(DensePair(
                    first=i, second=j, decoder_cosine=float(dec[i]), encoder_cosine=float(enc[i]),
                    score=float(score[i]), rate_first=float(rates_t[i]), rate_second=float(rates_t[j]),
                    co_firing=float((fires[:, i] & fires[:, j]).to(Zt.dtype).mean())))
        pairs.sort(key=lambda p: -(p.rate_first + p.rate_second))
    kind_numpy = not isinstance(Z, torch.Tensor)
    rates = rates_t.detach().cpu().numpy() if kind_numpy else rates_t
    return DensePairReport(antipodality=anti, firing_rate=rates, pairs=pairs)
