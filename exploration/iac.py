"""Intelligent Adaptive Curiosity (IAC): choose actions whose region of the sensorimotor space
promises the largest learning progress of its own forward model.

[1] P.-Y. Oudeyer, F. Kaplan, V. V. Hafner. "Intrinsic Motivation Systems for Autonomous
    Mental Development." IEEE Trans. Evolutionary Computation 11(2), 265-286, 2007 (no arXiv
    id; HAL hal-00793610; sections below are the authors' preprint's: 4 = IAC, 6 = the
    simulated robot). Summarised in L. Weng's post on exploration (2020). No official code
    (explauto holds R-IAC only).

IAC keeps a memory of exemplars (sensorimotor context SM(t), next state S(t+1)) split among
regions that tile the context space like the leaves of a decision tree ([1] Sec. 4.3):

    C1 (trigger): a region holding more than T exemplars is split in two;
    C2 (cut):     along the context dimension j at the value v that minimises
                  |R1| var(y | R1) + |R2| var(y | R2) = sum_{side} sum_i (y_i - mean_side y)^2;
    expert:       each region has its own forward model f_R(SM) ~ S(t+1), trained only on
                  its own exemplars; its squared error e_R(t) = (y - f_R(SM))^2 is measured
                  before the expert learns the exemplar and pushed to the region's list;
    progress:     LP_R(t) = <e_R>(t - tau) - <e_R>(t),  <e_R>(t) = sum_{i=0}^{theta} e_R(t - i)
                  / (theta + 1)  ([1] Sec. 4.5: theta + 1 = 26 terms; the post's
                  r^i_t = (1/k) sum_{i=0}^{k-1} (e_{t-i-tau} - e_{t-i}) has k terms);
    action:       draw K candidate actions, look up the region each falls in, and take the
                  one with the largest LP of its region (epsilon-greedy, [1] Sec. 4.6: a
                  random candidate with probability epsilon).

The JAX form: a fixed-capacity region table (at most R boxes [lo, hi), and per slot an
exemplar buffer of T + 1 slots, which is also the expert's memory, and an error ring buffer
of theta + 1 + tau), so one step (choose, observe, learn, maybe split) is a pure function and
the run is one `lax.scan`, vmapped over seeds. A split keeps the left half in the parent's
slot and writes the right half to slot `num_regions`; both children inherit the parent's
error history. The C2 cut is one sort and cumulative sums per dimension, and a step writes
only the two rows a split touches (selected by whether it splits: under vmap a `lax.cond`
would run both branches anyway).

Environment (in this file; [1]'s robots are not available): the context is the action
x in [0, 1)^d itself, and x_0 selects one of three zones of equal width, as [1] Sec. 6's
sound frequency does (f1 random toy, f2 learnable, f3 easy):
    A  x_0 < 1/3:          y = 0.5 (trivially predictable; [1]'s f3)
    B  1/3 <= x_0 < 2/3:   y = sin(2 pi b_freq x_0) cos(pi sum_{j>0} x_j), b_freq = 24
                           (learnable, nonlinear; [1]'s f2)
    C  x_0 >= 2/3:         y ~ U(-noise_scale, noise_scale) (pure noise; [1]'s f1)
IAC should spend most time in B: A is learned at once (no progress left), C never.
`--reward error` is [1]'s MAX baseline (Sec. 6.5): the region's recent mean error <e_R>(t)
instead of LP (maximising raw prediction error, the noisy-TV trap), which is drawn to C.
`--epsilon 1` is [1]'s RANDOM baseline.

Expert: nearest neighbour ([1] Sec. 4.4, footnote 3): f_R(x) = the next state of the
exemplar of R closest to x (0 in a region without exemplars); learning is storing it.

Reproduce (CPU):
    python exploration/iac.py --preset quick --num-seeds 8 --plot exploration/iac.png
    python exploration/iac.py --preset quick --num-seeds 8 --reward error   # MAX
    python exploration/iac.py --preset quick --num-seeds 8 --epsilon 1      # RANDOM
Measured (quick preset: 10k steps, T = 50, 512 regions, never full: 362 +- 7 at the end;
8 seeds, loaded 2-core CPU, 75-115 s wall / 24-25 CPU-s each run, compile included), share of
all steps in A / B / C, mean +- std, and the experts' mean squared error on a B grid:
    IAC (LP):            0.131 +- 0.007 / 0.596 +- 0.018 / 0.273 +- 0.016   B mse 7.0e-5
    MAX (raw error):     0.118 +- 0.004 / 0.122 +- 0.005 / 0.760 +- 0.004   B mse 6.3e-4
    RANDOM (epsilon 1):  0.332 +- 0.003 / 0.336 +- 0.004 / 0.332 +- 0.003   B mse 7.7e-5
    (IAC's epsilon = 0.35 random steps alone put 0.117 in each zone; measured just before
    `reward` became a traced state switch, which moves float rounding and so tie-breaks only)
IAC spends 0.57-0.66 of each 500-step update in B from the second update to the 19th (the
figure exploration/iac.png; 0.47 in the first, 0.52 in the last, where C's share rises to
0.37 as B's experts saturate). It is not more accurate than RANDOM here: B's error on a grid ends at
7.0e-5 vs 7.7e-5 (within a std), since on this 1-d toy a third of uniform samples already
covers B densely. [1] (Sec. 6.4-6.5, robot, its numbers): easy f3 first, then 85% of the
time in f2; IAC reaches its error plateau at t = 4583 +- 452 vs RANDOM's 11980 +- 561, final
MSE ~0.089 vs 0.096. At [1]'s T = 250 (20k steps, 256 regions, 2 seeds) B leads only for
steps 500-3000 and the run splits 0.41 / 0.35 / 0.24: B loses to A long before the table
fills (at 19.5k steps); fewer, larger regions give B fewer candidates with a positive LP.
Why A, not C, then: A's LP is exactly 0 (its constant is predicted exactly), while the LP of
B and C regions, picked whenever it is the largest and so pushed back down, hovers just
under 0; A wins the ties.

Logged per update: charts/frac_A, frac_B, frac_C (share of this update's steps per zone),
charts/num_regions, charts/value (mean value, LP or error, of the chosen regions),
losses/error_{A,B,C} (mean prediction error in each zone this update). `evaluate`: the zone
shares over the whole run and the experts' mean squared error on a grid of each zone
(against the noise-free mean).

Differences from the paper:
- Constants: T = 250 (Sec. 4.3), theta = 25 and tau = 15 (Sec. 4.5), epsilon = 0.35
  (Sec. 4.6; Sec. 6.5 says 0.15 random actions: the text disagrees with itself, we keep
  0.35). [1]'s candidate count is not given: K = 100 is a choice.
- The nearest-neighbour expert is [1]'s; a linear expert on radial-basis features trained
  by LMS was tried first: its error on A's constant decays geometrically, so A keeps a tiny
  positive LP forever and drew 0.41-0.48 of the steps (B 0.30-0.38) on this toy.
- The quick preset uses T = 50 (see the numbers above for T = 250).
- The context is the action alone (a stateless sensorimotor space): [1]'s robot has sensors
  in SM(t) too.
- The table holds at most R regions (not a limit of [1]): once full, regions stop splitting
  and their exemplar buffers overwrite the oldest exemplar. R >= total steps / (0.4 T) keeps
  the quick runs from filling it; C2's cuts of pure noise are uneven (it cuts outliers off),
  so at T = 250 the 20k-step run does fill 256 slots at 19.5k steps. Equal-cost cuts (a
  constant y) go to the most even cut ([1] does not say).
- A region with fewer than theta + 1 + tau errors has LP 0 (and MAX a mean over the errors
  it has).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from common import run

# --- CONFIG ---

ZONES = ("A", "B", "C")


@dataclass(frozen=True)
class Config:
    """IAC ([1]); defaults are [1]'s constants (Sec. 4) on the three-zone toy."""

    total_timesteps: int = 20_000
    """sensorimotor steps of one run"""
    num_steps: int = 500
    """steps per update (one logged row)"""
    context_dim: int = 1
    """dimension d of the context (the action) x in [0, 1)^d; x_0 picks the zone"""
    max_regions: int = 256
    """capacity R of the region table (>= total_timesteps / (0.4 T) keeps it from filling)"""
    split_threshold: int = 250
    """[1]'s T (criterion C1, Sec. 4.3): a region holding more exemplars than this is split"""
    window: int = 25
    """[1]'s theta (Sec. 4.5): <e_R> averages the last theta + 1 errors"""
    lp_delay: int = 15
    """[1]'s tau (Sec. 4.5): LP = <e_R>(t - tau) - <e_R>(t)"""
    epsilon: float = 0.35
    """probability of a random candidate instead of the best ([1] Sec. 4.6; 1: RANDOM)"""
    num_candidates: int = 100
    """K candidate actions drawn uniformly per step"""
    reward: str = "lp"
    """lp: learning progress ([1]); error: the recent mean error ([1]'s MAX baseline)"""
    b_freq: float = 24.0
    """zone B's frequency: y = sin(2 pi b_freq x_0) cos(pi sum_{j>0} x_j)"""
    noise_scale: float = 0.8
    """zone C's y ~ U(-noise_scale, noise_scale)"""

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.num_steps

    def validate(self):
        for f in ("num_steps", "total_timesteps", "context_dim", "num_candidates"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 1")
        if self.reward not in ("lp", "error"):
            raise ValueError(f"reward={self.reward!r} must be 'lp' or 'error'")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_steps={self.num_steps})")
        if self.max_regions < 1 or self.split_threshold < 2:
            raise ValueError(f"max_regions={self.max_regions} must be >= 1 and "
                             f"split_threshold={self.split_threshold} >= 2")
        if self.window < 0 or self.lp_delay < 1:
            raise ValueError(f"window={self.window} must be >= 0 and lp_delay={self.lp_delay} "
                             f">= 1")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1]")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale={self.noise_scale} must be >= 0")


