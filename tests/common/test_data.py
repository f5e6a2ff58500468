"""Tests of the text and image data in common/data.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import data


def test_char_corpus_round_trips_and_splits():
    tr, va, vocab = data.char_corpus("pydoc")
    text = data.text_corpus("pydoc")
    assert len(tr) + len(va) == len(text) and len(va) == pytest.approx(0.1 * len(text), abs=1)
    assert "".join(vocab[i] for i in tr[:200]) == text[:200]
    assert "".join(vocab[i] for i in va[-50:]) == text[-50:]
    btr, _, bvocab = data.char_corpus("this", byte_level=True)
    assert len(bvocab) == 256 and bytes(btr[:10].astype(np.uint8)).decode() == "The Zen of"
    with pytest.raises(ValueError, match="corpus must be"):
        data.text_corpus("wikipedia")


def test_stdlib_corpus_is_python_source():
    text = data.text_corpus("stdlib", max_chars=200_000)
    assert len(text) == 200_000 and "def " in text and "import " in text


def test_lm_windows_targets_are_next_tokens():
    ids = jnp.arange(1000, dtype=jnp.int32)
    x, y = jax.jit(data.lm_windows, static_argnums=(2, 3))(jax.random.PRNGKey(0), ids, 4, 16)
    assert x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(y, x + 1)  # ids are positions here
    assert len(set(np.asarray(x[:, 0]).tolist())) > 1


def test_number_pairs_and_digits():
    pairs = data.number_pairs(50, seed=1)
    assert len(pairs) == 50 and pairs == data.number_pairs(50, seed=1)
    en, de = zip(*pairs, strict=True)
    # German names units before tens ("einundzwanzig"): the reordering attention must learn
    assert any("und" in d for d in de) and any("-" in e for e in en)
    assert len({len(e) for e in en}) > 5  # short and long numbers
    images, labels = data.digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and set(labels) == set(range(10))
