"""Context encoder: features from inpainting a dropped image region, with L2 + adversarial loss.

[1] D. Pathak, P. Krahenbuhl, J. Donahue, T. Darrell, A. A. Efros. "Context Encoders:
    Feature Learning by Inpainting." CVPR 2016, arXiv:1604.07379. Released code:
    pathak22/context-encoder (Torch, commit 68abd11): train.lua (central block; the
    README's `overlapPred=4 wtl2=0.999 nBottleneck=4000 niter=500 fineSize=128`) and
    train_random.lua (random regions).

M^ marks the dropped pixels (1 = dropped, [1]'s convention; the post writes 1 - M^). The
generator F (encoder, channel-wise fully connected layer, decoder) sees the image with the
hole filled by the mean colour and predicts it; a discriminator D tells real hole contents
from predicted ones:

    L_rec(x) = || M^ (.) (x - F((1 - M^) (.) x)) ||_2^2                           [1] Eq. 1
    L_adv = max_D E_x[log D(x) + log(1 - D(F((1 - M^) (.) x)))]                    [1] Eq. 3
    L = lambda_rec L_rec + lambda_adv L_adv,  lambda_rec = 0.999, lambda_adv = 0.001  [1] Eq. 4
    overlap: F also predicts a band of `overlap` px of context around the hole, whose L2
        weight is 10x: w = M^ + 10 (dilate(M^, overlap) - M^)               [1] Sec. 4, code
    channel-wise FC: m maps of n x n -> m maps of n x n, one n^2 x n^2 matrix per map (m n^4
        weights, none across maps), then a stride-1 (1x1) conv across channels  [1] Sec. 3.1

F takes the non-saturating adversarial term -log D(F(.)) (the released BCECriterion with
real labels). Masks ([1] Sec. 3.3): `center` (F predicts the central half of the side; the
dropped square is that region shrunk by `overlap` px, as released), `random_block`
(num_blocks squares of block_fraction of the side, possibly overlapping: at most 1/4 of the
image at the defaults), `random_region` (a smooth random field thresholded at its
region_fraction quantile: blobby shapes, as the released pattern). Evaluation: the held-out
hole L2 against each image's visible-pixel mean filled in (and the mean training image),
and linear / k-NN probes (common/probe) of the encoder's pooled output on scikit-learn's
digits, beside the same network at its random init.

Networks (the released DCGAN-style ones: 4x4 convs from N(0, 0.02), no biases, BN gamma
N(1, 0.02), BN on all but the first layers): encoder = stride-2 convs with LeakyReLU 0.2 to
n x n x m, the channel-wise FC, a 1x1 conv, BN + ReLU, stride-2 up-convs (BN + ReLU) to the
predicted region (the central half, or the whole image for random masks), tanh; D = the
encoder's convs down to n x n and one n x n conv to a logit.

Reproduce (CPU demo: scikit-learn's digits at 32x32, the central 16x16 predicted):
    python selfsup/context_encoder.py --preset quick --plot selfsup/context_encoder.png
Measured (1 seed, 600 steps of 32 images, 6.5 min wall / 99 CPU-s on a heavily loaded
2-core CPU, 256 held-out digits): hole L2 0.0227 (on [-1, 1] pixels; each image's visible
mean in the hole: 0.664; the mean training image: 0.355; the same net untrained: 0.368);
held-out D accuracy 0.85. The inpainting works, the features do not beat the random net:
linear probe 0.924 (all labels) / 0.801 (10 per class), k-NN 0.801 / 0.563; at random init
0.936 / 0.812, 0.847 / 0.592 (one seed).
Paper setting (GPU; 128-px crops of scikit-learn's two photos, central 64 px):
    python selfsup/context_encoder.py --preset paper
`paper` is [1]'s Table 1 setting (Paris StreetView, central 64 of 128 px, L2 + adv): mean
L2 1.96%, PSNR 18.58 dB [M]. [1] Table 2 (classification 56.5% mAP, detection 44.5% mAP,
segmentation 29.7% mIoU fine-tuned on PASCAL VOC; checked against a public benchmark listing)
is another setting: an AlexNet encoder trained with random regions and L2 alone (the
released README, L94-96), here at most `--mask random_region --lambda-adv 0` (no preset).

Differences from the paper:
- Data: ImageNet / Paris StreetView do not ship offline. `photos`: random crops of the left
  three quarters of scikit-learn's two photos (427 x 640, not resized to 350 as released),
  the right quarter held out; `digits`: scikit-learn's digits upsampled (1,000 train / 797
  held out). Pixels in [-1, 1]; the hole is filled with the training pixels' mean colour
  (released: ImageNet's).
- Architecture: [1]'s feature-learning encoder is AlexNet (pool5) with the channel-wise FC;
  the released inpainting code is DCGAN-style with a 4x4 conv to a 4000-d bottleneck and no
  channel-wise FC. Ours: the released convs with [1]'s channel-wise FC + 1x1 conv in place
  of the 4000-d bottleneck, and L2 + adversarial for every mask ([1] learns features with
  L2 alone, released README L96: --lambda-adv 0). After the 1x1 conv: BN + ReLU (released
  train.lua L126: BN + LeakyReLU 0.2 after the bottleneck).
- Overlap 4 px (released command; [1]'s text says 7 px [M]). With random masks our L2
  weights the hole 1, its `overlap`-px ring 10x and the rest of the image 0, and D sees F's
  whole raw output. Released train_random.lua with its README command (useOverlapPred=0,
  L416-421) weights a uniform L2 over the whole image; the hole-1 / outside-10x weighting
  (L425-428) is its useOverlapPred=1 path. L_rec is a mean over the region's pixels and
  channels (released MSECriterion), not a sum.
- Random blocks: count and size are ours ([1]: "a number of smaller possibly overlapping
  masks, covering up to 1/4 of the image"). Random regions: [1] pastes deformed PASCAL VOC
  segmentation shapes; we threshold a smooth field per image at exactly region_fraction
  (released: one pattern per batch, 20-30% area by rejection).
- Optimiser: Adam (beta1 0.5), lr 2e-4 for D and 10x for F (released, when 0 < wtl2 < 1);
  D and F step simultaneously from the same parameters (released: D first, then F through
  D's pre-update activations); batch 64; num_steps ~500 epochs of ~15k images [M].
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

MASKS = ("center", "random_block", "random_region")
DATASETS = ("photos", "digits")


@dataclass(frozen=True)
class Config:
    """Context encoder; defaults are [1]'s released inpainting command (train.lua)."""

    data: str = "photos"
    """photos (crops of scikit-learn's two photos, RGB) or digits (upsampled, grey)"""
    image_size: int = 128
    """side of the square training images (released fineSize)"""
    test_fraction: float = 0.25
    """photos: right-hand fraction of each photo held out for evaluation"""
    mask: str = "center"
    """center, random_block or random_region ([1] Sec. 3.3)"""
    overlap: int = 4
    """px of context around the hole that F also predicts (released overlapPred)"""
    overlap_weight: float = 10.0
    """L2 weight of the overlap band relative to the hole (released: 10)"""
    num_blocks: int = 4
    """random_block: squares dropped per image (they may overlap)"""
    block_fraction: float = 0.25
    """random_block: side of each square as a fraction of the image side"""
    region_fraction: float = 0.25
    """random_region: fraction of the pixels dropped (released density 0.25)"""
    region_cells: int = 8
    """random_region: random-field cells across the image side (released: 0.06 x 128)"""
    lambda_rec: float = 0.999
    """weight of the reconstruction loss (Eq. 4; released wtl2)"""
    lambda_adv: float = 0.001
    """weight of the adversarial loss (Eq. 4; 1 - wtl2)"""
    channels: tuple[int, ...] = (64, 64, 128, 256, 512)
    """widths of the encoder's stride-2 convs; D and the decoder mirror them"""
    batch_size: int = 64
    """images per step (released batchSize)"""
    num_steps: int = 116_000
    """Adam steps (about 500 epochs of ~15k images at batch 64 [M])"""
    lr: float = 2e-4
    """Adam learning rate of D"""
    gen_lr_multiplier: float = 10.0
    """F's learning rate over D's (released: 10 when 0 < lambda_rec < 1)"""
    adam_b1: float = 0.5
    """Adam beta1 (released)"""
    adam_b2: float = 0.999
    """Adam beta2"""
    num_eval_images: int = 256
    """held-out images of the hole-L2 evaluation"""
    probe_size: int = 32
    """side of the digits of the probes"""
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
        return self.batch_size  # images per update

    @property
    def num_channels(self) -> int:
        return 3 if self.data == "photos" else 1

    def validate(self):
        if self.data not in DATASETS:
            raise ValueError(f"data={self.data!r} must be one of {DATASETS}")
        if self.mask not in MASKS:
            raise ValueError(f"mask={self.mask!r} must be one of {MASKS}")
        if min(self.channels, default=0) < 1:
            raise ValueError(f"channels={self.channels} needs >= 1 entry, all >= 1")
        if self.image_size % (2 ** len(self.channels)):
            raise ValueError(f"image_size={self.image_size} must be a multiple of 2^len("
                             f"channels) = {2 ** len(self.channels)}")
        if self.mask == "center" and len(self.channels) < 2:
            raise ValueError("mask='center' needs len(channels) >= 2 (F predicts half the side)")
        if self.overlap < 0 or (self.mask == "center" and 4 * self.overlap >= self.image_size):
            raise ValueError(f"overlap={self.overlap} must be in [0, image_size / 4) = "
                             f"[0, {self.image_size // 4}) (mask='center'; others: >= 0)")
        if min(self.gen_lr_multiplier, self.knn_temperature) <= 0:
            raise ValueError(f"gen_lr_multiplier={self.gen_lr_multiplier} and knn_temperature="
                             f"{self.knn_temperature} must be > 0")
        if self.num_blocks < 1 or not 0 < self.block_fraction <= 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1 and block_fraction="
                             f"{self.block_fraction} in (0, 1]")
        if self.region_cells < 1 or not 0 < self.region_fraction < 1:
            raise ValueError(f"region_cells={self.region_cells} must be >= 1 and "
                             f"region_fraction={self.region_fraction} in (0, 1)")
        if self.probe_size % (2 ** len(self.channels)):
            raise ValueError(f"probe_size={self.probe_size} must be a multiple of "
                             f"{2 ** len(self.channels)}")
        if self.data == "photos":
            w_test = round(640 * self.test_fraction)
            if min(427, 640 - w_test, w_test) < self.image_size:
                raise ValueError(f"image_size={self.image_size} exceeds the train or test "
                                 f"part of the 427 x 640 photos (test_fraction="
                                 f"{self.test_fraction})")
        if self.data == "digits" and self.num_eval_images > 797:
            raise ValueError(f"num_eval_images={self.num_eval_images} exceeds the 797 "
                             "held-out digits")
        if not 1 <= self.probe_per_class <= 80:
            raise ValueError(f"probe_per_class={self.probe_per_class} must be in [1, 80]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: digits at 32x32 (the central 16x16 predicted, 1 px of overlap), a narrow
    # 3-layer encoder to a 4x4 map, 600 steps of 32 images.
    "quick": dict(data="digits", image_size=32, overlap=1, channels=(16, 32, 64),
                  batch_size=32, num_steps=600, probe_size=32),
    "paper": dict(),
}


