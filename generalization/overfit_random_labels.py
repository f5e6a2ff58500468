"""Deep nets fit random labels: the randomization tests of Zhang et al. (2017).

[1] C. Zhang, S. Bengio, M. Hardt, B. Recht, O. Vinyals. "Understanding deep learning
    requires rethinking generalization." ICLR 2017, arXiv:1611.03530. The paper's code was
    not released; the first author's later PyTorch re-implementation,
    pluskid/fitting-random-labels (commit 18d8ea4), corrupts labels the same way (only
    that: its MLP has no biases, its weight decay is 1e-4, and it corrupts the test
    labels too, where [1] and this file measure against the true ones).

A network is trained on a data set whose labels or inputs were replaced by noise ([1]
Sec. 2). Each arm is one such data set, made once and then FIXED for the whole run:
    true labels           the original data
    partially corrupted   y_i <- U{0..9} independently with probability p           [1] Sec. 2
                          (p = 1: random labels)
    shuffled labels       y <- a random permutation of the labels (not an arm of [1]; added
                          here: random labels with the class histogram kept exactly)
    shuffled pixels       one random permutation of pixel positions, the same for every
                          image of train and test
    random pixels         a different random permutation for each image
    Gaussian              every pixel ~ N(mean, std^2) of the training images, per channel
Test accuracy is measured against the TRUE test labels (pixel arms transform the test images
the same way). Every arm trains the same network from the same initialisation on the same
minibatch order, so only the data differ; the arms are one vmapped axis of one program.

    min_theta 1/n sum_i CE(f_theta(x_i), y_i),  SGD, momentum 0.9,
    lr 0.01 (MLPs; 0.1 for Inception) x 0.95 per epoch (staircase)                 [1] App. A
    inputs: 28x28 centre crop of CIFAR-10, per-image whitening
        x <- (x - mean(x)) / max(std(x), 1 / sqrt(#x))   (tf.image.per_image_whitening)
    "time to overfit": the step at which training accuracy first reaches 100%     [1] Fig. 1b
    explicit regularisers: random crop, weight decay ([1] Table 1, CIFAR-10) and dropout
    ([1] Table 2, ImageNet); all off by default

Reproduce (CPU, 8x8 scikit-learn digits, MLP 1x512, all 10 arms, 2 seeds; --plot draws
[1] Fig. 1a-c):
    python generalization/overfit_random_labels.py --preset quick --num-seeds 2 \\
        --plot generalization/overfit_random_labels.png
Regularisation is not the key ([1] Table 1): add --weight-decay 5e-4, --dropout 0.5 or
--augment (random crops of the 1-pixel zero-padded digit) to the command above.
Paper setting (GPU; CIFAR-10 python batches in --data-dir, MLP 1x512 of 1,209,866 weights):
    python generalization/overfit_random_labels.py --preset paper --data-dir ~/cifar-10
[1] Table 1, MLP 1x512 on CIFAR-10 (train / test accuracy, %): true labels 100.0 / 50.51,
with weight decay 99.80 / 50.39, random labels 99.34 / 10.61; Inception (with crop + weight
decay) 100.0 / 89.05, without both 100.0 / 85.75, random labels 100.0 / 9.78. Fig. 1b: the
time to overfit grows only by a small constant factor from true to random labels.
Measured (quick preset: lr 0.1, ten times [1]'s MLP rate, so that 1,400 SGD steps suffice; 2
seeds, 2.8 min on a heavily shared 2-core CPU): every arm reaches train accuracy 1.000; test
accuracy true labels 0.981, p = 0.2 / 0.4 / 0.6 / 0.8: 0.875 / 0.711 / 0.518 / 0.337, random
labels 0.109, shuffled labels 0.118, shuffled pixels 0.981 (an MLP does not see pixel
order), random pixels 0.102, Gaussian 0.097; steps to 100% train accuracy: true labels 130,
random labels 441 (factor 3.4), random pixels 91, Gaussian 84. With [1]'s MLP rate (--lr
0.01, 600 epochs = 4,200 steps, 1 seed): random labels train 0.998 / test 0.110, true
labels 1.000 / 0.982.
Regularisers (700 steps, lr 0.1, 2 seeds; the slow test): true-label test accuracy 0.98
with none, weight decay 5e-4, dropout 0.5 or augmentation alike; random labels are still
fitted with weight decay (1.0), nearly with dropout (0.93 / 0.91), not with augmentation
(0.24 / 0.26: a 1-pixel shift is an eighth of an 8x8 digit).

Logged each update (= one epoch), for every arm a: losses/train_<a> (mean minibatch loss
of the epoch), charts/train_acc_<a> (accuracy on the whole training set against the arm's
own labels, no dropout, centre crop), charts/test_acc_<a> (true test labels), and
charts/lr. `evaluate`: train_acc_<a>, test_acc_<a>, steps_to_fit_<a> (SGD steps until the
training accuracy first reached fit_threshold, checked at the end of each epoch; NaN by
design when it never did) and overfit_factor_<a> = steps_to_fit_<a> / steps_to_fit of
true labels (NaN when either is).

Differences from the paper:
- Data: CIFAR-10 does not ship offline; the CPU presets use scikit-learn's 1,797 8x8 digits
  (1,000 train, 797 test). 8x8 because an MLP needs no more resolution, and the 64-d input
  keeps ten arms of a 1x512 MLP fast on a CPU. Augmentation on digits: random 8x8 crops of
  the image zero-padded by 1 pixel (shifts of +-1; CIFAR-10: random 28x28 crops of 32x32).
- The learning rate decays by 0.95 every `decay_every` SGD steps, 390 by default: one
  CIFAR-10 epoch of batch 128, so the schedule in steps is the paper's also on the 7-step
  epochs of digits (a 0.95 decay per digit epoch would stop training after ~100 steps).
- Network: only [1]'s MLPs (any `hidden` widths), not Inception or AlexNet. Glorot-normal
  weights and zero biases (the initialiser is not given in [1]; pluskid's MLP uses Glorot).
  Dropout, when on, acts on every hidden layer.
- Weight decay is coupled L2 added to the gradient (TF's and torch's SGD), on biases too;
  [1] does not state its coefficient, 5e-4 is the usual CIFAR value (an assumption;
  pluskid's re-implementation uses 1e-4).
- Shuffled / random pixels permute pixel positions (channels move together) of the
  original image, before cropping and whitening; the Gaussian arm matches the per-channel
  mean and std of the training images.
- Minibatches of 128 (not stated in [1]; the value of its re-implementations), a fresh
  random order each epoch, the last incomplete batch dropped.
- The arms share one initialisation, minibatch order and dropout key (in [1] they are
  separate runs).
- In the paper preset the pixels are permuted on the 32x32 image and then centre-cropped to
  28x28, so the shuffled-pixels arm sees a fixed random 784 of the 1,024 positions.
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

from common import data, run
from common.plot import save_png

VARIANTS = ("shuffled_labels", "shuffled_pixels", "random_pixels", "gaussian")
"""The arms beyond label corruption ([1] Sec. 2, and `shuffled_labels`: see the docstring)."""
INPUT_MODES = ("none", "shuffled_pixels", "random_pixels", "gaussian")
IMAGE_SIZE = {"digits": 8, "cifar10": 32}
NUM_CLASSES = 10
EVAL_CHUNK = 2000
"""images per forward pass when the whole train / test set is evaluated"""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Randomization tests of [1]; optimiser defaults are [1] App. A's for MLPs."""

    dataset: str = "digits"
    """'digits' (scikit-learn's 8x8 digits, in the wheel) or 'cifar10' (from --data-dir)"""
    data_dir: str = ""
    """folder holding CIFAR-10's python batches (data_batch_1..5, test_batch)"""
    num_train: int = 1000
    """training images (digits: drawn from the 1,797; cifar10: the first of the 50,000)"""
    num_test: int = 797
    """test images (digits: drawn from the rest; cifar10: the first of the 10,000)"""
    pad: int = 1
    """zero padding (pixels) around each image before cropping"""
    crop_size: int = 8
    """side of the network's input: the centre crop of the padded image, or a random crop
    with --augment ([1]: 28 of CIFAR-10's 32)"""
    hidden: tuple[int, ...] = (512,)
    """hidden widths of the MLP ([1]: MLP 1x512 = (512,), MLP 3x512 = (512, 512, 512))"""
    batch_size: int = 128
    """images per SGD step"""
    num_epochs: int = 300
    """training epochs; one update of the runner is one epoch"""
    lr: float = 0.01
    """initial SGD learning rate ([1]: 0.01 for MLPs and AlexNet, 0.1 for Inception)"""
    lr_decay: float = 0.95
    """factor applied to the learning rate every decay_every steps ([1]: 0.95 per epoch)"""
    decay_every: int = 390
    """SGD steps between learning-rate decays (390 = one CIFAR-10 epoch of batch 128)"""
    momentum: float = 0.9
    """SGD momentum"""
    corruptions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    """label-corruption probabilities p, one arm each (0: true labels, 1: random labels)"""
    variants: tuple[str, ...] = VARIANTS
    """further arms: shuffled_labels, shuffled_pixels, random_pixels, gaussian"""
    weight_decay: float = 0.0
    """L2 coefficient added to the gradient ([1] Table 1 toggle; off in Sec. 2)"""
    dropout: float = 0.0
    """dropout rate on the hidden layers during training ([1] Table 2's toggle, ImageNet)"""
    augment: bool = False
    """random crops of the padded images during training ([1] Table 1 toggle)"""
    fit_threshold: float = 1.0
    """training accuracy that counts as fitted, for steps_to_fit ([1]: 100%)"""
    dtype: str = "float32"
    """compute dtype of the dense layers ("bfloat16" on accelerators)"""

    @property
    def image_size(self) -> int:
        return IMAGE_SIZE[self.dataset]

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size

    @property
    def num_updates(self) -> int:
        return self.num_epochs

    @property
    def steps_per_update(self) -> int:
        return self.steps_per_epoch  # SGD steps: [1] Fig. 1a's x axis

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(arm_name(p) for p in self.corruptions) + tuple(self.variants)

    def validate(self):
        if self.dataset not in IMAGE_SIZE:
            raise ValueError(f"dataset={self.dataset!r} must be one of {sorted(IMAGE_SIZE)}")
        if self.dataset == "cifar10" and not self.data_dir:
            raise ValueError("dataset='cifar10' needs --data-dir (CIFAR-10's python batches)")
        if self.dataset == "digits" and self.num_train + self.num_test > 1797:
            raise ValueError(f"num_train + num_test = {self.num_train + self.num_test} "
                             "exceeds the 1,797 digits")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if self.pad < 0:
            raise ValueError(f"pad={self.pad} must be >= 0")
        if not 1 <= self.crop_size <= self.image_size + 2 * self.pad:
            raise ValueError(f"crop_size={self.crop_size} must be in [1, image size + 2 pad = "
                             f"{self.image_size + 2 * self.pad}]")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be one or more widths >= 1")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay={self.lr_decay} must be in (0, 1]")
        if self.decay_every < 1:
            raise ValueError(f"decay_every={self.decay_every} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0 < self.fit_threshold <= 1:
            raise ValueError(f"fit_threshold={self.fit_threshold} must be in (0, 1]")
        for p in self.corruptions:
            if not 0 <= p <= 1:
                raise ValueError(f"corruptions: {p} must be in [0, 1]")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"variants: {v!r} must be one of {VARIANTS}")
        if not self.arms:
            raise ValueError("corruptions and variants are both empty: no arm to train")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"corruptions and variants name an arm twice: {self.arms}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 8x8 digits, MLP 1x512, lr 0.1 (10x the paper's MLP rate), 1,400 SGD steps
    # (200 epochs of 7 steps).
    "quick": dict(lr=0.1, num_epochs=200),
    # [1] App. A / Table 1: CIFAR-10 28x28 centre crops, MLP 1x512, lr 0.01 x 0.95 per
    # epoch; 100 epochs (not stated for the MLPs in [1]).
    "paper": dict(dataset="cifar10", num_train=50000, num_test=10000, pad=0, crop_size=28,
                  num_epochs=100),
}


