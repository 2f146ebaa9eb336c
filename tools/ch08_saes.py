"""Chapter 8's fourteen SAEs, trained once and saved, so that the chapter only loads them.

The chapter reads block 3 of the bundled MiniLM on 5000 tokens of Python's documentation
(``companion.lm.lm_activations(layer=3, max_tokens=5000, seed=0)``) and holds out the last 40%
of the paragraphs. On the other 60% this script trains, at (lambda, K) in
{(1, 192), (1, 384), (1, 768), (2, 192), (2, 384)} (seeds 0, 1, 2 at (1, 192), seed 0
elsewhere), one vanilla SAE with ``companion.train_sae`` (Adam, random unit decoder rows, tied
encoder, decoder bias at the mean) and one with SAELens (``companion.lm.train_saelens_sae``:
``SAETrainer`` on a ``StandardTrainingSAE``), 2000 steps of 128 tokens at K <= 384 and 3000 at
K = 768, learning rate 3e-3, constant.

Every SAE goes to its own folder of ``--out`` (default ``tools/ch08_saes``), named
``{trainer}_lam{lam:g}_K{K}_seed{seed}``:

- SAELens' SAEs as SAELens wrote them (``save_inference_model``: ``sae_weights.safetensors`` and
  ``cfg.json``, readable by ``sae_lens.SAE.load_from_disk`` and by ``companion.load_sae``);
- companion's with ``companion.save_sae`` (the same SAELens layout, with ``companion_lam``);
- both with ``loss_history.json``: the minibatch loss at every step in the book's convention.

All weights are float32, as trained. ``manifest.json`` records the command, the configuration,
the token counts, the versions, and the wall time of each SAE and of the whole run.

Then, from eight of the dictionaries (lambda = 1: every seed at K = 192, seed 0 at K = 384),
``companion.fit_dictionary`` descends on the training tokens (centred by the SAE's ``b_dec``)
to a stationary point with T2 at most ``STATIONARY_TOL`` (1e-5, ten times below the 1e-4 the
chapter certifies, so that float32 storage and another machine's activations keep it certified);
its dictionary goes to ``stationary.safetensors`` (``D``, float32, unit rows) beside the SAE,
and what the descent reported to ``manifest-stationary.json``. The chapter re-certifies each
one on the training tokens and evaluates it on the held-out tokens.

    python tools/ch08_saes.py                          # SAEs and stationary points (minutes)
    python tools/ch08_saes.py --stationary-only        # only the descents, from the saved SAEs
    python tools/ch08_saes.py --smoke --out /tmp/x     # seconds: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time

import torch

import companion
from companion.interop import checkpoint_lam
from companion.lm import lm_activations, train_saelens_sae

SETTINGS = [(1.0, 192), (1.0, 384), (1.0, 768), (2.0, 192), (2.0, 384)]
SEEDS = (0, 1, 2)                     # all three at (lambda, K) = (1, 192), seed 0 elsewhere
STEPS = {192: 2000, 384: 2000, 768: 3000}
BATCH, LR = 128, 3e-3
LAYER, TOKENS, TRAIN_SHARE = 3, 5000, 0.6
STATIONARY_TOL, STATIONARY_MAX_ITER = 1e-5, 2000


def name(trainer: str, lam: float, K: int, seed: int) -> str:
    """The folder of one SAE inside the output folder."""
    return f"{trainer}_lam{lam:g}_K{K}_seed{seed}"


def runs(smoke: bool = False) -> list[tuple[str, float, int, int]]:
    """(trainer, lam, K, seed) of every SAE, in the chapter's order."""
    if smoke:
        return [("companion", 1.0, 16, 0), ("saelens", 1.0, 16, 0)]
    out = []
    for lam, K in SETTINGS:
        for seed in (SEEDS if (lam, K) == (1.0, 192) else (0,)):
            out += [("companion", lam, K, seed), ("saelens", lam, K, seed)]
    return out


def descended(smoke: bool = False) -> list[tuple[str, float, int, int]]:
    """(trainer, lam, K, seed) of the SAEs whose dictionaries are descended to a stationary point."""
    if smoke:
        return [("companion", 1.0, 16, 0)]
    return [r for r in runs() if r[1] == 1.0 and (r[2] == 192 or (r[2] == 384 and r[3] == 0))]


