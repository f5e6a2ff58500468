"""AutoAugment: augmentation policies searched by an RNN controller trained with PPO on the
validation accuracy of child models.

[1] E. D. Cubuk, B. Zoph, D. Mane, V. Vasudevan, Q. V. Le. "AutoAugment: Learning
    Augmentation Policies from Data." CVPR 2019, arXiv:1805.09501.
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post),
    section "DR guided by task performance".
[3] J. Schulman et al. "Proximal Policy Optimization Algorithms." arXiv:1707.06347.
[4] B. Zoph, V. Vasudevan, J. Shlens, Q. V. Le. "Learning Transferable Architectures for
    Scalable Image Recognition." CVPR 2018, arXiv:1707.07012 (NASNet: the controller and
    PPO set-up AutoAugment reuses).

Search space ([1] Sec. 3): a policy S is 5 sub-policies of 2 operations; an operation is
(type in the 16 ops, probability in 11 bins {0, 0.1, .., 1}, magnitude in 10 bins spread
uniformly over the op's range, [1] Table 1 of the appendix). For every image of every
mini-batch one sub-policy is drawn uniformly; its two ops are applied in order, each with
its probability, at its magnitude. The controller ([1] Sec. 3, [4]) is a one-layer LSTM
with 100 units emitting the 5 x 2 x 3 = 30 decisions one softmax at a time, each decision's
embedding fed back as the next input (equation numbers are ours; [1] numbers none):
    log pi_theta(S) = sum_{t=1}^{30} log softmax(W_k h_t)[a_t]                     (Eq. 1)
Reward R(S) = validation accuracy of a child model trained with S on a reduced training
set. PPO [3] on the controller with a moving-average baseline b ([1] Sec. 3):
    A(S) = R(S) - b,   b <- 0.95 b + 0.05 mean R                                    (Eq. 2)
    L(theta) = -E[min(r A, clip(r, 1 - eps, 1 + eps) A)] - c_ent H(pi_theta),
    r = pi_theta(S) / pi_theta_old(S)                                               (Eq. 3)
One `update` = one controller step, one jitted program: `num_policies` policies sampled,
their children trained `child_steps` SGD steps (a `lax.scan`; the population one
`jax.vmap`, plus a child without augmentation: charts/noaug_acc), `ppo_epochs` Adam steps.
Toy (quick preset): scikit-learn's digits (common.data.digit_images) with the validation
set inverted (1 - x): a child that never sees inverted digits fails there, so the
controller must find Invert.

Reproduce (CPU demo; figure: op probabilities and rewards per controller update):
    python generalization/auto_augment.py --preset quick --num-seeds 2 \
        --plot generalization/auto_augment.png
`paper` preset ([1]'s controller and search space, a CIFAR-sized child on reduced CIFAR-10,
4,000 training images, needs the python batches):
    python generalization/auto_augment.py --preset paper --data-dir ~/cifar-10
[1]'s results (large models retrained with the found policies): CIFAR-10 error 1.5 %,
ImageNet top-1 83.5 %; CIFAR-10's policies favour colour ops, SVHN's Invert and geometry.
Ours (quick: digits 12 x 12, 500 train / 500 inverted validation images, 6 ops, 16 policies
x 30 updates, MLP children of 100 SGD steps; 2 seeds vmapped, loaded 2-core CPU, 2 min 23 s;
seed 0 / seed 1): mass on Invert 0.17 (uniform) -> 0.39 / 0.22 (update 5) -> peak 0.93
(update 16) / 0.63 (28) -> 0.65 / 0.59 (30); mean reward 0.21 / 0.28 -> 0.58 / 0.73 (max
over the 16 policies 0.83 / 0.84) vs <= 0.002 for the child without augmentation.

Differences from the paper:
- Child: a 3-conv CNN (32-64-128; paper preset) or an MLP for a few hundred steps of
  constant-lr SGD (momentum 0.9, no weight decay), not [1]'s Wide-ResNet-40-2 for 120 epochs
  [M] (lr 0.01, weight decay 1e-4, cosine [M]); 8 synchronous children per controller step
  ([1]: asynchronous workers, ~15,000 policies [M]). PPO clip 0.2 and 4 epochs are [M] (not
  in [1]); lr 0.00035, entropy 1e-5, baseline 0.95 and init U(-0.1, 0.1) are [1] Sec. 3's.
- Eq. 2's baseline moves once per batch of K rewards ([1]: once per reward, so ours forgets
  K times more slowly: 0.95 per batch = 0.95^(1/K) per reward) and starts at the first
  batch's mean reward (not said in [1]).
- [1] lists an op's decisions as (type, magnitude, probability); ours emits (type,
  probability, magnitude).
- Not done: [1]'s final step (the 5 best policies' 25 sub-policies, a large model retrained);
  the released code's baseline augmentation of every CIFAR child image after the policy
  (pad 4 + crop, flip, Cutout 16 px) and its shuffle before the 4,000 (ours: the first 4,000).
- All 16 of [1]'s ops, as JAX functions on float images in [0, 1] (not PIL): Rotate turns
  about the centre as PIL does; Shear / Translate warp about the centre (PIL: the corner),
  bilinear, fill 0; Sharpness is PIL's SMOOTH blend but edge-pads the 1-px border (PIL leaves
  it unfiltered: up to 72 levels there); Equalize is (CDF - CDF(min)) / (N - CDF(min)), not
  PIL's LUT (up to 64 levels apart on 32 x 32 RGB); SamplePairing blends with another image
  of the batch. `identity` and `flip_lr` are extras (not in [1]). The tests compare the
  others with PIL at bins 0, 5 and 9 (within 2 of 255 levels).
- Magnitude bin m of 10 maps to lo + (hi - lo) m / 9 over [1] Table 1's ranges (signed ones
  such as Rotate [-30, 30] span both signs; the released code mirrors a level at random and
  reaches 9/10 of a range: enhance factors <= 1.72). Where the code and [1] differ we follow
  [1]: Posterize keeps [4, 8] bits, bin 0 the strongest (code: 4 -> 1 bits); Solarize's
  threshold [0, 256] runs from bin 0, a full Invert, to bin 9, a no-op (code: level 0 is
  the no-op); Translate (+-150/331) and Cutout
  (<= 60/331, fill 0.5) scale [1]'s ImageNet pixels on every data set (code on CIFAR: <= 9
  and 18 px of 32).
- Quick preset: controller lr 0.01 (0.00035 is too slow for 30 updates), 6 ops, 16 policies.
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

# --- CONFIG ---

# name -> (lo, hi) of the magnitude ([1] appendix Table 1; fractions of the image for sizes)
OPS = {"shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "translate_x": (-150 / 331, 150 / 331),
       "translate_y": (-150 / 331, 150 / 331), "rotate": (-30.0, 30.0),
       "auto_contrast": (0.0, 0.0), "invert": (0.0, 0.0), "equalize": (0.0, 0.0),
       "solarize": (0.0, 256 / 255), "posterize": (4.0, 8.0), "contrast": (0.1, 1.9),
       "color": (0.1, 1.9), "brightness": (0.1, 1.9), "sharpness": (0.1, 1.9),
       "cutout": (0.0, 60 / 331), "sample_pairing": (0.0, 0.4),
       "identity": (0.0, 0.0), "flip_lr": (0.0, 0.0)}  # the last two: extras, not in [1]
PAPER_OPS = tuple(list(OPS)[:16])
SHIFTS = {"none": None, "invert": "invert", "flip": "flip_lr"}  # val shift -> matching op
NUM_CLASSES = 10


@dataclass(frozen=True)
class Config:
    """AutoAugment (Cubuk et al. 2018): LSTM controller + PPO over augmentation policies."""

    ops: tuple[str, ...] = PAPER_OPS
    """operation types the controller picks from ([1]: the 16 of PAPER_OPS)"""
    num_sub_policies: int = 5
    """sub-policies per policy ([1]: 5)"""
    ops_per_sub_policy: int = 2
    """operations per sub-policy, applied in order ([1]: 2)"""
    num_prob_bins: int = 11
    """probability bins {0, 1/(n-1), .., 1} ([1]: 11)"""
    num_mag_bins: int = 10
    """magnitude bins spread uniformly over each op's range ([1]: 10)"""
    lstm_hidden: int = 100
    """controller: units of its one-layer LSTM ([1]: 100)"""
    init_scale: float = 0.1
    """controller weights init U(-init_scale, init_scale) ([1]: 0.1)"""
    lr: float = 0.00035
    """controller: Adam learning rate of PPO ([1]: 0.00035)"""
    ent_coef: float = 0.00001
    """controller: entropy bonus weight ([1]: 0.00001)"""
    baseline_decay: float = 0.95
    """moving-average baseline b <- decay b + (1 - decay) mean R ([1]: 0.95 per reward)"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon ([M]; not given in [1])"""
    ppo_epochs: int = 4
    """PPO: Adam steps of Eq. 3 per batch of sampled policies ([M])"""
    num_policies: int = 8
    """policies sampled (children trained in parallel) per controller update"""
    num_controller_updates: int = 1875
    """controller updates (x num_policies = [1]'s ~15,000 sampled policies)"""
    reward_sign: float = 1.0
    """+1: reward = validation accuracy; -1: the broken variant (sign flipped)"""
    dataset: str = "cifar10"
    """'digits' (scikit-learn's, in the wheel) or 'cifar10' (python batches in --data-dir)"""
    data_dir: str = ""
    """folder of CIFAR-10's python batches (dataset cifar10)"""
    image_size: int = 32
    """image side (digits are upsampled from 8 x 8; CIFAR-10 must be 32)"""
    num_train: int = 4000
    """reduced training set of each child ([1]: 4,000 CIFAR-10 images)"""
    num_val: int = 1000
    """validation images the reward is measured on (held out from training)"""
    val_shift: str = "none"
    """shift of the validation set: none, invert (1 - x) or flip (left-right)"""
    child_steps: int = 3750
    """SGD steps of each child (3,750 x 128 = [1]'s 120 epochs of 4,000 [M])"""
    child_batch: int = 128
    """child mini-batch size"""
    child_lr: float = 0.05
    """child SGD (momentum 0.9) learning rate"""
    child_channels: tuple[int, ...] = (32, 64, 128)
    """child: 3x3 stride-2 conv widths (empty: an MLP)"""
    child_hidden: int = 256
    """child: width of its dense hidden layer"""
    dtype: str = "float32"
    """compute dtype of the child: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_controller_updates

    @property
    def steps_per_update(self) -> int:
        return self.num_policies * self.child_steps * self.child_batch  # augmented images

    @property
    def num_decisions(self) -> int:
        return self.num_sub_policies * self.ops_per_sub_policy * 3

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (len(self.ops), self.num_prob_bins, self.num_mag_bins)

    def validate(self):
        for name, choices in (("dataset", ("digits", "cifar10")), ("val_shift", tuple(SHIFTS)),
                              ("dtype", ("float32", "bfloat16")), ("reward_sign", (1.0, -1.0))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        bad = [o for o in self.ops if o not in OPS]
        if bad or len(set(self.ops)) != len(self.ops) or not self.ops:
            raise ValueError(f"ops={self.ops} must be distinct names from {tuple(OPS)}")
        if SHIFTS[self.val_shift] not in (None, *self.ops):
            raise ValueError(f"val_shift={self.val_shift!r} needs op "
                             f"{SHIFTS[self.val_shift]!r} in ops={self.ops}")
        if self.num_prob_bins < 2 or self.num_mag_bins < 2:
            raise ValueError(f"num_prob_bins={self.num_prob_bins} and num_mag_bins="
                             f"{self.num_mag_bins} must be >= 2")
        if self.dataset == "cifar10" and (not self.data_dir or self.image_size != 32):
            raise ValueError(f"dataset='cifar10' needs --data-dir (CIFAR-10's python batches) "
                             f"and image_size=32 (got {self.image_size})")
        for name in ("num_sub_policies", "ops_per_sub_policy", "num_policies", "ppo_epochs",
                     "num_controller_updates", "child_steps", "child_batch", "num_train",
                     "num_val", "lstm_hidden", "child_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        limit = {"digits": 1797, "cifar10": 50000}[self.dataset]
        if self.num_train + self.num_val > limit:
            raise ValueError(f"num_train + num_val = {self.num_train + self.num_val} exceeds "
                             f"the {limit:,} {self.dataset} training images")
        if self.image_size < 4 or min(self.child_channels, default=1) < 1:
            raise ValueError(f"image_size={self.image_size} must be >= 4 and child_channels="
                             f"{self.child_channels} >= 1")
        if not 0 < self.clip_coef < 1 or self.init_scale <= 0:
            raise ValueError(f"clip_coef={self.clip_coef} must be in (0, 1), init_scale="
                             f"{self.init_scale} > 0")


PRESETS = {
    # CPU demo: digits 12 x 12, inverted validation set, 6 ops, 16 policies x 30 updates.
    "quick": dict(ops=("identity", "rotate", "shear_x", "invert", "solarize", "brightness"),
                  dataset="digits", image_size=12, num_train=500, num_val=500,
                  val_shift="invert", child_steps=100, child_batch=32, child_lr=0.1,
                  child_channels=(), child_hidden=64, num_policies=16,
                  num_controller_updates=30, lr=0.01),
    "paper": dict(),
}


# --- DATA ---


@functools.cache
def images(dataset: str, data_dir: str, size: int, num_train: int, num_val: int, shift: str):
    """(train_x (n, H, W, C) float32 in [0, 1], train_y, val_x, val_y) as numpy, cached; the
    validation images are shifted by `shift` (none / invert / flip)."""
    if dataset == "digits":
        tr_x, tr_y, te_x, te_y = data.digit_images(size, num_train)
        va_x, va_y = te_x[:num_val], te_y[:num_val]
    else:  # the reduced training set and a held-out validation split of CIFAR's training set
        x, y = data.load_cifar10(data_dir)[:2]
        x = np.asarray(x, np.float32) / 255.0
        tr_x, tr_y = x[:num_train], y[:num_train]
        va_x, va_y = x[num_train:num_train + num_val], y[num_train:num_train + num_val]
    va_x = {"none": va_x, "invert": 1.0 - va_x, "flip": va_x[:, :, ::-1]}[shift]
    return (np.asarray(tr_x, np.float32), np.asarray(tr_y, np.int32),
            np.ascontiguousarray(va_x, np.float32), np.asarray(va_y, np.int32))


# --- OPERATIONS ([1] appendix Table 1; img (H, W, C) in [0, 1], v the magnitude) ---


def warp(img, src_y, src_x):
    """Bilinear sample of img at the source coordinates (H, W) per output pixel, fill 0."""
    return jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(
        ch, [src_y, src_x], order=1, mode="constant", cval=0.0), 2, 2)(img)


def affine(img, a, b, t):
    """Output pixel (dy, dx) (relative to the centre, y down) reads input
    (dy, dx) = (a[0] dy + a[1] dx + t[0], b[0] dy + b[1] dx + t[1])."""
    h, w = img.shape[:2]
    dy, dx = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2,
                          indexing="ij")
    return warp(img, a[0] * dy + a[1] * dx + t[0] + (h - 1) / 2,
                b[0] * dy + b[1] * dx + t[1] + (w - 1) / 2)


def rotate(img, deg):
    """Counter-clockwise by deg degrees about the centre (PIL's sign)."""
    c, s = jnp.cos(jnp.deg2rad(deg)), jnp.sin(jnp.deg2rad(deg))
    return affine(img, (c, s), (-s, c), (0.0, 0.0))


def gray(img):  # PIL's L = 0.299 R + 0.587 G + 0.114 B
    return img if img.shape[-1] == 1 else (img @ jnp.array([0.299, 0.587, 0.114]))[..., None]


def blend(degenerate, img, v):
    """PIL's ImageEnhance: degenerate + v (img - degenerate); v = 1 is the identity."""
    return degenerate + v * (img - degenerate)


def equalize(img):
    """Per-channel histogram equalisation on 256 levels: x -> CDF(level(x))."""
    def channel(ch):
        lvl = jnp.clip(jnp.round(ch * 255), 0, 255).astype(jnp.int32)
        cdf = jnp.cumsum(jnp.zeros(256).at[lvl.ravel()].add(1.0))
        lo = cdf[jnp.min(lvl)]  # PIL maps the lowest level to 0
        return (cdf[lvl] - lo) / jnp.maximum(cdf[-1] - lo, 1.0)
    return jax.vmap(channel, 2, 2)(img)


def sharpen(img, v):
    k = jnp.array([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13  # PIL's SMOOTH filter
    pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth = sum(k[i, j] * pad[i:i + img.shape[0], j:j + img.shape[1]]
                 for i in range(3) for j in range(3))
    return blend(smooth, img, v)


def cutout(img, v, key):
    h, w = img.shape[:2]
    cy, cx = jax.random.uniform(key, (2,)) * jnp.array([h, w])
    y, x = jnp.arange(h)[:, None] + 0.5, jnp.arange(w)[None] + 0.5
    inside = (jnp.abs(y - cy) < v * h / 2) & (jnp.abs(x - cx) < v * w / 2)
    return jnp.where(inside[..., None], 0.5, img)


def posterize(img, bits):
    q = 2.0 ** (8 - jnp.round(bits))
    return jnp.floor(jnp.round(img * 255) / q) * q / 255


def op_fns(img, v, key, partner):
    """Every op at magnitude v: name -> image (the caller picks one)."""
    lo, hi = img.reshape(-1, img.shape[-1]).min(0), img.reshape(-1, img.shape[-1]).max(0)
    h, w = img.shape[:2]
    return {"shear_x": lambda: affine(img, (1.0, 0.0), (v, 1.0), (0.0, 0.0)),
            "shear_y": lambda: affine(img, (1.0, v), (0.0, 1.0), (0.0, 0.0)),
            "translate_x": lambda: affine(img, (1.0, 0.0), (0.0, 1.0), (0.0, -v * w)),
            "translate_y": lambda: affine(img, (1.0, 0.0), (0.0, 1.0), (-v * h, 0.0)),
            "rotate": lambda: rotate(img, v),
            "auto_contrast": lambda: jnp.where(hi > lo, (img - lo) / jnp.maximum(hi - lo, 1e-6),
                                               img),
            "invert": lambda: 1.0 - img,
            "equalize": lambda: equalize(img),
            "solarize": lambda: jnp.where(img >= v, 1.0 - img, img),
            "posterize": lambda: posterize(img, v),
            "contrast": lambda: blend(gray(img).mean(), img, v),
            "color": lambda: blend(gray(img), img, v),
            "brightness": lambda: blend(jnp.zeros_like(img), img, v),
            "sharpness": lambda: sharpen(img, v),
            "cutout": lambda: cutout(img, v, key),
            "sample_pairing": lambda: blend(img, partner, v),
            "identity": lambda: img,
            "flip_lr": lambda: img[:, ::-1]}


def apply_op(img, op, mag_bin, key, partner, cfg: Config):
    """Op number `op` of cfg.ops at magnitude bin `mag_bin` (v = lo + (hi - lo) m / (B-1))."""
    frac = mag_bin / (cfg.num_mag_bins - 1)
    bounds = np.array([OPS[o] for o in cfg.ops], np.float32)
    v = jnp.asarray(bounds[:, 0]) + jnp.asarray(bounds[:, 1] - bounds[:, 0]) * frac
    outs = [op_fns(img, v[i], key, partner)[o]() for i, o in enumerate(cfg.ops)]
    return jnp.clip(jnp.stack(outs)[op], 0.0, 1.0)


def augment(key, img, partner, policy, cfg: Config):
    """[1] Sec. 3: one sub-policy drawn uniformly; its ops in order, each applied with its
    probability. policy [num_sub_policies, ops_per_sub_policy, 3] (type, prob, magnitude)."""
    k_sub, k_ops = jax.random.split(key)
    sub = policy[jax.random.randint(k_sub, (), 0, cfg.num_sub_policies)]
    for j, k in enumerate(jax.random.split(k_ops, cfg.ops_per_sub_policy)):
        k_p, k_op = jax.random.split(k)
        prob = sub[j, 1] / (cfg.num_prob_bins - 1)
        out = apply_op(img, sub[j, 0], sub[j, 2], k_op, partner, cfg)
        img = jnp.where(jax.random.uniform(k_p) < prob, out, img)
    return img


# --- NETWORKS ---


class Controller(nn.Module):
    """[1, 4]: a one-layer LSTM; decision t of kind k = t mod 3 (type, prob, magnitude) is a
    softmax over its own head; its embedding is the next input (a start token first)."""

    sizes: tuple[int, int, int]
    hidden: int
    init_scale: float

    def setup(self):
        init = lambda k, s, d=jnp.float32: jax.random.uniform(
            k, s, d, -self.init_scale, self.init_scale)
        self.embed = nn.Embed(sum(self.sizes) + 1, self.hidden, embedding_init=init)
        self.cell = nn.OptimizedLSTMCell(self.hidden, kernel_init=init,
                                         recurrent_kernel_init=init)
        self.head = nn.Dense(sum(self.sizes), kernel_init=init)

    def __call__(self, carry, token, kind):
        """One decision: (carry, token of the last decision) -> (carry, masked logits over
        all heads' classes: only kind's slice is finite)."""
        carry, h = self.cell(carry, self.embed(token))
        offsets = np.cumsum((0,) + self.sizes)
        cls = jnp.arange(offsets[-1])
        valid = (cls >= jnp.asarray(offsets[:-1])[kind]) & (cls < jnp.asarray(offsets[1:])[kind])
        return carry, jnp.where(valid, self.head(h), -1e9)


class Child(nn.Module):
    channels: tuple[int, ...]
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), strides=2, dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x.reshape(x.shape[0], -1)))
        return nn.Dense(NUM_CLASSES, dtype=self.dtype)(x).astype(jnp.float32)


