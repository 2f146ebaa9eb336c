r"""Feature absorption, measured on any dictionary and codes with a known concept direction (Chapter 3).

A *concept* is a unit direction :math:`v` with ground-truth presence labels; its *main
latents* are the latents meant to represent it (in an SAE benchmark, the ones a sparse probe
selects; in Chapter 3, the atom matched to the parent direction). Absorption is the main
latents staying silent on a sample where the concept is present while another latent, one
that points partly along :math:`v`, carries the concept's share of the reconstruction. Chapter
3 shows that this is what an *optimal* dictionary does on hierarchical data, and predicts how
often.

The two scores follow SAEBench's absorption evaluation (Chanin et al. 2024; Karvonen et al.
2025), stated here for a dictionary with atoms :math:`d_k` (rows of ``D``), codes
:math:`z_{nk}` and inputs :math:`x_n` (already centred by the SAE's decoder bias, if it has
one). With :math:`\cos_k = \cos\angle(d_k, v)`, latent :math:`k` contributes
:math:`\pi_{nk} = z_{nk}\,\|d_k\|\cos_k = z_{nk}\, d_k^\top v` to the projection of the
reconstruction on :math:`v`, and the input's own projection is :math:`P_n = x_n^\top v`.

Full absorption of sample :math:`n` (one absorbing latent)
    every main latent is silent (:math:`z_{nk} \le \epsilon`); the top latent by
    :math:`\pi_{nk}` has :math:`\cos_k \ge \tau_{\text{full}}` (default 0.025);
    :math:`P_n > 0`; and that latent carries :math:`\pi_{nk} \ge \rho P_n` (default
    :math:`\rho = 0.4`).

Absorption fraction of sample :math:`n` (partial absorption, up to ``max_absorbers`` latents)
    with :math:`M_n = \sum_{k\,\text{main}} \pi_{nk}` and :math:`A_n` the sum of the
    ``max_absorbers`` largest positive :math:`\pi_{nk}` over non-main latents with
    :math:`\cos_k \ge \tau_{\text{frac}}` (default 0.1): the fraction is 0 if
    :math:`M_n \ge P_n` or :math:`A_n < \rho P_n`; else 1 if :math:`M_n \le 0`; else
    :math:`\min(A_n, P_n - M_n) / (\min(A_n, P_n - M_n) + M_n)`.

Both are averaged over the samples where the concept is present. The simpler rate that
Chapter 3 predicts in closed form, :math:`P(\text{main latents silent} \mid \text{concept
present})`, is reported alongside.

:func:`absorption` takes the concept direction and the main latents as given (Chapter 3
knows them). :func:`saebench_absorption` runs SAEBench's whole pipeline on any codes and any
binary concept labels: the ground-truth probe with its F1 gate (:func:`concept_probe`), the
main latents by k-sparse probing (:func:`k_sparse_probing`), then the same two scores on the
held-out samples where the probe fires (Chapter 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ._validation import (as_tensor, check_codes, check_columns, check_nonnegative, check_positive,
                          check_positive_int)

__all__ = ["AbsorptionReport", "ConceptProbe", "KSparseProbing", "SAEBenchAbsorption", "absorption",
           "concept_probe", "k_sparse_probing", "saebench_absorption"]


@dataclass
class AbsorptionReport:
    """What :func:`absorption` returns.

    Attributes
    ----------
    full_absorption_rate : float
        Fraction of concept-present samples that are fully absorbed (SAEBench's
        ``mean_full_absorption_score``).
    mean_absorption_fraction : float
        Mean absorption fraction over concept-present samples (SAEBench's
        ``mean_absorption_fraction_score``).
    main_silent_rate : float
        :math:`P(\\text{every main latent silent} \\mid \\text{concept present})`, the rate
        Chapter 3 predicts.
    n_present : int
        Number of samples where the concept is present.
    full : array of bool (n_samples,)
        Per-sample full absorption (False where the concept is absent).
    fraction : array of float (n_samples,)
        Per-sample absorption fraction (0 where the concept is absent).
    main_silent : array of bool (n_samples,)
        Per-sample: every main latent silent (computed for every sample).
    cosines : array of float (n_atoms,)
        :math:`\\cos\\angle(d_k, v)` for every latent.
    absorber : array of int (n_samples,)
        The top latent by projection on the concept for each sample (-1 where no latent
        projects positively).
    """

    full_absorption_rate: float
    mean_absorption_fraction: float
    main_silent_rate: float
    n_present: int
    full: Any
    fraction: Any
    main_silent: Any
    cosines: Any
    absorber: Any


def _main_ids(main: int | Sequence[int], n_atoms: int) -> list[int]:
    ids = [main] if isinstance(main, int) or (hasattr(main, "ndim") and getattr(main, "ndim") == 0) else list(main)
    if not ids:
        raise ValueError("main must name at least one latent")
    out = []
    for k in ids:
        if isinstance(k, bool) or int(k) != k:
            raise TypeError(f"main must hold integer latent indices, got {k!r}")
        if not 0 <= int(k) < n_atoms:
            raise ValueError(f"main latent index {int(k)} is out of range for {n_atoms} latents")
        out.append(int(k))
    return out


def _score(P, proj, cos, is_main, main_silent, full_cos_threshold, fraction_cos_threshold,
           projection_threshold, max_absorbers):
    """Per-sample full absorption, absorption fraction and top latent (module docstring).

    ``P`` (n,) input projections on the concept, ``proj`` (n, k) latent projections
    :math:`\\pi_{nk}`, ``cos`` (k,) latent cosines, ``is_main`` (k,) mask, ``main_silent`` (n,).
    """
    k = proj.shape[1]
    top_val, top_idx = proj.max(1)
    absorber = torch.where(top_val > 0, top_idx, torch.full_like(top_idx, -1))
    safe_P = torch.where(P > 0, P, torch.ones_like(P))
    full = (main_silent & (cos[top_idx] >= full_cos_threshold) & (P > 0)
            & (top_val >= projection_threshold * safe_P) & (top_val > 0))
    M = proj[:, is_main].sum(1)
    cand = (~is_main) & (cos >= fraction_cos_threshold)
    cproj = torch.where(cand.unsqueeze(0) & (proj > 0), proj, torch.zeros_like(proj))
    A = cproj.topk(min(max_absorbers, k), dim=1).values.sum(1)
    absorbed = torch.minimum(A, P - M)
    frac = torch.where(M <= 0, torch.ones_like(P),
                       absorbed / torch.where(absorbed + M > 0, absorbed + M, torch.ones_like(M)))
    zero_case = (M >= P) | (A < projection_threshold * P) | (P <= 0)
    frac = torch.where(zero_case, torch.zeros_like(frac), frac.clamp(0, 1))
    return full, frac, absorber


def absorption(
    X: Any,
    D: Any,
    Z: Any,
    concept: Any,
    present: Any,
    main: int | Sequence[int],
    *,
    full_cos_threshold: float = 0.025,
    fraction_cos_threshold: float = 0.1,
    projection_threshold: float = 0.4,
    max_absorbers: int = 3,
    active_eps: float = 1e-8,
) -> AbsorptionReport:
    r"""Full absorption, absorption fraction and main-latent silence of a concept (Chapter 3).

    See the module docstring for the definitions; the thresholds are the parameters below,
    with SAEBench's defaults.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Inputs as the dictionary sees them (for an SAE, ``x - b_dec``; see
        :meth:`companion.VanillaSAE.joint_view`).
    D : array (n_atoms, n_features)
        Dictionary, atoms as rows (any nonzero norms: an SAE's raw ``W_dec`` with its raw
        codes gives the same projections as the unit-norm view).
    Z : array (n_samples, n_atoms)
        Nonnegative codes.
    concept : array (n_features,)
        The concept direction :math:`v` (normalised here).
    present : array of bool (n_samples,)
        Ground truth: whether the concept is present in each sample.
    main : int or sequence of int
        The main latent(s) of the concept.
    full_cos_threshold : float
        :math:`\tau_{\text{full}}`: the absorbing latent's least cosine with :math:`v`
        for full absorption.
    fraction_cos_threshold : float
        :math:`\tau_{\text{frac}}`: least cosine for a latent to count as a potential
        absorber in the absorption fraction.
    projection_threshold : float
        :math:`\rho`: least share of :math:`P_n` the absorber(s) must carry.
    max_absorbers : int
        Most non-main latents summed in the absorption fraction.
    active_eps : float
        A latent with :math:`z_{nk} \le` ``active_eps`` counts as silent.

    Returns
    -------
    AbsorptionReport
        Rates as floats; per-sample arrays in the kind of ``X``.
    """
    X, kind = as_tensor(X, "X", ndim=2)
    D, _ = as_tensor(D, "D", ndim=2, like=X)
    Z, _ = as_tensor(Z, "Z", ndim=2, like=X)
    v, _ = as_tensor(concept, "concept", ndim=1, like=X)
    check_columns(D, "D", X.shape[1], "X")
    n, k = X.shape[0], D.shape[0]
    check_codes(Z, "Z", (n, k))
    if v.shape[0] != X.shape[1]:
        raise ValueError(f"concept must have {X.shape[1]} entries (the features of X), got {v.shape[0]}")
    if float(v.norm()) == 0:
        raise ValueError("concept must be a nonzero direction")
    if isinstance(present, torch.Tensor):
        pres = present.to(X.device)
    elif isinstance(present, np.ndarray):
        pres = torch.from_numpy(np.ascontiguousarray(present)).to(X.device)
    else:
        raise TypeError(f"present must be a torch.Tensor or numpy.ndarray, got {type(present).__name__}")
    if pres.shape != (n,):
        raise ValueError(f"present must have shape (n_samples,) = {(n,)}, got {tuple(pres.shape)}")
    if pres.dtype != torch.bool:
        if not bool(((pres == 0) | (pres == 1)).all()):
            raise ValueError("present must be boolean (or 0/1)")
        pres = pres.bool()
    main_ids = _main_ids(main, k)
    full_cos_threshold = float(full_cos_threshold)
    fraction_cos_threshold = float(fraction_cos_threshold)
    projection_threshold = check_nonnegative(projection_threshold, "projection_threshold")
    max_absorbers = check_positive_int(max_absorbers, "max_absorbers")
    active_eps = check_nonnegative(active_eps, "active_eps")
    zero = torch.nonzero(D.norm(dim=1) == 0).flatten()
    if zero.numel():
        raise ValueError(f"D has zero-norm atoms (rows) at indices {zero[:10].tolist()}")

    with torch.no_grad():
        v = v / v.norm()
        along = D @ v                                  # d_k^T v
        cos = along / D.norm(dim=1)
        proj = Z * along                               # π_nk
        P = X @ v
        is_main = torch.zeros(k, dtype=torch.bool, device=X.device)
        is_main[main_ids] = True

        main_silent = (Z[:, is_main] <= active_eps).all(1)
        full, frac, absorber = _score(P, proj, cos, is_main, main_silent, full_cos_threshold,
                                      fraction_cos_threshold, projection_threshold, max_absorbers)
        full &= pres
        frac = torch.where(pres, frac, torch.zeros_like(frac))

        n_present = int(pres.sum())
        denom = max(n_present, 1)
        rate_full = float(full.sum()) / denom if n_present else float("nan")
        rate_frac = float(frac[pres].sum()) / denom if n_present else float("nan")
        rate_silent = float((main_silent & pres).sum()) / denom if n_present else float("nan")
    return AbsorptionReport(
        full_absorption_rate=rate_full,
        mean_absorption_fraction=rate_frac,
        main_silent_rate=rate_silent,
        n_present=n_present,
        full=kind.out(full),
        fraction=kind.out(frac),
        main_silent=kind.out(main_silent),
        cosines=kind.out(cos),
        absorber=kind.out(absorber),
    )


# --------------------------------------------------------------------------------------------
# SAEBench's full pipeline: ground-truth probe, k-sparse probing for the main latents, scores.
# --------------------------------------------------------------------------------------------

_SILENT = 1e-8  # SAEBench: a main latent is silent when its activation is below this


@dataclass
class ConceptProbe:
    """SAEBench's ground-truth linear probe for one binary concept (:func:`concept_probe`).

    Attributes
    ----------
    weight : array (n_features,)
        Probe weights :math:`w`; the concept direction is :math:`v = w/\\|w\\|`.
    bias : float
        Probe bias; a sample is predicted present when :math:`w^\\top x + b > 0`.
    f1 : float
        F1 score of that prediction on the held-out samples.
    min_f1 : float
        The gate (SAEBench: 0.6).
    passed : bool
        ``f1 > min_f1``; a concept whose probe fails the gate is not evaluated.
    test : array of bool (n_samples,)
        The held-out samples (the probe was fitted on the others).
    """

    weight: np.ndarray
    bias: float
    f1: float
    min_f1: float
    passed: bool
    test: np.ndarray

    @property
    def direction(self) -> np.ndarray:
        """The unit concept direction :math:`v = w/\\|w\\|` (zero if the probe is zero)."""
        nrm = float(np.linalg.norm(self.weight))
        return self.weight / nrm if nrm > 0 else np.zeros_like(self.weight)

    def scores(self, X: Any) -> np.ndarray:
        """Probe logits :math:`w^\\top x + b` of the rows of ``X``."""
        return _numpy2d(X, "X") @ self.weight + self.bias


@dataclass
class KSparseProbing:
    """SAEBench's k-sparse probing of codes for one concept (:func:`k_sparse_probing`).

    Attributes
    ----------
    ranking : array of int (max_k,)
        Latents in decreasing order of the weight of the ℓ1-penalised probe on all latents.
    f1 : array of float (max_k,)
        Held-out F1 of the logistic probe on the first ``k`` latents of ``ranking``, k = 1..max_k.
    main : list of int
        The main latents: ``ranking[:k]`` for the last ``k`` reached while each step raised the
        F1 by more than ``f1_jump_threshold`` (``k = 1`` always counts).
    f1_jump_threshold : float
        SAEBench: 0.03.
    """

    ranking: np.ndarray
    f1: np.ndarray
    main: list
    f1_jump_threshold: float

    @property
    def n_split(self) -> int:
        """Main latents beyond the first (SAEBench's ``num_split_features``)."""
        return len(self.main) - 1


@dataclass
class SAEBenchAbsorption:
    """SAEBench's absorption scores of one concept on one set of codes (:func:`saebench_absorption`).

    Attributes
    ----------
    evaluated : bool
        False when the ground-truth probe failed its F1 gate: the concept is refused and every
        rate is ``nan``.
    reason : str
        Why the concept was not evaluated ("" when it was).
    probe : ConceptProbe
        The ground-truth probe (its ``f1`` and ``passed`` are the gate).
    sparse : KSparseProbing or None
        The k-sparse probing that chose the main latents (None when ``main`` was given or the
        concept was refused).
    main : list of int
        The main latents.
    samples : array of int
        The samples scored: held-out, concept present, and probe logit > 0 (SAEBench's
        "probe true positives").
    full : array of bool (len(samples),)
        Full absorption of each scored sample.
    fraction : array of float (len(samples),)
        Absorption fraction of each scored sample.
    top_latent : array of int (len(samples),)
        Latent with the largest projection on the concept (-1 where none projects positively).
    n_probe_true_positives : int
        ``len(samples)``, the denominator of both rates.
    n_full_absorption : int
        Number of fully absorbed samples.
    full_absorption_rate : float
        ``n_full_absorption / n_probe_true_positives`` (SAEBench's ``full_absorption_rate``).
    mean_absorption_fraction : float
        Mean of ``fraction`` (SAEBench's ``mean_absorption_fraction``).
    cosines : array of float (n_atoms,)
        :math:`\\cos\\angle(d_k, v)` for every latent.
    """

    evaluated: bool
    reason: str
    probe: ConceptProbe
    sparse: Any
    main: list
    samples: np.ndarray
    full: np.ndarray
    fraction: np.ndarray
    top_latent: np.ndarray
    n_probe_true_positives: int
    n_full_absorption: int
    full_absorption_rate: float
    mean_absorption_fraction: float
    cosines: np.ndarray


def _numpy2d(A: Any, name: str) -> np.ndarray:
    t, _ = as_tensor(A, name, ndim=2)
    return t.detach().cpu().double().numpy()


def _labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        y = labels.detach().cpu().numpy()
    elif isinstance(labels, np.ndarray):
        y = labels
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(labels).__name__}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape (n_samples,) = {(n,)}, got {tuple(y.shape)}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1)")
        y = y.astype(bool)
    return y


