"""Tests of common.rl: GAE against a Python loop, running moments against numpy, PPO learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import envs, run
from common.rl import Bonus, PPOConfig, RunningMeanStd, gae, make_ppo, ppo_config, ppo_loss


def _gae_loop(r, v, d, last_v, gamma, lam):
    T = len(r)
    adv = np.zeros_like(r)
    next_adv = np.zeros_like(last_v)
    for t in reversed(range(T)):
        next_v = last_v if t == T - 1 else v[t + 1]
        nd = 1.0 - d[t]
        delta = r[t] + gamma * nd * next_v - v[t]
        next_adv = delta + gamma * lam * nd * next_adv
        adv[t] = next_adv
    return adv


def test_gae_matches_python_loop():
    rng = np.random.default_rng(0)
    T, N = 17, 5
    r, v = rng.normal(size=(T, N)), rng.normal(size=(T, N))
    d = rng.random((T, N)) < 0.2
    last_v = rng.normal(size=N)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(d), jnp.asarray(last_v), 0.99, 0.95)
    expect = _gae_loop(r, v, d.astype(float), last_v, 0.99, 0.95)
    np.testing.assert_allclose(adv, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, expect + v, rtol=1e-5, atol=1e-5)
    # lambda = 1, gamma = 1, no dones: the advantage is the undiscounted return-to-go minus V.
    adv1, _ = gae(jnp.asarray(r), jnp.asarray(v), jnp.zeros((T, N)), jnp.asarray(last_v), 1.0, 1.0)
    togo = np.cumsum(r[::-1], 0)[::-1] + last_v
    np.testing.assert_allclose(adv1, togo - v, rtol=1e-4, atol=1e-4)


def test_gae_nonepisodic_ignores_dones():
    """A non-episodic stream (dones = 0) bootstraps across an episode boundary."""
    r = jnp.array([[0.0], [0.0], [1.0]])
    v = jnp.zeros((3, 1))
    d_epi = jnp.array([[False], [True], [False]])
    a_epi, _ = gae(r, v, d_epi, jnp.zeros(1), 0.9, 1.0)
    a_non, _ = gae(r, v, jnp.zeros_like(d_epi), jnp.zeros(1), 0.9, 1.0)
    assert float(a_epi[0, 0]) == 0.0  # the reward after the boundary is cut off
    np.testing.assert_allclose(float(a_non[0, 0]), 0.81, rtol=1e-6)


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(1)
    batches = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (7, 50, 3)]
    rms = RunningMeanStd.create((4,))
    for b in batches:
        rms = rms.update(jnp.asarray(b))
    allx = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, allx.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-3)
    z = rms.normalize(jnp.asarray(allx), clip=1.0)
    assert float(jnp.abs(z).max()) <= 1.0


def test_ppo_config_copies_the_shared_fields_and_overrides_win():
    """Catches a helper that ignores the algorithm's values, copies fields PPO lacks, or lets
    the algorithm's value beat the file's explicit override."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Algo:
        lr: float = 1e-3
        gamma: float = 0.9
        anneal_lr: bool = True
        eta: float = 0.5  # not a PPO field

    pcfg = ppo_config(Algo(), anneal_lr=False)
    assert (pcfg.lr, pcfg.gamma, pcfg.anneal_lr) == (1e-3, 0.9, False)
    assert pcfg.num_envs == PPOConfig().num_envs and not hasattr(pcfg, "eta")


def test_ppo_loss_clips_ratio():
    """Where the ratio leaves [1-eps, 1+eps] in the advantage's direction the gradient is 0."""
    old = jnp.zeros(2)
    adv = jnp.array([1.0, -1.0])

    def pg(new_logp):
        loss, _ = ppo_loss(new_logp, old, adv, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                           jnp.zeros(2), 0.2, 0.0, 0.0)
        return loss

    g_in = jax.grad(pg)(jnp.array([0.1, -0.1]))  # ratios inside the clip range
    g_out = jax.grad(pg)(jnp.log(jnp.array([1.5, 0.5])))  # beyond it, same sign as adv
    assert jnp.all(g_in != 0) and jnp.all(g_out == 0)


def test_ppo_value_loss_clips_around_old_values_by_default_and_sums_heads():
    """The value loss by hand, eps = 0.2, old value 0, return 1: a new value 0.5 has error
    0.25 unclipped, but its clipped twin 0.2 has 0.64, and the clipped loss takes the max:
    0.5 * 0.64 = 0.32 (unclipped 0.125). PPOConfig clips by default, as PureJaxRL and the
    PPO reference code do (its default False scored 393 against 483 on 16 CartPole keys).
    Tuples of heads (RND's two critics) sum the heads' losses: 0.32 + 0.5 * 2^2 = 2.32."""
    z = jnp.zeros(1)

    def v_loss(value, old, ret, clip_vloss):
        return ppo_loss(z, z, z, z, value, old, ret, 0.2, 1.0, 0.0, clip_vloss)[1][
            "losses/value"]

    one, half = jnp.ones(1), jnp.full(1, 0.5)
    np.testing.assert_allclose(v_loss(half, z, one, True), 0.32, rtol=1e-6)
    np.testing.assert_allclose(v_loss(half, z, one, False), 0.125, rtol=1e-6)
    np.testing.assert_allclose(v_loss((half, z), (z, z), (one, 2 * one), True), 2.32,
                               rtol=1e-6)
    assert PPOConfig().clip_vloss


