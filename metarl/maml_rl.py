"""MAML for reinforcement learning: 2-D point navigation, a vanilla policy-gradient inner
step and a TRPO meta-update, second order through the inner step.

[1] C. Finn, P. Abbeel, S. Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017, arXiv:1703.03400, Sec. 3.2, 5.3 and App. A.2. Released code:
    cbfinn/maml_rl (rllab; maml_examples/maml_trpo_point.py, point_env_randgoal.py,
    sandbox/rocky/tf/algos/maml_npo.py, policies/maml_minimal_gauss_mlp_policy.py,
    rllab/baselines/linear_feature_baseline.py, optimizers/conjugate_gradient_optimizer.py).
[2] J. Schulman et al. "Trust Region Policy Optimization." ICML 2015, arXiv:1502.05477.

A task tau is a goal g ~ U[-0.5, 0.5]^2; the point starts at 0, moves by clip(0.1 a,
-0.1, 0.1) (rllab's `normalize` maps the policy's a in [-1, 1] to [-0.1, 0.1]), earns
-||pos - g|| per step and stops when |dx|, |dy| < 0.01 or after 100 steps (the released
point_env_randgoal.py; common.envs.PointNav2D).
The policy is a Gaussian MLP (2 x 100 ReLU, state-independent log std). Per task:

    D_i ~ pi_theta_i: K trajectories; R_t = sum_l gamma^l r_{t+l}                  [1] Sec. 3.2
    b(s_t) = phi_t' c, phi = [s, s^2, t/100, (t/100)^2, (t/100)^3, 1],
        c = (Phi'Phi + reg I)^-1 Phi'R   (fit on the task's own D_i)     rllab LinearFeatureBaseline
    A_t = GAE(gamma, lambda = 1) with b, then standardised over the task's steps     rllab sampler
    L_tau(theta; D) = -mean_t log pi_theta(a_t|s_t) A_t          (vanilla PG surrogate)  [1] Eq. (4)
    theta_{i+1} = theta_i - alpha grad L_tau(theta_i; D_i)   (inner_steps times)     [1] Alg. 3
    meta-objective: L(theta) = mean_tau -mean_t [pi_theta'(a|s) / pi_old(a|s)] A_t on
        D' ~ pi_theta' (theta' = theta_k(theta), differentiated through the inner steps)
    TRPO [2] (trpo_step): x = F^-1 g by conjugate gradient (F: Hessian of the mean
        KL(pi_old || pi_theta') of the post-update policy), step sqrt(2 delta / x'Fx) x,
        backtracking line search until L decreases and KL <= delta, else no step  [1] Sec. 5.3

F v is computed exactly as J'(M J v) (J = d(mean, log std of pi_theta')/d theta through the
inner step, M the Gaussian's Fisher diag(1/sigma^2, 2)): at theta the KL's Hessian is this
Gauss-Newton product, and it needs no third derivatives. `--algo fomaml` stops the gradient
through the inner gradient; `--algo pretrain` is [1]'s "pretrained on all tasks" baseline:
alpha = 0 inside the meta-objective (TRPO on pi_theta over all tasks; the same code path,
alpha a traced number in the state, so a test runs both arms in one program; the released
code's baseline differs, see below).

evaluate(): `eval_tasks` new goals; from the learned theta (`adapt/return_XX`) and from the
run's random init (`random/return_XX`), the mean return of `eval_trajectories` trajectories
after 0..eval_steps PG steps, alpha for the first and alpha * eval_lr_decay after ([1] App.
A.2 halves it): [1] Fig. 4 (top).

Reproduce (CPU, 2 cores; a pretrained baseline run, then MAML with the plot of both and of
the random init, plus one task's trajectories before and after one step):
    python metarl/maml_rl.py --preset quick --num-seeds 2 --algo pretrain --run-dir runs/mrl_pre
    python metarl/maml_rl.py --preset quick --num-seeds 2 --plot metarl/maml_rl.png \
        --compare runs/mrl_pre
Paper setting ([1] Sec. 5.3, App. A.2: 20 tasks x 20 trajectories, alpha = 0.1, 500
meta-iterations):
    python metarl/maml_rl.py --preset paper
Ours (quick preset, 2 seeds, 40 new goals x 40 trajectories; 2-core CPU shared with other
jobs, load ~20: 150 s compile + 135 s per run), average return after 0 / 1 / 2 / 3 steps:
    MAML -18.5 / -7.4 / -3.2 / -3.9;  pretrained -18.4 / -25.2 / -9.2 / -10.0 (its first
    step of alpha hurts one seed: -16.9 -> -14.2 and -19.9 -> -36.1);
    random init -29.1 / -27.6 / -27.1 / -26.5   (metarl/maml_rl.png)
The paper preset was not run (no accelerator in this session); its returns are on 100-step
episodes, the quick preset's on 50.
[1] Fig. 4 (top) and App. C.2 Table 4 (MAML -40.41 / -11.68 / -3.33 / -3.23), average
return after 0 / 1 / 2 / 3 steps on 40 test goals, read from the released icml/ pickles
(icml_point_results_maml.pkl, _sens0.pkl for the pretrained curve (make_point_plots.py
reads it under the later name _maml0.pkl, absent from the repo), _random.pkl, _oracle.pkl):
    MAML -40.4 / -11.7 / -3.3 / -3.2;  pretrained -40.8 / -19.7 / -11.7 / -8.5;
    random init -82.7 / -58.0 / -53.8 / -46.8;  oracle (told the goal) -2.3.

Metrics: charts/pre_adapt_return and charts/post_adapt_return (mean undiscounted return of
the meta-batch's trajectories before and after the inner steps), losses/surrogate_before and
_after (the meta-objective around the TRPO step), losses/mean_kl (after), losses/ls_steps
(backtracking steps; ls_max_steps means the step was rejected), losses/meta_grad_norm. None
is NaN by design.

Differences from the paper:
- alpha = 0.1, meta-batch 20, up to 500 meta-iterations and alpha halved after the first
  evaluation step are [1] App. A.2's text ("alpha = 0.1 for the first step, and alpha = 0.05
  for all future steps"). The released maml_trpo_point.py (cbfinn/maml_rl 725c800) agrees on
  20 trajectories per task (fast_batch_size), horizon 100, delta 0.01 (meta_step_size), one
  inner step and a 2 x 100 ReLU policy, but sets fast_learning_rate 0.5, meta_batch_size 40
  and n_itr 100; its test adapted with 0.5 then 0.25 on 40 goals. We use the paper's values,
  and the released test's 40 evaluation trajectories.
- [1] App. A.2 evaluates "the model with the best average return during training"; we
  evaluate the final theta (picking a checkpoint needs the runner to keep one per seed).
- Reward and termination follow the released point_env_randgoal.py, not [1] Sec. 5.3's text
  ("negative squared distance", "within 0.01 of the goal"): the unsquared distance and the
  box |dx|, |dy| < 0.01.
- The pretrained baseline: here TRPO with alpha = 0 and the same delta, and its evaluation
  adapts with the MAML alpha. The released code (use_maml=False in maml_npo.py) takes one
  Adam step (lr 1e-3, FirstOrderOptimizer max_epochs=1) per iteration on the step-0 VPG
  surrogate; in [1] App. A.2 "the step sizes for the baseline methods were manually tuned
  for each domain" (the released test used 0.5 for all three).
- K is a number of trajectories (masked after the goal); the released sampler collects
  fast_batch_size * max_path_length steps per task, so tasks whose episodes end early get
  more, shorter trajectories (and its 4000-step test batches are steps, not 40 paths).
- [1] computes TRPO's Hessian-vector products by finite differences (rllab's
  FiniteDifferenceHvp); here exactly (Gauss-Newton at theta, see above).
- The KL of the line search is the mean over all post-update steps of the meta-batch, as in
  maml_npo.py; [1] does not say. Sampling-distribution terms (DiCE/ProMP) are dropped, as in
  [1].
- Policy init: Glorot-uniform weights and zero biases, log std 0 (std 1 in [-1, 1] action
  units), all parameters adapted in the inner step: the released policy class.
- The linear baseline is solved with reg 1e-5 and, where that solve is not finite, again with
  10x reg up to 4 times (rllab's retry, 5 tries in all).
- The `quick` CPU preset is smaller than [1]'s setting: 10 tasks x 10 trajectories of 50
  steps, a 2 x 32 policy, max_kl 0.05 and 120 meta-iterations.
- Only the 2-D navigation task; no brax half-cheetah velocity preset yet (its reward needs
  a wrapper around common.envs.BraxEnv), no Reptile flag, no PPO/Adam outer step.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from common import envs, run

ALGOS = ("maml", "fomaml", "pretrain")
ACTION_SCALE = 0.1  # rllab `normalize`: the policy's [-1, 1] -> the env's [-0.1, 0.1]
LOG_MIN_STD = float(np.log(1e-6))  # the released policy's min_std
GOAL_RANGE = 0.5

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """MAML-TRPO on 2-D point navigation; defaults: [1] Sec. 5.3 / App. A.2 and rllab."""

    algo: str = "maml"
    """meta-update: maml (second order), fomaml (stop_gradient on the inner gradient), or
    pretrain (the baseline: alpha = 0 in the meta-objective, TRPO on all tasks)"""
    hidden: int = 100
    """units of each hidden ReLU layer of the Gaussian policy"""
    num_layers: int = 2
    """hidden layers"""
    init_std: float = 1.0
    """initial standard deviation of the policy (in [-1, 1] action units)"""
    horizon: int = 100
    """steps of one trajectory (max_path_length)"""
    inner_lr: float = 0.1
    """alpha: step size of the vanilla policy-gradient inner step (training and evaluation)"""
    inner_steps: int = 1
    """inner PG steps per task during meta-training"""
    num_trajectories: int = 20
    """K: trajectories per task for each inner step and for the post-update objective"""
    meta_batch_size: int = 20
    """tasks per meta-update"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 1.0
    """GAE lambda of the advantages (1: discounted return minus the baseline)"""
    baseline_reg: float = 1e-5
    """ridge coefficient of the linear feature baseline's least squares"""
    max_kl: float = 0.01
    """delta: TRPO's bound on the mean KL of the post-update policy"""
    cg_iters: int = 10
    """conjugate-gradient iterations for F^-1 g"""
    cg_damping: float = 1e-5
    """damping added to F in the conjugate-gradient solve (F + damping I)"""
    ls_backtrack_ratio: float = 0.8
    """line search: step shrink factor per backtrack"""
    ls_max_steps: int = 15
    """line search: most backtracking steps (the step is rejected after them)"""
    num_iterations: int = 500
    """meta-iterations (TRPO meta-updates)"""
    eval_tasks: int = 40
    """evaluate(): new goals to adapt to"""
    eval_steps: int = 3
    """evaluate(): PG steps of the adaptation curve (0..eval_steps)"""
    eval_trajectories: int = 40
    """evaluate(): trajectories per goal for each adaptation step (and its score)"""
    eval_lr_decay: float = 0.5
    """evaluate(): steps after the first use alpha * eval_lr_decay ([1] App. A.2: halved)"""
    dtype: str = "float32"
    """compute dtype of the policy's matmuls: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        """env steps per meta-iteration: K trajectories per task, inner_steps + 1 times"""
        return (self.inner_steps + 1) * self.num_trajectories * self.meta_batch_size * self.horizon

    def validate(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r} must be one of {', '.join(ALGOS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("hidden", "num_layers", "horizon", "inner_steps", "cg_iters",
                     "ls_max_steps", "eval_tasks", "eval_trajectories"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        for name in ("init_std", "max_kl", "eval_lr_decay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got "
                                 f"{getattr(self, name)}")
        for name in ("baseline_reg", "cg_damping", "eval_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got "
                                 f"{getattr(self, name)}")
        if not 0 < self.ls_backtrack_ratio < 1:
            raise ValueError(f"--ls-backtrack-ratio must be in (0, 1), got "
                             f"{self.ls_backtrack_ratio}")


PRESETS = {
    # CPU demo: 10 tasks x 10 trajectories of 50 steps, a 2 x 32 policy, a wider trust
    # region, 120 iterations.
    "quick": dict(meta_batch_size=10, num_trajectories=10, horizon=50, hidden=32,
                  max_kl=0.05, num_iterations=120),
    "paper": dict(),
}


# --- NETWORKS ---


class GaussianMLP(nn.Module):
    """s [..., 2] -> (mean [..., A], log_std [A]): `num_layers` x Dense(hidden) + ReLU, then
    Dense(A); Glorot-uniform weights, zero biases, a learned state-independent log std
    (the released MAMLGaussianMLPPolicy)."""

    hidden: int
    num_layers: int
    action_dim: int
    init_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, s):
        x = s
        for _ in range(self.num_layers):
            x = nn.relu(nn.Dense(self.hidden, kernel_init=nn.initializers.glorot_uniform(),
                                 dtype=self.dtype)(x))
        mean = nn.Dense(self.action_dim, kernel_init=nn.initializers.glorot_uniform(),
                        dtype=self.dtype)(x).astype(jnp.float32)
        log_std = self.param("log_std", nn.initializers.constant(np.log(self.init_std)),
                             (self.action_dim,))
        return mean, jnp.maximum(log_std, LOG_MIN_STD)


def network(cfg: Config) -> GaussianMLP:
    return GaussianMLP(cfg.hidden, cfg.num_layers, 2, cfg.init_std, jnp.dtype(cfg.dtype))


def log_prob(mean, log_std, a):
    """log N(a; mean, diag(exp(log_std))^2), summed over action dims."""
    z = (a - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi), -1)


def gaussian_kl(mean0, log_std0, mean1, log_std1):
    """KL(N0 || N1) of diagonal Gaussians, summed over action dims."""
    var0, var1 = jnp.exp(2 * log_std0), jnp.exp(2 * log_std1)
    return jnp.sum(log_std1 - log_std0 + (var0 + (mean0 - mean1) ** 2) / (2 * var1) - 0.5, -1)


# --- ROLLOUT ---


class Batch(NamedTuple):
    """K trajectories of one task: obs, act [K, T, 2]; rew, adv, mask [K, T] (mask 1 on the
    steps before the goal was reached)."""

    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    mask: jax.Array
    adv: jax.Array


def make_env(cfg: Config) -> envs.PointNav2D:
    return envs.PointNav2D(episode_length=cfg.horizon, max_speed=0.1)


def rollout(net, params, goal, key, num: int, horizon: int):
    """`num` trajectories of pi_params towards `goal`: (obs, act, rew, mask) [num, T, ...]."""
    env = envs.PointNav2D(episode_length=horizon, max_speed=0.1)
    obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(key, num), goal)

    def step(carry, k):
        obs, state, alive = carry
        mean, log_std = net.apply(params, obs)
        a = mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
        obs2, state2, r, term, _ = jax.vmap(env.step, (None, 0, 0, None))(
            k, state, ACTION_SCALE * a, goal)
        return (obs2, state2, alive * (1.0 - term)), (obs, a, r * alive, alive)

    _, (o, a, r, m) = jax.lax.scan(step, (obs, state, jnp.ones(num)),
                                   jax.random.split(key, horizon))
    return tuple(jnp.swapaxes(x, 0, 1) for x in (o, a, r, m))  # [num, T, ...]


# --- ADVANTAGES (linear feature baseline) ---


def discounted_returns(rew, gamma):
    """R_t = sum_{l >= 0} gamma^l r_{t+l} along the last axis (rewards are 0 after the end),
    as one matmul with the upper-triangular G[t', t] = gamma^(t' - t), t' >= t."""
    t = jnp.arange(rew.shape[-1])
    G = jnp.where(t[:, None] >= t[None, :], gamma ** (t[:, None] - t[None, :]), 0.0)
    return rew @ G


