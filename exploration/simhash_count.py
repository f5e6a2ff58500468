"""PPO + count-based exploration with hashing: SimHash (E11) and a learned AE hash (E12).

[1] H. Tang, R. Houthooft, D. Foote, A. Stooke, X. Chen, Y. Duan, J. Schulman, F. De Turck,
    P. Abbeel. "#Exploration: A Study of Count-Based Exploration for Deep Reinforcement
    Learning." NIPS 2017, arXiv:1611.04717. Released code: hrtang/hash_exploration (Theano,
    rllab): launchers/exp-027.py (Table 1 SimHash), bonus_evaluators/hash/{sim_hash_v3,
    nary_hash}.py, bonus_evaluators/ale_hashing_bonus_evaluator.py. AE hash: the authors'
    sandbox florensacc/rllab-curriculum sandbox/rein/algos/embedding_theano2/
    launch_trpo_atari_img.py (an early version).

States are discretised by a hash function and counted; the count gives the classic bonus:

    phi(s) = sgn(A g(s)) in {-1, 1}^k,  A in R^{k x D}, A_ij ~ N(0, 1) fixed   [1] Eq. 2
    n(phi(s_m)) <- n(phi(s_m)) + 1 for every state of the batch, then          [1] Alg. 1
    r^+(s) = beta / sqrt(n(phi(s))),  PPO trains on r = r^e + r^+             [1] Eq. 1
  --hash ae (learned hash, [1] Sec. 2.3 / Alg. 2):
    b(s) = sigmoid(z(s) + u), u ~ U(-a, a) (noise only while training), D code units
    L = -1/N sum_n log p(s_n) + lambda/(N D) sum_n sum_i min((1 - b_i)^2, b_i^2)  [1] Eq. 3
    phi(s) = sgn(A' (2 round(b(s)) - 1)) in {-1, 1}^k, A' in R^{k x D}          [1] Sec. 2.3

The counts live in a count-min sketch, as in the released code (`nary_hash.py`, "6M"
tables): R rows of prime sizes p_j; the k-bit code c is keyed c mod p_j (computed as
sum_i c_i (2^i mod p_j) mod p_j), every row is incremented, and n is the min over rows.
Collisions: two codes share a count only if they collide in all R rows, and then n is
over-estimated (never under); SimHash itself maps near states to one code by design (the
granularity set by k). Bits with A g(s) = 0 read as -1.

Constants, checked against the released code: k = 256 and beta = 0.01 for pixel SimHash;
bucket sizes [999931, 999953, 999959, 999961, 999979, 999983]; bonus 1/sqrt(n); g = the
last of 4 stacked 42x42 grey frames scaled to [-1, 1]; frame skip 4, 30 no-op starts,
rewards clipped to [-1, 1], 4500-step episodes, gamma 0.99 (exp-027.py, atari_env.py). AE:
D = 512 code units, a 64-level pixel softmax reconstruction, Adam 3e-4 (the early launcher
above); lambda = 10, a = 0.3 and k = 64 for the AE code are [1] App. A from memory [M].

Reproduce (CPU demo, 30-50 s each on 2 cores; SimHash vs the same PPO with beta = 0):
    python exploration/simhash_count.py --preset quick --num-seeds 8
    python exploration/simhash_count.py --preset quick --num-seeds 8 --beta 0
    python exploration/simhash_count.py --preset quick --num-seeds 8 --hash ae
Measured (2-core CPU, 8 seeds, 2048 steps): distinct cells of FourRooms' 104, mean +- std
(median) SimHash 93.9 +- 5.5 (95), AE hash 88.6 +- 8.2 (88), PPO 67.9 +- 17.2 (64.5);
with [1]'s beta = 0.01 SimHash is PPO here (median 63.5), beta = 0.1 gives 86.5.
Paper setting (GPU; Freeway through envpool, pixel SimHash; `--hash ae` for AE-SimHash):
    python exploration/simhash_count.py --preset paper
[1] Table 1 [M] (50M steps, 5 seeds, mean): Freeway TRPO 16.5, pixel-SimHash 31.6,
AE-SimHash 33.5; Venture 121 / 263 / 445; Montezuma 0 / 0 / 75; Frostbite 2869 / 4683 /
5214. rllab continuous control (SwimmerGather etc.) is not available offline here.

Differences from the paper:
- PPO (common.rl.make_ppo, the hash as a Bonus) instead of TRPO with 100K-step batches,
  conjugate gradients and a conv value baseline. The paper preset uses PPO's Atari values
  (128 envs x 128 steps, lr 2.5e-4, clip 0.1, 4 epochs x 4 minibatches) and [1]'s NIPS-DQN
  conv torso (16 8x8/4, 32 4x4/2, dense 256) for the policy; total 50M steps [M].
- Counts are updated with the whole rollout before its bonuses are computed, as [1] Alg. 1
  writes it (so n >= 1). The released code computes the bonus from the counts before the
  batch, clamped at 1, and increments afterwards.
- Keys: the released code casts the {-1, 1} code to uint8 (-1 -> 255) before keying; we key
  the {0, 1} bits. Both are one-to-one on codes; the bucket of a code differs.
- The AE trains in PPO's minibatch steps on every rollout (one Adam, the AE loss added to
  PPO's), not "every few iterations on a replay pool" ([1] Alg. 2). Its codes (and thus
  the counts' meaning) move with it, as in [1]. One noise draw u per update is reused by
  all minibatches (the samples are shuffled, so each state sees new noise per epoch).
- AE architecture on pixels: [1]'s three 96-filter 6x6 stride-2 convs, dense 1024, D
  sigmoid units, dense 1024, dense, three 6x6 stride-2 deconvs and a 64-level softmax per
  pixel, but on the same 42x42 last frame as SimHash (not 52x52), SAME padding, a crop to
  42x42. Vector observations: an MLP AE with a Gaussian (squared-error) reconstruction.
- envpool Atari: no sticky actions by default (ALE of 2016); envpool's 84->42 resize.
- The CPU preset is the repo's 4-rooms grid with (row, col) observations; g(s) = s - 0.5
  centres them, so SimHash's k hyperplanes through the centre cut the grid into angular
  sectors (the rooms lie at different angles); k = 32, beta = 0.1 and small count tables.
"""

