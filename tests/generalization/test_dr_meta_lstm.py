"""Tests of generalization/dr_meta_lstm.py: the physics randomization laws, the hidden-state
reset at episode boundaries, recurrent PPO's recomputed log-probabilities, the ridge probe,
the probe of the LSTM's memory against the same network without memory, purity, CLI,
paper preset and every Config field read."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import dr_meta_lstm as dm
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# 2 updates of 4 envs x 4 steps on CartPole under the quick preset's wide gain range: one
# chunk of the CLI run (--log-every 2), whose evaluate() probes 512 fresh episodes.
TINY = dm.Config(env_id="CartPole-v1", hidden_dense=16, hidden=16, num_envs=4, num_steps=4,
                 total_timesteps=32, num_epochs=1, num_minibatches=2, gain_range=(0.25, 4.0),
                 eval_episodes=512, probe_steps=(0, 4, 8), gamma=0.99)
SEEDS = 2


def test_physics_sampling_laws():
    """4096 draws of `sample_physics` (the VecEnv sampler) under [1]'s ranges: cart and pole
    masses x U[0.5, 1.5] each (mean 1, std 1/sqrt 12 = 0.2887, independent: corr ~ 0), pole
    length x U[0.95, 1.05] (std 0.0289), force_mag x logU[0.75, 1.5] (log: mean
    (log .75 + log 1.5) / 2 = 0.0589, std log 2 / sqrt 12 = 0.2001), gravity 9.8 + N(0, 0.4);
    the derived fields consistent; every xi column the critic reads. Pendulum-v1 (the paper
    preset): max_torque x logU[0.75, 1.5] the same way. sign_flip=0.5: half the force_mags
    negative, |force_mag| the same law, xi's last column the sign. A uniform (not
    log-uniform) gain puts the log mean at 0.0986 (fails); one shared mass draw gives corr 1
    (fails)."""
    cfg = dataclasses.replace(TINY, gain_range=(0.75, 1.5))
    pend = dataclasses.replace(cfg, env_id="Pendulum-v1")
    flip = dataclasses.replace(cfg, sign_flip=0.5)
    base, pbase = dm.make_base_env(cfg).default_params(), dm.make_base_env(pend).default_params()

    def draw(keys):
        out = []
        for c in (cfg, pend, flip):
            p = jax.vmap(lambda k, c=c: dm.sample_physics(k, c))(keys)
            out.append((p, dm.xi_features(c, p), dm.effective_gain(c.env_id, p)))
        return out

    (p, xi, eff), (pp, pxi, peff), (fp, fxi, feff) = compiled(
        draw, jax.random.split(jax.random.PRNGKey(0), 4096))
    mass = np.stack([p.masscart / base.masscart, p.masspole / base.masspole])
    assert mass.min() >= 0.5 - 1e-6 and mass.max() <= 1.5 + 1e-6
    assert np.abs(mass.mean(1) - 1).max() < 0.015 and np.abs(mass.std(1) - 0.2887).max() < 0.01
    assert abs(np.corrcoef(mass)[0, 1]) < 0.05
    ls = p.length / base.length
    assert ls.min() >= 0.95 - 1e-6 and ls.max() <= 1.05 + 1e-6 and abs(ls.std() - 0.0289) < 0.002
    lg = np.log(p.force_mag / base.force_mag)
    assert lg.min() >= np.log(0.75) - 1e-6 and lg.max() <= np.log(1.5) + 1e-6
    assert abs(lg.mean() - 0.0589) < 0.01 and abs(lg.std() - 0.2001) < 0.01
    g = np.asarray(p.gravity) - base.gravity
    assert abs(g.mean()) < 0.02 and abs(g.std() - 0.4) < 0.015
    np.testing.assert_allclose(p.total_mass, p.masscart + p.masspole, rtol=1e-6)
    np.testing.assert_allclose(p.polemass_length, p.masspole * p.length, rtol=1e-6)
    cols = [p.masscart / base.masscart, p.masspole / base.masspole, ls,
            p.force_mag / base.force_mag, p.gravity / base.gravity]  # the critic's view
    np.testing.assert_allclose(xi, np.stack(np.log(cols), -1), atol=1e-6)
    np.testing.assert_allclose(eff, np.log(p.force_mag / p.total_mass), rtol=1e-6)
    pg = np.log(pp.max_torque / pbase.max_torque)
    assert abs(pg.mean() - 0.0589) < 0.01 and abs(pg.std() - 0.2001) < 0.01
    np.testing.assert_allclose(pxi[:, 2], pg, atol=1e-6)
    np.testing.assert_allclose(peff, -np.log(pp.m * pp.l**2), atol=1e-6)
    sign = np.sign(fp.force_mag)
    assert abs((sign < 0).mean() - 0.5) < 0.03 and (sign < 0).mean() < 1
    fg = np.log(np.abs(fp.force_mag) / base.force_mag)
    assert abs(fg.mean() - 0.0589) < 0.01 and abs(fg.std() - 0.2001) < 0.01
    np.testing.assert_array_equal(fxi[:, 5], sign)
    np.testing.assert_allclose(feff, np.log(np.abs(fp.force_mag) / fp.total_mass), rtol=1e-6)


def test_lstm_state_is_zeroed_at_an_episode_start():
    """With reset = True the policy's output is that of a zero carry, whatever the carry
    holds; without it, it differs (a kept memory)."""
    net = dm.network(TINY)
    obs, a, xi = jnp.ones((1, 2, 4)), jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 5))
    zero = dm.zero_carry(TINY, 2)
    full = jax.tree.map(lambda z: z + 2.0, zero)

    def outputs():
        params = net.init(jax.random.PRNGKey(0), zero, obs, a, jnp.ones((1, 2), bool), xi)
        return [net.apply(params, carry, obs, a, jnp.full((1, 2), reset), xi)[1:3]
                for carry, reset in ((zero, False), (full, True), (full, False))]

    fresh, reset, kept = compiled(outputs)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), reset, fresh)
    assert np.abs(kept[0] - fresh[0]).max() > 1e-4 and np.abs(kept[1] - fresh[1]).max() > 1e-4


def test_ff_policy_has_no_memory_and_the_critic_reads_xi():
    """--policy ff builds both towers without an LSTM, and its outputs ignore the carry and
    the resets; the asymmetric critic's V changes with xi for the same history while the
    policy does not. (network() ignoring cfg.policy, or the critic without xi: fails.)"""
    ff = dataclasses.replace(TINY, policy="ff")
    obs = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 4))
    a, xi = jnp.zeros((3, 2, 2)), jnp.zeros((3, 2, 5))
    zero = dm.zero_carry(TINY, 2)
    full = jax.tree.map(lambda z: z + 2.0, zero)

    def outputs():  # (carry, reset, xi): A fresh, B a full carry kept, C another xi
        res = []
        for c in (ff, TINY):
            net = dm.network(c)
            params = net.init(jax.random.PRNGKey(0), zero, obs, a, jnp.ones((3, 2), bool), xi)
            res.append((params, [net.apply(params, carry, obs, a, jnp.full((3, 2), reset), x)
                                 for carry, reset, x in ((zero, True, xi), (full, False, xi),
                                                         (zero, True, xi + 0.5))]))
        return res

    (ff_params, (fa, fb, fc)), (lstm_params, (la, lb, lc)) = compiled(outputs)
    names = lambda p: " ".join(jax.tree_util.keystr(k) for k, _ in
                               jax.tree_util.tree_leaves_with_path(p))
    assert "LSTM" not in names(ff_params) and "LSTM" in names(lstm_params)
    for o in (1, 2):  # FF: the carry and the resets are ignored (policy and value)
        np.testing.assert_allclose(fa[o], fb[o], atol=1e-6)
    assert np.abs(la[1] - lb[1]).max() > 1e-4  # the LSTM's carry is read
    for x, y in ((fa, fc), (la, lc)):  # same history, other xi: V moves, the policy does not
        np.testing.assert_allclose(x[1], y[1], atol=1e-6)
        assert np.abs(x[2] - y[2]).max() > 1e-3


def test_update_loss_at_lr_zero():
    """One `update` (lr=0, 1 epoch, 1 minibatch, 4 envs x 32 steps) from a state with a
    random carried h, no episode start and params + N(0, 0.3^2) (a decisive policy): the
    loss's replay recomputes the rollout's log-probs (approx_kl < 1e-6, clipfrac 0), and its
    value loss is 0.5 mean(A^2) with A a by-hand GAE on the same rollout (episode ends cut,
    bootstrapped from V at the carried h). Mutations tried: replay from the end-of-rollout
    carry (kl 3.4e-3: fails), GAE without dones (value loss off by 146%: fails), last value
    from the rollout's start carry (value loss off by 1.4%: fails)."""
    cfg = dataclasses.replace(TINY, lr=0.0, num_epochs=1, num_minibatches=1, num_steps=32)
    env, net = dm.make_env(cfg), dm.network(cfg)

    def go(key):
        s = dm.init(key, cfg)
        h = jax.tree.map(lambda z: jax.random.normal(jax.random.PRNGKey(5), z.shape), s.h)
        leaves, tree = jax.tree.flatten(s.params)  # a decisive policy: logp depends on h
        ks = jax.random.split(jax.random.PRNGKey(9), len(leaves))
        noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, ks, strict=True)]
        s = s.replace(params=jax.tree.unflatten(tree, noisy), h=h,
                      start=jnp.zeros_like(s.start))
        _, k_roll, _ = jax.random.split(s.key, 3)
        carry = (s.env_state, s.obs, s.prev_action, s.start, s.h)
        (es, obs, pa, start, hl), traj = dm.rollout(s.params, cfg, net, env, carry, k_roll, 32)
        pa = jnp.where(start[:, None], 0.0, pa)
        last = net.apply(s.params, hl, obs[None], pa[None], start[None],
                         dm.xi_features(cfg, es.params)[None])[2][0]
        return dm.update(s, cfg)[1], traj, last

    m, traj, last = compiled(go, jax.random.PRNGKey(0))
    assert abs(m["losses/approx_kl"]) < 1e-6 and m["losses/clipfrac"] == 0, m
    r, v, d = (np.asarray(traj[k], np.float64) for k in ("reward", "value", "done"))
    assert d.sum() >= 2, "no episode ended: the test needs boundaries"
    adv, nxt, a = np.zeros_like(r), np.asarray(last, np.float64), np.zeros(r.shape[1])
    for t in reversed(range(32)):
        delta = r[t] + cfg.gamma * (1 - d[t]) * nxt - v[t]
        a = delta + cfg.gamma * cfg.gae_lambda * (1 - d[t]) * a
        adv[t], nxt = a, v[t]
    np.testing.assert_allclose(m["losses/value"], 0.5 * (adv**2).mean(), rtol=1e-3)


