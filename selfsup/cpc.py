"""CPC: Contrastive Predictive Coding, on sequences (a GRU context) and on images (a masked
PixelCNN-style context over a patch grid).

[1] A. van den Oord, Y. Li, O. Vinyals. "Representation Learning with Contrastive Predictive
    Coding." arXiv:1807.03748 (2018).
[2] O. J. Henaff, A. Srinivas, J. De Fauw, A. Razavi, C. Doersch, S. M. A. Eslami,
    A. van den Oord. "Data-Efficient Image Recognition with Contrastive Predictive Coding."
    arXiv:1905.09272 (2019). Its appendix gives the image CPC loss and context network as
    pseudo-code (PixelCNN blocks; steps_to_ignore / steps_to_predict); no official code.

An encoder g_enc maps each observation (a frame of a 1-d signal, or an image patch) to
z_t = g_enc(x_t); an autoregressive model summarises the past into c_t = g_ar(z_<=t). One
matrix W_k per prediction offset k scores a candidate z against the context:

    f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t)                                    [1] Eq. 3
    L_N = -E_X[ log f_k(x_{t+k}, c_t) / sum_{x_j in X} f_k(x_j, c_t) ]            [1] Eq. 4
    L = sum_{k=min_step..pred_steps} L_N(k)   (the mean over all positions t)
([1] Sec. 2.3 defines L_N for one k; the sum over k is [2]'s App. pseudo-code.)

X holds the one positive z_{t+k} and N - 1 negatives: every other z of the mini-batch (all
positions of all sequences or images, [2] App. pseudo-code), so N = batch * positions.
`mode` picks the setting:
- "sequence" ([1] Sec. 3.1, audio): a strided 1-d conv encoder (one z per prod(strides)
  samples) and a GRU g_ar. The signals are procedural (below); the class of a sequence is
  probed from the time-averaged context c_t (see Differences).
- "image" ([1] Sec. 3.2, [2]): the image is cut into an overlapping G x G grid of patches
  (side patch_size, stride patch_stride; 256 -> 7 x 7 of 64 at stride 32 in [1]); a
  pre-activation ResNet without normalisation ([1] Sec. 3.2: "We did not use
  Batch-Norm"; [2] finds BN harmful to CPC and uses layer norm) encodes
  each patch to z_{i,j}; the context c_{i,j} = g_ar(z_{u,v}, u <= i) comes from [2]'s masked
  PixelCNN: residual blocks of 1x1 conv, ReLU, 1x3 conv, a 2x1 conv over rows (i - 1, i) of
  the top-padded map, ReLU, 1x1 conv; so c_{i,j} never reads a row below i, and the target
  rows i + k (k >= 1) stay unseen. Predictions z^_{i+k,j} = W_k c_{i,j} run top to bottom.
  The representation is z mean-pooled over the grid (the context net is discarded).

Procedural sequences (no audio ships offline): class y in 0..seq_classes-1 sets a
"speaker" pitch f_y = 0.02 + 0.18 y / (seq_classes - 1) cycles per sample; every two
latent frames a new "phoneme" draws the amplitudes a_1, a_2 ~ U(0, 1) of the fundamental
and of the second harmonic; x(t) = a_1 sin(2 pi f_y t + phi_1) + a_2 sin(4 pi f_y t + phi_2)
+ seq_noise * eps. The pitch and the phases phi_1, phi_2 are drawn once per sequence, the
amplitudes once per phoneme: the pitch is the slow feature of the class that CPC has to
keep in c_t to predict frames k steps ahead.

Evaluation (`evaluate`): frozen features, a linear and a k-NN probe (common/probe.py) with
all labels and probe_per_class labels per class, for the trained encoder and for the same
encoder at its random init in the same run (keys prefixed "init_"): random conv features
already probe digits at 0.73-0.91, so only the comparison says anything.

Reproduce (CPU demos):
    python selfsup/cpc.py --preset quick --plot selfsup/cpc.png   # image CPC, 32x32 digits
    python selfsup/cpc.py --preset quick_seq                     # sequence CPC
Measured (`quick`, 1 seed, 600 steps of 32 images, 15 min wall / 148 CPU s on a heavily
loaded 2-core CPU): contrastive accuracy 0.18 (chance 1/1568), held-out batch 0.17; probes
on the 797 held-out digits, CPC vs the same encoder at random init: linear 0.892 vs 0.848
(all labels), 0.748 vs 0.668 (10 per class); k-NN 0.684 vs 0.581, 0.354 vs 0.202 (the
picture: selfsup/cpc.png). `quick_seq` (1 seed, 600 steps, 2 min wall / 35 CPU s):
contrastive accuracy 0.53 (chance 1/512); pitch probes on 500 held-out signals, CPC vs init:
linear 0.930 vs 0.906, 0.824 vs 0.750 (10 per class); k-NN 0.810 vs 0.792, 0.640 vs 0.678
(the few-label k-NN does not improve). Tests' 40-step TINY (2 seeds): accuracy 9.6 and 7.8 x
chance, linear 0.56 0.67 vs 0.48 0.51 at init; positives from another sequence (broken) stay
at 2.2 x chance. The slow image test (`quick`, 300 steps, seed 0): accuracy 131 x chance vs
14.9 x for positives from another image; 10-per-class probes linear 0.733 vs 0.635 at
init, k-NN 0.375 vs 0.276 (the broken encoder's probes, 0.715 and 0.469, beat init too).
Paper settings (GPU): `--preset paper` (image CPC of [1] Sec. 3.2 on the digits resized to
256 x 256, ResNet-v2-101's first three stacks, 7 x 7 grid, k = 1..5) and `--preset audio`
([1] Sec. 3.1 sizes: 20480-sample windows, strides 5,4,2,2,2, kernels 10,8,4,4,4, 512
channels, GRU 256, k = 1..12, Adam 2e-4, batch 8, on the procedural signals).
[1] Table 3: ImageNet linear top-1 48.7% (ResNet-v2-101; Table 4: top-5 73.6%); Table 1
(LibriSpeech): phone classification 64.6%, speaker classification 97.4%.
[2] (ICML 2020 version): 71.5% top-1 (ResNet-161), 63.8% (ResNet-50).

Differences from the paper:
- Data: no ImageNet or LibriSpeech offline. Images are scikit-learn's digits (1,000 train,
  797 held out), grey, resized bilinearly on the device from 8x8 to image_size, with no
  augmentation. [1] takes a random 256 x 256 crop of the 300 x 300 image, flips it with
  probability 0.5, converts it to greyscale, and takes a random 60 x 60 sub-crop of every
  64-px patch, padded back to 64; [2] augments every patch heavily. Sequences are the
  procedural signals above, drawn fresh every step.
- The loss sums the per-k means over offsets min_step..pred_steps; [1] predicts "up to five
  rows" (min_step 1). [2]'s pseudo-code loops over range(steps_to_ignore=2,
  steps_to_predict=3) with offset i + 1, i.e. it predicts k = 3 only by default, and gives
  no reason; with a patch stride of half the patch only k = 1 overlaps the context's row.
  The quick image preset's min_step 2 (k = 2..4) is our choice.
- f_k scores z directly, as [1]; [2]'s extra 1x1 target projection (64-d) and its
  embedding scale 0.1 are left out. Only top-to-bottom prediction ([2] adds other
  directions). The PixelCNN's width (256) and 5 blocks are [2]'s; [1] does not give them.
- Patch encoder: [1] uses ResNet-v2-101's first three blocks as TF-slim builds them, which
  stride 2 in the LAST unit of blocks 1-3; ours strides in the FIRST block of stages 2-3
  (none in stage 1) and applies a ReLU before the mean-pool. The stem is ImageNet's (7x7/2
  conv, 3x3/2 max-pool) for patches of 32 px or more and a 3x3/1 conv for smaller ones.
- num_steps of the image setting is ours ([1] gives none); the audio preset's 300,000 is
  [1] Sec. 3.1's ("roughly at 300,000 updates").
- The sequence probes read c_t averaged over time; [1] Sec. 3.1 classifies phones from the
  frame-wise c_t and, for speakers, says "we do not average utterances over time". Our one
  label per sequence (the pitch) makes the average the simple choice.
- Sequence encoder convs pad SAME (T = ceil(L / prod(strides))); [1] does not say.
- Batches are drawn with replacement-free sampling every step (no epochs). [1] trains with a
  batch of 16 per GPU on 32 GPUs for images, 8 per GPU on 8 GPUs for audio; the presets
  take one GPU's batch, so N is smaller.
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
from common.nets import shifted_conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """CPC; defaults are [1]'s ImageNet image setting (Sec. 3.2) on the offline digits."""

    mode: str = "image"
    """"image" (patch grid, masked PixelCNN context) or "sequence" (1-d conv, GRU context)"""
    image_size: int = 256
    """image mode: side of the images (digits resized from 8x8)"""
    patch_size: int = 64
    """image mode: side of each patch of the grid"""
    patch_stride: int = 32
    """image mode: stride between patches (overlap = patch_size - patch_stride)"""
    stage_sizes: tuple[int, ...] = (3, 4, 23)
    """image mode: bottleneck blocks per stage of the patch ResNet ((3, 4, 23): ResNet-101's
    first three stacks, [1])"""
    width: int = 64
    """image mode: bottleneck width of the first stage (z has 4 * width * 2^(stages-1) dims)"""
    context_blocks: int = 5
    """image mode: residual blocks of the masked PixelCNN context network ([2])"""
    context_channels: int = 256
    """image mode: hidden channels of the PixelCNN blocks ([2])"""
    seq_length: int = 20480
    """sequence mode: samples per sequence ([1]: 20480 at 16 kHz)"""
    enc_channels: int = 512
    """sequence mode: channels of every encoder conv ([1]: 512)"""
    enc_kernels: tuple[int, ...] = (10, 8, 4, 4, 4)
    """sequence mode: encoder conv kernel sizes ([1])"""
    enc_strides: tuple[int, ...] = (5, 4, 2, 2, 2)
    """sequence mode: encoder conv strides ([1]: 160 samples per z)"""
    gru_size: int = 256
    """sequence mode: hidden size of the GRU context g_ar ([1]: 256)"""
    seq_classes: int = 10
    """sequence mode: latent classes ("speakers", pitches) of the procedural signals"""
    seq_noise: float = 0.3
    """sequence mode: std of the white noise added to the signals"""
    seq_probe_test: int = 500
    """sequence mode: held-out sequences of the probes (num_train train the probes)"""
    pred_steps: int = 5
    """largest prediction offset k ([1]: 5 rows for images, 12 steps for audio)"""
    min_step: int = 1
    """smallest prediction offset k ([1]: 1; [2]'s pseudo-code predicts k = 3 only)"""
    batch_size: int = 16
    """images or sequences per step (one GPU's batch in [1])"""
    num_steps: int = 100_000
    """training steps (images: not stated in [1], ours; audio preset: [1]'s 300,000)"""
    lr: float = 2e-4
    """Adam learning rate ([1]: 2e-4)"""
    num_train: int = 1000
    """digits (image mode) or fixed sequences (sequence mode) that train the probes"""
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
    def grid(self) -> int:
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    @property
    def seq_frames(self) -> int:
        return -(-self.seq_length // int(np.prod(self.enc_strides)))

    @property
    def positions(self) -> tuple[int, int]:
        """(rows T, columns S) of the z map: (grid, grid) or (frames, 1)."""
        return (self.grid, self.grid) if self.mode == "image" else (self.seq_frames, 1)

    @property
    def num_classes(self) -> int:
        return 10 if self.mode == "image" else self.seq_classes

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.mode not in ("image", "sequence"):
            raise ValueError(f"mode={self.mode!r} must be 'image' or 'sequence'")
        if self.patch_size > self.image_size or self.patch_stride < 1:
            raise ValueError(f"patch_size={self.patch_size} must be <= image_size="
                             f"{self.image_size} and patch_stride={self.patch_stride} >= 1")
        if not self.stage_sizes or min(self.stage_sizes) < 1 or self.width < 1:
            raise ValueError(f"stage_sizes={self.stage_sizes} must be non-empty, each >= 1, "
                             f"and width={self.width} >= 1")
        if self.context_blocks < 1 or self.context_channels < 1 or self.enc_channels < 1:
            raise ValueError(f"context_blocks={self.context_blocks}, context_channels="
                             f"{self.context_channels}, enc_channels={self.enc_channels} "
                             "must be >= 1")
        if (len(self.enc_kernels) != len(self.enc_strides) or not self.enc_kernels
                or min(self.enc_kernels + self.enc_strides) < 1):
            raise ValueError(f"enc_kernels={self.enc_kernels} and enc_strides="
                             f"{self.enc_strides} must be non-empty, as long, each >= 1")
        if self.seq_classes < 2 or self.seq_noise < 0 or self.seq_probe_test < 1:
            raise ValueError(f"seq_classes={self.seq_classes} must be >= 2, seq_noise="
                             f"{self.seq_noise} >= 0, seq_probe_test={self.seq_probe_test} >= 1")
        if not 1 <= self.min_step <= self.pred_steps:
            raise ValueError(f"min_step={self.min_step} must be in [1, pred_steps="
                             f"{self.pred_steps}]")
        if self.positions[0] <= self.pred_steps:
            raise ValueError(f"pred_steps={self.pred_steps} must be < the rows of the z map "
                             f"({self.positions[0]}: grid or seq_length / prod(enc_strides))")
        if self.probe_per_class < 1 or self.knn_k < 1:
            raise ValueError(f"probe_per_class={self.probe_per_class} and knn_k={self.knn_k} "
                             "must be >= 1")
        if self.knn_temperature <= 0 or self.probe_l2 < 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0 and "
                             f"probe_l2={self.probe_l2} >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if self.mode == "image" and self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} must be <= num_train="
                             f"{self.num_train} (a batch draws distinct training digits)")
        if self.batch_size < 1 or self.num_train < 1:
            raise ValueError(f"batch_size={self.batch_size} and num_train={self.num_train} "
                             "must be >= 1")
        counts = np.bincount(np.asarray(probe_data_labels(self)), minlength=self.num_classes)
        if self.probe_per_class > counts.min():
            raise ValueError(f"probe_per_class={self.probe_per_class} must be <= the smallest "
                             f"class count {counts.min()} of the num_train={self.num_train} "
                             "probe training labels")


