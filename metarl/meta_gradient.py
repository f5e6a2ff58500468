"""Meta-gradient RL: the discount gamma and the bootstrapping lambda learnt online by
differentiating through one update of the agent.

[1] Z. Xu, H. van Hasselt, D. Silver. "Meta-Gradient Reinforcement Learning." NeurIPS 2018,
    arXiv:1805.09801.
[2] L. Espeholt et al. "IMPALA: Scalable Distributed Deep-RL with Importance Weighted
    Actor-Learner Architectures." arXiv:1802.01561 (2018): the agent of [1]'s experiments.

The return is a function of meta-parameters eta = {gamma, lambda}, gamma = sigmoid(eta_g),
lambda = sigmoid(eta_l) ([1] Sec. 1.3, 4 [M]):

    G^(n)_eta(tau_t) = R_{t+1} + gamma R_{t+2} + ... + gamma^{n-1} R_{t+n} + gamma^n v(S_{t+n})
    G^lambda_eta(tau_t) = (1 - lambda) sum_n lambda^{n-1} G^(n)_eta(tau_t)
                        = R_{t+1} + gamma ((1 - lambda) v(S_{t+1}) + lambda G^lambda_eta(tau_{t+1}))
    theta' = theta + f(tau, theta, eta)                                        [1] Eq. (1)
    f = the optimiser's step on J(tau, theta, eta) = -(G_eta - v) log pi(A|S)
        + c_v 1/2 (G_eta - v_theta(S))^2 - c_H H(pi(.|S))       (actor-critic, [1] Eq. (12)-(13))
    Delta eta = -beta dJ'(tau', theta', eta_bar)/d theta' . d theta'/d eta       [1] Eq. (2)
    d theta'/d eta ~= d f(tau, theta, eta)/d eta   (the carried d theta/d eta dropped, mu = 0,
                                                    [1] Eq. (3)-(5); stop_gradient on theta)

tau' is the batch that follows tau in time (online cross-validation): the meta-objective J'
is the same loss with a fixed reference eta_bar = {gamma_bar, lambda_bar}. Because the
return, hence the value, changes with eta, policy and value are conditioned on it: an
embedding e_eta = W_eta (gamma, lambda) is concatenated to the torso's output; f conditions on
eta, J' on eta_bar ([1] Sec. 1.4 [M]).

One `update` is one batch: theta_k = theta_{k-1} + f(tau_{k-1}, theta_{k-1}, eta_k) as a
function of eta (jax.vjp; theta_{k-1} is stop_gradient'ed), the rollout tau_k with pi_theta_k,
dJ'(tau_k, theta_k, eta_bar)/d theta_k pulled back through the vjp to eta, and an Adam step on
eta. Every batch trains theta once and validates the update before it.

Environments: gymnax ids (MinAtar: `Breakout-MinAtar`, ...), and `RandomWalk-19`, the
19-state random walk (Sutton & Barto 2018, Example 7.1: +-1 at the ends, start in the
middle) as a prediction task: one action, so the policy terms vanish and f is TD(lambda) on
the value (with `--torso linear --embed-dim 0` a linear value on one-hot states).

Reproduce (CPU demo, MinAtar Breakout; the fixed-(gamma, lambda) baseline, then the
meta-gradient agent, plotted together; `--plot PNG` and `--compare RUN_DIR` are this file's
only extra flags):
    python metarl/meta_gradient.py --preset quick --num-seeds 2 --meta-params none \
        --run-dir runs/mg_fixed
    python metarl/meta_gradient.py --preset quick --num-seeds 2 --plot metarl/meta_gradient.png \
        --compare runs/mg_fixed
Paper agent settings (GPU; [1]'s IMPALA hyperparameters on MinAtar Breakout, 50M steps):
    python metarl/meta_gradient.py --preset paper
Ours (quick, 2-core CPU shared with other jobs, 158 s compile + 112 s, 2 seeds at once):
MinAtar Breakout, 3M steps (2343 batches of 64 x 20), training return over the last 10% of
the run 6.34 / 6.46 per seed, with gamma 0.99 -> 0.9942 / 0.9945 and lambda 0.95 -> 0.943 /
0.939; the fixed (0.99, 0.95) baseline (`--meta-params none`) 5.47 / 6.43: a difference
inside the seed spread (no claim at this scale). Trajectories in metarl/meta_gradient.png.
[1] Table 1 [M: recalled, not re-read]: Atari-57, 200M frames, median human-normalised
score: IMPALA (gamma 0.99) 211.9%, meta-gradient {gamma, lambda} 287.2% (or 287.7%; the
table has a row per reference gamma_bar, not re-read which).

Differences from the paper:
- Environments: MinAtar (gymnax) instead of Atari-57 at 200M frames (compute); the torso is
  MinAtar's (conv 16 3x3, dense 128) or an MLP, not IMPALA's deep ResNet with an LSTM.
- Synchronous on-policy batches instead of IMPALA's actors: V-trace with rho = c = 1 is the
  lambda-return above, so no importance weights are computed. Time-limit truncations are
  treated as terminations.
- tau' is the next training batch (its first `meta_batch` trajectories enter J'), not a
  separate sample; so each update costs one rollout.
- [M] (recalled or read in a third-party reimplementation, not in [1]): the 16-unit eta
  embedding, Adam with meta learning rate 1e-3, a meta batch of 8 trajectories, the
  reference eta_bar = {0.995, 1}. The initial (gamma, lambda) = (0.99, 0.95) are ours.
- J' is by default the full actor-critic loss at eta_bar, with the inner value and entropy
  coefficients (--meta-vf-coef 0.5, --meta-ent-coef 0.01). As recalled [M], [1] Sec. 1.3-1.4
  takes for control the policy-gradient term alone, (g_eta_bar(tau') - v_theta'(S'))
  log pi_theta'(A'|S'): `--meta-vf-coef 0 --meta-ent-coef 0` (not checked in the paper, so
  not the default; the quoted numbers are with the default).
- optax's RMSProp (eps inside the square root, mean-square initialised at 0); [2]'s TF
  RMSProp starts it at 1. Losses are sums over time and batch, as in [2].
- `quick` is ours: inner lr 5e-3 (with [2]'s 6e-4 and eps 0.1 the policy barely moves in
  the 2.3k batches of a CPU run), an MLP of 64 units, 64 trajectories per batch.
- Equation numbers of [1]: (1)-(5) are the update function, the chain rule and the dropped
  trace (as cited by third parties); the others, and the section numbers, are [M].
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import envs, run
from common.nets import orthogonal
from common.plot import curve, load, save_png
from common.rl import episode_metrics, rollout

# --- CONFIG ---

META_PARAMS = {
    "gamma_lambda": (1.0, 1.0),
    "gamma": (1.0, 0.0),
    "lambda": (0.0, 1.0),
    "none": (0.0, 0.0),
}
"""which of (gamma, lambda) the meta-gradient moves: a mask on eta's update"""


