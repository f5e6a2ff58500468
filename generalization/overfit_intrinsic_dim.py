"""Intrinsic dimension of objective landscapes: training in a random d-dimensional subspace.

[1] C. Li, H. Farkhoor, R. Liu, J. Yosinski. "Measuring the Intrinsic Dimension of Objective
    Landscapes." ICLR 2018, arXiv:1804.08838. Released code: uber-research/intrinsic-dimension
    (commit 9754ebe): keras_ext/rproj_layers_util.py (projections), intrinsic_dim/train.py.
[2] Q. Le, T. Sarlos, A. Smola. "Fastfood: Approximating Kernel Expansions in Loglinear
    Time." ICML 2013, arXiv:1408.3060.
[3] P. Li, T. Hastie, K. Church. "Very Sparse Random Projections." KDD 2006.

Subspace training ([1] Sec. 2, Eq. 1): only theta_d is trained,
    theta^(D) = theta_0^(D) + P theta^(d),  P in R^{D x d} random and fixed,         (1)
    theta_0 the network's usual random init (frozen), theta^(d) = 0 at the start, so the
    network starts exactly at theta_0. P's columns have unit norm ([1] Sec. 2), in three forms:
    dense     P_ij ~ N(0, 1), each column divided by its norm                   ([1], code)
    sparse    [3]'s very sparse projection: density s = 1/sqrt(D), entries +-1/sqrt(k) at
              the k = round(s D) non-zero rows of a column (unit norm exactly)
    fastfood  [2]: P x = (H G Pi H B pad_L(x))[:D] / (||G|| sqrt(L) sqrt(D / L)),     (FF)
              L = 2^ceil(log2 D), H the L x L Walsh-Hadamard matrix (unnormalised, applied
              by the fast transform fwht in O(L log L)), B diagonal +-1, Pi a permutation,
              G diagonal N(0, 1); no D x d matrix is stored. Every column of H G Pi H B has
              norm exactly ||G|| sqrt(L), so the columns of P have norm ~1 (released code).
Intrinsic dimension ([1] Sec. 2): d_int90 = the smallest d on the grid whose test accuracy
reaches 90% of the baseline's, the baseline being the same network trained directly
(d = D, P = I) from the same theta_0 on the same minibatches. [1]'s MNIST numbers (750,
290) draw the line at a fixed accuracy of 0.90 instead (the released notebook
plots/main_plots.ipynb calls compt_dim_int(..., baseline=1.0)): --threshold-abs 0.9, which
the paper preset sets.

Design: one runner update is one epoch. The sweep over d is one vmapped program: every arm
k holds a theta_d of the largest size d_max = max(dims) and its own independent P (D x d_max;
dense / sparse: stored, fastfood: B, Pi, G only) and uses theta_d * m_k with the mask
m_k = [i < d_k], so arm k trains exactly the first d_k columns of its P (the other
coordinates get zero gradient and, under Adam from zero state, never move). All arms and the
direct baseline share theta_0 and the minibatch order.

Reproduce (CPU, scikit-learn's 8x8 digits, FC 64-64-10, D = 4,810; --plot draws [1] Fig. 3):
    python generalization/overfit_intrinsic_dim.py --preset quick --num-seeds 2 \\
        --plot generalization/overfit_intrinsic_dim.png
    ... --projection sparse / --projection fastfood   (same curve, other P)
Paper setting (GPU; MNIST idx files in --data-dir; FC 784-200-200-10, D = 199,210, Fastfood):
    python generalization/overfit_intrinsic_dim.py --preset paper --data-dir ~/mnist
    ... --preset paper --network lenet --dims 10 50 100 200 250 300 350 400 500 750 1000
[1]'s numbers (Sec. 3.1, Table 1): MNIST FC 784-200-200-10 (D = 199,210): d_int90 = 750,
baseline ~98% test accuracy (released notebook: 0.980, 3 runs per d; the line is the fixed
0.90, and d_int90 over 100 bootstraps of the runs is 725-900, mean 786); with 90% of the
baseline (0.883) the same data give 625. MNIST LeNet (D = 44,426): d_int90 = 290 (same
fixed 0.90 line); CIFAR-10 FC 9,000, LeNet 2,900 (the post quotes the CIFAR-10 pair).
Widths and depths of the FC net barely move d_int90 ([1] Fig. 4).
Measured (quick preset, 2 seeds, dense P, 2.7 min wall / 45 CPU s on a loaded 2-core CPU):
direct (D = 4,810) test accuracy 0.980 / 0.977, 90% line ~0.88; subspace, mean of 2 seeds:
d = 5: 0.115, 10: 0.221, 20: 0.269, 40: 0.549, 80: 0.792, 160: 0.862, 320: 0.947,
640: 0.961 -> d_int90 = 320 for both seeds (6.7% of D; the catalogue's full-batch run also
found (160, 320]). The three P agree (tests' tiny setting, FC 64-32-10, D = 2,410, 20
epochs, 2 seeds; accuracy at d = 256): dense 0.888 / 0.898, sparse 0.896 / 0.922, fastfood
0.908 / 0.911, d_int90 = 256 for all. The paper preset was traced (eval_shape), not run.

Logged each update (epoch): losses/train_direct and losses/train_d<d> (mean minibatch
cross-entropy), charts/test_acc_direct and charts/test_acc_d<d> (test accuracy at the end of
the epoch), charts/d_int90 (NaN by design while no d on the grid reaches the line;
charts/d_int90_reached is 1 once one does) and charts/num_params (D); with
--d-int-on train also charts/train_acc_direct and charts/train_acc_d<d> (the training set
against its own labels), which d_int90 then uses.

Random labels (--label-corruption 1: every training label replaced by a uniform class,
once per seed; the test labels stay true): test accuracy is chance at every d, so d_int90
is measured on TRAINING accuracy (--d-int-on train), as the released code's shuffled-label
MNIST runs do (scripts/more/loop_d_mnist_permuted_label_fnn_wd.sh: 500 epochs, d up to
300,000; [1]'s shuffled-label numbers are not quoted here: the paper text was not at hand).

Differences from the paper:
- Data: MNIST does not ship offline; the CPU presets use scikit-learn's 1,797 8x8 digits
  (1,000 train / 797 test; pixels / 16), upsampled bilinearly (--image-size) for LeNet.
  MNIST via --data-dir (60K / 10K, pixels / 255). [1] reports validation = test accuracy.
- One P draw per arm and seed, one theta_0 per seed shared by all arms ([1]: a run per d).
- Sparse: exactly k = round(D / sqrt(D)) non-zeros per column, one in each of k equal
  strata of the rows (a uniform position inside each), signs +-1; the released code uses
  scikit-learn's SparseRandomProjection (each entry non-zero independently with
  probability 1/sqrt(D)) and then normalises the columns: same density and unit norms,
  a Binomial instead of a fixed count per column.
- Fastfood: one H G Pi H B block of size L as in the released code (no S matrix of [2]).
- Optimiser: the released defaults, Adam lr 1e-3, beta1 0.9, beta2 0.99
  (standard_parser.py), batch 128, 100 epochs, L2 1e-4 on the kernels of the full network
  theta_0 + P theta_d (the MNIST runs behind the figures, scripts/more/loop_d_mnist_lenet.sh
  and loop_d_mnist_fnn_wd.sh: --l2 0.0001, Keras' l2 regulariser, biases not decayed).
  He-normal weights and zero biases as the released models (flax's truncated normal,
  rescaled to the exact variance).
- An epoch is num_train // batch_size steps: the last partial batch is dropped (MNIST: 468
  steps of 128, 96 images unused per epoch; Keras' fit also steps on the 96).
- The line is reached at accuracy >= line (the notebook: > line).
- Label corruption draws a uniform class per label with probability p (Zhang et al.
  2017); the released runs shuffle the labels (a permutation, the class histogram kept).
- The quick preset uses Adam lr 1e-2 (digits epochs are 7 steps: 100 epochs is 700 steps)
  and no L2 (its measured numbers above); its d_int90 is the relative 90% definition.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from common import data, run
from common.plot import save_png

NUM_CLASSES = 10
PROJECTIONS = ("dense", "sparse", "fastfood")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Subspace training of [1]; optimiser defaults are the released code's."""

    dataset: str = "digits"
    """'digits' (scikit-learn's 8x8 digits, in the wheel) or 'mnist' (idx files, --data-dir)"""
    data_dir: str = ""
    """folder holding MNIST's idx files (train-images-idx3-ubyte[.gz], ...)"""
    image_size: int = 8
    """digits only: side the 8x8 digits are upsampled to (bilinear); MNIST is 28"""
    num_train: int = 1000
    """training images (digits: of the 1,797; mnist: the first of the 60,000)"""
    num_test: int = 797
    """test images (digits: the rest; mnist: the first of the 10,000)"""
    network: str = "fc"
    """'fc' (ReLU MLP of `hidden` widths, [1] Sec. 3.1) or 'lenet' (conv 6-16, fc 120-84)"""
    hidden: tuple[int, ...] = (200, 200)
    """hidden widths of the fc network ([1]: 784-200-200-10)"""
    projection: str = "dense"
    """random basis P: 'dense', 'sparse' ([3], density 1/sqrt(D)) or 'fastfood' ([2])"""
    dims: tuple[int, ...] = (10, 50, 100, 200, 300, 400, 500, 600, 700, 750, 800, 900,
                             1000, 1250, 1500)
    """the subspace dimensions d swept (strictly increasing, each < D): one vmapped arm each
    (default: the released notebook's MNIST FC grid, thinned)"""
    threshold_fraction: float = 0.9
    """d_int is the smallest d reaching this fraction of the direct baseline's accuracy"""
    threshold_abs: float = 0.0
    """if > 0, a fixed accuracy line replacing threshold_fraction x baseline ([1]'s MNIST
    numbers: 0.90, the released notebook's baseline=1.0); 0: the relative definition"""
    lr: float = 1e-3
    """Adam learning rate, subspace arms and baseline alike (released: 1e-3)"""
    adam_b2: float = 0.99
    """Adam beta2 (released standard_parser.py: 0.99)"""
    l2: float = 1e-4
    """L2 coefficient: loss += l2 * sum of squared kernel weights (not biases) of the full
    network, theta_0 + P theta_d for the arms (released MNIST runs: --l2 0.0001)"""
    batch_size: int = 128
    """images per Adam step (released: 128)"""
    num_epochs: int = 100
    """epochs of training (released scripts: -E 100); one runner update per epoch"""
    label_corruption: float = 0.0
    """probability that each training label is replaced by a class drawn uniformly from
    all 10 (Zhang et al. 2017; 1: random labels), drawn once per seed at init; the test
    labels stay true"""
    d_int_on: str = "test"
    """the accuracy d_int90 is measured on: 'test' ([1] Sec. 3) or 'train' (the training
    set against its own, possibly corrupted, labels: [1]'s shuffled-label runs)"""
    dtype: str = "float32"
    """compute dtype of the network's layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_epochs

    @property
    def steps_per_update(self) -> int:
        return self.num_train // self.batch_size

    @property
    def side(self) -> int:
        return self.image_size if self.dataset == "digits" else 28

    @property
    def num_params(self) -> int:
        """D: the network's parameter count (checked against ravel_pytree in the tests)."""
        if self.network == "fc":
            sizes = (self.side ** 2, *self.hidden, NUM_CLASSES)
            return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        flat = (((self.side - 4) // 2 - 4) // 2) ** 2 * 16
        sizes = (flat, 120, 84, NUM_CLASSES)
        return (25 * 6 + 6 + 25 * 6 * 16 + 16
                + sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True)))

    def validate(self):
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size} must be >= 1")
        if self.dataset not in ("digits", "mnist"):
            raise ValueError(f"dataset={self.dataset!r} must be 'digits' or 'mnist'")
        if self.dataset == "mnist" and not self.data_dir:
            raise ValueError("dataset='mnist' needs --data-dir (MNIST's idx files)")
        if self.dataset == "digits" and self.num_train + self.num_test > 1797:
            raise ValueError(f"num_train + num_test = {self.num_train + self.num_test} "
                             "exceeds the 1,797 digits")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if self.network not in ("fc", "lenet"):
            raise ValueError(f"network={self.network!r} must be 'fc' or 'lenet'")
        if self.network == "fc" and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"hidden={self.hidden} must be one or more widths >= 1")
        if self.network == "lenet" and self.side < 16:
            raise ValueError(f"image_size={self.side} must be >= 16 for lenet (two 5x5 "
                             "valid convolutions and two 2x2 poolings)")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection={self.projection!r} must be one of {PROJECTIONS}")
        if not self.dims or min(self.dims) < 1 or list(self.dims) != sorted(set(self.dims)):
            raise ValueError(f"dims={self.dims} must be strictly increasing and >= 1")
        if max(self.dims) >= self.num_params:
            raise ValueError(f"dims={self.dims}: every d must be < D = {self.num_params}")
        if not 0 < self.threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction={self.threshold_fraction} must be in (0, 1]")
        if not 0 <= self.threshold_abs <= 1:
            raise ValueError(f"threshold_abs={self.threshold_abs} must be in [0, 1] (0: off)")
        if not 0 <= self.adam_b2 < 1:
            raise ValueError(f"adam_b2={self.adam_b2} must be in [0, 1)")
        if self.l2 < 0:
            raise ValueError(f"l2={self.l2} must be >= 0")
        if not 0 <= self.label_corruption <= 1:
            raise ValueError(f"label_corruption={self.label_corruption} must be in [0, 1]")
        if self.d_int_on not in ("test", "train"):
            raise ValueError(f"d_int_on={self.d_int_on!r} must be 'test' or 'train'")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 8x8 digits, FC 64-64-10 (one hidden layer, D = 4,810), dense P, Adam 1e-2,
    # no L2, 100 epochs of 7 steps, d_int90 relative to the baseline.
    "quick": dict(hidden=(64,), dims=(5, 10, 20, 40, 80, 160, 320, 640), lr=1e-2, l2=0.0),
    # [1] Sec. 3.1: MNIST, FC 784-200-200-10 (D = 199,210), Adam 1e-3, batch 128, 100 epochs,
    # L2 1e-4, the fixed 0.90 line. Fastfood is a choice, the released runs' --fastfoodproj
    # (dense P for 15 arms: 15 x 199,210 x 1,500 x 4 B = 17.9 GB, would fit an 80 GB GPU).
    "paper": dict(dataset="mnist", num_train=60000, num_test=10000, projection="fastfood",
                  threshold_abs=0.9),
}


