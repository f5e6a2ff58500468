"""Adaptive Computation Time (ACT) for recurrent networks, on the parity task.

[1] A. Graves. "Adaptive Computation Time for Recurrent Neural Networks." arXiv:1603.08983
    (2016).
[2] L. Weng. "The Transformer Family" (2020), section "Adaptive Computation Time".

An RNN s_t = S(s_{t-1}, W_x x_t), y_t = W_y s_t + b_y is allowed to "ponder" each input for
a variable number N(t) of inner steps that share S, W_y and b_y ([1] Sec. 2):

    s_t^0 = s_{t-1}
    s_t^n = S(s_t^{n-1}, x_t^n),  x_t^n = [x_t ; delta_{n,1}]                     [1] Eq. 7
        (the binary first-step flag is APPENDED to the input; [2] writes x_t + delta_{n,1})
    y_t^n = W_y s_t^n + b_y                                                         [1] Eq. 8
    h_t^n = sigmoid(W_h s_t^n + b_h)                  halting unit                  [1] Eq. 9
    N(t)  = min{ M, min{ n' : sum_{n<=n'} h_t^n >= 1 - eps } }                      [1] Eq. 10
    R(t)  = 1 - sum_{n<N(t)} h_t^n                    remainder                     [1] Eq. 11
    p_t^n = h_t^n if n < N(t);  R(t) if n = N(t)       (sum_n p_t^n = 1)            [1] Eq. 12
    s_t = sum_n p_t^n s_t^n,  y_t = sum_n p_t^n y_t^n  mean-field state and output  [1] Eq. 13-14
    P(x) = sum_t rho_t,  rho_t = N(t) + R(t)          ponder cost                   [1] Eq. 15-16
    L = L_task + tau * P(x)                           time penalty tau              [1] Eq. 17

N(t) is piecewise constant, so its gradient is zero ([1] Sec. 2.1): the ponder cost trains
the halting units only through R(t), i.e. d rho_t / d h_t^n = -1 for n < N(t).

The inner loop is a fixed-length `lax.scan` of M steps with a `running` mask (jittable and
vmappable): steps after the halting step still run but get p = 0 and change nothing.

Task ([1] Sec. 3.1): input vectors of 64 entries, a random number (1..64) of random entries
are +1 or -1 and the rest 0; the target is 1 if the number of +1 entries is odd. Each
sequence is one input vector (seq_len = 1), so without ACT the recurrence is never used and
the network is a one-hidden-layer feed-forward net. Network: 128 tanh units, a single
sigmoid output, binary cross-entropy, minibatches of 128. `--max-steps 1` is the same RNN
without pondering (N = 1, R = 1, p = 1: exactly one plain RNN step).

Reproduce (CPU demo, 8-bit parity; ACT vs the same RNN without pondering):
    python transformers/act.py --preset quick
    python transformers/act.py --preset quick --max-steps 1
Measured (2-core shared CPU, 1 seed, 3000 updates x 128 sequences, 45 s wall-clock with
11 s compile, 37k sequences/s): held-out accuracy 1.000 with 2.87 ponder steps on average;
without pondering (--max-steps 1) 0.680.
Paper setting (GPU; 64 bits, M = 100, tau = 1e-3):
    python transformers/act.py --preset paper
[1] Fig. 4: without ACT the parity sequence error rate stays near 0.4-0.5 (chance is 0.5);
with ACT and tau <= 1e-3 it falls to a few percent [mem: read from the figure, not checked].

Differences from the paper:
- [1] trains with synchronous SGD over 16 workers and Adam (its learning-rate grid is not
  reproduced); here one Adam optimiser with a constant learning rate (default 1e-3 [mem]).
- The halting bias is initialised to `halt_bias_init` = 1.0, which [1] recommends so that
  training starts with few ponder steps [mem].
- The mean field is taken over the pre-sigmoid output y_t^n; the sigmoid is applied to y_t
  (the loss is binary cross-entropy with logits) [mem: [1] mixes the output-layer
  activations y_t^n; for one logistic unit the two differ only in where the sigmoid sits].
- `seq_len` > 1 concatenates independent parity vectors into one sequence, with a target at
  every step (the paper's parity task uses seq_len = 1); it exercises the state hand-over.
- The `quick` preset uses 8-bit vectors, 64 hidden units, M = 10 and lr 3e-3 to learn in
  about a minute on CPU.
- The equation numbers of [1] quoted here are from memory [mem].
"""

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """ACT-RNN on the parity task; defaults are [1] Sec. 3.1 where known."""

    bits: int = 64
    """length of the parity input vectors"""
    seq_len: int = 1
    """parity vectors per sequence (the paper: 1)"""
    hidden: int = 128
    """tanh units of the RNN"""
    max_steps: int = 100
    """M: most inner (ponder) steps per input step; 1 turns ACT off (plain RNN)"""
    eps: float = 0.01
    """halting threshold: stop once the summed halting probability reaches 1 - eps"""
    tau: float = 1e-3
    """time penalty: weight of the ponder cost P(x) in the loss"""
    halt_bias_init: float = 1.0
    """initial halting-unit bias b_h (positive: few ponder steps at the start)"""
    batch_size: int = 128
    """sequences per update"""
    lr: float = 1e-3
    """Adam learning rate (constant)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    total_updates: int = 100_000
    """optimiser updates"""
    eval_size: int = 2048
    """fixed held-out sequences for evaluate()"""

    @property
    def num_updates(self) -> int:
        return self.total_updates

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.seq_len

    def validate(self):
        for name in ("bits", "seq_len", "hidden", "max_steps", "batch_size", "total_updates",
                     "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


PRESETS = {
    # CPU demo: 8-bit parity, 64 tanh units, about a minute on 2 cores.
    "quick": dict(bits=8, hidden=64, max_steps=10, lr=3e-3, total_updates=3000,
                  eval_size=1024),
    "paper": dict(),
}


# --- DATA ---


def parity_batch(key, batch: int, seq_len: int, bits: int):
    """[1] Sec. 3.1: a random number k ~ U{1..bits} of random entries set to +-1, the rest 0;
    target 1 if the number of +1 entries is odd. Returns x (B, T, bits), y (B, T) in {0, 1}."""
    kk, kp, ks = jax.random.split(key, 3)
    k = jax.random.randint(kk, (batch, seq_len, 1), 1, bits + 1)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(kp, (batch, seq_len, bits)), -1), -1)
    chosen = rank < k  # k distinct random positions
    sign = jnp.where(jax.random.bernoulli(ks, 0.5, (batch, seq_len, bits)), 1.0, -1.0)
    x = jnp.where(chosen, sign, 0.0)
    y = (jnp.sum(x == 1.0, -1) % 2).astype(jnp.float32)
    return x, y


# --- NETWORKS ---


class RNN(nn.Module):
    """Tanh RNN with a halting unit and a linear (logit) output; ACT drives its methods."""

    hidden: int
    halt_bias_init: float = 1.0

    def setup(self):
        self.w_x = nn.Dense(self.hidden, name="w_x")  # input weights (with the bias)
        self.w_s = nn.Dense(self.hidden, use_bias=False, name="w_s")  # recurrent weights
        self.w_h = nn.Dense(1, bias_init=nn.initializers.constant(self.halt_bias_init),
                            name="w_h")
        self.w_y = nn.Dense(1, name="w_y")

    def step(self, s, x_aug):
        """s^n = S(s^{n-1}, x^n) = tanh(W_x x^n + W_s s^{n-1} + b): (B, H), (B, I+1) -> (B, H)"""
        return jnp.tanh(self.w_x(x_aug) + self.w_s(s))

    def halt(self, s):
        """[1] Eq. 9: h = sigmoid(W_h s + b_h): (B, H) -> (B,)"""
        return jax.nn.sigmoid(self.w_h(s)[..., 0])

    def output(self, s):
        """[1] Eq. 8: y = W_y s + b_y (a logit): (B, H) -> (B,)"""
        return self.w_y(s)[..., 0]

    def __call__(self, s, x_aug):  # only for init: touches every parameter
        s = self.step(s, x_aug)
        return self.halt(s), self.output(s)


# --- ACT ---


def act_step(apply, s_prev, x, max_steps: int, eps: float, cap=None):
    """Ponder one input step. apply(method, *args) runs an RNN method with bound params.
    s_prev (B, H), x (B, I) -> mean-field s_t (B, H), y_t (B,), N (B,), R (B,), p (B, M).
    `cap` (traced int, optional) halts at step min(cap, M) at the latest: cap = M changes
    nothing, cap = 1 is the RNN without pondering in the same program."""
    batch = x.shape[0]

    def inner(carry, n):
        s, cum_h, halted, s_acc, y_acc, steps, rem = carry
        flag = jnp.full((batch, 1), (n == 0).astype(x.dtype))
        s = apply("step", s, jnp.concatenate([x, flag], -1))  # [1] Eq. 7, flag appended
        h = apply("halt", s)  # [1] Eq. 9
        running = ~halted
        # [1] Eq. 10: halt at the first n with sum_{n'<=n} h >= 1 - eps, or at n = M
        stop = running & ((cum_h + h >= 1.0 - eps) | (n == max_steps - 1))
        if cap is not None:
            stop = stop | (running & (n >= cap - 1))
        # [1] Eq. 11-12: p = h before the halting step, R = 1 - sum_{n<N} h at it, 0 after
        p = jnp.where(stop, 1.0 - cum_h, jnp.where(running, h, 0.0))
        s_acc = s_acc + p[:, None] * s  # [1] Eq. 13
        y_acc = y_acc + p * apply("output", s)  # [1] Eq. 14
        steps = steps + running.astype(jnp.int32)
        rem = jnp.where(stop, 1.0 - cum_h, rem)
        cum_h = jnp.where(running & ~stop, cum_h + h, cum_h)
        return (s, cum_h, halted | stop, s_acc, y_acc, steps, rem), p

    zeros = jnp.zeros((batch,), s_prev.dtype)
    init = (s_prev, zeros, jnp.zeros((batch,), bool), jnp.zeros_like(s_prev), zeros,
            jnp.zeros((batch,), jnp.int32), zeros)
    (_, _, _, s_t, y_t, steps, rem), p = jax.lax.scan(inner, init, jnp.arange(max_steps))
    return s_t, y_t, steps, rem, p.T


def forward(params, x, cfg: Config, cap=None):
    """x (B, T, bits) -> logits (B, T), N (B, T), R (B, T), p (B, T, M). `cap`: see
    act_step (State.ponder_cap)."""
    net = RNN(cfg.hidden, cfg.halt_bias_init)

    def apply(method, *args):
        return net.apply(params, *args, method=getattr(RNN, method))

    def outer(s, x_t):
        s, y, n, r, p = act_step(apply, s, x_t, cfg.max_steps, cfg.eps, cap)
        return s, (y, n, r, p)

    s0 = jnp.zeros((x.shape[0], cfg.hidden), x.dtype)
    _, (y, n, r, p) = jax.lax.scan(outer, s0, jnp.swapaxes(x, 0, 1))  # over time t
    return y.T, n.T, r.T, jnp.swapaxes(p, 0, 1)


# --- LOSS ---


def ponder_cost(steps, rem):
    """[1] Eq. 15-16: P(x) = sum_t N(t) + R(t); N has no gradient (piecewise constant).
    steps, rem (B, T) -> (B,)"""
    return jnp.sum(jax.lax.stop_gradient(steps.astype(rem.dtype)) + rem, -1)


def loss_fn(params, x, y, cfg: Config, cap=None):
    logits, steps, rem, _ = forward(params, x, cfg, cap)
    task = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y), -1)  # summed over t
    ponder = ponder_cost(steps, rem)
    loss = jnp.mean(task + cfg.tau * ponder)  # [1] Eq. 17
    acc = jnp.mean((logits > 0) == (y > 0.5))
    return loss, {"losses/task": jnp.mean(task), "losses/ponder": jnp.mean(ponder),
                  "charts/accuracy": acc, "charts/ponder_steps": jnp.mean(steps)}


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    ponder_cap: jax.Array  # cfg.max_steps, traced: one program can run several (1: no pondering)


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr))


def init(key, cfg: Config) -> State:
    key, k = jax.random.split(key)
    net = RNN(cfg.hidden, cfg.halt_bias_init)
    params = net.init(k, jnp.zeros((1, cfg.hidden)), jnp.zeros((1, cfg.bits + 1)))
    return State(params, make_optimizer(cfg).init(params), key, jnp.zeros((), jnp.int32),
                 jnp.asarray(cfg.max_steps, jnp.int32))


def update(state: State, cfg: Config):
    key, k = jax.random.split(state.key)
    x, y = parity_batch(k, cfg.batch_size, cfg.seq_len, cfg.bits)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, y, cfg,
                                                                    state.ponder_cap)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/loss": loss, **metrics, "charts/grad_norm": optax.tree.norm(grads)}
    return State(params, opt_state, key, state.step + 1, state.ponder_cap), metrics


def evaluate(state: State, cfg: Config):
    """Accuracy, sequence error rate and mean ponder steps on a fixed held-out set."""
    x, y = parity_batch(jax.random.PRNGKey(12345), cfg.eval_size, cfg.seq_len, cfg.bits)
    logits, steps, rem, _ = forward(state.params, x, cfg, state.ponder_cap)
    correct = (logits > 0) == (y > 0.5)
    return {"eval/accuracy": jnp.mean(correct),
            "eval/sequence_error": 1.0 - jnp.mean(jnp.all(correct, -1)),
            "eval/ponder_steps": jnp.mean(steps), "eval/ponder_cost": jnp.mean(steps + rem)}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["eval/accuracy", "eval/sequence_error",
                                               "eval/ponder_steps", "losses/loss",
                                               "charts/accuracy"])


if __name__ == "__main__":
    main()

