"""Colorful Image Colorization: predict a distribution over quantised ab colours from L.

[1] R. Zhang, P. Isola, A. A. Efros. "Colorful Image Colorization." ECCV 2016,
    arXiv:1603.08511. Released code: richzhang/colorization (Caffe):
    models/colorization_train_val_v2.prototxt, train/solver.prototxt,
    resources/caffe_traininglayers.py (NNEncode, PriorFactor, pts_in_hull.npy, prior_probs.npy).

An image in CIE Lab is split into its lightness X = L (the input) and its colour Y = ab. The
ab plane is quantised into bins of side 10 that hold in-gamut colours (Q of them), and a
fully convolutional net F maps X to a distribution Z^ = F(X) over the Q bins per pixel:

    Z = H_gt^-1(Y): soft-encoding, the 5 nearest bins of Y_hw weighted by a Gaussian
        exp(-||Y_hw - c_q||^2 / (2 sigma^2)), sigma = 5, normalised to sum 1      [1] Sec. 2.1
    L_cl(Z^, Z) = - sum_hw v(Z_hw) sum_q Z_hwq log Z^_hwq                         [1] Eq. 2
    v(Z_hw) = w_q*, q* = argmax_q Z_hwq (the nearest bin)                         [1] Eq. 3
    w ∝ ((1 - lambda) p~ + lambda / Q)^-1,  E_p~[w] = sum_q p~_q w_q = 1          [1] Eq. 4
        p~: the empirical ab distribution of the training pixels, smoothed by a Gaussian
        of sigma 5 over the bins; lambda = 1/2
    Y^ = H(Z^) = E[f_T(Z^)],  f_T(z) = exp(log z / T) / sum_q exp(log z_q / T)    [1] Eq. 5
        the annealed mean, T = 0.38 (T = 1: the mean, T -> 0: the mode)
    baseline: L_2(Y^, Y) = 1/2 sum_hw ||Y_hw - Y^_hw||^2                          [1] Eq. 1

Regression (Eq. 1) averages the modes of a multimodal colour distribution and gives grey,
desaturated colours; the classification loss with rebalancing keeps them vivid ([1] Sec. 1).
`--loss classification|classification_norebal|regression` picks [1]'s "Ours (full)", "Ours
(class)" (lambda = 1) or "Ours (L2)". Evaluation on held-out crops: [1] Table 1's AuC of
the per-pixel ab error (fraction of pixels within a threshold t of the truth, t = 0..150,
area normalised to 100) raw and class-rebalanced (pixels weighted inversely to their colour
class's probability, here the held-out pixels' own smoothed bin frequencies: every colour
present counts about equally; `rebal_ess` is the effective sample size of these weights
over the pixel count), the colourfulness as the mean chroma ||ab|| of the predictions
beside that of the truth, and the held-out cross-entropy `ce` of the Q logits against the
soft-encoded targets. Predictions at H/4 are upsampled bilinearly with pixel 4j = logit j,
where the training targets ab[::4, ::4] put them (as the released demo's corner-aligned
zoom). As a representation ([1] Sec. 3.2):
linear and k-NN probes (common/probe) of the pooled features of block `probe_block` on
scikit-learn's digits (their L channel), against the same network at its random init.

The network is [1]'s (Table 4; released prototxt): 8 blocks of 3x3 convs + ReLU with
widths 64, 128, 256, 512, 512, 512, 512, 256, of 2, 2, 3, 3, 3, 3, 3, 3 layers; blocks 1-3
end with stride 2, blocks 5-6 are dilated by 2, blocks 1-7 end with a batch norm without
scale and shift (Caffe's BatchNorm), block 8 starts with a 4x4 stride-2 deconvolution, and
a 1x1 conv gives Q logits at 1/4 of the input resolution (the ab targets are the input's
every 4th pixel, as the released stride-4 sampling). The L input is L - 50.

Reproduce (CPU demo: 32x32 crops of scikit-learn's two photos at 128 px, left halves for
training, right halves held out):
    python selfsup/colorization.py --preset quick --plot selfsup/colorization.png
Measured (1 seed, 600 steps, 36 min on a heavily loaded 2-core CPU, 64 held-out crops):
classification: AuC 89.94, rebalanced 76.58 (grey: 89.65, 74.82), held-out CE 3.761 (log Q
= 5.56 at uniform logits), chroma 5.90 (truth 15.10); the same run with --loss regression:
AuC 90.08, rebalanced 75.45, chroma 1.60. The rebalancing weights' effective sample size
is 2.2% of the 65,536 pixels. One seed: regression 0.14 higher in raw AuC, classification
1.1 higher rebalanced and much more colourful, [1]'s direction, but the AuC gaps are within
what one seed can tell. Probes of conv5 on the digits' L: linear 0.931 (all labels) / 0.837
(10 per class), k-NN 0.856 / 0.642; the same net at random init 0.911 / 0.819, 0.902 /
0.714 (the linear probes gain, k-NN loses).
The picture is that run's (--plot: the classification run, then its regression twin).
Paper setting (GPU, ImageNet-size crops of the same photos unless a loader is added):
    python selfsup/colorization.py --preset paper
[1] Table 1 (10k ImageNet validation images; AuC raw / rebalanced): Ours (full) 89.5 / 67.3,
Ours (class) 91.4 / 66.4, Ours (L2) 91.2 / 64.4, Gray 89.1 / 58.0 (full and gray checked
against a third-party summary of the table; the others as recalled, not re-checked [M]:
another recollection gives Ours (class) 91.6 / 65.1). The released code confirms lambda =
1/2 (PriorBoostLayer's gamma) and sigma = 5 (NNEncLayer); T = 0.38, the paper's 5
neighbours and its 200k / 375k / 450k schedule are [M] (not re-checked in its text).

Differences from the paper:
- Data: ImageNet does not ship offline; training crops (with flips) come from the left
  parts of scikit-learn's two photos, held-out crops from their right parts (so train and
  test share the photos' colour statistics; the AuC is not across images). The prior p~ is
  measured on our training pixels, not on ImageNet.
- Bins: Q is computed procedurally (the grid-10 ab bins that an sRGB colour rounds to, 64
  levels per channel): 261 bins, a strict subset of the released pts_in_hull.npy's 313.
  The 52 missing ones form a one-bin ring outside (e.g. (-90, 50), (100, 0), (-50..0,
  100)). The released table follows from no simple sRGB rule (checked by the reviewer:
  bin centres in gamut at some L give 229, the convex hull 233, centres within 10 of an
  sRGB colour 290, bins within < 10 per coordinate of one 309; 4 of its bins lie over 10
  from every sRGB colour), so it could only be copied, not rebuilt, and it is not shipped
  offline. Effect: colours in that ring are soft-encoded onto the inner one, so the
  annealed mean cannot reach the most saturated chroma, and Eq. 4's lambda / Q uses 261.
  The 64-level lattice matters: 128 levels give 262 bins (the sliver bin (20, -80)).
- Soft-encoding uses the paper's 5 neighbours; the released NNEncLayer uses 10 (both with
  sigma 5). The uniform part of Eq. 4 is over all Q bins (the released PriorFactor: over the
  bins with a non-zero prior).
- The released code zeroes the loss of crops whose |a|, |b| never exceed 5 (grey images);
  `nongray_threshold` keeps it (0 turns it off).
- Initialisation: flax's defaults (the paper uses k-means init [Krähenbühl et al.]).
- Every network has both heads (Q logits and a 2-channel ab regression); the loss trains
  one, so one compiled program serves all three variants (the variant is a traced flag).
- The regression head outputs ab directly; the loss is Eq. 1 averaged over pixels, and
  Eq. 2 is likewise averaged over B x h x w (not summed). Under Adam the scale only
  matters against the L2 decay added to the gradient (a factor h x w = 1936 at the paper
  preset); which normaliser Zhang's Caffe fork's SoftmaxCrossEntropyLoss used (per pixel,
  per image) is unverified, so the weight decay's effective strength may differ.
- Evaluation: [1]'s rebalanced AuC weights pixels by the ImageNet prior; ours by the
  held-out pixels' own smoothed bin frequencies (the training prior of two photos leaves
  most bins near zero: at the paper preset 0.1% of the pixels carried 79% of its weight).
- Optimiser: Adam (0.9, 0.99), L2 weight decay 1e-3 added to the gradient, lr 3e-5 dropped
  to 1e-5 and 3e-6 at 200k and 375k of 450k steps ([1] footnote; the released solver
  steps x0.1 at 225k of 500k), batch 40 crops of 176 px from 256-px images (released
  prototxt); the `quick` preset uses lr 1e-3 and a narrow one-conv-per-block net.
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

from common import data, probe, run

# --- CONFIG ---

LOSSES = ("classification", "classification_norebal", "regression")


@dataclass(frozen=True)
class Config:
    """Colorization; defaults are [1]'s (paper and released Caffe code)."""

    loss: str = "classification"
    """classification (Eq. 2 with rebalancing), classification_norebal (lambda = 1) or
    regression (Eq. 1, the L2 baseline)"""
    crop_size: int = 176
    """side of the square training crops (released prototxt: 176)"""
    photo_size: int = 256
    """short side (px) the photos are resized to before cropping (ImageNet at 256)"""
    test_fraction: float = 0.5
    """right-hand fraction of every photo held out for evaluation"""
    batch_size: int = 40
    """crops per Adam step (released prototxt: 40)"""
    num_steps: int = 450_000
    """Adam steps ([1]: about 450k)"""
    lr: float = 3e-5
    """initial Adam learning rate"""
    lr_decay_steps: tuple[int, ...] = (200_000, 375_000)
    """steps at which the learning rate is multiplied by the next of lr_decay_factors"""
    lr_decay_factors: tuple[float, ...] = (1 / 3, 0.3)
    """learning-rate factors at lr_decay_steps (3e-5 -> 1e-5 -> 3e-6)"""
    adam_b1: float = 0.9
    """Adam beta1"""
    adam_b2: float = 0.99
    """Adam beta2"""
    weight_decay: float = 1e-3
    """L2 weight decay added to the gradient (Caffe's weight_decay)"""
    grid: float = 10.0
    """side of the ab bins"""
    gamut_levels: int = 64
    """sRGB levels per channel sampled to find the in-gamut ab bins"""
    num_neighbours: int = 5
    """bins of the soft-encoding (paper 5; released code 10)"""
    sigma: float = 5.0
    """Gaussian width of the soft-encoding weights (ab units)"""
    prior_sigma: float = 5.0
    """Gaussian width smoothing the empirical ab distribution (ab units)"""
    rebalance_lambda: float = 0.5
    """weight of the uniform distribution in the rebalancing mixture (Eq. 4)"""
    temperature: float = 0.38
    """annealed-mean temperature T (Eq. 5)"""
    nongray_threshold: float = 5.0
    """crops with no |a| or |b| above this get zero loss (released code; 0: off)"""
    channels: tuple[int, ...] = (64, 128, 256, 512, 512, 512, 512, 256)
    """widths of blocks conv1..conv8"""
    layers: tuple[int, ...] = (2, 2, 3, 3, 3, 3, 3, 3)
    """3x3 convs of blocks conv1..conv8 (conv8's first is the 4x4 deconvolution)"""
    num_eval_crops: int = 64
    """held-out crops of the evaluation (fixed positions)"""
    probe_block: int = 5
    """block (1-based, of conv1..conv7) whose pooled features the probes read"""
    probe_size: int = 32
    """side of the digits of the probe"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    knn_temperature: float = 0.07
    """temperature of the k-NN probe's exp(similarity / T) votes"""
    probe_l2: float = 1e-3
    """L2 penalty of the linear probe"""
    dtype: str = "float32"
    """compute dtype of the convs ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # crops per update

    def validate(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {LOSSES}")
        if len(self.channels) != 8 or len(self.layers) != 8 or min(self.layers) < 1:
            raise ValueError(f"channels={self.channels} and layers={self.layers} need 8 "
                             "entries each, layers >= 1")
        if min(self.channels) < 1:
            raise ValueError(f"channels={self.channels} must all be >= 1")
        if self.crop_size % 8:
            raise ValueError(f"crop_size={self.crop_size} must be a multiple of 8")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction} must be in (0, 1)")
        h, w = self.photo_size, round(self.photo_size * PHOTO_ASPECT)
        w_test = round(w * self.test_fraction)
        if min(h, w - w_test, w_test) < self.crop_size:
            raise ValueError(f"crop_size={self.crop_size} exceeds the train or test region "
                             f"({h} x {w - w_test} / {h} x {w_test} px at photo_size="
                             f"{self.photo_size}, test_fraction={self.test_fraction})")
        if not 0 <= self.rebalance_lambda <= 1:
            raise ValueError(f"rebalance_lambda={self.rebalance_lambda} must be in [0, 1]")
        for name in ("grid", "sigma", "prior_sigma", "temperature", "knn_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("nongray_threshold", "probe_l2"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.gamut_levels < 2:
            raise ValueError(f"gamut_levels={self.gamut_levels} must be >= 2")
        q = len(ab_bins(self.grid, self.gamut_levels))
        if not 1 <= self.num_neighbours <= q:
            raise ValueError(f"num_neighbours={self.num_neighbours} must be in [1, Q = {q}]")
        steps = list(self.lr_decay_steps)
        if any(s < 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"lr_decay_steps={self.lr_decay_steps} must be >= 1 and "
                             "strictly increasing")
        if len(self.lr_decay_steps) != len(self.lr_decay_factors):
            raise ValueError(f"lr_decay_steps={self.lr_decay_steps} and lr_decay_factors="
                             f"{self.lr_decay_factors} must have the same length")
        if any(f <= 0 for f in self.lr_decay_factors):
            raise ValueError(f"lr_decay_factors={self.lr_decay_factors} must be > 0")
        if not 1 <= self.probe_block <= 7:
            raise ValueError(f"probe_block={self.probe_block} must be in [1, 7]")
        if not 1 <= self.probe_per_class <= 80 or self.knn_k < 1:
            raise ValueError(f"probe_per_class={self.probe_per_class} must be in [1, 80] "
                             f"and knn_k={self.knn_k} >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 crops of the photos at 128 px, a narrow net with one conv per block,
    # Adam at 1e-3 for 600 steps (x0.3 after 450).
    "quick": dict(crop_size=32, photo_size=128, batch_size=32, num_steps=600, lr=1e-3,
                  lr_decay_steps=(450,), lr_decay_factors=(0.3,),
                  channels=(16, 32, 64, 64, 64, 64, 64, 32), layers=(1,) * 8),
    "paper": dict(),
}


# --- COLOUR ---

# sRGB (D65) -> CIE XYZ, and the D65 white point (the constants of skimage.color)
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
WHITE = np.array([0.95047, 1.0, 1.08883])
PHOTO_ASPECT = 640 / 427  # width / height of scikit-learn's two photos
AB_STRIDE = 4  # the net's output resolution: 3 stride-2 blocks, then one x2 deconvolution


def rgb_to_lab(rgb, xp=jnp):
    """sRGB in [0, 1] (..., 3) -> CIE Lab (..., 3), D65: L in [0, 100], a, b about +-110.
    `xp` is jnp (traced) or np (the gamut and prior tables)."""
    lin = xp.where(rgb <= 0.04045, rgb / 12.92,
                   ((xp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4)
    xyz = lin @ xp.asarray(RGB_TO_XYZ.T, lin.dtype) / xp.asarray(WHITE, lin.dtype)
    f = xp.where(xyz > 0.008856, xp.cbrt(xp.maximum(xyz, 0.008856)), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return xp.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)


def lab_to_rgb(lab, xp=jnp):
    """CIE Lab (..., 3) -> sRGB in [0, 1] (clipped where out of gamut)."""
    fy = (lab[..., 0] + 16) / 116
    f = xp.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = xp.where(f ** 3 > 0.008856, f ** 3, (f - 16 / 116) / 7.787) * xp.asarray(WHITE)
    lin = xp.maximum(xyz @ xp.asarray(np.linalg.inv(RGB_TO_XYZ).T, xyz.dtype), 0.0)
    rgb = xp.where(lin <= 0.0031308, 12.92 * lin,
                   1.055 * xp.maximum(lin, 0.0031308) ** (1 / 2.4) - 0.055)
    return xp.clip(rgb, 0.0, 1.0)


@functools.cache
def ab_bins(grid: float = 10.0, levels: int = 64) -> np.ndarray:
    """(Q, 2) centres of the ab bins (multiples of `grid`) that some sRGB colour falls in,
    found by converting levels^3 colours on a regular RGB lattice (the gamut of [1] Fig. 3a)."""
    v = np.linspace(0.0, 1.0, levels)
    rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    q = np.round(rgb_to_lab(rgb, np)[:, 1:] / grid)
    return (np.unique(q, axis=0) * grid).astype(np.float32)


@functools.cache
def photos(size: int):
    """scikit-learn's two photos (china, flower; 427 x 640) resized to short side `size`,
    float32 RGB in [0, 1], (2, size, W, 3). Read from the wheel's JPEGs directly (as
    common.data.sample_photos, which enlarges only, and without importing scikit-learn)."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    root = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    out = []
    for name in ("china.jpg", "flower.jpg"):
        im = Image.open(root / "datasets" / "images" / name).convert("RGB")
        out.append(np.asarray(im.resize((round(size * PHOTO_ASPECT), size), Image.BILINEAR)))
    return np.stack(out).astype(np.float32) / 255.0