# --- DATA ---


def arrays(cfg: Config):
    """(train_x (n, s, s, 1) float32 in [0, 1], train_y int32, test_x, test_y), numpy."""
    if cfg.dataset == "digits":
        tr_x, tr_y, te_x, te_y = data.digit_images(cfg.image_size, cfg.num_train)
    else:
        tr_x, tr_y, te_x, te_y = data.load_mnist(cfg.data_dir)
        tr_x, te_x = (x[..., None] / np.float32(255) for x in (tr_x, te_x))
    if cfg.num_train > len(tr_y) or cfg.num_test > len(te_y):
        raise ValueError(f"num_train / num_test exceed the {len(tr_y)} / {len(te_y)} images")
    return (tr_x[:cfg.num_train].astype(np.float32), tr_y[:cfg.num_train].astype(np.int32),
            te_x[:cfg.num_test].astype(np.float32), te_y[:cfg.num_test].astype(np.int32))


def dataset(cfg: Config):
    """The arrays as jnp behind an optimisation barrier (no constant folding)."""
    return jax.lax.optimization_barrier(tuple(jnp.asarray(a) for a in arrays(cfg)))


def corrupt_labels(key, y, p):
    """Each label replaced, with probability p, by a class drawn uniformly from all
    NUM_CLASSES (so it may stay right by chance; Zhang et al. 2017 Sec. 2)."""
    u_mask, u_class = jax.random.uniform(key, (2, *y.shape))
    new = jnp.minimum(jnp.floor(u_class * NUM_CLASSES), NUM_CLASSES - 1).astype(y.dtype)
    return jnp.where(u_mask < p, new, y)


