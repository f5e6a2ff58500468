"""The lottery ticket hypothesis: iterative magnitude pruning with reset to initialisation.

[1] J. Frankle, M. Carbin. "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
    Networks." ICLR 2019, arXiv:1803.03635. Released code:
    google-research/lottery-ticket-hypothesis (commit 43ef68d).
[2] J. Frankle, G. K. Dziugaite, D. M. Roy, M. Carbin. "Stabilizing the Lottery Ticket
    Hypothesis" / "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
    arXiv:1903.01611 / 1912.05671 (rewinding to an early iterate theta_k).

Iterative magnitude pruning (IMP, [1] Sec. 1 / Alg. 1), one runner update = one round r:
    f(x; m_r * theta_start), m_0 = 1, theta_start = theta_0 (or theta_k [2])
    train T steps (Adam), m applied to the gradients and to the weights after every step
    m_{r+1} = m_r with the p_l fraction of m_r's surviving weights of layer l with the
              smallest |theta_T| set to 0 (layer-wise; [1]: p = 20% fc, 10% output), or
              the p fraction smallest over all layers at once (global, [2])      (IMP)
    reset: next round starts from m_{r+1} * theta_start                         (reset)
Density after r rounds (layer-wise): prod over rounds of (1 - p_l). Biases are not pruned.
Controls, trained identically from the same batches (the three arms are one vmapped axis;
masks are data, so one program trains all of them):
    ticket       the IMP mask, reset to theta_start (theta_0 at rewind_step 0)
    reinit       the same mask, weights from an independent draw theta_0' ([1] Sec. 2)
    random_mask  a uniformly random mask with the ticket's per-layer counts, weights
                 theta_start ([1] Fig. 1 "random"; a fresh random mask each round)
Round 0 is the dense network (ticket and random_mask arms are then the same run). Early
stopping ([1] Fig. 3): the iteration of minimum validation loss (checked every
eval_every steps) and the test accuracy there.

Reproduce (CPU, 8x8 scikit-learn digits, Lenet-300-100 shape, the catalogue's doubled
rates 40% / 20%, 10 rounds to 0.80% density; --plot draws [1] Fig. 1 / 3):
    python generalization/overfit_lottery_ticket.py --preset quick --num-seeds 2 \\
        --plot generalization/overfit_lottery_ticket.png
Paper setting (GPU; MNIST idx files in --data-dir):
    python generalization/overfit_lottery_ticket.py --preset paper --data-dir ~/mnist
[1]'s numbers (Lenet-300-100, MNIST): winning tickets at 51.3%-21.1% of the weights reach
higher test accuracy than the dense net and learn faster; tickets stay at the dense
accuracy down to ~3.6% while random reinitialisation falls off from ~51% ([1] Fig. 3,
Fig. 4); early-stop iteration of the dense net about 10-12K (Fig. 3).
Measured (quick preset, 2 seeds, ~3 min on a loaded 2-core CPU), test accuracy ticket /
reinit / random mask, mean of 2 seeds: 100%: 0.977 / 0.983 / 0.977; 8.3%: 0.983 / 0.980 /
0.977; 3.2%: 0.979 / 0.964 / 0.953; 1.98%: 0.970 / 0.946 / 0.838; 1.25%: 0.952 / 0.896 /
0.505; 0.80%: 0.948 / 0.812 / 0.254 (the catalogue's anchor: 0.934-0.940 / 0.847-0.863 /
0.246-0.297). Early-stop iteration (min validation loss, checked every 100): ticket 250-400
at 60%-22% against 450-750 for reinit ([1]: tickets learn faster); all arms hit the
800-step end below 10%, so there early stopping equals the end of training.

Logged each round (charts/, per arm a of ticket, reinit, random_mask): density_<a> (the
fraction of non-zero prunable weights AFTER training: the mask held), test_acc_<a> (at
the end of the round), early_stop_test_acc_<a> and early_stop_step_<a> (at min
validation loss), train_acc_<a> (end of the round, against the training labels the arm
trained on), losses/train_<a> (mean minibatch loss of the last eval block) and
losses/val_<a> (at the end). Nothing is NaN by design.

Differences from the paper:
- Data: MNIST does not ship offline. The CPU presets use scikit-learn's 1,797 8x8 digits
  (64-d input, not upsampled: the 64-300-100-10 net keeps the Lenet-300-100 hidden
  shape): 1,000 train, 300 validation, 497 test. Inputs standardised per pixel with the
  training statistics (sd < 1e-3 -> 1). MNIST via --data-dir (idx files, [1]: 55K train,
  5K validation, 10K test), same standardisation.
- Optimiser: [1] Fig. 2's Adam 1.2e-3, batch 60, 50K iterations per round. The released
  code's mnist_fc uses SGD 0.1 instead; we follow the paper.
- Pruning count: round(p * surviving) weights (float32, half to even) pruned per layer
  exactly, ties broken by position. The released prune_by_percent prunes |w| <= the
  sorted value at round(p * n), i.e. one weight more (plus ties).
- The random-mask control starts from theta_start (so it differs from the ticket only by
  its mask); [1] does not say which weights its random sparse networks used.
- Initialisation: Glorot normal (flax's, truncated) as in [1]'s "Gaussian Glorot".
- Rewinding [2] captures theta_k in round 0 (the dense run); each later round still trains
  T steps from theta_k (not T - k). The reinit arm has no theta_k: it uses theta_0'.
- --label-corruption p (not in [1]; for the package comparison with Zhang et al. 2017):
  each training label replaced with probability p by a uniform class, once per seed;
  validation (early stopping) and test labels stay true.
- The quick preset doubles [1]'s rates (40% / 20%, 800 steps per round) so that 10 rounds
  reach 0.8%: at [1]'s rates the catalogue saw no ticket/reinit separation on digits
  above 4.8% density (tickets need lower densities on this small problem).
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

ARMS = ("ticket", "reinit", "random_mask")
NUM_CLASSES = 10


# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """IMP on Lenet-300-100; defaults are [1]'s (Fig. 2, Sec. 2) on the digits."""

    dataset: str = "digits"
    """'digits' (scikit-learn's 8x8 digits, in the wheel) or 'mnist' (idx files, --data-dir)"""
    data_dir: str = ""
    """folder holding MNIST's idx files (train-images-idx3-ubyte[.gz], ...)"""
    num_train: int = 1000
    """training images (digits: of the 1,797; mnist: the first of the 60,000)"""
    num_val: int = 300
    """validation images for early stopping, held out after the training images"""
    num_test: int = 497
    """test images (digits: the rest of the 1,797; mnist: the first of the 10,000)"""
    hidden: tuple[int, ...] = (300, 100)
    """hidden widths ([1]: Lenet-300-100)"""
    batch_size: int = 60
    """images per Adam step ([1] Fig. 2: 60)"""
    lr: float = 1.2e-3
    """Adam learning rate ([1] Fig. 2: 1.2e-3)"""
    steps_per_round: int = 50000
    """training iterations per round ([1] Fig. 2: 50K)"""
    num_rounds: int = 20
    """pruning rounds after the dense run (20 at [1]'s rates: 1.2% of the fc weights)"""
    prune_rates: tuple[float, ...] = (0.2, 0.2, 0.1)
    """layer-wise fraction of surviving weights pruned per round, one per layer, output
    last ([1]: 20% fc, 10% output)"""
    pruning: str = "layerwise"
    """'layerwise' (prune_rates per layer, [1]) or 'global' (global_rate over all layers)"""
    global_rate: float = 0.2
    """fraction of all surviving weights pruned per round when pruning='global'"""
    rewind_step: int = 0
    """reset to theta_k after k dense steps instead of theta_0 ([2]); 0: [1]'s reset"""
    eval_every: int = 100
    """steps between validation checks for early stopping ([1]: every 100 iterations)"""
    label_corruption: float = 0.0
    """probability that each training label is replaced by a class drawn uniformly from
    all 10 (Zhang et al. 2017; 1: random labels), drawn once per seed at init; validation
    and test labels stay true"""
    dtype: str = "float32"
    """compute dtype of the dense layers ("bfloat16" on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.num_rounds + 1  # round 0 is the dense run

    @property
    def steps_per_update(self) -> int:
        return self.steps_per_round

    @property
    def input_dim(self) -> int:
        return 64 if self.dataset == "digits" else 784

    def validate(self):
        if self.dataset not in ("digits", "mnist"):
            raise ValueError(f"dataset={self.dataset!r} must be 'digits' or 'mnist'")
        if self.dataset == "mnist" and not self.data_dir:
            raise ValueError("dataset='mnist' needs --data-dir (MNIST's idx files)")
        total = self.num_train + self.num_val
        if self.dataset == "digits" and total + self.num_test > 1797:
            raise ValueError(f"num_train + num_val + num_test = {total + self.num_test} "
                             "exceeds the 1,797 digits")
        if self.batch_size > self.num_train:
            raise ValueError(f"batch_size={self.batch_size} exceeds num_train={self.num_train}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be one or more widths >= 1")
        if len(self.prune_rates) != len(self.hidden) + 1:
            raise ValueError(f"prune_rates={self.prune_rates} needs one rate per layer "
                             f"({len(self.hidden) + 1})")
        for p in (*self.prune_rates, self.global_rate):
            if not 0 <= p < 1:
                raise ValueError(f"prune rate {p} (prune_rates / global_rate) must be in [0, 1)")
        if self.pruning not in ("layerwise", "global"):
            raise ValueError(f"pruning={self.pruning!r} must be 'layerwise' or 'global'")
        if self.eval_every < 1 or self.steps_per_round % self.eval_every:
            raise ValueError(f"eval_every={self.eval_every} must be >= 1 and divide "
                             f"steps_per_round={self.steps_per_round}")
        if not 0 <= self.rewind_step < self.steps_per_round:
            raise ValueError(f"rewind_step={self.rewind_step} must be in [0, steps_per_round)")
        if not 0 <= self.label_corruption <= 1:
            raise ValueError(f"label_corruption={self.label_corruption} must be in [0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo (the catalogue's setting): digits, Adam 1e-3, batch 128, 800 steps per
    # round, 40% / 20% per round, 10 rounds -> 0.80% of the weights.
    "quick": dict(lr=1e-3, batch_size=128, steps_per_round=800, num_rounds=10,
                  prune_rates=(0.4, 0.4, 0.2)),
    # [1] Fig. 2 / 3: MNIST 55K / 5K / 10K, Lenet-300-100, Adam 1.2e-3, batch 60, 50K
    # iterations, 20% / 20% / 10%.
    "paper": dict(dataset="mnist", num_train=55000, num_val=5000, num_test=10000),
}


# --- DATA ---


@functools.cache
def arrays(dataset: str, data_dir: str, num_train: int, num_val: int, num_test: int):
    """(train_x, train_y, val_x, val_y, test_x, test_y), inputs (N, D) float32 standardised
    per pixel by the training images' mean and std (std < 1e-3 -> 1); numpy, cached."""
    if dataset == "digits":
        tr_x, tr_y, te_x, te_y = data.digit_images(8, num_train + num_val)
    else:
        tr_x, tr_y, te_x, te_y = data.load_mnist(data_dir)
        tr_x, te_x = tr_x / np.float32(255), te_x / np.float32(255)
    tr_x, te_x = (x.reshape(len(x), -1).astype(np.float32) for x in (tr_x, te_x))
    if num_train + num_val > len(tr_y) or num_test > len(te_y):
        raise ValueError(f"num_train + num_val / num_test exceed the {len(tr_y)} / "
                         f"{len(te_y)} {dataset} images")
    mean, sd = tr_x[:num_train].mean(0), tr_x[:num_train].std(0)
    sd = np.where(sd < 1e-3, 1.0, sd).astype(np.float32)
    z = lambda x: (x - mean) / sd  # noqa: E731
    return (z(tr_x[:num_train]), tr_y[:num_train].astype(np.int32),
            z(tr_x[num_train:num_train + num_val]),
            tr_y[num_train:num_train + num_val].astype(np.int32),
            z(te_x[:num_test]), te_y[:num_test].astype(np.int32))


