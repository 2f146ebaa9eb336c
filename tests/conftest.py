"""Shared fixtures for the package tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, then restore the setting.

    The solver tests use tiny batched kernels: on a busy 2-core machine, OpenMP's spin-waiting
    between two threads costs far more than the kernels themselves.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
