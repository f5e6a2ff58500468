"""Counting visual primitives: features that add up over tiles and stay put under scaling.

[1] M. Noroozi, H. Pirsiavash, P. Favaro. "Representation Learning by Learning to Count."
    ICCV 2017, arXiv:1708.06734. No released code from the authors. M = 10, the 114x114
    input and the AlexNet with a ReLU after fc8 (1000 outputs) are as S.-H. Tsang's review
    of [1] quotes them, and are also what the unofficial TensorFlow re-implementation
    ahmdtaha/tf_learning_to_count (commit 916ed75, nets/model.py) uses, with Adam at 1e-4
    at batch 256 (its README); it reproduces [1] Table 2 to within 2.4 points.

A feature phi(x) in R^K_+ counts K kinds of visual primitive. Two transformations of an
image x (S x S) fix how counts behave: D, downsampling by 2 (the primitives stay the same,
so the count does not change) and T_i, i = 1..4, the four S/2 x S/2 tiles of a 2x2 grid
(each primitive lands in one tile, so the counts add up):

    phi(D o x) = sum_{i=1..4} phi(T_i o x)                                 [1] Sec. 3 [M]
    L_feat = ||phi(D o x) - sum_i phi(T_i o x)||_2^2                       (the post's L_feat)
    L_diff = max(0, M - ||phi(D o y) - sum_i phi(T_i o x)||_2^2),   y another image, M = 10
    L = L_feat + L_diff                        (the post's L; [1]'s contrastive loss)
L_feat alone is minimised by phi = 0 for every image; L_diff keeps the counts of two
different images at least sqrt(M) apart, so the network must count as many primitives as
it needs to tell images apart. Here y is the previous image of the batch (the batch rolled
by one), so phi(D o y) costs nothing extra. D picks one downsampling method per image at
random (bicubic, bilinear, Lanczos, area in [1] [M]; the re-implementation adds nearest),
so the network cannot tell a downsampled image from a tile by its resampling artefacts.
phi is the AlexNet conv1-5 + fc6-fc8 of [1] with a ReLU after fc8: the counts are
non-negative.

Evaluation is frozen: the conv layers' last map on D o x (the scale phi was trained on),
globally average-pooled, and the counting vector phi(D o x) itself, each read by the
linear and k-NN probes of common/probe.py with all labels and with probe_per_class labels
per class; and on held-out images the two loss terms and the mean count ||phi(D o x)||.

Reproduce (CPU demo on scikit-learn's digits upsampled to 32x32, so D o x and the tiles
are 16x16):
    python selfsup/counting.py --preset quick --num-seeds 1 --plot selfsup/counting.png
Measured (1 seed, 600 steps of 128 images; 14.2 min wall, 156 CPU-s on a heavily shared
2-core CPU), trained (the same network at random init), on the 797 held-out digits:
L_feat 0.316 (9.44), L_diff 0.099 (1.28), mean ||phi(D o x)|| 17.0 (1.35), count_ratio
L_feat / ||phi(D o y) - sum_i phi(T_i o x)||^2 = 0.0035 (1.01): the tiles' counts add up
to their image's and stay apart from other images'. Probes of the pooled conv features:
linear 0.921 (0.926) all labels / 0.733 (0.788) 10 per class, k-NN 0.842 (0.895) / 0.619
(0.673); of phi itself: linear 0.881 (0.979) / 0.704 (0.882), k-NN 0.745 (0.954) / 0.566
(0.824). Counting is learned, but on these digits its features probe WORSE than the same
network at random init (as jigsaw.py and relative_position.py here). Without L_diff
(--no-contrastive) ||phi|| falls below 1e-3 within about 20 updates (the tests).
Broken variant (no L_diff): python selfsup/counting.py --preset quick --no-contrastive
Paper setting (GPU; digits upsampled to 228 in place of ImageNet, 114-px views):
    python selfsup/counting.py --preset paper
[1] Table 2 (linear classifiers on frozen AlexNet layers, ImageNet top-1; as quoted by the
re-implementation's README, not re-checked against the PDF): conv1 18.0, conv2 30.6, conv3
34.3, conv4 32.5, conv5 25.7. Fine-tuning on PASCAL VOC (as a benchmark listing quotes
[1]): 2007 classification 67.7 mAP, 2007 detection 51.4 mAP, 2012 segmentation 36.6 mIoU.

Differences from the paper:
- Data: ImageNet does not ship offline; the images are scikit-learn's 1,797 digits (1,000
  for training, 797 held out), grey 8x8, upsampled bilinearly to image_size on the device.
  No random crops, no colour measures (the digits are grey). Digits upsampled from 8x8
  have few primitives at the scale of a 16-px tile (each tile holds a quarter of one
  stroke figure, smooth at 4x upsampling), far from the textured natural crops [1]
  counts in; the catalogue's NATURAL-RGB crops (common.data.sample_photos) or
  common.data.shapes (known object counts) would be closer and are not used here.
- The input side: [1] feeds 114-px views; the 228-px image they are cut from is
  inferred (114 = 228 / 2), and how [1] crops it from the photo is not modelled.
- The negative y is the previous image of the batch, not an independently drawn one; its
  D o y is the one already computed for the batch (same downsampling method). The loss
  is one-sided, L(x, y). The re-implementation splits its batch into halves x and y and
  minimises the symmetric L(x, y) + L(y, x), with y's own D o y and tiles.
- Downsampling methods are jax.image.resize's (antialiased 'cubic', 'linear', 'lanczos3')
  and an exact 2x2 mean for 'area', drawn uniformly from four; which Lanczos [1] used is
  not recalled. The re-implementation draws from five at 0.2 each, tf.image.resize's
  bilinear, lanczos5, area, nearest and bicubic, without antialiasing (its default);
  --downsample-methods takes 'lanczos5' and 'nearest' too (resized with antialias=True).
- No LRN and no dropout in the AlexNet; convs are padded ("SAME") and the pools are
  3x3 stride 2 without padding; flax's default initialisation. The number of training
  steps and the batch size of [1] are not recalled: 256 images per step and 300k steps
  here (the re-implementation: 250 ImageNet epochs at batch 256, i.e. 128 pairs x, y).
- Probes are linear (logistic regression) and k-NN on pooled conv features and on phi;
  [1] trains linear classifiers on each conv layer and fine-tunes on PASCAL VOC.
- The `quick` preset narrows the network (3 convs of 32-64-64, one fc of 256 before the
  1000 counts) and trains 600 steps of 128 images with Adam at 1e-3.
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
from common.nets import Conv

# --- CONFIG ---

METHODS = ("cubic", "linear", "lanczos3", "lanczos5", "nearest", "area")
"""downsampling methods D can draw from (jax.image.resize's, and an exact 2x2 mean)"""


@dataclass(frozen=True)
class Config:
    """Counting; defaults follow [1] (AlexNet with ReLU counts, K = 1000, M = 10, Adam 1e-4)."""

    image_size: int = 228
    """side S of the training images x; D o x and the tiles T_i o x are S/2 (114 in [1])"""
    num_train: int = 1000
    """digits used for training (pretext and probe fits); the other 797 are held out"""
    batch_size: int = 256
    """images x per Adam step (each is also the negative y of its neighbour in the batch)"""
    num_steps: int = 300_000
    """Adam steps"""
    lr: float = 1e-4
    """Adam learning rate"""
    margin: float = 10.0
    """M of L_diff: the squared distance below which two images' counts are pushed apart"""
    contrastive: bool = True
    """add L_diff; False is the broken variant, L_feat alone, which collapses to phi = 0"""
    downsample_methods: tuple[str, ...] = ("cubic", "linear", "lanczos3", "area")
    """methods D draws from, one per image ([1]: bicubic, bilinear, Lanczos, area)"""
    count_dim: int = 1000
    """K, the length of the counting vector phi (fc8's outputs, ReLU)"""
    conv_channels: tuple[int, ...] = (96, 256, 384, 384, 256)
    """output channels of the conv layers (AlexNet conv1-5)"""
    conv_kernels: tuple[int, ...] = (11, 5, 3, 3, 3)
    """kernel sides of the conv layers"""
    conv_strides: tuple[int, ...] = (4, 1, 1, 1, 1)
    """strides of the conv layers"""
    pool_after: tuple[int, ...] = (1, 2, 5)
    """conv layers (1-based) followed by a 3x3 stride-2 max pool"""
    fc_units: tuple[int, ...] = (4096, 4096)
    """hidden fully connected layers (ReLU) between the conv map and the counts (fc6, fc7)"""
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
    def view_size(self) -> int:
        return self.image_size // 2

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # images per update

    def validate(self):
        if self.image_size % 2 or self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be even and >= 8")
        if self.margin <= 0:
            raise ValueError(f"margin={self.margin} must be > 0")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 (y is another image)")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        bad = [m for m in self.downsample_methods if m not in METHODS]
        if bad or not self.downsample_methods:
            raise ValueError(
                f"downsample_methods={self.downsample_methods} must be a non-empty"
                f" subset of {METHODS}"
            )
        if not len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides):
            raise ValueError(
                f"conv_channels={self.conv_channels}, conv_kernels="
                f"{self.conv_kernels} and conv_strides={self.conv_strides} must "
                "have one entry per conv layer"
            )
        if (
            min(
                self.conv_channels + self.conv_kernels + self.conv_strides + self.fc_units,
                default=1,
            )
            < 1
        ):
            raise ValueError(
                "conv_channels, conv_kernels, conv_strides and fc_units must all be >= 1"
            )
        if any(not 1 <= p <= len(self.conv_channels) for p in self.pool_after):
            raise ValueError(
                f"pool_after={self.pool_after} must name conv layers in "
                f"[1, {len(self.conv_channels)}]"
            )
        if self.count_dim < 1:
            raise ValueError(f"count_dim={self.count_dim} must be >= 1")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.knn_k < 1:
            raise ValueError(f"knn_k={self.knn_k} must be >= 1")
        if self.probe_l2 < 0:
            raise ValueError(f"probe_l2={self.probe_l2} must be >= 0")
        if self.probe_per_class < 1:
            raise ValueError(f"probe_per_class={self.probe_per_class} must be >= 1")
        rarest = int(np.bincount(train_images(self)[1], minlength=10).min())
        if self.probe_per_class > rarest:
            raise ValueError(
                f"probe_per_class={self.probe_per_class} exceeds the rarest "
                f"class's {rarest} training images (num_train={self.num_train})"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 digits (16-px views), 3 convs of 32-64-64, fc 256, K = 1000, 600 steps
    # of 128 images with Adam at 1e-3.
    "quick": dict(
        image_size=32,
        batch_size=128,
        num_steps=600,
        lr=1e-3,
        conv_channels=(32, 64, 64),
        conv_kernels=(3, 3, 3),
        conv_strides=(1, 2, 2),
        pool_after=(),
        fc_units=(256,),
        shift_conv=True,
    ),
    "paper": dict(),
}


