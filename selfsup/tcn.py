"""TCN: Time-Contrastive Networks, self-supervised embeddings from multi-view video.

[1] P. Sermanet, C. Lynch, Y. Chebotar, J. Hsu, E. Jang, S. Schaal, S. Levine. "Time-
    Contrastive Networks: Self-Supervised Learning from Video." ICRA 2018, arXiv:1704.06888.
    Released code: tensorflow/models research/tcn (configs/tcn_default.yml,
    estimators/mvtcn_estimator.py, estimators/svtcn_loss.py, alignment.py); defaults below
    were checked against that config. Items marked [M] are ours or from memory.

Two cameras film the same scene. An embedding f(x) in R^d (L2-normalised) should put
simultaneous frames of different views together and push apart frames of the same view at
other times, so that it encodes the state of the scene, not the camera:

    ||f(x_i^a) - f(x_i^p)||^2 + alpha < ||f(x_i^a) - f(x_i^n)||^2                [1] Eq. 1
    L = sum_i max(0, ||f(x_i^a) - f(x_i^p)||^2 - ||f(x_i^a) - f(x_i^n)||^2 + alpha) [1] Eq. 2
    alpha = 0.2 (FaceNet's margin; tcn_default.yml)

Multi-view TCN ([1] Sec. 3.1, Fig. 2): anchor x^a and positive x^p are frames of two views
at the same time t; negatives x^n are frames at other times t' of the same sequence, drawn
within a window of the anchor (tcn_default.yml: 580 frames = 20 s at 29 fps). As in the
released code (mvtcn_estimator.py: triplet_semihard_loss on concat(anchors, positives) with
one label per pair) every frame of both views is an anchor, its other view the positive
(both directions), and negatives are all the batch's frames of other labels, both views:
so d(a_t, p_t) < d(a_t, p_t'), the alignment the evaluation asks for, is in the loss.
Labels are (sequence, time) (the released 1..k per sequence collide across sequences).
Single-view TCN ([1] Sec. 3.2, svtcn_loss.py): one view, a contiguous block of frames;
every pair within pos_radius frames (6 = 0.2 s) is positive, negatives lie further than
neg_radius (12 = 2 x pos_radius) or in another sequence. A batch holds
`frames_per_sequence` anchor times and their positives from each of `sequences_per_batch`
sequences (views drawn per pair). Negatives are mined per (anchor, positive) pair:
semi-hard (FaceNet: the closest negative farther than the positive, else the farthest;
tf's triplet_semihard_loss) or at random (`mining`); the loss is the mean over pairs. The
embedding network of [1] is Inception (ImageNet, up to Mixed_5d), two 3x3 conv layers of
512, a spatial softmax, a fully connected layer of 2048 and a 32-d embedding; Adam at
1e-3, L2 weight regularisation 1e-6, batch_size 36 frames (18 pairs).

Evaluation ([1] Sec. 4, "alignment error"): for every frame of one view of a held-out
sequence, the nearest neighbour among the other view's frames in embedding space; the
error is |t - t_nn| / T averaged over frames, both directions and sequences (random
embeddings: about 1/3). Also ([1] Sec. 5.2's pose regression, in linear form): ridge
regression from the embedding to the scene's pose (sin, cos of the joint angles), fitted on
half of the held-out sequences, R^2 on the other half. Both for the trained network and for
the same network at its random init (keys "init_...").

Data (procedural, rendered in JAX inside `update`, nothing stored): a 3-joint arm (base
yaw, shoulder and elbow pitch; three links of different colours and a gripper blob)
whose angles follow a random smooth trajectory per sequence (two sinusoids per joint),
filmed by two orthographic cameras at random azimuths about 90 degrees apart and random
elevations, each view with its own background colours and lighting gain, plus pixel noise.
Only the frames a batch needs are rendered: a frame is a pure function of (sequence, t,
view).

Reproduce (CPU demo, 32x32 frames):
    python selfsup/tcn.py --preset quick --plot selfsup/tcn.png
Measured (1 seed, 600 updates, under a minute wall on a loaded 2-core CPU; 32 held-out
sequences x 64 frames): alignment error 0.238 vs 0.339 for the same network at init
(within 2 frames 0.140 vs 0.073; pose R^2 0.202 vs 0.116); triplet loss 0.176 (first 20
updates) -> 0.156 (last 50); the spatial-softmax temperature drifts 0.100 -> 0.097
(charts/temperature). The first version (negatives only among the anchor view, one
direction) scored 0.318 vs 0.323 on 8 sequences: no alignment. Still far from [1]'s:
nearest neighbours are coarse (selfsup/tcn.png: flat runs of matches) and the arm is a
blob at 32x32. A 16x16 keypoint map (--conv-channels 16) did not help (0.247 vs 0.349 at
init, one run); 48x48 frames are untried. Tests (150 updates, 4 x 32 held-out frames):
0.163 0.165 vs 0.317 0.291 at init and 0.267 for positives shown at random times.
Paper setting (GPU; 299x299 frames, the paper's sizes with a CNN trunk):
    python selfsup/tcn.py --preset paper
[1] reports (pouring, multi-view TCN, from memory [M]): alignment error 0.1 (vs 0.2-0.3 for
ImageNet-Inception features), pose regression from the embedding (Table 3 [M]).

Differences from the paper:
- Data: no robot or human videos offline; a rendered arm filmed by two cameras instead of
  the pouring videos and the human-pose sequences.
- Network: a small CNN trunk from random init (`conv_channels`, stride 2 each) in place of
  ImageNet-pretrained Inception up to Mixed_5d; then as [1]: two 3x3 convs, a spatial
  softmax (a learned temperature, expected x, y per channel), a hidden FC and the
  embedding, L2-normalised (tcn_default.yml: embedding_l2 for the triplet loss). Frames
  are centred (x - 0.5); the spatial softmax's temperature, exp(log_temperature) so it
  stays positive, starts at 0.1 (the tf layer's starts at 1 on Inception features): from
  random init at 1, or with a busier background, every embedding collapsed to one point
  within 50 updates (loss = alpha, a saddle where the triplet gradient vanishes) [M].
- Single view: a block of n anchor frames, each with one positive within pos_radius (the
  released sampler takes a block of batch_size frames, every one an anchor).
- Batches pool `sequences_per_batch` sequences (the paper preset 2 x 9 pairs = 36 frames,
  tcn_default.yml's batch_size; pouring.yml uses 1 sequence x 16 pairs and the npairs
  loss, which its README says converged better): here always the triplet loss [M].
- Views are drawn per pair (get_tcn_anchor_pos_indices shuffles them per pair too).
- No colour augmentation (tcn_default.yml augmentation.color; pouring adds random scale
  0.8-3.0): the scene's per-view background and lighting gain vary instead.
- The pose regression is linear (ridge) on the frozen embedding; [1] trains a regressor.
- mfTCN (Dwibedi et al. 2018, multi-frame TCN; catalogue: a flag of this file) is not
  implemented: left.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.nets import Conv

NUM_JOINTS = 3  # base yaw, shoulder pitch, elbow pitch
LINKS = (0.5, 1.0, 0.8)  # vertical base post, upper arm, forearm
POINTS_PER_LINK = 6
SOFTMAX_TEMPERATURE = 0.1  # initial temperature of the spatial softmax [M]
EVAL_KEY = 20_180_521  # the held-out sequences: the same for every seed and run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """TCN; defaults are [1]'s (tcn_default.yml) on the rendered two-camera arm."""

    variant: str = "multiview"
    """multiview (anchor and positive: two views at one time) or singleview"""
    image_size: int = 299
    """side of the rendered frames"""
    video_length: int = 600
    """frames T per sequence"""
    num_views: int = 2
    """cameras filming every sequence"""
    window: int = 580
    """anchor times of a sequence are drawn within this many frames (20 s at 29 fps)"""
    pos_radius: int = 6
    """single-view: the positive lies within this many frames of the anchor (0.2 s)"""
    neg_radius: int = 12
    """single-view: negatives lie further than this from the anchor (2 x pos_radius)"""
    margin: float = 0.2
    """triplet margin alpha ([1] Eq. 1, FaceNet's)"""
    mining: str = "semihard"
    """negative among the candidates: semihard (released code) or random"""
    sequences_per_batch: int = 2
    """sequences a batch draws its anchor times from"""
    frames_per_sequence: int = 9
    """anchor times per sequence (2 x 9 = 18 pairs = tcn_default.yml's batch_size 36 frames)"""
    conv_channels: tuple[int, ...] = (64, 128, 256, 512)
    """trunk: 3x3 convs of stride 2 (stands in for Inception up to Mixed_5d)"""
    extra_channels: tuple[int, ...] = (512, 512)
    """the two 3x3 conv layers (stride 1) before the spatial softmax"""
    fc_hidden: int = 2048
    """hidden FC layer after the spatial softmax (0: none)"""
    embedding_size: int = 32
    """d, the embedding's size"""
    lr: float = 1e-3
    """Adam learning rate"""
    weight_decay: float = 1e-6
    """L2 regularisation: weight_decay x sum(w^2) / 2 added to the loss (kernels only)"""
    total_updates: int = 1_000_000
    """training updates (batches; tcn_default.yml's max_step)"""
    noise: float = 0.02
    """std of the pixel noise of every frame"""
    eval_sequences: int = 8
    """held-out sequences of evaluate (half fit the pose regression, half test it)"""
    eval_length: int = 64
    """frames per held-out sequence"""
    ridge: float = 1e-2
    """L2 penalty of the pose regression"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""
    dtype: str = "float32"
    """compute dtype of convs and dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.total_updates

    @property
    def batch_pairs(self) -> int:
        return self.sequences_per_batch * self.frames_per_sequence

    @property
    def steps_per_update(self) -> int:
        return 2 * self.batch_pairs  # frames rendered and embedded per update

    def validate(self):
        if self.variant not in ("multiview", "singleview"):
            raise ValueError(f"variant={self.variant!r} must be 'multiview' or 'singleview'")
        if self.mining not in ("semihard", "random"):
            raise ValueError(f"mining={self.mining!r} must be 'semihard' or 'random'")
        if self.variant == "multiview" and self.num_views < 2:
            raise ValueError(f"num_views={self.num_views} must be >= 2 for multiview")
        if not 2 <= self.window <= self.video_length:
            raise ValueError(f"window={self.window} must be in [2, video_length="
                             f"{self.video_length}]")
        if self.frames_per_sequence < 2 or self.frames_per_sequence > self.window:
            raise ValueError(f"frames_per_sequence={self.frames_per_sequence} must be in "
                             f"[2, window={self.window}] (negatives are the other frames)")
        if not 1 <= self.pos_radius < self.neg_radius < self.window:
            raise ValueError(f"pos_radius={self.pos_radius}, neg_radius={self.neg_radius} "
                             f"must satisfy 1 <= pos_radius < neg_radius < window="
                             f"{self.window}")
        if self.margin < 0 or self.noise < 0 or self.ridge < 0:
            raise ValueError(f"margin={self.margin}, noise={self.noise}, ridge={self.ridge} "
                             "must be >= 0")
        if not self.conv_channels or min(self.conv_channels + self.extra_channels) < 1:
            raise ValueError(f"conv_channels={self.conv_channels} must be non-empty and "
                             f"extra_channels={self.extra_channels} each >= 1")
        if self.fc_hidden < 0:
            raise ValueError(f"fc_hidden={self.fc_hidden} must be >= 0")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be >= 8")
        if self.eval_sequences < 2 or self.eval_length < 2:
            raise ValueError(f"eval_sequences={self.eval_sequences} and eval_length="
                             f"{self.eval_length} must be >= 2")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 frames, 64-frame sequences, 4 x 8 pairs per batch, a 3-conv trunk.
    "quick": dict(image_size=32, video_length=64, window=64, pos_radius=2, neg_radius=4,
                  sequences_per_batch=4, frames_per_sequence=8, conv_channels=(16, 32),
                  extra_channels=(32, 32), fc_hidden=64, total_updates=600, eval_sequences=32,
                  shift_conv=True),
    "paper": dict(),
}


