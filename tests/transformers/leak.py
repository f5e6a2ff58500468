"""Test helper shared by the transformers tests: the no-information-from-the-future check."""

import jax.numpy as jnp
import numpy as np


def assert_no_future_leak(fn, tokens, t: int, vocab: int, atol: float = 0.0):
    """fn(tokens (B, L) int) -> outputs (B, L, ...). Changing the tokens at positions >= t
    must leave the outputs at positions < t unchanged (exactly, or within atol), and must
    change some output at a position >= t (else the check proves nothing)."""
    other = tokens.at[:, t:].set((tokens[:, t:] + 1 + jnp.arange(tokens.shape[1] - t)) % vocab)
    a, b = np.asarray(fn(tokens)), np.asarray(fn(other))
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=atol, rtol=0,
                               err_msg=f"outputs before position {t} depend on later tokens")
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-6, "the perturbation changed nothing"


def assert_leaks(fn, tokens, t: int, vocab: int):
    """The broken-variant counterpart: outputs before t DO change."""
    other = tokens.at[:, t:].set((tokens[:, t:] + 1) % vocab)
    a, b = np.asarray(fn(tokens)), np.asarray(fn(other))
    assert np.abs(a[:, :t] - b[:, :t]).max() > 1e-6

