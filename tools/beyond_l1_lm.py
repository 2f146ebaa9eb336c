"""Chapter 9's SAEs on MiniLM: SAELens TopK, BatchTopK and JumpReLU SAEs on Chapter 8's tokens,
trained once as practitioners train them, certified on held-out tokens, and saved.

Data: the activation memory maps that ``tools/lm_study.py`` writes to ``--cache`` (MiniLM block 3
on Chapter 8's documentation corpus, split by source: 528,699 training tokens, 71,889 held-out
tokens from other documents). Run ``python tools/lm_study.py`` first if the cache is missing.

SAEs, all at Chapter 8's headline width ``--width`` (768, 2x d) and with Chapter 8's schedule
(Adam, learning rate 1e-3 constant, 1500 steps of 1024 training tokens, 2.9 epochs), seeds 0,
1, 2, SAELens' defaults otherwise (trained decoder bias, TopK/BatchTopK's AuxK loss on dead
latents with coefficient 1, ``rescale_acts_by_decoder_norm``; JumpReLU's step L0 with
bandwidth 0.05):

- TopK and BatchTopK at ``k = --k`` (11: Chapter 8's L1 SAEs fire 10.6-11.7 latents per
  held-out token);
- JumpReLU at ``l0_coefficient = --jumprelu-coef`` (2; the book's eps = coefficient / 2, since
  SAELens' squared error is not halved), plus seed 0 at each of ``--jumprelu-sweep`` (0.5).
  JumpReLU departs from SAELens' defaults in two places: its thresholds start at
  ``--jumprelu-init`` (0.1, not 0.01) and it trains at ``--jumprelu-lr`` (3e-3). Adam moves a
  threshold by about one learning rate per step, so 1500 steps at 1e-3 from 0.01 leave it far
  below the codes' scale (a 400-step pilot at coefficient 1 still fired 632 of 768 latents),
  while a start at 0.5 is above every initial pre-activation and kills every latent.

Measured on held-out tokens, with Chapter 8's L1 SAEs (``tools/lm_study/saelens_K768_seed*``)
measured the same way beside them: mean L0, dead latents, FVU, the support-refit gap and the
encoder's shrinkage (first ``--rows`` held-out tokens), plain-centroid stationarity at the refit
codes (same rows), the local-move certificate (first ``--move-rows``: TopK under its k,
JumpReLU under its eps, BatchTopK under the price eps = theta^2/2 its global threshold implies
for near-orthogonal atoms; L1 SAEs under a TopK budget equal to each token's own L0, swaps
only), the matched-lambda L1 view (first ``--matched-rows``), JumpReLU/BatchTopK thresholds on
unit atoms against sqrt(2 eps), latents firing on > 30% of tokens and Sun et al.'s antipodality
score (> 0.5) with its random-direction null.

Writes each SAE as SAELens saved it (``{arch}_K{width}_seed{s}`` or ``jumprelu_c{coef}_seed{s}``,
float32, with ``train.json``), each SAE's numbers to ``measured/{name}.json`` (``--resume``
keeps them) and ``results.json`` (configuration, versions, every SAE's numbers) into ``--out``
(default ``tools/beyond_l1_lm``).

    python tools/beyond_l1_lm.py                    # about 1.5 h of single-core time
    python tools/beyond_l1_lm.py --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time
import warnings

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "tools" / "beyond_l1_lm"))
    p.add_argument("--cache", default=str(ROOT / "tools" / "lm_cache"))
    p.add_argument("--l1-study", default=str(ROOT / "tools" / "lm_study"),
                   help="Chapter 8's SAEs, measured beside the new ones")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--k", type=int, default=11)
    p.add_argument("--jumprelu-coef", type=float, default=2.0)
    p.add_argument("--jumprelu-init", type=float, default=0.1,
                   help="JumpReLU's initial threshold (SAELens' default 0.01 is far below the codes' scale)")
    p.add_argument("--jumprelu-lr", type=float, default=3e-3,
                   help="JumpReLU's learning rate: Adam moves a threshold by about lr per step, so "
                        "1500 steps at 1e-3 cannot carry it to the codes' scale (~1)")
    p.add_argument("--jumprelu-sweep", type=float, nargs="*", default=[0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--move-rows", type=int, default=512)
    p.add_argument("--matched-rows", type=int, default=4096)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", nargs="*", help="train and measure only these SAE names (the rest must exist)")
    p.add_argument("--resume", action="store_true",
                   help="keep the SAEs (train.json) and measurements (measured/) already in --out")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def jobs(a) -> list[tuple[str, float, int]]:
    out = [(arch, a.k, s) for arch in ("topk", "batchtopk") for s in a.seeds]
    out += [("jumprelu", a.jumprelu_coef, s) for s in a.seeds]
    out += [("jumprelu", c, 0) for c in a.jumprelu_sweep]
    return out


def name(arch: str, param: float, seed: int, width: int) -> str:
    if arch == "jumprelu":
        return f"jumprelu_c{param:g}_seed{seed}"
    return f"{arch}_K{width}_seed{seed}"


def _saelens():
    os.environ.setdefault("TQDM_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sae_lens
    return sae_lens


def train_one(job, a) -> dict:
    torch.set_num_threads(1)
    sl = _saelens()
    from sae_lens.config import SAETrainerConfig

    arch, param, seed = job
    X = torch.from_numpy(np.load(pathlib.Path(a.cache) / "train.npy"))
    n, d = X.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "topk":
            sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=d, d_sae=a.width, k=int(param)))
        elif arch == "batchtopk":
            sae = sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(d_in=d, d_sae=a.width, k=float(param)))
        else:
            sae = sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(d_in=d, d_sae=a.width,
                                                                      l0_coefficient=float(param),
                                                                      jumprelu_init_threshold=a.jumprelu_init))

    def batches():
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=g)
            for s in range(0, n - a.batch_size + 1, a.batch_size):
                yield X[perm[s:s + a.batch_size]]

    lr = a.jumprelu_lr if arch == "jumprelu" else a.lr
    cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch_size,
                           train_batch_size_samples=a.batch_size, lr=lr, lr_end=lr, device="cpu",
                           logger=sl.LoggingConfig(log_to_wandb=False))
    folder = pathlib.Path(a.out) / name(arch, param, seed, a.width)
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        trained = sl.SAETrainer(cfg, sae, data_provider=batches()).fit()
        trained.save_inference_model(str(folder))
    record = {"name": folder.name, "architecture": arch, "param": param, "seed": seed,
              "width": a.width, "lr": lr, "seconds": round(time.perf_counter() - t0, 1)}
    (folder / "train.json").write_text(json.dumps(record))
    return record


def _unit_dict(W_dec: torch.Tensor) -> np.ndarray:
    return (W_dec / W_dec.norm(dim=1, keepdim=True)).detach().numpy()


def measure(folder: pathlib.Path, arch: str, a, T: np.ndarray) -> dict:
    """Every held-out measurement of one SAE (arch "l1" for Chapter 8's SAELens L1 SAEs)."""
    torch.set_num_threads(1)
    import companion
    from companion import beyond_l1 as bl
    from companion.antipodal import antipodality

    X = T[:a.rows]
    out: dict = {"name": folder.name, "architecture": arch}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "l1":
            ck = companion.load_sae(folder, dtype=torch.float64)
            sae = ck.sae
            Xc, D, Z = (t.numpy() for t in sae.joint_view(torch.from_numpy(X)))
            k = eps = None
            out["lam"] = float(ck.lam)
        else:
            ck = bl.load_sparse_sae(folder)
            sae = ck.sae
            Xc, D, Z = sae.joint_view(X)
            k, eps = ck.k, ck.eps
            if arch in ("jumprelu", "batchtopk"):
                tau = sae.magnitude_thresholds().detach().numpy()
                out["threshold_unit_median"] = float(np.median(tau))
                out["threshold_unit_quartiles"] = [float(q) for q in np.quantile(tau, [0.25, 0.75])]
            if arch == "batchtopk":
                # the price a global threshold tau implies for near-orthogonal atoms: tau^2/2
                eps = float(np.median(sae.magnitude_thresholds().detach().numpy()) ** 2 / 2)
                out["eps_implied"] = eps
            if arch == "jumprelu":
                out["eps"] = eps
                out["threshold_over_sqrt2eps_median"] = out["threshold_unit_median"] / np.sqrt(2 * eps)
    act = Z > 0
    l0 = act.sum(1)
    out["l0"] = float(l0.mean())
    out["l0_max"] = int(l0.max())
    out["dead"] = int((act.sum(0) == 0).sum())
    R = Xc - Z @ D
    var = np.sum((X - X.mean(0)) ** 2)
    out["fvu"] = float(np.sum(R ** 2) / var)
    ref = bl.refit_gap(Xc, D, Z)
    out.update(refit_relative_gap=ref.relative_gap, refit_shrinkage=ref.shrinkage,
               loss_encoder=ref.loss_encoder, loss_refit=ref.loss_refit, l0_refit=ref.l0_refit)
    Zr = bl.nnls_refit(Xc, D, Z)
    out["fvu_refit"] = float(np.sum((Xc - Zr @ D) ** 2) / var)
    st = bl.plain_centroid_stationarity(Xc, D, Zr)
    used = ~np.isnan(st.noise_ratio)
    out.update(stat_noise_median=float(np.median(st.noise_ratio[used])),
               stat_noise_max=st.max_noise_ratio,
               stat_noise_over3=float(np.mean(st.noise_ratio[used] > 3)),
               stat_ratio_median=float(np.median(st.ratio[used])), stat_used=st.n_used)
    m = a.move_rows
    t0 = time.perf_counter()
    if arch == "l1":
        # swaps only, under a per-token budget equal to the token's own L0
        own = np.maximum((Zr[:m] > 0).sum(1), 1)
        dec_n, kind_n, loss_n = np.zeros(m), np.empty(m, dtype=object), np.zeros(m)
        for budget in np.unique(own):           # tokens with the same L0 share one call
            rows = np.flatnonzero(own == budget)
            mv = bl.local_moves(Xc[rows], D, Zr[rows], k=int(budget), refit=False)
            dec_n[rows], kind_n[rows] = mv.decrease, mv.move
            loss_n[rows] = 0.5 * np.sum((Xc[rows] - Zr[rows] @ D) ** 2, 1)
        frac, dec, loss = float(np.mean(kind_n != "")), float(dec_n.mean()), float(loss_n.mean())
        by = {kind: float(np.mean(kind_n == kind)) for kind in ("add", "remove", "swap")}
        out["moves_under"] = "own L0 budget (swaps)"
    else:
        if arch == "topk":
            mv = bl.local_moves(Xc[:m], D, Zr[:m], k=int(k), refit=False)
            out["moves_under"] = f"k={int(k)}"
        else:
            mv = bl.local_moves(Xc[:m], D, Zr[:m], eps=eps, refit=False)
            out["moves_under"] = f"eps={eps:.4g}"
        frac, dec, loss, by = mv.fraction_improvable, mv.mean_decrease, mv.loss, mv.fraction_by_move
    out.update(moves_improvable=frac, moves_mean_decrease=dec, moves_loss=loss,
               moves_relative_decrease=dec / loss if loss > 0 else 0.0, moves_by=by,
               moves_seconds=round(time.perf_counter() - t0, 1))
    mm = bl.matched_lambda(Xc[:a.matched_rows], D, float(l0[:a.matched_rows].mean()))
    out.update(matched_lambda=mm.lam, matched_l0=mm.l0)
    Zl = mm.Z
    out["matched_fvu"] = float(np.sum((Xc[:a.matched_rows] - Zl @ D) ** 2)
                               / np.sum((X[:a.matched_rows] - X[:a.matched_rows].mean(0)) ** 2))
    out["fvu_first_matched_rows"] = float(np.sum(R[:a.matched_rows] ** 2)
                                          / np.sum((X[:a.matched_rows] - X[:a.matched_rows].mean(0)) ** 2))
    rates = act.mean(0)
    out["dense_30"] = int((rates > 0.3).sum())
    anti = antipodality(sae.W_dec.detach(), sae.W_enc.detach()).score
    out["antipodal_05"] = int((anti > 0.5).sum())
    g = torch.Generator().manual_seed(0)
    null = torch.randn(*D.shape, generator=g, dtype=torch.float64)
    null = antipodality(null / null.norm(dim=1, keepdim=True)).score
    out["antipodal_null_max"] = float(null.max())
    return out


def measure_job(args) -> dict:
    folder, arch, a = args
    cached = pathlib.Path(a.out) / "measured" / f"{pathlib.Path(folder).name}.json"
    if a.resume and cached.exists():
        return json.loads(cached.read_text())
    T = np.load(pathlib.Path(a.cache) / "test.npy", mmap_mode="r")
    T = np.asarray(T[:max(a.rows, a.move_rows, a.matched_rows)], dtype=np.float64)
    t0 = time.perf_counter()
    out = measure(pathlib.Path(folder), arch, a, T)
    out["measure_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"measured {out['name']}: L0 {out['l0']:.2f}, FVU {out['fvu']:.3f}, refit gap "
          f"{out['refit_relative_gap']:.3f}, moves {out['moves_improvable']:.3f}", flush=True)
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps(out))
    return out


