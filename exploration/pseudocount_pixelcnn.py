"""PPO + pseudo-counts from a gated PixelCNN density model over frames (E9).

[1] G. Ostrovski, M. G. Bellemare, A. van den Oord, R. Munos. "Count-Based Exploration with
    Neural Density Models." ICML 2017, arXiv:1703.01310.
[2] M. G. Bellemare et al. "Unifying Count-Based Exploration and Intrinsic Motivation."
    NIPS 2016, arXiv:1606.01868 (the pseudo-count; exploration/pseudocount_cts.py).
[3] A. van den Oord et al. "Conditional Image Generation with PixelCNN Decoders." NIPS 2016,
    arXiv:1606.05328 (masked convolutions, type A / B; the multiplicative gate).
[4] A. A. Taiga et al. "On Bonus Based Exploration Methods in the Arcade Learning
    Environment." ICLR 2020; google-research/bonus_based_exploration, intrinsic_rewards.py
    (a released re-implementation of [1]'s bonus, read, not copied).

The pseudo-count of [2] needs rho'(x), the model's probability of x just after training on
x. A neural model has no closed-form "update a copy": [1] takes one SGD step on x and
re-evaluates, and since a neural model is not learning-positive and its gain does not shrink
like 1/n on its own, clips the gain at 0 and decays it:

    log rho_n(x) = sum_i log p_theta(x_i | x_<i)   (PixelCNN, raster order)      [3] Eq. 1
    theta' = theta - eta grad_theta(-log rho_n(x) / P)   (one SGD step on x, P pixels)
    PG_n(x) = log rho_theta'(x) - log rho_theta(x)                               [1] Sec. 3
    N_hat_n(x) = (exp(c n^-1/2 (PG_n(x))_+) - 1)^-1                              [1] Sec. 4
    r^+(x) = min(beta N_hat_n(x)^-1/2, 1)                                  [1] Sec. 4, [4]

n is the number of frames the model has been trained on; c = 0.1 ([4]'s ipd_scale). No
+0.01 under the root: [4]'s ipd_to_reward is N_hat^-1/2 (the CTS sibling keeps [2]'s
(N_hat + 0.01)^-1/2). [1]'s density model keeps a constant learning rate, which is why the
gain, not the step, is decayed by n^-1/2. PG is summed over pixels as per-pixel differences
(the two float32 frame sums, ~-1000 on Atari, would round it). The JAX angle:
`prediction_gain` (evaluate -> one SGD step -> re-evaluate) runs for every frame of the
rollout inside the jitted `update` (jax.lax.map in vmapped chunks of PG_CHUNK frames), each
frame from the same theta, and the whole learner is vmapped over seeds by common.run.

The density model ([1] Sec. 4 [M]; [4]'s network): one 7x7 masked convolution (type A, the
pixel itself hidden), two gated residual blocks (masked 3x3 type B convolution to 2F maps,
tanh(a) * sigmoid(b) [3] Eq. 2, a 1x1 convolution back to F, added), F = 16 feature maps,
a location-dependent embedding (H, W, 4) added to every gate and to the output, ReLU, a 1x1
convolution to 64 maps, ReLU, and a 1x1 convolution to the L = 8 logits of a 3-bit pixel.
Frames are 42x42 grey, 8 levels.

Reproduce (CPU demo; PixelCNN bonus vs the same PPO with beta = 0):
    python exploration/pseudocount_pixelcnn.py --preset quick --num-seeds 8
    python exploration/pseudocount_pixelcnn.py --preset quick --num-seeds 8 --beta 0
    python exploration/pseudocount_pixelcnn.py --plot exploration/pseudocount_pixelcnn.png
Quick-preset constants, calibrated at the bonus level without RL (loaded 2-core CPU): the
quick PixelCNN after 128 Adam steps of lr 1e-3 (n ~ 4,096 frames) on 32 DeepSea-16 cells'
frames (geometric visit weights); PG of those and of 16 unseen cells' frames for eta in
{0.03, 0.1, 0.3} x c in {0.5, 2, 8} at n = 4,096. PG is ~linear in eta (seen median 0.002,
0.006, 0.019 nats) and the unseen frames' median bonus is only 1.18-1.20 x the seen median
in every cell of the grid (1.41-1.45 x with a 10 x larger density lr, 2.5-2.7 x the 8 most
seen cells'): the target of >= 3 x is not reached. Taken: eta = 0.3, c = 8, beta = 1
(unseen median bonus 0.058, seen 0.049; the gap, ~0.01 a step, is 16 x DeepSea's move cost
0.01/16). Trained online (one Adam step of lr 1e-2 per frame; 8 DeepSea-8 cells, cell k seen
2^k times), the pseudo-counts at eta = 0.3, c = 8 rank the true counts: Spearman 0.90, the
untrained model -0.57 (the slow test). Not measured: the quick preset's three-arm RL run
(bonus, beta = 0, untrained density model); an earlier try at eta = c = beta = 0.5 (4 seeds,
stopped at update 10 of 16) saw 125.0 vs 117.75 median distinct cells of 153, inside the
seed spread.
Paper setting (GPU; Montezuma's Revenge through envpool; rooms visited is the measure):
    python exploration/pseudocount_pixelcnn.py --preset paper
[1] reports scores, not rooms [M]: DQN-PixelCNN (with the mixed Monte-Carlo return) and
DQN-CTS both beat DQN on Montezuma's Revenge, DQN-PixelCNN beats DQN-CTS on 52 of 57 games
(a third-party summary; not checked in the paper); Reactor-PixelCNN improves on Reactor.

Differences from the paper:
- The learner is the repo's PPO (common.rl.make_ppo with the density model as a Bonus), not
  DQN with the mixed Monte-Carlo return ([1] Sec. 5; not built: PPO's GAE(0.95) returns
  stand in, and [1] shows the MMC return is key to its Montezuma result) or Reactor. PPO's Atari
  values for the paper preset (128 envs x 128 steps, lr 2.5e-4, clip 0.1); A3C's torso on
  envpool's 42x42 grey frames (4 stacked); 50M agent steps = 200M frames.
- The density model is trained by the Bonus's loss (mean per-pixel NLL of each minibatch's
  frames) inside PPO's Adam steps (4 epochs x 4 minibatches per rollout, the global-norm
  clip of 0.5 shared with the policy, so a large density gradient can shrink the policy's
  step; the split is not measured), not online with RMSProp one frame at a time [1]; every
  frame is trained on (4 times). rho' is a separate, virtual plain-SGD step of `pg_lr` on
  the per-pixel mean NLL from the rollout's theta, for every frame in parallel (frames of one
  rollout do not see each other); [4] measures rho' after its real optimiser step (RMSProp,
  lr 1e-4, momentum 0.9, eps 1e-4, one frame). The PG scale therefore depends on eta and the
  loss scale (an untrained model on a blocky 42x42 frame: PG 15.7 nats at eta 1e-3, 1,735
  at 0.1); eta = 1e-3 is this file's choice, not a value from [1] or [4].
- n counts frames fed to the model (agent steps x envs); in the rollout, frame k of B gets
  n_before + k + 1 (time-major, env-minor), as if online.
- The gate's 3x3 convolution and the location embedding follow [4]'s released network; [1]'s
  text describes 1x1 residual blocks [M]. The gate is tanh * sigmoid as in [3] ([4] adds).
- Inputs scaled to [-1, 1] ([4] feeds the raw levels 0..7); lecun_normal / lecun_uniform
  initialisers ([4]: uniform variance scaling).
- beta = 0.1 [M] is not supported by [4], which scales the bonus by 0.001 (DQN) and 0.5
  (Rainbow); eta (above) is not from a source.
- c n^-1/2 PG_+ is capped at 25 (float32 exp overflow; only reached by a large c at small n)
  and r^+ at MAX_BONUS = 1 ([1]'s DQN clips the total reward at 1; here only the bonus).
- Only image observations (Atari, DeepSea): a vector observation is refused by `validate`.
- CPU preset: gymnax DeepSea (bsuite), an N x N binary image (1 where the agent is): 2 levels,
  no downsampling; coverage (distinct cells) is the measure.
"""