# --- SCENE ---


@struct.dataclass
class Sequence:
    """One sequence: joint trajectories and the cameras filming it."""

    offset: jax.Array  # (J,) c_j
    amp: jax.Array  # (J, 2) a_jk
    freq: jax.Array  # (J, 2) cycles per sequence
    phase: jax.Array  # (J, 2)
    azimuth: jax.Array  # (V,)
    elevation: jax.Array  # (V,)
    background: jax.Array  # (V, 2, 3) top and bottom colours
    gain: jax.Array  # (V, 3) lighting gain on the arm's colours


def sample_sequence(key, num_views: int) -> Sequence:
    """A random trajectory (2 sinusoids per joint, under one cycle per sequence) and
    random cameras: view v at azimuth v x 90 degrees +- 30, elevation 10-40 degrees [M]."""
    shapes = [(NUM_JOINTS,), (NUM_JOINTS, 2), (NUM_JOINTS, 2), (NUM_JOINTS, 2), (num_views,),
              (num_views,), (num_views, 2, 3), (num_views, 3)]
    sizes = [int(np.prod(sh)) for sh in shapes]
    flat = jax.random.uniform(key, (sum(sizes),))  # one draw, sliced per field
    parts = np.cumsum([0] + sizes)
    u = lambda i, lo, hi: lo + (hi - lo) * flat[parts[i]:parts[i + 1]].reshape(shapes[i])
    span = jnp.array([1.2, 0.6, 0.7])[:, None]  # yaw, shoulder, elbow amplitudes
    return Sequence(offset=jnp.array([0.0, 0.5, -0.6]) + u(0, -0.3, 0.3),
                    amp=span * u(1, 0.4, 1.0), freq=u(2, 0.3, 0.9), phase=u(3, 0.0, 2 * jnp.pi),
                    azimuth=jnp.arange(num_views) * jnp.pi / 2 + u(4, -0.5, 0.5),
                    elevation=u(5, 0.17, 0.7), background=u(6, 0.0, 0.35),
                    gain=u(7, 0.7, 1.3))