PRESETS = {
    # CPU demo: 10k steps, T = 50; 512 >= 10k / (0.4 T) regions, so the table never fills
    # (with [1]'s T = 250 on this 1-d toy B leads only early: see "Differences from the paper")
    "quick": dict(total_timesteps=10_000, split_threshold=50, max_regions=512),
    # [1]'s constants on a larger toy: a 3-d context, 200k steps, 2048 >= 200k / (0.4 T)
    # regions (traced in tests)
    "paper": dict(context_dim=3, max_regions=2048, total_timesteps=200_000, num_steps=1000),
}


# --- ENVIRONMENT ---


def zone_of(x):
    """0 (A), 1 (B) or 2 (C) from x_0."""
    return jnp.clip(jnp.floor(x[..., 0] * 3).astype(jnp.int32), 0, 2)


def target_mean(x, cfg: Config):
    """Noise-free E[y | x]: 0.5 in A, the sine in B, 0 in C."""
    b = jnp.sin(2 * jnp.pi * cfg.b_freq * x[..., 0]) * jnp.cos(jnp.pi * x[..., 1:].sum(-1))
    return jnp.select([zone_of(x) == 0, zone_of(x) == 1], [0.5, b], 0.0)


def env_step(key, x, cfg: Config):
    """The next state S(t+1) observed after action x."""
    noise = jax.random.uniform(key, (), minval=-cfg.noise_scale, maxval=cfg.noise_scale)
    return jnp.where(zone_of(x) == 2, noise, target_mean(x, cfg))