def train_labels(key, cfg: Config):
    """(n,) the training labels of one seed, fixed at init: the true ones, corrupted with
    probability label_corruption."""
    y = jax.lax.optimization_barrier(jnp.asarray(arrays(cfg)[1]))
    return corrupt_labels(key, y, cfg.label_corruption).astype(jnp.int32)


# --- NETWORKS ---


class FC(nn.Module):
    """[1]'s FC network: ReLU hidden layers, linear output, He-normal weights."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)  # (B, s*s)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.he_normal(),
                                 dtype=self.dtype)(x))
        return nn.Dense(NUM_CLASSES, kernel_init=nn.initializers.he_normal(),
                        dtype=self.dtype)(x).astype(jnp.float32)


class LeNet(nn.Module):
    """[1]'s LeNet (released build_LeNet_mnist): conv 5x5x6, pool, conv 5x5x16, pool,
    fc 120, 84, 10 (valid convolutions, ReLU, He-normal weights)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.he_normal()
        for c in (6, 16):
            x = nn.relu(nn.Conv(c, (5, 5), padding="VALID", kernel_init=init,
                                dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)  # (B, s' * s' * 16)
        for width in (120, 84):
            x = nn.relu(nn.Dense(width, kernel_init=init, dtype=self.dtype)(x))
        return nn.Dense(NUM_CLASSES, kernel_init=init, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> nn.Module:
    dtype = jnp.dtype(cfg.dtype)
    return FC(cfg.hidden, dtype) if cfg.network == "fc" else LeNet(dtype)


def init_params(key, cfg: Config):
    """theta_0 as one flat vector (D,) and the function back to the network's pytree."""
    return ravel_pytree(network(cfg).init(key, jnp.zeros((1, cfg.side, cfg.side, 1)))["params"])


def unraveler(cfg: Config):
    """The flat vector (D,) -> the network's parameter pytree (no initialiser is run)."""
    x = jnp.zeros((1, cfg.side, cfg.side, 1))
    shapes = jax.eval_shape(lambda k: network(cfg).init(k, x)["params"], jax.random.PRNGKey(0))
    return ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))[1]


