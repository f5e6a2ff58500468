"""EPG: Evolved Policy Gradients, a loss function evolved so that agents trained on it learn fast.

[1] R. Houthooft, R. Y. Chen, P. Isola, B. C. Stadie, F. Wolski, J. Ho, P. Abbeel. "Evolved
    Policy Gradients." NeurIPS 2018, arXiv:1802.04821.
[2] openai/EPG (the authors' chainer + MPI code, read only): epg/losses.py Conv1DLoss,
    epg/agents.py, epg/evolution.py, epg/rollout.py, epg/launch_local.py, epg/utils.py.
Post: L. Weng, "Meta Reinforcement Learning" (2019), "Meta-learning the Loss Function".

Two loops ([1] Alg. 1):
  inner (one agent's lifetime, a task sampled per lifetime): every `inner_opt_freq` steps the
    newest transitions join a buffer of the last M = `buffer_size`, and the policy takes
    `inner_opt_freq / inner_batch_size` minibatch steps on
      L_hat = (1 - alpha) L_phi(pi_theta, tau_{t-M..t}) + alpha L_pg          ([1] Sec. 3.2)
      theta <- theta - alpha_in grad_theta L_hat   (Adam in [2]; `inner_optimizer`)
    L_pg = -mean_t Psi_t log pi_theta(a_t|s_t), Psi_t the normalised discounted return-to-go
    (REINFORCE; [2] bootstraps with PPO). alpha anneals 1 -> 0 linearly over the first
    `alpha_anneal_frac` of the generations ([2] evolution.py PiecewiseSchedule, G / 8).
  L_phi ([2] losses.py Conv1DLoss): the buffer's per-step features x_t = (s, a, r, done, t/H,
    mu_theta(s), log sigma_theta) as channels; Conv1D(k 6, stride 5, 16) -> leaky ReLU ->
    Conv1D(k 4, stride 2, 32) -> leaky ReLU -> mean over time -> Dense(32) = context c, tiled;
    per step Dense(16)([x_t, c]) -> leaky ReLU -> Dense(1); L_phi = mean over the minibatch.
    The policy outputs are computed with the current theta, so grad_theta flows through them.
  outer (NES over phi, [1] Eq. 2 with [2]'s shaping): N members phi + sigma eps_i, eps
    antithetic (eps_{i+N/2} = -eps_i), fitness F_i = mean return of `final_episodes` episodes
    of the lifetime's final policy ([2] rollout.py ep_final_rew, utils.ret_to_obj);
      g = (1/N) sum_i w_i eps_i - l2 phi,  w = centred ranks of F in [-0.5, 0.5]
      phi <- phi + Adam(beta1 = 0)(g), outer lr linear lr -> 0.1 lr over the first half of
      the generations, then 0.1 lr   ([2] PiecewiseSchedule, linear interpolation)
  test time: phi fixed, alpha = 0, only theta learns.
JAX: the inner loop (epochs of env steps + minibatch steps) is one lax.scan, the population
one vmap over eps_i, one jitted `update` = one ES generation plus `eval_agents` fresh
lifetimes under the new phi (alpha = 0); seeds vmap on top.

Env of the CPU demo (`env_id=point`): the catalogue's 1-D "go left or right" family. A point
at x_0 = 0 takes actions a (clipped to [-1, 1]), x <- x + 0.1 a, reward g * a with the goal
side g = +-1 drawn per lifetime and not observed (obs: x, t / H). Episode return in [-H, H].
`paper` preset (the defaults): [2] launch_local.py on brax hopper with a direction (DirHopper:
r = d x brax's forward reward dx/dt, no healthy bonus or control cost, as [2]), traced only.

Reproduce (CPU): python metarl/epg.py --preset quick --num-seeds 2 --plot metarl/epg.png
Ours (quick preset: 16-step episodes, returns in [-16, 16]; 16 members x 2 lifetimes (g, -g)
of 24 x 32 steps; alpha 1 -> 0 over generations 0-50; 200 generations; 2 seeds, loaded 2-core
CPU, 98 s compiling + 81 s): return of 8 fresh agents trained with alpha = 0 on the
generation's L_phi, per seed, generations 1-5 (~ generation 0's loss) 2.2 / -0.6, 50-100
2.8 / 4.5, 180-200 11.9 / 7.6 (mean 9.8). REINFORCE alone (the population at alpha = 1,
generations 1-5) scores 15.1: at this scale the evolved loss beats generation 0 and the
flipped ES (tests) but NOT the plain policy gradient it anneals away from; the population's
fitness falls from 15 to ~1 as alpha reaches 0 and recovers only to ~5. Plot: metarl/epg.png.

Differences from the paper:
- L_pg is REINFORCE with a normalised return-to-go, not [2]'s PPO with a value net and GAE;
  returns are cut at the end of each `inner_opt_freq` batch (no bootstrap). (common/rl.py's
  gae, ppo_loss and RunningMeanStd would give [2]'s bootstrap; not done.)
- No running observation normaliser, no hashing exploration bonus input, no learned memory
  vector ([2] mem=False still feeds an untrained one); a t/H time input is added ([2] has
  none). Antithetic noise whose pairs share the lifetime's task and keys ([2]: plain
  Gaussian noise, NUM_EQUAL_NOISE_VECTORS = 1). The ES gradient is not divided by sigma
  ([2] neither).
- `tasks_per_member` (ours; the quick preset's 2: each member lives on g and on -g, so a loss
  that always pushes one way scores 0) cuts the fitness noise; the paper preset keeps [2]'s 1.
  The fresh agents of the metric alternate the task sign.
- DirHopper is brax hopper (its own termination) with r = d x forward reward, d = +-1 drawn
  per lifetime; [2]'s mujoco-py DirHopper draws `[-1, 1][randint(0, 1)]`, always -1.
  RandomHopper and GoalAnt are not built.
- L_phi's minibatch rows are the newest `inner_opt_freq` rows of the buffer (those L_pg sees);
  [2] agents.py indexes `traj[idx]`, idx < inner_opt_freq, in a front-padded buffer, i.e. the
  OLDEST rows (zeros for the first 7 epochs); its reward column assignment would fail on a
  partly filled buffer, so we read that as unintended.
- [2] skips an inner step whose gradient is NaN; ours has no such guard.
- The metric: fresh agents trained under the generation's phi at alpha_eval = 0 (the paper's
  test-time setting), scored by the final policy; [2]'s periodic test uses the annealed
  ppo_factor and the last 3 training episodes.
"""

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from common import run
from common.blackbox import centered_ranks, episode

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """EPG (Houthooft et al. 2018): an evolved conv loss trains fresh policies."""

    env_id: str = "brax/hopper"
    """point (the 1-D left/right CPU task) or brax/hopper, brax/ant with a direction ([2])"""
    episode_steps: int = 1000
    """H, steps per episode ([2]: TimeLimit 1000)"""
    num_generations: int = 2000
    """ES generations ([2] outer_n_epoch)"""
    pop_size: int = 8
    """N, ES members per generation, antithetic pairs ([2] outer_n_samples_per_ep)"""
    sigma: float = 0.01
    """ES noise std ([2] outer_std)"""
    outer_lr: float = 1e-2
    """Adam (beta1 = 0) step size of the ES update ([2] outer_learning_rate)"""
    outer_lr_decay: float = 0.1
    """the outer lr goes linearly to this x outer_lr at half the generations, then holds ([2])"""
    l2_coef: float = 0.001
    """L2 penalty on phi in the ES gradient ([2] outer_l2)"""
    inner_opt_freq: int = 64
    """env steps between policy updates ([2] inner_opt_freq)"""
    num_inner_epochs: int = 128
    """policy updates per lifetime of this x inner_opt_freq steps ([2] inner_max_n_epoch)"""
    buffer_size: int = 512
    """M, transitions the temporal conv slides over ([2]: 8 x inner_opt_freq)"""
    inner_batch_size: int = 32
    """minibatch of the inner steps ([2] inner_opt_batch_size)"""
    inner_lr: float = 1e-3
    """alpha_in, inner step size ([2] inner_lr)"""
    inner_optimizer: str = "adam"
    """adam ([2]) or sgd (the post's theta <- theta - alpha_in grad L)"""
    alpha_anneal_frac: float = 0.125
    """alpha (weight of L_pg) goes 1 -> 0 over this fraction of the generations ([2]: 1/8)"""
    alpha_eval: float = 0.0
    """alpha of the fresh agents evaluated every generation (test time: 0)"""
    gamma: float = 0.99
    """discount of the REINFORCE return-to-go"""
    hidden: tuple[int, ...] = (64, 64)
    """policy MLP hidden sizes, tanh ([2]: 64, 64)"""
    tasks_per_member: int = 1
    """lifetimes per ES member, on tasks g, -g, g, ...; fitness = their mean ([2]: 1)"""
    final_episodes: int = 3
    """episodes of the final policy whose mean return is the fitness ([2]: 3)"""
    eval_agents: int = 8
    """fresh agents trained under the current phi each generation (metric only)"""
    ascent: bool = True
    """False flips the ES update (the broken variant of the tests)"""
    dtype: str = "float32"
    """compute dtype of the policy and the loss net: float32 or bfloat16"""

    @property
    def num_updates(self) -> int:
        return self.num_generations

    @property
    def lifetime_steps(self) -> int:
        return self.num_inner_epochs * self.inner_opt_freq

    @property
    def steps_per_update(self) -> int:
        per = self.lifetime_steps + self.final_episodes * self.episode_steps
        return (self.pop_size * self.tasks_per_member + self.eval_agents) * per

    def validate(self):
        if self.env_id != "point" and not self.env_id.startswith("brax/"):
            raise ValueError(f"env_id={self.env_id!r} must be point or brax/<name>")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of ('float32', 'bfloat16')")
        if self.inner_optimizer not in ("adam", "sgd"):
            raise ValueError(f"inner_optimizer={self.inner_optimizer!r} must be adam or sgd")
        if self.pop_size % 2:
            raise ValueError(f"pop_size={self.pop_size} must be even (antithetic pairs)")
        if self.inner_opt_freq % self.inner_batch_size:
            raise ValueError(f"inner_opt_freq={self.inner_opt_freq} must be a multiple of "
                             f"inner_batch_size={self.inner_batch_size}")
        low = CONV[0][1] + CONV[0][2] * (CONV[1][1] - 1)  # 21: one output of the 2nd conv
        if self.buffer_size < max(self.inner_opt_freq, low):
            raise ValueError(f"buffer_size={self.buffer_size} must be >= inner_opt_freq="
                             f"{self.inner_opt_freq} and >= {low} (the two convolutions)")
        for name in ("sigma", "outer_lr_decay", "alpha_anneal_frac"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("eval_agents", "tasks_per_member", "final_episodes", "num_inner_epochs",
                     "num_generations", "episode_steps", "inner_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma={self.gamma} must be in [0, 1]")
        if not 0 <= self.alpha_eval <= 1:
            raise ValueError(f"alpha_eval={self.alpha_eval} must be in [0, 1]")
        if min(self.hidden, default=1) < 1:
            raise ValueError(f"hidden={self.hidden} must be sizes >= 1")


PRESETS = {
    # CPU demo: the 1-D left/right point, 16-step episodes, lifetimes of 24 x 32 steps.
    "quick": dict(env_id="point", episode_steps=16, num_generations=200, pop_size=16,
                  sigma=0.05, outer_lr=0.03, inner_opt_freq=32, num_inner_epochs=24,
                  buffer_size=64, inner_batch_size=16, inner_lr=0.05, hidden=(16,),
                  alpha_anneal_frac=0.25, eval_agents=8, tasks_per_member=2),
    "paper": dict(),
}

# --- ENVIRONMENTS ---


class PointLR:
    """1-D "go left or right": params = goal side g in {-1, +1}. common.envs.Env protocol."""

    num_actions, action_shape, observation_shape = None, (1,), (2,)

    def __init__(self, episode_steps: int):
        self.h = episode_steps

    def reset(self, key, g):
        return jnp.zeros(2), (jnp.zeros(()), jnp.zeros((), jnp.int32))

    def step(self, key, state, action, g):
        x, t = state
        a = jnp.clip(action[0], -1.0, 1.0)
        x, t = x + 0.1 * a, t + 1
        obs = jnp.stack([x, t / self.h])
        return obs, (x, t), g * a, jnp.zeros((), bool), t >= self.h


class DirBrax:
    """A brax env rewarded by d x its forward reward (params d = +-1), brax's healthy bonus
    and control cost dropped ([2] DirHopper: r = direction dx/dt)."""

    def __init__(self, name: str, episode_steps: int):
        from common.envs import BraxEnv

        self.env = BraxEnv(name, episode_length=episode_steps)
        self.num_actions, self.action_shape = None, self.env.action_shape
        self.observation_shape = self.env.observation_shape

    def reset(self, key, d):
        return self.env.reset(key, None)

    def step(self, key, state, action, d):
        obs, st, r, term, trunc = self.env.step(key, state, action, None)
        fwd = st.brax_state.metrics["reward_forward"]
        return obs, st, d * fwd, term, trunc  # [2] hopper.py: direction x dx/dt only


@functools.cache
def make_env(cfg: Config):
    """One env per Config (a BraxEnv costs 0.3 CPU-s to build, and every function asks)."""
    if cfg.env_id == "point":
        return PointLR(cfg.episode_steps)
    return DirBrax(cfg.env_id.split("/", 1)[1], cfg.episode_steps)


def sample_task(key):
    """Goal side / direction, +-1 with equal odds, per lifetime ([2] meta_reset)."""
    return jnp.where(jax.random.bernoulli(key), 1.0, -1.0)


# --- NETWORKS ---


def policy_init(key, obs_dim, act_dim, cfg: Config):
    """[2] networks.NN: tanh MLP, Gaussian weights with every input column scaled to norm 1
    (0.01 in the last layer), zero biases; a state-independent log std, 0 at start."""
    sizes, layers = (obs_dim, *cfg.hidden, act_dim), []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b))
        std = 0.01 if i == len(sizes) - 2 else 1.0
        layers.append((w * std / jnp.linalg.norm(w, axis=1, keepdims=True), jnp.zeros(b)))
    return {"layers": layers, "logstd": jnp.zeros(act_dim)}


