"""Tests of evolution/cem_rl.py: CEM update, replay buffer, TD3 target, the gradient half,
behaviour against pure CEM, purity and CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from evolution import cem_rl
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields

# Tiny Pendulum setting for purity / CLI (50-step episodes, 4 actors, few gradient steps).
TINY = cem_rl.Config(env_id="Pendulum-v1", episode_steps=50, total_timesteps=800, pop_size=4,
                     num_elites=2, start_steps=200, grad_steps_ratio=0.1, buffer_size=1000,
                     batch_size=16, actor_hidden=(16, 16), critic_hidden=(16, 16),
                     eval_episodes=2)


def test_cem_update_matches_closed_form():
    """[1] Eq. (1)-(2) on a hand case: 4 members in 2-D, K = 2 elites, weights
    log(3/1), log(3/2) normalised; variance around the OLD mean plus the decayed eps. The
    first two generations add eps_1 = 0.95 * 1e-3 + 0.05 * 1e-5 = 9.505e-4 and
    eps_2 = 0.95 eps_1 + 5e-7 = 9.03475e-4: decay, then add, as [1]'s sepCEM.tell (the
    add-then-decay order would add 1e-3, then 9.505e-4)."""
    pop = jnp.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0], [-1.0, 1.0]])
    fitness = jnp.array([3.0, 1.0, 4.0, 2.0])  # minimised: elites are rows 1 then 3
    state = cem_rl.CEMState(jnp.array([0.0, 0.5]), jnp.array([1.0, 1.0]), jnp.array(1e-3))
    new = cem_rl.cem_tell(state, pop, fitness, num_elites=2, eps_end=1e-5, eps_tau=0.95)
    w0 = np.log(3.0) / (np.log(3.0) + np.log(1.5))  # 0.730...
    w1 = 1.0 - w0
    assert abs(w0 - 0.7304) < 1e-3
    eps = 0.95 * 1e-3 + 0.05 * 1e-5  # 9.505e-4
    mean = [w0 * 0.5 + w1 * -1.0, w0 * -1.0 + w1 * 1.0]
    var = [w0 * 0.5**2 + w1 * 1.0 + eps, w0 * 1.5**2 + w1 * 0.5**2 + eps]
    np.testing.assert_allclose(new.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-6)
    np.testing.assert_allclose(new.eps, eps, rtol=1e-6)
    new2 = cem_rl.cem_tell(new, pop, fitness, num_elites=2, eps_end=1e-5, eps_tau=0.95)
    eps2 = 9.03475e-4
    var2 = w0 * (pop[1] - new.mean) ** 2 + w1 * (pop[3] - new.mean) ** 2 + eps2
    np.testing.assert_allclose(new2.eps, eps2, rtol=1e-6)
    np.testing.assert_allclose(new2.var, var2, rtol=1e-6)
    # eps decays toward eps_end: after many generations it is eps_end.
    s = state
    for _ in range(400):
        s = cem_rl.cem_tell(s, pop, fitness, 2, 1e-5, 0.95)
    np.testing.assert_allclose(s.eps, 1e-5, rtol=1e-3)


def test_cem_ask_is_antithetic_with_the_diagonal_variance():
    state = cem_rl.CEMState(jnp.array([1.0, -2.0, 0.0]), jnp.array([4.0, 0.25, 1e-3]),
                            jnp.array(0.0))
    pop = cem_rl.cem_ask(jax.random.PRNGKey(0), state, 20_000, antithetic=True)
    np.testing.assert_allclose(pop[:10_000] + pop[10_000:],
                               np.broadcast_to(2 * state.mean, (10_000, 3)), atol=1e-5)
    np.testing.assert_allclose(pop.mean(0), state.mean, atol=1e-5)
    np.testing.assert_allclose(pop.var(0), state.var, rtol=0.05)


def test_buffer_ring_wrap_and_size():
    buf = cem_rl.buffer_init(5, obs_dim=2, action_dim=1)

    def tr(vals):
        v = jnp.asarray(vals, jnp.float32)
        return cem_rl.Transition(jnp.stack([v, -v], -1), v[:, None], v, jnp.stack([v, v], -1),
                                 jnp.zeros_like(v))

    buf = cem_rl.buffer_add(buf, tr([0, 1, 2]), jnp.array([True, True, True]))
    assert int(buf.pos) == 3 and int(buf.size) == 3
    # 4 rows, one invalid (not stored): 10 -> slot 3, 12 -> slot 4, 13 wraps to slot 0.
    buf = cem_rl.buffer_add(buf, tr([10, 11, 12, 13]), jnp.array([True, False, True, True]))
    assert int(buf.pos) == 1 and int(buf.size) == 5
    np.testing.assert_array_equal(buf.data.reward, [13, 1, 2, 10, 12])
    np.testing.assert_array_equal(buf.data.obs[:, 1], -np.array([13, 1, 2, 10, 12]))
    # Samples come only from the filled part.
    small = cem_rl.buffer_add(cem_rl.buffer_init(8, 2, 1), tr([5, 6]), jnp.array([True, True]))
    s = cem_rl.buffer_sample(small, jax.random.PRNGKey(0), 500)
    assert set(np.asarray(s.reward).tolist()) == {5.0, 6.0}


def test_td3_target_hand_case():
    """[2] Eq. (10): min of the twin target critics at the smoothed, clipped action."""
    noise = cem_rl.target_noise(jax.random.PRNGKey(0), (1000, 1), policy_noise=1e6,
                                noise_clip=0.5, max_action=2.0)
    np.testing.assert_allclose(np.abs(noise), 1.0)  # clipped to noise_clip * a_max
    assert (noise > 0).any() and (noise < 0).any()
    small = cem_rl.target_noise(jax.random.PRNGKey(0), (10_000, 1), 0.2, 0.5, 1.0)
    assert abs(float(small.std()) - 0.2) < 0.01 and float(jnp.abs(small).max()) <= 0.5

    actor = lambda s: jnp.full((s.shape[0], 1), 1.8)
    critic = lambda s, a: (s[:, 0] + a[:, 0], 2 * s[:, 0] - a[:, 0])
    batch = cem_rl.Transition(
        obs=jnp.zeros((3, 1)), action=jnp.zeros((3, 1)), reward=jnp.array([1.0, -1.0, 0.5]),
        next_obs=jnp.array([[1.0], [3.0], [3.0]]), terminated=jnp.array([0.0, 1.0, 0.0]))
    y = cem_rl.td3_target(actor, critic, batch, jnp.array([[1.0], [-1.0], [-1.0]]), 0.9, 2.0)
    # row 0: a' = clip(2.8) = 2, Q = (3, 0) -> 1 + 0.9 * 0 = 1
    # row 1: terminal -> -1
    # row 2: a' = 0.8, Q = (3.8, 5.2) -> 0.5 + 0.9 * 3.8 = 3.92
    np.testing.assert_allclose(y, [1.0, -1.0, 3.92], rtol=1e-6)


def _rl_phase_once(cfg, phase=None):
    """rl_phase (jitted) on a fresh init, a buffer of 200 random Pendulum-shaped transitions
    and a CEM population; returns (state, buffer, population, rl_phase's outputs)."""
    nets = cem_rl.nets_of(cfg)
    state = compiled(lambda k_: cem_rl.init(k_, cfg), jax.random.PRNGKey(0))
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    n = 200
    tr = cem_rl.Transition(jax.random.normal(k[0], (n, 3)),
                           jax.random.uniform(k[1], (n, 1), minval=-2, maxval=2),
                           -jax.random.uniform(k[2], (n,)), jax.random.normal(k[3], (n, 3)),
                           jnp.zeros((n,)))
    buf = cem_rl.buffer_add(state.buffer, tr, jnp.ones((n,), bool))
    pop = cem_rl.cem_ask(jax.random.PRNGKey(2), state.cem, cfg.pop_size, True)
    args = (pop, state.critic, buf, jax.random.PRNGKey(3))
    if phase is None:  # compiled at XLA's lowest level: a test of what runs, not of speed
        out = compiled(lambda p, c, b, kk: cem_rl.rl_phase(nets, cfg, p, c, b, kk), *args)
    else:
        out = phase(*args)
    return state, buf, pop, out


def _q_gain(cfg, buf, pop, new, critic_state):
    """Mean over the trained rows of Q1(s, pi_new(s)) - Q1(s, pi_old(s)) on the buffer's
    states, under the critic rl_phase returns."""
    nets = cem_rl.nets_of(cfg)
    obs = buf.data.obs[:200]
    q = jax.jit(jax.vmap(lambda p, g: nets.critic.apply(p, obs, nets.act(g, obs))[0].mean(),
                         (None, 0)))
    rows = slice(0, cfg.num_grad)
    return np.asarray(q(critic_state.params, new[rows]) - q(critic_state.params, pop[rows]))


def test_td3_half_raises_q_and_a_sign_flipped_actor_loss_lowers_it(monkeypatch):
    """Short behaviour of the gradient half (TINY: 2 of 4 actors, 10 critic + 20 actor steps
    each): every trained actor ends with a higher Q1(s, pi(s)) on the buffer's states than
    the sample it started from, under the critic rl_phase trained. Broken variant (the
    deterministic policy gradient with its sign flipped: actor loss +Q1) lowers it for
    every actor. The sign is a traced argument, so both runs share one compile.
    Measured: gains 0.103, 0.130 vs flipped -0.064, -0.072."""
    sign = []  # the traced sign of the rl_phase being traced
    orig = cem_rl.actor_loss
    monkeypatch.setattr(cem_rl, "actor_loss", lambda *a: sign[-1] * orig(*a))
    nets = cem_rl.nets_of(TINY)

    def signed(s, p, c, b, kk):
        sign.append(s)
        return cem_rl.rl_phase(nets, TINY, p, c, b, kk)

    phase = []  # compiled once (lowest XLA level) on the first call, then reused

    def call(s, *args):
        if not phase:
            phase.append(jax.jit(signed).lower(s, *args).compile(run.INIT_COMPILER_OPTIONS))
        return phase[0](s, *args)

    state, buf, pop, _ = _rl_phase_once(TINY, lambda p, c, b, kk: call(1.0, p, c, b, kk))
    gains = {}
    for s in (1.0, -1.0):
        new, critic_state, _, _ = call(s, pop, state.critic, buf, jax.random.PRNGKey(3))
        gains[s] = _q_gain(TINY, buf, pop, new, critic_state)
    gain, flipped = gains[1.0], gains[-1.0]
    print("Q gain", gain, "sign-flipped", flipped)
    assert np.all(gain > 0) and np.all(flipped < 0), (gain, flipped)


def _counted(fn, tag, log, ident):
    """fn with a host callback that appends (tag, ident(args)) each time a step RUNS."""
    def wrapped(*args):
        jax.debug.callback(lambda v: log.append((tag, float(v))), ident(args), ordered=True)
        return fn(*args)
    return wrapped


@pytest.mark.parametrize("rl_fraction,schedule", [
    (0.5, (5, 10, 50)),  # [1] Alg. 1: N = 10, S = 0.1 x 10 x 50 = 50: 5 actors, 2S/N = 10
    (0.3, (3, 17, 50)),  # 3 actors; the critic keeps S steps in all: round(50 / 3) = 17
])
def test_rl_phase_runs_algorithm_1_and_only_the_gradient_half_changes(rl_fraction, schedule,
                                                                      monkeypatch):
    """Counts the steps `rl_phase` executes (host callbacks in critic_step and actor_loss,
    in execution order): for each of the first `num_actors` rows in turn, `critic` critic
    steps whose target actor is that row, then `actor` actor steps; nothing for the other
    rows, which come back unchanged; the shared critic's Adam counted every critic step."""
    num_actors, critic, actor = schedule
    log = []
    monkeypatch.setattr(cem_rl, "critic_step", _counted(
        cem_rl.critic_step, "critic", log, lambda a: a[3][0]))  # genome[0]: which row
    monkeypatch.setattr(cem_rl, "actor_loss", _counted(
        cem_rl.actor_loss, "actor", log, lambda a: 0.0))
    cfg = dataclasses.replace(TINY, pop_size=10, rl_fraction=rl_fraction)
    state, buf, pop, (new, critic_state, closs, aloss) = _rl_phase_once(cfg)
    jax.effects_barrier()
    rows = np.asarray(pop[:, 0])
    expect = []
    for i in range(num_actors):
        expect += [("critic", float(rows[i]))] * critic + [("actor", 0.0)] * actor
    assert [t for t, _ in log] == [t for t, _ in expect], (len(log), len(expect))
    np.testing.assert_allclose([v for _, v in log], [v for _, v in expect], rtol=1e-6)
    adam_count = jax.tree.leaves(critic_state.opt_state[0].count)[0]
    assert int(adam_count) == num_actors * critic
    moved = np.abs(np.asarray(new - pop)).max(axis=1)
    assert (moved[:num_actors] > 1e-4).all(), moved
    np.testing.assert_array_equal(new[num_actors:], pop[num_actors:])
    c0, c1 = jax.tree.leaves(state.critic.params)[0], jax.tree.leaves(critic_state.params)[0]
    assert not np.allclose(c0, c1)  # the shared critic was trained
    assert np.isfinite(closs) and np.isfinite(aloss)


@pytest.mark.slow
def test_cem_rl_beats_pure_cem_on_pendulum():
    """Behaviour ([1] Fig. 2: CEM-TD3 >> CEM): gymnax Pendulum-v1, the quick preset
    (pop 10, 64-64 networks, 1/4 of [1]'s gradient steps) at 32k env steps, 4 seeds vmapped;
    the score is the CEM mean actor's return averaged over the last 3 generations.
    CEM-RL must beat the identical code with rl_fraction = 0 (pure CEM) by 400 per seed
    on average and reach > -600. Measured on a 2-core CPU (about 30 s with a warm compile
    cache): CEM-RL -317, -248, -321, -186 (per seed, mean -268) vs pure CEM (the broken
    variant) -1115, -1266, -1284, -1186 (mean -1213)."""
    base = cem_rl.Config(**{**cem_rl.PRESETS["quick"], "total_timesteps": 32_000})
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    scores = {}
    for frac in (0.5, 0.0):
        cfg = dataclasses.replace(base, rl_fraction=frac)
        _, m = jax.jit(jax.vmap(run.make_train(cem_rl.init, cem_rl.update, cfg)))(keys)
        scores[frac] = np.asarray(m["charts/mean_actor_return"])[:, -3:].mean(1)
        assert m["charts/env_steps"][0, -1] == 32_000
    print("CEM-RL", scores[0.5], "CEM", scores[0.0])
    assert scores[0.5].mean() > -600, scores
    assert (scores[0.5] - scores[0.0]).mean() > 400, scores


# TINY from the command line (--seed 0 with 2 seeds gives split(PRNGKey(0), 2)).
TINY_ARGS = ["--env-id", "Pendulum-v1", "--episode-steps", "50", "--total-timesteps", "800",
             "--pop-size", "4", "--num-elites", "2", "--start-steps", "200",
             "--grad-steps-ratio", "0.1", "--buffer-size", "1000", "--batch-size", "16",
             "--actor-hidden", "16", "16", "--critic-hidden", "16", "16", "--eval-episodes",
             "2", "--num-seeds", "2", "--no-progress"]


def test_cli_runs_pure_and_seeded_and_documents_every_field(tmp_path, capsys):
    """The CLI with TINY's flags (in-process), then the runner's compiled chunk (the whole
    run: 4 generations, one chunk) again on its recorded input, without tracing or
    compiling anything: same seed, identical state and metrics; the 2 seeds of the vmap
    differ; env steps and the start of the gradient phase as configured."""
    with pytest.raises(SystemExit):
        cem_rl.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(cem_rl.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    a, chunks = main_recording_chunks(cem_rl.main, TINY_ARGS + ["--run-dir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "metrics.jsonl").exists()
    assert "final_mean_actor_return" in capsys.readouterr().out
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert set(metrics) <= set(a.history) and "charts/mean_actor_return" in metrics
    for k in metrics:
        np.testing.assert_array_equal(a.history[k], metrics[k])
    s1, m1 = a.state, a.history
    assert not np.array_equal(s1.cem.mean[0], s1.cem.mean[1])
    assert m1["charts/mean_actor_return"].shape == (2, TINY.num_updates)
    np.testing.assert_array_equal(m1["charts/env_steps"][0], [200, 400, 600, 800])
    # gradients start once env_steps > start_steps (from the 3rd generation on)
    assert (m1["losses/critic"][:, :2] == 0).all() and (m1["losses/critic"][:, 2:] > 0).all()
    assert int(s1.buffer.size[0]) == 800 and np.isfinite(m1["losses/actor"]).all()


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="num_elites=11"):
        cem_rl.main(["--num-elites", "11", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--rl-fraction must be in \[0, 1\], got 1.5"):
        cem_rl.main(["--rl-fraction", "1.5", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="buffer_size=10"):
        cem_rl.main(["--buffer-size", "10", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(cem_rl) == []


@pytest.mark.slow  # tracing the brax env alone takes ~40 s on a loaded 2-core CPU
def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (nothing runs): a
    preset that cannot build its env, shapes or state fails here, on CPU."""
    cfg = cem_rl.Config(**cem_rl.PRESETS["paper"])
    cfg.validate()
    try:
        state = jax.eval_shape(lambda k: cem_rl.init(k, cfg), jax.random.PRNGKey(0))
    except ImportError as e:  # brax is a GPU extra
        pytest.skip(f"{cfg.env_id} needs brax, not importable here: {e}")
    after, metrics = jax.eval_shape(lambda s: cem_rl.update(s, cfg), state)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
