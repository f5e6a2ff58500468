"""Tests of common/probe.py: the k-NN vote and the linear probe on hand-checkable cases."""

import jax
import jax.numpy as jnp
import numpy as np

from common import probe


def test_knn_votes_by_hand():
    """Six training points on the unit circle (norms vary: cosine ignores them) at angles
    0, 0.3, 1.2 (class 0), -0.2, -0.25 (class 1) and pi (class 2).
    - query 0.1, k = 3: neighbours 0, -0.2, 0.3 -> 2 votes to 1 for class 0.
    - query -0.2, k = 3: -0.2, -0.25, 0 -> class 1.   query 3.0, k = 1: pi -> class 2.
    - query -0.1, k = 5: neighbours 0, 0.3, 1.2 (class 0) and -0.2, -0.25 (class 1). The
      plain majority says 0 (3 to 2); weighted by exp(cos / T) with T = 0.01 class 1 wins,
      e^(cos .1/T) + e^(cos .15/T) > e^(cos .1/T) + e^(cos .4/T) + e^(cos 1.3/T) (checked
      below in numpy). Equal weights, or weights ignoring T, fail the last assert."""
    ang = jnp.array([0.0, 0.3, 1.2, -0.2, -0.25, jnp.pi])
    x = jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1) * jnp.array([[1.0], [2.0], [3.0], [1.0],
                                                                  [5.0], [1.0]])  # norms ignored
    y = jnp.array([0, 0, 0, 1, 1, 2])
    q = lambda a: jnp.array([[jnp.cos(a), jnp.sin(a)]])
    assert int(probe.knn_predict(x, y, q(0.1), 3, k=3, temperature=None)[0]) == 0
    assert int(probe.knn_predict(x, y, q(0.1), 3, k=5, temperature=None)[0]) == 0
    assert int(probe.knn_predict(x, y, q(-0.2), 3, k=3, temperature=0.07)[0]) == 1
    assert int(probe.knn_predict(x, y, q(3.0), 3, k=1)[0]) == 2
    w = lambda s, t: np.exp(np.cos(s) / t)
    t = 0.01  # a sharp temperature: the nearest neighbours dominate
    votes0 = w(0.1, t) + w(0.4, t) + w(1.3, t)
    votes1 = w(0.1, t) + w(0.15, t)
    assert votes1 > votes0  # hand check: the two near class-1 points outweigh
    assert int(probe.knn_predict(x, y, q(-0.1), 3, k=5, temperature=None)[0]) == 0
    assert int(probe.knn_predict(x, y, q(-0.1), 3, k=5, temperature=t)[0]) == 1
    acc = probe.knn_probe(x, y, jnp.concatenate([q(0.1), q(-0.2)]), jnp.array([0, 1]), 3, k=3)
    assert float(acc) == 1.0


def test_per_class_indices_pick_n_of_each_class():
    """n of each class, grouped by class, distinct, and a different subset per key."""
    y = jnp.array([2, 0, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2])
    idx = probe.per_class_indices(jax.random.PRNGKey(0), y, 3, 2)
    np.testing.assert_array_equal(y[idx], [0, 0, 1, 1, 2, 2])
    assert len(set(np.asarray(idx).tolist())) == 6
    draws = {tuple(np.asarray(probe.per_class_indices(jax.random.PRNGKey(s), y, 3, 2)))
             for s in range(8)}
    assert len(draws) > 1  # a random subset, not the first n of each class
    other = probe.per_class_indices(jax.random.PRNGKey(1), y, 3, 4)
    np.testing.assert_array_equal(y[other], [0] * 4 + [1] * 4 + [2] * 4)


def test_linear_probe_separable_is_perfect_and_shuffled_labels_are_chance():
    """Gaussian blobs in 16-d, 4 classes, far apart: the probe is 100% on held-out points.
    The same features with labels shuffled (no relation to the features): about chance
    (0.25; asserted < 0.4). A probe that skipped its fit (zero weights: argmax 0) fails the
    first; one that fit the test labels fails the second."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    centres = 4.0 * jax.random.normal(k1, (4, 16))
    y = jnp.arange(400) % 4
    x = centres[y] + jax.random.normal(k2, (400, 16)) + 10.0  # an offset the bias must absorb
    fit = jax.jit(probe.linear_probe, static_argnums=4)
    assert float(fit(x[:200], y[:200], x[200:], y[200:], 4)) == 1.0
    shuffled = jax.random.permutation(k3, y)
    acc = float(fit(x[:200], shuffled[:200], x[200:], shuffled[200:], 4))
    assert acc < 0.4, acc


def test_probe_keys_and_few_labels():
    x = jnp.eye(10)[jnp.arange(100) % 10] + 0.01 * jax.random.normal(jax.random.PRNGKey(0),
                                                                      (100, 10))
    y = jnp.arange(100) % 10
    out = jax.jit(probe.probe, static_argnums=(5, 6))(jax.random.PRNGKey(1), x, y, x, y, 10, 2)
    assert set(out) == {"linear", "linear_few", "knn", "knn_few"}
    assert all(float(v) == 1.0 for v in out.values()), out