def baseline_features(obs):
    """rllab LinearFeatureBaseline: [s, s^2, t/100, (t/100)^2, (t/100)^3, 1]: [K, T, 8]."""
    o = jnp.clip(obs, -10, 10)
    t = jnp.broadcast_to((jnp.arange(obs.shape[-2]) / 100.0)[:, None], obs.shape[:-1] + (1,))
    return jnp.concatenate([o, o**2, t, t**2, t**3, jnp.ones_like(t)], -1)


def fit_baseline(feat, returns, mask, reg, retries: int = 4):
    """c = (Phi'Phi + reg I)^-1 Phi'R over the valid steps (rows with mask 0 drop out); where
    the solve is not finite, again with 10x reg, up to `retries` times (rllab's retry: states
    pinned to a wall, x = x^2 on every step, make the float32 normal equations singular)."""
    F = (feat * mask[..., None]).reshape(-1, feat.shape[-1])  # [K*T, 8]
    R = (returns * mask).reshape(-1)
    A, b, eye = F.T @ F, F.T @ R, jnp.eye(F.shape[1])
    c = jnp.linalg.solve(A + reg * eye, b)
    for i in range(1, retries + 1):
        c = jnp.where(jnp.isfinite(c).all(), c, jnp.linalg.solve(A + reg * 10**i * eye, b))
    return c


