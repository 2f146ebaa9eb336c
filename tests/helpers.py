"""Helpers shared by the tests (imported as ``helpers``: pytest puts tests/ on the path)."""

import contextlib
import io
import os
import warnings


@contextlib.contextmanager
def quiet():
    """SAELens prints tqdm bars and warnings on stderr: keep the test output clean."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = before
