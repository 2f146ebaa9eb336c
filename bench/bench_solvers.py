"""Benchmark of companion's solvers against scikit-learn (a script, not a test).

Prints, measured in one run:
  (1) encode vs sklearn.decomposition.sparse_encode(lasso_cd, positive=True) on the same
      problem (n=4096, d=64, k=512, λ=0.1): both times, the ratio, the objectives, the
      certificate, and encode's time as a multiple of one X @ D.T product;
  (1b) the same at SAE-like scale (d=512, k=8192, about 90 active atoms per sample);
  (2) fit_dictionary vs sklearn DictionaryLearning(positive_code=True, cd/lasso_cd):
      final objectives, time for ours to reach sklearn's final objective, certificates;
  (3) peak memory of certify on n and 10n rows at a fixed chunk size (child processes).
A GPU ratio is added when CUDA is available.

Run:  PYTHONPATH=. python bench/bench_solvers.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from companion import certify, encode, fit_dictionary  # noqa: E402


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
    R = X - Z @ D
    return float((0.5 * (R * R).sum(1) + lam * Z.sum(1)).mean())


def best_time(f, repeat=3):
    f()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def gpu_encode_time(X, D, lam, repeat=3):
    """Best time of ``encode`` on the GPU (synchronised), and the codes it returns."""
    Xc, Dc = X.cuda(), D.cuda()

    def run():
        encode(Xc, Dc, lam)
        torch.cuda.synchronize()
    return best_time(run, repeat=repeat), encode(Xc, Dc, lam)


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def part1(lam=0.1, rounds=5):
    from sklearn.decomposition import sparse_encode
    print("(1) encode vs sklearn sparse_encode(algorithm='lasso_cd', positive=True)")
    n, d, k = 4096, 64, 512
    X, D = make_data(n, d, k)
    Xn, Dn = X.numpy(), D.numpy()
    # sklearn's lasso_cd minimises (1/(2 d))||x - zD||^2 + (alpha/d)||z||_1 internally
    # (it divides alpha by n_features), so alpha = lam solves exactly our problem.
    # The two are timed in alternation (sklearn once, ours best of 3, per round), so that a
    # slow spell of a shared machine hits both; the ratios of the minima and of the
    # medians over the rounds are printed.
    ts_sk, ts_ours = [], []
    for _ in range(rounds):
        Zs, t = timed(lambda: sparse_encode(Xn, Dn, alpha=lam, algorithm="lasso_cd", positive=True))
        ts_sk.append(t)
        ts_ours.append(best_time(lambda: encode(X, D, lam)))
    t_sk, t_ours = min(ts_sk), min(ts_ours)
    ratios = sorted(a / b for a, b in zip(ts_sk, ts_ours))
    Z = encode(X, D, lam)
    o_ours, o_sk = objective(X, D, Z, lam), objective(X, D, torch.from_numpy(Zs), lam)
    t1 = certify(X, D, lam, Z).t1_violation
    t_mm = best_time(lambda: X @ D.T, repeat=10)
    X32, D32 = X.float(), D.float()
    t32 = best_time(lambda: encode(X32, D32, lam))
    t_mm32 = best_time(lambda: X32 @ D32.T, repeat=10)
    Z32 = encode(X32, D32, lam)
    print(f"  problem n={n} d={d} k={k} lambda={lam}")
    print(f"  sklearn sparse_encode : {t_sk:8.3f} s   objective {o_sk:.12f}   "
          f"(fastest of {rounds}; all: {' '.join(f'{t:.3f}' for t in ts_sk)})")
    print(f"  companion.encode f64  : {t_ours:8.3f} s   objective {o_ours:.12f}   "
          f"(rel diff ours-sklearn {(o_ours - o_sk) / o_sk:+.2e}; certify T1 {t1:.2e})")
    print(f"  speed-up vs sklearn   : {t_sk / t_ours:8.1f} x fastest/fastest; per round "
          f"{' '.join(f'{r:.1f}' for r in ratios)}, median {ratios[len(ratios) // 2]:.1f} x   (target >= 10x)")
    print(f"  encode f64 = {t_ours / t_mm:5.1f} x one X@D.T ({t_mm * 1e3:.1f} ms);  "
          f"encode f32 {t32:.3f} s = {t32 / t_mm32:5.1f} x one f32 X@D.T ({t_mm32 * 1e3:.1f} ms); "
          f"f32 objective rel diff {(objective(X, D, Z32.double(), lam) - o_ours) / o_ours:+.1e}")
    if torch.cuda.is_available():
        t_gpu, Zc = gpu_encode_time(X, D, lam)
        print(f"  GPU ({torch.cuda.get_device_name()}) f64 encode {t_gpu:.3f} s: "
              f"{t_sk / t_gpu:.1f} x sklearn; objective rel diff "
              f"{(objective(X, D, Zc.cpu(), lam) - o_ours) / o_ours:+.1e}")
    else:
        print("  (no CUDA device: GPU ratio not measured)")


def part1b(lam=0.1, n=256, d=512, k=8192, s=60):
    """SAE-like scale: long codes (about 90 active atoms of 8192) in 512 dimensions."""
    from sklearn.decomposition import sparse_encode
    print(f"\n(1b) the same comparison at SAE-like scale (n={n} d={d} k={k}, samples of {s} atoms, "
          f"lambda={lam}; one round)")
    X, D = make_data(n, d, k, s=s, seed=2)
    Zs, t_sk = timed(lambda: sparse_encode(X.numpy(), D.numpy(), alpha=lam, algorithm="lasso_cd",
                                           positive=True))
    (Z, info), t_ours = timed(lambda: encode(X, D, lam, return_info=True))
    o_ours, o_sk = objective(X, D, Z, lam), objective(X, D, torch.from_numpy(Zs), lam)
    print(f"  sklearn {t_sk:.2f} s, companion.encode {t_ours:.2f} s: {t_sk / t_ours:.1f} x; mean "
          f"active atoms {float((Z > 0).sum(1).double().mean()):.1f}, {info.n_iter} rounds; objective "
          f"rel diff {(o_ours - o_sk) / o_sk:+.1e}; certify T1 ours {certify(X, D, lam, Z).t1_violation:.1e}"
          f", sklearn {certify(X, D, lam, torch.from_numpy(Zs)).t1_violation:.1e}")
    if torch.cuda.is_available():
        t_gpu, _ = gpu_encode_time(X, D, lam, repeat=2)
        print(f"  GPU ({torch.cuda.get_device_name()}) f64 encode {t_gpu:.3f} s: {t_sk / t_gpu:.1f} x sklearn")


def part2(lam=0.1, n=1024, d=32, k=64, rounds=2):
    from sklearn.decomposition import DictionaryLearning
    print(f"\n(2) fit_dictionary vs sklearn DictionaryLearning (n={n} d={d} k={k} lambda={lam})")
    X, _ = make_data(n, d, k, seed=1)
    Xn = X.numpy()
    ts_sk, reaches, totals = [], [], []
    for _ in range(rounds):                 # alternate the two, as in (1)
        dl = DictionaryLearning(n_components=k, alpha=lam, positive_code=True, fit_algorithm="cd",
                                transform_algorithm="lasso_cd", transform_alpha=lam, random_state=0)
        U, t = timed(lambda: dl.fit_transform(Xn))
        ts_sk.append(t)
        V = dl.components_
        # sklearn's objective is N times ours: 0.5||X - UV||_F^2 + alpha ||U||_{1,1}
        o_sk = objective(X, torch.from_numpy(V), torch.from_numpy(U), lam)
        trace = []
        t0 = time.perf_counter()
        fit = fit_dictionary(X, k, lam, n_restarts=1, progress=False, seed=0,
                             callback=lambda it, loss, t2: trace.append((time.perf_counter() - t0, loss)))
        totals.append(time.perf_counter() - t0)
        reaches.append(next((tt for tt, l in trace if l <= o_sk), None))
    norms = np.linalg.norm(V, axis=1)
    keep = norms > 0
    Vn = V.copy(); Vn[keep] /= norms[keep, None]
    Vn[~keep] = np.eye(d)[0]
    cert_sk = certify(Xn, Vn, lam, U * norms[None, :])
    cert_sk_exact = certify(Xn, Vn, lam)
    t_sk = min(ts_sk)
    print(f"  sklearn DictionaryLearning : {t_sk:8.2f} s  objective {o_sk:.10f}  "
          f"(fastest of {rounds}: {' '.join(f'{t:.2f}' for t in ts_sk)}; n_iter {dl.n_iter_}; "
          f"atom norms in [{norms.min():.3f}, {norms.max():.3f}])")
    print(f"     certify(sklearn D, its codes): T1 {cert_sk.t1_violation:.2e}  T2 {cert_sk.t2_violation:.2e}"
          f"  -> {'PASSES' if cert_sk.is_stationary(1e-6) else 'FAILS'} at 1e-6")
    print(f"     certify(sklearn D, exact codes): T1 {cert_sk_exact.t1_violation:.2e}  "
          f"T2 {cert_sk_exact.t2_violation:.2e}  loss {cert_sk_exact.loss:.10f}")
    print(f"  companion.fit_dictionary   : {min(totals):8.2f} s  objective {fit.loss:.10f}  "
          f"(n_iter {fit.n_iter}, converged {fit.converged}; T1 {fit.certificate.t1_violation:.2e}"
          f" T2 {fit.certificate.t2_violation:.2e})")
    if all(r is not None for r in reaches):
        ratios = sorted(a / b for a, b in zip(ts_sk, reaches))
        print(f"  ours reached sklearn's final objective after {min(reaches):.2f} s: "
              f"{t_sk / min(reaches):.1f} x faster fastest/fastest, per round "
              f"{' '.join(f'{r:.1f}' for r in ratios)} (target >= 5x); final objective "
              f"{'lower' if fit.loss <= o_sk else 'HIGHER'} by {abs(o_sk - fit.loss) / o_sk:.2e} rel")
    else:
        print(f"  ours did NOT reach sklearn's objective (ours {fit.loss:.10f} vs {o_sk:.10f}); "
              f"whole fit took {min(totals):.2f} s = {t_sk / min(totals):.1f} x sklearn's time")


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


def part3(n=4096, chunk=1024):
    print(f"\n(3) certify peak memory (exact codes computed inside, d=64 k=512, chunk_size={chunk})")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    for m in (n, 10 * n):
        code = _CHILD.format(root=root, n=m, chunk=chunk)
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": root})
        dt = time.perf_counter() - t
        if out.returncode:
            print("  child failed:", out.stderr[-500:])
            continue
        extra, base, t1 = map(float, out.stdout.split())
        print(f"  n={m:6d}: peak RSS during certify above RSS before it {extra:7.1f} MB (sampled every 2 ms; before: {base:6.1f} MB incl. X; "
              f"T1 {t1:.1e}; {dt:.1f} s)")
    print(f"  (a dense Z alone would be {10 * n * 512 * 8 / 2**20:.0f} MB at 10n)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    part1()
    part1b()
    part2()
    part3()
