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

# 2 PPO updates (4 envs x 16 steps, both policies), a 2-generation search of 4 candidates
# from [4]'s start (mean 0, step 0.5: half the candidates fall outside [0, 1]^d, clipped).
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
    cma_init_mean=0.0,
    cma_init_std=0.5,
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
    up_env, k = so.UPEnv(cfg, with_mu=True), jax.random.PRNGKey(1)
    _, s0 = up_env.reset(k, jnp.full(2, 0.5))
    thdot = [up_env.step(k, s0, jnp.ones(1), jnp.full(2, m))[1].theta_dot for m in (0.0, 1.0)]
    assert thdot[0] != thdot[1], thdot  # step's physics is the episode's mu

    first, _ = tiny_run
    pick = lambda tree: jax.tree.map(lambda x: x[0], tree)
    up, dr = pick(first.state.up.params), pick(first.state.dr.params)
    s = jnp.array([1.0, 0.0, 0.5])
    mus = jnp.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]])

    def actions(up, dr):
        act_up, act_dr = so.policy_act(up, cfg, True), so.policy_act(dr, cfg, False)
        return jax.vmap(lambda m: act_up(s, m))(mus), jax.vmap(lambda m: act_dr(s, m))(mus)

    a, a_dr = compiled(actions, up, dr)
    assert abs(a[0] - a[1]) > 1e-4 and abs(a[0] - a[2]) > 1e-4, a
    np.testing.assert_array_equal(a_dr, np.broadcast_to(a_dr[0], a_dr.shape))
    kernels = [v["kernel"].shape[0] for v in up["params"].values() if isinstance(v, dict)]
    assert 5 in kernels and 3 not in kernels  # [cos, sin, thdot, mu_1, mu_2]


def test_target_episode_reads_gravity_and_stops_at_termination(monkeypatch):
    """The target's physics: gravity x target_gravity (g 10 -> 15), which changes a target
    episode's return; the return counts only steps until termination (Pendulum never
    terminates and gymnax's CartPole pays 0 after it, so a stub Pendulum that pays 1 per
    step and terminates at step 5 checks the alive mask: 5, not 200)."""
    p = so.physics(TINY, np.ones(2, np.float32), 1.5)
    assert float(p.g) == 15.0
    zero = lambda obs, mu: jnp.zeros(1)
    mu = jnp.full(2, 0.5)
    pendulum = so.base_env("Pendulum-v1")

    class Stub(so.envs.Env):
        reset, default_params = pendulum.reset, pendulum.default_params

        def step(self, key, state, action, params):
            obs, s, _, _, trunc = pendulum.step(key, state, action, params)
            return obs, s, jnp.float32(1.0), s.time >= 5, trunc

    def returns(key):
        r1 = so.target_return(zero, TINY, mu, key)
        r15 = so.target_return(zero, dataclasses.replace(TINY, target_gravity=1.5), mu, key)
        with monkeypatch.context() as mp:
            mp.setattr(so, "base_env", lambda env_id: Stub())
            r_stub = so.target_return(zero, TINY, mu, key)
        return r1, r15, r_stub

    r1, r15, r_stub = compiled(returns, jax.random.PRNGKey(3))
    assert abs(float(r1) - float(r15)) > 1.0, (r1, r15)
    assert float(r_stub) == 5.0, r_stub


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
    the hand-written controller as the frozen UP and the zero torque as the "DR" arm,
    through `transfer` (what `evaluate` runs): 20 generations x 8 candidates x 1 episode
    from mean 0.5, step 0.25, then every answer scored on the same 16 target episodes per
    seed, normalised as (R - R_zero) / (R_oracle - R_zero). Measured (seeds 0, 1;
    R_oracle -245, -383; R_zero -1066, -1278): SO-CMA's final CMA-ES mean 1.05, 1.05, its
    best candidate seen 0.63, 1.05 (one lucky 1-episode fitness can pick it), the
    controller at the box centre (what it does without mu) 0.42, 0.54; the negated
    fitness (minimises the return) -0.07. SO-CMA can beat the oracle: the best
    strategy need not be the true parameters ([1] Sec. 5)."""
    cfg = dataclasses.replace(
        TINY,
        population_size=8,
        generations=20,
        cma_init_mean=0.5,
        cma_init_std=0.25,
        solution="mean",
        eval_episodes=16,
    )
    act = controller(cfg)
    zero = lambda obs, mu: jnp.zeros(1)

    def arms(signs, keys):
        return jax.vmap(lambda s, k: so.transfer(act, zero, k, cfg, s))(signs, keys)

    signs = jnp.array([1.0, 1.0, -1.0])
    out = compiled(arms, signs, jax.random.split(jax.random.PRNGKey(0), 3))
    r_zero, r_oracle = out["final/baseline_return"], out["final/oracle_return"]
    norm = {
        k: (out[f"final/{k}_return"] - r_zero) / (r_oracle - r_zero)
        for k in ("so_cma_mean", "so_cma_best", "center")
    }
    print("returns:", {k: v for k, v in out.items() if k.endswith("return")}, "scores:", norm)
    np.testing.assert_array_equal(out["final/so_cma_return"], out["final/so_cma_mean_return"])
    assert (norm["so_cma_mean"][:2] >= 0.9).all(), norm
    assert norm["so_cma_best"][:2].min() > norm["center"][:2].max(), norm
    assert norm["center"][:2].max() < 0.6 and norm["so_cma_mean"][2] < 0.5, norm
    # the best candidate so far is at least as fit as any generation's mean candidate
    best_f, mean_f = out["curve/best_fitness"][:2], out["curve/fitness_mean"][:2]
    assert (best_f >= mean_f).all() and (np.diff(best_f, axis=1) >= 0).all()
    mu = out["curve/best_mu"]
    assert ((mu >= 0) & (mu <= 1)).all()


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
    for arm in ("up", "dr"):  # the chunk trains both policies
        before, after = (
            getattr(x, arm).params["params"]["Dense_0"]["kernel"] for x in (states, again)
        )
        assert not np.array_equal(before, after), arm
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
        (["--generations", "0"], "generations=0"),
        (["--fitness-episodes", "0"], "fitness_episodes=0"),
        (["--eval-episodes", "0"], "eval_episodes=0"),
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


@pytest.mark.slow
def test_slow_universal_policy_at_the_true_mu_beats_the_dr_policy(tmp_path):
    """Stage 1 works: the quick preset without its gravity gap and with 1-episode fresh
    fitness (1 seed, 400 PPO updates of each policy), both arms
    scored by `evaluate` on the same 32 target episodes (m 1.8, l 1.2). The UP at the true
    mu must beat the DR policy trained on the same randomization without mu by > 100.
    Measured (loaded 2-core CPU, ~3 min): UP-true -570, DR -853."""
    res = so.main(
        ["--preset", "quick", "--num-seeds", "1", "--no-progress", "--run-dir", str(tmp_path)]
        + ["--target-gravity", "1", "--fitness-episodes", "1", "--no-shared-starts"]
    )
    up, dr = (
        float(res.final["final/oracle_return"][0]),
        float(res.final["final/baseline_return"][0]),
    )
    print("UP at the true mu:", up, "DR:", dr)
    assert up > dr + 100, (up, dr)