def _test_mask(test: Any, n: int, test_fraction: float, seed: int) -> np.ndarray:
    """The held-out samples: ``test`` as given, or SAEBench's split (a seeded shuffle, the first
    ``int(0.8 n)`` for training and the rest held out)."""
    if test is not None:
        mask = _labels(test, n, "test")
    else:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
        order = np.random.default_rng(seed).permutation(n)
        mask = np.zeros(n, dtype=bool)
        mask[order[int(n * (1 - test_fraction)):]] = True
    if mask.all() or not mask.any():
        raise ValueError("test must hold out some samples and leave some for training")
    return mask


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = int((y & pred).sum())
    denom = 2 * tp + int((~y & pred).sum()) + int((y & ~pred).sum())
    return 2 * tp / denom if denom else 0.0


def _sklearn_logistic():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:  # pragma: no cover - scikit-learn is in the test and book extras
        raise ImportError("SAEBench's probes need scikit-learn (pip install scikit-learn)") from err
    return LogisticRegression


def _check_both_classes(y: np.ndarray, where: str) -> None:
    if y.all() or not y.any():
        raise ValueError(f"labels must contain both classes in the {where} samples")


def concept_probe(
    X: Any,
    labels: Any,
    *,
    test: Any = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_f1: float = 0.6,
    weight_decay: float = 1e-4,
) -> ConceptProbe:
    r"""SAEBench's ground-truth linear probe for a binary concept, with its F1 gate (Chapter 8).

    A logistic probe is fitted on the training samples of ``X`` (the model's activations, as
    SAEBench reads them: not centred by an SAE's decoder bias) to the ``labels``, with
    SAEBench's objective: binary cross-entropy with positives weighted by
    :math:`n_-/n_+`, averaged over samples, plus ``weight_decay``·½‖w‖² (SAEBench trains it
    with 50 Adam epochs; here scikit-learn's L-BFGS minimises the same objective, bias not
    penalised). Its F1 on the held-out samples, predicting present where
    :math:`w^\top x + b > 0`, is the gate: SAEBench evaluates a concept only if F1 > ``min_f1``
    (0.6) (SAEBench, Karvonen et al. 2025).

    Parameters
    ----------
    X : array (n_samples, n_features)
        Activations.
    labels : array of bool (n_samples,)
        Whether the concept is present in each sample (e.g. each token).
    test : array of bool (n_samples,), optional
        Held-out samples. Default: SAEBench's split, a ``seed``-ed shuffle holding out
        ``test_fraction`` (pass your own mask to split by document or by word instead).
    test_fraction, seed :
        The default split.
    min_f1 : float
        The gate.
    weight_decay : float
        SAEBench's L2 weight decay of the probe (1e-4).

    Returns
    -------
    ConceptProbe
    """
    Xn = _numpy2d(X, "X")
    n = Xn.shape[0]
    y = _labels(labels, n)
    mask = _test_mask(test, n, test_fraction, seed)
    weight_decay = check_positive(weight_decay, "weight_decay")
    min_f1 = float(min_f1)
    ytr = y[~mask]
    _check_both_classes(ytr, "training")
    n_tr, n_neg = len(ytr), int((~ytr).sum())
    # sklearn minimises C·Σ_i s_i ℓ_i + ½‖w‖² with balanced weights s_i = n/(2 n_class); that is
    # SAEBench's (1/n)[Σ_neg ℓ + (n_-/n_+)Σ_pos ℓ] + ½·wd·‖w‖² scaled by 1/wd when C = 2n_-/(n² wd).
    LR = _sklearn_logistic()
    model = LR(C=2 * n_neg / (n_tr ** 2 * weight_decay), class_weight="balanced", max_iter=10000,
               tol=1e-10).fit(Xn[~mask], ytr.astype(np.int64))
    w, b = model.coef_[0].astype(np.float64), float(model.intercept_[0])
    f1 = _f1(y[mask], Xn[mask] @ w + b > 0)
    return ConceptProbe(weight=w, bias=b, f1=f1, min_f1=min_f1, passed=f1 > min_f1, test=mask)