PRESETS = {
    # CPU demo: 32x32 digits, 7x7 grid of 8-px patches at stride 4, k = 2..4 (min_step 2 is
    # our choice: it skips the one offset whose patch overlaps the context's), a small ResNet.
    "quick": dict(image_size=32, patch_size=8, patch_stride=4, stage_sizes=(1, 1), width=8,
                  context_blocks=2, context_channels=32, pred_steps=4, min_step=2,
                  batch_size=32, num_steps=600, lr=2e-3, shift_conv=True),
    # CPU demo of the sequence mode: 256 samples, 16 frames, GRU 32, k = 1..4.
    "quick_seq": dict(mode="sequence", seq_length=256, enc_channels=32, enc_kernels=(8, 4, 4),
                      enc_strides=(4, 2, 2), gru_size=32, pred_steps=4, batch_size=32,
                      num_steps=600, lr=2e-3, shift_conv=True),
    # [1] Sec. 3.1 (audio) sizes on the procedural signals.
    "audio": dict(mode="sequence", pred_steps=12, batch_size=8, num_steps=300_000),
    "paper": dict(),
}


# --- NETWORKS ---


def _conv(features, kernel, stride=(1, 1), padding="SAME", *, shift, dtype, **kw):
    return nn.Conv(features, kernel, stride, padding=padding, dtype=dtype,
                   conv_general_dilated=shifted_conv if shift else None, **kw)


