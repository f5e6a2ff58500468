"""Learning to learn with an LSTM: the previous label is an input, the learner is the activations.

[1] S. Hochreiter, A. S. Younger, P. R. Conwell. "Learning to Learn Using Gradient Descent."
    ICANN 2001, LNCS 2130, pp. 87-94 (no arXiv id; the full text was not at hand, see below).
[2] A. S. Younger, S. Hochreiter, P. R. Conwell. "Meta-Learning with Backpropagation."
    IJCNN 2001 (the companion paper; its abstract was read).

A meta-learner (the "supervisory" system: BPTT on the weights) trains a recurrent network (the
"subordinate" system) on many sequences, each from its own function f_k. At step i the network
reads the input x_i AND the label of the step before, y_{i-1}, and must predict y_i; the
weights are shared by all functions, so everything it learns about f_k within a sequence
lives in the LSTM's hidden state, reset when a new function (sequence) starts:

    f_k(x) = a x1^2 + b x2^2 + c x1 x2 + d x1 + e x2 + f,  a..f ~ U[-1, 1]     [1] via the post
    x_i ~ U[-1, 1]^2,  y_i = f_k(x_i),  y_0 = 0                                 [M: x range]
    u_i = (x_i, y_{i-1})                                 [1] Fig. 1 (reproduced in the post)
    (h_i, c_i) = LSTM(u_i, (h_{i-1}, c_{i-1})),  (h_0, c_0) = 0 per sequence    the post
    yhat_i = w' h_i + b
    L = 1/(K N) sum_k sum_i (yhat_i - y_i)^2    (K functions per update, N steps each)
    theta <- theta - Adam(grad_theta L)  (BPTT through the whole sequence)

With nothing seen, the best guess is 0 (E[f] = 0) with error E[f^2] = (1/3)(1/5 + 1/5 + 1/9
+ 1/3 + 1/3 + 1) = 0.726; the learned learner's error falls along the sequence as it infers
f_k ([1]: "approximate[s] the function after seeing only ~35 examples", quoted by the post;
[2]'s abstract: "after only 30 training examples"). evaluate() measures that curve on
`eval_functions` held-out functions (`eval/mse_curve`, one value per position), its early
(positions 1-3) and late (`late_from`..N) means and their ratio, the number of examples seen
before the error stays below `fit_fraction` of its first-position value
(`eval/examples_to_fit`, the knee), and the same curve for the linear minimum-mean-squared
error learner that knows the function family (the 6 monomials, coefficient variance 1/3):
exact (to 1e-3) once 7 examples are seen, a reference for how far the learned learner is
from ideal.

`--ablation` gives the two broken variants ([1]'s argument for its design): `zero_label`
feeds y_{i-1} = 0 (nothing tells the network what f_k is: the curve stays flat at 0.726) and
`reset_each_step` resets (h, c) at every step (no memory: flat too). Both are traced
numbers in the state (`State.feed_label`, `State.keep_state`), so a test runs all three arms
in one compiled program.

Reproduce (CPU demo, N = 50, LSTM 64, 2 seeds; the two broken variants, then the learner with
the plot of all three; `--plot PNG` and `--compare DIR1,DIR2` are this file's extra flags):
    python metarl/hochreiter_l2l.py --preset quick --num-seeds 2 --ablation zero_label \
        --run-dir runs/l2l_zero
    python metarl/hochreiter_l2l.py --preset quick --num-seeds 2 --ablation reset_each_step \
        --run-dir runs/l2l_reset
    python metarl/hochreiter_l2l.py --preset quick --num-seeds 2 --plot metarl/hochreiter_l2l.png \
        --compare runs/l2l_zero,runs/l2l_reset
Ours (quick: 256k functions in 4000 updates of 64, 2 seeds; loaded 2-core CPU, about 4 min
per run: 5 s compile + 241 s), squared error on 2000 new quadratics at positions
1 / 2 / 4 / 11 / 21 / 36 / 50 (mean of the seeds):
    learner                 0.760 / 0.432 / 0.248 / 0.075 / 0.023 / 0.0096 / 0.0071
    y_{i-1} zeroed          0.760 / 0.733 / 0.726 / 0.715 / 0.733 / 0.721 / 0.749
    state reset every step  0.761 / 0.475 / 0.484 / 0.476 / 0.487 / 0.496 / 0.511
    least squares (ideal)   0.759 / 0.426 / 0.193 / 0 (below 1e-3 from position 8)
Positions 36-50 over positions 1-3: learner 0.0148 and 0.0156 (the catalogue's gate: < 0.2),
zeroed 0.979 and 0.975, reset 0.849 and 0.837; the learner's error stays below 5% of its
first-position error after 15 and 17 examples (the knee; the broken variants never get
there). [1] via the post: "~35 examples"; [2]'s abstract: 30.
Paper-sized run (GPU; N = 100, LSTM 256, 10M functions): `--preset paper` (traced on CPU,
not yet run).

Differences from the paper:
- The full text of [1] was not found (only the post's summary and the abstracts of [1] and
  [2]); its sequence length, LSTM size, learning rate, number of training sequences and
  exact error criterion for "~35 examples" are not known to us: the defaults here are ours,
  sized for a CPU demo (`quick`) and a GPU run (`paper`). The input range U[-1, 1]^2 is [M].
- The LSTM is flax's LSTMCell (forget gate, no peepholes) with Adam and a gradient-norm clip;
  [1] used the LSTM of its day and plain gradient descent [M]. [1] may also have run the
  functions back to back in one stream without telling the network when f_k changes [M]
  (a 2018 follow-up's abstract, scholarsmine.mst.edu 4826, introduces an error that does
  not penalise "transitions to learning a new task"); here each function is its own
  sequence and the state is reset between them, as the post describes.
- The knee is defined here (error stays below `fit_fraction` = 5% of the first-position
  error); [1]'s "~35 examples" comes from its own plot or criterion, so our 15-17 is not
  a like-for-like comparison (and our LSTM, optimiser and training length differ).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run

ABLATIONS = ("none", "zero_label", "reset_each_step")
COEF_VAR = 1.0 / 3.0  # variance of U[-1, 1]: a..f ~ U[-1, 1] ([1] via the post)

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """A learned learner of 2-D quadratic functions ([1]'s quadratic experiment)."""

    seq_len: int = 100
    """N: examples (x_i, y_i) of one function in a sequence"""
    hidden: int = 256
    """LSTM units"""
    batch_size: int = 128
    """K: functions (sequences) per update"""
    num_functions: int = 10_000_000
    """training functions in the whole run (num_updates = num_functions // batch_size)"""
    lr: float = 1e-3
    """Adam learning rate"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    ablation: str = "none"
    """broken variants: none, zero_label (y_{i-1} fed as 0) or reset_each_step (LSTM state
    reset at every step)"""
    eval_functions: int = 2000
    """evaluate(): held-out functions scored position by position"""
    late_from: int = 36
    """evaluate(): first position (1-based) of the late window (after the paper's ~35
    examples), compared with positions 1-3"""
    fit_fraction: float = 0.05
    """evaluate(): the knee is the number of examples after which the error stays below this
    fraction of its first-position error"""
    dtype: str = "float32"
    """compute dtype of the LSTM and the head: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_functions // self.batch_size

    @property
    def steps_per_update(self) -> int:
        """examples seen per update"""
        return self.batch_size * self.seq_len

    def validate(self):
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation={self.ablation!r} must be one of {', '.join(ABLATIONS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if self.seq_len < 4:
            raise ValueError(
                f"--seq-len must be >= 4 (positions 1-3 are the early window), got {self.seq_len}"
            )
        if not 4 <= self.late_from <= self.seq_len:
            raise ValueError(
                f"--late-from must be in [4, seq_len={self.seq_len}], got {self.late_from}"
            )
        if self.num_functions < self.batch_size:
            raise ValueError(
                f"--num-functions ({self.num_functions}) must be >= --batch-size "
                f"({self.batch_size}): at least one update"
            )
        if not 0 < self.fit_fraction <= 1:
            raise ValueError(f"--fit-fraction must be in (0, 1], got {self.fit_fraction}")
        if self.max_grad_norm <= 0:  # 0 would zero every update
            raise ValueError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")


PRESETS = {
    # CPU demo (minutes on 2 cores): N = 50 as in the catalogue's test, a smaller LSTM.
    "quick": dict(seq_len=50, hidden=64, batch_size=64, num_functions=256_000, lr=3e-3),
    "paper": dict(),
}


# --- TASKS ---


def features(x):
    """phi(x) = (x1^2, x2^2, x1 x2, x1, x2, 1) for x [..., 2]: [..., 6]."""
    x1, x2 = x[..., 0], x[..., 1]
    return jnp.stack([x1 * x1, x2 * x2, x1 * x2, x1, x2, jnp.ones_like(x1)], -1)


def sample_sequences(key, k: int, n: int):
    """k functions with n examples each: x [k, n, 2], y [k, n] with y = phi(x) . (a..f)."""
    k_c, k_x = jax.random.split(key)
    coef = jax.random.uniform(k_c, (k, 6), minval=-1.0, maxval=1.0)  # a..f ~ U[-1, 1]
    x = jax.random.uniform(k_x, (k * n * 2,), minval=-1.0, maxval=1.0).reshape(k, n, 2)
    return x, jnp.einsum("knf,kf->kn", features(x), coef)


def learner_inputs(x, y, feed_label):
    """u_i = (x_i, y_{i-1}) with y_0 = 0 ([1] Fig. 1), time-major: [n, k, 3]. `feed_label` = 0
    is the broken variant that zeroes y_{i-1}."""
    y_prev = jnp.pad(y, ((0, 0), (1, 0)))[:, :-1] * feed_label  # [k, n]
    u = jnp.concatenate([x, y_prev[..., None]], -1)  # [k, n, 3]
    return jnp.swapaxes(u, 0, 1)  # [n, k, 3]


# --- NETWORKS ---


class Step(nn.Module):
    """One step: (h, c) <- LSTM(u_i, keep * (h, c)); keep = 0 resets the state every step
    (the broken variant), keep = 1 carries it through the sequence."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, u, keep):
        carry = jax.tree.map(lambda c: c * keep, carry)
        carry, h = nn.LSTMCell(self.hidden, dtype=self.dtype, param_dtype=jnp.float32)(carry, u)
        return jax.tree.map(lambda c: c.astype(jnp.float32), carry), h  # (h, c) kept float32


class Learner(nn.Module):
    """u [n, k, 3] -> yhat [n, k]: an LSTM over the sequence from (h_0, c_0) = 0, then a linear
    read-out of h_i."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, u, keep):
        scan = nn.scan(
            Step,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast),
            out_axes=0,
        )
        zeros = jnp.zeros((u.shape[1], self.hidden), jnp.float32)
        _, h = scan(self.hidden, self.dtype)((zeros, zeros), u.astype(self.dtype), keep)
        return nn.Dense(1, dtype=self.dtype)(h)[..., 0].astype(jnp.float32)  # [n, k]


def network(cfg: Config) -> Learner:
    return Learner(cfg.hidden, jnp.dtype(cfg.dtype))


# --- LOSS ---


def position_errors(net, params, x, y, feed_label, keep_state):
    """Squared error of yhat_i, averaged over the k functions: [n] (position i = index i-1)."""
    yhat = net.apply(params, learner_inputs(x, y, feed_label), keep_state)  # [n, k]
    return jnp.mean((yhat - y.T) ** 2, 1)


def ridge_errors(x, y, prior_var: float = COEF_VAR, jitter: float = 1e-5):
    """The reference learner: at position i, the linear minimum-mean-squared-error estimate of
    (a..f) from the i-1 examples before it (prior mean 0, variance prior_var each, `jitter`
    as a tiny noise variance for a stable solve), then its squared error on y_i: [n]."""
    phi = features(x)  # [k, n, 6]

    def before(a):  # exclusive cumulative sum over positions: sum over j < i, 0 at i = 1
        return jnp.pad(jnp.cumsum(a, 1)[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (a.ndim - 2))

    gram = before(jnp.einsum("kni,knj->knij", phi, phi))  # sum over j < i: [k, n, 6, 6]
    rhs = before(phi * y[..., None])  # [k, n, 6]
    eye = jnp.eye(6) * (jitter / prior_var)
    w = jnp.linalg.solve(gram + eye, rhs[..., None])[..., 0]  # posterior mean [k, n, 6]
    return jnp.mean((jnp.sum(phi * w, -1) - y) ** 2, 0)


def window_means(curve, late_from: int):
    """(mean over positions 1-3, mean over positions late_from..n) of an error curve [n]."""
    return curve[:3].mean(), curve[late_from - 1 :].mean()


def examples_to_fit(curve, fit_fraction: float):
    """Examples seen before the first position from which the error stays below fit_fraction
    of the first-position error (n when it never does)."""
    below = curve < fit_fraction * curve[0]
    stays = jnp.cumprod(below[::-1])[::-1]  # 1 from the knee on
    return (curve.shape[0] - stays.sum()).astype(jnp.float32)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    key: jax.Array
    feed_label: jax.Array  # 1.0, or 0.0 for the zero_label ablation
    keep_state: jax.Array  # 1.0, or 0.0 for the reset_each_step ablation


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = network(cfg).init(k_net, jnp.zeros((cfg.seq_len, 1, 3)), jnp.float32(1.0))
    feed = jnp.float32(0.0 if cfg.ablation == "zero_label" else 1.0)
    keep = jnp.float32(0.0 if cfg.ablation == "reset_each_step" else 1.0)
    return State(params, make_optimizer(cfg).init(params), key, feed, keep)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net = network(cfg)
    key, k_data = jax.random.split(state.key)
    x, y = sample_sequences(k_data, cfg.batch_size, cfg.seq_len)

    def loss_fn(params):
        curve = position_errors(net, params, x, y, state.feed_label, state.keep_state)
        return curve.mean(), curve  # L: mean over functions and positions

    (loss, curve), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(cfg).update(g, state.opt_state, state.params)
    early, late = window_means(curve, cfg.late_from)
    metrics = {
        "losses/mse": loss,
        "losses/mse_early": early,
        "losses/mse_late": late,
        "losses/grad_norm": optax.tree.norm(g),
    }
    return state.replace(
        params=optax.apply_updates(state.params, updates), opt_state=opt_state, key=key
    ), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """Error per position on `eval_functions` new functions (the state's own ablation), the
    early and late windows and their ratio, the knee, and the reference learner's curve."""
    x, y = sample_sequences(jax.random.fold_in(state.key, 1), cfg.eval_functions, cfg.seq_len)
    curve = position_errors(network(cfg), state.params, x, y, state.feed_label, state.keep_state)
    early, late = window_means(curve, cfg.late_from)
    return {
        "eval/mse_curve": curve,
        "eval/ridge_curve": ridge_errors(x, y),
        "eval/mse_early": early,
        "eval/mse_late": late,
        "eval/late_over_early": late / early,
        "eval/examples_to_fit": examples_to_fit(curve, cfg.fit_fraction),
    }


# --- PLOT ---

LABELS = {
    "none": "LSTM learner (x_i, y_{i-1})",
    "zero_label": "broken: y_{i-1} zeroed",
    "reset_each_step": "broken: state reset every step",
}


def plot_curves(curves, ridge, out: str):
    """Error against position in the sequence: one line per (per-seed curves [seeds, n], label)
    (mean over seeds, band from the best to the worst seed), and the reference learner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for y, label in curves:
        y = np.atleast_2d(np.asarray(y, np.float64))
        pos = np.arange(1, y.shape[1] + 1)
        ax.plot(pos, y.mean(0), label=f"{label} ({y.shape[0]} seeds)")
        ax.fill_between(pos, y.min(0), y.max(0), alpha=0.2)
    ridge = np.atleast_2d(np.asarray(ridge, np.float64)).mean(0)
    ax.plot(
        np.arange(1, ridge.size + 1),
        np.maximum(ridge, 1e-4),
        "k:",
        label="least squares knowing the 6 monomials",
    )
    ax.set_xlabel("position i in the sequence (i - 1 examples of f seen)")
    ax.set_ylabel("squared error on new quadratics")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 2.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    from PIL import Image

    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    return out


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (this run's error curve) and `--compare DIR1,DIR2`
    (the curves of earlier runs, read from their summary.json)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[
            "eval/mse_early",
            "eval/mse_late",
            "eval/late_over_early",
            "eval/examples_to_fit",
            "losses/mse",
        ],
    )
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        curves = [(res.final["eval/mse_curve"], LABELS[cfg.ablation])]
        for d in (flags["--compare"] or "").split(","):
            if d:
                summary = json.loads((Path(d) / "summary.json").read_text())
                record = json.loads((Path(d) / "config.json").read_text())
                curves.append((summary["eval/mse_curve"], LABELS[record["config"]["ablation"]]))
        print("wrote", plot_curves(curves, res.final["eval/ridge_curve"], flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
