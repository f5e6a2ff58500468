"""Uniform visual domain randomization: a CNN trained only on randomized renders localizes the
target in a held-out "real" style.

[1] J. Tobin, R. Fong, A. Ray, J. Schneider, W. Zaremba, P. Abbeel. "Domain Randomization for
    Transferring Deep Neural Networks from Simulation to the Real World." IROS 2017,
    arXiv:1703.06907.
[2] F. Sadeghi, S. Levine. "CAD2RL: Real Single-Image Flight without a Single Real Image."
    RSS 2017, arXiv:1611.04201 (randomized textures and lighting for a collision-free policy).
[3] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post).

Uniform DR ([3]): every rendering parameter xi_i is drawn uniformly in [xi_i^low, xi_i^high]
for every training image; with enough variability "the real world may appear to the model as
just another variation" ([1] abstract). [1] randomizes the number and shape of distractor
objects, the position and texture of all objects, the textures of the table, floor and walls,
the camera's position, orientation and field of view, the number of lights and their
position, orientation and specular properties, and the type and amount of random noise added
to the images; a CNN regresses the target object's position from one image (squared error)
and, trained on renders only, is accurate to 1.5 cm on real images ([1] abstract).

Here (common/scenes.py): a top-down table with a texture of one of 4 procedural families
(stripes, checker, value noise, gradient) and two random colours, a red-disc-shaped target of
random colour and up to K distractors (squares / triangles; random number, position, size,
colour), a light (brightness and a linear shading gradient), a camera (offset, zoom,
rotation) and Gaussian pixel noise. Two networks of the same architecture train side by side
in one program, on the same keys (so the same target positions), the same budget:
    DR:        xi ~ U[low, high] per image, each aspect on or off by a flag (the ablations)
    canonical: one fixed style (plain grey table, no distractors, uniform light, no noise)
    loss:      L = mean_i ||f_theta(render(xi_i)) - (x_i, y_i)||^2             ([1] [M])
Both are evaluated on the held-out "real" style (a wood-rings texture family and a side light
that the ranges never sample, 3 distractors, a red target) and in distribution; the sim-to-real
gap is real error - in-distribution error.

Reproduce (CPU demo, both arms, 2 seeds, one plot):
    python generalization/uniform_dr_visual.py --preset quick --num-seeds 2 \
        --plot generalization/uniform_dr_visual.png
`paper` preset (the defaults): 224 x 224 renders, a VGG-16-sized CNN from scratch (13 convs,
FC 256-64), up to 10 distractors, Adam 1e-4, batch 64, 50k updates:
    python generalization/uniform_dr_visual.py --preset paper
Ablations (a flag per randomized aspect, as [1]'s ablations [M]): --no-random-texture,
--no-random-colour, --no-random-distractors, --no-random-light, --no-random-camera,
--no-random-noise, and --texture-pool N (a pool of N texture draws instead of a fresh one per
image; [1] varies the number of unique textures), --train-scenes N (a fixed training set of
N scenes; [1] varies the training set's size [M]).
Ours (quick preset: 24 x 24, CNN 16-32-32 + FC 64, K = 3, batch 32, 300 updates; 2 seeds, a
loaded 2-core CPU, 3.3 min wall, 1.3 CPU-min, compile included; the wall time varies with the
load), mean Euclidean error in table units (the target's centre is uniform in [-0.7, 0.7]^2;
predicting the centre scores ~0.54):
    held-out real style    DR 0.142 0.119    canonical only 0.551 0.497  (ratio 0.26 0.24)
    in distribution        DR 0.219 0.199    canonical only 0.023 0.025  (each its own style)
    sim-to-real gap        DR -0.08 -0.08    canonical only +0.53 +0.47
    (the DR arm on the canonical style 0.118 0.119; the canonical arm on the DR ranges 0.463
    0.487). The canonical arm predicts near the table's centre on real images (plot: flat),
    the DR arm follows the diagonal; its real error is below its in-distribution error
    because the real style (3 distractors, an un-jittered red target) is easier than the
    ranges' extremes. The DR arm is far from converged (0.22 in its own ranges, of which
    ~0.055 is the camera's label noise, see below): the quick run shows the direction of the
    effect, not its converged size. Plot: generalization/uniform_dr_visual.png.

Differences from the paper:
- A 2-D procedural renderer, not MuJoCo with 3-D meshes, walls, several lights and a robot;
  the "real" images are a held-out procedural style (sim-to-sim), not photographs. Errors are
  in table units (the table spans [-1, 1]); [1]'s 1.5 cm is on a real table and a 3-D target.
- The network: a small CNN trained from scratch (`channels`, `convs_per_block`, `hidden`);
  [1] uses VGG-16 initialised on ImageNet (and reports an ablation without pretraining [M]);
  the paper preset has VGG-16's conv layout without its weights. Output (x, y), not (x, y, z).
  Both arms start from the same initial weights (a paired comparison).
- [M] (not checked against the paper's text): FC 256-64 after the convs, a 3-D output, Adam
  with lr 1e-4, batch 64, 50k updates, up to 10 distractors and 224 x 224 inputs; the
  ablation numbers are not quoted here. Of the ablation flags only --no-random-texture is
  measured (a slow-tier test, 16 x 16, 250 updates: real error 0.52 0.53 vs 0.23 0.17).
- No table edge, floor or robot is drawn: the table texture fills the view, so nothing in the
  image fixes the table frame and camera randomization is pure label noise (Monte Carlo:
  a floor of ~0.055 mean error under the quick ranges); [1] sees the table's edge, the floor
  (whose texture it also randomizes) and the robot. --no-random-camera removes it.
- Textures: 4 procedural families (stripes, checker, value noise, gradient) with two random
  colours; [1] uses, as recalled [M], 3 (a random RGB value, a gradient between two RGB
  values, a checker between two). Distractors here are flat-coloured, not textured.
- The target is always a disc and distractors are squares / triangles, so shape identifies
  the target; [1] uses specific object meshes. The target's colour is only jittered around
  red (RGB in [0.6, 1] x [0, 0.4]^2) while [1] randomizes every object's texture: with any
  colour, a 32 x 32 version (batch 64, 300 updates, 1 seed) stayed near chance (0.39 in
  its ranges and on the real style), a budget matter at CPU scale. Fresh renders every
  update unless --train-scenes fixes a training set (or --texture-pool the textures).
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
from common import scenes as sc
from common.nets import Conv

# --- CONFIG ---

EVAL_KEY = 4242  # the held-out scenes of evaluate()
POOL_KEY = 777  # the texture pool of --texture-pool
DATA_KEY = 888  # the fixed training scenes of --train-scenes
ASPECTS = sc.ASPECTS  # flag random_<aspect> -> the Scene fields it randomizes (off: canonical)
TEXTURE_FIELDS = ASPECTS["texture"] + ("tex_grid",)


@dataclass(frozen=True)
class Config:
    """Uniform visual DR (Tobin et al. 2017) against canonical-style training."""

    image_size: int = 224
    """side of the square renders, pixels ([1] [M]: 224)"""
    max_distractors: int = 10
    """K: at most this many distractors per scene (uniform in 0..K)"""
    batch_size: int = 64
    """renders per update and arm"""
    num_steps: int = 50000
    """updates"""
    lr: float = 1e-4
    """Adam learning rate ([1] [M])"""
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    """conv widths per block (3x3, ReLU; a 2x2 max-pool after each block): VGG-16's"""
    convs_per_block: tuple[int, ...] = (2, 2, 3, 3, 3)
    """conv layers per block: VGG-16's 13"""
    hidden: tuple[int, ...] = (256, 64)
    """fully connected layers before the (x, y) output"""
    random_texture: bool = True
    """randomize the table texture (family, colours, frequency, orientation)"""
    random_colour: bool = True
    """randomize the colours of the target and the distractors"""
    random_distractors: bool = True
    """randomize the distractors (number, shape, size); off: no distractors"""
    random_light: bool = True
    """randomize the light (brightness, shading gradient)"""
    random_camera: bool = True
    """randomize the camera (offset, zoom, rotation)"""
    random_noise: bool = True
    """randomize the pixel noise's std; off: no noise"""
    texture_pool: int = 0
    """0: a fresh texture per render; N > 0: textures drawn from a fixed pool of N"""
    train_scenes: int = 0
    """0: fresh training scenes every update; N > 0: a fixed training set of N scenes"""
    eval_size: int = 512
    """held-out scenes per style in evaluate() (a multiple of batch_size)"""
    shift_conv: bool = False
    """convs as sums of shifted matmuls: same maths, fast weight gradients in lax.scan on CPU"""
    dtype: str = "float32"
    """compute dtype of the convs and dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_steps

    @property
    def steps_per_update(self) -> int:
        return 2 * self.batch_size  # renders per update, both arms

    def validate(self):
        if len(self.channels) != len(self.convs_per_block) or not self.channels:
            raise ValueError(f"channels={self.channels} and convs_per_block="
                             f"{self.convs_per_block} must be non-empty and of equal length")
        if min(self.channels) < 1 or min(self.convs_per_block) < 1 or min(self.hidden,
                                                                          default=1) < 1:
            raise ValueError("channels, convs_per_block and hidden must all be >= 1")
        if self.image_size < 2 ** len(self.channels):
            raise ValueError(f"image_size={self.image_size} must be >= 2^len(channels) = "
                             f"{2 ** len(self.channels)} (one 2x2 pool per block)")
        if self.max_distractors < 0 or self.texture_pool < 0 or self.train_scenes < 0:
            raise ValueError(f"max_distractors={self.max_distractors}, texture_pool="
                             f"{self.texture_pool} and train_scenes={self.train_scenes} must "
                             "be >= 0")
        if self.eval_size < self.batch_size or self.eval_size % self.batch_size:
            raise ValueError(f"eval_size={self.eval_size} must be a positive multiple of "
                             f"batch_size={self.batch_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 24x24 renders, a 3-block CNN, 3 distractors, batch 32, 300 updates with a
    # larger lr (about 7 min for 2 seeds on a loaded 2-core CPU).
    "quick": dict(image_size=24, max_distractors=3, batch_size=32, num_steps=300, lr=1e-3,
                  channels=(16, 32, 32), convs_per_block=(1, 1, 1), hidden=(64,),
                  eval_size=256, shift_conv=True),
    "paper": dict(),
}


# --- SCENES ---


def dr_ranges(cfg: Config) -> sc.Scene:
    """The DR arm's ranges: RANDOM, with the aspects whose flag is off set to CANONICAL."""
    style = dict(sc.RANDOM)
    for aspect, fields in ASPECTS.items():
        if not getattr(cfg, f"random_{aspect}"):
            style.update({f: sc.CANONICAL[f] for f in fields})
    return sc.make_ranges(style, cfg.max_distractors)


