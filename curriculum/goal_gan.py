"""Goal GAN: a generator of goals of intermediate difficulty for a goal-conditioned policy.

[1] C. Florensa, D. Held, X. Geng, P. Abbeel. "Automatic Goal Generation for Reinforcement
    Learning Agents." ICML 2018, arXiv:1705.06366. Released code:
    github.com/florensacc/rllab-curriculum (commit 63962e5): `curriculum/gan/gan.py` (the
    LSGAN), `curriculum/state/generator.py` (StateGAN), `curriculum/state/evaluator.py`
    (labels), `curriculum/experiments/goals/maze/maze_gan{,_algo}.py` (the maze runs).
[2] X. Mao et al. "Least Squares Generative Adversarial Networks." ICCV 2017, arXiv:1611.04076.
Equation tags are [1]'s ([M]: numbered from memory of the PDF, not re-read here).

A goal g is reached when the agent comes within terminal_eps of it in T steps; the sparse
return is the success probability, and the policy should cover every feasible goal:

    R^g(pi) = P_pi(exists t in 1..T: ||s_t - g|| < eps)                          (Eq. 1-2)
    GOID_i = {g : R_min <= R^g(pi_i) <= R_max}                                   (Eq. 3)

Goals are labelled y_g = 1[g in GOID] from rollouts of the current policy, and an LSGAN
whose discriminator also learns from the negatives (y_g = 0) generates the next goals:

    L(D) = 1/2 E_{g~data}[y_g (D(g) - b)^2 + (1 - y_g)(D(g) - a)^2]
         + 1/2 E_z[(D(G(z)) - a)^2]                                              (Eq. 5)
    L(G) = 1/2 E_z[(D(G(z)) - c)^2],      a = -1, b = 1, c = 0 ([2]'s)           (Eq. 6)

Each outer iteration (`update`, [1] Algorithm 1): goals = G(z) + noise (num_new_goals) and
num_old_goals from a replay buffer of earlier GOID goals; PPO trains the policy on them
(each episode draws one); they are labelled by fresh rollouts; the GAN trains gan_iters
steps on (goals, y); the GOID goals join the buffer if eps-far from every stored one. The
GAN starts by fitting the states the initial policy visits ([1] Sec. 4.3's initialisation:
goals near the start). Coverage ([1]'s metric) = mean success over a grid of feasible goals.

The environment is [1]'s point-mass U-maze (released `maze_id=0`): cells of maze_scaling
(2), the start in one arm, goals in the box [center - 2.5 s, center + 2.5 s]^2 = [-3, 7]^2
(released goal_range 5 around (2, 2)), of which 28% is free space; goals in walls are
infeasible (released `only_feasible`).

Teachers (traced in the state, one compiled program for all): `goal_gan` ([1]); `uniform`
(goals uniform over the whole box, [1]'s uniform-sampling baseline); `no_negatives` (the
discriminator sees only the GOID goals: plain LSGAN on positives, [1]'s ablation);
`flipped` (broken: y_g = 1 - y_g, the GAN chases the goals outside GOID).

Reproduce:
    python curriculum/goal_gan.py --preset quick --num-seeds 2 --plot curriculum/goal_gan.png
    python curriculum/goal_gan.py --preset quick --num-seeds 2 --teacher uniform
    python curriculum/goal_gan.py --preset paper          # accelerator: [1]'s sizes

Measured (quick: 50-step episodes, 60 outer iterations, 2 seeds; 2-core CPU, loaded,
~100 CPU s compile + run, ~30 s with the cache): final coverage Goal GAN 0.80, 0.86 (GOID
share of its goals 0.20, 0.23); uniform goals 0.70, 0.67 (GOID share 0.02, 0.03). Goal
GAN's lead is early: coverage first above 0.4 at iteration 3, 7 against 28, 21 for
uniform goals, mean coverage over iterations 1-20 0.46, 0.36 against 0.15, 0.25 (the slow
test gates this, with the flipped GAN: 0.40, 0.21 -- it still builds a curriculum of
too-easy goals in one seed). The plot's rerun of seed 0 passes 0.4 at iteration 3 against
~27 and ends level (0.71, 0.71) (curriculum/goal_gan.png).
[1] Fig. 3-4 [M]: Goal GAN reaches higher coverage than uniform sampling in the (Ant) maze,
and about 20% of its goals are in GOID throughout; exact curve values not read here.

Defaults are the released maze run's (maze_gan.py, gan.py DEFAULT_GAN_CONFIGS): generator
(256, 256) ReLU + tanh, discriminator (128, 128) leaky-ReLU 0.1, noise dim 4, RMSProp 1e-3
(TF1's: decay 0.9, eps 1e-10 in the sqrt, accumulator initialised to 1), batch 64, 300 GAN
iterations per outer iteration (one D step, then one G step on the same noise), Xavier
init, goal noise 0.5, 200 new + 100 old goals, buffer distance 0.3, terminal_eps 0.3,
horizon 200 (maze 0), 20000 policy steps x 5 inner iterations, discount 0.99, Gaussian MLP
policy (64, 64) with fixed std 1, 300 outer iterations; [1]'s R_min 0.1, R_max 0.9 and
a, b, c = -1, 1, 0.

Differences from the paper / released code:
- PPO (common.rl.make_ppo, clipped, GAE 0.95, Adam 3e-4) in place of TRPO (step 0.01) with
  a linear-feature baseline; the critic is an MLP. The policy's std stays fixed (1.0) as the
  released `learn_std=False`.
- A kinematic point (pos += max_step * clip(a, -1, 1), a move into a wall is undone as the
  released MANUAL_COLLISION) instead of MuJoCo's point mass; observations (pos, goal) are
  scaled to [-1, 1]. The Ant mazes (brax ant) are not implemented: the paper preset traces
  the point U-maze at [1]'s sizes.
- Labels come from label_episodes (2, released n_traj) fresh rollouts per goal after the
  policy update, as [1] Algorithm 1's evaluate_policy; the released maze code reuses the
  training paths (mean over all episodes of a goal, with R_min 0 < R < 1 = R_max).
- The released code's generator loss uses c = 1 (tf.square(D(G(z)) - 1)); [1] states c = 0
  ([2]'s a, b, c): the default follows [1] (lsgan_c). Generated goals are
  center + range * tanh(.) (released: center + 2 range tanh, then clipped after the noise).
- Real minibatches are random draws of the labelled goals (released: cycled in order);
  old goals are drawn with replacement (released: without); the buffer is a ring of
  buffer_size goals (released: unbounded) and gets no on-policy states (released
  `add_on_policy`); before the buffer holds a goal the old share is generated too (G(z) +
  noise, clipped, as the new goals).
- outer_iters outer iterations run; the released maze loop runs outer_iters - 1 of them.
- The GAN's initialisation fits the positions of one batch of num_envs episodes of the
  initial policy toward uniform goals (released: 10000 such states).
- The GAN of the `uniform` teacher still trains (one program for all teachers); its goals
  are not used.
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

TEACHERS = ("goal_gan", "uniform", "no_negatives", "flipped")
"""[1]'s Goal GAN, uniform goals (baseline), the GAN without negatives, the broken one."""