@dataclass(frozen=True)
class Config:
    """Meta-gradient actor-critic; defaults: [1]'s IMPALA settings [M] on MinAtar Breakout."""

    env_id: str = "Breakout-MinAtar"
    """gymnax id (e.g. Breakout-MinAtar, CartPole-v1) or RandomWalk-19 (prediction)"""
    total_timesteps: int = 50_000_000
    """environment steps of the run ([1]: 200M Atari frames = 50M agent steps)"""
    num_envs: int = 32
    """trajectories per batch ([2]'s batch size)"""
    num_steps: int = 20
    """unroll length of a trajectory"""
    meta_batch: int = 8
    """trajectories of the next batch tau' in the meta-objective J' (<= num_envs)"""
    torso: str = "cnn"
    """cnn (MinAtar: conv 16 3x3, dense), mlp (two dense layers) or linear (no hidden layer)"""
    hidden: int = 128
    """units of the dense layer(s) of the torso"""
    embed_dim: int = 16
    """size of the eta embedding e_eta = W (gamma, lambda) fed to the heads (0: unconditioned)"""
    optimizer: str = "rmsprop"
    """inner optimiser of f: rmsprop ([2]) or sgd"""
    lr: float = 6e-4
    """inner learning rate alpha (annealed linearly to 0 with --anneal-lr)"""
    anneal_lr: bool = True
    """anneal the inner learning rate linearly to 0 over the run ([2])"""
    rms_decay: float = 0.99
    """RMSProp decay of the mean square"""
    rms_eps: float = 0.1
    """RMSProp epsilon ([2]: 0.1)"""
    max_grad_norm: float = 40.0
    """global gradient-norm clip of the inner update"""
    vf_coef: float = 0.5
    """value (baseline) loss coefficient c_v"""
    ent_coef: float = 0.01
    """entropy bonus coefficient c_H"""
    meta_lr: float = 1e-3
    """meta learning rate beta (Adam on eta)"""
    meta_vf_coef: float = 0.5
    """value-loss coefficient of J' (0: J' is the policy-gradient term alone, [1]'s J' [M])"""
    meta_ent_coef: float = 0.01
    """entropy coefficient of J' (0 with --meta-vf-coef 0: [1]'s J' [M])"""
    meta_params: str = "gamma_lambda"
    """meta-parameters learnt: gamma_lambda, gamma, lambda or none (fixed: the baseline)"""
    gamma_init: float = 0.99
    """initial discount gamma = sigmoid(eta_g)"""
    lambda_init: float = 0.95
    """initial bootstrapping lambda = sigmoid(eta_l)"""
    gamma_ref: float = 0.995
    """reference discount gamma_bar of the meta-objective J'"""
    lambda_ref: float = 1.0
    """reference lambda_bar of the meta-objective J'"""
    dtype: str = "float32"
    """compute dtype of the network: float32 or bfloat16 (params stay float32)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        choices = dict(
            torso=("cnn", "mlp", "linear"),
            optimizer=("rmsprop", "sgd"),
            meta_params=tuple(META_PARAMS),
            dtype=("float32", "bfloat16"),
        )
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {ok}")
        for name in ("gamma_init", "lambda_init"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be in (0, 1) (a sigmoid's "
                    f"value), got {getattr(self, name)}"
                )
        if not 0.0 <= self.lambda_ref <= 1.0:
            raise ValueError(f"--lambda-ref must be in [0, 1], got {self.lambda_ref}")
        if not 0.0 <= self.rms_decay < 1.0:
            raise ValueError(f"--rms-decay must be in [0, 1), got {self.rms_decay}")
        if self.embed_dim < 0 or self.hidden < 1:
            raise ValueError(
                f"--embed-dim must be >= 0 and --hidden >= 1, got {self.embed_dim}, {self.hidden}"
            )
        if self.meta_batch > self.num_envs:
            raise ValueError(f"meta_batch={self.meta_batch} exceeds num_envs={self.num_envs}")
        if self.env_id == "RandomWalk-19" and self.torso == "cnn":
            raise ValueError(
                "torso='cnn' needs image observations; RandomWalk-19 has one-hot "
                "states (use --torso linear or mlp)"
            )
        if self.env_id != "RandomWalk-19":
            envs.check_id(self.env_id)
        if self.num_updates < 1:
            raise ValueError(
                f"total_timesteps={self.total_timesteps} is less than one batch "
                f"(num_envs * num_steps = {self.batch_size})"
            )


PRESETS = {
    # CPU demo: MinAtar Breakout, an MLP torso, 64 x 20 steps per batch, 3M steps.
    "quick": dict(
        torso="mlp", hidden=64, num_envs=64, meta_batch=16, lr=5e-3, total_timesteps=3_000_000
    ),
    "paper": dict(),
}


# --- ENVIRONMENTS ---


@struct.dataclass
class WalkState:
    s: jax.Array  # int32 position: 1..n inside, 0 and n + 1 the terminal ends
    t: jax.Array  # int32 steps taken


class RandomWalk(envs.Env):
    """n-state random walk (Sutton & Barto 2018, Example 7.1): start in the middle, step left
    or right with probability 1/2, reward -1 off the left end and +1 off the right one.
    One action (a Markov reward process); the observation is one-hot of the state."""

    num_actions = 1

    def __init__(self, n: int = 19, max_steps: int = 10_000):
        self.n, self.max_steps = n, max_steps
        self.observation_shape = (n,)

    def reset(self, key, params):
        s = jnp.int32((self.n + 1) // 2)
        return jax.nn.one_hot(s - 1, self.n), WalkState(s, jnp.int32(0))

    def step(self, key, state, action, params):
        s = state.s + jnp.where(jax.random.bernoulli(key), 1, -1)
        reward = jnp.where(s == 0, -1.0, jnp.where(s == self.n + 1, 1.0, 0.0))
        terminated = (s == 0) | (s == self.n + 1)
        truncated = (state.t + 1 >= self.max_steps) & ~terminated
        obs = jax.nn.one_hot(jnp.clip(s, 1, self.n) - 1, self.n)
        return obs, WalkState(s, state.t + 1), reward, terminated, truncated

    def true_values(self, gamma: float) -> np.ndarray:
        """v^gamma of the inner states: (I - gamma P) v = E[R | s] (host numpy)."""
        n = self.n
        p = 0.5 * (np.eye(n, k=1) + np.eye(n, k=-1))
        r = np.zeros(n)
        r[0], r[-1] = -0.5, 0.5
        return np.linalg.solve(np.eye(n) - gamma * p, r)


def make_env(cfg: Config, num_envs: int | None = None):
    n = num_envs or cfg.num_envs
    if cfg.env_id == "RandomWalk-19":
        return envs.VecEnv(RandomWalk(19), n)
    return envs.make(cfg.env_id, n)


# --- NETWORKS ---


class MetaActorCritic(nn.Module):
    """torso(obs) ++ e_eta -> policy logits and value; e_eta = W_eta (gamma, lambda) + b
    ([1] Sec. 1.4 [M]). obs [..., *obs_shape], eta_values shape (2,) -> logits [..., A], v [...]."""

    num_actions: int
    obs_dims: int
    torso: str
    hidden: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs, eta_values):
        dense = lambda f, s: nn.Dense(f, kernel_init=orthogonal(s), dtype=self.dtype)
        x = obs.astype(self.dtype)
        if self.torso == "cnn":  # MinAtar's network: conv 16 3x3 (VALID), dense
            x = nn.relu(
                nn.Conv(16, (3, 3), padding="VALID", dtype=self.dtype, kernel_init=orthogonal())(x)
            )
            x = x.reshape(*x.shape[:-3], -1)  # (..., 8 * 8 * 16)
            x = nn.relu(dense(self.hidden, np.sqrt(2))(x))
        else:
            x = x.reshape(*x.shape[: x.ndim - self.obs_dims], -1)  # (..., prod(obs_shape))
            if self.torso == "mlp":
                for _ in range(2):
                    x = nn.relu(dense(self.hidden, np.sqrt(2))(x))
        if self.embed_dim:
            e = dense(self.embed_dim, 1.0)(eta_values.astype(self.dtype))  # e_eta
            x = jnp.concatenate([x, jnp.broadcast_to(e, x.shape[:-1] + e.shape)], -1)
        logits = dense(self.num_actions, 0.01)(x)
        v = dense(1, 1.0)(x)[..., 0]
        return logits.astype(jnp.float32), v.astype(jnp.float32)


def network(cfg: Config, env) -> MetaActorCritic:
    return MetaActorCritic(
        env.num_actions,
        len(env.observation_shape),
        cfg.torso,
        cfg.hidden,
        cfg.embed_dim,
        jnp.dtype(cfg.dtype),
    )


def eta_values(eta):
    """(gamma, lambda) = sigmoid(eta): the meta-parameters live in (0, 1) ([1] Sec. 4 [M])."""
    return jax.nn.sigmoid(eta)


# --- LOSS ---


def lambda_returns(rewards, discounts, values, bootstrap, lam):
    """[1] Eq. (6)-(7) as a backward recursion over [T, N]:
    G_t = R_{t+1} + gamma_t ((1 - lambda) v(S_{t+1}) + lambda G_{t+1}), G_T = v(S_T);
    discounts gamma_t = gamma (1 - done_t), values v(S_t) [T, N], bootstrap v(S_T) [N]."""
    next_values = jnp.concatenate([values[1:], bootstrap[None]], 0)

    def step(g, x):
        r, d, v_next = x
        g = r + d * ((1 - lam) * v_next + lam * g)
        return g, g

    _, g = jax.lax.scan(step, bootstrap, (rewards, discounts, next_values), reverse=True)
    return g


def actor_critic_loss(params, net, traj, last_obs, gamma, lam, cond, vf_coef, ent_coef):
    """J(tau, theta, eta) ([1] Eq. (12)-(13), [2] on-policy): policy gradient with advantage
    G_eta - v, value regression to G_eta, entropy bonus. The targets are semi-gradients in
    theta (params under stop_gradient) but stay differentiable in eta: through gamma, lambda
    and the conditioning `cond` (the (gamma, lambda) fed to the network).
    The network runs 3 times on tau (the last on S_T only): once differentiable in theta,
    twice on theta under stop_gradient for the targets, whose values equal the first run's
    but which must keep their derivative in `cond` (the meta-gradient's path through the
    conditioning), so v cannot simply be reused under a stop_gradient."""
    logits, v = net.apply(params, traj["obs"], cond)  # (T, N, A), (T, N)
    frozen = jax.lax.stop_gradient(params)
    _, v_t = net.apply(frozen, traj["obs"], cond)
    _, v_last = net.apply(frozen, last_obs, cond)  # (N,)
    g = lambda_returns(traj["reward"], gamma * (1.0 - traj["done"]), v_t, v_last, lam)
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, traj["action"][..., None], -1)[..., 0]
    # summed over time and batch, as [2] does (its RMSProp epsilon 0.1 and clip 40 assume it)
    pg = -((g - v_t) * logp).sum()
    v_loss = 0.5 * ((g - v) ** 2).sum()
    entropy = -(jnp.exp(logp_all) * logp_all).sum()
    loss = pg + vf_coef * v_loss - ent_coef * entropy
    n = v.size
    return loss, {
        "losses/policy": pg / n,
        "losses/value": v_loss / n,
        "losses/entropy": entropy / n,
    }


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # theta_{k-1}: before the update on the previous batch
    opt_state: Any
    prev: dict  # tau_{k-1}: obs, action, reward, done [T, N, ...] and last_obs [N, ...]
    started: jax.Array  # bool: prev holds a batch (false before the first update)
    eta: jax.Array  # shape (2,): (eta_gamma, eta_lambda) logits
    meta_opt_state: Any
    eta_mask: jax.Array  # shape (2,): which meta-parameters learn (META_PARAMS; traced)
    env_state: Any
    obs: jax.Array
    key: jax.Array


def make_optimizer(cfg: Config):
    lr = cfg.lr
    if cfg.anneal_lr:
        lr = optax.linear_schedule(cfg.lr, 0.0, max(cfg.num_updates, 1))
    step = (
        optax.rmsprop(lr, decay=cfg.rms_decay, eps=cfg.rms_eps)
        if cfg.optimizer == "rmsprop"
        else optax.sgd(lr)
    )
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), step)


def make_meta_optimizer(cfg: Config):
    return optax.adam(cfg.meta_lr)


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    net = network(cfg, env)
    k_net, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    p = jnp.array([cfg.gamma_init, cfg.lambda_init])
    eta = jnp.log(p / (1 - p))  # sigmoid^-1
    params = net.init(k_net, obs, eta_values(eta))
    t, n = cfg.num_steps, cfg.num_envs
    prev = dict(
        obs=jnp.zeros((t,) + obs.shape, obs.dtype),
        action=jnp.zeros((t, n), jnp.int32),
        reward=jnp.zeros((t, n)),
        done=jnp.zeros((t, n)),
        last_obs=obs,
    )
    return State(
        params,
        make_optimizer(cfg).init(params),
        prev,
        jnp.array(False),
        eta,
        make_meta_optimizer(cfg).init(eta),
        jnp.array(META_PARAMS[cfg.meta_params], jnp.float32),
        env_state,
        obs,
        key,
    )


# --- UPDATE ---


def inner_update(eta, params, opt_state, batch, net, cfg: Config):
    """theta' = theta + f(tau, theta, eta) ([1] Eq. (1)): one step of the inner optimiser on
    J(tau, theta, eta), differentiable in eta. Returns (theta', opt_state', metrics)."""
    gamma, lam = eta_values(eta)
    grads, metrics = jax.grad(actor_critic_loss, has_aux=True)(
        params,
        net,
        batch,
        batch["last_obs"],
        gamma,
        lam,
        eta_values(eta),
        cfg.vf_coef,
        cfg.ent_coef,
    )
    updates, opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


def update(state: State, cfg: Config):
    env = make_env(cfg)
    net = network(cfg, env)
    key, k_roll = jax.random.split(state.key)
    # d theta_{k-1}/d eta is dropped ([1] Eq. (3)-(5), mu = 0) because the vjp below is
    # taken in eta alone with theta_{k-1} a constant; this stop_gradient changes nothing.
    theta = jax.lax.stop_gradient(state.params)

    # theta_k = theta_{k-1} + f(tau_{k-1}, theta_{k-1}, eta) and its pullback to eta
    def step(eta):
        new, opt_state, metrics = inner_update(eta, theta, state.opt_state, state.prev, net, cfg)
        new = jax.tree.map(lambda a, b: jnp.where(state.started, a, b), new, theta)
        return new, (opt_state, metrics)

    params, pullback, (opt_state, inner_metrics) = jax.vjp(step, state.eta, has_aux=True)
    opt_state = jax.tree.map(
        lambda a, b: jnp.where(state.started, a, b), opt_state, state.opt_state
    )

    # --- ROLLOUT --- tau_k with pi_{theta_k}(.|S, eta)
    cond = eta_values(state.eta)

    def act(obs, k):
        logits, _ = net.apply(params, obs, cond)
        return jax.random.categorical(k, logits), {}

    (env_state, obs, _), traj = rollout(env, act, state.env_state, state.obs, k_roll, cfg.num_steps)
    batch = dict(
        obs=traj["obs"],
        action=traj["action"].astype(jnp.int32),
        reward=traj["reward"],
        done=traj["done"].astype(jnp.float32),
        last_obs=obs,
    )

    # --- META-GRADIENT --- [1] Eq. (2): dJ'(tau', theta', eta_bar)/d theta' . d theta'/d eta
    ref = jnp.array([cfg.gamma_ref, cfg.lambda_ref], jnp.float32)
    val = jax.tree.map(lambda x: x[:, : cfg.meta_batch], batch)  # tau': (T, meta_batch, ...)
    val["last_obs"] = obs[: cfg.meta_batch]
    (j_meta, _), dj = jax.value_and_grad(actor_critic_loss, has_aux=True)(
        params, net, val, val["last_obs"], ref[0], ref[1], ref, cfg.meta_vf_coef, cfg.meta_ent_coef
    )
    (meta_grad,) = pullback(dj)
    delta, meta_opt_state = make_meta_optimizer(cfg).update(meta_grad, state.meta_opt_state)
    eta = state.eta + state.eta_mask * delta * state.started  # Delta eta = -beta (Adam) dJ'/d eta
    meta_opt_state = jax.tree.map(
        lambda a, b: jnp.where(state.started, a, b), meta_opt_state, state.meta_opt_state
    )

    gamma, lam = eta_values(eta)
    metrics = {
        **inner_metrics,
        **episode_metrics(traj),
        "losses/meta": j_meta,
        "meta/gamma": gamma,
        "meta/lambda": lam,
        "meta/grad_gamma": meta_grad[0],
        "meta/grad_lambda": meta_grad[1],
    }
    new = State(
        params,
        opt_state,
        batch,
        jnp.array(True),
        eta,
        meta_opt_state,
        state.eta_mask,
        env_state,
        obs,
        key,
    )
    return new, metrics


def current_params(state: State, cfg: Config):
    """theta_K: the parameters after the update on the last batch (which `update` applies
    at the start of the next call)."""
    net = network(cfg, make_env(cfg))
    new, _, _ = inner_update(state.eta, state.params, state.opt_state, state.prev, net, cfg)
    return jax.tree.map(lambda a, b: jnp.where(state.started, a, b), new, state.params)


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """The final (gamma, lambda); on the random walk also the RMS error of v_theta_K over
    the 19 states against the true values v^gamma_bar (the validation target)."""
    gamma, lam = eta_values(state.eta)
    out = {"final_gamma": gamma, "final_lambda": lam}
    env = make_env(cfg)
    if cfg.env_id == "RandomWalk-19":
        net = network(cfg, env)
        _, v = net.apply(current_params(state, cfg), jnp.eye(19), eta_values(state.eta))
        truth = jnp.asarray(env.env.true_values(cfg.gamma_ref), jnp.float32)
        out["value_rmse"] = jnp.sqrt(((v - truth) ** 2).mean())
    return out


# --- PLOT ---


def plot_run(history, out: str, baseline=None):
    """Left: gamma and lambda against updates (one line per seed); right: the episodic
    return (seed mean), with that of `baseline` = (label, [seeds, updates] returns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, color in (("meta/gamma", "C0"), ("meta/lambda", "C1")):
        y = np.asarray(history[name])
        for i, row in enumerate(y):
            a.plot(row, color=color, alpha=0.8, label=f"{name[5:]}" if i == 0 else None)
    a.set_xlabel("update (one batch)")
    a.set_ylabel("meta-parameter")
    a.legend()
    a.grid(alpha=0.3)
    curves = [("meta-gradient", history["charts/episodic_return"])]
    if baseline is not None:
        curves.append(baseline)
    for label, ret in curves:
        ret = np.asarray(ret, dtype=float)
        cnt = np.isfinite(ret).sum(0)  # seeds where an episode ended in that update
        m = np.where(cnt > 0, np.nansum(ret, 0) / np.maximum(cnt, 1), np.nan)
        k = max(1, len(m) // 50)  # smoothed over a 1/50 of the run
        m = np.convolve(np.nan_to_num(m, nan=np.nanmean(m)), np.ones(k) / k, mode="valid")
        b.plot(m, label=f"{label} ({ret.shape[0]} seeds)")
    b.set_xlabel("update")
    b.set_ylabel("episodic return (smoothed)")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---

SUMMARY = ["final_gamma", "final_lambda", "value_rmse", "charts/episodic_return", "losses/meta"]


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (gamma, lambda and return of this run) and
    `--compare RUN_DIR` (the return curve of an earlier run, e.g. `--meta-params none`)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=SUMMARY,
    )
    if flags["--plot"] is not None:
        baseline, other = None, flags["--compare"]
        if other is not None:
            _, ret, _ = curve(load(other), "charts/episodic_return")  # [updates, seeds]
            c = json.loads((Path(other) / "config.json").read_text())["config"]
            fixed = f"fixed gamma {c['gamma_init']}, lambda {c['lambda_init']}"
            baseline = (fixed if c["meta_params"] == "none" else other, ret.T)
        print("wrote", plot_run(res.history, flags["--plot"], baseline))
    return res


if __name__ == "__main__":
    main()
