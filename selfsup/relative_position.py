"""Context prediction: self-supervised features from the relative position of two patches.

[1] C. Doersch, A. Gupta, A. A. Efros. "Unsupervised Visual Representation Learning by Context
    Prediction." ICCV 2015, arXiv:1505.05192. Released code: cdoersch/deepcontext (commit
    82401ab: train.py, solver_mko.prototxt, README.md), a refactor of the paper's code.

The second patch is one of the 8 neighbours of the first in a 3x3 grid of patch_size^2
patches with `gap` pixels between them. The label (the neighbour's slot, the released code's
pos2lbl, 0-based: 0 1 2 / 3 . 4 / 5 6 7) is drawn first, then the first patch's place,
uniform over those where both patches fit in the image; each patch is moved by its own
jitter in [-jitter, jitter]^2 pixels, so that lines and textures do not continue from one
patch into the other ([1] Sec. 3). (Had the first patch's whole grid to fit, on small images
it would have few places and the second patch's absolute position alone would give the label:
the tests' "first patch blanked" variant then beat the method.)

    OFFSETS[y] = (dy, dx) in {-1, 0, 1}^2 \\ (0, 0), reading order                  [1] Fig. 2
    top-left(second) = top-left(first) + (patch_size + gap) * OFFSETS[y] + jitter_2 - jitter_1
    f = fc6(tower(patch)), tower and fc6 shared by both patches (late fusion)       [1] Fig. 3
    logits = fc9(fc8(fc7(concat(f_first, f_second)))),  loss = -log softmax(logits)_y

Trivial solutions ([1] Sec. 3.1 and the released prep_image), applied to each patch alone:
- chroma 'project': every pixel times B = I - a^T a / (a a^T), a = [-1, 2, -1], which removes
  the green-magenta component, the axis along which chromatic aberration shifts colours.
- chroma 'drop': keep one of the 3 colour channels at random, minus its mean over the patch,
  and replace the other two by Gaussian noise of std drop_noise x std(kept channel).
- pixelate: with probability `pixelate`, downsample the patch to s x s pixels, s^2 uniform
  in [pixelate_min_pixels, (patch_size - 1)^2], and upsample it back (bilinear both ways).
'none' and 'project' subtract a fixed mean (0.5) instead of the patch's own.

Data: scikit-learn's digits are grey; they are made RGB (the grey value on all 3 channels)
so the colour measures have something to act on, and `planted_gradient` > 0 adds a synthetic
chromatic shortcut: a colour that changes with the absolute position in the image,
planted_gradient * ((x / S - 1/2) a_gm + (y / S - 1/2) a_rb), a_gm = [-1, 2, -1] / sqrt(6),
a_rb = [1, 0, -1] / sqrt(2). From it alone the position of a patch, hence the relative
position of two, can be read off. 'drop' removes it (one channel, minus its patch mean);
'project' removes only its green-magenta (x) half; 'none' keeps it. This plant is a colour
offset, not chromatic aberration proper (a position-dependent shift between the channels on
the strokes): within a patch a linear ramp is nearly an offset, so it is the per-patch mean
subtraction of 'drop' that closes it, not the dropping of channels; a plant that only
dropping or projection defeats is not implemented.

Evaluation is frozen: the tower's conv layers run on whole images, the last map is globally
average-pooled, and the linear and k-NN probes of common/probe.py read it, with all labels
and with probe_per_class labels per class; plus the held-out 8-way accuracy (one pair per
held-out digit) and the same with the digit removed (only the planted colour left:
`pos_acc_colour_only`, the accuracy of a constant guess, ~1/8, when nothing is planted).

Reproduce (CPU demo: digits upsampled to 48x48, 10-px patches, gap 4, jitter 2):
    python selfsup/relative_position.py --preset quick --num-seeds 1 \\
        --plot selfsup/relative_position.png
Measured (1 seed, 300 steps of 64 pairs, 232 s wall / 65 CPU-s on a shared 2-core CPU):
held-out 8-way accuracy 0.317 (chance 0.125; colour only 0.102); linear probe 0.907 (all
labels) / 0.753 (10 per class), k-NN 0.763 / 0.517; the same network at random init: 0.124;
0.905 / 0.755, 0.826 / 0.683. As with jigsaw.py on these 8x8 digits, the pretext task is
learned but only the linear probes reach the random tower (k-NN falls below it). The planted
shortcut (tests, TINY, 200 steps, 2 seeds): 'drop' does not read it (0.137 0.119 with the
digits removed) and learns the position from the digits (0.262 0.295, first patch blanked
0.187 0.203); 'none' reads the position from the colour alone (0.995 0.999 with the
digits removed, 0.967 0.994 with them).
Paper setting (GPU; digits upsampled to 400x400 in place of ImageNet):
    python selfsup/relative_position.py --preset paper
[1]'s numbers (Table 1, from secondary sources, not re-checked against the paper [M]): R-CNN
on PASCAL VOC 2007 detection, 46.3 mAP with colour dropping, 45.7 with projection, 40.7 from
scratch, 54.2 ImageNet-supervised; 51.1 with the data-dependent rescaling of Kraehenbuehl et
al.; 61.7 with a VGG tower; pretext accuracy 38.4% on VOC 2007 (chance 12.5%). The released
README's 51.4% mAP is a later run (1.7M iterations, rescaling, Fast R-CNN).

Differences from the paper:
- Data: ImageNet does not ship offline; the images are scikit-learn's 1,797 digits (1,000
  for training, 797 held out), grey 8x8 upsampled bilinearly to image_size (patches are cut
  from the 8x8 source by crop-and-resize, the same pixels); [1] resizes ImageNet photos to
  150K-450K pixels. Colour is RGB-replicated grey plus the optional planted gradient.
- One pair per image per step, drawn independently; [1]'s released loader cuts a whole
  jittered grid of patches from each image and uses every neighbouring pair (up to 8 per
  patch) in a batch of 512 patches. Here the label is drawn first and the first patch goes
  anywhere its neighbour (both jittered) fits in the image (no clamping at the border).
- The network follows the released train.py (caffenet_stack): AlexNet conv1-5 (96, 256, 384,
  384, 256; conv1 11x11 stride 4), LRN after pools 1 and 2, batch norm without scale and
  shift on conv3-5, fc6 and fc7 (the paper: batch norm was needed against a collapse to a
  uniform prediction), fc6 4096 per patch, fc7 4096, fc8 4096, fc9 8. conv1 pads "SAME"
  (caffe: 5), pools pad one pixel on the far side (caffe's rounding up: 3x3 pool5 on 96 px);
  no grouped convolutions; flax's default initialisation (caffe: xavier).
- Optimiser: [1]'s text says a high momentum (.999) sped learning up, while the released
  solver (solver_mko.prototxt) is plain SGD, lr 1e-5 on the SUMMED loss, no momentum, no
  weight decay; the paper preset follows the released solver (momentum 0). Here the loss
  is the mean over the batch_size pairs and the paper preset's lr is 1e-5 x 256 (the
  same step for 256 pairs); the released batch holds more pairs per patch, so its step is
  larger. 1M steps (the released README: "about 1M iterations").
- 'drop' uses [1]'s text (Gaussian noise, std ~1/100 of the kept channel); the released code
  draws uniform noise in [-0.5, 0.5] on 0-255 pixels and then rescales each patch to RMS 50,
  which is not done here. pixelate follows the released code (probability 0.33, side
  floor(sqrt(U (95^2 - 10^2) + 10^2)) for 96-px patches). As in the released prep_image,
  pixelation comes before the mean subtraction and the colour measure.
- Probes are linear (logistic regression) and k-NN on pooled conv features of the frozen
  tower; [1] fine-tunes on PASCAL VOC detection and shows nearest neighbours of fc6.
- The `quick` preset narrows the tower (3 convs of 32-64-64, no LRN, no pools, batch norm on
  the third conv, fc6 and fc7), fc6-8 of 128, and trains 300 steps of 64 pairs with lr
  0.05 and momentum 0.9.
"""

