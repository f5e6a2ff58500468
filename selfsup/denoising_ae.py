"""Denoising autoencoders: features that survive the destruction of part of the input.

[1] P. Vincent, H. Larochelle, Y. Bengio, P.-A. Manzagol. "Extracting and Composing Robust
    Features with Denoising Autoencoders." ICML 2008 (no arXiv version). No code was
    released with [1]; the same lab's tutorials (lisa-lab/DeepLearningTutorials, commit
    11c4651: code/dA.py, code/SdA.py) give the initialisation and the SdA defaults used
    here. Items marked [M] are from memory of [1] and were not re-checked against the PDF.

An autoencoder with sigmoid units maps an input x in [0, 1]^d to a code and back:

    y = f_theta(x) = s(W x + b)                  encoder                    [1] Sec. 2.2
    z = g_theta'(y) = s(W' y + b'),  W' = W^T    decoder, tied weights      [1] Sec. 2.2
    L_H(x, z) = -sum_k [x_k log z_k + (1 - x_k) log(1 - z_k)]              [1] Eq. 2 [M]

The denoising autoencoder first destroys part of x with the masking corruption q_D: "for
each input x, a fixed number nu d of components are chosen at random, and their value is
forced to 0, while the others are left untouched" ([1] Sec. 2.3), and is trained to
reconstruct the CLEAN x from the corrupted x~:

    x~ ~ q_D(x~ | x)
    theta*, theta'* = argmin E_{q0(X, X~)} [ L_H(X, g_theta'(f_theta(X~))) ]  [1] Eq. 3 [M]

With nu = 0 it is the ordinary (basic) autoencoder of [1] Sec. 2.2. Stacking ([1] Sec. 2.4):
the first layer is trained as a DAE on x; its encoder, applied to UNCORRUPTED inputs, gives
the input of the second DAE, which is trained next, and so on (corruption is used only to
train each layer; the layers below are frozen). [1] then fine-tunes the stack with a
logistic-regression output on the labels (SdA-3, three hidden layers). Here the stack is
evaluated frozen, as in the other selfsup/ files: linear and k-NN probes (common/probe.py) on
the top code of clean held-out digits, with all labels and with 10 per class, beside the
same stack at random init; and denoising on held-out digits: the mean squared error of the
first layer's reconstruction z of a corrupted x~ against the clean x, beside "output the
corrupted input" (x~ itself) and beside an ordinary autoencoder (`--corruption-fraction 0`).

Reproduce (CPU demo on scikit-learn's 8x8 digits, two layers of 256 units):
    python selfsup/denoising_ae.py --preset quick --plot selfsup/denoising_ae.png
    python selfsup/denoising_ae.py --preset quick --corruption-fraction 0   # ordinary AE
Measured (1 seed, 2 x 1860 steps, 61 s wall / 15 CPU-s on a loaded 2-core CPU): held-out
denoising with 25% of the pixels masked, per-pixel MSE 0.0244 against the clean digits; the
corrupted input itself 0.0588, the ordinary autoencoder (nu = 0) 0.0537, the stack at init
0.273. Probes of the top code: linear 0.976 (all labels) / 0.882 (10 per class), k-NN
0.945 / 0.856; the same stack at random init 0.971 / 0.872, 0.954 / 0.822; the ordinary
autoencoder 0.972 / 0.897, 0.962 / 0.865. On 8x8 digits the denoising criterion makes a
much better denoiser, but not better features for these probes than the ordinary one.
[1]'s architecture with the lab's SdA tutorial values (GPU; digits upsampled to 28x28 in
place of MNIST, three layers of 1000 sigmoid units; SGD on single examples at 0.001 and 15
epochs per layer are SdA.py's, where [1] picks them on a validation set):
    python selfsup/denoising_ae.py --preset paper
[1] Table 1 [M] (test error after supervised fine-tuning, SdA-3 with the nu chosen on the
validation set from {0, 10%, 25%, 40%}; SAA-3 is the same stack of ordinary autoencoders):
MNIST-basic 2.80 (nu 10%; SAA-3 3.46, DBN-3 3.11), rot 10.29, bg-rand 10.38, bg-img 16.68,
rot-bg-img 44.49, rect 1.99, rect-img 21.59, convex 19.06.

Differences from the paper:
- Data: MNIST and its variations do not ship offline; the images are scikit-learn's 1,797
  digits (1,000 for training, 797 held out), grey levels 0..16 scaled to [0, 1] (not binary;
  L_H is the cross-entropy of [1] for x in [0, 1]) and, in the paper preset, upsampled
  bilinearly from 8x8 to 28x28.
- No supervised fine-tuning: the stack is probed frozen (logistic regression and k-NN on the
  top code) instead of fine-tuned with a softmax layer, so [1]'s error rates are not
  comparable to our numbers.
- [1] chooses the number of hidden units, the learning rates, the number of epochs and nu
  on a validation set; the defaults here are the lab's SdA tutorial (three layers of 1000,
  SGD at 0.001 on single examples, 15 epochs per layer) with one nu = 0.25 from [1]'s grid
  for every layer (the tutorial uses 0.1, 0.2, 0.3). The initialisation is the tutorial's,
  W ~ U(+-4 sqrt(6 / (d_in + d_out))), biases 0 [M: not stated in [1]].
- Examples are drawn at random every step (without replacement inside a batch), not in
  shuffled epochs; an epoch is num_train / batch_size steps.
- Options beyond [1]: `--corruption bernoulli` destroys each component independently with
  probability nu (the tutorial's masking), `--corruption gaussian` adds N(0, noise_std^2)
  (Vincent et al. 2010); `--no-tied` learns W' separately.
- The `quick` preset: 8x8 digits (d = 64), two layers of 256 units, batches of 16 at
  lr 0.1, 30 epochs per layer.
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import data, probe, run

CORRUPTIONS = ("masking", "bernoulli", "gaussian")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Stacked denoising autoencoders; defaults are [1]'s setting with the lab's SdA values."""

    image_size: int = 28
    """side of the (square) images: digits upsampled from 8x8 (28: MNIST's size in [1])"""
    num_train: int = 1000
    """digits used for training (pretraining and probe fits); the other 797 are held out"""
    hidden_sizes: tuple[int, ...] = (1000, 1000, 1000)
    """hidden units of each stacked layer, bottom first (SdA-3)"""
    corruption: str = "masking"
    """q_D: masking (a fixed number nu d of components set to 0, [1]), bernoulli (each
    component set to 0 with probability nu), gaussian (additive noise of std noise_std)"""
    corruption_fraction: float = 0.25
    """nu, the proportion of destroyed components (0: an ordinary autoencoder)"""
    noise_std: float = 0.5
    """std of the additive noise of --corruption gaussian, in training and in the held-out
    denoising metrics (with gaussian, --test-corruption-fraction is not used)"""
    tied: bool = True
    """tied weights W' = W^T ([1]); otherwise W' is a separate parameter"""
    lr: float = 0.001
    """SGD learning rate of the pretraining (on the per-example sum of L_H)"""
    batch_size: int = 1
    """examples per SGD step (1: stochastic gradient descent on single examples)"""
    num_epochs: int = 15
    """pretraining epochs (of num_train / batch_size steps) per layer"""
    test_corruption_fraction: float = 0.25
    """nu of the held-out denoising metrics, whatever trained (masking and bernoulli; with
    --corruption gaussian the evaluation noise is --noise-std)"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    knn_temperature: float = 0.07
    """temperature T of the k-NN probe's exp(similarity / T) votes"""
    probe_l2: float = 1e-3
    """L2 penalty of the linear probe"""
    dtype: str = "float32"
    """compute dtype of the matmuls ("bfloat16" on accelerators; the loss stays float32)"""

    @property
    def input_dim(self) -> int:
        return self.image_size * self.image_size

    @property
    def steps_per_layer(self) -> int:
        return self.num_epochs * max(self.num_train // self.batch_size, 1)

    @property
    def num_updates(self) -> int:
        return len(self.hidden_sizes) * self.steps_per_layer

    @property
    def steps_per_update(self) -> int:
        return self.batch_size  # examples seen per update

    def validate(self):
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes={self.hidden_sizes} must be one or more sizes >= 1")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption={self.corruption!r} must be one of {CORRUPTIONS}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if self.image_size < 2:
            raise ValueError(f"image_size={self.image_size} must be >= 2")
        if self.probe_per_class > 100:
            raise ValueError(
                f"probe_per_class={self.probe_per_class} must be <= 100 (the "
                "training split has about 100 digits of each class)"
            )
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: the 8x8 digits themselves, two layers of 256 units, batches of 16.
    "quick": dict(image_size=8, hidden_sizes=(256, 256), lr=0.1, batch_size=16, num_epochs=30),
    "paper": dict(),
}


