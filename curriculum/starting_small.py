"""Curriculum learning, "starting small": train on an easy distribution first, then switch
to the target distribution; Bengio et al.'s two-stage shape curriculum.

[1] J. L. Elman. "Learning and development in neural networks: The importance of starting
    small." Cognition 48(1):71-99, 1993.
[2] Y. Bengio, J. Louradour, R. Collobert, J. Weston. "Curriculum Learning." ICML 2009 (no
    arXiv id). Sec. 4: convex toy experiments; Sec. 5: shape recognition.

Shape recognition ([2] Sec. 5): classify 32x32 grey images into 3 classes (rectangle,
ellipse, triangle). BasicShapes holds only squares, circles and equilateral triangles;
GeomShapes holds general rectangles, ellipses and triangles. Both vary position, size,
orientation and the grey levels of shape and background. A two-stage curriculum trains on
BasicShapes for the first `s` epochs (the switch epoch) and on GeomShapes afterwards; the
error is measured on GeomShapes test images only; s = 0 is training without curriculum:

    D_e = BasicShapes if e < s else GeomShapes           stage of epoch e for switch s
    theta <- theta - lr grad_theta CE(f_theta(x), y),  (x, y) ~ D_e     plain SGD
    CE(z, y) = -log softmax(z)_y                          cross-entropy of the logits z
    test error(s) = mean_{(x, y) in GeomShapes test} [argmax f_theta(x) != y]

Every switch epoch of `switch_epochs` is one arm; all arms start from the same initial
weights and read the same minibatch order (a paired comparison, as one vmapped program), so
[2] Fig. 3's sweep of test error against switch epoch is one run per seed.

The convex toy ("cleaner examples first", [2] Sec. 4 and the post): `--task gaussians` is
logistic regression (`--hidden-sizes` empty) on 2 Gaussian classes x ~ N(+-mu, I) in
`gauss_dim` dimensions. The target training set has a fraction `gauss_noise_prob` of its
labels flipped; the easy set holds noise-free examples at a margin |x . mu/|mu|| >=
`gauss_margin` from the Bayes boundary; the test labels are the true classes.

Reproduce (CPU, the figure curriculum/starting_small.png):
    python curriculum/starting_small.py --preset quick --num-seeds 2 \
        --plot curriculum/starting_small.png
GPU ([2]'s sizes [M]: 10,000 training and 5,000 test images, 256 epochs, 8 switches):
    python curriculum/starting_small.py --preset paper --num-seeds 20

Measured (`quick`: 16x16 images, 5,000 per set, 3 x 128 tanh MLP, lr 0.03, batch 32, 60
epochs, switch epochs 0/10/20/30/45 as arms of one program, 2 seeds; loaded 2-core CPU,
10 s compile + 38 s): GeomShapes test error after 60 epochs, per seed
    switch  0 (no curriculum)  0.412 0.472   (mean of the last 10 epochs 0.419 0.416)
    switch 10                  0.398 0.458                               0.408 0.412
    switch 20                  0.390 0.446                               0.402 0.405
    switch 30                  0.383 0.439                               0.396 0.400
    switch 45                  0.378 0.437                               0.393 0.398
In both seeds the error falls with every later switch ([2]'s direction), by 0.035 at the
end and 0.02 over the last 10 epochs; the test error moves by about 0.03 from epoch to
epoch, the same for all arms (they share the minibatch order). A 3-class MLP on raw pixels
with random contrast learns slowly: 0.35 training error after 60 epochs.

[2] reports (Fig. 3, box plots over 20 initialisations) lower GeomShapes test error for
switch epochs > 0 than for no curriculum, lowest when switching at epoch 128 of 256 [M: from
memory; the paper's text was not reachable here, its values were not read]. The sizes of
the paper preset (10,000 / 5,000 images, 256 epochs, the 8 switch epochs) are [M] too.

Differences from the paper:
- The shape renderer is ours (hard-edged masks in numpy, drawn once at init): [2]'s exact
  ranges of size, position, aspect and grey level are not known here [M], and both sets
  here vary pose and grey level so that only the shapes' variability differs.
- Network [M]: an MLP with 3 tanh hidden layers, Glorot-uniform weights, plain SGD; [2]
  chose the widths and the learning rate by validation; the widths (500), lr (0.1) and batch
  size (32) are ours. No validation set and no early stopping: the error after every epoch
  is logged, the final one reported.
- The convex toy is the catalogue's design, not a copy of [2] Sec. 4 (which orders examples
  by margin or by the number of irrelevant inputs [M]); its easy set is noise-free and far
  from the boundary, and it shows only speed: after the switch the arms converge to the
  same noisy-label optimum. Most of its gain is the clean labels (test error 0.41 -> 0.27
  after 6 epochs in the test); easier examples (margin >= 1 rather than a clean set at
  margin 0) add 0.02 of mean error over the 6 epochs.
- The training sets are fixed (num_train images per set, data_seed); minibatches are drawn
  without replacement within an epoch, the same order for every arm. The sets travel in the
  state (an input of the compiled chunks, not a constant baked into each): one copy per
  seed, 102 MB per seed at the paper's sizes (2 GB for 20 seeds), in checkpoints too.
"""

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run

