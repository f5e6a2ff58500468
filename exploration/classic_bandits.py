"""Classic exploration on K-armed bandits: epsilon-greedy, UCB1, Boltzmann, Thompson sampling.

[1] P. Auer, N. Cesa-Bianchi, P. Fischer. "Finite-time Analysis of the Multiarmed Bandit
    Problem." Machine Learning 47, 2002 (UCB1, epsilon_n-greedy). No arXiv id.
[2] W. R. Thompson. "On the Likelihood that One Unknown Probability Exceeds Another in View
    of the Evidence of Two Samples." Biometrika 25, 1933. No arXiv id.
[3] L. Weng. "The Multi-Armed Bandit Problem and Its Solutions" (Lil'Log, 2018) and its code
    lilianweng/multi-armed-bandit (main.py: experiment(K=10, N=5000)); the exploration post
    ("Classic Exploration Strategies") points there.

Q_t(a) = S_t(a) / N_t(a) is the sample average of the N_t(a) rewards (sum S_t(a)) of arm a
after t pulls (0 for an arm never pulled). Each strategy picks a_{t+1}:

    epsilon-greedy: a uniformly random arm w.p. eps_t, else argmax_a Q_t(a)      post
        eps_t = eps (constant) or eps_n = min(1, c K / (d^2 n)), n = t + 1         [1] Fig. 3
    UCB1: argmax_a Q_t(a) + sqrt(c ln t / N_t(a)), c = 2; an arm with N = 0 first   [1] Fig. 1
    Boltzmann: pi(a) = exp(Q_t(a) / tau_t) / sum_b exp(Q_t(b) / tau_t)            post
        tau_t = tau (constant) or tau / ln(n + 1), n = t + 1 (annealed)
    Thompson, Bernoulli arms: theta_a ~ Beta(alpha_0 + S(a), beta_0 + N(a) - S(a)),
        i.e. alpha += r, beta += 1 - r after each pull; a = argmax_a theta_a        [2], [3]
    Thompson, Gaussian arms (known noise sigma, prior N(mu_0, sigma_0^2)):
        1/v_a = 1/sigma_0^2 + N(a)/sigma^2,  m_a = v_a (mu_0/sigma_0^2 + S(a)/sigma^2),
        theta_a ~ N(m_a, v_a); a = argmax_a theta_a                                 (conjugate)
Ties in every argmax are broken uniformly at random. Expected (pseudo-)regret after T pulls:
    R_T = sum_t (mu* - mu_{a_t});  UCB1 on [0,1] rewards: E[R_T] <= 8 sum_{i: D_i > 0} ln T / D_i
          + (1 + pi^2/3) sum_i D_i with gaps D_i = mu* - mu_i                       [1] Thm. 1

The bandits are procedural: `num_bandits` instances per seed with arm means drawn at `init`
(Bernoulli p ~ U[0,1] as in [3]; Gaussian mu ~ N(0,1), rewards N(mu, reward_std^2)). With
`--strategy all` the four strategies play the same instances side by side. One `update` is
`pulls_per_update` pulls (a lax.scan) of every instance by every strategy (vmapped over
instances); the runner scans `update` and vmaps seeds, so a run is one jitted program.

Reproduce (CPU; the plot exploration/classic_bandits_regret.png):
    python exploration/classic_bandits.py --preset paper --num-seeds 4 \
        --plot exploration/classic_bandits_regret.png
    python exploration/classic_bandits.py --preset quick --bandit gaussian
    python exploration/classic_bandits.py --strategy epsilon_greedy --epsilon 0  # pure greedy
`--plot PNG` (this file's only extra flag) draws the cumulative regret and the optimal-arm
fraction of every strategy of the run on one figure.
Measured (`--preset paper --num-seeds 4`, 2-core CPU shared with other jobs, 22 s compile +
320 s loop, Thompson's Beta draws take most of it): expected regret at T = 5000, mean over
512 instances, mean +- std over 4 seeds: Thompson 40.0 +- 0.9, eps-greedy (0.01) 235 +- 12,
UCB1 275 +- 2, Boltzmann (tau 0.1) 297 +- 10; pulls on the best arm 0.89, 0.65, 0.64, 0.50;
[1] Thm. 1's UCB1 bound on these instances 5703 (loose: gaps of U[0,1] arms can be tiny).

Paper setting: there is no single paper experiment for the four classics. `paper` is [3]'s
experiment (10-armed Bernoulli bandit, p ~ U[0,1], 5000 pulls, eps = 0.01, UCB1, Thompson with
Beta(1, 1)), run on 512 instances instead of one. [1] (Sec. 4) ran 2- and 10-armed Bernoulli
bandits with fixed means up to 100k plays; its number is the bound of Thm. 1, which the
`evaluate` output `ucb1_regret_bound` gives per instance set (NaN for Gaussian arms: the
theorem needs rewards in [0, 1]). [3] reports curves only, no numbers.

Logged per update: charts/regret_<s> (cumulative expected regret, mean over instances) and
charts/optimal_arm_frac_<s> (fraction of this update's pulls that took the best arm), for
each strategy s. `evaluate`: final regret_<s>, optimal_arm_frac_<s> over the whole run, and
ucb1_regret_bound. Nothing is NaN except that bound on Gaussian bandits.

Differences from the papers / [3]'s code:
- UCB1 follows [1] (each arm once first, then sqrt(2 ln t / N)); [3]'s code instead starts
  from optimistic estimates 1.0 and uses sqrt(2 ln t / (1 + N)). [3]'s epsilon-greedy also
  starts from Q = 1 (optimistic); here every Q starts at 0 (a sample average, as in [1]).
- [1]'s experiments set d of epsilon_n-greedy to the true smallest gap; instances here are
  random, so d is a flag (default 0.1) and c = 0.15 (a value of [1] Sec. 4's range).
- Boltzmann exploration is not in [1] or [3]; tau = 0.1 and the logarithmic annealing are
  choices of this file (the post names only the temperature).
- [1] was not at hand: its figure and section numbers and the c range are from memory;
  UCB1's index and the epsilon_n formula match its common statements (e.g. obandit's docs).
- Gaussian Thompson sampling assumes the reward noise std is known (= reward_std) and uses
  the N(0, 1) prior the Gaussian instances are drawn from.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct

from common import run
from common.plot import save_png

STRATEGIES = ("epsilon_greedy", "ucb1", "boltzmann", "thompson")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Bandit exploration; defaults are [3]'s experiment (K = 10 Bernoulli arms, 5000 pulls)."""

    strategy: str = "all"
    """epsilon_greedy, ucb1, boltzmann, thompson, or all (the four on the same instances)"""
    bandit: str = "bernoulli"
    """arm rewards: bernoulli (p ~ U[0,1]) or gaussian (mu ~ N(0,1), noise reward_std)"""
    num_arms: int = 10
    """arms K per bandit"""
    num_bandits: int = 512
    """bandit instances per seed (vmapped)"""
    horizon: int = 5000
    """pulls T per instance"""
    pulls_per_update: int = 50
    """pulls per `update` (one logged row)"""
    epsilon: float = 0.01
    """epsilon-greedy: exploration probability (constant schedule; [3] uses 0.01)"""
    epsilon_schedule: str = "constant"
    """epsilon-greedy: constant, or auer: eps_n = min(1, c K / (d^2 n)) ([1] Fig. 3)"""
    epsilon_c: float = 0.15
    """epsilon_n-greedy constant c"""
    epsilon_d: float = 0.1
    """epsilon_n-greedy d, a lower bound on the smallest gap, in (0, 1]"""
    ucb_c: float = 2.0
    """UCB1 confidence constant c in sqrt(c ln t / N) (2 in [1])"""
    tau: float = 0.1
    """Boltzmann temperature tau"""
    tau_schedule: str = "constant"
    """Boltzmann: constant, or log: tau_n = tau / ln(n + 1)"""
    prior_alpha: float = 1.0
    """Thompson (Bernoulli): Beta prior alpha_0"""
    prior_beta: float = 1.0
    """Thompson (Bernoulli): Beta prior beta_0"""
    prior_mean: float = 0.0
    """Thompson (Gaussian): prior mean mu_0"""
    prior_std: float = 1.0
    """Thompson (Gaussian): prior std sigma_0"""
    reward_std: float = 1.0
    """Gaussian bandit: reward noise std sigma (known to Thompson sampling)"""

    @property
    def strategies(self) -> tuple[str, ...]:
        return STRATEGIES if self.strategy == "all" else (self.strategy,)

    @property
    def num_updates(self) -> int:
        return self.horizon // self.pulls_per_update

    @property
    def steps_per_update(self) -> int:
        """Time steps t per update (each is one pull of every instance by every strategy)."""
        return self.pulls_per_update

    def validate(self):
        choices = {"strategy": (*STRATEGIES, "all"), "bandit": ("bernoulli", "gaussian"),
                   "epsilon_schedule": ("constant", "auer"), "tau_schedule": ("constant", "log")}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {ok}")
        for name, low in (("num_arms", 2), ("num_bandits", 1), ("horizon", 1),
                          ("pulls_per_update", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.horizon % self.pulls_per_update:
            raise ValueError(f"horizon={self.horizon} is not divisible by "
                             f"pulls_per_update={self.pulls_per_update}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1]")
        if not 0 < self.epsilon_d <= 1:
            raise ValueError(f"epsilon_d={self.epsilon_d} must be in (0, 1]")
        if self.ucb_c < 0:
            raise ValueError(f"ucb_c={self.ucb_c} must be >= 0")
        for name in ("epsilon_c", "tau", "prior_alpha", "prior_beta", "prior_std",
                     "reward_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


PRESETS = {
    # CPU demo in seconds: 256 instances, 2000 pulls.
    "quick": dict(num_bandits=256, horizon=2000, pulls_per_update=20),
    "paper": dict(),  # [3]'s experiment(K=10, N=5000), on 512 instances
}

# --- BANDITS ---


def make_bandits(key, cfg: Config):
    """Arm means [B, K]: Bernoulli p ~ U[0,1] ([3] bandits.py) or Gaussian mu ~ N(0, 1)."""
    shape = (cfg.num_bandits, cfg.num_arms)
    if cfg.bandit == "bernoulli":
        return jax.random.uniform(key, shape)
    return jax.random.normal(key, shape)


def pull(key, means, a, cfg: Config):
    """Rewards [...] of arms a [...] (means [..., K]): Bernoulli(p_a) or N(mu_a, sigma^2)."""
    mu = jnp.take_along_axis(means, a[..., None], -1)[..., 0]
    if cfg.bandit == "bernoulli":
        return jax.random.bernoulli(key, mu).astype(jnp.float32)
    return mu + cfg.reward_std * jax.random.normal(key, mu.shape)


# --- STRATEGIES ---


def q_hat(counts, sums):
    """Sample-average estimate Q(a) = S(a) / N(a), 0 for arms never pulled."""
    return sums / jnp.maximum(counts, 1.0)


def observe(counts, sums, a, r):
    """Record reward r of arm a: N(a) += 1, S(a) += r (for Beta: alpha += r, beta += 1 - r).
    Batched: counts, sums [..., K]; a, r [...]."""
    hot = jax.nn.one_hot(a, counts.shape[-1], dtype=counts.dtype)
    return counts + hot, sums + hot * r[..., None]


def argmax_random_tie(key, x):
    """argmax over the last axis, ties broken uniformly at random."""
    u = jax.random.uniform(key, x.shape)
    return jnp.argmax(jnp.where(x == x.max(-1, keepdims=True), u, -1.0), -1)


def epsilon_at(t, cfg: Config):
    """Exploration probability at the (t+1)-th pull: eps, or [1]'s min(1, cK / (d^2 n))."""
    if cfg.epsilon_schedule == "auer":
        n = t + 1.0
        return jnp.minimum(1.0, cfg.epsilon_c * cfg.num_arms / (cfg.epsilon_d**2 * n))
    return jnp.asarray(cfg.epsilon, jnp.float32)


def epsilon_greedy(key, counts, sums, eps):
    """Post / [1]: uniform random arm w.p. eps, else the greedy arm of Q."""
    k_greedy, k_coin, k_arm = jax.random.split(key, 3)
    greedy = argmax_random_tie(k_greedy, q_hat(counts, sums))
    explore = jax.random.uniform(k_coin, greedy.shape) < eps
    return jnp.where(explore, jax.random.randint(k_arm, greedy.shape, 0, counts.shape[-1]),
                     greedy)


def ucb1_index(counts, sums, t, c):
    """[1] Fig. 1: Q(a) + sqrt(c ln t / N(a)) after t pulls in all; +inf for N(a) = 0."""
    bonus = jnp.sqrt(c * jnp.log(jnp.maximum(t, 1.0)) / jnp.maximum(counts, 1.0))
    return jnp.where(counts > 0, q_hat(counts, sums) + bonus, jnp.inf)


def tau_at(t, cfg: Config):
    """Boltzmann temperature at the (t+1)-th pull: tau, or tau / ln(n + 1) annealed."""
    if cfg.tau_schedule == "log":
        return cfg.tau / jnp.log(t + 2.0)
    return jnp.asarray(cfg.tau, jnp.float32)


def boltzmann_logits(counts, sums, tau):
    """Post: pi(a) = softmax(Q / tau) (log-probabilities up to a constant)."""
    return q_hat(counts, sums) / tau


def beta_posterior(counts, sums, alpha0, beta0):
    """Bernoulli arms: Beta(alpha_0 + S, beta_0 + N - S), i.e. alpha += r, beta += 1 - r."""
    return alpha0 + sums, beta0 + counts - sums


def gaussian_posterior(counts, sums, mu0, sigma0, sigma):
    """Known noise sigma, prior N(mu0, sigma0^2): posterior mean m and std sqrt(v), with
    1/v = 1/sigma0^2 + N/sigma^2 and m = v (mu0/sigma0^2 + S/sigma^2)."""
    precision = 1.0 / sigma0**2 + counts / sigma**2
    mean = (mu0 / sigma0**2 + sums / sigma**2) / precision
    return mean, jnp.sqrt(1.0 / precision)


def thompson_sample(key, counts, sums, cfg: Config):
    """[2]: one draw theta_a from every arm's posterior."""
    if cfg.bandit == "bernoulli":
        alpha, beta = beta_posterior(counts, sums, cfg.prior_alpha, cfg.prior_beta)
        return jax.random.beta(key, alpha, beta)
    mean, std = gaussian_posterior(counts, sums, cfg.prior_mean, cfg.prior_std, cfg.reward_std)
    return mean + std * jax.random.normal(key, mean.shape)


def select(name, key, counts, sums, t, cfg: Config):
    """The arms [...] strategy `name` pulls next (counts, sums [..., K]; t pulls done)."""
    if name == "epsilon_greedy":
        return epsilon_greedy(key, counts, sums, epsilon_at(t, cfg))
    if name == "ucb1":
        return argmax_random_tie(key, ucb1_index(counts, sums, t, cfg.ucb_c))
    if name == "boltzmann":
        return jax.random.categorical(key, boltzmann_logits(counts, sums, tau_at(t, cfg)))
    if name == "thompson":
        k_theta, k_tie = jax.random.split(key)
        return argmax_random_tie(k_tie, thompson_sample(k_theta, counts, sums, cfg))
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


# --- STATE ---


@struct.dataclass
class Agent:
    counts: jax.Array  # [B, K] pulls N(a)
    sums: jax.Array  # [B, K] reward sums S(a)
    regret: jax.Array  # [B] cumulative expected regret
    optimal: jax.Array  # [B] pulls of the best arm


@struct.dataclass
class State:
    means: jax.Array  # [B, K] true arm means
    agents: dict  # strategy name -> Agent
    t: jax.Array  # pulls done per instance
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_env, key = jax.random.split(key)
    shape = (cfg.num_bandits, cfg.num_arms)
    agent = Agent(jnp.zeros(shape), jnp.zeros(shape), jnp.zeros(cfg.num_bandits),
                  jnp.zeros(cfg.num_bandits))
    return State(make_bandits(k_env, cfg), {s: agent for s in cfg.strategies},
                 jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def play(name, key, agent: Agent, means, t, cfg: Config) -> Agent:
    """One pull of every instance (batched over the B instances) by strategy `name`."""
    k_sel, k_rew = jax.random.split(key)
    a = select(name, k_sel, agent.counts, agent.sums, t, cfg)  # [B]
    counts, sums = observe(agent.counts, agent.sums, a, pull(k_rew, means, a, cfg))
    regret = means.max(-1) - jnp.take_along_axis(means, a[:, None], -1)[:, 0]  # mu* - mu_a
    return Agent(counts, sums, agent.regret + regret, agent.optimal + (a == means.argmax(-1)))


def update(state: State, cfg: Config):
    def step(carry, _):
        agents, t, key = carry
        key, *keys = jax.random.split(key, 1 + len(cfg.strategies))
        tf = t.astype(jnp.float32)
        agents = {s: play(s, k, agents[s], state.means, tf, cfg)
                  for s, k in zip(cfg.strategies, keys, strict=True)}
        return (agents, t + 1, key), None

    (agents, t, key), _ = jax.lax.scan(step, (state.agents, state.t, state.key), None,
                                       cfg.pulls_per_update)
    metrics = {}
    for s in cfg.strategies:
        metrics[f"charts/regret_{s}"] = agents[s].regret.mean()
        new_best = agents[s].optimal - state.agents[s].optimal
        metrics[f"charts/optimal_arm_frac_{s}"] = new_best.mean() / cfg.pulls_per_update
    return State(state.means, agents, t, key), metrics


def ucb1_regret_bound(means, horizon):
    """[1] Thm. 1 for rewards in [0, 1]: 8 sum_{D_i > 0} ln T / D_i + (1 + pi^2/3) sum D_i."""
    gaps = means.max(-1, keepdims=True) - means
    inv = jnp.where(gaps > 0, 1.0 / jnp.where(gaps > 0, gaps, 1.0), 0.0)
    return 8.0 * jnp.log(horizon) * inv.sum(-1) + (1 + math.pi**2 / 3) * gaps.sum(-1)


def evaluate(state: State, cfg: Config):
    """Final regret and optimal-arm fraction over the run per strategy, and [1]'s UCB1 bound
    at t = pulls done (mean over instances; NaN for Gaussian arms)."""
    out = {}
    for s in cfg.strategies:
        out[f"regret_{s}"] = state.agents[s].regret.mean()
        out[f"optimal_arm_frac_{s}"] = state.agents[s].optimal.mean() / jnp.maximum(state.t, 1)
    bound = ucb1_regret_bound(state.means, jnp.maximum(state.t, 2)).mean()
    out["ucb1_regret_bound"] = bound if cfg.bandit == "bernoulli" else jnp.nan
    return out


# --- PLOT ---


def plot_regret(run_dir, out, strategies=STRATEGIES):
    """Cumulative regret and optimal-arm fraction of every strategy of a run, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fig.suptitle(f"{c['config']['num_arms']}-armed {c['config']['bandit']} bandits, "
                 f"{c['config']['num_bandits']} instances per seed", fontsize=10)
    for s in strategies:
        if f"charts/regret_{s}/seeds" not in rows[0]:
            continue
        for ax, m in zip(axes, ("regret", "optimal_arm_frac"), strict=True):
            x, y, _ = plot.curve(rows, f"charts/{m}_{s}")
            mean, std = np.nanmean(y, 1), np.nanstd(y, 1)
            ax.plot(x, mean, label=f"{s} ({y.shape[1]} seeds)")
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    axes[0].set_ylabel("cumulative expected regret (mean over instances)")
    axes[1].set_ylabel("fraction of pulls on the best arm")
    for ax in axes:
        ax.set_xlabel("pulls t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    out = flags["--plot"]
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate,
                   argv=argv, doc=__doc__,
                   summary_keys=[f"{m}_{s}" for s in STRATEGIES
                                 for m in ("regret", "optimal_arm_frac")]
                   + ["ucb1_regret_bound"])
    if out is not None:
        print(plot_regret(res.run_dir, out))
    return res


if __name__ == "__main__":
    main()