# --- EXPERTS ---


def nn_predict(x, ex_x, ex_y, n):
    """[1]'s expert (Sec. 4.4, footnote 3): the next state of the nearest of the region's n
    stored exemplars (0 for a region without exemplars)."""
    d2 = jnp.where(jnp.arange(ex_x.shape[0]) < n, ((ex_x - x) ** 2).sum(-1), jnp.inf)
    return jnp.where(n > 0, ex_y[jnp.argmin(d2)], 0.0)


# --- REGIONS ---


def region_of(x, lo, hi, num_regions):
    """Index of the live region whose box [lo, hi) holds x (boxes tile [0, 1)^d)."""
    inside = jnp.all((x >= lo) & (x < hi), -1) & (jnp.arange(lo.shape[0]) < num_regions)
    return jnp.argmax(inside)


def best_split(x, y, n):
    """[1] C2 (Sec. 4.3), the cut rule, on a region's n exemplars (x: (N, d), y: (N,), first n
    valid): the dimension j and cut v minimising sum over the halves of sum_i (y_i - mean y)^2,
    where the cuts are the exemplars' own x_j (left: x_j < v, both halves non-empty; equal
    costs go to the most even cut). One sort and cumulative sums per dimension, O(N log N).
    Returns (j, v, cost)."""
    N = x.shape[0]
    valid = jnp.arange(N) < n
    yv = jnp.where(valid, y, 0.0)
    i = jnp.arange(N)  # cut before sorted position i: the left half is the first i exemplars

    def per_dim(xj):
        order = jnp.argsort(jnp.where(valid, xj, jnp.inf))
        xs, ys = xj[order], yv[order]
        s1, s2 = jnp.cumsum(ys) - ys, jnp.cumsum(ys ** 2) - ys ** 2  # sums over positions < i
        n_r, s1_r, s2_r = n - i, ys.sum() - s1, (ys ** 2).sum() - s2
        sse = (s2 - s1 ** 2 / jnp.maximum(i, 1)) + (s2_r - s1_r ** 2 / jnp.maximum(n_r, 1))
        new = xs > jnp.concatenate([xs[:1], xs[:-1]])  # x_j < xs[i] holds exactly i exemplars
        cost = jnp.where((i >= 1) & (i < n) & new, sse, jnp.inf)
        k = jnp.argmin(jnp.where(cost <= cost.min(), jnp.abs(2 * i - n), 2 * N + 1))  # ties:
        return cost[k], xs[k]  # the most balanced cut (a constant y's cuts all cost 0)

    costs, cuts = jax.vmap(per_dim, in_axes=1)(x)
    j = jnp.argmin(costs)
    return j, cuts[j], costs[j]