def joint_angles(seq: Sequence, t, length: int):
    """(J,) angles at frame t: c_j + sum_k a_jk sin(2 pi f_jk t / T + p_jk)."""
    return seq.offset + (seq.amp * jnp.sin(2 * jnp.pi * seq.freq * t / length
                                           + seq.phase)).sum(-1)


def arm_points(angles):
    """3-D points (3 x POINTS_PER_LINK + 1, 3) along the post, upper arm and forearm, and
    the gripper point; their colour ids (0, 1, 2 per link, 3 the gripper)."""
    yaw, shoulder, elbow = angles
    heading = jnp.array([jnp.cos(yaw), jnp.sin(yaw), 0.0])
    up = jnp.array([0.0, 0.0, 1.0])
    direction = lambda pitch: jnp.cos(pitch) * heading + jnp.sin(pitch) * up
    joints = [jnp.zeros(3)]
    for length, d in zip(LINKS, (up, direction(shoulder), direction(shoulder + elbow)),
                         strict=True):
        joints.append(joints[-1] + length * d)
    s = jnp.linspace(0.0, 1.0, POINTS_PER_LINK)[:, None]
    pts = [a + s * (b - a) for a, b in zip(joints[:-1], joints[1:], strict=True)]
    pts = jnp.concatenate(pts + [joints[-1][None]])  # (3 P + 1, 3)
    ids = jnp.concatenate([jnp.repeat(jnp.arange(3), POINTS_PER_LINK), jnp.array([3])])
    return pts, ids


