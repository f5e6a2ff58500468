"""Setter-Solver: a flow setter proposes goals of a desired feasibility, a judge predicts it.

[1] S. Racaniere, A. K. Lampinen, A. Santoro, D. P. Reichert, V. Firoiu, T. P. Lillicrap.
    "Automated curricula through setter-solver interactions." ICLR 2020, arXiv:1909.12892.
[2] L. Dinh, J. Sohl-Dickstein, S. Bengio. "Density estimation using Real NVP." ICLR 2017,
    arXiv:1605.08803 (the setter's affine couplings).
[3] The authors' flow and judge code (`teachers/utils/setter_solver_utils.py`, Copyright
    2020 Google LLC, Apache-2.0), shipped for reproducibility inside TeachMyAgent
    (github.com/flowersteam/TeachMyAgent), whose `teachers/algos/setter_solver.py` adds the
    buffer and the update loop; read for the defaults. Equation tags (1)-(4) are this
    docstring's own, used in the loss comments below.

The solver pi(a | s, g) is a goal-conditioned policy with a binary reward R^g at the end of
an episode. The judge D predicts its success, sigma(D(g)) = p(R^g = 1 | g), trained by
cross-entropy on (goal, outcome) pairs:

    L_judge = E_g[-R^g log sigma(D(g)) - (1 - R^g) log(1 - sigma(D(g)))]          (1)

The setter is an invertible conditional generator g = G(z, f), z ~ N(0, I), f ~ U(0, 1) the
desired feasibility (a RealNVP flow [2], so log p(g | f) = log N(G^-1(g, f)) + log|det
dG^-1/dg| is exact), trained on three losses:

    L_val  = E_{g achieved, xi~U(0, delta), f~U(0,1)}[-log p(g + xi | f)]  (2, validity)
    L_feas = E_{z, f}[(D(G(z, f)) - sigma^-1(f))^2]                        (3, feasibility)
    L_cov  = E_{z, f}[log p(G(z, f) | f)]                                  (4, coverage)
    L_setter = w_val L_val + w_feas L_feas + w_cov L_cov

(the post writes D(G(z,f)) - sigma^-1(f)^2: the square belongs to the difference, as in [3].)

Each outer iteration (`update`, one jitted step): the setter proposes num_goals goals, each
at its own f ~ U(0, 1); PPO trains the solver on episodes toward them; one fresh episode per
goal labels it reached or not; the judge and the setter train on those outcomes ([3]: one
step of each every 100 episodes, on the last 100 goals; the paper preset trains PPO on
100 x 200 steps, >= 100 episodes, per iteration). Coverage = mean success over a grid of feasible
goals (as Goal GAN's metric).

Environment: Goal GAN's point-mass U-maze (cells of 2, start in one arm, goals in the box
[-3, 7]^2 of which 28% is free space; a goal inside a wall is never reached); the setter
works in the unit square (its clipped-sigmoid output, [3]) mapped onto the box.

Teachers (traced in the state, one compiled program for all): `setter_solver` ([1]);
`uniform` (goals uniform over the box: the baseline); `no_feasibility` (broken: w_feas = 0,
the setter ignores the judge and f).

Reproduce:
    python curriculum/setter_solver.py --preset quick --num-seeds 2 \
        --plot curriculum/setter_solver.png
    python curriculum/setter_solver.py --preset quick --num-seeds 2 --teacher uniform
    python curriculum/setter_solver.py --preset paper          # accelerator: [3]'s sizes

Measured (quick: 50-step episodes, 128 goals and 20 judge/setter steps an iteration, 60
outer iterations, the runner's seed keys 0, 1; loaded 2-core CPU), per arm (seeds 0, 1):

    teacher          cov it 1-20  first > 0.4  final cov   hi-f / lo-f reach  feasible
    setter_solver    0.55 0.48    4, 4         0.71 0.46   0.74 0.35 / 0.70 0.46  0.60 0.59
    uniform          0.38 0.39    11, 10       0.76 0.72   0.20 0.23 / 0.21 0.19  0.28 0.28
    no_feasibility   0.45 0.48    10, 7        0.78 0.72   0.55 0.54 / 0.52 0.56  0.59 0.58

(cov: mean success over the feasible grid; hi-f / lo-f: share reached of the goals set at
f > 0.5 and f < 0.5, and feasible: share of goals in free space, both over the last 10
iterations.) The setter obeys f (hi-f minus lo-f 0.39, 0.24 against 0.01, -0.04 for the
broken setter; the slow test gates it), but coverage does not favour it: its early lead
over uniform goals is shared by the no-feasibility setter (validity + coverage, not
f-control), and the full setter trails both from iteration ~10 on, ending last (seed 1
plateaus at 0.54). The plot's rerun (curriculum/setter_solver.png, key 0, all three
teachers) ends at 0.73, 0.63 (uniform), 0.74 (no feasibility). At this scale (28% of the
box free, a strong PPO) uniform goals suffice.
[1] reports its gains on 3-D and grid-world tasks (Fig. 3-5 [M]); no number is comparable.

Defaults are [3]'s: setter of 3 blocks x 3 affine couplings with nets of 3 layers of 128
and a random last layer, scale = 1e-2 + softplus(s) (not exp(s)), clipped-sigmoid output
(1e-4 from the edges in the inverse), validity noise delta = 0.01; judge MLP (64, 64, 64);
Adam 3e-4 for both; one judge and one setter step on the last 100 goals every 100 episodes;
loss weights 1, 1, 1. The solver's sizes are Goal GAN's maze run.

Differences from the paper / [3]:
- The paper's tasks (3-D first-person and grid worlds, a desired-goal Wasserstein loss and
  an environment-conditioned setter) are not implemented; the solver is PPO
  (common.rl.make_ppo) on the point U-maze.
- Couplings alternate the conditioned coordinate (in 2-D; [3]'s block is left-to-right,
  right-to-left, interlaced). Each coupling has ONE leaky-ReLU MLP with 2 outputs (s, t);
  [3] has two separate Highway nets (Linear, tanh, 3 gated tanh blocks of 128; its
  leaky_relu argument is unused). The scale uses jax.nn.softplus; [3]'s _softplus is an
  atan-based function (1/pi at 0, decaying like 1/(3 pi x^2)).
- The quick preset takes 20 judge and 20 setter steps at lr 1e-3 an iteration ([3]: one
  step of each at 3e-4), so the small run's setter moves within 60 iterations.
- The validity loss draws a fresh f ~ U(0, 1) for each achieved goal, as [1]/the post
  ([3] reuses the f it was set at); feasibility and coverage use fresh z ([3]: the z
  inferred from the batch's goals). f is drawn in [1e-4, 1 - 1e-4] so sigma^-1(f) is finite.
- [3]'s Judge builds an MLP of layer_sizes[1:], i.e. (64, 64) and 1 output from its
  (64, 64, 64): judge_hidden follows the stated (64, 64, 64).
- Labels come from one fresh rollout per goal after the solver update (as Goal GAN here),
  not from the training episodes themselves.
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import rl, run
from common.envs import Env, VecEnv
from common.nets import orthogonal
from common.rl import PPOState, make_ppo

TEACHERS = ("setter_solver", "uniform", "no_feasibility")
"""[1]'s setter, uniform goals (baseline), the setter without its feasibility loss (broken)."""