def regions(cfg: Config):
    """(train (2, H, W_train, 3), test (2, H, W_test, 3)) numpy: each photo's left part
    for training, its right `test_fraction` held out."""
    p = photos(cfg.photo_size)
    cut = p.shape[2] - round(p.shape[2] * cfg.test_fraction)
    return p[:, :, :cut], p[:, :, cut:]


@functools.cache
def _empirical_prior(photo_size: int, test_fraction: float, grid: float, levels: int):
    bins = ab_bins(grid, levels)
    cfg = Config(photo_size=photo_size, test_fraction=test_fraction)
    ab = rgb_to_lab(regions(cfg)[0].reshape(-1, 3).astype(np.float64), np)[:, 1:]
    nearest = np.concatenate([np.argmin(((c[:, None] - bins[None]) ** 2).sum(-1), 1)
                              for c in np.array_split(ab, 64)])
    return (np.bincount(nearest, minlength=len(bins)) / len(nearest)).astype(np.float32)


def empirical_prior(cfg: Config) -> np.ndarray:
    """(Q,) the distribution of the training pixels over the ab bins (nearest bin)."""
    return _empirical_prior(cfg.photo_size, cfg.test_fraction, cfg.grid, cfg.gamut_levels)


# --- LOSS ---


def soft_encode(ab, bins, k: int, sigma: float):
    """Z = H_gt^-1(Y) ([1] Sec. 2.1): ab (..., 2) -> (..., Q), the k nearest bins weighted
    by exp(-d^2 / (2 sigma^2)), normalised to sum 1."""
    d2 = ((ab[..., None, :] - bins) ** 2).sum(-1)  # (..., Q)
    neg, idx = jax.lax.top_k(-d2, k)  # (..., k)
    w = jax.nn.softmax(neg / (2 * sigma**2), -1)  # Gaussian weights, normalised
    return (w[..., None] * jax.nn.one_hot(idx, bins.shape[0])).sum(-2)


