"""Chapter 8's SAEs on MiniLM's residual stream, trained once as practitioners train them, and saved.

Data (``companion.lm.docs_corpus``): the committed documentation corpus, split by source into
training documents and held-out documents (10% of the sources: other modules and topics).
Block ``--layer`` (default 3) of the bundled all-MiniLM-L6-v2 is read on every token of both
(``companion.lm.lm_activations``, batched, written to memory-mapped ``.npy`` files in
``--cache``; nothing of it is committed).

SAEs, at the book's lambda (default 1): SAELens (``StandardTrainingSAE`` through
``SAETrainer``, ``companion.lm.train_saelens_sae``) at every width of ``--widths`` (seed 0) and
at the headline width ``--headline`` with seeds 0, 1, 2; ``companion.train_sae`` at the
headline width, seed 0. Adam at a constant learning rate, ``--steps`` steps of
``--batch-size`` training tokens (2.9 epochs by default). Every ``--eval-every`` steps
the book's SAE loss is recorded on a fixed sample of ``--curve-rows`` held-out tokens, and the minibatch loss at every step: the curves that show where the held-out
loss levels off.

Each SAE goes to its own folder of ``--out`` (default ``tools/lm_study``), named
``{trainer}_K{K}_seed{seed}``, in SAELens' own format (``sae_weights.safetensors`` and
``cfg.json``: ``sae_lens.SAE.load_from_disk`` and ``companion.load_sae`` read it; companion's
SAEs are written by ``companion.save_sae``), float32, with ``curves.json`` (the minibatch loss
and the held-out curve). ``manifest.json`` records the command, the configuration, the token
counts, the versions and the wall time of every stage. Jobs run ``--jobs`` at a time, one CPU
thread each.

From each SAELens dictionary at the headline width, ``companion.fit_dictionary`` descends on the
first ``--descent-rows`` training tokens (centred by the SAE's ``b_dec``) until T2 is at most
``--descent-tol`` (or ``--descent-seconds`` pass; the manifest says which) and the stationary
dictionary goes to ``stationary.safetensors`` (``D``, float32, unit rows) beside the SAE.

    python tools/lm_study.py                        # everything (about an hour on 2 CPU cores)
    python tools/lm_study.py --smoke --out /tmp/x   # seconds: a check that it runs
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "tools" / "lm_study"))
    p.add_argument("--cache", default=str(ROOT / "tools" / "lm_cache"),
                   help="folder for the activation memory maps (git-ignored)")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1536, 3072])
    p.add_argument("--headline", type=int, default=768)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--curve-rows", type=int, default=16384)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--descent-rows", type=int, default=4096,
                   help="training tokens (the first ones) the stationary descents run on")
    p.add_argument("--descent-tol", type=float, default=2e-5)
    p.add_argument("--descent-seconds", type=float, default=1800)
    p.add_argument("--reuse-cache", action="store_true",
                   help="skip the collection when --cache already holds it (collect.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the SAEs (train.json) and stationary points (descent.json) already in --out")
    p.add_argument("--smoke", action="store_true", help="tiny: 90 documents, widths 16/32, one seed, 40 steps")
    return p.parse_args(argv)


def jobs(a: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(trainer, K, seed) of every SAE: SAELens' at the headline width first (their descents
    start as soon as each is saved), then the rest, largest first."""
    head = [("saelens", a.headline, s) for s in a.seeds]
    rest = [("saelens", K, 0) for K in a.widths if K != a.headline]
    rest += [("companion", a.headline, 0)]
    return head + sorted(rest, key=lambda j: (-j[1], j[0], j[2]))


def name(trainer: str, K: int, seed: int) -> str:
    return f"{trainer}_K{K}_seed{seed}"


