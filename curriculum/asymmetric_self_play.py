"""Asymmetric self-play: Alice proposes tasks by doing them, Bob undoes or repeats them.

[1] S. Sukhbaatar, Z. Lin, I. Kostrikov, G. Synnaeve, A. Szlam, R. Fergus. "Intrinsic
    Motivation and Automatic Curricula via Asymmetric Self-Play." ICLR 2018,
    arXiv:1703.05407. Released code: github.com/tesatory/selfplay (commit df5e19d), Lua
    Torch: `lua/games/SPBase.lua` (rewards, STOP, modes), `lua/games/SPLightKey.lua` (the
    Mazebase light-key task), `lua/MultiMindAgent.lua`, `lua/Agent.lua` (REINFORCE),
    `lua/main.lua` (defaults), `lua/README.md` (the commands of the runs).
Equation tags are this file's; [M] marks what is from memory of [1], not re-read here.

Two policies with separate parameters, Alice pi_A(a | s_t, s_0) and Bob pi_B(a | s_t, s*).
A self-play episode starts in s_0; Alice acts until her STOP action (at step t_A) or until
the episode's t_max steps are spent; then Bob gets control and must reach s*:

    reverse mode: s* = s_0 (Bob undoes Alice's changes; the env must be reversible)
    repeat mode:  s* = Alice's final state; the env is reset to s_0 before Bob acts

Bob succeeds when his observation, without the clock, equals the snapshot of s* (the
released is_success: a lamp that is off hides what it hides in both). His time t_B is his
step count, t_max - t_A if he fails. The rewards, given at the end of the episode:

    R_B = -gamma t_B                                                            (Eq. 1)
    R_A = gamma max(0, t_B - t_A)                                               (Eq. 2)

(0 for Alice when she never STOPs). A share `target_task_prob` of the episodes are target
task episodes instead: Bob alone, his target input the 'test mode' flag, reward
1 - c t on reaching the goal at step t and -c t_max otherwise (released SPLightKey).

The environment is the Mazebase light-key task of [1] Sec. 4.2 (SPLightKey): an n x n grid
split by a wall (vertical or horizontal, at random) with one door; the door opens while its
key switch is on; a lamp switch: while the light is off only the agent and the lamp are
visible. Actions: up, down, left, right, toggle (the switch under the agent), STOP. Self-play
episodes start with the key at random and the light off with probability 0.3; a target task
has the goal on one side, the agent and both switches on the other, the door locked and the
light off: light on, key on, through the door, to the goal.

Learner ([1] "REINFORCE with a baseline"; released Agent.lua, mode pg): per mind, every
active step's return is that mind's final reward (no discount, no step rewards),

    L = 1/B sum_t [-(G_t - b(s_t)) log pi(a_t | s_t) - c_H H(pi(.|s_t)) + alpha (b(s_t) - G_t)^2]

one RMSProp step per batch of B episodes. Variants (traced in the state, one compiled
program can hold several): `self_play` ([1]); `none` (every episode a target task: plain
REINFORCE, [1]'s baseline); `random_alice` (Alice acts at random and STOPs at a random step
in [1, t_max/2]: the released sp_rand_alice baseline); two broken ones: `flipped`
(R_A = -Eq. 2: Alice is paid for easy tasks, and best by never STOPping) and `blind_bob`
(Bob's target input is blank in self-play: he cannot learn where to go, so Alice's best
task stays the shortest one).

Reproduce (CPU; curriculum/asymmetric_self_play.png):
    python curriculum/asymmetric_self_play.py --preset quick --num-seeds 2 \
        --plot curriculum/asymmetric_self_play.png
    python curriculum/asymmetric_self_play.py --preset quick --num-seeds 2 --variant none
    python curriculum/asymmetric_self_play.py --preset paper       # accelerator

Measured (`quick`: 5 x 5 maze, t_max 20, 64 episodes x 300 updates; seed 0 of each variant
in one program, `compare`; 2-core CPU shared with other jobs, 236 s; the plot), means over
the last 50 updates:
    self_play   Bob's self-play success 0.98, t_B 1.7, t_A 3.5; target success 0.01
                (3.6k target episodes)
    blind_bob   Bob's self-play success 0.60, t_B 9.2, t_A 3.1; target success 0.00
    none        target success 0.00 after 17.6k target episodes
Bob learns to reach the states Alice proposes (t_B falls from 5.3 to 1.7) while Alice's t_A
falls (10 -> 3.5). Run on to 1000 updates (the slow test; 430 s) the curriculum appears:
t_A 5.05 over updates 901-1000 (blind Bob's Alice: 3.00), t_B back up to 3.7, Bob's success
0.85 (blind 0.63), R_A 0.03 -> 0.13. Neither learner solves the target task (light, key,
door, goal within 20 steps) at this budget: success 0.0055 self-play, 0.0028 none over the
last 100 updates, noise level (1 seed), so no target-task claim is made here.
[1] Fig. 3 [M]: on Mazebase light-key, self-play reaches the target task's reward in fewer
target-task episodes than plain REINFORCE and than random Alice; t_A and t_B both grow over
training. [1] plots target reward against target-task episodes only (self-play episodes
free); `charts/target_episodes_total` gives that axis, `charts/env_steps_total` the other.

Defaults (the `paper` preset) are the released code's (main.lua, README's Mazebase run,
sp_lightkey.lua): 10 x 10 map, gamma 0.1 and c 0.1 (hard-coded in SPBase/SPLightKey),
light off with probability 0.3, two 50-unit tanh layers, the target encoded by the same
encoder as the observation (mind_target), N(0, 0.2) initialisation, RMSProp lr 3e-3 decay
0.97 (its eps option is misspelt there, `rmsprob_eps`, so torch's 1e-8 applies), baseline
coefficient alpha 0.1, entropy 0.003, reverse mode, 16 x 16 = 256 episodes per step, 10
steps an epoch for 100 epochs; target-task share 0.1 (main.lua; the README's small Mazebase
run uses 0.2, the `quick` preset's); t_max 80 [M: main.lua 20, the small run 40].

Differences from the paper / released code:
- The observation is the agent-centred view of the whole map as one-hot channels (block,
  door closed/open, key off/on, lamp off/on, goal, outside the map) plus the clock one-hot,
  through a Dense encoder; released: a lookup-table encoder (the sum of item-word
  embeddings) over the same kind of window (visibility 5 on the 6 x 6 map), with corner
  items where this file has the outside channel. The map size is fixed per run (Mazebase
  draws it from a range).
- Every batch runs B fresh episodes of exactly t_max steps with inactive steps masked
  (released: the same). The target-task share is a Bernoulli per episode (released).
- REINFORCE with the value baseline detached, as released; one RMSProp over both minds.
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

from common import run

VARIANTS = ("self_play", "none", "random_alice", "flipped", "blind_bob")
"""[1]'s self-play, no self-play (target task only), random Alice, and two broken variants:
Alice paid -R_A, and Bob not shown the target state."""
MODES = ("reverse", "repeat")
NUM_ACTIONS = 6  # up, down, left, right, toggle, STOP
TOGGLE, STOP = 4, 5
MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int32)
NUM_CHANNELS = 9  # block, door closed, door open, key off, key on, lamp off, lamp on, goal, edge

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Asymmetric self-play on Mazebase light-key; defaults are the released code's."""

    variant: str = "self_play"
    """self_play ([1]) | none (target task only) | random_alice (released sp_rand_alice) |
    flipped (broken: Alice paid -R_A, for tasks Bob finds easy) | blind_bob (broken: Bob's
    target input is blank in self-play)"""
    sp_mode: str = "reverse"
    """reverse (Bob returns to s_0) | repeat (env reset to s_0, Bob reaches Alice's s_T)"""
    grid_size: int = 10
    """n: the map is n x n (released sp_lightkey.lua 10; sp_lightkey_small.lua 6)"""
    max_steps: int = 80
    """t_max: steps of an episode, Alice's and Bob's together"""
    target_task_prob: float = 0.1
    """share of the episodes that are target-task episodes (released sp_test_rate)"""
    lamp_off_prob: float = 0.3
    """self-play episodes start with the light off with this probability"""
    reward_scale: float = 0.1
    """gamma: R_B = -gamma t_B, R_A = gamma max(0, t_B - t_A) (Eq. 1-2)"""
    target_time_penalty: float = 0.1
    """c: target-task reward 1 - c t on success at step t, -c t_max on failure"""
    hidden_size: int = 50
    """units of the two tanh layers of each mind (released hidsz)"""
    init_std: float = 0.2
    """std of the N(0, std) initialisation of every weight and bias (released init_std)"""
    lr: float = 3e-3
    """RMSProp learning rate"""
    rmsprop_decay: float = 0.97
    """RMSProp decay of the mean square (released rmsprop_alpha)"""
    rmsprop_eps: float = 1e-8
    """RMSProp epsilon, added to the root (torch optim.rmsprop)"""
    value_coef: float = 0.1
    """alpha: weight of the baseline's squared error"""
    entropy_coef: float = 0.003
    """weight of the policy entropy bonus (released entropy_reg)"""
    num_envs: int = 256
    """B: episodes per gradient step (released nworker 16 x batch_size 16)"""
    total_updates: int = 1000
    """gradient steps (released 100 epochs x 10 batches)"""
    dtype: str = "float32"
    """compute dtype of the dense layers: float32 | bfloat16"""

    @property
    def num_updates(self) -> int:
        return self.total_updates

    @property
    def obs_dim(self) -> int:  # grid channels, clock one-hot, test-mode flag
        return NUM_CHANNELS * (2 * self.grid_size - 1) ** 2 + self.max_steps + 2

    def validate(self):
        for name, options in (("variant", VARIANTS), ("sp_mode", MODES),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {options}")
        if self.grid_size < 4:
            raise ValueError(f"grid_size={self.grid_size} must be >= 4 (a wall with a side of "
                             "3 free cells for the agent and the switches)")
        if self.max_steps < 2:
            raise ValueError(f"max_steps={self.max_steps} must be >= 2 (Alice and Bob)")
        for name in ("reward_scale", "target_time_penalty", "init_std", "rmsprop_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.rmsprop_decay < 1:
            raise ValueError(f"rmsprop_decay={self.rmsprop_decay} must be in [0, 1)")


PRESETS = {
    "quick": dict(grid_size=5, max_steps=20, target_task_prob=0.2, num_envs=64,
                  total_updates=300),
    "paper": dict(),
}

# --- ENV: Mazebase light-key (SPLightKey) ---


@struct.dataclass
class Maze:
    wall: jax.Array  # [n, n] bool blocks (the door cell excluded)
    door: jax.Array  # [2] int32
    key: jax.Array  # [2] the door's switch
    lamp: jax.Array  # [2] the light switch
    goal: jax.Array  # [2] (target tasks only)
    pos: jax.Array  # [2] the agent
    key_on: jax.Array  # () bool: the door is open
    lamp_on: jax.Array  # () bool
    has_goal: jax.Array  # () bool


def new_maze(key, target, cfg: Config) -> Maze:
    """A random map (released build_wall, init_env). target: the target task's layout (goal
    on one side of the wall, agent and switches on the other, door locked, light off)."""
    n = cfg.grid_size
    k = jax.random.split(key, 7)
    vertical = jax.random.bernoulli(k[0])
    line_at = jax.random.randint(k[1], (), 1, n - 1)  # the wall's column (row) in [1, n-2]
    door_at = jax.random.randint(k[2], (), 0, n)
    r, c = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
    line, along = jnp.where(vertical, c, r), jnp.where(vertical, r, c)  # [n, n]
    wall = (line == line_at) & (along != door_at)
    door = jnp.where(vertical, jnp.stack([door_at, line_at]), jnp.stack([line_at, door_at]))
    free = (line != line_at).reshape(-1)
    side = (line < line_at).reshape(-1)
    g = jax.random.choice(k[3], n * n, p=free / free.sum())
    pool = free & jnp.where(target, side != side[g], jnp.arange(n * n) != g)
    idx = jax.random.choice(k[4], n * n, (3,), replace=False, p=pool / pool.sum())
    cells = jnp.stack(jnp.divmod(jnp.concatenate([idx, g[None]]), n), -1)  # [4, 2]
    key_on = ~target & jax.random.bernoulli(k[5])
    lamp_on = ~target & ~jax.random.bernoulli(k[6], cfg.lamp_off_prob)
    return Maze(wall, door, cells[0], cells[1], cells[3], cells[2], key_on, lamp_on, target)


def grid_obs(m: Maze, n: int):
    """The agent-centred view of the whole map (released: visibility n - 1), one-hot channels
    [(2n - 1)^2 * 9]; the light off hides all but the lamp and the map's edge."""
    def at(p):
        return jnp.zeros((n, n)).at[p[0], p[1]].set(1.0)

    lit = m.lamp_on.astype(jnp.float32)
    on, lamp = m.key_on.astype(jnp.float32), m.lamp_on.astype(jnp.float32)
    ch = [m.wall * lit, at(m.door) * (1 - on) * lit, at(m.door) * on * lit,
          at(m.key) * (1 - on) * lit, at(m.key) * on * lit, at(m.lamp) * (1 - lamp),
          at(m.lamp) * lamp, at(m.goal) * m.has_goal * lit, -jnp.ones((n, n))]
    grid = jnp.pad(jnp.stack(ch, -1), ((n - 1, n - 1), (n - 1, n - 1), (0, 0)))
    grid = grid.at[..., -1].add(1.0)  # the last channel: 1 outside the map
    view = jax.lax.dynamic_slice(grid, (m.pos[0], m.pos[1], 0), (2 * n - 1, 2 * n - 1, 9))
    return view.reshape(-1)


def env_step(m: Maze, a) -> Maze:
    """Moves (into a block or a locked door: stay), toggle of the switch under the agent;
    STOP changes nothing (it hands control to Bob)."""
    n = m.wall.shape[0]
    new = jnp.clip(m.pos + jnp.asarray(MOVES)[jnp.minimum(a, 3)], 0, n - 1)
    blocked = m.wall[new[0], new[1]] | (jnp.all(new == m.door) & ~m.key_on)
    pos = jnp.where((a < 4) & ~blocked, new, m.pos)
    toggle = a == TOGGLE
    return m.replace(pos=pos, key_on=m.key_on ^ (toggle & jnp.all(pos == m.key)),
                     lamp_on=m.lamp_on ^ (toggle & jnp.all(pos == m.lamp)))


# --- NETWORKS ---


class Mind(nn.Module):
    """Released MultiMindAgent, one mind: the observation and the target through one shared
    Dense encoder, concatenated, tanh, Dense, tanh; action logits and the baseline."""

    hidden: int
    init_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs, target):
        init = nn.initializers.normal(self.init_std)
        dense = lambda f: nn.Dense(f, kernel_init=init, bias_init=init, dtype=self.dtype)  # noqa: E731
        enc = dense(self.hidden)
        h = jnp.tanh(jnp.concatenate([enc(obs), enc(target)], -1))
        h = jnp.tanh(dense(self.hidden)(h))
        return (dense(NUM_ACTIONS)(h).astype(jnp.float32),
                dense(1)(h)[..., 0].astype(jnp.float32))


def make_mind(cfg: Config):
    return Mind(cfg.hidden_size, cfg.init_std, jnp.dtype(cfg.dtype))


def make_optimizer(cfg: Config):
    """torch optim.rmsprop: m = d m + (1 - d) g^2, x -= lr g / (sqrt(m) + eps), m_0 = 0."""
    return optax.rmsprop(cfg.lr, decay=cfg.rmsprop_decay, eps=cfg.rmsprop_eps,
                         eps_in_sqrt=False)


# --- LOSS: Eq. 1-2 and REINFORCE ---


def self_play_rewards(t_a, t_b, stopped, gamma, flipped=False):
    """Eq. 1-2: (R_A, R_B); both 0 when Alice never STOPped; R_A negated when `flipped`."""
    r_b = -gamma * t_b
    r_a = gamma * jnp.maximum(0.0, t_b - t_a)
    r_a = jnp.where(flipped, -r_a, r_a)
    return jnp.where(stopped, r_a, 0.0), jnp.where(stopped, r_b, 0.0)


def bob_time(t_a, t_end, success, t_max):
    """t_B: Bob's steps to success, t_max - t_A when he fails."""
    return jnp.where(success, t_end - t_a, t_max - t_a)


def target_reward(success, t_end, c):
    """Released SPLightKey test task: 1 - c t on success at step t, -c t otherwise."""
    return success - c * t_end


def reinforce_loss(params, traj, cfg: Config):
    """1/B sum over active steps of -(G - b) log pi(a) - c_H H + alpha (b - G)^2, each step
    through its mind's network (Alice's steps masked out for random Alice)."""
    mind = make_mind(cfg)
    outs = [mind.apply(params[k], traj["obs"], traj["target"]) for k in ("alice", "bob")]
    bob = traj["bob"]
    logits = jnp.where(bob[..., None], outs[1][0], outs[0][0])  # [T, B, A]
    value = jnp.where(bob, outs[1][1], outs[0][1])  # [T, B]
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, traj["action"][..., None], -1)[..., 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    w = traj["active"] * traj["trained"]
    b = traj["active"].shape[1]
    adv = traj["returns"] - jax.lax.stop_gradient(value)
    pg = -(w * adv * logp).sum() / b
    ent = (w * entropy).sum() / b
    vloss = (w * (value - traj["returns"]) ** 2).sum() / b
    loss = pg - cfg.entropy_coef * ent + cfg.value_coef * vloss
    return loss, (pg, vloss, ent / jnp.maximum(w.sum() / b, 1e-6))


# --- ROLLOUT: B episodes of t_max steps ---


def _select(mask, on_true, on_false):
    """Per-episode choice between two [B, ...] pytrees."""
    return jax.tree.map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)),
                                               x, y), on_true, on_false)


