"""MoCo: Momentum Contrast, a queue of negative keys from a slowly moving key encoder.

[1] K. He, H. Fan, Y. Wu, S. Xie, R. Girshick. "Momentum Contrast for Unsupervised Visual
    Representation Learning." CVPR 2020, arXiv:1911.05722.
[2] X. Chen, H. Fan, R. Girshick, K. He. "Improved Baselines with Momentum Contrastive
    Learning." arXiv:2003.04297 (MoCo v2). Released code of both: facebookresearch/moco
    (main_moco.py, moco/builder.py); where the paper is silent the released code is followed.

A query encoder f_q (parameters theta_q) and a key encoder f_k (theta_k) map two augmented
views of the same image to L2-normalised 128-d vectors q = f_q(x_q), k+ = f_k(x_k). The
keys of the preceding mini-batches wait in a FIFO queue of K entries, the negatives:

    L_q = -log exp(q.k+ / T) / sum_{i=0..K} exp(q.k_i / T)                        [1] Eq. 1
        = cross-entropy of logits [q.k+, q.k_1, ..., q.k_K] / T with label 0      [1] Alg. 1
    theta_k <- m theta_k + (1 - m) theta_q      (no gradient through f_k)         [1] Eq. 2
    queue <- enqueue(queue, k+ of the batch); dequeue the oldest batch of keys    [1] Alg. 1

Each step (as Alg. 1 and builder.py): the EMA update of f_k with the current theta_q, the
keys from the shuffled key batch (shuffling BN, below), the loss, the enqueue of this
batch's keys, then the SGD step of theta_q. Shuffling BN ([1] Sec. 3.3): BatchNorm is
computed per device over its sub-batch; the key batch is shuffled across the devices
before f_k and unshuffled after, so a query and its positive key never share BN
statistics (the intra-batch statistics would leak which key is the positive). Here the
`bn_splits` devices are simulated on one device: the encoder is vmapped over `bn_splits`
sub-batches, each with its own BN statistics, and the key batch is permuted before the
split and un-permuted after ("shuffle_bn"). v1 ([1]): linear head, T = 0.07, lr x 0.1 at
epochs 120 and 160 of 200. v2 ([2]): a 2-layer MLP head (hidden = the representation's
width), Gaussian blur in the augmentations, T = 0.2, cosine lr. The representation h
(before the head) of f_q is evaluated frozen by a linear and a k-NN probe (common/probe.py)
against the same encoder at random init.

Reproduce (CPU demo on scikit-learn's digits at 16x16, v2):
    python selfsup/moco.py --preset quick
Measured (1 seed, 350 steps, about 6 min wall on a loaded 2-core CPU): linear probe 0.910
(all labels) / 0.787 (10 per class), k-NN 0.849 / 0.698; InfoNCE 7.0-7.4 (log(K + 1) =
8.32), contrastive accuracy 0.03-0.10 (chance 1/4097). The same encoder at random init:
linear 0.893 / 0.734, k-NN 0.721 / 0.486. The broken variant m = 0 (f_k = f_q every step):
loss stays at 8.32, accuracy 0.0016, linear 0.801 / 0.624, k-NN 0.598 / 0.378.
Paper setting (GPU; ResNet-50, batch 256, K = 65536, m = 0.999; digits at 32x32 in place of
ImageNet): `--preset paper` (v1, [1]) or `--preset v2` ([2]).
[1] Table 6 / Sec. 4.1: ImageNet linear evaluation 60.6% top-1 (ResNet-50, 200 epochs),
68.6% (R50 4x). [2] Table 1: 67.5% (v2, 200 epochs), 71.1% (800 epochs). [1] Fig. 5
(as recalled): m = 0 (the key encoder is the query encoder) fails to train; m = 0.9 gives
55.2%, m = 0.999 59.0% (K = 4096); without shuffling BN the model cheats the pretext task.

Differences from the paper:
- Data: ImageNet does not ship offline; the images are scikit-learn's 1,797 digits (1,000
  train, 797 held out), grey, upsampled from 8x8. A queue larger than the 1,000 training
  images (the paper preset's 65,536) holds many keys of the query's own image: false
  negatives the paper's 1.28M images make rare.
- Shuffling BN across GPUs is simulated by per-sub-batch BN on one device (above). The
  running BN statistics (used only by the probes) are the mean over the sub-batches'
  updates; PyTorch DDP keeps rank 0's.
- The ResNet takes a CIFAR stem (3x3 conv, stride 1, no max-pool) for the small images.
- Augmentations are SimCLR's (common/data.simclr_augment): v1's colour jitter 0.4 is
  strength 0.5 of SimCLR's 0.8 s with p = 0.8 (the released v1 applies it always, with
  hue); crops at least 20% of the image ([1] and [2]); greyscale is the identity on grey
  images.
- Batches are drawn at random every step (no epochs of shuffling); an epoch is num_train /
  batch_size steps for the schedule. Weight decay applies to every parameter (PyTorch SGD).
- The `quick` preset: 16x16, a 3-stage bottleneck ResNet of width 8, batch 128, K = 4096,
  m = 0.99 (the paper's 0.999 over 350 steps barely moves f_k), 4 BN sub-batches, Adam at
  1e-3 with cosine decay, v2 without blur (SimCLR's CIFAR setting at 16x16).
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
    """MoCo; defaults are [1]'s ImageNet setting (v1, main_moco.py) on the offline digits."""

    version: str = "v1"
    """v1 ([1]: linear head, step lr) or v2 ([2]: MLP head, blur, cosine lr)"""
    image_size: int = 32
    """side of the training images (digits upsampled from 8x8) and of the views"""
    num_train: int = 1000
    """digits used for training (contrastive and probe fits); the other 797 are held out"""
    batch_size: int = 256
    """images per step (one query and one key view each)"""
    num_epochs: int = 200
    """training epochs of max(num_train / batch_size, 1) steps"""
    queue_size: int = 65536
    """K, negative keys in the FIFO queue (a multiple of batch_size)"""
    key_momentum: float = 0.999
    """m of the key encoder's update theta_k <- m theta_k + (1 - m) theta_q"""
    temperature: float = 0.07
    """softmax temperature T (0.07 in [1], 0.2 in [2])"""
    feature_dim: int = 128
    """width of the normalised q and k"""
    bn_splits: int = 8
    """simulated devices: BN statistics per sub-batch of batch_size / bn_splits (8 GPUs)"""
    shuffle_bn: bool = True
    """shuffle the key batch across the BN sub-batches ([1] Sec. 3.3)"""
    optimizer: str = "sgd"
    """sgd (momentum, [1]) or adam"""
    lr: float = 0.03
    """learning rate (not scaled by the batch)"""
    sgd_momentum: float = 0.9
    """momentum of SGD"""
    weight_decay: float = 1e-4
    """L2 weight decay on every parameter"""
    lr_drop_epochs: tuple[int, ...] = (120, 160)
    """v1: epochs after which the lr is multiplied by 0.1"""
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    """bottleneck blocks per ResNet stage ((3, 4, 6, 3): ResNet-50)"""
    width: int = 64
    """channels of the first stage's bottleneck (64: ResNet-50)"""
    color_strength: float = 0.5
    """colour-jitter strength s of common/data (0.5: jitter 0.4 as [1], [2])"""
    crop_min_scale: float = 0.2
    """smallest area fraction of the random resized crop ([1], [2]: 0.2)"""
    blur_in_v2: bool = True
    """v2's Gaussian blur ([2]); off at 16x16 where it erases the digit"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    knn_temperature: float = 0.07
    """temperature of the k-NN probe's exp(similarity / T) votes"""
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
        if self.version not in ("v1", "v2"):
            raise ValueError(f"version={self.version!r} must be 'v1' or 'v2'")
        if self.queue_size % self.batch_size:
            raise ValueError(f"queue_size={self.queue_size} must be a multiple of batch_size="
                             f"{self.batch_size}")
        if not 0 <= self.key_momentum <= 1:
            raise ValueError(f"key_momentum={self.key_momentum} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.feature_dim < 1 or self.width < 1:
            raise ValueError(f"feature_dim={self.feature_dim}, width={self.width} must be >= 1")
        if self.bn_splits < 1 or self.batch_size % self.bn_splits:
            raise ValueError(f"bn_splits={self.bn_splits} must be >= 1 and divide batch_size="
                             f"{self.batch_size}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 0 <= self.sgd_momentum < 1:
            raise ValueError(f"sgd_momentum={self.sgd_momentum} must be in [0, 1)")
        if self.version == "v1" and any(not 0 < e < self.num_epochs
                                        for e in self.lr_drop_epochs):
            raise ValueError(f"lr_drop_epochs={self.lr_drop_epochs} must lie in (0, num_epochs"
                             f"={self.num_epochs})")
        if not self.stage_sizes or min(self.stage_sizes) < 1:
            raise ValueError(f"stage_sizes={self.stage_sizes} must be non-empty, each >= 1")
        if self.color_strength < 0:
            raise ValueError(f"color_strength={self.color_strength} must be >= 0")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale={self.crop_min_scale} must be in (0, 1]")
        if self.knn_temperature <= 0 or self.knn_k < 1 or self.probe_per_class < 1:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0, knn_k="
                             f"{self.knn_k} and probe_per_class={self.probe_per_class} >= 1")
        if self.probe_l2 < 0:
            raise ValueError(f"probe_l2={self.probe_l2} must be >= 0")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be >= 8")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 16x16 digits, a small 3-stage ResNet, batch 128, K = 4096, 50 epochs (350 steps).
    "quick": dict(version="v2", image_size=16, batch_size=128, num_epochs=50, queue_size=4096,
                  key_momentum=0.99, temperature=0.2, bn_splits=4, optimizer="adam", lr=1e-3,
                  weight_decay=1e-6, stage_sizes=(1, 1, 1), width=8, blur_in_v2=False,
                  shift_conv=True),
    "v2": dict(version="v2", temperature=0.2),  # [2]: MLP head, blur, cosine lr, T = 0.2
    "paper": dict(),  # [1]: ResNet-50, batch 256, K = 65536, m = 0.999, T = 0.07, 200 epochs
}