LINK_COLOURS = jnp.array([[0.9, 0.9, 0.9], [0.95, 0.2, 0.2], [0.2, 0.9, 0.3], [0.2, 0.4, 1.0]])


def render(seq: Sequence, t, view, key, cfg: Config):
    """Frame (H, W, 3) in [0, 1] of sequence `seq` at time t seen by camera `view`:
    orthographic projection, Gaussian splats composited over a vertical gradient."""
    size = cfg.image_size
    pts, ids = arm_points(joint_angles(seq, t, cfg.video_length))
    az, el = seq.azimuth[view], seq.elevation[view]
    right = jnp.array([-jnp.sin(az), jnp.cos(az), 0.0])
    up = jnp.array([-jnp.sin(el) * jnp.cos(az), -jnp.sin(el) * jnp.sin(az), jnp.cos(el)])
    scale = size / 5.0  # the reach (2.3) fits within +-2.5 units
    x = size / 2 + scale * (pts @ right)  # (N,) pixel columns
    y = size * 0.75 - scale * (pts @ up)  # (N,) pixel rows (the base sits low)
    radius = jnp.where(ids == 3, 0.1, 0.07) * size
    grid = jnp.arange(size) + 0.5
    d2 = (grid[None, :, None] - x) ** 2 + (grid[:, None, None] - y) ** 2  # (H, W, N)
    alpha = jnp.exp(-0.5 * d2 / radius ** 2)
    colour = LINK_COLOURS[ids] * seq.gain[view]  # (N, 3)
    total = alpha.sum(-1, keepdims=True)
    fg = (alpha @ colour) / jnp.maximum(total, 1e-6)
    top, bottom = seq.background[view]
    h = jnp.linspace(0.0, 1.0, size)[:, None, None]
    bg = (1 - h) * top + h * bottom  # (H, 1, 3)
    a = jnp.minimum(total, 1.0)
    img = (1 - a) * bg + a * fg
    img = img + cfg.noise * jax.random.normal(key, img.shape)
    return jnp.clip(img, 0.0, 1.0)


