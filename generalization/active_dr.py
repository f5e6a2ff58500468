"""Active Domain Randomization: SVPG particles propose the envs a discriminator finds informative.

[1] B. Mehta, M. Diaz, F. Golemo, C. J. Pal, L. Paull. "Active Domain Randomization."
    CoRL 2019, arXiv:1904.04762. Released code: github.com/montrealrobotics/active-domainrand
    (commit e6dc550; `common/svpg/svpg.py`, `common/discriminator/discriminator_rewarder.py`,
    `common/agents/svpg_simulator_agent.py`, `experiments/domainrand/args.py`).
[2] Y. Liu, P. Ramachandran, Q. Liu, J. Peng. "Stein Variational Policy Gradient." UAI 2017,
    arXiv:1704.02399 (and SVGD, Liu & Wang 2016, arXiv:1608.04471).
[3] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post).
[4] J. Schulman et al. "Proximal Policy Optimization Algorithms." arXiv:1707.06347.

The d randomized physics parameters are normalised to x in [0, 1]^d; x maps to the
multiplier m = m_min + (m_max - m_min) x of each nominal value ([1] code: Dimension._rescale).
Each of n SVPG particles mu_i is a Gaussian policy over moves in that box: from its last x
it proposes L instances, x_{t+1} = clip(x_t + 0.05 a_t, 0, 1) (a clipped to [-1, 1] for
d = 1, scaled to unit norm otherwise); a particle that does not move or reaches the horizon
restarts at a uniform x ([1] code: SVPG.step). One `update`:

    proposals x_{i,t}, i = 1..n, t = 1..L                    (SVPG particle rollouts)
    agent pi rolls out T steps in each randomized env E_{x_{i,t}} and in the reference env
    for each t: r_{i,t} = c (log mean_{(s,a,s') in tau_{i,t}} D_psi(s, a, s') - log 0.5)  (reward)
                D_psi <- D_psi - lr grad BCE(D(tau_rand) -> 1, D(tau_ref) -> 0)   (discriminator)
    particle critics: A_{i,t} = R_{i,t} - V_i(x_{i,t}),
        R_{i,t} = r_{i,t} + gamma (1 - m_{i,t}) R_{i,t+1}   (m = 1 where the particle restarts)
    SVPG ([2] Eq. 8, [1] Alg. 1):
        phi_i = 1/n sum_j [ k(theta_j, theta_i) grad_{theta_j} J(theta_j) / alpha
                            + grad_{theta_j} k(theta_j, theta_i) ]
        theta_i <- theta_i + Adam(phi_i)   (ascent)
        k(a, b) = exp(-||a - b||^2 / (2 h^2)),
        h^2 = 0.5 median_{jk} ||theta_j - theta_k||^2 / log(n + 1)
        grad J(theta_i) = grad mean_t log mu_i(a_{i,t} | x_{i,t}) A_{i,t}
    agent: one PPO update ([4]) on the randomized rollouts only.

All of it runs inside the jitted `update`. Baselines in the same file: `--mode uniform` (x ~
U[0, 1]^d for every instance: uniform DR over the same box) and `--mode none` (nominal
physics). `evaluate` reports the return in the box, at the nominal and the held-out
`target` physics, the gap, and on a grid of the first parameter (the plot).

Reproduce (CPU demo, CartPole-v1 with the pole length randomized; both baselines, then
ADR, one plot of where ADR samples and of the returns on the grid):
    python generalization/active_dr.py --preset quick --num-seeds 2 --mode none \
        --run-dir runs/adr_none
    python generalization/active_dr.py --preset quick --num-seeds 2 --mode uniform \
        --run-dir runs/adr_unif
    python generalization/active_dr.py --preset quick --num-seeds 2 --run-dir runs/active_dr \
        --plot generalization/active_dr.png --compare runs/adr_unif,runs/adr_none
`paper` (GPU): gymnax Pendulum-v1 with max_torque in [0.615, 1.538] x nominal (LunarLander's
main-engine range [8, 20] around 13, as multipliers), the released code's SVPG settings
and 1M agent steps:
    python generalization/active_dr.py --preset paper
[1]'s claims (its abstract, checked): uniform DR "may lead to suboptimal, high-variance
policies", ADR "leads to more robust, consistent policies" (LunarLander, Pusher-3DOF,
ErgoReacher, a real robot). Sec. 5 [M] (the body was not at hand): on LunarLander the
uniform-DR agent fails at low main-engine strength and ADR samples those instances more
often. The released code's hard eval env is main engine 10 (x 0.77, inside the box); the
paper preset's target 0.5 lies outside it (our choice, not [1]'s setup).
Ours (quick, CartPole-v1 pole length in [0.5, 4], PPO MLP 64x64, 500k agent steps, 2
seeds; evaluate(): mean return of 32 episodes per condition and seed, then mean +- std over
the 2 seeds; a 2-core CPU shared with about 8 other jobs, 8-11 min wall per run,
compile 18-200 s + loop 440-570 s): at the held-out length x6 (eval/target) ADR 222 +- 13,
uniform DR 210 +- 9, no DR 79 +- 0; in the box (eval/in_dist) 223 / 218 / 186; nominal
228 / 208 / 208; gap 0.5 / 7 / 107. ADR - uniform at the target (+12) is within the seeds'
spread (ADR 209 / 236, uniform 202 / 219): no claim that ADR beats uniform DR here; both
beat no DR by about 130. The discriminator separates the envs (D 0.99 on randomized vs
0.008 on reference transitions in the last update, both after its steps). With alpha = 10
(particle lr 1e-3) the proposals stay spread over the box (active_dr.png; mean length 2.51
in the last update vs the box's middle 2.25). The SVPG step itself concentrates particles
on a known reward's argmax when alpha is small (tests: alpha 1e-3, lr 1e-2, moves of 0.2,
300 steps: mean x 0.49-0.73 with r = x - 1, 0.27-0.28 with r = -x, 6 keys); cf.
montrealrobotics/active-domainrand#6 (users saw near-uniform sampling).

Differences from the paper (and the released code):
- Agent: PPO ([4], stochastic policy, GAE) on gymnax CartPole-v1 / Pendulum-v1, not DDPG on
  LunarLander / Pusher-3DOF / ErgoReacher (not in JAX). The reference rollouts sample the
  same stochastic policy (the released code runs DDPG without exploration noise there and
  with it in the randomized envs, which the discriminator could exploit). One PPO update
  per SVPG step on all L x n randomized rollouts; the released DDPG trains after each
  episode. Every instance is a fresh T-step rollout (auto-reset keeps its physics).
- SVPG sign: the released code hands Adam (a minimiser) (K (-grad J) / alpha + grad k) / n,
  so its kernel term attracts the particles; here the update ascends phi of [2], whose
  kernel term repels. The kernel is over the actor's parameters only; the released code
  also puts the critic's parameters into the kernel and moves them by the kernel term.
  The critic has its own Adam (the released code one Adam for both). No KL to a frozen
  prior particle (the released agent passes kld_coefficient = 0.0).
- Bandwidth: the released code's median heuristic (median over all n^2 squared distances,
  the zero diagonal included, and log(n + 1)); [2]/SVGD use the median distance and log n.
  h^2 is floored at 1e-8 (the released code divides by zero for identical particles).
- Discriminator: the released MLP (128-128 tanh, sigmoid, last layer x 0.1), Adam 3e-3,
  batches of 320 per class drawn with replacement; per proposal step t, n T steps over the
  n instances of that step (`disc_iterations = 0`: as many as the round's agent steps);
  kernels use torch's default init scale, biases zero (torch draws them). Every transition
  counts, the episode-ending ones included (s' is the true terminal state, as the released
  rollouts). Discrete actions enter as one-hot vectors.
- Particle nets: the actor's mean layer and the critic's output layer use an orthogonal
  init of gain 1 (the released orthogonal_init uses sqrt(2) everywhere). For d > 1 the
  particle's log-prob is summed over the d dimensions (the released code averages it over
  L x d), which scales the policy gradient by d; every preset has d = 1.
- `--mode uniform / none` still run the reference rollouts, the discriminator and the SVPG
  gradients every update (nothing of it is applied; it keeps one code path).
- quick preset only: 50 discriminator steps per proposal step (the released n T = 500) and
  particle lr 1e-3 (released 3e-4), to fit a CPU and let the particles move in 200 updates.
- The reward scale c travels in the state (`State.reward_scale`, a sweepable coefficient).
- Metrics: charts/episodic_return is NaN in an update where no randomized episode ended.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from common import envs, rl, run
from common.nets import orthogonal
from common.plot import save_png
from common.rl import PPOConfig, episode_metrics, gae, make_optimizer, minibatch_epochs, ppo_loss

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Active DR (Mehta et al. 2019) over gymnax physics, agent trained with PPO."""

    env_id: str = "Pendulum-v1"
    """gymnax task whose physics are randomized: CartPole-v1 or Pendulum-v1"""
    params: tuple[str, ...] = ("max_torque",)
    """gymnax EnvParams fields randomized (derived fields follow, common.envs.with_physics)"""
    multiplier_min: tuple[float, ...] = (0.615,)
    """lower end of each parameter's range, x nominal (x = 0; [1] LunarLander 8 / 13)"""
    multiplier_max: tuple[float, ...] = (1.538,)
    """upper end of each parameter's range, x nominal (x = 1; [1] LunarLander 20 / 13)"""
    target: tuple[float, ...] = (0.5,)
    """held-out target domain ("reality"): each parameter's multiplier"""
    mode: str = "adr"
    """adr (SVPG proposals), uniform (x ~ U[0,1]^d per instance), none (nominal physics)"""
    num_particles: int = 10
    """n: SVPG particles ([1] code --nagents 10)"""
    temperature: float = 10.0
    """alpha: SVPG temperature ([1] code --temperature 10)"""
    svpg_rollout_length: int = 5
    """L: instances proposed by each particle per update ([1] code --svpg-rollout-length 5)"""
    svpg_horizon: int = 25
    """moves after which a particle restarts at a uniform x ([1] code --svpg-horizon 25)"""
    max_step_length: float = 0.05
    """largest move of a particle in the normalised box ([1] code --max-step-length 0.05)"""
    particle_hidden: int = 100
    """units of the two tanh layers of each particle's actor and critic ([1] code 100)"""
    particle_lr: float = 3e-4
    """Adam learning rate of the particles' actors and critics ([1] code 3e-4)"""
    particle_gamma: float = 0.99
    """discount of the particles' returns ([1] code 0.99)"""
    reward_scale: float = 1.0
    """c: multiplier of the discriminator reward ([1] code --reward-scale 1)"""
    disc_hidden: int = 128
    """units of the discriminator's two tanh layers ([1] code 128)"""
    disc_lr: float = 3e-3
    """Adam learning rate of the discriminator ([1] code 3e-3)"""
    disc_batch: int = 320
    """transitions per class in each discriminator step ([1] code 320)"""
    disc_iterations: int = 0
    """discriminator steps per proposal step t (over its n instances); 0: n T ([1] code)"""
    num_steps: int = 200
    """T: agent steps per instance ([1] code: one episode; Pendulum-v1 episodes are 200)"""
    total_timesteps: int = 1_000_000
    """agent steps in the randomized envs ([1] code --max-agent-timesteps 1e6)"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the agent's actor and critic MLPs"""
    lr: float = 3e-4
    """Adam learning rate of the agent (PPO)"""
    num_epochs: int = 10
    """PPO epochs per update"""
    num_minibatches: int = 10
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """agent discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip of the agent"""
    density_bins: int = 10
    """bins of the logged proposal histogram of each parameter (the plot)"""
    eval_episodes: int = 32
    """evaluate(): episodes per condition (box, nominal, target, each grid point)"""
    eval_grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    """evaluate(): multipliers of the first parameter (the others nominal) for the grid"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_params(self) -> int:
        return len(self.params)

    @property
    def num_instances(self) -> int:
        return self.num_particles * self.svpg_rollout_length

    @property
    def steps_per_update(self) -> int:  # agent steps in randomized envs (as [1]'s count)
        return self.num_instances * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    def validate(self):
        for name, choices in (("env_id", ("CartPole-v1", "Pendulum-v1")),
                              ("mode", ("adr", "uniform", "none")),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        d = self.num_params
        for name in ("multiplier_min", "multiplier_max", "target"):
            v = getattr(self, name)
            if len(v) != d or d == 0 or min(v) <= 0:
                raise ValueError(f"{name}={v} must hold {max(d, 1)} values > 0 (one per "
                                 f"entry of params={self.params})")
        if any(lo >= hi for lo, hi in zip(self.multiplier_min, self.multiplier_max,
                                          strict=True)):
            raise ValueError(f"multiplier_min={self.multiplier_min} must be < multiplier_max="
                             f"{self.multiplier_max} elementwise")
        if self.num_particles < 3:
            raise ValueError(f"num_particles={self.num_particles} must be >= 3 (the median "
                             "heuristic; [1] code asserts nagents > 2)")
        for name in ("temperature", "reward_scale", "svpg_rollout_length", "svpg_horizon",
                     "particle_hidden", "disc_hidden", "lr", "clip_coef", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.max_step_length <= 1:
            raise ValueError(f"max_step_length={self.max_step_length} must be in (0, 1]")
        if self.disc_iterations < 0:
            raise ValueError(f"disc_iterations={self.disc_iterations} must be >= 0")
        if not 0 <= self.particle_gamma <= 1:
            raise ValueError(f"particle_gamma={self.particle_gamma} must be in [0, 1]")
        for name in ("density_bins", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if min(self.eval_grid, default=0.0) <= 0:
            raise ValueError(f"eval_grid={self.eval_grid} must be non-empty multipliers > 0")
        if min(self.hidden, default=0) < 1:
            raise ValueError(f"hidden={self.hidden} must be non-empty sizes >= 1")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_particles * svpg_rollout_length * num_steps = "
                             f"{self.steps_per_update})")
        if self.steps_per_update % self.num_minibatches:
            raise ValueError(f"num_minibatches={self.num_minibatches} must divide the "
                             f"{self.steps_per_update} agent steps of an update")


PRESETS = {
    # CPU demo: CartPole-v1, pole length in [0.5, 4] x nominal, 5 particles ([1] code's
    # "5p" runs) x 5 instances x 100 steps, 500k agent steps; minutes on 2 cores.
    # disc_iterations 50 (released n T = 500) and particle_lr 1e-3 (released 3e-4): CPU
    # time, and particles that move within 200 updates.
    "quick": dict(env_id="CartPole-v1", params=("length",), multiplier_min=(0.5,),
                  multiplier_max=(4.0,), target=(6.0,), num_particles=5, num_steps=100,
                  total_timesteps=500_000, lr=2.5e-4, num_epochs=4, num_minibatches=5,
                  ent_coef=0.01, disc_iterations=50, particle_lr=1e-3,
                  eval_grid=(0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)),
    "paper": dict(),
}


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, num_envs=cfg.num_instances)


def physics(cfg: Config, base, mult) -> Any:
    """gymnax params with each randomized field = nominal x mult_i (derived fields follow)."""
    return envs.with_physics(base, **{f: getattr(base, f) * mult[i]
                                      for i, f in enumerate(cfg.params)})


def multiplier(cfg: Config, x) -> jax.Array:
    """m = m_min + (m_max - m_min) x: normalised x in [0, 1]^d to multipliers ([1] _rescale)."""
    lo, hi = jnp.asarray(cfg.multiplier_min), jnp.asarray(cfg.multiplier_max)
    return lo + (hi - lo) * x


# --- NETWORKS ---


SQRT2 = float(np.sqrt(2))


def dense(n, dtype, scale=SQRT2):
    return nn.Dense(n, kernel_init=orthogonal(scale), dtype=dtype)


class ParticleActor(nn.Module):
    """An SVPG particle's policy over moves: 2 tanh layers, Gaussian with a free log-std."""

    d: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(dense(self.hidden, self.dtype)(nn.tanh(dense(self.hidden, self.dtype)(x))))
        mean = dense(self.d, self.dtype, 1.0)(h).astype(jnp.float32)
        return mean, self.param("log_std", nn.initializers.zeros, (self.d,))


