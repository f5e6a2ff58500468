"""NEC: Neural Episodic Control, a learned embedding read through a differentiable dictionary.

[1] A. Pritzel, B. Uria, S. Srinivasan, A. Puigdomenech Badia, O. Vinyals, D. Hassabis,
    D. Wierstra, C. Blundell. "Neural Episodic Control." ICML 2017, arXiv:1703.01988.
[2] L. Weng, "Meta Reinforcement Learning" (2019), section "Episodic Control".
No code by the authors is public; constants not re-read in [1]'s appendix were read in
Kaixhin/EC (main.py, models.py, README "Default options for NEC"; its author thanks A. Pritzel
for implementation details), the reimplementation named below wherever it decides.

An embedding network h = f(s) (a CNN on pixels, an MLP on vectors) and one differentiable
neural dictionary (DND) per action a, holding keys h_i, values Q_i (and, for the match test,
a hash of the observation each key came from):

    k(h, h_i) = 1 / (||h - h_i||^2 + delta)                             [1] the kernel
    w_i = k(h, h_i) / sum_j k(h, h_j),  Q(s, a) = sum_i w_i Q_i          [1] the DND lookup
        over the p nearest keys of DND_a (exact top-p here)
    Q^(N)(s_t, a_t) = sum_{j<N} gamma^j r_{t+j} + gamma^N max_a' Q(s_{t+N}, a')
                                                                  [1] the N-step estimate
    write (h_t, Q^(N)) to DND_{a_t}: a new state is appended (the least recently used entry
    replaced when full); a state already present takes the tabular step
        Q_i <- Q_i + alpha (Q^(N) - Q_i)                           [1] the tabular update
    L = (Q(s, a) - Q^(N)(s, a))^2 on minibatches of the replay D of (s_t, a_t, Q^(N)),
        minimised by RMSProp in f's weights AND in the keys and values of the DND entries
        the lookups read (a sparse RMSProp step per entry)                    [1] Sec. 3
    a_t is epsilon-greedy in Q(s_t, .) (ties at random).
(Equations are cited by name: their numbers in [1] were not re-read.)

Everything is fixed-size arrays in one pytree: the DND (A, C, F) keys, values, hashes, last
use and per-entry RMSProp moments; the replay; each env's current episode. k-NN is
`jax.lax.top_k` over all C keys of every action (one matmul per action), so the run is one
jitted scan, vmapped over seeds.

Reproduce (CPU demo, GridMaze-FourRooms as metarl/mfec.py's quick preset, 4 seeds; NEC,
then its broken variant with uniform kernel weights, both curves in one plot):
    python metarl/nec.py --preset quick --num-seeds 4 --kernel mean --run-dir runs/nec_mean
    python metarl/nec.py --preset quick --num-seeds 4 --plot metarl/nec.png \
        --compare runs/nec_mean
Paper setting (GPU; Atari through envpool, Ms. Pac-Man, 10M frames):
    python metarl/nec.py --preset paper
Ours (quick, lr 1e-4, 2-core CPU shared with other jobs: 59 s for 4 seeds of 16,000 steps,
compile cached; ~50 s more cold): NEC reaches the goal in 1.00 / 1.00 / 1.00 / 1.00 of 64
evaluation episodes (epsilon 0.05) on seeds 0-3, in 24.4 +- 2.3 steps (mean evaluation
episode length over the 4 seeds, an episode that misses the goal counted at 200; the
shortest path is 20); with uniform kernel weights 0 / 0 / 0.02 / 0 (200 steps): curves in
metarl/nec.png, the slow gate in tests/metarl/test_nec.py. A no-learning twin (no gradient
steps: random frozen embedding, DND changed by writes only) also reaches 1.00 on all 4 seeds,
in 28.2 steps: on this maze, where observation hashes match exactly, the tabular writes alone
solve the task, and the gradient steps only shorten the paths a little. At lr 1e-3 (the
former quick setting) NEC fell to 0.36 / 0.47 / 0.39 / 0.98: see PRESETS.
[1] Table 1 / Fig. 3 [M: not re-read]: NEC has the highest median human-normalised score
over 57 Atari games up to 10M frames (the data-efficient regime) against DQN, prioritised
DQN, A3C, Q*(lambda) and MFEC; a benchmark listing gives it as 54.6% [M: not checked in [1]].

Differences from the paper:
- Constants (key 128, p = 50, 5e5 entries per action, delta 1e-3, alpha 0.1, N = 100, gamma
  0.99, replay 1e5, batch 32, RMSProp lr 7.92e-6 with decay 0.95 and eps 0.01 inside the
  root, a training step every 4 agent steps from step 50,000, epsilon 1 -> 0.001 linearly
  over agent steps 5,000 to 25,000, 4 stacked 84x84 grey frames, unclipped rewards): read in
  Kaixhin/EC's NEC defaults, not re-read in [1]'s appendix ([M]). The quick preset anneals
  epsilon 1 -> 0.05 over its first 12,000 steps (see PRESETS for why).
- Exact top-p over the whole table instead of [1]'s approximate kd-tree search: exact on CPU
  and GPU at these sizes (one (C, F) x (F,) matmul per action and query).
- A state is "already present" when the 32-bit hash of its (stacked) observation is stored
  in the action's DND. Kaixhin/EC matches the ALE RAM (envs.py get_state_hash: an author's
  detail, not in [1]), never keys. On a match the key is also refreshed to the current
  embedding (Kaixhin/EC: the embedding may have moved).
- Every visit of an ended episode is written in order (a state visited twice takes two
  tabular steps); Kaixhin/EC's update_batch keeps only the highest-return visit of each hash
  per episode and action, then takes one tabular step.
- Atari runs with episodic_life=False (a life loss is no terminal); Kaixhin/EC treats a
  life loss as terminal in training.
- Writes happen when an episode ends (as Kaixhin/EC and rl_coach), not N steps after each
  step; Q^(N) bootstraps from max_a Q(s_{t+N}, a) as estimated when s_{t+N} was acted on.
  The last N steps of an episode take the Monte-Carlo return, also when the episode was cut
  at `max_episode_steps` (no bootstrap there).
- Replay rows are written when the step is taken and become trainable (their target set)
  when the episode ends; a sampled row without a target has weight 0 in the loss.
- `num_steps` vector-env steps are taken, then steps_per_update / replay_period gradient
  steps: the network and DND are updated after each rollout, not between its steps.
- LRU: an entry is used when written or read as one of the p neighbours while acting or
  training (Kaixhin/EC). An entry replaced by a new state has its RMSProp moments zeroed.
- Sparse RMSProp: an entry read by several rows of a minibatch takes one step with the sum
  of their gradients (its gradient in the loss); Kaixhin/EC keeps the first occurrence's
  gradient, and its README notes that its key/value updates are not applied (a bug) yet
  still reproduces [1]'s results.
- `--kernel mean` (w_i = 1/p) is the broken variant the tests reject; an action whose DND
  holds fewer than p entries weighs those it has; an empty DND estimates 0, with a zero
  gradient (the normalisation divides by 1 there, not by a clamped sum).
Metrics: charts/episodic_return is the mean return of the episodes that ended in the update
(NaN where none ended; charts/episodes counts them), charts/reward_per_step the mean reward
of its env steps, charts/q_mean the mean Q(s_t, a_t) of the actions taken, charts/epsilon the
exploration rate at its end, charts/dnd_fill the fraction of the DND in use; losses/q_loss
the mean squared error of its gradient steps (0 before `learning_starts`).
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import envs, plot, run
from common.dqn import linear_schedule
from common.nets import orthogonal

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """NEC; defaults: [1]'s Atari setting through envpool (constants as Kaixhin/EC)."""

    env_id: str = "MsPacman-v5"
    """environment id (envpool Atari *-v5, GridMaze-FourRooms, gymnax, navix)"""
    max_episode_steps: int = 27_000
    """longest episode in agent steps (Atari: 108k frames); also the episode buffer length"""
    total_timesteps: int = 2_500_000
    """agent steps of the whole run over all envs (10M Atari frames at frame skip 4)"""
    num_envs: int = 1
    """parallel environments sharing one network, DND and replay"""
    num_steps: int = 100
    """vector-env steps per update (one logged row), then the update's gradient steps"""
    capacity: int = 500_000
    """entries per action DND (the LRU cache size)"""
    key_dim: int = 128
    """size of the embedding h = f(s), the DND keys"""
    hidden: tuple[int, ...] = (64,)
    """vector observations: hidden sizes of the MLP embedding (pixels: DQN's conv torso)"""
    obs_scale: float = 1.0
    """vector observations: factor applied before the MLP (sets the keys' spread against delta)"""
    num_neighbours: int = 50
    """p: nearest keys each lookup weighs"""
    delta: float = 1e-3
    """delta of the kernel k(h, h_i) = 1 / (||h - h_i||^2 + delta)"""
    alpha: float = 0.1
    """tabular learning rate of a write to a state already in the DND"""
    n_step: int = 100
    """N of the N-step Q estimate"""
    gamma: float = 0.99
    """discount"""
    lr: float = 7.92e-6
    """RMSProp learning rate of the embedding and of the DND keys and values"""
    rmsprop_decay: float = 0.95
    """RMSProp decay of the squared-gradient average"""
    rmsprop_eps: float = 0.01
    """RMSProp epsilon (inside the square root)"""
    batch_size: int = 32
    """replay minibatch size"""
    replay_size: int = 100_000
    """replay rows (s_t, a_t, Q^(N)); at least num_envs * max_episode_steps"""
    replay_period: int = 4
    """agent steps per gradient step"""
    learning_starts: int = 50_000
    """agent steps before the first gradient step"""
    epsilon: float = 0.001
    """final probability of a uniform random action"""
    epsilon_start: float = 1.0
    """epsilon before the anneal"""
    epsilon_decay_begin: int = 5_000
    """agent step at which the linear anneal starts"""
    epsilon_decay_steps: int = 20_000
    """agent steps of the linear anneal to `epsilon` (0: constant `epsilon`)"""
    kernel: str = "inverse"
    """inverse ([1] Eq. 2) or mean (broken variant: uniform weights 1/p)"""
    eval_envs: int = 16
    """evaluate(): episodes played from the final network and DND with the final epsilon"""
    dtype: str = "float32"
    """compute dtype of the embedding network and the distance matmuls: float32 or bfloat16
    (bfloat16 also ranks the k-NN candidates by a bfloat16 cross term: near-ties may swap)"""

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def train_steps(self) -> int:
        return self.steps_per_update // self.replay_period

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    def validate(self):
        for name, allowed in (("kernel", ("inverse", "mean")), ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        for name in ("max_episode_steps", "capacity", "key_dim", "n_step", "replay_period",
                     "eval_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden={self.hidden} sizes must be >= 1")
        if self.num_neighbours > self.capacity:
            raise ValueError(f"num_neighbours={self.num_neighbours} must be <= capacity="
                             f"{self.capacity}")
        for name in ("delta", "obs_scale", "rmsprop_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} must be in (0, 1]")
        for name in ("epsilon", "epsilon_start", "rmsprop_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("learning_starts", "epsilon_decay_begin",
                     "epsilon_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.replay_size < self.num_envs * self.max_episode_steps:
            raise ValueError(f"replay_size={self.replay_size} must be >= num_envs * "
                             f"max_episode_steps = {self.num_envs * self.max_episode_steps} "
                             "(an episode's rows must outlive it)")
        if self.steps_per_update % self.replay_period:
            raise ValueError(f"num_envs * num_steps = {self.steps_per_update} must be divisible"
                             f" by replay_period={self.replay_period}")
        envs.check_id(self.env_id)
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_envs * num_steps = {self.steps_per_update})")


PRESETS = {
    # CPU demo: mfec.py's quick setting (FourRooms, goal 20 steps away, 200-step episodes,
    # 2 envs, 16,000 steps, 100 entries per action); an 8-d key from a 64-unit MLP on the
    # (row, col) observation, lr 1e-4, 100 gradient steps per update. lr 1e-4, not 1e-3:
    # with the summed-gradient sparse RMSProp, 1e-3 moves the stored keys and values so fast
    # that NEC fell to 0.36 / 0.47 / 0.39 / 0.98 eval success on seeds 0-3 (below a twin
    # with no gradient steps, 1.00 x4); 1e-4 gives 1.00 x4, 1e-5 0.00 / 1.00 / 1.00 / 1.00
    # ([1]'s 7.92e-6 is slower still: its gradient steps barely move in 16,000 steps).
    # Epsilon 1 -> 0.05
    # linearly over the first 12,000 steps: with a constant 0.05 (mfec.py's choice) a seed's
    # first success makes every Q slightly positive, greedy turns deterministic and loops
    # against a wall, and half the seeds never reach the goal again (2 of 4 seeds learn; with
    # N = 10, 3 of 8). Annealed over 8,000 steps: 6 of 8; over 12,000 steps: 6 of 8, and all
    # 8 reach the goal 222-370 times in training (these epsilon counts at lr 1e-3, before the
    # LRU and summed-gradient fixes). p = 50 and N = 100 are the paper's.
    "quick": dict(env_id="GridMaze-FourRooms", max_episode_steps=200, num_envs=2,
                  num_steps=200, total_timesteps=16_000, capacity=100, key_dim=8,
                  obs_scale=10.0, lr=1e-4, replay_size=4_000, learning_starts=400, epsilon=0.05,
                  epsilon_decay_begin=0, epsilon_decay_steps=12_000, eval_envs=64),
    "paper": dict(),
}


def make_env(cfg: Config, num_envs: int):
    if cfg.is_atari:  # 4 stacked grey 84x84 frames, frame skip 4, raw score
        return envs.make(cfg.env_id, num_envs, stack_num=4, episodic_life=False,
                         reward_clip=False, max_episode_steps=cfg.max_episode_steps)
    if cfg.env_id.startswith(("GridMaze-", "Navix-")):
        return envs.make(cfg.env_id, num_envs, max_steps=cfg.max_episode_steps)
    return envs.make(cfg.env_id, num_envs)


# --- NETWORKS ---


class Embedding(nn.Module):
    """h = f(s): DQN's conv torso then a linear key layer on pixels (Kaixhin/EC), an MLP then
    a linear key layer on vectors."""

    key_dim: int
    hidden: tuple[int, ...]
    obs_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs):
        if obs.dtype == jnp.uint8:  # envpool frames (N, 4, 84, 84) -> (N, 84, 84, 4)
            x = jnp.moveaxis(obs, -3, -1).astype(self.dtype) / 255.0
            for ch, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                x = nn.relu(nn.Conv(ch, (k, k), (s, s), padding="VALID", dtype=self.dtype,
                                    kernel_init=orthogonal())(x))
            x = x.reshape(x.shape[0], -1)  # (N, 7 * 7 * 64)
        else:
            x = obs.reshape(obs.shape[0], -1).astype(self.dtype) * self.obs_scale
            for f in self.hidden:
                x = nn.relu(nn.Dense(f, dtype=self.dtype, kernel_init=orthogonal())(x))
        return nn.Dense(self.key_dim, dtype=self.dtype, kernel_init=orthogonal(1.0))(x) \
            .astype(jnp.float32)  # (N, F)