U_MAZE = np.array([[1, 1, 1, 1, 1],
                   [1, 0, 0, 0, 1],  # the start (released 'r') is cell (1, 1)
                   [1, 1, 1, 0, 1],
                   [1, 0, 0, 0, 1],
                   [1, 1, 1, 1, 1]])
"""The released maze_id 0 (1 = wall); row i is y, column j is x."""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Goal GAN on the point U-maze; defaults are [1]'s and its released maze run's."""

    teacher: str = "goal_gan"
    """goal_gan ([1]) | uniform (goals uniform over the box) | no_negatives (LSGAN on the
    GOID goals only) | flipped (broken: labels 1 - y_g)"""
    maze_scaling: float = 2.0
    """side of one maze cell (released maze_size_scaling)"""
    horizon: int = 200
    """T: steps per episode (released maze 0)"""
    max_step: float = 0.2
    """displacement of the point per step at |action| = 1 per coordinate"""
    terminal_eps: float = 0.3
    """a goal is reached within this distance (the episode then ends)"""
    r_min: float = 0.1
    """R_min: lowest success rate of a goal of intermediate difficulty (Eq. 3)"""
    r_max: float = 0.9
    """R_max: highest success rate of a goal of intermediate difficulty (Eq. 3)"""
    label_episodes: int = 2
    """rollouts per goal that estimate its success rate (labels and coverage)"""
    num_new_goals: int = 200
    """goals generated by G per outer iteration"""
    num_old_goals: int = 100
    """goals replayed from the buffer per outer iteration"""
    buffer_size: int = 4096
    """capacity of the ring of earlier GOID goals"""
    buffer_eps: float = 0.3
    """a GOID goal joins the buffer only if farther than this from every stored goal"""
    goal_noise: float = 0.5
    """std of the Gaussian noise added to generated goals (then clipped to the box)"""
    noise_dim: int = 4
    """dimension of the generator's input noise z ~ N(0, I)"""
    gen_hidden: tuple[int, ...] = (256, 256)
    """generator hidden layers (ReLU, tanh output)"""
    disc_hidden: tuple[int, ...] = (128, 128)
    """discriminator hidden layers (leaky ReLU 0.1, linear output)"""
    gan_lr: float = 1e-3
    """RMSProp learning rate of G and D"""
    gan_batch: int = 64
    """real and generated goals per GAN step (each)"""
    gan_iters: int = 300
    """GAN steps (one D, one G) per outer iteration and at initialisation"""
    lsgan_a: float = -1.0
    """a: the discriminator's target for generated goals and negatives (Eq. 5)"""
    lsgan_b: float = 1.0
    """b: the discriminator's target for positive (GOID) goals (Eq. 5)"""
    lsgan_c: float = 0.0
    """c: the value the generator wants D to give its goals (Eq. 6; released code: 1)"""
    num_envs: int = 100
    """parallel episodes of the policy update"""
    num_steps: int = 200
    """steps per env per PPO iteration (num_envs * num_steps = released batch 20000)"""
    inner_iters: int = 5
    """policy iterations per outer iteration"""
    lr: float = 3e-4
    """PPO Adam learning rate"""
    num_epochs: int = 10
    """PPO epochs per policy iteration"""
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
    """global gradient-norm clip of the policy update"""
    policy_hidden: tuple[int, ...] = (64, 64)
    """hidden layers of the policy and value MLPs (tanh)"""
    policy_std: float = 1.0
    """fixed std of the Gaussian policy (released learn_std False, init_std 1)"""
    coverage_res: int = 2
    """coverage grid points per unit length (released sampling_res)"""
    outer_iters: int = 300
    """outer iterations (released outer_iters)"""
    dtype: str = "float32"
    """compute dtype of the dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.outer_iters

    @property
    def steps_per_update(self) -> int:  # policy-training steps (labels, coverage not counted)
        return self.inner_iters * self.num_envs * self.num_steps

    @property
    def num_goals(self) -> int:
        return self.num_new_goals + self.num_old_goals

    @property
    def center(self) -> float:  # of the goal box, both coordinates (released (2, 2))
        return self.maze_scaling

    @property
    def goal_range(self) -> float:  # half-side of the goal box (released 5)
        return 2.5 * self.maze_scaling

    def validate(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r} must be one of {TEACHERS}")
        if not 0 <= self.r_min <= self.r_max <= 1:
            raise ValueError(f"r_min={self.r_min}, r_max={self.r_max}: need 0 <= r_min <= r_max"
                             " <= 1")
        for name in ("maze_scaling", "max_step", "terminal_eps", "gan_lr", "policy_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("buffer_eps", "goal_noise", "clip_coef", "vf_coef", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("horizon", "label_episodes", "noise_dim", "gan_iters", "inner_iters",
                     "num_epochs", "num_minibatches", "coverage_res", "outer_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("gen_hidden", "disc_hidden", "policy_hidden"):
            if min(getattr(self, name), default=0) < 1:
                raise ValueError(f"{name}={getattr(self, name)} needs layers of >= 1 unit")
        if self.lsgan_a == self.lsgan_b:
            raise ValueError(f"lsgan_a={self.lsgan_a} must differ from lsgan_b={self.lsgan_b}")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.num_envs * self.num_steps} is not "
                             f"divisible by num_minibatches={self.num_minibatches}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    "quick": dict(horizon=50, max_step=0.4, num_envs=32, num_steps=50, num_minibatches=8,
                  num_epochs=4, inner_iters=4, num_new_goals=100, num_old_goals=50,
                  gen_hidden=(64, 64), disc_hidden=(64, 64), gan_iters=200, lr=1e-3,
                  outer_iters=60),
    "paper": dict(),
}

# --- ENV: the point-mass U-maze; each episode's goal is its params ---


def is_free(pos, cfg: Config):
    """pos [..., 2] lies in a free cell (released is_feasible: |pos - cell centre| < s/2);
    cell (i, j) is centred at ((j - 1) s, (i - 1) s), the start cell at the origin."""
    s = cfg.maze_scaling
    j = jnp.floor(pos[..., 0] / s + 0.5).astype(jnp.int32) + 1
    i = jnp.floor(pos[..., 1] / s + 0.5).astype(jnp.int32) + 1
    inside = (i >= 0) & (i < U_MAZE.shape[0]) & (j >= 0) & (j < U_MAZE.shape[1])
    return inside & (jnp.asarray(U_MAZE)[jnp.clip(i, 0, 4), jnp.clip(j, 0, 4)] == 0)


def goal_reached(pos, goal, cfg: Config):
    """Success: within terminal_eps of a feasible goal (released only_feasible)."""
    return (jnp.linalg.norm(pos - goal, axis=-1) < cfg.terminal_eps) & is_free(goal, cfg)


@struct.dataclass
class PointState:
    pos: jax.Array  # [2]
    time: jax.Array  # () int32


class PointUMaze(Env):
    """Kinematic point in the U-maze; params = the episode's goal [2]; reward 1 and
    termination on reaching it, truncation after `horizon` steps."""

    num_actions = None
    action_shape = (2,)
    observation_shape = (4,)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def default_params(self):
        return np.zeros(2, np.float32)

    def obs(self, pos, goal):
        c = self.cfg
        return (jnp.concatenate([pos, goal], -1) - c.center) / c.goal_range

    def reset(self, key, goal):
        pos = jnp.zeros(2)
        return self.obs(pos, goal), PointState(pos, jnp.zeros((), jnp.int32))

    def step(self, key, state, action, goal):
        c = self.cfg
        new = state.pos + c.max_step * jnp.clip(action, -1.0, 1.0)
        pos = jnp.where(is_free(new, c), new, state.pos)  # a move into a wall is undone
        done = goal_reached(pos, goal, c)
        time = state.time + 1
        return (self.obs(pos, goal), PointState(pos, time), done.astype(jnp.float32), done,
                (time >= c.horizon) & ~done)


@functools.cache
def coverage_grid(cfg: Config) -> np.ndarray:
    """The feasible goals of a grid of spacing 1 / coverage_res over the box [G, 2]."""
    h = 0.5 / cfg.coverage_res
    ax = np.arange(cfg.center - cfg.goal_range + h, cfg.center + cfg.goal_range, 2 * h)
    g = np.stack(np.meshgrid(ax, ax), -1).reshape(-1, 2).astype(np.float32)
    j, i = (np.floor(g / cfg.maze_scaling + 0.5).astype(int) + 1).T  # as is_free
    return g[U_MAZE[i, j] == 0]  # the box lies within the maze's outer walls


# --- NETWORKS ---


class Dense(nn.Module):
    """Dense layers with an activation after each but the last."""

    features: tuple[int, ...]
    activation: callable
    kernel_init: callable
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, kernel_init=self.kernel_init, dtype=self.dtype)(x)
            x = self.activation(x) if i < len(self.features) - 1 else x
        return x.astype(jnp.float32)


def generator(cfg: Config):
    """G(z) in [-1, 1]^2 (the box, normalised): ReLU layers, tanh output, Xavier init."""
    net = Dense((*cfg.gen_hidden, 2), nn.relu, nn.initializers.xavier_uniform(), cfg.dtype)
    return lambda p, z: jnp.tanh(net.apply(p, z)), net


def discriminator(cfg: Config):
    """D(g): leaky-ReLU (0.1) layers, one linear output, Xavier init."""
    net = Dense((*cfg.disc_hidden, 1), lambda x: nn.leaky_relu(x, 0.1),
                nn.initializers.xavier_uniform(), cfg.dtype)
    return lambda p, g: net.apply(p, g)[..., 0], net


class GoalPolicy(nn.Module):
    """Gaussian policy of fixed std over (pos, goal), and a separate value MLP."""

    hidden: tuple[int, ...]
    std: float
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs):
        tanh = functools.partial(Dense, activation=nn.tanh, dtype=self.dtype)
        mean = tanh((*self.hidden, 2), kernel_init=orthogonal(0.01))(obs)  # last layer 0.01
        value = tanh((*self.hidden, 1), kernel_init=orthogonal(1.0))(obs)
        return distrax.MultivariateNormalDiag(mean, self.std * jnp.ones(2)), value[..., 0]


def ppo_setup(cfg: Config, sampler):
    """The PPO learner of common.rl on num_envs U-mazes whose goals come from `sampler`."""
    pcfg = rl.ppo_config(cfg, total_timesteps=cfg.num_envs * cfg.num_steps, anneal_lr=False,
                         ent_coef=0.0)
    env = VecEnv(PointUMaze(cfg), cfg.num_envs, sampler)
    net = GoalPolicy(cfg.policy_hidden, cfg.policy_std, cfg.dtype)
    return env, net, make_ppo(env, pcfg, network=net)


# --- LOSS: Eq. 5-6 ---


def goid_labels(success, r_min, r_max):
    """Eq. 3: y_g = 1[R_min <= R^g <= R_max]."""
    return ((success >= r_min) & (success <= r_max)).astype(jnp.float32)


def discriminator_loss(d_real, y, d_fake, a, b, negatives=True):
    """Eq. 5: 1/2 mean_real[y (D - b)^2 + (1 - y)(D - a)^2] + 1/2 mean_fake[(D - a)^2].
    Without negatives the real term averages (D - b)^2 over the positives only."""
    real = y * (d_real - b) ** 2 + (1 - y) * (d_real - a) ** 2
    real_pos = (y * (d_real - b) ** 2).sum() / jnp.maximum(y.sum(), 1.0)
    return 0.5 * jnp.where(negatives, real.mean(), real_pos) + 0.5 * ((d_fake - a) ** 2).mean()


def generator_loss(d_fake, c):
    """Eq. 6: 1/2 mean[(D(G(z)) - c)^2]."""
    return 0.5 * ((d_fake - c) ** 2).mean()


def gan_optimizer(cfg: Config):
    """TF1's RMSProp (decay 0.9, eps 1e-10 inside the sqrt, mean square initialised to 1)."""
    return optax.rmsprop(cfg.gan_lr, decay=0.9, eps=1e-10, initial_scale=1.0)


