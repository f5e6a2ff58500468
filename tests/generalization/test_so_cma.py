"""Tests of generalization/so_cma.py: the universal policy's input mu (drawn anew every
episode, read by the policy, ignored by the baseline), strategy optimisation with a
hand-written mu-conditioned Pendulum controller against the oracle mu, the controller
without mu and the negated fitness, purity, CLI, paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import so_cma as so
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# 2 PPO updates (4 envs x 16 steps, both policies), a 2-generation search of 4 candidates.
TINY = so.Config(
    ppo_updates=2,
    num_envs=4,
    num_steps=16,
    num_epochs=1,
    num_minibatches=2,
    hidden=(8,),
    population_size=4,
    generations=2,
    fitness_episodes=1,
    eval_episodes=2,
)
SEEDS = 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, its 2 updates in one chunk (recorded for a rerun),
    then evaluate (the search)."""
    return main_recording_chunks(
        so.main,
        cli_args(TINY, so.Config())
        + [
            "--num-seeds",
            str(SEEDS),
            "--log-every",
            "2",
            "--no-progress",
            "--fast-compile",
            "--run-dir",
            str(tmp_path_factory.mktemp("so_cma")),
        ],
    )


def test_mu_is_drawn_per_episode_and_read_by_the_universal_policy(tiny_run):
    """[1] Sec. 4.1: the training env appends the episode's mu to the observation, mu stays
    fixed within an episode and is drawn anew at every auto-reset, and it sets the physics
    (m = m_0 (xi_low + mu (xi_high - xi_low))). The trained UP's action changes with mu;
    the DR baseline's network never sees mu."""
    cfg = TINY
    env = so.train_env(cfg, with_mu=True)
    horizon = 200  # Pendulum-v1's time limit: every env restarts after step 200

    def roll(key):
        obs, vs = env.reset(key)

        def step(carry, k):
            obs, vs = carry
            obs2, vs2, _, done, _ = env.step(vs, jnp.zeros((cfg.num_envs, 1)), k)
            return (obs2, vs2), (obs, vs.params, done)

        return jax.lax.scan(step, (obs, vs), jax.random.split(key, horizon + 5))[1]

    obs, mu, done = compiled(roll, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(obs[..., -2:], mu)  # the policy's input is the true mu
    assert (mu >= 0).all() and (mu <= 1).all()
    assert done[horizon - 1].all() and not done[: horizon - 1].any()
    np.testing.assert_array_equal(mu[:horizon], np.broadcast_to(mu[0], mu[:horizon].shape))
    assert (np.abs(mu[horizon] - mu[0]) > 1e-3).all(), (mu[0], mu[horizon])  # new draws
    assert len(np.unique(mu[0, :, 0])) == cfg.num_envs  # one draw per env
    p = so.physics(cfg, so.to_xi(cfg, np.array([0.2, 0.6], np.float32)))
    np.testing.assert_allclose([p.m, p.l], [0.5 + 0.2 * 1.5, 0.5 + 0.6 * 1.0], rtol=1e-6)

    first, _ = tiny_run
    pick = lambda tree: jax.tree.map(lambda x: x[0], tree)
    up, dr = pick(first.state.up.params), pick(first.state.dr.params)
    s = jnp.array([1.0, 0.0, 0.5])
    act_up, act_dr = so.policy_act(up, cfg, True), so.policy_act(dr, cfg, False)
    a = [act_up(s, jnp.array(m)) for m in ([0.1, 0.1], [0.9, 0.1], [0.1, 0.9])]
    assert abs(a[0] - a[1]) > 1e-4 and abs(a[0] - a[2]) > 1e-4, a
    np.testing.assert_array_equal(
        act_dr(s, jnp.array([0.1, 0.1])), act_dr(s, jnp.array([0.9, 0.9]))
    )
    kernels = [v["kernel"].shape[0] for v in up["params"].values() if isinstance(v, dict)]
    assert 5 in kernels and 3 not in kernels  # [cos, sin, thdot, mu_1, mu_2]


def controller(cfg, kp=4.0, kd=2.0, ke=1.0):
    """A hand-written universal policy for Pendulum-v1: energy-shaping swing-up, then a
    feedback-linearising PD at the top, both with the model (m, l) = xi(mu) it is given
    (gymnax: I thdd = m g l / 2 sin th + u, I = m l^2 / 3, th = 0 upright)."""

    def act(obs, mu):
        m, l = so.to_xi(cfg, mu)
        c, s, w = obs
        inertia, gravity = m * l**2 / 3, m * 10.0 * l / 2
        energy = 0.5 * inertia * w**2 + gravity * (c - 1)
        u_top = inertia * (-kp * jnp.arctan2(s, c) - kd * w) - gravity * s
        u = jnp.where(c > 0.85, u_top, ke * w * -energy)
        return jnp.clip(u, -2.0, 2.0)[None]

    return act


def test_cma_es_finds_a_mu_as_good_as_the_oracle():
    """Behaviour, Pendulum-v1, target xi = (m 1.8, l 1.2) in the box [0.5, 2] x [0.5, 1.5],
    the hand-written controller as the frozen UP, 20 generations x 8 candidates x 1 episode
    (the final CMA-ES mean as the answer). Scores on the same 16 target episodes,
    normalised as (R - R_zero) / (R_oracle - R_zero) with R_zero the zero-torque return.
    Measured: SO-CMA 1.06 and 1.06 (seeds 0, 1; R -251), the controller at the box centre
    (what it does without mu) 0.44 (R -753), the negated fitness (minimises the return)
    -0.16 (R -1240); R_oracle -299, R_zero -1112. SO-CMA beats the oracle: the best
    strategy need not be the true parameters ([1] Sec. 5)."""
    cfg = dataclasses.replace(TINY, population_size=8, generations=20, solution="mean")
    act = controller(cfg)
    zero = lambda obs, mu: jnp.zeros(1)
    mu_true = jnp.asarray(so.to_mu(cfg, cfg.xi_target))

    def arms(signs, keys, k_eval):
        hist = jax.vmap(lambda s, k: so.strategy_optimization(act, cfg, k, s))(signs, keys)
        mus = jnp.concatenate([hist["cma_mean"][:, -1], jnp.stack([mu_true, jnp.full(2, 0.5)])])
        return (
            so.fitness(act, cfg, mus, k_eval, 16, shared=True),
            so.fitness(zero, cfg, mus[:1], k_eval, 16, shared=True),
        )

    signs = jnp.array([1.0, 1.0, -1.0])
    ret, r_zero = compiled(
        arms, signs, jax.random.split(jax.random.PRNGKey(0), 3), jax.random.PRNGKey(9)
    )
    score = (ret - r_zero) / (ret[3] - r_zero)
    print("returns (SO-CMA x2, negated, oracle, centre):", ret, "zero:", r_zero, "scores:", score)
    assert (score[:2] >= 0.9).all(), score
    assert score[4] < 0.5 and score[2] < 0.5, score


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; its compiled chunk rerun on the same
    initial states gives bit-identical params and metrics; the seeds differ; evaluate's
    search curves and final returns come back per seed; --help documents every field."""
    first, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    again, metrics = chunk(jax.tree.map(jnp.copy, states))  # the chunk donates its input
    metrics = run.mark_undefined(jax.device_get(metrics), run.NAN_UNLESS)
    jax.tree.map(np.testing.assert_array_equal, first.state.up.params, again.up.params)
    jax.tree.map(np.testing.assert_array_equal, first.state.dr.params, again.dr.params)
    assert set(metrics) == set(first.history)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k], v, err_msg=k)
    w = first.state.up.params["params"]["Dense_0"]["kernel"]
    assert not np.array_equal(w[0], w[1])
    f = first.final
    assert f["curve/fitness_mean"].shape == (SEEDS, TINY.generations)
    assert f["curve/best_mu"].shape == (SEEDS, TINY.generations, 2)
    assert ((f["curve/best_mu"] >= 0) & (f["curve/best_mu"] <= 1)).all()
    assert (np.diff(f["curve/best_fitness"], axis=1) >= 0).all()  # best so far never drops
    for k in (
        "final/so_cma_return",
        "final/oracle_return",
        "final/baseline_return",
        "final/center_return",
    ):
        assert f[k].shape == (SEEDS,) and np.isfinite(f[k]).all(), k
    np.testing.assert_allclose(f["final/mu_true"][0], [1.3 / 1.5, 0.7], rtol=1e-6)
    assert (first.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        so.main(["--help"])
    out = capsys.readouterr().out
    for fld in dataclasses.fields(so.Config):
        assert "--" + fld.name.replace("_", "-") in out, fld.name
    assert "Presets (--preset): quick, paper" in out


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in (
        (["--xi-target", "1.0"], r"xi_target=\(1.0,\)"),
        (["--xi-target", "2.5", "1"], "xi_target=.*must lie"),
        (["--xi-low", "2", "2"], "xi_low=.*must be < xi_high"),
        (["--solution", "median"], "solution='median'"),
        (["--population-size", "1"], "population.size"),
        (["--cma-init-mean", "2"], "cma_init_mean=2.0"),
        (["--num-envs", "0"], "num.envs"),
    ):
        with pytest.raises(ValueError, match=msg):
            so.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(so) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under the paper preset ([4]'s 3 x 64 MLP, 4000-step
    batches, 2500 updates = 10M steps per policy), and of evaluate (13 generations x 6
    candidates x 3 episodes, 46,800 target steps): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(so)
    assert cfg.hidden == (64, 64, 64) and cfg.num_envs * cfg.num_steps == 4000
    assert cfg.population_size == 6 and cfg.fitness_episodes == 3 and cfg.solution == "best"
    assert cfg.generations * cfg.population_size * cfg.fitness_episodes * 200 <= 50_000
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    final = jax.eval_shape(lambda s: so.evaluate(s, cfg), after)
    assert final["curve/best_mu"].shape == (13, 2)
