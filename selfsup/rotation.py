"""RotNet: self-supervised features from predicting image rotations.

[1] S. Gidaris, P. Singh, N. Komodakis. "Unsupervised Representation Learning by Predicting
    Image Rotations." ICLR 2018, arXiv:1803.07728. Released code: gidariss/FeatureLearningRotNet
    (commit 8539de6): config/CIFAR10_RotNet_NIN4blocks.py, architectures/NetworkInNetwork.py.

Every training image x is rotated by all four multiples of 90 degrees, g(x | y) = rot90(x, y),
y in {0, 1, 2, 3}, and a conv net F learns to tell which rotation it sees:

    loss(x; theta) = -1/4 sum_{y=0..3} log F^y(g(x | y); theta)                     [1] Eq. 1-2
    all 4 rotations of an image go in the same mini-batch                           [1] Sec. 3
    min_theta 1/N sum_i loss(x_i; theta), SGD with momentum 0.9, weight decay 5e-4,
    lr 0.1 divided by 5 at epochs 60, 120, 160 of 200 (released config; Nesterov)   [1] Sec. 3

To recognise the rotation the net has to find the object's parts and their layout, so its
intermediate features (the paper's best is the second conv block) become a representation
for recognition. It is evaluated frozen: a linear probe and a k-NN probe (common/probe.py)
on the global-average-pooled features of block `probe_block`, with all labels and with 10
labels per class, against the same network at random init.

The network is the released NIN of [1] Sec. 3 (CIFAR-10): blocks of three conv-BN-ReLU
layers, block 1 = 5x5-192, 1x1-160, 1x1-96, max-pool 3/2; block 2 = 5x5-192, 1x1-192,
1x1-192, avg-pool 3/2; blocks 3.. = 3x3-192, 1x1-192, 1x1-192; global average pool and a
linear 4-way classifier. Convolutions start from N(0, 2 / (k^2 C_out)) as in the code.

Reproduce (CPU demo on scikit-learn's digits upsampled to 16x16):
    python selfsup/rotation.py --preset quick
Measured (1 seed, 420 steps, 14.5 min on a heavily shared 2-core CPU): held-out rotation
accuracy 0.942; linear probe 0.926 (all labels) / 0.836 (10 per class), k-NN 0.893 / 0.738;
the same network at random init: 0.25; 0.906 / 0.794, 0.838 / 0.610.
Paper setting (GPU; digits at 32x32 in place of CIFAR-10, the paper's net and schedule):
    python selfsup/rotation.py --preset paper
[1] Table 1 (CIFAR-10, NIN with 4 blocks, non-linear classifier on frozen blocks): ConvB1
85.07, ConvB2 89.06, ConvB3 86.21, ConvB4 61.73 (numbers from the paper's table as recalled
in the selfsup catalogue, not re-checked against the PDF here). ImageNet (AlexNet, linear
on conv5 features, Table 5 of [1], as recalled): 36.5% top-1.

Differences from the paper:
- Data: CIFAR-10 and ImageNet do not ship offline; the images are scikit-learn's 1,797
  digits (1,000 for training, 797 held out), grey, upsampled from 8x8. Digits 0, 1 and 8
  are nearly rotation-symmetric, so the pretext task is easier to half-solve than on photos.
- Batches of `batch_size` images are drawn at random without replacement within a batch,
  independently per step (the code shuffles once per epoch); an "epoch" is num_train /
  batch_size steps for the schedule.
- The probes are linear (logistic regression) and k-NN on globally pooled block features;
  the paper's CIFAR table trains non-linear classifiers (and conv classifiers) on the
  unpooled feature maps.
- No data augmentation (the released CIFAR config uses none for the RotNet itself either).
- The `quick` preset narrows the net (32 channels, 3 blocks), runs 16x16 images, and uses
  the paper's optimiser with a 60-epoch schedule.
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
    """RotNet; defaults are [1]'s released CIFAR10_RotNet_NIN4blocks config."""

    image_size: int = 32
    """side of the (square) training images: digits upsampled from 8x8"""
    num_train: int = 1000
    """digits used for training (pretext and probe fits); the other 797 are held out"""
    batch_size: int = 128
    """images per SGD step; each appears in all 4 rotations, so 4x this many inputs"""
    num_epochs: int = 200
    """training epochs of num_train / batch_size steps"""
    lr: float = 0.1
    """initial SGD learning rate"""
    lr_decay_epochs: tuple[int, ...] = (60, 120, 160)
    """epochs at which the learning rate is multiplied by lr_decay"""
    lr_decay: float = 0.2
    """factor applied to the learning rate at each of lr_decay_epochs"""
    momentum: float = 0.9
    """SGD momentum"""
    nesterov: bool = True
    """Nesterov momentum (the released code's setting)"""
    weight_decay: float = 5e-4
    """L2 weight decay added to every gradient (as torch.optim.SGD does)"""
    num_blocks: int = 4
    """NIN conv blocks (3 conv-BN-ReLU layers each); at least 3"""
    channels: tuple[int, int, int] = (192, 160, 96)
    """NIN widths: the wide layers, and block 1's second and third layer"""
    rotations_per_image: int = 4
    """4: all rotations of every image in the batch ([1]); 1: one random rotation each"""
    probe_block: int = 2
    """block (1-based) whose globally pooled features the probes read"""
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
    """compute dtype of convs and the classifier ("bfloat16" on accelerators)"""

    @property
    def steps_per_epoch(self) -> int:
        return max(self.num_train // self.batch_size, 1)

    @property
    def num_updates(self) -> int:
        return self.num_epochs * self.steps_per_epoch

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.rotations_per_image  # images seen per update

    def validate(self):
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if self.num_blocks < 3:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 3 (the NIN of [1])")
        if not 1 <= self.probe_block <= self.num_blocks:
            raise ValueError(f"probe_block={self.probe_block} must be in [1, num_blocks="
                             f"{self.num_blocks}]")
        if self.rotations_per_image not in (1, 4):
            raise ValueError(f"rotations_per_image={self.rotations_per_image} must be 1 or 4")
        if self.lr_decay <= 0:
            raise ValueError(f"lr_decay={self.lr_decay} must be > 0")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if min(self.channels) < 1:
            raise ValueError(f"channels={self.channels} must all be >= 1")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be >= 8")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 16x16 digits, a narrow 3-block NIN, 60 epochs (420 steps) with the paper's
    # optimiser and its schedule compressed to epochs 18, 36, 48.
    "quick": dict(image_size=16, num_epochs=60, lr_decay_epochs=(18, 36, 48), num_blocks=3,
                  channels=(32, 32, 32), shift_conv=True),
    "paper": dict(),
}


