"""Minimum description length of a network's labels: uniform, prequential (online),
variational and two-part codes, for true against random labels.

[1] L. Blier, Y. Ollivier. "The Description Length of Deep Learning Models." NeurIPS 2018,
    arXiv:1802.07044 (no released code).
[2] P. Grunwald. "A Tutorial Introduction to the Minimum Description Length Principle."
    2004, arXiv:math/0406077 (the post's ref. [3]); J. Rissanen, "Modeling by shortest data
    description", Automatica 1978.
The post (Lil'Log, "Are deep neural networks dramatically overfitted?", MDL section):
    H_best = argmin_H [ L(H) + L(D | H) ], both in bits                              (MDL)
Selection among hypotheses (`polynomial_selection`, numpy, not part of the runner): the
degree d = 0..12 of a least-squares polynomial for n = 60 noisy points of a cubic, by the
asymptotic two-part code ([2] Sec. 2; the catalogue's demo)
    L(H) + L(D|H) = (k + 1) / 2 log2 n + n / 2 log2(RSS_d / n),   k = d + 1       (2-part)
(the + 1: the noise variance; the Gaussian NLL's terms shared by every degree dropped).
Measured (seed 0, 20 draws): the two-part code picks degree 3 in 17 and 4 in 3, the
smallest RSS picks 12 in 20 of 20; over 1,000 draws 97.5% pick 3 or 4.

For a network's labels the hypotheses are the codes below. The data to send are the
labels y_1..y_n of inputs x_1..x_n that sender and receiver both hold ([1] Sec. 2.1);
every code length below is in BITS (-log2 p, a cross-entropy in nats
divided by ln 2):
    uniform      L_unif = n log2 K                                                [1] Sec. 2.3
    prequential  1 = t_0 < t_1 < ... < t_S = n; the first t_1 labels sent uniformly, then a
                 model trained FROM SCRATCH on the first t_k examples encodes the next block:
                 L_preq = t_1 log2 K + sum_{k=1}^{S-1} sum_{t_k < i <= t_{k+1}}
                          -log2 p_{theta_{t_k}}(y_i | x_i)                        [1] Sec. 3.4
    prequential  each block may use the model at any of its C = num_updates + 1 checkpoints
    + stopping   (initialisation, then after every update): the sender picks the shortest
                 and sends the index, + log2 C bits per block (a valid code: the receiver
                 retrains the same seed to the same checkpoint; [1] Sec. 3.4 picks among
                 models and stopping times too, by switching)
    two-part     L(H) + L(D|H) with H = the network trained on all n labels, its k weights
                 sent at b bits each: b = 32: float32 as is, L(H) = 32 k ([1] Sec. 3.1);
                 b < 32: each tensor uniformly quantised to 2^b levels on [-r, r], r = its
                 max |theta| (sent as a 32-bit float), L(H) = b k + 32 #tensors, and
                 L(D|H) = sum_i -log2 p_{theta_q}(y_i | x_i) with the QUANTISED weights
    variational  KL(q || prior) + E_{theta~q}[sum_i -log2 p_theta(y_i | x_i)], q = N(mu,
                 diag sigma^2) trained on all n labels by the reparameterised ELBO, prior
                 N(0, prior_std^2); bits-back coding makes it a code length
                 ([1] Sec. 3.3; Hinton & van Camp 1993)
    BIC          (k / 2) log2 n + sum_i -log2 p_theta(y_i | x_i): the asymptotic two-part
                 code of regular models ([1] Sec. 4, [2]); shown for scale, not a code
    zlib         8 * len(zlib.compress(bytes(y), 9)) / n: a general-purpose compressor
                 that does not see x (sanity check: no code beats log2 K on random labels)
Random labels can not be compressed by any code: L >= n log2 K - delta - 1 with
probability 1 - 2^-delta ([1] App. A, Prop. 2). Label corruption p replaces each label by
U{0..K-1} with probability p (Zhang et al. 2017); a model that knew the true label would
still need -(q log2 q + (K-1) (p/K) log2(p/K)) bits per label, q = 1 - p + p/K ("noise
floor" in the plot).

All block models (S of them: S - 1 encode a block, the last, trained on all n, is the
two-part model) x label variants are ONE vmapped program: every model sees a fixed-size
buffer of all n examples and trains on minibatches drawn uniformly from its first t_k.

Reproduce (CPU, scikit-learn digits, 1,500 labels, MLP 1x256, 3 arms, 2 seeds):
    python generalization/overfit_mdl.py --preset quick --num-seeds 2 \\
        --plot generalization/overfit_mdl.png
Paper setting (GPU; MNIST idx files in --data-dir, 60,000 labels):
    python generalization/overfit_mdl.py --preset paper --data-dir ~/mnist
    python generalization/overfit_mdl.py --preset paper --dataset cifar10 \\
        --num-train 50000 --data-dir ~/cifar-10        (CIFAR-10: [1]'s 50,000 labels)
[1] Table 1 / Sec. 3.4 (bits for the whole training set): MNIST uniform 199 kbits
(60,000 log2 10), prequential 4.10 kbits (compression ratio 0.021, 99.5% test accuracy),
variational 22.2 kbits [M: a reviewer's recollection of Table 1, not checked; ~5.4x the
prequential code]; CIFAR-10 uniform 166 kbits, float32 two-part > 428 Mbits,
variational 89.0 kbits (66.5%), prequential 45.3 kbits (ratio 0.27, 93.3%, VGGb).
Measured (quick preset, 2 seeds, 88 s on a loaded 2-core CPU), bits per label (uniform
log2 10 = 3.32; seeds 0 / 1):
    arm            prequential   + stopping   variational  two-part 32 / 8 bit   BIC   zlib
    true labels    0.384 0.330   0.364 0.327  3.169 3.127  409.9 / 102.6         67.6  4.06
    p = 0.5        3.768 3.776   2.791 2.763  3.706 3.748  411.9 / 104.6         69.6  4.03
    random labels  4.886 5.044   3.392 3.386  3.878 3.799  412.6 / 105.3         70.3  4.01
(test accuracy 0.983 / 0.990 true labels, 0.114 / 0.101 random; the noise floor of p = 0.5
is 2.42). Random labels: the last-checkpoint block models are confidently wrong; with the
stopping time each block takes an early checkpoint and the code stays just above the
uniform code: 3.39 against log2 10 + the switch cost 7 log2 21 / 1500 = 3.342 (the
untrained network's predictions are not uniform, so even its best checkpoint costs a
little more than log2 10 per label; [1] App. A: no code beats n log2 K by more than a
few bits w.h.p.). As in [1], the
variational code compresses far less than the prequential one, and the two-part codes of
a 19,210-weight MLP for 1,500 labels are 30-120x the uniform code.

Logged each update, per arm a: losses/train_<a> (block models' minibatch cross-entropy,
nats), losses/variational_<a> (one-sample variational loss per example, nats),
charts/preq_bpl_<a> and charts/preq_stop_bpl_<a> (the two prequential codes so far, bits
per label; the latter and losses/variational_<a> only when --stopping-time / --variational
are on). `evaluate`: uniform_bpl and, per arm, preq_bpl, preq_stop_bpl, variational_bpl,
two_part_<b>bit_bpl, bic_bpl, test_acc (held-out, true labels), block_bpl (per block);
`main` adds zlib_bpl_<a> on the host.

Differences from the paper:
- Data: the CPU presets use scikit-learn's 8x8 digits (1,500 labels encoded, 297 held
  out); [1] encodes MNIST and CIFAR-10 (the paper preset reads MNIST or CIFAR-10 from
  --data-dir; its test accuracy uses 10,000 test images).
- Model: MLPs only (any widths), trained with Adam on minibatches drawn with replacement;
  [1] trains several architectures (MLPs, CNNs, VGG) and switches between them. The block
  schedule t_k = first_block * growth^(k-1) (capped at n) and the paper preset's MLP 2x512
  are assumptions: [1]'s exact timesteps and hyperparameters were not checked (the paper
  text was not at hand; its numbers and section numbers above were read from a
  third-party summary of arXiv v5; equation numbers are not given for that reason).
- Stopping-time selection is one index per block among the logged checkpoints (log2 C
  bits each), not [1]'s switch / self-switch codes (Sec. 3.4, model switching); the
  codes with and without it are both reported.
- The two-part code's model is the network trained on all n labels for the same steps;
  [1]'s float32 two-part figure counts the weights only.
- Variational code: a fixed prior N(0, prior_std^2) chosen by hand (its few bits not
  counted), posterior stds initialised at 1e-3, Adam at var_lr, one weight sample per
  step, and the E_q term estimated with var_samples draws; [1] Sec. 3.3 / App. tunes
  its prior and training (not checked here).
- Label corruption (true / corrupted / random arms) is not an experiment of [1], which
  states the random-label bound (App. A); it is added to connect with Zhang et al. 2017.
"""