class Critic(nn.Module):
    """Value MLP (tanh): the particles' critics (over x) and the agent's (over obs)."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for f in self.hidden:
            x = nn.tanh(dense(f, self.dtype)(x))
        return dense(1, self.dtype, 1.0)(x).astype(jnp.float32)[..., 0]


class Discriminator(nn.Module):
    """D_psi(s, a, s'): logit that a transition comes from a randomized env ([1] code)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        for _ in range(2):
            x = nn.tanh(nn.Dense(self.hidden, kernel_init=torch_init, dtype=self.dtype)(x))
        small = nn.initializers.variance_scaling(0.01 / 3, "fan_in", "uniform")  # x 0.1
        return nn.Dense(1, kernel_init=small, dtype=self.dtype)(x).astype(jnp.float32)[..., 0]


class ActorCritic(nn.Module):
    """The agent: tanh MLP actor (categorical or Gaussian) and critic."""

    action_dim: int
    continuous: bool
    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, obs):
        h = obs
        for f in self.hidden:
            h = nn.tanh(dense(f, self.dtype)(h))
        logits = dense(self.action_dim, self.dtype, 0.01)(h).astype(jnp.float32)
        value = Critic(self.hidden, self.dtype)(obs)
        if self.continuous:
            log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
            return distrax.MultivariateNormalDiag(logits, jnp.exp(log_std)), value
        return distrax.Categorical(logits=logits), value