# --- DATA ---


@functools.cache
def photos() -> np.ndarray:
    """scikit-learn's two photos (china, flower), (2, 427, 640, 3) float32 in [-1, 1], read
    from the wheel's JPEGs (without importing scikit-learn)."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    root = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    ims = [np.asarray(Image.open(root / "datasets" / "images" / n).convert("RGB"))
           for n in ("china.jpg", "flower.jpg")]
    return np.stack(ims).astype(np.float32) / 127.5 - 1.0


def image_sets(cfg: Config):
    """(train, test) numpy images in [-1, 1]: photos as (2, 427, W, 3) regions to crop
    from, digits as (n, S, S, 1) images."""
    if cfg.data == "photos":
        p = photos()
        cut = p.shape[2] - round(p.shape[2] * cfg.test_fraction)
        return p[:, :, :cut], p[:, :, cut:]
    tr, _, te, _ = data.digit_images(cfg.image_size)
    return 2 * tr - 1, 2 * te - 1


def sample_images(key, images, n: int, cfg: Config):
    """n images (n, S, S, C): random crops (photos) or random images (digits)."""
    if cfg.data == "digits":
        return images[jax.random.randint(key, (n,), 0, images.shape[0])]
    s = cfg.image_size

    def crop(k):
        u = jax.random.uniform(k, (3,))
        n, h, w = images.shape[:3]
        i = jnp.minimum((u[0] * n).astype(jnp.int32), n - 1)
        y = jnp.minimum((u[1] * (h - s + 1)).astype(jnp.int32), h - s)
        x = jnp.minimum((u[2] * (w - s + 1)).astype(jnp.int32), w - s)
        return jax.lax.dynamic_slice(images[i], (y, x, 0), (s, s, images.shape[3]))

    return jax.vmap(crop)(jax.random.split(key, n))


@functools.cache
def fill_value(cfg: Config) -> np.ndarray:
    """(C,) the training pixels' mean colour, filled into the hole."""
    return image_sets(cfg)[0].reshape(-1, cfg.num_channels).mean(0)


