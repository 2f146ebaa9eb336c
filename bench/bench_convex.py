"""Benchmark: time to a certified 1e-6 relative duality gap on the candidate-atom convex problem.

Ours: :func:`companion.convex.solve_convex` (block coordinate descent, then projected Newton
on the open columns with an exact Woodbury solve of the support Hessian, Gap Safe screening).

Peers, all on the same instance (a concept tree from ``companion.concept_tree``, candidates =
normalised data + normalised pairwise sums), in float64 on the CPU:

* ``cvxpy`` (the ``bench`` extra) compiling the problem as a second-order cone program for three
  conic solvers: ECOS and Clarabel (interior point) and SCS (operator splitting, asked for
  ``eps = 1e-9`` because its default ``1e-4`` stops far above the target). Their times include
  cvxpy's compilation, which a user of cvxpy pays on every solve; the solver's own time
  (``solver_stats.solve_time``) is printed beside it. Each runs in a forked process killed at
  ``--time-limit`` (then its time is shown as ``>`` the limit, a lower bound).
* ``scipy.optimize.minimize`` with L-BFGS-B on a smooth, bound-constrained reformulation, using
  ``‖w‖ = min_{η>0} ½(‖w‖²/η + η)``:
  ``min_{Z ≥ 0, η ≥ ε} (1/N)[½‖X − ZC‖² + λ·1ᵀZ1] + μ Σ_k ½(‖Z[:,k]‖²/η_k + η_k)``, stopped as soon
  as *our* duality certificate on its iterate (every ``CHECK`` iterations, its cost included)
  reaches the target, or at its time limit.

Every answer is checked with the same certificate (:func:`companion.convex._certify` on the
peer's codes clipped at zero): the relative gap it reaches and its objective against ours.
Tools run in alternating rounds (the order rotates each round; L-BFGS-B, far behind, once) so that the machine's load
falls on all of them alike; the table gives the minimum and median over rounds and the ratio
of each tool's minimum to ours.

    python bench/bench_convex.py                 # the default sizes, 3 rounds (1 at N=192)
    python bench/bench_convex.py --quick         # N=24 only
    python bench/bench_convex.py --rounds 5 --no-lbfgsb
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import queue
import statistics
import time
import warnings

import numpy as np
import scipy.optimize
import torch

import companion
from companion import convex
from companion.convex import _certify  # the same certificate for every solver

TOL = 1e-6
CHECK = 10
LAM = 0.2
SIZES = [(24, 100), (48, 300), (192, 2000)]


def make_problem(n_samples: int, n_pairs: int, seed: int = 0):
    tree = companion.concept_tree(n_samples, (3, 2), seed=seed)
    X = tree.X
    C = convex.combine_candidates(convex.normalised_data(X), convex.pairwise_sums(X, n_pairs, seed=seed + 1))
    return X, C


def certificate(X, C, Z, lam, mu):
    """(relative gap, primal objective P) of codes ``Z`` (clipped at zero) under our certificate."""
    Zt = torch.as_tensor(np.asarray(Z)).clamp(min=0)
    _, p, d, _ = _certify(X, C, Zt, X - Zt @ C, lam, X.shape[0] * mu)
    return (p - d) / p, p / X.shape[0]


def ours(X, C, lam, mu, time_limit):
    start = time.perf_counter()
    fit = convex.solve_convex(X, C, lam, mu, tol=TOL, max_iter=100000)
    seconds = time.perf_counter() - start
    gap, obj = certificate(X, C, fit.Z, lam, mu)
    return {"s": seconds, "gap": gap, "obj": obj, "note": f"{fit.n_iter} sweeps, {fit.n_used} atoms"}


def lbfgsb(X, C, lam, mu, time_limit):
    """Peer: L-BFGS-B on the smooth reformulation, stopped by our certificate."""
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
    state = {"it": 0}
    start = time.perf_counter()

    def callback(intermediate_result):
        state["it"] += 1
        if state["it"] % CHECK == 0:
            Z, _ = unpack(intermediate_result.x)
            gap, _ = certificate(X, C, Z.copy(), lam, mu)
            if gap <= TOL or time.perf_counter() - start > time_limit:
                raise StopIteration

    res = scipy.optimize.minimize(fun, v0, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                                  options={"maxiter": 10**7, "maxfun": 10**7, "ftol": 0.0, "gtol": 0.0,
                                           "maxcor": 20})
    seconds = time.perf_counter() - start
    gap, obj = certificate(X, C, unpack(res.x)[0].copy(), lam, mu)
    note = f"{state['it']} iterations" + ("" if gap <= TOL else
                                          (", time limit" if seconds > time_limit else f", {res.message}"))
    return {"s": seconds, "gap": gap, "obj": obj, "note": note}


def cvxpy_solver(name):
    """Peer factory: cvxpy compiling the SOCP for the conic solver ``name``."""
    options = {"ECOS": {}, "CLARABEL": {}, "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 10**6}}[name]

    def run(X, C, lam, mu, time_limit):
        import cvxpy as cp
        Xn, Cn = X.numpy(), C.numpy()
        n, k = Xn.shape[0], Cn.shape[0]
        start = time.perf_counter()
        Z = cp.Variable((n, k), nonneg=True)
        obj = (0.5 * cp.sum_squares(Xn - Z @ Cn) + lam * cp.sum(Z)) / n + mu * cp.sum(cp.norm(Z, 2, axis=0))
        problem = cp.Problem(cp.Minimize(obj))
        limit = {"SCS": {"time_limit_secs": time_limit}, "CLARABEL": {"time_limit": time_limit}}.get(name, {})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                problem.solve(solver=name, **options, **limit)
        except cp.error.SolverError as err:
            return {"s": time.perf_counter() - start, "gap": math.inf, "obj": math.nan, "note": str(err)[:40]}
        seconds = time.perf_counter() - start
        if Z.value is None:
            return {"s": seconds, "gap": math.inf, "obj": math.nan, "note": problem.status}
        gap, objv = certificate(X, C, Z.value, lam, mu)
        solve = problem.solver_stats.solve_time
        return {"s": seconds, "gap": gap, "obj": objv, "solve": solve, "note": problem.status}

    return run


def in_child(tool, time_limit):
    """Run ``tool`` in a forked process and kill it at ``time_limit`` seconds (ECOS cannot be
    told a time limit, and no cvxpy solve can be interrupted from inside)."""
    def run(X, C, lam, mu, _limit):
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        proc = ctx.Process(target=lambda: out.put(tool(X, C, lam, mu, time_limit)), daemon=True)
        proc.start()
        try:
            res = out.get(timeout=time_limit + 30)
        except queue.Empty:
            res = {"s": time_limit, "gap": math.inf, "obj": math.nan, "unfinished": True,
                   "note": f"killed at the {time_limit:.0f} s limit"}
        proc.kill()
        proc.join()
        return res
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only N=24")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per size (N=192: 1)")
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds allowed to each cvxpy solver (killed after it)")
    ap.add_argument("--lbfgsb-limit", type=float, default=60.0, help="seconds allowed to L-BFGS-B (one round)")
    ap.add_argument("--no-lbfgsb", action="store_true", help="skip the scipy L-BFGS-B peer")
    ap.add_argument("--cvxpy-max-n", type=int, default=10**9, help="largest N given to cvxpy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import cvxpy  # noqa: F401
        have_cvxpy = True
    except ImportError:
        have_cvxpy = False
    print(f"relative duality gap target {TOL:g}; λ = {LAM}; μ = 0.1 μ_max; float64, CPU, one thread")
    if not have_cvxpy:
        print("cvxpy not installed (the bench extra): its solvers are skipped")
    for n, pairs in SIZES[:1] if args.quick else SIZES:
        X, C = make_problem(n, pairs)
        mu = 0.1 * convex.mu_max(X, C, LAM)
        tools = {"ours (solve_convex)": ours}
        if have_cvxpy and n <= args.cvxpy_max_n:
            tools.update({f"cvxpy + {label}": in_child(cvxpy_solver(name), args.time_limit)
                          for name, label in (("ECOS", "ECOS"), ("SCS", "SCS"), ("CLARABEL", "Clarabel"))})
        if not args.no_lbfgsb:
            tools["scipy L-BFGS-B"] = lbfgsb
        names = list(tools)
        rounds = 1 if n >= 192 else args.rounds
        runs: dict = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                if name == "scipy L-BFGS-B" and runs[name]:
                    continue   # far behind (it stalls above the target): one round is enough
                limit = args.lbfgsb_limit if name == "scipy L-BFGS-B" else args.time_limit
                runs[name].append(tools[name](X, C, LAM, mu, limit))
        print(f"\nN={n} d={X.shape[1]} K={C.shape[0]} ({n * C.shape[0]} variables), {rounds} round(s)")
        print(f"  {'tool':22s} {'min s':>8s} {'median s':>9s} {'worst gap':>10s} {'ΔP/P vs ours':>13s}"
              f" {'time / ours':>12s}  note")
        base = min(x["s"] for x in runs[names[0]])
        obj0 = runs[names[0]][0]["obj"]
        for name in names:
            t = [x["s"] for x in runs[name]]
            gap = max(x["gap"] for x in runs[name])
            dobj = (runs[name][0]["obj"] - obj0) / obj0
            flag = "" if gap <= TOL else "  ABOVE TARGET"
            solve = [x["solve"] for x in runs[name] if x.get("solve") is not None]
            note = f"solver alone (no compile) min {min(solve):.3f} s" if solve else runs[name][0]["note"]
            more = ">" if any(x.get("unfinished") for x in runs[name]) else " "
            print(f"  {name:22s} {more}{min(t):7.3f} {statistics.median(t):9.3f} {gap:10.1e} {dobj:+13.1e}"
                  f" {more}{min(t) / base:10.2f}x  {note}{flag}", flush=True)
        peers = [nm for nm in names[1:] if nm.startswith("cvxpy")
                 and max(x["gap"] for x in runs[nm]) <= TOL]
        if not peers and any(nm.startswith("cvxpy") for nm in names):
            print(f"  no cvxpy solver reached the target within its {args.time_limit:.0f} s limit: ours "
                  f"is more than {args.time_limit / base:.0f}x faster than each")
        if peers:
            best = min(peers, key=lambda nm: min(x["s"] for x in runs[nm]))
            print(f"  fastest cvxpy solver reaching the target: {best}; ours is "
                  f"{min(x['s'] for x in runs[best]) / base:.2f}x faster (min over rounds)")


if __name__ == "__main__":
    main()
