"""Chapter 6's regularisation path on the concept tree, over several data seeds.

    python tools/concept_path_seeds.py [--seeds 5] [--out tools/concept_path_seeds.json]

For each data seed, the (3, 2) concept tree with 48 samples (``companion.concept_tree``), the
candidates of the chapter (normalised samples plus 300 normalised pairwise sums) and the path
``companion.convex.convex_path`` at μ/μ_max = 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0 at λ = 0.2.
Records the atoms used, the adjusted Rand index of each categorisation against the
ground-truth groups and leaves, and the nested fraction of each partition in the previous
one. Chapter 6 runs seed 0 and quotes the spread over seeds from the JSON this writes
(rewritten after every seed, so an interrupted run keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from sklearn.metrics import adjusted_rand_score

import companion
from companion import convex

LAM, FRACTIONS = 0.2, [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0]


def one_seed(seed: int) -> dict:
    """The path and its categorisations for one draw of the tree."""
    tree = companion.concept_tree(48, (3, 2), seed=seed)
    X = tree.X
    C = convex.combine_candidates(convex.normalised_data(X), convex.pairwise_sums(X, 300, seed=1))
    mu_top = convex.mu_max(X, C, LAM)
    path = convex.convex_path(X, C, LAM, [f * mu_top for f in FRACTIONS])
    parts = [convex.categorisation(fit) for fit in path.fits]
    leaf = tree.leaf.cpu().numpy()
    group = np.asarray(tree.parent)[leaf]
    return {
        "seed": seed,
        "n_used": [int(n) for n in path.n_used],
        "all_converged": bool(all(f.converged for f in path.fits)),
        "ari_group": [round(float(adjusted_rand_score(group, p)), 4) for p in parts],
        "ari_leaf": [round(float(adjusted_rand_score(leaf, p)), 4) for p in parts],
        "nested": [round(float(convex.nested_fraction(parts[i], parts[i - 1])), 4) for i in range(1, len(parts))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("concept_path_seeds.json")))
    args = parser.parse_args()
    companion.setup(seed=0)
    summary = {"lam": LAM, "fractions": FRACTIONS, "seeds": []}
    for seed in range(args.seeds):
        summary["seeds"].append(one_seed(seed))
        r = summary["seeds"][-1]
        print(f"seed {seed}: atoms {r['n_used']}  ARI groups {r['ari_group'][:3]}  "
              f"ARI leaves {r['ari_leaf'][:3]}  nested {r['nested'][:3]}", flush=True)
        pathlib.Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
