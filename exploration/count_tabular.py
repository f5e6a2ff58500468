"""Count-based exploration in the tabular setting: the MBIE-EB bonus beta * N(s,a)^(-1/2).

[1] A. L. Strehl, M. L. Littman. "An analysis of model-based Interval Estimation for Markov
    Decision Processes." J. Computer and System Sciences 74(8), 2008 (no arXiv id).
[2] L. Choshen, L. Fox, Y. Loewenstein. "DORA The Explorer: Directed Outreaching
    Reinforcement Action-Selection." ICLR 2018, arXiv:1804.04012 (the E-value mode only).

MBIE-EB keeps the visit counts n(s,a), n(s,a,s') and the reward sums of every pair, and
before every action solves the empirical MDP with an exploration bonus ([1] Sec. 3.3):

    R^(s,a) = (sum of rewards seen at (s,a)) / n(s,a),  T^(s'|s,a) = n(s,a,s') / n(s,a)
    Q(s,a) = R^(s,a) + beta / sqrt(n(s,a)) + gamma sum_s' T^(s'|s,a) max_a' Q(s',a')  [1]
    Q(s,a) = R_max / (1 - gamma)  for a pair never tried (n = 0)                   [1]
    a_t = argmax_a Q(s_t, a)  (ties broken uniformly at random)

so the intrinsic reward of the post, r^i = N(s,a)^(-1/2), enters with weight beta beside the
extrinsic one. The counts are updated with the step's transition BEFORE the bonus is computed
and the next plan made (so n >= 1 wherever the bonus is used). [1]'s sample cap m
(`sample_cap`, 0 = none) stops model and count updates of a pair after m samples.
The Q equation is solved by value iteration, warm-started from the last plan, until
max |Q_{k+1} - Q_k| < vi_tol * R_max (at most vi_max_iters sweeps).

`--learner q` swaps planning for Watkins Q-learning on the bonus-augmented reward of the
post, Q(s,a) += lr (r + beta N(s,a)^(-1/2) + gamma max_a' Q(s',a') - Q(s,a)), starting from
the same optimistic Q.  `--bonus dora` replaces the count by DORA's E-values [2]: a table
E = 1 learned by E(s,a) <- (1 - dora_lr) E(s,a) + dora_lr gamma_e E(s',a') on every counted step
(a' = the greedy action at s'), with bonus beta / sqrt(-log E(s,a)). With gamma_e = 0,
E = (1 - dora_lr)^n, so -log E = n (-log(1 - dora_lr)) and the DORA bonus is the count bonus
divided by sqrt(-log(1 - dora_lr)): the exact equivalence the tests check.

Environments (tabular tables P[s,a,s'], R[s,a,s'], start distribution; built in this file):
  RiverSwim ([1] Fig. 2): 6 states; "left" moves left surely (reward 5 when staying in state
    0); "right" moves right w.p. 0.3, stays 0.6, slips left 0.1 (state 0: stays 0.7; state 5:
    stays w.p. 0.3 with reward 10000, else left). Start: state 1 or 2.
  SixArms ([1] Fig. 2): hub 0; action i reaches room i+1 w.p. (1, .15, .1, .05, .03, .01);
    staying in room k with its action pays (50, 133, 300, 800, 1660, 6000).
  DeepSea (bsuite, Osband et al. 2019, arXiv:1908.03568): N x N, start top-left, one row
    down per step; "right" (per-cell action mapping, seed 0) costs 0.01/N, the bottom-right
    move pays 1. After the last row the walk restarts at the top (a continuing MDP).

Reproduce (CPU, about 20 s each on a loaded 2-core machine; the README plot):
    python exploration/count_tabular.py --preset paper --num-seeds 16 --run-dir runs/ct_eb
    python exploration/count_tabular.py --preset paper --num-seeds 16 --beta 0 --run-dir runs/ct_b0
    python exploration/count_tabular.py --preset paper --num-seeds 16 --learner q --run-dir runs/ctq
    python -m common.plot runs/ct_eb runs/ctq runs/ct_b0 --metric charts/total_reward \
        --out exploration/count_tabular_riverswim.png
    python exploration/count_tabular.py --preset sixarms --num-seeds 16
    python exploration/count_tabular.py --preset quick --num-seeds 8           # DeepSea(10)
[1] reports the total reward collected in 5000 steps on RiverSwim and SixArms (gamma = 0.95)
for E3, R-MAX, MBIE and MBIE-EB with per-domain tuned parameters [M: the table's values and
the tuned beta could not be read here]. The optimal policy's expected total over 5000 steps
is 3.34e6 on RiverSwim and 2.94e7 on SixArms (finite-horizon value iteration on the true
tables, computed here). Measured here (16 seeds, mean +- std, 2-core CPU, jax 0.10.2):
    RiverSwim  MBIE-EB 3.19e6 +- 0.21e6 (95% of optimal, every seed at the far bank);
               beta = 0: 2.50e4 (no seed leaves the left bank); Q-learning: 5.7e5 +- 1.1e5
    SixArms    MBIE-EB 9.9e6 +- 8.6e6 (beta = 0: 5.3e5)
    DeepSea(10), 3000 steps: 278 (the treasure in 281 of 300 walks; optimal 297); the
               optimism of untried pairs alone does this on the deterministic DeepSea (as
               R-MAX does), so beta = 0 scores the same; without optimism and bonus: -0.02.
With `--learner q` the optimistic start R_max/(1-gamma) dominates the bonus on RiverSwim
(totals within noise for beta in 0..1000).

Logged per update (`num_steps` steps): charts/reward (reward of these steps),
charts/total_reward (cumulative, [1]'s metric), charts/far_reward_hits (steps paid the
environment's largest reward: RiverSwim's 10000, SixArms' 6000, DeepSea's treasure),
charts/distinct_states, charts/distinct_pairs, charts/bonus (mean bonus of the pairs taken),
losses/bellman_residual (last max |Q_{k+1} - Q_k| of planning, or |TD error| for `q`) and
perf/vi_sweeps (mean sweeps per step). Nothing is NaN.

Differences from the paper:
- beta: [1] tuned beta per domain and its values could not be checked; the defaults
  (RiverSwim 1000, SixArms 10000, DeepSea 0.05, in reward units) were chosen by a coarse
  sweep here (16 seeds; RiverSwim 300-3000 all within 3%). [1]'s theoretical
  beta = R_max/(1-gamma) sqrt(ln(2|S||A|m/delta)/2) is far larger and explores longer.
- Value iteration stops at a tolerance, warm-started from the previous plan (the fixed
  point is the same; [1] "solves" the equations without fixing a method).
- RiverSwim's start state (1 or 2, uniformly) follows cruz-lucas/classic_pacmdp_envs; the
  figure of [1] does not show it. SixArms' room transitions follow the same repository.
- DeepSea restarts at the top instead of ending the episode, so the MDP is continuing like
  [1]'s; its action mapping is drawn with numpy (seed 0), not bsuite's seed.
- The DORA mode is the tabular E-value bonus only (no LLL action selection); a' is the
  greedy action of the current plan at s' rather than the action taken next.
"""

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run

