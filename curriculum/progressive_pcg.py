"""Progressive procedural content generation (PPCG): a level generator whose difficulty follows
the agent's wins and losses.

[1] N. Justesen, R. R. Torrado, P. Bontrager, A. Khalifa, J. Togelius, S. Risi. "Illuminating
    Generalization in Deep Reinforcement Learning through Procedural Level Generation."
    NeurIPS 2018 Deep RL workshop, arXiv:1806.10729. Released code: github.com/njustesen/
    a2c_gvgai, `level_selector.py` (`ProgressivePCGSelector`), `a2c.py`.
The post (Weng 2020, "Curriculum for Reinforcement Learning", task-specific curricula): a
policy trained on one level overfits; "training over a simple curriculum that grows the task
difficulty together with the model performance helps its generalization to new
human-designed levels".

Every episode is played on a fresh level drawn by a generator with one difficulty knob
d in [0, 1]. The teacher owns d; after each episode of an environment (worker)

    d <- min(1, d + alpha)   on a win,     d <- max(0, d - alpha)   on a loss      (Eq. 1)

with alpha = 0.01 and d = 0 at the start (released ProgressivePCGSelector: one selector per
worker, so one d per parallel environment, updated episode by episode, and the next level
of that worker drawn at the new d). A later version of the released selector draws the
level at d' ~ U(0, d) (`upper_limit`; `sample_below` here, off by default).

Generator (this file's, for a JAX grid maze; [1]'s GVGAI generators scale the number of
enemies, walls and other sprites of Zelda, Solarfox, Frogs and Boulderdash with d): a
size x size grid with border walls; every interior cell is a wall with probability
d * max_wall_frac (the 4 cells around the start are kept free); the start is uniform over
the interior; the goal is the reachable cell whose shortest-path distance from the start is
nearest to 1 + d (D_max - 1), D_max the farthest reachable distance (ties broken at random):

    p_wall = d * max_wall_frac,   goal = argmin_{reachable c != start} |dist(c) - 1 - d (D_max - 1)|
                                                                                   (Eq. 2)

so d = 0 is an empty room with the goal next to the start and d = 1 a dense maze with the
goal at its far end. Reward 1 and a win on reaching the goal; a loss at max_steps. The
observation is the whole map, one-hot (wall, agent, goal) per cell, flattened (MLP policy).

Evaluation ([1]'s generalisation claim): success rate of the stochastic policy on
TEST_LEVELS, five hand-designed 9 x 9 mazes (corridors, rooms, pillars, a spiral, a zig-zag)
never produced by the generator, padded with walls to `size`.

Teachers (the id travels traced in the state: one compiled program for all arms):
`progressive` ([1]'s PPCG), `uniform` (d ~ U(0, 1) per level: [1]'s random-difficulty PCG),
`hard` (d = 1 always: [1]'s "hard levels only" arm), and `flipped` (broken: Eq. 1 with the
sign reversed, so a winning agent is sent to ever easier levels).

Learner: the shared PPO of common.rl with [1]'s A2C settings where they map (12 workers,
5-step rollouts, n-step returns = GAE lambda 1, one gradient step per rollout, lr 7e-4,
entropy 0.01, value 0.5, grad-norm 0.5): with one epoch of one minibatch the PPO ratio is 1
and its clipped surrogate has A2C's gradient.

Reproduce:
    python curriculum/progressive_pcg.py --preset quick --num-seeds 2 \
        --plot curriculum/progressive_pcg.png
    python curriculum/progressive_pcg.py --preset quick --teacher hard     # baseline
    python curriculum/progressive_pcg.py --preset paper                    # GPU

Measured (quick preset: 9 x 9, 32 workers, 204,800 steps; one CLI run of seed 0 and its
--plot rerun of three arms, 6.5 min together on a loaded 2-core CPU, load average ~20):
    PPCG's mean d climbs steadily from 0 to 0.50 (the CLI seed: 0.57), the workers winning
    65% of their episodes at the end (Eq. 1's balance point is 50% once d stops moving).
    success on the 5 hand-designed levels (16 episodes each), evaluated at 41k, 82k, 123k,
    164k, 205k steps:  PPCG 0.17 0.04 0.25 0.13 0.24;  uniform d 0 0 0 0 0.17;
    hard levels only (d = 1) 0 0 0.13 0.10 0.30  (the CLI seed: PPCG 0.09).
    At this budget every arm is still near the start of learning and the gaps are within
    seed noise: [1]'s result (PPCG generalising better than hard-only training, and reaching
    it with less data) is NOT reproduced here; PPCG leads early (first two evaluations).

Differences from the paper:
- A JAX grid maze with this file's generator (Eq. 2) and five hand-made test levels replace
  GVGAI's Zelda / Solarfox / Frogs / Boulderdash, their generators and their human levels
  (GVGAI is Java, not installable here). Observations are one-hot maps for an MLP, not
  pixels for a CNN.
- PPO of common.rl (Adam, per-minibatch advantage normalisation, value clipping) with one
  epoch of one minibatch stands in for A2C (RMSprop); the `quick` preset uses more PPO
  epochs and longer rollouts to learn on a CPU budget.
- The `paper` preset's 13 x 13 grid and 10M steps are from memory [M] (the released a2c.py
  defaults to 10M timesteps in one version); alpha 0.01, d_0 = 0 and 12 workers are the
  released code's.
- Within one env step of the vectorised envs the auto-reset level is drawn after that env's
  own d update (exact), but independently of the other envs' results of the same step (the
  released workers are separate processes, each with its own d: the same).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import rl, run
from common.envs import Env, VecEnv, VecState

TEACHERS = ("progressive", "uniform", "hard", "flipped")
"""[1]'s PPCG, uniform difficulty, hard levels only (d = 1), and the broken sign-flipped PPCG."""

