"""Domain randomization as bilevel optimisation: the randomization ranges phi picked by the
cross-entropy method on the return of the policy they train, in a held-out target.

[1] Q. Vuong, S. Vikram, H. Su, S. Gao, H. I. Christensen. "How to pick the domain
    randomization parameters for sim-to-real transfer of reinforcement learning policies?"
    arXiv:1903.11774 (2019).
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post),
    section "DR as Optimization".
[3] R. Rubinstein. "The cross-entropy method for combinatorial and continuous optimization."
    Methodology and Computing in Applied Probability, 1999.
[4] J. Schulman et al. "Proximal Policy Optimization Algorithms." arXiv:1707.06347.

The bilevel problem ([2] Eq. "DR as Optimization", [1] Sec. III [M]):
    phi*      = argmin_phi L(pi_{theta*(phi)}; e_real)                         (outer)
    theta*(phi) = argmin_theta E_{xi ~ P_phi(xi)} [ L(pi_theta; e_xi) ]        (inner)
with L = minus the return. Here xi are multipliers of gymnax physics fields (`params`),
P_phi is uniform on [c_i - w_i, c_i + w_i] per field (phi = (c, w): centres and half-widths,
clipped to [xi_min, xi_max]) and e_real is the same simulator at a hidden xi_real
(sim-to-sim). The outer optimiser is the cross-entropy method ([1] [M], [3]): one outer
iteration (one `update`)
    1. phi_j ~ N(m, diag s^2), j = 1..P, |w| taken                            (CEM sample)
    2. theta*(phi_j): PPO [4] trained from scratch under P_phi_j, all P trainings one
       `jax.vmap` of the whole inner training (the inner `lax.scan` of PPO updates)
    3. F_j = mean return of pi_{theta*(phi_j)} in e_real (`eval_episodes` episodes)
    4. elites E = the ceil(elite_frac P) phi_j of highest F_j;
       m <- mean_{E} phi_j,  s <- std_{E} phi_j + min_std                    (CEM refit)
    5. the best phi seen so far (and its F) is kept: the answer of the outer problem. F is
       the max over P x iterations of noisy scores, selected on the episodes it is read on
       (winner's curse), so the best phi's policy is also scored on `eval_episodes` fresh
       target episodes (charts/best_return_fresh; same policy, other initial states).
Beside the population, the same program trains the nominal simulator (phi = (1, 0): no
randomization, the usual sim-only policy) with the same keys (`baseline`), logged as
charts/nominal_return: the bilevel answer is compared with it in every iteration.

Reproduce (CPU demo, CartPole-v1 with a short pole, xi = pole length x 0.2 in "real"):
    python generalization/dr_bilevel.py --preset quick --num-seeds 2 \
        --plot generalization/dr_bilevel.png
`paper` preset: the defaults (population 16, 10 outer iterations, 64 x 128-step PPO rollouts
x 100 updates per inner training) on CartPole-v1 with two randomized fields:
    python generalization/dr_bilevel.py --preset paper
Ours (quick preset: CartPole-v1, xi = pole length, xi_real = 0.2 x nominal, phi_0 ~
N((1, 0.25), diag(0.5, 0.25)^2), 8 phi + the nominal sim per iteration, 5 iterations, each
inner training 60 PPO updates of 16 x 64 steps = 61k steps, so 2.8M env steps per seed;
2 seeds in one program, a loaded 2-core CPU, 31-83 s wall, compile included): in the last
iteration the population's mean target return is 494 / 276 (seeds 0 / 1; elites 500 / 372)
vs 201 / 222 for the nominal-sim policy trained with the same keys (127-222 over the 5
iterations); population mean per iteration (seed mean) 258, 322, 412, 394, 385. The best
phi's policy scores 500 / 500 (the maximum, reached in the first iteration), also on 8
fresh target episodes (500 / 500; in the tiny test config the fresh score is lower,
440-444 vs 479-500: the max over P x iterations is optimistic; the training seed is not
re-drawn). The CEM mean's centre 1.0 -> 0.28, 0.11, 0.11, 0.06, 0.02 (seed 0) and 0.56,
0.43, 0.54, 0.50, 0.49 (seed 1), its box c -/+ w holds xi_real in 8 of the 10 (seed,
iteration) pairs. The best phi's box is [0.17, 0.49] for
seed 1 (holds xi_real) and [0.11, 0.13] for seed 0 (just below it: a still shorter pole
trains a policy that also balances at 0.2; the target return is flat at its maximum 500
over many boxes, and the first phi to reach it is kept). Plot: generalization/dr_bilevel.png.
[2] quotes no numbers for [1]; [1]'s own tasks and results were not at hand (see below).

Differences from the paper:
- The paper's text was not available offline: its outer optimiser (CEM over the parameters
  of the randomization distribution, each sample scored by the return of a policy trained
  under it, in the target) is taken from the catalogue's recollection [M]; its tasks,
  population size, elite fraction and inner-training budget are not known here, so the
  defaults are ours [M]. The post states only the bilevel problem.
- "Real" is the same gymnax simulator at hidden multipliers xi_real (sim-to-sim).
- Inner training: common.rl's PPO (PureJaxRL CartPole settings, lr annealed) trained from
  scratch for every phi, with common random numbers: in one outer iteration every phi_j
  and the nominal baseline use the same PPO and evaluation keys, so their F differ by phi
  alone. Target evaluation uses the policy's mode (deterministic).
- P_phi: a uniform box per field in multiplier space (not a Gaussian, not log-uniform);
  w is taken as |w| after sampling and the CEM refits on |w| (a folded normal, biased
  upward), and the box is clipped to [xi_min, xi_max]: a box with c + w < xi_min collapses
  to the single point xi_min (no randomization). min_std is additive noise on the CEM std
  against early collapse (a common CEM habit, not from [1]).
"""

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import envs, rl, run
from common.plot import save_png
from common.rl import PPOConfig, TowersActorCritic, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """DR as bilevel optimisation (Vuong et al. 2019): CEM over the randomization ranges phi,
    each phi scored by the target return of a PPO policy trained under it."""

    env_id: str = "CartPole-v1"
    """gymnax task: CartPole-v1, Acrobot-v1 or Pendulum-v1"""
    params: tuple[str, ...] = ("length", "masspole")
    """gymnax physics fields randomized (xi_i multiplies the nominal value of each)"""
    xi_real: tuple[float, ...] = (0.2, 1.0)
    """hidden "real" multipliers of `params`, never shown to the inner training"""
    init_mean: tuple[float, ...] = (1.0, 1.0, 0.25, 0.25)
    """m_0 of the CEM over phi = (centres..., half-widths...), one of each per field"""
    init_std: tuple[float, ...] = (0.5, 0.5, 0.25, 0.25)
    """s_0 of the CEM over phi (diagonal), same layout as init_mean"""
    xi_min: float = 0.05
    """every sampled multiplier is clipped to >= xi_min (keeps the physics valid)"""
    xi_max: float = 5.0
    """every sampled multiplier is clipped to <= xi_max"""
    population: int = 16
    """P: phi samples per outer iteration, trained in one vmap ([M])"""
    elite_frac: float = 0.25
    """fraction of the population kept as elites for the CEM refit ([M])"""
    min_std: float = 0.02
    """added to the refit CEM std against premature collapse"""
    num_iterations: int = 10
    """outer CEM iterations (one `update` each)"""
    baseline: bool = True
    """also train the nominal simulator (no randomization) with the same keys each iteration"""
    eval_episodes: int = 16
    """target episodes scoring each trained policy (F_j)"""
    ppo_updates: int = 100
    """PPO updates of each inner training (from scratch)"""
    num_envs: int = 64
    """PPO: parallel sim environments"""
    num_steps: int = 128
    """PPO: steps per env per rollout"""
    lr: float = 2.5e-4
    """PPO: Adam learning rate (annealed linearly to 0 over the inner training)"""
    num_epochs: int = 4
    """PPO: epochs per rollout"""
    num_minibatches: int = 4
    """PPO: minibatches per epoch"""
    gamma: float = 0.99
    """PPO: discount"""
    gae_lambda: float = 0.95
    """PPO: GAE lambda"""
    clip_coef: float = 0.2
    """PPO: ratio clip epsilon"""
    ent_coef: float = 0.01
    """PPO: entropy bonus coefficient"""
    vf_coef: float = 0.5
    """PPO: value loss coefficient"""
    max_grad_norm: float = 0.5
    """PPO: global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the actor and critic MLPs"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        return (self.population + self.baseline) * self.ppo_updates * self.num_envs * self.num_steps

    @property
    def dim(self) -> int:
        return len(self.params)

    @property
    def num_elites(self) -> int:
        return max(1, math.ceil(self.elite_frac * self.population))

    def validate(self):
        for name, choices in (("env_id", ENVS), ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        fields = base_env(self.env_id).default_params()
        bad = [p for p in self.params if not hasattr(fields, p)]
        if not self.params or bad:
            raise ValueError(
                f"params={self.params} must name fields of {self.env_id}'s "
                f"gymnax params, e.g. {ENVS[self.env_id]}"
            )
        if not 0 < self.xi_min < self.xi_max:
            raise ValueError(
                f"xi_min={self.xi_min}, xi_max={self.xi_max} must satisfy 0 < xi_min < xi_max"
            )
        if len(self.xi_real) != self.dim or not all(
            self.xi_min <= x <= self.xi_max for x in self.xi_real
        ):
            raise ValueError(
                f"xi_real={self.xi_real} must hold {self.dim} values (one per "
                f"field of params) in [xi_min, xi_max]"
            )
        for name in ("init_mean", "init_std"):
            if len(getattr(self, name)) != 2 * self.dim:
                raise ValueError(
                    f"{name}={getattr(self, name)} must hold 2 x {self.dim} "
                    "values: the centres, then the half-widths"
                )
        if min(self.init_std) < 0 or self.min_std < 0:
            raise ValueError(f"init_std={self.init_std} and min_std={self.min_std} must be >= 0")
        if not 0 < self.elite_frac <= 1:
            raise ValueError(f"elite_frac={self.elite_frac} must be in (0, 1]")
        if min(self.hidden, default=0) < 1:
            raise ValueError(f"hidden={self.hidden} must be non-empty sizes >= 1")
        ppo_config(self).validate()


ENVS = {
    "CartPole-v1": ("length", "masspole", "masscart", "force_mag", "gravity"),
    "Acrobot-v1": ("link_length_1", "link_mass_1", "link_mass_2"),
    "Pendulum-v1": ("m", "l", "g", "max_torque"),
}
"""The tasks and examples of fields worth randomizing (any float field of the params works)."""

PRESETS = {
    # CPU demo: 1 field (pole length), 8 phi x 5 iterations, 60 PPO updates of 16 x 64 steps.
    "quick": dict(
        params=("length",),
        xi_real=(0.2,),
        init_mean=(1.0, 0.25),
        init_std=(0.5, 0.25),
        population=8,
        num_iterations=5,
        ppo_updates=60,
        num_envs=16,
        num_steps=64,
        lr=2.5e-3,
        hidden=(32, 32),
        eval_episodes=8,
    ),
    # Not [1]'s setting (its tasks and budgets were not at hand): our CartPole, 2 fields.
    "paper": dict(),
}


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, total_timesteps=cfg.ppo_updates * cfg.num_envs * cfg.num_steps)


@functools.cache
def base_env(env_id: str) -> envs.GymnaxEnv:
    with jax.ensure_compile_time_eval():
        return envs.GymnaxEnv(env_id)


def physics(cfg: Config, xi) -> Any:
    """gymnax params with each field of cfg.params = nominal x xi_i (derived fields follow)."""
    base = base_env(cfg.env_id).default_params()
    return envs.with_physics(
        base, **{f: getattr(base, f) * xi[i] for i, f in enumerate(cfg.params)}
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


# --- RANDOMIZATION P_phi ---


def box(phi, cfg: Config):
    """phi = (c, w) [2d] -> the box [lo, hi] of P_phi, clipped to [xi_min, xi_max]. [d], [d]"""
    c, w = phi[: cfg.dim], jnp.abs(phi[cfg.dim :])
    return (jnp.clip(c - w, cfg.xi_min, cfg.xi_max), jnp.clip(c + w, cfg.xi_min, cfg.xi_max))


def sample_xi(key, phi, cfg: Config):
    """xi ~ P_phi = U[c - w, c + w] per field (clipped). [d]"""
    lo, hi = box(phi, cfg)
    return lo + jax.random.uniform(key, (cfg.dim,)) * (hi - lo)


def covers(phi, xi, cfg: Config):
    """Whether the box of P_phi holds xi in every field."""
    lo, hi = box(phi, cfg)
    return jnp.all((lo <= xi) & (xi <= hi))


# --- INNER LEVEL: theta*(phi) and its target return ---


def episode_return(params, cfg: Config, xi, key):
    """Return of one episode of the policy's mode at multipliers xi (to termination)."""
    env, net = base_env(cfg.env_id), network(cfg)
    phys = physics(cfg, xi)
    obs, s = env.reset(key, phys)

    def step(carry, k):
        s, obs, alive, ret = carry
        action = net.apply(params, obs)[0].mode()
        obs, s, r, term, trunc = env.step(k, s, action, phys)
        return (s, obs, alive & ~(term | trunc), ret + r * alive), None

    horizon = int(env.default_params().max_steps_in_episode)
    (_, _, _, ret), _ = jax.lax.scan(
        step, (s, obs, jnp.array(True), jnp.array(0.0)), jax.random.split(key, horizon)
    )
    return ret