# --- SAMPLER ---


def sample_times(key, cfg: Config, broken):
    """Anchor times t_a (n,), the positives' label times t_p (n,) and the times shown
    (n,). Multiview: n distinct anchor times within a window of `window` frames, positives
    at the same times. Singleview (svtcn's get_svtcn_indices): a contiguous block of n
    anchor frames, positives within pos_radius, never 0 away (reflected at the ends).
    `broken`: positives shown at uniformly random times (labels unchanged)."""
    n, T = cfg.frames_per_sequence, cfg.video_length
    k_w, k_t, k_d, k_s, k_b = jax.random.split(key, 5)
    if cfg.variant == "multiview":
        start = jax.random.randint(k_w, (), 0, T - cfg.window + 1)
        t_a = start + jax.random.choice(k_t, cfg.window, (n,), replace=False)
        t_p = t_a
    else:
        t_a = jax.random.randint(k_w, (), 0, T - n + 1) + jnp.arange(n)
        delta = jax.random.randint(k_d, (n,), 1, cfg.pos_radius + 1)
        delta = delta * jnp.where(jax.random.bernoulli(k_s, 0.5, (n,)), 1, -1)
        delta = jnp.where((t_a + delta < 0) | (t_a + delta >= T), -delta, delta)
        t_p = t_a + delta
    return t_a, t_p, jnp.where(broken, jax.random.randint(k_b, (n,), 0, T), t_p)


def sample_views(key, cfg: Config):
    """(anchor view, positive view): two distinct views (multiview) or one (singleview)."""
    pair = jax.random.choice(key, cfg.num_views, (2,), replace=False)
    return (pair[0], pair[1]) if cfg.variant == "multiview" else (pair[0], pair[0])


def pair_masks(seq, t, cfg: Config):
    """(m, m) positive and negative masks over a batch's m frames labelled (sequence, time)
    (the released labels, 1..k per sequence, collide across sequences; ours do not).
    Multiview: positives share the label (the other view at the same time), negatives are
    every frame of another label, both views. Singleview (svtcn_loss.py): positives within
    pos_radius, negatives further than neg_radius or from another sequence."""
    same = seq[:, None] == seq[None, :]
    gap = jnp.abs(t[:, None] - t[None, :])
    eye = jnp.eye(t.shape[0], dtype=bool)
    near, far = (0, 0) if cfg.variant == "multiview" else (cfg.pos_radius, cfg.neg_radius)
    return same & (gap <= near) & ~eye, ~same | (gap > far)


# --- NETWORKS ---


class SpatialSoftmax(nn.Module):
    """Softmax over positions per channel with a learned temperature exp(log_temperature)
    (positive by construction); returns the expected
    (x, y) in [-1, 1] of every channel: (B, H, W, C) -> (B, 2 C)."""

    temperature: float

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        log_temp = self.param("log_temperature",
                              nn.initializers.constant(np.log(self.temperature)), ())
        logits = x.reshape(b, h * w, c) / jnp.exp(log_temp)  # (B, HW, C), temperature > 0
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=1)
        ys, xs = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
        ex = jnp.einsum("bnc,n->bc", p, xs.reshape(-1))
        ey = jnp.einsum("bnc,n->bc", p, ys.reshape(-1))
        return jnp.concatenate([ex, ey], -1)


