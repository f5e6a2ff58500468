"""Simple Gaussian ES: truncation selection with an isotropic Gaussian (= isotropic CEM/EMNA),
and the diagonal cross-entropy method (CEM) behind a flag.

[1] L. Weng, "Evolution Strategies" (2019), section "Simple Gaussian Evolution Strategies";
    D. Ha, "A Visual Guide to Evolution Strategies" (2017).
[2] R. Rubinstein, "The Cross-Entropy Method for Combinatorial and Continuous
    Optimization." Methodology and Computing in Applied Probability 1, 1999 (CEM).
[3] I. Szita, A. Lorincz, "Learning Tetris Using the Noisy Cross-Entropy Method." Neural
    Computation 18(12), 2006 (extra noise added to the variance).
[4] A. Pourchot, O. Sigaud, "CEM-RL." ICLR 2019, arXiv:1810.01222 (Sigma += eps I with
    eps <- tau eps + (1 - tau) eps_end); code github.com/apourchot/CEM-RL, ES.py sepCEM.tell.

One generation (minimisation), theta = (mu, sigma):

    x_i = mu^(t) + sigma^(t) y_i,  y_i ~ N(0, I),  i = 1..Lambda          post: sampling
    E = the lambda samples with the smallest f (the elite set)             post: selection
    mu^(t+1) = 1/lambda sum_{i in E} x_i                                   post
    sigma^(t+1)^2 = 1/lambda sum_{i in E} (x_i - mu^(t))^2                 post (OLD mean)

The post's per-sample square is pooled over the n coordinates too (1/(lambda n) sum_i
||x_i - mu^(t)||^2), so sigma stays a scalar and the distribution isotropic.
Flags: `variance_around=new_mean` centres the variance on mu^(t+1) (the maximum-likelihood
fit, as in CEM); `diagonal` keeps one sigma per coordinate (diagonal CEM [2]); `noise_init`
= eps_0 > 0 adds extra noise to every variance [3, 4], decayed first, then added, as in
[4]'s sepCEM.tell: refit t adds eps_{t+1} = tau eps_t + (1 - tau) eps_end (the first adds
tau eps_0 + (1 - tau) eps_end, not eps_0).

Reproduce (2-core CPU, float32, 11 seeds vmapped; wall time of the whole command):
    python evolution/simple_gaussian_es.py --preset sphere --num-seeds 11       # 21 s
    python evolution/simple_gaussian_es.py --preset rosenbrock --num-seeds 11   # 17 s
Measured: sphere-10 (x0 ~ U[-5,5], sigma0 2, Lambda 40, lambda 10) reaches 1e-8 in 11/11
seeds, median 1800 evals (1680-1960; catalog 1800); with the variance around the new mean
10/11, median 1540. Rosenbrock-10 (x0 = 0, sigma0 0.5) fails in 11/11 within 1e5 evals:
best f 4.0-5.1, sigma collapsed to 2e-4 - 6e-4 (a negative control: CMA-ES solves it in
about 5000 evals). The post gives no numbers.

Differences from the paper:
- The post writes the variance per sample; we average it over the coordinates as well
  (isotropic sigma). nevergrad's NaiveIsoEMNA returns a per-coordinate vector instead.
- Selection is deterministic truncation by f; ties are broken by position (argsort).
- `selection=worst` and `selection=none` are deliberately broken variants for the tests.
- With noise_init > 0, sigma never falls below sqrt(eps_end) (3e-3 by default), so the `cem`
  preset stalls near f ~ 1e-5 on the sphere: the extra noise is meant for noisy RL returns.
- `stop_at_target` (default on) freezes the state once best f < target.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct

from common import blackbox, run

# --- CONFIG ---

VARIANCE = ("old_mean", "new_mean")
SELECTION = ("best", "worst", "none")


@dataclass(frozen=True)
class Config:
    """Truncation-selection Gaussian ES on a common.blackbox test function."""

    problem: str = "sphere"
    """test function (common.blackbox.PROBLEMS)"""
    dim: int = 10
    """dimension n"""
    popsize: int = 40
    """Lambda: samples per generation"""
    elites: int = 10
    """lambda: the best samples kept to refit the Gaussian"""
    x0: float = 0.0
    """initial mean, every coordinate (used when init_range == 0)"""
    init_range: float = 5.0
    """> 0: draw the initial mean from U[-init_range, init_range]^n"""
    sigma0: float = 2.0
    """initial standard deviation"""
    variance_around: str = "old_mean"
    """old_mean (the post: deviations from mu^(t)) or new_mean (from mu^(t+1), as in CEM)"""
    diagonal: bool = False
    """diagonal CEM: one sigma per coordinate instead of one pooled scalar"""
    noise_init: float = 0.0
    """extra variance eps_0, decayed once before the first refit adds it (CEM-RL: 1e-3; 0: off)"""
    noise_end: float = 1e-5
    """limit eps_end of the extra variance (CEM-RL)"""
    noise_decay: float = 0.95
    """tau in eps <- tau eps + (1 - tau) eps_end (CEM-RL)"""
    selection: str = "best"
    """best (the method); worst or none (no selection) are broken variants for the tests"""
    target: float = 1e-8
    """f value that counts as solved (evals_to_target)"""
    stop_at_target: bool = True
    """freeze the run once the best f is below target"""
    max_evals: int = 100_000
    """evaluation budget"""
    generations: int = 0
    """scan length (0: ceil(max_evals / popsize))"""
    x64: bool = False
    """run in float64 (main() enables jax x64 for the run)"""

    @property
    def num_updates(self) -> int:
        return self.generations or math.ceil(self.max_evals / self.popsize)

    @property
    def steps_per_update(self) -> int:
        """Function evaluations per generation."""
        return self.popsize

    @property
    def num_kept(self) -> int:
        return self.popsize if self.selection == "none" else self.elites

    def validate(self):
        choices = {"problem": blackbox.PROBLEMS, "variance_around": VARIANCE,
                   "selection": SELECTION}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {name}={getattr(self, name)!r}")
        if self.dim < 2:
            raise ValueError(f"dim must be >= 2, got dim={self.dim}")
        if not 1 <= self.elites <= self.popsize:
            raise ValueError(f"elites must be in [1, popsize={self.popsize}], "
                             f"got elites={self.elites}")
        if self.elites == 1 and self.variance_around == "new_mean":
            raise ValueError("elites=1 with variance_around='new_mean' gives sigma = 0")
        for name in ("sigma0", "target"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")
        for name in ("noise_init", "noise_end", "init_range", "max_evals", "generations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}")
        if not 0 <= self.noise_decay <= 1:
            raise ValueError(f"noise_decay must be in [0, 1], got noise_decay={self.noise_decay}")
        if self.num_updates < 1:
            raise ValueError(f"max_evals={self.max_evals} gives no generation")


PRESETS = {
    "quick": dict(max_evals=4000),
    "sphere": dict(problem="sphere", init_range=5.0, sigma0=2.0, max_evals=200_000),
    "rosenbrock": dict(problem="rosenbrock", init_range=0.0, x0=0.0, sigma0=0.5,
                       max_evals=100_000),
    "cem": dict(diagonal=True, variance_around="new_mean", noise_init=1e-3),
    "paper": dict(),  # the post's truncation-selection Gaussian ES (the Config defaults)
}

# --- STRATEGY (pure init / ask / tell) ---


@struct.dataclass
class ESState:
    mean: jax.Array  # mu, (n,)
    sigma: jax.Array  # scalar (isotropic) or (n,) (diagonal)
    noise: jax.Array  # extra variance eps_t (added by the last refit; eps_0 before any)
    g: jax.Array  # generation counter


def init_strategy(mean: jax.Array, cfg: Config) -> ESState:
    dt = mean.dtype
    shape = (cfg.dim,) if cfg.diagonal else ()
    return ESState(mean=mean, sigma=jnp.full(shape, cfg.sigma0, dt),
                   noise=jnp.asarray(cfg.noise_init, dt), g=jnp.int32(0))


def ask(key, es: ESState, cfg: Config) -> jax.Array:
    """Lambda samples x_i = mu + sigma y_i, (popsize, n)."""
    y = jax.random.normal(key, (cfg.popsize, cfg.dim), es.mean.dtype)  # y_i ~ N(0, I)
    return es.mean + es.sigma * y  # post: x_i = mu^(t) + sigma^(t) y_i


def select(x: jax.Array, f: jax.Array, cfg: Config) -> jax.Array:
    """The elite set, (num_kept, n): the lambda smallest f (or the broken variants)."""
    if cfg.selection == "none":
        return x
    order = jnp.argsort(f if cfg.selection == "best" else -f)
    return x[order[: cfg.elites]]


def tell(es: ESState, x: jax.Array, f: jax.Array, cfg: Config) -> ESState:
    elite = select(x, f, cfg)  # (lambda, n)
    mean = jnp.mean(elite, axis=0)  # post: mu^(t+1) = 1/lambda sum_elite x_i
    center = es.mean if cfg.variance_around == "old_mean" else mean
    dev2 = (elite - center) ** 2  # (lambda, n)
    # post: sigma^2 = 1/lambda sum_elite (x_i - mu^(t))^2, pooled over coordinates too
    var = jnp.mean(dev2, axis=0) if cfg.diagonal else jnp.mean(dev2)
    noise = es.noise  # stays 0 when the extra noise is off
    if cfg.noise_init > 0:  # [4] code: eps <- tau eps + (1 - tau) eps_end, decayed first
        noise = cfg.noise_decay * es.noise + (1 - cfg.noise_decay) * cfg.noise_end
    var = var + noise  # [3, 4]: Sigma + eps I, with the decayed eps
    return es.replace(mean=mean, sigma=jnp.sqrt(var), noise=noise, g=es.g + 1)


# --- TRAIN (runner contract) ---


@struct.dataclass
class State:
    es: ESState
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
    x = ask(k_ask, state.es, cfg)
    f = jax.vmap(fn)(x)
    es = tell(state.es, x, f, cfg)
    evals = state.evals + cfg.popsize
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
               "charts/noise": state.es.noise}
    return state, metrics


def update(state: State, cfg: Config):
    return generation(state, cfg)


def evaluate(state: State, cfg: Config):
    return {"evals_to_target": state.evals_at_target, "best_f": state.best_f,
            "final_sigma": jnp.mean(state.es.sigma)}


def make_train(cfg: Config, fn=None, generations: int | None = None):
    """train(key) -> (final State, metrics [generations]) on fn (default: cfg.problem)."""
    n = generations or cfg.num_updates

    def train(key):
        return jax.lax.scan(lambda s, _: generation(s, cfg, fn), init(key, cfg), None, n)

    return train


def make_seeds_train(cfg: Config, fn=None, generations: int | None = None):
    """jit(vmap(train)) over a batch of keys: one compile for all seeds."""
    return jax.jit(jax.vmap(make_train(cfg, fn, generations)))


# --- MAIN ---


def main(argv=None):
    cfg, _ = run.parse(Config, PRESETS, argv, description=__doc__)
    with jax.enable_x64(cfg.x64):
        return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                        doc=__doc__, summary_keys=["evals_to_target", "best_f", "final_sigma",
                                                   "charts/evals"])


if __name__ == "__main__":
    main()
