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


def test_char_corpus_ids_are_the_sorted_characters():
    """The vectorised code-point ids equal a dictionary lookup over sorted(set(text))."""
    tr, va, vocab = data.char_corpus("this", val_fraction=0.25)
    text = data.text_corpus("this")
    assert vocab == sorted(set(text))
    lut = {c: i for i, c in enumerate(vocab)}
    np.testing.assert_array_equal(np.concatenate([tr, va]), [lut[c] for c in text])
    assert tr.dtype == va.dtype == np.int32


def test_real_corpora_read_their_files_in_the_official_order(tmp_path):
    """Tiny fixtures in each corpus's real layout: the splits are joined train, valid,
    test (so the held-out tail is the official held-out text); a missing file or data_dir
    names what is expected."""
    wt = tmp_path / "wt"
    wt.mkdir()
    for split in ("train", "valid", "test"):
        (wt / f"wiki.{split}.tokens").write_text(f" = {split} = \n the <unk> cat @-@ sat \n")
    text = data.text_corpus("wikitext-103", data_dir=wt)
    assert text.index("= train =") < text.index("= valid =") < text.index("= test =")
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        (raw / f"wiki.{split}.raw").write_text(split)
    assert data.text_corpus("wikitext-2", data_dir=raw) == "trainvalidtest"
    (tmp_path / "enwik8").write_bytes("<page>caf\u00e9".encode() + b"\xc3")  # cut mid-character
    tr, va, vocab = data.char_corpus("enwik8", 0.5, data_dir=tmp_path)
    assert "".join(vocab[i] for i in np.concatenate([tr, va])) == "<page>caf\u00e9\ufffd"
    bw = tmp_path / "1b"
    (bw / "training-monolingual.tokenized.shuffled").mkdir(parents=True)
    (bw / "heldout-monolingual.tokenized.shuffled").mkdir()
    for i in (2, 1):
        (bw / "training-monolingual.tokenized.shuffled" / f"news.en-0000{i}-of-00100").write_text(
            f"train {i} .\n")
    (bw / "heldout-monolingual.tokenized.shuffled" / "news.en.heldout-00000-of-00050"
     ).write_text("held out .\n")
    assert data.text_corpus("1b-words", data_dir=bw) == "train 1 .\ntrain 2 .\nheld out .\n"
    assert data.text_corpus("1b-words", max_chars=12, data_dir=bw) == "train 1 .\ntr"
    with pytest.raises(ValueError, match="pass data_dir"):
        data.text_corpus("text8")
    with pytest.raises(FileNotFoundError, match="wiki.train"):
        data.text_corpus("wikitext-103", data_dir=tmp_path)


def test_imdb_reader_reads_the_aclimdb_layout(tmp_path):
    root = tmp_path / "aclImdb"
    for sub, names in (("train/pos", ["1_9", "0_10"]), ("train/neg", ["3_1"]),
                       ("test/pos", ["0_7"]), ("test/neg", ["0_2", "1_4"]),
                       ("train/unsup", ["0_0"])):
        (root / sub).mkdir(parents=True)
        for n in names:
            (root / sub / f"{n}.txt").write_text(f"{sub} {n}<br />next line")
    texts, labels = data.imdb_reviews(tmp_path, "train")
    assert texts[0] == "train/pos 0_10\nnext line" and labels.tolist() == [1, 1, 0]
    texts, labels = data.imdb_reviews(root, "test")
    assert [t.split()[1] for t in texts] == ["0_7", "0_2", "1_4"] and labels.tolist() == [1, 0, 0]
    assert data.imdb_reviews(root, "unsup")[1].tolist() == [-1]
    with pytest.raises(FileNotFoundError, match="aclImdb"):
        data.imdb_reviews(tmp_path / "nowhere", "train")


def test_safetensors_reader_reads_the_format_by_hand(tmp_path):
    """A file written byte by byte in the safetensors layout (header length, JSON header
    with offsets into the data, little-endian data; BF16 included): the reader gives back
    every tensor. Fails if offsets are read from the file start or shapes are transposed."""
    import json

    import ml_dtypes

    tensors = {"w": np.arange(6, dtype="<f4").reshape(2, 3), "ids": np.array([3, -1], "<i8"),
               "h": np.array([[1.5, -2.0]], ml_dtypes.bfloat16)}
    names = {"w": "F32", "ids": "I64", "h": "BF16"}
    header, body = {"__metadata__": {"format": "pt"}}, b""
    for k, v in tensors.items():
        header[k] = {"dtype": names[k], "shape": list(v.shape),
                     "data_offsets": [len(body), len(body) + v.nbytes]}
        body += v.tobytes()
    head = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + body)
    got = data.read_safetensors(tmp_path / "model.safetensors")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k].astype(np.float32), v.astype(np.float32))


def test_bits_and_perplexity_are_the_posts_identities():
    """The post's perplexity: exp(mean NLL in nats) = 2^(mean NLL in bits) = (prod p)^(-1/N);
    a uniform model over V symbols has perplexity V and log2 V bits per symbol; bits per
    byte of a token model divide by the bytes per token. Fails if bits uses log10 or ln
    the wrong way round, or perplexity is exp of the bits."""
    p = np.array([0.5, 0.125, 0.25, 0.9, 0.01])
    nll = -np.log(p).mean()
    np.testing.assert_allclose(data.perplexity(nll), np.prod(p) ** (-1 / p.size), rtol=1e-6)
    np.testing.assert_allclose(2.0 ** data.bits(nll), data.perplexity(nll), rtol=1e-6)
    np.testing.assert_allclose(data.bits(nll), -np.log2(p).mean(), rtol=1e-12)
    v = 50
    np.testing.assert_allclose(data.perplexity(np.log(v)), v, rtol=1e-6)
    np.testing.assert_allclose(data.bits(np.log(v)), np.log2(v), rtol=1e-12)
    np.testing.assert_allclose(data.bits(np.log(256.0), units_per_token=4.0), 2.0, rtol=1e-12)
    traced = jax.jit(lambda x: (data.bits(x), data.perplexity(x)))(jnp.float32(nll))
    np.testing.assert_allclose(traced, (data.bits(nll), data.perplexity(nll)), rtol=1e-6)


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