def test_docstring_claims():
    """The conclusion about the paper's FF-vs-LSTM gap: it is a simulation result too."""
    assert "real-robot result" not in dm.__doc__ and "Fig. 9" in dm.__doc__


@pytest.fixture(scope="module")
def two_rollouts():
    """The file's rollout (as update runs it) from init (params perturbed by N(0, 0.3^2) so
    that the policy is far from uniform): 12 steps, then 40 more from the
    carried state (CartPole episodes of a random policy end in between), and `replay` of
    the second over its whole sequence from the stored carry."""
    env, net = dm.make_env(TINY), dm.network(TINY)

    def go(key):
        s = dm.init(key, TINY)
        noise = lambda x, k: x + 0.3 * jax.random.normal(k, x.shape)  # a decisive policy
        leaves, tree = jax.tree.flatten(s.params)
        keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
        s = s.replace(params=jax.tree.unflatten(tree, list(map(noise, leaves, keys))))
        carry = (s.env_state, s.obs, s.prev_action, s.start, s.h)
        carry, _ = dm.rollout(s.params, TINY, net, env, carry, jax.random.PRNGKey(1), 12)
        h0 = carry[-1]
        _, traj = dm.rollout(s.params, TINY, net, env, carry, jax.random.PRNGKey(2), 40)
        seq = {k: traj[k] for k in ("obs", "prev_a", "reset", "xi", "action")}
        replayed = dm.replay(s.params, net, h0, seq, True)
        no_reset = dm.replay(s.params, net, h0, {**seq, "reset": jnp.zeros_like(seq["reset"])},
                             True)
        zero_h0 = dm.replay(s.params, net, dm.zero_carry(TINY, TINY.num_envs), seq, True)
        return traj, h0, replayed, no_reset, zero_h0

    return compiled(go, jax.random.PRNGKey(0))