# --- SVPG ---


def rbf_kernel(theta) -> tuple[jax.Array, jax.Array, jax.Array]:
    """K[j, i] = k(theta_j, theta_i) and dK[i] = sum_j grad_{theta_j} k(theta_j, theta_i)
    = sum_j K[j, i] (theta_i - theta_j) / h^2 for flat particles theta [n, P]; h^2 by the
    released code's median heuristic, 0.5 median(||.||^2) / log(n + 1). Returns (K, dK, h^2)."""
    n = theta.shape[0]
    sq = (theta**2).sum(-1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * theta @ theta.T, 0.0)  # [n, n]
    h2 = jnp.maximum(0.5 * jnp.median(d2) / math.log(n + 1), 1e-8)
    k = jnp.exp(-d2 / h2 / 2)
    dk = (theta * k.sum(0)[:, None] - k @ theta) / h2
    return k, dk, h2


def svpg_direction(theta, grad_j, temperature) -> tuple[jax.Array, jax.Array]:
    """[2] Eq. 8: phi_i = 1/n sum_j [k(theta_j, theta_i) grad J(theta_j) / alpha
    + grad_{theta_j} k(theta_j, theta_i)] (ascent direction) and h^2."""
    k, dk, h2 = rbf_kernel(theta)
    return (k.T @ (grad_j / temperature) + dk) / theta.shape[0], h2