# --- CONFIG ---

TASKS = ("shapes", "gaussians")
CLASSES = ("rectangle", "ellipse", "triangle")


@dataclass(frozen=True)
class Config:
    """Starting small; defaults are [2] Sec. 5's shape experiment ([M] where marked)."""

    task: str = "shapes"
    """'shapes': BasicShapes -> GeomShapes ([2] Sec. 5); 'gaussians': the convex toy"""
    image_size: int = 32
    """side of the square grey images ([2]: 32)"""
    num_train: int = 10000
    """training examples in each stage's set ([2]: 10,000)"""
    num_test: int = 5000
    """test examples of the target distribution ([2]: 5,000)"""
    switch_epochs: tuple[int, ...] = (0, 2, 4, 8, 16, 32, 64, 128)
    """epochs trained on the easy set before the switch, one arm each (0: no curriculum)"""
    num_epochs: int = 256
    """training epochs in all ([2]: 256)"""
    batch_size: int = 32
    """examples per SGD step [M: [2] trains by stochastic gradient descent]"""
    lr: float = 0.1
    """SGD learning rate [M: [2] chose it by validation]"""
    hidden_sizes: tuple[int, ...] = (500, 500, 500)
    """widths of the tanh hidden layers ([2]: 3 hidden layers; widths [M]); empty: linear"""
    data_seed: int = 0
    """seed of the data sets (fixed across training seeds)"""
    gauss_dim: int = 50
    """dimension of the convex toy's inputs"""
    gauss_separation: float = 1.0
    """|mu|: distance of each class mean from the origin (toy)"""
    gauss_noise_prob: float = 0.3
    """fraction of flipped labels in the toy's target training set"""
    gauss_margin: float = 1.0
    """the toy's easy set: noise-free examples with |x . mu/|mu|| >= this"""
    dtype: str = "float32"
    """compute dtype of the matmuls ('bfloat16' on accelerators)"""

    @property
    def num_arms(self) -> int:
        return len(self.switch_epochs)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size

    @property
    def num_updates(self) -> int:
        return self.num_epochs  # one update = one epoch of every arm

    @property
    def steps_per_update(self) -> int:
        return self.steps_per_epoch * self.batch_size * self.num_arms

    def validate(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        s = self.switch_epochs
        if not s or len(set(s)) < len(s) or min(s) < 0 or max(s) > self.num_epochs:
            raise ValueError(
                f"switch_epochs={s} must be distinct and in [0, num_epochs={self.num_epochs}]"
            )
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} must be >= 8")
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes={self.hidden_sizes} must all be >= 1")
        if self.gauss_noise_prob >= 0.5:
            raise ValueError(f"gauss_noise_prob={self.gauss_noise_prob} must be < 0.5")
        if self.gauss_margin < 0 or self.gauss_separation <= 0:
            raise ValueError(
                f"gauss_margin={self.gauss_margin} must be >= 0 and "
                f"gauss_separation={self.gauss_separation} > 0"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: 16x16 shapes, 5,000 per set, a 3 x 128 MLP, lr 0.03, 60 epochs, 5 switches.
    "quick": dict(
        image_size=16,
        num_train=5000,
        num_test=2000,
        num_epochs=60,
        lr=0.03,
        switch_epochs=(0, 10, 20, 30, 45),
        hidden_sizes=(128, 128, 128),
    ),
    "paper": dict(),
}


