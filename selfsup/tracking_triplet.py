"""Tracking triplets: a siamese CNN learns that the first and last patch of a tracked moving
object look alike, and unlike patches of other tracks (cosine triplet ranking loss).

[1] X. Wang, A. Gupta. "Unsupervised Learning of Visual Representations using Videos."
    ICCV 2015, arXiv:1505.00687. [code] github.com/xiaolonw/caffe-video_triplet (the
    released Caffe prototxt, solver and RankHardLoss layer, read for the sizes). Items
    marked [M] are from memory of the paper, not checked against its text.

Patch mining ([1] Sec. 3.1): moving points (SURF + IDT, displacement > 0.5 px) select a
patch in a frame, a tracker follows it over 30 frames; the first and last patch (x, x+)
are a positive pair. Here (declared): a frame-difference motion mask stands in for IDT,
    m(p) = 1[ max_c |I_1(p) - I_0(p)| > diff_threshold ]                      (motion)
each sprite's P x P patch around its centre at frame 0 is scored by the fraction of moving
pixels in it, the best-scoring sprite is kept if that fraction is >= min_motion (a static
sprite is dropped), and common/video.py's ground-truth track stands in for the tracker.
Encoder f: a shared (siamese, triplet) CNN, the last layer ReLU then L2-normalised ([code]).
    D(x1, x2) = 1 - f(x1) . f(x2) / (|f(x1)| |f(x2)|)                        ([1] Eq. 1)
    L = max(0, D(x, x+) - D(x, x-) + M) + (lambda / 2) |W|^2,  M = 0.5       ([1] Eq. 2)
x- are K = 4 patches of the batch from the other pairs (their x and x+): drawn at random
first, then (after `hard_after` steps) the K that maximise L (hard-negative mining [1]
Sec. 3.3). The loss is averaged over the valid pairs and their K negatives. Sampling,
mining, selection and the step run in one jitted `update`; the runner vmaps it over seeds.

Evaluation (fixed held-out videos from PRNGKey(EVAL_KEY), made in the program): retrieval
top-1, given x, rank x+ among the N held-out pairs' x+ by cosine (chance 1 / N), and
frozen-feature probes (common/probe.py, linear and k-NN, all labels and 10 per class) of
f(x) for the sprite's shape (disk / square: read from its mask, since common/video.py does
not return shapes), against the same encoder at init.

Reproduce (CPU demo, 32x32 grey frames, 16x16 patches, a small CNN):
    python selfsup/tracking_triplet.py --preset quick --plot selfsup/tracking_triplet.png
Measured (1 seed, 400 steps of 32 pairs, 10 min wall / 99 CPU-s, loaded 2-core CPU): held-out
retrieval top-1 0.396 among 64 pairs (chance 0.016; an encoder at init 0.094); loss 0.33
(steps 1-50, random negatives) -> 0.41 (steps 350-400, half of them hard); 87% of the
videos pass the miner. Shape probes (disk / square, chance 0.5) of f(x), trained (init):
linear 0.852 (0.716), 10/class 0.690 (0.500), k-NN 0.846 (0.642), 10/class 0.746 (0.478).
Hard negatives from the start of the loss with a ReLU feature (the [code]'s fc7) collapsed
every feature to 0 within 100 Adam steps (loss stuck at M): the feature here is linear.
Paper setting (GPU; procedural videos in place of 100K YouTube videos, 227x227 patches):
    python selfsup/tracking_triplet.py --preset paper
[1] reports 47.2% mAP on VOC 2007 detection (R-CNN, fine-tuned) from the video-only
network, against 54.4% from ImageNet labels [M].

Differences from the paper:
- Procedural sprite videos (common/video.py), not YouTube; motion mask by frame difference
  and ground-truth tracks (no SURF, IDT or KCF tracker); one pair per video.
- AlexNet without LRN or groups, SAME padding, no crops or mean subtraction; the feature
  layer (fc7) is linear before the L2 norm (ReLU in [code]: it collapsed here, see above).
- Negatives: [1]'s text, random for the first epochs then the top-K hardest [M: the epoch
  count]; the released layer mixes half hard, half random throughout and also adds the
  symmetric term from x+ with margin 1 on -cos: here [1]'s one-sided Eq. 2 with M = 0.5.
- The shape label of the probes is read from the sprite's mask (corner pixels), built
  here from common/video.py's outputs (it does not return shapes).
- `quick`: 32x32 frames, 16x16 patches, a 2-conv CNN to 64 features, Adam, hard mining
  (half of K) from step 100, 400 steps.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import probe, run
from common import video as vid
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Tracking triplets; defaults are [1]'s and its released code's (227 patches, 30-frame
    tracks, M = 0.5, K = 4, AlexNet to a 1024-d feature, SGD lr 1e-3, 40 pairs per batch)."""

    frame_size: int = 454
    """side of the square video frames (twice the patch: room for the track to move)"""
    patch_size: int = 227
    """side of the square patches x, x+, x- (AlexNet's input)"""
    num_frames: int = 30
    """frames per track: x is cut at frame 0, x+ at the last frame"""
    num_sprites: int = 2
    """sprites per video (tracks the miner chooses from)"""
    channels: int = 3
    """3: RGB (a random colour per sprite); 1: grey"""
    radius: tuple[float, float] = (0.06, 0.12)
    """range of a sprite's radius, in frame sides"""
    speed: tuple[float, float] = (0.0, 0.04)
    """range of a sprite's speed, frame sides per frame (slow ones are mined out)"""
    noise_std: float = 0.02
    """std of fresh pixel noise in every frame"""
    diff_threshold: float = 0.1
    """a pixel moves when its frame-0 to frame-1 difference exceeds this (the IDT stand-in)"""
    min_motion: float = 0.01
    """a track is kept when this fraction of its first patch's pixels moves"""
    margin: float = 0.5
    """M of the ranking loss"""
    num_negatives: int = 4
    """K negatives per pair, from the batch"""
    hard_after: int = 100_000
    """updates with random negatives before hard mining (the top-K losses) starts [M]"""
    hard_fraction: float = 0.5
    """fraction of the K negatives that are the hardest once mining starts ([code]: 0.5)"""
    conv_channels: tuple[int, ...] = (96, 256, 384, 384, 256)
    """output channels of the convolutions (AlexNet conv1-5)"""
    conv_kernels: tuple[int, ...] = (11, 5, 3, 3, 3)
    """kernel side of each convolution"""
    conv_strides: tuple[int, ...] = (4, 1, 1, 1, 1)
    """stride of each convolution"""
    pool_after: tuple[int, ...] = (1, 2, 5)
    """convolutions (1-based) followed by a 3x3 stride-2 max pool"""
    fc_features: tuple[int, ...] = (4096, 1024)
    """widths of the ReLU fc layers; the last is the feature f ([code]: fc6 4096, fc7 1024)"""
    batch_size: int = 40
    """pairs (videos) per step ([code]: 80 patches)"""
    num_steps: int = 400_000
    """optimiser steps ([code] max_iter)"""
    optimizer: str = "sgd"
    """"sgd" (momentum, [code]) or "adam" (the CPU demo)"""
    lr: float = 1e-3
    """learning rate ([code] base_lr; no step schedule here)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """lambda: L2 decay added to every gradient"""
    num_eval_pairs: int = 64
    """held-out pairs of the retrieval (chance 1 / num_eval_pairs)"""
    probe_train: int = 1000
    """held-out patches (shape labels) the probes are fit on"""
    probe_test: int = 1000
    """held-out patches the probes are scored on"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients on CPU"""
    dtype: str = "float32"
    """compute dtype of convs and dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # pairs per update

    def spec(self) -> vid.VideoSpec:
        s = self.frame_size
        return vid.VideoSpec(size=s, num_frames=self.num_frames, num_sprites=self.num_sprites,
                             channels=self.channels, radius=(self.radius[0] * s,
                                                             self.radius[1] * s),
                             speed=(self.speed[0] * s, self.speed[1] * s),
                             noise_std=self.noise_std)

    def validate(self):
        if not 1 <= self.patch_size <= self.frame_size:
            raise ValueError(f"patch_size={self.patch_size} must be in [1, frame_size="
                             f"{self.frame_size}]")
        if self.num_frames < 2 or self.num_sprites < 1:
            raise ValueError(f"num_frames={self.num_frames} must be >= 2 and num_sprites="
                             f"{self.num_sprites} >= 1")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels} must be 1 or 3")
        if not 0 < self.radius[0] <= self.radius[1] < 0.25:
            raise ValueError(f"radius={self.radius} must satisfy 0 < low <= high < 0.25")
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed={self.speed} must satisfy 0 <= low <= high")
        if self.margin <= 0 or not 0 <= self.min_motion < 1 or self.diff_threshold <= 0:
            raise ValueError(f"margin={self.margin} and diff_threshold={self.diff_threshold} "
                             f"must be > 0, min_motion={self.min_motion} in [0, 1)")
        if not 0 <= self.hard_fraction <= 1:
            raise ValueError(f"hard_fraction={self.hard_fraction} must be in [0, 1]")
        if not 1 <= self.num_negatives <= 2 * self.batch_size - 2:
            raise ValueError(f"num_negatives={self.num_negatives} must be in [1, 2 * "
                             f"batch_size - 2 = {2 * self.batch_size - 2}]")
        n = len(self.conv_channels)
        if n < 1 or len(self.conv_kernels) != n or len(self.conv_strides) != n:
            raise ValueError(f"conv_channels={self.conv_channels}, conv_kernels="
                             f"{self.conv_kernels}, conv_strides={self.conv_strides} must be "
                             "non-empty and of equal length")
        if not all(1 <= p <= n for p in self.pool_after):
            raise ValueError(f"pool_after={self.pool_after} must name convolutions in [1, {n}]")
        if len(self.fc_features) < 1 or min(self.fc_features) < 1:
            raise ValueError(f"fc_features={self.fc_features} must be non-empty and >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 2 <= self.num_eval_pairs <= self.probe_train + self.probe_test:
            raise ValueError(f"num_eval_pairs={self.num_eval_pairs} must be in [2, "
                             "probe_train + probe_test]")
        if 2 * self.probe_per_class > self.probe_train // 2:
            raise ValueError(f"probe_per_class={self.probe_per_class} x 2 must be <= "
                             "probe_train / 2")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 colour frames, 16x16 patches, a 2-conv CNN to 64 features, Adam.
    "quick": dict(frame_size=32, patch_size=16, radius=(0.08, 0.14),
                  speed=(0.0, 0.05), conv_channels=(16, 32), conv_kernels=(5, 3),
                  conv_strides=(1, 1), pool_after=(1, 2), fc_features=(128, 64),
                  batch_size=32, num_steps=400, hard_after=100, optimizer="adam", lr=1e-3,
                  weight_decay=0.0, probe_train=500, probe_test=500, shift_conv=True),
    "paper": dict(),
}


# --- PATCH MINING ---


def crop(frame, centre, size: int):
    """The size x size patch of a frame (S, S, C) around centre (y, x), shifted to stay
    inside the frame (dynamic_slice clamps the corner)."""
    corner = jnp.round(centre - size / 2).astype(jnp.int32)
    return jax.lax.dynamic_slice(frame, (corner[0], corner[1], 0),
                                 (size, size, frame.shape[-1]))


def motion_score(f0, f1, centres, cfg: Config):
    """(K,) fraction of moving pixels (Eq. motion) in each centre's patch of frame 0."""
    moving = (jnp.abs(f1 - f0).max(-1, keepdims=True) > cfg.diff_threshold).astype(
        jnp.float32)
    return jax.vmap(lambda c: crop(moving, c, cfg.patch_size).mean())(centres)


