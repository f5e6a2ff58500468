"""NoisyNet-DQN, with parameter-space noise (flag) and epsilon-greedy DQN as baselines.

[1] M. Fortunato, M. G. Azar, B. Piot et al. "Noisy Networks for Exploration." ICLR 2018,
    arXiv:1706.10295.
[2] M. Plappert, R. Houthooft, P. Dhariwal et al. "Parameter Space Noise for Exploration."
    ICLR 2018, arXiv:1706.01905. Reference code: openai/baselines, baselines/deepq
    (build_graph.build_act_with_param_noise, deepq.learn).
[3] V. Mnih et al. "Human-level control through deep reinforcement learning." Nature 2015.

NoisyNet replaces the linear layers of the Q-network by noisy ones whose noise scale is
learned by gradient descent with the rest of the weights; the agent acts greedily on one draw
of the noisy network (epsilon = 0):

    y = (mu_w + sigma_w * eps_w) x + mu_b + sigma_b * eps_b                  [1] Eq. (8)
    factorised noise: eps_w[i, j] = f(eps_i) f(eps_j),  eps_b[j] = f(eps_j),
        f(x) = sgn(x) sqrt(|x|),  eps_i, eps_j ~ N(0, 1)  (p inputs, q outputs)  [1] Eq. (10-11)
    init: mu ~ U[-1/sqrt(p), 1/sqrt(p)],  sigma = sigma_0 / sqrt(p),  sigma_0 = 0.5  [1] Sec. 3.2
    loss: E[(r + gamma max_b Q(y, b, eps'; zeta^-) - Q(x, a, eps; zeta))^2]    [1] Eq. (12)
        with independent noise eps (online) and eps' (target); with Double DQN the
        argmax is taken under a third draw eps''                                 [1] Alg. 1

Noise is drawn afresh at every environment step (one draw per env when several envs step
together) and once per minibatch for each of the online, target and selection networks,
as in [1] Alg. 1. The Huber error clip of [3] bounds the squared loss.

Parameter-space noise ([2], `--exploration param`): the fully connected weights are
perturbed, theta~ = theta + N(0, sigma^2), at the start of every episode, the agent acts
greedily with theta~, and sigma is adapted so that the perturbation moves the policy as much
as epsilon-greedy would:

    d(pi, pi~) = KL(softmax Q_theta(s) || softmax Q_theta~(s))                  [2] Sec. 3 / C.1
    delta = -log(1 - eps + eps / |A|)   (eps from the epsilon schedule)           [2] App. C.1
    sigma <- alpha sigma if d < delta else sigma / alpha,  alpha = 1.01          [2] Eq. (5)

Reproduce (CPU demo, DeepSea N = 10, ~1 min per arm on 2 cores):
    python exploration/noisy_nets.py --preset quick --num-seeds 4
    python exploration/noisy_nets.py --preset quick --num-seeds 4 --exploration epsilon
    python exploration/noisy_nets.py --preset quick --num-seeds 4 --exploration param
Measured (quick preset, 4 seeds, 2-core CPU, ~40 s per arm): episodes that reached the
treasure, of 8000 per seed: NoisyNet 3 1 7 0; epsilon-greedy 5362 0 1 5528; parameter noise
4773 2748 1 3809; all three visit 62-64 of the 66 cells (NoisyNet with sigma_0 = 0: 29-41).
NoisyNet's per-step noise dithers like epsilon and does not solve DeepSea here.
Paper setting (GPU; one Atari game through envpool, 50M agent steps = 200M frames):
    python exploration/noisy_nets.py --preset paper
[1] Table 1: median human-normalised score over 57 Atari games, DQN 83% -> NoisyNet-DQN
123% (mean 319% -> 379%) [from memory of the paper; not re-read here].

Constants checked against released code: the sigma_0 / sqrt(p) and U[+-1/sqrt(p)] inits and
the noise shared across the batch match DQN Zoo's `noisy_linear` (deepmind/dqn_zoo,
networks.py); the parameter-noise rule follows openai/baselines deepq: sigma starts at 0.01,
alpha = 1.01, strict `kl < delta`, KL of the softmaxed Q-values, delta from the epsilon
schedule, epsilon-greedy off, the perturbation redrawn at each episode start, only fully
connected layers perturbed (layer norm in them, unperturbed), and sigma adapted at every
step on the current observations (baselines' deepq.learn).

Differences from the paper:
- Noise is drawn from N(0, 1); DQN Zoo draws from a normal truncated at +-2.
- Replay: the obs of the next row stands for s' (common/dqn.py); with envpool's next-step
  auto-reset the transition from an episode's last frame to the next episode's first is
  stored with weight 0. 1M transitions of 4x84x84 uint8 frames need 28.2 GB (26.3 GiB):
  one 80 GB GPU; stacked frames are stored, not single frames (4x the memory of [3]'s code).
- Optimiser: [3]'s centered RMSProp (lr 2.5e-4, decay 0.95) with epsilon 0.01 / 32^2 because
  the loss is a mean over the batch (DQN Zoo's dqn/run_atari.py, which also bounds the error
  gradient at 1/32: our mean Huber loss with delta 1). The target is copied every 10,000 agent
  steps = 2,500 gradient updates, as [3]'s released Lua code (target_q = 10000 steps) and DQN
  Zoo (40k frames); [3]'s table words it as 10,000 "parameter updates".
- The conv torso uses orthogonal(sqrt 2) init (common/nets.py style); the noisy layers use
  [1]'s init, and so do the same layers of the epsilon-greedy baseline (mu only).
- Several envs step together in the CPU preset, each with its own noise draw / perturbation.
- [2]'s paper adapts sigma every 50 steps and adds epsilon = 0.01; we follow the released
  baselines deepq (every step, no epsilon), see above.
- The `quick` preset departs from [3] to fit a 2-core CPU: DeepSea N=10, 16 envs, batch 64,
  buffer 20k, lr 1e-3, target copy every 50 updates, 1 update per vector step, an MLP (64).
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import dqn, envs, run
from common.nets import orthogonal

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """NoisyNet-DQN; defaults are [3]'s DQN hyperparameters on Atari, which [1] keeps for
    NoisyNet-DQN apart from epsilon (= 0) [M: from memory of [1] Sec. 4]."""

    env_id: str = "Breakout-v5"
    """environment id (envpool Atari, gymnax e.g. DeepSea-bsuite, navix, GridMaze-*)"""
    exploration: str = "noisy"
    """noisy: NoisyNet, epsilon = 0 [1]; epsilon: plain DQN, epsilon-greedy; param: [2]"""
    total_timesteps: int = 50_000_000
    """environment steps over all envs (agent steps: 50M = 200M Atari frames, [1]'s budget [M])"""
    num_envs: int = 1
    """parallel environments"""
    train_every: int = 4
    """vector-env steps between gradient updates ([3] update frequency 4)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions"""
    learning_starts: int = 50_000
    """transitions collected before the first gradient update ([3] replay start size)"""
    batch_size: int = 32
    """minibatch size"""
    lr: float = 2.5e-4
    """RMSProp learning rate"""
    rms_decay: float = 0.95
    """RMSProp decay of the squared-gradient average (centered, [3])"""
    rms_eps: float = 0.01 / 32**2
    """RMSProp epsilon (inside the square root; 0.01 of [3] over batch^2 for a mean loss)"""
    gamma: float = 0.99
    """discount"""
    target_update_period: int = 2_500
    """gradient updates between target-network copies (10,000 agent steps at train_every 4)"""
    double_q: bool = False
    """Double-DQN target (argmax under the online net with its own noise draw)"""
    huber_delta: float = 1.0
    """TD-error clip of the Huber loss"""
    clip_reward: bool = True
    """clip rewards to [-1, 1] ([3])"""
    eps_start: float = 1.0
    """epsilon at step 0 (epsilon-greedy, and param noise's delta)"""
    eps_end: float = 0.1
    """final epsilon"""
    eps_decay_steps: int = 1_000_000
    """environment steps over which epsilon decays linearly"""
    sigma_0: float = 0.5
    """NoisyNet: sigma init scale, sigma = sigma_0 / sqrt(fan_in)"""
    param_sigma_init: float = 0.01
    """param noise: initial std of the parameter perturbation"""
    param_alpha: float = 1.01
    """param noise: adaptation factor alpha of sigma"""
    hidden: tuple[int, ...] = (512,)
    """sizes of the hidden fully connected (noisy) layers"""
    deepsea_size: int = 10
    """DeepSea only: grid size N (or name the size in the id: DeepSea-bsuite-<N>)"""
    sticky_action_prob: float = 0.0
    """Atari only: repeat the previous action with this probability ([3]: none)"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (grid envs)"""

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.train_every

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def replay_rows(self) -> int:
        return self.buffer_size // self.num_envs

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    def validate(self):
        if self.exploration not in ("noisy", "epsilon", "param"):
            raise ValueError(f"exploration={self.exploration!r} must be noisy, epsilon or param")
        for name in ("total_timesteps", "num_envs", "train_every", "batch_size",
                     "target_update_period", "eps_decay_steps", "deepsea_size", "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "rms_eps", "huber_delta", "param_sigma_init"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("gamma", "rms_decay", "eps_start", "eps_end", "sticky_action_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.sigma_0 < 0:
            raise ValueError(f"sigma_0={self.sigma_0} must be >= 0")
        if self.param_alpha <= 1:
            raise ValueError(f"param_alpha={self.param_alpha} must be > 1")
        if self.replay_rows < 2:
            raise ValueError(f"buffer_size={self.buffer_size} must hold >= 2 rows of "
                             f"num_envs={self.num_envs} transitions")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_envs * train_every = {self.steps_per_update})")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden={self.hidden} sizes must be >= 1")