def k_sparse_probing(
    Z: Any,
    labels: Any,
    test: Any,
    *,
    max_k: int = 10,
    f1_jump_threshold: float = 0.03,
    l1_decay: float = 0.01,
    seed: int = 0,
) -> KSparseProbing:
    r"""SAEBench's k-sparse probing: the main latents of a concept in codes ``Z`` (Chapter 8).

    An ℓ1-penalised logistic probe on all latents of the training samples (SAEBench's
    objective: positive-weighted cross-entropy averaged over samples plus
    ``l1_decay``·‖w‖₁; minimised here by liblinear's coordinate descent) ranks the latents by
    weight, largest first. For k = 1..``max_k`` a class-balanced logistic regression on the
    top k latents (scikit-learn, as in SAEBench) is scored by its held-out F1. The main
    latents are the top k for the largest k such that every step up to it raised the F1 by
    more than ``f1_jump_threshold`` (k = 1 always counts): a concept split over several
    latents keeps them all (SAEBench, Karvonen et al. 2025).

    Parameters
    ----------
    Z : array (n_samples, n_atoms)
        Nonnegative codes (an SAE's encoder codes, or exact codes from :func:`companion.encode`).
    labels : array of bool (n_samples,)
        Concept present.
    test : array of bool (n_samples,)
        Held-out samples (e.g. ``ConceptProbe.test``).
    max_k : int
        Largest k (SAEBench: 10; capped at the number of latents).
    f1_jump_threshold : float
        SAEBench: 0.03.
    l1_decay : float
        SAEBench: 0.01.
    seed : int
        Seed of liblinear's coordinate order.

    Returns
    -------
    KSparseProbing
    """
    Zn = _numpy2d(Z, "Z")
    n, k = Zn.shape
    if (Zn < 0).any():
        raise ValueError("Z must be nonnegative")
    y = _labels(labels, n)
    mask = _labels(test, n, "test")
    max_k = min(check_positive_int(max_k, "max_k"), k)
    f1_jump_threshold = check_nonnegative(f1_jump_threshold, "f1_jump_threshold")
    l1_decay = check_positive(l1_decay, "l1_decay")
    ytr = y[~mask]
    _check_both_classes(ytr, "training")
    n_tr, n_neg = len(ytr), int((~ytr).sum())
    LR = _sklearn_logistic()
    # Same rescaling as in concept_probe: C = 2n_-/(n² · l1_decay) turns sklearn's ℓ1 objective
    # into SAEBench's; a large intercept_scaling keeps liblinear from penalising the bias.
    import sklearn
    # scikit-learn 1.8 replaced penalty="l1" by l1_ratio=1 (the old spelling warns there)
    l1_kw = ({"l1_ratio": 1.0} if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)
             else {"penalty": "l1"})
    # liblinear's tolerance is relative to its first gradient; at 1e-8 it stalls at max_iter (and
    # warns) on codes with nearly duplicate latents, as trained SAEs have, while 1e-6 converges
    # in tens of iterations to the same ranking (tests/test_absorption.py).
    l1 = LR(**l1_kw, solver="liblinear", C=2 * n_neg / (n_tr ** 2 * l1_decay),
            class_weight="balanced", intercept_scaling=100.0, max_iter=10000, tol=1e-6,
            random_state=seed).fit(Zn[~mask], ytr.astype(np.int64))
    ranking = np.argsort(-l1.coef_[0], kind="stable")[:max_k]
    f1s = []
    for kk in range(1, max_k + 1):
        feats = ranking[:kk]
        probe = LR(max_iter=500, class_weight="balanced").fit(Zn[~mask][:, feats], ytr.astype(np.int64))
        f1s.append(_f1(y[mask], Zn[mask][:, feats] @ probe.coef_[0] + probe.intercept_[0] > 0))
    main, best = [], -math.inf
    for kk, f in enumerate(f1s, start=1):
        if f > best + f1_jump_threshold:
            best, main = f, [int(i) for i in ranking[:kk]]
        else:
            break
    return KSparseProbing(ranking=ranking, f1=np.array(f1s), main=main,
                          f1_jump_threshold=f1_jump_threshold)


