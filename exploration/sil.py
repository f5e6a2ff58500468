"""A2C (or PPO) + Self-Imitation Learning (SIL).

[1] J. Oh, Y. Guo, S. Singh, H. Lee. "Self-Imitation Learning." ICML 2018, arXiv:1806.05635.
    Released code: github.com/junhyukoh/self-imitation-learning (baselines/common/
    self_imitation.py, baselines/a2c/a2c_sil.py, baselines/a2c/run_atari_sil.py).

Every finished episode's Monte-Carlo return labels its own steps; the agent then imitates
the actions whose return beat its current value estimate, and only those:

    R_t = sum_{k>=t} gamma^{k-t} r_k   (to the end of the episode; at episode end)  [1] Alg. 1
    L^sil        = E_{s,a,R ~ D}[ L^sil_policy + beta^sil L^sil_value ]            [1] Eq. 1
    L^sil_policy = -log pi(a|s) (R - V(s))_+                                        [1] Eq. 2
    L^sil_value  = 1/2 || (R - V(s))_+ ||^2                                         [1] Eq. 3
    P(i) ~ p_i^alpha,  p_i = (R_i - V(s_i))_+ (new items: the largest p so far)     [1] Sec. 3
    IS weight w_i = (n P(i))^(-beta_IS) / max_j w_j   (prioritized replay's bias correction)

(.)_+ = max(., 0); the advantage is a constant weight in Eq. 2 (stop-gradient). Each on-policy
update (A2C, or PPO with `--algo ppo`) is followed by M = `sil_updates` SIL steps on
prioritized batches of `sil_batch_size` from the replay D, with the same optimiser [1] Alg. 1.

The replay holds whole episodes in fixed slots of `max_episode_steps` (pure JAX): each env
writes its running episode into a slot of its own; when the episode ends its returns are
computed, and, if it had a positive reward (the released code; `store_all_episodes` stores
every one, as [1] Alg. 1), the slot joins the stored ring and the env takes the ring's oldest
slot to write its next episode (an index swap; no copy).

Reproduce (CPU demo, the repo's four-rooms grid: start in one corner room, the only reward
in the opposite one; SIL against the same A2C with sil_updates = 0):
    python exploration/sil.py --preset quick --num-seeds 4
    python exploration/sil.py --preset quick --num-seeds 4 --sil-updates 0
    python exploration/sil.py --plot exploration/sil.png
Measured (2-core CPU, loaded; 40k steps, seeds 0-3): positive episodes A2C+SIL 127, 108,
154, 0 (median 117.5) against A2C 49, 1, 9, 0 (median 5) and the broken variant that
imitates r_t instead of the return 2, 1, 14, 0 (exploration/sil.png); the seed that never
reaches the goal gives SIL nothing to imitate. On DeepSea N = 6 (the test's setting, 4k steps, 12
seeds): median 393.5 against 11.5; with `--algo ppo` (4 seeds) 508 +- 44 against PPO's
463 +- 57 (PPO alone already solves N = 6 there).
Paper setting (GPU; Montezuma's Revenge through envpool, A2C+SIL, 16 envs x 5 steps):
    python exploration/sil.py --preset paper
[1] Table 1 / Fig. 3 [M]: A2C+SIL about 2,500 on Montezuma's Revenge at 50M frames, A2C 0.

Logged: the A2C/PPO losses (`losses/policy`, `losses/value`, `losses/entropy`), the SIL
terms of Eqs. 2-3 (`losses/sil_policy`, `losses/sil_value`; 0 while the replay is empty,
when the IS weights are 0), the fraction of sampled steps with R > V (`charts/sil_valid`),
the episodes stored (`charts/sil_episodes`), and the Coverage measures
(`charts/distinct_cells`, `charts/positive_episodes`). `charts/episodic_return` is NaN in an
update where no episode ended (the runner's NAN_UNLESS).

Differences from the paper:
- The replay keeps `buffer_size // max_episode_steps` whole episodes, each in a slot padded
  to the episode cap (22 episodes at the paper preset, 4,500-step episodes); the released
  code keeps 1e5 transitions of any number of episodes (more short episodes fit there).
- The losses are [1]'s Eqs. 1-3 averaged over the batch (IS-weighted). The released code
  also clips the advantage to [0, 1] and -log pi to 5, divides by max(#(R > V), 64) instead
  of the batch size, adds an entropy bonus of 0.01 on the SIL batch, and its value term
  has an extra factor 1/2 (gradient 0.5 beta (V - R)); none of these is used here.
- Stored episodes: those with a positive reward (released code), not all ([1] Alg. 1);
  `store_all_episodes` stores all. SIL starts as soon as one episode is stored (the
  released code waits for 100 transitions).
- The IS exponent 0.1 is the released run script's `--sil-beta` default (A2C).
- A2C: RMSProp (decay 0.99, eps 1e-5 inside the square root as TF's; optax starts the mean
  square at 0, TF at 1) with a constant learning rate (the released run script's default),
  n-step returns bootstrapped at the rollout's end; PPO uses Adam and GAE with
  per-minibatch normalised advantages.
- Rewards: sign-clipped for A2C and SIL as in the released Atari code (`sign_reward`); the
  CPU presets keep the raw reward. Atari through envpool with no sticky actions (gym's
  NoFrameskip-v4 in [1]), episodes capped at 18,000 frames.
- The `quick` CPU preset departs from the paper to fit a 2-core CPU: FourRooms with
  vector observations (MLPs), 100-step episodes, 16 envs x 5 steps, 40k steps, lr 1e-3,
  buffer of 64 episodes, SIL batch 128.
"""

