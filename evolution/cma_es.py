"""CMA-ES: the Covariance Matrix Adaptation Evolution Strategy, with IPOP restarts.

[1] N. Hansen. "The CMA Evolution Strategy: A Tutorial." arXiv:1604.00772, 2016
    (Appendix A, Table 1 and the equation numbers below; evosax cites the same numbers).
[2] N. Hansen, A. Ostermeier. "Completely Derandomized Self-Adaptation in Evolution
    Strategies." Evolutionary Computation 9(2), 2001.
[3] A. Auger, N. Hansen. "A Restart CMA Evolution Strategy With Increasing Population
    Size." CEC 2005 (IPOP-CMA-ES).
Post: L. Weng, "Evolution Strategies" (2019), section "CMA-ES".

One generation (minimisation; g counts generations since the last (re)start):

    y_k = B D z_k, z_k ~ N(0, I);  x_k = m + sigma y_k,  k = 1..lambda    [1] Eq. (38)-(40)
    <y>_w = sum_{i<=mu} w_i y_{i:lambda}  (ranked by f);  m <- m + c_m sigma <y>_w   (41)-(42)
    p_s <- (1-c_s) p_s + sqrt(c_s (2-c_s) mu_eff) C^{-1/2} <y>_w  (C^{-1/2} = B D^-1 B^T
           of the OLD C)                                                         (43)
    sigma <- sigma exp(c_s/d_s (||p_s|| / E||N(0,I)|| - 1))                      (44)
    h_s = 1[ ||p_s|| / sqrt(1-(1-c_s)^(2(g+1))) < (1.4 + 2/(n+1)) E||N(0,I)|| ]  (p. 28)
    p_c <- (1-c_c) p_c + h_s sqrt(c_c (2-c_c) mu_eff) <y>_w                    (45)
    w°_i = w_i (w_i >= 0),  w_i n / ||C^{-1/2} y_{i:lambda}||^2 (w_i < 0)      (46)
    C <- (1 + c_1 (1-h_s) c_c (2-c_c) - c_1 - c_mu sum_j w_j) C
         + c_1 p_c p_c^T + c_mu sum_i w°_i y_{i:lambda} y_{i:lambda}^T          (47)
    w'_i = ln((lambda+1)/2) - ln i;  mu = floor(lambda/2);  positive w = w' / sum w'+;
    negative (active) w = min(1 + c_1/c_mu, 1 + 2 mu_eff^-/(mu_eff+2),
                              (1-c_1-c_mu)/(n c_mu)) w' / sum |w'-|             (48)-(53)
    c_s = (mu_eff+2)/(n+mu_eff+5),  d_s = 1 + 2 max(0, sqrt((mu_eff-1)/(n+1)) - 1) + c_s
    c_c = (4+mu_eff/n)/(n+4+2 mu_eff/n),  c_1 = 2/((n+1.3)^2+mu_eff)
    c_mu = min(1-c_1, 2 (mu_eff-2+1/mu_eff)/((n+2)^2+mu_eff)),  c_m = 1        (54)-(58)
    E||N(0,I)|| = sqrt(n) (1 - 1/(4n) + 1/(21 n^2))

Termination ([1] App. B.3): TolX (sigma p_c and sigma sqrt(C_ii) all < tolx), TolFun
(range of the last 10 + ceil(30 n / lambda) generation-best values and of this generation's
values < tolfun), ConditionCov (cond C > 1e14), NoEffectAxis, NoEffectCoord. IPOP [3]:
on termination restart with lambda doubled, sigma0, C = I, zero paths and a fresh x0.

IPOP without dynamic shapes: every generation samples lambda_max = lambda0 2^max_restarts
points; only the first lambda (traced) are used: the rest get f = +inf, rank last and carry
weight 0, and only lambda evaluations are counted. So the whole run, restarts included, is
one lax.scan and many seeds are one vmap. The cost is lambda_max samples per generation.
The metric charts/evaluations is the number of evaluations each update made (lambda, 0
once frozen); the runner counts env_steps and steps/s from it (its `steps_metric`).

Reproduce (2-core CPU shared with other jobs, x64, 11 seeds in one vmapped scan):
    python evolution/cma_es.py --preset rosenbrock --num-seeds 11       # 30 s wall, 13 s compile
    python evolution/cma_es.py --preset rastrigin_ipop --num-seeds 11   # 55 s wall, 11 s compile
    python -m common.bench evolution/cma_es.py --peers                  # ours, pycma, evosax
Measured, evals to f < 1e-8 in 10-D with lambda = 10, median (min-max) over 11 seeds, ours vs
pycma 4.5.0 in the same process: sphere 1480 (1260-1600) vs 1461 (1411-1621); Rosenbrock
11/11 5110 (4300-5570) vs 10/11 5056 (4571-6091); rotated ellipsoid 4250 (4030-4520) vs
4151 (3861-4331); Rastrigin IPOP 11/11 77720 (28090-139250) vs the catalog's pycma 11/11
60974 (34491-95300). [1] is a tutorial with no benchmark numbers of its own.

Differences from the paper:
- Active (negative) weights are on by default, as in [1] Table 1, pycma and evosax;
  `--no-active` gives the positive-weights-only CMA-ES of [2] and the post.
- Strategy parameters follow the 2016 tutorial (= evosax 0.3.2) exactly; `--constants pycma`
  gives pycma 4.5.0's instead: c_s = min(1/2, (mu_eff+2)/(n+mu_eff+3)), 1/4 added inside
  c_mu (0.3196 and 0.0236 at n=lambda=10), d_s with sqrt((mu_eff-1)/(n+1)) scaled by
  max(1, 3 (1 - 2^(-n/9))) and c_1 scaled by min(1, lambda/6) (equal to [1] at n=lambda=10
  but for c_s in d_s); weights, c_c and chi_n are the same.
- Fixes of the post's equations: C^{-1/2} = B D^-1 B^T (the post writes D^{-1/2}); the p_s
  factor is sqrt(c_s (2-c_s) mu_eff); sqrt(mu_eff) replaces sqrt(lambda) in both paths
  (equal only for equal weights); the post's c_mu ~ min(1, lambda/n^2) is the ablation
  `c_mu_rule=post`; h_s, its (1-h_s) c_c (2-c_c) term and sum_j w_j (absent from the
  post) are included. `weights=equal` is the post's 1/mu recombination of the mu best.
- Eigendecomposition: eigh of the symmetrised C, eigenvalues floored at eig_floor * max
  for sampling and C^{-1/2}; ConditionCov reads cond C from the raw eigenvalues (a floored
  one could not exceed 1/eig_floor = max_condition), a singular C counts as cond = inf;
  `lazy_eigen` refreshes it every ceil(1/(10 n (c_1+c_mu))) generations (under vmap both
  lax.cond branches run, so it saves time only for one seed).
- Not implemented: the tutorial's Stagnation and TolUpSigma criteria, boundary handling,
  pycma's extras (sigma-change cap, mirrored sampling, TPA). The budget is checked per
  generation, so a run may exceed max_evals by < lambda evaluations (pycma does the same).
- IPOP redraws x0 from the init box at each restart (when init_range > 0), as in [3]; the
  rastrigin_ipop preset allows 6 restarts (lambda up to 640) where the catalog ran pycma
  with 9, since every generation pays for lambda_max samples.
- `stop_at_target` (default on) freezes the state once best f < target, like pycma's ftarget.
- A failed (NaN) evaluation counts as f = +inf: it ranks last (with active weights it gets
  a negative weight) and never becomes the best, as in evosax 0.3.2; pycma 4.5.0's `tell`
  instead replaces NaN by the median of the other values (and its fmin resamples). The
  best point over all (re)starts is kept as `best_x` (pycma's xbest); [1] keeps none.
"""

