"""Jigsaw puzzles: self-supervised features from reordering the 9 tiles of an image.

[1] M. Noroozi, P. Favaro. "Unsupervised Learning of Visual Representations by Solving Jigsaw
    Puzzles." ECCV 2016, arXiv:1603.09246. Released code: MehdiNoroozi/JigsawPuzzleSolver
    (commit 8041c58: train_val_cfn_jps.prototxt, solver_cfn_jps.prototxt, caffe-master-jps
    data_transformer.cpp); the permutation script of the PyTorch port bbrattoli/
    JigsawPuzzlePytorch (select_permutations.py) follows [1] Algorithm 1.

A crop of image_size^2 pixels is cut into a grid x grid array of cells; from every cell a
tile_size^2 tile is taken at a random offset (random gaps between tiles, so that edges and
textures do not continue from one tile into the next: [1] Sec. 3.2's anti-shortcut), and
each tile is normalised to zero mean and unit std on its own (no shortcut through low-level
statistics). A permutation p is drawn from a fixed set P and the tiles are fed in its order;
the context-free network (CFN) classifies which of the |P| permutations it sees:

    shuffled_i = tile_{p(i)},  i = 1..9                  (slot i holds cell p(i); released code)
    f_i = fc6(trunk(shuffled_i)), trunk and fc6 shared by the 9 tiles (Siamese)   [1] Sec. 3.1
    logits = fc8(relu(fc7(concat(f_1, ..., f_9)))),  loss = -log softmax(logits)_{index(p)}
P is chosen greedily for large Hamming distances ([1] Algorithm 1): start from a random
permutation, then repeatedly add the permutation whose SUMMED Hamming distance to the
permutations already chosen is largest (D = Hamming(P, P_bar), D_bar = 1^T D, j = argmax D_bar;
first argmax over the lexicographic order). On RGB inputs two more anti-shortcut measures run:
a fraction gray_prob of the images become greyscale and each colour channel is shifted by up to
channel_jitter pixels (against chromatic aberration); both are identities on the 1-channel digits.

Evaluation is frozen: the tile trunk (conv layers) runs on whole images, its last map is
globally average-pooled, and the linear and k-NN probes of common/probe.py read it, with all
labels and with probe_per_class labels per class; and the held-out puzzle accuracy.

Reproduce (CPU demo on scikit-learn's digits upsampled to 48x48, 3x3 tiles of 12 px in 16-px
cells, 64 permutations):
    python selfsup/jigsaw.py --preset quick --num-seeds 1 --plot selfsup/jigsaw.png
Measured (1 seed, 300 steps, ~4 min on a heavily shared 2-core CPU): held-out puzzle
accuracy 0.893 (chance 1/64); linear probe 0.907 (all labels) / 0.742 (10 per class), k-NN
0.759 / 0.560; the same network at random init: 0.02; 0.936 / 0.799, 0.832 / 0.668. The
puzzle is learned, but on these digits the trunk's features probe WORSE than at init; at
100 steps the same holds for tiles without gaps (the edge shortcut: k-NN 10/class 0.45 0.57)
and for the 'min' set of near-identical permutations (0.62 0.59; puzzle accuracy 0.36 0.39):
no variant separates on the probes, only the pretext accuracy does (tests/selfsup/
test_jigsaw.py). 8x8 digits upsampled have little part structure for the tiles to encode:
in `quick` a 12-px tile covers less than 2x2 source pixels of the 8x8 digit (6.5 px each
after the resize to 52). A review found no bug behind this (probes with readouts matched
to the training distribution, and [1]'s lr 0.01: still no gain over init).
Paper setting (GPU; digits upsampled to 256 and cropped to 225 in place of ImageNet):
    python selfsup/jigsaw.py --preset paper
[1]'s numbers (as recalled in the selfsup catalogue, not re-checked against the PDF here):
PASCAL VOC 2007 fine-tuning classification 67.6 mAP, detection 53.2, segmentation 37.6;
puzzle accuracy 88% with 100 permutations, 71% with 1000 (Table 1, ablation of |P| and of
the average Hamming distance: lower distances give worse transfer).

Differences from the paper:
- Data: ImageNet does not ship offline; the images are scikit-learn's 1,797 digits (1,000
  for training, 797 held out), grey 8x8, upsampled bilinearly to resize_size and randomly
  cropped to image_size (the paper: 256 then 225 of an ImageNet photo). The colour measures
  (greyscale, channel shifts) therefore never fire on the digits.
- The colour measures follow [1] Sec. 3.2's text only: neither released code has them (the
  port's rgb_jittering is an intensity jitter, with no greyscale). The channel shift is a
  jnp.roll, which wraps the shifted-out border round to the other edge.
- The released prototxt crops 255 px (85-px cells) with jitter_size 21 and 64-px tiles
  and reads permutations_100_max.bin (100 permutations, though its fc8 has 1000 outputs);
  the defaults here take the PyTorch port's 256 -> 225 crop (75-px cells, 64-px tiles) and
  1000 permutations (fc8's width; [1] Table 1's best transfer).
- The tile offset is uniform in [0, cell - tile] per tile (the released code's jitter_size);
  the tile is normalised by its scalar mean and std ([1] Sec. 3.2 and the PyTorch port; the
  released caffe code subtracts a per-channel mean only).
- gray_prob = 0.3 and channel_jitter = 2 are recalled from [1] Sec. 3.2, not re-checked.
- The AlexNet trunk pads conv1 ("SAME"), so 64-px tiles give the 3x3x256 pool5 of [1] Fig. 3:
  caffe reaches 3x3 without padding because its pooling rounds the output size up
  (64 -> conv1 27 -> pool1 13 -> conv2 13 -> pool2 6 -> conv5 6 -> pool5 3), flax's rounds
  down (pool5 would be 2x2); the port resizes tiles to 75 px instead. No grouped
  convolutions (a two-GPU artefact); flax's default (LeCun normal) initialisation in place
  of caffe's Gaussian(0.01/0.005) and biases of 0/1.
- Weight decay and learning rate are the same for every parameter: the released prototxt
  gives biases decay_mult 0 and lr_mult 2; here biases are decayed and take the base lr.
- Probes are linear (logistic regression) and k-NN on pooled conv features of the frozen
  trunk; the paper fine-tunes the whole AlexNet on PASCAL VOC and ImageNet.
- The `quick` preset narrows the trunk (3 convs of 32-64-64, no LRN), fc6/fc7 of 128/256,
  no dropout, 64 permutations, and trains 300 steps of 64 puzzles with a 10x larger
  learning rate (constant: its decay step lies past the end).
"""

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import data, probe, run
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Jigsaw CFN. Sources of the defaults: the network, optimiser and batch follow [1]'s
    released caffe solver and prototxt (AlexNet trunk, fc6 1024, fc7 4096, SGD lr 0.01
    momentum 0.9, decay 5e-4, x0.1 every 100k of 350k steps, batch 256); the data side
    (resize 256, crop 225, 75-px cells, 64-px tiles) is the PyTorch port's, and the
    1000 permutations match the released fc8's 1000 outputs and [1] Table 1's best transfer
    (the released prototxt itself differs: see Differences in the module docstring)."""

    image_size: int = 225
    """side of the square crop cut into grid x grid cells"""
    resize_size: int = 256
    """images are resized to this side before the random image_size crop"""
    grid: int = 3
    """cells per side: grid^2 tiles per puzzle"""
    tile_size: int = 64
    """side of each tile, taken at a random offset inside its cell (gap = cell - tile)"""
    num_permutations: int = 1000
    """size of the permutation set P, the number of classes"""
    permutation_selection: str = "max"
    """'max': [1] Algorithm 1 (argmax of summed Hamming distance); 'min': argmin (near-identical
    permutations, the low-distance ablation of [1] Table 1)"""
    permutation_seed: int = 0
    """seed of the random first permutation of Algorithm 1"""
    gray_prob: float = 0.3
    """probability that an RGB image is turned greyscale (no-op on 1-channel images)"""
    channel_jitter: int = 2
    """each colour channel of an RGB image is shifted by up to this many pixels"""
    num_train: int = 1000
    """digits used for training (pretext and probe fits); the other 797 are held out"""
    batch_size: int = 256
    """puzzles per SGD step"""
    num_steps: int = 350_000
    """SGD steps"""
    lr: float = 0.01
    """initial SGD learning rate"""
    lr_decay: float = 0.1
    """factor applied to the learning rate every lr_decay_every steps"""
    lr_decay_every: int = 100_000
    """steps between learning-rate decays"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """L2 weight decay added to every gradient, biases included (caffe: biases not decayed)"""
    conv_channels: tuple[int, ...] = (96, 256, 384, 384, 256)
    """output channels of the trunk's conv layers (AlexNet conv1-5)"""
    conv_kernels: tuple[int, ...] = (11, 5, 3, 3, 3)
    """kernel sides of the trunk's conv layers"""
    conv_strides: tuple[int, ...] = (2, 1, 1, 1, 1)
    """strides of the trunk's conv layers"""
    pool_after: tuple[int, ...] = (1, 2, 5)
    """conv layers (1-based) followed by a 3x3 stride-2 max pool"""
    lrn: bool = True
    """local response normalisation (size 5, alpha 1e-4, beta 0.75) after pools 1 and 2"""
    fc6_units: int = 1024
    """units of the per-tile fc6 (shared)"""
    fc7_units: int = 4096
    """units of fc7 over the concatenated tiles"""
    dropout: float = 0.5
    """dropout rate after fc6 and fc7"""
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
    def cell_size(self) -> int:
        return self.image_size // self.grid

    @property
    def num_tiles(self) -> int:
        return self.grid * self.grid

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # puzzles per update

    def validate(self):
        if self.grid < 2:
            raise ValueError(f"grid={self.grid} must be >= 2")
        if not 1 <= self.tile_size <= self.cell_size:
            raise ValueError(f"tile_size={self.tile_size} must be in [1, image_size // grid="
                             f"{self.cell_size}]")
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size={self.resize_size} must be >= image_size="
                             f"{self.image_size}")
        n_all = int(np.prod(np.arange(1, self.num_tiles + 1), dtype=np.float64))
        if self.num_permutations > n_all:
            raise ValueError(f"num_permutations={self.num_permutations} exceeds "
                             f"(grid^2)! = {n_all}")
        if self.num_tiles > 9:
            raise ValueError(f"grid={self.grid}: at most 3x3 tiles (the set enumerates all "
                             "(grid^2)! permutations)")
        if self.permutation_selection not in ("max", "min"):
            raise ValueError(f"permutation_selection={self.permutation_selection!r} must be "
                             "'max' or 'min'")
        if self.channel_jitter < 0:
            raise ValueError(f"channel_jitter={self.channel_jitter} must be >= 0")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if not len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides):
            raise ValueError(f"conv_channels={self.conv_channels}, conv_kernels="
                             f"{self.conv_kernels} and conv_strides={self.conv_strides} must "
                             "have one entry per conv layer")
        if min(self.conv_channels + self.conv_kernels + self.conv_strides) < 1:
            raise ValueError("conv_channels, conv_kernels and conv_strides must all be >= 1")
        if any(not 1 <= p <= len(self.conv_channels) for p in self.pool_after):
            raise ValueError(f"pool_after={self.pool_after} must name conv layers in "
                             f"[1, {len(self.conv_channels)}]")
        if min(self.fc6_units, self.fc7_units) < 1:
            raise ValueError(f"fc6_units={self.fc6_units}, fc7_units={self.fc7_units} must "
                             "be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.lr_decay <= 0:
            raise ValueError(f"lr_decay={self.lr_decay} must be > 0")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if self.permutation_seed < 0:
            raise ValueError(f"permutation_seed={self.permutation_seed} must be >= 0")
        if self.lr_decay_every < 1:
            raise ValueError(f"lr_decay_every={self.lr_decay_every} must be >= 1")
        if self.knn_k < 1:
            raise ValueError(f"knn_k={self.knn_k} must be >= 1")
        if self.probe_l2 < 0:
            raise ValueError(f"probe_l2={self.probe_l2} must be >= 0")
        if self.probe_per_class < 1:
            raise ValueError(f"probe_per_class={self.probe_per_class} must be >= 1")
        rarest = int(np.bincount(train_images(self)[1], minlength=10).min())
        if self.probe_per_class > rarest:
            raise ValueError(f"probe_per_class={self.probe_per_class} exceeds the rarest "
                             f"class's {rarest} training images (num_train={self.num_train})")


PRESETS = {
    # CPU demo: 48x48 digits (resized to 52, cropped), 12-px tiles in 16-px cells, 64
    # permutations, a 3-conv trunk, 300 steps of 64 puzzles.
    "quick": dict(image_size=48, resize_size=52, tile_size=12, num_permutations=64,
                  batch_size=64, num_steps=300, lr=0.1, lr_decay_every=400,
                  conv_channels=(32, 64, 64), conv_kernels=(3, 3, 3), conv_strides=(1, 2, 2),
                  pool_after=(), lrn=False, fc6_units=128, fc7_units=256, dropout=0.0,
                  shift_conv=True),
    "paper": dict(),
}


# --- PERMUTATION SET ---


@functools.cache
def permutation_set(num_tiles: int, num_permutations: int, selection: str = "max",
                    seed: int = 0) -> np.ndarray:
    """[1] Algorithm 1: (num_permutations, num_tiles) int32, row j is a permutation of
    range(num_tiles). P_bar = all permutations in lexicographic order; j ~ U[0, n!) from
    `seed`; repeat: move P_bar_j into P, D = Hamming(P, P_bar) (i x (n! - i)), D_bar = 1^T D,
    j = argmax_k D_bar_k (argmin for selection='min'; first index on ties)."""
    all_p = np.array(list(itertools.permutations(range(num_tiles))), np.int8)  # (n!, n)
    # eq[i, v]: which permutations put value v at position i; Hamming(p, q) = n - matches
    eq = np.stack([np.stack([all_p[:, i] == v for v in range(num_tiles)])
                   for i in range(num_tiles)]).astype(np.uint8)  # (n, n, n!)
    d_bar = np.zeros(len(all_p), np.int64)  # 1^T D: summed distance to the chosen set
    taken = np.zeros(len(all_p), bool)
    j = int(np.random.default_rng(seed).integers(len(all_p)))
    chosen = []
    for _ in range(num_permutations):
        chosen.append(j)
        taken[j] = True
        matches = sum(eq[i, all_p[j, i]] for i in range(num_tiles))  # uint8, <= n
        d_bar += num_tiles - matches.astype(np.int64)  # Algorithm 1 lines 8-9: new row of D
        score = np.where(taken, -1 if selection == "max" else 10**9, d_bar)
        j = int(np.argmax(score) if selection == "max" else np.argmin(score))
    return all_p[chosen].astype(np.int32)


def hamming(p, q):
    """Pairwise Hamming distances of two sets of permutations (a, n), (b, n) -> (a, b)."""
    return (np.asarray(p)[:, None, :] != np.asarray(q)[None, :, :]).sum(-1)


# --- PUZZLES ---


def extract_tiles(key, images, cfg: Config):
    """[1] Sec. 3.2: images (B, S, S, C), S = image_size -> tiles (B, grid^2, T, T, C) in
    row-major cell order, each taken at an offset uniform in [0, cell - T] inside its cell
    (key None: offset 0 for all, e.g. to draw them), then normalised to zero mean and unit
    std per tile."""
    b, g, c, t = images.shape[0], cfg.grid, cfg.cell_size, cfg.tile_size
    if key is None:
        off = jnp.zeros((b, g * g, 2), jnp.int32)
    else:
        off = jax.random.randint(key, (b, g * g, 2), 0, c - t + 1)
    corner = jnp.stack(jnp.meshgrid(jnp.arange(g), jnp.arange(g), indexing="ij"), -1)
    start = corner.reshape(g * g, 2) * c + off  # (B, g*g, 2) top-left pixel of each tile

    def one(img, st):
        return jax.vmap(lambda s: jax.lax.dynamic_slice(
            img, (s[0], s[1], 0), (t, t, img.shape[-1])))(st)

    tiles = jax.vmap(one)(images, start)  # (B, g*g, T, T, C)
    mu = tiles.mean((2, 3, 4), keepdims=True)
    sd = tiles.std((2, 3, 4), keepdims=True)
    return (tiles - mu) / (sd + 1e-5)


def shuffle_tiles(tiles, perms):
    """Slot i of puzzle b holds tile perms[b, i] (the released code's dst = src[H[i]]):
    tiles (B, N, ...), perms (B, N) -> (B, N, ...)."""
    return jnp.take_along_axis(tiles, perms.reshape(perms.shape + (1,) * (tiles.ndim - 2)), 1)


def unshuffle_tiles(shuffled, perms):
    """The inverse of shuffle_tiles: tiles back in cell order given the permutations."""
    return shuffle_tiles(shuffled, jnp.argsort(perms, axis=1))


def color_measures(key, images, cfg: Config):
    """[1] Sec. 3.2 against chromatic aberration (text only: not in the released code),
    on RGB images only: greyscale with probability gray_prob, and every channel rolled by
    its own (dy, dx) in [-channel_jitter, channel_jitter] (jnp.roll: wraps at the edge).
    Identity on 1-channel images."""
    if images.shape[-1] == 1:
        return images
    k_g, k_s = jax.random.split(key)
    b, ch = images.shape[0], images.shape[-1]
    gray = jax.random.uniform(k_g, (b, 1, 1, 1)) < cfg.gray_prob
    images = jnp.where(gray, jax.vmap(data.grayscale)(images), images)
    j = cfg.channel_jitter
    shift = jax.random.randint(k_s, (b, ch, 2), -j, j + 1)

    def roll(img, s):  # img (S, S), s (2,)
        return jnp.roll(img, (s[0], s[1]), (0, 1))

    return jax.vmap(jax.vmap(roll, (2, 0), 2))(images, shift)


def resize_crop(key, images, cfg: Config):
    """Source images (B, s, s, C) resized to resize_size and cut to a random image_size crop
    (key None: the central crop), as one bilinear crop-and-resize from the source pixels."""
    b, s = images.shape[0], images.shape[1]
    scale = s / cfg.resize_size
    if key is None:
        corner = jnp.full((b, 2), (cfg.resize_size - cfg.image_size) // 2)
    else:
        corner = jax.random.randint(key, (b, 2), 0, cfg.resize_size - cfg.image_size + 1)
    side = jnp.full((b, 2), cfg.image_size * scale)
    boxes = jnp.concatenate([corner * scale, side], 1)  # (B, 4) y, x, h, w in source pixels
    return jax.vmap(lambda im, bx: data.crop_resize(im, bx, cfg.image_size))(images, boxes)


def make_puzzles(key, images, perm_set, cfg: Config):
    """Source images -> (shuffled tiles (B, grid^2, T, T, C), labels (B,), perms (B, N))."""
    k_crop, k_col, k_tile, k_lab = jax.random.split(key, 4)
    x = color_measures(k_col, resize_crop(k_crop, images, cfg), cfg)
    tiles = extract_tiles(k_tile, x, cfg)
    labels = jax.random.randint(k_lab, (images.shape[0],), 0, perm_set.shape[0])
    perms = perm_set[labels]
    return shuffle_tiles(tiles, perms), labels, perms


# --- NETWORKS ---


def lrn(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75):
    """Caffe's across-channel local response normalisation: x / (1 + alpha/size *
    sum_{|c'-c| <= size//2} x_c'^2)^beta."""
    h = size // 2
    sq = jnp.pad(x * x, [(0, 0)] * (x.ndim - 1) + [(h, h)])
    window = sum(sq[..., i:i + x.shape[-1]] for i in range(size))
    return x / (1.0 + alpha / size * window) ** beta


class Trunk(nn.Module):
    """The per-tile conv layers (AlexNet conv1-5 in [1]); returns the last feature map."""

    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    pool_after: tuple[int, ...]
    lrn: bool
    shift: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_pool = 0
        layers = zip(self.channels, self.kernels, self.strides, strict=True)
        for i, (ch, k, s) in enumerate(layers):
            x = nn.relu(Conv(ch, k, s, shift=self.shift, dtype=self.dtype)(x))
            if i + 1 in self.pool_after:
                x = nn.max_pool(x, (3, 3), (2, 2))
                n_pool += 1
                if self.lrn and n_pool <= 2:
                    x = lrn(x)
        return x


class CFN(nn.Module):
    """[1] Sec. 3.1's context-free network: one Trunk + fc6 shared by the tiles (B, N, T,
    T, C), concatenation, fc7, fc8 over the permutation set -> logits (B, |P|)."""

    cfg: Config

    def setup(self):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        self.trunk = Trunk(c.conv_channels, c.conv_kernels, c.conv_strides, c.pool_after,
                           c.lrn, c.shift_conv, dt)
        self.fc6 = nn.Dense(c.fc6_units, dtype=dt)
        self.fc7 = nn.Dense(c.fc7_units, dtype=dt)
        self.fc8 = nn.Dense(c.num_permutations, dtype=dt)
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, tiles, train: bool):
        b, n = tiles.shape[:2]
        z = self.trunk(tiles.reshape((b * n,) + tiles.shape[2:]))  # (B*N, h, w, ch)
        f = self.drop(nn.relu(self.fc6(z.reshape(b * n, -1))), deterministic=not train)
        h = self.fc7(f.reshape(b, -1))  # concat over tiles: (B, N * fc6)
        h = self.drop(nn.relu(h), deterministic=not train)
        return self.fc8(h).astype(jnp.float32)

    def features(self, images):
        """The frozen trunk on whole images, globally average-pooled: (B, channels[-1])."""
        return self.trunk(images).mean((1, 2)).astype(jnp.float32)


# --- LOSS ---


def jigsaw_loss(logits, labels):
    """Cross-entropy of the permutation index (softmax over |P|); also the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_optimizer(cfg: Config):
    """SGD + momentum, L2 decay added to the gradient, lr x lr_decay every lr_decay_every
    steps (caffe's "step" policy of the released solver)."""
    sched = optax.exponential_decay(cfg.lr, cfg.lr_decay_every, cfg.lr_decay, staircase=True)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(sched, momentum=cfg.momentum)), sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def train_images(cfg: Config):
    """(train_x (n, 8, 8, 1), train_y, test_x, test_y): the digits at their 8x8 source
    resolution (numpy, cached); update and evaluate resize them on the device."""
    return data.digit_images(8, cfg.num_train)


def perm_array(cfg: Config):
    return jnp.asarray(permutation_set(cfg.num_tiles, cfg.num_permutations,
                                       cfg.permutation_selection, cfg.permutation_seed))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    t = cfg.tile_size
    tiles = jnp.zeros((1, cfg.num_tiles, t, t, 1))
    params = CFN(cfg).init(k_net, tiles, train=False)["params"]
    tx, _ = make_optimizer(cfg)
    return State(params, tx.init(params), jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, (tx, sched) = CFN(cfg), make_optimizer(cfg)
    train_x = jnp.asarray(train_images(cfg)[0])
    key, k_batch, k_puz, k_drop = jax.random.split(state.key, 4)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,), replace=False)
    x, labels, _ = make_puzzles(k_puz, train_x[idx], perm_array(cfg), cfg)

    def loss_fn(params):
        logits = net.apply({"params": params}, x, train=True, rngs={"dropout": k_drop})
        return jigsaw_loss(logits, labels)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/jigsaw": loss, "charts/jigsaw_acc": acc,
               "charts/lr": sched(state.step), "charts/grad_norm": optax.global_norm(grads)}
    return State(params, opt_state, state.step + 1, key), metrics


