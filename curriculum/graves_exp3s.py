"""Automated Curriculum Learning: an Exp3.S bandit over tasks, rewarded by learning progress.

[1] A. Graves, M. G. Bellemare, J. Menick, R. Munos, K. Kavukcuoglu. "Automated Curriculum
    Learning for Neural Networks." ICML 2017, arXiv:1704.03003. No released code.
[2] P. Auer, N. Cesa-Bianchi, Y. Freund, R. E. Schapire. "The Nonstochastic Multiarmed
    Bandit Problem." SIAM J. Comput. 2002 (Exp3.S).
[3] A. Graves, G. Wayne, I. Danihelka. "Neural Turing Machines." arXiv:1410.5401 (the
    repeat-copy task).

A curriculum of N tasks is an N-armed bandit. Every step the teacher draws a task k from its
policy pi, the student (an LSTM) takes one Adam step on a batch x of task k, and the
teacher is paid the student's learning progress nu ([1]'s Exp3.S curriculum algorithm;
its section and equation numbers were not checked here, so lines cite it by name):

    pi_t(i) = (1 - eps) exp(w_i) / sum_j exp(w_j) + eps / N          [1] Exp3.S policy
    r^_t = nu / tau(x)   (progress per time step; tau = the sequence's length)  [1] (memory)
    q^lo, q^hi = 20th / 80th percentiles of the history R of unscaled r^   [1] rescaling
                 (R: a reservoir sample of all r^ so far, [1])
    r_t = -1 if r^ < q^lo;  1 if r^ > q^hi;  2 (r^ - q^lo) / (q^hi - q^lo) - 1 else
    r~_i = (r_t 1[i = k] + beta) / pi_t(i)          (importance-weighted reward)
    w_i <- log[(1 - a_t) exp(w_i + eta r~_i) + a_t / (N - 1) sum_{j!=i} exp(w_j + eta r~_j)]
                                                    (Exp3.S weight sharing, a_t = 1 / t)
Progress signals ([1]'s loss-driven signals; theta' the parameters after the step on x):
    PG   nu = L(x, theta) - L(x, theta')                    prediction gain
    GPG  nu = ||grad L(x, theta)||^2                        gradient prediction gain
    SPG  nu = L(x', theta) - L(x', theta'),  x' ~ D_k       self prediction gain
    TPG  nu = L(x', theta) - L(x', theta'),  x' ~ D_N       target prediction gain
    MPG  nu = L(x', theta) - L(x', theta'),  x' ~ D_j, j ~ U(N)   mean prediction gain
and one complexity signal, for a student trained on L(x, theta) + l2_coef / 2 ||theta||^2:
    L2G  nu = ||theta'||^2 - ||theta||^2                    L2 gain [M]

Tasks: repeat copy (one of [1]'s curricula, after [3]): the LSTM reads `l` random bit
vectors, then a delimiter carrying the repeat count `r`, and must then output the sequence
`r` times and an end marker. Task (l, r) for l <= max_length, r <= max_repeats; the target
task N is the hardest, (max_length, max_repeats). The loss L is the binary cross-entropy
summed over the output steps and bits (nats per sequence), averaged over the batch.

Baselines in the same run: `teachers` lists the students trained side by side, each with
its own teacher, from the same initial parameters: `exp3s`, `uniform` (p = 1/N) and
`target` (the target task only); `anti` is a broken Exp3.S whose rescaled reward has its
sign flipped (it drills the tasks where the student learns least).

Reproduce (CPU, 2-core; the plot curriculum/graves_exp3s.png):
    python curriculum/graves_exp3s.py --preset quick --num-seeds 2 \
        --plot curriculum/graves_exp3s.png
    python curriculum/graves_exp3s.py --preset quick --num-seeds 2 --signal spg
Measured (`quick`: 4 x 3 tasks, PG per time step, reservoir history of 300, 2 seeds, one
run holding the three students; 2-core CPU shared with other jobs, 132 s compile + 779 s,
983 s wall): target-task loss (nats per sequence) after 3000 steps / its mean over the
run's evaluations (auc), and the loss averaged over all 12 tasks at the end, per seed:
    exp3s        7.64, 8.76 / 22.7, 22.8    all tasks 2.02, 3.10
    uniform     17.9, 25.0  / 27.0, 26.5    all tasks 4.63, 5.65
    target-only  6.95, 9.33 / 17.8, 18.9    all tasks 28.6, 31.4
Exp3.S moves its mass to the longest sequences (p(length 4) 0.25 over the first 50 steps
-> 0.65, 0.79 over the last 300, the plot) and ends level with target-only training on the
target task while keeping the other tasks; target-only training learns the target fastest
at this size (lower auc).
Paper setting (GPU; 13 x 13 repeat-copy tasks):
    python curriculum/graves_exp3s.py --preset paper
[1]'s headline (abstract): the curriculum "can significantly accelerate learning, in some
cases halving the time required to attain a satisfactory performance level"; its figures
also show uniform sampling competitive on several tasks. No numbers are read off its plots
here (no copy of the PDF in this environment).

Sources of the defaults. The equations above are [1]'s as the post and the catalogue
summarise them. Two public re-implementations of [1] were read; they differ from each other
(and were not checked against [1]'s text either), so each choice says which one it follows:
- the numpy `Exp3S(num_tasks, eta, beta, eps)` class of MarkPKCollier/CurriculumLearningFYP
  (tasks/exp3S.py, built there with eta 1e-3, beta 0, eps 0.05): followed for eta 1e-3, beta
  added to every arm before the importance weighting, the sharing term a_t / (N - 1) over
  the other arms with a_t = 1/t, and the quantile order (the current reward enters the
  history before the quantiles are taken). Its quantiles are order statistics of a sorted
  list; here numpy's linear interpolation.
- ESPnet's `EXP3SCurriculumGenerator`: eps 0.05 and beta 0 as here, but eta 0.01, beta only
  on the played arm, its own form of the sharing term, and quantiles taken BEFORE the
  current reward is added. Followed for the history size 10,000 (its hist_size; the numpy
  class keeps 50,000).
Unverified choice: whether [1] includes the current reward in the quantile history (here:
yes, as the numpy class). The repeat-copy sizes (13 x 13 tasks, 8 bits, LSTM 512, batch 32)
and Adam 1e-4 are from memory of [1]'s appendix and [3], NOT verified against the paper
text ([3]'s repeat copy was trained with RMSProp, momentum 0.9); total_steps, eval_size,
eval_every and history_size are this file's choices, not [1]'s.

Differences from the paper:
- The history R is a reservoir sample ([1]) of `history_size` slots (ESPnet's 10,000; the
  size [1] used is not known here): the first H rewards fill the slots, reward number c > H
  overwrites a slot j ~ U{0..c-1} if j < H, else is dropped. Bounded because the quantiles
  are recomputed (a sort) every step. Quantiles are numpy's linear interpolation over the
  filled slots. While the history holds a single value (q^lo = q^hi), the rescaled reward
  is 0.
- The repeat-count input on the delimiter step is r / max_repeats; [3] normalised the
  repeat count to mean 0, variance 1.
- [1] reports that training on the 13 x 13 repeat-copy target task alone failed to learn;
  at the `quick` size (4 x 3 tasks) target-only training learns the target fastest (below),
  so the quick run shows the curriculum's shift and its cover of the other tasks, not [1]'s
  rescue of an unlearnable target.
- [1]'s variational complexity signals (VCG, GVCG) are not implemented: the student is a
  maximum-likelihood LSTM, not a variational one. L2G is, from memory of [1] ([M]: the
  paper text was not found with the search tool): only with `--signal l2g` the student's
  loss carries the L2 penalty l2_coef / 2 ||theta||^2 (all parameters, biases included);
  l2_coef 1e-4 is this file's choice, unverified.
- The n-gram and bAbI curricula of [1] need corpora; only repeat copy is here.
- Every student is evaluated on a fixed set of `eval_size` sequences per task every
  `eval_every` steps (the target-task loss of the plot); [1] plots the same quantity.
- `quick`: 4 x 3 tasks, 4 bits, LSTM 64, batch 16, Adam 3e-3, eta 1e-2 (1e-3 barely moves
  the weights in 3000 steps), history 300, 3000 steps.
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
from common.plot import save_png

TEACHERS = ("exp3s", "uniform", "target", "anti")
"""Exp3.S; the uniform and target-only baselines; the broken Exp3.S with its reward negated."""
SIGNALS = ("pg", "gpg", "spg", "tpg", "mpg", "l2g")
"""[1]'s loss-driven progress signals and its L2 complexity gain."""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Exp3.S curriculum on repeat copy. The bandit's defaults follow the re-implementations
    named in the module docstring; the task and student sizes are [1]'s as remembered (NOT
    verified); fields marked unverified are this file's choices."""

    teachers: tuple[str, ...] = ("exp3s", "uniform", "target")
    """students trained side by side, one per teacher: exp3s | uniform | target | anti
    (anti: broken, Exp3.S with the rescaled reward's sign flipped)"""
    signal: str = "pg"
    """learning-progress signal paid to the teacher: pg | gpg | spg | tpg | mpg | l2g (see
    above; l2g also adds the L2 penalty to the student's loss)"""
    l2_coef: float = 1e-4
    """L2 penalty coefficient of the student's loss, used with --signal l2g only
    (unverified)"""
    eta: float = 1e-3
    """Exp3.S learning rate eta on the importance-weighted rewards"""
    beta: float = 0.0
    """Exp3.S bias beta added to every arm's reward before importance weighting"""
    epsilon: float = 0.05
    """uniform exploration mass mixed into the teacher's policy"""
    history_size: int = 10_000
    """slots of the reservoir sample of unscaled rewards behind the rescaling quantiles
    (ESPnet's hist_size 10000; not [1]'s, unverified)"""
    quantile_lo: float = 0.2
    """quantile of the history mapped to reward -1"""
    quantile_hi: float = 0.8
    """quantile of the history mapped to reward +1"""
    per_time_step: bool = True
    """divide the progress by the sample's cost tau(x), its sequence length"""
    max_length: int = 13
    """repeat copy: sequence lengths 1..max_length"""
    max_repeats: int = 13
    """repeat copy: repeat counts 1..max_repeats"""
    num_bits: int = 8
    """bits per vector of the copied sequence"""
    hidden_size: int = 512
    """LSTM units of the student"""
    batch_size: int = 32
    """sequences of one task per student step"""
    lr: float = 1e-4
    """Adam learning rate of the student (unverified: [3]'s repeat copy used RMSProp,
    momentum 0.9)"""
    eval_size: int = 8
    """fixed evaluation sequences per task (unverified)"""
    eval_every: int = 100
    """steps between evaluations of every student on every task (unverified)"""
    total_steps: int = 200_000
    """teacher steps (one Adam step of every student each; unverified)"""
    dtype: str = "float32"
    """compute dtype of the LSTM and the output layer: float32 | bfloat16"""

    @property
    def num_tasks(self) -> int:
        return self.max_length * self.max_repeats

    @property
    def seq_len(self) -> int:
        """Padded time steps: input l, delimiter, l r outputs, end marker."""
        return self.max_length + 2 + self.max_length * self.max_repeats

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * len(self.teachers)

    def validate(self):
        if not self.teachers or len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"teachers={self.teachers} must be non-empty, without repeats")
        for t in self.teachers:
            if t not in TEACHERS:
                raise ValueError(f"teachers: {t!r} must be one of {TEACHERS}")
        for name, options in (("signal", SIGNALS), ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {options}")
        if not self.eta > 0:
            raise ValueError(f"eta={self.eta} must be > 0")
        if not self.l2_coef >= 0:
            raise ValueError(f"l2_coef={self.l2_coef} must be >= 0")
        if not self.beta >= 0:
            raise ValueError(f"beta={self.beta} must be >= 0")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1]")
        if not 0 <= self.quantile_lo < self.quantile_hi <= 1:
            raise ValueError(f"quantile_lo={self.quantile_lo}, quantile_hi={self.quantile_hi}"
                             " must satisfy 0 <= quantile_lo < quantile_hi <= 1")
        for name in ("max_length", "max_repeats", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.eval_every > self.total_steps:
            raise ValueError(f"eval_every={self.eval_every} must be <= total_steps="
                             f"{self.total_steps} (else no evaluation runs)")
        if self.num_tasks < 2:
            raise ValueError(f"max_length * max_repeats = {self.num_tasks} must be >= 2 "
                             "(Exp3.S shares weight among N - 1 other arms)")


PRESETS = {
    "quick": dict(max_length=4, max_repeats=3, num_bits=4, hidden_size=64, batch_size=16,
                  lr=3e-3, eta=1e-2, history_size=300, eval_every=25, total_steps=3000),
    "paper": dict(),
}

# --- TASK: repeat copy ---


def task_shape(task, max_repeats):
    """Task index k -> (length l, repeats r), k = (l - 1) max_repeats + (r - 1)."""
    return 1 + task // max_repeats, 1 + task % max_repeats


def task_cost(task, max_repeats):
    """tau(x): the time steps a sequence of the task occupies (l + 1 + l r + 1)."""
    l, r = task_shape(task, max_repeats)
    return l + 2 + l * r


def repeat_copy(key, tasks, cfg: Config):
    """A batch of repeat-copy sequences, one per entry of `tasks` [B] ([3] Sec. 4.2):
    inputs [B, T, bits + 2] (bits; delimiter flag; repeat count / max_repeats on the
    delimiter step), targets [B, T, bits + 1] (the sequence r times, then the end flag) and
    the mask [B, T] of the output steps l + 1 .. l + 1 + l r."""
    big_t, nb = cfg.seq_len, cfg.num_bits
    l, r = task_shape(tasks, cfg.max_repeats)
    l, r = l[:, None], r[:, None]  # [B, 1]
    bits = jax.random.bernoulli(key, 0.5, (tasks.shape[0], cfg.max_length, nb))
    bits = bits.astype(jnp.float32)  # [B, Lmax, bits]
    t = jnp.arange(big_t)[None]  # [1, T]
    inp_bits = jnp.take_along_axis(bits, jnp.clip(t, 0, cfg.max_length - 1)[..., None]
                                   .repeat(tasks.shape[0], 0), axis=1)  # [B, T, bits]
    inp_bits = inp_bits * (t < l)[..., None]
    delim = (t == l).astype(jnp.float32)  # [B, T]
    x = jnp.concatenate([inp_bits, delim[..., None],
                         (delim * r / cfg.max_repeats)[..., None]], -1)
    out_t = t - l - 1  # output step index
    src = jnp.clip(out_t % l, 0, cfg.max_length - 1)  # [B, T]
    out_bits = jnp.take_along_axis(bits, src[..., None], axis=1)  # [B, T, bits]
    copying = (out_t >= 0) & (out_t < l * r)
    end = out_t == l * r
    y = jnp.concatenate([out_bits * copying[..., None], end[..., None]], -1)
    return x, y.astype(jnp.float32), (copying | end).astype(jnp.float32)


# --- NETWORKS ---


class Student(nn.Module):
    """One LSTM layer over the sequence (forget-gate bias 1), a linear read-out of bits + 1
    logits per step: [B, T, F] -> [B, T, out]."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h_dim, dt = self.hidden, self.dtype
        wx = self.param("wx", nn.initializers.lecun_normal(), (x.shape[-1], 4 * h_dim))
        wh = self.param("wh", nn.initializers.orthogonal(), (h_dim, 4 * h_dim))
        b = self.param("b", lambda k, s: jnp.zeros(s).at[h_dim:2 * h_dim].set(1.0),
                       (4 * h_dim,))
        xw = jnp.einsum("btf,fg->tbg", x.astype(dt), wx.astype(dt)) + b  # [T, B, 4H]

        def step(carry, xw_t):
            h, c = carry
            z = (xw_t + h.astype(dt) @ wh.astype(dt)).astype(jnp.float32)  # [B, 4H]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((x.shape[0], h_dim))
        _, hs = jax.lax.scan(step, (zeros, zeros), xw)  # [T, B, H]
        y = nn.Dense(self.out, dtype=dt)(jnp.swapaxes(hs, 0, 1))
        return y.astype(jnp.float32)  # [B, T, out]


def make_model(cfg: Config):
    return Student(cfg.hidden_size, cfg.num_bits + 1, jnp.dtype(cfg.dtype))


def sequence_loss(params, model, batch):
    """Binary cross-entropy summed over the output steps and bits: nats per sequence [B]."""
    x, y, mask = batch
    bce = optax.sigmoid_binary_cross_entropy(model.apply(params, x), y).sum(-1)  # [B, T]
    return (bce * mask).sum(-1)


# --- PROGRESS SIGNALS ---


def other_task(signal, key, k, num_tasks):
    """The task of x' for SPG (k), TPG (the target N) and MPG (uniform); None otherwise."""
    if signal == "spg":
        return k
    if signal == "tpg":
        return jnp.asarray(num_tasks - 1)
    if signal == "mpg":
        return jax.random.randint(key, (), 0, num_tasks)
    return None


def progress(signal, loss_fn, theta, theta_new, grads, x, x_other):
    """[1]'s progress nu for one step theta -> theta_new taken on batch x (loss_fn(params,
    batch) -> scalar): PG on x itself, GPG the squared gradient norm, SPG/TPG/MPG on x',
    L2G the growth of the squared parameter norm."""
    if signal == "l2g":
        return (optax.tree.norm(theta_new, squared=True)
                - optax.tree.norm(theta, squared=True))
    if signal == "gpg":
        return optax.tree.norm(grads, squared=True)
    batch = x if signal == "pg" else x_other
    return loss_fn(theta, batch) - loss_fn(theta_new, batch)


# --- TEACHER: Exp3.S with the rescaled reward ---


def exp3s_policy(w, epsilon):
    """[1]'s Exp3.S policy: pi = (1 - eps) softmax(w) + eps / N."""
    return (1 - epsilon) * jax.nn.softmax(w) + epsilon / w.shape[0]


def teacher_policy(w, teacher, cfg: Config):
    """pi over the tasks for a traced teacher index into TEACHERS."""
    n = w.shape[0]
    return jnp.select([teacher == TEACHERS.index("uniform"), teacher == TEACHERS.index("target")],
                      [jnp.full(n, 1.0 / n), jax.nn.one_hot(n - 1, n)],
                      exp3s_policy(w, cfg.epsilon))


def reservoir_add(hist, raw, step, key):
    """Reservoir sampling ([1]'s history; Vitter's algorithm R) of the stream of unscaled
    rewards into H fixed slots: reward number c = step + 1 goes to slot step while c <= H;
    later ones draw j ~ U{0..c-1} and overwrite slot j if j < H, else are dropped, so every
    reward seen so far is kept with probability H / c."""
    h = hist.shape[0]
    j = jnp.where(step < h, step, jax.random.randint(key, (), 0, jnp.maximum(step + 1, 1)))
    return jnp.where(j < h, hist.at[jnp.minimum(j, h - 1)].set(raw), hist)


def rescale(raw, hist, count, q_lo, q_hi):
    """Map the unscaled reward to [-1, 1] by the q_lo/q_hi quantiles of the history's first
    min(count, H) entries (the filled slots, numpy's linear interpolation); 0 while they
    agree."""
    valid = jnp.arange(hist.shape[0]) < count
    lo, hi = jnp.nanquantile(jnp.where(valid, hist, jnp.nan), jnp.array([q_lo, q_hi]))
    scaled = 2 * (raw - lo) / jnp.where(hi > lo, hi - lo, 1.0) - 1
    return jnp.where(hi > lo, jnp.clip(scaled, -1.0, 1.0), 0.0)


def exp3s_update(w, pi, k, r, t, eta, beta):
    """Exp3.S ([2], as [1] uses it), at step t >= 1 with a_t = 1/t:
    r~_i = (r 1[i=k] + beta) / pi_i;  a = w + eta r~;
    w_i <- log[(1 - a_t) e^{a_i} + a_t / (N - 1) sum_{j != i} e^{a_j}]  (in log space)."""
    n = w.shape[0]
    safe_pi = jnp.where(pi > 0, pi, 1.0)  # a one-hot pi (the target-only baseline): no 0/0
    r_tilde = (r * jax.nn.one_hot(k, n) + beta) / safe_pi  # importance-weighted reward
    a = w + eta * r_tilde
    alpha = 1.0 / t
    others = jax.nn.logsumexp(jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, a[None]), axis=1)
    return jnp.logaddexp(jnp.log1p(-alpha) + a, jnp.log(alpha / (n - 1)) + others)