import dataclasses
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import blackbox, run

# --- CONFIG ---

WEIGHTS = ("log", "equal")
C_MU_RULES = ("tutorial", "post")
CONSTANTS = ("tutorial", "pycma")
RESTARTS = ("none", "ipop")


@dataclass(frozen=True)
class Config:
    """CMA-ES on a common.blackbox test function; defaults: Rosenbrock-10 as in the catalog."""

    problem: str = "rosenbrock"
    """test function (common.blackbox.PROBLEMS)"""
    dim: int = 10
    """dimension n"""
    x0: float = 0.0
    """initial mean, every coordinate (used when init_range == 0)"""
    init_range: float = 0.0
    """> 0: draw the initial mean from U[-init_range, init_range]^n (again at each restart)"""
    sigma0: float = 0.5
    """initial step size sigma"""
    popsize: int = 0
    """lambda (0: the default 4 + floor(3 ln n))"""
    weights: str = "log"
    """recombination weights: log (tutorial) or equal (the post's 1/mu)"""
    active: bool = True
    """active CMA: negative weights for the worst lambda - mu ([1] Eq. 53; --no-active: [2])"""
    c_mu_rule: str = "tutorial"
    """rank-mu rate: tutorial (Eq. 58) or post (min(1, lambda/n^2), an ablation)"""
    constants: str = "tutorial"
    """strategy constants: tutorial ([1] Table 1) or pycma (pycma 4.5.0's c_s, d_s, c_1, c_mu)"""
    rank_one_only: bool = False
    """ablation: c_mu = 0 (rank-one update only)"""
    rank_mu_only: bool = False
    """ablation: c_1 = 0 (rank-mu update only)"""
    no_covariance: bool = False
    """ablation: c_1 = c_mu = 0 (C stays I: an isotropic ES with CSA)"""
    no_csa: bool = False
    """ablation: sigma stays sigma0 (no cumulative step-size adaptation)"""
    lazy_eigen: bool = False
    """refresh B, D only every ceil(1/(10 n (c_1 + c_mu))) generations"""
    eig_floor: float = 1e-14
    """eigenvalues of C below eig_floor * max eigenvalue are raised to it (not for cond C)"""
    restart: str = "none"
    """none, or ipop: restart with doubled lambda on termination ([3])"""
    max_restarts: int = 6
    """IPOP restarts at most; every generation samples lambda0 * 2^max_restarts points"""
    tolx: float = 1e-11
    """TolX termination threshold (pycma's default)"""
    tolfun: float = 1e-11
    """TolFun termination threshold (pycma's default)"""
    max_condition: float = 1e14
    """ConditionCov termination threshold"""
    target: float = 1e-8
    """f value that counts as solved (evals_to_target)"""
    stop_at_target: bool = True
    """freeze the run once the best f is below target"""
    max_evals: int = 20_000
    """evaluation budget (generations stop counting once it is spent)"""
    generations: int = 0
    """scan length (0: ceil(max_evals / lambda0))"""
    x64: bool = True
    """run in float64 (main() enables jax x64 for the run)"""

    @property
    def lam0(self) -> int:
        return self.popsize or 4 + int(math.floor(3 * math.log(self.dim)))

    @property
    def lam_max(self) -> int:
        return self.lam0 * 2 ** self.max_restarts if self.restart == "ipop" else self.lam0

    @property
    def hist_len(self) -> int:
        return 10 + math.ceil(30 * self.dim / self.lam0)

    @property
    def num_updates(self) -> int:
        return self.generations or math.ceil(self.max_evals / self.lam0)

    @property
    def steps_per_update(self) -> int:
        """Function evaluations per generation of the first run (IPOP doubles it, a frozen
        run makes none): the metric charts/evaluations has the true count per update."""
        return self.lam0

    def validate(self):
        choices = {"problem": blackbox.PROBLEMS, "weights": WEIGHTS,
                   "c_mu_rule": C_MU_RULES, "restart": RESTARTS, "constants": CONSTANTS}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {name}={getattr(self, name)!r}")
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2, got dim={self.dim}")
        if self.popsize and self.popsize < 4:
            raise ValueError(f"popsize must be 0 (default) or >= 4, got popsize={self.popsize}")
        for name in ("sigma0", "tolx", "tolfun", "max_condition", "eig_floor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")
        for name in ("max_evals", "generations", "max_restarts", "init_range"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
        if self.rank_one_only and self.rank_mu_only:
            raise ValueError("rank_one_only and rank_mu_only exclude each other "
                             "(use no_covariance for c_1 = c_mu = 0)")
        if self.active and self.weights == "equal":
            raise ValueError("weights='equal' needs active=False (--no-active): the negative "
                             "weights are log weights")
        if self.num_updates < 1:
            raise ValueError(f"max_evals={self.max_evals} gives no generation")


PRESETS = {
    "quick": dict(max_evals=8000),
    "sphere": dict(problem="sphere", init_range=5.0, sigma0=2.0, max_evals=5000),
    "rosenbrock": dict(problem="rosenbrock", x0=0.0, sigma0=0.5, max_evals=20_000),
    "ellipsoid": dict(problem="rotated_ellipsoid", x0=3.0, sigma0=1.0, max_evals=20_000),
    "rastrigin_ipop": dict(problem="rastrigin", init_range=5.0, sigma0=2.0, restart="ipop",
                           max_restarts=6, max_evals=200_000, generations=2500),
    # the strategy parameters of [1] (the Config defaults) on the catalog's Rosenbrock-10
    "paper": dict(),
}

# --- STRATEGY PARAMETERS ---


def strategy_params(n: int, lam, lam_max: int | None = None, weights: str = "log",
                    active: bool = False, c_mu_rule: str = "tutorial",
                    constants: str = "tutorial") -> dict:
    """Default parameters of [1] Table 1 for dimension n and population lam (a traced
    value is fine). `weights` has lam_max entries (zero beyond lam). constants="pycma":
    pycma 4.5.0's c_s, d_s, c_1 and c_mu instead (weights, c_c, chi_n are the same)."""
    lam_max = int(lam) if lam_max is None else lam_max
    lam = jnp.asarray(lam, dtype=jnp.result_type(float))
    mu = jnp.floor(lam / 2)
    i = jnp.arange(1, lam_max + 1, dtype=lam.dtype)
    pos, neg = i <= mu, (i > mu) & (i <= lam)
    if weights == "log":
        w_prime = jnp.log((lam + 1) / 2) - jnp.log(i)  # [1] Eq. (49)
    else:
        w_prime = jnp.ones_like(i)  # post: 1/mu for the mu best
    w_pos, w_neg = jnp.where(pos, w_prime, 0.0), jnp.where(neg, w_prime, 0.0)
    mu_eff = jnp.sum(w_pos) ** 2 / jnp.sum(w_pos**2)  # [1] Eq. (8)
    mu_eff_neg = jnp.sum(w_neg) ** 2 / jnp.maximum(jnp.sum(w_neg**2), 1e-300)
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)  # [1] Eq. (56)
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)  # [1] Eq. (57), alpha_cov = 2
    if constants == "tutorial":
        c_sigma = (mu_eff + 2) / (n + mu_eff + 5)  # [1] Eq. (55)
        d_sigma = 1 + 2 * jnp.maximum(0.0, jnp.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
        c_mu = 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff)  # [1] Eq. (58)
    else:  # pycma 4.5.0: sigma_adaptation.py compute_cs/compute_damps, interfaces.py
        c_sigma = jnp.minimum(0.5, (mu_eff + 2) / (n + mu_eff + 3))
        damp_in = max(1.0, 3 * (1 - 0.5 ** (n / 9)))  # 1.61 at n = 10, -> 3 for large n
        d_sigma = 1 + 2 * jnp.maximum(0.0, damp_in * jnp.sqrt((mu_eff - 1) / (n + 1)) - 1
                                      ) + c_sigma
        c_1 = jnp.minimum(1.0, lam / 6) * c_1
        c_mu = 2 * (0.25 + mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff)
    if c_mu_rule == "tutorial":
        c_mu = jnp.minimum(1 - c_1, c_mu)  # [1] Eq. (58)
    else:
        c_mu = jnp.minimum(1 - c_1, jnp.minimum(1.0, lam / n**2))  # post: min(1, lambda/n^2)
    alpha = jnp.minimum(jnp.minimum(1 + c_1 / c_mu, 1 + 2 * mu_eff_neg / (mu_eff + 2)),
                        (1 - c_1 - c_mu) / (n * c_mu))  # [1] Eq. (50)-(52)
    w = w_pos / jnp.sum(w_pos)  # [1] Eq. (53), positive part
    if active:
        w = w + alpha * w_neg / jnp.maximum(jnp.sum(jnp.abs(w_neg)), 1e-300)
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))  # E||N(0, I)||, [1] p. 28
    return dict(weights=w, mu=mu, mu_eff=mu_eff, mu_eff_neg=mu_eff_neg, c_sigma=c_sigma,
                d_sigma=d_sigma, c_c=c_c, c_1=c_1, c_mu=c_mu, c_m=jnp.ones_like(c_1),
                chi_n=jnp.asarray(chi_n, lam.dtype), alpha_neg=alpha)


