"""Arrow of Time (T-CAM): is a video playing forwards or backwards?

[1] D. Wei, J. J. Lim, A. Zisserman, W. T. Freeman. "Learning and Using the Arrow of Time."
    CVPR 2018. Released code: donglaiw/AoT_TCAM (Torch; 0603eaf): models/
    vggbn_tcam_pair2_cudnn.lua (the network), opts.lua and trainUtil's paramId 5.1 (flow
    from scratch: the solver), README (vnF 20 flow frames x vnC 2 channels, batch 32),
    trainCNN.lua (iter_size 3: gradients of 3 batches summed, / 3, one optim.sgd step),
    dataset_video.lua (direction drawn per sample, L337). Items marked [M] are ours or from
    memory, not checked.

A clip is cut into T groups of L consecutive motion frames; each group, stacked along the
channels, goes through one shared conv trunk; the T feature maps are concatenated along the
channels and the top (convs, global average pooling, a linear unit) gives the logit of
"forwards" ([1] Sec. 3, Fig. 2 "T-CAM"; the post's Fig. 20 caption: "3 conv layers and
average pooling" = the released two 3x3 convs and the linear layer after pooling, a 1x1
conv before it):
    z_i = trunk(flow[(i-1) L : i L])  for i = 1..T              (shared weights)
    s   = w . avgpool(top([z_1; ...; z_T])) + b                  (concat on channels)
    p(forward | clip) = sigmoid(s)
    loss = -mean[y log p + (1 - y) log(1 - p)]     y = 1 forward, 0 reversed   (BCE)
A reversed clip is the same frames in the opposite order: x_rev[t] = x[N - 1 - t], so its
motion frames are d_rev[t] = x_rev[t + 1] - x_rev[t] = -d[N - 2 - t].  (reversal)
Labels are balanced (each clip reversed with probability 1/2). The released list labels
1 = backward; here 1 = forward (a sign convention). [1]'s reversed flow is TV-L1 run on the
reversed video; for frame differences that is exactly -d reversed, as above.

Artificial cues ([1] Sec. 4): black framing carries compression leftovers that order time,
and camera motion is content-free; [1] crops black borders and stabilises the camera. Here
`border_crop` pixels are cut from every side before the motion frames (cue removal), and
the procedural camera is static (stabilisation is the identity). [1] (AoT_Dataset
tool_process/README.md) finds black borders as low-mean rows and columns over 5 frames; a
fixed crop equal to the known cue width removes the synthetic cue trivially, so the cue test
checks the pipeline's plumbing, not a border detector.

Motion input: FRAME DIFFERENCES d[t] = x[t + 1] - x[t] (L * C channels per group), a
stand-in for [1]'s TV-L1 optical flow (x and y, 2 L channels). Data: procedural videos
(common/video.py) of bouncing sprites under gravity with lossy bounces (restitution e < 1),
so a reversed clip gains energy; `evaluate` also scores two time-symmetric kinds, where no
classifier can beat 0.5 in expectation (leak checks): constant-velocity videos (elastic
walls) and gravity videos with elastic bounces (restitution 1: sees gravity-only leaks); and
the cue videos (constant velocity plus a border whose brightness drifts with time, the
catalogue's cue test; training clips carry the cue only with `train_cue` > 0).

Reproduce (CPU demo, 32x32 frames, a small trunk):
    python selfsup/arrow_of_time.py --preset quick --plot selfsup/arrow_of_time.png
Measured (1 seed, 300 steps on a heavily loaded 2-core CPU, load ~13: the 300 updates
took about 9 min wall, 1.5 CPU-min; the run was cut in its evaluation by a 580-s timeout
and evaluated from its final checkpoint): held-out accuracy (512 clips each, chance 0.5)
on gravity clips 0.949, on time-symmetric constant-velocity clips 0.506 and gravity clips
with elastic bounces 0.494 (no leakage; the same checkpoint, scored after that kind was
added), on cue videos 0.479 (the training clips had no cue, train_cue 0: this says nothing
about the crop; the slow cue test, trained with the cue on the tests' tiny config, reads
1.000 without the crop and 0.514 with it); training loss 0.51 (first 20 steps) -> 0.14
(last 20). Before the generator started gravity clips at a uniform time of a bounce orbit,
its start state leaked the arrow (elastic bounces were still learned) and this run read
0.988.
Paper setting (GPU; procedural videos in place of UCF101/Flickr, VGG-16-BN on 224x224
crops of 240x240 frames: 14x14 maps per group, as the released View(-1, 1024, 14, 14)):
    python selfsup/arrow_of_time.py --preset paper
[1] reports AoT accuracy on UCF101 of about 0.8 for flow T-CAM [M].

Differences from the paper:
- Procedural videos, not UCF101 / Flickr-150K / Kinetics; frame differences, not TV-L1
  flow; a fixed border crop, not [1]'s black-frame detection; no camera motion.
- Grey frames; balanced Bernoulli labels per clip (the released loader draws the direction
  per sample too); one optimiser step per batch of 32 (the released iter_size 3 sums the
  gradients of 3 batches, / 3: effective batch 96, 5000 updates per epoch); weight decay on
  all parameters (Torch optim.sgd).
- Initialisation: He normal on fan_in; the released wInit "kaiming" is normal with std
  sqrt(2 / (9 n_out)) (fan_out, model.lua L65-67).
- No augmentation: the released loader also flips horizontally (negating flow x), takes one
  of five corner crops, starts at a random frame, and feeds inputs x 255 - 128.
- `quick`: 32x32 frames, T = 2 groups of 5 differences, a 5-conv trunk, 2 top convs of 64,
  no dropout, lr 0.03 (x 0.1 after 200 steps), 300 steps.
- Sprites come to rest on the floor in forward gravity clips (and leave it in reversed
  ones): part of what the network reads, as it is part of the physics.
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
    """Arrow of Time with T-CAM; defaults are [1]'s released flow-from-scratch run."""

    frame_size: int = 224
    """side of the square grey frames (paper preset 240: VGG's 224x224 after the crop)"""
    groups: int = 2
    """T: groups of motion frames, each through the shared trunk (pair2: T = 2)"""
    group_frames: int = 10
    """L: motion frames per group (vnF 20 = 10 flow frames x 2 in [1]); a clip has T L + 1"""
    num_sprites: int = 2
    """bouncing sprites per video"""
    radius: tuple[float, float] = (0.08, 0.14)
    """range of a sprite's radius, in frame sides"""
    speed: tuple[float, float] = (0.0, 0.1)
    """range of a sprite's initial speed, frame sides per frame"""
    gravity: float = 0.015
    """downward acceleration, frame sides per frame^2 (0 with restitution 1: constant motion)"""
    restitution: float = 0.6
    """speed kept at a bounce (< 1: lossy, the arrow of time; 1: elastic)"""
    noise_std: float = 0.02
    """std of fresh pixel noise in every frame"""
    border_crop: int = 8
    """pixels cut from every side before the motion frames (cue removal; 0: none)"""
    cue_width: int = 8
    """width in pixels of the synthetic drifting border of the cue videos"""
    cue_drift: float = 0.3
    """brightness the synthetic border gains from the first to the last frame of a clip"""
    train_cue: float = 0.0
    """border drift of the training clips (0: no cue; cue_drift: the slow cue test's)"""
    trunk_channels: tuple[int, ...] = (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512,
                                       512, 0, 512, 512, 512)
    """3x3 conv widths of the shared trunk, 0 = a 2x2 max pool (VGG-16 D, last pool removed)"""
    top_channels: tuple[int, ...] = (1024, 1024)
    """3x3 conv widths of the top on the concatenated groups (then pooling and a linear)"""
    dropout: float = 0.5
    """dropout after each top conv"""
    bn_momentum: float = 0.9
    """momentum of BatchNorm's running averages (Torch's 0.1)"""
    batch_size: int = 32
    """clips per SGD step"""
    num_steps: int = 100_000
    """SGD steps (the released 20 epochs x 5000 updates, each of 3 x 32 clips)"""
    lr: float = 1e-2
    """learning rate of the first lr_drop_steps steps (then x 0.1; paramId 5.1)"""
    lr_drop_steps: int = 5000
    """steps at lr before it drops to lr / 10 (one epoch of 5000 updates)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 5e-4
    """L2 decay added to every gradient"""
    num_eval_clips: int = 512
    """held-out clips of each kind (gravity, constant, cue, elastic) scored by evaluate"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""
    dtype: str = "float32"
    """compute dtype of convs and dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # clips per update

    @property
    def clip_frames(self) -> int:
        return self.groups * self.group_frames + 1

    def spec(self) -> vid.VideoSpec:
        s = self.frame_size
        return vid.VideoSpec(size=s, num_frames=self.clip_frames, num_sprites=self.num_sprites,
                             radius=(self.radius[0] * s, self.radius[1] * s),
                             speed=(self.speed[0] * s, self.speed[1] * s),
                             noise_std=self.noise_std)

    def validate(self):
        if self.groups < 1 or self.group_frames < 1 or self.num_sprites < 1:
            raise ValueError(f"groups={self.groups}, group_frames={self.group_frames} and "
                             f"num_sprites={self.num_sprites} must be >= 1")
        if not 0 < self.radius[0] <= self.radius[1] < (0.25 if self.gravity > 0 else 0.5):
            raise ValueError(f"radius={self.radius} must satisfy 0 < low <= high < 0.5 (< 0.25"
                             " under gravity: room for the start orbit)")
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed={self.speed} must satisfy 0 <= low <= high")
        if self.gravity < 0:
            raise ValueError(f"gravity={self.gravity} must be >= 0")
        if not 0 < self.restitution <= 1:
            raise ValueError(f"restitution={self.restitution} must be in (0, 1]")
        if self.border_crop < 0 or 2 * self.border_crop >= self.frame_size:
            raise ValueError(f"border_crop={self.border_crop} must be in [0, frame_size / 2 ="
                             f" {self.frame_size // 2})")
        if self.train_cue < 0:
            raise ValueError(f"train_cue={self.train_cue} must be >= 0")
        if self.cue_width < 1 or 2 * self.cue_width >= self.frame_size:
            raise ValueError(f"cue_width={self.cue_width} must be in [1, frame_size / 2)")
        pools = self.trunk_channels.count(0)
        if min(self.trunk_channels + (1,)) < 0 or min(self.top_channels + (1,)) < 1:
            raise ValueError(f"trunk_channels={self.trunk_channels} must be >= 0 and "
                             f"top_channels={self.top_channels} >= 1")
        if self.frame_size - 2 * self.border_crop < 2 ** pools:
            raise ValueError(f"frame_size - 2 border_crop = "
                             f"{self.frame_size - 2 * self.border_crop} must be >= 2^{pools} "
                             "(the trunk's max pools)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 32x32 frames (28x28 after the crop), T = 2 groups of 5 differences, a
    # 5-conv trunk and two top convs of 64.
    "quick": dict(frame_size=32, group_frames=5, border_crop=2, cue_width=2,
                  trunk_channels=(16, 16, 0, 32, 32, 0, 64), top_channels=(64, 64),
                  dropout=0.0, batch_size=32, num_steps=300, lr=0.03, lr_drop_steps=200,
                  shift_conv=True),
    "paper": dict(frame_size=240),  # 224 after the crop: 14x14 maps, as released
}


# --- DATA ---


def reverse(frames):
    """Clips played backwards: (..., N, H, W, C) -> frames[..., ::-1, :, :, :]."""
    return jnp.flip(frames, axis=-4)


def motion_frames(frames):
    """Frame differences d[t] = x[t + 1] - x[t], (..., N, H, W, C) -> (..., N - 1, H, W, C):
    the stand-in for [1]'s optical flow (reversal: d_rev[t] = -d[N - 2 - t])."""
    return frames[..., 1:, :, :, :] - frames[..., :-1, :, :, :]


