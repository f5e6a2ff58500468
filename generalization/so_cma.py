"""SO-CMA: a universal policy pi(a | s, mu) trained under domain randomization, then
transferred by searching its input mu with CMA-ES on the target's returns.

[1] W. Yu, C. K. Liu, G. Turk. "Policy Transfer with Strategy Optimization." ICLR 2019,
    arXiv:1810.05751.
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post).
[3] N. Hansen. "The CMA Evolution Strategy: A Tutorial." arXiv:1604.00772 (the CMA-ES
    of evosax 0.3.2, used here).
[4] The authors' code, VincentYu68/policy_transfer (read in the code index):
    policy_transfer_strategy_optimization/up_optimizer.py (commit dc55c26) and
    test_socma.py (the search), ppo/run_ppo.py, policies/mlp_policy.py and
    examples/socma_hopper_5d_*.sh (the universal policy's training), envs/dart/hopper.py
    and parameter_managers.py (the randomization).

Stage 1, learning a family of policies ([1] Sec. 4.1): the dynamics parameters xi of
every episode are drawn from a box, mu = their normalised value in [0, 1]^d is appended
to the observation, and PPO maximises
    theta* = argmax_theta E_{mu ~ U[0, 1]^d} E_{tau ~ pi_theta(. | ., mu), xi(mu)} [R(tau)]
    xi(mu) = xi_low + mu (xi_high - xi_low)
so that pi_theta(a | s, mu) is a different strategy for every mu (a universal policy, UP).
Stage 2, strategy optimisation in the target ([1] Sec. 4.2, Alg. 1): theta is frozen and
only mu is searched,
    mu* = argmax_mu J(mu),   J(mu) = E_{tau ~ pi_theta(. | ., mu), target} [R(tau)]
with CMA-ES ([3]) on fitness = the mean return of `fitness_episodes` target rollouts of
the deterministic policy (its mean action, as [4]'s `act(False, ...)`), the search kept
in the box [0, 1]^d, and the best candidate seen so far as the solution ([4]'s best_x).
mu* need not be the target's true parameters: the search optimises the task, not an
identification, which is how [1] crosses unmodelled gaps (DART -> MuJoCo, latency).
JAX: one generation's candidates x episodes are one vmapped rollout, the whole search is
a lax.scan over generations inside `evaluate`, the run's `update` is one PPO update of
the UP and of the baseline (the same PPO on the same randomization without the mu input,
[1]'s "DR" robust policy); `evaluate` also scores the UP at the target's true mu ([1]'s
UP-true, an oracle) and at the box centre.

Reproduce (CPU demo, Pendulum-v1, xi = (m, l) multipliers, target (m 1.8, l 1.2)):
    python generalization/so_cma.py --preset quick --num-seeds 2 --plot generalization/so_cma.png
`paper` preset: [4]'s 3 x 64 tanh MLP, 4000-step PPO batches, 10M steps, pycma's default
population 4 + floor(3 ln d) = 6, initial mean 0.5 and step 0.25 in [0, 1]^d (not [4]'s 0.0
and 0.5: Differences), 3 rollouts per fitness and 13 generations (13 x 6 x 3 x 200 = 46,800
target steps, under [4]'s budget of 50,000 samples):
    python generalization/so_cma.py --preset paper
[1]'s results (Figs. 3-6, hopper / walker / half-cheetah / quadruped, DART <-> MuJoCo and
with latency or actuator gaps): SO-CMA matches or beats UP-true and beats the robust DR
policy and UP-OSI on most transfers, within 50,000 target samples. Those simulators are
not available here; Pendulum with unknown (m, l) is the jitted analogue.
Ours (quick preset: Pendulum-v1, box m [0.5, 2] x l [0.5, 1.5], target (m 1.8, l 1.2) with
gravity x 1.3 that no mu models, 400 PPO updates of 32 x 128 steps = 1.6M steps per
policy, then 20 generations x 8 candidates x 3 episodes (a generation's candidates share
their start states), the final CMA-ES mean as the answer; every arm scored on the same 32
target episodes; 2 seeds, a loaded 2-core CPU, 5 s compile (cached) + 221 s): SO-CMA -643
+- 77 (seeds -720, -566), its best candidate seen instead -630 +- 86 (-715, -544), UP at
the true mu (oracle) -677 +- 129 (-806, -548), UP at the box centre -842 +- 92 (-933,
-750), DR policy without mu -824 +- 4 (-820, -828); in distribution the UP scores -252 +-
26 per training episode. The search helps here: SO-CMA beats the box centre by about 200
on both seeds, the candidates' mean fitness rises from about -850 to -600 over the
generations (figure, left), and SO-CMA matches or beats UP-true under the unmodelled
gravity (seed 0: -720 vs -806; seed 1 a tie), [1]'s claim; 2 seeds, so a direction, not a
significant gap. SO-CMA's mu ends at xi (2.0, 1.2) and (1.83, 0.82), not at the true
(1.8, 1.2). Without the gravity gap and with 1-episode fresh fitness (the previous quick
preset) the search did not show: SO-CMA -488 +- 46, UP-true -493 +- 47, the box centre
-543 +- 121 but -422 on seed 1, beating SO-CMA's -442; that run supported only UP >> DR
(-748 +- 72) and SO-CMA ~ UP-true.
Plot: generalization/so_cma.png.

Differences from the paper:
- Tasks: gymnax Pendulum-v1 (or CartPole-v1) with two physical multipliers; the "target"
  is the same simulator at held-out parameters xi_target (sim-to-sim), optionally with
  an unmodelled gravity change `target_gravity` (1.3 in quick, 1.0 in paper), not another
  engine.
- Search: CMA-ES, as in [1]. [4]'s released search script runs Bayesian optimisation:
  test_socma.py builds UPOptimizer without overriding bayesian_opt, which defaults to True
  (up_optimizer.py:7). [4]'s CMA-ES path (bayesian_opt=False) calls pycma's fmin2 from mean
  0.0, step 0.5 with bounds [0, 1] (a smooth boundary transform; an older commit, 360c05e,
  has mean 0.5, step 0.25 in a commented-out call). Here: evosax 0.3.2's CMA_ES (its default
  weights and learning rates, after [3]) from mean 0.5, step 0.25 (the box centre: from the
  corner 0.0 half the first candidates fall outside); candidates are clipped to [0, 1]^d
  before they are evaluated and CMA-ES is told the unclipped ones. A fixed number of
  generations, not a sample budget.
- Fitness noise: the quick preset gives a generation's candidates the same target start
  states (`shared_starts`); [4] draws fresh episodes per candidate (the paper preset).
- Answer: the quick preset takes the final CMA-ES mean (`solution=mean`): with 1-episode
  fitness the best candidate seen is often a lucky episode. [4] and the paper preset take
  the best candidate seen (best_x).
- PPO (common.rl) with rl-zoo's Pendulum-v1 numbers (lr 1e-3, gamma 0.9, GAE 0.95, 10
  epochs, clip 0.2, no entropy; rl-zoo also uses gSDE and 4 x 1024 steps, not here), vf
  coef 0.5 and a 0.5 grad-norm clip. [4] (run_ppo.py:99-100, 117; mlp_policy.py:24-27):
  OpenAI baselines' PPO1 with gamma 0.99, lambda 0.95, lr 3e-4 constant (no annealing), 5
  epochs of minibatch 64, clip 0.2, no entropy, vf coef 1, no grad clip, standardised
  advantages, running observation normalisation clipped to +-5, 3 MPI workers x 4000 =
  12,000 steps per iteration (~833 iterations over 10M steps), mirror-symmetric policies
  for the walkers. The paper preset keeps the Pendulum numbers, no observation
  normalisation, and does 2500 updates of 4000 steps.
- Randomization: mu ~ U[0, 1]^d, noise-free; [4] draws U(-0.05, 1.05)
  (parameter_managers.py resample_parameters) and adds N(0, 0.01) noise to the whole
  observation, mu included (hopper.py _get_obs).
- Baselines: UP-OSI (an online system-identification network feeding mu to the UP) and
  [1]'s history-based "Hist" policy (fed past observations and actions; test_socma.py's
  HIST mode) are not built; the oracle UP-true stands for UP-OSI's upper bound.
- Fitness: the dense return. [4]'s search defaults to `--sparse_rew True`, whose hopper /
  walker pay the episode's dense total at termination (hopper.py:80-84): the same return.
- Metrics: charts/episodic_return is NaN in an update where no training episode ended.
"""

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES
from flax import struct