# --- NETWORKS ---


def init_layer(key, d_in: int, d_out: int, tied: bool):
    """One autoencoder layer: W (d_in, d_out) ~ U(+-4 sqrt(6 / (d_in + d_out))) (the lab's
    tutorial for sigmoid units), b (d_out,) = 0, b' (d_in,) = 0; W' (d_out, d_in) when the
    weights are not tied."""
    a = 4.0 * np.sqrt(6.0 / (d_in + d_out))
    k_w, k_wp = jax.random.split(key)
    p = {
        "W": jax.random.uniform(k_w, (d_in, d_out), minval=-a, maxval=a),
        "b": jnp.zeros(d_out),
        "b_prime": jnp.zeros(d_in),
    }
    if not tied:
        p["W_prime"] = jax.random.uniform(k_wp, (d_out, d_in), minval=-a, maxval=a)
    return p


def encode(p, x, dtype=jnp.float32):
    """[1] Sec. 2.2: y = s(W x + b); x (B, d_in) -> y (B, d_out)."""
    a = jnp.dot(x.astype(dtype), p["W"].astype(dtype)).astype(jnp.float32)
    return jax.nn.sigmoid(a + p["b"])


def decode_logits(p, y, dtype=jnp.float32):
    """[1] Sec. 2.2: the pre-sigmoid W' y + b' of z = s(W' y + b'), W' = W^T when tied;
    y (B, d_out) -> (B, d_in)."""
    w_prime = p["W"].T if "W_prime" not in p else p["W_prime"]
    a = jnp.dot(y.astype(dtype), w_prime.astype(dtype)).astype(jnp.float32)
    return a + p["b_prime"]


