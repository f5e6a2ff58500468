"""Learning to Execute: an LSTM reads a short Python program and predicts its printed output;
four curricula over the programs' (length, nesting).

[1] W. Zaremba, I. Sutskever. "Learning to Execute." arXiv:1410.4615 (2014). Released code:
    github.com/wojciechz/learning_to_execute, `data.lua`, `utils/operations.lua`,
    `utils/strategies.lua`, `main.lua`: the generator, the model, the curricula and the
    schedule below were checked against it. The authors' own `main.lua` is commit 04a1659
    (2014-11-18); the head dc6baf6 merges third-party pull requests, among them 793ee07
    (2015) "Added dropout, replaced sgd with adam optimizer", not followed here. The section
    numbers of [1] are from memory [M] (no copy of the PDF here).

Programs ([1] Sec. 3, `operations.lua`): `length` a is the number of digits of every constant
(drawn from U[1, 10^a]), `nesting` b the number of operations composed: b times, one of six
operations is drawn uniformly and takes its operands from the previous operation's result
(when there is one, at a random operand slot) or from new constants:
    (x+y) | (x-y)            addition, subtraction
    (x*k) | (k*x)            multiplication by a small k ~ U[1, 4a]
    x                        the operand itself
    v=x;  (v+y) | (v-y)      variable assignment
    v=x  for x in range(k):v+=y | v-=y      a loop of k ~ U[1, 4a] iterations
    (z if x>y else w) | <    an if-expression
The input is the code lines (separated by '#'), then `print(expr)@`; the target is the
printed value and '.', e.g. "d=95;#print((d-38))@57." A hash of the text splits programs
into training, validation and test sets (disjoint), like `data.lua`, with another hash.

Model ([1] Sec. 4, `main.lua`): character embedding, 2 LSTM layers of 400 units (no
dropout; `--dropout p` drops their inputs as the pull request does), softmax over
characters. It reads a stream of programs (concatenated, no state reset between them)
unrolled 50 steps at a time, the state carried over (truncated BPTT), and is trained
with teacher forcing: at each output character it is given the true previous one. The
loss and the accuracy count only the target characters:
    L = - 1/B sum_{t, b: target} log p(y_{t+1} | x_{<=t})     (MaskedLoss, summed over t)
    SGD, lr 0.5, the gradient's global norm clipped at 5, weights ~ U[-0.08, 0.08] (04a1659)
Accuracy ([1] Sec. 6): the share of target characters predicted right under teacher forcing.

Curricula ([1] Sec. 5, `strategies.lua`); each program's (length, nesting) is drawn from
    baseline  (a, b): no curriculum, the target straight away
    naive     (l, n): the current level; l rises to a, then n rises and l restarts at 1
    mix       (U[1, a], U[1, b]): every level at once
    combined  mix with probability 1/5, else naive
Every `steps_per_eval` SGD steps the current level (l, n) gets harder when its validation
accuracy exceeds 95%, or when the training accuracy (pooled over the steps since the last
check: `state_train.acc`, whose counts show_predictions resets at each check) is below the
one 5 checks ago; when it cannot get harder (l, n) = (a, b), the learning rate is
multiplied by 0.8 instead, and training stops once it is below 1e-3. Every run trains the
chosen curricula side by side (same initial weights, one program), so [1]'s comparison is
one run.

Reproduce (CPU, a few minutes on 2 busy cores; the plot curriculum/learning_to_execute.png):
    python curriculum/learning_to_execute.py --preset quick --num-seeds 2 --plot \
        curriculum/learning_to_execute.png
GPU (the paper's sizes, target length 6, nesting 3):
    python curriculum/learning_to_execute.py --preset paper

Measured (`quick`: target length 2, nesting 2, one LSTM layer of 64, batch 32, unroll 25,
1,500 SGD steps, 2 seeds in one run; loaded 2-core CPU, 75 s CPU, 8 min wall at load ~20):
test accuracy (teacher forcing) at the target (2, 2) / averaged over the 4 levels, per seed:
    baseline  0.416 0.385 / 0.307 0.302   (no curriculum)
    naive     0.404 0.404 / 0.272 0.475   (at (2, 2) from step 1,475 / still at (1, 2))
    mix       0.432 0.435 / 0.499 0.491
    combined  0.420 0.416 / 0.430 0.415   (at (2, 2) from step 625 / 1,000)
At the target the four are within 0.05 of each other (the paper's gaps need its sizes);
over all levels mix and combined keep the easy programs that baseline never saw ([1]'s
reading of why mixing in easy programs helps). Naive depends on the seed: fed the pooled
training accuracy the plateau rule fires 2-3 times in 1,500 steps, the 95% rule never
(validation accuracy <= 0.63), so naive is slow to reach the target.
[1] reports that combined beats naive in every condition and mix in most [M: the values of
its tables were not read here]; its abstract: the LSTM adds two 9-digit numbers with 99%
accuracy.

Differences from the paper:
- Training programs come from a fixed bank of `bank_size` programs per level built once on
  the host (numpy, seed `data_seed`), held in the state; `main.lua` draws 100 x 10,001 new
  characters with a new seed every epoch (200 steps). `paper` reads its bank many times:
  baseline's 40,000 x 100 x 50 characters are ~730 passes over the 4,096 programs of (6, 3)
  (67 characters each); 4x the bank would take minutes of numpy.
- Under `mix`/`combined`, `strategies.lua` redraws the length for every constant and every
  k (it calls hardness() each time); here one (length, nesting) is drawn per program, as [1]
  Sec. 5 describes it.
- Not a difference: SGD with lr 0.5 and no dropout, as the authors' `main.lua` (04a1659);
  the pull request's optim.adam gets a fresh state {} at every call (dc6baf6 `main.lua`
  L294), so it is not Adam either.
- With `--dropout` > 0, validation and test accuracy are measured without dropout (the pull
  request's `main.lua` never switches its Dropout layers to evaluation mode).
- When the level changes the programs in progress finish at the old level ([1] reloads its
  data). A validation or test program longer than a stream row is skipped; `data.lua`'s
  get_data splits it across rows.
- The scan cannot stop: a curriculum whose learning rate fell below `min_lr` stops training
  (its weights freeze) while the others go on.
- `quick` is a CPU demo: target (2, 2), one layer of 64 units, no dropout, batch 32, unroll
  25, a check every 25 steps, 1,500 steps. The addition task with input reversal and
  doubling ([1] Sec. 8) is not built (curriculum/tscl.py has the addition task).
"""