from dataclasses import dataclass, replace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import data, probe, run
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Context prediction; defaults are [1]'s released train.py (patch 96, gap 48, jitter 7,
    colour dropping, pixelation 0.33, batch 512 patches) with images in place of ImageNet."""

    image_size: int = 400
    """side of the square images (digits upsampled from 8x8); must hold a diagonal pair"""
    patch_size: int = 96
    """side of each patch"""
    gap: int = 48
    """pixels between neighbouring patches of the grid"""
    jitter: int = 7
    """each patch moves by up to this many pixels in each direction"""
    chroma: str = "drop"
    """against chromatic aberration: 'drop' (keep 1 of 3 channels), 'project' (remove the
    green-magenta axis) or 'none'"""
    drop_noise: float = 0.01
    """'drop': std of the noise in the dropped channels, relative to the kept channel's std"""
    pixelate: float = 0.33
    """probability that a patch is downsampled and upsampled back"""
    pixelate_min_pixels: int = 100
    """fewest pixels (s^2) a pixelated patch is downsampled to"""
    planted_gradient: float = 0.0
    """amplitude of a synthetic chromatic shortcut: a colour that varies with the absolute
    position in the image (0: none)"""
    num_train: int = 1000
    """digits used for training (pretext and probe fits); the other 797 are held out"""
    batch_size: int = 256
    """pairs per SGD step (2 x this many patches through the tower)"""
    num_steps: int = 1_000_000
    """SGD steps"""
    lr: float = 2.56e-3
    """SGD learning rate on the mean loss (released: 1e-5 on the summed loss)"""
    momentum: float = 0.0
    """SGD momentum (released solver: none; [1]'s text: .999)"""
    weight_decay: float = 0.0
    """L2 weight decay added to the gradient (released solver: 0)"""
    conv_channels: tuple[int, ...] = (96, 256, 384, 384, 256)
    """output channels of the tower's conv layers (AlexNet conv1-5)"""
    conv_kernels: tuple[int, ...] = (11, 5, 3, 3, 3)
    """kernel sides of the tower's conv layers"""
    conv_strides: tuple[int, ...] = (4, 1, 1, 1, 1)
    """strides of the tower's conv layers"""
    pool_after: tuple[int, ...] = (1, 2, 5)
    """conv layers (1-based) followed by a 3x3 stride-2 max pool"""
    lrn: bool = True
    """local response normalisation (size 5, alpha 1e-4, beta 0.75) after pools 1 and 2"""
    batch_norm: bool = True
    """batch norm (no scale or shift) on conv3 onwards, fc6 and fc7 (released code)"""
    fc6_units: int = 4096
    """units of the per-patch fc6 (shared by both patches)"""
    fc7_units: int = 4096
    """units of fc7 over the concatenated pair"""
    fc8_units: int = 4096
    """units of fc8 (before the 8-way fc9)"""
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
    def stride(self) -> int:
        return self.patch_size + self.gap  # grid pitch

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # pairs per update

    def validate(self):
        p = self.patch_size
        need = 2 * p + self.gap + 2 * self.jitter
        if self.image_size < need:
            raise ValueError(f"image_size={self.image_size} must be >= 2 patch_size + gap + "
                             f"2 jitter = {need} (a diagonal pair must fit)")
        for name in ("gap", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.chroma not in ("drop", "project", "none"):
            raise ValueError(f"chroma={self.chroma!r} must be 'drop', 'project' or 'none'")
        if not 0 <= self.pixelate <= 1:
            raise ValueError(f"pixelate={self.pixelate} must be in [0, 1]")
        if not 1 <= self.pixelate_min_pixels <= (p - 1) ** 2:
            raise ValueError(f"pixelate_min_pixels={self.pixelate_min_pixels} must be in "
                             f"[1, (patch_size - 1)^2 = {(p - 1) ** 2}]")
        for name in ("drop_noise", "planted_gradient", "probe_l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.knn_k < 1 or self.probe_per_class < 1:
            raise ValueError(f"knn_k={self.knn_k} and probe_per_class={self.probe_per_class} "
                             "must be >= 1")
        if not 1 <= self.num_train <= 1796:
            raise ValueError(f"num_train={self.num_train} must be in [1, 1796] (1,797 digits, "
                             "at least one held out)")
        if self.probe_per_class * 10 > self.num_train:
            raise ValueError(f"probe_per_class={self.probe_per_class} x 10 classes exceeds "
                             f"num_train={self.num_train}")
        if self.knn_k > self.num_train:
            raise ValueError(f"knn_k={self.knn_k} exceeds num_train={self.num_train}")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        n = len(self.conv_channels)
        if not n == len(self.conv_kernels) == len(self.conv_strides) or n < 1:
            raise ValueError(f"conv_channels={self.conv_channels}, conv_kernels="
                             f"{self.conv_kernels}, conv_strides={self.conv_strides} must be "
                             "non-empty and of one length")
        if min(self.conv_channels + self.conv_kernels + self.conv_strides) < 1:
            raise ValueError("conv_channels, conv_kernels, conv_strides must all be >= 1")
        if any(not 1 <= i <= n for i in self.pool_after):
            raise ValueError(f"pool_after={self.pool_after} must name conv layers 1..{n}")
        if min(self.fc6_units, self.fc7_units, self.fc8_units) < 1:
            raise ValueError("fc6_units, fc7_units, fc8_units must be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 48x48 digits, 10-px patches 4 px apart, jitter 2, 4 pixels at the coarsest
    # pixelation, a 3-conv tower, 300 steps of 64 pairs.
    "quick": dict(image_size=48, patch_size=10, gap=4, jitter=2, pixelate_min_pixels=4,
                  batch_size=64, num_steps=300, lr=0.05, momentum=0.9,
                  conv_channels=(32, 64, 64), conv_kernels=(3, 3, 3), conv_strides=(1, 2, 1),
                  pool_after=(), lrn=False, fc6_units=128, fc7_units=128, fc8_units=128,
                  shift_conv=True),
    "paper": dict(),
}

OFFSETS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])
"""(dy, dx) of the second patch's grid slot for each label (the released pos2lbl, 0-based)"""
GREEN_MAGENTA = np.array([-1.0, 2.0, -1.0])
"""[1] Sec. 3.1's a: the colour axis along which chromatic aberration shifts"""
RED_BLUE = np.array([1.0, 0.0, -1.0])
PIXEL_MEAN = 0.5
"""the fixed mean that 'none' and 'project' subtract"""