from dataclasses import dataclass
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import envs, run
from common.nets import orthogonal
from common.rl import episode_metrics, gae, minibatch_epochs, ppo_loss, rollout

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """A2C+SIL; defaults are [1]'s Atari setting and the released code's A2C+SIL."""

    env_id: str = "MontezumaRevenge-v5"
    """environment id (envpool Atari, the repo's GridMaze-*, DeepSea-bsuite-<N>, navix, gymnax)"""
    algo: str = "a2c"
    """on-policy learner: a2c ([1] Atari) or ppo"""
    total_timesteps: int = 12_500_000
    """environment steps (50M frames at frame skip 4)"""
    num_envs: int = 16
    """parallel environments"""
    num_steps: int = 5
    """rollout length per on-policy update"""
    lr: float = 7e-4
    """learning rate (RMSProp for A2C, Adam for PPO), constant"""
    gamma: float = 0.99
    """discount of the A2C/PPO returns and of the SIL returns R"""
    ent_coef: float = 0.01
    """entropy bonus coefficient of the on-policy loss"""
    vf_coef: float = 0.5
    """value loss coefficient of the on-policy loss"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip of every step (on-policy and SIL)"""
    gae_lambda: float = 0.95
    """PPO only: GAE lambda (A2C uses n-step returns)"""
    num_epochs: int = 4
    """PPO only: optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO only: minibatches per epoch"""
    clip_coef: float = 0.2
    """PPO only: ratio clip epsilon"""
    sil_updates: int = 4
    """M: SIL steps per on-policy update (0: the plain A2C/PPO baseline)"""
    sil_batch_size: int = 512
    """transitions per SIL step"""
    sil_value_weight: float = 0.01
    """beta^sil: weight of the SIL value loss (Eq. 1)"""
    buffer_size: int = 100_000
    """replay capacity in transitions (whole episodes: buffer_size // max_episode_steps)"""
    priority_alpha: float = 0.6
    """prioritisation exponent alpha: P(i) ~ (R - V)_+^alpha"""
    priority_beta: float = 0.1
    """importance-sampling exponent of prioritized replay (0: no correction)"""
    store_all_episodes: bool = False
    """store every finished episode ([1] Alg. 1); default: those with a positive reward (code)"""
    sign_reward: bool = True
    """train A2C and SIL on sign(r) (the released Atari code)"""
    max_episode_steps: int = 4_500
    """episode cap in env steps (Atari: 18,000 frames); also the length of a replay slot"""
    sticky_action_prob: float = 0.0
    """Atari only: repeat the previous action with this probability (NoFrameskip-v4: 0)"""
    hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the actor and critic MLPs"""
    dtype: str = "float32"
    """compute dtype of the networks (float32 or bfloat16; params stay float32)"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (grid envs)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def buffer_episodes(self) -> int:
        return self.buffer_size // self.max_episode_steps

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    def validate(self):
        if self.algo not in ("a2c", "ppo"):
            raise ValueError(f"algo={self.algo!r} must be 'a2c' or 'ppo'")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")
        if self.algo == "ppo" and self.batch_size % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.batch_size} is not divisible by "
                             f"num_minibatches={self.num_minibatches}")
        if self.sil_updates < 0:
            raise ValueError(f"sil_updates={self.sil_updates} must be >= 0")
        if self.priority_alpha <= 0:
            raise ValueError(f"priority_alpha={self.priority_alpha} must be > 0")
        if not 0 <= self.priority_beta <= 1:
            raise ValueError(f"priority_beta={self.priority_beta} must be in [0, 1]")
        if self.buffer_episodes < self.num_envs:
            raise ValueError(
                f"buffer_size={self.buffer_size} holds {self.buffer_episodes} episodes of "
                f"max_episode_steps={self.max_episode_steps}; it must hold >= num_envs="
                f"{self.num_envs} (as many envs may end an episode on one step)")
        n = envs._deepsea_size(self.env_id)
        if n > self.max_episode_steps:
            raise ValueError(f"DeepSea-bsuite-{n} episodes last {n} steps: max_episode_steps="
                             f"{self.max_episode_steps} must be >= {n}")


