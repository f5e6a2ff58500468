"""Go-Explore, phase 1 ("explore until solved"): an archive of cells, return, explore.

[1] A. Ecoffet, J. Huizinga, J. Lehman, K. O. Stanley, J. Clune. "Go-Explore: a New Approach
    for Hard-Exploration Problems." arXiv:1901.10995 (2019). Released code:
    uber-research/go-explore at a339fee^ (the 2019 version; `goexplore_py/`).
[2] The same authors. "First return, then explore." Nature 590 (2021), arXiv:2004.12919.

Phase 1 keeps an archive of cells. A cell is a coarse, discretised state: the downscaled
frame (8 x 11 grey pixels with 8 intensity levels, [1] Sec. 2.1 [M]) or, with domain
knowledge, the agent's position (here: the (row, col) of the grid envs). Each cell stores
the best trajectory found to it: its score, its length and the simulator state at its end,
plus four visit counts. One round, for each of a batch of explorers:

    select   P(c) = W(c) / sum_c' W(c')                                      [1] Sec. 2.1 [M]
             W(c) = 1 + sum_a [ w_a / (v_a(c) + eps1)^p_a + eps2 ]          [1] App. A.5 [M]
             a in {times seen, times chosen, times chosen since it led to a new or better
             cell, times an action led to it}; eps1 = 0.001, eps2 = 1e-5 (released
             `randselectors.py`); the 1 is the neighbour/level term without domain knowledge
    go       restore the cell's simulator state (no exploration on the way)  [1] Sec. 2.1 [M]
    explore  up to k = 100 random actions; each repeats the previous one with
             probability 0.95 (a geometric repeat of mean 20, released `explorers.py`)
    update   a reached cell enters the archive if it is new, or replaces the entry when
             score > best score, or score == best score and length < best length  [1] Sec. 2.1 [M]
             (only the phase's first arrival at a cell is tried: released `process_cell`)
             v_seen += 1 once per explore phase for every cell it passed through
(Section and appendix tags are from memory of arXiv v1 [M]: the method is Sec. 2, phase 1
Sec. 2.1; the weights are checked against the released code, not the appendix.)

JAX envs (gymnax DeepSea, the repo's GridMaze) keep their whole state in a pytree, so "go"
is exact and costs nothing: the archive holds one env state per cell ([K, ...] arrays) and
a return is an index. envpool's Atari (Montezuma's Revenge) has no clone/restore API: on
those ids there is no "go" and no selection (validate() rejects return_to_cell, so
`--no-return-to-cell` is required), the explorers continue from where their emulator
stands and only the archive is built: the no-return baseline, NOT [1]'s method.

Explorers are asynchronous within a round: one whose episode ends (DeepSea's bottom row,
the maze's goal or time limit) selects a new cell at the next step instead of idling, so
every env step the runner counts is a real step (`update` = `explore_steps` steps of every
explorer). In a round where no explorer's episode ends, every explorer selects at its first
step with the same counts and explores `explore_steps` steps, as in the released
synchronous round (`choose_cell(size=batch_size)`); the archive is still updated per step
in explorer order, not explorer by explorer after the round (see "Differences"), so the
two agree only up to which of two trajectories reaching one cell in a round is kept.

Reproduce (CPU, seconds; DeepSea N=20, Go-Explore against the no-return baseline):
    python exploration/go_explore.py --preset quick --num-seeds 8
    python exploration/go_explore.py --preset quick --num-seeds 8 --no-return-to-cell
    python exploration/go_explore.py --plot exploration/go_explore.png
`paper` preset: [1]'s Montezuma's Revenge sizes (no domain knowledge, 100 explorers, 300M
steps, 11 x 8 cells with 8 levels) as archive-only phase 1 WITHOUT return, since envpool
cannot restore states (not [1]'s method; its archive numbers are not comparable):
    python exploration/go_explore.py --preset paper
[1] abstract: the robustified policy (phases 1 and 2) scores over 43,000 points on
Montezuma's Revenge without domain knowledge, a mean over 650,000 with domain-knowledge
cells (max nearly 18 million). The phase-1 archive numbers of [1] (results, Sec. 3 [M])
were not checked here.

Measured here (2-core CPU, loaded, jax 0.10.2; `--plot`, 8 seeds, DeepSea N=20 in 19,200
steps): Go-Explore finds the treasure in 8/8 seeds (3-16 successful episodes each) and
visits 229 of the grid's cells (median); uniform cell selection 8/8 seeds (4-10 successful
episodes), 222.5 cells; the no-return baseline (sticky random exploration from the start)
0/8 seeds, 163.5 cells.

Logged per update: charts/distinct_cells (envs.Coverage: cells any explorer stood on),
charts/archive_cells, charts/best_score (best trajectory score in the archive),
charts/successes and charts/first_success (envs.Coverage: episodes with a positive return,
and the env step of the first; -1 before). Nothing is NaN.

Differences from the paper:
- Phase 2 (robustification by the Backward Algorithm of Salimans & Chen, arXiv:1812.03381:
  PPO started from the end of the best demonstration, moved back as it succeeds) is NOT
  built; the file is phase 1 only.
- envpool Atari: no state restore, so `*-v5` ids run only with `--no-return-to-cell`
  (validate() rejects the rest): no "go", no selection (explorers go on from their current
  emulator state, reset at game over), the chosen count goes to the cell the explorer
  stands in. Real Atari Go-Explore needs ale-py's cloneState/restoreState
  (host-side, not built). The downscaled cell is computed from envpool's preprocessed
  84x84 grey frame (max-pooled, frame skip 4) by exact area averaging (cv2 INTER_AREA),
  not from the raw 210x160 RGB frame the released code resizes; no random no-ops at
  reset (noop_max 1) and no sticky actions, as phase 1 needs a deterministic emulator.
- Selection weights: the count terms of the released `WeightedSelector` with the
  no-domain-knowledge script's values (seen 3.0, chosen 0.1, powers 0.5); the domain
  knowledge terms (missing horizontal/vertical neighbours, level weight, score neighbours)
  are not built, so position cells get the constant 1 in their place.
- The released code drops the last step before a death (`ignore_death`, Montezuma); not
  built. A cell reached on an episode's last step is archived (score, length) but never
  selected (nothing can be explored after the episode's end).
- The archive is a fixed-capacity table (`archive_size`); new cells found when it is full
  are dropped. Cells are looked up by comparing the full key with every stored key.
- Explorers update the archive after every step (in explorer order) rather than after the
  whole round, and select with the counts of that moment (see above).
"""

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import envs, run

