"""Uniform domain randomization of the dynamics, with a feed-forward or an LSTM policy.

[1] X. B. Peng, M. Andrychowicz, W. Zaremba, P. Abbeel. "Sim-to-Real Transfer of Robotic
    Control with Dynamics Randomization." ICRA 2018, arXiv:1710.06537.
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post).
[3] J. Schulman et al. "Proximal Policy Optimization Algorithms." arXiv:1707.06347.

The dynamics mu (masses, dimensions, gravity, actuator gain, action delay, observation
noise) are drawn anew for every episode from a fixed box, and the policy maximises the
expected return over that box ([1] Eq. 1, [2] "DR"):

    theta* = argmax_theta E_{mu ~ U(box)} [ E_{tau ~ p(tau | pi_theta, mu)} [ sum_t gamma^t r_t ] ]
    mass, gain:  mu_i = nominal_i * exp(U[log lo_i, log hi_i])     (log-uniform [M], see below)
    length, g:   mu_i = nominal_i * U[lo_i, hi_i]                  (uniform)
    delay d ~ U{0..max_delay}: the action applied at t was chosen at t - d   ([1] "action latency")
    o_t = s_t + eps_t,  eps_t ~ N(0, obs_noise^2 I), a fresh draw every step  ([1] "sensor noise")

mu is fixed for an episode and hidden from the policy, so a policy with memory can infer it
from the history: the LSTM policy of [1] Fig. 4 (`ActorCritic`) reads (s_t, a_{t-1}) and acts
on [z_t, s_t] ([1] Sec. IV-C: pi(a_t | s_t, z_t)); the feed-forward one (`--policy ff`) reads
s_t alone. The critic is "omniscient": it also receives mu ([1] Sec. IV-D: Q(s, a, z, mu)).
"Reality" is a simulator with hidden parameters mu_target never sampled in training
(sim-to-sim, [2]); `evaluate` reports the return there, in the training box, at the nominal
mu, the gap (train - target), and along a sweep of one hidden parameter (the plot).

Reproduce (CPU demo, CartPole-v1; without randomization, then randomized, both sweeps in
one plot):
    python generalization/uniform_dr_dynamics.py --preset quick --num-seeds 4 --no-randomize \
        --run-dir runs/dr_nominal
    python generalization/uniform_dr_dynamics.py --preset quick --num-seeds 4 \
        --plot generalization/uniform_dr_dynamics.png --compare runs/dr_nominal
Paper hyperparameters (GPU; LSTM 128, 128 episodes x 100 steps per iteration, lr 5e-4,
8000 iterations = 102M steps, on Pendulum-v1):
    python generalization/uniform_dr_dynamics.py --preset paper
[1] Table II, success rate of puck pushing (randomized sim / real Fetch arm): LSTM 0.91 /
0.89 +- 0.06 (28 real trials), FF 0.83 / 0.67 +- 0.14, FF + history 0.87 / 0.70 +- 0.10,
FF without randomization 0.51 / 0.00 +- 0.00. [1] Table III (LSTM, real): all
randomization 0.89, fixed action timestep 0.29, no observation noise 0.25, fixed link mass
0.64, fixed puck friction 0.48. (Tables I-III as quoted by a detailed secondary summary of
the paper; the PDF itself was not at hand.)
Ours (quick, CartPole-v1, LSTM 64, 400k steps, 2 seeds, 64 episodes per condition; a
loaded 2-core CPU, ~100 s compile + ~90 s per run): return in the target (a 3-step action
delay, training drew 0..2) 396 +- 5 randomized vs 188 +- 33 without randomization; in
distribution 453 vs 500 (nominal), so the gap is 57 vs 312. Both score 500 at the nominal
dynamics. Sweep of the delay: generalization/uniform_dr_dynamics.png. (The target also adds
observation noise of std 0.01, which the --no-randomize run never saw in training: the gap
is not the delay's alone.)

Differences from the paper:
- Learner: PPO ([3], clipped surrogate, GAE) on whole-sequence minibatches, not [1]'s
  recurrent DPG with hindsight experience replay (HER serves [1]'s sparse goal reward; the
  tasks here have dense rewards and no goals). PPO's hyperparameters are ours; the paper
  preset keeps [1]'s batch (128 episodes x 100 steps), Adam lr 5e-4, ~100M samples, and
  128-unit layers.
- Task: gymnax CartPole-v1 (quick) or Pendulum-v1 (paper preset) instead of the Fetch arm
  pushing a puck (MuJoCo, a real robot). Their parameters map onto [1] Table I's families
  (`FAMILIES`): link mass [0.25, 4] x, controller gain [0.5, 2] x (force_mag / max_torque),
  and two the table has not (pole length, gravity). On Pendulum the "gain" is only the
  torque limit: gymnax clips the action to max_torque and applies it unscaled, so it acts
  only on actions beyond the limit (a saturation, not a gain).
- Sampling law: masses and gains log-uniform, the rest uniform. [1] Table I gives ranges only
  (as quoted); log-uniform scale parameters are the convention of OpenAI et al. 2018
  (arXiv:1808.00177), assumed here [M], not read in [1]. Joint damping, puck friction/damping
  and table height have no counterpart in these envs and are not drawn.
- Action delay: an integer number of control steps d ~ U{0..max_delay} per episode (a ring
  buffer, common.envs.DynamicsRandomized) instead of [1]'s control period 0.04 s + Exp(lambda)
  with lambda ~ U[125, 1000] 1/s redrawn every step (a mean extra latency of 1-8 ms, at
  most a fifth of a control step): the whole-step delays here, and the 3-step target, are
  a much larger perturbation of another kind. During the first d steps action 0
  (CartPole: push left; Pendulum: zero torque) is applied.
- Observation noise: an absolute std `obs_noise` on every feature, instead of 5% of each
  feature's running std.
- Networks: the critic is an MLP on [s_t, a_{t-1}, mu] plus, with the LSTM policy, the
  policy's LSTM output z_t (shared, trained by both losses); [1] gives the critic its own
  recurrent branch.
- Paper preset: gymnax Pendulum-v1 episodes last 200 steps, so [1]'s "128 episodes x 100
  steps" per iteration are 128 half-episodes here, and GAE treats the time-limit
  truncation as terminal.
- Metrics: charts/episodic_return is the mean return of the episodes that ended in the
  rollout (NaN in an update where none ended).
"""

