"""Offline data: procedural detection scenes (shapes with exact boxes) and a loader for
real COCO-format data on disk; text corpora that ship in wheels, and readers for real ones
already on disk (enwik8, text8, WikiText, the 1B Word Benchmark, IMDb); a language model's
bits and perplexity; downloaded Hugging Face checkpoints (safetensors); scikit-learn's
digits and the SimCLR augmentations; readers for MNIST and CIFAR-10 files already on disk.
Nothing here downloads anything.

`shapes_batch` draws scenes inside a jitted training step (an endless stream from the
step's key); `shapes` makes a fixed set (held-out evaluation, COCO export). A detection set
is a dict of arrays:
    images  (N, H, W, 3) uint8
    boxes   (N, M, 4) float32, xyxy pixels, padded rows are 0
    labels  (N, M) int32, -1 for padding
plus `class_names`. `write_coco` / `load_coco` convert to and from the COCO layout
(`<dir>/annotations/instances_<split>.json` + `<dir>/<split>/*.png|jpg`).
"""

import functools
import gzip
import json
import math
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common.boxes import iou

SHAPES = ("circle", "rectangle", "triangle")
# Well-separated hues for colour-coded classes (shape x colour).
PALETTE = np.array([[230, 40, 40], [40, 90, 230], [40, 200, 60], [240, 200, 30],
                    [200, 60, 220], [30, 210, 220], [250, 130, 20], [240, 240, 240]])


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a linear (half-pixel centres, edge-clamped) upsampling: the
    weights of jax.image.resize(..., "linear") as a matrix, which compiles to one matmul."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi, f = np.minimum(lo + 1, n_in - 1), x - lo
    w = np.zeros((n_out, n_in), np.float32)
    np.add.at(w, (np.arange(n_out), lo), 1 - f)
    np.add.at(w, (np.arange(n_out), hi), f)
    return w


def _background(u, noise, size, photos):
    """A smooth random field plus pixel noise (u: 48 uniforms, noise: (size, size, 3)
    standard normals), or a random crop of `photos` (u: 3 uniforms)."""
    if photos is not None:
        p = photos[_uint(u[0], photos.shape[0])]
        y = _uint(u[1], photos.shape[1] - size + 1)
        x = _uint(u[2], photos.shape[2] - size + 1)
        return jax.lax.dynamic_slice(p, (y, x, 0), (size, size, 3)).astype(jnp.float32)
    coarse = 160.0 * u[:48].reshape(4, 4, 3)
    w = jnp.asarray(_resize_weights(4, size))
    smooth = jnp.einsum("yi,xj,ijc->yxc", w, w, coarse)  # a smooth 4x4 -> size x size field
    return smooth + 12.0 * noise


def _uint(u, n):
    """Integers uniform in [0, n) from uniforms in [0, 1)."""
    return jnp.minimum(jnp.floor(u * n), n - 1).astype(jnp.int32)