import functools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run
from common.plot import save_png

CURRICULA = ("baseline", "naive", "mix", "combined")
"""[1] Sec. 5: no curriculum, naive, mix, combined (`main.lua`'s baseline, naive, mix, blend)."""
VOCAB = "_ #@.()+-*=<>;:0123456789abcdefghijlnoprstx"  # '_' (id 0) pads, never in a program
_IDS = np.zeros(256, np.int8)
_IDS[np.frombuffer(VOCAB.encode(), np.uint8)] = np.arange(len(VOCAB))

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Learning to Execute; defaults are [1]'s and its released code's (`main.lua`)."""

    curricula: tuple[str, ...] = CURRICULA
    """curricula trained side by side: baseline | naive | mix | combined"""
    target_length: int = 6
    """a: digits of the constants of the test programs (`-target_length`)"""
    target_nesting: int = 3
    """b: operations composed in the test programs (`-target_nesting`)"""
    mix_prob: float = 0.2
    """combined: share of programs drawn by `mix` (`blend`: random(5) == 1)"""
    hidden_size: int = 400
    """units per LSTM layer (and embedding size)"""
    num_layers: int = 2
    """stacked LSTM layers"""
    dropout: float = 0.0
    """dropout on the input of every LSTM layer (none in the authors' code; 0.5 in a PR)"""
    init_scale: float = 0.08
    """every weight and bias ~ U[-init_scale, init_scale]"""
    batch_size: int = 100
    """streams of programs read in parallel"""
    unroll: int = 50
    """characters per truncated-BPTT step (seq_length)"""
    lr: float = 0.5
    """SGD learning rate at the start"""
    lr_decay: float = 0.8
    """learning-rate factor when the level cannot get harder"""
    min_lr: float = 1e-3
    """training stops when the learning rate falls below this"""
    max_grad_norm: float = 5.0
    """global gradient-norm clip"""
    target_accuracy: float = 0.95
    """validation accuracy at the current level that makes it harder"""
    patience: int = 5
    """also harder when the training accuracy is below the one this many checks ago"""
    steps_per_eval: int = 100
    """SGD steps between checks (half an epoch of 200 steps in main.lua); one update"""
    total_steps: int = 40_000
    """SGD steps in all (main.lua runs until the learning rate falls below min_lr)"""
    bank_size: int = 4096
    """training programs per (length, nesting) level, built once on the host"""
    eval_rows: int = 100
    """validation/test streams per level (main.lua: batch 100)"""
    eval_len: int = 500
    """characters per validation/test stream (main.lua: 501 - 1)"""
    data_seed: int = 1
    """numpy seed of the program banks (the same programs for every training seed)"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 | bfloat16"""

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.steps_per_eval

    @property
    def steps_per_update(self) -> int:
        return self.steps_per_eval * self.batch_size * self.unroll  # characters read

    def validate(self):
        bad = [c for c in self.curricula if c not in CURRICULA]
        if bad or not self.curricula or len(set(self.curricula)) < len(self.curricula):
            raise ValueError(f"curricula={self.curricula!r}: distinct names from {CURRICULA}")
        if not 1 <= self.target_length <= 9:
            raise ValueError(f"target_length={self.target_length} must be in [1, 9]")
        if not 1 <= self.target_nesting <= 6:
            raise ValueError(f"target_nesting={self.target_nesting} must be in [1, 6]")
        if self.dropout >= 1:
            raise ValueError(f"dropout={self.dropout} must be < 1")
        if not 0 < self.lr_decay < 1:
            raise ValueError(f"lr_decay={self.lr_decay} must be in (0, 1)")
        if self.total_steps % self.steps_per_eval:
            raise ValueError(
                f"total_steps={self.total_steps} is not divisible by "
                f"steps_per_eval={self.steps_per_eval}"
            )
        if self.eval_len < 60:
            raise ValueError(f"eval_len={self.eval_len} must be >= 60 (whole programs)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be float32 or bfloat16")


PRESETS = {
    "quick": dict(
        target_length=2,
        target_nesting=2,
        hidden_size=64,
        num_layers=1,
        dropout=0.0,
        batch_size=32,
        unroll=25,
        steps_per_eval=25,
        total_steps=1500,
        bank_size=512,
        eval_rows=16,
        eval_len=200,
    ),
    "paper": dict(),
}

# --- PROGRAMS ([1] Sec. 3, operations.lua) ---


def program(rng: np.random.Generator, length: int, nesting: int) -> tuple[str, str]:
    """One program of `nesting` operations on constants of `length` digits: (input text
    ending in '@', target = the printed value and '.')."""
    stack, code = [], []
    letters = iter(rng.permutation(list("abcdefghij")))

    def operand():  # the previous result, else a new constant in [1, 10^length]
        if stack:
            return stack.pop()
        v = int(rng.integers(1, 10**length + 1))
        return str(v), v

    def operands(k):  # a random slot gets the previous result (torch.randperm)
        out = [None] * k
        for slot in rng.permutation(k):
            out[slot] = operand()
        return out

    for _ in range(nesting):
        op = int(rng.integers(6))
        sign = int(rng.integers(2))
        if op == 0:  # pair_opr
            (ea, a), (eb, b) = operands(2)
            expr, val = (f"({ea}+{eb})", a + b) if sign else (f"({ea}-{eb})", a - b)
        elif op == 1:  # smallmul_opr
            ea, a = operand()
            k = int(rng.integers(1, 4 * length + 1))
            expr, val = (f"({ea}*{k})" if sign else f"({k}*{ea})"), a * k
        elif op == 2:  # equality_opr
            expr, val = operand()
        elif op == 3:  # vars_opr
            v = next(letters)
            (ea, a), (eb, b) = operands(2)
            code.append(f"{v}={ea};")
            expr, val = (f"({v}+{eb})", a + b) if sign else (f"({v}-{eb})", a - b)
        elif op == 4:  # small_loop_opr
            v = next(letters)
            (ea, a), (eb, b) = operands(2)
            k = int(rng.integers(1, 4 * length + 1))
            o = "+" if sign else "-"
            code += [f"{v}={ea}", f"for x in range({k}):{v}{o}={eb}"]
            expr, val = v, a + k * b if sign else a - k * b
        else:  # ifstat_opr
            (ea, a), (eb, b), (ec, c), (ed, d) = operands(4)
            cmp = ">" if sign else "<"
            expr = f"({ec} if {ea}{cmp}{eb} else {ed})"
            val = c if (a > b if sign else a < b) else d
        stack.append((expr, val))
    expr, val = stack.pop()
    return "".join(line + "#" for line in code) + f"print({expr})@", f"{val}."


def split_of(text: str) -> int:
    """0 train, 1 validation, 2 test: zlib.crc32 of the whole program % 3 (data.lua: % 3 of
    utils.lua's str_hash)."""
    return zlib.crc32(text.encode()) % 3


def programs(rng, length, nesting, n, split) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        x, y = program(rng, length, nesting)
        if split_of(x + y) == split:
            out.append((x, y))
    return out


def tokens(s: str) -> np.ndarray:
    return _IDS[np.frombuffer(s.encode(), np.uint8)]


@functools.cache
def bank(a: int, b: int, n: int, seed: int):
    """Training programs of every level, as numpy: tokens [a, b, n, P] (0-padded), program
    lengths [a, b, n] and where the target starts [a, b, n]."""
    rng = np.random.default_rng([seed, 0])
    progs = [[programs(rng, l + 1, m + 1, n, 0) for m in range(b)] for l in range(a)]
    p = max(len(x) + len(y) for row in progs for cell in row for x, y in cell)
    toks = np.zeros((a, b, n, p), np.int8)
    plen, start = np.zeros((a, b, n), np.int32), np.zeros((a, b, n), np.int32)
    for l in range(a):
        for m in range(b):
            for i, (x, y) in enumerate(progs[l][m]):
                toks[l, m, i, : len(x) + len(y)] = tokens(x + y)
                plen[l, m, i], start[l, m, i] = len(x) + len(y), len(x)
    return toks, plen, start


@functools.cache
def streams(a: int, b: int, rows: int, length: int, split: int, seed: int):
    """Validation (split 1) or test (2) streams of every level, as numpy: tokens
    [a, b, rows, length + 1] of whole programs packed end to end (a program that does not
    fit starts the next row; the rest is padding) and the target mask of the same shape."""
    rng = np.random.default_rng([seed, split])
    toks = np.zeros((a, b, rows, length + 1), np.int8)
    mask = np.zeros((a, b, rows, length + 1), bool)
    for l in range(a):
        for m in range(b):
            r, c = 0, 0
            while r < rows:
                ((x, y),) = programs(rng, l + 1, m + 1, 1, split)
                if len(x) + len(y) > length + 1:
                    continue  # longer than a row: skipped
                if c + len(x) + len(y) > length + 1:
                    r, c = r + 1, 0
                    continue
                toks[l, m, r, c : c + len(x) + len(y)] = tokens(x + y)
                mask[l, m, r, c + len(x) : c + len(x) + len(y)] = True
                c += len(x) + len(y)
    return toks, mask


# --- NETWORKS ---


def init_params(key, cfg: Config):
    """Embedding, num_layers LSTMs (input and recurrent weights with a bias each, gates
    [i, f, g, o] as main.lua's four new_input_sum()), output layer; all ~ U[-s, s]."""
    h, v = cfg.hidden_size, len(VOCAB)
    shapes = {"embed": (v, h), "out_w": (h, v), "out_b": (v,)}
    for i in range(cfg.num_layers):
        shapes |= {
            f"wx{i}": (h, 4 * h),
            f"wh{i}": (h, 4 * h),
            f"bx{i}": (4 * h,),
            f"bh{i}": (4 * h,),
        }
    keys = jax.random.split(key, len(shapes))
    return {
        k: jax.random.uniform(kk, s, minval=-cfg.init_scale, maxval=cfg.init_scale)
        for (k, s), kk in zip(sorted(shapes.items()), keys, strict=True)
    }


def lstm_step(params, carry, x, cfg: Config, drop=None):
    """One character through the stack: carry (c, h) [L, B, H] each, x [B] ids -> new carry,
    logits [B, V]. drop: dropout masks [L, B, H] (already scaled) or None."""
    dt = jnp.dtype(cfg.dtype)
    c_all, h_all = carry
    inp = params["embed"][x]  # [B, H]
    cs, hs = [], []
    for i in range(cfg.num_layers):
        if drop is not None:
            inp = inp * drop[i]  # dropout on the layer's input (main.lua)
        z = (
            inp.astype(dt) @ params[f"wx{i}"].astype(dt)
            + params[f"bx{i}"]
            + h_all[i].astype(dt) @ params[f"wh{i}"].astype(dt)
            + params[f"bh{i}"]
        )
        gi, gf, gg, go = jnp.split(z.astype(jnp.float32), 4, axis=-1)
        c = jax.nn.sigmoid(gf) * c_all[i] + jax.nn.sigmoid(gi) * jnp.tanh(gg)
        h = jax.nn.sigmoid(go) * jnp.tanh(c)
        cs.append(c)
        hs.append(h)
        inp = h
    logits = (inp.astype(dt) @ params["out_w"].astype(dt)).astype(jnp.float32) + params["out_b"]
    return (jnp.stack(cs), jnp.stack(hs)), logits


def run_lstm(params, carry, x, cfg: Config, drop=None):
    """x [T, B] -> final carry, logits [T, B, V]. drop: [T, L, B, H] masks or None."""

    def step(carry, inp):
        xt, dt = inp
        return lstm_step(params, carry, xt, cfg, dt)

    return jax.lax.scan(step, carry, (x, drop))


def zero_carry(cfg: Config, b: int):
    z = jnp.zeros((cfg.num_layers, b, cfg.hidden_size))
    return z, z


# --- LOSS ---


def masked_loss(params, carry, x, y, mask, cfg: Config, drop=None):
    """MaskedLoss of main.lua summed over the T unrolled steps: -1/B sum log p(y) over the
    target characters; also their count and the number predicted right (teacher forcing:
    x holds the true previous characters)."""
    carry, logits = run_lstm(params, carry, x, cfg, drop)  # [T, B, V]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), -1)[..., 0]  # [T, B]
    loss = (nll * mask).sum() / x.shape[1]
    right = ((logits.argmax(-1) == y) & mask).sum()
    return loss, (carry, right, mask.sum())


def stream_accuracy(params, toks, mask, cfg: Config):
    """Teacher-forced character accuracy on packed streams toks/mask [R, T + 1], read from
    a zero state: predictions of toks[:, 1:] where the mask is set."""
    x, y, m = toks[:, :-1].T, toks[:, 1:].T, mask[:, 1:].T  # [T, R]
    _, (_, right, n) = masked_loss(params, zero_carry(cfg, x.shape[1]), x, y, m, cfg)
    return right / jnp.maximum(n, 1)


# --- CURRICULA ---


def sample_levels(key, curriculum, level, cfg: Config, shape):
    """(length, nesting) of new programs [shape] under `curriculum` (traced index of
    CURRICULA) at the current level (l, n) [2] ([1] Sec. 5, strategies.lua)."""
    k_l, k_n, k_c = jax.random.split(key, 3)
    a, b = cfg.target_length, cfg.target_nesting
    mix = jnp.stack(
        [jax.random.randint(k_l, shape, 1, a + 1), jax.random.randint(k_n, shape, 1, b + 1)], -1
    )  # U[1, a] x U[1, b]
    cur = jnp.broadcast_to(level, (*shape, 2))
    coin = jax.random.uniform(k_c, shape)[..., None] < cfg.mix_prob
    return jnp.select(
        [curriculum == 0, curriculum == 1, curriculum == 2],
        [jnp.broadcast_to(jnp.array([a, b]), (*shape, 2)), cur, mix],
        jnp.where(coin, mix, cur),
    )  # combined


def make_harder(level, cfg: Config):
    """strategies.lua's make_harder: length +1 up to a, then nesting +1 with length back to
    1. Returns (new level, whether it changed)."""
    l, n = level[0], level[1]
    up_l = l < cfg.target_length
    up_n = ~up_l & (n < cfg.target_nesting)
    new = jnp.where(up_l, jnp.stack([l + 1, n]), jnp.where(up_n, jnp.stack([1, n + 1]), level))
    return new, up_l | up_n


def schedule(level, lr, hist, count, val_acc, train_acc, cfg: Config):
    """main.lua's check: harder when val_acc > target_accuracy or the training accuracy is
    below the one `patience` checks ago (train_accs[#-4] > acc); lr *= decay when it cannot
    get harder; the history restarts after a change, then records train_acc.
    hist: ring [patience] of training accuracies, count: entries since the restart."""
    p = cfg.patience
    old = hist[count % p]  # the oldest of the last p entries (train_accs[#train_accs - 4])
    trigger = (val_acc > cfg.target_accuracy) | ((count >= p) & (old > train_acc))
    new_level, harder = make_harder(level, cfg)
    level = jnp.where(trigger, new_level, level)
    lr = jnp.where(trigger & ~harder, lr * cfg.lr_decay, lr)
    count = jnp.where(trigger, 0, count)
    return level, lr, hist.at[count % p].set(train_acc), count + 1


# --- STATE ---


@struct.dataclass
class Student:
    """One curriculum's LSTM and its position in its stream of training programs."""

    params: Any
    carry: tuple  # (c, h) [L, B, H]
    prev: jax.Array  # [B] the last character read (the next step's first input)
    prog: jax.Array  # [B, 3] the program being read: length, nesting (1-based), bank index
    pos: jax.Array  # [B] next character of it
    level: jax.Array  # [2] current (length, nesting)
    lr: jax.Array  # ()
    hist: jax.Array  # [patience] training accuracies of the last checks
    count: jax.Array  # () checks since the last change
    curriculum: jax.Array  # () index into CURRICULA


@struct.dataclass
class Data:
    """The program bank and the evaluation streams (see bank, streams), device arrays in the
    state rather than constants folded into the compiled update."""

    toks: jax.Array  # [a, b, bank_size, P] int8 training programs
    plen: jax.Array  # [a, b, bank_size] their lengths
    start: jax.Array  # [a, b, bank_size] where their targets start
    val_toks: jax.Array  # [a, b, eval_rows, eval_len + 1] validation streams
    val_mask: jax.Array  # [a, b, eval_rows, eval_len + 1] their target characters
    test_toks: jax.Array  # test streams, as the validation ones
    test_mask: jax.Array


def make_data(cfg: Config) -> Data:
    a, b, seed = cfg.target_length, cfg.target_nesting, cfg.data_seed
    vt, vm = streams(a, b, cfg.eval_rows, cfg.eval_len, 1, seed)
    tt, tm = streams(a, b, cfg.eval_rows, cfg.eval_len, 2, seed)
    return Data(*map(jnp.asarray, (*bank(a, b, cfg.bank_size, seed), vt, vm, tt, tm)))


@struct.dataclass
class State:
    students: Student  # stacked over cfg.curricula
    key: jax.Array
    step: jax.Array  # () SGD steps done
    data: Data


def init(key, cfg: Config) -> State:
    k_p, k_d, key = jax.random.split(key, 3)
    c, b = len(cfg.curricula), cfg.batch_size
    params = init_params(k_p, cfg)  # the same initial weights for every curriculum
    ids = jnp.array([CURRICULA.index(n) for n in cfg.curricula])
    level = jnp.ones(2, jnp.int32)
    prog = jax.vmap(
        lambda k, i: jnp.concatenate(
            [
                sample_levels(k, i, level, cfg, (b,)),
                jax.random.randint(k, (b, 1), 0, cfg.bank_size),
            ],
            -1,
        )
    )(jax.random.split(k_d, c), ids)
    students = Student(
        jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), params),
        jax.tree.map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), zero_carry(cfg, b)),
        jnp.zeros((c, b), jnp.int8),
        prog,
        jnp.zeros((c, b), jnp.int32),
        jnp.ones((c, 2), jnp.int32),
        jnp.full(c, cfg.lr),
        jnp.zeros((c, cfg.patience)),
        jnp.zeros(c, jnp.int32),
        ids,
    )
    return State(students, key, jnp.zeros((), jnp.int32), make_data(cfg))


