"""Video colorization as a pretext task: a pointer learned by copying colours tracks masks.

[1] C. Vondrick, A. Shrivastava, A. Fathi, S. Guadarrama, K. Murphy. "Tracking Emerges by
    Colorizing Videos." ECCV 2018, arXiv:1806.09594. Items marked [M] are from memory of
    the paper or ours, not checked against the PDF (the searchable copies gave the abstract
    and the introduction only).

Grey reference frames (R = 3) and a grey target frame go through one shared CNN at reduced
resolution (stride 8: 256x256 -> 32x32, 64-d embeddings f per pixel [1] Sec. 3.2 [M]); the
target's colours are copied from the references' true colours through a pointer over ALL
reference pixels i (of all R frames):
    A_ij = exp(f_i . f_j / T) / sum_i' exp(f_i' . f_j / T)     (1) column-stochastic in i
    c^_j = sum_i A_ij c_i                                        (2)
    loss = -mean_j log c^_j[c_j]                                 (3) categorical CE
where c_i is the one-hot of the pixel's colour cluster: the ab channels of CIE Lab (at the
feature resolution, average-pooled) quantized to the nearest of Q = 16 centres found by
k-means (Lloyd, farthest-point start) on training videos' ab [1] Sec. 3.3. Inference [1]
Sec. 3.4: the same pointer propagates any labels of a reference frame, here the one-hot
sprite masks (K sprites + background) of frame 0 to frame t, at temperature T_eval:
    l^_j = sum_i A_ij l_i,  mask_t = argmax upsample(l^)                        (4)
scored by the region similarity J (IoU, the DAVIS J) per sprite, against two baselines
without learned weights: "identity" (frame 0's mask, unmoved) and the "grey pointer" (4)
with A_ij = softmax_i -(g_i - g_j)^2 / T of the grey levels g (L / 100 at the feature
stride), the best T of GREY_TEMPERATURES (a lower bound any learned pointer must pass).

Data: isoluminant procedural videos (motion and silhouettes from common/video.py): K
sprites of one Lab L (`lightness`) each with a random hue, over a grey textured background
whose L spans lightness +- texture_range, so a grey level tells neither one sprite from
another nor (mostly) a sprite from the background; only the ab channels (the colour
targets) differ. With sprites brighter than the background (common/video.py's colours) the
grey pointer alone reaches J 1.00 at the tests' size, above the trained network.

Reproduce (CPU demo, 32x32 frames, 16x16 features, a small residual trunk):
    python selfsup/video_colorization.py --preset quick --plot selfsup/video_colorization.png
Measured (1 seed, 200 steps of 16 clips, 173 s wall / 65 CPU-s, loaded 2-core CPU): held-out
J from frame 0 to frame 5 (128 videos, 2 sprites) 0.510, against the grey pointer 0.261
and the identity baseline 0.130; training colour accuracy 0.863 (first 10 steps) -> 0.954
(last 10), loss 0.453 -> 0.123. The figure (4 held-out videos, J 0.08-0.72) shows sprites
followed where they are apart in frame 0 and masks mixed up or swapped where two sprites
overlap or touch.
Paper setting (GPU; procedural videos in place of Kinetics, ResNet-18 + 3D convs):
    python selfsup/video_colorization.py --preset paper
[1] Table 1, DAVIS 2017 validation, no fine-tuning [M]: J 34.6 / F 32.7 (their mean 33.65;
the "J&F 34.0" of later papers' tables is what they print for [1]), optical flow (FlowNet2)
J 26.7 / F 25.2, identity J 22.1 / F 23.6.

Differences from the paper:
- Procedural isoluminant videos, not Kinetics; sprites have one flat colour each.
- Trunk: a ResNet-18-like stack (no batch norm, stem stride 2 and no max pool so that the
  total stride is 8), (y, x) concatenated to its features (`coords`, [1] Sec. 3.3 [M]),
  then `conv3d_layers` 3x3x3 convs over the R + 1 frames [M].
- Propagation: [1] tracks frame by frame from the first frame's labels [M]; here frame 0's
  labels jump to frame t in one step, through the clip (frame 0 x R, frame t), while
  training clips are consecutive frames at gap 1 (no recursive propagation).
- Train temperature 1, T_eval 0.5, batch 32, 400k steps, lr 1e-3 [M] (two unofficial ports
  agree only on 16 clusters, 3 references, lr 1e-3); no top-k in [1] [M] (`eval_topk` > 0
  keeps only each target pixel's k most similar reference pixels, as later work does).
- k-means on the ab of `kmeans_videos` training first frames, inside `init`.
- Videos are rendered only as long as used: R * gap + 1 frames per training clip, t + 1
  per evaluation video (uniform random starts: the statistics of a window of a longer
  video, up to wall bounces).
- No "network at init" arm: its argmax read-out returned the background prior (J 0.00),
  so beating it said little; the grey pointer is the no-learning baseline instead.
- Lab conversion: the same formulae as selfsup/colorization.py's rgb_to_lab (one file per
  method: not imported).
- `quick`: 32x32 frames, stride 2, two 1-block stages (16, 32 channels), 32-d embeddings,
  200 steps of 16 clips.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common import video as vid
from common.nets import Conv

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Colorization pointer; defaults are [1]'s (256x256 -> 32x32, 64-d, 3 references)."""

    frame_size: int = 256
    """side of the square frames (the paper's input is 256x256)"""
    num_sprites: int = 2
    """sprites per video, each of one random colour"""
    radius: tuple[float, float] = (0.06, 0.12)
    """range of a sprite's radius, in frame sides"""
    speed: tuple[float, float] = (0.01, 0.03)
    """range of a sprite's speed, frame sides per frame"""
    lightness: float = 60.0
    """Lab L of every sprite (isoluminant: sprites differ from each other only in ab)"""
    texture_range: float = 25.0
    """the grey background's L spans lightness +- texture_range (overlapping the sprites)"""
    num_refs: int = 3
    """R: reference frames per training clip (the target is the next frame after them)"""
    frame_gap: int = 1
    """frames between consecutive frames of a training clip [M]"""
    num_clusters: int = 16
    """Q: k-means colour clusters in Lab ab"""
    kmeans_videos: int = 64
    """training videos whose first frames' ab pixels k-means clusters"""
    kmeans_iters: int = 20
    """Lloyd iterations"""
    stem_kernel: int = 7
    """kernel of the trunk's first convolution"""
    stem_stride: int = 2
    """stride of the trunk's first convolution"""
    stage_channels: tuple[int, ...] = (64, 128, 256, 256)
    """channels of the residual stages (ResNet-18: 64, 128, 256, 512)"""
    stage_strides: tuple[int, ...] = (1, 2, 2, 1)
    """stride of each stage's first block (stem x stages = 8: 32x32 features of 256x256)"""
    blocks_per_stage: int = 2
    """basic residual blocks per stage (ResNet-18: 2)"""
    conv3d_layers: int = 5
    """3x3x3 convolutions over the clip's frames after the 2D trunk [M]"""
    conv3d_channels: int = 256
    """channels of the 3D convolutions"""
    coords: bool = True
    """concatenate (y, x) in [-1, 1] to the trunk's features before the 3D convs [M]"""
    embed_dim: int = 64
    """D: embedding channels (a final 1x1 linear layer)"""
    temperature: float = 1.0
    """T of the pointer (1) in training [M]"""
    eval_temperature: float = 0.5
    """T of the pointer when propagating masks [M]"""
    eval_topk: int = 0
    """0: every reference pixel; k > 0: only each target pixel's k most similar ones"""
    batch_size: int = 32
    """clips per step [M]"""
    num_steps: int = 400_000
    """Adam steps [M]"""
    lr: float = 1e-3
    """Adam learning rate [M]"""
    eval_videos: int = 256
    """held-out videos for mask propagation"""
    eval_gap: int = 5
    """t: frames from the labelled reference frame 0 to the target frame"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients on CPU"""
    dtype: str = "float32"
    """compute dtype of convs and the similarity ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def stride(self) -> int:
        return self.stem_stride * int(np.prod(self.stage_strides))

    def spec(self, num_frames: int) -> vid.VideoSpec:
        s = self.frame_size
        return vid.VideoSpec(size=s, num_frames=num_frames, num_sprites=self.num_sprites,
                             channels=1, radius=(self.radius[0] * s, self.radius[1] * s),
                             speed=(self.speed[0] * s, self.speed[1] * s))

    def validate(self):
        if len(self.stage_channels) != len(self.stage_strides) or not self.stage_channels:
            raise ValueError(f"stage_channels={self.stage_channels} and stage_strides="
                             f"{self.stage_strides} must be non-empty and of equal length")
        if self.frame_size % self.stride:
            raise ValueError(f"frame_size={self.frame_size} must be a multiple of the total "
                             f"stride {self.stride}")
        if self.num_refs < 1 or self.frame_gap < 1:
            raise ValueError(f"num_refs={self.num_refs} and frame_gap={self.frame_gap} must "
                             "be >= 1")
        if self.eval_gap < 1:
            raise ValueError(f"eval_gap={self.eval_gap} must be >= 1")
        if not 0 < self.lightness - self.texture_range <= self.lightness + self.texture_range < 100:
            raise ValueError(f"lightness={self.lightness} +- texture_range={self.texture_range} "
                             "must lie in (0, 100)")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters={self.num_clusters} must be >= 2")
        if self.temperature <= 0 or self.eval_temperature <= 0:
            raise ValueError(f"temperature={self.temperature} and eval_temperature="
                             f"{self.eval_temperature} must be > 0")
        n_ref = (self.frame_size // self.stride) ** 2  # track_one points into one frame
        if not 0 <= self.eval_topk <= n_ref:
            raise ValueError(f"eval_topk={self.eval_topk} must be in [0, {n_ref}]")
        if not 0 < self.radius[0] <= self.radius[1] < 0.25:
            raise ValueError(f"radius={self.radius} must satisfy 0 < low <= high < 0.25")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 frames, 16x16 features, a 2-stage residual trunk, no 3D convs.
    "quick": dict(frame_size=32, radius=(0.1, 0.18), speed=(0.03, 0.07),
                  stem_kernel=3, stem_stride=1, stage_channels=(16, 32), stage_strides=(2, 1),
                  blocks_per_stage=1, conv3d_layers=0, embed_dim=32, batch_size=16,
                  num_steps=200, kmeans_videos=32, eval_videos=128, shift_conv=True),
    "paper": dict(),
}


# --- COLOUR ---

# sRGB (D65) -> CIE XYZ and the D65 white point (skimage.color's constants)
RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb):
    """sRGB in [0, 1] (..., 3) -> CIE Lab (..., 3): L in [0, 100], a and b about +-110."""
    lin = jnp.where(rgb <= 0.04045, rgb / 12.92,
                    ((jnp.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4)
    xyz = lin @ jnp.asarray(RGB_TO_XYZ.T, lin.dtype) / jnp.asarray(WHITE, lin.dtype)
    f = jnp.where(xyz > 0.008856, jnp.cbrt(jnp.maximum(xyz, 0.008856)), 7.787 * xyz + 16 / 116)
    return jnp.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                      200 * (f[..., 1] - f[..., 2])], -1)


def pool(x, s: int):
    """Average over s x s blocks: (..., H, W, C) -> (..., H / s, W / s, C)."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // s, s, w // s, s, c).mean((-4, -2))