TEST_LEVELS = (
    ("#########", "#S......#", "#######.#", "#.......#", "#.#######", "#.......#",
     "#######.#", "#G......#", "#########"),  # corridors
    ("#########", "#S..#...#", "#...#...#", "#.......#", "#...#...#", "###.#####",
     "#.......#", "#......G#", "#########"),  # rooms
    ("#########", "#S......#", "#.#.#.#.#", "#.......#", "#.#.#.#.#", "#.......#",
     "#.#.#.#.#", "#......G#", "#########"),  # pillars
    ("#########", "#S......#", "#######.#", "#G....#.#", "#####.#.#", "#.....#.#",
     "#.#####.#", "#.......#", "#########"),  # spiral
    ("#########", "#S#...#G#", "#.#.#.#.#", "#.#.#.#.#", "#.#.#.#.#", "#.#.#.#.#",
     "#...#...#", "#########", "#########"),  # zig-zag
)
"""Hand-designed 9 x 9 test levels ('#' wall, S start, G goal), never used in training."""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Progressive PCG on a JAX grid maze; defaults are [1]'s (A2C settings) where they map."""

    teacher: str = "progressive"
    """progressive ([1]) | uniform (d ~ U(0, 1)) | hard (d = 1) | flipped (broken: Eq. 1's
    sign reversed)"""
    alpha: float = 0.01
    """difficulty step per episode (Eq. 1)"""
    d_init: float = 0.0
    """difficulty of every worker at the start"""
    sample_below: bool = False
    """draw each level at d' ~ U(0, d) (the released selector's later upper_limit variant)"""
    size: int = 13
    """side of the square grid, border walls included (>= 9 for the test levels)"""
    max_wall_frac: float = 0.4
    """probability of a wall per interior cell at d = 1 (Eq. 2)"""
    max_steps: int = 100
    """episode length limit: not reaching the goal by then is a loss"""
    eval_episodes: int = 32
    """evaluation episodes per hand-designed test level"""
    num_envs: int = 12
    """parallel workers, each with its own difficulty d"""
    num_steps: int = 5
    """steps per worker per rollout (A2C's n-step)"""
    total_timesteps: int = 10_000_000
    """environment steps of the whole run"""
    lr: float = 7e-4
    """Adam learning rate (A2C's RMSprop rate)"""
    num_epochs: int = 1
    """optimisation epochs over each rollout (1: A2C's single step)"""
    num_minibatches: int = 1
    """minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 1.0
    """GAE lambda (1: A2C's n-step returns)"""
    clip_coef: float = 0.2
    """PPO ratio clip (inactive with one epoch of one minibatch)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layers of the actor and critic MLPs"""

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    def validate(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r} must be one of {TEACHERS}")
        for name in ("alpha", "d_init", "max_wall_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.size < 9:
            raise ValueError(f"size={self.size} must be >= 9 (the 9 x 9 test levels)")
        for name in ("max_steps", "eval_episodes", "num_envs", "num_steps", "num_epochs",
                     "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.steps_per_update})")
        if self.steps_per_update % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.steps_per_update} is not divisible "
                             f"by num_minibatches={self.num_minibatches}")


