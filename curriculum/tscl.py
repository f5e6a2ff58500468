"""Teacher-Student Curriculum Learning (TSCL) on decimal addition.

[1] T. Matiisen, A. Oliver, T. Cohen, J. Schulman. "Teacher-Student Curriculum Learning."
    IEEE TNNLS 2019, arXiv:1707.00183. Released code: github.com/tambetm/TSCL (commit ec41eea),
    `addition/addition_rnn_teacher.py` and `addition/addition_rnn_model.py`.
[2] W. Zaremba, I. Sutskever. "Learning to Execute." arXiv:1410.4615 (the addition task).

A Student (an LSTM seq2seq model) learns to add two decimal numbers; subtask i holds the
problems whose operands have i digits (i = 1..max_digits). A Teacher picks, before every
training "epoch" of `train_size` problems, the distribution p over subtasks those problems
are drawn from; after the epoch it observes the score vector x_t (full-number accuracy per
subtask on a fixed validation set) and updates its estimate Q of the learning progress.
The Teacher is a non-stationary bandit whose reward is the change of the scores
([1] Sec. 2, the post's r_t = sum_i x_t^(i) - x_{t-1}^(i)):

    Online   ([1] Alg. 1):  Q_i <- Q_i + alpha (x_t^i - x_{t-1}^i - Q_i)        (EMA of progress)
    Naive    ([1] Alg. 2):  p held for K epochs, s_i = slope of x^i over those K;
                            Q_i <- Q_i + alpha (s_i - Q_i)
    Window   ([1] Alg. 3):  Q_i = least-squares slope of the last K (t, x_t^i) pairs
                            (a FIFO of K scores per task; Q_i = 1 until 2 are stored)
    Sampling ([1] Alg. 4):  keep the last K score changes; Thompson: draw one stored change
                            per task and act greedily on the draws (Q_i = 1 while empty)
    abs      ([1] Sec. 3):  act on |Q|: forgetting (negative slope) is progress too
    eps-greedy:  p = (1 - eps) onehot(argmax Q, random ties) + eps / N
    Boltzmann:   p_i = exp(Q_i / tau) / sum_j exp(Q_j / tau)

Baselines in the same program (the teacher id travels traced in the state, so one compiled
run can hold several): `uniform` (p = 1/N, which [1] and the post find strong) and the
broken `anti` teacher, the Window teacher with the sign of its preference flipped (it acts
on -|slope|, or -slope without abs): it drills the subtasks where nothing is being learnt.

Reproduce (CPU, ~3 min a run on 2 busy cores; 3-digit addition; the plot curriculum/tscl.png):
    python curriculum/tscl.py --preset quick --num-seeds 2 --plot curriculum/tscl.png
    python curriculum/tscl.py --preset quick --num-seeds 2 --teacher uniform
    python curriculum/tscl.py --preset quick --num-seeds 2 --teacher anti   # broken
    python curriculum/tscl.py --preset quick --num-seeds 2 --teacher sampling \
        --exploration thompson

Measured (`quick`, 2 seeds each, 2-core CPU shared with other jobs, ~40 s compile + ~130 s):
validation accuracy after 600 epochs / its mean over the run (auc), per seed:
    Window abs eps-greedy   0.68, 0.81 / 0.505, 0.521  (1 digit mastered by epoch ~60,
                                                       2 digits by ~250, 3 digits 0.09, 0.26)
    Sampling Thompson abs   0.78, 0.83 / 0.481, 0.488  (3 digits ~0.4, 0.5)
    uniform                 0.87, 0.84 / 0.587, 0.601  (3 digits 0.74, 0.76)
    anti (broken)           0.66, 0.58 / 0.379, 0.351  (2 digits at epoch 300: 0.22, 0.24)

So at this small scale uniform sampling wins, as the post warns; the teachers' curriculum
(1 -> 2 -> 3 digits, the plot) is the paper's, and the broken teacher is last.

Paper setting (GPU; 9 digits, LSTM 128, batch 4096, 40960 problems per epoch):
    python curriculum/tscl.py --preset paper
[1] measures the epochs until the validation accuracy over all lengths exceeds 99%
(`epochs_to_target` here). Its abstract: TSCL "matches or surpasses the results of
carefully hand-crafted curricula" on decimal addition with an LSTM. The per-teacher epoch
counts of its figures could not be read here (no copy of the PDF in this environment), so
no paper number is quoted; the `paper` preset runs the Window teacher with abs and the
released code's K 10 and eps-greedy 0.1, not a verified "best" setting.

Defaults are the released code's argparse defaults (addition_rnn_teacher.py): epsilon 0.1,
temperature 0.0004, bandit lr 0.1, window 10, max_digits 9, invert, hidden 128, batch 4096,
train 40960, val 4096, Adam 1e-3 with clipnorm 2 (standalone Keras 2: a global-norm clip),
20000 epochs max; except the teacher: Window with abs here, where the code's default is
Sampling with Thompson and no abs (`--teacher sampling --exploration thompson
--no-abs-progress`).

Differences from the paper:
- The validation set holds val_size / max_digits problems of every length (stratified); the
  released code draws val_size lengths from the uniform distribution, so a length can be
  missing there (its score is NaN and skipped). Same expectation, no missing score.
- The released code stops when the validation accuracy exceeds 0.99; a scan cannot stop, so
  the run goes on for `total_steps` epochs and `epochs_to_target` records the first one.
- None in the student: the LSTM is written out as Keras 2.0's (hard-sigmoid gates, forget
  bias 1, Glorot-uniform input and orthogonal recurrent kernels), the loss is the mean
  per-character cross-entropy, Adam with a global-norm clip of 2.
- Teacher buffers are fixed-size arrays; every task is scored every epoch (as in the
  addition experiments), so one ring of K score vectors with their epochs serves Window,
  Naive (whose K-epoch round ends exactly when the ring holds the round) and Sampling.
- The grid-world (Minecraft) subtask chain of [1] Sec. 5 is not implemented (Malmo needs a
  Java Minecraft); the hand-made curricula of [2] (naive/mixed/combined) are not either.
- `quick`: 3-digit addition, hidden 64, batch 128, 512 problems per epoch, val 510, Adam
  1e-2, 600 epochs (a CPU demo; the paper's sizes would take hours there).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import run
from common.nets import orthogonal
from common.plot import save_png

TEACHERS = ("online", "naive", "window", "sampling", "uniform", "anti")
"""Teachers of [1] Sec. 3, then the uniform baseline and the broken anti-Window teacher."""
EXPLORATIONS = ("egreedy", "boltzmann", "thompson")
VOCAB = " +0123456789"  # the released code's sorted CharacterTable: ' '=0, '+'=1, d=2+d

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """TSCL on addition; defaults are the released code's but for the teacher (see above)."""

    teacher: str = "window"
    """online | naive | window | sampling ([1] Alg. 1-4); uniform (baseline); anti (broken:
    the Window teacher with its preference reversed: it picks the least progress)"""
    exploration: str = "egreedy"
    """bandit policy on Q: egreedy | boltzmann | thompson (Sampling teacher only)"""
    abs_progress: bool = True
    """act on |Q| (the paper's abs variants: forgetting counts as progress)"""
    epsilon: float = 0.1
    """eps-greedy (and Thompson) exploration mass spread uniformly over the tasks"""
    temperature: float = 0.0004
    """Boltzmann temperature tau"""
    bandit_lr: float = 0.1
    """alpha of the Online and Naive teachers' Q update"""
    window_size: int = 10
    """K: epochs per Naive round; scores (Window) or score changes (Sampling) kept"""
    max_digits: int = 9
    """subtasks: operands of 1..max_digits digits (<= 9: the numbers are int32)"""
    invert: bool = True
    """feed the query reversed ([2]; the released code's default)"""
    hidden_size: int = 128
    """units of the encoder and of the decoder LSTM"""
    batch_size: int = 4096
    """problems per Adam step"""
    train_size: int = 40960
    """problems per teacher step (one 'epoch' of the student)"""
    val_size: int = 4096
    """fixed validation problems that score the subtasks"""
    lr: float = 1e-3
    """Adam learning rate"""
    max_grad_norm: float = 2.0
    """global gradient-norm clip (Keras 2 clipnorm; 0: none)"""
    target_accuracy: float = 0.99
    """validation accuracy that counts as solved (epochs_to_target)"""
    total_steps: int = 20_000
    """teacher steps (student epochs) to run (the released code's max_timesteps)"""
    dtype: str = "float32"
    """compute dtype of the LSTMs and the output layer: float32 | bfloat16"""

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.train_size

    @property
    def num_batches(self) -> int:
        return self.train_size // self.batch_size

    def validate(self):
        for name, options in (("teacher", TEACHERS), ("exploration", EXPLORATIONS),
                              ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {options}")
        if self.exploration == "thompson" and self.teacher != "sampling":
            raise ValueError(f"exploration='thompson' needs teacher='sampling' ([1] Alg. 4), "
                             f"got teacher={self.teacher!r}")
        if not 1 <= self.max_digits <= 9:
            raise ValueError(f"max_digits={self.max_digits} must be in [1, 9] (int32 sums)")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if not 0 < self.bandit_lr <= 1:
            raise ValueError(f"bandit_lr={self.bandit_lr} must be in (0, 1]")
        if self.window_size < 2:
            raise ValueError(f"window_size={self.window_size} must be >= 2 (a slope)")
        if self.train_size % self.batch_size:
            raise ValueError(f"train_size={self.train_size} is not divisible by "
                             f"batch_size={self.batch_size}")
        if self.val_size < self.max_digits:
            raise ValueError(f"val_size={self.val_size} must be >= max_digits="
                             f"{self.max_digits} (one problem per subtask)")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy={self.target_accuracy} must be in (0, 1]")


PRESETS = {
    "quick": dict(max_digits=3, hidden_size=64, batch_size=128, train_size=512, val_size=510,
                  lr=1e-2, total_steps=600),
    "paper": dict(),
}

# --- TASK: decimal addition with digit-length subtasks ---


def _ndigits(v, max_digits):
    """Decimal digits of v >= 0 (1 for 0), up to max_digits + 1."""
    return 1 + sum((v >= 10**k).astype(jnp.int32) for k in range(1, max_digits + 1))


def _digit(v, p):
    """The digit of v at power p (p >= 0 where used)."""
    return (v // jnp.power(10, jnp.maximum(p, 0))) % 10


def encode(a, b, max_digits, invert):
    """Token ids of the query str(a)+'+'+str(b) padded with spaces to 2D+1 characters
    (reversed when `invert`) and of the answer str(a+b) padded to D+1: the released code's
    `generate_data`. a, b: int32 [B] -> ([B, 2D+1], [B, D+1])."""
    a, b = a[:, None], b[:, None]
    la, lb = _ndigits(a, max_digits), _ndigits(b, max_digits)
    j = jnp.arange(2 * max_digits + 1)
    q = jnp.where(j < la, 2 + _digit(a, la - 1 - j),
                  jnp.where(j == la, 1, jnp.where(j <= la + lb, 2 + _digit(b, la + lb - j), 0)))
    if invert:
        q = q[:, ::-1]
    s = a + b
    ls = _ndigits(s, max_digits)
    k = jnp.arange(max_digits + 1)
    return q, jnp.where(k < ls, 2 + _digit(s, ls - 1 - k), 0)


def problems(key, lengths, max_digits, invert):
    """Two operands of `lengths` [B] random decimal digits each (leading zeros allowed, as in
    the released code's int(''.join(...))), encoded: (query, answer)."""
    k_a, k_b = jax.random.split(key)
    powers = jnp.power(10, jnp.arange(max_digits))
    used = jnp.arange(max_digits) < lengths[:, None]  # [B, D]

    def number(k):
        d = jax.random.randint(k, (lengths.shape[0], max_digits), 0, 10)
        return (d * powers * used).sum(-1)

    return encode(number(k_a), number(k_b), max_digits, invert)


def sample_problems(key, p, n, max_digits, invert):
    """n problems whose subtask (operand length - 1) is drawn from the teacher's p [N]."""
    k_len, k_num = jax.random.split(key)
    lengths = 1 + jax.random.categorical(k_len, jnp.log(p), shape=(n,))
    return problems(k_num, lengths, max_digits, invert)


# --- NETWORKS ---


def hard_sigmoid(z):
    """Keras 2's hard sigmoid, the LSTM's recurrent activation in [1]'s Keras 2.0."""
    return jnp.clip(0.2 * z + 0.5, 0.0, 1.0)


class KerasLSTM(nn.Module):
    """Keras 2.0's LSTM layer as [1]'s code used it: gates [i, f, c, o] from one input kernel
    (Glorot uniform) and one orthogonal recurrent kernel [H, 4H], a zero bias but 1 on the
    forget gate (unit_forget_bias), tanh cell activation, hard-sigmoid gates. Returns h at
    every step: [B, T, F] -> [B, T, H]."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h_dim, dt = self.features, self.dtype
        wx = self.param("kernel", nn.initializers.glorot_uniform(), (x.shape[-1], 4 * h_dim))
        wh = self.param("recurrent_kernel", orthogonal(1.0), (h_dim, 4 * h_dim))
        b = self.param("bias", lambda k, s: jnp.zeros(s).at[h_dim:2 * h_dim].set(1.0),
                       (4 * h_dim,))
        xw = jnp.einsum("btf,fg->tbg", x.astype(dt), wx.astype(dt)) + b  # [T, B, 4H]

        def step(carry, xw_t):
            h, c = carry
            z = (xw_t + h.astype(dt) @ wh.astype(dt)).astype(jnp.float32)  # [B, 4H]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = hard_sigmoid(f) * c + hard_sigmoid(i) * jnp.tanh(g)
            h = hard_sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((x.shape[0], h_dim))
        _, hs = jax.lax.scan(step, (zeros, zeros), xw)  # [T, B, H]
        return jnp.swapaxes(hs, 0, 1)


class Seq2Seq(nn.Module):
    """The released code's model: LSTM encoder -> its last output repeated D+1 times ->
    LSTM decoder -> a softmax over the 12 characters at every output position."""

    hidden: int
    out_len: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):  # [B, 2D+1] int
        x = jax.nn.one_hot(tokens, len(VOCAB))  # [B, 2D+1, 12]
        h = KerasLSTM(self.hidden, self.dtype)(x)[:, -1]  # [B, H]
        h = jnp.repeat(h[:, None], self.out_len, axis=1)  # [B, D+1, H]
        y = KerasLSTM(self.hidden, self.dtype)(h)  # [B, D+1, H]
        return nn.Dense(len(VOCAB), kernel_init=nn.initializers.glorot_uniform(),
                        dtype=self.dtype)(y).astype(jnp.float32)  # [B, D+1, 12]


def make_model(cfg: Config):
    return Seq2Seq(cfg.hidden_size, cfg.max_digits + 1, jnp.dtype(cfg.dtype))


def make_optimizer(cfg: Config):
    """Adam, after a global-norm clip when max_grad_norm > 0 (Keras 2's clipnorm)."""
    adam = optax.adam(cfg.lr)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam) \
        if cfg.max_grad_norm > 0 else adam


# --- TEACHERS ---


@struct.dataclass
class TeacherState:
    q: jax.Array  # [N] Online / Naive progress estimate Q
    prev: jax.Array  # [N] last scores x_{t-1} (0 before the first epoch, as in [1]'s code)
    scores: jax.Array  # [K, N] ring of the last K score vectors (Window; Naive's round)
    times: jax.Array  # [K] their epochs
    deltas: jax.Array  # [K, N] ring of the last K score changes x_t - x_{t-1} (Sampling)
    count: jax.Array  # () entries written to the rings
    p_round: jax.Array  # [N] the distribution Naive holds for its round


def teacher_init(n, k) -> TeacherState:
    z = jnp.zeros(n)
    return TeacherState(z, z, jnp.zeros((k, n)), jnp.zeros(k), jnp.zeros((k, n)),
                        jnp.zeros((), jnp.int32), jnp.full(n, 1.0 / n))


def window_slope(scores, times, count):
    """[1] Alg. 3: least-squares slope of x^i against t over the ring's min(count, K) valid
    entries, per task; 1 while fewer than 2 are stored (the released code's default)."""
    w = (jnp.arange(times.shape[0]) < count).astype(jnp.float32)  # [K]
    n = jnp.maximum(w.sum(), 1.0)
    t_mean = (w * times).sum() / n
    x_mean = (w[:, None] * scores).sum(0) / n  # [N]
    dt = w * (times - t_mean)  # [K]
    cov = (dt[:, None] * (scores - x_mean)).sum(0)  # [N]
    var = (dt * (times - t_mean)).sum()
    return jnp.where(count >= 2, cov / jnp.where(var > 0, var, 1.0), 1.0)


def online_update(q, prev, x, alpha):
    """[1] Alg. 1: Q <- Q + alpha (r - Q), r = x_t - x_{t-1} (EMA of the progress)."""
    return q + alpha * ((x - prev) - q)


def sampling_values(key, deltas, count, thompson):
    """[1] Alg. 4: one stored change per task, drawn independently (Thompson), or their
    mean; 1 for every task while the ring is empty."""
    k, n = deltas.shape
    valid = jnp.minimum(count, k)
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(valid, 1))  # [N]
    drawn = deltas[idx, jnp.arange(n)]
    mean = (deltas * (jnp.arange(k) < valid)[:, None]).sum(0) / jnp.maximum(valid, 1)
    return jnp.where(valid > 0, drawn if thompson else mean, 1.0)


def egreedy(key, v, eps):
    """argmax with random tie-breaking, mixed with the uniform distribution."""
    best = v == v.max()
    a = jax.random.categorical(key, jnp.where(best, 0.0, -jnp.inf))
    return (1 - eps) * jax.nn.one_hot(a, v.shape[0]) + eps / v.shape[0]


def boltzmann(v, temperature):
    """p_i = exp(v_i / tau) / sum_j exp(v_j / tau)."""
    return jax.nn.softmax(v / temperature)


def teacher_probs(key, ts: TeacherState, teacher, step, cfg: Config):
    """The distribution over subtasks for epoch `step` (teacher: traced index of TEACHERS)."""
    k_s, k_p = jax.random.split(key)
    thompson = cfg.exploration == "thompson"
    slope = window_slope(ts.scores, ts.times, ts.count)
    values = jnp.stack([
        ts.q,  # online
        ts.q,  # naive (read at the start of its round only)
        slope,  # window
        sampling_values(k_s, ts.deltas, ts.count, thompson),  # sampling
        ts.q,  # uniform (unused)
        slope,  # anti (broken): Window with its sign flipped below
    ])[teacher]
    if cfg.abs_progress:
        values = jnp.abs(values)
    values = jnp.where(teacher == TEACHERS.index("anti"), -values, values)
    if cfg.exploration == "boltzmann":
        p = boltzmann(values, cfg.temperature)
    else:  # eps-greedy; Thompson acts eps-greedily on its draws ([1]'s code)
        p = egreedy(k_p, values, cfg.epsilon)
    n = ts.q.shape[0]
    naive_hold = (teacher == TEACHERS.index("naive")) & (step % cfg.window_size != 0)
    p = jnp.where(naive_hold, ts.p_round, p)
    return jnp.where(teacher == TEACHERS.index("uniform"), jnp.full(n, 1.0 / n), p)


def teacher_observe(ts: TeacherState, x, p, teacher, step, cfg: Config) -> TeacherState:
    """Fold the scores x_t [N] of epoch `step` into the teacher's state."""
    k = cfg.window_size
    slot = ts.count % k
    scores = ts.scores.at[slot].set(x)
    times = ts.times.at[slot].set(step.astype(jnp.float32))
    deltas = ts.deltas.at[slot].set(x - ts.prev)
    count = ts.count + 1
    # Naive ([1] Alg. 2): at the end of a K-epoch round the ring holds exactly that round.
    s = window_slope(scores, times, count)
    q_naive = jnp.where(step % k == k - 1, ts.q + cfg.bandit_lr * (s - ts.q), ts.q)
    q = jnp.where(teacher == TEACHERS.index("naive"), q_naive,
                  online_update(ts.q, ts.prev, x, cfg.bandit_lr))
    return TeacherState(q, x, scores, times, deltas, count, p)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    teacher_state: TeacherState
    val_x: jax.Array  # [V, 2D+1] fixed validation queries
    val_y: jax.Array  # [V, D+1]
    val_len: jax.Array  # [V] their subtask (operand length)
    step: jax.Array  # () teacher steps done
    val_acc: jax.Array  # () validation accuracy after the last epoch
    val_acc_sum: jax.Array  # () its sum over the epochs run (for the auc)
    solved_at: jax.Array  # () first epoch (1-based) with val accuracy > target; 0 if none yet
    teacher: jax.Array  # () index into TEACHERS, traced: one program can hold several
    key: jax.Array


def init(key, cfg: Config) -> State:
    k_model, k_val, key = jax.random.split(key, 3)
    val_len = 1 + jnp.arange(cfg.val_size) % cfg.max_digits  # stratified over the lengths
    val_x, val_y = problems(k_val, val_len, cfg.max_digits, cfg.invert)
    params = make_model(cfg).init(k_model, val_x[:1])
    return State(params, make_optimizer(cfg).init(params),
                 teacher_init(cfg.max_digits, cfg.window_size), val_x, val_y, val_len,
                 jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(()),
                 jnp.zeros((), jnp.int32),
                 jnp.asarray(TEACHERS.index(cfg.teacher), jnp.int32), key)


# --- LOSS ---


def student_loss(params, model, x, y):
    """Cross-entropy of every output character, averaged (Keras categorical_crossentropy)."""
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def scores_per_length(params, model, x, y, lengths, max_digits):
    """[1]'s score x_t: full-number accuracy (every output character right) per subtask,
    and over the whole validation set."""
    correct = (model.apply(params, x).argmax(-1) == y).all(-1).astype(jnp.float32)  # [V]
    onehot = jax.nn.one_hot(lengths - 1, max_digits)  # [V, N]
    return (correct[:, None] * onehot).sum(0) / onehot.sum(0), correct.mean()


# --- UPDATE ---


def update(state: State, cfg: Config):
    model, tx = make_model(cfg), make_optimizer(cfg)
    key, k_teach, k_data = jax.random.split(state.key, 3)
    ts = state.teacher_state

    # TEACHER acts: the distribution over subtasks of this epoch
    p = teacher_probs(k_teach, ts, state.teacher, state.step, cfg)

    # STUDENT trains one epoch of train_size problems drawn from p
    x, y = sample_problems(k_data, p, cfg.train_size, cfg.max_digits, cfg.invert)
    batches = (x.reshape(cfg.num_batches, cfg.batch_size, -1),
               y.reshape(cfg.num_batches, cfg.batch_size, -1))  # [M, B, T]

    def sgd(carry, batch):
        params, opt_state = carry
        loss, g = jax.value_and_grad(student_loss)(params, model, *batch)
        u, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, u), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(sgd, (state.params, state.opt_state), batches)

    # SCORES on the fixed validation set, then the TEACHER observes them
    acc, val_acc = scores_per_length(params, model, state.val_x, state.val_y, state.val_len,
                                     cfg.max_digits)
    ts = teacher_observe(ts, acc, p, state.teacher, state.step, cfg)
    step = state.step + 1
    solved_at = jnp.where((state.solved_at == 0) & (val_acc > cfg.target_accuracy), step,
                          state.solved_at)

    metrics = {"losses/student": losses.mean(), "charts/val_accuracy": val_acc,
               "charts/solved": (solved_at > 0).astype(jnp.float32)}
    for i in range(cfg.max_digits):
        metrics[f"charts/p_{i + 1}digit"] = p[i]
        metrics[f"charts/acc_{i + 1}digit"] = acc[i]
    return state.replace(params=params, opt_state=opt_state, teacher_state=ts, step=step,
                         val_acc=val_acc, val_acc_sum=state.val_acc_sum + val_acc,
                         solved_at=solved_at, key=key), metrics