def teacher_step(w, hist, raw, k, pi, teacher, step, key, cfg: Config):
    """[1]'s teacher update after the student's step `step` (0-based) on task k ~ pi: add
    the unscaled reward to the reservoir, rescale it by the history's quantiles (this reward
    included when kept), and update the Exp3.S weights (only for exp3s and anti: the
    baselines' w stays 0). Returns (w, hist, rescaled reward)."""
    hist = reservoir_add(hist, raw, step, key)
    r = rescale(raw, hist, step + 1, cfg.quantile_lo, cfg.quantile_hi)
    r = jnp.where(teacher == TEACHERS.index("anti"), -r, r)  # the broken teacher
    w_new = exp3s_update(w, pi, k, r, (step + 1).astype(jnp.float32), cfg.eta, cfg.beta)
    bandit = (teacher == TEACHERS.index("exp3s")) | (teacher == TEACHERS.index("anti"))
    return jnp.where(bandit, w_new, w), hist, r  # the baselines keep w = 0


# --- STATE ---


@struct.dataclass
class Learner:
    """One student and its teacher (every leaf has a leading teachers axis in State)."""

    params: Any
    opt_state: Any
    w: jax.Array  # [N] Exp3.S weights
    hist: jax.Array  # [H] reservoir sample of the unscaled rewards
    eval_loss: jax.Array  # [N] loss per task at the last evaluation
    target_sum: jax.Array  # () sum of the target-task loss over evaluations (for the auc)


