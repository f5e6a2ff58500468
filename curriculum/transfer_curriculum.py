"""Curriculum by transfer learning: score each training example by the confidence of a
classifier built on a network trained for another task, then train on the easiest examples
first, with a pacing function that lets in more (harder) data as training goes on.

[1] D. Weinshall, G. Cohen, D. Amir. "Curriculum Learning by Transfer Learning: Theory and
    Experiments with Deep Networks." ICML 2018, arXiv:1802.03796.
[2] G. Hacohen, D. Weinshall. "On the Power of Curriculum Learning in Training Deep
    Networks." ICML 2019, arXiv:1904.03626 (the same method with named pacing functions;
    its released code, GuyHacohen/curriculum_learning, is the one this file follows; [1]
    released none).

Scoring ([1] Sec. 4): a teacher network trained on other data gives every target training
image x_i its penultimate features phi(x_i); an SVM (RBF, Platt probabilities, as the
released transfer_learning.py's SVC) is fit on {(phi(x_i), y_i)}, and the difficulty of x_i is
its confidence in the true class:

    s_i = P_svm(y_i | phi(x_i))                      high = easy
    order = argsort(-s)                              easiest first
    balanced order: group g holds the g-th easiest image of every class, groups in turn

Pacing ("fixed exponential pacing", [2] Sec. 3 and the released code): minibatches of B are
drawn uniformly without replacement from the first n_t images of the order,

    n_t = ceil(N min(1, starting_percent increase_amount^floor(t / batch_increase)))

Four arms, as in [1] Fig. 2: `curriculum` (the balanced order), `anti` (its reverse),
`random` (the control curriculum: a random order, same pacing) and `vanilla` (no pacing:
all N images from step 0). Every arm is plain SGD with the released exponential step
decay lr_t = max(lr / decay^floor(t / lr_batch_size), minimal_lr), each with its own
released schedule, and starts from the same initial weights and reads the same random draws,
so the arms are one vmapped program (paired).

The linear toy (`--dataset linear`, [1] Sec. 3): linear regression with heteroscedastic
noise; the teacher is the optimal hypothesis w_bar (least squares on the training set) and
the difficulty is its loss (w_bar . x_i - y_i)^2. [1] Theorem 1: the expected SGD step
towards w_bar is larger for easier examples (at a fixed current loss), so easy-first
pacing converges faster than hard-first.

Reproduce (CPU, sklearn digits: the teacher learns digits 5-9, the students 0-4; the figure
curriculum/transfer_curriculum.png):
    python curriculum/transfer_curriculum.py --preset quick --num-seeds 4 \
        --plot curriculum/transfer_curriculum.png
GPU (CIFAR-10 animals 3-7 as the target, the 5 other classes for the teacher; the released
small-mammals settings, 140 epochs of 2,500 images = 3,500 batches at the paper's scale):
    python curriculum/transfer_curriculum.py --preset paper --data-dir ~/data/cifar10

Measured (`quick`: digits 0-4 with per-image pixel noise of sd up to 2, 540 test images;
the teacher 400 Adam steps on digits 5-9; 800 steps of batch 32, one lr schedule for all
arms; 4 seeds, loaded 2-core CPU, 96 CPU-s), test accuracy, per seed:
    arm          step 20                 mean of steps 20-100     final (step 800)
    curriculum   0.77 0.69 0.70 0.72     0.79 0.75 0.77 0.77      0.90 0.89 0.92 0.89
    random       0.67 0.58 0.71 0.70     0.80 0.79 0.78 0.79      0.89 0.89 0.89 0.90
    vanilla      0.66 0.73 0.75 0.77     0.81 0.83 0.81 0.83      0.91 0.89 0.90 0.90
    anti         0.51 0.26 0.39 0.40     0.60 0.60 0.62 0.61      0.88 0.89 0.92 0.90
Easy-first beats hard-first while the pacing holds data back (by 0.14-0.19 over steps
20-100, every seed), but not the paper's main claim: no pacing (vanilla) is ahead of the
curriculum in every seed over steps 20-100 (by 0.02-0.08) and the random order too (by
0.01-0.04); all four end within 0.03. The linear toy (the test's setting: 8 seeds, 400
steps, one lr) puts easy-first far ahead of hard-first (mean test MSE 0.10-0.17 vs
0.34-0.45 per seed) and ahead of a random order on average, but level with no pacing.

Differences from the paper:
- Teacher: [1] uses Inception-v3 pretrained on ImageNet. Nothing is downloaded here: the
  teacher is this file's student network trained (Adam) on the classes the students never
  see (digits 5-9; CIFAR-10's vehicles and birds), the same "other task" transfer at a
  smaller scale.
- Data: [1]'s target is CIFAR-100's small mammals (5 classes, 2,500 training images);
  CIFAR-100 is not in common/data, so the paper preset takes CIFAR-10's five animal classes
  (25,000 images) and keeps [2]'s batch count per epoch-equivalent of small mammals, 3,500.
- Pacing: [1] samples minibatches from difficulty-sorted groups on a stepwise schedule [M:
  its parameters not read]; no code of [1] was released. This file uses [2]'s fixed
  exponential pacing and the settings of [2]'s released code (starting 4%, x1.9 every 100
  batches).
- The balanced order for unequal class sizes: a class that runs out leaves its later groups
  (the released code assumes equal sizes).
- The network follows the released stVGG (conv pairs of 32, 64, 128, 256 with ELU, max-pool,
  dropout 0.25, dense 512, dropout 0.5, L2 5e-3 on kernels, no batch norm, Keras's
  Glorot-uniform kernels); the quick preset is two conv pairs (16, 32) and a dense 64 on
  8x8 digits.
- The released runs tune lr, decay and decay interval per arm (main_reproduce_paper.py);
  those four schedules are the defaults here, per arm; the quick preset gives all arms one.
- The CPU demo adds per-image pixel noise to the digits (`noise_max`): clean 8x8 digits 0-4
  are learned to 99% by every arm within 100 steps, leaving no room for an ordering.
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

from common import data, run
from common.nets import Conv

# --- CONFIG ---

ARMS = ("curriculum", "anti", "random", "vanilla")
DATASETS = ("cifar10", "digits", "linear")


@dataclass(frozen=True)
class Config:
    """Curriculum by transfer; defaults are the released small-mammals settings of [2]."""

    dataset: str = "cifar10"
    """'cifar10' (--data-dir), 'digits' (sklearn, ships in the wheel) or 'linear' (toy)"""
    data_dir: str = ""
    """folder with CIFAR-10's python batches (dataset 'cifar10')"""
    target_classes: tuple[int, ...] = (3, 4, 5, 6, 7)
    """classes the students learn; the teacher trains on all the others"""
    test_fraction: float = 0.3
    """digits only: share of each target class held out for testing"""
    num_batches: int = 3500
    """SGD steps of every arm ([2]: 140 epochs of 2,500 images at batch 100)"""
    eval_every: int = 50
    """SGD steps per update; test accuracy after each ([2]: test_each 50)"""
    batch_size: int = 100
    """minibatch size ([2]: 100)"""
    starting_percent: float = 0.04
    """pacing: share of the ordered data available at step 0 ([2]: 0.04)"""
    increase_amount: float = 1.9
    """pacing: factor by which the available share grows ([2]: 1.9)"""
    batch_increase: int = 100
    """pacing: steps between two increases ([2]: 100)"""
    lr: tuple[float, ...] = (0.03, 0.025, 0.025, 0.035)
    """initial SGD learning rate per arm, in ARMS order ([2]'s tuned values)"""
    lr_decay_rate: tuple[float, ...] = (1.1, 1.1, 1.3, 1.8)
    """divide the rate by this every lr_batch_size steps, per arm ([2])"""
    lr_batch_size: tuple[int, ...] = (100, 200, 400, 600)
    """steps between two decays, per arm ([2])"""
    minimal_lr: float = 1e-4
    """floor of the decayed rate ([2]: 1e-4)"""
    widths: tuple[int, ...] = (32, 64, 128, 256)
    """channels of the conv pairs, each pair then max-pooled ([2]'s stVGG)"""
    kernels: tuple[int, ...] = (3, 3, 3, 2)
    """kernel size of each conv pair ([2]: 3, 3, 3, 2)"""
    dense: int = 512
    """width of the penultimate dense layer ([2]: 512)"""
    dropout_conv: float = 0.25
    """dropout after each pooled conv pair ([2]: 0.25)"""
    dropout_dense: float = 0.5
    """dropout after the dense layer ([2]: 0.5)"""
    l2_weight: float = 5e-3
    """L2 coefficient on the kernels, added to the loss ([2]: Keras l2(5e-3))"""
    balance: bool = True
    """interleave the classes in the difficulty order ([2]'s balance_order)"""
    teacher_steps: int = 3000
    """Adam steps of the teacher on the other classes"""
    teacher_lr: float = 1e-3
    """Adam learning rate of the teacher"""
    teacher_batch: int = 100
    """teacher minibatch size"""
    linear_dim: int = 20
    """linear toy: input dimension"""
    linear_num_train: int = 1000
    """linear toy: training examples"""
    noise_max: float = 0.0
    """images: add N(0, sigma_i^2) pixel noise once, sigma_i ~ U(0, noise_max) per image
    (standardised units), so that difficulty varies (0: the data as they are)"""
    shift_conv: bool = False
    """convolutions as shifted matmuls (fast on CPU under vmap and scan; common.nets)"""
    data_seed: int = 0
    """seed of the split, the teacher and the SVM (fixed across training seeds)"""
    dtype: str = "float32"
    """compute dtype of the student's convolutions ('bfloat16' on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_batches // self.eval_every

    @property
    def steps_per_update(self) -> int:
        return self.eval_every * self.batch_size * len(ARMS)

    def validate(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} must be one of {DATASETS}")
        if self.dataset == "cifar10" and not self.data_dir:
            raise ValueError("dataset='cifar10' needs --data-dir (CIFAR-10's python batches)")
        for name in ("lr", "lr_decay_rate", "lr_batch_size"):
            v = getattr(self, name)
            if len(v) != len(ARMS) or min(v) <= 0:
                raise ValueError(f"{name}={v} needs one positive value per arm {ARMS}")
        if min(self.lr_decay_rate) < 1:
            raise ValueError(f"lr_decay_rate={self.lr_decay_rate} must be >= 1 (a decay)")
        if not 0 < self.starting_percent <= 1 or self.increase_amount < 1:
            raise ValueError(f"starting_percent={self.starting_percent} must be in (0, 1] and "
                             f"increase_amount={self.increase_amount} >= 1")
        if len(self.widths) != len(self.kernels) or min(self.widths + self.kernels) < 1:
            raise ValueError(f"widths={self.widths} and kernels={self.kernels}: one positive "
                             "kernel size per conv pair")
        if self.dataset != "linear" and (len(set(self.target_classes)) < 2
                                         or not set(self.target_classes) <= set(range(10))):
            raise ValueError(f"target_classes={self.target_classes}: two or more of 0..9")
        for name in ("batch_increase", "eval_every", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.noise_max < 0 or not 0 < self.test_fraction < 1:
            raise ValueError(f"noise_max={self.noise_max} must be >= 0 and test_fraction="
                             f"{self.test_fraction} in (0, 1)")
        if len(set(self.target_classes)) < len(self.target_classes):
            raise ValueError(f"target_classes={self.target_classes} has duplicates")
        if self.num_batches < self.eval_every:
            raise ValueError(f"num_batches={self.num_batches} < eval_every={self.eval_every}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        n = len(datasets(self)[1])  # the training set (loaded and cached here, once)
        if math.ceil(n * self.starting_percent) < self.batch_size:
            raise ValueError(f"starting_percent={self.starting_percent} opens "
                             f"{math.ceil(n * self.starting_percent)} of the {n} training "
                             f"examples, fewer than batch_size={self.batch_size}")


PRESETS = {
    # CPU demo: digits (8x8) with per-image noise of std up to 2, the teacher on 5-9, the
    # students on 0-4 (~630 training images), two conv pairs; 800 steps at batch 32.
    "quick": dict(dataset="digits", target_classes=(0, 1, 2, 3, 4), widths=(16, 32),
                  kernels=(3, 3), dense=64, batch_size=32, num_batches=800, eval_every=20,
                  batch_increase=20, lr=(0.1, 0.1, 0.1, 0.1), lr_decay_rate=(1.1, 1.1, 1.1, 1.1),
                  lr_batch_size=(40, 40, 40, 40), teacher_steps=400, starting_percent=0.06,
                  noise_max=2.0, shift_conv=True),
    "paper": dict(),
}


# --- DATA ---


def _standardise(train, *others):
    """Per-channel mean and std of the training images ([2]'s normalize_dataset)."""
    mean, std = train.mean((0, 1, 2)), train.std((0, 1, 2)) + 1e-8
    return [(a - mean) / std for a in (train, *others)]


@functools.cache
def datasets(cfg: Config):
    """numpy (target train x, y, target test x, y, source x, y): images (N, H, W, C) float32
    standardised on the target training set, target labels remapped to 0..K-1. The linear toy
    returns (x, y, x_test, y_test, w_bar, None): y = w* . x + sigma_i eps with sigma_i ~
    U(0, 2), noise-free test targets, and w_bar the least-squares fit to the training set."""
    rng = np.random.default_rng(cfg.data_seed)
    if cfg.dataset == "linear":
        d, n = cfg.linear_dim, cfg.linear_num_train
        w_star = rng.standard_normal(d) / np.sqrt(d)
        x, xt = rng.standard_normal((n, d)), rng.standard_normal((2000, d))
        x *= np.sqrt(d) / np.linalg.norm(x, axis=1, keepdims=True)  # |x| = sqrt(d): the
        # difficulty is the noise alone, not a short x (whose small gradient is slow, not easy)
        y = x @ w_star + rng.uniform(0, 2, n) * rng.standard_normal(n)
        w_bar = np.linalg.lstsq(x, y, rcond=None)[0]
        f = lambda a: np.asarray(a, np.float32)  # noqa: E731
        return f(x), f(y), f(xt), f(xt @ w_star), f(w_bar), None
    if cfg.dataset == "digits":
        imgs, labels = data.digits()
        imgs = imgs[..., None].astype(np.float32) / 16.0
        is_test = np.zeros(len(labels), bool)
        for c in cfg.target_classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            is_test[idx[: round(cfg.test_fraction * len(idx))]] = True
        tr_x, tr_y, te_x, te_y = imgs[~is_test], labels[~is_test], imgs[is_test], labels[is_test]
    else:
        tr_x, tr_y, te_x, te_y = data.load_cifar10(cfg.data_dir)
        tr_x, te_x = tr_x.astype(np.float32) / 255.0, te_x.astype(np.float32) / 255.0
    target = np.isin(tr_y, cfg.target_classes)
    remap = np.full(10, -1)
    remap[list(cfg.target_classes)] = np.arange(len(cfg.target_classes))
    keep_te = np.isin(te_y, cfg.target_classes)
    x, xt, xs = _standardise(tr_x[target], te_x[keep_te], tr_x[~target])
    if cfg.noise_max > 0:
        x, xt, xs = [(a + rng.uniform(0, cfg.noise_max, (len(a), 1, 1, 1))
                      * rng.standard_normal(a.shape)).astype(np.float32) for a in (x, xt, xs)]
    source_classes = np.unique(tr_y[~target])
    ys = np.searchsorted(source_classes, tr_y[~target]).astype(np.int32)
    return (x, remap[tr_y[target]].astype(np.int32), xt, remap[te_y[keep_te]].astype(np.int32),
            xs, ys)


# --- NETWORK ---


GLOROT = nn.initializers.glorot_uniform()  # Keras' default kernel init ([2]'s stVGG); zero biases


class ConvNet(nn.Module):
    """[2]'s stVGG: per pair two same-padded convs (ELU), 2x2 max-pool (valid), dropout; then
    dense (ELU), dropout, logits. Returns (logits, penultimate features before dropout)."""

    widths: tuple[int, ...]
    kernels: tuple[int, ...]
    dense: int
    num_classes: int
    dropout_conv: float
    dropout_dense: float
    shift: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for w, k in zip(self.widths, self.kernels, strict=True):
            for _ in range(2):
                x = nn.elu(Conv(w, k, shift=self.shift, dtype=self.dtype, kernel_init=GLOROT)(x))
            x = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
            x = nn.Dropout(self.dropout_conv, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        feats = nn.elu(nn.Dense(self.dense, dtype=self.dtype, kernel_init=GLOROT)(x))
        h = nn.Dropout(self.dropout_dense, deterministic=not train)(feats)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=GLOROT)(h)
        return logits.astype(jnp.float32), feats


def network(cfg: Config, num_classes: int) -> nn.Module:
    if cfg.dataset == "linear":
        return nn.Dense(1)
    return ConvNet(cfg.widths, cfg.kernels, cfg.dense, num_classes, cfg.dropout_conv,
                   cfg.dropout_dense, cfg.shift_conv, jnp.dtype(cfg.dtype))


def l2_penalty(params, cfg: Config):
    """Keras l2(c) on every kernel: c sum(W^2); biases are not regularised ([2])."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return cfg.l2_weight * sum(jnp.sum(p.astype(jnp.float32) ** 2) for path, p in leaves
                               if getattr(path[-1], "key", None) == "kernel")


def loss_fn(params, x, y, key, cfg: Config, num_classes: int):
    """Cross-entropy + L2 on kernels (images), or the squared error (linear toy)."""
    if cfg.dataset == "linear":
        return 0.5 * jnp.mean((network(cfg, 1).apply({"params": params}, x)[:, 0] - y) ** 2)
    logits, _ = network(cfg, num_classes).apply({"params": params}, x, train=True,
                                                rngs={"dropout": key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l2_penalty(params, cfg)


# --- SCORING (the teacher) ---


def train_teacher(cfg: Config, xs, ys):
    """The teacher: the same network trained by Adam on the source classes (jitted scan)."""
    k = int(ys.max()) + 1
    net = network(cfg, k)
    key = jax.random.PRNGKey(cfg.data_seed)
    params = net.init(key, jnp.zeros((1, *xs.shape[1:])))["params"]
    opt = optax.adam(cfg.teacher_lr)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)

    def step(carry, key):
        params, opt_state = carry
        k_idx, k_drop = jax.random.split(key)
        idx = jax.random.randint(k_idx, (cfg.teacher_batch,), 0, xs.shape[0])
        g = jax.grad(loss_fn)(params, xs[idx], ys[idx], k_drop, cfg, k)
        upd, opt_state = opt.update(g, opt_state)
        return (optax.apply_updates(params, upd), opt_state), None

    keys = jax.random.split(jax.random.fold_in(key, 1), cfg.teacher_steps)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, opt.init(params)))
    return jax.jit(lambda x: net.apply({"params": params}, x)[1])  # penultimate features


def svm_scores(feats, y, seed: int = 0):
    """s_i = P(y_i | phi(x_i)) of an RBF SVM with Platt probabilities (libsvm's pairwise
    coupling), fit on the target training set itself: the released transfer_learning.py's
    SVC(probability=True), with gamma 'auto' (1 / n_features, the default of the
    scikit-learn it pinned). scikit-learn 1.9 deprecates `probability` for a one-vs-rest
    calibration that orders the examples differently (Spearman 0.74 on the quick features):
    the released form is kept, its warning silenced."""
    import warnings

    from sklearn.svm import SVC

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        clf = SVC(gamma="auto", probability=True, random_state=seed).fit(feats, y)
        proba = clf.predict_proba(feats)
    return proba[np.arange(len(y)), np.searchsorted(clf.classes_, y)]


@functools.cache
def teacher_features(cfg: Config) -> np.ndarray:
    """phi(x_i) of every target training image: the teacher's penultimate features."""
    x, _, _, _, xs, ys = datasets(cfg)
    with jax.ensure_compile_time_eval():  # runs now, on the host, even inside a traced init
        feats = train_teacher(cfg, xs, ys)
        f = np.concatenate([np.asarray(feats(x[i:i + 1024])) for i in range(0, len(x), 1024)])
    return f.astype(np.float64)


@functools.cache
def difficulty_scores(cfg: Config) -> np.ndarray:
    """Per training example, higher = easier: the SVM confidence on the teacher's features,
    or minus the optimal hypothesis' squared loss (linear toy)."""
    x, y, _, _, extra, _ = datasets(cfg)
    if cfg.dataset == "linear":
        return -((x @ extra - y) ** 2)
    return svm_scores(teacher_features(cfg), y, cfg.data_seed)


def balance_order(order, y):
    """[2]'s balance_order: group g = the g-th easiest example of every class, kept in the
    order's sequence; groups follow each other (a class that runs out leaves later groups)."""
    rank_in_class = np.zeros(len(order), int)
    seen: dict[int, int] = {}
    for p, i in enumerate(order):
        rank_in_class[p] = seen.get(int(y[i]), 0)
        seen[int(y[i])] = rank_in_class[p] + 1
    return order[np.lexsort((np.arange(len(order)), rank_in_class))]


def curriculum_order(cfg: Config) -> np.ndarray:
    """Training indices, easiest first (balanced by class for classification)."""
    scores = difficulty_scores(cfg)
    order = np.argsort(-scores, kind="stable")
    if cfg.balance and cfg.dataset != "linear":
        order = balance_order(order, datasets(cfg)[1])
    return order


# --- PACING AND SCHEDULES ---


def pacing(step, n: int, cfg: Config):
    """n_t = ceil(N min(1, p0 a^floor(t / T))): how many of the ordered examples are open."""
    frac = cfg.starting_percent * cfg.increase_amount ** (step // cfg.batch_increase)
    return jnp.ceil(n * jnp.minimum(frac, 1.0) - 1e-6).astype(jnp.int32)


def learning_rates(step, cfg: Config):
    """lr_t per arm: max(lr / decay^floor(t / interval), minimal_lr) ([2]'s step decay)."""
    lr, rate = jnp.asarray(cfg.lr), jnp.asarray(cfg.lr_decay_rate)
    decays = step // jnp.asarray(cfg.lr_batch_size)
    return jnp.maximum(lr / rate ** decays, cfg.minimal_lr)


def sample_batch(u, rank, n_open, batch: int):
    """B distinct indices drawn uniformly from the examples whose rank < n_open: the B
    smallest of the shared uniforms u among the open ones."""
    return jax.lax.top_k(-jnp.where(rank < n_open, u, jnp.inf), batch)[1]


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # every leaf leads with the arm axis (len(ARMS), ...)
    ranks: jax.Array  # (arms, N): position of each example in the arm's order
    step: jax.Array
    key: jax.Array
    data: tuple  # (x, y, x_test, y_test) on the device: an input of the compiled chunks


def num_classes(cfg: Config) -> int:
    return 1 if cfg.dataset == "linear" else len(cfg.target_classes)


def init(key, cfg: Config) -> State:
    """Same initial weights for every arm; curriculum/anti from the teacher's scores, random
    a fresh permutation per seed, vanilla any order (it never paces)."""
    x, y, xt, yt, _, _ = datasets(cfg)
    k_net, k_perm, key = jax.random.split(key, 3)
    params = network(cfg, num_classes(cfg)).init(k_net, jnp.zeros((1, *x.shape[1:])))["params"]
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(ARMS), *p.shape)), params)
    order = jnp.asarray(curriculum_order(cfg))
    orders = jnp.stack([order, order[::-1], jax.random.permutation(k_perm, len(y)), order])
    ranks = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(len(o))))(orders)
    data_ = tuple(jnp.asarray(a) for a in (x, y, xt, yt))
    return State(params, ranks.astype(jnp.int32), jnp.zeros((), jnp.int32), key, data_)