import functools
import math
import zlib
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

DATASETS = ("digits", "mnist", "cifar10")
NUM_CLASSES = 10
LN2 = math.log(2.0)
VAR_INIT_STD = 1e-3
"""initial std of every weight's variational posterior (means: the usual init draw)"""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Code lengths of [1]; the optimiser and schedule are this file's (see the docstring)."""

    dataset: str = "digits"
    """'digits' (scikit-learn's 8x8 digits, in the wheel), 'mnist' or 'cifar10' (--data-dir)"""
    data_dir: str = ""
    """folder holding MNIST's idx files or CIFAR-10's python batches"""
    num_train: int = 1500
    """labels to encode (digits: drawn from the 1,797; mnist / cifar10: the first ones)"""
    num_test: int = 297
    """held-out examples for the final models' test accuracy (digits: the rest)"""
    first_block: int = 16
    """t_1: labels sent with the uniform code before any model exists"""
    growth: int = 2
    """t_{k+1} = growth * t_k (the last block ends at num_train)"""
    hidden: tuple[int, ...] = (256,)
    """hidden widths of the ReLU MLP"""
    batch_size: int = 64
    """examples per Adam step, drawn with replacement from the model's first t_k"""
    num_steps: int = 1000
    """Adam steps of every block model (all train from scratch, in parallel)"""
    steps_per_eval: int = 50
    """Adam steps per update; the code lengths are measured after each (the checkpoints)"""
    lr: float = 1e-3
    """Adam learning rate"""
    corruptions: tuple[float, ...] = (0.0, 0.5, 1.0)
    """label-corruption probabilities p, one arm each (0: true labels, 1: random labels)"""
    stopping_time: bool = True
    """the 'prequential + stopping' code picks each block's best checkpoint (+ log2 C bits)"""
    variational: bool = True
    """also train the variational code's Gaussian posterior on all n labels of every arm"""
    prior_std: float = 0.1
    """std of the variational code's Gaussian prior N(0, prior_std^2) on every weight"""
    var_lr: float = 1e-2
    """Adam learning rate of the variational posterior's means and softplus^-1 stds"""
    var_samples: int = 8
    """weight samples of the Monte-Carlo estimate of E_q[L(D | theta)] in evaluate"""
    param_bits: tuple[int, ...] = (32, 8)
    """bits per weight of the two-part codes (32: float32 as is; < 32: quantised)"""
    dtype: str = "float32"
    """compute dtype of the dense layers ("bfloat16" on accelerators)"""

    @property
    def bounds(self) -> tuple[int, ...]:
        """t_1 < t_2 < ... < t_S = num_train: model k trains on the first t_k examples."""
        t = [self.first_block]
        while t[-1] * self.growth < self.num_train:
            t.append(t[-1] * self.growth)
        return (*t, self.num_train) if t[-1] < self.num_train else tuple(t)

    @property
    def num_updates(self) -> int:
        return self.num_steps // self.steps_per_eval

    @property
    def steps_per_update(self) -> int:
        return self.steps_per_eval * len(self.bounds) * len(self.corruptions)  # model steps

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(arm_name(p) for p in self.corruptions)

    def validate(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} must be one of {DATASETS}")
        if self.dataset != "digits" and not self.data_dir:
            raise ValueError(f"dataset={self.dataset!r} needs --data-dir")
        if self.dataset == "digits" and self.num_train + self.num_test > 1797:
            raise ValueError(f"num_train + num_test = {self.num_train + self.num_test} "
                             "exceeds the 1,797 digits")
        if not 1 <= self.first_block < self.num_train:
            raise ValueError(f"first_block={self.first_block} must be in [1, num_train)")
        if self.growth < 2:
            raise ValueError(f"growth={self.growth} must be >= 2")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be one or more widths >= 1")
        if self.steps_per_eval < 1 or self.num_steps % self.steps_per_eval:
            raise ValueError(f"num_steps={self.num_steps} must be a multiple of "
                             f"steps_per_eval={self.steps_per_eval} >= 1")
        if not self.corruptions or len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError(f"corruptions={self.corruptions} must be distinct and non-empty")
        for p in self.corruptions:
            if not 0 <= p <= 1:
                raise ValueError(f"corruptions: {p} must be in [0, 1]")
        if self.prior_std <= 0:
            raise ValueError(f"prior_std={self.prior_std} must be > 0")
        if self.var_samples < 1:
            raise ValueError(f"var_samples={self.var_samples} must be >= 1")
        for b in self.param_bits:
            if not 1 <= b <= 32:
                raise ValueError(f"param_bits: {b} must be in [1, 32]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 1,500 digit labels, blocks 16, 32, ..., 1024, 1500 (8 models x 3 arms).
    "quick": dict(),
    # [1]'s MNIST: 60,000 labels, blocks 16 ... 32768, 60000 (13 models); MLP 2x512 and
    # 5,000 Adam steps per model are this file's choices (see Differences).
    "paper": dict(dataset="mnist", num_train=60000, num_test=10000, hidden=(512, 512),
                  batch_size=128, num_steps=5000, steps_per_eval=250),
}