U_MAZE = np.array([[1, 1, 1, 1, 1],
                   [1, 0, 0, 0, 1],  # the start is cell (1, 1)
                   [1, 1, 1, 0, 1],
                   [1, 0, 0, 0, 1],
                   [1, 1, 1, 1, 1]])
"""Goal GAN's maze (1 = wall); row i is y, column j is x."""

F_EPS = 1e-4  # f in [F_EPS, 1 - F_EPS]; the setter's inverse clips goals F_EPS from the edges
MIN_SCALE = 1e-2  # [3]'s _MIN_SCALE of a coupling's scale

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Setter-Solver on the point U-maze; defaults are [3]'s and Goal GAN's maze run's."""

    teacher: str = "setter_solver"
    """setter_solver ([1]) | uniform (goals uniform over the box) | no_feasibility (broken:
    w_feas = 0)"""
    maze_scaling: float = 2.0
    """side of one maze cell"""
    horizon: int = 200
    """T: steps per episode"""
    max_step: float = 0.2
    """displacement of the point per step at |action| = 1 per coordinate"""
    terminal_eps: float = 0.3
    """a goal is reached within this distance (R^g = 1, the episode ends)"""
    num_goals: int = 100
    """goals proposed per outer iteration ([3]: setter and judge train every 100 episodes)"""
    num_blocks: int = 3
    """setter blocks ([3] num_blocks)"""
    couplings_per_block: int = 3
    """affine couplings per block ([3]: left-right, right-left, interlaced)"""
    setter_hidden: tuple[int, ...] = (128, 128, 128)
    """hidden layers of each coupling's (scale, shift) net (leaky ReLU; [3]: tanh highway)"""
    judge_hidden: tuple[int, ...] = (64, 64, 64)
    """hidden layers of the judge MLP (ReLU)"""
    setter_lr: float = 3e-4
    """Adam learning rate of the setter"""
    judge_lr: float = 3e-4
    """Adam learning rate of the judge"""
    setter_steps: int = 1
    """setter gradient steps per outer iteration"""
    judge_steps: int = 1
    """judge gradient steps per outer iteration (before the setter's)"""
    w_val: float = 1.0
    """weight of the validity loss"""
    w_feas: float = 1.0
    """weight of the feasibility loss"""
    w_cov: float = 1.0
    """weight of the coverage loss"""
    val_noise: float = 0.01
    """delta: achieved goals get noise xi ~ U(0, delta) in the validity loss"""
    num_envs: int = 100
    """parallel episodes of the solver update"""
    num_steps: int = 200
    """steps per env per PPO iteration"""
    inner_iters: int = 1
    """solver PPO iterations per outer iteration (1 x 100 envs x 200 steps: 100 episodes)"""
    lr: float = 3e-4
    """PPO Adam learning rate"""
    num_epochs: int = 10
    """PPO epochs per iteration"""
    num_minibatches: int = 32
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip of the solver update"""
    policy_hidden: tuple[int, ...] = (64, 64)
    """hidden layers of the solver's policy and value MLPs (tanh)"""
    policy_std: float = 1.0
    """fixed std of the Gaussian policy"""
    coverage_res: int = 2
    """coverage grid points per unit length"""
    outer_iters: int = 300
    """outer iterations"""
    dtype: str = "float32"
    """compute dtype of the dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.outer_iters

    @property
    def steps_per_update(self) -> int:  # solver-training steps (labels, coverage not counted)
        return self.inner_iters * self.num_envs * self.num_steps

    @property
    def lo(self) -> float:  # the goal box [lo, lo + 5 s]^2 (Goal GAN's [-3, 7]^2)
        return -1.5 * self.maze_scaling

    @property
    def side(self) -> float:
        return 5.0 * self.maze_scaling

    def validate(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r} must be one of {TEACHERS}")
        for name in ("maze_scaling", "max_step", "terminal_eps", "setter_lr", "judge_lr",
                     "policy_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("w_val", "w_feas", "w_cov", "val_noise", "clip_coef", "vf_coef",
                     "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("horizon", "num_goals", "num_blocks", "couplings_per_block", "setter_steps",
                     "judge_steps", "inner_iters", "num_epochs", "num_minibatches", "coverage_res",
                     "outer_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("setter_hidden", "judge_hidden", "policy_hidden"):
            if min(getattr(self, name), default=0) < 1:
                raise ValueError(f"{name}={getattr(self, name)} needs layers of >= 1 unit")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.num_envs * self.num_steps} is not "
                             f"divisible by num_minibatches={self.num_minibatches}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    "quick": dict(horizon=50, max_step=0.4, num_envs=32, num_steps=50, num_minibatches=8,
                  num_epochs=4, inner_iters=4, num_goals=128, setter_hidden=(64, 64),
                  judge_hidden=(64, 64), setter_steps=20, judge_steps=20, setter_lr=1e-3,
                  judge_lr=1e-3, lr=1e-3, outer_iters=60),
    "paper": dict(),
}

# --- ENV: the point-mass U-maze; each episode's goal is its params ---


def is_free(pos, cfg: Config):
    """pos [..., 2] lies in a free cell; cell (i, j) is centred at ((j - 1) s, (i - 1) s)."""
    s = cfg.maze_scaling
    j = jnp.floor(pos[..., 0] / s + 0.5).astype(jnp.int32) + 1
    i = jnp.floor(pos[..., 1] / s + 0.5).astype(jnp.int32) + 1
    inside = (i >= 0) & (i < 5) & (j >= 0) & (j < 5)
    return inside & (jnp.asarray(U_MAZE)[jnp.clip(i, 0, 4), jnp.clip(j, 0, 4)] == 0)


@struct.dataclass
class PointState:
    pos: jax.Array  # [2]
    time: jax.Array  # () int32


class PointUMaze(Env):
    """Kinematic point; params = the episode's goal [2]; R^g = 1 and termination on coming
    within terminal_eps of a feasible goal, truncation after `horizon` steps."""

    num_actions = None
    action_shape = (2,)
    observation_shape = (4,)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def default_params(self):
        return np.zeros(2, np.float32)

    def obs(self, pos, goal):  # (pos, goal) scaled to [-1, 1]
        c = self.cfg
        return 2 * (jnp.concatenate([pos, goal], -1) - c.lo) / c.side - 1

    def reset(self, key, goal):
        pos = jnp.zeros(2)
        return self.obs(pos, goal), PointState(pos, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, goal):
        c = self.cfg
        new = state.pos + c.max_step * jnp.clip(action, -1.0, 1.0)
        pos = jnp.where(is_free(new, c), new, state.pos)  # a move into a wall is undone
        done = (jnp.linalg.norm(pos - goal) < c.terminal_eps) & is_free(goal, c)
        time = state.time + 1
        return (self.obs(pos, goal), PointState(pos, time), done.astype(jnp.float32), done,
                (time >= c.horizon) & ~done)


@functools.cache
def coverage_grid(cfg: Config) -> np.ndarray:
    """The feasible goals of a grid of spacing 1 / coverage_res over the box [G, 2]."""
    h = 0.5 / cfg.coverage_res
    ax = np.arange(cfg.lo + h, cfg.lo + cfg.side, 2 * h)
    g = np.stack(np.meshgrid(ax, ax), -1).reshape(-1, 2).astype(np.float32)
    j, i = (np.floor(g / cfg.maze_scaling + 0.5).astype(int) + 1).T
    return g[U_MAZE[i, j] == 0]


# --- NETWORKS: the flow setter [2], the judge, the solver ---


class MLP(nn.Module):
    features: tuple[int, ...]
    activation: callable
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, dtype=self.dtype)(x)
            x = x if i == len(self.features) - 1 else self.activation(x)
        return x.astype(jnp.float32)


class Couplings(nn.Module):
    """One (scale, shift) net per coupling k: (x_other, f) -> (s, t); coupling k transforms
    coordinate k % 2 given the other. Every layer starts random, as [3]'s Highway
    (zero_init_last_layer=False): a zero last layer (scale 0.70 at every coupling) would
    shrink the first goals onto the central wall (9% free against 28% for uniform goals)."""

    num: int
    hidden: tuple[int, ...]
    dtype: str = "float32"

    def setup(self):
        self.nets = [
            MLP((*self.hidden, 2), nn.leaky_relu, self.dtype) for _ in range(self.num)
        ]

    def __call__(self, k, x_other, f):
        st = self.nets[k](jnp.stack([x_other, f], -1))
        return MIN_SCALE + jax.nn.softplus(st[..., 0]), st[..., 1]  # [3]: scale, not exp(s)

    def init_all(self, x, f):
        return [self(k, x, f) for k in range(self.num)]


def setter_net(cfg: Config):
    return Couplings(cfg.num_blocks * cfg.couplings_per_block, cfg.setter_hidden, cfg.dtype)


def setter_sample(params, z, f, cfg: Config):
    """g = G(z, f) in the unit square [N, 2] and log p(g | f) [N] (change of variables:
    log N(z) - sum_k log scale_k - sum_i log sigma'(y_i)); z [N, 2], f [N]."""
    net = setter_net(cfg)
    y, logp = z, -0.5 * (z**2).sum(-1) - jnp.log(2 * jnp.pi)  # log N(z; 0, I_2)
    for k in range(net.num):
        d = k % 2
        scale, shift = net.apply(params, k, y[..., 1 - d], f)
        y = y.at[..., d].set(y[..., d] * scale + shift)  # [2] affine coupling
        logp = logp - jnp.log(scale)
    g = jax.nn.sigmoid(y)
    logp = logp - (jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y)).sum(-1)  # log sigma'(y)
    return g, logp


