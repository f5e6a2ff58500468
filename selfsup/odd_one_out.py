"""O3N, Odd-One-Out networks: which of N + 1 clips of a video has its frames shuffled?

[1] B. Fernando, H. Bilen, E. Gavves, S. Gould. "Self-Supervised Video Representation
    Learning With Odd-One-Out Networks." CVPR 2017, arXiv:1611.06646. Items marked [M] are
    from memory of the paper or ours, not checked against the PDF (the searchable copies
    gave only the abstract and Fig. 1).

An odd-one-out question ([1] Sec. 3) has N + 1 elements, clips of W consecutive frames cut
from one video at random starts: N "even" clips keep their temporal order, one "odd" clip,
at a uniform index y, has its frames in a uniformly drawn NON-identity permutation pi:
    e_i[w] = x[s_i + w]            (i != y)        e_y[w] = x[s_y + pi(w)],  pi != id
N + 1 = 6 elements of W = 6 frames (the post). Each element goes through one shared
encoder (the multi-branch network, weights shared); the paper's best clip encoding is the
sum of differences (SoD). [1] also compares dynamic images and stacks of differences; its
SoD may be the weighted frame sum sum_{i<j} (X_j - X_i) at the input [M]; here it is the
encoder applied to each frame difference and summed (our reading [M]):
    f_i = sum_{w=1}^{W-1} phi(e_i[w] - e_i[w-1])                              (SoD)
The N + 1 features are fused and an (N + 1)-way softmax names the odd element:
    sum_diff:    v = sum_{i<j} (f_j - f_i) = sum_j (2j - N) f_j,  z = fc(v)   ([1] [M])
    equivariant: d_i = sum_j (f_i - f_j),  z_i = g(d_i), one g for all i (ours: permuting
                 the elements permutes z; g must be nonlinear: with a linear g, z_i =
                 (N + 1) w.f_i + a shift shared by all i, which the softmax drops)
    concat:      z = fc([f_1; ...; f_{N+1}])                (position-specific weights)
    loss = -mean log softmax(z)_y                                            (cross-entropy)
The sampler, the encoder vmapped over the elements, the fusion and the loss run in one
jitted `update`; the runner vmaps it over seeds.

Data: procedural videos (common/video.py): sprites at constant velocity over a textured
background with elastic bounces and fresh pixel noise; one video per question.
Downstream ([1] Sec. 4 fine-tunes the whole network on UCF101/HMDB51 actions [M]): here
frozen features of one in-order probe clip (W frames from the start of a fresh video),
probed (common/probe.py, linear and k-NN, all labels and 10 per class) for declared
procedural labels: the first sprite's motion direction (`probe_classes` bins) and speed
(bins of the speed range), on the SoD feature f (the last fc) and on the pooled last conv
block; with f's fraction of active units and effective rank (collapse checks), all against
the same network at init.

Reproduce (CPU demo, 24x24 frames, a small trunk, the equivariant fusion):
    python selfsup/odd_one_out.py --preset quick --plot selfsup/odd_one_out.png
Measured (1 seed, 200 steps of 16 questions, 15.7 min wall / 126 CPU-s, loaded 2-core
CPU): held-out odd-one-out accuracy 0.990 (chance 0.167; the network at init 0.197);
training accuracy 0.80 over steps 1-20, 0.985 after; loss 1.16 (first 10) -> 0.02 (last 10).
Trained (init) on 1000 + 1000 probe clips, 8 bins (chance 0.125): f has 0.72 (1.00) of its
units active, effective rank 17.3 (34.0); direction probes of f: linear 0.438 (0.495),
10/class 0.280 (0.326), k-NN 0.326 (0.517), 10/class 0.171 (0.263); of the pooled conv
block: linear 0.648 (0.676), k-NN 0.512 (0.647); speed probes of f: linear 0.237 (0.175),
k-NN 0.251 (0.139); of the conv block: linear 0.322 (0.294). One seed: f LOSES direction
information and gains some speed information; the conv block keeps direction about as
well as at init. Not a collapse (0.72 of the units alive, rank 17). A likely reason (not
proven): d_i removes what the question's clips share, and the odd clip is the jerky one
(a shuffled clip of constant motion has more frame-difference energy), a
direction-invariant cue, so nothing rewards keeping absolute direction in f.
Paper setting (GPU; procedural videos in place of UCF101, CaffeNet on 227x227):
    python selfsup/odd_one_out.py --preset paper
[1] reports (fine-tuned, UCF101 split 1 pre-training) 60.3% on UCF101 (the abstract) and
32.5% on HMDB51 [M: the abstract gives "12.7% better" on HMDB51].

Differences from the paper:
- Procedural videos, not UCF101; grey frames; no crops or mean subtraction.
- The SoD layout (the trunk on each difference, summed, not a weighted frame sum at the
  input), the branch depth (the feature f is the last fc, fc7, before the fusion) and the
  sum-of-difference fusion (pairwise differences summed to one vector, one fc) are from
  memory [M].
- `quick` uses our equivariant fusion with a 64-unit ReLU layer: at TINY the paper's fusion
  reached only 0.33-0.41 training accuracy after 60 steps (2 seeds), the equivariant one
  0.9+.
- CaffeNet without LRN, groups or dropout (fc6/fc7 0.5 in CaffeNet [M]), SAME padding;
  the L2 decay also applies to the biases; SGD momentum (lr, batch size [M]).
- Starts s_i uniform and independent (clips may overlap) [M]; frame stride 1.
- Frozen linear / k-NN probes of motion labels, not fine-tuning for actions.
- `quick`: 24x24 frames, 24-frame videos, 2 convs, one 64-unit fc, the equivariant fusion
  with a 64-unit layer, 16 questions per step, Adam (SGD's lr is not calibrated here).
"""

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import probe, run
from common import video as vid
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """O3N; defaults are [1]'s (6 elements of 6 frames, SoD, sum-of-difference fusion)."""

    frame_size: int = 227
    """side of the square grey frames (CaffeNet's input is 227x227)"""
    num_frames: int = 60
    """frames T of the procedural video each question is cut from"""
    num_elements: int = 6
    """N + 1: clips per question, one of them odd"""
    clip_frames: int = 6
    """W: frames per clip (the SoD sums W - 1 differences)"""
    num_sprites: int = 1
    """sprites per video"""
    radius: tuple[float, float] = (0.06, 0.12)
    """range of a sprite's radius, in frame sides"""
    speed: tuple[float, float] = (0.02, 0.05)
    """range of a sprite's speed, frame sides per frame"""
    noise_std: float = 0.02
    """std of fresh pixel noise in every frame"""
    fusion: str = "sum_diff"
    """"sum_diff": fc on sum_{i<j} (f_j - f_i) [M]; "equivariant": one head on each
    d_i = sum_j (f_i - f_j) (needs fusion_hidden > 0); "concat": fc on [f_1; ...]"""
    fusion_hidden: int = 0
    """0: the head is one fc layer ([1] [M]); > 0: a ReLU layer of this width first"""
    conv_channels: tuple[int, ...] = (96, 256, 384, 384, 256)
    """output channels of the trunk's convolutions (CaffeNet conv1-5)"""
    conv_kernels: tuple[int, ...] = (11, 5, 3, 3, 3)
    """kernel side of each convolution"""
    conv_strides: tuple[int, ...] = (4, 1, 1, 1, 1)
    """stride of each convolution"""
    pool_after: tuple[int, ...] = (1, 2, 5)
    """convolutions (1-based) followed by a 3x3 stride-2 max pool"""
    fc_features: tuple[int, ...] = (4096, 4096)
    """widths of the trunk's fc layers (the last is the feature f summed by the SoD)"""
    batch_size: int = 128
    """questions per step [M]"""
    num_steps: int = 100_000
    """optimiser steps [M]"""
    optimizer: str = "sgd"
    """"sgd" (momentum, [1] [M]) or "adam" (the CPU demo)"""
    lr: float = 1e-2
    """learning rate [M]"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """L2 decay added to every gradient"""
    num_eval_questions: int = 512
    """held-out questions scored by evaluate (chance 1 / num_elements)"""
    probe_train: int = 1000
    """clips (with motion-direction labels) the probes are fit on"""
    probe_test: int = 1000
    """held-out clips the probes are scored on"""
    probe_classes: int = 8
    """bins of the first sprite's motion direction (the probe's label)"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    knn_temperature: float = 0.07
    """temperature of the k-NN probe's exp(similarity / T) votes"""
    probe_l2: float = 1e-3
    """L2 penalty of the linear probe"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients on CPU"""
    dtype: str = "float32"
    """compute dtype of convs and dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # questions per update

    def spec(self) -> vid.VideoSpec:
        s = self.frame_size
        return vid.VideoSpec(size=s, num_frames=self.num_frames, num_sprites=self.num_sprites,
                             radius=(self.radius[0] * s, self.radius[1] * s),
                             speed=(self.speed[0] * s, self.speed[1] * s),
                             noise_std=self.noise_std)

    def validate(self):
        if self.num_elements < 2:
            raise ValueError(f"num_elements={self.num_elements} must be >= 2 (N >= 1 even)")
        if not 3 <= self.clip_frames <= 10:
            raise ValueError(f"clip_frames={self.clip_frames} must be in [3, 10] (a "
                             "non-identity shuffle; W! fits the int32 permutation index)")
        if self.num_frames < self.clip_frames:
            raise ValueError(f"num_frames={self.num_frames} must be >= clip_frames="
                             f"{self.clip_frames}")
        if not 0 < self.radius[0] <= self.radius[1] < 0.5:
            raise ValueError(f"radius={self.radius} must satisfy 0 < low <= high < 0.5")
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed={self.speed} must satisfy 0 <= low <= high")
        if self.fusion not in ("sum_diff", "equivariant", "concat"):
            raise ValueError(f"fusion={self.fusion!r} must be 'sum_diff', 'equivariant' or "
                             "'concat'")
        if self.fusion == "equivariant" and self.fusion_hidden < 1:
            raise ValueError("fusion='equivariant' needs fusion_hidden >= 1: a linear head "
                             "scores each d_i = E f_i - sum_j f_j alone (the sum is one "
                             "constant shift of every logit), never comparing the clips")
        if self.lr <= 0 or self.batch_size < 1 or self.num_eval_questions < 1:
            raise ValueError(f"lr={self.lr} must be > 0, batch_size={self.batch_size} and "
                             f"num_eval_questions={self.num_eval_questions} >= 1")
        if self.probe_classes < 2 or not 1 <= self.knn_k <= self.probe_train:
            raise ValueError(f"probe_classes={self.probe_classes} must be >= 2, knn_k="
                             f"{self.knn_k} in [1, probe_train={self.probe_train}]")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        n = len(self.conv_channels)
        if n < 1 or len(self.conv_kernels) != n or len(self.conv_strides) != n:
            raise ValueError(f"conv_channels={self.conv_channels}, conv_kernels="
                             f"{self.conv_kernels}, conv_strides={self.conv_strides} must be "
                             "non-empty and of equal length")
        if min(self.conv_channels + self.conv_kernels + self.conv_strides) < 1:
            raise ValueError("conv_channels, conv_kernels and conv_strides must all be >= 1")
        if not all(1 <= p <= n for p in self.pool_after):
            raise ValueError(f"pool_after={self.pool_after} must name convolutions in [1, {n}]")
        if len(self.fc_features) < 1 or min(self.fc_features) < 1 or self.fusion_hidden < 0:
            raise ValueError(f"fc_features={self.fc_features} must be non-empty and >= 1, "
                             f"fusion_hidden={self.fusion_hidden} >= 0")
        if self.probe_per_class * self.probe_classes > self.probe_train // 2:
            raise ValueError(f"probe_per_class={self.probe_per_class} x probe_classes="
                             f"{self.probe_classes} must be <= probe_train / 2")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 24x24 frames, 24-frame videos, a 2-conv trunk with one 64-unit fc, Adam.
    "quick": dict(frame_size=24, num_frames=24, radius=(0.1, 0.18), speed=(0.04, 0.1),
                  conv_channels=(16, 32), conv_kernels=(5, 3), conv_strides=(1, 1),
                  pool_after=(1, 2), fc_features=(64,), fusion="equivariant",
                  fusion_hidden=64, batch_size=16,
                  num_steps=200, optimizer="adam", lr=2e-3, weight_decay=0.0,
                  shift_conv=True),
    "paper": dict(),
}


# --- QUESTIONS ---


def nth_permutation(k, w: int):
    """The k-th permutation of range(w) in lexicographic order (Lehmer code, k in [0, w!)):
    k = 0 is the identity, so k uniform in [1, w!) is a uniform non-identity permutation."""
    avail, out = jnp.ones(w, bool), []
    for i in range(w):
        f = math.factorial(w - 1 - i)
        digit = (k // f) % (w - i)  # take the digit-th still unused element
        j = jnp.argmax(jnp.cumsum(avail) == digit + 1)
        out.append(j)
        avail = avail.at[j].set(False)
    return jnp.stack(out)


def sample_question(key, broken, cfg: Config):
    """Starts (E,), the odd index y and its permutation pi (W,), a uniform non-identity
    permutation (the identity where `broken`: no signal)."""
    k_s, k_y, k_p = jax.random.split(key, 3)
    e, w = cfg.num_elements, cfg.clip_frames
    starts = jax.random.randint(k_s, (e,), 0, cfg.num_frames - w + 1)
    odd = jax.random.randint(k_y, (), 0, e)
    perm = nth_permutation(jax.random.randint(k_p, (), 1, math.factorial(w)), w)
    return starts, odd, jnp.where(broken, jnp.arange(w), perm)


def frame_indices(starts, odd, perm, cfg: Config):
    """(E, W) frame index of every element's frames: s_i + w, the odd one s_y + pi(w)."""
    order = jnp.where((jnp.arange(cfg.num_elements) == odd)[:, None], perm[None],
                      jnp.arange(cfg.clip_frames)[None])
    return starts[:, None] + order