# --- PROJECTIONS ---


def fwht(x):
    """Fast Walsh-Hadamard transform along the last axis (length L = 2^n, unnormalised):
    H x with H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]] (Sylvester); n butterfly stages."""
    L = x.shape[-1]
    h = 1
    while h < L:
        y = x.reshape(*x.shape[:-1], L // (2 * h), 2, h)  # pairs (i, i + h) in blocks of 2h
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape[:-1], L)
        h *= 2
    return x


def sparse_count(D: int) -> int:
    """k: non-zeros per column at [3]'s density 1/sqrt(D)."""
    return max(1, round(D / np.sqrt(D)))


def dense_matrix(key, D: int, d: int):
    """Dense P (D, d): N(0, 1) entries, each column scaled to unit norm ([1] Sec. 2)."""
    p = jax.random.normal(key, (D, d))
    return p / jnp.linalg.norm(p, axis=0, keepdims=True)


def make_projection(key, kind: str, D: int, d: int) -> dict:
    """The fixed random basis P (D, d) of one arm, in the form `project` applies."""
    if kind == "dense":
        return {"P": dense_matrix(key, D, d)}
    if kind == "sparse":
        k = sparse_count(D)
        k_pos, k_sign = jax.random.split(key)
        lo = jnp.arange(k) * D // k  # k strata [lo_s, hi_s) of the D rows
        hi = (jnp.arange(k) + 1) * D // k
        u = jax.random.uniform(k_pos, (d, k))
        rows = (lo + jnp.floor(u * (hi - lo))).astype(jnp.int32)  # (d, k) distinct per column
        signs = jax.random.rademacher(k_sign, (d, k), jnp.float32)
        return {"rows": rows, "values": signs / np.sqrt(k)}  # ||column|| = 1 exactly
    L = 1 << int(np.ceil(np.log2(D)))
    k_b, k_pi, k_g = jax.random.split(key, 3)
    return {"B": jax.random.rademacher(k_b, (L,), jnp.float32),
            "Pi": jax.random.permutation(k_pi, L),
            "G": jax.random.normal(k_g, (L,))}


