"""Benchmark of companion's exact codes against the fastest peers (a script, not a test).

Prints, measured in one run (dictionary learning is in ``bench/bench_dictionary.py``):
  (a) n=4096, d=64, k=512, λ=0.1 (about 5 active atoms a row) and
  (b) n=512, d=384, k=4096, λ=0.1 (about 32 active atoms a row):
      ``companion.encode`` against SPAMS ``lasso(pos=True)`` (LARS homotopy), scikit-learn
      ``sparse_encode(algorithm="lasso_cd", positive=True)``, skglm and celer ``Lasso(positive=
      True)``, timed in alternating rounds (every tool once per round, so that a slow spell
      of a shared machine hits all of them); min and median per tool, ratios to ours, each
      objective's relative difference from ours, and ours in units of one ``X @ D.T``;
  (c) a warm start: exact codes of an SAE-like problem (d=384, K=4096, float32), streamed
      in chunks, cold against ``init=`` the SAE's own encoder codes and ``init=`` the exact
      codes for a slightly perturbed dictionary (the previous iterate of a dictionary fit),
      in alternating order, T1 recomputed densely, with the peak memory of the run (child
      process);
  (d) peak memory of ``certify`` on n and 10n rows at a fixed chunk size (child processes).
With CUDA present it adds GPU throughput (rows/s of ``encode`` and ``certify`` at d=768,
K=24576, float32).

All peers solve our problem ½‖x - zD‖² + λ1ᵀz, z ≥ 0, per row: SPAMS' mode-2 penalty is
exactly that with ``lambda1=λ``; sklearn's lasso_cd divides alpha by n_features internally,
so ``alpha=λ``; skglm and celer minimise (1/(2 n_samples))‖y - Xw‖² + α‖w‖₁ with the row as
y (n_samples = d), so ``alpha=λ/d``. skglm and celer fit one row per call: they are timed
on a subset of rows and their times scaled to all rows (printed as such).

OpenMP's wait policy is set to ``PASSIVE`` unless the environment sets it (it must be set
before torch and SPAMS load OpenMP, so it is set at the top of this script and printed): on
a shared, loaded machine the default spin-waiting of idle OpenMP workers costs every tool
(torch's products, SPAMS' threads) several times its work. Measured on 2 cores at load ~6:
``encode`` on (a) 0.10 s passive against 0.18–0.29 s spinning, SPAMS 0.09 s against 0.11 s.

Run:  PYTHONPATH=. python bench/bench_solvers.py [--rounds 5] [--sae-rows 10000] [--parts abcd]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before OpenMP loads (see above)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from companion import certify, encode  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make_data(n, d, k, s=5, noise=0.01, seed=0, dtype=torch.float64):
    """Sparse nonnegative combinations of ``s`` random unit atoms plus small noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(k, d, generator=g, dtype=dtype)
    D /= D.norm(dim=1, keepdim=True)
    parts = []
    for start in range(0, n, 4096):               # chunked: no dense (n, k) array
        m = min(4096, n - start)
        idx = torch.argsort(torch.rand(m, k, generator=g), dim=1)[:, :s]
        vals = torch.rand(m, s, generator=g, dtype=dtype) + 0.5
        parts.append((vals.unsqueeze(2) * D[idx]).sum(1)
                     + noise * torch.randn(m, d, generator=g, dtype=dtype))
    return torch.cat(parts), D


def objective(X, D, Z, lam):
    """Mean per-row objective ½‖x - zD‖² + λ1ᵀz (float64)."""
    X, D, Z = (torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
               for a in (X, D, Z))
    R = X - Z @ D
    return float((0.5 * (R * R).sum(1) + lam * Z.sum(1)).mean())


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def best_time(f, repeat=3):
    f()
    ts = []
    for _ in range(repeat):
        _, t = timed(f)
        ts.append(t)
    return min(ts)


# -- the peers: each takes numpy X (n, d), D (k, d) and returns dense codes (n, k) ----------

def spams_lasso(X, D, lam):
    import spams
    A = spams.lasso(np.asfortranarray(X.T), D=np.asfortranarray(D.T), lambda1=lam, mode=2,
                    pos=True, numThreads=torch.get_num_threads())
    return A.toarray().T