def make_question(key, broken, cfg: Config):
    """One question from one key: clips (E, W, S, S, C), the odd label, the video and the
    frame indices (E, W)."""
    k_vid, k_q = jax.random.split(key)
    video = vid.make_video(k_vid, cfg.spec())
    starts, odd, perm = sample_question(k_q, broken, cfg)
    idx = frame_indices(starts, odd, perm, cfg)
    return video.frames[idx], odd, video, idx


def make_questions(key, n: int, broken, cfg: Config):
    """n questions, one video each: clips (n, E, W, S, S, C), odd labels (n,), the videos
    and the frame indices (n, E, W)."""
    return jax.vmap(lambda k: make_question(k, broken, cfg))(jax.random.split(key, n))


# --- NETWORKS ---


class Trunk(nn.Module):
    """phi: convs (ReLU, 3x3/2 max pool after pool_after) and ReLU fc layers on one frame
    difference (B, S, S, C) -> (B, F); and the last conv block's output averaged over
    space (B, C') (the pooled-conv probe's feature)."""

    cfg: Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        for i, (ch, k, st) in enumerate(zip(c.conv_channels, c.conv_kernels, c.conv_strides,
                                            strict=True)):
            x = nn.relu(Conv(ch, k, st, shift=c.shift_conv, dtype=dt)(x))
            if i + 1 in c.pool_after:
                x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        pooled = x.mean((1, 2)).astype(jnp.float32)
        x = x.reshape(x.shape[0], -1)
        for f in c.fc_features:
            x = nn.relu(nn.Dense(f, dtype=dt)(x))
        return x.astype(jnp.float32), pooled