def cfg_params(lam, cfg: Config) -> dict:
    """strategy_params for the config, with the ablations applied to c_1 and c_mu."""
    p = strategy_params(cfg.dim, lam, cfg.lam_max, cfg.weights, cfg.active, cfg.c_mu_rule,
                        cfg.constants)
    if cfg.rank_one_only or cfg.no_covariance:
        p["c_mu"] = jnp.zeros_like(p["c_mu"])
    if cfg.rank_mu_only or cfg.no_covariance:
        p["c_1"] = jnp.zeros_like(p["c_1"])
    return p


# --- STRATEGY (pure init / ask / tell) ---


@struct.dataclass
class CMAState:
    mean: jax.Array  # m, (n,)
    sigma: jax.Array  # step size
    C: jax.Array  # covariance, (n, n)
    B: jax.Array  # eigenvectors of C as columns, (n, n)
    D: jax.Array  # sqrt of the eigenvalues, (n,)
    p_sigma: jax.Array  # conjugate evolution path, (n,)
    p_c: jax.Array  # evolution path, (n,)
    g: jax.Array  # generations since the last (re)start
    eig_g: jax.Array  # g at the last eigendecomposition
    lam: jax.Array  # population size lambda of this run (int32)
    f_hist: jax.Array  # generation-best f, newest first, (hist_len,)
    cond: jax.Array  # condition number of C from the RAW eigenvalues (ConditionCov)


