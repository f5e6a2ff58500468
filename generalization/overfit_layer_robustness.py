"""Are all layers created equal? Re-initialisation and re-randomisation robustness of layers.

[1] C. Zhang, S. Bengio, Y. Singer. "Are All Layers Created Equal?" ICML 2019 workshop /
    JMLR 23(67) 2022, arXiv:1902.01996. No code was released with [1]; Lilian Weng's TF1
    re-run (lilianweng/generalization-experiment, layer_equality.py) re-randomises with
    U[0, 1) instead of the initialiser, which this file does not copy.

A network f(x; theta) with layers l = 1..L is trained, and its parameters theta_tau are kept
at checkpoint epochs tau in T = {0, 1, 2, 3, ..., final} (in the state, not on disk).
After training (theta_T = the final weights), for every layer l:
    re-initialisation to tau:  theta^(l) <- theta^(l)_tau, other layers stay theta_T     (1)
    re-randomisation:          theta^(l) <- theta~^(l) ~ P^(l), the initial distribution (2)
    robustness:  test error of the swapped network (and its train error)                  (3)
A layer is "robust" (the workshop version of [1]: "ambient") when re-initialising it to
theta_0 leaves the error near the trained one, "critical" otherwise. The whole
(layer x {re-randomisation, checkpoints}) matrix, with the unswapped network as one more
entry, is one vmapped program: each entry selects its layer and its source by index.
Logged also per epoch: the relative distance ||W^(l)_t - W^(l)_0|| / ||W^(l)_0|| of every
layer's KERNEL W (biases left out). [1] relates robustness to how far a layer moves ("robust
layers barely move": [M], not checked against the paper). Here the distance does not
single out the critical layer: after 500 epochs of the quick preset (2 seeds,
read off the committed PNG) the output kernel moved 0.46, layer 3 0.38, the critical
layer 1 0.30 and layer 2 0.20; layer 1 moves the most only in the first ~250 epochs.

Reproduce (CPU, scikit-learn's digits upsampled bilinearly 8x8 -> 32x32, FCN 3x256, Adam
1e-3, 500 epochs of 7 steps, 2 seeds; --plot draws [1] Fig. 1a):
    python generalization/overfit_layer_robustness.py --preset quick --num-seeds 2 \\
        --plot generalization/overfit_layer_robustness.png
The counter-example the catalogue found, at 8x8 (the quick command + --image-size 8;
measured, 2 seeds):
the first layer is not critical (re-init to theta_0: 0.049 test error against 0.017
trained), layer 2 is the most sensitive (0.181), layer 3 0.083, output 0.024.
Paper setting (GPU; MNIST idx files in --data-dir):
    python generalization/overfit_layer_robustness.py --preset paper --data-dir ~/mnist
[1] Fig. 1a (FCN 3x256, MNIST) [M: read from memory and the post, not checked against the
paper's text]: re-randomising any layer gives ~90% test error (chance); re-initialising
layer 1 to theta_0 gives near-chance error while layers 2, 3 and the output stay at the
trained ~2% error for every checkpoint; layer 1 is robust only to late checkpoints. The
post author's TF re-run (MNIST, epoch 100, accuracy): base 0.955; re-init layer 1 0.463,
2 0.913, 3 0.950, output 0.960; re-rand 0.09-0.11.
Measured (the quick command above: 2 seeds, 2.2-4 min on a loaded 2-core CPU), test
error: trained 0.019 / 0.020; layer 1 re-initialised to epoch 0 / 1 / 3 / 30: 0.217 /
0.053 / 0.053 / 0.018 and 0.385 / 0.290 / 0.088 / 0.019; layers 2, 3 and output <= 0.063
at every checkpoint (0.024-0.058 at epoch 0); re-randomisation 0.85-0.97 for every layer.

Logged each update (= one epoch): losses/train (mean minibatch loss), charts/train_err,
charts/test_err (of the network being trained), charts/dist_L<l> (relative distance of
layer l's kernel from its initial value). `evaluate`: test_err_matrix and train_err_matrix (L, 1 +
T): column 0 re-randomisation, column 1 + i re-initialisation to checkpoint epoch i;
test_err / train_err of the trained network; reinit0_test_err_L<l> and
reinit0_train_err_L<l> (column 1) and rerand_test_err_L<l> (column 0) per layer. Train
errors count against the labels the network trained on (--label-corruption p replaces
each with probability p by a uniform class, once per seed; test labels stay true).
NaN by design: the columns of checkpoint epochs the run has not reached (a --num-updates
below num_epochs; their slots still hold theta_0); nothing else.

Differences from the paper:
- Data: MNIST does not ship offline. The CPU presets use scikit-learn's 1,797 digits
  (1,000 train, 797 test) upsampled to image_size x image_size (bilinear; the catalogue
  used nearest-neighbour x4): the first layer's criticality needs a high-dimensional input
  (on 8x8 the catalogue saw none, nor did we). Pixels in [0, 1], no standardisation
  (MNIST: / 255); --image-size applies to the digits only (MNIST stays 28x28).
- Optimiser: [1]'s training details could not be read here (only the abstract and the
  post); the paper preset's SGD with momentum 0.9, lr 0.01, batch 128, 100 epochs is an
  assumption (the post: 100 epochs). The quick preset uses Adam 1e-3 (the catalogue's
  anchor: with Adam 1e-2 every layer turns critical, so pin the optimiser).
- Initialisation: He normal (truncated, fan-in) kernels, zero biases; re-randomisation
  draws a whole fresh network from the same initialiser with an independent key and takes
  its layer l (biases re-drawn = 0). Checkpoint epochs are [1] Fig. 1's kind (0, 1, 2, 3,
  then a few later ones; exact columns of [1] not checked); the final network is not a
  column (re-initialising to it is the identity).
- --label-corruption (not in [1]; for the package comparison with Zhang et al. 2017:
  is the first layer still critical when the network memorises random labels?).
- Only the FCN of [1] (any depth and widths); not VGG or ResNets.
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

NUM_CLASSES = 10
EVAL_CHUNK = 5000
"""images per forward pass when a whole train / test set is evaluated"""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Layer robustness of [1]. Defaults: [1] Fig. 1a's FCN 3x256 on MNIST for 100 epochs;
    the optimiser (SGD, momentum 0.9, lr 0.01, batch 128) is an assumption (Differences)."""

    dataset: str = "digits"
    """'digits' (scikit-learn's digits, upsampled; in the wheel) or 'mnist' (--data-dir)"""
    data_dir: str = ""
    """folder holding MNIST's idx files (train-images-idx3-ubyte[.gz], ...)"""
    image_size: int = 32
    """side of the digits images (upsampled from 8x8; 8 = the raw digits); ignored by
    dataset='mnist', whose images are always 28x28 (784 inputs)"""
    num_train: int = 1000
    """training images (digits: of the 1,797; mnist: the first of the 60,000)"""
    num_test: int = 797
    """test images (digits: the rest of the 1,797; mnist: the first of the 10,000)"""
    hidden: tuple[int, ...] = (256, 256, 256)
    """hidden widths of the FCN ([1] Fig. 1a: 3x256)"""
    optimizer: str = "sgd"
    """'sgd' (with momentum) or 'adam'"""
    lr: float = 0.01
    """learning rate"""
    momentum: float = 0.9
    """SGD momentum (optimizer='sgd')"""
    batch_size: int = 128
    """images per step"""
    num_epochs: int = 100
    """training epochs; one update of the runner is one epoch (the post: 100)"""
    checkpoint_epochs: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 40, 90)
    """epochs whose parameters theta_tau are kept for re-initialisation (0: theta_0)"""
    label_corruption: float = 0.0
    """probability that each training label is replaced by a class drawn uniformly from
    all 10 (Zhang et al. 2017; 1: random labels), drawn once per seed at init; the test
    labels stay true, train errors count against the corrupted ones"""
    dtype: str = "float32"
    """compute dtype of the dense layers ("bfloat16" on accelerators)"""

    @property
    def input_dim(self) -> int:
        return self.image_size ** 2 if self.dataset == "digits" else 28 * 28

    @property
    def num_layers(self) -> int:
        return len(self.hidden) + 1  # the output layer is a layer of [1]'s figures

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size

    @property
    def num_updates(self) -> int:
        return self.num_epochs

    @property
    def steps_per_update(self) -> int:
        return self.steps_per_epoch

    def validate(self):
        if self.dataset not in ("digits", "mnist"):
            raise ValueError(f"dataset={self.dataset!r} must be 'digits' or 'mnist'")
        if self.dataset == "mnist" and not self.data_dir:
            raise ValueError("dataset='mnist' needs --data-dir (MNIST's idx files)")
        if self.dataset == "digits" and self.num_train + self.num_test > 1797:
            raise ValueError(f"num_train + num_test = {self.num_train + self.num_test} "
                             "exceeds the 1,797 digits")
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size} must be >= 1")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be one or more widths >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        c = self.checkpoint_epochs
        rising = all(a < b for a, b in zip(c[:-1], c[1:], strict=True))
        if not c or c[0] != 0 or not rising or c[-1] >= self.num_epochs:
            raise ValueError(f"checkpoint_epochs={c} must start at 0, increase strictly and "
                             f"stay below num_epochs={self.num_epochs}")
        if not 0 <= self.label_corruption <= 1:
            raise ValueError(f"label_corruption={self.label_corruption} must be in [0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: digits upsampled to 32x32 (1,024-d), FCN 3x256, Adam 1e-3, 500 epochs of 7
    # steps (3,500 steps; the catalogue's anchor used 4,000).
    "quick": dict(optimizer="adam", lr=1e-3, num_epochs=500,
                  checkpoint_epochs=(0, 1, 2, 3, 10, 30, 100, 300)),
    # [1] Fig. 1a: MNIST 60K / 10K, FCN 3x256, 100 epochs (optimiser assumed: see above).
    "paper": dict(dataset="mnist", num_train=60000, num_test=10000),
}


