"""SimCLR: contrastive learning of visual representations from two augmented views.

[1] T. Chen, S. Kornblith, M. Norouzi, G. Hinton. "A Simple Framework for Contrastive Learning
    of Visual Representations." ICML 2020, arXiv:2002.05709. Released code:
    google-research/simclr (commit 383d414; run.py, data_util.py, objective.py).

Each image x of a batch of n gives two views x~_i = t(x), x~_j = t'(x), t, t' ~ T (random
resized crop and flip, colour distortion, Gaussian blur; common/data.simclr_augment). An
encoder f (a ResNet) maps a view to its representation h = f(x~), a projection head g to
z = g(h) = W2 relu(W1 h), and the 2n projections are contrasted:

    sim(u, v) = u^T v / (||u|| ||v||)                                              [1] Sec. 2.1
    l(i, j) = -log exp(sim(z_i, z_j) / tau)
                   / sum_{k=1..2n} 1[k != i] exp(sim(z_i, z_k) / tau)             [1] Eq. 1
    L = 1/(2n) sum_{k=1..n} [l(2k-1, 2k) + l(2k, 2k-1)]   (NT-Xent)                [1] Alg. 1

The other 2(n - 1) views of the batch are the negatives. After training g is thrown away:
the representation h (before the head) is evaluated frozen, by a linear probe and a k-NN
probe (common/probe.py), with all labels and with 10 per class, against the same encoder at
random init. Optimiser: LARS, lr = 0.3 x batch / 256, weight decay 1e-6, 10 warm-up epochs
then cosine decay, batch 4096, 100 epochs, tau = 0.1 ([1] Sec. 2.3 and the README command
of the released code "which reflects the default hyperparameters in our paper").

Reproduce (CPU demo on scikit-learn's digits at 16x16):
    python selfsup/simclr.py --preset quick
Measured (1 seed, 350 steps, 10.5 min wall / 125 CPU s on a heavily shared 2-core CPU):
linear probe 0.898 (all labels) / 0.782 (10 per class), k-NN 0.857 / 0.656; contrastive
accuracy 0.18 (chance 1/255). The same encoder at random init: linear 0.723 / 0.519, k-NN
0.537 / 0.335.
Paper setting (GPU; ResNet-50, batch 4096, LARS; digits at 32x32 in place of ImageNet):
    python selfsup/simclr.py --preset paper
[1] Table 6 / abstract: ImageNet linear evaluation 69.3% top-1 (ResNet-50), 76.5% (ResNet-50
4x, 1000 epochs). App. B.9 (CIFAR-10, ResNet-50 on 32x32): 94.0% linear (as recalled).

Differences from the paper:
- Data: ImageNet and CIFAR-10 do not ship offline; the images are scikit-learn's 1,797
  digits (1,000 for training, 797 held out), grey, upsampled from 8x8. With one channel the
  colour jitter reduces to brightness and contrast and greyscale is the identity. Batches
  larger than the 1,000 training images (the paper preset's 4096) draw with replacement, so
  duplicates become false negatives.
- The ResNet takes the CIFAR stem of [1] App. B.9 (3x3 conv, stride 1, no max-pool) for
  the small images; BN statistics are those of the whole 2n-view batch (the paper's global
  BN across devices).
- Augmentations: crops whose drawn window does not fit are clipped rather than redrawn;
  hue is rotated in YIQ rather than HSV; saturation blends with the grey image; the blur
  renormalises its kernel at the border (common/data).
- LARS is optax's (trust coefficient 1e-3, momentum 0.9); as in the released code, biases
  and BN parameters are excluded from weight decay and from the trust ratio. The released
  code's README uses weight decay 1e-4 (SimCLRv2 code); the paper says 1e-6, used here.
- Batches are drawn at random every step (no epochs of shuffling); an "epoch" is
  num_train / batch_size steps for the schedule.
- The `quick` preset: 16x16 images, a 3-stage bottleneck ResNet of width 8, batch 128,
  Adam at 1e-3 (base 2e-3 x 128 / 256) with cosine decay, tau = 0.2, colour strength 0.5
  without blur (the paper's CIFAR setting), crops of at least 20% of the image.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import data, probe, run
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """SimCLR; defaults are [1]'s ImageNet setting (Sec. 2.3) on the offline digits."""

    image_size: int = 32
    """side of the training images (digits upsampled from 8x8) and of the views"""
    num_train: int = 1000
    """digits used for training (contrastive and probe fits); the other 797 are held out"""
    batch_size: int = 4096
    """images n per step (2n views)"""
    num_epochs: int = 100
    """training epochs of max(num_train / batch_size, 1) steps"""
    temperature: float = 0.1
    """NT-Xent temperature tau"""
    optimizer: str = "lars"
    """lars ([1]), adam or sgd (momentum)"""
    lr: float = 0.3
    """base learning rate, scaled by batch_size / 256 (linear scaling of [1])"""
    weight_decay: float = 1e-6
    """L2 weight decay (not on biases and BN parameters)"""
    momentum: float = 0.9
    """momentum of LARS and SGD"""
    warmup_epochs: int = 10
    """linear warm-up epochs before the cosine decay (0: none)"""
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    """bottleneck blocks per ResNet stage ((3, 4, 6, 3): ResNet-50)"""
    width: int = 64
    """channels of the first stage's bottleneck (64: ResNet-50; 256: ResNet-50 4x)"""
    proj_hidden: int = 0
    """hidden width of the projection head g (0: the representation's width, as [1])"""
    proj_dim: int = 128
    """output width of the projection head"""
    color_strength: float = 1.0
    """colour-jitter strength s (1.0 ImageNet, 0.5 CIFAR-10 in [1])"""
    blur: bool = True
    """Gaussian blur in the augmentations (ImageNet yes, CIFAR-10 no in [1])"""
    crop_min_scale: float = 0.08
    """smallest area fraction of the random resized crop"""
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
    def steps_per_epoch(self) -> int:
        return max(self.num_train // self.batch_size, 1)

    @property
    def num_updates(self) -> int:
        return self.num_epochs * self.steps_per_epoch

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # images per update

    def validate(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.optimizer not in ("lars", "adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'lars', 'adam' or 'sgd'")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.num_epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be in [0, num_epochs="
                             f"{self.num_epochs})")
        if not self.stage_sizes or min(self.stage_sizes) < 1:
            raise ValueError(f"stage_sizes={self.stage_sizes} must be non-empty, each >= 1")
        if self.width < 1 or self.proj_dim < 1 or self.proj_hidden < 0:
            raise ValueError(f"width={self.width}, proj_dim={self.proj_dim} must be >= 1 and "
                             f"proj_hidden={self.proj_hidden} >= 0")
        if self.color_strength < 0:
            raise ValueError(f"color_strength={self.color_strength} must be >= 0")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale={self.crop_min_scale} must be in (0, 1]")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be >= 8")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} must be >= 2 (negatives)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 16x16 digits, a small 3-stage ResNet, batch 128, Adam, 50 epochs (350 steps).
    "quick": dict(image_size=16, batch_size=128, num_epochs=50, temperature=0.2,
                  optimizer="adam", lr=2e-3, warmup_epochs=0, stage_sizes=(1, 1, 1), width=8,
                  proj_dim=64, color_strength=0.5, blur=False, crop_min_scale=0.2,
                  shift_conv=True),
    "paper": dict(),
}