def crop_border(frames, crop: int):
    """Cue removal ([1] Sec. 4: black framing removed): `crop` pixels off every side."""
    if crop == 0:
        return frames
    return frames[..., crop:-crop, crop:-crop, :]


def add_border_cue(frames, drift, width: int):
    """The catalogue's synthetic chronological cue: a border of `width` pixels whose
    brightness grows linearly from 0 to `drift` over the clip (drift 0: untouched)."""
    n, s = frames.shape[-4], frames.shape[-3]
    i = jnp.arange(s)
    edge = (i < width) | (i >= s - width)
    border = (edge[:, None] | edge[None, :])[..., None]  # (S, S, 1)
    level = drift * jnp.arange(n) / (n - 1)  # (N,)
    return jnp.where(border & (drift > 0), level[:, None, None, None], frames)


def make_clips(key, n: int, gravity, restitution, cue, cfg: Config):
    """n clips with balanced direction labels: motion-frame groups (n, T, S', S', L C) and
    labels (n,) (1 forward, 0 reversed); gravity and restitution in frame units (traced),
    `cue` the border drift (0: none)."""
    k_vid, k_lab = jax.random.split(key)
    return clips_of(jax.random.split(k_vid, n), jax.random.bernoulli(k_lab, 0.5, (n,)),
                    gravity, restitution, cue, cfg)


