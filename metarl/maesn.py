"""MAESN: meta-learned structured exploration through a per-task latent that the policy
reads, sampled once per episode, and adapted (alone) by a MAML inner step on a new task.

[1] A. Gupta, R. Mendonca, Y. Liu, P. Abbeel, S. Levine. "Meta-Reinforcement Learning of
    Structured Exploration Strategies." NeurIPS 2018, arXiv:1802.07245. Released code:
    russellmendonca/maesn_suite (launchers/train.py, hyperparam_sweep.py, sandbox/rocky/tf/
    algos/maesn_npo.py, policies/maml_minimal_gauss_mlp_policy_adaStep.py,
    rllab/sampler/base.py, rllab/envs/mujoco/wheeled_robot.py).
[2] C. Finn, P. Abbeel, S. Levine. "Model-Agnostic Meta-Learning." arXiv:1703.03400.
[M]: [1]'s text was not at hand; the equations are the post's and the released code's,
labelled by [1]'s section (Sec. 4), not by equation numbers.

pi_theta(a | s, z) is a Gaussian MLP on concat(s, z). Training task i (a table of
`num_tasks` goals) owns (mu_i, log sigma_i); an episode draws z once and keeps it:
    z = mu_i + sigma_i eps,  eps ~ N(0, I) once per episode;  a_t ~ pi_theta(a | s_t, z)
    inner step, the latent only (theta is not adapted; [1] allows adapting theta too, the
    release's default does not), per-dimension learned step sizes alpha_mu, alpha_sigma:
        mu_i' = mu_i - alpha_mu o grad_mu L_i,  log sigma_i' likewise      [1] Sec. 4 [M]
    L_i (released, `latent_grad score`): -mean_k log N(stop_grad(z_k); mu_i, sigma_i) w_k,
        w_k the advantage of episode k's first step, centred (and scaled to unit std, never
        up) over the K episodes: only z's density links the latent to the return
    L_i (`latent_grad pathwise`): -mean_t log pi_theta(a_t | s_t, mu + sigma eps) A_t
    J = mean_i [ -mean_t log pi_theta(a_t | s_t, z'_t) A_t on D_i' ~ pi(.|., z' ~ N(mu_i',
        sigma_i'))  +  kl_weight KL(N(mu_i, sigma_i) || N(0, I)) ]  (second order through
        the step)                                                          [1] Sec. 4 [M]
    one Adam step on theta, the alphas and the meta-batch's rows of the latent table.
A_t: GAE(gamma, lambda = 1) with a per-task linear feature baseline (rllab's), standardised
over the task's batch (divisor floored at 1e-2 (|mean R| + 1)). Environment ([1]'s wheeled
robot as a point mass): start at 0, move by clip(0.1 a, -0.1, 0.1); goals on a semicircle of
radius `goal_radius`; training rewards dense, -||pos - g||; test rewards sparse: -||g||
unless ||pos - g|| < `sparse_radius` (wheeled_robot.py). evaluate(): `eval_tasks` new goals,
latent from the prior N(0, I), `eval_steps` inner steps on the sparse reward;
`adapt/success_XX`: fraction of episodes ending inside the goal region after XX steps;
`explore/coverage`: fraction of the 18 ten-degree bins of [0, pi] hit by the end angle of
prior-z episodes that end beyond goal_radius / 2. `--z-per-step`: the broken variant, a
fresh eps at every step.

Reproduce (CPU; the broken variant, then MAESN with its end-point fans):
    python metarl/maesn.py --preset quick --num-seeds 2 --z-per-step --run-dir runs/maesn_step
    python metarl/maesn.py --preset quick --num-seeds 2 --plot metarl/maesn.png
Paper setting (wheeled robot: 20 tasks x 50 episodes of 200 steps, 500 iterations):
    python metarl/maesn.py --preset paper
Ours (quick: 10 of 40 tasks x 20 episodes of 40 steps, 2 x 64 policy, 150 updates, 2 seeds,
loaded 2-core CPU, ~2 min per run with compile), new goals, latent from the prior, success
after 0 / 1 / 2 / 3 inner steps:
    MAESN (score): 0.23 0.40 / 0.35 0.51 / 0.43 0.39 / 0.32 0.31; coverage 0.56 0.44;
        alpha_mu 1.55 1.39, alpha_sigma 1.04 1.04; training return pre/post step -53.8
        -53.0 / -32.6 -27.4
    eps per step (score): 0.19 0.41 / 0.28 0.53 / 0.37 0.57 / 0.40 0.61; coverage 0.28
        0.39; training -44.8 -37.3 / -27.4 -26.1
    pathwise inner gradient, no row mask (commit 2678a91): MAESN 0.32 0.27 / ... / 0.30
        0.32, coverage 0.83 0.83; eps per step 0.19 0.37 / ... / 0.41 0.58, coverage 0.28 0.33
What is reproduced: with the pathwise gradient, prior-z episodes fan out along the arc and
eps-per-step episodes end in one cluster (coverage; tests/metarl/test_maesn.py gates it at
tiny scale). With the released score gradient the first inner step now raises MAESN's
success (+0.12, +0.11), later steps lose it again, and the prior-z fan narrows to the top
third of the arc (metarl/maesn.png; coverage 0.56 0.44 vs 0.28 0.39 for eps per step), so
the two properties do not hold together at this scale; eps per step adapts better over 3
steps. Hypothesis (untested): with eps
per step, mu acts as a task code whose gradient averages over every step, and the
per-episode latent trades a noisier inner gradient for coverage. [1] reports MAESN
outperforming MAML and learning from scratch on sparse wheeled-robot, ant and pusher tasks
(Fig. 4-5 [M]); that is not reproduced here.

Differences from the release:
- Outer step: Adam (meta_lr; latent_lr 0.1 for the latent table, a stand-in for TRPO's
  natural step), not TRPO (KL bound 0.01). Only the meta-batch's latent rows move, as there.
- Tasks per meta-batch are drawn without replacement (release: np.random.choice(100, 20),
  with replacement).
- Sizes from train.py / hyperparam_sweep.py for the wheeled robot (fbs {20, 50}, flr {0.5,
  1}, kl {0.1, 0.5}, mbs 20, latent 2, 100 goals, horizon 200; hyperParams.txt is the
  ant's). `--alpha-init 0` is the release's LS baseline (fast_learning_rate 0).
- Test time: the release zeroes the latent table (so starts at N(0, I), as here) and runs
  100 VPG steps of 10000 samples with the alphas halved from the second step on (a, a, a/2,
  a/4, ...); we run `eval_steps` steps with the learned alphas held constant.
- A point mass, not MuJoCo's wheeled robot (no control cost, no dynamics, pos as obs).
- w_k is scaled to unit std only downwards (release: always); no MAML / scratch / VIME
  baselines here (metarl/maml_rl.py is MAML).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run

ACTION_SCALE = 0.1  # rllab `normalize`: the policy's [-1, 1] -> a step of at most 0.1
LOG_MIN_STD = float(np.log(1e-6))  # the released policy's min_std
NUM_BINS = 18  # coverage: ten-degree bins of [0, pi]

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """MAESN on a semicircle-goal point mass; defaults: [1]'s released wheeled-robot run."""

    hidden: int = 100
    """units of each hidden ReLU layer of the policy"""
    num_layers: int = 2
    """hidden layers"""
    latent_dim: int = 2
    """dimension of the latent z the policy reads"""
    init_std: float = 1.0
    """initial action standard deviation (state-independent, learned)"""
    horizon: int = 200
    """steps of one episode"""
    goal_radius: float = 2.0
    """radius of the semicircle of goals"""
    sparse_radius: float = 0.8
    """meta-test (sparse) reward: -||g|| outside this distance of the goal, -distance inside"""
    num_tasks: int = 100
    """training tasks: the goal table and the (mu_i, log sigma_i) table"""
    num_trajectories: int = 50
    """episodes per task for each inner step and for the post-update batch"""
    meta_batch_size: int = 20
    """training tasks per meta-update"""
    alpha_init: float = 1.0
    """initial alpha_mu and alpha_sigma (per latent dimension) of the inner step"""
    learn_alpha: bool = True
    """meta-learn alpha_mu and alpha_sigma (released code); else they stay at alpha_init"""
    inner_steps: int = 1
    """inner steps on (mu_i, log sigma_i) during meta-training"""
    latent_grad: str = "score"
    """inner gradient of the latent: 'score' (released: score function of z, weighted by each
    episode's first-step advantage) or 'pathwise' (through the actions' likelihood, eps fixed)"""
    kl_weight: float = 0.1
    """weight of KL(N(mu_i, sigma_i) || N(0, I)) in the meta-objective"""
    meta_lr: float = 1e-3
    """Adam learning rate of the meta-update of theta and the alphas"""
    latent_lr: float = 0.1
    """Adam learning rate of the meta-update of the (mu_i, log sigma_i) table (a stand-in
    for TRPO's natural step, large in the latent directions the policy barely reads yet)"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 1.0
    """GAE lambda of the advantages"""
    baseline_reg: float = 1e-5
    """ridge coefficient of the linear feature baseline"""
    num_iterations: int = 500
    """meta-updates"""
    z_per_step: bool = False
    """broken variant: draw a fresh eps at every step instead of once per episode"""
    eval_tasks: int = 30
    """evaluate(): new goals on the semicircle"""
    eval_steps: int = 3
    """evaluate(): inner steps on the sparse reward (0..eval_steps are scored)"""
    eval_trajectories: int = 50
    """evaluate(): episodes per goal per step"""
    dtype: str = "float32"
    """compute dtype of the policy's matmuls: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        return (self.inner_steps + 1) * self.num_trajectories * self.meta_batch_size * self.horizon

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if self.latent_grad not in ("score", "pathwise"):
            raise ValueError(f"--latent-grad={self.latent_grad!r} must be 'score' or 'pathwise'")
        ints = "hidden num_layers latent_dim horizon inner_steps eval_tasks eval_trajectories"
        for name in ints.split():
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("init_std", "goal_radius", "sparse_radius"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )
        if min(self.eval_steps, self.baseline_reg, self.alpha_init) < 0:
            raise ValueError(
                "--eval-steps, --baseline-reg and --alpha-init must be >= 0, got "
                f"{self.eval_steps}, {self.baseline_reg}, {self.alpha_init}"
            )
        if self.meta_batch_size > self.num_tasks:
            raise ValueError(
                f"--meta-batch-size ({self.meta_batch_size}) must be <= "
                f"--num-tasks ({self.num_tasks}): tasks are drawn without repeats"
            )