def quantize(ab, centres):
    """Index of the nearest centre (Q, 2) of every ab (..., 2)."""
    return jnp.argmin(((ab[..., None, :] - centres) ** 2).sum(-1), -1)


def kmeans(points, q: int, iters: int):
    """Lloyd's k-means of points (N, 2) into q centres, started at farthest points (the
    first point, then each time the point farthest from the centres so far); a centre
    with no points keeps its place."""
    def add(i, c):
        d = jnp.min(jnp.where(jnp.arange(q)[None] < i, ((points[:, None] - c) ** 2).sum(-1),
                              jnp.inf), 1)
        return c.at[i].set(points[jnp.argmax(d)])

    c = jax.lax.fori_loop(1, q, add, jnp.broadcast_to(points[0], (q, 2)))

    def lloyd(_, c):
        onehot = jax.nn.one_hot(quantize(points, c), q)  # (N, Q)
        n = onehot.sum(0)
        return jnp.where(n[:, None] > 0, onehot.T @ points / jnp.maximum(n, 1)[:, None], c)

    return jax.lax.fori_loop(0, iters, lloyd, c)


# --- DATA ---

# an orthonormal basis of the linear-RGB directions that keep the luminance Y (XYZ's Y row w:
# w . d = 0); w sums to 1, so grey Y0 (1, 1, 1) + s d has Y = Y0 for every s
_W = RGB_TO_XYZ[1] / np.linalg.norm(RGB_TO_XYZ[1])
_E1 = np.cross(_W, [0.0, 0.0, 1.0])
_E1 /= np.linalg.norm(_E1)
_CHROMA = np.stack([_E1, np.cross(_W, _E1)])  # (2, 3)