import dataclasses
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
import optax
from flax import struct

from common import envs, run
from common.nets import orthogonal
from common.plot import save_png
from common.rl import gae, minibatch_epochs, ppo_loss

# --- CONFIG ---

# Randomized families -> the gymnax fields they scale ([1] Table I's families where one fits).
FAMILIES = {
    "CartPole-v1": {"mass": ("masscart", "masspole"), "length": ("length",),
                    "gravity": ("gravity",), "gain": ("force_mag",)},
    "Pendulum-v1": {"mass": ("m",), "length": ("l",), "gravity": ("g",), "gain": ("max_torque",)},
}
LOG_UNIFORM = ("mass", "gain")  # scale-like parameters drawn log-uniformly ([M]: see docstring)
SWEEPS = ("mass", "length", "gravity", "gain", "delay", "obs_noise")


@dataclass(frozen=True)
class Config:
    """Uniform dynamics randomization (Peng et al. 2018) trained with PPO."""

    env_id: str = "Pendulum-v1"
    """gymnax task whose physics are randomized: CartPole-v1 or Pendulum-v1"""
    policy: str = "lstm"
    """lstm ([1] Fig. 4: dense + LSTM over (s_t, a_{t-1}), then [z_t, s_t] -> 2 dense) or ff"""
    randomize: bool = True
    """draw the dynamics per episode from the ranges below (False: always the nominal ones)"""
    mass_range: tuple[float, float] = (0.25, 4.0)
    """log-uniform multiplier of every body mass, each drawn on its own ([1] Table I link mass)"""
    gain_range: tuple[float, float] = (0.5, 2.0)
    """log-uniform multiplier of the actuator gain, force_mag / max_torque ([1] controller gains)"""
    length_range: tuple[float, float] = (0.75, 1.25)
    """uniform multiplier of the pole length (not in [1]; a dimension, as its table height)"""
    gravity_range: tuple[float, float] = (0.9, 1.1)
    """uniform multiplier of gravity (not in [1])"""
    max_delay: int = 2
    """action delay d ~ U{0..max_delay} control steps per episode ([1]: random action timestep)"""
    obs_noise: float = 0.01
    """std of the Gaussian noise added to every observation feature at every step"""
    target_mass: float = 1.0
    """target domain ("reality", never sampled): multiplier of every body mass"""
    target_length: float = 1.0
    """target domain: multiplier of the pole length"""
    target_gravity: float = 1.0
    """target domain: multiplier of gravity"""
    target_gain: float = 1.0
    """target domain: multiplier of the actuator gain"""
    target_delay: int = 3
    """target domain: action delay in control steps (above max_delay: never seen in training)"""
    target_obs_noise: float = 0.01
    """target domain: observation noise std"""
    sweep: str = "delay"
    """parameter swept by evaluate() and the plot (the others nominal, delay 0, no noise)"""
    sweep_values: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)
    """values of the swept parameter (multipliers; steps for delay; std for obs_noise)"""
    omniscient_critic: bool = True
    """the critic also reads mu, the episode's dynamics ([1] Sec. IV-D)"""
    hidden: int = 128
    """units of every dense layer and of the LSTM ([1] Fig. 4)"""
    total_timesteps: int = 102_400_000
    """environment steps ([1]: ~8000 iterations x 128 episodes x 100 steps)"""
    num_envs: int = 128
    """parallel environments ([1]: 128 episodes per batch)"""
    num_steps: int = 100
    """steps per env per rollout ([1]: 100-step episodes)"""
    lr: float = 5e-4
    """Adam learning rate ([1]: 5e-4 for actor and critic)"""
    num_epochs: int = 4
    """PPO epochs per rollout"""
    num_minibatches: int = 4
    """minibatches per epoch, each of whole env sequences (num_envs must divide)"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    eval_episodes: int = 64
    """evaluate(): episodes per condition (training distribution, nominal, target, sweep)"""
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
                              ("sweep", SWEEPS), ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for fam in ("mass", "gain", "length", "gravity"):
            lo, hi = getattr(self, f"{fam}_range")
            if not 0 < lo <= hi:
                raise ValueError(f"{fam}_range=({lo}, {hi}) must satisfy 0 < lo <= hi")
        for name in ("target_mass", "target_gain", "target_length", "target_gravity", "hidden",
                     "eval_episodes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("max_delay", "target_delay", "obs_noise", "target_obs_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        counts = self.sweep in ("delay", "obs_noise")  # control steps or a std, else multipliers
        low = min(self.sweep_values, default=-1.0)
        if low < 0 or (low == 0 and not counts):
            need = f">= 0 for {self.sweep}" if counts else "> 0 (multipliers)"
            raise ValueError(f"sweep_values={self.sweep_values} must be non-empty and {need}")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.steps_per_update})")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} is not divisible by "
                             f"num_minibatches={self.num_minibatches} (minibatches of envs)")
        if self.clip_coef <= 0:
            raise ValueError(f"clip_coef={self.clip_coef} must be > 0")


PRESETS = {
    # CPU demo: CartPole-v1, LSTM 64, 32 envs x 64 steps, 400k steps; minutes on 2 cores.
    "quick": dict(env_id="CartPole-v1", hidden=64, num_envs=32, num_steps=64,
                  total_timesteps=409_600, lr=1e-3, ent_coef=0.01),
    "paper": dict(),
}


def base_env(cfg: Config) -> envs.DynamicsRandomized:
    """One unbatched env with observation noise and an action buffer (common.envs) that holds
    the largest delay of training, target or sweep."""
    sweep = int(max(cfg.sweep_values)) if cfg.sweep == "delay" else 0
    return _base_env(cfg.env_id, max(cfg.max_delay, cfg.target_delay, sweep))


@functools.cache
def _base_env(env_id: str, delay: int) -> envs.DynamicsRandomized:
    with jax.ensure_compile_time_eval():
        return envs.DynamicsRandomized(envs.GymnaxEnv(env_id), delay)


# --- RANDOMIZATION ---


def dynamics(cfg: Config, scales: dict, delay, obs_noise) -> envs.DynamicsParams:
    """The episode's params: each family's fields = nominal x scale (derived fields follow,
    common.envs.with_physics), the delay and the noise std. `scales[family]` holds one
    multiplier per field of the family."""
    base = base_env(cfg).env.default_params()
    values = {f: getattr(base, f) * scales[fam][i]
              for fam, fields in FAMILIES[cfg.env_id].items() for i, f in enumerate(fields)}
    return envs.DynamicsParams(envs.with_physics(base, **values),
                               jnp.asarray(delay, jnp.int32), jnp.asarray(obs_noise, jnp.float32))


def per_family(cfg: Config, value_of) -> dict:
    """`scales` for `dynamics`: the multiplier `value_of(family)` for every field of a family."""
    return {fam: [value_of(fam)] * len(fields) for fam, fields in FAMILIES[cfg.env_id].items()}


def sample_dynamics(key, cfg: Config) -> envs.DynamicsParams:
    """mu ~ U(box) for one episode ([1] Table I ranges); the nominal mu when not `randomize`."""
    fams = FAMILIES[cfg.env_id]
    if not cfg.randomize:
        return dynamics(cfg, per_family(cfg, lambda fam: 1.0), 0, 0.0)
    keys = jax.random.split(key, len(fams) + 1)
    scales = {}
    for k, (fam, fields) in zip(keys[:-1], fams.items(), strict=True):
        lo, hi = getattr(cfg, f"{fam}_range")
        u = jax.random.uniform(k, (len(fields),))
        if fam in LOG_UNIFORM:
            scales[fam] = jnp.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
        else:
            scales[fam] = lo + u * (hi - lo)
    delay = jax.random.randint(keys[-1], (), 0, cfg.max_delay + 1)
    return dynamics(cfg, scales, delay, cfg.obs_noise)


def target_dynamics(cfg: Config) -> envs.DynamicsParams:
    """The hidden "real" system, never sampled in training (sim-to-sim)."""
    scales = per_family(cfg, lambda fam: getattr(cfg, f"target_{fam}"))
    return dynamics(cfg, scales, cfg.target_delay, cfg.target_obs_noise)


def sweep_dynamics(cfg: Config, value) -> envs.DynamicsParams:
    """Nominal dynamics (no delay, no noise) with the `sweep` parameter set to `value`."""
    scales = per_family(cfg, lambda fam: value if fam == cfg.sweep else 1.0)
    delay = int(value) if cfg.sweep == "delay" else 0
    return dynamics(cfg, scales, delay, value if cfg.sweep == "obs_noise" else 0.0)


def mu_features(cfg: Config, params: envs.DynamicsParams) -> jax.Array:
    """mu as the omniscient critic sees it: log(value / nominal) of every randomized field,
    the delay and the noise std. [..., K]"""
    base = base_env(cfg).env.default_params()
    feats = [jnp.log(getattr(params.physics, f) / getattr(base, f))
             for fields in FAMILIES[cfg.env_id].values() for f in fields]
    feats += [params.delay.astype(jnp.float32), params.obs_noise]
    return jnp.stack(jnp.broadcast_arrays(*feats), -1)


def make_env(cfg: Config) -> envs.VecEnv:
    """`num_envs` auto-resetting envs; each new episode draws mu with `sample_dynamics`."""
    return envs.VecEnv(base_env(cfg), cfg.num_envs, sampler=lambda k: sample_dynamics(k, cfg))


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


class ActorCritic(nn.Module):
    """[1] Fig. 4: (s_t, a_{t-1}) -> dense -> LSTM -> z_t; [z_t, s_t] -> dense, dense -> pi;
    the critic: [s_t, a_{t-1}, mu (omniscient), z_t] -> dense, dense -> V. ReLU dense layers
    of `hidden` units with orthogonal init; `recurrent=False` (ff) drops the LSTM and z_t.

    __call__(carry, obs [T, B, D], prev_action [T, B, A], reset [T, B], mu [T, B, K]) ->
    (carry, pi params [T, B, A], V [T, B], log_std); carry = (c, h) [B, hidden] each."""

    action_dim: int
    hidden: int
    recurrent: bool
    omniscient: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, obs, prev_action, reset, mu):
        def dense(n, scale=1.4142135623730951):  # sqrt 2
            return nn.Dense(n, kernel_init=orthogonal(scale), dtype=self.dtype)

        x_pi, x_v = [obs], [obs, prev_action]
        if self.recurrent:
            e = nn.relu(dense(self.hidden)(jnp.concatenate([obs, prev_action], -1)))
            scan = nn.scan(Core, variable_broadcast="params", split_rngs={"params": False})
            carry, z = scan(self.hidden, self.dtype)(carry, (e, reset))
            x_pi, x_v = [z, *x_pi], [z, *x_v]
        if self.omniscient:
            x_v.append(mu)
        def tower(xs, n_out, scale):  # two ReLU layers of `hidden` units, then the head
            h = jnp.concatenate(xs, -1)
            for _ in range(2):
                h = nn.relu(dense(self.hidden)(h))
            return dense(n_out, scale)(h)

        out = tower(x_pi, self.action_dim, 0.01)
        v = tower(x_v, 1, 1.0)[..., 0]
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return carry, out.astype(jnp.float32), v.astype(jnp.float32), log_std


def network(cfg: Config) -> ActorCritic:
    env = base_env(cfg)
    return ActorCritic(env.num_actions or env.action_shape[0], cfg.hidden, cfg.policy == "lstm",
                       cfg.omniscient_critic, jnp.dtype(cfg.dtype))


def distribution(out, log_std, discrete: bool):
    if discrete:
        return distrax.Categorical(logits=out)
    return distrax.MultivariateNormalDiag(out, jnp.exp(log_std))


def action_features(action, num_actions):
    """a_{t-1} as the network reads it: one-hot (discrete) or the raw vector."""
    if num_actions:
        return jax.nn.one_hot(action, num_actions)
    return jnp.asarray(action, jnp.float32).reshape(*action.shape[:1], -1)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    env_state: Any  # common.envs.VecState; .params is each env's current mu
    obs: jax.Array  # [N, D] next observation
    prev_action: jax.Array  # [N, A] a_{t-1} features (zeros at an episode's first step)
    start: jax.Array  # [N] bool: obs is the first of an episode (reset the LSTM before it)
    h: tuple  # (c, h) [N, hidden] each, carried across rollouts
    key: jax.Array


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr, eps=1e-5))


def init(key, cfg: Config) -> State:
    env, net = make_env(cfg), network(cfg)
    k_net, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    n = cfg.num_envs
    h = (jnp.zeros((n, cfg.hidden)), jnp.zeros((n, cfg.hidden)))
    a0 = jnp.zeros((n, net.action_dim))
    start = jnp.ones(n, bool)
    mu = mu_features(cfg, env_state.params)
    params = net.init(k_net, h, obs[None], a0[None], start[None], mu[None])
    return State(params, make_optimizer(cfg).init(params), env_state, obs, a0, start, h, key)


# --- ROLLOUT ---


def rollout(params, cfg, net, env, carry, key, num_steps):
    """`num_steps` steps of every env, the LSTM state carried step to step and zeroed at an
    episode's first step. Returns the final carry and the trajectory [T, N, ...]."""
    discrete = env.num_actions is not None

    def step(carry, k):
        env_state, obs, prev_a, start, h = carry
        k_act, k_env = jax.random.split(k)
        prev_a = jnp.where(start[:, None], 0.0, prev_a)
        mu = mu_features(cfg, env_state.params)
        h, out, value, log_std = net.apply(params, h, obs[None], prev_a[None], start[None],
                                           mu[None])
        pi = distribution(out[0], log_std, discrete)
        action = pi.sample(seed=k_act)
        obs2, env_state, reward, done, info = env.step(env_state, action, k_env)
        tr = dict(obs=obs, prev_a=prev_a, reset=start, mu=mu, action=action,
                  logp=pi.log_prob(action), value=value[0], reward=reward, done=done,
                  ret=info["returned_episode_return"], ended=info["returned_episode"])
        a_feat = action_features(action, env.num_actions)
        return (env_state, obs2, a_feat, done, h), tr

    return jax.lax.scan(step, carry, jax.random.split(key, num_steps))