def obs_hash(obs, coef):
    """32-bit hash of each observation (N, ...) -> (N,) uint32: the bits of every entry times
    a fixed random odd multiplier, summed modulo 2^32 (equal observations, equal hashes)."""
    x = obs.reshape(obs.shape[0], -1)
    bits = x.astype(jnp.uint32) if x.dtype == jnp.uint8 else \
        jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return (bits * coef).sum(-1, dtype=jnp.uint32)


# --- DND (one differentiable neural dictionary per action) ---


@struct.dataclass
class DND:
    keys: jax.Array  # (A, C, F) h_i
    values: jax.Array  # (A, C) Q_i
    hashes: jax.Array  # (A, C) uint32 hash of the observation each key came from
    last_used: jax.Array  # (A, C) int32 LRU clock of the last write or read
    size: jax.Array  # (A,) int32 entries in use (slots 0..size-1)
    key_ms: jax.Array  # (A, C, F) RMSProp mean square of the key gradients
    value_ms: jax.Array  # (A, C) RMSProp mean square of the value gradients


def dnd_init(num_actions: int, capacity: int, key_dim: int) -> DND:
    a, c = num_actions, capacity
    return DND(jnp.zeros((a, c, key_dim)), jnp.zeros((a, c)), jnp.zeros((a, c), jnp.uint32),
               jnp.zeros((a, c), jnp.int32), jnp.zeros((a,), jnp.int32),
               jnp.zeros((a, c, key_dim)), jnp.zeros((a, c)))