def advantages(obs, rew, mask, gamma, lam, reg):
    """GAE(gamma, lam) with the per-task linear baseline, standardised over the task's valid
    steps (rllab center_adv); 0 on steps after the end."""
    feat = baseline_features(obs)
    b = feat @ fit_baseline(feat, discounted_returns(rew, gamma), mask, reg) * mask  # [K, T]
    b_next = jnp.concatenate([b[:, 1:], jnp.zeros_like(b[:, :1])], 1)
    delta = rew + gamma * b_next - b
    adv = discounted_returns(delta, gamma * lam) * mask
    n = mask.sum()
    mu = adv.sum() / n
    std = jnp.sqrt((((adv - mu) * mask) ** 2).sum() / n)
    return (adv - mu) / (std + 1e-8) * mask


def sample_batch(net, params, goal, key, cfg: Config, num: int) -> Batch:
    o, a, r, m = rollout(net, params, goal, key, num, cfg.horizon)
    return Batch(o, a, r, m, advantages(o, r, m, cfg.gamma, cfg.gae_lambda, cfg.baseline_reg))


# --- LOSS ---


def pg_surrogate(net, params, batch: Batch):
    """[1] Eq. (4) with a baseline: L(theta) = -mean_t log pi_theta(a_t|s_t) A_t."""
    mean, log_std = net.apply(params, batch.obs)
    return -jnp.sum(log_prob(mean, log_std, batch.act) * batch.adv) / batch.mask.sum()