def controller(cfg: Config) -> Controller:
    return Controller(cfg.sizes, cfg.lstm_hidden, cfg.init_scale)


# --- CONTROLLER ---


def decide(params, cfg: Config, key=None, actions=None):
    """Runs the controller over the 30 decisions, sampling (key) or teacher-forced (actions
    [T]). Returns (actions [T], log-probs [T], entropies [T], logits [T, sum sizes])."""
    net, offsets = controller(cfg), np.cumsum((0,) + cfg.sizes)
    kinds = np.arange(cfg.num_decisions) % 3
    keys = (jax.random.split(key, cfg.num_decisions) if actions is None
            else jnp.zeros((cfg.num_decisions, 2), jnp.uint32))
    acts = jnp.zeros(cfg.num_decisions, jnp.int32) if actions is None else actions

    def step(c, x):
        (carry, token), (kind, k, a) = c, x
        carry, logits = net.apply(params, carry, token, kind)
        cls = jax.random.categorical(k, logits) if actions is None else (
            jnp.asarray(offsets[:-1])[kind] + a)
        logp = jax.nn.log_softmax(logits)
        ent = -jnp.sum(jnp.exp(logp) * jnp.where(logits > -1e8, logp, 0.0))
        return (carry, cls), (cls - jnp.asarray(offsets[:-1])[kind], logp[cls], ent, logits)

    carry = (jnp.zeros(cfg.lstm_hidden), jnp.zeros(cfg.lstm_hidden))
    _, out = jax.lax.scan(step, (carry, jnp.int32(offsets[-1])), (kinds, keys, acts))
    return out