# --- UPDATE ---


def read_stream(key, s: Student, d: Data, cfg: Config):
    """The next `unroll` characters of every row's stream: a row that finishes a program
    draws the next one from its curriculum. Returns (tokens [T, B], target mask [T, B], the
    stream state after them)."""
    toks, plen, start = d.toks, d.plen, d.start
    k_lv, k_i = jax.random.split(key)
    shape = (cfg.unroll, cfg.batch_size)
    new = jnp.concatenate(
        [
            sample_levels(k_lv, s.curriculum, s.level, cfg, shape),
            jax.random.randint(k_i, (*shape, 1), 0, cfg.bank_size),
        ],
        -1,
    )

    def step(carry, new_t):
        prog, pos = carry
        l, n, i = prog[:, 0] - 1, prog[:, 1] - 1, prog[:, 2]
        tok = toks[l, n, i, pos]
        target = pos >= start[l, n, i]
        pos = pos + 1
        done = pos >= plen[l, n, i]
        prog = jnp.where(done[:, None], new_t, prog)
        return (prog, jnp.where(done, 0, pos)), (tok, target)

    (prog, pos), (tok, target) = jax.lax.scan(step, (s.prog, s.pos), new)
    return tok, target, s.replace(prog=prog, pos=pos)


def sgd_step(s: Student, key, d: Data, cfg: Config):
    """One truncated-BPTT step on the next `unroll` characters: clipped SGD. Returns the
    student and (loss, target characters predicted right, target characters)."""
    k_data, k_drop = jax.random.split(key)
    tok, target, s = read_stream(k_data, s, d, cfg)
    x = jnp.concatenate([s.prev[None], tok[:-1]])  # [T, B] inputs, the true previous chars
    drop = None
    if cfg.dropout > 0:
        keep = jax.random.bernoulli(
            k_drop, 1 - cfg.dropout, (cfg.unroll, cfg.num_layers, cfg.batch_size, cfg.hidden_size)
        )
        drop = keep / (1 - cfg.dropout)
    (loss, (carry, right, n)), g = jax.value_and_grad(masked_loss, has_aux=True)(
        s.params, s.carry, x, tok, target, cfg, drop
    )
    norm = jnp.sqrt(sum((v**2).sum() for v in jax.tree.leaves(g)))
    scale = jnp.minimum(1.0, cfg.max_grad_norm / jnp.maximum(norm, 1e-12))
    lr = jnp.where(s.lr >= cfg.min_lr, s.lr, 0.0)  # below min_lr: training is over
    params = jax.tree.map(lambda p, d: p - lr * scale * d, s.params, g)
    s = s.replace(params=params, carry=jax.lax.stop_gradient(carry), prev=tok[-1])
    return s, (loss, right, n)