# --- UPDATE ---


def update(state: State, cfg: Config):
    env, net, tx = make_env(cfg), network(cfg), make_optimizer(cfg)
    discrete = env.num_actions is not None
    key, k_roll, k_epochs = jax.random.split(state.key, 3)
    carry = (state.env_state, state.obs, state.prev_action, state.start, state.h)
    (env_state, obs, prev_a, start, h), traj = rollout(state.params, cfg, net, env, carry,
                                                       k_roll, cfg.num_steps)  # (T, N, ...)

    # --- ADVANTAGES --- (GAE; an episode end cuts the bootstrap)
    mu = mu_features(cfg, env_state.params)
    prev_last = jnp.where(start[:, None], 0.0, prev_a)
    _, _, last_value, _ = net.apply(state.params, h, obs[None], prev_last[None], start[None],
                                    mu[None])
    adv, returns = gae(traj["reward"], traj["value"], traj["done"], last_value[0], cfg.gamma,
                       cfg.gae_lambda)

    # --- LOSS over whole sequences --- (minibatches are sets of envs)
    batch = {k: jnp.swapaxes(traj[k], 0, 1)  # (N, T, ...)
             for k in ("obs", "prev_a", "reset", "mu", "action", "logp", "value")}
    batch.update(adv=adv.T, ret=returns.T, c0=state.h[0], h0=state.h[1])

    def loss_fn(params, mb):
        seq = lambda x: jnp.swapaxes(x, 0, 1)  # (B, T, ...) -> (T, B, ...)
        _, out, value, log_std = net.apply(params, (mb["c0"], mb["h0"]), seq(mb["obs"]),
                                           seq(mb["prev_a"]), seq(mb["reset"]), seq(mb["mu"]))
        pi = distribution(out, log_std, discrete)
        a = seq(mb["adv"])
        a = (a - a.mean()) / (a.std() + 1e-8)
        return ppo_loss(pi.log_prob(seq(mb["action"])), seq(mb["logp"]), a, pi.entropy(), value,
                        seq(mb["value"]), seq(mb["ret"]), cfg.clip_coef, cfg.vf_coef,
                        cfg.ent_coef, clip_vloss=True)

    params, opt_state, metrics = minibatch_epochs(k_epochs, state.params, state.opt_state,
                                                  batch, loss_fn, tx, cfg.num_epochs,
                                                  cfg.num_minibatches)
    n_ended = traj["ended"].sum()
    # 0 when no episode ended in this rollout, which the runner logs as NaN (run.NAN_UNLESS)
    metrics["charts/episodic_return"] = (traj["ret"] * traj["ended"]).sum() / jnp.maximum(
        n_ended, 1)
    metrics["charts/episodes"] = n_ended
    metrics["charts/mean_delay"] = traj["mu"][..., -2].mean()
    new = State(params, opt_state, env_state, obs, prev_a, start, h, key)
    return new, metrics


