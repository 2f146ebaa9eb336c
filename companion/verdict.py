r"""Verdicts with statistics: what a certificate on a sample of rows says about the SAE.

A certificate computed on :math:`n` rows measures the sample as well as the SAE. The T2
violation of an atom that fires on a handful of rows is large whatever the dictionary, and
the largest T2 over thousands of atoms falls as :math:`n` grows. :func:`assess` turns the
sums that :class:`_Noise` accumulates during :func:`companion.interop.certify_sae`'s pass
into a graded verdict, with every number next to its sampling noise.

T2 and its standard error
-------------------------
For atom :math:`k` (unit direction :math:`d_k`, tangent projector
:math:`P_k = I - d_kd_k^\top`) and row :math:`n` (exact code :math:`z_{kn}`, residual
:math:`r_n`), write :math:`w_{kn} = z_{kn}P_kr_n` and :math:`s_k = \sum_n z_{kn}^2 +
\lambda z_{kn}`. Then :math:`T2_k = \|\sum_n w_{kn}\|/s_k`. Every row is put in half A or
half B by a fixed hash of its row index (:func:`split_signs`, :math:`\varepsilon_n = \pm 1`),
the same in every run, chunking and process count. The **split-half difference**
:math:`\|\sum_n \varepsilon_n w_{kn}\|/s_k` is what the T2 of the same rows would be with the
signal removed (the two halves' tangent gradients subtracted), and over random halvings its
mean square is exactly :math:`\sum_n\|w_{kn}\|^2/s_k^2`. The **standard error** of
:math:`T2_k` is its root,

.. math::
    \mathrm{se}_k = \frac{\sqrt{\sum_n z_{kn}^2\big(\|r_n\|^2 - (d_k^\top r_n)^2\big)}}
                         {\sum_n z_{kn}^2 + \lambda z_{kn}},

the root of the summed variances of the coordinates of the tangent gradient whose norm is
:math:`T2_k`, when its expectation over rows is zero (a dictionary stationary for the
population of rows). It shrinks like :math:`1/\sqrt{n_k}` with the rows :math:`n_k` the atom
fires on; :math:`T2_k/\mathrm{se}_k \le \sqrt{n_k}` always (Cauchy–Schwarz), so an atom
firing on one row has :math:`T2_k = \mathrm{se}_k` whatever its direction.

Under the normal approximation and a zero population gradient, :math:`(T2_k/\mathrm{se}_k)^2`
is a weighted sum of :math:`\chi^2_1` variables with weights summing to 1, whose tail beyond
:math:`t \ge 1.54` is at most that of one :math:`\chi^2_1` (Székely and Bakirov, 2003):
:math:`P(T2_k \ge c\,\mathrm{se}_k) \le P(|N(0,1)| \ge c)`. An atom is **beyond noise** when
:math:`T2_k > c\,\mathrm{se}_k` with the Bonferroni level
:math:`c = \Phi^{-1}(1 - \alpha/(2m))` over the :math:`m` used atoms and the decoder bias
(``alpha = 0.05``: a stationary dictionary is called not stationary in at most 5% of samples).
Rows are treated as independent draws; tokens of one document are correlated, which makes the
true noise larger than :math:`\mathrm{se}_k`, so certify rows from many documents.

The decoder bias is tested the same way: :math:`\|\bar r\|` against
:math:`\sqrt{\sum_n \|r_n - \bar r\|^2}/n`.

Summaries
---------
* usage-weighted T2: :math:`\sqrt{\sum_k n_kT2_k^2/\sum_k n_k}`, next to the **noise floor**
  :math:`\sqrt{\sum_k n_k\mathrm{se}_k^2/\sum_k n_k}`, what a stationary dictionary would show
  at this :math:`n` (their ratio is about 1 for one);
* the largest T2 next to the largest split-half difference (what the maximum over atoms
  reaches by noise alone at this :math:`n`).

New atom, amortisation gap, dead atoms
--------------------------------------
* **New atom**: the in-sample gain (a direction found and scored on the same rows) is
  optimistic. The held-out gain finds :math:`u` on half A and scores
  :math:`\frac1{2n_B}\sum_{n\in B}(u^\top r_n - \lambda)_+^2` on half B, and the other way
  round (the mean of the two); its standard error is
  :math:`\tfrac12\sqrt{\mathrm{se}_A^2+\mathrm{se}_B^2}` with :math:`\mathrm{se}_B` the standard
  error of the mean of :math:`\frac12(u^\top r_n-\lambda)_+^2` over half B. Both are given in %
  of the exact-code loss :math:`F(D)`. Scored on the residuals kept in each half's candidate
  pool (the largest norms), so a lower bound when the pool is full.
* **Amortisation gap** :math:`\frac1n\sum_n (\ell_n^{SAE} - \ell_n^{exact})`, with the standard
  error of a mean of the per-row gaps.
* **Dead atoms**: dead at exact codes (every :math:`d_k^\top r_n < \lambda`: leaving the atom
  unused is optimal for these rows) against dead only in the encoder (exact codes use them), with
  a **random-atom control**: how many of ``n_random`` random unit directions exact codes would
  use on the same rows (:math:`\max_n u^\top r_n > \lambda`, the condition for a new atom to
  enter an exact code). A latent that fired on none of :math:`n` rows may still fire at a rate
  up to :math:`3/n` (95%, the rule of three).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .certificates import _best_new_atom
from .runtime import generator

__all__ = ["CertificateStatistics", "assess", "split_signs"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def split_signs(positions: Any) -> np.ndarray:
    """Half A (+1) or half B (−1) for each row index: the top bit of SplitMix64 of the index.

    A fixed function of the row index, so the split is the same whatever the chunk size, the
    order of the rows or the number of processes that certify them.
    """
    x = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where((z >> np.uint64(63)) == 0, 1.0, -1.0)


class _Noise:
    """Sums over rows that give the sampling noise of an exact-code certificate.

    Memory ``O(n_atoms · n_features + n_candidates · n_features)`` whatever the number of rows.
    """

    def __init__(self, D: torch.Tensor, lam: float, n_candidates: int = 8192, n_random: int = 256,
                 seed: int = 0):
        k, d = D.shape
        self.D, self.lam = D, lam
        self.half_pool = max(1, n_candidates // 2)
        f64 = dict(dtype=torch.float64, device=D.device)
        self.Q = torch.zeros(k, **f64)              # Σ_n z_kn² ‖P_k r_n‖²
        self.U = D.new_zeros(k, d)                  # Σ_n ε_n z_kn r_n
        self.fire = torch.zeros(k, dtype=torch.long, device=D.device)
        self.zsq = torch.zeros(k, **f64)            # Σ_n z_kn²
        self.zsum = torch.zeros(k, **f64)           # Σ_n z_kn
        self.rsum = torch.zeros(d, **f64)           # Σ_n r_n
        self.sums = torch.zeros(6, **f64)           # n, Σ‖r‖², Σ loss, Σ loss², Σ gap, Σ gap²
        self.n_half = torch.zeros(2, dtype=torch.long, device=D.device)
        self.pools = [D.new_zeros(0, d), D.new_zeros(0, d)]
        self.pool_norms = [D.new_zeros(0), D.new_zeros(0)]
        self.pool_full = [False, False]
        R = torch.randn(n_random, d, generator=generator(seed), dtype=torch.float64)
        self.random_atoms = (R / R.norm(dim=1, keepdim=True)).to(device=D.device, dtype=D.dtype)
        self.random_max = D.new_full((n_random,), -math.inf)

    def add(self, X: torch.Tensor, Z: torch.Tensor, eps: torch.Tensor, other_loss: torch.Tensor | None) -> None:
        """Rows ``X`` (centred), their exact codes ``Z``, split signs ``eps``; ``other_loss``: the
        SAE's per-row loss (for the gap)."""
        if X.shape[0] == 0:
            return
        lam, D = self.lam, self.D
        R = X - Z @ D
        G = R @ D.T
        rn2 = (R * R).sum(1)
        Z2 = Z * Z
        self.Q += (Z2.T @ rn2 - (Z2 * G * G).sum(0)).double()
        self.U += Z.T @ (eps.unsqueeze(1) * R)
        self.fire += (Z > 0).sum(0)
        self.zsq += Z2.sum(0).double()
        self.zsum += Z.sum(0).double()
        self.rsum += R.double().sum(0)
        loss = (0.5 * rn2 + lam * Z.sum(1)).double()
        gap = (other_loss.double() - loss) if other_loss is not None else torch.zeros_like(loss)
        self.sums += torch.stack([loss.new_tensor(float(X.shape[0])), rn2.double().sum(), loss.sum(),
                                  (loss * loss).sum(), gap.sum(), (gap * gap).sum()])
        self.random_max = torch.maximum(self.random_max, (R @ self.random_atoms.T).max(0).values)
        rnorm = rn2.sqrt()
        for h, mask in enumerate((eps > 0, eps < 0)):
            self.n_half[h] += mask.sum()
            keep = mask & (rnorm > lam)
            if bool(keep.any()):
                self._keep(h, R[keep], rnorm[keep])

    def _keep(self, h: int, R: torch.Tensor, norms: torch.Tensor) -> None:
        pool = torch.cat([self.pools[h], R], 0)
        pn = torch.cat([self.pool_norms[h], norms], 0)
        if pool.shape[0] > self.half_pool:
            top = pn.topk(self.half_pool).indices
            pool, pn = pool[top], pn[top]
            self.pool_full[h] = True
        self.pools[h], self.pool_norms[h] = pool, pn

    def all_reduce(self, group: Any) -> None:
        """Sum (or max, or merge) the accumulators of every process of ``group``."""
        import torch.distributed as dist

        for t in (self.Q, self.U, self.fire, self.zsq, self.zsum, self.rsum, self.sums, self.n_half):
            dist.all_reduce(t, group=group)
        dist.all_reduce(self.random_max, op=dist.ReduceOp.MAX, group=group)
        full = torch.tensor([float(f) for f in self.pool_full], device=self.D.device)
        dist.all_reduce(full, op=dist.ReduceOp.MAX, group=group)
        for h in range(2):
            pool, norms = _gather_rows(self.pools[h], self.pool_norms[h], group)
            self.pools[h], self.pool_norms[h] = pool, norms
            self.pool_full[h] = bool(full[h] > 0)
            if pool.shape[0] > self.half_pool:
                self._keep(h, pool[:0], norms[:0])


