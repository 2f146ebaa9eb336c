"""Chapter 5's dense-pair experiment from data: which stationary points do random data starts reach?

    python tools/antipodal_restarts.py [--draws 5] [--starts 20] [--out tools/antipodal_restarts.json]

(a few minutes on two CPU cores). For each draw of the data (seeds 0, 1, ...; draw 0 is the
chapter's) and each of the chapter's three cases (symmetric, asymmetric and coupled dense value
s, at λ = 0.3, K = 8, 4000 samples, six sparse features), the script learns one certified
stationary point from the zeroth-order dictionary {f_j} ∪ {v, -v} (the start the chapter's
comparison table uses) and one from each of ``--starts`` data starts
(``companion.fit_dictionary`` with ``n_restarts=1``, ``init="data"``, seeds 0, 1, ...). For
every point it records

* the loss and whether it is certified (T1, T2 ≤ 1e-6);
* the dense pairs that ``companion.find_dense_pairs`` reports (two atoms that are each other's
  antipodality partner, decoder cosine ≤ -0.5, one of them firing on ≥ 10% of the samples);
* whether one of them codes v (its members are the atoms closest to +v and to -v), and if so
  that pair's decoder cosine and the angles (degrees) of its members from +v and -v;
* whether it reaches (within 1e-6) or goes below the loss of the point from ±v.

Which stationary point a data start reaches can change with the last bits of the arithmetic
(another CPU, thread count or BLAS kernel), so Chapter 5 quotes only summaries over all draws
and starts (fractions with their binomial standard errors), which it reads from this JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import torch

import companion

CASES = {"symmetric": {}, "asymmetric": {"dense_range": (-0.6, 1.4)}, "coupled": {"coupling": 0.5}}
LAM, N_ATOMS, N_SAMPLES, N_SPARSE = 0.3, 8, 4000, 6


def certified(fit) -> bool:
    """T1 and T2 within 1e-6 at the fit's exact codes."""
    c = fit.certificate
    return bool(c.t1_violation <= 1e-6 and c.t2_violation <= 1e-6)


def dense_pairs(fit):
    """The fit's dense pairs (firing rate >= 0.1, decoder cosine <= -0.5)."""
    return companion.find_dense_pairs(fit.Z, fit.D, min_rate=0.1).pairs


def pair_on_v(fit, pairs, v):
    """The dense pair of ``pairs`` whose members are the atoms closest to +v and -v, or None."""
    v = v.to(fit.D)
    ends = {int((fit.D @ v).argmax()), int((fit.D @ v).argmin())}
    return next((p for p in pairs if {p.first, p.second} == ends), None)


def pair_codes_v(fit, pairs, v) -> bool:
    """Whether one of the dense ``pairs`` of the fit has as members the atoms closest to +v and -v."""
    return pair_on_v(fit, pairs, v) is not None


def describe(fit, data, reference_loss=None):
    """Loss, certificate and dense pairs of one fit, as plain JSON values."""
    pairs = dense_pairs(fit)
    v = data.dense_direction.to(fit.D)
    p = pair_on_v(fit, pairs, v)
    out = {
        "loss": round(fit.loss, 8),
        "certified": certified(fit),
        "n_dense_pairs": len(pairs),
        "pair_on_v": p is not None,
        "pair_cosine": None if p is None else round(p.decoder_cosine, 4),
        # angles of the pair's members from +v and from -v
        "pair_bends": None if p is None else sorted(
            round(math.degrees(math.acos(min(1.0, abs(float(fit.D[k] @ v))))), 2) for k in (p.first, p.second)),
    }
    if reference_loss is not None:
        out["reaches_reference"] = bool(abs(fit.loss - reference_loss) <= 1e-6)
        out["below_reference"] = bool(fit.loss < reference_loss - 1e-6)
    return out


def draw(seed: int, n_starts: int) -> dict:
    """Per case: the point learned from ±v and the points the data starts reach, on draw ``seed``."""
    out = {}
    for name, kw in CASES.items():
        data = companion.dense_direction_data(N_SAMPLES, N_SPARSE, seed=seed, **kw)
        D0 = torch.cat([data.sparse_features, data.dense_direction[None], -data.dense_direction[None]])
        ref = companion.fit_dictionary(data.X, N_ATOMS, LAM, init=D0, tol=1e-7, progress=False)
        starts = [describe(companion.fit_dictionary(data.X, N_ATOMS, LAM, seed=s, n_restarts=1,
                                                    tol=1e-7, progress=False), data, ref.loss)
                  for s in range(n_starts)]
        out[name] = {"from_zeroth_order": describe(ref, data), "from_data": starts}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("antipodal_restarts.json")))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    companion.setup(seed=0)
    summary = {"lam": LAM, "n_atoms": N_ATOMS, "n_samples": N_SAMPLES, "n_starts": args.starts, "draws": []}
    for seed in range(args.draws):
        cases = draw(seed, args.starts)
        summary["draws"].append({"seed": seed, "cases": cases})
        print(f"draw {seed}: " + "; ".join(
            f"{name} pair on v {sum(s['pair_on_v'] for s in c['from_data'])}/{args.starts},"
            f" reach {sum(s['reaches_reference'] for s in c['from_data'])},"
            f" below {sum(s['below_reference'] for s in c['from_data'])}" for name, c in cases.items()), flush=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
