"""Domain randomization as meta-learning: a recurrent (LSTM) vs a feed-forward PPO policy.

[1] OpenAI (M. Andrychowicz et al.). "Learning Dexterous In-Hand Manipulation."
    arXiv:1808.00177 (2018).
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post),
    section "DR as Meta-Learning".
[3] J. Schulman et al. "Proximal Policy Optimization Algorithms." arXiv:1707.06347.

Every episode draws its physics xi from a fixed distribution ([1] Sec. 3.2 and Table 1,
physics randomizations), hidden from the policy; PPO maximises the expected return over it:

    theta* = argmax_theta E_{xi ~ P(xi)} [ E_{tau ~ pi_theta, e_xi} [ sum_t gamma^t r_t ] ]
    masses:        m_i  = nominal_i * U[0.5, 1.5]         (each body its own draw)
    dimensions:    l    = nominal   * U[0.95, 1.05]
    actuator gain: k    = nominal   * logU[0.75, 1.5]
    gravity:       g    = nominal   + N(0, 0.4^2)  m/s^2  (Table 1's 0.4 read as the std)
    actuator sign: force_mag *= -1 with probability `sign_flip` (ours, CartPole only; 0)

The set of randomized simulators is a distribution of tasks, and a policy with memory can
meta-learn: its hidden state identifies the episode's dynamics from the history and adapts
within the episode ([1] Sec. 6.4, Fig. 9: memory helps in the randomized simulation and
on the robot; [2] adds that successive successes get faster once the first is reached).

    LSTM policy (`--policy lstm`):  h_t = LSTM([o_t, a_{t-1}], h_{t-1} * (1 - start_t))
                                    pi(a_t | h_t),  h reset at every episode start
    FF policy   (`--policy ff`):    pi(a_t | o_t, a_{t-1})
    value (asymmetric, [1] Sec. 4.1, Table 2): V(o_t, a_{t-1}, xi) with its own LSTM / MLP

Recurrent PPO: the rollout stores h at its start; each minibatch holds whole env
sequences and reruns the LSTM from that stored h with the rollout's resets, so at the first
epoch the recomputed log-probabilities equal the rollout's (ratio 1).
Evaluation ([1] Sec. 6.4's probe): ridge probes, fit on half of `eval_episodes` fresh
episodes, scored (R^2) on the other half, predict the log effective gain (`effective_gain`)
from the policy's h_t at steps t of the episode, and from o_t alone: R^2 above o_t's is the
policy identifying the dynamics (here in one noiseless step, R^2 peaks at t=1; [1]'s is
gradual, with observation noise).

Reproduce (CPU demo, CartPole-v1 under a wide gain range; FF, then LSTM, both in one plot):
    python generalization/dr_meta_lstm.py --preset quick --num-seeds 2 --policy ff \
        --run-dir runs/dr_meta_ff
    python generalization/dr_meta_lstm.py --preset quick --num-seeds 2 \
        --plot generalization/dr_meta_lstm.png --compare runs/dr_meta_ff
    python generalization/dr_meta_lstm.py --preset paper  # Pendulum-v1, GPU
[1]'s headline numbers are real-robot consecutive successes of block rotation (LSTM, full
randomizations: median 13, Sec. 6.2 / Table 4). Its simulation probe (Sec. 6.4): after 5 s
of interaction the LSTM's hidden state tells a bigger from a smaller than average block in
80% of cases; ours scores R^2 of a continuous gain instead.
Ours (quick, CartPole-v1, 262k steps, 2 seeds, 512 probe episodes per seed; a loaded
2-core CPU, ~4 min FF and ~6 min LSTM end to end): held-out R^2 of the log effective gain
at episode step t, LSTM h_t: t=1 0.93, 0.94; t=8 0.83, 0.89; t=32 0.83, 0.85. FF policy's
last layer: t=1 0.96, 0.93 (o_1 after a_0 from rest reveals the gain to any network that
reads a_0), t=8 -0.03, 0.13, t=32 0.08, 0.09. Single observation o_t (linear): -0.07 to
0.05 at every t. Return (512 randomized episodes, sampled actions): LSTM 442, 443; FF 497,
470: memory identifies the dynamics, but CartPole's bang-bang control works at any gain,
so knowing the gain does not pay in return ([1]'s FF-vs-LSTM gap is in simulation too:
Sec. 6.4, Fig. 9; without randomization both converge alike, footnote 7).

Differences from the paper:
- Task: gymnax CartPole-v1 (quick) or Pendulum-v1 (paper preset) instead of the Shadow
  hand rotating a block (MuJoCo and a real robot, not offline). Mapping of [1]'s physics
  randomizations (`FAMILIES`): object and link masses -> cart and pole mass (Pendulum: m),
  object dimensions -> pole length (l), actuator force gains -> force_mag (Pendulum:
  max_torque, only a torque limit there), gravity noise -> the vertical gravity only.
  Surface friction, joint damping, joint limits, backlash, tendon parameters, action delay
  and observation noise have no counterpart here and are not drawn. The ranges are Table
  1's; each body drawing its own mass multiplier is our reading.
- The quick preset widens the gain range to logU[0.25, 4] ("wide randomisation").
- Networks: [1]'s policy and value are Dense(1024) ReLU -> LSTM(512) -> head (App. D.1);
  the paper preset keeps these sizes. [1]'s policy is categorical, 11 bins per action
  (Sec. 4.2); on Pendulum ours is a Gaussian. The policy also reads a_{t-1} (one-hot), the
  critic xi itself (log multipliers), not [1]'s full simulator state. No observation
  normalisation. `--policy ff` makes both towers FF ([1] Fig. 9's FF/FF arm).
- PPO: [1]'s distributed PPO (App. D.1: discount 0.998, GAE lambda 0.95, clip 0.2,
  entropy 0.01, Adam 3e-4, chunks of 10 transitions) runs here on one device, with
  whole-rollout sequences (num_steps) per env as the minibatch unit; the hidden state
  carries across rollouts in the State. [1]'s batch is 800k transitions per GPU in 60
  minibatches of 25.6k (~1.9 passes); the paper preset: 10k, 2 epochs x 4 minibatches.
  vf_coef 0.5, max_grad_norm 0.5, Adam eps 1e-5 are baselines ppo2 defaults, not [1]'s.
- Adaptation is measured by the probe's R^2 against the episode step and the return, not
  the time to the k-th consecutive success (CartPole has no repeated goals).
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import envs, rl, run
from common.nets import orthogonal
from common.plot import save_png
from common.rl import gae, minibatch_epochs, ppo_loss

# --- CONFIG ---

# [1]'s physics randomizations -> the gymnax fields they scale.
FAMILIES = {
    "CartPole-v1": {"mass": ("masscart", "masspole"), "dims": ("length",),
                    "gain": ("force_mag",), "gravity": ("gravity",)},
    "Pendulum-v1": {"mass": ("m",), "dims": ("l",), "gain": ("max_torque",),
                    "gravity": ("g",)},
}


def effective_gain(env_id: str, p) -> jax.Array:
    """The probe's target: log of the gain from action to acceleration (CartPole:
    |force_mag| / total_mass; Pendulum: 3 / (m l^2), torque to angular acceleration)."""
    if env_id == "CartPole-v1":
        return jnp.log(jnp.abs(p.force_mag) / p.total_mass)
    return -jnp.log(p.m * p.l**2)


@dataclass(frozen=True)
class Config:
    """DR as meta-learning ([1]): PPO with an LSTM or FF policy under physics randomization."""

    env_id: str = "Pendulum-v1"
    """gymnax task whose physics are randomized: CartPole-v1 or Pendulum-v1"""
    policy: str = "lstm"
    """lstm (memory: h carried within an episode, reset at its start) or ff (no memory)"""
    mass_range: tuple[float, float] = (0.5, 1.5)
    """uniform multiplier of every body mass, each drawn on its own ([1] masses)"""
    dims_range: tuple[float, float] = (0.95, 1.05)
    """uniform multiplier of the pole length ([1] object dimensions)"""
    gain_range: tuple[float, float] = (0.75, 1.5)
    """log-uniform multiplier of the actuator gain, force_mag / max_torque ([1] gains)"""
    gravity_std: float = 0.4
    """std of the additive Gaussian noise on gravity, m/s^2 ([1]: per axis; here vertical)"""
    sign_flip: float = 0.0
    """probability that an episode's actuator pushes the other way (ours; CartPole only)"""
    hidden_dense: int = 1024
    """units of the ReLU layer before the LSTM (or of both FF layers)"""
    hidden: int = 512
    """LSTM units (the FF policy's second layer has as many)"""
    total_timesteps: int = 100_000_000
    """environment steps"""
    num_envs: int = 1024
    """parallel environments (episodes of independent xi)"""
    num_steps: int = 10
    """steps per env per rollout: the length of a training sequence ([1]: chunks of 10)"""
    lr: float = 3e-4
    """Adam learning rate"""
    num_epochs: int = 4
    """PPO epochs per rollout"""
    num_minibatches: int = 4
    """minibatches per epoch, each of whole env sequences (num_envs must divide)"""
    gamma: float = 0.998
    """discount ([1])"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    eval_episodes: int = 512
    """evaluate(): fresh randomized episodes (half fit the probes, half score them)"""
    probe_steps: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50)
    """evaluate(): episode steps t at which the probes read h_t and o_t"""
    probe_l2: float = 1e-2
    """ridge penalty of the linear probes (on standardised features)"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    def validate(self):
        for name, choices in (("env_id", sorted(FAMILIES)), ("policy", ("lstm", "ff")),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for fam in ("mass", "dims", "gain"):
            lo, hi = getattr(self, f"{fam}_range")
            if not 0 < lo <= hi:
                raise ValueError(f"{fam}_range=({lo}, {hi}) must satisfy 0 < lo <= hi")
        if self.gravity_std < 0:
            raise ValueError(f"gravity_std={self.gravity_std} must be >= 0")
        if not 0 <= self.sign_flip <= 1 or (self.sign_flip and self.env_id != "CartPole-v1"):
            raise ValueError(f"sign_flip={self.sign_flip} must be in [0, 1], and 0 unless "
                             "env_id is CartPole-v1 (Pendulum clips to +-max_torque)")
        for name in ("hidden", "hidden_dense", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.eval_episodes < 4 or self.eval_episodes % 2:
            raise ValueError(f"eval_episodes={self.eval_episodes} must be even and >= 4 "
                             "(half fit the probes, half score them)")
        if not self.probe_steps or min(self.probe_steps) < 0:
            raise ValueError(f"probe_steps={self.probe_steps} must be non-empty and >= 0")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.steps_per_update})")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} is not divisible by "
                             f"num_minibatches={self.num_minibatches} (minibatches of envs)")
        if self.clip_coef <= 0 or self.probe_l2 <= 0:
            raise ValueError(f"clip_coef={self.clip_coef} and probe_l2={self.probe_l2} "
                             "must be > 0")


