"""Exemplar-CNN: features from discriminating surrogate classes of transformed seed patches.

[1] A. Dosovitskiy, J. T. Springenberg, M. Riedmiller, T. Brox. "Discriminative Unsupervised
    Feature Learning with Convolutional Neural Networks." NIPS 2014, arXiv:1406.6909v1;
    TPAMI 2016 version (with P. Fischer), arXiv:1406.6909v2. No released code was found in
    the search index; hyperparameters below were checked against secondary notes that quote
    the v2 PDF with page numbers and against the reimplementation EricArazo/ExemplarCNN
    (commit ffc35fd: create_surrogate_data_STL.py, training_scripts/exp083.py), which
    reproduces [1]'s STL-10 number (74.14 vs 74.2). Items marked [M] could not be confirmed.

N "seed" patches x_1..x_N of patch_size^2 pixels are cut from unlabeled images at varying
positions and scales, with probability proportional to the mean squared gradient magnitude
inside the window among all windows of all images ([1] Sec. 2, p. 2: patches that contain
objects or their parts). Each seed is a surrogate class; a transformation T_alpha composes
([1] Sec. 2, p. 2):
    translation  vertical and horizontal, by up to 0.2 of the patch size
    scaling      by a factor in [0.7, 1.4]
    rotation     by an angle in [-20, 20] degrees
    contrast 1   the projection of every pixel on each principal component of the set of
                 all pixels times a factor in [0.5, 2] (one factor per component, the same
                 for all pixels of the patch): x' = mu + V diag(f) V^T (x - mu)
    contrast 2   saturation and value (HSV) raised to a power in [0.25, 4], times a factor
                 in [0.7, 1.4], plus a value in [-0.1, 0.1]
    color        a value in [-0.1, 0.1] added to the hue
and K transformations of each seed make its class S_i = {T_alpha_i^k x_i, k = 1..K}:
    L(X) = sum_i sum_{T in T_i} l(i, T x_i),  l(i, y) = -log softmax(f(y))_i     [1] Eq. 1-2
    K -> infinity: L(X) = sum_i E_alpha[l(i, T_alpha x_i)]                      [1] Eq. 3
The network is 64c5-64c5-128f (two 5x5 conv layers of 64 filters, each followed by 2x2 max
pooling, a 128-unit fully connected layer with dropout, an N-way softmax), trained by SGD
with momentum 0.9 from lr 0.01, divided by 3 when the surrogate validation error stops
falling ([1] Sec. 4 and App. B). Evaluation ([1] Sec. 4): the conv and fc layers run
convolutionally on whole images, each layer's map is max-pooled over its 4 quadrants, the
concatenation is the feature; [1] trains a linear SVM on it. Here: the linear and k-NN probes
of common/probe.py with all labels and 10 per class, and the surrogate accuracy on
eval_fresh (8) fresh transformations of each of the N seeds (the full family, whatever
`transforms` trains with), both in chunks of EVAL_CHUNK images (lax.map).

Here seeds are drawn once in `init` (stored as source-image indices and windows) and a
sample's transformation is a pure function of (seed i, draw k): its parameters come from
fold_in(fold_in(data_key, i), k), k uniform in [0, K), so the N*K-sample surrogate set is
never stored; samples_per_class = 0 draws a fresh transformation every time (Eq. 3).

Reproduce (CPU demo on scikit-learn's digits upsampled to 24x24, 16-px patches):
    python selfsup/exemplar_cnn.py --preset quick --plot selfsup/exemplar_cnn.png
    python selfsup/exemplar_cnn.py --preset quick --supervised     # the supervised encoder
Measured (1 seed, 1280 steps, 16.2 min wall / 91 CPU-s on a heavily shared 2-core CPU):
surrogate accuracy on 8 fresh transformations per seed 0.220 (chance 1/256 = 0.004); linear
probe 0.981 (all labels) / 0.932 (10 per class), k-NN 0.965 / 0.925. The same network at
random init: linear 0.992 / 0.921, k-NN 0.966 / 0.867 (surrogate 0.008, measured before the
antialiased warp and the 8 fresh transformations per seed). Supervised (--supervised, same
budget; measured before the antialiased warp): 0.993 / 0.959, k-NN 0.979 / 0.964. On these
8x8 digits a random 3-layer net's quadrant-pooled features already probe at 0.99;
Exemplar-CNN's gain shows in the few-label probes (k-NN +0.06).
Paper setting (GPU; digits upsampled to 96x96 in place of STL-10's unlabeled images):
    python selfsup/exemplar_cnn.py --preset paper
[1] Table 1, the 64c5-64c5-128f network of the defaults and the paper preset (from memory,
not checked against the PDF [M]): STL-10 67.1, CIFAR-10(400) 69.7, CIFAR-10 75.7,
Caltech-101 79.8; the larger 92c5-256c5-512c5-1024f (v2, as quoted with page numbers by
the secondary notes [M]): STL-10 74.2 +- 0.4, CIFAR-10(400) 76.6 +- 0.2, CIFAR-10 84.3,
Caltech-101 87.1 +- 0.7, Caltech-256(30) 53.6 +- 0.2; Fig. 3: accuracy peaks near N = 8000
surrogate classes; Fig. 4: it saturates near K = 100 samples per class.

Differences from the paper:
- Data: STL-10 does not ship offline (and common/data has no STL-10 reader, so there is no
  --data-dir loader); seeds come from scikit-learn's digits (1,000 for training, 797 held
  out), grey, upsampled from 8x8 to image_size. On grey images contrast 2 acts on the value
  alone (saturation 0) and the hue shift does nothing; the RGB path is used for 3-channel
  images and tested by hand.
- N (16000) and K (100) of the paper preset follow the reimplementation (16000 classes) and
  [1] Fig. 4 (saturation at 100) [M]; [1]'s largest numbers use a bigger net and N = 16000
  [M]. The seed window sides (`seed_sizes`, "varying scales") are our choice [M].
- Ranges are from [1]; how values are drawn inside them is not stated: multiplicative
  factors (scale, contrast 1, power and factor of contrast 2) are log-uniform (each range is
  symmetric about 1 in log space), shifts and angles uniform; saturation and value get
  independent draws [M]. The order is geometry, contrast 1, contrast 2, color (the
  reimplementation's); pixels outside the source image repeat the border. The geometric
  warp (rotation included) is antialiased by supersampling (see warp); [1] does not say
  how it resamples [M].
- Padding "SAME" for the 5x5 convs and flax's default initialisation [M]; dropout 0.5 [M];
  batch 128 [M] (the reimplementation's); no weight decay by default (the reimplementation
  copies per-layer decay from a caffe prototxt we could not read) [M].
- The learning rate is divided by 3 at fixed fractions of training (`lr_drops`), not on a
  validation plateau; training length (`num_epochs` of N*K samples) is ours [M].
- Probes: logistic regression and k-NN (common/probe.py) in place of the linear SVM.
- `supervised` trains the same network on the digit label of each seed's source image (a
  supervised reference encoder, not in [1]).
"""