def move(cfg: Config, a) -> jax.Array:
    """Particle action -> delta of x: a clipped to [-1, 1] (d = 1) or a / ||a|| ([1] code)."""
    if cfg.num_params == 1:
        a = jnp.clip(a, -1.0, 1.0)
    else:
        a = a / jnp.linalg.norm(a)
    return a * cfg.max_step_length


def propose(cfg: Config, actor, key, x, t):
    """One particle's L proposals from its last x and move count t ([1] code SVPG.step):
    returns ((x_next, t_next), (x_t [L, d], a_t [L, d], restart m_t [L]))."""

    def step(carry, k):
        x, t = carry
        k_a, k_r = jax.random.split(k)
        mean, log_std = actor(x)
        a = mean + jnp.exp(log_std) * jax.random.normal(k_a, mean.shape)
        nxt = jnp.clip(x + move(cfg, a), 0.0, 1.0)
        restart = jnp.all(nxt == x) | (t + 1 == cfg.svpg_horizon)
        nxt = jnp.where(restart, jax.random.uniform(k_r, x.shape), nxt)
        return (nxt, jnp.where(restart, 0, t) + 1), (x, a, restart)

    return jax.lax.scan(step, (x, t), jax.random.split(key, cfg.svpg_rollout_length))


def particle_losses(cfg, actor, critic, xs, acts, restart, rewards, x_last):
    """A2C of one particle ([1] code SVPG.train): returns R_t = r_t + gamma (1 - m_t) R_{t+1}
    bootstrapped with V(x_last); A = R - V(x); (policy loss -mean(log mu(a|x) A), value
    loss 0.5 mean A^2)."""

    def ret(r_next, inp):
        r, m = inp
        r_t = r + cfg.particle_gamma * (1.0 - m) * r_next
        return r_t, r_t

    bootstrap = jax.lax.stop_gradient(critic(x_last))  # a target, as the code's .detach()
    _, returns = jax.lax.scan(ret, bootstrap, (rewards, restart.astype(jnp.float32)),
                              reverse=True)
    adv = returns - critic(xs)
    mean, log_std = actor(xs)
    logp = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)).log_prob(acts)
    return -(logp * jax.lax.stop_gradient(adv)).mean(), 0.5 * (adv**2).mean()