from dataclasses import dataclass

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import envs, rl, run
from common.nets import NatureCNN, orthogonal
from common.rl import Bonus, PPOConfig, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + PixelCNN pseudo-count bonus; density-model and bonus defaults are [1]'s."""

    env_id: str = "MontezumaRevenge-v5"
    """environment id (envpool Atari, or gymnax DeepSea-bsuite-<N>: an N x N image)"""
    total_timesteps: int = 50_000_000
    """environment steps (200M frames)"""
    num_envs: int = 128
    """parallel environments"""
    num_steps: int = 128
    """rollout length"""
    lr: float = 2.5e-4
    """Adam learning rate (constant) of the policy and of the density model"""
    num_epochs: int = 4
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
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
    """non-pixel observations: hidden sizes of the policy and value MLPs"""
    beta: float = 0.1
    """bonus scale, r^+ = beta N_hat^-1/2 ([M]; [4]: 0.001 DQN, 0.5 Rainbow; 0: plain PPO)"""
    pg_scale: float = 0.1
    """c of the prediction-gain decay c n^-1/2 ([1] Sec. 4, [4]'s ipd_scale)"""
    pg_lr: float = 1e-3
    """eta, learning rate of the virtual SGD step on x that gives rho' (this file's choice)"""
    levels: int = 8
    """L, quantisation levels of a pixel ([1]: 3 bits)"""
    obs_high: float = 256.0
    """observations lie in [0, obs_high): level = floor(x L / obs_high) (Atari: 256)"""
    features: int = 16
    """F, feature maps of the masked convolutions and gated blocks ([1]: 16)"""
    num_blocks: int = 2
    """gated residual blocks ([1]: 2)"""
    out_features: int = 64
    """feature maps of the 1x1 convolution before the logits ([1]: 64)"""
    dtype: str = "float32"
    """compute dtype of the PixelCNN's convolutions ("bfloat16" on accelerators)"""
    frame_size: int = 42
    """Atari: side of the downsampled grey frame the model and policy see ([1]: 42)"""
    sticky_action_prob: float = 0.0
    """Atari only: repeat the previous action with this probability"""
    max_episode_steps: int = 4500
    """Atari episode cap in agent steps (18,000 frames)"""
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
            raise ValueError(
                f"total_timesteps={self.total_timesteps} is less than one rollout "
                f"(num_envs * num_steps = {self.batch_size})"
            )
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.batch_size} is not divisible by "
                f"num_minibatches={self.num_minibatches}"
            )
        if self.levels < 2:
            raise ValueError(f"levels={self.levels} must be >= 2")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("beta", "pg_scale", "ent_coef", "vf_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("obs_high", "lr", "pg_lr", "clip_coef", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("features", "out_features", "frame_size", "max_episode_steps",
                     "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 0")
        if not (self.is_atari or self.env_id.startswith("DeepSea-bsuite-")):
            raise ValueError(
                f"env_id={self.env_id!r}: the PixelCNN needs image observations, an envpool "
                "Atari id (*-v5) or DeepSea-bsuite-<N>"
            )
        if not self.is_atari:
            envs.check_id(self.env_id)


