"""Seeding, device choice, thread settings and glue shared by every chapter's set-up cell.

Two switches exist for testing that a chapter's conclusions do not hang on the last bits of
its arithmetic (``make robust``): the usual environment variables of torch and its BLAS
(``OMP_NUM_THREADS``, ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``), and
``COMPANION_PERTURB``, a relative perturbation of the data (see :func:`perturb_data`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random

import numpy as np
import torch
from tqdm import tqdm


def pick_device(prefer: str | None = None) -> torch.device:
    """Return CUDA when it is available, else the CPU; never require CUDA.

    ``prefer`` (or the environment variable ``COMPANION_DEVICE``) forces a device,
    e.g. ``"cpu"`` to reproduce CI on a GPU machine.
    """
    choice = prefer or os.environ.get("COMPANION_DEVICE")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_PERTURB = 0.0


def setup(seed: int = 0, device: str | None = None, perturb: float | None = None) -> torch.device:
    """Seed Python, numpy and torch, ask torch for deterministic kernels, and pick a device.

    Every chapter of the book starts with ``device = companion.setup(seed)``. What a chapter
    prints is rounded so that the same text comes out on CPU and GPU; this function makes
    the random streams and the reduction order repeatable on a given device.

    ``perturb`` (default: the environment variable ``COMPANION_PERTURB``, else 0) switches on
    :func:`perturb_data` for every data matrix ``X`` that a public function of ``companion``
    receives from then on: a test that a result does not depend on the last bits of the data.
    """
    global _PERTURB
    if perturb is None:
        perturb = float(os.environ.get("COMPANION_PERTURB", "0") or 0)
    if not (math.isfinite(perturb) and 0 <= perturb < 1e-3):
        raise ValueError(f"perturb (COMPANION_PERTURB) must be a number in [0, 1e-3), got {perturb!r}")
    _PERTURB = float(perturb)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = pick_device(device)
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.manual_seed_all(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return dev


def generator(seed: int) -> torch.Generator:
    """A seeded CPU ``torch.Generator``.

    Data generators draw on the CPU and then move the result, so that CPU and GPU runs of a
    chapter see exactly the same samples.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` intra-op CPU threads (None: unchanged), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        # set even when torch reports n already: a library that resets OpenMP's count behind
        # torch's back (SPAMS does) would otherwise leave the block on the wrong count
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def progress_bar(iterable=None, *, progress: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr, shown when ``progress`` is true and ``TQDM_DISABLE`` is not set.

    tqdm reads ``TQDM_DISABLE`` only when ``disable`` is not passed, so every bar of the
    package is made here, where both are honoured (stored notebook outputs are executed with
    ``TQDM_DISABLE=1`` and must hold no stderr). ``leave`` defaults to False.
    """
    off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not progress or off, **kwargs)


def perturb_data(X: torch.Tensor) -> torch.Tensor:
    """``X`` times ``1 + eps * s``: the data with a relative perturbation, when switched on.

    Off (``eps = 0``, the default) it returns ``X`` itself. On (``setup(perturb=...)`` or
    ``COMPANION_PERTURB``), ``eps = max(perturb, machine epsilon of X's dtype)`` and ``s`` is a
    fixed pattern of signs ±1 drawn from a generator of its own (seed 12345), so the random
    streams of a chapter are untouched and the same ``X`` is always perturbed the same way. In
    float32 a relative 1e-12 would round away, so there the change is about one unit in the last
    place. The package applies it to the data matrix ``X`` at the boundary of its public
    functions; it exists for ``make robust`` (see ``tools/robust.py``).
    """
    if _PERTURB == 0 or X.numel() == 0:
        return X
    eps = max(_PERTURB, torch.finfo(X.dtype).eps)
    signs = torch.randint(0, 2, tuple(X.shape), generator=generator(12345)).to(X.dtype) * 2 - 1
    return X * (1 + eps * signs.to(X.device))


def glue(name: str, value, fmt: str | None = None, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the prose of a chapter (MyST-NB's ``{glue}`` roles).

    Floats are stored rounded by ``fmt`` (a format spec such as ``".2f"``, ``".3g"``, ``".1e"``):
    the stored text then shows only the digits the page shows, which stay the same on another
    CPU, thread count or GPU, instead of the last bits of a float. A float without ``fmt`` is
    refused. Ints, strings and other objects are stored as they are.

    The output has MyST-NB's glue format (the mime bundle under the
    ``application/papermill.record/`` prefix with ``scrapbook`` metadata), written with IPython
    directly, so a chapter needs no ``myst_nb`` where it runs (Colab has none).
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipy_display

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)):
        if fmt is None:
            raise ValueError(f"glue({name!r}): a float needs fmt (the digits the page shows, e.g. '.2f')")
        value = float(format(float(value), fmt))
    elif isinstance(value, np.integer):
        value = int(value)
    prefix = "" if display else "application/papermill.record/"
    bundle, metadata = format_display_data(value)
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