def train_policy(phi, key, cfg: Config):
    """theta*(phi) ([2] inner problem): PPO from scratch, every episode's xi ~ P_phi.
    Returns (policy params, the last update's mean training return)."""
    env = envs.VecEnv(
        base_env(cfg.env_id), cfg.num_envs, sampler=lambda k: physics(cfg, sample_xi(k, phi, cfg))
    )
    ppo_init, ppo_update = make_ppo(env, ppo_config(cfg), network(cfg))
    state, metrics = jax.lax.scan(lambda s, _: ppo_update(s), ppo_init(key), None, cfg.ppo_updates)
    return state.params, metrics["charts/episodic_return"][-1]


def target_return(params, cfg: Config, key):
    """F = mean return in e_real (xi_real) over eval_episodes: the outer objective -L."""
    xi_real = jnp.asarray(cfg.xi_real, jnp.float32)
    keys = jax.random.split(key, cfg.eval_episodes)
    return jax.vmap(lambda k: episode_return(params, cfg, xi_real, k))(keys).mean()


def inner(phi, key, cfg: Config):
    """phi -> (F(phi), F on fresh target episodes, training return): one whole inner
    training, its target score (selection) and a second score on other episodes (report)."""
    k_train, k_eval = jax.random.split(key)
    k_fresh = jax.random.fold_in(key, 2)  # = split(key, 3)[2]; fold_in(key, 1) IS k_eval
    params, train_ret = train_policy(phi, k_train, cfg)
    return target_return(params, cfg, k_eval), target_return(params, cfg, k_fresh), train_ret