def smooth_prior(p, bins, sigma: float):
    """p~: the distribution p (Q,) convolved with a Gaussian of width sigma over the bin
    centres, renormalised ([1] Sec. 2.2)."""
    d2 = ((bins[:, None] - bins[None]) ** 2).sum(-1)
    p = jnp.exp(-d2 / (2 * sigma**2)) @ p
    return p / p.sum()


def rebalance_weights(p_smooth, lam):
    """[1] Eq. 4: w ∝ ((1 - lambda) p~ + lambda / Q)^-1, scaled so that sum_q p~_q w_q = 1.
    At lambda = 0 a bin of (numerically) zero probability gets weight 0, not infinity."""
    mix = (1 - lam) * p_smooth + lam / p_smooth.shape[0]
    w = jnp.where(mix > 1e-10, 1.0 / jnp.maximum(mix, 1e-10), 0.0)
    return w / jnp.sum(p_smooth * w)


def classification_loss(logits, z, v):
    """[1] Eq. 2, averaged over pixels: -mean_hw v_hw sum_q Z_hwq log Z^_hwq."""
    return -jnp.mean(v * jnp.sum(z * jax.nn.log_softmax(logits), -1))


def annealed_mean(logits, bins, temperature):
    """[1] Eq. 5: H(Z) = E[f_T(Z)], f_T(z) = softmax(log z / T) over the Q bins."""
    return jax.nn.softmax(jax.nn.log_softmax(logits) / temperature) @ bins