def sod(clip):
    """Frame differences of a clip (W, S, S, C) -> (W - 1, S, S, C): e[w] - e[w - 1]."""
    return clip[1:] - clip[:-1]


def features(trunk_params, clip, cfg: Config):
    """SoD feature of one clip f = sum_w phi(e[w] - e[w - 1]) (F,), and the same sum of
    the pooled last conv block (C',)."""
    f, pooled = Trunk(cfg).apply({"params": trunk_params}, sod(clip))
    return f.sum(0), pooled.sum(0)


def encode(trunk_params, clip, cfg: Config):
    """SoD feature of one clip: f = sum_w phi(e[w] - e[w - 1]) (F,)."""
    return features(trunk_params, clip, cfg)[0]


def sum_diff(f):
    """[1]'s sum-of-difference fusion [M]: the pairwise differences of the element features
    (..., E, F) summed into one vector, sum_{i<j} (f_j - f_i) = sum_j (2j - E + 1) f_j."""
    e = f.shape[-2]
    return jnp.einsum("j,...jf->...f", 2 * jnp.arange(e, dtype=f.dtype) - (e - 1), f)


class Head(nn.Module):
    """The fusion and the (N + 1)-way logits from the element features (E, F)."""

    cfg: Config

    @nn.compact
    def __call__(self, f):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        e = f.shape[-2]
        if c.fusion == "sum_diff":  # one vector sum_{i<j} (f_j - f_i), then fc to E logits
            x = sum_diff(f)
        elif c.fusion == "equivariant":  # d_i = sum_j (f_i - f_j), one head g on each d_i
            x = e * f - f.sum(-2, keepdims=True)  # (..., E, F)
        else:  # concat: [f_1; ...; f_E], position-specific weights
            x = f.reshape(*f.shape[:-2], -1)
        if c.fusion_hidden:
            x = nn.relu(nn.Dense(c.fusion_hidden, dtype=dt)(x))
        if c.fusion == "equivariant":
            return nn.Dense(1, dtype=dt)(x)[..., 0].astype(jnp.float32)  # (..., E)
        return nn.Dense(e, dtype=dt)(x).astype(jnp.float32)


