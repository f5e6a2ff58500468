"""PPO + Episodic Curiosity (EC) through reachability.

[1] N. Savinov, A. Raichuk, R. Marinier, D. Vincent, M. Pollefeys, T. Lillicrap, S. Gelly.
    "Episodic Curiosity through Reachability." ICLR 2019, arXiv:1810.02274. Released code:
    google-research/episodic-curiosity (episodic_memory.py, curiosity_env_wrapper.py,
    r_network_training.py, constants.py, third_party/keras_resnet/models.py and the
    `ppo_plus_eco` settings of scripts/launcher_script.py, commit 2bdc10d).

A reachability network (R-network) judges whether two observations lie within k steps of
each other. Each environment keeps an episodic memory of embeddings; an observation that
the memory can reach within k steps is not novel, one that it cannot is rewarded and stored:

    e = E(o),  C(e_i, e_j) = softmax(MLP([e_i, e_j]))_1  in [0, 1]            [1] Sec. 2
    pairs from one episode: label 1 if |i - j| <= k, 0 if |i - j| > gamma k   [1] Sec. 2
    L_R = cross-entropy(C(E(o_i), E(o_j)), label)                             [1] Sec. 2
    C^M(e) = F(C(e_1, e), ..., C(e_|M|, e)),  F = 90th percentile            [1] Sec. 2
    b = alpha (beta - C^M(e)),  r = r^task + b                                [1] Sec. 2
    add e to M when beta - C^M(e) > b_novelty; M full: overwrite a random slot [1] Sec. 2
    M is emptied at the end of an episode (the next episode's first e is stored)

The R-network trains online on the agent's own experience ("ECO", the released launcher's
`ppo_plus_eco` row of [1] Table 1): the last `history_size` observations of every
env are kept, and each PPO minibatch adds L_R on `r_batch_size` pairs drawn from them.

Reproduce (CPU demo on the noisy-TV maze, EC against the same PPO with alpha = 0; the plot
runs both and adds RND, a "surprise" bonus, from exploration/rnd.py on the same budget):
    python exploration/episodic_curiosity.py --preset quick --num-seeds 8
    python exploration/episodic_curiosity.py --preset quick --num-seeds 8 --bonus-scale 0
    python exploration/episodic_curiosity.py --preset quick --num-seeds 4 \
        --plot exploration/episodic_curiosity.png
Measured after the review fixes (beta = 1, memory re-embedded, ReLU on the join; quiet
2-core CPU, quick preset, 8192 steps, 8 seeds, 15 s compile + 2.4 s per command): distinct
cells of the noisy-TV maze's 104, EC median 103 (101-104, mean 102.6) vs PPO with alpha = 0
median 89 (64-102, mean 86.6); a positive episodic return in the last update: EC 3 of 8, PPO
2 of 8; EC's memories hold ~5 entries, its R-networks reach a balanced accuracy (mean of the
positive and the negative class's accuracies, chance 0.5) of 0.79 (mean) on their last
minibatch's valid pairs. Before the fixes (beta = 0.5, stored embeddings) EC scored median
80 vs PPO 88 on the same budget.
The plot's run (4 seeds, loaded 2-core CPU, 3 min for the three commands): distinct cells EC
104 / 103 / 104 / 104, PPO 78 / 82 / 96 / 99, RND 102 / 103 / 102 / 101: on this maze the noisy
TV does not hold RND back either.
Paper setting (GPU): python exploration/episodic_curiosity.py --preset paper
[1] (abstract, v1): in VizDoom the agent navigates to a distant goal at least 2 times
faster than ICM; in DMLab it reaches the goal at least 2 times more often than ICM on test
mazes with very sparse reward; it avoids the "couch-potato" behaviour of surprise bonuses.

Differences from the paper:
- Environment: neither DMLab nor VizDoom runs here (envpool's MyWayHome hung on its jitted
  step, see exploration/icm.py), so both presets use the repo's four-rooms grid with an
  uncontrollable noisy TV in the start room (GridMaze-FourRooms-NoisyTV), vector
  observations (row, col)/12 plus the 8 TV features. E is then an MLP; the ResNet-18
  embedding (`ResNet18`, [1] Sec. 2) is used for pixel observations (3-d obs) only.
- R-network: the released ResNet-18 (BN-ReLU blocks, 512-d output) and comparator (ReLU of
  [e_i, e_j], 4 x dense 512 ReLU, softmax over 2) without batch normalisation (stateless
  networks in one jitted update); E and C train together (released
  trainable_bottom_network=True). The released keras_resnet convs use he_normal
  initialisation and L2 1e-4; here Flax's default (lecun_normal) and no weight decay (PPO's
  Adam would apply it to the policy as well). The memory keeps observations (a pixel memory
  of 12 x 200 x 84x84x4 bytes is 68 MB) and re-embeds them at every rollout.
- Online training: the released code trains the R-network for 10 epochs (batch 64, Keras
  Adam at its default 1e-3) after every 60,000 vectorised steps, on the pairs of the last
  60,000 steps. Here the R-network's loss joins every PPO minibatch (r_batch_size pairs
  drawn from the history of the same length), in the same Adam step and learning-rate
  schedule as the policy, and under PPO's global gradient-norm clip of 0.5, which the
  policy's and the R-network's gradients share (a large R-network gradient shrinks the
  policy's step). Positives: a random gap in [1, k] either way; negatives: a
  uniform step of the same episode more than gamma k away (as released); pairs across an
  episode boundary or out of the history are dropped and the loss is the mean of the
  positive and the negative classes' cross-entropies (the released sampler draws 50/50
  labels).
- gamma = 5 is the released code's NEGATIVE_SAMPLE_MULTIPLIER; the issue's 1.2 could not
  be verified in the paper's text here. k = 5 (MAX_ACTION_DISTANCE).
- beta = 1, not the released 0.5: [1] Sec. 2 advises beta = 0.5 for fixed-duration
  episodes (DMLab, VizDoom) and beta = 1 where an episode can have variable length; the
  grid's episodes end at the goal, and with beta = 0.5 every revisit earns a negative
  reward, which pays the agent to end episodes early.
- Insertion: the released code stores e when C^M(e) < 0.5 (similarity_threshold); here
  when beta - C^M(e) > b_novelty with b_novelty = beta - 0.5 = 0.5, the same rule, on the
  unscaled bonus so that it holds while alpha is 0 (warm-up, or the PPO baseline).
- The bonus is switched off (alpha = 0) for the first `bonus_start_steps` steps of every
  env (released: exploration_reward_min_step = 60,000), and is 0 on the step that ends an
  episode (as released); the switch is checked once per rollout, so it comes on at the
  first rollout boundary after bonus_start_steps (60,160 steps for the paper preset). It
  is computed after the rollout from the observations the envs moved to; the policy never
  sees the memory, so within a rollout this equals doing it step by step. The released
  R-network changes only every 60,000 steps; here it takes num_epochs x num_minibatches
  Adam steps per rollout, so the memory is re-embedded with the current E at each rollout
  (its embeddings never mix two R-networks).
- PPO: common.rl's learner (value clip, per-minibatch advantage normalisation, global
  clip 0.5) with the released hyperparameters (12 envs x 256 steps, 4 epochs x 4
  minibatches, lr 2.5e-4 annealed, gamma 0.99, lambda 0.95, clip 0.1, entropy 0.00205);
  the released clip range also anneals, ours does not; MLP policy, not the CNN.
"""

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from common import envs, rl, run
from common.nets import orthogonal
from common.rl import Bonus, PPOConfig, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + EC; defaults are the released `ppo_plus_eco` DMLab settings of [1]."""

    env_id: str = "GridMaze-FourRooms-NoisyTV"
    """environment id (the repo's grids, navix, gymnax; envpool pixels use the ResNet)"""
    total_timesteps: int = 20_000_000
    """environment steps ([1] Table 1: 20M)"""
    num_envs: int = 12
    """parallel environments (released launcher: 12)"""
    num_steps: int = 256
    """rollout length per env (released train_policy: nsteps 256)"""
    lr: float = 2.5e-4
    """Adam learning rate, annealed linearly to 0 (released train_policy)"""
    num_epochs: int = 4
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon (released: 0.1, annealed)"""
    ent_coef: float = 0.002053525026457146
    """entropy bonus coefficient (released ppo_plus_eco)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden sizes of the policy and value MLPs"""
    bonus_scale: float = 0.03017241379310345
    """[1] Sec. 2 alpha: b = alpha (beta - C^M) (released scale_surrogate_reward; 0: PPO)"""
    bonus_offset: float = 1.0
    """[1] Sec. 2 beta: 1 for episodes of variable length (the grids end at the goal), 0.5
    for fixed-length ones (released DMLab)"""
    novelty_threshold: float = 0.5
    """b_novelty: store e in M when beta - C^M(e) exceeds it (beta - 0.5: the released
    rule C^M < 0.5)"""
    memory_size: int = 200
    """episodic memory capacity per env (released EpisodicMemory.capacity)"""
    percentile: float = 90.0
    """aggregation F of the similarities to the memory: this percentile (100: max)"""
    reachable_steps: int = 5
    """k: pairs at most k steps apart are reachable (released MAX_ACTION_DISTANCE)"""
    negative_gap: float = 5.0
    """gamma: pairs more than gamma k steps apart are unreachable (released: 5)"""
    history_size: int = 60_000
    """steps per env kept to draw R-network pairs from (released observation_history_size;
    pixels: 60,000 x 12 envs x 84x84x4 bytes is 20 GB, use a smaller one)"""
    r_batch_size: int = 64
    """R-network pairs per PPO minibatch (released batch 64)"""
    bonus_start_steps: int = 60_000
    """steps per env before the bonus is switched on (released exploration_reward_min_step)"""
    embedding_dim: int = 512
    """size of the embedding e (released EMBEDDING_DIM)"""
    embed_hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the embedding MLP E"""
    comparator_hidden: tuple[int, ...] = (512, 512, 512, 512)
    """hidden sizes of the comparator MLP C (released: 4 x 512)"""
    dtype: str = "float32"
    """compute dtype of the R-network (E and C): float32 or bfloat16 (accelerators)"""
    max_episode_steps: int = 100
    """grid envs: episode cap in steps"""
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
        for name in ("num_envs", "num_steps", "num_epochs", "num_minibatches", "memory_size",
                     "reachable_steps", "r_batch_size", "embedding_dim", "max_episode_steps",
                     "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.history_size < self.num_steps:
            raise ValueError(f"history_size={self.history_size} must be >= num_steps="
                             f"{self.num_steps} (one rollout)")
        for name in ("lr", "clip_coef", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("bonus_scale", "ent_coef", "vf_coef", "bonus_start_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile={self.percentile} must be in [0, 100]")
        if not 0 <= self.bonus_offset <= 1:
            raise ValueError(f"bonus_offset={self.bonus_offset} must be in [0, 1] (C is one)")
        if not -1 <= self.novelty_threshold < 1:
            raise ValueError(f"novelty_threshold={self.novelty_threshold} must be in [-1, 1)")
        if self.negative_gap < 1:
            raise ValueError(f"negative_gap={self.negative_gap} must be >= 1 (negatives lie "
                             "beyond the positives)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if min(self.hidden + self.embed_hidden + self.comparator_hidden, default=1) < 1:
            raise ValueError("hidden, embed_hidden and comparator_hidden must be sizes >= 1")


PRESETS = {
    # CPU demo: the noisy-TV maze, 8 envs x 32 steps; a small R-network, pairs from the last
    # 256 steps of every env, the bonus on from the start and scaled to the grid's rewards.
    "quick": dict(total_timesteps=8192, num_envs=8, num_steps=32, lr=1e-3, clip_coef=0.2,
                  ent_coef=0.01, bonus_scale=0.1, history_size=256, bonus_start_steps=0,
                  embedding_dim=16, embed_hidden=(32,), comparator_hidden=(32, 32),
                  r_batch_size=64),
    "paper": dict(),
}


# --- NETWORKS ---


class ResNet18(nn.Module):
    """[1]'s embedding E for pixels: conv 7x7/2 64, max-pool 3/2, 4 stages of 2 basic blocks
    (64, 128, 256, 512 filters, stride 2 from the second stage), global average pool,
    dense `features` (released keras_resnet without batch normalisation)."""

    features: int = 512
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):  # (..., H, W, C) in [0, 1]
        conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), padding="SAME", dtype=self.dtype)
        x = nn.max_pool(nn.relu(conv(64, 7, 2)(x)), (3, 3), (2, 2), padding="SAME")
        for i, f in enumerate((64, 128, 256, 512)):
            for j in range(2):
                s = 2 if (i > 0 and j == 0) else 1
                y = conv(f, 3, 1)(nn.relu(conv(f, 3, s)(nn.relu(x))))
                if s > 1 or x.shape[-1] != f:
                    x = nn.Conv(f, (1, 1), (s, s), dtype=self.dtype)(x)
                x = x + y
        x = nn.relu(x).mean((-3, -2))
        return nn.Dense(self.features, dtype=self.dtype)(x)


class RNetwork(nn.Module):
    """Siamese R-network ([1] Sec. 2): embedding E and comparator C. `compare` returns the
    logits of (unreachable, reachable); C = softmax(logits)[..., 1]."""

    pixels: bool
    embed_hidden: tuple[int, ...]
    embedding_dim: int
    comparator_hidden: tuple[int, ...]
    dtype: str = "float32"
    obs_ndim: int = 1

    def setup(self):
        if self.pixels:
            self.E = ResNet18(self.embedding_dim, self.dtype)
        else:
            self.E = nn.Sequential([*(layer for h in self.embed_hidden for layer in (
                nn.Dense(h, dtype=self.dtype, kernel_init=orthogonal()), nn.tanh)),
                nn.Dense(self.embedding_dim, dtype=self.dtype)])
        # released _top_network: concat -> ReLU -> 4 x (dense 512 -> ReLU) -> dense 2
        self.C = nn.Sequential([nn.relu, *(layer for h in self.comparator_hidden for layer in (
            nn.Dense(h, dtype=self.dtype), nn.relu)), nn.Dense(2, dtype=self.dtype)])

    def embed(self, obs):
        if self.pixels:  # envpool frames (..., C, H, W) uint8
            x = jnp.moveaxis(obs, -3, -1).astype(jnp.float32) / 255.0
        else:
            x = obs.reshape(*obs.shape[:obs.ndim - self.obs_ndim], -1).astype(jnp.float32)
        return self.E(x).astype(jnp.float32)

    def compare(self, e1, e2):
        return self.C(jnp.concatenate([e1, e2], -1)).astype(jnp.float32)

    def __call__(self, o1, o2):
        return self.compare(self.embed(o1), self.embed(o2))


def reachability(rnet: RNetwork, params, e1, e2):
    """C(e1, e2): the probability that e1 and e2 are within k steps ([1] Sec. 2)."""
    return jax.nn.softmax(rnet.apply(params, e1, e2, method=RNetwork.compare))[..., 1]


# --- EPISODIC MEMORY ---


def aggregate(similarities, valid, percentile):
    """[1] Sec. 2: C^M = the `percentile`-th percentile of the similarities of the valid
    slots (linear interpolation, as np.percentile); 0 for an empty memory (released)."""
    n = valid.sum()
    s = jnp.sort(jnp.where(valid, similarities, jnp.inf))  # valid values first, ascending
    pos = percentile / 100.0 * jnp.maximum(n - 1, 0)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    v = s[lo] + (pos - lo) * (s[hi] - s[lo])
    return jnp.where(n > 0, v, 0.0)


def insert(memory, count, e, add, key):
    """Store e in slot `count` while the memory has room, else in a uniformly random slot
    (released EpisodicMemory(replacement='random')); count counts every insertion. memory
    and e may be pytrees (e.g. an observation and its embedding), written to one slot."""
    size = jax.tree.leaves(memory)[0].shape[0]
    idx = jnp.minimum(jnp.where(count < size, count, jax.random.randint(key, (), 0, size)),
                      size - 1)
    memory = jax.tree.map(lambda m, x: jnp.where(add, m.at[idx].set(x), m), memory, e)
    return memory, count + add.astype(count.dtype)


def memory_step(memory, count, e, similarities, done, key, *, beta, novelty_threshold,
                percentile):
    """One env, one step: the novelty beta - C^M(e) against the memory, then the memory
    update: at an episode end it restarts with e alone, else e is stored when the novelty
    exceeds b_novelty. Returns (memory, count, novelty); the novelty is 0 where done."""
    size = jax.tree.leaves(memory)[0].shape[0]
    valid = jnp.arange(size) < jnp.minimum(count, size)
    novelty = beta - aggregate(similarities, valid, percentile)
    add = done | (novelty > novelty_threshold)
    memory, count = insert(memory, jnp.where(done, 0, count), e, add, key)
    return memory, count, jnp.where(done, 0.0, novelty)


# --- PAIRS AND LOSS ---


def pair_labels(t1, t2, same_episode, *, k, gap):
    """[1] Sec. 2: (label, valid) of pairs of steps (t1, t2): reachable (1) when
    0 < |t1 - t2| <= k, unreachable (0) when |t1 - t2| > gap k; pairs in between, across
    episodes (`same_episode` False) or of one step with itself are not used."""
    d = jnp.abs(t1 - t2)
    label = d <= k
    return label, same_episode & (d > 0) & (label | (d > gap * k))


def sample_pairs(key, num, episode, filled, *, k, gap):
    """`num` pairs of history indices (t1, t2) and their env ids, from the episode ids
    [H, N] (non-decreasing along H in each env): env uniform, t1 uniform over the filled
    part (the last `filled` of H steps); t2 = t1 +- [1, k] for half of them (candidate
    positives); for the other half t2 is drawn uniformly from t1's own episode at more than
    gap k steps from t1 (the released generate_negative_example: the negative comes from
    the same trajectory, outside [i - gamma k, i + gamma k]); t2 = t1 (an invalid pair)
    where the episode holds no such step or t2 leaves the filled part."""
    h, n = episode.shape
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    first = h - jnp.minimum(filled, h)
    env = jax.random.randint(k5, (num,), 0, n)
    t1 = jax.random.randint(k1, (num,), first, h)
    near = t1 + jax.random.randint(k2, (num,), 1, k + 1) * jnp.where(
        jax.random.bernoulli(k3, 0.5, (num,)), 1, -1)
    cols, ids = episode[:, env].T, episode[t1, env]  # [num, H], [num]
    lo = jnp.maximum(jax.vmap(lambda c, e: jnp.searchsorted(c, e, side="left"))(cols, ids),
                     first)
    hi = jax.vmap(lambda c, e: jnp.searchsorted(c, e, side="right"))(cols, ids)
    g = jnp.floor(gap * k).astype(t1.dtype)  # |t2 - t1| >= g + 1 > gap k
    left = jnp.maximum(t1 - g - lo, 0)  # lo .. t1 - g - 1
    right = jnp.maximum(hi - (t1 + g + 1), 0)  # t1 + g + 1 .. hi - 1
    u = jnp.floor(jax.random.uniform(k4, (num,)) * (left + right)).astype(t1.dtype)
    far = jnp.where(u < left, lo + u, t1 + g + 1 + u - left)
    far = jnp.where(left + right > 0, far, t1)
    t2 = jnp.where(jnp.arange(num) % 2 == 0, near, far)
    t2 = jnp.where((t2 < first) | (t2 >= h), t1, t2)  # out of range: invalid d=0
    return t1, t2, env


def balanced_cross_entropy(logits, label, valid):
    """L_R: mean over the valid positives and mean over the valid negatives of
    -log p(label), averaged over the two classes (the released sampler's 50/50 labels).
    Also returns the balanced accuracy (mean of the two classes' accuracies; 0.5 is chance,
    whatever the share of positives)."""
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.where(label, logp[..., 1], logp[..., 0])
    hit = (logits[..., 1] > logits[..., 0]) == label
    pos, neg = valid & label, valid & ~label
    mean = lambda x, m: (x * m).sum() / jnp.maximum(m.sum(), 1)
    return 0.5 * (mean(ce, pos) + mean(ce, neg)), 0.5 * (mean(hit, pos) + mean(hit, neg))


def r_network_loss(rnet, params, history, episode, filled, key, *, num, k, gap):
    """L_R on `num` pairs drawn from the history [H, N, ...] (episode ids [H, N]): pairs of
    one env, each env drawn uniformly."""
    t1, t2, env = sample_pairs(key, num, episode, filled, k=k, gap=gap)
    label, valid = pair_labels(t1, t2, episode[t1, env] == episode[t2, env], k=k, gap=gap)
    logits = rnet.apply(params, history[t1, env], history[t2, env])
    return balanced_cross_entropy(logits, label, valid)


# --- BONUS ---


@struct.dataclass
class ECStats:
    memory: jax.Array  # (N, M, ...) episodic memories of observations, one per env
    count: jax.Array  # (N,) int32 insertions this episode (slots used: min(count, M))
    history: jax.Array  # (H, N, ...) the last H observations of every env, oldest first
    episode: jax.Array  # (H, N) int32 episode id of each of them
    episode_now: jax.Array  # (N,) int32 id of the episode each env is in
    filled: jax.Array  # int32 steps of the history filled so far
    steps: jax.Array  # int32 steps per env so far
    key: jax.Array
    alpha: jax.Array  # float32 [1] Sec. 2 alpha, traced (0: the same PPO without the bonus)


def make_bonus(cfg: Config, rnet: RNetwork, num_envs: int) -> Bonus:
    """EC as a `common.rl.Bonus`: the R-network's params train with the policy's; the
    memories, the history of observations and alpha are its statistics."""

    def init(key, obs):
        k_net, k_stats = jax.random.split(key)
        params = rnet.init(k_net, obs, obs)
        h = cfg.history_size
        zero_i = jnp.zeros((), jnp.int32)
        stats = ECStats(
            memory=jnp.zeros((num_envs, cfg.memory_size, *obs.shape[1:]), obs.dtype),
            count=jnp.zeros(num_envs, jnp.int32),
            history=jnp.zeros((h, *obs.shape), obs.dtype), episode=jnp.zeros((h, num_envs),
                                                                              jnp.int32),
            episode_now=jnp.zeros(num_envs, jnp.int32), filled=zero_i, steps=zero_i,
            key=k_stats, alpha=jnp.asarray(cfg.bonus_scale, jnp.float32))
        return params, stats

    def reward(params, stats: ECStats, b):
        t_len = b["done"].shape[0]
        embed = lambda o: rnet.apply(params, o, method=RNetwork.embed)
        e = embed(b["next_obs"])  # (T, N, D)
        # The memory keeps observations and re-embeds them with the current E, so that C
        # never compares embeddings of two different R-networks (the R-network trains
        # between rollouts, within an episode).
        mem_e = embed(stats.memory)  # (N, M, D)
        key, k_mem = jax.random.split(stats.key)
        step_fn = jax.vmap(lambda m, c, e, s, d, k: memory_step(
            m, c, e, s, d, k, beta=cfg.bonus_offset, novelty_threshold=cfg.novelty_threshold,
            percentile=cfg.percentile))

        def step(carry, x):
            memory, count = carry  # memory: (observations, their embeddings)
            o_t, e_t, done_t, k_t = x
            sims = reachability(rnet, params, jnp.broadcast_to(e_t[:, None], memory[1].shape),
                                memory[1])  # (N, M)
            memory, count, novelty = step_fn(memory, count, (o_t, e_t), sims, done_t,
                                             jax.random.split(k_t, e_t.shape[0]))
            return (memory, count), novelty

        ((memory, _), count), novelty = jax.lax.scan(
            step, ((stats.memory, mem_e), stats.count),
            (b["next_obs"], e, b["done"], jax.random.split(k_mem, t_len)))
        on = stats.steps >= cfg.bonus_start_steps  # released exploration_reward_min_step
        r = jnp.where(on, stats.alpha, 0.0) * novelty  # [1] Sec. 2, (T, N)
        # The history of observations the R-network draws its pairs from: obs[t] belongs to
        # the episode that began after the last done before t.
        done = b["done"].astype(jnp.int32)
        episode = stats.episode_now + jnp.cumsum(done, 0) - done  # (T, N)
        h = cfg.history_size
        new = stats.replace(
            memory=memory, count=count,
            history=jnp.concatenate([stats.history, b["obs"]])[-h:],
            episode=jnp.concatenate([stats.episode, episode])[-h:],
            episode_now=stats.episode_now + done.sum(0),
            filled=jnp.minimum(stats.filled + t_len, h), steps=stats.steps + t_len, key=key)
        return r, new

    def loss(params, stats: ECStats, mb, key):
        l_r, acc = r_network_loss(rnet, params, stats.history, stats.episode, stats.filled,
                                  key, num=cfg.r_batch_size, k=cfg.reachable_steps,
                                  gap=cfg.negative_gap)
        return l_r, {"losses/reachability": l_r, "charts/r_accuracy": acc}

    return Bonus(init, reward, loss, needs_key=True)


# --- TRAIN ---


def make_env(cfg: Config):
    if cfg.env_id.endswith("-v5"):
        env = envs.make(cfg.env_id, cfg.num_envs)
    elif cfg.env_id.startswith("Navix-") or cfg.env_id.startswith("GridMaze-"):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.env_id.endswith("-v5"))


