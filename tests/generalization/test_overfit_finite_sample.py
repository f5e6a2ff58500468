"""Tests of generalization/overfit_finite_sample.py: [1]'s construction on a hand case, Lemma
1 (interleaving, lower triangular, eigenvalues = the diagonal), the padding of the sweep,
kappa against numpy, the weight count 2n + d, every labelling represented in float64 while
float32 breaks and the non-interleaved controls fail, purity, CLI, the paper trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import overfit_finite_sample as fs
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test: digits, n from 5 to 150 (float32 breaks near 100).
TINY = fs.Config(dataset="digits", num_points=(5, 20, 60, 150), num_labellings=3)


def _train(cfg, keys):
    with jax.enable_x64(True):
        fn = jax.jit(jax.vmap(run.make_train(fs.init, fs.update, cfg)))
        return jax.tree.map(np.asarray, fn.lower(keys).compile(run.INIT_COMPILER_OPTIONS)(keys))


@pytest.fixture(scope="module")
def sweep():
    """TINY for seeds (0, 0, 1): rows 0 and 1 must be identical, row 2 different."""
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    return _train(TINY, jnp.stack([k[0], k[0], k[1]]))


N, D, COLS = 40, 5, 8
"""the one shape of the direct construction tests (one compile of `_fit`)"""


@jax.jit
def _fit(z, y, a, active, t):
    """construct + network as `update` runs them, in float64 and float32, and kappa (one
    compile: t is traced, so the broken controls reuse it). Returns numpy arrays."""
    out = {}
    for name, dtype in (("64", jnp.float64), ("32", jnp.float32)):
        params, m, xs, act = fs.construct(z, y, a, active, t, dtype)
        pred = fs.network(params, z.astype(dtype))
        err = fs.rel_errors(pred.astype(jnp.float64), y, active)
        out[name] = dict(a=params[0], b=params[1], w=params[2], m=m, xs=xs, err=err,
                         pred=pred, kappa=fs.cond_inf(m, act.astype(m.dtype)))
    return out


def fit(z, y, a, active, t=0.5):
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, _fit(jnp.asarray(z), jnp.asarray(y), jnp.asarray(a),
                                             jnp.asarray(active), t))


def _points(seed, n=N, d=D):
    """Gaussian points, 4 real and 4 class labellings, a unit direction (numpy float64)."""
    rng = np.random.default_rng(seed)
    z, a = rng.normal(size=(n, d)), rng.normal(size=d)
    y = np.concatenate([rng.normal(size=(n, 4)), rng.integers(0, 10, (n, 4)).astype(float)], 1)
    return z, y, a / np.linalg.norm(a)


# --- equations ---


def test_construction_on_a_hand_case():
    """z = 0, 1, 3 (on the first axis), a = e_1, t = 1/2: x = 0, 1, 3, b = -1/2, 1/2, 2
    (midpoints; b_1 one gap below x_1), A = [[.5, 0, 0], [1.5, .5, 0], [3.5, 2.5, 1]];
    y = (1, -1, 2) gives w = (2, -8, 15) by forward substitution, and c(z_i) = y_i. (The
    three points are the active ones of a padded sample, unsorted: the construction sorts.)"""
    z, y, a = _points(9)
    z[:3], y[:3, 0], a = 0.0, (2.0, 1.0, -1.0), np.eye(D)[0]
    z[:3, 0] = (3.0, 0.0, 1.0)
    r = fit(z, y, a, np.arange(N) < 3)["64"]
    np.testing.assert_allclose(r["xs"][:3], [0, 1, 3])
    np.testing.assert_allclose(r["b"][:3], [-0.5, 0.5, 2.0])
    np.testing.assert_allclose(r["m"][:3, :3], [[0.5, 0, 0], [1.5, 0.5, 0], [3.5, 2.5, 1]])
    np.testing.assert_allclose(r["w"][:3, 0], [2, -8, 15])
    np.testing.assert_allclose(r["pred"][:3, 0], [2, 1, -1], atol=1e-12)


def test_lemma_interleaving_lower_triangular_and_eigenvalues():
    """[1] Lemma 1 on 40 Gaussian points: b_1 < x_1 < b_2 < ... < b_n < x_n, A lower
    triangular with diagonal x_i - b_i > 0, so its eigenvalues are that diagonal (the
    smallest is min_i x_i - b_i); the weights are a (d), b (n), w (n): 2n + d."""
    r = fit(*_points(0), np.ones(N, bool))["64"]
    b, m, xs = r["b"], r["m"], r["xs"]
    assert np.all(np.diff(np.stack([b, xs], 1).reshape(-1)) > 0)  # b_1, x_1, b_2, x_2, ...
    assert np.abs(np.triu(m, 1)).max() == 0
    np.testing.assert_allclose(np.diag(m), xs - b)
    np.testing.assert_allclose(np.sort(np.linalg.eigvals(m).real), np.sort(xs - b), rtol=1e-9)
    assert len(r["a"]) + len(b) + len(r["w"]) == fs.num_weights(N, D) == 85


def test_padding_solves_the_active_block_alone():
    """A size n = 25 < n_max = 40 of the sweep: the active block of A is the construction on
    the 25 points, w solves it (numpy's solve as reference), padded units get w = 0, and
    the padded points' values do not matter."""
    z, y, a = _points(1)
    active = np.arange(N) < 25
    r = fit(z, y, a, active)["64"]
    order = np.argsort(z[:25] @ a)
    ref = np.linalg.solve(r["m"][:25, :25], y[:25][order])
    np.testing.assert_allclose(r["w"][:25], ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(r["w"][25:], 0)
    z[25:] = 100.0 * np.random.default_rng(5).normal(size=(N - 25, D))
    np.testing.assert_array_equal(fit(z, y, a, active)["64"]["w"], r["w"])


def test_cond_inf_is_numpys_on_the_active_block():
    """kappa_inf = ||A||_inf ||A^-1||_inf of the active block of the padded A (points
    scaled by 1e-3, so that ||A||_inf < 1 = the norm of the padding's identity block)."""
    z, y, a = _points(2)
    r = fit(1e-3 * z, y, a, np.arange(N) < 30)["64"]
    assert np.abs(r["m"][:30, :30]).sum(1).max() < 1
    np.testing.assert_allclose(r["kappa"], np.linalg.cond(r["m"][:30, :30], np.inf),
                               rtol=1e-8)


def test_weight_count_at_cifar_scale():
    """[1] Thm 1: 2n + d; CIFAR-10's n = 50,000 and d = 3072 need 103,072 weights."""
    assert fs.num_weights(50_000, 3072) == 103_072


# --- behaviour, purity ---


def test_float64_represents_every_labelling_float32_breaks_and_controls_fail(sweep):
    """Digits, n = 5..150, 3 seeds x 3 labellings of each kind (real N(0,1), random class
    labels, true labels): every float64 error < 1e-8 and every class label reproduced;
    float32's error grows >= 100x from n = 5 to n = 150 and exceeds 1e-3 there. On Gaussian
    points (n = 40, d = 5) float64 is exact too. The broken controls on the same points
    fail: t = 0 (b_i = x_i: zero diagonal, singular: FAILED) and t = 1.5 (b_i below
    x_{i-1}: A not triangular, error ~1). Measured when written: float64 <= 1.4e-10,
    float32 2e-5 -> 0.16 (n = 150); Gaussian 4e-13; t = 1.5 error 1.0, upper_max 0.9."""
    _, m = sweep
    for k in ("real", "classes", "labels"):
        assert m[f"losses/err64_{k}"].max() < 1e-8, (k, m[f"losses/err64_{k}"])
    assert m["charts/label_acc64"].min() == 1.0
    e32 = m["losses/err32_real"].mean(0)
    assert e32[-1] > 100 * e32[0] and e32[-1] > 1e-3, e32
    assert m["charts/upper_max"].max() == 0 and m["charts/min_eigenvalue"].min() > 0
    z, y, a = _points(3)
    good, singular, above = (fit(z, y, a, np.ones(N, bool), t)["64"] for t in (0.5, 0.0, 1.5))
    assert good["err"].max() < 1e-8, good["err"]
    assert singular["err"].min() == fs.FAILED
    assert above["err"].min() > 0.1 and np.abs(np.triu(above["m"], 1)).max() > 0, above["err"]


def test_train_is_pure_and_seeded(sweep):
    state, m = sweep
    jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[1]), (state, m))
    assert not np.array_equal(state.a[0], state.a[2])
    assert not np.array_equal(m["losses/err32_real"][0], m["losses/err32_real"][2])
    np.testing.assert_array_equal(m["charts/num_params"][0], 2 * np.array(TINY.num_points)
                                  + 64)


