"""Chapter 5 over several draws of the data: which stationary points and SAEs have the dense pair?

    python tools/antipodal_seeds.py [--draws 5] [--starts 6] [--sae-seeds 5] [--out tools/antipodal_seeds.json]

Chapter 5 runs one draw of its data (seed 0) and ``tools/antipodal_restarts.py`` many data
starts on that draw. This script repeats both on ``--draws`` draws (data seeds 0, 1, ...) at
the chapter's settings (4000 samples, six sparse features, λ = 0.3):

* for each of the three cases (symmetric, asymmetric, coupled s) the certified stationary
  point learned from the zeroth-order dictionary {f_j} ∪ {v, -v} and ``--starts`` data
  starts (``companion.fit_dictionary``, ``n_restarts=1``, seeds 0, 1, ...): loss, certificate
  (T1, T2 ≤ 1e-6), whether a dense pair codes v (``companion.find_dense_pairs``, firing
  rate ≥ 0.1, decoder cosine ≤ -0.5), and whether the start reaches or goes below the loss of
  the zeroth-order start;
* on the symmetric case, ``--sae-seeds`` vanilla SAEs with eight latents (3000 Adam steps,
  batch 256, lr 3e-3, as in the chapter): loss, dense pairs (firing rate ≥ 0.3) with their
  decoder and encoder cosines, score and rates, and the first-order prediction with a decoder
  bias (``companion.pair_centroid_prediction``) they are compared with;
* on the symmetric case, ``--sae-seeds`` SAEs with seven latents: the loss of exact codes for
  each SAE's dictionary and its dense pairs, against the loss of the shift with all six
  features (the bias at ``companion.dense_direction_costs``'s optimal shift, exact codes).

The JSON is rewritten after every draw, so an interrupted run keeps what it finished.
Chapter 5 quotes its summary.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from antipodal_restarts import CASES, LAM, N_ATOMS, N_SAMPLES, certified, dense_pairs, pair_codes_v

import companion

N_SPARSE = 6
SAE = dict(steps=3000, batch_size=256, lr=3e-3, progress=False)


def pair_on_v(fit, v) -> bool:
    """Whether a dense pair of the fit has as members the atoms closest to +v and to -v."""
    return pair_codes_v(fit, dense_pairs(fit), v)


def selection(seed: int, n_starts: int) -> dict:
    """Per case: the point learned from ±v and what the data starts reach."""
    out = {}
    for name, kw in CASES.items():
        data = companion.dense_direction_data(N_SAMPLES, N_SPARSE, seed=seed, **kw)
        v = data.dense_direction
        D0 = torch.cat([data.sparse_features, v[None], -v[None]])
        ref = companion.fit_dictionary(data.X, N_ATOMS, LAM, init=D0, tol=1e-7, progress=False)
        starts = [companion.fit_dictionary(data.X, N_ATOMS, LAM, seed=s, n_restarts=1, tol=1e-7, progress=False)
                  for s in range(n_starts)]
        out[name] = {
            "reference_loss": round(ref.loss, 8),
            "reference_certified": certified(ref),
            "reference_pair_on_v": pair_on_v(ref, v),
            "losses": [round(f.loss, 8) for f in starts],
            "n_certified": sum(certified(f) for f in starts),
            "n_pair_on_v": sum(pair_on_v(f, v) for f in starts),
            "n_reaching_reference": sum(abs(f.loss - ref.loss) <= 1e-6 for f in starts),
            "n_below_reference": sum(f.loss < ref.loss - 1e-6 for f in starts),
        }
    return out


def saes(seed: int, n_seeds: int) -> dict:
    """SAEs with eight and seven latents on the symmetric case of draw ``seed``."""
    data = companion.dense_direction_data(N_SAMPLES, N_SPARSE, seed=seed)
    Xf, s, v = data.X.float(), data.dense_value, data.dense_direction
    r_perp = data.sparse_codes.clamp(max=LAM) @ data.sparse_features
    pred = companion.pair_centroid_prediction(s, v, r_perp - r_perp.mean(0), LAM)
    eight = []
    for sd in range(n_seeds):
        res = companion.train_sae(Xf, 8, LAM, seed=sd, **SAE)
        rep = companion.find_dense_pairs(res.sae.encode(Xf), res.sae.W_dec, res.sae.W_enc)
        dense = rep.firing_rate > 0.3
        scores = torch.as_tensor(rep.antipodality.score)
        eight.append({
            "loss": round(res.final_loss, 6),
            "n_dense_latents": int(dense.sum()),
            "dense_scores_above_0_9": bool((scores[dense] > 0.9).all()),
            "pairs": [{"decoder_cosine": round(p.decoder_cosine, 4), "encoder_cosine": round(p.encoder_cosine, 4),
                       "score": round(p.score, 4), "rates": sorted([round(p.rate_first, 4), round(p.rate_second, 4)])}
                      for p in rep.pairs],
        })
    costs = companion.dense_direction_costs(s, LAM)
    D_shift = torch.cat([data.sparse_features, v[None]])
    X_shift = data.X - costs.shift * v
    L_shift = companion.joint_loss(X_shift, D_shift, companion.encode(X_shift, D_shift, LAM), LAM)
    seven = []
    for sd in range(n_seeds):
        res = companion.train_sae(Xf, 7, LAM, seed=sd, **SAE)
        Xc, D7, _ = (t.double() for t in res.sae.joint_view(Xf))
        D7 = D7 / D7.norm(dim=1, keepdim=True)
        F7 = companion.joint_loss(Xc, D7, companion.encode(Xc, D7, LAM), LAM)
        n_pairs = len(companion.find_dense_pairs(res.sae.encode(Xf), res.sae.W_dec, res.sae.W_enc).pairs)
        seven.append({"loss": round(res.final_loss, 6), "exact_code_loss": round(F7, 6), "n_pairs": n_pairs})
    return {
        "prediction": {"cosine": round(pred.cosine, 4),
                       "rates": sorted([round(pred.rate_plus, 4), round(pred.rate_minus, 4)])},
        "eight": eight,
        "shift_loss": round(L_shift, 6),
        "seven": seven,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--starts", type=int, default=6)
    parser.add_argument("--sae-seeds", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("antipodal_seeds.json")))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    companion.setup(seed=0)
    summary = {"lam": LAM, "n_samples": N_SAMPLES, "n_starts": args.starts, "n_sae_seeds": args.sae_seeds,
               "draws": []}
    for seed in range(args.draws):
        draw = {"seed": seed, "selection": selection(seed, args.starts), "saes": saes(seed, args.sae_seeds)}
        summary["draws"].append(draw)
        sel, sa = draw["selection"], draw["saes"]
        best = min(sa["eight"], key=lambda e: e["loss"])
        print(f"draw {seed}: pair on v in " + ", ".join(f"{k} {c['n_pair_on_v']}/{args.starts}" for k, c in sel.items())
              + f"; below reference {sum(c['n_below_reference'] for c in sel.values())};"
              f" best K=8 SAE pairs {[p['decoder_cosine'] for p in best['pairs']]} (predicted {sa['prediction']['cosine']});"
              f" shift {sa['shift_loss']:.4f} vs K=7 exact {min(e['exact_code_loss'] for e in sa['seven']):.4f}",
              flush=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