def test_ppo_improves_on_cartpole_quickly():
    """Short behaviour test (default tier, one compile): the shared PPO learner on gymnax
    CartPole-v1, 2 seeds x 25 updates of 4 x 64 steps. The baseline is the same run's first
    3 updates (the untrained policy, ~22 per episode); the last 5 updates must average at
    least twice that. With lr = 0 (the broken variant of the slow gate below) the two stay
    equal. Compiled at XLA's lowest optimisation level (the runner's init options: 25
    updates run in no time, the compile is several times faster). Measured on a 2-core CPU:
    first 29, last 191 (before the value loss was clipped by default: first 28, last 180)."""
    cfg = PPOConfig(num_envs=4, num_steps=64, total_timesteps=6_400, lr=2.5e-3)
    init, upd = make_ppo(envs.make("CartPole-v1", cfg.num_envs), cfg)
    train = run.make_train(lambda k, c: init(k), lambda s, c: upd(s), cfg)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    _, m = jax.jit(jax.vmap(train)).lower(keys).compile(run.INIT_COMPILER_OPTIONS)(keys)
    ret = run.mark_undefined(jax.device_get(m), run.NAN_UNLESS)["charts/episodic_return"]
    first, last = float(np.nanmean(ret[:, :3])), float(np.nanmean(ret[:, -5:]))
    print("first", first, "last", last)
    assert first < 35, first
    assert last > 2 * first, (first, last)


@pytest.mark.slow
def test_ppo_learns_cartpole():
    """Slow gate. The shared PPO learner on gymnax CartPole-v1, 60k steps, 2 seeds: the last
    episodes average > 100 (observed ~150-400), while the same learner with lr = 0 (a random
    policy, the broken variant) stays near 22."""
    cfg = PPOConfig(num_envs=4, num_steps=128, total_timesteps=61_440, lr=2.5e-3)
    env = envs.make("CartPole-v1", cfg.num_envs)

    def score(cfg):
        init, upd = make_ppo(env, cfg)
        train = run.make_train(lambda k, c: init(k), lambda s, c: upd(s), cfg)
        _, m = jax.jit(jax.vmap(train))(jax.random.split(jax.random.PRNGKey(0), 2))
        m = run.mark_undefined(jax.device_get(m), run.NAN_UNLESS)
        return float(np.nanmean(m["charts/episodic_return"][:, -10:]))

    learned, frozen = score(cfg), score(PPOConfig(**{**cfg.__dict__, "lr": 0.0}))
    assert frozen < 40, frozen
    assert learned > 100, (learned, frozen)


def test_ppo_bonus_hook_combines_rewards_and_trains_the_bonus():
    """`make_ppo(..., bonus=Bonus(init, reward, loss))` on CartPole (reward 1 per step), 3
    updates, 3 runs on one key, one compile at XLA's lowest optimisation level (the coefficients and
    the bonus's constant are traced):

    - PPO trains on r = ext_coef r^e + int_coef r^i: (ext 1, r^i = 0) and (ext 0, r^i = 1)
      give bit-identical policies (both see r = 1), (ext 1, r^i = 1) a different one;
    - the bonus's params train with the policy: loss (w - 3)^2 moves w from 0 towards 3;
    - the bonus sees the rollout (obs, action, next_obs, done [T, N]) and keeps statistics:
      here the count of steps it was shown, 3 x 32 x 4 = 384;
    - `charts/intrinsic_reward` is the mean r^i, and the bonus's metrics are logged."""
    cfg = PPOConfig(num_envs=4, num_steps=32, total_timesteps=384, lr=1e-2)
    env = envs.make("CartPole-v1", cfg.num_envs)

    def train(key, ext, value):
        def reward(w, seen, b):
            assert b["obs"].shape == b["next_obs"].shape == (32, 4, 4)
            assert b["action"].shape == b["done"].shape == (32, 4)
            return jnp.full(b["done"].shape, value), seen + b["done"].size

        def loss(w, seen, mb):
            return (w - 3.0) ** 2, {"losses/bonus": w}

        bonus = Bonus(lambda key, obs: (jnp.zeros(()), jnp.zeros(())), reward, loss)
        c = PPOConfig(**{**cfg.__dict__, "ext_coef": ext})
        init, upd = make_ppo(env, c, bonus=bonus)
        return run.make_train(lambda k, _: init(k), lambda s, _: upd(s), c)(key)

    args = (jnp.stack([jax.random.PRNGKey(0)] * 3), jnp.array([1.0, 0.0, 1.0]),
            jnp.array([0.0, 1.0, 1.0]))
    # 3 updates run in no time: compiled without LLVM's optimisations (the runner's init
    # options), which compiles several times faster
    state, m = jax.jit(jax.vmap(train)).lower(*args).compile(run.INIT_COMPILER_OPTIONS)(*args)
    pol = state.params["policy"]
    same = jax.tree.map(lambda x: x[0], pol), jax.tree.map(lambda x: x[1], pol)
    jax.tree.map(np.testing.assert_array_equal, *same)
    assert not np.array_equal(jax.tree.leaves(pol)[0][0], jax.tree.leaves(pol)[0][2])
    w = np.asarray(state.params["bonus"])
    assert (w > 0.01).all() and (w < 3).all(), w
    np.testing.assert_array_equal(state.bonus_stats, [384, 384, 384])
    np.testing.assert_array_equal(m["charts/intrinsic_reward"][:, -1], [0, 1, 1])
    assert m["losses/bonus"].shape == (3, 3)