def _gather_rows(rows: torch.Tensor, norms: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate a variable number of rows from every process of ``group``."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    most = max(int(c) for c in counts)
    padded = rows.new_zeros(most, rows.shape[1] + 1)
    padded[:rows.shape[0], 0] = norms
    padded[:rows.shape[0], 1:] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    both = torch.cat([p[:int(c)] for p, c in zip(parts, counts)], 0)
    return both[:, 1:].contiguous(), both[:, 0].contiguous()


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _heldout_gain(fit: torch.Tensor, n_fit: int, test: torch.Tensor, n_test: int,
                  lam: float) -> tuple[float, float]:
    """Gain of the new atom found on ``fit`` rows, scored on ``test`` rows: (mean, standard error)."""
    if n_test < 2 or fit.shape[0] == 0:
        return 0.0, 0.0
    u, _, _ = _best_new_atom(fit, lam, max(n_fit, 1))
    h = 0.5 * (test @ u - lam).clamp(min=0) ** 2 if test.shape[0] else test.new_zeros(0)
    h = h.double()
    mean = float(h.sum()) / n_test
    var = max(float((h * h).sum()) / n_test - mean * mean, 0.0) * n_test / (n_test - 1)
    return mean, math.sqrt(var / n_test)


@dataclass
class CertificateStatistics:
    r"""Sampling noise of an exact-code certificate, and the verdict it grades (see :mod:`companion.verdict`).

    Attributes
    ----------
    n_samples : int
        Rows certified.
    alpha, threshold : float
        Family-wise level and the Bonferroni number of standard errors
        :math:`c = \Phi^{-1}(1-\alpha/(2m))` beyond which an atom counts as not stationary.
    n_tested : int
        :math:`m`: used atoms plus the decoder bias.
    atom_rows : array of int (n_atoms,)
        Rows each atom fires on at exact codes.
    atom_t2, atom_t2_se, atom_t2_z : arrays (n_atoms,)
        T2 per atom, its standard error, and their ratio (0 for unused atoms).
    atom_t2_split : array (n_atoms,)
        The split-half difference, one draw of the T2 that noise alone gives at this n.
    t2_max, t2_max_split : float
        Largest T2 and largest split-half difference over atoms.
    t2_weighted, noise_floor : float
        Usage-weighted root mean square of T2 and of its standard error (the noise floor).
    t2_median, t2_se_median : float
        Medians over used atoms.
    n_beyond : int
        Atoms with :math:`T2_k > c\,\mathrm{se}_k`.
    beyond : list of int
        Those atoms, most significant first.
    worst_atom : int or None
        The atom with the largest :math:`T2_k/\mathrm{se}_k`.
    bias_z : float
        :math:`\|\bar r\|` in standard errors (the decoder bias's test).
    stationary_within_noise : bool
        No atom (and not the bias) beyond :math:`c` standard errors.
    verdict : str
        "stationary within sampling noise at n rows (...)" or "not stationary: m atoms beyond c
        standard errors at n rows (worst: ...)".
    loss, loss_se : float
        Exact-code loss :math:`F(D)` and its standard error (of a mean over rows).
    amortisation_gap, amortisation_gap_se : float
        The gap and its standard error (None without SAE codes).
    new_atom_gain_pct : float
        In-sample new-atom gain in % of :math:`F(D)`.
    heldout_gain_pct, heldout_gain_se_pct : float
        Held-out (cross-fitted halves) gain in % of :math:`F(D)` and its standard error.
    heldout_pool_full : bool
        Whether a half's candidate pool was full (the held-out gain is then a lower bound).
    dead_exact, dead_encoder_only : list of int
        Atoms dead at exact codes; atoms dead in the SAE's codes but used by exact codes.
    dead_exact_max_corr : list of float
        :math:`\max_n d_k^\top r_n/\lambda` of each atom dead at exact codes.
    n_random, n_random_used : int
        Random unit atoms drawn, and how many of them exact codes would use on these rows.
    random_max_corr_median : float
        Median over random atoms of :math:`\max_n u^\top r_n/\lambda`.
    next_steps : list of dict
        What to do next: ``{"topic", "finding", "action"}`` each.
    """

    n_samples: int
    alpha: float
    threshold: float
    n_tested: int
    atom_rows: Any = field(repr=False)
    atom_t2: Any = field(repr=False)
    atom_t2_se: Any = field(repr=False)
    atom_t2_z: Any = field(repr=False)
    atom_t2_split: Any = field(repr=False)
    t2_max: float = 0.0
    t2_max_split: float = 0.0
    t2_weighted: float = 0.0
    noise_floor: float = 0.0
    t2_median: float = 0.0
    t2_se_median: float = 0.0
    n_beyond: int = 0
    beyond: list = field(default_factory=list)
    worst_atom: int | None = None
    bias_z: float = 0.0
    stationary_within_noise: bool = True
    verdict: str = ""
    loss: float = 0.0
    loss_se: float = 0.0
    amortisation_gap: float | None = None
    amortisation_gap_se: float | None = None
    new_atom_gain_pct: float = 0.0
    heldout_gain_pct: float = 0.0
    heldout_gain_se_pct: float = 0.0
    heldout_pool_full: bool = False
    dead_exact: list = field(default_factory=list)
    dead_encoder_only: list = field(default_factory=list)
    dead_exact_max_corr: list = field(default_factory=list)
    n_random: int = 0
    n_random_used: int = 0
    random_max_corr_median: float = 0.0
    next_steps: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays become lists)."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            out[name] = v
        return out

    def worst_line(self) -> str:
        """The worst atom in words."""
        if self.worst_atom is None:
            return "no atom is used"
        k = self.worst_atom
        t2, se, rows = (float(_np(self.atom_t2)[k]), float(_np(self.atom_t2_se)[k]),
                        int(_np(self.atom_rows)[k]))
        return f"atom {k}: T2 = {t2:.3g} = {t2 / se:.1f} standard errors, fires on {rows} rows"