# --- OUTER LEVEL: the cross-entropy method over phi ---


@struct.dataclass
class State:
    mean: jax.Array  # [2d] m: CEM mean over phi = (centres, half-widths)
    std: jax.Array  # [2d] s: CEM std (diagonal)
    best_phi: jax.Array  # [2d] the best phi seen so far
    best_return: jax.Array  # its target return F (the selection score)
    best_fresh: jax.Array  # its policy's return on fresh target episodes
    key: jax.Array


def cem_sample(key, mean, std, population: int):
    """Step 1: phi_j = m + s * eps_j, eps_j ~ N(0, I). [P, 2d]"""
    return mean + std * jax.random.normal(key, (population, mean.shape[0]))


def cem_refit(phis, fitness, num_elites: int, min_std: float):
    """Step 4 ([3]): the elites (highest F) refit m and s by maximum likelihood (the mean and
    the biased std of the elites), plus min_std. Returns (m', s', elite indices)."""
    _, idx = jax.lax.top_k(fitness, num_elites)
    elites = phis[idx]  # [K, 2d]
    return elites.mean(0), elites.std(0) + min_std, idx


def init(key, cfg: Config) -> State:
    mean = jnp.asarray(cfg.init_mean, jnp.float32)
    std = jnp.asarray(cfg.init_std, jnp.float32)
    return State(mean, std, mean, jnp.array(-jnp.inf), jnp.array(jnp.nan), key)


