"""Certifying over several processes with torch.distributed (issue 23.6): gloo on 2 CPU processes.

The report of 2 processes, each encoding every other chunk of rows with the sums all-reduced,
equals the single-process report within float tolerance (the sums are added in another order),
and records ``world_size`` = 2. Once through the API given a process group, once through the
command line under ``torchrun``.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from companion.cli import main
from companion.interop import certify_sae, load_sae, save_sae
from companion.sae import train_sae

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(6, 5, generator=g, dtype=torch.float64)
    F = F / F.norm(dim=1, keepdim=True)
    codes = torch.rand(300, 6, generator=g, dtype=torch.float64) * (torch.rand(300, 6, generator=g) < 0.3)
    X = codes @ F + 0.3 + 0.05 * torch.randn(300, 5, generator=g, dtype=torch.float64)
    res = train_sae(X, 8, 0.05, steps=200, progress=False)
    root = tmp_path_factory.mktemp("dist")
    save_sae(res.sae, root / "sae", lam=0.05)
    np.save(root / "acts.npy", X.numpy())
    return root


def _close(a, b, path="report"):
    """Recursive comparison of two JSON reports, floats to a relative 1e-9."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("world_size", "activations", "checkpoint"):
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _worker(rank, world, init_file, root, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ck = load_sae(root / "sae", dtype=torch.float64)
        X = np.load(root / "acts.npy", mmap_mode="r")
        cert = certify_sae(ck, X, chunk_size=32, process_group=dist.group.WORLD)
        (out / f"rank{rank}.json").write_text(json.dumps(cert.to_dict()))
    finally:
        dist.destroy_process_group()


def test_api_with_a_gloo_process_group_equals_one_process(saved, tmp_path):
    ck = load_sae(saved / "sae", dtype=torch.float64)
    one = certify_sae(ck, np.load(saved / "acts.npy", mmap_mode="r"), chunk_size=32).to_dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), saved, tmp_path), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2 and one["world_size"] == 1
    _close(one, r0)
    _close(r0, r1)
    assert r0["sae_codes"]["n_samples"] == 300 and r0["statistics"]["n_samples"] == 300


def test_cli_under_torchrun_equals_one_process(saved, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    args = ["certify", str(saved / "sae"), str(saved / "acts.npy"), "--chunk-size", "32", "--no-progress",
            "--device", "cpu"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "companion", *args,
                           "--json", str(tmp_path / "two.json")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("what to do next") == 1          # rank 0 alone prints the report
    assert "processes    2 (torch.distributed" in done.stdout
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    _close(one, two)
