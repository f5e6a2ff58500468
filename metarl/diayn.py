"""DIAYN: skills without a reward, by soft actor-critic on a discriminator's pseudo-reward.

[1] B. Eysenbach, A. Gupta, J. Ibarz, S. Levine. "Diversity is All You Need: Learning Skills
    without a Reward Function." ICLR 2019, arXiv:1802.06070. Released code:
    github.com/ben-eysenbach/sac (sac/algos/diayn.py, examples/mujoco_all_diayn.py, commit
    2116fc3), read for the defaults below.
[2] T. Haarnoja, A. Zhou, P. Abbeel, S. Levine. "Soft Actor-Critic." arXiv:1801.01290
    (Eq. (21): the tanh change of variables).
[3] T. Haarnoja et al. "Soft Actor-Critic Algorithms and Applications." arXiv:1812.05905:
    twin critics, target Q-networks; Eq. (3)/(5)/(7) are the soft value, critic and policy
    objectives. The equation numbers of [2] and [3] are from memory [M] (not re-checked).

A skill is a latent z ~ p(z), a fixed uniform categorical over K skills, drawn once per
episode; the policy pi(a | s, z) sees the one-hot z beside the state. A discriminator
q_phi(z | s) guesses the skill from a state (never from actions) and the policy is paid for
states that give its skill away, under maximum entropy:

    F(theta) = I(S; Z) + H[A | S] - I(A; Z | S)
             = H[A | S, Z] - H[Z | S] + H[Z]                               [1] Eq. (1)-(2)
             >= H[A | S, Z] + E_{z ~ p(z), s ~ pi(z)}[log q_phi(z | s) - log p(z)]  [1] Eq. (3)
    r_z(s') = log q_phi(z | s') - log p(z),  log p(z) = -log K      [1] Sec. 3.2, Alg. 1
    min_phi  E[-log q_phi(z | s')]   (cross-entropy on visited states)           [1] Alg. 1
    SAC with a fixed entropy scale alpha (the paper's 0.1) on r_z:
      y = r_z + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a' | s', z)),
          a' ~ pi(. | s', z)                                       [3] Eq. (3)/(5) [M]
      J_pi = E[alpha log pi(a | s, z) - min_i Q_i(s, a, z)],  a = tanh(u) ~ pi  [3] Eq. (7) [M]
      log pi(a) = log N(u; mu, sigma) - sum log(1 - tanh(u)^2)             [2] Eq. (21) [M]
      Q'_i <- (1 - tau) Q'_i + tau Q_i                                  Polyak averaging

Reproduce (CPU demo: the 2-D point mass, 8 skills; trajectories per skill in the PNG):
    python metarl/diayn.py --preset quick --num-seeds 4 --plot metarl/diayn.png
    python metarl/diayn.py --preset quick --num-seeds 4 --reward-variant zero   # broken
Paper setting (GPU; brax HalfCheetah, 50 skills, 10M steps, the released hyperparameters):
    python metarl/diayn.py --preset paper
Ours (quick: 8 skills, 64k steps, 4 seeds; 2-core CPU shared with other jobs, 96 s compile +
152 s): discriminator accuracy on the final states of 8 held-out episodes per skill 1.00 on
every seed (on all states 0.999), spread of the skills' mean end points 1.49 +- 0.04 (box
width 2; random actions 0.18), 211 +- 6 of 400 grid cells visited (random actions 155 +- 9);
metarl/diayn.png shows the 8 skills fanning out to the box's edges.
The broken variant, pseudo-reward 0 (same run otherwise): accuracy 0.12 +- 0.03 (chance
0.125), spread 0.19 +- 0.05, 148 +- 9 cells: a max-entropy random walk.
[1] reports no number for the 2-D task (its skills are shown as pictures) [M]; on
HalfCheetah it reports qualitative skills (running forward and backward, flipping) and, in
Fig. 4 [M], that some skill reaches a task reward it never saw.

Differences from the paper:
- SAC: [1] (and its code) train SAC v1 ([2] 2018a): one Q-network, a state-value network V
  with a target V (tau 0.01), and a Gaussian-mixture policy (K = 4 components, reg 1e-3).
  Here, as the issue asks, SAC's later form [3]: twin Q-networks, target Q-networks updated by
  Polyak averaging (tau 0.01), no V-network, a tanh-Gaussian policy (log std clipped to
  [-20, 2]); the entropy scale alpha stays fixed at [1]'s 0.1 (no automatic tuning).
- The pseudo-reward uses s_{t+1}, as [1] Alg. 1; the released code scores s_t (the
  transition's first state) and trains the discriminator on s_t; here on s_{t+1}. Both
  relabel the reward with the current discriminator when a batch is sampled.
- The released code adds 1e-6 inside log p(z); here log p(z) = -log K exactly.
- The skill: [1] Alg. 1 draws z once per episode, and so do we; the released code
  (sac/algos/diayn.py, `_sample_z` in the epoch loop) draws it once per 1000-step epoch and
  keeps it across the episodes that end inside the epoch.
- `num_envs` parallel envs per update and `grad_steps` gradient steps per update (the
  released code: 1 env, 1 gradient step per env step; the paper preset keeps that). All
  three networks take their gradient step from the same parameters (the released code
  runs its training ops in one session call); the discriminator learns at the same rate.
- Environment of the CPU demo: a pure-JAX point mass in the box [-1, 1]^2, starting at the
  centre, pos' = clip(pos + max_speed a, -1, 1), a in [-1, 1]^2, no termination: the 2-D
  navigation toy of [1] in spirit; its exact box, speed and horizon are ours. The quick
  preset departs from the released 'point' variant (32 units, 100 steps, 50 skills, lr
  3e-4) to fit a 2-core CPU: 8 skills, 64 units, 30-step episodes, lr 1e-3, 16 envs.
- Paper preset: brax HalfCheetah (generalized pipeline, 17-d observation) instead of
  MuJoCo's HalfCheetah-v1 (gym, 17-d as well); replay 1e7 as the released half-cheetah
  variant, min pool 1000 (= max path length) before the first update.
- `--reward-variant zero|shuffled` are broken variants for the ablation (pseudo-reward 0;
  pseudo-reward of another transition's skill), not in [1]. They replace the catalog's
  "policy ignores z" variant (one-hot zeroed), which is not built.
- Not built from the catalog entry: SAC for discrete actions (only continuous actions here).
- evaluate(): per skill, `eval_episodes` fresh episodes with the stochastic policy:
  `final_accuracy` (discriminator argmax on the last state equals z), `state_accuracy`
  (over every state after the start, t = 1..T, of all the episodes), and on the point mass
  only: `distinct_cells` (cells of a coverage_grid^2 grid over [-1, 1]^2 visited by all
  skills' states) and `spread` (mean pairwise distance between the skills' mean final
  positions), the same two for uniform random actions under `random/`. On brax these
  geometry metrics are not reported (a fixed [-1, 1]^2 box means nothing for a cheetah's
  x); only the two accuracies are.
"""

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.dqn import Replay, replay_add, replay_init, replay_sample
from common.plot import save_png