def eigen(C: jax.Array, floor: float):
    """Symmetrise C and decompose it: C = B diag(D^2) B^T with the eigenvalues floored at
    floor * max (for sampling and C^{-1/2}), and cond C from the raw eigenvalues (before the
    floor, which would cap it at 1/floor; the largest finite float when the smallest is <= 0)."""
    C = (C + C.T) / 2
    ev, B = jnp.linalg.eigh(C)
    big = jnp.finfo(ev.dtype).max
    cond = jnp.where(ev[0] > 0, jnp.minimum(ev[-1] / ev[0], big), big)  # eigh: ascending
    ev = jnp.maximum(ev, floor * jnp.max(ev))  # evosax PR #69: no underflow
    return C, B, jnp.sqrt(ev), cond


def init_strategy(mean: jax.Array, cfg: Config, lam=None) -> CMAState:
    n, dt = mean.shape[0], mean.dtype
    zeros = jnp.zeros(n, dt)
    return CMAState(mean=mean, sigma=jnp.asarray(cfg.sigma0, dt), C=jnp.eye(n, dtype=dt),
                    B=jnp.eye(n, dtype=dt), D=jnp.ones(n, dt), p_sigma=zeros, p_c=zeros,
                    g=jnp.int32(0), eig_g=jnp.int32(0),
                    lam=jnp.asarray(cfg.lam0 if lam is None else lam, jnp.int32),
                    f_hist=jnp.full(cfg.hist_len, jnp.inf, dt), cond=jnp.ones((), dt))