def project(proj: dict, theta_d, kind: str, D: int):
    """P theta_d (D,) for one arm; theta_d (d,)."""
    if kind == "dense":
        return proj["P"] @ theta_d
    if kind == "sparse":
        return jnp.zeros(D).at[proj["rows"]].add(proj["values"] * theta_d[:, None])
    B, Pi, G = proj["B"], proj["Pi"], proj["G"]
    L = B.shape[0]
    x = jnp.zeros(L).at[:theta_d.shape[0]].set(theta_d)  # pad_L(theta_d)
    v = fwht(G * fwht(B * x)[Pi])[:D]  # (FF) H G Pi H B x, first D rows
    return v / (jnp.sqrt(L * jnp.sum(G ** 2)) * np.sqrt(D / L))


def masks(cfg: Config):
    """(K, d_max): arm k uses the first dims[k] coordinates of theta_d."""
    return (jnp.arange(max(cfg.dims)) < jnp.array(cfg.dims)[:, None]).astype(jnp.float32)


def subspace_theta(theta0, proj, theta_d, mask, cfg: Config):
    """(1) theta = theta_0 + P (m * theta_d); theta_0 and P are constants of the state, so the
    gradient of the loss flows only into theta_d (and only its first d coordinates)."""
    return theta0 + project(proj, theta_d * mask, cfg.projection, cfg.num_params)