# --- CONFIG ---

VARIANTS = ("diayn", "zero", "shuffled")
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
BRAX_BACKENDS = ("generalized", "positional", "spring", "mjx")


@dataclass(frozen=True)
class Config:
    """DIAYN on SAC; defaults are the released code's half-cheetah variant ([1] code)."""

    env_id: str = "brax/halfcheetah"
    """PointMass2D (the pure-JAX 2-D box of the CPU demo) or brax/<name> (halfcheetah, ant)"""
    num_skills: int = 50
    """K: skills, z ~ uniform categorical over K, fixed for an episode"""
    total_timesteps: int = 10_000_000
    """environment steps (10,000 epochs x 1000 steps in the released code)"""
    num_envs: int = 1
    """parallel environments (each update steps every env once)"""
    episode_length: int = 1000
    """steps per episode (max_path_length); the skill is redrawn after each episode"""
    grad_steps: int = 1
    """SAC + discriminator gradient steps per update (n_train_repeat per env step)"""
    lr: float = 3e-4
    """Adam learning rate of the policy, the critics and the discriminator"""
    alpha: float = 0.1
    """fixed entropy scale (scale_entropy in the released code; [1] alpha = 0.1)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.01
    """Polyak rate of the target critics"""
    batch_size: int = 128
    """transitions per gradient step"""
    buffer_size: int = 10_000_000
    """replay capacity in transitions (max_pool_size; 1e7 for half-cheetah)"""
    learning_starts: int = 1000
    """transitions stored before the first gradient step (min_pool_size)"""
    hidden: tuple[int, ...] = (300, 300)
    """hidden layer sizes of the policy, each critic and the discriminator (layer_size)"""
    reward_variant: str = "diayn"
    """pseudo-reward: diayn (Eq. 3), or the broken zero or shuffled (another sample's z)"""
    max_speed: float = 0.1
    """PointMass2D only: displacement per step at |a| = 1 (the box is [-1, 1]^2)"""
    brax_backend: str = "generalized"
    """brax only: physics pipeline (generalized, positional, spring or mjx)"""
    eval_episodes: int = 8
    """evaluate(): fresh episodes per skill"""
    coverage_grid: int = 20
    """evaluate(), PointMass2D only: side of the grid over [-1, 1]^2 whose cells are counted"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.num_envs

    @property
    def steps_per_update(self) -> int:
        return self.num_envs

    @property
    def replay_rows(self) -> int:
        return max(self.buffer_size // self.num_envs, 2)

    @property
    def start_rows(self) -> int:
        return max(-(-self.learning_starts // self.num_envs), 2)

    def validate(self):
        if self.env_id != "PointMass2D" and not self.env_id.startswith("brax/"):
            raise ValueError(f"env_id={self.env_id!r} must be PointMass2D or brax/<name>")
        if self.env_id.startswith("brax/"):
            from common.envs import check_id

            check_id(self.env_id)
            if self.brax_backend not in BRAX_BACKENDS:
                raise ValueError(f"brax_backend={self.brax_backend!r} must be one of "
                                 f"{BRAX_BACKENDS}")
        if self.reward_variant not in VARIANTS:
            raise ValueError(f"reward_variant={self.reward_variant!r} must be one of {VARIANTS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("num_skills", "episode_length", "grad_steps", "eval_episodes",
                     "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_skills < 2:
            raise ValueError(f"num_skills={self.num_skills} must be >= 2")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be sizes >= 1")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau={self.tau} must be in (0, 1]")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1)")
        if self.max_speed <= 0:
            raise ValueError(f"max_speed={self.max_speed} must be > 0")
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts={self.learning_starts} must be >= 0")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_envs={self.num_envs})")
        if self.buffer_size < self.num_envs:
            raise ValueError(f"buffer_size={self.buffer_size} must be >= num_envs="
                             f"{self.num_envs} (one row of transitions)")
        if self.learning_starts > self.total_timesteps:
            raise ValueError(f"learning_starts={self.learning_starts} must be <= "
                             f"total_timesteps={self.total_timesteps} (else nothing is learnt)")
        if self.replay_rows < self.start_rows:
            raise ValueError(f"buffer_size={self.buffer_size} must hold learning_starts="
                             f"{self.learning_starts} transitions (replay rows {self.replay_rows}"
                             f" < start rows {self.start_rows}: learning would never start)")


PRESETS = {
    # CPU demo: the 2-D point mass, 8 skills, 30-step episodes; 4 seeds took 96 s compile +
    # 152 s on a loaded 2-core CPU (the docstring's run).
    "quick": dict(env_id="PointMass2D", num_skills=8, total_timesteps=64_000, num_envs=16,
                  episode_length=30, grad_steps=2, lr=1e-3, hidden=(64, 64),
                  buffer_size=100_000, learning_starts=1000),
    "paper": dict(),
}


# --- ENVIRONMENT ---


@functools.cache
def brax_env(name: str, backend: str):
    from brax import envs as brax_envs

    with jax.ensure_compile_time_eval():
        return brax_envs.get_environment(name, backend=backend)


@functools.cache
def env_spec(cfg: Config) -> tuple[int, int]:
    """(observation size, action size)."""
    if cfg.env_id == "PointMass2D":
        return 2, 2
    env = brax_env(cfg.env_id[len("brax/"):], cfg.brax_backend)
    obs = jax.eval_shape(env.reset, jax.random.PRNGKey(0)).obs  # brax's property runs it
    return int(obs.shape[-1]), int(env.action_size)


def env_reset(cfg: Config, key, n: int):
    """(obs [n, D], env state) of n fresh episodes."""
    if cfg.env_id == "PointMass2D":
        pos = jnp.zeros((n, 2))  # the centre of the box
        return pos, pos
    state = jax.vmap(brax_env(cfg.env_id[5:], cfg.brax_backend).reset)(jax.random.split(key, n))
    return state.obs, state


def env_step(cfg: Config, inner, action):
    """(next obs [n, D], env state, terminated [n]); never resets."""
    if cfg.env_id == "PointMass2D":
        pos = jnp.clip(inner + cfg.max_speed * action, -1.0, 1.0)
        return pos, pos, jnp.zeros(pos.shape[0], bool)
    state = jax.vmap(brax_env(cfg.env_id[5:], cfg.brax_backend).step)(inner, action)
    return state.obs, state, state.done > 0.5


def position(cfg: Config, inner):
    """x-y position [n, 2]: the point, or brax's first body (the torso)."""
    return inner if cfg.env_id == "PointMass2D" else inner.pipeline_state.x.pos[:, 0, :2]


def select(mask, a, b):
    """Per-env choice between two pytrees with leaves [n, ...]."""
    return jax.tree.map(lambda x, y: jnp.where(mask.reshape(-1, *[1] * (x.ndim - 1)), x, y),
                        a, b)


# --- NETWORKS ---


def mlp(x, hidden, dtype):
    for h in hidden:
        x = nn.relu(nn.Dense(h, dtype=dtype, param_dtype=jnp.float32)(x))
    return x


class Actor(nn.Module):
    """pi(a | s, z): tanh-Gaussian; returns (mean, log std) of the pre-tanh Gaussian."""

    action_dim: int
    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs, z_onehot):
        x = mlp(jnp.concatenate([obs, z_onehot], -1), self.hidden, self.dtype)
        mean = nn.Dense(self.action_dim, dtype=self.dtype)(x).astype(jnp.float32)
        log_std = nn.Dense(self.action_dim, dtype=self.dtype)(x).astype(jnp.float32)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class TwinQ(nn.Module):
    """Q_1, Q_2 (s, z, a) -> [2, B]."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs, z_onehot, action):
        x = jnp.concatenate([obs, z_onehot, action], -1)
        twin = nn.vmap(QHead, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, axis_size=2)
        return twin(self.hidden, self.dtype)(x)


class QHead(nn.Module):
    """One critic: MLP -> Q [B]."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(1, dtype=self.dtype)(mlp(x, self.hidden, self.dtype))[..., 0]
        return q.astype(jnp.float32)