def _masks(shape_id, boxes, apex, size):
    """(M, size, size) pixel masks of M shapes filling their xyxy boxes (pixel centres
    inside the shape), all objects at once by broadcasting."""
    yy = (jnp.arange(size) + 0.5)[None, :, None]
    xx = (jnp.arange(size) + 0.5)[None, None, :]
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    a = apex[:, None, None]
    w, h = x2 - x1, y2 - y1
    ellipse = ((xx - (x1 + w / 2)) / (w / 2)) ** 2 + ((yy - (y1 + h / 2)) / (h / 2)) ** 2 <= 1
    rect = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
    # triangle: base on the bottom edge, apex at a fraction `a` of the top edge; a pixel is
    # inside when its three edge functions do not have both signs
    pts = [(x1, y2), (x2, y2), (x1 + a * w, y1)]
    side = lambda p, q: (xx - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (yy - q[1])
    d = [side(pts[0], pts[1]), side(pts[1], pts[2]), side(pts[2], pts[0])]
    neg = (d[0] < 0) | (d[1] < 0) | (d[2] < 0)
    pos = (d[0] > 0) | (d[1] > 0) | (d[2] > 0)
    tri = ~(neg & pos)
    s = shape_id[:, None, None]
    return jnp.where(s == 0, ellipse, jnp.where(s == 1, rect, tri))


def shapes_batch(key, batch: int, size: int = 64, max_objects: int = 4, min_size: int = 8,
                 max_size: int = 28, colours: int = 1, max_iou: float = 0.2, photos=None,
                 candidates: int = 16):
    """SHAPES scenes made on the device (jittable; size arguments static): 1..max_objects
    circles (ellipses) / rectangles / triangles of side min_size..max_size px on a smooth
    noisy background, or on random crops of `photos` (P, H, W, 3). Each object takes the
    first of `candidates` random boxes whose IoU with the objects already placed is <=
    max_iou (none fits: the object is dropped). Later objects are painted over earlier
    ones; an object left with no visible pixel is dropped. Classes are the 3 shapes; with
    colours > 1 they are shape x colour (3 * colours classes, colours from a fixed
    palette), otherwise colours are random and carry no label. Each object is one flat
    colour; its box is the tight box of its drawn pixels (the whole shape, also where a
    later object covers part of it). Returns images (B, size, size, 3) uint8, boxes (B, M,
    4) float32 xyxy, labels (B, M) int32 (-1 padding)."""
    palette = jnp.asarray(PALETTE, jnp.float32)
    m, c = max_objects, candidates

    def place(cand, num):
        """Greedy placement, unrolled over the (few) objects: object i takes its first
        candidate clear of the objects placed before it."""
        placed, ok = jnp.zeros((m, 4)), jnp.zeros(m, bool)
        for i in range(m):
            clear = ((iou(cand[i], placed) <= max_iou) | ~ok[None]).all(1)
            j = jnp.argmax(clear)
            placed = placed.at[i].set(cand[i, j])
            ok = ok.at[i].set(clear[j] & (i < num))
        return placed, ok

    # All the randomness of a batch comes from two draws (uniforms and normals), sliced per
    # scene: each jax.random call compiles its own counter-based generator, and a dozen of
    # them made this function take ~10 s to compile.
    sizes = dict(bg=48, num=1, wh=2 * m * c, xy=2 * m * c, shape=m, colour=m, rgb=3 * m,
                 apex=m)
    offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist(), strict=True))
    take = lambda u, name: u[offsets[name]:offsets[name] + sizes[name]]
    pixels = size * size * 3 if photos is None else 0  # pixel noise of the plain background
    n_normal = pixels + 3 * m + (pixels + 3 * m) % 2
    uniforms = jax.random.uniform(key, (batch, sum(sizes.values()) + n_normal),
                                  minval=jnp.finfo(jnp.float32).tiny)
    u1, u2 = uniforms[:, :n_normal // 2], uniforms[:, n_normal // 2:n_normal]
    uniforms = uniforms[:, n_normal:]
    radius = jnp.sqrt(-2.0 * jnp.log(u1))  # Box-Muller: standard normals from uniforms
    normals = jnp.concatenate([radius * jnp.cos(2 * jnp.pi * u2),
                               radius * jnp.sin(2 * jnp.pi * u2)], -1)

    def scene(u, z):
        bg_noise, jitter = z[:pixels].reshape(-1, size, 3), z[pixels:pixels + 3 * m].reshape(m, 3)
        img = _background(take(u, "bg"), bg_noise, size, photos)
        num = 1 + _uint(take(u, "num")[0], m)
        wh = (min_size + _uint(take(u, "wh"), max_size - min_size + 1)).astype(jnp.float32)
        wh = wh.reshape(m, c, 2)
        xy = jnp.floor(take(u, "xy").reshape(m, c, 2) * (size - wh + 1))
        placed, ok = place(jnp.concatenate([xy, xy + wh], -1), num)
        shape_id = _uint(take(u, "shape"), len(SHAPES))
        colour_id = _uint(take(u, "colour"), colours)
        colour = (palette[colour_id] if colours > 1
                  else 60.0 + 195.0 * take(u, "rgb").reshape(m, 3))
        colour = colour + 8.0 * jitter
        apex = 0.2 + 0.6 * take(u, "apex")
        masks = _masks(shape_id, placed, apex, size) & ok[:, None, None]
        # paint: each pixel takes the colour of the last object covering it
        top = m - 1 - jnp.argmax(masks[::-1], axis=0)  # (H, W)
        drawn = masks.any(0)
        img = jnp.where(drawn[..., None], colour[top], img)
        visible = drawn[None] & (top[None] == jnp.arange(m)[:, None, None])
        cols, rows = masks.any(1), masks.any(2)  # (M, W), (M, H)
        first = lambda a: jnp.argmax(a, axis=1).astype(jnp.float32)
        last = lambda a: (size - jnp.argmax(a[:, ::-1], axis=1)).astype(jnp.float32)
        tight = jnp.stack([first(cols), first(rows), last(cols), last(rows)], -1)
        ok = ok & visible.any((1, 2))
        label = jnp.where(ok, shape_id + len(SHAPES) * colour_id, -1)
        return (jnp.clip(jnp.round(img), 0, 255).astype(jnp.uint8),
                jnp.where(ok[:, None], tight, 0.0), label.astype(jnp.int32))

    return jax.vmap(scene)(uniforms, normals)


def sample_photos(size: int) -> np.ndarray:
    """scikit-learn's two bundled photos (china, flower), as (2, 427, 640, 3) uint8;
    enlarged (bilinear) so that their short side is at least `size` (e.g. 640 px scenes)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    ims = load_sample_images().images
    scale = max(1.0, size / min(min(im.shape[:2]) for im in ims))
    if scale > 1:
        ims = [np.asarray(Image.fromarray(im).resize(
            (round(im.shape[1] * scale), round(im.shape[0] * scale)), Image.BILINEAR))
            for im in ims]
    h, w = min(im.shape[0] for im in ims), min(im.shape[1] for im in ims)
    return np.stack([im[:h, :w] for im in ims])


def class_names(colours: int = 1) -> list[str]:
    return list(SHAPES) if colours == 1 else [f"{s}_{c}" for c in range(colours) for s in SHAPES]


def shapes(num_images: int, size: int = 64, max_objects: int = 4, min_size: int = 8,
           max_size: int = 28, colours: int = 1, max_iou: float = 0.2,
           photo_backgrounds: bool = False, seed: int = 0) -> dict:
    """A fixed SHAPES set as numpy arrays (see `shapes_batch`), e.g. a held-out
    evaluation set or a COCO export; `seed` fixes it."""
    if not 1 <= colours <= len(PALETTE):
        raise ValueError(f"colours must be in [1, {len(PALETTE)}], got {colours}")
    if not 0 < min_size <= max_size < size:
        raise ValueError(f"need 0 < min_size <= max_size < size, got {min_size}, "
                         f"{max_size}, {size}")
    photos = jnp.asarray(sample_photos(size)) if photo_backgrounds else None
    make = jax.jit(shapes_batch, static_argnums=range(1, 8))
    images, boxes, labels = jax.device_get(
        make(jax.random.PRNGKey(seed), num_images, size, max_objects, min_size, max_size,
             colours, max_iou, photos))
    return dict(images=images, boxes=boxes, labels=labels, class_names=class_names(colours))


# ----------------------------------------------------------------------------- COCO format


def to_coco(boxes, labels, class_names, image_shape, scores=None) -> dict:
    """COCO json dict of ground truth (or, with `scores`, the detection result list):
    boxes (N, M, 4) xyxy, labels (N, M) with -1 padding. Image ids and category ids
    start at 1."""
    anns, k = [], 0
    for n in range(len(boxes)):
        for m in range(len(boxes[n])):
            if labels[n][m] < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in boxes[n][m])
            k += 1
            a = dict(id=k, image_id=n + 1, category_id=int(labels[n][m]) + 1,
                     bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0)
            if scores is not None:
                a["score"] = float(scores[n][m])
            anns.append(a)
    if scores is not None:
        return anns
    h, w = image_shape[:2]
    return dict(images=[dict(id=n + 1, file_name=f"{n + 1:06d}.png", height=h, width=w)
                        for n in range(len(boxes))],
                annotations=anns,
                categories=[dict(id=i + 1, name=c) for i, c in enumerate(class_names)])


def write_coco(data_dir, split: str, data: dict) -> Path:
    """Write a detection set as COCO: PNG images and instances_<split>.json."""
    from PIL import Image

    root = Path(data_dir)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    coco = to_coco(data["boxes"], data["labels"], data["class_names"], data["images"].shape[1:])
    for im, meta in zip(data["images"], coco["images"], strict=True):
        Image.fromarray(im).save(root / split / meta["file_name"])
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(coco))
    return path


def load_coco(data_dir, split: str, size: int, max_objects: int = 100) -> dict:
    """Read a COCO-format split from disk (the layout of COCO 2017: annotations/
    instances_<split>.json and <split>/<file_name>), resize every image to size x size
    (boxes scaled with it), drop crowd boxes, map category ids to 0..K-1 in id order, and
    keep the first `max_objects` boxes per image."""
    from PIL import Image

    root = Path(data_dir)
    path = root / "annotations" / f"instances_{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --data-dir must hold annotations/"
                                f"instances_{split}.json and {split}/ (the COCO layout)")
    coco = json.loads(path.read_text())
    cats = sorted(c["id"] for c in coco["categories"])
    cat_index = {c: i for i, c in enumerate(cats)}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            per_image[a["image_id"]].append(a)
    n = len(coco["images"])
    images = np.zeros((n, size, size, 3), np.uint8)
    boxes = np.zeros((n, max_objects, 4), np.float32)
    labels = np.full((n, max_objects), -1, np.int32)
    for i, meta in enumerate(coco["images"]):
        im = Image.open(root / split / meta["file_name"]).convert("RGB")
        sx, sy = size / im.width, size / im.height
        images[i] = np.asarray(im.resize((size, size), Image.BILINEAR))
        for j, a in enumerate(per_image[meta["id"]][:max_objects]):
            x, y, w, h = a["bbox"]
            boxes[i, j] = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
            labels[i, j] = cat_index[a["category_id"]]
    return dict(images=images, boxes=boxes, labels=labels,
                class_names=[names[c] for c in cats])


# ----------------------------------------------------------------------------- text and images


REAL_CORPORA = {
    "enwik8": "the file enwik8 (the first 10^8 bytes of an English Wikipedia XML dump; the "
              "usual split by position: 90M / 5M / 5M bytes)",
    "text8": "the file text8 (10^8 characters of lower-case Wikipedia text; split 90M / 5M / 5M)",
    "wikitext-103": "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens (or the raw "
                    "version's wiki.*.raw), joined in that order",
    "wikitext-2": "as wikitext-103 (the small version)",
    "1b-words": "training-monolingual.tokenized.shuffled/news.en-*-of-00100 (sorted), then "
                "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",
}
"""Corpora read from a local `data_dir` (the folder holding the files named; nothing is
downloaded): name -> what is read. The text is the official splits joined in order, so a
file's held-out tail (`val_fraction`) comes from the validation and test splits."""


def _real_corpus(name: str, data_dir, max_chars: int | None) -> str:
    if data_dir is None:
        raise ValueError(f"corpus={name!r} is read from disk: pass data_dir (--data-dir), "
                         f"the folder with {REAL_CORPORA[name]}")
    root = Path(data_dir).expanduser()
    if name in ("enwik8", "text8"):
        files = [root / name]
    elif name.startswith("wikitext"):
        kind = "tokens" if (root / "wiki.train.tokens").exists() else "raw"
        files = [root / f"wiki.{s}.{kind}" for s in ("train", "valid", "test")]
    else:
        train = sorted((root / "training-monolingual.tokenized.shuffled").glob("news.en-*"))
        files = train or [root / "training-monolingual.tokenized.shuffled" / "news.en-*"]
        files.append(root / "heldout-monolingual.tokenized.shuffled"
                     / "news.en.heldout-00000-of-00050")
    parts, total = [], 0
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"corpus={name!r}: {f} not found (data_dir={str(root)!r} "
                                    f"must hold {REAL_CORPORA[name]})")
        # bytes decoded as UTF-8 (a character cut at the end of enwik8 becomes U+FFFD)
        parts.append(f.read_bytes().decode("utf-8", errors="replace"))
        total += len(parts[-1])
        if max_chars is not None and total >= max_chars:
            break
    return "".join(parts)