PRESETS = {
    # CPU demo: DeepSea N=10 (reward 1 only after 10 consecutive "right" moves, each costing
    # 0.001; a uniform policy finds it once in 1024 episodes).
    "quick": dict(env_id="DeepSea-bsuite", total_timesteps=80_000, num_envs=16, train_every=1,
                  buffer_size=20_000, learning_starts=1_000, batch_size=64, lr=1e-3,
                  target_update_period=50, eps_decay_steps=8_000, eps_end=0.02,
                  rms_eps=1e-8, hidden=(64,)),
    "paper": dict(),
}


def make_env(cfg: Config):
    """The batched env, wrapped to count distinct cells and positive episodes (Coverage)."""
    if cfg.is_atari:  # [3]: 84x84 grey, frame skip 4, stack 4, noop 30, lives as episodes
        env = envs.make(cfg.env_id, cfg.num_envs, episodic_life=True, reward_clip=False,
                        repeat_action_probability=cfg.sticky_action_prob)
    elif cfg.env_id == "DeepSea-bsuite":
        env = envs.make(cfg.env_id, cfg.num_envs, size=cfg.deepsea_size)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid)  # stays 0 on Atari (no positions)


# --- NETWORKS ---


def f(x):
    """[1] Eq. (11): f(x) = sgn(x) sqrt(|x|)."""
    return jnp.sign(x) * jnp.sqrt(jnp.abs(x))