def ask(key, es: CMAState, cfg: Config) -> jax.Array:
    """lam_max candidates (lam_max, n); only the first es.lam are used."""
    z = jax.random.normal(key, (cfg.lam_max, cfg.dim), es.mean.dtype)  # [1] Eq. (38)
    y = (z * es.D) @ es.B.T  # y = B D z ~ N(0, C), Eq. (39)
    return es.mean + es.sigma * y  # Eq. (40)


def tell(es: CMAState, x: jax.Array, f: jax.Array, cfg: Config) -> CMAState:
    n = cfg.dim
    p = cfg_params(es.lam, cfg)
    w = p["weights"]
    f = jnp.where(jnp.arange(cfg.lam_max) < es.lam, f, jnp.inf)  # unused samples rank last
    y = (x[jnp.argsort(f)] - es.mean) / es.sigma  # y_{i:lambda}, (lam_max, n)
    y_w = jnp.where(w > 0, w, 0.0) @ y  # <y>_w, [1] Eq. (41)
    mean = es.mean + p["c_m"] * es.sigma * y_w  # Eq. (42)
    c_s, c_c = p["c_sigma"], p["c_c"]
    inv_sqrt_C = (es.B / es.D) @ es.B.T  # C^{-1/2} of the old C (errata 1)
    p_sigma = (1 - c_s) * es.p_sigma + jnp.sqrt(c_s * (2 - c_s) * p["mu_eff"]) * (
        inv_sqrt_C @ y_w)  # Eq. (43)
    norm_ps = jnp.linalg.norm(p_sigma)
    sigma = es.sigma if cfg.no_csa else es.sigma * jnp.exp(
        c_s / p["d_sigma"] * (norm_ps / p["chi_n"] - 1))  # Eq. (44)
    h_sigma = (norm_ps / jnp.sqrt(1 - (1 - c_s) ** (2 * (es.g + 1)))
               < (1.4 + 2 / (n + 1)) * p["chi_n"]).astype(y.dtype)  # [1] p. 28
    p_c = (1 - c_c) * es.p_c + h_sigma * jnp.sqrt(c_c * (2 - c_c) * p["mu_eff"]) * y_w  # (45)
    mahal = jnp.sum((y @ inv_sqrt_C) ** 2, axis=1)  # ||C^{-1/2} y_i||^2
    w_circ = jnp.where(w >= 0, w, w * n / jnp.maximum(mahal, 1e-300))  # Eq. (46)
    c_1, c_mu = p["c_1"], p["c_mu"]
    delta_h = (1 - h_sigma) * c_c * (2 - c_c)
    C = ((1 + c_1 * delta_h - c_1 - c_mu * jnp.sum(w)) * es.C
         + c_1 * jnp.outer(p_c, p_c) + c_mu * (y.T * w_circ) @ y)  # Eq. (47)
    g = es.g + 1
    if cfg.lazy_eigen:
        gap = jnp.ceil(1 / (10 * n * jnp.maximum(c_1 + c_mu, 1e-300)))
        C, B, D, cond = jax.lax.cond(g - es.eig_g >= gap, lambda c: eigen(c, cfg.eig_floor),
                                     lambda c: (c, es.B, es.D, es.cond), C)
        eig_g = jnp.where(g - es.eig_g >= gap, g, es.eig_g)
    else:
        (C, B, D, cond), eig_g = eigen(C, cfg.eig_floor), g
    f_hist = jnp.roll(es.f_hist, 1).at[0].set(jnp.min(f))
    return es.replace(mean=mean, sigma=sigma, C=C, B=B, D=D, p_sigma=p_sigma, p_c=p_c, g=g,
                      eig_g=eig_g, f_hist=f_hist, cond=cond)


