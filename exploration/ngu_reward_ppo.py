"""PPO + the Never Give Up (NGU) intrinsic reward: episodic k-NN novelty x RND lifelong novelty.

[1] A. P. Badia, P. Sprechmann, A. Vitvitskyi, D. Guo, B. Piot, S. Kapturowski, O. Tieleman,
    M. Arjovsky, A. Pritzel, A. Bolt, C. Blundell. "Never Give Up: Learning Directed
    Exploration Strategies." ICLR 2020, arXiv:2002.06038.
[2] Y. Burda et al. "Exploration by Random Network Distillation." arXiv:1810.12894.

Every env keeps an episodic memory M of embeddings f(x) of the states of its current episode.
A state whose embedding has many close neighbours in M is not novel; the count is a kernel
sum over its k nearest neighbours. f is trained by an inverse-dynamics model, so it keeps
what the agent controls. A lifelong RND error scales the episodic reward across episodes:

    p(a_t | x_t, x_t+1) = h(f(x_t), f(x_t+1)),  h an MLP + softmax, trained by CE  [1] Sec. 2
    N_k = the k nearest f_i in M of f(x_t),  d_i^2 = ||f(x_t) - f_i||^2            [1] App. A
    d_m^2 <- running mean of the neighbours' d_i^2;  d_n = max(d_i^2 / d_m^2 - xi, 0)
    K(x, y) = eps / (d^2(x, y) / d_m^2 + eps)                                      [1] Eq. 2
    s = sqrt(sum_{f_i in N_k} K(f(x_t), f_i)) + c;  r^episodic = 0 if s > s_m else 1/s [1] Eq. 1
    alpha_t = 1 + (err(x_t) - mu_e) / sigma_e,  err = ||g_hat(x) - g(x)||^2        [1] Sec. 2
    r^i_t = r^episodic_t * min(max(alpha_t, 1), L),   r_t = r^e_t + beta r^i_t     [1] Sec. 2
    M is emptied at every episode start (then holds the episode's first state).
(The Eq. / Sec. labels of [1] are [M]: written from the peers, not checked against the PDF.)

The JAX angle: each env's memory is a fixed-size ring buffer [N, M, D] in the state, its
valid slots a mask (arange(M) < count); the k-NN is `lax.top_k` over the masked squared
distances; an episode end resets the memory by setting count to 0 (no data moved); the
step is vmapped over envs and scanned over the rollout inside the jitted update.

Reproduce (CPU demo on the 4-rooms grid; NGU against the same PPO with beta = 0, and the
broken variant whose memory is never reset; `--plot` runs all three):
    python exploration/ngu_reward_ppo.py --preset quick --num-seeds 8
    python exploration/ngu_reward_ppo.py --preset quick --num-seeds 8 --beta 0
    python exploration/ngu_reward_ppo.py --preset quick --num-seeds 8 --no-reset-memory
    python exploration/ngu_reward_ppo.py --preset quick --num-seeds 8 \
        --plot exploration/ngu_reward_ppo.png
Measured (quick preset, 8192 steps, 8 seeds, loaded 2-core CPU, 30 / 13 / 15 s user CPU
per command, 1-2.5 min wall under load): distinct cells of 104 (the union over all envs
since the start), NGU 102 104 104 104 100 97 96 103 (median 102.5) vs PPO with beta = 0
96 96 102 101 101 74 74 102 (median 98.5; its mean 93.3 comes from two seeds at 74); after
2048 steps medians 92 vs 70. The memory-never-reset variant scores 103 103 104 104 103 99
102 104 (median 103), at least as much as NGU. What this supports: a novelty bonus speeds
up early coverage. It does NOT show anything specific to NGU's episodic memory: coverage
saturates by 8192 steps, the metric is lifelong by construction, and a 128-slot ring
against 100-step episodes makes "never reset" a sliding window of about one episode,
almost the same as a reset. A longer check does not separate them either: intrinsic reward
only (--ext-coef 0), memory_size 1024 (~10 episodes), 32,768 steps, 6 seeds, one compiled
program, distinct cells per finished episode over the last 16 updates: NGU 27.0 28.1 29.0
28.3 28.9 25.0 (median 28.2) vs never reset 26.9 28.7 28.7 28.5 29.5 29.5 (median 28.7) vs
beta = 0 14.4 1.0 1.0 5.1 17.9 1.0 (median 3.1); raw r^episodic in the last rollout NGU
3.4-5.4, never reset 0.9-4.4 (not the flat 0.316 of a saturated memory: the embedding keeps
moving). So no slow gate on the reset is kept. Mean return of the episodes ending in the
last update (quick preset): NGU 0.14, PPO 0.04 (mean over seeds). The inverse-dynamics
accuracy is 0.45 (chance 0.25; a move into a wall looks like standing still). All these
numbers are at kernel eps = 1e-3, which the quick preset keeps (the paper preset: 1e-4).
Paper reward settings (GPU; a procedurally re-randomised navix maze, where lifelong novelty
alone cannot help because layouts never repeat):
    python exploration/ngu_reward_ppo.py --preset paper
[1] abstract: the first non-zero Pitfall! score without demonstrations (mean 8,400), a
median human-normalised score of 1344% on Atari-57 (R2D2 agent; frame budget not checked).

Differences from the paper:
- Agent: [1]'s agent is R2D2 (recurrent replay, burn-in, Retrace-style n-step, transformed
  Bellman) with a family of N = 32 policies (beta_j, gamma_j) sharing one network (UVFA) and
  the previous action, rewards and j as inputs. Here the reward module drives the repo's
  PPO learner (common.rl.make_ppo, as exploration/rnd.py's bonus interface and
  exploration/episodic_curiosity.py use it) with ONE policy: the most exploratory member of
  [1]'s family, beta = 0.3, gamma = gamma_min = 0.99 (beta = 0 is plain PPO). PPO's
  hyperparameters are not [1]'s (it has none); they are common.rl's defaults.
- The policy and critic are feed-forward MLPs on the current observation (the grids': a
  2-d position). r^episodic depends on the episode's history, which neither can see; [1]'s
  R2D2 is an LSTM fed a_t-1, r^e_t-1, r^i_t-1 and j. This, as much as the reward, is why
  reset vs no-reset hardly matters in the quick runs.
- The intrinsic reward is not normalised: a novel state earns r^episodic ~ 1/sqrt(k eps)
  (~31 at eps = 1e-4), up to 1/(sqrt(eps) + c) with one neighbour, times alpha <= L = 5
  and beta, against r^e = 1 once. R2D2 absorbs the scale with its transformed Retrace;
  here PPO's clipped value loss lets the critic lag. `charts/episodic_reward` logs the raw
  rollout mean of r^episodic.
- The reward of the transition (x_t, a_t, x_t+1) is computed on x_t+1 against the memory
  of x_0 .. x_t (as rnd.py rewards the next state); the transition that ends an episode
  gets r^i = 0 and its auto-reset observation starts the new episode's memory.
- Kernel eps [M]: the paper preset uses 1e-4, as rlax's `episodic_memory_intrinsic_rewards`
  and deep_rl_zoo's NGU flags (beside the other App. F table values) do; [1] Sec. 2's text
  says 1e-3 (the quick preset keeps 1e-3, its numbers' value). The table was not read here.
  For a novel state r ~ sqrt(d_n / (k eps)): 1e-4 gives ~3.16x the reward.
- The cluster distance xi = 8e-3 and the max similarity s_m = 8 follow rlax; note that with
  k = 10, sqrt(sum K) <= sqrt(10) < 8, so the s_m cut-off never binds at the paper's
  values (the tests show it with a smaller s_m).
- With fewer than k states in memory (an episode's first k - 1 steps) the kernel sums over
  the valid slots only: at d = 0 one neighbour gives 1 / (1 + c), k give 1 / (sqrt(k) + c),
  a far one up to 1 / (sqrt(eps) + c) (~31 vs ~10 for k far ones). rlax pads the memory
  with k zero embeddings and deep_rl_zoo returns 0 until the memory holds k states; this
  third choice pays the first steps of each episode more.
- d_m^2 is the running mean of the squared distances of ALL k neighbours (rlax, and [1]'s
  algorithm "update the moving average with the list of distances"), kept per env across
  episodes (an exact cumulative float32 mean, not an exponential one: it keeps the
  distances of the early, random embedding forever; the count is exact to 2^24, the paper
  preset reaches 7.8M per env); the post says "k-th".
- The memory is a ring buffer of `memory_size` slots per env (the oldest slot is
  overwritten when an episode outgrows it; [1]: 30,000 slots).
- The embedding f and the RND predictor train in the same Adam steps as the policy (one
  optimiser, PPO's global-norm clip and annealed learning rate), on every transition of
  each minibatch (the inverse-dynamics loss skips transitions across an episode end);
  [1] trains them from replay on the last 5 frames of each sequence with their own Adam.
- mu_e, sigma_e: running moments of the RND error over all steps (updated with each
  rollout before alpha is computed). RND sees the raw observation (the grids' are already
  in [0, 1]), not a whitened one. Vector observations, so f, g, g_hat are MLPs; [1]'s
  convolutional torsos and 84x84 Atari frames are not built here (envpool Atari needs a
  CNN policy that common.rl's PPO does not provide).
"""

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from common import envs, rl, run
from common.nets import orthogonal
from common.rl import Bonus, PPOConfig, RunningMeanStd, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + NGU's intrinsic reward; reward defaults are [1]'s (Sec. 2, App. A)."""

    env_id: str = "Navix-DoorKey-Random-16x16-v0"
    """environment id (the repo's grids, navix, gymnax; vector observations)"""
    total_timesteps: int = 50_000_000
    """environment steps"""
    num_envs: int = 64
    """parallel environments"""
    num_steps: int = 128
    """rollout length per env"""
    lr: float = 2.5e-4
    """Adam learning rate (policy, embedding and RND predictor), annealed linearly to 0"""
    num_epochs: int = 4
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount ([1]: gamma_min = 0.99 of the most exploratory policy of the family)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden sizes of the policy and value MLPs"""
    ext_coef: float = 1.0
    """weight of the extrinsic reward r^e (0: intrinsic only)"""
    beta: float = 0.3
    """[1] Sec. 2: r = r^e + beta r^i (0.3, the most exploratory policy; 0: plain PPO)"""
    num_neighbours: int = 10
    """[1] k: nearest neighbours of the episodic memory"""
    kernel_epsilon: float = 1e-4
    """[1] Eq. 2 eps of the inverse kernel [M] (rlax, deep_rl_zoo; [1] Sec. 2 text: 1e-3)"""
    pseudo_count_c: float = 1e-3
    """[1] Eq. 1 c: r^episodic = 1 / (sqrt(sum K) + c)"""
    cluster_distance: float = 8e-3
    """xi: normalised squared distances below it count as 0 (rlax / [1] App. A)"""
    max_similarity: float = 8.0
    """s_m: r^episodic = 0 when sqrt(sum K) + c exceeds it"""
    max_reward_scale: float = 5.0
    """[1] L: the lifelong multiplier is clipped to [1, L]"""
    memory_size: int = 30_000
    """episodic memory slots per env (a ring buffer; [1]: 30,000)"""
    reset_memory: bool = True
    """empty the memory at every episode start (False: the broken variant of the tests)"""
    embedding_dim: int = 32
    """size p of the controllable-state embedding f(x) ([1]: 32)"""
    embed_hidden: tuple[int, ...] = (64, 64)
    """hidden sizes of the embedding MLP f"""
    idf_hidden: int = 128
    """hidden units of the inverse-dynamics classifier h ([1]: one layer of 128)"""
    rnd_features: int = 128
    """output size of RND's target g and predictor g_hat ([1]: 128)"""
    rnd_hidden: tuple[int, ...] = (64, 64)
    """hidden sizes of RND's target and predictor MLPs"""
    dtype: str = "float32"
    """compute dtype of the embedding and RND networks: float32 or bfloat16 (accelerators)"""
    max_episode_steps: int = 100
    """grid / navix envs: episode cap in steps"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.batch_size} is not divisible by "
                             f"num_minibatches={self.num_minibatches}")
        for name in ("num_envs", "num_steps", "num_epochs", "num_minibatches", "num_neighbours",
                     "memory_size", "embedding_dim", "idf_hidden", "rnd_features",
                     "max_episode_steps", "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_neighbours > self.memory_size:
            raise ValueError(f"num_neighbours={self.num_neighbours} must be <= memory_size="
                             f"{self.memory_size} (lax.top_k over the slots)")
        for name in ("lr", "clip_coef", "max_grad_norm", "kernel_epsilon", "pseudo_count_c",
                     "max_similarity"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("ext_coef", "beta", "ent_coef", "vf_coef", "cluster_distance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.max_reward_scale < 1:
            raise ValueError(f"max_reward_scale={self.max_reward_scale} must be >= 1 (the "
                             "multiplier is clipped to [1, L])")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if min(self.hidden + self.embed_hidden + self.rnd_hidden, default=1) < 1:
            raise ValueError("hidden, embed_hidden and rnd_hidden must be sizes >= 1")


PRESETS = {
    # CPU demo: the 4-rooms grid (104 cells, reward only at the far goal), 8 envs x 32
    # steps, 100-step episodes; a memory of 128 slots holds a whole episode.
    "quick": dict(
        env_id="GridMaze-FourRooms",
        total_timesteps=8192,
        num_envs=8,
        num_steps=32,
        lr=1e-3,
        kernel_epsilon=1e-3,  # [1] Sec. 2's text: the value the quick numbers were measured at
        memory_size=128,
        embedding_dim=16,
        embed_hidden=(32,),
        idf_hidden=32,
        rnd_features=16,
        rnd_hidden=(32,),
    ),
    "paper": dict(),
}


# --- NETWORKS ---


class Embedding(nn.Module):
    """f: observation -> controllable state (R^p), with the inverse-dynamics head h."""

    hidden: tuple[int, ...]
    features: int
    idf_hidden: int
    num_actions: int
    obs_ndim: int = 1
    dtype: str = "float32"

    def setup(self):
        self.torso = [nn.Dense(f, kernel_init=orthogonal(), dtype=self.dtype) for f in self.hidden]
        self.out = nn.Dense(self.features, kernel_init=orthogonal(1.0), dtype=self.dtype)
        self.h1 = nn.Dense(self.idf_hidden, kernel_init=orthogonal(), dtype=self.dtype)
        self.h2 = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01), dtype=self.dtype)

    def embed(self, obs):
        x = obs.reshape(*obs.shape[: obs.ndim - self.obs_ndim], -1).astype(jnp.float32)
        for layer in self.torso:
            x = nn.relu(layer(x))
        return self.out(x).astype(jnp.float32)

    def inverse(self, e, e_next):
        """[1] Sec. 2: logits of p(a | x_t, x_t+1) = h(f(x_t), f(x_t+1))."""
        x = nn.relu(self.h1(jnp.concatenate([e, e_next], -1)))
        return self.h2(x).astype(jnp.float32)

    def __call__(self, obs, next_obs):
        return self.inverse(self.embed(obs), self.embed(next_obs))


class RNDNet(nn.Module):
    """[2]'s target g (`predictor=False`) or predictor g_hat (two more ReLU layers)."""

    predictor: bool
    hidden: tuple[int, ...]
    features: int
    obs_ndim: int = 1
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs.reshape(*obs.shape[: obs.ndim - self.obs_ndim], -1).astype(jnp.float32)
        for f in self.hidden:
            x = nn.leaky_relu(nn.Dense(f, kernel_init=orthogonal(), dtype=self.dtype)(x))
        if self.predictor:
            for _ in range(2):
                x = nn.relu(nn.Dense(x.shape[-1], kernel_init=orthogonal(), dtype=self.dtype)(x))
        return nn.Dense(self.features, kernel_init=orthogonal(), dtype=self.dtype)(x).astype(
            jnp.float32
        )


# --- EPISODIC MEMORY ---


def episodic_reward(memory, count, e, dm2_sum, dm2_count, *, k, eps, c, xi, s_max):
    """[1] Eq. 1-2 for ONE env: e against the valid slots of its ring buffer memory [M, D]
    (slots arange(M) < count). Returns (r^episodic, dm2_sum, dm2_count), the running mean
    d_m^2 = dm2_sum / dm2_count updated with the valid neighbours' squared distances first
    ([1]'s algorithm: update the moving average, then normalise)."""
    size = memory.shape[0]
    valid = jnp.arange(size) < jnp.minimum(count, size)
    d2 = jnp.sum((memory - e) ** 2, -1)  # (M,)
    neg, _ = jax.lax.top_k(jnp.where(valid, -d2, -jnp.inf), k)  # k nearest: (k,)
    d2_k, ok = -neg, jnp.isfinite(neg)
    dm2_sum = dm2_sum + jnp.where(ok, d2_k, 0.0).sum()
    dm2_count = dm2_count + ok.sum()
    dm2 = dm2_sum / jnp.maximum(dm2_count, 1)
    d_n = jnp.where(ok, d2_k, 0.0) / jnp.maximum(dm2, 1e-12)  # d^2 / d_m^2
    d_n = jnp.maximum(d_n - xi, 0.0)  # cluster distance
    kernel = jnp.where(ok, eps / (d_n + eps), 0.0)  # Eq. 2
    s = jnp.sqrt(kernel.sum()) + c
    return jnp.where(s > s_max, 0.0, 1.0 / s), dm2_sum, dm2_count  # Eq. 1


def write(memory, count, e, start):
    """Ring-buffer write of e: at an episode `start` the memory is reset by masking (count
    0, no slot cleared) and e goes to slot 0; else to slot count mod M."""
    count = jnp.where(start, 0, count)
    memory = memory.at[count % memory.shape[0]].set(e)
    return memory, count + 1


def lifelong_multiplier(err, err_norm: RunningMeanStd, L):
    """[1] Sec. 2: alpha = 1 + (err - mu_e) / sigma_e, clipped to [1, L]."""
    alpha = 1.0 + (err - err_norm.mean) / jnp.sqrt(err_norm.var + 1e-8)
    return jnp.clip(alpha, 1.0, L)


# --- BONUS ---


@struct.dataclass
class NGUStats:
    memory: jax.Array  # (N, M, D) ring buffers of embeddings
    count: jax.Array  # (N,) int32 writes this episode (valid slots: min(count, M))
    dm2_sum: jax.Array  # (N,) running sum of neighbours' squared distances
    dm2_count: jax.Array  # (N,) and their count: d_m^2 = sum / count (exact cumulative mean)
    ep_mean: jax.Array  # float32 () raw r^episodic mean of the last rollout (logged)
    err_norm: RunningMeanStd  # running mu_e, sigma_e^2 of the RND error
    target: dict  # RND's fixed random target g
    beta: jax.Array  # float32 [1] beta, traced (0: plain PPO)
    reset: jax.Array  # bool, traced: reset the memory at episode starts (False: broken)


def make_bonus(cfg: Config, env) -> Bonus:
    """NGU as a `common.rl.Bonus`: params {embed (f, h), predictor (g_hat)} train with the
    policy; memories, d_m^2, RND moments and the target are statistics."""
    obs_ndim = len(env.observation_shape)
    f = Embedding(
        cfg.embed_hidden, cfg.embedding_dim, cfg.idf_hidden, env.num_actions, obs_ndim, cfg.dtype
    )
    g = RNDNet(False, cfg.rnd_hidden, cfg.rnd_features, obs_ndim, cfg.dtype)
    g_hat = RNDNet(True, cfg.rnd_hidden, cfg.rnd_features, obs_ndim, cfg.dtype)
    kw = dict(k=cfg.num_neighbours, eps=cfg.kernel_epsilon, c=cfg.pseudo_count_c,
              xi=cfg.cluster_distance, s_max=cfg.max_similarity)
    n = cfg.num_envs

    def rnd_error(params, target, obs):
        return jnp.sum((g_hat.apply(params, obs) - g.apply(target, obs)) ** 2, -1)

    def init(key, obs):
        k_f, k_g, k_p = jax.random.split(key, 3)
        params = {"embed": f.init(k_f, obs, obs), "predictor": g_hat.init(k_p, obs)}
        e0 = f.apply(params["embed"], obs, method=Embedding.embed)  # (N, D)
        memory = jnp.zeros((n, cfg.memory_size, cfg.embedding_dim)).at[:, 0].set(e0)
        zeros = jnp.zeros(n)
        stats = NGUStats(
            memory,
            jnp.ones(n, jnp.int32),
            zeros,
            zeros,
            jnp.float32(0.0),
            RunningMeanStd.create(),
            g.init(k_g, obs),
            jnp.asarray(cfg.beta, jnp.float32),
            jnp.asarray(cfg.reset_memory),
        )
        return params, stats

    def reward(params, stats: NGUStats, b):
        e = f.apply(params["embed"], b["next_obs"], method=Embedding.embed)  # (T, N, D)
        err = rnd_error(params["predictor"], stats.target, b["next_obs"])  # (T, N)
        err_norm = stats.err_norm.update(err)
        mult = lifelong_multiplier(err, err_norm, cfg.max_reward_scale)
        ep_reward = jax.vmap(lambda m, c, x, s, q: episodic_reward(m, c, x, s, q, **kw))

        def step(carry, x):
            memory, count, s, q = carry
            e_t, done_t = x
            r, s_new, q_new = ep_reward(memory, count, e_t, s, q)  # (N,)
            # an episode end: no reward, and the new episode's first state is no sample
            # of the running d_m^2 against the old episode's memory
            s, q = jnp.where(done_t, s, s_new), jnp.where(done_t, q, q_new)
            memory, count = jax.vmap(write)(memory, count, e_t, done_t & stats.reset)
            return (memory, count, s, q), jnp.where(done_t, 0.0, r)

        (memory, count, s, q), r_ep = jax.lax.scan(
            step, (stats.memory, stats.count, stats.dm2_sum, stats.dm2_count), (e, b["done"])
        )
        r_i = r_ep * mult  # [1] Sec. 2, (T, N)
        new = stats.replace(memory=memory, count=count, dm2_sum=s, dm2_count=q,
                            ep_mean=r_ep.mean(), err_norm=err_norm)
        return stats.beta * r_i, new

    def loss(params, stats: NGUStats, mb):
        logits = f.apply(params["embed"], mb["obs"], mb["next_obs"])
        logp = jax.nn.log_softmax(logits)
        ce = -jnp.take_along_axis(logp, mb["action"][:, None].astype(jnp.int32), -1)[:, 0]
        real = 1.0 - mb["done"].astype(jnp.float32)  # next_obs of a done is a reset one
        l_idf = (ce * real).sum() / jnp.maximum(real.sum(), 1.0)
        l_rnd = rnd_error(params["predictor"], stats.target, mb["next_obs"]).mean() / (
            cfg.rnd_features
        )
        acc = ((logits.argmax(-1) == mb["action"]) * real).sum() / jnp.maximum(real.sum(), 1)
        return l_idf + l_rnd, {
            "losses/inverse_dynamics": l_idf,
            "losses/rnd": l_rnd,
            "charts/idf_accuracy": acc,
        }

    return Bonus(init, reward, loss)


# --- TRAIN ---


@struct.dataclass
class EpisodeCoverageState:
    inner: envs.CoverageState  # lifelong coverage (`visited`: any env, since the start)
    ep_visited: jax.Array  # (N, G, G) bool cells each env stepped on in its current episode
    ep_cells: jax.Array  # float32 () distinct cells summed over the finished episodes ...
    ep_done: jax.Array  # float32 () ... and their number, since the start


class EpisodeCoverage:
    """envs.Coverage plus NGU's own measure: distinct grid cells (info["position"]) stepped
    on per finished episode, summed since the start beside the episode count."""

    def __init__(self, env: envs.Coverage):
        self.env = env

    def __getattr__(self, name: str):
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    def reset(self, key):
        obs, inner = self.env.reset(key)
        g = self.env.grid
        z = jnp.float32(0.0)
        return obs, EpisodeCoverageState(inner, jnp.zeros((self.num_envs, g, g), bool), z, z)

    def step(self, state: EpisodeCoverageState, action, key):
        obs, inner, reward, done, info = self.env.step(state.inner, action, key)
        ep = state.ep_visited
        if "position" in info:
            pos = jnp.clip(info["position"], 0, self.env.grid - 1)
            ep = ep.at[jnp.arange(ep.shape[0]), pos[:, 0], pos[:, 1]].set(True)
        cells = ep.sum((1, 2)).astype(jnp.float32)
        new = EpisodeCoverageState(
            inner, ep & ~done[:, None, None], state.ep_cells + jnp.where(done, cells, 0.0).sum(),
            state.ep_done + done.sum(dtype=jnp.float32))
        return obs, new, reward, done, info


def make_env(cfg: Config):
    if cfg.env_id.startswith(("Navix-", "GridMaze-")):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return EpisodeCoverage(envs.Coverage(env, cfg.coverage_grid))


def ppo_config(cfg: Config) -> PPOConfig:
    """PPO's fields copied from cfg; r = ext_coef r^e + r^i (int_coef = 1): beta is
    applied inside the bonus, traced, so one program can run beta = 0 beside it."""
    return rl.ppo_config(cfg, ext_coef=cfg.ext_coef, int_coef=1.0)


def learner(cfg: Config):
    env = make_env(cfg)
    return make_ppo(env, ppo_config(cfg), None, make_bonus(cfg, env))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    cov = state.env_state
    metrics["charts/distinct_cells"] = cov.inner.visited.sum()
    # per-episode coverage: cells summed over the finished episodes, and their number, since
    # the start (a window's mean is the difference of both)
    metrics["charts/episode_cells_sum"], metrics["charts/episodes"] = cov.ep_cells, cov.ep_done
    st = state.bonus_stats
    metrics["charts/memory_size"] = jnp.minimum(st.count, cfg.memory_size).mean()
    metrics["charts/dm2"] = (st.dm2_sum / jnp.maximum(st.dm2_count, 1)).mean()
    metrics["charts/episodic_reward"] = st.ep_mean
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct cells visited by any env."""
    return {"distinct_cells": state.env_state.inner.visited.sum()}


# --- MAIN ---


def plot_coverage(out: str, argv=()):
    """Distinct cells over training: NGU, the same PPO with beta = 0, and the broken variant
    whose memory is never reset, each run through its command line with the same seeds."""
    import subprocess
    import sys
    import tempfile

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    _, opts = run.parse(Config, PRESETS, list(argv))
    arms = {
        "NGU": [],
        "PPO (beta 0)": ["--beta", "0"],
        "NGU, memory never reset": ["--no-reset-memory"],
    }
    curves = {}
    with tempfile.TemporaryDirectory() as d:
        for i, (label, extra) in enumerate(arms.items()):
            subprocess.run([sys.executable, __file__, *argv, *extra, "--no-progress",
                            "--log-every", "1", "--run-dir", f"{d}/{i}"], check=True)
            x, y, _ = plot.curve(plot.load(f"{d}/{i}"), "charts/distinct_cells")
            curves[label] = (x, y)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (x, y) in curves.items():
        ax.plot(x, y.mean(1), label=f"{label}: {np.median(y[-1]):.0f}")
        ax.fill_between(x, y.min(1), y.max(1), alpha=0.15)
    ax.set(
        xlabel="env steps",
        ylabel="distinct cells (of 104)",
        title=f"FourRooms, {opts.num_seeds} seeds (median at the end)",
    )
    ax.legend()
    fig.tight_layout()
    print({k: np.asarray(y[-1]).tolist() for k, (_, y) in curves.items()})
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        import sys  # pop_flags left the other flags in sys.argv when argv is None

        return plot_coverage(flags["--plot"], sys.argv[1:] if argv is None else argv)
    return run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=["distinct_cells", "charts/episodic_return", "charts/intrinsic_reward",
                      "charts/episodic_reward", "losses/inverse_dynamics", "losses/rnd",
                      "charts/idf_accuracy", "charts/memory_size"],
    )


if __name__ == "__main__":
    main()