def adapt(net, theta, batches, lrs, first_order: bool = False):
    """theta_{i+1} = theta_i - lr_i grad L(theta_i; D_i) for each batch ([1] Alg. 3 step 7);
    differentiable in theta (second order) unless `first_order`."""
    for batch, lr in zip(batches, lrs, strict=True):
        g = jax.grad(lambda p: pg_surrogate(net, p, batch))(theta)
        if first_order:
            g = jax.lax.stop_gradient(g)
        theta = jax.tree.map(lambda p, gi: p - lr * gi, theta, g)
    return theta


def post_update_dist(net, theta, inner, test: Batch, lr, first_order: bool):
    """(mean [K, T, A], log_std [K, T, A]) of pi_theta' on the post-update batch."""
    mean, log_std = net.apply(adapt(net, theta, inner, [lr] * len(inner), first_order), test.obs)
    return mean, jnp.broadcast_to(log_std, mean.shape)


def meta_surrogate(mean, log_std, old_logp, test: Batch):
    """-mean_t pi_theta'(a|s) / pi_old(a|s) A_t (maml_npo.py's post-update loss)."""
    ratio = jnp.exp(log_prob(mean, log_std, test.act) - old_logp)
    return -jnp.sum(ratio * test.adv) / test.mask.sum()


def meta_loss_kl(mean, log_std, old_mean, old_log_std, old_logp, test: Batch):
    """Over the meta-batch [B, K, T, ...]: the meta-objective (each task's meta_surrogate, then
    the mean over tasks, maml_npo.py) and the mean KL(pi_old || pi_theta') pooled over every
    valid post-update step (maml_npo.py's mean_kl)."""
    loss = jax.vmap(meta_surrogate)(mean, log_std, old_logp, test).mean()
    kl = gaussian_kl(old_mean, old_log_std, mean, log_std)
    return loss, jnp.sum(kl * test.mask) / test.mask.sum()


