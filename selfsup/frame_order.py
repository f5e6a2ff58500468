"""Shuffle and Learn: features from verifying the temporal order of video frames.

[1] I. Misra, C. L. Zitnick, M. Hebert. "Shuffle and Learn: Unsupervised Learning using
    Temporal Order Verification." ECCV 2016, arXiv:1603.08561. Released code:
    imisra/shuffle-tuple (7c7bbb2, unchanged since): networks/tuple_train.prototxt, and
    tuple_solver.prototxt. [M]: from memory of the paper, not checked against the PDF.

From a video, 5 frames f_a, f_b, f_c, f_d, f_e with a < b < c < d < e are drawn from a
window of high motion ([1] Sec. 3.2, coarse optical-flow magnitude), and tuples of 3 frames
are labelled by whether they are in temporal order:
    positive (label 1): (f_b, f_c, f_d), or reversed (f_d, f_c, f_b)       [1] Sec. 3.1-3.2
    negative (label 0): (f_b, f_a, f_d) or (f_b, f_e, f_d): the middle frame comes from
                        outside the window [b, d]                             [1] Sec. 3.2
    tau_max = |b - d| bounds the positives' span, tau_min = min(|a - b|, |d - e|) is the
    negatives' least gap: tau_max = 60, tau_min = 15 frames [M]               [1] Sec. 3.2
    25% positives, 75% negatives (pos : neg = 1 : 3, as quoted from [1] in the released
    code's issue #2; the released tuple list is read in file order)          [1] Sec. 4.1
A triplet siamese network with shared weights maps each frame to fc7, the three fc7 are
concatenated and a linear fc8 gives a 2-way softmax (the released prototxt):
    p(order correct | f_1, f_2, f_3) = softmax(W8 [fc7(f_1); fc7(f_2); fc7(f_3)] + b8)_1
    loss = -mean log p(label | tuple)   (SoftmaxWithLoss)                     [1] Sec. 3.3
The trunk is CaffeNet (conv1-5, fc6, fc7) with BatchNorm (no learned scale or shift, as
Caffe's BatchNorm layer without a Scale layer) after conv3-5, fc6, fc7, dropout 0.5 on fc6
and fc7; SGD momentum 0.9, lr 1e-3 x 0.1 at 80k of 100k iterations, weight decay 5e-4 on
weights (not biases), biases at twice the learning rate, 128 tuples per step (the solver).

Data: procedural videos made in JAX inside `update`: a disk (the body) with an arm (a bar
from its centre) that swings at a per-video speed for half of each `cycle_frames` cycle and
rests the other half, on a smooth random background, fresh pixel noise in every frame. The
flow is the arm tip's speed; the windows [b, d] whose summed flow is in the top
`high_motion_fraction` of the video's are the high-motion windows. Only the 3 frames of
each tuple are rendered.

Downstream ([1] Sec. 4-5 fine-tunes for actions on UCF101/HMDB51 and pose on FLIC/MPII):
here, in place of pose, frozen fc7 probes (common/probe.py: linear and k-NN, all labels and
10 per class) of the arm's direction in 8 bins of 45 degrees, against the same network at
init; and the held-out order accuracy on fixed tuples with Bernoulli(0.5) labels.

Reproduce (CPU demo, 32x32 frames, a small trunk):
    python selfsup/frame_order.py --preset quick --plot selfsup/frame_order.png
Measured (1 seed, 600 steps, 16 min on a loaded 2-core CPU): held-out order accuracy 0.848
(at init 0.477): positives 0.996, negatives 0.686; final training loss 0.315. fc7 probes
of the arm direction, trained (init): linear 0.857 (0.821), 10/class 0.781 (0.652), k-NN
0.724 (0.773), 10/class 0.685 (0.557): few-label probes +0.13, full-label k-NN -0.05.
Paper setting (GPU; procedural videos in place of UCF101, CaffeNet on 227x227 frames):
    python selfsup/frame_order.py --preset paper
[1] (fine-tuned, split 1 (mean over splits), the released README): UCF101 50.9 (50.2),
HMDB51 19.8 (18.1); FLIC PCK 84.7, MPII PCKh@0.5 87.7 (upper body); UCF101 from scratch
38.6 [M].

Differences from the paper:
- Data: procedural videos, not UCF101 (not offline); motion is the generator's exact flow,
  not Farneback flow. [1] weights frames by their mean flow magnitude to bias sampling
  towards high-motion windows [M]; here windows are high-motion by rank in their video
  (`high_motion_fraction`) and drawn uniformly among those.
- No pixel-SSD check that f_c differs from f_a and f_e [M] (rest phases leave ambiguous
  tuples, which the motion-based sampling is there to avoid).
- The span |b - d| is drawn uniformly in [2, tau_max]; a is uniform in [0, b - tau_min]
  and e in [d + tau_min, T - 1] (how [1] draws inside the bounds is not stated [M]).
- Frozen fc7 probes, not fine-tuning. No LRN, no groups (2 in conv2, 4, 5); SAME padding;
  kernels N(0, init_std^2) (fc6, fc7: init_std / 2), biases 0 (Caffe: 1 for conv2, 4, 5,
  fc6, fc7), fc8 Glorot-uniform. Grey frames, no crops or mean subtraction (the released
  data layer: multi-scale corner crops, BGR mean).
- BatchNorm over all 3 x batch_size frames of a step (Caffe: iter_size 4 passes of 32
  tuples, each over its 96 frames), averages an EMA from (0, 1) (Caffe: a normalised sum);
  momentum on gradients, not on Caffe's rate-scaled steps (same but after the rate drop).
- One tuple per video and step ([1] forms positives and negatives from the same 5 frames).
- `fusion_hidden` (0 in `paper`, 64 in `quick`): [1]'s linear fc8 on the concatenated fc7
  sums one score per frame: it cannot express "the middle frame lies between the others"
  without a per-frame order cue (here: the 25/75 prior for 400 steps); a ReLU layer on the
  concatenation lets the frames' features interact.
- `quick`: 32x32 frames, 40-frame videos, tau 8/4, 3 convs, 64-unit fc and fusion layers,
  no dropout, BatchNorm momentum 0.9, lr 0.05 (x 0.1 after 400 steps), balanced tuples
  (with 25% positives, runs of 150-400 steps stayed at the 25/75 prior).
"""

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import probe, run
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Shuffle and Learn; defaults are [1]'s (released prototxt and solver; tau [M])."""

    frame_size: int = 227
    """side of the square grey frames (CaffeNet's input is 227x227)"""
    num_frames: int = 120
    """frames T per procedural video (4 s at 30 fps)"""
    tau_max: int = 60
    """largest span |b - d| of a tuple's window, in frames"""
    tau_min: int = 15
    """smallest gap min(|a - b|, |d - e|) of a negative's outside frame, in frames"""
    positive_fraction: float = 0.25
    """share of positive (correctly ordered) tuples in a training batch"""
    high_motion_fraction: float = 0.5
    """tuples come from the windows whose summed flow is in this top share of the video's"""
    arm_speed: tuple[float, float] = (1.0, 2.5)
    """range of the arm's angular speed while it moves, degrees per frame"""
    cycle_frames: int = 60
    """frames of one move-then-rest cycle of the arm (moving for half of it)"""
    noise_std: float = 0.05
    """standard deviation of the fresh pixel noise of every frame (intensities in [0, 1])"""
    batch_size: int = 128
    """tuples per SGD step (the solver: 32 x iter_size 4)"""
    num_steps: int = 100_000
    """SGD steps"""
    lr: float = 1e-3
    """initial SGD learning rate (biases learn at twice this rate)"""
    lr_decay_steps: int = 80_000
    """the learning rate is multiplied by lr_decay every this many steps"""
    lr_decay: float = 0.1
    """factor of the step schedule"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """L2 decay added to the gradient of kernels (biases are not decayed)"""
    conv_channels: tuple[int, ...] = (96, 256, 384, 384, 256)
    """output channels of the trunk's convolutions (CaffeNet conv1-5)"""
    conv_kernels: tuple[int, ...] = (11, 5, 3, 3, 3)
    """kernel side of each convolution"""
    conv_strides: tuple[int, ...] = (4, 1, 1, 1, 1)
    """stride of each convolution"""
    pool_after: tuple[int, ...] = (1, 2, 5)
    """convolutions (1-based) followed by a 3x3 stride-2 max pool"""
    fc_features: tuple[int, int] = (4096, 4096)
    """widths of fc6 and fc7 (fc7 is the per-frame feature that is concatenated)"""
    dropout: float = 0.5
    """dropout rate after fc6 and fc7"""
    fusion_hidden: int = 0
    """0: fc8 is linear on the concatenated fc7 ([1]); > 0: a ReLU layer of this width first"""
    bn_momentum: float = 0.999
    """momentum of BatchNorm's running averages (Caffe's moving_average_fraction)"""
    init_std: float = 0.01
    """std of the Gaussian conv kernels at init (fc6 and fc7: half of it)"""
    num_eval_tuples: int = 512
    """held-out tuples (Bernoulli(0.5) labels) scored by evaluate"""
    probe_train: int = 1000
    """frames (with arm-direction labels) the probes are fit on"""
    probe_test: int = 1000
    """held-out frames the probes are scored on"""
    probe_classes: int = 8
    """bins of the arm's direction (the probe's label)"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    knn_temperature: float = 0.07
    """temperature T of the k-NN probe's exp(similarity / T) votes"""
    probe_l2: float = 1e-3
    """L2 penalty of the linear probe"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""
    dtype: str = "float32"
    """compute dtype of convs and dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # tuples per update

    def validate(self):
        if self.tau_max < 2 or self.tau_min < 1:
            raise ValueError(f"tau_max={self.tau_max} must be >= 2 and tau_min={self.tau_min}"
                             " >= 1")
        if self.num_frames < self.tau_max + 2 * self.tau_min + 1:
            raise ValueError(f"num_frames={self.num_frames} must be >= tau_max + 2 tau_min + 1"
                             f" = {self.tau_max + 2 * self.tau_min + 1} (room for a and e)")
        if not 0 < self.high_motion_fraction <= 1:
            raise ValueError(f"high_motion_fraction={self.high_motion_fraction} must be in "
                             "(0, 1]")
        lo, hi = self.arm_speed
        if not 0 <= lo <= hi or hi * self.tau_max >= 180:
            raise ValueError(f"arm_speed={self.arm_speed} must satisfy 0 <= low <= high and "
                             f"high x tau_max < 180 degrees (tau_max={self.tau_max}): a "
                             "window must not swing the arm half a turn")
        n = len(self.conv_channels)
        if n < 1 or len(self.conv_kernels) != n or len(self.conv_strides) != n:
            raise ValueError(f"conv_channels={self.conv_channels}, conv_kernels="
                             f"{self.conv_kernels}, conv_strides={self.conv_strides} must be "
                             "non-empty and of equal length")
        if min(self.conv_channels + self.conv_kernels + self.conv_strides) < 1:
            raise ValueError("conv_channels, conv_kernels and conv_strides must all be >= 1")
        if not all(1 <= p <= n for p in self.pool_after):
            raise ValueError(f"pool_after={self.pool_after} must name convolutions in [1, {n}]")
        if min(self.fc_features) < 1:
            raise ValueError(f"fc_features={self.fc_features} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.init_std <= 0 or self.knn_temperature <= 0 or self.lr_decay <= 0:
            raise ValueError(f"init_std={self.init_std}, knn_temperature="
                             f"{self.knn_temperature} and lr_decay={self.lr_decay} must be > 0")
        if self.fusion_hidden < 0:
            raise ValueError(f"fusion_hidden={self.fusion_hidden} must be >= 0")
        if self.cycle_frames < 2 or self.frame_size < 8:
            raise ValueError(f"cycle_frames={self.cycle_frames} must be >= 2 and frame_size="
                             f"{self.frame_size} >= 8")
        if self.probe_per_class * self.probe_classes > self.probe_train // 2:
            raise ValueError(f"probe_per_class={self.probe_per_class} x probe_classes="
                             f"{self.probe_classes} must be <= probe_train / 2 = "
                             f"{self.probe_train // 2}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 frames, 40-frame videos, a 3-conv trunk with a fusion layer, 600 steps
    # of 64 balanced tuples (with 25% positives short runs stay at the prior).
    "quick": dict(frame_size=32, num_frames=40, tau_max=8, tau_min=4, arm_speed=(6.0, 15.0),
                  cycle_frames=64, positive_fraction=0.5, batch_size=64, num_steps=600,
                  lr=0.05, lr_decay_steps=400,
                  conv_channels=(32, 32, 64), conv_kernels=(5, 3, 3), conv_strides=(1, 1, 1),
                  pool_after=(1, 2, 3), fc_features=(64, 64), dropout=0.0, bn_momentum=0.9,
                  init_std=0.05, fusion_hidden=64, shift_conv=True),
    "paper": dict(),
}


# --- PROCEDURAL VIDEO ---


@struct.dataclass
class Video:
    """One figure's video, as parameters (pixels are rendered on demand)."""

    body: jax.Array  # (2,) body centre (y, x) in pixels
    theta: jax.Array  # (T,) arm direction of every frame, radians
    background: jax.Array  # (S, S) static background


def draw_video(key, cfg: Config) -> Video:
    """A figure at a random place whose arm swings at a random speed and direction, moving
    for half of each cycle of cycle_frames frames (random phase), resting otherwise."""
    k = jax.random.split(key, 6)
    s, t = cfg.frame_size, jnp.arange(cfg.num_frames)
    body = jax.random.uniform(k[0], (2,), minval=0.35 * s, maxval=0.65 * s)
    speed = jnp.deg2rad(jax.random.uniform(k[1], (), minval=cfg.arm_speed[0],
                                           maxval=cfg.arm_speed[1]))
    sign = jnp.where(jax.random.bernoulli(k[2]), 1.0, -1.0)
    phase = jax.random.uniform(k[3], (), maxval=2 * jnp.pi)
    moving = jnp.sin(2 * jnp.pi * t / cfg.cycle_frames + phase) > 0  # (T,) move t -> t+1
    steps = jnp.concatenate([jnp.zeros(1), jnp.cumsum(moving[:-1])])  # moving steps before t
    theta = jax.random.uniform(k[4], (), maxval=2 * jnp.pi) + sign * speed * steps
    coarse = 0.3 * jax.random.uniform(k[5], (4, 4))
    return Video(body, theta, jax.image.resize(coarse, (s, s), "linear"))


def arm_length(cfg: Config) -> float:
    return 0.3 * cfg.frame_size


def flow_magnitude(video: Video, cfg: Config):
    """The generator's optical flow between frames t and t + 1: the arm tip's speed in
    pixels per frame, (T - 1,) (the coarse flow [1] ranks windows by)."""
    return jnp.abs(jnp.diff(video.theta)) * arm_length(cfg)


def render(video: Video, t, key, cfg: Config):
    """Frame t, (S, S, 1) in [0, 1]: background, the body (a disk of radius 0.1 S, 0.6
    bright) and the arm (a bar of half-width 0.05 S from the body's centre, 1.0 bright),
    both antialiased by a one-pixel ramp, plus fresh Gaussian pixel noise."""
    s = cfg.frame_size
    yy, xx = jnp.meshgrid(jnp.arange(s) + 0.5, jnp.arange(s) + 0.5, indexing="ij")
    p = jnp.stack([yy - video.body[0], xx - video.body[1]], -1)  # (S, S, 2) from the body
    u = jnp.stack([jnp.sin(video.theta[t]), jnp.cos(video.theta[t])])  # arm direction (y, x)
    along = jnp.clip(p @ u, 0.0, arm_length(cfg))
    dist_arm = jnp.linalg.norm(p - along[..., None] * u, axis=-1)
    arm = jnp.clip(0.05 * s - dist_arm + 0.5, 0, 1)
    disk = jnp.clip(0.1 * s - jnp.linalg.norm(p, axis=-1) + 0.5, 0, 1)
    img = jnp.maximum(jnp.maximum(video.background, 0.6 * disk), arm)
    return (img + cfg.noise_std * jax.random.normal(key, (s, s)))[..., None]


def arm_direction_class(video: Video, t, num_classes: int):
    """The probe's label: the arm's direction in num_classes equal bins of the circle."""
    frac = jnp.mod(video.theta[t], 2 * jnp.pi) / (2 * jnp.pi)
    return jnp.minimum(jnp.floor(frac * num_classes), num_classes - 1).astype(jnp.int32)


# --- TUPLE SAMPLING ---


def high_motion_starts(flow, span, cfg: Config):
    """(T,) bool: the window starts b whose window [b, b + span] leaves room for a and e
    (b >= tau_min, b + span + tau_min <= T - 1) and whose summed flow is in the top
    high_motion_fraction of those windows ([1] Sec. 3.2)."""
    T = cfg.num_frames
    b = jnp.arange(T)
    c = jnp.concatenate([jnp.zeros(1), jnp.cumsum(flow)])  # (T,) flow summed up to frame t
    window = c[jnp.minimum(b + span, T - 1)] - c[b]  # (T,) flow inside [b, b + span]
    valid = (b >= cfg.tau_min) & (b + span + cfg.tau_min <= T - 1)
    thresh = jnp.nanquantile(jnp.where(valid, window, jnp.nan), 1 - cfg.high_motion_fraction,
                             method="lower")
    return valid & (window >= thresh)


def sample_tuple(key, flow, positive_fraction, cfg: Config):
    """One tuple of a video with flow (T - 1,): (frame indices (3,), label, the 5 frames
    (a, b, c, d, e)). [1] Sec. 3.2: a < b < c < d < e, 2 <= d - b <= tau_max, b - a >=
    tau_min, e - d >= tau_min, [b, d] a high-motion window; positive (b, c, d) or (d, c,
    b), negative (b, a, d) or (b, e, d); label 1 = in order."""
    k = jax.random.split(key, 7)
    T = cfg.num_frames
    span = jax.random.randint(k[0], (), 2, cfg.tau_max + 1)
    ok = high_motion_starts(flow, span, cfg)
    b = jax.random.categorical(k[1], jnp.where(ok, 0.0, -jnp.inf))
    d = b + span
    c = jax.random.randint(k[2], (), b + 1, d)
    a = jax.random.randint(k[3], (), 0, b - cfg.tau_min + 1)
    e = jax.random.randint(k[4], (), d + cfg.tau_min, T)
    positive = jax.random.bernoulli(k[5], positive_fraction)
    flip = jax.random.bernoulli(k[6])  # reversed positive / the e-negative
    pos = jnp.where(flip, jnp.stack([d, c, b]), jnp.stack([b, c, d]))
    neg = jnp.stack([b, jnp.where(flip, e, a), d])
    return jnp.where(positive, pos, neg), positive.astype(jnp.int32), jnp.stack([a, b, c, d, e])


def make_tuples(key, n: int, positive_fraction, cfg: Config):
    """n videos, one tuple each: frames (n, 3, S, S, 1), labels (n,), frame indices (n, 3)."""
    k_vid, k_tup, k_pix = jax.random.split(key, 3)
    videos = jax.vmap(lambda kk: draw_video(kk, cfg))(jax.random.split(k_vid, n))
    flows = jax.vmap(lambda v: flow_magnitude(v, cfg))(videos)
    idx, labels, _ = jax.vmap(lambda kk, f: sample_tuple(kk, f, positive_fraction, cfg))(
        jax.random.split(k_tup, n), flows)
    pix = jax.random.split(k_pix, n * 3).reshape(n, 3, -1)
    frames = jax.vmap(lambda v, ts, ks: jax.vmap(lambda t, kk: render(v, t, kk, cfg))(ts, ks))(
        videos, idx, pix)
    return frames, labels, idx


# --- NETWORKS ---


class Trunk(nn.Module):
    """The shared per-frame tower: convs (ReLU; BatchNorm without scale or shift from the
    third conv on; max pool 3/2 after pool_after), fc6 and fc7 (BatchNorm, ReLU, dropout).
    Returns fc7 (B, fc_features[1])."""

    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=c.bn_momentum,
                                  epsilon=1e-5, use_scale=False, use_bias=False, dtype=dt)
        for i, (ch, k, st) in enumerate(zip(c.conv_channels, c.conv_kernels, c.conv_strides,
                                            strict=True)):
            x = Conv(ch, k, st, shift=c.shift_conv, dtype=dt,
                     kernel_init=nn.initializers.normal(c.init_std))(x)
            x = nn.relu(bn()(x) if i >= 2 else x)
            if i + 1 in c.pool_after:
                x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)  # (B, H * W * C)
        for f in c.fc_features:  # fc6, fc7
            x = nn.Dense(f, dtype=dt, kernel_init=nn.initializers.normal(c.init_std / 2))(x)
            x = nn.Dropout(c.dropout, deterministic=not train)(nn.relu(bn()(x)))
        return x