def _sig(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}g}"


def assess(noise: _Noise, exact: Any, sae: Any, *, alpha: float = 0.05,
           gap_threshold: float = 0.01, gain_threshold: float = 0.001,
           stage: Any = None) -> CertificateStatistics:
    """The statistical verdict of an exact-code certificate (module docstring for the formulas).

    Parameters
    ----------
    noise : _Noise
        The accumulated sums (all-reduced first when several processes computed them).
    exact, sae : CertificateReport
        The exact-code report and the SAE-code report (``sae`` may be None).
    alpha : float
        Family-wise level of the stationarity test.
    gap_threshold : float
        An amortisation gap above this fraction of the SAE loss (and beyond 3 standard errors)
        is worth acting on.
    gain_threshold : float
        A held-out new-atom gain above this fraction of :math:`F(D)` (and beyond 3 standard
        errors) is worth acting on; below it the gain may be real but is too small to matter.
    stage : tqdm, optional
        Progress bar of the new-atom searches (advanced by one per search).
    """
    lam, D = noise.lam, noise.D
    dev, f64 = D.device, torch.float64
    n = int(round(float(noise.sums[0])))
    fire = noise.fire
    used = fire > 0
    m = int(used.sum()) + 1
    c = statistics.NormalDist().inv_cdf(1 - alpha / (2 * m))
    floor = 1e-9 if D.dtype == torch.float64 else 1e-5
    s = (noise.zsq + lam * noise.zsum).clamp(min=1e-300)
    zeros = torch.zeros_like(s)
    se = torch.where(used, noise.Q.clamp(min=0).sqrt() / s, zeros)
    t2 = torch.as_tensor(_np(exact.atom_t2), dtype=f64, device=dev)
    z = torch.where(used & (se > 0), t2 / se.clamp(min=1e-300), zeros)
    Dd, U = D.double(), noise.U.double()
    split = torch.where(used, (U - (U * Dd).sum(1, keepdim=True) * Dd).norm(dim=1) / s, zeros)
    w = fire.double()
    wsum = float(w.sum())
    t2_w = math.sqrt(float((w * t2 * t2).sum()) / wsum) if wsum else 0.0
    floor_w = math.sqrt(float((w * se * se).sum()) / wsum) if wsum else 0.0
    flagged = used & (z > c) & (t2 > floor)
    beyond = [int(k) for k in torch.argsort(-z, stable=True).tolist() if bool(flagged[k])]
    worst = int(torch.argmax(z)) if bool(used.any()) else None

    N = max(n, 1)
    rbar = noise.rsum / N
    spread = max(float(noise.sums[1]) - N * float((rbar * rbar).sum()), 0.0)
    se_b, rb = math.sqrt(spread) / N, float(rbar.norm())
    bias_z = rb / se_b if se_b > 0 else (0.0 if rb <= floor else math.inf)
    bias_beyond = bias_z > c and rb > floor

    def mean_se(total: float, squares: float) -> tuple[float, float]:
        mean = total / N
        var = max(squares / N - mean * mean, 0.0) * N / max(N - 1, 1)
        return mean, math.sqrt(var / N)

    loss, loss_se = mean_se(float(noise.sums[2]), float(noise.sums[3]))
    gap = gap_se = None
    if sae is not None:
        gap, gap_se = mean_se(float(noise.sums[4]), float(noise.sums[5]))

    n_a, n_b = (int(v) for v in noise.n_half.tolist())
    g_b, se_gb = _heldout_gain(noise.pools[0], n_a, noise.pools[1], n_b, lam)
    if stage is not None:
        stage.update(1)
    g_a, se_ga = _heldout_gain(noise.pools[1], n_b, noise.pools[0], n_a, lam)
    if stage is not None:
        stage.update(1)
    pct = 100.0 / loss if loss > 0 else 0.0
    held, held_se = 0.5 * (g_a + g_b) * pct, 0.5 * math.sqrt(se_ga ** 2 + se_gb ** 2) * pct
    gain_pct = exact.new_atom_gain * pct

    dead_exact = [int(k) for k in exact.dead_atoms]
    dead_enc = sorted(set(int(k) for k in sae.dead_atoms) - set(dead_exact)) if sae is not None else []
    maxcorr = _np(exact.max_correlation).astype(float)
    dead_corr = [float(maxcorr[k]) / lam for k in dead_exact]
    rmax = noise.random_max.double() / lam
    n_random, n_random_used = int(rmax.numel()), int((rmax > 1).sum())

    if not bool(used.any()):
        verdict = f"no atom is used at exact codes on {n} rows: nothing to test"
    elif beyond or bias_beyond:
        parts = []
        if beyond:
            parts.append(f"{len(beyond)} atom{'s' if len(beyond) != 1 else ''} beyond {c:.1f} standard "
                         f"errors at {n} rows (worst: atom {beyond[0]}: T2 = {float(t2[beyond[0]]):.3g} = "
                         f"{float(z[beyond[0]]):.1f} standard errors, fires on {int(fire[beyond[0]])} rows)")
        if bias_beyond:
            parts.append(f"b_dec beyond {c:.1f} standard errors (|mean r| = {bias_z:.1f} standard errors)")
        verdict = "not stationary: " + "; ".join(parts)
    else:
        verdict = (f"stationary within sampling noise at {n} rows: no atom's T2 beyond {c:.1f} standard "
                   f"errors (usage-weighted T2 {_sig(t2_w)} against a noise floor of {_sig(floor_w)})")

    stats = CertificateStatistics(
        n_samples=n, alpha=alpha, threshold=c, n_tested=m, atom_rows=_np(fire).astype(np.int64),
        atom_t2=_np(t2), atom_t2_se=_np(se), atom_t2_z=_np(z), atom_t2_split=_np(split),
        t2_max=float(t2.max()) if t2.numel() else 0.0,
        t2_max_split=float(split.max()) if split.numel() else 0.0,
        t2_weighted=t2_w, noise_floor=floor_w,
        t2_median=float(t2[used].median()) if bool(used.any()) else 0.0,
        t2_se_median=float(se[used].median()) if bool(used.any()) else 0.0,
        n_beyond=len(beyond), beyond=beyond, worst_atom=worst, bias_z=bias_z,
        stationary_within_noise=not (beyond or bias_beyond), verdict=verdict, loss=loss, loss_se=loss_se,
        amortisation_gap=gap, amortisation_gap_se=gap_se, new_atom_gain_pct=gain_pct,
        heldout_gain_pct=held, heldout_gain_se_pct=held_se,
        heldout_pool_full=bool(noise.pool_full[0] or noise.pool_full[1]),
        dead_exact=dead_exact, dead_encoder_only=dead_enc, dead_exact_max_corr=dead_corr,
        n_random=n_random, n_random_used=n_random_used,
        random_max_corr_median=float(rmax.median()) if n_random else 0.0,
    )
    stats.next_steps = _next_steps(stats, sae, gap_threshold, gain_threshold)
    return stats