class Embedder(nn.Module):
    """Trunk (stride-2 convs), two 3x3 convs, spatial softmax, FC, embedding (L2-normed)."""

    conv_channels: tuple[int, ...]
    extra_channels: tuple[int, ...]
    fc_hidden: int
    embedding_size: int
    shift: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = (x - 0.5).astype(self.dtype)  # frames in [0, 1], centred
        for ch in self.conv_channels:
            x = nn.relu(Conv(ch, 3, 2, shift=self.shift, dtype=self.dtype)(x))
        for ch in self.extra_channels:
            x = nn.relu(Conv(ch, 3, 1, shift=self.shift, dtype=self.dtype)(x))
        x = SpatialSoftmax(SOFTMAX_TEMPERATURE)(x)  # (B, 2 C) keypoints
        if self.fc_hidden:
            x = nn.relu(nn.Dense(self.fc_hidden, dtype=self.dtype)(x))
        z = nn.Dense(self.embedding_size, dtype=self.dtype, name="embedding")(x)
        z = z.astype(jnp.float32)
        return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def network(cfg: Config) -> Embedder:
    return Embedder(cfg.conv_channels, cfg.extra_channels, cfg.fc_hidden, cfg.embedding_size,
                    cfg.shift_conv, jnp.dtype(cfg.dtype))


# --- LOSS ---


def sq_dist(a, b):
    """(n, m) squared Euclidean distances."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def triplet_loss(d_ap, d_an, margin, weight):
    """[1] Eq. 2 from squared distances: mean of max(0, ||a - p||^2 - ||a - n||^2 + alpha)
    over the triplets with weight 1 (0/1: drops pairs without a positive or negative)."""
    loss = jnp.maximum(d_ap - d_an + margin, 0.0)
    return (loss * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def mine_negatives(key, d, pos, neg, mining: str):
    """Negative index (m, m) of every (anchor i, positive j) pair given squared distances d
    (m, m), and whether the pair counts (a positive with a negative). semihard (FaceNet,
    tf triplet_semihard_loss): the closest negative farther than the positive, else the
    farthest negative; random: uniform over anchor i's negatives."""
    d_ap, d_an, cand = d[:, :, None], d[:, None, :], neg[:, None, :]  # pair (i, j), cand k
    if mining == "semihard":
        outside = cand & (d_an > d_ap)
        closest = jnp.argmin(jnp.where(outside, d_an, jnp.inf), axis=-1)
        farthest = jnp.argmax(jnp.where(cand, d_an, -jnp.inf), axis=-1)
        idx = jnp.where(outside.any(-1), closest, farthest)
    else:
        u = jax.random.uniform(key, d.shape + d.shape[1:])  # (m, m, m)
        idx = jnp.argmax(jnp.where(cand, u, -1.0), axis=-1)
    return idx, pos & neg.any(1)[:, None]


def tcn_loss(key, e, seq, t, cfg: Config):
    """TCN loss over all m frames e (m, d) of a batch, both views, labelled (seq, t): every
    frame is an anchor, every frame with its label a positive (both directions), negatives
    mined among all frames of other labels (mvtcn_estimator.py: triplet_semihard_loss on
    concat(anchors, positives)); the mean over (anchor, positive) pairs, and the fraction
    of frames with a positive and a negative."""
    pos, neg = pair_masks(seq, t, cfg)
    d = sq_dist(e, e)
    idx, valid = mine_negatives(key, jax.lax.stop_gradient(d), pos, neg, cfg.mining)
    d_an = jnp.take_along_axis(d, idx, axis=1)  # d[i, idx[i, j]]
    return triplet_loss(d, d_an, cfg.margin, valid.astype(e.dtype)), valid.any(1).mean()


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    init_params: Any  # the network at its random init: evaluate's baseline
    opt_state: Any
    step: jax.Array
    key: jax.Array
    shuffle: jax.Array  # True: positives at random times (the tests' broken variant)


def make_optimizer(cfg: Config):
    return optax.adam(cfg.lr)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    params = network(cfg).init(k_net, x)["params"]
    return State(params, params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32),
                 key, jnp.zeros((), bool))