def main(argv=None) -> None:
    a = parse(argv)
    if a.smoke:
        a.width, a.k, a.seeds, a.steps, a.batch_size = 32, 3, [0], 30, 64
        a.rows, a.move_rows, a.matched_rows, a.jumprelu_init = 400, 20, 200, 0.01
    cache = pathlib.Path(a.cache)
    if not (cache / "train.npy").exists():
        sys.exit(f"{cache}/train.npy is missing: run `python tools/lm_study.py` first (it collects the tokens)")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = jobs(a)
    names = [name(*j, a.width) for j in todo]
    train = [j for j, nm in zip(todo, names) if (not a.only or nm in a.only)
             and not (a.resume and (out / nm / "train.json").exists())]
    records = []
    with cf.ProcessPoolExecutor(a.jobs, max_tasks_per_child=1) as pool:
        for r in pool.map(train_one, train, [a] * len(train)):
            records.append(r)
            print(f"trained {r}", flush=True)
    records = [json.loads((out / nm / "train.json").read_text()) for nm in names
               if not a.only or nm in a.only]
    l1 = sorted(pathlib.Path(a.l1_study).glob(f"saelens_K{a.width}_seed*")) if not a.smoke else []
    work = [(str(out / nm), j[0], a) for nm, j in zip(names, todo)] + [(str(f), "l1", a) for f in l1]
    if a.only:
        work = [w for w in work if pathlib.Path(w[0]).name in a.only]
    with cf.ProcessPoolExecutor(a.jobs, max_tasks_per_child=1) as pool:
        measured = list(pool.map(measure_job, work))
    import sae_lens

    results = {
        "command": "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "cache", "l1_study", "only")},
        "trained": records, "saes": measured,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "sae_lens": sae_lens.__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    if not a.only:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"done in {results['wall_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
