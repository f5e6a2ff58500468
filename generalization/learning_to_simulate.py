"""Learning to Simulate: a Gaussian policy over the simulator's parameters xi, trained by
REINFORCE with the validation accuracy, on "real" data, of a main-task model trained on the
data that xi generates.

[1] N. Ruiz, S. Schulter, M. Chandraker. "Learning to Simulate." ICLR 2019, arXiv:1810.02513.
[2] L. Weng. "Domain Randomization for Sim2Real Transfer." Lil'Log, 2019 (the post),
    section "Guided DR: optimization for task performance".
[3] R. J. Williams. "Simple statistical gradient-following algorithms for connectionist
    reinforcement learning." Machine Learning, 1992 (REINFORCE, the reward baseline).

Notation: [1] writes the simulator's parameters psi and the policy pi_omega(psi) [M]; we
follow the post [2]: simulator parameters xi, their distribution (the policy) P_phi(xi) =
pi_phi(xi); theta: the main-task model.
D = 2 M: the dimension of xi (M mixture components, 2 coordinates of each mean).

One policy iteration (one `update`), [1]'s policy-gradient algorithm ([1] Sec. 3 / Alg. 1 [M]):
    xi_k ~ pi_phi(xi) = N(mu, diag sigma^2),  k = 1..K               (policy, [1] Sec. 3.2 [M])
    D_k = {(x, y)} ~ q(x, y | xi_k)               (simulator: a 2-D Gaussian mixture, below)
    theta_k = train(D_k): `train_steps` Adam steps from a fresh init (not to convergence)
    R_k = acc(theta_k; D_val)   D_val: a fixed validation set from the "real" mixture xi_real
    A_k = R_k - b,  b <- beta b + (1 - beta) mean_k R_k      (moving-average baseline [1] [M])
    grad_phi J ~= 1/K sum_k A_k grad_phi log pi_phi(xi_k)                    (REINFORCE [3])
    phi <- Adam(phi, -grad_phi J)
with grad_mu log pi = (xi - mu) / sigma^2 and grad_{log sigma} log pi = (xi - mu)^2 / sigma^2
- 1 (sigma is learned only with --learn-std; [1]'s toy keeps it fixed [M]).
All K inner trainings (sample, generate, a `lax.scan` of Adam steps, score) are one `jax.vmap`
over xi; a model trained at xi = mu (the policy's mean), one at xi_real (the oracle: the
"real-data" model) and one at a uniform random xi (the random-parameter baseline) are trained
in the same vmap each iteration, with the same keys. ||mu - xi_real|| is logged as a
diagnostic only: the objective is the accuracy, and other layouts classify the real data as
well (the components of one label permuted give the same data; means pushed further apart).

The simulator (the toy of [1] Sec. 4.1 [M]): M Gaussian components in 2-D, component m has
mean xi[2m:2m+2], std `data_std` and label m mod 2; a dataset holds N points, N / M per
component. "Real" = the same simulator at the hidden xi_real, here an XOR layout (component
means (+-2, +-2), labels by quadrant): the main model (a one-hidden-layer MLP) must learn the
XOR boundary. The policy starts at 0.5 xi_real + (1.5, 1) (the layout shrunk and moved off
centre: the model trained there scores ~0.67 in "real").

Reproduce (CPU demo):
    python generalization/learning_to_simulate.py --preset quick --num-seeds 2 \
        --plot generalization/learning_to_simulate.png
Ours (quick preset: 150 iterations of K = 16 datasets x 256 points, 100 Adam steps of a
32-unit MLP each, 2 seeds in one program, a loaded 2-core CPU, 55-93 s wall / 16-22 CPU-s,
compile included): ||mu - xi_real|| 4.58 -> 3.57 / 3.35 (iteration 25), 1.92 / 1.38 (75),
0.61 / 0.43 (150) for seeds 0 / 1; the real validation accuracy of the model trained at
xi = mu 0.66 / 0.69 -> 0.947 / 0.940 (mean of the last 10 iterations), level with the oracle
trained at xi_real (the "real-data" model, same size and steps) 0.944 / 0.942 (the Bayes rate
of the real mixture is 0.955); the K sampled models' (the reward) 0.64 / 0.67 -> 0.925 /
0.920, against 0.48 +- 0.14 for models trained at uniform random xi. Plot:
generalization/learning_to_simulate.png. [1]'s toy numbers were not at hand.

Differences from the paper:
- [1]'s full text was not at hand offline: the toy's layout (number of components, their
  means, the main model: [1] used an SVM [M]), the policy's learning rate, K and the
  baseline's decay are ours [M]; the algorithm (Gaussian policy, K datasets per iteration,
  partially trained main model, reward = validation accuracy, REINFORCE with a moving-average
  baseline) follows [1] and [2]. An unofficial, unfinished reproduction
  (github.com/ammar-gilani/Learning-to-Simulate, Config.py) sets 2 classes x 3 components,
  K = 100 and 500 points per class; it is not the authors' code and was not adopted.
- `paper` preset = the defaults (K = 16, 300 iterations): [1]'s toy sizes are not known here.
- The main model is a small MLP trained for a fixed number of Adam steps (one
  `lax.scan`), not an SVM: an XOR layout needs a non-linear boundary.
- The K models of one iteration share their main-model init key and data key (common random
  numbers: the rewards differ by xi alone); new keys every iteration.
- The baseline b starts at the first iteration's mean reward (not 0).
- Each main model is trained from scratch (a fresh init, `train_steps` steps) every
  iteration; [1]'s Alg. 1 [M] allows training or fine-tuning it: no warm start here.
- xi holds the component means only: the catalogue's toy learns means and variances; here
  the components' std (`data_std`) is fixed and known, and only the 2 M means are learned.
- [1]'s car-counting and KITTI/CARLA experiments (a rendering simulator) are not here.
"""