def mine_pair(video: vid.Video, cfg: Config):
    """One video's pair: the most moving sprite's first and last patch (x, x+), whether it
    passed the miner (valid) and which sprite it is."""
    score = motion_score(video.frames[0], video.frames[1], video.pos[0], cfg)
    k = jnp.argmax(score)
    x = crop(video.frames[0], video.pos[0, k], cfg.patch_size)
    x_pos = crop(video.frames[-1], video.pos[-1, k], cfg.patch_size)
    return x, x_pos, score[k] >= cfg.min_motion, k


def shape_label(video: vid.Video, k):
    """1 if sprite k is a square, 0 a disk, read from its frame-0 mask: a square fills its
    corners (|dy|, |dx| in (0.6 r, r]: 0.64 r^2 pixels), a disk nearly none (0.04 r^2)."""
    m, r, p = video.masks[0, k], video.radius[k], video.pos[0, k]
    grid = jnp.arange(m.shape[0]) + 0.5
    dy, dx = jnp.abs(grid[:, None] - p[0]), jnp.abs(grid[None] - p[1])
    corners = m & (dy > 0.6 * r) & (dx > 0.6 * r)
    return (corners.sum() > 0.3 * r ** 2).astype(jnp.int32)


def make_pairs(key, n: int, cfg: Config):
    """n videos mined into pairs: x, x+ (n, P, P, C), valid (n,), shape labels (n,)."""
    videos = jax.vmap(lambda k: vid.make_video(k, cfg.spec()))(jax.random.split(key, n))
    x, x_pos, valid, k = jax.vmap(lambda v: mine_pair(v, cfg))(videos)
    return x, x_pos, valid, jax.vmap(shape_label)(videos, k)