def test_hidden_state_resets_at_episode_boundaries(two_rollouts):
    """In the rollout, the reset flag of step t + 1 is the done of step t (an auto-reset
    starts a new episode with new xi), a_{t-1} is zeroed there, and xi changes only there."""
    traj, h0, *_ = two_rollouts
    done, reset = np.asarray(traj["done"]), np.asarray(traj["reset"])
    assert done.sum() >= 2, "no episode ended: the test needs boundaries"
    np.testing.assert_array_equal(reset[1:], done[:-1])
    assert (np.asarray(traj["prev_a"])[reset] == 0).all()
    changed = np.abs(np.diff(np.asarray(traj["xi"]), axis=0)).max(-1) > 0
    np.testing.assert_array_equal(changed, done[:-1])
    assert np.abs(np.asarray(h0[0][0])).max() > 0  # the carried memory is not blank


def test_recomputed_log_probs_equal_the_rollouts(two_rollouts):
    """Recurrent PPO's first epoch: `replay` (what loss_fn runs) from the stored carry with
    the rollout's resets recomputes the rollout's log pi(a_t | history) and V to 2e-4
    (ratio 1). Broken variants in the same test: no resets, or a zero initial carry, move
    them by > 1e-3 (without the resets in `replay`, tried once: fails with 100% of the
    log-probs off)."""
    traj, _, (logp, _, value), no_reset, zero_h0 = two_rollouts
    np.testing.assert_allclose(logp, traj["logp"], atol=2e-4)
    np.testing.assert_allclose(value, traj["value"], atol=2e-4)
    for broken in (no_reset, zero_h0):
        assert np.abs(np.asarray(broken[0]) - traj["logp"]).max() > 1e-3