def srgb(lin):
    """Linear RGB -> sRGB (the inverse of rgb_to_lab's gamma)."""
    return jnp.where(lin <= 0.0031308, 12.92 * lin,
                     1.055 * jnp.maximum(lin, 0.0031308) ** (1 / 2.4) - 0.055)


def lightness_to_y(l_star):
    """Lab L -> luminance Y (white 1)."""
    fy = (l_star + 16) / 116
    return jnp.where(fy > 6 / 29, fy ** 3, (fy - 16 / 116) / 7.787)


def make_video(key, cfg: Config, num_frames: int):
    """An isoluminant video: frames (T, S, S, 3) sRGB and ids (T, S, S) (-1 background).
    Motion and silhouettes from common/video.py; every sprite has Lab L = `lightness` and a
    random hue at 50-100% of the largest in-gamut chroma for that hue; the background is
    grey with common/video.py's texture mapped to L in lightness +- texture_range, so the
    grey level tells neither sprite from sprite nor (mostly) sprite from background."""
    k_v, k_c = jax.random.split(key)
    spec = cfg.spec(num_frames)
    v = vid.make_video(k_v, spec)
    k, s = cfg.num_sprites, cfg.frame_size
    u = jax.random.uniform(k_c, (2 * k + 16 + s * s,))
    hue, frac = 2 * jnp.pi * u[:k], 0.5 + 0.5 * u[k:2 * k]
    d = jnp.stack([jnp.cos(hue), jnp.sin(hue)], -1) @ jnp.asarray(_CHROMA)  # (K, 3)
    y0 = lightness_to_y(cfg.lightness)
    room = jnp.where(d > 0, (1 - y0) / jnp.where(d > 0, d, 1), y0 / jnp.where(d < 0, -d, 1))
    colour = srgb(y0 + (frac * room.min(-1))[:, None] * d)  # (K, 3), all L = lightness
    tex = vid.background(u[2 * k:2 * k + 16].reshape(4, 4, 1), u[2 * k + 16:].reshape(s, s, 1),
                         spec) / spec.texture  # (S, S, 1) in [0, 1]
    bg = srgb(lightness_to_y(cfg.lightness + cfg.texture_range * (2 * tex - 1)))
    top = jax.nn.one_hot(v.ids, k)  # (T, S, S, K), all zero on the background
    frames = jnp.where(v.ids[..., None] >= 0, top @ colour, bg[None])
    return frames, v.ids