def setter_log_prob(params, g, f, cfg: Config):
    """log p(g | f) [N] through the inverse G^-1(g, f) (goals clipped F_EPS from the
    edges, [3]); also returns z = G^-1(g, f)."""
    net = setter_net(cfg)
    g = jnp.clip(g, F_EPS, 1 - F_EPS)
    y = jnp.log(g) - jnp.log1p(-g)  # logit
    logp = -(jax.nn.log_sigmoid(y) + jax.nn.log_sigmoid(-y)).sum(-1)
    for k in reversed(range(net.num)):
        d = k % 2
        scale, shift = net.apply(params, k, y[..., 1 - d], f)
        y = y.at[..., d].set((y[..., d] - shift) / scale)
        logp = logp - jnp.log(scale)
    return logp - 0.5 * (y**2).sum(-1) - jnp.log(2 * jnp.pi), y


def judge_net(cfg: Config):
    net = MLP((*cfg.judge_hidden, 1), nn.relu, cfg.dtype)
    return lambda p, g: net.apply(p, g)[..., 0], net  # the logit D(g), g in the unit square


class GoalPolicy(nn.Module):
    """The solver: Gaussian policy of fixed std over (pos, goal), and a separate value MLP."""

    hidden: tuple[int, ...]
    std: float
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs):
        def mlp(n, scale):
            x = obs
            for h in self.hidden:
                x = nn.tanh(nn.Dense(h, kernel_init=orthogonal(np.sqrt(2)), dtype=self.dtype)(x))
            x = nn.Dense(n, kernel_init=orthogonal(scale), dtype=self.dtype)(x)
            return x.astype(jnp.float32)

        mean, value = mlp(2, 0.01), mlp(1, 1.0)
        return distrax.MultivariateNormalDiag(mean, self.std * jnp.ones(2)), value[..., 0]


