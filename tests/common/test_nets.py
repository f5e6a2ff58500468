import flax.linen as nn
import jax
import numpy as np
import pytest

from common import nets


@pytest.mark.parametrize("kernel,stride,side,padding", [
    (3, 1, 8, "SAME"), (3, 2, 8, "SAME"), (3, 2, 7, "SAME"), (1, 1, 5, "SAME"),
    (1, 2, 8, "SAME"), (7, 2, 9, "SAME"), (3, 1, 6, "VALID"), (3, 2, 7, ((1, 0), (2, 1)))])
def test_shifted_conv_equals_xla_conv(kernel, stride, side, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, side, side, 5))
    ref = nn.Conv(6, (kernel, kernel), (stride, stride), padding=padding)
    v = ref.init(jax.random.PRNGKey(1), x)
    ours = nets.Conv(6, kernel, stride, shift=True, padding=padding)
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), atol=1e-5)
    # and its weight gradient equals the native conv's
    loss = lambda m: lambda p: (m.apply(p, x) ** 2).sum()
    g_ref, g_ours = jax.grad(loss(ref))(v), jax.grad(loss(ours))(v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 g_ours, g_ref)