class Discriminator(nn.Module):
    """q_phi(z | s): logits over the K skills from the state alone (include_actions=False)."""

    num_skills: int
    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs):
        x = mlp(obs, self.hidden, self.dtype)
        return nn.Dense(self.num_skills, dtype=self.dtype)(x).astype(jnp.float32)


def networks(cfg: Config):
    _, act = env_spec(cfg)
    dt = jnp.dtype(cfg.dtype)
    return (Actor(act, cfg.hidden, dt), TwinQ(cfg.hidden, dt),
            Discriminator(cfg.num_skills, cfg.hidden, dt))


# --- LOSS ---


def tanh_gaussian_log_prob(u, mean, log_std):
    """[2] Eq. (21): log pi(a) of a = tanh(u), u ~ N(mean, exp(log_std)) (diagonal):
    sum_i log N(u_i) - log(1 - tanh(u_i)^2), with log(1 - tanh(u)^2) written stably as
    2 (log 2 - u - softplus(-2u))."""
    z = (u - mean) * jnp.exp(-log_std)
    log_n = -0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return (log_n - log_det).sum(-1)


def sample_action(key, mean, log_std):
    """a = tanh(mean + std eps) and its log-probability (reparameterised)."""
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return jnp.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)


def pseudo_reward(logits, z, num_skills: int):
    """[1] Sec. 3.2: r = log q_phi(z | s') - log p(z), p(z) = 1 / K; logits [..., K]."""
    log_q = jnp.take_along_axis(jax.nn.log_softmax(logits), z[..., None], -1)[..., 0]
    return log_q + jnp.log(num_skills)