def clips_of(video_keys, labels, gravity, restitution, cue, cfg: Config):
    """make_clips from its n video keys and n boolean labels (True: forward)."""
    spec, s, n = cfg.spec(), cfg.frame_size, labels.shape[0]
    videos = jax.vmap(lambda k: vid.make_video(k, spec, gravity * s, restitution))(video_keys)
    frames = add_border_cue(videos.frames, cue, cfg.cue_width)  # (n, N, S, S, C)
    frames = jnp.where(labels[:, None, None, None, None], frames, reverse(frames))
    d = motion_frames(crop_border(frames, cfg.border_crop))  # (n, T L, S', S', C)
    t, l = cfg.groups, cfg.group_frames
    d = d.reshape(n, t, l, *d.shape[2:])  # (n, T, L, S', S', C)
    d = jnp.moveaxis(d, 2, -2).reshape(*d.shape[:2], *d.shape[3:5], -1)  # (n, T, S', S', L C)
    return d, labels.astype(jnp.int32)


# --- NETWORKS ---


class Trunk(nn.Module):
    """VGG-BN on one group: 3x3 conv -> ReLU -> BatchNorm (the released order), 0 = 2x2 max
    pool. (B, S, S, L C) -> (B, h, w, F)."""

    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.cfg
        for ch in c.trunk_channels:
            if ch == 0:
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.relu(Conv(ch, 3, shift=c.shift_conv, dtype=jnp.dtype(c.dtype),
                             kernel_init=nn.initializers.he_normal())(x))
            x = nn.BatchNorm(use_running_average=not train, momentum=c.bn_momentum,
                             epsilon=1e-3, dtype=jnp.dtype(c.dtype))(x)
        return x


