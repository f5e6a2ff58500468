"""Tests of common.bench --all-paper: every file's paper preset in its own process, one
table, and a crash or a hang costs one row, not the run."""

import textwrap

from common import bench

ALGO = '''
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Config:
    n: int = 32
    total_steps: int = 4

    @property
    def num_updates(self):
        return self.total_steps


PRESETS = {{"paper": dict(n=64)}}


def init(key, cfg):
    {init}
    return jax.random.normal(key, (cfg.n, cfg.n)) / cfg.n


def update(w, cfg):
    w = jnp.tanh(w @ w + 0.1)
    return w, {{"losses/loss": (w ** 2).mean()}}
'''


def test_all_paper_times_each_file_in_its_own_process(tmp_path, capsys):
    """Three files: one runs (compile time, throughput, matmul rate and its share of the
    CPU's measured float32 matmul rate), one raises in init (its error is its row), one
    hangs at import (stopped at the time limit). The table is appended to --out. Breaks
    caught: a crash or time-out that stops the whole run, a child that ignores the paper
    preset (its matmul rate would be that of n = 32), rows lost from the table."""
    files = {}
    for name, init in (("ok", "pass"), ("crash", "raise ValueError('no such env: Foo-v0')"),
                       ("hang", "pass")):
        src = textwrap.dedent(ALGO.format(init=init))
        if name == "hang":
            src = "import time\ntime.sleep(120)\n" + src
        (tmp_path / f"{name}.py").write_text(src)
        files[name] = str(tmp_path / f"{name}.py")
    out = tmp_path / "BENCH.md"
    rows = bench.main(["--all-paper", "--files", files["ok"], files["crash"], "--max-updates",
                       "3", "--time-limit", "300", "--out", str(out)])
    rows += bench.main(["--all-paper", "--files", files["hang"], "--time-limit", "3", "--out",
                        str(out)])
    by = {r["file"]: r for r in rows}
    ok, crash, hang = by[files["ok"]], by[files["crash"]], by[files["hang"]]
    assert ok["status"] == "ok", ok
    assert ok["compile s"] > 0 and ok["steps/s"] > 0
    # 2 n^3 FLOPs per update at the paper preset's n = 64, none at its bf16 peak (CPU)
    assert ok["TFLOP/s"] > 0 and 0 < ok["share fp32 peak"] < 5, ok
    assert ok["share bf16 peak"] is None
    assert crash["status"].startswith("error: ") and "no such env: Foo-v0" in crash["status"]
    assert hang["status"] == "timed out after 3 s", hang
    table = out.read_text()
    assert table.count("--all-paper") == 2 and table.count("\n| ") == 2 + 3  # 2 headers
    assert "timed out after 3 s" in capsys.readouterr().out


def test_paper_files_are_every_topic_file_with_a_paper_preset():
    files = bench.paper_files()
    assert "exploration/rnd.py" in files and "detection/yolo_v3.py" in files
    assert "evolution/cma_es.py" in files
    assert not any(f.startswith(("common/", "tests/")) for f in files)