def knn(keys, size, queries, p: int, dtype=jnp.float32):
    """Indices (N, p) of the p nearest of the first `size` keys (C, F) to each query (N, F),
    nearest first, and valid (N, p) (false where the DND holds fewer than p entries). Exact
    top-p of |q|^2 - 2 q.k + |k|^2 (not [1]'s kd-tree); no gradient."""
    queries, keys = jax.lax.stop_gradient(queries), jax.lax.stop_gradient(keys)
    cross = jnp.dot(queries.astype(dtype), keys.T.astype(dtype)).astype(jnp.float32)  # (N, C)
    d2 = (queries ** 2).sum(-1, keepdims=True) - 2 * cross + (keys ** 2).sum(-1)[None]
    d2 = jnp.where(jnp.arange(keys.shape[0])[None] < size, d2, jnp.inf)
    _, idx = jax.lax.top_k(-d2, p)  # (N, p)
    return idx, jnp.broadcast_to(jnp.arange(p) < size, idx.shape)


def kernel_weights(h, nbr_keys, valid, delta: float, mean):
    """[1] Eq. (2): w_i = k(h, h_i) / sum_j k(h, h_j), k = 1 / (||h - h_i||^2 + delta), over
    the valid neighbours; `mean` (broken variant, traced bool): w_i = 1 / #valid.
    h (N, F), nbr_keys (N, p, F), valid (N, p) -> (N, p), differentiable in h and the keys."""
    d2 = ((h[:, None] - nbr_keys) ** 2).sum(-1)  # (N, p)
    k = jnp.where(valid, jnp.where(mean, 1.0, 1.0 / (d2 + delta)), 0.0)
    total = k.sum(-1, keepdims=True)  # (N, 1), 0 only where the DND is empty
    # an empty DND weighs nothing (Q = 0) with a zero gradient: divide by 1 there, never by
    # a clamp such as max(total, 1e-30), whose derivative 1 / 1e-60 overflows and turns the
    # zero cotangent into NaN (it did, through the embedding, on the first gradient steps)
    return jnp.where(total > 0, k / jnp.where(total > 0, total, 1.0), 0.0)