def policy_apply(theta, obs, cfg: Config):
    """(mu [.., A], log sigma [.., A]) of pi_theta(.|s)."""
    h, dt = obs.astype(cfg.dtype), jnp.dtype(cfg.dtype)
    for i, (w, b) in enumerate(theta["layers"]):
        h = h @ w.astype(dt) + b.astype(dt)
        h = jnp.tanh(h) if i < len(theta["layers"]) - 1 else h
    mu = h.astype(jnp.float32)
    return mu, jnp.broadcast_to(theta["logstd"], mu.shape)


def gaussian_logp(mu, logstd, a):
    return jnp.sum(-0.5 * ((a - mu) / jnp.exp(logstd)) ** 2 - logstd
                   - 0.5 * jnp.log(2 * jnp.pi), -1)


def leaky(x):
    """chainer F.leaky_relu's default slope 0.2 ([2])."""
    return jax.nn.leaky_relu(x, 0.2)


CONV = ((16, 6, 5), (32, 4, 2))
"""[2] Conv1DLoss temporal convolutions: (channels, kernel, stride)."""
CONTEXT, HIDDEN = 32, 16
"""[2] Conv1DLoss: context units (traj_d0), per-step hidden units (loss_d0)."""


def feature_dim(obs_dim, act_dim):
    """s, a, r, done, t/H, then mu and log sigma."""
    return obs_dim + act_dim + 3 + 2 * act_dim