# --- CLI, config ---


def test_cli_runs_and_plots(tmp_path):
    png = tmp_path / "fs.png"
    args = cli_args(TINY, fs.Config()) + ["--run-dir", str(tmp_path / "run"), "--no-progress",
                                          "--fast-compile", "--plot", str(png)]
    res = fs.main(args)
    assert not jax.config.jax_enable_x64  # main() enables x64 only for its run
    assert float(res.final["max_err64"][0]) < 1e-8
    assert float(res.final["exact_n64"][0]) == 150
    assert res.history["charts/cond_inf"].shape == (1, 4)
    assert png.stat().st_size > 1000


def test_paper_preset_traces():
    """n = 50,000 CIFAR-size Gaussian points in d = 3072, float64 (eval_shape only)."""
    with jax.enable_x64(True):
        cfg, state, (after, metrics) = trace_paper(fs)
    assert state.z.shape == (50_000, 3072) and state.z.dtype == jnp.float64
    assert "charts/cond_inf" not in metrics  # an n^3 inverse at this size: off
    assert metrics["losses/err64_real"].shape == ()


def test_validate_names_the_field():
    for bad, name in ((dict(dataset="cifar"), "dataset"), (dict(num_points=(5, 3)),
                      "num_points"), (dict(num_points=(1, 3)), "num_points"),
                      (dict(num_points=(5, 2000)), "num_points"), (dict(num_classes=1),
                      "num_classes"), (dict(tolerance=2.0), "tolerance")):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(TINY, **bad).validate()
    with pytest.raises(run.ConfigError, match="num-labellings"):
        run.check_config(dataclasses.replace(TINY, num_labellings=0))


def test_every_config_field_is_read():
    assert unread_fields(fs) == []