def condition(es: CMAState) -> jax.Array:
    """cond C of the last eigendecomposition, from the unfloored eigenvalues."""
    return es.cond


def stop_criteria(es: CMAState, f: jax.Array, cfg: Config) -> dict:
    """[1] App. B.3 criteria after tell, each a bool; f: this generation's values (unused
    ones +inf). `not_finite` flags a NaN/inf sigma or C (not a criterion of [1])."""
    used = jnp.arange(cfg.lam_max) < es.lam
    h = 10 + jnp.ceil(30 * cfg.dim / es.lam)
    recent = jnp.arange(cfg.hist_len) < h
    hi = jnp.maximum(jnp.max(jnp.where(recent, es.f_hist, -jnp.inf)),
                     jnp.max(jnp.where(used, f, -jnp.inf)))
    lo = jnp.minimum(jnp.min(jnp.where(recent, es.f_hist, jnp.inf)), jnp.min(f))
    tolfun = (es.g >= h) & (hi - lo < cfg.tolfun)
    std = es.sigma * jnp.sqrt(jnp.diag(es.C))
    tolx = jnp.all(es.sigma * jnp.abs(es.p_c) < cfg.tolx) & jnp.all(std < cfg.tolx)
    cond = condition(es) > cfg.max_condition
    i = es.g % cfg.dim
    axis = jnp.all(es.mean == es.mean + 0.1 * es.sigma * es.D[i] * es.B[:, i])
    coord = jnp.any(es.mean == es.mean + 0.2 * std)
    finite = jnp.isfinite(es.sigma) & jnp.all(jnp.isfinite(es.C))
    return {"tolx": tolx, "tolfun": tolfun, "no_effect_axis": axis, "no_effect_coord": coord,
            "condition_cov": cond, "not_finite": ~finite}


def terminated(es: CMAState, f: jax.Array, cfg: Config) -> jax.Array:
    """Any of stop_criteria ([1] App. B.3) holds."""
    c = stop_criteria(es, f, cfg)
    return (c["tolfun"] | c["tolx"] | c["condition_cov"] | c["no_effect_axis"]
            | c["no_effect_coord"] | c["not_finite"])


# --- TRAIN (runner contract) ---


@struct.dataclass
class State:
    es: CMAState
    key: jax.Array
    evals: jax.Array  # evaluations used (int32)
    best_f: jax.Array  # best f so far, over all (re)starts
    best_x: jax.Array  # the point that scored best_f, (n,) (NaN until a finite f)
    f_gen: jax.Array  # best f of the last generation run
    evals_at_target: jax.Array  # evals when best_f first fell below target (inf: never)
    restarts: jax.Array
    done: jax.Array  # frozen: target reached, or terminated without restarts left


def objective(cfg: Config):
    return blackbox.problem(cfg.problem, cfg.dim)


def initial_mean(key, cfg: Config) -> jax.Array:
    dt = jnp.result_type(float)
    if cfg.init_range > 0:
        return jax.random.uniform(key, (cfg.dim,), dt, -cfg.init_range, cfg.init_range)
    return jnp.full(cfg.dim, cfg.x0, dt)


def init(key, cfg: Config) -> State:
    k_x0, key = jax.random.split(key)
    es = init_strategy(initial_mean(k_x0, cfg), cfg)
    dt = es.mean.dtype
    return State(es=es, key=key, evals=jnp.int32(0), best_f=jnp.asarray(jnp.inf, dt),
                 best_x=jnp.full(cfg.dim, jnp.nan, dt),
                 f_gen=jnp.asarray(jnp.inf, dt), evals_at_target=jnp.asarray(jnp.inf, dt),
                 restarts=jnp.int32(0), done=jnp.array(False))