def train_gan(gan, key, x, y, negatives, cfg: Config):
    """gan_iters steps on labelled goals x [N, 2] (normalised), y [N]: each a D step on a
    random real batch and a generated batch, then a G step on the same noise.
    gan = (g_params, d_params, g_opt, d_opt). Returns (gan, (d losses, g losses))."""
    g_apply, _ = generator(cfg)
    d_apply, _ = discriminator(cfg)
    opt, n = gan_optimizer(cfg), cfg.gan_batch

    def step(gan, k):
        gp, dp, go, do = gan
        k_idx, k_z = jax.random.split(k)
        idx = jax.random.randint(k_idx, (n,), 0, x.shape[0])
        z = jax.random.normal(k_z, (n, cfg.noise_dim))
        fake = g_apply(gp, z)

        def d_loss(dp):
            return discriminator_loss(d_apply(dp, x[idx]), y[idx], d_apply(dp, fake),
                                      cfg.lsgan_a, cfg.lsgan_b, negatives)

        ld, grads = jax.value_and_grad(d_loss)(dp)
        upd, do = opt.update(grads, do, dp)
        dp = optax.apply_updates(dp, upd)
        lg, grads = jax.value_and_grad(
            lambda gp: generator_loss(d_apply(dp, g_apply(gp, z)), cfg.lsgan_c))(gp)
        upd, go = opt.update(grads, go, gp)
        return (optax.apply_updates(gp, upd), dp, go, do), (ld, lg)

    return jax.lax.scan(step, gan, jax.random.split(key, cfg.gan_iters))


