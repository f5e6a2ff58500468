"""Box machinery shared by the detectors in detection/: formats, IoU, the R-CNN box
encoding, anchor grids, IoU matching, jittable greedy NMS, COCO / VOC average precision, and
the detectors' SGD weight decay on kernels only.

Conventions: boxes are float arrays whose last axis is 4. `xyxy` = (x1, y1, x2, y2) is the
internal format; `cxcywh` = (centre x, centre y, width, height) is what the encodings use;
COCO json stores `xywh` = (x1, y1, width, height). Widths are x2 - x1 (no +1 pixel).
The AP functions are numpy (host side, after the jitted forward pass and NMS); the COCO AP
follows pycocotools' COCOeval for bounding boxes (101 recall points, greedy score-ordered
matching, at most `max_dets` detections per image and class) and is tested against it.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ----------------------------------------------------------------------------- formats


def xyxy_to_cxcywh(b):
    return jnp.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                      b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], -1)


def cxcywh_to_xyxy(b):
    return jnp.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                      b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)


def area(b):
    """Area of xyxy boxes (0 for degenerate ones)."""
    return jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)


def iou_aligned(a, b):
    """IoU of xyxy boxes a[..., i] with b[..., i] (broadcasting). Two empty boxes give 0."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def iou(a, b):
    """Pairwise IoU matrix of xyxy boxes: a (N, 4), b (M, 4) -> (N, M)."""
    return iou_aligned(a[:, None, :], b[None, :, :])


# ----------------------------------------------------------------------------- encoding


def encode(gt, anchors, variances=(1.0, 1.0)):
    """R-CNN parametrisation of cxcywh `gt` relative to cxcywh `anchors` (Girshick 2014;
    SSD's Eq. 2): t_x = (g_x - p_x) / p_w / v0, t_y likewise, t_w = log(g_w / p_w) / v1.
    SSD's released code divides by variances (0.1, 0.2); (1, 1) is the plain formula."""
    txy = (gt[..., :2] - anchors[..., :2]) / anchors[..., 2:] / variances[0]
    twh = jnp.log(gt[..., 2:] / anchors[..., 2:]) / variances[1]
    return jnp.concatenate([txy, twh], -1)


MAX_LOG_SCALE = float(np.log(1000.0 / 16))
"""The clamp of decoded log size offsets (Detectron's and torchvision's bbox_xform_clip): a
box at most 62.5 times its anchor, so one diverging prediction stays finite."""


def decode(t, anchors, variances=(1.0, 1.0), max_log_scale: float = MAX_LOG_SCALE):
    """Inverse of `encode`: cxcywh boxes from offsets `t` and cxcywh `anchors`, with the
    scaled size offsets clamped at `max_log_scale` before the exp."""
    xy = anchors[..., :2] + t[..., :2] * variances[0] * anchors[..., 2:]
    wh = anchors[..., 2:] * jnp.exp(jnp.minimum(t[..., 2:] * variances[1], max_log_scale))
    return jnp.concatenate([xy, wh], -1)


def decode_grid(t, anchors, max_log_scale: float = 10.0):
    """YOLOv2's direct location prediction (YOLOv2, v3 and YOLO9000): raw (..., S, S, A, 4)
    offsets on an S x S grid with anchors (A, 2) -> cxcywh boxes in units of the image,
    ((sigmoid(t_x) + c_x) / S, (sigmoid(t_y) + c_y) / S, p_w e^t_w, p_h e^t_h); the log sizes
    are clipped to +-max_log_scale before the exp so one diverging prediction stays finite."""
    s = t.shape[-3]
    cy, cx = jnp.meshgrid(jnp.arange(s), jnp.arange(s), indexing="ij")  # (S, S)
    bx_ = (jax.nn.sigmoid(t[..., 0]) + cx[:, :, None]) / s
    by_ = (jax.nn.sigmoid(t[..., 1]) + cy[:, :, None]) / s
    wh = anchors * jnp.exp(jnp.clip(t[..., 2:4], -max_log_scale, max_log_scale))
    return jnp.concatenate([bx_[..., None], by_[..., None], wh], -1)


def clip_to_image(b, height, width):
    """xyxy boxes clipped to the image [0, width] x [0, height] (before NMS and scoring)."""
    lo = jnp.zeros(4, b.dtype)
    hi = jnp.asarray([width, height, width, height], b.dtype)
    return jnp.clip(b, lo, hi)