class PreActBottleneck(nn.Module):
    """ResNet v2 bottleneck without normalisation ([1]): relu -> 1x1 -> relu -> 3x3 (stride)
    -> relu -> 1x1 (4x width), projection shortcut where the shape changes."""

    width: int
    stride: int
    shift: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(_conv, shift=self.shift, dtype=self.dtype)
        y = nn.relu(x)
        short = x
        if x.shape[-1] != 4 * self.width or self.stride != 1:
            short = conv(4 * self.width, (1, 1), (self.stride, self.stride))(y)
        y = nn.relu(conv(self.width, (1, 1))(y))
        y = nn.relu(conv(self.width, (3, 3), (self.stride, self.stride))(y))
        return short + conv(4 * self.width, (1, 1))(y)


class PatchEncoder(nn.Module):
    """g_enc of image CPC: patches (N, P, P, C) -> z (N, D), mean-pooled last stage."""

    stage_sizes: tuple[int, ...]
    width: int
    shift: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(_conv, shift=self.shift, dtype=self.dtype)
        if x.shape[1] >= 32:  # ImageNet stem
            x = conv(self.width, (7, 7), (2, 2))(x)
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        else:  # small patches: CIFAR stem
            x = conv(self.width, (3, 3))(x)
        for i, n in enumerate(self.stage_sizes):
            for b in range(n):
                x = PreActBottleneck(self.width * 2**i, 2 if (i > 0 and b == 0) else 1,
                                     self.shift, self.dtype)(x)
        return nn.relu(x).mean((1, 2))  # (N, 4 * width * 2^(stages - 1))


