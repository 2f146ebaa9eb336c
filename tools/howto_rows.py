"""The how-to's row-count measurement: one SAELens SAE on MiniLM, certified on 4k to 65k held-out tokens.

A certificate on n rows measures the sample as well as the SAE: the largest T2 over
atoms falls as n grows because the atoms that set it fire on a handful of rows. This script
measures how every summary of :func:`companion.interop.certify_checkpoint` behaves with n, for
the how-to page (``book/howto_certify.md`` loads ``tools/howto_rows.json``):

1. activations: ``companion.lm.lm_activations(layer=3, max_tokens=120000, seed=0)`` (block 3 of
   the bundled MiniLM on Python's documentation; the texts hold about 96k tokens). Documents
   are split: the first 30000 tokens of the first 60% of documents train, every other token
   (about 65.8k, from the remaining documents mostly) is held out;
2. an SAE: ``companion.lm.train_saelens_sae`` (SAELens' ``StandardTrainingSAE``, d_sae 768,
   λ = 1, i.e. ``l1_coefficient`` 2), 4000 steps of 256 tokens, learning rate 3e-3, seed 0;
   SAELens writes the checkpoint;
3. the certificate, ``certify_checkpoint`` in float64 (λ from the checkpoint) on a uniform
   random sample of 4096 and 16384 held-out rows (seed 0) and on all of them.

Each stage is cached under ``--work``. On two shared CPU cores: activations about 1 minute,
training about 8 minutes, the three certificates a few minutes.

    python tools/howto_rows.py [--work /tmp/howto_rows] [--out tools/howto_rows.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (4096, 16384, None)
K, LAM, STEPS, BATCH, LR, N_TRAIN = 768, 1.0, 4000, 256, 3e-3, 30000


def activations(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    from companion.lm import lm_activations

    train, held = work / "train30k.npy", work / "heldout.npy"
    if train.exists() and held.exists():
        return train, held
    a = lm_activations(layer=3, max_tokens=120000, seed=0, device="cpu", progress=True)
    X, doc = a.X.numpy(), a.doc.numpy()
    first = doc <= int(doc.max() * 0.6)
    Xtr, rest = X[first], X[first][N_TRAIN:]
    np.save(train, Xtr[:N_TRAIN])
    np.save(held, np.concatenate([rest, X[~first]]))
    return train, held


def sae(work: pathlib.Path, train: pathlib.Path) -> tuple[pathlib.Path, dict]:
    from companion.lm import train_saelens_sae

    path, info = work / "sae", work / "sae_train.json"
    if (path / "cfg.json").exists() and info.exists():
        return path, json.loads(info.read_text())
    t = time.time()
    run = train_saelens_sae(torch.from_numpy(np.load(train)), K, LAM, path, steps=STEPS, batch_size=BATCH,
                            lr=LR, seed=0, device="cpu", progress=True)
    h = run.loss_history
    rec = {"steps": STEPS, "batch_size": BATCH, "lr": LR, "seconds": round(time.time() - t, 1),
           "loss_first_100": float(np.mean(h[:100])), "loss_last_200": float(np.mean(h[-200:])),
           "loss_previous_200": float(np.mean(h[-400:-200]))}
    info.write_text(json.dumps(rec, indent=2) + "\n")
    return path, rec


def summarise(cert, seconds: float) -> dict:
    st, e, s = cert.statistics, cert.exact_codes, cert.sae_codes
    worst = st.worst_atom
    return {
        "n_rows": st.n_samples, "seconds": round(seconds, 1),
        "t2_max": e.t2_violation, "t2_median": st.t2_median, "t2_weighted": st.t2_weighted,
        "noise_floor": st.noise_floor, "t2_se_median": st.t2_se_median, "t2_max_split": st.t2_max_split,
        "rows_of_t2_max_atom": int(np.asarray(st.atom_rows)[int(np.nanargmax(np.asarray(st.atom_t2)))]),
        "threshold": st.threshold, "n_beyond": st.n_beyond, "n_used": int((np.asarray(st.atom_rows) > 0).sum()),
        "worst_atom": worst, "worst_z": None if worst is None else float(np.asarray(st.atom_t2_z)[worst]),
        "worst_rows": None if worst is None else int(np.asarray(st.atom_rows)[worst]),
        "bias_z": st.bias_z, "stationary_within_noise": st.stationary_within_noise, "verdict": st.verdict,
        "new_atom_gain_pct": st.new_atom_gain_pct, "heldout_gain_pct": st.heldout_gain_pct,
        "heldout_gain_se_pct": st.heldout_gain_se_pct,
        "gap_pct": 100 * cert.relative_amortisation_gap,
        "gap_se_pct": 100 * st.amortisation_gap_se / s.loss,
        "t1_sae_lam": s.t1_violation_lam, "l0_sae": s.l0, "l0_exact": e.l0,
        "dead_sae": len(s.dead_atoms), "dead_exact": len(st.dead_exact),
        "dead_encoder_only": len(st.dead_encoder_only), "random_used": st.n_random_used,
        "n_random": st.n_random, "next_steps": st.next_steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/howto_rows")
    ap.add_argument("--out", default=str(ROOT / "tools" / "howto_rows.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, held = activations(work)
    path, training = sae(work, train)
    from companion.interop import certify_checkpoint, open_activations

    A = open_activations(held)
    results = []
    for size in SIZES:
        rows = None if size is None else np.sort(np.random.default_rng(0).choice(A.shape[0], size, replace=False))
        t = time.time()
        cert = certify_checkpoint(path, A, rows=rows, device="cpu", progress=True)
        results.append(summarise(cert, time.time() - t))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "next_steps"}), flush=True)
    out = {
        "command": "python tools/howto_rows.py", "model": "all-MiniLM-L6-v2 (bundled), block 3",
        "d_in": 384, "d_sae": K, "lam": LAM, "l1_coefficient": 2 * LAM, "n_train": N_TRAIN,
        "n_heldout": int(A.shape[0]), "training": training, "results": results,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "seconds": round(time.time() - t0, 1),
    }
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