def q_values(dnd: DND, h, p: int, delta: float, mean, dtype=jnp.float32):
    """[1] Eq. (1) for every action: Q (N, A), and the neighbours read: idx, valid (A, N, p)."""

    def one(keys, values, size):
        idx, valid = knn(keys, size, h, p, dtype)
        return (kernel_weights(h, keys[idx], valid, delta, mean) * values[idx]).sum(-1), idx, \
            valid

    q, idx, valid = jax.vmap(one)(dnd.keys, dnd.values, dnd.size)  # (A, N), (A, N, p) x2
    return q.T, idx, valid


def touch(dnd: DND, idx, valid, now) -> DND:
    """Mark the neighbours read (idx, valid (A, N, p)) used at time `now` (LRU)."""
    a = jnp.broadcast_to(jnp.arange(idx.shape[0])[:, None, None], idx.shape)
    return dnd.replace(last_used=dnd.last_used.at[a, idx].max(jnp.where(valid, now, 0)))


def write(dnd: DND, key, hsh, action, target, now, alpha: float) -> DND:
    """Write (h, Q^(N)) to DND_action: the tabular step [1] Eq. (4) (and the fresh key) where
    the observation's hash is stored, else append, or replace the least recently used entry
    of a full DND (its RMSProp moments zeroed)."""
    a = action
    stored = (dnd.hashes[a] == hsh) & (jnp.arange(dnd.hashes.shape[1]) < dnd.size[a])  # (C,)
    hit = stored.any()
    full = dnd.size[a] >= dnd.hashes.shape[1]
    slot = jnp.where(hit, jnp.argmax(stored),
                     jnp.where(full, jnp.argmin(dnd.last_used[a]), dnd.size[a]))
    old = dnd.values[a, slot]
    value = jnp.where(hit, old + alpha * (target - old), target)  # [1] Eq. (4) or new entry
    return DND(dnd.keys.at[a, slot].set(key), dnd.values.at[a, slot].set(value),
               dnd.hashes.at[a, slot].set(hsh), dnd.last_used.at[a, slot].set(now),
               dnd.size.at[a].add(jnp.where(hit | full, 0, 1)),
               dnd.key_ms.at[a, slot].multiply(jnp.where(hit, 1.0, 0.0)),
               dnd.value_ms.at[a, slot].multiply(jnp.where(hit, 1.0, 0.0)))