# --- DATA ---


def _grey_levels(rng, n):
    """Shape and background grey levels in [0, 1], at least 0.3 apart."""
    d = rng.uniform(0.3, 0.8, n)
    bg = rng.uniform(0, 1 - d)
    fg = bg + d
    swap = rng.random(n) < 0.5
    return np.where(swap, bg, fg), np.where(swap, fg, bg)


def triangle_vertices(rng, n, basic: bool):
    """(n, 3, 2) vertices around the origin: equilateral (basic; angles 2 pi k / 3 apart,
    unit circumradius) or general (each angle moved by up to pi/6, radii in [0.55, 1])."""
    theta = rng.uniform(0, 2 * np.pi, (n, 1)) + 2 * np.pi * np.arange(3) / 3
    radius = np.ones((n, 3))
    if not basic:
        theta = theta + rng.uniform(-np.pi / 6, np.pi / 6, (n, 3))
        radius = rng.uniform(0.55, 1.0, (n, 3))
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], -1)


def render(cls, centre, size, aspect, angle, tri, fg, bg, image_size: int):
    """Rasterise n shapes on image_size^2 pixels (pixel centres in [0, 1]^2): class 0 a
    rectangle of half-sides (size, aspect * size), 1 an ellipse of semi-axes (size, aspect *
    size), both rotated by `angle`; 2 the triangle `tri` (unit vertices) scaled by size.
    Returns (n, image_size^2) float32."""
    c = (np.arange(image_size) + 0.5) / image_size
    px, py = np.meshgrid(c, c, indexing="xy")  # (H, W)
    dx = px[None] - centre[:, 0, None, None]  # (n, H, W)
    dy = py[None] - centre[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # pixel in the shape's frame
    a, b = size[:, None, None], (aspect * size)[:, None, None]
    rect = (np.abs(u) <= a) & (np.abs(v) <= b)
    ellipse = (u / a) ** 2 + (v / b) ** 2 <= 1
    t = tri * size[:, None, None]  # (n, 3, 2)
    sides = []
    for k in range(3):  # the sign of the cross product with each edge
        p, q = t[:, k], t[:, (k + 1) % 3]
        sides.append(
            (q[:, 0, None, None] - p[:, 0, None, None]) * (dy - p[:, 1, None, None])
            - (q[:, 1, None, None] - p[:, 1, None, None]) * (dx - p[:, 0, None, None])
        )
    sides = np.stack(sides)
    triangle = (sides >= 0).all(0) | (sides <= 0).all(0)
    inside = np.where(
        cls[:, None, None] == 0, rect, np.where(cls[:, None, None] == 1, ellipse, triangle)
    )
    img = np.where(inside, fg[:, None, None], bg[:, None, None])
    return img.reshape(len(cls), -1).astype(np.float32)


def shapes(rng, n, image_size: int, basic: bool):
    """BasicShapes (squares, circles, equilateral triangles) or GeomShapes (rectangles and
    ellipses of aspect in [0.35, 1], general triangles); position, size (half-extent in
    [0.15, 0.35] of the image), orientation and grey levels vary in both. (x, y)."""
    cls = rng.integers(0, 3, n)
    size = rng.uniform(0.15, 0.35, n)
    centre = rng.uniform(size[:, None], 1 - size[:, None], (n, 2))
    aspect = np.ones(n) if basic else rng.uniform(0.35, 1.0, n)
    angle = rng.uniform(0, np.pi, n)
    fg, bg = _grey_levels(rng, n)
    tri = triangle_vertices(rng, n, basic)
    chunks = [
        render(
            cls[i : i + 1024],
            centre[i : i + 1024],
            size[i : i + 1024],
            aspect[i : i + 1024],
            angle[i : i + 1024],
            tri[i : i + 1024],
            fg[i : i + 1024],
            bg[i : i + 1024],
            image_size,
        )
        for i in range(0, n, 1024)
    ]  # bounded memory
    return np.concatenate(chunks), cls


def gaussians(rng, n, cfg: Config, noise_prob: float, min_margin: float):
    """The convex toy: y ~ U{0, 1}, x ~ N((2y - 1) mu, I), mu = separation * 1/sqrt(d);
    labels flipped with probability noise_prob; only |x . mu/|mu|| >= min_margin kept."""
    xs, ys = [], []
    mu = np.full(cfg.gauss_dim, cfg.gauss_separation / np.sqrt(cfg.gauss_dim))
    while sum(len(y) for y in ys) < n:
        y = rng.integers(0, 2, 4 * n)
        x = (2 * y[:, None] - 1) * mu + rng.standard_normal((4 * n, cfg.gauss_dim))
        keep = np.abs(x @ mu / cfg.gauss_separation) >= min_margin
        flip = rng.random(4 * n) < noise_prob
        xs.append(x[keep])
        ys.append(np.where(flip, 1 - y, y)[keep])
    return (np.concatenate(xs)[:n].astype(np.float32), np.concatenate(ys)[:n])


@functools.cache
def datasets(cfg: Config):
    """(train_x (2, N, D), train_y (2, N), test_x (M, D), test_y (M,)) as numpy: stage 0 is
    the easy set, stage 1 the target set; the test set is drawn from the target."""
    rng = np.random.default_rng(cfg.data_seed)
    if cfg.task == "shapes":
        easy = shapes(rng, cfg.num_train, cfg.image_size, basic=True)
        target = shapes(rng, cfg.num_train, cfg.image_size, basic=False)
        test = shapes(rng, cfg.num_test, cfg.image_size, basic=False)
    else:
        easy = gaussians(rng, cfg.num_train, cfg, 0.0, cfg.gauss_margin)
        target = gaussians(rng, cfg.num_train, cfg, cfg.gauss_noise_prob, 0.0)
        test = gaussians(rng, cfg.num_test, cfg, 0.0, 0.0)
    return (
        np.stack([easy[0], target[0]]),
        np.stack([easy[1], target[1]]).astype(np.int32),
        test[0],
        test[1].astype(np.int32),
    )


def num_classes(cfg: Config) -> int:
    return len(CLASSES) if cfg.task == "shapes" else 2


# --- NETWORKS ---


class MLP(nn.Module):
    """tanh hidden layers, Glorot-uniform weights, zero biases; logits."""

    hidden_sizes: tuple[int, ...]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for h in self.hidden_sizes:
            x = jnp.tanh(nn.Dense(h, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> MLP:
    return MLP(cfg.hidden_sizes, num_classes(cfg), jnp.dtype(cfg.dtype))


# --- LOSS ---


def stage(epoch, switch_epochs):
    """D_e per arm: 0 (the easy set) while epoch < switch, 1 (the target set) from it on."""
    return (epoch >= jnp.asarray(switch_epochs)).astype(jnp.int32)


def cross_entropy(logits, y):
    """CE(z, y) = -log softmax(z)_y, mean over the batch; and the error rate."""
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(logp, y[:, None], 1)[:, 0].mean()
    return ce, jnp.mean(jnp.argmax(logits, -1) != y)


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # every leaf leads with the arm axis (num_arms, ...)
    epoch: jax.Array
    key: jax.Array
    data: tuple  # datasets(cfg) on the device: an input of the compiled chunks, no constant


def init(key, cfg: Config) -> State:
    """One initialisation, copied to every arm (the arms differ only in the switch)."""
    k_net, key = jax.random.split(key)
    dim = datasets(cfg)[0].shape[-1]
    params = network(cfg).init(k_net, jnp.zeros((1, dim)))["params"]
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (cfg.num_arms, *p.shape)), params)
    data = tuple(jnp.asarray(a) for a in datasets(cfg))
    return State(params, jnp.zeros((), jnp.int32), key, data)


# --- UPDATE ---


def heldout_error(params, data, cfg: Config):
    """Test error of every arm on the target distribution, (num_arms,)."""
    _, _, test_x, test_y = data
    logits = jax.vmap(lambda p: network(cfg).apply({"params": p}, test_x))(params)
    return jax.vmap(lambda z: cross_entropy(z, test_y)[1])(logits)


def update(state: State, cfg: Config):
    """One epoch of every arm: steps_per_epoch SGD steps on its stage's set, one minibatch
    order shared by the arms; then the test error of each."""
    net = network(cfg)
    train_x, train_y, _, _ = state.data
    key, k_perm = jax.random.split(state.key)
    n = cfg.steps_per_epoch * cfg.batch_size
    order = jax.random.permutation(k_perm, cfg.num_train)[:n].reshape(-1, cfg.batch_size)
    st = stage(state.epoch, cfg.switch_epochs)  # (A,)

    def arm_step(params, s, idx):
        x, y = train_x[s, idx], train_y[s, idx]  # (B, D), (B,)
        (ce, err), g = jax.value_and_grad(
            lambda p: cross_entropy(net.apply({"params": p}, x), y), has_aux=True
        )(params)
        params = jax.tree.map(lambda p, gi: p - cfg.lr * gi, params, g)  # SGD
        return params, (ce, err)

    def step(params, idx):
        return jax.vmap(arm_step, (0, 0, None))(params, st, idx)

    params, (ce, err) = jax.lax.scan(step, state.params, order)  # (steps, A)
    test = heldout_error(params, state.data, cfg)
    metrics = {}
    for a, s in enumerate(cfg.switch_epochs):
        metrics[f"losses/train_ce_s{s}"] = ce[:, a].mean()
        metrics[f"charts/train_error_s{s}"] = err[:, a].mean()
        metrics[f"charts/test_error_s{s}"] = test[a]
    return state.replace(params=params, epoch=state.epoch + 1, key=key), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """Final test error on the target distribution per switch epoch, and the best switch's
    gain over no curriculum (error at switch 0 minus the lowest error of a switch > 0)."""
    test = heldout_error(state.params, state.data, cfg)
    out = {f"test_error_s{s}": test[a] for a, s in enumerate(cfg.switch_epochs)}
    later = [a for a, s in enumerate(cfg.switch_epochs) if s > 0]
    if 0 in cfg.switch_epochs and later:
        out["gain_best_switch"] = test[cfg.switch_epochs.index(0)] - test[jnp.array(later)].min()
    return out


# --- PLOT ---


def plot_switch(run_dir, out):
    """Test error against epochs per switch epoch (left) and the final test error against
    the switch epoch, per seed and mean (right): [2] Fig. 3's view."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    switches = c["switch_epochs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(switches)))
    finals = []
    for s, col in zip(switches, colors, strict=True):
        _, y, _ = plot.curve(rows, f"charts/test_error_s{s}")
        epochs = np.arange(1, len(y) + 1)
        axes[0].plot(epochs, y.mean(1), color=col, label=f"switch {s}")
        if s > 0:
            axes[0].axvline(s, color=col, lw=0.6, ls=":")
        finals.append(y[-1])
    finals = np.array(finals)  # (switches, seeds)
    for j in range(finals.shape[1]):
        axes[1].plot(switches, finals[:, j], "o", color="grey", alpha=0.6)
    axes[1].plot(switches, finals.mean(1), "k-", label="mean over seeds")
    axes[0].set(
        xlabel="epoch",
        ylabel="GeomShapes test error" if c["task"] == "shapes" else "test error",
        title="test error during training",
    )
    axes[1].set(
        xlabel="switch epoch (0 = no curriculum)",
        ylabel="final test error",
        title=f"after {c['num_epochs']} epochs, {finals.shape[1]} seed(s)",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws test error against switch epoch."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv, doc=__doc__)
    if flags["--plot"] is not None:
        print(plot_switch(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