def arm_name(p: float) -> str:
    """true_labels (p = 0), random_labels (p = 1), else corrupt_<percent>."""
    return {0.0: "true_labels", 1.0: "random_labels"}.get(p, f"corrupt_{round(100 * p)}")


# --- DATA ---


@functools.cache
def images(dataset: str, data_dir: str, num_train: int, num_test: int):
    """(train_x, train_y, test_x, test_y) as numpy: images (N, H, W, C), uint8 (CIFAR-10)
    or float32 in [0, 1] (digits); cached (see common/run.py on data closed over)."""
    if dataset == "digits":
        tr_x, tr_y, te_x, te_y = data.digit_images(8, num_train)  # 8 -> 8: the digits / 16
    else:
        tr_x, tr_y, te_x, te_y = data.load_cifar10(data_dir)
    if num_train > len(tr_y) or num_test > len(te_y):
        raise ValueError(f"num_train={num_train} / num_test={num_test} exceed the "
                         f"{len(tr_y)} / {len(te_y)} {dataset} images")
    return tr_x[:num_train], tr_y[:num_train], te_x[:num_test], te_y[:num_test]


def dataset(cfg: Config):
    """The cached numpy arrays as jnp inside the traced code (images stay uint8 for
    CIFAR-10: `floats` converts the ones in use), behind an optimisation barrier so that
    XLA does not constant-fold slices of the data set."""
    return jax.lax.optimization_barrier(tuple(
        jnp.asarray(a) for a in images(cfg.dataset, cfg.data_dir, cfg.num_train,
                                       cfg.num_test)))