# --- NETWORKS ---


class ColorNet(nn.Module):
    """[1] Table 4: L (B, H, W, 1) -> (Q logits, ab regression) at H/4, and block maps."""

    channels: tuple[int, ...]
    layers: tuple[int, ...]
    num_bins: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lum, train: bool):
        x = (lum - 50.0).astype(self.dtype)  # the released L - 50
        feats = []
        for b in range(7):
            stride, dil = (2 if b < 3 else 1), (2 if b in (4, 5) else 1)
            for i in range(self.layers[b]):
                s = stride if i == self.layers[b] - 1 else 1
                x = nn.relu(nn.Conv(self.channels[b], (3, 3), (s, s), padding=dil,
                                    kernel_dilation=dil, dtype=self.dtype)(x))
            x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                             momentum=0.999, dtype=self.dtype)(x)  # Caffe BatchNorm
            feats.append(x)  # (B, H_b, W_b, C_b)
        x = nn.relu(nn.ConvTranspose(self.channels[7], (4, 4), (2, 2), padding="SAME",
                                     dtype=self.dtype)(x))  # conv8_1: H/8 -> H/4
        for _ in range(self.layers[7] - 1):
            x = nn.relu(nn.Conv(self.channels[7], (3, 3), padding=1, dtype=self.dtype)(x))
        logits = nn.Conv(self.num_bins, (1, 1), dtype=self.dtype)(x)  # conv8_313
        ab = nn.Conv(2, (1, 1), dtype=self.dtype)(x)  # the L2 baseline's head
        return logits.astype(jnp.float32), ab.astype(jnp.float32), feats


