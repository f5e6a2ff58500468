"""Standard torsos with their papers' initialisations.

- `MLP`: tanh/relu multilayer perceptron with orthogonal init (the PPO default,
  Engstrom et al. 2020, arXiv 2005.12729).
- `NatureCNN`: Mnih et al. 2015 (Nature 518:529): 32-8/4, 64-4/2, 64-3/1, dense 512.
- `ImpalaCNN`: Espeholt et al. 2018 (arXiv 1802.01561): 3 stacks of conv + max-pool +
  2 residual blocks, channels (16, 32, 32), dense 256.
- `ResetGRU` / `ResetLSTM`: recurrent cells whose carry is zeroed where an episode
  starts, scanned over time (`scan_rnn`).
- `Conv` / `shifted_conv`: `nn.Conv` optionally computed as a sum of shifted matmuls, the
  same maths with fast weight gradients inside `lax.scan` on XLA:CPU.

Networks particular to one method live in that method's file.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def orthogonal(scale: float = np.sqrt(2.0)):
    """Orthogonal kernel initialiser with gain `scale` (Saxe et al. 2013): flax's, value for
    value, except that under `vmap` on CPU the matrices are made one after another.

    flax's initialiser takes the QR of a Gaussian matrix; vmapped over seeds or ensemble
    members, that becomes one batched LAPACK call, and jaxlib 0.10.2 fans a batched call out
    over XLA:CPU's intra-op thread pool and blocks a pool thread until it is done. When the
    thunk executor runs as many batched calls at once as the pool has threads (two on a
    2-core machine), every thread waits on work queued behind itself and the process hangs
    for good. Here the batching rule maps the unbatched initialiser over the batch
    (`lax.map`), so no LAPACK call on CPU has a batch dimension; other backends vmap.
    """
    base = nn.initializers.orthogonal(scale)

    def init(key, shape, dtype=jnp.float32):
        @jax.custom_batching.custom_vmap
        def one(k):
            return base(k, shape, dtype)

        @one.def_vmap
        def _(axis_size, in_batched, k):
            if jax.default_backend() == "cpu":
                return jax.lax.map(one, k), True
            return jax.vmap(lambda kk: base(kk, shape, dtype))(k), True

        return one(key)

    return init


class MLP(nn.Module):
    """Dense layers with an activation after each; orthogonal(sqrt 2) weights, zero bias."""

    features: Sequence[int] = (64, 64)
    activation: Callable = nn.tanh
    scale: float = float(np.sqrt(2.0))

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = self.activation(nn.Dense(f, kernel_init=orthogonal(self.scale))(x))
        return x


class NatureCNN(nn.Module):
    """The DQN torso (Mnih et al. 2015); input uint8 or float [..., H, W, C] in [0, 255]."""

    activation: Callable = nn.relu
    features: int = 512
    layers: tuple[tuple[int, int, int], ...] = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
    """(channels, kernel, stride) of each VALID conv"""

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255.0
        for ch, k, s in self.layers:
            x = self.activation(
                nn.Conv(ch, (k, k), (s, s), padding="VALID", kernel_init=orthogonal())(x)
            )
        x = x.reshape(*x.shape[:-3], -1)  # (..., H'*W'*64)
        return self.activation(nn.Dense(self.features, kernel_init=orthogonal())(x))


class _ResidualBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        ch = x.shape[-1]
        y = nn.Conv(ch, (3, 3))(nn.relu(x))
        y = nn.Conv(ch, (3, 3))(nn.relu(y))
        return x + y


class ImpalaCNN(nn.Module):
    """IMPALA's deep residual torso (Espeholt et al. 2018, Fig. 3 right)."""

    channels: Sequence[int] = (16, 32, 32)
    features: int = 256

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255.0
        for ch in self.channels:
            x = nn.Conv(ch, (3, 3))(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            x = _ResidualBlock()(x)
            x = _ResidualBlock()(x)
        x = nn.relu(x).reshape(*x.shape[:-3], -1)
        return nn.relu(nn.Dense(self.features)(x))


class ResetGRU(nn.Module):
    """A GRU cell whose carry is reset to zeros where `reset` is true.

    Call signature: `(carry, (x, reset)) -> (carry, y)`, so it scans over time.
    """

    features: int

    @nn.compact
    def __call__(self, carry, inputs):
        x, reset = inputs
        carry = jnp.where(reset[..., None], jnp.zeros_like(carry), carry)
        carry, y = nn.GRUCell(self.features, recurrent_kernel_init=orthogonal(1.0))(
            carry, x
        )
        return carry, y

    def initialize_carry(self, batch_shape: tuple[int, ...]):
        return jnp.zeros((*batch_shape, self.features))


class ResetLSTM(nn.Module):
    """An LSTM cell whose (c, h) carry is reset to zeros where `reset` is true."""

    features: int

    @nn.compact
    def __call__(self, carry, inputs):
        x, reset = inputs
        carry = jax.tree.map(
            lambda c: jnp.where(reset[..., None], jnp.zeros_like(c), c), carry
        )
        carry, y = nn.OptimizedLSTMCell(
            self.features, recurrent_kernel_init=orthogonal(1.0)
        )(carry, x)
        return carry, y

    def initialize_carry(self, batch_shape: tuple[int, ...]):
        z = jnp.zeros((*batch_shape, self.features))
        return (z, z)


def scan_rnn(cell: type[nn.Module]) -> type[nn.Module]:
    """The cell lifted over a leading time axis: `(carry, (x[T], reset[T])) -> (carry, y[T])`."""
    return nn.scan(cell, variable_broadcast="params", split_rngs={"params": False})


# --- CONVOLUTION AS SHIFTED MATMULS ---


def shifted_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                 precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` for NHWC / HWIO without dilation or groups, as a sum of
    kh * kw matmuls of shifted (strided) input slices. XLA:CPU computes the weight gradient
    of a native conv inside a while loop (the runner's lax.scan) ~100x slower than outside
    (jax-ml/jax#12868); this form's gradients are matmuls and pads, fast everywhere. On
    accelerators the native conv is the faster choice (a CPU-only option). Dilation, groups
    and other layouts raise ValueError rather than being ignored."""
    unsupported = {
        "lhs_dilation": lhs_dilation is not None and any(d != 1 for d in lhs_dilation),
        "rhs_dilation": rhs_dilation is not None and any(d != 1 for d in rhs_dilation),
        "feature_group_count": feature_group_count != 1,
        "batch_group_count": batch_group_count != 1,
        "dimension_numbers": dimension_numbers is not None and tuple(dimension_numbers) not in (
            ("NHWC", "HWIO", "NHWC"), ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))),
    }
    if any(unsupported.values()):
        raise ValueError("shifted_conv supports NHWC/HWIO convolutions without dilation or "
                         f"groups; got {[k for k, v in unsupported.items() if v]}")
    kh, kw, _, _ = rhs.shape
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            xs = x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw]  # (B, Ho, Wo, Ci)
            out = out + jnp.einsum("nhwc,co->nhwo", xs, rhs[i, j], precision=precision,
                                   preferred_element_type=preferred_element_type)
    return out


def Conv(features: int, kernel: int = 3, stride: int = 1, shift: bool = False,
         padding="SAME", **kw) -> nn.Conv:
    """A square `nn.Conv`; with `shift=True` computed by `shifted_conv` (no dilation)."""
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding,
                   conv_general_dilated=shifted_conv if shift else None, **kw)
