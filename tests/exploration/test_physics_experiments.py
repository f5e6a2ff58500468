"""Tests of exploration/physics_experiments.py: the toy's dynamics (a = F / m), the labelling
reward and episode end, masses resampled at every auto-reset, the difficulty's mass gap, the
A2C loss by hand, the rollout's LSTM resets, purity, CLI, paper preset, and behaviour against
the same agent without memory and on a world whose masses do not move the blocks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exploration import physics_experiments as pe
from tests.common.cli import cli_args
from tests.common.compiled import jit0, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: 2 blocks, 8 steps per episode at most.
TINY = pe.Config(num_blocks=2, max_steps=8, beta_max=0.5, num_envs=32, num_steps=8, mlp=16,
                 hidden=16, lr=1e-2, total_timesteps=32 * 8 * 200, eval_episodes=1000)
EXACT = dataclasses.replace(TINY, obs_noise=0.0, friction=0.5, force=2.0, dt=0.5)
step = jit0(pe.env_step, (3,))


def _state(mass, t=0, v=(0.0, 0.0)):
    return pe.EnvState(jnp.array(v), jnp.array(mass), jnp.array(0.3), jnp.array(t, jnp.int32),
                       jnp.array(-1, jnp.int32))


def test_push_accelerates_by_force_over_mass():
    """Push block 1 (mass 4) with F = 2, dt = 0.5, friction 0.5, v = (1, 2) before: v' =
    (0.5 * 1, 0.5 * 2 + 2 / 4 * 0.5) = (0.5, 1.25), seen without noise in obs[:2]; the
    one-hot of the previous action (push_1) follows, then t / T = 1 / 8. With the masses
    switched off (the broken world) the same push gives 0.5 * 2 + 2 * 0.5 = 2."""
    key = jax.random.PRNGKey(0)
    s = _state([1.0, 4.0], v=(1.0, 2.0))
    obs, s2, r, done, _ = step(s, jnp.array(1), key, EXACT, jnp.array(True))
    np.testing.assert_allclose(s2.v, [0.5, 1.25], rtol=1e-6)
    np.testing.assert_allclose(obs, [0.5, 1.25, 0, 1, 0, 0, 1 / 8], rtol=1e-6)
    assert float(r) == 0.0 and not bool(done)
    _, s3, *_ = step(s, jnp.array(1), key, EXACT, jnp.array(False))
    np.testing.assert_allclose(s3.v, [0.5, 2.0], rtol=1e-6)


def test_label_reward_ends_the_episode_and_resamples_the_masses():
    """Masses (1, 3): label_1 (action 3) is right, +1; label_0 (action 2) wrong, -1; both end
    the episode and the next state is a fresh one (t = 0, v = 0, no previous action) with
    masses redrawn (they differ from (1, 3) at every one of 16 keys, and the heavy block is
    each of the two for some key). A push at t = T - 1 times out: -1, done, not labelled."""
    s = _state([1.0, 3.0], t=2, v=(0.3, 0.4))
    keys = jax.random.split(jax.random.PRNGKey(1), 16)
    vstep = jit0(jax.vmap(pe.env_step, (None, None, 0, None, None)), (3,))
    for action, reward, correct in ((3, 1.0, True), (2, -1.0, False)):
        obs, s2, r, done, info = vstep(s, jnp.array(action), keys, EXACT, jnp.array(True))
        np.testing.assert_array_equal(r, reward)
        assert done.all() and info["labelled"].all() and (info["correct"] == correct).all()
        np.testing.assert_array_equal(info["length"], 3)
        assert (s2.t == 0).all() and (s2.v == 0).all() and (s2.prev_action == -1).all()
        assert (np.abs(np.asarray(s2.mass) - [1.0, 3.0]).max(-1) > 1e-3).all()
        heavy = np.asarray(s2.mass).argmax(-1)
        assert 0 < heavy.sum() < 16, heavy
    _, _, r, done, info = step(_state([1.0, 3.0], t=7), jnp.array(0), keys[0], EXACT,
                               jnp.array(True))
    assert float(r) == -1.0 and bool(done) and not bool(info["labelled"])
    _, _, r, done, _ = step(_state([1.0, 3.0], t=6), jnp.array(0), keys[0], EXACT,
                            jnp.array(True))
    assert float(r) == 0.0 and not bool(done)


def test_difficulty_shrinks_the_mass_gap():
    """beta fixed at 0, 0.5, 0.9 (beta_min = beta_max), max_gap = 1: heavy / light = 2, 1.5,
    1.1 exactly, one heavy block, light blocks equal, scale s in [1, mass_scale]."""
    sample = jax.jit(jax.vmap(pe.sample_masses, (0, None)), static_argnums=1)
    keys = jax.random.split(jax.random.PRNGKey(2), 64)
    for beta, ratio in ((0.0, 2.0), (0.5, 1.5), (0.9, 1.1)):
        cfg = dataclasses.replace(TINY, num_blocks=3, beta_min=beta, beta_max=beta)
        mass, b = sample(keys, cfg)
        m = np.sort(np.asarray(mass), -1)
        np.testing.assert_allclose(m[:, 2] / m[:, 1], ratio, rtol=1e-5)
        np.testing.assert_allclose(m[:, 0], m[:, 1], rtol=1e-6)
        assert (m[:, 0] >= 1.0).all() and (m[:, 0] <= cfg.mass_scale + 1e-5).all()
        np.testing.assert_allclose(b, beta, atol=1e-6)


def test_a2c_loss_by_hand():
    """logp = log[0.5, 0.25], A = [2, -1], V = [1, 0], R = [0, 2], H = [0.7, 0.5]:
    pg = -(2 log 0.5 - log 0.25) / 2 = 0; v = 0.5 (1 + 4) / 2 = 1.25; loss = 0.5 * 1.25 -
    0.1 * 0.6 = 0.565; d loss / d logp = -A / 2 = [-1, 0.5]."""
    logp, adv = jnp.log(jnp.array([0.5, 0.25])), jnp.array([2.0, -1.0])
    v, ret, ent = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]), jnp.array([0.7, 0.5])
    loss, m = pe.a2c_loss(logp, adv, ent, v, ret, 0.5, 0.1)
    np.testing.assert_allclose(loss, 0.565, atol=1e-6)
    np.testing.assert_allclose(m["losses/value"], 1.25)
    g = jax.grad(lambda lp: pe.a2c_loss(lp, adv, ent, v, ret, 0.5, 0.1)[0])(logp)
    np.testing.assert_allclose(g, [-1.0, 0.5], atol=1e-6)


def test_rollout_resets_the_lstm_at_episode_starts_only():
    """The rollout `update` runs, 4 envs x 8 steps: the LSTM is zeroed before an episode's
    first step and carried otherwise, so one pass of the network over the recorded sequence
    with the recorded resets gives the rollout's log-probabilities (what the loss replays);
    resets are exactly the starts (step 0 and after each done). With `recurrent` false every
    step is a reset."""
    cfg = dataclasses.replace(TINY, num_envs=4)
    net = pe.network(cfg)

    def go(key, recurrent):
        s = pe.init(key, cfg)
        params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(key, p.shape), s.params)
        _, traj = pe.rollout(params, cfg, s.env_state, s.obs, s.start, s.carry, key, 8,
                             recurrent, jnp.array(True))
        _, logits, _ = net.apply(params, s.carry, traj["obs"], traj["reset"])
        logp = jax.nn.log_softmax(logits)
        return traj, jnp.take_along_axis(logp, traj["action"][..., None], -1)[..., 0]

    go = jit0(go)
    traj, replay = go(jax.random.PRNGKey(3), jnp.array(True))
    np.testing.assert_allclose(replay, traj["logp"], atol=1e-5)
    starts = np.concatenate([np.ones((1, 4), bool), np.asarray(traj["done"][:-1])])
    np.testing.assert_array_equal(traj["reset"], starts)
    assert traj["done"].any() and not traj["reset"].all()
    broken, _ = go(jax.random.PRNGKey(3), jnp.array(False))
    assert broken["reset"].all()


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--dtype", "fp8"], "dtype='fp8'"), (["--num-blocks", "1"], "num_blocks=1"),
           (["--beta-min", "0.5", "--beta-max", "0.2"], "beta_min=0.5"),
           (["--friction", "2"], "friction=2"), (["--hidden", "0"], "--hidden must be >= 1")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            pe.main(args + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(pe) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (4 blocks, T = 100, 256 envs x 20
    steps, LSTM 100): builds on CPU without running; in bfloat16 too."""
    cfg, state, (after, metrics) = trace_paper(pe)
    trace_paper(pe, dtype="bfloat16")
    assert state.obs.shape == (256, 4 + 8 + 1) and state.carry[0].shape == (256, 100)
    assert state.env_state.mass.shape == (256, 4) and cfg.num_updates == 9765
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))


