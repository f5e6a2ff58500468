"""RL primitives shared by many files: GAE, running moments, and a compact PPO learner.

The PPO learner (Schulman et al. 2017, arXiv 1707.06347) is the trainer of methods whose
science lies elsewhere (a curriculum's task sampler, a domain-randomization sampler, a
count bonus). An exploration bonus plugs in as a `Bonus`: its own params (trained in the
same gradient steps as the policy) and statistics, an intrinsic reward computed on each
rollout from (s, a, s'), and an auxiliary loss; PPO then optimises the single reward
r = ext_coef r^e + int_coef r^i. A method that changes PPO itself (two value heads, a
non-episodic intrinsic stream, a recurrent core) writes its own update in its file,
reusing `gae` and `ppo_loss` where they fit.

Conventions: rollouts are time-major `[T, N, ...]`; `dones[t]` is true when the episode
ended on step t (so `values[t + 1]` belongs to a new episode).
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common.nets import MLP, orthogonal

# --- ADVANTAGES ---


def gae(rewards, values, dones, last_value, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, Eq. 16).

    A_t = sum_l (gamma lambda)^l delta_{t+l},  delta_t = r_t + gamma (1 - d_t) V_{t+1} - V_t.
    Pass `dones = zeros` for a non-episodic stream. Returns (advantages, returns) [T, N].
    """
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    not_done = 1.0 - dones.astype(jnp.float32)
    deltas = rewards + gamma * not_done * next_values - values

    def step(adv_next, x):
        delta, nd = x
        adv = delta + gamma * gae_lambda * nd * adv_next
        return adv, adv

    _, advantages = jax.lax.scan(
        step, jnp.zeros_like(last_value), (deltas, not_done), reverse=True
    )
    return advantages, advantages + values


# --- RUNNING MOMENTS ---