def floats(x):
    """Images in [0, 1] as float32 (uint8 CIFAR-10 / 255; digits are floats already)."""
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


@functools.cache
def pixel_stats(dataset: str, data_dir: str, num_train: int, num_test: int):
    """Per-channel mean and std (C,) of the training images in [0, 1] (numpy, cached)."""
    x = images(dataset, data_dir, num_train, num_test)[0]
    x = x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
    return x.mean((0, 1, 2)).astype(np.float32), x.std((0, 1, 2)).astype(np.float32)


def corrupt_labels(u_mask, u_class, y, p):
    """[1] Sec. 2: each label independently replaced, with probability p, by a class drawn
    uniformly from all classes (so it may stay right by chance). u_mask, u_class: uniforms
    in [0, 1) of y's shape."""
    new = jnp.minimum(jnp.floor(u_class * NUM_CLASSES), NUM_CLASSES - 1).astype(y.dtype)
    return jnp.where(u_mask < p, new, y)


def make_labels(key, y, cfg: Config):
    """(arms, N) training labels, drawn once at init: the corruptions, then the variants
    (shuffled labels: a permutation of y; pixel arms: the true labels). One draw of
    uniforms serves every arm (each jax.random call site costs a compile)."""
    u = jax.random.uniform(key, (3, len(cfg.arms), y.shape[0]))
    rows = [corrupt_labels(u[0, i], u[1, i], y, p) for i, p in enumerate(cfg.corruptions)]
    for i, v in enumerate(cfg.variants, len(cfg.corruptions)):
        rows.append(y[jnp.argsort(u[2, i])] if v == "shuffled_labels" else y)
    return jnp.stack(rows).astype(jnp.int32)