def network(cfg: Config) -> ColorNet:
    return ColorNet(cfg.channels, cfg.layers, len(ab_bins(cfg.grid, cfg.gamut_levels)),
                    jnp.dtype(cfg.dtype))


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    init_key: jax.Array  # the network's init key: evaluate() rebuilds the random-init twin
    mode: jax.Array  # index of cfg.loss in LOSSES (traced: one program for all variants)


def make_optimizer(cfg: Config):
    sched = optax.piecewise_constant_schedule(
        cfg.lr, dict(zip(cfg.lr_decay_steps, cfg.lr_decay_factors, strict=True)))
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.adam(sched, cfg.adam_b1, cfg.adam_b2)), sched


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    variables = network(cfg).init(k_net, jnp.zeros((1, cfg.crop_size, cfg.crop_size, 1)),
                                  train=False)
    tx, _ = make_optimizer(cfg)
    return State(variables["params"], variables["batch_stats"], tx.init(variables["params"]),
                 jnp.zeros((), jnp.int32), key, k_net,
                 jnp.asarray(LOSSES.index(cfg.loss), jnp.int32))


# --- UPDATE ---


def sample_crops(key, images, size: int, flip: bool = True):
    """Random size x size crops of images (N, H, W, 3), one per key row; mirrored with
    probability 1/2 when `flip` (the released `mirror: true`)."""

    def one(k):
        u = jax.random.uniform(k, (4,))
        n, h, w = images.shape[:3]
        i = jnp.minimum((u[0] * n).astype(jnp.int32), n - 1)
        y = jnp.minimum((u[1] * (h - size + 1)).astype(jnp.int32), h - size)
        x = jnp.minimum((u[2] * (w - size + 1)).astype(jnp.int32), w - size)
        crop = jax.lax.dynamic_slice(images[i], (y, x, 0), (size, size, 3))
        return jnp.where(flip & (u[3] < 0.5), crop[:, ::-1], crop)

    return jax.vmap(one)(key)


