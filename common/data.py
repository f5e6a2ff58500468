"""Offline data: procedural detection scenes (shapes with exact boxes) and a loader for
real COCO-format data on disk. Nothing here downloads anything.

A detection set is a dict of numpy arrays, small enough to sit on the device so a jitted
training step samples its own batches:
    images  (N, H, W, 3) uint8
    boxes   (N, M, 4) float32, xyxy pixels, padded rows are 0
    labels  (N, M) int32, -1 for padding
plus `class_names`. `write_coco` / `load_coco` convert to and from the COCO layout
(`<dir>/annotations/instances_<split>.json` + `<dir>/<split>/*.png|jpg`).
"""

import json
from pathlib import Path

import numpy as np

SHAPES = ("circle", "rectangle", "triangle")
# Well-separated hues for colour-coded classes (shape x colour).
PALETTE = np.array([[230, 40, 40], [40, 90, 230], [40, 200, 60], [240, 200, 30],
                    [200, 60, 220], [30, 210, 220], [250, 130, 20], [240, 240, 240]])


def _background(rng, size, photos):
    if photos is not None:
        p = photos[rng.integers(len(photos))]
        y, x = rng.integers(p.shape[0] - size + 1), rng.integers(p.shape[1] - size + 1)
        return p[y : y + size, x : x + size].astype(np.float32)
    coarse = rng.uniform(0, 160, (4, 4, 3))
    up = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
    return up + rng.normal(0, 12, (size, size, 3))


def _mask(shape, x1, y1, w, h, yy, xx, rng):
    if shape == "circle":  # an ellipse filling the box
        cx, cy = x1 + w / 2, y1 + h / 2
        return ((xx + 0.5 - cx) / (w / 2)) ** 2 + ((yy + 0.5 - cy) / (h / 2)) ** 2 <= 1
    if shape == "rectangle":
        return (xx >= x1) & (xx < x1 + w) & (yy >= y1) & (yy < y1 + h)
    # triangle: base on the bottom edge, apex somewhere on the top edge
    ax = x1 + rng.uniform(0.2, 0.8) * w
    pts = np.array([[x1, y1 + h], [x1 + w, y1 + h], [ax, y1]])
    px, py = xx + 0.5, yy + 0.5
    sign = lambda a, b: (px - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (py - b[1])
    d1, d2, d3 = sign(pts[0], pts[1]), sign(pts[1], pts[2]), sign(pts[2], pts[0])
    neg, pos = (d1 < 0) | (d2 < 0) | (d3 < 0), (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def shapes(num_images: int, size: int = 64, max_objects: int = 4, min_size: int = 8,
           max_size: int = 28, colours: int = 1, max_iou: float = 0.2,
           photo_backgrounds: bool = False, seed: int = 0) -> dict:
    """SHAPES scenes: 1..max_objects circles / rectangles / triangles of side min_size to
    max_size px on a smooth noisy background (or crops of scikit-learn's two sample
    photos), with pairwise box IoU <= max_iou. Classes are the 3 shapes; with colours > 1
    they are shape x colour (3 * colours classes, colours from a fixed palette), otherwise
    colours are random and carry no label. Boxes are the tight boxes of the drawn pixels."""
    if not 1 <= colours <= len(PALETTE):
        raise ValueError(f"colours must be in [1, {len(PALETTE)}], got {colours}")
    if not 0 < min_size <= max_size < size:
        raise ValueError(f"need 0 < min_size <= max_size < size, got {min_size}, "
                         f"{max_size}, {size}")
    rng = np.random.default_rng(seed)
    photos = None
    if photo_backgrounds:
        from sklearn.datasets import load_sample_images

        photos = [im for im in load_sample_images().images if min(im.shape[:2]) >= size]
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((num_images, size, size, 3), np.uint8)
    boxes = np.zeros((num_images, max_objects, 4), np.float32)
    labels = np.full((num_images, max_objects), -1, np.int32)
    for n in range(num_images):
        img = _background(rng, size, photos)
        placed = []
        for _ in range(rng.integers(1, max_objects + 1)):
            for _attempt in range(20):
                w, h = rng.integers(min_size, max_size + 1, 2)
                x1, y1 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
                box = np.array([x1, y1, x1 + w, y1 + h], np.float32)
                if all(_iou_pair(box, b) <= max_iou for b, _ in placed):
                    break
            else:
                continue
            s = rng.integers(len(SHAPES))
            m = _mask(SHAPES[s], x1, y1, w, h, yy, xx, rng)
            if not m.any():
                continue
            c = rng.integers(colours) if colours > 1 else 0
            colour = PALETTE[c] if colours > 1 else rng.uniform(60, 255, 3)
            img[m] = colour + rng.normal(0, 8, 3)
            ys, xs = np.nonzero(m)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            placed.append((tight, s + len(SHAPES) * c))
        # later shapes may cover earlier ones partly; keep the labelled boxes as drawn
        for i, (b, lab) in enumerate(placed):
            boxes[n, i], labels[n, i] = b, lab
        images[n] = np.clip(img, 0, 255).astype(np.uint8)
    names = [f"{s}" if colours == 1 else f"{s}_{c}" for c in range(colours) for s in SHAPES]
    return dict(images=images, boxes=boxes, labels=labels, class_names=names)


def _iou_pair(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


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