def example_uniforms(noise_key, ids, n: int):
    """(B, n) uniforms in (0, 1) fixed per example id (B,): the same image gets the same
    noise in every epoch (fold_in of the id, one draw site for all noise arms)."""
    tiny = jnp.finfo(jnp.float32).tiny
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(noise_key, i), (n,),
                                                 minval=tiny))(ids)


def transform_inputs(x, mode: str, pixel_perm, u, mean, std):
    """The arm's version of images x (B, H, W, C): pixel_perm (H*W,) the shuffled-pixels
    permutation, u (B, >= H*W + 2 ceil(H*W*C / 2)) the images' `example_uniforms`, mean and
    std (C,) the training images' per-channel statistics."""
    b, h, w, c = x.shape
    if mode == "none":
        return x
    if mode == "shuffled_pixels":  # one permutation of pixel positions for all images
        return x.reshape(b, h * w, c)[:, pixel_perm].reshape(x.shape)
    if mode == "random_pixels":  # a permutation per image: argsort of its uniforms
        perm = jnp.argsort(u[:, :h * w], axis=1)  # (B, H*W)
        return jnp.take_along_axis(x.reshape(b, h * w, c), perm[..., None], 1).reshape(x.shape)
    assert mode == "gaussian"  # N(mean, std^2) per channel; Box-Muller on the uniforms
    half = (h * w * c + 1) // 2
    u1, u2 = u[:, h * w:h * w + half], u[:, h * w + half:h * w + 2 * half]
    r = jnp.sqrt(-2.0 * jnp.log(u1))
    z = jnp.concatenate([r * jnp.cos(2 * jnp.pi * u2), r * jnp.sin(2 * jnp.pi * u2)], 1)
    return mean + std * z[:, :h * w * c].reshape(x.shape)


