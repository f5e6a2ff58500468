"""VIC: Variational Intrinsic Control with explicit options ([1] Algorithm 1). An option
Omega is drawn from a prior p^C(Omega | s_0), an option-conditioned policy pi(a | Omega, s)
acts for T steps, and a classifier q(Omega | s_0, s_f) tries to tell from where the option
ended which option it was. The agent is paid for being recognisable, so the options learn
to end in distinct states: the number of states it can reliably reach (its empowerment).
(exploration/valor.py --decoder final_state is the same final-state decoder inside VALOR.)

[1] K. Gregor, D. J. Rezende, D. Wierstra. "Variational Intrinsic Control."
    arXiv:1611.07507 (2016; ICLR workshop 2017). No released code was found. Equations,
    Algorithm 1 and the grid world (Sec. 3.1.1) checked against the paper's text.
[2] Lil'Log, "Exploration Strategies in Deep Reinforcement Learning" (2020), the VIC part.

    objective: max I(Omega; s_f | s_0) = H(Omega | s_0) - H(Omega | s_f, s_0)       [1] (2)
    bound:     I^VB = -sum_Omega p^C(Omega|s_0) log p^C(Omega|s_0)
                      + sum_{s_f, Omega} p^J(s_f|s_0, Omega) p^C(Omega|s_0) log q(Omega|s_0, s_f)
               <= I, with equality when q is the true posterior p(Omega | s_0, s_f)   [1] (3)
    reward at the option's end: r = log q(Omega | s_0, s_f) - log p^C(Omega | s_0)
               (so I^VB = E[r]; 0 on every earlier step)
    policy:    REINFORCE with a learned baseline V(s, s_0, Omega) (an actor-critic on the
               terminal reward, undiscounted: every step's return is r), entropy bonus
    q:         maximum likelihood, min -E[log q(Omega | s_0, s_f)] on the batch's options
    p^C:       fixed uniform (default; [1]'s grid world), or `--learned-prior` ([1]
               Algorithm 1 "Reinforce option prior p^C based on r_I"; Sec. 3 "we can also
               keep p^C fixed"): E[(r - b(s_0)) grad log p^C(Omega | s_0)]
    b(s_0):    the prior's REINFORCE baseline, regressed on r; [1]'s note to Algorithm 1:
               it "tracks r_I" and estimates the empowerment at s_0 (`empowerment_estimate`)

Reproduce (CPU demo: open 8 x 8 grid, s_0 the centre, 16 options of T = 8 steps, no push):
    python exploration/vic.py --preset quick --num-seeds 2 --plot exploration/vic.png
    python exploration/vic.py --preset quick --num-seeds 2 --variant q_s0_only   # broken
[1]'s grid-world setting (30 options, push noise 0.2; for an accelerator; traced in the
tests, not run here):
    python exploration/vic.py --preset paper
Ours (quick: 600 updates of 256 options, 16 options of T = 8 from the centre of the open
8 x 8 grid, lr 5e-3, 64-wide MLPs, 2 seeds; loaded 2-core CPU, 21 s compile + 16 s; 16
held-out episodes per option): q's accuracy 0.98 / 1.00 (chance 1/16), I^VB 2.72 / 2.77
nats (ceiling log 16 = 2.77), the baseline's estimate b(s_0) 2.64 / 2.80, reliably reached
distinct final cells 13 / 13 (an option's modal cell counts when at least half of its
episodes end there: with the entropy bonus some options own a small region of 2-3 cells
rather than one, which q still recognises, so accuracy ~1 with 13 cells; the PNG shows
each option's final cells). The bound rises from 0 after ~60 updates and plateaus by ~250.
Earlier hyperparameters (lr 3e-3, 128-wide; not re-run): broken `--variant q_s0_only`:
accuracy 0.0625 / 0.0625 (= 1/16), I^VB -0.0001, 0 reliably reached cells (random walks);
`--learned-prior`: accuracy 0.99 / 0.87, I^VB 2.69 / 2.61, the prior's entropy 2.772 /
2.738 (it stays near uniform here: every option is already well recognised).
[1] reports for its grid world a picture only (Fig. 1: each option is inferred at a
distinct, localised place); no number here is comparable beyond that picture.
Finding: [1] Sec. 3.3 says Algorithm 1 "failed when neural networks were substituted"
unless the reward was frozen while the policy learned and vice versa; here the joint
update of MLP policy, q and prior with an entropy bonus works on the noise-free grid.

Differences from the paper:
- Fixed option length T (option_length): every option runs T steps and ends at s_T. [1]'s
  grid world ends options with fixed probability 1 - gamma = 0.05 per step (geometric);
  the `paper` preset uses T = 20, that length's mean. The grid has a "stay" action, so an
  option can end anywhere within T moves of s_0.
- Algorithm 1 chains options ("Set s_0 = s_f"); here every option starts afresh at s_0
  (the centre, or with --random-start a uniformly random cell, which the paper preset uses
  as a stand-in for the chain's spread of starts).
- Environment: an open grid_size x grid_size grid (edges clip moves, 5 actions: up, down,
  left, right, stay), after each step a push one cell in a random direction (of 4) with
  probability push_prob ([1]: 0.2; the quick demo and the tests use 0), one-hot cell
  observations. [1] gives no grid size: the paper preset's 25 x 25 is unsourced (25 x 25
  is [1] Fig. 3's four-room world of the implicit-options algorithm, Sec. 4).
- The policy sees (s, s_0, Omega) and q sees (s_0, s_f) (s_0 matters when it is random);
  [1]'s grid-world q is q(Omega | s_f), its s_0 fixed.
- The learner: [1]'s grid world uses Q-learning with a linear function approximator (its
  p^C fixed; Sec. 3 trains a learned p^C by policy gradients). Ours is REINFORCE with a
  learned baseline, batch-normalised advantages and an entropy bonus, one Adam step per
  batch on policy, baseline, q, prior and b(s_0) together (one learning rate), with MLPs.
- The `--variant q_s0_only` broken arm (q's s_f input zeroed, so it can only learn the
  prior: accuracy 1/N) is a test device, not in [1].
- The learned prior is an MLP of s_0 with the baseline b(s_0) as an extra output.
- Hyperparameters (lr 5e-3, batch 256, ent_coef 0.1, 64-wide MLPs) are ours, tuned on the
  quick preset (ent_coef 0.01 let the policy collapse early onto ~11 cells); the `paper`
  preset's grid size, updates, batch and width are unsourced. `evaluate` counts "distinct
  final cells" as the options' modal cells reached by at least half of their episodes (our
  measure of [1]'s picture).
- [1]'s implicit-options algorithm (options as action sequences, Algorithm 2) is not here.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.plot import save_png

# --- CONFIG ---

VARIANTS = ("vic", "q_s0_only")
MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], np.int32)  # up down left right stay


@dataclass(frozen=True)
class Config:
    """VIC with explicit options on an open grid; sizes ours or unsourced (see the docstring)."""

    grid_size: int = 8
    """the open grid is grid_size x grid_size cells (moves past an edge stay put)"""
    random_start: bool = False
    """s_0 uniformly random per option (else the centre cell)"""
    num_options: int = 16
    """N: options Omega in {0..N-1}"""
    option_length: int = 8
    """T: steps of every option (fixed; [1]'s grid ends options w.p. 0.05 per step)"""
    learned_prior: bool = False
    """learn p^C(Omega | s_0) by the policy gradient of I^VB (else fixed uniform, as [1]'s grid)"""
    push_prob: float = 0.0
    """after each step the agent is pushed one cell in a random direction with this
    probability ([1] Sec. 3.1.1: 0.2; 0 in the CPU demo)"""
    variant: str = "vic"
    """vic, or the broken q_s0_only (q never sees s_f)"""
    num_updates_total: int = 2000
    """updates (one batch of options each; unsourced)"""
    batch: int = 256
    """options (episodes of T steps) per update"""
    lr: float = 5e-3
    """Adam learning rate of policy, baseline, q and prior"""
    ent_coef: float = 0.1
    """weight of the policy's entropy bonus (unsourced; 0.01 collapses onto ~11 cells)"""
    value_coef: float = 0.5
    """weight of the baseline's squared error"""
    hidden: int = 64
    """width of the two-layer MLPs (policy/baseline, q, prior)"""
    eval_episodes: int = 16
    """evaluate(): episodes per option"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_updates_total

    @property
    def steps_per_update(self) -> int:
        return self.batch * self.option_length

    @property
    def num_cells(self) -> int:
        return self.grid_size * self.grid_size

    def validate(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name, low in [("grid_size", 2), ("num_options", 2), ("option_length", 1),
                          ("batch", 2), ("hidden", 1), ("eval_episodes", 1),
                          ("num_updates_total", 1)]:
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.ent_coef < 0 or self.value_coef < 0:
            raise ValueError(f"ent_coef={self.ent_coef}, value_coef={self.value_coef} must be >= 0")
        if not 0 <= self.push_prob <= 1:
            raise ValueError(f"push_prob={self.push_prob} must be in [0, 1]")


PRESETS = {
    # CPU demo: the catalogue's test setting (16 options, T = 8, open 8 x 8 grid).
    "quick": dict(num_updates_total=600),
    # [1] Sec. 3.1.1: N = 30 options, fixed uniform p^C, push noise 0.2, options ending with
    # probability 0.05 per step (here a fixed T = 20, its mean); random starts stand in for
    # Algorithm 1's chaining. Grid size, updates, batch and width are unsourced.
    "paper": dict(grid_size=25, random_start=True, num_options=30, option_length=20,
                  learned_prior=False, push_prob=0.2, num_updates_total=20000, batch=1024,
                  hidden=256),
}


# --- NETWORKS ---


class MLP(nn.Module):
    """Two hidden relu layers -> `out` float32 outputs."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.out, dtype=self.dtype)(x).astype(jnp.float32)


def networks(cfg: Config):
    """pi(a | s, s_0, Omega) and V (5 logits + 1 value), q(Omega | s_0, s_f), p^C(Omega | s_0)
    and its REINFORCE baseline b(s_0) (N logits + 1 value: [1]'s empowerment estimate)."""
    dt = jnp.dtype(cfg.dtype)
    return {"pi": MLP(cfg.hidden, len(MOVES) + 1, dt),
            "q": MLP(cfg.hidden, cfg.num_options, dt),
            "prior": MLP(cfg.hidden, cfg.num_options + 1, dt)}


def onehot_cell(pos, cfg: Config):
    """pos int [..., 2] (row, col) -> one-hot [..., G^2]."""
    return jax.nn.one_hot(pos[..., 0] * cfg.grid_size + pos[..., 1], cfg.num_cells)


def move(pos, action, key, cfg: Config):
    """The open grid: pos' = clip(pos + MOVES[a], 0, G - 1), then with probability push_prob
    a push one cell up, down, left or right (uniform), clipped too ([1] Sec. 3.1.1)."""
    g = cfg.grid_size
    pos = jnp.clip(pos + jnp.asarray(MOVES)[action], 0, g - 1)
    k_on, k_dir = jax.random.split(key)
    on = jax.random.bernoulli(k_on, cfg.push_prob, pos.shape[:-1])
    push = jnp.asarray(MOVES)[jax.random.randint(k_dir, pos.shape[:-1], 0, 4)]
    return jnp.clip(pos + push * on[..., None], 0, g - 1)


# --- LOSS ---


def prior_outputs(params, s0, cfg: Config):
    """log p^C(. | s_0) [B, N] (uniform log 1/N, or the learned prior's log-softmax) and the
    baseline b(s_0) [B] (learned in both cases: it tracks r, [1]'s empowerment estimate)."""
    out = networks(cfg)["prior"].apply(params["prior"], onehot_cell(s0, cfg))
    logits = jnp.where(cfg.learned_prior, out[..., :-1], 0.0)
    return jax.nn.log_softmax(logits), out[..., -1]


def prior_log_probs(params, s0, cfg: Config):
    """log p^C(. | s_0) [B, N]."""
    return prior_outputs(params, s0, cfg)[0]


def q_inputs(s0, sf, variant, cfg: Config):
    """[B, 2 G^2] = (onehot s_0, onehot s_f); the broken q_s0_only arm zeroes s_f."""
    return jnp.concatenate([onehot_cell(s0, cfg), onehot_cell(sf, cfg) * (variant == 0)], -1)


def q_log_probs(params, s0, sf, variant, cfg: Config):
    """log q(. | s_0, s_f) [B, N]."""
    return jax.nn.log_softmax(networks(cfg)["q"].apply(params["q"], q_inputs(s0, sf, variant, cfg)))


def intrinsic_reward(log_q, log_p_c):
    """[1]: r = log q(Omega | s_0, s_f) - log p^C(Omega | s_0), at the option's end (no grad)."""
    return jax.lax.stop_gradient(log_q - log_p_c)


def empowerment_bound(log_q, log_p_c, weight):
    """I^VB = sum_i w_i (log q_i - log p^C_i) / sum_i w_i over (Omega_i, s_f_i) samples. With
    Omega ~ p^C and w = 1 it is the batch mean of r; with every (Omega, s_f) enumerated and
    w = p^C(Omega) p^J(s_f | Omega) it is [1]'s definition
    -sum p^C log p^C + sum p^J p^C log q; with Omega drawn uniformly, w = p^C(Omega | s_0)."""
    return (weight * (log_q - log_p_c)).sum() / weight.sum()


def prior_loss(r, baseline, log_p_c):
    """-E[(r - b(s_0)) log p^C(Omega | s_0)]: its gradient is a REINFORCE estimate of
    -grad I^VB w.r.t. the prior (the -log p^C inside r is the entropy term); 0 when fixed.
    [1] Algorithm 1's note: the baseline b(s_0), which tracks r, estimates empowerment."""
    return -((r - jax.lax.stop_gradient(baseline)) * log_p_c).mean()


def take(logp, idx):
    """logp [B, K], idx [B] -> logp[b, idx_b]."""
    return jnp.take_along_axis(logp, idx[:, None], -1)[:, 0]


# --- STATE ---


@struct.dataclass
class State:
    params: dict  # pi (with the baseline head), q, prior
    opt_state: Any
    step: jax.Array
    key: jax.Array
    variant: jax.Array  # int32 index into VARIANTS (traced: both arms in one program)


def optimizer(cfg: Config):
    return optax.adam(cfg.lr)


def init(key, cfg: Config) -> State:
    nets = networks(cfg)
    k_pi, k_q, k_p, key = jax.random.split(key, 4)
    g2, n = cfg.num_cells, cfg.num_options
    params = {"pi": nets["pi"].init(k_pi, jnp.zeros((1, 2 * g2 + n))),
              "q": nets["q"].init(k_q, jnp.zeros((1, 2 * g2))),
              "prior": nets["prior"].init(k_p, jnp.zeros((1, g2)))}
    return State(params, optimizer(cfg).init(params), jnp.zeros((), jnp.int32), key,
                 jnp.asarray(VARIANTS.index(cfg.variant), jnp.int32))


# --- ROLLOUT ---


def start_cells(key, n, cfg: Config):
    """s_0 [n, 2]: the centre, or uniformly random cells (--random-start)."""
    rnd = jax.random.randint(key, (n, 2), 0, cfg.grid_size)
    return jnp.where(cfg.random_start, rnd, jnp.full((n, 2), cfg.grid_size // 2))


def rollout(params, key, s0, omega, cfg: Config):
    """T steps of pi(a | s, s_0, Omega) from s_0 [B, 2]. Returns s_f [B, 2], the policy
    inputs [T, B, 2 G^2 + N] and the actions [T, B]."""
    ctx = jnp.concatenate([onehot_cell(s0, cfg), jax.nn.one_hot(omega, cfg.num_options)], -1)
    pi = networks(cfg)["pi"]

    def step(pos, k):
        x = jnp.concatenate([onehot_cell(pos, cfg), ctx], -1)
        a = jax.random.categorical(k, pi.apply(params["pi"], x)[:, :-1])
        return move(pos, a, jax.random.fold_in(k, 1), cfg), (x, a)

    sf, (xs, acts) = jax.lax.scan(step, s0, jax.random.split(key, cfg.option_length))
    return sf, xs, acts


# --- UPDATE ---


def losses(params, batch, variant, cfg: Config):
    """Actor-critic on the terminal reward, q by maximum likelihood, p^C by REINFORCE."""
    s0, omega, sf, xs, acts = batch
    log_prior, b = prior_outputs(params, s0, cfg)  # [B, N], [B]
    log_p_c = take(log_prior, omega)  # [B]
    log_q = take(q_log_probs(params, s0, sf, variant, cfg), omega)  # [B]
    r = intrinsic_reward(log_q, log_p_c)  # [B]
    out = networks(cfg)["pi"].apply(params["pi"], xs)  # [T, B, 5 + 1]
    logits, value = out[..., :-1], out[..., -1]
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, acts[..., None], -1)[..., 0]  # [T, B]
    adv = r[None] - jax.lax.stop_gradient(value)  # return = r at every step (undiscounted)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
    loss_pi = -(logp * adv).mean() - cfg.ent_coef * entropy
    loss_v = ((value - r[None]) ** 2).mean()
    loss_q = -log_q.mean()  # maximum likelihood of q(Omega | s_0, s_f)
    loss_prior = prior_loss(r, b, log_p_c)  # ascends I^VB w.r.t. p^C (no gradient when fixed)
    loss_b = ((b - r) ** 2).mean()  # b(s_0) tracks r: the empowerment estimate
    total = loss_pi + cfg.value_coef * (loss_v + loss_b) + loss_q + loss_prior
    return total, {"losses/pi": loss_pi, "losses/v": loss_v, "losses/q": loss_q,
                   "losses/prior": loss_prior, "losses/b": loss_b, "charts/entropy": entropy,
                   "charts/empowerment_baseline": b.mean(), "r": r, "log_q": log_q,
                   "log_p_c": log_p_c}


def collect(params, key, cfg: Config):
    """A batch of options: s_0, Omega ~ p^C(. | s_0), T steps of pi. Returns
    (s_0, Omega, s_f, policy inputs, actions) and log p^C(. | s_0) [B, N]."""
    k_s0, k_omega, k_roll = jax.random.split(key, 3)
    s0 = start_cells(k_s0, cfg.batch, cfg)
    log_prior = prior_log_probs(params, s0, cfg)  # [B, N]
    omega = jax.random.categorical(k_omega, log_prior)  # Omega ~ p^C(. | s_0)
    sf, xs, acts = rollout(params, k_roll, s0, omega, cfg)
    return (s0, omega, sf, xs, acts), log_prior


def update(state: State, cfg: Config):
    key, k_batch = jax.random.split(state.key)
    batch, log_prior = collect(state.params, k_batch, cfg)
    s0, omega, sf = batch[:3]
    (_, aux), g = jax.value_and_grad(losses, has_aux=True)(state.params, batch, state.variant, cfg)
    upd, opt_state = optimizer(cfg).update(g, state.opt_state)
    params = optax.apply_updates(state.params, upd)
    guess = jnp.argmax(q_log_probs(state.params, s0, sf, state.variant, cfg), -1)
    r, log_q, log_p_c = aux.pop("r"), aux.pop("log_q"), aux.pop("log_p_c")
    metrics = {**aux,
               "charts/empowerment_bound": empowerment_bound(log_q, log_p_c, jnp.ones_like(r)),
               "charts/q_accuracy": (guess == omega).mean(),
               "charts/prior_entropy": -(jnp.exp(log_prior) * log_prior).sum(-1).mean()}
    return State(params, opt_state, state.step + 1, key, state.variant), metrics


# --- EVALUATE ---


def eval_rollouts(state: State, cfg: Config, key):
    """eval_episodes episodes of every option (Omega = i mod N): s_0, Omega, s_f [n, ...],
    log q(Omega | s_0, s_f) and log p^C(Omega | s_0) [n]."""
    n = cfg.eval_episodes * cfg.num_options
    k_s0, k_roll = jax.random.split(key)
    omega = (jnp.arange(n) % cfg.num_options).astype(jnp.int32)
    s0 = start_cells(k_s0, n, cfg)
    sf, _, _ = rollout(state.params, k_roll, s0, omega, cfg)
    log_q_all = q_log_probs(state.params, s0, sf, state.variant, cfg)
    log_prior, b = prior_outputs(state.params, s0, cfg)
    return s0, omega, sf, log_q_all, take(log_prior, omega), b


def distinct_outcomes(s0, omega, sf, cfg: Config):
    """Number of distinct outcomes that options reach reliably: each option's most frequent
    displacement s_f - s_0 (its final cell when s_0 is fixed) when at least half of its
    episodes end there, counted once per value (a random walk's mode scores nothing)."""
    g = cfg.grid_size
    d = (sf - s0 + g - 1)  # [n, 2] in 0..2G-2
    idx = d[:, 0] * (2 * g - 1) + d[:, 1]
    counts = jax.ops.segment_sum(jax.nn.one_hot(idx, (2 * g - 1) ** 2), omega, cfg.num_options)
    modal = jnp.argmax(counts, -1)  # [N]
    reliable = counts.max(-1) >= 0.5 * counts.sum(-1)  # [N]
    return (jax.nn.one_hot(modal, (2 * g - 1) ** 2) * reliable[:, None]).max(0).sum()


def evaluate(state: State, cfg: Config):
    """Held-out options: q's accuracy (chance 1/N), the bound I^VB (options drawn uniformly,
    weighted by p^C), the baseline's empowerment estimate mean b(s_0), the distinct outcomes
    reached reliably, and the bound's ceiling log N."""
    key = jax.random.fold_in(state.key, 7)
    s0, omega, sf, log_q_all, log_p_c, b = eval_rollouts(state, cfg, key)
    log_q = take(log_q_all, omega)
    return {"q_accuracy": (jnp.argmax(log_q_all, -1) == omega).mean(),
            "empowerment_bound": empowerment_bound(log_q, log_p_c, jnp.exp(log_p_c)),
            "empowerment_estimate": b.mean(),
            "distinct_final_cells": distinct_outcomes(s0, omega, sf, cfg).astype(jnp.float32),
            "log_num_options": jnp.log(jnp.float32(cfg.num_options))}


# --- PLOT ---


def plot(res, cfg: Config, out: str, seed: int = 0):
    """Left: each option's final cells (one colour per option, marker size ~ frequency) from
    s_0; right: the bound I^VB over training (the batch mean of r) against log N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = jax.tree.map(lambda x: x[seed], res.state)
    s0, omega, sf = jax.jit(eval_rollouts, static_argnums=1)(
        one, cfg, jax.random.fold_in(one.key, 7))[:3]
    s0, omega, sf = np.asarray(s0), np.asarray(omega), np.asarray(sf)
    n = cfg.num_options
    cmap = plt.get_cmap("tab20" if n <= 20 else "hsv")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.6))
    for o in range(n):
        cells, cnt = np.unique(sf[omega == o], axis=0, return_counts=True)
        ang = 2 * np.pi * o / n  # each option nudged its own way so shared cells stay visible
        ax.scatter(cells[:, 1] + 0.25 * np.cos(ang), cells[:, 0] + 0.25 * np.sin(ang),
                   s=120 * cnt / cnt.max(), color=cmap(o if n <= 20 else o / n), label=str(o))
    if not cfg.random_start:
        ax.scatter([s0[0, 1]], [s0[0, 0]], marker="x", color="k", s=80, label="s_0")
    g = cfg.grid_size
    ax.set(xlim=(-0.6, g - 0.4), ylim=(g - 0.4, -0.6), aspect="equal", xticks=range(g),
           yticks=range(g), title=f"final cells of {n} options (T = {cfg.option_length})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    hist = res.history["charts/empowerment_bound"]  # [seeds, updates]
    for i, h in enumerate(hist):
        bx.plot(h, lw=0.8, label=f"seed {i}")
    bx.axhline(np.log(n), color="k", ls="--", lw=0.8, label="log N")
    bx.set(xlabel="update", ylabel="I^VB (nats)", title="empowerment bound E[r]")
    bx.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (final cells per option of seed 0, and I^VB)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["q_accuracy", "empowerment_bound",
                                              "empowerment_estimate", "distinct_final_cells",
                                              "charts/q_accuracy"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
