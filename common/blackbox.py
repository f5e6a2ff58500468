"""Shared pieces of the black-box optimisers in evolution/: the classic test functions,
rank-based fitness shaping, evaluations-to-target, and the return of one policy episode.

Conventions: every optimiser MINIMISES f; RL code passes the negated return. Test
functions take one vector x of shape (n,) and return a scalar with f* = 0; vmap them over
a population.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- test functions


def sphere(x: jax.Array) -> jax.Array:
    """f(x) = sum_i x_i^2."""
    return jnp.sum(x**2)


def rosenbrock(x: jax.Array) -> jax.Array:
    """f(x) = sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2, minimum 0 at x = 1."""
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rastrigin(x: jax.Array) -> jax.Array:
    """f(x) = 10 n + sum_i x_i^2 - 10 cos(2 pi x_i): multimodal, minimum 0 at x = 0."""
    return 10.0 * x.shape[-1] + jnp.sum(x**2 - 10.0 * jnp.cos(2.0 * jnp.pi * x))


def rotation(dim: int, seed: int = 0) -> np.ndarray:
    """A fixed random orthogonal matrix (QR of a Gaussian matrix, signs made unique)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def ellipsoid(x: jax.Array, cond: float = 1e6, rot: jax.Array | None = None) -> jax.Array:
    """f(x) = sum_i cond^((i-1)/(n-1)) z_i^2 with z = R x (R = identity when rot is None)."""
    z = x if rot is None else rot.astype(x.dtype) @ x
    n = x.shape[-1]
    scales = cond ** (jnp.arange(n, dtype=x.dtype) / max(n - 1, 1))
    return jnp.sum(scales * z**2)


PROBLEMS = ("sphere", "rosenbrock", "rastrigin", "ellipsoid", "rotated_ellipsoid")


def problem(name: str, dim: int) -> Callable[[jax.Array], jax.Array]:
    """The test function `name` in `dim` dimensions (the rotated ellipsoid fixes its
    rotation from seed 0, so every run and every library sees the same function)."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {name!r}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    if name == "ellipsoid":
        return ellipsoid
    if name == "rotated_ellipsoid":
        rot = jnp.asarray(rotation(dim))
        return lambda x: ellipsoid(x, rot=rot)
    return {"sphere": sphere, "rosenbrock": rosenbrock, "rastrigin": rastrigin}[name]


def evals_to_target(best: np.ndarray, evals: np.ndarray, target: float) -> float:
    """Evaluations spent up to the first generation whose best f is below `target`
    (inf if never). `best` and `evals` are per-generation arrays (cumulative evals)."""
    hit = np.flatnonzero(np.asarray(best) < target)
    return float(np.asarray(evals)[hit[0]]) if hit.size else float("inf")


# ----------------------------------------------------------------------------- fitness shaping


def centered_ranks(f: jax.Array) -> jax.Array:
    """Ranks scaled to [-0.5, 0.5] (smallest f -> -0.5), summing to zero: the shaping of
    Salimans et al. 2017. Ties are broken by position."""
    n = f.shape[0]
    dtype = f.dtype if jnp.issubdtype(f.dtype, jnp.floating) else jnp.float32
    ranks = jnp.argsort(jnp.argsort(f)).astype(dtype)
    return ranks / (n - 1) - 0.5


# ----------------------------------------------------------------------------- policy episodes


def episode(env, act: Callable, key: jax.Array, params, num_steps: int):
    """Run one episode of `env` (a common.envs.Env) for at most `num_steps` steps.

    act(obs, key) -> action. Steps after the episode ends are masked: the state stops
    changing and no reward is added. Returns (total_return, length, final_state).
    """
    key, k = jax.random.split(key)
    obs, state = env.reset(k, params)

    def step(carry, key):
        obs, state, ret, length, done = carry
        k_act, k_env = jax.random.split(key)
        obs2, state2, reward, terminated, truncated = env.step(
            k_env, state, act(obs, k_act), params)
        # steps after the end change nothing (the step that ends the episode still counts)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(done, b, a), new, old)
        obs2, state2 = keep(obs2, obs), keep(state2, state)
        ret = ret + jnp.where(done, 0.0, reward)
        length = length + jnp.where(done, 0, 1)
        return (obs2, state2, ret, length, done | terminated | truncated), None

    carry = (obs, state, jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    (_, state, ret, length, _), _ = jax.lax.scan(step, carry, jax.random.split(key, num_steps))
    return ret, length, state