# --- DATA ---


@functools.cache
def arrays(dataset: str, data_dir: str, image_size: int, num_train: int, num_test: int):
    """(train_x (N, D) float32 in [0, 1], train_y int32, test_x, test_y), numpy, cached."""
    if dataset == "digits":
        tr_x, tr_y, te_x, te_y = data.digit_images(image_size, num_train)
    else:
        tr_x, tr_y, te_x, te_y = data.load_mnist(data_dir)
        tr_x, te_x = tr_x / np.float32(255), te_x / np.float32(255)
    if num_train > len(tr_y) or num_test > len(te_y):
        raise ValueError(f"num_train={num_train} / num_test={num_test} exceed the "
                         f"{len(tr_y)} / {len(te_y)} {dataset} images")
    flat = lambda x, n: x[:n].reshape(n, -1).astype(np.float32)  # noqa: E731
    return (flat(tr_x, num_train), tr_y[:num_train].astype(np.int32), flat(te_x, num_test),
            te_y[:num_test].astype(np.int32))


def dataset(cfg: Config):
    """The cached arrays as jnp behind an optimisation barrier (no constant folding)."""
    return jax.lax.optimization_barrier(tuple(jnp.asarray(a) for a in arrays(
        cfg.dataset, cfg.data_dir, cfg.image_size, cfg.num_train, cfg.num_test)))