# --- CONFIG ---

EPS1, EPS2 = 0.001, 0.00001  # [1] App. A.5 [M] / released randselectors.py `compute_weight`
COUNTS = ("seen", "chosen", "chosen_since_new", "action")  # columns of Archive.counts
SEEN, CHOSEN, CHOSEN_SINCE_NEW, ACTION = range(4)


@dataclass(frozen=True)
class Config:
    """Go-Explore phase 1. The algorithm's defaults are those of [1]'s no-domain-knowledge
    Montezuma run (released `phase1_montezuma_no_domain.sh` over the `main.py` defaults:
    batch, explore steps, repeat probability, selection weights, cell frames, budget); the
    default env is DeepSea N=20, where "go" can restore states. The Montezuma run of the
    `paper` preset cannot return (envpool) and is the no-return baseline, not [1]'s method."""

    env_id: str = "DeepSea-bsuite-20"
    """environment id (gymnax DeepSea-bsuite-<N>, GridMaze-*, or envpool Atari *-v5)"""
    total_timesteps: int = 300_000_000
    """environment steps of all explorers together (released script: max_compute_steps)"""
    num_explorers: int = 100
    """explorers run in parallel, each returning to its own selected cell (batch_size)"""
    explore_steps: int = 100
    """random steps of one explore phase (it also ends with the episode)"""
    repeat_action_prob: float = 0.95
    """probability that an explore step repeats the previous action (mean repeat 20)"""
    selection: str = "count"
    """count: P(c) proportional to the count-based W(c) of [1]; uniform: over all cells
    (used only with return_to_cell)"""
    return_to_cell: bool = True
    """go to the selected cell (needs state restore: not on envpool *-v5 ids); False: every
    phase starts from the start state (JAX envs) or where the explorer stands (Atari)"""
    optimize_score: bool = True
    """replace on higher score, or equal score and shorter; False: on shorter only"""
    seen_weight: float = 3.0
    """w of the times-seen count term"""
    seen_power: float = 0.5
    """p of the times-seen count term"""
    chosen_weight: float = 0.1
    """w of the times-chosen count term"""
    chosen_power: float = 0.5
    """p of the times-chosen count term"""
    chosen_since_new_weight: float = 0.0
    """w of the times-chosen-since-it-led-to-a-new-or-better-cell term"""
    chosen_since_new_power: float = 1.0
    """p of the times-chosen-since-new term"""
    action_weight: float = 0.0
    """w of the term counting steps that led into the cell"""
    action_power: float = 0.5
    """p of the action-count term"""
    archive_size: int = 50_000
    """capacity of the archive (cells found when it is full are dropped)"""
    frame_width: int = 11
    """pixel frames: columns of the downscaled cell frame"""
    frame_height: int = 8
    """pixel frames: rows of the downscaled cell frame"""
    frame_levels: int = 8
    """pixel frames: grey levels of the downscaled cell frame (floor(x / 255 * levels))"""
    max_episode_steps: int = 27_000
    """Atari only: episode cap in agent steps (frame skip 4)"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (grid envs)"""

    @property
    def steps_per_update(self) -> int:
        return self.num_explorers * self.explore_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    def validate(self):
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one round "
                             f"(num_explorers * explore_steps = {self.steps_per_update})")
        if self.selection not in ("count", "uniform"):
            raise ValueError(f"selection={self.selection!r} must be 'count' or 'uniform'")
        for name in ("seen_power", "chosen_power", "chosen_since_new_power", "action_power"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("frame_width", "frame_height", "frame_levels", "explore_steps",
                     "max_episode_steps", "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.is_atari and self.return_to_cell:
            raise ValueError(f"return_to_cell=True needs state restore, which env_id="
                             f"{self.env_id!r} (envpool) lacks: pass --no-return-to-cell")
        envs.check_id(self.env_id)


PRESETS = {
    # CPU demo: DeepSea N=20 (a uniform walk finds the treasure once in 2^20 episodes).
    "quick": dict(env_id="DeepSea-bsuite-20", total_timesteps=19_200, num_explorers=16,
                  archive_size=256),
    # [1]'s Montezuma sizes, archive-only: no return, since envpool cannot restore states.
    "paper": dict(env_id="MontezumaRevenge-v5", return_to_cell=False),
}


def make_env(cfg: Config):
    """The batched env (one per explorer), wrapped to count visited cells and successes."""
    if cfg.is_atari:  # phase 1 exploits determinism: no sticky actions, no random no-ops
        env = envs.make(cfg.env_id, cfg.num_explorers, repeat_action_probability=0.0,
                        noop_max=1, max_episode_steps=cfg.max_episode_steps,
                        episodic_life=False, reward_clip=False)
    else:
        env = envs.make(cfg.env_id, cfg.num_explorers)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.is_atari)


# --- CELLS ---


@functools.cache
def area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of exact area averaging (cv2.INTER_AREA when shrinking): output
    pixel i averages the input interval [i n_in / n_out, (i + 1) n_in / n_out)."""
    edges = np.arange(n_out + 1) * n_in / n_out
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return (overlap / (n_in / n_out)).astype(np.float32)


def downscale_cell(frame, height: int, width: int, levels: int):
    """[1] Sec. 2.1 [M]: a grey frame [..., H, W] (0..255) -> the cell key [..., H' * W']:
    area-averaged to height x width, then floor(x / 255 * levels) (released
    `convert_state`: cv2.resize INTER_AREA, /255 * MAX_PIX_VALUE, astype uint8)."""
    rows = jnp.asarray(area_matrix(height, frame.shape[-2]))
    cols = jnp.asarray(area_matrix(width, frame.shape[-1]))
    small = rows @ frame.astype(jnp.float32) @ cols.T  # (..., height, width)
    cell = jnp.floor(small / 255.0 * levels).astype(jnp.int32)
    return cell.reshape(*cell.shape[:-2], height * width)


def cell_keys(env, cfg: Config, obs, positions):
    """Cell of every explorer [B, D]: its (row, col) on grid envs (domain-knowledge cells),
    the downscaled last frame on Atari."""
    if cfg.is_atari:
        return downscale_cell(obs[:, -1], cfg.frame_height, cfg.frame_width, cfg.frame_levels)
    return positions.astype(jnp.int32)


def positions_of(env, vec_state):
    """(row, col) [B, 2] of the explorers' current states (grid envs)."""
    return jax.vmap(env.vecenv.env.position)(vec_state.env_state)


# --- ARCHIVE ---


@struct.dataclass
class Archive:
    keys: jax.Array  # (K, D) int32 cell keys
    filled: jax.Array  # (K,) bool
    terminal: jax.Array  # (K,) bool: reached on an episode's last step (never selected)
    score: jax.Array  # (K,) best trajectory score (-inf where empty)
    length: jax.Array  # (K,) int32 its length (INT_MAX where empty)
    counts: jax.Array  # (K, 4) int32: seen, chosen, chosen since new, action (COUNTS)
    env_state: Any  # (K, ...) simulator state at the end of the best trajectory (or None)
    size: jax.Array  # int32 cells stored


def empty_archive(capacity: int, key_dim: int, env_state_like) -> Archive:
    big = jnp.iinfo(jnp.int32).max
    states = None if env_state_like is None else jax.tree.map(
        lambda x: jnp.zeros((capacity, *x.shape), x.dtype), env_state_like)
    return Archive(jnp.zeros((capacity, key_dim), jnp.int32), jnp.zeros(capacity, bool),
                   jnp.zeros(capacity, bool), jnp.full(capacity, -jnp.inf),
                   jnp.full(capacity, big, jnp.int32), jnp.zeros((capacity, 4), jnp.int32),
                   states, jnp.zeros((), jnp.int32))


def cell_weights(counts, selectable, weights, powers):
    """[1] App. A.5 [M], released `WeightedSelector.get_weight` without domain knowledge:
    W(c) = 1 + sum_a [w_a / (v_a(c) + eps1)^p_a + eps2] over the four counts [K, 4];
    0 where a cell is not `selectable` (empty or terminal)."""
    v = counts.astype(jnp.float32)
    w = 1.0 + jnp.sum(jnp.asarray(weights) / (v + EPS1) ** jnp.asarray(powers) + EPS2, -1)
    return jnp.where(selectable, w, 0.0)


def accept(score, length, best_score, best_length, optimize_score: bool):
    """[1] Sec. 2.1 [M], released `should_accept_cell`: a trajectory replaces a cell's entry
    when its score is higher, or equal with a shorter length (optimize_score); else when it
    is shorter. An empty entry (-inf, INT_MAX) always accepts."""
    if optimize_score:
        return (score > best_score) | ((score == best_score) & (length < best_length))
    return length < best_length


def lookup(archive: Archive, key):
    """(index, found) of `key` [D]: its slot, or the next free one (== size) if absent."""
    match = archive.filled & jnp.all(archive.keys == key, -1)
    found = match.any()
    return jnp.where(found, jnp.argmax(match), archive.size), found


def add_visit(archive: Archive, seen, arrived, start, key, score, length, terminal, env_state,
              optimize_score: bool):
    """One explorer's step into cell `key` with trajectory (score, length): counts (seen once
    per phase, via the phase's `seen` mask [K]; action every step), then the accept rule
    (new cell, or better score, or equal score and shorter), tried only on the phase's FIRST
    arrival at the cell (the `arrived` mask [K]; the released `process_cell` keeps a restore
    point only for the first arrival, `if e.to.cell in seen_to: e.to.restore = None`). An
    accepted step resets the chosen-since-new count of the phase's start cell. Returns
    (archive, seen, arrived, index or -1 when the archive is full)."""
    capacity = archive.filled.shape[0]
    idx, found = lookup(archive, key)
    room = found | (archive.size < capacity)
    i = jnp.minimum(idx, capacity - 1)
    first_seen = room & ~seen[i]
    counts = archive.counts.at[i, SEEN].add(first_seen.astype(jnp.int32))
    counts = counts.at[i, ACTION].add(room.astype(jnp.int32))
    ok = room & ~arrived[i] & accept(score, length, archive.score[i], archive.length[i],
                                     optimize_score)
    counts = counts.at[start, CHOSEN_SINCE_NEW].set(
        jnp.where(ok, 0, counts[start, CHOSEN_SINCE_NEW]))
    put = lambda a, v: a.at[i].set(jnp.where(ok, v, a[i]))
    new = Archive(
        put(archive.keys, key), put(archive.filled, True), put(archive.terminal, terminal),
        put(archive.score, score), put(archive.length, length), counts,
        None if archive.env_state is None else jax.tree.map(put, archive.env_state, env_state),
        archive.size + (room & ~found).astype(jnp.int32))
    return (new, seen.at[i].set(seen[i] | room), arrived.at[i].set(arrived[i] | room),
            jnp.where(room, i, -1))


# --- STATE ---


@struct.dataclass
class State:
    archive: Archive
    env_state: Any  # envs.CoverageState over the explorers' envs
    start: jax.Array  # (B,) archive index the current phase started from
    cur: jax.Array  # (B,) archive index of the cell each explorer stands in (-1: not stored)
    score: jax.Array  # (B,) score of the trajectory from the episode start
    length: jax.Array  # (B,) int32 its length
    phase_steps: jax.Array  # (B,) int32 steps of the current explore phase
    phase_over: jax.Array  # (B,) bool: select a cell before the next step
    action: jax.Array  # (B,) int32 last action (repeated with repeat_action_prob)
    seen: jax.Array  # (B, K) bool cells seen during the current phase (its start included)
    arrived: jax.Array  # (B, K) bool cells stepped into during the current phase
    key: jax.Array
    go: jax.Array  # bool: cfg.return_to_cell, traced (one program can run both variants)


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    k_env, key = jax.random.split(key)
    obs, env_state = env.reset(k_env)
    B = cfg.num_explorers
    pos = None if cfg.is_atari else positions_of(env, env_state.inner)
    keys = cell_keys(env, cfg, obs, pos)  # (B, D): every explorer starts in the same cell
    inner = None if cfg.is_atari else jax.tree.map(lambda x: x[0], env_state.inner.env_state)
    archive = empty_archive(cfg.archive_size, keys.shape[-1], inner)
    seen = jnp.zeros(cfg.archive_size, bool)
    archive, _, _, _ = add_visit(archive, seen, seen, 0, keys[0], jnp.float32(0.0), jnp.int32(0),
                              jnp.bool_(False), inner, cfg.optimize_score)
    archive = archive.replace(counts=jnp.zeros_like(archive.counts))  # the start: no visit yet
    zi = jnp.zeros(B, jnp.int32)
    no_cells = jnp.zeros((B, cfg.archive_size), bool)
    return State(archive, env_state, zi, zi, jnp.zeros(B), zi, zi, jnp.ones(B, bool), zi,
                 no_cells, no_cells, key, jnp.asarray(cfg.return_to_cell))


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg)
    B = cfg.num_explorers
    weights = (cfg.seen_weight, cfg.chosen_weight, cfg.chosen_since_new_weight,
               cfg.action_weight)
    powers = (cfg.seen_power, cfg.chosen_power, cfg.chosen_since_new_power, cfg.action_power)

    def step(st: State, key):
        k_sel, k_new, k_rep, k_env = jax.random.split(key, 4)
        arch, need = st.archive, st.phase_over

        # --- SELECT --- P(c) proportional to W(c) ([1] Sec. 2.1 [M]), or uniform
        selectable = arch.filled & ~arch.terminal
        w = (cell_weights(arch.counts, selectable, weights, powers) if cfg.selection == "count"
             else selectable.astype(jnp.float32))
        chosen = jax.random.categorical(k_sel, jnp.log(w), shape=(B,))
        if cfg.is_atari:  # no restore through envpool: explore on from where it stands
            chosen = jnp.maximum(st.cur, 0)
        else:  # the baseline (go False) always returns to the start state (slot 0)
            chosen = jnp.where(st.go, chosen, 0)
        start = jnp.where(need, chosen, st.start)
        inc = need.astype(jnp.int32)
        counts = arch.counts.at[chosen, CHOSEN].add(inc).at[chosen, CHOSEN_SINCE_NEW].add(inc)
        counts = counts.at[chosen, SEEN].add(inc)  # the phase's first cell, seen once
        seen = jnp.where(need[:, None], jax.nn.one_hot(chosen, cfg.archive_size, dtype=bool),
                         st.seen)
        arrived = st.arrived & ~need[:, None]
        arch = arch.replace(counts=counts)

        # --- GO --- restore the cell's simulator state: exact, a gather of its pytree
        env_state, score, length = st.env_state, st.score, st.length
        if not cfg.is_atari:
            vs = env_state.inner
            restored = jax.tree.map(lambda a: a[chosen], arch.env_state)
            sel = lambda a, b: jnp.where(need.reshape(-1, *[1] * (a.ndim - 1)), a, b)
            score = jnp.where(need, arch.score[chosen], score)
            length = jnp.where(need, arch.length[chosen], length)
            vs = vs.replace(env_state=jax.tree.map(sel, restored, vs.env_state),
                            episode_return=score,
                            episode_length=length)
            env_state = env_state.replace(inner=vs)

        # --- EXPLORE --- random actions, each repeating the last with repeat_action_prob
        fresh = jax.random.randint(k_new, (B,), 0, env.num_actions)
        repeat = ~need & (jax.random.uniform(k_rep, (B,)) < cfg.repeat_action_prob)
        action = jnp.where(repeat, st.action, fresh)
        obs, env_state, reward, done, info = env.step(env_state, action, k_env)
        score, length = score + reward, length + 1
        keys = cell_keys(env, cfg, obs, info.get("position"))

        # --- ARCHIVE UPDATE --- one explorer after the other ([1] Sec. 2.1 [M])
        def visit(b, carry):
            arch, seen, arrived, cur = carry
            st_b = None if cfg.is_atari else jax.tree.map(
                lambda a: a[b], env_state.inner.env_state)
            arch, seen_b, arrived_b, i = add_visit(
                arch, seen[b], arrived[b], start[b], keys[b], score[b], length[b], done[b],
                st_b, cfg.optimize_score)
            return arch, seen.at[b].set(seen_b), arrived.at[b].set(arrived_b), cur.at[b].set(i)

        arch, seen, arrived, cur = jax.lax.fori_loop(0, B, visit, (arch, seen, arrived, st.cur))
        phase_steps = jnp.where(need, 0, st.phase_steps) + 1
        phase_over = done | (phase_steps >= cfg.explore_steps)
        new = State(arch, env_state, start, jnp.where(done, 0, cur),
                    jnp.where(done, 0.0, score), jnp.where(done, 0, length), phase_steps,
                    phase_over, action, seen, arrived, st.key, st.go)
        return new, None

    key, k_steps = jax.random.split(state.key)
    state, _ = jax.lax.scan(step, state, jax.random.split(k_steps, cfg.explore_steps))
    state = state.replace(key=key)
    return state, metrics_of(state)