PRESETS = {
    # CPU demo: 10 tasks x 20 episodes of 40 steps, goals at radius 2, a 2 x 64 policy.
    "quick": dict(
        hidden=64,
        horizon=40,
        num_trajectories=20,
        meta_batch_size=10,
        num_tasks=40,
        meta_lr=1e-2,
        num_iterations=150,
        eval_tasks=20,
        eval_trajectories=20,
    ),
    "paper": dict(),
}


# --- NETWORKS ---


class LatentGaussianMLP(nn.Module):
    """(s [..., 2], z [..., d]) -> (mean [..., 2], log_std [2]): `num_layers` x Dense(hidden)
    + ReLU on concat(s, z), then Dense(2); Glorot-uniform weights, zero biases, a learned
    state-independent log std (the released MAMLGaussianMLPPolicy with latents)."""

    hidden: int
    num_layers: int
    init_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, s, z):
        x = jnp.concatenate([s, z], -1)
        for _ in range(self.num_layers):
            x = nn.relu(
                nn.Dense(
                    self.hidden, kernel_init=nn.initializers.glorot_uniform(), dtype=self.dtype
                )(x)
            )
        mean = nn.Dense(2, kernel_init=nn.initializers.glorot_uniform(), dtype=self.dtype)(
            x
        ).astype(jnp.float32)
        log_std = self.param("log_std", nn.initializers.constant(np.log(self.init_std)), (2,))
        return mean, jnp.maximum(log_std, LOG_MIN_STD)


