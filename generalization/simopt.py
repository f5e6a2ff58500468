"""SimOpt: the simulator's parameter distribution moved toward real rollouts with REPS.

[1] Y. Chebotar, A. Handa, V. Makoviychuk, M. Macklin, J. Issac, N. Ratliff, D. Fox. "Closing
    the Sim-to-Real Loop: Adapting Simulation Randomization with Real World Experience."
    ICRA 2019, arXiv:1810.05687.
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post).
[3] J. Peters, K. Muelling, Y. Altun. "Relative Entropy Policy Search." AAAI 2010.
[4] F. Muratore et al. SimuRLacra / Pyrado (famura/SimuRLacra): pyrado/algorithms/meta/
    simopt.py, episodic/sysid_via_episodic_rl.py and episodic/reps.py, read for defaults.
[5] A released SimOpt pipeline on NVIDIA Flex (flex_gym, baselines PPO1 + Horovod, configs
    yumi_ropepeg / franka_cabinet; its `reps.py` and SimOpt optimisation script were read in
    the code index, which does not name the repository: taken as the authors' code [M]; its
    parameter names are the rows of [1] Tables III-IV).

The simulation parameters xi (here multipliers of two gymnax physics fields, e.g. pole mass
and length) are drawn from a Gaussian p_phi(xi) = N(mu, Sigma). One SimOpt iteration ([1]
Alg. 1, [2] Eq. "SimOpt"):
    1. train the policy pi_{theta, p_phi} with PPO in sim, xi ~ p_phi drawn per episode
    2. roll pi out in "real" (the same simulator at a hidden xi_real): tau_real
    3. draw xi_j ~ p_phi, j = 1..M; replay pi in sim at xi_j from the real rollouts'
       initial states: tau_j; the discrepancy of each ([1] Eq. 4):
         D(tau_j, tau_real) = w_l1 sum_t |W e_t|_1 + w_l2 sum_t |W e_t|_2^2,  e_t = o_t^j - o_t^real
       (observations smoothed in time by a Gaussian kernel first: [1] Tables III-IV, std 5
       steps, truncated at 4 std; W diagonal)
    4. phi <- argmin_phi E_{xi ~ p_phi}[D]  s.t.  KL(p_phi' || p_phi) <= epsilon  ([1] Eq. 3)
       solved by episodic REPS ([3]): q_j ∝ exp(-D_j / eta), eta from the dual
         g(eta) = eta epsilon + eta log (1/M) sum_j exp(-D_j / eta)     (its minimiser makes
         KL(q || uniform) = sum_j q_j log(M q_j) = epsilon; found by bisection on log eta)
       then the weighted maximum-likelihood Gaussian: mu = sum_j q_j xi_j,
         Sigma = sum_j q_j (xi_j - mu)(xi_j - mu)^T (+ min_std^2 I); optionally damped as
         [5]: Sigma = (tr(Sigma_old^-1 Sigma) / d)^(1 / covariance_damping) Sigma_old;
       steps 3-4 repeat `reps_updates` times on the same real rollouts ([1]: 3 for the
       swing-peg, 20 for the drawer)
Everything is one jitted `update` (= one SimOpt iteration): the PPO updates are a scan, the
real and simulated rollouts are vmapped, the REPS dual is a fixed-length bisection. The
baseline in the same file, `--mode uniform`, trains the same PPO with the same budget under
uniform DR over the initial box mu0 -/+ uniform_width sigma0 and never moves it.

Reproduce (CPU demo, Pendulum-v1, xi = (m, l) multipliers; SimOpt, then the uniform-DR
baseline with the same seeds and budget, one plot):
    python generalization/simopt.py --preset quick --num-seeds 2 --plot generalization/simopt.png
`paper` preset (the defaults): gymnax Pendulum-v1 with xi = (m, l), 64 x 128-step PPO
rollouts x 200 updates per iteration, [1] Tables III-IV's REPS (M = 9600 samples, KL bound
epsilon = 1.0, 3 REPS updates per iteration as the swing-peg), 3 real rollouts, L1 / L2
weights 0.5 / 1.0, smoothing std 5 truncated at 4:
    python generalization/simopt.py --preset paper
Why not [1]'s setting: its tasks (a peg on a rope swung into a hole by an ABB YuMi, a drawer
opened by a Franka Panda, both in NVIDIA Flex with ~10 simulation parameters) and the
robots are not available offline; a swinging pendulum with unknown mass and length is the
closest jitted analogue (the rope-peg's swing). [1]'s results (real robots, Sec. V): the
swing-peg policy succeeds in 90% of 20 real trials after 2 SimOpt iterations, the drawer
policy in 20 / 20 after 1 SimOpt update; in its simulated drawer study 3 iterations close a
15 cm offset and 5 a 22 cm one. [1] compares 453-step sequences and trains 100 (swing-peg)
or 200 (drawer) PPO iterations per SimOpt iteration on 64 GPUs.
Ours (quick preset: Pendulum-v1, xi_real = (m 1.6, l 1.2), p_phi_0 = N((1, 1), diag(0.4,
0.25)^2), 5 iterations x 50 PPO updates of 32 x 128 steps = 1M steps, M = 32; 2 seeds, a
loaded 2-core CPU, ~3 min per run, compile included): |mu - xi_real| 0.632 -> 0.20, 0.05,
0.04, 0.011, 0.008 (seed means per iteration); real return of the final policy -317 +- 15
with SimOpt vs -588 +- 24 with uniform DR over the initial box (m [0.2, 1.8], l [0.5, 1.5],
the same budget and seeds); per iteration SimOpt -785, -608, -423, -441, -317 vs uniform
-813, -737, -632, -668, -588. Plot: generalization/simopt.png.

Differences from the paper:
- "Real" is the same simulator at a hidden xi_real (sim-to-sim; no robot here), so the
  discrepancy can reach 0 at xi = xi_real. Tasks: gymnax CartPole-v1 / Pendulum-v1 (two
  physical parameters), not NVIDIA Flex with a YuMi / Panda arm and ~10 parameters.
- Policy in the discrepancy: the policy's mode (deterministic), in real and in sim, and the
  sim rollouts start from the real rollouts' initial states (the same reset keys), as [4]
  does; the physics keep integrating past the task's termination for `sysid_steps` steps
  (a fixed-length observation sequence per rollout, no truncation masks). The real return
  is the usual one (to termination).
- Discrepancy: sums over time as [1] Eq. 4 and [5] ([4] uses time means) with [1]'s
  squared L2 term; [5]'s code adds the unsquared norm |W e_t|_2. Gaussian smoothing (std
  `smooth_std` steps truncated at `smooth_truncate` std, [1]'s 5 and 4; edges held where
  [5] calls scipy's gaussian_filter1d with its reflecting edges); W = `obs_weights`, all 1
  by default ([1] weighs each task's features: joint angles 0.05 or 0.5, object positions
  1.0); unweighted, Pendulum's angular velocity (range +-8) dominates the squared term.
  `sysid_steps` 100 (quick and paper) where [1] compares 453 steps. D is averaged over
  the R real rollouts ([5] compares with its first real rollout only and drops samples
  whose cost exceeds a max_cost).
- REPS as [5]'s `Reps.learn` (same dual, weights and weighted ML fit on the clipped
  samples), solved by 60 bisection steps on log eta instead of scipy's L-BFGS-B from
  eta = 1 with [1]'s minimum temperature eta >= 1e-3 on costs normalised to [0, 1] (here
  no minimum: it matters only when epsilon >= ~log M); plus min_std^2 added to Sigma's
  diagonal (additive jitter, not in [5]). covariance_damping 0 (off) is [5]'s constructor
  default; the value in its configs is [M]. [4] also offers a MAP variant.
- The quick preset runs 1 REPS update of 32 samples per iteration (the paper preset [1]'s
  3 of 9600) and 50 PPO updates per iteration.
- PPO (common.rl, no learning-rate annealing, unclipped value loss) warm-starts across
  iterations, with rl-zoo's Pendulum PPO numbers (gamma 0.9, 10 epochs, lr 1e-3, clip
  0.2, entropy 0; rl-zoo also uses gSDE exploration and 4 x 1024-step rollouts, not used
  here): with gamma 0.99 and the clipped value loss, PPO did not learn Pendulum in 1M
  steps. [1]'s PPO (gamma 0.99, lambda 0.95, lr 5e-4, adaptive KL step 0.01, 2x64 MLP in
  its simulated study) is for its own tasks; the paper preset keeps the Pendulum numbers.
- Metrics: charts/episodic_return is NaN in an update where no training episode ended
  (it averages the last PPO update's rollout only).
"""