def svpg_update(cfg: Config, actor, critic, p_tx, particles, xs, acts, restart, rewards,
                x_last):
    """One SVPG step of all n particles (actor and critic params and Adam states, stacked
    on axis 0) from their rollouts xs, acts [n, L, d], restart, rewards [n, L], x_last
    [n, d]: critics by A2C, actors ascend phi ([2] Eq. 8). Returns (particles, mean value
    loss, h^2)."""
    actors, actor_opt, critics, critic_opt = particles

    def losses(a_p, c_p, xs, acts, restart, r, xl):
        return particle_losses(cfg, lambda z: actor.apply(a_p, z),
                               lambda z: critic.apply(c_p, z), xs, acts, restart, r, xl)

    grads = jax.vmap(jax.grad(lambda a, c, *r: sum(losses(a, c, *r)), argnums=(0, 1)))
    g_actor, g_critic = grads(actors, critics, xs, acts, restart, rewards, x_last)
    v_loss = jax.vmap(lambda *z: losses(*z)[1])(actors, critics, xs, acts, restart, rewards,
                                                x_last).mean()
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])
    unflat = ravel_pytree(jax.tree.map(lambda z: z[0], actors))[1]
    phi, h2 = svpg_direction(flat(actors), -flat(g_actor), cfg.temperature)
    upd, actor_opt = p_tx.update(jax.vmap(unflat)(-phi), actor_opt, actors)  # ascend phi
    upd_c, critic_opt = p_tx.update(g_critic, critic_opt, critics)
    return ((optax.apply_updates(actors, upd), actor_opt, optax.apply_updates(critics, upd_c),
             critic_opt), v_loss, h2)


# --- DISCRIMINATOR ---


def disc_reward(logits, scale) -> jax.Array:
    """r = c (log(mean D + 1e-8) - log 0.5) over the transitions of one rollout ([1] code
    calculate_rewards, add_pz): log 2 c when D = 1 everywhere, 0 at chance."""
    return scale * (jnp.log(jax.nn.sigmoid(logits).mean() + 1e-8) - jnp.log(0.5))


def disc_loss(params, net, rand, ref):
    """BCE: randomized transitions labelled 1, reference ones 0 ([1] code)."""
    return -(jax.nn.log_sigmoid(net.apply(params, rand)).mean()
             + jax.nn.log_sigmoid(-net.apply(params, ref)).mean())


def disc_round(cfg: Config, disc, d_tx, scale, carry, f, key):
    """One proposal step t ([1] code, svpg_simulator_agent): the rewards of the n randomized
    rollouts f[0] with D as it is, then `disc_iterations` Adam steps of BCE on batches of
    `disc_batch` transitions per class drawn with replacement from the round's f [2, n, T, F]
    (0: n T steps, the round's agent steps), then the mean D on the randomized and on the
    reference transitions, both with the trained D (as get_score after train_discriminator).
    Returns ((params, opt), (rewards [n], mean BCE, D randomized, D reference))."""
    params, opt = carry
    n, T = f.shape[1:3]
    rewards = jax.vmap(disc_reward, (0, None))(disc.apply(params, f[0]), scale)
    flat = f.reshape(2, n * T, -1)

    def disc_step(carry, k):
        params, opt = carry
        k1, k2 = jax.random.split(k)
        draw = lambda kk, i: flat[i, jax.random.randint(kk, (cfg.disc_batch,), 0, n * T)]
        loss, g = jax.value_and_grad(disc_loss)(params, disc, draw(k1, 0), draw(k2, 1))
        upd, opt = d_tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), loss

    iters = cfg.disc_iterations or n * T
    (params, opt), losses = jax.lax.scan(disc_step, (params, opt), jax.random.split(key, iters))
    score = jax.nn.sigmoid(disc.apply(params, f)).mean((1, 2))  # [2]: randomized, reference
    return (params, opt), (rewards, losses.mean(), score[0], score[1])