def generation(state: State, cfg: Config, fn=None):
    """One generation: ask, evaluate with vmap(fn) (default: cfg.problem), tell, and the
    termination test (an IPOP restart, or a freeze). A NaN f (a failed evaluation) counts
    as +inf: it ranks last and never becomes best_f (evosax's rule)."""
    fn = objective(cfg) if fn is None else fn
    evals_before = state.evals
    key, k_ask, k_x0 = jax.random.split(state.key, 3)
    es = state.es
    x = ask(k_ask, es, cfg)
    f = jax.vmap(fn)(x)
    f = jnp.where(jnp.isnan(f), jnp.inf, f)  # failed evaluations rank last
    f = jnp.where(jnp.arange(cfg.lam_max) < es.lam, f, jnp.inf)
    es_new = tell(es, x, f, cfg)
    stop = terminated(es_new, f, cfg)
    can_restart = (cfg.restart == "ipop") & (state.restarts < cfg.max_restarts)
    fresh = init_strategy(initial_mean(k_x0, cfg), cfg, jnp.minimum(2 * es.lam, cfg.lam_max))
    es_new = jax.tree.map(lambda a, b: jnp.where(stop & can_restart, a, b), fresh, es_new)
    evals = state.evals + es.lam
    i_gen = jnp.argmin(f)
    f_gen = f[i_gen]
    best_x = jnp.where(f_gen < state.best_f, x[i_gen], state.best_x)
    best_f = jnp.minimum(state.best_f, f_gen)
    hit = (best_f < cfg.target) & ~jnp.isfinite(state.evals_at_target)
    new = State(es=es_new, key=key, evals=evals, best_f=best_f, best_x=best_x, f_gen=f_gen,
                evals_at_target=jnp.where(hit, evals.astype(f.dtype), state.evals_at_target),
                restarts=state.restarts + (stop & can_restart),
                done=(cfg.stop_at_target & (best_f < cfg.target)) | (stop & ~can_restart))
    active = ~state.done & (state.evals < cfg.max_evals)
    state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
    state = state.replace(key=key)
    metrics = {"charts/evaluations": state.evals - evals_before,  # true count this update
               "charts/best_f": state.best_f, "charts/f": state.f_gen,
               "charts/sigma": state.es.sigma, "charts/evals": state.evals,
               "charts/cond": condition(state.es), "charts/restarts": state.restarts,
               "charts/popsize": state.es.lam}
    return state, metrics


def update(state: State, cfg: Config):
    return generation(state, cfg)


def evaluate(state: State, cfg: Config):
    return {"evals_to_target": state.evals_at_target, "best_f": state.best_f}


def make_train(cfg: Config, fn=None, generations: int | None = None):
    """train(key) -> (final State, metrics [generations]) on objective fn (default:
    cfg.problem); fn may close over traced values (vmap over objectives too)."""
    n = generations or cfg.num_updates

    def train(key):
        return jax.lax.scan(lambda s, _: generation(s, cfg, fn), init(key, cfg), None, n)

    return train


def make_seeds_train(cfg: Config, fn=None, generations: int | None = None):
    """jit(vmap(train)) over a batch of keys: one compile for all seeds."""
    return jax.jit(jax.vmap(make_train(cfg, fn, generations)))


# --- PEERS (python -m common.bench evolution/cma_es.py --peers) ---

PEER_PROBLEMS = {  # name: (Config overrides, pycma fmin2 extras); all n = 10, lambda = 10
    "sphere": (PRESETS["sphere"], {}),
    "rosenbrock": (PRESETS["rosenbrock"], {}),
    "rotated_ellipsoid": (PRESETS["ellipsoid"], {}),
    "rastrigin_ipop": (PRESETS["rastrigin_ipop"], {"restarts": 9, "incpopsize": 2}),
}


def numpy_problem(name: str, dim: int):
    """The common.blackbox function `name` in NumPy over a population (k, n), for pycma."""
    rot = blackbox.rotation(dim) if name == "rotated_ellipsoid" else np.eye(dim)
    scales = 1e6 ** (np.arange(dim) / (dim - 1))
    return {
        "sphere": lambda x: np.sum(x**2, -1),
        "rosenbrock": lambda x: np.sum(100 * (x[:, 1:] - x[:, :-1] ** 2) ** 2
                                       + (1 - x[:, :-1]) ** 2, -1),
        "rastrigin": lambda x: 10 * dim + np.sum(x**2 - 10 * np.cos(2 * np.pi * x), -1),
        "ellipsoid": lambda x: np.sum(scales * x**2, -1),
        "rotated_ellipsoid": lambda x: np.sum(scales * (x @ rot.T) ** 2, -1),
    }[name]