import functools
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

# xi: multipliers of these gymnax fields (derived fields follow, common.envs.with_physics).
PARAMS = {"CartPole-v1": ("masspole", "length"), "Pendulum-v1": ("m", "l")}


@dataclass(frozen=True)
class Config:
    """SimOpt (Chebotar et al. 2019) over gymnax physics, the policy trained with PPO."""

    env_id: str = "Pendulum-v1"
    """gymnax task: CartPole-v1 (xi = masspole, length) or Pendulum-v1 (xi = m, l)"""
    mode: str = "simopt"
    """simopt (p_phi moved by REPS) or uniform (fixed uniform box around the initial mean)"""
    xi_real: tuple[float, ...] = (1.6, 1.2)
    """hidden "real" parameters (multipliers of the nominal values), never shown to sim"""
    init_mean: tuple[float, ...] = (1.0, 1.0)
    """mu_0 of p_phi (multipliers): the nominal simulator"""
    init_std: tuple[float, ...] = (0.4, 0.25)
    """sigma_0 of p_phi (a diagonal Sigma_0): the wide initial randomization"""
    uniform_width: float = 2.0
    """mode uniform: the box mu_0 -/+ uniform_width sigma_0 (clipped to [xi_min, xi_max])"""
    xi_min: float = 0.1
    """every sampled multiplier is clipped to >= xi_min (keeps the physics valid)"""
    xi_max: float = 5.0
    """every sampled multiplier is clipped to <= xi_max"""
    num_samples: int = 9600
    """M: xi samples per REPS update ([1] Tables III-IV: 9600)"""
    reps_updates: int = 3
    """REPS updates per SimOpt iteration on the same real rollouts ([1]: 3 swing-peg, 20
    drawer)"""
    reps_epsilon: float = 1.0
    """epsilon: KL bound of the REPS update ([1] Tables III-IV: 1.0)"""
    min_std: float = 0.01
    """min_std^2 added to Sigma's diagonal after each fit (additive jitter against collapse)"""
    covariance_damping: float = 0.0
    """[5]: Sigma' = (tr(Sigma^-1 Sigma_fit) / d)^(1 / damping) Sigma; 0 = plain ML fit"""
    num_real_rollouts: int = 3
    """real rollouts per SimOpt iteration used in the discrepancy ([1] Tables III-IV: 3)"""
    sysid_steps: int = 100
    """T: steps of every real / sim observation sequence compared by D"""
    w_l1: float = 0.5
    """w_l1 of D ([1] Tables III-IV: 0.5)"""
    w_l2: float = 1.0
    """w_l2 of D ([1] Tables III-IV: 1.0)"""
    obs_weights: tuple[float, ...] = ()
    """W: weight of each observation feature in D (empty: all 1)"""
    smooth_std: float = 5.0
    """std in steps of the Gaussian smoothing of the observations before D (0: none; [1] 5)"""
    smooth_truncate: float = 4.0
    """the smoothing kernel is cut at smooth_truncate std ([1] Tables III-IV: 4)"""
    num_iterations: int = 5
    """SimOpt iterations (one `update` each)"""
    ppo_updates: int = 200
    """PPO updates per SimOpt iteration (warm-started across iterations)"""
    num_envs: int = 64
    """PPO: parallel sim environments"""
    num_steps: int = 128
    """PPO: steps per env per rollout"""
    lr: float = 1e-3
    """PPO: Adam learning rate (rl-zoo Pendulum, [M])"""
    num_epochs: int = 10
    """PPO: epochs per rollout (rl-zoo Pendulum, [M])"""
    num_minibatches: int = 8
    """PPO: minibatches per epoch"""
    gamma: float = 0.9
    """PPO: discount (rl-zoo Pendulum, [M]; 0.99 did not learn Pendulum in 1M steps)"""
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
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the actor and critic MLPs"""
    eval_episodes: int = 16
    """real episodes per iteration for the real return (the first num_real_rollouts feed D)"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        return self.ppo_updates * self.num_envs * self.num_steps

    @property
    def dim(self) -> int:
        return len(PARAMS.get(self.env_id, ()))

    def validate(self):
        for name, choices in (("env_id", sorted(PARAMS)), ("mode", ("simopt", "uniform")),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        if not 0 < self.xi_min < self.xi_max:
            raise ValueError(f"xi_min={self.xi_min}, xi_max={self.xi_max} must satisfy "
                             "0 < xi_min < xi_max")
        for name in ("xi_real", "init_mean", "init_std"):
            v = getattr(self, name)
            if len(v) != self.dim or min(v) <= 0:
                raise ValueError(f"{name}={v} must hold {self.dim} values > 0 (one per "
                                 f"parameter of {self.env_id}: {PARAMS[self.env_id]})")
        if self.obs_weights and len(self.obs_weights) != obs_dim(self.env_id):
            raise ValueError(f"obs_weights={self.obs_weights} must be empty or hold "
                             f"{obs_dim(self.env_id)} values (one per observation feature)")
        if min(self.obs_weights, default=0.0) < 0:
            raise ValueError(f"obs_weights={self.obs_weights} must be >= 0")
        for name in ("num_samples", "num_real_rollouts", "sysid_steps", "eval_episodes",
                     "num_iterations", "ppo_updates", "reps_epsilon", "uniform_width",
                     "min_std", "lr", "clip_coef", "reps_updates", "smooth_truncate",
                     "num_envs", "num_steps", "num_epochs", "num_minibatches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("w_l1", "w_l2", "smooth_std", "ent_coef", "vf_coef", "max_grad_norm",
                     "covariance_damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.w_l1 + self.w_l2 <= 0:
            raise ValueError(f"w_l1={self.w_l1} and w_l2={self.w_l2} must not both be 0")
        horizon = int(base_env(self.env_id).default_params().max_steps_in_episode)
        if self.sysid_steps > horizon:
            raise ValueError(f"sysid_steps={self.sysid_steps} must be <= the episode length "
                             f"{horizon} of {self.env_id}")
        if not all(self.xi_min <= x <= self.xi_max for x in self.xi_real):
            raise ValueError(f"xi_real={self.xi_real} must lie in [xi_min, xi_max] = "
                             f"[{self.xi_min}, {self.xi_max}] (samples are clipped there)")
        if self.eval_episodes < self.num_real_rollouts:
            raise ValueError(f"eval_episodes={self.eval_episodes} must be >= "
                             f"num_real_rollouts={self.num_real_rollouts}")
        if min(self.hidden, default=0) < 1:
            raise ValueError(f"hidden={self.hidden} must be non-empty sizes >= 1")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        ppo_config(self).validate()


PRESETS = {
    # CPU demo: Pendulum-v1, 5 iterations x 50 PPO updates of 32 envs x 128 steps (1M steps).
    "quick": dict(num_iterations=5, ppo_updates=50, num_envs=32, num_steps=128,
                  num_minibatches=4, num_samples=32, reps_updates=1),
    "paper": dict(),
}


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, total_timesteps=cfg.num_envs * cfg.num_steps, anneal_lr=False,
                         clip_vloss=False)


@functools.cache
def base_env(env_id: str) -> envs.GymnaxEnv:
    with jax.ensure_compile_time_eval():
        return envs.GymnaxEnv(env_id)


def obs_dim(env_id: str) -> int:
    return base_env(env_id).observation_shape[0]


def physics(cfg: Config, xi) -> Any:
    """gymnax params with each field of PARAMS = nominal x xi_i (derived fields follow)."""
    base = base_env(cfg.env_id).default_params()
    return envs.with_physics(base, **{f: getattr(base, f) * xi[i]
                                      for i, f in enumerate(PARAMS[cfg.env_id])})


# --- NETWORKS ---


ActorCritic = TowersActorCritic  # separate tanh towers with a dtype (common/rl)


def network(cfg: Config) -> ActorCritic:
    env = base_env(cfg.env_id)
    continuous = env.num_actions is None
    return ActorCritic(env.action_shape[0] if continuous else env.num_actions, continuous,
                       cfg.hidden, jnp.dtype(cfg.dtype))


# --- SIMULATION PARAMETER DISTRIBUTION ---


@struct.dataclass
class State:
    ppo: Any  # common.rl.PPOState: policy, optimizer, the sim envs
    mu: jax.Array  # [d] mean of p_phi
    cov: jax.Array  # [d, d] Sigma of p_phi
    key: jax.Array


def uniform_box(cfg: Config):
    mu0, s0 = np.asarray(cfg.init_mean), np.asarray(cfg.init_std)
    lo = np.clip(mu0 - cfg.uniform_width * s0, cfg.xi_min, cfg.xi_max)
    return lo, np.clip(mu0 + cfg.uniform_width * s0, cfg.xi_min, cfg.xi_max)


def sample_xi(key, mu, cov, cfg: Config, shape=()):
    """xi ~ p_phi = N(mu, Sigma) (mode simopt) or U(box) (mode uniform), clipped to
    [xi_min, xi_max]. [*shape, d]"""
    if cfg.mode == "uniform":
        lo, hi = uniform_box(cfg)
        xi = lo + jax.random.uniform(key, (*shape, cfg.dim)) * (hi - lo)
    else:
        chol = jnp.linalg.cholesky(cov + 1e-9 * jnp.eye(cfg.dim))
        xi = mu + jax.random.normal(key, (*shape, cfg.dim)) @ chol.T
    return jnp.clip(xi, cfg.xi_min, cfg.xi_max)


def sim_env(cfg: Config, mu, cov) -> envs.VecEnv:
    """The PPO training envs: every new episode draws xi from the current p_phi."""
    return envs.VecEnv(base_env(cfg.env_id), cfg.num_envs,
                       sampler=lambda k: physics(cfg, sample_xi(k, mu, cov, cfg)))


# --- ROLLOUTS ---


def mode_policy(params, cfg: Config):
    """The policy's deterministic action (the mode), as used in real and in the replays."""
    net = network(cfg)
    return lambda obs: net.apply(params, obs)[0].mode()


def episode(act, cfg: Config, xi, key, horizon: int):
    """One rollout of `act` at parameters xi from the initial state of reset key `key`,
    `horizon` steps of the physics (they keep integrating past termination). Returns the
    observations o_0..o_{T-1} [T, D] and the return up to the first termination."""
    env = base_env(cfg.env_id)
    params = physics(cfg, xi)
    obs, s = env.reset(key, params)

    def step(carry, _):
        s, obs, alive, ret = carry
        obs2, s, r, term, trunc = env.step(key, s, act(obs), params)  # deterministic envs
        return (s, obs2, alive & ~(term | trunc), ret + r * alive), obs

    (_, _, _, ret), traj = jax.lax.scan(step, (s, obs, jnp.array(True), jnp.array(0.0)),
                                        None, horizon)
    return traj, ret


def smooth(obs, std: float, truncate: float = 4.0):
    """Gaussian smoothing along time (kernel +-truncate std with scipy's radius rule, edges
    padded with the end values) [1]."""
    if std <= 0:
        return obs
    r = max(int(truncate * std + 0.5), 1)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / std) ** 2)
    k = jnp.asarray(k / k.sum(), obs.dtype)
    padded = jnp.concatenate([jnp.repeat(obs[:1], r, 0), obs, jnp.repeat(obs[-1:], r, 0)])
    return jax.vmap(lambda x: jnp.convolve(x, k, mode="valid"), 1, 1)(padded)