# --- UPDATE ---


def test_metric(params, data_, cfg: Config):
    """Per arm: test accuracy (images) or test MSE against the noise-free targets (toy)."""
    _, _, xt, yt = data_
    net = network(cfg, num_classes(cfg))
    out = jax.vmap(lambda p: net.apply({"params": p}, xt))(params)
    if cfg.dataset == "linear":
        return jnp.mean((out[..., 0] - yt) ** 2, -1)
    return jnp.mean(jnp.argmax(out[0], -1) == yt, -1)


def update(state: State, cfg: Config):
    """eval_every SGD steps of every arm (one shared uniform draw and dropout key per step),
    then the test metric of each."""
    x, y, _, _ = state.data
    n, k = y.shape[0], num_classes(cfg)
    paced = jnp.array([True, True, True, False])  # ARMS order: vanilla never paces

    def arm_step(params, rank, paced, lr, u, key, n_open):
        idx = sample_batch(u, rank, jnp.where(paced, n_open, n), cfg.batch_size)
        loss, g = jax.value_and_grad(loss_fn)(params, x[idx], y[idx], key, cfg, k)
        return jax.tree.map(lambda p, gi: p - lr * gi.astype(p.dtype), params, g), loss

    def step(carry, _):
        params, t, key = carry
        key, k_u, k_drop = jax.random.split(key, 3)
        u = jax.random.uniform(k_u, (n,))
        params, loss = jax.vmap(arm_step, (0, 0, 0, 0, None, None, None))(
            params, state.ranks, paced, learning_rates(t, cfg), u, k_drop, pacing(t, n, cfg))
        return (params, t + 1, key), loss

    (params, t, key), loss = jax.lax.scan(step, (state.params, state.step, state.key), None,
                                          cfg.eval_every)
    test = test_metric(params, state.data, cfg)
    name = "test_mse" if cfg.dataset == "linear" else "test_acc"
    metrics = {"charts/open_fraction": pacing(t - 1, n, cfg) / n}
    for a, arm in enumerate(ARMS):
        metrics[f"losses/train_loss_{arm}"] = loss[:, a].mean()
        metrics[f"charts/{name}_{arm}"] = test[a]
        metrics[f"charts/lr_{arm}"] = learning_rates(t - 1, cfg)[a]
    return state.replace(params=params, step=t, key=key), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """Final test metric per arm and the curriculum's gain over vanilla and anti."""
    test = test_metric(state.params, state.data, cfg)
    name = "test_mse" if cfg.dataset == "linear" else "test_acc"
    out = {f"{name}_{arm}": test[a] for a, arm in enumerate(ARMS)}
    sign = -1.0 if cfg.dataset == "linear" else 1.0
    out["gain_vs_vanilla"] = sign * (test[0] - test[3])
    out["gain_vs_anti"] = sign * (test[0] - test[1])
    return out


