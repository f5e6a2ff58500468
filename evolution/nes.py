"""Natural Evolution Strategies: the search-gradient core with an explicit Fisher matrix
(canonical NES), separable NES (SNES) and exponential NES (xNES).

[1] D. Wierstra, T. Schaul, J. Peters, J. Schmidhuber. "Natural Evolution Strategies."
    CEC 2008, arXiv:0804.3423.
[2] D. Wierstra, T. Schaul, T. Glasmachers, Y. Sun, J. Peters, J. Schmidhuber. "Natural
    Evolution Strategies." JMLR 15, 2014, arXiv:1106.4487 (Algorithms 3, 5, 6; Table 1).
Post: L. Weng, "Evolution Strategies" (2019), section "Natural Evolution Strategies".

Search gradient and natural gradient (post; [2] Section 2), for J(theta) = E_{x~p_theta}[f]:

    grad J = E[f(x) grad_theta log p_theta(x)] ~ sum_k u_k grad log p_theta(x_k)   post
    F = E[grad log p grad log p^T]  (Monte Carlo: 1/lambda sum_k s_k s_k^T)          post
    Gaussian closed form ([2] Section 2.3 [mem]; checked against the MC estimate in tests):
      F_ij = dm/dtheta_i^T S^-1 dm/dtheta_j + 1/2 tr(S^-1 dS/dtheta_i S^-1 dS/dtheta_j)
    natural gradient: F^-1 grad J (jnp.linalg.solve, damping), theta += eta F^-1 grad J
    KL[p_theta || p_theta+d] = +1/2 d^T F d + O(|d|^3)   (the post writes -1/2: a sign error)
    utilities (rank k = 1 is the best of lambda):
      u_k = max(0, ln(lambda/2+1) - ln k) / sum_j max(0, ln(lambda/2+1) - ln j) - 1/lambda

xNES ([2] Algorithm 5), x_k = mu + sigma B z_k, z_k ~ N(0, I), det B = 1:
    G_delta = sum_k u_k z_k,  G_M = sum_k u_k (z_k z_k^T - I),  G_sigma = tr(G_M)/d,
    G_B = G_M - G_sigma I;  mu += eta_mu sigma B G_delta;  sigma *= exp(eta_sigma/2 G_sigma);
    B <- B expm(eta_B/2 G_B)   (a matrix exponential: jax.scipy.linalg.expm)
SNES ([2] Algorithm 6), x_k = mu + sigma * z_k (element-wise):
    mu += eta_mu sigma * sum_k u_k z_k;  sigma *= exp(eta_sigma/2 sum_k u_k (z_k^2 - 1))
Defaults ([2] Table 1 [mem]; they equal evosax 0.3.2's): lambda = 4 + floor(3 ln d),
eta_mu = 1, xNES eta_sigma = eta_B = (9 + 3 ln d)/(5 d sqrt d), SNES eta_sigma =
(3 + ln d)/(5 sqrt d).

variant='nes' is the canonical NES of [2] Algorithm 3: theta is a flat vector in a chosen
parametrisation (`family`: chol = (mu, log diag L, strictly lower L) with S = L L^T; diag;
iso = (mu, log sigma)), scores come from jax.grad of log p, F is the closed form (or the
Monte-Carlo estimate from the population's scores), and theta += eta F^-1 grad J with
eta = eta_mu on the mean block and eta_sigma on the covariance block.

Reproduce (2-core CPU, x64, 11 seeds vmapped; wall time of the whole command):
    python evolution/nes.py --preset snes_sphere --num-seeds 11      # 19 s (6 s compile)
    python evolution/nes.py --preset xnes_ellipsoid --num-seeds 11   # 28 s (12 s compile)
Measured (x0 = 3, sigma0 = 1, lambda = 10, evals to f < 1e-8, 11/11 seeds each): SNES
sphere-10 median 1950 (1840-2030; evosax 0.3.2 SNES in `peer_benchmark`: 1910, 1810-1970);
xNES sphere-10 about 6000 (5890-6410 on 5 seeds); xNES rotated ellipsoid cond 1e6 median
8880 (8560-9260; CMA-ES 4190), where SNES stalls at f 690-1590; canonical NES (closed-form
Fisher, chol) 9440-9780 on 5 seeds. [2] reports curves, no number at this setting.
Plot: evolution/nes_convergence.png.

Differences from the paper:
- Minimisation: samples are ranked by increasing f, so u_1 (largest) goes to the smallest f.
- 'nes' uses a log-diagonal Cholesky factor (L_ii = exp(s_i) > 0) instead of [1]'s raw
  upper-triangular factor A, and separate rates for the mean and covariance blocks (the
  Fisher is block-diagonal, so this stays a natural-gradient step per block). Its Fisher
  gets a relative damping `damping * diag(F)` before the solve.
- Not implemented: adaptation sampling ([2] Algorithm 4; the post gives neither the
  significance level nor the factor), importance mixing, restarts, and the heavy-tailed
  and Cauchy search distributions of [2].
- `stop_at_target` (default on) freezes the state once best f < target.
"""

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import blackbox, run