# --- PATCHES ---


def sample_positions(key, n: int, cfg: Config):
    """[1] Sec. 3: top-left corners (n, 2, 2) [pair, first/second, (y, x)] and labels (n,).
    The label (the second patch's slot OFFSETS[label]) is drawn first, uniform over the 8;
    the first patch's corner is then uniform over the places where both patches, each moved
    by its own jitter (uniform in [-jitter, jitter]^2), lie inside the image. So the first
    patch goes anywhere its neighbour fits (as the released loader's grids cover the image),
    and absolute position says much less about the label than a fixed grid centre would."""
    k_c, k_y, k_j = jax.random.split(key, 3)
    labels = jax.random.randint(k_y, (n,), 0, 8)
    step = cfg.stride * jnp.asarray(OFFSETS)[labels]  # (n, 2)
    lo = cfg.jitter + jnp.maximum(0, -step)
    hi = cfg.image_size - cfg.patch_size - cfg.jitter - jnp.maximum(0, step)  # inclusive
    first = jax.random.randint(k_c, (n, 2), lo, hi + 1)
    jit = jax.random.randint(k_j, (n, 2, 2), -cfg.jitter, cfg.jitter + 1)
    return jnp.stack([first, first + step], 1) + jit, labels


def cut_patches(src, corners, cfg: Config):
    """Patches (n, P, P, 3) of the images (n, 8, 8, 1) upsampled to image_size, at the
    top-left corners (n, 2): crop-and-resize from the 8x8 source (the same pixels as cutting
    from the upsampled image), grey on all 3 channels, plus the planted colour gradient at the
    pixels' absolute positions."""
    p, s = cfg.patch_size, cfg.image_size
    scale = src.shape[1] / s
    boxes = jnp.concatenate([corners * scale, jnp.full_like(corners, p) * scale], -1)
    grey = jax.vmap(lambda im, b: data.crop_resize(im, b, p))(src, boxes.astype(jnp.float32))
    pix = (jnp.arange(p) + 0.5)[None, :, None] + corners[:, None, :]  # (n, P, 2) y, x centres
    u = pix / s - 0.5
    colour = (u[:, None, :, 1, None] * (GREEN_MAGENTA / np.sqrt(6))  # varies with x
              + u[:, :, None, 0, None] * (RED_BLUE / np.sqrt(2)))  # with y: (n, P, P, 3)
    return jnp.repeat(grey, 3, -1) + cfg.planted_gradient * colour