# --- NETWORKS ---


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (4x width), BN after each conv,
    projection shortcut where the shape changes; the last BN's scale starts at 0."""

    width: int
    stride: int
    shift: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                       epsilon=1e-5, dtype=self.dtype, **kw)
        conv = lambda ch, k, s=1: Conv(ch, k, s, shift=self.shift, use_bias=False,
                                       dtype=self.dtype)
        y = nn.relu(bn()(conv(self.width, 1)(x)))
        y = nn.relu(bn()(conv(self.width, 3, self.stride)(y)))
        y = bn(scale_init=nn.initializers.zeros)(conv(4 * self.width, 1)(y))
        if x.shape[-1] != 4 * self.width or self.stride != 1:
            x = bn()(conv(4 * self.width, 1, self.stride)(x))
        return nn.relu(x + y)


class SimCLRNet(nn.Module):
    """Encoder f (bottleneck ResNet, CIFAR stem, global average pool) and head g."""

    stage_sizes: tuple[int, ...]
    width: int
    proj_hidden: int
    proj_dim: int
    shift: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.width, 3, shift=self.shift, use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype)(x))
        for i, n in enumerate(self.stage_sizes):
            for b in range(n):
                x = Bottleneck(self.width * 2**i, 2 if (i > 0 and b == 0) else 1, self.shift,
                               self.dtype)(x, train)
        h = x.mean((1, 2))  # (B, 4 * width * 2^(stages-1)): the representation
        hidden = self.proj_hidden or h.shape[-1]
        z = nn.relu(nn.Dense(hidden, dtype=self.dtype, name="head_1")(h))
        z = nn.Dense(self.proj_dim, dtype=self.dtype, name="head_2")(z)  # z = W2 relu(W1 h)
        return h.astype(jnp.float32), z.astype(jnp.float32)