# --- ENVIRONMENT --- (every slot keeps its physics through auto-resets)


@struct.dataclass
class SlotState:
    env_state: Any
    physics: Any
    episode_return: jax.Array
    episode_length: jax.Array


class SlotEnv:
    """`num_envs` auto-resetting gymnax envs whose physics is fixed per slot (one proposed
    instance each). step returns (obs, state, reward, done, (true next obs, info)): the
    true s' (not the auto-reset observation) feeds the discriminator."""

    def __init__(self, cfg: Config, num_envs: int):
        self.env, self.num_envs = envs.GymnaxEnv(cfg.env_id), num_envs
        self.num_actions, self.action_shape = self.env.num_actions, self.env.action_shape
        self.observation_shape = self.env.observation_shape

    def reset(self, key, phys):
        obs, s = jax.vmap(self.env.reset)(jax.random.split(key, self.num_envs), phys)
        zeros = jnp.zeros(self.num_envs)
        return obs, SlotState(s, phys, zeros, zeros.astype(jnp.int32))

    def step(self, vs: SlotState, action, key):
        k_step, k_reset = jax.random.split(key)
        obs, s, reward, term, trunc = jax.vmap(self.env.step)(
            jax.random.split(k_step, self.num_envs), vs.env_state, action, vs.physics)
        done = term | trunc
        ret, length = vs.episode_return + reward, vs.episode_length + 1
        obs_r, s_r = jax.vmap(self.env.reset)(jax.random.split(k_reset, self.num_envs),
                                              vs.physics)
        pick = lambda a, b: jax.tree.map(
            lambda x, y: jnp.where(done.reshape(-1, *[1] * (x.ndim - 1)), x, y), a, b)
        info = {"returned_episode": done, "returned_episode_return": jnp.where(done, ret, 0.0)}
        new = SlotState(pick(s_r, s), vs.physics, jnp.where(done, 0.0, ret),
                        jnp.where(done, 0, length))
        return pick(obs_r, obs), new, reward, done, (obs, info)


# --- TRAIN ---


@struct.dataclass
class State:
    agent: Any  # the agent's params
    agent_opt: Any
    actors: Any  # [n, ...] particle actors theta_i
    actor_opt: Any
    critics: Any  # [n, ...] particle critics
    critic_opt: Any
    disc: Any  # discriminator params psi
    disc_opt: Any
    x: jax.Array  # [n, d] each particle's last x
    t: jax.Array  # [n] int32 moves since its restart
    reward_scale: jax.Array  # c (a traced coefficient)
    key: jax.Array


def parts(cfg: Config):
    """(env, agent net, particle actor, particle critic, discriminator, optimizers)."""
    dt = jnp.dtype(cfg.dtype)
    env = SlotEnv(cfg, 2 * cfg.num_instances)  # randomized instances, then reference ones
    cont = env.num_actions is None
    agent = ActorCritic(env.action_shape[0] if cont else env.num_actions, cont, cfg.hidden, dt)
    particle_opt = optax.adam(cfg.particle_lr)
    return (env, agent, ParticleActor(cfg.num_params, cfg.particle_hidden, dt),
            Critic((cfg.particle_hidden,) * 2, dt), Discriminator(cfg.disc_hidden, dt),
            make_optimizer(ppo_config(cfg)), particle_opt, optax.adam(cfg.disc_lr))


def features(env, obs, action, next_obs) -> jax.Array:
    a = jax.nn.one_hot(action, env.num_actions) if env.num_actions else action
    return jnp.concatenate([obs, a, next_obs], -1)


def init(key, cfg: Config) -> State:
    env, agent, actor, critic, disc, agent_tx, p_tx, d_tx = parts(cfg)
    n, d = cfg.num_particles, cfg.num_params
    k_agent, k_act, k_crit, k_disc, k_x, key = jax.random.split(key, 6)
    obs = jnp.zeros((1, *env.observation_shape))
    agent_params = agent.init(k_agent, obs)
    actors = jax.vmap(actor.init, (0, None))(jax.random.split(k_act, n), jnp.zeros(d))
    critics = jax.vmap(critic.init, (0, None))(jax.random.split(k_crit, n), jnp.zeros(d))
    a0 = jnp.zeros((1, *env.action_shape)) if env.num_actions is None else jnp.zeros(1, int)
    disc_params = disc.init(k_disc, features(env, obs, a0, obs))
    return State(agent_params, agent_tx.init(agent_params), actors, p_tx.init(actors), critics,
                 p_tx.init(critics), disc_params, d_tx.init(disc_params),
                 jax.random.uniform(k_x, (n, d)), jnp.zeros(n, jnp.int32),
                 jnp.asarray(cfg.reward_scale, jnp.float32), key)


