"""Universal approximation: a one-hidden-layer network approximates a continuous target on
a compact set, its sup-norm error falling with the width, built constructively and trained.

[1] G. Cybenko. "Approximation by superpositions of a sigmoidal function." Mathematics of
    Control, Signals and Systems 2(4), 1989 (sigmoid units).
[2] K. Hornik. "Approximation capabilities of multilayer feedforward networks." Neural
    Networks 4(2), 1991 (any bounded non-constant activation; the architecture, not the
    activation, makes the property).
[3] L. Weng. "Are Deep Neural Networks Dramatically Overfitted?" (Lil'Log, 2019), section
    "Universal Approximation Theorem".
[4] M. Leshno, V. Ya. Lin, A. Pinkus, S. Schocken. "Multilayer feedforward networks with
    a nonpolynomial activation function can approximate any function." Neural Networks
    6(6), 1993 (uniform density on compacts for any continuous non-polynomial activation:
    ReLU, unbounded, is outside [2]'s class and inside this one).
(Journal papers without arXiv ids.)

The network, N hidden units, linear output ([3]: "a linear output layer, at least one
hidden layer with a finite number of neurons"):
    f_N(x) = v_0 + sum_{j=1}^N v_j sigma(<w_j, x> + c_j)          [1] Eq. (1), plus v_0
[1] Thm 2: the sums f_N are dense in C([0,1]^d) for continuous sigmoidal sigma (Thm 1 says
it for any continuous discriminatory sigma): for every continuous f and eps > 0 some N and
weights give sup_x |f_N(x) - f(x)| < eps. For relu the same holds by [4].

(a) Constructive, 1-D, on [-1, 1] (the proofs are not constructive; these are the
classical staircase and interpolation arguments):
  sigmoid: N units are N steps of a staircase on N + 1 cells of width h = 2 / (N + 1) with
    centres u_k; unit k sits at the cell boundary t_k = -1 + k h with steepness s = `steepness`
    x N and carries the jump f(u_k) - f(u_{k-1}); v_0 = f(u_0):
        f_N(x) = f(u_0) + sum_{k=1}^N (f(u_k) - f(u_{k-1})) sigma(s (x - t_k))
    sup error <= L h (+ e^{-s h / 2} terms) = O(1/N) for an L-Lipschitz f.
  relu: N units are the knots t_k = -1 + 2k / N (k = 0..N-1) of the piecewise-linear
    interpolant of f at t_0..t_N; unit k carries the change of slope there, v_0 = f(-1):
        f_N(x) = f(-1) + sum_k (m_k - m_{k-1}) max(x - t_k, 0),  m_k the slope on cell k
    sup error <= h^2 / 8 sup|f''| = O(1/N^2) where f is C^2 (the target's kink sits on a knot
    for even N).
(b) Trained: the same architecture, every width of the sweep trained by full-batch Adam on
  the squared error at `train_points` points. Different widths are different shapes, so
  the sweep is ONE max-width network per width with units >= N masked to zero (their
  gradients are 0, so Adam leaves them at 0 effect), vmapped over the width axis: one
  compiled program trains every width at once.
Both report the sup-norm error max_x |f_N(x) - f(x)| and the L2 (RMS) error on a dense grid
(`eval_points` per axis, on [-1, 1]^d). The broken control: activation linear (no
nonlinearity): f_N is affine for every N, and the error does not fall with the width.

Targets: 1-D f(x) = sin(3x) + |x| / 2 (Lipschitz 3.5, a kink at 0: continuous, not smooth);
2-D f(x, y) = sin(3x) cos(2y) + |x - y| / 2 (trained only: see the differences).

Reproduce (CPU; --plot draws error against width, log-log, constructive and trained, with
the target and the fits inset):
    python generalization/overfit_universal_approx.py --preset quick --num-seeds 2 \\
        --plot generalization/overfit_universal_approx.png
    python generalization/overfit_universal_approx.py --preset quick --activation relu
    python generalization/overfit_universal_approx.py --preset quick --activation linear
    python generalization/overfit_universal_approx.py --preset quick_2d
    python generalization/overfit_universal_approx.py --preset paper   # GPU: widths to 4096
(`paper` is this file's own larger sweep for a GPU, widths 2 to 4096 and 100,000 Adam
steps: [1], [2] and [4] are proofs and run no experiment to copy.)
Measured (`--preset quick --num-seeds 2`, sigmoid, 4001-point grid; 2-core CPU shared with
other jobs, 80 s): constructive sup error 0.93 / 0.37 / 0.20 / 0.104 / 0.053 / 0.0135 at
N = 2 / 8 / 16 / 32 / 64 / 256 (slope -0.89; x4 width divides it by ~4: 1/N), L2 0.38 ->
0.0045. Trained (4000 Adam steps, lr 1e-2, seed mean): sup 0.64 (N = 2), 0.24 (4), 0.021
(8), 0.019 (32), 0.017 (256); L2 0.17 -> 0.003. The trained nets stop improving from N = 8
on: the optimiser within the step budget, not the width, limits them (the kink of |x| at
0 needs steep units). [1]/[2]/[4] prove existence and give no numbers. The catalogue's
constructive anchor (this target, sigmoid staircase, steepness 50 N, 20001-point grid):
sup error 0.731 / 0.194 / 0.049 / 0.012 / 0.0030 at N = 4 / 16 / 64 / 256 / 1024 (~1/N).

Logged per update (`steps_per_update` Adam steps of every width), for each width N:
losses/mse_N<N> (train squared error), charts/sup_N<N> and charts/l2_N<N> (sup-norm and
RMS error of the trained net on the dense grid). `evaluate`: sup_trained_N<N>,
l2_trained_N<N>, and in 1-D sup_constructive_N<N>, l2_constructive_N<N>; slope_trained and
slope_constructive: the least-squares slope of log sup error against log N (theory: -1
for the sigmoid staircase, -2 for the ReLU interpolant of a C^2 target). Nothing is NaN.

Differences from the papers:
- [1] and [2] are existence proofs (Hahn-Banach / Stone-Weierstrass): the constructive
  track is the textbook staircase (sigmoid) and interpolant (ReLU), not their argument.
- The output bias v_0: [1] Eq. (1) has none (sum_j alpha_j sigma(...) only); here the
  staircase and the interpolant put f(u_0) / f(-1) in it, and the trained nets learn it.
- No constructive 2-D net: a one-hidden-layer net cannot make a 2-D bump from few units
  (that takes a second layer or a ridge-function / Fourier decomposition); the 2-D target
  is trained only.
- Trained nets: hidden weights w ~ N(0, init_scale^2 I), biases c = -<w, u> with u uniform
  in [-1, 1]^d (each unit's transition inside the domain), output weights 0; full-batch
  Adam. None of this is from [1]/[2], which do not train.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.plot import save_png

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """One-hidden-layer approximation of a continuous target; defaults: the GPU sweep."""

    input_dim: int = 1
    """d: 1 (f(x) = sin 3x + |x|/2, constructive and trained) or 2 (sin 3x cos 2y +
    |x - y|/2, trained only)"""
    activation: str = "sigmoid"
    """sigmoid ([1] Thm 2), relu ([4]: ReLU interpolant), or linear (the broken control:
    no nonlinearity)"""
    widths: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    """the numbers of hidden units N of the sweep, increasing"""
    steepness: float = 50.0
    """constructive sigmoid: s = steepness x N"""
    train_points: int = 2048
    """training points per axis (an even grid on [-1, 1]^d)"""
    eval_points: int = 20001
    """points per axis of the dense grid the sup-norm and L2 errors are measured on"""
    train_steps: int = 100_000
    """full-batch Adam steps of every width"""
    steps_per_update: int = 1000
    """Adam steps per logged update"""
    lr: float = 3e-3
    """Adam step size"""
    init_scale: float = 5.0
    """std of the trained nets' hidden weights w (steepness of the initial units)"""
    dtype: str = "float32"
    """compute dtype of the trained nets' matmuls (float32 or bfloat16)"""

    @property
    def num_updates(self) -> int:
        return self.train_steps // self.steps_per_update

    @property
    def max_width(self) -> int:
        return max(self.widths)

    def validate(self):
        if self.input_dim not in (1, 2):
            raise ValueError(f"input_dim must be 1 or 2, got {self.input_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        w = self.widths
        if not w or min(w) < 1 or any(b <= a for a, b in zip(w[:-1], w[1:], strict=True)):
            raise ValueError(f"widths must be increasing positive integers, got {w}")
        for name in ("steepness", "init_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.train_points < 2 or self.eval_points < 2:
            raise ValueError(f"train_points and eval_points must be >= 2, got "
                             f"{self.train_points}, {self.eval_points}")
        for name in ("train_steps", "steps_per_update"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_steps % self.steps_per_update:
            raise ValueError(f"train_steps={self.train_steps} must be a multiple of "
                             f"steps_per_update={self.steps_per_update}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


PRESETS = {
    # CPU: 1-D, N = 2..256, 4000 Adam steps, ~1 min.
    "quick": dict(widths=(2, 4, 8, 16, 32, 64, 128, 256), train_points=512,
                  eval_points=4001, train_steps=4000, steps_per_update=200, lr=1e-2),
    # CPU: 2-D, trained only, N = 4..256 on a 32 x 32 grid.
    "quick_2d": dict(input_dim=2, widths=(4, 16, 64, 256), train_points=32, eval_points=101,
                     train_steps=3000, steps_per_update=200, lr=1e-2),
    "paper": dict(),
}

# --- TARGETS, NETWORK ---

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "linear": lambda z: z}


def target(x):
    """x (m, d) -> (m,): sin 3x + |x|/2 (d = 1), sin 3x cos 2y + |x - y|/2 (d = 2)."""
    if x.shape[1] == 1:
        return jnp.sin(3 * x[:, 0]) + 0.5 * jnp.abs(x[:, 0])
    return jnp.sin(3 * x[:, 0]) * jnp.cos(2 * x[:, 1]) + 0.5 * jnp.abs(x[:, 0] - x[:, 1])


def grid(points: int, d: int):
    """An even grid of points^d points on [-1, 1]^d: (points^d, d)."""
    axis = jnp.linspace(-1.0, 1.0, points)
    return jnp.stack(jnp.meshgrid(*([axis] * d), indexing="ij"), -1).reshape(-1, d)


def net(params, x, mask, activation: str, dtype=jnp.float32):
    """f_N(x) = v_0 + sum_j v_j sigma(<w_j, x> + c_j)   [1] Eq. (1); units with mask 0 off.
    params: w (N_max, d), c (N_max,), v (N_max,), v0 (); x (m, d) -> (m,)."""
    w, c, v, v0 = params
    pre = x.astype(dtype) @ w.T.astype(dtype) + c.astype(dtype)  # (m, N_max)
    hidden = ACTIVATIONS[activation](pre) * mask.astype(dtype)
    return (hidden @ v.astype(dtype)).astype(jnp.float32) + v0


def staircase_params(f, n: int, n_max: int, steepness: float):
    """(a) sigmoid: N steps on N + 1 cells of [-1, 1]; unit k at t_k = -1 + k h with
    weight s = steepness N, bias -s t_k, output f(u_k) - f(u_{k-1}); v_0 = f(u_0).
    Laid out in n_max units (units >= n zero). n may be traced."""
    h = 2.0 / (n + 1)
    k = jnp.arange(1, n_max + 1, dtype=jnp.float32)  # unit k = 1..n_max
    on = k <= n
    t = -1.0 + k * h  # cell boundaries
    u = -1.0 + (jnp.arange(n_max + 1) + 0.5) * h  # cell centres u_0..u_{n_max}
    fu = f(u[:, None])
    s = steepness * n
    w = jnp.where(on, s, 0.0)[:, None]
    return w, -w[:, 0] * t, jnp.where(on, fu[1:] - fu[:-1], 0.0), fu[0]


def interpolant_params(f, n: int, n_max: int):
    """(a) relu: the piecewise-linear interpolant at t_k = -1 + 2k / N, k = 0..N: unit k
    (k < N) is max(x - t_k, 0) with the slope change m_k - m_{k-1}; v_0 = f(-1)."""
    h = 2.0 / n
    k = jnp.arange(n_max + 1, dtype=jnp.float32)
    t = -1.0 + k * h
    slope = (f(t[1:, None]) - f(t[:-1, None])) / h  # m_k on cell k, (n_max,)
    on = k[:-1] < n
    dm = jnp.where(on, slope - jnp.concatenate([jnp.zeros(1), slope[:-1]]), 0.0)
    w = jnp.where(on, 1.0, 0.0)[:, None]
    return w, -t[:-1] * w[:, 0], dm, f(jnp.array([[-1.0]]))[0]


def constructive_params(n, cfg: Config):
    if cfg.activation == "relu":
        return interpolant_params(target, n, cfg.max_width)
    # sigmoid, and the linear control: the staircase's weights with sigma = identity
    return staircase_params(target, n, cfg.max_width, cfg.steepness)


def errors(pred, true):
    """(sup-norm error max |f_N - f|, L2 (RMS) error) on the dense grid."""
    diff = jnp.abs(pred - true)
    return jnp.max(diff), jnp.sqrt(jnp.mean(diff ** 2))


def width_masks(cfg: Config):
    """(num_widths, N_max): unit j of the net of width N is on iff j < N."""
    return jnp.arange(cfg.max_width)[None, :] < jnp.asarray(cfg.widths)[:, None]


# --- UPDATE ---


@struct.dataclass
class State:
    key: jax.Array
    params: tuple  # per width, stacked on a leading (num_widths,) axis
    opt_state: optax.OptState


def optimizer(cfg: Config):
    return optax.adam(cfg.lr)


def init(key, cfg: Config) -> State:
    nw, nmax, d = len(cfg.widths), cfg.max_width, cfg.input_dim
    kw, ku, key = jax.random.split(key, 3)
    w = cfg.init_scale * jax.random.normal(kw, (nw, nmax, d))
    u = jax.random.uniform(ku, (nw, nmax, d), minval=-1.0, maxval=1.0)
    c = -jnp.sum(w * u, -1)  # each unit's transition at a point u of the domain
    params = (w, c, jnp.zeros((nw, nmax)), jnp.zeros(nw))
    return State(key, params, optimizer(cfg).init(params))


def update(state: State, cfg: Config):
    """`steps_per_update` full-batch Adam steps of every width (vmapped), then the errors."""
    x = grid(cfg.train_points, cfg.input_dim)
    y = target(x)
    xe = grid(cfg.eval_points, cfg.input_dim)
    ye = target(xe)
    masks = width_masks(cfg)
    dtype = jnp.dtype(cfg.dtype)
    opt = optimizer(cfg)

    def mse(p, mask):
        return jnp.mean((net(p, x, mask, cfg.activation, dtype) - y) ** 2)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.vmap(jax.value_and_grad(mse))(params, masks)  # one per width
        upd, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, upd), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (state.params, state.opt_state), None,
                                               cfg.steps_per_update)
    pred = jax.vmap(lambda p, m: net(p, xe, m, cfg.activation, dtype))(params, masks)
    sup, l2 = jax.vmap(errors, (0, None))(pred, ye)
    metrics = {}
    for i, n in enumerate(cfg.widths):
        metrics[f"losses/mse_N{n}"] = losses[-1, i]
        metrics[f"charts/sup_N{n}"] = sup[i]
        metrics[f"charts/l2_N{n}"] = l2[i]
    return state.replace(params=params, opt_state=opt_state), metrics


def slope(widths, err):
    """Least-squares slope of log err against log N."""
    lw, le = jnp.log(jnp.asarray(widths, jnp.float32)), jnp.log(err)
    lw = lw - lw.mean()
    return jnp.sum(lw * (le - le.mean())) / jnp.sum(lw ** 2)


def evaluate(state: State, cfg: Config):
    """Final errors of the trained nets; in 1-D, the constructive nets' errors."""
    xe = grid(cfg.eval_points, cfg.input_dim)
    ye = target(xe)
    masks = width_masks(cfg)
    pred = jax.vmap(lambda p, m: net(p, xe, m, cfg.activation, jnp.dtype(cfg.dtype)))(
        state.params, masks)
    sup, l2 = jax.vmap(errors, (0, None))(pred, ye)
    out = {"slope_trained": slope(cfg.widths, sup)}
    for i, n in enumerate(cfg.widths):
        out[f"sup_trained_N{n}"], out[f"l2_trained_N{n}"] = sup[i], l2[i]
    if cfg.input_dim == 1:
        pc = [constructive_params(n, cfg) for n in cfg.widths]
        csup = []
        for n, p, m in zip(cfg.widths, pc, masks, strict=True):
            s, r = errors(net(p, xe, m, cfg.activation), ye)
            out[f"sup_constructive_N{n}"], out[f"l2_constructive_N{n}"] = s, r
            csup.append(s)
        out["slope_constructive"] = slope(cfg.widths, jnp.stack(csup))
    return out


# --- PLOT ---


def plot_widths(res, cfg: Config, out):
    """Sup-norm and L2 error against width (log-log), constructive and trained, with the
    1/N (and 1/N^2) reference slopes; inset: the target and the fits of two widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = {k: np.asarray(v) for k, v in res.final.items()}  # (seeds,)
    n = np.asarray(cfg.widths, float)
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    for track, mk in (("constructive", "s"), ("trained", "o")):
        for err, ls in (("sup", "-"), ("l2", ":")):
            keys = [f"{err}_{track}_N{w}" for w in cfg.widths]
            if keys[0] not in final:
                continue
            y = np.stack([final[k] for k in keys])  # (widths, seeds)
            ax.plot(n, y.mean(1), ls, marker=mk, ms=4, label=f"{track}, {err} error")
            ax.fill_between(n, y.min(1), y.max(1), alpha=0.15)
    ax.plot(n, 3.5 / n, "k--", lw=0.8, label="L / N (L = 3.5)")
    if cfg.activation == "relu":
        ax.plot(n, 9.0 / n ** 2, "k-.", lw=0.8, label="9 / N^2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden units N")
    ax.set_ylabel("error on the dense grid")
    ax.set_title(f"one hidden layer, {cfg.activation}, d = {cfg.input_dim} "
                 f"({res.history[f'charts/sup_N{cfg.widths[0]}'].shape[0]} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if cfg.input_dim == 1:
        ins = ax.inset_axes([0.62, 0.62, 0.36, 0.34])
        xe = np.linspace(-1, 1, 801)[:, None]
        ins.plot(xe[:, 0], np.asarray(target(jnp.asarray(xe))), "k", lw=1.5, label="f")
        params = jax.tree.map(lambda p: np.asarray(p)[0], res.state.params)  # seed 0
        masks = np.asarray(width_masks(cfg))
        for i in (0, min(3, len(cfg.widths) - 1)):
            p = jax.tree.map(lambda q, i=i: q[i], params)
            yi = net(p, jnp.asarray(xe, jnp.float32), masks[i], cfg.activation)
            ins.plot(xe[:, 0], np.asarray(yi), lw=1, label=f"trained N={cfg.widths[i]}")
        pc = constructive_params(cfg.widths[1], cfg)
        ins.plot(xe[:, 0], np.asarray(net(pc, jnp.asarray(xe, jnp.float32), masks[1],
                                          cfg.activation)), lw=1, ls="--",
                 label=f"constructive N={cfg.widths[1]}")
        ins.tick_params(labelsize=6)
        ins.legend(fontsize=5)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")  # this file's one extra flag: a PNG
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["slope_trained", "slope_constructive"])
    if flags["--plot"] is not None:
        cfg, _ = run.parse(Config, PRESETS, argv, description=__doc__)
        print(plot_widths(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
