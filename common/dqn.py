"""A small DQN core for the value-based files: replay, TD targets, loss, epsilon, target nets.

Mnih et al. 2015 (Nature 518:529, "DQN"); van Hasselt et al. 2016 (arXiv 1509.06461,
"Double DQN"). Only what is not the science of any one paper lives here; NoisyNet, pseudo-count
and bootstrapped DQN keep their networks, losses and exploration in their own files.

- `Replay`: a jittable circular buffer, a pytree of fixed-size arrays. The layout is
  time-major, one ROW per vectorised env step: every leaf is [rows, num_envs, ...]. A row
  holds what was known when the action was taken (obs, action, reward, done, ...); the
  next observation of row t is the obs of row t + 1 of the same env, so observations are
  stored once (half the memory of storing obs and next obs; what makes 1M Atari frames
  fit one GPU). `replay_sample` draws (row, env) uniformly among rows whose successor is
  written and returns the two rows `(cur, nxt)`.
- `td_target`: y = r + gamma (1 - done) max_a Q_target(s', a), or with Double DQN
  y = r + gamma (1 - done) Q_target(s', argmax_a Q_online(s', a)).
- `huber`: the DQN error clip as a loss (quadratic within delta, linear outside).
- `linear_schedule` / `epsilon_greedy`: DQN's annealed epsilon and the behaviour policy.
- `periodic_update`: the target network copy every `period` steps.

Everything is shape-polymorphic over leading axes, so an ensemble (bootstrapped DQN: a
leading head axis K on params and Q-values) vmaps these functions over heads and shares
one `Replay` (store per-head bootstrap masks as one more leaf).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

# --- REPLAY ---


@struct.dataclass
class Replay:
    """Circular replay of rows: `data` leaves [rows, num_envs, ...]."""

    data: Any
    pos: jax.Array  # int32: the row the next `replay_add` writes
    size: jax.Array  # int32: rows written so far, at most `rows`

    @property
    def rows(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def replay_init(row: Any, rows: int) -> Replay:
    """An empty buffer of `rows` rows shaped like `row` (leaves [num_envs, ...])."""
    if rows < 2:
        raise ValueError(f"replay rows={rows} must be >= 2 (a row's successor holds its next obs)")
    data = jax.tree.map(lambda x: jnp.zeros((rows, *jnp.shape(x)), jnp.asarray(x).dtype), row)
    return Replay(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def replay_add(buf: Replay, row: Any) -> Replay:
    """Write one row (a batch of num_envs transitions) over the oldest; wraps around."""
    data = jax.tree.map(lambda d, x: d.at[buf.pos].set(x.astype(d.dtype)), buf.data, row)
    return Replay(data, (buf.pos + 1) % buf.rows, jnp.minimum(buf.size + 1, buf.rows))


def replay_sample(buf: Replay, key: jax.Array, batch_size: int):
    """`batch_size` (row, env) pairs drawn uniformly, with replacement, among the
    `size - 1` oldest written rows (the newest has no successor yet). Returns (cur, nxt):
    leaves [batch_size, ...] of each pair's row and of the row after it (same env).
    Sample only once `size >= 2`; before that the draws are of row `pos - size` (padding)."""
    k_row, k_env = jax.random.split(key)
    num_envs = jax.tree.leaves(buf.data)[0].shape[1]
    offset = jax.random.randint(k_row, (batch_size,), 0, jnp.maximum(buf.size - 1, 1))
    t = (buf.pos - buf.size + offset) % buf.rows  # oldest row is pos - size (mod rows)
    e = jax.random.randint(k_env, (batch_size,), 0, num_envs)
    cur = jax.tree.map(lambda d: d[t, e], buf.data)
    nxt = jax.tree.map(lambda d: d[(t + 1) % buf.rows, e], buf.data)
    return cur, nxt


# --- TARGETS AND LOSS ---


def td_target(reward, discount, q_next_target, q_next_online=None):
    """One-step TD target over leading batch axes; `discount` = gamma (1 - done).

    DQN ([Mnih 2015] Alg. 1):  y = r + discount * max_a Q_target(s', a)
    Double DQN ([van Hasselt 2016] Eq. 4), when `q_next_online` is given:
        y = r + discount * Q_target(s', argmax_a Q_online(s', a))
    No gradient flows into the target.
    """
    if q_next_online is None:
        v = q_next_target.max(-1)
    else:
        a_star = jnp.argmax(q_next_online, -1)
        v = jnp.take_along_axis(q_next_target, a_star[..., None], -1)[..., 0]
    return jax.lax.stop_gradient(reward + discount * v)


def huber(x, delta: float = 1.0):
    """0.5 x^2 for |x| <= delta, else delta (|x| - 0.5 delta): DQN's clip of the TD error
    to [-delta, delta] in the gradient ([Mnih 2015] Methods, "error clipping")."""
    return optax.losses.huber_loss(x, delta=delta)


def q_loss(q, action, target, weight=None, delta: float = 1.0):
    """Mean Huber loss of Q(s, a) - y over the batch; `weight` (0/1 or importance weights)
    multiplies each sample and the mean is over all samples."""
    q_a = jnp.take_along_axis(q, action[..., None].astype(jnp.int32), -1)[..., 0]
    err = huber(q_a - target, delta)
    return (err if weight is None else err * weight).mean()


# --- EXPLORATION SCHEDULE ---


def linear_schedule(step, start: float, end: float, duration: int, begin: int = 0):
    """`start` until `begin`, then linear to `end` over `duration` steps, then `end`
    (DQN's epsilon: 1.0 -> 0.1 over the first 1M steps)."""
    frac = jnp.clip((step - begin) / max(duration, 1), 0.0, 1.0)
    return start + frac * (end - start)


def epsilon_greedy(key, q, epsilon):
    """argmax_a q with probability 1 - epsilon, else a uniform action; q [..., A]."""
    k_u, k_a = jax.random.split(key)
    batch = q.shape[:-1]
    random_a = jax.random.randint(k_a, batch, 0, q.shape[-1])
    explore = jax.random.uniform(k_u, batch) < epsilon
    return jnp.where(explore, random_a, jnp.argmax(q, -1))


# --- TARGET NETWORK ---


def periodic_update(online, target, step, period: int):
    """The online params when `step % period == 0`, else the target's: call with the count
    of gradient updates done so far (so the copy happens every `period` updates)."""
    return optax.periodic_update(online, target, step, period)
