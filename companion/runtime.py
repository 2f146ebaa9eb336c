"""Seeding, device choice and thread settings shared by every chapter's set-up cell."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return CUDA when it is available, else the CPU; never require CUDA.

    ``prefer`` (or the environment variable ``COMPANION_DEVICE``) forces a device,
    e.g. ``"cpu"`` to reproduce CI on a GPU machine.
    """
    choice = prefer or os.environ.get("COMPANION_DEVICE")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup(seed: int = 0, device: str | None = None) -> torch.device:
    """Seed Python, numpy and torch, ask torch for deterministic kernels, and pick a device.

    Every chapter of the book starts with ``device = companion.setup(seed)``. What a chapter
    prints is rounded so that the same text comes out on CPU and GPU; this function makes
    the random streams and the reduction order repeatable on a given device.
    """
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