def phi_init(key, cfg: Config):
    """Loss-net parameters, chainer's default LeCun-normal weights and zero biases ([2])."""
    env = make_env(cfg)
    f = feature_dim(env.observation_shape[0], env.action_shape[0])
    shapes = {"c0": (CONV[0][1], f, CONV[0][0]), "c1": (CONV[1][1], CONV[0][0], CONV[1][0]),
              "d0": (CONV[1][0], CONTEXT), "l0": (f + CONTEXT, HIDDEN), "l1": (HIDDEN, 1)}
    out = {}
    for i, (name, shp) in enumerate(shapes.items()):
        fan_in = int(np.prod(shp[:-1]))
        w = jax.random.normal(jax.random.fold_in(key, i), shp) / np.sqrt(fan_in)
        out[name] = {"w": w, "b": jnp.zeros(shp[-1])}
    return out


def conv1d(x, p, stride, dtype):
    """VALID 1-D convolution over time: x [L, C], w [k, C, O] -> [(L - k) // stride + 1, O];
    output j sees input steps stride j .. stride j + k - 1 (windows gathered, one matmul)."""
    k, c, o = p["w"].shape
    win = stride * jnp.arange((x.shape[0] - k) // stride + 1)[:, None] + jnp.arange(k)
    return x[win].reshape(-1, k * c).astype(dtype) @ p["w"].reshape(k * c, o).astype(dtype) + p["b"]


def loss_context(phi, traj, dtype):
    """[2] process_trajectory: traj [M, F] -> conv -> leaky -> conv -> leaky -> mean over
    time -> Dense(32), no activation: the context c [32] (tiled over the steps)."""
    h = leaky(conv1d(traj, phi["c0"], CONV[0][2], dtype))
    h = leaky(conv1d(h, phi["c1"], CONV[1][2], dtype))
    return h.mean(0) @ phi["d0"]["w"].astype(dtype) + phi["d0"]["b"]


def loss_apply(phi, traj, idx, dtype):
    """[2] Conv1DLoss.loss: per minibatch row Dense(16)([x_t, c]) -> leaky -> Dense(1); L_phi =
    the mean over the minibatch rows idx."""
    c = loss_context(phi, traj, dtype)
    x = jnp.concatenate([traj[idx], jnp.broadcast_to(c, (idx.shape[0], c.shape[0]))], 1)
    h = leaky(x.astype(dtype) @ phi["l0"]["w"].astype(dtype) + phi["l0"]["b"])
    return (h @ phi["l1"]["w"].astype(dtype) + phi["l1"]["b"]).astype(jnp.float32).mean()


# --- LOSS ---


def reward_to_go(r, done, gamma):
    """Psi_t = sum_k gamma^k r_{t+k} within the episode (cut at the end of the batch)."""
    def back(g, x):
        g = x[0] + gamma * (1.0 - x[1]) * g
        return g, g
    return jax.lax.scan(back, jnp.zeros(()), (r, done), reverse=True)[1]


def pg_loss(theta, obs, act, psi, cfg: Config):
    """L_pg = -mean_t Psi_t log pi_theta(a_t|s_t) (REINFORCE surrogate, post Eq. for L_pg)."""
    mu, logstd = policy_apply(theta, obs, cfg)
    return -jnp.mean(psi * gaussian_logp(mu, logstd, act))


def epg_loss(theta, phi, raw, idx, obs_dim, cfg: Config):
    """L_phi(pi_theta, tau_{t-M..t}) on the minibatch rows idx of the buffer."""
    mu, logstd = policy_apply(theta, raw[:, :obs_dim], cfg)
    traj = jnp.concatenate([raw, mu, logstd], 1)
    return loss_apply(phi, traj, idx, jnp.dtype(cfg.dtype))


def total_loss(theta, phi, alpha, raw, idx, psi, obs_dim, act_dim, cfg: Config):
    """[1] Sec. 3.2: L_hat = (1 - alpha) L_phi + alpha L_pg (idx rows of the buffer; psi on
    the newest inner_opt_freq rows)."""
    n = cfg.inner_opt_freq
    rows = idx - (cfg.buffer_size - n)
    obs, act = raw[idx, :obs_dim], raw[idx, obs_dim:obs_dim + act_dim]
    l_pg = pg_loss(theta, obs, act, psi[rows], cfg)
    l_phi = epg_loss(theta, phi, raw, idx, obs_dim, cfg)
    return (1.0 - alpha) * l_phi + alpha * l_pg


# --- INNER LOOP ---


def inner_tx(cfg: Config):
    if cfg.inner_optimizer == "sgd":
        return optax.sgd(cfg.inner_lr)
    return optax.adam(cfg.inner_lr)


@struct.dataclass
class Agent:
    theta: dict
    opt: optax.OptState
    obs: jax.Array
    env_state: object
    buffer: jax.Array  # [M, s a r done t]
    ep_ret: jax.Array  # return of the running episode
    last_ret: jax.Array  # return of the last finished episode


def agent_init(key, task, cfg: Config):
    env = make_env(cfg)
    o, a = env.observation_shape[0], env.action_shape[0]
    k_pi, k_env = jax.random.split(key)
    theta = policy_init(k_pi, o, a, cfg)
    obs, es = env.reset(k_env, task)
    return Agent(theta, inner_tx(cfg).init(theta), obs, es, jnp.zeros((cfg.buffer_size, o + a + 3)),
                 jnp.zeros(()), jnp.zeros(()))


def collect(agent: Agent, key, task, cfg: Config):
    """inner_opt_freq env steps with pi_theta, auto-reset within the lifetime."""
    env = make_env(cfg)

    def step(carry, k):
        obs, es, ep_ret, last = carry
        k_a, k_s, k_r = jax.random.split(k, 3)
        mu, logstd = policy_apply(agent.theta, obs, cfg)
        a = mu + jnp.exp(logstd) * jax.random.normal(k_a, mu.shape)
        obs2, es2, r, term, trunc = env.step(k_s, es, a, task)
        done = term | trunc
        t = es2[1] if isinstance(env, PointLR) else es2.time
        row = jnp.concatenate([obs, a, jnp.stack([r, done * 1.0, t / cfg.episode_steps])])
        o0, e0 = env.reset(k_r, task)
        pick = lambda new, old: jax.tree.map(lambda x, y: jnp.where(done, x, y), new, old)
        ep_ret = ep_ret + r
        last = jnp.where(done, ep_ret, last)
        return (pick(o0, obs2), pick(e0, es2), jnp.where(done, 0.0, ep_ret), last), row

    carry = (agent.obs, agent.env_state, agent.ep_ret, agent.last_ret)
    (obs, es, ep_ret, last), rows = jax.lax.scan(step, carry,
                                                 jax.random.split(key, cfg.inner_opt_freq))
    buffer = jnp.concatenate([agent.buffer[cfg.inner_opt_freq:], rows])  # newest last
    return agent.replace(obs=obs, env_state=es, buffer=buffer, ep_ret=ep_ret, last_ret=last)


def inner_epoch(agent: Agent, key, phi, alpha, task, cfg: Config):
    """One inner-loop epoch ([2] run_batch_rl + agent.update): collect inner_opt_freq steps,
    then one pass of minibatch steps theta <- theta - alpha_in grad L_hat over them."""
    env = make_env(cfg)
    o, a = env.observation_shape[0], env.action_shape[0]
    k_col, k_perm = jax.random.split(key)
    agent = collect(agent, k_col, task, cfg)
    n, m = cfg.inner_opt_freq, cfg.buffer_size
    new = agent.buffer[m - n:]
    g = reward_to_go(new[:, o + a], new[:, o + a + 1], cfg.gamma)
    psi = (g - g.mean()) / (g.std() + 1e-8)
    batches = (m - n + jax.random.permutation(k_perm, n)).reshape(-1, cfg.inner_batch_size)
    tx = inner_tx(cfg)

    def mb(carry, idx):
        theta, opt = carry
        grads = jax.grad(total_loss)(theta, phi, alpha, agent.buffer, idx, psi, o, a, cfg)
        upd, opt = tx.update(grads, opt, theta)
        return (optax.apply_updates(theta, upd), opt), None

    (theta, opt), _ = jax.lax.scan(mb, (agent.theta, agent.opt), batches)
    return agent.replace(theta=theta, opt=opt)


def lifetime(key, phi, alpha, task, cfg: Config):
    """One agent's life on `task`: num_inner_epochs inner epochs, then the fitness = mean
    return of final_episodes episodes of the final (stochastic) policy ([2] rollout.py)."""
    k_init, k_life, k_eval = jax.random.split(key, 3)
    agent = agent_init(k_init, task, cfg)
    def ep(ag, k):
        ag = inner_epoch(ag, k, phi, alpha, task, cfg)
        return ag, ag.last_ret

    agent, train_ret = jax.lax.scan(ep, agent, jax.random.split(k_life, cfg.num_inner_epochs))
    env = make_env(cfg)

    def act(obs, k):
        mu, logstd = policy_apply(agent.theta, obs, cfg)
        return mu + jnp.exp(logstd) * jax.random.normal(k, mu.shape)

    rets = jax.vmap(lambda k: episode(env, act, k, task, cfg.episode_steps)[0])(
        jax.random.split(k_eval, cfg.final_episodes))
    return rets.mean(), train_ret


# --- UPDATE ---


@struct.dataclass
class State:
    phi: jax.Array  # flat loss-net parameters
    m: jax.Array  # Adam moments of the outer update
    v: jax.Array
    generation: jax.Array
    sign: jax.Array  # +1 ascent, -1 the flipped (broken) update, 0 frozen phi (evaluation)
    key: jax.Array


def unravel(cfg: Config):
    return ravel_pytree(jax.eval_shape(lambda: phi_init(jax.random.PRNGKey(0), cfg)))[1]


def init(key, cfg: Config) -> State:
    phi = ravel_pytree(phi_init(key, cfg))[0]
    z = jnp.zeros_like(phi)
    sign = jnp.float32(1.0 if cfg.ascent else -1.0)
    return State(phi, z, z, jnp.int32(0), sign, jax.random.fold_in(key, 1))


def alpha_schedule(generation, cfg: Config):
    """[2] PiecewiseSchedule([(0, 1), (G * frac, 0)]): linear 1 -> 0, then 0."""
    return jnp.clip(1.0 - generation / (cfg.num_generations * cfg.alpha_anneal_frac), 0.0, 1.0)


def antithetic(key, n, d):
    """eps [n, d]: n/2 Gaussian vectors then their negatives."""
    half = jax.random.normal(key, (n // 2, d))
    return jnp.concatenate([half, -half])


def es_gradient(eps, fitness, phi, cfg: Config):
    """[2] evolution.py: g = relative_ranks(F) . eps / N - l2 phi (ascent direction)."""
    return centered_ranks(fitness) @ eps / eps.shape[0] - cfg.l2_coef * phi


def outer_lr(generation, cfg: Config):
    """[2] PiecewiseSchedule([(0, lr), (G / 2, decay lr)]): linear, then held."""
    frac = jnp.minimum(generation / (cfg.num_generations / 2), 1.0)
    return cfg.outer_lr * (1.0 - (1.0 - cfg.outer_lr_decay) * frac)


def adam_ascent(g, m, v, t, lr):
    """[2] utils.Adam(beta1 = 0): phi += lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)."""
    m, v = g, 0.999 * v + 0.001 * g * g
    return lr * jnp.sqrt(1 - 0.999 ** t) * m / (jnp.sqrt(v) + 1e-8), m, v


def update(state: State, cfg: Config):
    """One ES generation: N perturbed loss nets, one lifetime each, the ranked NES step on
    phi; beside them (same vmap, one compiled lifetime) eval_agents fresh lifetimes under
    the incoming phi with alpha_eval (the metric of the generation's phi)."""
    key, k_eps, k_life, k_eval = jax.random.split(state.key, 4)
    n, d, e = cfg.pop_size, state.phi.shape[0], cfg.eval_agents
    eps = antithetic(k_eps, n, d)
    alpha = alpha_schedule(state.generation, cfg)
    j = cfg.tasks_per_member
    k_task, k_life = jax.random.split(k_life)
    # members i and i + N/2 (antithetic) share tasks and keys; member i's j-th lifetime has
    # task g_i (-1)^j; the eval agents alternate the sign
    task = jax.vmap(sample_task)(jax.random.split(k_task, n // 2))
    task = jnp.tile(task[:, None] * (-1.0) ** jnp.arange(j), (2, 1)).reshape(-1)
    keys = jnp.tile(jax.random.split(k_life, n // 2 * j), (2, 1))
    keys = jnp.concatenate([keys, jax.random.split(k_eval, e)])
    task = jnp.concatenate([task, (-1.0) ** jnp.arange(e)])
    flat = jnp.concatenate([jnp.repeat(state.phi + cfg.sigma * eps, j, 0),
                            jnp.tile(state.phi, (e, 1))])
    alphas = jnp.concatenate([jnp.full(n * j, alpha), jnp.full(e, cfg.alpha_eval)])
    life = lambda k, p, a, g: lifetime(k, unravel(cfg)(p), a, g, cfg)
    f, train = jax.vmap(life)(keys, flat, alphas, task)  # [N j + E]
    fitness, ev = f[:n * j].reshape(n, j).mean(1), f[n * j:]
    g = es_gradient(eps, fitness, state.phi, cfg) * state.sign
    t = state.generation + 1
    step, m, v = adam_ascent(g, state.m, state.v, t, outer_lr(state.generation, cfg))
    new = state.replace(phi=state.phi + step, m=m, v=v, generation=t, key=key)
    return new, {
        "charts/fitness_mean": fitness.mean(),
        "charts/fitness_max": fitness.max(),
        "charts/eval_return": ev.mean(),
        "charts/eval_train_return": train[n * j:, -1].mean(),
        "charts/alpha": alpha,
        "losses/phi_norm": jnp.linalg.norm(new.phi),
        "losses/es_grad_norm": jnp.linalg.norm(g),
    }


def evaluate(state: State, cfg: Config, num_agents: int = 64):
    """Test time ([1] Sec. 3): `num_agents` fresh agents trained under the fixed phi with
    alpha_eval, tasks alternating +-1; the mean and std of their final-policy returns."""
    keys = jax.random.split(jax.random.fold_in(state.key, 7), num_agents)
    task = (-1.0) ** jnp.arange(num_agents)
    f, _ = jax.vmap(lambda k, g: lifetime(k, unravel(cfg)(state.phi), cfg.alpha_eval, g, cfg))(
        keys, task)
    return {"eval/return": f.mean(), "eval/return_std": f.std()}


# --- PLOT ---


def plot(history: dict, cfg: Config, out: str):
    """Return of fresh agents trained under L_phi (alpha = alpha_eval) per generation, beside
    the population's fitness and alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, ax = plt.subplots(figsize=(7, 4))
    gen = np.arange(history["charts/eval_return"].shape[1]) + 1
    for k, lab in (("eval_return", f"fresh agents under L_phi (alpha={cfg.alpha_eval:g})"),
                   ("fitness_mean", "ES population fitness (annealed alpha)")):
        y = np.asarray(history[f"charts/{k}"])
        ax.plot(gen, y.mean(0), label=f"{lab}, {y.shape[0]} seeds")
        ax.fill_between(gen, y.min(0), y.max(0), alpha=0.2)
    ax2 = ax.twinx()
    ax2.plot(gen, np.asarray(history["charts/alpha"])[0], "k:", label="alpha")
    ax2.set_ylabel("alpha (L_pg weight)")
    ax.set(xlabel="ES generation", ylabel="final-policy return",
           title=f"EPG on {cfg.env_id} (return range [-{cfg.episode_steps}, {cfg.episode_steps}])")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = ["charts/eval_return", "charts/fitness_mean", "charts/alpha"]


def main(argv=None):
    """The runner's CLI plus `--plot PNG`."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, argv=argv, doc=__doc__,
                   summary_keys=SUMMARY)
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.history, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
