"""Shared pieces of the transformers tests: one tiny config per file, run ONCE through the
command-line entry point (2 vmapped seeds, in-process) and reused by the CLI, purity and short
behaviour tests, so that a test module compiles its training chunk once; the purity test's
rerun of the first chunk is the same program (served by the compilation cache)."""

import contextlib
import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from common import parallel, run
from tests.common.cli import cli_args
from tests.common.compiled import jit0  # noqa: F401  (the transformers tests import it from here)

SEEDS = 2


def run_cli(module, cfg, run_dir, chunk: int, preset: str | None = None,
            extra=(), seeds: int = SEEDS) -> run.RunResult:
    """`module.main` on the flags of `cfg`: `seeds` seeds (SEEDS unless told), jitted chunks
    of `chunk` updates (a divisor of cfg.num_updates: one compiled chunk), in a fresh
    `run_dir`. Checks that the saved config is `cfg`."""
    assert cfg.num_updates % chunk == 0, (cfg.num_updates, chunk)
    base = module.Config(**(module.PRESETS[preset] if preset else {}))
    argv = cli_args(cfg, base, preset) + [
        "--num-seeds", str(seeds), "--log-every", str(chunk), "--run-dir", str(run_dir),
        "--no-progress", *extra]
    res = module.main(argv)
    saved = json.loads((res.run_dir / "config.json").read_text())["config"]
    assert saved == json.loads(json.dumps(dataclasses.asdict(cfg), default=str)), \
        "flags != config"
    return res


def initial_states(module, cfg, seed: int = 0, seeds: int = SEEDS):
    """The `seeds` initial states of a run of `cfg` with `--seed seed`, by the runner's own
    jitted init (the same program as the CLI run's)."""
    return run.initial_states(module.init, cfg, seed, seeds)


def assert_pure(module, cfg, res: run.RunResult, chunk: int, loss_key: str = "losses/loss",
                seeds: int = SEEDS):
    """Purity of the runner's jitted, vmapped training of `seeds` seeds (SEEDS unless told):
    its first chunk of `chunk` updates, rerun on the same initial states (the same compiled
    program), gives the run's first `chunk` logged rows bit for bit; the first two seeds
    differ (parameters and losses); the losses are finite. Returns the rerun's state."""
    sharding = parallel.seed_sharding(seeds)
    step = run.make_chunk(module.update, cfg, chunk, sharding, seeds)
    state, metrics = step(initial_states(module, cfg, seeds=seeds))
    metrics = jax.device_get(metrics)
    for k in res.history:
        np.testing.assert_array_equal(res.history[k][:, :chunk], metrics[k], err_msg=k)
    kernel = next(x for x in jax.tree.leaves(state.params) if x.ndim >= 3)
    assert not np.array_equal(kernel[0], kernel[1])
    assert not np.array_equal(res.history[loss_key][0], res.history[loss_key][1])
    assert np.isfinite(res.history[loss_key]).all()
    return state


class _LowestLevelJit:
    """A jitted function whose `.lower(...).compile()` (as the runner compiles its chunks)
    and calls compile at XLA's lowest optimisation level."""

    def __init__(self, jitted):
        self.jitted = jitted

    def lower(self, *args):
        lowered = self.jitted.lower(*args)
        # whatever options the runner asks for (None, or its --fast-compile's: the same)
        return types.SimpleNamespace(
            compile=lambda *_: lowered.compile(run.INIT_COMPILER_OPTIONS))

    def __call__(self, *args):
        return self.lower(*args).compile()(*args)


@contextlib.contextmanager
def lowest_level_compiles():
    """Within: the runner's training chunks (`run.make_chunk`, also the purity rerun's) and
    its jitted evaluate compile at XLA's lowest optimisation level, as its init does. For
    the tests' tiny runs, whose compile dominates: a GTrXL PPO chunk compiles in 9.9 CPU s
    instead of 24.4 and runs 25 updates in 1.8 s. The programs are the same (same HLO);
    values may differ from the default compile's by an ulp."""
    real_chunk, real_evaluate = run.make_chunk, run.evaluate_seeds

    def evaluate_seeds(evaluate, state, cfg, num_seeds, compiler_options=None):
        if getattr(evaluate, "host", False):  # (jitted ones: the lowest level, as asked or not)
            return real_evaluate(evaluate, state, cfg, num_seeds, compiler_options)
        return jax.device_get(jit0(run.seed_map(lambda s: evaluate(s, cfg), num_seeds))(state))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "make_chunk", lambda *a, **k: _LowestLevelJit(real_chunk(*a, **k)))
        mp.setattr(run, "evaluate_seeds", evaluate_seeds)
        yield