@functools.cache
def mean_image(cfg: Config) -> np.ndarray:
    """(S, S, C) the mean training image (digits); for photo crops the mean colour."""
    if cfg.data == "digits":
        return image_sets(cfg)[0].mean(0)
    return np.broadcast_to(fill_value(cfg), (cfg.image_size,) * 2 + (cfg.num_channels,))


# --- MASKS ---


def region(cfg: Config) -> tuple[int, int]:
    """(start, side) of the square F predicts: the central half (center) or all."""
    s = cfg.image_size
    return (s // 4, s // 2) if cfg.mask == "center" else (0, s)


def dilate(m, r: int):
    """A (S, S) 0/1 mask grown by r px in every direction (square structuring element)."""
    if r == 0:
        return m
    return jax.lax.reduce_window(m, 0.0, jax.lax.max, (2 * r + 1, 2 * r + 1), (1, 1),
                                 ((r, r), (r, r)))


def make_mask(key, cfg: Config):
    """M^ (S, S) float, 1 = dropped ([1] Sec. 3.3)."""
    s = cfg.image_size
    yy, xx = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
    if cfg.mask == "center":
        lo, hi = s // 4 + cfg.overlap, s // 4 + s // 2 - cfg.overlap  # the region, shrunk
        return ((yy >= lo) & (yy < hi) & (xx >= lo) & (xx < hi)).astype(jnp.float32)
    if cfg.mask == "random_block":
        b = max(round(cfg.block_fraction * s), 1)
        yx = jax.random.randint(key, (cfg.num_blocks, 2), 0, s - b + 1)
        inside = ((yy >= yx[:, :1, None]) & (yy < yx[:, :1, None] + b)
                  & (xx >= yx[:, 1:, None]) & (xx < yx[:, 1:, None] + b))  # (K, S, S)
        return inside.any(0).astype(jnp.float32)
    # random_region: a smooth field (cubic upsampling of uniform noise), its lowest
    # region_fraction of the pixels dropped
    c = cfg.region_cells
    field = jax.image.resize(jax.random.uniform(key, (c + 1, c + 1)), (s, s), "cubic")
    k = max(round(cfg.region_fraction * s * s), 1)
    thresh = jnp.sort(field.reshape(-1))[k - 1]
    return (field <= thresh).astype(jnp.float32)


def mask_input(x, m, fill):
    """(1 - M^) (.) x with the hole filled by the mean colour: x (B, S, S, C), m (B, S, S)."""
    return x * (1 - m[..., None]) + fill * m[..., None]


def loss_weights(m, cfg: Config):
    """w = M^ + overlap_weight (dilate(M^, overlap) - M^), cut to F's region ([1] Sec. 4)."""
    grown = jax.vmap(lambda a: dilate(a, cfg.overlap))(m)
    w = m + cfg.overlap_weight * (grown - m)
    start, side = region(cfg)
    return w[:, start:start + side, start:start + side]


def crop_region(x, cfg: Config):
    start, side = region(cfg)
    return x[:, start:start + side, start:start + side]


# --- NETWORKS ---

INIT = nn.initializers.normal(0.02)  # the released weights_init: N(0, 0.02)


def bn_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)  # released BN gamma: N(1, 0.02)


