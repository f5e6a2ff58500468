"""Test helpers shared by every topic: one-off setup computations compiled cheaply, and a
file's `main` with the runner's compiled chunks recorded for a purity rerun."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run


def compiled(fn, *args):
    """`fn(*args)` as one jitted program compiled at XLA's lowest optimisation level (the
    runner's `init` options). Test setup such as a flax `init`, run eagerly, dispatches
    hundreds of small programs that each compile (8 s for the Universal Transformer's);
    as one program it compiles in about 1.5 s. Values may differ from an eager or optimised
    run by an ulp."""
    return jax.jit(fn).lower(*args).compile(run.INIT_COMPILER_OPTIONS)(*args)


def jit0(fn, static_argnums=()):
    """`jax.jit(fn)` whose programs (one per signature: static args, shapes, dtypes, x64
    mode) are compiled at XLA's lowest optimisation level (the runner's init options), for
    the test programs that run once or twice on small inputs, where LLVM's optimisation
    costs seconds and saves microseconds. Positional arguments only; values may differ from
    `jax.jit(fn)`'s by an ulp."""
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    jitted = jax.jit(fn, static_argnums=static)
    programs = {}

    def call(*args):
        dyn = [a for i, a in enumerate(args) if i not in static]
        leaves, tree = jax.tree.flatten(dyn)
        sig = (tuple(args[i] for i in static if i < len(args)), tree, jax.config.jax_enable_x64,
               tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if sig not in programs:
            programs[sig] = jitted.lower(*args).compile(run.INIT_COMPILER_OPTIONS)
        return programs[sig](*dyn)

    return call


def main_recording_chunks(main, argv):
    """`main(argv)` with the runner's compiled chunks recorded: returns (result, [(compiled
    chunk, a copy of its input states)]), so a test can run a chunk again on the same input
    without tracing or compiling anything."""
    chunks = []
    real = run.make_chunk

    class Recorded:  # what make_chunk returns, as far as the runner uses it
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            lowered = self.fn.lower(*args)

            class Lowered:
                def compile(self, *a, **k):
                    compiled = lowered.compile(*a, **k)

                    def call(states):
                        chunks.append((compiled, jax.tree.map(jnp.copy, states)))
                        return compiled(states)

                    return call

            return Lowered()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "make_chunk", lambda *a, **k: Recorded(real(*a, **k)))
        return main(argv), chunks
