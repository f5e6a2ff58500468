"""Split-brain autoencoder: two half-networks that predict each other's colour channels.

[1] R. Zhang, P. Isola, A. A. Efros. "Split-Brain Autoencoders: Unsupervised Learning by
    Cross-Channel Prediction." CVPR 2017, arXiv:1611.09842. Released code:
    richzhang/splitbrainauto (commit 79c1349; deploy prototxts of the trained AlexNet only,
    models/deploy_lab.prototxt: Lab input, L centred to [-50, 50], conv2/4/5 in 2 groups).
    Items marked [M] are from memory of [1] and were not re-checked against its text.

An image X in CIE Lab is split into X1 = L and X2 = ab. A network F1 predicts X2 from X1
and a disjoint network F2 predicts X1 from X2; the representation is both, concatenated:

    F1* = argmin_F1 L1(F1(X1), X2),  F2* = argmin_F2 L2(F2(X2), X1)          [1] Eq. 1, 4 [M]
    l_cl(X^, X) = - sum_hw sum_q H(X)_hwq log X^_hwq                         [1] Eq. 3 [M]
        H: the one-hot of the quantised target (ab: Q_ab bins of side 10 in the sRGB
        gamut, as colourisation; L: Q_L bins of width 100 / Q_L)
    l_2(X^, X) = 1/2 sum_hw ||X_hw - X^_hw||^2 (the regression alternative)   [1] Eq. 2 [M]
    F = {F1, F2}: each layer's features are the concatenation of both halves  [1] Sec. 3.2

[1] finds the classification loss better than l_2 for both directions ("cl,cl" beats
"l2,l2" in its tables [M]); only the classification loss is implemented here. Each half
is half as wide as the full network (AlexNet's layers split in two groups, as the released
prototxt's grouped convs), so F has the width of one ordinary network.

Evaluation, on held-out crops: each direction's cross-entropy (`ce_ab`: F1, L -> ab;
`ce_l`: F2, ab -> L) beside its prior-only bound: the entropy of the held-out targets'
own marginal distribution over the bins (`prior_ab`, `prior_l`), which no predictor that
ignores its input can beat; and the bin accuracy. As a representation: linear and k-NN
probes (common/probe) on coloured digits (scikit-learn's digits, each stroke painted in one
random colour on black, so that both L and ab carry the shape) of the pooled features of
layer `probe_layer`: F (both halves), F1 alone ("l_"), F2 alone ("ab_") and F at random
init ("init_").

Reproduce (CPU demo: 32x32 crops of scikit-learn's two photos at 128 px, cut into vertical
bands of 48 px, the even ones for training, the odd ones held out):
    python selfsup/split_brain.py --preset quick --plot selfsup/split_brain.png
Measured (1 seed, 600 steps, 8.2 min loop + 25 s compile on a loaded 2-core CPU, 64
held-out crops of the odd bands): L -> ab held-out CE 2.487 (prior-only: the training
marginal 3.342; the held-out targets' own entropy 2.858), ab -> L 3.788 (prior 4.144,
entropy 3.710); bin accuracy 0.371 / 0.154; training-crop CE 1.03 / 1.57 (two photos: the
halves overfit their bands). Probes of layer 4 on the coloured digits: both halves linear
0.790 (all labels) / 0.546 (10 per class), k-NN 0.231 / 0.123; F1 alone 0.807 / 0.649,
0.563 / 0.325; F2 alone 0.285 / 0.167; the same nets at random init 0.877 / 0.708, 0.455 /
0.182. The pretext task is learnt (both directions well below their prior), but on two
photos its features do not transfer to digits: below random init, F2 worst. Nor does the
concatenation help here: its 10-per-class linear probe (0.546) is below F1's alone (0.649),
the reverse of what the catalogue (section 9) asks of F = {F1, F2}.
The picture is that run's (--plot: held-out crops, F1's colours, F2's lightness).
Paper setting (GPU; the same photos at 256 px, 180-px crops, half-width AlexNet):
    python selfsup/split_brain.py --preset paper
[1]'s linear classification on frozen AlexNet layers (table number not checked [M]), the
Lab split-brain autoencoder (cl,cl): ImageNet top-1 conv1-5 17.7 / 29.3 / 35.4 / 35.2 /
32.8%, i.e. conv5 32.8% (the best layer, conv3: 35.4%, the number benchmark listings
quote); Places conv5 32.5% (conv1-5 21.3 / 30.7 / 34.0 / 34.1 / 32.5) [M].

Differences from the paper:
- Data: ImageNet does not ship offline; crops come from the even vertical bands of
  scikit-learn's two photos (common.data.sample_photos), held-out crops from the odd ones
  (at the paper preset: the left and right halves). The pretext networks' output biases
  start at the log of the training marginal (not in [1]), so both halves begin as the
  prior-only predictor and short runs measure only what the inputs add.
- Bins: ab on a grid of side 10 restricted to the bins an sRGB colour of a 64-level lattice
  rounds to (261 bins, computed here; the released colourisation table has 313); L in
  `l_bins` equal bins over [0, 100] (50 by default [M]). Hard one-hot targets (no soft
  encoding, no class rebalancing [M]).
- Targets are the Lab crop averaged over the net's total stride (one target per output
  cell), not a resized image.
- Network: AlexNet's conv1-5 and fc6-7 as convolutions, each at half width, max-pools
  replaced by strides, no LRN or batch norm, flax's default init; inputs scaled to about
  [-1, 1] (L / 50 - 1, ab / 110). The released deploy_lab.prototxt has a pool5 (3x3 / 2)
  and fc6 as a 6x6 conv of dilation 2; ours: no pool5, fc6 3x3. Its conv1 and conv3 are
  ungrouped (only conv2/4/5 in 2 groups); ours: the two halves disjoint at every layer.
- Optimiser [M]: Adam (0.9, 0.99), lr 3e-5, L2 decay 1e-3, batch 40, the colourisation
  code's solver; [1]'s own schedule was not checked. `quick`: lr 3e-3, a narrow 5-layer net.
- `blind` (not in [1]) zeroes both halves' inputs: the prior-only baseline of the tests.
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


@dataclass(frozen=True)
class Config:
    """Split-brain autoencoder; defaults follow [1] (AlexNet halves) where known."""

    crop_size: int = 176
    """side of the square training crops, a multiple of the total stride ([1]: 180 [M])"""
    photo_size: int = 256
    """short side (px) the photos are resized to before cropping"""
    band_size: int = 192
    """width (px) of the vertical bands of each photo, alternately for training and held
    out (192 at photo_size 256: the left and right halves)"""
    batch_size: int = 40
    """crops per Adam step"""
    num_steps: int = 450_000
    """Adam steps"""
    lr: float = 3e-5
    """Adam learning rate"""
    adam_b1: float = 0.9
    """Adam beta1"""
    adam_b2: float = 0.99
    """Adam beta2"""
    weight_decay: float = 1e-3
    """L2 weight decay added to the gradient"""
    ab_grid: float = 10.0
    """side of the ab bins (colourisation's grid)"""
    l_bins: int = 50
    """number of equal L bins over [0, 100] (ab -> L classes)"""
    channels: tuple[int, ...] = (48, 128, 192, 192, 128, 2048, 2048)
    """widths of one half's layers (AlexNet conv1-5, fc6-7 halved)"""
    kernels: tuple[int, ...] = (11, 5, 3, 3, 3, 3, 1)
    """square kernel sizes of the layers"""
    strides: tuple[int, ...] = (4, 2, 2, 1, 1, 1, 1)
    """strides of the layers (pool1 and pool2 folded into conv2 and conv3)"""
    blind: bool = False
    """baseline: zero both halves' inputs (prior-only predictors)"""
    num_eval_crops: int = 64
    """held-out crops of the evaluation (fixed positions)"""
    probe_layer: int = 5
    """layer (1-based) whose pooled features the probes read (conv5)"""
    probe_size: int = 32
    """side of the coloured digits of the probe"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
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

    @property
    def total_stride(self) -> int:
        return int(np.prod(self.strides))

    def validate(self):
        n = len(self.channels)
        if n < 1 or len(self.kernels) != n or len(self.strides) != n:
            raise ValueError(
                f"channels={self.channels}, kernels={self.kernels} and strides="
                f"{self.strides} need the same (>= 1) number of entries"
            )
        if min(self.channels) < 1 or min(self.kernels) < 1 or min(self.strides) < 1:
            raise ValueError("channels, kernels and strides must all be >= 1")
        if self.crop_size % self.total_stride:
            raise ValueError(
                f"crop_size={self.crop_size} must be a multiple of the total "
                f"stride {self.total_stride}"
            )
        w = round(self.photo_size * 640 / 427)
        if min(self.photo_size, self.band_size) < self.crop_size or w < 2 * self.band_size:
            raise ValueError(
                f"crop_size={self.crop_size} must fit a band (band_size="
                f"{self.band_size} x photo_size={self.photo_size}) and two bands "
                f"the photos' width {w}"
            )
        if self.ab_grid <= 0 or self.l_bins < 2:
            raise ValueError(f"ab_grid={self.ab_grid} must be > 0 and l_bins={self.l_bins} >= 2")
        if not 1 <= self.probe_layer <= n:
            raise ValueError(f"probe_layer={self.probe_layer} must be in [1, {n}]")
        if not 1 <= self.probe_per_class <= 80 or self.knn_k < 1 or self.probe_l2 < 0:
            raise ValueError(
                f"probe_per_class={self.probe_per_class} must be in [1, 80], "
                f"knn_k={self.knn_k} >= 1, probe_l2={self.probe_l2} >= 0"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 crops of the photos at 128 px in bands of 48 px, a narrow 5-layer half
    # (total stride 4: 8x8 predictions per crop), Adam at 3e-3.
    "quick": dict(
        crop_size=32,
        photo_size=128,
        band_size=48,
        batch_size=32,
        num_steps=600,
        lr=3e-3,
        channels=(16, 32, 32, 32, 32),
        kernels=(5, 3, 3, 3, 1),
        strides=(2, 2, 1, 1, 1),
        probe_layer=4,
    ),
    "paper": dict(),
}


# --- COLOUR ---

# sRGB (D65) -> CIE XYZ and the D65 white point
M_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb, xp=jnp):
    """sRGB in [0, 1] (..., 3) -> CIE Lab (..., 3) under D65 (L in [0, 100])."""
    lin = xp.where(rgb > 0.04045, ((xp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    t = lin @ xp.asarray(M_XYZ.T / D65, lin.dtype)  # XYZ / white, (..., 3)
    f = xp.where(
        t > (6 / 29) ** 3, xp.cbrt(xp.maximum(t, (6 / 29) ** 3)), t / (3 * (6 / 29) ** 2) + 4 / 29
    )
    return xp.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def lab_to_rgb(lab, xp=jnp):
    """CIE Lab (..., 3) -> sRGB in [0, 1], clipped where out of gamut (for the plot)."""
    fy = (lab[..., 0] + 16) / 116
    f = xp.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    t = xp.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * D65
    lin = xp.maximum(t @ np.linalg.inv(M_XYZ).T, 0.0)
    srgb = xp.where(
        lin > 0.0031308, 1.055 * xp.maximum(lin, 0.0031308) ** (1 / 2.4) - 0.055, 12.92 * lin
    )
    return xp.clip(srgb, 0.0, 1.0)


@functools.cache
def ab_bins(grid: float) -> np.ndarray:
    """(Q_ab, 2) centres of the grid-`grid` ab bins that a colour of a 64-level sRGB lattice
    rounds to: a plain grid over the sRGB gamut."""
    v = np.linspace(0.0, 1.0, 64)
    rgb = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    return (np.unique(np.round(rgb_to_lab(rgb, np)[:, 1:] / grid), axis=0) * grid).astype(
        np.float32
    )


def quantise(lab, cfg: Config, xp=jnp):
    """Class indices of Lab pixels (..., 3): (ab -> nearest of the Q_ab bins, L -> one of
    l_bins equal bins over [0, 100]); H of [1] Eq. 3 is their one-hot."""
    bins = xp.asarray(ab_bins(cfg.ab_grid))
    ab = lab[..., 1:]
    q_ab = xp.argmin((bins**2).sum(-1) - 2 * ab @ bins.T, -1)  # ||ab - c||^2 - ||ab||^2
    q_l = xp.clip(xp.floor(lab[..., 0] * cfg.l_bins / 100.0), 0, cfg.l_bins - 1)
    return q_ab, q_l.astype(xp.int32)


# --- DATA ---


@functools.cache
def regions(photo_size: int, band_size: int):
    """(train, test) float32 RGB in [0, 1], (N, photo_size, band_size, 3): the two photos at
    short side `photo_size`, cut into vertical bands of `band_size` px, bands 0, 2, ... for
    training and 1, 3, ... held out (the last partial band is dropped)."""
    from PIL import Image

    ims = [
        Image.fromarray(im).resize((round(photo_size * 640 / 427), photo_size), Image.BILINEAR)
        for im in data.sample_photos(0)
    ]
    p = np.stack([np.asarray(im) for im in ims]).astype(np.float32) / 255.0
    n, h, nb = p.shape[0], p.shape[1], p.shape[2] // band_size
    bands = p[:, :, : nb * band_size].reshape(n, h, nb, band_size, 3).transpose(0, 2, 1, 3, 4)
    return bands[:, 0::2].reshape(-1, h, band_size, 3), bands[:, 1::2].reshape(-1, h, band_size, 3)


def sample_crops(keys, images, size: int, flip: bool = True):
    """One random size x size crop of `images` (N, H, W, 3) per key, mirrored at random."""

    def one(k):
        u = jax.random.uniform(k, (4,))
        n, h, w = images.shape[:3]
        i = jnp.minimum((u[0] * n).astype(jnp.int32), n - 1)
        y = jnp.minimum((u[1] * (h - size + 1)).astype(jnp.int32), h - size)
        x = jnp.minimum((u[2] * (w - size + 1)).astype(jnp.int32), w - size)
        crop = jax.lax.dynamic_slice(images[i], (y, x, 0), (size, size, 3))
        return jnp.where(flip & (u[3] < 0.5), crop[:, ::-1], crop)

    return jax.vmap(one)(keys)


def coloured_digits(size: int):
    """The probe's digits (common.data.digit_images), each painted in one random colour
    (seed 0) on black: (train_x, train_y, test_x, test_y), x as RGB (n, size, size, 3)."""
    tr_x, tr_y, te_x, te_y = data.digit_images(size)
    c = np.random.default_rng(0).uniform(0.2, 1.0, (len(tr_x) + len(te_x), 1, 1, 3))
    c = (c / c.max(-1, keepdims=True)).astype(np.float32)  # saturated: max channel 1
    return tr_x * c[: len(tr_x)], tr_y, te_x * c[len(tr_x) :], te_y


# --- NETWORKS ---


class Half(nn.Module):
    """One half F_i: convs + ReLU (widths `channels`), then 1x1 logits over `num_bins`."""

    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    num_bins: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x, feats = x.astype(self.dtype), []
        for c, k, s in zip(self.channels, self.kernels, self.strides, strict=True):
            x = nn.relu(nn.Conv(c, (k, k), (s, s), padding="SAME", dtype=self.dtype)(x))
            feats.append(x)  # (B, H / stride so far, ..., c)
        logits = nn.Conv(self.num_bins, (1, 1), dtype=self.dtype)(x)
        return logits.astype(jnp.float32), feats


def networks(cfg: Config):
    """(F1: L -> Q_ab logits, F2: ab -> Q_L logits), two disjoint half-width nets."""
    dt = jnp.dtype(cfg.dtype)
    return (
        Half(cfg.channels, cfg.kernels, cfg.strides, len(ab_bins(cfg.ab_grid)), dt),
        Half(cfg.channels, cfg.kernels, cfg.strides, cfg.l_bins, dt),
    )


def split_inputs(lab, blind):
    """X1 = L / 50 - 1 and X2 = ab / 110 (the released L - 50, rescaled); zero if blind."""
    keep = 1.0 - blind
    return (lab[..., :1] / 50.0 - 1.0) * keep, lab[..., 1:] / 110.0 * keep


def apply(params, lab, blind, cfg: Config):
    """Both halves on Lab crops (B, S, S, 3): (ab logits, L logits, F1 maps, F2 maps)."""
    f1, f2 = networks(cfg)
    x1, x2 = split_inputs(lab, blind)
    (la, fa), (ll, fl) = f1.apply(params["f1"], x1), f2.apply(params["f2"], x2)
    return la, ll, fa, fl


# --- LOSS ---


def downsample(lab, stride: int):
    """Lab (B, H, W, 3) averaged over stride x stride blocks: one target per output cell."""
    b, h, w = lab.shape[0], lab.shape[1] // stride, lab.shape[2] // stride
    return lab.reshape(b, h, stride, w, stride, 3).mean((2, 4))  # (B, H / st, W / st, 3)


def cross_entropy(logits, target):
    """[1] Eq. 3 [M] averaged over pixels: -mean_hw log softmax(logits)_hw[target_hw]."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None], -1))


def losses(params, lab, blind, cfg: Config):
    """Both directions' losses on Lab crops: ce_ab = l_cl(F1(L), ab) ([1] Eq. 1),
    ce_l = l_cl(F2(ab), L) ([1] Eq. 4); F1 and F2 share nothing, so their sum is minimised
    by each half on its own. Also the bin accuracies."""
    la, ll, _, _ = apply(params, lab, blind, cfg)
    q_ab, q_l = quantise(downsample(lab, cfg.total_stride), cfg)
    ce_ab, ce_l = cross_entropy(la, q_ab), cross_entropy(ll, q_l)
    return {
        "loss": ce_ab + ce_l,
        "ce_ab": ce_ab,
        "ce_l": ce_l,
        "acc_ab": (la.argmax(-1) == q_ab).mean(),
        "acc_l": (ll.argmax(-1) == q_l).mean(),
    }


def marginal_entropy(target, num_bins: int):
    """The prior-only bound: the entropy of the targets' own marginal over the bins, the
    lowest cross-entropy of any prediction that ignores the input."""
    p = jnp.zeros(num_bins).at[target.reshape(-1)].add(1.0) / target.size
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


# --- STATE / UPDATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    init_key: jax.Array  # the nets' init key: evaluate() rebuilds the random-init twin
    blind: jax.Array  # 1.0: inputs zeroed (traced: one program for both arms)


def make_optimizer(cfg: Config):
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr, cfg.adam_b1, cfg.adam_b2)
    )