class PixelCNNContext(nn.Module):
    """g_ar of image CPC ([2] App. pseudo-code): z (B, G, G, D) -> c (B, G, G, D) with
    c_{i,j} a function of the rows u <= i of z only (the 2x1 conv reads rows i-1 and i of
    the map padded by one row at the top)."""

    blocks: int
    channels: int
    shift: bool
    dtype: Any

    @nn.compact
    def __call__(self, z):
        conv = functools.partial(_conv, shift=self.shift, dtype=self.dtype)
        cres = z
        for _ in range(self.blocks):
            c = nn.relu(conv(self.channels, (1, 1))(cres))
            c = conv(self.channels, (1, 3))(c)  # along the row: no vertical reach
            c = jnp.pad(c, ((0, 0), (1, 0), (0, 0), (0, 0)))  # (B, G + 1, G, ch): row above
            c = nn.relu(conv(self.channels, (2, 1), padding="VALID")(c))  # rows i-1, i
            cres = cres + conv(z.shape[-1], (1, 1))(c)
        return nn.relu(cres)


class SeqEncoder(nn.Module):
    """g_enc of sequence CPC: x (B, L, 1, 1) -> z (B, T, 1, D), strided convs (as (k, 1)
    2-d convs), ReLU after each ([1] Sec. 3.1)."""

    channels: int
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    shift: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        for k, s in zip(self.kernels, self.strides, strict=True):
            x = nn.relu(_conv(self.channels, (k, 1), (s, 1), shift=self.shift,
                              dtype=self.dtype)(x))
        return x


