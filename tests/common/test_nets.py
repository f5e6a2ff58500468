import flax.linen as nn
import jax
import numpy as np
import pytest

from common import nets
from tests.common.compiled import compiled


@pytest.mark.parametrize("kernel,stride,side,padding,grad", [
    (3, 1, 8, "SAME", True), (3, 2, 8, "SAME", False), (3, 2, 7, "SAME", True),
    (1, 1, 5, "SAME", False), (1, 2, 8, "SAME", False), (7, 2, 9, "SAME", False),
    (3, 1, 6, "VALID", True), (3, 2, 7, ((1, 0), (2, 1)), True)])
def test_shifted_conv_equals_xla_conv(kernel, stride, side, padding, grad):
    """Catches a wrong padding split, stride offset or kernel-tap order in the shifted-matmul
    convolution (outputs differ from flax's nn.Conv), and, for the cases marked `grad`, a
    wrong weight gradient. Each case compiles once (forward and gradient in one jit)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, 5))
    ref = nn.Conv(6, (kernel, kernel), (stride, stride), padding=padding)
    v = compiled(lambda k_: ref.init(k_, x), jax.random.PRNGKey(1))
    ours = nets.Conv(6, kernel, stride, shift=True, padding=padding)
    loss = lambda m: lambda p: (m.apply(p, x) ** 2).sum()

    @jax.jit
    def both(v):
        out = ours.apply(v, x), ref.apply(v, x)
        return out, ((jax.grad(loss(ours))(v), jax.grad(loss(ref))(v)) if grad else None)

    (y_ours, y_ref), grads = both(v)
    np.testing.assert_allclose(y_ours, y_ref, atol=1e-5)
    if grad:  # the weight gradient equals the native conv's
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                     *grads)


def test_shifted_conv_refuses_what_it_does_not_compute():
    """Dilation, feature groups and other layouts raise instead of being silently ignored
    (it used to return an undilated, ungrouped convolution); the mixed-precision option is
    passed to its matmuls."""
    x = jax.numpy.ones((1, 6, 6, 4))
    for kw in (dict(kernel_dilation=(2, 2)), dict(input_dilation=(2, 2)),
               dict(feature_group_count=2)):
        conv = nets.Conv(4, 3, shift=True, **kw)
        with pytest.raises(ValueError, match="without dilation or groups"):
            jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    w = jax.numpy.ones((3, 3, 4, 2), jax.numpy.bfloat16)
    y = jax.eval_shape(lambda a, b: nets.shifted_conv(a, b, (1, 1), "SAME",
                                                      preferred_element_type=jax.numpy.float32),
                       x.astype(jax.numpy.bfloat16), w)
    assert y.dtype == jax.numpy.float32
    with pytest.raises(ValueError, match="dimension_numbers"):
        nets.shifted_conv(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def test_orthogonal_is_flax_value_for_value_and_never_batches_lapack_on_cpu():
    """`nets.orthogonal` under vmap (seeds) and nested vmap (seeds x ensemble) gives flax's
    orthogonal matrices bit for bit, including the recurrent kernels of ResetGRU and
    ResetLSTM, while its lowered program has no LAPACK call with a batch dimension. Flax's
    own initialiser, vmapped, does batch them: that batched QR is what hung a 2-core CI run
    under jaxlib 0.10.2 (two at once deadlock XLA:CPU's 2-thread pool)."""
    import re

    import jax.numpy as jnp

    x = jnp.ones((2, 5))
    gru, lstm = nets.ResetGRU(4), nets.ResetLSTM(4)
    reset = jnp.zeros((2,), bool)

    def ours(k):
        k1, k2, k3 = jax.random.split(k, 3)
        return (nets.orthogonal(0.5)(k1, (5, 3)),
                gru.init(k2, gru.initialize_carry((2,)), (x, reset)),
                lstm.init(k3, lstm.initialize_carry((2,)), (x, reset)))

    class FlaxCell(nn.Module):  # the wrappers as they were, with flax's initialiser
        cell: type

        @nn.compact
        def __call__(self, carry, inputs):
            return self.cell(4)(carry, inputs[0])

    def flax_(k):
        k1, k2, k3 = jax.random.split(k, 3)
        return (nn.initializers.orthogonal(0.5)(k1, (5, 3)),
                FlaxCell(nn.GRUCell).init(k2, jnp.zeros((2, 4)), (x, reset)),
                FlaxCell(nn.OptimizedLSTMCell).init(k3, (jnp.zeros((2, 4)),) * 2, (x, reset)))

    keys = jax.random.split(jax.random.PRNGKey(0), 6).reshape(2, 3, 2)
    both = jax.jit(lambda k: (jax.vmap(jax.vmap(ours))(k), jax.vmap(jax.vmap(flax_))(k)))
    a, b = both(keys)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    batch_dims = lambda f: set(re.findall(  # noqa: E731
        r'lapack_\w+geqrf\w*\(.*?num_batch_dims = "(\d+)"',
        jax.jit(jax.vmap(f)).lower(keys[0]).as_text()))
    if jax.default_backend() == "cpu":  # (other backends vmap, and call no LAPACK)
        assert batch_dims(ours) == {"0"}, batch_dims(ours)
        assert batch_dims(flax_) == {"1"}, batch_dims(flax_)
