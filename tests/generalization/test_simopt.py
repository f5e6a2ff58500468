"""Tests of generalization/simopt.py: the discrepancy and its smoothing by hand and against
scipy, the REPS weights against a hand solution of the dual, the weighted Gaussian fit
against numpy, identification of xi_real with a fixed scripted policy (against the
discrepancy taken on the sim's own rollout), purity, CLI, paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d
from scipy.optimize import minimize_scalar

from common import run
from generalization import simopt as so
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# 2 SimOpt iterations of 2 PPO updates (4 envs x 16 steps) on Pendulum-v1: one CLI chunk.
TINY = so.Config(num_iterations=2, ppo_updates=2, num_envs=4, num_steps=16, num_epochs=1,
                 num_minibatches=2, hidden=(8,), num_samples=4, num_real_rollouts=1,
                 eval_episodes=2, sysid_steps=10, reps_updates=2)
SEEDS = 2


def test_discrepancy_by_hand():
    """[1] Eq. 4 on two 3-step, 2-feature trajectories, W = (1, 2), w_l1 = 0.5, w_l2 = 1, no
    smoothing: e = sim - real = [[1, 0], [-2, 1], [0, -1]], W e = [[1, 0], [-2, 2], [0, -2]],
    sum |W e| = 7, sum (W e)^2 = 13, D = 0.5 * 7 + 13 = 16.5."""
    cfg = dataclasses.replace(TINY, obs_weights=(1.0, 2.0, 0.0), smooth_std=0.0)
    real = jnp.array([[0.0, 1, 0], [1, 1, 0], [2, 2, 0]])
    sim = real + jnp.array([[1.0, 0, 5], [-2, 1, 5], [0, -1, 5]])  # feature 3 weighs 0
    np.testing.assert_allclose(so.discrepancy(sim, real, cfg), 16.5, rtol=1e-6)


def test_smoothing_matches_scipy():
    """The Gaussian smoothing [1] applies before D: scipy's gaussian_filter1d (mode nearest)
    on a random 30 x 3 sequence, at [1]'s truncation 4 (std 1.5) and at std 1.1 truncation 3,
    where a ceil radius (4) differs from scipy's rounding (3)."""
    x = np.random.default_rng(0).standard_normal((30, 3)).astype(np.float32)
    for std, trunc in ((1.5, 4.0), (1.1, 3.0)):
        np.testing.assert_allclose(
            so.smooth(jnp.asarray(x), std, trunc),
            gaussian_filter1d(x, std, axis=0, mode="nearest", truncate=trunc), atol=1e-5)


def test_reps_weights_solve_the_dual():
    """Costs D = (0, 1, 3), epsilon = 0.5: eta minimises g(eta) = eta eps + eta log mean
    exp(-D / eta) (scipy, bounded), q ∝ exp(-D / eta); the KL of q to the uniform sample
    weights equals epsilon. With epsilon = 5 > log 3 the bound is slack and q -> the best
    sample. Sign-flipped costs put the most weight on the worst sample (the broken variant)."""
    cost = np.array([0.0, 1.0, 3.0])
    eps = 0.5
    dual = lambda eta: eta * eps + eta * np.log(np.mean(np.exp(-cost / eta)))
    eta = minimize_scalar(dual, bounds=(1e-3, 1e3), method="bounded",
                          options={"xatol": 1e-10}).x
    q_hand = np.exp(-cost / eta) / np.exp(-cost / eta).sum()
    q, eta_ours, kl = so.reps_weights(jnp.asarray(cost), eps)
    np.testing.assert_allclose(eta_ours, eta, rtol=1e-3)
    np.testing.assert_allclose(q, q_hand, atol=1e-4)
    np.testing.assert_allclose(np.sum(q * np.log(3 * q)), eps, atol=1e-4)
    np.testing.assert_allclose(kl, eps, atol=1e-4)
    q_greedy = so.reps_weights(jnp.asarray(cost), 5.0)[0]
    np.testing.assert_allclose(q_greedy, [1.0, 0.0, 0.0], atol=1e-4)
    assert np.argmax(so.reps_weights(-jnp.asarray(cost), eps)[0]) == 2