def grey(frames):
    """The network's input: Lab L / 100 - 0.5 of RGB frames (..., H, W, 3) -> (..., 1)."""
    return rgb_to_lab(frames)[..., :1] / 100 - 0.5


def make_clips(key, cfg: Config):
    """batch_size training clips: grey frames (B, R + 1, S, S, 1) (R references, then the
    target) and their ab (B, R + 1, h, w, 2) at the feature resolution. Each clip is a
    video of only R * gap + 1 frames (uniform random starts: the same motion statistics as
    a window of a longer video)."""
    span = cfg.num_refs * cfg.frame_gap
    frames = jax.vmap(lambda k: make_video(k, cfg, span + 1)[0])(
        jax.random.split(key, cfg.batch_size))[:, ::cfg.frame_gap]  # (B, R + 1, S, S, 3)
    return grey(frames), pool(rgb_to_lab(frames)[..., 1:], cfg.stride)


# --- NETWORK ---


class Block(nn.Module):
    """A basic residual block: relu(x' + conv(relu(conv(x)))), x' a 1x1 projection when the
    stride or width changes."""

    ch: int
    stride: int
    cfg: Config

    @nn.compact
    def __call__(self, x):
        dt, sh = jnp.dtype(self.cfg.dtype), self.cfg.shift_conv
        y = nn.relu(Conv(self.ch, 3, self.stride, shift=sh, dtype=dt)(x))
        y = Conv(self.ch, 3, 1, shift=sh, dtype=dt)(y)
        if self.stride != 1 or x.shape[-1] != self.ch:
            x = Conv(self.ch, 1, self.stride, shift=sh, dtype=dt)(x)
        return nn.relu(x + y)