def init_params(key, cfg: Config):
    f1, f2 = networks(cfg)
    k1, k2 = jax.random.split(key)
    x = jnp.zeros((1, cfg.crop_size, cfg.crop_size, 1))
    return {"f1": f1.init(k1, x), "f2": f2.init(k2, jnp.concatenate([x, x], -1))}


def log_priors(cfg: Config):
    """(Q_ab,), (Q_L,) numpy: log of the training targets' marginals over the bins, from the
    training bands averaged over stride x stride blocks, add-one smoothed."""
    return _log_priors(cfg.photo_size, cfg.band_size, cfg.total_stride, cfg.ab_grid, cfg.l_bins)


@functools.cache
def _log_priors(photo_size, band_size, s, ab_grid, l_bins):
    cfg = Config(ab_grid=ab_grid, l_bins=l_bins)
    rgb = regions(photo_size, band_size)[0].astype(np.float64)
    lab = downsample(rgb_to_lab(rgb[:, : rgb.shape[1] // s * s, : rgb.shape[2] // s * s], np), s)
    out = []
    for q, n in zip(quantise(lab, cfg, np), (len(ab_bins(ab_grid)), l_bins), strict=True):
        counts = np.bincount(q.reshape(-1), minlength=n) + 1.0
        out.append(np.log(counts / counts.sum()).astype(np.float32))
    return tuple(out)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = init_params(k_net, cfg)
    # the output biases start at the log prior: both halves begin as prior-only predictors
    last = f"Conv_{len(cfg.channels)}"
    for half, log_p in zip(("f1", "f2"), log_priors(cfg), strict=True):
        params[half]["params"][last]["bias"] = jnp.asarray(log_p)
    return State(
        params,
        make_optimizer(cfg).init(params),
        jnp.zeros((), jnp.int32),
        key,
        k_net,
        jnp.asarray(float(cfg.blind), jnp.float32),
    )


def update(state: State, cfg: Config):
    tx = make_optimizer(cfg)
    train_rgb = jnp.asarray(regions(cfg.photo_size, cfg.band_size)[0])
    key, k_crop = jax.random.split(state.key)
    lab = rgb_to_lab(
        sample_crops(jax.random.split(k_crop, cfg.batch_size), train_rgb, cfg.crop_size)
    )  # (B, S, S, 3)
    grads, m = jax.grad(
        lambda p: (lambda o: (o["loss"], o))(losses(p, lab, state.blind, cfg)), has_aux=True
    )(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
        "losses/loss": m["loss"],
        "losses/ce_ab": m["ce_ab"],
        "losses/ce_l": m["ce_l"],
        "charts/acc_ab": m["acc_ab"],
        "charts/acc_l": m["acc_l"],
        "charts/grad_norm": optax.global_norm(grads),
    }
    return state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
        key=key,
    ), metrics


# --- EVALUATE ---


def eval_lab(cfg: Config):
    """The fixed held-out crops in Lab (num_eval_crops, S, S, 3)."""
    keys = jax.random.split(jax.random.PRNGKey(0), cfg.num_eval_crops)
    test = jnp.asarray(regions(cfg.photo_size, cfg.band_size)[1])
    lab = rgb_to_lab(sample_crops(keys, test, cfg.crop_size, flip=False))
    return jax.lax.optimization_barrier(lab)  # constants: XLA would fold the binning


def evaluate(state: State, cfg: Config):
    """Held-out ce_ab, ce_l, accuracies and their prior-only bounds prior_ab, prior_l; then
    linear / k-NN probes on coloured digits of layer probe_layer's pooled features: F (both
    halves), F1 alone ("l_"), F2 alone ("ab_") and F at init ("init_")."""
    lab = eval_lab(cfg)
    out = losses(state.params, lab, state.blind, cfg)
    q_ab, q_l = quantise(downsample(lab, cfg.total_stride), cfg)
    for name, q, log_p in zip(("ab", "l"), (q_ab, q_l), log_priors(cfg), strict=True):
        out[f"prior_{name}"] = -jnp.mean(jnp.asarray(log_p)[q])  # training marginal, no input
        out[f"entropy_{name}"] = marginal_entropy(q, log_p.shape[0])
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in coloured_digits(cfg.probe_size))
    )

    def feats(params, x):  # (n, 2 C): F1's then F2's pooled maps
        _, _, fa, fl = apply(params, rgb_to_lab(x), state.blind, cfg)
        i = cfg.probe_layer - 1
        return jnp.concatenate([fa[i].mean((1, 2)), fl[i].mean((1, 2))], -1).astype(jnp.float32)

    c = cfg.channels[cfg.probe_layer - 1]
    ones, zeros = jnp.ones(c), jnp.zeros(c)
    mask = jnp.stack(
        [jnp.concatenate(m) for m in ((ones, ones), (ones, zeros), (zeros, ones), (ones, ones))]
    )
    init_p = init_params(state.init_key, cfg)
    sets = [(state.params, m) for m in mask[:3]] + [(init_p, mask[3])]
    xs = [(feats(p, tr_x) * m, feats(p, te_x) * m) for p, m in sets]
    tr, te = jnp.stack([a for a, _ in xs]), jnp.stack([b for _, b in xs])  # (4, n, 2 C)
    # zeroed columns change neither the linear probe nor the cosine k-NN
    res = jax.vmap(
        lambda a, b: probe.probe(
            jax.random.PRNGKey(0),
            a,
            tr_y,
            b,
            te_y,
            10,
            cfg.probe_per_class,
            cfg.knn_k,
            l2=cfg.probe_l2,
        )
    )(tr, te)
    for i, prefix in enumerate(("", "l_", "ab_", "init_")):
        out.update({prefix + k: v[i] for k, v in res.items()})
    return out