def network(cfg: Config) -> SimCLRNet:
    return SimCLRNet(cfg.stage_sizes, cfg.width, cfg.proj_hidden, cfg.proj_dim,
                     cfg.shift_conv, jnp.dtype(cfg.dtype))


# --- LOSS ---


def nt_xent(z1, z2, temperature):
    """[1] Eq. 1 averaged over all 2n ordered positive pairs (Alg. 1). z1, z2 (n, d): the
    projections of the two views of each image. Returns (loss, accuracy of picking the
    positive among the 2n - 1 others)."""
    n = z1.shape[0]
    z = jnp.concatenate([z1, z2])  # (2n, d); view k and k + n are a positive pair
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    logits = z @ z.T / temperature  # (2n, 2n) sim(z_i, z_k) / tau
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # 1[k != i]
    pos = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])  # (2n,) index of j(i)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, pos).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == pos)


def make_views(key, x, cfg: Config):
    """Two independent augmentations t(x), t'(x) of each image of x (n, H, W, C)."""
    keys = jax.random.split(key, 2 * x.shape[0]).reshape(2, x.shape[0], -1)
    aug = jax.vmap(lambda k, img: data.simclr_augment(
        k, img, cfg.image_size, cfg.color_strength, cfg.blur, (cfg.crop_min_scale, 1.0)))
    return aug(keys[0], x), aug(keys[1], x)


def make_optimizer(cfg: Config):
    """[1] Sec. 2.3: LARS, lr = base x batch / 256 with linear warm-up then cosine decay;
    biases and BN parameters (1-d leaves) neither decay nor get a trust ratio."""
    peak = cfg.lr * cfg.batch_size / 256
    total, warm = cfg.num_updates, cfg.warmup_epochs * cfg.steps_per_epoch
    sched = optax.warmup_cosine_decay_schedule(0.0, peak, warm, total) if warm else \
        optax.cosine_decay_schedule(peak, total)
    matrices = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)
    if cfg.optimizer == "lars":
        tx = optax.lars(sched, cfg.weight_decay, matrices, trust_ratio_mask=matrices,
                        momentum=cfg.momentum)
    elif cfg.optimizer == "adam":
        tx = optax.adamw(sched, weight_decay=cfg.weight_decay, mask=matrices)
    else:
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, matrices),
                         optax.sgd(sched, momentum=cfg.momentum))
    return tx, sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def images(cfg: Config):
    """(train_x, train_y, test_x, test_y) as numpy (cached in common.data)."""
    return data.digit_images(cfg.image_size, cfg.num_train)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    variables = network(cfg).init(k_net, jnp.zeros((2, cfg.image_size, cfg.image_size, 1)),
                                  train=False)
    params = variables["params"]
    return State(params, variables["batch_stats"], make_optimizer(cfg)[0].init(params),
                 jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, (tx, sched) = network(cfg), make_optimizer(cfg)
    train_x = jnp.asarray(images(cfg)[0])
    key, k_batch, k_aug = jax.random.split(state.key, 3)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,),
                            replace=cfg.batch_size > cfg.num_train)
    v1, v2 = make_views(k_aug, train_x[idx], cfg)  # (n, H, W, C) each
    n = cfg.batch_size

    def loss_fn(params):
        (_, z), new = net.apply({"params": params, "batch_stats": state.batch_stats},
                                jnp.concatenate([v1, v2]), train=True, mutable=["batch_stats"])
        loss, acc = nt_xent(z[:n], z[n:], cfg.temperature)
        return loss, (acc, new["batch_stats"])

    (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/nt_xent": loss, "charts/contrastive_acc": acc,
               "charts/lr": sched(state.step), "charts/grad_norm": optax.global_norm(grads)}
    return State(params, batch_stats, opt_state, state.step + 1, key), metrics


# --- EVALUATE ---


def representation(state: State, x, cfg: Config):
    """h = f(x) (N, D), before the projection head, with the running BN statistics."""
    return network(cfg).apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                              train=False)[0]


def evaluate(state: State, cfg: Config):
    """Probe accuracies of h on the 797 held-out digits: linear and k-NN with all 1,000
    training labels ("linear", "knn") and probe_per_class per class ("linear_few",
    "knn_few")."""
    # a barrier: XLA would otherwise constant-fold the convs' input slices of the data
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in images(cfg)))
    return probe.probe(jax.random.PRNGKey(0), representation(state, tr_x, cfg), tr_y,
                       representation(state, te_x, cfg), te_y, 10, cfg.probe_per_class,
                       cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["linear", "linear_few", "knn", "knn_few",
                                               "losses/nt_xent", "charts/contrastive_acc"])


if __name__ == "__main__":
    main()
