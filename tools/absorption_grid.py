"""Chapter 3's absorption and splitting experiments on a larger grid (optional; runs on CPU or GPU).

    python tools/absorption_grid.py [--out DIR] [--quick] [--device cuda]

Part 1 (partial absorption): for every magnitude spread and λ of the grid, and several data
seeds, the prediction of ``companion.predict_partial_absorption`` (with its binomial standard
error) and the same ansatz solved on the very samples drawn
(``companion.predict_partial_absorption_empirical``), next to certified stationary points of
the joint problem (``companion.fit_dictionary``, best of its restarts) and vanilla SAEs with the
decoder bias held at zero. A closing summary gives, per spread and λ, the mean and spread
over seeds of the fitted rate minus each prediction.
Part 2 (splitting): the (3, 2) concept tree (root, 3 groups, 6 leaves), certified stationary
points (best of the restarts) for K = 1 .. 8 next to ``companion.predict_splitting``.

Writes ``absorption_grid.csv``, ``splitting.csv`` and ``absorption_grid.png`` into ``--out``
(default: the current directory) and prints the same tables. ``--quick`` shrinks everything
for a smoke test.

Cost of the full grid (4 spreads x 7 values of λ x 5 data seeds, N = 8000; then the tree):
11 minutes on 2 shared CPU cores under moderate load, 23 minutes under heavy load (the SAE's
3000 full-batch Adam steps, on one thread, take most of each cell). Chapter 3 quotes the committed ``absorption_grid.csv`` and
``splitting.csv`` of the run ``python tools/absorption_grid.py --out tools/absorption_grid/``.
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import companion  # noqa: E402


def train_sae_without_bias(X, n_latents, lam, seed, steps):
    """A vanilla SAE with b_dec = 0 (the joint problem's SAE), full-batch Adam, as in Chapter 3."""
    return companion.train_sae(X, n_latents, lam, steps=steps, batch_size=X.shape[0], lr=2e-2,
                               seed=seed, decoder_bias="zero", learn_decoder_bias=False,
                               progress=False).sae


def measure(data, D, Z):
    """Child atoms' mean cosine with the parent, the absorption report of the parent latent,
    and the parent atom's cosine with p (near 1 unless the dictionary has no parent atom)."""
    m = companion.match_atoms(data.directions, D)
    parent_latent, child_latents = int(m.rows_b[0]), m.rows_b[1:]
    rep = companion.absorption(data.X, D, Z, data.parent, data.has_child, parent_latent)
    return float((D[child_latents] @ data.parent).mean()), rep, float(D[parent_latent] @ data.parent)


def partial_absorption(device, quick):
    spreads = [(0.5, 1.5), (0.75, 1.25)] if quick else [(0.25, 1.75), (0.5, 1.5), (0.75, 1.25), (0.9, 1.1)]
    lams = [0.1, 0.5] if quick else [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    n = 500 if quick else 8000
    steps = 300 if quick else 3000
    out = []
    for lo, hi in spreads:
        for lam in lams:
            pred = companion.predict_partial_absorption(lam, parent_magnitude=(lo, hi), child_magnitude=(lo, hi))
            for seed in seeds:
                data = companion.parent_child(n, 3, seed=100 + seed, parent_magnitude=(lo, hi),
                                              child_magnitude=(lo, hi), device=device)
                fit = companion.fit_dictionary(data.X, 4, lam, seed=seed, progress=False)
                c = fit.certificate
                cos_opt, rep_opt, parent_opt = measure(data, fit.D, fit.Z)
                # the same ansatz on these very samples: no sampling error left in the comparison
                same = companion.hierarchy.predict_partial_absorption_empirical(
                    data.a[data.has_child], data.b[data.has_child], lam)
                n_child = int(data.has_child.sum())
                sae = train_sae_without_bias(data.X, 4, lam, seed, steps=steps)
                Xc, D_sae, Z_sae = sae.joint_view(data.X)
                cos_sae, rep_sae, parent_sae = measure(data, D_sae, Z_sae)
                row = dict(spread=f"U[{lo}, {hi}]", lam=lam, seed=seed,
                           pred_rate=pred.absorption_rate,
                           pred_rate_se=(pred.absorption_rate * (1 - pred.absorption_rate) / n_child) ** 0.5,
                           same_rate=same.absorption_rate, same_cos=same.cos_theta,
                           opt_rate=rep_opt.main_silent_rate,
                           sae_rate=rep_sae.main_silent_rate, pred_cos=pred.cos_theta, opt_cos=cos_opt,
                           sae_cos=cos_sae, opt_parent_cos=parent_opt, sae_parent_cos=parent_sae, opt_full=rep_opt.full_absorption_rate,
                           opt_fraction=rep_opt.mean_absorption_fraction,
                           opt_loss=fit.loss, sae_loss=sae.loss(data.X, lam).item(), n_child=n_child,
                           t1=c.t1_violation, t2=c.t2_violation, gap=c.duality_gap)
                out.append(row)
                print(f"{row['spread']:14s} λ={lam:.2f} seed={seed}  rate pred {row['pred_rate']:.3f} "
                      f"(±{row['pred_rate_se']:.3f}) same-sample {row['same_rate']:.3f} "
                      f"opt {row['opt_rate']:.3f} SAE {row['sae_rate']:.3f}   cos pred {row['pred_cos']:.3f} "
                      f"opt {row['opt_cos']:.3f} SAE {row['sae_cos']:.3f}   T1 {c.t1_violation:.1e} "
                      f"T2 {c.t2_violation:.1e} gap {c.duality_gap:.1e}", flush=True)
    return out


def splitting(device, quick):
    lam = 0.3
    branching = (2, 2) if quick else (3, 2)
    tree = companion.concept_tree(400 if quick else 3000, branching, seed=0, noise_std=0.02, device=device)
    n_leaves = len(tree.leaves)
    groups = tree.sibling_unions()
    out = []
    for K in range(1, n_leaves + 3):
        fit = companion.fit_dictionary(tree.X, K, lam, n_restarts=2 if quick else 5, seed=0, progress=False)
        row = dict(K=K, loss=fit.loss, t1=fit.certificate.t1_violation, t2=fit.certificate.t2_violation,
                   gap=fit.certificate.duality_gap, pred_loss=float("nan"), pred_blocks="",
                   follows_tree="", min_cos=float("nan"))
        if K <= n_leaves:
            p = companion.predict_splitting(tree, lam, K)
            row.update(pred_loss=p.loss, pred_blocks=str(p.blocks),
                       follows_tree=all(b in groups for b in p.blocks),
                       min_cos=companion.match_atoms(p.D, fit.D).min_cosine)
        out.append(row)
        print(f"K={K}  loss {fit.loss:.5f}  predicted {row['pred_loss']:.5f}  min cos {row['min_cos']:.3f}  "
              f"{row['pred_blocks']}  T1 {row['t1']:.1e} T2 {row['t2']:.1e} gap {row['gap']:.1e}", flush=True)
    return out


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def figure(rows, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    spreads = sorted({r["spread"] for r in rows})
    for i, spread in enumerate(spreads):
        mine = [r for r in rows if r["spread"] == spread]
        lams = sorted({r["lam"] for r in mine})
        for ax, key in zip(axes, ("rate", "cos")):
            pred = [np.mean([r[f"pred_{key}"] for r in mine if r["lam"] == l]) for l in lams]
            ax.plot(lams, pred, color=f"C{i}", label=f"prediction, {spread}")
            ax.plot([r["lam"] for r in mine], [r[f"opt_{key}"] for r in mine], "o", color=f"C{i}")
            ax.plot([r["lam"] for r in mine], [r[f"sae_{key}"] for r in mine], "x", color=f"C{i}")
    axes[0].set(xlabel="λ", ylabel="P(parent latent silent | child present)")
    axes[1].set(xlabel="λ", ylabel="cos(child atom, p)")
    axes[0].legend(fontsize=7)
    fig.suptitle("prediction (lines), certified stationary points (o), SAEs with b_dec = 0 (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = companion.setup(seed=0, device=args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = partial_absorption(device, args.quick)
    write_csv(rows, out / "absorption_grid.csv")
    figure(rows, out / "absorption_grid.png")
    write_csv(splitting(device, args.quick), out / "splitting.csv")
    summary(rows)


def summary(rows):
    """Per spread and λ, over seeds: fit − population and fit − same-sample prediction (mean ±
    sd), and for the SAEs that end near the fit (loss within 1% of it) their rate minus the fit's
    and their child cosine minus the prediction (mean), with how many SAEs stopped further away
    (most of those have no atom along p)."""
    print("\nspread          λ     fit − population   fit − same-sample   SAE − fit rate   SAE − pred cos   "
          "SAEs > 1% above the fit")
    for spread in sorted({r["spread"] for r in rows}):
        for lam in sorted({r["lam"] for r in rows if r["spread"] == spread}):
            mine = [r for r in rows if r["spread"] == spread and r["lam"] == lam]
            dp = np.array([r["opt_rate"] - r["pred_rate"] for r in mine])
            ds = np.array([r["opt_rate"] - r["same_rate"] for r in mine])
            kept = [r for r in mine if r["sae_loss"] <= 1.01 * r["opt_loss"]]
            sae_rate = np.mean([r["sae_rate"] - r["opt_rate"] for r in kept]) if kept else float("nan")
            sae_cos = np.mean([r["sae_cos"] - r["pred_cos"] for r in kept]) if kept else float("nan")
            sd = (lambda v: v.std(ddof=1) if len(v) > 1 else float("nan"))
            print(f"{spread:14s} {lam:.2f}   {dp.mean():+.3f} ± {sd(dp):.3f}     {ds.mean():+.3f} ± {sd(ds):.3f}"
                  f"      {sae_rate:+.3f}           {sae_cos:+.3f}            {len(mine) - len(kept)} of {len(mine)}")


if __name__ == "__main__":
    main()