@struct.dataclass
class State:
    learners: Learner
    teacher: jax.Array  # [M] indices into TEACHERS (traced)
    eval_batch: Any  # fixed (x, y, mask) of eval_size sequences per task
    eval_task: jax.Array  # [N E] their tasks
    step: jax.Array  # () steps done
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_model, k_eval, key = jax.random.split(key, 3)
    n, m = cfg.num_tasks, len(cfg.teachers)
    eval_task = jnp.repeat(jnp.arange(n), cfg.eval_size)
    eval_batch = repeat_copy(k_eval, eval_task, cfg)
    params = make_model(cfg).init(k_model, eval_batch[0][:1])  # shared by all students
    one = Learner(params, optax.adam(cfg.lr).init(params), jnp.zeros(n),
                  jnp.zeros(cfg.history_size), jnp.zeros(n), jnp.zeros(()))
    learners = jax.tree.map(lambda v: jnp.broadcast_to(v, (m,) + v.shape), one)
    teacher = jnp.array([TEACHERS.index(t) for t in cfg.teachers], jnp.int32)
    return State(learners, teacher, eval_batch, eval_task, jnp.zeros((), jnp.int32), key)


# --- UPDATE ---


def evaluate_tasks(params, model, eval_batch, eval_task, num_tasks):
    """Mean loss per task on the fixed evaluation set: [N]."""
    loss = sequence_loss(params, model, eval_batch)
    return jax.ops.segment_sum(loss, eval_task, num_tasks) / jnp.maximum(
        jax.ops.segment_sum(jnp.ones_like(loss), eval_task, num_tasks), 1)