def learning_progress(err, count, theta, delay):
    """[1] Sec. 4.5: LP_R = <e_R>(t - tau) - <e_R>(t), <e_R>(t) = sum_{i=0}^{theta} e_R(t - i)
    / (theta + 1), per region from the ring buffers err (R, H) (H >= theta + 1 + tau; count
    errors written so far, newest at (count - 1) % H); 0 while a region has fewer than
    theta + 1 + tau errors."""
    H = err.shape[1]
    i = jnp.arange(theta + 1)
    recent = jnp.take_along_axis(err, (count[:, None] - 1 - i) % H, 1).mean(1)
    old = jnp.take_along_axis(err, (count[:, None] - 1 - i - delay) % H, 1).mean(1)
    return jnp.where(count >= theta + 1 + delay, old - recent, 0.0)


def mean_recent_error(err, count, theta):
    """<e_R>(t) over the last min(theta + 1, count) errors (0 for a region without errors):
    the value of a region in [1]'s MAX baseline (`--reward error`)."""
    H = err.shape[1]
    i = jnp.arange(theta + 1)
    vals = jnp.take_along_axis(err, (count[:, None] - 1 - i) % H, 1)
    mask = i[None] < count[:, None]
    return (vals * mask).sum(1) / jnp.maximum(mask.sum(1), 1)


# --- STATE ---


@struct.dataclass
class State:
    lo: jax.Array  # (R, d) region boxes [lo, hi)
    hi: jax.Array  # (R, d)
    num_regions: jax.Array  # live regions (slots 0 .. num_regions - 1)
    ex_x: jax.Array  # (R, T + 1, d) exemplar contexts per region
    ex_y: jax.Array  # (R, T + 1) exemplar next states
    ex_n: jax.Array  # (R,) exemplars written to each region (ring once the table is full)
    err: jax.Array  # (R, theta + 1 + tau) error ring buffers
    err_n: jax.Array  # (R,) errors written
    zone_visits: jax.Array  # (3,) steps spent in A, B, C
    use_error: jax.Array  # () True: the MAX baseline's value (cfg.reward, traced: one compile)
    key: jax.Array