def log_prob(params, actions, cfg: Config):
    """Eq. 1: log pi(S) = sum over the decisions, and the summed entropy."""
    _, logp, ent, _ = decide(params, cfg, actions=actions)
    return logp.sum(), ent.sum()


def ppo_loss(params, actions, logp_old, adv, cfg: Config):
    """Eq. 3 over the sampled policies [K, T]."""
    logp, ent = jax.vmap(lambda a: log_prob(params, a, cfg))(actions)
    ratio = jnp.exp(logp - logp_old)
    surr = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef) * adv)
    return -surr.mean() - cfg.ent_coef * ent.mean(), ent.mean()


# --- CHILD ---


def train_child(key, policy, cfg: Config):
    """R(S): a fresh child trained `child_steps` SGD steps on the reduced training set with
    every image augmented by the policy [num_sub, ops_per_sub, 3]; validation accuracy."""
    tr_x, tr_y, va_x, va_y = (jnp.asarray(a) for a in images(
        cfg.dataset, cfg.data_dir, cfg.image_size, cfg.num_train, cfg.num_val, cfg.val_shift))
    net, tx = Child(cfg.child_channels, cfg.child_hidden, jnp.dtype(cfg.dtype)), optax.sgd(
        cfg.child_lr, momentum=0.9)
    k_init, k_train = jax.random.split(key)
    params = net.init(k_init, tr_x[:1])

    def step(carry, k):
        params, opt = carry
        k_idx, k_aug = jax.random.split(k)
        idx = jax.random.randint(k_idx, (cfg.child_batch,), 0, cfg.num_train)
        x = jax.vmap(lambda kk, a, b: augment(kk, a, b, policy, cfg))(
            jax.random.split(k_aug, cfg.child_batch), tr_x[idx], tr_x[jnp.roll(idx, 1)])

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(
                net.apply(p, x), tr_y[idx]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    (params, _), loss = jax.lax.scan(step, (params, tx.init(params)),
                                     jax.random.split(k_train, cfg.child_steps))
    return (net.apply(params, va_x).argmax(-1) == va_y).mean(), loss[-1]


# --- UPDATE ---


@struct.dataclass
class State:
    params: Any  # controller
    opt_state: Any
    baseline: jax.Array  # b of Eq. 2
    count: jax.Array  # controller updates done
    reward_sign: jax.Array  # +1, or -1 for the broken variant (traced: vmappable)
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    carry = (jnp.zeros(cfg.lstm_hidden), jnp.zeros(cfg.lstm_hidden))
    params = controller(cfg).init(k_net, carry, jnp.int32(0), 0)
    return State(params, optax.adam(cfg.lr).init(params), jnp.zeros(()), jnp.zeros((), jnp.int32),
                 jnp.asarray(cfg.reward_sign, jnp.float32), key)


def update(state: State, cfg: Config):
    """One controller update: sample K policies, train K + 1 children (the last without
    augmentation), Eq. 2's advantages, `ppo_epochs` Adam steps of Eq. 3."""
    key, k_pol, k_child = jax.random.split(state.key, 3)
    actions, logp_old, _, logits = jax.vmap(lambda k: decide(state.params, cfg, key=k))(
        jax.random.split(k_pol, cfg.num_policies))  # [K, T]
    logp_old = logp_old.sum(1)
    policies = actions.reshape(cfg.num_policies, cfg.num_sub_policies, -1, 3)
    noaug = jnp.zeros_like(policies[:1])  # probability bin 0 everywhere
    acc, child_loss = jax.vmap(lambda k, p: train_child(k, p, cfg))(
        jax.random.split(k_child, cfg.num_policies + 1), jnp.concatenate([policies, noaug]))
    reward = state.reward_sign * acc[:-1]
    # Eq. 2: the moving-average baseline (started at the first batch's mean reward)
    b = jnp.where(state.count == 0, reward.mean(), state.baseline)
    adv = reward - b
    tx = optax.adam(cfg.lr)

    def epoch(carry, _):
        params, opt = carry
        (loss, ent), grads = jax.value_and_grad(ppo_loss, has_aux=True)(
            params, actions, logp_old, adv, cfg)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), (loss, ent)

    (params, opt), (loss, ent) = jax.lax.scan(epoch, (state.params, state.opt_state), None,
                                              cfg.ppo_epochs)
    # mass on each op: softmax of the type decisions, averaged over the K x 10 op slots
    op_probs = jax.nn.softmax(logits[:, 0::3, :len(cfg.ops)], -1).mean((0, 1))
    metrics = {"charts/reward_mean": acc[:-1].mean(), "charts/reward_max": acc[:-1].max(),
               "charts/noaug_acc": acc[-1], "charts/baseline": b,
               "losses/ppo": loss[-1], "losses/entropy": ent[0],
               "losses/child_loss": child_loss[:-1].mean()}
    for i, o in enumerate(cfg.ops):
        metrics[f"charts/op_prob_{o}"] = op_probs[i]
    if SHIFTS[cfg.val_shift] is not None:
        metrics["charts/target_op_prob"] = op_probs[cfg.ops.index(SHIFTS[cfg.val_shift])]
    b = cfg.baseline_decay * b + (1 - cfg.baseline_decay) * reward.mean()
    return State(params, opt, b, state.count + 1, state.reward_sign, key), metrics


