"""OpenAI Evolution Strategies (OpenAI-ES) for reinforcement learning.

[1] T. Salimans, J. Ho, X. Chen, S. Sidor, I. Sutskever. "Evolution Strategies as a Scalable
    Alternative to Reinforcement Learning." arXiv:1703.03864, 2017. Reference code:
    openai/evolution-strategies-starter.
[2] T. Salimans, I. Goodfellow, W. Zaremba et al. "Improved Techniques for Training GANs."
    arXiv:1606.03498, 2016 (virtual batch normalisation).
Post: L. Weng, "Evolution Strategies" (2019), section "OpenAI ES for RL".

The policy is a deterministic MLP whose parameters are one flat vector theta
(jax.flatten_util.ravel_pytree). ES ascends the Gaussian-smoothed return
F_sigma(theta) = E_eps F(theta + sigma eps) with a score-function estimate:

    grad F_sigma(theta) = 1/sigma E_{eps ~ N(0, I)} [ F(theta + sigma eps) eps ]   [1] Eq. 1-2
    g = 1/(n sigma) sum_i F_i eps_i                    (n members)                  [1] Alg. 1
    mirrored sampling: eps_{i + n/2} = -eps_i          (antithetic pairs)           [1] Sec. 2.2
    F_i <- centred rank of F_i, in [-0.5, 0.5]          (fitness shaping)           [1] Sec. 2.2
    theta <- theta + Adam(g - l2 theta)                 (L2 weight decay)           [1] Sec. 2.2
    eps_i = normal(fold_in(gen_key, i)): a worker only sends its scalar return; every
            worker and the master rebuild all eps_i from the shared key           [1] Alg. 2
    observation normalisation: o <- clip((o - mean) / std, -5, 5), the running statistics
            updated from a random 1% of the rollouts                           [1] Sec. 2.2, code
    virtual batch norm: each hidden pre-activation is normalised with the mean and variance
            it has on a reference batch of observations fixed at the start       [1] Sec. 2.2, [2]

Internally the optimiser minimises f = -return (the repo's convention for evolution/), so
the shaped weight of the worst member is +0.5 and descent on f is ascent on the return.

Reproduce (CPU, CartPole-v1, tanh MLP 4-16-2, theta0 = 0, n = 64, sigma 0.1, Adam 0.03):
    python evolution/openai_es.py --preset quick --num-seeds 4
2-core CPU: 28 s wall for 4 seeds x 100 generations (10 s of it compiling); the
10-episode evaluation of theta reaches 475 in 4/4 seeds, at generations 60, 38, 30, 32
(env steps to target 4.6e5, 1.7e5, 2.1e5, 1.9e5); the catalog measured 30-60 in 5/5.
GPU (brax, continuous actions; not run on CPU): python evolution/openai_es.py --preset brax
[1] Table 3 / Sec. 4.1: MuJoCo tasks and Humanoid in 10 minutes on 1,440 CPU cores (not
reproducible offline; no number of ours to set beside it).

Differences from the paper:
- One process simulates all workers: the population is one jax.vmap. The shared-seed
  scheme is kept exactly (noise from fold_in(gen_key, i)); `reconstruct_update` rebuilds a
  generation's update from (gen_key, member indices, returns) alone, bit-identical to the
  centralised one. The paper's workers draw slices of one shared noise table instead.
- g carries the 1/(n sigma) of the paper's equation; the starter code divides by n only.
  With Adam the scale matters only relative to the L2 term (l2_coef).
- Policies are deterministic (argmax for discrete actions, tanh in [-1, 1] for continuous
  ones); the paper's MuJoCo policies discretise actions into bins, not done here.
- The episode cap is a fixed-length masked lax.scan (max_steps); steps after `done` are
  computed and discarded, so steps_per_update counts executed steps and charts/env_steps
  counts real ones.
- VBN recomputes the reference statistics for every perturbed network (the reference
  batch is fixed; the statistics follow the parameters, as in [2]); it normalises every
  hidden layer of the MLP with a learned scale and shift (the paper used it in Atari CNNs).
  The reference batch comes from a uniformly random policy.
- `crn` (default on) gives every member of a generation the same episode key (common
  random numbers); the paper's workers ran independent episodes (`--no-crn`).
- Defaults are the CPU CartPole setting of the catalog; `--preset brax` uses the starter
  code's MuJoCo values (sigma 0.02, lr 0.01, L2 0.005, obs normalisation, 2 x 256 tanh).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from common import blackbox, envs, run
from common.rl import RunningMeanStd

# --- CONFIG ---

SHAPING = ("centered_ranks", "raw")


@dataclass(frozen=True)
class Config:
    """OpenAI-ES on a gymnax (CPU) or brax (GPU) environment."""

    env_id: str = "CartPole-v1"
    """environment id (gymnax, or brax/<name> for continuous control on a GPU)"""
    hidden: tuple[int, ...] = (16,)
    """hidden layer sizes of the tanh MLP policy"""
    population: int = 64
    """members per generation n (even when mirrored: n/2 antithetic pairs)"""
    sigma: float = 0.1
    """noise standard deviation sigma (fixed)"""
    lr: float = 0.03
    """Adam learning rate"""
    l2_coef: float = 0.005
    """L2 weight decay coefficient added to the ES gradient"""
    num_generations: int = 100
    """generations (updates of theta)"""
    max_steps: int = 500
    """episode cap in env steps (length of the masked rollout scan)"""
    mirrored: bool = True
    """mirrored (antithetic) sampling: members i and i + n/2 use eps and -eps"""
    fitness_shaping: str = "centered_ranks"
    """centered_ranks (the paper) or raw (the returns themselves)"""
    obs_norm: bool = False
    """normalise observations with running statistics (the paper's MuJoCo runs)"""
    obs_norm_prob: float = 0.01
    """probability that a rollout's observations update the running statistics"""
    obs_clip: float = 5.0
    """clip of the normalised observation"""
    vbn: bool = False
    """virtual batch normalisation of the hidden layers (the paper's Atari runs)"""
    vbn_batch: int = 128
    """size of the reference batch of observations (collected once at the start)"""
    zero_init: bool = True
    """theta0 = 0 (CartPole setting); False: the starter code's normc initialisation"""
    crn: bool = True
    """common random numbers: every member of a generation runs the same episode key"""
    eval_episodes: int = 10
    """episodes of the unperturbed theta evaluated after every generation"""
    target_return: float = 475.0
    """evaluation return that counts as solved (generations / env steps to target)"""

    @property
    def num_updates(self) -> int:
        return self.num_generations

    @property
    def steps_per_update(self) -> int:
        """Env steps executed per generation (population and evaluation rollouts)."""
        return (self.population + self.eval_episodes) * self.max_steps

    def validate(self):
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got population={self.population}")
        if self.mirrored and self.population % 2:
            raise ValueError(f"population must be even with mirrored sampling (antithetic "
                             f"pairs), got population={self.population}")
        for name in ("sigma", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)}")
        if self.l2_coef < 0:
            raise ValueError(f"l2_coef must be >= 0, got l2_coef={self.l2_coef}")
        if self.fitness_shaping not in SHAPING:
            raise ValueError(f"fitness_shaping must be one of {SHAPING}, "
                             f"got fitness_shaping={self.fitness_shaping!r}")
        if not 0.0 <= self.obs_norm_prob <= 1.0:
            raise ValueError(f"obs_norm_prob must be in [0, 1], got {self.obs_norm_prob}")
        for name in ("num_generations", "max_steps", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.vbn_batch < 2:
            raise ValueError(f"vbn_batch must be >= 2, got vbn_batch={self.vbn_batch}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got hidden={self.hidden}")
        envs.check_id(self.env_id)  # an unknown id raises, listing the close matches


PRESETS = {
    "quick": dict(num_generations=100),
    "brax": dict(env_id="brax/ant", hidden=(256, 256), population=256, sigma=0.02, lr=0.01,
                 l2_coef=0.005, max_steps=1000, obs_norm=True, zero_init=False,
                 num_generations=1000, eval_episodes=4, target_return=3000.0),
}

# --- NETWORKS ---


def make_env(cfg: Config):
    """The raw single environment (memoised by common.envs)."""
    return envs.make(cfg.env_id, 1).env


def init_policy(key, cfg: Config, obs_dim: int, act_dim: int) -> list[dict]:
    """MLP parameters: zeros, or normc (unit-norm columns; the output layer x 0.01)."""
    sizes = (obs_dim, *cfg.hidden, act_dim)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (a, b))
        scale = 0.01 if i == len(sizes) - 2 else 1.0
        w = w * scale / jnp.sqrt(jnp.sum(w**2, axis=0, keepdims=True))  # starter's normc
        layer = {"w": jnp.zeros((a, b)) if cfg.zero_init else w, "b": jnp.zeros(b)}
        if cfg.vbn and i < len(sizes) - 2:
            layer.update(gamma=jnp.ones(b), beta=jnp.zeros(b))
        layers.append(layer)
    return layers


