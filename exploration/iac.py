"""Intelligent Adaptive Curiosity (IAC): choose actions whose region of the sensorimotor space
promises the largest learning progress of its own forward model.

[1] P.-Y. Oudeyer, F. Kaplan, V. V. Hafner. "Intrinsic Motivation Systems for Autonomous
    Mental Development." IEEE Trans. Evolutionary Computation 11(2), 265-286, 2007 (no arXiv
    id; HAL hal-00793610). Summarised in L. Weng's post on exploration (2020).

IAC keeps a memory of exemplars (sensorimotor context SM(t), next state S(t+1)) split among
regions that tile the context space like the leaves of a decision tree ([1] Sec. IV):

    C1 (split):  a region holding more than C1 exemplars is cut in two along one context
                 dimension j at a value v, the cut that minimises the summed squared deviation
                 of S(t+1) in the two halves, sum_{side} sum_i (y_i - mean_side y)^2
                 (= |R1| var(y | R1) + |R2| var(y | R2));
    expert:      each region has its own forward model f_R(SM) ~ S(t+1), trained only on
                 its own exemplars; its squared error e_R(t) = (y - f_R(SM))^2 is measured
                 before the expert learns the exemplar and pushed to the region's list;
    progress:    LP_R(t) = <e_R>(t - tau) - <e_R>(t),  <e_R>(t) = (1/k) sum_{i<k} e_R(t - i)
                 (the post's r^i_t = (1/k) sum_{i=0}^{k-1} (e_{t-i-tau} - e_{t-i}));
    action:      draw K candidate actions, look up the region each falls in, and take the
                 one with the largest LP of its region (epsilon-greedy: a random candidate
                 with probability epsilon).

The JAX form: a fixed-capacity region table (at most R boxes [lo, hi), and per slot an
exemplar buffer of C1 + 1 slots, which is also the expert's memory, and an error ring buffer
of k + tau), so one step (choose, observe, learn, maybe split) is a pure function and the
run is one `lax.scan`, vmapped over seeds. A split keeps the left half in the parent's slot
and writes the right half to slot `num_regions`; both children inherit the parent's error
history.

Environment (in this file; [1]'s robots are not available): the context is the action
x in [0, 1)^d itself, and x_0 selects one of three zones of equal width:
    A  x_0 < 1/3:          y = 0.5 (trivially predictable)
    B  1/3 <= x_0 < 2/3:   y = sin(2 pi b_freq x_0) cos(pi sum_{j>0} x_j) (learnable, nonlinear)
    C  x_0 >= 2/3:         y ~ U(-noise_scale, noise_scale) (pure noise, unlearnable)
IAC should spend most time in B: A is learned at once (no progress left), C never.
`--reward error` is the broken variant: the region's recent mean error <e_R>(t) instead of
LP (maximising raw prediction error, the noisy-TV trap), which is drawn to C.

Expert: nearest neighbour ([1]'s choice, [M]): f_R(x) = the next state of the exemplar of
R closest to x (0 in a region without exemplars); learning is storing the exemplar.

Reproduce (CPU):
    python exploration/iac.py --preset quick --num-seeds 8 --plot exploration/iac.png
    python exploration/iac.py --preset quick --num-seeds 8 --reward error
Measured (quick preset: 10k steps, C1 = 50, 128 regions; 8 seeds, loaded 2-core CPU, 69 s
wall / 15 CPU-s each run, compile included), share of all steps in A / B / C, mean +- std:
    IAC (LP):              0.217 +- 0.030 / 0.553 +- 0.038 / 0.230 +- 0.015
    broken (raw error):    0.118 +- 0.004 / 0.122 +- 0.005 / 0.761 +- 0.005
    (the epsilon = 0.35 random steps alone put 0.117 in each zone)
IAC spends 0.6-0.7 of its steps in B for the first ~7k steps, while the nearest-neighbour
expert of B still improves (exemplars keep densifying); once the table is full (128 regions,
buffers then overwrite their oldest exemplars) B's error stops falling and the share moves to
A (the figure exploration/iac.png). Its expert error on a B grid ends at 1.4e-4. Why A, not
C: A's LP is exactly 0 (its constant is predicted exactly), while the LP of B and C regions,
picked whenever it is the largest and so pushed back down, hovers just under 0; A wins the
ties. At [1]'s C1 = 250 (64 regions, 20k steps, 8 seeds) B leads only for steps 500-2500
(0.6-0.7 of them) and the whole run splits 0.46 / 0.32 / 0.23: fewer, larger regions give B
fewer candidates with a positive LP.

Logged per update: charts/frac_A, frac_B, frac_C (share of this update's steps per zone),
charts/num_regions, charts/value (mean value, LP or error, of the chosen regions),
losses/error_{A,B,C} (mean prediction error in each zone this update). `evaluate`: the zone
shares over the whole run and the experts' mean squared error on a grid of each zone
(against the noise-free mean).

Differences from the paper:
- [M] constants: C1 = 250, smoothing window k = 25 (the paper's theta), delay tau = 15 and
  epsilon = 0.35 are from memory of [1] (its text could not be read here). [1]'s candidate
  count is not known: K = 100 is a choice.
- [M] The experts are nearest-neighbour predictors, as we remember [1]'s. A linear expert
  on radial-basis features trained by LMS was tried first: its error on A's constant decays
  geometrically, so A keeps a tiny positive LP forever and drew 0.41-0.48 of the steps
  (B 0.30-0.38) on this toy; the nearest neighbour predicts A exactly (LP exactly 0).
- The quick preset uses C1 = 50 and 128 regions (see the numbers above for C1 = 250).
- The context is the action alone (a stateless sensorimotor space): [1]'s robot has sensors
  in SM(t) too; [1]'s second criterion (a split must reduce the variance enough) is not used.
- The table holds at most R regions; once full, regions stop splitting and their exemplar
  buffers overwrite the oldest exemplar.
- A region with fewer than k + tau errors has LP 0 (and the error variant a mean over the
  errors it has).
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
    """IAC ([1]); defaults are [1]'s constants ([M]) on the three-zone toy."""

    total_timesteps: int = 20_000
    """sensorimotor steps of one run"""
    num_steps: int = 500
    """steps per update (one logged row)"""
    context_dim: int = 1
    """dimension d of the context (the action) x in [0, 1)^d; x_0 picks the zone"""
    max_regions: int = 64
    """capacity R of the region table"""
    split_threshold: int = 250
    """[1]'s C1: a region holding more exemplars than this is split in two"""
    window: int = 25
    """k: errors averaged in <e_R> ([1]'s smoothing theta)"""
    lp_delay: int = 15
    """[1]'s tau: LP = <e_R>(t - tau) - <e_R>(t)"""
    epsilon: float = 0.35
    """probability of taking a random candidate instead of the best one"""
    num_candidates: int = 100
    """K candidate actions drawn uniformly per step"""
    reward: str = "lp"
    """lp: learning progress ([1]); error: the recent mean error (broken variant)"""
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
        if self.reward not in ("lp", "error"):
            raise ValueError(f"reward={self.reward!r} must be 'lp' or 'error'")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_steps={self.num_steps})")
        if self.max_regions < 1 or self.split_threshold < 2:
            raise ValueError(f"max_regions={self.max_regions} must be >= 1 and "
                             f"split_threshold={self.split_threshold} >= 2")
        if self.window < 1 or self.lp_delay < 1:
            raise ValueError(f"window={self.window} and lp_delay={self.lp_delay} must be >= 1")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1]")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale={self.noise_scale} must be >= 0")