PRESETS = {
    # CPU demo: bsuite DeepSea N = 16 as an image (16 x 16 binary, 2 levels); 136 cells of
    # the lower triangle plus the 17 end positions below it; coverage is the measure.
    "quick": dict(
        env_id="DeepSea-bsuite-16",
        total_timesteps=8192,
        num_envs=16,
        num_steps=32,
        lr=1e-3,
        clip_coef=0.2,
        levels=2,
        obs_high=2.0,
        # calibrated at the bonus level (module docstring): unseen frames ~0.06, seen ~0.05
        pg_lr=0.3,
        pg_scale=8.0,
        beta=1.0,
    ),
    "paper": dict(),
}


# --- ENVIRONMENT ---


def make_env(cfg: Config):
    if cfg.is_atari:  # 42x42 grey, 4 frames, frame skip 4 (envpool's preprocessing)
        env = envs.make(
            cfg.env_id,
            cfg.num_envs,
            img_height=cfg.frame_size,
            img_width=cfg.frame_size,
            stack_num=4,
            repeat_action_probability=cfg.sticky_action_prob,
            max_episode_steps=cfg.max_episode_steps,
            episodic_life=False,
            reward_clip=True,
        )
        return envs.Coverage(env, cfg.coverage_grid, rooms=True)
    return envs.Coverage(envs.make(cfg.env_id, cfg.num_envs), cfg.coverage_grid)