def ppo_setup(cfg: Config, sampler):
    """The PPO learner of common.rl on num_envs U-mazes whose goals come from `sampler`."""
    pcfg = rl.ppo_config(cfg, total_timesteps=cfg.num_envs * cfg.num_steps, anneal_lr=False,
                         ent_coef=0.0)
    env = VecEnv(PointUMaze(cfg), cfg.num_envs, sampler)
    net = GoalPolicy(cfg.policy_hidden, cfg.policy_std, cfg.dtype)
    return env, net, make_ppo(env, pcfg, network=net)


# --- LOSS ---


def judge_loss(logits, success):
    """Eq. (1) L_judge: mean binary cross-entropy of sigma(D(g)) against R^g."""
    return optax.sigmoid_binary_cross_entropy(logits, success).mean()


def validity_loss(logp_achieved, achieved):
    """Eq. (2) L_val: mean -log p(g + xi | f) over the achieved goals (mask `achieved`)."""
    return -(achieved * logp_achieved).sum() / jnp.maximum(achieved.sum(), 1.0)


def feasibility_loss(judge_logits, f):
    """Eq. (3) L_feas: mean (D(G(z, f)) - sigma^-1(f))^2."""
    return ((judge_logits - (jnp.log(f) - jnp.log1p(-f))) ** 2).mean()