def style_ranges(style: dict, cfg: Config) -> sc.Scene:
    return sc.make_ranges(style, cfg.max_distractors)


def sample_batch(key, ranges: sc.Scene, cfg: Config, n: int, train_scenes: int = 0):
    """n fresh scenes from `ranges` (a new draw per image: per-episode resampling) rendered:
    (images (n, S, S, 3), targets (n, 2), scenes). With texture_pool > 0 the texture fields
    come from one of texture_pool fixed draws (keys fold_in(POOL_KEY, i)). With
    train_scenes > 0 (training only) each scene is one of train_scenes fixed ones (keys
    fold_in(DATA_KEY, i), i uniform)."""
    k_scene, k_pool = jax.random.split(key)
    if train_scenes:
        ids = jax.random.randint(k_scene, (n,), 0, train_scenes)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(DATA_KEY), ids)
    else:
        keys = jax.random.split(k_scene, n)
    scenes = jax.vmap(sc.sample_params, (0, None))(keys, ranges)
    if cfg.texture_pool:
        ids = jax.random.randint(k_pool, (n,), 0, cfg.texture_pool)
        pool = jax.vmap(lambda i: sc.sample_params(
            jax.random.fold_in(jax.random.PRNGKey(POOL_KEY), i), ranges))(ids)
        scenes = scenes.replace(**{f: getattr(pool, f) for f in TEXTURE_FIELDS})
    hw = (cfg.image_size, cfg.image_size)
    images, xy, _, _ = jax.vmap(lambda s: sc.render(s, hw))(scenes)
    return images, xy, scenes


