"""MAML (second order), first-order MAML and Reptile on few-shot sinusoid regression.

[1] C. Finn, P. Abbeel, S. Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017, arXiv:1703.03400. Released code: cbfinn/maml (sinusoid).
[2] A. Nichol, J. Achiam, J. Schulman. "On First-Order Meta-Learning Algorithms."
    arXiv:1803.02999 (2018). Released code: openai/supervised-reptile (+ the sine gist).

A task tau ~ p(tau) is a sinusoid y = A sin(x - b), A ~ U[0.1, 5], b ~ U[0, pi],
x ~ U[-5, 5] ([1] Sec. 5.1). Each task gives K points to adapt on (support, D_a) and K
more to score the adaptation (query, D_b). With L_D(theta) the mean squared error on D:

    theta'_tau = theta - alpha grad_theta L_Da(theta)   (k steps: repeat)    [1] Sec. 2.2
    theta <- theta - beta grad_theta sum_tau L_Db(theta'_tau)  (Adam)        [1] Eq. (1)
    g_MAML   = grad L_Db(theta_k) . prod_{i<k} (I - alpha H_Da(theta_i))     (jax.grad
               through the k inner SGD steps: the exact second-order meta-gradient)
    g_FOMAML = grad L_Db(theta_k)  (stop_gradient on inner gradients)  [1] Sec. 5.2, [2] Sec. 4
    Reptile: W_tau = SGD(L_tau, theta, k);  theta <- theta + eps (mean_tau W_tau - theta)
             (k SGD steps over minibatches of the task, eps linearly annealed to 0)  [2] Alg. 2
    pretrain (the baseline of [1] Fig. 2/3): theta <- Adam step on sum_tau L_Db(theta),
             i.e. MAML with alpha = 0 in the meta-objective (the same code path)

`--algo {maml,fomaml,reptile,pretrain}` picks the meta-update; all are vmapped over the
meta-batch of tasks (and by the runner over seeds). The alpha inside the meta-objective is a
traced number in the state (`State.train_lr`: inner_lr, or 0 for `pretrain`), so a test or a
sweep runs MAML and its "pretrained on all tasks" baseline in one compiled program.

evaluate() draws `eval_tasks` new tasks, takes 0..eval_steps SGD steps of size alpha on each
task's K support points from the learned theta (`adapt/mse_XX`) and from the run's random
init (`scratch/mse_XX`), and scores the mean squared error on `eval_points` query points of
the task: the curves of [1] Fig. 3 (left) and of metarl/maml.png.

Reproduce (CPU, 2 cores; 10k meta-iterations, 4 seeds, about a minute each): the three
baselines, then MAML with the plot of all (metarl/maml.png):
    python metarl/maml.py --preset quick --num-seeds 4 --algo pretrain --run-dir runs/maml_pre
    python metarl/maml.py --preset quick --num-seeds 4 --algo fomaml --run-dir runs/maml_fo
    python metarl/maml.py --preset quick --num-seeds 4 --algo reptile --inner-steps 5 \
        --run-dir runs/maml_rep
    python metarl/maml.py --preset quick --num-seeds 4 --plot metarl/maml.png \
        --compare runs/maml_pre,runs/maml_fo,runs/maml_rep
Ours (quick, 2-core CPU shared with other jobs; 600 new tasks, 100 query points each), the
query MSE after 0 / 1 / 10 steps of alpha = 0.01 on K = 10 points, mean of 4 seeds:
    MAML        2.98 / 0.57 / 0.19 (mse_10 of 3 seeds: the 4th diverges on some task
                after 3 steps, beyond the 1 step it was trained for; its mean is NaN)
    FOMAML      5.80 / 0.89 / 0.27      Reptile (k = 5)   2.95 / 0.73 / 0.20
    pretrained  3.11 / 2.48 / 2.10      random init       4.12 / 4.12 / 4.09
Paper setting ([1]: 70k meta-iterations, K = 10; CPU minutes):
    python metarl/maml.py --preset paper
Ours (paper preset, 2 seeds, 2-core CPU shared, 6 s compile + 133 s): before one step 3.07
and 3.05, after one step 0.35 and 0.69; after 10 steps 0.13 (seed 0), while seed 1 diverges
on some task from step 3 (mean inf). Multi-step adaptation beyond the trained step count is
fragile at alpha = 0.01 (cf. pytorch-maml-rl issues #42/#46 for RL).
[1]'s K = 10 curves [M: read off the plot from memory, not a table]: MAML's query MSE is
about 0.4-0.6 after one step and keeps falling over 10 steps; pretrained stays near 2-3.
The pretrained network learns the mean over tasks, E[A sin(x - b)] = -(2/pi) E[A] cos x
(MSE about 3.0, as measured above); an untrained one predicts about 0 (MSE about
E[A^2]/2 = 4.25, the random-init row).

Metrics: losses/pre_adapt_mse is L_Db(theta) of the meta-batch, losses/post_adapt_mse
L_Db(theta') after the training-time inner steps (for Reptile, L_Db(W), whose steps also saw
D_b when k >= 2), losses/meta_grad_norm (maml, fomaml, pretrain) and losses/reptile_step
(|mean W - theta|). None of them is NaN by design. evaluate(): adapt/mse_XX and
scratch/mse_XX (inf or NaN where adaptation diverges on some task, see above).

Differences from the paper:
- alpha = 0.01 as in [1] Sec. 5.1; the released cbfinn/maml flags default `update_lr`
  to 1e-3 and its sinusoid command does not set it. The paper's number is used.
- Weights are initialised as the released code does (truncated normal, std 0.01, biases
  0); the losses average (not sum, as [1] Eq. (2) writes the MSE) over points and over the
  meta-batch, as the released code's `mse` (reduce_mean) does: alpha = 0.01 is a step on
  the mean.
- evaluate() scores `eval_points` = 100 query points per task (the released test scores
  the K query points of each of 600 tasks); more points, less noise, the same expectation.
- Reptile ([2]): the k inner steps cycle over the task's two K-point minibatches (support,
  then query, ...), plain SGD; [2]'s sine gist uses 50 points in minibatches of 10 and
  alpha = 0.02, eps = 0.1 annealed to 0 with one task per step; with a meta-batch of 25
  we use [2]'s batched outer step eps = 1.0 annealed to 0 [M: [2] App. A, not re-read]
  (eps = 0.1 with alpha = 0.01 from this init: MSE 3.4 after one step at 10k iterations).
  With k = 1 Reptile's update is the joint-training gradient step (tested).
- The pretrained baseline of the released code (`--pretrain_iterations`) minimises the
  loss at theta on D_a; here on D_b (fresh points of the same distribution). At test time
  it is fine-tuned with alpha, as in the released code; [1] fine-tunes it "with a tuned
  step size", so this comparison is harsher on the baseline than [1]'s.
- Only K = 10 (no K = 5 / 20 panels) and no oracle baseline (told A and b).
- Reptile's combination here (plain-SGD inner loop, eps = 1.0 -> 0, meta-batch 25) is not a
  setting of [2]: its eps = 1 runs use an Adam inner loop and meta-batch 5, its SGD runs
  eps = 0.25 -> 0 with meta-batch 1 (openai/supervised-reptile's README commands).
"""

