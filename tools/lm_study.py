"""The larger version of Chapter 8: SAEs on a language model's residual stream, certified.

For every layer, penalty, width and seed: train a vanilla SAE with ``companion.train_sae`` and
one with SAELens (``companion.lm.train_saelens_sae``), certify both on held-out tokens
(``companion.certify_sae``: SAE codes and exact codes), and write a JSON summary of the
ladder (SAE loss >= F_b(D) >= Huber bound), T1 in units of lambda, T2, the best new atom,
dead atoms, L0, the amortisation gap and how far each SAE is from a loss plateau (the relative
fall of its mean minibatch loss over the last fifth of training, Chapter 8's criterion), with
the command that produced it. The JSON is rewritten after every SAE, so a run cut short by a
time limit keeps what it finished (``"complete": false``); the same command with ``--resume``
runs only the SAEs still missing.

    python tools/lm_study.py --out lm_study.json                     # the default larger run
    python tools/lm_study.py --smoke --out /tmp/lm_smoke.json        # seconds: a check that it runs

Runs on CUDA when present (``companion.pick_device``), else on the CPU. Needs the ``lm``
extra and sae-lens; nothing is downloaded with the default (bundled) model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import torch

import companion
from companion.bounds import huber_bound
from companion.interop import certify_sae, checkpoint_lam
from companion.lm import lm_activations, train_saelens_sae


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder or id (default: bundled MiniLM)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--tokens", type=int, default=40000, help="tokens in all (train + held out)")
    p.add_argument("--test-share", type=float, default=0.25, help="share of documents held out")
    p.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1536, 3072])
    p.add_argument("--lams", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay-steps", type=int, default=0,
                   help="SAELens only: steps at the end over which its learning rate decays to 0")
    p.add_argument("--init", default="data", choices=["data", "random"],
                   help="companion.train_sae's decoder initialisation")
    p.add_argument("--trainers", nargs="+", default=["companion", "saelens"],
                   choices=["companion", "saelens"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration (1 layer, 600 tokens, width 64, 50 steps)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--resume", action="store_true",
                   help="keep the SAEs already in --out (written by the same command) and run the rest")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.tokens, args.widths, args.lams = [3], 600, [64], [1.0]
        args.seeds, args.steps, args.batch_size = [0], 50, 64
    return args


def summarise(sae, X_test: torch.Tensor, lam: float) -> dict:
    """The held-out certificates of one SAE as plain numbers."""
    cert = certify_sae(sae, X_test, lam)
    s, e = cert.sae_codes, cert.exact_codes
    Xc, _, Z = sae.joint_view(X_test)
    return {
        "sae_loss": s.loss,
        "exact_loss": e.loss,
        "huber_bound": huber_bound(Xc, lam),
        "amortisation_gap": cert.amortisation_gap,
        "relative_amortisation_gap": cert.relative_amortisation_gap,
        "t1_over_lam": s.t1_violation / lam,
        "t2_exact": e.t2_violation,
        "new_atom_gain": e.new_atom_gain,
        "dead_sae": len(s.dead_atoms),
        "dead_exact": len(e.dead_atoms),
        "l0_sae": float((Z > 0).sum(1).double().mean()),
        "l0_exact": float(e.usage.sum()) if hasattr(e.usage, "sum") else None,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    device = companion.setup(seed=0)
    results, started = [], time.time()
    summary = {
        "command": "python tools/lm_study.py " + " ".join(shlex.quote(a) for a in argv
                                                          if a != "--resume"),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "resume")},
        "device": str(device.type),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "complete": False,
        "tokens_per_layer": {},
        "results": results,
    }
    earlier = 0.0
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if old["config"] != summary["config"]:
            raise SystemExit(f"--resume: {args.out} was written with another configuration "
                             f"({old['command']}); rerun without --resume or with that command")
        results.extend(old["results"])
        earlier = old.get("seconds", 0.0)
    done = {(r["layer"], r["lam"], r["width"], r["seed"], r["trainer"]) for r in results}

    def write():
        summary["seconds"] = round(earlier + time.time() - started, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".part", "w") as f:              # a reader never sees half a file
            json.dump(summary, f, indent=1)
        os.replace(args.out + ".part", args.out)

    for layer in args.layers:
        acts = lm_activations(model=args.model, layer=layer, max_tokens=args.tokens, seed=0,
                              device=device)
        n_docs = len(acts.texts)
        train = acts.doc < int((1 - args.test_share) * n_docs)
        X_train, X_test = acts.X[train], acts.X[~train].double()
        summary["tokens_per_layer"][str(layer)] = {"train": int(train.sum()),
                                                   "test": int((~train).sum())}
        for lam in args.lams:
            for K in args.widths:
                for seed in args.seeds:
                    for trainer in args.trainers:
                        if (layer, lam, K, seed, trainer) in done:
                            continue
                        t = time.time()
                        if trainer == "companion":
                            fit = companion.train_sae(X_train, K, lam, steps=args.steps,
                                                      batch_size=args.batch_size, lr=args.lr,
                                                      seed=seed, init=args.init, progress=False)
                            sae, history = fit.sae.double(), fit.loss_history
                        else:
                            with tempfile.TemporaryDirectory() as tmp:
                                run = train_saelens_sae(X_train, K, lam, tmp, steps=args.steps,
                                                        batch_size=args.batch_size, lr=args.lr,
                                                        lr_decay_steps=args.lr_decay_steps,
                                                        seed=seed)
                                checkpoint_lam(run.checkpoint, lam)
                                sae, history = run.sae, run.loss_history
                        row = {"layer": layer, "lam": lam, "width": K, "seed": seed,
                               "trainer": trainer, "plateau_fall": companion.plateau_fall(history),
                               "train_loss_last_fifth": float(torch.tensor(
                                   history[-len(history) // 5:]).mean()),
                               **summarise(sae, X_test, lam),
                               "seconds": round(time.time() - t, 1)}
                        results.append(row)
                        write()
                        print(json.dumps(row), flush=True)
    summary["complete"] = True
    write()
    print(f"wrote {args.out}: {len(results)} SAEs in {summary['seconds']} s on {summary['device']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