SEEDS = 2
RUN_ARGS = cli_args(TINY, pe.Config()) + ["--num-seeds", str(2 * SEEDS), "--log-every", "200",
                                         "--no-progress"]


def _run(run_dir, arms=("masses_matter",), args=RUN_ARGS):
    """TINY through `pe.main`, SEEDS seeds per arm in ONE compiled program: the first SEEDS
    are the agent, each further block of SEEDS the broken variant named in `arms` (a traced
    flag in the state switched off), each on the key of its twin among the first SEEDS."""
    keys = jax.random.split(jax.random.PRNGKey(0), (len(arms) + 1) * SEEDS)
    real = pe.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        return state.replace(**{arm: i // SEEDS != j + 1 for j, arm in enumerate(arms)})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pe, "init", init)
        return main_recording_chunks(pe.main, args + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("phys"))


def test_agent_experiments_before_labelling_and_the_massless_world_is_a_coin(recorded):
    """Behaviour ([1] Sec. 4) in seconds: 2 blocks, T = 8, gap in [0.5, 1], 200 A2C updates
    of 32 envs x 8 steps, 2 seeds per arm, 1000 fresh evaluation episodes. An agent forced
    to answer at t = 0 scores 0.5 (`accuracy_t0`, the policy's best label before any push).
    Measured (loaded 2-core CPU): labelling accuracy
        A2C-LSTM                                 0.624 0.697   (t = 0: 0.515 0.499)
        masses do not move the blocks (broken)   0.513 0.480
    so the agent pushes the blocks, reads their accelerations and labels the heavier one;
    in a world where F / m does not depend on m the same agent stays at chance. The agent
    also experiments: episodes last ~3 steps (push, push, label)."""
    run_, _ = recorded
    acc, t0 = run_.final["accuracy"], run_.final["accuracy_t0"]
    agent, broken = acc[:SEEDS], acc[SEEDS:]
    print("accuracy", acc, "t0", t0, "length", run_.final["episode_length"])
    assert agent.min() > 0.6 and broken.max() < 0.57, acc
    assert agent.mean() > t0[:SEEDS].mean() + 0.1 and np.abs(t0 - 0.5).max() < 0.06, t0
    assert (run_.final["episode_length"][:SEEDS] > 2.2).all(), run_.final["episode_length"]
    np.testing.assert_array_equal(run_.state.masses_matter, [True] * SEEDS + [False] * SEEDS)


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's compiled chunk (the whole run) again on its recorded input: bit-identical
    params and metrics (no tracing, no compiling); seeds differ; the run wrote its files;
    --help documents every field."""
    run_, chunks = recorded
    with pytest.raises(SystemExit):
        pe.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(pe.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (run_.run_dir / "metrics.jsonl").exists()
    h = run_.history["losses/value"]
    assert h.shape == (2 * SEEDS, 200) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, run_.state.params, state.params)
    np.testing.assert_array_equal(run_.history["losses/value"], metrics["losses/value"])


def test_plot_writes_accuracy_and_length_against_difficulty(recorded, tmp_path):
    out = pe.plot(recorded[0].final, TINY, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000 and out.endswith("p.png")


@pytest.mark.slow
def test_slow_harder_episodes_take_longer_experiments_and_lower_accuracy(tmp_path):
    """[1]'s findings (Sec. 4) on the 2-block toy, beta ~ U[0, 0.9] per episode (gap 0.1 to
    1), 600 updates (154k steps), 2 seeds per arm, accuracy and length in 5 beta bins.
    Measured (loaded 2-core CPU), accuracy overall | bin 0 .. bin 4 | length bin 0 .. 4:
        A2C-LSTM            0.968 0.914 | .99 .99 1.0 .99 .86, .99 .98 .97 .94 .72
                            | 3.22 3.23 3.49 3.66 4.07, 3.56 3.62 3.72 3.70 3.79
        no recurrence       0.878 0.889 | lengths 3.83 .. 4.64, 3.69 .. 4.54
        masses do not move  0.505 0.490 | .44 .. .54 (a coin)
    Harder episodes get longer experiments and lower accuracy, though beta is not observed:
    the agent stops when the evidence suffices. The agent without recurrence is NOT a coin:
    it writes memory into the world, through the block it pushes next and the clock t / T
    it observes (its episodes are longer); only the massless world is a clean broken arm."""
    cfg = dataclasses.replace(TINY, beta_max=0.9, total_timesteps=32 * 8 * 600)
    args = cli_args(cfg, pe.Config()) + ["--num-seeds", str(3 * SEEDS), "--log-every", "600",
                                         "--no-progress"]
    run_, _ = _run(tmp_path, ("recurrent", "masses_matter"), args)
    f = run_.final
    acc = f["accuracy"]
    bins = lambda name: np.stack([f[f"{name}/{b}"] for b in range(TINY.eval_bins)], -1)
    a, n = bins("acc")[:SEEDS], bins("length")[:SEEDS]
    print("accuracy", acc, "acc bins", a, "length bins", n)
    assert acc[:SEEDS].min() > 0.85 and acc[2 * SEEDS:].max() < 0.57, acc
    assert (a[:, 0] > a[:, -1] + 0.08).all() and (n[:, -1] > n[:, 0] + 0.1).all(), (a, n)