def text_corpus(name: str = "pydoc", max_chars: int | None = None, data_dir=None) -> str:
    """An English/code text that ships with Python: 'pydoc' (the reference-manual topics
    of pydoc_data, ~465k characters; the exact text varies with the Python version),
    'stdlib' (the standard library's own .py sources, sorted by path, ~14 MB), or 'this'
    (the Zen of Python, 857 characters, for smoke tests); or a real corpus read from
    `data_dir` (REAL_CORPORA: enwik8, text8, wikitext-103, wikitext-2, 1b-words)."""
    if name in REAL_CORPORA:
        text = _real_corpus(name, data_dir, max_chars)
        return text if max_chars is None else text[:max_chars]
    if name == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif name == "stdlib":
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        parts, total = [], 0
        for f in sorted(root.rglob("*.py")):
            if any(p in f.parts for p in ("site-packages", "test", "tests", "idle_test")):
                continue
            parts.append(f.read_text(errors="replace"))
            total += len(parts[-1])
            if max_chars is not None and total >= max_chars:
                break
        text = "\n".join(parts)
    elif name == "this":
        import codecs
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
            import this
        text = codecs.decode(this.s, "rot13")
    else:
        raise ValueError(f"corpus must be 'pydoc', 'stdlib', 'this' or one of "
                         f"{', '.join(REAL_CORPORA)} (from data_dir), got {name!r}")
    return text if max_chars is None else text[:max_chars]


