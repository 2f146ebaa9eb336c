"""Time and peak memory of certifying an SAE at language-model scale (a script, not a test).

The solvers issue asks what it costs to certify an SAE of K = 4096 latents on 100k MiniLM
tokens (d = 384) on 2 cores: exact codes for every token (one nonnegative lasso per row) next
to the SAE's own codes, streamed chunk by chunk through :func:`companion.certify_sae`.

Stages (each cached under ``--work``, so that a re-run times only the certificate):
  1. activations: ``companion.lm.lm_activations`` at block ``--layer`` of the bundled MiniLM on
     Python's documentation topics, as many tokens as the texts hold up to ``--tokens``
     (the number actually obtained is printed), saved as a float32 ``.npy``;
  2. an SAE: ``companion.train_sae`` (K = ``--atoms``, λ = ``--lam``) for ``--steps`` steps on
     the activations, saved with ``companion.save_sae``. Its training is not the point (it is
     short): the certificate's cost is what is measured, and it depends on the SAE mostly
     through its codes' sparsity, which is printed;
  3. the certificate, in a fresh child process (so that its peak resident memory is its own):
     the ``.npy`` is memory-mapped, the SAE loaded with ``companion.load_sae`` and certified
     with exact codes started cold. (Starting them from the SAE's own codes is slower than
     cold on SAE-like data, ``bench_solvers.py`` part (c), so ``certify_sae`` does not.)
     Printed: wall time, rows per second, the peak RSS of the child and its RSS before
     certifying, T1 of both codes in units of λ, L0 and the amortisation gap.

With CUDA present every stage runs there (``--device``) and a GPU line gives the rows per
second of the certificate (the ``.npy`` is still read from host memory chunk by chunk).

Run:  PYTHONPATH=. python bench/bench_certify_lm.py [--tokens 100000] [--atoms 4096]
          [--dtype float32|float64] [--work /tmp/bench_certify_lm] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args) -> tuple[pathlib.Path, pathlib.Path]:
    import numpy as np
    import torch

    import companion
    from companion.lm import lm_activations

    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    x_path = work / f"X_layer{args.layer}_{args.tokens}.npy"
    if not x_path.exists():
        t = time.perf_counter()
        acts = lm_activations(layer=args.layer, max_tokens=args.tokens, device=args.device)
        np.save(x_path, acts.X.cpu().numpy().astype(np.float32))
        print(f"activations: {acts.X.shape[0]} tokens, d={acts.X.shape[1]}, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    X = np.load(x_path, mmap_mode="r")
    sae_path = work / f"sae_K{args.atoms}_lam{args.lam:g}_steps{args.steps}_{args.dtype}"
    if not sae_path.exists():
        t = time.perf_counter()
        dtype = getattr(torch, args.dtype)
        res = companion.train_sae(torch.from_numpy(np.array(X)), args.atoms, args.lam,
                                  steps=args.steps, batch_size=args.batch_size, seed=0,
                                  dtype=dtype, device=args.device, progress=False)
        companion.save_sae(res.sae.cpu(), sae_path, lam=args.lam)
        print(f"SAE: K={args.atoms}, λ={args.lam:g}, {args.steps} steps, "
              f"final loss {res.loss_history[-1]:.4g}, {time.perf_counter() - t:.0f} s", flush=True)
    return x_path, sae_path


def child(args) -> None:
    """The certificate in this process; prints one JSON line."""
    import numpy as np
    import torch

    import companion

    X = np.load(args.x_path, mmap_mode="r")
    sae = companion.load_sae(args.sae_path, device=args.device).sae
    rss_before = _rss_mib()
    t = time.perf_counter()
    cert = companion.certify_sae(sae, X, args.lam, exact=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    ex, sa = cert.exact_codes, cert.sae_codes
    print(json.dumps({
        "rows": int(X.shape[0]), "seconds": round(seconds, 1),
        "rows_per_s": round(X.shape[0] / seconds), "rss_before_mib": round(rss_before),
        "peak_rss_mib": round(_peak_mib()), "t1_exact_in_lam": ex.t1_violation_lam,
        "t1_sae_in_lam": sa.t1_violation_lam, "l0_sae": sa.l0, "l0_exact": ex.l0,
        "relative_amortisation_gap": cert.relative_amortisation_gap,
        "loss_sae": sa.loss, "loss_exact": ex.loss}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--atoms", type=int, default=4096)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--work", default="/tmp/bench_certify_lm")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--x-path", help=argparse.SUPPRESS)
    p.add_argument("--sae-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        from companion import pick_device

        args.device = pick_device().type
    if args.child:
        child(args)
        return
    x_path, sae_path = prepare(args)
    where = f"{os.cpu_count()} CPU cores" if args.device == "cpu" else args.device
    print(f"certify_sae on {x_path.name} with {sae_path.name}; {where}", flush=True)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--x-path", str(x_path), "--sae-path", str(sae_path),
         "--lam", str(args.lam), "--device", args.device],
        capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the certificate failed (exit {out.returncode})")
    line = out.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    if args.device.startswith("cuda"):
        import torch

        res = json.loads(line)
        print(f"GPU ({torch.cuda.get_device_name()}): certify_sae with exact codes, "
              f"{res['rows']} rows, d_sae={args.atoms}: {res['rows_per_s']} rows/s", flush=True)


if __name__ == "__main__":
    main()