def _next_steps(st: CertificateStatistics, sae: Any, gap_threshold: float,
                gain_threshold: float) -> list[dict]:
    """What to do next, one entry per part of the SAE: ``{"topic", "act", "finding", "action"}``."""
    steps = []
    n = st.n_samples
    if sae is not None and st.amortisation_gap is not None:
        rel = 100 * st.amortisation_gap / sae.loss if sae.loss > 0 else 0.0
        rel_se = 100 * st.amortisation_gap_se / sae.loss if sae.loss > 0 else 0.0
        big = rel > 100 * gap_threshold and st.amortisation_gap > 3 * st.amortisation_gap_se
        steps.append({
            "topic": "encoder", "act": big,
            "finding": f"amortisation gap {rel:.2g}% ± {rel_se:.1g}% of the SAE loss",
            "action": ("the encoder is the weak part: use exact codes at inference (companion.encode "
                       "with the SAE's dictionary) or train a better encoder"
                       if big else f"none: the encoder costs less than {100 * gap_threshold:g}% of the loss"),
        })
    if st.stationary_within_noise:
        steps.append({
            "topic": "dictionary", "act": False,
            "finding": (f"T2 within sampling noise at {n} rows (usage-weighted T2 {_sig(st.t2_weighted)}, "
                        f"noise floor {_sig(st.noise_floor)})"),
            "action": ("none at this n; the noise floor falls like 1/sqrt(n): certify more rows "
                       "(from many documents) to test more finely"),
        })
    else:
        steps.append({
            "topic": "dictionary", "act": True,
            "finding": st.verdict.removeprefix("not stationary: "),
            "action": ("the dictionary is not at a stationary point: train longer, or descend from it "
                       "with companion.fit_dictionary(X, K, lam, init=D, fit_bias=True, init_bias=b_dec) "
                       "(D = sae.dictionary().D, b_dec = sae.b_dec) to a certified stationary point nearby"),
        })
    held, held_se = st.heldout_gain_pct, st.heldout_gain_se_pct
    if held > 3 * held_se and held > 100 * gain_threshold:
        steps.append({
            "topic": "width", "act": True,
            "finding": f"a new atom lowers the loss of held-out rows by {held:.2g}% ± {held_se:.1g}%",
            "action": ("the width is too small for this λ: add atoms (the new atom u of the report is "
                       "a start) or raise λ"),
        })
    else:
        steps.append({
            "topic": "width", "act": False,
            "finding": (f"new-atom gain {st.new_atom_gain_pct:.2g}% in sample, {held:.2g}% ± {held_se:.1g}% "
                        "on held-out rows" + (": within noise" if held <= 3 * held_se else
                                              f": below {100 * gain_threshold:g}% of the loss")),
            "action": "none: no added atom lowers the loss by a useful amount beyond noise at this n",
        })
    n_dead, n_enc = len(st.dead_exact), len(st.dead_encoder_only)
    rule3 = f"(a latent silent on all {n} rows may still fire on up to {3 / max(n, 1):.1g} of rows)"
    if n_enc:
        steps.append({
            "topic": "dead latents", "act": True,
            "finding": (f"{n_enc} latent{'s never fire' if n_enc != 1 else ' never fires'} in the encoder "
                        f"but {'are' if n_enc != 1 else 'is'} used by exact codes {rule3}"),
            "action": "the encoder, not the dictionary, loses them: exact codes use them; retrain the encoder",
        })
    if n_dead:
        frac = st.n_random_used / st.n_random if st.n_random else 0.0
        act = st.n_random_used > 0
        steps.append({
            "topic": "dead atoms", "act": act,
            "finding": (f"{n_dead} atom{'s' if n_dead != 1 else ''} unused at exact codes (every d.r < λ); "
                        "exact codes would use "
                        f"{st.n_random_used} of {st.n_random} random unit atoms on these rows {rule3}"),
            "action": (f"resample them: random directions do better ({frac:.0%} would be used), e.g. "
                       "toward the new atom u or the largest residuals" if act else
                       "none: at this λ no random direction would be used either; leaving them unused is optimal"),
        })
    if not n_enc and not n_dead:
        steps.append({"topic": "dead atoms", "act": False,
                      "finding": f"every atom fires on some of the {n} rows", "action": "none"})
    return steps