def char_corpus(name: str = "pydoc", val_fraction: float = 0.1, max_chars: int | None = None,
                byte_level: bool = False, data_dir=None):
    """A character (or byte) language-modelling set: (train ids, val ids, vocab) with
    int32 ids; the last `val_fraction` of the text is the validation split. The vocab is
    the sorted set of characters of the whole text (or the 256 bytes)."""
    text = text_corpus(name, max_chars, data_dir)
    if byte_level:
        ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        vocab = [bytes([i]) for i in range(256)]
    else:  # code points, vectorised (10^8 characters of enwik8 in seconds)
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        uniq, ids = np.unique(points, return_inverse=True)
        vocab, ids = [chr(c) for c in uniq], ids.astype(np.int32).reshape(-1)
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:], vocab


def imdb_reviews(data_dir, split: str = "train"):
    """The IMDb reviews of Maas et al. 2011 from an unpacked aclImdb/ folder in `data_dir`
    (or `data_dir` itself): (texts, labels) of `split` 'train' or 'test' (labels 1 for
    <split>/pos, 0 for <split>/neg, in file-name order), or 'unsup' (train/unsup, labels
    -1). The `<br />` line breaks of the files become newlines."""
    root = Path(data_dir).expanduser()
    root = root / "aclImdb" if (root / "aclImdb").is_dir() else root
    if split not in ("train", "test", "unsup"):
        raise ValueError(f"split must be 'train', 'test' or 'unsup', got {split!r}")
    folders = [("train/unsup", -1)] if split == "unsup" else [(f"{split}/pos", 1),
                                                             (f"{split}/neg", 0)]
    texts, labels = [], []
    for sub, label in folders:
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"IMDb: {root / sub} not found (data_dir must hold the "
                                    "unpacked aclImdb/ folder)")
        for f in sorted((root / sub).glob("*.txt")):
            texts.append(f.read_text(errors="replace").replace("<br />", "\n"))
            labels.append(label)
    return texts, np.array(labels, np.int32)


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (the format of downloaded Hugging Face
    checkpoints: an 8-byte little-endian header length, a JSON header of name -> dtype,
    shape and byte offsets, then the raw little-endian data) as numpy arrays; BF16 via
    ml_dtypes. Read without the safetensors package."""
    import ml_dtypes

    raw = Path(path).expanduser().read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), memoryview(raw)[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if t["dtype"] == "BF16" else _SAFETENSORS_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t['dtype']}")
        begin, end = t["data_offsets"]
        out[name] = np.frombuffer(body[begin:end], dtype).reshape(t["shape"]).copy()
    return out


def read_hf_checkpoint(path, expect: dict | None = None) -> dict[str, np.ndarray]:
    """A downloaded Hugging Face checkpoint's tensors (`path`: its model.safetensors, or the
    folder holding it), after checking the config.json beside it (when there is one) where
    the tensors' shapes cannot tell: `expect` maps a config entry to (the value, or tuple of
    values, this file's Config means; what to change otherwise). A missing entry passes."""
    f = Path(path).expanduser()
    f = f / "model.safetensors" if f.is_dir() else f
    conf = f.parent / "config.json"
    hf = json.loads(conf.read_text()) if conf.is_file() else {}
    for entry, (ours, fix) in (expect or {}).items():
        ours = ours if isinstance(ours, tuple) else (ours,)
        if entry in hf and hf[entry] not in ours:
            raise ValueError(f"init_from: the checkpoint has {entry}={hf[entry]!r}, ours "
                             f"{ours[0]!r}: {fix}")
    return read_safetensors(f)


