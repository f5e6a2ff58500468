"""POET: Paired Open-Ended Trailblazer, environments and their agents evolved together.

[1] R. Wang, J. Lehman, J. Clune, K. O. Stanley. "Paired Open-Ended Trailblazer (POET):
    Endlessly Generating Increasingly Complex and Diverse Learning Environments and Their
    Solutions." arXiv:1901.01753, 2019.
[2] uber-research/poet (the authors' code; commit 1814d89 is POET, later ones E-POET):
    poet_algo.py, reproduce_ops.py, novelty.py, es.py, master.py, run_poet_local.sh.
Post: L. Weng, "Meta Reinforcement Learning" (2019), "Evolutionary Algorithm on Environment
Generation".

POET keeps a list of active (environment E, agent theta) pairs and repeats ([1] Alg. 2):
  1. Mutation, every N_mutate iterations: parents are active pairs whose agent scores >=
     repro_threshold in its own env; children E' = mutate(E) ([2] reproduce_ops): roughness
     clip(round(r + U(-0.6, 0.6), 1), 0, 10); gap (lo, hi) -> one of its 8 neighbours (+-0.4
     or 0 each), kept if gap_init_lo <= lo <= hi <= 8, hi >= gap_init_hi, first time (0, 0.8);
     stump height the same with step 0.2, max 5, first time (0, 0.4).
     Minimal criterion ([1] Alg. 3): mc_low <= F(theta_parent, E') <= mc_high. Novelty ([2]
     novelty.py): N(E') = mean of the k = 5 smallest Euclidean distances from enc(E') =
     (roughness, gap lo, hi, stump lo, hi) to every env ever admitted. Children passing the
     MC, most novel first, are admitted if the best active agent on E' passes it too (up to
     max_admitted); past the capacity the oldest pair is archived (its env stays in the
     novelty archive).
  2. Optimisation, every iteration: one ES step per active pair ([1] Alg. 1; [2] es.py):
       g = 1/(n sigma) sum_i (w_i+ - w_i-) eps_i over the n mirrored pairs, w = centred
       ranks of F(theta +- sigma eps_i) in [-0.5, 0.5];  theta <- theta + Adam(g - l2 theta)
     sigma and the learning rate decay per step to their floors.
  3. Transfer, every N_transfer iterations: for every target env, each other active agent is
     tried directly, F(theta_s, E_t), and after one proposal ES step on E_t; the best
     replaces the incumbent ONLY if it beats the incumbent's own F(theta_t, E_t) (then Adam,
     sigma and lr restart: [2] set_theta(reset_optimizer=True)).
JAX: each transfer's and mutation step's (agent, env) pairs are one vmapped rollout, the ES
steps of all pairs one vmap in a jitted scan; one `update` = N_mutate iterations, then one
mutation step.

TerrainRunner (not [1]'s BipedalWalker): a 2-D point-mass runner on a track of length 40
built from the encoding and a per-env seed: after a flat start, an obstacle every 5 units, a
pit of width U(gap lo, hi) or a stump of height U(stump lo, hi) (a coin each); the ground is
perturbed by roughness x 0.1 x unit-spaced random bumps. Actions (tanh): run (acceleration),
jump (take-off speed, on the ground only). Observations: velocity, on-ground, 10 ground
probes 0.5-5 ahead. Reward 300 x progress / 40 (a finish from x = 1 scores 292.5 and takes
>= 78 steps), -100 and the end for falling into a pit. Solved >= 230 ([1]).

Reproduce (CPU): python metarl/poet.py --preset quick --num-seeds 2 --plot metarl/poet.png
`paper` preset (the defaults): [2] at 1814d89 (run_poet_local.sh, es.py, master.py): 256 x 2
ES members, sigma 0.1/0.999/0.01, lr 0.01/0.9999/0.001, L2 0.01, N_transfer 25, N_mutate 200
(adjust_interval 8 x 25), 50000 iterations...; from [1] [M: Sec. 4 not re-read]: capacity 20
([2]: 25), MC [50, 300] ([2]: [25, 340]), policy 40-40 (each Config field names its source).
Ours (quick preset: 6 pairs, 32-member ES, 16-unit policy, a mutation step every 20
iterations, 800 iterations = 40 updates; 2 seeds, loaded 2-core CPU, ~3 min compiling + 50 s):
every mutation step admitted a child (41 envs created, 6 active), 9-21 of 24 possible
transfers per update. The hardest env solved by an agent that trained on it (es_t > 0,
counted right after each update's last transfer and admission), gap hi (2-seed mean): 0.8
(iteration 60) -> 1.8 (120) -> 2.6 (260) -> 3.0 (400) -> 3.4 (780), but 1.4 at 800; 1-3
of 6 envs solved at a time. Direct ES from scratch (`--no-reproduce --no-transfer --capacity
1 --start-env 0.2 0.8 4.4 0.2 1.2`, 800 iterations, 1 seed; measured before the ES-scale
fix, not re-run) stalled at 65 on an env a POET run had solved. Plot: metarl/poet.png.

Differences from the paper:
- TerrainRunner is a jitted point-mass analogue of [1]'s Box2D BipedalWalker (no JAX port),
  with [2]'s encoding, mutation steps, ranges and MC band; deterministic, so one evaluation
  episode per (agent, env) ([2]: 5). The MC's upper bound (300) never binds (a finish
  scores 292.5; with a finish reward of 320 nearly every child of a solved env was too easy
  or too hard and the quick run stalled; the tests' TINY with 280 reached gap 1.2 / 1.6
  instead of 4.0 / 2.8 in 20 updates).
- A pair's score (eligibility, solved count) is F(theta, E) of the theta that took the last
  ES step, in its population's rollout ([2]: the updated theta); transfers compare fresh
  scores. Solved counts only pairs whose agent took an ES step since it arrived (es_t > 0).
- Admission checks the best active agent by direct transfer only ([2] also tries a proposal
  step per agent); dedup rejects a child equal to an active env. Fixed shapes: all
  `capacity` slots computed, inactive ones masked; the novelty archive is a ring.
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run
from common.blackbox import centered_ranks

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """POET (Wang et al. 2019) on a jitted TerrainRunner, ES agents."""

    num_iterations: int = 50000
    """POET iterations (one ES step per active pair each; [2] 1814d89 run_poet_local.sh)"""
    mutate_interval: int = 200
    """N_mutate: iterations between mutation steps (one `update`; [2] 1814d89: 8 x 25)"""
    transfer_interval: int = 25
    """N_transfer: iterations between transfer attempts ([1], [2]: 25)"""
    capacity: int = 20
    """maximum number of active pairs; past it the oldest is archived ([1] [M]: 20; [2]: 25)"""
    archive_size: int = 1024
    """ring of env encodings ever admitted, for novelty (ours: a fixed size)"""
    max_children: int = 8
    """child envs mutated per mutation step ([2]: 8)"""
    max_admitted: int = 1
    """children admitted per mutation step at most ([2]: 1)"""
    mc_low: float = 50.0
    """minimal criterion: a child's score must be >= mc_low ([1] [M]: 50; [2]: 25)"""
    mc_high: float = 300.0
    """minimal criterion: a child's score must be <= mc_high ([1] [M]: 300; [2]: 340)"""
    repro_threshold: float = 200.0
    """a pair may reproduce when its agent scores >= this in its own env ([1], [2]: 200)"""
    novelty_k: int = 5
    """k nearest archived encodings in the novelty score ([1], [2]: 5)"""
    mutation_steps: tuple[float, ...] = (0.6, 0.4, 0.2)
    """roughness +-U(step), gap and stump-height increments ([2]: 0.6, 0.4, 0.2)"""
    max_encoding: tuple[float, ...] = (10.0, 8.0, 5.0)
    """maximum roughness, gap width, stump height ([2]: 10, 8, 5)"""
    start_env: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
    """encoding of the first env (roughness, gap lo, hi, stump lo, hi): flat ([1])"""
    reproduce: bool = True
    """mutate and admit new envs (False: plain ES on start_env, the direct baseline)"""
    transfer: bool = True
    """transfer attempts (False: the no-transfer ablation of [1] Sec. 4)"""
    pop_size: int = 512
    """ES members per pair per step, mirrored ([2]: 256 x 2)"""
    sigma: float = 0.1
    """ES noise std ([2]: 0.1)"""
    sigma_decay: float = 0.999
    """sigma multiplied per ES step ([2]: 0.999)"""
    sigma_min: float = 0.01
    """floor of sigma ([2]: 0.01)"""
    lr: float = 0.01
    """Adam learning rate ([2]: 0.01)"""
    lr_decay: float = 0.9999
    """lr multiplied per ES step ([2]: 0.9999)"""
    lr_min: float = 0.001
    """floor of lr ([2]: 0.001)"""
    l2_coef: float = 0.01
    """L2 weight decay in the ES update ([2]: 0.01)"""
    hidden: tuple[int, ...] = (40, 40)
    """policy MLP hidden sizes, tanh ([1]: 40-40)"""
    episode_steps: int = 200
    """steps per TerrainRunner episode (dt 0.1; a finish takes >= 78)"""
    solved_threshold: float = 230.0
    """an env counts as solved at this score ([1]: 230)"""
    dtype: str = "float32"
    """compute dtype of the policy: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations // self.mutate_interval

    @property
    def episodes_per_update(self) -> int:
        """Episodes computed per update, inactive slots included (perf/sps)."""
        m, p = self.capacity, self.pop_size + 1
        tr = (m * (m - 1) * (p + 1) + m * m) * self.transfer
        return (self.mutate_interval * m * p + self.mutate_interval // self.transfer_interval
                * tr + m * self.max_children * self.reproduce)

    @property
    def steps_per_update(self) -> int:
        return self.episodes_per_update * self.episode_steps

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of ('float32', 'bfloat16')")
        for name in ("num_iterations mutate_interval transfer_interval capacity archive_size "
                     "max_children max_admitted novelty_k pop_size sigma sigma_min lr lr_min "
                     "episode_steps sigma_decay lr_decay").split():
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.pop_size % 2:
            raise ValueError(f"pop_size={self.pop_size} must be even (mirrored pairs)")
        if self.mutate_interval % self.transfer_interval:
            raise ValueError(f"mutate_interval={self.mutate_interval} must be a multiple of "
                             f"transfer_interval={self.transfer_interval}")
        if self.num_iterations < self.mutate_interval:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= "
                             f"mutate_interval={self.mutate_interval}")
        if not self.mc_low < self.mc_high:
            raise ValueError(f"mc_low={self.mc_low} must be < mc_high={self.mc_high}")
        if self.max_admitted > self.max_children:
            raise ValueError(f"max_admitted={self.max_admitted} must be <= "
                             f"max_children={self.max_children}")
        if len(self.mutation_steps) != 3 or min(self.mutation_steps) <= 0:
            raise ValueError(f"mutation_steps={self.mutation_steps} must hold 3 values > 0")
        mx = self.max_encoding
        if len(mx) != 3 or mx[1] < GAP_INIT[1] or mx[2] < STUMP_INIT[1] or mx[0] < 0:
            raise ValueError(f"max_encoding={mx} must hold 3 values, gap >= {GAP_INIT[1]}, "
                             f"stump >= {STUMP_INIT[1]}, roughness >= 0")
        e = self.start_env
        if len(e) != 5 or min(e) < 0 or e[1] > e[2] or e[3] > e[4]:
            raise ValueError(f"start_env={e} must be 5 values >= 0 (roughness, gap lo <= hi, "
                             "stump lo <= hi)")
        if min(self.hidden, default=1) < 1:
            raise ValueError(f"hidden={self.hidden} must be sizes >= 1")


PRESETS = {
    # CPU demo: 6 pairs of 32-member ES, mutation every 20 iterations, 40 mutation steps.
    "quick": dict(num_iterations=800, mutate_interval=20, transfer_interval=5, capacity=6,
                  archive_size=64, pop_size=32, hidden=(16,), sigma_decay=1.0, lr=0.03,
                  lr_decay=1.0),
    "paper": dict(),
}

# --- TERRAIN RUNNER ---

TRACK, START, SPACING, RES = 40.0, 5.0, 5.0, 0.1  # track length, flat start, obstacle gap
NCELL = int((TRACK + 8.0) / RES)  # ground cells (the last ones beyond the finish)
NOBST = int((TRACK - START) / SPACING)
GRAVITY, JUMP_V, ACCEL, VMAX, FRICTION, STEP_UP, DT = 10.0, 8.0, 20.0, 5.0, 0.8, 0.3, 0.1
ROUGH_SCALE, PIT_DEPTH, FINISH_REWARD, FALL_PENALTY = 0.1, -10.0, 300.0, -100.0
PROBES = jnp.arange(1, 11) * 0.5  # ground probes ahead of the runner
OBS_DIM = 3 + PROBES.shape[0]
GAP_INIT, STUMP_INIT = (0.0, 0.8), (0.0, 0.4)  # [2] populate_array default values


def make_terrain(enc, key):
    """Ground height of every cell (PIT_DEPTH in pits) from the encoding and env seed."""
    k_type, k_gap, k_stump, k_rough = jax.random.split(key, 4)
    xs = (jnp.arange(NCELL) + 0.5) * RES
    x0 = START + SPACING * jnp.arange(NOBST)
    pit = jax.random.bernoulli(k_type, 0.5, (NOBST,))
    width = enc[1] + (enc[2] - enc[1]) * jax.random.uniform(k_gap, (NOBST,))
    height = enc[3] + (enc[4] - enc[3]) * jax.random.uniform(k_stump, (NOBST,))
    inside_pit = pit & (xs[:, None] >= x0) & (xs[:, None] < x0 + width)
    on_stump = ~pit & (xs[:, None] >= x0) & (xs[:, None] < x0 + 1.0)
    bumps = jax.random.uniform(k_rough, (int(TRACK) + 10,), minval=-1.0, maxval=1.0)
    rough = jnp.interp(xs, jnp.arange(bumps.shape[0]) * 1.0, bumps) * (xs > START)
    h = enc[0] * ROUGH_SCALE * rough + (on_stump * height).sum(1)
    return jnp.where(inside_pit.any(1), PIT_DEPTH, h)


def ground(terrain, x):
    return terrain[jnp.clip((x / RES).astype(jnp.int32), 0, NCELL - 1)]


def observe(terrain, s):
    x, y, vx, vy = s
    on = y <= ground(terrain, x) + 1e-3
    probes = jnp.clip(ground(terrain, x + PROBES) - y, -2.0, 2.0)
    return jnp.concatenate([jnp.stack([vx / VMAX, vy / JUMP_V, on * 1.0]), probes])


def env_step(terrain, s, action):
    """One dt of the runner: action (run, jump) in [-1, 1]. Returns (s', reward, done)."""
    x, y, vx, vy = s
    on = y <= ground(terrain, x) + 1e-3
    vx = jnp.where(on, jnp.clip(vx * FRICTION + ACCEL * action[0] * DT, -VMAX, VMAX), vx)
    vy = jnp.where(on & (action[1] > 0), JUMP_V * action[1], vy) - GRAVITY * DT
    x1, y1 = x + vx * DT, y + vy * DT
    wall = ground(terrain, x1) > jnp.maximum(y, y1) + STEP_UP  # a stump or rough step
    x1, vx = jnp.where(wall, x, x1), jnp.where(wall, 0.0, vx)
    g1 = ground(terrain, x1)
    land = y1 <= g1
    y1, vy = jnp.where(land, g1, y1), jnp.where(land, 0.0, vy)
    fell = y1 < -1.0
    r = FINISH_REWARD * (jnp.minimum(x1, TRACK) - jnp.minimum(x, TRACK)) / TRACK
    return (x1, y1, vx, vy), r + FALL_PENALTY * fell, fell | (x1 >= TRACK)


# --- POLICY ---


def policy_shapes(cfg: Config):
    sizes = (OBS_DIM, *cfg.hidden, 2)
    return [(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def num_params(cfg: Config) -> int:
    return sum(a * b + b for a, b in policy_shapes(cfg))


def policy(theta, obs, cfg: Config):
    """tanh MLP on a flat parameter vector theta; outputs (run, jump) in [-1, 1]."""
    dt, h, i = jnp.dtype(cfg.dtype), obs.astype(cfg.dtype), 0
    for a, b in policy_shapes(cfg):
        w = theta[i : i + a * b].reshape(a, b).astype(dt)
        h = jnp.tanh(h @ w + theta[i + a * b : i + a * b + b].astype(dt))
        i += a * b + b
    return h.astype(jnp.float32)


def init_theta(key, cfg: Config):
    parts, keys = [], jax.random.split(key, len(cfg.hidden) + 1)
    for (a, b), k in zip(policy_shapes(cfg), keys, strict=True):
        parts += [jax.random.normal(k, (a * b,)) / np.sqrt(a), jnp.zeros(b)]
    return jnp.concatenate(parts)


def episode_return(theta, enc, env_key, cfg: Config):
    """F(theta, E): the return of one deterministic episode of theta on env (enc, seed)."""
    terrain = make_terrain(enc, env_key)

    def step(carry, _):
        s, ret, alive = carry
        s2, r, done = env_step(terrain, s, policy(theta, observe(terrain, s), cfg))
        s = jax.tree.map(lambda a, b: jnp.where(alive, a, b), s2, s)
        return (s, ret + r * alive, alive & ~done), None

    s0 = (jnp.float32(1.0), jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0))
    (_, ret, _), _ = jax.lax.scan(step, (s0, jnp.float32(0.0), True), None, cfg.episode_steps)
    return ret


# --- ES ---


@struct.dataclass
class Adam:
    m: jax.Array
    v: jax.Array
    t: jax.Array  # Adam steps since the last reset


def adam_reset(theta):
    return Adam(jnp.zeros_like(theta), jnp.zeros_like(theta), jnp.zeros((), jnp.int32))


def es_grad(eps, f, sigma):
    """[2] es.py: eps [n, D] the n mirrored pairs' noise, f [2n] the returns of theta + sigma
    eps then theta - sigma eps; g = 1/(n sigma) sum_i (w_i+ - w_i-) eps_i, w = centred ranks of
    all 2n returns ([2]: grads /= len(returns), returns of shape (n, 2))."""
    n, w = eps.shape[0], centered_ranks(f)
    return eps.T @ (w[:n] - w[n:]) / (n * sigma)


def es_step(key, theta, opt: Adam, es_t, enc, env_key, cfg: Config):
    """One ES step ([1] Alg. 1, [2] es.py): theta <- theta + Adam(es_grad - l2 theta), Adam
    by hand for [2]'s eps placement (optimizers.py). theta itself runs in the same vmapped
    rollout as its population. Returns (theta', opt', F(theta, E))."""
    sigma = jnp.maximum(cfg.sigma * cfg.sigma_decay**es_t, cfg.sigma_min)
    lr = jnp.maximum(cfg.lr * cfg.lr_decay**es_t, cfg.lr_min)
    half = jax.random.normal(key, (cfg.pop_size // 2, theta.shape[0]))
    eps = jnp.concatenate([half, -half, jnp.zeros_like(half[:1])])  # last: theta itself
    f = jax.vmap(lambda e: episode_return(theta + sigma * e, enc, env_key, cfg))(eps)
    g = es_grad(half, f[:-1], sigma) - cfg.l2_coef * theta  # ascent direction
    t, m, v = opt.t + 1, 0.9 * opt.m + 0.1 * g, 0.999 * opt.v + 0.001 * g**2
    step = lr * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (jnp.sqrt(v) + 1e-8)
    return theta + step, Adam(m, v, t), f[-1]


# --- ENVIRONMENT EVOLUTION ---


def mutate_pair(key, lo_hi, step, init, vmax):
    """[2] populate_array: the first time (hi == 0) -> init; else one of the 8 neighbours
    (lo + {-1, 0, 1} step, hi + {-1, 0, 1} step, not both 0), rounded to 0.1, kept only if
    init_lo <= lo <= hi, init_hi <= hi, both <= vmax; none valid -> unchanged."""
    d = [(a, b) for a in (1.0, 0.0, -1.0) for b in (1.0, 0.0, -1.0) if (a, b) != (0.0, 0.0)]
    cand = jnp.round((lo_hi + jnp.array(d) * step) * 10) / 10
    ok = ((cand[:, 0] >= init[0]) & (cand[:, 1] >= init[1]) & (cand <= vmax + 1e-6).all(1)
          & (cand[:, 0] <= cand[:, 1] + 1e-6))
    pick = cand[jax.random.categorical(key, jnp.where(ok, 0.0, -jnp.inf))]
    new = jnp.where(ok.any(), pick, lo_hi)
    return jnp.where(lo_hi[1] <= 0, jnp.asarray(init), new)


def mutate(key, enc, cfg: Config):
    """A child encoding (roughness, gap lo, hi, stump lo, hi), [2] Reproducer.mutate."""
    k_r, k_g, k_s = jax.random.split(key, 3)
    (sr, sg, ss), (mr, mg, ms) = cfg.mutation_steps, cfg.max_encoding
    rough = jnp.round((enc[0] + jax.random.uniform(k_r, minval=-sr, maxval=sr)) * 10) / 10
    return jnp.concatenate([jnp.clip(rough, 0.0, mr)[None], mutate_pair(k_g, enc[1:3], sg,
                            GAP_INIT, mg), mutate_pair(k_s, enc[3:5], ss, STUMP_INIT, ms)])


def passes_mc(score, cfg: Config):
    """Minimal criterion ([1] Sec. 3): mc_low <= score <= mc_high."""
    return (score >= cfg.mc_low) & (score <= cfg.mc_high)


def novelty(enc, archive, count, k: int):
    """[2] novelty.py: mean Euclidean distance of enc to its k nearest archived encodings
    (fewer when the archive holds fewer)."""
    valid = jnp.arange(archive.shape[0]) < count
    d = jnp.where(valid, jnp.linalg.norm(archive - enc, axis=1), jnp.inf)
    near = -jax.lax.top_k(-d, min(k, archive.shape[0]))[0]
    fin = jnp.isfinite(near)
    return jnp.where(fin, near, 0.0).sum() / jnp.maximum(fin.sum(), 1)


def transfer_choice(direct, proposal, active):
    """[1] Sec. 3 / [2] pick_proposal: for each target t the best other active agent s on E_t,
    directly (direct[s, t]) or after the proposal step (proposal[s, t]); it replaces the
    incumbent only if it beats the incumbent's own score direct[t, t]. Returns (replace [M],
    source [M], from_proposal [M], best score [M])."""
    m = direct.shape[0]
    ok = active[:, None] & active[None, :] & ~jnp.eye(m, dtype=bool)
    both = jnp.where(ok[None], jnp.stack([direct, proposal]), -jnp.inf)  # [2, s, t]
    flat = both.transpose(2, 0, 1).reshape(m, 2 * m)
    best, score = flat.argmax(1), flat.max(1)
    replace = active & (score > jnp.diagonal(direct))
    return replace, best % m, best // m == 1, score


# --- STATE ---


@struct.dataclass
class State:
    encs: jax.Array  # [M, 5] env encodings
    env_keys: jax.Array  # [M, 2] env seeds (terrain)
    thetas: jax.Array  # [M, D] paired agents
    opt: Adam  # per pair
    es_t: jax.Array  # [M] ES steps of each pair's agent since it arrived (sigma, lr decay)
    active: jax.Array  # [M] bool
    created: jax.Array  # [M] iteration of admission
    scores: jax.Array  # [M] F(theta, E) after the last ES step
    archive: jax.Array  # [A, 5] every env encoding admitted (ring)
    count: jax.Array  # envs admitted so far
    iteration: jax.Array
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_th, k_env, key = jax.random.split(key, 3)
    m, d = cfg.capacity, num_params(cfg)
    enc0 = jnp.asarray(cfg.start_env, jnp.float32)
    encs = jnp.zeros((m, 5)).at[0].set(enc0)
    thetas = jnp.zeros((m, d)).at[0].set(init_theta(k_th, cfg))
    env_keys = jax.random.split(k_env, m)
    archive = jnp.zeros((cfg.archive_size, 5)).at[0].set(enc0)
    return State(encs, env_keys, thetas, jax.vmap(adam_reset)(thetas), jnp.zeros(m, jnp.int32),
                 jnp.arange(m) == 0, jnp.zeros(m, jnp.int32), jnp.zeros(m), archive,
                 jnp.int32(1), jnp.int32(0), key)


def es_iteration(state: State, key, cfg: Config) -> State:
    """Step 2: one ES step for every pair in one vmap (inactive slots computed, discarded);
    scores = F(theta, E) of the thetas that took the step."""
    keys = jax.random.split(key, cfg.capacity)
    th, opt, f = jax.vmap(lambda k, t, o, n, e, ek: es_step(k, t, o, n, e, ek, cfg))(
        keys, state.thetas, state.opt, state.es_t, state.encs, state.env_keys
    )
    keep = partial(put_rows, state.active)
    return state.replace(
        thetas=keep(th, state.thetas),
        opt=jax.tree.map(keep, opt, state.opt),
        es_t=state.es_t + state.active,
        scores=keep(f, state.scores),
        iteration=state.iteration + 1,
    )


def put_rows(mask, new, old):
    """old with the rows where mask [M] is True taken from new (broadcast over trailing axes)."""
    return jnp.where(mask.reshape((-1,) + (1,) * (jnp.ndim(old) - 1)), new, old)


def apply_transfer(state: State, direct, proposal, prop_th):
    """Step 3's decision (pure): direct/proposal [s, t] scores, prop_th [s, t, D] the proposed
    agents. A replaced target gets the winner, its score, a fresh Adam and es_t = 0 (sigma and
    lr restart: [2] set_theta(reset_optimizer=True))."""
    m = direct.shape[0]
    replace, source, from_prop, score = transfer_choice(direct, proposal, state.active)
    new = jnp.where(from_prop[:, None], prop_th[source, jnp.arange(m)], state.thetas[source])
    thetas = put_rows(replace, new, state.thetas)
    opt = jax.tree.map(partial(put_rows, replace), jax.vmap(adam_reset)(thetas), state.opt)
    return state.replace(thetas=thetas, opt=opt, es_t=put_rows(replace, 0, state.es_t),
                         scores=put_rows(replace, score, state.scores)), replace.sum()


def transfer_step(state: State, key, cfg: Config):
    """Step 3: the proposal ES steps of all m(m-1) (source s != target t) pairs in one vmap,
    then every direct (incumbents included) and proposed agent on its target env in one
    vmapped rollout."""
    if not cfg.transfer:
        return state, jnp.int32(0)
    m = cfg.capacity
    src, tgt = np.nonzero(~np.eye(m, dtype=bool))  # the m(m-1) pairs s != t
    at = lambda t: (jax.tree.map(lambda x: x[t], state.opt), state.es_t[t], state.encs[t],
                    state.env_keys[t])  # target t's optimiser, decay and env
    prop = jax.vmap(lambda k, s, t: es_step(k, state.thetas[s], *at(t), cfg)[0])(
        jax.random.split(key, src.shape[0]), src, tgt)  # [m(m-1), D]
    s_all, t_all = (a.ravel() for a in np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))
    f = jax.vmap(lambda th, t: episode_return(th, state.encs[t], state.env_keys[t], cfg))(
        jnp.concatenate([state.thetas[s_all], prop]), np.concatenate([t_all, tgt]))
    direct = f[: m * m].reshape(m, m)  # [s, t]
    proposal = jnp.full((m, m), -jnp.inf).at[src, tgt].set(f[m * m :])
    prop_th = jnp.zeros((m, m, prop.shape[1])).at[src, tgt].set(prop)
    return apply_transfer(state, direct, proposal, prop_th)


def admit(state: State, children, seeds, on_child, nov, parents, cfg: Config) -> State:
    """Step 1's decision (pure). children [C, 5] with their env seeds, on_child [M, C] =
    F(theta_a, E'_c), nov [C], parents [C]. A child passes if its parent is eligible, the
    parent's score on it is within the MC, it equals no active env, and the best active
    agent on it also passes the MC; up to max_admitted pass, most novel first, each into a
    free slot or the oldest pair's, with the best agent, a fresh Adam, es_t = 0."""
    c = children.shape[0]
    eligible = state.active & (state.scores >= cfg.repro_threshold)
    dup = (jnp.abs(children[:, None] - state.encs[None]).max(-1) < 1e-6) & state.active
    parent_score = on_child[parents, jnp.arange(c)]  # the parent on its child
    ok = eligible.any() & passes_mc(parent_score, cfg) & ~dup.any(1)
    on_child = jnp.where(state.active[:, None], on_child, -jnp.inf)
    best_agent, best = on_child.argmax(0), on_child.max(0)
    rank = jnp.where(ok & passes_mc(best, cfg), nov, -jnp.inf)
    order = jnp.argsort(-rank)

    def one(j, st):
        ch = order[j]
        go = jnp.isfinite(rank[ch])
        oldest = jnp.where(st.active, st.created, jnp.iinfo(jnp.int32).max).argmin()
        slot = jnp.where((~st.active).any(), (~st.active).argmax(), oldest)
        sel = (jnp.arange(st.active.shape[0]) == slot) & go
        th = state.thetas[best_agent[ch]]
        put = partial(put_rows, sel)
        return st.replace(
            encs=put(children[ch], st.encs), env_keys=put(seeds[ch], st.env_keys),
            thetas=put(th, st.thetas), opt=jax.tree.map(put, adam_reset(th), st.opt),
            es_t=put(0, st.es_t), active=st.active | sel, created=put(st.iteration, st.created),
            scores=put(best[ch], st.scores), count=st.count + go,
            archive=jnp.where(go, st.archive.at[st.count % st.archive.shape[0]].set(children[ch]),
                              st.archive))

    return jax.lax.fori_loop(0, cfg.max_admitted, one, state)


def mutation_step(state: State, key, cfg: Config):
    """Step 1: mutate eligible parents, every active agent on every child, admit."""
    if not cfg.reproduce:
        return state
    k_par, k_mut, k_seed = jax.random.split(key, 3)
    c = cfg.max_children
    eligible = state.active & (state.scores >= cfg.repro_threshold)
    parents = jax.random.categorical(k_par, jnp.where(eligible, 0.0, -jnp.inf), shape=(c,))
    children = jax.vmap(lambda k, p: mutate(k, state.encs[p], cfg))(
        jax.random.split(k_mut, c), parents)
    seeds = jax.random.split(k_seed, c)
    nov = jax.vmap(lambda e: novelty(e, state.archive, state.count, cfg.novelty_k))(children)
    one = lambda th: jax.vmap(lambda e, k: episode_return(th, e, k, cfg))(children, seeds)
    on_child = jax.vmap(one)(state.thetas)  # [agent, child]: F(theta_a, E'_c), one rollout
    return admit(state, children, seeds, on_child, nov, parents, cfg)


# --- TRAIN ---


def solved_mask(state: State, cfg: Config):
    """Active pairs scoring >= solved_threshold whose agent took an ES step since it arrived
    (not a score inherited at admission or transfer)."""
    return state.active & (state.scores >= cfg.solved_threshold) & (state.es_t > 0)


def update(state: State, cfg: Config):
    """N_mutate POET iterations (ES steps, a transfer every N_transfer) then a mutation."""
    key, k_es, k_tr, k_mut = jax.random.split(state.key, 4)

    def block(carry, keys):
        st, n = carry
        es = lambda i, s: es_iteration(s, jax.random.fold_in(keys[0], i), cfg)
        st = jax.lax.fori_loop(0, cfg.transfer_interval, es, st)
        st, moved = transfer_step(st, keys[1], cfg)
        return (st, n + moved), None

    nb = cfg.mutate_interval // cfg.transfer_interval
    keys = jnp.stack([jax.random.split(k_es, nb), jax.random.split(k_tr, nb)], 1)
    (state, moved), _ = jax.lax.scan(block, (state, jnp.int32(0)), keys)
    new = mutation_step(state, k_mut, cfg).replace(key=key)
    solved = solved_mask(new, cfg)
    hard = lambda i: jnp.where(solved, new.encs[:, i], 0.0).max()
    return new, {
        "charts/num_active": new.active.sum() * 1.0,
        "charts/num_solved": solved.sum() * 1.0,
        "charts/mean_score": jnp.where(new.active, new.scores, 0).sum() / new.active.sum(),
        "charts/solved_gap_hi": hard(2),
        "charts/solved_stump_hi": hard(4),
        "charts/envs_created": new.count * 1.0,
        "charts/transfers": moved * 1.0,
        "charts/admitted": (new.count - state.count) * 1.0,
    }


# --- PLOT ---


def plot(history: dict, state, cfg: Config, out: str):
    """(a) the hardest solved gap / stump per mutation step (seed mean); (b) the active envs
    at the end (seed 0): gap hi vs stump hi, coloured by their agent's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    it = (np.arange(history["charts/num_active"].shape[1]) + 1) * cfg.mutate_interval
    for k in ("solved_gap_hi", "solved_stump_hi", "num_solved"):
        y = np.asarray(history[f"charts/{k}"])
        ax[0].plot(it, y.mean(0), label=f"{k} ({y.shape[0]} seeds)")
    ax[0].set(xlabel="POET iteration", title=f"hardest solved (>= {cfg.solved_threshold:g})")
    act = np.asarray(state.active[0])
    encs, sc = np.asarray(state.encs[0])[act], np.asarray(state.scores[0])[act]
    s = ax[1].scatter(encs[:, 2], encs[:, 4], c=sc, cmap="viridis", s=60, vmin=-100, vmax=320)
    fig.colorbar(s, ax=ax[1], label="paired agent's score")
    ax[1].set(xlabel="gap width hi", ylabel="stump height hi", title="active envs (seed 0)")
    [a.grid(alpha=0.3) for a in ax]
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = ["charts/num_active", "charts/num_solved", "charts/solved_gap_hi",
           "charts/solved_stump_hi", "charts/envs_created", "charts/mean_score"]


def main(argv=None):
    """The runner's CLI plus `--plot PNG`."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config, init, update, presets=PRESETS, argv=argv, doc=__doc__, summary_keys=SUMMARY
    )
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.history, res.state, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