PRESETS = {
    # CPU demo: the repo's four-rooms grid, reward 1 only at the goal in the far room.
    "quick": dict(env_id="GridMaze-FourRooms", total_timesteps=40_000, lr=1e-3,
                  max_episode_steps=100, buffer_size=6_400, sil_batch_size=128,
                  sign_reward=False),
    "paper": dict(),
}


def make_env(cfg: Config):
    """The batched env (episodes capped at max_episode_steps), wrapped by envs.Coverage."""
    if cfg.is_atari:
        env = envs.make(cfg.env_id, cfg.num_envs,
                        repeat_action_probability=cfg.sticky_action_prob,
                        max_episode_steps=cfg.max_episode_steps, episodic_life=False,
                        reward_clip=False)
    elif cfg.env_id.startswith(("GridMaze-", "Navix-")):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:  # DeepSea-bsuite-<N> (N steps) or a gymnax env with its own limit
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.is_atari)


def make_optimizer(cfg: Config):
    """One optimiser for the on-policy and the SIL steps (as the released code)."""
    opt = (optax.rmsprop(cfg.lr, decay=0.99, eps=1e-5) if cfg.algo == "a2c"
           else optax.adam(cfg.lr, eps=1e-5))
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)


# --- NETWORKS ---


class ActorCritic(nn.Module):
    """Pixels: the Nature CNN torso shared by the policy and value heads (baselines'
    CnnPolicy); vectors: separate actor and critic MLPs. Returns (logits, V) in float32."""

    num_actions: int
    pixels: bool
    hidden: tuple[int, ...] = (64, 64)
    dtype: Any = jnp.float32
    obs_ndim: int = 1

    @nn.compact
    def __call__(self, obs):
        dense = lambda f, s: nn.Dense(f, kernel_init=orthogonal(s), dtype=self.dtype)
        if self.pixels:  # envpool frames (..., 4, 84, 84) -> (..., 84, 84, 4)
            x = jnp.moveaxis(obs, -3, -1).astype(self.dtype) / 255.0
            for ch, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                x = nn.relu(nn.Conv(ch, (k, k), (s, s), padding="VALID", dtype=self.dtype,
                                    kernel_init=orthogonal())(x))
            x = x.reshape(*x.shape[:-3], -1)  # (..., 7*7*64)
            a = c = nn.relu(dense(512, 2**0.5)(x))
        else:
            x = obs.reshape(*obs.shape[:obs.ndim - self.obs_ndim], -1)  # (..., prod(obs))
            a = c = x.astype(self.dtype)
            for f in self.hidden:
                a, c = nn.tanh(dense(f, 2**0.5)(a)), nn.tanh(dense(f, 2**0.5)(c))
        logits = dense(self.num_actions, 0.01)(a).astype(jnp.float32)
        return logits, dense(1, 1.0)(c)[..., 0].astype(jnp.float32)