def learner_step(ln: Learner, teacher, key, step, state: State, cfg: Config):
    """One teacher step: pick a task, train one Adam step on it, pay the progress."""
    model, tx, n = make_model(cfg), optax.adam(cfg.lr), cfg.num_tasks
    k_pick, k_x, k_other_task, k_other, k_hist = jax.random.split(key, 5)
    pi = teacher_policy(ln.w, teacher, cfg)
    k = jax.random.categorical(k_pick, jnp.log(pi))
    x = repeat_copy(k_x, jnp.full(cfg.batch_size, k), cfg)

    def loss_fn(p, batch):
        return sequence_loss(p, model, batch).mean()

    def train_loss(p):  # L2G's student is L2-regularised; the others are not
        data = loss_fn(p, x)
        if cfg.signal != "l2g":
            return data, data
        return data + cfg.l2_coef / 2 * optax.tree.norm(p, squared=True), data

    (_, loss), grads = jax.value_and_grad(train_loss, has_aux=True)(ln.params)
    updates, opt_state = tx.update(grads, ln.opt_state, ln.params)
    params = optax.apply_updates(ln.params, updates)

    j = other_task(cfg.signal, k_other_task, k, n)
    x_other = None if j is None else repeat_copy(k_other, jnp.full(cfg.batch_size, j), cfg)
    nu = progress(cfg.signal, loss_fn, ln.params, params, grads, x, x_other)
    raw = nu / task_cost(k, cfg.max_repeats) if cfg.per_time_step else nu

    w, hist, r = teacher_step(ln.w, ln.hist, raw, k, pi, teacher, step, k_hist, cfg)

    do_eval = (step + 1) % cfg.eval_every == 0
    eval_loss = jax.lax.cond(do_eval, lambda: evaluate_tasks(
        params, model, state.eval_batch, state.eval_task, n), lambda: ln.eval_loss)
    target_sum = ln.target_sum + jnp.where(do_eval, eval_loss[-1], 0.0)
    out = Learner(params, opt_state, w, hist, eval_loss, target_sum)
    return out, {"loss": loss, "progress": nu, "reward": r, "pi": pi, "task": k}