def grid_anchors(height: int, width: int, sizes) -> jax.Array:
    """cxcywh anchors of a height x width feature map in units of the image (0..1): for
    every cell, row-major, the A (w, h) `sizes` centred at ((col + .5) / width,
    (row + .5) / height). Returns (height * width * A, 4)."""
    sizes = jnp.asarray(sizes, jnp.float32).reshape(-1, 2)
    cy, cx = jnp.meshgrid((jnp.arange(height) + 0.5) / height,
                          (jnp.arange(width) + 0.5) / width, indexing="ij")
    centres = jnp.stack([cx, cy], -1).reshape(-1, 1, 2)
    centres = jnp.broadcast_to(centres, (height * width, sizes.shape[0], 2))
    wh = jnp.broadcast_to(sizes, centres.shape)
    return jnp.concatenate([centres, wh], -1).reshape(-1, 4)


def cell_owner(idx, valid, shape):
    """One owner per target cell: the valid object of highest index among those that land
    in it (darknet's loop over the truths overwrites a cell, so the last one wins). A plain
    `.at[idx].set` leaves the winner of a collision unspecified in XLA, and per-field
    scatters may even mix two objects in one cell. idx: a tuple of index arrays (M,) into
    `shape` (out-of-range rows are dropped), valid (M,). Returns (owner, put): owner
    (shape) int32, -1 where no object lands; put(v) gathers per-object values v (M, ...)
    into (shape + v.shape[1:]), zeros where no object lands."""
    objects = jnp.where(valid, jnp.arange(valid.shape[0]), -1)
    owner = jnp.full(shape, -1, jnp.int32).at[idx].max(objects, mode="drop")

    def put(v):
        got = v[jnp.maximum(owner, 0)]
        mask = (owner >= 0).reshape(owner.shape + (1,) * (v.ndim - 1))
        return jnp.where(mask, got, jnp.zeros_like(got))

    return owner, put


def match(anchors, gt, gt_valid, pos_iou: float, neg_iou: float, force_best: bool = True):
    """Assign each anchor (xyxy, (A, 4)) to a ground-truth box (xyxy, (G, 4), mask (G,)).

    Returns (index (A,) of the assigned box, label (A,): 1 positive (IoU >= pos_iou), 0
    negative (IoU < neg_iou), -1 ignored (in between; RetinaNet's band [0.4, 0.5))). With
    `force_best`, each valid box also claims its best anchor (SSD's bipartite step), so no
    object is left without a positive anchor.
    """
    m = jnp.where(gt_valid[None, :], iou(anchors, gt), -1.0)
    idx = jnp.argmax(m, axis=1)
    best = jnp.max(m, axis=1)
    label = jnp.where(best >= pos_iou, 1, jnp.where(best < neg_iou, 0, -1))
    if force_best:
        # padding rows point past the end and are dropped (their argmax would be anchor 0);
        # if two boxes claim the same anchor, the one of highest index keeps it
        best_anchor = jnp.where(gt_valid, jnp.argmax(m, axis=0), anchors.shape[0])  # (G,)
        owner, _ = cell_owner((best_anchor,), gt_valid, (anchors.shape[0],))
        idx = jnp.where(owner >= 0, owner, idx)
        label = jnp.where(owner >= 0, 1, label)
    return idx, label


def kernel_weight_decay(weight_decay: float) -> optax.GradientTransformation:
    """L2 weight decay as darknet and Caffe apply it: weight_decay * w added to the gradient
    (before momentum; not decoupled), on kernels only (ndim > 1). Biases, batch-norm scales
    and offsets and other vectors are not decayed (darknet decays `weights` alone; Caffe's
    detection prototxts give biases decay_mult 0)."""
    return optax.add_decayed_weights(
        weight_decay, mask=lambda params: jax.tree.map(lambda w: w.ndim > 1, params))


# ----------------------------------------------------------------------------- NMS