import sys
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.plot import save_png

# --- CONFIG ---

XOR = (2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0, 2.0)  # labels 0, 1, 0, 1: quadrant parity
START = (2.5, 2.0, 2.5, 0.0, 0.5, 0.0, 0.5, 2.0)  # 0.5 XOR + (1.5, 1): shrunk and shifted


@dataclass(frozen=True)
class Config:
    """Learning to Simulate (Ruiz et al. 2019): REINFORCE on a Gaussian policy over the
    parameters of a 2-D Gaussian-mixture simulator, reward = real validation accuracy."""

    num_components: int = 4
    """M: Gaussian components of the simulator (component m has label m mod 2)"""
    xi_real: tuple[float, ...] = XOR
    """hidden "real" component means (2 M values: x0, y0, x1, y1, ...)"""
    init_mean: tuple[float, ...] = START
    """mu_0 of the policy (2 M values; default: xi_real halved and shifted by (1.5, 1))"""
    init_std: float = 0.5
    """sigma_0 of the policy (every dimension) [M]"""
    learn_std: bool = False
    """also learn log sigma by REINFORCE ([1]'s toy: fixed variance [M])"""
    min_std: float = 0.05
    """lower clip of sigma when it is learned (unused when sigma is fixed)"""
    xi_range: float = 4.0
    """random-xi baseline: each mean uniform in [-xi_range, xi_range]"""
    data_std: float = 1.0
    """std of every Gaussian component (simulator and real)"""
    num_train: int = 256
    """N: points of each generated dataset"""
    num_val: int = 512
    """points of the fixed real validation set (the reward)"""
    num_samples: int = 16
    """K: xi sampled per policy iteration, each a dataset and a main-model training [M]"""
    num_iterations: int = 300
    """policy iterations (one `update` each)"""
    lr: float = 0.05
    """Adam learning rate of the policy phi [M]"""
    baseline_decay: float = 0.9
    """beta of the moving-average reward baseline b [M]"""
    reward: str = "accuracy"
    """R: validation "accuracy" ([1]) or "neg_loss" (minus the validation cross-entropy)"""
    hidden: int = 32
    """hidden units of the main-task MLP"""
    train_steps: int = 100
    """full-batch Adam steps of each main-model training (not to convergence, [1])"""
    model_lr: float = 0.03
    """Adam learning rate of the main-task model"""
    dtype: str = "float32"
    """compute dtype of the main-task model: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        return (self.num_samples + 3) * self.train_steps  # main-model steps per iteration

    @property
    def dim(self) -> int:
        return 2 * self.num_components

    def validate(self):
        if self.num_components < 2:
            raise ValueError(f"num_components={self.num_components} must be >= 2 (two labels)")
        for name in ("xi_real", "init_mean"):
            if len(getattr(self, name)) != self.dim:
                raise ValueError(f"{name}={getattr(self, name)} must hold 2 x num_components "
                                 f"= {self.dim} values")
        if self.num_train % self.num_components:
            raise ValueError(f"num_train={self.num_train} must be a multiple of "
                             f"num_components={self.num_components}")
        for name in ("init_std", "min_std", "xi_range", "data_std", "lr", "model_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("num_val", "num_samples", "hidden", "train_steps", "num_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learn_std and self.init_std < self.min_std:
            raise ValueError(f"init_std={self.init_std} must be >= min_std={self.min_std} when "
                             "learn_std (sigma is clipped to min_std)")
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"baseline_decay={self.baseline_decay} must be in [0, 1)")
        for name, choices in (("reward", ("accuracy", "neg_loss")),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")


PRESETS = {
    # CPU demo: 150 iterations of K = 16 datasets of 256 points, 100 Adam steps each.
    "quick": dict(num_iterations=150),
    # [1]'s toy sizes are not known here [M]: the defaults, K = 16, 300 iterations.
    "paper": dict(),
}


# --- SIMULATOR: a 2-D Gaussian mixture q(x, y | xi) ---


def generate(key, xi, n: int, cfg: Config):
    """n points, n / M per component m: x = xi[m] + data_std * eps, y = m mod 2.
    Returns x [n, 2], y [n]."""
    m = jnp.arange(n) % cfg.num_components  # [n] balanced components
    means = xi.reshape(cfg.num_components, 2)  # [M, 2]
    x = means[m] + cfg.data_std * jax.random.normal(key, (n, 2))
    return x, (m % 2).astype(jnp.float32)


# --- NETWORKS ---


class Classifier(nn.Module):
    """The main-task model: 2 -> hidden (tanh) -> 1 logit."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(1, dtype=self.dtype)(h)[..., 0].astype(jnp.float32)