def test_fit_gaussian_against_numpy():
    """Weighted ML against numpy's weighted mean and biased weighted covariance; the damped
    variant of [5] by hand."""
    x = np.random.default_rng(1).standard_normal((7, 2)).astype(np.float32)
    w = np.random.default_rng(2).uniform(size=7).astype(np.float32)
    w /= w.sum()
    mu, cov = so.fit_gaussian(jnp.asarray(x), jnp.asarray(w), 0.1)
    np.testing.assert_allclose(mu, np.average(x, axis=0, weights=w), atol=1e-6)
    fit = np.cov(x.T, aweights=w, bias=True)
    np.testing.assert_allclose(cov, fit + 0.01 * np.eye(2), atol=1e-6)
    # [5]'s covariance damping 2: the old Sigma scaled by sqrt(tr(Sigma_old^-1 Sigma_fit) / d)
    old = np.array([[2.0, 0.5], [0.5, 1.0]])
    _, damped = so.fit_gaussian(jnp.asarray(x), jnp.asarray(w), 0.0, jnp.asarray(old), 2.0)
    mult = np.sqrt(np.trace(np.linalg.inv(old) @ fit) / 2)
    np.testing.assert_allclose(damped, mult * old, rtol=1e-5)


def scripted(obs):
    """A fixed, smooth Pendulum feedback (no PPO): torque = clip(1 - sin th - 0.3 thdot)."""
    return jnp.clip(1.0 - obs[1] - 0.3 * obs[2], -2.0, 2.0)[None]


