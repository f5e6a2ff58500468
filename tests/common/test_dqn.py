"""Tests of common/dqn.py: replay wraparound and sampling, TD and Double-DQN targets by hand,
Huber loss, epsilon schedule and policy, periodic target copies, and an ensemble vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import dqn


def _row(v, num_envs=2):
    """A row of `num_envs` transitions whose obs encode (row value v, env e) as 10 v + e."""
    e = jnp.arange(num_envs)
    return {"obs": (10 * v + e).astype(jnp.float32), "action": e.astype(jnp.int32)}


def test_replay_add_wraps_around_and_keeps_the_newest_rows():
    """rows = 3; adding rows 0..4 leaves rows 3, 4, 2 in slots 0, 1, 2 (5 mod 3 = 2 is next),
    size saturates at 3, and dtypes are those of the first row."""
    buf = dqn.replay_init(_row(0), 3)
    assert buf.rows == 3 and buf.data["obs"].shape == (3, 2)
    assert buf.data["action"].dtype == jnp.int32
    add = jax.jit(dqn.replay_add)
    for v in range(5):
        buf = add(buf, _row(v))
        assert int(buf.size) == min(v + 1, 3)
    assert int(buf.pos) == 2
    np.testing.assert_array_equal(buf.data["obs"][:, 0], [30.0, 40.0, 20.0])
    np.testing.assert_array_equal(buf.data["obs"][:, 1], [31.0, 41.0, 21.0])
    with pytest.raises(ValueError, match="rows=1"):
        dqn.replay_init(_row(0), 1)


def test_replay_sample_is_uniform_over_rows_with_a_successor_and_pairs_the_next_row():
    """After rows 0..4 in a 3-row buffer (rows 2, 3, 4 held, 4 the newest) the sample draws
    only rows 2 and 3 (4 has no successor yet), each env half the time, and `nxt` is the same
    env one row later (2 -> 3, 3 -> 4, across the wrap from slot 2 to slot 0). With only
    rows 0 and 1 written it draws row 0 alone."""
    add, sample = jax.jit(dqn.replay_add), jax.jit(dqn.replay_sample, static_argnums=2)
    buf = dqn.replay_init(_row(0), 3)
    for v in range(5):
        buf = add(buf, _row(v))
    cur, nxt = sample(buf, jax.random.PRNGKey(0), 20_000)
    row, env = np.divmod(np.asarray(cur["obs"]).astype(int), 10)
    assert set(np.unique(row)) == {2, 3}
    assert abs((row == 2).mean() - 0.5) < 0.02 and abs((env == 0).mean() - 0.5) < 0.02
    np.testing.assert_array_equal(np.asarray(nxt["obs"]), np.asarray(cur["obs"]) + 10)
    np.testing.assert_array_equal(cur["action"], env)

    buf2 = add(add(dqn.replay_init(_row(0), 3), _row(7)), _row(8))
    cur2, nxt2 = sample(buf2, jax.random.PRNGKey(1), 20_000)
    assert set(np.unique(np.asarray(cur2["obs"]) // 10)) == {7}
    assert set(np.unique(np.asarray(nxt2["obs"]) // 10)) == {8}


def test_td_target_and_double_dqn_target_by_hand():
    """B = 2, gamma = 0.9, the second transition terminal (discount 0):
        Q_target(s') = [[1, 5], [2, 3]], Q_online(s') = [[4, 0], [0, 1]]
        DQN:    y = [1 + 0.9 * 5, 2 + 0] = [5.5, 2]
        Double: a* = argmax Q_online = [0, 1] -> y = [1 + 0.9 * 1, 2] = [1.9, 2]
    (Double with Q_target's own argmax would give DQN's 5.5 again)."""
    r, disc = jnp.array([1.0, 2.0]), jnp.array([0.9, 0.0])
    qt, qo = jnp.array([[1.0, 5.0], [2.0, 3.0]]), jnp.array([[4.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(dqn.td_target(r, disc, qt), [5.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(dqn.td_target(r, disc, qt, qo), [1.9, 2.0], rtol=1e-6)
    g = jax.grad(lambda q: dqn.td_target(r, disc, q).sum())(qt)
    np.testing.assert_array_equal(g, np.zeros((2, 2)))  # no gradient into the target


def test_huber_and_q_loss_by_hand():
    """huber(0.5) = 0.125, huber(-3) = 3 - 0.5 = 2.5 (delta 1); with delta 2: 0.125 and
    2 * (3 - 1) = 4. q_loss picks Q(s, a): q = [[1, 2], [0, 4]], a = [1, 0], y = [1.5, 3]
    -> errors [0.5, -3] -> mean(0.125, 2.5) = 1.3125; weights [1, 0] -> 0.125 / 2."""
    x = jnp.array([0.5, -3.0])
    np.testing.assert_allclose(dqn.huber(x), [0.125, 2.5], rtol=1e-6)
    np.testing.assert_allclose(dqn.huber(x, 2.0), [0.125, 4.0], rtol=1e-6)
    q, a, y = jnp.array([[1.0, 2.0], [0.0, 4.0]]), jnp.array([1, 0]), jnp.array([1.5, 3.0])
    np.testing.assert_allclose(dqn.q_loss(q, a, y), 1.3125, rtol=1e-6)
    np.testing.assert_allclose(dqn.q_loss(q, a, y, jnp.array([1.0, 0.0])), 0.0625, rtol=1e-6)
    # The gradient is the clipped error: d/dq(s, a) = clip(err, -1, 1) / B.
    g = jax.grad(lambda q: dqn.q_loss(q, a, y))(q)
    np.testing.assert_allclose(g, [[0.0, 0.25], [-0.5, 0.0]], rtol=1e-6)


def test_linear_schedule_and_epsilon_greedy():
    """1 -> 0.1 over 100 steps after 10: 1 at 0 and 10, 0.55 at 60, 0.1 from 110 on. The
    greedy action is taken with probability 1 - eps + eps / A (eps = 0.3, A = 4: 0.775)."""
    s = [float(dqn.linear_schedule(t, 1.0, 0.1, 100, begin=10)) for t in (0, 10, 60, 110, 500)]
    np.testing.assert_allclose(s, [1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    q = jnp.broadcast_to(jnp.array([0.0, 3.0, 1.0, 2.0]), (40_000, 4))
    a = dqn.epsilon_greedy(jax.random.PRNGKey(0), q, 0.3)
    assert abs(float((a == 1).mean()) - 0.775) < 0.01
    assert abs(float((a == 0).mean()) - 0.075) < 0.01
    assert bool((dqn.epsilon_greedy(jax.random.PRNGKey(1), q, 0.0) == 1).all())


def test_periodic_update_copies_every_period_updates():
    online, target = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
    for step, copied in ((0, True), (1, False), (3, False), (4, True), (8, True)):
        out = dqn.periodic_update(online, target, jnp.asarray(step), 4)
        assert float(out["w"][0]) == float(copied), step


def test_ensemble_heads_vmap_over_targets_and_losses():
    """A leading head axis K = 3 (bootstrapped DQN): vmapping td_target and q_loss over heads
    equals each head computed alone, with one shared batch of rewards."""
    key = jax.random.PRNGKey(0)
    qt, qo, q = jax.random.normal(key, (3, 3, 5, 4))
    r, disc = jnp.arange(5.0), jnp.full(5, 0.9)
    a = jnp.array([0, 1, 2, 3, 0])

    @jax.jit
    def both():
        y = jax.vmap(dqn.td_target, (None, None, 0, 0))(r, disc, qt, qo)
        loss = jax.vmap(dqn.q_loss, (0, None, 0))(q, a, y)
        y_k = jnp.stack([dqn.td_target(r, disc, qt[k], qo[k]) for k in range(3)])
        loss_k = jnp.stack([dqn.q_loss(q[k], a, y_k[k]) for k in range(3)])
        return y, loss, y_k, loss_k

    y, loss, y_k, loss_k = both()
    np.testing.assert_allclose(y, y_k, rtol=1e-6)
    np.testing.assert_allclose(loss, loss_k, rtol=1e-6)