def dataset(cfg: Config):
    """The cached arrays as jnp behind an optimisation barrier (no constant folding)."""
    return jax.lax.optimization_barrier(tuple(jnp.asarray(a) for a in arrays(
        cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_val, cfg.num_test)))


def corrupt_labels(key, y, p):
    """Each label replaced, with probability p, by a class drawn uniformly from all
    NUM_CLASSES (so it may stay right by chance; Zhang et al. 2017 Sec. 2)."""
    u_mask, u_class = jax.random.uniform(key, (2, *y.shape))
    new = jnp.minimum(jnp.floor(u_class * NUM_CLASSES), NUM_CLASSES - 1).astype(y.dtype)
    return jnp.where(u_mask < p, new, y)


def train_labels(key, cfg: Config):
    """(n,) the training labels of one seed, fixed at init: the true ones, corrupted with
    probability label_corruption."""
    y = dataset(cfg)[1]
    return corrupt_labels(key, y, cfg.label_corruption).astype(jnp.int32)


# --- NETWORK AND PRUNING ---


class MLP(nn.Module):
    """Lenet-300-100: ReLU hidden layers, linear output, Glorot-normal weights."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.glorot_normal()
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=init, dtype=self.dtype)(x))
        return nn.Dense(NUM_CLASSES, kernel_init=init, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> MLP:
    return MLP(cfg.hidden, jnp.dtype(cfg.dtype))


def layer_names(cfg: Config) -> list[str]:
    return [f"Dense_{i}" for i in range(len(cfg.hidden) + 1)]


def apply_mask(params, masks):
    """Zero the pruned kernel entries; biases pass through (they are not pruned)."""
    return {n: {**p, "kernel": p["kernel"] * masks[n]} for n, p in params.items()}


def keep_top(scores, mask, num_prune):
    """New mask: `mask` with its num_prune surviving entries of the smallest score removed
    (exactly that many; ties broken by position). Pruned entries rank first (score -1)."""
    s = jnp.where(mask > 0, scores, -1.0).ravel()
    rank = jnp.argsort(jnp.argsort(s))
    dead = s.size - mask.sum()
    return (rank >= dead + num_prune).reshape(mask.shape).astype(mask.dtype)


def prune_scores(trained, start):
    """IMP's score: the magnitude of the TRAINED weights ([1] Sec. 2)."""
    return jnp.abs(trained)