def fisher_vector_product(dist_fn, x, v_weights, damping):
    """v -> (J' M J + damping I) v at x, J = d dist_fn / dx (dist_fn: x -> (mean, log_std)
    of every sample), M = the Gaussian's Fisher diag(1/sigma^2, 2) times v_weights (the
    mean over samples): the Hessian of the mean KL(pi_x || pi_y) at y = x."""
    (mean, log_std), jvp = jax.linearize(dist_fn, x)
    vjp = jax.linear_transpose(jvp, x)
    w = v_weights[..., None]

    def fvp(v):
        dm, dls = jvp(v)
        return vjp((w * dm * jnp.exp(-2 * log_std), w * 2.0 * dls))[0] + damping * v

    return fvp


def conjugate_gradient(Av, b, iters: int, tol: float = 1e-10):
    """x ~ A^-1 b by `iters` CG iterations (rllab krylov.cg; stops at r'r < tol)."""
    def body(_, c):
        x, r, p, rr = c
        Ap = Av(p)
        alpha = rr / (p @ Ap)
        done = rr < tol
        x = jnp.where(done, x, x + alpha * p)
        r_new = jnp.where(done, r, r - alpha * Ap)
        rr_new = r_new @ r_new
        p = jnp.where(done, p, r_new + rr_new / rr * p)
        return x, r_new, p, jnp.where(done, rr, rr_new)

    x, *_ = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(b), b, b, b @ b))
    return x