import functools
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import data, probe, run
from common.nets import Conv

TRANSFORMS = ("translate", "scale", "rotate", "contrast1", "contrast2", "color")
AA_TAPS = 4  # warp's antialiasing: bilinear samples per patch pixel and axis
EVAL_CHUNK = 128  # images (or samples) per step of evaluate's lax.map: bounds its memory

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Exemplar-CNN; defaults are [1]'s STL-10 setting (64c5-64c5-128f) on the digits."""

    image_size: int = 96
    """side of the unlabeled images (digits upsampled from 8x8; STL-10 is 96x96)"""
    patch_size: int = 32
    """side of the seed patches and of the network's input"""
    seed_sizes: tuple[int, ...] = (32, 48, 64)
    """window sides (pixels of the image) a seed is cut from, one drawn per seed, resized to
    patch_size ("varying scales")"""
    num_classes: int = 16000
    """N: seed patches, i.e. surrogate classes"""
    samples_per_class: int = 100
    """K: transformations per seed (0: a fresh one at every draw, [1] Eq. 3)"""
    transforms: tuple[str, ...] = TRANSFORMS
    """transformations composed in training (any of translate scale rotate contrast1
    contrast2 color; () trains on the seeds alone)"""
    max_translate: float = 0.2
    """translation range, a fraction of the patch size"""
    scale_range: tuple[float, float] = (0.7, 1.4)
    """range of the scaling factor"""
    max_rotate: float = 20.0
    """rotation range in degrees"""
    pca_range: tuple[float, float] = (0.5, 2.0)
    """contrast 1: range of the factor on each principal component"""
    power_range: tuple[float, float] = (0.25, 4.0)
    """contrast 2: range of the power on saturation and value"""
    sv_factor_range: tuple[float, float] = (0.7, 1.4)
    """contrast 2: range of the factor on saturation and value"""
    sv_shift: float = 0.1
    """contrast 2: range of the value added to saturation and value"""
    hue_shift: float = 0.1
    """color: range of the value added to the hue"""
    conv_channels: tuple[int, ...] = (64, 64)
    """filters of the 5x5 conv layers (2x2 max pooling after the first two)"""
    fc_units: int = 128
    """units of the fully connected layer"""
    dropout: float = 0.5
    """dropout rate on the fully connected layer"""
    supervised: bool = False
    """train on the digit label of each seed's source image instead (reference encoder)"""
    num_train: int = 1000
    """digits used for seeds and probe fits; the other 797 are held out"""
    batch_size: int = 128
    """samples per SGD step"""
    num_epochs: int = 30
    """epochs of N * max(K, 1) samples"""
    lr: float = 0.01
    """initial SGD learning rate"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 0.0
    """L2 weight decay added to the gradient"""
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    """fractions of training at which the learning rate is divided by 3"""
    eval_fresh: int = 8
    """fresh transformations of every seed scored by evaluate (surrogate_acc_fresh)"""
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
        per_epoch = self.num_classes * max(self.samples_per_class, 1)
        return max(self.num_epochs * per_epoch // self.batch_size, 1)

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def fc_side(self) -> int:
        return self.patch_size // 2 ** min(2, len(self.conv_channels))

    def validate(self):
        if not self.conv_channels or min(self.conv_channels) < 1:
            raise ValueError(f"conv_channels={self.conv_channels} must be non-empty, each >= 1")
        pool = 2 ** min(2, len(self.conv_channels))
        if self.patch_size % pool:
            raise ValueError(f"patch_size={self.patch_size} must be divisible by {pool} (the "
                             "2x2 poolings)")
        if not self.patch_size <= self.image_size:
            raise ValueError(f"patch_size={self.patch_size} exceeds image_size={self.image_size}")
        if not self.seed_sizes or not all(2 <= s <= self.image_size for s in self.seed_sizes):
            raise ValueError(f"seed_sizes={self.seed_sizes} must be non-empty, each in [2, "
                             f"image_size={self.image_size}]")
        if self.samples_per_class < 0:
            raise ValueError(f"samples_per_class={self.samples_per_class} must be >= 0")
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise ValueError(f"transforms={self.transforms}: unknown {bad}; choose from "
                             f"{TRANSFORMS}")
        for name in ("scale_range", "pca_range", "power_range", "sv_factor_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name}={(lo, hi)} must satisfy 0 < low <= high")
        for name in ("max_translate", "max_rotate", "sv_shift", "hue_shift", "probe_l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not all(0 < f < 1 for f in self.lr_drops):
            raise ValueError(f"lr_drops={self.lr_drops} must each be in (0, 1)")
        if not 1 <= self.num_train <= 1796:
            raise ValueError(f"num_train={self.num_train} must be in [1, 1796]")
        if self.probe_per_class * 10 > self.num_train or self.knn_k > self.num_train:
            raise ValueError(f"probe_per_class={self.probe_per_class} x 10 and knn_k="
                             f"{self.knn_k} must not exceed num_train={self.num_train}")
        if self.eval_fresh < 1:
            raise ValueError(f"eval_fresh={self.eval_fresh} must be >= 1")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 24x24 digits, 16-px patches from 12-20 px windows, 256 classes x 32 samples,
    # a 32c5-32c5-64f net, batch 64, 10 epochs (1280 steps).
    "quick": dict(image_size=24, patch_size=16, seed_sizes=(12, 16, 20), num_classes=256,
                  samples_per_class=32, conv_channels=(32, 32), fc_units=64, batch_size=64,
                  num_epochs=10, lr=0.03, shift_conv=True),
    "paper": dict(),
}


# --- SEED PATCHES ---


def gradient_energy(images):
    """Squared gradient magnitude per pixel, summed over channels: images (n, H, W, C) ->
    (n, H, W), central differences inside, one-sided at the border (np.gradient)."""
    gy, gx = jnp.gradient(images, axis=(1, 2))
    return (gy ** 2 + gx ** 2).sum(-1)


def window_logits(images, size: int):
    """log of the mean squared gradient magnitude of every size x size window (integral
    image): (n, H - size + 1, W - size + 1); log 0 is -inf (a flat window is never drawn)."""
    g = jnp.pad(gradient_energy(images), ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    s = g[:, size:, size:] - g[:, :-size, size:] - g[:, size:, :-size] + g[:, :-size, :-size]
    return jnp.log(jnp.maximum(s / size ** 2, 0.0))


def sample_seeds(key, images, cfg: Config):
    """[1] Sec. 2: N seeds, each of a uniformly drawn window side (seed_sizes), its window
    drawn among all windows of that side in all images with probability proportional to the
    window's mean squared gradient magnitude: the image first, in proportion to the total
    over its windows (logsumexp of their logits), then the position within it. Returns
    (image index (N,) int32, window (N, 3) = centre y, centre x (pixel index coordinates)
    and side)."""
    n, h, w, _ = images.shape
    k_size, k_img, k_pos = jax.random.split(key, 3)
    which = jax.random.randint(k_size, (cfg.num_classes,), 0, len(cfg.seed_sizes))
    logits = jnp.stack([  # (sizes, n, H, W): windows by their top-left corner, -inf padded
        jnp.pad(window_logits(images, s), ((0, 0), (0, s - 1), (0, s - 1)),
                constant_values=-jnp.inf) for s in cfg.seed_sizes])
    per_image = jax.nn.logsumexp(logits, axis=(2, 3))  # (sizes, n); a flat image: -inf
    img = jax.random.categorical(k_img, per_image[which])
    pos = jax.random.categorical(k_pos, logits[which, img].reshape(cfg.num_classes, -1))
    side = jnp.asarray(cfg.seed_sizes, jnp.float32)[which]
    y0, x0 = (pos // w).astype(jnp.float32), (pos % w).astype(jnp.float32)
    return img, jnp.stack([y0 + (side - 1) / 2, x0 + (side - 1) / 2, side], -1)


# --- TRANSFORMATIONS ---


@struct.dataclass
class Transform:
    """The parameters alpha of one T_alpha."""

    shift: jax.Array  # (2,) pixels of the patch, content moves by (dy, dx)
    scale: jax.Array  # () > 1 enlarges the content
    angle: jax.Array  # () radians, counter-clockwise as displayed
    pca: jax.Array  # (C,) factor on each principal component
    power: jax.Array  # (2,) on saturation, value
    factor: jax.Array  # (2,)
    add: jax.Array  # (2,)
    hue: jax.Array  # () added to the hue (turns)


def identity_transform(channels: int) -> Transform:
    one, zero = jnp.ones(()), jnp.zeros(())
    return Transform(jnp.zeros(2), one, zero, jnp.ones(channels), jnp.ones(2), jnp.ones(2),
                     jnp.zeros(2), zero)


def draw_transform(key, cfg: Config, channels: int, family=None) -> Transform:
    """alpha ~ the ranges of [1] Sec. 2 for the transformations in `family` (default
    cfg.transforms; the others are the identity). One uniform draw, sliced."""
    family = cfg.transforms if family is None else family
    u = jax.random.uniform(key, (11 + channels,))
    lin = lambda v, a: a * (2 * v - 1)  # uniform in [-a, a]
    log = lambda v, r: jnp.exp(math.log(r[0]) + v * (math.log(r[1]) - math.log(r[0])))
    t = identity_transform(channels)
    on = lambda name, val, off: val if name in family else off
    return Transform(
        shift=on("translate", lin(u[0:2], cfg.max_translate * cfg.patch_size), t.shift),
        scale=on("scale", log(u[2], cfg.scale_range), t.scale),
        angle=on("rotate", lin(u[3], math.radians(cfg.max_rotate)), t.angle),
        pca=on("contrast1", log(u[11:], cfg.pca_range), t.pca),
        power=on("contrast2", log(u[4:6], cfg.power_range), t.power),
        factor=on("contrast2", log(u[6:8], cfg.sv_factor_range), t.factor),
        add=on("contrast2", lin(u[8:10], cfg.sv_shift), t.add),
        hue=on("color", lin(u[10], cfg.hue_shift), t.hue))


def warp(image, window, alpha: Transform, size: int):
    """Translation, scaling and rotation: the size x size patch whose pixel at offset o from
    the centre shows the source at centre + k R (o - shift), k = side / (size scale) source
    pixels per patch pixel, R the rotation by `angle` (bilinear; the border repeats).
    Antialiased: where the patch shrinks the source (k > 1), each patch pixel averages
    AA_TAPS^2 bilinear samples spread over a square of sqrt(2 (k^2 - 1)) source pixels
    around its point (with bilinear's own triangle, the variance of a triangle of half-width
    k: jax.image's antialiased linear kernel); k <= 1 samples the point alone.
    image (H, W, C), window (3,)."""
    k = window[2] / size / alpha.scale
    width = jnp.sqrt(2 * jnp.maximum(k ** 2 - 1, 0.0)) / k  # in patch pixels
    taps = (jnp.arange(AA_TAPS) - (AA_TAPS - 1) / 2) / AA_TAPS * width
    o = jnp.arange(size) - (size - 1) / 2
    qy = (o[:, None] - alpha.shift[0])[:, :, None, None] + taps[:, None]  # (size, 1, m, 1)
    qx = (o[None, :] - alpha.shift[1])[:, :, None, None] + taps  # (1, size, 1, m)
    c, s = jnp.cos(alpha.angle), jnp.sin(alpha.angle)
    sy = window[0] + k * (c * qy + s * qx)  # (size, size, m, m) source rows
    sx = window[1] + k * (-s * qy + c * qx)
    sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [sy, sx], order=1,
                                                          mode="nearest").mean((2, 3))
    return jax.vmap(sample, 2, 2)(image)


def pca_contrast(x, factors, mean, components):
    """Contrast 1: x' = mu + V diag(f) V^T (x - mu) on every pixel (..., C); V (C, C) holds
    the principal components of all pixels in its columns, mu their mean."""
    return mean + ((x - mean) @ components) * factors @ components.T


def rgb_to_hsv(x):
    """(..., 3) RGB in [0, 1] -> HSV in [0, 1] (matplotlib's convention; hue 0 for grey)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, mn = x.max(-1), x.min(-1)
    delta = v - mn
    s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    d = jnp.where(delta > 0, delta, 1.0)
    h = jnp.where(r == v, (g - b) / d, jnp.where(g == v, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    return jnp.stack([jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0), s, v], -1)


def hsv_to_rgb(x):
    """(..., 3) HSV in [0, 1] -> RGB."""
    h, s, v = x[..., 0], x[..., 1], x[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(jnp.int32) % 6
    pick = lambda *c: jnp.select([i == k for k in range(6)], list(c))
    return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)],
                     -1)


def hsv_contrast_color(x, alpha: Transform):
    """Contrast 2 (S, V -> clip(S^p f + a)) and color (H -> H + dh mod 1). A 1-channel image
    is grey: its value is transformed, its saturation stays 0, the hue does nothing."""
    sv = lambda ch, j: jnp.clip(ch ** alpha.power[j] * alpha.factor[j] + alpha.add[j], 0, 1)
    x = jnp.clip(x, 0.0, 1.0)
    if x.shape[-1] == 1:
        return sv(x, 1)
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(jnp.stack([(hsv[..., 0] + alpha.hue) % 1.0, sv(hsv[..., 1], 0),
                                 sv(hsv[..., 2], 1)], -1))


def transform(image, window, alpha: Transform, stats, size: int):
    """T_alpha of the seed (image, window): geometry, contrast 1, contrast 2, color."""
    x = warp(image, window, alpha, size)
    x = pca_contrast(x, alpha.pca, stats[0], stats[1])
    return hsv_contrast_color(x, alpha)


# --- DATA ---


def images(cfg: Config):
    """(train_x, train_y, test_x, test_y) as numpy (cached in common.data)."""
    return data.digit_images(cfg.image_size, cfg.num_train)


def pixel_pca(train_x):
    """Mean (C,) and principal components (C, C, columns) of all training pixels."""
    px = np.asarray(train_x, np.float64).reshape(-1, train_x.shape[-1])
    mean = px.mean(0)
    _, vecs = np.linalg.eigh(np.cov(px, rowvar=False).reshape(px.shape[1], px.shape[1]))
    return mean.astype(np.float32), vecs[:, ::-1].astype(np.float32)


def make_batch(keys, cls, seed_img, seed_box, train_x, stats, cfg: Config, family=None):
    """Transformed samples (B, P, P, C) of the seeds `cls` (B,), one transformation per key."""
    c = train_x.shape[-1]

    def one(key, i):
        alpha = draw_transform(key, cfg, c, family)
        return transform(train_x[seed_img[i]], seed_box[i], alpha, stats, cfg.patch_size)

    return jax.vmap(one)(keys, cls)


# --- NETWORKS ---


class ExemplarNet(nn.Module):
    """[1] Sec. 4: 5x5 convs (ReLU; 2x2 max pooling after the first two), the fully connected
    layer as a conv over the whole last map (so it also runs on larger images), dropout, the
    classifier. features=True: every layer's map (after its ReLU) for the probes."""

    cfg: Config
    num_outputs: int

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        x = x.astype(dt)
        maps = []
        for i, ch in enumerate(c.conv_channels):
            x = nn.relu(Conv(ch, 5, shift=c.shift_conv, dtype=dt)(x))
            maps.append(x)
            if i < 2:
                x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(Conv(c.fc_units, c.fc_side, shift=c.shift_conv, padding="VALID", dtype=dt,
                         name="fc")(x))  # (B, 1, 1, fc) on a patch
        maps.append(x)
        if features:
            return [m.astype(jnp.float32) for m in maps]
        x = nn.Dropout(c.dropout, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_outputs, dtype=dt, name="classifier")(x).astype(jnp.float32)


def network(cfg: Config) -> ExemplarNet:
    return ExemplarNet(cfg, 10 if cfg.supervised else cfg.num_classes)


def quadrant_max(m):
    """[1] Sec. 4: max over each of the 4 quadrants of a map (B, h, w, C) -> (B, 4C) (odd
    sides: the middle row/column belongs to both halves)."""
    h, w = m.shape[1:3]
    a, b = (h + 1) // 2, (w + 1) // 2
    quads = [m[:, :a, :b], m[:, :a, w - b:], m[:, h - a:, :b], m[:, h - a:, w - b:]]
    return jnp.concatenate([q.max((1, 2)) for q in quads], -1)


# --- LOSS ---


def surrogate_loss(logits, labels):
    """[1] Eq. 1-2: mean of -log softmax(f(T x_i))_i over the batch; also the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_optimizer(cfg: Config):
    """SGD with momentum 0.9 from lr 0.01 ([1] App. B), L2 decay added to the gradient, the
    rate divided by 3 at the fractions lr_drops of training."""
    sched = optax.piecewise_constant_schedule(
        cfg.lr, {int(f * cfg.num_updates): 1 / 3 for f in cfg.lr_drops})
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(sched, momentum=cfg.momentum)), sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    seed_img: jax.Array  # (N,) source image of each seed
    seed_box: jax.Array  # (N, 3) centre y, centre x, side
    data_key: jax.Array  # the key of the K transformations of every seed
    step: jax.Array
    key: jax.Array
    # () bool, False from init: True only in the tests' broken variant, where each sample
    # is cut from the seed of the next sample in the batch (labels independent of seeds);
    # a traced flag, so both arms run in one compiled program
    shuffle: jax.Array


def init(key, cfg: Config) -> State:
    k_net, k_seed, k_data, key = jax.random.split(key, 4)
    # a barrier: XLA would otherwise constant-fold the gradient maps of the data (minutes)
    train_x = jax.lax.optimization_barrier(jnp.asarray(images(cfg)[0]))
    seed_img, seed_box = sample_seeds(k_seed, train_x, cfg)
    x = jnp.zeros((1, cfg.patch_size, cfg.patch_size, train_x.shape[-1]))
    params = network(cfg).init(k_net, x)["params"]
    return State(params, make_optimizer(cfg)[0].init(params), seed_img, seed_box, k_data,
                 jnp.zeros((), jnp.int32), key, jnp.zeros((), bool))


# --- UPDATE ---


def sample_keys(key, data_key, cls, cfg: Config):
    """The transformation key of each sample: fold_in(fold_in(data_key, i), k), k uniform in
    [0, K) (the K fixed transformations of seed i), or a fresh key when K = 0."""
    if cfg.samples_per_class == 0:
        return jax.random.split(key, cls.shape[0])
    k = jax.random.randint(key, cls.shape, 0, cfg.samples_per_class)
    return jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(data_key, i), j))(cls, k)


def update(state: State, cfg: Config):
    net, (tx, sched) = network(cfg), make_optimizer(cfg)
    train_x, train_y = (jnp.asarray(a) for a in images(cfg)[:2])
    stats = tuple(jnp.asarray(a) for a in pixel_pca_cached(cfg))
    key, k_cls, k_t, k_drop = jax.random.split(state.key, 4)
    cls = jax.random.randint(k_cls, (cfg.batch_size,), 0, cfg.num_classes)
    src = jnp.where(state.shuffle, jnp.roll(cls, 1), cls)  # cls unless the broken variant
    x = make_batch(sample_keys(k_t, state.data_key, cls, cfg), src, state.seed_img,
                   state.seed_box, train_x, stats, cfg)
    labels = train_y[state.seed_img[cls]] if cfg.supervised else cls

    def loss_fn(params):
        logits = net.apply({"params": params}, x - stats[0], train=True,
                           rngs={"dropout": k_drop})
        return surrogate_loss(logits, labels)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/surrogate": loss, "charts/surrogate_acc": acc,
               "charts/lr": sched(state.step), "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         key=key), metrics


@functools.cache
def _pca(image_size: int, num_train: int):
    return pixel_pca(data.digit_images(image_size, num_train)[0])


def pixel_pca_cached(cfg: Config):
    """pixel_pca of the training images, cached as numpy (see common/run.py on data)."""
    return _pca(cfg.image_size, cfg.num_train)


# --- EVALUATE ---


def features(params, x, cfg: Config, mean):
    """[1] Sec. 4: every layer's map on whole images, max-pooled over 4 quadrants, joined."""
    maps = network(cfg).apply({"params": params}, x - mean, features=True)
    return jnp.concatenate([quadrant_max(m) for m in maps], -1)


def in_chunks(f, *xs):
    """f (batched) over the leading axis of xs, EVAL_CHUNK rows at a time (lax.map, the last
    chunk padded): at paper scale one call on all 1,000 images would hold ~2.4 GB of
    first-layer maps."""
    n = xs[0].shape[0]
    size = min(EVAL_CHUNK, n)
    m = -(-n // size)
    split = lambda a: jnp.pad(a, [(0, m * size - n)] + [(0, 0)] * (a.ndim - 1)).reshape(
        m, size, *a.shape[1:])
    out = jax.lax.map(lambda c: f(*c), tuple(split(a) for a in xs))
    return jax.tree.map(lambda o: o.reshape(m * size, *o.shape[2:])[:n], out)


def fresh_keys(state: State, cfg: Config):
    """eval_fresh fresh transformations (full family, keys unused in training) of every seed:
    (keys (N eval_fresh,), seeds (N eval_fresh,))."""
    cls = jnp.tile(jnp.arange(cfg.num_classes), cfg.eval_fresh)
    keys = jax.random.split(jax.random.fold_in(state.data_key, 2 ** 31 - 1), cls.shape[0])
    return keys, cls


def evaluate(state: State, cfg: Config):
    """Probe accuracies on the 797 held-out digits from the quadrant-pooled features of all
    layers: linear and k-NN with all training labels ("linear", "knn") and probe_per_class
    per class ("linear_few", "knn_few"); and the surrogate accuracy on eval_fresh fresh
    transformations of every seed ("surrogate_acc_fresh"; NaN for a supervised run)."""
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in images(cfg)))
    stats = tuple(jnp.asarray(a) for a in pixel_pca_cached(cfg))
    f = lambda x: in_chunks(lambda c: features(state.params, c, cfg, stats[0]), x)
    out = probe.probe(jax.random.PRNGKey(0), f(tr_x), tr_y, f(te_x), te_y, 10,
                      cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)

    def correct(keys, cls):
        x = make_batch(keys, cls, state.seed_img, state.seed_box, tr_x, stats, cfg,
                       TRANSFORMS)
        logits = network(cfg).apply({"params": state.params}, x - stats[0])
        return jnp.argmax(logits, -1) == cls

    acc = in_chunks(correct, *fresh_keys(state, cfg)).mean()
    out["surrogate_acc_fresh"] = jnp.full((), jnp.nan) if cfg.supervised else acc
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: three seed patches, each with 11 of its transformed samples, and the learned
    first-layer filters."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)
    train_x = jnp.asarray(images(cfg)[0])
    stats = tuple(jnp.asarray(a) for a in pixel_pca_cached(cfg))
    cls = jnp.repeat(jnp.arange(3), 12)
    keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(state.data_key, i),
                                                     j))(cls, jnp.tile(jnp.arange(12), 3))
    batch = jax.jit(make_batch, static_argnums=(6, 7))(keys, cls, state.seed_img,
                                                       state.seed_box, train_x, stats, cfg,
                                                       TRANSFORMS)
    seeds = jax.vmap(lambda i: transform(train_x[state.seed_img[i]], state.seed_box[i],
                                         identity_transform(train_x.shape[-1]), stats,
                                         cfg.patch_size))(jnp.arange(3))
    batch = np.asarray(batch.at[::12].set(seeds))[..., 0]
    k = np.asarray(state.params["Conv_0"]["kernel"])[:, :, 0]  # (5, 5, F)
    nf = min(k.shape[-1], 32)
    fig = plt.figure(figsize=(12, 3.6))
    left, right = fig.add_gridspec(1, 2, width_ratios=[12, 7], wspace=0.08)
    g1, g2 = left.subgridspec(3, 12), right.subgridspec((nf + 7) // 8, 8)
    for j in range(36):
        ax = fig.add_subplot(g1[j // 12, j % 12])
        ax.imshow(batch[j], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        if j % 12 == 0:
            ax.set_ylabel("seed", fontsize=7, color="b")
    for j in range(nf):
        ax = fig.add_subplot(g2[j // 8, j % 8])
        ax.imshow(k[..., j], cmap="gray")
        ax.set_xticks([]), ax.set_yticks([])
    f = {kk: float(np.asarray(v)[0]) for kk, v in res.final.items()}
    fig.subplots_adjust(left=0.02, right=0.99, bottom=0.03, top=0.8)
    fig.suptitle(f"Exemplar-CNN (N={cfg.num_classes}, K={cfg.samples_per_class}): seeds and "
                 f"transformed samples (left), first-layer filters (right)\nfresh-transform "
                 f"surrogate acc {f['surrogate_acc_fresh']:.3f} (chance "
                 f"{1 / cfg.num_classes:.4f}); probes: linear {f['linear']:.3f}, k-NN "
                 f"{f['knn']:.3f}, 10/class linear {f['linear_few']:.3f}, k-NN "
                 f"{f['knn_few']:.3f}", fontsize=9)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's samples and filters."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["linear", "linear_few", "knn", "knn_few",
                                               "surrogate_acc_fresh", "losses/surrogate",
                                               "charts/surrogate_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