class TCAM(nn.Module):
    """[1] Fig. 2: the shared trunk on each of the T groups, features concatenated on the
    channels, top convs (ReLU, BatchNorm, dropout), average pooling, a linear logit."""

    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.cfg
        b, t = x.shape[:2]
        z = Trunk(c, name="trunk")(x.reshape(b * t, *x.shape[2:]), train)  # (B T, h, w, F)
        z = z.reshape(b, t, *z.shape[1:])  # (B, T, h, w, F)
        z = jnp.moveaxis(z, 1, -2).reshape(b, *z.shape[2:4], -1)  # (B, h, w, T F) [z_1 ... z_T]
        for ch in c.top_channels:
            z = nn.relu(Conv(ch, 3, shift=c.shift_conv, dtype=jnp.dtype(c.dtype),
                             kernel_init=nn.initializers.he_normal())(z))
            z = nn.BatchNorm(use_running_average=not train, momentum=c.bn_momentum,
                             epsilon=1e-3, dtype=jnp.dtype(c.dtype))(z)
            z = nn.Dropout(c.dropout, deterministic=not train)(z)
        z = z.mean((1, 2))  # (B, C) global average pooling (the CAM's)
        return nn.Dense(1, dtype=jnp.dtype(c.dtype), name="fc")(z)[:, 0].astype(jnp.float32)


