"""Certify rows/s at the size of a GPT-2-small residual SAE, against a SPAMS pipeline (a script, not a test).

Size: d_in = 768, d_sae = 24576 (GPT-2 small's residual stream, 32x expansion), float32.
No network: the SAE and its activations are synthetic, of that size, seeded. The decoder has
random unit rows; the encoder is tied (``W_enc = W_dec^T``, ``b_enc = -0.1``); each row of X is
a nonnegative combination of 32 random atoms (weights exponential with mean 1) plus Gaussian
noise of standard deviation 0.02 per coordinate, and λ = 0.1 (exact codes then use about as
many atoms per row as generated the row).

Compared, on the same rows, each in a fresh child process:

* **companion**: ``certify_sae(sae, X, lam, statistics=False)`` (the two certificates; the
  sampling statistics are timed separately: ``statistics=True``);
* **SPAMS pipeline**: the same two certificates (companion's accumulators) with the exact codes
  from ``spams.lasso(..., mode=2, pos=True)``, the per-row nonnegative lasso. SPAMS' LARS needs
  the Gram matrix ``D D^T`` (d_sae², 2.4 GB in float32): it is computed once, timed separately,
  and passed as ``Q`` with ``q = D X^T`` per chunk (calling ``lasso`` with ``D`` would recompute
  the Gram for every chunk).

Printed: rows/s of each (steady state, after the one-off Gram for SPAMS), their ratio, the
Gram's time, and the relative difference of the two exact-code losses (both solve the same
problem). With CUDA present a GPU line gives companion's rows/s on the GPU (SPAMS has none).

    PYTHONPATH=. python bench/bench_certify.py [--rows 1024] [--threads 2]

SPAMS is not a test dependency: ``pip install spams-bin`` for this script only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

D_IN, D_SAE, L0_TRUE, LAM, NOISE = 768, 24576, 32, 0.1, 0.02

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before torch/SPAMS load OpenMP


def make(rows: int, device: str = "cpu"):
    import torch

    from companion.sae import VanillaSAE

    g = torch.Generator().manual_seed(0)
    D = torch.randn(D_SAE, D_IN, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(D_SAE, generator=g)[:L0_TRUE] for _ in range(rows)])
    w = -torch.log(torch.rand(rows, L0_TRUE, generator=g))
    X = torch.einsum("nk,nkd->nd", w, D[idx]) + NOISE * torch.randn(rows, D_IN, generator=g)
    sae = VanillaSAE(D_IN, D_SAE, dtype=torch.float32)
    with torch.no_grad():
        sae.W_dec.copy_(D)
        sae.W_enc.copy_(D.T)
        sae.b_enc.fill_(-0.1)
        sae.b_dec.zero_()
    return sae.to(device), X.numpy()


def child(kind: str, rows: int, threads: int, device: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sae, X = make(rows, device)
    out = {"kind": kind, "rows": rows, "threads": threads, "device": device}
    if kind in ("companion", "companion+statistics"):
        from companion.interop import certify_sae

        t = time.perf_counter()
        cert = certify_sae(sae, X, LAM, statistics=kind.endswith("statistics"))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t
        out["loss_exact"], out["l0_exact"] = cert.exact_codes.loss, cert.exact_codes.l0
        out["t1_exact_lam"] = cert.exact_codes.t1_violation_lam
        return out
    import spams

    from companion.certificates import _Running
    from companion.coding import default_chunk_size
    from companion.losses import sae_codes

    with torch.no_grad():
        D, norms = sae.dictionary()
        Dn = np.asfortranarray(D.numpy().T)                    # (d, K), SPAMS' columns
        t = time.perf_counter()
        Q = np.asfortranarray(Dn.T @ Dn)                       # the Gram, once
        out["gram_seconds"] = time.perf_counter() - t
        on_sae, on_exact = _Running(D, LAM, 0.0, 8192), _Running(D, LAM, 0.0, 8192)
        chunk = default_chunk_size(D_SAE)
        t = time.perf_counter()
        for s in range(0, rows, chunk):
            x = torch.from_numpy(np.array(X[s:s + chunk], dtype=np.float32))
            xc = x - sae.b_dec
            on_sae.add(xc, sae_codes(x, sae.W_enc, sae.b_enc, sae.b_dec) * norms)
            xf = np.asfortranarray(xc.numpy().T)
            q = np.asfortranarray(Dn.T @ xf)
            A = spams.lasso(xf, Q=Q, q=q, lambda1=LAM, mode=2, pos=True, numThreads=threads)
            on_exact.add(xc, torch.from_numpy(np.asarray(A.toarray().T, dtype=np.float32)))
        from companion._validation import ArrayKind

        rep = on_exact.report(ArrayKind(False), codes="exact", tol=1e-3, with_bias=True)
        on_sae.report(ArrayKind(False), codes="given", tol=1e-3, with_bias=True)
        out["seconds"] = time.perf_counter() - t
        out["loss_exact"], out["l0_exact"], out["t1_exact_lam"] = rep.loss, rep.l0, rep.t1_violation_lam
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.threads, args.device)), flush=True)
        return
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    kinds = [("companion", "cpu"), ("spams", "cpu"), ("companion+statistics", "cpu")]
    import torch

    if torch.cuda.is_available():
        kinds.append(("companion", "cuda"))
    res = {}
    for kind, device in kinds:
        done = subprocess.run([sys.executable, __file__, "--child", kind, "--rows", str(args.rows),
                               "--threads", str(args.threads), "--device", device],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"{kind} on {device} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        res[(kind, device)] = r
        extra = f", Gram {r['gram_seconds']:.1f} s once" if "gram_seconds" in r else ""
        print(f"{kind:>22} {device:>4}: {args.rows / r['seconds']:8.1f} rows/s ({r['seconds']:.1f} s{extra}); "
              f"F(D) {r['loss_exact']:.6g}, L0 {r['l0_exact']:.1f}, T1 {r['t1_exact_lam']:.1e} λ", flush=True)
    ours, theirs = res.get(("companion", "cpu")), res.get(("spams", "cpu"))
    if ours and theirs:
        print(f"companion / SPAMS pipeline, rows/s on {args.threads} CPU threads: "
              f"{theirs['seconds'] / ours['seconds']:.2f}x (with SPAMS' Gram: "
              f"{(theirs['seconds'] + theirs['gram_seconds']) / ours['seconds']:.2f}x); exact-code losses differ by "
              f"{abs(ours['loss_exact'] - theirs['loss_exact']) / ours['loss_exact']:.1e} relative")
    stats = res.get(("companion+statistics", "cpu"))
    if ours and stats:
        print(f"statistics cost: {stats['seconds'] / ours['seconds']:.2f}x the time without")
    gpu = res.get(("companion", "cuda"))
    if gpu:
        print(f"GPU ({torch.cuda.get_device_name()}): companion {args.rows / gpu['seconds']:.0f} rows/s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