def arm_name(p: float) -> str:
    return {0.0: "true_labels", 1.0: "random_labels"}.get(p, f"corrupt_{round(100 * p)}")


# --- DATA ---


@functools.cache
def images(dataset: str, data_dir: str, num_train: int, num_test: int):
    """(train_x (n, D) float32 in [0, 1], train_y, test_x, test_y) as numpy, cached."""
    if dataset == "digits":
        tr_x, tr_y, te_x, te_y = data.digit_images(8, num_train)
    else:
        load = data.load_mnist if dataset == "mnist" else data.load_cifar10
        tr_x, tr_y, te_x, te_y = load(data_dir)
    if num_train > len(tr_y) or num_test > len(te_y):
        raise ValueError(f"num_train={num_train} / num_test={num_test} exceed the "
                         f"{len(tr_y)} / {len(te_y)} {dataset} examples")
    scale = 255.0 if tr_x.dtype == np.uint8 else 1.0
    flat = lambda x: (np.asarray(x, np.float32) / scale).reshape(len(x), -1)
    return (flat(tr_x[:num_train]), np.asarray(tr_y[:num_train], np.int32),
            flat(te_x[:num_test]), np.asarray(te_y[:num_test], np.int32))


def corrupt_labels(u_mask, u_class, y, p):
    """Each label replaced, with probability p, by a class drawn uniformly from all K."""
    new = jnp.minimum(jnp.floor(u_class * NUM_CLASSES), NUM_CLASSES - 1).astype(y.dtype)
    return jnp.where(u_mask < p, new, y)