# --- EVALUATE ---


def whole_images(images, cfg: Config):
    """Source images -> the central image_size crop, normalised per image (as the tiles)."""
    x = resize_crop(None, images, cfg)
    mu, sd = x.mean((1, 2, 3), keepdims=True), x.std((1, 2, 3), keepdims=True)
    return (x - mu) / (sd + 1e-5)


def evaluate(state: State, cfg: Config):
    """Probe accuracies on the 797 held-out digits from the frozen trunk's pooled features:
    linear and k-NN with all 1,000 training labels ("linear", "knn") and with
    probe_per_class per class ("linear_few", "knn_few"); and the puzzle accuracy on
    held-out images (one puzzle each, fixed key)."""
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in train_images(cfg)))
    net, v = CFN(cfg), {"params": state.params}
    f_tr = net.apply(v, whole_images(tr_x, cfg), method=CFN.features)
    f_te = net.apply(v, whole_images(te_x, cfg), method=CFN.features)
    out = probe.probe(jax.random.PRNGKey(0), f_tr, tr_y, f_te, te_y, 10, cfg.probe_per_class,
                      cfg.knn_k, cfg.knn_temperature, cfg.probe_l2)
    x, labels, _ = make_puzzles(jax.random.PRNGKey(1), te_x, perm_array(cfg), cfg)
    out["jigsaw_acc_test"] = jigsaw_loss(net.apply(v, x, train=False), labels)[1]
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str, num: int = 4):
    """Seed 0: `num` held-out puzzles (shuffled tiles, tiles put back by the predicted
    permutation, the image) and the pretext accuracy over training."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    @functools.partial(jax.jit, static_argnums=2)  # one program: eager ops take ~7 s on CPU
    def puzzles(params, te_x, cfg):
        shuffled, labels, _ = make_puzzles(jax.random.PRNGKey(1), te_x, perm_array(cfg), cfg)
        pred = jnp.argmax(CFN(cfg).apply({"params": params}, shuffled, train=False), -1)
        back = unshuffle_tiles(shuffled, perm_array(cfg)[pred])
        return shuffled, labels, pred, back, whole_images(te_x, cfg)

    te_x = jnp.asarray(train_images(cfg)[2][:num])
    params = jax.tree.map(lambda a: a[0], res.state.params)
    shuffled, labels, pred, back, whole = puzzles(params, te_x, cfg)
    g = cfg.grid

    def mosaic(t):  # (N, T, T, 1) -> grid image with 1-px white gaps
        t = np.pad(np.asarray(t[..., 0]), ((0, 0), (1, 1), (1, 1)), constant_values=np.nan)
        return np.block([[t[r * g + c] for c in range(g)] for r in range(g)])

    fig, ax = plt.subplots(num, 3, figsize=(6.5, 2.1 * num + 1.2))
    for i in range(num):
        ok = "right" if int(pred[i]) == int(labels[i]) else "wrong"
        for a, img, title in ((ax[i, 0], mosaic(shuffled[i]), f"shuffled: P[{labels[i]}]"),
                              (ax[i, 1], mosaic(back[i]), f"by prediction P[{pred[i]}] ({ok})"),
                              (ax[i, 2], whole[i, ..., 0], "image")):
            a.imshow(img, cmap="gray")
            a.set_title(title, fontsize=8)
            a.axis("off")
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(f"jigsaw ({cfg.num_permutations} permutations), held-out puzzle acc "
                 f"{f['jigsaw_acc_test']:.2f}\nprobes: linear {f['linear']:.3f}, k-NN "
                 f"{f['knn']:.3f}, 10/class linear {f['linear_few']:.3f}, k-NN "
                 f"{f['knn_few']:.3f}", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's held-out puzzles."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["linear", "linear_few", "knn", "knn_few",
                                               "jigsaw_acc_test", "losses/jigsaw",
                                               "charts/jigsaw_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