# --- CONFIG ---

ENVS = ("RiverSwim", "SixArms", "DeepSea")


@dataclass(frozen=True)
class Config:
    """MBIE-EB ([1]); defaults are [1]'s RiverSwim experiment (5000 steps, gamma 0.95)."""

    env_id: str = "RiverSwim"
    """RiverSwim or SixArms ([1]'s testbeds), or DeepSea (bsuite, size deepsea_size)"""
    deepsea_size: int = 10
    """DeepSea only: side N of the N x N grid"""
    total_timesteps: int = 5000
    """environment steps of one run (one agent, no resets of its memory)"""
    num_steps: int = 100
    """environment steps per update (one logged row)"""
    learner: str = "mbie"
    """mbie: value iteration on the empirical model ([1]); q: Q-learning on r + r^+"""
    bonus: str = "count"
    """count: r^+ = beta n(s,a)^(-1/2) ([1]); dora: beta (-log E(s,a))^(-1/2) ([2])"""
    beta: float = 1000.0
    """bonus coefficient beta, in reward units (0: no bonus)"""
    gamma: float = 0.95
    """discount factor"""
    optimistic_init: bool = True
    """a never-tried pair is worth R_max / (1 - gamma) ([1]); False: 0"""
    sample_cap: int = 0
    """[1]'s m: a pair's model and count stop after m samples (0: never)"""
    vi_tol: float = 1e-4
    """value iteration stops when max |Q_{k+1} - Q_k| < vi_tol * R_max"""
    vi_max_iters: int = 2000
    """most value-iteration sweeps per step"""
    lr: float = 0.1
    """Q-learning step size (learner q)"""
    dora_lr: float = 0.1
    """E-value step size alpha_E (bonus dora)"""
    gamma_e: float = 0.0
    """E-value discount gamma_E (bonus dora); 0 makes -log E a scaled visit count"""

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.num_steps

    def validate(self):
        if self.env_id not in ENVS:
            raise ValueError(f"env_id={self.env_id!r} is not one of {ENVS}")
        if self.learner not in ("mbie", "q"):
            raise ValueError(f"learner={self.learner!r} must be 'mbie' or 'q'")
        if self.bonus not in ("count", "dora"):
            raise ValueError(f"bonus={self.bonus!r} must be 'count' or 'dora'")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_steps={self.num_steps})")
        for name in ("beta", "sample_cap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1)")
        if not 0 <= self.gamma_e < 1:
            raise ValueError(f"gamma_e={self.gamma_e} must be in [0, 1)")
        if not 0 < self.dora_lr < 1:
            raise ValueError(f"dora_lr={self.dora_lr} must be in (0, 1)")
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr={self.lr} must be in (0, 1]")
        if self.vi_tol <= 0 or self.vi_max_iters < 1:
            raise ValueError(f"vi_tol={self.vi_tol} must be > 0 and vi_max_iters="
                             f"{self.vi_max_iters} >= 1")


