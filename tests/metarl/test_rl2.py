"""Tests of metarl/rl2.py: the hidden state carried across the episodes of a trial and reset
between trials (the meta-RL pitfall), the losses by hand, purity, CLI and behaviour against
the same agent whose memory is wiped at every episode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from common.rl import ppo_loss
from metarl import rl2
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: 2-armed bandits, 10 pulls per trial.
TINY = rl2.Config(env_id="Meta-Bandit-2", episodes_per_trial=10, num_steps=10, num_envs=64,
                  hidden=32, total_timesteps=64 * 10 * 50, lr=4e-3, num_epochs=2,
                  num_minibatches=2, eval_trials=500)


def test_rollout_carries_the_hidden_state_within_a_trial_and_resets_it_between():
    """The pitfall, on the rollout `update` runs: 2-armed bandits, 3 pulls per trial, 7 steps.
    h is zeroed before steps 0, 3, 6 (trial starts) and carried at the others, so
      - the per-step rollout equals one pass of the network over the sequence with the
        recorded resets (what the PPO minibatches replay; ratio = 1 at the old params);
      - at step 3 the policy equals that of a blank memory fed obs[3] alone (new task);
      - at steps 1, 2 it differs from a blank memory (it remembers pulls 0, 1);
      - the trial's done (what GAE sees as terminal) is at steps 2 and 5 only.
    The broken variant (`reset_each_episode`) zeroes h at every step (a pull is an episode)."""
    cfg = dataclasses.replace(TINY, episodes_per_trial=3, num_envs=2, hidden=8)
    env = rl2.make_env(cfg)
    net = rl2.network(cfg, env)

    def run_(key, episode_reset):
        obs, env_state = env.reset(key)
        h = (jnp.zeros((2, 8)), jnp.zeros((2, 8)))
        start = jnp.ones(2, bool)
        params = net.init(key, h, obs[None], start[None])
        # non-trivial recurrent weights so that memory shows in the output
        params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(key, p.shape), params)
        _, traj = rl2.rollout(params, net, env, env_state, obs, start, h, key, 7, episode_reset)
        _, out, _, _ = net.apply(params, h, traj["obs"], traj["reset"])
        _, blank, _, _ = net.apply(params, h, traj["obs"][:, None, 0], jnp.ones((7, 1), bool))
        return traj, out, blank[:, 0]

    key = jax.random.PRNGKey(0)
    run_ = jax.jit(run_).lower(key, jnp.array(False)).compile(run.INIT_COMPILER_OPTIONS)
    traj, out, blank = run_(key, jnp.array(False))
    logp = jax.nn.log_softmax(out)
    replay = jnp.take_along_axis(logp, traj["action"][..., None], -1)[..., 0]
    np.testing.assert_allclose(replay, traj["logp"], atol=1e-5)
    np.testing.assert_array_equal(traj["reset"][:, 0], [1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(traj["done"][:, 0], [0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(traj["episode"][:, 0], [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_allclose(out[3, 0], blank[3], atol=1e-5)
    np.testing.assert_allclose(out[6, 0], blank[6], atol=1e-5)
    assert np.abs(out[1:3, 0] - blank[1:3]).min() > 1e-3, (out[:, 0], blank)
    broken, _, _ = run_(key, jnp.array(True))
    np.testing.assert_array_equal(broken["reset"][:, 0], [1] * 7)


def test_a2c_loss_by_hand_and_its_gradient_is_ppo_at_ratio_one():
    """[2]'s loss by hand: logp = log[0.5, 0.25], A = [2, -1], V = [1, 0], R = [0, 2],
    H = [0.7, 0.5]: pg = -(2 log 0.5 - log 0.25) / 2 = 0; v = 0.5 (1 + 4) / 2 = 1.25;
    loss = 0 + 0.5 * 1.25 - 0.1 * 0.6 = 0.565. At the old policy (ratio 1) the clipped PPO
    surrogate has the same policy gradient (the PPO step of one epoch and one minibatch)."""
    logp, adv = jnp.log(jnp.array([0.5, 0.25])), jnp.array([2.0, -1.0])
    v, ret, ent = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]), jnp.array([0.7, 0.5])
    loss, m = rl2.a2c_loss(logp, adv, ent, v, ret, 0.5, 0.1)
    np.testing.assert_allclose(loss, 0.565, atol=1e-6)
    np.testing.assert_allclose(m["losses/value"], 1.25)
    g_a2c = jax.grad(lambda lp: rl2.a2c_loss(lp, adv, ent, v, ret, 0.5, 0.1)[0])(logp)
    g_ppo = jax.grad(lambda lp: ppo_loss(lp, jax.lax.stop_gradient(lp), adv, ent, v, v, ret,
                                         0.2, 0.5, 0.1)[0])(logp)
    np.testing.assert_allclose(g_a2c, [-1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(g_ppo, g_a2c, atol=1e-6)


def test_per_episode_return_by_hand():
    """T = 4 steps, N = 2 trials, n = 2 episodes: rewards [[1, 0], [0, 1], [1, 1], [5, 5]],
    episodes [[0, 0], [0, 1], [1, 1], [0, 0]], the last step after the first trial's end
    (alive 0): episode 0 returns (1 + 0 + 0) and (0), episode 1 (1) and (1 + 1): means
    [0.5, 1.5]; the 5s of the next trial do not count."""
    r = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    ep = jnp.array([[0, 0], [0, 1], [1, 1], [0, 0]])
    alive = jnp.array([[1, 1], [1, 1], [1, 1], [0, 0]], bool)
    np.testing.assert_allclose(rl2.per_episode_return(r, ep, alive, 2), [0.5, 1.5])


def test_flags_reach_the_functions_they_configure(monkeypatch):
    """Parsed as the CLI parses them, gamma and lambda reach GAE, the loss coefficients the
    loss, and --algo a2c takes a2c_loss in one step of the whole batch (traced by
    jax.eval_shape; nothing compiles). GAE gets the rollout's trial-level done (the Trial
    wrapper's, true only at a trial's end; test_envs checks it), not the inner episode flag
    d_{t-1}. bfloat16 compute traces."""
    seen = {}

    def spy(name):
        real = getattr(rl2, name)

        def wrapped(*args, **kwargs):
            seen.setdefault(name, []).append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(rl2, name, wrapped)

    rolled = []
    real_rollout = rl2.rollout
    monkeypatch.setattr(rl2, "rollout", lambda *a: rolled.append(real_rollout(*a)) or rolled[-1])
    for name in ("gae", "a2c_loss", "ppo_loss"):
        spy(name)
    cfg, _ = run.parse(rl2.Config, rl2.PRESETS, cli_args(TINY, rl2.Config()) + [
        "--algo", "a2c", "--gamma", "0.9", "--gae-lambda", "0.7", "--vf-coef", "0.3",
        "--ent-coef", "0.02", "--dtype", "bfloat16", "--num-envs", "4"])
    state = jax.eval_shape(lambda k: rl2.init(k, cfg), jax.random.PRNGKey(0))
    jax.eval_shape(lambda s: rl2.update(s, cfg), state)
    assert [a[4:] for a in seen["gae"]] == [(0.9, 0.7)]
    (_, traj), = rolled
    rewards, values, dones = seen["gae"][0][:3]  # GAE over the trial: only its end is terminal
    assert rewards is traj["reward"] and values is traj["value"] and dones is traj["done"]
    assert len(seen["a2c_loss"]) == 1 and "ppo_loss" not in seen
    (logp, *_rest, vf, ent), = seen["a2c_loss"]
    assert logp.shape == (10, 4) and (vf, ent) == (0.3, 0.02)  # the whole batch (T, N)
    ppo = dataclasses.replace(cfg, algo="ppo", dtype="float32")
    jax.eval_shape(lambda s: rl2.update(s, ppo), state)
    assert seen["ppo_loss"][0][0].shape == (10, 2)  # (T, trials of one minibatch)


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--algo", "trpo"], "algo='trpo'"), (["--dtype", "fp8"], "dtype='fp8'"),
           (["--env-id", "Meta-Bandits"], "known: Meta-Bandit-<K>"),
           (["--num-envs", "10", "--num-minibatches", "4"], "num_envs=10 is not divisible"),
           (["--gae-lambda", "1.5"], r"--gae-lambda must be in \[0, 1\]"),
           (["--lr", "0"], "--lr must be > 0"), (["--hidden", "0"], "--hidden must be >= 1")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            rl2.main(args + ["--run-dir", str(tmp_path)])


SEEDS = 4
RUN_ARGS = cli_args(TINY, rl2.Config()) + ["--num-seeds", str(2 * SEEDS), "--log-every", "50",
                                          "--no-progress"]


def _run(run_dir):
    """TINY through `rl2.main`, 2 x SEEDS seeds in ONE compiled program: seeds SEEDS.. are
    the broken variant (hidden state also reset at every inner episode, traced in the
    state), each on the key of its RL^2 twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = rl2.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        return state.replace(episode_reset=i >= SEEDS)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rl2, "init", init)
        return main_recording_chunks(rl2.main, RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("rl2"))