def evaluate(state: State, cfg: Config):
    """epochs_to_target: [1]'s measure, the first epoch with validation accuracy above
    target_accuracy; NaN (by design) when the run never got there. val_accuracy: after the
    last epoch. auc: the mean of val_accuracy over the run (the area under the learning
    curve, for runs too short to reach the target)."""
    return {"epochs_to_target": jnp.where(state.solved_at > 0, state.solved_at, jnp.nan),
            "val_accuracy": state.val_acc,
            "auc": state.val_acc_sum / jnp.maximum(state.step, 1)}


# --- PLOT ---


def plot_curriculum(run_dir, out):
    """The teacher's distribution over subtasks (stacked, mean over seeds) and the accuracy
    per subtask against epochs: [1] Fig. 4's view of a curriculum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    n = c["max_digits"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    colors = plt.cm.viridis(np.linspace(0, 0.95, n))
    ps, accs = [], []
    for i in range(n):
        _, yp, _ = plot.curve(rows, f"charts/p_{i + 1}digit")
        _, ya, _ = plot.curve(rows, f"charts/acc_{i + 1}digit")
        ps.append(plot.smooth(yp, 10).mean(1))
        accs.append(ya.mean(1))
    epochs = np.array([r["update"] for r in rows])
    axes[0].stackplot(epochs, ps, colors=colors, labels=[f"{i + 1} digits" for i in range(n)])
    axes[0].set(ylabel="p(subtask) chosen by the teacher", ylim=(0, 1))
    for i in range(n):
        axes[1].plot(epochs, accs[i], color=colors[i], label=f"{i + 1} digits")
    axes[1].set(ylabel="validation full-number accuracy", ylim=(0, 1.02))
    for ax in axes:
        ax.set_xlabel("teacher steps (student epochs)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    abs_ = " abs" if c["abs_progress"] else ""
    fig.suptitle(f"TSCL {c['teacher']}{abs_} ({c['exploration']}) on {n}-digit addition, "
                 f"{yp.shape[1]} seeds", fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the curriculum of the run."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__,
                   summary_keys=["epochs_to_target", "val_accuracy", "auc", "losses/student"])
    if flags["--plot"] is not None:
        print(plot_curriculum(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
