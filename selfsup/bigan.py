"""BiGAN: features from an encoder E trained adversarially to invert a generator G.

[1] J. Donahue, P. Krahenbuhl, T. Darrell. "Adversarial Feature Learning." ICLR 2017,
    arXiv:1605.09782. Released code: jeffdonahue/bigan (Theano, commit 06342ee):
    train_mnist.sh (the permutation-invariant MNIST BiGAN), train_gan.py, gan.py, net.py,
    dist.py.

A deterministic encoder E maps data to latents, a generator G maps prior samples to data,
and one discriminator D sees (data, latent) pairs: (x, E(x)) is the real pair, (G(z), z)
the fake one (the post's prose swaps the two names; its equation, like [1], does not):

    V(D, E, G) = E_x[log D(x, E(x))] + E_z[log(1 - D(G(z), z))]       [1] Eq. 3 [M]
    min_{G, E} max_D V; at the optimum E = G^-1                         [1] Sec. 3 [M]
    D's loss:    1/2 [-log D(x, E(x)) - log(1 - D(G(z), z))]            released gan.py
    E, G's loss: 1/2 [-log(1 - D(x, E(x))) - log D(G(z), z)]            released gan.py
        (the "inverse" objective of [1] Sec. 3.4 [M]: the same pairs with the labels
        flipped, non-saturating; the released "opp_" losses, checked in the code)
[M]: equation and section numbers as recalled, not re-read in the PDF.

Each loss reaches only its own parameters: D's loss sees E(x) and G(z) as data (stopped
gradients), E and G's loss sees D frozen (`losses`); `gradients` computes the same from one
forward pass of D per pair kind, pulling each loss's cotangent back through its own group.
With `simultaneous` (the released default, update_both, k = 1) D, E and G step from the
same parameters; otherwise D steps first and E, G answer the updated D on the same batch
(ours; not the released --no_update_both, see the differences).

Networks ([1] Sec. 4.1, released mnist_mlp / deconvnet_mnist_mlp with width 16 x 64 =
1024): permutation-invariant MLPs on flattened images, weights N(0, 0.02), no biases, batch
norm without scale or shift, LeakyReLU 0.2 in E and D, ReLU in G:
    E: x -> FC 1024, LReLU -> FC 1024, BN, LReLU -> FC latent_dim -> 2 sigmoid - 1 (uniform
       prior; linear for a normal prior)
    G: z -> FC 1024, BN, ReLU -> FC 1024 + FC(z), BN, ReLU -> FC pixels, sigmoid
    D: x -> FC 1024, LReLU -> FC 1024 + FC(z), BN, LReLU -> FC 1 (a logit; this layer
       starts at 0, as the released LinearPredictor(stddev=0): both losses start at log 2)
Prior: uniform on [-1, 1]^50 (released NOISE="u-50"). Optimiser: Adam lr 2e-4, beta1 0.5,
L2 2.5e-5 added to every gradient, batch 128, 200 epochs at lr then 200 epochs of
exponential decay to 0.01 lr (released defaults and train_mnist.sh).

Evaluation (released eval_and_disp, on held-out digits): linear and k-NN probes of E(x)
(common/probe; all 1,000 labels and 10 per class) and the paper's euclidean 1-NN accuracy,
each for the trained E, the same E at its random init ("init_") and the same E (same init)
trained with labels (a 10-way head on E(x), cross-entropy; "sup_"); the same probes on the
layer before E's output (trained "pre_", at init "init_pre_"; the released NNC_e-, CLS_e-)
and on the raw pixels ("pixels_"), all in one evaluate();
the inversion error ||x - G(E(x))|| against the random pairing ||x' - G(E(x))|| (released
EGr, EGr_b). Batch-norm statistics at evaluation: those of all training images (E) and of
as many prior samples (G), as the released "deploy" pass recomputes them.

Reproduce (CPU demo: scikit-learn's 8x8 digits as 64-d vectors, MLPs of width 256):
    python selfsup/bigan.py --preset quick --plot selfsup/bigan.png
Measured (1 seed, 2,800 steps of 128 pairs, 1.7 min wall / 37 CPU-s on a loaded 2-core
CPU, 797 held-out digits): the inversion error ||x - G(E(x))|| 2.06 against 3.08 for a
random pairing (ratio 0.67; at init 3.37 for both); D's held-out accuracy 0.92. On these
8x8 digits BiGAN's features do not beat a random-init E, nor the raw pixels: 1-NN on E(x)
0.954 (init 0.956), on the layer before E's output ("pre_") 0.967 (init 0.977), raw pixels
0.984; linear 0.954 / 0.831 with 10 labels per class (init 0.927 / 0.824), pre_ 0.964 /
0.856 (init 0.974 / 0.885), pixels 0.960 / 0.872; k-NN 0.954 / 0.848 (init 0.959 / 0.838);
the supervised E (500 steps): 0.988-0.989 on all five. Only the inversion shows what was
learnt. With a 10-d latent and width 128 (the tests' setting, 400 steps, 2 seeds) the
random-init E(x) is weaker and BiGAN's gain clear: linear 0.837, 0.808 vs 0.740, 0.729
(+0.097, +0.079); 10 per class 0.737, 0.710 vs 0.593, 0.645 (+0.144, +0.065); but its
layer before the output falls below its random init (linear 0.939 vs 0.963, 1-NN 0.924
vs 0.971, means of 2 seeds) and below the raw pixels (0.960, 0.984).
Paper setting (the released MNIST networks and schedule, on digits):
    python selfsup/bigan.py --preset paper
[1] Table 1 (permutation-invariant MNIST, 1-NN): BiGAN 97.39% [M: the value as recalled;
not re-read which layer or split]; the released README's log reaches 92.10% (1-NN on E's
pre-sigmoid outputs, "NNC_e", train_gan.py / dist.py l2distable) and 97.35% (on the layer
before E's output, "NNC_e-") after 400 epochs, both on MNIST's 10k validation split
(load.py mnist_with_valid_set), with EGr 5.95 against EGr_b 9.60. Table 1's 97.39 is
closer to NNC_e- than to NNC_e.

Differences from the paper:
- Data: MNIST does not ship offline. scikit-learn's 1,797 8x8 digits (1,000 train, 797
  held out), pixels in [0, 1] (MNIST's native range in the released code), as 64-d vectors.
  An epoch is num_train // batch_size = 7 steps of i.i.d. batches (each without
  repeats), so 400 epochs are 2,800 steps (MNIST: ~390 steps an epoch); the released
  epoch is a shuffled pass of ceil(N / B) batches (train_gan.py), 8 for 1,000 images
  (3,200 steps).
- Batch norm at evaluation: one pass over the training images (E) or prior samples (G) in
  place of the released 1,000 "deploy" batches; during training, batch statistics (real
  and fake pairs through D in separate passes, as released).
- The released learning-rate decay runs per epoch; ours too. No dropout, no minibatch
  discrimination (the released MNIST run uses neither).
- Probes: the released code fits 1-NN on E's pre-sigmoid outputs (NNC_e) and 1-NN and
  logistic regression on the layer before them (NNC_e-, CLS_e-), on MNIST's validation
  split; ours probe E(x) = 2 sigmoid - 1 of the outputs and the layer before them (1-NN
  euclidean, k-NN cosine, logistic regression) on the 797 held-out digits, not E's
  pre-sigmoid outputs.
- `simultaneous=False` (D steps, then E and G answer the updated D on the same batch) is
  neither released scheme: the released default updates all three at once (ours with
  `simultaneous`, the default); --no_update_both alternates E/G on even steps and D on odd
  ones, each on a fresh batch, with the number of iterations doubled.
- prior="normal" is N(0, 1); the released normal prior has std sqrt(2 ln 2) (dist.py).
- As released, the L2 decay is added to the gradient before Adam, so a parameter whose loss
  gradient is 0 still takes ~lr-sized steps towards 0 (with D blind to z, E shrinks to a
  constant: the tests' broken control probes at chance).
- The supervised reference (E plus a linear 10-way head, 500 Adam steps on the 1,000
  labels) is ours; [1] compares against other unsupervised methods.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import data, probe, run

# --- CONFIG ---

PRIORS = ("uniform", "normal")


@dataclass(frozen=True)
class Config:
    """BiGAN; defaults are [1]'s released permutation-invariant MNIST run (train_mnist.sh)."""

    num_train: int = 1000
    """digits used for training (and the probes' fits); the other 797 are held out"""
    latent_dim: int = 50
    """dimension of z and of E(x) (released NOISE=u-50)"""
    prior: str = "uniform"
    """p(z): uniform on [-1, 1]^d (released) or normal N(0, 1) (released: std sqrt(2 ln 2))"""
    hidden: int = 1024
    """width of the two hidden layers of E, G and D (released 16 x 64)"""
    d_sees_z: bool = True
    """D sees (x, z) (BiGAN); False: D sees x alone, E gets no signal (the broken control)"""
    simultaneous: bool = True
    """D, E and G step from the same parameters (released default, k = 1); False: D steps,
    then E, G answer it on the same batch (ours, not the released --no_update_both)"""
    batch_size: int = 128
    """pairs of each kind per step (released)"""
    num_epochs: int = 200
    """epochs at the initial learning rate (released --epochs)"""
    decay_epochs: int = 200
    """epochs of exponential decay to final_lr_mult x lr (released --decay_epochs)"""
    lr: float = 2e-4
    """Adam learning rate of E, G and D"""
    final_lr_mult: float = 0.01
    """learning rate at the end of the decay over lr (released default)"""
    adam_b1: float = 0.5
    """Adam beta1 (released --momentum)"""
    adam_b2: float = 0.999
    """Adam beta2"""
    weight_decay: float = 2.5e-5
    """L2 coefficient added to every gradient (released --decay)"""
    supervised_steps: int = 500
    """Adam steps of the supervised reference E (10-way head on E(x), training labels)"""
    supervised_lr: float = 1e-3
    """learning rate of the supervised reference"""
    probe_per_class: int = 10
    """labels per class of the few-label probes"""
    knn_k: int = 20
    """neighbours of the k-NN probe"""
    knn_temperature: float = 0.07
    """temperature of the k-NN probe's exp(similarity / T) votes"""
    probe_l2: float = 1e-3
    """L2 penalty of the linear probe"""
    dtype: str = "float32"
    """compute dtype of the matmuls ("bfloat16" on accelerators)"""

    @property
    def steps_per_epoch(self) -> int:
        return max(self.num_train // self.batch_size, 1)

    @property
    def num_updates(self) -> int:
        return (self.num_epochs + self.decay_epochs) * self.steps_per_epoch

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.prior not in PRIORS:
            raise ValueError(f"prior={self.prior!r} must be one of {PRIORS}")
        if not 10 * self.probe_per_class <= self.num_train <= 1796:
            raise ValueError(f"num_train={self.num_train} must be in [10 x probe_per_class "
                             f"= {10 * self.probe_per_class}, 1796]")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train="
                             f"{self.num_train}")
        if not 0 < self.final_lr_mult <= 1:
            raise ValueError(f"final_lr_mult={self.final_lr_mult} must be in (0, 1]")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature={self.knn_temperature} must be > 0")
        if self.probe_per_class > 80:
            raise ValueError(f"probe_per_class={self.probe_per_class} must be <= 80")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: the released schedule (400 epochs = 2,800 steps) with MLPs of width 256.
    "quick": dict(hidden=256),
    "paper": dict(),
}