def network(cfg: Config) -> LatentGaussianMLP:
    return LatentGaussianMLP(cfg.hidden, cfg.num_layers, cfg.init_std, jnp.dtype(cfg.dtype))


def log_prob(mean, log_std, a):
    """log N(a; mean, diag(exp(log_std))^2), summed over the last axis."""
    u = (a - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * u**2 - log_std - 0.5 * np.log(2 * np.pi), -1)


def kl_to_prior(mu, log_sigma):
    """[1] Sec. 4 [M]: KL(N(mu, diag sigma^2) || N(0, I)), summed over the latent dims."""
    return jnp.sum(-log_sigma + 0.5 * (jnp.exp(2 * log_sigma) + mu**2) - 0.5, -1)


def latent(mu, log_sigma, eps):
    """Reparameterised z = mu + sigma * eps ([1] Sec. 4 [M])."""
    return mu + jnp.exp(log_sigma) * eps


# --- ROLLOUT ---


class Batch(NamedTuple):
    """K episodes of one task: obs, act [K, T, 2]; eps [K, T, d] (the noise behind z_t);
    rew, adv [K, T]."""

    obs: jax.Array
    act: jax.Array
    eps: jax.Array
    rew: jax.Array
    adv: jax.Array


def goals_at(angles, radius):
    """Goals on the semicircle: radius (cos a, sin a) [..., 2]."""
    return radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)


