"""Tests of generalization/overfit_universal_approx.py: the sigmoid staircase and the ReLU
interpolant against their error bounds, the width masks (no effect, no gradient), the slope
fit, the error falling with width for the constructive and trained nets against the linear
(no nonlinearity) control, purity, CLI with --plot, the paper trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import overfit_universal_approx as ua
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test: widths 2, 8, 32, 600 Adam steps in 3 updates.
TINY = ua.Config(widths=(2, 8, 32), train_points=64, eval_points=401, train_steps=600,
                 steps_per_update=200, lr=1e-2)
LINEAR = dataclasses.replace(TINY, activation="linear")


def _train(cfg, keys):
    fn = jax.jit(jax.vmap(run.make_train(ua.init, ua.update, cfg)))
    state, m = fn.lower(keys).compile(run.INIT_COMPILER_OPTIONS)(keys)
    final = jax.jit(jax.vmap(lambda s: ua.evaluate(s, cfg)))(state)
    return jax.tree.map(np.asarray, (state, m, final))


@pytest.fixture(scope="module")
def sweep():
    """TINY for seeds (0, 0, 1): rows 0 and 1 must be identical, row 2 different."""
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    return _train(TINY, jnp.stack([k[0], k[0], k[1]]))


XE = ua.grid(4001, 1)
FE = ua.target(XE)


@jax.jit
def _constructive_sup(n_float):
    """Sup errors of the staircase and the interpolant of width n (traced: one compile)."""
    n = n_float
    mask = jnp.arange(512) < n
    st = ua.net(ua.staircase_params(ua.target, n, 512, 50.0), XE, mask, "sigmoid")
    ip = ua.net(ua.interpolant_params(ua.target, n, 512), XE, mask, "relu")
    return ua.errors(st, FE)[0], ua.errors(ip, FE)[0], st, ip


# --- equations ---


def test_staircase_takes_the_cell_centre_values():
    """(a) sigmoid, N = 8: 9 cells of width h = 2/9; at each centre u_k the net is f(u_k)
    (the neighbouring steps are e^-44 away from saturation); sup error <= L h (L = 3.5)."""
    sup, _, st, _ = _constructive_sup(8.0)
    h = 2 / 9
    u = -1 + (np.arange(9) + 0.5) * h
    idx = np.rint((u + 1) / 2 * 4000).astype(int)  # u on the 4001-point grid (nearest)
    np.testing.assert_allclose(np.asarray(st)[idx], np.asarray(ua.target(XE[idx])), atol=2e-3)
    assert float(sup) <= 3.5 * h


def test_staircase_error_falls_like_one_over_n_and_interpolant_like_one_over_n2():
    """Sup error of the sigmoid staircase <= L h = 3.5 x 2 / (N + 1) and x4 widths divide
    it by 3-5 (1/N); the ReLU interpolant's is <= h^2 / 8 max|f''| = 9 h^2 / 8 (h = 2/N,
    the kink on a knot) and x4 widths divide it by >= 10 (1/N^2). Measured when written:
    staircase 0.053 / 0.0135 (N = 64 / 256), interpolant 4.1e-3 / 2.6e-4 (N = 32 / 128)."""
    s64, i32, _, _ = _constructive_sup(64.0)
    s256, i128, _, _ = _constructive_sup(256.0)
    assert float(s64) <= 3.5 * 2 / 65 and float(s256) <= 3.5 * 2 / 257
    assert 3 < float(s64 / s256) < 5, (s64, s256)
    assert float(i32) <= 9 * (2 / 32) ** 2 / 8 and float(i128) <= 9 * (2 / 128) ** 2 / 8
    assert float(i32 / i128) >= 10, (i32, i128)


def test_interpolant_passes_through_the_knots():
    """(a) relu, N = 8: f_N(t_k) = f(t_k) at t_k = -1 + k/4, and f_N is linear between."""
    _, _, _, ip = _constructive_sup(8.0)
    idx = np.arange(0, 4001, 500)  # t_k on the grid
    np.testing.assert_allclose(np.asarray(ip)[idx], np.asarray(FE)[idx], atol=1e-5)
    mid = idx[:-1] + 250
    np.testing.assert_allclose(np.asarray(ip)[mid], (np.asarray(FE)[idx[:-1]]
                                                     + np.asarray(FE)[idx[1:]]) / 2, atol=1e-5)


def test_masked_units_have_no_effect_and_no_gradient():
    """The max-width layout: units >= N change nothing and get zero gradient."""
    key = jax.random.PRNGKey(0)
    state = jax.jit(ua.init, static_argnums=1)(key, TINY)
    p = jax.tree.map(lambda q: q[1], state.params)  # width 8 of N_max = 32
    p = (p[0], p[1], jnp.ones_like(p[2]), p[3])
    mask = ua.width_masks(TINY)[1]
    x = ua.grid(16, 1)

    @jax.jit
    def outputs(p):
        full = ua.net(p, x, mask, "sigmoid")
        cut = ua.net(tuple(q[:8] if q.ndim else q for q in p), x, mask[:8], "sigmoid")
        return full, cut, jax.grad(lambda q: jnp.sum(ua.net(q, x, mask, "sigmoid") ** 2))(p)

    full, cut, g = outputs(p)
    np.testing.assert_allclose(full, cut, rtol=1e-6)
    assert float(jnp.abs(g[0][8:]).max()) == 0 and float(jnp.abs(g[2][8:]).max()) == 0
    assert float(jnp.abs(g[0][:8]).max()) > 0


def test_slope_of_a_power_law():
    np.testing.assert_allclose(ua.slope((1, 10, 100), jnp.array([1.0, 0.1, 0.01])), -1.0,
                               rtol=1e-5)


# --- behaviour, purity ---


def test_error_falls_with_width_for_both_tracks_but_not_for_the_linear_control(sweep):
    """Sup error at N = 32 below 0.3 x that at N = 2, for the constructive staircase and the
    trained nets, and the L2 error likewise, each the mean of 2 seeds (the sweep's rows 1
    and 2, seeds 0 and 1; the control's 2 rows). The broken variant, the same
    nets without a nonlinearity (affine for every N), fails it on both tracks. Measured
    when written: constructive 0.93 -> 0.10, trained 0.63 -> 0.05; linear: constructive
    grows (the staircase's weights on a straight line), trained 0.79 -> 0.79."""
    def falls(final, rows):
        ok = True
        for track in ("constructive", "trained"):
            for err in ("sup", "l2"):
                e2 = final[f"{err}_{track}_N2"][rows].mean()
                e32 = final[f"{err}_{track}_N32"][rows].mean()
                ok &= bool(e32 < 0.3 * e2)
                print(track, err, e2, e32)
        return ok

    assert falls(sweep[2], slice(1, 3))
    _, _, lin = _train(LINEAR, jax.random.split(jax.random.PRNGKey(0), 2))
    assert not falls(lin, slice(0, 2))
    for track in ("constructive", "trained"):  # fails on each track, not just one
        assert lin[f"sup_{track}_N32"].mean() > 0.5 * lin[f"sup_{track}_N2"].mean()


def test_train_is_pure_and_seeded(sweep):
    state, m, final = sweep
    jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[1]), (state, m, final))
    assert not np.array_equal(m["charts/sup_N8"][0], m["charts/sup_N8"][2])
    assert m["losses/mse_N32"][0, -1] < m["losses/mse_N32"][0, 0]