def n_step_targets(rewards, vmax, length, gamma: float, n: int):
    """[1] Eq. (3) for every step t < length of one episode (rewards, vmax (L,)):
    Q^(N)_t = sum_{j<N} gamma^j r_{t+j} + gamma^N vmax_{t+N} where t + N < length, else the
    discounted return to the episode's end. vmax_t = max_a Q(s_t, a) when s_t was acted on."""
    steps = rewards.shape[0]
    t = jnp.arange(steps)
    r = jnp.where(t < length, rewards, 0.0)
    disc = gamma ** jnp.arange(n, dtype=jnp.float32)  # (N,) gamma^j
    window = jnp.convolve(r, disc[::-1], mode="full")[n - 1:n - 1 + steps]  # (L,) sum_j<N
    boot = jnp.where(t + n < length, jnp.pad(vmax, (0, n))[n:n + steps], 0.0)
    return window + gamma ** n * boot


# --- STATE ---


@struct.dataclass
class Replay:
    obs: jax.Array  # (R, ...) s_t
    action: jax.Array  # (R,) int32
    target: jax.Array  # (R,) Q^(N)(s_t, a_t), set when the episode ends
    ready: jax.Array  # (R,) bool: the target is set
    pos: jax.Array  # int32 next row written
    size: jax.Array  # int32 rows written, at most R


@struct.dataclass
class Hyper:
    epsilon: jax.Array  # float32 final epsilon
    mean_kernel: jax.Array  # bool: broken variant (uniform weights)
    learn: jax.Array  # bool: take gradient steps (False: the tests' no-learning twin, whose
    # embedding stays at its random init and whose DND changes by writes only)


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    dnd: DND
    replay: Replay
    hash_coef: jax.Array  # (D,) uint32 odd multipliers of obs_hash
    env_state: Any
    obs: jax.Array  # (N, ...) next observation
    ep_keys: jax.Array  # (N, L, F) h_t of each env's current episode
    ep_hash: jax.Array  # (N, L) uint32
    ep_actions: jax.Array  # (N, L) int32
    ep_rewards: jax.Array  # (N, L)
    ep_vmax: jax.Array  # (N, L) max_a Q(s_t, a) at acting time
    ep_slot: jax.Array  # (N, L) int32 replay row of each step
    ep_len: jax.Array  # (N,) int32
    time: jax.Array  # int32 vector-env steps so far (the LRU clock)
    key: jax.Array
    hyper: Hyper


def network(cfg: Config) -> Embedding:
    return Embedding(cfg.key_dim, cfg.hidden, cfg.obs_scale, jnp.dtype(cfg.dtype))


def optimizer(cfg: Config):
    return optax.rmsprop(cfg.lr, decay=cfg.rmsprop_decay, eps=cfg.rmsprop_eps, eps_in_sqrt=True)