# --- ROLLOUTS: success rates and visited states ---


def rollout_goals(params, goals, key, cfg: Config):
    """One episode of the policy toward each goal [N, 2] from the start: (reached [N] bool,
    positions [T, N, 2]). A reached episode stops (its point stays)."""
    env, net = PointUMaze(cfg), GoalPolicy(cfg.policy_hidden, cfg.policy_std, cfg.dtype)
    obs, st = jax.vmap(env.reset)(jax.random.split(key, goals.shape[0]), goals)

    def step(carry, k):
        obs, st, reached = carry
        pi, _ = net.apply(params, obs)
        obs2, st2, _, done, _ = jax.vmap(env.step, (None, 0, 0, 0))(k, st, pi.sample(seed=k),
                                                                  goals)
        keep = reached[:, None]
        st2 = PointState(jnp.where(keep, st.pos, st2.pos), st2.time)
        return (jnp.where(keep, obs, obs2), st2, reached | done), st2.pos

    (_, _, reached), pos = jax.lax.scan(
        step, (obs, st, jnp.zeros(goals.shape[0], bool)), jax.random.split(key, cfg.horizon))
    return reached, pos


def success_rate(params, goals, key, cfg: Config):
    """R^g(pi) estimated by label_episodes rollouts per goal [N] (Eq. 1-2)."""
    n = cfg.label_episodes
    reached, _ = rollout_goals(params, jnp.repeat(goals, n, 0), key, cfg)
    return reached.reshape(-1, n).mean(-1)