def trpo_step(loss_kl, fvp, x0, max_kl, cg_iters: int, backtrack_ratio, max_backtracks: int):
    """[2] / rllab ConjugateGradientOptimizer: s = F^-1 g by CG, full step
    sqrt(2 delta / s'Fs) s, then x0 - ratio^i step for i = 0.. until the loss is below the
    loss at x0 and KL <= delta; x0 itself if no i < max_backtracks passes. loss_kl: x ->
    (loss, kl). Returns (x, loss before, loss after, kl after, backtracks (max_backtracks if
    rejected), |g|)."""
    loss_before, g = jax.value_and_grad(lambda x: loss_kl(x)[0])(x0)
    s = conjugate_gradient(fvp, g, cg_iters)
    full_step = jnp.sqrt(2.0 * max_kl / (s @ fvp(s) + 1e-8)) * s

    def search(c):
        i, _, _, _ = c
        cand = x0 - backtrack_ratio ** i.astype(jnp.float32) * full_step
        loss, kl = loss_kl(cand)
        return i + 1, (loss < loss_before) & (kl <= max_kl), cand, (loss, kl)

    n, accepted, cand, (loss_after, kl) = jax.lax.while_loop(
        lambda c: (c[0] < max_backtracks) & ~c[1], search,
        (jnp.int32(0), jnp.array(False), x0, (loss_before, jnp.float32(0.0))))
    return (jnp.where(accepted, cand, x0), loss_before,
            jnp.where(accepted, loss_after, loss_before), jnp.where(accepted, kl, 0.0),
            jnp.where(accepted, n - 1, max_backtracks), jnp.linalg.norm(g))


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    init_params: Any  # theta at initialisation (evaluate()'s "random init" curve)
    key: jax.Array
    train_lr: jax.Array  # alpha inside the meta-objective: inner_lr, or 0 for `pretrain`


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = network(cfg).init(k_net, jnp.zeros((1, 2)))
    train_lr = jnp.float32(0.0 if cfg.algo == "pretrain" else cfg.inner_lr)
    return State(params, params, key, train_lr)


# --- UPDATE ---


def sample_meta_batch(net, theta, tasks, key, lr, cfg: Config, sample=None):
    """Per task (vmapped over the leading axis of `tasks`): the inner batches D_0..D_{k-1}
    (each from theta_i) and the post-update batch D' from theta_k, plus log pi_old on D'.
    `sample(params, task, key, num) -> Batch` draws a batch (default: sample_batch on the
    goal `task`; metarl/unsupervised_meta_rl.py passes its proposed tasks)."""
    if sample is None:
        sample = lambda p, goal, k, num: sample_batch(net, p, goal, k, cfg, num)

    def one(task, k):
        keys = jax.random.split(k, cfg.inner_steps + 1)
        th, inner = theta, []
        for i in range(cfg.inner_steps):
            inner.append(sample(th, task, keys[i], cfg.num_trajectories))
            th = adapt(net, th, inner[-1:], [lr])
        test = sample(th, task, keys[-1], cfg.num_trajectories)
        mean, log_std = net.apply(th, test.obs)
        return inner, test, log_prob(mean, log_std, test.act)

    return jax.vmap(one)(tasks, jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0]))