def test_reps_moves_mu_toward_xi_real():
    """Behaviour with the scripted policy, Pendulum-v1, xi_real = (m 1.6, l 1.2), p_phi_0 =
    N((1, 1), diag(0.4, 0.25)^2) (|mu_0 - xi_real| = 0.632), 4 sysid_step iterations of 16
    samples, 2 real rollouts of 60 steps: |mu - xi_real| measured 0.215, 0.285, 0.193, 0.073.
    Broken variant in the same program: the discrepancy taken against the sim's own
    rollouts (at mu_0) instead of the real ones: 0.30, 0.53, 0.58, 0.61 (mu returns to
    (1, 1)). With inverted weights, exp(+D / eta), in sysid_step (tried once): 1.08, 1.49,
    1.47, 1.46, and the test fails."""
    cfg = dataclasses.replace(TINY, num_samples=16, num_real_rollouts=2, sysid_steps=60)
    xi_real = jnp.asarray(cfg.xi_real)

    def identify(xi_target, key):
        keys = jax.random.split(key, cfg.num_real_rollouts)
        obs = jax.vmap(lambda k: so.episode(scripted, cfg, xi_target, k, cfg.sysid_steps)[0])(
            keys)
        mu, cov = jnp.asarray(cfg.init_mean), jnp.diag(jnp.asarray(cfg.init_std) ** 2)

        def body(phi, k):
            mu, cov, _ = so.sysid_step(k, scripted, cfg, *phi, keys, obs)
            return (mu, cov), jnp.linalg.norm(mu - xi_real)

        (_, cov_end), dist = jax.lax.scan(body, (mu, cov), jax.random.split(key, 4))
        return dist, jnp.linalg.det(cov_end)

    targets = np.stack([cfg.xi_real, cfg.init_mean]).astype(np.float32)  # real / sim's own
    dist, det = compiled(jax.vmap(identify, (0, None)), targets, jax.random.PRNGKey(0))
    print("|mu - xi_real| per iteration (real, own rollout):", dist, "det Sigma:", det)
    d0 = float(np.linalg.norm(np.subtract(cfg.xi_real, cfg.init_mean)))  # host: no program
    assert dist[0, -1] < 0.3 * d0, dist
    assert dist[1, -1] > 0.8 * d0, dist
    assert det[0] < 0.1 * np.prod(np.asarray(cfg.init_std) ** 2), det  # Sigma shrinks


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, its 2 iterations in one chunk (recorded for a rerun)."""
    return main_recording_chunks(so.main, cli_args(TINY, so.Config()) + [
        "--num-seeds", str(SEEDS), "--log-every", "2", "--no-progress", "--fast-compile",
        "--run-dir", str(tmp_path_factory.mktemp("simopt"))])


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; its compiled chunk rerun on the same
    initial states gives bit-identical params, p_phi and metrics; the seeds differ; p_phi
    and the real return are logged per iteration; --help documents every field."""
    first, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    again, metrics = chunk(jax.tree.map(jnp.copy, states))  # the chunk donates its input
    metrics = run.mark_undefined(jax.device_get(metrics), run.NAN_UNLESS)
    jax.tree.map(np.testing.assert_array_equal, first.state.ppo.params, again.ppo.params)
    np.testing.assert_array_equal(first.state.mu, again.mu)
    np.testing.assert_array_equal(first.state.cov, again.cov)
    assert set(metrics) == set(first.history)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k], v, err_msg=k)
    assert not np.array_equal(first.history["charts/mu_m"][0], first.history["charts/mu_m"][1])
    for k in ("charts/real_return", "charts/mu_dist", "charts/std_l", "losses/reps_kl"):
        assert first.history[k].shape == (SEEDS, 2) and np.isfinite(first.history[k]).all(), k
    np.testing.assert_allclose(first.history["losses/reps_kl"], TINY.reps_epsilon, atol=1e-3)
    assert (first.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        so.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(so.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out


def test_update_replays_the_real_initial_states(tiny_run):
    """update's wiring of real and simulated rollouts, through the CLI's compiled chunk: with
    p_phi at xi_real (Sigma ~ 0) every replay reproduces its real rollout, so the smallest
    discrepancy of the first iteration is ~0; at p_phi_0 it is not. Catches replays started
    from other reset keys than the real rollouts' or real observations sliced off by a
    step (each gives D_min >> 0 at xi_real)."""
    _, chunks = tiny_run
    chunk, states = chunks[0]
    states = jax.tree.map(jnp.copy, states)  # the chunk donates its input
    xi = jnp.asarray(TINY.xi_real, jnp.float32)
    mu = states.mu.at[0].set(xi)
    cov = states.cov.at[0].set(1e-10 * jnp.eye(2))
    _, metrics = chunk(states.replace(mu=mu, cov=cov))
    d_min = np.asarray(metrics["charts/discrepancy_min"])[:, 0]
    print("D_min at xi_real / at p_phi_0:", d_min)
    assert d_min[0] < 1e-3 and d_min[1] > 10 * d_min[0], d_min


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--reps-epsilon", "0"], "reps.epsilon"),
                       (["--xi-real", "1.0"], r"xi_real=\(1.0,\)"),
                       (["--mode", "adr"], "mode='adr'"),
                       (["--xi-min", "6"], "xi_min=6.0"),
                       (["--eval-episodes", "2"], "eval_episodes=2 must be >="),
                       (["--obs-weights", "1", "1"], "obs_weights"),
                       (["--num-envs", "0"], "num.envs"),
                       (["--sysid-steps", "500"], "sysid_steps=500"),
                       (["--xi-real", "6", "1"], "xi_real=.*must lie")):
        with pytest.raises(ValueError, match=msg):
            so.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(so) == []


def test_paper_preset_traces():
    """eval_shape of init and one SimOpt iteration under the paper preset (Pendulum-v1,
    64 envs, 200 PPO updates, [1]'s M = 9600, epsilon = 1, 3 REPS updates): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(so)
    assert cfg.env_id == "Pendulum-v1" and cfg.num_samples == 9600 and cfg.reps_epsilon == 1.0
    assert cfg.reps_updates == 3 and cfg.smooth_truncate == 4.0
    assert state.mu.shape == (2,) and state.cov.shape == (2, 2)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))


@pytest.mark.slow
def test_simopt_beats_uniform_dr_in_real(tmp_path):
    """[1]'s claim in sim-to-sim: the quick preset (Pendulum-v1, xi_real = (m 1.6, l 1.2),
    5 iterations, 1M PPO steps, 2 seeds) with SimOpt against uniform DR over the initial box
    (`--mode uniform`: p_phi never moves, the broken variant), same seeds and budget.
    Measured on a loaded 2-core CPU (~3 min per run): real return of the final policy
    -302 / -333 with SimOpt vs -564 / -612 uniform; |mu - xi_real| 0.003 / 0.012 vs 0.632."""
    runs = {}
    for mode in ("simopt", "uniform"):
        runs[mode] = so.main(["--preset", "quick", "--num-seeds", "2", "--mode", mode,
                              "--no-progress", "--log-every", "5",
                              "--run-dir", str(tmp_path / mode)]).history
    on, off = (runs[m]["charts/real_return"][:, -1] for m in ("simopt", "uniform"))
    print("real return: SimOpt", on, "uniform", off)
    assert on.min() > off.max() + 100, (on, off)
    assert (runs["simopt"]["charts/mu_dist"][:, -1] < 0.1).all()
    assert (runs["uniform"]["charts/mu_dist"][:, -1] > 0.6).all()
