"""Population-Based Training (PBT), synchronous and vmapped over the population.

[1] M. Jaderberg, V. Dalibard, S. Osindero, W. M. Czarnecki, J. Donahue, A. Razavi,
    O. Vinyals, T. Green, I. Dunning, K. Simonyan, C. Fernando, K. Kavukcuoglu.
    "Population Based Training of Neural Networks." arXiv:1711.09846, 2017.
Post: L. Weng, "Evolution Strategies" (2019), section "Hyperparameter Tuning: PBT".

A population {(theta_i, h_i)} trains in parallel; every member holds its own weights theta_i
and hyperparameters h_i (traced arrays in the state, so the population is one jax.vmap).
Every `ready_every` steps each member is "ready" ([1] Sec. 3) and

    exploit: truncation -- rank by performance P (random tie-break); each of the bottom
             20% copies (theta, h, optimiser state) of a member drawn uniformly from the
             top 20%                                                       [1] Sec. 3.1
             tournament -- i meets a random j != i and copies j if P_j > P_i (a coin on ties)
             ttest -- i meets a random j != i and copies j if j's last W performances have
             the higher mean and Welch's t-test finds it significant:     [1] Sec. 4.1.1
                 t = (mean_j - mean_i) / sqrt(s_j^2/W + s_i^2/W)  (s^2: sample variances)
                 nu = (s_j^2/W + s_i^2/W)^2 / ((s_j^2/W)^2/(W-1) + (s_i^2/W)^2/(W-1))
                 copy iff t > 0 and P(T_nu > t) = I_{nu/(nu+t^2)}(nu/2, 1/2) / 2 < alpha
    explore: (only members that copied)
             perturb  -- each h multiplied by 0.8 or 1.2 (coin flip)      [1] Sec. 3.1
             resample -- with probability p from the prior, else perturb  [1] Sec. 3.1
             gaussian -- h + N(0, noise_std^2), clipped to the bounds     [1] Sec. 4 toy
    lineage[r, i] = the member whose weights i holds after ready step r (i if none)

Tasks (`--task`):
  toy     [1] Fig. 2: Q(theta) = 1.2 - (theta0^2 + theta1^2); each worker ascends the
          surrogate Q_hat(theta | h) = 1.2 - (h0 theta0^2 + h1 theta1^2) by gradient steps
          (lr 0.01); two members from theta = (0.9, 0.9) with h = (1, 0) and (0, 1), ready
          every 4 steps, P = Q (the true objective), gaussian explore (0.1), h >= 0.
  digits  an MLP (64-64-10, ReLU) on scikit-learn's digits (1797 8x8 images: 1000 train,
          397 validation, 400 test), AdamW; PBT over the learning rate and weight decay
          (log-uniform priors); P = validation accuracy. Random search with the same compute
          is the same run with --exploit none --explore none.

Reproduce (2-core CPU):
    python evolution/pbt.py --num-seeds 20                      # toy, PBT
    python evolution/pbt.py --num-seeds 20 --exploit none --explore none   # grid search
Toy, 20 seeds x 200 steps (about 5 s): PBT reaches Q >= 1.19 in 20/20 seeds (median step
154, median final best Q 1.1994); grid search 0/20 (best Q 0.390 = 1.2 - 0.9^2),
exploit-only 0/20, explore-only (every member explores, nobody copies) 8/20.
    python evolution/pbt.py --preset digits --num-seeds 8
    python evolution/pbt.py --preset digits --num-seeds 8 --exploit none --explore none
Digits, 8 seeds x 600 steps (about 30 s each): test accuracy of the best-validation member
0.980 (PBT) vs 0.978 (random search, same compute); the population's mean validation
accuracy is where PBT differs (0.96-0.98 vs 0.65-0.72 with a [1e-5, 1] lr prior).
`--exploit ttest` (2-core CPU, loaded): digits 8 seeds, test accuracy 0.978, population mean
validation accuracy 0.977; on the toy it never copies (the two members' Q histories are
equal by symmetry, t = 0), so it ends like the grid search (best Q 0.390 in 20/20 seeds).
[1] Fig. 2 shows the toy qualitatively (PBT reaches the optimum, grid search does not);
the paper's real experiments (DM-Lab, Atari, WMT, GANs) are not reproducible offline.

Differences from the paper:
- Synchronous: all members step together and are ready at the same steps, and exploit
  compares them all at once. [1] runs members asynchronously on separate machines, each
  reading the others' last reported performance from a shared store.
- Exploit copies the optimiser state (Adam moments) with the weights; [1] does not say.
- Explore perturbs only the members that copied, as in [1]; `gaussian` is the toy's
  explore; `resample` mixes resampling and perturbation like common implementations.
- Ties in performance are broken at random (needed: the toy's two members start in
  symmetric positions with exactly equal Q).
- `exploit=ttest` compares the last `ttest_window` performances (one per training step:
  the toy's Q, digits' validation accuracy) where [1] compares the last 10 episodic
  rewards; [1] gives no significance level (alpha = 0.05 here, one-sided). A member that
  copies also takes its parent's performance history. Before W steps the test uses the
  steps so far (none before 2).
- The digits task replaces the paper's RL / translation / GAN experiments, which need
  data sets and compute we do not have.
"""

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.scipy.special import betainc