def crop(x, offsets, pad: int, size: int):
    """Zero-pad x (B, H, W, C) by `pad` and cut (B, size, size, C) windows whose top-left
    corners are offsets (B, 2), or the centre window when offsets is None."""
    if offsets is None:
        lo = (x.shape[1] - size) // 2  # = (H + 2 pad - size) // 2 - pad, may be negative
        x = jnp.pad(x, ((0, 0), (max(-lo, 0),) * 2, (max(-lo, 0),) * 2, (0, 0)))
        lo = max(lo, 0)
        return x[:, lo:lo + size, lo:lo + size]
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(
        im, (o[0], o[1], 0), (size, size, im.shape[-1])))(x, offsets)


def whiten(x):
    """[1] App. A: tf.image.per_image_whitening of each image x (B, ...) -> (B, D):
    (x - mean) / max(std, 1 / sqrt(D)) over all of the image's D values."""
    x = x.reshape(x.shape[0], -1)
    mean = x.mean(1, keepdims=True)
    std = jnp.maximum(x.std(1, keepdims=True), 1.0 / np.sqrt(x.shape[1]))
    return (x - mean) / std


# --- NETWORKS ---


class MLP(nn.Module):
    """[1]'s MLPs: ReLU hidden layers, dropout after each when training, linear output."""

    hidden: tuple[int, ...]
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = nn.initializers.glorot_normal()
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=init, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(NUM_CLASSES, kernel_init=init, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> MLP:
    return MLP(cfg.hidden, cfg.dropout, jnp.dtype(cfg.dtype))


def make_optimizer(cfg: Config):
    """[1] App. A: SGD with momentum (TF's MomentumOptimizer: a = m a + g, theta -= lr a),
    coupled L2 weight decay added to g, lr x lr_decay every decay_every steps."""
    sched = optax.exponential_decay(cfg.lr, cfg.decay_every, cfg.lr_decay, staircase=True)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(sched, momentum=cfg.momentum)), sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # one MLP per arm, leading axis = arms (all from the same draw)
    opt_state: Any
    labels: jax.Array  # (arms, num_train) training labels of each arm, fixed at init
    pixel_perm: jax.Array  # (H*W,) the shuffled-pixels permutation
    noise_key: jax.Array  # keys the random-pixels permutations and Gaussian images
    fit_epoch: jax.Array  # (arms,) first epoch ending with train acc >= fit_threshold, or -1
    train_acc: jax.Array  # (arms,) accuracies at the end of the last epoch (0 before any)
    test_acc: jax.Array
    epoch: jax.Array
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_net, k_lab, k_perm, k_noise, key = jax.random.split(key, 5)
    tr_x, tr_y = images(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)[:2]
    n_arms, d = len(cfg.arms), cfg.crop_size ** 2 * tr_x.shape[-1]
    params = network(cfg).init(k_net, jnp.zeros((1, d)))["params"]
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (n_arms, *p.shape)), params)
    tx, _ = make_optimizer(cfg)
    return State(params, jax.vmap(tx.init)(params), make_labels(k_lab, jnp.asarray(tr_y), cfg),
                 jnp.argsort(jax.random.uniform(k_perm, (cfg.image_size ** 2,))), k_noise,
                 jnp.full((n_arms,), -1, jnp.int32), jnp.zeros(n_arms), jnp.zeros(n_arms),
                 jnp.zeros((), jnp.int32), key)