def logits_fn(params, clips, cfg: Config):
    """Questions (B, E, W, S, S, C) -> logits (B, E): the shared encoder vmapped over the
    questions and their elements, then the fusion head."""
    f = jax.vmap(jax.vmap(lambda c: encode(params["trunk"], c, cfg)))(clips)  # (B, E, F)
    return Head(cfg).apply({"params": params["head"]}, f)


# --- LOSS ---


def odd_loss(logits, labels):
    """-mean log softmax(z)_y over the questions; and the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_optimizer(cfg: Config):
    base = (optax.sgd(cfg.lr, momentum=cfg.momentum) if cfg.optimizer == "sgd"
            else optax.adam(cfg.lr))
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), base)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    # () bool, False from init: True only in the tests' broken variant (the odd clip is not
    # shuffled, so nothing tells it apart); traced, so both arms share a program
    broken: jax.Array


def init(key, cfg: Config) -> State:
    k_t, k_h, key = jax.random.split(key, 3)
    s = cfg.frame_size
    trunk = Trunk(cfg).init(k_t, jnp.zeros((1, s, s, 1)))["params"]
    head = Head(cfg).init(k_h, jnp.zeros((1, cfg.num_elements, cfg.fc_features[-1])))
    params = {"trunk": trunk, "head": head["params"]}
    return State(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), key,
                 jnp.zeros((), bool))


# --- UPDATE ---


def update(state: State, cfg: Config):
    tx = make_optimizer(cfg)
    key, k_data = jax.random.split(state.key)
    clips, labels, _, _ = make_questions(k_data, cfg.batch_size, state.broken, cfg)

    def loss_fn(params):
        return odd_loss(logits_fn(params, clips, cfg), labels)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/odd": loss, "charts/odd_acc": acc,
               "charts/grad_norm": optax.tree.norm(grads)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         key=key), metrics


# --- EVALUATE ---

EVAL_KEY = 12345
"""Seed of the fixed held-out questions and probe clips (the same for every run and seed)."""


def direction_class(vel, num_classes: int):
    """The probe's label: the direction of a velocity (v_y, v_x) in num_classes bins."""
    frac = jnp.mod(jnp.arctan2(vel[0], vel[1]), 2 * jnp.pi) / (2 * jnp.pi)
    return jnp.minimum(jnp.floor(frac * num_classes), num_classes - 1).astype(jnp.int32)