class OrderNet(nn.Module):
    """[1] Fig. 2 / the prototxt: the trunk on the 3 frames (stacked on the batch axis, so
    BatchNorm sees all 3B frames), fc7 concatenated, fc8 -> 2 logits."""

    cfg: Config

    @nn.compact
    def __call__(self, frames, train: bool):
        b = frames.shape[0]
        x = jnp.swapaxes(frames, 0, 1).reshape(3 * b, *frames.shape[2:])  # (3B, S, S, 1)
        f = Trunk(self.cfg, name="trunk")(x, train)  # (3B, F)
        f = jnp.swapaxes(f.reshape(3, b, -1), 0, 1).reshape(b, -1)  # (B, 3F) [fc7_1 fc7_2 fc7_3]
        if self.cfg.fusion_hidden:  # not in [1]: lets the frames' features interact
            f = nn.relu(nn.Dense(self.cfg.fusion_hidden, dtype=jnp.dtype(self.cfg.dtype),
                                 name="fusion")(f))
        logits = nn.Dense(2, dtype=jnp.dtype(self.cfg.dtype), name="fc8")(f)
        return logits.astype(jnp.float32)


# --- LOSS ---


def order_loss(logits, labels):
    """[1] Sec. 3.3 (SoftmaxWithLoss): mean -log softmax(logits)_label; and the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_optimizer(cfg: Config):
    """The solver: SGD momentum 0.9, lr x lr_decay every lr_decay_steps; weight decay on
    kernels only (decay_mult 0 on biases) and biases at twice the rate (lr_mult 2)."""
    sched = optax.exponential_decay(cfg.lr, cfg.lr_decay_steps, cfg.lr_decay, staircase=True)
    is_bias = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "bias", p)
    is_kernel = lambda p: jax.tree.map(lambda b: not b, is_bias(p))
    return optax.chain(optax.masked(optax.add_decayed_weights(cfg.weight_decay), is_kernel),
                       optax.masked(optax.scale(2.0), is_bias),
                       optax.sgd(sched, momentum=cfg.momentum)), sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    # () bool, False from init: True only in the tests' broken variant, where the batch's
    # labels are shuffled (independent of the order); traced, so both arms share a program
    shuffle: jax.Array


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((2, 3, cfg.frame_size, cfg.frame_size, 1))
    variables = OrderNet(cfg).init(k_net, x, train=False)
    params = variables["params"]
    return State(params, variables["batch_stats"], make_optimizer(cfg)[0].init(params),
                 jnp.zeros((), jnp.int32), key, jnp.zeros((), bool))


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, (tx, sched) = OrderNet(cfg), make_optimizer(cfg)
    key, k_data, k_drop, k_perm = jax.random.split(state.key, 4)
    frames, labels, _ = make_tuples(k_data, cfg.batch_size, cfg.positive_fraction, cfg)
    labels = jnp.where(state.shuffle, jax.random.permutation(k_perm, labels), labels)

    def loss_fn(params):
        logits, new = net.apply({"params": params, "batch_stats": state.batch_stats}, frames,
                                train=True, mutable=["batch_stats"], rngs={"dropout": k_drop})
        loss, acc = order_loss(logits, labels)
        return loss, (acc, new["batch_stats"])

    (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/order": loss, "charts/order_acc": acc, "charts/lr": sched(state.step),
               "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                         step=state.step + 1, key=key), metrics


# --- EVALUATE ---

EVAL_KEY = 12345
"""Seed of the fixed held-out tuples and probe frames (the same for every run and seed)."""


@functools.cache
def probe_frames(cfg: Config):
    """Fixed probe sets as numpy: frames (N, S, S, 1) at a random time of N fresh videos
    and the arm-direction class of each, N = probe_train + probe_test."""
    n = cfg.probe_train + cfg.probe_test

    def one(key):
        kv, kt, kp = jax.random.split(key, 3)
        v = draw_video(kv, cfg)
        t = jax.random.randint(kt, (), 0, cfg.num_frames)
        return render(v, t, kp, cfg), arm_direction_class(v, t, cfg.probe_classes)

    with jax.ensure_compile_time_eval():  # concrete keys, also when evaluate is traced
        keys = jax.random.split(jax.random.PRNGKey(EVAL_KEY + 1), n)
    x, y = jax.jit(jax.vmap(one)).lower(keys).compile(run.INIT_COMPILER_OPTIONS)(keys)
    return np.asarray(x), np.asarray(y)


@functools.cache
def eval_tuples(cfg: Config):
    """Fixed held-out tuples as numpy, labels Bernoulli(0.5): frames, labels."""
    with jax.ensure_compile_time_eval():  # a concrete key, also when evaluate is traced
        key = jax.random.PRNGKey(EVAL_KEY)
    fn = jax.jit(lambda k: make_tuples(k, cfg.num_eval_tuples, 0.5, cfg)[:2])
    frames, labels = fn.lower(key).compile(run.INIT_COMPILER_OPTIONS)(key)
    return np.asarray(frames), np.asarray(labels)


def features(state: State, frames, cfg: Config):
    """Frozen fc7 features of single frames (N, S, S, 1) -> (N, F) (running BN averages)."""
    return Trunk(cfg).apply({"params": state.params["trunk"],
                             "batch_stats": state.batch_stats["trunk"]}, frames,
                            train=False).astype(jnp.float32)


def evaluate(state: State, cfg: Config):
    """Held-out order verification on the fixed tuples ("order_acc_test", chance 0.5;
    "order_acc_pos" / "order_acc_neg" per class) and the arm-direction probes of fc7
    (linear and k-NN, all labels and probe_per_class per class)."""
    # a barrier: XLA would otherwise constant-fold the convs' input slices of the data
    tf, tl, px, py = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in (*eval_tuples(cfg), *probe_frames(cfg))))
    logits = OrderNet(cfg).apply({"params": state.params, "batch_stats": state.batch_stats},
                                 tf, train=False)
    right = jnp.argmax(logits, -1) == tl
    out = {"order_acc_test": right.mean(),
           "order_acc_pos": jnp.sum(right * tl) / jnp.sum(tl),
           "order_acc_neg": jnp.sum(right * (1 - tl)) / jnp.sum(1 - tl)}
    f = features(state, px, cfg)
    n = cfg.probe_train
    out.update(probe.probe(jax.random.PRNGKey(0), f[:n], py[:n], f[n:], py[n:],
                           cfg.probe_classes, cfg.probe_per_class, cfg.knn_k,
                           cfg.knn_temperature, cfg.probe_l2))
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: one video's frames with its flow and a sampled tuple's five frames, then
    held-out tuples with their label and the trained network's P(in order)."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)
    key = jax.random.PRNGKey(EVAL_KEY + 2)
    video = draw_video(key, cfg)
    flow = np.asarray(flow_magnitude(video, cfg))
    _, _, five = sample_tuple(jax.random.PRNGKey(1), jnp.asarray(flow), 0.5, cfg)
    ts = np.linspace(0, cfg.num_frames - 1, 10).astype(int)
    strip = [np.asarray(render(video, t, key, cfg))[..., 0] for t in ts]
    frames, labels = (a[:8] for a in eval_tuples(cfg))
    p = jax.nn.softmax(OrderNet(cfg).apply(
        {"params": state.params, "batch_stats": state.batch_stats}, jnp.asarray(frames),
        train=False))[:, 1]
    fig = plt.figure(figsize=(12, 6.2))
    g = fig.add_gridspec(3, 1, height_ratios=[1, 1.1, 2.2], hspace=0.45)
    top = g[0].subgridspec(1, 10)
    for j, t in enumerate(ts):
        ax = fig.add_subplot(top[j])
        ax.imshow(strip[j], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"t={t}", fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(g[1])
    ax.plot(np.arange(len(flow)), flow, "k-", lw=1)
    for name, t in zip("abcde", np.asarray(five), strict=True):
        ax.axvline(t, color="r" if name in "bcd" else "b", lw=1, ls="--")
        ax.text(t, flow.max() * 1.02, name, color="r" if name in "bcd" else "b", fontsize=8)
    ax.set_xlabel("frame t (tuple frames a-e: b, c, d in red)", fontsize=8)
    ax.set_ylabel("flow (px/frame)", fontsize=8)
    bottom = g[2].subgridspec(2, 12, wspace=0.05)
    for i in range(8):
        for j in range(3):
            ax = fig.add_subplot(bottom[i // 4, (i % 4) * 3 + j])
            ax.imshow(frames[i, j, ..., 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 1:
                ax.set_title(f"{'in order' if labels[i] else 'shuffled'}: P={float(p[i]):.2f}",
                             fontsize=7, color="g" if (p[i] > 0.5) == labels[i] else "r")
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(f"Shuffle and Learn on procedural videos: held-out order accuracy "
                 f"{f['order_acc_test']:.3f} (chance 0.5); arm-direction probes of fc7: "
                 f"linear {f['linear']:.3f}, 10/class {f['linear_few']:.3f}, k-NN "
                 f"{f['knn']:.3f}, 10/class {f['knn_few']:.3f}", fontsize=9)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws a video, a tuple and predictions."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["order_acc_test", "order_acc_pos",
                                               "order_acc_neg", "linear", "linear_few", "knn",
                                               "knn_few", "losses/order", "charts/order_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