PRESETS = {
    "quick": dict(size=9, max_steps=40, num_envs=32, num_steps=16, num_epochs=4,
                  num_minibatches=4, gae_lambda=0.95, lr=1e-3, hidden=(128, 128),
                  total_timesteps=204_800, eval_episodes=16),
    "paper": dict(),
}

# --- ENV: a grid maze whose levels come from the generator (Eq. 2) ---

MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int32)


@struct.dataclass
class Level:
    walls: jax.Array  # bool [size, size]
    start: jax.Array  # int32 [2] (row, col)
    goal: jax.Array  # int32 [2]
    d: jax.Array  # float32 (): the difficulty it was generated at (-1 for a test level)


@struct.dataclass
class MazeState:
    pos: jax.Array  # int32 [2]
    time: jax.Array  # int32 ()


def bfs_distances(walls, start):
    """Shortest-path distances from `start` over free cells, 4-neighbourhood; unreachable and
    wall cells get size^2 (a Bellman-Ford sweep, size^2 rounds)."""
    n = walls.shape[0]
    far = n * n
    dist = jnp.full(walls.shape, far, jnp.int32).at[start[0], start[1]].set(0)

    def sweep(_, dist):
        p = jnp.pad(dist, 1, constant_values=far)
        nb = jnp.minimum(jnp.minimum(p[:-2, 1:-1], p[2:, 1:-1]), jnp.minimum(p[1:-1, :-2],
                                                                             p[1:-1, 2:]))
        return jnp.where(walls, far, jnp.minimum(dist, nb + 1))

    return jax.lax.fori_loop(0, (n - 2) ** 2, sweep, dist)


def generate_level(key, d, cfg: Config) -> Level:
    """Eq. 2: walls with probability d * max_wall_frac, a uniform start, the goal at the
    reachable distance nearest 1 + d (D_max - 1)."""
    n = cfg.size
    k_wall, k_start, k_tie = jax.random.split(key, 3)
    rows, cols = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
    border = (rows == 0) | (cols == 0) | (rows == n - 1) | (cols == n - 1)
    start = jnp.stack(divmod(jax.random.randint(k_start, (), 0, (n - 2) ** 2), n - 2)) + 1
    near = jnp.abs(rows - start[0]) + jnp.abs(cols - start[1]) <= 1  # kept free
    walls = border | ((jax.random.uniform(k_wall, (n, n)) < d * cfg.max_wall_frac) & ~near)
    dist = bfs_distances(walls, start)
    ok = (dist > 0) & (dist < n * n)
    d_max = jnp.where(ok, dist, 0).max()
    target = 1.0 + d * (d_max - 1)
    score = jnp.abs(dist - target) + 0.5 * jax.random.uniform(k_tie, (n, n))
    g = jnp.argmin(jnp.where(ok, score, jnp.inf))
    return Level(walls, start.astype(jnp.int32), jnp.stack(divmod(g, n)).astype(jnp.int32),
                 jnp.asarray(d, jnp.float32))