def init(key, cfg: Config) -> State:
    env = make_env(cfg, cfg.num_envs)
    k_net, k_hash, k_env, key = jax.random.split(key, 4)
    obs, env_state = env.reset(k_env)
    params = network(cfg).init(k_net, obs)
    n, length, d = cfg.num_envs, cfg.max_episode_steps, int(np.prod(env.observation_shape))
    coef = jax.random.bits(k_hash, (d,), jnp.uint32) | jnp.uint32(1)
    r = cfg.replay_size
    replay = Replay(jnp.zeros((r, *obs.shape[1:]), obs.dtype), jnp.zeros((r,), jnp.int32),
                    jnp.zeros((r,)), jnp.zeros((r,), bool), jnp.zeros((), jnp.int32),
                    jnp.zeros((), jnp.int32))
    zeros = jnp.zeros((n, length))
    return State(params, optimizer(cfg).init(params),
                 dnd_init(env.num_actions, cfg.capacity, cfg.key_dim), replay, coef,
                 env_state, obs, jnp.zeros((n, length, cfg.key_dim)),
                 jnp.zeros((n, length), jnp.uint32), jnp.zeros((n, length), jnp.int32), zeros,
                 zeros, jnp.zeros((n, length), jnp.int32), jnp.zeros((n,), jnp.int32),
                 jnp.zeros((), jnp.int32), key,
                 Hyper(jnp.asarray(cfg.epsilon, jnp.float32), jnp.asarray(cfg.kernel == "mean"),
                       jnp.asarray(True)))


# --- ROLLOUT ---


def act(key, q, epsilon):
    """Greedy in q (N, A) with ties broken uniformly; a uniform action with prob. epsilon."""
    k_tie, k_explore, k_rand = jax.random.split(key, 3)
    greedy = jax.random.categorical(k_tie, jnp.where(q >= q.max(-1, keepdims=True), 0.0, -jnp.inf))
    explore = jax.random.uniform(k_explore, greedy.shape) < epsilon
    return jnp.where(explore, jax.random.randint(k_rand, greedy.shape, 0, q.shape[-1]), greedy)


def flush(dnd: DND, replay_target, replay_ready, s: State, ended, now, cfg: Config):
    """For every episode that ended (ended (N,) bool): its N-step targets, written env by env
    and step by step into the DND, and set as the targets of its replay rows. Under vmap (the
    runner's seeds) it runs seed after seed (`sequential_vmap`), so each seed's loops and
    conds stay unbatched and skip the envs whose episode goes on."""

    @jax.custom_batching.sequential_vmap
    def run_flush(dnd, replay_target, replay_ready, ep_keys, ep_hash, ep_actions, ep_rewards,
                  ep_vmax, ep_slot, ep_len, ended, now):
        def per_env(i, carry):
            def episode(carry):
                dnd, tgt, ready = carry
                q_n = n_step_targets(ep_rewards[i], ep_vmax[i], ep_len[i], cfg.gamma, cfg.n_step)
                rows = jnp.where(jnp.arange(q_n.shape[0]) < ep_len[i], ep_slot[i], tgt.shape[0])
                tgt, ready = tgt.at[rows].set(q_n, mode="drop"), ready.at[rows].set(True,
                                                                                    mode="drop")

                def body(t, dnd):
                    return write(dnd, ep_keys[i, t], ep_hash[i, t], ep_actions[i, t], q_n[t],
                                 now, cfg.alpha)

                return jax.lax.fori_loop(0, ep_len[i], body, dnd), tgt, ready

            return jax.lax.cond(ended[i], episode, lambda c: c, carry)

        return jax.lax.fori_loop(0, ep_len.shape[0], per_env, (dnd, replay_target, replay_ready))

    return run_flush(dnd, replay_target, replay_ready, s.ep_keys, s.ep_hash, s.ep_actions,
                     s.ep_rewards, s.ep_vmax, s.ep_slot, s.ep_len, ended,
                     jnp.asarray(now, jnp.int32))


def epsilon_at(s: State, cfg: Config):
    """Linear from epsilon_start to the final epsilon (the state's: a test may set it per
    seed) over agent steps [epsilon_decay_begin, + epsilon_decay_steps]; then constant."""
    if cfg.epsilon_decay_steps == 0:
        return s.hyper.epsilon
    return linear_schedule(s.time * cfg.num_envs, cfg.epsilon_start, s.hyper.epsilon,
                           cfg.epsilon_decay_steps, cfg.epsilon_decay_begin)