class NoisyDense(nn.Module):
    """[1] Eq. (8) with factorised Gaussian noise from the "noise" rng stream. One draw per call
    shared by the batch, or (`per_example=True`) one per row of x (one per env when acting).
    `noisy=False` keeps only mu (a plain linear layer with [1]'s init). The raw eps_in,
    eps_out are sown to "intermediates" for inspection.

    With eps_w = f(eps_in) f(eps_out)^T (rank one, [1] Eq. 10-11) the noisy part of the
    weights acts as ((x * f(eps_in)) sigma_w) * f(eps_out): the same numbers as building
    W = mu_w + sigma_w * eps_w, without a [p, q] matrix per env (DQN Zoo computes it so)."""

    features: int
    noisy: bool = True
    sigma_0: float = 0.5

    @nn.compact
    def __call__(self, x, per_example: bool = False):
        p = x.shape[-1]
        bound = 1.0 / np.sqrt(p)
        uniform = lambda k, s: jax.random.uniform(k, s, minval=-bound, maxval=bound)
        mu_w = self.param("mu_w", uniform, (p, self.features))  # [1] Sec. 3.2
        mu_b = self.param("mu_b", uniform, (self.features,))
        if not self.noisy:
            return x @ mu_w + mu_b
        const = nn.initializers.constant(self.sigma_0 / np.sqrt(p))
        sigma_w = self.param("sigma_w", const, (p, self.features))
        sigma_b = self.param("sigma_b", const, (self.features,))
        batch = x.shape[:-1] if per_example else ()
        k_in, k_out = jax.random.split(self.make_rng("noise"))
        eps_in = jax.random.normal(k_in, (*batch, p))
        eps_out = jax.random.normal(k_out, (*batch, self.features))
        self.sow("intermediates", "eps_in", eps_in)
        self.sow("intermediates", "eps_out", eps_out)
        f_out = f(eps_out)  # eps_b = f(eps_out)                               [1] Eq. (11)
        noise_w = ((x * f(eps_in)) @ sigma_w) * f_out  # (sigma_w * eps_w)^T x  [1] Eq. (10)
        return x @ mu_w + noise_w + mu_b + sigma_b * f_out  # [1] Eq. (8)