def network(cfg: Config, env) -> ActorCritic:
    pixels = cfg.is_atari and len(env.observation_shape) == 3
    return ActorCritic(env.num_actions, pixels, cfg.hidden, jnp.dtype(cfg.dtype),
                       len(env.observation_shape))


# --- REPLAY OF EPISODES ---


@struct.dataclass
class EpisodeBuffer:
    """Whole episodes in S = E + N slots of L = max_episode_steps; `writing[n]` is the slot
    env n fills now, `ring` the E stored slots (oldest at `head`)."""

    obs: jax.Array  # (S, L, *obs_shape)
    action: jax.Array  # (S, L) int32
    reward: jax.Array  # (S, L)
    ret: jax.Array  # (S, L) Monte-Carlo discounted return R_t, set at the episode's end
    length: jax.Array  # (S,) int32 steps written in each slot
    priority: jax.Array  # (S, L) p^alpha of each stored step; 0 where not sampleable
    writing: jax.Array  # (N,) int32
    ring: jax.Array  # (E,) int32
    head: jax.Array  # int32: the ring position the next stored episode takes
    max_priority: jax.Array  # the largest p seen (new episodes' priority), starts at 1
    stored: jax.Array  # int32 episodes stored since the start


def buffer_init(obs, num_envs: int, episodes: int, length: int) -> EpisodeBuffer:
    s = episodes + num_envs
    z = lambda *shape, dt=jnp.float32: jnp.zeros((s, length, *shape), dt)
    return EpisodeBuffer(z(*obs.shape[1:], dt=obs.dtype), z(dt=jnp.int32), z(), z(),
                         jnp.zeros(s, jnp.int32), z(), jnp.arange(num_envs, dtype=jnp.int32),
                         num_envs + jnp.arange(episodes, dtype=jnp.int32),
                         jnp.zeros((), jnp.int32), jnp.ones(()), jnp.zeros((), jnp.int32))


def discounted_returns(rewards, gamma):
    """R_t = r_t + gamma R_{t+1} over the last axis, R = 0 past the end ([1] Alg. 1).
    A parallel (associative) scan: log-depth in the episode length."""
    def combine(later, earlier):  # (g, x) segments: R_earlier = x_e + g_e R_later
        return earlier[0] * later[0], earlier[1] + earlier[0] * later[1]

    g = jnp.full_like(rewards, gamma)
    return jax.lax.associative_scan(combine, (g, rewards), reverse=True,
                                    axis=rewards.ndim - 1)[1]


