"""Chapter 7's SAE sweep over training length and seeds, and a null for dense antipodal pairs.

    python tools/digits_sweep.py [--seeds 3] [--steps 1000 4000 12000] [--widths 4 8 16 32 64]
                                 [--penalties 1 0.5] [--stationary] [--out tools/digits_sweep.json]
    python tools/digits_sweep.py --fits [--seeds 3] [--out tools/digits_sweep.json]

Chapter 7 quotes three runs: ``--penalties 1 --widths 16 64`` (training length) written to
``tools/digits_sweep.json``; ``--penalties 0.5 --widths 8 16 --steps 12000 --stationary``
(dense pairs and their null) written to ``tools/digits_pairs.json``; and ``--fits --seeds 3``
(the chapter's study over SAE seeds), which adds the key ``"fits"`` to
``tools/digits_sweep.json`` and leaves the rest of that file as it is.

Part 1 (training length): on the hidden activations of ``companion.digits.digits_activations``
(seed 0), for λ ∈ {1, 0.5}, widths K ∈ {4, 8, 16, 32, 64}, SAE seeds 0, 1, ... and each
number of Adam steps, ``companion.digits.study_sae`` (without the descent) gives the SAE
loss L(D, Z_SAE), the loss F(D) of exact codes for its dictionary and the relative
amortisation gap (L - F) / L.

Part 2 (dense pairs and their null), at the longest training: for every SAE, the fraction of
its atom pairs with decoder cosine ≤ -0.5, its dense pairs (``companion.find_dense_pairs``:
mutual antipodality partners firing on ≥ 30% of samples) and the largest antipodality score
of Sun et al.; the same decoder statistics for two dictionaries of the same size that no
sparse-coding objective shaped, each with exact codes on the SAE's centred data: random
Gaussian unit atoms, and the normalised k-means centroids (scikit-learn, seeded); and for
certified stationary points of the joint problem learned from data starts
(``companion.fit_dictionary``, ``init="data"``) at λ = 1, K = 8 and 16 (with ``--stationary``).

Part 3 (``--fits``: the chapter's study over SAE seeds), at 12000 steps: for every width
and penalty and SAE seeds 0, 1, ..., ``study_sae`` (with the descent at λ = 1) gives the rungs
of the ladder, the SAE's certificates (T1 of its codes over λ, T2 and the new-atom gain of
exact codes for its dictionary) and, at λ = 1, for the certified stationary point reached from
it: the dictionary gap over the amortisation gap, its Huber gap over its loss, its label
purity, the rate at which each group's main latent is silent while the group is present
(absorption, for the point and for the SAE, at K ≤ 16), the held-out R² of its exact-code
residual on the input, and the matching of its atoms with those of the point at 2K of the
same seed (K = 4, 8). The chapter computes all of these for seed 0; the seeds give their
spread.

The JSON is rewritten after every setting, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
from sklearn.cluster import KMeans

import companion
from companion.absorption import absorption
from companion.digits import class_groups, digits_activations, label_purity, study_sae
from companion.matching import match_atoms
from companion.residuals import linear_predictability, split_residuals

WIDTHS, PENALTIES = (4, 8, 16, 32, 64), (1.0, 0.5)


def pair_stats(D, Z, W_enc=None):
    """Decoder-cosine statistics and dense pairs of a dictionary with its codes."""
    Dn = D / D.norm(dim=1, keepdim=True)
    cos = (Dn @ Dn.T).cpu().numpy()
    iu = np.triu_indices(cos.shape[0], 1)
    rep = companion.find_dense_pairs(Z, D, W_enc)
    out = {
        "n_atom_pairs": int(len(iu[0])),
        "n_cos_below_-0.5": int((cos[iu] <= -0.5).sum()),
        "n_dense_pairs": len(rep.pairs),
        "dense_pair_cosines": [round(p.decoder_cosine, 3) for p in rep.pairs],
    }
    if W_enc is not None:
        out["max_score"] = round(float(torch.as_tensor(rep.antipodality.score).max()), 3)
    return out


def silent_rates(X, D, Z, labels, groups):
    """Per group of classes: P(main latent silent | group present), as in Chapter 7."""
    rates = []
    for members in groups:
        present = torch.isin(labels, torch.tensor(members, device=labels.device))
        v = X[present].mean(0)
        main = int((D @ (v / v.norm())).argmax())
        rates.append(round(absorption(X, D, Z, v, present, main).main_silent_rate, 5))
    return rates


def fits(args, A, labels, out: pathlib.Path) -> None:
    """Part 3: the chapter's study of every SAE, over SAE seeds (added to ``out`` as "fits")."""
    summary = json.loads(out.read_text()) if out.exists() else {}
    done = 0
    if args.resume and "fits" in summary:     # keep the seeds that were finished (splits written)
        done = len({r["seed"] for r in summary["fits"]["splits"] if r["K"] == 8})
        old = summary["fits"]
    summary["fits"] = {"steps": max(args.steps), "n_seeds": args.seeds, "widths": list(WIDTHS),
                       "penalties": list(PENALTIES), "runs": [], "splits": []}
    if done:
        summary["fits"]["runs"] = [r for r in old["runs"] if r["seed"] < done]
        summary["fits"]["splits"] = [r for r in old["splits"] if r["seed"] < done]
    groups = class_groups(A, labels, 3)
    summary["fits"]["groups"] = groups
    for seed in range(done, args.seeds):
        points = {}
        for lam in PENALTIES:
            for K in WIDTHS:
                s = study_sae(A, K, lam, steps=max(args.steps), seed=seed, fit=(lam == 1.0))
                c, e = s.certificate.sae_codes, s.certificate.exact_codes
                rec = {"lam": lam, "K": K, "seed": seed, "sae_loss": round(s.sae_loss, 5),
                       "exact_loss": round(s.exact_loss, 5), "huber": round(s.huber, 5),
                       "relative_gap": round(s.certificate.relative_amortisation_gap, 5),
                       "t1_over_lam": round(c.t1_violation / lam, 5), "t2": round(e.t2_violation, 5),
                       "new_atom_gain": round(e.new_atom_gain, 6),
                       "dead_sae": len(c.dead_atoms), "dead_exact": len(e.dead_atoms)}
                if s.fit is not None:
                    f = s.fit.certificate
                    split = split_residuals(s.X, s.fit.D, s.fit.Z, lam)
                    rec.update({
                        "fit_loss": round(s.fit.loss, 5),
                        "certified": bool(f.t1_violation <= 1e-6 and f.t2_violation <= 1e-6),
                        "dict_share": round((s.exact_loss - s.fit.loss) / (s.sae_loss - s.exact_loss), 5),
                        "huber_frac": round(f.huber_gap / s.fit.loss, 5),
                        "dead_fit": len(f.dead_atoms),
                        "purity": round(label_purity(s.fit.Z, labels), 5),
                        "r2_point": round(linear_predictability(s.X, split.residual).vector_r2, 5),
                        "r2_sae": round(linear_predictability(s.X, s.X - s.Z @ s.D).vector_r2, 5),
                    })
                    if K <= 16:
                        rec["absorb_point"] = silent_rates(s.X, s.fit.D, s.fit.Z, labels, groups)
                        rec["absorb_sae"] = silent_rates(s.X, s.D, s.Z, labels, groups)
                    points[K] = s.fit
                summary["fits"]["runs"].append(rec)
                out.write_text(json.dumps(summary, indent=1) + "\n")
                print(rec, flush=True)
        for K in (4, 8):
            m = match_atoms(points[K].D, points[2 * K].D)
            parent = m.nearest_b
            inside = np.mean([float((points[K].Z[points[2 * K].Z[:, j] > 0, parent[j]] > 0).double().mean())
                              for j in range(2 * K)])
            summary["fits"]["splits"].append({
                "K": K, "seed": seed, "mean_cosine": round(m.mean_cosine, 5),
                "min_cosine": round(m.min_cosine, 5), "inside": round(float(inside), 5),
                "n_split": int((np.bincount(parent, minlength=K) >= 2).sum())})
            print(summary["fits"]["splits"][-1], flush=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 4000, 12000])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--penalties", type=float, nargs="+", default=list(PENALTIES))
    parser.add_argument("--stationary", action="store_true")
    parser.add_argument("--fits", action="store_true",
                        help="only part 3 (the chapter's study over seeds), added to --out")
    parser.add_argument("--resume", action="store_true",
                        help="with --fits: keep the seeds an interrupted run finished, compute the rest")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("digits_sweep.json")))
    args = parser.parse_args()
    companion.setup(seed=0)
    digits = digits_activations(seed=0, hidden=32)
    A = digits.activations
    out = pathlib.Path(args.out)
    if args.fits:
        fits(args, A, digits.labels, out)
        return
    summary = {"steps": args.steps, "n_seeds": args.seeds, "widths": args.widths,
               "penalties": args.penalties, "training": [], "pairs": [], "stationary_from_data": []}
    longest = max(args.steps)
    for lam in args.penalties:
        for K in args.widths:
            for seed in range(args.seeds):
                for steps in args.steps:
                    s = study_sae(A, K, lam, steps=steps, seed=seed, fit=False)
                    summary["training"].append({
                        "lam": lam, "K": K, "seed": seed, "steps": steps,
                        "sae_loss": round(s.sae_loss, 5), "exact_loss": round(s.exact_loss, 5),
                        "relative_gap": round(s.certificate.relative_amortisation_gap, 5),
                    })
                    if steps != longest:
                        continue
                    g = companion.generator(1000 + seed)
                    R = torch.randn(K, A.shape[1], generator=g, dtype=s.X.dtype).to(s.X.device)
                    R = R / R.norm(dim=1, keepdim=True)
                    km = KMeans(K, n_init=4, random_state=seed).fit(s.X.cpu().numpy()).cluster_centers_
                    Dk = torch.as_tensor(km, dtype=s.X.dtype, device=s.X.device)
                    Dk = Dk / Dk.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    summary["pairs"].append({
                        "lam": lam, "K": K, "seed": seed,
                        "sae": pair_stats(s.sae.W_dec.detach(), s.Z, s.sae.W_enc.detach()),
                        "random": pair_stats(R, companion.encode(s.X, R, lam)),
                        "kmeans": pair_stats(Dk, companion.encode(s.X, Dk, lam)),
                    })
                    out.write_text(json.dumps(summary, indent=1) + "\n")
            last = [r for r in summary["training"] if r["lam"] == lam and r["K"] == K]
            print(f"λ={lam:g} K={K:>2}: " + "  ".join(
                f"{st} steps: SAE loss {np.mean([r['sae_loss'] for r in last if r['steps'] == st]):.3f}, "
                f"gap {np.mean([r['relative_gap'] for r in last if r['steps'] == st]):.3f}"
                for st in args.steps), flush=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    if not args.stationary:
        return
    Xc = A - A.mean(0)
    for K in (8, 16):
        for seed in range(args.seeds):
            fit = companion.fit_dictionary(Xc, K, 1.0, seed=seed, n_restarts=1, tol=1e-6, progress=False)
            c = fit.certificate
            summary["stationary_from_data"].append({
                "lam": 1.0, "K": K, "seed": seed, "loss": round(fit.loss, 5),
                "certified": bool(c.t1_violation <= 1e-6 and c.t2_violation <= 1e-6),
                **pair_stats(fit.D, fit.Z),
            })
            out.write_text(json.dumps(summary, indent=1) + "\n")
    print("stationary points from data:", [(r["K"], r["n_dense_pairs"], r["n_cos_below_-0.5"])
                                          for r in summary["stationary_from_data"]])


if __name__ == "__main__":
    main()