# --- NETWORKS ---

INIT = nn.initializers.normal(0.02)  # released weight_init: N(0, 0.02), no biases


def dense(n, dtype):
    return nn.Dense(n, use_bias=False, kernel_init=INIT, dtype=dtype)


def batch_norm(train: bool, momentum: float = 0.9):
    """BN without scale or shift (released --nogain --nobias)."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-8,
                        use_scale=False, use_bias=False)


class Encoder(nn.Module):
    """E: x (B, P) -> E(x) (B, latent_dim); features=True: the layer before the output
    (B, hidden), after its batch norm and LReLU (the released NNC_e- features)."""

    hidden: int
    latent_dim: int
    prior: str
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool, features: bool = False):
        h = nn.leaky_relu(dense(self.hidden, self.dtype)(x), 0.2)
        h = batch_norm(train, self.bn_momentum)(dense(self.hidden, self.dtype)(h))
        h = nn.leaky_relu(h, 0.2)
        if features:
            return h.astype(jnp.float32)
        out = dense(self.latent_dim, self.dtype)(h).astype(jnp.float32)
        # released dist.py: a uniform latent is 2 sigmoid - 1, in the prior's support
        return 2 * jax.nn.sigmoid(out) - 1 if self.prior == "uniform" else out


class Generator(nn.Module):
    """G: z (B, d) -> x (B, P) in [0, 1]; z enters both hidden layers (released apply_cond)."""

    hidden: int
    pixels: int
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, z, train: bool):
        h = nn.relu(batch_norm(train, self.bn_momentum)(dense(self.hidden, self.dtype)(z)))
        h = dense(self.hidden, self.dtype)(h) + dense(self.hidden, self.dtype)(z)
        h = nn.relu(batch_norm(train, self.bn_momentum)(h))
        return jax.nn.sigmoid(dense(self.pixels, self.dtype)(h).astype(jnp.float32))


class Discriminator(nn.Module):
    """D: (x, z) -> logit (B,); z is added into the second layer (released apply_cond).
    sees_z=False drops the z branch: D(x) alone."""

    hidden: int
    sees_z: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, z, train: bool):
        h = nn.leaky_relu(dense(self.hidden, self.dtype)(x), 0.2)
        h = dense(self.hidden, self.dtype)(h)
        if self.sees_z:
            h = h + dense(self.hidden, self.dtype)(z)
        h = nn.leaky_relu(batch_norm(train)(h), 0.2)
        # released LinearPredictor(stddev=0): the output layer starts at 0, D(x, z) = 1/2
        out = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros, dtype=self.dtype)
        return out(h).reshape(-1).astype(jnp.float32)


def networks(cfg: Config, bn_momentum: float = 0.9):
    dt = jnp.dtype(cfg.dtype)
    return (Encoder(cfg.hidden, cfg.latent_dim, cfg.prior, dt, bn_momentum),
            Generator(cfg.hidden, 64, dt, bn_momentum),
            Discriminator(cfg.hidden, cfg.d_sees_z, dt))


def sample_prior(key, n: int, cfg: Config):
    if cfg.prior == "uniform":
        return jax.random.uniform(key, (n, cfg.latent_dim), minval=-1.0, maxval=1.0)
    return jax.random.normal(key, (n, cfg.latent_dim))


# --- LOSS ---


def discriminator_loss(logit_real, logit_fake):
    """-(Eq. 3)/2: 1/2 [-log D(x, E(x)) - log(1 - D(G(z), z))], batch means."""
    return 0.5 * (optax.sigmoid_binary_cross_entropy(logit_real, 1.0).mean()
                  + optax.sigmoid_binary_cross_entropy(logit_fake, 0.0).mean())


def generator_encoder_loss(logit_real, logit_fake):
    """Sec. 3.4, the inverse objective: 1/2 [-log(1 - D(x, E(x))) - log D(G(z), z)]."""
    return 0.5 * (optax.sigmoid_binary_cross_entropy(logit_real, 0.0).mean()
                  + optax.sigmoid_binary_cross_entropy(logit_fake, 1.0).mean())


def losses(params, x, z, cfg: Config):
    """(D's loss, E and G's loss, D's accuracy) on a batch of real x and prior z; each loss
    is differentiable only in its own group: D's sees E(x), G(z) stopped; E, G's sees D
    frozen (params = {"e", "g", "d"})."""
    enc, gen, dis = networks(cfg)
    ez = enc.apply({"params": params["e"]}, x, train=True, mutable=["batch_stats"])[0]
    gz = gen.apply({"params": params["g"]}, z, train=True, mutable=["batch_stats"])[0]

    def d(p, a, b):  # real and fake pairs in separate passes (separate batch statistics)
        return dis.apply({"params": p}, a, b, train=True, mutable=["batch_stats"])[0]

    sg = jax.lax.stop_gradient
    lr_, lf = d(params["d"], x, sg(ez)), d(params["d"], sg(gz), z)
    frozen = sg(params["d"])
    ge = generator_encoder_loss(d(frozen, x, ez), d(frozen, gz, z))
    acc = 0.5 * (jnp.mean(lr_ > 0) + jnp.mean(lf < 0))
    return discriminator_loss(lr_, lf), ge, acc


def gradients(params, x, z, cfg: Config):
    """(grads {"e", "g", "d"}, (D's loss, E and G's loss, D's accuracy)): the gradients of
    `losses` per group (D's of D's loss, E's and G's of theirs), from one forward pass of D
    per pair kind (two vjps) instead of the four passes of differentiating `losses`."""
    enc, gen, dis = networks(cfg)
    ez, vjp_e = jax.vjp(lambda p: enc.apply({"params": p}, x, train=True,
                                            mutable=["batch_stats"])[0], params["e"])
    gz, vjp_g = jax.vjp(lambda p: gen.apply({"params": p}, z, train=True,
                                            mutable=["batch_stats"])[0], params["g"])

    def d(p, a, b):  # real and fake pairs in separate passes (separate batch statistics)
        return dis.apply({"params": p}, a, b, train=True, mutable=["batch_stats"])[0]

    lr_, vjp_r = jax.vjp(lambda p, e: d(p, x, e), params["d"], ez)
    lf, vjp_f = jax.vjp(lambda p, g: d(p, g, z), params["d"], gz)
    ld, (cd_r, cd_f) = jax.value_and_grad(discriminator_loss, (0, 1))(lr_, lf)
    lge, (cg_r, cg_f) = jax.value_and_grad(generator_encoder_loss, (0, 1))(lr_, lf)
    g_d = jax.tree.map(jnp.add, vjp_r(cd_r)[0], vjp_f(cd_f)[0])
    grads = {"e": vjp_e(vjp_r(cg_r)[1])[0], "g": vjp_g(vjp_f(cg_f)[1])[0], "d": g_d}
    acc = 0.5 * (jnp.mean(lr_ > 0) + jnp.mean(lf < 0))
    return grads, (ld, lge, acc)


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # {"e", "g", "d"}
    opt_state: Any
    step: jax.Array
    key: jax.Array
    init_key: jax.Array  # the networks' init key: evaluate() rebuilds the random-init E
    data: tuple  # (train_x, train_y, test_x, test_y): inputs of the chunks, no constants


def images(cfg: Config):
    """(train_x (N, 64), train_y, test_x (M, 64), test_y) numpy, pixels in [0, 1]."""
    tr_x, tr_y, te_x, te_y = data.digit_images(8, cfg.num_train)
    return tr_x.reshape(len(tr_x), -1), tr_y, te_x.reshape(len(te_x), -1), te_y


def lr_schedule(cfg: Config):
    """Released set_lr: lr for num_epochs, then exponential decay per epoch reaching
    final_lr_mult x lr after decay_epochs."""

    def sched(step):
        epoch = step // cfg.steps_per_epoch
        frac = jnp.clip((epoch - cfg.num_epochs + 1) / max(cfg.decay_epochs, 1), 0.0, 1.0)
        return cfg.lr * cfg.final_lr_mult ** jnp.where(epoch < cfg.num_epochs, 0.0, frac)

    return sched


def optimizer(cfg: Config):
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.scale_by_adam(cfg.adam_b1, cfg.adam_b2, eps=1e-8),
                       optax.scale_by_learning_rate(lr_schedule(cfg)))


def init_params(key, cfg: Config):
    enc, gen, dis = networks(cfg)
    k_e, k_g, k_d = jax.random.split(key, 3)
    x, z = jnp.zeros((2, 64)), jnp.zeros((2, cfg.latent_dim))
    return {"e": enc.init(k_e, x, train=False)["params"],
            "g": gen.init(k_g, z, train=False)["params"],
            "d": dis.init(k_d, x, z, train=False)["params"]}


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = init_params(k_net, cfg)
    return State(params, optimizer(cfg).init(params), jnp.zeros((), jnp.int32), key, k_net,
                 tuple(jnp.asarray(a) for a in images(cfg)))


# --- UPDATE ---


def update(state: State, cfg: Config):
    tx = optimizer(cfg)
    key, k_x, k_z = jax.random.split(state.key, 3)
    train_x = state.data[0]
    x = train_x[jax.random.choice(k_x, train_x.shape[0], (cfg.batch_size,), replace=False)]
    z = sample_prior(k_z, cfg.batch_size, cfg)

    grads, (ld, lge, acc) = gradients(state.params, x, z, cfg)
    if not cfg.simultaneous:  # D first, then E and G against the updated D
        u, _ = tx.update(grads, state.opt_state, state.params)
        d_new = optax.apply_updates(state.params["d"], u["d"])
        ge_grads = gradients({**state.params, "d": d_new}, x, z, cfg)[0]
        grads = {**grads, "e": ge_grads["e"], "g": ge_grads["g"]}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"losses/discriminator": ld, "losses/generator_encoder": lge,
               "charts/d_accuracy": acc, "charts/lr": lr_schedule(cfg)(state.step),
               "charts/grad_norm_e": optax.tree.norm(grads["e"])}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                         key=key), metrics


# --- EVALUATE ---


def deploy(module, params, inputs, *args):
    """Variables of `module` with batch-norm statistics of `inputs` (all of them at once:
    momentum 0), as the released deploy pass."""
    stats = module.clone(bn_momentum=0.0).apply(
        {"params": params}, inputs, *args, train=True, mutable=["batch_stats"])[1]
    return {"params": params, **stats}


def encode(e_params, x, fit_x, cfg: Config, features: bool = False):
    """E(x) with batch norm statistics of fit_x (the training images); features=True: the
    layer before E's output."""
    enc = networks(cfg)[0]
    return enc.apply(deploy(enc, e_params, fit_x), x, train=False, features=features)


def reconstruct(params, x, fit_x, cfg: Config):
    """G(E(x)): E's statistics from fit_x, G's from as many prior samples."""
    gen = networks(cfg)[1]
    gv = deploy(gen, params["g"], sample_prior(jax.random.PRNGKey(1), fit_x.shape[0], cfg))
    return gen.apply(gv, encode(params["e"], x, fit_x, cfg), train=False)


def inversion_errors(x, recon):
    """Mean ||x - G(E(x))|| and the random pairing's mean ||x' - G(E(x))||, x' the next
    image (released EGr, EGr_b)."""
    err = jnp.linalg.norm(x - recon, axis=-1).mean()
    base = jnp.linalg.norm(jnp.roll(x, -1, axis=0) - recon, axis=-1).mean()
    return err, base


def nn1_accuracy(train_f, train_y, test_f, test_y):
    """The paper's 1-NN classifier: euclidean nearest training feature's label."""
    d2 = (test_f**2).sum(1)[:, None] - 2 * test_f @ train_f.T + (train_f**2).sum(1)[None]
    return jnp.mean(train_y[jnp.argmin(d2, 1)] == test_y)


def supervised_encoder(key, train_x, train_y, cfg: Config):
    """The reference: E (init_params(key)'s, the same random-init E as BiGAN's) plus a
    10-way linear head on E(x), trained on the labels by Adam on minibatches; returns E's
    parameters."""
    enc = networks(cfg)[0]
    k_h, k_b = jax.random.split(jax.random.fold_in(key, 1))
    params = {"e": init_params(key, cfg)["e"],
              "h": INIT(k_h, (cfg.latent_dim, 10), jnp.float32)}
    tx = optax.adam(cfg.supervised_lr)

    def loss(p, idx):
        f = enc.apply({"params": p["e"]}, train_x[idx], train=True,
                      mutable=["batch_stats"])[0]
        return optax.softmax_cross_entropy_with_integer_labels(f @ p["h"],
                                                               train_y[idx]).mean()

    def step(carry, k):
        p, s = carry
        idx = jax.random.choice(k, train_x.shape[0], (cfg.batch_size,), replace=False)
        u, s = tx.update(jax.grad(loss)(p, idx), s)
        return (optax.apply_updates(p, u), s), None

    keys = jax.random.split(k_b, cfg.supervised_steps)
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params["e"]


def evaluate(state: State, cfg: Config):
    """On the 797 held-out digits, for E trained by BiGAN (""), at its random init
    ("init_") and trained with labels ("sup_"): linear / k-NN probes of E(x) (all labels and
    probe_per_class per class) and the euclidean 1-NN accuracy ("nn1"); the same on the
    layer before E's output ("pre_", "init_pre_": the released NNC_e-, CLS_e-) and on the
    raw pixels ("pixels_", the baseline every feature should beat); the inversion error
    ||x - G(E(x))|| ("inversion") and its random pairing ("inversion_random"), trained and
    at init; D's accuracy on held-out pairs."""
    tr_x, tr_y, te_x, te_y = state.data
    e_init = init_params(state.init_key, cfg)["e"]
    e_sup = supervised_encoder(state.init_key, tr_x, tr_y, cfg)
    out = {}
    feats = [(prefix, encode(e, tr_x, tr_x, cfg, pre), encode(e, te_x, tr_x, cfg, pre))
             for prefix, e, pre in (("", state.params["e"], False), ("init_", e_init, False),
                                    ("sup_", e_sup, False), ("pre_", state.params["e"], True),
                                    ("init_pre_", e_init, True))]
    for prefix, f_tr, f_te in feats + [("pixels_", tr_x, te_x)]:
        out.update(probe.probe(jax.random.PRNGKey(0), f_tr, tr_y, f_te, te_y, 10,
                               cfg.probe_per_class, cfg.knn_k, cfg.knn_temperature,
                               cfg.probe_l2, prefix=prefix))
        out[prefix + "nn1"] = nn1_accuracy(f_tr, tr_y, f_te, te_y)
    for prefix, params in (("", state.params), ("init_", init_params(state.init_key, cfg))):
        err, base = inversion_errors(te_x, reconstruct(params, te_x, tr_x, cfg))
        out[prefix + "inversion"], out[prefix + "inversion_random"] = err, base
    _, _, acc = losses(state.params, te_x, sample_prior(jax.random.PRNGKey(2),
                                                         te_x.shape[0], cfg), cfg)
    out["d_accuracy"] = acc
    return out


# --- MAIN ---


def plot(res, cfg: Config, out: str, num: int = 10):
    """Seed 0: samples G(z), and held-out digits x above their reconstructions G(E(x))."""
    import matplotlib.pyplot as plt

    from common.plot import save_png

    state = jax.tree.map(lambda a: a[0], res.state)

    @jax.jit
    def rows(state):
        tr_x, _, te_x, _ = state.data
        gen = networks(cfg)[1]
        gv = deploy(gen, state.params["g"], sample_prior(jax.random.PRNGKey(1),
                                                         tr_x.shape[0], cfg))
        samples = gen.apply(gv, sample_prior(jax.random.PRNGKey(3), 2 * num, cfg),
                            train=False)
        x = te_x[:2 * num]
        return samples, x, reconstruct(state.params, x, tr_x, cfg)

    f = {k: float(np.asarray(v)[0]) for k, v in res.final.items()}
    samples, x, recon = (np.asarray(a).reshape(2, num, 8, 8) for a in rows(state))
    grid = [("samples G(z), z ~ U[-1, 1]^d", samples[0]), ("", samples[1]),
            ("held-out digits x", x[0]),
            (f"G(E(x)): ||x - G(E(x))|| {f['inversion']:.2f} (random pair "
             f"{f['inversion_random']:.2f})", recon[0]), ("x", x[1]), ("G(E(x))", recon[1])]
    fig, ax = plt.subplots(len(grid), num, figsize=(0.75 * num, 0.95 * len(grid) + 0.3),
                           gridspec_kw=dict(wspace=0.05, hspace=0.35, left=0.01, right=0.99,
                                            bottom=0.01, top=0.9))
    for i, (title, ims) in enumerate(grid):
        for j in range(num):
            ax[i, j].imshow(ims[j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax[i, j].axis("off")
        if title:
            ax[i, 0].set_title(title, fontsize=7, loc="left")
    fig.suptitle(f"BiGAN on digits, 1-NN: E(x) {f['nn1']:.3f} (random-init E "
                 f"{f['init_nn1']:.3f}), layer before E's output {f['pre_nn1']:.3f} (init "
                 f"{f['init_pre_nn1']:.3f}), raw pixels {f['pixels_nn1']:.3f}", fontsize=8)
    return save_png(fig, out)


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws seed 0's samples and reconstructions."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[
                       "nn1", "init_nn1", "sup_nn1", "pre_nn1", "init_pre_nn1", "pixels_nn1",
                       "pre_linear", "init_pre_linear", "pre_linear_few",
                       "init_pre_linear_few", "pixels_linear", "pixels_linear_few",
                       "linear", "init_linear", "sup_linear",
                       "linear_few", "init_linear_few", "sup_linear_few", "knn", "init_knn",
                       "sup_knn", "knn_few", "init_knn_few", "sup_knn_few", "inversion",
                       "inversion_random", "init_inversion", "init_inversion_random",
                       "d_accuracy", "losses/discriminator", "losses/generator_encoder"])
    if flags["--plot"] is not None:
        import json
        from pathlib import Path

        saved = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        print(plot(res, Config(**saved), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
