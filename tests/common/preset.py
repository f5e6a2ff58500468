"""Test helper shared by every topic: the paper-preset trace (DESIGN.md sec. 6)."""

import jax


def trace_paper(module, **overrides):
    """`jax.eval_shape` of `init` and of one `update` under the module's `paper` preset: a
    preset that cannot build its data, shapes or state fails here, on CPU, without running.
    Returns the abstract state after one update."""
    cfg = module.Config(**{**module.PRESETS["paper"], **overrides})
    cfg.validate()
    state = jax.eval_shape(lambda k: module.init(k, cfg), jax.random.PRNGKey(0))
    after = jax.eval_shape(lambda s: module.update(s, cfg), state)
    return cfg, state, after