def env_step(s: State, cfg: Config, env, k):
    """One vector-env step: embed, look up, act, step, store (episode + replay); flush."""
    k_act, k_env = jax.random.split(k)
    now = s.time + 1
    dtype = jnp.dtype(cfg.dtype)
    h = network(cfg).apply(s.params, s.obs)  # (N, F)
    q, idx, valid = q_values(s.dnd, h, cfg.num_neighbours, cfg.delta, s.hyper.mean_kernel, dtype)
    dnd = touch(s.dnd, idx, valid, now)
    eps = epsilon_at(s, cfg)
    action = act(k_act, q, eps)
    obs, env_state, reward, done, info = env.step(s.env_state, action, k_env)
    n, rep = jnp.arange(h.shape[0]), s.replay
    rows = (rep.pos + n) % rep.action.shape[0]
    rep = rep.replace(obs=rep.obs.at[rows].set(s.obs), action=rep.action.at[rows].set(action),
                      ready=rep.ready.at[rows].set(False), pos=(rows[-1] + 1) % rep.action.shape[0],
                      size=jnp.minimum(rep.size + h.shape[0], rep.action.shape[0]))
    t = s.ep_len
    s = s.replace(ep_keys=s.ep_keys.at[n, t].set(h),
                  ep_hash=s.ep_hash.at[n, t].set(obs_hash(s.obs, s.hash_coef)),
                  ep_actions=s.ep_actions.at[n, t].set(action),
                  ep_rewards=s.ep_rewards.at[n, t].set(reward),
                  ep_vmax=s.ep_vmax.at[n, t].set(q.max(-1)), ep_slot=s.ep_slot.at[n, t].set(rows),
                  ep_len=t + 1)
    ended = done | (s.ep_len >= cfg.max_episode_steps)
    dnd, target, ready = flush(dnd, rep.target, rep.ready, s, ended, now, cfg)
    out = dict(ret=info["returned_episode_return"], ended=info["returned_episode"],
               q=jnp.take_along_axis(q, action[:, None], -1)[:, 0], reward=reward, eps=eps)
    return s.replace(dnd=dnd, replay=rep.replace(target=target, ready=ready), obs=obs,
                     env_state=env_state, time=now, ep_len=jnp.where(ended, 0, s.ep_len)), out


# --- UPDATE ---


def loss_fn(params, nbr_keys, nbr_values, valid, obs, target, weight, mean, cfg: Config):
    """Squared error of Q(s, a) = sum_i w_i Q_i ([1] Eq. 1) against Q^(N), differentiable in
    the embedding's params and in the neighbours' keys (B, p, F) and values (B, p)."""
    h = network(cfg).apply(params, obs)  # (B, F)
    q = (kernel_weights(h, nbr_keys, valid, cfg.delta, mean) * nbr_values).sum(-1)  # (B,)
    return (weight * (q - target) ** 2).sum() / jnp.maximum(weight.sum(), 1.0)


def sparse_rmsprop(dnd: DND, a, idx, g_keys, g_values, on, cfg: Config) -> DND:
    """One RMSProp step on each entry read (a (B, 1), idx (B, p)), only where `on` (B, p):
    the valid neighbours of an active step (a slot past the DND's size is never touched).
    An entry read by several rows takes ONE step with the sum G of its pairs' gradients
    g_keys (B, p, F), g_values (B, p) (its gradient in the loss):
        ms <- rho ms + (1 - rho) G^2,  x <- x - lr G / sqrt(ms + eps)
    G is summed by a fixed-order matmul over the pairs and every pair of an entry writes the
    same new value with .set, so duplicates give the same bits in any scatter order (GPU
    scatter-adds of duplicates are not ordered)."""
    flat = (a * dnd.values.shape[1] + idx).reshape(-1)  # (B p,) entry of each pair
    same = ((flat[:, None] == flat[None]) & on.reshape(-1)[None]).astype(jnp.float32)

    def step(param, ms, g):
        g = jnp.dot(same, g.reshape(flat.shape[0], -1), precision="highest").reshape(g.shape)
        ms_new = cfg.rmsprop_decay * ms[a, idx] + (1 - cfg.rmsprop_decay) * g ** 2
        new = param[a, idx] - cfg.lr * g / jnp.sqrt(ms_new + cfg.rmsprop_eps)
        skip = jnp.where(on, idx, param.shape[1])  # off pairs point past the table: dropped
        return param.at[a, skip].set(new, mode="drop"), ms.at[a, skip].set(ms_new, mode="drop")

    keys, key_ms = step(dnd.keys, dnd.key_ms, g_keys)
    values, value_ms = step(dnd.values, dnd.value_ms, g_values)
    return dnd.replace(keys=keys, values=values, key_ms=key_ms, value_ms=value_ms)