def saebench_absorption(
    X: Any,
    D: Any,
    Z: Any,
    labels: Any,
    *,
    probe: ConceptProbe | None = None,
    main: Sequence[int] | None = None,
    test: Any = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_probe_f1: float = 0.6,
    max_k: int = 10,
    f1_jump_threshold: float = 0.03,
    full_cos_threshold: float = 0.025,
    fraction_cos_threshold: float = 0.1,
    projection_threshold: float = 0.4,
    max_absorbers: int = 3,
) -> SAEBenchAbsorption:
    r"""SAEBench's absorption evaluation of one binary concept on any codes (Chapters 3 and 8).

    The pipeline of SAEBench (Karvonen et al. 2025, after Chanin et al. 2024), with its thresholds as
    defaults:

    1. the ground-truth probe (:func:`concept_probe`) on ``X``; if its held-out F1 is not above
       ``min_probe_f1`` (0.6) the concept is refused (``evaluated=False``, rates ``nan``);
    2. the main latents by k-sparse probing of ``Z`` (:func:`k_sparse_probing`, k ≤ 10, F1
       jump 0.03), unless ``main`` is given;
    3. on the held-out samples where the concept is present and the probe fires (logit > 0),
       with :math:`v` the unit probe direction, :math:`\cos_k = \cos\angle(d_k, v)`, latent
       projections :math:`\pi_{nk} = z_{nk}\cos_k` (SAEBench's activation × cosine; equal to
       :math:`z_{nk} d_k^\top v` for unit atoms) and :math:`P_n = x_n^\top v`: *full
       absorption* when every main latent is silent (:math:`z < 10^{-8}`), the top latent by
       :math:`\pi` has :math:`\cos \ge 0.025` and carries :math:`\pi \ge 0.4 P_n`; the
       *absorption fraction* as in :func:`absorption`, with absorbers of :math:`\cos \ge 0.1`,
       at most 3. Both rates divide by the number of such samples.

    Parameters
    ----------
    X : array (n_samples, n_features)
        Activations (what the probe reads; SAEBench does not centre them).
    D : array (n_atoms, n_features)
        Decoder directions (rows; any nonzero norms), e.g. an SAE's ``W_dec``. SAEBench's
        :math:`z\cos` is a latent's actual contribution to :math:`P_n` only for unit rows: to
        compare an SAE whose rows are not unit with exact codes, give both in the unit-norm
        view (rows :math:`d_k/\|d_k\|`, codes :math:`z_{nk}\|d_k\|`, as
        :func:`companion.encode` works).
    Z : array (n_samples, n_atoms)
        Nonnegative codes on ``D``: an SAE's encoder codes, or exact codes from
        :func:`companion.encode` on the same dictionary.
    labels : array of bool (n_samples,)
        Whether the concept is present in each sample.
    probe : ConceptProbe, optional
        A probe already fitted by :func:`concept_probe` (reuse it to compare several codes of
        the same activations on the same held-out samples); its ``test`` mask is used.
    main : sequence of int, optional
        Main latents, skipping k-sparse probing.
    test, test_fraction, seed :
        The split, when no ``probe`` is given (see :func:`concept_probe`).
    min_probe_f1, max_k, f1_jump_threshold, full_cos_threshold, fraction_cos_threshold, projection_threshold, max_absorbers : float or int
        SAEBench's thresholds (0.6, 10, 0.03, 0.025, 0.1, 0.4, 3).

    Returns
    -------
    SAEBenchAbsorption

    Examples
    --------
    SAE codes against exact codes on the SAE's own dictionary, one probe for both::

        probe = companion.concept_probe(X, is_number, seed=0)
        print(f"probe F1 {probe.f1:.2f}, passes the 0.6 gate: {probe.passed}")
        sae_codes = companion.saebench_absorption(X, W_dec, Z_sae, is_number, probe=probe)
        exact = companion.saebench_absorption(X, W_dec, Z_exact, is_number, probe=probe)
        if sae_codes.evaluated:
            print(sae_codes.full_absorption_rate, exact.full_absorption_rate,
                  sae_codes.mean_absorption_fraction, sae_codes.main)
    """
    Xn, Dn, Zn = _numpy2d(X, "X"), _numpy2d(D, "D"), _numpy2d(Z, "Z")
    n, d = Xn.shape
    k = Dn.shape[0]
    if Dn.shape[1] != d:
        raise ValueError(f"D must have {d} columns (the features of X), got {Dn.shape[1]}")
    if Zn.shape != (n, k):
        raise ValueError(f"Z must have shape (n_samples, n_atoms) = {(n, k)}, got {Zn.shape}")
    if (Zn < 0).any():
        raise ValueError("Z must be nonnegative")
    dn = np.linalg.norm(Dn, axis=1)
    if (dn == 0).any():
        raise ValueError(f"D has zero-norm atoms (rows) at indices {np.flatnonzero(dn == 0)[:10].tolist()}")
    y = _labels(labels, n)
    for name, val in (("full_cos_threshold", full_cos_threshold),
                      ("fraction_cos_threshold", fraction_cos_threshold)):
        if not -1 <= float(val) <= 1:
            raise ValueError(f"{name} must lie in [-1, 1], got {val!r}")
    projection_threshold = check_nonnegative(projection_threshold, "projection_threshold")
    max_absorbers = check_positive_int(max_absorbers, "max_absorbers")
    if probe is None:
        probe = concept_probe(Xn, y, test=test, test_fraction=test_fraction, seed=seed, min_f1=min_probe_f1)
    elif probe.weight.shape != (d,) or probe.test.shape != (n,):
        raise ValueError(f"probe must be fitted on these samples: weight shape {probe.weight.shape}, "
                         f"test mask shape {probe.test.shape}, expected {(d,)} and {(n,)}")
    v = probe.direction
    cos = (Dn @ v) / dn
    nan = float("nan")
    empty_i, empty_b, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), np.zeros(0)
    if not probe.f1 > min_probe_f1:
        return SAEBenchAbsorption(
            evaluated=False, reason=f"ground-truth probe F1 {probe.f1:.3f} is not above the gate {min_probe_f1}",
            probe=probe, sparse=None, main=[], samples=empty_i, full=empty_b, fraction=empty_f,
            top_latent=empty_i, n_probe_true_positives=0, n_full_absorption=0,
            full_absorption_rate=nan, mean_absorption_fraction=nan, cosines=cos)
    sparse = None
    if main is None:
        sparse = k_sparse_probing(Zn, y, probe.test, max_k=max_k, f1_jump_threshold=f1_jump_threshold,
                                  seed=seed)
        main_ids = sparse.main
    else:
        main_ids = _main_ids(main, k)
    samples = np.flatnonzero(probe.test & y & (probe.scores(Xn) > 0))
    with torch.no_grad():
        Zs = torch.from_numpy(Zn[samples])
        cos_t = torch.from_numpy(cos)
        is_main = torch.zeros(k, dtype=torch.bool)
        is_main[main_ids] = True
        silent = (Zs[:, is_main] < _SILENT).all(1)
        full, frac, top = _score(torch.from_numpy(Xn[samples] @ v), Zs * cos_t, cos_t, is_main, silent,
                                 float(full_cos_threshold), float(fraction_cos_threshold),
                                 projection_threshold, max_absorbers)
    m = len(samples)
    n_full = int(full.sum())
    return SAEBenchAbsorption(
        evaluated=m > 0, reason="" if m else "no held-out sample where the concept is present and the probe fires",
        probe=probe, sparse=sparse, main=list(main_ids), samples=samples, full=full.numpy(),
        fraction=frac.numpy(), top_latent=top.numpy(), n_probe_true_positives=m, n_full_absorption=n_full,
        full_absorption_rate=n_full / m if m else nan,
        mean_absorption_fraction=float(frac.sum()) / m if m else nan, cosines=cos)