PRESETS = {
    # CPU demo: CartPole-v1, 64 units, 32 envs x 32 steps, gain logU[0.25, 4]; minutes.
    "quick": dict(env_id="CartPole-v1", hidden_dense=64, hidden=64, num_envs=32,
                  num_steps=32, total_timesteps=262_144, lr=1e-3, gamma=0.99,
                  gain_range=(0.25, 4.0), eval_episodes=512,
                  probe_steps=(0, 1, 2, 4, 8, 16, 32)),
    "paper": dict(num_epochs=2),  # [1] App. D.1: ~1.9 passes over each batch
}


@functools.cache
def make_base_env(cfg: Config) -> envs.GymnaxEnv:
    with jax.ensure_compile_time_eval():
        return envs.GymnaxEnv(cfg.env_id)


# --- RANDOMIZATION ---


def sample_physics(key, cfg: Config):
    """xi ~ P(xi) for one episode ([1] Sec. 3.2, Table 1): the gymnax params with every family's
    fields drawn (derived fields follow, common.envs.with_physics)."""
    base = make_base_env(cfg).default_params()
    fams = FAMILIES[cfg.env_id]
    k_mass, k_dims, k_gain, k_grav = jax.random.split(key, 4)
    values = {}
    lo, hi = cfg.mass_range
    u = jax.random.uniform(k_mass, (len(fams["mass"]),), minval=lo, maxval=hi)
    values.update({f: getattr(base, f) * u[i] for i, f in enumerate(fams["mass"])})
    (f,) = fams["dims"]
    values[f] = getattr(base, f) * jax.random.uniform(k_dims, (), minval=cfg.dims_range[0],
                                                      maxval=cfg.dims_range[1])
    (f,) = fams["gain"]
    log_lo, log_hi = np.log(cfg.gain_range[0]), np.log(cfg.gain_range[1])
    sign = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 5), cfg.sign_flip), -1.0, 1.0)
    values[f] = sign * getattr(base, f) * jnp.exp(jax.random.uniform(k_gain, (), minval=log_lo,
                                                                     maxval=log_hi))
    (f,) = fams["gravity"]
    values[f] = getattr(base, f) + cfg.gravity_std * jax.random.normal(k_grav, ())
    return envs.with_physics(base, **values)