def hand_levels(cfg: Config) -> Level:
    """TEST_LEVELS as a batched Level [L, size, size], padded with walls (numpy constants)."""
    walls, starts, goals = [], [], []
    for rows in TEST_LEVELS:
        w = np.ones((cfg.size, cfg.size), bool)
        w[:9, :9] = [[c == "#" for c in r] for r in rows]
        walls.append(w)
        starts.append(next((i, r.index("S")) for i, r in enumerate(rows) if "S" in r))
        goals.append(next((i, r.index("G")) for i, r in enumerate(rows) if "G" in r))
    return Level(np.stack(walls), np.array(starts, np.int32), np.array(goals, np.int32),
                 np.full(len(TEST_LEVELS), -1.0, np.float32))


class Maze(Env):
    """Grid maze played on a `Level` (the params of an episode). Actions up, down, left,
    right; a move into a wall stays put; reward 1 and terminated at the goal; truncated at
    max_steps. Observation: one-hot (wall, agent, goal) per cell, flattened."""

    num_actions = 4
    action_shape = ()

    def __init__(self, cfg: Config):
        self.size, self.max_steps = cfg.size, cfg.max_steps
        self.observation_shape = (3 * cfg.size * cfg.size,)

    def obs(self, pos, level: Level):
        r, c = np.indices((self.size, self.size))
        at = lambda p: (r == p[0]) & (c == p[1])
        return jnp.stack([level.walls, at(pos), at(level.goal)]).astype(jnp.float32).ravel()

    def reset(self, key, level):
        pos = jnp.asarray(level.start, jnp.int32)
        return self.obs(pos, level), MazeState(pos, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, level):
        moved = state.pos + jnp.asarray(MOVES)[action]
        pos = jnp.where(level.walls[moved[0], moved[1]], state.pos, moved)
        time = state.time + 1
        terminated = jnp.all(pos == level.goal)
        truncated = (time >= self.max_steps) & ~terminated
        return (self.obs(pos, level), MazeState(pos, time), terminated.astype(jnp.float32),
                terminated, truncated)


# --- TEACHER: Eq. 1, one difficulty per worker, owning every auto-reset's level ---


def difficulty_step(d, done, win, alpha, sign=1.0):
    """Eq. 1 for the workers whose episode ended: d +/- alpha on a win / loss, clipped to
    [0, 1]; `sign` -1 is the broken (flipped) teacher."""
    return jnp.where(done, jnp.clip(d + sign * alpha * jnp.where(win, 1.0, -1.0), 0.0, 1.0), d)


def level_difficulty(key, d, teacher, cfg: Config):
    """The d a new level is generated at: the worker's d (progressive, flipped; U(0, d) with
    sample_below), U(0, 1) (uniform) or 1 (hard)."""
    k_below, k_uni = jax.random.split(key)
    own = jnp.where(cfg.sample_below, jax.random.uniform(k_below) * d, d)
    return jnp.select([teacher == TEACHERS.index("uniform"), teacher == TEACHERS.index("hard")],
                      [jax.random.uniform(k_uni), 1.0], own)


@struct.dataclass
class PCGState:
    vec: VecState  # the workers' episodes; vec.params holds each one's current Level
    d: jax.Array  # float32 [num_envs]: each worker's difficulty
    teacher: jax.Array  # int32 (): index into TEACHERS, traced


def _where(mask, a, b):
    return jax.tree.map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)),
                                               x, y), a, b)