import json
import sys
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

AMP_RANGE = (0.1, 5.0)  # [1] Sec. 5.1
PHASE_RANGE = (0.0, float(np.pi))
X_RANGE = (-5.0, 5.0)
ALGOS = ("maml", "fomaml", "reptile", "pretrain")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """MAML / FOMAML / Reptile on K-shot sinusoid regression; defaults: [1] Sec. 5.1."""

    algo: str = "maml"
    """meta-update: maml (second order), fomaml (first order), reptile, or pretrain (the
    baseline: joint training on all tasks, alpha = 0 in the meta-objective)"""
    num_shots: int = 10
    """K: points per task to adapt on (and as many query points to score the adaptation)"""
    hidden: int = 40
    """units of each hidden ReLU layer"""
    num_layers: int = 2
    """hidden layers"""
    inner_lr: float = 0.01
    """alpha: SGD step size of the inner adaptation (training and evaluation)"""
    inner_steps: int = 1
    """k: inner SGD steps per task during meta-training"""
    meta_batch_size: int = 25
    """tasks per meta-update"""
    meta_lr: float = 1e-3
    """beta: Adam step size of the outer update (maml, fomaml, pretrain)"""
    reptile_eps: float = 1.0
    """Reptile's outer step size eps, linearly annealed to 0 over the run ([2]'s batched
    setting: 1.0)"""
    num_iterations: int = 70_000
    """meta-iterations (outer updates)"""
    eval_tasks: int = 600
    """evaluate(): new tasks scored after meta-training"""
    eval_steps: int = 10
    """evaluate(): inner SGD steps of the adaptation curve (0..eval_steps)"""
    eval_points: int = 100
    """evaluate(): query points per task where the adapted network is scored"""
    dtype: str = "float32"
    """compute dtype of the network's matmuls: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        """data points seen per meta-iteration (2K per task)"""
        return 2 * self.num_shots * self.meta_batch_size

    def validate(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r} must be one of {', '.join(ALGOS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("num_shots", "hidden", "num_layers", "inner_steps", "meta_batch_size",
                     "num_iterations", "eval_tasks", "eval_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.eval_steps < 0:
            raise ValueError(f"--eval-steps must be >= 0, got {self.eval_steps}")
        if not 0 < self.reptile_eps <= 1:
            raise ValueError(f"--reptile-eps must be in (0, 1], got {self.reptile_eps}")


PRESETS = {
    # CPU demo: 10k meta-iterations of the paper's setting (about a minute per seed).
    "quick": dict(num_iterations=10_000),
    "paper": dict(),
}


# --- NETWORKS ---


class MLP(nn.Module):
    """x [N, 1] -> y [N, 1]: `num_layers` x Dense(hidden) + ReLU, then Dense(1); weights
    ~ truncated normal(0.01), biases 0 (cbfinn/maml `construct_fc_weights`)."""

    hidden: int
    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.truncated_normal(0.01)
        for _ in range(self.num_layers):
            x = nn.relu(nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype)(x))
        return nn.Dense(1, kernel_init=init, dtype=self.dtype)(x).astype(jnp.float32)


def network(cfg: Config) -> MLP:
    return MLP(cfg.hidden, cfg.num_layers, jnp.dtype(cfg.dtype))


# --- TASKS ---


def sample_tasks(key, n: int):
    """n sinusoids: (amplitude [n], phase [n]) ([1] Sec. 5.1)."""
    k_a, k_b = jax.random.split(key)
    return (jax.random.uniform(k_a, (n,), minval=AMP_RANGE[0], maxval=AMP_RANGE[1]),
            jax.random.uniform(k_b, (n,), minval=PHASE_RANGE[0], maxval=PHASE_RANGE[1]))


def sample_points(key, amp, phase, m: int):
    """m points of each task: x, y [n, m, 1] with y = A sin(x - b)."""
    n = amp.shape[0]
    # one flat draw, then reshaped (a multi-dimensional draw compiles slower under vmap)
    x = jax.random.uniform(key, (n * m,), minval=X_RANGE[0], maxval=X_RANGE[1]).reshape(n, m, 1)
    return x, amp[:, None, None] * jnp.sin(x - phase[:, None, None])


# --- LOSS ---


def mse(net, params, x, y):
    """L_D(theta): mean squared error of f_theta on D = (x, y)."""
    return jnp.mean((net.apply(params, x) - y) ** 2)


def inner_sgd(loss, theta, batches, lr, first_order: bool = False):
    """[1] Eq. (1) once per batch: theta_{i+1} = theta_i - lr grad loss(theta_i, b_i), for the
    k batches of the list `batches` (unrolled: k is small). With `first_order` the inner
    gradients are constants (stop_gradient), so d theta_k / d theta = I and the
    meta-gradient is FOMAML's."""
    for batch in batches:
        g = jax.grad(loss)(theta, batch)
        if first_order:
            g = jax.lax.stop_gradient(g)
        theta = jax.tree.map(lambda p, gi: p - lr * gi, theta, g)
    return theta