# --- EVALUATE ---


def episode_returns(params, cfg: Config, dyn: envs.DynamicsParams, key) -> jax.Array:
    """Return of ONE episode per entry of `dyn` (batched params [M]) under the policy, each
    from reset to its first termination or time limit (later steps are masked)."""
    env, net = base_env(cfg), network(cfg)
    m = jax.tree.leaves(dyn)[0].shape[0]
    horizon = int(env.env.default_params().max_steps_in_episode)
    k_reset, k_run = jax.random.split(key)
    obs, s = jax.vmap(env.reset)(jax.random.split(k_reset, m), dyn)
    h = (jnp.zeros((m, cfg.hidden)), jnp.zeros((m, cfg.hidden)))
    mu = mu_features(cfg, dyn)
    discrete = env.num_actions is not None

    def step(carry, k):
        s, obs, prev_a, h, alive, ret, t = carry
        k_act, k_env = jax.random.split(k)
        first = jnp.full((m,), t == 0)
        h, out, _, log_std = net.apply(params, h, obs[None], prev_a[None], first[None], mu[None])
        action = distribution(out[0], log_std, discrete).sample(seed=k_act)
        obs, s, r, term, trunc = jax.vmap(env.step)(jax.random.split(k_env, m), s, action, dyn)
        ret = ret + r * alive
        alive = alive & ~(term | trunc)
        return (s, obs, action_features(action, env.num_actions), h, alive, ret, t + 1), None

    a0 = jnp.zeros((m, net.action_dim))
    init_carry = (s, obs, a0, h, jnp.ones(m, bool), jnp.zeros(m), 0)
    (_, _, _, _, _, ret, _), _ = jax.lax.scan(step, init_carry, jax.random.split(k_run, horizon))
    return ret