# --- PLOT ---


def plot_arms(run_dir, out):
    """Test metric against SGD steps per arm (mean over seeds, seeds faint), [1] Fig. 2's view,
    with the open share of the ordered data on a second axis."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    name = "test_mse" if c["dataset"] == "linear" else "test_acc"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, col in zip(ARMS, ("C0", "C3", "C2", "k"), strict=True):
        _, yv, _ = plot.curve(rows, f"charts/{name}_{arm}")
        steps = np.arange(1, len(yv) + 1) * c["eval_every"]
        ax.plot(steps, yv, color=col, alpha=0.2, lw=0.8)
        ax.plot(steps, yv.mean(1), color=col, label=f"{arm} (final {yv[-1].mean():.3f})")
    _, frac, _ = plot.curve(rows, "charts/open_fraction")
    ax2 = ax.twinx()
    ax2.plot(steps, frac.mean(1), "k:", lw=1)
    ax2.set_ylabel("share of ordered data open (dotted)")
    ax.set(xlabel="SGD steps", ylabel=name.replace("_", " "),
           title=f"curriculum by transfer, {c['dataset']}, {yv.shape[1]} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if name == "test_acc" else "upper right")
    fig.tight_layout()
    return plot.save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the four arms' test curves."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__)
    if flags["--plot"] is not None:
        print(plot_arms(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