def maml_objective(loss, theta, support, query, lr, steps: int, first_order: bool = False):
    """L_Db(theta'), theta' = `steps` SGD steps of size lr on D_a ([1] Eq. 2's summand).
    Its jax.grad is g_MAML (or g_FOMAML with `first_order`); with lr = 0 it is the
    pretrained baseline's loss L_Db(theta)."""
    return loss(inner_sgd(loss, theta, [support] * steps, lr, first_order), query)


def reptile_target(loss, theta, support, query, lr, steps: int):
    """W = SGD(L_tau, theta, k) ([2] Alg. 1): k steps cycling over the minibatches
    (support, query, support, ...)."""
    return inner_sgd(loss, theta, [(support, query)[i % 2] for i in range(steps)], lr)


def reptile_outer(theta, W, step, eps, num_iterations: int):
    """[2] Alg. 2: theta <- theta + eps_t (1/n) sum_i (W_i - theta), W leaves [n, ...], with
    eps_t = eps (1 - t / T) annealed linearly to 0 over the T meta-iterations."""
    eps_t = eps * (1.0 - step / num_iterations)
    return jax.tree.map(lambda t, w: t + eps_t * (w.mean(0) - t), theta, W)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    init_params: Any  # theta at initialisation (evaluate()'s "random init" curve)
    opt_state: Any
    key: jax.Array
    step: jax.Array  # int32 meta-iterations done (Reptile's eps anneal)
    train_lr: jax.Array  # alpha inside the meta-objective: inner_lr, or 0 for `pretrain`