# --- NETWORK ---


class Encoder(nn.Module):
    """f: convs (ReLU, 3x3/2 max pool after pool_after), ReLU fc layers, L2-normalised
    (B, P, P, C) -> (B, F)."""

    cfg: Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        for i, (ch, k, st) in enumerate(zip(c.conv_channels, c.conv_kernels, c.conv_strides,
                                            strict=True)):
            x = nn.relu(Conv(ch, k, st, shift=c.shift_conv, dtype=dt)(x))
            if i + 1 in c.pool_after:
                x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(c.fc_features):
            x = nn.Dense(f, dtype=dt)(x)
            x = nn.relu(x) if i + 1 < len(c.fc_features) else x  # the feature: linear
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


# --- LOSS ---


def cosine_distance(a, b):
    """D = 1 - cos between rows of a (N, F) and b (M, F), unit rows ([1] Eq. 1): (N, M)."""
    return 1.0 - a @ b.T


def triplet_losses(fa, fp, valid, margin):
    """max(0, D(x, x+) - D(x, x-) + M) ([1] Eq. 2) for every pair i and every candidate
    negative j of the batch's 2B patches [x; x+]: (B, 2B), and the candidate mask (j not
    from pair i, pair of j valid)."""
    b = fa.shape[0]
    d_pos = jnp.sum(fa * fp, -1)  # cos; D(x, x+) = 1 - cos
    d_neg = cosine_distance(fa, jnp.concatenate([fa, fp]))
    losses = jax.nn.relu((1.0 - d_pos)[:, None] - d_neg + margin)
    j = jnp.arange(2 * b) % b
    mask = (j[None] != jnp.arange(b)[:, None]) & valid[j][None]
    return losses, mask