def coverage_loss(logp_generated):
    """Eq. (4) L_cov: mean log p(G(z, f) | f) (minimised: the setter's entropy goes up)."""
    return logp_generated.mean()


def sample_f(key, n):
    return jax.random.uniform(key, (n,), minval=F_EPS, maxval=1 - F_EPS)  # f ~ U(0, 1)


def loss_weights(teacher, cfg: Config):
    """(w_val, w_feas, w_cov); the broken `no_feasibility` teacher zeroes w_feas."""
    on = (teacher != TEACHERS.index("no_feasibility")).astype(jnp.float32)
    return jnp.array([cfg.w_val, cfg.w_feas * on, cfg.w_cov])


def setter_objective(params, judge_params, goals, achieved, key, w, cfg: Config):
    """w_val L_val + w_feas L_feas + w_cov L_cov and the three terms; the judge is fixed."""
    d_apply, _ = judge_net(cfg)
    k_xi, k_f, k_z, k_f2 = jax.random.split(key, 4)
    n = goals.shape[0]
    xi = jax.random.uniform(k_xi, goals.shape, maxval=cfg.val_noise)
    logp_val, _ = setter_log_prob(params, goals + xi, sample_f(k_f, n), cfg)
    f = sample_f(k_f2, n)
    g, logp = setter_sample(params, jax.random.normal(k_z, (n, 2)), f, cfg)
    terms = (
        validity_loss(logp_val, achieved),
        feasibility_loss(d_apply(jax.lax.stop_gradient(judge_params), g), f),
        coverage_loss(logp),
    )
    return w[0] * terms[0] + w[1] * terms[1] + w[2] * terms[2], terms