def arm_inputs(state: State, cfg: Config, x, ids, offsets):
    """(arms, B, D) whitened network inputs of images x (B, H, W, C) with example ids (B,)
    (train i, test num_train + j) for every arm, cropped at offsets (B, 2) (None: the
    centre): each input mode is computed once and shared by the arms that use it."""
    mean, std = pixel_stats(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)
    x = floats(x)
    modes = [a if a in INPUT_MODES else "none" for a in cfg.arms]
    used = sorted(set(modes), key=INPUT_MODES.index)
    b, h, w, c = x.shape
    u = None
    if {"random_pixels", "gaussian"} & set(used):
        u = example_uniforms(state.noise_key, ids, h * w + 2 * ((h * w * c + 1) // 2))
    xs = jnp.stack([whiten(crop(transform_inputs(x, m, state.pixel_perm, u, mean, std),
                                offsets, cfg.pad, cfg.crop_size)) for m in used])
    return xs[np.array([used.index(m) for m in modes])]  # (arms, B, D)


def batch_labels(labels, idx):
    """The arms' labels of the minibatch idx (B,): (arms, B), the same every epoch."""
    return labels[:, idx]


# --- UPDATE ---


def loss_fn(params, x, y, key, cfg: Config):
    """Mean softmax cross-entropy of one arm's minibatch x (B, D), y (B,); its accuracy."""
    logits = network(cfg).apply({"params": params}, x, train=True, rngs={"dropout": key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def update(state: State, cfg: Config):
    """One epoch of SGD for every arm, then accuracies on the whole train and test sets."""
    tx, sched = make_optimizer(cfg)
    data_set = dataset(cfg)
    tr_x = data_set[0]
    key, k_order, k_steps = jax.random.split(state.key, 3)
    spe, b = cfg.steps_per_epoch, cfg.batch_size
    order = jax.random.permutation(k_order, cfg.num_train)[: spe * b].reshape(spe, b)
    span = cfg.image_size + 2 * cfg.pad - cfg.crop_size + 1  # crop offsets 0..span-1

    def sgd_step(carry, inp):
        params, opt_state = carry
        idx, k = inp
        k_crop, k_drop = jax.random.split(k)
        offsets = jax.random.randint(k_crop, (b, 2), 0, span) if cfg.augment else None
        x = arm_inputs(state, cfg, tr_x[idx], idx, offsets)  # (arms, B, D)
        y = batch_labels(state.labels, idx)  # (arms, B)
        grad_fn = jax.value_and_grad(lambda p, xa, ya: loss_fn(p, xa, ya, k_drop, cfg),
                                     has_aux=True)
        (loss, acc), grads = jax.vmap(grad_fn)(params, x, y)
        updates, opt_state = jax.vmap(tx.update)(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, acc)

    (params, opt_state), (loss, _) = jax.lax.scan(
        sgd_step, (state.params, state.opt_state),
        (order, jax.random.split(k_steps, spe)))  # loss: (steps, arms)
    state = state.replace(params=params, opt_state=opt_state)
    train_acc, test_acc = accuracies(state, cfg, data_set)
    epoch = state.epoch + 1
    fitted = (state.fit_epoch < 0) & (train_acc >= cfg.fit_threshold)
    state = state.replace(fit_epoch=jnp.where(fitted, epoch, state.fit_epoch),
                          train_acc=train_acc, test_acc=test_acc, epoch=epoch, key=key)
    metrics = {"charts/lr": sched(epoch * spe - 1)}
    for i, a in enumerate(cfg.arms):
        metrics[f"losses/train_{a}"] = loss[:, i].mean()
        metrics[f"charts/train_acc_{a}"] = train_acc[i]
        metrics[f"charts/test_acc_{a}"] = test_acc[i]
    return state, metrics


# --- EVALUATE ---


def predict(state: State, cfg: Config, x, ids):
    """Class predictions (arms, N) of images x (N, H, W, C) with ids (N,): centre crop, no
    dropout, EVAL_CHUNK images at a time."""
    n = x.shape[0]
    chunk = min(EVAL_CHUNK, n)
    pad = -n % chunk
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    ids = jnp.concatenate([ids, jnp.zeros(pad, ids.dtype)])

    def one(args):
        xc, ic = args
        inp = arm_inputs(state, cfg, xc, ic, None)  # (arms, chunk, D)
        logits = jax.vmap(lambda p, xa: network(cfg).apply({"params": p}, xa))(
            state.params, inp)
        return jnp.argmax(logits, -1)  # (arms, chunk)

    pred = jax.lax.map(one, (x.reshape(-1, chunk, *x.shape[1:]), ids.reshape(-1, chunk)))
    return pred.transpose(1, 0, 2).reshape(pred.shape[1], -1)[:, :n]  # (arms, N)


def accuracies(state: State, cfg: Config, data_set):
    """(arms,) accuracy on the whole training set against each arm's own labels, and on the
    test set against the true test labels (one pass over both sets)."""
    tr_x, _, te_x, te_y = data_set
    n = tr_x.shape[0]
    x = jnp.concatenate([tr_x, te_x])
    pred = predict(state, cfg, x, jnp.arange(x.shape[0]))  # (arms, N + M)
    return (jnp.mean(pred[:, :n] == state.labels, 1), jnp.mean(pred[:, n:] == te_y, 1))


def evaluate(state: State, cfg: Config):
    """Final accuracies (those of the last epoch), steps to fit ([1] Fig. 1b; NaN: never
    fitted) and their ratio to true labels' (NaN without a fitted true-labels arm)."""
    train_acc, test_acc = state.train_acc, state.test_acc
    steps = jnp.where(state.fit_epoch > 0, state.fit_epoch * cfg.steps_per_epoch, jnp.nan)
    base = steps[cfg.arms.index("true_labels")] if "true_labels" in cfg.arms else jnp.nan
    out = {}
    for i, a in enumerate(cfg.arms):
        out[f"train_acc_{a}"], out[f"test_acc_{a}"] = train_acc[i], test_acc[i]
        out[f"steps_to_fit_{a}"], out[f"overfit_factor_{a}"] = steps[i], steps[i] / base
    return out


# --- PLOT ---


def plot(result, cfg: Config, out: str):
    """[1] Fig. 1: (a) training loss against SGD steps, (b) steps to fit and (c) test error
    against the label-corruption level; mean and band of +- one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, f = result.history, result.final
    steps = (np.arange(h["charts/lr"].shape[1]) + 1) * cfg.steps_per_epoch
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for a in ("true_labels", "random_labels", *cfg.variants):
        if a in cfg.arms:
            m, s = h[f"losses/train_{a}"].mean(0), h[f"losses/train_{a}"].std(0)
            axes[0].plot(steps, m, label=a)
            axes[0].fill_between(steps, m - s, m + s, alpha=0.2)
    axes[0].set(xlabel="SGD steps", ylabel="training loss (epoch mean)", yscale="log",
                title="(a) learning curves")
    axes[0].legend(fontsize=8)
    ps = np.array(cfg.corruptions)
    for ax, key, lab, title in ((axes[1], "steps_to_fit", "steps to 100% train accuracy",
                                 "(b) time to overfit"),
                                (axes[2], "test_acc", "test error", "(c) generalisation")):
        v = np.stack([np.asarray(f[f"{key}_{arm_name(p)}"], float) for p in ps], 1)
        v = 1 - v if key == "test_acc" else v
        ax.errorbar(ps, np.nanmean(v, 0), np.nanstd(v, 0), marker="o", capsize=3)
        ax.set(xlabel="label corruption p", ylabel=lab, title=title)
    axes[2].axhline(0.9, ls="--", c="grey", label="chance")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.dataset}, MLP {'x'.join(map(str, cfg.hidden))}, "
                 f"{h['charts/lr'].shape[0]} seed(s)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    doc = __doc__ + "\n`--plot PNG` (an extra flag) draws [1] Fig. 1a-c from the run."
    cfg, _ = run.parse(Config, PRESETS, argv, description=doc)
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=doc,
                   summary_keys=[f"{m}_{a}" for a in cfg.arms
                                 for m in ("train_acc", "test_acc", "steps_to_fit")])
    if flags["--plot"] is not None:
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