# --- NETWORKS ---


def he_fan_out():
    """The released code's conv init: N(0, 2 / (k * k * C_out))."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class NIN(nn.Module):
    """[1]'s Network-in-Network; returns (rotation logits, [feature map of each block])."""

    num_blocks: int
    channels: tuple[int, int, int]
    shift: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        wide, mid, narrow = self.channels

        def conv_bn_relu(x, ch, k):
            x = Conv(ch, k, shift=self.shift, use_bias=False, kernel_init=he_fan_out(),
                     dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)(x)
            return nn.relu(x)

        feats = []
        for b in range(self.num_blocks):
            layers = [(wide, 5), (mid, 1), (narrow, 1)] if b == 0 else \
                [(wide, 5 if b == 1 else 3), (wide, 1), (wide, 1)]
            for ch, k in layers:
                x = conv_bn_relu(x, ch, k)
            if b == 0:
                x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            elif b == 1:
                x = nn.avg_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
            feats.append(x)  # (B, H_b, W_b, C_b)
        logits = nn.Dense(4, dtype=self.dtype)(x.mean((1, 2)))
        return logits.astype(jnp.float32), feats


def network(cfg: Config) -> NIN:
    return NIN(cfg.num_blocks, cfg.channels, cfg.shift_conv, jnp.dtype(cfg.dtype))