def init(key, cfg: Config) -> State:
    R, d, cap = cfg.max_regions, cfg.context_dim, cfg.split_threshold + 1
    return State(jnp.zeros((R, d)), jnp.ones((R, d)), jnp.ones((), jnp.int32),
                 jnp.zeros((R, cap, d)), jnp.zeros((R, cap)), jnp.zeros(R, jnp.int32),
                 jnp.zeros((R, cfg.window + 1 + cfg.lp_delay)),
                 jnp.zeros(R, jnp.int32), jnp.zeros(3, jnp.int32),
                 jnp.asarray(cfg.reward == "error"), key)


def split_region(st: State, r, do=True) -> State:
    """[1] Sec. 4.3: cut region r at its C2 cut if `do`; the left half stays in slot r, the
    right half goes to slot m = num_regions; both keep r's error history. Only rows r and m
    are written (selected by `do`), so the step costs the same whether or not it splits."""
    R = st.lo.shape[0]
    m = jnp.minimum(st.num_regions, R - 1)  # a full table never splits (do is False)
    x, y, n = st.ex_x[r], st.ex_y[r], st.ex_n[r]
    j, v, _ = best_split(x, y, n)
    valid = jnp.arange(x.shape[0]) < n
    left, right = valid & (x[:, j] < v), valid & (x[:, j] >= v)
    N = x.shape[0]
    li = jnp.where(left, jnp.cumsum(left) - 1, N)  # new slot of each exemplar (N: dropped)
    ri = jnp.where(right, jnp.cumsum(right) - 1, N)

    def pack(buf, idx):
        return jnp.zeros_like(buf).at[idx].set(buf, mode="drop")

    def two_rows(a, new_r, new_m):
        return a.at[r].set(jnp.where(do, new_r, a[r])).at[m].set(jnp.where(do, new_m, a[m]))

    return st.replace(
        hi=two_rows(st.hi, st.hi[r].at[j].set(v), st.hi[r]),
        lo=two_rows(st.lo, st.lo[r], st.lo[r].at[j].set(v)),
        num_regions=st.num_regions + jnp.asarray(do, jnp.int32),
        ex_x=two_rows(st.ex_x, pack(x, li), pack(x, ri)),
        ex_y=two_rows(st.ex_y, pack(y, li), pack(y, ri)),
        ex_n=two_rows(st.ex_n, left.sum(), right.sum()),
        err=two_rows(st.err, st.err[r], st.err[r]),
        err_n=two_rows(st.err_n, st.err_n[r], st.err_n[r]))


def region_values(st: State, cfg: Config):
    """The value of each region that action selection maximises: LP ([1]) or, in [1]'s MAX
    baseline (Sec. 6.5; st.use_error, from cfg.reward), the recent mean error."""
    err = mean_recent_error(st.err, st.err_n, cfg.window)
    return jnp.where(st.use_error, err, learning_progress(st.err, st.err_n, cfg.window,
                                                          cfg.lp_delay))


# --- UPDATE ---


def choose_action(key, st: State, cfg: Config):
    """[1] K random candidates; the one whose region has the largest value (ties broken at
    random), or with probability epsilon a random one. Returns (x, value of its region)."""
    k_cand, k_tie, k_eps = jax.random.split(key, 3)
    cands = jax.random.uniform(k_cand, (cfg.num_candidates, cfg.context_dim))
    regs = jax.vmap(region_of, (0, None, None, None))(cands, st.lo, st.hi, st.num_regions)
    vals = region_values(st, cfg)[regs]
    tie = jax.random.uniform(k_tie, vals.shape)
    best = jnp.argmax(jnp.where(vals >= vals.max(), tie, -1.0))
    i = jnp.where(jax.random.uniform(k_eps) < cfg.epsilon, 0, best)  # candidate 0 is random
    return cands[i], vals[i]