class Embed(nn.Module):
    """Clips of grey frames (B, F, S, S, 1) -> embeddings (B, F, h, w, D): a 2D residual
    trunk per frame, (y, x) in [-1, 1] concatenated (`coords`), 3x3x3 convs over the F
    frames, a 1x1 linear projection to D."""

    cfg: Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        b, f = x.shape[:2]
        x = x.reshape(b * f, *x.shape[2:])
        x = nn.relu(Conv(c.stage_channels[0], c.stem_kernel, c.stem_stride,
                         shift=c.shift_conv, dtype=dt)(x))
        for ch, st in zip(c.stage_channels, c.stage_strides, strict=True):
            for k in range(c.blocks_per_stage):
                x = Block(ch, st if k == 0 else 1, c)(x)
        x = x.reshape(b, f, *x.shape[1:])
        if c.coords:
            g = jnp.linspace(-1, 1, x.shape[2])
            yx = jnp.stack(jnp.meshgrid(g, g, indexing="ij"), -1).astype(x.dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(yx, (*x.shape[:-1], 2))], -1)
        for _ in range(c.conv3d_layers):
            x = nn.relu(nn.Conv(c.conv3d_channels, (3, 3, 3), padding="SAME", dtype=dt)(x))
        return nn.Dense(c.embed_dim, dtype=dt)(x).astype(jnp.float32)


def pointer(f_ref, f_tgt, temperature, topk: int = 0):
    """(1): A (N_ref, N_tgt), softmax over the reference pixels i of f_i . f_j / T; with
    topk > 0 only each column's k largest similarities are kept."""
    s = f_ref @ f_tgt.T / temperature
    if topk:
        kth = jax.lax.top_k(s.T, topk)[0][:, -1]  # (N_tgt,) the k-th largest per target
        s = jnp.where(s >= kth[None], s, -jnp.inf)
    return jax.nn.softmax(s, axis=0)


def propagate(a, labels_ref):
    """(2) / (4): c^_j = sum_i A_ij c_i: A (N_ref, N_tgt), labels (N_ref, L) -> (N_tgt, L)."""
    return a.T @ labels_ref


def colour_loss(f, labels, cfg: Config):
    """(3) on one clip: f (R + 1, h, w, D), colour cluster labels (R + 1, h, w); returns
    the loss and the accuracy of argmax c^_j."""
    d, q = f.shape[-1], cfg.num_clusters
    a = pointer(f[:-1].reshape(-1, d), f[-1].reshape(-1, d), cfg.temperature)
    p = propagate(a, jax.nn.one_hot(labels[:-1].reshape(-1), q))  # (N_tgt, Q)
    y = labels[-1].reshape(-1)
    nll = -jnp.log(jnp.take_along_axis(p, y[:, None], 1)[:, 0] + 1e-8)
    return nll.mean(), jnp.mean(jnp.argmax(p, -1) == y)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    centres: jax.Array  # (Q, 2) k-means ab centres
    step: jax.Array
    key: jax.Array
    # () bool, False from init: True only in the tests' broken variant (reference colours
    # from another clip); traced, so both arms share one program
    broken: jax.Array


