"""Video colorization as a pretext task: tracking emerges from copying colours.

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
scored by the region similarity J (IoU, the DAVIS J) per sprite, against the "identity"
baseline (frame 0's mask, unmoved) and the same network at init (tests).

Data: procedural videos (common/video.py, channels=3): K sprites each of one random colour
over a grey textured background, so a target pixel's colour can only be known by pointing
at the same sprite in a reference (the grey level alone does not say the colour).

Reproduce (CPU demo, 32x32 frames, 16x16 features, a small residual trunk):
    python selfsup/video_colorization.py --preset quick --plot selfsup/video_colorization.png
Measured (1 seed, 200 steps of 16 clips, 363 s wall / 83 CPU-s, loaded 2-core CPU, load
~17): held-out J from frame 0 to frame 5 (128 videos, 2 sprites) 0.456, against the
identity baseline 0.121 and the same network at init 0.000 (its propagated labels are all
background); training colour accuracy 0.873 (first 10 steps) -> 0.963 (last 10; the grey
background alone is ~0.86), loss 0.375 -> 0.087. The figure shows sprites tracked and,
when two sprites have the same grey level and shape, their colours and masks swapped.
Paper setting (GPU; procedural videos in place of Kinetics, ResNet-18 + 3D convs):
    python selfsup/video_colorization.py --preset paper
[1] reports DAVIS 2017 validation J&F mean 34.0 (J 34.6), above optical-flow propagation
(J 26.7 [M]), without any fine-tuning [M].

Differences from the paper:
- Procedural videos, not Kinetics; sprites have one flat colour each.
- Trunk: a ResNet-18-like stack (no batch norm, stem stride 2 and no max pool so that the
  total stride is 8) and `conv3d_layers` 3x3x3 convs over the R + 1 frames [M]; the
  propagation clip at evaluation is (frame 0 x R, frame t).
- Train temperature 1 and T_eval 0.5 [M]; no top-k restriction in [1] [M] (`eval_topk` > 0
  keeps only the k most similar reference pixels of each target pixel, as later work does).
- k-means on the ab of the first frame of `kmeans_videos` training videos, inside `init`.
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
    num_frames: int = 30
    """frames of each procedural video"""
    num_sprites: int = 2
    """sprites per video, each of one random colour"""
    radius: tuple[float, float] = (0.06, 0.12)
    """range of a sprite's radius, in frame sides"""
    speed: tuple[float, float] = (0.01, 0.03)
    """range of a sprite's speed, frame sides per frame"""
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

    def spec(self) -> vid.VideoSpec:
        s = self.frame_size
        return vid.VideoSpec(size=s, num_frames=self.num_frames, num_sprites=self.num_sprites,
                             channels=3, radius=(self.radius[0] * s, self.radius[1] * s),
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
        if self.num_refs * self.frame_gap >= self.num_frames:
            raise ValueError(f"num_refs * frame_gap = {self.num_refs * self.frame_gap} must "
                             f"be < num_frames={self.num_frames}")
        if not 1 <= self.eval_gap < self.num_frames:
            raise ValueError(f"eval_gap={self.eval_gap} must be in [1, num_frames)")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters={self.num_clusters} must be >= 2")
        if self.temperature <= 0 or self.eval_temperature <= 0:
            raise ValueError(f"temperature={self.temperature} and eval_temperature="
                             f"{self.eval_temperature} must be > 0")
        n_ref = self.num_refs * (self.frame_size // self.stride) ** 2
        if not 0 <= self.eval_topk <= n_ref:
            raise ValueError(f"eval_topk={self.eval_topk} must be in [0, {n_ref}]")
        if not 0 < self.radius[0] <= self.radius[1] < 0.25:
            raise ValueError(f"radius={self.radius} must satisfy 0 < low <= high < 0.25")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 frames, 16x16 features, a 2-stage residual trunk, no 3D convs.
    "quick": dict(frame_size=32, num_frames=16, radius=(0.1, 0.18), speed=(0.03, 0.07),
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


def make_videos(key, n: int, cfg: Config):
    return jax.vmap(lambda k: vid.make_video(k, cfg.spec()))(jax.random.split(key, n))


def grey(frames):
    """The network's input: Lab L / 100 - 0.5 of RGB frames (..., H, W, 3) -> (..., 1)."""
    return rgb_to_lab(frames)[..., :1] / 100 - 0.5


def make_clips(key, cfg: Config):
    """batch_size training clips: grey frames (B, R + 1, S, S, 1) (R references, then the
    target) and their ab (B, R + 1, h, w, 2) at the feature resolution."""
    k_v, k_s = jax.random.split(key)
    videos = make_videos(k_v, cfg.batch_size, cfg)
    span = cfg.num_refs * cfg.frame_gap
    start = jax.random.randint(k_s, (cfg.batch_size,), 0, cfg.num_frames - span)
    idx = start[:, None] + cfg.frame_gap * jnp.arange(cfg.num_refs + 1)
    frames = jax.vmap(lambda f, i: f[i])(videos.frames, idx)  # (B, R + 1, S, S, 3)
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
    trunk per frame, 3x3x3 convs over the F frames, a 1x1 linear projection to D."""

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
    net_key: jax.Array  # the key of the network's init (evaluate scores that net too)
    step: jax.Array
    key: jax.Array
    # () bool, False from init: True only in the tests' broken variant (reference colours
    # from another clip); traced, so both arms share one program
    broken: jax.Array


def init(key, cfg: Config) -> State:
    k_net, k_km, key = jax.random.split(key, 3)
    v = make_videos(k_km, cfg.kmeans_videos, cfg)
    ab = rgb_to_lab(v.frames[:, 0])[..., 1:].reshape(-1, 2)
    centres = kmeans(ab, cfg.num_clusters, cfg.kmeans_iters)
    params = init_params(k_net, cfg)
    return State(params, optax.adam(cfg.lr).init(params), centres, k_net,
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


def track_one(params, frames, ids, cfg: Config):
    """Frame 0's sprite labels (one-hot of K + 1 with background) propagated to frame t by
    (4); returns the predicted ids (S, S) (-1 background), the soft labels at feature
    resolution, the colours c^ of frame t (RGB propagated by (2)) and J per sprite (K,)."""
    t, k, s = cfg.eval_gap, cfg.num_sprites, cfg.frame_size
    clip = jnp.concatenate([jnp.repeat(frames[:1], cfg.num_refs, 0), frames[t:t + 1]])
    f = Embed(cfg).apply({"params": params}, grey(clip)[None])[0]
    d = f.shape[-1]
    a = pointer(f[0].reshape(-1, d), f[-1].reshape(-1, d), cfg.eval_temperature,
                cfg.eval_topk)
    lab0 = pool(jax.nn.one_hot(ids[0] + 1, k + 1), cfg.stride)  # (h, w, K + 1) soft
    h = lab0.shape[0]
    soft = propagate(a, lab0.reshape(-1, k + 1)).reshape(h, h, k + 1)
    up = jax.image.resize(soft, (s, s, k + 1), "bilinear")
    pred = jnp.argmax(up, -1) - 1
    colours = propagate(a, pool(frames[0], cfg.stride).reshape(-1, 3)).reshape(h, h, 3)
    sprites = jnp.arange(k)[:, None, None]
    return pred, soft, colours, iou(pred[None] == sprites, ids[t][None] == sprites)


def _eval_videos(key, cfg: Config):
    spec = cfg.spec()
    return jax.vmap(lambda k: vid.make_video(k, spec))(jax.random.split(key, cfg.eval_videos))


def evaluate(state: State, cfg: Config):
    """Mask propagation from frame 0 to frame eval_gap on held-out videos: J (mean IoU over
    visible sprites, "j_mean"), the identity baseline's ("j_identity": frame 0's mask
    unmoved) and the same network at its initialisation's ("j_init"); videos made in the
    program from PRNGKey(EVAL_KEY), 16 at a time (lax.map: bounded memory at 256x256)."""
    key = jax.lax.optimization_barrier(jax.random.PRNGKey(EVAL_KEY))  # no constant folding
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), state.params,
                        init_params(state.net_key, cfg))
    sprites = jnp.arange(cfg.num_sprites)[:, None, None]

    def one(k):
        v = vid.make_video(k, cfg.spec())
        j = jax.vmap(lambda p: track_one(p, v.frames, v.ids, cfg)[3])(both)  # (2, K)
        return j, iou(v.ids[0] == sprites, v.ids[cfg.eval_gap] == sprites)

    j, j_id = jax.lax.map(one, jax.random.split(key, cfg.eval_videos), batch_size=16)
    return {"j_mean": jnp.nanmean(j[:, 0]), "j_init": jnp.nanmean(j[:, 1]),
            "j_identity": jnp.nanmean(j_id)}


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """Seed 0, four held-out videos: reference frame 0 (colour), target frame t (grey), the
    colours copied by the pointer, the propagated mask and the true mask of frame t."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    params = jax.tree.map(lambda a: a[0], res.state.params)
    v = _eval_videos(jax.random.PRNGKey(EVAL_KEY), cfg)
    frames, ids = v.frames[:4], v.ids[:4]
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
                 f"(identity {f['j_identity']:.3f}, init {f['j_init']:.3f})", fontsize=9)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws held-out propagations."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["j_mean", "j_init", "j_identity", "losses/colour",
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