# --- CLI, config ---


def test_cli_runs_and_plots(tmp_path):
    png = tmp_path / "ua.png"
    args = cli_args(TINY, ua.Config()) + ["--run-dir", str(tmp_path / "run"), "--no-progress",
                                          "--fast-compile", "--plot", str(png)]
    res = ua.main(args)
    assert res.history["charts/sup_N32"].shape == (1, 3)
    assert float(res.final["slope_constructive"][0]) < -0.5
    assert png.stat().st_size > 1000


def test_paper_preset_traces():
    cfg, state, (after, metrics) = trace_paper(ua)
    assert state.params[0].shape == (12, 4096, 1) and metrics["charts/sup_N4096"].shape == ()


def test_2d_trains_with_the_same_program():
    """d = 2 (trained only): init and one update trace; evaluate has no constructive keys."""
    cfg = dataclasses.replace(TINY, input_dim=2, train_points=8, eval_points=11)
    state = jax.eval_shape(lambda k: ua.init(k, cfg), jax.random.PRNGKey(0))
    assert state.params[0].shape == (3, 32, 2)
    final = jax.eval_shape(lambda s: ua.evaluate(s, cfg), state)
    assert "sup_trained_N32" in final and "sup_constructive_N32" not in final


def test_validate_names_the_field():
    """Each bad value raises naming its field; steps_per_update = 0 is caught before the
    modulo (else a bare ZeroDivisionError), train_steps = 0 before a run of no update.
    Mutation tried: the >= 1 checks removed: fails (train_steps = 0 raises nothing,
    steps_per_update = 0 a bare ZeroDivisionError)."""
    for bad, name in ((dict(input_dim=3), "input_dim"), (dict(activation="tanh"),
                      "activation"), (dict(widths=(4, 2)), "widths"),
                      (dict(steepness=0.0), "steepness"), (dict(train_steps=650),
                      "train_steps"), (dict(dtype="fp8"), "dtype"),
                      (dict(train_steps=0), "train_steps must be >= 1"),
                      (dict(steps_per_update=0), "steps_per_update must be >= 1")):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(TINY, **bad).validate()
    with pytest.raises(run.ConfigError, match="lr"):
        run.check_config(dataclasses.replace(TINY, lr=0.0))


def test_every_config_field_is_read():
    assert unread_fields(ua) == []