# --- CONFIG ---

VARIANTS = ("nes", "snes", "xnes")
FAMILIES = ("chol", "diag", "iso")
FISHERS = ("exact", "mc")
SHAPINGS = ("utilities", "centered_ranks", "raw")


@dataclass(frozen=True)
class Config:
    """NES on a common.blackbox test function; defaults: xNES on sphere-10 from x0 = 3."""

    variant: str = "xnes"
    """nes (explicit Fisher, flat parametrisation), snes (separable) or xnes (full, expm)"""
    problem: str = "sphere"
    """test function (common.blackbox.PROBLEMS)"""
    dim: int = 10
    """dimension d"""
    x0: float = 3.0
    """initial mean, every coordinate (used when init_range == 0)"""
    init_range: float = 0.0
    """> 0: draw the initial mean from U[-init_range, init_range]^d"""
    sigma0: float = 1.0
    """initial standard deviation"""
    popsize: int = 0
    """lambda (0: the default 4 + floor(3 ln d))"""
    eta_mu: float = 1.0
    """learning rate of the mean"""
    eta_sigma: float = 0.0
    """learning rate of sigma (0: [2] Table 1 default of the variant; nes: xNES's)"""
    eta_B: float = 0.0
    """xNES learning rate of the shape matrix B (0: = the default eta_sigma)"""
    shaping: str = "utilities"
    """fitness shaping: utilities (NES), centered_ranks (OpenAI ES) or raw (-f)"""
    family: str = "chol"
    """nes only: chol (full), diag or iso (mu, log sigma) parametrisation of the Gaussian"""
    fisher: str = "exact"
    """nes only: exact (closed form) or mc (1/lambda sum of score outer products)"""
    damping: float = 1e-8
    """nes only: F + damping * diag(F) before the solve"""
    target: float = 1e-8
    """f value that counts as solved (evals_to_target)"""
    stop_at_target: bool = True
    """freeze the run once the best f is below target"""
    max_evals: int = 20_000
    """evaluation budget"""
    generations: int = 0
    """scan length (0: ceil(max_evals / lambda))"""
    x64: bool = True
    """run in float64 (main() enables jax x64 for the run)"""

    @property
    def lam(self) -> int:
        return self.popsize or 4 + int(math.floor(3 * math.log(self.dim)))

    @property
    def eta_sigma_default(self) -> float:
        d = self.dim
        if self.variant == "snes":
            return (3 + math.log(d)) / (5 * math.sqrt(d))  # [2] Table 1 [mem]
        return (9 + 3 * math.log(d)) / (5 * d * math.sqrt(d))  # [2] Table 1 [mem]

    @property
    def lr_sigma(self) -> float:
        return self.eta_sigma or self.eta_sigma_default

    @property
    def lr_B(self) -> float:
        return self.eta_B or self.eta_sigma_default

    @property
    def num_params(self) -> int:
        return num_params(self.family, self.dim)

    @property
    def num_updates(self) -> int:
        return self.generations or math.ceil(self.max_evals / self.lam)

    @property
    def steps_per_update(self) -> int:
        """Function evaluations per generation."""
        return self.lam

    def validate(self):
        choices = {"variant": VARIANTS, "problem": blackbox.PROBLEMS, "family": FAMILIES,
                   "fisher": FISHERS, "shaping": SHAPINGS}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {name}={getattr(self, name)!r}")
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2, got dim={self.dim}")
        if self.popsize and self.popsize < 2:
            raise ValueError(f"popsize must be 0 (default) or >= 2, got popsize={self.popsize}")
        for name in ("sigma0", "eta_mu"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")
        for name in ("eta_sigma", "eta_B", "damping", "init_range", "max_evals", "generations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
        if self.num_updates < 1:
            raise ValueError(f"max_evals={self.max_evals} gives no generation")


PRESETS = {
    "quick": dict(max_evals=8000),
    "snes_sphere": dict(variant="snes", problem="sphere", max_evals=5000),
    "xnes_sphere": dict(variant="xnes", problem="sphere", max_evals=10_000),
    "nes_sphere": dict(variant="nes", problem="sphere", max_evals=10_000),
    "xnes_ellipsoid": dict(variant="xnes", problem="rotated_ellipsoid", max_evals=40_000),
    "snes_ellipsoid": dict(variant="snes", problem="rotated_ellipsoid", max_evals=40_000),
    # xNES with [1]'s default population and learning rates (the Config defaults)
    "paper": dict(),
}

# --- SEARCH DISTRIBUTION: a Gaussian in a flat parametrisation theta ---


def num_params(family: str, n: int) -> int:
    return {"iso": n + 1, "diag": 2 * n, "chol": n + n * (n + 1) // 2}[family]


def unpack(theta: jax.Array, family: str, n: int):
    """theta -> (mean m (n,), lower-triangular factor L (n, n)) with S = L L^T."""
    m, rest = theta[:n], theta[n:]
    if family == "iso":
        return m, jnp.exp(rest[0]) * jnp.eye(n, dtype=theta.dtype)
    L = jnp.diag(jnp.exp(rest[:n]))  # log-diagonal: L_ii > 0
    if family == "chol":
        rows, cols = jnp.tril_indices(n, -1)
        L = L.at[rows, cols].set(rest[n:])
    return m, L


def pack(m: jax.Array, sigma, family: str) -> jax.Array:
    """theta of N(m, sigma^2 I) (sigma a scalar) in `family`."""
    n = m.shape[0]
    s = jnp.full((1 if family == "iso" else n,), jnp.log(sigma), m.dtype)
    lower = jnp.zeros((n * (n - 1) // 2 if family == "chol" else 0,), m.dtype)
    return jnp.concatenate([m, s, lower])


def log_prob(theta: jax.Array, x: jax.Array, family: str) -> jax.Array:
    """log N(x; m, L L^T)."""
    n = x.shape[-1]
    m, L = unpack(theta, family, n)
    z = jax.scipy.linalg.solve_triangular(L, x - m, lower=True)
    return (-0.5 * z @ z - jnp.sum(jnp.log(jnp.abs(jnp.diag(L))))
            - 0.5 * n * jnp.log(2 * jnp.pi))


def scores(theta: jax.Array, x: jax.Array, family: str) -> jax.Array:
    """grad_theta log p_theta(x_k) for every sample, (lambda, P)."""
    return jax.vmap(jax.grad(log_prob), (None, 0, None))(theta, x, family)


def search_gradient(theta, x, u, family: str) -> jax.Array:
    """post: grad J ~ sum_k u_k grad log p_theta(x_k) (u: shaped fitness, high = good)."""
    return u @ scores(theta, x, family)


def fisher_exact(theta: jax.Array, family: str, n: int) -> jax.Array:
    """Closed-form Fisher of a Gaussian: J_m^T S^-1 J_m + 1/2 tr(S^-1 dS_i S^-1 dS_j)."""
    mean = lambda t: unpack(t, family, n)[0]

    def cov(t):
        L = unpack(t, family, n)[1]
        return L @ L.T

    J_m = jax.jacobian(mean)(theta)  # (n, P)
    J_S = jax.jacobian(cov)(theta)  # (n, n, P)
    S_inv = jnp.linalg.inv(cov(theta))
    M = jnp.einsum("ij,jkp->pik", S_inv, J_S)  # S^-1 dS/dtheta_p, (P, n, n)
    return J_m.T @ S_inv @ J_m + 0.5 * jnp.einsum("pij,qji->pq", M, M)


def fisher_mc(s: jax.Array) -> jax.Array:
    """post: F = E[grad log p grad log p^T], estimated from scores s (N, P)."""
    return s.T @ s / s.shape[0]


def natural_gradient(F: jax.Array, g: jax.Array, damping: float = 0.0) -> jax.Array:
    """F^-1 g by a linear solve, with F + damping diag(F) (Levenberg-Marquardt scaling: the
    mean block grows like 1/sigma^2 while the log-scale block stays O(1), so a damping
    proportional to tr(F) would freeze the covariance once sigma is small)."""
    F = F + damping * jnp.diag(jnp.diag(F))
    return jnp.linalg.solve(F, g)


def kl_gauss(theta0, theta1, family: str, n: int) -> jax.Array:
    """KL[N(m0, S0) || N(m1, S1)] in closed form."""
    m0, L0 = unpack(theta0, family, n)
    m1, L1 = unpack(theta1, family, n)
    A = jax.scipy.linalg.solve_triangular(L1, L0, lower=True)  # L1^-1 L0
    dm = jax.scipy.linalg.solve_triangular(L1, m1 - m0, lower=True)
    logdet = 2 * jnp.sum(jnp.log(jnp.abs(jnp.diag(L1))) - jnp.log(jnp.abs(jnp.diag(L0))))
    return 0.5 * (jnp.sum(A**2) + dm @ dm - n + logdet)


# --- FITNESS SHAPING ---


def utilities(lam: int, dtype=None) -> jax.Array:
    """NES utilities u_1 >= ... >= u_lambda of the ranks 1 (best) .. lambda; sum 0."""
    k = jnp.arange(1, lam + 1, dtype=dtype or jnp.result_type(float))
    w = jnp.maximum(0.0, jnp.log(lam / 2 + 1) - jnp.log(k))
    return w / jnp.sum(w) - 1 / lam  # [2] Section 3.1 [mem]


def shape_fitness(f: jax.Array, shaping: str) -> jax.Array:
    """Per-sample weights, high for small f (minimisation)."""
    if shaping == "raw":
        return -f
    if shaping == "centered_ranks":
        return -blackbox.centered_ranks(f).astype(f.dtype)
    ranks = jnp.argsort(jnp.argsort(f))  # 0 = smallest f
    return utilities(f.shape[0], f.dtype)[ranks]


# --- STRATEGY (pure init / ask / tell) ---


@struct.dataclass
class NESState:
    mean: jax.Array  # mu, (d,)
    sigma: jax.Array  # xnes: scalar; snes: (d,); nes: S^(1/2d) (for the charts)
    B: jax.Array  # xnes: (d, d) with det 1; others: unused (1,) (orbax saves no empty array)
    theta: jax.Array  # nes: flat parameters (P,); others: unused (1,)
    g: jax.Array  # generation counter


def init_strategy(mean: jax.Array, cfg: Config) -> NESState:
    d, dt = mean.shape[0], mean.dtype
    empty = jnp.zeros((1,), dt)
    sigma = jnp.full((d,) if cfg.variant == "snes" else (), cfg.sigma0, dt)
    B = jnp.eye(d, dtype=dt) if cfg.variant == "xnes" else empty  # A = sigma0 I
    theta = pack(mean, cfg.sigma0, cfg.family) if cfg.variant == "nes" else empty
    return NESState(mean=mean, sigma=sigma, B=B, theta=theta, g=jnp.int32(0))


def ask(key, es: NESState, cfg: Config):
    """(x, z): lambda samples (lambda, d) and their standard-normal z."""
    z = jax.random.normal(key, (cfg.lam, cfg.dim), es.mean.dtype)
    if cfg.variant == "xnes":
        return es.mean + es.sigma * z @ es.B.T, z  # x_k = mu + sigma B z_k
    if cfg.variant == "snes":
        return es.mean + es.sigma * z, z  # x_k = mu + sigma * z_k
    m, L = unpack(es.theta, cfg.family, cfg.dim)
    return m + z @ L.T, z  # x_k = m + L z_k ~ N(m, L L^T)


def tell(es: NESState, x: jax.Array, z: jax.Array, f: jax.Array, cfg: Config) -> NESState:
    u = shape_fitness(f, cfg.shaping)  # (lambda,)
    d = cfg.dim
    eye = jnp.eye(d, dtype=x.dtype)
    if cfg.variant == "xnes":
        G_delta = u @ z  # [2] Alg. 5
        G_M = jnp.einsum("k,ki,kj->ij", u, z, z) - jnp.sum(u) * eye
        G_sigma = jnp.trace(G_M) / d
        G_B = G_M - G_sigma * eye
        mean = es.mean + cfg.eta_mu * es.sigma * es.B @ G_delta
        sigma = es.sigma * jnp.exp(cfg.lr_sigma / 2 * G_sigma)
        B = es.B @ jax.scipy.linalg.expm(cfg.lr_B / 2 * G_B)  # matrix exponential
        return es.replace(mean=mean, sigma=sigma, B=B, g=es.g + 1)
    if cfg.variant == "snes":
        grad_mu = u @ z  # [2] Alg. 6
        grad_sigma = u @ (z**2 - 1)
        mean = es.mean + cfg.eta_mu * es.sigma * grad_mu
        sigma = es.sigma * jnp.exp(cfg.lr_sigma / 2 * grad_sigma)
        return es.replace(mean=mean, sigma=sigma, g=es.g + 1)
    # Canonical NES ([2] Alg. 3): theta += eta F^-1 sum_k u_k grad log p(x_k)
    s = scores(es.theta, x, cfg.family)  # (lambda, P)
    g = u @ s
    F = fisher_exact(es.theta, cfg.family, d) if cfg.fisher == "exact" else fisher_mc(s)
    eta = jnp.where(jnp.arange(cfg.num_params) < d, cfg.eta_mu, cfg.lr_sigma).astype(x.dtype)
    theta = es.theta + eta * natural_gradient(F, g, cfg.damping)
    m, L = unpack(theta, cfg.family, d)
    scale = jnp.exp(jnp.mean(jnp.log(jnp.abs(jnp.diag(L)))))  # det(S)^(1/2d)
    return es.replace(mean=m, sigma=scale, theta=theta, g=es.g + 1)


def condition(es: NESState, cfg: Config) -> jax.Array:
    """Condition number of the search covariance."""
    if cfg.variant == "snes":
        return (jnp.max(es.sigma) / jnp.min(es.sigma)) ** 2
    if cfg.variant == "xnes":
        L = es.B
    else:
        L = unpack(es.theta, cfg.family, cfg.dim)[1]
    ev = jnp.linalg.eigvalsh(L @ L.T)
    return ev[-1] / ev[0]


# --- TRAIN (runner contract) ---


@struct.dataclass
class State:
    es: NESState
    key: jax.Array
    evals: jax.Array  # evaluations used (int32)
    best_f: jax.Array  # best f so far
    f_gen: jax.Array  # best f of the last generation run
    evals_at_target: jax.Array  # evals when best_f first fell below target (inf: never)
    done: jax.Array  # frozen once the target is reached (stop_at_target)


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
    inf = jnp.asarray(jnp.inf, es.mean.dtype)
    return State(es=es, key=key, evals=jnp.int32(0), best_f=inf, f_gen=inf,
                 evals_at_target=inf, done=jnp.array(False))


def generation(state: State, cfg: Config, fn=None):
    """One generation: ask, evaluate with vmap(fn) (default: cfg.problem), tell."""
    fn = objective(cfg) if fn is None else fn
    key, k_ask = jax.random.split(state.key)
    x, z = ask(k_ask, state.es, cfg)
    f = jax.vmap(fn)(x)
    es = tell(state.es, x, z, f, cfg)
    evals = state.evals + cfg.lam
    f_gen = jnp.min(f)
    best_f = jnp.minimum(state.best_f, f_gen)
    hit = (best_f < cfg.target) & ~jnp.isfinite(state.evals_at_target)
    new = State(es=es, key=key, evals=evals, best_f=best_f, f_gen=f_gen,
                evals_at_target=jnp.where(hit, evals.astype(f.dtype), state.evals_at_target),
                done=cfg.stop_at_target & (best_f < cfg.target))
    active = ~state.done & (state.evals < cfg.max_evals)
    state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state).replace(key=key)
    metrics = {"charts/best_f": state.best_f, "charts/f": state.f_gen,
               "charts/sigma": jnp.mean(state.es.sigma), "charts/evals": state.evals,
               "charts/cond": condition(state.es, cfg)}
    return state, metrics


def update(state: State, cfg: Config):
    return generation(state, cfg)


def evaluate(state: State, cfg: Config):
    return {"evals_to_target": state.evals_at_target, "best_f": state.best_f}


def make_train(cfg: Config, fn=None, generations: int | None = None):
    """train(key) -> (final State, metrics [generations]) on fn (default: cfg.problem)."""
    n = generations or cfg.num_updates

    def train(key):
        return jax.lax.scan(lambda s, _: generation(s, cfg, fn), init(key, cfg), None, n)

    return train


def make_seeds_train(cfg: Config, fn=None, generations: int | None = None):
    """jit(vmap(train)) over a batch of keys: one compile for all seeds."""
    return jax.jit(jax.vmap(make_train(cfg, fn, generations)))


# --- PEERS ---


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _row(impl, evals, gens, seconds, compile_s):
    ok = np.isfinite(evals)
    return {"problem": "sphere-10", "impl": impl, "solved": f"{ok.sum()}/{len(evals)}",
            "median evals": float(np.median(evals[ok])) if ok.any() else float("nan"),
            "min-max": f"{evals[ok].min():.0f}-{evals[ok].max():.0f}" if ok.any() else "-",
            "gen/s": gens / seconds, "compile s": compile_s}


def peer_benchmark(num_seeds: int = 11) -> list[dict]:
    """Our SNES vs evosax 0.3.2 SNES on sphere-10 from x0 = 3, sigma0 = 1, lambda = 10,
    target 1e-8 (x64): evals to target and generations/s of all seeds (one jitted vmapped
    scan each, timed after compiling)."""
    from evosax.algorithms import SNES

    cfg = Config(**PRESETS["snes_sphere"])
    fn = objective(cfg)
    rows = []
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
        train = make_seeds_train(cfg)
        t0 = time.perf_counter()
        compiled = train.lower(keys).compile()
        compile_s = time.perf_counter() - t0
        (state, _), secs = _timed(compiled, keys)
        rows.append(_row("ours", np.asarray(state.evals_at_target),
                         num_seeds * cfg.num_updates, secs, compile_s))

        strat = SNES(population_size=cfg.lam, solution=jnp.zeros(cfg.dim))
        params = strat.default_params.replace(std_init=cfg.sigma0)

        def peer(key):
            k_init, key = jax.random.split(key)
            st = strat.init(k_init, jnp.full(cfg.dim, cfg.x0), params)

            def step(carry, k):
                st, best = carry
                k_ask, k_tell = jax.random.split(k)
                x, st = strat.ask(k_ask, st, params)
                f = jax.vmap(fn)(x)
                st, _ = strat.tell(k_tell, x, f, st, params)
                best = jnp.minimum(best, jnp.min(f))
                return (st, best), best

            return jax.lax.scan(step, (st, jnp.inf), jax.random.split(key, cfg.num_updates))[1]

        t0 = time.perf_counter()
        compiled = jax.jit(jax.vmap(peer)).lower(keys).compile()
        compile_s = time.perf_counter() - t0
        best, secs = _timed(compiled, keys)
        evals = [blackbox.evals_to_target(b, cfg.lam * np.arange(1, len(b) + 1), cfg.target)
                 for b in np.asarray(best)]
        rows.append(_row("evosax 0.3.2", np.asarray(evals), num_seeds * cfg.num_updates, secs,
                         compile_s))
    return rows


# --- MAIN ---


def main(argv=None):
    cfg, _ = run.parse(Config, PRESETS, argv, description=__doc__)
    with jax.enable_x64(cfg.x64):
        return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                        doc=__doc__, summary_keys=["evals_to_target", "best_f", "charts/evals",
                                                   "charts/sigma", "charts/cond"])


if __name__ == "__main__":
    main()