def make_labels(key, y, cfg: Config):
    """(arms, n) labels of every arm, drawn once at init from the true labels y (n,)."""
    u = jax.random.uniform(key, (2, len(cfg.arms), y.shape[0]))
    return jnp.stack([corrupt_labels(u[0, i], u[1, i], y, p)
                      for i, p in enumerate(cfg.corruptions)]).astype(jnp.int32)


# --- NETWORKS ---


class MLP(nn.Module):
    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(NUM_CLASSES, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> MLP:
    return MLP(cfg.hidden, jnp.dtype(cfg.dtype))


# --- CODES ---


def nll_bits(logits, y):
    """-log2 p(y | x) of each example: the softmax cross-entropy (nats) / ln 2."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y) / LN2


def train_sizes(bounds) -> np.ndarray:
    """Examples each model trains on: model k sees the first t_k (never the block it
    encodes, t_k < i <= t_{k+1})."""
    return np.asarray(bounds)


def block_masks(bounds, n: int) -> np.ndarray:
    """(S, n) bool: row k marks the block model k encodes, [t_k, t_{k+1}) in 0-based
    indices; the last model (t_S = n) encodes nothing (it is the two-part model)."""
    t = np.asarray(bounds)
    i = np.arange(n)
    hi = np.append(t[1:], t[-1])
    return (i[None] >= t[:, None]) & (i[None] < hi[:, None])


def block_bits(bits, bounds):
    """bits (S, n) of every model on every example -> (S - 1,) bits of each block under
    the model that encodes it ([1] Sec. 3.4, without the first, uniform block)."""
    mask = jnp.asarray(block_masks(bounds, bits.shape[-1]))
    return jnp.sum(jnp.where(mask, bits, 0.0), -1)[..., :-1]


def prequential_bits(blocks, bounds, num_classes: int = NUM_CLASSES):
    """[1] Sec. 3.4: t_1 log2 K for the first block, then the blocks' bits."""
    return bounds[0] * math.log2(num_classes) + jnp.sum(blocks, -1)


def quantize(theta, bits: int):
    """theta at `bits` bits per weight and the bits to send it: float32 as is for 32;
    else the uniform grid of 2^bits levels on [-r, r], r = max |theta| (+ 32 bits for r)."""
    if bits >= 32:
        return theta, 32.0 * theta.size
    r = jnp.maximum(jnp.max(jnp.abs(theta)), 1e-30)
    step = 2 * r / (2 ** bits - 1)
    return jnp.round((theta + r) / step) * step - r, float(bits * theta.size + 32)


def num_params(cfg: Config, d: int) -> int:
    sizes = (d, *cfg.hidden, NUM_CLASSES)
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def noise_floor_bits(p: float, k: int = NUM_CLASSES) -> float:
    """Bits per label a model that knew the true label still needs under corruption p."""
    q, r = 1 - p + p / k, p / k
    return abs(-(q * math.log2(q) + ((k - 1) * r * math.log2(r) if r > 0 else 0.0)))


def kl_bits(mu, sigma, prior_std: float):
    """KL(N(mu, sigma^2) || N(0, prior_std^2)) summed over the weights, in bits."""
    kl = jnp.log(prior_std / sigma) + (sigma ** 2 + mu ** 2) / (2 * prior_std ** 2) - 0.5
    return jnp.sum(kl) / LN2


# --- TWO-PART MODEL SELECTION (the post's H_best = argmin_H [L(H) + L(D|H)]) ---


POLY_COEFFS = (1.0, -2.0, 0.5, 3.0)
"""the catalogue's cubic y = 1 - 2x + 0.5x^2 + 3x^3 (+ N(0, 0.3^2) noise), x ~ U[-1, 1]"""


def polynomial_code_bits(x, y, max_degree: int):
    """Two-part code of y under each polynomial degree d = 0..max_degree (least squares,
    Legendre basis): (L(H) + L(D|H), RSS), each (max_degree + 1,). L(H) = (k + 1) / 2 log2 n
    for k = d + 1 coefficients and the noise variance; L(D|H) = n / 2 log2(RSS / n), the
    Gaussian NLL at the fitted variance without the terms every degree shares."""
    n, rss = len(y), []
    for d in range(max_degree + 1):
        v = np.polynomial.legendre.legvander(x, d)
        coef = np.linalg.lstsq(v, y, rcond=None)[0]
        rss.append(np.sum((y - v @ coef) ** 2))
    rss, k = np.asarray(rss), np.arange(max_degree + 1) + 1
    return (k + 1) / 2 * math.log2(n) + n / 2 * np.log2(rss / n), rss


def polynomial_selection(seed: int = 0, runs: int = 20, n: int = 60, max_degree: int = 12,
                         noise: float = 0.3):
    """Degrees picked in `runs` draws of n noisy points of the cubic POLY_COEFFS (one
    numpy generator): (by the two-part code, by the smallest RSS), each (runs,)."""
    rng, picks = np.random.default_rng(seed), []
    for _ in range(runs):
        x = rng.uniform(-1, 1, n)
        y = np.polynomial.polynomial.polyval(x, POLY_COEFFS) + rng.normal(0, noise, n)
        bits, rss = polynomial_code_bits(x, y, max_degree)
        picks.append((np.argmin(bits), np.argmin(rss)))
    return tuple(np.asarray(p) for p in zip(*picks, strict=True))


def zlib_bits(labels) -> float:
    """Bits of zlib (level 9) on the labels as one byte each (no inputs x)."""
    return 8.0 * len(zlib.compress(np.asarray(labels, np.uint8).tobytes(), 9))


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # leaves (S models, arms, ...): model k of arm a
    opt_state: Any
    order: jax.Array  # (n,) the seed's order of the examples (the order they are sent in)
    labels: jax.Array  # (arms, n) labels of each arm, in the sent order
    sizes: jax.Array  # (S,) examples each block model trains on (`train_sizes`)
    best: jax.Array  # (arms, S - 1) shortest bits of each block over the checkpoints so far
    checkpoints: jax.Array  # checkpoints seen so far (init + updates)
    var: Any  # (mu, rho) (arms, k): the variational posterior, sigma = softplus(rho)
    var_opt: Any
    key: jax.Array


def stack_models(tree, n_models: int, n_arms: int):
    return jax.tree.map(lambda p: jnp.broadcast_to(p[:, None], (n_models, n_arms,
                                                                *p.shape[1:])), tree)


def all_bits(params, x, labels, cfg: Config):
    """(arms, S, n) -log2 p of every model of every arm on every example x (n, D)."""
    net = network(cfg)
    logits = jax.vmap(jax.vmap(lambda p: net.apply({"params": p}, x)))(params)  # (S, A, n, K)
    return jax.vmap(lambda lg, y: nll_bits(lg, jnp.broadcast_to(y, lg.shape[:-1])),
                    (1, 0))(logits, labels)  # (A, S, n)


def init(key, cfg: Config) -> State:
    k_net, k_order, k_lab, key = jax.random.split(key, 4)
    tr_x, tr_y = images(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)[:2]
    n_models, n_arms, n = len(cfg.bounds), len(cfg.arms), cfg.num_train
    net = network(cfg)
    # every block model starts from its own draw, shared by the arms
    params = jax.vmap(lambda k: net.init(k, jnp.zeros((1, tr_x.shape[1])))["params"])(
        jax.random.split(k_net, n_models))
    params = stack_models(params, n_models, n_arms)
    order = jax.random.permutation(k_order, n)
    labels = make_labels(k_lab, jnp.asarray(tr_y)[order], cfg)
    x = jnp.asarray(tr_x)[order]
    bits = all_bits(params, x, labels, cfg)
    best = jax.vmap(lambda b: block_bits(b, cfg.bounds))(bits)  # checkpoint 0: the init
    tx = optax.adam(cfg.lr)
    mu = ravel_pytree(jax.tree.map(lambda p: p[-1, 0], params))[0]  # the all-n model's draw
    var = (jnp.broadcast_to(mu, (n_arms, mu.size)),
           jnp.full((n_arms, mu.size), np.log(np.expm1(VAR_INIT_STD)), jnp.float32))
    return State(params, jax.vmap(jax.vmap(tx.init))(params), order, labels,
                 jnp.asarray(train_sizes(cfg.bounds), jnp.int32), best,
                 jnp.ones((), jnp.int32), var, jax.vmap(optax.adam(cfg.var_lr).init)(var),
                 key)


# --- UPDATE ---


def loss_fn(params, x, y, cfg: Config):
    logits = network(cfg).apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def var_loss(var, eps, x, y, unravel, cfg: Config):
    """[1] Sec. 3.3 (Hinton & van Camp 1993) per example, nats: the cross-entropy at a
    reparameterised sample theta = mu + sigma eps, plus KL(q || prior) / n."""
    mu, sigma = var[0], jax.nn.softplus(var[1])
    ce = loss_fn(unravel(mu + sigma * eps), x, y, cfg)
    return ce + kl_bits(mu, sigma, cfg.prior_std) * LN2 / cfg.num_train


def update(state: State, cfg: Config):
    """steps_per_eval Adam steps of every block model of every arm, then the codes."""
    tx = optax.adam(cfg.lr)
    tr_x = jax.lax.optimization_barrier(jnp.asarray(
        images(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)[0]))  # no folding
    x = tr_x[state.order]  # (n, D) in the sent order
    sizes = state.sizes  # (S,)
    key, k_steps = jax.random.split(state.key)

    tx_var = optax.adam(cfg.var_lr)
    unravel = ravel_pytree(jax.tree.map(lambda p: p[0, 0], state.params))[1]

    def step(carry, k):
        params, opt_state, var, var_opt = carry
        k, k_eps = jax.random.split(k)
        u = jax.random.uniform(k, (len(cfg.bounds), cfg.batch_size))
        idx = jnp.minimum(jnp.floor(u * sizes[:, None]), sizes[:, None] - 1).astype(
            jnp.int32)  # (S, B) uniform over each model's first t_k examples

        def per_model(p, o, i):  # p, o: (arms, ...) of one model
            yb = state.labels[:, i]  # (arms, B)
            loss, g = jax.vmap(jax.value_and_grad(loss_fn), (0, None, 0, None))(
                p, x[i], yb, cfg)
            upd, o = jax.vmap(tx.update)(g, o, p)
            return optax.apply_updates(p, upd), o, loss

        params, opt_state, loss = jax.vmap(per_model)(params, opt_state, idx)
        v_loss = jnp.zeros(len(cfg.arms))
        if cfg.variational:
            eps = jax.random.normal(k_eps, var[0].shape)  # (arms, k)
            v_loss, g = jax.vmap(jax.value_and_grad(var_loss), (0, 0, None, 0, None, None))(
                var, eps, x[idx[-1]], state.labels[:, idx[-1]], unravel, cfg)
            upd, var_opt = jax.vmap(tx_var.update)(g, var_opt, var)
            var = optax.apply_updates(var, upd)
        return (params, opt_state, var, var_opt), (loss, v_loss)

    (params, opt_state, var, var_opt), (loss, v_loss) = jax.lax.scan(
        step, (state.params, state.opt_state, state.var, state.var_opt),
        jax.random.split(k_steps, cfg.steps_per_eval))
    bits = all_bits(params, x, state.labels, cfg)  # (A, S, n)
    blocks = jax.vmap(lambda b: block_bits(b, cfg.bounds))(bits)  # (A, S - 1)
    best = jnp.minimum(state.best, blocks)
    checkpoints = state.checkpoints + 1
    state = state.replace(params=params, opt_state=opt_state, best=best,
                          checkpoints=checkpoints, var=var, var_opt=var_opt, key=key)
    preq = prequential_bits(blocks, cfg.bounds)
    stop = stopping_bits(best, checkpoints, cfg)
    metrics = {}
    for i, a in enumerate(cfg.arms):
        metrics[f"losses/train_{a}"] = loss[:, :, i].mean()
        if cfg.variational:
            metrics[f"losses/variational_{a}"] = v_loss[:, i].mean()
        metrics[f"charts/preq_bpl_{a}"] = preq[i] / cfg.num_train
        if cfg.stopping_time:
            metrics[f"charts/preq_stop_bpl_{a}"] = stop[i] / cfg.num_train
    return state, metrics


def stopping_bits(best, checkpoints, cfg: Config):
    """Prequential code with each block's best checkpoint: + log2 C bits per block to
    send its index among the C checkpoints."""
    switch = jnp.log2(checkpoints.astype(jnp.float32)) * (len(cfg.bounds) - 1)
    return prequential_bits(best, cfg.bounds) + switch


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """Final code lengths (bits per label) of every arm; see the module docstring."""
    tr_x, _, te_x, te_y = images(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)
    x, n = jnp.asarray(tr_x)[state.order], cfg.num_train
    bits = all_bits(state.params, x, state.labels, cfg)  # (A, S, n)
    blocks = jax.vmap(lambda b: block_bits(b, cfg.bounds))(bits)  # (A, S - 1)
    net = network(cfg)

    def final_codes(params, y):  # the model trained on all n labels, of one arm
        codes = {}
        for b in cfg.param_bits:
            leaves, tree = jax.tree.flatten(params)
            qs = [quantize(leaf, b) for leaf in leaves]
            pq = jax.tree.unflatten(tree, [q for q, _ in qs])
            data_bits = nll_bits(net.apply({"params": pq}, x), y).sum()
            codes[f"two_part_{b}bit_bpl"] = (sum(m for _, m in qs) + data_bits) / n
        pred = jnp.argmax(net.apply({"params": params}, jnp.asarray(te_x)), -1)
        codes["test_acc"] = jnp.mean(pred == jnp.asarray(te_y))
        return codes

    per_arm = jax.vmap(final_codes)(jax.tree.map(lambda p: p[-1], state.params),
                                    state.labels)
    k = num_params(cfg, tr_x.shape[1])
    per_arm["bic_bpl"] = (0.5 * k * math.log2(n) + bits[:, -1].sum(-1)) / n
    per_arm["preq_bpl"] = prequential_bits(blocks, cfg.bounds) / n
    if cfg.stopping_time:
        per_arm["preq_stop_bpl"] = stopping_bits(state.best, state.checkpoints, cfg) / n
    t = np.asarray(cfg.bounds)
    per_arm["block_bpl"] = blocks / (t[1:] - t[:-1])
    if cfg.variational:
        unravel = ravel_pytree(jax.tree.map(lambda p: p[0, 0], state.params))[1]
        per_arm["variational_bpl"] = jax.vmap(lambda v, y: variational_bits(
            v, x, y, jax.random.fold_in(state.key, 1), unravel, cfg))(state.var,
                                                                       state.labels) / n
    out = {"uniform_bpl": jnp.float32(math.log2(NUM_CLASSES))}
    for i, a in enumerate(cfg.arms):
        out.update({f"{key}_{a}": v[i] for key, v in per_arm.items()})
    return out


def variational_bits(var, x, y, key, unravel, cfg: Config):
    """[1] Sec. 3.3: KL(q || prior) + E_q[sum_i -log2 p_theta(y_i | x_i)], bits (bits-back
    coding makes it a code length), the expectation over var_samples draws."""
    mu, sigma = var[0], jax.nn.softplus(var[1])
    net = network(cfg)
    eps = jax.random.normal(key, (cfg.var_samples, mu.size))
    data = jax.vmap(lambda e: nll_bits(net.apply({"params": unravel(mu + sigma * e)}, x),
                                       y).sum())(eps)
    return kl_bits(mu, sigma, cfg.prior_std) + data.mean()


# --- PLOT ---


def plot(result, cfg: Config, out: str):
    """(a) code length per label of every code and arm against the uniform code; (b) each
    block's bits per label against the number of labels the model trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = result.final
    codes = [("zlib", "zlib (no x)"), ("preq", "prequential"),
             *([("preq_stop", "prequential + stopping")] if cfg.stopping_time else []),
             *([("variational", "variational")] if cfg.variational else []),
             *[(f"two_part_{b}bit", f"two-part, {b}-bit weights") for b in cfg.param_bits],
             ("bic", "BIC (k/2 log2 n)")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    w = 0.8 / len(cfg.arms)
    for j, (a, p) in enumerate(zip(cfg.arms, cfg.corruptions, strict=True)):
        v = np.stack([np.asarray(f[f"{c}_bpl_{a}"], float) for c, _ in codes], 1)
        xs = np.arange(len(codes)) + (j - (len(cfg.arms) - 1) / 2) * w
        axes[0].bar(xs, v.mean(0), w, yerr=v.std(0), label=f"{a} (noise floor "
                    f"{noise_floor_bits(p):.2f})", capsize=2)
    axes[0].axhline(math.log2(NUM_CLASSES), c="k", ls="--", label="uniform log2 10")
    axes[0].set_xticks(np.arange(len(codes)), [c for _, c in codes], rotation=20,
                       fontsize=8)
    axes[0].set(yscale="log", ylabel="bits per label", title="(a) code length of the labels")
    axes[0].legend(fontsize=7)
    t = np.asarray(cfg.bounds)
    for a in cfg.arms:
        v = np.asarray(f[f"block_bpl_{a}"], float)
        axes[1].errorbar(t[:-1], v.mean(0), v.std(0), marker="o", capsize=3, label=a)
    axes[1].axhline(math.log2(NUM_CLASSES), c="k", ls="--", label="uniform")
    axes[1].set(xscale="log", xlabel="t_k: labels the block model trained on",
                ylabel="bits per label of block (t_k, t_k+1]",
                title="(b) prequential blocks (last checkpoint)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.dataset}: n = {cfg.num_train} labels, MLP "
                 f"{'x'.join(map(str, cfg.hidden))}, {np.asarray(f['uniform_bpl']).size} "
                 "seed(s)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    doc = __doc__ + "\n`--plot PNG` (an extra flag) draws the code lengths of the run."
    cfg, _ = run.parse(Config, PRESETS, argv, description=doc)
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=doc, summary_keys=["uniform_bpl"] + [
                       f"{c}_bpl_{a}" for a in cfg.arms for c in ("preq", "preq_stop")])
    labels = np.asarray(res.state.labels)  # (seeds, arms, n)
    for i, a in enumerate(cfg.arms):
        res.final[f"zlib_bpl_{a}"] = np.array([zlib_bits(s[i]) for s in labels]) / cfg.num_train
        print(f"  zlib_bpl_{a:27s} {res.final[f'zlib_bpl_{a}'].mean():10.4g}")
    if flags["--plot"] is not None:
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