def train_setter_judge(setter, judge, goals, success, key, w, cfg: Config):
    """judge_steps Adam steps of L_judge on (goals [N, 2], R^g [N]), then setter_steps of
    the setter's w-weighted losses against the new judge. Returns (setter, judge, (L_judge
    [judge_steps], L_val, L_feas, L_cov [setter_steps]))."""
    d_apply, _ = judge_net(cfg)
    j_opt, s_opt = optax.adam(cfg.judge_lr), optax.adam(cfg.setter_lr)

    def judge_step(carry, _):
        jp, jo = carry
        loss, grads = jax.value_and_grad(lambda p: judge_loss(d_apply(p, goals), success))(jp)
        upd, jo = j_opt.update(grads, jo, jp)
        return (optax.apply_updates(jp, upd), jo), loss

    judge, lj = jax.lax.scan(judge_step, judge, None, cfg.judge_steps)

    def setter_step(carry, k):
        sp, so = carry
        (_, terms), grads = jax.value_and_grad(setter_objective, has_aux=True)(
            sp, judge[0], goals, success, k, w, cfg
        )
        upd, so = s_opt.update(grads, so, sp)
        return (optax.apply_updates(sp, upd), so), terms

    keys = jax.random.split(key, cfg.setter_steps)
    setter, (lv, lf, lc) = jax.lax.scan(setter_step, setter, keys)
    return setter, judge, (lj, lv, lf, lc)


# --- ROLLOUTS ---