def project_out(x, a=GREEN_MAGENTA):
    """[1] Sec. 3.1: x (..., 3) times B = I - a^T a / (a a^T): no component along a."""
    a = jnp.asarray(a, x.dtype)
    return x @ (jnp.eye(3, dtype=x.dtype) - jnp.outer(a, a) / (a @ a))


def drop_channels(key, x, noise: float, keep=None):
    """[1] Sec. 3.1: patches x (n, P, P, 3) keep one channel each (uniform, or `keep` (n,)),
    minus its mean over the patch; the other two become N(0, (noise * std(kept))^2)."""
    k_c, k_n = jax.random.split(key)
    if keep is None:
        keep = jax.random.randint(k_c, (x.shape[0],), 0, 3)
    kept = jnp.take_along_axis(x, keep[:, None, None, None], -1)  # (n, P, P, 1)
    kept = kept - kept.mean((1, 2, 3), keepdims=True)
    sd = kept.std((1, 2, 3), keepdims=True)
    z = noise * sd * jax.random.normal(k_n, x.shape, x.dtype)
    return jnp.where(jax.nn.one_hot(keep, 3, dtype=bool)[:, None, None, :], kept, z)


def lerp_matrix(pos, n_in: int, n_valid):
    """(len(pos), n_in) bilinear weights sampling positions `pos` of an axis whose first
    n_valid (traced) pixels are valid, clamped to [0, n_valid - 1]."""
    pos = jnp.clip(pos, 0.0, n_valid - 1.0)
    lo = jnp.floor(pos)
    f = (pos - lo)[:, None]
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.asarray(n_valid).astype(jnp.int32) - 1)
    return (1 - f) * jax.nn.one_hot(lo, n_in) + f * jax.nn.one_hot(hi, n_in)