def reward(pos, goal, sparse: bool, sparse_radius):
    """Dense -||pos - g|| (meta-training) or sparse: -||g|| outside sparse_radius of the goal
    (wheeled_robot.py)."""
    d = jnp.linalg.norm(pos - goal, axis=-1)
    if not sparse:
        return -d
    return jnp.where(d > sparse_radius, -jnp.linalg.norm(goal, axis=-1), -d)


def sample_eps(key, num: int, horizon: int, dim: int, per_step):
    """eps [num, T, d]: one draw per episode repeated over its steps, or (per_step, the broken
    variant; a traced bool) a fresh draw at every step."""
    k1, k2 = jax.random.split(key)
    once = jnp.broadcast_to(jax.random.normal(k1, (num, 1, dim)), (num, horizon, dim))
    return jnp.where(per_step, jax.random.normal(k2, (num, horizon, dim)), once)


def rollout(
    net, theta, mu, log_sigma, goal, key, num: int, cfg: Config, per_step, sparse: bool = False
):
    """`num` episodes of pi_theta(.|., z) towards `goal`: (obs, act, eps, rew) [num, T, ...]."""
    k_eps, k_act = jax.random.split(key)
    eps = sample_eps(k_eps, num, cfg.horizon, mu.shape[-1], per_step)

    def step(pos, x):
        e, k = x
        mean, log_std = net.apply(theta, pos, latent(mu, log_sigma, e))
        a = mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
        new = pos + jnp.clip(ACTION_SCALE * a, -0.1, 0.1)
        return new, (pos, a, reward(new, goal, sparse, cfg.sparse_radius))

    _, (o, a, r) = jax.lax.scan(
        step, jnp.zeros((num, 2)), (jnp.swapaxes(eps, 0, 1), jax.random.split(k_act, cfg.horizon))
    )
    o, a, r = (jnp.swapaxes(x, 0, 1) for x in (o, a, r))
    return o, a, eps, r


def final_position(batch: Batch):
    """Position after the last step [K, 2]."""
    return batch.obs[:, -1] + jnp.clip(ACTION_SCALE * batch.act[:, -1], -0.1, 0.1)


# --- ADVANTAGES (linear feature baseline) ---