def train_step(s: State, k, cfg: Config):
    """One minibatch of the replay: the embedding by RMSProp (optax), the keys and values of
    the DND entries read by a sparse RMSProp step ([1] Sec. 3)."""
    rep = s.replay
    rows = jax.random.randint(k, (cfg.batch_size,), 0, jnp.maximum(rep.size, 1))
    obs, a, target = rep.obs[rows], rep.action[rows], rep.target[rows]
    weight = rep.ready[rows].astype(jnp.float32)
    h = network(cfg).apply(s.params, obs)
    _, idx, valid = q_values(s.dnd, h, cfg.num_neighbours, cfg.delta, s.hyper.mean_kernel,
                             jnp.dtype(cfg.dtype))  # (A, B, p)
    b = jnp.arange(cfg.batch_size)
    idx, valid = idx[a, b], valid[a, b]  # (B, p) of the action taken
    a_col = a[:, None]
    loss, (g_params, g_keys, g_values) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(
        s.params, s.dnd.keys[a_col, idx], s.dnd.values[a_col, idx], valid, obs, target, weight,
        s.hyper.mean_kernel, cfg)
    active = (s.time * cfg.num_envs >= cfg.learning_starts) & (weight.sum() > 0) & s.hyper.learn
    updates, opt_state = optimizer(cfg).update(g_params, s.opt_state, s.params)
    params = optax.apply_updates(s.params, updates)
    keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(active, x, y), new, old)  # noqa: E731
    on = valid & active
    dnd = sparse_rmsprop(s.dnd, a_col, idx, g_keys, g_values, on, cfg)
    # LRU: the entries read in DND_a of each row's own action a (max: duplicates commute)
    dnd = dnd.replace(last_used=dnd.last_used.at[a_col, idx].max(jnp.where(on, s.time, 0)))
    return s.replace(params=keep(params, s.params), opt_state=keep(opt_state, s.opt_state),
                     dnd=dnd), loss * active


def update(state: State, cfg: Config):
    env = make_env(cfg, cfg.num_envs)
    key, k_roll, k_train = jax.random.split(state.key, 3)
    state, traj = jax.lax.scan(lambda s, k: env_step(s, cfg, env, k), state,
                               jax.random.split(k_roll, cfg.num_steps))  # leaves (T, N)
    state, losses = jax.lax.scan(lambda s, k: train_step(s, k, cfg), state,
                                 jax.random.split(k_train, cfg.train_steps))
    n_ended = traj["ended"].sum()
    metrics = {
        # 0 when none ended, which the runner logs as NaN
        "charts/episodic_return": (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1),
        "charts/episodes": n_ended,
        "charts/reward_per_step": traj["reward"].mean(),
        "charts/q_mean": traj["q"].mean(),
        "charts/epsilon": traj["eps"][-1],
        "charts/dnd_fill": state.dnd.size.sum() / state.dnd.values.size,
        "losses/q_loss": losses.mean(),
    }
    return state.replace(key=key), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """`eval_envs` fresh episodes acted from the final network and DND (the final epsilon,
    no writes): `eval_return` the mean return of each env's first episode, `eval_length` its
    mean length (max_episode_steps when it did not end)."""
    env = make_env(cfg, cfg.eval_envs)
    k_env, k_roll = jax.random.split(jax.random.fold_in(state.key, 1))
    obs, env_state = env.reset(k_env)

    def step(carry, k):
        obs, env_state, alive, ret, length = carry
        k_act, k_env = jax.random.split(k)
        h = network(cfg).apply(state.params, obs)
        q, _, _ = q_values(state.dnd, h, cfg.num_neighbours, cfg.delta, state.hyper.mean_kernel,
                           jnp.dtype(cfg.dtype))
        action = act(k_act, q, state.hyper.epsilon)
        obs, env_state, reward, done, _ = env.step(env_state, action, k_env)
        return (obs, env_state, alive & ~done, ret + reward * alive, length + alive), None

    zeros = jnp.zeros(cfg.eval_envs)
    carry = (obs, env_state, jnp.ones(cfg.eval_envs, bool), zeros, zeros)
    (_, _, _, ret, length), _ = jax.lax.scan(step, carry,
                                             jax.random.split(k_roll, cfg.max_episode_steps))
    return {"eval_return": ret.mean(), "eval_length": length.mean()}


# --- PLOT ---


def _label(record: dict) -> str:
    return "NEC" + (" (uniform kernel weights)" if record["config"]["kernel"] == "mean" else "")


def plot_curves(run_dirs, out: str, window: int = 5):
    """charts/episodic_return against env steps, one curve (mean +- std over seeds) per run."""
    return plot.plot(run_dirs, "charts/episodic_return", out, window, labels=_label,
                     xlabel="env steps (all envs)",
                     ylabel=f"episodic return (moving mean of {window} updates)")


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the learning curve of this run) and
    `--compare RUN_DIR` (also draw an earlier run's curve, e.g. the broken variant)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["eval_return", "eval_length",
                                              "charts/episodic_return", "charts/dnd_fill"])
    if flags["--plot"] is not None:
        dirs = [res.run_dir] + ([flags["--compare"]] if flags["--compare"] else [])
        print("wrote", plot_curves(dirs, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
