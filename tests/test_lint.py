"""The repo passes its linter (pyproject's [tool.ruff]: pyflakes, pycodestyle, isort, bugbear,
pyupgrade, no debugger calls, no commented-out code), so CI fails on an unused import or a
leftover `breakpoint()`, not a reviewer. Lines are wrapped by hand at 100 columns; `ruff
format` is not applied to the repo (its one-argument-per-line layout would stretch the files
that a reader is meant to take in at one sitting)."""

import pathlib
import subprocess
import sys


def test_ruff_check_passes():
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