def student_update(s: Student, key, d: Data, cfg: Config):
    """`steps_per_eval` SGD steps, then main.lua's check on the current level, fed the
    training accuracy pooled over the steps (state_train.acc = count / normal)."""
    s, (losses, rights, totals) = jax.lax.scan(
        lambda s, k: sgd_step(s, k, d, cfg), s, jax.random.split(key, cfg.steps_per_eval)
    )
    train_acc = rights.sum() / jnp.maximum(totals.sum(), 1)  # pooled, not the last step's
    l, n = s.level[0] - 1, s.level[1] - 1
    val_acc = stream_accuracy(s.params, d.val_toks[l, n], d.val_mask[l, n], cfg)
    test_acc = stream_accuracy(s.params, d.test_toks[-1, -1], d.test_mask[-1, -1], cfg)
    level, lr, hist, count = schedule(s.level, s.lr, s.hist, s.count, val_acc, train_acc, cfg)
    metrics = {
        "loss": losses.mean(),
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "length": s.level[0],
        "nesting": s.level[1],
        "lr": s.lr,
    }
    return s.replace(level=level, lr=lr, hist=hist, count=count), metrics


def update(state: State, cfg: Config):
    key, k = jax.random.split(state.key)
    keys = jax.random.split(k, len(cfg.curricula))
    students, m = jax.vmap(lambda s, kk: student_update(s, kk, state.data, cfg))(
        state.students, keys
    )
    metrics = {}
    for j, name in enumerate(cfg.curricula):
        metrics[f"losses/{name}"] = m["loss"][j]
        for k_ in ("train_accuracy", "val_accuracy", "test_accuracy", "length", "nesting", "lr"):
            metrics[f"charts/{k_}_{name}"] = m[k_][j].astype(jnp.float32)
    return state.replace(students=students, key=key, step=state.step + cfg.steps_per_eval), metrics