def magnitude_masks(kernels, starts, masks, cfg: Config):
    """(IMP) The next masks: layer-wise, round(p_l * surviving_l) of each layer's surviving
    weights with the smallest score pruned; global, round(p * surviving) over all layers."""
    names = list(masks)
    scores = {n: prune_scores(kernels[n], starts[n]) for n in names}
    if cfg.pruning == "layerwise":
        return {n: keep_top(scores[n], masks[n], jnp.round(p * masks[n].sum()))
                for n, p in zip(names, cfg.prune_rates, strict=True)}
    flat = lambda d: jnp.concatenate([d[n].ravel() for n in names])  # noqa: E731
    m = flat(masks)
    new = keep_top(flat(scores), m, jnp.round(cfg.global_rate * m.sum()))
    sizes = np.cumsum([masks[n].size for n in names])[:-1]
    parts = jnp.split(new, sizes)
    return {n: a.reshape(masks[n].shape) for n, a in zip(names, parts, strict=True)}


def random_masks(key, like):
    """Uniformly random masks with exactly the per-layer counts of `like`."""
    keys = jax.random.split(key, len(like))
    return {n: keep_top(jax.random.uniform(k, m.shape), jnp.ones_like(m), m.size - m.sum())
            for k, (n, m) in zip(keys, like.items(), strict=True)}