# --- STATE ---


@struct.dataclass
class State:
    ppo: PPOState
    gan: tuple  # (g_params, d_params, g_opt_state, d_opt_state)
    buffer: jax.Array  # [B, 2] ring of earlier GOID goals
    buffer_count: jax.Array  # () goals ever stored
    goals: jax.Array  # [num_goals, 2] the last iteration's goals (the first num_new generated)
    success: jax.Array  # [num_goals] their estimated success rates
    teacher: jax.Array  # () index into TEACHERS, traced
    key: jax.Array


def uniform_goals(key, n, cfg: Config):
    lo, hi = cfg.center - cfg.goal_range, cfg.center + cfg.goal_range
    return jax.random.uniform(key, (n, 2), minval=lo, maxval=hi)


def init(key, cfg: Config) -> State:
    """Policy and GAN at random; the GAN then fits the positions of num_envs episodes of the
    initial policy toward uniform goals, all labelled positive ([1] Sec. 4.3)."""
    k_ppo, k_g, k_d, k_goals, k_roll, k_gan, key = jax.random.split(key, 7)
    _, _, (ppo_init, _) = ppo_setup(cfg, lambda k: uniform_goals(k, 1, cfg)[0])
    ppo = ppo_init(k_ppo)
    _, g_net = generator(cfg)
    _, d_net = discriminator(cfg)
    gp = g_net.init(k_g, jnp.zeros((1, cfg.noise_dim)))
    dp = d_net.init(k_d, jnp.zeros((1, 2)))
    opt = gan_optimizer(cfg)
    gan = (gp, dp, opt.init(gp), opt.init(dp))
    _, pos = rollout_goals(policy_params(ppo), uniform_goals(k_goals, cfg.num_envs, cfg),
                           k_roll, cfg)
    x = (pos.reshape(-1, 2) - cfg.center) / cfg.goal_range
    gan, _ = train_gan(gan, k_gan, x, jnp.ones(x.shape[0]), True, cfg)
    g0 = jnp.zeros((cfg.num_goals, 2))
    return State(ppo, gan, jnp.zeros((cfg.buffer_size, 2)), jnp.zeros((), jnp.int32), g0,
                 jnp.zeros(cfg.num_goals), jnp.asarray(TEACHERS.index(cfg.teacher)), key)