def nms(boxes, scores, iou_threshold: float = 0.5, max_out: int = 100,
        score_threshold: float = -jnp.inf):
    """Greedy non-maximum suppression, jittable with fixed shapes.

    Boxes (N, 4) xyxy, scores (N,). Sort by score (stable: ties keep input order); walk
    down the list keeping a box unless it overlaps an already kept box by IoU >
    iou_threshold; boxes with score <= score_threshold are dropped first. Returns
    (indices (max_out,), valid (max_out,)): the kept boxes in descending score order,
    padded with index 0 and valid False.
    """
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros(max_out, jnp.int32), jnp.zeros(max_out, bool)
    order = jnp.argsort(-scores, stable=True)
    b, s = boxes[order], scores[order]
    k = min(max_out, n)

    # Walk the sorted list while fewer than k boxes are kept and scores are above the
    # threshold (sorted: the first one below ends the walk). Each candidate is compared with
    # the kept boxes only: O(n k) work and O(n + k) memory, no n x n overlap matrix.
    def cond(c):
        i, count, _, _ = c
        return (i < n) & (count < k) & (s[jnp.minimum(i, n - 1)] > score_threshold)

    def body(c):
        i, count, kept, kept_boxes = c
        overlaps = iou(b[i][None], kept_boxes)[0] > iou_threshold  # (k,)
        keep = ~jnp.any(overlaps & (jnp.arange(k) < count))
        kept = jnp.where(keep, kept.at[count].set(i), kept)
        kept_boxes = jnp.where(keep, kept_boxes.at[count].set(b[i]), kept_boxes)
        return i + 1, count + keep, kept, kept_boxes

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros(k, jnp.int32), jnp.zeros((k, 4), b.dtype))
    _, count, kept, _ = jax.lax.while_loop(cond, body, init)
    valid = jnp.arange(k) < count
    idx = jnp.where(valid, order[kept], 0)
    if k < max_out:
        idx = jnp.concatenate([idx, jnp.zeros(max_out - k, idx.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros(max_out - k, bool)])
    return idx, valid


def batched_nms(boxes, scores, classes, iou_threshold: float = 0.5, max_out: int = 100,
                score_threshold: float = -jnp.inf):
    """Per-class NMS in one pass: boxes of different classes are shifted apart by
    class * (largest coordinate + 1), so they never overlap."""
    finite = jnp.where(jnp.isfinite(boxes), jnp.abs(boxes), 0.0)  # one inf box breaks no class
    shift = (jnp.max(finite) + 1.0) * classes.astype(boxes.dtype)
    return nms(boxes + shift[:, None], scores, iou_threshold, max_out, score_threshold)


def topk_nms(boxes, scores, topk: int, iou_threshold: float = 0.5, max_out: int = 100,
             score_threshold: float = -jnp.inf):
    """One image's detections: the `topk` best (box, class) pairs of boxes (N, 4) and
    class scores (N, K), then per-class NMS. Returns boxes (max_out, 4), scores, classes and
    valid (max_out,); vmap it over a batch."""
    k = scores.shape[-1]
    top, i = jax.lax.top_k(scores.reshape(-1), min(topk, scores.size))
    box, cls = boxes[i // k], i % k
    keep, valid = batched_nms(box, top, cls, iou_threshold, max_out, score_threshold)
    return box[keep], top[keep], cls[keep], valid


def nms_numpy(boxes, scores, iou_threshold: float = 0.5):
    """Reference greedy NMS (loops, numpy): kept indices in descending score order."""
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores)
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            x1, y1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
            x2, y2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
            inter = max(x2 - x1, 0) * max(y2 - y1, 0)
            a = lambda k: (boxes[k, 2] - boxes[k, 0]) * (boxes[k, 3] - boxes[k, 1])
            union = a(i) + a(j) - inter
            if union > 0 and inter / union > iou_threshold:
                ok = False
                break
        if ok:
            keep.append(int(i))
    return keep


# ----------------------------------------------------------------------------- average precision


def _iou_np(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    ar = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    union = ar(a)[:, None] + ar(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match_image(det_boxes, gt_boxes, t):
    """pycocotools' greedy matching for one image and class: detections (sorted by
    score) take the unmatched ground truth of highest IoU >= t. Returns TP flags."""
    tp = np.zeros(len(det_boxes), bool)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return tp
    ious = _iou_np(det_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    for d in range(len(det_boxes)):
        best, m = min(t, 1 - 1e-10), -1
        for g in range(len(gt_boxes)):
            if taken[g] or ious[d, g] < best:
                continue
            best, m = ious[d, g], g
        if m >= 0:
            taken[m] = tp[d] = True
    return tp


def average_precision(tp, scores, num_gt: int, method: str = "coco") -> float:
    """AP of one class from detection TP flags and scores pooled over images.

    method: 'coco' (precision made monotone, sampled at 101 recall points 0:.01:1 with
    searchsorted, as pycocotools), 'voc07' (11-point interpolation), 'voc' (all points,
    VOC 2010+). Returns nan when the class has no ground truth.
    """
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tp = np.asarray(tp, bool)[order]
    tps, fps = np.cumsum(tp), np.cumsum(~tp)
    recall = tps / num_gt
    precision = tps / np.maximum(tps + fps, np.spacing(1))
    if method == "voc07":
        return float(np.mean([np.max(precision[recall >= r], initial=0.0)
                              for r in np.linspace(0, 1, 11)]))
    mono = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    if method == "voc":
        r = np.concatenate([[0.0], recall])
        return float(np.sum((r[1:] - r[:-1]) * mono))
    if method != "coco":
        raise ValueError(f"method must be 'coco', 'voc07' or 'voc', got {method!r}")
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    q = np.zeros(101)
    ok = idx < len(mono)
    q[ok] = mono[idx[ok]]
    return float(np.mean(q))


def mean_average_precision(detections, ground_truths, num_classes: int,
                           iou_thresholds=(0.5,), method: str = "coco", max_dets: int = 100):
    """mAP over classes (that have ground truth) and IoU thresholds.

    detections: per image a tuple (boxes (D, 4) xyxy, scores (D,), classes (D,));
    ground_truths: per image (boxes (G, 4) xyxy, classes (G,)). COCO's mAP@[.5:.95] is
    iou_thresholds=np.linspace(0.5, 0.95, 10). Returns (mAP, per-class AP (C, T)).

    Matching is COCO's for every `method`: a detection whose best ground truth is already
    taken falls through to the best untaken one above the threshold. The VOC devkit counts
    it a false positive instead, so the 'voc' and 'voc07' APs here can be slightly higher
    than the devkit's on crowded images (and 'difficult' objects are not modelled).
    """
    ap = np.full((num_classes, len(iou_thresholds)), np.nan)
    for c in range(num_classes):
        num_gt = sum(int(np.sum(np.asarray(g[1]) == c)) for g in ground_truths)
        for ti, t in enumerate(iou_thresholds):
            tps, scores = [], []
            for (db, ds, dc), (gb, gc) in zip(detections, ground_truths, strict=True):
                sel = np.asarray(dc) == c
                b, s = np.asarray(db, np.float64)[sel], np.asarray(ds)[sel]
                o = np.argsort(-s, kind="mergesort")[:max_dets]
                g = np.asarray(gb, np.float64)[np.asarray(gc) == c]
                tps.append(_match_image(b[o], g, t))
                scores.append(s[o])
            ap[c, ti] = average_precision(np.concatenate(tps), np.concatenate(scores),
                                          num_gt, method)
    valid = ~np.isnan(ap)
    return (float(np.mean(ap[valid])) if valid.any() else float("nan")), ap


def detection_map(detections, gt_boxes, gt_labels, num_classes: int) -> dict:
    """COCO mAP@0.5 and mAP@[.5:.95] of a detector's fixed-size output on a data set.

    detections: (boxes (N, D, 4), scores (N, D), classes (N, D), valid (N, D)) as numpy,
    e.g. from vmapped `batched_nms`; ground truth padded as in common.data (labels -1)."""
    b, s, c, v = detections
    dets = [(b[i][v[i]], s[i][v[i]], c[i][v[i]]) for i in range(len(b))]
    gts = [(gt_boxes[i][gt_labels[i] >= 0], gt_labels[i][gt_labels[i] >= 0])
           for i in range(len(b))]
    m50, _ = mean_average_precision(dets, gts, num_classes, (0.5,))
    m, _ = mean_average_precision(dets, gts, num_classes, np.linspace(0.5, 0.95, 10))
    return {"mAP50": m50, "mAP": m}


def evaluate_detector(predict, data: dict, num_classes: int, batch: int = 32) -> dict:
    """`detection_map` of a jitted `predict(images) -> (boxes, scores, classes, valid)` on a
    data set as common.data makes it (images, boxes, labels), run in chunks of `batch`
    images (the last one padded: one compiled shape, memory bounded whatever the set's
    size), plus the images/s of predict, timed on a second pass after a warm-up pass."""
    images = np.asarray(data["images"])
    n = len(images)
    b = min(batch, n)
    pad = -n % b
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])

    def all_chunks():
        outs = [predict(jnp.asarray(images[i:i + b])) for i in range(0, len(images), b)]
        return jax.block_until_ready(outs)

    outs = all_chunks()
    t0 = time.perf_counter()
    all_chunks()
    ips = n / (time.perf_counter() - t0)
    out = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *jax.device_get(outs))
    metrics = detection_map(out, data["boxes"], data["labels"], num_classes)
    return {**metrics, "images_per_s": ips}