PRESETS = {
    # CPU demo: 10k steps; C1 = 50 and 128 regions (with [1]'s C1 = 250 on this 1-d toy, B
    # leads only for the first ~2.5k steps: see "Differences from the paper")
    "quick": dict(total_timesteps=10_000, split_threshold=50, max_regions=128),
    # [1]'s constants on a larger toy: a 3-d context, 256 regions, 200k steps (traced in tests)
    "paper": dict(context_dim=3, max_regions=256, total_timesteps=200_000, num_steps=1000),
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
    """[1]'s expert ([M]): the next state of the nearest of the region's n stored exemplars
    (0 for a region without exemplars)."""
    d2 = jnp.where(jnp.arange(ex_x.shape[0]) < n, ((ex_x - x) ** 2).sum(-1), jnp.inf)
    return jnp.where(n > 0, ex_y[jnp.argmin(d2)], 0.0)


# --- REGIONS ---


def region_of(x, lo, hi, num_regions):
    """Index of the live region whose box [lo, hi) holds x (boxes tile [0, 1)^d)."""
    inside = jnp.all((x >= lo) & (x < hi), -1) & (jnp.arange(lo.shape[0]) < num_regions)
    return jnp.argmax(inside)


def best_split(x, y, n):
    """[1] C1 split of a region's n exemplars (x: (N, d), y: (N,), first n valid): the
    dimension j and cut v minimising sum over the halves of sum_i (y_i - mean y)^2, where the
    cuts are the exemplars' own x_j (left: x_j < v, both halves non-empty). Returns
    (j, v, cost)."""
    valid = jnp.arange(x.shape[0]) < n
    yv = jnp.where(valid, y, 0.0)

    def per_dim(xj):
        left = (xj[None, :] < xj[:, None]) & valid[None, :]  # (cut, exemplar)
        n_l = left.sum(1)
        s1_l, s2_l = left @ yv, left @ yv ** 2
        n_r, s1_r, s2_r = n - n_l, yv.sum() - s1_l, (yv ** 2).sum() - s2_l
        sse = (s2_l - s1_l ** 2 / jnp.maximum(n_l, 1)) + (s2_r - s1_r ** 2 / jnp.maximum(n_r, 1))
        cost = jnp.where(valid & (n_l >= 1) & (n_r >= 1), sse, jnp.inf)
        i = jnp.argmin(cost)
        return cost[i], xj[i]

    costs, cuts = jax.vmap(per_dim, in_axes=1)(x)
    j = jnp.argmin(costs)
    return j, cuts[j], costs[j]


def learning_progress(err, count, k, delay):
    """[1] LP_R = <e_R>(t - tau) - <e_R>(t) per region from the ring buffers err (R, H)
    (H >= k + tau; count errors written so far, newest at (count - 1) % H); 0 while a region
    has fewer than k + tau errors."""
    H = err.shape[1]
    i = jnp.arange(k)
    recent = jnp.take_along_axis(err, (count[:, None] - 1 - i) % H, 1).mean(1)
    old = jnp.take_along_axis(err, (count[:, None] - 1 - i - delay) % H, 1).mean(1)
    return jnp.where(count >= k + delay, old - recent, 0.0)


def mean_recent_error(err, count, k):
    """<e_R>(t) over the last min(k, count) errors (0 for a region without errors): the
    broken variant's value of a region."""
    H = err.shape[1]
    i = jnp.arange(k)
    vals = jnp.take_along_axis(err, (count[:, None] - 1 - i) % H, 1)
    mask = i[None] < count[:, None]
    return (vals * mask).sum(1) / jnp.maximum(mask.sum(1), 1)


# --- STATE ---


@struct.dataclass
class State:
    lo: jax.Array  # (R, d) region boxes [lo, hi)
    hi: jax.Array  # (R, d)
    num_regions: jax.Array  # live regions (slots 0 .. num_regions - 1)
    ex_x: jax.Array  # (R, C1 + 1, d) exemplar contexts per region
    ex_y: jax.Array  # (R, C1 + 1) exemplar next states
    ex_n: jax.Array  # (R,) exemplars written to each region (ring once the table is full)
    err: jax.Array  # (R, k + tau) error ring buffers
    err_n: jax.Array  # (R,) errors written
    zone_visits: jax.Array  # (3,) steps spent in A, B, C
    key: jax.Array


def init(key, cfg: Config) -> State:
    R, d, cap = cfg.max_regions, cfg.context_dim, cfg.split_threshold + 1
    return State(jnp.zeros((R, d)), jnp.ones((R, d)), jnp.ones((), jnp.int32),
                 jnp.zeros((R, cap, d)), jnp.zeros((R, cap)), jnp.zeros(R, jnp.int32),
                 jnp.zeros((R, cfg.window + cfg.lp_delay)),
                 jnp.zeros(R, jnp.int32), jnp.zeros(3, jnp.int32), key)


def split_region(st: State, r) -> State:
    """[1] C1: cut region r at its best split; the left half stays in slot r, the right half
    goes to slot m = num_regions; both keep r's error history."""
    m = st.num_regions
    x, y, n = st.ex_x[r], st.ex_y[r], st.ex_n[r]
    j, v, _ = best_split(x, y, n)
    valid = jnp.arange(x.shape[0]) < n
    left, right = valid & (x[:, j] < v), valid & (x[:, j] >= v)
    N = x.shape[0]
    li = jnp.where(left, jnp.cumsum(left) - 1, N)  # new slot of each exemplar (N: dropped)
    ri = jnp.where(right, jnp.cumsum(right) - 1, N)

    def pack(buf, idx):
        return jnp.zeros_like(buf).at[idx].set(buf, mode="drop")

    return st.replace(
        hi=st.hi.at[r, j].set(v).at[m].set(st.hi[r]),
        lo=st.lo.at[m].set(st.lo[r].at[j].set(v)),
        num_regions=m + 1,
        ex_x=st.ex_x.at[r].set(pack(x, li)).at[m].set(pack(x, ri)),
        ex_y=st.ex_y.at[r].set(pack(y, li)).at[m].set(pack(y, ri)),
        ex_n=st.ex_n.at[r].set(left.sum()).at[m].set(right.sum()),
        err=st.err.at[m].set(st.err[r]),
        err_n=st.err_n.at[m].set(st.err_n[r]))


def region_values(st: State, cfg: Config):
    """The value of each region that action selection maximises: LP ([1]) or, in the broken
    variant, the recent mean error."""
    if cfg.reward == "error":
        return mean_recent_error(st.err, st.err_n, cfg.window)
    return learning_progress(st.err, st.err_n, cfg.window, cfg.lp_delay)


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
    st = jax.lax.cond((st.ex_n[r] > cfg.split_threshold) & ~full,
                      lambda s: split_region(s, r), lambda s: s, st)
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