def update(state: State, cfg: Config):
    env, agent, actor, critic, disc, agent_tx, p_tx, d_tx = parts(cfg)
    n, L, T, d = cfg.num_particles, cfg.svpg_rollout_length, cfg.num_steps, cfg.num_params
    key, k_prop, k_env, k_roll, k_disc, k_ppo, k_unif = jax.random.split(state.key, 7)

    # --- PROPOSALS --- (x_{i,t} of shape [n, L, d])
    prop = jax.vmap(lambda p, k, x, t: propose(cfg, lambda z: actor.apply(p, z), k, x, t))
    (x_next, t_next), (xs, acts, restart) = prop(state.actors, jax.random.split(k_prop, n),
                                                 state.x, state.t)
    if cfg.mode == "uniform":
        xs = jax.random.uniform(k_unif, xs.shape)
    mult = multiplier(cfg, xs).reshape(n * L, d)  # instance index i * L + t
    if cfg.mode == "none":
        mult = jnp.ones_like(mult)
    mult = jnp.concatenate([mult, jnp.ones_like(mult)])  # [2 n L, d]; reference: nominal

    # --- ROLLOUT --- agent in the randomized and the reference envs, T steps each
    base = env.env.default_params()
    obs, vs = env.reset(k_env, jax.vmap(lambda m: physics(cfg, base, m))(mult))

    def env_step(carry, k):
        vs, obs = carry
        k_a, k_e = jax.random.split(k)
        pi, value = agent.apply(state.agent, obs)
        action = pi.sample(seed=k_a)
        next_obs, vs, reward, done, (true_next, info) = env.step(vs, action, k_e)
        tr = dict(obs=obs, action=action, logp=pi.log_prob(action), value=value,
                  reward=reward, done=done, true_next=true_next,
                  ret=info["returned_episode_return"], ended=info["returned_episode"])
        return (vs, next_obs), tr

    (vs, last_obs), traj = jax.lax.scan(env_step, (vs, obs), jax.random.split(k_roll, T))

    # --- DISCRIMINATOR --- per proposal step t: rewards first, then training ([1] code)
    feats = features(env, traj["obs"], traj["action"], traj["true_next"])  # [T, 2nL, F]
    by_t = lambda z: jnp.swapaxes(z.reshape(T, 2, n, L, *z.shape[2:]), 0, 3)  # [L, 2, n, T]
    (disc_params, disc_opt), (rewards, d_loss, p_rand, p_ref) = jax.lax.scan(
        lambda c, inp: disc_round(cfg, disc, d_tx, state.reward_scale, c, *inp),
        (state.disc, state.disc_opt), (by_t(feats), jax.random.split(k_disc, L)))
    rewards = rewards.T  # [n, L]

    # --- SVPG --- particle critics by A2C, actors by the Stein variational gradient
    particles = (state.actors, state.actor_opt, state.critics, state.critic_opt)
    new_particles, v_loss, h2 = svpg_update(cfg, actor, critic, p_tx, particles, xs, acts,
                                            restart, rewards, x_next)
    if cfg.mode == "adr":
        actors, actor_opt, critics, critic_opt = new_particles
    else:
        (actors, actor_opt, critics, critic_opt), x_next, t_next = particles, state.x, state.t

    # --- AGENT --- one PPO update on the randomized rollouts
    half = lambda z: z[:, : n * L]
    batch = {k: half(traj[k]) for k in ("obs", "action", "logp", "value")}
    _, last_value = agent.apply(state.agent, last_obs[: n * L])
    adv, ret = gae(half(traj["reward"]), batch["value"], half(traj["done"]), last_value,
                   cfg.gamma, cfg.gae_lambda)
    batch = jax.tree.map(lambda z: z.reshape(-1, *z.shape[2:]), dict(batch, adv=adv, ret=ret))

    def loss_fn(params, mb):
        pi, value = agent.apply(params, mb["obs"])
        a = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
        return ppo_loss(pi.log_prob(mb["action"]), mb["logp"], a, pi.entropy(), value,
                        mb["value"], mb["ret"], cfg.clip_coef, cfg.vf_coef, cfg.ent_coef,
                        clip_vloss=True)

    agent_params, agent_opt, metrics = minibatch_epochs(k_ppo, state.agent, state.agent_opt,
                                                        batch, loss_fn, agent_tx,
                                                        cfg.num_epochs, cfg.num_minibatches)
    metrics.update(episode_metrics({k: half(traj[k]) for k in ("ret", "ended")}))
    metrics.update({"losses/discriminator": d_loss.mean(), "losses/particle_value": v_loss,
                    "charts/disc_reward": rewards.mean(), "charts/d_randomized": p_rand.mean(),
                    "charts/d_reference": p_ref.mean(), "charts/kernel_h2": h2})
    m = mult[: n * L]
    xs_flat = (m - jnp.asarray(cfg.multiplier_min)) / (
        jnp.asarray(cfg.multiplier_max) - jnp.asarray(cfg.multiplier_min))  # none: nominal
    for i, name in enumerate(cfg.params):
        metrics[f"charts/proposal_mean_{name}"] = m[:, i].mean()
        hist = jnp.histogram(xs_flat[:, i], cfg.density_bins, (0.0, 1.0))[0] / (n * L)
        for b in range(cfg.density_bins):
            metrics[f"charts/density_{name}_{b:02d}"] = hist[b]
    new = State(agent_params, agent_opt, actors, actor_opt, critics, critic_opt, disc_params,
                disc_opt, x_next, t_next, state.reward_scale, key)
    return new, metrics