# --- LOSS ---


def aot_loss(logits, labels):
    """BCE of p(forward) = sigmoid(logit) against y (1 forward); and the accuracy."""
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    return loss, jnp.mean((logits > 0) == (labels == 1))


def make_optimizer(cfg: Config):
    """paramId 5.1: SGD momentum 0.9, weight decay 5e-4, lr then lr / 10 after
    lr_drop_steps."""
    sched = optax.piecewise_constant_schedule(cfg.lr, {cfg.lr_drop_steps: 0.1})
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(sched, momentum=cfg.momentum)), sched


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    # The training videos' physics and cue, traced so that the tests' arms (constant
    # velocity: gravity 0, restitution 1; the drifting border) share one program.
    gravity: jax.Array  # () frame sides per frame^2
    restitution: jax.Array  # ()
    cue: jax.Array  # () border drift of the training clips (0: none)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    s = cfg.frame_size - 2 * cfg.border_crop
    x = jnp.zeros((2, cfg.groups, s, s, cfg.group_frames))
    variables = TCAM(cfg).init(k_net, x, train=False)
    params = variables["params"]
    f = lambda v: jnp.asarray(v, jnp.float32)
    return State(params, variables["batch_stats"], make_optimizer(cfg)[0].init(params),
                 jnp.zeros((), jnp.int32), key, f(cfg.gravity), f(cfg.restitution),
                 f(cfg.train_cue))


# --- UPDATE ---


def update(state: State, cfg: Config):
    net, (tx, sched) = TCAM(cfg), make_optimizer(cfg)
    key, k_data, k_drop = jax.random.split(state.key, 3)
    x, y = make_clips(k_data, cfg.batch_size, state.gravity, state.restitution, state.cue, cfg)

    def loss_fn(params):
        logits, new = net.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                train=True, mutable=["batch_stats"], rngs={"dropout": k_drop})
        loss, acc = aot_loss(logits, y)
        return loss, (acc, new["batch_stats"])

    (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/aot": loss, "charts/aot_acc": acc, "charts/lr": sched(state.step),
               "charts/grad_norm": optax.global_norm(grads)}
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                         step=state.step + 1, key=key), metrics


# --- EVALUATE ---

EVAL_KEY = 12345
"""Seed of the fixed held-out clips (the same for every run and seed)."""
KINDS = ("aot_acc", "aot_acc_constant", "aot_acc_cue", "aot_acc_elastic")