def nominal_phi(cfg: Config):
    """phi of the nominal simulator: centres 1, widths 0 (no randomization)."""
    return jnp.concatenate([jnp.ones(cfg.dim), jnp.zeros(cfg.dim)])


def update(state: State, cfg: Config):
    """One outer iteration: P inner trainings (one vmap), their target returns, the CEM refit."""
    key, k_sample, k_inner = jax.random.split(state.key, 3)
    phis = cem_sample(k_sample, state.mean, state.std, cfg.population)
    phis = phis.at[:, cfg.dim :].set(jnp.abs(phis[:, cfg.dim :]))  # w = |w|
    if cfg.baseline:  # the nominal sim, trained in the same vmap with the same keys
        phis_all = jnp.concatenate([phis, nominal_phi(cfg)[None]])
    else:
        phis_all = phis
    fit_all, fresh_all, train_all = jax.vmap(inner, (0, None, None))(phis_all, k_inner, cfg)
    fitness = fit_all[: cfg.population]
    mean, std, elite = cem_refit(phis, fitness, cfg.num_elites, cfg.min_std)
    j = jnp.argmax(fitness)
    better = fitness[j] > state.best_return
    best_phi = jnp.where(better, phis[j], state.best_phi)
    best_return = jnp.where(better, fitness[j], state.best_return)
    best_fresh = jnp.where(better, fresh_all[j], state.best_fresh)
    xi_real = jnp.asarray(cfg.xi_real, jnp.float32)
    metrics = {
        "charts/target_return_mean": fitness.mean(),
        "charts/target_return_max": fitness[j],
        "charts/elite_return": fitness[elite].mean(),
        "charts/best_return": best_return,
        "charts/best_return_fresh": best_fresh,
        "charts/best_covers": covers(best_phi, xi_real, cfg).astype(jnp.float32),
        "charts/mean_covers": covers(mean, xi_real, cfg).astype(jnp.float32),
        "charts/train_return": jnp.nanmean(train_all[: cfg.population]),
        "charts/nominal_return": fit_all[-1] if cfg.baseline else jnp.array(jnp.nan),
    }
    for i, name in enumerate(cfg.params):
        metrics[f"charts/centre_{name}"] = mean[i]
        metrics[f"charts/width_{name}"] = jnp.abs(mean[cfg.dim + i])
        metrics[f"charts/best_lo_{name}"], metrics[f"charts/best_hi_{name}"] = (
            b[i] for b in box(best_phi, cfg)
        )
    return State(mean, std, best_phi, best_return, best_fresh, key), metrics