PRESETS = {
    # CPU demo: DeepSea(10), where dithering needs ~2^10 episodes.
    "quick": dict(env_id="DeepSea", deepsea_size=10, total_timesteps=3000, beta=0.05),
    "sixarms": dict(env_id="SixArms", beta=10_000.0),
    "paper": dict(),  # [1]'s RiverSwim: 5000 steps, gamma 0.95
}


# --- ENVIRONMENTS (tabular: P[s,a,s'], R[s,a,s'], start distribution p0[s]) ---


def riverswim():
    """[1] Fig. 2. Actions: 0 = left (with the current), 1 = right (against it)."""
    n = 6
    P, R = np.zeros((n, 2, n)), np.zeros((n, 2, n))
    for s in range(n):
        P[s, 0, max(s - 1, 0)] = 1.0
        if s == 0:
            P[s, 1, 0], P[s, 1, 1] = 0.7, 0.3
        elif s == n - 1:
            P[s, 1, s], P[s, 1, s - 1] = 0.3, 0.7
        else:
            P[s, 1, s - 1], P[s, 1, s], P[s, 1, s + 1] = 0.1, 0.6, 0.3
    R[0, 0, 0] = 5.0
    R[n - 1, 1, n - 1] = 10_000.0
    p0 = np.zeros(n)
    p0[1] = p0[2] = 0.5
    return P, R, p0


def sixarms():
    """[1] Fig. 2. From the hub (state 0) action i reaches room i+1 w.p. p_i, else stays;
    in room k one action (room 1: all but action 4) keeps the agent there and pays r_k, the
    others lead back to the hub."""
    p_arm = (1.0, 0.15, 0.1, 0.05, 0.03, 0.01)
    r_room = (50.0, 133.0, 300.0, 800.0, 1660.0, 6000.0)
    P, R = np.zeros((7, 6, 7)), np.zeros((7, 6, 7))
    for a, p in enumerate(p_arm):
        P[0, a, a + 1], P[0, a, 0] = p, 1.0 - p
    for k in range(1, 7):
        stay = [b for b in range(6) if b != 4] if k == 1 else [k - 1]
        for a in range(6):
            nxt = k if a in stay else 0
            P[k, a, nxt] = 1.0
            R[k, a, nxt] = r_room[k - 1] if nxt == k else 0.0
    p0 = np.zeros(7)
    p0[0] = 1.0
    return P, R, p0


def deepsea(n: int):
    """bsuite DeepSea(n), deterministic, as a continuing tabular MDP: state row * n + col."""
    right_action = np.random.RandomState(0).binomial(1, 0.5, (n, n))  # per-cell mapping
    S = n * n
    P, R = np.zeros((S, 2, S)), np.zeros((S, 2, S))
    for row in range(n):
        for col in range(n):
            for a in range(2):
                right = a == right_action[row, col]
                c = min(col + 1, n - 1) if right else max(col - 1, 0)
                nxt = 0 if row == n - 1 else (row + 1) * n + c
                r = -0.01 / n if right else 0.0
                if right and col == n - 1:
                    r += 1.0  # the treasure
                P[row * n + col, a, nxt] = 1.0
                R[row * n + col, a, nxt] = r
    p0 = np.zeros(S)
    p0[0] = 1.0
    return P, R, p0