from common import envs, rl, run
from common.plot import save_png
from common.rl import PPOConfig, TowersActorCritic, make_ppo

# --- CONFIG ---

# xi: multipliers of these gymnax fields (derived fields follow, common.envs.with_physics).
PARAMS = {"CartPole-v1": ("masspole", "length"), "Pendulum-v1": ("m", "l")}
GRAVITY = {"CartPole-v1": "gravity", "Pendulum-v1": "g"}


@dataclass(frozen=True)
class Config:
    """SO-CMA (Yu et al. 2019): a universal policy trained with PPO, mu searched by CMA-ES."""

    env_id: str = "Pendulum-v1"
    """gymnax task: Pendulum-v1 (xi = m, l) or CartPole-v1 (xi = masspole, length)"""
    xi_low: tuple[float, ...] = (0.5, 0.5)
    """lower corner of the randomization box of the multipliers (mu = 0)"""
    xi_high: tuple[float, ...] = (2.0, 1.5)
    """upper corner of the randomization box of the multipliers (mu = 1)"""
    xi_target: tuple[float, ...] = (1.8, 1.2)
    """held-out target multipliers, never shown to the search (the oracle's mu)"""
    target_gravity: float = 1.0
    """unmodelled target difference: gravity multiplier that no mu describes (1 = none)"""
    train_baseline: bool = True
    """also train the DR baseline (same PPO and randomization, no mu input)"""
    ppo_updates: int = 2500
    """PPO updates (of the UP and of the baseline): the run's `update` steps"""
    num_envs: int = 16
    """PPO: parallel envs"""
    num_steps: int = 250
    """PPO: steps per env per rollout (paper preset 16 x 250 = 4000: [4]'s batch per worker)"""
    lr: float = 1e-3
    """PPO: Adam learning rate (rl-zoo Pendulum-v1; [4]: 3e-4, constant)"""
    num_epochs: int = 10
    """PPO: epochs per rollout (rl-zoo Pendulum-v1: 10; [4]: 5 of minibatch 64)"""
    num_minibatches: int = 8
    """PPO: minibatches per epoch"""
    gamma: float = 0.9
    """PPO: discount (rl-zoo Pendulum-v1; [4]: 0.99 on its locomotion tasks)"""
    gae_lambda: float = 0.95
    """PPO: GAE lambda"""
    clip_coef: float = 0.2
    """PPO: ratio clip epsilon"""
    ent_coef: float = 0.0
    """PPO: entropy bonus coefficient"""
    vf_coef: float = 0.5
    """PPO: value loss coefficient"""
    max_grad_norm: float = 0.5
    """PPO: global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64, 64)
    """hidden sizes of the actor and critic MLPs ([4]: 3 x 64)"""
    population_size: int = 6
    """CMA-ES candidates per generation (pycma's default 4 + floor(3 ln d) for d = 2)"""
    generations: int = 13
    """CMA-ES generations (paper preset: 13 x 6 x 3 x 200 steps < [4]'s 50,000 samples)"""
    fitness_episodes: int = 3
    """target rollouts averaged into one candidate's fitness ([4]: eval_num 3)"""
    shared_starts: bool = False
    """a generation's candidates share their target start states ([4]: fresh per candidate)"""
    cma_init_mean: float = 0.5
    """initial CMA-ES mean of every mu_i in [0, 1] (the box centre; [4]'s CMA-ES path: 0.0)"""
    cma_init_std: float = 0.25
    """initial CMA-ES step size sigma_0 ([4]'s CMA-ES path: 0.5)"""
    solution: str = "best"
    """the search's answer: best (best candidate seen, [4]) or mean (final CMA-ES mean)"""
    eval_episodes: int = 16
    """target episodes that score each final solution (oracle, baseline, SO-CMA)"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.ppo_updates

    @property
    def dim(self) -> int:
        return len(PARAMS.get(self.env_id, ()))

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps * (2 if self.train_baseline else 1)

    def validate(self):
        for name, choices in (
            ("env_id", sorted(PARAMS)),
            ("dtype", ("float32", "bfloat16")),
            ("solution", ("best", "mean")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for name in ("xi_low", "xi_high", "xi_target"):
            v = getattr(self, name)
            if len(v) != self.dim or min(v) <= 0:
                raise ValueError(
                    f"{name}={v} must hold {self.dim} values > 0 (one per "
                    f"parameter of {self.env_id}: {PARAMS[self.env_id]})"
                )
        if any(lo >= hi for lo, hi in zip(self.xi_low, self.xi_high, strict=True)):
            raise ValueError(f"xi_low={self.xi_low} must be < xi_high={self.xi_high}")
        if not all(
            lo <= t <= hi
            for lo, t, hi in zip(self.xi_low, self.xi_target, self.xi_high, strict=True)
        ):
            raise ValueError(
                f"xi_target={self.xi_target} must lie in the box "
                f"[{self.xi_low}, {self.xi_high}] (the oracle's mu is in [0, 1])"
            )
        for name in ("generations", "fitness_episodes", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.population_size < 2:
            raise ValueError(f"population_size={self.population_size} must be >= 2")
        for name in ("target_gravity", "cma_init_std", "clip_coef"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.cma_init_mean <= 1.0:
            raise ValueError(f"cma_init_mean={self.cma_init_mean} must be in [0, 1]")
        if min(self.hidden, default=0) < 1:
            raise ValueError(f"hidden={self.hidden} must be non-empty sizes >= 1")
        ppo_config(self).validate()


PRESETS = {
    "quick": dict(
        ppo_updates=400,
        num_envs=32,
        num_steps=128,
        num_epochs=10,
        num_minibatches=4,
        hidden=(64, 64),
        population_size=8,
        generations=20,
        fitness_episodes=3,
        shared_starts=True,
        target_gravity=1.3,
        solution="mean",
        eval_episodes=32,
    ),
    "paper": dict(),
}


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, total_timesteps=cfg.num_envs * cfg.num_steps, anneal_lr=False,
                         clip_vloss=False)


@functools.cache
def base_env(env_id: str) -> envs.GymnaxEnv:
    with jax.ensure_compile_time_eval():
        return envs.GymnaxEnv(env_id)


def to_xi(cfg: Config, mu):
    """xi(mu) = xi_low + mu (xi_high - xi_low): [0, 1]^d -> the box of multipliers."""
    lo, hi = np.asarray(cfg.xi_low, np.float32), np.asarray(cfg.xi_high, np.float32)
    return lo + mu * (hi - lo)


def to_mu(cfg: Config, xi):
    lo, hi = np.asarray(cfg.xi_low, np.float32), np.asarray(cfg.xi_high, np.float32)
    return (np.asarray(xi, np.float32) - lo) / (hi - lo)


def physics(cfg: Config, xi, gravity=1.0) -> Any:
    """gymnax params with field_i = nominal_i x xi_i (and gravity x `gravity`)."""
    base = base_env(cfg.env_id).default_params()
    values = {f: getattr(base, f) * xi[i] for i, f in enumerate(PARAMS[cfg.env_id])}
    g = GRAVITY[cfg.env_id]
    return envs.with_physics(base, **values, **{g: getattr(base, g) * gravity})


class UPEnv(envs.Env):
    """The gymnax env at physics xi(mu), mu the episode's params; observation [s, mu] (the
    universal policy's input, [1] Sec. 4.1) or s alone (the DR baseline)."""

    def __init__(self, cfg: Config, with_mu: bool):
        self.cfg, self.with_mu, self.inner = cfg, with_mu, base_env(cfg.env_id)
        self.num_actions, self.action_shape = self.inner.num_actions, self.inner.action_shape
        d = cfg.dim if with_mu else 0
        self.observation_shape = (self.inner.observation_shape[0] + d,)

    def default_params(self):
        return jnp.full((self.cfg.dim,), 0.5)

    def _obs(self, obs, mu):
        return jnp.concatenate([obs, mu.astype(obs.dtype)]) if self.with_mu else obs

    def reset(self, key, mu):
        obs, s = self.inner.reset(key, physics(self.cfg, to_xi(self.cfg, mu)))
        return self._obs(obs, mu), s

    def step(self, key, state, action, mu):
        obs, s, r, term, trunc = self.inner.step(
            key, state, action, physics(self.cfg, to_xi(self.cfg, mu))
        )
        return self._obs(obs, mu), s, r, term, trunc


def train_env(cfg: Config, with_mu: bool) -> envs.VecEnv:
    """Domain randomization: every new episode (auto-reset included) draws mu ~ U[0, 1]^d."""
    return envs.VecEnv(
        UPEnv(cfg, with_mu), cfg.num_envs, sampler=lambda k: jax.random.uniform(k, (cfg.dim,))
    )


# --- NETWORKS ---


ActorCritic = TowersActorCritic  # separate tanh towers with a dtype (common/rl)


def network(cfg: Config) -> ActorCritic:
    env = base_env(cfg.env_id)
    continuous = env.num_actions is None
    return ActorCritic(
        env.action_shape[0] if continuous else env.num_actions,
        continuous,
        cfg.hidden,
        jnp.dtype(cfg.dtype),
    )


def policy_act(params, cfg: Config, with_mu: bool):
    """act(obs, mu): the deterministic action (the mode, [4]'s stochastic=False) of the UP
    on [s, mu], or of the baseline on s (mu ignored)."""
    net = network(cfg)
    return lambda obs, mu: net.apply(params, jnp.concatenate([obs, mu]) if with_mu else obs)[
        0
    ].mode()


# --- TRAIN (stage 1: the universal policy and the DR baseline) ---


@struct.dataclass
class State:
    up: Any  # common.rl.PPOState of pi(a | s, mu)
    dr: Any  # common.rl.PPOState of the baseline pi(a | s) (None without it)
    key: jax.Array


def learners(cfg: Config):
    """(init, update) of PPO for the UP and for the DR baseline."""
    return [
        make_ppo(train_env(cfg, with_mu), ppo_config(cfg), network(cfg))
        for with_mu in (True, False)
    ]


def init(key, cfg: Config) -> State:
    k_up, k_dr, key = jax.random.split(key, 3)
    (up_init, _), (dr_init, _) = learners(cfg)
    return State(up_init(k_up), dr_init(k_dr) if cfg.train_baseline else None, key)


def update(state: State, cfg: Config):
    """One PPO update of the UP (and of the baseline), both under mu ~ U[0, 1]^d."""
    (_, up_update), (_, dr_update) = learners(cfg)
    up, metrics = up_update(state.up)
    dr = state.dr
    if cfg.train_baseline:
        dr, m_dr = dr_update(state.dr)
        metrics["charts/baseline_episodic_return"] = m_dr["charts/episodic_return"]
    return State(up, dr, state.key), metrics


# --- STRATEGY OPTIMISATION (stage 2) ---


def target_return(act, cfg: Config, mu, key):
    """One target episode (xi_target, target_gravity) of act(obs, mu): the return."""
    env = base_env(cfg.env_id)
    params = physics(cfg, np.asarray(cfg.xi_target, np.float32), cfg.target_gravity)
    k_reset, k_steps = jax.random.split(key)
    obs, s = env.reset(k_reset, params)
    horizon = int(env.default_params().max_steps_in_episode)

    def step(carry, k):
        s, obs, alive, ret = carry
        obs, s, r, term, trunc = env.step(k, s, act(obs, mu), params)
        return (s, obs, alive & ~(term | trunc), ret + r * alive), None

    init_carry = (s, obs, jnp.array(True), jnp.array(0.0))
    (_, _, _, ret), _ = jax.lax.scan(step, init_carry, jax.random.split(k_steps, horizon))
    return ret


def fitness(act, cfg: Config, mus, key, episodes: int, shared: bool = False):
    """J(mu) for candidates mus [P, d]: the mean return of `episodes` target rollouts each,
    all P x episodes rollouts in one vmap; fresh episodes per candidate ([4]), or with
    `shared` the same initial states for every candidate (to compare final answers). [P]"""
    if shared:
        keys = jax.random.split(key, episodes)[None].repeat(mus.shape[0], 0)
    else:
        keys = jax.random.split(key, (mus.shape[0], episodes))
    return jax.vmap(lambda m, ks: jax.vmap(lambda k: target_return(act, cfg, m, k))(ks).mean())(
        mus, keys
    )


def strategy_optimization(act, cfg: Config, key, sign: float = 1.0):
    """[1] Alg. 1, stage 2: CMA-ES over mu in [0, 1]^d with the policy frozen, maximising
    sign x J(mu) (sign -1 = the broken variant that minimises the return). One lax.scan
    over generations. Returns per-generation arrays: the candidates' mean fitness, the
    best-so-far mu and its fitness, and the CMA-ES mean."""
    es = CMA_ES(population_size=cfg.population_size, solution=jnp.zeros(cfg.dim))
    es_params = es.default_params.replace(std_init=cfg.cma_init_std)
    k_init, key = jax.random.split(key)
    es_state = es.init(k_init, jnp.full((cfg.dim,), cfg.cma_init_mean), es_params)

    def generation(carry, k):
        es_state, best_f, best_mu = carry
        k_ask, k_fit, k_tell = jax.random.split(k, 3)
        x, es_state = es.ask(k_ask, es_state, es_params)  # [3] Eq. 38-40: x ~ m + sigma N(0, C)
        mus = jnp.clip(x, 0.0, 1.0)  # the box [0, 1]^d
        ret = fitness(act, cfg, mus, k_fit, cfg.fitness_episodes, cfg.shared_starts)  # [P]
        f = sign * ret
        es_state, _ = es.tell(k_tell, x, -f, es_state, es_params)  # evosax minimises
        i = jnp.argmax(f)
        better = f[i] > best_f
        best_f = jnp.where(better, f[i], best_f)
        best_mu = jnp.where(better, mus[i], best_mu)
        out = {
            "fitness_mean": ret.mean(),
            "best_fitness": sign * best_f,
            "best_mu": best_mu,
            "cma_mean": jnp.clip(es_state.mean, 0.0, 1.0),
            "cma_std": es_state.std,
        }
        return (es_state, best_f, best_mu), out

    carry = (es_state, jnp.array(-jnp.inf), jnp.full((cfg.dim,), cfg.cma_init_mean))
    _, hist = jax.lax.scan(generation, carry, jax.random.split(key, cfg.generations))
    return hist


def transfer(up_act, dr_act, key, cfg: Config, sign: float = 1.0) -> dict:
    """Stage 2 in the target and the arms it is compared with ([1] Sec. 5): the search on
    up_act, then every final answer scored on the same `eval_episodes` fresh target
    episodes: SO-CMA's answer (`solution`; the best candidate seen and the final CMA-ES
    mean are both scored), the UP at the true mu (oracle, UP-true), the UP at the box
    centre, and dr_act (the DR baseline; None to skip). `sign` as in strategy_optimization."""
    k_so, k_eval = jax.random.split(key)
    hist = strategy_optimization(up_act, cfg, k_so, sign)
    mu_true = jnp.asarray(to_mu(cfg, cfg.xi_target))
    mu_best, mu_mean = hist["best_mu"][-1], hist["cma_mean"][-1]
    mus = jnp.stack([mu_best, mu_mean, mu_true, jnp.full((cfg.dim,), 0.5)])
    score = fitness(up_act, cfg, mus, k_eval, cfg.eval_episodes, shared=True)  # same episodes
    answer = 0 if cfg.solution == "best" else 1
    out = {
        "final/so_cma_return": score[answer],
        "final/so_cma_best_return": score[0],
        "final/so_cma_mean_return": score[1],
        "final/oracle_return": score[2],
        "final/center_return": score[3],
        "final/so_cma_mu": mus[answer],
        "final/mu_true": mu_true,
        "curve/fitness_mean": hist["fitness_mean"],
        "curve/best_fitness": hist["best_fitness"],
        "curve/best_mu": hist["best_mu"],
        "curve/cma_mean": hist["cma_mean"],
    }
    if dr_act is not None:
        out["final/baseline_return"] = fitness(
            dr_act, cfg, mus[:1], k_eval, cfg.eval_episodes, shared=True
        )[0]
    return out


def evaluate(state: State, cfg: Config):
    """`transfer` of the trained UP (and DR baseline) in the target."""
    up = policy_act(state.up.params, cfg, True)
    dr = policy_act(state.dr.params, cfg, False) if cfg.train_baseline else None
    return transfer(up, dr, jax.random.fold_in(state.key, 1), cfg)


# --- PLOT ---


def plot(final: dict, cfg: Config, out: str):
    """(a) CMA-ES fitness per generation (candidates' mean and best so far, mean over seeds)
    with the oracle, box-centre, DR-baseline and SO-CMA returns as lines; (b) the solution's
    mu per generation (every seed; [S, G, d]) against the target's true mu."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    g = np.arange(1, cfg.generations + 1)
    curves = [("curve/fitness_mean", "candidates' mean")]
    if cfg.solution == "best":  # with 1-episode fitness a lucky episode rules it: not shown
        curves.append(("curve/best_fitness", "best so far"))
    for k, label in curves:
        y = np.asarray(final[k])
        ax[0].errorbar(g, y.mean(0), yerr=y.std(0), marker="o", ms=3, capsize=2, label=label)
    lines = [
        ("final/oracle_return", "UP at true mu (oracle)", "green"),
        ("final/baseline_return", "DR policy (no mu)", "tab:red"),
        ("final/center_return", "UP at box centre", "tab:gray"),
        ("final/so_cma_return", "SO-CMA final mu", "tab:purple"),
    ]
    for k, label, c in lines:
        if k in final:
            ax[0].axhline(
                np.mean(final[k]), ls="--", color=c, label=f"{label}: {np.mean(final[k]):.0f}"
            )
    ax[0].set(
        xlabel="CMA-ES generation",
        ylabel=f"return in the target {cfg.env_id}",
        title=f"strategy optimisation ({cfg.population_size} candidates x "
        f"{cfg.fitness_episodes} episode(s))",
    )
    names = PARAMS[cfg.env_id]
    mu = np.asarray(final["curve/best_mu" if cfg.solution == "best" else "curve/cma_mean"])
    mu = np.concatenate([np.full_like(mu[:, :1], cfg.cma_init_mean), mu], 1)  # from m_0
    for s in range(mu.shape[0]):
        ax[1].plot(*to_xi(cfg, mu[s]).T, ".-", alpha=0.7, label=f"seed {s}")
        ax[1].plot(*to_xi(cfg, mu[s, -1]), "o", color="black")
    ax[1].plot(*cfg.xi_target, "*", color="red", mec="black", ms=15, label="true target xi")
    ax[1].set(
        xlim=(cfg.xi_low[0], cfg.xi_high[0]),
        ylim=(cfg.xi_low[1], cfg.xi_high[1]),
        xlabel=f"{names[0]} (x nominal)",
        ylabel=f"{names[1]} (x nominal)",
        title=f"SO-CMA's mu per generation ({cfg.solution}), as xi(mu)",
    )
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = [
    "final/so_cma_return",
    "final/so_cma_best_return",
    "final/oracle_return",
    "final/baseline_return",
    "final/center_return",
    "charts/episodic_return",
]


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the search of every seed)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=SUMMARY,
    )
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.final, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
