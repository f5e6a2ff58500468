"""Shared pieces of the transformers tests: one tiny config per file, run ONCE through the
command-line entry point (2 vmapped seeds, in-process) and reused by the CLI, purity and short
behaviour tests, so that a test module compiles its training chunk once; the purity test's
rerun of the first chunk is the same program (served by the compilation cache)."""

import dataclasses
import json

import jax
import numpy as np

from common import parallel, run
from tests.common.cli import cli_args

SEEDS = 2


def run_cli(module, cfg, run_dir, chunk: int, preset: str | None = None,
            extra=()) -> run.RunResult:
    """`module.main` on the flags of `cfg`: SEEDS seeds, jitted chunks of `chunk` updates
    (a divisor of cfg.num_updates: one compiled chunk), in a fresh `run_dir`. Checks that
    the saved config is `cfg`."""
    assert cfg.num_updates % chunk == 0, (cfg.num_updates, chunk)
    base = module.Config(**(module.PRESETS[preset] if preset else {}))
    argv = cli_args(cfg, base, preset) + [
        "--num-seeds", str(SEEDS), "--log-every", str(chunk), "--run-dir", str(run_dir),
        "--no-progress", *extra]
    res = module.main(argv)
    saved = json.loads((res.run_dir / "config.json").read_text())["config"]
    assert saved == json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), \
        "flags != config"
    return res


def initial_states(module, cfg, seed: int = 0):
    """The SEEDS initial states of a run of `cfg` with `--seed seed`, by the runner's own
    jitted init (the same program as the CLI run's)."""
    return run.initial_states(module.init, cfg, seed, SEEDS)


def assert_pure(module, cfg, res: run.RunResult, chunk: int, loss_key: str = "losses/loss"):
    """Purity of the runner's jitted, vmapped training of SEEDS seeds: its first chunk of
    `chunk` updates, rerun on the same initial states (the same compiled program), gives the
    run's first `chunk` logged rows bit for bit; the two seeds differ (parameters and
    losses); the losses are finite."""
    sharding = parallel.seed_sharding(SEEDS)
    step = run.make_chunk(module.update, cfg, chunk, sharding, SEEDS)
    state, metrics = step(initial_states(module, cfg))
    metrics = jax.device_get(metrics)
    for k in res.history:
        np.testing.assert_array_equal(res.history[k][:, :chunk], metrics[k], err_msg=k)
    kernel = next(x for x in jax.tree.leaves(state.params) if x.ndim >= 3)
    assert not np.array_equal(kernel[0], kernel[1])
    assert not np.array_equal(res.history[loss_key][0], res.history[loss_key][1])
    assert np.isfinite(res.history[loss_key]).all()