def evaluate(state: State, cfg: Config):
    """Mean return of `eval_episodes` episodes per condition: eval/box with mu drawn from the
    randomization box (whether or not the policy trained on it), eval/nominal at the nominal
    mu (no delay, no noise), eval/target at the hidden target mu; eval/in_dist is the
    policy's own training distribution (box, or nominal when not `randomize`) and eval/gap =
    in_dist - target; sweep/<i> the return with the `sweep` parameter at sweep_values[i].
    All conditions run as one batch of episodes."""
    n = cfg.eval_episodes
    k_box, k_run = jax.random.split(jax.random.fold_in(state.key, 1))
    box_cfg = dataclasses.replace(cfg, randomize=True)
    groups = [jax.vmap(lambda k: sample_dynamics(k, box_cfg))(jax.random.split(k_box, n))]
    fixed = [sample_dynamics(k_box, dataclasses.replace(cfg, randomize=False)),
             target_dynamics(cfg)] + [sweep_dynamics(cfg, v) for v in cfg.sweep_values]
    groups += [jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *jnp.shape(x))), d)
               for d in fixed]
    dyn = jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups)  # [(3 + S) * n]
    ret = episode_returns(state.params, cfg, dyn, k_run).reshape(len(groups), n).mean(-1)
    in_dist = ret[0] if cfg.randomize else ret[1]
    out = {"eval/box": ret[0], "eval/nominal": ret[1], "eval/target": ret[2],
           "eval/in_dist": in_dist, "eval/gap": in_dist - ret[2]}
    out.update({f"sweep/{i:02d}": ret[3 + i] for i in range(len(cfg.sweep_values))})
    return out


