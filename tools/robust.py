"""``make robust``: do the chapters print the same text when the last bits of the arithmetic move?

Machines differ in CPU, vector instructions, BLAS kernels and thread counts, and each of these
changes the last bits of float sums and products. The book promises that a reader who runs a
chapter anywhere sees what the page shows. This script tests that promise on one machine: it
re-executes every chapter (or those named) from its ``.md`` under perturbed numerical
environments, each in turn, into a scratch folder, and compares each code cell's text outputs
with the stored ones (the comparison of ``tools/gpu_check.py``: stream text and the text forms
of results; images are not compared). The environments:

- ``one-thread``: torch and its BLAS on one thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``);
  sums are split differently than on two;
- ``no-simd``: torch's unvectorised CPU kernels (``ATEN_CPU_CAPABILITY=default``);
- ``mkl-avx2``: MKL limited to AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2``), other matmul kernels;
- ``perturbed``: every data matrix that ``companion`` receives perturbed by a relative 1e-12
  (at least one unit in the last place; ``COMPANION_PERTURB``, see ``companion.perturb_data``).

Each was measured to change the last bits of float32 sums or products on a machine of the kind
CI uses (an AVX-512 CPU). The script exits 1 on any difference, printing the environment, the
notebook, the cell and a short diff; 0 when every chapter printed its stored text everywhere.

    python tools/robust.py [CHAPTER ...] [--env NAME ...] [--scratch DIR] [--jobs N]

Chapters run ``--jobs`` at a time (default: the cores available), each kernel in its own
worker process with its environment.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gpu_check  # noqa: E402
import notebooks  # noqa: E402

ENVIRONMENTS = {
    "one-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "no-simd": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "perturbed": {"COMPANION_PERTURB": "1e-12"},
}
_PROBE = ("import torch; print(f'torch threads {torch.get_num_threads()}, '"
          "f'CPU capability {torch.backends.cpu.get_cpu_capability()}')")


def describe(env: dict[str, str]) -> str:
    """What torch reports under ``env`` (thread count, CPU capability), from a fresh process."""
    done = subprocess.run([sys.executable, "-c", _PROBE], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or done.stderr.strip()[-200:]


def _check(name: str, md: pathlib.Path, folder: pathlib.Path) -> tuple[list[str], float]:
    """Execute ``md`` under environment ``name`` (in a worker process) and compare it."""
    os.environ.update(ENVIRONMENTS[name])  # the kernel nbclient starts inherits this environment
    start = time.perf_counter()
    found = gpu_check.check_chapter(md, folder, f"this run ({name})")
    return [f"[{name}] {d}" for d in found], time.perf_counter() - start


def run(chapters: list[pathlib.Path], envs: list[str], scratch: pathlib.Path, jobs: int = 1) -> list[str]:
    """Execute ``chapters`` under each environment of ``envs``, ``jobs`` kernels at a time (each
    in a worker process of its own, so environments never mix); the differences, labelled."""
    for name in envs:
        env = ENVIRONMENTS[name]
        print(f"robust [{name}] {' '.join(f'{k}={v}' for k, v in env.items())}: {describe(env)}",
              flush=True)
        (scratch / name).mkdir(parents=True, exist_ok=True)
    tasks = [(name, md) for name in envs for md in chapters]
    problems = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_check, name, md, scratch / name): (name, md) for name, md in tasks}
        for future in concurrent.futures.as_completed(futures):
            name, md = futures[future]
            found, seconds = future.result()
            print(f"  [{name}] {md.stem}: {'same text outputs' if not found else f'{len(found)} differences'} "
                  f"({seconds:.0f} s)", flush=True)
            problems += found
    return sorted(problems)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", help="chapter stems (default: every chapter)")
    ap.add_argument("--env", action="append", choices=sorted(ENVIRONMENTS),
                    help="an environment to run (repeatable; default: all of them)")
    ap.add_argument("--scratch", type=pathlib.Path, help="folder for the executed notebooks "
                    "(default: a new temporary folder, kept for inspection)")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="chapters executed at once (default: the CPU cores available; most "
                         "chapter cells run on one thread)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"robust: --jobs must be >= 1, got {args.jobs}")
        return 2

    chapters, unknown = notebooks.select_chapters(args.chapters)
    if unknown:
        print(f"robust: no chapter named {unknown}")
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["COMPANION_DEVICE"] = "cpu"  # the stored outputs are the CPU's; gpu_check covers CUDA
    scratch = args.scratch or pathlib.Path(tempfile.mkdtemp(prefix="robust-"))
    envs = args.env or list(ENVIRONMENTS)
    start = time.perf_counter()
    problems = run(chapters, envs, scratch, args.jobs)
    for p in problems:
        print(p)
    print(f"robust: {len(chapters)} chapters x {len(envs)} environments in "
          f"{time.perf_counter() - start:.0f} s (notebooks in {scratch}): "
          f"{'FAILED, ' + str(len(problems)) + ' differences' if problems else 'no differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