def pixelate_one(x, side):
    """x (P, P, C) downsampled bilinearly to side x side (traced) and upsampled back."""
    p = x.shape[0]
    k = jnp.arange(p) + 0.5
    down = lerp_matrix(k * p / side - 0.5, p, p) * (jnp.arange(p) < side)[:, None]  # (P, P)
    up = lerp_matrix(k * side / p - 0.5, p, side)  # (P, P): only the first `side` columns
    m = up @ down
    return jnp.einsum("yi,xj,ijc->yxc", m, m, x)


def pixelate(key, x, cfg: Config):
    """[1] Sec. 3 / released prep_image: with probability cfg.pixelate each patch is
    pixelated to side floor(sqrt(U (P-1)^2 + (1 - U) min_pixels)), else left as is."""
    k_p, k_s = jax.random.split(key)
    n, p = x.shape[0], cfg.patch_size
    u = jax.random.uniform(k_s, (n,))
    side = jnp.floor(jnp.sqrt(u * ((p - 1) ** 2 - cfg.pixelate_min_pixels)
                              + cfg.pixelate_min_pixels))
    coarse = jax.vmap(pixelate_one)(x, side)
    on = jax.random.uniform(k_p, (n,)) < cfg.pixelate
    return jnp.where(on[:, None, None, None], coarse, x)


def preprocess(key, x, cfg: Config, train: bool = True):
    """The released order: pixelation, then mean subtraction and the chroma measure.
    train=False (whole images for the probes): no pixelation, and 'drop' keeps the green
    channel of every image without noise, so that the features do not depend on a draw."""
    k_p, k_c = jax.random.split(key)
    if train:
        x = pixelate(k_p, x, cfg)
    if cfg.chroma == "drop":
        if train:
            return drop_channels(k_c, x, cfg.drop_noise)
        return drop_channels(k_c, x, 0.0, jnp.ones(x.shape[0], jnp.int32))
    x = x - PIXEL_MEAN
    return project_out(x) if cfg.chroma == "project" else x


def make_pairs(key, src, cfg: Config, content: float = 1.0):
    """Source digits (n, 8, 8, 1) -> (first, second) patches (n, P, P, 3) each, ready for
    the network, and labels (n,). content=0 removes the digit (only the planted colour)."""
    k_pos, k_a, k_b = jax.random.split(key, 3)
    corners, labels = sample_positions(k_pos, src.shape[0], cfg)
    a = preprocess(k_a, cut_patches(content * src, corners[:, 0], cfg), cfg)
    b = preprocess(k_b, cut_patches(content * src, corners[:, 1], cfg), cfg)
    return a, b, labels


# --- NETWORKS ---


def lrn(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75):
    """Caffe's across-channel local response normalisation."""
    h = size // 2
    sq = jnp.pad(x * x, [(0, 0)] * (x.ndim - 1) + [(h, h)])
    window = sum(sq[..., i:i + x.shape[-1]] for i in range(size))
    return x / (1.0 + alpha / size * window) ** beta


