"""Novelty-search evolution strategies: NS-ES, NSR-ES and NSRA-ES (and plain ES).

[1] E. Conti, V. Madhavan, F. Petroski Such, J. Lehman, K. O. Stanley, J. Clune. "Improving
    Exploration in Evolution Strategies for Deep Reinforcement Learning via a Population of
    Novelty-Seeking Agents." NeurIPS 2018, arXiv:1712.06560. Reference code:
    uber-research/deep-neuroevolution (es_distributed/nses.py, configurations/humanoid_ns*.json,
    commit 65ed224), read for the defaults and the update below.
[2] T. Salimans, J. Ho, X. Chen, S. Sidor, I. Sutskever. "Evolution Strategies as a Scalable
    Alternative to Reinforcement Learning." arXiv:1703.03864 (the ES that [1] builds on).
[3] L. Weng. "Evolution Strategies", Lil'Log 2019 (the post).

A behaviour characterisation b(pi_theta) (here the final (x, y) of an episode) is compared
with an archive A of past behaviours. A meta-population of M agents takes turns:

    N(theta, A) = 1/k sum_{j in kNN(b(theta), A)} ||b(theta) - b_j||_2        [1] Eq. (2)
    P(m) = N(theta_m, A) / sum_j N(theta_j, A)                                 [1] Sec. 3.1
    theta_m^i = theta_m + sigma eps_i,  eps_i ~ N(0, I), mirrored pairs +-eps   [2]
    rN_i = centred_rank(N(theta_m^i, A)),  rF_i = centred_rank(F(theta_m^i))   [1] code
    NS-ES:   s_i = rN_i                                                         [1] Eq. (3)
    NSR-ES:  s_i = (rN_i + rF_i) / 2                                            [1] Sec. 3.2
    NSRA-ES: s_i = (1 - w) rN_i + w rF_i                                        [1] Sec. 3.3
    ES:      s_i = rF_i     (the baseline, the same code path: with M = 1 it is OpenAI-ES
                             [2]; with M > 1, M such agents picked by novelty)
    g = 1/(n sigma) sum_i eps_i s_i;  theta_m <- Adam(theta_m, -g + l2 theta_m) [1] Eq. (3-5)
    A <- A + {b(theta_m)}   (the updated agent; the M initial agents at init)   [1] code
    NSRA-ES: w starts at 1; if the updated agent's fitness beats the best so far,
             w <- min(1, w + delta); after t_max generations without improvement,
             w <- max(0, w - delta) (and the count restarts)                    [1] Sec. 3.3
(Equation and section numbers of [1] are from memory [mem]; "[1] code" was read.)

Environment: a procedural 2-D deceptive point maze (the paper's Humanoid U-wall trap, scaled
down). A point starts at (0, 0) inside a U-shaped wall whose bottom (y = 1) lies between it
and the goal (0, 2.5) and whose opening faces away from the goal. Fitness is
-||final - goal|| at the last of T = 50 steps; every point inside the U is >= 1.5 from the
goal, so "distance < 1" means the agent went out of the U and around it. Greedy ES walks
into the bottom of the U and stays there.

Reproduce (CPU demo, 1000 generations x 65 episodes, 8 seeds; swap --variant for the others):
    python evolution/novelty_es.py --preset quick --num-seeds 8                 # NSR-ES
    python evolution/novelty_es.py --preset quick --num-seeds 8 --variant es    # baseline
    2-core CPU (shared), per variant 5-8 s compile + 14-24 s for the 8 seeds. Seeds (of 8)
    that got out of the U (final y > 1.5 at some generation) / reached the goal region
    (best policy within 1.0 of the goal): ES 0 / 0 (all stuck at (0, 0.999), return -1.50);
    NS-ES 8 / 4; NSR-ES 3 / 3; NSRA-ES 5 / 5. The same seeds in one unchunked scan (other
    rounding; the runs are chaotic) reached the goal in ES 0, NS-ES 8, NSR-ES 6, NSRA-ES 4.
    Final positions: evolution/novelty_es_maze.png. ES with --meta-population-size 1
    (single-agent OpenAI-ES): 0 of 4 seeds left the U.
Paper hyperparameters on the maze (population 1000, sigma 0.02, Adam 0.01):
    python evolution/novelty_es.py --preset paper
[1] Fig. 2 (Humanoid with the U trap): ES ends in the trap; NS-ES, NSR-ES and NSRA-ES walk
around it, NSRA-ES scoring highest [mem; numbers only in a figure].

Differences from the paper:
- The 2-D point maze replaces MuJoCo Humanoid + U wall (not available offline); its policy
  is a 3-32-2 tanh MLP over (x, y, t/T) instead of 256-256 tanh over the Humanoid state,
  with no observation normalisation and no action noise (the maze is deterministic, so one
  rollout gives b and F; [1]'s code averages b over 5 rollouts).
- The archive is a fixed-capacity ring buffer (default larger than the whole run, so
  nothing is dropped); [1]'s archive is unbounded.
- The gradient carries the paper's 1/sigma; [1]'s code omits it (Adam makes the two
  nearly equal). Centred ranks are computed jointly over both halves of the mirrored
  pairs, as in [1]'s code (which keeps the novelties in a field named `signreturns` and
  ranks them with its "centered_sign_rank" mode: the same centred ranks).
- The NSRA-ES w schedule (single global w, trigger = the updated agent's fitness vs the
  best so far, delta 0.05, t_max 10) is from the paper's text as we remember it [mem]; the
  released code has no NSRA-ES. The post's last NSRA sentence is inverted and not followed.
- The `quick` CPU preset departs from the paper to fit 2 cores: population 64, sigma 0.1,
  lr 0.03, 1000 generations. With [1]'s sigma 0.02 / lr 0.01 at population 64, NS-ES still
  left the U in 4/4 seeds but NSR-ES in 0/4.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import blackbox, run
from common.envs import Env

# --- CONFIG ---

VARIANTS = ("es", "ns", "nsr", "nsra")


@dataclass(frozen=True)
class Config:
    """NS-ES family on the deceptive point maze; defaults are [1]'s Humanoid settings."""

    variant: str = "nsra"
    """es (fitness only), ns (novelty only), nsr ((N + F) / 2) or nsra (adaptive w)"""
    generations: int = 1000
    """ES generations (each updates one agent of the meta-population)"""
    population_size: int = 1000
    """perturbed policies per generation, in mirrored pairs (even) ([1] code: 1000 episodes)"""
    sigma: float = 0.02
    """perturbation scale ([1] code: noise_stdev 0.02)"""
    lr: float = 0.01
    """Adam step size ([1] code: 0.01)"""
    l2_coeff: float = 0.005
    """L2 weight decay added to the ES gradient ([1] code: l2coeff 0.005)"""
    meta_population_size: int = 5
    """agents M in the meta-population ([1]: 5)"""
    k: int = 10
    """nearest neighbours in the novelty score ([1]: 10)"""
    archive_capacity: int = 2048
    """ring-buffer size of the behaviour archive (oldest entries are overwritten)"""
    w_init: float = 1.0
    """NSRA-ES initial fitness weight w ([1]: 1.0)"""
    w_delta: float = 0.05
    """NSRA-ES step of w ([1]: 0.05)"""
    w_patience: int = 10
    """NSRA-ES t_max: generations without improvement before w decreases ([1]: 10)"""
    horizon: int = 50
    """maze episode length T"""
    max_speed: float = 0.25
    """largest move per step along each axis (action = max_speed * tanh(output))"""
    hidden: int = 32
    """hidden units of the tanh MLP policy"""
    goal_radius: float = 1.0
    """'reached the goal region': final distance to the goal below this (the U is >= 1.5)"""

    @property
    def num_updates(self) -> int:
        return self.generations

    @property
    def steps_per_update(self) -> int:
        return (self.population_size + 1) * self.horizon  # perturbations + updated agent

    def validate(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.population_size < 2 or self.population_size % 2:
            raise ValueError(
                f"population_size must be even and >= 2 (mirrored pairs), got "
                f"{self.population_size}")
        for name in ("generations", "meta_population_size", "k", "w_patience", "horizon",
                     "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sigma", "lr", "max_speed", "goal_radius"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.l2_coeff < 0 or self.w_delta < 0:
            raise ValueError(f"l2_coeff and w_delta must be >= 0, got {self.l2_coeff}, "
                             f"{self.w_delta}")
        if not 0.0 <= self.w_init <= 1.0:
            raise ValueError(f"w_init must be in [0, 1], got {self.w_init}")
        if self.archive_capacity < self.meta_population_size:
            raise ValueError(f"archive_capacity must be >= meta_population_size "
                             f"({self.meta_population_size}), got {self.archive_capacity}")


PRESETS = {
    # CPU demo on the maze: smaller population, larger steps.
    "quick": dict(variant="nsr", generations=1000, population_size=64, sigma=0.1, lr=0.03),
    "paper": dict(),
}

# --- ENVIRONMENT: a deceptive 2-D point maze ---

GOAL = (0.0, 2.5)
# Axis-aligned walls of the U: horizontal (y, x0, x1) and vertical (x, y0, y1).
H_WALLS = np.array([[1.0, -1.0, 1.0]], np.float32)  # the bottom of the U, facing the goal
V_WALLS = np.array([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0]], np.float32)  # its two sides
ARENA = np.array([[-3.0, -3.0], [3.0, 4.0]], np.float32)  # [min, max] of (x, y)
_EPS = 1e-3  # how far from a wall a blocked move stops


@struct.dataclass
class MazeParams:
    goal: jax.Array  # float32[2]


@struct.dataclass
class MazeState:
    pos: jax.Array  # float32[2]
    time: jax.Array  # int32


def _block(a, da, b, walls):
    """Move coordinate a by da unless that crosses a wall (c, b0, b1) with b in [b0, b1]:
    then stop _EPS short of the nearest such wall."""
    new = a + da
    c, b0, b1 = walls[:, 0], walls[:, 1], walls[:, 2]
    hit = ((a - c) * (new - c) <= 0) & (b >= b0) & (b <= b1) & (da != 0)
    dist = jnp.where(hit, jnp.abs(c - a), jnp.inf)
    j = jnp.argmin(dist)
    return jnp.where(hit.any(), c[j] - jnp.sign(da) * _EPS, new)


class PointMaze(Env):
    """Point mass in a U trap (common.envs.Env protocol). Obs (x, y, t/T); action in R^2
    is clipped to [-max_speed, max_speed]; x moves first, then y (walls block each axis).
    Reward -||pos - goal|| on the last step only; truncated at T."""

    action_shape = (2,)
    observation_shape = (3,)

    def __init__(self, horizon: int = 50, max_speed: float = 0.25):
        self.horizon, self.max_speed = horizon, max_speed

    def default_params(self) -> MazeParams:
        return MazeParams(goal=jnp.array(GOAL, jnp.float32))

    def _obs(self, state):
        return jnp.concatenate([state.pos, state.time[None] / self.horizon])

    def reset(self, key, params):
        state = MazeState(pos=jnp.zeros(2, jnp.float32), time=jnp.zeros((), jnp.int32))
        return self._obs(state), state

    def step(self, key, state, action, params):
        v = jnp.clip(action, -self.max_speed, self.max_speed)
        x = _block(state.pos[0], v[0], state.pos[1], jnp.asarray(V_WALLS))
        y = _block(state.pos[1], v[1], x, jnp.asarray(H_WALLS))
        pos = jnp.clip(jnp.stack([x, y]), ARENA[0], ARENA[1])
        state = MazeState(pos=pos, time=state.time + 1)
        done = state.time >= self.horizon
        reward = jnp.where(done, -jnp.linalg.norm(pos - params.goal), 0.0)
        return self._obs(state), state, reward, jnp.zeros((), bool), done


# --- NETWORKS: a tanh MLP over a flat parameter vector ---


def num_params(cfg: Config) -> int:
    return 3 * cfg.hidden + cfg.hidden + cfg.hidden * 2 + 2


def init_policy(key, cfg: Config) -> jax.Array:
    """Flat (W1, b1, W2, b2); [2]'s normc init (unit-norm columns; output scale 0.01)."""
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (3, cfg.hidden))
    w1 = w1 / jnp.linalg.norm(w1, axis=0, keepdims=True)
    w2 = jax.random.normal(k2, (cfg.hidden, 2))
    w2 = 0.01 * w2 / jnp.linalg.norm(w2, axis=0, keepdims=True)
    return jnp.concatenate([w1.ravel(), jnp.zeros(cfg.hidden), w2.ravel(), jnp.zeros(2)])