# --- NETWORKS ---


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (4x width), BN after each conv,
    projection shortcut where the shape changes."""

    width: int
    stride: int
    shift: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                  dtype=self.dtype)
        conv = lambda ch, k, s=1: Conv(ch, k, s, shift=self.shift, use_bias=False,
                                       dtype=self.dtype)
        y = nn.relu(bn()(conv(self.width, 1)(x)))
        y = nn.relu(bn()(conv(self.width, 3, self.stride)(y)))
        y = bn()(conv(4 * self.width, 1)(y))
        if x.shape[-1] != 4 * self.width or self.stride != 1:
            x = bn()(conv(4 * self.width, 1, self.stride)(x))
        return nn.relu(x + y)


class Encoder(nn.Module):
    """f_q or f_k: bottleneck ResNet (CIFAR stem, global average pool) giving h, then the
    head: fc (v1) or fc-relu-fc (v2, hidden = h's width), giving the 128-d feature."""

    stage_sizes: tuple[int, ...]
    width: int
    feature_dim: int
    mlp: bool
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
        h = x.mean((1, 2))  # the representation
        z = nn.relu(nn.Dense(h.shape[-1], dtype=self.dtype, name="mlp")(h)) if self.mlp else h
        z = nn.Dense(self.feature_dim, dtype=self.dtype, name="fc")(z)
        return h.astype(jnp.float32), z.astype(jnp.float32)


def network(cfg: Config) -> Encoder:
    return Encoder(cfg.stage_sizes, cfg.width, cfg.feature_dim, cfg.version == "v2",
                   cfg.shift_conv, jnp.dtype(cfg.dtype))


def encode(net, params, stats, x, splits: int, perm=None):
    """Features and new BN statistics of x (n, H, W, C) with BN per sub-batch of n / splits
    (one simulated device each). perm: the key batch's shuffle ([1] Sec. 3.3), undone on the
    output. Returns (h, z normalised, batch_stats averaged over the sub-batches)."""
    n = x.shape[0]
    if perm is not None:
        x = x[perm]
    apply = lambda xs: net.apply({"params": params, "batch_stats": stats}, xs,
                                 train=True, mutable=["batch_stats"])
    (h, z), new = jax.vmap(apply)(x.reshape(splits, n // splits, *x.shape[1:]))
    h, z = h.reshape(n, -1), z.reshape(n, -1)
    if perm is not None:
        inv = jnp.argsort(perm)
        h, z = h[inv], z[inv]
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return h, z, jax.tree.map(lambda a: a.mean(0), new["batch_stats"])


# --- LOSS, EMA, QUEUE ---


def info_nce(q, k, queue, temperature):
    """[1] Eq. 1 / Alg. 1: logits [q.k+, q.queue^T] / T, label 0. q, k (n, d) normalised,
    queue (K, d). Returns (loss, accuracy of ranking the positive first)."""
    l_pos = jnp.sum(q * k, -1, keepdims=True)  # (n, 1)
    l_neg = q @ queue.T  # (n, K)
    logits = jnp.concatenate([l_pos, l_neg], 1) / temperature
    labels = jnp.zeros(q.shape[0], jnp.int32)  # the positive is the 0-th
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == 0)


def momentum_update(key_tree, query_tree, m):
    """[1] Eq. 2: theta_k <- m theta_k + (1 - m) theta_q, leaf by leaf."""
    return jax.tree.map(lambda k, q: m * k + (1 - m) * q, key_tree, query_tree)


def enqueue(queue, ptr, keys):
    """[1] Alg. 1: write the batch's keys over the oldest ones (a ring buffer of K rows,
    K a multiple of the batch); returns (queue, next pointer)."""
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
    return queue, (ptr + keys.shape[0]) % queue.shape[0]


def make_views(key, x, cfg: Config):
    """Query and key views t(x), t'(x) of each image of x (n, H, W, C)."""
    keys = jax.random.split(key, 2 * x.shape[0]).reshape(2, x.shape[0], -1)
    blur = cfg.version == "v2" and cfg.blur_in_v2
    aug = jax.vmap(lambda k, img: data.simclr_augment(
        k, img, cfg.image_size, cfg.color_strength, blur, (cfg.crop_min_scale, 1.0)))
    return aug(keys[0], x), aug(keys[1], x)


def make_optimizer(cfg: Config):
    """main_moco.py: SGD (momentum 0.9, weight decay 1e-4) at lr 0.03; v1 multiplies the lr
    by 0.1 after each of lr_drop_epochs, v2 (--cos) decays it on a half cosine."""
    total = cfg.num_updates
    if cfg.version == "v2":
        sched = optax.cosine_decay_schedule(cfg.lr, total)
    else:
        sched = optax.piecewise_constant_schedule(
            cfg.lr, {e * cfg.steps_per_epoch: 0.1 for e in cfg.lr_drop_epochs})
    if cfg.optimizer == "sgd":
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                         optax.sgd(sched, momentum=cfg.sgd_momentum))
    else:
        tx = optax.adamw(sched, weight_decay=cfg.weight_decay)
    return tx, sched


# --- STATE ---


@struct.dataclass
class State:
    params_q: Any
    stats_q: Any
    params_k: Any  # EMA of params_q, never a gradient
    stats_k: Any
    opt_state: Any
    queue: jax.Array  # (K, feature_dim) normalised keys, oldest at queue_ptr
    queue_ptr: jax.Array
    step: jax.Array
    key: jax.Array


def images(cfg: Config):
    """(train_x, train_y, test_x, test_y) as numpy (cached in common.data)."""
    return data.digit_images(cfg.image_size, cfg.num_train)


def init(key, cfg: Config) -> State:
    """f_k starts as a copy of f_q; the queue as random unit vectors (builder.py)."""
    k_net, k_queue, key = jax.random.split(key, 3)
    variables = network(cfg).init(k_net, jnp.zeros((2, cfg.image_size, cfg.image_size, 1)),
                                  train=False)
    params, stats = variables["params"], variables["batch_stats"]
    queue = jax.random.normal(k_queue, (cfg.queue_size, cfg.feature_dim))
    queue = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True)
    return State(params, stats, params, stats, make_optimizer(cfg)[0].init(params), queue,
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, (tx, sched) = network(cfg), make_optimizer(cfg)
    train_x = jnp.asarray(images(cfg)[0])
    key, k_batch, k_aug, k_shuffle = jax.random.split(state.key, 4)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,),
                            replace=cfg.batch_size > cfg.num_train)
    x_q, x_k = make_views(k_aug, train_x[idx], cfg)

    # Eq. 2 with the current theta_q, then the keys (no gradient) from the shuffled batch
    params_k = momentum_update(state.params_k, state.params_q, cfg.key_momentum)
    perm = jax.random.permutation(k_shuffle, cfg.batch_size) if cfg.shuffle_bn else None
    _, k, stats_k = encode(net, params_k, state.stats_k, x_k, cfg.bn_splits, perm)
    k = jax.lax.stop_gradient(k)

    def loss_fn(params):
        _, q, stats_q = encode(net, params, state.stats_q, x_q, cfg.bn_splits)
        loss, acc = info_nce(q, k, state.queue, cfg.temperature)  # Eq. 1
        return loss, (acc, stats_q)

    (loss, (acc, stats_q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params_q)
    queue, ptr = enqueue(state.queue, state.queue_ptr, k)
    updates, opt_state = tx.update(grads, state.opt_state, state.params_q)
    params_q = optax.apply_updates(state.params_q, updates)
    metrics = {"losses/info_nce": loss, "charts/contrastive_acc": acc,
               "charts/lr": sched(state.step), "charts/grad_norm": optax.global_norm(grads)}
    return State(params_q, stats_q, params_k, stats_k, opt_state, queue, ptr, state.step + 1,
                 key), metrics


# --- EVALUATE ---


def representation(state: State, x, cfg: Config):
    """h = f_q(x) (N, D), before the head, with the running BN statistics."""
    return network(cfg).apply({"params": state.params_q, "batch_stats": state.stats_q}, x,
                              train=False)[0]


def evaluate(state: State, cfg: Config):
    """Probe accuracies of h on the 797 held-out digits: linear and k-NN with all 1,000
    training labels ("linear", "knn") and probe_per_class per class ("linear_few",
    "knn_few")."""
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in images(cfg)))
    return probe.probe(jax.random.PRNGKey(0), representation(state, tr_x, cfg), tr_y,
                       representation(state, te_x, cfg), te_y, 10, cfg.probe_per_class,
                       cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["linear", "linear_few", "knn", "knn_few",
                                               "losses/info_nce", "charts/contrastive_acc"])


if __name__ == "__main__":
    main()