# --- NETWORKS ---


class Regressor(nn.Module):
    """Conv blocks (3x3 conv + ReLU, 2x2 max-pool), flatten, dense ReLU layers, (x, y)."""

    channels: tuple[int, ...]
    convs_per_block: tuple[int, ...]
    hidden: tuple[int, ...]
    shift: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = (x - 0.5).astype(self.dtype)
        for ch, n in zip(self.channels, self.convs_per_block, strict=True):
            for _ in range(n):
                x = nn.relu(Conv(ch, 3, shift=self.shift, dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)  # (B, S' * S' * C)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h, dtype=self.dtype)(x))
        return nn.Dense(2, dtype=self.dtype)(x).astype(jnp.float32)  # (B, 2)


def network(cfg: Config) -> Regressor:
    return Regressor(cfg.channels, cfg.convs_per_block, cfg.hidden, cfg.shift_conv,
                     jnp.dtype(cfg.dtype))


# --- LOSS ---


def position_loss(pred, xy):
    """[1] [M]: squared error of the position, mean over the batch; and the mean
    Euclidean error ||pred - xy|| (table units)."""
    d = pred - xy
    return (d ** 2).sum(-1).mean(), jnp.sqrt((d ** 2).sum(-1)).mean()


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # both arms stacked: leaves (2, ...), arm 0 DR, arm 1 canonical
    opt_state: Any
    step: jax.Array
    key: jax.Array


def arm_ranges(cfg: Config) -> sc.Scene:
    """Leaves (2, 2, ...): (arm: DR, canonical) x (low, high)."""
    return jax.tree.map(lambda a, b: jnp.stack([a, b]), dr_ranges(cfg),
                        style_ranges(sc.CANONICAL, cfg))


def init(key, cfg: Config) -> State:
    """Both arms start from the same weights (a paired comparison: only the data differs)."""
    k_net, key = jax.random.split(key)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    params = jax.tree.map(lambda a: jnp.stack([a, a]), network(cfg).init(k_net, x))
    opt_state = jax.vmap(optax.adam(cfg.lr).init)(params)
    return State(params, opt_state, jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    """One Adam step per arm on a fresh batch of each arm's style; both arms draw their
    scenes from the same key (the same target positions and uniforms)."""
    net, tx = network(cfg), optax.adam(cfg.lr)
    key, k_batch = jax.random.split(state.key)

    def arm(params, opt_state, ranges):
        x, xy, _ = sample_batch(k_batch, ranges, cfg, cfg.batch_size, cfg.train_scenes)

        def loss_fn(p):
            return position_loss(net.apply(p, x), xy)

        (loss, err), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, err

    params, opt_state, loss, err = jax.vmap(arm)(state.params, state.opt_state, arm_ranges(cfg))
    metrics = {"losses/mse_dr": loss[0], "losses/mse_canonical": loss[1],
               "charts/train_err_dr": err[0], "charts/train_err_canonical": err[1]}
    return State(params, opt_state, state.step + 1, key), metrics


# --- EVALUATE ---


def predict(params, images, cfg: Config):
    """(N, 2) predictions of one arm, batch_size images at a time."""
    net = network(cfg)
    chunks = images.reshape(-1, cfg.batch_size, *images.shape[1:])  # (N / B, B, S, S, 3)
    return jax.lax.map(lambda x: net.apply(params, x), chunks).reshape(-1, 2)


STYLES = {"real": sc.REAL, "canonical": sc.CANONICAL}


def eval_sets(cfg: Config):
    """The held-out scenes: (images, targets) per style (real, canonical, dr), eval_size
    each, all from PRNGKey(EVAL_KEY) behind a barrier (made in the program, no constants)."""
    key = jax.lax.optimization_barrier(jax.random.PRNGKey(EVAL_KEY))
    ranges = {**{k: style_ranges(v, cfg) for k, v in STYLES.items()}, "dr": dr_ranges(cfg)}
    return {k: sample_batch(key, r, cfg, cfg.eval_size)[:2] for k, r in ranges.items()}


def evaluate(state: State, cfg: Config):
    """Mean Euclidean error (table units) of each arm on each held-out style, and the
    sim-to-real gap (real - in distribution: the DR ranges for DR, canonical for canonical)."""
    out = {}
    for style, (x, xy) in eval_sets(cfg).items():
        for i, arm in enumerate(("dr", "canonical")):
            pred = predict(jax.tree.map(lambda a, i=i: a[i], state.params), x, cfg)
            out[f"eval/{style}_err_{arm}"] = position_loss(pred, xy)[1]
    out["eval/gap_dr"] = out["eval/real_err_dr"] - out["eval/dr_err_dr"]
    out["eval/gap_canonical"] = out["eval/real_err_canonical"] - out["eval/canonical_err_canonical"]
    out["eval/real_ratio"] = out["eval/real_err_dr"] / out["eval/real_err_canonical"]
    return out


# --- PLOT ---


def plot(state: State, cfg: Config, out: str) -> str:
    """Top: training renders (DR, canonical) and real-style scenes; bottom: real-style
    predictions vs truth (x and y) of both arms, seed 0."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    one = jax.tree.map(lambda a: a[0], state)
    sets = jax.jit(lambda: eval_sets(cfg))()
    x, xy = (np.asarray(a) for a in sets["real"])
    preds = [np.asarray(jax.jit(lambda p, x: predict(p, x, cfg))(
        jax.tree.map(lambda a, i=i: a[i], one.params), sets["real"][0])) for i in range(2)]
    shows = [np.asarray(sample_batch(jax.random.PRNGKey(1), r, cfg, 4)[0])
             for r in (dr_ranges(cfg), style_ranges(sc.CANONICAL, cfg))]
    fig = plt.figure(figsize=(10, 6.2))
    tiles = [(shows[0][i], "DR train") for i in range(4)] + [(shows[1][0], "canonical train")] \
        + [(x[i], "real (held out)") for i in range(3)]
    for i, (img, title) in enumerate(tiles):
        ax = fig.add_subplot(3, 8, i + 1)
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    for i, (p, name) in enumerate(zip(preds, ("DR", "canonical only"), strict=True)):
        ax = fig.add_subplot(3, 2, 3 + i, position=[0.08 + 0.48 * i, 0.08, 0.4, 0.55])
        err = np.sqrt(((p - xy) ** 2).sum(-1)).mean()
        ax.scatter(xy[:, 0], p[:, 0], s=4, label="x")
        ax.scatter(xy[:, 1], p[:, 1], s=4, label="y")
        ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
        ax.set(xlim=(-1, 1), ylim=(-1.2, 1.2), xlabel="true position (table units)",
               ylabel="predicted", title=f"{name}: real-style error {err:.3f}")
        ax.legend(fontsize=8)
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG`."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[
                       "eval/real_err_dr", "eval/real_err_canonical", "eval/dr_err_dr",
                       "eval/canonical_err_canonical", "eval/gap_dr", "eval/gap_canonical",
                       "eval/real_ratio", "charts/train_err_dr", "charts/train_err_canonical"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.state, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