def policy(theta: jax.Array, obs: jax.Array, cfg: Config) -> jax.Array:
    h = cfg.hidden
    w1 = theta[: 3 * h].reshape(3, h)  # (3, H)
    b1 = theta[3 * h : 4 * h]
    w2 = theta[4 * h : 6 * h].reshape(h, 2)  # (H, 2)
    b2 = theta[6 * h :]
    return cfg.max_speed * jnp.tanh(jnp.tanh(obs @ w1 + b1) @ w2 + b2)


def rollout(theta: jax.Array, cfg: Config):
    """(fitness F = return, behaviour b = final (x, y)) of one deterministic episode."""
    env = PointMaze(cfg.horizon, cfg.max_speed)
    ret, _, state = blackbox.episode(env, lambda obs, _: policy(theta, obs, cfg),
                                     jax.random.PRNGKey(0), env.default_params(), cfg.horizon)
    return ret, state.pos


# --- ARCHIVE AND NOVELTY ---


@struct.dataclass
class Archive:
    data: jax.Array  # (capacity, bc_dim)
    count: jax.Array  # int32, behaviours ever inserted (slot = count % capacity)


def archive_init(capacity: int, dim: int) -> Archive:
    return Archive(jnp.zeros((capacity, dim), jnp.float32), jnp.zeros((), jnp.int32))


