"""Helpers of the data-parallel tests: start a 2-process torchrun job on this machine (``--standalone``: a free port
for the rendezvous, never a fixed one), with the sources and the test helpers importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def dist_env(tmp_path: Path, *paths: Path) -> dict:
    path = os.pathsep.join(str(p) for p in (SRC, TESTS, *paths))
    return {**os.environ, "PYTHONPATH": path, "AIGC_HOME": str(tmp_path / "home"), "AIGC_DIST_TIMEOUT": "30",
            "OMP_NUM_THREADS": "1"}


def torchrun(tmp_path: Path, *argv: str, paths: tuple[Path, ...] = (), timeout: float = 120,
             nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *argv]
    return subprocess.run(cmd, env=dist_env(tmp_path, *paths), capture_output=True, text=True, timeout=timeout)