def discrepancy(obs_sim, obs_real, cfg: Config):
    """[1] Eq. 4: D = w_l1 sum_t |W e_t|_1 + w_l2 sum_t |W e_t|_2^2, e_t = o_t^sim - o_t^real
    after smoothing; obs [T, D]."""
    w = jnp.asarray(cfg.obs_weights) if cfg.obs_weights else 1.0
    e = w * (smooth(obs_sim, cfg.smooth_std, cfg.smooth_truncate)
             - smooth(obs_real, cfg.smooth_std, cfg.smooth_truncate))
    return cfg.w_l1 * jnp.abs(e).sum() + cfg.w_l2 * (e ** 2).sum()


def sample_discrepancies(act, cfg: Config, xis, real_keys, real_obs):
    """D_j for every sample xi_j [M, d]: the policy replayed at xi_j from each real rollout's
    initial state (its reset key), D averaged over the R real rollouts [R, T, D]. [M]"""
    def one(xi):
        sim = jax.vmap(lambda k: episode(act, cfg, xi, k, cfg.sysid_steps)[0])(real_keys)
        return jax.vmap(lambda s, r: discrepancy(s, r, cfg))(sim, real_obs).mean()

    return jax.vmap(one)(xis)


# --- REPS ---


def reps_weights(cost, epsilon, iters: int = 60):
    """Episodic REPS [3] on costs D [M]: q_j ∝ exp(-(D_j - min D) / eta) with eta the
    minimiser of the dual g(eta) = eta epsilon + eta log mean_j exp(-D_j / eta), i.e.
    KL(q || uniform) = epsilon (KL falls monotonically in eta: bisection on log eta, where
    KL < epsilon holds even at the smallest eta (epsilon >= log M), eta -> the smallest).
    Returns (q [M] summing to 1, eta, KL(q || uniform))."""
    m = cost.shape[0]
    r = -(cost - cost.min())  # <= 0, best sample 0
    scale = jnp.maximum(-r.min(), 1e-12)

    def kl(log_eta):
        q = jax.nn.softmax(r / jnp.exp(log_eta))
        return jnp.sum(q * (jnp.log(jnp.maximum(q, 1e-30)) + jnp.log(m)))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_greedy = kl(mid) > epsilon  # eta too small
        return jnp.where(too_greedy, mid, lo), jnp.where(too_greedy, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, bisect,
                               (jnp.log(scale) - 12.0, jnp.log(scale) + 12.0))
    log_eta = 0.5 * (lo + hi)
    return jax.nn.softmax(r / jnp.exp(log_eta)), jnp.exp(log_eta), kl(log_eta)