def archive_add(archive: Archive, b: jax.Array) -> Archive:
    slot = archive.count % archive.data.shape[0]
    return Archive(archive.data.at[slot].set(b), archive.count + 1)


def novelty(archive: Archive, b: jax.Array, k: int) -> jax.Array:
    """N(theta, A): mean distance from b to its k nearest archive entries ([1] Eq. 2);
    fewer than k entries: the mean over all of them."""
    cap = archive.data.shape[0]
    size = jnp.minimum(archive.count, cap)
    d = jnp.linalg.norm(archive.data - b, axis=-1)  # (capacity,)
    d = jnp.where(jnp.arange(cap) < size, d, jnp.inf)
    neg, _ = jax.lax.top_k(-d, min(k, cap))  # the k smallest distances, negated
    valid = jnp.isfinite(neg)
    return jnp.sum(jnp.where(valid, -neg, 0.0)) / jnp.maximum(valid.sum(), 1)


def selection_probs(nov: jax.Array) -> jax.Array:
    """P(m) = N_m / sum_j N_j ([1] Sec. 3.1); uniform when every novelty is 0."""
    total = nov.sum()
    return jnp.where(total > 0, nov / jnp.where(total > 0, total, 1.0), 1.0 / nov.shape[0])


# --- UPDATE: the ES step, score mixing and the NSRA-ES w schedule ---