def evaluate(state: State, cfg: Config):
    """Held-out arrow-of-time accuracy (chance 0.5) on num_eval_clips clips of each kind:
    "aot_acc" (cfg's physics, lossy bounces), "aot_acc_constant" (gravity 0, restitution 1)
    and "aot_acc_elastic" (cfg.gravity, restitution 1): time-symmetric, about 0.5 for any
    classifier; "aot_acc_cue" (constant velocity plus the drifting border). The clips are
    made here from PRNGKey(EVAL_KEY), batch_size at a time (lax.map over kinds and chunks:
    one generator and one network in the program, no data constants)."""
    n, b = cfg.num_eval_clips, cfg.batch_size
    root = jax.random.PRNGKey(EVAL_KEY)
    keys = jnp.concatenate([jax.random.split(root, 3), jax.random.fold_in(root, 3)[None]])
    physics = jnp.array([(cfg.gravity, cfg.restitution, 0.0), (0.0, 1.0, 0.0),
                         (0.0, 1.0, cfg.cue_drift), (cfg.gravity, 1.0, 0.0)], jnp.float32)
    m = -(-n // b)  # chunks per kind; the last one is padded with repeats and masked out
    at = jnp.arange(m * b) % n

    def per_kind(key):  # make_clips' keys and labels
        k_vid, k_lab = jax.random.split(key)
        vk, y = jax.random.split(k_vid, n)[at], jax.random.bernoulli(k_lab, 0.5, (n,))[at]
        return vk.reshape(m, b, *vk.shape[1:]), y.reshape(m, b)

    vk, y = jax.vmap(per_kind)(keys)  # (4, m, b, ...)
    flat = lambda a: a.reshape(4 * m, *a.shape[2:])
    xs = (flat(vk), flat(y), jnp.repeat(physics, m, axis=0))

    def score(chunk):
        vk, y, (g, e, cue) = chunk
        x, y = clips_of(vk, y, g, e, cue, cfg)
        logits = TCAM(cfg).apply({"params": state.params, "batch_stats": state.batch_stats},
                                 x, train=False)
        return (logits > 0) == (y == 1)

    right = jax.lax.map(score, xs).reshape(4, m * b)
    acc = (right * (jnp.arange(m * b) < n)).sum(1) / n
    return dict(zip(KINDS, acc, strict=True))


# --- PLOT ---


def plot(res, cfg: Config, out: str):
    """A gravity video's frames and its energy, against a constant-velocity one, and the
    held-out accuracies of seed 0."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    spec = cfg.spec()
    spec = vid.VideoSpec(**{**spec.__dict__, "num_frames": 4 * cfg.clip_frames})
    key, s = jax.random.PRNGKey(EVAL_KEY + 1), cfg.frame_size
    g = vid.make_video(key, spec, cfg.gravity * s, cfg.restitution)
    c = vid.make_video(key, spec, 0.0, 1.0)
    e_g = np.asarray(vid.energy(g, s, cfg.gravity * s)).sum(-1)
    e_c = np.asarray(vid.energy(c, s, 0.0)).sum(-1)
    ts = np.linspace(0, spec.num_frames - 1, 10).astype(int)
    fig = plt.figure(figsize=(12, 5.5))
    grid = fig.add_gridspec(3, 1, height_ratios=[1, 1, 1.6], hspace=0.5)
    for row, v, name in ((0, g, "gravity, lossy bounces"), (1, c, "constant velocity")):
        sub = grid[row].subgridspec(1, 10)
        for j, t in enumerate(ts):
            ax = fig.add_subplot(sub[j])
            ax.imshow(np.asarray(v.frames[t, ..., 0]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"t={t}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name.replace(", ", ",\n"), fontsize=7)
    ax = fig.add_subplot(grid[2])
    ax.plot(e_g, "r-", label="gravity + lossy bounces (forward: energy falls)")
    ax.plot(e_c, "b-", label="constant velocity (time-symmetric)")
    ax.set_xlabel("frame t", fontsize=8), ax.set_ylabel("energy (px^2/frame^2)", fontsize=8)
    ax.legend(fontsize=8)
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    fig.suptitle(f"Arrow of time (T-CAM on frame differences): held-out accuracy gravity "
                 f"{f['aot_acc']:.3f}, constant velocity {f['aot_acc_constant']:.3f}, "
                 f"elastic gravity {f['aot_acc_elastic']:.3f} (chance 0.5), cue videos "
                 f"{f['aot_acc_cue']:.3f}", fontsize=9)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws two videos, their energy and the
    held-out accuracies."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[*KINDS, "losses/aot", "charts/aot_acc"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        print(plot(res, Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