def encode_stack(params, x, dtype=jnp.float32):
    """The codes of every layer of the stack for clean inputs x (B, d): [y_1, ..., y_L]."""
    codes = []
    for p in params:
        x = encode(p, x, dtype)
        codes.append(x)
    return codes


# --- LOSS ---


def corrupt(key, x, kind: str, nu):
    """x~ ~ q_D(x~ | x) for x (B, d). masking ([1] Sec. 2.3): per row, exactly round(nu d)
    components chosen uniformly at random are set to 0; bernoulli: each set to 0 with
    probability nu; gaussian: x + nu * N(0, 1) (nu is then the std). nu may be traced."""
    if kind == "gaussian":
        return x + nu * jax.random.normal(key, x.shape)
    u = jax.random.uniform(key, x.shape)
    if kind == "bernoulli":
        return jnp.where(u < nu, 0.0, x)
    d = x.shape[-1]
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)  # a random permutation per row
    return jnp.where(rank < jnp.round(nu * d), 0.0, x)


def reconstruction_loss(logits, x):
    """[1] Eq. 2 [M]: L_H(x, z) with z = s(logits), summed over the d components, averaged over
    the batch (computed from the logits, stable where z rounds to 0 or 1)."""
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()


def dae_loss(p, x, key, kind: str, nu, dtype=jnp.float32):
    """[1] Eq. 3 [M] on a batch: L_H(x, g(f(x~))), x~ ~ q_D(x~ | x); the clean x is the target."""
    x_tilde = corrupt(key, x, kind, nu)
    return reconstruction_loss(decode_logits(p, encode(p, x_tilde, dtype), dtype), x)