class ProgressiveVecEnv(VecEnv):
    """`num_envs` mazes whose every level, after every auto-reset, is generated at the
    teacher's difficulty, updated by Eq. 1 from the episode that just ended."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        dummy = Level(np.zeros((cfg.size, cfg.size), bool), np.ones(2, np.int32),
                      np.array([1, 2], np.int32), np.float32(0))
        super().__init__(Maze(cfg), cfg.num_envs, lambda key: dummy)  # replaced in step

    def _levels(self, key, d, teacher):
        k_d, k_gen = jax.random.split(key)
        keys = jax.random.split(k_d, self.num_envs), jax.random.split(k_gen, self.num_envs)
        dl = jax.vmap(level_difficulty, (0, 0, None, None))(keys[0], d, teacher, self.cfg)
        return jax.vmap(generate_level, (0, 0, None))(keys[1], dl, self.cfg)

    def reset(self, key, teacher=None):
        teacher = TEACHERS.index(self.cfg.teacher) if teacher is None else teacher
        k_lvl, k_reset = jax.random.split(key)
        d = jnp.full(self.num_envs, self.cfg.d_init, jnp.float32)
        levels = self._levels(k_lvl, d, jnp.asarray(teacher, jnp.int32))
        obs, st = jax.vmap(self.env.reset)(jax.random.split(k_reset, self.num_envs), levels)
        zeros = jnp.zeros(self.num_envs)
        vec = VecState(st, levels, zeros, zeros.astype(jnp.int32))
        return obs, PCGState(vec, d, jnp.asarray(teacher, jnp.int32))

    def step(self, state: PCGState, action, key):
        k_step, k_lvl, k_reset = jax.random.split(key, 3)
        obs, vec, reward, done, info = super().step(state.vec, action, k_step)
        sign = jnp.where(state.teacher == TEACHERS.index("flipped"), -1.0, 1.0)
        d = difficulty_step(state.d, done, info["terminated"], self.cfg.alpha, sign)  # Eq. 1
        levels = self._levels(k_lvl, d, state.teacher)
        obs_r, st_r = jax.vmap(self.env.reset)(jax.random.split(k_reset, self.num_envs), levels)
        vec = vec.replace(env_state=_where(done, st_r, vec.env_state),
                          params=_where(done, levels, vec.params))
        return _where(done, obs_r, obs), PCGState(vec, d, state.teacher), reward, done, info


def ppo_setup(cfg: Config):
    """The PPO learner of common.rl on the progressive mazes (the runner counts updates)."""
    pcfg = rl.ppo_config(cfg, total_timesteps=cfg.steps_per_update, anneal_lr=False)
    env = ProgressiveVecEnv(cfg)
    return env, rl.make_ppo(env, pcfg)


# --- TRAINING ---


@struct.dataclass
class State:
    ppo: rl.PPOState
    key: jax.Array


def init_arm(key, cfg: Config, teacher) -> State:
    """Policy at random, every worker at d_init with its first level; `teacher` traced."""
    k_ppo, k_env, key = jax.random.split(key, 3)
    env, (ppo_init, _) = ppo_setup(cfg)
    ppo = ppo_init(k_ppo)
    obs, env_state = env.reset(k_env, teacher)
    return State(ppo.replace(obs=obs, env_state=env_state), key)


def init(key, cfg: Config) -> State:
    return init_arm(key, cfg, TEACHERS.index(cfg.teacher))


def update(state: State, cfg: Config):
    """One PPO (A2C-like) update on a rollout of the workers' levels; d moves inside it."""
    _, (_, ppo_update) = ppo_setup(cfg)
    ppo, m = ppo_update(state.ppo)
    es = ppo.env_state
    metrics = {"charts/difficulty": es.d.mean(),
               "charts/level_difficulty": es.vec.params.d.mean(),
               "charts/win_rate": m["charts/episodic_return"],
               "charts/episodes": m["charts/episodes"],
               **{k: v for k, v in m.items() if k.startswith("losses/")}}
    return state.replace(ppo=ppo), metrics