def hand_over(stop, m: Maze, maze0: Maze, target, sp_mode):
    """At Alice's STOP (stop [B]): Bob's target s* and the state he starts from. reverse:
    s* stays s_0 and Bob starts where Alice stopped; repeat: s* = the snapshot of Alice's
    final state and the env is reset to s_0 (released SPBase:switch_agent)."""
    if sp_mode == "reverse":
        return target, m
    snap = jax.vmap(grid_obs, (0, None))(m, m.wall.shape[-1])
    return jnp.where(stop[:, None], snap, target), _select(stop, maze0, m)


def bob_reached(m: Maze, target):
    """Bob's success: the current snapshot (the clock left out) equals s* [B]."""
    return jnp.all(jax.vmap(grid_obs, (0, None))(m, m.wall.shape[-1]) == target, -1)


def rollout(params, key, variant, test_prob, cfg: Config):
    """B fresh episodes (target task with probability test_prob), each t_max steps, inactive
    steps masked. Returns (trajectory [T, B, ...], per-episode results [B])."""
    n, t_max, b = cfg.grid_size, cfg.max_steps, cfg.num_envs
    k_test, k_maze, k_stop, k_act = jax.random.split(key, 4)
    is_test = jax.random.bernoulli(k_test, test_prob, (b,))
    maze0 = jax.vmap(new_maze, (0, 0, None))(jax.random.split(k_maze, b), is_test, cfg)
    s0 = jax.vmap(grid_obs, (0, None))(maze0, n)  # [B, 9 (2n - 1)^2]
    rand_alice = variant == VARIANTS.index("random_alice")
    rand_stop = jax.random.randint(k_stop, (b,), 1, t_max // 2 + 1)  # released rand_switch_t
    mind = make_mind(cfg)
    flag = jnp.zeros((b, t_max + 2)).at[:, -1].set(is_test)  # the test-mode word

    def step(carry, x):
        m, phase, target, t_a, t_end, success = carry  # phase 0 Alice, 1 Bob, 2 done
        t, k = x
        bob = is_test | (phase == 1)
        active = phase < 2
        clock = jax.nn.one_hot(jnp.full(b, t), t_max + 2)
        obs = jnp.concatenate([jax.vmap(grid_obs, (0, None))(m, n), clock], -1)
        blind = is_test | (bob & (variant == VARIANTS.index("blind_bob")))
        tgt = jnp.concatenate([jnp.where(blind[:, None], 0.0, target), flag], -1)
        logits_a, _ = mind.apply(params["alice"], obs, tgt)
        logits_b, _ = mind.apply(params["bob"], obs, tgt)
        k_a, k_r = jax.random.split(k)
        a = jax.random.categorical(k_a, jnp.where(bob[:, None], logits_b, logits_a))
        random_a = jnp.where(t + 1 == rand_stop, STOP,
                             jax.random.randint(k_r, (b,), 0, STOP))
        a = jnp.where(rand_alice & ~bob, random_a, a)
        stop = active & ~bob & (a == STOP)
        nxt = _select(active, jax.vmap(env_step)(m, a), m)
        target, nxt = hand_over(stop, nxt, maze0, target, cfg.sp_mode)
        phase = jnp.where(stop, 1, phase)
        t_a = jnp.where(stop, t + 1, t_a)
        reached = jnp.where(is_test, jnp.all(nxt.pos == nxt.goal, -1),
                            (phase == 1) & bob_reached(nxt, target))
        done = active & reached
        t_end = jnp.where(done, t + 1, t_end)
        success = success | done
        phase = jnp.where(done, 2, phase)
        out = {"obs": obs, "target": tgt, "action": a, "bob": bob, "active": active}
        return (nxt, phase, target, t_a, t_end, success), out

    init = (maze0, jnp.zeros(b, jnp.int32), s0, jnp.zeros(b, jnp.int32),
            jnp.full(b, t_max, jnp.int32), jnp.zeros(b, bool))
    (_, _, _, t_a, t_end, success), traj = jax.lax.scan(
        step, init, (jnp.arange(t_max), jax.random.split(k_act, t_max)))
    return traj, dict(is_test=is_test, t_a=t_a, t_end=t_end, success=success)


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # {"alice": ..., "bob": ...}
    opt_state: Any
    variant: jax.Array  # () index into VARIANTS, traced
    target_episodes: jax.Array  # () target-task episodes so far
    target_steps: jax.Array  # () their env steps
    env_steps: jax.Array  # () all env steps (self-play included)
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_a, k_b, key = jax.random.split(key, 3)
    x = jnp.zeros((1, cfg.obs_dim))
    mind = make_mind(cfg)
    params = {"alice": mind.init(k_a, x, x), "bob": mind.init(k_b, x, x)}
    z = jnp.zeros(())
    return State(params, make_optimizer(cfg).init(params),
                 jnp.asarray(VARIANTS.index(cfg.variant), jnp.int32), z, z, z, key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    key, k_roll = jax.random.split(state.key)
    v = state.variant
    none = v == VARIANTS.index("none")
    test_prob = jnp.where(none, 1.0, cfg.target_task_prob)
    traj, ep = rollout(state.params, k_roll, v, test_prob, cfg)
    t_max = cfg.max_steps

    # episode rewards (Eq. 1-2; the target task's), then every active step's return
    t_a, t_end, success, is_test = ep["t_a"], ep["t_end"], ep["success"], ep["is_test"]
    stopped = ~is_test & (t_a > 0)
    t_b = bob_time(t_a, t_end, success, t_max)
    r_a, r_b = self_play_rewards(t_a, t_b, stopped, cfg.reward_scale,
                                 v == VARIANTS.index("flipped"))
    r_test = target_reward(success, t_end, cfg.target_time_penalty)
    r_bob = jnp.where(is_test, r_test, r_b)
    traj["returns"] = jnp.where(traj["bob"], r_bob, r_a)  # [T, B]
    traj["active"] = traj["active"].astype(jnp.float32)
    traj["trained"] = jnp.where(traj["bob"] | (v != VARIANTS.index("random_alice")), 1.0, 0.0)

    (_, (pg, vloss, ent)), grads = jax.value_and_grad(reinforce_loss, has_aux=True)(
        state.params, traj, cfg)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)

    # metrics: undefined ones carry a count (the runner writes NaN where it is 0)
    steps = traj["active"].sum(0)  # [B]
    sp, tt = stopped.astype(jnp.float32), is_test.astype(jnp.float32)
    n_sp, n_tt = sp.sum(), tt.sum()
    mean_sp = lambda x: (sp * x).sum() / jnp.maximum(n_sp, 1.0)  # noqa: E731
    mean_tt = lambda x: (tt * x).sum() / jnp.maximum(n_tt, 1.0)  # noqa: E731
    state = state.replace(params=params, opt_state=opt_state, key=key,
                          target_episodes=state.target_episodes + n_tt,
                          target_steps=state.target_steps + (tt * steps).sum(),
                          env_steps=state.env_steps + steps.sum())
    metrics = {
        "charts/alice_stops": n_sp, "charts/target_episodes": n_tt,
        "charts/t_alice": mean_sp(t_a), "charts/t_bob": mean_sp(t_b),
        "charts/bob_success": mean_sp(success), "charts/reward_alice": mean_sp(r_a),
        "charts/reward_bob": mean_sp(r_b),
        "charts/target_success": mean_tt(success), "charts/target_reward": mean_tt(r_test),
        "charts/target_episodes_total": state.target_episodes,
        "charts/target_steps_total": state.target_steps,
        "charts/env_steps_total": state.env_steps, "charts/env_steps": steps.sum(),
        "charts/entropy": ent, "losses/policy": pg, "losses/value": vloss}
    return state, metrics


NAN_UNLESS = {"charts/t_alice": "charts/alice_stops", "charts/t_bob": "charts/alice_stops",
              "charts/bob_success": "charts/alice_stops",
              "charts/reward_alice": "charts/alice_stops",
              "charts/reward_bob": "charts/alice_stops",
              "charts/target_success": "charts/target_episodes",
              "charts/target_reward": "charts/target_episodes"}
"""Self-play metrics are undefined (NaN in the log) in an update where no Alice STOPped (always
under `none`), target-task metrics where no target episode was drawn."""


def evaluate(state: State, cfg: Config):
    """Bob on num_envs fresh target-task episodes (sampled actions, as in training):
    target_success and target_reward; and the target-task episodes and env steps spent."""
    _, ep = rollout(state.params, jax.random.fold_in(state.key, 1), state.variant, 1.0, cfg)
    r = target_reward(ep["success"], ep["t_end"], cfg.target_time_penalty)
    return {"target_success": ep["success"].mean(), "target_reward": r.mean(),
            "target_episodes": state.target_episodes, "env_steps": state.env_steps}


# --- PLOT ---

PLOT_VARIANTS = ("self_play", "none", "blind_bob")


def compare(cfg: Config, variants=PLOT_VARIANTS, seed=0):
    """One compiled program: variant i starts from key i of split(PRNGKey(seed), V) and runs
    cfg.total_updates updates. Returns the metrics {name: [V, U]} (NaN-marked as logged)."""
    ids = jnp.array([VARIANTS.index(v) for v in variants])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(variants))

    def one(v, k):
        s = init(k, cfg).replace(variant=v)
        return jax.lax.scan(lambda s, _: update(s, cfg), s, None, cfg.total_updates)[1]

    m = jax.device_get(jax.jit(jax.vmap(one))(ids, keys))
    return run.mark_undefined({k: np.asarray(v) for k, v in m.items()}, NAN_UNLESS)


