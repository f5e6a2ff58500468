"""The small shared core: envs, nets, rl, run, parallel, plot, bench.

XLA:CPU in jaxlib 0.10 can deadlock (all threads idle, the program never finishes) when
its concurrency-optimised scheduler runs some vmapped training programs, e.g. PPO+RND over
two seeds on a 2-core machine. Importing `common` switches that scheduler off unless the
flag is already set in XLA_FLAGS. It only affects the CPU backend and must be set before
JAX's backend starts, hence here.
"""

import os

_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=false").strip()