def bits(nll_nats, units_per_token: float = 1.0):
    """A mean negative log-likelihood in nats per token as bits per unit: nll / ln 2 /
    units_per_token (bits per character, per pixel dimension, per token; a BPE model's bits
    per byte with units_per_token = bytes per token). The post's H(s) = -(1/N) sum log2 p."""
    return nll_nats / (math.log(2.0) * units_per_token)


def perplexity(nll_nats):
    """Perplexity per token: 2^H = exp(mean NLL in nats) = (p_1 ... p_N)^(-1/N)."""
    return jnp.exp(nll_nats)


def lm_windows(key, ids, batch: int, length: int):
    """`batch` random windows of ids (a device array): inputs (B, L) and next-token
    targets (B, L). Jittable: draws starts from `key`."""
    starts = jax.random.randint(key, (batch,), 0, ids.shape[0] - length - 1)
    take = lambda s: jax.lax.dynamic_slice(ids, (s,), (length + 1,))
    w = jax.vmap(take)(starts)
    return w[:, :-1], w[:, 1:]


def digits():
    """scikit-learn's 8x8 handwritten digits (1,797 images, ships in the wheel): images
    (N, 8, 8) uint8 with intensities 0..16, labels (N,) int32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int32)


def number_pairs(n: int, seed: int = 0, high: int = 1_000_000, lang: str = "de"):
    """A synthetic translation set: n random integers in [0, high) written out in English
    and in `lang` by num2words ("4567" -> "four thousand, five hundred and sixty-seven" ->
    "viertausendfünfhundertsiebenundsechzig"); German reorders units and tens, so the
    model needs attention, not a monotone copy. Returns a list of (source, target)."""
    from num2words import num2words

    rng = np.random.default_rng(seed)
    # log-uniform magnitudes, so short and long numbers both appear
    nums = np.floor(np.exp(rng.uniform(0, np.log(high), n))).astype(int) - 1
    return [(num2words(int(k), lang="en"), num2words(int(k), lang=lang)) for k in nums]


# ----------------------------------------------------------------------------- image
# classification sets on disk (read from a local --data-dir; never downloaded)

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def read_idx(path) -> np.ndarray:
    """An idx file (MNIST's format), plain or with a .gz beside the name: bytes 0-1 zero,
    byte 2 the type (0x08 = uint8), byte 3 ndim, then the ndim sizes as big-endian int32,
    then the data."""
    path = Path(path)
    path = path if path.exists() else path.with_name(path.name + ".gz")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --data-dir must hold MNIST's idx files "
                                f"({', '.join(MNIST_FILES)}, optionally .gz)")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 8:
        raise ValueError(f"{path} is not a uint8 idx file (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = np.frombuffer(raw, ">i4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def load_mnist(data_dir: str):
    """MNIST from its four idx files in `data_dir`: (train_x (60000, 28, 28) uint8,
    train_y (60000,) int32, test_x (10000, 28, 28) uint8, test_y int32), numpy, cached."""
    root = Path(data_dir).expanduser()
    tr_x, tr_y, te_x, te_y = (read_idx(root / name) for name in MNIST_FILES)
    return tr_x, tr_y.astype(np.int32), te_x, te_y.astype(np.int32)


@functools.cache
def load_cifar10(data_dir: str):
    """CIFAR-10's python version in `data_dir` (or its cifar-10-batches-py/ folder):
    data_batch_1..5 and test_batch, pickled dicts of b'data' (10000, 3072) uint8 (R, G, B
    planes) and b'labels'. Returns (train_x (N, 32, 32, 3) uint8, train_y int32, test_x,
    test_y), numpy, cached."""
    root = Path(data_dir).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(names):
        xs, ys = [], []
        for name in names:
            path = root / name
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: --data-dir must hold CIFAR-10's "
                                        "python batches (data_batch_1..5, test_batch)")
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], np.int32))
        return np.concatenate(xs).transpose(0, 2, 3, 1), np.concatenate(ys)

    return (*read([f"data_batch_{i}" for i in range(1, 6)]), *read(["test_batch"]))


# ----------------------------------------------------------------------------- images for
# self-supervised learning: an upsampled digits set and the SimCLR augmentations


@functools.cache
def digit_images(size: int = 32, num_train: int = 1000, seed: int = 0):
    """scikit-learn's digits (`digits()`) upsampled bilinearly from 8x8 to size x size,
    float32 in [0, 1] with one channel, split by a seeded permutation into `num_train`
    training images and the rest (797 at the default) for testing: numpy arrays
    (train_x (n, size, size, 1), train_y (n,), test_x, test_y). Cached: callers turn them
    into jnp arrays inside their jitted code (see common/run.py). Reads the csv that ships
    in scikit-learn's wheel directly: the same data as `digits()` without importing
    scikit-learn (~10 s on a loaded 2-core machine)."""
    import importlib.util

    root = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    raw = np.loadtxt(Path(root) / "datasets" / "data" / "digits.csv.gz", delimiter=",",
                     dtype=np.float32)  # (1797, 65): 64 pixels in 0..16, then the label
    images, labels = raw[:, :64].reshape(-1, 8, 8), raw[:, 64].astype(np.int32)
    if not 1 <= num_train < len(labels):
        raise ValueError(f"num_train={num_train} must be in [1, {len(labels) - 1}]")
    w = _resize_weights(8, size)
    x = np.einsum("yi,xj,nij->nyx", w, w, images / 16.0)[..., None]
    perm = np.random.default_rng(seed).permutation(len(labels))
    tr, te = perm[:num_train], perm[num_train:]
    return x[tr], labels[tr], x[te], labels[te]


def _interp_weights(start, length, n_in: int, n_out: int):
    """(n_out, n_in) bilinear weights sampling the window [start, start + length) of an axis
    of n_in pixels at n_out pixel centres (edge-clamped). Traced start/length, static sizes:
    a crop-and-resize is then two small matmuls (compiles fast, vmaps over a batch)."""
    pos = start + (jnp.arange(n_out) + 0.5) * length / n_out - 0.5
    pos = jnp.clip(pos, 0.0, n_in - 1.0)
    lo = jnp.floor(pos)
    f = (pos - lo)[:, None]
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n_in - 1)
    return (1 - f) * jax.nn.one_hot(lo, n_in) + f * jax.nn.one_hot(hi, n_in)


def crop_resize(img, box, size: int):
    """The window box = (y, x, h, w) (pixels, may be fractional) of img (H, W, C), resized
    bilinearly to (size, size, C)."""
    wy = _interp_weights(box[0], box[2], img.shape[0], size)
    wx = _interp_weights(box[1], box[3], img.shape[1], size)
    return jnp.einsum("yi,xj,ijc->yxc", wy, wx, img)


def random_resized_crop(key, img, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop (Szegedy et al. 2015; SimCLR [Chen et al. 2020] App. A): a
    window of area fraction ~ U(scale) and aspect ratio w/h log-uniform in `ratio` at a
    uniform position, resized to (size, size). Where the drawn window does not fit, its
    sides are clipped to the image (torchvision retries 10 times, TF's
    sample_distorted_bounding_box 100 times, before a fallback)."""
    h, w = img.shape[:2]
    u = jax.random.uniform(key, (4,))
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h * w
    r = jnp.exp(jnp.log(ratio[0]) + (jnp.log(ratio[1]) - jnp.log(ratio[0])) * u[1])
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    box = jnp.stack([u[2] * (h - ch), u[3] * (w - cw), ch, cw])
    return crop_resize(img, box, size)


def random_flip(key, img, p: float = 0.5):
    """Horizontal flip with probability p."""
    return jnp.where(jax.random.uniform(key) < p, img[:, ::-1], img)


def grayscale(img):
    """ITU-R 601 luma, kept with the input's number of channels."""
    if img.shape[-1] == 1:
        return img
    y = img @ jnp.array([0.299, 0.587, 0.114], img.dtype)
    return jnp.repeat(y[..., None], img.shape[-1], -1)


def random_grayscale(key, img, p: float = 0.2):
    """SimCLR's random greyscale: with probability p (identity on 1-channel images)."""
    return jnp.where(jax.random.uniform(key) < p, grayscale(img), img)


def _adjust_hue(img, delta):
    """Rotate the hue by delta turns (in YIQ space; TF rotates in HSV)."""
    to_yiq = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], img.dtype)
    c, s = jnp.cos(2 * jnp.pi * delta), jnp.sin(2 * jnp.pi * delta)
    rot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], img.dtype)
    rot = rot.at[1, 1].set(c).at[1, 2].set(-s).at[2, 1].set(s).at[2, 2].set(c)
    m = jnp.linalg.inv(to_yiq) @ rot @ to_yiq
    return img @ m.T