def networks(cfg: Config, env) -> RNetwork:
    obs_ndim = len(env.observation_shape)
    return RNetwork(pixels=obs_ndim == 3, embed_hidden=cfg.embed_hidden,
                    embedding_dim=cfg.embedding_dim, comparator_hidden=cfg.comparator_hidden,
                    dtype=cfg.dtype, obs_ndim=obs_ndim)


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg)


def learner(cfg: Config):
    env = make_env(cfg)
    return make_ppo(env, ppo_config(cfg), None, make_bonus(cfg, networks(cfg, env),
                                                            cfg.num_envs))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    metrics["charts/memory_size"] = jnp.minimum(state.bonus_stats.count,
                                                cfg.memory_size).mean()
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct cells visited by any env."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def plot_coverage(out: str, argv=()):
    """Distinct cells over training on the noisy-TV maze: EC, the same PPO with alpha = 0
    (`--bonus-scale 0`), and RND (exploration/rnd.py's quick preset on the same budget), each
    run through its command line (the runner's chunked, jitted path) with the same seeds."""
    import subprocess
    import sys
    import tempfile

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    cfg, opts = run.parse(Config, PRESETS, list(argv))
    common_flags = ["--no-progress", "--log-every", "1"]
    arms = {"EC": [__file__, *argv],
            "PPO (no bonus)": [__file__, *argv, "--bonus-scale", "0"],
            "RND (surprise)": ["exploration/rnd.py", "--preset", "quick", "--env-id",
                               cfg.env_id, "--total-timesteps", str(cfg.total_timesteps),
                               "--num-seeds", str(opts.num_seeds)]}
    curves = {}
    with tempfile.TemporaryDirectory() as d:
        for i, (label, cmd) in enumerate(arms.items()):
            subprocess.run([sys.executable, *cmd, *common_flags, "--run-dir", f"{d}/{i}"],
                           check=True)
            x, y, _ = plot.curve(plot.load(f"{d}/{i}"), "charts/distinct_cells")
            curves[label] = (x, y)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (x, y) in curves.items():
        ax.plot(x, y.mean(1), label=f"{label}: {np.median(y[-1]):.0f}")
        ax.fill_between(x, y.min(1), y.max(1), alpha=0.15)
    ax.set(xlabel="env steps", ylabel="distinct cells (of 104)",
           title=f"FourRooms + noisy TV, {opts.num_seeds} seeds (median at the end)")
    ax.legend()
    fig.tight_layout()
    print({k: np.asarray(y[-1]).tolist() for k, (_, y) in curves.items()})
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        import sys  # pop_flags left the other flags in sys.argv when argv is None

        return plot_coverage(flags["--plot"], sys.argv[1:] if argv is None else argv)
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "charts/episodic_return",
                                               "charts/intrinsic_reward", "charts/r_accuracy",
                                               "losses/reachability", "charts/memory_size"])


if __name__ == "__main__":
    main()