def speed_class(vel, cfg: Config):
    """The speed probe's label: |v| in probe_classes equal bins of the speed range."""
    lo, hi = cfg.speed[0] * cfg.frame_size, cfg.speed[1] * cfg.frame_size
    frac = (jnp.linalg.norm(vel) - lo) / max(hi - lo, 1e-9)
    return jnp.clip(jnp.floor(frac * cfg.probe_classes), 0, cfg.probe_classes - 1).astype(
        jnp.int32)


def probe_clip(key, cfg: Config):
    """A probe clip: an in-order clip of W frames (a video of only W frames is rendered),
    with the first sprite's direction and speed classes at its first frame."""
    spec = cfg.spec()
    v = vid.make_video(key, vid.VideoSpec(**{**spec.__dict__, "num_frames": cfg.clip_frames}))
    vel = v.vel[0, 0]
    return v.frames, direction_class(vel, cfg.probe_classes), speed_class(vel, cfg)


def _chunked(fn, keys, b: int):
    """fn over keys (n, 2) in lax.map chunks of b (the last padded with repeats): the
    outputs of the n keys, in order."""
    n = keys.shape[0]
    m = -(-n // b)
    out = jax.lax.map(jax.vmap(fn), keys[jnp.arange(m * b) % n].reshape(m, b, -1))
    return jax.tree.map(lambda a: a.reshape(m * b, *a.shape[2:])[:n], out)


def effective_rank(x):
    """exp(entropy) of the normalised singular values of the centred rows x (N, D) (Roy
    and Vetterli 2007): 1 for features on a line, D for isotropic ones."""
    s = jnp.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / (s.sum() + 1e-12)
    return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-12)))