def descend(out: pathlib.Path, X_train: torch.Tensor, smoke: bool) -> dict:
    """Descend from each dictionary of ``descended()`` on the training tokens; save D°."""
    import warnings

    from safetensors.torch import save_file

    from companion.interop import CheckpointWarning

    started, done = time.time(), []
    for trainer, lam, K, seed in descended(smoke):
        folder = out / name(trainer, lam, K, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            sae = companion.load_sae(folder, dtype=torch.float64).sae
        Xc, D, _ = sae.joint_view(X_train.double())
        t = time.time()
        fit = companion.fit_dictionary(Xc, K, lam, init=D, tol=STATIONARY_TOL,
                                       max_iter=STATIONARY_MAX_ITER, progress=False)
        save_file({"D": fit.D.detach().float().cpu().contiguous()},
                  str(folder / "stationary.safetensors"))
        row = {"folder": folder.name, "converged": bool(fit.converged), "message": fit.message,
               "n_iter": fit.n_iter, "t2": fit.certificate.t2_violation,
               "loss_train": fit.loss, "seconds": round(time.time() - t, 1)}
        done.append(row)
        print(f"{folder.name}: stationary point after {fit.n_iter} iterations, T2 "
              f"{fit.certificate.t2_violation:.1e}, {row['seconds']} s", flush=True)
    return {"tol": STATIONARY_TOL, "max_iter": STATIONARY_MAX_ITER, "points": done,
            "seconds": round(time.time() - started, 1)}


def split(acts) -> torch.Tensor:
    """The chapter's training tokens: those of the first 60% of the paragraphs."""
    return acts.doc < int(TRAIN_SHARE * len(acts.texts))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tools/ch08_saes", help="folder to write (replaced)")
    p.add_argument("--smoke", action="store_true", help="two tiny SAEs, 50 steps, 600 tokens")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these models are small, and on a shared "
                        "machine more threads wait on each other)")
    p.add_argument("--stationary-only", action="store_true",
                   help="keep the saved SAEs; only (re)compute the stationary points")
    args = p.parse_args(argv)
    started = time.time()
    device = companion.setup(seed=0)
    torch.set_num_threads(args.threads)
    acts = lm_activations(layer=LAYER, max_tokens=600 if args.smoke else TOKENS, seed=0,
                          device=device)
    train = split(acts)
    X_train = acts.X[train]
    out = pathlib.Path(args.out)
    command = ("python tools/ch08_saes.py " + " ".join(shlex.quote(a) for a in argv)).strip()

    def write_stationary():
        report = dict(descend(out, X_train, args.smoke), command=command,
                      torch=torch.__version__, cpu_threads=torch.get_num_threads())
        (out / "manifest-stationary.json").write_text(json.dumps(report, indent=1) + "\n")

    if args.stationary_only:
        write_stationary()
        return 0
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = {
        "command": command,
        "config": {"layer": LAYER, "tokens": acts.X.shape[0], "train_share": TRAIN_SHARE,
                   "batch_size": BATCH, "lr": LR, "init": "random",
                   "steps": {str(k): v for k, v in STEPS.items()} if not args.smoke else {"16": 50}},
        "n_train": int(train.sum()),
        "n_test": int((~train).sum()),
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "saes": [],
    }
    for trainer, lam, K, seed in runs(args.smoke):
        steps = 50 if args.smoke else STEPS[K]
        folder = out / name(trainer, lam, K, seed)
        t = time.time()
        if trainer == "companion":
            fit = companion.train_sae(X_train, K, lam, steps=steps, batch_size=BATCH, lr=LR,
                                      seed=seed, init="random", num_threads=args.threads,
                                      progress=False)
            companion.save_sae(fit.sae, folder, lam=lam)
            history = fit.loss_history
        else:
            run = train_saelens_sae(X_train, K, lam, folder, steps=steps, batch_size=BATCH,
                                    lr=LR, seed=seed)
            assert checkpoint_lam(run.checkpoint, lam) == lam      # λ read back from cfg.json
            history = run.loss_history
        (folder / "loss_history.json").write_text(json.dumps([float(h) for h in history]) + "\n")
        seconds = round(time.time() - t, 1)
        manifest["saes"].append({"folder": folder.name, "trainer": trainer, "lam": lam, "K": K,
                                 "seed": seed, "steps": steps, "seconds": seconds,
                                 "plateau_fall": companion.plateau_fall(history)})
        print(f"{folder.name}: {seconds} s, loss fell {100 * companion.plateau_fall(history):.2f}% "
              "over the last fifth", flush=True)
    manifest["seconds"] = round(time.time() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {len(manifest['saes'])} SAEs, {size / 1e6:.1f} MB, "
          f"{manifest['seconds']} s on {device.type}")
    write_stationary()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
