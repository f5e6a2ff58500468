"""Test helper shared by every topic: one-off setup computations compiled cheaply."""

import jax

from common import run


def compiled(fn, *args):
    """`fn(*args)` as one jitted program compiled at XLA's lowest optimisation level (the
    runner's `init` options). Test setup such as a flax `init`, run eagerly, dispatches
    hundreds of small programs that each compile (8 s for the Universal Transformer's);
    as one program it compiles in about 1.5 s. Values may differ from an eager or optimised
    run by an ulp."""
    return jax.jit(fn).lower(*args).compile(run.INIT_COMPILER_OPTIONS)(*args)
