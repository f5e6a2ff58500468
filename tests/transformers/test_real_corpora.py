"""Real corpora from --data-dir for the LSTM language models and the character transformers
(elmo, ulmfit, transformer_xl, adaptive_span, char_transformer, reformer, sparse_transformer).

Each file reads `--corpus <name> --data-dir DIR` through common.data (REAL_CORPORA): the Config
check refuses a real corpus without a folder (text_corpus's ValueError), the file's data is
built from a tiny fixture in the real layout (its text holds the section sign, which no
built-in corpus has, so it is known to come from the fixture), and jax.eval_shape(init)
traces. No training and no compiled program: the module runs in seconds."""

import pathlib

import jax
import numpy as np
import pytest

from common import data, run
from tests.common.datasets import write_wikitext
from transformers import adaptive_span as A
from transformers import char_transformer as ct
from transformers import elmo, ulmfit
from transformers import reformer as rf
from transformers import sparse_transformer as st
from transformers import transformer_xl as X

KEY = jax.random.PRNGKey(0)


def _wikitext(folder):
    """WikiText fixture (tests/common/datasets.py)."""
    return write_wikitext(folder)


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    folder = _wikitext(tmp_path_factory.mktemp("corpora") / "wt2")
    return folder, data.text_corpus("wikitext-2", data_dir=folder)


@pytest.fixture(scope="module")
def enwik8(tmp_path_factory):
    """The file enwik8: Wikipedia XML as bytes (here 12k of them, with non-ASCII text)."""
    folder = tmp_path_factory.mktemp("corpora") / "enwik8"
    folder.mkdir()
    rng = np.random.default_rng(1)
    words = ("<page>", "<title>", "Anarchism", "&amp;", "[[link]]", "§", "Zürich", "the", "\n")
    body = "<mediawiki>\n" + " ".join(rng.choice(words, 2000)) + "\n"
    (folder / "enwik8").write_bytes(body.encode()[:12_000])
    return str(folder), data.text_corpus("enwik8", data_dir=folder)