def batch_norm(x, train: bool, on: bool):
    """Caffe's BatchNorm layer (no scale or shift) when `on`."""
    if not on:
        return x
    return nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                        momentum=0.9, epsilon=1e-5, dtype=x.dtype)(x)


class Tower(nn.Module):
    """The per-patch stack ([1] Fig. 3, caffenet_stack): convs (batch norm from the third),
    pools, LRN after the first two pools, and fc6. features=True: the last conv map,
    globally average-pooled (B, channels[-1]), for any image size."""

    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool, features: bool = False):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        x = x.astype(dt)
        n_pool = 0
        layers = zip(c.conv_channels, c.conv_kernels, c.conv_strides, strict=True)
        for i, (ch, k, s) in enumerate(layers):
            x = Conv(ch, k, s, shift=c.shift_conv, dtype=dt)(x)
            x = nn.relu(batch_norm(x, train, c.batch_norm and i >= 2))
            if i + 1 in c.pool_after:  # padded on the far side: caffe's rounding up
                x = nn.max_pool(x, (3, 3), (2, 2), padding=((0, 1), (0, 1)))
                n_pool += 1
                if c.lrn and n_pool <= 2:
                    x = lrn(x)
        if features:
            return x.mean((1, 2)).astype(jnp.float32)
        x = nn.Dense(c.fc6_units, dtype=dt)(x.reshape(x.shape[0], -1))
        return nn.relu(batch_norm(x, train, c.batch_norm))


class ContextNet(nn.Module):
    """[1] Fig. 3: one Tower for both patches, concatenation, fc7, fc8, fc9 over 8 slots."""

    cfg: Config

    @nn.compact
    def __call__(self, first, second, train: bool):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        n = first.shape[0]
        f = Tower(c, name="tower")(jnp.concatenate([first, second]), train)  # (2n, fc6)
        h = jnp.concatenate([f[:n], f[n:]], -1)  # late fusion: (n, 2 fc6)
        h = nn.relu(batch_norm(nn.Dense(c.fc7_units, dtype=dt)(h), train, c.batch_norm))
        h = nn.relu(nn.Dense(c.fc8_units, dtype=dt)(h))
        return nn.Dense(8, dtype=dt)(h).astype(jnp.float32)


# --- LOSS ---