# --- VIEWS: D o x AND T_i o x ---


def tiles(x):
    """T_i o x, i = 1..4: x (B, S, S, C) -> (B, 4, S/2, S/2, C), the 2x2 grid in row-major
    order (top-left, top-right, bottom-left, bottom-right)."""
    b, s, _, c = x.shape
    h = s // 2
    t = x.reshape(b, 2, h, 2, h, c).transpose(0, 1, 3, 2, 4, 5)  # (B, 2, 2, h, h, C)
    return t.reshape(b, 4, h, h, c)


def downsample(x, method: str):
    """D o x with one method: (B, S, S, C) -> (B, S/2, S/2, C). 'area' is the exact 2x2
    mean; the others are jax.image.resize with antialiasing."""
    b, s, _, c = x.shape
    if method == "area":
        return x.reshape(b, s // 2, 2, s // 2, 2, c).mean((2, 4))
    return jax.image.resize(x, (b, s // 2, s // 2, c), method, antialias=True)


def random_downsample(key, x, methods: tuple[str, ...]):
    """D o x with one of `methods` drawn uniformly per image ([1]: against the shortcut of
    telling D o x from a tile by its resampling artefacts)."""
    if len(methods) == 1:
        return downsample(x, methods[0])
    pick = jax.random.randint(key, (x.shape[0],), 0, len(methods))
    out = jnp.stack([downsample(x, m) for m in methods])  # (n_methods, B, S/2, S/2, C)
    return out[pick, jnp.arange(x.shape[0])]


def upsample(src, cfg: Config):
    """Source digits (B, 8, 8, 1) -> x (B, S, S, 1), bilinear (on the device)."""
    b, _, _, c = src.shape
    return jax.image.resize(src, (b, cfg.image_size, cfg.image_size, c), "linear")


# --- NETWORKS ---


class Counter(nn.Module):
    """phi: conv layers (ReLU, max pools after `pool_after`), flatten, fc layers (ReLU) and
    fc8 to count_dim with a ReLU: non-negative counts (B, K). Also the last conv map."""

    cfg: Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        layers = zip(c.conv_channels, c.conv_kernels, c.conv_strides, strict=True)
        for i, (ch, k, s) in enumerate(layers):
            x = nn.relu(Conv(ch, k, s, shift=c.shift_conv, dtype=dt)(x))
            if i + 1 in c.pool_after:
                x = nn.max_pool(x, (3, 3), (2, 2))
        conv = x  # (B, h, w, channels[-1])
        h = x.reshape(x.shape[0], -1)
        for units in c.fc_units:
            h = nn.relu(nn.Dense(units, dtype=dt)(h))
        phi = nn.relu(nn.Dense(c.count_dim, dtype=dt)(h))  # [1]: ReLU after fc8
        return phi.astype(jnp.float32), conv.astype(jnp.float32)


# --- LOSS ---


def counting_loss(phi_d, phi_t, margin: float, contrastive: bool = True):
    """[1] Sec. 3's contrastive counting loss, batch means. phi_d (B, K) = phi(D o x),
    phi_t (B, 4, K) = phi(T_i o x); y_b = x_{b-1} (the batch rolled by one).
    Returns (L, L_feat, L_diff, mean ||phi(D o y) - sum_i phi(T_i o x)||^2); L leaves out
    L_diff when not `contrastive`."""
    sum_t = phi_t.sum(1)  # sum_i phi(T_i o x)  (B, K)
    l_feat = jnp.sum((phi_d - sum_t) ** 2, -1).mean()  # L_feat
    phi_dy = jnp.roll(phi_d, 1, axis=0)  # phi(D o y), y = the previous image
    dist_y = jnp.sum((phi_dy - sum_t) ** 2, -1)  # (B,)
    l_diff = jnp.maximum(0.0, margin - dist_y).mean()  # L_diff
    return (l_feat + l_diff if contrastive else l_feat), l_feat, l_diff, dist_y.mean()


def count_ratio(l_feat, dist_y):
    """L_feat / mean ||phi(D o y) - sum_i phi(T_i o x)||^2: how far the tiles' summed counts
    are from their own image's, as a fraction of how far they are from another image's
    (1: no better than a random image; 0: counting holds exactly). 0 / 0 counts as 1."""
    return jnp.where(dist_y > 0, l_feat / jnp.maximum(dist_y, 1e-30), 1.0)


def apply_views(net, params, dx, t):
    """phi of D o x (B, h, h, C) and of the tiles (B, 4, h, h, C) in one batch:
    (phi_d (B, K), phi_t (B, 4, K), the last conv map of D o x (B, h', w', channels[-1]))."""
    b = dx.shape[0]
    views = jnp.concatenate([dx, t.reshape((4 * b,) + t.shape[2:])])  # (5B, h, h, C)
    phi, conv = net.apply({"params": params}, views)
    return phi[:b], phi[b:].reshape(b, 4, -1), conv[:b]  # tile rows are b * 4 + i


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def train_images(cfg: Config):
    """(train_x (n, 8, 8, 1), train_y, test_x, test_y): the digits at their 8x8 source
    resolution (numpy, cached); update and evaluate upsample them on the device."""
    return data.digit_images(8, cfg.num_train)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = Counter(cfg).init(k_net, jnp.zeros((1, cfg.view_size, cfg.view_size, 1)))
    params = params["params"]
    return State(params, optax.adam(cfg.lr).init(params), jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, tx = Counter(cfg), optax.adam(cfg.lr)
    train_x = jnp.asarray(train_images(cfg)[0])
    key, k_batch, k_down = jax.random.split(state.key, 3)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,), replace=False)
    x = upsample(train_x[idx], cfg)  # (B, S, S, 1)
    dx, t = random_downsample(k_down, x, cfg.downsample_methods), tiles(x)

    def loss_fn(params):
        phi_d, phi_t, _ = apply_views(net, params, dx, t)
        loss, l_feat, l_diff, dist_y = counting_loss(phi_d, phi_t, cfg.margin, cfg.contrastive)
        return loss, (l_feat, l_diff, dist_y, jnp.linalg.norm(phi_d, axis=-1).mean())

    (loss, (l_feat, l_diff, dist_y, norm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "losses/counting": loss,
        "losses/feat": l_feat,
        "losses/diff": l_diff,
        "charts/count_norm": norm,
        "charts/count_ratio": count_ratio(l_feat, dist_y),
        "charts/grad_norm": optax.global_norm(grads),
    }
    return State(params, opt_state, state.step + 1, key), metrics


# --- EVALUATE ---


def count_stats(params, src, cfg: Config):
    """On source digits (N, 8, 8, 1), area-downsampled: ({"feat": mean L_feat, "diff":
    mean L_diff, "count_ratio", "count_norm": mean ||phi(D o x)||}, phi_d, phi_t, pooled
    conv features)."""
    net, x = Counter(cfg), upsample(src, cfg)
    dx = downsample(x, "area")
    phi_d, phi_t, conv = apply_views(net, params, dx, tiles(x))
    _, l_feat, l_diff, dist_y = counting_loss(phi_d, phi_t, cfg.margin)
    conv = conv.mean((1, 2))  # (N, channels[-1])
    stats = {
        "feat": l_feat,
        "diff": l_diff,
        "count_ratio": count_ratio(l_feat, dist_y),
        "count_norm": jnp.linalg.norm(phi_d, axis=-1).mean(),
    }
    return stats, phi_d, phi_t, conv


def evaluate(state: State, cfg: Config):
    """Probe accuracies on the 797 held-out digits from the frozen network on D o x (area):
    pooled last conv map ("linear", "linear_few", "knn", "knn_few": all 1,000 training
    labels and probe_per_class per class) and the counting vector ("count_linear", ...);
    the held-out loss terms ("test_feat", "test_diff"), count_ratio ("test_count_ratio")
    and mean ||phi(D o x)|| ("test_count_norm")."""
    # a barrier: XLA would otherwise constant-fold the convs' input slices of the data
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in train_images(cfg))
    )
    _, c_tr, _, f_tr = count_stats(state.params, tr_x, cfg)
    stats, c_te, _, f_te = count_stats(state.params, te_x, cfg)
    args = (10, cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)
    out = probe.probe(jax.random.PRNGKey(0), f_tr, tr_y, f_te, te_y, *args)
    out |= probe.probe(jax.random.PRNGKey(0), c_tr, tr_y, c_te, te_y, *args, prefix="count_")
    return out | {f"test_{k}": v for k, v in stats.items()}


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: training curves of L_feat, L_diff and ||phi||; held-out counts phi(D o x)_k
    against sum_i phi(T_i o x)_k (on the diagonal where counting holds) beside phi(D o y)_k
    of another image; one digit with D o x and its tiles."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    params = jax.tree.map(lambda a: a[0], res.state.params)
    src = jnp.asarray(train_images(cfg)[2][:64])
    stats, phi_d, phi_t, _ = jax.jit(functools.partial(count_stats, cfg=cfg))(params, src)
    x = np.asarray(upsample(src[:1], cfg))
    d, t = np.asarray(downsample(jnp.asarray(x), "area")), np.asarray(tiles(jnp.asarray(x)))
    sum_t, phi_d = np.asarray(phi_t.sum(1)), np.asarray(phi_d)
    fig = plt.figure(figsize=(11, 3.8))
    ax = fig.add_subplot(1, 3, 1)
    steps = np.arange(1, res.history["losses/feat"].shape[1] + 1)
    for k, lab in (
        ("losses/feat", "L_feat"),
        ("losses/diff", "L_diff"),
        ("charts/count_norm", "||phi(D o x)||"),
    ):
        ax.plot(steps, res.history[k][0], label=lab)
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.legend(fontsize=8)
    ax.set_title("training (seed 0)", fontsize=9)
    ax = fig.add_subplot(1, 3, 2)
    ax.scatter(
        sum_t.ravel(),
        np.roll(phi_d, 1, 0).ravel(),
        s=2,
        alpha=0.3,
        c="tab:red",
        label="phi(D o y), y another image",
    )
    ax.scatter(sum_t.ravel(), phi_d.ravel(), s=2, alpha=0.3, c="tab:blue", label="phi(D o x)")
    hi = max(float(sum_t.max()), float(phi_d.max()), 1e-6)
    ax.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax.set_xlabel("sum_i phi(T_i o x)_k")
    ax.set_ylabel("phi(D o x)_k, phi(D o y)_k")
    ax.legend(fontsize=7, markerscale=4)
    ax.set_title(
        f"64 held-out digits x K units: L_feat {float(stats['feat']):.3g}, "
        f"L_diff {float(stats['diff']):.3g}",
        fontsize=9,
    )
    gs = fig.add_gridspec(2, 6, left=0.68, right=0.98)
    views = [(x[0], "x"), (d[0], "D o x")] + [(t[0, i], f"T_{i + 1} o x") for i in range(4)]
    for i, (img, title) in enumerate(views):
        a = fig.add_subplot(gs[i // 3, 2 * (i % 3) : 2 * (i % 3) + 2])
        a.imshow(img[..., 0], cmap="gray")
        a.set_title(title, fontsize=8)
        a.axis("off")
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(
        f"counting: probes of conv features: linear {f['linear']:.3f}, k-NN "
        f"{f['knn']:.3f}, 10/class linear {f['linear_few']:.3f}, k-NN "
        f"{f['knn_few']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's curves and counts."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[
            "linear",
            "linear_few",
            "knn",
            "knn_few",
            "count_linear",
            "count_knn_few",
            "test_feat",
            "test_diff",
            "test_count_ratio",
            "test_count_norm",
            "losses/feat",
            "losses/diff",
        ],
    )
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
