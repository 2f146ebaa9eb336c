"""Chapter 5's SAEs over several draws of the data and seeds: where does training end?

    python tools/antipodal_seeds.py [--draws 5] [--sae-seeds 8] [--out tools/antipodal_seeds.json]

(a few minutes on two CPU cores). Chapter 5 trains three SAEs on one draw of its symmetric
data (seed 0). This script trains ``--sae-seeds`` SAEs (seeds 0, 1, ...) on each of ``--draws``
draws (data seeds 0, 1, ...; draw 0 is the chapter's), at the chapter's settings (4000
samples, six sparse features, λ = 0.3, 3000 Adam steps, batch 256, lr 3e-3):

* SAEs with eight latents: loss, dense latents (firing rate > 0.3) and whether all of them
  score above 0.9, the dense pairs (``companion.find_dense_pairs``) with their decoder and
  encoder cosines, score and rates, and how many of the six sparse features have a decoder row
  within cosine 0.9 of them; and the first-order prediction with a decoder bias
  (``companion.pair_centroid_prediction``) they are compared with;
* SAEs with seven latents: the loss of exact codes for each SAE's dictionary, with the SAE's
  own decoder bias and with the optimal bias for that dictionary (:func:`optimal_bias_loss`),
  and its dense pairs;
* the atom budget at K = 7 without training, exact codes throughout: the shift and all six
  features ({f_j} ∪ {v}) with the bias at ``companion.dense_direction_costs``'s shift along v
  and with the optimal bias; the pair and five features ({f_j, j ≠ i} ∪ {v, -v}, the best
  dropped feature i) without a bias and with the optimal bias.

The JSON is rewritten after every draw, so an interrupted run keeps what it finished.
Chapter 5 quotes summaries over all draws and seeds.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from antipodal_restarts import LAM, N_SAMPLES, N_SPARSE

import companion

SAE = dict(steps=3000, batch_size=256, lr=3e-3, progress=False)


def optimal_bias_loss(X, D, b, lam, tol=1e-12, max_iter=1000):
    """The joint loss of ``D`` with exact codes and the best bias b (data X - b), from the bias ``b``.

    For a fixed D the loss is jointly convex in (b, Z); exact minimisation in Z (``encode``)
    and in b (the mean residual) in turn converges to its minimum. Stops when a round lowers
    the loss by at most ``tol``. Returns (loss, b).
    """
    prev = None
    for _ in range(max_iter):
        Z = companion.encode(X - b, D, lam)
        loss = companion.joint_loss(X - b, D, Z, lam)
        b = (X - Z @ D).mean(0)
        if prev is not None and prev - loss <= tol:
            break
        prev = loss
    return loss, b


def features_coded(W_dec, F) -> int:
    """How many of the sparse features (rows of F) have a decoder row within cosine 0.9."""
    D = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(F)
    return int(((F @ D.T).max(dim=1).values >= 0.9).sum())


def budget(data) -> dict:
    """Losses of the shift with six features and of the pair with five, exact codes (see the docstring)."""
    X, F, v = data.X, data.sparse_features, data.dense_direction
    costs = companion.dense_direction_costs(data.dense_value, LAM)
    D_shift = torch.cat([F, v[None]])
    b_shift = costs.shift * v
    shift = companion.joint_loss(X - b_shift, D_shift, companion.encode(X - b_shift, D_shift, LAM), LAM)
    shift_bias, _ = optimal_bias_loss(X, D_shift, b_shift, LAM)
    pair, pair_bias = [], []
    for i in range(N_SPARSE):
        D_pair = torch.cat([F[[j for j in range(N_SPARSE) if j != i]], v[None], -v[None]])
        pair.append(companion.joint_loss(X, D_pair, companion.encode(X, D_pair, LAM), LAM))
        pair_bias.append(optimal_bias_loss(X, D_pair, torch.zeros_like(v), LAM)[0])
    return {"shift_loss": round(shift, 6), "shift_loss_optimal_bias": round(shift_bias, 6),
            "pair_five_loss": round(min(pair), 6), "pair_five_loss_optimal_bias": round(min(pair_bias), 6)}


def saes(seed: int, n_seeds: int) -> dict:
    """SAEs with eight and seven latents on the symmetric case of draw ``seed``, and the K = 7 budget."""
    data = companion.dense_direction_data(N_SAMPLES, N_SPARSE, seed=seed)
    Xf, s, v, F = data.X.float(), data.dense_value, data.dense_direction, data.sparse_features
    r_perp = data.sparse_codes.clamp(max=LAM) @ F
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
            "n_features_coded": features_coded(res.sae.W_dec.detach(), F),
            "pairs": [{"decoder_cosine": round(p.decoder_cosine, 4), "encoder_cosine": round(p.encoder_cosine, 4),
                       "score": round(p.score, 4), "rates": sorted([round(p.rate_first, 4), round(p.rate_second, 4)])}
                      for p in rep.pairs],
        })
    seven = []
    for sd in range(n_seeds):
        res = companion.train_sae(Xf, 7, LAM, seed=sd, **SAE)
        Xc, D7, _ = (t.double() for t in res.sae.joint_view(Xf))
        D7 = D7 / D7.norm(dim=1, keepdim=True)
        F7 = companion.joint_loss(Xc, D7, companion.encode(Xc, D7, LAM), LAM)
        F7_bias, _ = optimal_bias_loss(data.X, D7, res.sae.b_dec.detach().double(), LAM)
        n_pairs = len(companion.find_dense_pairs(res.sae.encode(Xf), res.sae.W_dec, res.sae.W_enc).pairs)
        seven.append({"loss": round(res.final_loss, 6), "exact_code_loss": round(F7, 6),
                      "exact_code_loss_optimal_bias": round(F7_bias, 6), "n_pairs": n_pairs,
                      "n_features_coded": features_coded(res.sae.W_dec.detach(), F)})
    return {
        "prediction": {"cosine": round(pred.cosine, 4),
                       "rates": sorted([round(pred.rate_plus, 4), round(pred.rate_minus, 4)])},
        "eight": eight,
        "seven": seven,
        **budget(data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--sae-seeds", type=int, default=8)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("antipodal_seeds.json")))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    companion.setup(seed=0)
    summary = {"lam": LAM, "n_samples": N_SAMPLES, "n_sae_seeds": args.sae_seeds, "draws": []}
    for seed in range(args.draws):
        sa = saes(seed, args.sae_seeds)
        summary["draws"].append({"seed": seed, "saes": sa})
        print(f"draw {seed}: K=8 SAEs with every dense latent scoring > 0.9:"
              f" {sum(e['dense_scores_above_0_9'] for e in sa['eight'])}/{args.sae_seeds}"
              f" (losses {sorted(e['loss'] for e in sa['eight'])});"
              f" shift {sa['shift_loss']:.4f} / optimal bias {sa['shift_loss_optimal_bias']:.4f},"
              f" pair + five {sa['pair_five_loss']:.4f} / {sa['pair_five_loss_optimal_bias']:.4f},"
              f" K=7 SAEs (exact codes, optimal bias) from"
              f" {min(e['exact_code_loss_optimal_bias'] for e in sa['seven']):.4f}", flush=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