def make_optimizer(cfg: Config):
    return optax.adam(cfg.meta_lr)


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    params = network(cfg).init(k_net, jnp.zeros((1, 1)))
    train_lr = jnp.float32(0.0 if cfg.algo == "pretrain" else cfg.inner_lr)
    return State(params, params, make_optimizer(cfg).init(params), key, jnp.int32(0), train_lr)


# --- UPDATE ---


def update(state: State, cfg: Config):
    net = network(cfg)
    loss = lambda p, d: mse(net, p, *d)
    key, k_task, k_pts = jax.random.split(state.key, 3)
    amp, phase = sample_tasks(k_task, cfg.meta_batch_size)
    x, y = sample_points(k_pts, amp, phase, 2 * cfg.num_shots)  # [B, 2K, 1]
    support = (x[:, :cfg.num_shots], y[:, :cfg.num_shots])  # D_a [B, K, 1]
    query = (x[:, cfg.num_shots:], y[:, cfg.num_shots:])  # D_b [B, K, 1]
    theta = state.params
    pre = jax.vmap(loss, (None, 0))(theta, query).mean()

    if cfg.algo == "reptile":
        W = jax.vmap(reptile_target, (None, None, 0, 0, None, None))(
            loss, theta, support, query, cfg.inner_lr, cfg.inner_steps)
        params = reptile_outer(theta, W, state.step, cfg.reptile_eps, cfg.num_iterations)
        opt_state = state.opt_state
        post = jax.vmap(loss)(W, query).mean()
        metrics = {"losses/reptile_step": optax.tree.norm(
            jax.tree.map(lambda t, w: w.mean(0) - t, theta, W))}
    else:
        first_order = cfg.algo == "fomaml"

        def meta_loss(th):  # [1] Eq. (2), averaged over the meta-batch
            per_task = jax.vmap(maml_objective, (None, None, 0, 0, None, None, None))(
                loss, th, support, query, state.train_lr, cfg.inner_steps, first_order)
            return per_task.mean()

        post, g = jax.value_and_grad(meta_loss)(theta)
        updates, opt_state = make_optimizer(cfg).update(g, state.opt_state, theta)
        params = optax.apply_updates(theta, updates)
        metrics = {"losses/meta_grad_norm": optax.tree.norm(g)}
    metrics["losses/pre_adapt_mse"] = pre  # L_Db(theta), before adaptation
    metrics["losses/post_adapt_mse"] = post  # L_Db(theta') after the training-time steps
    return state.replace(params=params, opt_state=opt_state, key=key,
                         step=state.step + 1), metrics


# --- EVALUATE ---


def adaptation_curve(net, params, support, query, lr, steps: int):
    """Query MSE after 0..steps SGD steps of size lr on the support set: [steps + 1]."""
    loss = lambda p, d: mse(net, p, *d)
    curve = [loss(params, query)]
    for _ in range(steps):  # unrolled: compiles faster than a scan on XLA:CPU
        params = inner_sgd(loss, params, [support], lr)
        curve.append(loss(params, query))
    return jnp.stack(curve)