class QNetwork(nn.Module):
    """[3]'s conv torso on pixels (flatten on vectors), then fully connected `hidden` layers
    and the Q head, all `NoisyDense` ([1] makes the fully connected layers noisy). Layer
    norm after each hidden layer for parameter noise ([2] Sec. 3)."""

    num_actions: int
    hidden: tuple[int, ...]
    noisy: bool
    sigma_0: float
    pixels: bool
    layer_norm: bool = False
    obs_ndim: int = 1

    @nn.compact
    def __call__(self, obs, per_example: bool = False):
        if self.pixels:  # envpool frames (..., 4, 84, 84) -> (..., 84, 84, 4)
            x = jnp.moveaxis(obs, -3, -1).astype(jnp.float32) / 255.0
            for ch, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                x = nn.relu(nn.Conv(ch, (k, k), (s, s), padding="VALID",
                                    kernel_init=orthogonal())(x))
            x = x.reshape(*x.shape[:-3], -1)  # (..., 7*7*64)
        else:
            x = obs.reshape(*obs.shape[:obs.ndim - self.obs_ndim], -1).astype(jnp.float32)
        for h in self.hidden:
            x = NoisyDense(h, self.noisy, self.sigma_0)(x, per_example)
            x = nn.relu(nn.LayerNorm()(x) if self.layer_norm else x)
        return NoisyDense(self.num_actions, self.noisy, self.sigma_0)(x, per_example)


def network(cfg: Config, env) -> QNetwork:
    pixels = cfg.is_atari
    return QNetwork(env.num_actions, cfg.hidden, cfg.exploration == "noisy", cfg.sigma_0,
                    pixels, layer_norm=cfg.exploration == "param",
                    obs_ndim=len(env.observation_shape))


def q_values(net, params, obs, key, per_example: bool = False):
    """Q(obs) under one noise draw from `key` for the batch, or one per row of obs
    (`per_example`); non-noisy networks ignore the key."""
    return net.apply(params, obs, per_example, rngs={"noise": key})


# --- PARAMETER NOISE ---