class CPC(nn.Module):
    """g_enc, g_ar and the W_k of [1] Eq. 3, for either mode."""

    cfg: Any

    def setup(self):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        if c.mode == "image":
            self.enc = PatchEncoder(c.stage_sizes, c.width, c.shift_conv, dt)
            self.ar = PixelCNNContext(c.context_blocks, c.context_channels, c.shift_conv, dt)
            d = 4 * c.width * 2 ** (len(c.stage_sizes) - 1)
            h = d
        else:
            self.enc = SeqEncoder(c.enc_channels, c.enc_kernels, c.enc_strides, c.shift_conv,
                                  dt)
            self.ar = nn.RNN(nn.GRUCell(c.gru_size, dtype=dt))
            d, h = c.enc_channels, c.gru_size
        num_k = c.pred_steps - c.min_step + 1
        self.w = self.param("W_k", nn.initializers.lecun_normal(batch_axis=(0,)), (num_k, h, d))

    def encode(self, x):
        """x (B, H, W, 1) images or (B, L, 1, 1) signals -> z (B, T, S, D)."""
        if self.cfg.mode == "sequence":
            return self.enc(x).astype(jnp.float32)
        p = patches(x, self.cfg)  # (B, G, G, P, P, 1)
        b, g = p.shape[:2]
        z = self.enc(p.reshape(b * g * g, *p.shape[3:]))  # (B G G, D)
        return z.reshape(b, g, g, -1).astype(jnp.float32)

    def context(self, z):
        """z (B, T, S, D) -> c (B, T, S, H), causal along T."""
        if self.cfg.mode == "sequence":
            return self.ar(z[:, :, 0])[:, :, None].astype(jnp.float32)  # (B, T, 1, H)
        return self.ar(z).astype(jnp.float32)

    def predict(self, c):
        """W_k c for k = min_step..pred_steps: (K, B, T, S, D)."""
        return jnp.einsum("btsh,khd->kbtsd", c, self.w)

    def __call__(self, x):
        z = self.encode(x)
        return z, self.predict(self.context(z))