def rollout_goals(params, goals, key, cfg: Config):
    """One episode of the solver toward each goal [N, 2] (maze coordinates): reached [N]."""
    env, net = PointUMaze(cfg), GoalPolicy(cfg.policy_hidden, cfg.policy_std, cfg.dtype)
    obs, st = jax.vmap(env.reset)(jax.random.split(key, goals.shape[0]), goals)

    def step(carry, k):
        obs, st, reached = carry
        pi, _ = net.apply(params, obs)
        obs2, st2, _, done, _ = jax.vmap(env.step, (None, 0, 0, 0))(k, st, pi.sample(seed=k), goals)
        keep = reached[:, None]
        st2 = PointState(jnp.where(keep, st.pos, st2.pos), st2.time)
        return (jnp.where(keep, obs, obs2), st2, reached | done), None

    (_, _, reached), _ = jax.lax.scan(
        step, (obs, st, jnp.zeros(goals.shape[0], bool)), jax.random.split(key, cfg.horizon)
    )
    return reached


# --- STATE ---


@struct.dataclass
class State:
    ppo: PPOState
    setter: tuple  # (params, Adam state)
    judge: tuple  # (params, Adam state)
    goals: jax.Array  # [num_goals, 2] the last iteration's goals, unit square
    feas: jax.Array  # [num_goals] the f each was set at
    success: jax.Array  # [num_goals] R^g of their labelling episode
    teacher: jax.Array  # () index into TEACHERS, traced
    key: jax.Array


def to_maze(u, cfg: Config):
    return cfg.lo + cfg.side * u


def init(key, cfg: Config) -> State:
    k_ppo, k_s, k_j, key = jax.random.split(key, 4)
    _, _, (ppo_init, _) = ppo_setup(cfg, lambda k: to_maze(jax.random.uniform(k, (2,)), cfg))
    sp = setter_net(cfg).init(k_s, jnp.zeros(1), jnp.zeros(1), method=Couplings.init_all)
    jp = judge_net(cfg)[1].init(k_j, jnp.zeros((1, 2)))
    s_opt, j_opt = optax.adam(cfg.setter_lr), optax.adam(cfg.judge_lr)
    n = cfg.num_goals
    return State(ppo_init(k_ppo), (sp, s_opt.init(sp)), (jp, j_opt.init(jp)), jnp.zeros((n, 2)),
                 jnp.zeros(n), jnp.zeros(n), jnp.asarray(TEACHERS.index(cfg.teacher)), key)


# --- UPDATE: one outer iteration ---


def update(state: State, cfg: Config):
    key, k_f, k_z, k_uni, k_reset, k_lab, k_s = jax.random.split(state.key, 7)
    n = cfg.num_goals
    uniform = state.teacher == TEACHERS.index("uniform")

    # the setter proposes goals at desired feasibilities f ~ U(0, 1) (uniform: the baseline)
    f = sample_f(k_f, n)
    g, _ = setter_sample(state.setter[0], jax.random.normal(k_z, (n, 2)), f, cfg)
    goals = jnp.where(uniform, jax.random.uniform(k_uni, (n, 2)), g)  # unit square
    maze_goals = to_maze(goals, cfg)

    # the solver: PPO on episodes, each toward one of the goals
    def sampler(k):
        return maze_goals[jax.random.randint(k, (), 0, n)]

    env, _, (_, ppo_update) = ppo_setup(cfg, sampler)
    obs, env_state = env.reset(k_reset)
    ppo = state.ppo.replace(obs=obs, env_state=env_state)
    ppo, ppo_m = jax.lax.scan(lambda s, _: ppo_update(s), ppo, None, cfg.inner_iters)

    # outcomes R^g of one fresh episode per goal, and of the coverage grid
    grid = jnp.asarray(coverage_grid(cfg))
    reached = rollout_goals(ppo.params, jnp.concatenate([maze_goals, grid]), k_lab, cfg)
    success, coverage = reached[:n].astype(jnp.float32), reached[n:].astype(jnp.float32)

    # the judge, then the setter, train on the outcomes
    setter, judge, (lj, lv, lf, lc) = train_setter_judge(
        state.setter, state.judge, goals, success, k_s, loss_weights(state.teacher, cfg), cfg
    )

    hi_f = (f > 0.5).astype(jnp.float32)
    metrics = {
        "charts/coverage": coverage.mean(),
        "charts/goal_success": success.mean(),
        "charts/success_hi_f": (hi_f * success).sum() / jnp.maximum(hi_f.sum(), 1),
        "charts/success_lo_f": ((1 - hi_f) * success).sum() / jnp.maximum((1 - hi_f).sum(), 1),
        "charts/feasible_frac": is_free(maze_goals, cfg).mean(),
        "charts/start_dist": jnp.linalg.norm(maze_goals, axis=-1).mean(),
        "losses/judge": lj.mean(),
        "losses/validity": lv.mean(),
        "losses/feasibility": lf.mean(),
        "losses/coverage": lc.mean(),
        **{k: v.mean() for k, v in ppo_m.items() if k.startswith("losses/")},
    }
    return state.replace(
        ppo=ppo, setter=setter, judge=judge, goals=goals, feas=f, success=success, key=key
    ), metrics