def fit_gaussian(xis, q, min_std: float, cov_old=None, damping: float = 0.0):
    """Weighted maximum likelihood: mu = sum q_j xi_j, Sigma = sum q_j (xi_j - mu)(...)^T;
    with damping > 0 ([5]) Sigma = (tr(Sigma_old^-1 Sigma) / d)^(1 / damping) Sigma_old;
    plus min_std^2 on the diagonal."""
    mu = q @ xis
    d = xis - mu
    cov = (q[:, None] * d).T @ d
    if damping > 0:
        mult = jnp.trace(jnp.linalg.solve(cov_old, cov)) / xis.shape[1]
        cov = mult ** (1.0 / damping) * cov_old
    return mu, cov + min_std ** 2 * jnp.eye(xis.shape[1])


def gaussian_kl(mu1, cov1, mu0, cov0):
    """KL(N(mu1, cov1) || N(mu0, cov0)), logged as the realised step of p_phi."""
    inv0 = jnp.linalg.inv(cov0)
    d = mu0 - mu1
    return 0.5 * (jnp.trace(inv0 @ cov1) + d @ inv0 @ d - mu1.shape[0]
                  + jnp.linalg.slogdet(cov0)[1] - jnp.linalg.slogdet(cov1)[1])


def sysid_step(key, act, cfg: Config, mu, cov, real_keys, real_obs):
    """Steps 3-4 of an iteration: xi_j ~ p_phi, D_j, REPS weights, the refit p_phi'.
    Returns (mu', cov', info)."""
    xis = sample_xi(key, mu, cov, cfg, (cfg.num_samples,))
    cost = sample_discrepancies(act, cfg, xis, real_keys, real_obs)
    q, eta, kl = reps_weights(cost, cfg.reps_epsilon)
    mu2, cov2 = fit_gaussian(xis, q, cfg.min_std, cov, cfg.covariance_damping)
    return mu2, cov2, {"cost": cost, "eta": eta, "kl_weights": kl}