def buffer_add(buf: EpisodeBuffer, obs, action, reward, done, *, gamma, alpha, store_all):
    """One vectorised env step (N transitions) into the envs' running episodes. Episodes
    that end here get their returns (Alg. 1); those with a positive reward (or all, with
    `store_all`) join the ring at priority max_priority^alpha, evicting the oldest."""
    n_slots, L = buf.reward.shape
    E = buf.ring.shape[0]
    slot = buf.writing
    t = jnp.minimum(buf.length[slot], L - 1)  # an over-long episode overwrites its last step
    obs_ = buf.obs.at[slot, t].set(obs.astype(buf.obs.dtype))
    act_ = buf.action.at[slot, t].set(action.astype(jnp.int32))
    rew_ = buf.reward.at[slot, t].set(reward)
    length = buf.length.at[slot].set(t + 1)
    inside = jnp.arange(L) < (t + 1)[:, None]  # (N, L) steps of each running episode
    r = jnp.where(inside, rew_[slot], 0.0)
    ret = buf.ret.at[slot].set(jnp.where(done[:, None], discounted_returns(r, gamma),
                                         buf.ret[slot]))
    store = done & (store_all | (r > 0).any(-1))
    prio = buf.priority.at[slot].set(jnp.where(
        store[:, None], jnp.where(inside, buf.max_priority**alpha, 0.0), buf.priority[slot]))
    # The k-th storing env swaps its slot with the ring's k-th oldest.
    k = jnp.cumsum(store) - 1
    pos = (buf.head + k) % E
    evicted = buf.ring[pos]
    prio = prio.at[jnp.where(store, evicted, n_slots)].set(0.0, mode="drop")
    ring = buf.ring.at[jnp.where(store, pos, E)].set(slot, mode="drop")
    writing = jnp.where(store, evicted, slot)
    length = length.at[writing].set(jnp.where(done, 0, length[writing]))
    n_new = store.sum(dtype=jnp.int32)
    return EpisodeBuffer(obs_, act_, rew_, ret, length, prio, writing, ring,
                         (buf.head + n_new) % E, buf.max_priority, buf.stored + n_new)


def buffer_sample(buf: EpisodeBuffer, key, batch: int, *, beta):
    """Draw `batch` stored steps with P(i) = p_i / sum_j p_j (inverse CDF); returns the flat
    indices (slot * L + t) and the IS weights (n P(i))^-beta / max_j (n P(j))^-beta."""
    p = buf.priority.reshape(-1)
    cdf = jnp.cumsum(p)
    u = jax.random.uniform(key, (batch,)) * cdf[-1]
    idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), p.size - 1)
    p_min = jnp.min(jnp.where(p > 0, p, jnp.inf))
    w = jnp.where(p[idx] > 0, (p[idx] / p_min) ** -beta, 0.0)  # (n P_i / n P_min)^-beta
    return idx, w  # an empty replay: weights 0 (and `sil_step` skips the step)


# --- LOSS ---


def sil_advantage(ret, value):
    """(R - V(s))_+ of [1] Eqs. 2-3: only returns above the value estimate are imitated."""
    return jnp.maximum(ret - value, 0.0)


def sil_loss(logp, value, ret, weight, beta_sil):
    """[1] Eqs. 1-3 on a batch: mean_i w_i [ -log pi(a_i|s_i) sg((R_i - V_i)_+)
    + beta_sil 1/2 (R_i - V_i)_+^2 ]. Returns (loss, (policy term, value term, adv))."""
    adv = sil_advantage(ret, value)
    policy = -(weight * logp * jax.lax.stop_gradient(adv)).mean()  # Eq. 2
    value_loss = 0.5 * (weight * adv**2).mean()  # Eq. 3
    return policy + beta_sil * value_loss, (policy, value_loss, adv)  # Eq. 1