def plot_run(cfg: Config, out, m=None, variants=PLOT_VARIANTS):
    """t_A and t_B against updates, and target-task success against target-task episodes
    ([1]'s axis) and against all env steps, one seed per variant (`compare`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png, smooth

    m = compare(cfg, variants) if m is None else m
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(1, cfg.total_updates + 1)
    for i, var in enumerate(variants):
        col = f"C{i}"
        if var != "none":
            for key, ls in (("charts/t_alice", "-"), ("charts/t_bob", "--")):
                y = np.where(np.isnan(m[key][i]), np.nanmean(m[key][i]), m[key][i])
                axes[0].plot(x, smooth(y, 20), ls, color=col, label=f"{var}: {key[7:]}")
        succ = smooth(np.nan_to_num(m["charts/target_success"][i]), 40)
        axes[1].plot(m["charts/target_episodes_total"][i], succ, color=col, label=var)
        axes[2].plot(m["charts/env_steps_total"][i], succ, color=col, label=var)
    axes[0].set(xlabel="update", ylabel="steps", title="Alice's t_A (solid), Bob's t_B (dashed)")
    axes[1].set(xlabel="target-task episodes", ylabel="target-task success",
                title="self-play episodes free ([1]'s axis)")
    axes[2].set(xlabel="env steps, self-play included", ylabel="target-task success",
                title="self-play episodes counted")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Asymmetric self-play ({cfg.sp_mode}) on a {cfg.grid_size}x{cfg.grid_size} "
                 f"light-key maze, t_max {cfg.max_steps}, seed 0 of each", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) reruns seed 0 of self-play, no self-play
    and blind Bob at the run's config in one program (`compare`) and draws their curves."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, nan_unless=NAN_UNLESS, steps_metric="charts/env_steps",
                   summary_keys=["target_success", "target_reward", "target_episodes",
                                 "charts/t_alice", "charts/t_bob", "charts/bob_success"])
    if flags["--plot"] is not None:
        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        print(plot_run(Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