def update(state: State, cfg: Config):
    net = network(cfg)
    key, k_goal, k_roll = jax.random.split(state.key, 3)
    goals = jax.random.uniform(k_goal, (cfg.meta_batch_size, 2), minval=-GOAL_RANGE,
                               maxval=GOAL_RANGE)
    inner, test, old_logp = sample_meta_batch(net, state.params, goals, k_roll,
                                              state.train_lr, cfg)
    params, metrics = meta_update(state, inner, test, old_logp, cfg)
    return state.replace(params=params, key=key), metrics


def meta_update(state, inner, test: Batch, old_logp, cfg: Config):
    """TRPO on the meta-objective around state.params (its alpha: state.train_lr) from a
    sampled meta-batch (sample_meta_batch's output): (new params, metrics)."""
    net = network(cfg)
    first_order = cfg.algo == "fomaml"
    flat, unravel = ravel_pytree(state.params)

    def dist(x):  # x -> pi_theta'(x) on every post-update step: [B, K, T, A] each
        return jax.vmap(post_update_dist, (None, None, 0, 0, None, None))(
            net, unravel(x), inner, test, state.train_lr, first_order)

    old_mean, old_log_std = dist(flat)  # pi_old = pi_theta' at the sampling theta

    def loss_kl(x):  # the meta-objective and the mean KL(pi_old || pi_theta'(x))
        return meta_loss_kl(*dist(x), old_mean, old_log_std, old_logp, test)

    fvp = fisher_vector_product(dist, flat, test.mask / test.mask.sum(), cfg.cg_damping)
    new, before, after, kl, n, gnorm = trpo_step(loss_kl, fvp, flat, cfg.max_kl, cfg.cg_iters,
                                                  cfg.ls_backtrack_ratio, cfg.ls_max_steps)
    per_traj = lambda b: b.rew.sum(-1).mean()
    metrics = {
        "charts/pre_adapt_return": per_traj(inner[0]),
        "charts/post_adapt_return": per_traj(test),
        "losses/surrogate_before": before,
        "losses/surrogate_after": after,
        "losses/mean_kl": kl,
        "losses/ls_steps": n.astype(jnp.float32),
        "losses/meta_grad_norm": gnorm,
    }
    return unravel(new), metrics


# --- EVALUATE ---


def adaptation_curve(net, theta, goals, key, cfg: Config):
    """Mean return [eval_steps + 1] over `goals` after 0..eval_steps PG steps (alpha, then
    alpha * eval_lr_decay) on eval_trajectories trajectories each (one scanned step)."""
    lrs = jnp.full((cfg.eval_steps + 1,), cfg.inner_lr * cfg.eval_lr_decay).at[0].set(
        cfg.inner_lr)

    def one(goal, k):
        def step(th, x):
            lr, kk = x
            b = sample_batch(net, th, goal, kk, cfg, cfg.eval_trajectories)
            return adapt(net, th, [b], [lr]), b.rew.sum(-1).mean()

        return jax.lax.scan(step, theta, (lrs, jax.random.split(k, cfg.eval_steps + 1)))[1]

    return jax.vmap(one)(goals, jax.random.split(key, goals.shape[0])).mean(0)


def evaluate(state: State, cfg: Config):
    """adapt/return_XX from the learned theta, random/return_XX from the initial one (the
    same goals and keys), XX = 0..eval_steps."""
    net = network(cfg)
    k_goal, k_run = jax.random.split(jax.random.fold_in(state.key, 7))
    goals = jax.random.uniform(k_goal, (cfg.eval_tasks, 2), minval=-GOAL_RANGE,
                               maxval=GOAL_RANGE)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), state.params, state.init_params)
    curves = jax.vmap(adaptation_curve, (None, 0, None, None, None))(net, both, goals, k_run,
                                                                    cfg)  # [2, steps+1]
    return {f"{name}/return_{i:02d}": curves[j, i] for j, name in enumerate(("adapt", "random"))
            for i in range(cfg.eval_steps + 1)}


# --- PLOT ---