from dataclasses import dataclass

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import envs, rl, run
from common.nets import MLP, orthogonal
from common.rl import Bonus, PPOConfig, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + hash counting; hash defaults are [1]'s pixel SimHash (released exp-027.py)."""

    env_id: str = "Freeway-v5"
    """environment id (envpool Atari, navix, gymnax or the repo's own envs)"""
    total_timesteps: int = 50_000_000
    """environment steps ([1] Table 1: 50M [M])"""
    num_envs: int = 128
    """parallel environments"""
    num_steps: int = 128
    """rollout length"""
    lr: float = 2.5e-4
    """Adam learning rate (constant)"""
    num_epochs: int = 4
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount (released code: 0.99)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the policy and value MLPs"""
    hash: str = "simhash"
    """hash function: "simhash" (phi = sgn(A g(s)), E11) or "ae" (learned AE code, E12)"""
    k: int = 256
    """bits of the hash code (pixel SimHash: 256; AE code downsampled to 64 [M])"""
    beta: float = 0.01
    """bonus coefficient, r^+ = beta / sqrt(n) (0: plain PPO, counts still kept)"""
    bucket_sizes: tuple[int, ...] = (999931, 999953, 999959, 999961, 999979, 999983)
    """prime sizes of the count-min sketch's rows (released code's "6M" tables)"""
    obs_center: float = 0.0
    """vector observations: g(s) = s - obs_center (pixels: g maps [0, 255] to [-1, 1])"""
    ae_code_dim: int = 512
    """--hash ae: D, sigmoid units of the binary code layer"""
    ae_binary_weight: float = 10.0
    """--hash ae: lambda, weight of the push-to-binary term [M]"""
    ae_noise: float = 0.3
    """--hash ae: a, uniform noise U(-a, a) added before the sigmoid while training [M]"""
    ae_hidden: tuple[int, ...] = (64,)
    """--hash ae, vector observations: hidden sizes of the encoder (decoder mirrors it)"""
    ae_levels: int = 64
    """--hash ae, pixels: intensity levels of the per-pixel softmax reconstruction"""
    sticky_action_prob: float = 0.0
    """Atari only: repeat the previous action with this probability"""
    max_episode_steps: int = 4500
    """episode cap in agent steps ([1]: 4500; Atari steps are 4 frames)"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (grid envs)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    def validate(self):
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.batch_size} is not divisible by "
                             f"num_minibatches={self.num_minibatches}")
        if self.hash not in ("simhash", "ae"):
            raise ValueError(f"hash={self.hash!r} must be 'simhash' or 'ae'")
        for name in ("num_envs", "num_steps", "num_epochs", "num_minibatches", "k",
                     "ae_code_dim", "max_episode_steps", "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ae_levels < 2:
            raise ValueError(f"ae_levels={self.ae_levels} must be >= 2")
        if not self.bucket_sizes or min(self.bucket_sizes) < 2:
            raise ValueError(f"bucket_sizes={self.bucket_sizes} must be one or more sizes >= 2")
        if self.k * max(self.bucket_sizes) >= 2**31:
            raise ValueError(f"k * max(bucket_sizes) = {self.k * max(self.bucket_sizes)} "
                             "overflows the int32 keys (must be < 2^31)")
        for name in ("lr", "clip_coef", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("gamma", "gae_lambda", "sticky_action_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("beta", "ent_coef", "vf_coef", "ae_binary_weight", "ae_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if min(self.hidden + self.ae_hidden, default=1) < 1:
            raise ValueError(f"hidden={self.hidden} and ae_hidden={self.ae_hidden} "
                             "must be sizes >= 1")


PRESETS = {
    # CPU demo: the repo's 4-rooms grid (104 cells, start in one corner room, the only reward
    # in the opposite one), (row, col) observations; coverage is the measure.
    "quick": dict(env_id="GridMaze-FourRooms", total_timesteps=2048, num_envs=8, num_steps=32,
                  lr=1e-3, clip_coef=0.2, k=32, beta=1.0, bucket_sizes=(9973, 9967, 9949),
                  obs_center=0.5, ae_code_dim=16, ae_hidden=(32,), max_episode_steps=100),
    "paper": dict(),
}


# --- ENVIRONMENT ---


def make_env(cfg: Config):
    if cfg.is_atari:  # released code: 42x42 grey, 4 frames, frame skip 4, 30 no-ops
        env = envs.make(cfg.env_id, cfg.num_envs, img_height=42, img_width=42, stack_num=4,
                        noop_max=30, repeat_action_probability=cfg.sticky_action_prob,
                        max_episode_steps=cfg.max_episode_steps, episodic_life=False,
                        reward_clip=True)
    elif cfg.env_id in envs.GRID_MAPS or cfg.env_id.startswith("Navix-"):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid)  # stays 0 on Atari (no positions)


# --- NETWORKS ---


def last_frame(obs):
    """envpool frames (..., 4, 42, 42) uint8 -> the last frame (..., 42, 42) uint8."""
    return obs[..., -1, :, :]


def preprocess(obs, cfg: Config, pixels: bool, obs_ndim: int = 1):
    """g(s): pixels -> last frame in [-1, 1] flattened (released code); other observations
    (`obs_ndim` trailing axes, e.g. DeepSea's N x N board) -> s - c, flattened."""
    if pixels:
        x = last_frame(obs).astype(jnp.float32) / 255.0 * 2.0 - 1.0
        return x.reshape(*x.shape[:-2], -1)  # (..., 1764)
    x = obs.astype(jnp.float32) - cfg.obs_center
    return x.reshape(*x.shape[:x.ndim - obs_ndim], -1)


class PixelPolicy(nn.Module):
    """[1]'s policy torso (NIPS DQN: 16 8x8/4, 32 4x4/2, dense 256); policy and value heads."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        x = jnp.moveaxis(obs, -3, -1).astype(jnp.float32) / 255.0  # (..., 42, 42, 4)
        x = nn.relu(nn.Conv(16, (8, 8), (4, 4), "VALID", kernel_init=orthogonal())(x))
        x = nn.relu(nn.Conv(32, (4, 4), (2, 2), "VALID", kernel_init=orthogonal())(x))
        x = nn.relu(nn.Dense(256, kernel_init=orthogonal())(x.reshape(*x.shape[:-3], -1)))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(x)
        value = nn.Dense(1, kernel_init=orthogonal(1.0))(x)[..., 0]
        return distrax.Categorical(logits=logits), value


class AE(nn.Module):
    """[1] Sec. 2.3: encoder -> D sigmoid units b(s) -> decoder. Pixels: [1]'s conv AE on
    the last frame with a per-pixel softmax over `levels`; vectors: an MLP AE."""

    pixels: bool
    code_dim: int = 512
    hidden: tuple[int, ...] = (64,)
    levels: int = 64

    @nn.compact
    def __call__(self, x, noise=None):
        """x: g(s) (..., D_in). Returns (b, reconstruction); noise u is added before the
        sigmoid. Pixels: reconstruction = logits (..., 42, 42, levels)."""
        if self.pixels:
            h = x.reshape(*x.shape[:-1], 42, 42, 1)
            for _ in range(3):
                h = nn.relu(nn.Conv(96, (6, 6), (2, 2), "SAME")(h))  # 42 -> 21 -> 11 -> 6
            h = nn.relu(nn.Dense(1024)(h.reshape(*h.shape[:-3], -1)))
        else:
            h = MLP(self.hidden, activation=nn.relu)(x)
        z = nn.Dense(self.code_dim)(h)
        b = nn.sigmoid(z if noise is None else z + noise)
        if self.pixels:
            h = nn.relu(nn.Dense(1024)(b))
            h = nn.relu(nn.Dense(6 * 6 * 96)(h)).reshape(*b.shape[:-1], 6, 6, 96)
            for _ in range(3):
                h = nn.relu(nn.ConvTranspose(96, (6, 6), (2, 2), "SAME")(h))  # 6 -> 48
            return b, nn.Dense(self.levels)(h[..., 3:45, 3:45, :])  # (..., 42, 42, levels)
        return b, nn.Dense(x.shape[-1])(MLP(self.hidden[::-1], activation=nn.relu)(b))


# --- HASH AND COUNTS ---


def simhash_bits(A, x):
    """[1] Eq. 2: phi(s) = sgn(A g(s)); returns the bits (phi + 1) / 2 as bool (..., k)."""
    return x @ A.T > 0


def bucket_keys(bits, bucket_sizes):
    """Index of a k-bit code in each count-min row: sum_i bits_i 2^i mod p_j, (..., R)."""
    mods = np.array([[pow(2, i, p) for p in bucket_sizes] for i in range(bits.shape[-1])])
    keys = jnp.dot(bits.astype(jnp.int32), jnp.asarray(mods, jnp.int32),
                   preferred_element_type=jnp.int32)
    return keys % jnp.asarray(bucket_sizes, jnp.int32)


def count_query(table, keys):
    """n(phi(s)): the min over the R rows of the counts at the keys; table (R, P), keys
    (B, R) -> (B,)."""
    return table[jnp.arange(table.shape[0]), keys].min(-1)


def count_update(table, keys):
    """[1] Alg. 1: n(phi(s_m)) += 1 for every sample of the batch (repeats add up), then
    query. Returns (table, n) with n >= 1."""
    rows = jnp.broadcast_to(jnp.arange(table.shape[0]), keys.shape)
    table = table.at[rows, keys].add(1)
    return table, count_query(table, keys)


def count_bonus(n, beta):
    """[1] Eq. 1: r^+ = beta / sqrt(n)."""
    return beta / jnp.sqrt(n.astype(jnp.float32))


# --- LOSS ---


def binary_penalty(b):
    """[1] Eq. 3 second term without lambda: 1/(N D) sum_n sum_i min((1 - b_i)^2, b_i^2)."""
    return jnp.minimum((1.0 - b) ** 2, b**2).mean()


def reconstruction_nll(recon, x, pixels: bool, levels: int):
    """[1] Eq. 3 first term, -1/N sum_n log p(s_n): pixels, a categorical over `levels`
    intensities per pixel (x in [-1, 1]); vectors, a unit Gaussian (1/2 squared error)."""
    if pixels:
        target = jnp.clip(((x + 1.0) / 2.0 * levels).astype(jnp.int32), 0, levels - 1)
        logp = jax.nn.log_softmax(recon.reshape(*target.shape, levels))
        nll = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    else:
        nll = 0.5 * (recon - x) ** 2
    return nll.sum(-1).mean()


def ae_loss(params, ae: AE, x, key, *, binary_weight, noise):
    """[1] Eq. 3 with noise u ~ U(-a, a) before the sigmoid. Returns (loss, nll, penalty)."""
    u = jax.random.uniform(key, (*x.shape[:-1], ae.code_dim), minval=-noise, maxval=noise)
    b, recon = ae.apply(params, x, u)
    nll = reconstruction_nll(recon, x, ae.pixels, ae.levels)
    pen = binary_penalty(b)
    return nll + binary_weight * pen, nll, pen


def hash_bits(params, stats, x, ae: AE | None):
    """The k-bit code of g(s): SimHash of g(s), or SimHash of the rounded AE code."""
    if ae is None:
        return simhash_bits(stats["A"], x)
    b, _ = ae.apply(params, x)
    return simhash_bits(stats["A"], 2.0 * jnp.round(b) - 1.0)  # [1] Sec. 2.3: downsample


def make_bonus(cfg: Config, pixels: bool, obs_ndim: int = 1) -> Bonus:
    """The hash counts as a `common.rl.Bonus`: stats = {A, table, key, beta}; params = the
    AE. beta is a traced statistic, so one compiled program can run several betas (seeds
    with beta = 0 are plain PPO beside SimHash seeds)."""
    ae = AE(pixels, cfg.ae_code_dim, cfg.ae_hidden, cfg.ae_levels) if cfg.hash == "ae" else None

    def init(key, obs):
        k_a, k_ae, k_noise = jax.random.split(key, 3)
        x = preprocess(obs, cfg, pixels, obs_ndim)
        params = {} if ae is None else ae.init(k_ae, x)
        d = x.shape[-1] if ae is None else cfg.ae_code_dim
        table = jnp.zeros((len(cfg.bucket_sizes), max(cfg.bucket_sizes)), jnp.int32)
        return params, {"A": jax.random.normal(k_a, (cfg.k, d)), "table": table,
                        "key": k_noise, "beta": jnp.asarray(cfg.beta, jnp.float32)}

    def reward(params, stats, b):
        x = preprocess(b["obs"], cfg, pixels, obs_ndim)  # (T, N, D)
        bits = hash_bits(params, stats, x.reshape(-1, x.shape[-1]), ae)
        table, n = count_update(stats["table"], bucket_keys(bits, cfg.bucket_sizes))
        key, _ = jax.random.split(stats["key"])
        r = count_bonus(n, stats["beta"]).reshape(x.shape[:-1])  # (T, N)
        return r, {**stats, "table": table, "key": key}

    def loss(params, stats, mb):
        if ae is None:
            return 0.0, {}
        x = preprocess(mb["obs"], cfg, pixels, obs_ndim)
        total, nll, pen = ae_loss(params, ae, x, stats["key"],
                                  binary_weight=cfg.ae_binary_weight, noise=cfg.ae_noise)
        return total, {"losses/ae_reconstruction": nll, "losses/ae_binary": pen}

    return Bonus(init, reward, loss)


# --- TRAIN ---


def ppo_config(cfg: Config) -> PPOConfig:
    # clip_vloss=False: unclipped, the paper fits its baseline apart (TRPO)
    return rl.ppo_config(cfg, anneal_lr=False, clip_vloss=False)


def learner(cfg: Config):
    env = make_env(cfg)
    policy = PixelPolicy(env.num_actions) if cfg.is_atari else None  # None: rl.ActorCritic
    bonus = make_bonus(cfg, cfg.is_atari, len(env.observation_shape))
    return make_ppo(env, ppo_config(cfg), policy, bonus)


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    # occupied buckets of the fullest row: at most the number of distinct codes seen
    metrics["charts/hash_buckets"] = (state.bonus_stats["table"] > 0).sum(-1).max()
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct grid cells visited (0 on Atari)."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "charts/episodic_return",
                                               "charts/intrinsic_reward", "charts/hash_buckets"])


if __name__ == "__main__":
    main()