def density(params, cfg: Config):
    """Fraction of non-zero prunable (kernel) weights."""
    ks = [params[n]["kernel"] for n in layer_names(cfg)]
    return sum((k != 0).sum() for k in ks) / sum(k.size for k in ks)


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # (arms, ...) trained weights of the last round
    start: Any  # (arms, ...) each arm's reset point: theta_start (ticket, random), theta_0'
    masks: Any  # (arms, ...) the masks of the NEXT round (kernels only)
    last: Any  # dict of (arms,) results of the last round (for evaluate)
    round: jax.Array
    key: jax.Array
    train_y: jax.Array  # (n,) training labels (corrupted with prob. label_corruption)


def init(key, cfg: Config) -> State:
    k0, k1, key = jax.random.split(key, 3)
    x = jnp.zeros((1, cfg.input_dim))
    th0, th1 = (network(cfg).init(k, x)["params"] for k in (k0, k1))
    start = jax.tree.map(lambda a, b: jnp.stack([a, b, a]), th0, th1)  # ticket/reinit/random
    masks = {n: jnp.ones((len(ARMS), *th0[n]["kernel"].shape)) for n in layer_names(cfg)}
    zeros = jnp.zeros(len(ARMS))
    last = {k: zeros for k in ("test_acc", "early_stop_test_acc", "early_stop_step",
                               "density", "train_acc")}
    y = train_labels(jax.random.fold_in(key, 1), cfg)  # fold_in: the other draws unchanged
    return State(start, start, masks, last, jnp.zeros((), jnp.int32), key, y)