def classifier(cfg: Config) -> Classifier:
    return Classifier(cfg.hidden, jnp.dtype(cfg.dtype))


# --- MAIN TASK: train on the simulated data, score on the real validation set ---


def bce(logits, y):
    """Binary cross-entropy of logits against labels y in {0, 1}."""
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()


def train_and_score(xi, k_init, k_data, val_x, val_y, cfg: Config):
    """theta = train(D ~ q(. | xi)) then (val accuracy, val cross-entropy) on real data."""
    net = classifier(cfg)
    x, y = generate(k_data, xi, cfg.num_train, cfg)
    params = net.init(k_init, x[:1])
    opt = optax.adam(cfg.model_lr)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(lambda p: bce(net.apply(p, x), y))(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, cfg.train_steps)
    logits = net.apply(params, val_x)
    acc = jnp.mean((logits > 0) == (val_y > 0.5))
    return acc, bce(logits, val_y)


def reward_of(acc, loss, cfg: Config):
    """R ([1]: the main model's validation accuracy; or minus its validation loss)."""
    return acc if cfg.reward == "accuracy" else -loss


# --- POLICY pi_phi(xi) = N(mu, diag sigma^2) and REINFORCE ---


def log_prob(phi, xi):
    """log N(xi; mu, diag exp(log_sigma)^2), phi = {"mu": [D], "log_sigma": [D]}, D = 2 M."""
    mu, log_sigma = phi["mu"], phi["log_sigma"]
    z = (xi - mu) * jnp.exp(-log_sigma)
    return jnp.sum(-0.5 * z**2 - log_sigma - 0.5 * jnp.log(2 * jnp.pi))


def reinforce_grad(phi, xis, adv, learn_std: bool):
    """grad_phi J ~= 1/K sum_k A_k grad_phi log pi_phi(xi_k) ([1] Sec. 3, [3]): the gradient
    of the ascent objective (xi and A held fixed); sigma's gradient is 0 unless learned."""
    surrogate = lambda p: jnp.mean(adv * jax.vmap(lambda x: log_prob(p, x))(xis))
    g = jax.grad(surrogate)(phi)
    if not learn_std:
        g = {**g, "log_sigma": jnp.zeros_like(g["log_sigma"])}
    return g


def sample_xi(key, phi, k: int):
    """xi_k = mu + sigma * eps_k. [K, D]"""
    eps = jax.random.normal(key, (k, phi["mu"].shape[0]))
    return phi["mu"] + jnp.exp(phi["log_sigma"]) * eps


def optimizer(cfg: Config):
    return optax.adam(cfg.lr)


# --- UPDATE ---


@struct.dataclass
class State:
    phi: dict  # {"mu": [D], "log_sigma": [D]}: the policy
    opt_state: optax.OptState
    baseline: jax.Array  # b: moving average of the rewards
    step: jax.Array
    val_x: jax.Array  # [num_val, 2] the fixed real validation set
    val_y: jax.Array  # [num_val]
    key: jax.Array


def init(key, cfg: Config) -> State:
    key, k_val = jax.random.split(key)
    phi = {"mu": jnp.asarray(cfg.init_mean, jnp.float32),
           "log_sigma": jnp.full(cfg.dim, jnp.log(cfg.init_std), jnp.float32)}
    val_x, val_y = generate(k_val, jnp.asarray(cfg.xi_real, jnp.float32), cfg.num_val, cfg)
    return State(phi, optimizer(cfg).init(phi), jnp.array(0.0), jnp.array(0), val_x, val_y,
                 key)


