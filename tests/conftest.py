"""Shared test setup: the repository on sys.path and JAX's persistent compilation cache."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ---- time per test module (DESIGN.md section 6: ~20 s per module on average over a topic,
# no default test above 60 s). Durations are summed on the controller, so this works under
# pytest-xdist too.
MODULE_BUDGET_S = 20.0
TEST_LIMIT_S = 60.0
_module_time: dict[str, float] = {}
_test_time: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    _module_time[module] = _module_time.get(module, 0.0) + report.duration
    _test_time[report.nodeid] = _test_time.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _module_time:
        return
    tr = terminalreporter
    tr.section("wall time per test module (sum of its tests: setup, call, teardown)")
    topics: dict[str, list[float]] = {}
    for module, t in sorted(_module_time.items(), key=lambda kv: -kv[1]):
        flag = "  OVER BUDGET" if t > MODULE_BUDGET_S else ""
        tr.write_line(f"{t:8.1f} s  {module}{flag}")
        parts = Path(module).parts
        topics.setdefault(parts[1] if len(parts) > 2 else parts[0], []).append(t)
    tr.write_line("")
    for topic, times in sorted(topics.items()):
        mean = sum(times) / len(times)
        flag = "  OVER BUDGET" if mean > MODULE_BUDGET_S else ""
        tr.write_line(f"{topic:>16}: {len(times):3d} modules, {sum(times):7.1f} s, "
                      f"{mean:5.1f} s per module (budget {MODULE_BUDGET_S:.0f}){flag}")
    over = [(n, t) for n, t in _test_time.items() if t > TEST_LIMIT_S]
    for nodeid, t in sorted(over, key=lambda kv: -kv[1]):
        tr.write_line(f"test over {TEST_LIMIT_S:.0f} s: {t:.1f} s  {nodeid}")