class ChannelwiseFC(nn.Module):
    """[1] Sec. 3.1: (B, n, n, m) -> (B, n, n, m), every output of map c a linear function of
    all n^2 inputs of map c alone: m weight matrices of n^2 x n^2 (m n^4 weights)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, m = x.shape
        kernel = self.param("kernel", INIT, (m, h * w, h * w))  # (m, out pos, in pos)
        y = jnp.einsum("bpc,cqp->bqc", x.reshape(b, h * w, m).astype(self.dtype),
                       kernel.astype(self.dtype))  # (B, n^2, m)
        return y.reshape(b, h, w, m)


def conv(ch, stride=2, dtype=jnp.float32):
    return nn.Conv(ch, (4, 4), (stride, stride), padding=1, use_bias=False, kernel_init=INIT,
                   dtype=dtype)


def batch_norm(train, dtype):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        scale_init=bn_init, dtype=dtype)


class Encoder(nn.Module):
    """len(channels) stride-2 4x4 convs, LeakyReLU 0.2, BN after all but the first."""

    channels: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        for i, ch in enumerate(self.channels):
            x = conv(ch, dtype=self.dtype)(x)
            if i > 0:
                x = batch_norm(train, self.dtype)(x)
            x = nn.leaky_relu(x, 0.2)
        return x  # (B, n, n, m)


class Generator(nn.Module):
    """F: encoder, channel-wise FC, 1x1 conv, then up-convs to the region and tanh."""

    channels: tuple[int, ...]
    out_channels: int
    num_up: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        z = Encoder(self.channels, self.dtype, name="encoder")(x, train)
        h = ChannelwiseFC(self.dtype)(z)
        h = nn.Conv(self.channels[-1], (1, 1), use_bias=False, kernel_init=INIT,
                    dtype=self.dtype)(h)  # stride-1 conv across channels
        h = nn.relu(batch_norm(train, self.dtype)(h))
        for i in range(self.num_up):
            last = i == self.num_up - 1
            ch = self.out_channels if last else self.channels[-2 - i]
            h = nn.ConvTranspose(ch, (4, 4), (2, 2), padding="SAME", use_bias=False,
                                 kernel_init=INIT, dtype=self.dtype)(h)
            h = jnp.tanh(h) if last else nn.relu(batch_norm(train, self.dtype)(h))
        return h.astype(jnp.float32), z


class Discriminator(nn.Module):
    """D: stride-2 convs (LeakyReLU 0.2, BN after all but the first) to n x n, one n x n
    conv to a logit (B,)."""

    channels: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.astype(self.dtype)
        for i, ch in enumerate(self.channels):
            x = conv(ch, dtype=self.dtype)(x)
            if i > 0:
                x = batch_norm(train, self.dtype)(x)
            x = nn.leaky_relu(x, 0.2)
        n = x.shape[1]
        x = nn.Conv(1, (n, n), padding="VALID", use_bias=False, kernel_init=INIT,
                    dtype=self.dtype)(x)
        return x.reshape(-1).astype(jnp.float32)


def networks(cfg: Config):
    """(F, D): the decoder and D mirror the encoder's widths over as many octaves as the
    predicted region spans above the n x n map."""
    k = len(cfg.channels) - (1 if cfg.mask == "center" else 0)
    dt = jnp.dtype(cfg.dtype)
    return (Generator(cfg.channels, cfg.num_channels, k, dt),
            Discriminator(cfg.channels[len(cfg.channels) - k:], dt))


# --- LOSS ---


def reconstruction_loss(pred, x_region, w):
    """Eq. 1 with the overlap weights: mean over the region's pixels and channels of
    w (x - F(.))^2 (the released MSECriterion, weighted)."""
    return jnp.mean(w[..., None] * (x_region - pred) ** 2)


def discriminator_loss(logit_real, logit_fake):
    """-(Eq. 3's objective): -log D(x) - log(1 - D(F(.))), batch means."""
    return (optax.sigmoid_binary_cross_entropy(logit_real, 1.0).mean()
            + optax.sigmoid_binary_cross_entropy(logit_fake, 0.0).mean())


def generator_loss(rec, logit_fake, cfg: Config):
    """Eq. 4 for F: lambda_rec L_rec + lambda_adv (-log D(F(.))) (non-saturating)."""
    adv = optax.sigmoid_binary_cross_entropy(logit_fake, 1.0).mean()
    return cfg.lambda_rec * rec + cfg.lambda_adv * adv, adv


# --- STATE ---


@struct.dataclass
class State:
    g_params: Any
    g_stats: Any
    d_params: Any
    d_stats: Any
    g_opt: Any
    d_opt: Any
    step: jax.Array
    key: jax.Array
    init_key: jax.Array  # the networks' init key: evaluate() rebuilds the random-init twin


def optimizers(cfg: Config):
    return (optax.adam(cfg.lr * cfg.gen_lr_multiplier, cfg.adam_b1, cfg.adam_b2),
            optax.adam(cfg.lr, cfg.adam_b1, cfg.adam_b2))


def init_networks(key, cfg: Config):
    g, d = networks(cfg)
    k_g, k_d = jax.random.split(key)
    s, side = cfg.image_size, region(cfg)[1]
    gv = g.init(k_g, jnp.zeros((1, s, s, cfg.num_channels)), train=False)
    dv = d.init(k_d, jnp.zeros((1, side, side, cfg.num_channels)), train=False)
    return gv, dv


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    gv, dv = init_networks(k_net, cfg)
    tg, td = optimizers(cfg)
    return State(gv["params"], gv["batch_stats"], dv["params"], dv.get("batch_stats", {}),
                 tg.init(gv["params"]), td.init(dv["params"]), jnp.zeros((), jnp.int32), key,
                 k_net)


# --- UPDATE ---


def update(state: State, cfg: Config):
    (g, d), (tg, td) = networks(cfg), optimizers(cfg)
    train_x = jnp.asarray(image_sets(cfg)[0])
    key, k_x, k_m = jax.random.split(state.key, 3)
    x = sample_images(k_x, train_x, cfg.batch_size, cfg)
    m = jax.vmap(lambda k: make_mask(k, cfg))(jax.random.split(k_m, cfg.batch_size))
    x_in = mask_input(x, m, jnp.asarray(fill_value(cfg)))
    real, w = crop_region(x, cfg), loss_weights(m, cfg)

    def g_loss(g_params):
        (pred, _), new = g.apply({"params": g_params, "batch_stats": state.g_stats}, x_in,
                                 train=True, mutable=["batch_stats"])
        logit = d.apply({"params": state.d_params, "batch_stats": state.d_stats}, pred,
                        train=True, mutable=["batch_stats"])[0]
        rec = reconstruction_loss(pred, real, w)
        loss, adv = generator_loss(rec, logit, cfg)
        return loss, (rec, adv, pred, new["batch_stats"])

    (lg, (rec, adv, pred, g_stats)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
        state.g_params)
    fake = jax.lax.stop_gradient(pred)

    def d_loss(d_params):
        # real and fake in separate passes (separate batch statistics), as released
        lr_, new = d.apply({"params": d_params, "batch_stats": state.d_stats}, real,
                           train=True, mutable=["batch_stats"])
        lf, new = d.apply({"params": d_params, "batch_stats": new.get("batch_stats", {})},
                          fake, train=True, mutable=["batch_stats"])
        acc = 0.5 * (jnp.mean(lr_ > 0) + jnp.mean(lf < 0))
        return discriminator_loss(lr_, lf), (acc, new.get("batch_stats", {}))

    (ld, (d_acc, d_stats)), d_grads = jax.value_and_grad(d_loss, has_aux=True)(state.d_params)
    ug, g_opt = tg.update(g_grads, state.g_opt, state.g_params)
    ud, d_opt = td.update(d_grads, state.d_opt, state.d_params)
    metrics = {"losses/generator": lg, "losses/reconstruction": rec, "losses/adversarial": adv,
               "losses/discriminator": ld, "charts/d_accuracy": d_acc,
               "charts/grad_norm": optax.tree.norm(g_grads)}
    return state.replace(g_params=optax.apply_updates(state.g_params, ug), g_stats=g_stats,
                         d_params=optax.apply_updates(state.d_params, ud), d_stats=d_stats,
                         g_opt=g_opt, d_opt=d_opt, step=state.step + 1, key=key), metrics


# --- EVALUATE ---


def eval_batch(cfg: Config):
    """Fixed held-out images (N, S, S, C) and their masks (N, S, S)."""
    test = jnp.asarray(image_sets(cfg)[1])
    k_x, k_m = jax.random.split(jax.random.PRNGKey(0))
    if cfg.data == "digits":
        x = test[:cfg.num_eval_images]
    else:
        x = sample_images(k_x, test, cfg.num_eval_images, cfg)
    m = jax.vmap(lambda k: make_mask(k, cfg))(jax.random.split(k_m, cfg.num_eval_images))
    return x, m


def inpaint(g_vars, x, m, cfg: Config):
    """The masked images completed by F: its prediction in the dropped pixels (N, S, S, C)."""
    pred = networks(cfg)[0].apply(g_vars, mask_input(x, m, jnp.asarray(fill_value(cfg))),
                                  train=False)[0]
    start, side = region(cfg)
    full = jax.lax.dynamic_update_slice(jnp.zeros_like(x), pred, (0, start, start, 0))
    return x * (1 - m[..., None]) + full * m[..., None]


def hole_mse(completed, x, m):
    """Mean squared error over the dropped pixels (and channels), [-1, 1] scale."""
    return ((completed - x) ** 2 * m[..., None]).sum() / (m.sum() * x.shape[-1])


def mean_fill(x, m):
    """The baseline: each image's hole filled with the mean of its visible pixels."""
    vis = 1 - m[..., None]
    mu = (x * vis).sum((1, 2), keepdims=True) / vis.sum((1, 2), keepdims=True)
    return x * vis + mu * m[..., None]


def evaluate(state: State, cfg: Config):
    """Held-out hole L2 of F ("hole_mse"), of its random-init twin ("init_hole_mse"), of the
    mean-fill baseline (each hole filled with its image's visible mean) and of the mean
    training image in the hole; D's accuracy on held-out real vs predicted regions; linear /
    k-NN probes of the encoder's pooled output on digits, trained and at init ("init_")."""
    x, m = eval_batch(cfg)
    trained = {"params": state.g_params, "batch_stats": state.g_stats}
    g_init, _ = init_networks(state.init_key, cfg)
    out = {"hole_mse": hole_mse(inpaint(trained, x, m, cfg), x, m),
           "init_hole_mse": hole_mse(inpaint(g_init, x, m, cfg), x, m),
           "meanfill_hole_mse": hole_mse(mean_fill(x, m), x, m),
           "meanimage_hole_mse": hole_mse(mask_input(x, m, jnp.asarray(mean_image(cfg))), x,
                                          m)}
    g, d = networks(cfg)
    pred = g.apply(trained, mask_input(x, m, jnp.asarray(fill_value(cfg))), train=False)[0]
    dv = {"params": state.d_params, "batch_stats": state.d_stats}
    out["d_accuracy"] = 0.5 * (jnp.mean(d.apply(dv, crop_region(x, cfg), train=False) > 0)
                               + jnp.mean(d.apply(dv, pred, train=False) < 0))
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(tuple(
        jnp.asarray(a) for a in data.digit_images(cfg.probe_size)))
    enc = Encoder(cfg.channels, jnp.dtype(cfg.dtype))
    for prefix, gv in (("", trained), ("init_", g_init)):
        ev = {"params": gv["params"]["encoder"], "batch_stats": gv["batch_stats"]["encoder"]}

        def feats(a, ev=ev):
            a = jnp.repeat(2 * a - 1, cfg.num_channels, -1)
            return enc.apply(ev, a, train=False).mean((1, 2)).astype(jnp.float32)

        out.update(probe.probe(jax.random.PRNGKey(0), feats(tr_x), tr_y, feats(te_x), te_y,
                               10, cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature,
                               cfg.probe_l2, prefix=prefix))
    return out


# --- MAIN ---


def plot(res, cfg: Config, out: str, num: int = 6):
    """Seed 0 on `num` held-out images: masked input, F's completion, the mean fill, truth."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)

    @jax.jit
    def rows(state):
        x, m = eval_batch(cfg)
        x, m = x[:num], m[:num]
        g_vars = {"params": state.g_params, "batch_stats": state.g_stats}
        return (mask_input(x, m, jnp.asarray(fill_value(cfg))), inpaint(g_vars, x, m, cfg),
                mean_fill(x, m), x)

    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    titles = ("input (hole = mean colour)", f"context encoder\nhole MSE {f['hole_mse']:.3f}",
              f"mean of the visible pixels\nhole MSE {f['meanfill_hole_mse']:.3f}", "truth")
    imgs = [np.clip((np.asarray(a) + 1) / 2, 0, 1) for a in rows(state)]
    fig, ax = plt.subplots(len(imgs), num, figsize=(1.4 * num, 1.5 * len(imgs) + 0.3))
    for i, (title, im) in enumerate(zip(titles, imgs, strict=True)):
        for j in range(num):
            ax[i, j].imshow(im[j].squeeze(-1) if im.shape[-1] == 1 else im[j],
                            cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax[i, j].axis("off")
        ax[i, 0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    return save_png(fig, out)


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's held-out inpaintings."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[
                       "hole_mse", "meanfill_hole_mse", "meanimage_hole_mse", "init_hole_mse",
                       "d_accuracy", "linear", "linear_few", "knn", "knn_few", "init_linear",
                       "init_linear_few", "init_knn", "init_knn_few",
                       "losses/reconstruction", "losses/discriminator"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        saved = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