# --- PLOT ---


def plot_sweep(curves, cfg: Config, out: str):
    """Return vs the swept hidden parameter (mean over seeds +- std), one line per
    (evaluate() output, label); the training range is shaded, the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.asarray(cfg.sweep_values)
    for final, label in curves:
        keys = sorted(k for k in final if k.startswith("sweep/"))
        y = np.stack([np.asarray(final[k]) for k in keys], -1).reshape(-1, len(keys))
        m, s = y.mean(0), y.std(0)
        ax.plot(x, m, marker="o", label=f"{label} ({y.shape[0]} seeds)")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    lo, hi = ((0, cfg.max_delay) if cfg.sweep == "delay" else (0, cfg.obs_noise)
              if cfg.sweep == "obs_noise" else getattr(cfg, f"{cfg.sweep}_range"))
    ax.axvspan(lo, hi, color="gray", alpha=0.15, label="randomized in training")
    ax.axvline(getattr(cfg, f"target_{cfg.sweep}"), color="red", ls="--", label="target")
    ax.set_xlabel(f"hidden {cfg.sweep} " + ("(control steps)" if cfg.sweep == "delay" else
                                            "(std)" if cfg.sweep == "obs_noise" else "(x nominal)"))
    ax.set_ylabel(f"return on {cfg.env_id}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def _label(cfg: dict) -> str:
    return f"{cfg['policy'].upper()}, {'' if cfg['randomize'] else 'not '}randomized"


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (return vs the swept hidden parameter) and
    `--compare RUN_DIR` (also draw an earlier run's sweep, from its summary.json)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    out, other = flags["--plot"], flags["--compare"]
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__,
                   summary_keys=["eval/in_dist", "eval/target", "eval/gap", "eval/box",
                                 "eval/nominal", "charts/episodic_return"])
    if out is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        curves = [(res.final, _label(dataclasses.asdict(cfg)))]
        if other is not None:
            summary = json.loads((Path(other) / "summary.json").read_text())
            record = json.loads((Path(other) / "config.json").read_text())["config"]
            curves.append((summary, _label(record)))
        print("wrote", plot_sweep(curves, cfg, out))
    return res


if __name__ == "__main__":
    main()