def fitness_weight(w: jax.Array, cfg: Config) -> jax.Array:
    """Weight of the fitness ranks in the mixed score: es 1, ns 0, nsr 1/2, nsra w."""
    return {"es": jnp.ones_like(w), "ns": jnp.zeros_like(w), "nsr": jnp.full_like(w, 0.5),
            "nsra": w}[cfg.variant]


def mix_scores(rank_n: jax.Array, rank_f: jax.Array, w_f: jax.Array) -> jax.Array:
    """s = (1 - w) rN + w rF ([1] Sec. 3.3); w = 1/2 is NSR-ES's (N + F) / 2."""
    return (1.0 - w_f) * rank_n + w_f * rank_f


def es_gradient(eps: jax.Array, scores: jax.Array, sigma: float) -> jax.Array:
    """g = 1/(n sigma) sum_i s_i eps_i over n = 2 * pairs mirrored samples ([1] Eq. 3);
    scores = concat(s(+eps), s(-eps)), eps (pairs, P)."""
    half = eps.shape[0]
    return (scores[:half] - scores[half:]) @ eps / (2 * half * sigma)


def adapt_w(w, stall, best_f, f_new, cfg: Config):
    """NSRA-ES schedule (minimising f = -return): an improvement raises w by delta and
    resets the count; t_max generations without one lower w by delta ([1] Sec. 3.3)."""
    improved = f_new < best_f
    stall = jnp.where(improved, 0, stall + 1)
    lower = stall >= cfg.w_patience
    w = jnp.where(improved, jnp.minimum(1.0, w + cfg.w_delta),
                  jnp.where(lower, jnp.maximum(0.0, w - cfg.w_delta), w))
    return w, jnp.where(lower, 0, stall), jnp.minimum(best_f, f_new)