def update(state: State, cfg: Config):
    key, k_step = jax.random.split(state.key)
    keys = jax.random.split(k_step, len(cfg.teachers))
    learners, m = jax.vmap(lambda ln, t, k: learner_step(ln, t, k, state.step, state, cfg))(
        state.learners, state.teacher, keys)
    metrics = {}
    for i, name in enumerate(cfg.teachers):
        metrics[f"losses/student_{name}"] = m["loss"][i]
        metrics[f"charts/target_loss_{name}"] = learners.eval_loss[i, -1]
        metrics[f"charts/mean_loss_{name}"] = learners.eval_loss[i].mean()
        metrics[f"charts/p_target_{name}"] = m["pi"][i, -1]
    # the first teacher's curriculum: its policy summed over repeats (per length) and over
    # lengths (per repeat count), its progress signal and rescaled reward
    pi = m["pi"][0].reshape(cfg.max_length, cfg.max_repeats)
    for l in range(cfg.max_length):
        metrics[f"charts/p_length{l + 1}"] = pi[l].sum()
    for r in range(cfg.max_repeats):
        metrics[f"charts/p_repeats{r + 1}"] = pi[:, r].sum()
    metrics["charts/progress"] = m["progress"][0]
    metrics["charts/reward"] = m["reward"][0]
    return state.replace(learners=learners, step=state.step + 1, key=key), metrics