def a2c_loss(logits, value, action, adv, ret, ent_coef, vf_coef):
    """A2C: -log pi(a|s) A - c_ent H(pi) + c_v 1/2 (R - V)^2 (baselines' a2c)."""
    pi = distrax.Categorical(logits=logits)
    pg = -(pi.log_prob(action) * adv).mean()
    v_loss = 0.5 * ((value - ret) ** 2).mean()
    ent = pi.entropy().mean()
    return pg - ent_coef * ent + vf_coef * v_loss, {
        "losses/policy": pg, "losses/value": v_loss, "losses/entropy": ent}


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    buffer: EpisodeBuffer
    key: jax.Array
    sil_on: jax.Array  # bool, traced: cfg.sil_updates > 0 (one program can run SIL and A2C)


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    k_net, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    params = network(cfg, env).init(k_net, obs)
    buf = buffer_init(obs, cfg.num_envs, cfg.buffer_episodes, cfg.max_episode_steps)
    return State(params, make_optimizer(cfg).init(params), env_state, obs, buf, key,
                 jnp.asarray(cfg.sil_updates > 0))


# --- UPDATE ---


def sil_step(params, opt_state, buf: EpisodeBuffer, key, on, cfg: Config, net, optimizer):
    """One SIL step ([1] Alg. 1): a prioritized batch, a gradient step on Eq. 1 (skipped
    while the replay is empty or `on` is false), and the sampled items' priorities set to
    (R - V)_+^alpha with V before the step (the released code)."""
    idx, w = buffer_sample(buf, key, cfg.sil_batch_size, beta=cfg.priority_beta)
    L = buf.reward.shape[1]
    obs = buf.obs.reshape(-1, *buf.obs.shape[2:])[idx]  # (B, *obs_shape)
    action, ret = buf.action.reshape(-1)[idx], buf.ret.reshape(-1)[idx]

    def loss_fn(p):
        logits, value = net.apply(p, obs)
        logp = distrax.Categorical(logits=logits).log_prob(action)
        return sil_loss(logp, value, ret, w, cfg.sil_value_weight)

    (_, (pol, val, adv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    ready = (buf.stored > 0) & on
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ready, a, b), new, old)
    params = keep(optax.apply_updates(params, updates), params)
    opt_state = keep(new_opt, opt_state)
    p = jnp.maximum(adv, 1e-6)  # released code: priorities floored at 1e-6
    prio = buf.priority.reshape(-1).at[idx].set(p**cfg.priority_alpha).reshape(-1, L)
    buf = buf.replace(priority=jnp.where(ready, prio, buf.priority),
                      max_priority=jnp.where(ready, jnp.maximum(buf.max_priority, p.max()),
                                             buf.max_priority))
    m = {"losses/sil_policy": pol, "losses/sil_value": val,
         "charts/sil_valid": (adv > 0).mean(), "charts/sil_adv": adv.mean()}
    return params, opt_state, buf, m


