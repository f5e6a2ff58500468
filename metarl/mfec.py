"""MFEC: model-free episodic control, a table of the best returns ever seen, read by k-NN.

[1] C. Blundell, B. Uria, A. Pritzel, Y. Li, A. Ruderman, J. Z. Leibo, J. Rae, D. Wierstra,
    D. Hassabis. "Model-Free Episodic Control." arXiv:1606.04460 (2016).
[2] L. Weng, "Meta Reinforcement Learning" (2019), section "Episodic Control".
Reference code read for the constants (no code by the authors is public): Kaixhin/EC main.py
(its MFEC defaults, commented "for MFEC") and astier/model-free-episodic-control
(mfec/qec.py, main.py; a clean-up of ShibiHe's reimplementation).

One table per action a holds keys phi(s) (an embedding of the observation), values
Q_EC(s, a) and the time each entry was last used. With phi a fixed random projection:

    phi(o) = A o,  A_ij ~ N(0, 1) fixed, scaled by 1/sqrt(D) here, D = dim(o)   [1] Sec. 3 (F = 64)
    Q^(s, a) = Q_EC(s, a)                          if phi(s) is in table a      [1] Eq. (2)
             = 1/k sum_{i=1..k} Q_EC(s^(i), a)     else, s^(i) the k nearest keys (L2)
    a_t = argmax_a Q^(s_t, a) (ties at random), a uniform action with prob. epsilon_t
    (annealed linearly from epsilon_start to epsilon over epsilon_decay_steps agent steps)
    at an episode's end, backwards over its steps, with R_t = sum_{j>=t} gamma^(j-t) r_j:
    Q_EC(s_t, a_t) <- max{Q_EC(s_t, a_t), R_t}     if phi(s_t) is in table a_t   [1] Eq. (1)
                    <- R_t                         else (appended; when the table is full
                                                   the least recently used entry is replaced)

"In the table" is an exact match: the nearest key at squared distance <= match_tol |phi|^2
(identical observations give identical keys). The table is fixed-size arrays: keys
(A, capacity, key_dim), values (A, capacity), last_used (A, capacity), size (A,); k-NN is
`jax.lax.top_k` of negative squared distances (one matmul per action), so the whole run is
one jitted scan, vmapped over seeds. `knn`, `estimate` and `write` are the DND operations a
later NEC file shares in spirit (NEC replaces the mean by a kernel-weighted sum and the max
by a tabular step).

Reproduce (CPU demo, GridMaze-FourRooms, 4 seeds; the random-action baseline, then MFEC with
both learning curves in one plot; `--plot PNG` and `--compare RUN_DIR` are this file's own
flags; the broken overwrite variant on its own):
    python metarl/mfec.py --preset quick --num-seeds 4 --epsilon 1 --run-dir runs/mfec_random
    python metarl/mfec.py --preset quick --num-seeds 4 --plot metarl/mfec.png \
        --compare runs/mfec_random
    python metarl/mfec.py --preset quick --num-seeds 4 --update-rule overwrite
Paper setting (GPU; Atari through envpool, Ms. Pac-Man, 10M frames):
    python metarl/mfec.py --preset paper
Ours (quick, 2-core CPU shared with other jobs, 2 s compile + 3 s per run, 4 seeds, 16,000
steps each): MFEC reaches the goal in 64 of 64 evaluation episodes for every seed, in 21.6 +-
0.4 steps (the shortest path is 20); random actions 0.04 +- 0.01 (197 steps); the overwrite
variant 0.00 / 1.00 / 0.28 / 0.00 (tests/metarl/test_mfec.py): curves in metarl/mfec.png.
[1] Fig. 1 / Table 1 [M: not re-read]: on Atari MFEC reaches its scores with far fewer frames
than DQN, A3C or prioritised DQN (about 10M frames against DQN's 200M in several games, e.g.
Ms. Pac-Man, Frostbite, Q*bert); its numbers are not quoted here.

Differences from the paper:
- Constants: k = 11, key_dim = 64, 1M entries per action, gamma = 1, epsilon annealed
  linearly 1.0 -> 0.005 over the first 10,000 agent steps (astier's schedule; Kaixhin/EC
  holds 1.0 for 5,000 steps and anneals to 0.005 by step 25,000), frame skip 4, one 84x84
  grey frame per observation: read in Kaixhin/EC's and astier's MFEC defaults (both say
  they follow [1]); not re-read in [1]'s text ([M]). The quick preset keeps a constant
  0.05 (epsilon_decay_steps = 0).
- The VAE embedding of [1] Sec. 3 is not implemented (only the random projection).
- LRU: an entry is "used" when written, max-updated, or read as one of the k neighbours of
  an action's estimate (astier's reading; [1] says only that the least recently used entry
  goes). Written entries take the time of the flush, not of their visit.
- [1] acts with a single env; `num_envs` > 1 steps several envs that share one table; the
  episodes that end on the same step are written env by env.
- An action whose table holds fewer than k entries averages those it has; an empty table
  estimates 0 (not said in [1]; astier's +inf makes every action tried first).
- An episode longer than `max_episode_steps` is cut there and written as if it ended (its
  return then omits the rest). envpool's next-step auto-reset makes the first stored step
  of each Atari episode (after the first) the last frame of the one before, with reward 0.
- `--update-rule overwrite` (Q_EC <- R_t) and `--eviction none` (a full table stops
  taking new states) are the broken variants the tests reject; `--epsilon 1` is the
  random-walk baseline.
Metrics: charts/episodic_return is the mean return of the episodes that ended in the update
(NaN where none ended; charts/episodes counts them), charts/reward_per_step the mean reward
of the update's env steps, charts/q_mean the mean Q^(s_t, a_t) of the chosen actions,
charts/exact_match the fraction of steps whose chosen action's table held phi(s_t) (an
exact match: Q^ is its stored value, not a k-NN mean), charts/epsilon the exploration rate
at the update's end, charts/table_fill the fraction of the table in use. MFEC has no loss
(no losses/ metric).
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import envs, plot, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """MFEC with a random-projection embedding; defaults: [1]'s Atari setting (envpool)."""

    env_id: str = "MsPacman-v5"
    """environment id (envpool Atari *-v5, GridMaze-FourRooms, gymnax, navix)"""
    max_episode_steps: int = 27_000
    """longest episode in agent steps (Atari: 108k frames); also the episode buffer length"""
    total_timesteps: int = 2_500_000
    """agent steps of the whole run over all envs (10M Atari frames at frame skip 4)"""
    num_envs: int = 1
    """parallel environments sharing one table"""
    num_steps: int = 100
    """vector-env steps per update (one logged row)"""
    capacity: int = 1_000_000
    """entries per action table (the LRU cache size)"""
    key_dim: int = 64
    """F: dimension of the random projection phi(o) = A o"""
    num_neighbours: int = 11
    """k: neighbours averaged for a state not in the table"""
    gamma: float = 1.0
    """discount of the Monte-Carlo return R_t"""
    epsilon: float = 0.005
    """probability of a uniform random action (the final one when annealed)"""
    epsilon_start: float = 1.0
    """epsilon at step 0, annealed linearly to `epsilon` (astier: 1.0)"""
    epsilon_decay_steps: int = 10_000
    """agent steps (all envs) of the linear anneal (astier: 10,000); 0: constant epsilon"""
    match_tol: float = 1e-6
    """exact match: squared distance <= match_tol * max(|phi(s)|^2, 1)"""
    update_rule: str = "max"
    """max ([1] Eq. 1) or overwrite (broken variant: Q_EC <- R_t)"""
    eviction: str = "lru"
    """lru (replace the least recently used entry) or none (broken: a full table freezes)"""
    eval_envs: int = 16
    """evaluate(): episodes played from the final table with the final epsilon"""
    dtype: str = "float32"
    """compute dtype of the projection and distance matmuls: float32 or bfloat16"""

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    def validate(self):
        for name, allowed in (("update_rule", ("max", "overwrite")),
                              ("eviction", ("lru", "none")),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        for name in ("max_episode_steps", "capacity", "key_dim", "num_neighbours", "eval_envs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.num_neighbours > self.capacity:
            raise ValueError(f"num_neighbours={self.num_neighbours} must be <= capacity="
                             f"{self.capacity}")
        for name in ("epsilon", "epsilon_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.epsilon_decay_steps < 0:
            raise ValueError(f"epsilon_decay_steps={self.epsilon_decay_steps} must be >= 0")
        if self.match_tol < 0:
            raise ValueError(f"match_tol={self.match_tol} must be >= 0")
        envs.check_id(self.env_id)
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_envs * num_steps = {self.steps_per_update})")


PRESETS = {
    # CPU demo: FourRooms (13x13, the goal 20 steps from the start), 200-step episodes, 2
    # envs, 40 updates of 400 steps (at least 80 episodes); k = 5, 4-d keys, 100 entries per
    # action (about the floor's 104 cells, so the LRU replaces some); seconds of compute.
    "quick": dict(env_id="GridMaze-FourRooms", max_episode_steps=200, num_envs=2,
                  num_steps=200, total_timesteps=16_000, capacity=100, key_dim=4,
                  num_neighbours=5, gamma=0.99, epsilon=0.05, epsilon_decay_steps=0,
                  eval_envs=64),
    "paper": dict(),
}


def make_env(cfg: Config, num_envs: int):
    if cfg.is_atari:  # [1]: one grey 84x84 frame, frame skip 4, no sticky actions, raw score
        return envs.make(cfg.env_id, num_envs, stack_num=1, episodic_life=False,
                         reward_clip=False, max_episode_steps=cfg.max_episode_steps)
    if cfg.env_id.startswith("GridMaze-"):
        return envs.make(cfg.env_id, num_envs, max_steps=cfg.max_episode_steps)
    if cfg.env_id.startswith("Navix-"):
        return envs.make(cfg.env_id, num_envs, max_steps=cfg.max_episode_steps)
    return envs.make(cfg.env_id, num_envs)


# --- EMBEDDING ---


def projection(key, obs_shape, key_dim: int):
    """A: (D, F) with entries N(0, 1/D), fixed for the whole run ([1] Sec. 3)."""
    d = int(np.prod(obs_shape))
    return jax.random.normal(key, (d, key_dim)) / np.sqrt(d)


def embed(obs, proj, dtype):
    """phi(o) = A o for a batch of observations (N, ...) -> (N, F) float32; uint8 frames are
    scaled to [0, 1] first (a scale, so neighbours and matches are unchanged)."""
    x = obs.reshape(obs.shape[0], -1).astype(jnp.float32)
    if obs.dtype == jnp.uint8:
        x = x / 255.0
    return jnp.dot(x.astype(dtype), proj.astype(dtype)).astype(jnp.float32)  # (N, F)


# --- TABLE (the episodic memory Q_EC) ---


@struct.dataclass
class Table:
    keys: jax.Array  # (A, C, F) phi(s) of the stored states, one table per action
    values: jax.Array  # (A, C) Q_EC(s, a): the best return seen after (s, a)
    last_used: jax.Array  # (A, C) int32 time of the last write or read
    size: jax.Array  # (A,) int32 entries in use (slots 0..size-1)


def table_init(num_actions: int, capacity: int, key_dim: int) -> Table:
    return Table(jnp.zeros((num_actions, capacity, key_dim)), jnp.zeros((num_actions, capacity)),
                 jnp.zeros((num_actions, capacity), jnp.int32),
                 jnp.zeros((num_actions,), jnp.int32))


def knn(keys, size, queries, k: int, dtype=jnp.float32):
    """The k nearest of the first `size` rows of keys (C, F) to each query (N, F): indices
    (N, k) nearest first, their exact squared distances (N, k), and valid (N, k) (false
    where the table holds fewer than k entries). The search ranks by the matmul expansion
    |q|^2 - 2 q.k + |k|^2; the distances returned are recomputed on the k keys found."""
    cross = jnp.dot(queries.astype(dtype), keys.T.astype(dtype)).astype(jnp.float32)  # (N, C)
    d2 = (queries ** 2).sum(-1, keepdims=True) - 2 * cross + (keys ** 2).sum(-1)[None]
    d2 = jnp.where(jnp.arange(keys.shape[0])[None] < size, d2, jnp.inf)
    _, idx = jax.lax.top_k(-d2, k)  # (N, k)
    exact = ((keys[idx] - queries[:, None]) ** 2).sum(-1)  # (N, k)
    valid = jnp.broadcast_to(jnp.arange(k) < size, idx.shape)
    return idx, exact, valid


def is_match(d2, valid, queries, tol):
    """Which neighbours are the query's own state: valid and d2 <= tol max(|q|^2, 1)."""
    scale = jnp.maximum((queries ** 2).sum(-1, keepdims=True), 1.0)
    return valid & (d2 <= tol * scale)


def estimate(values, match, valid):
    """[1] Eq. (2) for each query: the value of the exact match where there is one, else the
    mean of the valid neighbours' values (0 with none). values, match, valid: (N, k)."""
    mean = (values * valid).sum(-1) / jnp.maximum(valid.sum(-1), 1)
    exact = jnp.where(match, values, -jnp.inf).max(-1)
    return jnp.where(match.any(-1), exact, mean)


def q_values(table: Table, queries, k: int, tol: float, now, dtype=jnp.float32):
    """Q^(s, a) for every query (N, F) and action: (N, A), the table with the neighbours
    read marked used at time `now` (the LRU clock), and (N, A) whether table a holds the
    query exactly (Q^ is then the stored value)."""

    def one(keys, values, size):
        idx, d2, valid = knn(keys, size, queries, k, dtype)
        match = is_match(d2, valid, queries, tol)
        return estimate(values[idx], match, valid), idx, valid, match.any(-1)

    q, idx, valid, match = jax.vmap(one)(table.keys, table.values, table.size)  # (A, N, ..)
    a = jnp.broadcast_to(jnp.arange(idx.shape[0])[:, None, None], idx.shape)
    used = table.last_used.at[a, idx].max(jnp.where(valid, now, 0))
    return q.T, table.replace(last_used=used), match.T


def write(table: Table, key, action, ret, now, tol: float, max_update, lru):
    """[1] Eq. (1) for one visit (phi(s_t), a_t, R_t): max (or, broken, overwrite) into an
    exact match; else append, or replace the least recently used entry of a full table (or,
    with `lru` false, drop the visit). `max_update`, `lru`: bool, possibly traced."""
    keys, size = table.keys[action], table.size[action]  # (C, F), ()
    idx, d2, valid = knn(keys, size, key[None], 1)
    match = is_match(d2, valid, key[None], tol)[0, 0]
    full = size >= keys.shape[0]
    slot = jnp.where(match, idx[0, 0],
                     jnp.where(full, jnp.argmin(table.last_used[action]), size))
    old = table.values[action, slot]
    value = jnp.where(match & max_update, jnp.maximum(old, ret), ret)
    ok = match | ~full | lru  # a frozen full table keeps its entries
    return Table(
        table.keys.at[action, slot].set(jnp.where(ok & ~match, key, keys[slot])),
        table.values.at[action, slot].set(jnp.where(ok, value, old)),
        table.last_used.at[action, slot].set(
            jnp.where(ok, now, table.last_used[action, slot])),
        table.size.at[action].add((~match & ~full).astype(jnp.int32)))


# --- STATE ---


@struct.dataclass
class Hyper:
    """Numbers a test or a sweep may change per seed without recompiling."""

    epsilon: jax.Array  # float32
    max_update: jax.Array  # bool: [1] Eq. (1) max, else overwrite (broken variant)
    lru: jax.Array  # bool: LRU replacement, else a full table freezes (broken variant)


@struct.dataclass
class State:
    table: Table
    proj: jax.Array  # (D, F) the fixed random projection A
    env_state: Any
    obs: jax.Array  # (N, ...) next observation
    ep_keys: jax.Array  # (N, L, F) phi(s_t) of each env's current episode
    ep_actions: jax.Array  # (N, L) int32
    ep_rewards: jax.Array  # (N, L) float32
    ep_len: jax.Array  # (N,) int32 steps stored in the current episode
    time: jax.Array  # int32 LRU clock: vector-env steps so far
    key: jax.Array
    hyper: Hyper


def init(key, cfg: Config) -> State:
    env = make_env(cfg, cfg.num_envs)
    k_proj, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    n, length = cfg.num_envs, cfg.max_episode_steps
    hyper = Hyper(jnp.asarray(cfg.epsilon, jnp.float32), jnp.asarray(cfg.update_rule == "max"),
                  jnp.asarray(cfg.eviction == "lru"))
    return State(table_init(env.num_actions, cfg.capacity, cfg.key_dim),
                 projection(k_proj, env.observation_shape, cfg.key_dim), env_state, obs,
                 jnp.zeros((n, length, cfg.key_dim)), jnp.zeros((n, length), jnp.int32),
                 jnp.zeros((n, length)), jnp.zeros((n,), jnp.int32),
                 jnp.zeros((), jnp.int32), key, hyper)


# --- ROLLOUT ---


def act(key, q, epsilon):
    """Greedy in q (N, A) with ties broken uniformly; a uniform action with prob. epsilon."""
    k_tie, k_explore, k_rand = jax.random.split(key, 3)
    best = q >= q.max(-1, keepdims=True)
    greedy = jax.random.categorical(k_tie, jnp.where(best, 0.0, -jnp.inf))
    explore = jax.random.uniform(k_explore, greedy.shape) < epsilon
    return jnp.where(explore, jax.random.randint(k_rand, greedy.shape, 0, q.shape[-1]), greedy)


def flush(table: Table, s: State, ended, now, cfg: Config) -> Table:
    """Write every episode that ended (ended (N,) bool) into the table, env by env, each
    backwards from its last step with the Monte-Carlo return R_t = r_t + gamma R_{t+1}
    ([1] Eq. 1). The loops run as many iterations as there are steps to write (none on most
    steps). Under vmap (the runner's seeds) the flush runs seed after seed
    (`sequential_vmap`): a vmapped loop with a per-seed trip count would become one loop
    with a batched predicate that selects over every seed's whole table at each step."""

    @jax.custom_batching.sequential_vmap
    def run_flush(table, ep_keys, ep_actions, ep_rewards, ep_len, ended, now, max_update,
                  lru):
        def per_env(i, table):
            n = jnp.where(ended[i], ep_len[i], 0)

            def body(j, carry):
                table, ret = carry
                t = n - 1 - j
                ret = ep_rewards[i, t] + cfg.gamma * ret  # R_t, R_n = 0
                return write(table, ep_keys[i, t], ep_actions[i, t], ret, now, cfg.match_tol,
                             max_update, lru), ret

            return jax.lax.fori_loop(0, n, body, (table, jnp.zeros(())))[0]

        return jax.lax.fori_loop(0, ep_len.shape[0], per_env, table)

    return run_flush(table, s.ep_keys, s.ep_actions, s.ep_rewards, s.ep_len, ended,
                     jnp.asarray(now, jnp.int32), s.hyper.max_update, s.hyper.lru)


def epsilon_at(s: State, cfg: Config):
    """epsilon_t: linear from epsilon_start to the final epsilon (the state's, a test may set
    it per seed) over epsilon_decay_steps agent steps, then constant (astier's schedule)."""
    if cfg.epsilon_decay_steps == 0:
        return s.hyper.epsilon
    frac = jnp.minimum(s.time * cfg.num_envs / cfg.epsilon_decay_steps, 1.0)
    return cfg.epsilon_start + frac * (s.hyper.epsilon - cfg.epsilon_start)


def env_step(s: State, cfg: Config, env, k):
    """One vector-env step: embed, estimate, act, step, store; flush the episodes that ended."""
    k_act, k_env = jax.random.split(k)
    now = s.time + 1
    keys = embed(s.obs, s.proj, jnp.dtype(cfg.dtype))  # (N, F)
    q, table, match = q_values(s.table, keys, cfg.num_neighbours, cfg.match_tol, now,
                               jnp.dtype(cfg.dtype))  # (N, A)
    eps = epsilon_at(s, cfg)
    action = act(k_act, q, eps)
    obs, env_state, reward, done, info = env.step(s.env_state, action, k_env)
    n = jnp.arange(keys.shape[0])
    s = s.replace(ep_keys=s.ep_keys.at[n, s.ep_len].set(keys),
                  ep_actions=s.ep_actions.at[n, s.ep_len].set(action),
                  ep_rewards=s.ep_rewards.at[n, s.ep_len].set(reward), ep_len=s.ep_len + 1)
    ended = done | (s.ep_len >= cfg.max_episode_steps)
    table = flush(table, s, ended, now, cfg)
    q_a = jnp.take_along_axis(q, action[:, None], -1)[:, 0]
    out = dict(ret=info["returned_episode_return"], ended=info["returned_episode"],
               q=q_a, reward=reward, eps=eps,
               match=jnp.take_along_axis(match, action[:, None], -1)[:, 0])
    return s.replace(table=table, env_state=env_state, obs=obs, time=now,
                     ep_len=jnp.where(ended, 0, s.ep_len)), out


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg, cfg.num_envs)
    key, k_roll = jax.random.split(state.key)
    state, traj = jax.lax.scan(lambda s, k: env_step(s, cfg, env, k), state,
                               jax.random.split(k_roll, cfg.num_steps))  # leaves (T, N)
    n_ended = traj["ended"].sum()
    metrics = {
        # 0 when none ended, which the runner logs as NaN
        "charts/episodic_return": (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1),
        "charts/episodes": n_ended,
        "charts/reward_per_step": traj["reward"].mean(),
        "charts/q_mean": traj["q"].mean(),
        "charts/exact_match": traj["match"].mean(),
        "charts/epsilon": traj["eps"][-1],
        "charts/table_fill": state.table.size.sum() / state.table.values.size,
    }
    return state.replace(key=key), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """`eval_envs` fresh episodes acted from the final table (the final epsilon, no
    writes): `eval_return` the mean return of each env's first episode, `eval_length` its
    mean length (max_episode_steps when it did not end)."""
    env = make_env(cfg, cfg.eval_envs)
    k_env, k_roll = jax.random.split(jax.random.fold_in(state.key, 1))
    obs, env_state = env.reset(k_env)

    def step(carry, k):
        obs, env_state, alive, ret, length, table = carry
        k_act, k_env = jax.random.split(k)
        keys = embed(obs, state.proj, jnp.dtype(cfg.dtype))
        q, table, _ = q_values(table, keys, cfg.num_neighbours, cfg.match_tol, state.time,
                               jnp.dtype(cfg.dtype))
        action = act(k_act, q, state.hyper.epsilon)
        obs, env_state, reward, done, _ = env.step(env_state, action, k_env)
        ret, length = ret + reward * alive, length + alive
        return (obs, env_state, alive & ~done, ret, length, table), None

    zeros = jnp.zeros(cfg.eval_envs)
    carry = (obs, env_state, jnp.ones(cfg.eval_envs, bool), zeros, zeros, state.table)
    (_, _, _, ret, length, _), _ = jax.lax.scan(
        step, carry, jax.random.split(k_roll, cfg.max_episode_steps))
    return {"eval_return": ret.mean(), "eval_length": length.mean()}


# --- PLOT ---


def _label(record: dict) -> str:
    c = record["config"]
    if c["epsilon"] >= 1:
        return "random actions (epsilon = 1)"
    parts = [p for p in (c["update_rule"] != "max" and f"update {c['update_rule']}",
                         c["eviction"] != "lru" and f"eviction {c['eviction']}") if p]
    return "MFEC" + (f" ({', '.join(parts)})" if parts else "")


def plot_curves(run_dirs, out: str, window: int = 5):
    """charts/episodic_return against env steps, one curve (mean +- std over seeds) per run."""
    return plot.plot(run_dirs, "charts/episodic_return", out, window, labels=_label,
                     xlabel="env steps (all envs)",
                     ylabel=f"episodic return (moving mean of {window} updates)")


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the learning curve of this run) and
    `--compare RUN_DIR` (also draw an earlier run's curve, e.g. a broken variant)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["eval_return", "eval_length",
                                              "charts/episodic_return", "charts/table_fill"])
    if flags["--plot"] is not None:
        dirs = [res.run_dir] + ([flags["--compare"]] if flags["--compare"] else [])
        print("wrote", plot_curves(dirs, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