def corrupt_labels(key, y, p):
    """Each label replaced, with probability p, by a class drawn uniformly from all
    NUM_CLASSES (so it may stay right by chance; Zhang et al. 2017 Sec. 2)."""
    u_mask, u_class = jax.random.uniform(key, (2, *y.shape))
    new = jnp.minimum(jnp.floor(u_class * NUM_CLASSES), NUM_CLASSES - 1).astype(y.dtype)
    return jnp.where(u_mask < p, new, y)


def train_labels(key, cfg: Config):
    """(n,) the training labels of one seed, fixed at init: the true ones, corrupted with
    probability label_corruption."""
    return corrupt_labels(key, dataset(cfg)[1], cfg.label_corruption).astype(jnp.int32)


# --- NETWORK ---


class FCN(nn.Module):
    """[1]'s FCN: ReLU hidden layers, linear output; He-normal kernels, zero biases."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.he_normal()
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=init, dtype=self.dtype)(x))
        return nn.Dense(NUM_CLASSES, kernel_init=init, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> FCN:
    return FCN(cfg.hidden, jnp.dtype(cfg.dtype))


def layer_names(cfg: Config) -> list[str]:
    return [f"Dense_{i}" for i in range(cfg.num_layers)]


def draw_params(key, cfg: Config):
    """A network drawn from the initial distribution P (theta_0, or theta~ for Eq. 2)."""
    return network(cfg).init(key, jnp.zeros((1, cfg.input_dim)))["params"]


def error_rate(params, x, y, cfg: Config):
    """Classification error of `params` on (x, y), EVAL_CHUNK images per forward pass."""
    n = x.shape[0]
    chunks = -(-n // EVAL_CHUNK)
    pad = chunks * EVAL_CHUNK - n if chunks > 1 else 0
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(chunks, -1, x.shape[1])  # (chunks, C, D)
    ys = jnp.pad(y, (0, pad), constant_values=-1).reshape(chunks, -1)
    wrong = jax.lax.map(lambda a: jnp.argmax(network(cfg).apply(
        {"params": params}, a[0]), -1) != a[1], (xs, ys))
    return jnp.sum(wrong & (ys >= 0)) / n


# --- ROBUSTNESS ---


def swap_layer(params, sources, layer, source):
    """Eq. (1) / (2): `params` with layer `layer` (an index; -1 swaps nothing) replaced by
    that layer of `sources[source]` (sources: the params tree with a leading axis of
    candidate values). Every other layer stays exactly as trained."""
    names = sorted(params, key=lambda n: int(n.rsplit("_", 1)[1]))  # Dense_0, Dense_1, ...
    return {n: jax.tree.map(lambda p, s: jnp.where(layer == i, s[source], p), params[n],
                            sources[n]) for i, n in enumerate(names)}


def robustness(params, ckpts, rerand_key, tr_y, cfg: Config):
    """Eq. (3) for every (layer, source) at once: sources = [theta~ (a fresh draw), theta_tau
    for every checkpoint tau]; returns (test_err, train_err), each (L + 1, 1 + T) with row 0
    the unswapped network (all its columns equal) and row 1 + l layer l. tr_y: the
    training labels the network was trained on."""
    tr_x, _, te_x, te_y = dataset(cfg)
    fresh = draw_params(rerand_key, cfg)
    sources = jax.tree.map(lambda f, c: jnp.concatenate([f[None], c]), fresh, ckpts)
    n_src = 1 + len(cfg.checkpoint_epochs)
    layer, source = jnp.meshgrid(jnp.arange(-1, cfg.num_layers), jnp.arange(n_src),
                                 indexing="ij")  # (L + 1, 1 + T) each

    def one(l, s):
        p = swap_layer(params, sources, l, s)
        return error_rate(p, te_x, te_y, cfg), error_rate(p, tr_x, tr_y, cfg)

    test, train = jax.vmap(one)(layer.ravel(), source.ravel())
    return test.reshape(layer.shape), train.reshape(layer.shape)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    ckpts: Any  # params tree, leading axis: checkpoint_epochs (theta_tau)
    epoch: jax.Array
    key: jax.Array
    rerand_key: jax.Array  # the draw theta~ of Eq. (2), independent of theta_0
    train_y: jax.Array  # (n,) training labels (corrupted with prob. label_corruption)


def optimizer(cfg: Config):
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr)
    return optax.sgd(cfg.lr, momentum=cfg.momentum)


def init(key, cfg: Config) -> State:
    k_init, k_rerand, key = jax.random.split(key, 3)
    params = draw_params(k_init, cfg)
    ckpts = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(cfg.checkpoint_epochs),
                                                        *p.shape)), params)  # theta_0 first
    y = train_labels(jax.random.fold_in(key, 1), cfg)  # fold_in: the other draws unchanged
    return State(params, optimizer(cfg).init(params), ckpts, jnp.zeros((), jnp.int32), key,
                 k_rerand, y)


# --- UPDATE ---


def loss_fn(params, x, y, cfg: Config):
    logits = network(cfg).apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def save_checkpoint(ckpts, params, epoch, cfg: Config):
    """Write params into the slot of `epoch` among checkpoint_epochs (if it is one)."""
    hit = jnp.asarray(cfg.checkpoint_epochs) == epoch  # (T,)
    return jax.tree.map(lambda c, p: jnp.where(hit.reshape(-1, *[1] * p.ndim), p[None], c),
                        ckpts, params)


def update(state: State, cfg: Config):
    """One epoch of minibatch training in a fresh random order (last partial batch
    dropped), then theta_epoch kept if the epoch is a checkpoint."""
    tr_x, _, te_x, te_y = dataset(cfg)
    tr_y = state.train_y
    tx = optimizer(cfg)
    key, k_order = jax.random.split(state.key)
    b, steps = cfg.batch_size, cfg.steps_per_epoch
    order = jax.random.permutation(k_order, cfg.num_train)[:steps * b].reshape(steps, b)

    def step(carry, idx):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, tr_x[idx], tr_y[idx], cfg)
        upd, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, upd), opt_state), loss

    (params, opt_state), loss = jax.lax.scan(step, (state.params, state.opt_state), order)
    epoch = state.epoch + 1
    ckpts = save_checkpoint(state.ckpts, params, epoch, cfg)
    metrics = {"losses/train": loss.mean(),
               "charts/train_err": error_rate(params, tr_x, tr_y, cfg),
               "charts/test_err": error_rate(params, te_x, te_y, cfg)}
    theta0 = jax.tree.map(lambda c: c[0], ckpts)
    for i, n in enumerate(layer_names(cfg)):
        d = jnp.linalg.norm(params[n]["kernel"] - theta0[n]["kernel"])
        metrics[f"charts/dist_L{i}"] = d / jnp.linalg.norm(theta0[n]["kernel"])
    return State(params, opt_state, ckpts, epoch, key, state.rerand_key, tr_y), metrics


def evaluate(state: State, cfg: Config):
    """The robustness matrices of [1] Fig. 1 (rows: layers; column 0 re-randomisation,
    then re-initialisation to each checkpoint), the trained network's errors, and each
    layer's re-initialisation-to-theta_0 test error."""
    test, train = robustness(state.params, state.ckpts, state.rerand_key, state.train_y, cfg)
    # checkpoint epochs the run has not reached (--num-updates < num_epochs) hold theta_0
    reached = jnp.concatenate([jnp.ones(1, bool),
                               jnp.asarray(cfg.checkpoint_epochs) <= state.epoch])
    test, train = (jnp.where(reached, m, jnp.nan) for m in (test, train))
    out = {"test_err_matrix": test[1:], "train_err_matrix": train[1:],
           "test_err": test[0, 0], "train_err": train[0, 0]}
    for i in range(cfg.num_layers):
        out[f"reinit0_test_err_L{i}"] = test[1 + i, 1]
        out[f"reinit0_train_err_L{i}"] = train[1 + i, 1]
        out[f"rerand_test_err_L{i}"] = test[1 + i, 0]
    return out


