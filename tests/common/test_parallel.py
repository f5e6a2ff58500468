"""Multi-process runs: the same script started once per host (here two processes on
localhost with two simulated CPU devices each, talking through jax.distributed and gloo)
gives every seed the result of one process driving four devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["-m", "tests.common.toy_algo", "--num-seeds", "4", "--no-progress", "--log-every", "5"]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", **extra)
    return env


def _two_processes(argv: list[str]) -> None:
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "finished toy_algo: 4 seed(s)" in out


def _rows(run_dir: Path) -> list[dict]:
    keep = lambda row: {k: v for k, v in row.items() if not k.startswith("perf")}
    return [keep(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_equal(multi: Path, single: Path, updates: int) -> None:
    rows_multi, rows_single = _rows(multi), _rows(single)
    assert len(rows_multi) == len(rows_single) == updates
    assert rows_multi == rows_single
    assert len(set(rows_single[-1]["losses/loss/seeds"])) == 4  # the seeds differ
    summary = lambda d: {k: v for k, v in json.loads((d / "summary.json").read_text()).items()
                         if not k.startswith("perf")}
    assert summary(multi) == summary(single)


def _one_process(run_dir: Path, updates: int) -> None:
    p = subprocess.run([sys.executable, *ARGS, "--run-dir", str(run_dir), "--num-updates",
                        str(updates)], cwd=ROOT, env=_env(4), capture_output=True, text=True,
                       timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]


def test_two_processes_equal_one_process_with_as_many_devices(tmp_path):
    """4 seeds on 2 processes x 2 devices against 4 seeds on 1 process x 4 devices (one seed
    per device in both), 20 updates: every logged value of every seed and update is
    bit-identical, and the run dir holds one log, written once (process 0). Breaks caught:
    processes that disagree on the run dir or its stamp, both processes writing the log
    (40 rows), a device_get of the sharded metrics (raises in process 1), keys drawn per
    process instead of globally (other seeds)."""
    _two_processes(ARGS + ["--run-dir", str(tmp_path / "multi"), "--num-updates", "20"])
    _one_process(tmp_path / "single", 20)
    _check_equal(tmp_path / "multi", tmp_path / "single", 20)


@pytest.mark.slow
def test_two_processes_resume_bit_identically(tmp_path):
    """The same, 20 updates and then --resume to 30 on two processes (orbax checkpoints
    written and restored by both), against one process straight to 30."""
    multi = tmp_path / "multi"
    _two_processes(ARGS + ["--run-dir", str(multi), "--num-updates", "20"])
    _two_processes(ARGS + ["--run-dir", str(multi), "--num-updates", "30", "--resume"])
    _one_process(tmp_path / "single", 30)
    _check_equal(multi, tmp_path / "single", 30)