def step(st: State, cfg: Config):
    """One step: choose, observe, score the region's expert, store the exemplar, maybe split."""
    key, k_act, k_env = jax.random.split(st.key, 3)
    x, value = choose_action(k_act, st, cfg)
    y = env_step(k_env, x, cfg)
    r = region_of(x, st.lo, st.hi, st.num_regions)
    H, cap = st.err.shape[1], st.ex_x.shape[1]
    n = jnp.minimum(st.ex_n[r], cap)
    e = (y - nn_predict(x, st.ex_x[r], st.ex_y[r], n)) ** 2  # error before learning
    pos = st.ex_n[r] % cap
    st = st.replace(
        err=st.err.at[r, st.err_n[r] % H].set(e),
        err_n=st.err_n.at[r].add(1), ex_x=st.ex_x.at[r, pos].set(x),
        ex_y=st.ex_y.at[r, pos].set(y), ex_n=st.ex_n.at[r].add(1),
        zone_visits=st.zone_visits.at[zone_of(x)].add(1), key=key)
    full = st.num_regions >= cfg.max_regions
    st = split_region(st, r, (st.ex_n[r] > cfg.split_threshold) & ~full)  # [1] C1
    return st, dict(zone=zone_of(x), err=e, value=value)


def update(state: State, cfg: Config):
    state, m = jax.lax.scan(lambda s, _: step(s, cfg), state, None, cfg.num_steps)
    onehot = jax.nn.one_hot(m["zone"], 3)  # (T, 3)
    per_zone = (onehot * m["err"][:, None]).sum(0) / jnp.maximum(onehot.sum(0), 1)
    metrics = {f"charts/frac_{z}": onehot[:, i].mean() for i, z in enumerate(ZONES)}
    metrics |= {f"losses/error_{z}": per_zone[i] for i, z in enumerate(ZONES)}
    metrics |= {"charts/num_regions": state.num_regions, "charts/value": m["value"].mean()}
    return state, metrics


def evaluate(state: State, cfg: Config, grid: int = 64):
    """Zone shares over the run, the region count, and each zone's expert error on a grid
    (against the noise-free mean; zone C's floor is noise_scale^2 / 3 around 0)."""
    out = {f"frac_{z}": state.zone_visits[i] / state.zone_visits.sum()
           for i, z in enumerate(ZONES)}
    pts = jax.random.uniform(jax.random.PRNGKey(0), (3 * grid, cfg.context_dim))
    pts = pts.at[:, 0].set((jnp.arange(3 * grid) + 0.5) / (3 * grid))
    regs = jax.vmap(region_of, (0, None, None, None))(pts, state.lo, state.hi,
                                                     state.num_regions)
    cap = state.ex_x.shape[1]
    pred = jax.vmap(lambda p, r: nn_predict(p, state.ex_x[r], state.ex_y[r],
                                            jnp.minimum(state.ex_n[r], cap)))(pts, regs)
    sq = (pred - target_mean(pts, cfg)) ** 2
    for i, z in enumerate(ZONES):
        out[f"model_mse_{z}"] = sq[i * grid:(i + 1) * grid].mean()
    out["num_regions"] = state.num_regions
    return out


# --- PLOT ---


def plot_zones(run_dir, out):
    """Share of steps per zone per update (mean and std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot
    from common.plot import save_png

    rows = plot.load(run_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for z, name in zip(ZONES, ("A: constant", "B: learnable sine", "C: noise"), strict=True):
        x, y, _ = plot.curve(rows, f"charts/frac_{z}")
        mean, std = np.nanmean(y, 1), np.nanstd(y, 1)
        ax.plot(x, mean, label=f"{name} ({y.shape[1]} seeds)")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("steps")
    ax.set_ylabel("share of the update's steps")
    ax.set_title("IAC on the three-zone toy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["frac_A", "frac_B", "frac_C", "model_mse_B",
                                              "num_regions"])
    if flags["--plot"] is not None:
        print(plot_zones(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