def color_jitter(key, img, strength: float = 1.0, p: float = 0.8):
    """SimCLR's colour distortion ([Chen et al. 2020] App. A, `color_jitter_rand` of the
    released code), applied with probability p: brightness (a factor in [1 - 0.8s, 1 +
    0.8s]), contrast (about each channel's mean, factor in [1 - 0.8s, 1 + 0.8s]), saturation
    (a blend with the greyscale image, factor in [1 - 0.8s, 1 + 0.8s]) and hue (a shift in
    [-0.2s, 0.2s] turns), in a random order, each clipped to [0, 1]. Saturation and hue
    leave 1-channel images unchanged. img: (H, W, C) in [0, 1]."""
    k_apply, k_order, k_f = jax.random.split(key, 3)
    u = jax.random.uniform(k_f, (4,), minval=-1.0, maxval=1.0)
    b, c, s, h = 1 + 0.8 * strength * u[0], 1 + 0.8 * strength * u[1], \
        1 + 0.8 * strength * u[2], 0.2 * strength * u[3]
    ops = [lambda x: x * b,
           lambda x: (x - x.mean((0, 1))) * c + x.mean((0, 1)),
           lambda x: grayscale(x) + (x - grayscale(x)) * s,
           lambda x: _adjust_hue(x, h) if x.shape[-1] == 3 else x]
    out = img
    order = jax.random.permutation(k_order, 4)
    for j in range(4):
        out = jnp.clip(jax.lax.switch(order[j], ops, out), 0.0, 1.0)
    return jnp.where(jax.random.uniform(k_apply) < p, out, img)


