"""Episodic LSTM (DND-LSTM): meta-RL whose LSTM reinstates the cell state it had the last
time it met the same task, retrieved from an episodic memory keyed by the task's context.

[1] S. Ritter, J. X. Wang, Z. Kurth-Nelson, S. M. Jayakumar, C. Blundell, R. Pascanu,
    M. Botvinick. "Been There, Done That: Meta-Learning with Episodic Recall." ICML 2018,
    arXiv:1805.09692.
[2] A. Pritzel et al. "Neural Episodic Control." arXiv:1703.01988 (2017) (the DND).
Reference code read (not copied): qihongl/dnd-lstm, src/model/DNDLSTM.py and DND.py.
Section and equation numbers of [1] and [2] are from memory [M] (only the abstracts were
reachable); the equations themselves follow the post and qihongl's code.

A meta-RL agent (RL^2 / [Wang et al. 2016]) learns a new bandit inside its activations, and
forgets it when the next task begins. [1] adds a differentiable neural dictionary (DND):
keys are task-context embeddings, values are LSTM cell states. At the end of a trial the
agent writes (context, c_T); at every step it reads the value nearest to the current
context and adds it into the cell through a third, "reinstatement" gate:

    [i_t, f_t, o_t, r_t] = sigmoid(W [h_{t-1}, x_t] + b)            [1] Sec. 3 [M] / post
    c_in = tanh(W_c [h_{t-1}, x_t] + b_c)
    c_ep = DND-read(context): k-NN of the keys, weights w_i ∝ 1 / (||q - k_i||^2 + delta),
           times exp(-d2_min / tau) (ours: the match scale, see Differences)
    c_t  = i_t * c_in + f_t * c_{t-1} + r_t * c_ep                   [1] Eq. (1) [M] / post
    h_t  = o_t * tanh(c_t)
    DND-write(context, sg(c_T)) at the end of each trial                  [1] Sec. 3 [M]

pi(a | h_t) = softmax(W_pi h_t), V = w_v' h_t, trained by A2C on each trial's discounted
returns (advantage R_t - V_t, plus an entropy bonus). Gradients flow through h within a
trial; stored values are constants (stop-gradient), h is reset at every trial start.

Environment (ours, in-file): episodic contextual bandits. A block is one lifetime of one
agent: a pool of `num_tasks` tasks, each a K-armed Bernoulli bandit with one good arm
(p_best) and the others p_other, and a fixed random context in R^D. The block plays the
num_tasks tasks once each (first encounters), then again in a random order (re-encounters),
`pulls_per_trial` pulls per trial; the DND is empty at the block's start. The input is
x_t = [context, onehot(a_{t-1}), r_{t-1}] (a zero one-hot and r = 0 at a trial's first
pull). `--gate-off` is the broken variant (r_t = 0: a plain LSTM meta-learner): it cannot
tell a re-encountered task from a new one.

Reproduce (CPU demo; the figure draws the regret of each pull for first and repeated tasks
of the agent and of the gate-off variant):
    python metarl/episodic_lstm.py --preset quick --num-seeds 2 --gate-off --run-dir runs/elstm_off
    python metarl/episodic_lstm.py --preset quick --num-seeds 2 --plot metarl/episodic_lstm.png \
        --compare runs/elstm_off
Paper-sized (GPU): python metarl/episodic_lstm.py --preset paper
Ours (quick, 2-core CPU shared with other jobs, 13-20 s per command with compile; 500
updates of 32 blocks, 1.6M pulls, 2 seeds each, 256 evaluation blocks): expected regret
summed over the first 5 pulls of a trial (random play 2.0), first encounter -> re-encounter
(ratio), per seed:
    episodic LSTM     1.04 -> 0.15 (0.14),  0.86 -> 0.28 (0.32)
    gate r = 0        0.65 -> 0.67 (1.03),  0.75 -> 0.70 (0.93)
A re-encountered task is solved from its first pull (regret 0.035 / 0.059 against 0.41 of
a new task, figure metarl/episodic_lstm.png); the gate-off LSTM has no such gap. [1]'s
near-zero regret on recurring tasks (catalogue: ratio < 0.3) is reached on one seed of two
here. The price: at this budget first encounters cost MORE than with the plain LSTM (0.95
against 0.70: pulls 2-3 are slower). Training 4x longer (`--total-timesteps 6400000`) closes
that: first 0.66 / 0.69 (gate off 0.66 / 0.69), repeat 0.21 / 0.25 (gate off 0.64 / 0.66),
ratio 0.32 / 0.37 (gate off 0.96 / 0.97). Before the match scale (the plain k-NN read) the
same quick run gave ratio 0.59 / 0.68 with first encounters 0.90 / 1.45 and repeats no
better than the plain LSTM's: with k = 1 every read returns a full-size memory, on a first
encounter the nearest OTHER task's, and the gate, which sees only x_t and h, cannot tell
the two apart.

Differences from the paper:
- The task family is ours: [1]'s bandit experiments use hand-designed contexts (barcodes
  and Omniglot images [M]) and arm probabilities we did not re-read; here contexts are
  Gaussian vectors, one good arm per task, and each block replays every task exactly once.
  The `paper` preset keeps our bandit and uses larger sizes; its hyperparameters (hidden
  48, Adam 1e-3, 32 envs) are ours, not [1]'s (A3C, RMSProp [M]).
- c_ep enters the cell as in the post's equation (r_t * c_ep); qihongl/dnd-lstm adds
  r_t * tanh(c_ep), and [1] may too [M].
- The read is scaled by exp(-d2_min / tau) (`match_tau`, ours; neither [1] nor qihongl):
  an exact key match reads its value unchanged, another task's memory (d2 ~ 2 D for
  Gaussian contexts) reads almost zero. Since a re-encountered task's context repeats
  exactly, the scale here acts as a "seen before" flag: 1 on a re-encounter, while on a new
  task's read the measured exp(-d2_min / tau) has median 2e-5, 99th percentile 0.09 (quick
  sizes), median 1e-7 (paper sizes). So the agent meets no partial matches, and the gate-off
  arm (r = 0 drops c_ep whatever it is; it reads the same way) is really "memory off". The
  plain 1-NN read (no scale) did use memory too (ratio 0.59 / 0.68, numbers above) but paid
  for it on first encounters, where it reinstates another task's cell state at full size;
  NEC's 1 / (d^2 + delta) kernel with k > 1 was not tried as the alternative.
- Writes happen once per trial, of the last step's cell state (qihongl writes at the last
  step of a trial too, [1] [M]), but in EVERY trial, while qihongl writes only in the first
  phase (first encounters); the re-encounter memories are never read within a block, so
  this changes nothing but the slots used. The DND is a FIFO of `dict_size` slots (qihongl
  pops the oldest).
- Retrieval: k nearest keys by L2 with NEC's inverse-distance kernel; with k = 1 (default,
  qihongl's 1-NN) it is the nearest value exactly.
- The DND keys are the raw context vectors (no learned context embedding); qihongl's key
  is the whole input x_t (its noisy observation plus the context).
- A trial's first pull sees a zero one-hot for a_{t-1} (no previous pull).
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
from common.nets import orthogonal
from common.plot import save_png

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Episodic LSTM with A2C on episodic contextual bandits (sizes ours, see docstring)."""

    num_arms: int = 4
    """K: arms of every bandit task"""
    num_tasks: int = 10
    """tasks in a block's pool; each is met twice (first encounter, then re-encounter)"""
    pulls_per_trial: int = 10
    """pulls of one task in a trial (the LSTM state lives this long)"""
    context_dim: int = 16
    """D: dimension of a task's random Gaussian context (the DND key)"""
    p_best: float = 0.9
    """reward probability of the good arm"""
    p_other: float = 0.1
    """reward probability of every other arm"""
    hidden: int = 48
    """LSTM units (cell state = DND value)"""
    dict_size: int = 20
    """DND slots (FIFO); must be >= 2 num_tasks, else writes evict unrevisited tasks' memories"""
    num_neighbors: int = 1
    """k of the k-NN read (1: qihongl's 1-NN)"""
    kernel_delta: float = 1e-3
    """delta of the inverse-distance kernel 1 / (d^2 + delta) (NEC)"""
    match_tau: float = 1.0
    """tau of the read's match scale exp(-d2_min / tau) (ours, see Differences)"""
    gate_off: bool = False
    """broken variant: force the reinstatement gate r_t to 0 (a plain LSTM meta-learner)"""
    num_envs: int = 32
    """blocks (agents with their own DND) played in parallel per update"""
    total_timesteps: int = 12_800_000
    """pulls of the whole run"""
    lr: float = 1e-3
    """Adam learning rate"""
    gamma: float = 0.9
    """discount within a trial"""
    ent_coef: float = 0.05
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    early_pulls: int = 5
    """regret metrics sum the first `early_pulls` pulls of a trial"""
    eval_blocks: int = 256
    """evaluate(): fresh blocks played by the final policy"""
    dtype: str = "float32"
    """compute dtype of the LSTM and heads: float32 or bfloat16 (params stay float32)"""

    @property
    def trials_per_block(self) -> int:
        return 2 * self.num_tasks

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.trials_per_block * self.pulls_per_trial

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in (
            "num_arms",
            "num_tasks",
            "num_envs",
            "num_neighbors",
            "context_dim",
            "hidden",
            "dict_size",
            "pulls_per_trial",
            "eval_blocks",
            "early_pulls",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.num_arms < 2:
            raise ValueError(f"num_arms={self.num_arms} must be >= 2")
        if self.num_neighbors > self.dict_size:
            raise ValueError(
                f"num_neighbors={self.num_neighbors} must be <= dict_size={self.dict_size}"
            )
        if self.early_pulls > self.pulls_per_trial:
            raise ValueError(
                f"early_pulls={self.early_pulls} must be <= pulls_per_trial={self.pulls_per_trial}"
            )
        if not 0 <= self.p_other <= self.p_best <= 1:
            raise ValueError(f"need 0 <= p_other={self.p_other} <= p_best={self.p_best} <= 1")
        if self.kernel_delta <= 0:
            raise ValueError(f"kernel_delta={self.kernel_delta} must be > 0")
        if self.match_tau <= 0:
            raise ValueError(f"match_tau={self.match_tau} must be > 0")
        if self.num_updates < 1:
            raise ValueError(
                f"total_timesteps={self.total_timesteps} is less than one update "
                f"(num_envs * 2 num_tasks * pulls_per_trial = "
                f"{self.steps_per_update})"
            )


PRESETS = {
    # CPU demo: 2-armed bandits, 5 tasks met twice, 10 pulls; minutes on 2 cores.
    "quick": dict(
        num_arms=2,
        num_tasks=5,
        dict_size=10,
        context_dim=8,
        hidden=32,
        num_envs=32,
        total_timesteps=1_600_000,
        lr=5e-3,
        ent_coef=0.01,
    ),
    # larger pool and memory (GPU); bandit and learner as the defaults
    "paper": dict(
        num_arms=4,
        num_tasks=50,
        dict_size=100,
        hidden=128,
        num_envs=256,
        total_timesteps=256_000_000,
    ),
}


# --- ENVIRONMENT: episodic contextual bandits ---


def sample_block(key, cfg: Config):
    """One lifetime: contexts [M, D], arm probabilities [M, K], the task of each of the 2M
    trials (0..M-1, then a permutation of them) and whether it is a first encounter."""
    m = cfg.num_tasks
    k_ctx, k_arm, k_perm = jax.random.split(key, 3)
    contexts = jax.random.normal(k_ctx, (m, cfg.context_dim))
    best = jax.random.randint(k_arm, (m,), 0, cfg.num_arms)
    probs = jnp.where(jax.nn.one_hot(best, cfg.num_arms) > 0, cfg.p_best, cfg.p_other)
    order = jnp.concatenate([jnp.arange(m), jax.random.permutation(k_perm, m)])
    first = jnp.arange(2 * m) < m
    return contexts, probs, order, first


# --- EPISODIC MEMORY (DND) ---


def dnd_read(keys, values, count, query, k: int, delta: float, tau: float):
    """[2] Sec. 2.2 [M] read: the k nearest of the `min(count, S)` stored keys [S, D] to
    `query` [D] by squared L2, values [S, H] averaged with weights 1 / (d^2 + delta)
    normalised, then scaled by exp(-d2_min / tau) (ours: a far match reads near zero, so the
    cell can tell a remembered task from a new one); zeros while the memory is empty."""
    valid = jnp.arange(keys.shape[0]) < count
    d2 = ((keys - query) ** 2).sum(-1)
    neg, idx = jax.lax.top_k(jnp.where(valid, -d2, -jnp.inf), k)
    w = jnp.where(jnp.isfinite(neg), 1.0 / (-neg + delta), 0.0)
    w = w / jnp.maximum(w.sum(), 1e-30)
    match = jnp.exp(neg[0] / tau)  # exp(-d2_min / tau); 0 when empty
    return match * (w[:, None] * values[idx]).sum(0)


def dnd_write(keys, values, count, key, value):
    """Append (key, value) in slot count mod S (FIFO: the oldest memory goes first)."""
    slot = count % keys.shape[0]
    return keys.at[slot].set(key), values.at[slot].set(value), count + 1


# --- NETWORKS ---


class EpisodicLSTMCell(nn.Module):
    """One step of [1]'s LSTM with the reinstatement gate; returns ((h, c), r_t)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x, c_ep, gate_on):
        h, c = carry
        z = nn.Dense(
            5 * self.hidden, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=orthogonal(1.0)
        )(jnp.concatenate([h, x], -1))
        z = z.astype(jnp.float32)
        i, f, o, r, g = jnp.split(z, 5, -1)  # W [h_{t-1}, x_t] + b, five blocks of H
        i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
        r = jax.nn.sigmoid(r) * gate_on  # reinstatement gate ([1]; 0 in the broken variant)
        c_in = jnp.tanh(g)
        c = i * c_in + f * c + r * c_ep  # [1] Eq. (1) [M]: c_t = i c_in + f c_{t-1} + r c_ep
        h = o * jnp.tanh(c)
        return (h, c), r


class Agent(nn.Module):
    """Episodic LSTM -> policy logits [K] and value (A2C heads on h_t)."""

    num_arms: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x, c_ep, gate_on):
        carry, r = EpisodicLSTMCell(self.hidden, self.dtype)(carry, x, c_ep, gate_on)
        h = carry[0]
        logits = nn.Dense(self.num_arms, kernel_init=orthogonal(0.01), dtype=self.dtype)(h)
        v = nn.Dense(1, kernel_init=orthogonal(1.0), dtype=self.dtype)(h)[..., 0]
        return carry, logits.astype(jnp.float32), v.astype(jnp.float32), r


def network(cfg: Config) -> Agent:
    return Agent(cfg.num_arms, cfg.hidden, jnp.dtype(cfg.dtype))


def input_size(cfg: Config) -> int:
    return cfg.context_dim + cfg.num_arms + 1


# --- ROLLOUT: one block (lifetime) of one agent ---


def play_block(params, key, gate_on, cfg: Config):
    """2M trials of `pulls_per_trial` pulls with the DND carried from trial to trial. Returns
    per-step arrays [2M, T] (action, logp, entropy, value, reward, regret, gate) and c_ep
    [2M, H] in `out`, `first` [2M] and the block's final DND (keys, values, count)."""
    net = network(cfg)
    k_task, k_play = jax.random.split(key)
    contexts, probs, order, first = sample_block(k_task, cfg)
    n_k, h_dim = cfg.num_arms, cfg.hidden

    def trial(dnd, xs):
        task, k = xs
        ctx, p = contexts[task], probs[task]
        # one read per trial is exact: the query (the context) is the same all trial
        c_ep = dnd_read(*dnd, ctx, cfg.num_neighbors, cfg.kernel_delta, cfg.match_tau)

        def step(carry, k):
            hc, a_prev, r_prev = carry
            x = jnp.concatenate([ctx, jax.nn.one_hot(a_prev, n_k), r_prev[None]])
            hc, logits, v, gate = net.apply(params, hc, x, c_ep, gate_on)
            k_a, k_r = jax.random.split(k)
            a = jax.random.categorical(k_a, jax.lax.stop_gradient(logits))
            logp_all = jax.nn.log_softmax(logits)
            reward = jax.random.bernoulli(k_r, p[a]).astype(jnp.float32)
            out = dict(
                action=a,
                logp=logp_all[a],
                entropy=-(jnp.exp(logp_all) * logp_all).sum(),
                value=v,
                reward=reward,
                regret=p.max() - p[a],
                gate=gate.mean(),
            )
            return (hc, a, reward), out

        hc0 = (jnp.zeros(h_dim), jnp.zeros(h_dim))  # h reset at every trial start
        ((_, c_T), _, _), out = jax.lax.scan(
            step, (hc0, jnp.int32(-1), jnp.float32(0.0)), jax.random.split(k, cfg.pulls_per_trial)
        )  # a_prev = -1: onehot(-1) = 0, no previous pull at a trial's start
        dnd = dnd_write(*dnd, ctx, jax.lax.stop_gradient(c_T))  # write at the trial's end
        return dnd, (out, c_ep)

    dnd0 = (
        jnp.zeros((cfg.dict_size, cfg.context_dim)),
        jnp.zeros((cfg.dict_size, h_dim)),
        jnp.int32(0),
    )  # empty at the block's start
    dnd, (out, c_ep) = jax.lax.scan(
        trial, dnd0, (order, jax.random.split(k_play, 2 * cfg.num_tasks))
    )
    return dict(out, c_ep=c_ep), first, dnd


# --- LOSS ---


def discounted_returns(rewards, gamma):
    """R_t = sum_{s >= t} gamma^{s - t} r_s over the last axis (one trial, no bootstrap)."""

    def back(g, r):
        g = r + gamma * g
        return g, g

    _, ret = jax.lax.scan(
        back, jnp.zeros(rewards.shape[:-1]), jnp.moveaxis(rewards, -1, 0), reverse=True
    )
    return jnp.moveaxis(ret, 0, -1)


def a2c_loss(logp, adv, entropy, value, returns, vf_coef, ent_coef):
    """A2C: -E[log pi(a|h) sg(A)] + vf_coef 1/2 E[(V - R)^2] - ent_coef E[H(pi)]."""
    pg = -(logp * jax.lax.stop_gradient(adv)).mean()
    v_loss = 0.5 * ((value - returns) ** 2).mean()
    ent = entropy.mean()
    return pg + vf_coef * v_loss - ent_coef * ent, {
        "losses/policy": pg,
        "losses/value": v_loss,
        "losses/entropy": ent,
    }


def early_regret(regret, first, n: int):
    """Expected regret summed over the first n pulls of a trial, averaged separately over
    first-encounter and re-encounter trials: regret [..., 2M, T], first [..., 2M]."""
    r = regret[..., :n].sum(-1)
    return (r * first).sum() / first.sum(), (r * ~first).sum() / (~first).sum()


# --- STATE / UPDATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    key: jax.Array
    gate_on: jax.Array  # float 1.0, or 0.0 for the broken variant (traced, so it vmaps)


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr))