def policy_params(ppo: PPOState):
    return ppo.params


def buffer_add(buffer, count, goals, keep, eps):
    """Appends goals [N, 2] where keep [N], one by one, each only if farther than eps from
    every stored goal (released StateCollection); the ring overwrites the oldest."""
    size = buffer.shape[0]

    def add(carry, gk):
        buffer, count = carry
        g, k = gk
        valid = jnp.arange(size) < jnp.minimum(count, size)
        d = jnp.where(valid, jnp.linalg.norm(buffer - g, axis=-1), jnp.inf).min()
        ok = k & (d > eps)
        buffer = jnp.where(ok, buffer.at[count % size].set(g), buffer)
        return (buffer, count + ok), None

    (buffer, count), _ = jax.lax.scan(add, (buffer, count), (goals, keep))
    return buffer, count


# --- UPDATE: one outer iteration of [1] Algorithm 1 ---


def update(state: State, cfg: Config):
    key, k_z, k_noise, k_old, k_extra, k_uni, k_reset, k_lab, k_gan = jax.random.split(
        state.key, 9)
    g_apply, _ = generator(cfg)
    lo, hi = cfg.center - cfg.goal_range, cfg.center + cfg.goal_range
    uniform = state.teacher == TEACHERS.index("uniform")

    # goals: G(z) + noise, clipped to the box, and old GOID goals from the buffer (while it
    # is empty, the old share is generated the same way: G(z) + noise, clipped)
    def generate(k_z, k_noise, n):
        z = jax.random.normal(k_z, (n, cfg.noise_dim))
        g = cfg.center + cfg.goal_range * g_apply(state.gan[0], z)
        return jnp.clip(g + cfg.goal_noise * jax.random.normal(k_noise, g.shape), lo, hi)

    new = generate(k_z, k_noise, cfg.num_new_goals)
    stored = jnp.minimum(state.buffer_count, cfg.buffer_size)
    old = state.buffer[jax.random.randint(k_old, (cfg.num_old_goals,), 0, jnp.maximum(stored, 1))]
    old = jnp.where(stored > 0, old, generate(*jax.random.split(k_extra), cfg.num_old_goals))
    goals = jnp.where(uniform, uniform_goals(k_uni, cfg.num_goals, cfg),
                      jnp.concatenate([new, old]))  # [num_goals, 2]

    # train the policy: each episode draws one of the goals (a fresh uniform one: baseline)
    def sampler(k):
        k_i, k_u = jax.random.split(k)
        g = goals[jax.random.randint(k_i, (), 0, cfg.num_goals)]
        return jnp.where(uniform, uniform_goals(k_u, 1, cfg)[0], g)

    env, _, (_, ppo_update) = ppo_setup(cfg, sampler)
    obs, env_state = env.reset(k_reset)
    ppo, ppo_m = jax.lax.scan(lambda s, _: ppo_update(s), state.ppo.replace(
        obs=obs, env_state=env_state), None, cfg.inner_iters)

    # label the goals by fresh rollouts of the updated policy (Eq. 3), and the coverage grid
    grid = jnp.asarray(coverage_grid(cfg))
    success = success_rate(policy_params(ppo), jnp.concatenate([goals, grid]), k_lab, cfg)
    success, coverage = success[:cfg.num_goals], success[cfg.num_goals:]
    y = goid_labels(success, cfg.r_min, cfg.r_max)
    y_gan = jnp.where(state.teacher == TEACHERS.index("flipped"), 1.0 - y, y)

    # train the GAN on (goals, labels) (Eq. 5-6); GOID goals join the buffer
    negatives = state.teacher != TEACHERS.index("no_negatives")
    gan, (ld, lg) = train_gan(state.gan, k_gan, (goals - cfg.center) / cfg.goal_range, y_gan,
                              negatives, cfg)
    buffer, count = buffer_add(state.buffer, state.buffer_count, goals, y_gan > 0.5,
                               cfg.buffer_eps)

    metrics = {"charts/coverage": coverage.mean(),
               "charts/goid_frac": y.mean(),
               "charts/goid_frac_new": y[:cfg.num_new_goals].mean(),
               "charts/goal_success": success.mean(),
               "charts/feasible_frac_new": is_free(goals[:cfg.num_new_goals], cfg).mean(),
               "charts/start_dist_new": jnp.linalg.norm(goals[:cfg.num_new_goals], axis=-1
                                                        ).mean(),
               "charts/buffer_size": jnp.minimum(count, cfg.buffer_size).astype(jnp.float32),
               "losses/discriminator": ld.mean(), "losses/generator": lg.mean(),
               **{k: v.mean() for k, v in ppo_m.items() if k.startswith("losses/")}}
    new_state = state.replace(ppo=ppo, gan=gan, buffer=buffer, buffer_count=count, goals=goals,
                              success=success, key=key)
    return new_state, metrics


