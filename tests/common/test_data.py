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


# ----------------------------------------------------------------------------- digit images
# and SimCLR augmentations (selfsup/)


def test_digit_images_are_the_sklearn_digits_upsampled_and_split():
    tr_x, tr_y, te_x, te_y = data.digit_images(16)
    assert tr_x.shape == (1000, 16, 16, 1) and te_x.shape == (797, 16, 16, 1)
    assert tr_x.dtype == np.float32 and 0.0 <= tr_x.min() and tr_x.max() <= 1.0
    images, labels = data.digits()
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(tr_y, labels[perm[:1000]])
    np.testing.assert_array_equal(te_y, labels[perm[1000:]])
    # 2x bilinear upsampling: each 2x2 block averages back to (about) the source pixel
    # away from the border; the mean intensity is preserved exactly up to edge effects
    np.testing.assert_allclose(tr_x[..., 0].mean((1, 2)), images[perm[:1000]].mean((1, 2)) / 16,
                               atol=0.02)
    x8 = data.digit_images(8)[0]
    np.testing.assert_allclose(x8[..., 0], images[perm[:1000]] / 16.0, atol=1e-6)  # identity


def test_crop_resize_by_hand_and_random_resized_crop_area():
    """crop_resize of the window (y=1, x=0, h=2, w=2) of a 4x4 ramp img[i, j] = 4 i + j to
    2x2 samples the pixel centres (1.5 - 0.5 + 0.5 ...) = rows 1..2, cols 0..1 exactly."""
    img = jnp.arange(16.0).reshape(4, 4, 1)
    out = data.crop_resize(img, jnp.array([1.0, 0.0, 2.0, 2.0]), 2)
    np.testing.assert_allclose(out[..., 0], [[4, 5], [8, 9]], atol=1e-6)
    # the whole image at the same size is the identity; at half size 2x2 block means
    np.testing.assert_allclose(data.crop_resize(img, jnp.array([0.0, 0, 4, 4]), 4), img,
                               atol=1e-5)
    np.testing.assert_allclose(data.crop_resize(img, jnp.array([0.0, 0, 4, 4]), 2)[..., 0],
                               [[2.5, 4.5], [10.5, 12.5]], atol=1e-5)
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    crops = jax.vmap(lambda k: data.random_resized_crop(k, img, 8))(keys)
    assert crops.shape == (64, 8, 8, 1) and float(crops.min()) >= 0 and float(crops.max()) <= 15
    assert len({float(c.std()) for c in crops}) > 10  # different windows


def test_flip_grayscale_jitter_and_blur():
    key = jax.random.PRNGKey(0)
    img = jax.random.uniform(key, (8, 8, 3))
    np.testing.assert_array_equal(data.random_flip(key, img, p=1.0), img[:, ::-1])
    np.testing.assert_array_equal(data.random_flip(key, img, p=0.0), img)
    g = data.grayscale(img)
    np.testing.assert_allclose(g[..., 0], img @ jnp.array([0.299, 0.587, 0.114]), rtol=1e-6)
    np.testing.assert_array_equal(data.random_grayscale(key, img, p=1.0), g)
    # strength 0: every jitter factor is 1 (hue 0), so the image comes back unchanged
    np.testing.assert_allclose(data.color_jitter(key, img, 0.0, p=1.0), img, atol=1e-5)
    assert float(jnp.abs(data.color_jitter(key, img, 1.0, p=1.0) - img).mean()) > 0.01
    np.testing.assert_array_equal(data.color_jitter(key, img, 1.0, p=0.0), img)
    # blur of a 20-pixel image: radius (20 // 10) // 2 = 1; a constant image is unchanged,
    # an impulse spreads to its 3x3 neighbourhood only, and the weights sum to 1
    flat = jnp.full((20, 20, 1), 0.3)
    np.testing.assert_allclose(data.gaussian_blur(key, flat, p=1.0), flat, rtol=1e-6)
    dot = jnp.zeros((20, 20, 1)).at[10, 10].set(1.0)
    centres = []
    for k in jax.random.split(key, 4):  # sigma ~ U(0.1, 2): some draws barely blur
        b = data.gaussian_blur(k, dot, p=1.0)[..., 0]
        assert float(b[9:12, 9:12].sum()) == pytest.approx(1.0, 1e-5)
        assert float(b.sum() - b[9:12, 9:12].sum()) == pytest.approx(0.0, abs=1e-6)
        centres.append(float(b[10, 10]))
    assert min(centres) < 0.5, centres


def test_simclr_augment_vmaps_over_a_batch():
    x = jnp.asarray(data.digit_images(16)[0][:8])
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    v = jax.jit(jax.vmap(lambda k, im: data.simclr_augment(k, im, 16, 0.5, True)))(keys, x)
    assert v.shape == (8, 16, 16, 1) and float(v.min()) >= 0 and float(v.max()) <= 1
    assert float(jnp.abs(v - x).mean()) > 0.01


# --- MNIST and CIFAR-10 files on disk ---


def test_mnist_reader_reads_idx_files_plain_and_gzipped(tmp_path):
    from tests.common.datasets import write_idx, write_mnist

    root = write_mnist(tmp_path / "mnist", 12, 3, gz=True)
    tr_x, tr_y, te_x, te_y = data.load_mnist(root)
    assert tr_x.shape == (12, 28, 28) and te_x.shape == (3, 28, 28) and tr_x.dtype == np.uint8
    assert tr_y.dtype == np.int32 and te_y.shape == (3,)
    rng = np.random.default_rng(0)  # write_mnist's draws, in order
    np.testing.assert_array_equal(tr_x, rng.integers(0, 256, (12, 28, 28)))
    np.testing.assert_array_equal(tr_y, rng.integers(0, 10, 12))
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "plain", a, gz=False)), a)
    with pytest.raises(FileNotFoundError, match="idx files"):
        data.read_idx(tmp_path / "missing")
    (tmp_path / "bad").write_bytes(bytes([0, 0, 13, 1, 0, 0, 0, 1]) + b"\0" * 4)  # float32
    with pytest.raises(ValueError, match="not a uint8 idx"):
        data.read_idx(tmp_path / "bad")


def test_cifar10_reader_reads_the_python_batches(tmp_path):
    from tests.common.datasets import write_cifar10

    write_cifar10(tmp_path / "cifar-10-batches-py")
    tr_x, tr_y, te_x, te_y = data.load_cifar10(str(tmp_path))  # finds the sub-folder
    assert tr_x.shape == (10, 32, 32, 3) and te_x.shape == (2, 32, 32, 3)
    assert tr_x.dtype == np.uint8
    np.testing.assert_array_equal(tr_x[3, 5, 7], [16 + 4, 16 + 4 + 1, 16 + 4 + 2])  # batch 2
    np.testing.assert_array_equal(tr_y, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5])
    np.testing.assert_array_equal(te_y, [5, 6])
    with pytest.raises(FileNotFoundError, match="python batches"):
        data.load_cifar10(str(tmp_path / "missing"))
