"""Tiny fixtures of real data sets in their on-disk formats, for the loaders of
common/data.py and the files that read a --data-dir."""

import gzip
import json
import pickle
from pathlib import Path

import numpy as np

from common.data import MNIST_FILES


def write_idx(path, array, gz: bool = True) -> Path:
    """`array` (uint8) as an idx file: two zero bytes, type 0x08, ndim, the sizes as
    big-endian int32, then the data; gzipped to path + '.gz' when gz."""
    array = np.asarray(array, np.uint8)
    raw = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes() + array.tobytes()
    path = Path(str(path) + (".gz" if gz else ""))
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)
    return path


def write_mnist(root, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> str:
    """MNIST's four idx files in `root`: random 28x28 pixels and labels 0..9."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
              rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))
    for name, a in zip(MNIST_FILES, arrays, strict=True):
        write_idx(root / name, a, gz)
    return str(root)


def write_cifar10(root, n: int = 2) -> str:
    """CIFAR-10's python version in `root`: data_batch_1..5 and test_batch with n images
    each; pixel value = batch * 16 + image * 4 + channel and label = batch + image, so a
    loader's layout (planes -> HWC, batch order) can be checked."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        planes = np.zeros((n, 3, 32, 32), np.uint8)
        for i in range(n):
            for c in range(3):
                planes[i, c] = b * 16 + i * 4 + c
        with open(root / name, "wb") as f:
            pickle.dump({b"data": planes.reshape(n, 3072), b"labels": [b + i for i in range(n)]},
                        f)
    return str(root)


def write_hf_checkpoint(folder, tensors: dict, config: dict) -> str:
    """A Hugging Face checkpoint folder: model.safetensors (8-byte little-endian header
    length, JSON header of dtype / shape / data offsets, raw little-endian f32) and
    config.json; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        b = np.ascontiguousarray(a, "<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    head = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head
                                               + b"".join(blobs))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def write_wikitext(folder, articles: int = 1, sizes=(1500, 200, 200)) -> str:
    """wiki.{train,valid,test}.tokens in WikiText's layout (` = Title = ` headings, blank
    lines between articles), words drawn with seed 0 and including a character (the section
    sign) that no built-in corpus has, so a test knows the text came from the fixture;
    returns the folder."""
    folder = Path(folder)
    folder.mkdir()
    words = ("the", "valkyrie", "chronicles", "game", "@-@", "was", "released", "in", "\u00a7")
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        if articles == 1:
            body = f" \n = Valkyria {split} = \n \n {' '.join(rng.choice(words, n))}\n"
        else:
            arts = [" ".join(rng.choice(words, n // articles)) + " ." for _ in range(articles)]
            body = "".join(f" \n = Valkyria {split} {i} = \n \n \n {a}\n \n \n"
                           for i, a in enumerate(arts))
        (folder / f"wiki.{split}.tokens").write_text(body)
    return str(folder)

