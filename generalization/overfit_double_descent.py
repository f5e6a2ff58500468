"""The modern risk curve ("double descent"): test risk against capacity peaks at the
interpolation threshold and descends again beyond it.

[1] M. Belkin, D. Hsu, S. Ma, S. Mandal. "Reconciling modern machine-learning practice and the
    classical bias-variance trade-off." PNAS 116(32), 2019, arXiv:1812.11118.
[2] L. Weng. "Are Deep Neural Networks Dramatically Overfitted?" (Lil'Log, 2019), section
    "Modern Risk Curve for Deep Learning" (its Fig. 3 and Fig. 4 are [1]'s).

Model "rff" ([1] Fig. 2): random Fourier features fitted by minimum-norm least squares,
    h(x) = sum_{k=1}^N a_k phi(x; v_k),  phi(x; v) = exp(sqrt(-1) <v, x>)          [1] Eq. 3
    v_k ~ N(0, sigma^-2 I_d) i.i.d. (the Gaussian kernel of bandwidth sigma as N -> oo)
    h_{n,N} = argmin_{h in H_N} ||a||_2 among the minimisers of sum_i (h(x_i) - y_i)^2  [1] Eq. 4
            a = Phi^+ Y = Phi^H (Phi Phi^H)^+ Y,  Phi_ik = phi(x_i; v_k) (n x N complex)
The K outputs share the features (Y: one-hot labels, n x K), so the threshold is N = n: below
it the least-squares fit is unique and does not interpolate; from N = n on it interpolates,
and the minimum-norm interpolant's norm ||a|| (and the test risk) peaks there.

Model "mlp" ([1]'s network figure, recalled as PNAS Fig. 3; the post's Fig. 4): one-hidden-
layer ReLU networks of H units,
    f(x) = W2^T relu(W1^T x + b1) + b2,  (d + 1) H + (H + 1) K parameters
trained on the squared loss sum_k (f_k(x) - y_k)^2 (no regulariser) with SGD + momentum; the
threshold is at (d + 1) H + (H + 1) K = n K. Below it the "weight reuse" scheme of [1]
initialises each network with the final weights of the previous, smaller one (new weights
N(0, 0.01)); from the threshold on every network starts from Glorot-uniform init.

Design: one `update` is one capacity on the curve (N features, or H hidden units, at index
`step` of the width grid); the runner scans `update` over the grid and vmaps seeds, so the
whole sweep is one compiled program and metrics.jsonl holds the curve. Shapes are static:
the features (hidden units) of the largest model are drawn at `init`, and a width uses the
first N of them (a mask), so the feature sets are nested as N grows. The min-norm solve is an
eigendecomposition of the n x n matrix Phi_N Phi_N^H (one LAPACK call per width, through
`jax.custom_batching.sequential_vmap`, so that the runner's seed vmap loops over seeds
instead of batching the LAPACK call: jaxlib 0.10.2's batched LAPACK calls can deadlock
XLA:CPU's 2-thread pool). It runs in float64 (`x64`): the eigenvalues of Phi Phi^H are the
squared singular values of Phi, and the peak lives in the smallest of them.

Reproduce (CPU, 8x8 digits, n = 200; the plot generalization/overfit_double_descent.png):
    python generalization/overfit_double_descent.py --preset quick --num-seeds 3 \\
        --plot generalization/overfit_double_descent.png
    python generalization/overfit_double_descent.py --preset quick --ridge-coef 1  # no peak
    python generalization/overfit_double_descent.py --preset quick_mlp --num-seeds 2
`--plot PNG` (this file's only extra flag) draws [1] Fig. 2's three panels (zero-one and
squared risks, train and test, and the norm of the solution, against N or the parameter
count) from the run's metrics.jsonl.
Measured (`--preset quick --num-seeds 3`, 2-core CPU shared with other jobs, 75 s wall /
43 CPU s, 8x8 digits, n = 200, 1000 test digits; mean over 3 seeds): test zero-one error
0.206 (N = 20), 0.084 (N = 100 = n/2, the classical U's best), 0.280 (190), **0.783 +- 0.014
at N = n = 200** (every seed peaks there), 0.321 (210), 0.081 (300), 0.051 (600), **0.048 at
N = 10 n = 2000**; test squared loss 0.33 (n/2), 42.7 (n), 0.16 (10 n); the norm ||a||
1.38, 24.3, 0.30 (part of its fall past n is the 1/sqrt(N) of ||a|| itself: sqrt(N) ||a||,
comparable across N as a norm in the kernel's RKHS, is 13.8, 344, 13.4, so the peak stays
and the far end returns to the level of n/2); train squared loss ~1e-25 from N = n on.
With --ridge-coef 1 the peak goes (2 seeds: 0.076 at n/2, 0.088 at n, 0.046 at 10 n; the
slow test's gate).
The `quick_mlp` preset (n = 100 digits centred by their mean image, threshold n K = 1000
weights between H = 13 (985) and 14 (1060); networks below n K stop at train squared loss
1e-4; 2 seeds, 130 s wall / 45 CPU s on the loaded 2-core CPU), mean over the seeds:
    H                2     4     6     8    10    12    13 | 14    16    20    30    60
    train zero-one .645  .455  .260  .085  .005     0     0 |  0     0     0     0     0
    test zero-one  .736  .580  .421  .261  .220  .224  .218 | .201  .166  .149  .141 .100
    test MSE       .789  .649  .603  .594  .587  .598  .593 | .532  .364  .408  .375 .336
train MSE 8e-4 (H = 12), 3.6e-4 (13), 2e-5-1.5e-4 from n K on. Every width from n K on
interpolates, and past n K the test error descends again to 0.100 (H = 60), below the
classical side's best (0.218); but there is no clean peak at n K in the seed mean: the test
error is flat at 0.22 for H = 10-13 and the test MSE flat at 0.59-0.60. Seed by seed the
test MSE rises towards n K for seed 0 (0.623 at H = 4 to 0.758 at H = 11) and hardly for
seed 1 (0.424 at H = 10 to 0.444 at H = 13). [1]'s network peak is not reproduced here.
Calibration (1 seed; train zero-one / test zero-one at H = 14, 16, 20, 30, 60): the file's
earlier setting (raw [0, 1] pixels, lr 0.005) left 0.44 0.33 0.28 0 0 / 0.58 0.56 0.45 0.20
0.12, a "peak" of under-trained networks: with all-positive inputs and zero biases the narrow
fresh networks lose ReLU units; lr 0.02 or 0.05 left more unfit (0.77 0.53 0.36 0.02 0 at
0.02); centring the inputs fits every width (train MSE 2e-5-6e-4) / 0.16 0.26 0.20 0.14
0.11; Adam 1e-3 on raw pixels fits too / 0.24 0.32 0.26 0.20 0.16, with the reused networks
below n K at 0.40 (no peak). Stopping below n K at zero train zero-one error (centred) stops
H >= 10 at train MSE 0.03 and flattens the left side (0.22, test MSE 0.59-0.60 at H = 8-13);
stopping at squared loss 1e-4 changes that little in the seed mean (the table above).
With --no-weight-reuse (3 seeds) the first network past n K is a small peak: test zero-one
0.164 (H = 13), 0.195 (14), 0.172 (16), 0.107 (60); test MSE 0.384, 0.531, 0.387, 0.335.
Paper setting (GPU; MNIST idx files in --data-dir, n = 10^4, N up to 6 x 10^4):
    python generalization/overfit_double_descent.py --preset paper --data-dir ~/data/mnist
[1] Fig. 2 (RFF, MNIST n = 10^4): zero-one test error peaks at N = n (about 15% there,
    read off the plot) and falls to about 2-3% at N = 6 x 10^4; the squared test loss and
    the norm peak at N = n too; train risk is 0 from N = n on. [1]'s MLP figure (MNIST
    n = 4 x 10^3): the test zero-one error peaks at 4 x 10^4 parameters (n K).
    (Numbers read off the figures from memory; not re-checked against the PDF here.)

Logged per update (one width): charts/width (N or H), charts/num_params, charts/threshold
(n for rff, n K for mlp), charts/train_zero_one, charts/test_zero_one, losses/train_mse,
losses/test_mse (squared loss summed over the K outputs, mean over points), charts/norm
(||a||_2 over all outputs, or ||theta||_2 of the network), charts/train_steps (SGD steps the
network trained before its stop rule fired, mlp_steps past n K or when it never fired; 0 for
rff). `evaluate`: the width with the highest test zero-one error
(peak_width), that error (peak_test_zero_one), the error at the largest width
(last_test_zero_one), and the threshold. Nothing is NaN.

Differences from the paper:
- Data: MNIST does not ship offline; the CPU presets use scikit-learn's 8x8 digits (pixels
  scaled to [0, 1], d = 64; n training points drawn once by a fixed permutation, the rest is
  the test set). MNIST itself is read from idx files in --data-dir (`paper`).
- Predictions are the real part of h (the min-norm complex fit of real targets; [1] treats
  H_N as real functions with 2N real parameters). The bandwidth sigma = 5 of the `paper`
  preset is from memory of [1]'s appendix, unchecked; the quick preset uses sigma = 2 for
  64-dimensional digits (calibrated by hand: the peak shows at any sigma in [1, 5]).
- Eigenvalues of Phi Phi^H below `eig_rtol` times the largest count as zero (numpy's pinv
  cuts singular values below 1e-15 s_max; this cuts below ~1e-6 s_max at the default).
- MLP: full-batch gradient descent with momentum ([1]'s batch size is not stated), `mlp_steps`
  steps per width where [1] trains 6000 epochs (`paper_mlp`'s 6000 full-batch steps are far
  fewer updates than 6000 epochs of minibatches). Momentum 0.95, the x0.9 decay every 500
  below the threshold, the early stop there and the inits are [mem]: [1]'s supplement was
  not found by the search tool; the public MNIST reproductions agree on momentum and decay
  and differ on the rest: songweige/double-descent-pytorch (lr 0.01, batch 128, stop at
  zero train zero-one error, new weights N(0, 0.1^2), Glorot only for the first network,
  N(0, 0.1^2) past the threshold), Dave69178/double_descent_reproduction (lr 0.001, batch
  64, stop at train loss < 1e-4, Glorot for the first network, torch's default past the
  threshold). This file uses Glorot-uniform for the first network and every one from the
  threshold on, zero hidden biases, and step size 0.05 (not [1]'s, not recalled) with the
  zero-one stop in `paper_mlp`.
- quick_mlp: the inputs are centred (`center_inputs`; [1]'s MNIST pixels are raw as far
  as recalled): without it the networks just past n K do not interpolate (calibration
  above). Its networks below n K stop at train squared loss < 1e-4 (`stop_rule mse`, as
  Dave69178's reproduction) rather than at zero train zero-one error.
- The RFF features are drawn once per seed for the largest N; a smaller N uses a prefix,
  where [1] may redraw them per N (not stated in what I could check).
"""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import data, run
from common.plot import save_png

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Double descent; defaults are [1]'s RFF experiment on MNIST (Fig. 2)."""

    model: str = "rff"
    """rff: random Fourier features, min-norm least squares ([1] Fig. 2); mlp: one-hidden-
    layer ReLU networks trained by SGD with weight reuse ([1]'s network figure)"""
    dataset: str = "mnist"
    """mnist (idx files in --data-dir) or digits (scikit-learn's 8x8 digits, offline)"""
    data_dir: str = ""
    """folder with MNIST's train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
    t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (dataset mnist)"""
    num_train: int = 10_000
    """training points n, drawn once by a fixed permutation ([1]: 10^4 for RFF, 4000 for MLP)"""
    num_test: int = 10_000
    """test points (MNIST: its test set; digits: taken from the images not used to train)"""
    center_inputs: bool = False
    """subtract the training set's mean image from every input (train and test); the min-norm
    RFF fit is invariant to it, the networks are not (see Differences)"""
    features: tuple[int, ...] = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000,
                                 11000, 12000, 14000, 17000, 20000, 30000, 40000, 60000)
    """model rff: the numbers of random Fourier features N, increasing (one update each)"""
    rff_sigma: float = 5.0
    """bandwidth sigma: v_k ~ N(0, sigma^-2 I) (Gaussian kernel exp(-|x-x'|^2 / 2 sigma^2))"""
    ridge_coef: float = 0.0
    """lambda of a ridge penalty lambda ||a||^2 on the RFF fit ([1]: 0, the min-norm limit;
    > 0 is the regularised control whose curve has no peak)"""
    eig_rtol: float = 1e-12
    """eigenvalues of Phi Phi^H below eig_rtol x the largest count as zero (the pinv cutoff)"""
    hidden_units: tuple[int, ...] = (4, 8, 16, 24, 32, 40, 44, 48, 50, 52, 56, 64, 80, 128,
                                     256, 512, 1024)
    """model mlp: the hidden-layer widths H, increasing (one update each)"""
    mlp_steps: int = 6000
    """model mlp: full-batch SGD steps per width ([1]: 6000 epochs)"""
    lr: float = 0.05
    """model mlp: SGD step size"""
    momentum: float = 0.95
    """model mlp: SGD momentum ([1] App.: 0.95)"""
    lr_decay: float = 0.9
    """model mlp: step size factor every decay_every steps, below the threshold only"""
    decay_every: int = 500
    """model mlp: steps between step-size decays ([1]: every 500 epochs)"""
    stop_rule: str = "zero_one"
    """model mlp: when a network below the threshold stops training: zero_one (train zero-one
    error 0) or mse (train squared loss < 1e-4); networks from the threshold on never stop"""
    weight_reuse: bool = True
    """model mlp: below the threshold, start from the previous (smaller) network's weights"""
    reuse_init_std: float = 0.1
    """model mlp: std of the new weights under weight reuse ([1]: variance 0.01)"""
    dtype: str = "float32"
    """model mlp: compute dtype of the network's matmuls (float32 or bfloat16)"""
    x64: bool = True
    """run in float64 (main() enables jax x64 for the run); the RFF min-norm solve needs it"""

    @property
    def widths(self) -> tuple[int, ...]:
        return self.features if self.model == "rff" else self.hidden_units

    @property
    def num_updates(self) -> int:
        return len(self.widths)

    @property
    def input_dim(self) -> int:
        return 784 if self.dataset == "mnist" else 64

    def validate(self):
        if self.model not in ("rff", "mlp"):
            raise ValueError(f"model must be rff or mlp, got {self.model!r}")
        if self.dataset not in ("mnist", "digits"):
            raise ValueError(f"dataset must be mnist or digits, got {self.dataset!r}")
        if self.dataset == "mnist" and not self.data_dir:
            raise ValueError("dataset mnist needs --data-dir (a folder with MNIST's idx "
                             "files); --dataset digits runs offline")
        limit = (60_000, 10_000) if self.dataset == "mnist" else (1796, 1797 - self.num_train)
        if self.num_train > limit[0] or self.num_test > limit[1]:
            raise ValueError(f"num_train={self.num_train}, num_test={self.num_test}: "
                             f"{self.dataset} has at most {limit[0]} and {limit[1]}")
        for name in ("features", "hidden_units"):
            w = getattr(self, name)
            if not w or min(w) < 1 or any(b <= a for a, b in zip(w[:-1], w[1:], strict=True)):
                raise ValueError(f"{name} must be increasing positive integers, got {w}")
        for name in ("rff_sigma", "eig_rtol", "reuse_init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.mlp_steps < 1 or self.decay_every < 1:
            raise ValueError(f"mlp_steps and decay_every must be >= 1, got {self.mlp_steps}, "
                             f"{self.decay_every}")
        if self.stop_rule not in ("zero_one", "mse"):
            raise ValueError(f"stop_rule must be zero_one or mse, got {self.stop_rule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


PRESETS = {
    # CPU demo of Fig. 2 on 8x8 digits: n = 200, N from n/10 to 10 n.
    "quick": dict(dataset="digits", num_train=200, num_test=1000, rff_sigma=2.0,
                  features=(20, 50, 100, 140, 170, 190, 200, 210, 230, 260, 300, 400, 600,
                            1000, 2000)),
    # CPU demo of the network figure: 100 centred 8x8 digits, n K = 1000 weights (H 13 | 14);
    # networks below n K fit the squared loss to 1e-4 (see the docstring: no clean peak).
    "quick_mlp": dict(model="mlp", dataset="digits", num_train=100, num_test=1000,
                      hidden_units=(2, 4, 6, 8, 10, 11, 12, 13, 14, 16, 20, 30, 60),
                      mlp_steps=20_000, lr=0.005, center_inputs=True, stop_rule="mse",
                      x64=False),
    "paper_mlp": dict(model="mlp", num_train=4000, x64=False),
    "paper": dict(),
}

# --- DATA ---

NUM_CLASSES = 10
"""K: MNIST and the digits both have ten classes"""

@functools.cache
def load_data(dataset: str, data_dir: str, num_train: int, num_test: int,
              center: bool = False):
    """(x_train (n, d), y_train (n,), x_test, y_test) as numpy: pixels in [0, 1], flattened;
    the n training points are a fixed (seed 0) random subset; with `center` the training
    mean image is subtracted from both. Cached: callers turn them into jnp arrays inside
    jitted code (common/run.py)."""
    if center:
        xtr, ytr, xte, yte = load_data(dataset, data_dir, num_train, num_test)
        mean = xtr.mean(0, keepdims=True)
        return xtr - mean, ytr, xte - mean, yte
    if dataset == "digits":
        xtr, ytr, xte, yte = data.digit_images(size=8, num_train=num_train, seed=0)
        xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)[:num_test]
        return xtr, ytr, xte, yte[:num_test]
    xi, yi, ti, tl = data.load_mnist(data_dir)
    pick = np.random.default_rng(0).permutation(len(yi))[:num_train]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0  # noqa: E731
    return flat(xi[pick]), yi[pick].astype(np.int32), flat(ti[:num_test]), tl[:num_test].astype(
        np.int32)


# --- RFF TRACK ---


def rff_features(x, v):
    """Phi_ik = phi(x_i; v_k) = exp(sqrt(-1) <v_k, x_i>)   [1] Eq. 3.  x (n, d), v (N, d)."""
    return jnp.exp(1j * (x @ v.T))  # (n, N) complex


@jax.custom_batching.sequential_vmap
def min_norm_fit(phi, y, ridge, rtol):
    """a = Phi^H (Phi Phi^H + ridge I)^+ Y: the minimum-norm least-squares coefficients
    ([1] Eq. 4; with ridge = 0 this is Phi^+ Y) through the eigendecomposition of the n x n
    Hermitian Phi Phi^H. Zero columns of phi (unused features) get zero coefficients. Under
    vmap it loops (sequential_vmap): no batched LAPACK call. phi (n, N), y (n, K)."""
    gram = phi @ phi.conj().T  # (n, n), eigenvalues = squared singular values of Phi
    lam, u = jnp.linalg.eigh(gram)
    rank = lam > rtol * lam[-1]  # the pinv cutoff (ridge = 0)
    inv = jnp.where(rank | (ridge > 0), 1.0 / (jnp.maximum(lam, 0.0) + ridge), 0.0)
    return phi.conj().T @ (u @ (inv[:, None] * (u.conj().T @ y)))  # (N, K)


def risks(pred, labels, num_classes: int):
    """(squared loss sum_k (f_k - y_k)^2 averaged over points, zero-one error of argmax)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=pred.dtype)
    mse = jnp.mean(jnp.sum((pred - onehot) ** 2, -1))
    return mse, jnp.mean(jnp.argmax(pred, -1) != labels)


# --- MLP TRACK ---


def num_params(h, d: int, k: int):
    """Weights of a d-h-k network: (d + 1) h + (h + 1) k."""
    return (d + 1) * h + (h + 1) * k


def mlp_apply(params, x, mask, dtype):
    """f(x) = W2^T (relu(W1^T x + b1) * mask) + b2; mask switches off units >= H."""
    w1, b1, w2, b2 = (p.astype(dtype) for p in params)
    hid = jax.nn.relu(x.astype(dtype) @ w1 + b1) * mask.astype(dtype)
    return (hid @ w2 + b2).astype(jnp.float32)


def glorot_params(key, h, d: int, k: int, hmax: int):
    """Glorot-uniform weights of a d-h-k network ([1] past the threshold), zero biases, laid
    out in the max-width shapes (units >= h are masked out by `mlp_apply`)."""
    k1, k2 = jax.random.split(key)
    lim1, lim2 = jnp.sqrt(6.0 / (d + h)), jnp.sqrt(6.0 / (h + k))
    return (jax.random.uniform(k1, (d, hmax), jnp.float32, -1, 1) * lim1,
            jnp.zeros(hmax, jnp.float32),
            jax.random.uniform(k2, (hmax, k), jnp.float32, -1, 1) * lim2,
            jnp.zeros(k, jnp.float32))


def reuse_params(key, prev, prev_h, std: float):
    """[1]'s weight reuse: the units < prev_h keep the previous network's trained weights
    (and b2 is kept); the new units' weights are N(0, std^2), their biases 0."""
    old = jnp.arange(prev[0].shape[1]) < prev_h
    k1, k2 = jax.random.split(key)
    w1 = jnp.where(old, prev[0], std * jax.random.normal(k1, prev[0].shape, jnp.float32))
    w2 = jnp.where(old[:, None], prev[2], std * jax.random.normal(k2, prev[2].shape,
                                                                  jnp.float32))
    return w1, jnp.where(old, prev[1], 0.0), w2, prev[3]


STOP_MSE = 1e-4
"""stop_rule mse: a network below the threshold stops once its train squared loss is below this"""


def train_mlp(params, x, y, mask, under, cfg):
    """Full-batch SGD with momentum on the squared loss; below the threshold (`under`) the
    step size decays by lr_decay every decay_every steps and training stops at zero train
    error (stop_rule zero_one) or squared loss < STOP_MSE (mse). Returns the trained params
    and the number of steps taken."""
    k = NUM_CLASSES
    onehot = jax.nn.one_hot(y, k)
    dtype = jnp.dtype(cfg.dtype)

    def loss(p):
        pred = mlp_apply(p, x, mask, dtype)
        return jnp.mean(jnp.sum((pred - onehot) ** 2, -1)), jnp.mean(jnp.argmax(pred, -1) != y)

    def step(carry, t):
        p, vel, done, steps = carry
        (mse, err), g = jax.value_and_grad(loss, has_aux=True)(p)
        fit = (err == 0) if cfg.stop_rule == "zero_one" else (mse < STOP_MSE)
        done = done | (under & fit)
        lr = cfg.lr * jnp.where(under, cfg.lr_decay ** (t // cfg.decay_every), 1.0)
        vel = jax.tree.map(lambda v, gi: jnp.where(done, v, cfg.momentum * v - lr * gi), vel, g)
        p = jax.tree.map(lambda pi, v: jnp.where(done, pi, pi + v), p, vel)
        return (p, vel, done, steps + (~done)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (params, _, _, steps), _ = jax.lax.scan(
        step, (params, zeros, jnp.array(False), jnp.array(0)), jnp.arange(cfg.mlp_steps))
    return params, steps


# --- UPDATE ---


@struct.dataclass
class State:
    key: jax.Array
    step: jax.Array
    v: jax.Array  # (N_max, d) RFF frequencies (model rff; (1, d) otherwise)
    params: Any  # the last trained network, max-width shapes (model mlp)
    test_err: jax.Array  # (num_widths,) test zero-one error per width so far
    threshold: jax.Array  # n (rff) or n K (mlp)


def init(key, cfg: Config) -> State:
    d, k = cfg.input_dim, NUM_CLASSES
    kv, kp, key = jax.random.split(key, 3)
    fdt = jnp.float64 if cfg.x64 else jnp.float32
    nmax = max(cfg.features) if cfg.model == "rff" else 1
    v = jax.random.normal(kv, (nmax, d), fdt) / cfg.rff_sigma  # v ~ N(0, sigma^-2 I)
    params = glorot_params(kp, 1, d, k, max(cfg.hidden_units) if cfg.model == "mlp" else 1)
    thr = cfg.num_train * (1 if cfg.model == "rff" else k)
    return State(key, jnp.array(0), v, params, jnp.zeros(cfg.num_updates, jnp.float32),
                 jnp.array(thr, jnp.float32))


def update(state: State, cfg: Config):
    """One point of the risk curve: the model at width index `state.step`."""
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in load_data(
        cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test, cfg.center_inputs))
    k, n, d = NUM_CLASSES, cfg.num_train, cfg.input_dim
    width = jnp.asarray(cfg.widths)[state.step]
    key, kstep = jax.random.split(state.key)
    if cfg.model == "rff":
        xtr, xte = xtr.astype(state.v.dtype), xte.astype(state.v.dtype)
        mask = jnp.arange(state.v.shape[0]) < width  # the first N features
        phi = rff_features(xtr, state.v) * mask
        a = min_norm_fit(phi, jax.nn.one_hot(ytr, k, dtype=phi.dtype), cfg.ridge_coef,
                         cfg.eig_rtol)
        pred_tr = jnp.real(phi @ a)
        pred_te = jnp.real((rff_features(xte, state.v) * mask) @ a)
        norm, params, steps = jnp.sqrt(jnp.sum(jnp.abs(a) ** 2)), state.params, 0
        count = 2 * width  # real parameters (a_k complex)
    else:
        hmax = state.params[0].shape[1]
        mask = jnp.arange(hmax) < width
        count = num_params(width, d, k)
        under = count < n * k
        prev_h = jnp.asarray((0,) + cfg.widths)[state.step]
        reuse = cfg.weight_reuse & under & (state.step > 0)
        k1, k2 = jax.random.split(kstep)
        fresh = glorot_params(k1, width, d, k, hmax)
        start = reuse_params(k2, state.params, prev_h, cfg.reuse_init_std)
        start = jax.tree.map(lambda r, f: jnp.where(reuse, r, f), start, fresh)
        params, steps = train_mlp(start, xtr, ytr, mask, under, cfg)
        dtype = jnp.dtype(cfg.dtype)
        pred_tr, pred_te = mlp_apply(params, xtr, mask, dtype), mlp_apply(params, xte, mask,
                                                                           dtype)
        masked = (params[0] * mask, params[1] * mask, params[2] * mask[:, None], params[3])
        norm = jnp.sqrt(sum(jnp.sum(p.astype(jnp.float32) ** 2) for p in masked))
    mse_tr, err_tr = risks(pred_tr, ytr, k)
    mse_te, err_te = risks(pred_te, yte, k)
    metrics = {"charts/width": width, "charts/num_params": count,
               "charts/threshold": state.threshold, "charts/train_zero_one": err_tr,
               "charts/test_zero_one": err_te, "losses/train_mse": mse_tr,
               "losses/test_mse": mse_te, "charts/norm": norm, "charts/train_steps": steps}
    metrics = {m: jnp.asarray(v, jnp.float32) for m, v in metrics.items()}
    state = state.replace(key=key, step=state.step + 1, params=params,
                          test_err=state.test_err.at[state.step].set(err_te))
    return state, metrics


def evaluate(state: State, cfg: Config):
    """Where the test error peaked, and the error at the largest width."""
    i = jnp.argmax(state.test_err)
    return {"peak_width": jnp.asarray(cfg.widths, jnp.float32)[i],
            "peak_test_zero_one": state.test_err[i],
            "last_test_zero_one": state.test_err[-1], "threshold": state.threshold}


# --- PLOT ---


def plot_curve(run_dir, out):
    """[1] Fig. 2's three panels from a run's metrics.jsonl: zero-one and squared test and
    train risk, and the norm of the solution, against the width; the threshold dashed."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    x = plot.curve(rows, "charts/width")[1].mean(1)
    if c["model"] == "mlp":
        x = plot.curve(rows, "charts/num_params")[1].mean(1)
    thr = plot.curve(rows, "charts/threshold")[1][0, 0]
    fig, axes = plt.subplots(3, 1, figsize=(6, 8), sharex=True)
    panels = [("zero-one error (%)", ["charts/test_zero_one", "charts/train_zero_one"], 100),
              ("squared loss", ["losses/test_mse", "losses/train_mse"], 1),
              ("norm of the solution", ["charts/norm"], 1)]
    for ax, (label, names, scale) in zip(axes, panels, strict=True):
        for m in names:
            y = plot.curve(rows, m)[1] * scale
            mean = np.nanmean(y, 1)
            ax.plot(x, mean, "o-", ms=3, label=f"{m.split('/')[1]} ({y.shape[1]} seeds)")
            ax.fill_between(x, np.nanmin(y, 1), np.nanmax(y, 1), alpha=0.2)
        ax.axvline(thr, ls="--", c="grey", lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if label != "zero-one error (%)":
            ax.set_yscale("log")
        if label == "squared loss":  # past the threshold the train loss is round-off (1e-25)
            ax.set_ylim(bottom=1e-3)
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel("number of random Fourier features N" if c["model"] == "rff"
                        else "number of parameters")
    axes[0].set_title(f"{c['model']} on {c['dataset']}, n = {c['num_train']} (threshold "
                      "dashed; band: min-max over seeds)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")  # this file's one extra flag: a PNG
    out = flags["--plot"]
    cfg, _ = run.parse(Config, PRESETS, argv, description=__doc__)
    with jax.enable_x64(cfg.x64):
        res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate,
                       argv=argv, doc=__doc__,
                       summary_keys=["peak_width", "peak_test_zero_one",
                                     "last_test_zero_one", "threshold"])
    if out is not None:
        print(plot_curve(res.run_dir, out))
    return res


if __name__ == "__main__":
    main()