# --- TRAIN ---


def init(key, cfg: Config) -> State:
    k_ppo, key = jax.random.split(key)
    mu = jnp.asarray(cfg.init_mean, jnp.float32)
    cov = jnp.diag(jnp.asarray(cfg.init_std, jnp.float32) ** 2)
    ppo_init, _ = make_ppo(sim_env(cfg, mu, cov), ppo_config(cfg), network(cfg))
    return State(ppo_init(k_ppo), mu, cov, key)


def update(state: State, cfg: Config):
    """One SimOpt iteration ([1] Alg. 1): PPO under p_phi, real rollouts, the REPS update."""
    key, k_real, k_sys = jax.random.split(state.key, 3)
    # 1. train the policy in sim, xi ~ p_phi per episode (the sampler closes over phi)
    _, ppo_update = make_ppo(sim_env(cfg, state.mu, state.cov), ppo_config(cfg), network(cfg))
    ppo, ppo_metrics = jax.lax.scan(lambda s, _: ppo_update(s), state.ppo, None,
                                    cfg.ppo_updates)
    metrics = jax.tree.map(lambda x: x[-1], ppo_metrics)
    # 2. real rollouts (hidden xi_real); the real return of this iteration's policy
    act = mode_policy(ppo.params, cfg)
    horizon = int(base_env(cfg.env_id).default_params().max_steps_in_episode)
    real_keys = jax.random.split(k_real, cfg.eval_episodes)
    xi_real = jnp.asarray(cfg.xi_real, jnp.float32)
    real_obs, real_ret = jax.vmap(lambda k: episode(act, cfg, xi_real, k, horizon))(real_keys)
    r = cfg.num_real_rollouts
    # 3-4. discrepancies of xi_j ~ p_phi and the REPS update (mode uniform: p_phi stays)
    def reps_update(phi, k):  # [1]: several REPS updates on the same real rollouts
        mu, cov, info = sysid_step(k, act, cfg, *phi, real_keys[:r],
                                   real_obs[:r, :cfg.sysid_steps])
        return (mu, cov), info

    (mu, cov), info = jax.lax.scan(reps_update, (state.mu, state.cov),
                                   jax.random.split(k_sys, cfg.reps_updates))
    info = jax.tree.map(lambda x: x[0], info)  # D of the incoming p_phi's samples, its eta
    if cfg.mode == "uniform":
        mu, cov = state.mu, state.cov
    metrics.update({"charts/real_return": real_ret.mean(),
                    "charts/mu_dist": jnp.linalg.norm(mu - xi_real),
                    "charts/discrepancy_mean": info["cost"].mean(),
                    "charts/discrepancy_min": info["cost"].min(),
                    "losses/reps_eta": info["eta"], "losses/reps_kl": info["kl_weights"],
                    "losses/phi_kl": gaussian_kl(mu, cov, state.mu, state.cov)})
    for i, name in enumerate(PARAMS[cfg.env_id]):
        metrics[f"charts/mu_{name}"] = mu[i]
        metrics[f"charts/std_{name}"] = jnp.sqrt(cov[i, i])
    metrics["charts/cov_01"] = cov[0, 1]
    return State(ppo, mu, cov, key), metrics