def xi_features(cfg: Config, p) -> jax.Array:
    """xi as the asymmetric critic sees it: log(value / nominal) of every randomized field
    (|value| for the actuator gain), then the gain's sign if `sign_flip` > 0. [..., K(+1)]"""
    base = make_base_env(cfg).default_params()
    fields = [f for fs in FAMILIES[cfg.env_id].values() for f in fs]
    (gain,) = FAMILIES[cfg.env_id]["gain"]
    logs = [jnp.log(jnp.abs(getattr(p, f)) / getattr(base, f)) for f in fields]
    return jnp.stack(logs + [jnp.sign(getattr(p, gain))] * (cfg.sign_flip > 0), -1)


def make_env(cfg: Config) -> envs.VecEnv:
    """`num_envs` auto-resetting envs; every new episode draws xi in the vmapped reset."""
    return envs.VecEnv(make_base_env(cfg), cfg.num_envs, sampler=lambda k: sample_physics(k, cfg))


# --- NETWORKS ---


class Core(nn.Module):
    """One LSTM step whose (c, h) is zeroed where `reset` is true (an episode starts)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, inputs):
        x, reset = inputs
        carry = jax.tree.map(lambda c: jnp.where(reset[:, None], 0.0, c), carry)
        carry, y = nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                                        recurrent_kernel_init=orthogonal(1.0))(carry, x)
        return jax.tree.map(lambda c: c.astype(jnp.float32), carry), y


class Tower(nn.Module):
    """Dense(hidden_dense) ReLU -> LSTM(hidden) (recurrent) or Dense(hidden) ReLU (ff) -> head.
    __call__(carry, x [T, B, D], reset [T, B]) -> (carry, out [T, B, n_out], z [T, B, H])."""

    n_out: int
    hidden_dense: int
    hidden: int
    recurrent: bool
    head_scale: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x, reset):
        dense = lambda n, s=2**0.5: nn.Dense(n, kernel_init=orthogonal(s), dtype=self.dtype)
        e = nn.relu(dense(self.hidden_dense)(x))
        if self.recurrent:
            scan = nn.scan(Core, variable_broadcast="params", split_rngs={"params": False})
            carry, z = scan(self.hidden, self.dtype)(carry, (e, reset))
        else:
            z = nn.relu(dense(self.hidden)(e))
        return carry, dense(self.n_out, self.head_scale)(z).astype(jnp.float32), z


class ActorCritic(nn.Module):
    """Policy tower on [o_t, a_{t-1}]; value tower on [o_t, a_{t-1}, xi] ([1]'s asymmetric
    actor-critic: separate networks, the value with privileged inputs).
    __call__(carry, obs, prev_a, reset, xi) -> (carry, pi params, V, log_std, z_pi);
    carry = ((c, h) policy, (c, h) value), each [B, hidden]."""

    action_dim: int
    hidden_dense: int
    hidden: int
    recurrent: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, obs, prev_a, reset, xi):
        args = (self.hidden_dense, self.hidden, self.recurrent)
        x = jnp.concatenate([obs, prev_a], -1)
        c_pi, out, z = Tower(self.action_dim, *args, 0.01, self.dtype, name="policy")(
            carry[0], x, reset)
        c_v, v, _ = Tower(1, *args, 1.0, self.dtype, name="value")(
            carry[1], jnp.concatenate([x, xi], -1), reset)
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return (c_pi, c_v), out, v[..., 0], log_std, z


def network(cfg: Config) -> ActorCritic:
    env = make_base_env(cfg)
    return ActorCritic(env.num_actions or env.action_shape[0], cfg.hidden_dense, cfg.hidden,
                       cfg.policy == "lstm", jnp.dtype(cfg.dtype))


def zero_carry(cfg: Config, n: int):
    z = jnp.zeros((n, cfg.hidden))
    return ((z, z), (z, z))


def distribution(out, log_std, discrete: bool):
    if discrete:
        return distrax.Categorical(logits=out)
    return distrax.MultivariateNormalDiag(out, jnp.exp(log_std))


def action_features(action, num_actions):
    """a_{t-1} as the networks read it: one-hot (discrete) or the raw vector."""
    if num_actions:
        return jax.nn.one_hot(action, num_actions)
    return jnp.asarray(action, jnp.float32).reshape(*action.shape[:1], -1)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    env_state: Any  # common.envs.VecState; .params is each env's current xi
    obs: jax.Array  # [N, D] next observation
    prev_action: jax.Array  # [N, A] a_{t-1} features
    start: jax.Array  # [N] bool: obs is the first of an episode (reset h before it)
    h: tuple  # the networks' carry, [N, hidden] leaves, carried across rollouts
    key: jax.Array


def init(key, cfg: Config) -> State:
    env, net = make_env(cfg), network(cfg)
    k_net, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    n = cfg.num_envs
    h, a0, start = zero_carry(cfg, n), jnp.zeros((n, net.action_dim)), jnp.ones(n, bool)
    xi = xi_features(cfg, env_state.params)
    params = net.init(k_net, h, obs[None], a0[None], start[None], xi[None])
    opt_state = rl.make_optimizer(rl.ppo_config(cfg, anneal_lr=False)).init(params)
    return State(params, opt_state, env_state, obs, a0, start, h, key)


# --- ROLLOUT ---


def rollout(params, cfg, net, env, carry, key, num_steps):
    """`num_steps` steps of every env, h carried step to step and zeroed at an episode's
    first step. Returns the final carry and the trajectory [T, N, ...]."""
    discrete = env.num_actions is not None

    def step(carry, k):
        env_state, obs, prev_a, start, h = carry
        k_act, k_env = jax.random.split(k)
        prev_a = jnp.where(start[:, None], 0.0, prev_a)
        xi = xi_features(cfg, env_state.params)
        h, out, value, log_std, _ = net.apply(params, h, obs[None], prev_a[None], start[None],
                                              xi[None])
        pi = distribution(out[0], log_std, discrete)
        action = pi.sample(seed=k_act)
        obs2, env_state, reward, done, info = env.step(env_state, action, k_env)
        tr = dict(obs=obs, prev_a=prev_a, reset=start, xi=xi, action=action,
                  logp=pi.log_prob(action), value=value[0], reward=reward, done=done,
                  ret=info["returned_episode_return"], ended=info["returned_episode"])
        return (env_state, obs2, action_features(action, env.num_actions), done, h), tr

    return jax.lax.scan(step, carry, jax.random.split(key, num_steps))


def replay(params, net, h0, seq, discrete):
    """Recurrent PPO's recomputation: rerun the networks over whole sequences (T, B, ...)
    from the carry stored at the rollout's start, with the rollout's resets. Returns
    (log pi(a_t | history), entropy, V), each [T, B]."""
    _, out, value, log_std, _ = net.apply(params, h0, seq["obs"], seq["prev_a"], seq["reset"],
                                          seq["xi"])
    pi = distribution(out, log_std, discrete)
    return pi.log_prob(seq["action"]), pi.entropy(), value


# --- UPDATE ---


def update(state: State, cfg: Config):
    env, net = make_env(cfg), network(cfg)
    tx = rl.make_optimizer(rl.ppo_config(cfg, anneal_lr=False))
    discrete = env.num_actions is not None
    key, k_roll, k_epochs = jax.random.split(state.key, 3)
    carry = (state.env_state, state.obs, state.prev_action, state.start, state.h)
    (env_state, obs, prev_a, start, h), traj = rollout(state.params, cfg, net, env, carry,
                                                       k_roll, cfg.num_steps)  # (T, N, ...)

    # --- ADVANTAGES --- (GAE; an episode end cuts the bootstrap)
    xi = xi_features(cfg, env_state.params)
    prev_last = jnp.where(start[:, None], 0.0, prev_a)
    _, _, last_value, _, _ = net.apply(state.params, h, obs[None], prev_last[None],
                                       start[None], xi[None])
    adv, returns = gae(traj["reward"], traj["value"], traj["done"], last_value[0], cfg.gamma,
                       cfg.gae_lambda)

    # --- LOSS over whole sequences --- (minibatches are sets of envs, batch-major)
    keys = ("obs", "prev_a", "reset", "xi", "action", "logp", "value")
    batch = {k: jnp.swapaxes(traj[k], 0, 1) for k in keys}  # (N, T, ...)
    batch.update(adv=adv.T, ret=returns.T, h0=state.h)

    def loss_fn(params, mb):
        seq = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), {k: mb[k] for k in keys})
        logp, entropy, value = replay(params, net, mb["h0"], seq, discrete)  # (T, B)
        a = mb["adv"].T
        a = (a - a.mean()) / (a.std() + 1e-8)
        # [3] Eq. 7 (clipped surrogate) + value loss + entropy bonus (Eq. 9)
        return ppo_loss(logp, seq["logp"], a, entropy, value, seq["value"], mb["ret"].T,
                        cfg.clip_coef, cfg.vf_coef, cfg.ent_coef, clip_vloss=True)

    params, opt_state, metrics = minibatch_epochs(k_epochs, state.params, state.opt_state,
                                                  batch, loss_fn, tx, cfg.num_epochs,
                                                  cfg.num_minibatches)
    n_ended = traj["ended"].sum()
    # 0 when no episode ended in this rollout, which the runner logs as NaN (run.NAN_UNLESS)
    metrics["charts/episodic_return"] = (traj["ret"] * traj["ended"]).sum() / jnp.maximum(
        n_ended, 1)
    metrics["charts/episodes"] = n_ended
    new = State(params, opt_state, env_state, obs, prev_a, start, h, key)
    return new, metrics


# --- EVALUATE ---


def episode_features(params, cfg: Config, key, num: int, horizon: int, memory: bool = True):
    """`num` fresh episodes of `horizon` steps (xi ~ P(xi)) under the policy. Returns
    (z [T, M, H] the policy's features (LSTM output h_t), obs [T, M, D], alive [T, M],
    reward [T, M], xi params [M]). `memory=False` zeroes the carry at every step (the
    broken variant: the same network without memory)."""
    env, net = make_base_env(cfg), network(cfg)
    k_xi, k_reset, k_run = jax.random.split(key, 3)
    p = jax.vmap(lambda k: sample_physics(k, cfg))(jax.random.split(k_xi, num))
    obs, s = jax.vmap(env.reset)(jax.random.split(k_reset, num), p)
    xi = xi_features(cfg, p)
    discrete = env.num_actions is not None

    def step(carry, k):
        s, obs, prev_a, h, alive, t = carry
        k_act, k_env = jax.random.split(k)
        first = jnp.full((num,), (t == 0) | (not memory))
        h, out, _, log_std, z = net.apply(params, h, obs[None], prev_a[None], first[None],
                                          xi[None])
        action = distribution(out[0], log_std, discrete).sample(seed=k_act)
        obs2, s, r, term, trunc = jax.vmap(env.step)(jax.random.split(k_env, num), s, action, p)
        out = (z[0].astype(jnp.float32), obs, alive, r * alive)
        alive = alive & ~(term | trunc)
        return (s, obs2, action_features(action, env.num_actions), h, alive, t + 1), out

    a0 = jnp.zeros((num, net.action_dim))
    init_carry = (s, obs, a0, zero_carry(cfg, num), jnp.ones(num, bool), 0)
    _, (z, o, alive, r) = jax.lax.scan(step, init_carry, jax.random.split(k_run, horizon))
    return z, o, alive, r, p


def probe_r2(x, y, w, l2):
    """Linear ridge probe: fit y ~ [x, 1] on the first half of the rows (weights w: alive
    episodes), return R^2 on the second half. x [M, F], y [M], w [M]."""
    m = x.shape[0] // 2
    mu = (w[:m, None] * x[:m]).sum(0) / jnp.maximum(w[:m].sum(), 1)
    sd = jnp.sqrt((w[:m, None] * (x[:m] - mu) ** 2).sum(0) / jnp.maximum(w[:m].sum(), 1)) + 1e-6
    xs = jnp.concatenate([(x - mu) / sd, jnp.ones_like(x[:, :1])], -1)
    a = xs[:m].T @ (w[:m, None] * xs[:m]) + l2 * m * jnp.eye(xs.shape[1])
    beta = jnp.linalg.solve(a, xs[:m].T @ (w[:m] * y[:m]))
    res, wt = y[m:] - xs[m:] @ beta, w[m:]
    ybar = (wt * y[m:]).sum() / jnp.maximum(wt.sum(), 1)
    return 1 - (wt * res**2).sum() / jnp.maximum((wt * (y[m:] - ybar) ** 2).sum(), 1e-12)


def probes(params, cfg: Config, key, memory: bool = True):
    """R^2 of the probes from h_t (policy features) and from o_t, at every probe step, and
    the mean return over the first `max(probe_steps) + 1` steps. ([S], [S], scalar)"""
    horizon = max(cfg.probe_steps) + 1
    z, o, alive, r, p = episode_features(params, cfg, key, cfg.eval_episodes, horizon, memory)
    y = effective_gain(cfg.env_id, p)
    w = alive.astype(jnp.float32)
    idx = np.asarray(cfg.probe_steps)
    r2_h = jax.vmap(lambda x, w: probe_r2(x, y, w, cfg.probe_l2))(z[idx], w[idx])
    r2_o = jax.vmap(lambda x, w: probe_r2(x, y, w, cfg.probe_l2))(o[idx], w[idx])
    return r2_h, r2_o, r.sum(0).mean()


def evaluate(state: State, cfg: Config):
    """eval/return: mean return of `eval_episodes` full randomized episodes; probe/h_<t>
    and probe/obs_<t>: held-out R^2 of the effective gain from the policy's features h_t
    (the LSTM output; the FF policy's last layer) and from the observation o_t."""
    k_probe, k_ret = jax.random.split(jax.random.fold_in(state.key, 1))
    r2_h, r2_o, _ = probes(state.params, cfg, k_probe)
    horizon = int(make_base_env(cfg).default_params().max_steps_in_episode)
    _, _, _, r, _ = episode_features(state.params, cfg, k_ret, cfg.eval_episodes, horizon)
    out = {"eval/return": r.sum(0).mean()}
    for i, t in enumerate(cfg.probe_steps):
        out[f"probe/h_{t:03d}"] = r2_h[i]
        out[f"probe/obs_{t:03d}"] = r2_o[i]
    return out


# --- PLOT ---


def plot_probes(curves, cfg: Config, out: str):
    """Probe R^2 of the effective gain against the episode step, from each run's policy
    features (mean over seeds +- std) and from the single observation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    t = np.asarray(cfg.probe_steps)
    for i, (final, label) in enumerate(curves):
        ret = np.asarray(final["eval/return"]).mean()
        for kind, ls, name in (("h", "-", f"{label}: h_t (return {ret:.0f})"),
                               ("obs", ":", "single observation o_t"))[:2 - (i > 0)]:
            y = np.stack([np.asarray(final[f"probe/{kind}_{s:03d}"]) for s in t], -1)
            y = y.reshape(-1, len(t))
            ax.plot(t, y.mean(0), ls, marker="o", label=f"{name}, {y.shape[0]} seeds")
            ax.fill_between(t, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("step t of the episode")
    ax.set_ylabel("held-out R^2 of log effective gain")
    ax.set_title(f"{cfg.env_id}, gain x logU{cfg.gain_range}")
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (probe R^2 against the episode step) and
    `--compare RUN_DIR` (also draw an earlier run, from its summary.json)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    out, other = flags["--plot"], flags["--compare"]
    cfg = run.parse(Config, PRESETS, argv, __doc__)[0]  # --help exits here
    last = f"{max(cfg.probe_steps):03d}"
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["eval/return", f"probe/h_{last}",
                                              f"probe/obs_{last}", "charts/episodic_return"])
    if out is not None:
        curves = [(res.final, cfg.policy.upper())]
        if other is not None:
            summary = json.loads((Path(other) / "summary.json").read_text())
            record = json.loads((Path(other) / "config.json").read_text())["config"]
            curves.append((summary, record["policy"].upper()))
        print("wrote", plot_probes(curves, cfg, out))
    return res


if __name__ == "__main__":
    main()