def evaluate(state: State, cfg: Config):
    """[1] Fig. 3: the mean query MSE over `eval_tasks` new tasks after i = 0..eval_steps
    steps of SGD (alpha = inner_lr) on K support points, from the meta-learned theta
    (`adapt/mse_XX`) and from the run's initial (random) theta (`scratch/mse_XX`)."""
    net = network(cfg)
    k_task, k_a, k_b = jax.random.split(jax.random.fold_in(state.key, 1), 3)
    amp, phase = sample_tasks(k_task, cfg.eval_tasks)
    support = sample_points(k_a, amp, phase, cfg.num_shots)
    query = sample_points(k_b, amp, phase, cfg.eval_points)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), state.params, state.init_params)
    curves = jax.vmap(jax.vmap(adaptation_curve, (None, None, 0, 0, None, None)),
                      (None, 0, None, None, None, None))(
        net, both, support, query, cfg.inner_lr, cfg.eval_steps)  # [2, tasks, steps + 1]
    curves = curves.mean(1)
    out = {f"adapt/mse_{i:02d}": c for i, c in enumerate(curves[0])}
    out.update({f"scratch/mse_{i:02d}": c for i, c in enumerate(curves[1])})
    return out


# --- PLOT ---


def plot_curves(curves, out: str):
    """[1] Fig. 3 style: query MSE against inner gradient steps at meta-test time, one line
    per (evaluate() output, label, prefix) in `curves`: the median over seeds and the band
    between the best and worst seed (a seed whose adaptation diverges on some task, beyond
    the steps it was trained for, has an infinite or NaN mean: drawn off the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for final, label, prefix in curves:
        keys = sorted(k for k in final if k.startswith(prefix + "/mse_"))
        y = np.stack([np.asarray(final[k], np.float64) for k in keys], -1)  # (seeds, steps+1)
        x = np.arange(y.shape[1])
        y = np.where(np.isfinite(y), y, 1e3)  # a diverged seed: off the top of the axes
        ax.plot(x, np.median(y, 0), marker="o", label=f"{label} (median of {y.shape[0]} seeds)")
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    ax.set_xlabel("gradient steps on the K support points (meta-test)")
    ax.set_ylabel("mean squared error on new sinusoids")
    ax.set_yscale("log")
    ax.set_ylim(0.05, 10.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    from PIL import Image

    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    return out


# --- MAIN ---


def _pop_flag(args: list, flag: str):
    """Remove `flag VALUE` from args and return VALUE (None when absent)."""
    if flag not in args:
        return None
    i = args.index(flag)
    if i + 1 >= len(args):
        raise SystemExit(f"error: {flag} needs a value")
    value = args[i + 1]
    del args[i:i + 2]
    return value


LABELS = {"maml": "MAML", "fomaml": "first-order MAML", "reptile": "Reptile",
          "pretrain": "pretrained on all tasks"}


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (this run's adaptation curve and the random-init
    curve) and `--compare DIR1,DIR2` (also the curves of earlier runs, from summary.json)."""
    args = sys.argv[1:] if argv is None else list(argv)
    out, other = _pop_flag(args, "--plot"), _pop_flag(args, "--compare")
    if argv is None:
        sys.argv[1:] = args
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate,
                   argv=None if argv is None else args, doc=__doc__,
                   summary_keys=["adapt/mse_00", "adapt/mse_01", "adapt/mse_10",
                                 "scratch/mse_01", "losses/post_adapt_mse"])
    if out is not None:
        cfg = run.parse(Config, PRESETS, args)[0]
        curves = [(res.final, LABELS[cfg.algo], "adapt")]
        for d in (other or "").split(","):
            if not d:
                continue
            summary = json.loads((Path(d) / "summary.json").read_text())
            summary = {k: np.array([np.nan if x is None else x for x in v], np.float64)
                       for k, v in summary.items() if isinstance(v, list)}  # null: NaN
            record = json.loads((Path(d) / "config.json").read_text())
            curves.append((summary, LABELS[record["config"]["algo"]], "adapt"))
        curves.append((res.final, "random init", "scratch"))
        print("wrote", plot_curves(curves, out))
    return res


if __name__ == "__main__":
    main()