def metrics_of(state: State):
    a, c = state.archive, state.env_state
    return {"charts/distinct_cells": c.visited.sum(), "charts/archive_cells": a.size,
            "charts/best_score": jnp.max(jnp.where(a.filled, a.score, -jnp.inf)),
            "charts/successes": c.positives, "charts/first_success": c.first_success}


def evaluate(state: State, cfg: Config):
    """Coverage and the archive at the end: distinct cells visited (envs.Coverage), cells
    archived, best trajectory score, successful episodes and the step of the first."""
    return {k.split("/")[1]: v for k, v in metrics_of(state).items()}


# --- MAIN ---


def plot_runs(out: str, seeds: int = 8):
    """Distinct cells against env steps on the quick preset (DeepSea N=20): Go-Explore,
    uniform cell selection, and the no-return baseline."""
    import dataclasses

    import matplotlib.pyplot as plt

    from common import plot

    base = Config(**PRESETS["quick"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for color, label, c in (
            ("C0", "Go-Explore (count weights)", base),
            ("C2", "Go-Explore (uniform selection)", dataclasses.replace(base,
                                                                        selection="uniform")),
            ("C1", "no return (random from start)", dataclasses.replace(
                base, return_to_cell=False))):
        train = jax.jit(jax.vmap(run.make_train(init, update, c)))
        _, m = train(jax.random.split(jax.random.PRNGKey(0), seeds))
        cells = np.asarray(m["charts/distinct_cells"])  # (seeds, updates)
        steps = np.arange(1, cells.shape[1] + 1) * c.steps_per_update
        ax.plot(steps, np.median(cells, 0), color=color, label=label)
        ax.fill_between(steps, cells.min(0), cells.max(0), color=color, alpha=0.2)
        print(label, cells[:, -1], "successes", np.asarray(m["charts/successes"])[:, -1])
    ax.set(xlabel="environment steps", ylabel="distinct cells visited",
           title=f"DeepSea N=20, {seeds} seeds (median, min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "archive_cells", "best_score",
                                               "successes", "first_success"])


if __name__ == "__main__":
    main()