# --- DATA ---


def patches(x, cfg: Config):
    """Images (B, H, W, C) -> the overlapping grid (B, G, G, P, P, C); patch (i, j) starts at
    pixel (i * stride, j * stride)."""
    g, p, s = cfg.grid, cfg.patch_size, cfg.patch_stride
    rows = [jnp.stack([x[:, i * s:i * s + p, j * s:j * s + p] for j in range(g)], 1)
            for i in range(g)]
    return jnp.stack(rows, 1)


@functools.cache
def digits8(num_train: int):
    """(train_x (n, 8, 8, 1), train_y, test_x, test_y) numpy, resized on the device."""
    return data.digit_images(8, num_train)


def resize(x8, cfg: Config):
    """8x8 digits in [0, 1] -> (B, image_size, image_size, 1) in [-1, 1]."""
    b = x8.shape[0]
    x = jax.image.resize(x8, (b, cfg.image_size, cfg.image_size, 1), "bilinear")
    return 2.0 * x - 1.0


PROBE_KEYS = (101, 202)  # PRNGKeys of the sequence mode's probe train and test signals


def sequence_classes(key, n: int, cfg: Config):
    """The classes (n,) of make_sequences(key, n, cfg)."""
    return jax.random.randint(jax.random.split(key, 4)[0], (n,), 0, cfg.seq_classes)


def probe_data_labels(cfg: Config):
    """The labels of the probes' training set (for validate's class counts)."""
    if cfg.mode == "image":
        return digits8(cfg.num_train)[1]
    return sequence_classes(jax.random.PRNGKey(PROBE_KEYS[0]), cfg.num_train, cfg)