# --- LOSS ---


def rotate_batch(x, key=None):
    """[1] Sec. 3: the 4 rotations of each image, all in the batch. x (B, H, H, C) ->
    (4B, H, H, C) ordered [rot 0 of all images, rot 90, rot 180, rot 270], and labels
    y (4B,) = [0]*B + [1]*B + [2]*B + [3]*B, rot90 counter-clockwise y times. With a key,
    one random rotation per image instead: (B, H, H, C) and its labels."""
    if key is None:
        xs = jnp.concatenate([jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])
        return xs, jnp.repeat(jnp.arange(4), x.shape[0])
    y = jax.random.randint(key, (x.shape[0],), 0, 4)
    xs = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])  # (4, B, H, H, C)
    return xs[y, jnp.arange(x.shape[0])], y


def rotation_loss(logits, y):
    """[1] Eq. 1-2: mean over the batch of -log F^y(g(x | y)); also the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def make_optimizer(cfg: Config):
    """SGD + momentum with L2 decay added to the gradient and a step schedule ([1] code)."""
    spe = cfg.steps_per_epoch
    sched = optax.piecewise_constant_schedule(
        cfg.lr, {e * spe: cfg.lr_decay for e in cfg.lr_decay_epochs})
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(sched, momentum=cfg.momentum, nesterov=cfg.nesterov)), sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def train_images(cfg: Config):
    """(train_x, train_y, test_x, test_y) as numpy (cached in common.data)."""
    return data.digit_images(cfg.image_size, cfg.num_train)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 1))
    variables = network(cfg).init(k_net, x, train=False)
    params = variables["params"]
    tx, _ = make_optimizer(cfg)
    return State(params, variables["batch_stats"], tx.init(params), jnp.zeros((), jnp.int32),
                 key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, (tx, sched) = network(cfg), make_optimizer(cfg)
    train_x = jnp.asarray(train_images(cfg)[0])
    key, k_batch, k_rot = jax.random.split(state.key, 3)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,), replace=False)
    x, y = rotate_batch(train_x[idx], None if cfg.rotations_per_image == 4 else k_rot)

    def loss_fn(params):
        (logits, _), new = net.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
        loss, acc = rotation_loss(logits, y)
        return loss, (acc, new["batch_stats"])

    (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/rotation": loss, "charts/rotation_acc": acc,
               "charts/lr": sched(state.step), "charts/grad_norm": optax.global_norm(grads)}
    return State(params, batch_stats, opt_state, state.step + 1, key), metrics


# --- EVALUATE ---


def features(state: State, images, cfg: Config):
    """Frozen features: block `probe_block`'s map, globally average-pooled, (N, C); and the
    rotation logits of `images` (N, 4) (running BN statistics, no update)."""
    logits, feats = network(cfg).apply({"params": state.params,
                                        "batch_stats": state.batch_stats}, images, train=False)
    return feats[cfg.probe_block - 1].mean((1, 2)).astype(jnp.float32), logits


def evaluate(state: State, cfg: Config):
    """Probe accuracies on the 797 held-out digits: linear and k-NN with all 1,000 training
    labels ("linear", "knn") and with probe_per_class per class ("linear_few", "knn_few");
    and the held-out rotation accuracy."""
    # a barrier: XLA would otherwise constant-fold the convs' input slices of the data
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in train_images(cfg)))
    f_tr, _ = features(state, tr_x, cfg)
    f_te, _ = features(state, te_x, cfg)
    out = probe.probe(jax.random.PRNGKey(0), f_tr, tr_y, f_te, te_y, 10, cfg.probe_per_class,
                      cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)
    xr, yr = rotate_batch(te_x)
    out["rotation_acc_test"] = rotation_loss(features(state, xr, cfg)[1], yr)[1]
    return out


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["linear", "linear_few", "knn", "knn_few",
                                               "rotation_acc_test", "losses/rotation",
                                               "charts/rotation_acc"])


if __name__ == "__main__":
    main()