def test_ridge_probe_by_hand():
    """y = 3 x_0 - x_1 + 2 (200 rows): held-out R^2 ~ 1; y independent of x: R^2 <= ~0;
    rows of weight 0 (dead episodes) with wild targets are ignored."""
    def r2s(key):  # the five probes as one compiled program
        k0, k1, k2 = jax.random.split(key, 3)
        x = jax.random.normal(k0, (200, 2))
        y = 3 * x[:, 0] - x[:, 1] + 2
        w, noise = jnp.ones(200), jax.random.normal(k1, (200,))
        x30 = jax.random.normal(k2, (40, 30))  # fit on 20, scored on 20
        wild = y.at[::7].set(1e3)
        return (dm.probe_r2(x, y, w, 1e-6), dm.probe_r2(x, noise, w, 1e-6),
                dm.probe_r2(x30, noise[:40], w[:40], 1e-6),
                dm.probe_r2(x, wild, w.at[::7].set(0.0), 1e-6), dm.probe_r2(x, wild, w, 1e-6))

    exact, noise, noise30, dead_ignored, dead_counted = compiled(r2s, jax.random.PRNGKey(0))
    assert exact > 0.9999 and noise < 0.05
    assert noise30 < 0.05  # in-sample it would be ~1
    assert dead_ignored > 0.9999 and dead_counted < 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, its 2 updates in one chunk (recorded for a rerun)."""
    return main_recording_chunks(dm.main, cli_args(TINY, dm.Config()) + [
        "--num-seeds", str(SEEDS), "--log-every", "2", "--no-progress", "--fast-compile",
        "--run-dir", str(tmp_path_factory.mktemp("dr_meta"))])


def test_lstm_memory_identifies_the_dynamics(tiny_run):
    """Behaviour ([1] Sec. 6.4's probe; [2] "memory enables meta-learning"): under the wide
    gain range logU[0.25, 4], ridge probes on 256 + 256 fresh episodes predict the log
    effective gain (force_mag / total_mass) from the CLI run's LSTM policy features h_t at
    steps 4 and 8 of the episode. Broken variant in the same test: the same network with
    its carry zeroed every step (no memory: h_t sees o_t and a_{t-1} only). Measured (loaded
    2-core CPU): the CLI's evaluate(), seeds 0 and 1: t=4 0.73, 0.70, t=8 0.66, 0.58; the
    single observation o_t: -0.02 to 0.01. Seed 0's network without memory (probe
    key 3): t=4 0.29, t=8 0.33 (with memory, same episodes: 0.68, 0.65). With evaluate's
    carry zeroed every step (tried once) the CLI's probes score
    0.34, 0.42 (t=4) and 0.30, 0.34 (t=8): fails. The network is barely trained (32 env
    steps): this shows a random LSTM carrying o_t and a_{t-1} forward, not a learned
    identification (it would pass at lr=0); the quick preset's numbers are in the module."""
    first, _ = tiny_run
    seed0 = jax.tree.map(lambda x: x[0], first.state.params)
    key = jax.random.PRNGKey(3)
    r2_none, _, _ = compiled(lambda p: dm.probes(p, TINY, key, memory=False), seed0)
    print("no memory", r2_none, "cli", first.final["probe/h_004"], first.final["probe/h_008"])
    for i, t in enumerate(TINY.probe_steps[1:], 1):
        mem = first.final[f"probe/h_{t:03d}"]
        assert (mem > 0.5).all() and mem[0] > r2_none[i] + 0.15, (mem, r2_none)
        assert (first.final[f"probe/obs_{t:03d}"] < 0.1).all(), first.final
    assert (np.asarray(r2_none[1:]) < 0.5).all()


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; its compiled chunk rerun on the same
    initial states gives bit-identical params and metrics; the seeds differ; every env of
    every seed drew its own physics in the vmapped reset; evaluate() reports every probe;
    --help documents every field."""
    first, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    again, metrics = chunk(jax.tree.map(jnp.copy, states))  # the chunk donates its input
    metrics = run.mark_undefined(jax.device_get(metrics), run.NAN_UNLESS)
    jax.tree.map(np.testing.assert_array_equal, first.state.params, again.params)
    assert set(metrics) == set(first.history)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k], v, err_msg=k)
    assert not np.array_equal(first.history["losses/value"][0], first.history["losses/value"][1])
    gains = np.asarray(first.state.env_state.params.force_mag)  # (seeds, envs)
    assert len(np.unique(gains)) == SEEDS * TINY.num_envs
    for k in ["eval/return"] + [f"probe/{a}_{t:03d}" for a in ("h", "obs")
                                for t in TINY.probe_steps]:
        assert first.final[k].shape == (SEEDS,) and np.isfinite(first.final[k]).all(), k
    assert (first.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        dm.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(dm.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--gain-range", "2", "1"], r"gain_range=\(2.0, 1.0\)"),
                       (["--gravity-std", "-1"], "gravity_std=-1"),
                       (["--policy", "gru"], "policy='gru'"),
                       (["--eval-episodes", "5"], "eval_episodes=5"),
                       (["--num-minibatches", "3"], "not divisible by num_minibatches=3")):
        with pytest.raises(ValueError, match=msg):
            dm.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(dm) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under the paper preset (Pendulum-v1, Dense 1024 ->
    LSTM 512, 1024 envs x 10 steps): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(dm)
    assert cfg.env_id == "Pendulum-v1" and cfg.policy == "lstm"
    assert state.h[0][0].shape == (1024, 512) and state.obs.shape == (1024, 3)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