def discounted_returns(rew, gamma):
    """R_t = sum_{l >= 0} gamma^l r_{t+l} along the last axis, as one matmul."""
    t = jnp.arange(rew.shape[-1])
    G = jnp.where(t[:, None] >= t[None, :], gamma ** (t[:, None] - t[None, :]), 0.0)
    return rew @ G


def advantages(obs, rew, gamma, lam, reg):
    """GAE(gamma, lam) with the task's rllab linear baseline on [s, s^2, t/100, (t/100)^2,
    (t/100)^3, 1], standardised over the task's steps; the divisor is floored at
    1e-2 (|mean R| + 1) so that a constant (sparse, nothing hit) reward gives ~0, not the
    baseline's misfit blown up to unit variance."""
    t = jnp.broadcast_to((jnp.arange(obs.shape[-2]) / 100.0)[:, None], obs.shape[:-1] + (1,))
    feat = jnp.concatenate([obs, obs**2, t, t**2, t**3, jnp.ones_like(t)], -1)  # [K, T, 8]
    F, R = feat.reshape(-1, 8), discounted_returns(rew, gamma).reshape(-1)
    b = feat @ jnp.linalg.solve(F.T @ F + reg * jnp.eye(8), F.T @ R)  # [K, T]
    b_next = jnp.concatenate([b[:, 1:], jnp.zeros_like(b[:, :1])], 1)
    adv = discounted_returns(rew + gamma * b_next - b, gamma * lam)
    floor = 1e-2 * (jnp.abs(R.mean()) + 1.0)
    return (adv - adv.mean()) / jnp.maximum(adv.std(), floor)


def sample_batch(net, theta, mu, log_sigma, goal, key, num, cfg, per_step, sparse=False):
    o, a, e, r = rollout(net, theta, mu, log_sigma, goal, key, num, cfg, per_step, sparse)
    return Batch(o, a, e, r, advantages(o, r, cfg.gamma, cfg.gae_lambda, cfg.baseline_reg))


# --- LOSS ---


def pg_surrogate(net, theta, mu, log_sigma, batch: Batch):
    """L(theta, mu, log sigma) = -mean_t log pi_theta(a_t | s_t, mu + sigma eps) A_t."""
    mean, log_std = net.apply(theta, batch.obs, latent(mu, log_sigma, batch.eps))
    return -jnp.mean(log_prob(mean, log_std, batch.act) * batch.adv)


def score_surrogate(mu, log_sigma, batch: Batch):
    """Released inner objective of the latent (maesn_npo.py `surr_objs_latent`):
    -mean_k log N(z_k; mu, sigma) w_k with z_k = stop_grad(mu + sigma eps_k) and w_k the
    advantage at the step where z_k was drawn (t = 0; every step for eps per step), centred
    over those draws and scaled to unit std (released `center_adv`), never up (the batch's
    advantages are already standardised; scaling up would amplify noise as in `advantages`).
    Only z's density links the latent to the return."""
    new = jnp.concatenate(
        [
            jnp.ones_like(batch.eps[:, :1, 0], bool),
            jnp.any(batch.eps[:, 1:] != batch.eps[:, :-1], -1),
        ],
        1,
    )  # [K, T]: a fresh z is drawn here
    n = new.sum()
    a = jnp.where(new, batch.adv - jnp.sum(jnp.where(new, batch.adv, 0.0)) / n, 0.0)
    w = a / jnp.maximum(jnp.sqrt(jnp.sum(a**2) / n), 1.0)  # released: unit std over the draws
    z = jax.lax.stop_gradient(latent(mu, log_sigma, batch.eps))
    logp = jnp.sum(-0.5 * ((z - mu) * jnp.exp(-log_sigma)) ** 2 - log_sigma, -1)
    return -jnp.sum(logp * w) / n