def collect(a: argparse.Namespace) -> dict:
    """Activations of the training and held-out documents, written to ``--cache``."""
    from companion.lm import docs_corpus, lm_activations

    cache = pathlib.Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if a.reuse_cache and (cache / "collect.json").exists():
        return json.loads((cache / "collect.json").read_text())
    info = {}
    for split in ("train", "test"):
        t0 = time.perf_counter()
        docs = docs_corpus(split)
        if a.smoke:
            docs = docs[:60 if split == "train" else 30]
        acts = lm_activations(docs, layer=a.layer, max_tokens=10**8, progress=True,
                              out=cache / f"{split}.npy")
        info[split] = {"tokens": int(acts.X.shape[0]), "documents": len(acts.texts),
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{split}: {info[split]}", flush=True)
    (cache / "collect.json").write_text(json.dumps(info))
    return info


def curve_rows(n: int, m: int, seed: int) -> torch.Tensor:
    """A fixed sample of ``min(m, n)`` row indices."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:min(m, n)].sort().values


def train_one(job: tuple[str, int, int], a: argparse.Namespace) -> dict:
    """Train one SAE (one CPU thread), save it, return what the manifest records."""
    torch.set_num_threads(1)
    import companion
    from companion.lm import train_saelens_sae

    trainer, K, seed = job
    cache = pathlib.Path(a.cache)
    X = torch.from_numpy(np.load(cache / "train.npy"))
    T = torch.from_numpy(np.load(cache / "test.npy"))
    Tc = T[curve_rows(len(T), a.curve_rows, 2)]
    folder = pathlib.Path(a.out) / name(*job)
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    if trainer == "saelens":
        run = train_saelens_sae(X, K, a.lam, folder, steps=a.steps, batch_size=a.batch_size,
                                lr=a.lr, seed=seed, eval_X=Tc, eval_every=a.eval_every)
    else:
        run = companion.train_sae(X, K, a.lam, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                  seed=seed, progress=False, num_threads=1, eval_X=Tc,
                                  eval_every=a.eval_every)
        companion.save_sae(run.sae, folder, lam=a.lam)
    seconds = time.perf_counter() - t0
    curves = {"minibatch": [round(v, 5) for v in run.loss_history],
              "heldout_steps": [s for s, _ in run.eval_history],
              "heldout": [round(v, 5) for _, v in run.eval_history], "heldout_rows": len(Tc)}
    (folder / "curves.json").write_text(json.dumps(curves))
    record = {"name": name(*job), "trainer": trainer, "K": K, "seed": seed, "seconds": round(seconds, 1)}
    (folder / "train.json").write_text(json.dumps(record))
    return record


def descend(job: tuple[str, int, int], a: argparse.Namespace) -> dict:
    """From one SAE's dictionary, descend on the first ``--descent-rows`` training tokens
    (centred by the SAE's b_dec) to a stationary point; save it beside the SAE."""
    torch.set_num_threads(1)
    import warnings

    import companion
    from companion.interop import CheckpointWarning
    from safetensors.torch import save_file

    folder = pathlib.Path(a.out) / name(*job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        sae = companion.load_sae(folder, dtype=torch.float64).sae
    X = torch.from_numpy(np.load(pathlib.Path(a.cache) / "train.npy", mmap_mode="r")[:a.descent_rows].copy())
    Xc, D, _ = sae.joint_view(X.double())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # a stop before tol is recorded below
        fit = companion.fit_dictionary(Xc, D.shape[0], a.lam, init=D, tol=a.descent_tol,
                                       max_iter=100000, time_limit=a.descent_seconds,
                                       progress=False, n_threads=1)
    save_file({"D": fit.D.float().contiguous()}, str(folder / "stationary.safetensors"))
    record = {"name": name(*job), "rows": len(Xc), "converged": bool(fit.converged),
              "message": fit.message, "n_iter": fit.n_iter, "t2": fit.certificate.t2_violation,
              "loss_train": fit.loss, "seconds": round(time.perf_counter() - t0, 1)}
    (folder / "descent.json").write_text(json.dumps(record))
    return record


def main(argv=None) -> None:
    a = parse(argv)
    if a.smoke:
        a.widths, a.headline, a.seeds, a.steps, a.batch_size = [16, 32], 16, [0], 40, 64
        a.eval_every, a.curve_rows, a.descent_rows, a.descent_seconds = 10, 200, 300, 60
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = collect(a)
    todo = jobs(a)
    done, descents = [], []
    kept = lambda j, f: a.resume and (out / name(*j) / f).exists()
    read = lambda j, f: json.loads((out / name(*j) / f).read_text())
    with cf.ProcessPoolExecutor(a.jobs, max_tasks_per_child=1) as pool:
        futures = {}
        for j in todo:
            if kept(j, "train.json"):
                done.append(read(j, "train.json"))
                if j[0] == "saelens" and j[1] == a.headline:
                    if kept(j, "descent.json"):
                        descents.append(read(j, "descent.json"))
                    else:
                        futures[pool.submit(descend, j, a)] = ("descent", j)
        futures.update({pool.submit(train_one, j, a): ("train", j) for j in todo if not kept(j, "train.json")})
        while futures:
            finished, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                kind, j = futures.pop(f)
                if kind == "train":
                    done.append(f.result())
                    print(f"trained {done[-1]}", flush=True)
                    if j[0] == "saelens" and j[1] == a.headline:
                        futures[pool.submit(descend, j, a)] = ("descent", j)
                else:
                    descents.append(f.result())
                    print(f"descended {descents[-1]}", flush=True)
    import sae_lens
    import transformers

    manifest = {
        "command": "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "cache")},
        "data": data, "saes": sorted(done, key=lambda r: todo.index((r["trainer"], r["K"], r["seed"]))),
        "stationary": sorted(descents, key=lambda r: r["name"]),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "compute_seconds": round(sum(r["seconds"] for r in done + descents), 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "sae_lens": sae_lens.__version__, "transformers": transformers.__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"done in {manifest['wall_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