@pytest.fixture(scope="module")
def tiny_run(recorded):
    return recorded[0]


def test_rl2_learns_across_episodes_and_the_reset_variant_cannot(tiny_run):
    """Behaviour ([1] Sec. 4.1) in seconds: 2-armed bandits (p ~ U[0,1]), 10 pulls per trial,
    50 updates of 640 steps, 4 seeds; evaluated on 500 fresh trials. Random play scores 5.0
    per trial, the best arm known 6.67. Measured (CPU, jax 0.10.2), return per trial,
    expected regret, mean reward of pulls 8-10 minus pull 1:
        RL^2                    5.54 5.81 5.60 5.75   regret 1.03 1.01 0.97 0.78   gain +.07
        reset at every episode  5.03 5.41 5.08 5.03   regret 1.56 1.39 1.46 1.48   gain +.00
    The broken variant keeps only (a_{t-1}, r_{t-1}) in its input, i.e. at best
    win-stay/lose-shift; RL^2 identifies the better arm and exploits it, so its pulls improve
    from the first to the last episode of a trial; the broken variant's stay flat. The test
    also fails when `update`'s rollout ignores the traced reset flag (both halves then train
    alike: the training returns of the last 10 updates overlap)."""
    ret = tiny_run.final["trial_return"]
    on, off = ret[:SEEDS], ret[SEEDS:]
    print("RL2", on, "reset each episode", off)
    assert on.min() > off.max() + 0.1, (on, off)
    assert on.mean() > off.mean() + 0.3, (on, off)
    f = tiny_run.final
    late = np.mean([f[f"adaptation/{i:03d}"] for i in (7, 8, 9)], 0)
    gain = late - f["adaptation/000"]  # the last pulls of a trial against the first
    assert gain[:SEEDS].mean() > gain[SEEDS:].mean() + 0.03, gain
    assert f["regret"][:SEEDS].max() < f["regret"][SEEDS:].min(), f["regret"]
    # while training too (the rollout's resets, not only evaluate()'s): last 10 updates
    train = tiny_run.history["charts/episodic_return"][:, -10:].mean(1)
    print("training trial return", train)
    assert train[:SEEDS].min() > train[SEEDS:].max(), train
    np.testing.assert_array_equal(tiny_run.state.episode_reset, [False] * SEEDS + [True] * SEEDS)


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's compiled chunk (the whole run) again on its recorded input: bit-identical
    params and metrics (no tracing, no compiling); seeds differ; the run wrote its files;
    --help documents every field."""
    tiny_run, chunks = recorded
    with pytest.raises(SystemExit):
        rl2.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(rl2.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    h = tiny_run.history["losses/value"]
    assert h.shape == (2 * SEEDS, 50) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.params, state.params)
    np.testing.assert_array_equal(tiny_run.history["losses/value"], metrics["losses/value"])


def test_every_config_field_is_read():
    assert unread_fields(rl2) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (2500 trials of 100 pulls, GRU
    256): the preset builds its env, shapes and state on CPU without running."""
    cfg, state, (after, metrics) = trace_paper(rl2)
    assert state.obs.shape == (2500, 1 + 5 + 2) and state.h[0].shape == (2500, 256)
    assert cfg.batch_size == 250_000 and cfg.num_updates == 1000
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))


def test_plot_writes_the_adaptation_curve(tiny_run, tmp_path):
    out = rl2.plot_adaptation([(tiny_run.final, "RL^2")], str(tmp_path / "a.png"), 2)
    assert (tmp_path / "a.png").stat().st_size > 1000 and out.endswith("a.png")