# --- PLOT ---


def plot(history: dict, cfg: Config, out: str):
    """(a) controller's probability of each op per update; (b) child validation accuracy
    (mean and max over the sampled policies) against the child without augmentation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    it = np.arange(1, cfg.num_controller_updates + 1)
    for o in cfg.ops:
        y = np.asarray(history[f"charts/op_prob_{o}"])
        ax[0].plot(it, y.mean(0), lw=2.5 if o == SHIFTS[cfg.val_shift] else 1.2, label=o)
    ax[0].set(xlabel="controller update", ylabel="P(op type)", title="controller's op mass")
    for k, lab in (("reward_mean", "policies (mean)"), ("reward_max", "policies (max)"),
                   ("noaug_acc", "no augmentation")):
        ax[1].plot(it, np.asarray(history[f"charts/{k}"]).mean(0), label=lab)
    ax[1].set(xlabel="controller update", ylabel=f"val accuracy ({cfg.val_shift} shift)",
              title="child reward")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = ["charts/reward_mean", "charts/reward_max", "charts/noaug_acc",
           "charts/target_op_prob"]


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the curves of this run)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, argv=argv, doc=__doc__,
                   summary_keys=SUMMARY)
    if flags["--plot"] is not None:
        print("wrote", plot(res.history, run.parse(Config, PRESETS, argv)[0], flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