def adapt_latent(net, theta, mu, log_sigma, alpha_mu, alpha_sigma, batches, estimator="score"):
    """[1] Sec. 4 [M]: the inner step(s), on (mu, log sigma) only, with per-dimension step sizes;
    differentiable in theta, mu, log sigma and the alphas (second order). `estimator`:
    score_surrogate (released) or pg_surrogate (pathwise through the actions)."""
    for batch in batches:
        if estimator == "score":
            f = lambda m, s: score_surrogate(m, s, batch)  # noqa: E731
        else:
            f = lambda m, s: pg_surrogate(net, theta, m, s, batch)  # noqa: E731
        g_mu, g_ls = jax.grad(f, (0, 1))(mu, log_sigma)
        mu, log_sigma = mu - alpha_mu * g_mu, log_sigma - alpha_sigma * g_ls
    return mu, log_sigma


def meta_loss(net, meta, idx, inner, test: Batch, kl_weight, estimator="score"):
    """[1] Sec. 4 [M] over the meta-batch (tasks `idx` [B]; inner/test batches [B, ...]): the
    post-update surrogate plus kl_weight * KL of the pre-update latent, mean over tasks."""

    def one(i, inner_i, test_i):
        mu, ls = meta["mu"][i], meta["log_sigma"][i]
        mu2, ls2 = adapt_latent(
            net, meta["theta"], mu, ls, meta["alpha_mu"], meta["alpha_sigma"], inner_i, estimator
        )
        return pg_surrogate(net, meta["theta"], mu2, ls2, test_i), kl_to_prior(mu, ls)

    surr, kl = jax.vmap(one)(idx, inner, test)
    return surr.mean() + kl_weight * kl.mean(), (surr.mean(), kl.mean())


# --- STATE ---


@struct.dataclass
class State:
    meta: Any  # theta, mu [N, d], log_sigma [N, d], alpha_mu [d], alpha_sigma [d]
    opt_state: Any
    goals: jax.Array  # [N, 2] the training tasks
    key: jax.Array
    per_step: jax.Array  # bool: the broken variant (eps per step), traced so arms share code


def optimizer(cfg: Config):
    """Adam with meta_lr on theta and the alphas, latent_lr on the latent table."""
    return optax.multi_transform(
        {"net": optax.adam(cfg.meta_lr), "latent": optax.adam(cfg.latent_lr)},
        lambda meta: {k: "latent" if k in ("mu", "log_sigma") else "net" for k in meta},
    )


def init(key, cfg: Config) -> State:
    k_net, k_mu, k_goal, key = jax.random.split(key, 4)
    d = cfg.latent_dim
    theta = network(cfg).init(k_net, jnp.zeros((1, 2)), jnp.zeros((1, d)))
    meta = {
        "theta": theta,
        "mu": jax.random.normal(k_mu, (cfg.num_tasks, d)),  # released: random_normal
        "log_sigma": jnp.zeros((cfg.num_tasks, d)),
        "alpha_mu": jnp.full((d,), cfg.alpha_init),
        "alpha_sigma": jnp.full((d,), cfg.alpha_init),
    }
    goals = goals_at(jax.random.uniform(k_goal, (cfg.num_tasks,), maxval=np.pi), cfg.goal_radius)
    return State(meta, optimizer(cfg).init(meta), goals, key, jnp.array(cfg.z_per_step))


# --- UPDATE ---


def sample_meta_batch(net, meta, idx, goals, key, cfg: Config, per_step):
    """Per task (vmapped): inner batches D_0..D_{k-1} from the latent before each step, and
    the post-update batch D' from (mu_i', log sigma_i')."""

    def one(i, goal, k):
        keys = jax.random.split(k, cfg.inner_steps + 1)
        mu, ls, inner = meta["mu"][i], meta["log_sigma"][i], []
        for j in range(cfg.inner_steps):
            inner.append(
                sample_batch(
                    net, meta["theta"], mu, ls, goal, keys[j], cfg.num_trajectories, cfg, per_step
                )
            )
            alphas = meta["alpha_mu"], meta["alpha_sigma"]
            mu, ls = adapt_latent(net, meta["theta"], mu, ls, *alphas, inner[-1:], cfg.latent_grad)
        test = sample_batch(
            net, meta["theta"], mu, ls, goal, keys[-1], cfg.num_trajectories, cfg, per_step
        )
        return inner, test

    return jax.vmap(one)(idx, goals, jax.random.split(key, idx.shape[0]))