def evaluate(state: State, cfg: Config):
    """Test accuracy of every curriculum at the target (a, b) and its mean over all levels
    (1..a) x (1..b) (whether the easy programs were forgotten)."""
    tt, tm = state.data.test_toks, state.data.test_mask

    def per_level(params):  # [a, b]
        return jax.vmap(jax.vmap(lambda t, m: stream_accuracy(params, t, m, cfg)))(tt, tm)

    acc = jax.vmap(per_level)(state.students.params)  # [C, a, b]
    out = {}
    for j, name in enumerate(cfg.curricula):
        out[f"test_accuracy_{name}"] = acc[j, -1, -1]
        out[f"all_levels_accuracy_{name}"] = acc[j].mean()
    return out


# --- PLOT ---


def plot_curricula(run_dir, out):
    """Test accuracy at the target level against SGD steps, one curve per curriculum (mean
    over seeds); the level (l, n) that naive and combined train on; and the
    final test accuracy at the target and over all levels (dots: seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    final = json.loads((Path(run_dir) / "summary.json").read_text())
    steps = np.array([r["update"] for r in rows]) * c["steps_per_eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for j, name in enumerate(c["curricula"]):
        _, y, _ = plot.curve(rows, f"charts/test_accuracy_{name}")
        axes[0].plot(steps, y.mean(1), label=name, color=f"C{j}")
        _, ln, _ = plot.curve(rows, f"charts/length_{name}")
        _, ns, _ = plot.curve(rows, f"charts/nesting_{name}")
        if name in ("naive", "combined"):
            level = ((ns - 1) * c["target_length"] + ln).mean(1)
            axes[1].step(steps, level, label=name, color=f"C{j}")
        for k, what in enumerate(("test", "all_levels")):
            v = np.array(final[f"{what}_accuracy_{name}"], dtype=float)
            x = k * (len(c["curricula"]) + 1) + j
            axes[2].bar(x, v.mean(), color=f"C{j}", label=name if k == 0 else None)
            axes[2].plot([x] * len(v), v, "k.", ms=4)
    a, b = c["target_length"], c["target_nesting"]
    axes[0].set(ylabel=f"test accuracy at length {a}, nesting {b}", ylim=(0, 1))
    axes[1].set(ylabel="current level (nesting - 1) * a + length")
    n = len(c["curricula"])
    axes[2].set(
        xticks=[(n - 1) / 2, n + 1 + (n - 1) / 2],
        xticklabels=[f"at ({a}, {b})", "mean over all levels"],
        ylabel="final test accuracy",
        ylim=(0, 1),
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_xlabel("SGD steps")
    axes[1].set_xlabel("SGD steps")
    fig.suptitle(
        f"Learning to Execute: character accuracy with teacher forcing, {y.shape[1]} seed(s)",
        fontsize=10,
    )
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the curricula's accuracy curves."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv, doc=__doc__)
    if flags["--plot"] is not None:
        print(plot_curricula(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