def soft_target(reward, terminated, q_next, logp_next, gamma, alpha):
    """[3] Eq. (3)/(5) [M], twin form:
    y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s'))
    with q_next [2, B] from the target critics; no gradient flows into it."""
    v_next = q_next.min(0) - alpha * logp_next
    return jax.lax.stop_gradient(reward + gamma * (1.0 - terminated) * v_next)


def polyak(target, online, tau):
    """theta' <- (1 - tau) theta' + tau theta."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


def discriminator_loss(logits, z):
    """[1] Alg. 1: cross-entropy -log q_phi(z | s') averaged over the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, z).mean()


# --- STATE ---


@struct.dataclass
class State:
    params: dict  # actor, critic, target, disc
    opt_state: dict  # actor, critic, disc
    replay: Replay
    env_state: Any
    obs: jax.Array  # [N, D]
    z: jax.Array  # [N] int32 skill of each env's episode
    time: jax.Array  # [N] int32 steps into the episode
    key: jax.Array
    variant: jax.Array  # int32 index into VARIANTS, traced (the ablation runs in one program)


def optimizer(cfg: Config):
    return optax.adam(cfg.lr)


def init(key, cfg: Config) -> State:
    actor, critic, disc = networks(cfg)
    _, act = env_spec(cfg)
    k_env, k_z, k_a, k_c, k_d, key = jax.random.split(key, 6)
    obs, env_state = env_reset(cfg, k_env, cfg.num_envs)
    z = jax.random.randint(k_z, (cfg.num_envs,), 0, cfg.num_skills)
    zh, a = jax.nn.one_hot(z, cfg.num_skills), jnp.zeros((cfg.num_envs, act))
    params = {"actor": actor.init(k_a, obs, zh), "critic": critic.init(k_c, obs, zh, a),
              "disc": disc.init(k_d, obs)}
    params["target"] = params["critic"]
    tx = optimizer(cfg)
    opt_state = {k: tx.init(params[k]) for k in ("actor", "critic", "disc")}
    row = dict(obs=obs, z=z, action=a, next_obs=obs, terminated=jnp.zeros(cfg.num_envs, bool))
    return State(params, opt_state, replay_init(row, cfg.replay_rows), env_state, obs, z,
                 jnp.zeros(cfg.num_envs, jnp.int32), key,
                 jnp.asarray(VARIANTS.index(cfg.reward_variant), jnp.int32))


# --- UPDATE ---


def losses(params, batch, key, variant, cfg: Config):
    """The three losses of one gradient step on a replay batch, all from the same params.
    Returns (total, metrics); each loss reaches its own network's params only."""
    actor, critic, disc = networks(cfg)
    k_next, k_pi, k_shuf = jax.random.split(key, 3)
    zh = jax.nn.one_hot(batch["z"], cfg.num_skills)
    # Reward relabelled with the current discriminator; no gradient into it from the critic.
    logits = disc.apply(params["disc"], batch["next_obs"])
    r_diayn = pseudo_reward(jax.lax.stop_gradient(logits), batch["z"], cfg.num_skills)
    r_shuf = pseudo_reward(jax.lax.stop_gradient(logits),
                           jax.random.permutation(k_shuf, batch["z"]), cfg.num_skills)
    reward = jnp.select([variant == 0, variant == 1], [r_diayn, jnp.zeros_like(r_diayn)], r_shuf)
    # Critic: soft Bellman target from the target critics and a fresh a' ~ pi(. | s', z).
    # pi at s (for the actor loss) and at s' (for the target) in one pass: [2, B, A]
    mean, log_std = actor.apply(params["actor"], jnp.stack([batch["obs"], batch["next_obs"]]),
                                jnp.stack([zh, zh]))
    a2, logp2 = sample_action(k_next, jax.lax.stop_gradient(mean[1]),
                              jax.lax.stop_gradient(log_std[1]))
    q_next = critic.apply(params["target"], batch["next_obs"], zh, a2)
    y = soft_target(reward, batch["terminated"].astype(jnp.float32), q_next, logp2, cfg.gamma,
                    cfg.alpha)
    q = critic.apply(params["critic"], batch["obs"], zh, batch["action"])
    critic_loss = 0.5 * ((q - y[None]) ** 2).mean(-1).sum()
    # Actor: E[alpha log pi - min Q] through the critics, whose params it does not move.
    a, logp = sample_action(k_pi, mean[0], log_std[0])
    q_pi = critic.apply(jax.lax.stop_gradient(params["critic"]), batch["obs"], zh, a).min(0)
    actor_loss = (cfg.alpha * logp - q_pi).mean()
    disc_loss = discriminator_loss(logits, batch["z"])
    metrics = {"losses/critic": critic_loss, "losses/actor": actor_loss,
               "losses/discriminator": disc_loss, "charts/pseudo_reward": r_diayn.mean(),
               "charts/reward_used": reward.mean(), "charts/q": q.mean(),
               "charts/entropy": -logp.mean(),
               "charts/disc_accuracy": (logits.argmax(-1) == batch["z"]).mean()}
    return critic_loss + actor_loss + disc_loss, metrics


def gradient_step(params, opt_state, replay, key, variant, cfg: Config):
    """One SAC + discriminator step on a uniform replay batch, then the Polyak update."""
    k_batch, k_loss = jax.random.split(key)
    batch, _ = replay_sample(replay, k_batch, cfg.batch_size)
    grads, metrics = jax.grad(losses, has_aux=True)(params, batch, k_loss, variant, cfg)
    tx = optimizer(cfg)
    new = dict(params)
    new_opt = {}
    for k in ("actor", "critic", "disc"):
        upd, new_opt[k] = tx.update(grads[k], opt_state[k], params[k])
        new[k] = optax.apply_updates(params[k], upd)
    new["target"] = polyak(params["target"], new["critic"], cfg.tau)
    return new, new_opt, metrics


def update(state: State, cfg: Config):
    actor, _, _ = networks(cfg)
    key, k_act, k_reset, k_z, k_grad = jax.random.split(state.key, 5)
    # --- ACT --- one step of every env with its episode's skill
    zh = jax.nn.one_hot(state.z, cfg.num_skills)
    action, _ = sample_action(k_act, *actor.apply(state.params["actor"], state.obs, zh))
    next_obs, env_state, terminated = env_step(cfg, state.env_state, action)
    replay = replay_add(state.replay, dict(obs=state.obs, z=state.z, action=action,
                                           next_obs=next_obs, terminated=terminated))
    time = state.time + 1
    done = terminated | (time >= cfg.episode_length)
    # A finished episode restarts with a new skill z ~ p(z) ([1] Alg. 1).
    obs_r, env_r = env_reset(cfg, k_reset, cfg.num_envs)
    z_r = jax.random.randint(k_z, (cfg.num_envs,), 0, cfg.num_skills)
    obs = jnp.where(done[:, None], obs_r, next_obs)
    env_state = select(done, env_r, env_state)
    z = jnp.where(done, z_r, state.z)
    time = jnp.where(done, 0, time)

    # --- LEARN --- grad_steps steps once learning_starts transitions are stored
    def step(carry, k):
        p, o = carry
        p, o, m = gradient_step(p, o, replay, k, state.variant, cfg)
        return (p, o), m

    (params, opt_state), metrics = jax.lax.scan(
        step, (state.params, state.opt_state), jax.random.split(k_grad, cfg.grad_steps))
    ready = replay.size >= cfg.start_rows
    params, opt_state = jax.tree.map(lambda n, o: jnp.where(ready, n, o),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics = jax.tree.map(lambda m: jnp.where(ready, m[-1], 0.0), metrics)
    metrics["charts/episodes"] = done.sum()
    return State(params, opt_state, replay, env_state, obs, z, time, key, state.variant), metrics


# --- EVALUATE ---


def skill_rollouts(params, cfg: Config, key, random_actions=False):
    """eval_episodes fresh episodes of every skill with the stochastic policy (or uniform
    random actions). Returns states [T + 1, K * E, D] and x-y positions [T + 1, K * E, 2]
    (t = 0 the start); episodes are skill-major: column k * E + e is skill k."""
    actor, _, _ = networks(cfg)
    n = cfg.num_skills * cfg.eval_episodes
    z = jnp.repeat(jnp.arange(cfg.num_skills), cfg.eval_episodes)
    zh = jax.nn.one_hot(z, cfg.num_skills)
    k_reset, k_roll = jax.random.split(key)
    obs, env_state = env_reset(cfg, k_reset, n)

    def step(carry, k):
        obs, env_state = carry
        if random_actions:
            a = jax.random.uniform(k, (n, env_spec(cfg)[1]), minval=-1.0, maxval=1.0)
        else:
            a, _ = sample_action(k, *actor.apply(params["actor"], obs, zh))
        obs, env_state, _ = env_step(cfg, env_state, a)
        return (obs, env_state), (obs, position(cfg, env_state))

    _, (states, pos) = jax.lax.scan(step, (obs, env_state),
                                    jax.random.split(k_roll, cfg.episode_length))
    return (jnp.concatenate([obs[None], states]),
            jnp.concatenate([position(cfg, env_state)[None], pos]))


def distinct_cells(pos, grid: int):
    """Cells of a grid x grid partition of [-1, 1]^2 holding any of the positions [..., 2]."""
    cell = jnp.clip(jnp.floor((pos + 1.0) / 2.0 * grid), 0, grid - 1).astype(jnp.int32)
    idx = (cell[..., 0] * grid + cell[..., 1]).reshape(-1)
    return jnp.zeros(grid * grid, bool).at[idx].set(True).sum()


def spread(final_pos, num_skills: int):
    """Mean pairwise distance between the skills' mean final positions ([K * E, 2] in)."""
    centres = final_pos.reshape(num_skills, -1, 2).mean(1)
    d = jnp.linalg.norm(centres[:, None] - centres[None], axis=-1)
    return d.sum() / (num_skills * (num_skills - 1))


def evaluate(state: State, cfg: Config):
    """Held-out episodes of each skill (see the module docstring for the metrics)."""
    _, _, disc = networks(cfg)
    k_skill, k_rand = jax.random.split(jax.random.fold_in(state.key, 7))
    states, pos = skill_rollouts(state.params, cfg, k_skill)
    z = jnp.repeat(jnp.arange(cfg.num_skills), cfg.eval_episodes)
    guess = disc.apply(state.params["disc"], states).argmax(-1)  # [T + 1, K * E]
    out = {"final_accuracy": (guess[-1] == z).mean(),
           "state_accuracy": (guess[1:] == z).mean()}
    if cfg.env_id == "PointMass2D":  # the [-1, 1]^2 geometry holds for the point mass only
        _, rpos = skill_rollouts(state.params, cfg, k_rand, random_actions=True)
        out.update({"distinct_cells": distinct_cells(pos, cfg.coverage_grid),
                    "spread": spread(pos[-1], cfg.num_skills),
                    "random/distinct_cells": distinct_cells(rpos, cfg.coverage_grid),
                    "random/spread": spread(rpos[-1], cfg.num_skills)})
    return out


# --- PLOT ---


def plot_skills(state: State, cfg: Config, out: str, seed: int = 0):
    """Trajectories of every skill (one colour each) in the box, like [1]'s 2-D pictures,
    beside uniform random actions; `state` holds a seed axis, `seed` picks one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = jax.tree.map(lambda x: x[seed], state)
    roll = jax.jit(skill_rollouts, static_argnums=(1, 3))
    key = jax.random.fold_in(one.key, 7)
    panels = [("DIAYN skills", roll(one.params, cfg, key, False)[1]),
              ("uniform random actions", roll(one.params, cfg, key, True)[1])]
    colours = plt.get_cmap("tab10" if cfg.num_skills <= 10 else "hsv")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, (title, pos) in zip(axes, panels, strict=True):
        pos = np.asarray(pos).reshape(pos.shape[0], cfg.num_skills, cfg.eval_episodes, 2)
        for k in range(cfg.num_skills):
            c = colours(k % 10 if cfg.num_skills <= 10 else k / cfg.num_skills)
            for e in range(cfg.eval_episodes):
                ax.plot(pos[:, k, e, 0], pos[:, k, e, 1], color=c, lw=0.8, alpha=0.7,
                        label=f"z = {k}" if e == 0 and title.startswith("DIAYN") else None)
            ax.scatter(pos[-1, k, :, 0], pos[-1, k, :, 1], color=c, s=8)
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal", title=title)
    axes[0].legend(fontsize=6, loc="lower left", ncol=2)
    fig.suptitle(f"{cfg.env_id}: {cfg.eval_episodes} episodes of {cfg.episode_length} steps "
                 "per skill (seed 0)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the skills' trajectories of seed 0)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["final_accuracy", "state_accuracy",
                                              "distinct_cells", "spread", "random/distinct_cells",
                                              "random/spread", "losses/discriminator"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot_skills(res.state, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
