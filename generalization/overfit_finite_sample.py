"""Finite-sample expressivity: a two-layer ReLU network with 2n + d weights represents ANY
function on a sample of n points in d dimensions (Zhang et al. 2017, Theorem 1), built by
the paper's construction and checked in float64; float32 breaks as n grows.

[1] C. Zhang, S. Bengio, M. Hardt, B. Recht, O. Vinyals. "Understanding deep learning
    requires rethinking generalization." ICLR 2017, arXiv:1611.03530, Sec. 4 (Theorem 1)
    and its proof in the appendix (Lemma 1).
[2] L. Weng. "Are Deep Neural Networks Dramatically Overfitted?" (Lil'Log, 2019), section
    "Proof: Finite Sample Expressivity of Two-layer NN".

The network ([1] Thm 1; [2] writes the same with x for z, v for w, W = w 1^T):
    c(z) = sum_{j=1}^n w_j max(<a, z> - b_j, 0),   a in R^d, b, w in R^n: 2n + d weights
Construction, for a sample z_1..z_n (distinct) and ANY targets y in R^n ([1] proof of Thm 1):
    x_i = <a, z_i>  with a random direction a (distinct x_i almost surely), sorted;
    b_1 < x_1 < b_2 < x_2 < ... < b_n < x_n   (interleaved biases)                  [1] Lemma 1
        here b_i = x_i - t (x_i - x_{i-1}), t = bias_position in (0, 1] (t = 1/2: midpoints;
        x_0 := x_1 - (x_2 - x_1)); t in (0, 1) interleaves strictly, t = 1 is the boundary
        case b_i = x_{i-1} (A stays lower triangular: max(x_{i-1} - b_i, 0) = 0)
    A = [max(x_i - b_j, 0)]_{ij}  is lower triangular (x_i < b_j for j > i) with diagonal
        x_i - b_i > 0, so it has full rank and its smallest eigenvalue is min_i (x_i - b_i)
                                                                                    [1] Lemma 1
    y = A w  (c(z_i) = (A w)_i): solve the triangular system for w                  [1] Thm 1
([2] writes v M = y; with rows = points as defined there it is M v = y, as here.)

What this file checks, per sample size n of a sweep (one `update` each; all labellings of a
size are the right-hand sides of one triangular solve, and the runner vmaps seeds, which
redraw the points (or the digit subset), the direction a and the labellings):
- every labelling is represented exactly in float64: `num_labellings` random real targets
  y ~ N(0, 1), as many random class labels y ~ U{0..K-1} (the network's scalar output IS
  the label), and on digits the true labels; error = max_i |c(z_i) - y_i| / max_i |y_i|,
  the network evaluated from its weights (a, b, w) on the points in their original order;
- the weight count 2n + d and the lemma's quantities (the smallest eigenvalue min_i
  (x_i - b_i), the largest entry above the diagonal, which is 0 when b interleaves);
- the infinity-norm condition number of A, kappa = ||A||_inf ||A^-1||_inf (A^-1 by a
  triangular solve against the identity, float64; only when max n <= cond_max_points);
- the same construction run end to end in float32 (projections, sorting, biases, solve,
  forward pass): its error grows with n until ties among the float32 projections (the
  distinctness the theorem needs) or the conditioning break it.
The broken control: bias_position outside (0, 1]. t <= 0 puts b_i at or after x_i: a zero
diagonal, A is singular and the solve returns inf/NaN; t > 1 puts b_i below x_{i-1}: A is
no longer lower triangular, the triangular solve ignores its upper part, the fit fails.

Reproduce (CPU; --plot draws the errors of float64 and float32 and kappa against n):
    python generalization/overfit_finite_sample.py --preset quick --num-seeds 3 \\
        --plot generalization/overfit_finite_sample.png
    python generalization/overfit_finite_sample.py --preset quick_gaussian --num-seeds 3
    python generalization/overfit_finite_sample.py --preset quick --bias-position 1.5  # fails
Paper scale (n = 50,000 points in d = 3072, CIFAR-10's training set size; Gaussian points):
    python generalization/overfit_finite_sample.py --preset paper
[1] states the theorem without numbers (its point: CIFAR-10's n = 50,000 and d = 3072 need
only 2n + d = 103,072 weights). The catalogue's numbers (digits, N(0,1) targets, float64,
2-norm condition numbers): max error 1.4e-10 / 3.5e-8 / 5.6e-6 at n = 100 / 500 / 1000,
cond 3.3e7 / 3.7e9 / 6.9e11.
Measured (`--preset quick --num-seeds 3`, digits, 8 labellings of each kind, seed means;
2-core CPU shared with other jobs, ~1 min): float64 relative error, real / class / true
labels: 2e-14 (n = 10), 2e-12 / 6e-11 / 9e-13 (n = 100), 1.3e-8 / 8.1e-7 / 3.1e-9
(n = 1000), 4.4e-8 / 1.1e-6 / 1.2e-8 (all 1797 digits); every class label reproduced.
kappa_inf(A): 1.1e4 (n = 10), 3.5e7 (100), 8.3e10 (1000), 4.8e11 (1797). float32 (same
construction): 8.7e-5 (n = 10), 0.19 (n = 100), 15 (n = 200), 1.1e4 (n = 1797); rounded
class labels right 99.0% at n = 100, 65% at 200, 11% (chance) at 1797; no float32 ties on
digits: the conditioning, not distinctness, breaks it. exact_n64 = 1797 (tolerance 1e-5),
exact_n32 = 0. The `paper` preset (n = 50,000, d = 3072) is traced in the tests, not run
(A is 20 GB in float64; no GPU in this session). One update compiled for the CPU (XLA's
memory analysis, one seed): 37.3 GiB of temporaries and 1.1 GiB of arguments.

Logged per update (one n): charts/num_points (n), charts/num_params (2n + d),
losses/err64_<kind> and losses/err32_<kind> for kind in real, classes (and labels on
digits): the largest relative error over the labellings of that kind, in float64 and in
float32 (a solve that overflowed counts as FAILED = 1e30: never NaN);
charts/label_acc64, charts/label_acc32: the share of (point, class labelling) pairs whose
rounded output is the label; charts/min_eigenvalue (min_i x_i - b_i, float64),
charts/min_gap (min_i x_i - x_{i-1}), charts/upper_max (largest |A_ij|, j > i: 0 when
interleaved), charts/ties32 (adjacent float32 projections that are equal: the points are
not distinct in float32), charts/cond_inf (kappa, only when max n <= cond_max_points).
`evaluate`: max_err64 and max_err32 (over the sweep and kinds), exact_n64 and exact_n32
(the largest n of the sweep up to which every error is below `tolerance`; 0 if none).

Differences from the paper:
- [1] only requires b interleaved; the midpoint rule (t = 1/2) and x_0 := x_1 - (x_2 - x_1)
  for b_1 are this file's choice. The direction a is a random unit vector ([1]: any a
  giving distinct projections).
- Lemma 1's statement is from memory of [1]'s appendix (the page was not reachable here);
  its content (lower triangular, diagonal x_i - b_i > 0) is checked by the tests.
- kappa is the infinity-norm condition number (exact, one triangular inverse), not the
  2-norm one of the catalogue (it needs an SVD); they agree within a factor n.
- No `dtype` flag: the low-precision track is float32 by construction, and XLA's
  triangular solve has no bfloat16 kernel (bfloat16's 8 mantissa bits would not keep 1000
  projections distinct anyway).
- Shapes are static: every n of the sweep is padded to the largest, the padded points and
  units masked (their rows and columns of A are the identity, their targets 0), so the
  sweep is one compiled program. Sizes above a few 10^4 need a GPU (A is n^2 float64).
"""

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run
from common.plot import save_png

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Theorem 1 of [1]; defaults are the paper's scale (CIFAR-10's n and d)."""

    dataset: str = "gaussian"
    """gaussian (points z ~ N(0, I_d)) or digits (scikit-learn's 1797 8x8 digits, pixels in
    [0, 1], d = 64; a random subset per seed)"""
    num_points: tuple[int, ...] = (50_000,)
    """the sample sizes n of the sweep, increasing (one update each; n >= 2)"""
    input_dim: int = 3072
    """d of the gaussian points (digits: 64)"""
    num_labellings: int = 4
    """random labellings of each kind (real N(0,1) targets; random class labels) per n"""
    num_classes: int = 10
    """K of the random class labels y ~ U{0..K-1}"""
    bias_position: float = 0.5
    """t in b_i = x_i - t (x_i - x_{i-1}); (0, 1] interleaves ([1] Lemma 1); other values
    are the broken control (t <= 0: singular; t > 1: A not lower triangular)"""
    cond_max_points: int = 4000
    """compute kappa(A) (an n^3 triangular inverse) only when max n <= this"""
    tolerance: float = 1e-5
    """relative error below which a labelling counts as represented exactly (evaluate)"""

    @property
    def num_updates(self) -> int:
        return len(self.num_points)

    @property
    def dim(self) -> int:
        return 64 if self.dataset == "digits" else self.input_dim

    @property
    def with_cond(self) -> bool:
        return max(self.num_points) <= self.cond_max_points

    def validate(self):
        if self.dataset not in ("gaussian", "digits"):
            raise ValueError(f"dataset must be gaussian or digits, got {self.dataset!r}")
        n = self.num_points
        if not n or min(n) < 2 or any(b <= a for a, b in zip(n[:-1], n[1:], strict=True)):
            raise ValueError(f"num_points must be increasing integers >= 2, got {n}")
        if self.dataset == "digits" and max(n) > NUM_DIGITS:
            raise ValueError(f"num_points: digits has {NUM_DIGITS} points, got {max(n)}")
        if self.input_dim < 1 or self.num_labellings < 1 or self.num_classes < 2:
            raise ValueError(f"input_dim >= 1, num_labellings >= 1, num_classes >= 2; got "
                             f"{self.input_dim}, {self.num_labellings}, {self.num_classes}")
        if self.cond_max_points < 0:
            raise ValueError(f"cond_max_points must be >= 0, got {self.cond_max_points}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        # bias_position is left unchecked on purpose: outside (0, 1] is the broken control.


PRESETS = {
    # CPU: digits, n from 10 to all 1797 images (kappa included), 3 seeds in ~1 min.
    "quick": dict(dataset="digits", num_points=(10, 30, 100, 200, 300, 500, 700, 1000,
                                                1400, 1797), num_labellings=8),
    # CPU: Gaussian points in d = 64, up to n = 3000.
    "quick_gaussian": dict(num_points=(10, 30, 100, 300, 1000, 2000, 3000), input_dim=64,
                           num_labellings=8),
    # GPU: CIFAR-10's size, n = 50,000 points in d = 3072 (A alone is 20 GB in float64).
    "paper": dict(),
}

# --- DATA ---

NUM_DIGITS = 1797
FAILED = 1e30
"""the relative error logged when a solve overflowed (inf or NaN)"""


def digit_points() -> np.ndarray:
    """All 1797 scikit-learn digits as (1797, 64) pixels in [0, 1] (distinct images)."""
    from common import data

    xtr, _, xte, _ = data.digit_images(size=8, num_train=NUM_DIGITS - 1, seed=0)
    return np.concatenate([xtr, xte]).reshape(NUM_DIGITS, 64)


def digit_labels() -> np.ndarray:
    from common import data

    _, ytr, _, yte = data.digit_images(size=8, num_train=NUM_DIGITS - 1, seed=0)
    return np.concatenate([ytr, yte])


# --- CONSTRUCTION ---


def interleaved_biases(xs, t):
    """b_i = x_i - t (x_i - x_{i-1}) for sorted x (x_0 := x_1 - (x_2 - x_1)): with t in
    (0, 1], b_1 < x_1 < b_2 < x_2 < ... < b_n < x_n   [1] Lemma 1."""
    gap = jnp.diff(xs, prepend=2 * xs[0] - xs[1])  # (n,)
    return xs - t * gap


def relu_matrix(xs, b):
    """A_ij = max(x_i - b_j, 0)   [1] Lemma 1 (lower triangular when b interleaves x)."""
    return jnp.maximum(xs[:, None] - b[None, :], 0.0)  # (n, n)


@jax.custom_batching.sequential_vmap
def solve_lower(m, y):
    """w = A^-1 y for lower-triangular A (forward substitution; LAPACK trsm). y (n, L).
    Under vmap it loops over the batch (no batched LAPACK call: see overfit_double_descent)."""
    return jax.scipy.linalg.solve_triangular(m, y, lower=True)


def network(params, z):
    """c(z) = sum_j w_j max(<a, z> - b_j, 0)   [1] Thm 1; `unit` masks padded units.
    z (m, d) -> (m, L): one output per labelling (each labelling has its own w)."""
    a, b, w, unit = params
    hidden = jnp.maximum((z @ a)[:, None] - b[None, :], 0.0) * unit  # (m, n)
    return hidden @ w  # (m, L)


def num_weights(n, d):
    """a (d) + b (n) + w (n): 2n + d   [1] Thm 1."""
    return 2 * n + d


def construct(z, y, a, active, t, dtype):
    """[1]'s construction in `dtype` for the active points (the first n; the rest padding):
    returns the weights (a, b, w, unit mask), A and the sorted projections."""
    z, y, a = z.astype(dtype), y.astype(dtype), a.astype(dtype)
    x = z @ a  # x_i = <a, z_i>
    order = jnp.argsort(jnp.where(active, x, jnp.inf))  # active points first, ascending
    xs, act = x[order], active[order]
    b = interleaved_biases(xs, jnp.asarray(t, dtype))
    both = act[:, None] & act[None, :]
    m = jnp.where(both, relu_matrix(xs, b), jnp.eye(len(xs), dtype=dtype))  # padding: I
    w = solve_lower(m, y[order] * act[:, None])  # Thm 1: A w = y
    return (a, b, w, act.astype(dtype)), m, xs, act


def rel_errors(out, y, active):
    """max_i |c(z_i) - y_i| / max_i |y_i| over the active points, per labelling (column);
    a non-finite solution counts as FAILED."""
    err = jnp.max(jnp.where(active[:, None], jnp.abs(out - y), 0.0), 0)
    err = err / jnp.max(jnp.where(active[:, None], jnp.abs(y), 0.0), 0)
    return jnp.where(jnp.isfinite(err), err, FAILED)


def cond_inf(m, act):
    """kappa_inf(A) = ||A||_inf ||A^-1||_inf of the active block (block-diagonal padding:
    the active block of the padded inverse is A^-1)."""
    inv = solve_lower(m, jnp.eye(len(m), dtype=m.dtype))
    norm = lambda x: jnp.max(jnp.sum(jnp.abs(x) * act[None, :], 1) * act)  # noqa: E731
    return norm(m) * norm(inv)


# --- UPDATE ---


@struct.dataclass
class State:
    key: jax.Array
    step: jax.Array
    z: jax.Array  # (n_max, d) the points, float64
    a: jax.Array  # (d,) the projection direction, unit norm
    y: jax.Array  # (n_max, num_kinds * L) the labellings, grouped by kind
    err64: jax.Array  # (num_updates,) worst float64 error at each n so far
    err32: jax.Array


def kinds(cfg: Config) -> tuple[str, ...]:
    return ("real", "classes") + (("labels",) if cfg.dataset == "digits" else ())


def init(key, cfg: Config) -> State:
    nmax, d, L = max(cfg.num_points), cfg.dim, cfg.num_labellings
    kz, ka, ky, kc, key = jax.random.split(key, 5)
    if cfg.dataset == "digits":
        pick = jax.random.permutation(kz, NUM_DIGITS)[:nmax]
        z = jnp.asarray(digit_points(), jnp.float64)[pick]
        true = jnp.asarray(digit_labels(), jnp.float64)[pick][:, None]
    else:
        z = jax.random.normal(kz, (nmax, d), jnp.float64)
        true = jnp.zeros((nmax, 0), jnp.float64)
    a = jax.random.normal(ka, (d,), jnp.float64)
    y = jnp.concatenate([jax.random.normal(ky, (nmax, L), jnp.float64),
                         jax.random.randint(kc, (nmax, L), 0, cfg.num_classes).astype(
                             jnp.float64), true], 1)
    zeros = jnp.zeros(cfg.num_updates, jnp.float64)
    return State(key, jnp.array(0), z, a / jnp.linalg.norm(a), y, zeros, zeros)


def update(state: State, cfg: Config):
    """The construction at sample size n = num_points[step], in float64 and in float32."""
    n = jnp.asarray(cfg.num_points)[state.step]
    active = jnp.arange(state.z.shape[0]) < n
    L = cfg.num_labellings
    metrics = {"charts/num_points": n, "charts/num_params": num_weights(n, cfg.dim)}
    worst = {}
    for name, dtype in (("64", jnp.float64), ("32", jnp.float32)):
        params, m, xs, act = construct(state.z, state.y, state.a, active,
                                       cfg.bias_position, dtype)
        out = network(params, state.z.astype(dtype))  # the network on the original points
        err = rel_errors(out.astype(jnp.float64), state.y, active)
        for i, kind in enumerate(kinds(cfg)):
            metrics[f"losses/err{name}_{kind}"] = jnp.max(err[i * L:(i + 1) * L])
        worst[name] = jnp.max(err)
        cls = slice(L, 2 * L)
        hit = (jnp.round(out[:, cls]) == state.y[:, cls]) & active[:, None]
        metrics[f"charts/label_acc{name}"] = jnp.sum(hit) / (n * L)
        if name == "64":
            diag = jnp.where(act, jnp.diag(m), jnp.inf)
            gaps = jnp.where(act[1:], jnp.diff(xs), jnp.inf)
            metrics["charts/min_eigenvalue"] = jnp.min(diag)  # Lemma 1: min_i x_i - b_i
            metrics["charts/min_gap"] = jnp.min(gaps)
            metrics["charts/upper_max"] = jnp.max(jnp.abs(jnp.triu(m, 1)))
            if cfg.with_cond:
                metrics["charts/cond_inf"] = cond_inf(m, act.astype(m.dtype))
        else:
            metrics["charts/ties32"] = jnp.sum((jnp.diff(xs) == 0) & act[1:])
    metrics = {k: jnp.asarray(v, jnp.float64) for k, v in metrics.items()}
    state = state.replace(step=state.step + 1,
                          err64=state.err64.at[state.step].set(worst["64"]),
                          err32=state.err32.at[state.step].set(worst["32"]))
    return state, metrics


def evaluate(state: State, cfg: Config):
    """The worst errors over the sweep, and the largest n up to which all are exact."""
    ns = jnp.asarray(cfg.num_points, jnp.float64)

    def exact_n(err):
        ok = jnp.cumprod(err < cfg.tolerance)  # exact at every n so far
        return jnp.max(jnp.where(ok > 0, ns, 0.0))

    return {"max_err64": jnp.max(state.err64), "max_err32": jnp.max(state.err32),
            "exact_n64": exact_n(state.err64), "exact_n32": exact_n(state.err32)}


# --- PLOT ---


def plot_sweep(run_dir, out):
    """Relative error of the float64 and float32 constructions against n (log-log), and
    kappa(A) where logged, from a run's metrics.jsonl (band: min-max over seeds)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    n = plot.curve(rows, "charts/num_points")[1].mean(1)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [k for k in rows[0] if k.startswith("losses/err") and not k.endswith("/seeds")]
    colours = {"real": "C0", "classes": "C1", "labels": "C2"}
    for k in sorted(names):
        y = plot.curve(rows, k)[1]
        y = np.clip(np.where(y >= FAILED, np.nan, y), 1e-16, None)  # 0 drawn at 1e-16
        kind, ls = k.split("_")[-1], "-" if "err64" in k else "--"
        ax.plot(n, np.nanmean(y, 1), ls, c=colours[kind], marker="o", ms=3,
                label=k.split("/")[1])
        ax.fill_between(n, np.nanmin(y, 1), np.nanmax(y, 1), color=colours[kind], alpha=0.15)
    ax.axhline(c["tolerance"], c="grey", lw=0.8, ls=":", label="tolerance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sample size n (weights 2n + d)")
    ax.set_ylabel("max relative error |c(z_i) - y_i| / max|y|")
    if "charts/cond_inf" in rows[0]:
        ax2 = ax.twinx()
        kappa = plot.curve(rows, "charts/cond_inf")[1]
        ax2.plot(n, kappa.mean(1), "k-.", lw=1, label="kappa_inf(A)")
        ax2.set_yscale("log")
        ax2.set_ylabel("condition number kappa_inf(A) (dash-dot)")
    ax.legend(fontsize=7, loc="upper left")
    d = 64 if c["dataset"] == "digits" else c["input_dim"]
    ax.set_title(f"Zhang et al. Thm 1 on {c['dataset']} (d = {d}): float64 (solid) vs "
                 "float32 (dashed); failed solves not drawn", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")  # this file's one extra flag: a PNG
    with jax.enable_x64(True):  # the float64 track
        res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                       doc=__doc__, summary_keys=["max_err64", "max_err32", "exact_n64",
                                                  "exact_n32"])
    if flags["--plot"] is not None:
        print(plot_sweep(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