def _row(problem, impl, evals, gens, seconds, compile_s, n):
    ok = np.isfinite(evals)
    return {"problem": problem, "impl": impl, "solved": f"{ok.sum()}/{n}",
            "median evals": float(np.median(evals[ok])) if ok.any() else float("nan"),
            "min-max": f"{evals[ok].min():.0f}-{evals[ok].max():.0f}" if ok.any() else "-",
            "gen/s (all seeds)": gens / seconds, "compile s": compile_s}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def peer_benchmark(num_seeds: int = 11, rastrigin: bool = True) -> list[dict]:
    """Ours (the tutorial's constants, and pycma's) vs pycma vs evosax CMA_ES on the
    catalog's 10-D problems (lambda = 10, target 1e-8): one row per (problem,
    implementation). gen/s counts generations of all seeds per
    second after compiling (ours and evosax: one jitted vmapped scan; pycma: eager loop)."""
    rows = []
    with jax.enable_x64(True):
        for name, (over, pycma_extra) in PEER_PROBLEMS.items():
            if name == "rastrigin_ipop" and not rastrigin:
                continue
            cfg = Config(**{**over, "popsize": 10})
            keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
            for impl, c in (("ours", cfg), ("ours (pycma constants)",
                                            dataclasses.replace(cfg, constants="pycma"))):
                t0 = time.perf_counter()
                compiled = make_seeds_train(c).lower(keys).compile()
                compile_s = time.perf_counter() - t0
                (state, _), secs = _timed(compiled, keys)
                evals = np.asarray(state.evals_at_target)
                rows.append(_row(name, impl, evals, num_seeds * c.num_updates, secs,
                                 compile_s, num_seeds))
            rows.append(_pycma_row(name, cfg, pycma_extra, num_seeds))
            if cfg.restart == "none":
                rows.append(_evosax_row(name, cfg, num_seeds))
    return rows


def _pycma_row(name, cfg: Config, extra: dict, num_seeds: int) -> dict:
    import cma

    f_np = numpy_problem(cfg.problem, cfg.dim)
    pf = lambda xs: list(f_np(np.asarray(xs)))  # pycma evaluates in NumPy, per generation
    evals, gens, secs = [], 0, 0.0
    for s in range(num_seeds):
        rng = np.random.default_rng(s)
        x0 = ((lambda: rng.uniform(-cfg.init_range, cfg.init_range, cfg.dim))
              if cfg.init_range > 0 else np.full(cfg.dim, cfg.x0))
        opts = {"ftarget": cfg.target, "seed": s + 1, "popsize": cfg.lam0, "verbose": -9,
                "tolfun": cfg.tolfun, "maxfevals": cfg.max_evals}
        t0 = time.perf_counter()
        _, es = cma.fmin2(None, x0, cfg.sigma0, opts, parallel_objective=pf, **extra)
        secs += time.perf_counter() - t0
        gens += es.countiter
        ok = es.result.fbest < cfg.target
        evals.append(es.result.evaluations if ok else np.inf)
    return _row(name, f"pycma {cma.__version__}", np.asarray(evals, float), gens, secs, "-",
                num_seeds)


def _evosax_row(name, cfg: Config, num_seeds: int) -> dict:
    from evosax.algorithms import CMA_ES

    fn = objective(cfg)
    strat = CMA_ES(population_size=cfg.lam0, solution=jnp.zeros(cfg.dim))
    params = strat.default_params.replace(std_init=cfg.sigma0)

    def train(key):
        k0, k_init, key = jax.random.split(key, 3)
        state = strat.init(k_init, initial_mean(k0, cfg), params)

        def step(carry, k):
            state, best = carry
            k_ask, k_tell = jax.random.split(k)
            x, state = strat.ask(k_ask, state, params)
            f = jax.vmap(fn)(x)
            state, _ = strat.tell(k_tell, x, f, state, params)
            best = jnp.minimum(best, jnp.min(f))
            return (state, best), best

        _, best = jax.lax.scan(step, (state, jnp.inf), jax.random.split(key, cfg.num_updates))
        return best

    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(train)).lower(keys).compile()
    compile_s = time.perf_counter() - t0
    best, secs = _timed(compiled, keys)
    evals = [blackbox.evals_to_target(b, cfg.lam0 * np.arange(1, len(b) + 1), cfg.target)
             for b in np.asarray(best)]
    return _row(name, "evosax 0.3.2", np.asarray(evals), num_seeds * cfg.num_updates, secs,
                compile_s, num_seeds)


# --- MAIN ---


def main(argv=None):
    cfg, _ = run.parse(Config, PRESETS, argv, description=__doc__)
    with jax.enable_x64(cfg.x64):
        return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                        doc=__doc__, summary_keys=["evals_to_target", "best_f", "charts/evals",
                                                   "charts/sigma", "charts/restarts"],
                        steps_metric="charts/evaluations")


if __name__ == "__main__":
    main()