def perturb(params, key, sigma):
    """[2] Sec. 3: theta~ = theta + N(0, sigma^2) on the fully connected weights and biases
    (`NoisyDense` mu); conv and layer-norm parameters are copied (baselines' filter)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys, strict=True):
        fc = any("NoisyDense" in str(getattr(p, "key", "")) for p in path)
        out.append(x + sigma * jax.random.normal(k, x.shape) if fc else x)
    return jax.tree_util.tree_unflatten(treedef, out)


def policy_kl(q, q_perturbed):
    """[2] App. C.1: mean over states of KL(softmax q || softmax q~); q [..., A]."""
    logp, logp_t = jax.nn.log_softmax(q), jax.nn.log_softmax(q_perturbed)
    return (jnp.exp(logp) * (logp - logp_t)).sum(-1).mean()


def param_noise_threshold(epsilon, num_actions):
    """[2] App. C.1: delta = -log(1 - eps + eps / |A|), the KL of epsilon-greedy from greedy."""
    return -jnp.log(1.0 - epsilon + epsilon / num_actions)


def adapt_sigma(sigma, distance, delta, alpha):
    """[2] Eq. (5): sigma * alpha if d < delta else sigma / alpha (strict, as baselines)."""
    return jnp.where(distance < delta, sigma * alpha, sigma / alpha)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    target_params: Any
    opt_state: Any
    replay: dqn.Replay
    env_state: Any
    obs: jax.Array
    prev_done: jax.Array  # (N,) the last step ended an episode (envpool: next step resets)
    perturbed: Any  # param noise: per-env perturbed params [N, ...]; else None
    param_sigma: jax.Array  # param noise: current perturbation std
    step: jax.Array  # int32 vector-env steps taken
    num_grad: jax.Array  # int32 gradient updates done
    key: jax.Array


def _optimizer(cfg: Config):
    return optax.rmsprop(cfg.lr, decay=cfg.rms_decay, eps=cfg.rms_eps, centered=True)


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    net = network(cfg, env)
    k_net, k_noise, k_env, k_pert, key = jax.random.split(key, 5)
    obs, env_state = env.reset(k_env)
    params = net.init({"params": k_net, "noise": k_noise}, obs)
    row = dict(obs=obs, action=jnp.zeros(cfg.num_envs, jnp.int32),
               reward=jnp.zeros(cfg.num_envs), done=jnp.zeros(cfg.num_envs, bool),
               weight=jnp.zeros(cfg.num_envs))
    sigma = jnp.asarray(cfg.param_sigma_init, jnp.float32)
    perturbed = None
    if cfg.exploration == "param":
        perturbed = jax.vmap(lambda k: perturb(params, k, sigma))(
            jax.random.split(k_pert, cfg.num_envs))
    replay = dqn.replay_init(row, cfg.replay_rows)
    return State(params, params, _optimizer(cfg).init(params), replay, env_state, obs,
                 jnp.zeros(cfg.num_envs, bool), perturbed, sigma, jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def td_loss(params, target_params, net, cur, nxt, keys, *, gamma, double_q, huber_delta):
    """[1] Eq. (12) / Alg. 1 on one minibatch: independent noise draws for the online (Q(x, a)),
    target and, with Double DQN, selection networks; each draw shared by the batch."""
    k_online, k_target, k_select = keys
    q = q_values(net, params, cur["obs"], k_online)
    q_next = q_values(net, target_params, nxt["obs"], k_target)
    q_sel = q_values(net, params, nxt["obs"], k_select) if double_q else None
    discount = gamma * (1.0 - cur["done"].astype(jnp.float32))
    y = dqn.td_target(cur["reward"], discount, q_next, q_sel)
    return dqn.q_loss(q, cur["action"], y, cur["weight"], huber_delta)


def act(state: State, cfg: Config, net, obs, key, epsilon):
    """The behaviour policy of each mode; obs [N, ...] -> actions [N]."""
    k_noise, k_eps = jax.random.split(key)
    if cfg.exploration == "noisy":  # a fresh noise draw per env and step, greedy ([1] Alg. 1)
        return jnp.argmax(q_values(net, state.params, obs, k_noise, per_example=True), -1)
    if cfg.exploration == "param":  # greedy under each env's perturbed params ([2])
        q = jax.vmap(lambda p, o: q_values(net, p, o[None], k_noise)[0])(state.perturbed, obs)
        return jnp.argmax(q, -1)
    return dqn.epsilon_greedy(k_eps, q_values(net, state.params, obs, k_noise), epsilon)


def update(state: State, cfg: Config):
    env = make_env(cfg)
    net = network(cfg, env)
    tx = _optimizer(cfg)

    # --- ROLLOUT ---
    def env_step(carry, _):
        s, key = carry
        key, k_act, k_env, k_pert, k_adapt = jax.random.split(key, 5)
        t = s.step * cfg.num_envs
        epsilon = dqn.linear_schedule(t, cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps)
        action = act(s, cfg, net, s.obs, k_act, epsilon)
        next_obs, env_state, reward, done, info = env.step(s.env_state, action, k_env)
        reward = jnp.clip(reward, -1, 1) if cfg.clip_reward else reward
        # envpool resets on the step AFTER done: that transition is not one; weight 0.
        weight = (~s.prev_done if cfg.is_atari else jnp.ones_like(done)).astype(jnp.float32)
        replay = dqn.replay_add(s.replay, dict(obs=s.obs, action=action, reward=reward,
                                               done=done, weight=weight))
        perturbed, sigma = s.perturbed, s.param_sigma
        if cfg.exploration == "param":
            # [2] App. C.1: adapt sigma on the current states, then re-perturb ended episodes.
            q = q_values(net, s.params, s.obs, k_adapt)
            q_t = q_values(net, perturb(s.params, k_adapt, sigma), s.obs, k_adapt)
            delta = param_noise_threshold(epsilon, env.num_actions)
            sigma = adapt_sigma(sigma, policy_kl(q, q_t), delta, cfg.param_alpha)
            fresh = jax.vmap(lambda k: perturb(s.params, k, sigma))(
                jax.random.split(k_pert, cfg.num_envs))
            perturbed = jax.tree.map(
                lambda a, b: jnp.where(done.reshape(-1, *[1] * (a.ndim - 1)), a, b),
                fresh, perturbed)
        ended = info["returned_episode"]
        s = s.replace(replay=replay, env_state=env_state, obs=next_obs, prev_done=done,
                      perturbed=perturbed, param_sigma=sigma, step=s.step + 1)
        return (s, key), dict(ret=info["returned_episode_return"], ended=ended, eps=epsilon)

    (state, key), traj = jax.lax.scan(env_step, (state, state.key), None, cfg.train_every)

    # --- LEARN ---
    key, k_sample, k_o, k_t, k_s = jax.random.split(key, 5)
    cur, nxt = dqn.replay_sample(state.replay, k_sample, cfg.batch_size)
    loss, grads = jax.value_and_grad(td_loss)(
        state.params, state.target_params, net, cur, nxt, (k_o, k_t, k_s), gamma=cfg.gamma,
        double_q=cfg.double_q, huber_delta=cfg.huber_delta)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    learning = state.step * cfg.num_envs >= max(cfg.learning_starts, 2 * cfg.num_envs)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(learning, a, b), new, old)
    params = pick(optax.apply_updates(state.params, updates), state.params)
    opt_state = pick(opt_state, state.opt_state)
    num_grad = state.num_grad + learning.astype(jnp.int32)
    target = dqn.periodic_update(params, state.target_params, num_grad, cfg.target_update_period)
    target = pick(target, state.target_params)

    n_ended = traj["ended"].sum()
    sigmas = [x for p, x in jax.tree_util.tree_leaves_with_path(params)
              if "sigma" in str(p[-1])]
    metrics = {
        "losses/td": loss,
        # 0 when no episode ended in the update; the runner logs NaN there (run.NAN_UNLESS)
        "charts/episodic_return": (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1),
        "charts/episodes": n_ended,
        # epsilon-greedy's epsilon, or the epsilon that sets param noise's delta; 0 in NoisyNet
        "charts/epsilon": traj["eps"][-1] if cfg.exploration != "noisy" else jnp.zeros(()),
        "charts/sigma_mean": (jnp.mean(jnp.concatenate([jnp.abs(s).ravel() for s in sigmas]))
                              if sigmas else jnp.zeros(())),
        "charts/param_sigma": state.param_sigma,
        "charts/distinct_cells": state.env_state.visited.sum(),
        "charts/positive_episodes": state.env_state.positives,
    }
    new = state.replace(params=params, target_params=target, opt_state=opt_state,
                        num_grad=num_grad, key=key)
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Exploration at the end of training: distinct cells visited and the number of finished
    episodes with a positive return (DeepSea: the treasure was reached)."""
    return {"distinct_cells": state.env_state.visited.sum(),
            "positive_episodes": state.env_state.positives}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "positive_episodes",
                                               "charts/episodic_return", "losses/td",
                                               "charts/sigma_mean"])


if __name__ == "__main__":
    main()