def gaussian_blur(key, img, p: float = 0.5, sigma=(0.1, 2.0)):
    """SimCLR's blur ([Chen et al. 2020] App. A): with probability p, a separable Gaussian
    of std ~ U(sigma) pixels over a (2 r + 1)-tap kernel, r = (H // 10) // 2 as in the
    released code (10% of the side). Rows of the kernel are renormalised at the border
    (the released code pads with zeros)."""
    k_apply, k_s = jax.random.split(key)
    sd = jax.random.uniform(k_s, minval=sigma[0], maxval=sigma[1])
    r = (img.shape[0] // 10) // 2

    def blur_matrix(n):
        d = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]
        k = jnp.where(jnp.abs(d) <= r, jnp.exp(-0.5 * (d / sd) ** 2), 0.0)
        return k / k.sum(1, keepdims=True)

    out = jnp.einsum("yi,xj,ijc->yxc", blur_matrix(img.shape[0]), blur_matrix(img.shape[1]),
                     img)
    return jnp.where(jax.random.uniform(k_apply) < p, out, img)


def simclr_augment(key, img, size: int, strength: float = 1.0, blur: bool = True,
                   crop_scale=(0.08, 1.0)):
    """One SimCLR view t(x) of img (H, W, C) in [0, 1] ([Chen et al. 2020] App. A): random
    resized crop to (size, size) and horizontal flip, colour jitter (p 0.8) of `strength`
    s, random greyscale (p 0.2), and Gaussian blur (p 0.5; the paper leaves it out on
    CIFAR-10). vmap it over keys and images for a batch."""
    k = jax.random.split(key, 5)
    x = random_flip(k[1], random_resized_crop(k[0], img, size, crop_scale))
    x = random_grayscale(k[3], color_jitter(k[2], x, strength))
    return gaussian_blur(k[4], x) if blur else x
