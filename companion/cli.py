"""Command line: ``python -m companion certify CHECKPOINT ACTIVATIONS.npy --lam L`` (Chapter 7, how-to).

Loads a vanilla SAE (SAELens directory or dictionary_learning ``ae.pt``, see
:mod:`companion.interop`) and a 2-D ``.npy`` array of activations (one row per activation
vector, ``d_in`` columns), certifies the SAE as it is and its dictionary with exact codes
(:func:`companion.interop.certify_sae`), prints a readable report, and writes the full report
as JSON on request. Progress bars go to stderr.

Exit status: 0 on success; 2 on bad input (missing file, unreadable checkpoint, wrong shapes,
a width that is not ``d_in``, a λ that is not positive or disagrees with the checkpoint's);
the message on stderr says what was wrong.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

import numpy as np
import torch

from .interop import CheckpointError, CheckpointWarning, LamMismatchError, certify_sae, checkpoint_lam, load_sae
from .runtime import pick_device

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
            "atom, dead atoms, and the amortisation gap L(D, Z_SAE) - F(D). λ is the book's: "
            "the SAE loss is 0.5*||x - x_hat||^2 + λ * sum_k ||W_dec[k]|| z_k (SAELens' "
            "l1_coefficient is 2λ)."
        ),
    )
    c.add_argument("checkpoint", help="SAELens directory (sae_weights.safetensors + cfg.json) "
                                      "or dictionary_learning ae.pt (or its directory)")
    c.add_argument("activations", help=".npy file with a 2-D array (n_samples, d_in)")
    c.add_argument("--lam", type=float, default=None,
                   help="penalty λ > 0; optional when the checkpoint records it")
    c.add_argument("--override-lam", action="store_true",
                   help="certify at --lam even when it disagrees with the checkpoint's λ")
    c.add_argument("--json", metavar="OUT", default=None, help="also write the full report as JSON here")
    c.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="rows per chunk (memory grows with N * d_sae)")
    c.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="certify only the first N rows of the activations")
    c.add_argument("--no-exact", action="store_true",
                   help="skip the exact codes (faster; no amortisation gap or dictionary verdict)")
    c.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    c.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the certificates (default float64)")
    c.add_argument("--digits", type=int, default=4, metavar="N",
                   help="significant digits in the printed report (default 4; the JSON is exact)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser


def _positive_int(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise InputError(f"{flag} must be >= 1, got {value}")
    return value


def _load_activations(path: pathlib.Path, d_in: int, max_rows: int | None) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"activations file {str(path)!r} does not exist")
    try:
        A = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for foreign files
        raise InputError(f"could not read {str(path)!r} as a .npy array: {e}") from None
    if not isinstance(A, np.ndarray):
        raise InputError(f"{str(path)!r} is not a single .npy array (an .npz archive?)")
    if A.ndim != 2:
        raise InputError(f"activations must be 2-dimensional (n_samples, d_in), got shape {A.shape}")
    if not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.integer)):
        raise InputError(f"activations must be numeric, got dtype {A.dtype}")
    if A.shape[1] != d_in:
        raise InputError(
            f"activations have {A.shape[1]} columns but the SAE has d_in={d_in}; "
            "rows must be activation vectors of the SAE's input width"
        )
    if A.shape[0] == 0:
        raise InputError("activations have no rows")
    if max_rows is not None:
        A = A[:max_rows]
    A = np.array(A, dtype=np.float64)  # a writable copy, not a view of the memory map
    if not np.isfinite(A).all():
        raise InputError(f"activations contain {int((~np.isfinite(A)).sum())} NaN or infinite entries")
    return A


def _certify(args: argparse.Namespace) -> int:
    chunk = _positive_int(args.chunk_size, "--chunk-size")
    max_rows = _positive_int(args.max_rows, "--max-rows")
    digits = _positive_int(args.digits, "--digits")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = pick_device(args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        ckpt = load_sae(args.checkpoint, device=device, dtype=dtype)
    lam = checkpoint_lam(ckpt, args.lam, override=args.override_lam)
    A = _load_activations(pathlib.Path(args.activations), ckpt.sae.d_in, max_rows)
    X = torch.from_numpy(A).to(device=device, dtype=dtype)
    cert = certify_sae(ckpt.sae, X, lam, exact=not args.no_exact, chunk_size=chunk,
                       progress=not args.no_progress)

    if args.lam is None:
        lam_from = f"from the checkpoint: {ckpt.lam_source}"
    elif ckpt.lam is None:
        lam_from = "from --lam"
    elif args.override_lam and abs(args.lam - ckpt.lam) > 1e-6 * max(args.lam, ckpt.lam):
        lam_from = f"from --lam, overriding the checkpoint's {ckpt.lam:g}"
    else:
        lam_from = "from --lam, agrees with the checkpoint"
    head = [
        f"checkpoint   {ckpt.path}  ({ckpt.layout}; d_in={ckpt.sae.d_in}, d_sae={ckpt.sae.d_sae})",
        f"activations  {args.activations}  ({X.shape[0]} rows)",
        f"lambda       {lam:g}  ({lam_from})",
    ]
    head += [f"note         {w.message}" for w in caught if issubclass(w.category, CheckpointWarning)]
    print("\n".join(head) + "\n")
    print(cert.summary(digits=digits))
    if args.json:
        out = pathlib.Path(args.json)
        payload = {
            "checkpoint": str(ckpt.path), "layout": ckpt.layout, "activations": str(args.activations),
            "n_samples": int(X.shape[0]), "d_in": ckpt.sae.d_in, "d_sae": ckpt.sae.d_sae,
            "lam_source": lam_from, **cert.to_dict(),
        }
        try:
            out.write_text(json.dumps(payload, indent=2) + "\n")
        except OSError as e:
            raise InputError(f"could not write --json {str(out)!r}: {e}") from None
        print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "certify":
            return _certify(args)
    except (InputError, FileNotFoundError, CheckpointError, LamMismatchError, ValueError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2