# --- EVALUATE ---


def episode_returns(params, cfg: Config, mult, key) -> jax.Array:
    """Return of ONE episode per row of multipliers `mult` [M, d] under the agent (sampled
    actions), from reset to its first termination or time limit."""
    env, agent = parts(cfg)[:2]
    base = env.env.default_params()
    phys = jax.vmap(lambda m: physics(cfg, base, m))(mult)
    m = mult.shape[0]
    k_reset, k_run = jax.random.split(key)
    obs, s = jax.vmap(env.env.reset)(jax.random.split(k_reset, m), phys)

    def step(carry, k):
        s, obs, alive, ret = carry
        k_act, k_env = jax.random.split(k)
        action = agent.apply(params, obs)[0].sample(seed=k_act)
        obs, s, r, term, trunc = jax.vmap(env.env.step)(jax.random.split(k_env, m), s, action,
                                                        phys)
        return (s, obs, alive & ~(term | trunc), ret + r * alive), None

    carry = (s, obs, jnp.ones(m, bool), jnp.zeros(m))
    horizon = int(base.max_steps_in_episode)
    return jax.lax.scan(step, carry, jax.random.split(k_run, horizon))[0][3]


def evaluate(state: State, cfg: Config):
    """Mean return of `eval_episodes` episodes per condition: eval/in_dist in the box (x ~
    U[0, 1]^d, every mode), eval/nominal, eval/target, eval/gap = in_dist - target, and
    grid/<k> with the first parameter at eval_grid[k] x nominal (the others nominal)."""
    e, d = cfg.eval_episodes, cfg.num_params
    k_x, k_run = jax.random.split(jax.random.fold_in(state.key, 1))
    rows = [multiplier(cfg, jax.random.uniform(k_x, (e, d))), jnp.ones((e, d)),
            jnp.broadcast_to(jnp.asarray(cfg.target), (e, d))]
    rows += [jnp.ones((e, d)).at[:, 0].set(g) for g in cfg.eval_grid]
    ret = episode_returns(state.agent, cfg, jnp.concatenate(rows), k_run)
    ret = ret.reshape(len(rows), e).mean(-1)
    out = {"eval/in_dist": ret[0], "eval/nominal": ret[1], "eval/target": ret[2],
           "eval/gap": ret[0] - ret[2]}
    out.update({f"grid/{k:02d}": ret[3 + k] for k in range(len(cfg.eval_grid))})
    return out


# --- PLOT ---


def plot(history: dict, cfg: Config, runs: list, out: str):
    """(a) where the proposals of the first parameter fall over training (share per bin,
    mean over seeds); (b) the return on the grid of that parameter for this run and the
    compared ones, the box shaded and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, lo, hi = cfg.params[0], cfg.multiplier_min[0], cfg.multiplier_max[0]
    dens = np.stack([history[f"charts/density_{name}_{b:02d}"].mean(0)
                     for b in range(cfg.density_bins)])  # [bins, updates]
    steps = dens.shape[1] * cfg.steps_per_update
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    im = ax[0].imshow(dens, aspect="auto", origin="lower", cmap="viridis",
                      extent=(0, steps, lo, hi))
    fig.colorbar(im, ax=ax[0], label="share of proposals")
    ax[0].axhline(1.0, color="w", ls="--", lw=1, label="reference (nominal)")
    ax[0].set(xlabel="agent steps", ylabel=f"{name} (x nominal)",
              title=f"ADR proposals over training ({cfg.env_id})")
    ax[0].legend(fontsize=8)
    grid = np.asarray(cfg.eval_grid)
    for label, final in runs:
        y = np.stack([np.asarray(final[f"grid/{k:02d}"]) for k in range(len(grid))], -1)
        y = y.reshape(-1, len(grid))
        ax[1].errorbar(grid, y.mean(0), y.std(0), marker="o", capsize=3,
                       label=f"{label} ({y.shape[0]} seeds)")
    ax[1].axvspan(lo, hi, color="gray", alpha=0.15, label="randomization box")
    ax[1].axvline(cfg.target[0], color="red", ls="--", label="held-out target")
    ax[1].set(xlabel=f"{name} (x nominal)", ylabel="episode return",
              title="return on a grid of the parameter")
    ax[1].legend(fontsize=8)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (proposal density, returns on the grid) and
    `--compare DIR,DIR` (also draw earlier runs' grids, from their summary.json)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["eval/in_dist", "eval/nominal", "eval/target",
                                              "eval/gap", "charts/episodic_return",
                                              "charts/disc_reward"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        runs = [(cfg.mode, res.final)]
        for other in flags["--compare"].split(",") if flags["--compare"] else []:
            mode = json.loads((Path(other) / "config.json").read_text())["config"]["mode"]
            runs.append((mode, json.loads((Path(other) / "summary.json").read_text())))
        print("wrote", plot(res.history, cfg, runs, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