def update(state: State, cfg: Config):
    env = make_env(cfg)
    net, optimizer = network(cfg, env), make_optimizer(cfg)

    # --- ROLLOUT ---
    def act(obs, key):
        logits, value = net.apply(state.params, obs)
        pi = distrax.Categorical(logits=logits)
        action = pi.sample(seed=key)
        return action, dict(logp=pi.log_prob(action), value=value)

    (env_state, obs, key), traj = rollout(env, act, state.env_state, state.obs, state.key,
                                          cfg.num_steps)  # (T, N, ...)
    reward = jnp.sign(traj["reward"]) if cfg.sign_reward else traj["reward"]

    # --- EPISODES INTO THE REPLAY ---
    def add(buf, x):
        return buffer_add(buf, *x, gamma=cfg.gamma, alpha=cfg.priority_alpha,
                          store_all=cfg.store_all_episodes), None

    buf, _ = jax.lax.scan(add, state.buffer, (traj["obs"], traj["action"], reward,
                                               traj["done"]))

    # --- ON-POLICY UPDATE ---
    _, last_value = net.apply(state.params, obs)
    lam = 1.0 if cfg.algo == "a2c" else cfg.gae_lambda  # lambda = 1: n-step returns (A2C)
    adv, ret = gae(reward, traj["value"], traj["done"], last_value, cfg.gamma, lam)
    batch = dict(obs=traj["obs"], action=traj["action"], logp=traj["logp"],
                 value=traj["value"], adv=adv, ret=ret)
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # (T*N, ...)
    key, k_upd, k_sil = jax.random.split(key, 3)
    if cfg.algo == "a2c":
        def loss_fn(p):
            logits, value = net.apply(p, batch["obs"])
            return a2c_loss(logits, value, batch["action"], batch["adv"], batch["ret"],
                            cfg.ent_coef, cfg.vf_coef)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["losses/grad_norm"] = optax.tree.norm(grads)
    else:
        def loss_fn(p, mb):
            logits, value = net.apply(p, mb["obs"])
            pi = distrax.Categorical(logits=logits)
            a = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
            return ppo_loss(pi.log_prob(mb["action"]), mb["logp"], a, pi.entropy(), value,
                            mb["value"], mb["ret"], cfg.clip_coef, cfg.vf_coef, cfg.ent_coef,
                            clip_vloss=True)

        params, opt_state, metrics = minibatch_epochs(
            k_upd, state.params, state.opt_state, batch, loss_fn, optimizer, cfg.num_epochs,
            cfg.num_minibatches)

    # --- SIL UPDATES --- (M steps; none with sil_updates = 0, the plain learner)
    def sil(carry, k):
        p, o, b = carry
        p, o, b, m = sil_step(p, o, b, k, state.sil_on, cfg, net, optimizer)
        return (p, o, b), m

    (params, opt_state, buf), m_sil = jax.lax.scan(
        sil, (params, opt_state, buf), jax.random.split(k_sil, cfg.sil_updates))
    if cfg.sil_updates:
        metrics.update(jax.tree.map(jnp.mean, m_sil))

    metrics.update(episode_metrics(traj))  # the mean return is 0 (logged NaN) when none ended
    metrics["charts/sil_episodes"] = buf.stored
    metrics["charts/distinct_cells"] = env_state.visited.sum()
    metrics["charts/positive_episodes"] = env_state.positives
    return State(params, opt_state, env_state, obs, buf, key, state.sil_on), metrics


def evaluate(state: State, cfg: Config):
    """The package comparison's measures at the end of training (envs.Coverage)."""
    c = state.env_state
    return {"distinct_cells": c.visited.sum(), "positive_episodes": c.positives,
            "first_success": c.first_success}


# --- MAIN ---


def plot_runs(out: str, seeds: int = 4):
    """Positive episodes against env steps on the quick preset: A2C+SIL, A2C alone, and the
    broken variant whose replay labels each step with its own reward instead of the return
    to the episode's end (`discounted_returns` -> r, swapped in for its run only)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    global discounted_returns
    real = discounted_returns
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for color, label, m, returns in (
            ("C0", "A2C+SIL", 4, real), ("C1", "A2C (sil_updates=0)", 0, real),
            ("C2", "broken: SIL on r_t, not the return", 4, lambda r, gamma: r)):
        discounted_returns = returns
        c = Config(**{**PRESETS["quick"], "sil_updates": m})
        train = jax.jit(jax.vmap(run.make_train(init, update, c)))
        _, metrics = train(jax.random.split(jax.random.PRNGKey(0), seeds))
        pos = np.asarray(metrics["charts/positive_episodes"])  # (seeds, updates)
        steps = np.arange(1, pos.shape[1] + 1) * c.batch_size
        ax.plot(steps, np.median(pos, 0), color=color, label=label)
        ax.fill_between(steps, pos.min(0), pos.max(0), color=color, alpha=0.2)
        print(label, pos[:, -1])
    discounted_returns = real
    ax.set(xlabel="environment steps", ylabel="positive episodes (cumulative)",
           title=f"FourRooms, quick preset, {seeds} seeds (median, min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["positive_episodes", "distinct_cells",
                                               "charts/episodic_return", "charts/sil_episodes",
                                               "losses/sil_policy"])


if __name__ == "__main__":
    main()