def frames_of(obs, cfg: Config):
    """The quantised frames the density model sees, int32 (..., H, W): Atari's last (newest)
    stacked frame, DeepSea's N x N image as it is; level = floor(x L / obs_high) clipped to
    [0, L - 1]."""
    x = obs[..., -1, :, :] if cfg.is_atari else obs
    q = jnp.floor(x.astype(jnp.float32) * (cfg.levels / cfg.obs_high)).astype(jnp.int32)
    return jnp.clip(q, 0, cfg.levels - 1)


# --- NETWORKS ---


class PixelPolicy(nn.Module):
    """A3C's torso (NIPS DQN: 16 8x8/4, 32 4x4/2, dense 256) with policy and value heads."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        x = NatureCNN(features=256, layers=((16, 8, 4), (32, 4, 2)))(jnp.moveaxis(obs, -3, -1))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(x)
        value = nn.Dense(1, kernel_init=orthogonal(1.0))(x)[..., 0]
        return distrax.Categorical(logits=logits), value


def causal_mask(k: int, mask_type: str):
    """[3] Fig. 1: a k x k kernel sees the rows above and the pixels to the left in its own
    row; type B also the centre (a pixel's own features), type A not (the input pixel)."""
    m = np.zeros((k, k), np.float32)
    m[: k // 2] = 1.0
    m[k // 2, : k // 2 + (mask_type == "B")] = 1.0
    return m


class MaskedConv(nn.Module):
    """A 'SAME' k x k convolution whose kernel is multiplied by `causal_mask` (one image
    channel in, so no channel masking is needed)."""

    features: int
    k: int
    mask_type: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(),
                       (self.k, self.k, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        w = w * causal_mask(self.k, self.mask_type)[:, :, None, None]
        # patches (B, H, W, C k k) then a matmul, not a convolution with the kernel: vmapped
        # over per-frame params (`prediction_gain`) this stays a batched matmul, where a
        # convolution becomes a grouped one that XLA:CPU compiles and runs very slowly
        patches = jax.lax.conv_general_dilated_patches(
            x.astype(self.dtype), (self.k, self.k), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        w = jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, self.features)  # (C k k, F)
        return patches @ w.astype(self.dtype) + b.astype(self.dtype)


class PixelCNN(nn.Module):
    """Gated PixelCNN of [1] / [4]: frames (B, H, W) int levels -> logits (B, H, W, L)."""

    levels: int
    features: int = 16
    num_blocks: int = 2
    out_features: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        f, dt = self.features, self.dtype
        inp = (2.0 * x / (self.levels - 1) - 1.0)[..., None]  # levels -> [-1, 1]
        emb = self.param("embedding", nn.initializers.lecun_uniform(), (*x.shape[-2:], 4))
        h = MaskedConv(f, 7, "A", dt)(inp)  # the pixel itself is hidden
        for _ in range(self.num_blocks):  # [3] Eq. 2: y = tanh(W_f * h) . sigmoid(W_g * h)
            g = MaskedConv(2 * f, 3, "B", dt)(h) + nn.Dense(2 * f, dtype=dt)(emb)
            a, b = jnp.split(g, 2, -1)
            h = h + nn.Dense(f, dtype=dt)(jnp.tanh(a) * jax.nn.sigmoid(b))
        h = nn.relu(h + nn.Dense(f, dtype=dt)(emb))
        h = nn.relu(nn.Dense(self.out_features, dtype=dt)(h))  # 1x1 convolutions
        return nn.Dense(self.levels, dtype=dt)(h).astype(jnp.float32)


def make_density(cfg: Config) -> PixelCNN:
    return PixelCNN(cfg.levels, cfg.features, cfg.num_blocks, cfg.out_features,
                    jnp.dtype(cfg.dtype))


# --- PREDICTION GAIN, PSEUDO-COUNT, BONUS ---


def pixel_log_probs(net, params, x):
    """log p(x_i | x_<i) of each pixel of one frame x (H, W): (H W,)."""
    logp = jax.nn.log_softmax(net.apply(params, x[None])[0], -1)
    return jnp.take_along_axis(logp, x[..., None], -1).reshape(-1)


def density_loss(net, params, frames):
    """Mean per-pixel negative log-likelihood of a batch of frames (B, H, W)."""
    logp = jax.nn.log_softmax(net.apply(params, frames), -1)
    return -jnp.take_along_axis(logp, frames[..., None], -1).mean()


def prediction_gain(net, params, x, lr):
    """[1] Sec. 3 for one frame x (H, W): log rho(x); theta' = theta - lr grad(mean NLL of
    x), one SGD step; PG = log rho_theta'(x) - log rho_theta(x), summed over pixels as
    per-pixel differences. Returns (log_rho, pg). Two forwards and one backward: the
    per-pixel log-probs come out of value_and_grad as its aux."""

    def mean_log_prob(p):
        lp = pixel_log_probs(net, p, x)
        return lp.mean(), lp

    (_, lp), grad = jax.value_and_grad(mean_log_prob, has_aux=True)(params)
    new = jax.tree.map(lambda p, g: p + lr * g, params, grad)  # descent on -log rho / P
    return lp.sum(), (pixel_log_probs(net, new, x) - lp).sum()


MAX_GAIN = 25.0
"""Cap of the decayed gain c n^-1/2 PG_+ (exp overflows float32 past ~88; [4] caps its CTS
gain at 25): a pseudo-count of at least e^-25."""

MAX_BONUS = 1.0
"""Cap of r^+ (beta e^12.5 = 26,834 at beta = 0.1 without it): [1]'s DQN clips the total
reward at 1."""

PG_CHUNK = 1024
"""Frames whose per-frame virtual steps run at once in `reward` (jax.lax.map's batch_size):
the per-frame gradients and parameter copies (~5 MB a frame at the paper size) are live for
one chunk only, not for all 16,384 frames of a paper rollout (~80 GB)."""


def decayed_gain(pg, n, c):
    """c n^-1/2 PG_+, capped at MAX_GAIN."""
    return jnp.minimum(c * jax.lax.rsqrt(n) * jnp.maximum(pg, 0.0), MAX_GAIN)


def pseudo_count(pg, n, c):
    """[1] Sec. 4: N_hat = (exp(c n^-1/2 PG_+) - 1)^-1 (inf where PG <= 0)."""
    return 1.0 / jnp.expm1(decayed_gain(pg, n, c))


def count_bonus(pg, n, c, beta):
    """[1] Sec. 4: r^+ = beta N_hat^-1/2 = beta (exp(c n^-1/2 PG_+) - 1)^1/2 (0 where
    PG <= 0), written without the count so that N_hat = inf gives 0, not nan; capped at
    MAX_BONUS."""
    return jnp.minimum(beta * jnp.sqrt(jnp.expm1(decayed_gain(pg, n, c))), MAX_BONUS)


def make_bonus(cfg: Config) -> Bonus:
    """The PixelCNN pseudo-count as a `common.rl.Bonus`: params = the PixelCNN (trained by
    `loss` in PPO's steps); stats = n (frames fed so far), beta (traced, so seeds with
    beta = 0 run plain PPO in the same program) and the last rollout's median pseudo-count
    and prediction gain."""
    net = make_density(cfg)

    def init(key, obs):
        params = net.init(key, frames_of(obs[:1], cfg))
        return params, {
            "n": jnp.zeros((), jnp.float32),
            "beta": jnp.asarray(cfg.beta, jnp.float32),
            "count": jnp.zeros(()),
            "pg": jnp.zeros(()),
        }

    def reward(params, stats, b):
        frames = frames_of(b["obs"], cfg)
        t, e = frames.shape[:2]
        frames = frames.reshape(t * e, *frames.shape[2:])  # time-major, env-minor order
        _, pg = jax.lax.map(lambda x: prediction_gain(net, params, x, cfg.pg_lr), frames,
                            batch_size=min(PG_CHUNK, t * e))
        n = stats["n"] + jnp.arange(1, t * e + 1, dtype=jnp.float32)  # as if online
        r = count_bonus(pg, n, cfg.pg_scale, stats["beta"]).reshape(t, e)
        return r, {
            **stats,
            "n": n[-1],
            "count": jnp.median(pseudo_count(pg, n, cfg.pg_scale)),
            "pg": jnp.median(pg),
        }

    def loss(params, stats, mb):
        nll = density_loss(net, params, frames_of(mb["obs"], cfg))
        return nll, {"losses/density_nll": nll}

    return Bonus(init, reward, loss)


# --- TRAIN ---


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, anneal_lr=False)


def learner(cfg: Config):
    env = make_env(cfg)
    policy = PixelPolicy(env.num_actions) if cfg.is_atari else None  # None: rl.ActorCritic
    return make_ppo(env, ppo_config(cfg), policy, make_bonus(cfg))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    metrics["charts/pseudo_count"] = state.bonus_stats["count"]
    metrics["charts/prediction_gain"] = state.bonus_stats["pg"]
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct grid cells (Atari: rooms) visited."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def plot_runs(out: str, seeds: int = 8):
    """Distinct cells against env steps on the quick preset, `seeds` seeds each: the
    PixelCNN pseudo-count bonus and the same PPO with beta = 0."""
    import matplotlib.pyplot as plt

    from common import plot

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for color, label, over in (
        ("C0", "PixelCNN pseudo-count", {}),
        ("C1", "PPO (beta = 0)", {"beta": 0.0}),
    ):
        c = Config(**{**PRESETS["quick"], **over})
        train = jax.jit(jax.vmap(run.make_train(init, update, c)))
        _, metrics = train(jax.random.split(jax.random.PRNGKey(0), seeds))
        cells = np.asarray(metrics["charts/distinct_cells"])  # (seeds, updates)
        steps = np.arange(1, cells.shape[1] + 1) * c.batch_size
        ax.plot(steps, np.median(cells, 0), color=color, label=label)
        ax.fill_between(steps, cells.min(0), cells.max(0), color=color, alpha=0.2)
        print(label, cells[:, -1])
    ax.set(
        xlabel="environment steps",
        ylabel="distinct cells visited",
        title=f"DeepSea-16 as an image, {seeds} seeds (median, min-max)",
    )
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[
            "distinct_cells",
            "charts/episodic_return",
            "charts/intrinsic_reward",
            "charts/pseudo_count",
        ],
    )


if __name__ == "__main__":
    main()