# --- PLOT ---


def plot(result, cfg: Config, out: str):
    """[1] Fig. 1a: the test-error matrix (mean over seeds) as a heat map, rows the layers,
    column 'rnd' re-randomisation, then re-initialisation to each checkpoint epoch; and the
    per-layer distance from initialisation over training ([1] Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(result.final["test_err_matrix"]).mean(0)  # (L, 1 + T)
    base = float(np.mean(result.final["test_err"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.6 * cfg.num_layers + 3),
                             gridspec_kw=dict(width_ratios=(3, 2)))
    im = axes[0].imshow(m, cmap="viridis_r", vmin=0, vmax=1, aspect="auto")
    for (r, c), v in np.ndenumerate(m):
        axes[0].text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                     color="white" if v > 0.5 else "black")
    axes[0].set_xticks(range(m.shape[1]), ["rnd", *map(str, cfg.checkpoint_epochs)])
    names = [f"layer {i + 1}" for i in range(cfg.num_layers - 1)] + ["output"]
    axes[0].set_yticks(range(cfg.num_layers), names)
    axes[0].set(xlabel="re-randomised | re-initialised to epoch", title="test error after "
                f"resetting one layer (trained: {base:.3f})")
    fig.colorbar(im, ax=axes[0], fraction=0.04)
    h = result.history
    for i, n in enumerate(names):
        d = h[f"charts/dist_L{i}"]
        axes[1].plot(np.arange(1, d.shape[1] + 1), d.mean(0), label=n, c=f"C{i}",
                     ls=("-", "--", "-.", ":")[i % 4])
    axes[1].set(xlabel="epoch", ylabel="||theta_t - theta_0|| / ||theta_0||", xscale="log",
                title="distance from initialisation (kernels)")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"{cfg.dataset} {cfg.input_dim}-d, FCN {'x'.join(map(str, cfg.hidden))}, "
                 f"{cfg.optimizer} {cfg.lr}, {cfg.num_epochs} epochs, "
                 f"{h['charts/test_err'].shape[0]} seed(s)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    doc = __doc__ + "\n`--plot PNG` (an extra flag) draws [1] Fig. 1a from the run."
    cfg, _ = run.parse(Config, PRESETS, argv, description=doc)
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=doc, summary_keys=["test_err", "train_err"] + [
                       f"{k}_L{i}" for k in ("reinit0_test_err", "rerand_test_err")
                       for i in range(cfg.num_layers)])
    if flags["--plot"] is not None:
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