def vbn_stats(params: list[dict], ref_obs: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """[2] VBN: mean and variance of every hidden pre-activation on the reference batch,
    computed with the current (perturbed) parameters."""
    x, stats = ref_obs, []  # (B, obs_dim)
    for layer in params[:-1]:
        h = x @ layer["w"] + layer["b"]  # (B, hidden)
        mu, var = h.mean(0), h.var(0)
        stats.append((mu, var))
        x = jnp.tanh(layer["gamma"] * (h - mu) / jnp.sqrt(var + 1e-5) + layer["beta"])
    return stats


def policy_apply(params: list[dict], obs: jax.Array, stats=None) -> jax.Array:
    """tanh MLP; with VBN `stats`, each hidden pre-activation is normalised by them."""
    x = obs
    for i, layer in enumerate(params[:-1]):
        h = x @ layer["w"] + layer["b"]
        if stats is not None:
            mu, var = stats[i]
            h = layer["gamma"] * (h - mu) / jnp.sqrt(var + 1e-5) + layer["beta"]
        x = jnp.tanh(h)
    return x @ params[-1]["w"] + params[-1]["b"]


def to_action(out: jax.Array, env) -> jax.Array:
    """Deterministic policy: argmax for discrete actions, tanh in [-1, 1] otherwise."""
    return jnp.argmax(out) if env.num_actions else jnp.tanh(out)


def _dims(env) -> tuple[int, int]:
    return int(np.prod(env.observation_shape)), env.num_actions or int(np.prod(env.action_shape))


def unravel_fn(cfg: Config):
    """theta0's structure: (flat zeros, unravel: flat vector -> list of layers)."""
    env = make_env(cfg)
    flat, unravel = ravel_pytree(init_policy(jax.random.PRNGKey(0), cfg, *_dims(env)))
    return flat, unravel


# --- OBSERVATION STATISTICS ---


def normalize_obs(rms: RunningMeanStd, obs: jax.Array, clip: float) -> jax.Array:
    """o <- clip((o - mean) / std, -clip, clip) with std >= 0.1 (the starter's floor)."""
    return jnp.clip((obs - rms.mean) / jnp.sqrt(jnp.maximum(rms.var, 1e-2)), -clip, clip)


def merge_obs_stats(rms: RunningMeanStd, s1, s2, count) -> RunningMeanStd:
    """Fold sums (sum o, sum o^2, count) into the running statistics (Chan et al.);
    count = 0 leaves them unchanged."""
    c = jnp.maximum(count, 1.0)
    b_mean = s1 / c
    b_var = jnp.maximum(s2 / c - b_mean**2, 0.0)
    total = rms.count + count
    delta = b_mean - rms.mean
    mean = rms.mean + delta * count / total
    m2 = rms.var * rms.count + b_var * count + delta**2 * rms.count * count / total
    return RunningMeanStd(mean, m2 / total, total)


class ObsStatsEnv:
    """Wraps a common.envs.Env: its state also accumulates sum o, sum o^2 and the count of
    the observations acted upon (frozen with the rest of the state once the episode ends)."""

    def __init__(self, env):
        self.env = env

    def reset(self, key, params):
        obs, s = self.env.reset(key, params)
        z = jnp.zeros(obs.shape, jnp.float32)
        return obs, (s, obs, z, z, jnp.zeros((), jnp.float32))

    def step(self, key, state, action, params):
        s, obs, s1, s2, c = state
        obs2, s, reward, terminated, truncated = self.env.step(key, s, action, params)
        return obs2, (s, obs2, s1 + obs, s2 + obs**2, c + 1.0), reward, terminated, truncated


def collect_reference_batch(key, env, size: int) -> jax.Array:
    """[1] Sec. 2.2: the VBN reference batch, observations of a uniformly random policy
    (episodes restarted when done), collected once at the start of training."""
    params = env.default_params()

    def step(carry, k):
        obs, s = carry
        ka, ks, kr = jax.random.split(k, 3)
        if env.num_actions:
            a = jax.random.randint(ka, (), 0, env.num_actions)
        else:
            a = jax.random.uniform(ka, env.action_shape, minval=-1.0, maxval=1.0)
        obs2, s2, _, term, trunc = env.step(ks, s, a, params)
        restart = env.reset(kr, params)
        nxt = jax.tree.map(lambda r, x: jnp.where(term | trunc, r, x), restart, (obs2, s2))
        return nxt, obs

    key, k = jax.random.split(key)
    _, batch = jax.lax.scan(step, env.reset(k, params), jax.random.split(key, size))
    return batch.reshape(size, -1)  # (B, obs_dim)


# --- ES CORE (ask / tell) ---


@struct.dataclass
class ESState:
    theta: jax.Array  # (D,) the mean of the search distribution
    opt_state: optax.OptState
    gen: jax.Array  # int32 generations done


def optimizer(cfg: Config):
    return optax.adam(cfg.lr)


def init_strategy(theta0: jax.Array, cfg: Config) -> ESState:
    return ESState(theta0, optimizer(cfg).init(theta0), jnp.zeros((), jnp.int32))


def member_noise(gen_key, i, dim: int, cfg: Config) -> jax.Array:
    """[1] Alg. 2: eps of member i, rebuilt from the generation key alone. Mirrored: member
    i and i + n/2 share the draw of index i mod n/2 with opposite signs."""
    half = cfg.population // 2
    j = i % half if cfg.mirrored else i
    sign = jnp.where(cfg.mirrored & (i >= half), -1.0, 1.0)
    return sign * jax.random.normal(jax.random.fold_in(gen_key, j), (dim,))


def ask(gen_key, es: ESState, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Population theta + sigma eps_i and the noise eps (n, D)."""
    dim = es.theta.shape[0]
    draw = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(gen_key, j), (dim,)))
    if cfg.mirrored:
        e = draw(jnp.arange(cfg.population // 2))  # (n/2, D)
        eps = jnp.concatenate([e, -e])  # [1] Sec. 2.2 mirrored sampling, (n, D)
    else:
        eps = draw(jnp.arange(cfg.population))
    return es.theta + cfg.sigma * eps, eps


def shape_fitness(f: jax.Array, cfg: Config) -> jax.Array:
    """[1] Sec. 2.2 fitness shaping: centred ranks in [-0.5, 0.5] (largest f -> +0.5)."""
    return blackbox.centered_ranks(f) if cfg.fitness_shaping == "centered_ranks" else f


def es_gradient(eps: jax.Array, weights: jax.Array, sigma: float) -> jax.Array:
    """[1] Alg. 1: g = 1/(n sigma) sum_i w_i eps_i (an estimate of grad E f). Written
    w @ eps, (n,) @ (n, D): as eps.T @ w, XLA chose another layout for an eps rebuilt inside
    the program than for ask's, and `reconstruct_update` lost bit-identity."""
    return weights @ eps / (eps.shape[0] * sigma)  # (D,)


def apply_gradient(es: ESState, g: jax.Array, cfg: Config):
    """Adam step on g + l2 theta (L2 weight decay, [1] Sec. 2.2). Returns (es, grad)."""
    g = g + cfg.l2_coef * es.theta
    upd, opt_state = optimizer(cfg).update(g, es.opt_state, es.theta)
    return ESState(optax.apply_updates(es.theta, upd), opt_state, es.gen + 1), g


def tell(es: ESState, eps: jax.Array, f: jax.Array, cfg: Config):
    """Centralised update: one descent step on E f (f = -return) from the population's
    noise eps (n, D) and fitness f (n,). Returns (es, grad)."""
    return apply_gradient(es, es_gradient(eps, shape_fitness(f, cfg), cfg.sigma), cfg)


def reconstruct_update(es: ESState, gen_key, indices: jax.Array, returns: jax.Array,
                       cfg: Config):
    """[1] Alg. 2 on the master (or on every worker): the generation's update from the
    shared generation key, the member indices and their returns only (in any order). Every
    eps_i is rebuilt from (gen_key, i) (bit-identical to ask's) and put through the same
    vectorised `tell` as `generation`, so any process that knows the key computes the
    generation's update bit for bit. Returns (es, grad)."""
    f = jnp.zeros(cfg.population, returns.dtype).at[indices].set(-returns)
    dim = es.theta.shape[0]
    eps = jax.vmap(lambda i: member_noise(gen_key, i, dim, cfg))(jnp.arange(cfg.population))
    return tell(es, eps, f, cfg)


# --- ROLLOUT ---


@struct.dataclass
class State:
    es: ESState
    obs_rms: RunningMeanStd
    ref_obs: jax.Array  # (vbn_batch, obs_dim) VBN reference batch, raw observations
    env_steps: jax.Array  # float32 real (unmasked) env steps so far
    solved_at: jax.Array  # first generation whose evaluation reached the target (inf: not yet)
    steps_to_target: jax.Array  # env steps spent by then (inf: not yet)
    key: jax.Array


def rollout(theta, key, obs_rms, ref_obs, cfg: Config):
    """One episode of the policy theta: (return, length, (sum o, sum o^2, count))."""
    env = make_env(cfg)
    params = unravel_fn(cfg)[1](theta)
    norm = (lambda o: normalize_obs(obs_rms, o, cfg.obs_clip)) if cfg.obs_norm else (lambda o: o)
    stats = vbn_stats(params, norm(ref_obs)) if cfg.vbn else None

    def act(obs, _key):
        return to_action(policy_apply(params, norm(obs.reshape(-1)), stats), env)

    ret, length, (_, _, s1, s2, c) = blackbox.episode(
        ObsStatsEnv(env), act, key, env.default_params(), cfg.max_steps)
    return ret, length, (s1.reshape(-1), s2.reshape(-1), c)


def evaluate_population(pop, key, state: State, cfg: Config):
    """Returns, lengths and observation sums of the population (n, D), vmapped."""
    n = pop.shape[0]
    keys = jnp.repeat(key[None], n, axis=0) if cfg.crn else jax.random.split(key, n)
    return jax.vmap(lambda th, k: rollout(th, k, state.obs_rms, state.ref_obs, cfg))(pop, keys)


def eval_theta(theta, key, state: State, cfg: Config):
    """Mean return of the unperturbed theta over eval_episodes episodes, and their steps."""
    keys = jax.random.split(key, cfg.eval_episodes)
    rets, lengths, _ = jax.vmap(
        lambda k: rollout(theta, k, state.obs_rms, state.ref_obs, cfg))(keys)
    return rets.mean(), lengths.sum()


# --- TRAIN ---


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    k_theta, k_ref, key = jax.random.split(key, 3)
    obs_dim, act_dim = _dims(env)
    theta0, _ = ravel_pytree(init_policy(k_theta, cfg, obs_dim, act_dim))
    ref_obs = (collect_reference_batch(k_ref, env, cfg.vbn_batch) if cfg.vbn
               else jnp.zeros((1, obs_dim)))
    inf = jnp.asarray(jnp.inf, jnp.float32)
    return State(init_strategy(theta0, cfg), RunningMeanStd.create((obs_dim,)), ref_obs,
                 jnp.zeros((), jnp.float32), inf, inf, key)


def generation(state: State, cfg: Config):
    """One generation; also returns (gen_key, returns) for the seed-reconstruction check
    (`reconstruct_update` from them alone gives this update bit for bit, [1] Alg. 2)."""
    key, k_gen, k_roll, k_eval, k_obs = jax.random.split(state.key, 5)
    pop, eps = ask(k_gen, state.es, cfg)
    returns, lengths, (s1, s2, c) = evaluate_population(pop, k_roll, state, cfg)
    es, g = tell(state.es, eps, -returns, cfg)  # minimise f = -return: one (n,) @ (n, D)
    obs_rms = state.obs_rms
    if cfg.obs_norm:  # [1] starter code: statistics from a random fraction of the rollouts
        m = jax.random.bernoulli(k_obs, cfg.obs_norm_prob, (cfg.population,)).astype(jnp.float32)
        obs_rms = merge_obs_stats(obs_rms, m @ s1, m @ s2, m @ c)
    state = state.replace(es=es, obs_rms=obs_rms, key=key)
    eval_ret, eval_steps = eval_theta(es.theta, k_eval, state, cfg)
    env_steps = state.env_steps + lengths.sum() + eval_steps
    hit = (eval_ret >= cfg.target_return) & jnp.isinf(state.solved_at)
    state = state.replace(
        env_steps=env_steps,
        solved_at=jnp.where(hit, es.gen.astype(jnp.float32), state.solved_at),
        steps_to_target=jnp.where(hit, env_steps, state.steps_to_target))
    metrics = {
        "charts/return": returns.mean(), "charts/return_max": returns.max(),
        "charts/eval_return": eval_ret, "charts/env_steps": env_steps,
        "charts/sigma": jnp.asarray(cfg.sigma), "charts/theta_norm": jnp.linalg.norm(es.theta),
        "losses/grad_norm": jnp.linalg.norm(g),
    }
    return state, metrics, (k_gen, returns)


def update(state: State, cfg: Config):
    state, metrics, _ = generation(state, cfg)
    return state, metrics


def evaluate(state: State, cfg: Config):
    ret, _ = eval_theta(state.es.theta, jax.random.fold_in(state.key, 1), state, cfg)
    return {"eval_return": ret, "generations_to_target": state.solved_at,
            "env_steps_to_target": state.steps_to_target}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["eval_return", "generations_to_target",
                                               "env_steps_to_target", "charts/return",
                                               "charts/env_steps"])


if __name__ == "__main__":
    main()