def init(key, cfg: Config) -> State:
    k_net, k_km, key = jax.random.split(key, 3)
    frames = jax.vmap(lambda k: make_video(k, cfg, 1)[0])(
        jax.random.split(k_km, cfg.kmeans_videos))
    ab = rgb_to_lab(frames)[..., 1:].reshape(-1, 2)
    centres = kmeans(ab, cfg.num_clusters, cfg.kmeans_iters)
    params = init_params(k_net, cfg)
    return State(params, optax.adam(cfg.lr).init(params), centres,
                 jnp.zeros((), jnp.int32), key, jnp.zeros((), bool))


def init_params(key, cfg: Config):
    s = cfg.frame_size
    return Embed(cfg).init(key, jnp.zeros((1, cfg.num_refs + 1, s, s, 1)))["params"]


# --- UPDATE ---


def update(state: State, cfg: Config):
    key, k_data = jax.random.split(state.key)
    x, ab = make_clips(k_data, cfg)
    labels = quantize(ab, state.centres)  # (B, R + 1, h, w)
    shuffled = labels.at[:, :-1].set(jnp.roll(labels[:, :-1], 1, axis=0))
    labels = jnp.where(state.broken, shuffled, labels)

    def loss_fn(params):
        f = Embed(cfg).apply({"params": params}, x)
        loss, acc = jax.vmap(lambda a, b: colour_loss(a, b, cfg))(f, labels)
        return loss.mean(), acc.mean()

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optax.adam(cfg.lr).update(grads, state.opt_state, state.params)
    metrics = {"losses/colour": loss, "charts/colour_acc": acc,
               "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, step=state.step + 1, key=key), metrics


# --- EVALUATE ---

EVAL_KEY = 12345
"""Seed of the held-out videos (the same for every run and seed)."""


def iou(pred, truth):
    """J: |pred & truth| / |pred | truth| of bool masks (..., H, W); nan where both empty."""
    inter, union = (pred & truth).sum((-2, -1)), (pred | truth).sum((-2, -1))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), jnp.nan)


GREY_TEMPERATURES = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
"""T grid of the grey pointer (grey levels L / 100); evaluate reports the best T's J."""


def grey_features(g):
    """The grey pointer as (1): reference and target features of grey levels g (N,) such
    that f_i . f'_j = 2 g_i g_j - g_i^2 = -(g_i - g_j)^2 + g_j^2, so the softmax over i is
    that of -(g_i - g_j)^2 / T (no learned weights)."""
    return jnp.stack([g, g ** 2], -1), jnp.stack([2 * g, -jnp.ones_like(g)], -1)


def track(f_ref, f_tgt, ids0, temperature, cfg: Config, topk: int = 0):
    """(4): frame 0's sprite labels ids0 (S, S) (one-hot of K + 1 with background, pooled
    to h x w) propagated by the pointer of features f_ref, f_tgt (h * w, D); returns the
    predicted ids (S, S) (-1 background), the soft labels (h, w, K + 1) and A."""
    k, s = cfg.num_sprites, cfg.frame_size
    a = pointer(f_ref, f_tgt, temperature, topk)
    lab0 = pool(jax.nn.one_hot(ids0 + 1, k + 1), cfg.stride)  # (h, w, K + 1) soft
    h = lab0.shape[0]
    soft = propagate(a, lab0.reshape(-1, k + 1)).reshape(h, h, k + 1)
    up = jax.image.resize(soft, (s, s, k + 1), "bilinear")
    return jnp.argmax(up, -1) - 1, soft, a


def sprite_iou(pred, truth, k: int):
    """J per sprite (K,) of id maps (S, S)."""
    sprites = jnp.arange(k)[:, None, None]
    return iou(pred[None] == sprites, truth[None] == sprites)


def track_one(params, frames, ids, cfg: Config):
    """The network's pointer from frame 0 to frame t (clip: frame 0 x R, then frame t);
    returns the predicted ids (S, S), the soft labels, the colours c^ of frame t (RGB
    propagated by (2)) and J per sprite (K,)."""
    t, d = cfg.eval_gap, cfg.embed_dim
    clip = jnp.concatenate([jnp.repeat(frames[:1], cfg.num_refs, 0), frames[t:t + 1]])
    f = Embed(cfg).apply({"params": params}, grey(clip)[None])[0]
    pred, soft, a = track(f[0].reshape(-1, d), f[-1].reshape(-1, d), ids[0],
                          cfg.eval_temperature, cfg, cfg.eval_topk)
    h = soft.shape[0]
    colours = propagate(a, pool(frames[0], cfg.stride).reshape(-1, 3)).reshape(h, h, 3)
    return pred, soft, colours, sprite_iou(pred, ids[t], cfg.num_sprites)