@pytest.fixture(scope="module")
def one_billion(tmp_path_factory):
    """The 1B Word Benchmark's layout: two training shards and the held-out shard 00000, one
    tokenised sentence a line."""
    root = tmp_path_factory.mktemp("corpora") / "1b"
    rng = np.random.default_rng(2)
    words = np.array("the court said it would n't rule on § Zürich 's case .".split())
    p = 0.6 ** np.arange(len(words))  # Zipf-like: the rare words end up as <UNK>
    for sub, name in (("training-monolingual.tokenized.shuffled", "news.en-00002-of-00100"),
                      ("training-monolingual.tokenized.shuffled", "news.en-00001-of-00100"),
                      ("heldout-monolingual.tokenized.shuffled",
                       "news.en.heldout-00000-of-00050")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        lines = [" ".join(rng.choice(words, 9, p=p / p.sum())) for _ in range(60)]
        (root / sub / name).write_text("\n".join(lines) + "\n")
    return str(root), data.text_corpus("1b-words", data_dir=root)


def _parse(mod, args, folder, name="wikitext-2", flag="--corpus"):
    """The Config check without the folder raises text_corpus's error; with it, it passes."""
    with pytest.raises(ValueError, match=f"corpus='{name}' is read from disk: pass data_dir"):
        run.check_config(run.parse(mod.Config, mod.PRESETS, args + [flag, name])[0])
    cfg = run.parse(mod.Config, mod.PRESETS, args + [flag, name, "--data-dir", folder])[0]
    run.check_config(cfg)
    return cfg


def _decode(ids, vocab):
    return "".join(vocab[i] for i in np.asarray(ids))


def test_char_transformer(wikitext):
    folder, text = wikitext
    args = ["--seq-len", "16", "--num-layers", "2", "--d-model", "16", "--num-heads", "2",
            "--d-ff", "32", "--batch-size", "4", "--eval-windows", "8"]
    cfg = _parse(ct, args, folder)
    train, val, size = ct.corpus(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    vocab = sorted(set(text))
    cut = int(len(text) * (1 - cfg.val_fraction))
    assert size == len(vocab) and "§" in vocab
    assert _decode(train, vocab) == text[:cut] and _decode(val, vocab) == text[cut:]
    state = jax.eval_shape(lambda k: ct.init(k, cfg), KEY)
    assert state.train_ids.shape == (cut,)
    assert state.params["params"]["Embed_0"]["embedding"].shape[0] == size


def test_reformer_enwik8_bytes(enwik8):
    folder, text = enwik8
    args = ["--max-chars", "0", "--seq-len", "32", "--batch-size", "2", "--d-model", "32",
            "--n-heads", "2", "--d-ff", "64", "--n-layers", "2", "--n-buckets", "4",
            "--n-hashes", "2", "--chunk-len", "8", "--ff-chunks", "2", "--eval-windows", "2"]
    cfg = _parse(rf, args, folder, "enwik8")
    assert cfg.byte_level
    train, val, size = rf.corpus(cfg.corpus, cfg.max_chars, cfg.byte_level, cfg.data_dir)
    raw = text.encode()
    cut = int(len(raw) * 0.9)
    assert size == 256 and bytes(train) == raw[:cut] and bytes(val) == raw[cut:]
    assert "§" in text
    state = jax.eval_shape(lambda k: rf.init(k, cfg), KEY)
    assert state.train_ids.shape == (cut,) and state.val_ids.shape == (len(raw) - cut,)


def test_sparse_transformer_enwik8_bytes(enwik8):
    folder, text = enwik8
    args = ["--max-chars", "0", "--seq-len", "64", "--stride", "8", "--summary", "2",
            "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "2",
            "--batch-size", "2"]
    cfg = _parse(st, args, folder, "enwik8", "--dataset")
    train, val, size = st.dataset(cfg.dataset, cfg.max_chars, cfg.data_dir)
    raw = text.encode()
    cut = int(len(raw) * 0.9)
    assert size == 256 and bytes(train.astype(np.uint8)) == raw[:cut]
    assert bytes(val.astype(np.uint8)) == raw[cut:]
    state = jax.eval_shape(lambda k: st.init(k, cfg), KEY)
    assert state.train_ids.shape == (cut,)


@pytest.mark.parametrize("name", ["transformer_xl", "adaptive_span"])
def test_segment_recurrent_lms(name, wikitext):
    """Transformer-XL and adaptive span: the fixture's characters (--no-byte-level) and bytes."""
    mod = {"transformer_xl": X, "adaptive_span": A}[name]
    folder, text = wikitext
    args = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--d-inner", "32",
            "--tgt-len", "8", "--batch-size", "2", "--eval-batch", "2", "--eval-segments", "2"]
    args += ["--d-head", "8", "--mem-len", "8", "--eval-tgt-len", "8", "--eval-mem-len", "8"] \
        if mod is X else ["--attn-span", "8", "--span-ramp", "4"]
    vocab = sorted(set(text))
    cut = int(len(text) * 0.9)
    for byte_level in (False, True):
        cfg = _parse(mod, args + ["--byte-level" if byte_level else "--no-byte-level"], folder)
        train, val, size = mod._data(cfg)
        if byte_level:
            raw = text.encode()
            cut_b = int(len(raw) * 0.9)
            assert size == 256 and bytes(train) == raw[:cut_b] and bytes(val) == raw[cut_b:]
        else:
            assert size == len(vocab) and "§" in vocab
            assert _decode(train, vocab) == text[:cut] and _decode(val, vocab) == text[cut:]
    state = jax.eval_shape(lambda k: mod.init(k, cfg), KEY)
    assert state.train_ids.shape == train.shape


def test_elmo_1b_words(one_billion):
    """[1]'s tokens: the benchmark's white-space words, all but the vocab_size - 1 most
    frequent as <UNK>, spelled for the char CNN."""
    folder, text = one_billion
    args = ["--vocab-size", "6", "--filter-widths", "1", "2", "--filter-counts", "4", "4",
            "--max-chars", "8", "--char-dim", "4", "--proj-dim", "8", "--lstm-dim", "16",
            "--seq-len", "8", "--batch-size", "4", "--finetune-batch", "4", "--num-labelled", "8",
            "--num-eval", "8", "--eval-windows", "8", "--task-dim", "8", "--task-hidden", "8"]
    cfg = _parse(elmo, args, folder, "1b-words")
    assert (cfg.tokens, cfg.token_encoder) == ("word", "char_cnn")
    train, val, vocab, spell = elmo.cfg_corpus(cfg)
    words = text.split()
    top = sorted(set(words), key=lambda w: (-words.count(w), w))[:5]  # ties: alphabetical
    assert vocab == top + ["<UNK>"]
    cut = int(len(words) * (1 - cfg.val_fraction))
    seen = [vocab[i] for i in np.concatenate([train, val])]
    assert seen == [w if w in top else "<UNK>" for w in words] and len(train) == cut
    assert "§" not in top and "court" in top
    assert bytes(spell[vocab.index("court")][1:6].tolist()) == b"court"
    state = jax.eval_shape(lambda k: elmo.init(k, cfg), KEY)
    assert (6, 8) in [leaf.shape[-2:] for leaf in jax.tree.leaves(state.params)]  # softmax


def test_ulmfit_wikitext_and_imdb(wikitext, tmp_path):
    """Stage (a) on WikiText (--general-corpus wikitext-2), (b) and (c) on IMDb
    (--target-corpus imdb): the LM text is the train + unsup reviews, the labelled windows
    the train reviews' last seq_len characters with their labels, the held-out ones the
    test reviews'."""
    folder, text = wikitext
    root = tmp_path / "data"
    (root / "aclImdb").mkdir(parents=True)
    for f in pathlib.Path(folder).iterdir():
        (root / f.name).write_text(f.read_text())
    reviews = {}
    for sub, words in (("train/pos", "great fun"), ("train/neg", "dull mess"),
                       ("test/pos", "superb ¶"), ("test/neg", "awful"), ("train/unsup", "ok")):
        (root / "aclImdb" / sub).mkdir(parents=True)
        for i in range(3):
            review = f"review {i}: {words}<br />" + "so " * (5 * i) + words
            (root / "aclImdb" / sub / f"{i}_7.txt").write_text(review)
            reviews[sub, i] = review.replace("<br />", "\n")
    args = ["--general-corpus", "wikitext-2", "--target-corpus", "imdb", "--general-chars",
            "100000", "--emb-dim", "8", "--hidden-dim", "16", "--seq-len", "12",
            "--batch-size", "2", "--clf-batch", "2", "--num-labelled", "4", "--num-eval", "8"]
    with pytest.raises(ValueError, match="corpus='wikitext-2' is read from disk"):
        run.check_config(run.parse(ulmfit.Config, ulmfit.PRESETS, args)[0])
    cfg = run.parse(ulmfit.Config, ulmfit.PRESETS, args + ["--data-dir", str(root)])[0]
    run.check_config(cfg)
    g, t_train, t_val, chars = ulmfit.corpora(cfg)
    lm = "\n\n".join(reviews[sub, i] for sub in ("train/pos", "train/neg", "train/unsup")
                      for i in range(3))
    assert _decode(g, chars) == text and _decode(np.concatenate([t_train, t_val]), chars) == lm
    assert "¶" in chars and "¶" not in lm  # the test reviews' characters, not their text
    x, y, x_ev, y_ev = ulmfit.task_data(cfg)
    assert x.shape == (4, 12) and x_ev.shape == (8, 12)  # 6 test reviews repeated to 8
    for windows, labels, split in ((x, y, "train"), (x_ev, y_ev, "test")):
        ends = {reviews[f"{split}/{c}", i][-12:].rjust(12): int(c == "pos")
                for c in ("pos", "neg") for i in range(3)}
        assert [ends[_decode(w, chars)] for w in windows] == list(labels)
    assert set(y_ev) == {0, 1}
    state = jax.eval_shape(lambda k: ulmfit.init(k, cfg), KEY)
    assert state is not None