# --- PLOT ---


def plot(history: dict, cfg: Config, baseline: dict | None, out: str):
    """(a) p_phi's 2-sigma ellipses over iterations (seed 0) with xi_real; (b) the real
    return per iteration, SimOpt vs uniform DR (mean over seeds +- std); (c) |mu - xi_real|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = PARAMS[cfg.env_id]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    mus = [np.asarray(cfg.init_mean)] + [np.array([history[f"charts/mu_{n}"][0, i]
                                                   for n in names])
                                         for i in range(cfg.num_iterations)]
    covs = [np.diag(np.asarray(cfg.init_std) ** 2)] + [np.array(
        [[history[f"charts/std_{names[0]}"][0, i] ** 2, history["charts/cov_01"][0, i]],
         [history["charts/cov_01"][0, i], history[f"charts/std_{names[1]}"][0, i] ** 2]])
        for i in range(cfg.num_iterations)]
    t = np.linspace(0, 2 * np.pi, 100)
    colors = plt.cm.viridis(np.linspace(0, 1, len(mus)))
    for i, (m, c) in enumerate(zip(mus, covs, strict=True)):
        ell = m[:, None] + 2 * np.linalg.cholesky(c + 1e-12 * np.eye(2)) @ np.stack(
            [np.cos(t), np.sin(t)])
        ax[0].plot(*ell, color=colors[i], label=f"iter {i}" if i in (0, len(mus) - 1) else None)
        ax[0].plot(*m, ".", color=colors[i])
    ax[0].plot(*cfg.xi_real, "*", color="red", mec="black", ms=14, label="xi_real (hidden)")
    ax[0].set(xlabel=f"{names[0]} (x nominal)", ylabel=f"{names[1]} (x nominal)",
              title="p_phi = N(mu, Sigma), 2-sigma ellipses (seed 0)")
    it = np.arange(1, cfg.num_iterations + 1)
    runs = [("SimOpt", history)] + ([("uniform DR", baseline)] if baseline else [])
    for label, h in runs:
        for a, k in ((ax[1], "charts/real_return"), (ax[2], "charts/mu_dist")):
            y = np.asarray(h[k])
            a.errorbar(it, y.mean(0), yerr=y.std(0), marker="o", capsize=3,
                       label=f"{label} ({y.shape[0]} seeds)")
    ax[1].set(xlabel="SimOpt iteration", ylabel=f"return in 'real' {cfg.env_id}",
              title="real return of each iteration's policy")
    ax[2].set(xlabel="SimOpt iteration", ylabel="|mu - xi_real|", title="distance to xi_real")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = ["charts/real_return", "charts/mu_dist", "charts/discrepancy_mean",
           "charts/episodic_return"]


def main(argv=None):
    """The runner's CLI plus `--plot PNG`: after this run, the uniform-DR baseline with the
    same arguments (`--mode uniform`, same seeds and budget) in `<run-dir>_uniform`, then
    the plot of both."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, argv=argv, doc=__doc__,
                   summary_keys=SUMMARY)
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        args = list(sys.argv[1:] if argv is None else argv)
        if "--run-dir" in args:  # the baseline writes beside this run
            i = args.index("--run-dir")
            del args[i:i + 2]
        args += ["--mode", "uniform", "--run-dir", f"{res.run_dir}_uniform"]
        base = run.main(Config, init, update, presets=PRESETS, argv=args, doc=__doc__,
                        summary_keys=SUMMARY)
        print("wrote", plot(res.history, cfg, base.history, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