@functools.cache
def make_mdp(env_id: str, deepsea_size: int):
    """(P, R, p0) as numpy arrays (cached; turned into jnp inside `update`)."""
    if env_id == "RiverSwim":
        mdp = riverswim()
    elif env_id == "SixArms":
        mdp = sixarms()
    elif env_id == "DeepSea":
        mdp = deepsea(deepsea_size)
    else:
        raise ValueError(f"env_id={env_id!r} is not one of {ENVS}")
    return tuple(x.astype(np.float32) for x in mdp)


def env_step(key, P, R, s, a):
    """Sample s' ~ P[s, a] and return (s', R[s, a, s'])."""
    s_next = jax.random.categorical(key, jnp.log(P[s, a]))
    return s_next, R[s, a, s_next]


# --- BONUS ---


def count_bonus(n, beta):
    """[1] r^+(s,a) = beta n(s,a)^(-1/2); 0 where n = 0 (optimism covers those pairs)."""
    n = jnp.asarray(n, jnp.float32)
    return jnp.where(n > 0, beta * jax.lax.rsqrt(jnp.maximum(n, 1.0)), 0.0)


def dora_bonus(e, beta):
    """[2] r^+(s,a) = beta / sqrt(-log E(s,a)); 0 where E = 1 (never updated)."""
    neglog = -jnp.log(e)
    return jnp.where(neglog > 0, beta * jax.lax.rsqrt(jnp.maximum(neglog, 1e-30)), 0.0)


def e_value_update(e, s, a, s_next, a_next, *, lr, gamma_e):
    """[2] SARSA-like E-value step on the all-zero-reward MDP:
    E(s,a) <- (1 - lr) E(s,a) + lr gamma_e E(s',a')."""
    return e.at[s, a].set((1 - lr) * e[s, a] + lr * gamma_e * e[s_next, a_next])


# --- MODEL AND PLANNING ---


def observe(counts, trans, rew_sum, s, a, s_next, r, learn):
    """Count updates: n(s,a) += 1, n(s,a,s') += 1, reward sum += r, where `learn` holds
    (it does not once a pair has reached [1]'s sample cap m)."""
    inc = learn.astype(counts.dtype)
    return (counts.at[s, a].add(inc), trans.at[s, a, s_next].add(inc),
            rew_sum.at[s, a].add(jnp.where(learn, r, 0.0)))


def empirical_model(counts, trans, rew_sum):
    """[1] R^(s,a) = reward sum / n(s,a), T^(s'|s,a) = n(s,a,s') / n(s,a) (0 where n = 0)."""
    n = jnp.maximum(counts, 1).astype(jnp.float32)
    return rew_sum / n, trans.astype(jnp.float32) / n[..., None]  # (S, A), (S, A, S)


def value_iteration(q, r_hat, t_hat, bonus, known, *, gamma, v_unknown, tol, max_iters):
    """[1] MBIE-EB: iterate Q <- R^ + bonus + gamma T^ max_a' Q(s',a') on tried pairs
    (`known`), Q = v_unknown elsewhere, from `q` until max |dQ| < tol or max_iters sweeps.
    Returns (Q, last max |dQ|, sweeps)."""
    def sweep(q):
        v = q.max(-1)  # (S,)
        return jnp.where(known, r_hat + bonus + gamma * (t_hat @ v), v_unknown)

    def cond(c):
        return (c[1] > tol) & (c[2] < max_iters)

    def body(c):
        q_new = sweep(c[0])
        return q_new, jnp.abs(q_new - c[0]).max(), c[2] + 1

    return jax.lax.while_loop(cond, body, (q, jnp.asarray(jnp.inf, q.dtype), 0))


def q_learning_update(q, s, a, r_plus, s_next, *, lr, gamma):
    """Watkins: Q(s,a) += lr (r + r^+ + gamma max_a' Q(s',a') - Q(s,a)). Returns (Q, TD)."""
    td = r_plus + gamma * q[s_next].max() - q[s, a]
    return q.at[s, a].add(lr * td), td


def greedy(key, q_s):
    """argmax_a Q(s, a) with ties broken uniformly at random."""
    best = q_s >= q_s.max()
    return jnp.argmax(jnp.where(best, jax.random.uniform(key, q_s.shape), -1.0))