# --- PLOT ---


def plot(history: dict, cfg: Config, out: str):
    """(a) the CEM mean's box c -/+ w of the first field per iteration (mean over seeds), the
    best phi's box and xi_real; (b) target return per iteration: population mean, best so far,
    and the nominal-sim policy (mean over seeds +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = cfg.params[0]
    it = np.arange(1, cfg.num_iterations + 1)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    c = np.asarray(history[f"charts/centre_{name}"]).mean(0)
    w = np.asarray(history[f"charts/width_{name}"]).mean(0)
    lo, hi = np.clip(c - w, cfg.xi_min, cfg.xi_max), np.clip(c + w, cfg.xi_min, cfg.xi_max)
    ax[0].fill_between(it, lo, hi, alpha=0.3, label="CEM mean's box c -/+ w (seed mean)")
    for s in range(np.asarray(history[f"charts/best_lo_{name}"]).shape[0]):
        style = dict(color="k", ls=("--", ":", "-.")[s % 3], lw=1)
        ax[0].plot(it, history[f"charts/best_lo_{name}"][s], **style, label=f"best phi, seed {s}")
        ax[0].plot(it, history[f"charts/best_hi_{name}"][s], **style)
    ax[0].axhline(cfg.xi_real[0], color="red", label="xi_real (hidden)")
    ax[0].axhline(1.0, color="gray", ls=":", label="nominal")
    ax[0].set(xlabel="outer iteration", ylabel=f"{name} (x nominal)", title="P_phi found by CEM")
    for k, label, ls in (
        ("charts/target_return_mean", "population mean", "-"),
        ("charts/best_return", "best phi so far", "-"),
        ("charts/best_return_fresh", "best phi so far, fresh episodes", "--"),
        ("charts/nominal_return", "nominal sim (no DR)", "-"),
    ):
        y = np.asarray(history[k])
        ax[1].errorbar(
            it,
            y.mean(0),
            yerr=y.std(0),
            marker="o" if ls == "-" else "x",
            ls=ls,
            capsize=3,
            label=f"{label} ({y.shape[0]} seeds)",
        )
    ax[1].set(
        xlabel="outer iteration",
        ylabel=f"return in 'real' {cfg.env_id}",
        title="target return of the trained policies",
    )
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = [
    "charts/best_return",
    "charts/best_return_fresh",
    "charts/nominal_return",
    "charts/target_return_mean",
    "charts/best_covers",
]


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the plot of this run's history)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config, init, update, presets=PRESETS, argv=argv, doc=__doc__, summary_keys=SUMMARY
    )
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.history, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