def update(state: State, cfg: Config):
    """One policy iteration: K xi, K datasets, K main-model trainings (one vmap, plus the
    policy-mean, oracle and random-xi models), the rewards, one REINFORCE step on phi."""
    key, k_xi, k_rand, k_init, k_data = jax.random.split(state.key, 5)
    phi = state.phi
    xis = sample_xi(k_xi, phi, cfg.num_samples)  # [K, D]
    xi_rand = jax.random.uniform(k_rand, (cfg.dim,), minval=-cfg.xi_range, maxval=cfg.xi_range)
    xi_real = jnp.asarray(cfg.xi_real, jnp.float32)
    xi_all = jnp.concatenate([xis, phi["mu"][None], xi_real[None], xi_rand[None]])  # [K + 3, D]
    acc, loss = jax.vmap(train_and_score, (0, None, None, None, None, None))(
        xi_all, k_init, k_data, state.val_x, state.val_y, cfg)
    r = reward_of(acc, loss, cfg)[: cfg.num_samples]  # [K]
    b = jnp.where(state.step == 0, r.mean(), state.baseline)  # first b: the first mean
    adv = r - b  # A_k = R_k - b
    g = reinforce_grad(phi, xis, adv, cfg.learn_std)
    updates, opt_state = optimizer(cfg).update(jax.tree.map(jnp.negative, g), state.opt_state)
    phi = optax.apply_updates(phi, updates)  # gradient ascent on J
    if cfg.learn_std:  # a fixed sigma stays at init_std
        phi = {**phi, "log_sigma": jnp.maximum(phi["log_sigma"], jnp.log(cfg.min_std))}
    baseline = cfg.baseline_decay * b + (1 - cfg.baseline_decay) * r.mean()
    metrics = {
        "charts/reward_mean": r.mean(),
        "charts/acc_samples": acc[: cfg.num_samples].mean(),
        "charts/acc_policy_mean": acc[-3],  # the model trained at xi = mu (before the step)
        "charts/acc_real_xi": acc[-2],  # the oracle: the model trained at xi_real
        "charts/acc_random_xi": acc[-1],  # the model trained at a uniform random xi
        "charts/dist_to_real": jnp.linalg.norm(state.phi["mu"] - xi_real),
        "charts/sigma_mean": jnp.exp(state.phi["log_sigma"]).mean(),
        "charts/baseline": b,
        "losses/val_loss_samples": loss[: cfg.num_samples].mean(),
        "losses/grad_norm": optax.tree.norm(g),
    }
    new = State(phi, opt_state, baseline, state.step + 1, state.val_x, state.val_y, key)
    return new, metrics


# --- PLOT ---


def plot(history: dict, state, cfg: Config, out: str):
    """(a) ||mu - xi_real|| per iteration; (b) validation accuracy of the model trained at mu,
    of the K samples, at xi_real and at a random xi (seed mean); (c) seed 0's final mixture means vs
    xi_real and the initial means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.arange(1, cfg.num_iterations + 1)
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    d = np.asarray(history["charts/dist_to_real"])
    for s in range(d.shape[0]):
        ax[0].plot(it, d[s], label=f"seed {s}")
    ax[0].set(xlabel="policy iteration", ylabel="||mu - xi_real||", title="policy mean vs real")
    for k, label in (("charts/acc_policy_mean", "model trained at xi = mu"),
                     ("charts/acc_samples", "K sampled xi (reward)"),
                     ("charts/acc_real_xi", "oracle: trained at xi_real"),
                     ("charts/acc_random_xi", "random xi")):
        y = np.asarray(history[k]).mean(0)
        w = min(10, len(y))
        ax[1].plot(it[w - 1:], np.convolve(y, np.ones(w) / w, "valid"), label=label)
    ax[1].set(xlabel="policy iteration", ylabel="real validation accuracy (10-it. mean)",
              title="main-task accuracy")
    mu = np.asarray(state.phi["mu"])[0].reshape(-1, 2)
    real = np.asarray(cfg.xi_real).reshape(-1, 2)
    start = np.asarray(cfg.init_mean).reshape(-1, 2)
    for m in range(cfg.num_components):
        c = f"C{m % 2}"
        ax[2].scatter(*real[m], marker="*", s=200, color=c, edgecolor="k")
        ax[2].scatter(*start[m], marker="x", s=60, color=c)
        ax[2].scatter(*mu[m], marker="o", s=60, color=c, edgecolor="k")
        ax[2].annotate("", mu[m], start[m], arrowprops=dict(arrowstyle="->", color=c, alpha=0.5))
    ax[2].set(title="component means (seed 0)\nx start, o learned, * real; colour = label",
              xlabel="x1", ylabel="x2")
    for a in ax[:2]:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


SUMMARY = ["charts/dist_to_real", "charts/acc_policy_mean", "charts/acc_real_xi",
           "charts/acc_random_xi", "charts/reward_mean"]


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the plot of this run's history)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, argv=argv, doc=__doc__,
                   summary_keys=SUMMARY)
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.history, res.state, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