# --- STATE ---


@struct.dataclass
class State:
    q: jax.Array  # (S, A) action values of the last plan
    counts: jax.Array  # (S, A) n(s,a), int32
    trans: jax.Array  # (S, A, S) n(s,a,s'), int32
    rew_sum: jax.Array  # (S, A) sum of rewards seen at (s,a)
    e: jax.Array  # (S, A) E-values of [2] (kept in every mode; used by bonus dora)
    s: jax.Array  # current state
    visited: jax.Array  # (S,) states seen
    total_reward: jax.Array
    far_hits: jax.Array  # steps paid the largest reward of the table
    key: jax.Array


def v_unknown(cfg: Config, r_max):
    """Value of a never-tried pair: R_max / (1 - gamma) with optimism ([1]), else 0."""
    return jnp.where(cfg.optimistic_init, r_max / (1.0 - cfg.gamma), 0.0)


def init(key, cfg: Config) -> State:
    P, R, p0 = (jnp.asarray(x) for x in make_mdp(cfg.env_id, cfg.deepsea_size))
    S, A = P.shape[:2]
    k_start, key = jax.random.split(key)
    s = jax.random.categorical(k_start, jnp.log(p0))
    q = jnp.full((S, A), v_unknown(cfg, R.max()), jnp.float32)
    return State(q, jnp.zeros((S, A), jnp.int32), jnp.zeros((S, A, S), jnp.int32),
                 jnp.zeros((S, A)), jnp.ones((S, A)), s, jnp.zeros(S, bool).at[s].set(True),
                 jnp.zeros(()), jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    P, R, _ = (jnp.asarray(x) for x in make_mdp(cfg.env_id, cfg.deepsea_size))
    r_max = R.max()
    v0 = v_unknown(cfg, r_max)

    def step(st: State, _):
        key, k_act, k_env = jax.random.split(st.key, 3)
        s = st.s
        a = greedy(k_act, st.q[s])
        s_next, r = env_step(k_env, P, R, s, a)
        learn = (cfg.sample_cap == 0) | (st.counts[s, a] < cfg.sample_cap)
        counts, trans, rew_sum = observe(st.counts, st.trans, st.rew_sum, s, a, s_next, r,
                                         learn)
        e = jnp.where(learn, e_value_update(st.e, s, a, s_next, jnp.argmax(st.q[s_next]),
                                            lr=cfg.dora_lr, gamma_e=cfg.gamma_e), st.e)
        bonus = dora_bonus(e, cfg.beta) if cfg.bonus == "dora" else count_bonus(counts, cfg.beta)
        if cfg.learner == "mbie":
            r_hat, t_hat = empirical_model(counts, trans, rew_sum)
            q, residual, sweeps = value_iteration(
                st.q, r_hat, t_hat, bonus, counts > 0, gamma=cfg.gamma, v_unknown=v0,
                tol=cfg.vi_tol * r_max, max_iters=cfg.vi_max_iters)
        else:
            q, td = q_learning_update(st.q, s, a, r + bonus[s, a], s_next, lr=cfg.lr,
                                      gamma=cfg.gamma)
            residual, sweeps = jnp.abs(td), 0
        new = State(q, counts, trans, rew_sum, e, s_next, st.visited.at[s_next].set(True),
                    st.total_reward + r, st.far_hits + (r == r_max), key)
        return new, dict(reward=r, bonus=bonus[s, a], residual=residual, sweeps=sweeps)

    state, m = jax.lax.scan(step, state, None, cfg.num_steps)
    metrics = {
        "charts/reward": m["reward"].sum(),
        "charts/total_reward": state.total_reward,
        "charts/far_reward_hits": state.far_hits,
        "charts/distinct_states": state.visited.sum(),
        "charts/distinct_pairs": (state.counts > 0).sum(),
        "charts/bonus": m["bonus"].mean(),
        "losses/bellman_residual": m["residual"].mean(),
        "perf/vi_sweeps": jnp.mean(m["sweeps"]),
    }
    return state, metrics


def evaluate(state: State, cfg: Config):
    """[1]'s measure: total reward over the run; plus far-reward hits and coverage."""
    return {"total_reward": state.total_reward, "far_reward_hits": state.far_hits,
            "distinct_states": state.visited.sum()}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["total_reward", "far_reward_hits",
                                               "distinct_states", "charts/bonus"])


if __name__ == "__main__":
    main()