def plot(curves, paths, out: str):
    """Left: mean return vs PG steps for each (evaluate() output, label, prefix) in `curves`
    (mean over seeds, band min..max). Right: `paths` = (goal, positions before, after) of
    one task: the trajectories of the learned policy before and after one step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for final, label, prefix in curves:
        keys = sorted(k for k in final if k.startswith(prefix + "/return_"))
        y = np.stack([np.asarray(final[k], np.float64) for k in keys], -1)  # (seeds, steps+1)
        x = np.arange(y.shape[1])
        ax.plot(x, y.mean(0), marker="o", label=f"{label} ({y.shape[0]} seeds)")
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    ax.set_xlabel("policy-gradient steps on the new goal")
    ax.set_ylabel("average return")
    ax.set_xticks(range(y.shape[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    goal, before, after = paths
    for pos, color, label in ((before, "tab:gray", "0 steps"), (after, "tab:green", "1 step")):
        for i, p in enumerate(pos):
            bx.plot(p[:, 0], p[:, 1], color=color, alpha=0.7, label=label if i == 0 else None)
    bx.scatter([0], [0], color="k", marker="o", label="start")
    bx.scatter([goal[0]], [goal[1]], color="r", marker="*", s=150, label="goal")
    bx.set_xlim(-0.6, 0.6)
    bx.set_ylim(-0.6, 0.6)
    bx.set_aspect("equal")
    bx.legend(fontsize=8)
    bx.set_title("one new goal: trajectories before and after one step")
    fig.tight_layout()
    return save_png(fig, out)


def task_paths(state: State, cfg: Config, key, num: int = 5):
    """(goal, positions [num, T+1, 2] before, after one PG step of alpha) for one new goal."""
    net = network(cfg)
    k_goal, k0, k1, k2 = jax.random.split(key, 4)
    goal = jax.random.uniform(k_goal, (2,), minval=-GOAL_RANGE, maxval=GOAL_RANGE)
    b = sample_batch(net, state.params, goal, k0, cfg, cfg.eval_trajectories)
    theta = adapt(net, state.params, [b], [cfg.inner_lr])

    def positions(params, k):
        o, a, _, m = rollout(net, params, goal, k, num, cfg.horizon)
        last = o[:, -1] + jnp.clip(ACTION_SCALE * a[:, -1], -0.1, 0.1)
        pos = jnp.concatenate([o, last[:, None]], 1)
        keep = jnp.concatenate([jnp.ones_like(m[:, :1]), m], 1)[..., None] > 0
        # after the goal is reached the point stays put: repeat the last valid position
        return jax.lax.cummax(jnp.where(keep, jnp.arange(pos.shape[1])[None, :, None], 0),
                              axis=1), pos

    out = []
    for params, k in ((state.params, k1), (theta, k2)):
        idx, pos = positions(params, k)
        out.append(jnp.take_along_axis(pos, jnp.broadcast_to(idx, pos.shape), 1))
    return goal, out[0], out[1]


# --- MAIN ---


LABELS = {"maml": "MAML", "fomaml": "first-order MAML", "pretrain": "pretrained on all tasks"}


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (this run's adaptation curve, the random-init curve
    and one task's trajectories of seed 0) and `--compare DIR1,DIR2` (also the curves of
    earlier runs, from their summary.json)."""
    import json
    from pathlib import Path

    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[
                       "adapt/return_00", "adapt/return_01", "adapt/return_03",
                       "random/return_01", "charts/post_adapt_return"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        curves = [(res.final, LABELS[cfg.algo], "adapt")]
        for d in (flags["--compare"] or "").split(","):
            if d:
                summary = json.loads((Path(d) / "summary.json").read_text())
                summary = {k: np.array([np.nan if x is None else x for x in v], np.float64)
                           for k, v in summary.items() if isinstance(v, list)}
                record = json.loads((Path(d) / "config.json").read_text())
                curves.append((summary, LABELS[record["config"]["algo"]], "adapt"))
        curves.append((res.final, "random init", "random"))
        seed0 = jax.tree.map(lambda x: x[0], res.state)
        paths = jax.jit(task_paths, static_argnums=1)(seed0, cfg, jax.random.PRNGKey(3))
        print("wrote", plot(curves, jax.tree.map(np.asarray, paths), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