def colour_targets(rgb, cfg: Config):
    """L (B, H, W, 1) and the ab targets (B, H/4, W/4, 2) of RGB crops."""
    lab = rgb_to_lab(rgb)
    return lab[..., :1], lab[:, ::AB_STRIDE, ::AB_STRIDE, 1:]


def losses(logits, ab_pred, ab, mode, cfg: Config):
    """The training loss of variant `mode` (traced): Eq. 2 with the rebalancing weights
    (mode 0), with v = 1 (mode 1: lambda = 1), or Eq. 1 (mode 2); also each term."""
    bins = jnp.asarray(ab_bins(cfg.grid, cfg.gamut_levels))
    p_smooth = smooth_prior(jnp.asarray(empirical_prior(cfg)), bins, cfg.prior_sigma)
    w = jnp.where(mode == 0, rebalance_weights(p_smooth, cfg.rebalance_lambda), 1.0)
    z = soft_encode(ab, bins, cfg.num_neighbours, cfg.sigma)  # (B, h, w, Q)
    nongray = (jnp.abs(ab) > cfg.nongray_threshold).any((1, 2, 3), keepdims=True)[..., 0]
    v = w[jnp.argmax(z, -1)] * jnp.where(cfg.nongray_threshold > 0, nongray, 1.0)  # Eq. 3
    ce = classification_loss(logits, z, v)
    l2 = 0.5 * jnp.mean(jnp.sum((ab_pred - ab) ** 2, -1))  # Eq. 1
    return jnp.where(mode == 2, l2, ce), ce, l2