def init(key, cfg: Config) -> State:
    k_net, key = jax.random.split(key)
    z = jnp.zeros(cfg.hidden)
    params = network(cfg).init(k_net, (z, z), jnp.zeros(input_size(cfg)), z, 1.0)
    return State(
        params, make_optimizer(cfg).init(params), key, jnp.float32(0.0 if cfg.gate_off else 1.0)
    )


def update(state: State, cfg: Config):
    key, k_env = jax.random.split(state.key)

    def loss_fn(params):
        out, first, _ = jax.vmap(play_block, (None, 0, None, None))(
            params, jax.random.split(k_env, cfg.num_envs), state.gate_on, cfg
        )  # [N, 2M, T]
        ret = discounted_returns(out["reward"], cfg.gamma)
        loss, m = a2c_loss(
            out["logp"],
            ret - out["value"],
            out["entropy"],
            out["value"],
            ret,
            cfg.vf_coef,
            cfg.ent_coef,
        )
        return loss, (m, out, first)

    (_, (metrics, out, first)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    r_first, r_repeat = early_regret(out["regret"], first, cfg.early_pulls)
    metrics.update(
        {
            "charts/regret_first": r_first,
            "charts/regret_repeat": r_repeat,
            "charts/reward_per_step": out["reward"].mean(),
            "charts/gate": out["gate"].mean(),
            "losses/grad_norm": optax.global_norm(grads),
        }
    )
    return State(params, opt_state, key, state.gate_on), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """`eval_blocks` fresh blocks with the final policy: expected regret of each pull for
    first and repeated tasks (`regret_first/<t>`, `regret_repeat/<t>`), their sums over the
    first `early_pulls` pulls and the ratio repeat / first ([1]'s claim: well below 1)."""
    out, first, _ = jax.vmap(play_block, (None, 0, None, None))(
        state.params,
        jax.random.split(jax.random.fold_in(state.key, 1), cfg.eval_blocks),
        state.gate_on,
        cfg,
    )
    f = first[..., None]
    curve_first = (out["regret"] * f).sum((0, 1)) / f.sum((0, 1))
    curve_repeat = (out["regret"] * ~f).sum((0, 1)) / (~f).sum((0, 1))
    res = {f"regret_first/{t:02d}": curve_first[t] for t in range(cfg.pulls_per_trial)}
    res.update({f"regret_repeat/{t:02d}": curve_repeat[t] for t in range(cfg.pulls_per_trial)})
    r_first, r_repeat = early_regret(out["regret"], first, cfg.early_pulls)
    res.update(
        early_regret_first=r_first,
        early_regret_repeat=r_repeat,
        early_ratio=r_repeat / jnp.maximum(r_first, 1e-6),
        gate_repeat=(out["gate"] * ~f).sum() / (~f).sum() / cfg.pulls_per_trial,
    )
    return res


# --- PLOT ---


def plot_regret(runs, out: str):
    """Expected regret of each pull of a trial (mean over seeds), first encounters dashed
    and re-encounters solid, one colour per (evaluate() output, label) in `runs`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (final, label), color in zip(runs, ("C0", "C3", "C2"), strict=False):
        for kind, ls in (("first", "--"), ("repeat", "-")):
            keys = sorted(k for k in final if k.startswith(f"regret_{kind}/"))
            y = np.stack([np.atleast_1d(np.asarray(final[k])) for k in keys], -1)
            x = np.arange(1, y.shape[-1] + 1)
            ax.plot(
                x,
                y.mean(0),
                ls,
                color=color,
                marker="o",
                ms=3,
                label=f"{label}, {kind} encounter ({y.shape[0]} seeds)",
            )
    ax.set_xlabel("pull within the trial")
    ax.set_ylabel("expected regret of the pull")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def _label(gate_off: bool) -> str:
    return "LSTM (gate r = 0)" if gate_off else "episodic LSTM"


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (regret per pull of this run) and `--compare
    RUN_DIR` (also draw an earlier run's curves, from its summary.json)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    out, other = flags["--plot"], flags["--compare"]
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[
            "early_regret_first",
            "early_regret_repeat",
            "early_ratio",
            "charts/reward_per_step",
        ],
    )
    if out is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        runs = [(res.final, _label(cfg.gate_off))]
        if other is not None:
            summary = json.loads((Path(other) / "summary.json").read_text())
            record = json.loads((Path(other) / "config.json").read_text())
            runs.append((summary, _label(record["config"]["gate_off"])))
        print("wrote", plot_regret(runs, out))
    return res


if __name__ == "__main__":
    main()
