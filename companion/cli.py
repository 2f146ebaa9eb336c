"""Command line: ``python -m companion certify CHECKPOINT ACTIVATIONS.npy --lam L`` (Chapter 7, how-to).

Loads a vanilla SAE (SAELens directory or dictionary_learning ``ae.pt``, see
:mod:`companion.interop`) and a 2-D ``.npy`` array of activations (one row per activation
vector, ``d_in`` columns), certifies the SAE as it is and its dictionary with exact codes
(:func:`companion.interop.certify_sae`), prints a readable report, and writes the full report
as JSON on request. Progress bars go to stderr.

The activations are streamed: the ``.npy`` file is memory-mapped and read, cast and certified
chunk by chunk, so memory follows ``--chunk-size`` (times ``d_sae``), not the number of rows.
``--max-rows N`` certifies N rows drawn at random (``--seed``) rather than the first N, which
in a token-ordered file would be a biased sample.

A SAELens TopK, BatchTopK or JumpReLU checkpoint gets Chapter 9's certificates instead
(:func:`companion.beyond_l1.certify_sparse_sae`: the support-refit gap, the local-move
certificate, plain-centroid stationarity and the matched-λ L1 view), at its own ``k`` or
JumpReLU's ε, in one process, on ``--max-rows`` rows drawn at random (default 4096: the
local moves cost a small NNLS per row); ``--lam`` does not apply to it.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the row pass is shared: every
process memory-maps the same file, certifies every ``WORLD_SIZE``-th chunk of rows on its own
device (``cuda:LOCAL_RANK`` with the NCCL backend when CUDA is present, else the CPU with gloo),
the sums are all-reduced, and rank 0 prints the report and writes the JSON, which records
``world_size``::

    torchrun --nproc_per_node 8 -m companion certify CHECKPOINT ACTS.npy --json report.json

Exit status: 0 on success; 2 on bad input (missing, corrupt or non-regular file, unreadable
checkpoint, wrong shapes, a width that is not ``d_in``, a λ that is not positive or disagrees
with the checkpoint's, an unusable ``--device``, an unwritable ``--json`` directory), with one
line on stderr that says what was wrong.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import os
import warnings

import numpy as np
import torch

from .beyond_l1 import SparseCheckpoint, certify_sparse_sae
from .interop import (CheckpointError, CheckpointWarning, LamMismatchError, certify_sae, checkpoint_eps,
                      checkpoint_lam, load_sae, open_activations)

__all__ = ["build_parser", "main"]

PROG = "python -m companion"


class InputError(Exception):
    """Bad input on the command line: reported on stderr with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m companion``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Optimality certificates for sparse autoencoders (companion to arXiv 2606.02385).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser(
        "certify",
        help="certify a vanilla SAE checkpoint on a batch of activations",
        description=(
            "Certify a vanilla SAE on activations: T1 (are the encoder's codes exact for its "
            "dictionary?), T2 (is the dictionary stationary?), the duality gap, the best new "
            "atom, dead atoms, the gap to the T4 Huber bound, and the amortisation gap "
            "L(D, Z_SAE) - F(D). λ is the book's: the SAE loss is 0.5*||x - x_hat||^2 + λ * "
            "sum_k ||W_dec[k]|| z_k, SAELens' training loss divided by 2 (its l1_coefficient "
            "is 2λ). A point passing T1 and T2 is a certified stationary point, not an optimum; "
            "only meeting the Huber bound certifies a global one."
        ),
    )
    c.add_argument("checkpoint", help="SAELens directory (sae_weights.safetensors + cfg.json) "
                                      "or dictionary_learning ae.pt (or its directory)")
    c.add_argument("activations", help=".npy file with a 2-D array (n_samples, d_in)")
    c.add_argument("--lam", type=float, default=None,
                   help="penalty λ > 0; optional when the checkpoint records it")
    c.add_argument("--override-lam", action="store_true",
                   help="certify at --lam even when it disagrees with the checkpoint's λ")
    c.add_argument("--eps", type=float, default=None,
                   help="JumpReLU/BatchTopK SAEs: the L0 price ε > 0 to certify at; needed when the "
                        "checkpoint records none (Chapter 9)")
    c.add_argument("--override-eps", action="store_true",
                   help="certify at --eps even when it disagrees with the checkpoint's ε")
    c.add_argument("--json", metavar="OUT", default=None, help="also write the full report as JSON here")
    c.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="rows per chunk (memory grows with N * d_sae)")
    c.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="certify N rows drawn at random without replacement (see --seed)")
    c.add_argument("--seed", type=int, default=0, help="seed of the --max-rows sample (default 0)")
    c.add_argument("--activation-scale", type=float, default=None, metavar="S",
                   help="SAELens' expected_average_only_in scale factor s (training saw s*x); "
                        "then λ = l1_coefficient / (2 s)")
    c.add_argument("--no-exact", action="store_true",
                   help="skip the exact codes (faster; no amortisation gap or dictionary verdict)")
    c.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    c.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the certificates (default float64)")
    c.add_argument("--digits", type=int, default=4, metavar="N",
                   help="significant digits in the printed report (default 4; the JSON is exact)")
    c.add_argument("--alpha", type=float, default=0.05,
                   help="family-wise level of the statistical stationarity test (default 0.05)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def _positive_int(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise InputError(f"{flag} must be >= 1, got {value}")
    return value


def _device(choice: str | None) -> torch.device:
    """The torch device asked for, checked to be usable here (default CUDA if available)."""
    choice = choice or os.environ.get("COMPANION_DEVICE")
    if not choice:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {choice!r} is not a torch device (try 'cpu' or 'cuda')") from None
    try:
        torch.zeros(1, device=dev)
    except (RuntimeError, AssertionError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--device {choice!r} is not usable with this torch build: {first}") from None
    return dev


def _check_json_target(path: str | None) -> None:
    if path is None:
        return
    out = pathlib.Path(path)
    parent = out.parent if str(out.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise InputError(f"--json {path!r}: directory {str(parent)!r} does not exist")
    if out.is_dir():
        raise InputError(f"--json {path!r} is a directory; give a file name")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--json {path!r}: directory {str(parent)!r} is not writable")


def _open_activations(path: pathlib.Path, d_in: int) -> np.ndarray:
    """The activations as a read-only memory map, checked without reading the rows."""
    try:
        return open_activations(path, d_in)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None


def _distributed(device: torch.device, explicit: bool) -> tuple[torch.device, int, int]:
    """Under torchrun: join the process group (NCCL on CUDA, else gloo); (device, rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return device, 0, 1
    import torch.distributed as dist

    if device.type == "cuda" and not explicit:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def _sample_rows(n: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """A uniform random subset of ``max_rows`` row indices (sorted, for sequential reads)."""
    if max_rows is None or max_rows >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def _certify(args: argparse.Namespace) -> int:
    chunk = _positive_int(args.chunk_size, "--chunk-size")
    max_rows = _positive_int(args.max_rows, "--max-rows")
    digits = _positive_int(args.digits, "--digits")
    _check_json_target(args.json)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = _device(args.device)
    explicit = bool(args.device or os.environ.get("COMPANION_DEVICE"))
    device, rank, world = _distributed(device, explicit)
    if not 0 < args.alpha < 1:
        raise InputError(f"--alpha must lie in (0, 1), got {args.alpha}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        ckpt = load_sae(args.checkpoint, device=device, dtype=dtype,
                        activation_scale=args.activation_scale)
    if isinstance(ckpt, SparseCheckpoint):
        return _certify_sparse(args, ckpt, rank)
    if args.eps is not None:
        raise InputError(f"--eps applies to JumpReLU and BatchTopK SAEs; {args.checkpoint} is an L1 SAE, "
                         "certified at its λ")
    lam = checkpoint_lam(ckpt, args.lam, override=args.override_lam)
    A = _open_activations(pathlib.Path(args.activations), ckpt.sae.d_in)
    rows = _sample_rows(A.shape[0], max_rows, args.seed)
    n = A.shape[0] if rows is None else rows.size
    cert = certify_sae(ckpt.sae, A, lam, exact=not args.no_exact, chunk_size=chunk,
                       progress=not args.no_progress and rank == 0, rows=rows, alpha=args.alpha,
                       process_group=True if world > 1 else None)
    if rank != 0:
        return 0

    if args.lam is None:
        lam_from = f"from the checkpoint: {ckpt.lam_source}"
    elif ckpt.lam is None:
        lam_from = "from --lam"
    elif args.override_lam and abs(args.lam - ckpt.lam) > 1e-6 * max(args.lam, ckpt.lam):
        lam_from = f"from --lam, overriding the checkpoint's {ckpt.lam:g}"
    else:
        lam_from = "from --lam, agrees with the checkpoint"
    sample = (f"{n} rows" if rows is None else
              f"{n} of {A.shape[0]} rows, drawn at random with --seed {args.seed}")
    head = [
        f"checkpoint   {ckpt.path}  ({ckpt.layout}; d_in={ckpt.sae.d_in}, d_sae={ckpt.sae.d_sae})",
        f"activations  {args.activations}  ({sample})",
        f"lambda       {lam:g}  ({lam_from})",
    ]
    if world > 1:
        head.append(f"processes    {world} (torch.distributed, rows shared, sums all-reduced)")
    if ckpt.activation_scale is not None:
        head.append(f"scale        activations were multiplied by s = {ckpt.activation_scale:g} in "
                    "training; the SAE is certified on the raw scale")
    head += [f"note         {w.message}" for w in caught if issubclass(w.category, CheckpointWarning)]
    print("\n".join(head) + "\n")
    print(cert.summary(digits=digits))
    if args.json:
        out = pathlib.Path(args.json)
        payload = {
            "checkpoint": str(ckpt.path), "layout": ckpt.layout, "activations": str(args.activations),
            "n_samples": int(n), "n_rows_in_file": int(A.shape[0]),
            "row_sample": None if rows is None else {"method": "uniform without replacement", "seed": args.seed},
            "d_in": ckpt.sae.d_in, "d_sae": ckpt.sae.d_sae, "activation_scale": ckpt.activation_scale,
            "lam_source": lam_from, **cert.to_dict(),
        }
        try:
            out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        except OSError as e:
            raise InputError(f"could not write --json {str(out)!r}: {e}") from None
        print(f"\nwrote {out}")
    return 0


def _certify_sparse(args: argparse.Namespace, ckpt: SparseCheckpoint, rank: int) -> int:
    """A TopK, BatchTopK or JumpReLU checkpoint: Chapter 9's certificates (one process)."""
    if args.lam is not None:
        raise InputError(f"--lam applies to L1 SAEs; {args.checkpoint} is a {ckpt.architecture} SAE, "
                         "certified under its own k or JumpReLU's eps")
    if rank != 0:
        return 0
    A = _open_activations(pathlib.Path(args.activations), ckpt.sae.d_in)
    # the local moves cost a small NNLS per sample and candidate: 4096 random rows by default
    rows = _sample_rows(A.shape[0], args.max_rows if args.max_rows is not None else 4096, args.seed)
    X = np.array(A if rows is None else A[np.sort(rows)])
    try:
        eps = checkpoint_eps(ckpt, args.eps, override=args.override_eps)
    except ValueError as e:
        raise InputError(str(e).replace("pass override=True", "pass --override-eps")) from None
    if eps is None and ckpt.architecture == "jumprelu":
        raise InputError(f"{args.checkpoint} is a JumpReLU SAE and records no price eps "
                         f"({ckpt.eps_source}); give it with --eps")
    cert = certify_sparse_sae(ckpt.sae, X, eps=eps, max_samples=None)
    budget = f"k = {ckpt.k:g}" if ckpt.k is not None else "no k"
    if eps is None:
        price = f"no eps ({ckpt.eps_source})"
    elif args.eps is not None:
        price = f"eps = {eps:g} (from --eps)"
    else:
        price = f"eps = {eps:g} ({ckpt.eps_source})"
    print(f"checkpoint   {ckpt.path}  ({ckpt.architecture}; d_in={ckpt.sae.d_in}, d_sae={ckpt.sae.d_sae}; "
          f"{budget}; {price})\nactivations  {args.activations}  ({X.shape[0]} rows)\n")
    print(cert.summary())
    if args.json:
        payload = {"checkpoint": str(ckpt.path), "architecture": ckpt.architecture, "k": ckpt.k,
                   "eps": eps, "eps_source": "--eps" if args.eps is not None else ckpt.eps_source, "activations": str(args.activations),
                   "n_samples": int(X.shape[0]), "summary": cert.summary().splitlines()}
        try:
            pathlib.Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        except OSError as e:
            raise InputError(f"could not write --json {args.json!r}: {e}") from None
        print(f"\nwrote {args.json}")
    return 0


def _finish_distributed() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - shutting down
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "certify":
            try:
                return _certify(args)
            finally:
                _finish_distributed()
    except (InputError, FileNotFoundError, CheckpointError, LamMismatchError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2