def update(state: State, cfg: Config):
    net, (tx, sched) = network(cfg), make_optimizer(cfg)
    train_rgb = jnp.asarray(regions(cfg)[0])
    key, k_crop = jax.random.split(state.key)
    lum, ab = colour_targets(
        sample_crops(jax.random.split(k_crop, cfg.batch_size), train_rgb, cfg.crop_size), cfg)

    def loss_fn(params):
        (logits, ab_pred, _), new = net.apply(
            {"params": params, "batch_stats": state.batch_stats}, lum, train=True,
            mutable=["batch_stats"])
        loss, ce, l2 = losses(logits, ab_pred, ab, state.mode, cfg)
        return loss, (ce, l2, new["batch_stats"])

    (loss, (ce, l2, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/loss": loss, "losses/classification": ce, "losses/regression": l2,
               "charts/lr": sched(state.step), "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                         step=state.step + 1, key=key), metrics


# --- EVALUATE ---


def eval_crops(cfg: Config):
    """The fixed held-out crops (num_eval_crops, crop, crop, 3) from the test regions."""
    keys = jax.random.split(jax.random.PRNGKey(0), cfg.num_eval_crops)
    return sample_crops(keys, jnp.asarray(regions(cfg)[1]), cfg.crop_size, flip=False)


def upsample(ab, size: int):
    """(B, h, w, C) at stride AB_STRIDE -> (B, size, size, C), bilinear and aligned with the
    training targets ab[::4, ::4]: output pixel 4j gets input j exactly (jax.image.resize's
    half-pixel centres would put it at 4j + 1.5); past the last sample the edge is held."""
    s = float(AB_STRIDE)  # edge-pad: jax drops samples past the last input's half-pixel
    ab = jnp.pad(ab, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
    return jax.image.scale_and_translate(ab, (ab.shape[0], size, size, ab.shape[3]), (1, 2),
                                         jnp.array([s, s]), jnp.full(2, (1 - s) / 2),
                                         "linear")


def predict(state: State, lum, cfg: Config):
    """Y^ at full resolution (B, H, W, 2), the annealed mean (classification) or the
    regression head (mode 2), upsampled from H/4; and the Q logits at H/4."""
    logits, ab_reg, _ = network(cfg).apply(
        {"params": state.params, "batch_stats": state.batch_stats}, lum, train=False)
    bins = jnp.asarray(ab_bins(cfg.grid, cfg.gamut_levels))
    ab = jnp.where(state.mode == 2, ab_reg, annealed_mean(logits, bins, cfg.temperature))
    return upsample(ab, lum.shape[1]), logits


def nearest_bin(ab, bins):
    """Index (...,) of the nearest bin, via ||x||^2 - 2 x.c + ||c||^2 (no (..., Q, 2))."""
    return jnp.argmin((bins**2).sum(-1) - 2 * ab @ bins.T, -1)


def class_weights(ab, bins, sigma: float):
    """Per-pixel weights (...,) of the class-rebalanced AuC: 1 / p~_eval(nearest bin), with
    p~_eval the frequencies of the pixels' own nearest bins smoothed by `sigma` (as Eq. 4's
    prior at lambda = 0), so every colour present carries about the same total weight."""
    near = nearest_bin(ab, bins)
    freq = jnp.zeros(bins.shape[0]).at[near.reshape(-1)].add(1.0)
    return 1.0 / smooth_prior(freq / freq.sum(), bins, sigma)[near]


def auc(ab_pred, ab_true, weights=None, max_threshold: int = 150):
    """[1] Table 1: the fraction of pixels whose ab error is <= t (weighted by `weights`),
    averaged over t = 0..max_threshold, in percent (100 = every pixel exact). err <= t for
    integer t iff ceil(err) <= t: a histogram of ceil(err) and its cumulative sum."""
    err = jnp.linalg.norm(ab_pred - ab_true, axis=-1).reshape(-1)
    w = jnp.ones_like(err) if weights is None else weights.reshape(-1)
    b = jnp.clip(jnp.ceil(err), 0, max_threshold + 1).astype(jnp.int32)
    within = jnp.cumsum(jnp.zeros(max_threshold + 2).at[b].add(w))[:-1] / w.sum()
    return 100 * within.mean()


def colour_metrics(state: State, cfg: Config):
    """[1] Table 1 on the held-out crops: AuC raw and class-rebalanced, of the prediction
    and of grey (ab = 0); colourfulness: mean chroma ||ab|| of prediction and truth; the
    held-out cross-entropy of the Q logits against the soft-encoded targets (v = 1).
    Rebalanced: each pixel weighted by 1 / p~_eval of its nearest bin, p~_eval the held-out
    pixels' own bin frequencies smoothed as the prior ("inversely by colour class
    probability"), so every colour present counts about equally and no weight is
    unbounded; rebal_ess is the weights' effective sample size over the pixel count."""
    rgb = eval_crops(cfg)
    lum, ab_sub = colour_targets(rgb, cfg)
    ab_true = rgb_to_lab(rgb)[..., 1:]
    ab, logits = predict(state, lum, cfg)
    bins = jnp.asarray(ab_bins(cfg.grid, cfg.gamut_levels))
    pix_w = class_weights(ab_true, bins, cfg.prior_sigma)
    z = soft_encode(ab_sub, bins, cfg.num_neighbours, cfg.sigma)
    grey = jnp.zeros_like(ab)
    return {"auc": auc(ab, ab_true), "auc_rebal": auc(ab, ab_true, pix_w),
            "auc_gray": auc(grey, ab_true), "auc_rebal_gray": auc(grey, ab_true, pix_w),
            "rebal_ess": pix_w.sum() ** 2 / (pix_w**2).sum() / pix_w.size,
            "ce": classification_loss(logits, z, 1.0),
            "chroma": jnp.linalg.norm(ab, axis=-1).mean(),
            "chroma_true": jnp.linalg.norm(ab_true, axis=-1).mean()}


def evaluate(state: State, cfg: Config):
    """colour_metrics, and linear / k-NN probes on the digits' L channel of block
    probe_block's pooled features, trained net and its random-init twin ("init_...")."""
    out = colour_metrics(state, cfg)
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(tuple(
        jnp.asarray(a) for a in data.digit_images(cfg.probe_size)))
    net = network(cfg)
    x0 = jnp.zeros((1, cfg.crop_size, cfg.crop_size, 1))
    for prefix, variables in (("", {"params": state.params,
                                    "batch_stats": state.batch_stats}),
                              ("init_", net.init(state.init_key, x0, train=False))):
        def feats(x, variables=variables):
            lum = rgb_to_lab(jnp.repeat(x, 3, -1))[..., :1]
            maps = net.apply(variables, lum, train=False)[2]
            return maps[cfg.probe_block - 1].mean((1, 2)).astype(jnp.float32)

        out.update(probe.probe(jax.random.PRNGKey(0), feats(tr_x), tr_y, feats(te_x), te_y,
                               10, cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature,
                               cfg.probe_l2, prefix=prefix))
    return out


# --- MAIN ---


def plot(results, cfg: Config, out: str, num: int = 5):
    """Seed 0 of each run in `results` ({loss name: RunResult}): `num` held-out crops as
    the grey input, each run's prediction, and the ground truth."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    @jax.jit
    def colourise(state, rgb):
        lum = rgb_to_lab(rgb)[..., :1]
        return lab_to_rgb(jnp.concatenate([lum, predict(state, lum, cfg)[0]], -1))

    rgb = eval_crops(cfg)[:: max(cfg.num_eval_crops // num, 1)][:num]
    grey = np.asarray(lab_to_rgb(rgb_to_lab(rgb) * jnp.array([1.0, 0.0, 0.0])))
    cols = [("grey input", grey, None)]
    for name, res in results.items():
        state = jax.tree.map(lambda a: a[0], res.state)
        f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
        cols.append((f"{name}\nAuC {f['auc']:.1f} / rebal {f['auc_rebal']:.1f}\n"
                     f"chroma {f['chroma']:.1f}", np.asarray(colourise(state, rgb)), f))
    cols.append((f"ground truth\nchroma {f['chroma_true']:.1f}", np.asarray(rgb), None))
    fig, ax = plt.subplots(num, len(cols), figsize=(1.9 * len(cols), 1.9 * num + 0.8))
    for j, (title, imgs, _) in enumerate(cols):
        ax[0, j].set_title(title, fontsize=7)
        for i in range(num):
            ax[i, j].imshow(imgs[i], interpolation="nearest")
            ax[i, j].axis("off")
    fig.suptitle("held-out crops (right halves of the photos)", fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


def main(argv=None):
    """`--plot PNG` (this file's only extra flag): after the run, the same run with
    --loss regression (in <run-dir>_regression), then both runs' held-out colourisations."""
    flags, argv = run.pop_flags(argv, "--plot")
    keys = ["auc", "auc_rebal", "auc_gray", "auc_rebal_gray", "rebal_ess", "ce", "chroma",
            "chroma_true", "linear", "linear_few", "knn", "knn_few", "init_linear",
            "init_linear_few", "init_knn", "init_knn_few", "losses/loss"]
    go = lambda a: run.main(Config, init, update, presets=PRESETS, evaluate=evaluate,  # noqa: E731
                            argv=a, doc=__doc__, summary_keys=keys)
    res = go(argv)
    if flags["--plot"] is not None:
        import json
        import sys
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
        base, i = list(sys.argv[1:] if argv is None else argv), 0
        while i < len(base):  # the twin's --loss and --run-dir replace the run's own
            if base[i] in ("--loss", "--run-dir"):
                del base[i:i + 2]
            else:
                i += 1
        twin = go(base + ["--loss", "regression", "--run-dir", f"{res.run_dir}_regression"])
        print(plot({cfg.loss: res, "regression (L2)": twin}, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
