"""Prometheus's ``promtool`` as the monitoring tests run it (skipped where it is missing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROMETHEUS) -> None:
    """Run ``promtool ARGS`` in ``cwd``; it must succeed."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian: apt-get install -y prometheus)")
    run = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}{run.stderr}"
