"""Benchmark: time to a certified 1e-6 relative duality gap on the candidate-atom convex problem.

Ours: :func:`companion.convex.solve_convex` (block coordinate descent + active-set Newton +
Gap Safe screening; also ``method="fista"``). Peer: ``scipy.optimize.minimize`` with
L-BFGS-B on a smooth, bound-constrained reformulation of the same problem, using
``‖w‖ = min_{η>0} ½(‖w‖²/η + η)``:

    min_{Z ≥ 0, η ≥ ε}  (1/N)[½‖X − ZC‖² + λ·1ᵀZ1] + μ Σ_k ½(‖Z[:,k]‖²/η_k + η_k),

which is jointly convex and smooth on the box. Second peer, if ``cvxpy`` is importable (a
bench-only dependency, not required by ``companion``: ``pip install cvxpy``): the same
problem as a second-order cone program, compiled by cvxpy and solved by Clarabel (an
interior-point method); its time includes the compilation. The peer is stopped as soon as *our* duality
certificate (evaluated on its iterate, every ``CHECK`` iterations; the cost of checking is
included in its time, as it is in ours) falls below the tolerance, or when it exhausts its
time limit. Both solve the same instance (a concept tree from ``companion.concept_tree``,
candidates = normalised data + normalised pairwise sums), in float64 on the CPU.

    python bench/bench_convex.py            # the default sizes
    python bench/bench_convex.py --quick    # one small size
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.optimize
import torch

import companion
from companion import convex
from companion.convex import _certify  # the same certificate for both solvers

TOL = 1e-6
CHECK = 10


def make_problem(n_samples: int, n_pairs: int, seed: int = 0):
    tree = companion.concept_tree(n_samples, (3, 2), seed=seed)
    X = tree.X
    C = convex.combine_candidates(convex.normalised_data(X), convex.pairwise_sums(X, n_pairs, seed=seed + 1))
    return X, C


def rel_gap(X, C, Z, lam, mu):
    Zt = torch.as_tensor(Z).clamp(min=0)
    R = X - Zt @ C
    _, p, d, _ = _certify(X, C, Zt, R, lam, X.shape[0] * mu)
    return (p - d) / p


def lbfgsb(X, C, lam, mu, time_limit):
    """Peer: L-BFGS-B on the smooth reformulation; returns (seconds, rel_gap, iterations)."""
    Xn, Cn = X.numpy(), C.numpy()
    n, k = Xn.shape[0], Cn.shape[0]
    use_eta = mu > 0

    def unpack(v):
        Z = v[: n * k].reshape(n, k)
        return Z, (v[n * k:] if use_eta else None)

    def fun(v):
        Z, eta = unpack(v)
        R = Xn - Z @ Cn
        f = (0.5 * (R * R).sum() + lam * Z.sum()) / n
        gZ = (-(R @ Cn.T) + lam) / n
        if not use_eta:
            return f, gZ.ravel()
        sq = (Z * Z).sum(0)
        f += mu * 0.5 * (sq / eta + eta).sum()
        gZ = gZ + mu * Z / eta
        geta = mu * 0.5 * (1 - sq / eta**2)
        return f, np.concatenate([gZ.ravel(), geta])

    v0 = np.concatenate([np.zeros(n * k), np.ones(k)]) if use_eta else np.zeros(n * k)
    bounds = [(0, None)] * (n * k) + ([(1e-12, None)] * k if use_eta else [])
    state = {"it": 0, "gap": math.inf}
    start = time.perf_counter()

    def callback(intermediate_result):
        state["it"] += 1
        if state["it"] % CHECK == 0:
            Z, _ = unpack(intermediate_result.x)
            state["gap"] = rel_gap(X, C, torch.from_numpy(Z.copy()), lam, mu)
            if state["gap"] <= TOL or time.perf_counter() - start > time_limit:
                raise StopIteration

    res = scipy.optimize.minimize(fun, v0, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                                  options={"maxiter": 10**7, "maxfun": 10**7, "ftol": 0.0, "gtol": 0.0,
                                           "maxcor": 20})
    seconds = time.perf_counter() - start
    Z, _ = unpack(res.x)
    stop = "time limit" if seconds > time_limit else f"scipy stopped: {res.message}"
    return seconds, rel_gap(X, C, torch.from_numpy(Z.copy()), lam, mu), state["it"], stop


def cvxpy_clarabel(X, C, lam, mu, time_limit):
    """Peer: cvxpy + Clarabel; returns (seconds, rel_gap) or None when cvxpy is missing."""
    try:
        import cvxpy as cp
    except ImportError:
        return None
    Xn, Cn = X.numpy(), C.numpy()
    n, k = Xn.shape[0], Cn.shape[0]
    start = time.perf_counter()
    Z = cp.Variable((n, k), nonneg=True)
    obj = (0.5 * cp.sum_squares(Xn - Z @ Cn) + lam * cp.sum(Z)) / n + mu * cp.sum(cp.norm(Z, 2, axis=0))
    problem = cp.Problem(cp.Minimize(obj))
    problem.solve(solver="CLARABEL", time_limit=time_limit)
    seconds = time.perf_counter() - start
    if Z.value is None:
        return seconds, math.inf
    return seconds, rel_gap(X, C, torch.from_numpy(np.maximum(Z.value, 0)), lam, mu)


def ours(X, C, lam, mu, method="bcd"):
    start = time.perf_counter()
    fit = convex.solve_convex(X, C, lam, mu, tol=TOL, method=method, max_iter=100000)
    return time.perf_counter() - start, fit.rel_gap, fit.n_iter, fit.n_used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the smallest size")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds allowed to each peer")
    ap.add_argument("--fista", action="store_true", help="also time method='fista'")
    ap.add_argument("--cvxpy-max-n", type=int, default=10**9, help="largest N given to cvxpy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lam = 0.2
    sizes = [(24, 100)] if args.quick else [(24, 100), (48, 300), (192, 2000)]
    print(f"relative duality gap target {TOL:g}; λ = {lam}; float64, CPU, one thread")
    for n, pairs in sizes:
        X, C = make_problem(n, pairs)
        mu = 0.1 * convex.mu_max(X, C, lam)
        t_ours, g_ours, it_ours, used = ours(X, C, lam, mu)
        if args.fista:
            t_fista, g_fista, _, _ = ours(X, C, lam, mu, method="fista")
        print(f"N={n:4d} d={X.shape[1]} K={C.shape[0]:5d} (variables {n * C.shape[0]}), μ = 0.1 μ_max, atoms used {used}")
        print(f"  ours (bcd)   : {t_ours:8.2f} s   rel gap {g_ours:.1e}   ({it_ours} sweeps)")
        if args.fista:
            print(f"  ours (fista) : {t_fista:8.2f} s   rel gap {g_fista:.1e}")
        t_peer, g_peer, it_peer, stop = lbfgsb(X, C, lam, mu, args.time_limit)
        done = g_peer <= TOL
        print(f"  L-BFGS-B     : {t_peer:8.2f} s   rel gap {g_peer:.1e}   ({it_peer} iterations)"
              f"{'' if done else f'   DID NOT REACH the target ({stop})'}")
        if done:
            print(f"  speed-up (L-BFGS-B time / ours): {t_peer / t_ours:.1f}x")
        else:
            print("  L-BFGS-B stalls above the target on this problem: no ratio")
        if n <= args.cvxpy_max_n:
            cv = cvxpy_clarabel(X, C, lam, mu, args.time_limit)
            if cv is None:
                print("  cvxpy        : not installed (optional: pip install cvxpy)")
            else:
                print(f"  cvxpy+Clarabel: {cv[0]:7.2f} s   rel gap {cv[1]:.1e}"
                      f"{'' if cv[1] <= TOL else '   (above the target)'}")
                if cv[1] <= TOL:
                    print(f"  speed-up (cvxpy time / ours): {cv[0] / t_ours:.1f}x")
                else:
                    print(f"  speed-up over cvxpy: > {cv[0] / t_ours:.1f}x (cvxpy unfinished at its time limit)")
        else:
            print(f"  cvxpy        : skipped (N > {args.cvxpy_max_n}; raise --cvxpy-max-n to try)")


if __name__ == "__main__":
    main()