# --- STATE ---


@struct.dataclass
class State:
    theta0: jax.Array  # (D,) the frozen random init
    proj: Any  # (K, ...) each arm's random basis
    theta_d: jax.Array  # (K, d_max) trained subspace coordinates, 0 at the start
    opt_d: Any
    theta: jax.Array  # (D,) the direct baseline (d = D), starts at theta0
    opt: Any
    acc: jax.Array  # (K,) test accuracy of the arms at the end of the last epoch
    acc_direct: jax.Array
    key: jax.Array
    train_y: jax.Array  # (n,) training labels (corrupted with prob. label_corruption)
    train_acc: jax.Array  # (K,) train accuracy (d_int_on='train' only; else 0)
    train_acc_direct: jax.Array


def optimizer(cfg: Config):
    return optax.adam(cfg.lr, b2=cfg.adam_b2)


def init(key, cfg: Config) -> State:
    k_net, k_proj, key = jax.random.split(key, 3)
    theta0, _ = init_params(k_net, cfg)
    proj = jax.vmap(lambda k: make_projection(k, cfg.projection, cfg.num_params, max(cfg.dims)))(
        jax.random.split(k_proj, len(cfg.dims)))
    theta_d = jnp.zeros((len(cfg.dims), max(cfg.dims)))
    tx = optimizer(cfg)
    zeros = jnp.zeros(len(cfg.dims))
    y = train_labels(jax.random.fold_in(key, 1), cfg)  # fold_in: the other draws unchanged
    return State(theta0, proj, theta_d, tx.init(theta_d), theta0, tx.init(theta0), zeros,
                 jnp.zeros(()), key, y, zeros, jnp.zeros(()))


# --- UPDATE ---


def kernel_mask(cfg: Config):
    """(D,) 1 on the kernel (weight) entries of the flat vector, 0 on the biases (numpy)."""
    x = jnp.zeros((1, cfg.side, cfg.side, 1))
    shapes = jax.eval_shape(lambda k: network(cfg).init(k, x)["params"], jax.random.PRNGKey(0))
    ones = jax.tree_util.tree_map_with_path(
        lambda path, s: np.full(s.shape, float(path[-1].key == "kernel"), np.float32), shapes)
    return np.concatenate([a.ravel() for a in jax.tree.leaves(ones)])


