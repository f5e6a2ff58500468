"""Tests of common/blackbox.py: test functions, rank shaping, evals-to-target, episodes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import blackbox as bb
from common import envs


def test_functions_have_their_minimum_where_stated():
    n = 10
    for name, xstar in [("sphere", 0.0), ("rosenbrock", 1.0), ("rastrigin", 0.0),
                        ("ellipsoid", 0.0), ("rotated_ellipsoid", 0.0)]:
        f = bb.problem(name, n)
        assert float(f(jnp.full(n, xstar))) == pytest.approx(0.0, abs=1e-6), name
        assert float(f(jnp.full(n, xstar) + 0.1)) > 1e-3, name


def test_values_against_hand_computation():
    x = jnp.array([1.0, 2.0, -1.0])
    assert float(bb.sphere(x)) == 6.0
    # 100 (2 - 1)^2 + 0 + 100 (-1 - 4)^2 + (1 - 2)^2 = 100 + 2500 + 1
    assert float(bb.rosenbrock(x)) == pytest.approx(2601.0)
    # cos(2 pi k) = 1 for integers: 30 + 6 - 30
    assert float(bb.rastrigin(x)) == pytest.approx(6.0, abs=1e-4)
    # scales 1, 1e3, 1e6 for n = 3, cond 1e6
    assert float(bb.ellipsoid(x)) == pytest.approx(1 + 4e3 + 1e6, rel=1e-6)


def test_rotated_ellipsoid_is_the_ellipsoid_of_rx():
    r = bb.rotation(5)
    np.testing.assert_allclose(r @ r.T, np.eye(5), atol=1e-12)
    np.testing.assert_array_equal(r, bb.rotation(5))  # fixed, so every library sees it
    x = jnp.arange(5.0)
    f = bb.problem("rotated_ellipsoid", 5)
    assert float(f(x)) == pytest.approx(float(bb.ellipsoid(jnp.asarray(r, jnp.float32) @ x)),
                                        rel=1e-5)
    assert float(f(x)) != pytest.approx(float(bb.ellipsoid(x)), rel=1e-3)


def test_problem_rejects_bad_input():
    with pytest.raises(ValueError, match="problem must be one of"):
        bb.problem("spheer", 10)
    with pytest.raises(ValueError, match="dim must be >= 2"):
        bb.problem("sphere", 1)


def test_centered_ranks():
    f = jnp.array([3.0, -1.0, 10.0, 0.5, 2.0])
    r = bb.centered_ranks(f)
    np.testing.assert_allclose(r, [0.25, -0.5, 0.5, -0.25, 0.0])
    assert float(r.sum()) == pytest.approx(0.0)
    # invariant to a monotone transform
    np.testing.assert_array_equal(r, bb.centered_ranks(jnp.exp(f) * 3 - 7))


def test_evals_to_target():
    best = np.array([5.0, 1.0, 1e-9, 1e-12])
    evals = np.array([10, 20, 30, 40])
    assert bb.evals_to_target(best, evals, 1e-8) == 30
    assert bb.evals_to_target(best, evals, 1e-20) == float("inf")


def test_episode_masks_steps_after_the_end():
    """CartPole with a constant action falls within ~10 steps; the return must equal the
    length (reward 1 per step) even though the scan runs 100 steps."""
    env = envs.make("CartPole-v1", 1).env
    run = jax.jit(lambda k: bb.episode(env, lambda o, k: jnp.int32(1), k,
                                       env.default_params(), 100))
    ret, length, _ = run(jax.random.PRNGKey(0))
    assert 5 <= int(length) < 30
    assert float(ret) == float(length)
    # a balancing controller survives longer: the rollout does depend on the actions
    ret2, _, _ = jax.jit(lambda k: bb.episode(env, lambda o, k: jnp.int32(o[2] + o[3] > 0),
                                              k, env.default_params(), 100))(
        jax.random.PRNGKey(0))
    assert float(ret2) == 100.0


def test_episode_final_state_is_the_terminal_state():
    """The final state is the one the terminating step produced (CartPole's pole angle
    beyond 12 degrees or the cart off the track), not the state before it."""
    env = envs.make("CartPole-v1", 1).env
    _, length, state = jax.jit(lambda k: bb.episode(env, lambda o, k: jnp.int32(1), k,
                                                    env.default_params(), 100))(
        jax.random.PRNGKey(0))
    assert abs(float(state.theta)) > 12 * 2 * np.pi / 360 or abs(float(state.x)) > 2.4
    assert int(state.time) == int(length)