def evaluate(state: State, cfg: Config):
    """coverage: mean success over the grid of feasible goals, fresh rollouts."""
    grid = jnp.asarray(coverage_grid(cfg))
    return {"coverage": rollout_goals(state.ppo.params, grid, jax.random.fold_in(state.key, 1),
                                      cfg).mean()}


# --- PLOT ---


def plot_run(cfg: Config, out, seed=0):
    """Seed `seed` of Setter-Solver, uniform goals and the setter without feasibility (one
    compiled program): coverage against iterations, and the last goals of the setter
    coloured by the f they were set at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    key = jax.random.PRNGKey(seed)
    ids = jnp.arange(len(TEACHERS))
    state = jax.jit(jax.vmap(lambda t: init(key, cfg).replace(teacher=t)))(ids)
    train = jax.jit(
        jax.vmap(lambda s: jax.lax.scan(lambda s, _: update(s, cfg), s, None, cfg.outer_iters))
    )
    state, m = train(state)
    cov = np.asarray(m["charts/coverage"])
    print("final coverage:", dict(zip(TEACHERS, cov[:, -1].round(3), strict=True)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    s = cfg.maze_scaling
    for ax, t in zip(axes[:2], (0, 2), strict=True):
        for i, j in zip(*np.nonzero(U_MAZE), strict=True):
            ax.add_patch(plt.Rectangle(((j - 1.5) * s, (i - 1.5) * s), s, s, color="0.85"))
        g = to_maze(np.asarray(state.goals[t]), cfg)
        sc = ax.scatter(g[:, 0], g[:, 1], c=np.asarray(state.feas[t]), s=8, cmap="viridis",
                        vmin=0, vmax=1)
        ax.plot(0, 0, "r*", ms=10)
        ax.set(xlim=(cfg.lo, cfg.lo + cfg.side), ylim=(cfg.lo, cfg.lo + cfg.side), aspect="equal",
               title=f"{TEACHERS[t]}: last goals by desired f")
    fig.colorbar(sc, ax=axes[1], label="f")
    x = np.arange(1, cov.shape[1] + 1)
    for t, c in zip(range(3), ("C0", "grey", "C3"), strict=True):
        axes[2].plot(x, cov[t], color=c, label=TEACHERS[t])
    axes[2].set(xlabel="outer iteration", ylabel="coverage", ylim=(0, 1))
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.suptitle("Setter-Solver on the point U-maze (start: star; walls grey)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` reruns seed 0 of the three teachers and draws goals and coverage."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["coverage", "charts/coverage", "charts/success_hi_f",
                                              "charts/success_lo_f"])
    if flags["--plot"] is not None:
        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot_run(Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