def loss_fn(theta, unravel, x, y, cfg: Config):
    """Mean cross-entropy, plus l2 * sum of the squared kernel weights (the released Keras
    l2 regulariser; 0 when cfg.l2 = 0). Returns (loss, cross-entropy)."""
    logits = network(cfg).apply({"params": unravel(theta)}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if cfg.l2 == 0:
        return ce, ce
    return ce + cfg.l2 * jnp.sum(kernel_mask(cfg) * theta ** 2), ce


def accuracy(theta, unravel, x, y, cfg: Config):
    return jnp.mean(jnp.argmax(network(cfg).apply({"params": unravel(theta)}, x), -1) == y)


def threshold(acc_direct, cfg: Config):
    """The accuracy line: threshold_abs when > 0 ([1]'s MNIST numbers: 0.90), else
    threshold_fraction x the direct baseline's accuracy."""
    return cfg.threshold_abs if cfg.threshold_abs > 0 else cfg.threshold_fraction * acc_direct


def d_int(acc, acc_direct, cfg: Config):
    """d_int90 ([1] Sec. 2): the smallest d with acc_d >= the line (`threshold`); reached or
    not (then d_int is 0, logged as NaN)."""
    ok = acc >= threshold(acc_direct, cfg)
    first = jnp.min(jnp.where(ok, jnp.array(cfg.dims, jnp.float32), jnp.inf))
    return jnp.where(ok.any(), first, 0.0), ok.any()


def update(state: State, cfg: Config):
    """One epoch of Adam on every arm's theta_d and on the direct baseline, then test."""
    tr_x, _, te_x, te_y = dataset(cfg)
    tr_y = state.train_y
    unravel = unraveler(cfg)
    tx, m = optimizer(cfg), masks(cfg)
    key, k_perm = jax.random.split(state.key)
    n_steps, b = cfg.steps_per_update, cfg.batch_size
    order = jax.random.permutation(k_perm, cfg.num_train)[:n_steps * b].reshape(n_steps, b)

    def arm_loss(theta_d, proj, mask, x, y):
        return loss_fn(subspace_theta(state.theta0, proj, theta_d, mask, cfg), unravel, x, y,
                       cfg)

    def step(carry, idx):
        theta_d, opt_d, theta, opt = carry
        x, y = tr_x[idx], tr_y[idx]
        (_, loss_d), g_d = jax.vmap(jax.value_and_grad(arm_loss, has_aux=True),
                                    (0, 0, 0, None, None))(theta_d, state.proj, m, x, y)
        upd, opt_d = tx.update(g_d, opt_d, theta_d)
        theta_d = optax.apply_updates(theta_d, upd)
        (_, loss), g = jax.value_and_grad(loss_fn, has_aux=True)(theta, unravel, x, y, cfg)
        upd, opt = tx.update(g, opt, theta)
        return (theta_d, opt_d, optax.apply_updates(theta, upd), opt), (loss_d, loss)

    (theta_d, opt_d, theta, opt), (loss_d, loss) = jax.lax.scan(
        step, (state.theta_d, state.opt_d, state.theta, state.opt), order)
    def accuracies(x, y):
        arms = jax.vmap(lambda td, p, mk: accuracy(subspace_theta(
            state.theta0, p, td, mk, cfg), unravel, x, y, cfg))(theta_d, state.proj, m)
        return arms, accuracy(theta, unravel, x, y, cfg)

    acc, acc_direct = accuracies(te_x, te_y)
    train_acc, train_acc_direct = state.train_acc, state.train_acc_direct
    if cfg.d_int_on == "train":
        train_acc, train_acc_direct = accuracies(tr_x, tr_y)
    state = state.replace(theta_d=theta_d, opt_d=opt_d, theta=theta, opt=opt, acc=acc,
                          acc_direct=acc_direct, key=key, train_acc=train_acc,
                          train_acc_direct=train_acc_direct)
    d90, reached = d_int(*measured(state, cfg), cfg)
    metrics = {"losses/train_direct": loss.mean(), "charts/test_acc_direct": acc_direct,
               "charts/d_int90": d90, "charts/d_int90_reached": reached.astype(jnp.float32),
               "charts/num_params": jnp.float32(cfg.num_params)}
    for i, d in enumerate(cfg.dims):
        metrics[f"losses/train_d{d}"] = loss_d[:, i].mean()
        metrics[f"charts/test_acc_d{d}"] = acc[i]
    if cfg.d_int_on == "train":
        metrics["charts/train_acc_direct"] = train_acc_direct
        metrics.update({f"charts/train_acc_d{d}": train_acc[i] for i, d in enumerate(cfg.dims)})
    return state, metrics


def measured(state: State, cfg: Config):
    """(arms' accuracies, the direct baseline's) on the set d_int90 is measured on."""
    if cfg.d_int_on == "train":
        return state.train_acc, state.train_acc_direct
    return state.acc, state.acc_direct


def evaluate(state: State, cfg: Config):
    """Test accuracies after the last epoch, the baseline's and every d's, and d_int90 (0
    when no d reached the threshold); with d_int_on='train' also the train accuracies."""
    d90, _ = d_int(*measured(state, cfg), cfg)
    out = {"test_acc_direct": state.acc_direct, "d_int90": d90}
    out.update({f"test_acc_d{d}": state.acc[i] for i, d in enumerate(cfg.dims)})
    if cfg.d_int_on == "train":
        out["train_acc_direct"] = state.train_acc_direct
        out.update({f"train_acc_d{d}": state.train_acc[i] for i, d in enumerate(cfg.dims)})
    return out


# --- PLOT ---


def plot(result, cfg: Config, out: str):
    """[1] Fig. 3: test accuracy against d (log axis; per seed and the mean), the direct
    baseline and the 90% line, d_int90 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = result.final
    on = cfg.d_int_on  # the accuracy d_int90 is measured on
    acc = np.stack([f[f"{on}_acc_d{d}"] for d in cfg.dims], 1)  # (seeds, K)
    base = f[f"{on}_acc_direct"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in range(acc.shape[0]):
        ax.plot(cfg.dims, acc[s], "o", ms=3, c="C0", alpha=0.4)
    ax.plot(cfg.dims, acc.mean(0), "-", c="C0", label=f"subspace ({cfg.projection} P)")
    ax.axhline(base.mean(), c="k", lw=1, label=f"direct, D = {cfg.num_params:,}: "
               f"{base.mean():.3f}")
    ax.axhline(threshold(base.mean(), cfg), c="k", ls="--", lw=1,
               label=f"line {cfg.threshold_abs:.2f}" if cfg.threshold_abs > 0
               else f"{cfg.threshold_fraction:.0%} of direct")
    d90 = f["d_int90"]
    if (d90 > 0).all():
        per_seed = ", ".join(str(int(v)) for v in d90)
        ax.axvline(d90.mean(), c="C3", ls=":", label=f"d_int90 = {per_seed} (per seed)")
    ax.set(xscale="log", xlabel="subspace dimension d", ylabel=f"{on} accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    sizes = (cfg.side ** 2, *cfg.hidden, NUM_CLASSES)
    net = f"FC {'-'.join(map(str, sizes))}" if cfg.network == "fc" else "LeNet"
    ax.set_title(f"Intrinsic dimension: {net} on {cfg.dataset}, {cfg.num_epochs} epochs, "
                 f"{acc.shape[0]} seed(s)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    doc = __doc__ + "\n`--plot PNG` (an extra flag) draws accuracy against d ([1] Fig. 3)."
    cfg, _ = run.parse(Config, PRESETS, argv, description=doc)
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=doc, summary_keys=["test_acc_direct", "d_int90"] + [
                       f"{on}_acc_d{d}" for on in sorted({"test", cfg.d_int_on}) for d in cfg.dims]
                   + (["train_acc_direct"] if cfg.d_int_on == "train" else []),
                   nan_unless={"charts/d_int90": "charts/d_int90_reached"})
    if flags["--plot"] is not None:
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
