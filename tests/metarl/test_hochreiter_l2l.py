"""Tests of metarl/hochreiter_l2l.py: the task and the (x_i, y_{i-1}) input by hand, the LSTM's
memory and its per-step reset, the reference learner, the loss `update` takes, behaviour against
both broken variants in one compiled run, purity, CLI, the paper-preset trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl import hochreiter_l2l as l2l
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: N = 50 (the catalogue's test), LSTM 32,
# 20k training functions in 625 updates of 32.
TINY = l2l.Config(
    seq_len=50, hidden=32, batch_size=32, num_functions=20_000, lr=1e-2, eval_functions=500
)
SEEDS = 4  # seeds 0, 1: the learner; 2: y_{i-1} zeroed; 3: state reset every step


def test_quadratic_task_by_hand_and_its_moments():
    """phi(2, 3) = (4, 9, 6, 2, 3, 1); y = phi(x) . (a..f) with a..f ~ U[-1, 1], x ~ U[-1, 1]^2,
    so E[y] = 0 and E[y^2] = (1/3)(1/5 + 1/5 + 1/9 + 1/3 + 1/3 + 1) = 0.7259."""
    np.testing.assert_allclose(l2l.features(jnp.array([2.0, 3.0])), [4, 9, 6, 2, 3, 1])
    x, y = jax.jit(l2l.sample_sequences, static_argnums=(1, 2))(jax.random.PRNGKey(0), 4000, 25)
    assert x.shape == (4000, 25, 2) and y.shape == (4000, 25)
    assert float(jnp.abs(x).max()) <= 1.0
    np.testing.assert_allclose(float(jnp.mean(y**2)), 0.7259, rtol=0.03)
    assert abs(float(y.mean())) < 0.02
    # one function per sequence: the points of a sequence fit one set of 6 coefficients
    phi = np.asarray(l2l.features(x[0]), np.float64)
    coef = np.linalg.lstsq(phi, np.asarray(y[0], np.float64), rcond=None)[0]
    np.testing.assert_allclose(phi @ coef, y[0], atol=1e-5)
    assert np.abs(coef).max() <= 1.0


def test_inputs_are_x_and_the_previous_label():
    """u_i = (x_i, y_{i-1}) with y_0 = 0, time-major ([1] Fig. 1); feed_label = 0 zeroes the
    label column only. Mutation tried: y_i fed instead of y_{i-1} (no shift): fails."""
    x = jnp.arange(12.0).reshape(2, 3, 2)  # [k = 2, n = 3, 2]
    y = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    u = l2l.learner_inputs(x, y, 1.0)
    assert u.shape == (3, 2, 3)
    np.testing.assert_array_equal(u[:, 0, 2], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(u[:, 1, 2], [0.0, 4.0, 5.0])
    np.testing.assert_array_equal(u[:, :, :2], jnp.swapaxes(x, 0, 1))
    u0 = l2l.learner_inputs(x, y, 0.0)
    np.testing.assert_array_equal(u0[..., 2], 0.0)
    np.testing.assert_array_equal(u0[..., :2], u[..., :2])


def _predict(cfg, params, u, keep):
    return l2l.network(cfg).apply(params, u, keep)


def test_lstm_carries_its_state_and_the_broken_variant_resets_it():
    """The `Learner` that `update` trains: with keep = 1 the prediction at step 3 depends on
    step 1's input (memory through the sequence); with keep = 0 it equals the prediction of
    a sequence of step 3's input alone (state reset every step); step 1 is always from the
    zero state. Mutation tried: `Step` ignoring keep: fails."""
    cfg = dataclasses.replace(TINY, hidden=8)
    params = compiled(lambda k: l2l.init(k, cfg).params, jax.random.PRNGKey(1))
    u = jax.random.normal(jax.random.PRNGKey(2), (3, 2, 3))
    u2 = u.at[0].set(u[0] + 1.0)  # only step 1's input changes
    f = jax.jit(lambda p, u, k: _predict(cfg, p, u, k))
    carry, carry2 = f(params, u, 1.0), f(params, u2, 1.0)
    assert np.abs(carry[2] - carry2[2]).min() > 1e-4
    reset, reset2 = f(params, u, 0.0), f(params, u2, 0.0)
    np.testing.assert_array_equal(reset[1:], reset2[1:])
    np.testing.assert_allclose(reset[2], f(params, u[2:], 1.0)[0], rtol=1e-6)
    np.testing.assert_allclose(carry[0], reset[0], rtol=1e-6)


def test_reference_learner_is_least_squares_on_the_examples_before():
    """ridge_errors: at position 1 nothing is seen, the prediction is 0 and the error E[y^2];
    at position 4 it is the minimum-norm-like posterior mean from 3 examples (checked with
    numpy); with 6 examples (6 unknowns, no noise) the error is small, from position 8 on
    (7 examples) ~0 (the tiny noise variance 1e-5 regularises the solve). Mutation tried: an
    inclusive cumulative sum (the learner sees y_i): fails."""
    x, y = l2l.sample_sequences(jax.random.PRNGKey(3), 64, 10)
    err = np.asarray(jax.jit(l2l.ridge_errors)(x, y))
    np.testing.assert_allclose(err[0], np.mean(np.asarray(y[:, 0]) ** 2), rtol=1e-4)
    assert err[6] < 0.03 and err[7:].max() < 1e-3 and err[1] > 0.1
    phi, yy = np.asarray(l2l.features(x), np.float64), np.asarray(y, np.float64)
    lam = 1e-5 / l2l.COEF_VAR
    pred = [
        phi[k, 3]
        @ np.linalg.solve(phi[k, :3].T @ phi[k, :3] + lam * np.eye(6), phi[k, :3].T @ yy[k, :3])
        for k in range(64)
    ]
    np.testing.assert_allclose(err[3], np.mean((np.array(pred) - yy[:, 3]) ** 2), rtol=1e-2)


def test_windows_and_knee_by_hand():
    """Early = mean of positions 1-3, late = positions late_from..n; the knee counts the
    examples before the error stays below fit_fraction x the first error (a dip that comes
    back up does not count; never: n). Mutation tried: the first dip counted: fails."""
    curve = jnp.array([1.0, 0.5, 0.3, 0.01, 0.2, 0.04, 0.03, 0.02])
    early, late = l2l.window_means(curve, 6)
    np.testing.assert_allclose([early, late], [0.6, 0.03], rtol=1e-6)
    assert float(l2l.examples_to_fit(curve, 0.05)) == 5.0  # positions 6-8 stay below 0.05
    assert float(l2l.examples_to_fit(curve, 0.001)) == 8.0
    assert float(l2l.examples_to_fit(curve, 1.5)) == 0.0


def test_update_minimises_the_mean_squared_error_of_its_batch():
    """losses/mse of one `update` is the mean over positions and functions of (yhat_i - y_i)^2
    on the batch drawn from the state's key, with the state's parameters, and the step
    lowers that batch's loss (Adam with the clip). Mutation tried: the loss against y_{i-1}
    instead of y_i: fails."""
    cfg = dataclasses.replace(TINY, hidden=8, seq_len=6, batch_size=4)
    state = compiled(lambda k: l2l.init(k, cfg), jax.random.PRNGKey(4))

    def both(state):
        new, metrics = l2l.update(state, cfg)
        x, y = l2l.sample_sequences(jax.random.split(state.key)[1], 4, 6)
        net = l2l.network(cfg)
        yhat = net.apply(state.params, l2l.learner_inputs(x, y, 1.0), 1.0)  # [n, k]
        after = l2l.position_errors(net, new.params, x, y, 1.0, 1.0).mean()
        return metrics, jnp.mean((yhat - y.T) ** 2), after

    metrics, want, after = compiled(both, state)
    np.testing.assert_allclose(metrics["losses/mse"], want, rtol=1e-5)
    assert after < want


# --- one run through the CLI: the learner and both broken variants in one program ---

RUN_ARGS = cli_args(TINY, l2l.Config()) + [
    "--num-seeds",
    str(SEEDS),
    "--log-every",
    str(TINY.num_updates // 5),
    "--no-progress",
]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through `main` once, SEEDS seeds in one compiled program, in 5 chunks: seed 2
    feeds y_{i-1} = 0 and seed 3 resets the LSTM state every step (the state's traced
    feed_label / keep_state set per seed key), with the compiled chunks recorded."""
    keys = jax.random.split(jax.random.PRNGKey(0), SEEDS)  # the runner's seed keys
    real = l2l.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(key, cfg)
        return state.replace(
            feed_label=jnp.where(i == 2, 0.0, 1.0), keep_state=jnp.where(i == 3, 0.0, 1.0)
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(l2l, "init", init)
        return main_recording_chunks(
            l2l.main, RUN_ARGS + ["--run-dir", str(tmp_path_factory.mktemp("l2l"))]
        )


def test_learner_learns_within_the_sequence_and_both_broken_variants_do_not(recorded_run):
    """Behaviour ([1]; the catalogue's test, shortened): 20k random quadratics, N = 50, then 500
    held-out functions. Mean squared error at positions 36-50 over positions 1-3, measured
    (loaded 2-core CPU, jax 0.10.2):
        learner (x_i, y_{i-1}), 2 seeds      0.207 0.220   (late error 0.113 0.116)
        y_{i-1} zeroed                       1.048         (late 0.749: nothing to learn from)
        state reset every step               0.814         (late 0.494: y_{i-1} alone tells
                                                            the level of f, no more)
    The catalogue's 0.2 gate after longer training is the slow test below. Mutations tried:
    `learner_inputs` ignoring feed_label (the zeroed arm then learns: 0.221) and `Step`
    ignoring keep (the reset arm then learns: 0.214) both fail here."""
    f = recorded_run[0].final
    ratio, late = f["eval/late_over_early"], f["eval/mse_late"]
    print("late/early", np.round(ratio, 3), "late", np.round(late, 3))
    assert ratio[:2].max() < 0.3 and late[:2].max() < 0.2, ratio
    assert ratio[2] > 0.9 and late[2] > 0.6, ratio  # y_{i-1} zeroed: flat at E[y^2]
    assert ratio[3] > 0.7 and late[3] > 0.4, ratio  # no memory: flat after step 2
    curve = f["eval/mse_curve"]
    assert curve.shape == (SEEDS, TINY.seq_len)
    np.testing.assert_allclose(curve[:, 0], 0.726, atol=0.12)  # nothing seen: E[y^2]
    assert (f["eval/ridge_curve"][:, 7:] < 1e-3).all()  # the ideal learner: exact from 7


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """The runner's first recorded chunk, rerun on its recorded input, gives chunk 2's input
    bit for bit and the same metrics; the two learner seeds differ; the run wrote its files;
    --help documents every field and both presets. Mutation tried: `init` splitting a fixed
    PRNGKey(0) instead of its key (the seeds collapse into one): fails."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        l2l.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(l2l.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists() and (res.run_dir / "summary.json").exists()
    h = res.history["losses/mse"]
    assert h.shape == (SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    assert len(chunks) == 5
    first_chunk, first_input = chunks[0]
    state, metrics = first_chunk(first_input)
    jax.tree.map(np.testing.assert_array_equal, state, chunks[1][1])
    np.testing.assert_array_equal(metrics["losses/mse"], h[:, : TINY.num_updates // 5])


def test_plot_writes_the_error_curves(recorded_run, tmp_path):
    f = recorded_run[0].final
    out = l2l.plot_curves(
        [(f["eval/mse_curve"][:2], "learner"), (f["eval/mse_curve"][2:3], "zeroed")],
        f["eval/ridge_curve"],
        str(tmp_path / "c.png"),
    )
    assert (tmp_path / "c.png").stat().st_size > 1000 and out.endswith("c.png")


def test_bad_values_fail_with_named_field(tmp_path):
    """Each bad value on top of TINY for 1 update fails before anything compiles, naming the
    field (so a missing check runs one tiny update and fails here instead of starting the
    paper-size run). The runner's name rules already refuse a fit_fraction above 1 and a
    negative max_grad_norm, so validate() itself is asked about fit_fraction = 1.5.
    Mutations tried: fit_fraction checked only for <= 0 (1.5 accepted) fails with DID NOT
    RAISE; the max_grad_norm check removed (0 accepted by the runner's ">= 0": then
    clip_by_global_norm(0) zeroes every update) fails with DID NOT RAISE."""
    bad = [
        (["--ablation", "none2"], "ablation='none2'"),
        (["--dtype", "fp8"], "dtype='fp8'"),
        (["--seq-len", "3"], "--seq-len must be >= 4"),
        (["--late-from", "60", "--seq-len", "50"], r"--late-from must be in \[4, seq_len"),
        (["--num-functions", "10", "--batch-size", "32"], "--num-functions"),
        (["--fit-fraction", "0"], "--fit-fraction must be"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0"),
        (["--lr", "0"], "--lr must be > 0"),
    ]
    for i, (args, msg) in enumerate(bad):
        with pytest.raises(ValueError, match=msg):
            l2l.main(RUN_ARGS + args + ["--num-updates", "1", "--run-dir", str(tmp_path / str(i))])
    with pytest.raises(ValueError, match=r"--fit-fraction must be in \(0, 1\], got 1.5"):
        dataclasses.replace(TINY, fit_fraction=1.5).validate()


def test_every_config_field_is_read():
    """Mutation tried: evaluate() with the knee's fraction hard-coded (fit_fraction unread)."""
    assert unread_fields(l2l) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (N = 100, LSTM 256, batch 128) and
    in bfloat16: shapes and state build on CPU without running. It failed during development
    on a real bug: the bfloat16 LSTM's carry started in bfloat16 and came back float32."""
    cfg, state, (after, metrics) = trace_paper(l2l)
    assert cfg.seq_len == 100 and cfg.num_updates == 10_000_000 // 128
    lstm = state.params["params"]["ScanStep_0"]["LSTMCell_0"]
    assert lstm["hi"]["kernel"].shape == (256, 256) and lstm["ii"]["kernel"].shape == (3, 256)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    trace_paper(l2l, dtype="bfloat16")
    trace_paper(l2l, ablation="reset_each_step")


@pytest.mark.slow
def test_catalogue_gate_after_longer_training():
    """The catalogue's gate: after SLOW_FUNCTIONS random quadratics (N = 50), the error at
    positions 36-50 is < 0.2 x the error at positions 1-3 on held-out functions, and both
    broken variants, trained the same way in the same program, stay above 0.7. Measured
    (loaded 2-core CPU, 123 s, 80k functions, seed key 7): learner
    0.026, y_{i-1} zeroed 1.034, state reset every step 0.905."""
    cfg = dataclasses.replace(TINY, num_functions=SLOW_FUNCTIONS)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)

    def one(key, feed, keep):
        state = l2l.init(key, cfg).replace(feed_label=feed, keep_state=keep)
        state, _ = jax.lax.scan(lambda s, _: l2l.update(s, cfg), state, None, cfg.num_updates)
        return l2l.evaluate(state, cfg)["eval/late_over_early"]

    ratio = np.asarray(
        jax.jit(jax.vmap(one))(keys, jnp.array([1.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 0.0]))
    )
    print("late/early: learner, zeroed, reset", np.round(ratio, 3))
    assert ratio[0] < 0.2 and ratio[1:].min() > 0.7, ratio


SLOW_FUNCTIONS = 80_000