def hand_level_success(params, key, cfg: Config):
    """Success rate on each hand-designed test level [L] ([1]'s generalisation test): the
    stochastic policy, eval_episodes episodes per level, max_steps steps each."""
    env, _ = ppo_setup(cfg)
    net = rl.ActorCritic(4, False, cfg.hidden)
    maze = env.env
    lv = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), cfg.eval_episodes, 0),
                      hand_levels(cfg))
    obs, st = jax.vmap(maze.reset)(jax.random.split(key, lv.d.shape[0]), lv)

    def step(carry, k):
        obs, st, won = carry
        k_act, k_env = jax.random.split(k)
        pi, _ = net.apply(params, obs)
        a = pi.sample(seed=k_act)
        obs, st2, _, term, _ = jax.vmap(maze.step)(jax.random.split(k_env, a.shape[0]), st, a,
                                                     lv)
        st = _where(won, st, st2)  # a won episode stays won
        return (obs, st, won | term), None

    init_won = jnp.zeros(lv.d.shape[0], bool)
    (_, _, won), _ = jax.lax.scan(step, (obs, st, init_won), jax.random.split(key, cfg.max_steps))
    return won.reshape(len(TEST_LEVELS), cfg.eval_episodes).mean(1)


def evaluate(state: State, cfg: Config):
    """test_success: mean success over the hand-designed levels (test_level_i: each one);
    difficulty: the workers' mean d at the end."""
    per_level = hand_level_success(state.ppo.params, jax.random.fold_in(state.key, 1), cfg)
    return {"test_success": per_level.mean(), "difficulty": state.ppo.env_state.d.mean(),
            **{f"test_level_{i}": s for i, s in enumerate(per_level)}}


# --- PLOT ---


def plot_run(cfg: Config, out, seed=0, points=5, arms=("progressive", "uniform", "hard")):
    """d over training (progressive) and the test-level success of the `arms` (seed `seed`
    of each, one compiled program), evaluated `points` times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    seg = max(cfg.num_updates // points, 1)
    key = jax.random.split(jax.random.PRNGKey(seed), 1)[0]
    ids = jnp.array([TEACHERS.index(a) for a in arms])
    state = jax.jit(jax.vmap(lambda t: init_arm(key, cfg, t)))(ids)
    chunk = jax.jit(jax.vmap(lambda s: jax.lax.scan(lambda s, _: update(s, cfg), s, None, seg)))
    ev = jax.jit(jax.vmap(lambda s: evaluate(s, cfg)["test_success"]))
    ds, succ = [], []
    for _ in range(points):
        state, m = chunk(state)
        ds.append(np.asarray(m["charts/difficulty"]))
        succ.append(np.asarray(ev(state)))
    ds, succ = np.concatenate(ds, 1), np.stack(succ, 1)
    steps = np.arange(1, ds.shape[1] + 1) * cfg.steps_per_update
    print("test success:", dict(zip(arms, succ.round(3).tolist(), strict=True)))
    print("final d:", dict(zip(arms, ds[:, -1].round(3).tolist(), strict=True)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, t in enumerate(arms):
        if t in ("progressive", "flipped"):
            axes[0].plot(steps, ds[i], label=t)
        axes[1].plot(steps[seg - 1::seg][:points], succ[i], "o-", label=t)
    axes[0].set(xlabel="env steps", ylabel="mean d of the workers", ylim=(-0.02, 1.02),
                title="difficulty (Eq. 1)")
    axes[1].set(xlabel="env steps", ylabel="success on the 5 hand-designed levels",
                ylim=(-0.02, 1.02), title="generalisation to test levels")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` reruns seed 0 of PPCG, uniform d and d = 1 and draws d and the test-level
    success."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["test_success", "difficulty", "charts/win_rate"])
    if flags["--plot"] is not None:
        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot_run(Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