# --- UPDATE ---


def loss_fn(params, x, y, cfg: Config):
    logits = network(cfg).apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def update(state: State, cfg: Config):
    """One round: train every arm from mask * start, then prune (IMP) and draw the
    controls' masks for the next round."""
    tr_x, _, va_x, va_y, te_x, te_y = dataset(cfg)
    tr_y = state.train_y
    tx = optax.adam(cfg.lr)
    key, k_order, k_rand = jax.random.split(state.key, 3)
    b, t_all, n = cfg.batch_size, cfg.steps_per_round, cfg.num_train
    epochs = -(-t_all * b // n)
    order = jax.vmap(lambda k: jax.random.permutation(k, n))(
        jax.random.split(k_order, epochs)).ravel()[:t_all * b]
    order = order.reshape(t_all // cfg.eval_every, cfg.eval_every, b)
    masks = state.masks
    params = jax.vmap(apply_mask)(state.start, masks)
    opt_state = jax.vmap(tx.init)(params)
    rewinds = (state.round == 0) & (cfg.rewind_step > 0) & jnp.array([True, False, True])

    def step(carry, idx):
        params, opt_state, start, t = carry
        grad_fn = jax.value_and_grad(lambda p: loss_fn(p, tr_x[idx], tr_y[idx], cfg)[0])
        loss, grads = jax.vmap(grad_fn)(params)
        grads = jax.vmap(apply_mask)(grads, masks)  # pruned weights get no gradient
        upd, opt_state = jax.vmap(tx.update)(grads, opt_state, params)
        params = jax.vmap(apply_mask)(optax.apply_updates(params, upd), masks)
        t = t + 1
        take = rewinds & (t == cfg.rewind_step)  # [2]: theta_k of the dense run
        start = jax.tree.map(lambda s, p: jnp.where(
            take.reshape(-1, *[1] * (p.ndim - 1)), p, s), start, params)
        return (params, opt_state, start, t), loss

    def evaluate_arms(params):
        def one(p):
            val_loss, _ = loss_fn(p, va_x, va_y, cfg)
            acc = jnp.mean(jnp.argmax(network(cfg).apply({"params": p}, te_x), -1) == te_y)
            return val_loss, acc
        return jax.vmap(one)(params)

    def block(carry, idx):
        inner, best = carry
        inner, loss = jax.lax.scan(step, inner, idx)
        val_loss, acc = evaluate_arms(inner[0])
        better = val_loss < best[0]
        best = (jnp.where(better, val_loss, best[0]), jnp.where(better, acc, best[1]),
                jnp.where(better, inner[3], best[2]))
        return (inner, best), (loss.mean(0), val_loss, acc)

    inf = jnp.full(len(ARMS), jnp.inf)
    best0 = (inf, jnp.zeros(len(ARMS)), jnp.zeros(len(ARMS), jnp.int32))
    ((params, _, start, _), best), (loss, val_loss, acc) = jax.lax.scan(
        block, ((params, opt_state, state.start, jnp.zeros((), jnp.int32)), best0), order)

    dens = jax.vmap(lambda p: density(p, cfg))(params)
    names = layer_names(cfg)
    kernels = {nm: params[nm]["kernel"][0] for nm in names}
    starts = {nm: start[nm]["kernel"][0] for nm in names}
    ticket = magnitude_masks(kernels, starts, {nm: masks[nm][0] for nm in names}, cfg)
    rand = random_masks(k_rand, ticket)
    new_masks = {nm: jnp.stack([ticket[nm], ticket[nm], rand[nm]]) for nm in names}
    train_acc = jax.vmap(lambda p: jnp.mean(jnp.argmax(
        network(cfg).apply({"params": p}, tr_x), -1) == tr_y))(params)
    last = {"test_acc": acc[-1], "early_stop_test_acc": best[1],
            "early_stop_step": best[2].astype(jnp.float32), "density": dens,
            "train_acc": train_acc}
    state = State(params, start, new_masks, last, state.round + 1, key, tr_y)
    metrics = {}
    for i, a in enumerate(ARMS):
        metrics[f"losses/train_{a}"] = loss[-1, i]
        metrics[f"losses/val_{a}"] = val_loss[-1, i]
        for k, v in last.items():
            metrics[f"charts/{k}_{a}"] = v[i]
    return state, metrics


def evaluate(state: State, cfg: Config):
    """The last round's results per arm (density after training, test accuracy at the end
    and at the early-stop iteration)."""
    return {f"{k}_{a}": v[i] for k, v in state.last.items() for i, a in enumerate(ARMS)}


# --- PLOT ---


def plot(result, cfg: Config, out: str):
    """[1] Fig. 1 / 3: test accuracy (end of training, and at early stopping) and the
    early-stop iteration against the percent of weights remaining; mean +- std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for a, c in zip(ARMS, ("C0", "C1", "C2"), strict=True):
        x = 100 * h["charts/density_ticket"].mean(0)
        keys = ("test_acc", "early_stop_test_acc", "early_stop_step")
        for ax, key in zip(axes, keys, strict=True):
            v = h[f"charts/{key}_{a}"]
            ax.errorbar(x, v.mean(0), v.std(0), marker="o", ms=3, capsize=2, c=c, label=a)
    for ax, lab in zip(axes, ("test accuracy (end of round)", "test accuracy at early stop",
                              "early-stop iteration (min val loss)"), strict=True):
        ax.set(xscale="log", xlabel="percent of weights remaining", ylabel=lab)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"IMP on {cfg.dataset}, MLP {'-'.join(map(str, cfg.hidden))}, rates "
                 f"{cfg.prune_rates if cfg.pruning == 'layerwise' else cfg.global_rate}, "
                 f"{cfg.steps_per_round} steps/round, {h['charts/test_acc_ticket'].shape[0]}"
                 " seed(s)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    doc = __doc__ + "\n`--plot PNG` (an extra flag) draws [1] Fig. 1 / 3 from the run."
    cfg, _ = run.parse(Config, PRESETS, argv, description=doc)
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=doc, summary_keys=[f"{k}_{a}" for a in ARMS for k in (
                       "density", "test_acc", "early_stop_test_acc")])
    if flags["--plot"] is not None:
        print(plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