def select_negatives(key, losses, mask, hard, k: int, num_hard: int):
    """(B, K) indices of the negatives among the candidates of the mask: once `hard`, the
    num_hard largest losses (hard mining) and K - num_hard others at random; else K at
    random."""
    hard_score = jnp.where(mask, jax.lax.stop_gradient(losses), -jnp.inf)
    idx_hard = jax.lax.top_k(hard_score, num_hard)[1]  # (B, H)
    taken = (jnp.arange(mask.shape[1]) == idx_hard[..., None]).any(1) & hard
    rand = jnp.where(mask & ~taken, jax.random.uniform(key, losses.shape), -jnp.inf)
    idx_rand = jax.lax.top_k(rand, k)[1]  # (B, K): the first K - H where hard
    return jnp.where(hard, jnp.concatenate([idx_hard, idx_rand[:, :k - num_hard]], 1),
                     idx_rand)


def triplet_loss(key, fa, fp, valid, hard, cfg: Config):
    """Mean of Eq. 2 over the valid pairs and their K selected negatives; the fraction of
    selected triplets with a positive loss."""
    losses, mask = triplet_losses(fa, fp, valid, cfg.margin)
    idx = select_negatives(key, losses, mask, hard, cfg.num_negatives,
                           round(cfg.num_negatives * cfg.hard_fraction))
    picked = jnp.take_along_axis(losses, idx, 1)
    w = valid[:, None] & jnp.take_along_axis(mask, idx, 1)
    n = jnp.maximum(w.sum(), 1)
    return jnp.sum(jnp.where(w, picked, 0.0)) / n, jnp.sum(w & (picked > 0)) / n


def make_optimizer(cfg: Config):
    base = (optax.sgd(cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd"
            else optax.adam(cfg.lr))
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), base)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    # () int32, 0 from init; the tests' other arms, traced so that all share one program:
    # 1 broken (x+ from a different track: the next pair's), 2 frozen (no update: the
    # encoder at init)
    arm: jax.Array


def init(key, cfg: Config) -> State:
    k_p, key = jax.random.split(key)
    p = cfg.patch_size
    params = Encoder(cfg).init(k_p, jnp.zeros((1, p, p, cfg.channels)))["params"]
    return State(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), key,
                 jnp.zeros((), jnp.int32))


# --- UPDATE ---