def meta_step(meta, g, opt_state, idx, cfg: Config):
    """One Adam step; only the meta-batch's rows `idx` of the latent table move (Adam's
    momentum would move the rest; TRPO in the release moves only rows with a gradient)."""
    upd, opt_state = optimizer(cfg).update(g, opt_state, meta)
    rows = jnp.zeros(cfg.num_tasks, bool).at[idx].set(True)[:, None]
    upd = {**upd, **{k: jnp.where(rows, upd[k], 0.0) for k in ("mu", "log_sigma")}}
    return optax.apply_updates(meta, upd), opt_state


def update(state: State, cfg: Config):
    net = network(cfg)
    key, k_idx, k_roll = jax.random.split(state.key, 3)
    idx = jax.random.choice(k_idx, cfg.num_tasks, (cfg.meta_batch_size,), replace=False)
    meta = state.meta
    inner, test = sample_meta_batch(net, meta, idx, state.goals[idx], k_roll, cfg, state.per_step)

    def loss(m):
        if not cfg.learn_alpha:
            m = {
                **m,
                "alpha_mu": jax.lax.stop_gradient(m["alpha_mu"]),
                "alpha_sigma": jax.lax.stop_gradient(m["alpha_sigma"]),
            }
        return meta_loss(net, m, idx, inner, test, cfg.kl_weight, cfg.latent_grad)

    (total, (surr, kl)), g = jax.value_and_grad(loss, has_aux=True)(meta)
    new_meta, opt_state = meta_step(meta, g, state.opt_state, idx, cfg)
    per_ep = lambda b: b.rew.sum(-1).mean()  # noqa: E731
    metrics = {
        "charts/pre_adapt_return": per_ep(inner[0]),
        "charts/post_adapt_return": per_ep(test),
        "losses/meta_loss": total,
        "losses/surrogate": surr,
        "losses/kl_prior": kl,
        "losses/grad_norm": optax.tree.norm(g),
        "latent/alpha_mu": meta["alpha_mu"].mean(),
        "latent/alpha_sigma": meta["alpha_sigma"].mean(),
        "latent/sigma": jnp.exp(meta["log_sigma"]).mean(),
    }
    return state.replace(meta=new_meta, opt_state=opt_state, key=key), metrics


# --- EVALUATE ---


def coverage(ends, min_radius):
    """Fraction of the 18 ten-degree bins of [0, pi] that hold the angle of an end point
    [..., 2] at distance >= min_radius from the start."""
    ends = ends.reshape(-1, 2)
    ang = jnp.arctan2(ends[:, 1], ends[:, 0])
    ok = (jnp.linalg.norm(ends, axis=-1) >= min_radius) & (ang >= 0)
    b = jnp.clip((ang / np.pi * NUM_BINS).astype(jnp.int32), 0, NUM_BINS - 1)
    return jnp.zeros(NUM_BINS).at[b].max(ok.astype(jnp.float32)).mean()


def adapt_new_task(net, meta, goal, key, cfg: Config, per_step):
    """From the prior N(0, I): eval_steps inner steps on the sparse reward. Returns the end
    points [S+1, K, 2] and returns [S+1] of the batch before each step (and after the last)."""
    d = cfg.latent_dim

    def step(lat, k):
        b = sample_batch(
            net, meta["theta"], *lat, goal, k, cfg.eval_trajectories, cfg, per_step, sparse=True
        )
        new = adapt_latent(
            net, meta["theta"], *lat, meta["alpha_mu"], meta["alpha_sigma"], [b], cfg.latent_grad
        )
        return new, (final_position(b), b.rew.sum(-1).mean())

    lat0 = (jnp.zeros(d), jnp.zeros(d))
    return jax.lax.scan(step, lat0, jax.random.split(key, cfg.eval_steps + 1))[1]