def position_loss(logits, labels):
    """8-way softmax cross-entropy of the second patch's slot; also the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_optimizer(cfg: Config):
    """SGD (momentum when > 0) with L2 decay added to the gradient (the released solver)."""
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(cfg.lr, momentum=cfg.momentum or None))


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def train_images(cfg: Config):
    """(train_x (n, 8, 8, 1), train_y, test_x, test_y): the digits at their 8x8 source
    resolution (numpy, cached); patches are cut from them on the device."""
    return data.digit_images(8, cfg.num_train)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((2, cfg.patch_size, cfg.patch_size, 3))
    v = ContextNet(cfg).init(k_net, x, x, train=False)
    params = v["params"]
    return State(params, v.get("batch_stats", {}), make_optimizer(cfg).init(params),
                 jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, tx = ContextNet(cfg), make_optimizer(cfg)
    train_x = jnp.asarray(train_images(cfg)[0])
    key, k_batch, k_pair = jax.random.split(state.key, 3)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,), replace=False)
    first, second, labels = make_pairs(k_pair, train_x[idx], cfg)

    def loss_fn(params):
        logits, new = net.apply({"params": params, "batch_stats": state.batch_stats}, first,
                                second, train=True, mutable=["batch_stats"])
        loss, acc = position_loss(logits, labels)
        return loss, (acc, new.get("batch_stats", {}))

    (loss, (acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/position": loss, "charts/position_acc": acc,
               "charts/grad_norm": optax.global_norm(grads)}
    return State(params, stats, opt_state, state.step + 1, key), metrics


# --- EVALUATE ---


def whole_images(src, cfg: Config):
    """Source digits -> whole image_size images, RGB + planted colour, preprocessed as the
    patches are with train=False."""
    corner = jnp.zeros((src.shape[0], 2), jnp.int32)
    big = replace(cfg, patch_size=cfg.image_size)
    return preprocess(jax.random.PRNGKey(2), cut_patches(src, corner, big), cfg, False)


def predict(state: State, src, cfg: Config, content: float = 1.0):
    """Logits and labels of one pair per source digit (fixed key)."""
    first, second, labels = make_pairs(jax.random.PRNGKey(1), src, cfg, content)
    v = {"params": state.params, "batch_stats": state.batch_stats}
    return ContextNet(cfg).apply(v, first, second, train=False), labels


def evaluate(state: State, cfg: Config):
    """Probe accuracies on the 797 held-out digits from the frozen tower's pooled conv
    features: linear and k-NN with all 1,000 training labels ("linear", "knn") and with
    probe_per_class per class ("linear_few", "knn_few"); the held-out 8-way accuracy
    ("pos_acc_test") and the same pairs with the digits removed ("pos_acc_colour_only")."""
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in train_images(cfg)))
    v = {"params": state.params["tower"], "batch_stats": state.batch_stats.get("tower", {})}
    feats = lambda x: Tower(cfg).apply(v, whole_images(x, cfg), train=False, features=True)
    out = probe.probe(jax.random.PRNGKey(0), feats(tr_x), tr_y, feats(te_x), te_y, 10,
                      cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)
    out["pos_acc_test"] = position_loss(*predict(state, te_x, cfg))[1]
    out["pos_acc_colour_only"] = position_loss(*predict(state, te_x, cfg, 0.0))[1]
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: the 8-way confusion matrix on held-out pairs, and one held-out digit with
    three pairs drawn by sample_positions (the first patch anywhere its neighbour fits, the
    gap and each patch's own jitter as in training)."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: np.asarray(a)[0], res.state)  # host: no per-leaf programs
    te_x = jnp.asarray(train_images(cfg)[2])
    logits, labels = jax.jit(predict, static_argnums=2).lower(state, te_x, cfg).compile(
        run.INIT_COMPILER_OPTIONS)(state, te_x)  # run once: unoptimised compiles faster
    pred, labels = np.argmax(np.asarray(logits), -1), np.asarray(labels)
    conf = np.zeros((8, 8))
    np.add.at(conf, (labels, pred), 1)
    conf /= np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(1, 2, figsize=(9, 4.2))
    ax[0].imshow(conf, vmin=0, vmax=1, cmap="viridis")
    names = ["NW", "N", "NE", "W", "E", "SW", "S", "SE"]
    ax[0].set_xticks(range(8), names)
    ax[0].set_yticks(range(8), names)
    ax[0].set_xlabel("predicted slot")
    ax[0].set_ylabel("true slot")
    for i in range(8):
        ax[0].text(i, i, f"{conf[i, i]:.2f}", ha="center", va="center", fontsize=7, color="w")
    img = np.asarray(data.crop_resize(te_x[0], jnp.array([0.0, 0.0, 8.0, 8.0]),
                                      cfg.image_size))[..., 0]
    ax[1].imshow(img, cmap="gray")
    corners, labels = jax.jit(sample_positions, static_argnums=(1, 2))(
        jax.random.PRNGKey(1), 3, cfg)  # as training draws (one program, not op by op)
    for (first, second), label, c in zip(np.asarray(corners), np.asarray(labels), "rgy",
                                         strict=True):
        for (y, x), ls in ((first, "-"), (second, "--")):
            ax[1].add_patch(plt.Rectangle((x - 0.5, y - 0.5), cfg.patch_size, cfg.patch_size,
                                          fill=False, color=c, ls=ls, lw=1.5))
        ax[1].text(second[1] + cfg.patch_size / 2 - 0.5, second[0] + cfg.patch_size / 2 - 0.5,
                   names[label], color=c, ha="center", va="center", fontsize=8)
    ax[1].set_title(f"3 sampled pairs (solid: first patch, dashed: its neighbour, slot named)"
                    f"\npatch {cfg.patch_size}, gap {cfg.gap}, jitter +-{cfg.jitter} px",
                    fontsize=8)
    ax[1].axis("off")
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(f"relative position ({cfg.chroma}): held-out 8-way acc "
                 f"{f['pos_acc_test']:.2f} (chance 0.125), colour only "
                 f"{f['pos_acc_colour_only']:.2f}\nprobes: linear {f['linear']:.3f}, k-NN "
                 f"{f['knn']:.3f}, 10/class linear {f['linear_few']:.3f}, k-NN "
                 f"{f['knn_few']:.3f}", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's confusion matrix."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["linear", "linear_few", "knn", "knn_few",
                                               "pos_acc_test", "pos_acc_colour_only",
                                               "losses/position", "charts/position_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