def grey_one(frames, ids, cfg: Config):
    """The grey pointer from frame 0 to frame t at every T of GREY_TEMPERATURES: J (G, K)."""
    t = cfg.eval_gap
    g = pool(grey(frames[jnp.array([0, t])]), cfg.stride).reshape(2, -1)
    (f_ref, _), (_, f_tgt) = grey_features(g[0]), grey_features(g[1])
    return jnp.stack([sprite_iou(track(f_ref, f_tgt, ids[0], temp, cfg)[0], ids[t],
                                 cfg.num_sprites) for temp in GREY_TEMPERATURES])


def _eval_videos(key, cfg: Config):
    return jax.vmap(lambda k: make_video(k, cfg, cfg.eval_gap + 1))(
        jax.random.split(key, cfg.eval_videos))


def evaluate(state: State, cfg: Config):
    """Mask propagation from frame 0 to frame eval_gap on held-out videos: J (mean IoU over
    visible sprites, "j_mean"), the identity baseline's ("j_identity": frame 0's mask
    unmoved) and the grey pointer's ("j_grey": no learned weights, the best T of
    GREY_TEMPERATURES); videos made in the program from PRNGKey(EVAL_KEY), 16 at a time
    (lax.map: bounded memory at 256x256)."""
    key = jax.lax.optimization_barrier(jax.random.PRNGKey(EVAL_KEY))  # no constant folding

    def one(k):
        frames, ids = make_video(k, cfg, cfg.eval_gap + 1)
        return (track_one(state.params, frames, ids, cfg)[3], grey_one(frames, ids, cfg),
                sprite_iou(ids[0], ids[-1], cfg.num_sprites))

    j, j_grey, j_id = jax.lax.map(one, jax.random.split(key, cfg.eval_videos), batch_size=16)
    return {"j_mean": jnp.nanmean(j), "j_grey": jnp.max(jnp.nanmean(j_grey, (0, 2))),
            "j_identity": jnp.nanmean(j_id)}


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0, four held-out videos: reference frame 0 (colour), target frame t (grey), the
    colours copied by the pointer, the propagated mask and the true mask of frame t."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    params = jax.tree.map(lambda a: a[0], res.state.params)
    frames, ids = _eval_videos(jax.random.PRNGKey(EVAL_KEY), cfg)
    frames, ids = frames[:4], ids[:4]
    pred, _, colours, j = jax.jit(jax.vmap(lambda fr, i: track_one(params, fr, i, cfg)))(
        frames, ids)
    t = cfg.eval_gap
    cols = ["reference frame 0", f"target frame {t} (grey)", "colours copied",
            "propagated mask", "true mask"]
    fig, axes = plt.subplots(4, 5, figsize=(8, 6.6))
    for r in range(4):
        imgs = [np.clip(frames[r, 0], 0, 1), np.asarray(grey(frames[r, t]))[..., 0] + 0.5,
                np.clip(colours[r], 0, 1), pred[r], ids[r, t]]
        for c, img in enumerate(imgs):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if c == 1 else "viridis", vmin=0 if c == 1 else -1,
                      vmax=1 if c < 3 else cfg.num_sprites - 1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 3].set_xlabel(f"J {np.nanmean(np.asarray(j[r])):.2f}", fontsize=7)
    f = {k: float(np.asarray(x)[0]) for k, x in res.final.items()}
    fig.suptitle(f"Colorization pointer: held-out J {f['j_mean']:.3f} from frame 0 to {t} "
                 f"(identity {f['j_identity']:.3f}, grey pointer {f['j_grey']:.3f})", fontsize=9)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws held-out propagations."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["j_mean", "j_grey", "j_identity", "losses/colour",
                                               "charts/colour_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