from common import run

# --- CONFIG ---

TASKS = ("toy", "digits")
EXPLOITS = ("truncation", "tournament", "ttest", "none")
EXPLORES = ("gaussian", "perturb", "resample", "none")


@dataclass(frozen=True)
class Config:
    """PBT; defaults are the paper's toy example ([1] Fig. 2)."""

    task: str = "toy"
    """toy ([1] Fig. 2 quadratic) or digits (MLP on sklearn digits)"""
    population: int = 2
    """members trained in parallel"""
    num_steps: int = 200
    """training steps of every member"""
    ready_every: int = 4
    """a member is ready for exploit/explore every this many steps"""
    exploit: str = "truncation"
    """truncation (bottom copies top), tournament (binary), ttest (Welch, [1] RL), or none"""
    explore: str = "gaussian"
    """gaussian (additive noise), perturb (x0.8 / x1.2), resample (prior), or none"""
    ttest_window: int = 10
    """ttest exploit: last performances compared ([1]: the last 10 episodic rewards)"""
    ttest_alpha: float = 0.05
    """ttest exploit: one-sided significance level of Welch's t-test ([1] gives none)"""
    truncation_frac: float = 0.2
    """fraction of the population in the top and in the bottom group (at least 1 member)"""
    perturb: float = 0.2
    """perturb explore multiplies a hyperparameter by 1 - perturb or 1 + perturb"""
    noise_std: float = 0.1
    """gaussian explore: standard deviation of the additive noise"""
    resample_prob: float = 0.25
    """resample explore: probability that a hyperparameter is redrawn from its prior"""
    lr: float = 0.01
    """toy: step size of the gradient ascent on Q_hat"""
    target: float = 1.19
    """performance counted as reaching the optimum (toy: Q; digits: validation accuracy)"""
    hidden: int = 64
    """digits: hidden units of the MLP"""
    batch_size: int = 64
    """digits: minibatch size"""
    lr_range: tuple[float, float] = (1e-4, 1e-1)
    """digits: log-uniform prior (and bounds) of the Adam learning rate"""
    wd_range: tuple[float, float] = (1e-6, 1e-2)
    """digits: log-uniform prior (and bounds) of the decoupled weight decay"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        """Member training steps per update (one step of every member)."""
        return self.population

    @property
    def num_ready(self) -> int:
        return self.num_steps // self.ready_every

    @property
    def num_truncated(self) -> int:
        return max(1, int(round(self.truncation_frac * self.population)))

    def validate(self):
        for name, allowed in (("task", TASKS), ("exploit", EXPLOITS), ("explore", EXPLORES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got "
                                 f"{name}={getattr(self, name)!r}")
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got population={self.population}")
        if self.ttest_window < 2:
            raise ValueError(f"ttest_window must be >= 2, got ttest_window={self.ttest_window}")
        if not 0.0 < self.ttest_alpha < 1.0:
            raise ValueError(f"ttest_alpha must be in (0, 1), got {self.ttest_alpha}")
        for name in ("num_steps", "ready_every", "hidden", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if not 0.0 < self.truncation_frac <= 0.5:
            raise ValueError(f"truncation_frac must be in (0, 0.5], got {self.truncation_frac}")
        if not 0.0 < self.perturb < 1.0:
            raise ValueError(f"perturb must be in (0, 1), got perturb={self.perturb}")
        if not 0.0 <= self.resample_prob <= 1.0:
            raise ValueError(f"resample_prob must be in [0, 1], got {self.resample_prob}")
        for name in ("noise_std", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")
        for name in ("lr_range", "wd_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {name}={(lo, hi)}")


PRESETS = {
    "quick": dict(),
    "digits": dict(task="digits", population=8, num_steps=600, ready_every=50,
                   explore="perturb", target=0.97),
    "paper": dict(),  # [1] Fig. 2's toy example (the Config defaults)
}

# --- TASKS ---


class Toy:
    """[1] Fig. 2. weights theta (2,), hypers h (2,) >= 0; P = Q(theta)."""

    names = ("h0", "h1")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lo, self.hi = np.zeros(2, np.float32), np.full(2, np.inf, np.float32)

    def prior(self, key):
        return jax.random.uniform(key, (2,))

    def init(self, key, i):
        """Member i starts at theta = (0.9, 0.9) with h = one_hot(i mod 2) (the grid)."""
        return jnp.array([0.9, 0.9]), jax.nn.one_hot(i % 2, 2)

    def train_step(self, theta, h, key):
        grad = -2.0 * h * theta  # grad of Q_hat(theta | h) = 1.2 - sum_k h_k theta_k^2
        return theta + self.cfg.lr * grad  # gradient ascent

    def performance(self, theta):
        return 1.2 - jnp.sum(theta**2)  # Q(theta), the true objective

    def test_score(self, theta):
        return self.performance(theta)


@functools.cache
def digits_data():
    """sklearn digits (ships offline), scaled to [0, 1], split 1000 / 397 / 400 (seed 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x, y = (d.data[perm] / 16.0).astype(np.float32), d.target[perm].astype(np.int32)
    return (x[:1000], y[:1000]), (x[1000:1397], y[1000:1397]), (x[1397:], y[1397:])


class Digits:
    """MLP on digits. weights = (params, adam state), hypers = (lr, wd); P = val accuracy."""

    names = ("lr", "wd")

    def __init__(self, cfg: Config):
        self.cfg = cfg  # the data are loaded (once) on first use: importing sklearn is slow
        (a, b), (c, d) = cfg.lr_range, cfg.wd_range
        self.lo, self.hi = np.array([a, c], np.float32), np.array([b, d], np.float32)

    def prior(self, key):
        u = jax.random.uniform(key, (2,))
        return jnp.exp(jnp.log(self.lo) + u * (jnp.log(self.hi) - jnp.log(self.lo)))

    def apply(self, params, x):
        h = jax.nn.relu(x @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]  # (B, 10) logits

    def init(self, key, i):
        k1, k2, k3 = jax.random.split(key, 3)
        init = jax.nn.initializers.lecun_normal()
        params = {"w1": init(k1, (64, self.cfg.hidden)), "b1": jnp.zeros(self.cfg.hidden),
                  "w2": init(k2, (self.cfg.hidden, 10)), "b2": jnp.zeros(10)}
        return (params, optax.scale_by_adam().init(params)), self.prior(k3)

    def train_step(self, weights, h, key):
        params, adam = weights
        x, y = digits_data()[0]
        idx = jax.random.randint(key, (self.cfg.batch_size,), 0, x.shape[0])

        def loss(p):
            logits = self.apply(p, jnp.asarray(x)[idx])
            labels = jnp.asarray(y)[idx]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        direction, adam = optax.scale_by_adam().update(grads, adam)
        # AdamW: theta <- theta - lr (adam direction + wd theta), lr and wd traced per member
        params = jax.tree.map(lambda p, u: p - h[0] * (u + h[1] * p), params, direction)
        return params, adam

    def accuracy(self, weights, data):
        x, y = data
        return jnp.mean(jnp.argmax(self.apply(weights[0], jnp.asarray(x)), -1) == jnp.asarray(y))

    def performance(self, weights):
        return self.accuracy(weights, digits_data()[1])

    def test_score(self, weights):
        return self.accuracy(weights, digits_data()[2])


def make_task(cfg: Config):
    return Toy(cfg) if cfg.task == "toy" else Digits(cfg)


# --- EXPLOIT / EXPLORE ---


def rank_order(key, perf: jax.Array) -> jax.Array:
    """Members sorted from worst to best; equal performances in random order."""
    return jnp.lexsort((jax.random.uniform(key, perf.shape), perf))


def truncation(key, perf: jax.Array, k: int) -> jax.Array:
    """[1] Sec. 3.1: parent[i]; each of the k worst copies one of the k best (uniform)."""
    k_rank, k_pick = jax.random.split(key)
    order = rank_order(k_rank, perf)
    bottom, top = order[:k], order[perf.shape[0] - k:]
    donors = top[jax.random.randint(k_pick, (k,), 0, k)]
    return jnp.arange(perf.shape[0]).at[bottom].set(donors)


def tournament(key, perf: jax.Array) -> jax.Array:
    """[1] Sec. 3.1 binary tournament: i copies a random j != i if P_j > P_i (coin on ties)."""
    n = perf.shape[0]
    k_j, k_tie = jax.random.split(key)
    j = (jnp.arange(n) + jax.random.randint(k_j, (n,), 1, n)) % n
    coin = jax.random.bernoulli(k_tie, 0.5, (n,))
    better = (perf[j] > perf) | ((perf[j] == perf) & coin)
    return jnp.where(better, j, jnp.arange(n))


def welch_ttest(a: jax.Array, b: jax.Array, count) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Welch's t-test of mean(a) > mean(b) on the first `count` entries of a and b (W,):
    (t, degrees of freedom nu, one-sided p = P(T_nu > t)). Without variance t is +-inf
    (p = 0 or 1) by the sign of the difference, or 0 (p = 1/2) for equal means."""
    m = (jnp.arange(a.shape[0]) < count).astype(a.dtype)
    n = jnp.maximum(jnp.asarray(count, a.dtype), 2.0)
    mean_a, mean_b = m @ a / n, m @ b / n
    va = m @ (a - mean_a) ** 2 / (n - 1) / n  # s_a^2 / n
    vb = m @ (b - mean_b) ** 2 / (n - 1) / n
    se2 = va + vb
    diff = mean_a - mean_b
    t = jnp.where(se2 > 0, diff / jnp.sqrt(jnp.where(se2 > 0, se2, 1.0)),
                  jnp.where(diff == 0, 0.0, jnp.sign(diff) * jnp.inf))
    nu = jnp.where(se2 > 0, se2**2 / jnp.maximum((va**2 + vb**2) / (n - 1), 1e-30), n - 1)
    tail = 0.5 * betainc(nu / 2, 0.5, nu / (nu + t**2))  # P(T > |t|)
    p = jnp.where(t > 0, tail, 1.0 - tail)
    return t, nu, p


def ttest(key, hist: jax.Array, count, alpha: float) -> jax.Array:
    """[1] Sec. 4.1.1 t-test selection: parent[i]; i meets a uniformly drawn j != i and
    copies j if j's last `count` performances (hist (n, W), newest first) have the higher
    mean and Welch's t-test says so at level alpha. Fewer than 2 values: nobody copies."""
    n = hist.shape[0]
    j = (jnp.arange(n) + jax.random.randint(key, (n,), 1, n)) % n
    t, _, p = jax.vmap(lambda a, b: welch_ttest(a, b, count))(hist[j], hist)
    better = (t > 0) & (p < alpha) & (count >= 2)
    return jnp.where(better, j, jnp.arange(n))


def explore(key, h: jax.Array, task, cfg: Config) -> jax.Array:
    """Perturb one member's hypers h (H,) and clip them to the task's bounds."""
    k_noise, k_coin, k_prior = jax.random.split(key, 3)
    if cfg.explore == "gaussian":
        new = h + cfg.noise_std * jax.random.normal(k_noise, h.shape)
    else:  # perturb, or resample (prior with probability resample_prob, else perturb)
        up = jax.random.bernoulli(k_coin, 0.5, h.shape)
        new = h * jnp.where(up, 1.0 + cfg.perturb, 1.0 - cfg.perturb)
        if cfg.explore == "resample":
            redraw = jax.random.bernoulli(k_noise, cfg.resample_prob, h.shape)
            new = jnp.where(redraw, task.prior(k_prior), new)
    return jnp.clip(new, task.lo, task.hi)


def exploit_explore(key, weights, hypers, perf, task, cfg: Config, hist=None, count=0):
    """One ready step of the whole population: (weights, hypers, parent). `hist` (n, W):
    the last performances, newest first, of which `count` are filled (ttest only)."""
    k_exploit, k_explore = jax.random.split(key)
    n = cfg.population
    if cfg.exploit == "truncation":
        parent = truncation(k_exploit, perf, cfg.num_truncated)
    elif cfg.exploit == "tournament":
        parent = tournament(k_exploit, perf)
    elif cfg.exploit == "ttest":
        parent = ttest(k_exploit, hist, count, cfg.ttest_alpha)
    else:
        parent = jnp.arange(n)
    weights = jax.tree.map(lambda w: w[parent], weights)  # exploit: copy theta (and Adam)
    hypers = hypers[parent]  # ... and h
    if cfg.explore != "none":
        copied = parent != jnp.arange(n)
        if cfg.exploit == "none":  # explore-only ablation: every member explores
            copied = jnp.ones(n, bool)
        moved = jax.vmap(lambda k, h: explore(k, h, task, cfg))(jax.random.split(k_explore, n),
                                                                 hypers)
        hypers = jnp.where(copied[:, None], moved, hypers)
    return weights, hypers, parent


# --- TRAIN ---


@struct.dataclass
class State:
    weights: object  # pytree, leaves (n, ...)
    hypers: jax.Array  # (n, H) hyperparameters as traced arrays
    perf: jax.Array  # (n,) performance after the last step
    perf_hist: jax.Array  # (n, ttest_window) the last performances, newest first
    step: jax.Array  # int32
    lineage: jax.Array  # (num_ready, n) int32 parent of each member per ready step (-1: not yet)
    hit_step: jax.Array  # float32 first step whose best performance >= target (inf: never)
    key: jax.Array


def init(key, cfg: Config) -> State:
    task = make_task(cfg)
    k_init, key = jax.random.split(key)
    keys = jax.random.split(k_init, cfg.population)
    weights, hypers = jax.vmap(task.init)(keys, jnp.arange(cfg.population))
    perf = jax.vmap(task.performance)(weights)
    lineage = jnp.full((max(cfg.num_ready, 1), cfg.population), -1, jnp.int32)
    perf_hist = jnp.zeros((cfg.population, cfg.ttest_window), perf.dtype)
    return State(weights, hypers, perf, perf_hist, jnp.zeros((), jnp.int32), lineage,
                 jnp.asarray(jnp.inf, jnp.float32), key)


def update(state: State, cfg: Config):
    """One training step of every member; on ready steps, exploit and explore."""
    task = make_task(cfg)
    key, k_train, k_ready = jax.random.split(state.key, 3)
    weights = jax.vmap(task.train_step)(state.weights, state.hypers,
                                        jax.random.split(k_train, cfg.population))
    perf = jax.vmap(task.performance)(weights)
    step = state.step + 1
    ready = step % cfg.ready_every == 0  # [1] Sec. 3: ready criterion
    hist = jnp.roll(state.perf_hist, 1, axis=1).at[:, 0].set(perf)
    count = jnp.minimum(step, cfg.ttest_window)
    w2, h2, parent = exploit_explore(k_ready, weights, state.hypers, perf, task, cfg, hist,
                                     count)
    pick = lambda new, old: jnp.where(ready, new, old)
    weights, hypers = jax.tree.map(pick, w2, weights), pick(h2, state.hypers)
    row = jnp.clip(step // cfg.ready_every - 1, 0, state.lineage.shape[0] - 1)
    lineage = state.lineage.at[row].set(pick(parent, state.lineage[row]))
    best = jnp.argmax(perf)
    hit = (perf[best] >= cfg.target) & jnp.isinf(state.hit_step)
    hit_step = jnp.where(hit, step.astype(jnp.float32), state.hit_step)
    perf_now = pick(perf[parent], perf)  # copied members perform as their parents
    hist = pick(hist[parent], hist)  # a copy takes its parent's history too
    new = State(weights, hypers, perf_now, hist, step, lineage, hit_step, key)
    metrics = {"charts/best_perf": perf[best], "charts/mean_perf": perf.mean(),
               "charts/copies": jnp.where(ready, jnp.sum(parent != jnp.arange(cfg.population)),
                                          0).astype(jnp.float32)}
    for i, name in enumerate(task.names):
        metrics[f"charts/{name}_of_best"] = state.hypers[best, i]
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Best member by performance: its performance, its test score, and the step at which
    the population first reached the target."""
    task = make_task(cfg)
    best = jnp.argmax(state.perf)
    member = jax.tree.map(lambda w: w[best], state.weights)
    return {"best_perf": state.perf[best], "test_score": task.test_score(member),
            "steps_to_target": state.hit_step}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["best_perf", "test_score", "steps_to_target",
                                               "charts/mean_perf"])


if __name__ == "__main__":
    main()