def sklearn_cd(X, D, lam):
    from sklearn.decomposition import sparse_encode
    return sparse_encode(X, D, alpha=lam, algorithm="lasso_cd", positive=True, max_iter=10000)


def _per_row(model, X, D):
    Z = np.zeros((X.shape[0], D.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, x in enumerate(X):
            Z[i] = model.fit(D.T, x).coef_
    return Z


def skglm_lasso(X, D, lam):
    from skglm import Lasso
    return _per_row(Lasso(alpha=lam / X.shape[1], positive=True, fit_intercept=False, tol=1e-12,
                          max_iter=200), X, D)


def celer_lasso(X, D, lam):
    from celer import Lasso
    return _per_row(Lasso(alpha=lam / X.shape[1], positive=True, fit_intercept=False, tol=1e-12,
                          max_iter=200), X, D)


def encode_table(name, X, D, lam, rounds, subset):
    """One problem: every tool once per round, in alternation; print the table."""
    n, d = X.shape
    k = D.shape[0]
    Xn, Dn = X.numpy(), D.numpy()
    Z, info = encode(X, D, lam, return_info=True)
    print(f"\n({name}) n={n} d={d} k={k} lambda={lam}: exact codes have "
          f"{float((Z > 0).sum(1).double().mean()):.1f} active atoms a row on average; "
          f"encode used {info.n_iter} active-set rounds, T1 {info.kkt_violation_lam:.1e} lambda "
          f"(certify: {certify(X, D, lam, Z).t1_violation / lam:.1e} lambda)")
    tools = [("companion.encode", lambda: encode(X, D, lam), n),
             ("SPAMS lasso(pos=True)", lambda: spams_lasso(Xn, Dn, lam), n),
             ("sklearn lasso_cd", lambda: sklearn_cd(Xn, Dn, lam), n),
             ("skglm Lasso(positive)", lambda: skglm_lasso(Xn[:subset], Dn, lam), subset),
             ("celer Lasso(positive)", lambda: celer_lasso(Xn[:subset], Dn, lam), subset)]
    times = {t[0]: [] for t in tools}
    codes = {}
    prod = []
    for _ in range(rounds):
        prod.append(best_time(lambda: X @ D.T, repeat=5))
        for tname, f, m in tools:
            out, t = timed(f)
            times[tname].append(t * n / m)                  # scaled to all n rows
            codes[tname] = out
    ours = np.array(times["companion.encode"])
    print(f"  {'tool':24s} {'min s':>8s} {'median s':>9s} {'min/ours':>9s} {'median/ours':>12s}"
          f"  objective rel. diff from ours")
    for tname, _, m in tools:
        t = np.array(times[tname])
        rel = (objective(Xn[:m], Dn, codes[tname], lam) - objective(Xn[:m], Dn, Z[:m], lam)) \
            / objective(Xn[:m], Dn, Z[:m], lam)
        note = "" if m == n else f"  (timed on {m} rows, scaled to {n})"
        agree = "agrees" if abs(rel) <= 1e-8 else "DIFFERS"
        print(f"  {tname:24s} {t.min():8.3f} {np.median(t):9.3f} {t.min() / ours.min():9.2f} "
              f"{np.median(t / ours):12.2f}  {rel:+.1e} ({agree} within 1e-8){note}")
    p = np.array(prod)
    print(f"  one X @ D.T: {p.min() * 1e3:.1f} ms (min of the rounds); encode = "
          f"{ours.min() / p.min():.1f} products (min/min), per round "
          f"{' '.join(f'{a / b:.1f}' for a, b in zip(ours, p))}")
    return ours.min()


def sae_like(n, d=384, k=4096, l0=30, seed=0):
    """SAE-like float32 data: rows are nonnegative combinations of ``l0`` of ``k`` unit atoms
    with heavy-tailed (log-normal) magnitudes and noise (centred, as certify sees an SAE's
    inputs after its decoder bias); the "SAE"
    has the atoms perturbed by 5% noise as decoder and a tied ReLU encoder whose threshold
    gives about ``l0`` active latents. Returns a generator of (X_chunk, sae_codes) and the
    SAE's dictionary."""
    g = torch.Generator().manual_seed(seed)
    Dt = torch.randn(k, d, generator=g)
    Dt /= Dt.norm(dim=1, keepdim=True)
    D = Dt + 0.05 * torch.randn(k, d, generator=g) / d ** 0.5
    D /= D.norm(dim=1, keepdim=True)

    def chunks(size):
        for s in range(0, n, size):
            m = min(size, n - s)
            idx = torch.randint(k, (m, l0), generator=g)
            vals = torch.exp(0.7 * torch.randn(m, l0, generator=g)) * 0.5
            X = (vals.unsqueeze(2) * Dt[idx]).sum(1) + 0.05 * torch.randn(m, d, generator=g)
            yield X, torch.relu(X @ D.T - 0.4)
    return chunks, D


_SAE_CHILD = r"""
import os, sys, threading, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from bench.bench_solvers import sae_like, kkt_lam
from companion import encode
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
chunks, D = sae_like({n})
g = torch.Generator().manual_seed(1)
Dp = D + 0.01 * torch.randn(D.shape, generator=g) / D.shape[1] ** 0.5
Dp /= Dp.norm(dim=1, keepdim=True)          # a dictionary one small learning step away
base = rss(); peak = [base]; stop = []
def watch():
    while not stop:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
th = threading.Thread(target=watch); th.start()
names = ("cold", "sae", "prev")
t = dict.fromkeys(names, 0.0); rounds = dict.fromkeys(names, 0); t1 = dict.fromkeys(names, 0.0)
obj = dict.fromkeys(names, 0.0); l0 = dict.fromkeys(names, 0.0); l0s = 0.0; rows = 0
for i, (X, Zs) in enumerate(chunks({chunk})):
    Zp = encode(X, Dp, {lam})                  # not timed: the previous iterate's codes
    order = names if i % 2 == 0 else names[::-1]   # alternate the order chunk by chunk
    for name in order:
        init = dict(cold=None, sae=Zs, prev=Zp)[name]
        t0 = time.perf_counter()
        Z, info = encode(X, D, {lam}, init=init, return_info=True)
        t[name] += time.perf_counter() - t0
        rounds[name] = max(rounds[name], info.n_iter)
        t1[name] = max(t1[name], kkt_lam(X, D, Z, {lam}))
        R = (X - Z @ D).double()
        obj[name] += float((0.5 * (R * R).sum(1) + {lam} * Z.double().sum(1)).sum())
        l0[name] += float((Z > 0).sum())
    l0s += float((Zs > 0).sum()); rows += X.shape[0]
stop.append(1); th.join()
print(peak[0] - base, l0s / rows)
for name in names:
    print(name, t[name], rounds[name], t1[name], obj[name] / rows, l0[name] / rows)
"""


def kkt_lam(X, D, Z, lam):
    """T1 of codes ``Z`` recomputed densely in float64, in units of λ (independent of
    ``encode``'s own bookkeeping): ``max(|d_kᵀr - λ|`` on the support, ``(d_kᵀr - λ)₊``
    off it``)``."""
    X, D, Z = X.double(), D.double(), Z.double()
    g = (X - Z @ D) @ D.T - lam
    v = torch.where(Z > 0, g.abs(), g.clamp(min=0))
    return float(v.max()) / lam if v.numel() else 0.0


def part_warm(n, lam=0.1, chunk=4096, threads=2):
    print(f"\n(c) warm start: exact codes of an SAE-like problem (float32, d=384, K=4096, "
          f"{n} rows streamed in chunks of {chunk}, {threads} threads, random data with SAE-like "
          f"structure, lambda={lam}); per chunk, in alternating order: cold, init = the SAE's "
          f"encoder codes, init = exact codes for a dictionary perturbed by 1% (a learning "
          f"step earlier); T1 recomputed densely in float64")
    code = _SAE_CHILD.format(root=ROOT, n=n, chunk=chunk, lam=lam, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode:
        print("  child failed:", out.stderr[-800:])
        return
    lines = out.stdout.split("\n")
    extra, l0s = map(float, lines[0].split())
    res = {}
    for line in lines[1:]:
        if line.strip():
            name, *vals = line.split()
            res[name] = [float(v) for v in vals]
    cold = res["cold"][0]
    labels = dict(cold="cold start", sae="init = SAE codes", prev="init = previous iterate")
    for name, (t, rounds, t1, obj, l0) in res.items():
        rel = (obj - res["cold"][3]) / res["cold"][3]
        print(f"  {labels[name]:24s}: encode {t:7.2f} s ({n / t:7.0f} rows/s, {cold / t:4.2f}x "
              f"cold), at most {rounds:.0f} rounds a chunk, T1 <= {t1:.1e} lambda, L0 {l0:.1f}, "
              f"objective {rel:+.1e} relative to cold")
    print(f"  the SAE's codes have L0 {l0s:.1f}; peak RSS above start {extra:.0f} MB")


_CHILD = r"""
import os, sys, threading, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(2)
from bench.bench_solvers import make_data
from companion import certify
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
X, D = make_data({n}, 64, 512)
base = rss(); peak = [base]; stop = []
def watch():
    while not stop:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
th = threading.Thread(target=watch); th.start()
rep = certify(X, D, 0.1, chunk_size={chunk})
stop.append(1); th.join()
print(peak[0] - base, base, rep.t1_violation)
"""


def part_memory(n=4096, chunk=1024):
    print(f"\n(d) certify peak memory (exact codes computed inside, d=64 k=512, chunk_size={chunk})")
    for m in (n, 10 * n):
        code = _CHILD.format(root=ROOT, n=m, chunk=chunk)
        out, dt = timed(lambda: subprocess.run([sys.executable, "-c", code], capture_output=True,
                                               text=True, env={**os.environ, "PYTHONPATH": ROOT}))
        if out.returncode:
            print("  child failed:", out.stderr[-500:])
            continue
        extra, base, t1 = map(float, out.stdout.split())
        print(f"  n={m:6d}: peak RSS during certify above RSS before it {extra:7.1f} MB (sampled "
              f"every 2 ms; before: {base:6.1f} MB incl. X; T1 {t1:.1e}; {dt:.1f} s)")
    print(f"  (a dense Z alone would be {10 * n * 512 * 8 / 2**20:.0f} MB at 10n)")


def part_gpu(lam=0.1, n=16384, d=768, k=24576):
    """GPU throughput of encode and certify (float32, synchronised timings)."""
    print(f"\nGPU ({torch.cuda.get_device_name()}): float32, n={n} d={d} K={k}, lambda={lam}")
    g = torch.Generator().manual_seed(3)
    D = torch.randn(k, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.randint(k, (n, 32), generator=g)
    X = ((torch.rand(n, 32, generator=g) + 0.5).unsqueeze(2) * D[idx]).sum(1) \
        + 0.01 * torch.randn(n, d, generator=g)
    Xc, Dc = X.cuda(), D.cuda()

    def run(f):
        def g():
            out = f()
            torch.cuda.synchronize()
            return out
        return g
    t_enc = best_time(run(lambda: encode(Xc, Dc, lam)), repeat=2)
    Z, info = encode(Xc, Dc, lam, return_info=True)
    t_cert = best_time(run(lambda: certify(Xc, Dc, lam)), repeat=2)
    print(f"  encode : {n / t_enc:10.0f} rows/s ({t_enc:.3f} s; {info.n_iter} rounds, "
          f"T1 {info.kkt_violation_lam:.1e} lambda, L0 {float((Z > 0).sum(1).float().mean()):.1f})")
    print(f"  certify: {n / t_cert:10.0f} rows/s ({t_cert:.3f} s, exact codes included)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--sae-rows", type=int, default=10000, help="rows of the warm-start run (c)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="abcd", help="which parts to run (letters a-d)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "a" in args.parts:
        X, D = make_data(4096, 64, 512)
        encode_table("a", X, D, 0.1, args.rounds, subset=256)
    if "b" in args.parts:
        X, D = make_data(512, 384, 4096, s=30, seed=1)
        encode_table("b", X, D, 0.1, args.rounds, subset=32)
    if "c" in args.parts:
        part_warm(args.sae_rows, threads=args.threads)
    if "d" in args.parts:
        part_memory()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if torch.cuda.is_available():
        part_gpu()
    else:
        print("\n(no CUDA device: GPU throughput not measured)")


if __name__ == "__main__":
    main()