def evaluate(state: State, cfg: Config):
    """coverage: mean success over the grid of feasible goals ([1]'s metric), fresh
    rollouts; goid_frac_new: share of the last generated goals that were in GOID."""
    key = jax.random.fold_in(state.key, 1)
    cov = success_rate(policy_params(state.ppo), jnp.asarray(coverage_grid(cfg)), key, cfg)
    y = goid_labels(state.success, cfg.r_min, cfg.r_max)
    return {"coverage": cov.mean(), "goid_frac_new": y[:cfg.num_new_goals].mean()}


# --- PLOT ---


def plot_run(cfg: Config, out, seed=0, snapshots=4):
    """[1] Fig. 2's view: the goals of a few iterations over the maze, coloured by their
    label (GOID, too easy, too hard), for Goal GAN; and coverage against iterations for
    Goal GAN and uniform sampling (seed `seed` of each, one compiled program)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    seg = cfg.num_updates // snapshots
    key = jax.random.split(jax.random.PRNGKey(seed), 1)[0]
    ids = jnp.array([TEACHERS.index("goal_gan"), TEACHERS.index("uniform")])
    state = jax.jit(jax.vmap(lambda t: init(key, cfg).replace(teacher=t)))(ids)
    chunk = jax.jit(jax.vmap(lambda s: jax.lax.scan(lambda s, _: update(s, cfg), s, None, seg)))
    snaps, cov = [], []
    for _ in range(snapshots):
        state, m = chunk(state)
        snaps.append(jax.device_get((state.goals[0], state.success[0])))
        cov.append(np.asarray(m["charts/coverage"]))
    cov = np.concatenate(cov, 1)
    print(f"coverage at the end: Goal GAN {cov[0, -1]:.3f}, uniform {cov[1, -1]:.3f}")
    fig, axes = plt.subplots(1, snapshots + 1, figsize=(4 * snapshots + 5, 4))
    lo, hi, s = cfg.center - cfg.goal_range, cfg.center + cfg.goal_range, cfg.maze_scaling
    for t, (ax, (g, r)) in enumerate(zip(axes, snaps, strict=False)):
        for i, j in zip(*np.nonzero(U_MAZE), strict=True):
            ax.add_patch(plt.Rectangle(((j - 1.5) * s, (i - 1.5) * s), s, s, color="0.8"))
        g = g[:cfg.num_new_goals]
        r = r[:cfg.num_new_goals]
        for mask, c, lab in ((r < cfg.r_min, "C3", "too hard"), (r > cfg.r_max, "C0", "too easy"),
                             ((r >= cfg.r_min) & (r <= cfg.r_max), "C2", "GOID")):
            ax.scatter(g[mask, 0], g[mask, 1], s=6, color=c, label=lab)
        ax.plot(0, 0, "k*", ms=10)
        ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal",
               title=f"iteration {(t + 1) * seg}: {cov[0, (t + 1) * seg - 1]:.2f} coverage")
    axes[0].legend(loc="upper right", fontsize=7)
    x = np.arange(1, cov.shape[1] + 1)
    axes[-1].plot(x, cov[0], color="C0", label="Goal GAN")
    axes[-1].plot(x, cov[1], color="grey", label="uniform goals")
    axes[-1].set(xlabel="outer iteration", ylabel="coverage", ylim=(0, 1))
    axes[-1].legend()
    axes[-1].grid(alpha=0.3)
    fig.suptitle("Goal GAN on the point U-maze (start: star; dots: the generated goals of an "
                 "iteration by their label; walls grey)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) reruns seed 0 of Goal GAN and of uniform
    sampling and draws the generated goals and the coverage curves."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["coverage", "goid_frac_new",
                                              "charts/goid_frac_new", "charts/coverage"])
    if flags["--plot"] is not None:
        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot_run(Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