def evaluate(state: State, cfg: Config):
    """adapt/success_XX, adapt/return_XX (XX = 0..eval_steps) on new goals; explore/coverage
    of the prior-z episodes (step 0)."""
    net = network(cfg)
    k_goal, k_run = jax.random.split(jax.random.fold_in(state.key, 7))
    goals = goals_at(jax.random.uniform(k_goal, (cfg.eval_tasks,), maxval=np.pi), cfg.goal_radius)
    ends, rets = jax.vmap(adapt_new_task, (None, None, 0, 0, None, None))(
        net, state.meta, goals, jax.random.split(k_run, cfg.eval_tasks), cfg, state.per_step
    )
    # end points per new goal, per step, per episode (x, y)
    hit = jnp.linalg.norm(ends - goals[:, None, None], axis=-1) < cfg.sparse_radius
    out = {"explore/coverage": coverage(ends[:, 0], cfg.goal_radius / 2)}
    for i in range(cfg.eval_steps + 1):
        out[f"adapt/success_{i:02d}"] = hit[:, i].mean()
        out[f"adapt/return_{i:02d}"] = rets[:, i].mean()
    return out


# --- PLOT ---


def fans(state: State, cfg: Config, key, num_goals: int = 3):
    """(goals [G, 2], end points [G, S+1, K, 2]) of the adaptation to a few new goals."""
    net = network(cfg)
    k_goal, k_run = jax.random.split(key)
    goals = goals_at(jnp.linspace(0.15, 0.85, num_goals) * np.pi, cfg.goal_radius)
    ends, _ = jax.vmap(adapt_new_task, (None, None, 0, 0, None, None))(
        net, state.meta, goals, jax.random.split(k_run, num_goals), cfg, state.per_step
    )
    return goals, ends


def plot(panels, goal_radius, sparse_radius, out: str):
    """One row per (label, goals, ends): prior-z end points (step 0), then after the last
    inner step, one colour per goal, goal regions dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.6 * len(panels)), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    th = np.linspace(0, np.pi, 100)
    for row, (label, goals, ends) in zip(axes, panels, strict=True):
        for col, (ax, s) in enumerate(zip(row, (0, ends.shape[1] - 1), strict=True)):
            ax.plot(goal_radius * np.cos(th), goal_radius * np.sin(th), "k:", lw=0.8)
            for g, (goal, e) in enumerate(zip(goals, ends, strict=True)):
                c = colors[g % len(colors)] if col else "tab:gray"
                ax.scatter(e[s, :, 0], e[s, :, 1], s=6, color=c, alpha=0.6)
                ax.add_patch(
                    plt.Circle(
                        goal, sparse_radius, color=colors[g % len(colors)], fill=False, ls="--"
                    )
                )
            ax.scatter([0], [0], color="k", marker="o")
            ax.set_xlim(-goal_radius - 1, goal_radius + 1)
            ax.set_ylim(-1.5, goal_radius + 1)
            ax.set_aspect("equal")
            ax.set_title(
                f"{label}: "
                + ("end points, z ~ N(0, I)" if col == 0 else f"after {s} inner steps (per goal)"),
                fontsize=9,
            )
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG`: end-point fans of seed 0 before/after adapting to
    three new goals, and the same learned policy with eps drawn at every step."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[
            "explore/coverage",
            "adapt/success_00",
            "adapt/success_01",
            "adapt/return_00",
            "adapt/return_01",
            "charts/post_adapt_return",
        ],
    )
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        seed0 = jax.tree.map(lambda x: x[0], res.state)
        panels = []
        fans_jit = jax.jit(fans, static_argnums=1)  # one program; per_step is traced
        for per_step in (False, True):
            s = seed0.replace(per_step=jnp.array(per_step))
            g, e = fans_jit(s, cfg, jax.random.PRNGKey(3))
            label = ("trained with eps per step" if cfg.z_per_step else "MAESN") + (
                ", eps per step" if per_step else ", z once per episode"
            )
            panels.append((label, np.asarray(g), np.asarray(e)))
        print("wrote", plot(panels, cfg.goal_radius, cfg.sparse_radius, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