# --- UPDATE ---


def kernel_penalty(params):
    """sum(w^2) over the kernels (tcn_default.yml's l2_reg_weight; biases not decayed)."""
    return sum((w ** 2).sum() for path, w in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(path))


def make_batch(key, cfg: Config, broken):
    """Frames (S, 2n, H, W, 3) of one batch, per sequence n anchors then their positives
    (views drawn per pair), rendered in one vmap, and their label times (S, 2n)."""
    n = cfg.frames_per_sequence

    def one(k):
        k_seq, k_t, k_v, k_r = jax.random.split(k, 4)
        seq = sample_sequence(k_seq, cfg.num_views)
        t_a, t_p, t_shown = sample_times(k_t, cfg, broken)
        v_a, v_p = jax.vmap(lambda kk: sample_views(kk, cfg))(jax.random.split(k_v, n))
        draw = jax.vmap(lambda t, v, kk: render(seq, t, v, kk, cfg))
        x = draw(jnp.concatenate([t_a, t_shown]), jnp.concatenate([v_a, v_p]),
                 jax.random.split(k_r, 2 * n))
        return x, jnp.concatenate([t_a, t_p])

    return jax.vmap(one)(jax.random.split(key, cfg.sequences_per_batch))


def update(state: State, cfg: Config):
    net, tx = network(cfg), make_optimizer(cfg)
    key, k_batch, k_mine = jax.random.split(state.key, 3)
    x, t = make_batch(k_batch, cfg, state.shuffle)  # (S, 2n, H, W, 3), (S, 2n)
    s, m = t.shape
    seq, t = jnp.repeat(jnp.arange(s), m), t.reshape(-1)

    def loss_fn(params):
        z = net.apply({"params": params}, x.reshape(s * m, *x.shape[2:]))  # (S 2n, d)
        loss, valid = tcn_loss(k_mine, z, seq, t, cfg)
        l2 = kernel_penalty(params)
        pos = pair_masks(seq, t, cfg)[0]
        d_ap = (sq_dist(z, z) * pos).sum() / jnp.maximum(pos.sum(), 1)
        return loss + 0.5 * cfg.weight_decay * l2, (loss, valid, d_ap)

    (_, (loss, valid, d_ap)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/triplet": loss, "charts/d_ap": d_ap, "charts/valid_anchors": valid,
               "charts/grad_norm": optax.global_norm(grads),
               "charts/temperature": jnp.exp(params["SpatialSoftmax_0"]["log_temperature"])}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         key=key), metrics


# --- EVALUATE ---


def eval_videos(cfg: Config):
    """Held-out sequences (fixed key), every frame of every view: (E, V, L, H, W, 3) and
    the pose targets (E, L, 2 J): sin and cos of the joint angles."""
    keys = jax.random.split(jax.random.PRNGKey(EVAL_KEY), cfg.eval_sequences)
    seqs = jax.vmap(lambda k: sample_sequence(k, cfg.num_views))(keys)
    # eval frames span the training video's length at eval_length evenly spaced times
    ts = jnp.linspace(0, cfg.video_length - 1, cfg.eval_length)

    def frames(seq, k):
        one = lambda v, t, kk: render(seq, t, v, kk, cfg)
        grid = jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, 0))
        ks = jax.random.split(k, cfg.num_views * cfg.eval_length)
        return grid(jnp.arange(cfg.num_views), ts, ks.reshape(cfg.num_views,
                                                               cfg.eval_length, -1))

    noise_keys = jax.random.split(jax.random.PRNGKey(EVAL_KEY + 1), cfg.eval_sequences)
    videos = jax.vmap(frames)(seqs, noise_keys)  # noise independent of the sequences
    angles = jax.vmap(lambda s: jax.vmap(lambda t: joint_angles(s, t, cfg.video_length))(ts))(
        seqs)
    return videos, jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


def alignment(z1, z2):
    """Nearest neighbour in z2 (L, d) of each frame of z1 (L, d): (error |t - t_nn| / L
    averaged, fraction of frames within 2 of the true time)."""
    nn_t = jnp.argmin(sq_dist(z1, z2), axis=1)
    gap = jnp.abs(nn_t - jnp.arange(z1.shape[0]))
    return gap.mean() / z1.shape[0], (gap <= 2).mean()