@struct.dataclass
class RunningMeanStd:
    """Running mean and variance of a stream of batches (Chan et al. 1979 parallel update)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape=()):
        return cls(jnp.zeros(shape), jnp.ones(shape), jnp.asarray(1e-4))

    def update(self, batch) -> "RunningMeanStd":
        """Fold in `batch` whose leading axes (all but `mean.ndim` trailing ones) are samples."""
        batch = batch.reshape(-1, *self.mean.shape).astype(jnp.float32)
        b_mean, b_var, b_count = batch.mean(0), batch.var(0), batch.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        return RunningMeanStd(mean, m2 / total, total)

    def normalize(self, x, clip: float | None = None):
        y = (x - self.mean) / jnp.sqrt(self.var + 1e-8)
        return y if clip is None else jnp.clip(y, -clip, clip)


# --- PPO ---


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; the defaults are PureJaxRL's CartPole configuration.

    Checked against PureJaxRL's ppo.py and CleanRL's ppo.py: the value loss is clipped
    around the old values (side by side on 16 keys at 5e5 steps, unclipped scored 393 and
    clipped 483, PureJaxRL 480); advantages are normalised per minibatch; an episode end
    (terminated or truncated: `done`) cuts the bootstrap, as both do; the learning rate
    anneals linearly once per gradient step (PureJaxRL; CleanRL once per rollout); Adam
    eps 1e-5 and a global-norm clip of 0.5. Remaining difference: both anchors share one
    optimiser step for actor and critic, as here, but CleanRL also offers a separate
    `target_kl` early stop, which this learner has not."""

    num_envs: int = 4
    """parallel environments"""
    num_steps: int = 128
    """steps per environment per rollout"""
    total_timesteps: int = 500_000
    """environment steps of the whole run"""
    lr: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0"""
    num_epochs: int = 4
    """optimisation epochs over each rollout"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """policy ratio clip epsilon"""
    clip_vloss: bool = True
    """clip the value loss around the old values, as PureJaxRL and the PPO reference code do"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the actor and critic MLPs"""
    ext_coef: float = 1.0
    """with a Bonus only: weight of the extrinsic reward in r = ext_coef r^e + int_coef r^i"""
    int_coef: float = 1.0
    """with a Bonus only: weight of the intrinsic reward in r = ext_coef r^e + int_coef r^i"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    def validate(self):
        if self.num_updates < 1:
            raise ValueError(
                f"total_timesteps={self.total_timesteps} is smaller than one rollout "
                f"(num_envs * num_steps = {self.batch_size})"
            )
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.batch_size} is not divisible by "
                f"num_minibatches={self.num_minibatches}"
            )


def ppo_config(cfg: Any, **overrides) -> PPOConfig:
    """The PPOConfig of an algorithm whose Config repeats PPO's fields: every PPOConfig field
    the algorithm's Config also has (`num_envs`, `lr`, `gamma`, ...) is copied from `cfg`,
    the rest keep PPO's defaults, and `overrides` (the file's own choices, e.g.
    `anneal_lr=False`) win over both."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(PPOConfig) if hasattr(cfg, f.name)}
    return PPOConfig(**(shared | overrides))


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs; categorical or diagonal-Gaussian policy."""

    action_dim: int
    continuous: bool = False
    hidden: tuple[int, ...] = (64, 64)
    obs_ndim: int = 1

    @nn.compact
    def __call__(self, obs):
        x = obs.reshape(*obs.shape[: obs.ndim - self.obs_ndim], -1)
        h = MLP(self.hidden)(x)
        mean = nn.Dense(self.action_dim, kernel_init=orthogonal(0.01))(h)
        if self.continuous:
            log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
            pi = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
        else:
            pi = distrax.Categorical(logits=mean)
        v = nn.Dense(1, kernel_init=orthogonal(1.0))(MLP(self.hidden)(x))
        return pi, v[..., 0]


class TowersActorCritic(nn.Module):
    """Separate tanh MLPs for actor and critic (orthogonal init), each Dense in `dtype` with
    float32 outputs; categorical or Gaussian. (ActorCritic above keeps float32 throughout.)"""

    action_dim: int
    continuous: bool
    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs):
        def tower(n_out, scale):
            h = obs
            for f in self.hidden:
                h = nn.tanh(nn.Dense(f, kernel_init=orthogonal(2**0.5), dtype=self.dtype)(h))
            return nn.Dense(n_out, kernel_init=orthogonal(scale), dtype=self.dtype)(h)

        mean = tower(self.action_dim, 0.01).astype(jnp.float32)
        v = tower(1, 1.0).astype(jnp.float32)[..., 0]
        if self.continuous:
            log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
            return distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)), v
        return distrax.Categorical(logits=mean), v


def ppo_loss(new_logp, old_logp, adv, entropy, value, old_value, returns, clip_coef, vf_coef,
             ent_coef, clip_vloss=False):
    """Clipped surrogate (PPO paper Eq. 7) + value loss + entropy bonus (Eq. 9). Returns
    (loss, metrics).

    `value`, `old_value` and `returns` may be tuples with one entry per value head (RND's
    extrinsic and intrinsic critics): the value loss is then the sum of the heads' losses.
    """
    ratio = jnp.exp(new_logp - old_logp)
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_coef, 1 + clip_coef) * adv).mean()
    heads = (value, old_value, returns) if isinstance(value, tuple) else (
        (value,), (old_value,), (returns,))
    v_loss = 0.0
    for v, v_old, ret in zip(*heads, strict=True):
        err = (v - ret) ** 2
        if clip_vloss:
            v_clip = v_old + jnp.clip(v - v_old, -clip_coef, clip_coef)
            err = jnp.maximum(err, (v_clip - ret) ** 2)
        v_loss = v_loss + 0.5 * err.mean()
    ent = entropy.mean()
    loss = pg + vf_coef * v_loss - ent_coef * ent
    approx_kl = ((ratio - 1) - (new_logp - old_logp)).mean()
    clipfrac = (jnp.abs(ratio - 1) > clip_coef).mean()
    return loss, {"losses/policy": pg, "losses/value": v_loss, "losses/entropy": ent,
                  "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac}


def minibatch_epochs(key, params, opt_state, batch, loss_fn, optimizer, num_epochs,
                     num_minibatches, loss_takes_key=False):
    """Shuffle a flat batch (leading axis = samples) into minibatches for `num_epochs`
    epochs of gradient steps on `loss_fn(params, minibatch) -> (loss, metrics)`, or
    `loss_fn(params, minibatch, key)` with a fresh key per minibatch when `loss_takes_key`
    (the shuffles are then drawn from other keys than without it).
    Returns (params, opt_state, mean metrics)."""
    n = jax.tree.leaves(batch)[0].shape[0]

    def epoch(carry, k):
        if loss_takes_key:
            k, k_steps = jax.random.split(k)
        perm = jax.random.permutation(k, n)
        mbs = jax.tree.map(
            lambda x: x[perm].reshape(num_minibatches, -1, *x.shape[1:]), batch
        )  # (num_minibatches, n / num_minibatches, ...)
        xs = (mbs, jax.random.split(k_steps, num_minibatches)) if loss_takes_key else mbs

        def step(carry, x):
            params, opt_state = carry
            args = x if loss_takes_key else (x,)
            (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            m["losses/grad_norm"] = optax.tree.norm(grads)
            return (optax.apply_updates(params, updates), opt_state), m

        return jax.lax.scan(step, carry, xs)

    (params, opt_state), metrics = jax.lax.scan(
        epoch, (params, opt_state), jax.random.split(key, num_epochs)
    )
    return params, opt_state, jax.tree.map(jnp.mean, metrics)


def rollout(env, act, env_state, obs, key, num_steps, keep_next_obs=False):
    """`num_steps` steps of a batched env under `act(obs, key) -> (action, extras)`.

    Returns ((env_state, obs, key), traj): traj holds, time-major [T, N, ...], obs, action,
    reward, done, the episode statistics `ret` and `ended` of `VecEnv`'s info, next_obs
    when `keep_next_obs` (the auto-reset observation where done), and every entry of
    `extras` (log-probabilities, values, ...)."""

    def env_step(carry, _):
        env_state, obs, key = carry
        key, k_act, k_env = jax.random.split(key, 3)
        action, extras = act(obs, k_act)
        next_obs, env_state, reward, done, info = env.step(env_state, action, k_env)
        tr = dict(obs=obs, action=action, reward=reward, done=done,
                  ret=info["returned_episode_return"], ended=info["returned_episode"], **extras)
        if keep_next_obs:
            tr["next_obs"] = next_obs
        return (env_state, next_obs, key), tr

    return jax.lax.scan(env_step, (env_state, obs, key), None, num_steps)


def episode_metrics(traj) -> dict:
    """Mean return of the episodes that ended in a rollout and their count. The mean is 0
    when none ended; the runner logs NaN there (`run.NAN_UNLESS`)."""
    n_ended = traj["ended"].sum()
    ret = (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1)
    return {"charts/episodic_return": ret, "charts/episodes": n_ended}


@dataclass(frozen=True)
class Bonus:
    """An exploration bonus trained beside the policy: the hook of `make_ppo`.

    init(key, obs) -> (params, stats)
        params: trainable pytree, updated by PPO's optimizer in the same gradient steps as
        the policy; stats: non-trainable state (visit counts, reward normalisers), or None.
    reward(params, stats, batch) -> (r_int [T, N], stats)
        the intrinsic reward of one rollout; `batch` holds obs, action, next_obs, done
        [T, N, ...] (next_obs[t] is the auto-reset observation where done[t]). Called
        outside the gradient.
    loss(params, stats, mb) -> (loss, metrics)
        the bonus's own loss on a flat minibatch with the same keys [B, ...], added to the
        PPO loss of that minibatch; metrics are scalars (e.g. "losses/forward").
        With `needs_key`, loss(params, stats, mb, key) with a fresh key per minibatch
        (random subsets, dropout).
    """

    init: Callable
    reward: Callable
    loss: Callable
    needs_key: bool = False


@struct.dataclass
class PPOState:
    params: Any  # the network's params; with a Bonus {"policy": ..., "bonus": ...}
    opt_state: Any
    env_state: Any
    obs: jax.Array
    key: jax.Array
    update_idx: jax.Array
    bonus_stats: Any = None  # Bonus.init's stats (None without a Bonus)


def make_optimizer(cfg: PPOConfig):
    lr = cfg.lr
    if cfg.anneal_lr:
        per_update = cfg.num_epochs * cfg.num_minibatches
        lr = optax.linear_schedule(cfg.lr, 0.0, cfg.num_updates * per_update)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=1e-5))


def make_ppo(env, cfg: PPOConfig, network: nn.Module | None = None, bonus: Bonus | None = None):
    """The PPO learner on a `common.envs.VecEnv`-like env. Returns pure
    `(init(key) -> PPOState, update(state) -> (PPOState, metrics))`.

    `network(obs) -> (distribution, value)`; default `ActorCritic`. With a `bonus`, the
    rollout also keeps next_obs, PPO trains on r = ext_coef r^e + int_coef r^i with
    r^i = bonus.reward(...), bonus.loss joins each minibatch's loss, and the metrics gain
    `charts/intrinsic_reward` (mean r^i before int_coef) and the bonus's own. Without one,
    nothing of this runs and the results are those of plain PPO."""
    cfg.validate()
    continuous = env.num_actions is None
    if network is None:
        network = ActorCritic(
            env.num_actions if not continuous else env.action_shape[0],
            continuous, cfg.hidden, obs_ndim=len(env.observation_shape),
        )
    optimizer = make_optimizer(cfg)

    def init(key) -> PPOState:
        k_net, k_env, key = jax.random.split(key, 3)
        obs, env_state = env.reset(k_env)
        params = network.init(k_net, obs)
        stats = None
        if bonus is not None:
            k_bonus, key = jax.random.split(key)
            bonus_params, stats = bonus.init(k_bonus, obs)
            params = {"policy": params, "bonus": bonus_params}
        return PPOState(params, optimizer.init(params), env_state, obs, key,
                        jnp.zeros((), jnp.int32), stats)

    def policy(params):
        return params if bonus is None else params["policy"]

    def update(state: PPOState):
        # --- ROLLOUT ---
        def act(obs, key):
            pi, value = network.apply(policy(state.params), obs)
            action = pi.sample(seed=key)
            return action, dict(logp=pi.log_prob(action), value=value)

        (env_state, obs, key), traj = rollout(env, act, state.env_state, state.obs, state.key,
                                              cfg.num_steps, keep_next_obs=bonus is not None)
        reward, stats = traj["reward"], state.bonus_stats
        if bonus is not None:  # --- INTRINSIC REWARD ---
            seen = {k: traj[k] for k in ("obs", "action", "next_obs", "done")}
            r_int, stats = bonus.reward(state.params["bonus"], stats, seen)  # (T, N)
            r_int = jax.lax.stop_gradient(r_int)
            reward = cfg.ext_coef * reward + cfg.int_coef * r_int
        _, last_value = network.apply(policy(state.params), obs)
        adv, returns = gae(reward, traj["value"], traj["done"], last_value,
                           cfg.gamma, cfg.gae_lambda)

        # --- UPDATE ---
        batch = dict(obs=traj["obs"], action=traj["action"], logp=traj["logp"],
                     value=traj["value"], adv=adv, ret=returns)
        if bonus is not None:
            batch.update(next_obs=traj["next_obs"], done=traj["done"])
        batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # (T*N, ...)

        def loss_fn(params, mb, key=None):
            pi, value = network.apply(policy(params), mb["obs"])
            adv = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
            loss, m = ppo_loss(pi.log_prob(mb["action"]), mb["logp"], adv, pi.entropy(), value,
                               mb["value"], mb["ret"], cfg.clip_coef, cfg.vf_coef,
                               cfg.ent_coef, cfg.clip_vloss)
            if bonus is not None:
                args = (key,) if bonus.needs_key else ()
                aux, m_aux = bonus.loss(params["bonus"], stats, mb, *args)
                loss = loss + aux
                m = {**m, **m_aux}
            return loss, m

        key, k_epochs = jax.random.split(key)
        params, opt_state, metrics = minibatch_epochs(
            k_epochs, state.params, state.opt_state, batch, loss_fn, optimizer,
            cfg.num_epochs, cfg.num_minibatches,
            loss_takes_key=bonus is not None and bonus.needs_key,
        )
        metrics.update(episode_metrics(traj))
        if bonus is not None:
            metrics["charts/intrinsic_reward"] = r_int.mean()
        new = PPOState(params, opt_state, env_state, obs, key, state.update_idx + 1, stats)
        return new, metrics

    return init, update