def make_sequences(key, n: int, cfg: Config):
    """n procedural signals (n, seq_length, 1, 1) and their classes (n,) (see docstring)."""
    _, k_ph, k_amp, k_eps = jax.random.split(key, 4)
    y = sequence_classes(key, n, cfg)
    f = 0.02 + 0.18 * y / (cfg.seq_classes - 1)  # (n,) cycles per sample
    seg = 2 * int(np.prod(cfg.enc_strides))  # a "phoneme" lasts two latent frames
    t = jnp.arange(cfg.seq_length)
    amp = jax.random.uniform(k_amp, (n, -(-cfg.seq_length // seg), 2))[:, t // seg]  # (n, L, 2)
    phi = jax.random.uniform(k_ph, (n, 1, 2), maxval=2 * jnp.pi)
    wave = jnp.sin(2 * jnp.pi * f[:, None, None] * t[None, :, None] * jnp.array([1.0, 2.0])
                   + phi)  # (n, L, 2): fundamental, second harmonic
    x = (amp * wave).sum(-1) + cfg.seq_noise * jax.random.normal(k_eps, (n, cfg.seq_length))
    return x[:, :, None, None], y


# --- LOSS ---


def info_nce(preds, targets, labels):
    """[1] Eq. 4 with the log-bilinear f_k of Eq. 3: logits_{m,n} = preds_m^T targets_n
    (= z_n^T W_k c_m), cross-entropy of the positive `labels` (M,) among all N targets.
    Returns (mean loss, accuracy of ranking the positive first)."""
    logits = preds @ targets.T  # (M, N)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def cpc_loss(z, preds, cfg: Config):
    """Sum over k of InfoNCE: the prediction W_k c at (b, t, s) has the positive z at
    (b, t + k, s) and every z of the batch as candidates. z (B, T, S, D), preds (K, B, T, S, D).
    Returns (loss, mean accuracy over k, chance 1 / N)."""
    b, t, s, d = z.shape
    targets = z.reshape(b * t * s, d)  # row index (b T + t) S + s
    loss, acc = 0.0, 0.0
    for i, k in enumerate(range(cfg.min_step, cfg.pred_steps + 1)):
        pred = preds[i, :, :t - k].reshape(-1, d)  # contexts with a future row t + k < T
        bb, tt, ss = jnp.meshgrid(jnp.arange(b), jnp.arange(t - k), jnp.arange(s),
                                  indexing="ij")
        labels = ((bb * t + tt + k) * s + ss).reshape(-1)  # the k-step shift
        l_k, a_k = info_nce(pred, targets, labels)
        loss, acc = loss + l_k, acc + a_k
    return loss, acc / (cfg.pred_steps - cfg.min_step + 1), 1.0 / (b * t * s)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    init_params: Any  # the encoder at its random init: the probes' baseline
    opt_state: Any
    step: jax.Array
    key: jax.Array


def dummy_input(cfg: Config):
    if cfg.mode == "image":
        return jnp.zeros((1, cfg.image_size, cfg.image_size, 1))
    return jnp.zeros((1, cfg.seq_length, 1, 1))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = CPC(cfg).init(k_net, dummy_input(cfg))["params"]
    return State(params, params, optax.adam(cfg.lr).init(params), jnp.zeros((), jnp.int32),
                 key)


def batch(key, cfg: Config):
    """One training batch: digits resized (image mode) or fresh signals (sequence mode)."""
    if cfg.mode == "sequence":
        return make_sequences(key, cfg.batch_size, cfg)[0]
    train_x = jnp.asarray(digits8(cfg.num_train)[0])
    idx = jax.random.choice(key, cfg.num_train, (cfg.batch_size,), replace=False)
    return resize(train_x[idx], cfg)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, tx = CPC(cfg), optax.adam(cfg.lr)
    key, k_batch = jax.random.split(state.key)
    x = batch(k_batch, cfg)

    def loss_fn(params):
        z, preds = net.apply({"params": params}, x)
        loss, acc, _ = cpc_loss(z, preds, cfg)
        return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/info_nce": loss, "charts/cpc_acc": acc,
               "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         key=key), metrics


# --- EVALUATE ---


def features(params, x, cfg: Config):
    """The frozen representation: z mean-pooled over the grid (image) or c_t averaged over
    time (sequence); computed batch_size inputs at a time (lax.map over zero-padded chunks),
    so memory stays at one training batch's forward pass."""
    net = CPC(cfg)

    def chunk(xc):
        z = net.apply({"params": params}, xc, method=CPC.encode)
        if cfg.mode == "image":
            return z.mean((1, 2))
        return net.apply({"params": params}, z, method=CPC.context).mean((1, 2))

    n, c = x.shape[0], cfg.batch_size
    m = -(-n // c)
    xp = jnp.pad(x, ((0, m * c - n),) + ((0, 0),) * (x.ndim - 1))
    return jax.lax.map(chunk, xp.reshape(m, c, *x.shape[1:])).reshape(m * c, -1)[:n]


def probe_data(cfg: Config):
    """(train_x, train_y, test_x, test_y) of the probes, on the device."""
    if cfg.mode == "image":
        tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
            tuple(jnp.asarray(a) for a in digits8(cfg.num_train)))
        return resize(tr_x, cfg), tr_y, resize(te_x, cfg), te_y
    tr_x, tr_y = make_sequences(jax.random.PRNGKey(PROBE_KEYS[0]), cfg.num_train, cfg)
    te_x, te_y = make_sequences(jax.random.PRNGKey(PROBE_KEYS[1]), cfg.seq_probe_test, cfg)
    return tr_x, tr_y, te_x, te_y


def evaluate(state: State, cfg: Config):
    """Probe accuracies on held-out data (797 digits or seq_probe_test signals): linear and
    k-NN with all num_train labels ("linear", "knn") and probe_per_class per class
    ("linear_few", "knn_few"); the same for the encoder at init ("init_..."); and the
    contrastive accuracy of one held-out batch ("cpc_acc_test")."""
    tr_x, tr_y, te_x, te_y = probe_data(cfg)

    def probes(params):
        f = features(params, jnp.concatenate([tr_x, te_x]), cfg)  # one traced encoder
        return probe.probe(jax.random.PRNGKey(0), f[:len(tr_y)], tr_y, f[len(tr_y):], te_y,
                           cfg.num_classes, cfg.probe_per_class,
                           cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)

    # trained and initial networks through one vmapped program (half the compile)
    both = jax.vmap(probes)(jax.tree.map(lambda a, b: jnp.stack([a, b]), state.params,
                                         state.init_params))
    out = {k: v[0] for k, v in both.items()} | {"init_" + k: v[1] for k, v in both.items()}
    z, preds = CPC(cfg).apply({"params": state.params}, te_x[:cfg.batch_size])
    out["cpc_acc_test"] = cpc_loss(z, preds, cfg)[1]
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: InfoNCE and contrastive accuracy over training (chance 1/N) and the probes
    of the trained encoder beside the same encoder at init."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    h = {k: np.asarray(v)[0] for k, v in res.history.items()}
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    t, s = cfg.positions
    chance = 1.0 / (cfg.batch_size * t * s)
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].plot(h["losses/info_nce"])
    ax[0].set(title="InfoNCE (sum over k)", xlabel="update")
    ax[1].plot(h["charts/cpc_acc"], label="positive ranked first")
    ax[1].axhline(chance, color="gray", ls="--", label=f"chance 1/{round(1 / chance)}")
    ax[1].set(title="contrastive accuracy", xlabel="update", yscale="log")
    ax[1].legend(fontsize=8)
    names = ["linear", "linear_few", "knn", "knn_few"]
    x = np.arange(len(names))
    ax[2].bar(x - 0.2, [f["init_" + n] for n in names], 0.4, label="random init")
    ax[2].bar(x + 0.2, [f[n] for n in names], 0.4, label="CPC")
    ax[2].set_xticks(x, ["linear", "linear 10/cl", "k-NN", "k-NN 10/cl"], fontsize=8)
    ax[2].set(title="held-out probes", ylim=(0, 1))
    ax[2].legend(fontsize=8)
    fig.suptitle(f"CPC ({cfg.mode} mode), k = {cfg.min_step}..{cfg.pred_steps}", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's curves and probes."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["linear", "init_linear", "linear_few",
                                               "init_linear_few", "knn", "init_knn",
                                               "knn_few", "init_knn_few", "cpc_acc_test",
                                               "losses/info_nce", "charts/cpc_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