# --- MAIN ---


def plot(res, cfg: Config, out: str, num: int = 4):
    """Seed 0: held-out crops, F1's colourisation (true L, ab = the mean of its predicted
    bins) and F2's lightness (the mean of its predicted L bins, with the true ab)."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)

    @jax.jit
    def predict(params, lab):
        lo = downsample(lab, cfg.total_stride)
        la, ll, _, _ = apply(params, lab, state.blind, cfg)
        ab = jax.nn.softmax(la) @ jnp.asarray(ab_bins(cfg.ab_grid))
        lum = jax.nn.softmax(ll) @ ((jnp.arange(cfg.l_bins) + 0.5) * 100.0 / cfg.l_bins)
        return (
            lab_to_rgb(lo),
            lab_to_rgb(jnp.concatenate([lo[..., :1], ab], -1)),
            lab_to_rgb(jnp.concatenate([lum[..., None], lo[..., 1:]], -1)),
            lab_to_rgb(lo * jnp.array([1.0, 0.0, 0.0])),
        )

    cols = predict(state.params, eval_lab(cfg)[:: max(cfg.num_eval_crops // num, 1)][:num])
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    titles = (
        "truth (target grid)",
        "L input",
        f"F1: L -> ab\nCE {f['ce_ab']:.2f} (prior {f['prior_ab']:.2f})",
        f"F2: ab -> L\nCE {f['ce_l']:.2f} (prior {f['prior_l']:.2f})",
    )
    imgs = (cols[0], cols[3], cols[1], cols[2])
    fig, ax = plt.subplots(num, 4, figsize=(7.2, 1.8 * num + 0.6))
    for j in range(4):
        ax[0, j].set_title(titles[j], fontsize=7)
        for i in range(num):
            ax[i, j].imshow(np.asarray(imgs[j][i]), interpolation="nearest")
            ax[i, j].axis("off")
    fig.suptitle("held-out crops (the photos' odd bands)", fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


def main(argv=None):
    """`--plot PNG` (this file's only extra flag): held-out predictions after the run."""
    flags, argv = run.pop_flags(argv, "--plot")
    keys = [
        "ce_ab",
        "prior_ab",
        "ce_l",
        "prior_l",
        "acc_ab",
        "acc_l",
        "linear",
        "linear_few",
        "knn",
        "knn_few",
        "l_linear_few",
        "ab_linear_few",
        "init_linear",
        "init_linear_few",
        "init_knn",
        "init_knn_few",
        "losses/loss",
    ]
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=keys,
    )
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