def layer_loss(params, k: int, x, key, kind: str, nu, dtype=jnp.float32):
    """[1] Sec. 2.4: the DAE loss of layer k (0-based) of the stack on the clean code of the
    layers below it (gradients stopped there: a layer trains only its own parameters)."""
    for p in params[:k]:
        x = encode(p, x, dtype)  # the uncorrupted representation feeds the next layer
    return dae_loss(
        params[k], jax.lax.stop_gradient(x), jax.random.fold_in(key, k), kind, nu, dtype
    )


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    """tuple of the layers' parameter dicts, bottom first"""
    opt_state: Any
    step: jax.Array
    key: jax.Array
    nu: jax.Array
    """the corruption level of training (nu; the std for gaussian), traced: a seed may differ"""


def train_images(cfg: Config):
    """(train_x, train_y, test_x, test_y) as numpy, images flattened to (N, d) in [0, 1]."""
    tr_x, tr_y, te_x, te_y = data.digit_images(cfg.image_size, cfg.num_train)
    return tr_x.reshape(len(tr_x), -1), tr_y, te_x.reshape(len(te_x), -1), te_y


def make_optimizer(cfg: Config):
    """Plain SGD ([1] Sec. 2.2): a layer outside its training phase gets zero gradients and
    does not move."""
    return optax.sgd(cfg.lr)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    sizes = (cfg.input_dim, *cfg.hidden_sizes)
    params = tuple(
        init_layer(k, sizes[i], sizes[i + 1], cfg.tied)
        for i, k in enumerate(jax.random.split(k_net, len(cfg.hidden_sizes)))
    )
    level = cfg.noise_std if cfg.corruption == "gaussian" else cfg.corruption_fraction
    return State(
        params,
        make_optimizer(cfg).init(params),
        jnp.zeros((), jnp.int32),
        key,
        jnp.asarray(level, jnp.float32),
    )


# --- UPDATE ---