def update(state: State, cfg: Config):
    tx = make_optimizer(cfg)
    key, k_data, k_neg = jax.random.split(state.key, 3)
    x, x_pos, valid, _ = make_pairs(k_data, cfg.batch_size, cfg)
    x_pos = jnp.where(state.arm == 1, jnp.roll(x_pos, 1, 0), x_pos)  # broken: wrong track
    hard = state.step >= cfg.hard_after
    b = cfg.batch_size

    def loss_fn(params):
        f = Encoder(cfg).apply({"params": params}, jnp.concatenate([x, x_pos]))
        return triplet_loss(k_neg, f[:b], f[b:], valid, hard, cfg)

    (loss, active), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    frozen = state.arm == 2
    params = jax.tree.map(lambda p, n: jnp.where(frozen, p, n), state.params,
                          optax.apply_updates(state.params, updates))
    metrics = {"losses/triplet": loss, "charts/active_triplets": active,
               "charts/valid_pairs": valid.mean(), "charts/hard": hard.astype(jnp.float32),
               "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         key=key), metrics


# --- EVALUATE ---

EVAL_KEY = 12345
"""Seed of the fixed held-out videos (the same for every run and seed)."""


def _eval_pairs(key, cfg: Config):
    return make_pairs(key, cfg.probe_train + cfg.probe_test, cfg)


def eval_data(cfg: Config):
    """The held-out pairs of `evaluate` (from PRNGKey(EVAL_KEY)), as numpy (plots)."""
    fn = jax.jit(lambda k: _eval_pairs(k, cfg))
    return tuple(np.asarray(a) for a in fn(jax.random.PRNGKey(EVAL_KEY)))


def retrieval_top1(fa, fp, valid):
    """Fraction of the valid queries x_i whose nearest x+ (cosine) is x+_i."""
    hit = jnp.argmax(fa @ fp.T, -1) == jnp.arange(fa.shape[0])
    return jnp.sum(hit & valid) / jnp.maximum(valid.sum(), 1)


def evaluate(state: State, cfg: Config):
    """Held-out retrieval top-1 among num_eval_pairs pairs ("retrieval_top1", chance
    1 / num_eval_pairs) and shape probes of f(x) (linear and k-NN, all labels and
    probe_per_class per class). The data are made in the program (no data constants)."""
    key = jax.lax.optimization_barrier(jax.random.PRNGKey(EVAL_KEY))  # no constant folding
    x, x_pos, valid, shape = _eval_pairs(key, cfg)
    enc = lambda a: Encoder(cfg).apply({"params": state.params}, a)
    n, e = cfg.probe_train, cfg.num_eval_pairs
    f = enc(x)
    out = {"retrieval_top1": retrieval_top1(f[:e], enc(x_pos[:e]), valid[:e]),
           "eval_valid_pairs": valid.mean()}
    out.update(probe.probe(jax.random.PRNGKey(0), f[:n], shape[:n], f[n:], shape[n:], 2,
                           cfg.probe_per_class, cfg.knn_k))
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: eight held-out queries x (left column) and their five nearest x+ among the
    num_eval_pairs candidates (the true x+ framed in green, others red)."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)
    x, x_pos, valid, _ = eval_data(cfg)
    e = cfg.num_eval_pairs
    enc = jax.jit(lambda a: Encoder(cfg).apply({"params": state.params}, a))
    sim = np.asarray(enc(jnp.asarray(x[:e]))) @ np.asarray(enc(jnp.asarray(x_pos[:e]))).T
    queries = np.flatnonzero(valid[:e])[:8]
    fig, axes = plt.subplots(len(queries), 6, figsize=(6 * 0.9, len(queries) * 0.95))
    show = lambda ax, im: ax.imshow(im if cfg.channels == 3 else im[..., 0], cmap="gray",
                                    vmin=0, vmax=1)
    for r, q in enumerate(queries):
        show(axes[r, 0], np.clip(x[q], 0, 1))
        for c, j in enumerate(np.argsort(-sim[q])[:5]):
            ax = axes[r, c + 1]
            show(ax, np.clip(x_pos[j], 0, 1))
            for sp in ax.spines.values():
                sp.set_color("g" if j == q else "r"), sp.set_linewidth(2)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("query x", fontsize=7)
    axes[0, 3].set_title("nearest x+ (green: same track)", fontsize=7)
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(f"Tracking triplets: held-out retrieval top-1 {f['retrieval_top1']:.3f} "
                 f"(chance {1 / e:.3f})", fontsize=8)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws held-out queries and neighbours."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["retrieval_top1", "linear", "linear_few",
                                               "knn", "knn_few", "losses/triplet"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