def eval_data(cfg: Config, n: int = 4):
    """The first n held-out questions of `evaluate` (clips, odd labels), as numpy (plots)."""
    k_q = jax.random.split(jax.random.PRNGKey(EVAL_KEY))[0]
    keys = jax.random.split(k_q, cfg.num_eval_questions)[:n]
    fn = jax.jit(jax.vmap(lambda k: make_question(k, False, cfg)[:2]))
    return tuple(np.asarray(a) for a in fn(keys))


def evaluate(state: State, cfg: Config):
    """Held-out odd-one-out accuracy on the fixed questions ("odd_acc_test", chance
    1 / num_elements); on the SoD feature f of one in-order probe clip: the fraction of its
    units active on some probe clip ("feat_active") and its effective rank ("feat_rank"),
    the motion-direction probes (linear and k-NN, all labels and probe_per_class per class)
    and the speed probes ("speed_linear", "speed_knn"); on the pooled last conv block, the
    same direction and speed probes ("conv_*"). The data are made in the program from
    PRNGKey(EVAL_KEY), batch_size at a time (lax.map over chunks: no data constants, the
    memory of one training batch)."""
    # a barrier on the keys: XLA would otherwise constant-fold the whole data generation
    k_q, k_p = jax.lax.optimization_barrier(jax.random.split(jax.random.PRNGKey(EVAL_KEY)))
    b, n = cfg.batch_size, cfg.probe_train

    def score(key):
        clips, odd, _, _ = make_question(key, False, cfg)
        return jnp.argmax(logits_fn(state.params, clips[None], cfg)[0]) == odd

    def feats(key):
        clip, d, sp = probe_clip(key, cfg)
        return (*features(state.params["trunk"], clip, cfg), d, sp)

    right = _chunked(score, jax.random.split(k_q, cfg.num_eval_questions), b)
    f, g, d, sp = _chunked(feats, jax.random.split(k_p, n + cfg.probe_test), b)
    c = cfg.probe_classes
    lin = lambda x, y: probe.linear_probe(x[:n], y[:n], x[n:], y[n:], c, cfg.probe_l2)
    knn = lambda x, y: probe.knn_probe(x[:n], y[:n], x[n:], y[n:], c, cfg.knn_k,
                                       cfg.knn_temperature)
    out = {"odd_acc_test": right.mean(), "feat_active": jnp.mean((f > 0).any(0)),
           "feat_rank": effective_rank(f), "speed_linear": lin(f, sp), "speed_knn": knn(f, sp),
           "conv_linear": lin(g, d), "conv_knn": knn(g, d), "conv_speed_linear": lin(g, sp)}
    out.update(probe.probe(jax.random.PRNGKey(0), f[:n], d[:n], f[n:], d[n:], c,
                           cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature,
                           cfg.probe_l2))
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0: four held-out questions side by side (rows: the elements, each a strip of
    its W frames; the odd one framed in red), with the trained network's P(odd)."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)
    clips, labels = eval_data(cfg)
    p = np.asarray(jax.nn.softmax(logits_fn(state.params, jnp.asarray(clips), cfg)))
    e, w = cfg.num_elements, cfg.clip_frames
    fig = plt.figure(figsize=(4 * w * 0.55 + 1, e * 0.62 + 0.8))
    grid = fig.add_gridspec(1, 4, wspace=0.12)
    for q in range(4):
        sub = grid[q].subgridspec(e, w, wspace=0.04, hspace=0.08)
        for i in range(e):
            for t in range(w):
                ax = fig.add_subplot(sub[i, t])
                ax.imshow(clips[q, i, t, ..., 0], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if i == labels[q]:
                    for sp in ax.spines.values():
                        sp.set_color("r"), sp.set_linewidth(2)
                if t == 0:
                    ax.set_ylabel(f"P={p[q, i]:.2f}", fontsize=6)
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(f"O3N: held-out odd-one-out accuracy {f['odd_acc_test']:.3f} (chance "
                 f"{1 / e:.3f}); direction probes linear {f['linear']:.3f}, 10/class "
                 f"{f['linear_few']:.3f}", fontsize=8)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws held-out questions and predictions."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["odd_acc_test", "feat_active", "feat_rank",
                                               "linear", "linear_few", "knn", "knn_few",
                                               "conv_linear", "conv_knn", "speed_linear",
                                               "speed_knn", "conv_speed_linear",
                                               "losses/odd", "charts/odd_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