@struct.dataclass
class Strategy:
    theta: jax.Array  # (M, P) agents
    opt_state: optax.OptState  # Adam state per agent, leaves lead with M
    bc: jax.Array  # (M, 2) each agent's latest behaviour
    f: jax.Array  # (M,) each agent's latest f = -return
    archive: Archive
    w: jax.Array  # NSRA-ES fitness weight
    stall: jax.Array  # generations since the best f last improved
    best_f: jax.Array  # best f of an updated agent so far
    best_theta: jax.Array  # (P,) the policy that scored best_f ([1] reports the best policy)
    best_bc: jax.Array  # (2,) its behaviour


def init_strategy(theta, f, bc, cfg: Config) -> Strategy:
    """M agents with their initial f and behaviours; the behaviours seed the archive."""
    archive = archive_init(cfg.archive_capacity, bc.shape[-1])
    for m in range(theta.shape[0]):
        archive = archive_add(archive, bc[m])
    opt_state = jax.vmap(optax.adam(cfg.lr).init)(theta)
    i = jnp.argmin(f)
    return Strategy(theta, opt_state, bc, f, archive, jnp.asarray(cfg.w_init, jnp.float32),
                    jnp.zeros((), jnp.int32), f[i], theta[i], bc[i])


def ask(key, strat: Strategy, cfg: Config):
    """Pick agent m with P proportional to novelty; perturb it in mirrored pairs."""
    k_m, k_eps = jax.random.split(key)
    nov = jax.vmap(lambda b: novelty(strat.archive, b, cfg.k))(strat.bc)  # (M,)
    m = jax.random.choice(k_m, nov.shape[0], p=selection_probs(nov))
    eps = jax.random.normal(k_eps, (cfg.population_size // 2, strat.theta.shape[1]))
    theta = strat.theta[m]
    population = jnp.concatenate([theta + cfg.sigma * eps, theta - cfg.sigma * eps])
    return m, eps, population  # population (n, P)


def tell(strat: Strategy, m, eps, f, bc, cfg: Config):
    """One Adam step of agent m on the mixed ranks of novelty and fitness (-f)."""
    nov = jax.vmap(lambda b: novelty(strat.archive, b, cfg.k))(bc)  # (n,)
    w_f = fitness_weight(strat.w, cfg)
    rank_n, rank_f = blackbox.centered_ranks(nov), blackbox.centered_ranks(-f)  # separately
    g = es_gradient(eps, mix_scores(rank_n, rank_f, w_f), cfg.sigma)
    theta = strat.theta[m]
    opt_m = jax.tree.map(lambda x: x[m], strat.opt_state)
    upd, opt_m = optax.adam(cfg.lr).update(-g + cfg.l2_coeff * theta, opt_m)  # ascend g
    opt_state = jax.tree.map(lambda x, y: x.at[m].set(y), strat.opt_state, opt_m)
    strat = strat.replace(theta=strat.theta.at[m].set(theta + upd), opt_state=opt_state)
    return strat, {"novelty": nov.mean(), "grad_norm": jnp.linalg.norm(g)}


def record(strat: Strategy, m, f_m, bc_m, cfg: Config) -> Strategy:
    """Add the updated agent's behaviour to the archive, adapt w on its f, keep the best."""
    w, stall, best_f = adapt_w(strat.w, strat.stall, strat.best_f, f_m, cfg)
    better = f_m < strat.best_f
    return strat.replace(
        bc=strat.bc.at[m].set(bc_m), f=strat.f.at[m].set(f_m),
        archive=archive_add(strat.archive, bc_m), w=w, stall=stall, best_f=best_f,
        best_theta=jnp.where(better, strat.theta[m], strat.best_theta),
        best_bc=jnp.where(better, bc_m, strat.best_bc))


# --- TRAIN ---


@struct.dataclass
class State:
    strat: Strategy
    key: jax.Array
    evals: jax.Array  # episodes so far
    goal_evals: jax.Array  # episodes when an agent first ended within goal_radius (inf: not)


def init(key, cfg: Config) -> State:
    key, k = jax.random.split(key)
    theta = jax.vmap(lambda kk: init_policy(kk, cfg))(
        jax.random.split(k, cfg.meta_population_size))  # (M, P)
    ret, bc = jax.vmap(lambda t: rollout(t, cfg))(theta)
    evals = jnp.asarray(cfg.meta_population_size, jnp.float32)
    return State(init_strategy(theta, -ret, bc, cfg), key, evals, jnp.asarray(jnp.inf))


def update(state: State, cfg: Config):
    key, k = jax.random.split(state.key)
    m, eps, population = ask(k, state.strat, cfg)
    ret, bc = jax.vmap(lambda t: rollout(t, cfg))(population)  # (n,), (n, 2)
    strat, info = tell(state.strat, m, eps, -ret, bc, cfg)
    ret_m, bc_m = rollout(strat.theta[m], cfg)  # the updated agent: b for the archive
    strat = record(strat, m, -ret_m, bc_m, cfg)
    evals = state.evals + cfg.population_size + 1
    best = -strat.best_f
    goal_evals = jnp.where(jnp.isinf(state.goal_evals) & (best > -cfg.goal_radius), evals,
                           state.goal_evals)
    metrics = {
        "charts/best_return": best,
        "charts/return": ret_m,
        "charts/population_return": ret.mean(),
        "charts/novelty": info["novelty"],
        "charts/w": fitness_weight(strat.w, cfg),
        "charts/final_x": bc_m[0],
        "charts/final_y": bc_m[1],
        "charts/agent": m.astype(jnp.float32),
        "charts/archive_size": jnp.minimum(strat.archive.count, cfg.archive_capacity),
        "charts/evals": evals,
        "losses/grad_norm": info["grad_norm"],
    }
    return State(strat, key, evals, goal_evals), metrics


def evaluate(state: State, cfg: Config):
    """The best policy found in the run (re-rolled out), and when it reached the goal."""
    ret, bc = rollout(state.strat.best_theta, cfg)
    return {"best_return": ret, "best_final_x": bc[0], "best_final_y": bc[1],
            "reached_goal": (ret > -cfg.goal_radius).astype(jnp.float32),
            "evals_to_goal": state.goal_evals}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["best_return", "reached_goal", "evals_to_goal",
                                               "best_final_x", "best_final_y", "charts/w",
                                               "charts/archive_size"])


if __name__ == "__main__":
    main()
