"""Test helper shared by the transformers tests: run a script against a peer library (torch,
HF transformers) installed by uv in its own throw-away environment.

DESIGN.md sec. 6: a peer test skips only when the peer cannot be installed, and fails when
the peer's script raises. So the two are separate steps:
  1. install + import: `uv run --no-project --with <packages> python -c "import <modules>"`;
     uv missing, a failed resolution/download/build, a failing import or a timeout here
     -> pytest.skip (the peer cannot be installed on this machine);
  2. the script, in the environment step 1 just resolved (`--offline`, so it is served from
     uv's cache and needs no network): a non-zero exit or a timeout -> pytest.fail with the
     script's stderr.
"""

import shutil
import subprocess
import sys

import pytest

TORCH = ("torch==2.13.0", "transformers>=5,<6", "numpy")
"""The peer environment of the torch ports (uv downloads a CUDA build of torch: GBs)."""


def _uv(packages, offline: bool) -> list[str]:
    cmd = ["uv", "run", "--no-project"] + (["--offline"] if offline else [])
    for p in packages:
        cmd += ["--with", p]
    return cmd


def run_peer(script: str, cwd, packages=TORCH, imports=("numpy", "torch", "transformers"),
             install_timeout: float = 1800, timeout: float = 900):
    """Write `script` to cwd/peer.py and run it with `packages`; returns its stdout.
    Skips when the packages cannot be installed (or imported); fails when the script raises."""
    if shutil.which("uv") is None:
        pytest.skip("peer cannot be installed: uv is not on PATH")
    probe = "import " + ", ".join(imports) if imports else "pass"
    try:
        inst = subprocess.run(_uv(packages, False) + ["python", "-c", probe], cwd=cwd,
                              capture_output=True, text=True, timeout=install_timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"peer cannot be installed: {packages} not ready in {install_timeout} s")
    if inst.returncode != 0:
        pytest.skip(f"peer cannot be installed ({' '.join(packages)}): {inst.stderr[-800:]}")
    (cwd / "peer.py").write_text(script)
    try:
        proc = subprocess.run(_uv(packages, True) + ["python", "peer.py"], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"peer script ran past {timeout} s after the peer installed")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        pytest.fail(f"peer script failed (exit {proc.returncode}) after the peer installed:\n"
                    f"{proc.stderr[-3000:]}")
    return proc.stdout