def update(state: State, cfg: Config):
    """One SGD step of the layer in training: layer k = step // steps_per_layer ([1] Sec.
    2.4: greedy, bottom layer first)."""
    train_x = jnp.asarray(train_images(cfg)[0])
    dtype = jnp.dtype(cfg.dtype)
    key, k_batch, k_noise = jax.random.split(state.key, 3)
    idx = jax.random.choice(k_batch, cfg.num_train, (cfg.batch_size,), replace=False)
    x = train_x[idx]  # (B, d)
    layer = jnp.minimum(state.step // cfg.steps_per_layer, len(cfg.hidden_sizes) - 1)
    # only the layer in training runs: branch k encodes through layers < k, then its DAE loss
    branches = [
        lambda params, k=k: layer_loss(params, k, x, k_noise, cfg.corruption, state.nu, dtype)
        for k in range(len(cfg.hidden_sizes))
    ]
    loss_fn = lambda params: jax.lax.switch(layer, branches, params)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    tx = make_optimizer(cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "losses/reconstruction": loss,
        "charts/layer": layer.astype(jnp.float32),
        "charts/grad_norm": optax.tree.norm(grads),
    }
    return State(params, opt_state, state.step + 1, key, state.nu), metrics


# --- EVALUATE ---


def denoise(params, x, key, cfg: Config):
    """The first layer's reconstruction z = g(f(x~)) of held-out x (N, d) corrupted at the
    test level, and x~."""
    level = cfg.noise_std if cfg.corruption == "gaussian" else cfg.test_corruption_fraction
    x_tilde = corrupt(key, x, cfg.corruption, level)
    dtype = jnp.dtype(cfg.dtype)
    logits = decode_logits(params[0], encode(params[0], x_tilde, dtype), dtype)
    return jax.nn.sigmoid(logits), logits, x_tilde


def evaluate(state: State, cfg: Config):
    """On the 797 held-out digits: denoising by the first layer, per-pixel mean squared error
    against the clean digit of its reconstruction from a corrupted input ("recon_mse") and of
    the corrupted input itself ("corrupted_mse"), and L_H per digit ("recon_ce"); probes of
    the top code of clean digits, linear and k-NN with all 1,000 training labels ("linear",
    "knn") and with probe_per_class per class ("linear_few", "knn_few")."""
    # a barrier: XLA would otherwise constant-fold the matmuls of the fixed data
    tr_x, tr_y, te_x, te_y = jax.lax.optimization_barrier(
        tuple(jnp.asarray(a) for a in train_images(cfg))
    )
    z, logits, x_tilde = denoise(state.params, te_x, jax.random.PRNGKey(1), cfg)
    out = {
        "recon_mse": jnp.mean((z - te_x) ** 2),
        "corrupted_mse": jnp.mean((x_tilde - te_x) ** 2),
        "recon_ce": reconstruction_loss(logits, te_x),
    }
    dtype = jnp.dtype(cfg.dtype)
    f_tr = encode_stack(state.params, tr_x, dtype)[-1]
    f_te = encode_stack(state.params, te_x, dtype)[-1]
    out.update(
        probe.probe(
            jax.random.PRNGKey(0),
            f_tr,
            tr_y,
            f_te,
            te_y,
            10,
            cfg.probe_per_class,
            cfg.knn_k,
            cfg.knn_temperature,
            cfg.probe_l2,
        )
    )
    return out


# --- PLOT ---


def plot(res, cfg: Config, out: str, seed: int = 0):
    """The run's first seed: held-out digits clean, corrupted and denoised, and the first
    layer's filters (each hidden unit's column of W as an image, as in [1] Fig. 3), with the
    held-out numbers of the same stack at init (key `seed`)."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)
    te_x = jnp.asarray(train_images(cfg)[2][:12])
    z, _, x_tilde = jax.jit(denoise, static_argnums=3)(
        state.params, te_x, jax.random.PRNGKey(1), cfg
    )
    at_init = run.evaluate_seeds(evaluate, run.initial_states(init, cfg, seed, 1), cfg, 1)
    s = cfg.image_size
    w = np.asarray(state.params[0]["W"]).T.reshape(-1, s, s)[:48]
    fig = plt.figure(figsize=(12, 3.6))
    left, right = fig.add_gridspec(1, 2, width_ratios=[12, 12], wspace=0.08)
    g1, g2 = left.subgridspec(3, 12), right.subgridspec(4, 12)
    for r, (name, imgs) in enumerate((("clean", te_x), ("corrupted", x_tilde), ("denoised", z))):
        for j in range(12):
            ax = fig.add_subplot(g1[r, j])
            ax.imshow(np.asarray(imgs[j]).reshape(s, s), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    for j in range(len(w)):
        ax = fig.add_subplot(g2[j // 12, j % 12])
        ax.imshow(w[j], cmap="gray")
        ax.set_xticks([]), ax.set_yticks([])
    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    i = {k: float(np.asarray(v)[0]) for k, v in at_init.items()}
    print("at init:", " ".join(f"{k} {v:.4f}" for k, v in i.items()))
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.03, top=0.8)
    fig.suptitle(
        f"Denoising autoencoder ({cfg.corruption} nu={float(state.nu):g}, layers "
        f"{cfg.hidden_sizes}): held-out digits (left), first-layer filters (right)\n"
        f"held-out MSE: denoised {f['recon_mse']:.4f}, corrupted input "
        f"{f['corrupted_mse']:.4f}; top-code probes (random init): linear {f['linear']:.3f} "
        f"({i['linear']:.3f}), k-NN {f['knn']:.3f} ({i['knn']:.3f}), 10/class linear "
        f"{f['linear_few']:.3f} ({i['linear_few']:.3f}), k-NN {f['knn_few']:.3f} "
        f"({i['knn_few']:.3f})",
        fontsize=9,
    )
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's denoising and filters."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[
            "recon_mse",
            "corrupted_mse",
            "recon_ce",
            "linear",
            "linear_few",
            "knn",
            "knn_few",
            "losses/reconstruction",
        ],
    )
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        record = json.loads((Path(res.run_dir) / "config.json").read_text())
        c = {k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()}
        print(plot(res, Config(**c), flags["--plot"], record["seed"]))
    return res


if __name__ == "__main__":
    main()