def ridge_r2(x_tr, y_tr, x_te, y_te, l2):
    """R^2 on (x_te, y_te) of ridge regression (with bias) fitted on (x_tr, y_tr)."""
    mu, ym = x_tr.mean(0), y_tr.mean(0)
    a, b = x_tr - mu, y_tr - ym
    w = jnp.linalg.solve(a.T @ a + l2 * a.shape[0] * jnp.eye(a.shape[1]), a.T @ b)
    pred = (x_te - mu) @ w + ym
    return 1 - ((pred - y_te) ** 2).sum() / ((y_te - y_te.mean(0)) ** 2).sum()


def evaluate(state: State, cfg: Config):
    """Alignment error and within-2-frames fraction between views 0 and 1 (both
    directions) and pose R^2, for the trained network and at init ("init_...")."""
    videos, pose = eval_videos(cfg)
    e, v, length = videos.shape[:3]
    half = e // 2

    def scores(params):
        net = network(dataclasses.replace(cfg, shift_conv=False))  # no gradients here
        z = jax.lax.map(lambda x: net.apply({"params": params}, x),
                        videos.reshape(e * v, length, *videos.shape[3:])).reshape(
                            e, v, length, -1)
        err, within = jax.vmap(alignment)(jnp.concatenate([z[:, 0], z[:, 1]]),
                                          jnp.concatenate([z[:, 1], z[:, 0]]))
        flat = lambda a: a.reshape(-1, a.shape[-1])
        zz = z.transpose(0, 2, 1, 3).reshape(e, length * v, -1)  # frames of both views
        yy = jnp.repeat(pose, v, axis=1)
        r2 = ridge_r2(flat(zz[:half]), flat(yy[:half]), flat(zz[half:]), flat(yy[half:]),
                      cfg.ridge)
        return {"alignment_error": err.mean(), "within_2": within.mean(), "pose_r2": r2}

    both = jax.vmap(scores)(jax.tree.map(lambda a, b: jnp.stack([a, b]), state.params,
                                         state.init_params))  # one trace for both
    return {k: val[0] for k, val in both.items()} | {"init_" + k: val[1]
                                                      for k, val in both.items()}


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: triplet loss, the two views of a held-out sequence, and the nearest-neighbour
    alignment of view 0 to view 1 for the trained network and at init."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)
    videos, _ = jax.device_get(jax.jit(eval_videos, static_argnums=0)(cfg))

    @jax.jit
    def nn_times(params, x1, x2):
        f = lambda x: network(cfg).apply({"params": params}, x)
        return jnp.argmin(sq_dist(f(x1), f(x2)), axis=1)

    h = np.asarray(res.history["losses/triplet"])[0]
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig = plt.figure(figsize=(12, 3.6))
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(h)
    ax.set(title="triplet loss", xlabel="update")
    ax = fig.add_subplot(1, 3, 2)
    times = [int(t) for t in np.linspace(0, cfg.eval_length - 1, 4)]
    ax.imshow(np.concatenate([np.concatenate(list(videos[0, v, times]), 1) for v in (0, 1)]))
    ax.set(title=f"held-out sequence: view 0 (top), view 1; t = {list(times)}")
    ax.axis("off")
    ax = fig.add_subplot(1, 3, 3)
    t = np.arange(cfg.eval_length)
    for params, name, key in ((state.params, "TCN", ""), (state.init_params, "init", "init_")):
        nn_t = np.asarray(nn_times(params, videos[0, 0], videos[0, 1]))
        ax.plot(t, nn_t, ".", label=f"{name} (error {f[key + 'alignment_error']:.3f})")
    ax.plot(t, t, "k--", lw=0.8)
    ax.set(title="nearest view-1 frame of each view-0 frame", xlabel="t (view 0)",
           ylabel="t of nearest (view 1)")
    ax.legend(fontsize=8)
    fig.suptitle(f"TCN ({cfg.variant}, {cfg.mining}), alpha = {cfg.margin}", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's curves and alignment."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["alignment_error", "init_alignment_error",
                                               "within_2", "init_within_2", "pose_r2",
                                               "init_pose_r2", "losses/triplet"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