def evaluate(state: State, cfg: Config):
    """Per teacher: the target-task loss at the last evaluation and its mean over all
    evaluations (auc: the area under the target loss curve, lower is better); NaN by design
    when fewer than eval_every steps ran (no evaluation yet)."""
    n_evals = state.step // cfg.eval_every
    nan_if_none = lambda v: jnp.where(n_evals > 0, v, jnp.nan)  # no evaluation ran: NaN
    out = {}
    for i, name in enumerate(cfg.teachers):
        out[f"target_loss_{name}"] = nan_if_none(state.learners.eval_loss[i, -1])
        out[f"target_auc_{name}"] = nan_if_none(
            state.learners.target_sum[i] / jnp.maximum(n_evals, 1))
    return out


# --- PLOT ---


def plot_curriculum(run_dir, out):
    """The first teacher's policy over lengths and over repeat counts (stacked, mean over
    seeds), and the target-task loss of every teacher's student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    steps = np.array([r["update"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, count in ((axes[0], "length", c["max_length"]),
                            (axes[1], "repeats", c["max_repeats"])):
        ps = [plot.smooth(plot.curve(rows, f"charts/p_{name}{i + 1}")[1], 50).mean(1)
              for i in range(count)]
        colors = plt.cm.viridis(np.linspace(0, 0.95, count))
        ax.stackplot(steps, ps, colors=colors, labels=[f"{name} {i + 1}" for i in range(count)])
        ax.set(ylabel=f"p({name}) chosen by {c['teachers'][0]}", ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper right")
    for name in c["teachers"]:
        _, y, _ = plot.curve(rows, f"charts/target_loss_{name}")
        keep = steps >= c["eval_every"]
        axes[2].plot(steps[keep], y[keep].mean(1), label=name)
    axes[2].set(ylabel=f"target-task loss (nats / sequence), task ({c['max_length']}, "
                       f"{c['max_repeats']})", yscale="log")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("teacher steps")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Exp3.S ({c['signal'].upper()}) on {c['max_length']} x {c['max_repeats']} "
                 f"repeat-copy tasks, {y.shape[1]} seeds", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the curriculum of the run."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[f"{k}_{t}" for t in TEACHERS for k in (
                       "target_loss", "target_auc")])
    if flags["--plot"] is not None:
        print(plot_curriculum(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
